"""Every fake (meta) implementation of the ``pyebm::`` ops, in one place.

A fake computes the output shapes, dtypes and devices of an op from its inputs' metadata, so that
``torch.compile``, ``FakeTensorMode`` and meta tensors trace through the op without running it. Each fake
first runs the op's argument checks (``pyebm.ops._checks``, the same checks as the C++ kernels): a call the
kernel would reject is rejected when traced too. Checks that need tensor values (bounds in order,
``step_clip > 0``, finite schedules) run in the kernels only.

The C++ ops (schemas in csrc/ops.cpp) name this module with ``m.set_python_module``, so torch imports it when
it first needs one of their fakes. The Triton custom ops keep their ``@torch.library.custom_op`` definition
next to their launcher (``pyebm/ops/*_triton.py``, ``ebt_attention.py``, ``ebt_norm_swiglu.py``,
``ebt_vocab.py``); their fakes are registered here by name. The VJP ops (``*_vjp``) are CompositeImplicitAutograd
(``pyebm.ops._autograd``) and need none.
"""
from __future__ import annotations

import torch

from pyebm.ops import _checks as C
from pyebm.ops import _fallback  # noqa: F401  (defines the MLP-energy ops when pyebm._C is absent)
# The Triton custom ops must exist before their fakes are registered.
from pyebm.ops import (descent_triton, ebt_attention, ebt_norm_swiglu, ebt_policy_triton,  # noqa: F401
                       ebt_vocab, mlp_energy_triton)
from pyebm.ops import packed_call, rng_draw  # noqa: E402  (Python ops of pyebm.export and pyebm._rng)


def _has(name: str) -> bool:
    return hasattr(torch.ops.pyebm, name)


def _fake(name: str):
    """torch.library.register_fake for pyebm::name (skipped when the op is not defined in this build)."""
    def deco(fn):
        if _has(name):
            torch.library.register_fake(f"pyebm::{name}")(fn)
        return fn
    return deco


# -- the MLP energy (C++, or pyebm.ops._fallback) --------------------------------------------------

@_fake("mlp_energy_grad")
def mlp_energy_grad(ctx, y, w_in, weights, biases, w_out, b_out, activation, residual):
    B, K, D, _ = C.mlp_args("pyebm::mlp_energy_grad", ctx, y, w_in, weights, biases, w_out, b_out)
    C.activation(activation)
    return y.new_empty(B, K), y.new_empty(B, K, D)


@_fake("mlp_energy")
def mlp_energy(ctx, y, w_in, weights, biases, w_out, b_out, activation, residual):
    B, K, _, _ = C.mlp_args("pyebm::mlp_energy", ctx, y, w_in, weights, biases, w_out, b_out)
    C.activation(activation)
    return y.new_empty(B, K)


@_fake("dispatch_floor")
def dispatch_floor(x):
    C.dense("pyebm::dispatch_floor", "x", x)
    return x.new_empty(0)


# -- descent (C++) ---------------------------------------------------------------------------------

@_fake("mlp_descent")
def mlp_descent(ctx, y0, w_in, weights, biases, w_out, b_out, activation, residual, eta, noise_level, noise, lower,
                upper, step_clip, mask, grad_scale, momentum, nesterov, grad_clip, grad_clip_norm, energy_scaled,
                energy_temperature, tol, tol_final_step, bound_each_step, noise_mode):
    C.mlp_descent_args("pyebm::mlp_descent", ctx, y0, w_in, weights, biases, w_out, b_out, activation, eta,
                       noise_level, noise, lower, upper, step_clip, mask, noise_mode, momentum, grad_clip,
                       grad_clip_norm, energy_temperature, tol, grad_scale)
    if noise_mode != "none" and noise is None:
        raise ValueError(f"pyebm::mlp_descent: noise_mode '{noise_mode}' needs the noise tensor [steps, B, K, D]")
    B, K = y0.shape[:2]
    return (torch.empty_like(y0, memory_format=torch.contiguous_format), y0.new_empty(B, K), y0.new_empty(B, K),
            y0.new_empty(B, K, dtype=torch.int32), y0.new_empty(B, K, dtype=torch.int8))


@_fake("descent_update")
def descent_update(y, g, E, active, steps, status, velocity, pending, noise, mask, fixed, lower, upper, step_clip,
                   eta, noise_level, noise_mode, grad_scale, momentum, grad_clip, grad_clip_norm, energy_scaled,
                   energy_temperature, tol, tol_final_step, bound_each_step, y_base=None):
    op = "pyebm::descent_update"
    C.descent_update_args(op, y, g, E, active, steps, status, velocity, pending, noise, mask, fixed, lower, upper,
                          step_clip, noise_mode, momentum, tol, tol_final_step, y_base)
    C.rule(momentum, grad_clip, grad_clip_norm, energy_temperature, tol)
    C.step_scalars(op, eta, noise_level, grad_scale)
    return None


