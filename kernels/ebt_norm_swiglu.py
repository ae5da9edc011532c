"""Triton kernels: RMSNorm and the SwiGLU gate, forward and input gradient (no weight gradients).

RMSNorm over the last axis of x [N, D] (weight w [D] optional)::

    r  = 1 / sqrt(mean(x^2) + eps)        (per row, fp32)
    y  = x * r * w
    dx = r * (g - xn * mean(xn * g))      with xn = x * r, g = dy * w

The backward recomputes r from the saved input (one extra row reduction, no saved statistics).

SwiGLU gate of a, b [N, F] (a = W_1 x, b = W_3 x)::

    y  = silu(a) * b                      silu(a) = a * sigmoid(a)
    da = dy * b * sigmoid(a) * (1 + a * (1 - sigmoid(a)))
    db = dy * silu(a)

Numerics: inputs are loaded in their dtype (fp32, bf16, fp16) and every operation runs in fp32; results
are rounded to the input's dtype once, at the store. sqrt and division are the IEEE-rounded ones
(sqrt_rn, div_rn), not the fast approximations, so fp32 results sit within a few ulp of torch's.
The launchers accept any row stride (slices of a wider buffer, e.g. the two halves of a fused W_1|W_3
product) and never call torch.cuda, so with TRITON_INTERPRET=1 (read when this module is imported)
they run on CPU tensors.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .ebt_attention import INTERPRETED, _round

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Rows * padded width of one program's tile: big enough to amortise a launch, small enough for registers.
_TILE = 4096


@triton.jit
def _rms_norm_fwd_kernel(X, W, Y, sx_r, sx_d, sy_r, N, D, eps,
                         HAS_W: tl.constexpr, EMULATE_BF16: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    dtype: tl.constexpr = Y.dtype.element_ty
    # int64 rows: N * D overflows int32 for large batches of wide rows.
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < N
    cmask = cols < D
    mask = rmask[:, None] & cmask[None, :]
    x = tl.load(X + rows[:, None] * sx_r + cols[None, :] * sx_d, mask=mask, other=0.0).to(tl.float32)
    ms = tl.sum(x * x, axis=1) / D
    r = tl.div_rn(1.0, tl.sqrt_rn(ms + eps))
    y = x * r[:, None]
    if HAS_W:
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
        y = y * w[None, :]
    tl.store(Y + rows[:, None] * sy_r + cols[None, :], _round(y, dtype, EMULATE_BF16), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(DY, X, W, DX, sdy_r, sdy_d, sx_r, sx_d, sdx_r, N, D, eps,
                         HAS_W: tl.constexpr, EMULATE_BF16: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    dtype: tl.constexpr = DX.dtype.element_ty
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < N
    cmask = cols < D
    mask = rmask[:, None] & cmask[None, :]
    x = tl.load(X + rows[:, None] * sx_r + cols[None, :] * sx_d, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(DY + rows[:, None] * sdy_r + cols[None, :] * sdy_d, mask=mask, other=0.0).to(tl.float32)
    if HAS_W:
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
        g = g * w[None, :]
    ms = tl.sum(x * x, axis=1) / D
    r = tl.div_rn(1.0, tl.sqrt_rn(ms + eps))
    xn = x * r[:, None]
    # Padded columns hold x = g = 0, so they add nothing to the row mean.
    c = tl.sum(xn * g, axis=1) / D
    dx = r[:, None] * (g - xn * c[:, None])
    tl.store(DX + rows[:, None] * sdx_r + cols[None, :], _round(dx, dtype, EMULATE_BF16), mask=mask)


@triton.jit
def _swiglu_fwd_kernel(A, B, Y, sa_r, sa_f, sb_r, sb_f, sy_r, N, F,
                       EMULATE_BF16: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr):
    dtype: tl.constexpr = Y.dtype.element_ty
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = (rows < N)[:, None] & (cols < F)[None, :]
    a = tl.load(A + rows[:, None] * sa_r + cols[None, :] * sa_f, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + rows[:, None] * sb_r + cols[None, :] * sb_f, mask=mask, other=0.0).to(tl.float32)
    y = a * tl.sigmoid(a) * b
    tl.store(Y + rows[:, None] * sy_r + cols[None, :], _round(y, dtype, EMULATE_BF16), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(DY, A, B, DA, DB, sdy_r, sdy_f, sa_r, sa_f, sb_r, sb_f, so_r, N, F,
                       EMULATE_BF16: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr):
    dtype: tl.constexpr = DA.dtype.element_ty
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = (rows < N)[:, None] & (cols < F)[None, :]
    dy = tl.load(DY + rows[:, None] * sdy_r + cols[None, :] * sdy_f, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(A + rows[:, None] * sa_r + cols[None, :] * sa_f, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + rows[:, None] * sb_r + cols[None, :] * sb_f, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(a)
    da = dy * b * (s * (1.0 + a * (1.0 - s)))
    db = dy * (a * s)
    off = rows[:, None] * so_r + cols[None, :]
    tl.store(DA + off, _round(da, dtype, EMULATE_BF16), mask=mask)
    tl.store(DB + off, _round(db, dtype, EMULATE_BF16), mask=mask)


# ------------------------------------------------------------------------------------------------
# launchers
# ------------------------------------------------------------------------------------------------

def _check_device(name: str, t: torch.Tensor) -> None:
    if t.device.type == "cpu" and not INTERPRETED:
        raise RuntimeError(f"pyebm triton: {name} is a CPU tensor; CPU tensors need TRITON_INTERPRET=1 set "
                           "before pyebm._kernels is imported")


def _check_like(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor; got {type(t).__name__}")
    if tuple(t.shape) != tuple(ref.shape) or t.dtype != ref.dtype or t.device != ref.device:
        raise ValueError(f"{name} must match {ref_name} ({ref.dtype} of shape {tuple(ref.shape)} on {ref.device}); "
                         f"got {t.dtype} of shape {tuple(t.shape)} on {t.device}")


def _check_input(name: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a tensor; got {type(x).__name__}")
    if x.dim() < 1:
        raise ValueError(f"{name} must have at least one dimension; got a scalar")
    if x.dtype not in DTYPES:
        raise ValueError(f"{name}: dtype must be one of {DTYPES}; got {x.dtype}")
    _check_device(name, x)


def _rows2d(x: torch.Tensor) -> torch.Tensor:
    """x [..., D] as [N, D] (a view whenever the leading axes can be merged)."""
    return x.reshape(-1, x.shape[-1])


def _check_weight(weight: Optional[torch.Tensor], x: torch.Tensor) -> None:
    if weight is None:
        return
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a tensor or None; got {type(weight).__name__}")
    D = x.shape[-1]
    if weight.dim() != 1 or weight.shape[0] != D:
        raise ValueError(f"weight must be [D={D}]; got shape {tuple(weight.shape)}")
    if weight.device != x.device or weight.dtype not in DTYPES:
        raise ValueError(f"weight must be float32/bfloat16/float16 on {x.device}; got {weight.dtype} "
                         f"on {weight.device}")


def _norm_blocks(D: int) -> Tuple[int, int]:
    block_d = triton.next_power_of_2(max(D, 1))
    return max(1, min(64, _TILE // block_d)), block_d


def _check_eps(eps: float) -> float:
    eps = float(eps)
    if not eps >= 0:
        raise ValueError(f"eps must be a number >= 0; got {eps!r}")
    return eps


def rms_norm_fwd(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    """y = x / sqrt(mean(x^2, -1) + eps) * weight, same shape and dtype as x [..., D]; weight [D] or None."""
    _check_input("x", x)
    _check_weight(weight, x)
    eps = _check_eps(eps)
    D = x.shape[-1]
    x2 = _rows2d(x)
    N = x2.shape[0]
    y = torch.empty((N, D), dtype=x.dtype, device=x.device)
    if N * D == 0:
        return y.view(x.shape)
    block_r, block_d = _norm_blocks(D)
    w = weight.contiguous() if weight is not None else x2
    _rms_norm_fwd_kernel[(triton.cdiv(N, block_r),)](
        x2, w, y, x2.stride(0), x2.stride(1), y.stride(0), N, D, eps,
        HAS_W=weight is not None, EMULATE_BF16=INTERPRETED and x.dtype == torch.bfloat16,
        BLOCK_R=block_r, BLOCK_D=block_d)
    return y.view(x.shape)


def rms_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    """dx [..., D] (x's dtype) of y = rms_norm_fwd(x, weight, eps) given dy = dLoss/dy."""
    _check_input("x", x)
    _check_like("dy", dy, "x", x)
    _check_weight(weight, x)
    eps = _check_eps(eps)
    D = x.shape[-1]
    x2, dy2 = _rows2d(x), _rows2d(dy)
    N = x2.shape[0]
    dx = torch.empty((N, D), dtype=x.dtype, device=x.device)
    if N * D == 0:
        return dx.view(x.shape)
    block_r, block_d = _norm_blocks(D)
    w = weight.contiguous() if weight is not None else x2
    _rms_norm_bwd_kernel[(triton.cdiv(N, block_r),)](
        dy2, x2, w, dx, dy2.stride(0), dy2.stride(1), x2.stride(0), x2.stride(1), dx.stride(0), N, D, eps,
        HAS_W=weight is not None, EMULATE_BF16=INTERPRETED and x.dtype == torch.bfloat16,
        BLOCK_R=block_r, BLOCK_D=block_d)
    return dx.view(x.shape)


def _gate_blocks(N: int, F: int) -> Tuple[int, int]:
    block_f = min(1024, triton.next_power_of_2(max(F, 1)))
    block_r = max(1, min(triton.next_power_of_2(max(N, 1)), _TILE // block_f))
    return block_r, block_f


def swiglu_fwd(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """silu(a) * b for a, b [..., F] of one shape and dtype; the result is contiguous, in a's dtype."""
    _check_input("a", a)
    _check_like("b", b, "a", a)
    F = a.shape[-1]
    a2, b2 = _rows2d(a), _rows2d(b)
    N = a2.shape[0]
    y = torch.empty((N, F), dtype=a.dtype, device=a.device)
    if N * F == 0:
        return y.view(a.shape)
    block_r, block_f = _gate_blocks(N, F)
    _swiglu_fwd_kernel[(triton.cdiv(N, block_r), triton.cdiv(F, block_f))](
        a2, b2, y, a2.stride(0), a2.stride(1), b2.stride(0), b2.stride(1), y.stride(0), N, F,
        EMULATE_BF16=INTERPRETED and a.dtype == torch.bfloat16, BLOCK_R=block_r, BLOCK_F=block_f)
    return y.view(a.shape)


def swiglu_bwd(dy: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(da, db) [..., F] of y = silu(a) * b given dy = dLoss/dy (contiguous, in a's dtype)."""
    _check_input("a", a)
    _check_like("b", b, "a", a)
    _check_like("dy", dy, "a", a)
    F = a.shape[-1]
    a2, b2, dy2 = _rows2d(a), _rows2d(b), _rows2d(dy)
    N = a2.shape[0]
    da = torch.empty((N, F), dtype=a.dtype, device=a.device)
    db = torch.empty_like(da)
    if N * F == 0:
        return da.view(a.shape), db.view(a.shape)
    block_r, block_f = _gate_blocks(N, F)
    _swiglu_bwd_kernel[(triton.cdiv(N, block_r), triton.cdiv(F, block_f))](
        dy2, a2, b2, da, db, dy2.stride(0), dy2.stride(1), a2.stride(0), a2.stride(1), b2.stride(0), b2.stride(1),
        da.stride(0), N, F,
        EMULATE_BF16=INTERPRETED and a.dtype == torch.bfloat16, BLOCK_R=block_r, BLOCK_F=block_f)
    return da.view(a.shape), db.view(a.shape)
