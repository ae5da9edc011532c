"""The ops of the pure-Python install (``PYEBM_BUILD_EXT=0`` or ``PYEBM_DISABLE_EXT=1``): without pyebm._C, the
MLP-energy ops are defined here, with the schemas of csrc/ops.cpp and the reference as their implementation, so
that ``torch.ops.pyebm.*`` always exists. This is the ``torch`` backend under the op's name, not a kernel;
``pyebm.backends()`` reports ``cpu`` as unusable then. The ops check their arguments as the C++ ops do
(``pyebm.ops._checks``); their fakes are in ``pyebm.ops._fake`` and their autograd formula in
``pyebm.ops._autograd``, as for the compiled ops.

The descent, selection and EBT-Policy ops exist only in the extension; without it their Python callers run the
torch path.
"""
from __future__ import annotations

import torch

from pyebm import _backend
from pyebm.ops import _checks
from pyebm.reference import mlp_energy as ref

_SCHEMA_ARGS = ("Tensor ctx, Tensor y, Tensor w_in, Tensor[] weights, Tensor[] biases, Tensor w_out, "
                "Tensor b_out, str activation, bool residual")

DEFINED = _backend.ext() is None and not hasattr(torch.ops.pyebm, "mlp_energy_grad")


def check_mlp(grad: bool, ctx, y, w_in, weights, biases, w_out, b_out, activation) -> None:
    _checks.mlp_args("pyebm::mlp_energy_grad" if grad else "pyebm::mlp_energy", ctx, y, w_in, weights, biases, w_out,
                     b_out)
    _checks.activation(activation)


if DEFINED:
    _lib = torch.library.Library("pyebm", "DEF")
    _lib.define(f"mlp_energy_grad({_SCHEMA_ARGS}) -> (Tensor, Tensor)")
    _lib.define(f"mlp_energy({_SCHEMA_ARGS}) -> Tensor")
    _lib.define(f"mlp_energy_vjp({_SCHEMA_ARGS}, Tensor? grad_E, Tensor? grad_G) -> "
                "(Tensor, Tensor, Tensor, Tensor[], Tensor[], Tensor, Tensor)")
    _lib.define("dispatch_floor(Tensor x) -> Tensor")

    def _ref_grad(ctx, y, w_in, weights, biases, w_out, b_out, activation, residual):
        check_mlp(True, ctx, y, w_in, weights, biases, w_out, b_out, activation)
        return ref.mlp_energy_grad(ctx, y, w_in, weights, biases, w_out, b_out, activation, residual)

    def _ref_energy(ctx, y, w_in, weights, biases, w_out, b_out, activation, residual):
        check_mlp(False, ctx, y, w_in, weights, biases, w_out, b_out, activation)
        with torch.no_grad():
            return ref.mlp_energy(ctx, y, w_in, weights, biases, w_out, b_out, activation, residual)

    # CompositeExplicitAutograd covers every device; the autograd kernels are registered in _autograd.
    _lib.impl("mlp_energy_grad", _ref_grad, "CompositeExplicitAutograd")
    _lib.impl("mlp_energy", _ref_energy, "CompositeExplicitAutograd")
    _lib.impl("dispatch_floor", lambda x: x.new_empty(0), "CompositeExplicitAutograd")
