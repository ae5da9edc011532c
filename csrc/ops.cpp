// Op schemas of the pyebm namespace and the Python module pyebm._C.
// Importing pyebm._C registers the schemas below and every compiled backend's implementations.
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include "cpu/vec_act.h"

#ifndef PYEBM_VERSION
#define PYEBM_VERSION "unknown"
#endif

TORCH_LIBRARY(pyebm, m) {
  // E [B, K] and dE/dy [B, K, D] of the MLP energy; see pyebm/reference/mlp_energy.py.
  m.def(
      "mlp_energy_grad(Tensor ctx, Tensor y, Tensor w_in, Tensor[] weights, Tensor[] biases, Tensor w_out, "
      "Tensor b_out, str activation, bool residual) -> (Tensor, Tensor)");
  m.def(
      "mlp_energy(Tensor ctx, Tensor y, Tensor w_in, Tensor[] weights, Tensor[] biases, Tensor w_out, "
      "Tensor b_out, str activation, bool residual) -> Tensor");
  // An op that does nothing but allocate an empty result: the per-call cost floor of our dispatch.
  m.def("dispatch_floor(Tensor x) -> Tensor");
}

namespace py = pybind11;

namespace pyebm {
namespace cpu {
void bind_plan(py::module& m);  // mlp_plan.cpp
}  // namespace cpu
}  // namespace pyebm

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyebm compiled kernels (CPU C++, CUDA when built)";
  pyebm::cpu::bind_plan(m);
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
    d["torch_abi_cxx11"] = static_cast<bool>(_GLIBCXX_USE_CXX11_ABI);
    // The instruction set the CPU kernels chose at run time on this machine (benchmarks record it).
#if defined(PYEBM_VEC_ACT) && defined(__x86_64__)
    const int level = pyebm::cpu::cpu_vec_level();
    d["cpu_isa"] = level == 2 ? "AVX-512" : level == 1 ? "AVX2" : "baseline";
#else
    d["cpu_isa"] = "baseline";
#endif
    return d;
  });
}
