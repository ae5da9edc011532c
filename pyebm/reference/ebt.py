"""Reference autoregressive Energy-Based Transformer (EBT) for language: energies and inference.

This is the plain version of the published EBT algorithm, written to be read and to be the ground
truth for ``pyebm.models.EBT``. It recomputes the whole prompt and every prediction position at every
step and runs the G self-verification samples one after another, exactly as the original code does.
Nothing is cached.

Parameters are a mapping with the original model's state-dict keys (``embeddings.weight``,
``vocab_to_embed.weight``, ``transformer.layers.{i}.attention.wq.weight``, ...), so a state dict saved
from the original model, or ``dict(pyebm.models.EBT(...).named_parameters())``, can be passed directly.

The model. Real tokens t_0..t_{S-1} are embedded; the candidate for the token after t_i is a vector
p_i over the vocabulary (a probability vector after the softmax), embedded as ``p_i @ W_v2e^T``
(``vocab_to_embed``, ``Linear(V, D, bias=False)``) or ``p_i @ embeddings.weight`` when
``vocab_to_embed_uses_prob_dist``. Llama-2 blocks (pre-RMSNorm, SwiGLU with hidden D, RoPE on
interleaved pairs) run over two streams:

* the context stream: the real tokens (``time_embed``: a time token ``time_embeddings[landscape]``
  first), ordinary causal self-attention, RoPE position = index in the stream;
* the prediction stream: prediction i attends to context entries 0..i (``time_embed``: 0..i+1, the
  time token and real tokens 0..i) and to itself, in one softmax; its RoPE position is i+1
  (``time_embed``: i+2). Predictions never see each other, so energies of different positions are
  independent.

Final RMSNorm and ``Linear(D, 1, bias=False)`` on each prediction row give one energy per position.

Inference (the original ``ebt_advanced_inference``), per step with step size alpha and noise sigma::

    y~ = y + sigma * xi                 (xi ~ N(0, I); skipped when sigma == 0)
    p  = softmax(y~)                    (``normalize_initial_condition``; otherwise p = y~)
    E  = energy(p);  g = dE/dp          (the gradient w.r.t. the probabilities, not the logits)
    g  = clamp(g, -c/alpha, c/alpha)    (optional)
    y  = p - alpha * g                  (accept-lower: per position, only where E(y) < E(p), else p)

``default`` runs ``steps`` steps; ``time_embed`` visits the ``mcmc_num_steps`` landscapes in order with
``steps`` steps each. Then one noise-free energy pass on the last landscape, and per position the sample
with the ``min`` / ``max`` final energy or the ``max_gap`` (first-step energy minus final energy) wins.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F

ACTIVATIONS = {
    "silu": F.silu,
    "relu": F.relu,
    "gelu": F.gelu,
    "elu": F.elu,
}
SELECT_MODES = ("min", "max", "max_gap")
EBT_TYPES = ("default", "time_embed")


@dataclass(frozen=True)
class EBTConfig:
    """The hyperparameters the math depends on (names as in the original training configuration)."""

    vocab_size: int
    embedding_dim: int
    num_transformer_blocks: int
    multiheaded_attention_heads: int
    context_length: int
    ebt_type: str = "default"
    mcmc_num_steps: int = 2
    ffn_dim_multiplier: Optional[float] = None
    vocab_to_embed_uses_prob_dist: bool = False
    normalize_initial_condition: bool = True
    ebt_act_func: str = "silu"
    norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.embedding_dim // self.multiheaded_attention_heads

    @property
    def ffn_hidden(self) -> int:
        d = self.embedding_dim
        return d if self.ffn_dim_multiplier is None else int(d * self.ffn_dim_multiplier)

    @property
    def offset(self) -> int:
        """Number of context-stream entries before real token 0 (the time token)."""
        return 1 if self.ebt_type == "time_embed" else 0

    @property
    def num_landscapes(self) -> int:
        return self.mcmc_num_steps if self.ebt_type == "time_embed" else 1


# -- building blocks --------------------------------------------------------------------------------

def rope_tables(head_dim: int, end: int, dtype: torch.dtype = torch.float32,
                device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [end, head_dim // 2] of angle pos * theta^(-2k/head_dim), theta = 10000.

    In fp32 the angles are formed in fp32, as the original does; in fp64 they are exact to fp64.
    """
    work = torch.float64 if dtype == torch.float64 else torch.float32
    freqs = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, device=device)[: head_dim // 2].to(work) / head_dim))
    ang = torch.outer(torch.arange(end, device=device).to(work), freqs)
    return torch.cos(ang).to(dtype), torch.sin(ang).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2k], x[2k+1]) of x [..., T, H, hd] by the angles of cos/sin [T, hd/2]."""
    xr = x.reshape(*x.shape[:-1], -1, 2)
    x0, x1 = xr[..., 0], xr[..., 1]
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _check_config(cfg: EBTConfig) -> None:
    if cfg.ebt_type not in EBT_TYPES:
        raise ValueError(f"ebt_type must be one of {EBT_TYPES}; got {cfg.ebt_type!r}")
    if cfg.ebt_act_func not in ACTIVATIONS:
        raise ValueError(f"ebt_act_func must be one of {sorted(ACTIVATIONS)}; got {cfg.ebt_act_func!r}")


def prediction_attention(q: torch.Tensor, k_ctx: torch.Tensor, v_ctx: torch.Tensor,
                         k_self: Optional[torch.Tensor] = None, v_self: Optional[torch.Tensor] = None,
                         n_visible: Optional[torch.Tensor] = None) -> torch.Tensor:
    """EBT prediction attention: row r of q [B, H, R, hd] attends, in one softmax, to the first
    n_visible[r] entries of k_ctx/v_ctx [B, H, T, hd] and to its own k_self/v_self [B, H, R, hd].

    q carries the 1/sqrt(hd) factor. n_visible is [R] or [B, R] (None: all T). Without a self key/value
    it is plain cross-attention with a visible prefix per row; a row that sees nothing gives 0.
    """
    T = k_ctx.shape[2]
    s = q @ k_ctx.transpose(-1, -2)                                   # [B, H, R, T]
    if n_visible is not None:
        nv = n_visible if n_visible.dim() == 2 else n_visible[None, :]
        hidden = torch.arange(T, device=q.device)[None, None, :] >= nv[:, :, None]   # [B or 1, R, T]
        s = s.masked_fill(hidden[:, None], float("-inf"))
    if k_self is not None:
        s = torch.cat((s, (q * k_self).sum(-1, keepdim=True)), dim=-1)
    a = torch.softmax(s.float(), dim=-1).nan_to_num(0.0).to(q.dtype)  # all-hidden rows: 0
    o = a[..., :T] @ v_ctx
    if k_self is not None:
        o = o + a[..., T:] * v_self
    return o


def rows_attention(qkv: torch.Tensor, k_ctx: torch.Tensor, v_ctx: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor, n_visible: Optional[torch.Tensor] = None) -> torch.Tensor:
    """What ``pyebm::ebt_rows_attention`` computes: prediction attention of rows given as q|k|v before RoPE.

    qkv [B, R, 3, H, hd] (q scaled by 1/sqrt(hd)); the RoPE tables of the rows in the interleaved layout of
    pyebm.models.ebt, cos [R, hd] (cos of each pair's angle, twice) and sin [R, hd] (-sin, sin per pair); the
    cache k_ctx / v_ctx [B, H, T, hd]. Returns o [B, R, H * hd].
    """
    B, R, _, H, hd = qkv.shape
    c, s = cos[:, 0::2], sin[:, 1::2]                                       # [R, hd/2]
    q, k = apply_rope(qkv[:, :, 0], c, s), apply_rope(qkv[:, :, 1], c, s)   # [B, R, H, hd]
    o = prediction_attention(q.transpose(1, 2), k_ctx, v_ctx, k.transpose(1, 2), qkv[:, :, 2].transpose(1, 2),
                             n_visible)
    return o.transpose(1, 2).reshape(B, R, H * hd)


# -- the energy ----------------------------------------------------------------------------------

def embed_predictions(params: Mapping[str, torch.Tensor], cfg: EBTConfig, p: torch.Tensor) -> torch.Tensor:
    """Vocabulary-space candidates p [..., V] -> embeddings [..., D]."""
    if cfg.vocab_to_embed_uses_prob_dist:
        return p @ params["embeddings.weight"]
    return p @ params["vocab_to_embed.weight"].t()


def transformer_energies(params: Mapping[str, torch.Tensor], cfg: EBTConfig, real: torch.Tensor,
                         pred: torch.Tensor, landscape: int = 0) -> torch.Tensor:
    """Energies [B, S] of prediction embeddings pred [B, S, D] after real token embeddings real [B, S, D]."""
    _check_config(cfg)
    B, S, D = real.shape
    H, hd, off = cfg.multiheaded_attention_heads, cfg.head_dim, cfg.offset
    act = ACTIVATIONS[cfg.ebt_act_func]
    ctx = real
    if cfg.ebt_type == "time_embed":
        t = params["transformer.time_embeddings.weight"][landscape]
        ctx = torch.cat((t.expand(B, 1, D), real), dim=1)
    T = ctx.shape[1]  # context-stream length S + off
    cos, sin = rope_tables(hd, T + 1, real.dtype, real.device)
    i = torch.arange(S, device=real.device)
    j = torch.arange(T, device=real.device)
    causal = j[None, :] <= j[:, None]               # context entry a sees context entries 0..a
    pred_sees = j[None, :] <= (i[:, None] + off)    # prediction i sees context entries 0..i+off
    scale = 1.0 / math.sqrt(hd)
    for li in range(cfg.num_transformer_blocks):
        pre = f"transformer.layers.{li}."
        W = lambda name: params[pre + name]  # noqa: E731

        def qkv(x):
            a = rms_norm(x, W("attention_norm.weight"), cfg.norm_eps)
            return [(a @ W(f"attention.{n}.weight").t()).reshape(B, x.shape[1], H, hd) for n in ("wq", "wk", "wv")]

        qc, kc, vc = qkv(ctx)
        qp, kp, vp = qkv(pred)
        qc, kc = apply_rope(qc, cos[:T], sin[:T]), apply_rope(kc, cos[:T], sin[:T])
        qp, kp = apply_rope(qp, cos[1 + off:S + 1 + off], sin[1 + off:S + 1 + off]), \
            apply_rope(kp, cos[1 + off:S + 1 + off], sin[1 + off:S + 1 + off])
        qc, kc, vc, qp, kp, vp = (t.transpose(1, 2) for t in (qc, kc, vc, qp, kp, vp))  # [B, H, *, hd]

        # Context stream: causal softmax attention.
        s = (qc @ kc.transpose(-1, -2)) * scale
        s = s.masked_fill(~causal, float("-inf"))
        oc = torch.softmax(s, dim=-1) @ vc
        # Prediction stream: one softmax over (visible context entries, itself).
        s_ctx = ((qp @ kc.transpose(-1, -2)) * scale).masked_fill(~pred_sees, float("-inf"))
        s_self = (qp * kp).sum(-1, keepdim=True) * scale
        a = torch.softmax(torch.cat((s_ctx, s_self), dim=-1), dim=-1)
        op = a[..., :T] @ vc + a[..., T:] * vp

        def finish(x, o):
            h = x + o.transpose(1, 2).reshape(B, x.shape[1], D) @ W("attention.wo.weight").t()
            f = rms_norm(h, W("ffn_norm.weight"), cfg.norm_eps)
            m = act(f @ W("feed_forward.w1.weight").t()) * (f @ W("feed_forward.w3.weight").t())
            return h + m @ W("feed_forward.w2.weight").t()

        ctx, pred = finish(ctx, oc), finish(pred, op)
    n = rms_norm(pred, params["transformer.norm.weight"], cfg.norm_eps)
    return n @ params["transformer.final_layer.weight"].reshape(-1)


def energy(params: Mapping[str, torch.Tensor], cfg: EBTConfig, tokens: torch.Tensor, predictions: torch.Tensor,
           landscape: int = 0) -> torch.Tensor:
    """E [B, S]: energy of the vocabulary-space candidate predictions [B, S, V] after tokens [B, S]."""
    real = params["embeddings.weight"][tokens]
    return transformer_energies(params, cfg, real, embed_predictions(params, cfg, predictions), landscape)


def energy_grad(params: Mapping[str, torch.Tensor], cfg: EBTConfig, tokens: torch.Tensor,
                predictions: torch.Tensor, landscape: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """(E [B, S], dE/dpredictions [B, S, V]) by autograd."""
    with torch.enable_grad():
        p = predictions.detach().requires_grad_(True)
        e = energy(params, cfg, tokens, p, landscape)
        (g,) = torch.autograd.grad(e.sum(), p)
    return e.detach(), g


# -- inference -----------------------------------------------------------------------------------

def step_schedule(cfg: EBTConfig, steps: Optional[int]):
    """Landscape index of every step: ``default`` steps in total, ``time_embed`` steps per landscape."""
    if cfg.ebt_type == "default":
        n = cfg.mcmc_num_steps if steps is None else steps
        return list(range(n))  # the index is only a step counter here; the default energy ignores it
    n = 1 if steps is None else steps
    return [l for l in range(cfg.mcmc_num_steps) for _ in range(n)]


def _select(final: torch.Tensor, initial: torch.Tensor, select: str) -> torch.Tensor:
    """Index [B, S] of the chosen sample from energies [B, G, S].

    ``min`` / ``max`` final energy or ``max_gap`` (initial - final). A sample whose score is NaN is never
    preferred to a finite one (the original would raise on a non-finite gradient instead).
    """
    if select == "min":
        score = -final
    elif select == "max":
        score = final
    elif select == "max_gap":
        score = initial - final
    else:
        raise ValueError(f"select must be one of {SELECT_MODES}; got {select!r}")
    return torch.nan_to_num(score, nan=float("-inf")).argmax(dim=1)


def think(params: Mapping[str, torch.Tensor], cfg: EBTConfig, tokens: torch.Tensor, init: torch.Tensor,
          steps: Optional[int] = None, alpha: float = 60.0, noise: float = 0.0, select: str = "min",
          accept_lower: bool = False, grad_clamp: Optional[float] = None,
          generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
    """Optimise the predictions of every position of tokens [B, S] from init [B, G, S, V].

    Returns ``logits`` [B, S, V] (the chosen sample's optimised vector), ``energy`` and
    ``initial_energy`` [B, S] of the chosen sample, ``sample`` [B, S] (its index), ``energies``
    [B, G, n_steps + 1, S] (every step's energy and the final pass, for every sample) and
    ``all_logits`` [B, G, S, V] (every sample's optimised vector).
    """
    if select not in SELECT_MODES:
        raise ValueError(f"select must be one of {SELECT_MODES}; got {select!r}")
    B, G, S, V = init.shape
    schedule = step_schedule(cfg, steps)
    final_landscape = cfg.num_landscapes - 1
    finals, trace = [], []
    for g in range(G):  # the samples run one after another, each recomputing everything
        y = init[:, g]
        energies = []
        for landscape in schedule:
            if noise != 0:
                y = y + noise * torch.randn(y.shape, generator=generator, dtype=y.dtype, device=y.device)
            p = torch.softmax(y, dim=-1) if cfg.normalize_initial_condition else y
            e, grad = energy_grad(params, cfg, tokens, p, landscape)
            energies.append(e)
            if grad_clamp is not None:
                grad = grad.clamp(-grad_clamp / alpha, grad_clamp / alpha)
            proposal = p - alpha * grad
            if accept_lower:
                p_new = torch.softmax(proposal, dim=-1) if cfg.normalize_initial_condition else proposal
                with torch.no_grad():
                    e_new = energy(params, cfg, tokens, p_new, landscape)
                y = torch.where((e_new < e).unsqueeze(-1), proposal, p)
            else:
                y = proposal
        p = torch.softmax(y, dim=-1) if cfg.normalize_initial_condition else y
        with torch.no_grad():
            energies.append(energy(params, cfg, tokens, p, final_landscape))
        finals.append(y)
        trace.append(torch.stack(energies, dim=1))
    y_all = torch.stack(finals, dim=1)          # [B, G, S, V]
    trace = torch.stack(trace, dim=1)           # [B, G, n_steps + 1, S]
    final, initial = trace[:, :, -1], trace[:, :, 0]
    idx = _select(final, initial, select) if G > 1 else torch.zeros(B, S, dtype=torch.long, device=init.device)
    b = torch.arange(B, device=init.device)[:, None]
    s = torch.arange(S, device=init.device)[None, :]
    return {"logits": y_all[b, idx, s], "energy": final[b, idx, s], "initial_energy": initial[b, idx, s],
            "sample": idx, "energies": trace, "all_logits": y_all}


def sample_top_p(probs: torch.Tensor, top_p: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p, renormalise, draw."""
    sorted_p, order = torch.sort(probs, dim=-1, descending=True)
    keep = (sorted_p.cumsum(-1) - sorted_p) <= top_p
    sorted_p = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
    sorted_p = sorted_p / sorted_p.sum(-1, keepdim=True)
    pick = torch.multinomial(sorted_p, 1, generator=generator)
    return torch.gather(order, -1, pick).squeeze(-1)


def generate(params: Mapping[str, torch.Tensor], cfg: EBTConfig, tokens: torch.Tensor, max_new_tokens: int,
             init: torch.Tensor, temperature: float = 0.0, top_p: float = 0.9,
             generator: Optional[torch.Generator] = None, **think_options) -> torch.Tensor:
    """Append max_new_tokens tokens to tokens [B, S] -> [B, S + max_new_tokens].

    init [B, G, max_new_tokens, V] is the starting vector of the predicted (last) position for each new
    token; the other positions start from N(0, 1) noise as in the original (they do not affect the
    last position). Every token reruns ``think`` on the whole sequence, as the original does.
    """
    B, G, N, V = init.shape
    filler = torch.Generator(device=init.device).manual_seed(0)
    out = tokens
    for t in range(max_new_tokens):
        S = out.shape[1]
        start = torch.randn((B, G, S, V), generator=filler, dtype=init.dtype, device=init.device)
        start[:, :, -1] = init[:, :, t]
        logits = think(params, cfg, out, start, generator=generator, **think_options)["logits"][:, -1]
        if temperature > 0:
            nxt = sample_top_p(torch.softmax(logits / temperature, dim=-1), top_p, generator)
        else:
            nxt = logits.argmax(dim=-1)
        out = torch.cat((out, nxt[:, None].to(out.dtype)), dim=1)
    return out
