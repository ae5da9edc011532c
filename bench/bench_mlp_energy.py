"""energy_and_grad per call: eager autograd, torch.func, torch.compile and the pyebm backends.

    python bench/bench_mlp_energy.py [--quick] [--no-compile] [--json FILE] [--sizes small,medium,large]

Side by side in one process, same inputs, same thread count. Reports the median per-call time, the
ratio to eager autograd, achieved GFLOP/s, and the share of the FLOP rate of a plain GEMM with the same
FLOP count timed in the same run. Also reports the cost of our cheapest op (the dispatch floor).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone

import torch

import pyebm
from pyebm.bench import gemm_reference, measure

SIZES = {
    # name: (B, K, D, hidden, context_dim)
    "small": (1, 32, 16, (64, 64), 32),
    "medium": (8, 32, 32, (256, 256), 32),
    "large": (64, 64, 64, (256, 256, 256), 32),
}


def flops_energy_and_grad(N, D, hidden):
    """Multiply-adds x2 of the forward (candidate side) and the input-gradient backward."""
    fwd = D * hidden[0] + sum(a * b for a, b in zip(hidden[:-1], hidden[1:])) + hidden[-1]
    bwd = hidden[-1] + sum(a * b for a, b in zip(hidden[:-1], hidden[1:])) + hidden[0] * D
    return 2.0 * N * (fwd + bwd)


def run_size(name, quick, use_compile, activation="silu"):
    B, K, D, hidden, cdim = SIZES[name]
    torch.manual_seed(0)
    model = pyebm.MLPEnergy(cdim, D, hidden=hidden, activation=activation)
    x = torch.randn(B, cdim)
    y = torch.randn(B, K, D)
    N = B * K
    flops = flops_energy_and_grad(N, D, hidden)
    reps = 7 if quick else 21
    ms = 1e-3 if quick else 4e-3

    def eager():  # as users write it: autograd on the candidate, context recomputed inside forward
        yy = y.detach().requires_grad_(True)
        E = model(x, yy)
        (G,) = torch.autograd.grad(E.sum(), yy)
        return E, G

    gv = torch.func.grad_and_value(lambda yy: model(x, yy).sum())

    def func_grad():
        return gv(y)

    rows = []
    cols = [("eager autograd", eager), ("torch.func.grad", func_grad)]
    if use_compile:
        compiled = torch.compile(func_grad)
        cols.append(("torch.compile(func.grad)", compiled))
    rep = pyebm.backends()
    ctx = model.prepare(x)
    for be in ("cpu", "torch"):
        if rep[be]:
            cols.append((f"pyebm {be}", lambda be=be: model.energy_and_grad(ctx, y, backend=be)))
    if rep["cpu"]:
        w_in, ws, bs, w_out, b_out = [t.detach() if isinstance(t, torch.Tensor) else [u.detach() for u in t]
                                      for t in model.op_params()]
        cols.append(("torch.ops.pyebm (raw op)",
                     lambda: torch.ops.pyebm.mlp_energy_grad(ctx, y, w_in, ws, bs, w_out, b_out, activation, False)))
    gemm = gemm_reference(flops, N)
    cols.append(("same-FLOP GEMM (ceiling)", gemm))

    timings = {}
    for label, fn in cols:
        timings[label] = measure(fn, warmup=5 if "compile" not in label else 3, repeats=reps, min_sample_s=ms)
    eager_t = timings["eager autograd"].median
    gemm_rate = gemm.flops / timings["same-FLOP GEMM (ceiling)"].median
    for label, t in timings.items():
        f = gemm.flops if label.startswith("same-FLOP") else flops
        rate = f / t.median
        rows.append({"size": name, "column": label, "median_us": t.median * 1e6, "p90_us": t.p90 * 1e6,
                     "vs_eager": eager_t / t.median, "gflops": rate / 1e9, "pct_gemm": 100.0 * rate / gemm_rate,
                     "samples_s": t.samples})
    return rows, {"B": B, "K": K, "D": D, "hidden": hidden, "context_dim": cdim, "flops": flops}


def dispatch_floor(quick):
    y = torch.randn(4)
    out = []
    for label, fn in [("torch.ops.pyebm.dispatch_floor", lambda: torch.ops.pyebm.dispatch_floor(y)),
                      ("torch.empty(0) (for scale)", lambda: torch.empty(0))]:
        t = measure(fn, repeats=7 if quick else 21, min_sample_s=2e-3)
        out.append({"column": label, "median_us": t.median * 1e6})
    return out


def fmt_table(rows):
    lines = ["| size | column | median us | p90 us | x eager | GFLOP/s | % of GEMM |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['size']} | {r['column']} | {r['median_us']:.1f} | {r['p90_us']:.1f} | "
                     f"{r['vs_eager']:.2f} | {r['gflops']:.2f} | {r['pct_gemm']:.0f} |")
    return "\n".join(lines)


def commit():
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except Exception:
        return "unknown"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    ap.add_argument("--sizes", default="small,medium,large")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    for s in sizes:
        if s not in SIZES:
            ap.error(f"unknown size {s!r}; choose from {', '.join(SIZES)}")
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.machine(),
            "processor": platform.processor(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "pyebm": pyebm.__version__, "commit": commit(), "command": " ".join([os.path.basename(sys.argv[0])] +
                                                                              sys.argv[1:])}
    print(f"# bench_mlp_energy  {meta['date']}  torch {meta['torch']}  threads {meta['threads']}  "
          f"commit {meta['commit']}")
    all_rows, shapes = [], {}
    for s in sizes:
        rows, shapes[s] = run_size(s, args.quick, not args.no_compile)
        all_rows += rows
        print(f"  {s}: done", file=sys.stderr)
    print(fmt_table(all_rows))
    floor = dispatch_floor(args.quick) if pyebm.backends()["cpu"] else []
    for r in floor:
        print(f"dispatch floor: {r['column']}: {r['median_us']:.2f} us")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "shapes": shapes, "rows": all_rows, "dispatch_floor": floor}, f, indent=1,
                      default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
