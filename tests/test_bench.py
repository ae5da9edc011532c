"""pyebm.bench: the statistics (known answers on synthetic samples), the interleaved adaptive sampler (on a
fake clock), noise warnings, comparisons and history, the latency API, renderings and the CLI. No speed is
asserted: every measured timing here is only checked for its structure."""
import csv
import json
import os

import numpy as np
import pytest
import torch

import pyebm
import pyebm.bench
from pyebm.bench import compare as bcompare
from pyebm.bench import host, stats
from pyebm.bench.core import GEMM_COLUMN, BenchResult, Case, shape_label
from pyebm.bench.suites import ops_cases
from pyebm.bench.timing import Timing, measure, measure_interleaved
from pyebm.cli import main as cli_main

TINY = {"min_samples": 3, "max_samples": 3, "budget_s": 0.0, "warmup": 1, "min_sample_s": 0.0}


def test_measure_returns_ordered_statistics():
    t = measure(lambda: sum(range(100)), warmup=1, repeats=5, min_sample_s=1e-4)
    assert len(t.samples) == 5 and t.min <= t.q25 <= t.median <= t.q75 <= t.max and t.median <= t.p90 <= t.max
    assert t.calls_per_sample >= 1 and not t.interleaved


def test_latency_on_mlp_energy_reports_every_backend():
    m = pyebm.MLPEnergy(6, 3, hidden=(16, 16))
    res = pyebm.bench.latency(m, torch.randn(2, 6), candidates=4, backends=("eager", "auto", "torch"),
                              warmup=1, repeats=3, max_samples=3, min_sample_s=1e-4, memory=True)
    cols = [c.column for c in res.cases]
    assert cols == ["eager", "pyebm auto", "pyebm torch"]
    rows = res.rows()
    assert rows[0]["vs_eager"] == pytest.approx(1.0)
    assert all(r["gflops"] > 0 for r in rows)
    assert all(r["alloc_bytes"] is not None for r in rows)
    th = torch.get_num_threads()
    assert all(r["shape"] == f"B=2 K=4 event=3, float32, {th} thread{'s' if th != 1 else ''}, cpu" for r in rows)
    d = res.to_dict()
    assert d["meta"]["torch"] == torch.__version__ and len(d["rows"][0]["samples_s"]) == 3
    assert all(r["interleaved"] and r["sampling"]["rounds"] == 3 for r in d["rows"])
    assert d["method"]["interleaved"] is True
    assert f"| latency | step | {rows[0]['shape']} | eager |" in res.markdown()


def test_latency_generic_model_says_so():
    class UserEnergy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 1)

        def forward(self, x, y):
            return self.lin(y).squeeze(-1) ** 2 + x.sum(-1, keepdim=True)

    res = pyebm.bench.latency(UserEnergy(), torch.randn(2, 3), init=torch.randn(2, 5, 4),
                              backends=("eager", "auto"), warmup=1, repeats=3, max_samples=3, min_sample_s=1e-4)
    assert "generic autograd path" in res.cases[1].note


def test_latency_bad_input():
    m = pyebm.MLPEnergy(6, 3, hidden=(8,))
    with pytest.raises(ValueError, match="unknown backend"):
        pyebm.bench.latency(m, torch.randn(2, 6), backends=("eager", "fastest"))
    with pytest.raises(ValueError, match="candidates must be >= 1"):
        pyebm.bench.latency(m, torch.randn(2, 6), candidates=0)
    with pytest.raises(ValueError, match="max_samples must be >= repeats"):
        pyebm.bench.latency(m, torch.randn(2, 6), repeats=5, max_samples=2)


