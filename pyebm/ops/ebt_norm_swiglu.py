"""RMSNorm and SwiGLU-gate forward and input-gradient ops (kernels: ``pyebm._kernels.ebt_norm_swiglu``).

``torch.ops.pyebm.ebt_rms_norm_fwd(x, weight, eps) -> y``
    y = x / sqrt(mean(x^2, -1) + eps) * weight; x [..., D], weight [D] or None; y like x (contiguous).
``torch.ops.pyebm.ebt_rms_norm_bwd(dy, x, weight, eps) -> dx``
    dx of the above given dy (same shape as x); r is recomputed from x. No weight gradient.
``torch.ops.pyebm.ebt_swiglu_fwd(a, b) -> y``
    y = silu(a) * b for a, b [..., F] (a = W_1 x, b = W_3 x; any strides, e.g. the halves of W_1|W_3 x).
``torch.ops.pyebm.ebt_swiglu_bwd(dy, a, b) -> (da, db)``
    da = dy * b * silu'(a), db = dy * silu(a).

The math is ``pyebm.reference.ebt.rms_norm`` and ``F.silu(a) * b``. dtypes float32, bfloat16, float16
(all arithmetic in fp32, one rounding at the store); results in x's / a's dtype. CUDA tensors, or CPU
tensors when TRITON_INTERPRET=1 was set before the kernels were imported.

The two forward ops carry an autograd formula built from the backward ops (input gradients: x for
RMSNorm, a and b for SwiGLU; asking for the RMSNorm weight's gradient raises). The backward ops have
none (no double backward: a backward through them raises). Arguments are checked in ``pyebm.ops._checks``
(the fakes in ``pyebm.ops._fake`` run the same checks). Triton is imported on the first call, so the ops exist (e.g. for tracing
with fake tensors) on machines without Triton.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from pyebm import _backend
from pyebm.ops import _checks


def _kernels():
    if _backend.triton is None:
        raise RuntimeError(f"pyebm: the triton backend is not usable: {_backend.backends().why['triton']}")
    from pyebm._kernels import ebt_norm_swiglu as kernels

    return kernels


def _cpu_rule(op: str, x: Tensor) -> None:
    if x.device.type == "cpu" and not _backend.triton_interpret():
        raise ValueError(f"{op}: the triton backend on CPU tensors needs TRITON_INTERPRET=1")


@torch.library.custom_op("pyebm::ebt_rms_norm_fwd", mutates_args=())
def ebt_rms_norm_fwd(x: Tensor, weight: Optional[Tensor], eps: float) -> Tensor:
    """RMSNorm of x [..., D] over its last axis, times weight [D] (or not, when None)."""
    _checks.rms_norm_args("pyebm::ebt_rms_norm_fwd", x, weight, eps)
    _cpu_rule("pyebm::ebt_rms_norm_fwd", x)
    return _kernels().rms_norm_fwd(x, weight, eps)


@torch.library.custom_op("pyebm::ebt_rms_norm_bwd", mutates_args=())
def ebt_rms_norm_bwd(dy: Tensor, x: Tensor, weight: Optional[Tensor], eps: float) -> Tensor:
    """dx [..., D] of ebt_rms_norm_fwd(x, weight, eps) given dy."""
    _checks.rms_norm_args("pyebm::ebt_rms_norm_bwd", x, weight, eps)
    _checks.same("pyebm::ebt_rms_norm_bwd", "dy", dy, x, "x", x.shape)
    _cpu_rule("pyebm::ebt_rms_norm_bwd", x)
    return _kernels().rms_norm_bwd(dy, x, weight, eps)


@torch.library.custom_op("pyebm::ebt_swiglu_fwd", mutates_args=())
def ebt_swiglu_fwd(a: Tensor, b: Tensor) -> Tensor:
    """silu(a) * b, elementwise, for a, b [..., F]."""
    _checks.swiglu_args("pyebm::ebt_swiglu_fwd", a, b)
    _cpu_rule("pyebm::ebt_swiglu_fwd", a)
    return _kernels().swiglu_fwd(a, b)


@torch.library.custom_op("pyebm::ebt_swiglu_bwd", mutates_args=())
def ebt_swiglu_bwd(dy: Tensor, a: Tensor, b: Tensor) -> Tuple[Tensor, Tensor]:
    """(da, db) [..., F] of silu(a) * b given dy."""
    _checks.swiglu_args("pyebm::ebt_swiglu_bwd", a, b)
    _checks.same("pyebm::ebt_swiglu_bwd", "dy", dy, a, "a", a.shape)
    _cpu_rule("pyebm::ebt_swiglu_bwd", a)
    return _kernels().swiglu_bwd(dy, a, b)


# -- autograd of the forward ops (input gradients) -------------------------------------------------

def _rms_setup(ctx, inputs, output):
    x, weight, eps = inputs
    ctx.save_for_backward(x, weight)
    ctx.eps = eps


def _rms_backward(ctx, dy):
    x, weight = ctx.saved_tensors
    if ctx.needs_input_grad[1]:
        raise NotImplementedError("pyebm::ebt_rms_norm_fwd computes input gradients only; "
                                  "weight requires grad (detach it, or use pyebm.reference.ebt.rms_norm)")
    dx = torch.ops.pyebm.ebt_rms_norm_bwd(dy, x, weight, ctx.eps) if ctx.needs_input_grad[0] else None
    return dx, None, None


def _swiglu_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _swiglu_backward(ctx, dy):
    a, b = ctx.saved_tensors
    da, db = torch.ops.pyebm.ebt_swiglu_bwd(dy, a, b)
    return da, db


ebt_rms_norm_fwd.register_autograd(_rms_backward, setup_context=_rms_setup)
ebt_swiglu_fwd.register_autograd(_swiglu_backward, setup_context=_swiglu_setup)


def rms_norm(x: Tensor, weight: Optional[Tensor] = None, eps: float = 1e-5) -> Tensor:
    """``torch.ops.pyebm.ebt_rms_norm_fwd`` (differentiable in x)."""
    return torch.ops.pyebm.ebt_rms_norm_fwd(x, weight, eps)


def rms_norm_bwd(dy: Tensor, x: Tensor, weight: Optional[Tensor] = None, eps: float = 1e-5) -> Tensor:
    """``torch.ops.pyebm.ebt_rms_norm_bwd``."""
    return torch.ops.pyebm.ebt_rms_norm_bwd(dy, x, weight, eps)


def swiglu(a: Tensor, b: Tensor) -> Tensor:
    """``torch.ops.pyebm.ebt_swiglu_fwd`` (differentiable in a and b)."""
    return torch.ops.pyebm.ebt_swiglu_fwd(a, b)


def swiglu_bwd(dy: Tensor, a: Tensor, b: Tensor) -> Tuple[Tensor, Tensor]:
    """``torch.ops.pyebm.ebt_swiglu_bwd``."""
    return torch.ops.pyebm.ebt_swiglu_bwd(dy, a, b)
