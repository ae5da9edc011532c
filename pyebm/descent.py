"""Batched multi-candidate descent: ``pyebm.Descent`` (the update rule), ``pyebm.minimize`` (the engine).

    cfg = pyebm.Descent.ibc_langevin(lower=-1.0, upper=1.0, steps=50)
    res = pyebm.minimize(energy, x, candidates=256, config=cfg, generator=torch.Generator().manual_seed(0))
    res.best [B, *event], res.best_energy [B], res.y [B, K, *event], res.energy [B, K], res.steps [B, K]

The update rule, step by step, is written out in ``pyebm.reference.descent`` (the plain loop the tests
compare against) and, for the fused part, in ``pyebm.ops.descent.descent_update``.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, replace
from typing import Dict, Any, Optional, Sequence, Tuple, Union

import torch

from pyebm import _backend
from torch import Tensor, nn

from pyebm.energy import MLPEnergy
from pyebm.ops import descent as _ops
from pyebm.ops import mlp_descent as _mlp_descent

MAX_STEPS, CONVERGED, NONFINITE = _ops.MAX_STEPS, _ops.CONVERGED, _ops.NONFINITE
STATUS_NAMES = {MAX_STEPS: "max_steps", CONVERGED: "converged", NONFINITE: "nonfinite"}

METHODS = ("gd", "dfo")
STEP_SCHEDULES = ("constant", "polynomial", "exponential", "cosine", "energy")
NOISE_SCHEDULES = ("constant", "polynomial", "exponential", "cosine", "ramp")
NOISE_MODES = _ops.NOISE_MODES
NORMALIZE = (None, "rms", "rms_all")
PROJECT = (None, "softmax")
TOL_ON = ("grad_norm", "energy_change")
TOL_SCOPE = ("candidate", "all")
SELECTIONS = ("min", "max", "max_gap", "sample")
INITS = ("normal", "uniform", "zeros")
INTEGRATORS = ("euler", "heun")

EventValue = Union[None, float, Tuple]


def _freeze_event_value(name: str, value) -> EventValue:
    """A scalar or per-dimension option (bounds, step clip) as a float or nested tuple of floats."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise TypeError(f"Descent: {name} must be a number or a tensor of numbers; got {value!r}")
    if isinstance(value, numbers.Real):
        v = float(value)
        if math.isnan(v):
            raise ValueError(f"Descent: {name} must not be NaN")
        return v
    try:
        t = torch.as_tensor(value, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"Descent: {name} must be a number or a tensor of numbers; got {type(value).__name__}") \
            from None
    if t.dim() == 0:
        return _freeze_event_value(name, float(t))
    if torch.isnan(t).any():
        raise ValueError(f"Descent: {name} must not contain NaN")

    def tup(x):
        return tuple(tup(e) for e in x) if isinstance(x, list) else float(x)

    return tup(t.tolist())


def _as_tensor(value: EventValue) -> Optional[Tensor]:
    return None if value is None else torch.as_tensor(value, dtype=torch.float64)