def test_ops_suite_small_and_plot(tmp_path):
    cases = list(ops_cases(quick=True, compile=False, memory=False, sizes=["small"], sweep=False, sampling=TINY))
    cols = [c.column for c in cases]
    assert cols[0] == "eager autograd" and cols[-1] == GEMM_COLUMN
    assert all(c.timing.n == 3 and c.timing.interleaved for c in cases)
    res = BenchResult(cases)
    assert res.pct_gemm(cases[-1]) == pytest.approx(100.0)
    shapes = {r["shape"] for r in res.rows()}
    assert len(shapes) == 1 and shapes.pop().startswith("B=1 K=32 D=16 hidden=64x64 ctx=32, float32, ")
    # A plot needs a batch sweep: fabricate sweep points from synthetic samples, paired within each batch.
    sweep = []
    for b in (1, 4, 16):
        sampling = {"interleaved": True, "rounds": 5}
        for col, scale, base in (("eager autograd", 3.0, True), ("torch.compile", 2.0, False),
                                 ("pyebm cpu", 1.0, False)):
            sweep.append(Case("ops", f"B={b}", col, Timing([scale * 1e-5 * b * (1 + 0.01 * i) for i in range(5)],
                                                          interleaved=True),
                              baseline=base, params={"B": b, "K": 8, "batch": b}, sampling=sampling))
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

    cases = list(descent_cases(quick=True, compile=False, memory=False, sizes=["small"], sweep=False, sampling=TINY))
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
                              backends=("eager", "auto"), warmup=1, repeats=3, max_samples=3, min_sample_s=1e-4)
    sizes = [c.size for c in res.cases]
    assert sizes == ["step", "step", "descent T=3", "descent T=3"]


# -- statistics: known answers on synthetic samples -------------------------------------------------------

def test_quantiles_iqr_and_summary_known_answers():
    x = [9.0, 1.0, 5.0, 3.0, 7.0, 2.0, 8.0, 4.0, 6.0]  # 1..9 shuffled
    s = stats.summary(x)
    assert (s["median"], s["q25"], s["q75"], s["iqr"], s["min"], s["max"], s["n"]) == (5.0, 3.0, 7.0, 4.0, 1.0, 9.0, 9)
    assert s["p90"] == pytest.approx(8.2) and s["spread"] == pytest.approx(0.8)
    assert stats.quantile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5  # interpolated between the middle pair
    assert stats.quantile(x, 0.25) == pytest.approx(np.quantile(x, 0.25))
    t = Timing([v * 1e-6 for v in x])
    assert (t.median, t.q25, t.q75, t.n) == pytest.approx((5e-6, 3e-6, 7e-6, 9))
    assert t.spread == pytest.approx(0.8)
    with pytest.raises(ValueError, match="no samples"):
        stats.quantile([], 0.5)


def test_bootstrap_interval_of_exactly_scaled_pairs_is_the_point():
    rng = np.random.default_rng(1)
    base = rng.lognormal(0.0, 0.5, size=31)
    ci = stats.bootstrap_ratio_ci(base, base * 0.5, paired=True)
    assert ci == (2.0, 2.0)
    assert stats.ratio_of_medians(base, base * 0.5) == 2.0
    assert stats.bootstrap_ratio_ci([1.0], [2.0]) is None  # one sample: no interval


def test_paired_bootstrap_removes_load_shared_by_a_round():
    # Each round's host load multiplies both columns alike; the columns differ by an exact 3x plus 1% noise.
    rng = np.random.default_rng(2)
    load = rng.lognormal(0.0, 0.4, size=40)
    base = 3.0 * load * rng.lognormal(0.0, 0.01, size=40)
    other = load * rng.lognormal(0.0, 0.01, size=40)
    paired = stats.bootstrap_ratio_ci(base, other, paired=True)
    unpaired = stats.bootstrap_ratio_ci(base, other, paired=False)
    assert paired[0] <= 3.0 <= paired[1]
    assert stats.rel_half_width(paired, 3.0) < 0.02 < 0.1 < stats.rel_half_width(unpaired, 3.0)


def test_bootstrap_interval_covers_the_true_ratio_and_is_reproducible():
    # Independent lognormal columns whose medians are exactly 2e-3 and 1e-3: the 95% interval of the ratio
    # of medians must contain 2 in roughly 95% of 60 synthetic runs (a percentile bootstrap of a median
    # undercovers a little at n=25; 85% is far from what a broken interval gives).
    rng = np.random.default_rng(3)
    hits = 0
    for _ in range(60):
        a = 2e-3 * rng.lognormal(0.0, 0.3, size=25)
        b = 1e-3 * rng.lognormal(0.0, 0.3, size=25)
        lo, hi = stats.bootstrap_ratio_ci(a, b, paired=False, resamples=1000)
        hits += lo <= 2.0 <= hi
    assert hits >= 51
    a, b = rng.lognormal(size=15), rng.lognormal(size=15)
    assert stats.bootstrap_ratio_ci(a, b) == stats.bootstrap_ratio_ci(a, b)  # fixed seed
    assert stats.bootstrap_ratio_ci(a, b, seed=1) != stats.bootstrap_ratio_ci(a, b, seed=2)
    with pytest.raises(ValueError, match="confidence"):
        stats.bootstrap_ratio_ci(a, b, confidence=1.5)


