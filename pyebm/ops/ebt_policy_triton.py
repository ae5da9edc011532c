"""Triton pieces of the EBT-Policy energy network's input gradient, as torch.library custom ops.

Forward ops (each differentiable with respect to its activation input only; the weights, the cached
observation keys/values and the mask are constants, and asking for their gradient is an error):

``torch.ops.pyebm.ebt_policy_self_attn_triton(qkv, q_weight, k_weight, heads, eps) -> o``
    qkv [N, T, 3D] (the qkv Linear's output), q_weight / k_weight [hd] (the per-head RMSNorm weights),
    o [N, T, D]: bidirectional attention over the T tokens of each row n with qk-RMSNorm and the
    hd^-0.5 scale, heads side by side. One program per (n, head).
``torch.ops.pyebm.ebt_policy_cross_attn_triton(q, q_weight, k_ctx, v_ctx, n_visible, eps) -> (o, lse)``
    q [B, H, R, hd] (raw queries, RMSNorm applied inside), k_ctx / v_ctx [B, H, L, hd] cached observation
    keys (already normalised and scaled) and values, any strides; n_visible [R] or [B, R] integer: row r
    sees observation tokens j < n_visible[r] (the temporal memory mask is such a prefix, see
    ``memory_n_visible``). o [B, H, R, hd], lse [B, H, R] fp32 (for the backward).
``torch.ops.pyebm.ebt_policy_rms_norm_triton(x, weight, eps) -> (y, rstd)``  over x's last dim.
``torch.ops.pyebm.ebt_policy_gelu_tanh_triton(x) -> y``

Backward ops (input gradients): ``ebt_policy_self_attn_bwd_triton(grad_out, qkv, q_weight, k_weight,
heads, eps) -> dqkv``, ``ebt_policy_cross_attn_bwd_triton(grad_out, q, q_weight, k_ctx, v_ctx,
n_visible, out, lse, eps) -> dq``, ``ebt_policy_rms_norm_bwd_triton(grad_out, x, weight, rstd) -> dx``,
``ebt_policy_gelu_tanh_bwd_triton(grad_out, x) -> dx``.

Kernels: ``pyebm._kernels.ebt_policy`` (self-attention, RMSNorm, GELU) and ``pyebm._kernels.ebt_attention``
(the cross-attention). dtypes float32, bfloat16, float16 with fp32 math inside; outputs in the input's
dtype. CUDA tensors, or CPU tensors when TRITON_INTERPRET=1 was set before the kernels were imported.
Triton is imported on the first call, so this module imports (and the ops exist for tracing with fake
tensors) on machines without Triton.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from pyebm import _backend
from pyebm.ops import _checks


def _kernels():
    if _backend.triton is None:
        raise RuntimeError(f"pyebm: the triton backend is not usable: {_backend.backends().why['triton']}")
    from pyebm._kernels import ebt_attention, ebt_policy

    return ebt_policy, ebt_attention


def memory_n_visible(horizon: int, n_tokens: int, n_obs_steps: int, candidates: int = 1,
                     device=None) -> Tensor:
    """int32 [candidates * horizon]: observation tokens visible to each query row of the cross-attention.

    Token t sees j iff t >= j // (n_tokens / n_obs_steps), i.e. the prefix j < (t + 1) * tokens_per_step;
    rows are ordered (candidate, t) as the policy stacks its K candidates.
    """
    if n_tokens % n_obs_steps != 0:
        raise ValueError(f"n_tokens ({n_tokens}) must be a multiple of n_obs_steps ({n_obs_steps})")
    per_step = n_tokens // n_obs_steps
    t = torch.arange(horizon, device=device, dtype=torch.int64)
    nv = torch.clamp((t + 1) * per_step, max=n_tokens).to(torch.int32)
    return nv.repeat(candidates)


# -- checks (pyebm.ops._checks; the fakes in pyebm.ops._fake run the same) -----------------------
def _cpu_rule(op: str, t: Tensor) -> None:
    if t.device.type == "cpu" and not _backend.triton_interpret():
        raise ValueError(f"{op}: the triton backend on CPU tensors needs TRITON_INTERPRET=1")


# -- self-attention --------------------------------------------------------------------------------
@torch.library.custom_op("pyebm::ebt_policy_self_attn_triton", mutates_args=())
def ebt_policy_self_attn_triton(qkv: Tensor, q_weight: Tensor, k_weight: Tensor, heads: int, eps: float) -> Tensor:
    """o [N, T, D]: qk-RMSNorm bidirectional self-attention of qkv [N, T, 3D], one program per (n, head)."""
    op = "pyebm::ebt_policy_self_attn_triton"
    _checks.policy_self_attn_args(op, qkv, q_weight, k_weight, heads)
    _cpu_rule(op, qkv)
    return _kernels()[0].self_attention_fwd(qkv, q_weight, k_weight, heads, eps)


@torch.library.custom_op("pyebm::ebt_policy_self_attn_bwd_triton", mutates_args=())
def ebt_policy_self_attn_bwd_triton(grad_out: Tensor, qkv: Tensor, q_weight: Tensor, k_weight: Tensor, heads: int,
                                    eps: float) -> Tensor:
    """dqkv [N, T, 3D] from grad_out [N, T, D] (the forward tile is recomputed)."""
    op = "pyebm::ebt_policy_self_attn_bwd_triton"
    _checks.policy_self_attn_args(op, qkv, q_weight, k_weight, heads)
    N, T, C = qkv.shape
    _checks.same(op, "grad_out", grad_out, qkv, "qkv", (N, T, C // 3))
    _cpu_rule(op, qkv)
    return _kernels()[0].self_attention_bwd(grad_out, qkv, q_weight, k_weight, heads, eps)


# -- cross-attention to cached observation tokens --------------------------------------------------
@torch.library.custom_op("pyebm::ebt_policy_cross_attn_triton", mutates_args=())
def ebt_policy_cross_attn_triton(q: Tensor, q_weight: Tensor, k_ctx: Tensor, v_ctx: Tensor, n_visible: Tensor,
                                 eps: float) -> Tuple[Tensor, Tensor]:
    """(o [B, H, R, hd], lse [B, H, R] fp32): RMSNorm(q) * q_weight attending to a visible prefix of k/v."""
    op = "pyebm::ebt_policy_cross_attn_triton"
    _checks.policy_cross_args(op, q, q_weight, k_ctx, v_ctx, n_visible)
    _cpu_rule(op, q)
    kp, ka = _kernels()
    qn, _ = kp.rms_norm_fwd(q, q_weight, eps)
    return ka.ebt_attention_fwd(qn, k_ctx, v_ctx, n_visible=n_visible)


@torch.library.custom_op("pyebm::ebt_policy_cross_attn_bwd_triton", mutates_args=())
def ebt_policy_cross_attn_bwd_triton(grad_out: Tensor, q: Tensor, q_weight: Tensor, k_ctx: Tensor, v_ctx: Tensor,
                                     n_visible: Tensor, out: Tensor, lse: Tensor, eps: float) -> Tensor:
    """dq [B, H, R, hd] (raw q) from grad_out [B, H, R, hd] and the forward's (out, lse)."""
    op = "pyebm::ebt_policy_cross_attn_bwd_triton"
    _checks.policy_cross_args(op, q, q_weight, k_ctx, v_ctx, n_visible)
    _checks.same(op, "grad_out", grad_out, q, "q", q.shape)
    _checks.same(op, "out", out, q, "q", q.shape)
    _checks.fp32_aux(op, "lse", lse, q.shape[:3], q, "the forward")
    _cpu_rule(op, q)
    kp, ka = _kernels()
    qn, rstd = kp.rms_norm_fwd(q, q_weight, eps)
    dqn = ka.ebt_attention_bwd(grad_out, qn, k_ctx, v_ctx, out, lse, n_visible=n_visible)[0]
    return kp.rms_norm_bwd(dqn, q, q_weight, rstd)


