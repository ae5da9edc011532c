"""Reference EBT-Policy: the energy transformer over an action chunk and its inference loop.

Plain PyTorch and autograd, written to be read next to the public EBT-Policy code, not to be fast:
the observation side (cross-attention keys and values) is recomputed on every call, the action
normalisation couples the whole batch (as the original does), and the loop reads ||g|| on the host
after every step.

Energy network (every RMSNorm has a weight and eps 1e-6; GELU is the tanh approximation)::

    a [B, T, A] -> Linear(A, D) -> LayerNorm -> GELU -> Linear(D, D) -> GELU -> + sin-cos(T, D)
    per block:  x += SelfAttn(RMSNorm(x))              qkv bias, RMSNorm on q and k per head, no mask
                x += CrossAttn(RMSNorm(x), obs tokens) qk RMSNorm, temporal memory mask, no out bias
                x += MLP(RMSNorm(x))                   Linear(D, D) -> GELU -> Linear(D, D)
    head:       RMSNorm -> Linear(D, D) -> GELU -> Linear(D, O)
    E = mean over (T, O) of the head output                                            [B]

Temporal memory mask (True = allowed): action token t sees observation token j iff
``t >= j // tokens_per_step`` with ``tokens_per_step = L // n_obs_steps``.

Parameters are a mapping with the names of :class:`pyebm.models.EBTPolicy` (``model.state_dict()``).

Inference loop (``act``), from a0 ~ N(0, I) and v = 0, each step::

    a = rms_norm(a)                       # over the whole [B, T, A] tensor ("batch") or per sample
    a = a + noise * xi                    # only when noise != 0
    look = a + mu * v                     # Nesterov look-ahead
    E = energy(look);  g = dE/dlook
    v = mu * v - alpha * exp(E) / T_alpha * g
    a = a + v
It repeats while ``step < max_steps - 1 and ||g|| > min_grad`` (||g|| over the whole batch), then takes
one final step; the executed window is ``a[:, n_obs_steps - 1 : n_obs_steps - 1 + n_action_steps]``.
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F

RMS_EPS = 1e-6
LAYER_NORM_EPS = 1e-5


def sincos_positions(horizon: int, dim: int, dtype: torch.dtype = torch.float32,
                     device: Optional[torch.device] = None) -> torch.Tensor:
    """Fixed 1-D sin-cos table [horizon, dim]: first half sin(t * w_i), second half cos(t * w_i),
    w_i = 10000^(-i / (dim / 2)). Computed in float64, then cast."""
    if dim % 2 != 0:
        raise ValueError(f"embed_dim must be even for sin-cos positions; got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64, device=device) / (dim / 2.0)
    omega = 1.0 / 10000 ** omega
    angles = torch.outer(torch.arange(horizon, dtype=torch.float64, device=device), omega)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1).to(dtype)


def memory_mask(horizon: int, n_tokens: int, n_obs_steps: int,
                device: Optional[torch.device] = None) -> torch.Tensor:
    """Cross-attention mask [horizon, n_tokens], True = allowed: t >= j // tokens_per_step."""
    if n_tokens % n_obs_steps != 0:
        raise ValueError(f"the number of observation tokens ({n_tokens}) must be a multiple of "
                         f"n_obs_steps ({n_obs_steps})")
    per_step = n_tokens // n_obs_steps
    rows = torch.arange(horizon, device=device).unsqueeze(1)
    cols = torch.arange(n_tokens, device=device)
    return rows >= cols // per_step


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = RMS_EPS) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def _linear(p: Mapping[str, torch.Tensor], name: str, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, p[name + ".weight"], p.get(name + ".bias"))