# -- the interleaved, adaptive sampler ------------------------------------------------------------------

def test_columns_are_sampled_round_robin():
    log = []
    cols = [(name, (lambda name=name: log.append(name))) for name in ("eager", "compile", "pyebm")]
    r = measure_interleaved(cols, warmup=0, min_samples=4, max_samples=4, min_sample_s=0.0, host=False)
    # one calibration call per column, then four rounds of one sample per column, in column order
    assert log == ["eager", "compile", "pyebm"] * 5
    assert r.rounds == 4 and r.stop == "max samples"
    assert all(t.n == 4 and t.interleaved and t.calls_per_sample == 1 for t in r.timings.values())
    assert r.sampling()["interleaved"] is True


class FakeClock:
    """A clock that only moves when a fake column runs: every column's cost is known exactly."""

    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t

    def column(self, cost):
        def fn():
            self.t += cost() if callable(cost) else cost
        return fn


def test_adaptive_sampling_stops_once_every_ratio_is_tight():
    clk = FakeClock()
    cols = [("eager", clk.column(2e-3)), ("fast", clk.column(1e-3))]
    r = measure_interleaved(cols, warmup=0, min_samples=5, max_samples=100, budget_s=100.0, min_sample_s=0.0,
                            host=False, clock=clk)
    assert r.stop == "converged" and r.rounds == 5  # no noise: tight as soon as it may stop
    assert r.timings["eager"].median == pytest.approx(2e-3) and r.timings["fast"].median == pytest.approx(1e-3)

    rng = np.random.default_rng(4)
    clk = FakeClock()
    cols = [("eager", clk.column(2e-3)), ("fast", clk.column(lambda: 1e-3 * rng.lognormal(0.0, 0.1)))]
    r = measure_interleaved(cols, warmup=0, min_samples=5, max_samples=400, budget_s=100.0, min_sample_s=0.0,
                            host=False, clock=clk)
    assert r.stop == "converged" and 5 < r.rounds < 400 and r.precision["fast"] <= 0.05


def test_adaptive_sampling_stops_at_the_budget_or_the_cap():
    rng = np.random.default_rng(5)
    clk = FakeClock()
    cols = [("eager", clk.column(2e-3)), ("noisy", clk.column(lambda: 1e-3 * rng.lognormal(0.0, 1.5)))]
    r = measure_interleaved(cols, warmup=0, min_samples=5, max_samples=30, budget_s=1e9, min_sample_s=0.0,
                            host=False, clock=clk)
    assert r.stop == "max samples" and r.rounds == 30 and r.precision["noisy"] > 0.05
    clk = FakeClock()
    cols = [("eager", clk.column(2e-3)), ("noisy", clk.column(lambda: 1e-3 * rng.lognormal(0.0, 1.5)))]
    r = measure_interleaved(cols, warmup=0, min_samples=5, max_samples=10_000, budget_s=0.2, min_sample_s=0.0,
                            host=False, clock=clk)
    assert r.stop == "time budget" and 5 <= r.rounds < 10_000 and r.elapsed_s >= 0.2
    with pytest.raises(ValueError, match="min_samples <= max_samples"):
        measure_interleaved(cols, min_samples=5, max_samples=4)
    with pytest.raises(ValueError, match="distinct"):
        measure_interleaved([("a", cols[0][1]), ("a", cols[1][1])])


# -- reliability: the factor-of-two refusal, spreads, host load -------------------------------------------

def _group(columns, host_before=None, host_after=None, suite="ops", size="small", params=None):
    """Cases of one size from synthetic samples (seconds), the first column the baseline, paired."""
    sampling = {"interleaved": True, "rounds": len(columns[0][1]), "stop": "converged", "rel_ci_target": 0.05,
                "host_before": host_before, "host_after": host_after}
    params = params or {"B": 1, "K": 32, "D": 16, "hidden": [64, 64], "dtype": "float32", "threads": 1,
                        "device": "cpu"}
    return [Case(suite, size, name, Timing(list(samples), interleaved=True), baseline=(i == 0), params=params,
                 sampling=sampling) for i, (name, samples) in enumerate(columns)]


