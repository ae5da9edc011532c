"""The fused MLP energy ops.

``torch.ops.pyebm.mlp_energy_grad(ctx, y, w_in, weights, biases, w_out, b_out, activation, residual)``
returns ``(E [B, K], dE/dy [B, K, D])``; ``torch.ops.pyebm.mlp_energy`` returns E only. Shapes:
ctx [B, H1] (the context term ``W_x x + b_1``), y [B, K, D], w_in [H1, D], weights[l] [H_{l+1}, H_l],
biases[l] [H_{l+1}], w_out [H_L], b_out [1]. The math is ``pyebm.reference.mlp_energy``.

The kernels compute E and the input gradient G; called on tensors that require grad (the module's own
Parameters, say) the ops are differentiable in every tensor argument, G included (a registered formula: the
backward recomputes the reference with autograd, ``pyebm.ops._autograd``). For training, ``MLPEnergy.forward``
is the fast path; for inference, call these under ``torch.no_grad()`` or on detached tensors.

Backends: ``cpu`` and ``cuda`` (C++ in pyebm._C, registered on the CPU and CUDA dispatch keys), ``triton``
(``torch.ops.pyebm.mlp_energy_grad_triton``, any device Triton runs on), ``torch`` (the reference).
When the extension is not built, the ``pyebm::mlp_energy*`` schemas are defined in ``pyebm.ops._fallback``
with the reference as their implementation so that ``torch.ops.pyebm.*`` always exists; ``pyebm.backends()``
then reports ``cpu`` as unusable. Argument checks: ``pyebm.ops._checks``; fakes: ``pyebm.ops._fake``.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from pyebm import _backend
from pyebm.ops import _checks
from pyebm.ops import _fallback  # noqa: F401  (the ops' Python definitions when pyebm._C is absent)
from pyebm.reference import mlp_energy as ref


def _check_args(ctx, y, w_in, weights, biases, w_out, b_out, activation, op: str = "pyebm::mlp_energy_grad") -> None:
    """The op's argument checks (pyebm.ops._checks, the C++ kernel's messages), for the torch and triton paths."""
    _checks.mlp_args(op, ctx, y, w_in, weights, biases, w_out, b_out)
    _checks.activation(activation)


_SUPPORTED = ("torch", "cpu", "triton", "cuda")
_OP_GRAD = torch.ops.pyebm.mlp_energy_grad.default
_OP_ENERGY = torch.ops.pyebm.mlp_energy.default


def mlp_energy_grad(ctx: torch.Tensor, y: torch.Tensor, w_in: torch.Tensor, weights: Sequence[torch.Tensor],
                    biases: Sequence[torch.Tensor], w_out: torch.Tensor, b_out: torch.Tensor,
                    activation: str = "silu", residual: bool = False,
                    backend: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(E [B, K], dE/dy [B, K, D]) in one fused call on the chosen backend."""
    name = _backend.resolve(y.device, backend, _SUPPORTED)
    if name in ("cpu", "cuda"):  # the C++ op: the dispatcher picks the CPU or CUDA kernel by device
        return _OP_GRAD(ctx, y, w_in, weights, biases, w_out, b_out, activation, residual)
    _check_args(ctx, y, w_in, weights, biases, w_out, b_out, activation)
    if name == "triton":
        return torch.ops.pyebm.mlp_energy_grad_triton(ctx, y, w_in, weights, biases, w_out, b_out, activation,
                                                      residual)
    return ref.mlp_energy_grad(ctx, y, w_in, weights, biases, w_out, b_out, activation, residual)


def mlp_energy(ctx: torch.Tensor, y: torch.Tensor, w_in: torch.Tensor, weights: Sequence[torch.Tensor],
               biases: Sequence[torch.Tensor], w_out: torch.Tensor, b_out: torch.Tensor,
               activation: str = "silu", residual: bool = False, backend: Optional[str] = None) -> torch.Tensor:
    """E [B, K] on the chosen backend (no gradient)."""
    name = _backend.resolve(y.device, backend, _SUPPORTED)
    if name in ("cpu", "cuda"):
        return _OP_ENERGY(ctx, y, w_in, weights, biases, w_out, b_out, activation, residual)
    _check_args(ctx, y, w_in, weights, biases, w_out, b_out, activation, op="pyebm::mlp_energy")
    if name == "triton":
        return torch.ops.pyebm.mlp_energy_triton(ctx, y, w_in, weights, biases, w_out, b_out, activation, residual)
    with torch.no_grad():
        return ref.mlp_energy(ctx, y, w_in, weights, biases, w_out, b_out, activation, residual)


def dispatch_floor(x: torch.Tensor) -> torch.Tensor:
    """Our cheapest op (allocates an empty tensor): the per-call cost floor of the dispatcher path."""
    return torch.ops.pyebm.dispatch_floor(x)