@dataclass(frozen=True)
class Descent:
    """Every option of the descent update rule. Frozen; ``dataclasses.replace(cfg, steps=20)`` edits.

    Order of operations: see ``pyebm.reference.descent``. Options:

    method            "gd" (gradient steps) or "dfo" (IBC's derivative-free optimiser).
    steps             number of steps (iterations for DFO), >= 1.
    step_size         eta_0 > 0. With step_schedule "energy" the base alpha of alpha * exp(E) / T.
    step_schedule     "constant" | "polynomial" ((eta_0 - eta_end)(1 - k/(steps-1))^power + eta_end) |
                      "exponential" (eta_0 * decay^k) |
                      "cosine" (eta_end + (eta_0 - eta_end)(1 + cos(pi k/(steps-1)))/2)
                      | "energy" (per candidate eta = step_size * exp(E) / energy_temperature, EBT-Policy).
    step_size_end, step_power, step_decay, energy_temperature   parameters of those schedules.
    grad_scale        coefficient of the gradient: d = -grad_scale * eta * g (IBC uses 0.5).
    noise             "none" | "langevin" (+ sqrt(2 eta n_k) xi after the gradient; n_k is the temperature)
                      | "step" (IBC: d = -eta (grad_scale g + n_k xi)) | "additive" (+ n_k xi) |
                      "pre" (EBT: y + n_k xi before the gradient is evaluated).
    noise_scale       n_0 >= 0: temperature (langevin) or standard deviation (others); DFO's sigma_0.
    noise_schedule    schedule of n_k: "constant" | "polynomial" | "exponential" | "cosine" (as above, with
                      noise_scale_end, noise_power, noise_decay) | "ramp" (n_0 * clip((k - a)/(b - a), 0, 1)
                      with (a, b) = noise_ramp in steps; a step at a when a == b: Energy Matching's eps(t)).
    momentum          mu in [0, 1): v = mu v + d, y += v.   nesterov: gradient at y + mu v.
    grad_clip         clamp g elementwise to +-grad_clip.   grad_clip_norm: scale g to L2 norm <= it.
    step_clip         clamp the update d elementwise (float or per-dimension tensor).
    lower, upper      box bounds (float or per-dimension tensor broadcastable to the event shape).
    bound_each_step   clamp after every step (default) or once at the end (Energy Matching).
    normalize         None | "rms" (each candidate divided by its RMS before each step) | "rms_all" (one RMS
                      over the whole batch, EBT-Policy's coupled form).   normalize_eps: default dtype eps.
    project           None | "softmax": the state is replaced by softmax(state) before each evaluation (EBT
                      over logits: the energy sees probabilities, y = p - alpha dE/dp).
    accept_if_lower   keep a step only where the proposal's energy is lower (costs one energy pass).
    tol               early exit per candidate when ||g|| (tol_on "grad_norm") or |E_k - E_{k-1}|
                      ("energy_change") is <= tol; 0 disables. tol_scope "all": one batch-wide value.
    tol_final_step    after meeting the criterion take one more step, then stop (EBT-Policy).
    check_every       the host checks "all candidates stopped" every this many steps (0: never).
                      Only with tol > 0; a fixed step count never synchronises.
    selection         "min" energy | "max" energy | "max_gap" (largest initial - final energy, EBT) |
                      "sample" from softmax(-E / selection_temperature) (IBC).
    init              "normal" (init_scale * N(0, I)) | "uniform" (within the bounds) | "zeros", when
                      minimize gets no init tensor.
    integrator        "euler" | "heun" (two evaluations per step; Energy Matching's Euler-Heun sampler).
    resample_temperature   DFO: resample from softmax(-E / T).
    """

    method: str = "gd"
    steps: int = 10
    step_size: float = 0.1
    step_schedule: str = "constant"
    step_size_end: float = 0.0
    step_power: float = 1.0
    step_decay: float = 0.8
    energy_temperature: float = 1.0
    grad_scale: float = 1.0
    noise: str = "none"
    noise_scale: float = 1.0
    noise_schedule: str = "constant"
    noise_scale_end: float = 0.0
    noise_power: float = 1.0
    noise_decay: float = 0.5
    noise_ramp: Tuple[float, float] = (0.0, 1.0)
    momentum: float = 0.0
    nesterov: bool = False
    grad_clip: Optional[float] = None
    grad_clip_norm: Optional[float] = None
    step_clip: EventValue = None
    lower: EventValue = None
    upper: EventValue = None
    bound_each_step: bool = True
    normalize: Optional[str] = None
    normalize_eps: Optional[float] = None
    project: Optional[str] = None
    accept_if_lower: bool = False
    tol: float = 0.0
    tol_on: str = "grad_norm"
    tol_scope: str = "candidate"
    tol_final_step: bool = False
    check_every: int = 4
    selection: str = "min"
    selection_temperature: float = 1.0
    init: str = "normal"
    init_scale: float = 1.0
    integrator: str = "euler"
    resample_temperature: float = 1.0

    # -- validation ---------------------------------------------------------------------------
    def __post_init__(self):
        def err(name, expected):
            raise ValueError(f"Descent: {name} must be {expected}; got {getattr(self, name)!r}")

        def choice(name, options):
            if getattr(self, name) not in options:
                err(name, "one of " + ", ".join(repr(o) for o in options))

        def real(name, lo=None, lo_open=False, hi=None, hi_open=False, optional=False):
            v = getattr(self, name)
            if v is None and optional:
                return
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)):
                raise TypeError(f"Descent: {name} must be a finite number; got {v!r}")
            v = float(v)
            bad = (lo is not None and (v <= lo if lo_open else v < lo)) or \
                  (hi is not None and (v >= hi if hi_open else v > hi))
            if bad:
                lo_s = "" if lo is None else (f"> {lo}" if lo_open else f">= {lo}")
                hi_s = "" if hi is None else (f"< {hi}" if hi_open else f"<= {hi}")
                err(name, "a number " + " and ".join(s for s in (lo_s, hi_s) if s))
            object.__setattr__(self, name, v)

        def flag(name):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"Descent: {name} must be True or False; got {getattr(self, name)!r}")

        def integer(name, lo):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < lo:
                err(name, f"an int >= {lo}")
            object.__setattr__(self, name, int(v))

        choice("method", METHODS)
        integer("steps", 1)
        real("step_size", 0.0, lo_open=True)
        choice("step_schedule", STEP_SCHEDULES)
        real("step_size_end", 0.0)
        real("step_power", 0.0, lo_open=True)
        real("step_decay", 0.0, lo_open=True)
        real("energy_temperature", 0.0, lo_open=True)
        real("grad_scale", 0.0, lo_open=True)
        choice("noise", NOISE_MODES)
        real("noise_scale", 0.0)
        choice("noise_schedule", NOISE_SCHEDULES)
        real("noise_scale_end", 0.0)
        real("noise_power", 0.0, lo_open=True)
        real("noise_decay", 0.0, lo_open=True)
        ramp = self.noise_ramp
        if not (isinstance(ramp, (tuple, list)) and len(ramp) == 2
                and all(isinstance(r, numbers.Real) and not isinstance(r, bool) and math.isfinite(r) for r in ramp)
                and ramp[0] <= ramp[1]):
            err("noise_ramp", "a pair (start, end) of finite step positions with start <= end")
        object.__setattr__(self, "noise_ramp", (float(ramp[0]), float(ramp[1])))
        real("momentum", 0.0, hi=1.0, hi_open=True)
        flag("nesterov")
        if self.nesterov and self.momentum == 0:
            raise ValueError("Descent: nesterov=True needs momentum > 0; got momentum=0")
        real("grad_clip", 0.0, lo_open=True, optional=True)
        real("grad_clip_norm", 0.0, lo_open=True, optional=True)
        for name in ("step_clip", "lower", "upper"):
            object.__setattr__(self, name, _freeze_event_value(name, getattr(self, name)))
        if self.step_clip is not None and not bool((_as_tensor(self.step_clip) > 0).all()):
            err("step_clip", "> 0 (every element)")
        if self.lower is not None and self.upper is not None:
            lo, hi = _as_tensor(self.lower), _as_tensor(self.upper)
            try:
                ok = bool((lo <= hi).all())
            except RuntimeError:
                raise ValueError(f"Descent: lower {tuple(lo.shape)} and upper {tuple(hi.shape)} must have "
                                 "broadcastable shapes") from None
            if not ok:
                raise ValueError(f"Descent: lower must be <= upper everywhere; got lower={self.lower!r}, "
                                 f"upper={self.upper!r}")
        flag("bound_each_step")
        choice("normalize", NORMALIZE)
        real("normalize_eps", 0.0, lo_open=True, optional=True)
        choice("project", PROJECT)
        flag("accept_if_lower")
        real("tol", 0.0)
        choice("tol_on", TOL_ON)
        choice("tol_scope", TOL_SCOPE)
        flag("tol_final_step")
        integer("check_every", 0)
        choice("selection", SELECTIONS)
        real("selection_temperature", 0.0, lo_open=True)
        choice("init", INITS)
        real("init_scale", 0.0, lo_open=True)
        choice("integrator", INTEGRATORS)
        real("resample_temperature", 0.0, lo_open=True)

        if self.init == "uniform" and not self._finite_box():
            raise ValueError("Descent: init='uniform' needs finite lower and upper bounds; got "
                             f"lower={self.lower!r}, upper={self.upper!r}")
        if self.accept_if_lower and self.nesterov:
            raise ValueError("Descent: accept_if_lower cannot be combined with nesterov (the energy is taken "
                             "at the look-ahead point, not at the state the step starts from)")
        if self.integrator == "heun":
            bad = [n for n, on in (("momentum", self.momentum > 0), ("accept_if_lower", self.accept_if_lower),
                                   ("normalize", self.normalize is not None), ("project", self.project is not None),
                                   ("tol", self.tol > 0), ("step_schedule='energy'", self.step_schedule == "energy"),
                                   ("noise='pre'/'step'", self.noise in ("pre", "step"))) if on]
            if bad:
                raise ValueError(f"Descent: integrator='heun' supports plain (optionally noisy, clipped, bounded) "
                                 f"steps only; remove {', '.join(bad)}")
        if self.method == "dfo":
            bad = [n for n, on in (("momentum", self.momentum > 0), ("accept_if_lower", self.accept_if_lower),
                                   ("normalize", self.normalize is not None), ("project", self.project is not None),
                                   ("tol", self.tol > 0), ("integrator='heun'", self.integrator == "heun"),
                                   ("grad_clip", self.grad_clip is not None),
                                   ("grad_clip_norm", self.grad_clip_norm is not None),
                                   ("step_clip", self.step_clip is not None)) if on]
            if bad:
                raise ValueError(f"Descent: method='dfo' uses no gradient; these options do not apply: "
                                 f"{', '.join(bad)}")
            if self.noise not in ("none", "additive"):
                raise ValueError(f"Descent: method='dfo' perturbs with noise='additive' (or 'none'); "
                                 f"got noise={self.noise!r}")

    def _finite_box(self) -> bool:
        return (self.lower is not None and self.upper is not None
                and bool(torch.isfinite(_as_tensor(self.lower)).all())
                and bool(torch.isfinite(_as_tensor(self.upper)).all()))

    # -- schedules ----------------------------------------------------------------------------
    @staticmethod
    def _schedule(kind, k, steps, start, end, power, decay, ramp=(0.0, 1.0)) -> float:
        if kind == "constant":
            return start
        if kind == "exponential":
            return start * decay ** k
        frac = 0.0 if steps <= 1 else min(k / (steps - 1), 1.0)
        if kind == "polynomial":
            return (start - end) * (1.0 - frac) ** power + end
        if kind == "cosine":
            return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * frac))
        a, b = ramp                                        # "ramp"
        if b > a:
            return start * min(max((k - a) / (b - a), 0.0), 1.0)
        return start if k >= a else 0.0

    def step_size_at(self, k: int) -> float:
        """eta_k (for step_schedule "energy": the base step size)."""
        if self.step_schedule == "energy":
            return self.step_size
        return self._schedule(self.step_schedule, k, self.steps, self.step_size, self.step_size_end,
                              self.step_power, self.step_decay)

    def noise_level_at(self, k: int) -> float:
        """n_k: temperature (noise "langevin") or standard deviation."""
        return self._schedule(self.noise_schedule, k, self.steps, self.noise_scale, self.noise_scale_end,
                              self.noise_power, self.noise_decay, self.noise_ramp)

    def replace(self, **changes) -> "Descent":
        return replace(self, **changes)

    # -- presets (the peers' rules; see PEERS.md) ---------------------------------------------
    @classmethod
    def gd(cls, steps: int = 10, step_size: float = 0.1, **overrides) -> "Descent":
        """Plain gradient descent: y <- y - eta * g."""
        return cls(**{"steps": steps, "step_size": step_size, **overrides})

    @classmethod
    def langevin(cls, steps: int = 100, step_size: float = 0.01, temperature: float = 1.0,
                 **overrides) -> "Descent":
        """Unadjusted Langevin: y <- y - eta * g + sqrt(2 * eta * T) * xi."""
        return cls(**{"steps": steps, "step_size": step_size, "noise": "langevin", "noise_scale": temperature,
                      **overrides})

    @classmethod
    def ibc_langevin(cls, lower=-1.0, upper=1.0, steps: int = 100, step_size: float = 0.1,
                     step_size_end: float = 1e-5, power: float = 2.0, schedule: str = "polynomial",
                     decay: float = 0.8, noise_scale: float = 1.0, delta_action_clip: float = 0.1,
                     grad_clip: Optional[float] = None, **overrides) -> "Descent":
        """IBC Langevin (ibc/agents/mcmc.py ``langevin_step``): d = eta_k (0.5 g + sigma xi) (g optionally
        clamped to +-grad_clip first), d clamped to +-delta * 0.5 (upper - lower), y <- clip(y - d, lower,
        upper); eta_k polynomial (eta_0 - eta_K)(1 - k/(K-1))^p + eta_K (or exponential eta_0 decay^k).
        Candidates start uniform in the box."""
        box = _as_tensor(_freeze_event_value("upper", upper)) - _as_tensor(_freeze_event_value("lower", lower))
        step_clip = delta_action_clip * 0.5 * box
        cfg = dict(steps=steps, step_size=step_size, step_schedule=schedule, step_size_end=step_size_end,
                   step_power=power, step_decay=decay, grad_scale=0.5, noise="step" if noise_scale > 0 else "none",
                   noise_scale=noise_scale, grad_clip=grad_clip, step_clip=step_clip, lower=lower, upper=upper,
                   init="uniform", selection="min")
        cfg.update(overrides)
        return cls(**cfg)

    @classmethod
    def ibc_dfo(cls, lower=-1.0, upper=1.0, steps: int = 3, noise_scale: float = 0.33, shrink: float = 0.5,
                temperature: float = 1.0, **overrides) -> "Descent":
        """IBC derivative-free optimiser (``iterative_dfo``): y ~ U(box); each iteration resample the K
        candidates by softmax(-E / T), then add sigma_k xi (sigma_{k+1} = shrink sigma_k) and clip.
        Picks the minimum-energy candidate after a final energy pass."""
        cfg = dict(method="dfo", steps=steps, noise="additive", noise_scale=noise_scale,
                   noise_schedule="exponential", noise_decay=shrink, resample_temperature=temperature,
                   lower=lower, upper=upper, init="uniform", selection="min")
        cfg.update(overrides)
        return cls(**cfg)

    @classmethod
    def ebt(cls, steps: int = 2, step_size: float = 60.0, noise: float = 0.0, grad_clamp: Optional[float] = None,
            accept_if_lower: bool = False, selection: str = "min", softmax: bool = True,
            init_scale: float = 1.0, **overrides) -> "Descent":
        """Energy-Based Transformer inference (model/nlp/ebt.py): y~ = y + sigma xi; p = softmax(y~) (when
        ``softmax``: the candidate is logits); g = dE/dp, clamped to +-grad_clamp/alpha; y = p - alpha g
        (kept only if lower with ``accept_if_lower``). Selection by final energy ("min"/"max") or
        "max_gap" (largest initial - final)."""
        cfg = dict(steps=steps, step_size=step_size, noise="pre" if noise > 0 else "none", noise_scale=noise,
                   grad_clip=None if grad_clamp is None else grad_clamp / step_size,
                   accept_if_lower=accept_if_lower, selection=selection,
                   project="softmax" if softmax else None, init="normal", init_scale=init_scale)
        cfg.update(overrides)
        return cls(**cfg)

    @classmethod
    def ebt_policy(cls, max_steps: int = 20, step_size: float = 1000.0, momentum: float = 0.9,
                   energy_temperature: float = 9.0, min_grad: float = 1e-3, noise: float = 0.0,
                   coupled: bool = False, grad_clamp: Optional[float] = None, **overrides) -> "Descent":
        """EBT-Policy (robomimic/algo/precious_policy.py): a0 ~ N(0, I), v = 0; each step a = rms_norm(a)
        (per candidate; ``coupled`` = over the whole batch as the reference does, which also takes ||g||
        over the whole batch); a += sigma xi (``noise``); g = dE/d(a + mu v); alpha = alpha_0 exp(E) / T;
        v = mu v - alpha g; a = a + v. Stop when ||g|| <= min_grad, after one final step, or after max_steps."""
        cfg = dict(steps=max_steps, step_size=step_size, step_schedule="energy", energy_temperature=energy_temperature,
                   momentum=momentum, nesterov=True, normalize="rms_all" if coupled else "rms",
                   noise="pre" if noise > 0 else "none", noise_scale=noise,
                   grad_clip=None if grad_clamp is None else grad_clamp / step_size,
                   tol=min_grad, tol_on="grad_norm", tol_scope="all" if coupled else "candidate",
                   tol_final_step=True, init="normal", selection="min")
        cfg.update(overrides)
        return cls(**cfg)

    @classmethod
    def energy_matching(cls, steps: int = 325, dt: float = 0.01, epsilon_max: float = 0.01, tau_star: float = 1.0,
                        t_start: float = 0.0, lower=-1.0, upper=1.0, integrator: str = "heun",
                        **overrides) -> "Descent":
        """Energy Matching sampler: x <- x - dt grad V(x) + sqrt(2 eps(t) dt) xi with t = t_start + k dt,
        eps(t) = 0 before tau_star, a linear ramp to epsilon_max at t = 1, constant after; Euler-Heun by
        default (as the reference's torchsde "heun"), clamp to [lower, upper] once at the end."""
        ramp = ((tau_star - t_start) / dt, (1.0 - t_start) / dt)
        cfg = dict(steps=steps, step_size=dt, noise="langevin" if epsilon_max > 0 else "none",
                   noise_scale=epsilon_max, noise_schedule="ramp", noise_ramp=(min(ramp), max(ramp)),
                   lower=lower, upper=upper, bound_each_step=False, integrator=integrator, init="normal")
        cfg.update(overrides)
        return cls(**cfg)


