"""Timing primitives shared by `pyebm bench`, bench/ scripts and the demo.

``measure_interleaved`` times the columns of one size together: after each column's warm-up and
calibration, it takes sample 1 of every column, then sample 2 of every column, and so on (round-robin), so
that a burst of host load hits every column alike and the i-th samples of two columns form a pair. It
keeps sampling until the bootstrap interval of every column's ratio to the baseline is tight (relative
half-width at most ``rel_ci``), until ``budget_s`` seconds of sampling are spent, or until
``max_samples`` rounds, whichever comes first, and never stops before ``min_samples`` rounds.
``measure`` times one callable the same way.

Each sample runs the callable enough times to last at least ``min_sample_s`` so that timer resolution and
per-sample overhead do not dominate tiny ops; the sample is the mean per call. CUDA work is synchronised
before the clock is read.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from pyebm.bench import stats
from pyebm.bench.host import host_state


@dataclass
class Timing:
    """Per-call seconds of one callable: the samples and their order statistics."""

    samples: List[float] = field(default_factory=list)
    calls_per_sample: int = 1
    interleaved: bool = False  # sample i was taken in round i, together with the other columns of its size

    @property
    def n(self) -> int:
        return len(self.samples)

    @property
    def median(self) -> float:
        return stats.quantile(self.samples, 0.5)

    @property
    def min(self) -> float:
        return min(self.samples)

    @property
    def max(self) -> float:
        return max(self.samples)

    def quantile(self, q: float) -> float:
        return stats.quantile(self.samples, q)

    @property
    def q25(self) -> float:
        return self.quantile(0.25)

    @property
    def q75(self) -> float:
        return self.quantile(0.75)

    @property
    def iqr(self) -> float:
        return self.q75 - self.q25

    @property
    def spread(self) -> float:
        """IQR / median."""
        return stats.summary(self.samples)["spread"]

    @property
    def p90(self) -> float:
        return self.quantile(0.9)

    def to_dict(self) -> dict:
        s = stats.summary(self.samples)
        return {"median_s": s["median"], "q25_s": s["q25"], "q75_s": s["q75"], "min_s": s["min"], "max_s": s["max"],
                "p90_s": s["p90"], "n": s["n"], "calls_per_sample": self.calls_per_sample,
                "interleaved": self.interleaved, "samples_s": list(self.samples)}


@dataclass
class Interleaved:
    """The outcome of ``measure_interleaved``: a Timing per column and how the sampling ended."""

    timings: Dict[str, Timing]
    rounds: int
    stop: str  # "converged", "time budget", "max samples"
    elapsed_s: float
    precision: Dict[str, float]  # label: relative half-width of its ratio's (or median's) interval at the stop
    settings: Dict[str, object]
    host_before: Optional[Dict[str, object]] = None
    host_after: Optional[Dict[str, object]] = None

    def sampling(self) -> Dict[str, object]:
        """What a result records about the sampling of this group."""
        return {"interleaved": len(self.timings) > 1, "rounds": self.rounds, "stop": self.stop,
                "elapsed_s": self.elapsed_s, **self.settings, "host_before": self.host_before,
                "host_after": self.host_after}


def _sync(device: Optional[torch.device]) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _calibrate(fn: Callable[[], object], min_sample_s: float, device, clock) -> int:
    n = 1
    while True:
        t0 = clock()
        for _ in range(n):
            fn()
        _sync(device)
        dt = clock() - t0
        if dt >= min_sample_s or n >= 1 << 16:
            return n
        n *= 2 if dt <= 0 else max(2, min(16, int(min_sample_s / max(dt, 1e-9)) + 1))


def _precision(timings: List[Timing], baseline: Optional[int], confidence: float) -> List[float]:
    """Relative half-width of each column's ratio interval (its median's, without a baseline)."""
    out = []
    for j, t in enumerate(timings):
        if baseline is None or (j == baseline and len(timings) == 1):
            ci = stats.bootstrap_median_ci(t.samples, confidence=confidence, resamples=500)
            out.append(stats.rel_half_width(ci, t.median))
        elif j == baseline:
            out.append(0.0)  # its variation is part of every other column's ratio
        else:
            b = timings[baseline].samples
            ci = stats.bootstrap_ratio_ci(b, t.samples, paired=True, confidence=confidence, resamples=500)
            out.append(stats.rel_half_width(ci, stats.ratio_of_medians(b, t.samples)))
    return out


def measure_interleaved(columns: Sequence[Tuple[str, Callable[[], object]]], *, baseline: Optional[int] = 0,
                        warmup: int = 3, min_samples: int = 7, max_samples: int = 50, budget_s: float = 10.0,
                        rel_ci: Optional[float] = stats.REL_CI_TARGET, confidence: float = stats.CONFIDENCE,
                        min_sample_s: float = 2e-3, device: Optional[torch.device] = None,
                        host: bool = True, clock: Callable[[], float] = time.perf_counter) -> Interleaved:
    """Round-robin samples of every column (see the module docstring).

    ``baseline``: index of the column the ratios are taken against (None: stop on each median's interval).
    ``rel_ci``: stop once every interval's relative half-width is at most this (None: never early).
    ``host``: take host snapshots (load, frequencies, other running threads) before and after."""
    if not columns:
        raise ValueError("measure_interleaved: columns is empty")
    labels = [c[0] for c in columns]
    if len(set(labels)) != len(labels):
        raise ValueError(f"measure_interleaved: column labels must be distinct; got {labels}")
    if baseline is not None and not 0 <= baseline < len(columns):
        raise ValueError(f"measure_interleaved: baseline must index columns (0..{len(columns) - 1}); got {baseline}")
    if min_samples < 1 or max_samples < min_samples:
        raise ValueError(f"measure_interleaved: need 1 <= min_samples <= max_samples; got min_samples={min_samples}, "
                         f"max_samples={max_samples}")
    if warmup < 0 or budget_s < 0 or min_sample_s < 0:
        raise ValueError(f"measure_interleaved: warmup, budget_s and min_sample_s must be >= 0; got warmup={warmup}, "
                         f"budget_s={budget_s}, min_sample_s={min_sample_s}")
    if rel_ci is not None and rel_ci <= 0:
        raise ValueError(f"measure_interleaved: rel_ci must be > 0 or None; got {rel_ci}")
    fns = [c[1] for c in columns]
    before = host_state() if host else None
    calls = []
    for fn in fns:
        for _ in range(warmup):
            fn()
        _sync(device)
        calls.append(_calibrate(fn, min_sample_s, device, clock))
    interleaved = len(fns) > 1
    timings = [Timing(calls_per_sample=n, interleaved=interleaved) for n in calls]
    start = clock()
    rounds, stop, next_check = 0, "max samples", min_samples
    precision = [float("inf")] * len(fns)
    while rounds < max_samples:
        for fn, n, t in zip(fns, calls, timings):
            t0 = clock()
            for _ in range(n):
                fn()
            _sync(device)
            t.samples.append((clock() - t0) / n)
        rounds += 1
        if rounds < min_samples:
            continue
        if rel_ci is not None and rounds >= next_check and rounds >= 2:
            # Geometric check schedule: the bootstrap is cheap, but not free next to a microsecond op.
            next_check = max(rounds + 1, int(rounds * 1.25))
            precision = _precision(timings, baseline, confidence)
            if max(precision) <= rel_ci:
                stop = "converged"
                break
        if clock() - start >= budget_s:
            stop = "time budget"
            break
    elapsed = clock() - start
    if rounds >= 2:
        precision = _precision(timings, baseline, confidence)
    settings = {"min_samples": min_samples, "max_samples": max_samples, "budget_s": budget_s, "rel_ci_target": rel_ci,
                "confidence": confidence, "warmup": warmup, "min_sample_s": min_sample_s}
    return Interleaved(dict(zip(labels, timings)), rounds, stop, elapsed, dict(zip(labels, precision)), settings,
                       before, host_state() if host else None)


def measure(fn: Callable[[], object], *, warmup: int = 3, repeats: int = 15, min_sample_s: float = 2e-3,
            device: Optional[torch.device] = None, max_time_s: float = 20.0) -> Timing:
    """``repeats`` per-call timings of ``fn()``; stops early after ``max_time_s`` (at least 3 samples)."""
    r = measure_interleaved([("fn", fn)], baseline=None, warmup=warmup, min_samples=min(3, repeats),
                            max_samples=repeats, budget_s=max_time_s, rel_ci=None, min_sample_s=min_sample_s,
                            device=device, host=False)
    return r.timings["fn"]


def gemm_reference(flops: float, rows: int, dtype=torch.float32, device="cpu") -> Callable[[], object]:
    """A plain [rows, h] @ [h, h] matmul with 2*rows*h*h close to ``flops``: this machine's ceiling."""
    h = max(1, int(round((flops / (2.0 * rows)) ** 0.5)))
    a = torch.randn(rows, h, dtype=dtype, device=device)
    b = torch.randn(h, h, dtype=dtype, device=device)
    out = torch.empty(rows, h, dtype=dtype, device=device)
    fn = lambda: torch.mm(a, b, out=out)  # noqa: E731
    fn.flops = 2.0 * rows * h * h  # type: ignore[attr-defined]
    return fn


def cuda_graphed(fn: Callable[[], object], device=None) -> Callable[[], object]:
    """``fn`` captured in a CUDA graph (after a warm-up on a side stream); returns the replay callable.
    ``fn`` must read its inputs from tensors that stay allocated (the graph replays on the same memory)."""
    side = torch.cuda.Stream(device=device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay
