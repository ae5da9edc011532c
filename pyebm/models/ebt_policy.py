"""EBT-Policy energy transformer with a cached observation side and a fused energy + input gradient.

The network is the EBT-Policy energy over an action chunk (see ``pyebm/reference/ebt_policy.py`` for
the math written out). Inference never builds an autograd graph: ``prepare`` computes the observation
side once (the cross-attention keys and values of every layer, after their RMSNorm), and
``energy_and_grad`` runs the forward pass and a hand-written backward pass to the candidate only:
on CPU as one C++ op for the whole network (``pyebm.ops.ebt_policy``), elsewhere as batched PyTorch
ops (all K candidates of an observation share one cross-attention matmul).
"""
from __future__ import annotations

from typing import Dict, Mapping, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from pyebm import _backend, _dispatch, _state
from pyebm.config import event_option, rule_options, schedules
from pyebm.energy import plan_rule
from pyebm.ops import ebt_policy as _op
from pyebm.ops import ebt_policy_triton as _tri
from pyebm.pretrained import Pretrained
from pyebm.protocol import WholeLoopSpec
from pyebm.reference import ebt_policy as ref

_gelu_backward = torch.ops.aten.gelu_backward.default
# whole_loop_spec's answers, by (why no whole-loop op, why no one-call descent) (None: available)
_SPECS: Dict[Tuple[Optional[str], Optional[str]], WholeLoopSpec] = {}


_EbtPolicyPack = getattr(_backend.ext(), "EbtPolicyPack", None)
_NORMALIZE = {None: "none", "rms": "rms", "rms_all": "all"}


def _normalize_args(cfg, dtype: torch.dtype) -> Tuple[str, float]:
    """(normalize, normalize_eps) of ``cfg`` as ``ebt_policy_descent`` takes them."""
    eps = cfg.normalize_eps if cfg.normalize_eps is not None else torch.finfo(dtype).eps
    return _NORMALIZE[cfg.normalize], float(eps)


class EBTPolicyContext(NamedTuple):
    """Observation side of every layer, computed once by :meth:`EBTPolicy.prepare`.

    k [layers, B, H, hd, L]: cross-attention keys after their RMSNorm, pre-multiplied by hd^-0.5 and
    transposed for ``q @ k``; v [layers, B, H, L, hd]; bias [T, L]: 0 where the temporal memory mask
    allows, -inf elsewhere (one tensor shared by the contexts of the same shape: read-only).
    """

    k: torch.Tensor
    v: torch.Tensor
    bias: torch.Tensor

    @property
    def batch(self) -> int:
        return self.k.shape[1]


class _RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = ref.RMS_EPS, **kw):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, **kw))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ref.rms_norm(x, self.weight, self.eps)


class _Embed(nn.Module):
    def __init__(self, action_dim: int, dim: int, **kw):
        super().__init__()
        self.fc1 = nn.Linear(action_dim, dim, **kw)
        self.norm = nn.LayerNorm(dim, eps=ref.LAYER_NORM_EPS, **kw)
        self.fc2 = nn.Linear(dim, dim, **kw)


class _SelfAttention(nn.Module):
    def __init__(self, dim: int, head_dim: int, **kw):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim, **kw)
        self.q_norm = _RMSNorm(head_dim, **kw)
        self.k_norm = _RMSNorm(head_dim, **kw)
        self.proj = nn.Linear(dim, dim, **kw)


class _CrossAttention(nn.Module):
    def __init__(self, dim: int, cond_dim: int, head_dim: int, **kw):
        super().__init__()
        self.q = nn.Linear(dim, dim, **kw)
        self.kv = nn.Linear(cond_dim, 2 * dim, **kw)
        self.q_norm = _RMSNorm(head_dim, **kw)
        self.k_norm = _RMSNorm(head_dim, **kw)
        self.proj = nn.Linear(dim, dim, bias=False, **kw)


class _MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, out: int, **kw):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, **kw)
        self.fc2 = nn.Linear(hidden, out, **kw)


class _Block(nn.Module):
    def __init__(self, dim: int, cond_dim: int, heads: int, **kw):
        super().__init__()
        hd = dim // heads
        self.norm1 = _RMSNorm(dim, **kw)
        self.attn = _SelfAttention(dim, hd, **kw)
        self.norm2 = _RMSNorm(dim, **kw)
        self.cross = _CrossAttention(dim, cond_dim, hd, **kw)
        self.norm3 = _RMSNorm(dim, **kw)
        self.mlp = _MLP(dim, dim, dim, **kw)


class _Head(nn.Module):
    def __init__(self, dim: int, out: int, **kw):
        super().__init__()
        self.norm = _RMSNorm(dim, **kw)
        self.fc1 = nn.Linear(dim, dim, **kw)
        self.fc2 = nn.Linear(dim, out, **kw)


