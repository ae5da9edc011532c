"""Latency measurement for pyebm and for users' own energy models.

    pyebm.bench.latency(energy, context, ...)  a user's model: per-step and whole-descent latency per backend
    pyebm.bench.measure(fn)                    median-ready timings of any callable
`pyebm bench` runs the suites in pyebm.bench.suites.
"""
from pyebm.bench.core import BenchResult, Case, machine_info  # noqa: F401
from pyebm.bench.timing import Timing, gemm_reference, measure  # noqa: F401
from pyebm.bench.latency import latency  # noqa: F401
