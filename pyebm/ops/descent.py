"""The per-step descent update: everything one step does after the energy and its gradient are known.

``descent_update`` is the function that fused C++/Triton update kernels replace. It works on rows: the
B*K candidates flattened to ``N`` rows of ``D = prod(event)`` values, so every tensor argument below is
[N, D] (per coordinate), [N] (per candidate) or [D] / scalar (per event coordinate, shared by all rows).
The math is ``pyebm.reference.descent`` (steps 4-13 of its docstring); the same order of operations,
row by row:

    finite  = isfinite(E) & all(isfinite(g)) [& finite_also]
    status  = NONFINITE where active & ~finite;  active &= finite
    g       = clamp(g, -grad_clip, grad_clip);  g *= min(1, grad_clip_norm / ||g||)
    crit    = ||g|| <= tol  |  |E - E_prev| <= tol     (tol > 0; one value for all rows if tol_scope="all")
              default: status = CONVERGED and active = False where active & crit (no move this step)
              tol_final_step: stop_after = active & pending;  pending = active & crit
    eta_r   = eta                                  or  eta * (exp(E) / energy_temperature)  (energy_scaled)
    d       = (-grad_scale * eta_r) * g
    v'      = momentum * v + d;  d = v'            (momentum > 0)
    d      += sqrt(2 * eta_r * n) * xi             (noise_mode "langevin"; n = noise_level)
    d      -= (eta_r * n) * xi                     ("step": IBC, d = -eta * (grad_scale * g + n * xi))
    d      += n * xi                               ("additive")
    d       = clamp(d, -step_clip, step_clip)
    y'      = clamp(y_base + d, lower, upper)      (bounds only when bound_each_step)
    y'      = where(mask, fixed, y')
    ok      = all(isfinite(y'));  status = NONFINITE and active = False where active & ~ok   (not with out=)
    y, v    = where(active, (y', v'), (y, v));  steps += active
    status  = CONVERGED and active = False where stop_after & active

``y_base`` is the state the step starts from (the pre-evaluation transforms of ``descent_pre`` may have
moved it away from the committed ``y``, which rows that do not move keep). Rows that stop keep ``y``
and ``v`` bit for bit. ``xi`` is drawn by the caller for all rows (so that stopped rows do not change
the stream). No host synchronisation happens here: every decision is a device-side mask.

Two variants: with ``out=`` the proposal ``y'`` (and ``v'`` into ``velocity_out``) is written for every
row and ``y``/``velocity`` are left alone, for ``accept_if_lower`` (the caller evaluates the proposal
and commits with ``descent_accept``); ``dry_run=True`` writes only the proposal and touches no
bookkeeping (the predictor of the Heun integrator).
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor

from pyebm import _dispatch
from pyebm.config import CONVERGED, MAX_STEPS, NONFINITE, NOISE_MODES  # noqa: F401

_POST_NOISE = ("langevin", "step", "additive")

Scalar = Union[float, Tensor]


def finite_rows(t: Tensor, E: Optional[Tensor] = None) -> Tensor:
    """[N] bool: row of t [N, D] (and E [N]) all finite. x - x is +0 exactly for finite x and NaN for
    inf/NaN, and a sum of zeros stays zero; cheaper than isfinite (a composite op on CPU) and exact."""
    z = torch.sub(t, t).sum(dim=1)
    if E is not None:
        z.add_(torch.sub(E, E))
    return z == 0


def clip_grad_(g: Tensor, grad_clip: Optional[float], grad_clip_norm: Optional[float]) -> Tensor:
    """In place: clamp g [N, D] to +-grad_clip, then scale each row to L2 norm <= grad_clip_norm."""
    if grad_clip is not None:
        g.clamp_(-grad_clip, grad_clip)
    if grad_clip_norm is not None:
        # c / 0 = inf -> clamped to 1: a zero gradient stays zero.
        scale = torch.sum(g * g, dim=1, keepdim=True).sqrt_()
        scale = torch.div(grad_clip_norm, scale).clamp_(max=1.0)
        g.mul_(scale)
    return g


def _vec(v, y: Tensor):
    """A bound or step clip as the fused op takes it: None, a tensor as given, or a number as [D]."""
    if v is None or isinstance(v, Tensor):
        return v
    return torch.full((y.shape[1],), float(v), dtype=y.dtype, device=y.device)


def _fused_state(y, active, steps, status, velocity, pending, noise, noise_mode, fixed, mask, lower, upper,
                 step_clip, momentum, tol_final_step) -> tuple:
    """The fused op's arguments from ``active`` to ``step_clip`` (the state it reads and writes)."""
    return (active, steps, status, velocity if momentum > 0 else None, pending if tol_final_step else None,
            noise if noise_mode != "none" else None, mask, fixed if mask is not None else None, _vec(lower, y),
            _vec(upper, y), _vec(step_clip, y))


