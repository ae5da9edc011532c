"""act() latency of energy policies against the reference loop and a diffusion-policy baseline.

    python bench/bench_policy.py [--quick] [--sizes small,full] [--threads N] [--json FILE]

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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the small size, fewer repeats")
    ap.add_argument("--sizes", default=None, help=f"comma-separated from {', '.join(POLICY_SIZES)}")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    sizes = None
    if args.sizes:
        sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
        for s in sizes:
            if s not in POLICY_SIZES:
                ap.error(f"unknown size {s!r}; choose from {', '.join(POLICY_SIZES)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = list(policy_cases(quick=args.quick, sizes=sizes, progress=lambda m: print(f"measuring {m}",
                                                                                       file=sys.stderr)))
    result = BenchResult(cases, machine_info("cpu"))
    meta = result.meta
    print(f"# bench_policy {meta['date']} {meta['processor']} threads={meta['threads']} torch {meta['torch']} "
          f"commit {meta.get('commit')}")
    print(result.markdown())
    if args.json:
        result.to_json(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
