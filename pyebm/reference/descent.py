"""Reference multi-candidate descent: one plain loop per step, written for reading, not for speed.

``minimize_reference(energy_fn, y0, config)`` runs the update rule described by ``config`` (a
``pyebm.Descent``; read by attribute only, so this module imports nothing but torch) on ``K`` candidates
for each of ``B`` contexts. ``y0`` [B, K, *event] is the initial state; ``energy_fn(y)`` returns either
``E`` [B, K] (the gradient is then taken by autograd) or ``(E, dE/dy)``.

One gradient step ``k`` (0-based) of ``method="gd"`` does, for every candidate at once:

 1. pre-evaluation state ``ys = y``; ``normalize="rms"`` divides each candidate by its RMS over the event
    dims (``"rms_all"``: one RMS over the whole [B, K, *event] tensor); ``noise="pre"`` adds
    ``n_k * xi``; ``project="softmax"`` replaces ``ys`` by ``softmax(ys)`` over the last dim; masked
    coordinates are reset to their given values.
 2. evaluation point ``q = ys + momentum * v`` with ``nesterov``, else ``q = ys``.
 3. ``E, g = energy and gradient at q``.
 4. a candidate whose ``E`` or ``g`` is not finite stops here for good: status NONFINITE, ``y`` keeps its
    value from before this step (always finite: the state whose evaluation failed).
 5. ``g`` is clipped elementwise to ``+-grad_clip``, then scaled by ``min(1, grad_clip_norm / ||g||)``.
 6. early exit (``tol > 0``): the criterion is ``||g|| <= tol`` (clipped g, L2 over the event dims) or
    ``|E - E_prev| <= tol`` (from step 1 on); with ``tol_scope="all"`` one value for the whole batch
    (``sqrt`` of the summed squares, or the largest change, over the running candidates).
    Default: a candidate meeting it stops before moving (status CONVERGED). ``tol_final_step``: it
    moves once more at the next step and stops after that move (EBT-Policy's loop).
 7. step size ``eta``: the schedule value at ``k``, or ``step_size * exp(E) / energy_temperature`` per
    candidate (``step_schedule="energy"``).
 8. ``d = -grad_scale * eta * g``; with momentum ``v' = momentum * v + d`` and ``d = v'``.
 9. noise after the gradient: ``langevin`` ``d += sqrt(2 * eta * n_k) * xi`` (n_k is the temperature);
    ``step`` ``d -= eta * n_k * xi`` (IBC: ``d = -eta * (grad_scale * g + n_k * xi)``);
    ``additive`` ``d += n_k * xi``.
10. ``d`` is clipped elementwise to ``+-step_clip``.
11. ``y' = ys + d``, clamped to ``[lower, upper]`` (when ``bound_each_step``), masked coordinates reset.
12. ``accept_if_lower``: ``y'`` is kept only where ``E(project(y')) < E`` (both finite, ``y'`` finite),
    else ``y' = ys`` and ``v' = v``. Without it, a candidate whose ``y'`` is not finite (an overflowing
    step) stops with status NONFINITE and keeps ``y``.
13. candidates still running take ``y = y'``, ``v = v'`` and count one step; with ``tol_final_step``
    those that met the criterion at the previous step stop now (CONVERGED).

Schedules (k = 0 .. steps-1, f = k / (steps - 1), 0 when steps = 1): constant ``v0``; polynomial
``(v0 - v1)(1 - f)^p + v1``; exponential ``v0 decay^k``; cosine ``v1 + (v0 - v1)(1 + cos(pi f)) / 2``;
ramp (noise only) ``v0 clip((k - a) / (b - a), 0, 1)`` with ``(a, b) = noise_ramp`` (a step at ``a``
when ``a == b``). ``n_k`` is the noise schedule's value.

``integrator="heun"`` (plain steps only: no momentum, transforms, accept or early exit) evaluates ``g0``
at ``y`` and ``g1`` at the Euler proposal ``y~`` (steps 5-11 with ``g0`` and noise ``s_k xi``, where
``s_k = sqrt(2 eta n_k)`` for langevin and ``n_k`` for additive noise), then repeats 8-11 from ``y`` with
the mean of the clipped gradients and the noise std ``(s_k + s_{k+1}) / 2``, the same ``xi``
(Heun's method on the Stratonovich form, as torchsde's ``heun``); a non-finite ``E``/``g`` at either point stops the
candidate.

After the loop: bounds (if not applied every step), masked values, then a final energy pass
``E_final = E(project(y))``. ``initial_energy`` is the ``E`` of step 0. Selection per context, ignoring
NONFINITE candidates and non-finite scores: ``min`` argmin ``E_final``; ``max`` argmax; ``max_gap``
argmax ``initial_energy - E_final``; ``sample`` a draw from ``softmax(-E_final / selection_temperature)``.
Status: MAX_STEPS (0) unless the candidate converged (1) or went non-finite (2); ``steps`` counts the
updates it made. ``y0`` is used as given (not clamped).

``method="dfo"`` (IBC's derivative-free optimiser), iteration ``k``: for ``k >= 1`` add
``n_{k-1} * xi`` and clamp to the box; evaluate ``E``; resample the K candidates of each context with
replacement from ``softmax(-E / resample_temperature)`` (inverse-CDF draws, sorted indices). Then a
final energy pass.

Random draws, in this order (so that implementations sharing a torch generator agree exactly): one
``randn`` of y's shape per step when ``noise != "none"`` (drawn whether or not a candidate runs); for DFO,
per iteration ``k >= 1`` one ``randn`` then one ``rand`` [B, K], and one ``rand`` [B, K] at ``k = 0``;
``selection="sample"`` one ``rand`` [B, 1] at the end.
"""
from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Callable, Optional

