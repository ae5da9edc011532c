"""The command line shared by the bench/bench_*.py scripts of size-based suites."""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Iterable, List, Optional

import torch

from pyebm.bench.core import BenchResult, machine_info


def run_suite_script(name: str, description: str, cases_fn: Callable[..., Iterable], sizes: Iterable[str],
                     default_sizes: str, argv: Optional[List[str]] = None) -> int:
    known = list(sizes)
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--sizes", default=default_sizes, help=f"comma-separated from {', '.join(known)}")
    ap.add_argument("--sweep", action="store_true", help="also the batch-size sweep (for --plot)")
    ap.add_argument("--json", default=None, help="write every sample and the machine as JSON")
    ap.add_argument("--plot", default=None, help="PNG of latency against batch size")
    args = ap.parse_args(argv)
    chosen = [s.strip() for s in args.sizes.split(",") if s.strip()]
    for s in chosen:
        if s not in known:
            ap.error(f"unknown size {s!r}; choose from {', '.join(known)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda but no CUDA device is available")
    cases = list(cases_fn(quick=args.quick, device=args.device, compile=not args.no_compile, sizes=chosen,
                          sweep=args.sweep or bool(args.plot),
                          progress=lambda m: print(f"measuring {m}", file=sys.stderr)))
    result = BenchResult(cases, machine_info(args.device))
    meta = result.meta
    print(f"# {name} {meta['date']} {meta['processor']} threads={meta['threads']} torch {meta['torch']} "
          f"device {args.device} commit {meta['commit']}")
    print(result.markdown())
    if args.json:
        result.to_json(args.json)
    if args.plot:
        result.plot(args.plot)
    return 0
