"""The update rule of batched descent: ``pyebm.Descent`` (every option, the peers' presets, the schedules).

    cfg = pyebm.Descent.ibc_langevin(lower=-1.0, upper=1.0, steps=50)
    cfg = pyebm.Descent(steps=20, step_size=0.05, momentum=0.9, tol=1e-3)

``Descent`` is a frozen dataclass: ``cfg.replace(steps=20)`` edits. The rule step by step is written out in
``pyebm.reference.descent``; ``pyebm.minimize`` (``pyebm.descent``) runs it.
"""
from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass, fields, replace
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor

MAX_STEPS, CONVERGED, NONFINITE = 0, 1, 2
STATUS_NAMES = {MAX_STEPS: "max_steps", CONVERGED: "converged", NONFINITE: "nonfinite"}

METHODS = ("gd", "dfo")
STEP_SCHEDULES = ("constant", "polynomial", "exponential", "cosine", "energy")
NOISE_SCHEDULES = ("constant", "polynomial", "exponential", "cosine", "ramp")
NOISE_MODES = ("none", "langevin", "step", "additive", "pre")
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
    integrator        "euler" | "heun": Heun's method on the Stratonovich form (torchsde's "heun"): an Euler
                      proposal, then the step from y with the mean of the two gradients and the mean of
                      the two noise standard deviations (at k and k + 1), the same xi. Two evaluations.
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
        self._check_scalars()
        self._check_event_values()
        self._check_combinations()

    def _err(self, name, expected):
        raise ValueError(f"Descent: {name} must be {expected}; got {getattr(self, name)!r}")

    def _choice(self, name, options):
        if getattr(self, name) not in options:
            self._err(name, "one of " + ", ".join(repr(o) for o in options))

    def _real(self, name, lo=None, lo_open=False, hi=None, hi_open=False, optional=False):
        """A finite number within the bounds, stored as a float."""
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
            self._err(name, "a number " + " and ".join(s for s in (lo_s, hi_s) if s))
        object.__setattr__(self, name, v)

    def _flag(self, name):
        if not isinstance(getattr(self, name), bool):
            raise TypeError(f"Descent: {name} must be True or False; got {getattr(self, name)!r}")

    def _integer(self, name, lo):
        v = getattr(self, name)
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < lo:
            self._err(name, f"an int >= {lo}")
        object.__setattr__(self, name, int(v))

    def _check_scalars(self) -> None:
        """Every option on its own: choices, ranges, flags."""
        self._choice("method", METHODS)
        self._integer("steps", 1)
        self._real("step_size", 0.0, lo_open=True)
        self._choice("step_schedule", STEP_SCHEDULES)
        self._real("step_size_end", 0.0)
        self._real("step_power", 0.0, lo_open=True)
        self._real("step_decay", 0.0, lo_open=True)
        self._real("energy_temperature", 0.0, lo_open=True)
        self._real("grad_scale", 0.0, lo_open=True)
        self._choice("noise", NOISE_MODES)
        self._real("noise_scale", 0.0)
        self._choice("noise_schedule", NOISE_SCHEDULES)
        self._real("noise_scale_end", 0.0)
        self._real("noise_power", 0.0, lo_open=True)
        self._real("noise_decay", 0.0, lo_open=True)
        ramp = self.noise_ramp
        if not (isinstance(ramp, (tuple, list)) and len(ramp) == 2
                and all(isinstance(r, numbers.Real) and not isinstance(r, bool) and math.isfinite(r) for r in ramp)
                and ramp[0] <= ramp[1]):
            self._err("noise_ramp", "a pair (start, end) of finite step positions with start <= end")
        object.__setattr__(self, "noise_ramp", (float(ramp[0]), float(ramp[1])))
        self._real("momentum", 0.0, hi=1.0, hi_open=True)
        self._flag("nesterov")
        self._real("grad_clip", 0.0, lo_open=True, optional=True)
        self._real("grad_clip_norm", 0.0, lo_open=True, optional=True)
        self._flag("bound_each_step")
        self._choice("normalize", NORMALIZE)
        self._real("normalize_eps", 0.0, lo_open=True, optional=True)
        self._choice("project", PROJECT)
        self._flag("accept_if_lower")
        self._real("tol", 0.0)
        self._choice("tol_on", TOL_ON)
        self._choice("tol_scope", TOL_SCOPE)
        self._flag("tol_final_step")
        self._integer("check_every", 0)
        self._choice("selection", SELECTIONS)
        self._real("selection_temperature", 0.0, lo_open=True)
        self._choice("init", INITS)
        self._real("init_scale", 0.0, lo_open=True)
        self._choice("integrator", INTEGRATORS)
        self._real("resample_temperature", 0.0, lo_open=True)

    def _check_event_values(self) -> None:
        """Bounds and step clip: frozen to floats / nested tuples, step clip > 0, lower <= upper."""
        for name in ("step_clip", "lower", "upper"):
            object.__setattr__(self, name, _freeze_event_value(name, getattr(self, name)))
        if self.step_clip is not None and not bool((_as_tensor(self.step_clip) > 0).all()):
            self._err("step_clip", "> 0 (every element)")
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

    def _check_combinations(self) -> None:
        """Options that exclude each other."""
        if self.nesterov and self.momentum == 0:
            raise ValueError("Descent: nesterov=True needs momentum > 0; got momentum=0")
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

    # -- JSON ---------------------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        """Every option as plain JSON values (tuples as lists, an infinite bound as the string "inf" or
        "-inf", which standard JSON has no number for). ``Descent.from_dict(cfg.to_dict()) == cfg``."""
        return {f.name: _to_json_value(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_dict(cls, options: Mapping[str, Any]) -> "Descent":
        """The config of ``to_dict``'s output (options left out take their defaults; an unknown name is an
        error). Validated as the constructor validates."""
        if not isinstance(options, Mapping):
            raise TypeError(f"Descent.from_dict: options must be a mapping of option names to values; got "
                            f"{type(options).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(str(k) for k in options if k not in known)
        if unknown:
            raise ValueError(f"Descent.from_dict: unknown options {unknown}; known: {sorted(known)}")
        kwargs = {k: (_from_json_value(v) if k in _JSON_NUMERIC_TUPLES else v) for k, v in options.items()}
        return cls(**kwargs)

    def to_json(self, **dumps_kwargs) -> str:
        """``to_dict()`` as a JSON string (standard JSON: no NaN or Infinity literals)."""
        return json.dumps(self.to_dict(), allow_nan=False, **dumps_kwargs)

    @classmethod
    def from_json(cls, text: str) -> "Descent":
        """The config of ``to_json``'s output."""
        if not isinstance(text, (str, bytes, bytearray)):
            raise TypeError(f"Descent.from_json: text must be a JSON string; got {type(text).__name__}")
        try:
            options = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"Descent.from_json: not valid JSON: {e}") from None
        return cls.from_dict(options)

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
        """Energy Matching sampler (Balcerak et al. 2025): dx = -grad V(x) dt + sqrt(2 eps(t)) dW from
        t = t_start, ``steps`` steps of ``dt`` (325 x 0.01: T = 3.25), then a clamp to [lower, upper] once at
        the end. Step k runs from t_k = t_start + k dt to t_{k+1}.

        eps(t) is the public sampler's schedule: 0 for t < tau_star; for tau_star < 1 a linear ramp
        epsilon_max (t - tau_star) / (1 - tau_star) on tau_star <= t < 1; epsilon_max from max(tau_star, 1)
        on. For tau_star >= 1 the noise switches fully on at tau_star (no ramp), as in the public CIFAR-10 /
        ImageNet sampler (the public 2-D tutorial's temperature() turns it on at t = 1 instead). A cutoff that
        lies on the step grid up to rounding (1e-9 of a step) counts as on it.

        ``integrator="heun"`` (default) is Heun's method on the Stratonovich form, as torchsde's ``heun``:
        y~ = x - dt g(x) + s_k xi, x' = x - dt (g(x) + g(y~)) / 2 + (s_k + s_{k+1}) / 2 xi with
        s_k = sqrt(2 eps(t_k) dt). "euler" is Euler-Maruyama. pyebm steps on the exact grid t_k (float64);
        torchsde advances a float32 clock by repeated addition, which can move the step where a cutoff
        takes effect by one and adds a final short step."""
        for name, v in (("dt", dt), ("tau_star", tau_star), ("t_start", t_start), ("epsilon_max", epsilon_max)):
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
                raise TypeError(f"Descent.energy_matching: {name} must be a finite number; got {v!r}")
        if dt <= 0:
            raise ValueError(f"Descent.energy_matching: dt must be > 0; got {dt!r}")
        if epsilon_max < 0:
            raise ValueError(f"Descent.energy_matching: epsilon_max must be >= 0; got {epsilon_max!r}")
        cfg = dict(steps=steps, step_size=dt, noise="langevin" if epsilon_max > 0 else "none",
                   noise_scale=epsilon_max, noise_schedule="ramp",
                   noise_ramp=_energy_matching_ramp(dt, tau_star, t_start),
                   lower=lower, upper=upper, bound_each_step=False, integrator=integrator, init="normal")
        cfg.update(overrides)
        return cls(**cfg)


