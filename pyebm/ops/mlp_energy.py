"""The fused MLP energy ops.

``torch.ops.pyebm.mlp_energy_grad(ctx, y, w_in, weights, biases, w_out, b_out, activation, residual)``
returns ``(E [B, K], dE/dy [B, K, D])``; ``torch.ops.pyebm.mlp_energy`` returns E only. Shapes:
ctx [B, H1] (the context term ``W_x x + b_1``), y [B, K, D], w_in [H1, D], weights[l] [H_{l+1}, H_l],
biases[l] [H_{l+1}], w_out [H_L], b_out [1]. The math is ``pyebm.reference.mlp_energy``.

These are inference ops: they compute the input gradient only, never gradients to the weights, and
record no autograd graph. Train with ``MLPEnergy.forward``.

Backends: ``cpu`` and ``cuda`` (C++ in pyebm._C, registered on the CPU and CUDA dispatch keys), ``triton``
(``torch.ops.pyebm.mlp_energy_grad_triton``, any device Triton runs on), ``torch`` (the reference).
When the extension is not built, the ``pyebm::mlp_energy*`` schemas are defined here with the
reference as their implementation so that ``torch.ops.pyebm.*`` always exists; ``pyebm.backends()``
then reports ``cpu`` as unusable.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from pyebm import _backend
from pyebm.reference import mlp_energy as ref

_SCHEMA_ARGS = ("Tensor ctx, Tensor y, Tensor w_in, Tensor[] weights, Tensor[] biases, Tensor w_out, "
                "Tensor b_out, str activation, bool residual")

if _backend.ext() is None:
    # No compiled extension: the same schemas, served by the reference (CompositeExplicitAutograd
    # covers every device). This is the `torch` backend under the op's name, not a kernel.
    _lib = torch.library.Library("pyebm", "DEF")
    _lib.define(f"mlp_energy_grad({_SCHEMA_ARGS}) -> (Tensor, Tensor)")
    _lib.define(f"mlp_energy({_SCHEMA_ARGS}) -> Tensor")
    _lib.define("dispatch_floor(Tensor x) -> Tensor")

    def _ref_grad(ctx, y, w_in, weights, biases, w_out, b_out, activation, residual):
        _check_args(ctx, y, w_in, weights, biases, w_out, b_out, activation)
        return ref.mlp_energy_grad(ctx, y, w_in, weights, biases, w_out, b_out, activation, residual)

    def _ref_energy(ctx, y, w_in, weights, biases, w_out, b_out, activation, residual):
        _check_args(ctx, y, w_in, weights, biases, w_out, b_out, activation)
        with torch.no_grad():
            return ref.mlp_energy(ctx, y, w_in, weights, biases, w_out, b_out, activation, residual)

    _lib.impl("mlp_energy_grad", _ref_grad, "CompositeExplicitAutograd")
    _lib.impl("mlp_energy", _ref_energy, "CompositeExplicitAutograd")
    _lib.impl("dispatch_floor", lambda x: x.new_empty(0), "CompositeExplicitAutograd")


def _fake_shapes(ctx, y, w_in):
    B, K, D = y.shape
    return y.new_empty(B, K), y.new_empty(B, K, D)


@torch.library.register_fake("pyebm::mlp_energy_grad")
def _(ctx, y, w_in, weights, biases, w_out, b_out, activation, residual):
    return _fake_shapes(ctx, y, w_in)


@torch.library.register_fake("pyebm::mlp_energy")
def _(ctx, y, w_in, weights, biases, w_out, b_out, activation, residual):
    return _fake_shapes(ctx, y, w_in)[0]


@torch.library.register_fake("pyebm::dispatch_floor")
def _(x):
    return x.new_empty(0)


def _check_args(ctx, y, w_in, weights, biases, w_out, b_out, activation) -> None:
    """Python-side checks with the same messages as the C++ kernel (used by the torch/triton paths)."""
    if y.dim() != 3:
        raise ValueError(f"pyebm: y must be [B, K, D] (3-D); got shape {tuple(y.shape)}")
    if not y.is_floating_point():
        raise TypeError(f"pyebm: y must be a floating tensor; got {y.dtype}")
    B, K, D = y.shape
    if w_in.dim() != 2 or w_in.shape[1] != D:
        raise ValueError(f"pyebm: candidate width mismatch: y is [B, K, {D}] but w_in is {tuple(w_in.shape)} "
                         f"(expected [H1, {D}])")
    H1 = w_in.shape[0]
    if ctx.dim() != 2 or ctx.shape[1] != H1:
        raise ValueError(f"pyebm: ctx must be [B, H1] = [{B}, {H1}]; got shape {tuple(ctx.shape)}")
    if ctx.shape[0] != B:
        raise ValueError(f"pyebm: batch mismatch: ctx has {ctx.shape[0]} rows but y has B = {B}")
    if len(weights) != len(biases):
        raise ValueError(f"pyebm: weights and biases must have the same length; got {len(weights)} and {len(biases)}")
    width = H1
    named = [("ctx", ctx), ("w_in", w_in), ("w_out", w_out), ("b_out", b_out)]
    for l, (w, b) in enumerate(zip(weights, biases)):
        if w.dim() != 2 or w.shape[1] != width:
            raise ValueError(f"pyebm: weights[{l}] must be [H_out, {width}]; got shape {tuple(w.shape)}")
        if b.dim() != 1 or b.shape[0] != w.shape[0]:
            raise ValueError(f"pyebm: biases[{l}] must be [{w.shape[0]}]; got shape {tuple(b.shape)}")
        named += [(f"weights[{l}]", w), (f"biases[{l}]", b)]
        width = w.shape[0]
    if w_out.numel() != width or w_out.dim() not in (1, 2):
        raise ValueError(f"pyebm: w_out must be [{width}] or [1, {width}]; got shape {tuple(w_out.shape)}")
    if b_out.numel() != 1:
        raise ValueError(f"pyebm: b_out must hold one value; got shape {tuple(b_out.shape)}")
    for name, t in named:
        if t.device != y.device:
            raise ValueError(f"pyebm: {name} is on {t.device} but y is on {y.device}")
        if t.dtype != y.dtype:
            raise TypeError(f"pyebm: {name} has dtype {t.dtype} but y has dtype {y.dtype}")
    ref.activation_fn(activation)


_SUPPORTED = ("torch", "cpu", "triton", "cuda")
_OP_GRAD = torch.ops.pyebm.mlp_energy_grad.default
_OP_ENERGY = torch.ops.pyebm.mlp_energy.default


def _triton_op():
    from pyebm.ops import mlp_energy_triton  # noqa: F401  (defines torch.ops.pyebm.mlp_energy_grad_triton)

    return torch.ops.pyebm


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
        return _triton_op().mlp_energy_grad_triton(ctx, y, w_in, weights, biases, w_out, b_out, activation,
                                                   residual)
    return ref.mlp_energy_grad(ctx, y, w_in, weights, biases, w_out, b_out, activation, residual)


def mlp_energy(ctx: torch.Tensor, y: torch.Tensor, w_in: torch.Tensor, weights: Sequence[torch.Tensor],
               biases: Sequence[torch.Tensor], w_out: torch.Tensor, b_out: torch.Tensor,
               activation: str = "silu", residual: bool = False, backend: Optional[str] = None) -> torch.Tensor:
    """E [B, K] on the chosen backend (no gradient)."""
    name = _backend.resolve(y.device, backend, _SUPPORTED)
    if name in ("cpu", "cuda"):
        return _OP_ENERGY(ctx, y, w_in, weights, biases, w_out, b_out, activation, residual)
    _check_args(ctx, y, w_in, weights, biases, w_out, b_out, activation)
    if name == "triton":
        return _triton_op().mlp_energy_triton(ctx, y, w_in, weights, biases, w_out, b_out, activation, residual)
    with torch.no_grad():
        return ref.mlp_energy(ctx, y, w_in, weights, biases, w_out, b_out, activation, residual)


def dispatch_floor(x: torch.Tensor) -> torch.Tensor:
    """Our cheapest op (allocates an empty tensor): the per-call cost floor of the dispatcher path."""
    return torch.ops.pyebm.dispatch_floor(x)
