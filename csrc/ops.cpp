// Every op schema of the pyebm namespace, and the Python module pyebm._C.
//
// Importing pyebm._C registers the schemas below and every compiled backend's implementations: the CPU
// kernels (TORCH_LIBRARY_IMPL(pyebm, CPU) next to each kernel in csrc/cpu/), the CUDA kernels
// (csrc/cuda/) and the autograd kernels (csrc/cpu/op_autograd.cpp). The fake (meta) implementations of
// all of them live in one Python module, pyebm.ops._fake, which torch imports when it first needs one.
// Each op checks every tensor's shape, dtype, device and layout against the others before a kernel reads
// memory (csrc/cpu/op_checks.h); the fakes run the same checks (pyebm/ops/_checks.py).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "cpu/cpu_cache.h"
#include "cpu/cpu_isa.h"
#include "cpu/mlp_energy_cpu.h"

#ifndef PYEBM_VERSION
#define PYEBM_VERSION "unknown"
#endif

TORCH_LIBRARY(pyebm, m) {
  m.set_python_module("pyebm.ops._fake");

  // ---- the MLP energy (pyebm/ops/mlp_energy.py, pyebm/reference/mlp_energy.py) ----------------------
  // E [B, K] and dE/dy [B, K, D]. Differentiable in every tensor argument (autograd: op_autograd.cpp).
  m.def(
      "mlp_energy_grad(Tensor ctx, Tensor y, Tensor w_in, Tensor[] weights, Tensor[] biases, Tensor w_out, "
      "Tensor b_out, str activation, bool residual) -> (Tensor, Tensor)");
  m.def(
      "mlp_energy(Tensor ctx, Tensor y, Tensor w_in, Tensor[] weights, Tensor[] biases, Tensor w_out, "
      "Tensor b_out, str activation, bool residual) -> Tensor");
  // The vector-Jacobian products of mlp_energy_grad's (E, G) given grad_E [B, K] and grad_G [B, K, D] (either
  // may be None): the gradients of ctx, y, w_in, weights, biases, w_out, b_out, from the reference recomputed
  // with autograd (pyebm/ops/_autograd.py, CompositeImplicitAutograd, so it is differentiable again).
  m.def(
      "mlp_energy_vjp(Tensor ctx, Tensor y, Tensor w_in, Tensor[] weights, Tensor[] biases, Tensor w_out, "
      "Tensor b_out, str activation, bool residual, Tensor? grad_E, Tensor? grad_G) -> "
      "(Tensor, Tensor, Tensor, Tensor[], Tensor[], Tensor, Tensor)");
  // An op that does nothing but allocate an empty result: the per-call cost floor of our dispatch.
  m.def("dispatch_floor(Tensor x) -> Tensor");

  // ---- descent (pyebm/ops/descent.py, pyebm/ops/mlp_descent.py; inference ops) -----------------------
  // All T descent steps of the MLP energy in one call; see pyebm/ops/descent.py for the update rule.
  m.def(
      "mlp_descent(Tensor ctx, Tensor y0, Tensor w_in, Tensor[] weights, Tensor[] biases, Tensor w_out, "
      "Tensor b_out, str activation, bool residual, Tensor eta, Tensor noise_level, Tensor? noise, Tensor? lower, "
      "Tensor? upper, Tensor? step_clip, Tensor? mask, float grad_scale, float momentum, bool nesterov, "
      "float? grad_clip, float? grad_clip_norm, bool energy_scaled, float energy_temperature, float tol, "
      "bool tol_final_step, bool bound_each_step, str noise_mode) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // One fused update step over N rows, in place.
  m.def(
      "descent_update(Tensor(a!) y, Tensor(b!) g, Tensor E, Tensor(c!) active, Tensor(d!) steps, "
      "Tensor(e!) status, Tensor(f!)? velocity, Tensor(g!)? pending, Tensor? noise, Tensor? mask, Tensor? fixed, "
      "Tensor? lower, Tensor? upper, Tensor? step_clip, float eta, float noise_level, str noise_mode, "
      "float grad_scale, float momentum, float? grad_clip, float? grad_clip_norm, bool energy_scaled, "
      "float energy_temperature, float tol, bool tol_final_step, bool bound_each_step, Tensor? y_base=None) -> ()");
  // The best candidate of each context (select_best.cpp).
  m.def("select_best(Tensor y, Tensor E, Tensor E_init, Tensor status, str selection) -> (Tensor, Tensor, Tensor)");

  // ---- EBT-Policy (pyebm/ops/ebt_policy.py, pyebm/reference/ebt_policy.py) ---------------------------
  // E [B, K] and (need_grad) dE/dy [B, K, T, A] of the EBT-Policy energy. Differentiable in y, ctx_k, ctx_v,
  // bias and params (autograd: op_autograd.cpp); weights_t (transposed copies) must not require grad.
  m.def(
      "ebt_policy_energy_grad(Tensor y, Tensor ctx_k, Tensor ctx_v, Tensor bias, Tensor[] params, "
      "Tensor[] weights_t, int heads, float rms_eps, float ln_eps, bool need_grad) -> (Tensor, Tensor)");
  // The vector-Jacobian products of ebt_policy_energy_grad's (E, G): the gradients of y, ctx_k, ctx_v, bias
  // and params (pyebm/ops/_autograd.py, CompositeImplicitAutograd).
  m.def(
      "ebt_policy_energy_vjp(Tensor y, Tensor ctx_k, Tensor ctx_v, Tensor bias, Tensor[] params, int heads, "
      "float rms_eps, float ln_eps, Tensor? grad_E, Tensor? grad_G) -> (Tensor, Tensor, Tensor, Tensor, Tensor[])");
  // The whole descent loop of pyebm.minimize on this energy (method "gd", Euler, no noise, no mask):
  // per step the optional RMS normalisation ("rms": per candidate, "all": over the whole batch), the
  // Nesterov look-ahead, the network's energy and input gradient, and the update (descent_update.h); then
  // the final energy. tol_scope "all" tests the gradient norm over every running candidate together.
  // Returns (y, E_final, E_init, steps, status) as pyebm::mlp_descent does; with final_energy=False the
  // final energy pass is skipped and E_final is NaN (a caller that computes it only when it is read).
  m.def(
      "ebt_policy_descent(Tensor y0, Tensor ctx_k, Tensor ctx_v, Tensor bias, Tensor[] params, Tensor[] weights_t, "
      "int heads, float rms_eps, float ln_eps, Tensor eta, Tensor? lower, Tensor? upper, Tensor? step_clip, "
      "str normalize, float normalize_eps, float grad_scale, float momentum, bool nesterov, float? grad_clip, "
      "float? grad_clip_norm, bool energy_scaled, float energy_temperature, float tol, str tol_scope, "
      "bool tol_final_step, bool bound_each_step, bool final_energy=True) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The observation side of every layer (EBTPolicy.prepare without autograd): from tokens obs [B, L, C] and
  // the stacked cross-attention key/value weights w [layers * 2D, C], b [layers * 2D] and key norms
  // k_norm [layers, hd], the keys after their RMSNorm times hd^-0.5, transposed, ks [layers, B, H, hd, L],
  // and the values vs [layers, B, H, L, hd].
  m.def("ebt_policy_context(Tensor obs, Tensor w, Tensor b, Tensor k_norm, int heads, float rms_eps) -> (Tensor, Tensor)");

  // ---- EBT (pyebm/models/ebt.py) ----------------------------------------------------------------------
  // y [M, N] = x [M, K] @ w [N, K]^T (+ add [M, N]) for a few rows against a weight read in its row layout:
  // the products of EBT's prediction rows and extended context tokens (rows_linear.cpp). Inference op.
  m.def("rows_linear(Tensor x, Tensor w, Tensor? add=None) -> Tensor");
  // The steps of the prediction rows between those products (ebt_rows.cpp), float32 CPU, inference ops:
  // attention over the cached context and the rows' own keys, RoPE applied inside (qkv [B, R, 3, H, hd] before
  // RoPE; o [B, R, H * hd], lse [B, H, R]; the backward returns d(qkv) before RoPE), the RMSNorm without weight
  // (xn, r = 1 / rms) and its input gradient (plus add), and the SwiGLU gate silu(u) * z of uz = [u | z].
  m.def("ebt_rows_attention(Tensor qkv, Tensor k_ctx, Tensor v_ctx, Tensor cos, Tensor sin, Tensor? n_visible) "
        "-> (Tensor, Tensor)");
  m.def("ebt_rows_attention_bwd(Tensor do, Tensor qkv, Tensor k_ctx, Tensor v_ctx, Tensor o, Tensor lse, "
        "Tensor cos, Tensor sin, Tensor? n_visible) -> Tensor");
  m.def("ebt_rows_rms_norm(Tensor x, float eps) -> (Tensor, Tensor)");
  m.def("ebt_rows_rms_norm_bwd(Tensor xn, Tensor r, Tensor g, Tensor? add=None) -> Tensor");
  m.def("ebt_rows_swiglu(Tensor uz) -> Tensor");
  m.def("ebt_rows_swiglu_bwd(Tensor dm, Tensor uz) -> Tensor");
}

namespace py = pybind11;

namespace pyebm {
namespace cpu {
void bind_plan(py::module& m);             // mlp_plan.cpp
void bind_ebt_policy_plan(py::module& m);  // ebt_policy_plan.cpp
}  // namespace cpu
}  // namespace pyebm

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyebm compiled kernels (CPU C++, CUDA when built)";
  // PYEBM_CPU_ISA names an instruction set this CPU cannot run (or is misspelt): say so here, once, rather
  // than run other code than the one asked for.
  const pyebm::cpu::CpuIsaState& isa = pyebm::cpu::cpu_isa_state();
  if (!isa.error.empty()) throw py::value_error("pyebm: " + isa.error);
  pyebm::cpu::bind_plan(m);
  pyebm::cpu::bind_ebt_policy_plan(m);
  m.def("cpu_isa", []() {
    const pyebm::cpu::CpuIsaState& s = pyebm::cpu::cpu_isa_state();
    py::dict d;
    d["active"] = pyebm::cpu::isa_name(s.level);
    std::vector<std::string> supported;
    for (int l = pyebm::cpu::cpu_isa_supported(); l >= 0; --l) supported.push_back(pyebm::cpu::isa_name(l));
    d["supported"] = supported;
    d["requested"] = s.requested.empty() ? py::object(py::none()) : py::object(py::str(s.requested));
    return d;
  }, "The instruction set of the CPU kernels: {'active', 'supported' (widest first), 'requested' "
     "(PYEBM_CPU_ISA or None)}.");
  m.def("cpu_tuning", []() {
    const pyebm::cpu::CpuCaches& c = pyebm::cpu::cpu_caches();
    py::dict d;
    d["l1d_bytes"] = c.l1d;
    d["l2_bytes"] = c.l2;
    d["l2_shared_by"] = c.l2_sharing;
    d["l3_bytes"] = c.l3;
    d["l3_shared_by"] = c.l3_sharing;
    d["cache_source"] = std::string(c.source);
    d["default_block_bytes"] = pyebm::cpu::default_block_bytes(c);
    d["block_bytes"] = pyebm::cpu::block_bytes();
    d["split_flops"] = pyebm::cpu::split_flops();
    d["threads"] = static_cast<int64_t>(at::get_num_threads());
    return d;
  }, "What the CPU kernels size their row blocks from: this CPU's caches (and where they were read), the "
     "row-block working set in use (PYEBM_CPU_BLOCK_BYTES or three quarters of the L2 share), split_flops and "
     "the thread count.");
  m.def("cpu_block_rows", &pyebm::cpu::block_rows_for, py::arg("rows"), py::arg("row_bytes"),
        py::arg("flops_per_row"), py::arg("threads"), py::arg("block_bytes"), py::arg("split_flops"),
        "Rows per block the CPU kernels use for `rows` rows of `row_bytes` working set each (the rule of "
        "block_rows, every input explicit).");
  m.def("build_info", []() {
    py::dict d;
    d["version"] = PYEBM_VERSION;
#ifdef PYEBM_WITH_CUDA
    d["cuda"] = true;
#else
    d["cuda"] = false;
#endif
#ifdef PYEBM_HAVE_BLAS
    d["blas"] = "Fortran BLAS from libtorch (sgemm_/dgemm_)";
#else
    d["blas"] = "built-in loops (libtorch exports no Fortran BLAS)";
#endif
#ifdef _OPENMP
    d["openmp"] = true;
#else
    d["openmp"] = false;
#endif
    // the instruction set the CPU kernels use (PYEBM_CPU_ISA or the widest this CPU runs); benchmarks record it
    d["cpu_isa"] = pyebm::cpu::isa_name(pyebm::cpu::cpu_vec_level());
    d["torch_abi_cxx11"] = static_cast<bool>(_GLIBCXX_USE_CXX11_ABI);
    return d;
  });
}
