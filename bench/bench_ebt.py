"""EBT generation: the reference algorithm against pyebm.models.EBT, at identical greedy outputs.

    python bench/bench_ebt.py [--quick] [--json] [--prompt N] [--samples G] ...

Same code as `pyebm bench ebt` (pyebm/bench/ebt_bench.py, where the measurement is described).
"""
import sys

from pyebm.bench.ebt_bench import main

if __name__ == "__main__":
    sys.exit(main())
