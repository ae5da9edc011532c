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
    ap.add_argument("--json", default=None, help="write every sample, the statistics and the machine as JSON")
    ap.add_argument("--csv", default=None, help="write the table as CSV")
    ap.add_argument("--plot", default=None, help="PNG of latency against batch size and speed-up over eager")
    add_sampling_arguments(ap)
    args = ap.parse_args(argv)
    chosen = [s.strip() for s in args.sizes.split(",") if s.strip()]
    for s in chosen:
        if s not in known:
            ap.error(f"unknown size {s!r}; choose from {', '.join(known)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda but no CUDA device is available")
    cases = list(cases_fn(quick=args.quick, device=args.device, compile=not args.no_compile, sizes=chosen,
                          sweep=args.sweep or bool(args.plot), sampling=sampling_options(ap, args),
                          progress=lambda m: print(f"measuring {m}", file=sys.stderr)))
    return report(name, BenchResult(cases, machine_info(args.device)), args)


def report(name: str, result: BenchResult, args) -> int:
    """Print the result, then write the files asked for by ``args.json`` / ``args.csv`` / ``args.plot``."""
    print_result(name, result)
    write_files(result, args)
    return 0


def write_files(result: BenchResult, args) -> None:
    """The JSON, CSV and PNG files named by ``args.json`` / ``args.csv`` / ``args.plot`` (None: not written)."""
    if args.json:
        result.to_json(args.json)
    if args.csv:
        result.to_csv(args.csv)
    if args.plot:
        result.plot(args.plot)


def add_sampling_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--min-samples", type=int, default=None, help="samples per column at least")
    ap.add_argument("--max-samples", type=int, default=None, help="samples per column at most")
    ap.add_argument("--budget", type=float, default=None, help="sampling seconds per size")


def sampling_options(ap: argparse.ArgumentParser, args) -> dict:
    if (args.min_samples is not None and args.min_samples < 1) or (args.max_samples is not None and args.max_samples < 1):
        ap.error("--min-samples and --max-samples must be >= 1")
    if args.budget is not None and args.budget < 0:
        ap.error("--budget must be >= 0 seconds")
    return {"min_samples": args.min_samples, "max_samples": args.max_samples, "budget_s": args.budget}


def print_result(name: str, result: BenchResult) -> None:
    """The header line (machine, versions, commit), the markdown table with its warnings, the legend."""
    print(f"# {name}: {result.header()}")
    print()
    print(result.markdown())
    print()
    print(result.legend())