def _fused_options(noise_mode, grad_scale, momentum, grad_clip, grad_clip_norm, energy_scaled, energy_temperature,
                   tol, tol_final_step, bound_each_step) -> tuple:
    """The fused op's arguments from ``noise_mode`` to ``bound_each_step`` (the rule's options)."""
    return (noise_mode, float(grad_scale), float(momentum), None if grad_clip is None else float(grad_clip),
            None if grad_clip_norm is None else float(grad_clip_norm), bool(energy_scaled), float(energy_temperature),
            float(tol), bool(tol_final_step), bool(bound_each_step))


def _fused_op(kind: str):
    return torch.ops.pyebm.descent_update_triton.default if kind == "triton" else torch.ops.pyebm.descent_update.default


def _fused_update(kind, y, g, E, active, steps, status, velocity, pending, noise, noise_mode, noise_level, fixed,
                  mask, lower, upper, step_clip, eta, grad_scale, momentum, grad_clip, grad_clip_norm, energy_scaled,
                  energy_temperature, tol, tol_final_step, bound_each_step, y_base) -> Tensor:
    moved_before = steps.clone()
    E = E if E.is_contiguous() else E.contiguous()
    if noise is not None and not noise.is_contiguous():
        noise = noise.contiguous()
    state = _fused_state(y, active, steps, status, velocity, pending, noise, noise_mode, fixed, mask, lower, upper,
                         step_clip, momentum, tol_final_step)
    options = _fused_options(noise_mode, grad_scale, momentum, grad_clip, grad_clip_norm, energy_scaled,
                             energy_temperature, tol, tol_final_step, bound_each_step)
    _fused_op(kind)(y, g, E, *state, float(eta), float(noise_level), *options, y_base)
    return steps != moved_before


class FusedUpdate:
    """The fused update op bound to the state of one descent: ``descent_update``'s common form (the step that
    ``pyebm._dispatch.update_route`` gives to a fused op; ``kind`` is its answer, asked once by the caller) for a
    loop that calls it every step. What ``descent_update`` does on every call is done once here: the bounds and
    step clip as [D] tensors, the options as the op's argument types, the check that the state is contiguous. A call
    ``update(g, E, eta, noise_level, y_base=None)`` is then one op call on this step's gradient g [N, D]
    (scratch; a strided one is copied), energy E [N], step size, noise level and base [N, D]; the op itself
    checks every tensor against the others at every call, as always. ``noise`` is a buffer the caller refills
    before each call. Returns nothing (``descent_update`` returns the rows that moved)."""

    __slots__ = ("_op", "_y", "_state", "_options")

    def __init__(self, kind: str, y: Tensor, active: Tensor, steps: Tensor, status: Tensor, *,
                 velocity: Optional[Tensor] = None, pending: Optional[Tensor] = None,
                 noise: Optional[Tensor] = None, noise_mode: str = "none", fixed: Optional[Tensor] = None,
                 mask: Optional[Tensor] = None, lower: Optional[Scalar] = None, upper: Optional[Scalar] = None,
                 step_clip: Optional[Scalar] = None, grad_scale: float = 1.0, momentum: float = 0.0,
                 grad_clip: Optional[float] = None, grad_clip_norm: Optional[float] = None,
                 energy_scaled: bool = False, energy_temperature: float = 1.0, tol: float = 0.0,
                 tol_final_step: bool = False, bound_each_step: bool = True):
        if kind not in ("cpu", "cuda", "triton"):
            raise ValueError(f"FusedUpdate: kind must be 'cpu', 'cuda' or 'triton' (update_route's answer); "
                             f"got {kind!r}")
        for name, t in (("y", y), ("velocity", velocity), ("noise", noise), ("fixed", fixed), ("mask", mask)):
            if t is not None and not t.is_contiguous():
                raise ValueError(f"FusedUpdate: {name} must be contiguous (the op reads it in place at every call)")
        self._op = _fused_op(kind)
        self._y = y
        self._state = _fused_state(y, active, steps, status, velocity, pending, noise, noise_mode, fixed, mask, lower,
                                   upper, step_clip, momentum, tol_final_step)
        self._options = _fused_options(noise_mode, grad_scale, momentum, grad_clip, grad_clip_norm, energy_scaled,
                                       energy_temperature, tol, tol_final_step, bound_each_step)

    def __call__(self, g: Tensor, E: Tensor, eta: float, noise_level: float, y_base: Optional[Tensor] = None) -> None:
        if not g.is_contiguous():
            g = g.contiguous()
        if not E.is_contiguous():
            E = E.contiguous()
        if y_base is not None and not y_base.is_contiguous():
            y_base = y_base.contiguous()
        self._op(self._y, g, E, *self._state, float(eta), float(noise_level), *self._options, y_base)


