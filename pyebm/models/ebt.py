"""Energy-Based Transformer (autoregressive, language) with cached context and batched self-verification.

Weight-compatible with the published EBT (``ebt_type`` ``default`` and ``time_embed``): the module tree
and state-dict keys are the original's, and :meth:`EBT.from_reference` loads a state dict or a
training checkpoint saved from it. The math is the one written out in :mod:`pyebm.reference.ebt`.

Inference differs from the original only in how the numbers are computed:

* the context stream (real tokens, and for ``time_embed`` the time token of each landscape) never
  depends on the candidates, so its per-layer keys and values are computed once per prompt
  (:meth:`EBT.prepare`) and extended by one token per generated token;
* a descent step runs only the prediction rows being optimised (for generation, the last position),
  for all G samples of all prompts at once, attending to the cached keys/values;
* the input gradient is a hand-written backward through the layers (no autograd graph, no weight
  gradients); the ``autograd`` backward is kept for comparison (``EBT(..., backward="autograd")``).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from pyebm import _dispatch, _rng, _state
from pyebm.descent import as_generator
from pyebm.ops import ebt_attention as _ebt_attention_ops, ebt_norm_swiglu as _ebt_norm_ops  # noqa: F401  (register the ops)
from pyebm.models.ebt_inference import EBTInference
from pyebm.pretrained import Pretrained
from pyebm.reference import ebt as ref

# The original's named sizes (model_utils.model_sizes).
REFERENCE_SIZES: Dict[str, Dict[str, int]] = {
    "4xs": {"num_transformer_blocks": 2, "multiheaded_attention_heads": 2, "embedding_dim": 128},
    "3xs": {"num_transformer_blocks": 4, "multiheaded_attention_heads": 4, "embedding_dim": 256},
    "xxs": {"num_transformer_blocks": 6, "multiheaded_attention_heads": 6, "embedding_dim": 384},
    "2xs": {"num_transformer_blocks": 6, "multiheaded_attention_heads": 6, "embedding_dim": 384},
    "xs": {"num_transformer_blocks": 12, "multiheaded_attention_heads": 6, "embedding_dim": 384},
    "small": {"num_transformer_blocks": 12, "multiheaded_attention_heads": 12, "embedding_dim": 768},
    "medium": {"num_transformer_blocks": 24, "multiheaded_attention_heads": 16, "embedding_dim": 1024},
    "large": {"num_transformer_blocks": 24, "multiheaded_attention_heads": 16, "embedding_dim": 1536},
    "xl": {"num_transformer_blocks": 24, "multiheaded_attention_heads": 32, "embedding_dim": 2048},
}

# Training-configuration settings that change the network or the update and are not implemented here,
# with the value under which a configuration is still supported.
_UNSUPPORTED_SETTINGS = {
    "ebt_norm": "rms",
    "num_modality_processing_mlp_layers": 1,
    "learnable_process_memory": False,
    "normalize_initial_condition_only_first_step": False,
    "absolute_clamp": 0.0,
    "sharpen_predicted_distribution": 0.0,
}
_CONFIG_NAMES = ("vocab_size", "embedding_dim", "num_transformer_blocks", "multiheaded_attention_heads",
                 "context_length", "ebt_type", "mcmc_num_steps", "ffn_dim_multiplier",
                 "vocab_to_embed_uses_prob_dist", "normalize_initial_condition", "mcmc_step_size",
                 "langevin_dynamics_noise", "denoising_initial_condition", "gaussian_random_noise_scaling",
                 "clamp_futures_grad", "clamp_futures_grad_max_change", "ebt_act_func", "norm_eps")


@dataclass
class ThinkResult:
    """What :meth:`EBT.think` returns. With ``positions="last"`` the position axis is dropped.

    logits          [B, V] or [B, S, V]  optimised (unnormalised) vector of the chosen sample
    energy          [B] or [B, S]        its energy in the final noise-free pass
    initial_energy  [B] or [B, S]        its energy at the first step
    sample          [B] or [B, S]        index of the chosen sample in 0..G-1
    """

    logits: torch.Tensor
    energy: torch.Tensor
    initial_energy: torch.Tensor
    sample: torch.Tensor


# a pytree (its fields the children): torch.compile and torch.export return it from a traced call
torch.export.register_dataclass(ThinkResult, serialized_type_name="pyebm.models.ThinkResult")


class EBTCache:
    """Context keys/values of a batch of prompts, per layer: [L * B, H, capacity, head_dim].

    L is the number of landscapes (``mcmc_num_steps`` for ``time_embed``, else 1); rows are
    landscape-major. ``length`` is the number of filled context-stream entries (tokens, plus the time
    token for ``time_embed``). ``landscape`` is the one :meth:`EBT.energy` uses.
    """

    def __init__(self, tokens: torch.Tensor, keys: List[torch.Tensor], values: List[torch.Tensor],
                 length: int, landscapes: int, landscape: int):
        self.tokens = tokens
        self.keys = keys
        self.values = values
        self.length = length
        self.landscapes = landscapes
        self.landscape = landscape

    @property
    def batch(self) -> int:
        return self.tokens.shape[0]

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def kv(self, layer: int, landscape: int) -> Tuple[torch.Tensor, torch.Tensor]:
        B = self.batch
        rows = slice(landscape * B, (landscape + 1) * B)
        return self.keys[layer][rows, :, :self.length], self.values[layer][rows, :, :self.length]


# -- modules (names and shapes are the original's, so state-dict keys match) -----------------------

class _RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, **kw):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, **kw))


class _Attention(nn.Module):
    def __init__(self, dim: int, **kw):
        super().__init__()
        self.wq = nn.Linear(dim, dim, bias=False, **kw)
        self.wk = nn.Linear(dim, dim, bias=False, **kw)
        self.wv = nn.Linear(dim, dim, bias=False, **kw)
        self.wo = nn.Linear(dim, dim, bias=False, **kw)


class _FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, **kw):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False, **kw)
        self.w2 = nn.Linear(hidden, dim, bias=False, **kw)
        self.w3 = nn.Linear(dim, hidden, bias=False, **kw)


class _Block(nn.Module):
    def __init__(self, dim: int, hidden: int, eps: float, **kw):
        super().__init__()
        self.attention = _Attention(dim, **kw)
        self.feed_forward = _FeedForward(dim, hidden, **kw)
        self.attention_norm = _RMSNorm(dim, eps, **kw)
        self.ffn_norm = _RMSNorm(dim, eps, **kw)


class _Trunk(nn.Module):
    def __init__(self, cfg: ref.EBTConfig, **kw):
        super().__init__()
        d = cfg.embedding_dim
        self.layers = nn.ModuleList(_Block(d, cfg.ffn_hidden, cfg.norm_eps, **kw)
                                    for _ in range(cfg.num_transformer_blocks))
        self.norm = _RMSNorm(d, cfg.norm_eps, **kw)
        self.final_layer = nn.Linear(d, 1, bias=False, **kw)
        if cfg.ebt_type == "time_embed":
            self.time_embeddings = nn.Embedding(cfg.mcmc_num_steps, d, **kw)


# -- activation derivatives for the hand-written backward ------------------------------------------

def _act_and_grad(name: str, u: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    if name == "silu":
        s = torch.sigmoid(u)
        a = u * s
        return a, s * (1 + u * (1 - s))
    if name == "relu":
        return torch.relu(u), (u > 0).to(u.dtype)
    if name == "gelu":
        cdf = 0.5 * (1 + torch.erf(u * (1 / math.sqrt(2))))
        return u * cdf, cdf + u * torch.exp(-0.5 * u * u) * (1 / math.sqrt(2 * math.pi))
    if name == "elu":
        e = torch.expm1(u.clamp(max=0))
        return torch.where(u > 0, u, e), torch.where(u > 0, torch.ones_like(u), e + 1)
    raise ValueError(f"ebt_act_func must be one of {sorted(ref.ACTIVATIONS)}; got {name!r}")


class _TritonOps:
    """EBT's Triton kernels, called through their registered ops (``torch.ops.pyebm.ebt_*``, defined in
    ``pyebm.ops.ebt_attention`` / ``ebt_norm_swiglu``), so tracing, compiling and dispatch modes see them."""

    @staticmethod
    def attention_fwd(q, k_ctx, v_ctx, k_self, v_self, n_visible):
        return torch.ops.pyebm.ebt_attention_fwd(q, k_ctx, v_ctx, k_self, v_self, n_visible)

    @staticmethod
    def attention_bwd(do, q, k_ctx, v_ctx, o, lse, k_self, v_self, n_visible):
        return torch.ops.pyebm.ebt_attention_bwd(do, q, k_ctx, v_ctx, o, lse, k_self, v_self, n_visible)

    @staticmethod
    def rms_norm_fwd(x, weight, eps):
        return torch.ops.pyebm.ebt_rms_norm_fwd(x, weight, eps)

    @staticmethod
    def rms_norm_bwd(dy, x, weight, eps):
        return torch.ops.pyebm.ebt_rms_norm_bwd(dy, x, weight, eps)

    @staticmethod
    def swiglu_fwd(a, b):
        return torch.ops.pyebm.ebt_swiglu_fwd(a, b)

    @staticmethod
    def swiglu_bwd(dy, a, b):
        return torch.ops.pyebm.ebt_swiglu_bwd(dy, a, b)


def _softmax(y: torch.Tensor) -> torch.Tensor:
    """softmax over the vocabulary with subnormal probabilities set to 0.

    Once the logits spread out (a few steps with a large alpha), exp() underflows into subnormal numbers,
    and a CPU multiplies those 10-100x slower (the [G, V] @ [V, D] product of the next step). Values below
    the smallest normal number change the embedding by less than V * 1.2e-38 * max|W|: nothing.
    """
    p = torch.softmax(y, dim=-1)
    return p.masked_fill_(p < torch.finfo(p.dtype).tiny, 0.0)


def _swap_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x[2k], x[2k+1]) -> (x[2k+1], x[2k]) along the last axis."""
    return x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)


