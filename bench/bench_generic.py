"""A user's own nn.Module energy (conv, residual MLP), T=10 and T=50: hand autograd loop, pyebm autograd, compiled.

    python bench/bench_generic.py [--quick] [--no-compile] [--device cpu|cuda] [--sizes "conv T=10,resmlp T=50"]
                                  [--json FILE] [--csv FILE]

Same code as `pyebm bench descent --energy conv` / `--energy resmlp`.
"""
import sys

from pyebm.bench.generic_suite import SIZES, generic_cases
from pyebm.bench.script import run_suite_script

if __name__ == "__main__":
    sys.exit(run_suite_script("bench_generic", __doc__.splitlines()[0], generic_cases, SIZES, ",".join(SIZES)))
