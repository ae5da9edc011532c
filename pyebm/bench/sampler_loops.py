"""The discrete samplers as users write them today (eager autograd), the baselines of `pyebm bench samplers`.

Each step differentiates ``energy(x, y)`` by autograd at the current AND the proposed state (two
forward + backward passes, context recomputed every call), the pattern of public implementations of Gibbs
with gradients and DMALA. The random numbers are drawn in the same order and shapes as
``pyebm.discrete`` draws them, so with the same generator both give the same chains (tested in
tests/test_discrete_samplers.py): the benchmark compares one sampler on two implementations.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _f_and_grad(energy, x, y, temperature):
    yy = y.detach().requires_grad_(True)
    f = -energy(x, yy) / temperature
    (g,) = torch.autograd.grad(f.sum(), yy)
    return f.detach(), g


def _gumbel_argmax(logits, generator):
    u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=logits.dtype)
    return torch.argmax(logits - torch.log(-torch.log(u)), dim=-1)


def _accept(log_r, generator):
    log_r = torch.nan_to_num(log_r, nan=-math.inf)
    u = torch.rand(log_r.shape, generator=generator, device=log_r.device, dtype=log_r.dtype)
    return torch.log(u) < log_r


def eager_gwg(energy, x, y0, steps, generator=None, temperature=1.0, categorical=False):
    """Gibbs with gradients on binary [B, K, L] or one-hot [B, K, L, C] states; returns the final states."""
    y = y0.clone()
    B, K = y.shape[:2]

    def log_q(y, g):
        if categorical:
            d = (g - (y * g).sum(-1, keepdim=True)).masked_fill(y > 0.5, -math.inf)
        else:
            d = (1 - 2 * y) * g
        return torch.log_softmax(d.reshape(B, K, -1) / 2, dim=-1)

    for _ in range(steps):
        f, g = _f_and_grad(energy, x, y, temperature)
        lq = log_q(y, g)
        idx = _gumbel_argmax(lq, generator)
        y_new = y.clone()
        if categorical:
            C = y.shape[-1]
            site, cls = idx // C, idx % C
            back = site * C + y.argmax(-1).gather(-1, site[..., None]).squeeze(-1)
            b, k = torch.meshgrid(torch.arange(B, device=y.device), torch.arange(K, device=y.device), indexing="ij")
            y_new[b, k, site] = F.one_hot(cls, C).to(y.dtype)
        else:
            back = idx
            y_new.scatter_(-1, idx[..., None], 1 - y.gather(-1, idx[..., None]))
        f_new, g_new = _f_and_grad(energy, x, y_new, temperature)
        log_r = (f_new - f + log_q(y_new, g_new).gather(-1, back[..., None]).squeeze(-1)
                 - lq.gather(-1, idx[..., None]).squeeze(-1))
        acc = _accept(log_r, generator).view(B, K, *([1] * (y.dim() - 2)))
        y = torch.where(acc, y_new, y)
    return y


def eager_dmala(energy, x, y0, steps, step_size, generator=None, temperature=1.0, categorical=False, mh=True):
    """DMALA (DULA with ``mh=False``) on binary [B, K, L] or one-hot [B, K, L, C] states; returns the final states."""
    y = y0.clone()
    B, K = y.shape[:2]

    def logits(y, g):
        if categorical:
            return (g - (y * g).sum(-1, keepdim=True)) / 2 - (1 - y) / step_size
        return (1 - 2 * y) * g / 2 - 1 / (2 * step_size)

    def log_q(lg, move):
        if categorical:
            return (torch.log_softmax(lg, -1) * move).sum((-2, -1))
        return (move * F.logsigmoid(lg) + (1 - move) * F.logsigmoid(-lg)).sum(-1)

    for _ in range(steps):
        f, g = _f_and_grad(energy, x, y, temperature)
        lg = logits(y, g)
        if categorical:
            y_new = F.one_hot(_gumbel_argmax(lg, generator), y.shape[-1]).to(y.dtype)
            fwd, back = y_new, y
        else:
            u = torch.rand(lg.shape, generator=generator, device=lg.device, dtype=lg.dtype)
            flip = (u < torch.sigmoid(lg)).to(y.dtype)
            y_new = y + flip * (1 - 2 * y)
            fwd = back = flip
        if not mh:
            y = y_new
            continue
        f_new, g_new = _f_and_grad(energy, x, y_new, temperature)
        log_r = f_new - f + log_q(logits(y_new, g_new), back) - log_q(lg, fwd)
        acc = _accept(log_r, generator).view(B, K, *([1] * (y.dim() - 2)))
        y = torch.where(acc, y_new, y)
    return y
