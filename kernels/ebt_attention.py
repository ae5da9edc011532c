"""Triton kernels: prediction-row attention against cached context keys/values plus a self key/value.

The EBT prediction stream: query row r of batch element b attends, in one softmax, to the first
``n_visible[r]`` entries of the cached context K/V of b and (optionally) to its own key/value::

    s_j   = q_r . K[b, j]          j < n_visible[r]      (q carries the 1/sqrt(head_dim) factor)
    s_*   = q_r . k_self_r                                (when a self key is given)
    a     = softmax(s_0 .. s_{n-1}, s_*)
    o_r   = sum_j a_j V[b, j] + a_* v_self_r

Rows are grouped by batch element: all rows of one (b, head) - for EBT the G samples of every
optimised position - sit in one program (up to BLOCK_R of them), so the cache is read once for all
of them. The score matrix is never materialised beyond one [BLOCK_R, BLOCK_T] tile: the forward is an
online softmax that also returns the log-sum-exp per row, and the backward recomputes the tiles from it.
The backward gives dq, dk_self and dv_self only: the cache does not depend on the candidates.

Without a self key/value the same kernels compute cross-attention of query tokens to cached tokens
with a per-row visible prefix (e.g. a policy's action tokens against cached observation tokens under a
temporal mask); a row that sees nothing gets o = 0.

Numerics: scores, softmax and accumulators are fp32. fp32 inputs use IEEE fp32 dot products (no TF32);
bf16/fp16 inputs feed the dot products in their own dtype with fp32 accumulation. The launchers never
call torch.cuda, so with TRITON_INTERPRET=1 (read when this module is imported) they run on CPU tensors.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .mlp_energy import _round_bf16, _to_out

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Whether the kernels below were defined in interpreter mode (triton.jit decides at definition time).
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


# Triton 3.9's interpreter multiplies bf16 tl.dot tiles as their raw uint16 storage and truncates
# fp32 -> bf16 casts. Under the interpreter the kernels therefore round operands to bf16 themselves and
# multiply in fp32: the numbers of a GPU bf16 MMA with fp32 accumulation (bf16 products are exact in fp32).
# _round(x, dtype, EMULATE_BF16): fp32 x rounded to dtype (nearest), the MLP kernels' output rounding.
_round = _to_out


@triton.jit
def _dot(a, b, dtype: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """a @ b for fp32 tiles: IEEE fp32 when dtype is fp32 (no TF32), else operands rounded to dtype
    (tensor-core inputs) with fp32 accumulation."""
    if dtype == tl.float32:
        return tl.dot(a, b, input_precision="ieee")
    elif EMULATE_BF16:
        return tl.dot(_round_bf16(a), _round_bf16(b), input_precision="ieee")
    else:
        return tl.dot(a.to(dtype), b.to(dtype))


@triton.jit
def _ebt_attention_fwd_kernel(
    Q, KS, VS, KC, VC, NVIS, O, LSE,
    sq_b, sq_h, sq_r, sq_d,
    sks_b, sks_h, sks_r, sks_d,
    svs_b, svs_h, svs_r, svs_d,
    skc_b, skc_h, skc_t, skc_d,
    svc_b, svc_h, svc_t, svc_d,
    snv_b, snv_r,
    so_b, so_h, so_r, so_d,
    sl_b, sl_h, sl_r,
    H, R, T, HD,
    HAS_SELF: tl.constexpr, HAS_VIS: tl.constexpr, EMULATE_BF16: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    dtype: tl.constexpr = Q.dtype.element_ty
    pid_r = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    # int64 offsets: B * H * T * head_dim overflows int32 for long caches and large batches.
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    dcol = tl.arange(0, BLOCK_D)
    rmask = rows < R
    dmask = dcol < HD
    rd_mask = rmask[:, None] & dmask[None, :]

    q = tl.load(Q + b64 * sq_b + h64 * sq_h + rows[:, None] * sq_r + dcol[None, :] * sq_d,
                mask=rd_mask, other=0.0).to(tl.float32)
    if HAS_VIS:
        nv = tl.load(NVIS + b64 * snv_b + rows * snv_r, mask=rmask, other=0)
        nv = tl.minimum(nv, T)
        t_end = tl.max(nv, axis=0)
    else:
        nv = tl.zeros([BLOCK_R], dtype=tl.int32) + T
        t_end = T

    if HAS_SELF:
        ks = tl.load(KS + b64 * sks_b + h64 * sks_h + rows[:, None] * sks_r + dcol[None, :] * sks_d,
                     mask=rd_mask, other=0.0).to(tl.float32)
        vs = tl.load(VS + b64 * svs_b + h64 * svs_h + rows[:, None] * svs_r + dcol[None, :] * svs_d,
                     mask=rd_mask, other=0.0).to(tl.float32)
        m = tl.sum(q * ks, axis=1)
        l = tl.zeros([BLOCK_R], dtype=tl.float32) + 1.0
        acc = vs
    else:
        m = tl.zeros([BLOCK_R], dtype=tl.float32) - float("inf")
        l = tl.zeros([BLOCK_R], dtype=tl.float32)
        acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)

    kbase = KC + b64 * skc_b + h64 * skc_h
    vbase = VC + b64 * svc_b + h64 * svc_h
    for t0 in range(0, t_end, BLOCK_T):
        tcol = t0 + tl.arange(0, BLOCK_T)
        td_mask = (tcol < T)[:, None] & dmask[None, :]
        k = tl.load(kbase + tcol[:, None].to(tl.int64) * skc_t + dcol[None, :] * skc_d, mask=td_mask,
                    other=0.0).to(tl.float32)
        v = tl.load(vbase + tcol[:, None].to(tl.int64) * svc_t + dcol[None, :] * svc_d, mask=td_mask,
                    other=0.0).to(tl.float32)
        s = _dot(q, tl.trans(k), dtype, EMULATE_BF16)
        s = tl.where(tcol[None, :] < nv[:, None], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        # Rows that have seen nothing yet keep m = -inf; shift by 0 there so exp() gives 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        corr = tl.exp(m - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l = l * corr + tl.sum(p, axis=1)
        acc = acc * corr[:, None] + _dot(p, v, dtype, EMULATE_BF16)
        m = m_new

    seen = l > 0.0
    o = tl.where(seen[:, None], acc / tl.where(seen, l, 1.0)[:, None], 0.0)
    lse = tl.where(seen, m + tl.log(tl.where(seen, l, 1.0)), float("-inf"))
    tl.store(O + b64 * so_b + h64 * so_h + rows[:, None] * so_r + dcol[None, :] * so_d,
             _round(o, dtype, EMULATE_BF16), mask=rd_mask)
    tl.store(LSE + b64 * sl_b + h64 * sl_h + rows * sl_r, lse, mask=rmask)


@triton.jit
def _ebt_attention_bwd_kernel(
    Q, KS, VS, KC, VC, NVIS, O, LSE, DO, DQ, DKS, DVS,
    sq_b, sq_h, sq_r, sq_d,
    sks_b, sks_h, sks_r, sks_d,
    svs_b, svs_h, svs_r, svs_d,
    skc_b, skc_h, skc_t, skc_d,
    svc_b, svc_h, svc_t, svc_d,
    snv_b, snv_r,
    so_b, so_h, so_r, so_d,
    sl_b, sl_h, sl_r,
    sdo_b, sdo_h, sdo_r, sdo_d,
    H, R, T, HD,
    HAS_SELF: tl.constexpr, HAS_VIS: tl.constexpr, EMULATE_BF16: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    dtype: tl.constexpr = Q.dtype.element_ty
    # dq, dk_self, dv_self are written contiguous [B, H, R, hd] (strides from the launcher's layout).
    pid_r = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    dcol = tl.arange(0, BLOCK_D)
    rmask = rows < R
    dmask = dcol < HD
    rd_mask = rmask[:, None] & dmask[None, :]

    q = tl.load(Q + b64 * sq_b + h64 * sq_h + rows[:, None] * sq_r + dcol[None, :] * sq_d,
                mask=rd_mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b64 * sdo_b + h64 * sdo_h + rows[:, None] * sdo_r + dcol[None, :] * sdo_d,
                 mask=rd_mask, other=0.0).to(tl.float32)
    o = tl.load(O + b64 * so_b + h64 * so_h + rows[:, None] * so_r + dcol[None, :] * so_d,
                mask=rd_mask, other=0.0).to(tl.float32)
    lse = tl.load(LSE + b64 * sl_b + h64 * sl_h + rows * sl_r, mask=rmask, other=0.0)
    # Rows that saw nothing have lse = -inf and zero output; shift by 0 so every a_j is exp(-inf) = 0.
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    # sum_j a_j dA_j over every attended entry (self included) equals do . o.
    delta = tl.sum(do * o, axis=1)
    if HAS_VIS:
        nv = tl.load(NVIS + b64 * snv_b + rows * snv_r, mask=rmask, other=0)
        nv = tl.minimum(nv, T)
        t_end = tl.max(nv, axis=0)
    else:
        nv = tl.zeros([BLOCK_R], dtype=tl.int32) + T
        t_end = T

    dq = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    kbase = KC + b64 * skc_b + h64 * skc_h
    vbase = VC + b64 * svc_b + h64 * svc_h
    for t0 in range(0, t_end, BLOCK_T):
        tcol = t0 + tl.arange(0, BLOCK_T)
        td_mask = (tcol < T)[:, None] & dmask[None, :]
        k = tl.load(kbase + tcol[:, None].to(tl.int64) * skc_t + dcol[None, :] * skc_d, mask=td_mask,
                    other=0.0).to(tl.float32)
        v = tl.load(vbase + tcol[:, None].to(tl.int64) * svc_t + dcol[None, :] * svc_d, mask=td_mask,
                    other=0.0).to(tl.float32)
        s = _dot(q, tl.trans(k), dtype, EMULATE_BF16)
        da = _dot(do, tl.trans(v), dtype, EMULATE_BF16)
        vis = tcol[None, :] < nv[:, None]
        a = tl.where(vis, tl.exp(s - lse[:, None]), 0.0)
        ds = a * (da - delta[:, None])
        dq += _dot(ds, k, dtype, EMULATE_BF16)

    so = rows[:, None] * HD + dcol[None, :]
    out_off = (b64 * H + h64) * R * HD
    if HAS_SELF:
        ks = tl.load(KS + b64 * sks_b + h64 * sks_h + rows[:, None] * sks_r + dcol[None, :] * sks_d,
                     mask=rd_mask, other=0.0).to(tl.float32)
        vs = tl.load(VS + b64 * svs_b + h64 * svs_h + rows[:, None] * svs_r + dcol[None, :] * svs_d,
                     mask=rd_mask, other=0.0).to(tl.float32)
        a_s = tl.exp(tl.sum(q * ks, axis=1) - lse)
        ds_s = a_s * (tl.sum(do * vs, axis=1) - delta)
        dq += ds_s[:, None] * ks
        tl.store(DKS + out_off + so, _round(ds_s[:, None] * q, dtype, EMULATE_BF16), mask=rd_mask)
        tl.store(DVS + out_off + so, _round(a_s[:, None] * do, dtype, EMULATE_BF16), mask=rd_mask)
    tl.store(DQ + out_off + so, _round(dq, dtype, EMULATE_BF16), mask=rd_mask)


# ------------------------------------------------------------------------------------------------
# launchers
# ------------------------------------------------------------------------------------------------

def _check(q: torch.Tensor, k_ctx: torch.Tensor, v_ctx: torch.Tensor, k_self, v_self, n_visible):
    if q.dim() != 4:
        raise ValueError(f"q must be [B, H, R, head_dim]; got shape {tuple(q.shape)}")
    if q.device.type == "cpu" and not INTERPRETED:
        raise RuntimeError("pyebm triton: CPU tensors need TRITON_INTERPRET=1 set before pyebm._kernels is imported")
    B, H, R, hd = q.shape
    if q.dtype not in DTYPES:
        raise ValueError(f"q: dtype must be one of {DTYPES}; got {q.dtype}")
    for name, t in (("k_ctx", k_ctx), ("v_ctx", v_ctx)):
        if t.dim() != 4 or t.shape[0] != B or t.shape[1] != H or t.shape[3] != hd:
            raise ValueError(f"{name} must be [B={B}, H={H}, T, head_dim={hd}]; got shape {tuple(t.shape)}")
    if k_ctx.shape[2] != v_ctx.shape[2]:
        raise ValueError(f"k_ctx and v_ctx must have the same length; got {k_ctx.shape[2]} and {v_ctx.shape[2]}")
    if (k_self is None) != (v_self is None):
        raise ValueError("k_self and v_self must be given together")
    for name, t in (("k_self", k_self), ("v_self", v_self)):
        if t is not None and tuple(t.shape) != (B, H, R, hd):
            raise ValueError(f"{name} must be [B={B}, H={H}, R={R}, head_dim={hd}]; got shape {tuple(t.shape)}")
    for name, t in (("k_ctx", k_ctx), ("v_ctx", v_ctx), ("k_self", k_self), ("v_self", v_self)):
        if t is not None and (t.dtype != q.dtype or t.device != q.device):
            raise ValueError(f"{name} is {t.dtype} on {t.device}; q is {q.dtype} on {q.device}")
    if n_visible is not None:
        if n_visible.dtype not in (torch.int32, torch.int64) or n_visible.dim() not in (1, 2) \
                or n_visible.shape[-1] != R or (n_visible.dim() == 2 and n_visible.shape[0] != B):
            raise ValueError(f"n_visible must be an integer tensor [R={R}] or [B={B}, R={R}]; got "
                             f"{n_visible.dtype} of shape {tuple(n_visible.shape)}")
        if n_visible.device != q.device:
            raise ValueError(f"n_visible is on {n_visible.device}; q is on {q.device}")
    return B, H, R, hd


def _blocks(R: int, T: int, hd: int):
    block_r = min(64, max(16, triton.next_power_of_2(R)))
    block_t = min(64, max(16, triton.next_power_of_2(max(T, 1))))
    block_d = max(16, triton.next_power_of_2(hd))
    return block_r, block_t, block_d


def _vis_args(n_visible, q):
    if n_visible is None:
        return q, 0, 0  # a dummy pointer, never read (HAS_VIS is off)
    nv = n_visible.to(torch.int32)
    return (nv, 0, nv.stride(0)) if nv.dim() == 1 else (nv, nv.stride(0), nv.stride(1))


def ebt_attention_fwd(q: torch.Tensor, k_ctx: torch.Tensor, v_ctx: torch.Tensor,
                      k_self: Optional[torch.Tensor] = None, v_self: Optional[torch.Tensor] = None,
                      n_visible: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """o [B, H, R, hd] (q's dtype) and lse [B, H, R] (fp32) of the attention described in the module doc.

    q, k_self, v_self [B, H, R, hd]; k_ctx, v_ctx [B, H, T, hd] (any strides: cache slices welcome);
    n_visible [R] or [B, R] integer, visible context entries per row (None: all T).
    """
    B, H, R, hd = _check(q, k_ctx, v_ctx, k_self, v_self, n_visible)
    T = k_ctx.shape[2]
    o = torch.empty((B, H, R, hd), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, R), dtype=torch.float32, device=q.device)
    if B * H * R == 0:
        return o, lse
    has_self = k_self is not None
    ks, vs = (k_self, v_self) if has_self else (q, q)
    nv, snv_b, snv_r = _vis_args(n_visible, q)
    block_r, block_t, block_d = _blocks(R, T, hd)
    grid = (triton.cdiv(R, block_r), B * H)
    _ebt_attention_fwd_kernel[grid](
        q, ks, vs, k_ctx, v_ctx, nv, o, lse,
        *q.stride(), *ks.stride(), *vs.stride(), *k_ctx.stride(), *v_ctx.stride(),
        snv_b, snv_r, *o.stride(), *lse.stride(),
        H, R, T, hd,
        HAS_SELF=has_self, HAS_VIS=n_visible is not None,
        EMULATE_BF16=INTERPRETED and q.dtype == torch.bfloat16,
        BLOCK_R=block_r, BLOCK_T=block_t, BLOCK_D=block_d,
    )
    return o, lse


def ebt_attention_bwd(do: torch.Tensor, q: torch.Tensor, k_ctx: torch.Tensor, v_ctx: torch.Tensor,
                      o: torch.Tensor, lse: torch.Tensor, k_self: Optional[torch.Tensor] = None,
                      v_self: Optional[torch.Tensor] = None, n_visible: Optional[torch.Tensor] = None
                      ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(dq, dk_self, dv_self) [B, H, R, hd] given do = dLoss/do and the forward's o and lse
    (dk_self and dv_self are None without a self key/value)."""
    B, H, R, hd = _check(q, k_ctx, v_ctx, k_self, v_self, n_visible)
    for name, t in (("do", do), ("o", o)):
        if tuple(t.shape) != (B, H, R, hd):
            raise ValueError(f"{name} must be [B={B}, H={H}, R={R}, head_dim={hd}]; got shape {tuple(t.shape)}")
    if tuple(lse.shape) != (B, H, R) or lse.dtype != torch.float32:
        raise ValueError(f"lse must be fp32 [B={B}, H={H}, R={R}] from ebt_attention_fwd; got {lse.dtype} "
                         f"of shape {tuple(lse.shape)}")
    T = k_ctx.shape[2]
    has_self = k_self is not None
    dq = torch.empty((B, H, R, hd), dtype=q.dtype, device=q.device)
    dks = torch.empty_like(dq) if has_self else None
    dvs = torch.empty_like(dq) if has_self else None
    if B * H * R == 0:
        return dq, dks, dvs
    ks, vs = (k_self, v_self) if has_self else (q, q)
    nv, snv_b, snv_r = _vis_args(n_visible, q)
    block_r, block_t, block_d = _blocks(R, T, hd)
    grid = (triton.cdiv(R, block_r), B * H)
    _ebt_attention_bwd_kernel[grid](
        q, ks, vs, k_ctx, v_ctx, nv, o, lse, do, dq, dks if has_self else dq, dvs if has_self else dq,
        *q.stride(), *ks.stride(), *vs.stride(), *k_ctx.stride(), *v_ctx.stride(),
        snv_b, snv_r, *o.stride(), *lse.stride(), *do.stride(),
        H, R, T, hd,
        HAS_SELF=has_self, HAS_VIS=n_visible is not None,
        EMULATE_BF16=INTERPRETED and q.dtype == torch.bfloat16,
        BLOCK_R=block_r, BLOCK_T=block_t, BLOCK_D=block_d,
    )
    return dq, dks, dvs