QUIET = {"loadavg": [0.0, 0.0, 0.0], "cpu_mhz": [2000.0, 2000.0], "other_running_threads": 0}


def test_a_ratio_whose_interval_spans_more_than_2x_is_not_printed():
    rng = np.random.default_rng(6)
    eager = 1e-3 * (1 + 0.01 * rng.standard_normal(9))
    tight = eager / 4 * (1 + 0.01 * rng.standard_normal(9))
    wild = 1e-4 * np.array([1, 10, 1, 10, 1, 10, 1, 10, 3.0])  # ratios 10x and 1x, paired or not
    res = BenchResult(_group([("eager autograd", eager), ("pyebm cpu", tight), ("torch.compile", wild)],
                             QUIET, QUIET), meta={"usable_cores": 2})
    rows = {r["column"]: r for r in res.rows()}
    ok, noisy = rows["pyebm cpu"], rows["torch.compile"]
    assert ok["vs_eager_status"] == "ok" and ok["vs_eager"] == pytest.approx(4.0, rel=0.05)
    lo, hi = ok["vs_eager_ci"]
    assert lo <= ok["vs_eager"] <= hi and hi / lo < 1.1
    assert noisy["vs_eager_status"] == "noisy" and noisy["vs_eager"] is None
    assert noisy["vs_eager_ci"][1] / noisy["vs_eager_ci"][0] > 2.0 and noisy["vs_eager_estimate"] > 0
    assert any("not printed" in w and "spans" in w for w in noisy["warnings"])
    md = res.markdown()
    line = next(ln for ln in md.splitlines() if "| torch.compile |" in ln)
    assert "| noisy |" in line and "[1]" in line
    assert "| pyebm cpu |" in md and f"{ok['vs_eager']:.3g} [" in md
    d = res.to_dict()
    assert d["rows"][2]["vs_eager"] is None
    assert [w["column"] for w in d["warnings"]] == ["torch.compile", "torch.compile"]  # refusal and spread


def test_spread_and_host_load_warnings():
    rng = np.random.default_rng(7)
    eager = 1e-3 * (1 + 0.01 * rng.standard_normal(15))
    spread = 5e-4 * (1 + 0.6 * rng.random(15))  # IQR about 30% of the median
    calm = 5e-4 * (1 + 0.01 * rng.standard_normal(15))
    res = BenchResult(_group([("eager autograd", eager), ("spread", spread), ("calm", calm)], QUIET, QUIET),
                      meta={"usable_cores": 2})
    rows = {r["column"]: r for r in res.rows()}
    assert any(w.startswith("spread: IQR is") for w in rows["spread"]["warnings"])
    assert rows["calm"]["warnings"] == [] and rows["eager autograd"]["warnings"] == []
    assert "host was busy" not in res.legend()

    busy = {"loadavg": [6.0, 5.0, 4.0], "cpu_mhz": [3000.0, 3000.0], "other_running_threads": 3}
    res = BenchResult(_group([("eager autograd", eager), ("calm", calm)], QUIET, busy), meta={"usable_cores": 2})
    msgs = res.rows()[1]["warnings"]
    assert any(m.startswith("host loaded: 1-min load average 6.00 on 2 cores") for m in msgs)
    assert "3 other thread(s) running on the host during the measurement" in msgs
    assert any(m.startswith("CPU frequency changed from 2000 to 3000 MHz") for m in msgs)
    host_rows = [w for w in res.to_dict()["warnings"] if w["column"] is None]
    assert len(host_rows) == 3  # once per size, not once per column
    assert "(every column)" in res.markdown()
    assert "The host was busy during this run" in res.legend()
    assert host.host_warnings(QUIET, QUIET, threads=2, cores=2) == []
    # this run's own threads are not load: 2 threads on 2 cores with a load average of 2 is a quiet host
    assert host.host_warnings({**QUIET, "loadavg": [2.0, 2.0, 2.0]}, None, threads=2, cores=2) == []


