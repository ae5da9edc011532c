"""Batched multi-candidate descent: ``pyebm.minimize`` (the engine) and ``pyebm.DescentResult``.

    cfg = pyebm.Descent.ibc_langevin(lower=-1.0, upper=1.0, steps=50)
    res = pyebm.minimize(energy, x, candidates=256, config=cfg, generator=torch.Generator().manual_seed(0))
    res.best [B, *event], res.best_energy [B], res.y [B, K, *event], res.energy [B, K], res.steps [B, K]

The engine depends on the energy-model protocol only (``pyebm.protocol``); which path runs a call is
decided by ``pyebm._dispatch`` (``pyebm.explain`` shows it). The update rule is ``pyebm.Descent``
(``pyebm.config``), written out step by step in ``pyebm.reference.descent``; the fused part of a step is
``pyebm.ops.descent.descent_update``.
"""
from __future__ import annotations

import math
import numbers
import weakref
import time
from types import SimpleNamespace
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from pyebm import _dispatch, _rng, _state
from pyebm._sharded import _minimize as _sharded_minimize
from pyebm.config import (CONVERGED, INITS, INTEGRATORS, MAX_STEPS, METHODS, NOISE_MODES, NOISE_SCHEDULES,  # noqa: F401
                          NONFINITE, NORMALIZE, PROJECT, SELECTIONS, STATUS_NAMES, STEP_SCHEDULES, TOL_ON, TOL_SCOPE,
                          Descent, event_option)
from pyebm.config import DEFAULT as _DEFAULT_CONFIG
from pyebm.ops import descent as _ops
from pyebm.protocol import is_energy_model

if TYPE_CHECKING:
    from pyebm._sharded import ShardedResult


@dataclass
class DescentResult:
    """What ``minimize`` found. Every field is a value computed during the call.

    best [B, *event], best_energy [B], best_index [B]: the selected candidate of each context.
    y [B, K, *event], energy [B, K]: every candidate's final state and its energy (a final energy pass).
    With ``minimize(..., final_energy=False)`` and one candidate, where nothing is selected, that pass is
    skipped and ``energy`` / ``best_energy`` are None.
    initial_energy [B, K]: the energy at the first evaluation (``max_gap`` selection uses it).
    steps [B, K] int32: updates each candidate made. status [B, K] int8: MAX_STEPS (0, ran every step),
    CONVERGED (1, early exit), NONFINITE (2, its energy, gradient or step stopped being finite: it kept its
    last finite value).
    trajectory [steps + 1, B, K] (record=True): the energy evaluated at each step (carried forward once a
    candidate stopped), then the final energies. trajectory_y [steps + 1, B, K, *event]: the state before
    each step, then the final state.
    snapshots [S, B, K, *event] (``minimize(..., snapshots=[s_1, ...])``): the state after s_i steps, with
    what the end of a call applies (the final clamp when bounds apply once at the end, masked values), so for
    s_i >= 1 it equals ``y`` of the same call run with ``steps=s_i``; s_i = 0 is the initial state.
    """

    best: Tensor
    best_energy: Optional[Tensor]
    best_index: Tensor
    y: Tensor
    energy: Optional[Tensor]
    initial_energy: Tensor
    steps: Tensor
    status: Tensor
    trajectory: Optional[Tensor] = None
    trajectory_y: Optional[Tensor] = None
    snapshots: Optional[Tensor] = None

    MAX_STEPS = MAX_STEPS
    CONVERGED = CONVERGED
    NONFINITE = NONFINITE


# a pytree (its fields the children): torch.compile and torch.export return it from a traced call
torch.export.register_dataclass(DescentResult, serialized_type_name="pyebm.DescentResult")


# -- energies -------------------------------------------------------------------------------------

# The autograd engine's entry point, the call torch.autograd.grad makes after its Python argument handling
# (tuples, overrides, the shape checks of grad_outputs), which costs tens of microseconds a call after an energy's
# forward pass: as much as the update step. None where this torch has no such entry point.
_RUN_BACKWARD = getattr(getattr(torch.autograd.Variable, "_execution_engine", None), "run_backward", None)
_has_torch_function = torch.overrides.has_torch_function


def _input_grad(E: Tensor, y: Tensor) -> Optional[Tensor]:
    """d(sum E)/dy: the vector-Jacobian product of E with ones shaped like E (the gradient of ``E.sum()``
    without the sum and its backward), y the only input (the weights' gradients are neither computed nor
    accumulated), the graph freed. None when E does not depend on y. Plain tensors go to the autograd engine
    directly (the call torch.autograd.grad makes, same engine and numbers); tensor subclasses and torch
    function modes through torch.autograd.grad itself."""
    seed = torch.ones_like(E)
    if _RUN_BACKWARD is not None and not _has_torch_function((E, y)):
        # (outputs, grad_outputs, keep_graph, create_graph, inputs, allow_unreachable, accumulate_grad)
        return _RUN_BACKWARD((E,), (seed,), False, False, (y,), True, False)[0]
    return torch.autograd.grad(E, y, seed, allow_unused=True)[0]


class _ModuleEnergy:
    """Adapter for a plain ``f(x, y) -> E [B, K]``: prepare is the identity, gradients by autograd on y."""

    def __init__(self, fn):
        self.fn = fn

    def prepare(self, context):
        return context

    def energy(self, ctx, y, backend=None):
        with torch.no_grad():
            return self.fn(ctx, y)

    def energy_and_grad(self, ctx, y, backend=None):  # backend: the update's (the energy is the user's code)
        """E and dE/dy by ``_input_grad`` (autograd in y alone), with grad mode on for the call."""
        if not torch.is_grad_enabled():
            with torch.enable_grad():
                return self.energy_and_grad(ctx, y, backend)
        yy = y.detach().requires_grad_(True)
        E = self.fn(ctx, yy)
        if not isinstance(E, Tensor) or not E.requires_grad:
            raise ValueError("minimize: energy(x, y) must return a tensor that depends on y (differentiably)")
        G = _input_grad(E, yy)
        if G is None:
            raise ValueError("minimize: energy(x, y) must return a tensor that depends on y (differentiably); "
                             "it requires grad through other tensors only")
        return E.detach(), G


def _event_shape_of(energy) -> Optional[Tuple[int, ...]]:
    shape = getattr(energy, "event_shape", None)
    if type(shape) is tuple:
        return shape
    if shape is not None:
        return tuple(int(s) for s in shape)
    dim = getattr(energy, "candidate_dim", None)
    if isinstance(dim, int):
        return (dim,)
    return None