_DEFAULT_CONFIG = Descent()  # minimize's config=None (frozen: shared safely)


class _Deferred:
    """A result field computed when it is first read (see ``_DeferredFields``)."""

    __slots__ = ("fn",)

    def __init__(self, fn):
        self.fn = fn


class _DeferredFields:
    """Result fields that hold a ``_Deferred`` are computed on first read and then stored, so a field
    nobody reads costs nothing (the final energy pass of a one-candidate descent, where no selection needs
    it). Attribute reads, comparisons, ``dataclasses`` helpers, copies and pickling see the values;
    ``vars(result)`` shows what is stored."""

    def __getattribute__(self, name):
        value = object.__getattribute__(self, name)
        if type(value) is _Deferred:
            value = value.fn()
            object.__setattr__(self, name, value)
        return value

    def __getstate__(self):
        # pickling and deep copies see computed values, never the deferred computation
        return {name: getattr(self, name) for name in self.__dict__}

    def __setstate__(self, state):
        self.__dict__.update(state)


def _raw_field(result, name: str):
    """A field of a result as stored: a ``_Deferred`` stays unevaluated."""
    return object.__getattribute__(result, name)


@dataclass
class DescentResult(_DeferredFields):
    """What ``minimize`` found.

    best [B, *event], best_energy [B], best_index [B]: the selected candidate of each context.
    y [B, K, *event], energy [B, K]: every candidate's final state and its energy (a final energy pass;
    with one candidate on a whole-loop op, where no selection needs it, that pass runs when ``energy`` or
    ``best_energy`` is first read, on the final states and the model as it is then).
    initial_energy [B, K]: the energy at the first evaluation (``max_gap`` selection uses it).
    steps [B, K] int32: updates each candidate made. status [B, K] int8: MAX_STEPS (0, ran every step),
    CONVERGED (1, early exit), NONFINITE (2, its energy, gradient or step stopped being finite: it kept its
    last finite value).
    trajectory [steps + 1, B, K] (record=True): the energy evaluated at each step (carried forward once a
    candidate stopped), then the final energies. trajectory_y [steps + 1, B, K, *event]: the state before
    each step, then the final state.
    """

    best: Tensor
    best_energy: Tensor
    best_index: Tensor
    y: Tensor
    energy: Tensor
    initial_energy: Tensor
    steps: Tensor
    status: Tensor
    trajectory: Optional[Tensor] = None
    trajectory_y: Optional[Tensor] = None

    MAX_STEPS = MAX_STEPS
    CONVERGED = CONVERGED
    NONFINITE = NONFINITE