def test_host_state_and_machine_info_record_this_machine():
    s = host.host_state()
    assert len(s["loadavg"]) == 3 and isinstance(s["other_running_threads"], int)
    info = pyebm.bench.machine_info("cpu")
    for k in ("cpu_model", "cpu_isa", "cpu_count", "usable_cores", "governor", "torch", "triton", "pyebm", "commit"):
        assert k in info
    assert info["cpu_isa"] in ("avx512", "avx2", "baseline")
    flags = host.cpu_flags()
    if flags and pyebm.backends()["cpu"] and "avx2" in flags:
        # the extension reports the level its kernels use: the widest the CPU flags allow, or PYEBM_CPU_ISA's
        assert info["cpu_isa_source"] == "pyebm._C.build_info()"
        assert info["cpu_isa"] == pyebm._backend.ext().cpu_isa()["active"]
        assert pyebm._backend.ext().cpu_isa()["supported"][0] == host.isa_from_flags(flags)
    assert host.isa_from_flags(["avx2", "fma", "avx512f", "avx512dq"]) == "avx512"
    assert host.isa_from_flags(["avx2", "fma", "avx512f"]) == "avx2"
    assert host.isa_from_flags(["sse4_2"]) == "baseline"


def test_user_sample_bounds_win_over_defaults():
    from pyebm.bench.suites import _timing_kw

    assert _timing_kw(True, {"max_samples": 3})["min_samples"] == 3
    assert _timing_kw(True, {"min_samples": 50})["max_samples"] == 50
    kw = _timing_kw(False, {"budget_s": 1.5, "min_samples": None})
    assert kw["budget_s"] == 1.5 and kw["min_samples"] == 10
    with pytest.raises(ValueError, match="below min_samples"):
        _timing_kw(True, {"min_samples": 9, "max_samples": 3})


def test_shape_label_names_every_dimension():
    p = {"B": 8, "K": 32, "D": 32, "hidden": [256, 256], "context_dim": 32, "batch": 8, "dtype": "float32",
         "threads": 2, "device": "cpu"}
    assert shape_label(p) == "B=8 K=32 D=32 hidden=256x256 ctx=32, float32, 2 threads, cpu"
    assert shape_label(p, run=False) == "B=8 K=32 D=32 hidden=256x256 ctx=32"
    assert shape_label({"horizon": 16, "batch": 1, "threads": 1}) == "horizon=16 batch=1, 1 thread"


# -- compare, CSV, history ----------------------------------------------------------------------------------

def _run_json(path, medians, seed, spread=0.02, n=15):
    rng = np.random.default_rng(seed)
    cases = []
    for size, cols in medians.items():
        cases += _group([(c, m * (1 + spread * rng.standard_normal(n))) for c, m in cols], QUIET, QUIET, size=size)
    BenchResult(cases, meta={"usable_cores": 2, "commit": f"c{seed}"}).to_json(str(path))
    return str(path)


def test_compare_flags_only_changes_beyond_noise(tmp_path):
    old = _run_json(tmp_path / "old.json", {"small": [("eager", 1e-3), ("pyebm", 1e-4), ("same", 5e-4)],
                                            "large": [("eager", 1e-2), ("gone", 1e-3)]}, seed=1)
    new = _run_json(tmp_path / "new.json", {"small": [("eager", 1e-3), ("pyebm", 0.5e-4), ("same", 5e-4)],
                                            "large": [("eager", 1.3e-2), ("added", 1e-3)]}, seed=2)
    entries = bcompare.compare(bcompare.load(old), bcompare.load(new))
    verdict = {(e["size"], e["column"]): e["verdict"] for e in entries}
    assert verdict == {("small", "eager"): "within noise", ("small", "pyebm"): "faster",
                       ("small", "same"): "within noise", ("large", "eager"): "slower",
                       ("large", "gone"): "only in old", ("large", "added"): "only in new"}
    e = next(e for e in entries if e["column"] == "pyebm")
    assert e["change"] == pytest.approx(-0.5, abs=0.03) and e["ratio_ci"][1] < 1.0 and e["iqr_overlap"] is False
    assert e["old_vs_eager"] == pytest.approx(10, rel=0.05) and e["new_vs_eager"] == pytest.approx(20, rel=0.05)
    # a shift inside the noise: the interval may exclude 1 with many samples, but the IQRs overlap
    wide_old = _run_json(tmp_path / "wo.json", {"s": [("eager", 1e-3)]}, seed=3, spread=0.2, n=200)
    wide_new = _run_json(tmp_path / "wn.json", {"s": [("eager", 1.05e-3)]}, seed=4, spread=0.2, n=200)
    (e,) = bcompare.compare(bcompare.load(wide_old), bcompare.load(wide_new))
    assert e["iqr_overlap"] and e["verdict"] == "within noise"

    out = tmp_path / "cmp.csv"
    assert cli_main(["bench", "compare", old, new, "--csv", str(out)]) == 0
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and rows[1]["column"] == "pyebm" and rows[1]["verdict"] == "faster"
    assert float(rows[1]["ratio_ci_hi"]) < 1.0


