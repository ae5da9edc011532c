"""The loops users run today, timed as the baselines of the descent benchmarks."""
from __future__ import annotations

import torch


def _plain_gd(config) -> bool:
    fields = ("momentum", "grad_clip", "grad_clip_norm", "step_clip", "lower", "upper", "normalize", "project")
    return (config.method == "gd" and config.integrator == "euler" and config.noise == "none"
            and config.tol == 0 and not config.accept_if_lower and config.step_schedule != "energy"
            and config.grad_scale == 1.0 and all(not getattr(config, f) for f in fields))


def eager_descent(energy, context, y0: torch.Tensor, config, generator=None):
    """The peers' pattern: autograd through ``energy(context, y)`` at every step (context recomputed every
    step). Plain gradient descent is the minimal loop users write (step, then a final energy pass and
    the argmin); any other rule runs ``pyebm.reference.descent`` (the same rule as plain tensor ops)."""
    if _plain_gd(config):
        y = y0.detach()
        for k in range(config.steps):
            yy = y.requires_grad_(True)
            E = energy(context, yy)
            (g,) = torch.autograd.grad(E.sum(), yy)
            y = (yy - config.step_size_at(k) * g).detach()
        with torch.no_grad():
            E = energy(context, y)
        idx = E.argmin(dim=1)
        return y[torch.arange(y.shape[0]), idx], E
    from pyebm.reference.descent import minimize_reference

    return minimize_reference(lambda y: energy(context, y), y0, config, generator=generator)


def compiled_gd_step(energy, context, step_size: float):
    """``torch.compile`` of one plain gradient step (energy, autograd gradient, update); the Python loop
    calls it ``steps`` times. The fastest thing a user gets without pyebm for plain descent."""
    gv = torch.func.grad_and_value(lambda yy: energy(context, yy).sum())

    def step(y):
        g, _ = gv(y)
        return y - step_size * g

    return torch.compile(step)


def compiled_descent(step, y0: torch.Tensor, steps: int) -> torch.Tensor:
    y = y0
    for _ in range(steps):
        y = step(y)
    return y
