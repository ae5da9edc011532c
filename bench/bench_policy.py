"""act() latency of energy policies against the reference loop and a diffusion-policy baseline.

    python bench/bench_policy.py [--quick] [--sizes small,full] [--threads N] [--json FILE] [--csv FILE]

Same code as `pyebm bench policy` (pyebm/bench/policy_suite.py, where the columns are described): the
original EBT-Policy loop, pyebm K=1 (equal actions), pyebm K=1 with autograd gradients, pyebm K=32, and an
eager diffusion policy of the same depth and width (DDIM-8, DDPM-100; bench/diffusion_policy_baseline.py),
each in the "20 steps" and "2 steps" regimes; batch 1. ``--quick`` runs the small size (width 64,
2 layers); the default is the full size (width 256, 8 layers, 4 heads, 16 actions).
"""
from __future__ import annotations

import argparse
import sys

import torch

from pyebm.bench.core import BenchResult, machine_info
from pyebm.bench.policy_suite import POLICY_SIZES, policy_cases
from pyebm.bench.script import add_sampling_arguments, print_result, sampling_options


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the small size, fewer repeats")
    ap.add_argument("--sizes", default=None, help=f"comma-separated from {', '.join(POLICY_SIZES)}")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--json", default=None, help="write every sample, the statistics and the machine as JSON")
    ap.add_argument("--csv", default=None, help="write the table as CSV")
    add_sampling_arguments(ap)
    args = ap.parse_args(argv)
    sizes = None
    if args.sizes:
        sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
        for s in sizes:
            if s not in POLICY_SIZES:
                ap.error(f"unknown size {s!r}; choose from {', '.join(POLICY_SIZES)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = list(policy_cases(quick=args.quick, sizes=sizes, sampling=sampling_options(ap, args),
                              progress=lambda m: print(f"measuring {m}", file=sys.stderr)))
    result = BenchResult(cases, machine_info("cpu"))
    print_result("bench_policy", result)
    if args.json:
        result.to_json(args.json)
    if args.csv:
        result.to_csv(args.csv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
