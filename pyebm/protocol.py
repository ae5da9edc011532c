"""The energy-model protocol: what ``pyebm.minimize`` (and ``rerank``-style callers) need from an energy.

An energy scores candidates ``y [B, K, *event]`` against a context with one number each, lower is better.
Any object with these three methods is an energy model; ``pyebm.minimize`` drives it and never looks at
its class:

    ctx = model.prepare(context)                      # once per call: everything that depends only on the context
    E = model.energy(ctx, y)                          # [B, K]          no autograd graph
    E, G = model.energy_and_grad(ctx, y)              # [B, K], dE/dy   no graph over the weights

``energy`` and ``energy_and_grad`` may take a ``backend=`` keyword (``minimize(..., backend=...)``
passes it on when given). A model tells the candidate shape by an ``event_shape`` attribute (or
``candidate_dim`` for vectors); otherwise ``minimize`` needs ``init`` or ``event_shape``.

A plain ``nn.Module`` (or any callable) ``f(x, y) -> E [B, K]`` is an energy too: ``minimize`` wraps it
(``prepare`` is the identity, gradients by autograd on y only).

Whole-loop hook (optional). A model whose compiled op runs every descent step in one call declares what
that op implements with ``whole_loop_spec(dtype) -> WholeLoopSpec`` and runs it with

    model.run_whole_loop(ctx, config, *, backend, y0, mask, lower, upper, step_clip, generator, final_energy)
        -> (y, E_final, E_init, steps, status)

``pyebm._dispatch`` compares each call with the spec (the one place that decides which path runs) and
``pyebm.explain`` shows the answer. A spec with ``one_call`` backends also offers

    model.run_one_call(context, config, *, y0, generator, final_energy) -> DescentResult fields (y, E, E_init,
        steps, status, best, best_energy, best_index)

which prepares the context, runs every step and selects the best candidate in a single call of compiled code
(MLPEnergy: its cpu plan; EBTPolicy: its packed weights' one-call descent), without ``minimize``'s general
argument handling. ``final_energy=False`` (one candidate) may skip the final energy pass: E and best_energy
are then None.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Protocol, Tuple, runtime_checkable

import torch
from torch import Tensor


@runtime_checkable
class EnergyModel(Protocol):
    """Anything ``pyebm.minimize`` can descend (see the module docstring)."""

    def prepare(self, context: Any) -> Any: ...

    def energy(self, ctx: Any, y: Tensor) -> Tensor: ...

    def energy_and_grad(self, ctx: Any, y: Tensor) -> Tuple[Tensor, Tensor]: ...


@dataclass(frozen=True)
class WholeLoopSpec:
    """What a model's whole-loop op implements, for candidates of one dtype.

    backends     the backends that have the op ("cpu", "cuda", "triton").
    dtypes       the candidate dtypes it takes.
    noise        the noise modes it implements ("none" always; "langevin", "step", "additive" when drawn
                 noise is passed in).
    normalize    the ``Descent.normalize`` values it implements (None always).
    tol_scopes   the early-exit scopes ("candidate"; "all" = one batch-wide gradient norm).
    tol_all_with_clip  whether tol_scope "all" combines with gradient clipping.
    mask         whether clamped-coordinate masks are implemented.
    one_call     backends where ``run_one_call`` does prepare + loop + selection in one call.
    one_call_why None, or why there is no one-call descent (when ``one_call`` is empty).
    unavailable  None, or why this model has no whole-loop op in its current configuration.
    """

    backends: Tuple[str, ...] = ()
    dtypes: Tuple[torch.dtype, ...] = (torch.float32, torch.float64)
    noise: Tuple[str, ...] = ("none",)
    normalize: Tuple[Optional[str], ...] = (None,)
    tol_scopes: Tuple[str, ...] = ("candidate",)
    tol_all_with_clip: bool = True
    mask: bool = False
    one_call: Tuple[str, ...] = field(default=())
    one_call_why: Optional[str] = None
    unavailable: Optional[str] = None


@runtime_checkable
class WholeLoopEnergy(EnergyModel, Protocol):
    """An energy model with a whole-loop op (see the module docstring)."""

    def whole_loop_spec(self, dtype: torch.dtype) -> WholeLoopSpec: ...

    def run_whole_loop(self, ctx: Any, config: Any, *, backend: str, y0: Tensor, mask: Optional[Tensor],
                       lower: Optional[Tensor], upper: Optional[Tensor], step_clip: Optional[Tensor],
                       generator: Optional[torch.Generator], final_energy: bool
                       ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]: ...


def is_energy_model(obj) -> bool:
    return all(callable(getattr(obj, name, None)) for name in ("prepare", "energy", "energy_and_grad"))


def has_whole_loop(obj) -> bool:
    return callable(getattr(obj, "whole_loop_spec", None)) and callable(getattr(obj, "run_whole_loop", None))
