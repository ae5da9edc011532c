"""`pyebm bench descent`: whole-minimisation latency of MLPEnergy descent, T steps, side by side.

Columns: the eager loop as peers write it (autograd per step, context recomputed), torch.compile of one
gradient step in a Python loop, pyebm's per-step path (fused energy+gradient op and fused update), and
pyebm's whole-loop op (all steps in one call). Sizes are the op suite's; plus a batch sweep for plots.
The columns of a size are sampled together, round-robin (pyebm.bench.timing.measure_interleaved).
"""
from __future__ import annotations

import sys
from typing import Callable, Dict, Iterator, List, Optional

import torch

from pyebm.bench.core import GEMM_COLUMN, Case, Column, measure_cases
from pyebm.bench.descent_loops import compiled_descent, compiled_gd_step, eager_descent
from pyebm.bench.suites import OPS_SIZES, OPS_SWEEP, _timing_kw, mlp_flops, register_suite
from pyebm.bench.timing import gemm_reference

STEPS = 10
STEP_SIZE = 0.05


def descent_cases(quick: bool = False, device: str = "cpu", compile: bool = True, memory: bool = True,
                  sizes: Optional[List[str]] = None, sweep: bool = True,
                  progress: Optional[Callable[[str], None]] = None,
                  sampling: Optional[Dict[str, object]] = None) -> Iterator[Case]:
    import pyebm

    kw = _timing_kw(quick, sampling)
    plan = [(s, OPS_SIZES[s], None) for s in (sizes or ["small", "large"])]
    if sweep:
        plan += [(f"sweep B={b}", (b, 32, 32, (256, 256), 32), b) for b in OPS_SWEEP]
    cfg = pyebm.Descent.gd(steps=STEPS, step_size=STEP_SIZE)
    rep = pyebm.backends()
    for name, (B, K, D, hidden, cdim), batch in plan:
        torch.manual_seed(0)
        model = pyebm.MLPEnergy(cdim, D, hidden=hidden, activation="silu").to(device)
        x = torch.randn(B, cdim, device=device)
        y0 = torch.randn(B, K, D, device=device)
        flops = mlp_flops(B * K, D, hidden) * STEPS + mlp_flops(B * K, D, hidden, grad=False)
        params = {"B": B, "K": K, "D": D, "hidden": list(hidden), "context_dim": cdim, "steps": STEPS}
        if batch is not None:
            params["batch"] = batch
        cols = [Column("eager loop", lambda: eager_descent(model, x, y0, cfg), baseline=True, flops=flops)]
        if compile:
            if progress:
                progress(f"descent {name}: torch.compile")
            step = compiled_gd_step(model, x, STEP_SIZE)
            cols.append(Column("torch.compile(step)", lambda: compiled_descent(step, y0, STEPS), flops=flops,
                               note="plain gd steps, no selection"))
        backends = [b for b in (("cuda", "triton") if device.startswith("cuda") else ("cpu",)) if rep[b]]
        for be in backends:
            cols.append(Column(f"pyebm {be} per-step", (lambda be=be: pyebm.minimize(
                model, x, candidates=K, config=cfg, init=y0, backend=be, whole_loop=False)), flops=flops))
            whole = (lambda be=be: pyebm.minimize(model, x, candidates=K, config=cfg, init=y0, backend=be,
                                                  whole_loop=True))
            try:
                whole()
            except ValueError as exc:  # a whole-loop op missing on this backend: leave the column out
                if "whole_loop=True" not in str(exc):
                    raise
                print(f"descent {name}: no whole-loop op on backend {be}: {exc}", file=sys.stderr)
            else:
                cols.append(Column(f"pyebm {be} whole-loop", whole, flops=flops))
        if device.startswith("cuda"):
            # What a GPU user can do today without pyebm: capture the eager loop in a CUDA graph.
            from pyebm.bench.timing import cuda_graphed

            try:
                cols.append(Column("eager loop (CUDA graph)", cuda_graphed(lambda: eager_descent(model, x, y0, cfg)),
                                   flops=flops))
            except Exception as exc:  # a failed capture is reported on stderr, not hidden
                print(f"descent {name}: CUDA-graph capture of the eager loop failed: {exc}", file=sys.stderr)
            cols.append(Column("pyebm per-step (CUDA graph)", lambda: pyebm.minimize(
                model, x, candidates=K, config=cfg, init=y0, cuda_graph=True), flops=flops))
        gemm = gemm_reference(flops, B * K, device=device)
        cols.append(Column(GEMM_COLUMN, gemm, flops=gemm.flops, alloc=False))
        yield from measure_cases("descent", name, cols, params, device=device, timing=kw,
                                 memory=memory and batch is None, progress=progress)


register_suite("descent", descent_cases)