import torch

MAX_STEPS, CONVERGED, NONFINITE = 0, 1, 2


def schedule_value(kind: str, k: int, steps: int, start: float, end: float, power: float, decay: float,
                   ramp=(0.0, 1.0)) -> float:
    """Value of a schedule at step ``k`` of ``steps`` (start at k = 0, end at k = steps - 1)."""
    if kind == "constant":
        return float(start)
    if kind == "exponential":
        return float(start) * float(decay) ** k
    frac = 0.0 if steps <= 1 else min(k / (steps - 1), 1.0)
    if kind == "polynomial":
        return (start - end) * (1.0 - frac) ** power + end
    if kind == "cosine":
        return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * frac))
    if kind == "ramp":
        a, b = ramp
        if b > a:
            return float(start) * min(max((k - a) / (b - a), 0.0), 1.0)
        return float(start) if k >= a else 0.0
    raise ValueError(f"unknown schedule {kind!r}")


def _noise_level(cfg, k: int) -> float:
    return schedule_value(cfg.noise_schedule, k, cfg.steps, cfg.noise_scale, cfg.noise_scale_end,
                          cfg.noise_power, cfg.noise_decay, cfg.noise_ramp)


def _event_tensor(value, like: torch.Tensor) -> Optional[torch.Tensor]:
    """A scalar or per-dimension option as a tensor broadcastable to [B, K, *event]."""
    if value is None:
        return None
    return torch.as_tensor(value, dtype=like.dtype, device=like.device)


