"""Rerank of N proposals against an eager scoring loop; the assignment solver against scipy.

    python bench/bench_rerank.py [--quick] [--device cpu|cuda] [--N 64,256,1024,4096] [--B 4]
                                 [--k 8,32,128] [--assign-B 1,64] [--only rerank|assign] [--json FILE] [--csv FILE]

rerank: an MLPEnergy (context 32, candidate 16, hidden 256x256) scores N proposals for each of B contexts.
Columns: the eager loop as users write it (one forward per context and candidate: the baseline), one plain
batched forward of the module, and ``pyebm.rerank`` (prepare once, the fused energy op, top-4 and the
softmax distribution on the device).

assign: maximum-weight assignment of B random [k, k] score matrices. Columns: a Python loop of
``scipy.optimize.linear_sum_assignment`` on numpy arrays (the baseline), ``permutation_argmin`` with
method "scipy" (the same solver, plus the copies and the energy) and with method "auction" (batched on the
device). The full grid of the design (N up to 4096; k = 8..256, B = 1..1024) is
``--N 64,256,1024,4096 --k 8,16,32,64,128,256 --assign-B 1,16,128,1024``; the defaults stay small.
"""
from __future__ import annotations

import argparse
import sys

import torch

import pyebm
from pyebm.bench.core import BenchResult, Column, machine_info, measure_cases
from pyebm.bench.script import print_result
from pyebm.discrete import permutation_argmin


def _ints(text: str):
    return [int(t) for t in text.split(",") if t.strip()]


def rerank_cases(Ns, B, device, timing, progress):
    torch.manual_seed(0)
    energy = pyebm.MLPEnergy(32, 16, hidden=(256, 256)).to(device)
    for N in Ns:
        x = torch.randn(B, 32, device=device)
        y = torch.randn(B, N, 16, device=device)

        def eager():
            with torch.no_grad():
                E = torch.stack([torch.stack([energy(x[b:b + 1], y[b:b + 1, n])[0] for n in range(N)])
                                 for b in range(B)])
            return torch.topk(-E, min(4, N), dim=1)

        def batched():
            with torch.no_grad():
                return torch.topk(-energy(x, y), min(4, N), dim=1)

        def fused():
            return pyebm.rerank(energy, x, y, k=min(4, N), temperature=1.0)

        cols = [Column("eager loop", eager, baseline=True), Column("batched forward", batched),
                Column("pyebm.rerank", fused)]
        yield from measure_cases("rerank", f"N={N}", cols, {"B": B, "N": N, "D": 16, "hidden": (256, 256)},
                                 device=device, timing=timing, progress=progress)


def assign_cases(ks, Bs, device, timing, progress):
    from scipy.optimize import linear_sum_assignment

    torch.manual_seed(0)
    for k in ks:
        for B in Bs:
            theta = torch.rand(B, k, k, device=device)

            def scipy_loop():
                host = theta.cpu().double().numpy()
                return [linear_sum_assignment(host[b], maximize=True) for b in range(B)]

            cols = [Column("scipy loop", scipy_loop, baseline=True),
                    Column("permutation_argmin scipy", lambda: permutation_argmin(theta, method="scipy")),
                    Column("permutation_argmin auction", lambda: permutation_argmin(theta, method="auction"))]
            yield from measure_cases("assign", f"k={k} B={B}", cols, {"B": B, "k": k}, device=device,
                                     timing=timing, progress=progress)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer samples, small sizes")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--N", default="64,256,1024", help="proposals per context (rerank)")
    ap.add_argument("--B", type=int, default=4, help="contexts (rerank)")
    ap.add_argument("--k", default="8,32,128", help="assignment sizes")
    ap.add_argument("--assign-B", default="1,64", help="assignment batch sizes")
    ap.add_argument("--only", choices=("rerank", "assign"), default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--csv", default=None)
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda but no CUDA device is available")
    timing = {"min_samples": 3, "max_samples": 7, "budget_s": 2.0} if args.quick else {}
    progress = lambda m: print(f"measuring {m}", file=sys.stderr)  # noqa: E731
    cases = []
    if args.only in (None, "rerank"):
        cases += list(rerank_cases(_ints(args.N), args.B, args.device, timing, progress))
    if args.only in (None, "assign"):
        cases += list(assign_cases(_ints(args.k), _ints(args.assign_B), args.device, timing, progress))
    result = BenchResult(cases, machine_info(args.device))
    print_result("bench_rerank", result)
    if args.json:
        result.to_json(args.json)
    if args.csv:
        result.to_csv(args.csv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
