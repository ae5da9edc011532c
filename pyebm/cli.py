"""The ``pyebm`` command line: ``pyebm info``, ``pyebm demo``, ``pyebm bench``, ``pyebm serve``."""
from __future__ import annotations

import argparse
import json
import platform
import sys


def _cmd_info(args: argparse.Namespace) -> int:
    import torch

    import pyebm
    from pyebm import _backend

    report = pyebm.backends()
    info = {
        "pyebm": pyebm.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": getattr(_backend.triton, "__version__", None),
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "extension": _backend.ext_info(),
        "backends": {k: {"usable": v, "why_not": report.why[k], "verified": report.verified[k]}
                     for k, v in report.items()},
    }
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    print(f"pyebm {info['pyebm']}  (python {info['python']}, torch {info['torch']}, triton {info['triton']}, "
          f"{info['threads']} threads, {info['machine']})")
    ext = info["extension"]
    if ext.get("built"):
        print(f"extension pyebm._C: built, cuda={ext['cuda']}, openmp={ext['openmp']}, blas: {ext['blas']}")
        t = ext.get("cpu_tuning")
        if t:
            kib = lambda n: f"{n // 1024} KiB" if n < 1 << 20 else f"{n / (1 << 20):g} MiB"  # noqa: E731
            l3 = f", L3 {kib(t['l3_bytes'])} shared by {t['l3_shared_by']}" if t["l3_bytes"] else ""
            print(f"cpu kernels: isa {ext.get('cpu_isa')}, caches (from {t['cache_source']}) L1d "
                  f"{kib(t['l1d_bytes'])}, L2 {kib(t['l2_bytes'])} shared by {t['l2_shared_by']}{l3}; "
                  f"row block {kib(t['block_bytes'])}, split at {t['split_flops']} FLOP")
    else:
        print(f"extension pyebm._C: not built ({ext.get('why')})")
    print("backends:")
    for name, ok in report.items():
        print(f"  {name:7s} {'usable' if ok else 'not usable: ' + str(report.why[name])}")
        print(f"          ({report.verified[name]})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyebm", description="Fused kernels for energy-based model inference")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p_info = sub.add_parser("info", help="version, build information and usable backends")
    p_info.add_argument("--json", action="store_true", help="print as JSON")
    p_info.set_defaults(func=_cmd_info)
    # Each further sub-command lives in its own module with add_arguments(parser) and run(args) -> int.
    import importlib

    for name, module, help_text in _COMMANDS:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if not module.startswith(str(exc.name)):
                raise
            continue
        p = sub.add_parser(name, help=help_text)
        mod.add_arguments(p)
        p.set_defaults(func=mod.run)
    return parser


_COMMANDS = [
    ("demo", "pyebm.demo", "train a small energy model and run batched multi-candidate descent on it"),
    ("bench", "pyebm.bench.cli", "latency benchmarks: pyebm against eager autograd, torch.compile, ..."),
    ("serve", "pyebm.serving", "serve a saved policy over HTTP on Ray Serve, batching concurrent requests"),
]


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # `pyebm` alone: say what there is
        parser.print_help()
        return 0
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
