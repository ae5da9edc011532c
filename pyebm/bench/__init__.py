"""Latency measurement for pyebm and for users' own energy models.

    pyebm.bench.latency(energy, context, ...)   a user's model: per-step and whole-descent latency per backend
    pyebm.bench.measure(fn)                     per-call timings of any callable (Timing: median, IQR, p90, ...)
    pyebm.bench.measure_interleaved(columns)    several callables sampled round-robin, adaptive sample counts
`pyebm bench` runs the suites in pyebm.bench.suites; `pyebm bench compare` compares two runs
(pyebm.bench.compare). The statistics (bootstrap intervals of ratios) are in pyebm.bench.stats.
"""
from pyebm.bench.core import BenchResult, Case, Column, machine_info  # noqa: F401
from pyebm.bench.timing import Timing, gemm_reference, measure, measure_interleaved  # noqa: F401
from pyebm.bench.latency import latency  # noqa: F401