def _heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, N, D] -> [B, H, N, D / H]."""
    B, N, D = x.shape
    return x.reshape(B, N, num_heads, D // num_heads).transpose(1, 2)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            allowed: Optional[torch.Tensor]) -> torch.Tensor:
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if allowed is not None:
        scores = scores.masked_fill(allowed.logical_not(), float("-inf"))
    out = scores.softmax(dim=-1) @ v                       # [B, H, N, hd]
    B, H, N, hd = out.shape
    return out.transpose(1, 2).reshape(B, N, H * hd)


def energy_tokens(params: Mapping[str, torch.Tensor], actions: torch.Tensor, cond: torch.Tensor,
                  allowed: Optional[torch.Tensor], num_heads: int) -> torch.Tensor:
    """Head output [B, T, O] for actions [B, T, A] and observation tokens cond [B, L, C]."""
    p = params
    D = p["embed.fc2.weight"].shape[0]
    n_layers = len({k.split(".")[1] for k in p if k.startswith("blocks.")})
    h = _linear(p, "embed.fc1", actions)
    h = F.layer_norm(h, (D,), p["embed.norm.weight"], p["embed.norm.bias"], LAYER_NORM_EPS)
    x = gelu(_linear(p, "embed.fc2", gelu(h))) + p["pos_emb"]
    for i in range(n_layers):
        b = f"blocks.{i}."
        # bidirectional self-attention over the action tokens
        q, k, v = _linear(p, b + "attn.qkv", rms_norm(x, p[b + "norm1.weight"])).chunk(3, dim=-1)
        q = rms_norm(_heads(q, num_heads), p[b + "attn.q_norm.weight"])
        k = rms_norm(_heads(k, num_heads), p[b + "attn.k_norm.weight"])
        x = x + _linear(p, b + "attn.proj", _attend(q, k, _heads(v, num_heads), None))
        # cross-attention to the observation tokens (keys and values recomputed here every call)
        q = _linear(p, b + "cross.q", rms_norm(x, p[b + "norm2.weight"]))
        k, v = _linear(p, b + "cross.kv", cond).chunk(2, dim=-1)
        q = rms_norm(_heads(q, num_heads), p[b + "cross.q_norm.weight"])
        k = rms_norm(_heads(k, num_heads), p[b + "cross.k_norm.weight"])
        x = x + _linear(p, b + "cross.proj", _attend(q, k, _heads(v, num_heads), allowed))
        # MLP
        x = x + _linear(p, b + "mlp.fc2", gelu(_linear(p, b + "mlp.fc1", rms_norm(x, p[b + "norm3.weight"]))))
    h = gelu(_linear(p, "head.fc1", rms_norm(x, p["head.norm.weight"])))
    return _linear(p, "head.fc2", h)


def energy(params: Mapping[str, torch.Tensor], actions: torch.Tensor, cond: torch.Tensor, *,
           num_heads: int, n_obs_steps: int) -> torch.Tensor:
    """E [B] = mean over (T, O) of the head output; actions [B, T, A], cond [B, L, C]."""
    allowed = memory_mask(actions.shape[1], cond.shape[1], n_obs_steps, device=actions.device)
    return energy_tokens(params, actions, cond, allowed, num_heads).mean(dim=(-1, -2))


def energy_grad(params: Mapping[str, torch.Tensor], actions: torch.Tensor, cond: torch.Tensor, *,
                num_heads: int, n_obs_steps: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(E [B], dE/dactions [B, T, A]) by autograd."""
    with torch.enable_grad():
        a = actions.detach().requires_grad_(True)
        E = energy(params, a, cond, num_heads=num_heads, n_obs_steps=n_obs_steps)
        (g,) = torch.autograd.grad(E.sum(), a)
    return E.detach(), g


def normalize(a: torch.Tensor, mode: str) -> torch.Tensor:
    """RMS normalisation without weight, eps = finfo(dtype).eps: over the whole tensor ("batch", the
    original's form, which couples the samples of a batch) or over each sample's [T, A] ("sample")."""
    if mode == "batch":
        return F.rms_norm(a, a.shape)
    if mode == "sample":
        return F.rms_norm(a, a.shape[1:])
    if mode == "none":
        return a
    raise ValueError(f"normalize must be 'batch', 'sample' or 'none'; got {mode!r}")


def act(params: Mapping[str, torch.Tensor], cond: torch.Tensor, init: torch.Tensor, *, num_heads: int,
        n_obs_steps: int, n_action_steps: int, alpha: float = 1000.0, temperature: float = 9.0,
        momentum: float = 0.9, min_grad: float = 1e-3, max_steps: int = 20, noise: float = 0.0,
        normalize_mode: str = "batch", generator: Optional[torch.Generator] = None
        ) -> Tuple[torch.Tensor, Dict[str, object]]:
    """The original inference loop for one chain per observation.

    cond [B, L, C] observation tokens, init [B, T, A] (the original draws it from N(0, I)).
    Returns (actions [B, n_action_steps, A], info) with info["trajectory"] the full final chunk
    [B, T, A], info["steps"] the number of energy evaluations, info["energy"] [B] the last energies
    (at the look-ahead point) and info["grad_norms"] the host-side norms read after each step.
    """
    alpha_eff = max(float(alpha), 1e-4)           # the original clamps its alpha at 1e-4
    a = init.detach().clone()
    v = torch.zeros_like(a)
    grad_norms = []

    def step(a: torch.Tensor, v: torch.Tensor):
        a = normalize(a, normalize_mode)
        if noise != 0.0:
            a = a + noise * torch.randn(a.shape, generator=generator, device=a.device, dtype=a.dtype)
        look = a + momentum * v
        # the observation side is recomputed inside every energy call
        E, g = energy_grad(params, look, cond, num_heads=num_heads, n_obs_steps=n_obs_steps)
        if not bool(torch.isfinite(g).all()):
            raise ValueError("NaN or Inf gradients detected during descent")
        step_size = alpha_eff * torch.exp(E)[:, None, None] / temperature
        v = momentum * v - step_size * g
        return a + v, v, g, E

    i = 0
    gnorm = float("inf")
    while i < max_steps - 1 and gnorm > min_grad:
        a, v, g, E = step(a, v)
        gnorm = g.norm().item()                   # host sync every step, as the original
        grad_norms.append(gnorm)
        i += 1
    a, v, g, E = step(a, v)
    start = n_obs_steps - 1
    info = {"trajectory": a, "steps": i + 1, "energy": E, "grad_norms": grad_norms, "last_grad": g}
    return a[:, start:start + n_action_steps], info