def _like_of(energy, context, init) -> Tuple[torch.device, torch.dtype]:
    if isinstance(init, Tensor):
        return init.device, init.dtype
    dtype = getattr(energy, "dtype", None)
    if isinstance(dtype, torch.dtype):
        device = getattr(energy, "device", "cpu")
        return (device if isinstance(device, torch.device) else torch.device(device)), dtype
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


# -- one call, validated --------------------------------------------------------------------------

@dataclass
class _Call:
    """A ``minimize`` call after validation: everything the runners need, and its route."""

    energy: Any
    model: Any
    context: Any
    cfg: Descent
    B: int
    K: int
    event: Tuple[int, ...]
    device: torch.device
    dtype: torch.dtype
    init_kind: str
    init: Optional[Tensor]          # [B, K, *event] on device/dtype (the caller's memory: copy before writing)
    mask: Optional[Tensor]          # [B, K, *event] bool
    generator: Optional[torch.Generator]
    lower: Optional[Tensor]
    upper: Optional[Tensor]
    step_clip: Optional[Tensor]
    record: bool
    backend: Optional[str]
    final_energy: bool
    route: _dispatch.Route
    # the call's own arguments, for the CUDA graph runner's captured calls
    raw_init: Any = None
    raw_mask: Any = None
    event_shape: Any = None
    snapshots: Optional[Tuple[int, ...]] = None   # step counts, strictly increasing, in [0, steps]


def as_generator(generator, device, where: str) -> "_rng.Generator":
    """A torch.Generator on ``device`` from a generator, an int seed or None; a generator on another kind of
    device is an error. While traced, an int seed is a ``pyebm._rng.TracedGenerator`` (same numbers)."""
    return _rng.as_generator(generator, device, where)


def _check_flag(name: str, value) -> bool:
    if value is not True and value is not False:
        raise TypeError(f"minimize: {name} must be True or False; got {value!r}")
    return value


def _batch_size(context, init_tensor) -> int:
    if isinstance(context, Tensor):
        if context.dim() < 1:
            raise ValueError("minimize: context must be a tensor [B, ...] (or an int B); got a 0-d tensor")
        return context.shape[0]
    if isinstance(context, numbers.Integral) and not isinstance(context, bool):
        if context < 0:
            raise ValueError(f"minimize: context as a batch size must be >= 0; got {context}")
        return int(context)
    if init_tensor is not None:
        return init_tensor.shape[0]
    if isinstance(context, (list, tuple)) or type(context).__module__ == "numpy":
        raise TypeError(f"minimize: context must be a tensor [B, ...] or an int B; got a {type(context).__name__} "
                        "(convert it with torch.as_tensor)")
    raise ValueError("minimize: cannot tell the batch size; pass context as a tensor [B, ...] or an int, "
                     "or an init tensor")


_PROTOCOL_TYPES: Dict[type, bool] = {}


def _as_model(energy) -> Tuple[Any, bool]:
    """(the energy model, whether it is a plain f(x, y) wrapped for autograd)."""
    t = type(energy)
    is_model = _PROTOCOL_TYPES.get(t)
    if is_model is None:
        is_model = _PROTOCOL_TYPES[t] = is_energy_model(energy)
    if is_model:
        return energy, False
    if not callable(energy):
        raise TypeError("minimize: energy must have prepare/energy/energy_and_grad or be callable as "
                        f"energy(x, y) -> E [B, K]; got {t.__name__}")
    return _ModuleEnergy(energy), True


def _check_options(cfg, candidates, record, cuda_graph, final_energy, whole_loop, backend) -> int:
    """The scalar options of a minimize call; returns K."""
    if type(cfg) is not Descent and not isinstance(cfg, Descent):
        raise TypeError(f"minimize: config must be a pyebm.Descent; got {type(cfg).__name__}")
    if type(candidates) is not int and (isinstance(candidates, bool) or not isinstance(candidates, numbers.Integral)):
        raise ValueError(f"minimize: candidates must be an int >= 1; got {candidates!r}")
    K = int(candidates)
    if K < 1:
        raise ValueError(f"minimize: candidates must be an int >= 1; got {candidates!r}")
    _check_flag("record", record)
    _check_flag("cuda_graph", cuda_graph)
    _check_flag("final_energy", final_energy)
    if whole_loop is not None and whole_loop is not True and whole_loop is not False:
        raise TypeError(f"minimize: whole_loop must be None, True or False; got {whole_loop!r}")
    if not final_energy and K != 1:
        raise ValueError(f"minimize: final_energy=False needs candidates=1 (selecting among {K} candidates needs "
                         "their final energies)")
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"minimize: backend must be a string or None; got {type(backend).__name__}")
    return K


def _snapshot_arg(snapshots, cfg: Descent) -> Optional[Tuple[int, ...]]:
    """minimize's ``snapshots`` as a tuple of step counts, strictly increasing, each in [0, config.steps]."""
    if snapshots is None:
        return None
    if isinstance(snapshots, (str, bytes)) or not hasattr(snapshots, "__iter__"):
        raise TypeError(f"minimize: snapshots must be a sequence of step counts (ints) or None; got "
                        f"{type(snapshots).__name__}")
    out = []
    for s in snapshots:
        if isinstance(s, Tensor) and s.dim() == 0 and not s.is_floating_point() and s.dtype != torch.bool:
            s = int(s)
        if isinstance(s, bool) or not isinstance(s, numbers.Integral):
            raise TypeError(f"minimize: snapshots must hold step counts (ints); got {s!r}")
        if not 0 <= s <= cfg.steps:
            raise ValueError(f"minimize: every snapshot must be a step count in [0, config.steps = {cfg.steps}]; "
                             f"got {int(s)}")
        if out and s <= out[-1]:
            raise ValueError(f"minimize: snapshots must be strictly increasing; got {list(snapshots)!r}")
        out.append(int(s))
    if not out:
        raise ValueError("minimize: snapshots must name at least one step count (or be None)")
    return tuple(out)


def _init_arg(init, cfg) -> Tuple[str, Optional[Tensor]]:
    """(init kind, init tensor or None) of minimize's ``init``."""
    if init is None:
        return cfg.init, None
    if isinstance(init, Tensor):
        if not init.is_floating_point():
            raise TypeError(f"minimize: init must be a floating tensor; got {init.dtype}")
        return cfg.init, init
    if isinstance(init, str):
        if init not in INITS:
            raise ValueError(f"minimize: init must be a tensor or one of {', '.join(map(repr, INITS))}; got {init!r}")
        if init == "uniform" and not cfg._finite_box():
            raise ValueError("minimize: init='uniform' needs finite config.lower and config.upper")
        return init, None
    raise TypeError(f"minimize: init must be a tensor, a string or None; got {type(init).__name__}")


