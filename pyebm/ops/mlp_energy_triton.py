"""Triton backend of the fused MLP energy ops, as torch.library custom ops.

``torch.ops.pyebm.mlp_energy_grad_triton`` -> (E [B, K], dE/dy [B, K, D]) and
``torch.ops.pyebm.mlp_energy_triton`` -> E [B, K] take the arguments of ``pyebm::mlp_energy_grad``
(ctx [B, H1], y [B, K, D], w_in [H1, D], weights[l] [H_{l+1}, H_l], biases[l] [H_{l+1}], w_out [H_L],
b_out [1], activation, residual) and compute the same values with one Triton launch (kernel:
``pyebm._kernels.mlp_energy``). dtypes float32, bfloat16, float16 (fp32 accumulation); outputs in
y's dtype. CUDA tensors, or CPU tensors when TRITON_INTERPRET=1 was set before the kernels were
imported (the interpreter: slow, for tests).

Both are differentiable in every tensor argument, with the formula of ``pyebm::mlp_energy_grad`` (the backward
is ``pyebm::mlp_energy_vjp``, the reference recomputed with autograd). The fakes are in ``pyebm.ops._fake``.
Triton is imported on the first call, so this module imports (and the ops exist, e.g. for tracing
with fake tensors) on machines without Triton.
"""
from __future__ import annotations

from typing import List, Tuple

import torch
from torch import Tensor

from pyebm import _backend
from pyebm.ops import _checks


def _kernels():
    if _backend.triton is None:
        raise RuntimeError(f"pyebm: the triton backend is not usable: {_backend.backends().why['triton']}")
    from pyebm._kernels import mlp_energy as kernels

    return kernels


def check(ctx, y, w_in, weights, biases, w_out, b_out, activation, fake: bool = False,
          op: str = "pyebm::mlp_energy_grad_triton") -> None:
    """The arguments of both ops (the fake runs it too; ``fake`` skips the rule on CPU tensors, which is the
    kernel's, not the op's)."""
    _checks.mlp_args(op, ctx, y, w_in, weights, biases, w_out, b_out)
    _checks.activation(activation)
    if y.dtype not in _checks.TRITON_DTYPES:
        raise TypeError(f"{op}: the triton backend takes y as float32, bfloat16 or float16; got {y.dtype}")
    if not fake and y.device.type == "cpu" and not _backend.triton_interpret():
        raise ValueError(f"{op}: the triton backend on CPU tensors needs TRITON_INTERPRET=1")


@torch.library.custom_op("pyebm::mlp_energy_grad_triton", mutates_args=())
def mlp_energy_grad_triton(ctx: Tensor, y: Tensor, w_in: Tensor, weights: List[Tensor], biases: List[Tensor],
                           w_out: Tensor, b_out: Tensor, activation: str, residual: bool) -> Tuple[Tensor, Tensor]:
    """(E [B, K], dE/dy [B, K, D]) in one Triton launch."""
    check(ctx, y, w_in, weights, biases, w_out, b_out, activation)
    return _kernels().mlp_energy_grad(ctx, y, w_in, weights, biases, w_out, b_out, activation, residual)


@torch.library.custom_op("pyebm::mlp_energy_triton", mutates_args=())
def mlp_energy_triton(ctx: Tensor, y: Tensor, w_in: Tensor, weights: List[Tensor], biases: List[Tensor],
                      w_out: Tensor, b_out: Tensor, activation: str, residual: bool) -> Tensor:
    """E [B, K] in one Triton launch (forward only)."""
    check(ctx, y, w_in, weights, biases, w_out, b_out, activation, op="pyebm::mlp_energy_triton")
    return _kernels().mlp_energy(ctx, y, w_in, weights, biases, w_out, b_out, activation, residual)


# -- autograd: the formula of pyebm::mlp_energy_grad (same math, same VJP op) -----------------------

def _setup(ctx, inputs, output):
    c, y, w_in, weights, biases, w_out, b_out, activation, residual = inputs
    ctx.save_for_backward(c, y, w_in, w_out, b_out, *weights, *biases)
    ctx.n, ctx.activation, ctx.residual = len(weights), activation, residual
    ctx.set_materialize_grads(False)


def _grads(ctx, grad_E, grad_G):
    c, y, w_in, w_out, b_out, *rest = ctx.saved_tensors
    n = ctx.n
    g = torch.ops.pyebm.mlp_energy_vjp(c, y, w_in, rest[:n], rest[n:], w_out, b_out, ctx.activation, ctx.residual,
                                       grad_E, grad_G)
    return g[0], g[1], g[2], list(g[3]), list(g[4]), g[5], g[6], None, None


mlp_energy_grad_triton.register_autograd(lambda ctx, gE, gG: _grads(ctx, gE, gG), setup_context=_setup)
mlp_energy_triton.register_autograd(lambda ctx, gE: _grads(ctx, gE, None), setup_context=_setup)