# -- energy models --------------------------------------------------------------------------------

class _ModuleEnergy:
    """Adapter for a plain ``f(x, y) -> E [B, K]``: prepare is the identity, gradients by autograd."""

    def __init__(self, fn):
        self.fn = fn

    def prepare(self, context):
        return context

    def energy(self, ctx, y):
        with torch.no_grad():
            return self.fn(ctx, y)

    def energy_and_grad(self, ctx, y):
        with torch.enable_grad():
            yy = y.detach().requires_grad_(True)
            E = self.fn(ctx, yy)
            if not isinstance(E, Tensor) or not E.requires_grad:
                raise ValueError("minimize: energy(x, y) must return a tensor that depends on y (differentiably)")
            (G,) = torch.autograd.grad(E.sum(), yy)
        return E.detach(), G


def _is_protocol(energy) -> bool:
    return all(callable(getattr(energy, name, None)) for name in ("prepare", "energy", "energy_and_grad"))


def _event_shape_of(energy) -> Optional[Tuple[int, ...]]:
    shape = getattr(energy, "event_shape", None)
    if shape is not None:
        return tuple(int(s) for s in shape)
    dim = getattr(energy, "candidate_dim", None)
    if isinstance(dim, int):
        return (dim,)
    return None


def _like_of(energy, context, init) -> Tuple[torch.device, torch.dtype]:
    if isinstance(init, Tensor):
        return init.device, init.dtype
    if isinstance(getattr(energy, "dtype", None), torch.dtype):
        return torch.device(getattr(energy, "device", "cpu")), energy.dtype
    if isinstance(energy, nn.Module):
        for p in energy.parameters():
            return p.device, p.dtype
    if isinstance(context, Tensor) and context.is_floating_point():
        return context.device, context.dtype
    if isinstance(context, Tensor):
        return context.device, torch.get_default_dtype()
    return torch.device("cpu"), torch.get_default_dtype()


def _broadcast_candidate_tensor(name: str, t: Tensor, B: int, K: int, event: Tuple[int, ...],
                                allow_event_only: bool) -> Tensor:
    """t as [B, K, *event]: accepts [B, K, *event], [B, *event] (same for all K) and, when
    ``allow_event_only``, [*event] or anything of ndim 2 + len(event) broadcastable to it."""
    full = (B, K) + tuple(event)
    shape = tuple(t.shape)
    if shape == full:
        return t
    if shape == (B,) + tuple(event):
        return t.unsqueeze(1).expand(full)
    if allow_event_only:
        if shape == tuple(event):
            return t.expand(full)
        if t.dim() == len(full) and all(s in (1, f) for s, f in zip(shape, full)):
            return t.expand(full)
    accepted = f"[B, K, *event] = {list(full)} or [B, *event] = {[B] + list(event)}"
    if allow_event_only:
        accepted += f" (or broadcastable: [*event] = {list(event)}, size-1 dims)"
    raise ValueError(f"minimize: {name} must be {accepted}; got shape {list(shape)}")


def _whole_loop_supported(model, config: Descent, *, y0: Tensor, mask: Optional[Tensor], record: bool,
                          backend: Optional[str]) -> Optional[str]:
    """The backend of a whole-loop op (all steps of energy, gradient and update in a single call) that can
    run this minimisation, or None: the per-step path runs then. See ``pyebm.ops.mlp_descent``."""
    from pyebm.ops import mlp_descent

    own = getattr(model, "whole_loop_backend", None)
    if callable(own):  # a model with a whole-loop op of its own (EBTPolicy, with run_whole_loop)
        return own(config, y0=y0, mask=mask, record=record, backend=backend)
    return mlp_descent.whole_loop_backend(model, config, y0, record, backend)


def _run_whole_loop(model, ctx, config: Descent, *, which: str, y0: Tensor, mask: Optional[Tensor], lower, upper,
                    step_clip, generator: Optional[torch.Generator]) -> DescentResult:
    """Run the whole-loop op chosen by ``_whole_loop_supported``, then select as the per-step path does. A
    model's own hook ``run_whole_loop(ctx, config, *, y0, lower, upper, step_clip, final_energy)`` returns
    (y, E_final, E_init, steps, status), skipping the final energy pass when ``final_energy`` is False."""
    from pyebm.ops import mlp_descent

    B, K = y0.shape[:2]
    if callable(getattr(model, "whole_loop_backend", None)):
        # one candidate and a deterministic rule: nothing to select, so the final energy pass waits until
        # the result's energy is read
        defer = K == 1 and config.selection != "sample"
        y, E_final, E_init, steps, status = model.run_whole_loop(ctx, config, y0=y0, lower=lower, upper=upper,
                                                                 step_clip=step_clip, final_energy=not defer)
        if defer:
            final, cache = y.clone(), []

            def final_energy():
                if not cache:
                    with torch.no_grad():  # on the backend that ran the loop
                        cache.append(model.energy(ctx, final, backend=which))
                return cache[0]

            return DescentResult(best=y[:, 0].clone(), best_energy=_Deferred(lambda: final_energy()[:, 0]),
                                 best_index=torch.zeros(B, dtype=torch.long, device=y.device), y=y,
                                 energy=_Deferred(final_energy), initial_energy=E_init, steps=steps, status=status)
    else:
        y, E_final, E_init, steps, status = mlp_descent.run_whole_loop(
            model, ctx, config, y0=y0, mask=mask, lower=lower, upper=upper, step_clip=step_clip,
            generator=generator, backend=which)
    best, best_E, idx = _select_best(config, y, E_final, E_init, status, generator)
    return DescentResult(best=best, best_energy=best_E, best_index=idx, y=y, energy=E_final,
                         initial_energy=E_init, steps=steps, status=status)


