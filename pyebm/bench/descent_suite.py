"""`pyebm bench descent`: whole-minimisation latency of MLPEnergy descent, T steps, side by side.

Columns: the eager loop as peers write it (autograd per step, context recomputed), torch.compile of one
gradient step in a Python loop, pyebm's per-step path (fused energy+gradient op and fused update), and
pyebm's whole-loop op (all steps in one call). Sizes are the op suite's; plus a batch sweep for plots.
"""
from __future__ import annotations

import sys
from typing import Callable, Iterator, List, Optional

import torch

from pyebm.bench.core import GEMM_COLUMN, Case
from pyebm.bench.descent_loops import compiled_descent, compiled_gd_step, eager_descent
from pyebm.bench.memory import alloc_per_call
from pyebm.bench.suites import OPS_SIZES, OPS_SWEEP, _timing_kw, mlp_flops, register_suite
from pyebm.bench.timing import gemm_reference, measure

STEPS = 10
STEP_SIZE = 0.05


def descent_cases(quick: bool = False, device: str = "cpu", compile: bool = True, memory: bool = True,
                  sizes: Optional[List[str]] = None, sweep: bool = True,
                  progress: Optional[Callable[[str], None]] = None) -> Iterator[Case]:
    import pyebm

    kw = _timing_kw(quick)
    plan = [(s, OPS_SIZES[s], None) for s in (sizes or ["small", "large"])]
    if sweep:
        plan += [(f"sweep B={b}", (b, 32, 32, (256, 256), 32), b) for b in OPS_SWEEP]
    cfg = pyebm.Descent.gd(steps=STEPS, step_size=STEP_SIZE)
    rep = pyebm.backends()
    for name, (B, K, D, hidden, cdim), batch in plan:
        if progress:
            progress(f"descent {name}")
        torch.manual_seed(0)
        model = pyebm.MLPEnergy(cdim, D, hidden=hidden, activation="silu").to(device)
        x = torch.randn(B, cdim, device=device)
        y0 = torch.randn(B, K, D, device=device)
        flops = mlp_flops(B * K, D, hidden) * STEPS + mlp_flops(B * K, D, hidden, grad=False)
        params = {"B": B, "K": K, "D": D, "hidden": list(hidden), "context_dim": cdim, "steps": STEPS}
        if batch is not None:
            params["batch"] = batch
        cols = [("eager loop", lambda: eager_descent(model, x, y0, cfg), True, "")]
        if compile and batch is None:
            step = compiled_gd_step(model, x, STEP_SIZE)
            cols.append(("torch.compile(step)", lambda: compiled_descent(step, y0, STEPS), False,
                         "plain gd steps, no selection"))
        backends = [b for b in (("cuda", "triton") if device.startswith("cuda") else ("cpu",)) if rep[b]]
        for be in backends:
            cols.append((f"pyebm {be} per-step", (lambda be=be: pyebm.minimize(
                model, x, candidates=K, config=cfg, init=y0, backend=be, whole_loop=False)), False, ""))
            cols.append((f"pyebm {be} whole-loop", (lambda be=be: pyebm.minimize(
                model, x, candidates=K, config=cfg, init=y0, backend=be, whole_loop=True)), False, ""))
        if device.startswith("cuda") and batch is None:
            # What a GPU user can do today without pyebm: capture the eager loop in a CUDA graph.
            from pyebm.bench.timing import cuda_graphed

            try:
                cols.append(("eager loop (CUDA graph)", cuda_graphed(lambda: eager_descent(model, x, y0, cfg)),
                             False, ""))
            except Exception as exc:  # a failed capture is reported on stderr, not hidden
                print(f"descent {name}: CUDA-graph capture of the eager loop failed: {exc}", file=sys.stderr)
            cols.append(("pyebm per-step (CUDA graph)", lambda: pyebm.minimize(
                model, x, candidates=K, config=cfg, init=y0, cuda_graph=True), False, ""))
        for label, fn, base, note in cols:
            try:
                t = measure(fn, device=device, **kw)
            except ValueError as exc:  # a whole-loop op missing on this backend: say so, keep going
                if "whole_loop=True" not in str(exc):
                    raise
                continue
            alloc = alloc_per_call(fn, device) if (memory and batch is None) else None
            yield Case("descent", name, label, t, flops=flops, baseline=base, params=params, alloc_bytes=alloc,
                       note=note)
        gemm = gemm_reference(flops, B * K, device=device)
        yield Case("descent", name, GEMM_COLUMN, measure(gemm, device=device, **kw), flops=gemm.flops,
                   params=params)


register_suite("descent", descent_cases)
