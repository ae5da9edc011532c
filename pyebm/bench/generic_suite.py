"""`pyebm bench descent --energy conv|resmlp` (and bench/bench_generic.py): a user's own nn.Module energy.

Two energies that are not pyebm models: a small conv energy on [1, 8, 8] images (three 3x3 convolutions, a
context embedding, a linear head) and an MLP with LayerNorm and residual blocks. Columns: the hand-written
autograd loop (the baseline: autograd on y every step, then a final energy pass and the argmin), pyebm's
autograd path (``compile=False``) and pyebm's compiled path (``compile=True``, compiled before timing: the
compile cost is reported in the column's note, not in its samples). T = 10 and T = 50 plain gradient steps.
The columns of a size are sampled together, round-robin (pyebm.bench.timing.measure_interleaved).
"""
from __future__ import annotations

import time
from typing import Callable, Dict, Iterator, List, Optional

import torch
from torch import nn

from pyebm.bench.core import Case, Column, measure_cases
from pyebm.bench.descent_loops import eager_descent
from pyebm.bench.suites import _timing_kw, register_suite

STEP_SIZE = 0.05
ENERGIES = ("conv", "resmlp")
SIZES = {f"{e} T={t}": (e, t) for e in ENERGIES for t in (10, 50)}


class ConvEnergy(nn.Module):
    """E(x, y) for images y [B, K, 1, 8, 8] and a context x [B, cdim]."""

    def __init__(self, channels: int = 8, context_dim: int = 8):
        super().__init__()
        c = channels
        self.c1 = nn.Conv2d(1, c, 3, padding=1)
        self.c2 = nn.Conv2d(c, c, 3, padding=1)
        self.c3 = nn.Conv2d(c, c, 3, padding=1, stride=2)
        self.ctx = nn.Linear(context_dim, c)
        self.head = nn.Linear(c * 16, 1)

    def forward(self, x, y):
        B, K = y.shape[:2]
        h = torch.nn.functional.silu(self.c1(y.reshape(B * K, *y.shape[2:])))
        h = h + self.ctx(x).repeat_interleave(K, 0)[:, :, None, None]
        h = torch.nn.functional.silu(self.c2(h))
        h = torch.nn.functional.silu(self.c3(h))
        return self.head(h.flatten(1)).view(B, K) + 0.5 * y.flatten(2).square().sum(-1)


class ResMLPEnergy(nn.Module):
    """E(x, y) for vectors y [B, K, D]: pre-LayerNorm residual blocks, not an MLPEnergy."""

    def __init__(self, dim: int = 16, context_dim: int = 8, width: int = 64, blocks: int = 3):
        super().__init__()
        self.inp = nn.Linear(dim + context_dim, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU(),
                                                  nn.Linear(width, width)) for _ in range(blocks))
        self.out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 1))

    def forward(self, x, y):
        B, K = y.shape[:2]
        h = self.inp(torch.cat([x[:, None].expand(B, K, -1), y], -1))
        for block in self.blocks:
            h = h + block(h)
        return self.out(h).squeeze(-1)


def make_energy(name: str, device: str = "cpu"):
    """(energy, x, y0, params) of a named energy at its benchmark size."""
    torch.manual_seed(0)
    if name == "conv":
        B, K = 4, 16
        model = ConvEnergy().to(device)
        y0 = torch.randn(B, K, 1, 8, 8, device=device)
        params = {"B": B, "K": K, "event": [1, 8, 8], "channels": 8, "convs": 3}
    elif name == "resmlp":
        B, K = 4, 32
        model = ResMLPEnergy().to(device)
        y0 = torch.randn(B, K, 16, device=device)
        params = {"B": B, "K": K, "D": 16, "width": 64, "blocks": 3}
    else:
        raise ValueError(f"energy must be one of {', '.join(ENERGIES)}; got {name!r}")
    return model, torch.randn(B, 8, device=device), y0, params


def generic_cases(quick: bool = False, device: str = "cpu", compile: bool = True, memory: bool = False,
                  sizes: Optional[List[str]] = None, sweep: bool = False,
                  progress: Optional[Callable[[str], None]] = None,
                  sampling: Optional[Dict[str, object]] = None, energies=ENERGIES) -> Iterator[Case]:
    import pyebm

    kw = _timing_kw(quick, sampling)
    chosen = sizes or [s for s, (e, _) in SIZES.items() if e in energies]
    for size in chosen:
        name, steps = SIZES[size]
        model, x, y0, params = make_energy(name, device)
        params = dict(params, steps=steps)
        cfg = pyebm.Descent.gd(steps=steps, step_size=STEP_SIZE)
        K = y0.shape[1]
        cols = [Column("hand loop", lambda: eager_descent(model, x, y0, cfg), baseline=True),
                Column("pyebm autograd", lambda: pyebm.minimize(model, x, K, cfg, init=y0, compile=False))]
        if compile:
            if progress:
                progress(f"generic {size}: compiling")
            t0 = time.perf_counter()
            pyebm.minimize(model, x, K, cfg, init=y0, compile=True)
            took = time.perf_counter() - t0
            cols.append(Column("pyebm compiled", lambda: pyebm.minimize(model, x, K, cfg, init=y0, compile=True),
                               note=f"first call (compile) {took:.0f} s"))
        yield from measure_cases("generic", size, cols, params, device=device, timing=kw, memory=memory,
                                 progress=progress)


register_suite("generic", generic_cases)
