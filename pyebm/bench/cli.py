"""`pyebm bench [SUITE ...] [--quick] [--json FILE] [--csv FILE] [--plot FILE] [--device DEV] [--save NAME]
[--compare NAME|latest]`, `pyebm bench compare OLD NEW [--csv FILE]` and `pyebm bench serve [MODEL_DIR]`
(pyebm.bench.serve_bench)."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List

KNOWN_SUITES = ("ops", "descent", "ebt", "policy", "rerank", "assign", "samplers")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Latency of pyebm against eager autograd, torch.func and torch.compile, side by side. The "
                     "columns of each size are sampled round-robin until every ratio to eager is known to +-5% "
                     "(95% bootstrap interval) or the size's time budget is spent. "
                     "`pyebm bench compare OLD NEW` compares two runs (JSON files or saved names). Suites: ops "
                     "(energy + input gradient per call), descent (whole minimize), ebt (EBT generation), policy "
                     "(act() at batch 1), rerank (pyebm.rerank of N proposals against an eager scoring loop), "
                     "assign (permutation_argmin against a loop of scipy's linear_sum_assignment), samplers "
                     "(Gibbs with gradients and DMALA against eager autograd).")
    p.add_argument("suites", nargs="*", metavar="SUITE", help=f"suites to run (default: ops descent); "
                                                              f"known: {', '.join(KNOWN_SUITES)}; or: compare OLD NEW; "
                                                              "or: serve [MODEL_DIR]")
    p.add_argument("--quick", action="store_true", help="smaller budgets and no sweep (under 3 minutes on 2 cores)")
    p.add_argument("--json", metavar="FILE", help="write machine, versions, commit, statistics, warnings and every "
                                                  "sample as JSON (with compare: the comparison)")
    p.add_argument("--csv", metavar="FILE", help="write the table (or the comparison) as CSV")
    p.add_argument("--plot", metavar="FILE", help="write a PNG: latency against batch size per column (IQR bars) "
                                                  "and the speed-up over eager (95%% CI); suites with a batch "
                                                  "sweep: ops, descent, rerank, assign")
    p.add_argument("--save", metavar="NAME", help="also save the run as NNNN_NAME.json in the history folder "
                                                  "(.benchmarks/pyebm/, or $PYEBM_BENCH_STORAGE)")
    p.add_argument("--compare", metavar="NAME", help="after the run, compare it with a saved run: its NAME, its "
                                                     "number, 'latest', or a JSON file")
    p.add_argument("--min-samples", type=int, default=None, metavar="N",
                   help="samples per column at least (default 10, --quick 5; policy 7 and 5)")
    p.add_argument("--max-samples", type=int, default=None, metavar="N",
                   help="samples per column at most (default 200, --quick 40; policy 60 and 20)")
    p.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                   help="sampling time per size before stopping short of the target (default 20, --quick 4; "
                        "policy 40 and 8)")
    p.add_argument("--ci-target", type=float, default=None, metavar="FRACTION",
                   help="stop once every ratio's 95%% interval is within +-FRACTION (default 0.05)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile columns")
    p.add_argument("--no-memory", action="store_true", help="skip the allocation measurement")
    p.add_argument("--energy", choices=("mlp", "conv", "resmlp"), default="mlp",
                   help="descent suite: MLPEnergy (default), or a plain nn.Module energy (a small conv net, a "
                        "residual MLP with LayerNorm) through autograd and pyebm's compiled path")
    from pyebm.bench import serve_bench

    serve_bench.add_arguments(p)


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
              "policy": "pyebm.bench.policy_suite", "rerank": "pyebm.bench.rerank_suite",
              "assign": "pyebm.bench.rerank_suite", "samplers": "pyebm.bench.samplers_suite"}.get(name)
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


def _sampling(args: argparse.Namespace) -> Dict[str, object]:
    for name in ("min_samples", "max_samples"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise SystemExit(f"pyebm bench: --{name.replace('_', '-')} must be >= 1; got {v}")
    if args.min_samples and args.max_samples and args.max_samples < args.min_samples:
        raise SystemExit(f"pyebm bench: --max-samples ({args.max_samples}) is below --min-samples ({args.min_samples})")
    if args.budget is not None and args.budget < 0:
        raise SystemExit(f"pyebm bench: --budget must be >= 0 seconds; got {args.budget}")
    if args.ci_target is not None and not 0 < args.ci_target < 1:
        raise SystemExit(f"pyebm bench: --ci-target must be a fraction in (0, 1), e.g. 0.05; got {args.ci_target}")
    return {"min_samples": args.min_samples, "max_samples": args.max_samples, "budget_s": args.budget,
            "rel_ci": args.ci_target}


def run_compare(args: argparse.Namespace) -> int:
    from pyebm.bench import compare

    files = args.suites[1:]
    if len(files) != 2:
        raise SystemExit(f"pyebm bench compare: give two runs (JSON files or saved names); got {len(files)}")
    for path, what in ((args.json, "JSON file"), (args.csv, "CSV file")):
        if path:
            _check_writable(path, what)
    try:
        old_path, new_path = (compare.resolve(f) for f in files)
        old, new = compare.load(old_path), compare.load(new_path)
    except ValueError as exc:
        raise SystemExit(f"pyebm bench compare: {exc}")
    entries = compare.compare(old, new)
    if args.csv:
        compare.to_csv(entries, args.csv)
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump({"old": old_path, "new": new_path, "rule": compare.RULE, "rows": entries}, f, indent=1)
    compare.print_rich(entries, old_path, new_path)
    return 0


def run(args: argparse.Namespace) -> int:
    if args.suites and args.suites[0] == "compare":
        return run_compare(args)
    if args.suites and args.suites[0] == "serve":
        from pyebm.bench import serve_bench

        return serve_bench.run(args)
    import torch

    from pyebm.bench.core import BenchResult, machine_info
    from pyebm.bench.script import write_files
    from pyebm.bench.suites import dispatch_floor_case

    sampling = _sampling(args)
    names: List[str] = args.suites or ["ops", "descent"]
    for n in names:
        if n not in KNOWN_SUITES:
            raise SystemExit(f"pyebm bench: unknown suite {n!r}; choose from {', '.join(KNOWN_SUITES)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("pyebm bench: --device cuda but no CUDA device is available")
    for path, what in ((args.json, "JSON file"), (args.plot, "plot file"), (args.csv, "CSV file")):
        if path:
            _check_writable(path, what)
    previous = None
    if args.compare:
        from pyebm.bench import compare

        try:  # before the run: a wrong name should not cost minutes of measuring first
            previous = compare.resolve(args.compare)
            compare.load(previous)
        except ValueError as exc:
            raise SystemExit(f"pyebm bench: --compare: {exc}")
    if args.save:
        from pyebm.bench.compare import _NAME_OK

        if not _NAME_OK.match(args.save):
            raise SystemExit(f"pyebm bench: --save NAME: use letters, digits, '.', '_' and '-'; got {args.save!r}")
    fns = [(n, _suite_fn(n)) for n in names]
    if getattr(args, "energy", "mlp") != "mlp":
        import functools

        from pyebm.bench.generic_suite import generic_cases

        fns = [(n, functools.partial(generic_cases, energies=(args.energy,)) if n == "descent" else fn)
               for n, fn in fns]

    cases = []
    kwargs = dict(quick=args.quick, device=args.device, compile=not args.no_compile, memory=not args.no_memory,
                  sampling=sampling)
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
            cases.append(dispatch_floor_case(args.quick, args.device, sampling=sampling))

    if progress_ctx is not None:
        with progress_ctx as prog:
            task = prog.add_task("starting", total=None)
            collect(lambda msg: prog.update(task, description=f"measuring {msg}"))
    else:
        collect(lambda msg: print(f"measuring {msg}", file=sys.stderr))

    meta = machine_info(args.device)
    meta["command"] = " ".join(["pyebm bench"] + names + (["--quick"] if args.quick else [])
                               + ([f"--device {args.device}"] if args.device != "cpu" else []))
    result = BenchResult(cases, meta)
    write_files(result, args)
    result.print_rich()
    if args.save:
        from pyebm.bench import compare

        print(f"saved as {compare.save(result.to_dict(), args.save)}")
    if previous:
        from pyebm.bench import compare

        entries = compare.compare(compare.load(previous), result.to_dict())
        compare.print_rich(entries, previous, "this run")
    return 0
