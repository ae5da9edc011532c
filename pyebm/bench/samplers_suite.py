"""`pyebm bench samplers`: discrete samplers (Gibbs with gradients, DMALA) on an MLPEnergy, eager autograd
against pyebm.discrete.

One call = STEPS sampler steps over B*K chains from the same initial states and seed, binary [B, K, L] or
one-hot [B, K, L, C] states. Sizes: small, medium, large, categorical (--quick: small and
small-categorical). Columns:
  eager autograd          the baseline, pyebm.bench.sampler_loops: autograd through the module's forward at
                          the current and the proposed state every step, as public implementations do
                          (tests/test_discrete_samplers.py checks that it gives the same chains as
                          pyebm.discrete with the same generator)
  pyebm, autograd energy  pyebm.discrete with the module as a plain f(x, y): one autograd call per step, the
                          current state's values kept
  pyebm <backend>         the MLPEnergy's fused energy_and_grad on that backend, context prepared once
The columns of a size are sampled together, round-robin (pyebm.bench.timing.measure_interleaved).
"""
from __future__ import annotations

from typing import Callable, Dict, Iterator, List, Optional

import torch

from pyebm.bench.core import Case, Column, measure_cases
from pyebm.bench.sampler_loops import eager_dmala, eager_gwg
from pyebm.bench.suites import _pyebm_backends, _timing_kw, register_suite

# name: (B, K, L, C or None for binary, hidden, context_dim)
SAMPLER_SIZES = {
    "small": (1, 64, 16, None, (64, 64), 32),
    "medium": (8, 128, 64, None, (256, 256), 32),
    "large": (32, 256, 128, None, (256, 256), 32),
    "categorical": (8, 128, 16, 8, (256, 256), 32),
    "small-categorical": (1, 64, 8, 4, (64, 64), 32),
}
SAMPLER_DEFAULT = ("small", "medium", "large", "categorical")
SAMPLER_QUICK = ("small", "small-categorical")
METHODS = ("gwg", "dmala")
STEPS = 10
STEP_SIZE = 0.2


def samplers_cases(quick: bool = False, device: str = "cpu", compile: bool = True, memory: bool = True,
                   sizes: Optional[List[str]] = None, sweep: bool = False,
                   progress: Optional[Callable[[str], None]] = None,
                   sampling: Optional[Dict[str, object]] = None) -> Iterator[Case]:
    """GWG and DMALA, STEPS steps per call, at the named ``sizes`` (default SAMPLER_DEFAULT; quick
    SAMPLER_QUICK). ``compile`` and ``sweep`` are accepted for the CLI and unused (no torch.compile
    column, no batch sweep)."""
    import pyebm
    from pyebm.discrete import dmala, gibbs_with_gradients

    chosen = list(sizes) if sizes is not None else list(SAMPLER_QUICK if quick else SAMPLER_DEFAULT)
    for name in chosen:
        if name not in SAMPLER_SIZES:
            raise ValueError(f"samplers_cases: unknown size {name!r}; choose from {', '.join(SAMPLER_SIZES)}")
    kw = _timing_kw(quick, sampling)
    for name in chosen:
        B, K, L, C, hidden, cdim = SAMPLER_SIZES[name]
        cat = C is not None
        D = L * C if cat else L
        torch.manual_seed(0)
        model = pyebm.MLPEnergy(cdim, D, hidden=hidden, activation="silu").to(device)
        x = torch.randn(B, cdim, device=device)
        if cat:
            y0 = torch.nn.functional.one_hot(torch.randint(C, (B, K, L), device=device), C).float()
            fn = (lambda xx, yy, model=model: model(xx, yy.flatten(2)))
        else:
            y0 = torch.randint(2, (B, K, L), device=device).float()
            fn = model

        def gen():
            return torch.Generator(device=device).manual_seed(0)

        params = {"B": B, "K": K, "L": L, **({"C": C} if cat else {}), "hidden": list(hidden),
                  "context_dim": cdim, "steps": STEPS}
        for method in METHODS:
            if method == "gwg":
                def eager(fn=fn, x=x, y0=y0, cat=cat):
                    return eager_gwg(fn, x, y0, STEPS, generator=gen(), categorical=cat)

                def ours(energy, x=x, y0=y0, cat=cat, **kw2):
                    return gibbs_with_gradients(energy, x, y0, STEPS, categorical=cat, generator=gen(), **kw2)
            else:
                def eager(fn=fn, x=x, y0=y0, cat=cat):
                    return eager_dmala(fn, x, y0, STEPS, STEP_SIZE, generator=gen(), categorical=cat)

                def ours(energy, x=x, y0=y0, cat=cat, **kw2):
                    return dmala(energy, x, y0, STEPS, step_size=STEP_SIZE, categorical=cat, generator=gen(), **kw2)
            cols = [Column("eager autograd", eager, baseline=True, note="2 autograd calls per step"),
                    Column("pyebm, autograd energy", lambda ours=ours, fn=fn: ours(fn),
                           note="1 autograd call per step")]
            for be in _pyebm_backends(device):
                cols.append(Column(f"pyebm {be}", lambda be=be, ours=ours, model=model: ours(model, backend=be)))
            shape = {**params, "step_size": STEP_SIZE} if method == "dmala" else params
            yield from measure_cases("samplers", f"{method} {name}", cols, shape, device=device, timing=kw,
                                     memory=memory, progress=progress)


register_suite("samplers", samplers_cases)
