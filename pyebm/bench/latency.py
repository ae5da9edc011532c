"""`pyebm.bench.latency`: benchmark a user's own energy model, per step and per whole descent."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from pyebm.bench.core import BenchResult, Column, machine_info, measure_cases, run_params

_PYEBM_BACKENDS = ("auto", "torch", "cpu", "triton", "cuda")


def _event_shape(energy) -> Optional[tuple]:
    for attr in ("candidate_shape", "event_shape"):
        if hasattr(energy, attr):
            return tuple(getattr(energy, attr))
    if hasattr(energy, "candidate_dim"):
        return (int(energy.candidate_dim),)
    return None


def latency(energy, context, config=None, candidates: int = 32, backends: Sequence[str] = ("eager", "compile", "auto"),
            warmup: int = 3, repeats: int = 15, init: Optional[torch.Tensor] = None, memory: bool = False,
            min_sample_s: float = 2e-3, max_samples: Optional[int] = None, budget_s: float = 10.0,
            rel_ci: Optional[float] = 0.05) -> BenchResult:
    """Step latency (energy + input gradient of all candidates) and, with ``config`` (a ``pyebm.Descent``),
    whole-descent latency, for every entry of ``backends``:

    * ``"eager"``   - autograd through ``energy(context, y)`` as users write it (the baseline of the ratios);
    * ``"compile"`` - ``torch.compile`` of that step (``torch.func.grad_and_value``);
    * ``"auto"``, ``"torch"``, ``"cpu"``, ``"triton"``, ``"cuda"`` - pyebm's fused path on that backend.

    ``context`` is what ``energy.prepare`` takes (e.g. x [B, context_dim]); candidates are drawn from
    ``init`` ([B, K, *event]) or a standard normal. A model without ``energy_and_grad`` is timed through the
    generic autograd path, and the result says so. Returns a ``BenchResult`` (prints as a table;
    ``.to_dict()``, ``.to_json(path)``, ``.to_csv(path)``).

    The backends of the step (and of the descent) are sampled round-robin, at least ``repeats`` and at most
    ``max_samples`` (default ``4 * repeats``) samples each, until every ratio to eager is known to
    ``rel_ci`` (relative half-width of its 95% bootstrap interval) or ``budget_s`` seconds are spent.
    """
    if candidates < 1:
        raise ValueError(f"candidates must be >= 1; got {candidates}")
    if warmup < 0 or repeats < 1:
        raise ValueError(f"warmup must be >= 0 and repeats >= 1; got warmup={warmup}, repeats={repeats}")
    if max_samples is None:
        max_samples = 4 * repeats
    if max_samples < repeats:
        raise ValueError(f"max_samples must be >= repeats; got max_samples={max_samples}, repeats={repeats}")
    for b in backends:
        if b not in ("eager", "compile") + _PYEBM_BACKENDS:
            raise ValueError(f"unknown backend {b!r}; choose from eager, compile, {', '.join(_PYEBM_BACKENDS)}")
    if init is not None:
        y = init
        B = y.shape[0]
    else:
        event = _event_shape(energy)
        if event is None:
            raise ValueError("latency: cannot tell the candidate shape of this model; pass init=[B, K, *event]")
        if not isinstance(context, torch.Tensor):
            raise ValueError("latency: pass init=[B, K, *event] when the context is not a tensor")
        B = context.shape[0]
        y = torch.randn(B, candidates, *event, device=context.device, dtype=context.dtype)
    device = str(y.device)
    fused = hasattr(energy, "energy_and_grad") and hasattr(energy, "prepare")
    flops = None
    if hasattr(energy, "hidden") and hasattr(energy, "candidate_dim"):
        from pyebm.bench.suites import mlp_flops

        flops = mlp_flops(y.shape[0] * y.shape[1], energy.candidate_dim, energy.hidden)
    params = {"B": B, "K": y.shape[1], "event": list(y.shape[2:])}
    kw = dict(warmup=warmup, min_samples=repeats, max_samples=max_samples, budget_s=budget_s, rel_ci=rel_ci,
              min_sample_s=min_sample_s)

    def eager_step():
        yy = y.detach().requires_grad_(True)
        E = energy(context, yy)
        (G,) = torch.autograd.grad(E.sum(), yy)
        return E, G

    cols = []
    ctx = energy.prepare(context) if fused else None
    for b in backends:
        note = ""
        if b == "eager":
            fn = eager_step
        elif b == "compile":
            gv = torch.func.grad_and_value(lambda yy: energy(context, yy).sum())
            fn = torch.compile(lambda: gv(y))
        elif fused:
            fn = (lambda b=b: energy.energy_and_grad(ctx, y, backend=None if b == "auto" else b))
        else:
            fn, note = eager_step, "generic autograd path: the model has no energy_and_grad"
        cols.append(Column(b if b in ("eager", "compile") else f"pyebm {b}", fn, baseline=(b == "eager"), flops=flops,
                           note=note))
    run = run_params(params, device, y.dtype)
    cases = measure_cases("latency", "step", cols, run, device=device, timing=kw, memory=memory)

    if config is not None:
        import pyebm
        from pyebm.bench.descent_loops import eager_descent

        cols = []
        for b in backends:
            note = ""
            if b == "eager":
                fn = lambda: eager_descent(energy, context, y, config)  # noqa: E731
            elif b == "compile":
                continue  # compiling whole loops is done by the descent suite, not per user model
            else:
                fn = (lambda b=b: pyebm.minimize(energy, context, candidates=y.shape[1], config=config, init=y,
                                                 backend=None if b == "auto" else b))
                if not fused:
                    note = "generic autograd path: the model has no energy_and_grad"
            cols.append(Column(b if b == "eager" else f"pyebm {b}", fn, baseline=(b == "eager"),
                               flops=None if flops is None else flops * config.steps, note=note))
        cases += measure_cases("latency", f"descent T={config.steps}", cols, {**run, "steps": config.steps},
                               device=device, timing=kw, memory=memory)
    return BenchResult(cases, machine_info(device))