def test_compare_rejects_bad_input(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"meta": {}}))
    with pytest.raises(SystemExit, match="not a pyebm bench result"):
        cli_main(["bench", "compare", str(bad), str(bad)])
    with pytest.raises(SystemExit, match="give two runs"):
        cli_main(["bench", "compare", str(bad)])
    with pytest.raises(SystemExit, match="neither a file nor a saved run"):
        cli_main(["bench", "compare", str(tmp_path / "nope.json"), str(bad)])


def test_run_csv_save_and_compare_with_history(tmp_path, monkeypatch, capsys):
    from pyebm.bench import suites

    monkeypatch.setenv("PYEBM_BENCH_STORAGE", str(tmp_path / "hist"))
    monkeypatch.setattr(suites, "OPS_SIZES", {"tiny": (1, 4, 3, (8,), 5)})
    args = ["bench", "ops", "--quick", "--no-compile", "--no-memory", "--min-samples", "3", "--max-samples", "3",
            "--budget", "0"]
    with pytest.raises(SystemExit, match="no saved runs"):
        cli_main(args + ["--compare", "latest"])  # checked before measuring anything
    with pytest.raises(SystemExit, match="--max-samples"):
        cli_main(args + ["--min-samples", "5"])
    with pytest.raises(SystemExit, match="--save NAME"):
        cli_main(args + ["--save", "../x"])
    out_json, out_csv = tmp_path / "run.json", tmp_path / "run.csv"
    assert cli_main(args + ["--json", str(out_json), "--csv", str(out_csv), "--save", "base"]) == 0
    assert os.path.basename(bcompare.resolve("latest")) == "0001_base.json"
    data = json.loads(out_json.read_text())
    tiny = [r for r in data["rows"] if r["size"] == "tiny"]
    assert tiny and all(r["n"] == 3 and r["interleaved"] for r in tiny)
    assert tiny[0]["shape"].startswith("B=1 K=4 D=3 hidden=8 ctx=5, float32")
    assert data["meta"]["cpu_isa"] and "command" in data["meta"] and data["method"]["interleaved"]
    with open(out_csv) as f:
        assert [r["column"] for r in csv.DictReader(f)][:1] == ["eager autograd"]
    capsys.readouterr()
    assert cli_main(args + ["--save", "next", "--compare", "base"]) == 0
    out = capsys.readouterr().out
    assert "0002_next.json" in out and "pyebm bench compare" in out and "beyond noise" in out
    assert [os.path.basename(p) for p in bcompare.saved_runs()] == ["0001_base.json", "0002_next.json"]
    assert bcompare.resolve("1").endswith("0001_base.json") and bcompare.resolve("next").endswith("0002_next.json")


def test_pyebm_without_arguments_prints_help(capsys):
    assert cli_main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: pyebm") and "info" in out and "bench" in out


# -- rerank, assign, samplers ------------------------------------------------------------------------------

def test_rerank_assign_samplers_are_registered_suites():
    from pyebm.bench import suites
    from pyebm.bench.cli import KNOWN_SUITES, _suite_fn
    from pyebm.bench.rerank_suite import assign_cases, rerank_cases
    from pyebm.bench.samplers_suite import samplers_cases

    for name, fn in (("rerank", rerank_cases), ("assign", assign_cases), ("samplers", samplers_cases)):
        assert name in KNOWN_SUITES and _suite_fn(name) is fn and suites.SUITES[name] is fn


def _shape_tail():
    th = torch.get_num_threads()
    return f", float32, {th} thread{'s' if th != 1 else ''}, cpu"