def _rope(x: torch.Tensor, c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs: out[2k] = x[2k] cos - x[2k+1] sin, out[2k+1] = x[2k+1] cos + x[2k] sin.

    c = (cos_k, cos_k) and s = (-sin_k, sin_k) per pair, laid out to broadcast against x. The gradient
    (the inverse rotation) is _rope with s negated.
    """
    return torch.addcmul(x * c, _swap_pairs(x), s)


def _rms_bwd(xn: torch.Tensor, r: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """dx of xn = x * r, r = rsqrt(mean(x^2) + eps), given g = dE/dxn."""
    return r * (g - xn * (xn * g).mean(-1, keepdim=True))


def _linear(pk: "_Packed", x: torch.Tensor, w: torch.Tensor, add: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(add +) x [M, K] @ w[N, K]^T: ``torch.ops.pyebm.rows_linear`` on a rows pack, else ATen."""
    if pk.rows:
        return torch.ops.pyebm.rows_linear(x, w, add)
    return x @ w.t() if add is None else torch.addmm(add, x, w.t())


def _linear_t(pk: "_Packed", g: torch.Tensor, w: torch.Tensor, w_t: Optional[torch.Tensor]) -> torch.Tensor:
    """g [M, N] @ w [N, K] (an input gradient): rows_linear on the transposed copy w_t [K, N] on a rows pack."""
    if pk.rows:
        return torch.ops.pyebm.rows_linear(g, w_t)
    return g @ w


_LAYER_SOURCES = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight", "attention.wo.weight",
                  "feed_forward.w1.weight", "feed_forward.w3.weight", "feed_forward.w2.weight",
                  "attention_norm.weight", "ffn_norm.weight")


def _packed_sources(cfg: "ref.EBTConfig") -> List[Optional[str]]:
    """The tensors ``_Packed`` is made from, as names under the model (see ``pyebm._state``)."""
    names: List[Optional[str]] = [f"transformer.layers.{i}.{n}" for i in range(cfg.num_transformer_blocks)
                                  for n in _LAYER_SOURCES]
    names += ["transformer.norm.weight", "transformer.final_layer.weight", "embeddings.weight",
              None if cfg.vocab_to_embed_uses_prob_dist else "vocab_to_embed.weight",
              "transformer.time_embeddings.weight" if cfg.ebt_type == "time_embed" else None]
    return names


class _Rows(NamedTuple):
    """What every energy pass over R = samples * P prediction rows of one call shares (``EBT._rows``)."""
    c3: Optional[torch.Tensor]           # RoPE tables [R, 3, 1, hd] for a [.., R, 3, H, hd] q|k|v tensor (None
    s3: Optional[torch.Tensor]           # with ``fused``, whose ops take the rows' own tables)
    s3_t: Optional[torch.Tensor]         # the sin table of the inverse rotation
    hidden: Optional[torch.Tensor]       # [R, T] True where a row does not see a context entry (None: all seen)
    n_visible: Optional[torch.Tensor]    # [R] the context entries each row sees (None: all)
    triton: bool                         # the Triton attention, RMSNorm and SwiGLU ops
    fused: Optional[Tuple[torch.Tensor, torch.Tensor]]  # (cos, sin) [R, hd] for the ebt_rows_* ops, or None


class _Packed:
    """The weights in the layout the cached path uses, built once per set of weights (``pyebm._state``).

    Per layer: QKV concatenated, with the attention scale folded into W_q and the RMSNorm weight into
    the columns of the matrix that follows it (W_qkv, W_1|W_3), so a norm is x * r and its backward
    needs no extra product. The final norm weight is folded into the energy head.

    With ``rows`` (the products of a few rows run ``torch.ops.pyebm.rows_linear``, which reads a weight in
    its own row layout: ``pyebm._dispatch.ebt_rows_refusal``) the pack also holds transposed copies, the
    operands of the input-gradient products (``layers_t``: W_qkv^T, W_o^T, W_13^T, W_2^T per layer; ``v2e_rows``
    [V, D] for dE/dp = dE/de @ v2e) and ``v2e`` contiguous: twice the weights' memory, each product then one
    stream over contiguous rows.
    """

    def __init__(self, cfg: "ref.EBTConfig", tensors: List[Optional[torch.Tensor]], rows: bool = False):
        n = len(_LAYER_SOURCES)
        scale = 1.0 / math.sqrt(cfg.head_dim)
        with torch.no_grad():
            self.layers = []
            for i in range(cfg.num_transformer_blocks):
                wq, wk, wv, wo, w1, w3, w2, attn_norm, ffn_norm = tensors[i * n:(i + 1) * n]
                wqkv = torch.cat((wq * scale, wk, wv), 0)
                w13 = torch.cat((w1, w3), 0)
                self.layers.append(((wqkv * attn_norm[None, :]).contiguous(), wo,
                                    (w13 * ffn_norm[None, :]).contiguous(), w2))
            norm, final, emb, v2e, time = tensors[cfg.num_transformer_blocks * n:]
            self.head = norm * final.reshape(-1)
            self.emb = emb
            # e = p @ v2e_t, dE/dp = dE/de @ v2e: v2e is [D, V] (vocab_to_embed) or embeddings^T.
            self.v2e = self.emb.t() if cfg.vocab_to_embed_uses_prob_dist else v2e
            self.v2e_t = self.v2e.t()
            self.rows = rows
            self.layers_t = None
            if rows:
                self.layers_t = [tuple(w.t().contiguous() for w in layer) for layer in self.layers]
                self.v2e = self.v2e.contiguous()
                self.v2e_t = self.v2e.t()
                self.v2e_rows = self.v2e_t.contiguous()                             # [V, D]
            self.time = time
            cos, sin = ref.rope_tables(cfg.head_dim, cfg.context_length + 2 + cfg.offset,
                                       self.emb.dtype, self.emb.device)
            self.cos = cos.repeat_interleave(2, dim=-1)                             # [P, hd]
            self.sin = torch.stack((-sin, sin), dim=-1).flatten(-2)                 # [P, hd]

    def rope_rows(self, pos: torch.Tensor):
        """Tables for rows at RoPE positions pos [R], laid out [R, 3, 1, hd] for a [.., R, 3, H, hd]
        q|k|v tensor (the v slot is the identity), plus the sin table of the inverse rotation."""
        c, s = self.cos[pos], self.sin[pos]
        one, zero = torch.ones_like(c), torch.zeros_like(s)
        c3 = torch.stack((c, c, one), dim=1)[:, :, None, :]
        s3 = torch.stack((s, s, zero), dim=1)[:, :, None, :]
        return c3, s3, -s3


# -- CUDA graphs of a think step ----------------------------------------------------------------------

_GRAPHS = "think_graphs"  # the key of a model's captured think steps in its packed state (pyebm._state)
def _capacity_bucket(need: int, most: int) -> int:
    """The static cache capacity of a captured think step that must hold ``need`` context entries: the next
    power of two from 16, at most ``most`` (one graph then serves every cache length of its bucket)."""
    cap = 16
    while cap < need:
        cap *= 2
    return max(need, min(cap, most))


class _ThinkGraph:
    """One think step of ``EBT(..., cuda_graph=True)`` for fixed shapes and options, and its CUDA graph.

    Static inputs: the context keys / values in buffers of a fixed capacity per layer, [L * B, H, capacity,
    head_dim] (zeros when made; entries past a cache's length are never attended to), the token positions
    [P] (``last``: the one entry is set per call) and, for an init tensor, the initial vectors [B, G, P, V].
    :meth:`step` is what is captured: the initial draw (``normal`` / ``zeros``), every descent step, the
    final energy pass and the selection, attending over the whole capacity under the mask that
    ``EBT._rows(masked=True)`` computes on the device from the positions. It reads nothing from the host
    and copies nothing to the device. ``pack`` is the packed weights the graph reads and ``scalars``
    (alpha, noise, grad_clamp, gaussian_random_noise_scaling) the numbers baked into its kernels: the
    model captures again when either changed (``EBT._static_step``).
    """

    def __init__(self, model: "EBT", pk: _Packed, scalars: tuple, B: int, cap: int, G: int, P: int,
                 positions: str, schedule, select: str, accept_lower: bool, init_kind: str, need_energy: bool):
        cfg = model.config
        w = pk.emb
        L = cfg.num_landscapes
        H, hd = cfg.multiheaded_attention_heads, cfg.head_dim
        self.pack, self.scalars = pk, scalars
        self.keys = [w.new_zeros(L * B, H, cap, hd) for _ in pk.layers]
        self.values = [w.new_zeros(L * B, H, cap, hd) for _ in pk.layers]
        # a cache over the whole capacity: what lies past each row's position is masked, not sliced off
        self.view = EBTCache(torch.empty(B, 0, dtype=torch.long, device=w.device), self.keys, self.values, cap,
                             L, L - 1)
        self.positions = positions
        self.pos = (torch.arange(P, device=w.device) if positions == "all"
                    else torch.zeros(1, dtype=torch.long, device=w.device))
        self.init = w.new_zeros(B, G, P, cfg.vocab_size) if init_kind == "tensor" else None
        self.B, self.G, self.P = B, G, P
        self.schedule, self.select, self.accept_lower = list(schedule), select, accept_lower
        self.init_kind, self.need_energy = init_kind, need_energy
        self.graph: Optional["torch.cuda.CUDAGraph"] = None
        self.out: Optional[tuple] = None

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def load(self, cache: EBTCache) -> None:
        """Copy the filled entries of ``cache`` (from the model's ``prepare``) into the static buffers."""
        n = cache.length
        for src, dst in ((cache.keys, self.keys), (cache.values, self.values)):
            for s, d in zip(src, dst):
                if s is not d:
                    d[:, :, :n].copy_(s[:, :, :n])

    def adopt(self, cache: EBTCache) -> EBTCache:
        """``cache`` copied into the static buffers, as a cache over them: ``extend`` then writes its new
        entries where the graph reads them (the capacity is the bucket's: it never grows)."""
        self.load(cache)
        return EBTCache(cache.tokens, list(self.keys), list(self.values), cache.length, cache.landscapes,
                        cache.landscape)

    def set_inputs(self, S: int, y: Optional[torch.Tensor]) -> None:
        """The prompt length S (``last``: the position S - 1) and the initial vectors of an init tensor."""
        if self.positions == "last":
            self.pos.fill_(S - 1)  # a fill kernel with the number as its argument: no host-to-device copy
        if self.init is not None:
            self.init.copy_(y)

    def step(self, model: "EBT") -> tuple:
        """(logits, E, E0, idx) of the inputs in the static buffers (what the graph captures)."""
        alpha, noise, grad_clamp, _ = self.scalars
        y = self.init if self.init is not None else model._initial(self.init_kind, self.B, self.G, self.P, None)
        rows = model._rows(self.pack, self.view, self.pos, self.G, masked=True)
        return model._think_cached(self.view, self.pos, y, self.schedule, alpha, noise, self.select,
                                   self.accept_lower, grad_clamp, None, self.need_energy, pk=self.pack, rows=rows)

    def capture(self, model: "EBT") -> None:
        dev = self.keys[0].device
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up: Triton compilation and lazy initialisation stay out of the graph
                self.step(model)
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self.step(model)
        self.graph, self.out = graph, out

    def run(self, model: "EBT", capture: bool = True) -> tuple:
        """The step's outputs for the inputs loaded: the graph replayed (captured on the first run; its
        outputs are the graph's buffers, overwritten by the next replay), or with ``capture=False`` the same
        step run eagerly on the static buffers (any device: how the CPU tests check the captured code)."""
        if not capture:
            return self.step(model)
        if self.graph is None:
            self.capture(model)
        self.graph.replay()
        return self.out


