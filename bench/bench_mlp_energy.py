"""energy_and_grad per call: eager autograd, torch.func, torch.compile and the pyebm backends.

    python bench/bench_mlp_energy.py [--quick] [--no-compile] [--device cpu|cuda] [--sizes small,medium,large]
                                     [--sweep] [--json FILE] [--plot FILE]

Side by side in one process, same inputs, same thread count: median per-call time, ratio to eager
autograd, achieved GFLOP/s and the share of a same-FLOP GEMM timed in the same run, bytes allocated per
call, and the cost of our cheapest op (the dispatch floor). Same code as `pyebm bench ops`.
"""
import sys

from pyebm.bench.script import run_suite_script
from pyebm.bench.suites import OPS_SIZES, dispatch_floor_case, ops_cases


def cases(quick, device, **kw):
    yield from ops_cases(quick=quick, device=device, **kw)
    yield dispatch_floor_case(quick, device)


if __name__ == "__main__":
    sys.exit(run_suite_script("bench_mlp_energy", __doc__.splitlines()[0], cases, OPS_SIZES, ",".join(OPS_SIZES)))