# -- RMSNorm and GELU-tanh -------------------------------------------------------------------------
@torch.library.custom_op("pyebm::ebt_policy_rms_norm_triton", mutates_args=())
def ebt_policy_rms_norm_triton(x: Tensor, weight: Tensor, eps: float) -> Tuple[Tensor, Tensor]:
    """(x * rstd * weight, rstd fp32 [...]) with rstd = rsqrt(mean(x^2) + eps) over the last dim."""
    op = "pyebm::ebt_policy_rms_norm_triton"
    _checks.policy_rms_args(op, x, weight)
    _cpu_rule(op, x)
    return _kernels()[0].rms_norm_fwd(x, weight, eps)


@torch.library.custom_op("pyebm::ebt_policy_rms_norm_bwd_triton", mutates_args=())
def ebt_policy_rms_norm_bwd_triton(grad_out: Tensor, x: Tensor, weight: Tensor, rstd: Tensor) -> Tensor:
    """dx from grad_out (x's shape) and the forward's rstd."""
    op = "pyebm::ebt_policy_rms_norm_bwd_triton"
    _checks.policy_rms_args(op, x, weight)
    _checks.same(op, "grad_out", grad_out, x, "x", x.shape)
    _checks.fp32_aux(op, "rstd", rstd, x.shape[:-1], x, "the forward")
    _cpu_rule(op, x)
    return _kernels()[0].rms_norm_bwd(grad_out, x, weight, rstd)


