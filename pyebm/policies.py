"""Energy policies: pick an action chunk by descending an energy over candidate chunks.

    model = pyebm.models.EBTPolicy(action_dim=7, cond_dim=256)
    policy = pyebm.policies.EnergyPolicy.ebt_policy(model, candidates=32)
    actions = policy.act(obs_tokens)          # [B, n_action_steps, action_dim]
    policy.last_result.energy, policy.last_result.steps

An ``EnergyPolicy`` wraps any pyebm energy whose candidates are action chunks: an ``EBTPolicy``
(candidates [B, K, horizon, action_dim], context = observation tokens) or an ``MLPEnergy`` over the
flattened chunk (candidates [B, K, horizon * action_dim], context = the flattened observation history,
as implicit behavioural cloning). Each ``act`` computes the observation side once, runs
``pyebm.minimize`` on K candidates per observation, keeps the lowest-energy chunk and returns its
executed window ``chunk[:, window_start : window_start + n_action_steps]``.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from pyebm import _backend, _rng, _state
from pyebm._sharded import _minimize as _sharded_minimize
from pyebm.config import _from_json_value, _to_json_value
from pyebm.descent import NONFINITE, SHARD_ENGINE, Descent, DescentResult, as_generator, minimize
from pyebm.energy import MLPEnergy
from pyebm.pretrained import Pretrained

BoundValue = Union[float, Sequence[float], Tensor]


@dataclass
class PolicyResult:
    """What the last ``act`` did (values computed during that call).

    actions [B, n_action_steps, A]: the executed window. chunk [B, horizon, A]: the whole chosen chunk.
    y [B, K, horizon, A], energy [B, K]: every candidate's final chunk and energy; best_energy [B],
    best_index [B]. With one candidate and no recovery nothing needs the final energies, and unless the
    policy was built with ``final_energy=True`` that pass is skipped: ``energy`` and ``best_energy`` are
    None then. steps [B, K]: descent steps each candidate took (all rounds added up); status [B, K]:
    the descent status of the round each candidate's final value came from (0 max steps, 1 converged,
    2 non-finite). retries [B, K]: how often each candidate was re-initialised by recovery;
    recovered: how many re-initialisations happened in all (0 without recovery).
    descent: the ``DescentResult`` of the first round.
    """

    actions: Tensor
    chunk: Tensor
    y: Tensor
    energy: Optional[Tensor]
    best_energy: Optional[Tensor]
    best_index: Tensor
    steps: Tensor
    status: Tensor
    retries: Tensor
    recovered: int
    descent: DescentResult


_ALL_FINITE = getattr(_backend.ext(), "all_finite", None)


def _all_finite(t: Tensor) -> bool:
    """Whether every value of ``t`` is finite: read in place by the extension for a contiguous float32/float64
    CPU tensor in eager mode (one small C++ call), else ``torch.isfinite``."""
    ok = None if _ALL_FINITE is None else _ALL_FINITE(t)
    return bool(torch.isfinite(t).all()) if ok is None else ok


# a pytree (its fields the children): torch.compile and torch.export return it from a traced call
torch.export.register_dataclass(PolicyResult, serialized_type_name="pyebm.policies.PolicyResult")


class _Prepared:
    """The energy with its observation side already computed: ``prepare`` hands back the cache."""

    def __init__(self, energy, ctx):
        self._energy, self._ctx = energy, ctx
        self.event_shape = tuple(energy.event_shape)

    def prepare(self, context):
        return self._ctx

    def energy(self, ctx, y, **kwargs):
        return self._energy.energy(ctx, y, **kwargs)

    def energy_and_grad(self, ctx, y):
        return self._energy.energy_and_grad(ctx, y)

    def __getattr__(self, name):
        # the energy's whole-loop hooks and the attributes pyebm._dispatch reads, when it has them
        if name in ("whole_loop_spec", "run_whole_loop", "backend", "explain_energy", "grad_mode"):
            return getattr(self._energy, name)
        raise AttributeError(name)


def _int_arg(name: str, value, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < lo:
        raise ValueError(f"EnergyPolicy: {name} must be an int >= {lo}; got {value!r}")
    return int(value)


class EnergyPolicy(Pretrained):
    """Receding-horizon policy over an energy of action chunks.

    Args:
        energy: an ``EBTPolicy`` (or any energy with ``event_shape == (horizon, action_dim)``) or an
            ``MLPEnergy`` whose candidate is the flattened chunk (``candidate_dim == horizon * action_dim``).
        descent: the update rule (``pyebm.Descent``); its bounds are replaced by ``bounds`` when given.
        candidates: K chunks descended per observation (best of K by final energy), >= 1.
        horizon, action_dim: the chunk shape; taken from the energy when it declares ``event_shape``.
        n_obs_steps: observation steps in a context (from the energy when it has ``n_obs_steps``).
        n_action_steps: actions executed per ``act`` (default: horizon - window_start).
        window_start: first executed chunk index (default ``n_obs_steps - 1``, as EBT-Policy).
        bounds: (low, high), each a float, an [action_dim] or a [horizon, action_dim] tensor; every
            returned action lies inside (clamped after every step and at the end).
        warm_start: seed candidate 0 of the next ``act`` with the unexecuted tail of the chosen chunk
            (shifted by n_action_steps, the last action repeated at the end); the other K - 1 start fresh.
            Ignored when ``act`` gets an ``init``; ``reset()`` forgets it.
        recovery_threshold: candidates whose final energy is above it (or not finite) are re-initialised
            and descended again, at most ``max_retries`` rounds; None disables.
        check_every: how often the descent's host-side "all stopped" check runs; default 1 on CPU
            (a host read costs nothing there) and the descent's own setting elsewhere.
        final_energy: None (default): compute the candidates' final energies only where something needs
            them (K > 1, recovery); True: always (``last_result.energy`` is then never None).
        cuda_graph: capture each act() (observation side, descent, selection) in a CUDA graph per input
            shape and replay it (CUDA observations, noise from the default CUDA generator; the descent's
            host-side "all stopped" check is off; without recovery and warm start, which decide on the host).
    """

    def __init__(self, energy, descent: Optional[Descent] = None, candidates: int = 1,
                 horizon: Optional[int] = None, n_action_steps: Optional[int] = None,
                 bounds: Optional[Tuple[BoundValue, BoundValue]] = None, *, action_dim: Optional[int] = None,
                 n_obs_steps: Optional[int] = None, window_start: Optional[int] = None, warm_start: bool = False,
                 recovery_threshold: Optional[float] = None, max_retries: int = 1,
                 check_every: Optional[int] = None, final_energy: Optional[bool] = None, cuda_graph: bool = False):
        if not all(callable(getattr(energy, n, None)) for n in ("prepare", "energy", "energy_and_grad")):
            raise TypeError("EnergyPolicy: energy must have prepare / energy / energy_and_grad (a pyebm energy); "
                            f"got {type(energy).__name__}")
        descent = Descent() if descent is None else descent
        if not isinstance(descent, Descent):
            raise TypeError(f"EnergyPolicy: descent must be a pyebm.Descent; got {type(descent).__name__}")
        self.energy = energy
        self.candidates = _int_arg("candidates", candidates, 1)
        self.flat = isinstance(energy, MLPEnergy)

        # chunk shape
        if self.flat:
            if horizon is None or action_dim is None:
                raise ValueError("EnergyPolicy: an MLPEnergy over a flattened chunk needs horizon and action_dim")
            horizon, action_dim = _int_arg("horizon", horizon, 1), _int_arg("action_dim", action_dim, 1)
            if horizon * action_dim != energy.candidate_dim:
                raise ValueError(f"EnergyPolicy: horizon * action_dim = {horizon} * {action_dim} must equal the "
                                 f"energy's candidate_dim = {energy.candidate_dim}")
        else:
            shape = getattr(energy, "event_shape", None)
            if shape is None or len(shape) != 2:
                raise ValueError("EnergyPolicy: the energy must declare event_shape = (horizon, action_dim), or be "
                                 "an MLPEnergy over the flattened chunk")
            if horizon is not None and horizon != shape[0]:
                raise ValueError(f"EnergyPolicy: horizon={horizon} but the energy's chunks have horizon {shape[0]}")
            if action_dim is not None and action_dim != shape[1]:
                raise ValueError(f"EnergyPolicy: action_dim={action_dim} but the energy's chunks have "
                                 f"action_dim {shape[1]}")
            horizon, action_dim = int(shape[0]), int(shape[1])
        self.horizon, self.action_dim = horizon, action_dim

        if n_obs_steps is None:
            n_obs_steps = getattr(energy, "n_obs_steps", 1)
        self.n_obs_steps = _int_arg("n_obs_steps", n_obs_steps, 1)
        if self.flat and energy.context_dim % self.n_obs_steps != 0:
            raise ValueError(f"EnergyPolicy: the energy's context_dim = {energy.context_dim} is not a multiple of "
                             f"n_obs_steps = {self.n_obs_steps}")
        start = self.n_obs_steps - 1 if window_start is None else _int_arg("window_start", window_start, 0)
        if n_action_steps is None:
            n_action_steps = horizon - start
        n_action_steps = _int_arg("n_action_steps", n_action_steps, 1)
        if start + n_action_steps > horizon:
            raise ValueError(f"EnergyPolicy: the executed window [{start}, {start + n_action_steps}) does not fit in "
                             f"horizon = {horizon} (window_start = {start}, n_action_steps = {n_action_steps})")
        self.window_start, self.n_action_steps = start, n_action_steps

        self.lower, self.upper = self._bounds(bounds)
        if self.lower is not None:
            ev_lo, ev_up = (self.lower.reshape(-1), self.upper.reshape(-1)) if self.flat else (self.lower, self.upper)
            descent = descent.replace(lower=ev_lo, upper=ev_up)
        self.descent = descent
        if not isinstance(warm_start, bool):
            raise TypeError(f"EnergyPolicy: warm_start must be True or False; got {warm_start!r}")
        self.warm_start = warm_start
        if recovery_threshold is not None:
            if isinstance(recovery_threshold, bool) or not isinstance(recovery_threshold, numbers.Real):
                raise TypeError(f"EnergyPolicy: recovery_threshold must be a number or None; got {recovery_threshold!r}")
            recovery_threshold = float(recovery_threshold)
        self.recovery_threshold = recovery_threshold
        self.max_retries = _int_arg("max_retries", max_retries, 0)
        self.check_every = None if check_every is None else _int_arg("check_every", check_every, 0)
        if final_energy not in (None, True):
            raise ValueError(f"EnergyPolicy: final_energy must be None or True; got {final_energy!r}")
        self.final_energy = final_energy
        if not isinstance(cuda_graph, bool):
            raise TypeError(f"EnergyPolicy: cuda_graph must be True or False; got {cuda_graph!r}")
        if cuda_graph and (self._recovers() or warm_start):
            raise ValueError("EnergyPolicy: cuda_graph=True captures one act(); recovery_threshold and warm_start "
                             "decide on the host between acts and rounds")
        self.cuda_graph = cuda_graph
        self._graphs: dict = {}
        self._device_bounds: dict = {}
        self.last_result: Optional[PolicyResult] = None
        self._previous: Optional[Tensor] = None

    # -- save_pretrained / from_pretrained (pyebm.pretrained) -----------------------------------
    _PRETRAINED_PARTS = ("energy",)

    def _pretrained_args(self) -> dict:
        """Everything but the energy as JSON values: the descent, the chunk shape, the bounds, the options."""
        bounds = None if self.lower is None else [_to_json_value(self.lower.tolist()),
                                                  _to_json_value(self.upper.tolist())]
        return dict(descent=self.descent.to_dict(), candidates=self.candidates, horizon=self.horizon,
                    action_dim=self.action_dim, n_obs_steps=self.n_obs_steps, n_action_steps=self.n_action_steps,
                    window_start=self.window_start, bounds=bounds, warm_start=self.warm_start,
                    recovery_threshold=_to_json_value(self.recovery_threshold), max_retries=self.max_retries,
                    check_every=self.check_every, final_energy=self.final_energy, cuda_graph=self.cuda_graph)

    @classmethod
    def _from_pretrained_args(cls, args: dict, parts: dict) -> "EnergyPolicy":
        descent = Descent.from_dict(args.pop("descent", {}))
        bounds = args.pop("bounds", None)
        if bounds is not None:
            if not isinstance(bounds, list) or len(bounds) != 2:
                raise ValueError(f"bounds must be a pair [low, high]; got {bounds!r}")
            bounds = tuple(torch.tensor(_from_json_value(b), dtype=torch.float64) for b in bounds)
        if "recovery_threshold" in args:
            args["recovery_threshold"] = _from_json_value(args["recovery_threshold"])
        return cls(parts["energy"], descent=descent, bounds=bounds, **args)

    # -- presets --------------------------------------------------------------------------------
    @classmethod
    def ebt_policy(cls, energy, alpha: float = 1000.0, temperature: float = 9.0, momentum: float = 0.9,
                   min_grad: float = 1e-3, max_steps: int = 20, noise: float = 0.0, candidates: int = 1,
                   n_action_steps: Optional[int] = None, coupled: bool = False, **kwargs) -> "EnergyPolicy":
        """The EBT-Policy loop: a0 ~ N(0, I); per step rms-normalise, Nesterov look-ahead, step
        alpha * exp(E) / temperature, stop when ||g|| <= min_grad after one final step, or after max_steps.
        ``coupled=True`` normalises and measures ||g|| over the whole batch, as the original does (then K = 1
        reproduces it exactly); the default treats every candidate on its own. ``n_action_steps`` defaults
        to the original's 8 (fewer when the chunk is too short)."""
        if n_action_steps is None:
            start = kwargs.get("window_start")
            start = getattr(energy, "n_obs_steps", 1) - 1 if start is None else start
            horizon = getattr(energy, "event_shape", (8 + start,))[0]
            n_action_steps = max(1, min(8, horizon - start))
        # the original clamps its step size at 1e-4 from below
        descent = Descent.ebt_policy(max_steps=max_steps, step_size=max(float(alpha), 1e-4), momentum=momentum,
                                     energy_temperature=temperature, min_grad=min_grad, noise=noise,
                                     coupled=coupled)
        return cls(energy, descent=descent, candidates=candidates, n_action_steps=n_action_steps, **kwargs)

    @classmethod
    def ibc(cls, energy: Optional[MLPEnergy] = None, *, action_dim: int, obs_dim: Optional[int] = None,
            horizon: int = 1, n_obs_steps: int = 2, n_action_steps: Optional[int] = None,
            bounds: Tuple[BoundValue, BoundValue] = (-1.0, 1.0), method: str = "langevin",
            candidates: Optional[int] = None, steps: Optional[int] = None, hidden: Sequence[int] = (256, 256, 256, 256),
            activation: str = "relu", window_start: int = 0, descent_options: Optional[dict] = None,
            **kwargs) -> "EnergyPolicy":
        """Implicit behavioural cloning: an MLPEnergy(residual=True) over concat(flattened observation
        history, flattened action chunk); ``method="langevin"`` (IBC's Langevin: polynomial step schedule,
        step clip, 512 candidates, 100 steps) or ``"dfo"`` (derivative-free: resample by softmax(-E),
        shrinking noise, 16384 candidates, 3 iterations). Candidates start uniform in ``bounds``; the
        executed window starts at ``window_start`` (0: the chunk starts at the current step).
        Sign: the original network outputs a logit (higher is better, its gradient is negated before
        the step); a pyebm energy is lower-is-better, so E = -logit (negate the head to load weights)."""
        if method not in ("langevin", "dfo"):
            raise ValueError(f"EnergyPolicy.ibc: method must be 'langevin' or 'dfo'; got {method!r}")
        if bounds is None:
            raise ValueError("EnergyPolicy.ibc: bounds are required (candidates start uniform in the box)")
        if energy is None:
            if obs_dim is None:
                raise ValueError("EnergyPolicy.ibc: give an energy or obs_dim to build one")
            energy = MLPEnergy(n_obs_steps * _int_arg("obs_dim", obs_dim, 1), horizon * action_dim,
                               hidden=hidden, activation=activation, residual=True)
        elif not isinstance(energy, MLPEnergy):
            raise TypeError(f"EnergyPolicy.ibc: energy must be a pyebm.MLPEnergy; got {type(energy).__name__}")
        opts = dict(descent_options or {})
        if steps is not None:
            opts["steps"] = steps
        # the box is set by the policy from ``bounds``; placeholders keep the preset's step clip consistent
        lo, up = cls._bound_pair(bounds, horizon, action_dim)
        lo_f, up_f = lo.reshape(-1), up.reshape(-1)
        if method == "langevin":
            descent = Descent.ibc_langevin(lower=lo_f, upper=up_f, **opts)
            K = 512 if candidates is None else candidates
        else:
            descent = Descent.ibc_dfo(lower=lo_f, upper=up_f, **opts)
            K = 16384 if candidates is None else candidates
        return cls(energy, descent=descent, candidates=K, horizon=horizon, action_dim=action_dim,
                   n_obs_steps=n_obs_steps, n_action_steps=n_action_steps, bounds=bounds,
                   window_start=window_start, **kwargs)

    # -- bounds ---------------------------------------------------------------------------------
    @staticmethod
    def _bound_pair(bounds, horizon: int, action_dim: int) -> Tuple[Tensor, Tensor]:
        if not isinstance(bounds, (tuple, list)) or len(bounds) != 2:
            raise ValueError(f"EnergyPolicy: bounds must be a pair (low, high); got {bounds!r}")
        out = []
        for name, b in zip(("low", "high"), bounds):
            try:
                t = torch.as_tensor(b, dtype=torch.float64)
            except (TypeError, ValueError, RuntimeError):
                raise TypeError(f"EnergyPolicy: bounds {name} must be a number or a tensor; got "
                                f"{type(b).__name__}") from None
            t = t.detach().cpu().to(torch.float64)
            if t.dim() == 0:
                t = t.expand(horizon, action_dim)
            elif tuple(t.shape) == (action_dim,):
                t = t.expand(horizon, action_dim)
            elif tuple(t.shape) != (horizon, action_dim):
                raise ValueError(f"EnergyPolicy: bounds {name} must be a number, [action_dim={action_dim}] or "
                                 f"[horizon={horizon}, action_dim={action_dim}]; got shape {list(t.shape)}")
            if torch.isnan(t).any():
                raise ValueError(f"EnergyPolicy: bounds {name} contains NaN")
            out.append(t.contiguous())
        if not bool((out[0] <= out[1]).all()):
            raise ValueError("EnergyPolicy: bounds low must be <= high everywhere")
        return out[0], out[1]

    def _bounds(self, bounds):
        if bounds is None:
            return None, None
        return self._bound_pair(bounds, self.horizon, self.action_dim)

    # -- observations ---------------------------------------------------------------------------
    def _context(self, obs: Tensor, check_finite: bool = True) -> Tensor:
        if not isinstance(obs, Tensor):
            raise TypeError(f"EnergyPolicy.act: obs must be a tensor; got {type(obs).__name__}")
        if not obs.is_floating_point():
            raise TypeError(f"EnergyPolicy.act: obs must be a floating tensor; got {obs.dtype}")
        if self.flat:
            cdim = self.energy.context_dim
            per_step = cdim // self.n_obs_steps
            ok = (obs.dim() == 2 and obs.shape[1] == cdim) or \
                 (obs.dim() == 3 and tuple(obs.shape[1:]) == (self.n_obs_steps, per_step))
            if not ok:
                raise ValueError(f"EnergyPolicy.act: obs must be [B, n_obs_steps={self.n_obs_steps}, obs_dim={per_step}] "
                                 f"or [B, {cdim}]; got shape {list(obs.shape)}")
            obs = obs.reshape(obs.shape[0], cdim)
        else:
            cond_dim = getattr(self.energy, "cond_dim", None)
            if obs.dim() != 3 or (cond_dim is not None and obs.shape[2] != cond_dim) \
                    or obs.shape[1] % self.n_obs_steps != 0:
                raise ValueError(f"EnergyPolicy.act: obs must be observation tokens [B, L, cond_dim={cond_dim}] with "
                                 f"L a multiple of n_obs_steps={self.n_obs_steps}; got shape {list(obs.shape)}")
        # one host read per act: a non-finite observation would poison every candidate of its row
        if check_finite and _rng.tracing():  # a traced graph checks on the device (no host read to trace)
            torch._assert_async(torch.isfinite(obs).all(), "EnergyPolicy.act: obs contains NaN or Inf")
        elif check_finite and not _all_finite(obs):
            bad = (~torch.isfinite(obs.reshape(obs.shape[0], -1))).any(dim=1).nonzero().flatten().tolist()
            raise ValueError(f"EnergyPolicy.act: obs contains NaN or Inf (batch rows {bad})")
        return obs

    def _event(self, t: Tensor) -> Tensor:
        """[..., horizon, A] -> the energy's candidate layout."""
        return t.reshape(t.shape[:-2] + (self.horizon * self.action_dim,)) if self.flat else t

    def _chunks(self, t: Tensor) -> Tensor:
        """The energy's candidate layout -> [..., horizon, A]."""
        return t.reshape(t.shape[:-1] + (self.horizon, self.action_dim)) if self.flat else t

    def _bounds_on(self, device, dtype) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        """(lower, upper) [horizon, A] on ``device`` in ``dtype``, copied there once (no host-to-device copy per
        act, which a CUDA graph could not capture)."""
        if self.lower is None:
            return None, None
        key = (str(device), dtype)
        hit = self._device_bounds.get(key)
        if hit is None:
            hit = (self.lower.to(device=device, dtype=dtype), self.upper.to(device=device, dtype=dtype))
            if not _rng.tracing():  # a traced call's copies are the graph's values, never kept
                self._device_bounds[key] = hit
        return hit

    def _fresh(self, B: int, cfg: Descent, generator, device, dtype) -> Tensor:
        """New candidates [B, K, horizon, A] drawn as the descent's own init would."""
        shape = (B, self.candidates, self.horizon, self.action_dim)
        lo, up = self._bounds_on(device, dtype)
        if cfg.init == "uniform":
            y = lo + (up - lo) * _rng.rand(shape, generator, device, dtype)
        elif cfg.init == "zeros":
            y = torch.zeros(shape, device=device, dtype=dtype)
        else:
            y = cfg.init_scale * _rng.randn(shape, generator, device, dtype)
        if cfg.init != "uniform" and lo is not None:
            y = torch.maximum(torch.minimum(y, up), lo)
        return y

    def _init_tensor(self, init: Tensor, B: int, device, dtype) -> Tensor:
        if not isinstance(init, Tensor) or not init.is_floating_point():
            raise TypeError(f"EnergyPolicy.act: init must be a floating tensor; got "
                            f"{init.dtype if isinstance(init, Tensor) else type(init).__name__}")
        T, A, K = self.horizon, self.action_dim, self.candidates
        if tuple(init.shape) == (B, T, A):
            init = init.unsqueeze(1).expand(B, K, T, A)
        elif tuple(init.shape) != (B, K, T, A):
            raise ValueError(f"EnergyPolicy.act: init must be [B, K, horizon, action_dim] = {[B, K, T, A]} or "
                             f"[B, horizon, action_dim] = {[B, T, A]}; got shape {list(init.shape)}")
        return init.to(device=device, dtype=dtype)

    def _config(self, device: torch.device) -> Descent:
        cfg = self.descent
        if cfg.tol > 0 and not _rng.tracing():  # a traced descent has no host-side check to set
            every = self.check_every if self.check_every is not None else (1 if device.type == "cpu" else None)
            if every is not None and every != cfg.check_every:
                # the edited copy is kept while the descent object and check_every stay the same
                cached = getattr(self, "_config_cache", None)
                if cached is None or cached[0] is not cfg or cached[1] != every:
                    cached = self._config_cache = (cfg, every, cfg.replace(check_every=every))
                cfg = cached[2]
        return cfg

    # -- acting ---------------------------------------------------------------------------------
    def _recovers(self) -> bool:
        return self.recovery_threshold is not None and self.max_retries > 0

    def reset(self) -> None:
        """Forget the previous chunk (warm start) and the last result: call at the start of an episode."""
        self._previous = None
        self.last_result = None

    def act(self, obs: Tensor, init: Optional[Tensor] = None,
            generator: Union[None, int, torch.Generator] = None, process_group=None) -> Tensor:
        """Actions [B, n_action_steps, action_dim] for observations ``obs``.

        obs: observation tokens [B, L, cond_dim] (EBTPolicy) or the observation history [B, n_obs_steps,
        obs_dim] / [B, context_dim] (MLPEnergy). init: candidates [B, K, horizon, A] or [B, horizon, A]
        (shared by the K candidates); default: drawn by the descent's init (plus the warm start).
        generator: a torch.Generator or an int seed for every random draw (in a traced call also a generator's
        state tensor, advanced in place: see ``pyebm._rng``).
        process_group: a ``torch.distributed.ProcessGroup``: the K candidates of each observation are split
        across its ranks (``pyebm.distributed``'s sharded descent; a collective call: every rank passes the
        same policy weights, observations and arguments). Every rank draws all K initial candidates from the
        generator (or takes ``init``), descends its shard, and the ranks all-gather each shard's best (score,
        energy, index) and its chunk per observation; the returned actions (the same on every rank) equal the
        one-process ``act`` with the same candidates and seed when the descent draws no noise (with noise, each
        rank has its own stream derived from the seed). Pass a seed: with ``generator=None`` the candidates the
        descent draws come from rank 0's seed, but a warm start's fresh ones from each rank's default generator.
        ``last_result.y``, ``energy``, ``steps``, ``status``, ``retries`` then hold this rank's candidates
        ``start:stop`` only (``last_result.descent`` is the ``pyebm.distributed.ShardedResult``);
        ``best_energy``, ``best_index`` and ``chunk`` are the whole selection. Refused on every rank:
        ``recovery_threshold`` (each rank would decide its own rounds), ``cuda_graph=True``, and descents that
        couple the K candidates (DFO, ``normalize="rms_all"``, ``tol_scope="all"``).

        With ``cuda_graph=True`` the whole act (observation side, descent, selection) is captured in a CUDA
        graph on the first call for each shape and replayed afterwards (see ``EnergyPolicy``).
        """
        if process_group is not None:
            return self._act_sharded(obs, init, generator, process_group)
        obs = self._context(obs)
        if _rng.tracing():
            self._check_traceable()
        if self.cuda_graph:
            return self._act_graphed(obs, init, generator)
        generator = as_generator(generator, obs.device, "EnergyPolicy.act")
        return self._act(obs, init, generator, self._config(obs.device))

    def _act_sharded(self, obs, init, generator, process_group) -> Tensor:
        """act(..., process_group=): this rank's checks; an error in them reaches every rank (``_act``)."""
        refusal = cfg = None
        try:
            obs = self._context(obs)
            if self.cuda_graph:
                raise ValueError("EnergyPolicy.act: process_group cannot be combined with cuda_graph=True (the "
                                 "sharded descent runs collectives between its steps)")
            if self._recovers():
                raise ValueError("EnergyPolicy.act: process_group cannot be combined with recovery_threshold (each "
                                 "rank would decide on its own host how many rounds to run); build the policy "
                                 "without it")
            generator = as_generator(generator, obs.device, "EnergyPolicy.act")
            cfg = self._config(obs.device)
        except Exception as exc:  # noqa: BLE001 -- raised on every rank by the sharded descent's agreement
            refusal = exc
        return self._act_sharded_descent(obs, init, generator, cfg, process_group, refusal)

    def _check_traceable(self) -> None:
        """What a traced act() (torch.compile, torch.export) cannot do: decide on the host between rounds
        (recovery), or keep state between the calls of an exported program (warm start)."""
        if self._recovers():
            raise ValueError("EnergyPolicy.act: recovery_threshold decides on the host how many rounds run, which "
                             "torch.compile / torch.export cannot trace; build the policy without it")
        if self.warm_start and _rng.exporting():
            raise ValueError("EnergyPolicy.act: warm_start keeps the chosen chunk between calls, which an exported "
                             "program cannot hold; export a policy with warm_start=False (or pass init)")

    def _prepare(self, obs: Tensor, init: Optional[Tensor], generator, cfg: Descent, share: bool = True):
        """(y0 or None, the energy minimize runs, its context) of an act on validated observations. ``share``:
        the observation side is computed here, once, for every descent round (recovery) to reuse; otherwise
        the energy itself goes to minimize, which prepares it (or runs the model's one-call descent)."""
        B, device, dtype = obs.shape[0], obs.device, obs.dtype
        T, A = self.horizon, self.action_dim
        y0 = None
        if init is not None:
            y0 = self._init_tensor(init, B, device, dtype)
        elif self.warm_start and self._previous is not None and self._previous.shape[0] == B \
                and self._previous.device == device and self._previous.dtype == dtype:
            y0 = self._fresh(B, cfg, generator, device, dtype)
            prev, n = self._previous, self.n_action_steps
            shifted = torch.cat([prev[:, n:], prev[:, -1:].expand(B, min(n, T), A)], dim=1)[:, :T]
            y0[:, 0] = shifted

        # the observation side is computed once and reused by every descent round
        if self.flat or not share:
            return y0, self.energy, obs
        return y0, _Prepared(self.energy, self.energy.prepare(obs)), obs

    def _act_sharded_descent(self, obs: Tensor, init: Optional[Tensor], generator, cfg: Optional[Descent],
                             process_group, refusal: Optional[BaseException]) -> Tensor:
        """The sharded act's descent (``pyebm.distributed``); an error of this rank's preparation (``refusal``,
        or one raised preparing here) is raised on every rank by the descent's agreement."""
        y0 = target = context = None
        if refusal is None:
            try:
                y0, target, context = self._prepare(obs, init, generator, cfg)
            except Exception as exc:  # noqa: BLE001
                refusal = exc
        res = _sharded_minimize(target, context, self.candidates, cfg, None if y0 is None else self._event(y0),
                                None, generator, False, None, None, None, process_group, where="EnergyPolicy.act",
                                group_arg="process_group", refusal=refusal, engine=SHARD_ENGINE)
        best = self._chunks(res.best)
        if self.lower is not None:
            lo, up = self._bounds_on(obs.device, obs.dtype)
            best = torch.maximum(torch.minimum(best, up), lo)
        s = self.window_start
        actions = best.narrow(1, s, self.n_action_steps)
        self.last_result = PolicyResult(actions=actions, chunk=best, y=self._chunks(res.y), energy=res.energy,
                                        best_energy=res.best_energy, best_index=res.best_index, steps=res.steps,
                                        status=res.status, retries=torch.zeros_like(res.steps), recovered=0,
                                        descent=res)
        self._previous = best
        return actions

    def _act(self, obs: Tensor, init: Optional[Tensor], generator, cfg: Descent) -> Tensor:
        """act() on validated observations with a given config; sets ``last_result``."""
        B, device = obs.shape[0], obs.device
        dtype = obs.dtype
        K = self.candidates
        y0, target, context = self._prepare(obs, init, generator, cfg, share=self._recovers())
        need_energy = K > 1 or self._recovers() or self.final_energy is True
        res = minimize(target, context, candidates=K, config=cfg,
                       init=None if y0 is None else self._event(y0), generator=generator, final_energy=need_energy)
        y, energy = self._chunks(res.y), res.energy
        steps, status = res.steps, res.status
        retries = torch.zeros(B, K, dtype=torch.int32, device=device)
        recovered = 0
        best_index, best = res.best_index, self._chunks(res.best)

        if self._recovers():
            changed = False
            for _ in range(self.max_retries):
                bad = ~(energy <= self.recovery_threshold)          # above the threshold, or NaN
                n_bad = int(bad.sum())                               # one host read per round
                if n_bad == 0:
                    break
                changed = True
                recovered += n_bad
                fresh = self._fresh(B, cfg, generator, device, dtype)
                again = minimize(target, context, candidates=K, config=cfg, init=self._event(fresh),
                                 generator=generator)
                sel = bad.view(B, K, 1, 1)
                y = torch.where(sel, self._chunks(again.y), y)
                energy = torch.where(bad, again.energy, energy)
                steps = steps + torch.where(bad, again.steps, torch.zeros_like(again.steps))
                status = torch.where(bad, again.status, status)
                retries = retries + bad.to(torch.int32)
            if changed:
                score = torch.where((status == NONFINITE) | ~torch.isfinite(energy),
                                    torch.full_like(energy, float("inf")), energy)
                best_index = score.argmin(dim=1)
                best = y[torch.arange(B, device=device), best_index]

        if self.lower is not None:
            lo, up = self._bounds_on(device, dtype)
            best = torch.maximum(torch.minimum(best, up), lo)
        s = self.window_start
        actions = best.narrow(1, s, self.n_action_steps)
        best_energy = None if energy is None else energy[torch.arange(B, device=device), best_index]
        result = PolicyResult(actions=actions, chunk=best, y=y, energy=energy, best_energy=best_energy,
                              best_index=best_index, steps=steps, status=status, retries=retries,
                              recovered=recovered, descent=res)
        if not _rng.exporting():  # an exported program's tensors are never kept by the policy
            self._previous = best
            self.last_result = result
        return actions

    # -- CUDA graphs -----------------------------------------------------------------------------
    def _act_graphed(self, obs: Tensor, init: Optional[Tensor], generator) -> Tensor:
        """act() captured in a CUDA graph per (observation shape, dtype, device, init shape), then replayed
        with the new inputs copied into the graph's own. The graph reads the energy's parameters at their
        addresses: in-place weight updates are read as they are, a parameter given new storage makes a
        new capture, and so does an in-place update of a weight the energy reads through a pack (a derived
        copy, ``pyebm._state``). Outputs (actions and ``last_result``) are copies, values of this call."""
        if obs.device.type != "cuda":
            raise ValueError(f"EnergyPolicy.act: cuda_graph=True needs CUDA observations; got them on {obs.device}")
        if generator is not None:
            raise ValueError("EnergyPolicy.act: cuda_graph=True draws from the default CUDA generator; pass "
                             "generator=None")
        if init is not None:
            init = self._init_tensor(init, obs.shape[0], obs.device, obs.dtype)

        def sig(t):
            return None if t is None else (tuple(t.shape), t.dtype, str(t.device))

        key = (sig(obs), sig(init))
        entry = self._graphs.get(key)
        if entry is not None and entry[0] is not None and (not entry[0].unchanged(versions=False)
                                                          or not _state.packs_current(self.energy)):
            entry = None  # a tensor the graph reads has new storage, or a pack it reads is stale: capture again
        if entry is None:
            entry = self._capture(obs, init)
            self._graphs[key] = entry
        _, graph, static_obs, static_init, out = entry
        static_obs.copy_(obs)
        if init is not None:
            static_init.copy_(init)
        graph.replay()
        result = self.last_result = _cloned(out)
        self._previous = result.chunk
        return result.actions

    def _capture(self, obs: Tensor, init: Optional[Tensor]):
        snap = None
        if isinstance(self.energy, torch.nn.Module):
            names = [n for n, _ in self.energy.named_parameters()] + [n for n, _ in self.energy.named_buffers()]
            snap = _state.Snapshot(self.energy, names)
        cfg = self._config(obs.device).replace(check_every=0)  # inside the graph the host never reads the device
        static_obs = obs.clone()
        static_init = None if init is None else init.clone()

        def run():
            self._act(static_obs, static_init, None, cfg)
            return self.last_result

        device = obs.device
        side = torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up: lazy initialisation, packs and device copies stay out of the graph
                run()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = run()
        return snap, graph, static_obs, static_init, out

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_graphs"] = {}  # captured graphs hold device memory of this process: never copied
        return state


def _cloned(result: PolicyResult) -> PolicyResult:
    """A PolicyResult whose tensors are copies (a replayed graph overwrites its outputs on the next replay)."""
    def c(v):
        return v.clone() if isinstance(v, Tensor) else v

    res = result.descent
    descent = DescentResult(**{f: c(getattr(res, f)) for f in res.__dataclass_fields__})
    return PolicyResult(**{f: (descent if f == "descent" else c(getattr(result, f)))
                           for f in result.__dataclass_fields__})
