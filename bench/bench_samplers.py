"""Discrete samplers (Gibbs with gradients, DMALA) on an MLPEnergy: eager autograd against pyebm.discrete.

    python bench/bench_samplers.py [--quick] [--device cpu|cuda]
                                   [--sizes small,medium,large,categorical,small-categorical]
                                   [--json FILE] [--csv FILE] [--min-samples N] [--max-samples N] [--budget S]

Same code as `pyebm bench samplers` (pyebm/bench/samplers_suite.py: the sizes and the columns).
"""
import sys

from pyebm.bench.samplers_suite import SAMPLER_DEFAULT, SAMPLER_SIZES, samplers_cases
from pyebm.bench.script import run_suite_script

if __name__ == "__main__":
    sys.exit(run_suite_script("bench_samplers", __doc__.splitlines()[0], samplers_cases, SAMPLER_SIZES,
                              ",".join(SAMPLER_DEFAULT)))