@torch.library.custom_op("pyebm::ebt_policy_gelu_tanh_triton", mutates_args=())
def ebt_policy_gelu_tanh_triton(x: Tensor) -> Tensor:
    """GELU, tanh approximation, elementwise (contiguous output)."""
    _checks.triton_input("pyebm::ebt_policy_gelu_tanh_triton", "x", x)
    _cpu_rule("pyebm::ebt_policy_gelu_tanh_triton", x)
    return _kernels()[0].gelu_tanh(x)


@torch.library.custom_op("pyebm::ebt_policy_gelu_tanh_bwd_triton", mutates_args=())
def ebt_policy_gelu_tanh_bwd_triton(grad_out: Tensor, x: Tensor) -> Tensor:
    """grad_out * gelu_tanh'(x) (torch's gelu_backward with approximate='tanh')."""
    op = "pyebm::ebt_policy_gelu_tanh_bwd_triton"
    _checks.triton_input(op, "x", x)
    _checks.same(op, "grad_out", grad_out, x, "x", x.shape)
    _cpu_rule(op, x)
    return _kernels()[0].gelu_tanh(x, grad_out)


# -- autograd: input gradients only ---------------------------------------------------------------
def _constants_only(ctx, names: Tuple[str, ...]) -> None:
    for flag, name in zip(ctx.needs_input_grad[1:], names):
        if flag:
            raise RuntimeError(f"pyebm: this triton op gives input gradients only; {name} must not require grad")


def _self_setup(ctx, inputs, output):
    qkv, q_weight, k_weight, heads, eps = inputs
    ctx.save_for_backward(qkv, q_weight, k_weight)
    ctx.heads, ctx.eps = heads, eps


def _self_backward(ctx, grad):
    _constants_only(ctx, ("q_weight", "k_weight"))
    qkv, q_weight, k_weight = ctx.saved_tensors
    return ebt_policy_self_attn_bwd_triton(grad, qkv, q_weight, k_weight, ctx.heads, ctx.eps), None, None, None, None


def _cross_setup(ctx, inputs, output):
    q, q_weight, k_ctx, v_ctx, n_visible, eps = inputs
    ctx.save_for_backward(q, q_weight, k_ctx, v_ctx, n_visible, *output)
    ctx.eps = eps


def _cross_backward(ctx, grad_o, grad_lse):
    _constants_only(ctx, ("q_weight", "k_ctx", "v_ctx"))
    q, q_weight, k_ctx, v_ctx, n_visible, o, lse = ctx.saved_tensors
    # lse is an auxiliary output for the backward; a gradient flowing into it is not supported.
    dq = ebt_policy_cross_attn_bwd_triton(grad_o, q, q_weight, k_ctx, v_ctx, n_visible, o, lse, ctx.eps)
    return dq, None, None, None, None, None


def _rms_setup(ctx, inputs, output):
    x, weight, eps = inputs
    ctx.save_for_backward(x, weight, output[1])


def _rms_backward(ctx, grad_y, grad_rstd):
    _constants_only(ctx, ("weight",))
    x, weight, rstd = ctx.saved_tensors
    return ebt_policy_rms_norm_bwd_triton(grad_y, x, weight, rstd), None, None


def _gelu_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _gelu_backward(ctx, grad):
    (x,) = ctx.saved_tensors
    return ebt_policy_gelu_tanh_bwd_triton(grad, x)


ebt_policy_self_attn_triton.register_autograd(_self_backward, setup_context=_self_setup)
ebt_policy_cross_attn_triton.register_autograd(_cross_backward, setup_context=_cross_setup)
ebt_policy_rms_norm_triton.register_autograd(_rms_backward, setup_context=_rms_setup)
ebt_policy_gelu_tanh_triton.register_autograd(_gelu_backward, setup_context=_gelu_setup)
