"""MCMC samplers on discrete states driven by the energy's input gradient.

    res = pyebm.discrete.gibbs_with_gradients(energy, x, init=256, steps=200, generator=0)
    res = pyebm.discrete.dmala(energy, x, init=y0, steps=100, step_size=0.2)            # DMALA
    res = pyebm.discrete.dmala(energy, x, init=y0, steps=100, step_size=0.2, mh=False)  # DULA
    res.y [B, K, *event], res.energy [B, K], res.acceptance [B, K]

Both sample p(y | x) proportional to exp(-E(x, y) / temperature) (lower energy = more likely) over

- binary states y in {0, 1}^event, stored as a float tensor [B, K, *event] (K chains per context), or
- categorical states (``categorical=True``): one-hot vectors along the last dimension, [B, K, *sites, C].

Write f = -E / temperature (the log-probability up to a constant) and g = df/dy = -(dE/dy) / temperature.
Both samplers use the first-order (Taylor) estimate of how f changes when coordinates change:

- binary, flipping y_i:                   d_i  = (1 - 2 y_i) g_i
- categorical, moving site i to class c:  d_ic = g_ic - <y_i, g_i>    (0 for the current class)

Gibbs with gradients (Grathwohl, Swersky, Hashemi, Duvenaud, Maddison, ICML 2021, "Oops I took a
gradient"): propose one change, drawn from q(. | y) = softmax(d / 2) over all single flips (binary) or
all (site, other class) pairs (categorical: the current class of every site is excluded); y' is y with
that change. Accept with probability min(1, exp(f(y') - f(y)) q(reverse change | y') / q(change | y)),
where the reverse change (flip i again; move site i back to its old class) is scored by softmax(d' / 2)
from the energy gradient at y'.

Discrete Langevin (Zhang, Liu, Liu, ICML 2022, "A Langevin-like sampler for discrete distributions"):
every coordinate is proposed in parallel and independently, site i from
q_i(y'_i | y) proportional to exp(<g_i, y'_i - y_i> / 2 - ||y'_i - y_i||^2 / (2 alpha)), alpha = step_size:

- binary: flip y_i with probability sigmoid(d_i / 2 - 1 / (2 alpha));
- categorical: new class c of site i from softmax_c(d_ic / 2 - [c != current] / alpha)  (||e_c - e_k||^2 = 2).

DMALA (``mh=True``) accepts the joint proposal with probability
min(1, exp(f(y') - f(y)) q(y | y') / q(y' | y)), q(y | y') from the gradient at y'; DULA (``mh=False``) takes
every proposal (it samples an approximation of p that approaches it as alpha -> 0).

Cost: every step needs f and g at the proposed state: ONE batched ``energy_and_grad`` call over all B*K
chains (the fused op of an energy that has one, e.g. ``pyebm.MLPEnergy``). The current state's values are
kept from the step that accepted it, so a run of ``steps`` steps makes ``steps + 1`` calls in all. A plain
``f(x, y) -> E [B, K]`` (function or nn.Module) gets dE/dy from ``torch.autograd.grad`` with respect to
y only (parameters' ``.grad`` untouched). The energy is called with the states reshaped to its ``event_shape`` when it
declares one with as many elements (so a one-hot [L, C] state feeds an ``MLPEnergy(candidate_dim=L*C)``).

Everything runs on the states' device without host synchronisation inside the loop (input validation
reads the initial states once). Tests: ``tests/test_discrete_samplers.py`` (exact one-step transition
kernels and stationary distributions of small Ising, RBM, MLPEnergy and Potts models, by enumeration).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from pyebm.descent import as_generator
from pyebm.protocol import is_energy_model

__all__ = ["SampleResult", "gibbs_with_gradients", "dmala"]


@dataclass
class SampleResult:
    """The result of a discrete sampler run.

    y           [B, K, *event] the final states (floating point, entries 0 or 1: the energy's dtype when it
                declares one, else init's dtype, or the default dtype for bool / int init).
    energy      [B, K] E(x, y) at the final states.
    acceptance  [B, K] the mean Metropolis-Hastings acceptance probability min(1, ratio) over the steps
                (1 for DULA; NaN when steps == 0).
    accepted    [B, K] how many proposals each chain accepted (int64).
    trajectory  [steps + 1, B, K, *event] the states after every step (the initial states first), when
                ``record=True``; else None.
    """

    y: Tensor
    energy: Tensor
    acceptance: Tensor
    accepted: Tensor
    trajectory: Optional[Tensor] = None


# -- the energy ----------------------------------------------------------------------------------------------

class _FuncEnergy:
    """A plain ``f(x, y) -> E [B, K]`` as an energy model: dE/dy by ``torch.autograd.grad`` with respect to y
    only (nothing is computed for, or accumulated into, the parameters)."""

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
                raise ValueError("the energy f(x, y) must return a tensor E [B, K] that depends on y "
                                 f"differentiably; got {type(E).__name__}")
            (G,) = torch.autograd.grad(E.sum(), yy)
        return E.detach(), G


def _event_shape_of(energy) -> Optional[Tuple[int, ...]]:
    shape = getattr(energy, "event_shape", None)
    if isinstance(shape, (tuple, list, torch.Size)):
        return tuple(int(s) for s in shape)
    dim = getattr(energy, "candidate_dim", None)
    if isinstance(dim, numbers.Integral) and not isinstance(dim, bool):
        return (int(dim),)
    return None


def _dtype_device_of(model, context) -> Tuple[torch.dtype, torch.device]:
    dtype = getattr(model, "dtype", None)
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        device = getattr(model, "device", torch.device("cpu"))
        return dtype, torch.device(device)
    params = getattr(model, "parameters", None)
    if callable(params):
        for p in params():
            if p.is_floating_point():
                return p.dtype, p.device
    if isinstance(context, Tensor):
        return (context.dtype if context.is_floating_point() else torch.get_default_dtype()), context.device
    return torch.get_default_dtype(), torch.device("cpu")


class _Calls:
    """Batched energy_and_grad on the sampler's states, with shape checks on the first call."""

    def __init__(self, where: str, model, ctx, call_shape: Tuple[int, ...], state_shape: Tuple[int, ...],
                 temperature: float, kwargs):
        self.where, self.model, self.ctx, self.kwargs = where, model, ctx, kwargs
        self.call_shape, self.state_shape = call_shape, state_shape
        self.scale = -1.0 / temperature
        self.checked = False

    def __call__(self, y: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """(E [B, K], f = -E/T [B, K], g = df/dy shaped like y) at the states y."""
        E, G = self.model.energy_and_grad(self.ctx, y.reshape(self.call_shape), **self.kwargs)
        if not self.checked:
            bk = tuple(self.state_shape[:2])
            if not isinstance(E, Tensor) or tuple(E.shape) != bk:
                raise ValueError(f"{self.where}: the energy must return E [B, K] = {list(bk)}; got "
                                 f"{list(E.shape) if isinstance(E, Tensor) else type(E).__name__}")
            if not isinstance(G, Tensor) or G.numel() != y.numel():
                raise ValueError(f"{self.where}: energy_and_grad must return dE/dy shaped like y "
                                 f"{list(self.call_shape)}; got "
                                 f"{list(G.shape) if isinstance(G, Tensor) else type(G).__name__}")
            self.checked = True
        E = E.to(y.dtype)
        return E, E * self.scale, G.reshape(self.state_shape).to(y.dtype) * self.scale


# -- argument checks ------------------------------------------------------------------------------------------

def _check_int(where: str, name: str, value, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{where}: {name} must be an int; got {value!r}")
    if value < lo:
        raise ValueError(f"{where}: {name} must be an int >= {lo}; got {value!r}")
    return int(value)


def _check_positive(where: str, name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where}: {name} must be a positive number; got {value!r}")
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{where}: {name} must be a positive finite number; got {value!r}")
    return value


def _check_flag(where: str, name: str, value) -> bool:
    if value is not True and value is not False:
        raise TypeError(f"{where}: {name} must be True or False; got {value!r}")
    return value


def _batch_size(where: str, context, init) -> int:
    if isinstance(context, Tensor):
        if context.dim() < 1:
            raise ValueError(f"{where}: context must be a tensor [B, ...] or an int B; got a 0-d tensor")
        return context.shape[0]
    if isinstance(context, numbers.Integral) and not isinstance(context, bool):
        if context < 0:
            raise ValueError(f"{where}: context as a batch size must be >= 0; got {context}")
        return int(context)
    if isinstance(init, Tensor) and init.dim() >= 1:
        return init.shape[0]
    raise ValueError(f"{where}: cannot tell the batch size B; pass context as a tensor [B, ...] or an int, "
                     "or an init tensor [B, K, *event]")


@dataclass
class _Run:
    calls: _Calls
    y: Tensor                     # [B, K, N] binary or [B, K, N, C] one-hot (the flat working layout)
    shape: Tuple[int, ...]        # [B, K, *event] as given
    categorical: bool
    temperature: float
    generator: Optional[torch.Generator]
    record: bool


def _setup(where: str, energy, context, init, steps, categorical, event_shape, temperature, generator,
           record, backend) -> Tuple[_Run, int]:
    steps = _check_int(where, "steps", steps, 0)
    categorical = _check_flag(where, "categorical", categorical)
    record = _check_flag(where, "record", record)
    temperature = _check_positive(where, "temperature", temperature)
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"{where}: backend must be None or a backend name; got {backend!r}")
    if is_energy_model(energy):
        model = energy
    elif callable(energy):
        model = _FuncEnergy(energy)
    else:
        raise TypeError(f"{where}: energy must have prepare/energy/energy_and_grad (pyebm.protocol) or be "
                        f"callable as energy(x, y) -> E [B, K]; got {type(energy).__name__}")
    B = _batch_size(where, context, init)
    declared = _event_shape_of(energy)
    kind = "one-hot [B, K, *sites, C]" if categorical else "binary [B, K, *event]"

    if isinstance(init, Tensor):
        if event_shape is not None:
            raise ValueError(f"{where}: give event_shape only with init as a number of chains")
        min_dim = 4 if categorical else 3
        if init.dim() < min_dim or init.shape[0] != B:
            raise ValueError(f"{where}: init must be {kind} with B = {B} (and at least {min_dim} dims); got "
                             f"shape {list(init.shape)}")
        if init.is_complex():
            raise TypeError(f"{where}: init must be a real or bool tensor; got {init.dtype}")
        declared_dtype = getattr(model, "dtype", None)
        if init.is_floating_point() and not (isinstance(declared_dtype, torch.dtype)
                                             and declared_dtype.is_floating_point):
            y = init.detach().clone()
        else:                                     # bool / int states, or an energy that declares its dtype
            dtype, _ = _dtype_device_of(model, context)
            y = init.detach().to(dtype, copy=True)
        if not bool(((y == 0) | (y == 1)).all()):
            raise ValueError(f"{where}: init must hold 0/1 values only ({kind}); found other values")
        if categorical:
            if init.shape[-1] < 2:
                raise ValueError(f"{where}: categorical states need C >= 2 classes in the last dim; got "
                                 f"shape {list(init.shape)}")
            if not bool((y.sum(-1) == 1).all()):
                raise ValueError(f"{where}: init must be one-hot along its last dim (exactly one 1 per site)")
        shape = tuple(init.shape)
    elif isinstance(init, numbers.Integral) and not isinstance(init, bool):
        K = _check_int(where, "init (number of chains)", init, 1)
        if event_shape is None:
            event = declared
            if event is None:
                raise ValueError(f"{where}: cannot tell the state shape; pass event_shape (e.g. (L,) or, "
                                 "categorical, (L, C)) or an init tensor")
        else:
            if isinstance(event_shape, (str, bytes)) or not isinstance(event_shape, Sequence):
                raise TypeError(f"{where}: event_shape must be a sequence of ints; got {event_shape!r}")
            event = tuple(_check_int(where, "event_shape entries", s, 1) for s in event_shape)
        if len(event) < 1 or (categorical and event[-1] < 2):
            raise ValueError(f"{where}: event_shape must have at least one dim (categorical: the last is "
                             f"C >= 2); got {list(event)}")
        dtype, device = _dtype_device_of(model, context)
        shape = (B, K) + tuple(event)
        gen = as_generator(generator, device, where)
        if categorical:
            cls = torch.randint(event[-1], shape[:-1], generator=gen, device=device)
            y = F.one_hot(cls, event[-1]).to(dtype)
        else:
            y = torch.randint(2, shape, generator=gen, device=device).to(dtype)
        generator = gen
    else:
        raise TypeError(f"{where}: init must be a tensor ({kind}) or an int number of chains; got "
                        f"{type(init).__name__}")
    generator = as_generator(generator, y.device, where)

    event = shape[2:]
    numel = math.prod(event)
    call_shape = shape
    if declared is not None and tuple(declared) != tuple(event):
        if math.prod(declared) != numel:
            raise ValueError(f"{where}: the energy takes states of event_shape {list(declared)}; the states are "
                             f"{list(event)}")
        call_shape = (B, shape[1]) + tuple(declared)
    work = (B, shape[1], numel // event[-1], event[-1]) if categorical else (B, shape[1], numel)
    ctx = model.prepare(context)
    kwargs = {} if backend is None else {"backend": backend}
    calls = _Calls(where, model, ctx, call_shape, work, temperature, kwargs)
    return _Run(calls, y.reshape(work), shape, categorical, temperature, generator, record), steps


def _rand(like: Tensor, shape, generator) -> Tensor:
    return torch.rand(shape, generator=generator, device=like.device, dtype=like.dtype)


def _gumbel_argmax(logits: Tensor, generator) -> Tensor:
    """One draw from softmax(logits) over the last dim (Gumbel-max)."""
    u = _rand(logits, logits.shape, generator)
    return torch.argmax(logits - torch.log(-torch.log(u)), dim=-1)


def _flip_scores(y: Tensor, g: Tensor, categorical: bool) -> Tensor:
    """d: the first-order estimate of f(y with one change) - f(y) (see the module docstring)."""
    if categorical:
        return g - (y * g).sum(-1, keepdim=True)
    return (1 - 2 * y) * g


def _mh(log_ratio: Tensor, generator) -> Tuple[Tensor, Tensor]:
    """(accept [B, K] bool, min(1, ratio) [B, K]); a NaN ratio rejects."""
    log_ratio = torch.nan_to_num(log_ratio, nan=-math.inf)
    u = _rand(log_ratio, log_ratio.shape, generator)
    return torch.log(u) < log_ratio, torch.exp(log_ratio.clamp(max=0))


def _run(run: _Run, steps: int, propose) -> SampleResult:
    y = run.y
    B, K = y.shape[:2]
    E, f, g = run.calls(y)
    prob_sum = torch.zeros(B, K, dtype=y.dtype, device=y.device)
    accepted = torch.zeros(B, K, dtype=torch.int64, device=y.device)
    traj = [y.reshape(run.shape).clone()] if run.record else None
    for _ in range(steps):
        y_new, log_q_fwd, reverse = propose(y, g)
        E_new, f_new, g_new = run.calls(y_new)
        if reverse is None:                       # no correction (DULA)
            y, E, f, g = y_new, E_new, f_new, g_new
            prob_sum += 1
            accepted += 1
        else:
            acc, prob = _mh(f_new - f + reverse(y_new, g_new) - log_q_fwd, run.generator)
            prob_sum += prob
            accepted += acc
            a = acc.view(B, K, *([1] * (y.dim() - 2)))
            y = torch.where(a, y_new, y)
            g = torch.where(a, g_new, g)
            E = torch.where(acc, E_new, E)
            f = torch.where(acc, f_new, f)
        if traj is not None:
            traj.append(y.reshape(run.shape).clone())
    acceptance = prob_sum / steps if steps > 0 else torch.full_like(prob_sum, math.nan)
    return SampleResult(y.reshape(run.shape), E, acceptance, accepted,
                        torch.stack(traj) if traj is not None else None)


# -- Gibbs with gradients -------------------------------------------------------------------------------------

def _gwg_proposal(categorical: bool, generator):
    def log_q(y: Tensor, g: Tensor) -> Tensor:
        d = _flip_scores(y, g, categorical)
        if categorical:                           # the current class is not a move
            d = d.masked_fill(y > 0.5, -math.inf)
        return torch.log_softmax(d.flatten(2) / 2, dim=-1)         # [B, K, N] or [B, K, N*C]

    def propose(y: Tensor, g: Tensor):
        lq = log_q(y, g)
        idx = _gumbel_argmax(lq, generator)                         # [B, K]
        log_q_fwd = lq.gather(-1, idx[..., None]).squeeze(-1)
        flat = y.flatten(2)
        if categorical:
            C = y.shape[-1]
            site = torch.div(idx, C, rounding_mode="floor")
            old = y.argmax(-1).gather(-1, site[..., None]).squeeze(-1)   # the site's current class
            back = site * C + old                                       # the reverse move
            new_row = F.one_hot(idx - site * C, C).to(y.dtype)          # [B, K, C]
            y_new = y.clone()
            y_new.scatter_(2, site[..., None, None].expand(-1, -1, 1, C), new_row[:, :, None, :])
        else:
            back = idx
            y_new = flat.clone()
            cur = y_new.gather(-1, idx[..., None])
            y_new.scatter_(-1, idx[..., None], 1 - cur)
            y_new = y_new.view_as(y)

        def reverse(y_prop: Tensor, g_prop: Tensor) -> Tensor:
            return log_q(y_prop, g_prop).gather(-1, back[..., None]).squeeze(-1)

        return y_new, log_q_fwd, reverse

    return propose


def gibbs_with_gradients(energy: Any, context: Any, init: Union[Tensor, int], steps: int = 100, *,
                         categorical: bool = False, temperature: float = 1.0,
                         generator: Union[None, int, torch.Generator] = None, record: bool = False,
                         event_shape: Optional[Sequence[int]] = None,
                         backend: Optional[str] = None) -> SampleResult:
    """Sample p(y | x) proportional to exp(-E(x, y) / temperature) by Gibbs with gradients (one change per step).

    energy       an energy model (``prepare``/``energy``/``energy_and_grad``, e.g. ``pyebm.MLPEnergy``) or any
                 ``f(x, y) -> E [B, K]``.
    context      a tensor [B, ...] (passed to ``energy.prepare`` once), or an int B for context-free energies.
    init         the initial states: a tensor [B, K, *event] of 0/1 values (one-hot along the last dim when
                 ``categorical``), or an int K: K chains per context drawn uniformly at random (the state
                 shape from ``event_shape`` or the energy's ``event_shape``/``candidate_dim``).
    steps        number of Metropolis-Hastings steps (>= 0); each is one batched ``energy_and_grad`` call.
    categorical  False: binary states; True: one-hot states [B, K, *sites, C].
    temperature  T > 0 of the target exp(-E / T).
    generator    torch.Generator or int seed: all randomness comes from it (same seed, same result).
    record       keep the states after every step (``SampleResult.trajectory``).
    backend      passed to the energy's ``energy_and_grad`` when given.

    The proposal and its correction are in the module docstring. Returns a ``SampleResult``.
    """
    where = "gibbs_with_gradients"
    run, steps = _setup(where, energy, context, init, steps, categorical, event_shape, temperature, generator,
                        record, backend)
    return _run(run, steps, _gwg_proposal(run.categorical, run.generator))


# -- discrete Langevin (DMALA / DULA) -------------------------------------------------------------------------

def _langevin_proposal(categorical: bool, alpha: float, mh: bool, generator):
    def logits(y: Tensor, g: Tensor) -> Tensor:
        d = _flip_scores(y, g, categorical)
        if categorical:                           # [B, K, N, C]: class logits per site, 0 for the current
            return d / 2 - (1 - y) / alpha
        return d / 2 - 1 / (2 * alpha)           # [B, K, N]: flip logits

    def log_q(lg: Tensor, move: Tensor) -> Tensor:
        """log q of the move under the logits: binary, move = flip mask; categorical, move = one-hot target."""
        if categorical:
            return (torch.log_softmax(lg, dim=-1) * move).sum((-2, -1))
        return (move * F.logsigmoid(lg) + (1 - move) * F.logsigmoid(-lg)).sum(-1)

    def propose(y: Tensor, g: Tensor):
        lg = logits(y, g)
        if categorical:
            y_new = F.one_hot(_gumbel_argmax(lg, generator), y.shape[-1]).to(y.dtype)
            fwd_move, back_move = y_new, y
        else:
            flip = (_rand(lg, lg.shape, generator) < torch.sigmoid(lg)).to(y.dtype)
            y_new = y + flip * (1 - 2 * y)
            fwd_move = back_move = flip
        if not mh:
            return y_new, None, None

        def reverse(y_prop: Tensor, g_prop: Tensor) -> Tensor:
            return log_q(logits(y_prop, g_prop), back_move)

        return y_new, log_q(lg, fwd_move), reverse

    return propose


def dmala(energy: Any, context: Any, init: Union[Tensor, int], steps: int = 100, *, step_size: float = 0.2,
          mh: bool = True, categorical: bool = False, temperature: float = 1.0,
          generator: Union[None, int, torch.Generator] = None, record: bool = False,
          event_shape: Optional[Sequence[int]] = None, backend: Optional[str] = None) -> SampleResult:
    """Sample p(y | x) proportional to exp(-E(x, y) / temperature) by discrete Langevin: DMALA, or DULA with
    ``mh=False``. Every coordinate is proposed in parallel each step.

    step_size    alpha > 0: larger moves more coordinates per step (and accepts less often); tune it per
                 model (the papers use about 0.1 to 0.5 on binary models).
    mh           True: Metropolis-Hastings correction (DMALA, samples p exactly in the limit); False: take
                 every proposal (DULA, biased for alpha > 0).

    The other arguments are those of ``gibbs_with_gradients``; the proposal is in the module docstring.
    Returns a ``SampleResult``.
    """
    where = "dmala"
    alpha = _check_positive(where, "step_size", step_size)
    mh = _check_flag(where, "mh", mh)
    run, steps = _setup(where, energy, context, init, steps, categorical, event_shape, temperature, generator,
                        record, backend)
    return _run(run, steps, _langevin_proposal(run.categorical, alpha, mh, run.generator))
