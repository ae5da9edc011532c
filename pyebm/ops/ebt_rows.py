"""The steps of EBT's prediction rows between their products, as fused CPU ops (csrc/cpu/ebt_rows.cpp).

On the cpu backend in float32 (``pyebm._dispatch.ebt_rows_steps``) a descent step of EBT runs, per layer, four
``rows_linear`` products and between them these ops, one call each, instead of a dozen or more small ATen ops:

``torch.ops.pyebm.ebt_rows_attention(qkv, k_ctx, v_ctx, cos, sin, n_visible) -> (o, lse)``
    qkv [B, R, 3, H, hd]: the rows' q|k|v from the W_qkv product, before RoPE (q scaled by 1/sqrt(hd)); the
    cached context k_ctx / v_ctx [B, H, T, hd] (any strides); the RoPE tables of the rows cos / sin [R, hd]
    (the interleaved layout of the model's pack); n_visible [R] or [B, R] integer (the context entries each
    row sees; values outside [0, T] clamped) or None (all T). Each row attends, in one softmax, to what it
    sees of the context and to its own key and value. o [B, R, H * hd]; lse [B, H, R] the log normaliser.
``torch.ops.pyebm.ebt_rows_attention_bwd(do, qkv, k_ctx, v_ctx, o, lse, cos, sin, n_visible) -> dqkv``
    d(qkv) [B, R, 3, H, hd] before RoPE, given do [B, R, H * hd] and the forward's o and lse.
``torch.ops.pyebm.ebt_rows_rms_norm(x, eps) -> (xn, r)``
    xn = x * r, r = 1 / sqrt(mean(x^2) + eps) [M, 1], over the rows of x [M, D] (the norm weights are folded
    into the products that follow).
``torch.ops.pyebm.ebt_rows_rms_norm_bwd(xn, r, g, add=None) -> (add +) r * (g - xn * mean(xn * g))``
    g [M, D] or [D] (one row for every row).
``torch.ops.pyebm.ebt_rows_swiglu(uz) -> silu(u) * z`` and ``ebt_rows_swiglu_bwd(dm, uz) -> [du | dz]``
    uz = [u | z] [M, 2F] (the W_1|W_3 product).

The attention splits the (prompt, head) pairs between the intra-op threads, each computed the same way
whatever the split (equal numbers for any thread count). float32 CPU tensors only; inference ops (no autograd
formula). The references are ``pyebm.reference.ebt.rows_attention`` (and autograd through it),
``pyebm.reference.ebt.rms_norm`` and the SwiGLU gate.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor


def attention(qkv: Tensor, k_ctx: Tensor, v_ctx: Tensor, cos: Tensor, sin: Tensor,
              n_visible: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """``torch.ops.pyebm.ebt_rows_attention`` with n_visible optional."""
    return torch.ops.pyebm.ebt_rows_attention(qkv, k_ctx, v_ctx, cos, sin, n_visible)


def attention_bwd(do: Tensor, qkv: Tensor, k_ctx: Tensor, v_ctx: Tensor, o: Tensor, lse: Tensor, cos: Tensor,
                  sin: Tensor, n_visible: Optional[Tensor] = None) -> Tensor:
    """``torch.ops.pyebm.ebt_rows_attention_bwd`` with n_visible optional."""
    return torch.ops.pyebm.ebt_rows_attention_bwd(do, qkv, k_ctx, v_ctx, o, lse, cos, sin, n_visible)