def _candidate_tensors(init_tensor, mask, B, K, event, device, dtype):
    """(y0, mask) as [B, K, *event] tensors on the candidates' device (y0 in their dtype), or None."""
    y0 = None
    if init_tensor is not None:
        shape = init_tensor.shape
        if shape[0] != B:
            raise ValueError(f"minimize: init has {shape[0]} rows but the context has B = {B}")
        y0 = init_tensor.detach() if init_tensor.requires_grad else init_tensor
        if not (len(shape) == 2 + len(event) and shape[1] == K and tuple(shape[2:]) == event):
            y0 = _broadcast_candidate_tensor("init", y0, B, K, event, allow_event_only=False)
        if y0.dtype != dtype or not (y0.is_cpu and device.type == "cpu"):
            y0 = y0.to(device=device, dtype=dtype)
        if not y0.is_contiguous():
            y0 = y0.contiguous()
    mask_full = None
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"minimize: mask must be a bool tensor; got "
                            f"{mask.dtype if isinstance(mask, Tensor) else type(mask).__name__}")
        if init_tensor is None:
            raise ValueError("minimize: mask needs an init tensor holding the values of the clamped coordinates")
        mask_full = _broadcast_candidate_tensor("mask", mask, B, K, event, allow_event_only=True)
        mask_full = mask_full.to(device).contiguous()
    return y0, mask_full


def _plan_call(energy, context, candidates, config, init, mask, generator, record, backend, event_shape,
               whole_loop, cuda_graph, final_energy: bool = True, snapshots=None,
               compile: Optional[bool] = None) -> _Call:
    """Validate the arguments of ``minimize`` and route the call. Draws no random number, runs nothing."""
    cfg = _DEFAULT_CONFIG if config is None else config
    K = _check_options(cfg, candidates, record, cuda_graph, final_energy, whole_loop, backend)
    snaps = _snapshot_arg(snapshots, cfg)
    if compile is not None and compile is not True and compile is not False:
        raise TypeError(f"minimize: compile must be None, True or False; got {compile!r}")
    if compile and cuda_graph:
        raise ValueError("minimize: compile=True and cuda_graph=True are two ways to capture the loop; pick one")
    model, generic = _as_model(energy)
    init_kind, init_tensor = _init_arg(init, cfg)
    device, dtype = _like_of(energy, context, init_tensor)
    if not dtype.is_floating_point or dtype.is_complex:
        raise TypeError(f"minimize: candidates must be real floating point; the energy's parameters are {dtype}")
    B = _batch_size(context, init_tensor)
    event = tuple(int(s) for s in event_shape) if event_shape is not None else _event_shape_of(model)
    if event is None:
        if init_tensor is None or init_tensor.dim() < 3:
            raise ValueError("minimize: cannot tell the candidate shape of this energy; pass init=[B, K, ...] "
                             "or event_shape=(...)")
        event = tuple(init_tensor.shape[2:])
    y0, mask_full = _candidate_tensors(init_tensor, mask, B, K, event, device, dtype)
    generator = as_generator(generator, device, "minimize")
    lower = event_option("lower", cfg.lower, event, device, dtype)
    upper = event_option("upper", cfg.upper, event, device, dtype)
    step_clip = event_option("step_clip", cfg.step_clip, event, device, dtype)
    route = _dispatch.descent_route(model, cfg, context=context, device=device, dtype=dtype, init=init_tensor,
                                    mask=mask_full, record=record or snaps is not None, generator=generator,
                                    backend=backend, whole_loop=whole_loop, cuda_graph=cuda_graph, generic=generic,
                                    energy=energy, compile=compile, B=B, K=K, event=event)
    return _Call(energy, model, context, cfg, B, K, event, device, dtype, init_kind, y0, mask_full, generator,
                 lower, upper, step_clip, record, backend, final_energy, route, init, mask, event_shape, snaps)


# -- the engine -----------------------------------------------------------------------------------

def minimize(energy: Any, context: Any, candidates: int = 1, config: Optional[Descent] = None,
             init: Union[None, Tensor, str] = None, mask: Optional[Tensor] = None,
             generator: Union[None, int, torch.Generator] = None, record: bool = False,
             backend: Optional[str] = None, event_shape: Optional[Sequence[int]] = None,
             whole_loop: Optional[bool] = None, cuda_graph: bool = False,
             final_energy: bool = True, snapshots: Optional[Sequence[int]] = None,
             compile: Optional[bool] = None, process_group=None) -> DescentResult | ShardedResult:
    """Minimise ``energy`` over ``candidates`` (K) candidates per context, all contexts and candidates at once.

    energy     an energy model (``prepare(context)``, ``energy(ctx, y)``, ``energy_and_grad(ctx, y)``:
               MLPEnergy, pyebm models; see ``pyebm.protocol``) or any ``f(x, y) -> E [B, K]`` (an
               nn.Module or function: gradients by autograd on y).
    context    what the energy is conditioned on: a tensor [B, ...], or an int B for context-free energies.
               ``prepare`` runs once; every step reuses it. B = 0 gives empty results.
    config     a ``pyebm.Descent`` (default ``Descent()``: 10 plain gradient steps of size 0.1).
    init       a tensor [B, K, *event] (or [B, *event], shared by the K candidates), or "normal" /
               "uniform" / "zeros" (default ``config.init``).
    mask       bool, True where a coordinate is clamped to its init value (inpainting); [B, K, *event],
               [B, *event] or [*event]. Needs an init tensor.
    generator  torch.Generator or int seed: all noise comes from it (same seed, same result). In a call traced
               by torch.compile / torch.export also a generator's state tensor (``g.get_state()``): the
               numbers of ``g``, the state advanced in place (``pyebm._rng``).
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
               seen, and a parameter given new storage makes a new capture. Noise comes from the default
               CUDA generator (``generator`` must be None); the "all stopped" host check is off inside the
               graph (early exit still masks each candidate).
    final_energy  False (one candidate only): skip the final energy pass where nothing is selected;
               ``energy`` and ``best_energy`` of the result are then None.
    snapshots  step counts s_1 < s_2 < ... in [0, config.steps]: ``DescentResult.snapshots`` holds the state
               after each (what a call with ``steps=s_i`` returns as ``y``), from one trajectory; e.g. Energy
               Matching samples at several T = t_start + s_i dt. Runs the per-step path.
    compile    plain nn.Module energies f(x, y) only (``pyebm._compiled``): chunks of up to 10 steps (energy,
               input gradient by ``torch.func.grad_and_value``, the fused update) each compiled as one
               ``torch.compile`` region (Inductor; CUDA graphs on CUDA), cached per module and shapes (held
               weakly; parameters read at every call). None: automatic, for calls of at least 4 steps whose
               shapes and options already ran 3 times eagerly on this module (a compile takes seconds);
               True: compile now (an error when the config or the call is not supported); False: never.
    process_group  a ``torch.distributed.ProcessGroup`` (``torch.distributed.group.WORLD`` for all ranks):
               split the K candidates of each context across its ranks; a collective call, every rank passes
               the same arguments. Runs ``pyebm.distributed.minimize`` (see there: what is checked across
               ranks, which draws equal the one-process call) and returns its ``ShardedResult`` (best,
               best_energy, best_index as here, the same on every rank; y, energy, steps, status of this
               rank's candidates ``start:stop`` only). Refused, on every rank: ``cuda_graph=True``,
               ``snapshots``, ``final_energy=False`` (the ranks select by final energy), and configs that couple
               the K candidates (DFO, ``normalize="rms_all"``, ``tol_scope="all"``). None (default): this
               process alone.

    Which path runs (one compiled call, a whole-loop op, or the per-step path) is ``pyebm.explain(...)``
    with the same arguments. The per-step path never synchronises with the host inside the loop, except
    the "all stopped" check every ``config.check_every`` steps when ``config.tol > 0``.
    """
    _dispatch.check_not_traced("pyebm.minimize")
    if process_group is not None:
        return _sharded(energy, context, candidates, config, init, mask, generator, record, backend, event_shape,
                        whole_loop, cuda_graph, final_energy, snapshots, compile, process_group)
    if (mask is None and snapshots is None and event_shape is None and record is False and cuda_graph is False
            and (final_energy is True or (final_energy is False and candidates == 1))
            and (whole_loop is None or whole_loop is True) and (compile is None or compile is False)):
        res = _one_call_lane(energy, context, candidates, config, init, generator, backend, final_energy)
        if res is not None:
            return res
    call = _plan_call(energy, context, candidates, config, init, mask, generator, record, backend, event_shape,
                      whole_loop, cuda_graph, final_energy, snapshots, compile)
    if call.B == 0:
        return _empty_result(call)
    return _RUNNERS[call.route.kind](call)


