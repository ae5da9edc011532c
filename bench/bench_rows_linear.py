"""torch.ops.pyebm.rows_linear against ATen's matmul (the BLAS torch links) for EBT's few-row products.

    python bench/bench_rows_linear.py [--rows 4] [--threads N] [--repeats 30]

Each shape is one product of an EBT xxs think step (6 layers, width 384, vocabulary 8192, G = 4 rows): the
forward products x @ W^T and the input-gradient products g @ W, which rows_linear runs on a transposed copy.
Every call reads a different copy of the weight (about 60 MB of copies per shape, more than the last-level
cache), as a think step streams its layers. Columns are timed alternately in one process; medians per call,
and the rate at which the weight is streamed (GB/s). The instruction set: PYEBM_CPU_ISA.
"""
import argparse
import statistics
import sys
import time

import torch

SHAPES = [("W_qkv forward", 1152, 384), ("W_o / W_2 forward", 384, 384), ("W_1|W_3 forward", 768, 384),
          ("W_qkv input gradient", 384, 1152), ("v2e forward (p @ v2e^T)", 384, 8192),
          ("v2e input gradient (dE/de @ v2e)", 8192, 384)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--repeats", type=int, default=30)
    args = p.parse_args(argv)
    import pyebm  # noqa: F401  (registers the ops)
    from pyebm import _backend

    if not hasattr(torch.ops.pyebm, "rows_linear"):
        raise SystemExit("bench_rows_linear: the extension was built without rows_linear")
    torch.set_num_threads(args.threads)
    isa = _backend.ext().cpu_isa()["active"]
    print(f"rows_linear vs ATen matmul: M = {args.rows} rows, float32, {args.threads} threads, kernels {isa}")
    print(f"{'product':34s} {'N x K':>12s} {'ATen us':>9s} {'GB/s':>6s} {'rows_linear us':>15s} {'GB/s':>6s} "
          f"{'speed-up':>9s}")
    for name, N, K in SHAPES:
        n = max(2, 60_000_000 // (N * K * 4))
        ws = [torch.randn(N, K) for _ in range(n)]
        x = torch.randn(args.rows, K)
        cols = {"aten": lambda: [x @ w.t() for w in ws], "rows": lambda: [torch.ops.pyebm.rows_linear(x, w) for w in ws]}
        for f in cols.values():
            f()
        samples = {k: [] for k in cols}
        for _ in range(args.repeats):
            for k, f in cols.items():
                t0 = time.perf_counter()
                f()
                samples[k].append((time.perf_counter() - t0) / n)
        a, r = (statistics.median(samples[k]) for k in ("aten", "rows"))
        gb = N * K * 4 / 1e9
        print(f"{name:34s} {f'{N} x {K}':>12s} {a * 1e6:9.1f} {gb / a:6.1f} {r * 1e6:15.1f} {gb / r:6.1f} {a / r:8.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
