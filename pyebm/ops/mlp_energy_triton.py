"""Triton backend of the fused MLP energy ops, as torch.library custom ops.

``torch.ops.pyebm.mlp_energy_grad_triton`` -> (E [B, K], dE/dy [B, K, D]) and
``torch.ops.pyebm.mlp_energy_triton`` -> E [B, K] take the arguments of ``pyebm::mlp_energy_grad``
(ctx [B, H1], y [B, K, D], w_in [H1, D], weights[l] [H_{l+1}, H_l], biases[l] [H_{l+1}], w_out [H_L],
b_out [1], activation, residual) and compute the same values with one Triton launch (kernel:
``pyebm._kernels.mlp_energy``). dtypes float32, bfloat16, float16 (fp32 accumulation); outputs in
y's dtype. CUDA tensors, or CPU tensors when TRITON_INTERPRET=1 was set before the kernels were
imported (the interpreter: slow, for tests).

Inference ops: no gradients to the weights and no autograd graph; use ``MLPEnergy.forward`` to train.
Triton is imported on the first call, so this module imports (and the ops exist, e.g. for tracing
with fake tensors) on machines without Triton.
"""
from __future__ import annotations

from typing import List, Tuple

import torch
from torch import Tensor

from pyebm import _backend
from pyebm.ops.mlp_energy import _check_args

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _kernels():
    if _backend.triton is None:
        raise RuntimeError(f"pyebm: the triton backend is not usable: {_backend.backends().why['triton']}")
    from pyebm._kernels import mlp_energy as kernels

    return kernels


def _check_triton(ctx, y, w_in, weights, biases, w_out, b_out, activation) -> None:
    _check_args(ctx, y, w_in, weights, biases, w_out, b_out, activation)
    if y.dtype not in _DTYPES:
        raise TypeError(f"pyebm: the triton backend takes y as float32, bfloat16 or float16; got {y.dtype}")
    if y.device.type == "cpu" and not _backend.triton_interpret():
        raise ValueError("pyebm: the triton backend on CPU tensors needs TRITON_INTERPRET=1")


@torch.library.custom_op("pyebm::mlp_energy_grad_triton", mutates_args=())
def mlp_energy_grad_triton(ctx: Tensor, y: Tensor, w_in: Tensor, weights: List[Tensor], biases: List[Tensor],
                           w_out: Tensor, b_out: Tensor, activation: str, residual: bool) -> Tuple[Tensor, Tensor]:
    """(E [B, K], dE/dy [B, K, D]) in one Triton launch."""
    _check_triton(ctx, y, w_in, weights, biases, w_out, b_out, activation)
    return _kernels().mlp_energy_grad(ctx, y, w_in, weights, biases, w_out, b_out, activation, residual)


@torch.library.custom_op("pyebm::mlp_energy_triton", mutates_args=())
def mlp_energy_triton(ctx: Tensor, y: Tensor, w_in: Tensor, weights: List[Tensor], biases: List[Tensor],
                      w_out: Tensor, b_out: Tensor, activation: str, residual: bool) -> Tensor:
    """E [B, K] in one Triton launch (forward only)."""
    _check_triton(ctx, y, w_in, weights, biases, w_out, b_out, activation)
    return _kernels().mlp_energy(ctx, y, w_in, weights, biases, w_out, b_out, activation, residual)


@mlp_energy_grad_triton.register_fake
def _(ctx, y, w_in, weights, biases, w_out, b_out, activation, residual):
    B, K, D = y.shape
    return y.new_empty(B, K), y.new_empty(B, K, D)


@mlp_energy_triton.register_fake
def _(ctx, y, w_in, weights, biases, w_out, b_out, activation, residual):
    B, K, _ = y.shape
    return y.new_empty(B, K)