# -- pieces of the hand-written backward pass ----------------------------------------------------
def _rms(x: torch.Tensor, eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(x * r, r) with r = rsqrt(mean(x^2) + eps) over the last dim."""
    r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True).add_(eps))
    return x * r, r


def _rms_backward(dy: torch.Tensor, w: torch.Tensor, xhat: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """d/dx of y = xhat * w with xhat = x * r: r * (gw - xhat * mean(gw * xhat)), gw = dy * w."""
    gw = dy * w
    return (gw - xhat * (gw * xhat).mean(-1, keepdim=True)) * r


def _softmax_backward(dp: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    return p * (dp - (dp * p).sum(-1, keepdim=True))


class EBTPolicy(_state.PackedModule, Pretrained):
    """Energy E(obs tokens, action chunk) of EBT-Policy; lower is better.

    Args:
        action_dim: A, the action width (the original's ``input_dim``).
        horizon: T, actions per chunk (16).
        cond_dim: width of the observation tokens (default ``embed_dim``; the original always feeds
            tokens of width ``embed_dim``).
        embed_dim: D (256). layers: blocks (8). heads: attention heads (4).
        n_obs_steps: observation steps the tokens cover (2); the token count must be a multiple.
        output_dim: O, head outputs averaged into E (default ``action_dim``, as the original).
        grad_mode: "manual" (hand-written backward, default) or "autograd" (autograd on the candidate
            only, weights detached); both give dE/dy without touching the weights' gradients.
        backend: "cpu" (the whole network forward + input gradient as one C++ op), "torch" (batched
            PyTorch ops, any device), "triton" (the PyTorch path with the two attentions as Triton kernels,
            fp32/bf16/fp16; fp64 runs the plain PyTorch path; never chosen automatically) or None
            (``PYEBM_BACKEND``, then the fastest for the tensors' device).

    Protocol (no autograd graph at inference):
        ctx = model.prepare(obs_tokens)           # [B, L, cond_dim] -> cached K/V of every layer
        E = model.energy(ctx, y)                  # y [B, K, T, A] -> [B, K]
        E, G = model.energy_and_grad(ctx, y)      # G = dE/dy [B, K, T, A]
    Training: ``model(obs_tokens, actions)`` is differentiable ([B, T, A] -> [B]; [B, K, T, A] -> [B, K]).
    """

    def __init__(self, action_dim: int, horizon: int = 16, cond_dim: Optional[int] = None,
                 embed_dim: int = 256, layers: int = 8, heads: int = 4, n_obs_steps: int = 2,
                 output_dim: Optional[int] = None, grad_mode: str = "manual", backend: Optional[str] = None,
                 device=None, dtype=None):
        super().__init__()
        cond_dim = embed_dim if cond_dim is None else cond_dim
        output_dim = action_dim if output_dim is None else output_dim
        for name, val in (("action_dim", action_dim), ("horizon", horizon), ("cond_dim", cond_dim),
                          ("embed_dim", embed_dim), ("layers", layers), ("heads", heads),
                          ("n_obs_steps", n_obs_steps), ("output_dim", output_dim)):
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                raise ValueError(f"{name} must be an int >= 1; got {val!r}")
        if embed_dim % heads != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by heads ({heads})")
        if embed_dim % 2 != 0:
            raise ValueError(f"embed_dim must be even (sin-cos positions); got {embed_dim}")
        if grad_mode not in ("manual", "autograd"):
            raise ValueError(f"grad_mode must be 'manual' or 'autograd'; got {grad_mode!r}")
        kw = {"device": device, "dtype": dtype}
        self.action_dim, self.horizon, self.cond_dim = action_dim, horizon, cond_dim
        self.embed_dim, self.num_layers, self.heads = embed_dim, layers, heads
        self.head_dim = embed_dim // heads
        self.n_obs_steps, self.output_dim = n_obs_steps, output_dim
        self.grad_mode = grad_mode
        self.backend = backend
        self.embed = _Embed(action_dim, embed_dim, **kw)
        pos = ref.sincos_positions(horizon, embed_dim, dtype=dtype or torch.get_default_dtype(), device=device)
        self.register_buffer("pos_emb", pos)
        self.blocks = nn.ModuleList(_Block(embed_dim, cond_dim, heads, **kw) for _ in range(layers))
        self.head = _Head(embed_dim, output_dim, **kw)

    @property
    def event_shape(self) -> Tuple[int, int]:
        return (self.horizon, self.action_dim)

    def _weight(self) -> torch.Tensor:
        return _state.attr(self.__dict__["_modules"]["embed"].__dict__["_modules"]["fc1"], "weight")

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the weights (and of the candidates minimize draws)."""
        return self._weight().dtype

    @property
    def device(self) -> torch.device:
        return self._weight().device

    def _pretrained_args(self) -> dict:
        """The constructor arguments (``save_pretrained``)."""
        return dict(action_dim=self.action_dim, horizon=self.horizon, cond_dim=self.cond_dim,
                    embed_dim=self.embed_dim, layers=self.num_layers, heads=self.heads,
                    n_obs_steps=self.n_obs_steps, output_dim=self.output_dim, grad_mode=self.grad_mode,
                    backend=self.backend)

    def extra_repr(self) -> str:
        return (f"action_dim={self.action_dim}, horizon={self.horizon}, cond_dim={self.cond_dim}, "
                f"embed_dim={self.embed_dim}, layers={self.num_layers}, heads={self.heads}, "
                f"n_obs_steps={self.n_obs_steps}, output_dim={self.output_dim}")

    # -- checks ---------------------------------------------------------------------------------

    def _check_obs(self, obs: torch.Tensor, where: str) -> None:
        if not isinstance(obs, torch.Tensor):
            raise TypeError(f"{where}: obs_tokens must be a tensor; got {type(obs).__name__}")
        if obs.dim() != 3 or obs.shape[2] != self.cond_dim or obs.shape[1] < 1:
            raise ValueError(f"{where}: obs_tokens must be [B, L, cond_dim={self.cond_dim}] with L a multiple "
                             f"of n_obs_steps={self.n_obs_steps}; got shape {tuple(obs.shape)}")
        if obs.shape[1] % self.n_obs_steps != 0:
            raise ValueError(f"{where}: obs_tokens has L={obs.shape[1]} tokens, not a multiple of "
                             f"n_obs_steps={self.n_obs_steps}")
        w = self._weight()
        if obs.device != w.device or obs.dtype != w.dtype:
            raise ValueError(f"{where}: obs_tokens is {obs.dtype} on {obs.device} but the model is "
                             f"{w.dtype} on {w.device}")

    def _check_y(self, ctx: EBTPolicyContext, y: torch.Tensor) -> None:
        T, A = self.horizon, self.action_dim
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"y must be a tensor [B, K, horizon={T}, action_dim={A}]; got {type(y).__name__}")
        if y.dim() != 4 or tuple(y.shape[2:]) != (T, A):
            shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise ValueError(f"y must be [B, K, horizon={T}, action_dim={A}]; got {shape}")
        if not isinstance(ctx, EBTPolicyContext):
            raise TypeError(f"ctx must come from EBTPolicy.prepare; got {type(ctx).__name__}")
        if ctx.batch != y.shape[0]:
            raise ValueError(f"ctx was prepared for B={ctx.batch} observations but y has B={y.shape[0]}")
        w = self._weight()
        if y.device != w.device or y.dtype != w.dtype:
            raise ValueError(f"y is {y.dtype} on {y.device} but the model is {w.dtype} on {w.device}")

    # -- observation side -----------------------------------------------------------------------
    def memory_mask(self, n_tokens: int, device=None) -> torch.Tensor:
        """[horizon, n_tokens] bool, True = allowed (action t sees observation step <= t)."""
        return ref.memory_mask(self.horizon, n_tokens, self.n_obs_steps, device=device)

    def _kv_stack(self):
        """The cross-attention key/value weights and biases of every layer stacked ([layers * 2D, C], [layers *
        2D]) and the key norms' weights [layers, hd]: one product computes every layer's observation side.
        Packed once per set of weights (``pyebm._state``)."""
        def names():
            return [f"blocks.{i}.cross.{n}" for i in range(self.num_layers)
                    for n in ("kv.weight", "kv.bias", "k_norm.weight")]

        return _state.packed(self, "kv_stack", names,
                             lambda s: (torch.cat(s[0::3]), torch.cat(s[1::3]), torch.stack(s[2::3])))

    def _context(self, obs: torch.Tensor) -> EBTPolicyContext:
        B, L, _ = obs.shape
        H, hd, n = self.heads, self.head_dim, self.num_layers
        if n:
            grad = torch.is_grad_enabled()
            if grad:  # training (forward): stacked in the graph, gradients reach each layer
                w = torch.cat([blk.cross.kv.weight for blk in self.blocks])
                b = torch.cat([blk.cross.kv.bias for blk in self.blocks])
                k_norm = torch.stack([blk.cross.k_norm.weight for blk in self.blocks])
            else:
                w, b, k_norm = self._kv_stack()
            if not grad and _dispatch.ebt_policy_context_refusal(obs) is None:
                # one C++ call: every layer's product, norm and layouts, the layers split over the threads
                ks, vs = torch.ops.pyebm.ebt_policy_context.default(obs, w, b, k_norm, H, ref.RMS_EPS)
            else:
                kv = F.linear(obs, w, b).view(B, L, n, 2, H, hd)
                k = ref.rms_norm(kv[:, :, :, 0], k_norm[:, None, :])                   # [B, L, layers, H, hd]
                ks = (k * hd ** -0.5).permute(2, 0, 3, 4, 1).contiguous()               # [layers, B, H, hd, L]
                vs = kv[:, :, :, 1].permute(2, 0, 3, 1, 4).contiguous()                 # [layers, B, H, L, hd]
        else:
            ks = obs.new_empty(0, B, H, hd, L)
            vs = obs.new_empty(0, B, H, L, hd)
        return EBTPolicyContext(ks, vs, self._mask_bias(L, obs.device, obs.dtype))

    def _mask_bias(self, L: int, device, dtype) -> torch.Tensor:
        """[horizon, L]: 0 where the temporal memory mask allows, -inf elsewhere. One tensor per (L, device,
        dtype) is kept and shared by every context: read it, do not write it."""
        key = ("mask_bias", L, torch.device(device), dtype)
        packs = _state.packs(self)
        bias = packs.get(key)
        if bias is None:
            with torch.inference_mode(False):  # a plain tensor even when first made under inference_mode
                allowed = self.memory_mask(L, device=device)
                bias = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, float("-inf"))
            if not _state._traced():  # a traced call's tensor is the graph's, never kept
                packs[key] = bias
        return bias

    def prepare(self, obs_tokens: torch.Tensor) -> EBTPolicyContext:
        """Observation tokens [B, L, cond_dim] -> the cross-attention K/V of every layer, once."""
        self._check_obs(obs_tokens, "prepare")
        with torch.no_grad():
            return self._context(obs_tokens)

    # -- the network ----------------------------------------------------------------------------
    @staticmethod
    def _n_visible(ctx: EBTPolicyContext, K: int) -> torch.Tensor:
        # The temporal memory mask is a prefix per action token: count its allowed observation tokens.
        return torch.isfinite(ctx.bias).sum(-1).to(torch.int32).repeat(K)

    def _run(self, ctx: EBTPolicyContext, y: torch.Tensor, saved: Optional[list],
             triton: bool = False) -> torch.Tensor:
        """E [B, K] for y [B, K, T, A]; fills ``saved`` with what the backward pass needs.

        ``triton``: the two attentions run as Triton kernels (``pyebm.ops.ebt_policy_triton``).
        """
        B, K, T, A = y.shape
        N, D, H, hd = B * K, self.embed_dim, self.heads, self.head_dim
        L = ctx.k.shape[-1]
        save = saved is not None
        e = self.embed
        u1 = F.linear(y.reshape(N, T, A), e.fc1.weight, e.fc1.bias)
        xc = u1 - u1.mean(-1, keepdim=True)
        rstd = torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + e.norm.eps)
        xln = xc * rstd
        u2 = torch.addcmul(e.norm.bias, xln, e.norm.weight)
        u4 = F.linear(F.gelu(u2, approximate="tanh"), e.fc2.weight, e.fc2.bias)
        x = F.gelu(u4, approximate="tanh") + self.pos_emb
        if save:
            saved.append((xln, rstd, u2, u4))
        n_vis = self._n_visible(ctx, K) if triton else None
        for i, blk in enumerate(self.blocks):
            # self-attention over the T action tokens of each candidate
            xn1, r1 = _rms(x, blk.norm1.eps)
            qkv = F.linear(xn1 * blk.norm1.weight, blk.attn.qkv.weight, blk.attn.qkv.bias)
            if triton:
                o = _tri.ebt_policy_self_attn_triton(qkv, blk.attn.q_norm.weight, blk.attn.k_norm.weight, H,
                                                     blk.attn.q_norm.eps)
                sa = (qkv,)
            else:
                qkv = qkv.view(N, T, 3, H, hd).permute(2, 0, 3, 1, 4)                    # [3, N, H, T, hd]
                qh, rq = _rms(qkv[0], blk.attn.q_norm.eps)
                kh, rk = _rms(qkv[1], blk.attn.k_norm.eps)
                v = qkv[2]
                qs = qh * (blk.attn.q_norm.weight * hd ** -0.5)
                kn = kh * blk.attn.k_norm.weight
                p = torch.softmax(qs @ kn.transpose(-2, -1), dim=-1)                     # [N, H, T, T]
                o = (p @ v).transpose(1, 2).reshape(N, T, D)
                sa = (qh, rq, kh, rk, qs, kn, v, p)
            x = x + F.linear(o, blk.attn.proj.weight, blk.attn.proj.bias)
            # cross-attention to the cached observation keys/values; the K candidates of one
            # observation are stacked along the query axis so one matmul serves them all
            xn2, r2 = _rms(x, blk.norm2.eps)
            cq = F.linear(xn2 * blk.norm2.weight, blk.cross.q.weight, blk.cross.q.bias)
            cq = cq.view(B, K, T, H, hd).permute(0, 3, 1, 2, 4).reshape(B, H, K * T, hd)
            if triton:
                oc, lse = _tri.ebt_policy_cross_attn_triton(cq, blk.cross.q_norm.weight, ctx.k[i].transpose(-2, -1),
                                                            ctx.v[i], n_vis, blk.cross.q_norm.eps)
                ca = (cq, oc, lse)
            else:
                cqh, rcq = _rms(cq, blk.cross.q_norm.eps)
                s = (cqh * blk.cross.q_norm.weight) @ ctx.k[i]                            # [B, H, K*T, L]
                pc = torch.softmax((s.view(B, H, K, T, L) + ctx.bias).view(B, H, K * T, L), dim=-1)
                oc = pc @ ctx.v[i]
                ca = (cqh, rcq, pc)
            oc = oc.view(B, H, K, T, hd).permute(0, 2, 3, 1, 4).reshape(N, T, D)
            x = x + F.linear(oc, blk.cross.proj.weight)
            # MLP
            xn3, r3 = _rms(x, blk.norm3.eps)
            h1 = F.linear(xn3 * blk.norm3.weight, blk.mlp.fc1.weight, blk.mlp.fc1.bias)
            x = x + F.linear(F.gelu(h1, approximate="tanh"), blk.mlp.fc2.weight, blk.mlp.fc2.bias)
            if save:
                saved.append((xn1, r1, sa, xn2, r2, ca, xn3, r3, h1))
        hm = self.head
        xnf, rf = _rms(x, hm.norm.eps)
        hh = F.linear(xnf * hm.norm.weight, hm.fc1.weight, hm.fc1.bias)
        if save:
            saved.append((xnf, rf, hh))
        out = F.linear(F.gelu(hh, approximate="tanh"), hm.fc2.weight, hm.fc2.bias)
        return out.mean(dim=(-1, -2)).view(B, K)

    def _backward(self, ctx: EBTPolicyContext, y: torch.Tensor, saved: list, triton: bool = False) -> torch.Tensor:
        """dE/dy [B, K, T, A] from the activations saved by ``_run`` (with the same ``triton``)."""
        B, K, T, A = y.shape
        N, D, H, hd = B * K, self.embed_dim, self.heads, self.head_dim
        scale = hd ** -0.5
        hm = self.head
        xnf, rf, hh = saved[-1]
        # dE/d(out) is 1/(T*O) everywhere, so dE/d(gelu(hh)) is one row: the column sums of fc2
        dgh = (hm.fc2.weight.sum(0) / (T * self.output_dim)).expand_as(hh)
        dhh = _gelu_backward(dgh, hh, approximate="tanh")
        dx = _rms_backward(dhh @ hm.fc1.weight, hm.norm.weight, xnf, rf)
        n_vis = self._n_visible(ctx, K) if triton else None
        for i in range(self.num_layers - 1, -1, -1):
            blk = self.blocks[i]
            xn1, r1, sa, xn2, r2, ca, xn3, r3, h1 = saved[1 + i]
            # MLP branch
            dh1 = _gelu_backward(dx @ blk.mlp.fc2.weight, h1, approximate="tanh")
            dx = dx + _rms_backward(dh1 @ blk.mlp.fc1.weight, blk.norm3.weight, xn3, r3)
            # cross-attention branch (keys and values are constants)
            do = (dx @ blk.cross.proj.weight).view(B, K, T, H, hd).permute(0, 3, 1, 2, 4).reshape(B, H, K * T, hd)
            if triton:
                cq, oc, lse = ca
                dcq = _tri.ebt_policy_cross_attn_bwd_triton(do, cq, blk.cross.q_norm.weight,
                                                            ctx.k[i].transpose(-2, -1), ctx.v[i], n_vis, oc, lse,
                                                            blk.cross.q_norm.eps)
            else:
                cqh, rcq, pc = ca
                ds = _softmax_backward(do @ ctx.v[i].transpose(-2, -1), pc)              # [B, H, K*T, L]
                dcq = _rms_backward(ds @ ctx.k[i].transpose(-2, -1), blk.cross.q_norm.weight, cqh, rcq)
            dcq = dcq.view(B, H, K, T, hd).permute(0, 2, 3, 1, 4).reshape(N, T, D)
            dx = dx + _rms_backward(dcq @ blk.cross.q.weight, blk.norm2.weight, xn2, r2)
            # self-attention branch
            if triton:
                dqkv = _tri.ebt_policy_self_attn_bwd_triton(dx @ blk.attn.proj.weight, sa[0], blk.attn.q_norm.weight,
                                                            blk.attn.k_norm.weight, H, blk.attn.q_norm.eps)
            else:
                qh, rq, kh, rk, qs, kn, v, p = sa
                do = (dx @ blk.attn.proj.weight).view(N, T, H, hd).transpose(1, 2)      # [N, H, T, hd]
                dv = p.transpose(-2, -1) @ do
                ds = _softmax_backward(do @ v.transpose(-2, -1), p)
                dq = _rms_backward((ds @ kn) * scale, blk.attn.q_norm.weight, qh, rq)
                dk = _rms_backward(ds.transpose(-2, -1) @ qs, blk.attn.k_norm.weight, kh, rk)
                dqkv = torch.stack((dq, dk, dv), dim=2).permute(0, 3, 2, 1, 4).reshape(N, T, 3 * D)
            dx = dx + _rms_backward(dqkv @ blk.attn.qkv.weight, blk.norm1.weight, xn1, r1)
        e = self.embed
        xln, rstd, u2, u4 = saved[0]
        du4 = _gelu_backward(dx, u4, approximate="tanh")
        du2 = _gelu_backward(du4 @ e.fc2.weight, u2, approximate="tanh")
        g = du2 * e.norm.weight
        du1 = (g - g.mean(-1, keepdim=True) - xln * (g * xln).mean(-1, keepdim=True)) * rstd
        return (du1 @ e.fc1.weight).view(B, K, T, A)

    # -- inference protocol ---------------------------------------------------------------------
    def resolve_backend(self, device: torch.device, backend: Optional[str] = None) -> str:
        """The backend an energy call on ``device`` resolves to: "cpu" (the fused C++ op), "torch", or "triton"
        (the PyTorch path with Triton attention kernels; only when asked for by name)."""
        name = backend or self.backend
        return _dispatch.resolve(device, name, _dispatch.ebt_policy_backends(name))

    def _op_param_names(self):
        """The op's flat parameter list (``pyebm.ops.ebt_policy``) as names under this module."""
        out = [f"embed.{n}" for n in ("fc1.weight", "fc1.bias", "norm.weight", "norm.bias", "fc2.weight", "fc2.bias")]
        out.append("pos_emb")
        for i in range(self.num_layers):
            out += [f"blocks.{i}.{n}" for n in (
                "norm1.weight", "attn.qkv.weight", "attn.qkv.bias", "attn.q_norm.weight", "attn.k_norm.weight",
                "attn.proj.weight", "attn.proj.bias", "norm2.weight", "cross.q.weight", "cross.q.bias",
                "cross.q_norm.weight", "cross.proj.weight", "norm3.weight", "mlp.fc1.weight", "mlp.fc1.bias",
                "mlp.fc2.weight", "mlp.fc2.bias")]
        out += [f"head.{n}" for n in ("norm.weight", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")]
        return out

    def _op_weights(self):
        """(params, transposed weights) for the compiled ops: the module's tensors in the op's order and the
        contiguous transposes of the forward products' weights, packed once per set of weights
        (``pyebm._state``: re-checked against the module on every call)."""
        return _state.packed(self, "op_weights", self._op_param_names,
                             lambda p: (p, _op.transposed_weights(p)))

    def _op_eps(self) -> Tuple[float, float]:
        return (self.blocks[0].norm1.eps if self.num_layers else ref.RMS_EPS), self.embed.norm.eps

    def _fused(self, ctx: EBTPolicyContext, y: torch.Tensor, need_grad: bool):
        with torch.no_grad():  # an inference op: the input gradient only, no graph over the weights
            params, weights_t = self._op_weights()
            return _op.ebt_policy_energy_grad(y, ctx.k, ctx.v, ctx.bias, params, weights_t, self.heads,
                                              *self._op_eps(), need_grad)

    def explain_energy(self, ctx, y, backend: Optional[str] = None) -> str:
        """What an ``energy_and_grad`` call on these inputs runs (``pyebm.explain``)."""
        return {"cpu": "torch.ops.pyebm.ebt_policy_energy_grad (the whole network in one C++ op)",
                "triton": "batched PyTorch ops with the Triton attention ops",
                "autograd": "autograd on the candidate (grad_mode='autograd')",
                "torch": "batched PyTorch ops with the hand-written backward"}[
            _dispatch.ebt_policy_call(self, y, backend, True)]

    # -- the whole descent loop in one call (pyebm.protocol's whole-loop hook) --------------------------
    def whole_loop_spec(self, dtype: torch.dtype) -> WholeLoopSpec:
        """What ``torch.ops.pyebm.ebt_policy_descent`` implements for candidates of ``dtype``: plain gradient
        steps with Euler updates, no noise, no mask; momentum, Nesterov, RMS normalisation per candidate or
        over the batch, energy-scaled steps, clipping, bounds and the early exit on ||g|| per candidate or
        over the batch (not with gradient clipping)."""
        why = None
        if self.grad_mode != "manual":
            why = "grad_mode='autograd' (the whole-loop op runs the hand-written backward)"
        elif not _op.descent_available():
            why = "the compiled extension is not available"
        elif dtype not in (torch.float32, torch.float64):
            why = f"{dtype} candidates (the op takes float32/float64)"
        elif self.dtype != dtype:
            why = f"{dtype} candidates but {self.dtype} weights"
        one_call_why = why
        if why is None and _EbtPolicyPack is None:
            one_call_why = "the compiled extension has no EbtPolicyPack"
        elif why is None and not self._weight().is_cpu:
            one_call_why = f"the weights are on {self._weight().device} (the one-call descent runs the C++ ops)"
        spec = _SPECS.get((why, one_call_why))
        if spec is None:
            spec = _SPECS[(why, one_call_why)] = WholeLoopSpec(
                backends=("cpu",), dtypes=(torch.float32, torch.float64), noise=("none",),
                normalize=(None, "rms", "rms_all"), tol_scopes=("candidate", "all"), tol_all_with_clip=False,
                mask=False, one_call=("cpu",) if one_call_why is None else (), one_call_why=one_call_why,
                unavailable=why)
        return spec

    def _one_call_pack(self):
        """``pyebm._C.EbtPolicyPack``: the observation side's stacked weights (``_kv_stack``) and the ops'
        parameters and transposed weights (``_op_weights``) held together, so that a one-call descent checks
        the module once (``pyebm._state``: one snapshot of every source) and calls C++ once. It shares the
        tensors of those two packs. None without the compiled class."""
        if _EbtPolicyPack is None:
            return None

        def names():
            return [n for i in range(self.num_layers)
                    for n in (f"blocks.{i}.cross.kv.weight", f"blocks.{i}.cross.kv.bias",
                              f"blocks.{i}.cross.k_norm.weight")] + self._op_param_names()

        def build(_):
            w, b, k_norm = self._kv_stack()
            params, weights_t = self._op_weights()
            return _EbtPolicyPack(w, b, k_norm, list(params), list(weights_t), self.heads, *self._op_eps(),
                                  ref.RMS_EPS)

        return _state.packed(self, "one_call", names, build)

    def run_one_call(self, context: torch.Tensor, config, *, y0: torch.Tensor, generator=None,
                     final_energy: bool = True):
        """``minimize``'s "one call" route (``pyebm.protocol``): the observation side, every step of
        ``config`` and the selection in one C++ call (``pyebm._C.EbtPolicyPack``: the kernels of
        ``ebt_policy_context`` and ``ebt_policy_descent``, without the dispatcher), else through those two ops.
        Returns (y, E, E_init, steps, status, best, best_energy, best_index); ``final_energy=False`` (one
        candidate) skips the final energy pass: E and best_energy are then None."""
        if not final_energy and y0.shape[1] != 1:
            raise ValueError(f"EBTPolicy.run_one_call: final_energy=False needs one candidate; got K={y0.shape[1]}")
        if config.noise != "none":
            raise ValueError(f"EBTPolicy.run_one_call: the one-call descent draws no noise; got noise="
                             f"{config.noise!r} (minimize runs such configs on the per-step path)")
        self._check_obs(context, "EBTPolicy.run_one_call")
        pack = self._one_call_pack()
        if pack is not None:
            out = pack.descent(context, y0, self._mask_bias(context.shape[1], context.device, context.dtype),
                               plan_rule(config, y0.dtype, self.event_shape), *_normalize_args(config, y0.dtype),
                               config.tol_scope, bool(final_energy))
            if out is not None:
                return out
        # the two ops (inputs the pack does not take as they are: the ops convert them or raise)
        from pyebm.descent import whole_loop_and_selection

        event, device, dtype = self.event_shape, y0.device, y0.dtype
        bounds = [event_option(n, getattr(config, n), event, device, dtype) for n in ("lower", "upper", "step_clip")]
        return whole_loop_and_selection(self, self.prepare(context), config, backend="cpu", y0=y0, mask=None,
                                        lower=bounds[0], upper=bounds[1], step_clip=bounds[2], generator=generator,
                                        final_energy=final_energy)

    def run_whole_loop(self, ctx: EBTPolicyContext, cfg, *, backend: str = "cpu", y0: torch.Tensor, mask=None,
                       lower=None, upper=None, step_clip=None, generator=None, final_energy: bool = True):
        """Every step of ``cfg`` and the final energy in one call: (y, E_final, E_init, steps, status).
        ``final_energy=False`` skips the final energy pass (E_final is NaN then)."""
        self._check_y(ctx, y0)
        params, weights_t = self._op_weights()
        eta, _ = schedules(cfg)
        flat = [None if t is None else t.reshape(-1) for t in (lower, upper, step_clip)]
        normalize, eps = _normalize_args(cfg, y0.dtype)
        rule = rule_options(cfg)
        del rule["noise_mode"]  # this loop has no noise (whole_loop_spec)
        with torch.no_grad():
            return torch.ops.pyebm.ebt_policy_descent.default(
                y0, ctx.k, ctx.v, ctx.bias, params, weights_t, self.heads, *self._op_eps(), eta, *flat,
                normalize=normalize, normalize_eps=eps, tol_scope=cfg.tol_scope,
                final_energy=bool(final_energy), **rule)

    def energy(self, ctx: EBTPolicyContext, y: torch.Tensor, backend: Optional[str] = None) -> torch.Tensor:
        """E [B, K] for candidates y [B, K, horizon, action_dim]."""
        self._check_y(ctx, y)
        if _dispatch.in_functorch_transform():  # differentiable under torch.func, not an inference op's constant
            return _dispatch.functorch_call(lambda yy: self(ctx, yy), y, False)
        path = _dispatch.ebt_policy_call(self, y, backend, False)
        if path == "cpu":
            return self._fused(ctx, y, False)[0]
        with torch.no_grad():
            return self._run(ctx, y, None, triton=path == "triton")

    def energy_and_grad(self, ctx: EBTPolicyContext, y: torch.Tensor,
                        backend: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """(E [B, K], dE/dy [B, K, horizon, action_dim]) without a graph over the weights (inside a torch.func
        transform: differentiable, through the training forward)."""
        self._check_y(ctx, y)
        if _dispatch.in_functorch_transform():
            return _dispatch.functorch_call(lambda yy: self(ctx, yy), y, True)
        path = _dispatch.ebt_policy_call(self, y, backend, True)
        if path == "autograd":
            return self._energy_and_grad_autograd(ctx, y)
        if path == "cpu":
            return self._fused(ctx, y, True)
        triton = path == "triton"
        saved: list = []
        with torch.no_grad():
            E = self._run(ctx, y, saved, triton)
            return E, self._backward(ctx, y, saved, triton)

    def _energy_and_grad_autograd(self, ctx: EBTPolicyContext, y: torch.Tensor):
        """Autograd on the candidate only: the weights are seen through detached tensors."""
        params = {n: p.detach() for n, p in self.named_parameters()}
        with torch.enable_grad():
            yy = y.detach().requires_grad_(True)
            E = torch.func.functional_call(self, params, (ctx, yy))
            (g,) = torch.autograd.grad(E.sum(), yy)
        return E.detach(), g

    # -- training -------------------------------------------------------------------------------
    def forward(self, obs_tokens, actions: torch.Tensor) -> torch.Tensor:
        """Differentiable E: actions [B, T, A] -> [B], or [B, K, T, A] -> [B, K]. Plain autograd.

        ``obs_tokens`` is [B, L, cond_dim] (the observation side is then differentiable too) or an
        :class:`EBTPolicyContext` from :meth:`prepare` (constant observation side).
        """
        if isinstance(obs_tokens, EBTPolicyContext):
            ctx = obs_tokens
        else:
            self._check_obs(obs_tokens, "forward")
            ctx = self._context(obs_tokens)
        squeeze = isinstance(actions, torch.Tensor) and actions.dim() == 3
        y = actions.unsqueeze(1) if squeeze else actions
        self._check_y(ctx, y)
        E = self._run(ctx, y, None)
        return E.squeeze(1) if squeeze else E

    # -- loading the original weights -----------------------------------------------------------
    @staticmethod
    def reference_key_map(num_layers: int, embed_fc2_index: int = 3) -> Dict[str, str]:
        """{original key: pyebm key} for the original energy network (``PreciousTransformer``).

        The original action embedding is an ``nn.Sequential`` (Linear, LayerNorm, GELU, [Dropout],
        Linear, GELU): its second Linear sits at index 3, or 4 when a projection dropout > 0 was built.
        """
        m = {
            "pos_emb": "pos_emb",
            "input_emb._model.0.weight": "embed.fc1.weight", "input_emb._model.0.bias": "embed.fc1.bias",
            "input_emb._model.1.weight": "embed.norm.weight", "input_emb._model.1.bias": "embed.norm.bias",
            f"input_emb._model.{embed_fc2_index}.weight": "embed.fc2.weight",
            f"input_emb._model.{embed_fc2_index}.bias": "embed.fc2.bias",
            "decoder.final_layer.norm_final.weight": "head.norm.weight",
            "decoder.final_layer.linear.fc1.weight": "head.fc1.weight",
            "decoder.final_layer.linear.fc1.bias": "head.fc1.bias",
            "decoder.final_layer.linear.fc2.weight": "head.fc2.weight",
            "decoder.final_layer.linear.fc2.bias": "head.fc2.bias",
        }
        per_layer = {
            "norm1.weight": "norm1.weight", "norm2.weight": "norm2.weight", "norm3.weight": "norm3.weight",
            "attn.qkv.weight": "attn.qkv.weight", "attn.qkv.bias": "attn.qkv.bias",
            "attn.q_norm.weight": "attn.q_norm.weight", "attn.k_norm.weight": "attn.k_norm.weight",
            "attn.proj.weight": "attn.proj.weight", "attn.proj.bias": "attn.proj.bias",
            "cross_attn.q.weight": "cross.q.weight", "cross_attn.q.bias": "cross.q.bias",
            "cross_attn.kv.weight": "cross.kv.weight", "cross_attn.kv.bias": "cross.kv.bias",
            "cross_attn.q_norm.weight": "cross.q_norm.weight", "cross_attn.k_norm.weight": "cross.k_norm.weight",
            "cross_attn.proj.weight": "cross.proj.weight",
            "ffn.fc1.weight": "mlp.fc1.weight", "ffn.fc1.bias": "mlp.fc1.bias",
            "ffn.fc2.weight": "mlp.fc2.weight", "ffn.fc2.bias": "mlp.fc2.bias",
        }
        for i in range(num_layers):
            for src, dst in per_layer.items():
                m[f"decoder.layers.{i}.{src}"] = f"blocks.{i}.{dst}"
        return m

    @classmethod
    def from_reference(cls, state_dict: Mapping[str, torch.Tensor], *, input_dim: int, cond_dim: int,
                       embed_dim: int, output_dim: int, num_layers: int, num_heads: int, n_obs_steps: int,
                       horizon: int, attn_dropout: float = 0.0, proj_dropout: Optional[float] = None,
                       prefix: Optional[str] = None, backend: Optional[str] = None, device=None,
                       dtype=None) -> "EBTPolicy":
        """Build from the original energy network's state dict, with the original's hyperparameter names.

        ``state_dict`` may be the network's own dict or a whole checkpoint dict (``nets`` / ``ema``), in
        which case the keys under ``...energy_pred_net.`` are used (or give ``prefix``). The dropouts
        only matter for the key layout of the action embedding (inference runs without dropout); it is
        detected from the keys when ``proj_dropout`` is None. Missing, unexpected or mis-shaped keys
        raise a ValueError listing them.
        """
        sd = dict(state_dict)
        if prefix is None:
            found = sorted({k[:k.index("energy_pred_net.") + len("energy_pred_net.")]
                            for k in sd if "energy_pred_net." in k})
            if len(found) > 1:
                raise ValueError(f"state_dict holds several energy networks {found}; pass prefix=")
            prefix = found[0] if found else ""
        if prefix:
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            if not sd:
                raise ValueError(f"no key of state_dict starts with prefix {prefix!r}")
        if proj_dropout is None:
            idx = 4 if any(k.startswith("input_emb._model.4.") for k in sd) else 3
        else:
            idx = 4 if proj_dropout > 0 else 3
        # The original accepts cond_dim but ignores it: its cross-attention reads tokens of width
        # embed_dim. Here too the token width comes from the weights, not from cond_dim.
        kv = sd.get("decoder.layers.0.cross_attn.kv.weight")
        token_dim = int(kv.shape[1]) if kv is not None and kv.dim() == 2 else embed_dim
        model = cls(action_dim=input_dim, horizon=horizon, cond_dim=token_dim, embed_dim=embed_dim,
                    layers=num_layers, heads=num_heads, n_obs_steps=n_obs_steps, output_dim=output_dim,
                    backend=backend, device=device, dtype=dtype)
        mapping = cls.reference_key_map(num_layers, idx)
        missing = sorted(k for k in mapping if k not in sd)
        unexpected = sorted(k for k in sd if k not in mapping)
        if missing or unexpected:
            raise ValueError("state_dict does not match the original energy network with "
                             f"num_layers={num_layers}: missing keys {missing}, unexpected keys {unexpected}")
        own = model.state_dict()
        new = {}
        bad = []
        for src, dst in mapping.items():
            t = sd[src]
            if src == "pos_emb" and t.dim() == 3 and t.shape[0] == 1:
                t = t[0]
            if tuple(t.shape) != tuple(own[dst].shape):
                bad.append(f"{src}: expected {tuple(own[dst].shape)}, got {tuple(t.shape)}")
                continue
            new[dst] = t.to(device=own[dst].device, dtype=own[dst].dtype)
        if bad:
            raise ValueError("state_dict shapes do not match the hyperparameters: " + "; ".join(bad))
        model.load_state_dict(new, strict=True)
        return model

    def to_reference_state_dict(self, embed_fc2_index: int = 3) -> Dict[str, torch.Tensor]:
        """This model's weights keyed as the original energy network's state dict."""
        own = self.state_dict()
        out = {}
        for src, dst in self.reference_key_map(self.num_layers, embed_fc2_index).items():
            t = own[dst]
            out[src] = t.unsqueeze(0) if src == "pos_emb" else t
        return out