def _sharded(energy, context, candidates, config, init, mask, generator, record, backend, event_shape, whole_loop,
             cuda_graph, final_energy, snapshots, compile, process_group):
    """``minimize(..., process_group=)``: ``pyebm.distributed``'s sharded descent, with the options it cannot
    take refused on every rank (through its agreement, so that no rank is left waiting)."""
    where = "minimize(process_group=...)"
    refusal = None
    if cuda_graph is not False:
        refusal = ValueError(f"{where}: cuda_graph=True captures one process's loop; the sharded descent runs "
                             "collectives between its steps (pass cuda_graph=False)")
    elif snapshots is not None:
        refusal = ValueError(f"{where}: snapshots are not collected across ranks (pass snapshots=None, or run "
                             "without process_group)")
    elif final_energy is not True:
        refusal = ValueError(f"{where}: final_energy=False skips the final energies, which the ranks compare to "
                             "select the best candidate (pass final_energy=True)")
    return _sharded_minimize(energy, context, candidates, config, init, mask, generator, record, backend,
                             event_shape, whole_loop, process_group, compile=compile, where=where,
                             group_arg="process_group", refusal=refusal, engine=SHARD_ENGINE)


def _one_call_lane(energy, context, candidates, config, init, generator, backend,
                   final_energy: bool = True) -> Optional[DescentResult]:
    """The "one call" route for its common arguments, without the general argument handling: a model with a
    one-call descent, a plain [B, ...] CPU context tensor with B > 0, and an init tensor [B, K, *event] of the
    context's dtype on the CPU, contiguous, not requiring grad, or no init with the "zeros" or "normal" init
    kind and no bounds. The route is decided by the same predicate as every call
    (``_dispatch.one_call_refusal``). None for anything else: ``minimize``'s general path then handles the
    call (and routes it the same way when it qualifies)."""
    cfg = _DEFAULT_CONFIG if config is None else config
    if type(cfg) is not Descent or type(candidates) is not int or candidates < 1 or type(context) is not Tensor \
            or not context.is_cpu or context.dim() < 1 or (backend is not None and type(backend) is not str):
        return None
    if _PROTOCOL_TYPES.get(type(energy)) is not True or not hasattr(energy, "run_one_call"):
        return None
    event = _event_shape_of(energy)
    B = context.shape[0]
    if event is None or B == 0:
        return None
    dtype = context.dtype
    if init is not None:
        if type(init) is not Tensor or init.dtype != dtype or not init.is_cpu or init.requires_grad \
                or init.shape[:2] != (B, candidates) or init.shape[2:] != event or not init.is_contiguous():
            return None
    elif cfg.init not in ("zeros", "normal") or cfg.lower is not None or cfg.upper is not None:
        return None
    seed = None
    if generator is not None and type(generator) is not torch.Generator:
        if type(generator) is not int:
            return None
        seed, generator = generator, None  # a CPU generator once the route is known (none is made for others)
    if _dispatch.one_call_refusal(energy, cfg, context=context, init=init, mask=None, record=False,
                                  generator=generator, backend=backend) is not None:
        return None
    if seed is not None:
        generator = as_generator(seed, context.device, "minimize")
    if init is None:
        init = initial(cfg.init, cfg, (B, candidates) + event, None, None, generator, context.device, dtype)
    y, E, E0, steps, status, best, best_E, idx = energy.run_one_call(context, cfg, y0=init, generator=generator,
                                                                     final_energy=final_energy)
    return DescentResult(best, best_E, idx, y, E, E0, steps, status)


def _empty_result(call: _Call) -> DescentResult:
    """The result of a call with no contexts (B = 0), the same on every path."""
    K, event, device, dtype = call.K, call.event, call.device, call.dtype
    energy = None if not call.final_energy else torch.empty(0, K, device=device, dtype=dtype)
    traj = traj_y = None
    if call.record:
        traj = torch.empty(call.cfg.steps + 1, 0, K, device=device, dtype=dtype)
        traj_y = torch.empty((call.cfg.steps + 1, 0, K) + event, device=device, dtype=dtype)
    return DescentResult(best=torch.empty((0,) + event, device=device, dtype=dtype),
                         best_energy=None if energy is None else energy[:, 0],
                         best_index=torch.empty(0, dtype=torch.long, device=device),
                         y=torch.empty((0, K) + event, device=device, dtype=dtype), energy=energy,
                         initial_energy=torch.empty(0, K, device=device, dtype=dtype),
                         steps=torch.empty(0, K, dtype=torch.int32, device=device),
                         status=torch.empty(0, K, dtype=torch.int8, device=device), trajectory=traj,
                         trajectory_y=traj_y,
                         snapshots=None if call.snapshots is None else
                         torch.empty((len(call.snapshots), 0, K) + event, device=device, dtype=dtype))