def _energy_matching_ramp(dt: float, tau_star: float, t_start: float = 0.0) -> Tuple[float, float]:
    """Energy Matching's eps(t) as ``Descent.noise_ramp`` (a, b) in steps, k counted from t_start: noise
    ramps from 0 at step a to full at step b; a == b is a step at a. tau_star < 1 ramps from tau_star to 1;
    tau_star >= 1 switches on at tau_star. Positions within 1e-9 of a whole step are rounded to it."""
    def steps_to(t: float) -> float:
        a = (float(t) - float(t_start)) / float(dt)
        r = round(a)
        return float(r) if abs(a - r) <= 1e-9 * max(1.0, abs(a)) else a

    a = steps_to(tau_star)
    return (a, steps_to(1.0)) if tau_star < 1.0 else (a, a)


DEFAULT = Descent()  # minimize's config=None (frozen: shared safely)

# -- JSON values of the options ---------------------------------------------------------------------

_JSON_NUMERIC_TUPLES = ("noise_ramp", "step_clip", "lower", "upper")  # lists in JSON, tuples here
_JSON_INF = {"inf": math.inf, "-inf": -math.inf}


def _to_json_value(value):
    if isinstance(value, (tuple, list)):
        return [_to_json_value(v) for v in value]
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value


def _from_json_value(value):
    if isinstance(value, list):
        return tuple(_from_json_value(v) for v in value)
    if isinstance(value, str) and value in _JSON_INF:
        return _JSON_INF[value]
    return value


