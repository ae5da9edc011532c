"""The backward of the differentiable ops: their vector-Jacobian products, as ops.

``pyebm::mlp_energy_vjp`` and ``pyebm::ebt_policy_energy_vjp`` (schemas in csrc/ops.cpp) take an op's inputs and
the gradients of its outputs (E and the input gradient G; either may be None) and return the gradient of every
differentiable input. They recompute the reference (``pyebm.reference``) with autograd, so they are slow and
obviously right, and they are registered as CompositeImplicitAutograd: called while a graph is recorded (a
backward with ``create_graph=True``), they record it, so second derivatives (gradients of G) work as well.

The autograd kernels of the fused ops (csrc/cpu/op_autograd.cpp) call them from their backward; the forward runs
the fused kernel. In the pure-Python install (no pyebm._C) the ops are defined in ``pyebm.ops._fallback`` and
their autograd kernels (the same logic, in Python) are registered here, on the same VJPs.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch
from torch import Tensor

from pyebm.ops import _fallback
from pyebm.reference import ebt_policy as ref_policy
from pyebm.reference import mlp_energy as ref_mlp


def vjp(energy: Callable[..., Tensor], inputs: Sequence[Tensor], y_index: int, grad_E: Optional[Tensor],
        grad_G: Optional[Tensor]) -> List[Tensor]:
    """Gradients of ``sum(grad_E * E) + sum(grad_G * dE/dy)`` with respect to every tensor of ``inputs``,
    where ``E = energy(*inputs)`` and y is ``inputs[y_index]``. When this runs under grad mode (a backward
    with create_graph=True), the result is differentiable with respect to the inputs that require grad."""
    create_graph = torch.is_grad_enabled()
    with torch.enable_grad():
        # one graph node per position (view_as), so a tensor passed twice gets each position's share once
        leaves = [t.view_as(t) if (create_graph and t.requires_grad) else t.detach().requires_grad_(True)
                  for t in inputs]
        E = energy(*leaves)
        terms = []
        if grad_E is not None:
            terms.append((E * grad_E).sum())
        if grad_G is not None:
            (G,) = torch.autograd.grad(E.sum(), leaves[y_index], create_graph=True)
            terms.append((G * grad_G).sum())
        if not terms:
            return [torch.zeros_like(t) for t in inputs]
        total = terms[0] if len(terms) == 1 else terms[0] + terms[1]
        grads = torch.autograd.grad(total, leaves, allow_unused=True, create_graph=create_graph)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, grads)]


def mlp_energy_vjp(ctx, y, w_in, weights, biases, w_out, b_out, activation, residual, grad_E, grad_G):
    """(d ctx, d y, d w_in, [d weights], [d biases], d w_out, d b_out) of ``mlp_energy_grad``'s (E, G)."""
    n = len(weights)

    def energy(c, yy, wi, *rest):
        return ref_mlp.mlp_energy(c, yy, wi, list(rest[:n]), list(rest[n:2 * n]), rest[2 * n], rest[2 * n + 1],
                                  activation, residual)

    g = vjp(energy, [ctx, y, w_in, *weights, *biases, w_out, b_out], 1, grad_E, grad_G)
    return g[0], g[1], g[2], g[3:3 + n], g[3 + n:3 + 2 * n], g[3 + 2 * n], g[4 + 2 * n]


def ebt_policy_energy_vjp(y, ctx_k, ctx_v, bias, params, heads, rms_eps, ln_eps, grad_E, grad_G):
    """(d y, d ctx_k, d ctx_v, d bias, [d params]) of ``ebt_policy_energy_grad``'s (E, G)."""

    def energy(yy, ck, cv, bi, *ps):
        return ref_policy.op_energy(yy, ck, cv, bi, list(ps), heads, rms_eps, ln_eps)

    g = vjp(energy, [y, ctx_k, ctx_v, bias, *params], 0, grad_E, grad_G)
    return g[0], g[1], g[2], g[3], g[4:]


_lib = torch.library.Library("pyebm", "IMPL")
if hasattr(torch.ops.pyebm, "mlp_energy_vjp"):
    _lib.impl("mlp_energy_vjp", mlp_energy_vjp, "CompositeImplicitAutograd")
if hasattr(torch.ops.pyebm, "ebt_policy_energy_vjp"):
    _lib.impl("ebt_policy_energy_vjp", ebt_policy_energy_vjp, "CompositeImplicitAutograd")


# -- the pure-Python install: the autograd kernels of the Python-defined ops ------------------------
# What csrc/cpu/op_autograd.cpp does for the compiled ops: without an input that requires grad, straight to the
# implementation (the reference); otherwise an autograd.Function whose backward is the VJP op. (Not
# torch.library.register_autograd: it runs the implementation with autograd excluded, and the reference's
# input gradient is computed with autograd.)

class _MlpEnergyFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, grad, activation, residual, n, c, y, w_in, w_out, b_out, *wb):
        weights, biases = list(wb[:n]), list(wb[n:])
        ctx.save_for_backward(c, y, w_in, w_out, b_out, *wb)
        ctx.n, ctx.activation, ctx.residual, ctx.grad = n, activation, residual, grad
        ctx.set_materialize_grads(False)
        if grad:
            return ref_mlp.mlp_energy_grad(c, y, w_in, weights, biases, w_out, b_out, activation, residual)
        return ref_mlp.mlp_energy(c, y, w_in, weights, biases, w_out, b_out, activation, residual)

    @staticmethod
    def backward(ctx, grad_E, grad_G=None):
        c, y, w_in, w_out, b_out, *wb = ctx.saved_tensors
        n = ctx.n
        g = torch.ops.pyebm.mlp_energy_vjp(c, y, w_in, wb[:n], wb[n:], w_out, b_out, ctx.activation, ctx.residual,
                                           grad_E, grad_G if ctx.grad else None)
        return (None, None, None, None, g[0], g[1], g[2], g[5], g[6], *g[3], *g[4])


def _requires_grad(*ts) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in ts)


def _mlp_autograd(grad: bool):
    op = torch.ops.pyebm.mlp_energy_grad.default if grad else torch.ops.pyebm.mlp_energy.default

    def kernel(keyset, c, y, w_in, weights, biases, w_out, b_out, activation, residual):
        if not _requires_grad(c, y, w_in, w_out, b_out, *weights, *biases):
            return op.redispatch(keyset & torch._C._after_autograd_keyset, c, y, w_in, weights, biases, w_out, b_out,
                                 activation, residual)
        _fallback.check_mlp(grad, c, y, w_in, weights, biases, w_out, b_out, activation)
        return _MlpEnergyFn.apply(grad, activation, residual, len(weights), c, y, w_in, w_out, b_out, *weights,
                                  *biases)
    return kernel


def _dispatch_floor_autograd(keyset, x):
    if _requires_grad(x):
        raise RuntimeError("pyebm::dispatch_floor is an inference op without an autograd formula, and its argument "
                           "'x' requires grad. Call it under torch.no_grad() (or pass detached tensors).")
    return torch.ops.pyebm.dispatch_floor.default.redispatch(keyset & torch._C._after_autograd_keyset, x)


if _fallback.DEFINED:
    _lib.impl("mlp_energy_grad", _mlp_autograd(True), "Autograd", with_keyset=True)
    _lib.impl("mlp_energy", _mlp_autograd(False), "Autograd", with_keyset=True)
    _lib.impl("dispatch_floor", _dispatch_floor_autograd, "Autograd", with_keyset=True)
