"""A diffusion-policy baseline for latency comparisons: what users run instead of an energy policy.

A noise-prediction transformer of the usual diffusion-policy shape (action tokens, a time token plus the
observation tokens as the cross-attention memory, pre-norm decoder layers with causal self-attention,
feed-forward width ``ffn_mult * D``), sampled with an eager DDPM loop (100 steps, ancestral, clipped x0,
squared-cosine betas) or a deterministic DDIM loop (8 steps). Plain eager PyTorch under ``no_grad``;
only the latency matters here, the weights are random.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn


def _time_features(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freq = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / (half - 1))
    ang = t.float()[:, None] * freq[None]
    return torch.cat([ang.sin(), ang.cos()], dim=-1)


class NoisePredictionTransformer(nn.Module):
    """eps(x_t, t, obs): x_t [B, T, A], t [B] ints, obs [B, L, cond_dim] -> [B, T, A]."""

    def __init__(self, action_dim: int, horizon: int, cond_dim: int, n_obs_tokens: int, embed_dim: int = 256,
                 layers: int = 8, heads: int = 4, ffn_mult: int = 4):
        super().__init__()
        D = embed_dim
        self.embed_dim = D
        self.input_emb = nn.Linear(action_dim, D)
        self.pos_emb = nn.Parameter(0.02 * torch.randn(1, horizon, D))
        self.cond_obs_emb = nn.Linear(cond_dim, D)
        self.cond_pos_emb = nn.Parameter(0.02 * torch.randn(1, 1 + n_obs_tokens, D))
        self.encoder = nn.Sequential(nn.Linear(D, 4 * D), nn.Mish(), nn.Linear(4 * D, D))
        layer = nn.TransformerDecoderLayer(D, heads, dim_feedforward=ffn_mult * D, dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.decoder = nn.TransformerDecoder(layer, num_layers=layers)
        self.ln_f = nn.LayerNorm(D)
        self.head = nn.Linear(D, action_dim)
        self.register_buffer("causal", torch.triu(torch.full((horizon, horizon), float("-inf")), diagonal=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
        time_tok = _time_features(t, self.embed_dim).to(x.dtype).unsqueeze(1)
        memory = torch.cat([time_tok, self.cond_obs_emb(obs)], dim=1) + self.cond_pos_emb
        memory = self.encoder(memory)
        h = self.input_emb(x) + self.pos_emb
        h = self.decoder(h, memory, tgt_mask=self.causal)
        return self.head(self.ln_f(h))


def _cosine_alphas_cumprod(n: int, s: float = 0.008) -> torch.Tensor:
    steps = torch.arange(n + 1, dtype=torch.float64)
    f = torch.cos(((steps / n) + s) / (1 + s) * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    return torch.cumprod(1 - betas, dim=0)


class DiffusionSampler:
    """DDPM (ancestral, ``steps`` = the training steps) or DDIM (eta 0, ``steps`` spaced timesteps)."""

    def __init__(self, model: NoisePredictionTransformer, train_steps: int = 100, steps: int = 100,
                 kind: str = "ddpm", clip: float = 1.0):
        if kind not in ("ddpm", "ddim"):
            raise ValueError(f"kind must be 'ddpm' or 'ddim'; got {kind!r}")
        self.model, self.kind, self.clip = model, kind, clip
        self.abar = _cosine_alphas_cumprod(train_steps).float()
        if kind == "ddpm":
            self.timesteps = list(range(train_steps - 1, -1, -1))
        else:
            stride = train_steps // steps
            self.timesteps = list(range((steps - 1) * stride, -1, -stride))

    @torch.no_grad()
    def sample(self, obs: torch.Tensor, shape, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        x = torch.randn(shape, generator=generator, dtype=obs.dtype, device=obs.device)
        B = shape[0]
        for i, t in enumerate(self.timesteps):
            t_prev = self.timesteps[i + 1] if i + 1 < len(self.timesteps) else -1
            eps = self.model(x, torch.full((B,), t, dtype=torch.long, device=obs.device), obs)
            ab = float(self.abar[t])
            ab_prev = float(self.abar[t_prev]) if t_prev >= 0 else 1.0
            x0 = ((x - math.sqrt(1 - ab) * eps) / math.sqrt(ab)).clamp(-self.clip, self.clip)
            if self.kind == "ddim":
                eps = (x - math.sqrt(ab) * x0) / math.sqrt(1 - ab)
                x = math.sqrt(ab_prev) * x0 + math.sqrt(1 - ab_prev) * eps
            else:
                alpha = ab / ab_prev
                beta = 1 - alpha
                mean = (math.sqrt(ab_prev) * beta / (1 - ab)) * x0 + (math.sqrt(alpha) * (1 - ab_prev) / (1 - ab)) * x
                if t > 0:
                    var = beta * (1 - ab_prev) / (1 - ab)
                    x = mean + math.sqrt(max(var, 1e-20)) * torch.randn(x.shape, generator=generator,
                                                                         dtype=x.dtype, device=x.device)
                else:
                    x = mean
        return x