def _initial_candidates(call: _Call) -> Tensor:
    """y0 [B, K, *event]: the init tensor as given (the caller's memory), or drawn by the init kind."""
    if call.init is not None:
        return call.init
    return initial(call.init_kind, call.cfg, (call.B, call.K) + call.event, call.lower, call.upper, call.generator,
                   call.device, call.dtype)


def initial(kind: str, cfg: Descent, shape, lower, upper, generator, device, dtype) -> Tensor:
    """Fresh candidates drawn by an init kind: "zeros", "uniform" (within the bounds) or "normal"
    (init_scale * N(0, I)), clamped to the bounds."""
    if kind == "zeros":
        y = torch.zeros(shape, device=device, dtype=dtype)
    elif kind == "uniform":
        u = _rng.rand(shape, generator, device, dtype)
        y = lower + (upper - lower) * u
    else:
        y = _rng.randn(shape, generator, device, dtype)
        if cfg.init_scale != 1.0:
            y.mul_(cfg.init_scale)
    if kind != "uniform" and (lower is not None or upper is not None):
        y = y.clamp(lower, upper)
    return y.contiguous()


def _result(call: _Call, y, E_final, E_init, steps, status, best, best_E, idx, traj=None,
            snaps=None) -> DescentResult:
    if not call.final_energy:
        E_final = best_E = None
    traj_E, traj_y = traj if traj is not None else (None, None)
    return DescentResult(best=best, best_energy=best_E, best_index=idx, y=y, energy=E_final,
                         initial_energy=E_init, steps=steps, status=status, trajectory=traj_E, trajectory_y=traj_y,
                         snapshots=None if snaps is None else snaps[1])


def _run_one_call(call: _Call) -> DescentResult:
    """Prepare, every step and the selection in one compiled call of the model."""
    y0 = _initial_candidates(call)
    out = call.model.run_one_call(call.context, call.cfg, y0=y0, generator=call.generator,
                                  final_energy=call.final_energy)
    return _result(call, *out)


def _run_whole_loop(call: _Call) -> DescentResult:
    """Every step in the model's whole-loop op, then the selection."""
    out = whole_loop_and_selection(call.model, call.model.prepare(call.context), call.cfg, backend=call.route.backend,
                                   y0=_initial_candidates(call), mask=call.mask, lower=call.lower, upper=call.upper,
                                   step_clip=call.step_clip, generator=call.generator, final_energy=call.final_energy)
    return _result(call, *out)


def whole_loop_and_selection(model, ctx, cfg: Descent, *, backend: str, y0: Tensor, mask, lower, upper, step_clip,
                             generator, final_energy: bool):
    """A model's whole-loop op from a prepared context, then the selection: (y, E, E_init, steps, status, best,
    best_energy, best_index); with ``final_energy=False`` (one candidate) the op skips its final energy pass and
    E and best_energy are None."""
    y, E_final, E_init, steps, status = model.run_whole_loop(
        ctx, cfg, backend=backend, y0=y0, mask=mask, lower=lower, upper=upper, step_clip=step_clip,
        generator=generator, final_energy=final_energy)
    if not final_energy:  # one candidate: nothing to select
        return (y, None, E_init, steps, status, y[:, 0].clone(), None,
                torch.zeros(y.shape[0], dtype=torch.long, device=y.device))
    best, best_E, idx = _select_best(cfg, y, E_final, E_init, status, generator)
    return y, E_final, E_init, steps, status, best, best_E, idx


def _run_per_step(call: _Call) -> DescentResult:
    y0 = _initial_candidates(call)
    if y0 is call.init:
        y0 = y0.clone()  # the per-step path updates its state in place
    fixed = y0.clone() if call.mask is not None else None
    kwargs = {} if call.backend is None else {"backend": call.backend}
    calls = _EnergyCalls(call.model, call.model.prepare(call.context), kwargs, (call.B, call.K))
    if call.cfg.method == "dfo":
        return _run_dfo(call, calls, y0, fixed)
    return _GradientDescent(call, calls, y0, fixed).run()


# -- CUDA graphs ----------------------------------------------------------------------------------

# Captured graphs of energies that are not modules (plain functions), held weakly by the energy.
_FN_GRAPHS: "weakref.WeakKeyDictionary[Any, Dict[tuple, tuple]]" = weakref.WeakKeyDictionary()


def _graphs_of(energy) -> Dict[tuple, tuple]:
    if isinstance(energy, nn.Module):
        return _state.packs(energy).setdefault("cuda_graphs", {})
    return _FN_GRAPHS.setdefault(energy, {})


