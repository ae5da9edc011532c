// Whether a pybind11 call may bypass the dispatcher and compute what the torch.ops.pyebm ops would: the tensor is
// exactly torch.Tensor (no subclass, no Parameter), and no torch.jit.trace, torch.func transform (it includes
// its front-mode dispatch key while it runs) or dispatch mode (user or infra: FakeTensorMode, make_fx,
// non-strict export) is active. torch.compile's Dynamo never gets here: it does not run pybind11 calls, and
// the Python layer asks torch.compiler.is_compiling() first. The GIL is held.
#pragma once

#include <torch/python.h>

#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <pybind11/pybind11.h>
#include <torch/csrc/jit/frontend/tracer.h>

namespace pyebm {
namespace cpu {

inline bool plain_tensor(const pybind11::handle& t) {
  return Py_TYPE(t.ptr()) == reinterpret_cast<PyTypeObject*>(THPVariableClass);
}

inline bool eager_context() {
  return !torch::jit::tracer::isTracing() &&
         !c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::FuncTorchDynamicLayerFrontMode) &&
         !c10::impl::TorchDispatchModeTLS::any_modes_set();
}

}  // namespace cpu
}  // namespace pyebm