# -- the engine -----------------------------------------------------------------------------------

def minimize(energy: Any, context: Any, candidates: int = 1, config: Optional[Descent] = None,
             init: Union[None, Tensor, str] = None, mask: Optional[Tensor] = None,
             generator: Union[None, int, torch.Generator] = None, record: bool = False,
             backend: Optional[str] = None, event_shape: Optional[Sequence[int]] = None,
             whole_loop: Optional[bool] = None, cuda_graph: bool = False) -> DescentResult:
    """Minimise ``energy`` over ``candidates`` (K) candidates per context, all contexts and candidates at once.

    energy     an energy model (``prepare(context)``, ``energy(ctx, y)``, ``energy_and_grad(ctx, y)``:
               MLPEnergy, pyebm models) or any ``f(x, y) -> E [B, K]`` (an nn.Module: gradients by autograd).
    context    what the energy is conditioned on: a tensor [B, ...], or an int B for context-free energies.
               ``prepare`` runs once; every step reuses it.
    config     a ``pyebm.Descent`` (default ``Descent()``: 10 plain gradient steps of size 0.1).
    init       a tensor [B, K, *event] (or [B, *event], shared by the K candidates), or "normal" /
               "uniform" / "zeros" (default ``config.init``).
    mask       bool, True where a coordinate is clamped to its init value (inpainting); [B, K, *event],
               [B, *event] or [*event]. Needs an init tensor.
    generator  torch.Generator or int seed: all noise comes from it (same seed, same result).
    record     keep the trajectory of energies and states (``DescentResult.trajectory``/``trajectory_y``).
    backend    backend for the energy's fused ops ("torch", "cpu", "triton", "cuda"; default: the model's).
    event_shape  the candidate shape, for energies that do not declare it (``event_shape`` or
               ``candidate_dim`` attribute) when no init tensor is given.
    whole_loop None: use a whole-loop op when one supports this energy and config, else the per-step
               path; False: always the per-step path; True: require the whole-loop op (error if none).
    cuda_graph CUDA only: capture the fixed-shape per-step loop (prepare, every step, selection) in a CUDA
               graph on the first call for these shapes and options, then replay it (any energy, including
               plain nn.Modules through autograd). New context / init / mask values are copied into the
               graph's inputs; the energy's parameters are read in place, so in-place weight updates are
               seen. Noise comes from the default CUDA generator (``generator`` must be None); the
               "all stopped" host check is off inside the graph (early exit still masks each candidate).

    The per-step path never synchronises with the host inside the loop, except the "all stopped" check
    every ``config.check_every`` steps when ``config.tol > 0``.
    """
    cfg = _DEFAULT_CONFIG if config is None else config
    if (record is False and not cuda_graph and mask is None and event_shape is None
            and (whole_loop is None or whole_loop is True) and type(candidates) is int
            and isinstance(energy, MLPEnergy) and type(cfg) is Descent):
        fast = _fast_minimize(energy, context, candidates, cfg, init, generator, backend)
        if fast is not None:
            return fast
    if not isinstance(cfg, Descent):
        raise TypeError(f"minimize: config must be a pyebm.Descent; got {type(cfg).__name__}")
    if isinstance(candidates, bool) or not isinstance(candidates, numbers.Integral) or candidates < 1:
        raise ValueError(f"minimize: candidates must be an int >= 1; got {candidates!r}")
    K = int(candidates)
    if not isinstance(record, bool):
        raise TypeError(f"minimize: record must be True or False; got {record!r}")
    if whole_loop not in (None, True, False):
        raise TypeError(f"minimize: whole_loop must be None, True or False; got {whole_loop!r}")
    if cuda_graph:
        return _minimize_graphed(energy, context, K, cfg, init, mask, generator, record, backend, event_shape,
                                 whole_loop)

    if _is_protocol(energy):
        model = energy
    elif callable(energy):
        model = _ModuleEnergy(energy)
    else:
        raise TypeError("minimize: energy must have prepare/energy/energy_and_grad or be callable as "
                        f"energy(x, y) -> E [B, K]; got {type(energy).__name__}")

    init_kind = cfg.init
    init_tensor = None
    if isinstance(init, str):
        if init not in INITS:
            raise ValueError(f"minimize: init must be a tensor or one of {', '.join(map(repr, INITS))}; got {init!r}")
        if init == "uniform" and not cfg._finite_box():
            raise ValueError("minimize: init='uniform' needs finite config.lower and config.upper")
        init_kind = init
    elif isinstance(init, Tensor):
        init_tensor = init
        if not init.is_floating_point():
            raise TypeError(f"minimize: init must be a floating tensor; got {init.dtype}")
    elif init is not None:
        raise TypeError(f"minimize: init must be a tensor, a string or None; got {type(init).__name__}")

    device, dtype = _like_of(energy, context, init_tensor)

    # batch size
    if isinstance(context, Tensor):
        if context.dim() < 1:
            raise ValueError("minimize: context must be a tensor [B, ...] (or an int B); got a 0-d tensor")
        B = context.shape[0]
    elif isinstance(context, numbers.Integral) and not isinstance(context, bool):
        B = int(context)
        if B < 1:
            raise ValueError(f"minimize: context as a batch size must be >= 1; got {B}")
    elif init_tensor is not None:
        B = init_tensor.shape[0]
    else:
        raise ValueError("minimize: cannot tell the batch size; pass context as a tensor [B, ...] or an int, "
                         "or an init tensor")

    # candidate (event) shape
    event = tuple(int(s) for s in event_shape) if event_shape is not None else _event_shape_of(model)
    if event is None:
        if init_tensor is None or init_tensor.dim() < 3:
            raise ValueError("minimize: cannot tell the candidate shape of this energy; pass init=[B, K, ...] "
                             "or event_shape=(...)")
        event = tuple(init_tensor.shape[2:])
    if init_tensor is not None:
        if init_tensor.shape[0] != B:
            raise ValueError(f"minimize: init has {init_tensor.shape[0]} rows but the context has B = {B}")
        y0 = _broadcast_candidate_tensor("init", init_tensor.detach(), B, K, event, allow_event_only=False)
        # Copied below only for the per-step path, which updates its state in place (the whole-loop ops
        # write their own output).
        y0 = y0.to(device=device, dtype=dtype).contiguous()
        y0_borrowed = True
    else:
        y0 = None

    mask_full = fixed = None
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"minimize: mask must be a bool tensor; got "
                            f"{mask.dtype if isinstance(mask, Tensor) else type(mask).__name__}")
        if init_tensor is None:
            raise ValueError("minimize: mask needs an init tensor holding the values of the clamped coordinates")
        mask_full = _broadcast_candidate_tensor("mask", mask, B, K, event, allow_event_only=True)
        mask_full = mask_full.to(device).contiguous()

    if isinstance(generator, numbers.Integral) and not isinstance(generator, bool):
        generator = torch.Generator(device=device).manual_seed(int(generator))
    elif generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"minimize: generator must be a torch.Generator, an int seed or None; got "
                        f"{type(generator).__name__}")
    if generator is not None and torch.device(generator.device).type != torch.device(device).type:
        raise ValueError(f"minimize: generator is on {generator.device} but the candidates are on {device}")

    lower = _event_option("lower", cfg.lower, event, device, dtype)
    upper = _event_option("upper", cfg.upper, event, device, dtype)
    step_clip = _event_option("step_clip", cfg.step_clip, event, device, dtype)

    # ---- work starts here ----
    if y0 is None:
        y0_borrowed = False
        y0 = _initial(init_kind, cfg, (B, K) + event, lower, upper, generator, device, dtype)
    # (an init tensor is taken as given, even outside the bounds: the first step's clamp applies to it)
    if mask_full is not None:
        fixed = y0.clone()

    kwargs = {} if backend is None else {"backend": backend}
    ctx = model.prepare(context)

    which = None
    if whole_loop is not False:
        which = _whole_loop_supported(model, cfg, y0=y0, mask=mask_full, record=record, backend=backend)
    if which is not None:
        return _run_whole_loop(model, ctx, cfg, which=which, y0=y0, mask=mask_full, lower=lower, upper=upper,
                               step_clip=step_clip, generator=generator)

    if whole_loop:
        raise ValueError("minimize: whole_loop=True but no whole-loop op supports this energy, config and "
                         "backend (the per-step path runs with whole_loop=None or False)")
    if y0_borrowed:
        y0 = y0.clone()
    calls = _EnergyCalls(model, ctx, kwargs, (B, K), event)
    if cfg.method == "dfo":
        return _run_dfo(calls, cfg, y0, fixed, mask_full, lower, upper, generator, record)
    return _run_gd(calls, cfg, y0, fixed, mask_full, lower, upper, step_clip, generator, record)


