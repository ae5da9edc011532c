"""`pyebm bench [SUITE ...] [--quick] [--json FILE] [--plot FILE] [--device DEV]`."""
from __future__ import annotations

import argparse
import os
import sys
from typing import List

KNOWN_SUITES = ("ops", "descent", "ebt", "policy")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("suites", nargs="*", metavar="SUITE", help=f"suites to run (default: ops descent); "
                                                              f"known: {', '.join(KNOWN_SUITES)}")
    p.add_argument("--quick", action="store_true", help="fewer repeats and no sweep (under 3 minutes on 2 cores)")
    p.add_argument("--json", metavar="FILE", help="write machine, versions, commit and every sample as JSON")
    p.add_argument("--plot", metavar="FILE", help="write a PNG: latency against batch size, one line per backend")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile columns")
    p.add_argument("--no-memory", action="store_true", help="skip the allocation measurement")


def _check_writable(path: str, what: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d):
        raise SystemExit(f"pyebm bench: {what} folder {d!r} does not exist")
    if not os.access(d, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise SystemExit(f"pyebm bench: cannot write {what} {path!r}")


def _suite_fn(name: str):
    from pyebm.bench import suites

    if name in suites.SUITES:
        return suites.SUITES[name]
    # Suites that live with their models register themselves on import.
    module = {"descent": "pyebm.bench.descent_suite", "ebt": "pyebm.bench.ebt_suite",
              "policy": "pyebm.bench.policy_suite"}.get(name)
    if module:
        import importlib

        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if not module.startswith(str(exc.name)):
                raise
    if name not in suites.SUITES:
        raise SystemExit(f"pyebm bench: suite {name!r} is not available in this build")
    return suites.SUITES[name]


def run(args: argparse.Namespace) -> int:
    import torch

    from pyebm.bench.core import BenchResult, machine_info
    from pyebm.bench.suites import dispatch_floor_case

    names: List[str] = args.suites or ["ops", "descent"]
    for n in names:
        if n not in KNOWN_SUITES:
            raise SystemExit(f"pyebm bench: unknown suite {n!r}; choose from {', '.join(KNOWN_SUITES)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("pyebm bench: --device cuda but no CUDA device is available")
    for path, what in ((args.json, "JSON file"), (args.plot, "plot file")):
        if path:
            _check_writable(path, what)
    fns = [(n, _suite_fn(n)) for n in names]

    cases = []
    kwargs = dict(quick=args.quick, device=args.device, compile=not args.no_compile, memory=not args.no_memory)
    if args.quick:
        kwargs["sweep"] = bool(args.plot)
    try:
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        progress_ctx = Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                                transient=True)
    except ImportError:
        progress_ctx = None

    def collect(report):
        for n, fn in fns:
            for case in fn(progress=report, **kwargs):
                cases.append(case)
        if "ops" in names and torch.ops.pyebm.dispatch_floor.default is not None:
            cases.append(dispatch_floor_case(args.quick, args.device))

    if progress_ctx is not None:
        with progress_ctx as prog:
            task = prog.add_task("starting", total=None)
            collect(lambda msg: prog.update(task, description=f"measuring {msg}"))
    else:
        collect(lambda msg: print(f"measuring {msg}", file=sys.stderr))

    result = BenchResult(cases, machine_info(args.device))
    if args.json:
        result.to_json(args.json)
    if args.plot:
        result.plot(args.plot)
    result.print_rich()
    return 0