def _sample_index(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF categorical draws: probs [B, K] (rows sum > 0), u [B, M] in [0, 1) -> [B, M] indices."""
    cdf = torch.cumsum(probs, dim=1)
    idx = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)
    return idx.clamp(max=probs.shape[1] - 1)


def _select(cfg, E_final, E_init, status, generator):
    B, K = E_final.shape
    if cfg.selection == "min":
        score = -E_final
    elif cfg.selection == "max":
        score = E_final
    elif cfg.selection == "max_gap":
        score = E_init - E_final
    elif cfg.selection == "sample":
        score = -E_final / cfg.selection_temperature
    else:
        raise ValueError(f"unknown selection {cfg.selection!r}")
    bad = (status == NONFINITE) | ~torch.isfinite(score)
    score = score.masked_fill(bad, float("-inf"))
    if cfg.selection != "sample":
        return score.argmax(dim=1)
    all_bad = bad.all(dim=1, keepdim=True)
    score = torch.where(all_bad, torch.zeros_like(score), score)
    probs = torch.softmax(score, dim=1)
    u = torch.rand(B, 1, generator=generator, device=E_final.device, dtype=E_final.dtype)
    return _sample_index(probs, u)[:, 0]


def _evaluate(energy_fn: Callable, y: torch.Tensor, need_grad: bool):
    if not need_grad:
        with torch.no_grad():
            out = energy_fn(y)
        E = out[0] if isinstance(out, tuple) else out
        return E.detach(), None
    with torch.enable_grad():
        yy = y.detach().requires_grad_(True)
        out = energy_fn(yy)
        if isinstance(out, tuple):
            E, G = out
        else:
            E = out
            (G,) = torch.autograd.grad(E.sum(), yy)
    return E.detach(), G.detach()


def _project(cfg, y):
    return torch.softmax(y, dim=-1) if cfg.project == "softmax" else y


def _clip_grad(cfg, G, event_dims):
    if cfg.grad_clip is not None:
        G = G.clamp(-cfg.grad_clip, cfg.grad_clip)
    if cfg.grad_clip_norm is not None:
        norm = G.square().sum(dim=event_dims, keepdim=True).sqrt()
        G = G * (cfg.grad_clip_norm / norm).clamp(max=1.0)
    return G


def _result(y, E_final, E_init, steps, status, idx, traj_E, traj_y):
    B = y.shape[0]
    ar = torch.arange(B, device=y.device)
    return SimpleNamespace(best=y[ar, idx], best_energy=E_final[ar, idx], best_index=idx, y=y,
                           energy=E_final, initial_energy=E_init, steps=steps, status=status,
                           trajectory=traj_E, trajectory_y=traj_y)


def minimize_reference(energy_fn: Callable, y0: torch.Tensor, config, mask: Optional[torch.Tensor] = None,
                       generator: Optional[torch.Generator] = None, record: bool = False) -> SimpleNamespace:
    """Run ``config`` from ``y0`` [B, K, *event]; returns best, best_energy, best_index, y, energy,
    initial_energy, steps, status (and trajectory [steps + 1, B, K], trajectory_y [steps + 1, B, K, *event]
    when ``record``). ``mask`` (bool, broadcastable to y0) marks coordinates that keep y0's values."""
    cfg = config
    y0 = y0.detach()
    if cfg.method == "dfo":
        return _dfo_reference(energy_fn, y0, cfg, mask, generator, record)
    B, K = y0.shape[:2]
    event_dims = tuple(range(2, y0.dim()))
    fixed = y0.clone()
    mask = None if mask is None else mask.to(torch.bool).expand(y0.shape)
    lower, upper = _event_tensor(cfg.lower, y0), _event_tensor(cfg.upper, y0)
    step_clip = _event_tensor(cfg.step_clip, y0)
    mu = cfg.momentum
    eps = cfg.normalize_eps if cfg.normalize_eps is not None else torch.finfo(y0.dtype).eps

    def apply_mask(t):
        return t if mask is None else torch.where(mask, fixed, t)

    def bound(t):
        if lower is not None:
            t = torch.maximum(t, lower.expand_as(t))
        if upper is not None:
            t = torch.minimum(t, upper.expand_as(t))
        return t

    def post_move(ys, G, E, v, eta, xi, noise_std):
        """Steps 8-11: the proposal and new velocity from base ys, (clipped) gradient G and step size eta."""
        d = -cfg.grad_scale * eta * G
        v_new = v
        if mu > 0:
            v_new = mu * v + d
            d = v_new
        if xi is not None:
            if cfg.noise == "step":
                d = d - noise_std * xi
            else:
                d = d + noise_std * xi
        if step_clip is not None:
            d = torch.maximum(torch.minimum(d, step_clip), -step_clip)
        y_new = ys + d
        if cfg.bound_each_step:
            y_new = bound(y_new)
        return apply_mask(y_new), v_new

    def noise_std_at(k, eta):
        n = _noise_level(cfg, k)
        if cfg.noise == "langevin":
            return torch.sqrt(2.0 * eta * n) if torch.is_tensor(eta) else math.sqrt(2.0 * eta * n)
        if cfg.noise == "step":
            return eta * n
        return n

    y = y0.clone()
    v = torch.zeros_like(y)
    active = torch.ones(B, K, dtype=torch.bool, device=y.device)
    pending = torch.zeros_like(active)
    steps = torch.zeros(B, K, dtype=torch.int32, device=y.device)
    status = torch.zeros(B, K, dtype=torch.int8, device=y.device)
    E_prev = None
    E_init = None
    traj_E, traj_y = [], [y.clone()]
    bshape = (B, K) + (1,) * len(event_dims)

    for k in range(cfg.steps):
        running = active
        # 1. pre-evaluation transforms
        ys = y
        if cfg.normalize == "rms":
            ys = ys / torch.sqrt(ys.square().mean(dim=event_dims, keepdim=True) + eps)
        elif cfg.normalize == "rms_all":
            ys = ys / torch.sqrt(ys.square().mean() + eps)
        xi = None
        if cfg.noise != "none":
            xi = torch.randn(y.shape, generator=generator, device=y.device, dtype=y.dtype)
        if cfg.noise == "pre":
            ys = ys + _noise_level(cfg, k) * xi
            xi = None
        ys = apply_mask(_project(cfg, ys))
        # 2-3. evaluate
        q = ys + mu * v if cfg.nesterov else ys
        E, G = _evaluate(energy_fn, q, need_grad=True)
        if k == 0:
            E_init = E.clone()
        # 4. non-finite candidates stop
        finite = torch.isfinite(E) & torch.isfinite(G).flatten(2).all(dim=2)
        status = torch.where(active & ~finite, torch.full_like(status, NONFINITE), status)
        active = active & finite
        # 5. clip
        Gc = _clip_grad(cfg, G, event_dims)
        # 7. step size (needed by heun before the criterion is applied; the criterion does not use it)
        if cfg.step_schedule == "energy":
            eta = (cfg.step_size * (torch.exp(E) / cfg.energy_temperature)).reshape(bshape)
        else:
            eta = schedule_value(cfg.step_schedule, k, cfg.steps, cfg.step_size, cfg.step_size_end,
                                 cfg.step_power, cfg.step_decay)
        std = noise_std_at(k, eta) if xi is not None else None
        if cfg.integrator == "heun":
            y_pred, _ = post_move(ys, Gc, E, v, eta, xi, std)
            E1, G1 = _evaluate(energy_fn, y_pred, need_grad=True)
            finite1 = torch.isfinite(E1) & torch.isfinite(G1).flatten(2).all(dim=2)
            status = torch.where(active & ~finite1, torch.full_like(status, NONFINITE), status)
            active = active & finite1
            G1c = _clip_grad(cfg, G1, event_dims)
            G_step = 0.5 * (Gc + G1c)
            if xi is not None:
                std = 0.5 * (std + noise_std_at(k + 1, eta))
        else:
            G_step = Gc
        # 6. early exit
        stop_after = torch.zeros_like(active)
        if cfg.tol > 0:
            if cfg.tol_on == "grad_norm":
                metric = Gc.square().flatten(2).sum(dim=2)
                if cfg.tol_scope == "all":
                    metric = torch.where(active, metric, torch.zeros_like(metric)).sum().expand(B, K)
                crit = metric.sqrt() <= cfg.tol
            else:
                if E_prev is None:
                    crit = torch.zeros_like(active)
                else:
                    change = (E - E_prev).abs()
                    if cfg.tol_scope == "all":
                        change = torch.where(active, change, torch.zeros_like(change)).max().expand(B, K)
                    crit = change <= cfg.tol
            if cfg.tol_final_step:
                stop_after = active & pending
                pending = active & crit
            else:
                stop = active & crit
                status = torch.where(stop, torch.full_like(status, CONVERGED), status)
                active = active & ~stop
        # 8-11. move
        y_new, v_new = post_move(ys, G_step, E, v, eta, xi, std)
        # 12. accept if lower (a non-finite proposal or energy is never accepted) ...
        if cfg.accept_if_lower:
            E_new, _ = _evaluate(energy_fn, _project(cfg, y_new), need_grad=False)
            accept = (E_new < E) & torch.isfinite(E_new) & torch.isfinite(y_new).flatten(2).all(dim=2)
            accept = accept.reshape(bshape)
            y_new = torch.where(accept, y_new, ys)
            v_new = torch.where(accept, v_new, v)
        else:
            # ... otherwise a proposal that is not finite (an overflowing step) stops the candidate
            ok = torch.isfinite(y_new).flatten(2).all(dim=2)
            status = torch.where(active & ~ok, torch.full_like(status, NONFINITE), status)
            active = active & ok
        # 13. commit
        moving = active.reshape(bshape)
        y = torch.where(moving, y_new, y)
        v = torch.where(moving, v_new, v)
        steps = steps + active.to(torch.int32)
        stop_after = stop_after & active
        status = torch.where(stop_after, torch.full_like(status, CONVERGED), status)
        active = active & ~stop_after
        if record:
            # energy evaluated at this step for candidates running when it began, else carried forward
            traj_E.append(E if k == 0 else torch.where(running, E, traj_E[-1]))
            traj_y.append(y.clone())
        E_prev = E

    if lower is not None or upper is not None:
        if not cfg.bound_each_step:
            y = apply_mask(bound(y))
    E_final, _ = _evaluate(energy_fn, _project(cfg, y), need_grad=False)
    idx = _select(cfg, E_final, E_init, status, generator)
    traj_E_t = traj_y_t = None
    if record:
        traj_E_t = torch.stack(traj_E + [E_final])
        traj_y[-1] = y.clone()
        traj_y_t = torch.stack(traj_y)
    return _result(y, E_final, E_init, steps, status, idx, traj_E_t, traj_y_t)


def _dfo_reference(energy_fn, y0, cfg, mask, generator, record):
    B, K = y0.shape[:2]
    fixed = y0.clone()
    mask = None if mask is None else mask.to(torch.bool).expand(y0.shape)
    lower, upper = _event_tensor(cfg.lower, y0), _event_tensor(cfg.upper, y0)
    y = y0.clone()
    E_init = None
    traj_E, traj_y = [], [y.clone()]
    ar = torch.arange(B, device=y.device).unsqueeze(1)
    for k in range(cfg.steps):
        if k > 0 and cfg.noise != "none":
            xi = torch.randn(y.shape, generator=generator, device=y.device, dtype=y.dtype)
            y = y + _noise_level(cfg, k - 1) * xi
            if lower is not None:
                y = torch.maximum(y, lower.expand_as(y))
            if upper is not None:
                y = torch.minimum(y, upper.expand_as(y))
            if mask is not None:
                y = torch.where(mask, fixed, y)
        E, _ = _evaluate(energy_fn, y, need_grad=False)
        if k == 0:
            E_init = E.clone()
        logits = (-E / cfg.resample_temperature).masked_fill(~torch.isfinite(E), float("-inf"))
        logits = torch.where(torch.isfinite(logits).any(dim=1, keepdim=True), logits, torch.zeros_like(logits))
        probs = torch.softmax(logits, dim=1)
        u = torch.rand(B, K, generator=generator, device=y.device, dtype=y.dtype)
        idx = _sample_index(probs, u).sort(dim=1).values
        y = y[ar, idx]
        if mask is not None:
            fixed = fixed[ar, idx]
            mask = mask[ar, idx]
        if record:
            traj_E.append(E)
            traj_y.append(y.clone())
    E_final, _ = _evaluate(energy_fn, y, need_grad=False)
    steps = torch.full((B, K), cfg.steps, dtype=torch.int32, device=y.device)
    status = torch.where(torch.isfinite(E_final), torch.tensor(MAX_STEPS, dtype=torch.int8, device=y.device),
                         torch.tensor(NONFINITE, dtype=torch.int8, device=y.device))
    idx = _select(cfg, E_final, E_init, status, generator)
    traj_E_t = torch.stack(traj_E + [E_final]) if record else None
    traj_y_t = torch.stack(traj_y) if record else None
    return _result(y, E_final, E_init, steps, status, idx, traj_E_t, traj_y_t)
