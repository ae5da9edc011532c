"""The benchmark suites behind `pyebm bench` and bench/*.py.

Each suite yields ``Case`` objects: for every size, the eager baseline (autograd as users write it),
the other columns, and a same-FLOP GEMM timed in the same run (this machine's ceiling). The columns of
one size are sampled together, round-robin, until their ratios to the baseline are known to +-5% or the
size's time budget is spent (pyebm.bench.timing.measure_interleaved).
"""
from __future__ import annotations

import sys
from typing import Callable, Dict, Iterator, List, Optional

import torch

from pyebm.bench.core import GEMM_COLUMN, Case, Column, measure_cases
from pyebm.bench.timing import gemm_reference

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


def _timing_kw(quick: bool, sampling: Optional[Dict[str, object]] = None) -> Dict[str, object]:
    """measure_interleaved's options for one size: adaptive sample counts within a time budget per size
    (``sampling`` overrides any of them: min_samples, max_samples, budget_s, rel_ci, ...)."""
    kw: Dict[str, object] = {"warmup": 3, "min_samples": 5, "max_samples": 40, "budget_s": 4.0, "min_sample_s": 1e-3} \
        if quick else {"warmup": 3, "min_samples": 10, "max_samples": 200, "budget_s": 20.0, "min_sample_s": 4e-3}
    return merge_sampling(kw, sampling)


def merge_sampling(defaults: Dict[str, object], sampling: Optional[Dict[str, object]]) -> Dict[str, object]:
    """``defaults`` with the options the user set (None: not set); a bound the user set wins over the other
    bound's default (--max-samples 3 lowers a default minimum of 5 to 3)."""
    given = {k: v for k, v in (sampling or {}).items() if v is not None}
    kw = {**defaults, **given}
    if kw["max_samples"] < kw["min_samples"]:
        if "min_samples" in given and "max_samples" in given:
            raise ValueError(f"max_samples ({kw['max_samples']}) is below min_samples ({kw['min_samples']})")
        if "max_samples" in given:
            kw["min_samples"] = kw["max_samples"]
        else:
            kw["max_samples"] = kw["min_samples"]
    return kw


def _pyebm_backends(device: str) -> List[str]:
    import pyebm

    rep = pyebm.backends()
    order = ("cuda", "triton", "torch") if device.startswith("cuda") else ("cpu", "torch")
    return [b for b in order if rep[b]]


def ops_cases(quick: bool = False, device: str = "cpu", compile: bool = True, memory: bool = True,
              sizes: Optional[List[str]] = None, sweep: bool = True,
              progress: Optional[Callable[[str], None]] = None,
              sampling: Optional[Dict[str, object]] = None) -> Iterator[Case]:
    """energy_and_grad per call for MLPEnergy."""
    import pyebm

    kw = _timing_kw(quick, sampling)
    plan = [(s, OPS_SIZES[s], None) for s in (sizes or list(OPS_SIZES))]
    if sweep:
        plan += [(f"sweep B={b}", (b, 32, 32, (256, 256), 32), b) for b in OPS_SWEEP]
    for name, (B, K, D, hidden, cdim), batch in plan:
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
        cols = [Column("eager autograd", lambda: eager_on(rot()), baseline=True, flops=flops)]
        cols.append(Column("torch.func", lambda: gv(rot()), flops=flops))
        if compile:
            if progress:
                progress(f"ops {name}: torch.compile")
            compiled = torch.compile(lambda yin: gv(yin))
            cols.append(Column("torch.compile", lambda: compiled(rot()), flops=flops))
        if device.startswith("cuda"):
            from pyebm.bench.timing import cuda_graphed

            try:  # a graph replays fixed memory: it reads y itself
                cols.append(Column("eager autograd (CUDA graph)", cuda_graphed(lambda: eager_on(y)), flops=flops))
            except Exception as exc:  # a failed capture is reported on stderr, not hidden
                print(f"ops {name}: CUDA-graph capture of the eager step failed: {exc}", file=sys.stderr)
        ctx = model.prepare(x)
        for be in _pyebm_backends(device):
            cols.append(Column(f"pyebm {be}", (lambda be=be: model.energy_and_grad(ctx, rot(), backend=be)),
                               flops=flops))
        if device == "cpu" and pyebm.backends()["cpu"]:
            # The same kernels through the registered op (the path torch.compile takes): the difference to
            # "pyebm cpu" is the dispatcher, the argument lists and the per-call checks the plan avoids.
            op_args = model.op_params()
            op = torch.ops.pyebm.mlp_energy_grad.default
            cols.append(Column("pyebm cpu, torch.ops op", (lambda: op(ctx, rot(), *op_args, model.activation,
                                                                      model.residual)), flops=flops))
        gemm = gemm_reference(flops, B * K, device=device)
        cols.append(Column(GEMM_COLUMN, gemm, flops=gemm.flops, alloc=False))
        yield from measure_cases("ops", name, cols, params, device=device, timing=kw,
                                 memory=memory and batch is None, progress=progress)


def dispatch_floor_case(quick: bool = False, device: str = "cpu",
                        sampling: Optional[Dict[str, object]] = None) -> Case:
    x = torch.randn(4, device=device)
    op = torch.ops.pyebm.dispatch_floor.default
    return measure_cases("ops", "dispatch floor", [Column("torch.ops.pyebm.dispatch_floor", lambda: op(x))],
                         {"x": [4]}, device=device, timing=_timing_kw(quick, sampling))[0]


SUITES: Dict[str, Callable[..., Iterator[Case]]] = {"ops": ops_cases}


def register_suite(name: str, fn: Callable[..., Iterator[Case]]) -> None:
    SUITES[name] = fn