@_fake("select_best")
def select_best(y, E, E_init, status, selection):
    B, _ = C.select_best_args("pyebm::select_best", y, E, E_init, status, selection)
    return y.new_empty((B,) + tuple(y.shape[2:])), E.new_empty(B), E.new_empty(B, dtype=torch.long)


# -- EBT-Policy (C++) ------------------------------------------------------------------------------

@_fake("ebt_policy_energy_grad")
def ebt_policy_energy_grad(y, ctx_k, ctx_v, bias, params, weights_t, heads, rms_eps, ln_eps, need_grad):
    C.ebt_net_args("pyebm::ebt_policy_energy_grad", "y", y, ctx_k, ctx_v, bias, params, weights_t, heads, rms_eps,
                   ln_eps)
    B, K, T, A = y.shape
    return y.new_empty(B, K), (y.new_empty(B, K, T, A) if need_grad else y.new_empty(0))


@_fake("ebt_policy_descent")
def ebt_policy_descent(y0, ctx_k, ctx_v, bias, params, weights_t, heads, rms_eps, ln_eps, eta, lower, upper,
                       step_clip, normalize, normalize_eps, grad_scale, momentum, nesterov, grad_clip, grad_clip_norm,
                       energy_scaled, energy_temperature, tol, tol_scope, tol_final_step, bound_each_step,
                       final_energy=True):
    C.ebt_descent_args("pyebm::ebt_policy_descent", y0, ctx_k, ctx_v, bias, params, weights_t, heads, rms_eps, ln_eps,
                       eta, lower, upper, step_clip, normalize, normalize_eps, grad_clip, grad_clip_norm, momentum,
                       energy_temperature, tol, tol_scope, grad_scale)
    B, K = y0.shape[:2]
    return (y0.new_empty(y0.shape), y0.new_empty(B, K), y0.new_empty(B, K),
            y0.new_empty(B, K, dtype=torch.int32), y0.new_empty(B, K, dtype=torch.int8))


@_fake("ebt_policy_context")
def ebt_policy_context(obs, w, b, k_norm, heads, rms_eps):
    B, L, layers, H, hd = C.ebt_context_args("pyebm::ebt_policy_context", obs, w, b, k_norm, heads, rms_eps)
    return obs.new_empty(layers, B, H, hd, L), obs.new_empty(layers, B, H, L, hd)


@_fake("rows_linear")
def rows_linear(x, w, add=None):
    M, N = C.rows_linear_args("pyebm::rows_linear", x, w, add)
    return x.new_empty(M, N)


@_fake("ebt_rows_attention")
def ebt_rows_attention(qkv, k_ctx, v_ctx, cos, sin, n_visible):
    B, R, H, hd = C.ebt_rows_attention_args("pyebm::ebt_rows_attention", qkv, k_ctx, v_ctx, cos, sin, n_visible)
    return qkv.new_empty(B, R, H * hd), qkv.new_empty(B, H, R)


@_fake("ebt_rows_attention_bwd")
def ebt_rows_attention_bwd(do, qkv, k_ctx, v_ctx, o, lse, cos, sin, n_visible):
    C.ebt_rows_attention_bwd_args("pyebm::ebt_rows_attention_bwd", do, qkv, k_ctx, v_ctx, o, lse, cos, sin, n_visible)
    return qkv.new_empty(qkv.shape)


@_fake("ebt_rows_rms_norm")
def ebt_rows_rms_norm(x, eps):
    M, D = C.ebt_rows_2d("pyebm::ebt_rows_rms_norm", "x", x)
    C.non_negative("pyebm::ebt_rows_rms_norm", "eps", eps)
    return x.new_empty(M, D), x.new_empty(M, 1)


@_fake("ebt_rows_rms_norm_bwd")
def ebt_rows_rms_norm_bwd(xn, r, g, add=None):
    M, D = C.ebt_rows_rms_norm_bwd_args("pyebm::ebt_rows_rms_norm_bwd", xn, r, g, add)
    return xn.new_empty(M, D)


@_fake("ebt_rows_swiglu")
def ebt_rows_swiglu(uz):
    M, F = C.ebt_rows_swiglu_args("pyebm::ebt_rows_swiglu", uz)
    return uz.new_empty(M, F)


@_fake("ebt_rows_swiglu_bwd")
def ebt_rows_swiglu_bwd(dm, uz):
    M, F = C.ebt_rows_swiglu_args("pyebm::ebt_rows_swiglu_bwd", uz)
    C._f32_cpu("pyebm::ebt_rows_swiglu_bwd", "dm", dm)
    C.shape("pyebm::ebt_rows_swiglu_bwd", "dm", dm, (M, F), "[M, F]")
    return uz.new_empty(M, 2 * F)


