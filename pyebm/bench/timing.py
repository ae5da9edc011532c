"""Timing primitives shared by `pyebm bench`, bench/ scripts and the demo.

Medians over repeated samples after a warm-up; each sample runs the callable enough times to last
at least ``min_sample_s`` so that timer resolution and per-sample overhead do not dominate tiny ops.
CUDA work is synchronised before the clock is read.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch


@dataclass
class Timing:
    """Per-call seconds of one callable: the samples and their order statistics."""

    samples: List[float] = field(default_factory=list)
    calls_per_sample: int = 1

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def min(self) -> float:
        return min(self.samples)

    @property
    def max(self) -> float:
        return max(self.samples)

    def quantile(self, q: float) -> float:
        s = sorted(self.samples)
        return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]

    @property
    def p90(self) -> float:
        return self.quantile(0.9)

    def to_dict(self) -> dict:
        return {"median_s": self.median, "min_s": self.min, "max_s": self.max, "p90_s": self.p90,
                "calls_per_sample": self.calls_per_sample, "samples_s": list(self.samples)}


def _sync(device: Optional[torch.device]) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], object], *, warmup: int = 3, repeats: int = 15, min_sample_s: float = 2e-3,
            device: Optional[torch.device] = None, max_time_s: float = 20.0) -> Timing:
    """Median-ready per-call timings of ``fn()``; stops early after ``max_time_s`` (at least 3 samples)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    # Calibrate calls per sample.
    n = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        _sync(device)
        dt = time.perf_counter() - t0
        if dt >= min_sample_s or n >= 1 << 16:
            break
        n *= 2 if dt <= 0 else max(2, min(16, int(min_sample_s / max(dt, 1e-9)) + 1))
    out = Timing(calls_per_sample=n)
    start = time.perf_counter()
    for i in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        _sync(device)
        out.samples.append((time.perf_counter() - t0) / n)
        if i >= 2 and time.perf_counter() - start > max_time_s:
            break
    return out


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
