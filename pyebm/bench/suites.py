"""The benchmark suites behind `pyebm bench` and bench/*.py.

Each suite yields ``Case`` objects: for every size, the eager baseline (autograd as users write it),
the other columns, and a same-FLOP GEMM timed in the same run (this machine's ceiling).
"""
from __future__ import annotations

import sys
from typing import Callable, Dict, Iterator, List, Optional

import torch

from pyebm.bench.core import GEMM_COLUMN, Case
from pyebm.bench.memory import alloc_per_call
from pyebm.bench.timing import gemm_reference, measure

# name: (B, K, D, hidden, context_dim)
OPS_SIZES = {
    "small": (1, 32, 16, (64, 64), 32),
    "medium": (8, 32, 32, (256, 256), 32),
    "large": (64, 64, 64, (256, 256, 256), 32),
}
OPS_SWEEP = (1, 4, 16, 64)  # batch sizes of the plot sweep, at K=32, D=32, hidden (256, 256)


def mlp_flops(N: int, D: int, hidden, grad: bool = True) -> float:
    """2 x multiply-adds per call: candidate-side forward, and the input-gradient backward when grad."""
    f = D * hidden[0] + sum(a * b for a, b in zip(hidden[:-1], hidden[1:])) + hidden[-1]
    return 2.0 * N * f * (2 if grad else 1)


def rotating(t: torch.Tensor, bytes_beyond_cache: int = 8 << 20, most: int = 16):
    """A callable returning ``t`` or one of its copies in turn, enough copies to exceed ``bytes_beyond_cache``
    (on CPU; on a GPU the tensor itself)."""
    if t.device.type != "cpu":
        return lambda: t
    n = max(1, min(most, -(-bytes_beyond_cache // max(1, t.numel() * t.element_size()))))
    copies = [t] + [t.clone() for _ in range(n - 1)]
    state = [0]

    def nxt():
        state[0] = (state[0] + 1) % n
        return copies[state[0]]

    return nxt


def _timing_kw(quick: bool):
    return {"repeats": 7, "min_sample_s": 1e-3, "max_time_s": 3.0} if quick else \
           {"repeats": 21, "min_sample_s": 4e-3, "max_time_s": 15.0}


def _pyebm_backends(device: str) -> List[str]:
    import pyebm

    rep = pyebm.backends()
    order = ("cuda", "triton", "torch") if device.startswith("cuda") else ("cpu", "torch")
    return [b for b in order if rep[b]]


def ops_cases(quick: bool = False, device: str = "cpu", compile: bool = True, memory: bool = True,
              sizes: Optional[List[str]] = None, sweep: bool = True,
              progress: Optional[Callable[[str], None]] = None) -> Iterator[Case]:
    """energy_and_grad per call for MLPEnergy."""
    import pyebm

    kw = _timing_kw(quick)
    plan = [(s, OPS_SIZES[s], None) for s in (sizes or list(OPS_SIZES))]
    if sweep:
        plan += [(f"sweep B={b}", (b, 32, 32, (256, 256), 32), b) for b in OPS_SWEEP]
    for name, (B, K, D, hidden, cdim), batch in plan:
        if progress:
            progress(f"ops {name}")
        torch.manual_seed(0)
        model = pyebm.MLPEnergy(cdim, D, hidden=hidden, activation="silu").to(device)
        x = torch.randn(B, cdim, device=device)
        y = torch.randn(B, K, D, device=device)
        # Candidate batches are rotated through copies that together exceed the L2 caches, so no column
        # finds its input warm from the previous call (weights stay cached, as they do in real use).
        rot = rotating(y)
        flops = mlp_flops(B * K, D, hidden)
        params = {"B": B, "K": K, "D": D, "hidden": list(hidden), "context_dim": cdim}
        if batch is not None:
            params["batch"] = batch

        def eager_on(yin):
            yy = yin.detach().requires_grad_(True)
            E = model(x, yy)
            (G,) = torch.autograd.grad(E.sum(), yy)
            return E, G

        gv = torch.func.grad_and_value(lambda yy: model(x, yy).sum())
        cols = [("eager autograd", lambda: eager_on(rot()), True)]
        if batch is None:
            cols.append(("torch.func", lambda: gv(rot()), False))
            if compile:
                compiled = torch.compile(lambda yin: gv(yin))
                cols.append(("torch.compile", lambda: compiled(rot()), False))
        if device.startswith("cuda") and batch is None:
            from pyebm.bench.timing import cuda_graphed

            try:  # a graph replays fixed memory: it reads y itself
                cols.append(("eager autograd (CUDA graph)", cuda_graphed(lambda: eager_on(y)), False))
            except Exception as exc:  # a failed capture is reported on stderr, not hidden
                print(f"ops {name}: CUDA-graph capture of the eager step failed: {exc}", file=sys.stderr)
        ctx = model.prepare(x)
        for be in _pyebm_backends(device):
            cols.append((f"pyebm {be}", (lambda be=be: model.energy_and_grad(ctx, rot(), backend=be)), False))
        if device == "cpu" and batch is None and pyebm.backends()["cpu"]:
            # The same kernels through the registered op (the path torch.compile takes): the difference to
            # "pyebm cpu" is the dispatcher, the argument lists and the per-call checks the plan avoids.
            op_args = model.op_params()
            op = torch.ops.pyebm.mlp_energy_grad.default
            cols.append(("pyebm cpu, torch.ops op", (lambda: op(ctx, rot(), *op_args, model.activation,
                                                                  model.residual)), False))
        for label, fn, base in cols:
            t = measure(fn, device=device, **kw)
            alloc = alloc_per_call(fn, device) if (memory and batch is None) else None
            yield Case("ops", name, label, t, flops=flops, baseline=base, params=params, alloc_bytes=alloc)
        gemm = gemm_reference(flops, B * K, device=device)
        yield Case("ops", name, GEMM_COLUMN, measure(gemm, device=device, **kw), flops=gemm.flops, params=params)


def dispatch_floor_case(quick: bool = False, device: str = "cpu") -> Case:
    x = torch.randn(4, device=device)
    op = torch.ops.pyebm.dispatch_floor.default
    return Case("ops", "dispatch floor", "torch.ops.pyebm.dispatch_floor", measure(lambda: op(x), device=device,
                                                                                   **_timing_kw(quick)))


SUITES: Dict[str, Callable[..., Iterator[Case]]] = {"ops": ops_cases}


def register_suite(name: str, fn: Callable[..., Iterator[Case]]) -> None:
    SUITES[name] = fn