def _fast_minimize(energy: MLPEnergy, context, K: int, cfg: Descent, init, generator, backend):
    """``minimize``'s common case in one compiled call: an MLPEnergy on the cpu backend in eager mode, a
    context tensor, a config the whole loop implements, an init kind or a ready [B, K, D] tensor, no mask
    and no recording. The plan computes the context term, runs every step and selects the best candidate
    (the whole-loop op's kernels: the same numbers). Returns None, before drawing any random number, when
    the call is not that case; the general path then handles it (and raises the errors)."""
    if type(context) is not Tensor or K < 1 or context.dim() != 2 or context.shape[1] != energy.context_dim:
        return None
    if generator is not None and (type(generator) is not torch.Generator or generator.device.type != "cpu"):
        return None
    plan = energy._fast_plan(context, context, backend)
    if plan is not None and plan.stale:  # checked before any random number is drawn: a new plan
        plan = energy.cpu_plan()
    if plan is None:
        return None
    dtype = energy._plan_dtype
    D = energy.candidate_dim
    if context.dtype != dtype:
        return None
    rule = _mlp_descent.plan_rule(cfg, dtype, D)
    if rule is None:
        return None
    B = context.shape[0]
    if init is None or type(init) is str:
        kind = cfg.init if init is None else init
        if kind not in INITS or (kind == "uniform" and not cfg._finite_box()):
            return None
        lower = _event_option("lower", cfg.lower, (D,), context.device, dtype)
        upper = _event_option("upper", cfg.upper, (D,), context.device, dtype)
        y0 = _initial(kind, cfg, (B, K, D), lower, upper, generator, context.device, dtype)
    elif (type(init) is Tensor and init.dim() == 3 and init.shape[0] == B and init.shape[1] == K
          and init.shape[2] == D and init.dtype == dtype and init.is_cpu):
        y0 = init  # the plan copies it, with no autograd graph
    else:
        return None
    noise = None
    if cfg.noise != "none":  # one draw of y's shape per step: the order of the per-step path
        noise = torch.empty((cfg.steps, B, K, D), dtype=dtype)
        for k in range(cfg.steps):
            noise[k].normal_(generator=generator)
    out = plan.descent(context, y0, rule, noise)
    if out is None:
        raise RuntimeError("pyebm: internal error: the cpu plan refused a descent the fast path had checked")
    y, E, E_init, steps, status, best, best_E, idx = out
    return DescentResult(best=best, best_energy=best_E, best_index=idx, y=y, energy=E, initial_energy=E_init,
                         steps=steps, status=status)


_GRAPHS: Dict[tuple, tuple] = {}