# -- the fused ops' signatures (pyebm.ops.ebt_policy) -------------------------------------------------

def op_context(obs: torch.Tensor, w: torch.Tensor, b: torch.Tensor, k_norm: torch.Tensor, heads: int,
               rms_eps: float = RMS_EPS) -> Tuple[torch.Tensor, torch.Tensor]:
    """``torch.ops.pyebm.ebt_policy_context``: from tokens obs [B, L, C], the stacked cross-attention key/value
    weights w [layers * 2D, C] (per layer: D key rows, then D value rows), b [layers * 2D] and key norms
    k_norm [layers, hd], the keys after their RMSNorm times hd^-0.5, transposed, [layers, B, H, hd, L], and the
    values [layers, B, H, L, hd]."""
    layers, hd = k_norm.shape
    B, L, _ = obs.shape
    D = heads * hd
    kv = F.linear(obs, w, b).view(B, L, layers, 2, heads, hd)
    k = rms_norm(kv[:, :, :, 0], k_norm[:, None, :], rms_eps) * hd ** -0.5       # [B, L, layers, H, hd]
    v = kv[:, :, :, 1]
    return k.permute(2, 0, 3, 4, 1), v.permute(2, 0, 3, 1, 4)


def op_energy(y: torch.Tensor, ctx_k: torch.Tensor, ctx_v: torch.Tensor, bias: torch.Tensor, params,
              heads: int, rms_eps: float = RMS_EPS, ln_eps: float = LAYER_NORM_EPS) -> torch.Tensor:
    """E [B, K] of ``torch.ops.pyebm.ebt_policy_energy_grad`` for candidates y [B, K, T, A].

    ctx_k [layers, B, H, hd, L] and ctx_v [layers, B, H, L, hd] are the observation side (``op_context``),
    bias [T, L] is added to the cross-attention scores (0 allowed, -inf masked), and ``params`` is the flat
    list of ``pyebm.ops.ebt_policy.param_list`` (embedding 7, 17 per layer, head 5). The same network as
    ``energy_tokens``, with the observation keys and values given instead of computed.
    """
    p = list(params)
    B, K, T, A = y.shape
    layers = (len(p) - 12) // 17
    D = p[0].shape[0]
    hd = D // heads
    h = F.linear(y.reshape(B * K, T, A), p[0], p[1])
    h = F.layer_norm(h, (D,), p[2], p[3], ln_eps)
    x = gelu(F.linear(gelu(h), p[4], p[5])) + p[6]
    for l in range(layers):
        (n1, wqkv, bqkv, qn, kn, wp, bp, n2, wxq, bxq, xqn, wxp, n3, wf1, bf1, wf2,
         bf2) = p[7 + 17 * l: 7 + 17 * (l + 1)]
        q, k, v = F.linear(rms_norm(x, n1, rms_eps), wqkv, bqkv).chunk(3, dim=-1)
        q = rms_norm(_heads(q, heads), qn, rms_eps)
        k = rms_norm(_heads(k, heads), kn, rms_eps)
        x = x + F.linear(_attend(q, k, _heads(v, heads), None), wp, bp)
        # cross-attention: the K candidates of context b against its cached keys (already scaled) and values
        q = rms_norm(_heads(F.linear(rms_norm(x, n2, rms_eps), wxq, bxq), heads), xqn, rms_eps)
        q = q.reshape(B, K, heads, T, hd)
        s = torch.einsum("bkhtd,bhdl->bkhtl", q, ctx_k[l]) + bias
        o = s.softmax(dim=-1) @ ctx_v[l].unsqueeze(1)                  # [B, K, H, T, hd]
        x = x + F.linear(o.reshape(B * K, heads, T, hd).transpose(1, 2).reshape(B * K, T, D), wxp)
        x = x + F.linear(gelu(F.linear(rms_norm(x, n3, rms_eps), wf1, bf1)), wf2, bf2)
    hn, hw1, hb1, hw2, hb2 = p[-5:]
    out = F.linear(gelu(F.linear(rms_norm(x, hn, rms_eps), hw1, hb1)), hw2, hb2)
    return out.mean(dim=(-1, -2)).reshape(B, K)