# -- Triton: the MLP energy and descent (pyebm/ops/mlp_energy_triton.py, descent_triton.py) -----------

@_fake("mlp_energy_grad_triton")
def mlp_energy_grad_triton(ctx, y, w_in, weights, biases, w_out, b_out, activation, residual):
    mlp_energy_triton.check(ctx, y, w_in, weights, biases, w_out, b_out, activation, fake=True)
    B, K, D = y.shape
    return y.new_empty(B, K), y.new_empty(B, K, D)


@_fake("mlp_energy_triton")
def mlp_energy_triton_(ctx, y, w_in, weights, biases, w_out, b_out, activation, residual):
    mlp_energy_triton.check(ctx, y, w_in, weights, biases, w_out, b_out, activation, fake=True)
    B, K, _ = y.shape
    return y.new_empty(B, K)


@_fake("descent_update_triton")
def descent_update_triton_(y, g, E, active, steps, status, velocity, pending, noise, mask, fixed, lower, upper,
                           step_clip, eta, noise_level, noise_mode, grad_scale, momentum, grad_clip, grad_clip_norm,
                           energy_scaled, energy_temperature, tol, tol_final_step, bound_each_step, y_base=None):
    descent_triton.check_update(y, g, E, active, steps, status, velocity, pending, noise, mask, fixed, lower, upper,
                                step_clip, eta, noise_level, noise_mode, grad_scale, momentum, grad_clip,
                                grad_clip_norm, energy_temperature, tol, tol_final_step, y_base, fake=True)
    return None


@_fake("mlp_descent_triton")
def mlp_descent_triton_(ctx, y0, w_in, weights, biases, w_out, b_out, activation, residual, eta, noise_level, lower,
                        upper, step_clip, mask, grad_scale, momentum, nesterov, grad_clip, grad_clip_norm,
                        energy_scaled, energy_temperature, tol, tol_final_step, bound_each_step, noise_mode, seed):
    descent_triton.check_loop(ctx, y0, w_in, weights, biases, w_out, b_out, activation, eta, noise_level, lower,
                              upper, step_clip, mask, grad_scale, momentum, grad_clip, grad_clip_norm,
                              energy_temperature, tol, noise_mode, fake=True)
    B, K, D = y0.shape
    return (y0.new_empty(B, K, D), y0.new_empty(B, K), y0.new_empty(B, K),
            y0.new_empty(B, K, dtype=torch.int32), y0.new_empty(B, K, dtype=torch.int8))


# -- Triton: EBT (pyebm/ops/ebt_attention.py, ebt_norm_swiglu.py, ebt_vocab.py) ----------------------

@_fake("ebt_attention_fwd")
def ebt_attention_fwd(q, k_ctx, v_ctx, k_self, v_self, n_visible):
    B, H, R, hd = C.attention_args("pyebm::ebt_attention_fwd", q, k_ctx, v_ctx, k_self, v_self, n_visible)
    return q.new_empty(B, H, R, hd), q.new_empty(B, H, R, dtype=torch.float32)


@_fake("ebt_attention_bwd")
def ebt_attention_bwd(do, q, k_ctx, v_ctx, o, lse, k_self, v_self, n_visible):
    ebt_attention.check_bwd(do, q, k_ctx, v_ctx, o, lse, k_self, v_self, n_visible)
    B, H, R, hd = q.shape
    if k_self is None:
        return q.new_empty(B, H, R, hd), q.new_empty(0), q.new_empty(0)
    return q.new_empty(B, H, R, hd), q.new_empty(B, H, R, hd), q.new_empty(B, H, R, hd)


@_fake("ebt_rms_norm_fwd")
def ebt_rms_norm_fwd(x, weight, eps):
    C.rms_norm_args("pyebm::ebt_rms_norm_fwd", x, weight, eps)
    return x.new_empty(x.shape)


@_fake("ebt_rms_norm_bwd")
def ebt_rms_norm_bwd(dy, x, weight, eps):
    C.rms_norm_args("pyebm::ebt_rms_norm_bwd", x, weight, eps)
    C.same("pyebm::ebt_rms_norm_bwd", "dy", dy, x, "x", x.shape)
    return x.new_empty(x.shape)


@_fake("ebt_swiglu_fwd")
def ebt_swiglu_fwd(a, b):
    C.swiglu_args("pyebm::ebt_swiglu_fwd", a, b)
    return a.new_empty(a.shape)


@_fake("ebt_swiglu_bwd")
def ebt_swiglu_bwd(dy, a, b):
    C.swiglu_args("pyebm::ebt_swiglu_bwd", a, b)
    C.same("pyebm::ebt_swiglu_bwd", "dy", dy, a, "a", a.shape)
    return a.new_empty(a.shape), a.new_empty(a.shape)


