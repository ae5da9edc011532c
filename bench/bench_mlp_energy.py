"""energy_and_grad per call: eager autograd, torch.func, torch.compile and the pyebm backends.

    python bench/bench_mlp_energy.py [--quick] [--no-compile] [--device cpu|cuda] [--json FILE] [--plot FILE]
                                     [--sizes small,medium,large]

Side by side in one process, same inputs, same thread count: median per-call time, ratio to eager
autograd, achieved GFLOP/s and the share of a same-FLOP GEMM timed in the same run, bytes allocated per
call, and the cost of our cheapest op (the dispatch floor). Same code as `pyebm bench ops`.
"""
from __future__ import annotations

import argparse
import sys

import torch

from pyebm.bench.core import BenchResult, machine_info
from pyebm.bench.suites import OPS_SIZES, dispatch_floor_case, ops_cases


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sizes", default=",".join(OPS_SIZES))
    ap.add_argument("--sweep", action="store_true", help="also the batch-size sweep (for --plot)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    args = ap.parse_args(argv)
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    for s in sizes:
        if s not in OPS_SIZES:
            ap.error(f"unknown size {s!r}; choose from {', '.join(OPS_SIZES)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda but no CUDA device is available")
    cases = list(ops_cases(quick=args.quick, device=args.device, compile=not args.no_compile, sizes=sizes,
                           sweep=args.sweep or bool(args.plot),
                           progress=lambda m: print(f"measuring {m}", file=sys.stderr)))
    cases.append(dispatch_floor_case(args.quick, args.device))
    result = BenchResult(cases, machine_info(args.device))
    meta = result.meta
    print(f"# bench_mlp_energy {meta['date']} {meta['processor']} threads={meta['threads']} torch {meta['torch']} "
          f"commit {meta['commit']}")
    print(result.markdown())
    if args.json:
        result.to_json(args.json)
    if args.plot:
        result.plot(args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