def _refuse_functorch(where: str) -> None:
    """EBT's energy calls are inference calls over the cached prompt (no graph); inside a torch.func transform
    their output would be a constant, so a gradient of it would be zero without a word. Refuse instead."""
    if _dispatch.in_functorch_transform():
        raise RuntimeError(f"{where} is an inference call (no autograd graph) and cannot run inside a torch.func "
                           "transform; differentiate EBT.forward(tokens, predictions) instead")


class EBT(_state.PackedModule, Pretrained):
    """Autoregressive language Energy-Based Transformer (``default`` or ``time_embed``).

    Hyperparameters keep the original training configuration's names; ``EBT(**config)`` accepts the
    ones listed below, :meth:`from_reference` accepts a whole training configuration.

    Inference::

        model = pyebm.models.EBT(vocab_size=8192, context_length=256, **EBT.reference_config("xxs"))
        res = model.think(tokens, steps=2, samples=4)       # next-token logits res.logits [B, V]
        out = model.generate(tokens, max_new_tokens=32)     # [B, S + 32]

    Energy-model protocol (what ``pyebm.minimize`` drives): ``ctx = model.prepare(tokens)``;
    ``model.energy(ctx, y)`` and ``model.energy_and_grad(ctx, y)`` score candidates y [B, K, V] for the
    token after ``tokens``. y is the vector fed to ``vocab_to_embed`` (a probability vector when
    ``normalize_initial_condition``), and the gradient is taken with respect to it, as EBT's update does
    (``pyebm.Descent.ebt`` projects logits with a softmax first). For ``time_embed`` the protocol scores
    against one landscape, chosen at ``prepare`` (default: the last); :meth:`think` visits them all.

    CUDA graphs (``cuda_graph=True``, a model on a CUDA device): every :meth:`think` call and every token of
    :meth:`generate` replays one captured think step (every descent step over the vocabulary vectors of
    the predicted position(s), the final energy pass and the selection among the G samples), captured on
    first use for each batch size, cache capacity bucket, G, positions, step schedule and option set.
    The KV cache is not captured as it grows: the graph reads a static cache of fixed capacity (the next
    power of two >= 16 of the entries needed, at most ``context_length`` plus the time token), into which
    the prompt's keys and values are copied (:meth:`generate`: once per call, and each new token's entries
    are written there by :meth:`extend`), and attends to it under a mask computed on the device from the
    positions, so one graph serves every cache length of its bucket. The cache extension itself (one
    context token per generated token) and the greedy / top-p choice run eagerly between replays.
    The graph reads the packed weights (``pyebm._state``) it was captured with: when the model packs
    again (an optimizer step, ``load_state_dict``, ``.data =``, ``pyebm._state.repack``) every graph of the
    model is dropped and the next call captures again (weights made under ``torch.inference_mode`` have no
    version counter: every call then packs and captures again). A step whose ``alpha``, noise,
    ``grad_clamp`` or ``gaussian_random_noise_scaling`` (given or learned, baked into its kernels) changed
    is captured again as well. Random draws (``init="normal"``, noise) come
    from the default CUDA generator (``generator`` must be None); the capture's two warm-up runs draw
    from it too. Results are copies, values of the call. Graphs are never pickled or copied; concurrent
    calls on one model from several threads share the static buffers and are not supported.
    """

    def __init__(self, vocab_size: int, embedding_dim: int = 384, num_transformer_blocks: int = 6,
                 multiheaded_attention_heads: int = 6, context_length: int = 256, ebt_type: str = "default",
                 mcmc_num_steps: int = 2, ffn_dim_multiplier: Optional[float] = None,
                 vocab_to_embed_uses_prob_dist: bool = False, normalize_initial_condition: bool = True,
                 mcmc_step_size: float = 60.0, langevin_dynamics_noise: float = 0.0,
                 denoising_initial_condition: str = "random_noise", gaussian_random_noise_scaling: float = 1.0,
                 clamp_futures_grad: bool = False, clamp_futures_grad_max_change: float = 9.0,
                 ebt_act_func: str = "silu", norm_eps: float = 1e-5, backward: str = "manual",
                 backend: Optional[str] = None, cuda_graph: bool = False, device=None, dtype=None):
        super().__init__()
        if not isinstance(cuda_graph, bool):
            raise TypeError(f"cuda_graph must be True or False; got {cuda_graph!r}")
        for name, val in (("vocab_size", vocab_size), ("embedding_dim", embedding_dim),
                          ("num_transformer_blocks", num_transformer_blocks),
                          ("multiheaded_attention_heads", multiheaded_attention_heads),
                          ("context_length", context_length), ("mcmc_num_steps", mcmc_num_steps)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be an int >= 1; got {val!r}")
        if embedding_dim % multiheaded_attention_heads or (embedding_dim // multiheaded_attention_heads) % 2:
            raise ValueError(f"embedding_dim ({embedding_dim}) must be a multiple of multiheaded_attention_heads "
                             f"({multiheaded_attention_heads}) with an even head size")
        if ebt_type not in ref.EBT_TYPES:
            raise ValueError(f"ebt_type must be one of {ref.EBT_TYPES}; got {ebt_type!r} "
                             "(adaln variants are not implemented)")
        if ebt_act_func not in ref.ACTIVATIONS:
            raise ValueError(f"ebt_act_func must be one of {sorted(ref.ACTIVATIONS)}; got {ebt_act_func!r}")
        if vocab_to_embed_uses_prob_dist and not normalize_initial_condition:
            raise ValueError("vocab_to_embed_uses_prob_dist requires normalize_initial_condition=True")
        if denoising_initial_condition not in ("random_noise", "zeros"):
            raise ValueError("denoising_initial_condition must be 'random_noise' or 'zeros'; "
                             f"got {denoising_initial_condition!r}")
        if backward not in ("manual", "autograd"):
            raise ValueError(f"backward must be 'manual' or 'autograd'; got {backward!r}")
        if ffn_dim_multiplier is not None and int(embedding_dim * ffn_dim_multiplier) < 1:
            raise ValueError(f"ffn_dim_multiplier gives an empty feed-forward layer; got {ffn_dim_multiplier!r}")
        self.config = ref.EBTConfig(
            vocab_size=vocab_size, embedding_dim=embedding_dim, num_transformer_blocks=num_transformer_blocks,
            multiheaded_attention_heads=multiheaded_attention_heads, context_length=context_length,
            ebt_type=ebt_type, mcmc_num_steps=mcmc_num_steps, ffn_dim_multiplier=ffn_dim_multiplier,
            vocab_to_embed_uses_prob_dist=bool(vocab_to_embed_uses_prob_dist),
            normalize_initial_condition=bool(normalize_initial_condition), ebt_act_func=ebt_act_func,
            norm_eps=float(norm_eps))
        self.denoising_initial_condition = denoising_initial_condition
        self.gaussian_random_noise_scaling = float(gaussian_random_noise_scaling)
        self.clamp_futures_grad = bool(clamp_futures_grad)
        self.clamp_futures_grad_max_change = float(clamp_futures_grad_max_change)
        self.backward_mode = backward
        self.backend = backend
        self.cuda_graph = cuda_graph
        self.inference = EBTInference()  # the defaults of think / generate (saved by save_pretrained)
        kw = {"device": device, "dtype": dtype}
        self.alpha = nn.Parameter(torch.tensor(float(mcmc_step_size), **kw), requires_grad=False)
        self.langevin_dynamics_noise_std = nn.Parameter(torch.tensor(float(langevin_dynamics_noise), **kw),
                                                        requires_grad=False)
        self.embeddings = nn.Embedding(vocab_size, embedding_dim, **kw)
        if not vocab_to_embed_uses_prob_dist:
            self.vocab_to_embed = nn.Linear(vocab_size, embedding_dim, bias=False, **kw)
        self.transformer = _Trunk(self.config, **kw)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)

    @property
    def event_shape(self) -> Tuple[int]:
        """Shape of one candidate of the energy-model protocol: a vector over the vocabulary."""
        return (self.config.vocab_size,)

    # -- configuration ------------------------------------------------------------------------
    @staticmethod
    def reference_config(name: str) -> Dict[str, int]:
        """``num_transformer_blocks``, ``multiheaded_attention_heads``, ``embedding_dim`` of a named size."""
        try:
            return dict(REFERENCE_SIZES[name])
        except KeyError:
            raise ValueError(f"unknown size {name!r}; known sizes: {sorted(REFERENCE_SIZES)}") from None

    def _pretrained_args(self) -> dict:
        """The constructor arguments (``save_pretrained``; alpha and the noise are parameters, saved with the
        weights as well)."""
        args = dataclasses.asdict(self.config)
        args.update(mcmc_step_size=float(self.alpha), langevin_dynamics_noise=float(self.langevin_dynamics_noise_std),
                    denoising_initial_condition=self.denoising_initial_condition,
                    gaussian_random_noise_scaling=self.gaussian_random_noise_scaling,
                    clamp_futures_grad=self.clamp_futures_grad,
                    clamp_futures_grad_max_change=self.clamp_futures_grad_max_change,
                    backward=self.backward_mode, backend=self.backend, cuda_graph=self.cuda_graph)
        return args

    def extra_repr(self) -> str:
        c = self.config
        return (f"vocab_size={c.vocab_size}, embedding_dim={c.embedding_dim}, "
                f"num_transformer_blocks={c.num_transformer_blocks}, "
                f"multiheaded_attention_heads={c.multiheaded_attention_heads}, context_length={c.context_length}, "
                f"ebt_type={c.ebt_type!r}, mcmc_num_steps={c.mcmc_num_steps}")

    @classmethod
    def from_reference(cls, state_dict: Mapping[str, Any], **hyperparameters) -> "EBT":
        """Build an EBT from a state dict (or a training checkpoint) saved from the original model.

        ``hyperparameters`` take the original training configuration's names; unrelated settings of a
        training configuration are ignored, so ``EBT.from_reference(sd, **vars(args))`` works. Sizes
        missing from them are read from the tensor shapes (``multiheaded_attention_heads`` and
        ``context_length`` cannot be, and are required). Keys may carry the ``model.`` /
        ``_orig_mod.`` prefixes of the training wrapper. Missing or unexpected keys, or tensors of
        another shape, raise a ``ValueError`` that lists them.
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a mapping of names to tensors; got {type(state_dict).__name__}")
        sd: Mapping[str, Any] = state_dict
        if "state_dict" in sd and isinstance(sd["state_dict"], Mapping):  # a training checkpoint
            saved = sd.get("hyper_parameters") or {}
            hyperparameters = {**{k: v for k, v in dict(saved).items()}, **hyperparameters}
            sd = sd["state_dict"]
        sd = _strip_prefix(dict(sd))
        for k, v in sd.items():
            if not isinstance(v, torch.Tensor):
                raise TypeError(f"state_dict[{k!r}] must be a tensor; got {type(v).__name__}")
        hp = {k: hyperparameters[k] for k in _CONFIG_NAMES if k in hyperparameters}
        for name, ok in _UNSUPPORTED_SETTINGS.items():
            if name in hyperparameters and hyperparameters[name] not in (ok, None):
                raise ValueError(f"{name}={hyperparameters[name]!r} is not supported (only {ok!r})")
        if hp.get("ebt_type", "default") not in ref.EBT_TYPES:
            raise ValueError(f"ebt_type must be one of {ref.EBT_TYPES}; got {hp['ebt_type']!r}")
        _infer_sizes(sd, hp)
        for name in ("multiheaded_attention_heads", "context_length"):
            if name not in hp:
                raise ValueError(f"from_reference: {name} is required (it cannot be read from the state dict)")
        if "mcmc_step_size" not in hp and isinstance(sd.get("alpha"), torch.Tensor):
            hp["mcmc_step_size"] = float(sd["alpha"])
        dtype = next((v.dtype for v in sd.values() if v.is_floating_point()), None)
        model = cls(**hp, dtype=dtype)
        expected = model.state_dict()
        missing = sorted(set(expected) - set(sd))
        unexpected = sorted(set(sd) - set(expected))
        if missing or unexpected:
            raise ValueError("from_reference: the state dict does not match an EBT with "
                             f"{model.extra_repr()}.\n  missing keys: {missing}\n  unexpected keys: {unexpected}")
        wrong = [f"{k}: expected {tuple(expected[k].shape)}, got {tuple(sd[k].shape)}"
                 for k in expected if tuple(expected[k].shape) != tuple(sd[k].shape)]
        if wrong:
            raise ValueError("from_reference: tensors of another shape than an EBT with "
                             f"{model.extra_repr()}:\n  " + "\n  ".join(wrong))
        model.load_state_dict(sd, strict=True)
        return model

    # -- internals --------------------------------------------------------------------------------
    @property
    def _param(self) -> torch.Tensor:
        return self.embeddings.weight

    def _packed(self) -> _Packed:
        """The packed weights of the module's current parameters (re-checked on every call, rebuilt when one
        was modified in place or replaced; see ``pyebm._state``)."""
        cfg = self.config
        w = self._param
        if _dispatch.ebt_rows_refusal(self, w.device, w.dtype) is None:
            return _state.packed(self, "packed_rows", lambda: _packed_sources(cfg), lambda t: _Packed(cfg, t, True))
        return _state.packed(self, "packed", lambda: _packed_sources(cfg), lambda t: _Packed(cfg, t))

    def _check_tokens(self, tokens: torch.Tensor, extra: int = 0, what: str = "tokens") -> torch.Tensor:
        if not isinstance(tokens, torch.Tensor):
            raise TypeError(f"{what} must be a LongTensor [B, S]; got {type(tokens).__name__}")
        if tokens.dim() == 1:
            tokens = tokens.unsqueeze(0)
        if tokens.dim() != 2 or tokens.dtype.is_floating_point or tokens.dtype == torch.bool or tokens.is_complex():
            raise ValueError(f"{what} must be an integer tensor [B, S]; got {tokens.dtype} "
                             f"of shape {tuple(tokens.shape)}")
        B, S = tokens.shape
        if B < 1 or S < 1:
            raise ValueError(f"{what} must have at least one prompt of at least one token; got shape {(B, S)}")
        V, C = self.config.vocab_size, self.config.context_length
        if _rng.tracing():  # a traced graph checks on the device (no host read to trace)
            torch._assert_async(((tokens >= 0) & (tokens < V)).all(),
                                f"{what}: token ids must be in [0, vocab_size={V})")
            lo, hi = 0, 0
        else:
            lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= V:
            raise ValueError(f"{what}: token ids must be in [0, vocab_size={V}); got ids in [{lo}, {hi}]")
        if S + extra > C:
            more = f" plus {extra} generated tokens" if extra else ""
            raise ValueError(f"{what}: prompt length {S}{more} exceeds context_length={C}")
        return tokens.to(device=self._param.device, dtype=torch.long)

    # -- the context stream -----------------------------------------------------------------------
    def _context_forward(self, pk: _Packed, cache: EBTCache, x: torch.Tensor, start: int) -> None:
        """Run context entries x [L*B, n, D] at stream positions start.. and store their keys/values."""
        cfg = self.config
        N, n, D = x.shape
        H, hd = cfg.multiheaded_attention_heads, cfg.head_dim
        c3, s3, _ = pk.rope_rows(torch.arange(start, start + n, device=x.device))
        end = start + n
        mask, causal = None, False
        if n > 1 and start == 0:
            causal = True
        elif n > 1:
            i = torch.arange(start, end, device=x.device)[:, None]
            mask = torch.arange(end, device=x.device)[None, :] <= i  # True = may attend
        act = ref.ACTIVATIONS[cfg.ebt_act_func]
        eps = cfg.norm_eps
        last = len(pk.layers) - 1
        # one extended token per prompt and landscape: rows_linear on a rows pack; a prompt: ATen's BLAS
        lin = _linear if _dispatch.ebt_context_rows(n, N) else (lambda _, a, w, add=None: a @ w.t() if add is None else add + a @ w.t())
        for li, (wqkv, wo, w13, w2) in enumerate(pk.layers):
            xn = x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps)
            qkv = _rope(lin(pk, xn.reshape(N * n, D), wqkv).view(N, n, 3, H, hd), c3, s3)
            cache.keys[li][:, :, start:end] = qkv[:, :, 1].transpose(1, 2)
            cache.values[li][:, :, start:end] = qkv[:, :, 2].transpose(1, 2)
            if li == last:  # the last layer's context outputs are never read
                break
            K, Vv = cache.keys[li][:, :, :end], cache.values[li][:, :, :end]
            # W_q carries the 1/sqrt(head_dim) factor already.
            o = F.scaled_dot_product_attention(qkv[:, :, 0].transpose(1, 2), K, Vv, attn_mask=mask, is_causal=causal,
                                               scale=1.0)
            x = lin(pk, o.transpose(1, 2).reshape(N * n, D), wo, x.reshape(N * n, D))
            xn = x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps)
            u, z = lin(pk, xn, w13).chunk(2, dim=-1)
            x = lin(pk, act(u) * z, w2, x).view(N, n, D)

    def prepare(self, context: torch.Tensor, landscape: Optional[int] = None, capacity: Optional[int] = None
                ) -> EBTCache:
        """Cache the context keys/values of prompts ``context`` [B, S] (token ids).

        For ``time_embed`` every landscape's context stream is cached. ``landscape`` is the one
        :meth:`energy` scores against (default: the last, as in the final energy pass). ``capacity`` is
        the number of tokens to reserve room for (default S; the cache grows when extended further).
        """
        cfg = self.config
        tokens = self._check_tokens(context, what="context")
        L = cfg.num_landscapes
        if landscape is None:
            landscape = L - 1
        if not isinstance(landscape, int) or not 0 <= landscape < L:
            raise ValueError(f"landscape must be an int in [0, {L}); got {landscape!r}")
        B, S = tokens.shape
        cap = max(S, min(capacity or S, cfg.context_length)) + cfg.offset
        pk = self._packed()
        H, hd = cfg.multiheaded_attention_heads, cfg.head_dim
        like = pk.emb
        keys = [like.new_empty(L * B, H, cap, hd) for _ in pk.layers]
        values = [like.new_empty(L * B, H, cap, hd) for _ in pk.layers]
        cache = EBTCache(tokens, keys, values, 0, L, landscape)
        with torch.no_grad():
            x = pk.emb[tokens]                                        # [B, S, D]
            if cfg.ebt_type == "time_embed":
                t = pk.time[:, None, None, :].expand(L, B, 1, cfg.embedding_dim)
                x = torch.cat((t, x.unsqueeze(0).expand(L, B, S, cfg.embedding_dim)), dim=2)
                x = x.reshape(L * B, S + 1, cfg.embedding_dim)
            self._context_forward(pk, cache, x, 0)
        cache.length = S + cfg.offset
        return cache

    def extend(self, cache: EBTCache, new_tokens: torch.Tensor) -> EBTCache:
        """Append new_tokens [B, n] to the cached prompts (in place; returns the cache)."""
        return self._extend(cache, new_tokens, check_ids=True)

    def _extend(self, cache: EBTCache, new_tokens: torch.Tensor, check_ids: bool) -> EBTCache:
        """:meth:`extend`; without ``check_ids`` the token ids are not read on the host (two device reads per
        call): :meth:`generate` appends ids it chose itself, which lie in [0, vocab_size) by construction."""
        cfg = self.config
        if not isinstance(new_tokens, torch.Tensor) or new_tokens.dim() != 2 or new_tokens.shape[0] != cache.batch:
            shape = tuple(new_tokens.shape) if isinstance(new_tokens, torch.Tensor) else type(new_tokens).__name__
            raise ValueError(f"new_tokens must be [B={cache.batch}, n]; got {shape}")
        S_old = cache.tokens.shape[1]
        tokens = torch.cat((cache.tokens, new_tokens.to(cache.tokens.device, torch.long)), dim=1)
        if check_ids:
            tokens = self._check_tokens(tokens, what="tokens")  # range and context_length checks
        elif tokens.shape[1] > cfg.context_length:
            raise ValueError(f"tokens: length {tokens.shape[1]} exceeds context_length={cfg.context_length}")
        n = new_tokens.shape[1]
        if n == 0:
            return cache
        need = cache.length + n
        if need > cache.capacity:
            cap = min(cfg.context_length + cfg.offset, max(need, 2 * cache.capacity))
            for store in (cache.keys, cache.values):
                for li, t in enumerate(store):
                    grown = t.new_empty(t.shape[0], t.shape[1], cap, t.shape[3])
                    grown[:, :, :cache.length] = t[:, :, :cache.length]
                    store[li] = grown
        pk = self._packed()
        with torch.no_grad():
            x = pk.emb[tokens[:, S_old:]]
            x = x.unsqueeze(0).expand(cache.landscapes, *x.shape).reshape(-1, n, cfg.embedding_dim)
            self._context_forward(pk, cache, x, cache.length)
        cache.tokens = tokens
        cache.length = need
        return cache

    # -- the prediction rows ----------------------------------------------------------------------
    def _attention_backend(self, device: torch.device) -> str:
        """``triton`` (the Triton prediction-attention, RMSNorm and SwiGLU kernels) or ``torch`` (ATen ops;
        also for ``cpu``)."""
        return _dispatch.ebt_attention(self, device)

    def _rows(self, pk: _Packed, cache: EBTCache, positions: torch.Tensor, samples: int, masked: bool = False):
        """RoPE tables, the hidden-context mask [R, T] and the visible-context counts [R] (both None
        when everything is visible), and the attention backend, for the R = samples * P prediction
        rows of token positions ``positions`` [P] (sample-major). ``masked``: always the mask and the
        counts, computed on the device from ``positions`` without reading them on the host (a captured
        step, whose cache holds more entries than a row may see)."""
        off = self.config.offset
        pos = positions.repeat(samples)
        rope_pos = pos + 1 + off
        T = cache.length
        triton_attn = self._attention_backend(pos.device) == "triton"
        if not triton_attn and _dispatch.ebt_rows_steps(pk.rows):  # the ops take the rows' own tables
            c3 = s3 = s3_t = None
            fused = (pk.cos[rope_pos], pk.sin[rope_pos])
        else:
            (c3, s3, s3_t), fused = pk.rope_rows(rope_pos), None
        if not masked and int(positions.min()) + off + 1 >= T:
            return _Rows(c3, s3, s3_t, None, None, triton_attn, fused)
        hidden = torch.arange(T, device=pos.device)[None, :] > (pos[:, None] + off)
        return _Rows(c3, s3, s3_t, hidden, pos + off + 1, triton_attn, fused)

    def _pred_forward(self, pk: _Packed, cache: EBTCache, landscape: int, e: torch.Tensor, rows, save: bool):
        """Energies [B, R] of prediction embeddings e [B, R, D]; with ``save`` also what the backward needs."""
        if rows.fused is not None:
            return self._pred_forward_rows(pk, cache, landscape, e, rows, save)
        cfg = self.config
        B, R, D = e.shape
        H, hd = cfg.multiheaded_attention_heads, cfg.head_dim
        c3, s3, _, hidden, n_visible, triton_attn, _ = rows
        eps = cfg.norm_eps
        T = cache.length
        silu = cfg.ebt_act_func == "silu"
        act = ref.ACTIVATIONS[cfg.ebt_act_func]
        # The Triton backend also runs the norms and the SwiGLU gate as kernels; their backward
        # recomputes the norm's scale from the norm's input, which is saved in the scale's place.
        nk = _TritonOps if triton_attn else None
        saved = []
        h = e.reshape(B * R, D)
        for li, (wqkv, wo, w13, w2) in enumerate(pk.layers):
            Kc, Vc = cache.kv(li, landscape)                      # [B, H, T, hd]
            if nk is not None:
                xn1, r1 = nk.rms_norm_fwd(h, None, eps), h
            else:
                r1 = torch.rsqrt((h * h).mean(-1, keepdim=True) + eps)
                xn1 = h * r1
            qkv = _rope(_linear(pk, xn1, wqkv).view(B, R, 3, H, hd), c3, s3).transpose(1, 3)  # [B, H, 3, R, hd]
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]                        # [B, H, R, hd]
            if triton_attn:
                o, lse = _TritonOps.attention_fwd(q, Kc, Vc, k, v, n_visible)
                a_ctx, a_self = o, lse  # what the kernel's backward needs
            else:
                s_ctx = q @ Kc.transpose(-1, -2)                                      # [B, H, R, T]
                if hidden is not None:
                    s_ctx = s_ctx.masked_fill(hidden, float("-inf"))
                s_self = (q * k).sum(-1, keepdim=True)
                a = torch.softmax(torch.cat((s_ctx, s_self), dim=-1), dim=-1)
                a_ctx, a_self = a[..., :T], a[..., T:]
                o = torch.addcmul(a_ctx @ Vc, a_self, v)
            h2 = _linear(pk, o.transpose(1, 2).reshape(B * R, D), wo, h)
            if nk is not None:
                xn2, r2 = nk.rms_norm_fwd(h2, None, eps), h2
            else:
                r2 = torch.rsqrt((h2 * h2).mean(-1, keepdim=True) + eps)
                xn2 = h2 * r2
            u, z = _linear(pk, xn2, w13).chunk(2, dim=-1)
            if silu and nk is not None:
                sg = au = None
                m = nk.swiglu_fwd(u, z)
            elif silu:
                sg = torch.sigmoid(u)
                au = u * sg
            else:
                sg = None
                au = act(u)
            if save:
                saved.append((xn1, r1, q, k, v, a_ctx, a_self, xn2, r2, u, z, sg, au))
            h = _linear(pk, m if au is None else au * z, w2, h2)
        if nk is not None:
            xnF, rF = nk.rms_norm_fwd(h, None, eps), h
        else:
            rF = torch.rsqrt((h * h).mean(-1, keepdim=True) + eps)
            xnF = h * rF
        E = (xnF @ pk.head).view(B, R)
        return E, (saved, xnF, rF)

    def _pred_backward(self, pk: _Packed, cache: EBTCache, landscape: int, state, rows) -> torch.Tensor:
        """dE/de [B, R, D] (every row's own energy) from what _pred_forward saved."""
        if rows.fused is not None:
            return self._pred_backward_rows(pk, cache, landscape, state, rows)
        cfg = self.config
        saved, xnF, rF = state
        BR, D = xnF.shape
        B = cache.batch
        R = BR // B
        H, hd = cfg.multiheaded_attention_heads, cfg.head_dim
        c3, _, s3_t, _, n_visible, triton_attn, _ = rows
        eps = cfg.norm_eps
        nk = _TritonOps if triton_attn else None
        # With the kernels, the saved "r" slots hold the norms' inputs (see _pred_forward).
        rms_bwd = (lambda xn, x, g: nk.rms_norm_bwd(g, x, None, eps)) if nk is not None else _rms_bwd
        dh = rms_bwd(xnF, rF, pk.head.expand_as(xnF))
        for li in range(len(pk.layers) - 1, -1, -1):
            wqkv, wo, w13, w2 = pk.layers[li]
            wqkv_t, wo_t, w13_t, w2_t = pk.layers_t[li] if pk.rows else (None,) * 4
            xn1, r1, q, k, v, a_ctx, a_self, xn2, r2, u, z, sg, au = saved[li]
            Kc, Vc = cache.kv(li, landscape)
            dm = _linear_t(pk, dh, w2, w2_t)                                # [BR, F]
            if au is None:  # the SwiGLU kernel's forward saved nothing
                df = _linear_t(pk, torch.cat(nk.swiglu_bwd(dm, u, z), dim=-1), w13, w13_t)
            else:
                if sg is not None:  # silu' = s (1 + u (1 - s))
                    dau = sg * (1 + u * (1 - sg))
                else:
                    dau = _act_and_grad(cfg.ebt_act_func, u)[1]
                df = _linear_t(pk, torch.cat((dm * z * dau, dm * au), dim=-1), w13, w13_t)
            dh2 = dh + rms_bwd(xn2, r2, df)
            do = _linear_t(pk, dh2, wo, wo_t).view(B, R, H, hd).transpose(1, 2)  # [B, H, R, hd]
            if triton_attn:
                dq, dk, dv = _TritonOps.attention_bwd(do, q, Kc, Vc, a_ctx, a_self, k, v, n_visible)
            else:
                da_ctx = do @ Vc.transpose(-1, -2)
                da_self = (do * v).sum(-1, keepdim=True)
                t = (a_ctx * da_ctx).sum(-1, keepdim=True) + a_self * da_self
                ds_ctx = a_ctx * (da_ctx - t)
                ds_self = a_self * (da_self - t)
                dq = torch.addcmul(ds_ctx @ Kc, ds_self, k)
                dk, dv = ds_self * q, a_self * do
            dqkv = torch.stack((dq, dk, dv), dim=3)                         # [B, H, R, 3, hd]
            dqkv = _rope(dqkv.permute(0, 2, 3, 1, 4), c3, s3_t)              # [B, R, 3, H, hd]
            da = _linear_t(pk, dqkv.reshape(BR, 3 * D), wqkv, wqkv_t)
            dh = dh2 + rms_bwd(xn1, r1, da)
        return dh.view(B, R, D)

    def _pred_forward_rows(self, pk: _Packed, cache: EBTCache, landscape: int, e: torch.Tensor, rows: _Rows,
                           save: bool):
        """_pred_forward on a rows pack: rows_linear products, and between them the ``ebt_rows_*`` ops (the
        attention with RoPE inside, the RMSNorms, the SwiGLU gate), one call per step of a layer."""
        cfg = self.config
        B, R, D = e.shape
        H, hd = cfg.multiheaded_attention_heads, cfg.head_dim
        cos, sin = rows.fused
        eps = cfg.norm_eps
        ops = torch.ops.pyebm
        silu = cfg.ebt_act_func == "silu"
        saved = []
        h = e.reshape(B * R, D)
        for li, (wqkv, wo, w13, w2) in enumerate(pk.layers):
            Kc, Vc = cache.kv(li, landscape)                                    # [B, H, T, hd]
            xn1, r1 = ops.ebt_rows_rms_norm(h, eps)
            qkv = ops.rows_linear(xn1, wqkv).view(B, R, 3, H, hd)
            o, lse = ops.ebt_rows_attention(qkv, Kc, Vc, cos, sin, rows.n_visible)
            h2 = ops.rows_linear(o.view(B * R, D), wo, h)
            xn2, r2 = ops.ebt_rows_rms_norm(h2, eps)
            uz = ops.rows_linear(xn2, w13)
            if silu:
                m = ops.ebt_rows_swiglu(uz)
            else:
                u, z = uz.chunk(2, dim=-1)
                m = ref.ACTIVATIONS[cfg.ebt_act_func](u) * z
            if save:
                saved.append((xn1, r1, qkv, o, lse, xn2, r2, uz))
            h = ops.rows_linear(m, w2, h2)
        xnF, rF = ops.ebt_rows_rms_norm(h, eps)
        E = (xnF @ pk.head).view(B, R)
        return E, (saved, xnF, rF)

    def _pred_backward_rows(self, pk: _Packed, cache: EBTCache, landscape: int, state, rows: _Rows) -> torch.Tensor:
        """_pred_backward of _pred_forward_rows."""
        cfg = self.config
        saved, xnF, rF = state
        BR, D = xnF.shape
        B = cache.batch
        R = BR // B
        cos, sin = rows.fused
        ops = torch.ops.pyebm
        silu = cfg.ebt_act_func == "silu"
        dh = ops.ebt_rows_rms_norm_bwd(xnF, rF, pk.head, None)
        for li in range(len(pk.layers) - 1, -1, -1):
            wqkv_t, wo_t, w13_t, w2_t = pk.layers_t[li]
            xn1, r1, qkv, o, lse, xn2, r2, uz = saved[li]
            Kc, Vc = cache.kv(li, landscape)
            dm = ops.rows_linear(dh, w2_t)                                      # [BR, F]
            if silu:
                duz = ops.ebt_rows_swiglu_bwd(dm, uz)
            else:
                u, z = uz.chunk(2, dim=-1)
                au, dau = _act_and_grad(cfg.ebt_act_func, u)
                duz = torch.cat((dm * z * dau, dm * au), dim=-1)
            dh2 = ops.ebt_rows_rms_norm_bwd(xn2, r2, ops.rows_linear(duz, w13_t), dh)
            do = ops.rows_linear(dh2, wo_t).view(B, R, D)
            dqkv = ops.ebt_rows_attention_bwd(do, qkv, Kc, Vc, o, lse, cos, sin, rows.n_visible)
            dh = ops.ebt_rows_rms_norm_bwd(xn1, r1, ops.rows_linear(dqkv.view(BR, 3 * D), wqkv_t), dh2)
        return dh.view(B, R, D)

    def _embed_energy(self, pk, cache, landscape, e, rows, grad: bool):
        if not grad:
            return self._pred_forward(pk, cache, landscape, e, rows, save=False)[0], None
        if self.backward_mode == "autograd":
            rows = rows._replace(triton=False, fused=None)  # the kernels have no autograd formula: ATen ops
            if pk.rows:  # nor has rows_linear (a rows pack is not made in this mode; a caller's own pack)
                raise ValueError("EBT: backward='autograd' needs the ATen products (a pack without rows)")
            with torch.enable_grad():
                e = e.detach().requires_grad_(True)
                E = self._pred_forward(pk, cache, landscape, e, rows, save=False)[0]
                (g,) = torch.autograd.grad(E.sum(), e)
            return E.detach(), g
        E, state = self._pred_forward(pk, cache, landscape, e, rows, save=True)
        return E, self._pred_backward(pk, cache, landscape, state, rows)

    def _vocab_energy(self, pk, cache, landscape, p, rows, grad: bool):
        """Energies [B, R] (and dE/dp [B, R, V]) of vocabulary-space candidates p [B, R, V]."""
        if rows.triton:  # triton backend: the fused vocabulary-end kernels read v2e once for every row
            from pyebm.ops.ebt_vocab import vocab_embed, vocab_grad

            _, e = vocab_embed(p, pk.v2e, softmax=False)
            E, ge = self._embed_energy(pk, cache, landscape, e, rows, grad)
            return E, (vocab_grad(ge, pk.v2e) if grad else None)
        if pk.rows and p.dim() == 3:
            B, R, V = p.shape
            e = torch.ops.pyebm.rows_linear(p.reshape(B * R, V), pk.v2e).view(B, R, -1)
            E, ge = self._embed_energy(pk, cache, landscape, e, rows, grad)
            return E, (torch.ops.pyebm.rows_linear(ge.reshape(B * R, -1), pk.v2e_rows).view(B, R, V) if grad else None)
        E, ge = self._embed_energy(pk, cache, landscape, p @ pk.v2e_t, rows, grad)
        return E, (ge @ pk.v2e if grad else None)

    def _project_energy(self, pk, cache, landscape, y, rows, grad: bool, normalize: bool):
        """(p, E, dE/dp) with p = softmax(y) (subnormal probabilities zeroed) when ``normalize``, else p = y.
        On the triton backend the softmax and the product with v2e are one fused kernel."""
        if rows.triton and normalize:
            from pyebm.ops.ebt_vocab import vocab_embed, vocab_grad

            p, e = vocab_embed(y, pk.v2e, softmax=True)
            E, ge = self._embed_energy(pk, cache, landscape, e, rows, grad)
            return p, E, (vocab_grad(ge, pk.v2e) if grad else None)
        p = _softmax(y) if normalize else y
        E, g = self._vocab_energy(pk, cache, landscape, p, rows, grad)
        return p, E, g

    # -- energy-model protocol --------------------------------------------------------------------
    def _check_candidates(self, ctx: EBTCache, y: torch.Tensor) -> None:
        V = self.config.vocab_size
        if not isinstance(ctx, EBTCache):
            raise TypeError(f"ctx must come from EBT.prepare(tokens); got {type(ctx).__name__}")
        if not isinstance(y, torch.Tensor) or y.dim() != 3 or y.shape[0] != ctx.batch or y.shape[2] != V:
            shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise ValueError(f"y must be [B={ctx.batch}, K, vocab_size={V}]; got {shape}")
        w = self._param
        if y.dtype != w.dtype or y.device != w.device:
            raise ValueError(f"y is {y.dtype} on {y.device} but the model is {w.dtype} on {w.device}")

    def energy(self, ctx: EBTCache, y: torch.Tensor) -> torch.Tensor:
        """E [B, K] of candidates y [B, K, V] for the token after the cached prompts."""
        self._check_candidates(ctx, y)
        _refuse_functorch("EBT.energy")
        pk = self._packed()
        last = torch.tensor([ctx.tokens.shape[1] - 1], device=y.device)
        with torch.no_grad():
            return self._vocab_energy(pk, ctx, ctx.landscape, y, self._rows(pk, ctx, last, y.shape[1]), False)[0]

    def energy_and_grad(self, ctx: EBTCache, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(E [B, K], dE/dy [B, K, V]) of candidates y [B, K, V] for the token after the cached prompts."""
        self._check_candidates(ctx, y)
        _refuse_functorch("EBT.energy_and_grad")
        pk = self._packed()
        last = torch.tensor([ctx.tokens.shape[1] - 1], device=y.device)
        with torch.no_grad():
            return self._vocab_energy(pk, ctx, ctx.landscape, y, self._rows(pk, ctx, last, y.shape[1]), True)

    def explain_energy(self, ctx, y, backend: Optional[str] = None) -> str:
        """What an ``energy_and_grad`` call (and each descent step of :meth:`think`) runs (``pyebm.explain``)."""
        w = self._param
        why = _dispatch.ebt_rows_refusal(self, w.device, w.dtype)
        if self._attention_backend(w.device) == "triton":
            attention = "the Triton attention, RMSNorm and SwiGLU ops"
        elif _dispatch.ebt_rows_steps(why is None):
            attention = "the fused CPU ops torch.ops.pyebm.ebt_rows_* (attention with RoPE, RMSNorm, SwiGLU gate)"
        else:
            attention = "ATen attention"
        products = ("the rows' products by torch.ops.pyebm.rows_linear" if why is None
                    else f"ATen products (not rows_linear: {why})")
        return f"cached context, prediction rows only, hand-written backward; {products}; {attention}"

    # -- training / plain forward -------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor, predictions: torch.Tensor, landscape: int = 0) -> torch.Tensor:
        """Differentiable energies [B, S] of vocabulary-space predictions [B, S, V] after tokens [B, S]
        (the full recompute of the original; gradients reach the weights)."""
        tokens = self._check_tokens(tokens)
        params = dict(self.named_parameters())
        return ref.energy(params, self.config, tokens, predictions, landscape)

    # -- inference --------------------------------------------------------------------------------
    def _resolve_options(self, steps, alpha, noise, samples, select, accept_lower, positions, grad_clamp):
        cfg = self.config
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise ValueError(f"steps must be an int >= 1 (or None for the model's default); got {steps!r}")
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise ValueError(f"samples must be an int >= 1; got {samples!r}")
        if select not in ref.SELECT_MODES:
            raise ValueError(f"select must be one of {ref.SELECT_MODES}; got {select!r}")
        if positions not in ("last", "all"):
            raise ValueError(f"positions must be 'last' or 'all'; got {positions!r}")
        # The learned step size and noise are read as numbers; while traced (torch.compile, torch.export) they
        # stay float64 0-d tensors, the same values, which the graph reads from the parameters on every call.
        traced = _rng.tracing()
        if alpha is None:
            alpha = self.alpha.detach().clamp(min=1e-4)
            alpha = alpha.double() if traced else float(alpha)
        if not (traced and isinstance(alpha, torch.Tensor)):
            alpha = float(alpha)
            if not math.isfinite(alpha) or alpha <= 0:
                raise ValueError(f"alpha must be a finite number > 0; got {alpha!r}")
        if noise is None:
            noise = self.langevin_dynamics_noise_std.detach()
            noise = noise.double() if traced else float(noise)
        if not (traced and isinstance(noise, torch.Tensor)):
            noise = float(noise)
            if not math.isfinite(noise) or noise < 0:
                raise ValueError(f"noise must be a finite number >= 0; got {noise!r}")
        if grad_clamp is None:
            grad_clamp = self.clamp_futures_grad_max_change if self.clamp_futures_grad else None
        elif grad_clamp is False:
            grad_clamp = None
        elif not isinstance(grad_clamp, (int, float)) or isinstance(grad_clamp, bool) or not grad_clamp > 0:
            raise ValueError(f"grad_clamp must be a number > 0, False or None; got {grad_clamp!r}")
        schedule = ref.step_schedule(cfg, steps)
        if cfg.ebt_type == "default":
            schedule = [0] * len(schedule)  # one landscape; the step index does not enter the energy
        return schedule, alpha, noise, select, bool(accept_lower), grad_clamp

    def _init_kind(self, init) -> str:
        """``normal``, ``zeros`` or ``tensor``: what ``init`` of think / generate asks for (None: the model's
        training-time initial condition)."""
        if init is None:
            return "zeros" if self.denoising_initial_condition == "zeros" else "normal"
        if isinstance(init, str):
            if init in ("normal", "zeros"):
                return init
            raise ValueError(f"init must be 'normal', 'zeros' or a tensor; got {init!r}")
        if not isinstance(init, torch.Tensor):
            raise TypeError(f"init must be 'normal', 'zeros' or a tensor; got {type(init).__name__}")
        return "tensor"

    def _initial(self, init, B: int, G: int, P: int, generator) -> torch.Tensor:
        V = self.config.vocab_size
        w = self._param
        kind = self._init_kind(init)
        if kind == "normal":
            y = _rng.randn((B, G, P, V), generator, w.device, w.dtype)
            return y * self.gaussian_random_noise_scaling
        if kind == "zeros":
            return w.new_zeros(B, G, P, V)
        if init.dim() == 3 and tuple(init.shape) == (B, P, V):
            init = init.unsqueeze(1).expand(B, G, P, V)
        if tuple(init.shape) != (B, G, P, V):
            raise ValueError(f"init must be [B={B}, samples={G}, positions={P}, V={V}] or [B, positions, V]; "
                             f"got shape {tuple(init.shape)}")
        return init.to(device=w.device, dtype=w.dtype)

    def _think_cached(self, cache: EBTCache, positions: torch.Tensor, y: torch.Tensor, schedule, alpha, noise,
                      select, accept_lower, grad_clamp, generator, need_energy: bool = True,
                      pk: Optional[_Packed] = None, rows=None):
        """Run the update on y [B, G, P, V] for token positions [P]; returns (logits, E, E0, idx) [B, P(, V)].

        Without ``need_energy`` and with one sample, the final energy pass (only used for the selection
        and the reported energy) is skipped and E is None. ``pk`` and ``rows`` (default: the current pack
        and ``_rows`` of the positions) are given by a captured step."""
        cfg = self.config
        if pk is None:
            pk = self._packed()
        B, G, P, V = y.shape
        R = G * P
        if rows is None:
            rows = self._rows(pk, cache, positions, G)
        normalize = cfg.normalize_initial_condition
        y = y.reshape(B, R, V)
        E0 = None
        for landscape in schedule:
            if isinstance(noise, torch.Tensor) or noise != 0:  # a traced learned noise: drawn even when 0
                y = y + noise * _rng.randn(y.shape, generator, y.device, y.dtype)
            p, E, g = self._project_energy(pk, cache, landscape, y, rows, True, normalize)
            if E0 is None:
                E0 = E
            if grad_clamp is not None:
                g = g.clamp(-grad_clamp / alpha, grad_clamp / alpha)
            proposal = p - alpha * g
            if accept_lower:
                E_new = self._project_energy(pk, cache, landscape, proposal, rows, False, normalize)[1]
                y = torch.where((E_new < E).unsqueeze(-1), proposal, p)
            else:
                y = proposal
        if G == 1 and not need_energy:
            zero = torch.zeros(B, P, dtype=torch.long, device=y.device)
            return y.view(B, P, V), None, E0.view(B, P), zero
        E_final = self._project_energy(pk, cache, cfg.num_landscapes - 1, y, rows, False, normalize)[1]
        y, E_final, E0 = y.view(B, G, P, V), E_final.view(B, G, P), E0.view(B, G, P)
        if G == 1:
            return y[:, 0], E_final[:, 0], E0[:, 0], torch.zeros(B, P, dtype=torch.long, device=y.device)
        idx = ref._select(E_final, E0, select)                                   # [B, P]
        b = torch.arange(B, device=y.device)[:, None]
        s = torch.arange(P, device=y.device)[None, :]
        return y[b, idx, s], E_final[b, idx, s], E0[b, idx, s], idx

    @torch.no_grad()
    def think(self, tokens: Union[torch.Tensor, EBTCache], steps: Optional[int] = None,
              alpha: Optional[float] = None, noise: Optional[float] = None, samples: Optional[int] = None,
              select: Optional[str] = None, accept_lower: Optional[bool] = None, positions: str = "last",
              init: Union[str, torch.Tensor, None] = None,
              generator: Union[None, int, torch.Generator, Sequence] = None,
              grad_clamp: Union[float, bool, None] = None) -> ThinkResult:
        """Optimise the next-token prediction(s) of ``tokens`` [B, S] (or of a cache from :meth:`prepare`).

        An option left None is read from ``self.inference`` (:class:`EBTInference`; its defaults are the ones
        written below: samples 1, select ``min``, accept_lower False, None for the others).

        steps         ``default``: the total number of steps (None: ``mcmc_num_steps``); ``time_embed``:
                      steps on each of the ``mcmc_num_steps`` landscapes, visited in order (None: 1, the
                      original ``forward``).
        alpha         step size (None: the model's learned ``alpha``, clamped at 1e-4).
        noise         std of the noise added to the logits before each step's softmax (None: the
                      model's ``langevin_dynamics_noise``; 0 turns it off).
        samples       G, candidates per position, run together and sharing the context cache.
        select        ``min`` / ``max`` final energy, or ``max_gap`` (first-step minus final energy).
        accept_lower  keep a step per position only if it lowers the energy (else stay at softmax(y)).
        positions     ``last`` (the next token) or ``all`` (every position of the prompt).
        init          ``normal`` (N(0, gaussian_random_noise_scaling^2)), ``zeros``, or a tensor
                      [B, G, P, V] or [B, P, V] (P = 1 for ``last``, S for ``all``); None: the model's
                      ``denoising_initial_condition`` (``random_noise`` -> ``normal``).
        grad_clamp    clamp the gradient to +-grad_clamp/alpha (None: the model's ``clamp_futures_grad``
                      setting; False: off).
        generator     a torch.Generator, an int seed or None (torch's global generator); or a list of B of
                      them, one per prompt: prompt b then draws exactly the numbers a call on prompt b alone
                      with ``generator[b]`` draws (its initial vectors and noise), whatever the other prompts.

        With ``cuda_graph=True`` the step is replayed from a CUDA graph (see the class); ``generator`` must
        then be None.
        """
        o = self._options(steps=steps, alpha=alpha, noise=noise, samples=samples, select=select,
                          accept_lower=accept_lower, init=init, grad_clamp=grad_clamp)
        return self._think(tokens, o["steps"], o["alpha"], o["noise"], o["samples"], o["select"], o["accept_lower"],
                           positions, o["init"], generator, o["grad_clamp"], self._graph_mode())

    def _options(self, **given) -> Dict[str, Any]:
        """``given`` with every None replaced by ``self.inference``'s value of that option."""
        defaults = getattr(self, "inference", None)  # an EBT pickled before it existed has none
        if defaults is None:
            defaults = EBTInference()
        elif not isinstance(defaults, EBTInference):
            raise TypeError(f"EBT.inference must be a pyebm.models.EBTInference; got {type(defaults).__name__}")
        return {k: getattr(defaults, k) if v is None else v for k, v in given.items()}

    def _row_generators(self, generator, B: int, where: str):
        """A list / tuple of generators (one per prompt) as ``pyebm._rng.RowGenerators``; others unchanged."""
        if isinstance(generator, (list, tuple)):
            return _rng.row_generators(generator, B, self._param.device, where)
        return generator

    def _graph_mode(self) -> Optional[str]:
        """``graph`` when think and generate replay captured steps (``cuda_graph=True``), else None."""
        flag = self.cuda_graph
        if not isinstance(flag, bool):
            raise TypeError(f"EBT: cuda_graph must be True or False; got {flag!r}")
        return "graph" if flag else None

    def _check_static(self, where: str, static: str, generator) -> None:
        """The captured step's conditions (``pyebm._dispatch.ebt_think_graph_refusal``); ``static="eager"``
        (the same step run without a graph) checks the generator only."""
        why = _dispatch.ebt_think_graph_refusal(self._param.device, generator, capture=static == "graph")
        if why is not None:
            raise ValueError(f"{where}: {why}")

    def _check_cache(self, cache: EBTCache) -> None:
        """A cache of this model's layout (from its :meth:`prepare`), before a captured step copies it."""
        cfg, w = self.config, self._param
        k = cache.keys[0] if cache.keys else None
        want = (cfg.num_landscapes * cache.batch, cfg.multiheaded_attention_heads, cfg.head_dim)
        if (len(cache.keys) != cfg.num_transformer_blocks or cache.landscapes != cfg.num_landscapes
                or (k.shape[0], k.shape[1], k.shape[3]) != want or k.dtype != w.dtype or k.device != w.device):
            got = "no layers" if k is None else f"{len(cache.keys)} layers of {tuple(k.shape)} {k.dtype} on {k.device}"
            raise ValueError(f"tokens: the cache must come from this model's prepare ({cfg.num_transformer_blocks} "
                             f"layers of [{want[0]}, {want[1]}, capacity, {want[2]}] {w.dtype} on {w.device}); "
                             f"got {got}")

    def _static_step(self, B: int, cap: int, G: int, P: int, positions: str, schedule, alpha, noise, select: str,
                     accept_lower: bool, grad_clamp, init_kind: str, need_energy: bool) -> _ThinkGraph:
        """The captured think step of these shapes and options, for the current weights.

        Kept in the model's packed state (``pyebm._state.packs``: never pickled, copied or moved with the
        module). A step captured with another pack of the weights (the model packed again: an optimizer step,
        ``load_state_dict``, ``.data =``, ``repack``) can never replay: every such step is dropped, and this
        one is made again; so is a step whose scalars (alpha, noise, grad_clamp, initial noise scale) differ."""
        pk = self._packed()
        dev = pk.emb.device
        key = (B, cap, G, P, positions, tuple(schedule), select, accept_lower, init_kind, need_energy,
               self._attention_backend(dev), self.backward_mode, pk.emb.dtype, str(dev))
        scalars = (alpha, noise, grad_clamp, self.gaussian_random_noise_scaling)
        graphs = _state.packs(self).setdefault(_GRAPHS, {})
        entry = graphs.get(key)
        if entry is not None and entry.pack is pk and entry.scalars == scalars:
            return entry
        for k in [k for k, e in graphs.items() if e.pack is not pk]:
            del graphs[k]
        entry = graphs[key] = _ThinkGraph(self, pk, scalars, B, cap, G, P, positions, schedule, select,
                                          accept_lower, init_kind, need_energy)
        return entry

    def _think(self, tokens, steps, alpha, noise, samples, select, accept_lower, positions, init, generator,
               grad_clamp, static: Optional[str]) -> ThinkResult:
        """:meth:`think`; ``static``: None (eager), ``graph`` (the captured step replayed) or ``eager`` (the
        captured step's code run without a graph, on any device)."""
        _dispatch.check_not_traced("EBT.think")
        if not isinstance(generator, (list, tuple)):  # one per prompt: made once the batch size is known
            generator = as_generator(generator, self._param.device, "EBT.think")
        schedule, alpha, noise, select, accept_lower, grad_clamp = self._resolve_options(
            steps, alpha, noise, samples, select, accept_lower, positions, grad_clamp)
        if static is not None:
            self._check_static("EBT.think", static, generator)
        if isinstance(tokens, EBTCache):
            cache = tokens
        else:
            cache = self.prepare(self._check_tokens(tokens))
        B, S = cache.tokens.shape
        dev = self._param.device
        generator = self._row_generators(generator, B, "EBT.think")
        if static is None:
            pos = torch.tensor([S - 1], device=dev) if positions == "last" else torch.arange(S, device=dev)
            y = self._initial(init, B, samples, pos.numel(), generator)
            logits, E, E0, idx = self._think_cached(cache, pos, y, schedule, alpha, noise, select, accept_lower,
                                                    grad_clamp, generator)
        else:
            self._check_cache(cache)
            cfg = self.config
            P = 1 if positions == "last" else S
            kind = self._init_kind(init)
            y = self._initial(init, B, samples, P, None) if kind == "tensor" else None
            entry = self._static_step(B, _capacity_bucket(cache.length, cfg.context_length + cfg.offset), samples,
                                      P, positions, schedule, alpha, noise, select, accept_lower, grad_clamp, kind,
                                      True)
            entry.load(cache)
            entry.set_inputs(S, y)
            # copies: a replay overwrites the graph's outputs
            logits, E, E0, idx = (t.clone() for t in entry.run(self, capture=static == "graph"))
        if positions == "last":
            return ThinkResult(logits[:, 0], E[:, 0], E0[:, 0], idx[:, 0])
        return ThinkResult(logits, E, E0, idx)

    @torch.no_grad()
    def generate(self, tokens: torch.Tensor, max_new_tokens: int, steps: Optional[int] = None,
                 alpha: Optional[float] = None, noise: Optional[float] = None, samples: Optional[int] = None,
                 select: Optional[str] = None, accept_lower: Optional[bool] = None,
                 init: Union[str, torch.Tensor, None] = None, grad_clamp: Union[float, bool, None] = None,
                 temperature: Optional[float] = None, top_p: Optional[float] = None,
                 eos_token_id: Optional[int] = None,
                 generator: Union[None, int, torch.Generator, Sequence] = None) -> torch.Tensor:
        """Append up to ``max_new_tokens`` tokens to prompts ``tokens`` [B, S]; returns [B, S + n].

        Each token is one :meth:`think` on the last position (options as there), then greedy argmax
        (``temperature=0``) or top-p sampling of softmax(logits / temperature). ``init`` may also be a
        tensor [B, G, max_new_tokens, V]: the starting vector of each new token's prediction. Generation
        stops early once every prompt has produced ``eos_token_id`` (when given). An option left None is read
        from ``self.inference`` (:class:`EBTInference`: temperature 0, top_p 0.9, no eos_token_id, and the
        think defaults). ``generator`` as for :meth:`think`; with a list (one per prompt), prompt b's initial
        vectors, noise and top-p draws are exactly those of a call on prompt b alone with ``generator[b]``.

        With ``cuda_graph=True`` each token's think step is replayed from a CUDA graph (see the class);
        ``generator`` must then be None (top-p sampling draws from the default CUDA generator).
        """
        o = self._options(steps=steps, alpha=alpha, noise=noise, samples=samples, select=select,
                          accept_lower=accept_lower, init=init, grad_clamp=grad_clamp, temperature=temperature,
                          top_p=top_p, eos_token_id=eos_token_id)
        return self._generate(tokens, max_new_tokens, o["steps"], o["alpha"], o["noise"], o["samples"], o["select"],
                              o["accept_lower"], o["init"], o["grad_clamp"], o["temperature"], o["top_p"],
                              o["eos_token_id"], generator, self._graph_mode())

    def _generate(self, tokens, max_new_tokens, steps, alpha, noise, samples, select, accept_lower, init, grad_clamp,
                  temperature, top_p, eos_token_id, generator, static: Optional[str]) -> torch.Tensor:
        """:meth:`generate`; ``static`` as for :meth:`_think`."""
        _dispatch.check_not_traced("EBT.generate")
        if not isinstance(generator, (list, tuple)):  # one per prompt: made once the batch size is known
            generator = as_generator(generator, self._param.device, "EBT.generate")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0; got {max_new_tokens!r}")
        temperature = float(temperature)
        if not math.isfinite(temperature) or temperature < 0:
            raise ValueError(f"temperature must be >= 0; got {temperature!r}")
        if not 0 < float(top_p) <= 1:
            raise ValueError(f"top_p must be in (0, 1]; got {top_p!r}")
        schedule, alpha, noise, select, accept_lower, grad_clamp = self._resolve_options(
            steps, alpha, noise, samples, select, accept_lower, "last", grad_clamp)
        if static is not None:
            self._check_static("EBT.generate", static, generator)
        tokens = self._check_tokens(tokens, extra=max(max_new_tokens - 1, 0))
        B, S = tokens.shape
        generator = self._row_generators(generator, B, "EBT.generate")
        if max_new_tokens == 0:
            return tokens
        cfg = self.config
        V = cfg.vocab_size
        kind = self._init_kind(init)
        if kind == "tensor":
            if tuple(init.shape) != (B, samples, max_new_tokens, V):
                raise ValueError(f"init must be [B={B}, samples={samples}, max_new_tokens={max_new_tokens}, "
                                 f"V={V}]; got shape {tuple(init.shape)}")
            init = init.to(device=self._param.device, dtype=self._param.dtype)  # once, not per token
        if static is None:
            entry = None
            cache = self.prepare(tokens, capacity=S + max_new_tokens - 1)
        else:
            cap = _capacity_bucket(S + max_new_tokens - 1 + cfg.offset, cfg.context_length + cfg.offset)
            entry = self._static_step(B, cap, samples, 1, "last", schedule, alpha, noise, select, accept_lower,
                                      grad_clamp, kind, False)
            cache = entry.adopt(self.prepare(tokens))  # extend() then writes into the graph's cache buffers
        out = [tokens]
        done = torch.zeros(B, dtype=torch.bool, device=tokens.device)
        for t in range(max_new_tokens):
            n = cache.tokens.shape[1]
            init_t = init[:, :, t:t + 1] if kind == "tensor" else init
            if entry is None:
                pos = torch.tensor([n - 1], device=tokens.device)
                y = self._initial(init_t, B, samples, 1, generator)
                logits = self._think_cached(cache, pos, y, schedule, alpha, noise, select, accept_lower, grad_clamp,
                                            generator, need_energy=False)[0][:, 0]
            else:
                entry.set_inputs(n, init_t if kind == "tensor" else None)
                # the graph's output buffer, read (argmax / softmax) before the next replay writes it
                logits = entry.run(self, capture=static == "graph")[0][:, 0]
            if temperature > 0:
                probs = torch.softmax(logits / temperature, dim=-1)
                if isinstance(generator, _rng.RowGenerators):  # each prompt's draw from its own generator
                    nxt = torch.cat([ref.sample_top_p(probs[b:b + 1], float(top_p), g)
                                     for b, g in enumerate(generator.generators)])
                else:
                    nxt = ref.sample_top_p(probs, float(top_p), generator)
            else:
                nxt = logits.argmax(dim=-1)
            out.append(nxt[:, None])
            if eos_token_id is not None:
                done |= nxt == eos_token_id
                if bool(done.all()):
                    break
            if t < max_new_tokens - 1:
                self._extend(cache, nxt[:, None], check_ids=False)  # ids chosen here: in range by construction
        return torch.cat(out, dim=1)


# -- loading utilities ----------------------------------------------------------------------------

_PREFIXES = ("model._orig_mod.", "_orig_mod.model.", "model.", "_orig_mod.")


def _strip_prefix(sd: Dict[str, Any]) -> Dict[str, Any]:
    for prefix in _PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            return {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def _infer_sizes(sd: Mapping[str, torch.Tensor], hp: Dict[str, Any]) -> None:
    """Fill sizes missing from hp from the tensor shapes of a state dict (never overrides a given value)."""
    emb = sd.get("embeddings.weight")
    if isinstance(emb, torch.Tensor) and emb.dim() == 2:
        hp.setdefault("vocab_size", emb.shape[0])
        hp.setdefault("embedding_dim", emb.shape[1])
    layer_ids = {int(k.split(".")[2]) for k in sd if k.startswith("transformer.layers.") and k.split(".")[2].isdigit()}
    if layer_ids:
        hp.setdefault("num_transformer_blocks", max(layer_ids) + 1)
    te = sd.get("transformer.time_embeddings.weight")
    if "ebt_type" not in hp:
        hp["ebt_type"] = "time_embed" if te is not None else "default"
    if isinstance(te, torch.Tensor) and te.dim() == 2:
        hp.setdefault("mcmc_num_steps", te.shape[0])
    if "vocab_to_embed_uses_prob_dist" not in hp:
        hp["vocab_to_embed_uses_prob_dist"] = "vocab_to_embed.weight" not in sd
    w1 = sd.get("transformer.layers.0.feed_forward.w1.weight")
    if "ffn_dim_multiplier" not in hp and isinstance(w1, torch.Tensor) and w1.dim() == 2 \
            and "embedding_dim" in hp and w1.shape[0] != hp["embedding_dim"]:
        d, hidden = hp["embedding_dim"], w1.shape[0]
        m = hidden / d
        if int(d * m) != hidden:  # int() of the product must give back the width
            m = math.nextafter(m, math.inf)
        hp["ffn_dim_multiplier"] = m
