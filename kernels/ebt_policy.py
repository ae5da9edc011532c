"""Triton kernels for the EBT-Policy energy network's forward pass and input gradient.

Self-attention over the action tokens of one candidate (T = horizon, 16 in the original), one program
per (candidate, head), bidirectional, with the per-head RMSNorm of q and k fused in front::

    q, k, v = split(qkv)                      qkv [N, T, 3D] (the qkv Linear's output), D = H * hd
    qs = rms(q) * w_q * hd^-0.5               rms(x) = x * rsqrt(mean(x^2) + eps) over hd
    kn = rms(k) * w_k
    o  = softmax(qs kn^T) v                   o [N, T, D] (heads side by side, ready for the proj)

The whole [T, T] score tile lives in registers: the forward stores only o, and the backward recomputes
the tile from qkv (cheaper than reading saved probabilities for T = 16) and writes dq, dk, dv straight
into dqkv [N, T, 3D], the layout the qkv Linear's input gradient reads.

Row-wise RMSNorm (x [M, C] -> x * rstd * w, rstd saved in fp32) and the GELU-tanh elementwise pair
complete the pieces. Cross-attention to the cached observation keys/values reuses
``ebt_attention`` (its no-self-key mode with a visible prefix per row is exactly the temporal memory
mask).

Numerics: norms, softmax and accumulators are fp32. fp32 inputs use IEEE fp32 dot products (no TF32);
bf16/fp16 inputs feed the dot products in their own dtype with fp32 accumulation (emulated under the
interpreter, see ``ebt_attention``). The launchers never call torch.cuda, so with TRITON_INTERPRET=1
(read when this module is imported) they run on CPU tensors.
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from .ebt_attention import INTERPRETED, _dot, _round
from .mlp_energy import _act

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_GELU_TANH = 3  # mlp_energy's activation code


@triton.jit
def _qk_tiles(QKV, WQ, WK, base, s_t, s_c, h, T, HD, D, eps, scale,
              BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """Loads one (candidate, head): (q, k, v, qh, rq, kh, rk, qs, kn, wq, wk) as fp32 tiles."""
    t = tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    dm = d < HD
    m2 = (t < T)[:, None] & dm[None, :]
    off = t[:, None].to(tl.int64) * s_t + (h * HD + d[None, :]).to(tl.int64) * s_c
    q = tl.load(QKV + base + off, mask=m2, other=0.0).to(tl.float32)
    k = tl.load(QKV + base + off + D * s_c, mask=m2, other=0.0).to(tl.float32)
    v = tl.load(QKV + base + off + 2 * D * s_c, mask=m2, other=0.0).to(tl.float32)
    wq = tl.load(WQ + d, mask=dm, other=0.0).to(tl.float32)
    wk = tl.load(WK + d, mask=dm, other=0.0).to(tl.float32)
    # Padded rows are all-zero: rsqrt(eps) times 0 stays 0, so they never produce NaN.
    rq = tl.rsqrt(tl.sum(q * q, axis=1) / HD + eps)
    rk = tl.rsqrt(tl.sum(k * k, axis=1) / HD + eps)
    qh = q * rq[:, None]
    kh = k * rk[:, None]
    qs = qh * (wq * scale)[None, :]
    kn = kh * wk[None, :]
    return v, qh, rq, kh, rk, qs, kn, wq, wk


@triton.jit
def _probs(qs, kn, T, dtype: tl.constexpr, EMULATE_BF16: tl.constexpr, BLOCK_T: tl.constexpr):
    s = _dot(qs, tl.trans(kn), dtype, EMULATE_BF16)
    s = tl.where((tl.arange(0, BLOCK_T) < T)[None, :], s, float("-inf"))
    p = tl.exp(s - tl.max(s, axis=1)[:, None])
    return p / tl.sum(p, axis=1)[:, None]


@triton.jit
def _self_attn_fwd_kernel(
    QKV, WQ, WK, O,
    s_n, s_t, s_c, so_n, so_t, so_c,
    H, T, HD, D, eps, scale,
    EMULATE_BF16: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    dtype: tl.constexpr = QKV.dtype.element_ty
    pid = tl.program_id(0)
    n = (pid // H).to(tl.int64)
    h = pid % H
    v, qh, rq, kh, rk, qs, kn, wq, wk = _qk_tiles(QKV, WQ, WK, n * s_n, s_t, s_c, h, T, HD, D, eps, scale,
                                                  BLOCK_T, BLOCK_D)
    p = _probs(qs, kn, T, dtype, EMULATE_BF16, BLOCK_T)
    o = _dot(p, v, dtype, EMULATE_BF16)
    t = tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    m2 = (t < T)[:, None] & (d < HD)[None, :]
    off = n * so_n + t[:, None].to(tl.int64) * so_t + (h * HD + d[None, :]).to(tl.int64) * so_c
    tl.store(O + off, _round(o, dtype, EMULATE_BF16), mask=m2)


@triton.jit
def _self_attn_bwd_kernel(
    QKV, WQ, WK, DO, DQKV,
    s_n, s_t, s_c, sdo_n, sdo_t, sdo_c,
    H, T, HD, D, eps, scale,
    EMULATE_BF16: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    dtype: tl.constexpr = QKV.dtype.element_ty
    pid = tl.program_id(0)
    n = (pid // H).to(tl.int64)
    h = pid % H
    v, qh, rq, kh, rk, qs, kn, wq, wk = _qk_tiles(QKV, WQ, WK, n * s_n, s_t, s_c, h, T, HD, D, eps, scale,
                                                  BLOCK_T, BLOCK_D)
    p = _probs(qs, kn, T, dtype, EMULATE_BF16, BLOCK_T)
    t = tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    m2 = (t < T)[:, None] & (d < HD)[None, :]
    # Padded query rows have do = 0, so their (non-zero) probabilities contribute nothing below.
    do = tl.load(DO + n * sdo_n + t[:, None].to(tl.int64) * sdo_t + (h * HD + d[None, :]).to(tl.int64) * sdo_c,
                 mask=m2, other=0.0).to(tl.float32)
    dv = _dot(tl.trans(p), do, dtype, EMULATE_BF16)
    dp = _dot(do, tl.trans(v), dtype, EMULATE_BF16)
    ds = p * (dp - tl.sum(dp * p, axis=1)[:, None])
    gq = _dot(ds, kn, dtype, EMULATE_BF16) * (wq * scale)[None, :]
    gk = _dot(tl.trans(ds), qs, dtype, EMULATE_BF16) * wk[None, :]
    # RMSNorm backward: d/dx of x * r is r * (g - xhat * mean(g * xhat)).
    dq = rq[:, None] * (gq - qh * (tl.sum(gq * qh, axis=1) / HD)[:, None])
    dk = rk[:, None] * (gk - kh * (tl.sum(gk * kh, axis=1) / HD)[:, None])
    # dqkv is written contiguous [N, T, 3D].
    off = n * T * 3 * D + t[:, None].to(tl.int64) * (3 * D) + (h * HD + d[None, :])
    tl.store(DQKV + off, _round(dq, dtype, EMULATE_BF16), mask=m2)
    tl.store(DQKV + off + D, _round(dk, dtype, EMULATE_BF16), mask=m2)
    tl.store(DQKV + off + 2 * D, _round(dv, dtype, EMULATE_BF16), mask=m2)


@triton.jit
def _rms_norm_fwd_kernel(X, W, Y, RSTD, M, C, s_m, s_c, eps,
                         EMULATE_BF16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    dtype: tl.constexpr = X.dtype.element_ty
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_C)
    rm = rows < M
    cm = cols < C
    m2 = rm[:, None] & cm[None, :]
    x = tl.load(X + rows[:, None] * s_m + cols[None, :] * s_c, mask=m2, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=cm, other=0.0).to(tl.float32)
    r = tl.rsqrt(tl.sum(x * x, axis=1) / C + eps)
    y = x * r[:, None] * w[None, :]
    tl.store(Y + rows[:, None] * C + cols[None, :], _round(y, dtype, EMULATE_BF16), mask=m2)
    tl.store(RSTD + rows, r, mask=rm)


@triton.jit
def _rms_norm_bwd_kernel(DY, X, W, RSTD, DX, M, C, s_m, s_c, sdy_m, sdy_c,
                         EMULATE_BF16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    dtype: tl.constexpr = X.dtype.element_ty
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_C)
    rm = rows < M
    cm = cols < C
    m2 = rm[:, None] & cm[None, :]
    x = tl.load(X + rows[:, None] * s_m + cols[None, :] * s_c, mask=m2, other=0.0).to(tl.float32)
    dy = tl.load(DY + rows[:, None] * sdy_m + cols[None, :] * sdy_c, mask=m2, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=cm, other=0.0).to(tl.float32)
    r = tl.load(RSTD + rows, mask=rm, other=0.0)
    xh = x * r[:, None]
    g = dy * w[None, :]
    dx = r[:, None] * (g - xh * (tl.sum(g * xh, axis=1) / C)[:, None])
    tl.store(DX + rows[:, None] * C + cols[None, :], _round(dx, dtype, EMULATE_BF16), mask=m2)


@triton.jit
def _gelu_tanh_kernel(X, DY, OUT, numel, BACKWARD: tl.constexpr, EMULATE_BF16: tl.constexpr,
                      BLOCK: tl.constexpr):
    dtype: tl.constexpr = X.dtype.element_ty
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < numel
    x = tl.load(X + offs, mask=m, other=0.0).to(tl.float32)
    a, da = _act(x, _GELU_TANH)
    if BACKWARD:
        dy = tl.load(DY + offs, mask=m, other=0.0).to(tl.float32)
        out = dy * da
    else:
        out = a
    tl.store(OUT + offs, _round(out, dtype, EMULATE_BF16), mask=m)


# ------------------------------------------------------------------------------------------------
# launchers (argument checks with named errors live in pyebm.ops.ebt_policy_triton)
# ------------------------------------------------------------------------------------------------

def _emulate(t: torch.Tensor) -> bool:
    return INTERPRETED and t.dtype == torch.bfloat16


def _check_device(t: torch.Tensor) -> None:
    if t.device.type == "cpu" and not INTERPRETED:
        raise RuntimeError("pyebm triton: CPU tensors need TRITON_INTERPRET=1 set before pyebm._kernels is imported")


def _attn_blocks(T: int, hd: int) -> Tuple[int, int]:
    # tl.dot needs every tile side >= 16
    return max(16, triton.next_power_of_2(T)), max(16, triton.next_power_of_2(hd))


def self_attention_fwd(qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, heads: int,
                       eps: float) -> torch.Tensor:
    """o [N, T, D] for qkv [N, T, 3D] (any strides), q_weight / k_weight [D / heads]."""
    _check_device(qkv)
    N, T, C = qkv.shape
    D = C // 3
    hd = D // heads
    o = torch.empty((N, T, D), dtype=qkv.dtype, device=qkv.device)
    if N * T == 0:
        return o
    bt, bd = _attn_blocks(T, hd)
    _self_attn_fwd_kernel[(N * heads,)](
        qkv, q_weight, k_weight, o, *qkv.stride(), *o.stride(), heads, T, hd, D, float(eps), hd ** -0.5,
        EMULATE_BF16=_emulate(qkv), BLOCK_T=bt, BLOCK_D=bd)
    return o


def self_attention_bwd(grad_out: torch.Tensor, qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                       heads: int, eps: float) -> torch.Tensor:
    """dqkv [N, T, 3D] (contiguous) from grad_out = dLoss/do [N, T, D]; recomputes the forward tile."""
    _check_device(qkv)
    N, T, C = qkv.shape
    D = C // 3
    hd = D // heads
    dqkv = torch.empty((N, T, C), dtype=qkv.dtype, device=qkv.device)
    if N * T == 0:
        return dqkv
    bt, bd = _attn_blocks(T, hd)
    _self_attn_bwd_kernel[(N * heads,)](
        qkv, q_weight, k_weight, grad_out, dqkv, *qkv.stride(), *grad_out.stride(), heads, T, hd, D,
        float(eps), hd ** -0.5, EMULATE_BF16=_emulate(qkv), BLOCK_T=bt, BLOCK_D=bd)
    return dqkv


def _rows(x: torch.Tensor) -> torch.Tensor:
    # reshape() copies only when the leading dims cannot be merged; the kernels take row/column strides.
    return x.reshape(-1, x.shape[-1])


def _norm_blocks(C: int) -> Tuple[int, int]:
    bc = triton.next_power_of_2(C)
    return max(1, min(64, 4096 // bc)), bc


def rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(y = x * rstd * weight, rstd fp32 [...]) over x's last dim; y contiguous in x's dtype."""
    _check_device(x)
    x2 = _rows(x)
    M, C = x2.shape
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    r = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    if M * C == 0:
        return y, r
    bm, bc = _norm_blocks(C)
    _rms_norm_fwd_kernel[(triton.cdiv(M, bm),)](x2, weight, y, r, M, C, *x2.stride(), float(eps),
                                                EMULATE_BF16=_emulate(x), BLOCK_M=bm, BLOCK_C=bc)
    return y, r


def rms_norm_bwd(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    """dx (contiguous, x's dtype) of y = x * rstd * weight given dLoss/dy and the forward's rstd."""
    _check_device(x)
    x2 = _rows(x)
    g2 = _rows(grad_out)
    M, C = x2.shape
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if M * C == 0:
        return dx
    bm, bc = _norm_blocks(C)
    _rms_norm_bwd_kernel[(triton.cdiv(M, bm),)](g2, x2, weight, rstd.contiguous(), dx, M, C, *x2.stride(),
                                                *g2.stride(), EMULATE_BF16=_emulate(x), BLOCK_M=bm, BLOCK_C=bc)
    return dx


def gelu_tanh(x: torch.Tensor, grad_out=None) -> torch.Tensor:
    """gelu_tanh(x), or grad_out * gelu_tanh'(x) when grad_out is given; contiguous, x's dtype."""
    _check_device(x)
    xc = x.contiguous()
    gc = xc if grad_out is None else grad_out.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    n = xc.numel()
    if n == 0:
        return out
    block = 1024
    _gelu_tanh_kernel[(triton.cdiv(n, block),)](xc, gc, out, n, BACKWARD=grad_out is not None,
                                               EMULATE_BF16=_emulate(x), BLOCK=block)
    return out
