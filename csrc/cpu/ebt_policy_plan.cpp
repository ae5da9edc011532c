// pyebm._C.EbtPolicyPack: EBTPolicy's packed weights (the stacked cross-attention key/value weights, the
// network's parameters in the ops' order and the transposes of its forward products) held together, with
// minimize's one-call descent as one call from Python: the observation side, every step and the selection
// (ebt_policy_one_call_cpu, the kernels of the ops ebt_policy_context and ebt_policy_descent), without the
// dispatcher and the argument lists of two op calls.
//
// The pack is immutable. Python makes it from the model's packs (pyebm._state: checked against the module on
// every call, made again when a source changed) and holds it with them; it never looks at the module itself.
// A call whose inputs the pack does not take as they are (not plain eager tensors, another dtype, device or
// shape, noise in the rule) returns None: the caller then runs the op path, which converts or raises the
// documented error.
#include <torch/python.h>  // at::Tensor <-> torch.Tensor for pybind11

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <utility>
#include <vector>

#include "ebt_policy_cpu.h"
#include "py_eager.h"

namespace py = pybind11;

namespace pyebm {
namespace cpu {
namespace {

class EbtPolicyPack {
 public:
  EbtPolicyPack(at::Tensor kv_w, at::Tensor kv_b, at::Tensor k_norm, std::vector<at::Tensor> params,
                std::vector<at::Tensor> weights_t, int64_t heads, double rms_eps, double ln_eps, double ctx_rms_eps)
      : kv_w_(std::move(kv_w)), kv_b_(std::move(kv_b)), k_norm_(std::move(k_norm)), params_(std::move(params)),
        weights_t_(std::move(weights_t)), heads_(heads), rms_eps_(rms_eps), ln_eps_(ln_eps),
        ctx_rms_eps_(ctx_rms_eps) {
    TORCH_CHECK(!params_.empty() && params_[0].defined(), "pyebm: EbtPolicyPack needs the network's parameters");
    for (const at::Tensor* t : {&kv_w_, &kv_b_, &k_norm_})
      TORCH_CHECK(t->defined() && t->device().is_cpu() && t->scalar_type() == params_[0].scalar_type(),
                  "pyebm: EbtPolicyPack's key/value weights must be CPU tensors of the parameters' dtype");
  }

  // (y, E, E_init, steps, status, best, best_E, best_index) of the descent of y0 [B, K, T, A] from observation
  // tokens obs [B, L, C] (E and best_E None with final_energy=False), or None when the pack does not take
  // these inputs as they are.
  py::object descent(const py::handle& obs_h, const py::handle& y0_h, const at::Tensor& bias, const DescentRule& rule,
                     const std::string& normalize, double normalize_eps, const std::string& tol_scope,
                     bool final_energy) const {
    if (!plain_tensor(obs_h) || !plain_tensor(y0_h) || !eager_context()) return py::none();
    const at::Tensor& obs_ = THPVariable_Unpack(obs_h.ptr());
    const at::Tensor& y0_ = THPVariable_Unpack(y0_h.ptr());
    const at::ScalarType dt = params_[0].scalar_type();
    if (!fits(obs_, dt) || !fits(y0_, dt) || !fits(bias, dt) || obs_.dim() != 3 || y0_.dim() != 4 ||
        y0_.size(0) != obs_.size(0))
      return py::none();
    const RuleOptions& o = rule.options();
    const int64_t D = y0_.size(2) * y0_.size(3);
    for (const at::Tensor* t : {&o.lower, &o.upper, &o.step_clip})
      if (t->defined() && (t->scalar_type() != dt || t->numel() != D)) return py::none();
    // Computed without the GIL: another Python thread may reassign the caller's tensors meanwhile (.data =),
    // so the call reads aliases of them. The pack's tensors are its own.
    const at::Tensor obs = obs_.detach(), y0 = y0_.detach();
    PolicyOneCall out;
    {
      at::NoGradGuard no_grad;  // inference: no autograd graph, whatever the inputs require
      py::gil_scoped_release nogil;
      out = ebt_policy_one_call_cpu(obs, y0, kv_w_, kv_b_, k_norm_, ctx_rms_eps_, bias, params_, weights_t_, heads_,
                                    rms_eps_, ln_eps_, o, normalize, normalize_eps, tol_scope, final_energy);
    }
    auto maybe = [](const at::Tensor& t) { return t.defined() ? py::cast(t) : py::object(py::none()); };
    return py::make_tuple(out.y, maybe(out.E), out.E_init, out.steps, out.status, out.best, maybe(out.best_E),
                          out.best_index);
  }

 private:
  static bool fits(const at::Tensor& t, at::ScalarType dt) {
    return t.defined() && t.device().is_cpu() && t.scalar_type() == dt && t.layout() == at::kStrided;
  }

  at::Tensor kv_w_, kv_b_, k_norm_;
  std::vector<at::Tensor> params_, weights_t_;
  int64_t heads_;
  double rms_eps_, ln_eps_, ctx_rms_eps_;
};

}  // namespace

void bind_ebt_policy_plan(py::module& m) {
  py::class_<EbtPolicyPack>(m, "EbtPolicyPack",
                            "EBTPolicy's packed weights with its one-call descent (see pyebm.models.ebt_policy).")
      .def(py::init<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, int64_t,
                    double, double, double>(),
           py::arg("kv_w"), py::arg("kv_b"), py::arg("k_norm"), py::arg("params"), py::arg("weights_t"),
           py::arg("heads"), py::arg("rms_eps"), py::arg("ln_eps"), py::arg("ctx_rms_eps"))
      .def("descent", &EbtPolicyPack::descent, py::arg("obs"), py::arg("y0"), py::arg("bias"), py::arg("rule"),
           py::arg("normalize"), py::arg("normalize_eps"), py::arg("tol_scope"), py::arg("final_energy"));
}

}  // namespace cpu
}  // namespace pyebm
