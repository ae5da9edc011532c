"""Discrete samplers (Gibbs with gradients, DMALA) on an MLPEnergy: eager autograd against pyebm.discrete.

    python bench/bench_samplers.py [--quick] [--device cpu|cuda] [--sizes small,medium,large,categorical]
                                   [--json FILE] [--csv FILE] [--min-samples N] [--max-samples N] [--budget S]

One call = STEPS sampler steps over B*K chains from the same initial states and seed. Columns:
"eager autograd" (baseline, pyebm.bench.sampler_loops: autograd through the module's forward at the
current and the proposed state every step, as public implementations do; tested to give the same chains
as pyebm.discrete), "pyebm, autograd energy" (pyebm.discrete with the module as a plain f(x, y): one
autograd call per step, the current state's values kept), and "pyebm <backend>" (the MLPEnergy's fused
energy_and_grad on that backend, context prepared once). Sampled round-robin like every suite.
"""
import sys

import torch

import pyebm
from pyebm.bench.core import Column, measure_cases
from pyebm.bench.sampler_loops import eager_dmala, eager_gwg
from pyebm.bench.script import run_suite_script
from pyebm.bench.suites import _pyebm_backends, _timing_kw
from pyebm.discrete import dmala, gibbs_with_gradients

# name: (B, K, L, C or None for binary, hidden, context_dim)
SAMPLER_SIZES = {
    "small": (1, 64, 16, None, (64, 64), 32),
    "medium": (8, 128, 64, None, (256, 256), 32),
    "large": (32, 256, 128, None, (256, 256), 32),
    "categorical": (8, 128, 16, 8, (256, 256), 32),
}
STEPS = 10
STEP_SIZE = 0.2


def cases(quick=False, device="cpu", compile=True, sizes=None, sweep=False, sampling=None, progress=None):
    kw = _timing_kw(quick, sampling)
    for name in sizes or list(SAMPLER_SIZES):
        B, K, L, C, hidden, cdim = SAMPLER_SIZES[name]
        cat = C is not None
        D = L * C if cat else L
        torch.manual_seed(0)
        model = pyebm.MLPEnergy(cdim, D, hidden=hidden, activation="silu").to(device)
        x = torch.randn(B, cdim, device=device)
        if cat:
            y0 = torch.nn.functional.one_hot(torch.randint(C, (B, K, L), device=device), C).float()
            fn = lambda xx, yy: model(xx, yy.flatten(2))  # noqa: E731
        else:
            y0 = torch.randint(2, (B, K, L), device=device).float()
            fn = model

        def gen():
            return torch.Generator(device=device).manual_seed(0)

        params = {"B": B, "K": K, "L": L, **({"C": C} if cat else {}), "hidden": list(hidden),
                  "context_dim": cdim, "steps": STEPS}
        for method in ("gwg", "dmala"):
            if method == "gwg":
                def eager():
                    return eager_gwg(fn, x, y0, STEPS, generator=gen(), categorical=cat)

                def ours(energy, **kw2):
                    return gibbs_with_gradients(energy, x, y0, STEPS, categorical=cat, generator=gen(), **kw2)
            else:
                def eager():
                    return eager_dmala(fn, x, y0, STEPS, STEP_SIZE, generator=gen(), categorical=cat)

                def ours(energy, **kw2):
                    return dmala(energy, x, y0, STEPS, step_size=STEP_SIZE, categorical=cat, generator=gen(), **kw2)
            cols = [Column("eager autograd", eager, baseline=True, note="2 autograd calls per step"),
                    Column("pyebm, autograd energy", lambda ours=ours: ours(fn), note="1 autograd call per step")]
            for be in _pyebm_backends(device):
                cols.append(Column(f"pyebm {be}", lambda be=be, ours=ours: ours(model, backend=be)))
            yield from measure_cases("samplers", f"{method} {name}", cols, params, device=device, timing=kw,
                                     progress=progress)


if __name__ == "__main__":
    sys.exit(run_suite_script("bench_samplers", __doc__.splitlines()[0], cases, SAMPLER_SIZES, "small,medium"))
