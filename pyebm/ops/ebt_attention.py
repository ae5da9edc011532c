"""EBT prediction attention as torch.library custom ops (kernel: ``pyebm._kernels.ebt_attention``).

``torch.ops.pyebm.ebt_attention_fwd(q, k_ctx, v_ctx, k_self, v_self, n_visible) -> (o, lse)``
    q [B, H, R, hd] (scaled by 1/sqrt(hd) already), k_ctx / v_ctx [B, H, T, hd] (cached context, any
    strides), k_self / v_self [B, H, R, hd] or both None, n_visible [R] or [B, R] integer or None (all
    T visible). o [B, H, R, hd] in q's dtype, lse [B, H, R] fp32 (-inf for a row that sees nothing).
``torch.ops.pyebm.ebt_attention_bwd(do, q, k_ctx, v_ctx, o, lse, k_self, v_self, n_visible)
-> (dq, dk_self, dv_self)``
    input gradients given do = dLoss/do and the forward's o and lse; dk_self and dv_self are empty
    (shape [0]) when there is no self key/value. The cache gets no gradient.

The math is ``pyebm.reference.ebt.prediction_attention``. dtypes float32, bfloat16, float16 (fp32
softmax and accumulation). CUDA tensors, or CPU tensors when TRITON_INTERPRET=1 was set before the
kernels were imported. Inference ops: no autograd formula is registered (the model's hand-written
backward calls ``ebt_attention_bwd`` itself; a backward through them raises). Arguments are checked in
``pyebm.ops._checks`` (the fakes in ``pyebm.ops._fake`` run the same checks). Triton is imported on the first call, so the ops exist
(e.g. for tracing with fake tensors) on machines without Triton.
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
    from pyebm._kernels import ebt_attention as kernels

    return kernels


def _cpu_rule(op: str, q: Tensor) -> None:
    if q.device.type == "cpu" and not _backend.triton_interpret():
        raise ValueError(f"{op}: the triton backend on CPU tensors needs TRITON_INTERPRET=1")


def check_bwd(do, q, k_ctx, v_ctx, o, lse, k_self, v_self, n_visible) -> None:
    """The arguments of ebt_attention_bwd (its fake runs this too)."""
    op = "pyebm::ebt_attention_bwd"
    B, H, R, hd = _checks.attention_args(op, q, k_ctx, v_ctx, k_self, v_self, n_visible)
    _checks.same(op, "do", do, q, "q", (B, H, R, hd))
    _checks.same(op, "o", o, q, "q", (B, H, R, hd))
    _checks.fp32_aux(op, "lse", lse, (B, H, R), q, "ebt_attention_fwd")


@torch.library.custom_op("pyebm::ebt_attention_fwd", mutates_args=())
def ebt_attention_fwd(q: Tensor, k_ctx: Tensor, v_ctx: Tensor, k_self: Optional[Tensor],
                      v_self: Optional[Tensor], n_visible: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """(o [B, H, R, hd], lse [B, H, R] fp32) of prediction attention, one Triton launch."""
    _checks.attention_args("pyebm::ebt_attention_fwd", q, k_ctx, v_ctx, k_self, v_self, n_visible)
    _cpu_rule("pyebm::ebt_attention_fwd", q)
    return _kernels().ebt_attention_fwd(q, k_ctx, v_ctx, k_self, v_self, n_visible)


@torch.library.custom_op("pyebm::ebt_attention_bwd", mutates_args=())
def ebt_attention_bwd(do: Tensor, q: Tensor, k_ctx: Tensor, v_ctx: Tensor, o: Tensor, lse: Tensor,
                      k_self: Optional[Tensor], v_self: Optional[Tensor], n_visible: Optional[Tensor]
                      ) -> Tuple[Tensor, Tensor, Tensor]:
    """(dq, dk_self, dv_self) [B, H, R, hd]; dk_self, dv_self are empty without a self key/value."""
    check_bwd(do, q, k_ctx, v_ctx, o, lse, k_self, v_self, n_visible)
    _cpu_rule("pyebm::ebt_attention_bwd", q)
    dq, dks, dvs = _kernels().ebt_attention_bwd(do, q, k_ctx, v_ctx, o, lse, k_self, v_self, n_visible)
    if dks is None:
        dks, dvs = q.new_empty(0), q.new_empty(0)
    return dq, dks, dvs


def attention_fwd(q: Tensor, k_ctx: Tensor, v_ctx: Tensor, k_self: Optional[Tensor] = None,
                  v_self: Optional[Tensor] = None, n_visible: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """``torch.ops.pyebm.ebt_attention_fwd`` with optional arguments."""
    return torch.ops.pyebm.ebt_attention_fwd(q, k_ctx, v_ctx, k_self, v_self, n_visible)


def attention_bwd(do: Tensor, q: Tensor, k_ctx: Tensor, v_ctx: Tensor, o: Tensor, lse: Tensor,
                  k_self: Optional[Tensor] = None, v_self: Optional[Tensor] = None,
                  n_visible: Optional[Tensor] = None) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """``torch.ops.pyebm.ebt_attention_bwd``; dk_self, dv_self are None without a self key/value."""
    dq, dks, dvs = torch.ops.pyebm.ebt_attention_bwd(do, q, k_ctx, v_ctx, o, lse, k_self, v_self, n_visible)
    if k_self is None:
        return dq, None, None
    return dq, dks, dvs
