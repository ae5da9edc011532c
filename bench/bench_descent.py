"""Whole minimize latency, T=10 steps: eager loop, torch.compile of the step, pyebm per-step, whole-loop.

    python bench/bench_descent.py [--quick] [--no-compile] [--device cpu|cuda] [--json FILE] [--plot FILE]
                                  [--sizes small,large] [--sweep]

Same code as `pyebm bench descent`.
"""
from __future__ import annotations

import argparse
import sys

import torch

from pyebm.bench.core import BenchResult, machine_info
from pyebm.bench.descent_suite import descent_cases
from pyebm.bench.suites import OPS_SIZES


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sizes", default="small,large")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--json")
    ap.add_argument("--plot")
    args = ap.parse_args(argv)
    sizes = [s for s in args.sizes.split(",") if s]
    for s in sizes:
        if s not in OPS_SIZES:
            ap.error(f"unknown size {s!r}; choose from {', '.join(OPS_SIZES)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda but no CUDA device is available")
    cases = list(descent_cases(quick=args.quick, device=args.device, compile=not args.no_compile, sizes=sizes,
                               sweep=args.sweep or bool(args.plot),
                               progress=lambda m: print(f"measuring {m}", file=sys.stderr)))
    result = BenchResult(cases, machine_info(args.device))
    meta = result.meta
    print(f"# bench_descent {meta['date']} {meta['processor']} threads={meta['threads']} torch {meta['torch']} "
          f"commit {meta['commit']}")
    print(result.markdown())
    if args.json:
        result.to_json(args.json)
    if args.plot:
        result.plot(args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