@_fake("ebt_vocab_embed")
def ebt_vocab_embed(y, w, softmax):
    D, _ = C.vocab_args("pyebm::ebt_vocab_embed", "y", y, w, 1)
    e = y.new_empty(*y.shape[:-1], D)
    return (y.new_empty(y.shape) if softmax else y.new_empty(0)), e


@_fake("ebt_vocab_grad")
def ebt_vocab_grad(ge, w):
    _, V = C.vocab_args("pyebm::ebt_vocab_grad", "ge", ge, w, 0)
    return ge.new_empty(*ge.shape[:-1], V)


# -- Triton: EBT-Policy pieces (pyebm/ops/ebt_policy_triton.py) ---------------------------------------

@_fake("ebt_policy_self_attn_triton")
def ebt_policy_self_attn_triton(qkv, q_weight, k_weight, heads, eps):
    C.policy_self_attn_args("pyebm::ebt_policy_self_attn_triton", qkv, q_weight, k_weight, heads)
    N, T, c3 = qkv.shape
    return qkv.new_empty(N, T, c3 // 3)


@_fake("ebt_policy_self_attn_bwd_triton")
def ebt_policy_self_attn_bwd_triton(grad_out, qkv, q_weight, k_weight, heads, eps):
    op = "pyebm::ebt_policy_self_attn_bwd_triton"
    C.policy_self_attn_args(op, qkv, q_weight, k_weight, heads)
    N, T, c3 = qkv.shape
    C.same(op, "grad_out", grad_out, qkv, "qkv", (N, T, c3 // 3))
    return qkv.new_empty(qkv.shape)


@_fake("ebt_policy_cross_attn_triton")
def ebt_policy_cross_attn_triton(q, q_weight, k_ctx, v_ctx, n_visible, eps):
    C.policy_cross_args("pyebm::ebt_policy_cross_attn_triton", q, q_weight, k_ctx, v_ctx, n_visible)
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


@_fake("ebt_policy_cross_attn_bwd_triton")
def ebt_policy_cross_attn_bwd_triton(grad_out, q, q_weight, k_ctx, v_ctx, n_visible, out, lse, eps):
    op = "pyebm::ebt_policy_cross_attn_bwd_triton"
    C.policy_cross_args(op, q, q_weight, k_ctx, v_ctx, n_visible)
    C.same(op, "grad_out", grad_out, q, "q", q.shape)
    C.same(op, "out", out, q, "q", q.shape)
    C.fp32_aux(op, "lse", lse, q.shape[:3], q, "the forward")
    return q.new_empty(q.shape)


@_fake("ebt_policy_rms_norm_triton")
def ebt_policy_rms_norm_triton(x, weight, eps):
    C.policy_rms_args("pyebm::ebt_policy_rms_norm_triton", x, weight)
    return x.new_empty(x.shape), x.new_empty(x.shape[:-1], dtype=torch.float32)


@_fake("ebt_policy_rms_norm_bwd_triton")
def ebt_policy_rms_norm_bwd_triton(grad_out, x, weight, rstd):
    op = "pyebm::ebt_policy_rms_norm_bwd_triton"
    C.policy_rms_args(op, x, weight)
    C.same(op, "grad_out", grad_out, x, "x", x.shape)
    C.fp32_aux(op, "rstd", rstd, x.shape[:-1], x, "the forward")
    return x.new_empty(x.shape)


@_fake("ebt_policy_gelu_tanh_triton")
def ebt_policy_gelu_tanh_triton(x):
    C.triton_input("pyebm::ebt_policy_gelu_tanh_triton", "x", x)
    return x.new_empty(x.shape)


@_fake("ebt_policy_gelu_tanh_bwd_triton")
def ebt_policy_gelu_tanh_bwd_triton(grad_out, x):
    op = "pyebm::ebt_policy_gelu_tanh_bwd_triton"
    C.triton_input(op, "x", x)
    C.same(op, "grad_out", grad_out, x, "x", x.shape)
    return x.new_empty(x.shape)


# -- random draws from a state tensor (pyebm/ops/rng_draw.py) -----------------------------------------

@_fake("rng_draw")
def rng_draw_(state, seed, kind, shape, count, dtype, device):
    dtype = rng_draw.check("pyebm::rng_draw", state, seed, kind, shape, count, dtype, device)
    n = state.numel() if state is not None else rng_draw.state_size(device)
    return (torch.empty((count,) + tuple(shape), dtype=dtype, device=device),
            torch.empty(n, dtype=torch.uint8, device="cpu"))


@_fake("packed_call")
def packed_call_(target, tensors, spec):
    return packed_call.call(target, tensors, spec)  # the target's own fake checks and shapes
