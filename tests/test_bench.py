"""pyebm.bench: the latency API, result renderings and the CLI's argument checks (no timing asserted)."""
import json

import pytest
import torch

import pyebm
import pyebm.bench
from pyebm.bench.core import GEMM_COLUMN, BenchResult, Case
from pyebm.bench.suites import ops_cases
from pyebm.bench.timing import Timing, measure
from pyebm.cli import main as cli_main


def test_measure_returns_ordered_statistics():
    t = measure(lambda: sum(range(100)), warmup=1, repeats=5, min_sample_s=1e-4)
    assert len(t.samples) == 5 and t.min <= t.median <= t.max and t.median <= t.p90 <= t.max
    assert t.calls_per_sample >= 1


def test_latency_on_mlp_energy_reports_every_backend():
    m = pyebm.MLPEnergy(6, 3, hidden=(16, 16))
    res = pyebm.bench.latency(m, torch.randn(2, 6), candidates=4, backends=("eager", "auto", "torch"),
                              warmup=1, repeats=3, min_sample_s=1e-4, memory=True)
    cols = [c.column for c in res.cases]
    assert cols == ["eager", "pyebm auto", "pyebm torch"]
    rows = res.rows()
    assert rows[0]["vs_eager"] == pytest.approx(1.0)
    assert all(r["gflops"] > 0 for r in rows)
    assert all(r["alloc_bytes"] is not None for r in rows)
    d = res.to_dict()
    assert d["meta"]["torch"] == torch.__version__ and len(d["rows"][0]["samples_s"]) == 3
    assert "| latency | step | eager |" in res.markdown()


def test_latency_generic_model_says_so():
    class UserEnergy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 1)

        def forward(self, x, y):
            return self.lin(y).squeeze(-1) ** 2 + x.sum(-1, keepdim=True)

    res = pyebm.bench.latency(UserEnergy(), torch.randn(2, 3), init=torch.randn(2, 5, 4),
                              backends=("eager", "auto"), warmup=1, repeats=3, min_sample_s=1e-4)
    assert "generic autograd path" in res.cases[1].note


def test_latency_bad_input():
    m = pyebm.MLPEnergy(6, 3, hidden=(8,))
    with pytest.raises(ValueError, match="unknown backend"):
        pyebm.bench.latency(m, torch.randn(2, 6), backends=("eager", "fastest"))
    with pytest.raises(ValueError, match="candidates must be >= 1"):
        pyebm.bench.latency(m, torch.randn(2, 6), candidates=0)


def test_ops_suite_small_and_plot(tmp_path):
    cases = list(ops_cases(quick=True, compile=False, memory=False, sizes=["small"], sweep=False))
    cols = [c.column for c in cases]
    assert cols[0] == "eager autograd" and cols[-1] == GEMM_COLUMN
    res = BenchResult(cases)
    assert res.pct_gemm(cases[-1]) == pytest.approx(100.0)
    # A plot needs a batch sweep: fabricate two sweep points from measured timings.
    sweep = [Case("ops", f"B={b}", "pyebm cpu", Timing([1e-5 * b]), params={"batch": b}) for b in (1, 4)]
    path = tmp_path / "p.png"
    BenchResult(sweep).plot(str(path))
    assert path.stat().st_size > 1000
    with pytest.raises(ValueError, match="batch"):
        res.plot(str(tmp_path / "q.png"))


def test_cli_rejects_unknown_suite_and_unwritable_paths(tmp_path):
    with pytest.raises(SystemExit, match="unknown suite 'nope'"):
        cli_main(["bench", "nope"])
    with pytest.raises(SystemExit, match="does not exist"):
        cli_main(["bench", "ops", "--json", str(tmp_path / "missing" / "x.json")])


def test_cli_info_json(capsys):
    assert cli_main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert set(info["backends"]) == {"torch", "cpu", "triton", "cuda"}


def test_descent_suite_small():
    from pyebm.bench.descent_suite import descent_cases

    cases = list(descent_cases(quick=True, compile=False, memory=False, sizes=["small"], sweep=False))
    cols = [c.column for c in cases]
    assert cols[0] == "eager loop" and cols[-1] == GEMM_COLUMN
    if pyebm.backends()["cpu"]:
        assert "pyebm cpu whole-loop" in cols and "pyebm cpu per-step" in cols


def test_eager_descent_baseline_agrees_with_minimize():
    from pyebm.bench.descent_loops import eager_descent

    m = pyebm.MLPEnergy(3, 4, hidden=(16,))
    x, y0 = torch.randn(2, 3), torch.randn(2, 5, 4)
    cfg = pyebm.Descent.gd(steps=5, step_size=0.1)
    best, _ = eager_descent(m, x, y0, cfg)
    torch.testing.assert_close(best, pyebm.minimize(m, x, candidates=5, config=cfg, init=y0).best)


def test_latency_with_descent_config():
    m = pyebm.MLPEnergy(6, 3, hidden=(16,))
    res = pyebm.bench.latency(m, torch.randn(2, 6), config=pyebm.Descent.gd(steps=3), candidates=4,
                              backends=("eager", "auto"), warmup=1, repeats=3, min_sample_s=1e-4)
    sizes = [c.size for c in res.cases]
    assert sizes == ["step", "step", "descent T=3", "descent T=3"]
