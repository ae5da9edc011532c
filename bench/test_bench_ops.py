"""pytest-benchmark suite: `pytest bench/ --benchmark-json out.json` (not part of the unit tests).

Each benchmark times one column of the `ops` suite with pytest-benchmark's own loop; the size, the FLOP
count and the column go to `extra_info`.
"""
import pytest
import torch

import pyebm
from pyebm.bench.suites import OPS_SIZES, mlp_flops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _setup(size):
    B, K, D, hidden, cdim = OPS_SIZES[size]
    torch.manual_seed(0)
    model = pyebm.MLPEnergy(cdim, D, hidden=hidden).to(DEVICE)
    x = torch.randn(B, cdim, device=DEVICE)
    y = torch.randn(B, K, D, device=DEVICE)
    return model, x, y, mlp_flops(B * K, D, hidden)


COLUMNS = ["eager"] + [b for b in ("cpu", "triton", "cuda", "torch") if pyebm.backends()[b]]


@pytest.mark.parametrize("size", list(OPS_SIZES))
@pytest.mark.parametrize("column", COLUMNS)
def test_energy_and_grad(benchmark, size, column):
    model, x, y, flops = _setup(size)
    if column == "eager":
        def fn():
            yy = y.detach().requires_grad_(True)
            E = model(x, yy)
            torch.autograd.grad(E.sum(), yy)
            _sync()
    else:
        if column == "cpu" and DEVICE != "cpu" or column in ("triton", "cuda") and DEVICE != "cuda":
            pytest.skip(f"{column} does not run on {DEVICE}")
        ctx = model.prepare(x)

        def fn():
            model.energy_and_grad(ctx, y, backend=column)
            _sync()

    benchmark.extra_info.update({"size": size, "column": column, "flops": flops, "device": DEVICE})
    benchmark(fn)
