"""``pyebm.explain``: which path a call takes, and why each faster one was refused.

    >>> print(pyebm.explain(energy, x, config=cfg, candidates=64))
    minimize: one call (backend cpu)
      not cuda graph: not requested (cuda_graph=False)

The answers come from the predicates of ``pyebm._dispatch``, the same ones the call itself asks.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

import torch
from torch import Tensor

from pyebm import _dispatch
from pyebm.descent import _plan_call


@dataclass
class Explanation:
    """The path of a call (``path``, with the ``backend`` of its compiled part), what its parts run
    (``parts``: for the per-step path, the energy call and the update step), and why each faster path
    was refused (``refused``: path -> reason)."""

    call: str
    path: str
    backend: Optional[str] = None
    refused: Dict[str, str] = field(default_factory=dict)
    parts: Dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"{self.call}: {self.path}" + (f" (backend {self.backend})" if self.backend else "")]
        lines += [f"  {name}: {what}" for name, what in self.parts.items()]
        lines += [f"  not {name}: {why}" for name, why in self.refused.items()]
        return "\n".join(lines)


def _energy_path(model, ctx, y, backend) -> str:
    describe = getattr(model, "explain_energy", None)
    if callable(describe):
        return describe(ctx, y, backend)
    return f"{type(model).__name__}.energy_and_grad"


def explain(energy, context, config=None, candidates: int = 1, *, y: Optional[Tensor] = None, init=None,
            mask=None, record: bool = False, backend: Optional[str] = None, whole_loop=None,
            cuda_graph: bool = False, generator=None, event_shape=None, final_energy: bool = True,
            snapshots=None, compile: Optional[bool] = None) -> Explanation:
    """The path a call would take, and why each faster one was refused. Runs nothing but ``prepare``.

    With ``y`` [B, K, *event]: the path of ``energy.energy_and_grad(energy.prepare(context), y)``.
    Otherwise: the path of ``pyebm.minimize(energy, context, candidates, config, ...)`` with the same
    arguments, and for the per-step path the energy call and the update step each step runs.
    """
    if y is not None:
        ctx = energy.prepare(context)
        return Explanation("energy_and_grad", _energy_path(energy, ctx, y, backend))
    call = _plan_call(energy, context, candidates, config, init, mask, generator, record, backend, event_shape,
                      whole_loop, cuda_graph, final_energy, snapshots, compile)
    route, cfg = call.route, call.cfg
    parts: Dict[str, str] = {}
    if route.kind == "compiled":
        from pyebm import _compiled_cache

        parts["compiled"] = _compiled_cache.describe(energy, route.key)
    if route.kind in ("per step", "autograd", "compiled"):
        if route.kind == "autograd":
            parts["energy"] = "autograd on y of the plain energy f(x, y)"
        elif route.kind == "compiled":
            parts["energy"] = "torch.func.grad_and_value in y of the plain energy f(x, y), compiled"
        elif call.B > 0:
            probe = torch.zeros((call.B, call.K) + call.event, device=call.device, dtype=call.dtype)
            parts["energy"] = _energy_path(call.model, call.model.prepare(context), probe, backend)
        if cfg.method == "dfo":
            parts["update"] = "resampling by softmax(-E / T) and noise, as torch ops"
        else:
            rows = torch.zeros(max(call.B * call.K, 1), 1, device=call.device, dtype=call.dtype)
            kind, why = _dispatch.update_route(
                rows, rows, None, cfg.noise if cfg.noise != "pre" else "none", cfg.tol, cfg.tol_on, cfg.tol_scope,
                None, cfg.accept_if_lower or cfg.integrator == "heun", None, None, None,
                _dispatch.model_backend(call.model, backend))
            parts["update"] = f"fused descent_update on {kind}" if kind else f"torch ops ({why})"
    return Explanation("minimize", route.kind, route.backend, dict(route.refused), parts)
