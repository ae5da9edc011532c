"""energy_and_grad per call: eager autograd, torch.func, torch.compile and the pyebm backends.

    python bench/bench_mlp_energy.py [--quick] [--no-compile] [--device cpu|cuda] [--sizes small,medium,large]
                                     [--sweep] [--json FILE] [--csv FILE] [--plot FILE]

Side by side in one process, same inputs, same thread count, the columns of each size sampled
round-robin: median, IQR, min and p90 per call, the ratio to eager autograd with its 95% interval,
achieved GFLOP/s and the share of a same-FLOP GEMM timed in the same run, bytes allocated per call, and
the cost of our cheapest op (the dispatch floor). Same code as `pyebm bench ops`.
"""
import sys

from pyebm.bench.script import run_suite_script
from pyebm.bench.suites import OPS_SIZES, dispatch_floor_case, ops_cases


def cases(quick, device, sampling=None, **kw):
    yield from ops_cases(quick=quick, device=device, sampling=sampling, **kw)
    yield dispatch_floor_case(quick, device, sampling=sampling)


if __name__ == "__main__":
    sys.exit(run_suite_script("bench_mlp_energy", __doc__.splitlines()[0], cases, OPS_SIZES, ",".join(OPS_SIZES)))