def test_rerank_suite_tiny():
    from pyebm.bench.rerank_suite import rerank_cases

    cases = list(rerank_cases(quick=True, memory=False, Ns=[8], B=2, sweep=False, sampling=TINY))
    assert [c.column for c in cases] == ["eager loop", "batched forward", "pyebm.rerank", GEMM_COLUMN]
    assert all(c.suite == "rerank" and c.size == "N=8" and c.timing.n == 3 and c.timing.interleaved for c in cases)
    assert cases[0].baseline and cases[0].note == "16 forward calls"
    assert cases[2].note == "same top-k as the eager loop"
    rows = BenchResult(cases).rows()
    assert {r["shape"] for r in rows} == {"B=2 N=8 k=4 D=16 hidden=256x256 ctx=32" + _shape_tail()}
    assert rows[-1]["pct_gemm"] == pytest.approx(100.0)
    with pytest.raises(ValueError, match="Ns must be a non-empty sequence of ints >= 1"):
        next(rerank_cases(Ns=[0]))


def test_rerank_baselines_pick_the_same_candidates_as_rerank():
    from pyebm.bench.rerank_suite import batched_rerank, eager_rerank

    torch.manual_seed(3)
    m = pyebm.MLPEnergy(5, 3, hidden=(16, 16))
    x, y = torch.randn(3, 5), torch.randn(3, 9, 3)
    res = pyebm.rerank(m, x, y, k=4)
    for fn in (eager_rerank, batched_rerank):
        E, index = fn(m, x, y, 4)
        assert torch.equal(index, res.index)
        torch.testing.assert_close(E, res.energy, rtol=1e-5, atol=1e-5)
    # the brute force: every candidate scored on its own, sorted
    E_all = torch.stack([torch.stack([m(x[b:b + 1], y[b:b + 1, n]).reshape(()) for n in range(9)]) for b in range(3)])
    assert torch.equal(E_all.detach().argsort(dim=1)[:, :4], res.index)


def test_assign_suite_tiny_and_the_auction_rule(monkeypatch, capsys):
    from pyebm.bench import rerank_suite

    monkeypatch.setattr(rerank_suite, "AUCTION_CPU_MAX", 20)  # B*k*k: 16 at B=1 (kept), 48 at B=3 (left out)
    cases = list(rerank_suite.assign_cases(quick=True, memory=False, ks=[4], Bs=[1, 3], sampling=TINY))
    by_size = {}
    for c in cases:
        by_size.setdefault(c.size, []).append(c.column)
    assert by_size == {"k=4 B=1": ["scipy loop", "permutation_argmin scipy", "permutation_argmin auction"],
                       "k=4 B=3": ["scipy loop", "permutation_argmin scipy"]}
    assert "assign k=4 B=3: auction column left out" in capsys.readouterr().err
    auction = cases[2]
    assert auction.note == "energy gap to scipy 0.0e+00"  # k=4: the auction's result is optimal
    rows = BenchResult(cases).rows()
    assert [r["shape"] for r in rows] == ["B=1 k=4" + _shape_tail()] * 3 + ["B=3 k=4" + _shape_tail()] * 2
    assert all(c.params["batch"] == c.params["B"] for c in cases)  # the only k carries the plot axis


def test_assign_grid_leaves_out_the_largest_scipy_loop():
    from pyebm.bench.rerank_suite import assign_grid

    full = assign_grid()
    assert len(full) == 11 and (256, 1024) not in full and (128, 1024) in full and (256, 64) in full
    assert assign_grid(quick=True) == [(8, 1), (8, 64), (32, 1), (32, 64)]
    assert assign_grid(ks=[256], Bs=[1024]) == [(256, 1024)]  # an explicit grid is run whole
    with pytest.raises(ValueError, match="Bs must be"):
        assign_grid(Bs=[])


def test_scipy_assign_loop_agrees_with_permutation_argmin():
    from pyebm.bench.rerank_suite import scipy_assign_loop
    from pyebm.discrete import permutation_argmin

    torch.manual_seed(4)
    theta = torch.rand(5, 6, 6)
    res = permutation_argmin(theta, method="scipy")
    for b, (rows, cols) in enumerate(scipy_assign_loop(theta)):
        assert list(rows) == list(range(6)) and list(cols) == res.perm[b].tolist()
    # brute force over all 720 permutations of the first problem: the maximum weight
    import itertools

    best = max(sum(theta[0, i, p[i]].item() for i in range(6)) for p in itertools.permutations(range(6)))
    assert -res.energy[0].item() == pytest.approx(best, rel=1e-6)


