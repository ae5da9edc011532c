"""Triton kernels: the vocabulary ends of an EBT descent step.

Forward (``vocab_embed``): vocabulary-space candidates y [N, V] to prediction embeddings::

    p = softmax(y)  with p < tiny(dtype) set to 0      (or p = y without the softmax)
    e = p @ W^T                                          W [D, V] (vocab_to_embed.weight, or embeddings^T)

Backward (``vocab_grad``): the gradient through ``vocab_to_embed`` back to the vocabulary::

    g = ge @ W                                           ge = dE/de [N, D], g = dE/dp [N, V]

N counts every row of the step (all samples of all prompts and positions), and rows are tiled BLOCK_N
at a time, so W is read once per row tile - once per step when N <= BLOCK_N (generation: G samples of
a few prompts) - instead of once per sample. The forward makes two passes over a row tile's logits
(row max and sum, online) and then one over W, writing p (by the first column program) and e; the
logits are re-read (N x V, small next to V x D when N < D), the score matrix never exists beyond one
tile. Setting the subnormal probabilities to zero matches the model's softmax: products with
subnormal numbers are slow on CPUs and change nothing.

Numerics: softmax, sums and accumulators fp32; fp32 inputs use IEEE fp32 dot products (no TF32),
bf16/fp16 inputs feed the dot products in their dtype (p rounded to it first, as the model's p is)
with fp32 accumulation; one rounding to the output dtype at the store. The launchers never call
torch.cuda, so with TRITON_INTERPRET=1 (read when this module is imported) they run on CPU tensors.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .ebt_attention import INTERPRETED, _dot, _round

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _vocab_embed_kernel(Y, W, P, E, sy_n, sy_v, sw_d, sw_v, sp_n, se_n, N, V, D, tiny,
                        SOFTMAX: tl.constexpr, EMULATE_BF16: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    dtype: tl.constexpr = Y.dtype.element_ty
    pid_d = tl.program_id(1)
    # int64 offsets: N * V overflows int32 for a few thousand rows of a large vocabulary.
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    dcol = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    rmask = rows < N
    dmask = dcol < D
    vr = tl.arange(0, BLOCK_V)

    if SOFTMAX:
        m = tl.zeros([BLOCK_N], dtype=tl.float32) - float("inf")
        l = tl.zeros([BLOCK_N], dtype=tl.float32)
        for v0 in range(0, V, BLOCK_V):
            vcol = v0 + vr
            mask = rmask[:, None] & (vcol < V)[None, :]
            y = tl.load(Y + rows[:, None] * sy_n + vcol[None, :] * sy_v, mask=mask,
                        other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(y, axis=1))
            # Padded rows (and rows of -inf) keep m = -inf; shift by 0 there so exp() gives 0, not NaN.
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l = l * tl.exp(m - m_safe) + tl.sum(tl.exp(y - m_safe[:, None]), axis=1)
            m = m_new
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        l_safe = tl.where(l > 0.0, l, 1.0)

    acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        vcol = v0 + vr
        vmask = vcol < V
        mask = rmask[:, None] & vmask[None, :]
        if SOFTMAX:
            y = tl.load(Y + rows[:, None] * sy_n + vcol[None, :] * sy_v, mask=mask,
                        other=float("-inf")).to(tl.float32)
            p = tl.exp(y - m_safe[:, None]) / l_safe[:, None]
            p = tl.where(p < tiny, 0.0, p)
            if pid_d == 0:
                tl.store(P + rows[:, None] * sp_n + vcol[None, :], _round(p, dtype, EMULATE_BF16), mask=mask)
        else:
            p = tl.load(Y + rows[:, None] * sy_n + vcol[None, :] * sy_v, mask=mask, other=0.0).to(tl.float32)
        # W^T tile [BLOCK_V, BLOCK_D]; padded vocabulary entries are 0 in both operands.
        wt = tl.load(W + dcol[None, :].to(tl.int64) * sw_d + vcol[:, None].to(tl.int64) * sw_v,
                     mask=vmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        acc += _dot(p, wt, dtype, EMULATE_BF16)
    tl.store(E + rows[:, None] * se_n + dcol[None, :], _round(acc, dtype, EMULATE_BF16),
             mask=rmask[:, None] & dmask[None, :])


@triton.jit
def _vocab_grad_kernel(GE, W, G, sge_n, sge_d, sw_d, sw_v, sg_n, N, V, D,
                       EMULATE_BF16: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    dtype: tl.constexpr = GE.dtype.element_ty
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    vcol = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    rmask = rows < N
    vmask = vcol < V
    dr = tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dcol = d0 + dr
        dmask = dcol < D
        ge = tl.load(GE + rows[:, None] * sge_n + dcol[None, :] * sge_d, mask=rmask[:, None] & dmask[None, :],
                     other=0.0).to(tl.float32)
        w = tl.load(W + dcol[:, None].to(tl.int64) * sw_d + vcol[None, :].to(tl.int64) * sw_v,
                    mask=dmask[:, None] & vmask[None, :], other=0.0).to(tl.float32)
        acc += _dot(ge, w, dtype, EMULATE_BF16)
    tl.store(G + rows[:, None] * sg_n + vcol[None, :], _round(acc, dtype, EMULATE_BF16),
             mask=rmask[:, None] & vmask[None, :])


# ------------------------------------------------------------------------------------------------
# launchers
# ------------------------------------------------------------------------------------------------

def _check(name: str, x: torch.Tensor, w: torch.Tensor, axis_name: str) -> None:
    """x [..., k] against w [D, V]; k is V (axis_name 'V') or D."""
    for n, t in ((name, x), ("w", w)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{n} must be a tensor; got {type(t).__name__}")
    if w.dim() != 2:
        raise ValueError(f"w must be [D, V]; got shape {tuple(w.shape)}")
    D, V = w.shape
    k = V if axis_name == "V" else D
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"{name} must be [..., {axis_name}={k}] for w [D={D}, V={V}]; got shape {tuple(x.shape)}")
    if x.dtype not in DTYPES:
        raise ValueError(f"{name}: dtype must be one of {DTYPES}; got {x.dtype}")
    if w.dtype != x.dtype or w.device != x.device:
        raise ValueError(f"w is {w.dtype} on {w.device}; {name} is {x.dtype} on {x.device}")
    if x.device.type == "cpu" and not INTERPRETED:
        raise RuntimeError("pyebm triton: CPU tensors need TRITON_INTERPRET=1 set before pyebm._kernels is imported")


def _block_n(N: int) -> int:
    return min(64, max(16, triton.next_power_of_2(max(N, 1))))


def vocab_embed(y: torch.Tensor, w: torch.Tensor, softmax: bool = True
                ) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
    """(p [..., V], e [..., D]) for y [..., V] and w [D, V] (any strides); p is None without the softmax
    (e = y @ w^T then). Outputs contiguous, in y's dtype."""
    _check("y", y, w, "V")
    D, V = w.shape
    y2 = y.reshape(-1, V)
    N = y2.shape[0]
    lead = tuple(y.shape[:-1])
    e = torch.empty((N, D), dtype=y.dtype, device=y.device)
    p = torch.empty((N, V), dtype=y.dtype, device=y.device) if softmax else None
    if N * V * D == 0:  # nothing to launch: empty outputs, or an empty sum (e = 0)
        if softmax:
            p = torch.softmax(y2, dim=-1)
        e.zero_()
        return (p.view(*lead, V) if softmax else None), e.view(*lead, D)
    block_n = _block_n(N)
    block_v = min(128, max(16, triton.next_power_of_2(V)))
    block_d = min(128, max(16, triton.next_power_of_2(D)))
    grid = (triton.cdiv(N, block_n), triton.cdiv(D, block_d))
    pp = p if softmax else e
    _vocab_embed_kernel[grid](
        y2, w, pp, e, y2.stride(0), y2.stride(1), w.stride(0), w.stride(1), pp.stride(0), e.stride(0),
        N, V, D, float(torch.finfo(y.dtype).tiny),
        SOFTMAX=bool(softmax), EMULATE_BF16=INTERPRETED and y.dtype == torch.bfloat16,
        BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=block_d)
    return (p.view(*lead, V) if softmax else None), e.view(*lead, D)


def vocab_grad(ge: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """g = ge @ w [..., V] for ge [..., D] and w [D, V] (any strides); contiguous, in ge's dtype."""
    _check("ge", ge, w, "D")
    D, V = w.shape
    ge2 = ge.reshape(-1, D)
    N = ge2.shape[0]
    lead = tuple(ge.shape[:-1])
    g = torch.empty((N, V), dtype=ge.dtype, device=ge.device)
    if N * V == 0:
        return g.view(*lead, V)
    if D == 0:
        return g.zero_().view(*lead, V)
    block_n = _block_n(N)
    block_v = min(128, max(16, triton.next_power_of_2(V)))
    block_d = min(64, max(16, triton.next_power_of_2(D)))
    grid = (triton.cdiv(N, block_n), triton.cdiv(V, block_v))
    _vocab_grad_kernel[grid](
        ge2, w, g, ge2.stride(0), ge2.stride(1), w.stride(0), w.stride(1), g.stride(0), N, V, D,
        EMULATE_BF16=INTERPRETED and ge.dtype == torch.bfloat16,
        BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=block_d)
    return g.view(*lead, V)
