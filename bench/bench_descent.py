"""Whole minimize latency, T=10 steps: eager loop, torch.compile of the step, pyebm per-step, whole-loop.

    python bench/bench_descent.py [--quick] [--no-compile] [--device cpu|cuda] [--sizes small,large] [--sweep]
                                  [--json FILE] [--csv FILE] [--plot FILE]

Same code as `pyebm bench descent`.
"""
import sys

from pyebm.bench.descent_suite import descent_cases
from pyebm.bench.script import run_suite_script
from pyebm.bench.suites import OPS_SIZES

if __name__ == "__main__":
    sys.exit(run_suite_script("bench_descent", __doc__.splitlines()[0], descent_cases, OPS_SIZES, "small,large"))
