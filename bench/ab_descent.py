"""Median latency of pyebm.minimize (T=10 gd steps, backend cpu) per step and with the whole loop, one JSON line.

    python bench/ab_descent.py [--sizes small,medium,large] [--budget 1.5] [--threads 2]

Meant for before/after comparisons of two trees of the CPU kernels, alternated in separate processes, e.g.
    for r in 1 2 3; do for tree in OLD NEW; do PYTHONPATH=$tree python bench/ab_descent.py; done; done
(the row-block settings are read once per process, so each setting or tree needs its own process).
"""
import argparse
import json
import statistics
import time

import torch

import pyebm
from pyebm.bench.suites import OPS_SIZES


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="small,medium,large")
    ap.add_argument("--budget", type=float, default=1.5, help="seconds of samples per column")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = {"pyebm": pyebm.__file__, "threads": args.threads}
    for size in args.sizes.split(","):
        B, K, D, hidden, cdim = OPS_SIZES[size]
        torch.manual_seed(0)
        model = pyebm.MLPEnergy(cdim, D, hidden=hidden, activation="silu")
        x, y0 = torch.randn(B, cdim), torch.randn(B, K, D)
        cfg = pyebm.Descent.gd(steps=10, step_size=0.05)
        for whole in (False, True):
            def call():
                pyebm.minimize(model, x, candidates=K, config=cfg, init=y0, backend="cpu", whole_loop=whole)
            for _ in range(3):
                call()
            times, end = [], time.perf_counter() + args.budget
            while time.perf_counter() < end or len(times) < 5:
                t0 = time.perf_counter()
                call()
                times.append(time.perf_counter() - t0)
            out[f"{size} {'whole-loop' if whole else 'per-step'} ms"] = round(statistics.median(times) * 1e3, 4)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