def descent_pre(y: Tensor, *, normalize: Optional[str] = None, normalize_eps: Optional[float] = None,
                noise: Optional[Tensor] = None, noise_level: float = 0.0, project: Optional[str] = None,
                fixed: Optional[Tensor] = None, mask: Optional[Tensor] = None) -> Tensor:
    """Pre-evaluation transforms on y [B, K, *event] (step 1 of the reference); returns y itself when
    there is nothing to do, else a new tensor ``ys``:

        ys = y / sqrt(mean_event(y^2) + eps)   (normalize "rms"; "rms_all": mean over the whole tensor)
        ys = ys + noise_level * xi             (noise given: noise mode "pre")
        ys = softmax(ys, dim=-1)               (project "softmax")
        ys = where(mask, fixed, ys)
    """
    if normalize is None and noise is None and project is None:
        return y
    ys = y
    if normalize is not None:
        eps = normalize_eps if normalize_eps is not None else torch.finfo(y.dtype).eps
        if normalize == "rms":
            ms = y.square().flatten(2).mean(dim=2).reshape(y.shape[:2] + (1,) * (y.dim() - 2))
        elif normalize == "rms_all":
            ms = y.square().mean()
        else:
            raise ValueError(f"normalize must be None, 'rms' or 'rms_all'; got {normalize!r}")
        ys = y / (ms + eps).sqrt_()
    if noise is not None:
        # add(out=) rather than add_: torch 2.11's functionalization splits a traced add_ with alpha into a product
        # and a sum (two roundings, unlike the eager kernel), not add. Into ys itself when it is a temporary.
        ys = torch.add(ys, noise, alpha=noise_level, out=None if ys is y else ys)
    if project == "softmax":
        ys = torch.softmax(ys, dim=-1)
    elif project is not None:
        raise ValueError(f"project must be None or 'softmax'; got {project!r}")
    if mask is not None:
        ys = torch.where(mask, fixed, ys)
    return ys