def _minimize_graphed(energy, context, K, cfg, init, mask, generator, record, backend, event_shape,
                      whole_loop) -> DescentResult:
    """``minimize(..., cuda_graph=True)``: capture once per (energy, shapes, options), then replay."""
    if not isinstance(context, Tensor) or context.device.type != "cuda":
        where = context.device if isinstance(context, Tensor) else type(context).__name__
        raise ValueError(f"minimize: cuda_graph=True needs the context as a CUDA tensor; got {where}")
    if generator is not None:
        raise ValueError("minimize: cuda_graph=True draws noise from the default CUDA generator; pass generator=None")
    if whole_loop:
        raise ValueError("minimize: cuda_graph=True captures the per-step path; whole_loop=True cannot be combined "
                         "with it")
    if isinstance(init, Tensor) and init.device != context.device:
        raise ValueError(f"minimize: init is on {init.device} but the context is on {context.device}")

    def sig(t):
        return None if not isinstance(t, Tensor) else (tuple(t.shape), t.dtype, str(t.device))

    key = (id(energy), sig(context), K, cfg, sig(init), init if isinstance(init, str) else None, sig(mask), record,
           backend, None if event_shape is None else tuple(event_shape))
    entry = _GRAPHS.get(key)
    if entry is None or entry[0] is not energy:
        # Inside the graph the host never looks at the device: no "all stopped" check.
        cfg_g = cfg.replace(check_every=0)
        static_x = context.clone()
        static_init = init.clone() if isinstance(init, Tensor) else init
        static_mask = mask.clone() if isinstance(mask, Tensor) else mask

        def run():
            return minimize(energy, static_x, candidates=K, config=cfg_g, init=static_init, mask=static_mask,
                            record=record, backend=backend, event_shape=event_shape, whole_loop=False)

        side = torch.cuda.Stream(device=context.device)
        side.wait_stream(torch.cuda.current_stream(context.device))
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up: lazy initialisation and autotuning stay out of the graph
                run()
        torch.cuda.current_stream(context.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = run()
        entry = (energy, graph, static_x, static_init, static_mask, out)
        _GRAPHS[key] = entry
    _, graph, static_x, static_init, static_mask, out = entry
    static_x.copy_(context)
    if isinstance(init, Tensor):
        static_init.copy_(init)
    if isinstance(mask, Tensor):
        static_mask.copy_(mask)
    graph.replay()
    fields = {name: (getattr(out, name).clone() if isinstance(getattr(out, name), Tensor) else getattr(out, name))
              for name in ("best", "best_energy", "best_index", "y", "energy", "initial_energy", "steps", "status",
                           "trajectory", "trajectory_y")}
    return DescentResult(**fields)


class _EnergyCalls:
    """Calls into the model with shape checks on the first call (host-side metadata only, no sync)."""

    def __init__(self, model, ctx, kwargs, bk, event):
        self.model, self.ctx, self.kwargs, self.bk, self.event = model, ctx, kwargs, tuple(bk), tuple(event)
        self._checked_grad = self._checked_energy = False

    def grad(self, y: Tensor) -> Tuple[Tensor, Tensor]:
        E, G = self.model.energy_and_grad(self.ctx, y, **self.kwargs)
        if not self._checked_grad:
            self._check_E(E)
            if not isinstance(G, Tensor) or tuple(G.shape) != tuple(y.shape):
                raise ValueError(f"minimize: energy_and_grad must return dE/dy shaped like y {list(y.shape)}; "
                                 f"got {None if not isinstance(G, Tensor) else list(G.shape)}")
            self._checked_grad = True
        return E, G

    def energy(self, y: Tensor) -> Tensor:
        E = self.model.energy(self.ctx, y, **self.kwargs)
        if not self._checked_energy:
            self._check_E(E)
            self._checked_energy = True
        return E

    def _check_E(self, E):
        if not isinstance(E, Tensor) or tuple(E.shape) != self.bk:
            raise ValueError(f"minimize: the energy must return E [B, K] = {list(self.bk)}; got "
                             f"{list(E.shape) if isinstance(E, Tensor) else type(E).__name__}")


_EVENT_OPTIONS: Dict[tuple, Tensor] = {}


def _event_option(name, value, event, device, dtype) -> Optional[Tensor]:
    """A bound / step clip as a tensor of the event shape (None if unset). Cached per value, shape, device
    and dtype: no host-to-device copy per call (and none inside a CUDA graph capture)."""
    if value is None:
        return None
    key = (name, value, tuple(event), str(device), dtype)
    try:
        hit = _EVENT_OPTIONS.get(key)
    except TypeError:  # unhashable value
        key, hit = None, None
    if hit is not None:
        return hit
    out = _event_option_tensor(name, value, event, device, dtype)
    if key is not None and len(_EVENT_OPTIONS) < 256:
        _EVENT_OPTIONS[key] = out
    return out


def _event_option_tensor(name, value, event, device, dtype) -> Tensor:
    t = torch.as_tensor(value, dtype=dtype, device=device)
    try:
        return t.expand(event).contiguous()
    except RuntimeError:
        raise ValueError(f"minimize: config.{name} has shape {list(t.shape)}, not broadcastable to the candidate "
                         f"shape {list(event)}") from None


def _initial(kind, cfg, shape, lower, upper, generator, device, dtype) -> Tensor:
    if kind == "zeros":
        y = torch.zeros(shape, device=device, dtype=dtype)
    elif kind == "uniform":
        u = torch.rand(shape, generator=generator, device=device, dtype=dtype)
        y = lower + (upper - lower) * u
    else:
        y = torch.randn(shape, generator=generator, device=device, dtype=dtype)
        if cfg.init_scale != 1.0:
            y.mul_(cfg.init_scale)
    if kind != "uniform" and (lower is not None or upper is not None):
        y = y.clamp(lower, upper)
    return y.contiguous()


def _sample_index(probs: Tensor, u: Tensor) -> Tensor:
    cdf = torch.cumsum(probs, dim=1)
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=probs.shape[1] - 1)


def _select(cfg: Descent, E_final: Tensor, E_init: Tensor, status: Tensor, generator) -> Tensor:
    if cfg.selection == "min":
        score = -E_final
    elif cfg.selection == "max":
        score = E_final.clone()
    elif cfg.selection == "max_gap":
        score = E_init - E_final
    else:
        score = -E_final / cfg.selection_temperature
    bad = (status == NONFINITE) | ~torch.isfinite(score)
    score.masked_fill_(bad, float("-inf"))
    if cfg.selection != "sample":
        return score.argmax(dim=1)
    score = torch.where(bad.all(dim=1, keepdim=True), 0.0, score)
    probs = torch.softmax(score, dim=1)
    u = torch.rand(E_final.shape[0], 1, generator=generator, device=E_final.device, dtype=E_final.dtype)
    return _sample_index(probs, u)[:, 0]


def _select_best(cfg: Descent, y: Tensor, E_final: Tensor, E_init: Tensor, status: Tensor, generator):
    """(best [B, *event], best_energy [B], best_index [B]) by ``cfg.selection``: one C++ pass on CPU tensors
    for the deterministic rules, else ``_select`` and two gathers."""
    if cfg.selection != "sample" and y.device.type == "cpu" and hasattr(torch.ops.pyebm, "select_best") \
            and _backend.ext() is not None:
        return torch.ops.pyebm.select_best.default(y, E_final, E_init, status, cfg.selection)
    idx = _select(cfg, E_final, E_init, status, generator)
    ar = torch.arange(y.shape[0], device=y.device)
    return y[ar, idx], E_final[ar, idx], idx


def _finish(cfg, calls, y, E_init, steps, status, fixed, mask, lower, upper, generator, traj) -> DescentResult:
    B, K = calls.bk
    if not cfg.bound_each_step and (lower is not None or upper is not None):
        y.clamp_(lower, upper)
        if mask is not None:
            torch.where(mask, fixed, y, out=y)
    E_final = calls.energy(_ops.descent_pre(y, project=cfg.project))
    best, best_E, idx = _select_best(cfg, y, E_final, E_init, status.view(B, K), generator)
    traj_E = traj_y = None
    if traj is not None:
        traj_E, traj_y = traj
        traj_E[-1] = E_final
        traj_y[-1] = y
    return DescentResult(best=best, best_energy=best_E, best_index=idx, y=y, energy=E_final,
                         initial_energy=E_init, steps=steps.view(B, K), status=status.view(B, K),
                         trajectory=traj_E, trajectory_y=traj_y)