def test_samplers_suite_tiny():
    from pyebm.bench.samplers_suite import samplers_cases

    cases = list(samplers_cases(quick=True, memory=False, sizes=["small-categorical"], sampling=TINY))
    backends = [f"pyebm {b}" for b in ("cpu", "torch") if pyebm.backends()[b]]
    for method in ("gwg", "dmala"):
        group = [c for c in cases if c.size == f"{method} small-categorical"]
        assert [c.column for c in group] == ["eager autograd", "pyebm, autograd energy"] + backends
        assert group[0].baseline and all(c.timing.n == 3 for c in group)
    shapes = {r["size"]: r["shape"] for r in BenchResult(cases).rows()}
    assert shapes == {"gwg small-categorical": "B=1 K=64 L=8 C=4 hidden=64x64 ctx=32 steps=10" + _shape_tail(),
                      "dmala small-categorical": "B=1 K=64 L=8 C=4 hidden=64x64 ctx=32 steps=10 step_size=0.2"
                                                 + _shape_tail()}
    with pytest.raises(ValueError, match="unknown size 'huge'"):
        next(samplers_cases(sizes=["huge"]))


def test_cli_runs_rerank_assign_samplers(tmp_path, monkeypatch):
    from pyebm.bench import rerank_suite, samplers_suite

    monkeypatch.setattr(rerank_suite, "RERANK_QUICK_N", (6,))
    monkeypatch.setattr(rerank_suite, "RERANK_B", 2)
    monkeypatch.setattr(rerank_suite, "RERANK_QUICK_SWEEP", (1, 2))
    monkeypatch.setattr(rerank_suite, "RERANK_SWEEP_N", 4)
    monkeypatch.setattr(rerank_suite, "ASSIGN_QUICK_K", (3, 4))
    monkeypatch.setattr(rerank_suite, "ASSIGN_QUICK_B", (1, 2))
    monkeypatch.setattr(samplers_suite, "SAMPLER_SIZES", {"tiny": (1, 4, 3, None, (8,), 5)})
    monkeypatch.setattr(samplers_suite, "SAMPLER_QUICK", ("tiny",))
    out_json, out_csv, out_png = tmp_path / "run.json", tmp_path / "run.csv", tmp_path / "run.png"
    assert cli_main(["bench", "rerank", "assign", "samplers", "--quick", "--no-memory", "--min-samples", "2",
                     "--max-samples", "2", "--budget", "0", "--json", str(out_json), "--csv", str(out_csv),
                     "--plot", str(out_png)]) == 0
    data = json.loads(out_json.read_text())
    tail = _shape_tail()
    sizes = {}
    for r in data["rows"]:
        assert r["n"] == 2 and r["interleaved"]
        sizes.setdefault((r["suite"], r["size"]), set()).add(r["shape"])
    assert sizes == {
        ("rerank", "N=6"): {"B=2 N=6 k=4 D=16 hidden=256x256 ctx=32" + tail},
        ("rerank", "sweep B=1"): {"B=1 N=4 k=4 D=16 hidden=256x256 ctx=32" + tail},
        ("rerank", "sweep B=2"): {"B=2 N=4 k=4 D=16 hidden=256x256 ctx=32" + tail},
        **{("assign", f"k={k} B={b}"): {f"B={b} k={k}" + tail} for k in (3, 4) for b in (1, 2)},
        ("samplers", "gwg tiny"): {"B=1 K=4 L=3 hidden=8 ctx=5 steps=10" + tail},
        ("samplers", "dmala tiny"): {"B=1 K=4 L=3 hidden=8 ctx=5 steps=10 step_size=0.2" + tail},
    }
    assert data["meta"]["command"] == "pyebm bench rerank assign samplers --quick"
    with open(out_csv) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(data["rows"]) and rows[0]["column"] == "eager loop"
    assert [r["column"] for r in rows if r["suite"] == "assign"][:3] == \
        ["scipy loop", "permutation_argmin scipy", "permutation_argmin auction"]
    assert out_png.stat().st_size > 1000  # rerank's sweep and assign's batch sizes at its first k