def descent_update(
    y: Tensor,
    g: Tensor,
    E: Tensor,
    active: Tensor,
    steps: Tensor,
    status: Tensor,
    *,
    eta: float,
    y_base: Optional[Tensor] = None,
    velocity: Optional[Tensor] = None,
    pending: Optional[Tensor] = None,
    E_prev: Optional[Tensor] = None,
    noise: Optional[Tensor] = None,
    noise_mode: str = "none",
    noise_level: float = 0.0,
    fixed: Optional[Tensor] = None,
    mask: Optional[Tensor] = None,
    lower: Optional[Scalar] = None,
    upper: Optional[Scalar] = None,
    step_clip: Optional[Scalar] = None,
    finite_also: Optional[Tensor] = None,
    grad_scale: float = 1.0,
    momentum: float = 0.0,
    grad_clip: Optional[float] = None,
    grad_clip_norm: Optional[float] = None,
    energy_scaled: bool = False,
    energy_temperature: float = 1.0,
    tol: float = 0.0,
    tol_on: str = "grad_norm",
    tol_scope: str = "candidate",
    tol_final_step: bool = False,
    bound_each_step: bool = True,
    out: Optional[Tensor] = None,
    velocity_out: Optional[Tensor] = None,
    dry_run: bool = False,
    backend: Optional[str] = None,
) -> Optional[Tensor]:
    """One descent update for N rows (torch implementation). Returns ``move`` [N] bool (rows updated).

    Tensors (all on one device, y's dtype unless noted):
        y [N, D]         committed state; written in place for moving rows (unless ``out``/``dry_run``)
        g [N, D]         dE/dy at the evaluation point; used as scratch (overwritten)
        E [N]            energy at the evaluation point
        active [N]       bool, rows still running; updated in place
        steps [N]        int32 steps taken; updated in place
        status [N]       int8 (0 max steps / 1 converged / 2 non-finite); updated in place
        y_base [N, D]    state the step starts from (default y)
        velocity [N, D]  momentum buffer (momentum > 0); updated in place for moving rows
        pending [N]      bool, tol_final_step bookkeeping; updated in place
        E_prev [N]       previous evaluation energy (tol_on "energy_change"; None at the first step)
        noise [N, D]     standard normal draws for a post-gradient noise mode (None: no noise)
        fixed, mask      [N, D] clamped values and bool mask of clamped coordinates
        lower, upper     float or [D] box bounds; step_clip float or [D] (> 0)
        finite_also [N]  bool, extra finiteness of the row (the second evaluation of Heun)
    Scalars: eta is the step size of this step (the schedule value; the base size when energy_scaled),
    noise_level the noise level n of this step. The rest are the options of ``pyebm.Descent``.

    Unless ``backend`` is "torch", the common form of the step (no ``out``/``dry_run``/``finite_also``, early
    exit on the gradient norm per candidate, or over the batch when there is one row) runs as one fused pass
    over every row: the C++ op ``torch.ops.pyebm.descent_update`` on the cpu and cuda backends
    (float32/float64; a ``y_base`` on the cpu only), the Triton op ``torch.ops.pyebm.descent_update_triton``
    on the triton backend (float32/bfloat16/float16). ``pyebm._dispatch.update_route`` decides.
    """
    kind = _dispatch.update_route(y, g, y_base, noise_mode, tol, tol_on, tol_scope, out, dry_run, finite_also,
                                  velocity, mask, backend)[0]
    if kind is not None:
        return _fused_update(kind, y, g, E, active, steps, status, velocity, pending, noise, noise_mode, noise_level,
                             fixed, mask, lower, upper, step_clip, eta, grad_scale, momentum, grad_clip,
                             grad_clip_norm, energy_scaled, energy_temperature, tol, tol_final_step,
                             bound_each_step, y_base)
    base = y if y_base is None else y_base
    if dry_run:
        move, stop_after, d = None, None, g.clone()
    else:
        move, stop_after = _stop_rows(g, E, active, status, pending, E_prev, finite_also, grad_clip, grad_clip_norm,
                                      tol, tol_on, tol_scope, tol_final_step)
        d = g
    d, v_new, eta_r = _direction(d, E, velocity, velocity_out, eta, grad_scale, momentum, energy_scaled,
                                 energy_temperature)
    if noise is not None:
        _add_noise(d, noise, noise_mode, noise_level, eta, eta_r, energy_scaled)
    y_new = _propose(d, base, step_clip, lower, upper, bound_each_step, fixed, mask)
    if dry_run:
        out.copy_(y_new)
        return None
    if out is not None:
        # accept_if_lower: descent_accept commits (and never takes a non-finite proposal)
        out.copy_(y_new)
    else:
        _commit(y, y_new, velocity, v_new, move, active, status)
    steps += move
    if stop_after is not None:
        stop_after &= active
        status.masked_fill_(stop_after, CONVERGED)
        active &= ~stop_after
    return move


def _stop_rows(g, E, active, status, pending, E_prev, finite_also, grad_clip, grad_clip_norm, tol, tol_on,
               tol_scope, tol_final_step):
    """Which rows take this step: non-finite rows stop (NONFINITE), g is clipped in place, rows whose
    criterion holds stop (CONVERGED) now or, with tol_final_step, after this step. Returns (move, stop_after):
    move [N] the rows that move; stop_after [N] or None, the rows that stop once this step is taken."""
    finite = finite_rows(g, E)
    if finite_also is not None:
        finite &= finite_also
    status.masked_fill_(active & ~finite, NONFINITE)
    active &= finite
    clip_grad_(g, grad_clip, grad_clip_norm)
    stop_after = None
    if tol > 0:
        crit = _criterion(g, E, active, E_prev, tol, tol_on, tol_scope)
        if tol_final_step:
            stop_after = active & pending
            torch.logical_and(active, crit, out=pending)
        else:
            stop = active & crit
            status.masked_fill_(stop, CONVERGED)
            active &= ~stop
    return active.clone(), stop_after


def _criterion(g, E, active, E_prev, tol, tol_on, tol_scope) -> Tensor:
    """[N] bool: the early-exit criterion holds (the gradient norm or the energy change is <= tol; over all
    running rows together when tol_scope is "all")."""
    if tol_on == "grad_norm":
        metric = torch.sum(g * g, dim=1)
        if tol_scope == "all":
            metric = torch.where(active, metric, 0.0).sum().expand_as(metric)
        return metric.sqrt() <= tol
    if E_prev is None:
        return torch.zeros_like(active)
    change = (E - E_prev).abs_()
    if tol_scope == "all":
        change = torch.where(active, change, 0.0).max().expand_as(change)
    return change <= tol


