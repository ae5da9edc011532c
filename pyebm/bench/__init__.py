"""Latency measurement for pyebm and for users' own energy models."""
from pyebm.bench.timing import Timing, gemm_reference, measure  # noqa: F401