def _run_gd(calls: _EnergyCalls, cfg: Descent, y0: Tensor, fixed, mask, lower, upper, step_clip,
            generator, record: bool) -> DescentResult:
    B, K = calls.bk
    shape = y0.shape
    N = B * K
    D = y0[0, 0].numel()
    device, dtype = y0.device, y0.dtype
    y = y0
    yf = y.view(N, D)
    maskf = None if mask is None else mask.view(N, D)
    fixedf = None if fixed is None else fixed.view(N, D)
    lowf = None if lower is None else lower.reshape(D)
    upf = None if upper is None else upper.reshape(D)
    clipf = None if step_clip is None else step_clip.reshape(D)
    flat_clip = _as_tensor(cfg.step_clip)
    if flat_clip is not None and bool((flat_clip == flat_clip.flatten()[0]).all()):
        clipf = float(flat_clip.flatten()[0])  # one value (read from the config, not the device): scalar clamp

    momentum = cfg.momentum
    velocity = torch.zeros(N, D, device=device, dtype=dtype) if momentum > 0 else None
    active = torch.ones(N, dtype=torch.bool, device=device)
    steps = torch.zeros(N, dtype=torch.int32, device=device)
    status = torch.zeros(N, dtype=torch.int8, device=device)
    use_tol = cfg.tol > 0
    pending = torch.zeros(N, dtype=torch.bool, device=device) if (use_tol and cfg.tol_final_step) else None
    xi = torch.empty(shape, device=device, dtype=dtype) if cfg.noise != "none" else None
    xif = None if xi is None else xi.view(N, D)
    accept = cfg.accept_if_lower
    heun = cfg.integrator == "heun"
    if accept or heun:
        y_prop = torch.empty_like(y)
        y_propf = y_prop.view(N, D)
        v_prop = torch.empty_like(velocity) if velocity is not None else None
    post_mode = cfg.noise if cfg.noise in ("langevin", "step", "additive") else "none"
    check_every = cfg.check_every if use_tol else 0
    common = dict(backend=calls.kwargs.get("backend"), grad_scale=cfg.grad_scale, momentum=momentum, energy_scaled=cfg.step_schedule == "energy",
                  energy_temperature=cfg.energy_temperature, tol=cfg.tol, tol_on=cfg.tol_on, tol_scope=cfg.tol_scope,
                  tol_final_step=cfg.tol_final_step, bound_each_step=cfg.bound_each_step,
                  fixed=fixedf, mask=maskf, lower=lowf, upper=upf, step_clip=clipf)

    traj = None
    if record:
        traj = (torch.empty((cfg.steps + 1, B, K), device=device, dtype=dtype),
                torch.empty((cfg.steps + 1,) + tuple(shape), device=device, dtype=dtype))
        traj[1][0] = y

    E_prev = None
    E_init = None
    k_done = 0
    for k in range(cfg.steps):
        if record:
            running = active.view(B, K).clone()
        if xi is not None:
            xi.normal_(generator=generator)
        n_k = cfg.noise_level_at(k)
        ys = _ops.descent_pre(y, normalize=cfg.normalize, normalize_eps=cfg.normalize_eps,
                              noise=xi if cfg.noise == "pre" else None, noise_level=n_k, project=cfg.project,
                              fixed=fixed, mask=mask)
        base = None if ys is y else ys.reshape(N, D)
        q = torch.add(ys, velocity.view(shape), alpha=momentum) if cfg.nesterov else ys
        E, G = calls.grad(q)
        if k == 0:
            E_init = E.clone()
        Ef = E.reshape(N)
        Gf = G.reshape(N, D)
        eta = cfg.step_size_at(k)
        if heun:
            # predictor: an Euler step with the clipped g0 (no bookkeeping) ...
            finite0 = _ops.finite_rows(Gf)
            _ops.clip_grad_(Gf, cfg.grad_clip, cfg.grad_clip_norm)
            s0 = _noise_std(post_mode, eta, n_k)
            _ops.descent_update(yf, Gf, Ef, active, steps, status, eta=eta, y_base=base, noise=xif,
                                noise_mode="additive", noise_level=s0, out=y_propf, dry_run=True, **common)
            E1, G1 = calls.grad(y_prop)
            G1f = G1.reshape(N, D)
            finite1 = _ops.finite_rows(G1f, E1.reshape(N)) & finite0
            _ops.clip_grad_(G1f, cfg.grad_clip, cfg.grad_clip_norm)
            # ... corrector: the mean clipped gradient and the mean noise std, with the same xi
            Gf.add_(G1f).mul_(0.5)
            s = 0.5 * (s0 + _noise_std(post_mode, eta, cfg.noise_level_at(k + 1)))
            _ops.descent_update(yf, Gf, Ef, active, steps, status, eta=eta, y_base=base, noise=xif,
                                noise_mode="additive", noise_level=s, finite_also=finite1, **common)
        elif accept:
            move = _ops.descent_update(yf, Gf, Ef, active, steps, status, eta=eta, y_base=base, velocity=velocity,
                                       pending=pending, E_prev=E_prev, noise=xif if post_mode != "none" else None,
                                       noise_mode=post_mode, noise_level=n_k, grad_clip=cfg.grad_clip,
                                       grad_clip_norm=cfg.grad_clip_norm, out=y_propf, velocity_out=v_prop,
                                       **common)
            E_prop = calls.energy(_ops.descent_pre(y_prop, project=cfg.project))
            _ops.descent_accept(yf, y_propf, Ef, E_prop.reshape(N), move, y_base=base, velocity=velocity,
                                velocity_prop=v_prop)
        else:
            _ops.descent_update(yf, Gf, Ef, active, steps, status, eta=eta, y_base=base, velocity=velocity,
                                pending=pending, E_prev=E_prev, noise=xif if post_mode != "none" else None,
                                noise_mode=post_mode, noise_level=n_k, grad_clip=cfg.grad_clip,
                                grad_clip_norm=cfg.grad_clip_norm, **common)
        if record:
            traj[0][k] = E if k == 0 else torch.where(running, E, traj[0][k - 1])
            traj[1][k + 1] = y
        E_prev = Ef
        k_done = k + 1
        if check_every and k_done % check_every == 0 and k_done < cfg.steps and not bool(active.any()):
            break
    if record and k_done < cfg.steps:
        traj[0][k_done:cfg.steps] = traj[0][k_done - 1]
        traj[1][k_done + 1:] = y
    return _finish(cfg, calls, y, E_init, steps, status, fixed, mask, lower, upper, generator, traj)


def _noise_std(mode: str, eta: float, n: float) -> float:
    """Standard deviation of the post-gradient noise for a scalar step size (Heun only uses these)."""
    if mode == "langevin":
        return math.sqrt(2.0 * eta * n)
    if mode == "additive":
        return n
    return 0.0


def _run_dfo(calls: _EnergyCalls, cfg: Descent, y0: Tensor, fixed, mask, lower, upper, generator,
             record: bool) -> DescentResult:
    B, K = calls.bk
    device, dtype = y0.device, y0.dtype
    y = y0
    ar = torch.arange(B, device=device).unsqueeze(1)
    u = torch.empty(B, K, device=device, dtype=dtype)
    xi = torch.empty_like(y) if cfg.noise != "none" else None
    traj = None
    if record:
        traj = (torch.empty((cfg.steps + 1, B, K), device=device, dtype=dtype),
                torch.empty((cfg.steps + 1,) + tuple(y.shape), device=device, dtype=dtype))
        traj[1][0] = y
    E_init = None
    for k in range(cfg.steps):
        if k > 0 and xi is not None:
            xi.normal_(generator=generator)
            y.add_(xi, alpha=cfg.noise_level_at(k - 1))
            if lower is not None or upper is not None:
                y.clamp_(lower, upper)
            if mask is not None:
                torch.where(mask, fixed, y, out=y)
        E = calls.energy(y)
        if k == 0:
            E_init = E.clone()
        finite = torch.isfinite(E)
        logits = torch.where(finite, E / -cfg.resample_temperature, float("-inf"))
        logits = torch.where(finite.any(dim=1, keepdim=True), logits, 0.0)
        u.uniform_(generator=generator)
        idx = _sample_index(torch.softmax(logits, dim=1), u).sort(dim=1).values
        y = y[ar, idx]
        if mask is not None:
            fixed, mask = fixed[ar, idx], mask[ar, idx]
        if record:
            traj[0][k] = E
            traj[1][k + 1] = y
    steps = torch.full((B * K,), cfg.steps, dtype=torch.int32, device=device)
    status = torch.zeros(B * K, dtype=torch.int8, device=device)
    res = _finish(cfg, calls, y, E_init, steps, status, fixed, mask, lower, upper, generator, traj)
    res.status.masked_fill_(~torch.isfinite(res.energy), NONFINITE)
    return res