def _direction(d, E, velocity, velocity_out, eta, grad_scale, momentum, energy_scaled, energy_temperature):
    """The gradient step, in place on d = g: d = -grad_scale * eta_r * g, then the momentum update
    v' = momentum * v + d (into velocity_out when given). Returns (d, v' or None, eta_r)."""
    if energy_scaled:
        eta_r = torch.exp(E).div_(energy_temperature).mul_(eta)       # [N]
        d.mul_((eta_r * -grad_scale).unsqueeze(1))
    else:
        eta_r = eta
        d.mul_(-grad_scale * eta)
    v_new = None
    if momentum > 0:
        if velocity_out is None:
            v_new = torch.add(d, velocity, alpha=momentum)
        else:
            v_new = torch.add(d, velocity, alpha=momentum, out=velocity_out)
        d = v_new.clone()  # d picks up noise, clipping and the base in place; v' must not
    return d, v_new, eta_r


def noise_std(mode: str, eta: float, n: float) -> float:
    """The factor of the standard normal draws in the post-gradient noise term of ``mode``, for a scalar step
    size eta and noise level n (Heun's two noise terms; the compiled path's noise scaled per step)."""
    if mode == "langevin":
        return math.sqrt(2.0 * eta * n)
    if mode == "additive":
        return n
    if mode == "step":
        return -(eta * n)
    return 0.0


def _add_noise(d, noise, noise_mode, noise_level, eta, eta_r, energy_scaled) -> None:
    """The post-gradient noise of ``noise_mode``, added to d in place."""
    if noise_mode == "langevin":
        if energy_scaled:
            d.addcmul_(noise, (eta_r * (2.0 * noise_level)).sqrt_().unsqueeze(1))
        else:
            torch.add(d, noise, alpha=math.sqrt(2.0 * eta * noise_level), out=d)  # see descent_pre
    elif noise_mode == "step":
        if energy_scaled:
            d.addcmul_(noise, (eta_r * noise_level).unsqueeze(1), value=-1.0)
        else:
            torch.add(d, noise, alpha=-(eta * noise_level), out=d)
    elif noise_mode == "additive":
        torch.add(d, noise, alpha=noise_level, out=d)
    else:
        raise ValueError(f"noise_mode for descent_update must be one of {_POST_NOISE}; got {noise_mode!r}")


def _propose(d, base, step_clip, lower, upper, bound_each_step, fixed, mask) -> Tensor:
    """The proposal y' = clamp(base + clamp(d, +-step_clip), lower, upper), clamped coordinates fixed;
    built in place in d."""
    if step_clip is not None:
        if isinstance(step_clip, Tensor):
            torch.minimum(d, step_clip, out=d)
            torch.maximum(d, -step_clip, out=d)
        else:
            d.clamp_(-step_clip, step_clip)
    y_new = d.add_(base)
    if bound_each_step and (lower is not None or upper is not None):
        y_new.clamp_(lower, upper)
    if mask is not None:
        torch.where(mask, fixed, y_new, out=y_new)
    return y_new


def _commit(y, y_new, velocity, v_new, move, active, status) -> None:
    """Moving rows take y' (and v'). A proposal that overflowed (a huge energy-scaled step, say) is not
    taken: the row stops with its last finite value (NONFINITE)."""
    ok = finite_rows(y_new)
    status.masked_fill_(move & ~ok, NONFINITE)
    move &= ok
    active &= ok
    m = move.unsqueeze(1)
    torch.where(m, y_new, y, out=y)
    if v_new is not None:
        torch.where(m, v_new, velocity, out=velocity)


def descent_accept(y: Tensor, y_prop: Tensor, E: Tensor, E_prop: Tensor, move: Tensor, *,
                   y_base: Optional[Tensor] = None, velocity: Optional[Tensor] = None,
                   velocity_prop: Optional[Tensor] = None) -> Tensor:
    """Commit of ``accept_if_lower`` after ``descent_update(..., out=y_prop)``: moving rows take the
    proposal where ``E_prop < E`` and ``y_base`` (the step's starting state) elsewhere; velocity takes the
    proposal only where accepted. A proposal is accepted only where it and its energy are finite.
    Returns the accepted mask [N]."""
    accept = move & (E_prop < E) & finite_rows(y_prop, E_prop)
    base = y if y_base is None else y_base
    new = torch.where(accept.unsqueeze(1), y_prop, base)
    torch.where(move.unsqueeze(1), new, y, out=y)
    if velocity is not None and velocity_prop is not None:
        torch.where(accept.unsqueeze(1), velocity_prop, velocity, out=velocity)
    return accept