def _run_graphed(call: _Call) -> DescentResult:
    """``minimize(..., cuda_graph=True)``: capture once per (shapes, options) and energy, then replay.

    The graph lives with the energy (its packed state, or a weak table for plain functions), together with
    a snapshot of the module's parameters and buffers: a parameter given new storage (``.data =``, a moved
    module, a replaced tensor) makes a new capture, since the graph reads every tensor at its address; so
    does an in-place write to a weight the energy reads through a pack (``pyebm._state.packs_current``)."""
    context, init, mask, energy = call.context, call.raw_init, call.raw_mask, call.energy
    if not isinstance(context, Tensor) or context.device.type != "cuda":
        where = context.device if isinstance(context, Tensor) else type(context).__name__
        raise ValueError(f"minimize: cuda_graph=True needs the context as a CUDA tensor; got {where}")
    if call.generator is not None:
        raise ValueError("minimize: cuda_graph=True draws noise from the default CUDA generator; pass generator=None")
    if isinstance(init, Tensor) and init.device != context.device:
        raise ValueError(f"minimize: init is on {init.device} but the context is on {context.device}")

    def sig(t):
        return None if not isinstance(t, Tensor) else (tuple(t.shape), t.dtype, str(t.device))

    key = (sig(context), call.K, call.cfg, sig(init), init if isinstance(init, str) else None, sig(mask), call.record,
           call.backend, None if call.event_shape is None else tuple(call.event_shape), call.final_energy,
           call.snapshots)
    graphs = _graphs_of(energy)
    entry = graphs.get(key)
    if entry is not None and entry[0] is not None and (not entry[0].unchanged(versions=False)
                                                      or not _state.packs_current(energy)):
        entry = None  # a tensor the graph reads has new storage, or a pack it reads is stale: capture again
    if entry is None:
        snap = None
        if isinstance(energy, nn.Module):
            names = [n for n, _ in energy.named_parameters()] + [n for n, _ in energy.named_buffers()]
            snap = _state.Snapshot(energy, names)
        # Inside the graph the host never looks at the device: no "all stopped" check.
        cfg_g = call.cfg.replace(check_every=0)
        static_x = context.clone()
        static_init = init.clone() if isinstance(init, Tensor) else init
        static_mask = mask.clone() if isinstance(mask, Tensor) else mask

        def run():
            return minimize(energy, static_x, candidates=call.K, config=cfg_g, init=static_init, mask=static_mask,
                            record=call.record, backend=call.backend, event_shape=call.event_shape, whole_loop=False,
                            final_energy=call.final_energy, snapshots=call.snapshots, compile=False)

        side = torch.cuda.Stream(device=context.device)
        side.wait_stream(torch.cuda.current_stream(context.device))
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up: lazy initialisation and autotuning stay out of the graph
                run()
        torch.cuda.current_stream(context.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = run()
        entry = (snap, graph, static_x, static_init, static_mask, out)
        graphs[key] = entry
    _, graph, static_x, static_init, static_mask, out = entry
    static_x.copy_(context)
    if isinstance(init, Tensor):
        static_init.copy_(init)
    if isinstance(mask, Tensor):
        static_mask.copy_(mask)
    graph.replay()
    fields = {name: (getattr(out, name).clone() if isinstance(getattr(out, name), Tensor) else getattr(out, name))
              for name in ("best", "best_energy", "best_index", "y", "energy", "initial_energy", "steps", "status",
                           "trajectory", "trajectory_y", "snapshots")}
    return DescentResult(**fields)


# -- the per-step path ------------------------------------------------------------------------------

class _EnergyCalls:
    """Calls into the model with shape checks on the first call (host-side metadata only, no sync)."""

    def __init__(self, model, ctx, kwargs, bk):
        self.model, self.ctx, self.kwargs, self.bk = model, ctx, kwargs, tuple(bk)
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
    u = _rng.rand((E_final.shape[0], 1), generator, E_final.device, E_final.dtype)
    return _sample_index(probs, u)[:, 0]


def _select_best(cfg: Descent, y: Tensor, E_final: Tensor, E_init: Tensor, status: Tensor, generator):
    """(best [B, *event], best_energy [B], best_index [B]) by ``cfg.selection``: one C++ pass on CPU tensors
    for the deterministic rules (``_dispatch.select_in_one_pass``), else ``_select`` and two gathers."""
    if _dispatch.select_in_one_pass(cfg.selection, y):
        return torch.ops.pyebm.select_best.default(y, E_final, E_init, status, cfg.selection)
    idx = _select(cfg, E_final, E_init, status, generator)
    ar = torch.arange(y.shape[0], device=y.device)
    return y[ar, idx], E_final[ar, idx], idx


def _new_snapshots(call: _Call, y0: Tensor, fixed: Optional[Tensor]):
    """(step count -> row, the snapshot tensor [S, *y0.shape]) with the initial state taken, or None."""
    if call.snapshots is None:
        return None
    snaps = ({s: i for i, s in enumerate(call.snapshots)},
             torch.empty((len(call.snapshots),) + tuple(y0.shape), device=y0.device, dtype=y0.dtype))
    _take_snapshot(call, snaps, 0, y0, fixed, call.mask)
    return snaps


def _take_snapshot(call: _Call, snaps, done: int, y: Tensor, fixed, mask, through: bool = False) -> None:
    """Store y as the snapshot after ``done`` steps (``through``: as every later one too, after an early
    stop), with the end-of-call transforms applied to the copy."""
    if snaps is None:
        return
    rows = [i for s, i in snaps[0].items() if s == done or (through and s > done)]
    for i in rows:
        dst = snaps[1][i]
        dst.copy_(y)
        if not call.cfg.bound_each_step and (call.lower is not None or call.upper is not None):
            dst.clamp_(call.lower, call.upper)
        if mask is not None:
            torch.where(mask, fixed, dst, out=dst)


def _finish(call: _Call, calls: _EnergyCalls, y, E_init, steps, status, fixed, traj, snaps=None) -> DescentResult:
    cfg, (B, K) = call.cfg, calls.bk
    lower, upper, mask = call.lower, call.upper, call.mask
    if not cfg.bound_each_step and (lower is not None or upper is not None):
        y.clamp_(lower, upper)
        if mask is not None:
            torch.where(mask, fixed, y, out=y)
    status, steps = status.view(B, K), steps.view(B, K)
    if not call.final_energy:  # one candidate, nothing to select
        return _result(call, y, None, E_init, steps, status, y[:, 0].clone(), None,
                       torch.zeros(B, dtype=torch.long, device=y.device), traj, snaps)
    E_final = calls.energy(_ops.descent_pre(y, project=cfg.project))
    best, best_E, idx = _select_best(cfg, y, E_final, E_init, status, call.generator)
    if traj is not None:
        traj[0][-1] = E_final
        traj[1][-1] = y
    return _result(call, y, E_final, E_init, steps, status, best, best_E, idx, traj, snaps)


class _GradientDescent:
    """The per-step gradient path: the state of every row, one method per kind of step."""

    def __init__(self, call: _Call, calls: _EnergyCalls, y0: Tensor, fixed: Optional[Tensor]):
        cfg = self.cfg = call.cfg
        self.call, self.calls, self.fixed = call, calls, fixed
        B, K = calls.bk
        self.shape = y0.shape
        N, D = B * K, math.prod(y0.shape[2:])
        self.N, self.D = N, D
        device, dtype = y0.device, y0.dtype
        self.y = y0
        self.yf = y0.view(N, D)
        self.velocity = torch.zeros(N, D, device=device, dtype=dtype) if cfg.momentum > 0 else None
        self.active = torch.ones(N, dtype=torch.bool, device=device)
        self.steps = torch.zeros(N, dtype=torch.int32, device=device)
        self.status = torch.zeros(N, dtype=torch.int8, device=device)
        use_tol = cfg.tol > 0
        self.pending = torch.zeros(N, dtype=torch.bool, device=device) if (use_tol and cfg.tol_final_step) else None
        self.xi = torch.empty(self.shape, device=device, dtype=dtype) if cfg.noise != "none" else None
        self.xif = None if self.xi is None else self.xi.view(N, D)
        if cfg.accept_if_lower or cfg.integrator == "heun":
            self.y_prop = torch.empty_like(y0)
            self.y_propf = self.y_prop.view(N, D)
            self.v_prop = torch.empty_like(self.velocity) if self.velocity is not None else None
        self.post_mode = cfg.noise if cfg.noise in ("langevin", "step", "additive") else "none"
        # the host-side "all stopped" check; none in a traced graph (early exit still masks each candidate)
        self.check_every = cfg.check_every if use_tol and not _rng.tracing() else 0
        self.common = dict(backend=calls.kwargs.get("backend"), grad_scale=cfg.grad_scale, momentum=cfg.momentum,
                           energy_scaled=cfg.step_schedule == "energy", energy_temperature=cfg.energy_temperature,
                           tol=cfg.tol, tol_on=cfg.tol_on, tol_scope=cfg.tol_scope, tol_final_step=cfg.tol_final_step,
                           bound_each_step=cfg.bound_each_step,
                           fixed=None if fixed is None else fixed.view(N, D),
                           mask=None if call.mask is None else call.mask.view(N, D),
                           lower=None if call.lower is None else call.lower.reshape(D),
                           upper=None if call.upper is None else call.upper.reshape(D),
                           step_clip=self._step_clip(call))
        self.traj = None
        if call.record:
            self.traj = (torch.empty((cfg.steps + 1, B, K), device=device, dtype=dtype),
                         torch.empty((cfg.steps + 1,) + tuple(self.shape), device=device, dtype=dtype))
            self.traj[1][0] = y0
        self.snaps = _new_snapshots(call, y0, fixed)
        self.moves_before = cfg.normalize is not None or cfg.noise == "pre" or cfg.project is not None
        self.update = self._bound_update()

    def _bound_update(self) -> Optional[_ops.FusedUpdate]:
        """The fused update op bound to this descent's state when ``_dispatch.update_route`` gives the plain
        step to it (asked once per call: the state, its layout and the options are fixed for the call; the
        gradient is handed over contiguous, the base is a fresh tensor), else None (``descent_update`` runs)."""
        cfg, common = self.cfg, self.common
        if cfg.integrator == "heun" or cfg.accept_if_lower:
            return None
        kind, _ = _dispatch.update_route(self.yf, self.yf, self.yf if self.moves_before else None, self.post_mode,
                                         cfg.tol, cfg.tol_on, cfg.tol_scope, None, False, None, self.velocity,
                                         common["mask"], common["backend"])
        if kind is None:
            return None
        return _ops.FusedUpdate(kind, self.yf, self.active, self.steps, self.status, velocity=self.velocity,
                                pending=self.pending, noise=self.xif if self.post_mode != "none" else None,
                                noise_mode=self.post_mode, fixed=common["fixed"], mask=common["mask"],
                                lower=common["lower"], upper=common["upper"], step_clip=common["step_clip"],
                                grad_scale=cfg.grad_scale, momentum=cfg.momentum, grad_clip=cfg.grad_clip,
                                grad_clip_norm=cfg.grad_clip_norm, energy_scaled=common["energy_scaled"],
                                energy_temperature=cfg.energy_temperature, tol=cfg.tol,
                                tol_final_step=cfg.tol_final_step, bound_each_step=cfg.bound_each_step)

    def _step_clip(self, call: _Call):
        """The step clip as the update takes it: one number when every coordinate has the same (read from the
        config, not the device: a scalar clamp), else [D]."""
        if call.step_clip is None:
            return None
        values = torch.as_tensor(call.cfg.step_clip, dtype=torch.float64).flatten()
        if bool((values == values[0]).all()):
            return float(values[0])
        return call.step_clip.reshape(self.D)

    def run(self) -> DescentResult:
        cfg = self.cfg
        B, K = self.calls.bk
        E_prev = E_init = None
        k_done = 0
        for k in range(cfg.steps):
            running = self.active.view(B, K).clone() if self.traj is not None else None
            E = self.step(k, E_prev)
            if k == 0:
                E_init = E.clone()
            if self.traj is not None:
                self.traj[0][k] = E if k == 0 else torch.where(running, E, self.traj[0][k - 1])
                self.traj[1][k + 1] = self.y
            E_prev = E.reshape(self.N)
            k_done = k + 1
            if self.snaps is not None:
                _take_snapshot(self.call, self.snaps, k_done, self.y, self.fixed, self.call.mask)
            if self.check_every and k_done % self.check_every == 0 and k_done < cfg.steps \
                    and not bool(self.active.any()):
                break
        if self.traj is not None and k_done < cfg.steps:
            self.traj[0][k_done:cfg.steps] = self.traj[0][k_done - 1]
            self.traj[1][k_done + 1:] = self.y
        if k_done < cfg.steps:
            _take_snapshot(self.call, self.snaps, k_done, self.y, self.fixed, self.call.mask, through=True)
        return _finish(self.call, self.calls, self.y, E_init, self.steps, self.status, self.fixed, self.traj,
                       self.snaps)

    def step(self, k: int, E_prev: Optional[Tensor]) -> Tensor:
        """One step k; returns the energy at its evaluation point [B, K]."""
        cfg = self.cfg
        if self.xi is not None:
            _rng.normal_(self.xi, self.call.generator)
        n_k = cfg.noise_level_at(k)
        ys, base = self.y, None
        if self.moves_before:
            ys = _ops.descent_pre(self.y, normalize=cfg.normalize, normalize_eps=cfg.normalize_eps,
                                  noise=self.xi if cfg.noise == "pre" else None, noise_level=n_k,
                                  project=cfg.project, fixed=self.fixed, mask=self.call.mask)
            base = ys.reshape(self.N, self.D)
        q = torch.add(ys, self.velocity.view(self.shape), alpha=cfg.momentum) if cfg.nesterov else ys
        E, G = self.calls.grad(q)
        Ef, Gf = E.reshape(self.N), G.reshape(self.N, self.D)
        eta = cfg.step_size_at(k)
        if self.update is not None:
            self.update(Gf, Ef, eta, n_k, base)
        elif cfg.integrator == "heun":
            self._heun(k, Ef, Gf, base, eta, n_k)
        elif cfg.accept_if_lower:
            self._accept_if_lower(Ef, Gf, base, eta, n_k, E_prev)
        else:
            _ops.descent_update(self.yf, Gf, Ef, self.active, self.steps, self.status, eta=eta, y_base=base,
                                velocity=self.velocity, pending=self.pending, E_prev=E_prev,
                                noise=self.xif if self.post_mode != "none" else None, noise_mode=self.post_mode,
                                noise_level=n_k, grad_clip=cfg.grad_clip, grad_clip_norm=cfg.grad_clip_norm,
                                **self.common)
        return E

    def _heun(self, k, Ef, Gf, base, eta, n_k) -> None:
        """Predictor: an Euler step with the clipped g0 (no bookkeeping); corrector: the mean clipped gradient
        and the mean noise std, with the same xi."""
        cfg = self.cfg
        finite0 = _ops.finite_rows(Gf)
        _ops.clip_grad_(Gf, cfg.grad_clip, cfg.grad_clip_norm)
        s0 = _ops.noise_std(self.post_mode, eta, n_k)
        _ops.descent_update(self.yf, Gf, Ef, self.active, self.steps, self.status, eta=eta, y_base=base,
                            noise=self.xif, noise_mode="additive", noise_level=s0, out=self.y_propf, dry_run=True,
                            **self.common)
        E1, G1 = self.calls.grad(self.y_prop)
        G1f = G1.reshape(self.N, self.D)
        finite1 = _ops.finite_rows(G1f, E1.reshape(self.N)) & finite0
        _ops.clip_grad_(G1f, cfg.grad_clip, cfg.grad_clip_norm)
        Gf.add_(G1f).mul_(0.5)
        s = 0.5 * (s0 + _ops.noise_std(self.post_mode, eta, cfg.noise_level_at(k + 1)))
        _ops.descent_update(self.yf, Gf, Ef, self.active, self.steps, self.status, eta=eta, y_base=base,
                            noise=self.xif, noise_mode="additive", noise_level=s, finite_also=finite1, **self.common)

    def _accept_if_lower(self, Ef, Gf, base, eta, n_k, E_prev) -> None:
        """Propose a step, evaluate the proposal, keep it where the energy went down."""
        cfg = self.cfg
        move = _ops.descent_update(self.yf, Gf, Ef, self.active, self.steps, self.status, eta=eta, y_base=base,
                                   velocity=self.velocity, pending=self.pending, E_prev=E_prev,
                                   noise=self.xif if self.post_mode != "none" else None, noise_mode=self.post_mode,
                                   noise_level=n_k, grad_clip=cfg.grad_clip, grad_clip_norm=cfg.grad_clip_norm,
                                   out=self.y_propf, velocity_out=self.v_prop, **self.common)
        E_prop = self.calls.energy(_ops.descent_pre(self.y_prop, project=cfg.project))
        _ops.descent_accept(self.yf, self.y_propf, Ef, E_prop.reshape(self.N), move, y_base=base,
                            velocity=self.velocity, velocity_prop=self.v_prop)


def _run_dfo(call: _Call, calls: _EnergyCalls, y0: Tensor, fixed) -> DescentResult:
    cfg, (B, K) = call.cfg, calls.bk
    lower, upper, mask, generator = call.lower, call.upper, call.mask, call.generator
    device, dtype = y0.device, y0.dtype
    y = y0
    ar = torch.arange(B, device=device).unsqueeze(1)
    u = torch.empty(B, K, device=device, dtype=dtype)
    xi = torch.empty_like(y) if cfg.noise != "none" else None
    traj = None
    if call.record:
        traj = (torch.empty((cfg.steps + 1, B, K), device=device, dtype=dtype),
                torch.empty((cfg.steps + 1,) + tuple(y.shape), device=device, dtype=dtype))
        traj[1][0] = y
    snaps = _new_snapshots(call, y, fixed)
    E_init = None
    for k in range(cfg.steps):
        if k > 0 and xi is not None:
            _rng.normal_(xi, generator)
            torch.add(y, xi, alpha=cfg.noise_level_at(k - 1), out=y)  # not add_: see descent_pre
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
        _rng.uniform_(u, generator)
        idx = _sample_index(torch.softmax(logits, dim=1), u).sort(dim=1).values
        y = y[ar, idx]
        if mask is not None:
            fixed, mask = fixed[ar, idx], mask[ar, idx]
        if traj is not None:
            traj[0][k] = E
            traj[1][k + 1] = y
        _take_snapshot(call, snaps, k + 1, y, fixed, mask)
    if mask is not call.mask:
        call = _replace_mask(call, mask)
    steps = torch.full((B * K,), cfg.steps, dtype=torch.int32, device=device)
    status = torch.zeros(B * K, dtype=torch.int8, device=device)
    res = _finish(call, calls, y, E_init, steps, status, fixed, traj, snaps)
    if res.energy is not None:
        res.status.masked_fill_(~torch.isfinite(res.energy), NONFINITE)
    return res


def _replace_mask(call: _Call, mask: Tensor) -> _Call:
    from dataclasses import replace

    return replace(call, mask=mask)


def _run_compiled(call: _Call) -> DescentResult:
    """A plain nn.Module energy on the compiled path (``pyebm._compiled``): chunks of steps compiled, then
    the engine's own final pass and selection."""
    from pyebm import _compiled, _compiled_cache

    y0 = _initial_candidates(call)
    entry = _compiled_cache.entry(call.energy, call.route.key)
    if not entry.checked:  # the autograd adapter's checks (E [B, K], differentiable in y), once per entry
        _EnergyCalls(call.model, call.context, {}, (call.B, call.K)).grad(y0)
        entry.checked = True
    cfg = call.cfg
    probe = torch.empty(1, 1, device=call.device, dtype=call.dtype)
    moved = cfg.normalize is not None or cfg.noise == "pre" or cfg.project is not None
    update, _ = _dispatch.update_route(probe, probe, probe if moved else None,
                                       _compiled_cache.post_noise_mode(cfg), cfg.tol, cfg.tol_on,
                                       cfg.tol_scope, None, False, None, None, None, call.backend)

    def finish(calls, y, E_init, steps, status, fixed):
        return _finish(call, calls, y, E_init, steps, status, fixed, None)

    t0, compiles = time.perf_counter(), entry.stats.compiles
    res = _compiled.run(call, call.energy, call.route.key, y0=y0, update=update, finish=finish)
    if call.device.type == "cpu" and entry.stats.compiles == compiles:  # timed: whether compiling pays
        _compiled_cache.note_compiled_call(call.energy, call.route.key, time.perf_counter() - t0)
    return res


def _run_autograd(call: _Call) -> DescentResult:
    """A plain energy through autograd per step; counted for the compiled path's automatic rule (with its wall
    time on the CPU: the eager side of whether compiling pays; CUDA calls are asynchronous, not timed)."""
    if call.route.key is None:
        return _run_per_step(call)
    from pyebm import _compiled_cache

    t0 = time.perf_counter()
    res = _run_per_step(call)
    _compiled_cache.note_call(call.energy, call.route.key,
                              time.perf_counter() - t0 if call.device.type == "cpu" else None)
    return res


_RUNNERS = {"cuda graph": _run_graphed, "one call": _run_one_call, "whole loop": _run_whole_loop,
            "compiled": _run_compiled, "per step": _run_per_step, "autograd": _run_autograd}


# What the sharded descent (``pyebm._sharded``) runs on each rank: passed to it, not imported by it.
SHARD_ENGINE = SimpleNamespace(plan_call=_plan_call, initial=initial, minimize=minimize, DescentResult=DescentResult,
                               sample_index=_sample_index)