# -- the config's values as tensors -------------------------------------------------------------------

_EVENT_OPTIONS: Dict[tuple, Tensor] = {}


def _tracing() -> bool:
    """True while torch.compile / torch.export / a dispatch mode traces: tensors made then must not be cached."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    return torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None


def event_option(name: str, value: EventValue, event, device, dtype) -> Optional[Tensor]:
    """A bound / step clip of a config as a tensor of the event shape (None if unset). Cached per value, shape,
    device and dtype (constants of the config, not of any model): no host-to-device copy per call."""
    if value is None:
        return None
    key = (name, value, tuple(event), str(device), dtype)
    hit = _EVENT_OPTIONS.get(key)
    if hit is not None:
        return hit
    t = torch.as_tensor(value, dtype=dtype, device=device)
    try:
        out = t.expand(tuple(event)).contiguous()
    except RuntimeError:
        raise ValueError(f"minimize: config.{name} has shape {list(t.shape)}, not broadcastable to the candidate "
                         f"shape {list(event)}") from None
    if len(_EVENT_OPTIONS) < 256 and not _tracing():
        _EVENT_OPTIONS[key] = out
    return out


_SCHEDULES: Dict[int, tuple] = {}


def schedules(cfg: Descent) -> Tuple[Tensor, Tensor]:
    """Per-step step sizes and noise levels of ``cfg`` as host float64 tensors [steps] (computed once per
    config object, which the cache holds so that its id is not reused; never cached while tracing)."""
    hit = _SCHEDULES.get(id(cfg))
    if hit is not None and hit[0] is cfg:
        return hit[1]
    eta = torch.tensor([cfg.step_size_at(k) for k in range(cfg.steps)], dtype=torch.float64)
    nlev = torch.tensor([cfg.noise_level_at(k) for k in range(cfg.steps)], dtype=torch.float64)
    if not _tracing():
        if len(_SCHEDULES) >= 64:
            _SCHEDULES.clear()
        _SCHEDULES[id(cfg)] = (cfg, (eta, nlev))
    return eta, nlev


_DEVICE_SCHEDULES: Dict[tuple, tuple] = {}


def schedules_on(cfg: Descent, device) -> Tuple[Tensor, Tensor]:
    """``schedules(cfg)`` on ``device`` (float64): on an accelerator the copy is made once per config and
    device, so a whole-loop op reads device memory only (no host-to-device copy per call, which a CUDA graph
    could not capture)."""
    device = torch.device(device)
    if device.type == "cpu":
        return schedules(cfg)
    key = (id(cfg), str(device))
    hit = _DEVICE_SCHEDULES.get(key)
    if hit is not None and hit[0] is cfg:
        return hit[1]
    eta, nlev = schedules(cfg)
    out = (eta.to(device), nlev.to(device))
    if not _tracing():
        if len(_DEVICE_SCHEDULES) >= 64:
            _DEVICE_SCHEDULES.clear()
        _DEVICE_SCHEDULES[key] = (cfg, out)
    return out


def rule_options(cfg: Descent) -> dict:
    """The update-rule options of ``cfg`` as the whole-loop ops (and ``pyebm._C.DescentRule``) take them."""
    return dict(grad_scale=float(cfg.grad_scale), momentum=float(cfg.momentum), nesterov=bool(cfg.nesterov),
                grad_clip=cfg.grad_clip, grad_clip_norm=cfg.grad_clip_norm,
                energy_scaled=cfg.step_schedule == "energy", energy_temperature=float(cfg.energy_temperature),
                tol=float(cfg.tol), tol_final_step=bool(cfg.tol_final_step),
                bound_each_step=bool(cfg.bound_each_step), noise_mode=cfg.noise)
