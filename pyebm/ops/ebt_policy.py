"""The fused EBT-Policy energy op: the whole network's forward and input gradient in one call.

``torch.ops.pyebm.ebt_policy_energy_grad(y, ctx_k, ctx_v, bias, params, weights_t, heads, rms_eps, ln_eps,
need_grad)``
returns ``(E [B, K], dE/dy [B, K, T, A])`` (the gradient is an empty tensor when ``need_grad`` is False).
y [B, K, T, A]; ctx_k [layers, B, H, hd, L] (observation keys after their RMSNorm, times hd^-0.5,
transposed); ctx_v [layers, B, H, L, hd]; bias [T, L] (0 allowed, -inf masked). ``params`` is the flat
list below (``param_list``); ``weights_t`` is empty or holds contiguous transposes [in, out] of the
forward GEMMs' weights (``transposed_weights``: embedding fc2, per layer qkv, proj, cross q, cross proj,
mlp fc1, mlp fc2, then head fc1, head fc2), which spare the BLAS its packing of a transposed operand
(about a third of a 16-row product). The math is ``pyebm.reference.ebt_policy``.

    embedding   fc1.w [D, A], fc1.b, norm.w, norm.b (LayerNorm), fc2.w [D, D], fc2.b, positions [T, D]
    per layer   norm1.w, qkv.w [3D, D], qkv.b, q_norm.w [hd], k_norm.w [hd], proj.w, proj.b,
                norm2.w, cross.q.w, cross.q.b, cross.q_norm.w [hd], cross.proj.w (no bias),
                norm3.w, mlp.fc1.w, mlp.fc1.b, mlp.fc2.w, mlp.fc2.b                        (17 tensors)
    head        norm.w, fc1.w [D, D], fc1.b, fc2.w [O, D], fc2.b [O]

Two more CPU ops share the network code: ``ebt_policy_descent`` (every step of ``pyebm.minimize`` on this
energy in one call; ``final_energy=False`` skips the final energy pass) and ``ebt_policy_context`` (the
observation side of ``EBTPolicy.prepare``: ``(ctx_k, ctx_v)`` from the tokens and the stacked
cross-attention key/value weights).

``ebt_policy_energy_grad`` is differentiable in y, ctx_k, ctx_v, bias and params (a registered formula: the
backward recomputes ``pyebm.reference.ebt_policy.op_energy`` with autograd); ``weights_t`` must not require grad.
``ebt_policy_descent`` and ``ebt_policy_context`` are inference ops: with grad mode on and an input that requires
grad they raise. Every op checks each tensor's shape, dtype, device and layout before the kernel reads it; the
fakes (``pyebm.ops._fake``) run the same checks. Backends: ``cpu`` (C++ in pyebm._C); everything else runs the
model's own batched PyTorch path.
"""
from __future__ import annotations

from typing import List, Tuple

import torch

from pyebm import _backend

OP_NAME = "ebt_policy_energy_grad"


def available() -> bool:
    """Whether the compiled op is registered (the extension is built and includes it)."""
    return _backend.ext() is not None and hasattr(torch.ops.pyebm, OP_NAME)


def descent_available() -> bool:
    """Whether the compiled whole-loop op ``ebt_policy_descent`` is registered."""
    return available() and hasattr(torch.ops.pyebm, "ebt_policy_descent")


def context_available() -> bool:
    """Whether the compiled observation-side op ``ebt_policy_context`` is registered."""
    return available() and hasattr(torch.ops.pyebm, "ebt_policy_context")


def param_list(model) -> List[torch.Tensor]:
    """The parameters of an ``EBTPolicy`` in the op's order."""
    e, h = model.embed, model.head
    out = [e.fc1.weight, e.fc1.bias, e.norm.weight, e.norm.bias, e.fc2.weight, e.fc2.bias, model.pos_emb]
    for b in model.blocks:
        out += [b.norm1.weight, b.attn.qkv.weight, b.attn.qkv.bias, b.attn.q_norm.weight, b.attn.k_norm.weight,
                b.attn.proj.weight, b.attn.proj.bias, b.norm2.weight, b.cross.q.weight, b.cross.q.bias,
                b.cross.q_norm.weight, b.cross.proj.weight, b.norm3.weight, b.mlp.fc1.weight, b.mlp.fc1.bias,
                b.mlp.fc2.weight, b.mlp.fc2.bias]
    out += [h.norm.weight, h.fc1.weight, h.fc1.bias, h.fc2.weight, h.fc2.bias]
    return [t.detach() for t in out]


def transposed_sources(params: List[torch.Tensor]) -> List[torch.Tensor]:
    """The forward GEMMs' weights of ``params``, in the op's ``weights_t`` order."""
    layers = (len(params) - 7 - 5) // 17
    idx = [4]
    for l in range(layers):
        idx += [7 + 17 * l + j for j in (1, 5, 8, 11, 13, 15)]
    idx += [7 + 17 * layers + 1, 7 + 17 * layers + 3]
    return [params[i] for i in idx]


def transposed_weights(params: List[torch.Tensor]) -> List[torch.Tensor]:
    """Contiguous transposes of the forward GEMMs' weights, in the op's ``weights_t`` order."""
    return [w.t().contiguous() for w in transposed_sources(params)]


def ebt_policy_energy_grad(y: torch.Tensor, ctx_k: torch.Tensor, ctx_v: torch.Tensor, bias: torch.Tensor,
                           params: List[torch.Tensor], weights_t: List[torch.Tensor], heads: int, rms_eps: float,
                           ln_eps: float, need_grad: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """Call the compiled op (CPU tensors, float32/float64)."""
    return torch.ops.pyebm.ebt_policy_energy_grad(y, ctx_k, ctx_v, bias, params, weights_t, heads, rms_eps,
                                                  ln_eps, need_grad)
