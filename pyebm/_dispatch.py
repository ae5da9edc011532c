"""Which path runs a call: the one place that decides.

Every fast path has one predicate here that answers None ("yes, it can run this call") or the reason why
not. Models, the descent engine and the op wrappers ask these predicates; they never re-derive them, and
``pyebm.explain`` shows their answers to users ("why is my call slow").

Paths, fastest first:

minimize (``descent_route``)
    cuda graph      the per-step loop captured once and replayed (``cuda_graph=True``; CUDA tensors)
    one call        prepare + every step + selection in one compiled call (a model's ``run_one_call``;
                    MLPEnergy and EBTPolicy on the cpu backend in eager mode)
    whole loop      every step in one compiled op (a model's ``run_whole_loop``; see ``WholeLoopSpec``)
    compiled        a plain nn.Module f(x, y): chunks of steps (energy, input gradient, fused update) as one
                    torch.compile region each (``pyebm._compiled``; ``compiled_refusal``)
    per step        the model's fused ``energy_and_grad`` and the fused update op per step
    autograd        a plain ``f(x, y)`` energy: autograd on y per step, the fused update op
energy calls (``mlp_call``, ``ebt_policy_call``)
    plan            MLPEnergy's cpu plan: packed weights called through pybind11 without the dispatcher
    op              the registered ``torch.ops.pyebm.*`` op of the resolved backend (the path under
                    torch.compile, torch.jit.trace, torch.func transforms, dispatch modes and subclasses)
    torch           the plain PyTorch reference
EBT.think / EBT.generate (``ebt_attention``, ``ebt_rows_refusal``, ``ebt_think_graph_refusal``)
    cuda graph      one think step (descent + selection) captured per shape and replayed (``EBT(...,
                    cuda_graph=True)``; CUDA weights, the default CUDA generator)
    triton | torch  the prediction rows with the Triton kernels, or ATen ops
    rows_linear     on the cpu backend, float32: the products of a few rows by ``torch.ops.pyebm.rows_linear``
                    (``ebt_rows_refusal``; an extended context token's: ``ebt_context_rows``), and the steps
                    between those products (attention with RoPE, RMSNorm, SwiGLU) by the fused
                    ``torch.ops.pyebm.ebt_rows_*`` ops (``ebt_rows_steps``)
update step (``update_route``)
    fused           ``torch.ops.pyebm.descent_update`` (cpu / cuda) or ``descent_update_triton``
    torch           the same rule as separate torch ops

Backend availability (which backends exist on this machine, the ``PYEBM_BACKEND`` choice and its errors)
is ``pyebm._backend``; this module decides what runs given that.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from pyebm import _backend
from pyebm._state import ATTR as _PACKS_ATTR
from pyebm.protocol import WholeLoopSpec, has_whole_loop

ALL_BACKENDS = ("torch", "cpu", "triton", "cuda")

_is_compiling = torch.compiler.is_compiling
_tracing_state = torch._C._get_tracing_state
_functorch_level = torch._C._functorch.peek_interpreter_stack
try:
    from torch.utils._python_dispatch import _get_current_dispatch_mode as _dispatch_mode
except ImportError:  # pragma: no cover
    def _dispatch_mode():
        return None


# -- eager calls on plain tensors ----------------------------------------------------------------------

def eager_refusal(*tensors) -> Optional[str]:
    """None when a call runs eagerly on plain tensors, so a path that bypasses the dispatcher (a plan, a
    one-call descent) may take it; else why not. Under torch.compile, torch.jit.trace, a torch.func
    transform or a TorchDispatchMode, and for tensor subclasses, the registered ops run instead (they are
    traced, recorded, transformed and seen by the mode)."""
    if _is_compiling():
        return "under torch.compile (the registered ops are traced instead)"
    if _tracing_state() is not None:
        return "under torch.jit.trace (the registered ops are recorded instead)"
    if _functorch_level() is not None:
        return "inside a torch.func transform"
    if _dispatch_mode() is not None:
        return "a TorchDispatchMode is active"
    for t in tensors:
        if type(t) is not Tensor:
            return f"an input is a {type(t).__name__}, not a plain torch.Tensor"
    return None


def in_functorch_transform() -> bool:
    """True inside a torch.func transform (grad, vmap, jacrev, ...) run eagerly. Under torch.compile it is
    False: Dynamo does not model the interpreter stack (it reads as not empty), and the registered ops run."""
    return not _is_compiling() and _functorch_level() is not None


def functorch_call(energy_of, y: Tensor, need_grad: bool):
    """An energy call inside a torch.func transform: ``energy_of(y)`` (a model's differentiable reference, plain
    torch ops that every transform goes through) and, with ``need_grad``, its input gradient by
    ``torch.func.grad``, so that an outer transform (a gradient of the energy or of the gradient, vmap)
    differentiates the call instead of seeing the constant output of an inference op (the C++ autograd
    formulas of the ops do not run under torch.func)."""
    if not need_grad:
        return energy_of(y)

    def total(yy):
        E = energy_of(yy)
        return E.sum(), E

    G, E = torch.func.grad(total, has_aux=True)(y)
    return E, G


def check_not_traced(what: str) -> None:
    """Raise under torch.jit.trace for calls whose host-side control flow a trace cannot record."""
    if _tracing_state() is not None:
        raise RuntimeError(f"pyebm: {what} cannot be recorded by torch.jit.trace (its loop decides on the host); "
                           "trace the energy calls (energy, energy_and_grad), or use torch.compile / torch.export")


def model_backend(model, backend: Optional[str]) -> Optional[str]:
    return backend or getattr(model, "backend", None)


def resolve(device, backend: Optional[str], supported=ALL_BACKENDS) -> str:
    """The backend for tensors on ``device`` (``pyebm._backend.resolve``: availability and errors)."""
    return _backend.resolve(device, backend, supported)


# -- MLPEnergy energy calls --------------------------------------------------------------------------

MLP_BACKENDS = ALL_BACKENDS
PLAN_DTYPES = (torch.float32, torch.float64)


_HAS_PLAN = getattr(_backend.ext(), "MlpPlan", None) is not None


def plan_refusal(model, *tensors) -> Optional[str]:
    """None when MLPEnergy's cpu plan may take a call on ``tensors`` (eager mode, plain tensors, the model's
    weights float32/float64 on the CPU); else why not. The plan itself still hands back calls whose shapes or
    dtypes it does not take as they are (the op then raises the documented error or converts), and weights
    that became another dtype since it was made."""
    if not _HAS_PLAN:
        return f"the compiled extension is not available ({_backend.ext_info().get('why')})"
    why = eager_refusal(*tensors)
    if why is not None:
        return why
    if model.dtype not in PLAN_DTYPES or model.device.type != "cpu":
        return f"the plan takes float32/float64 CPU weights; the model's are {model.dtype} on {model.device}"
    return None


_NO_PACKS: Dict[object, object] = {}


def mlp_plan_lane(model, backend: Optional[str]):
    """MLPEnergy's cpu plan when an energy call may try it first, else None: the short lane of ``mlp_call``'s
    "plan" answer for the common call (no ``backend`` argument, not under torch.compile, the model's backend
    resolving to cpu, the plan already made). The plan then checks the rest of the predicate itself, in C++
    (plain tensors, no torch.jit.trace, torch.func transform or dispatch mode: ``eager_refusal``; CPU inputs
    of its dtype and shapes) and returns None when any of it fails; the caller then asks ``mlp_call``.
    ``prepare`` asks it too for the context term, and asks ``eager_refusal`` itself (the plan's ``context``
    checks only that x fits)."""
    if backend is not None or _is_compiling():
        return None
    plan = model.__dict__.get(_PACKS_ATTR, _NO_PACKS).get("cpu_plan")
    if plan is not None and _backend.resolves_to_cpu(model.backend):
        return plan
    return None


def mlp_call(model, ctx, y, backend: Optional[str]) -> str:
    """"plan" or the op backend ("cpu", "cuda", "triton", "torch") of an MLPEnergy energy call."""
    name = backend or model.backend
    if type(y) is Tensor and y.is_cpu and _backend.resolves_to_cpu(name):
        # the common case, in the order of its cost; the plan checks its weights' dtype itself
        if _HAS_PLAN and type(ctx) is Tensor and eager_refusal() is None:
            return "plan"
        return "cpu"
    device = y.device if isinstance(y, Tensor) else torch.device("cpu")
    return resolve(device, name, MLP_BACKENDS)


# -- EBT-Policy energy calls -------------------------------------------------------------------------

def _has_op(name: str) -> bool:
    return _backend.ext() is not None and hasattr(torch.ops.pyebm, name)


def ebt_policy_backends(name: Optional[str]) -> Tuple[str, ...]:
    supported = ("torch", "cpu") if _has_op("ebt_policy_energy_grad") else ("torch",)
    if (name or _backend.requested_backend()) == "triton":
        supported = supported + ("triton",)  # the Triton attention kernels: only when asked for by name
    return supported


def ebt_policy_call(model, y, backend: Optional[str], need_grad: bool) -> str:
    """"autograd" | "cpu" (the fused C++ op) | "triton" (PyTorch with the Triton attention kernels) |
    "torch" (batched PyTorch ops) for an EBTPolicy energy call on y."""
    if need_grad and model.grad_mode == "autograd":
        return "autograd"
    name = model_backend(model, backend)
    name = resolve(y.device, name, ebt_policy_backends(name))
    if name == "cpu":
        return "cpu" if y.dtype in PLAN_DTYPES else "torch"
    if name == "triton":
        return "triton" if y.dtype in (torch.float32, torch.bfloat16, torch.float16) else "torch"
    return "torch"


def ebt_policy_context_refusal(obs) -> Optional[str]:
    """None when ``EBTPolicy.prepare`` computes the observation side with the C++ op ``ebt_policy_context``."""
    if torch.is_grad_enabled():
        return "grad mode is on (training: the observation side stays in the autograd graph)"
    if obs.device.type != "cpu" or obs.dtype not in PLAN_DTYPES:
        return f"the C++ op takes float32/float64 CPU tokens; got {obs.dtype} on {obs.device}"
    if not _has_op("ebt_policy_context"):
        return "the compiled extension is not available"
    return None


# -- EBT --------------------------------------------------------------------------------------------

def ebt_attention(model, device) -> str:
    """"triton" (the Triton prediction-attention, RMSNorm and SwiGLU ops) or "torch" (ATen ops; also for
    the cpu backend) for EBT's cached prediction rows."""
    name = resolve(device, model.backend, ("torch", "cpu", "triton"))
    return "triton" if name == "triton" else "torch"


def ebt_rows_refusal(model, device, dtype) -> Optional[str]:
    """None when EBT's products of a few rows (the prediction rows of a descent step, an extended context
    token) run ``torch.ops.pyebm.rows_linear`` against packed weights and transposed copies of them (the
    input-gradient products); else why not (they then run as ATen matmuls)."""
    if torch.device(device).type != "cpu":
        return f"rows_linear is a CPU kernel; the model is on {device}"
    if dtype != torch.float32:
        return f"rows_linear streams float32 weights; the model is {dtype} (ATen's BLAS runs the products)"
    if not _has_op("rows_linear"):
        return f"the compiled extension is not available ({_backend.ext_info().get('why')})"
    if model.backward_mode != "manual":
        return "backward='autograd' (rows_linear has no autograd formula)"
    if resolve(device, model.backend, ("torch", "cpu", "triton")) != "cpu":
        return f"backend {model.backend!r} resolves to ATen ops"
    return None


def ebt_rows_steps(pack_rows: bool) -> bool:
    """Whether the steps of EBT's prediction rows between their products (the attention over the cache with
    RoPE, the RMSNorms, the SwiGLU gate, forward and backward) run the fused CPU ops
    ``torch.ops.pyebm.ebt_rows_*``: on a rows pack (``ebt_rows_refusal`` allowed it: CPU, float32, manual
    backward, cpu backend) of a build that has them. Otherwise they run as ATen ops."""
    return pack_rows and _has_cpu_kernel("ebt_rows_attention")


_CPU_KERNELS: Dict[str, bool] = {}


@torch.compiler.assume_constant_result  # a fact of the build: a traced call (fullgraph too) reads it as a constant
def _has_cpu_kernel(name: str) -> bool:
    """Whether ``pyebm::name`` has a CPU kernel in this build (a schema alone is not enough: kernels compiled
    only for some compilers register nothing elsewhere)."""
    got = _CPU_KERNELS.get(name)
    if got is None:
        got = _CPU_KERNELS[name] = _has_op(name) and torch._C._dispatch_has_kernel_for_dispatch_key(
            f"pyebm::{name}", "CPU")
    return got


# The most rows of EBT's context stream that go to rows_linear (one extended token per prompt and landscape).
EBT_CONTEXT_ROWS_MAX = 16


def ebt_context_rows(tokens: int, rows: int) -> bool:
    """Whether the products of EBT's context stream, ``rows`` entries of ``tokens`` new tokens each, go to
    rows_linear (on a pack that ``ebt_rows_refusal`` allowed): one extended token per prompt and landscape, at
    most ``EBT_CONTEXT_ROWS_MAX`` rows, never while traced (the check reads Python ints only, so it puts no
    guard on a traced batch size). A prompt's products go to ATen's BLAS."""
    return not _is_compiling() and tokens == 1 and rows <= EBT_CONTEXT_ROWS_MAX


def ebt_think_graph_refusal(device, generator, capture: bool = True) -> Optional[str]:
    """None when an ``EBT(..., cuda_graph=True)`` think step can be captured in a CUDA graph and replayed for
    a model on ``device`` with this call's ``generator``; else why not (the call then raises, naming it).
    ``capture=False``: the captured step's code run eagerly without a graph (tests on any device), which
    draws as the graph does: only the generator is checked."""
    if capture and torch.device(device).type != "cuda":
        return f"cuda_graph=True needs the model on a CUDA device; it is on {device}"
    if generator is not None:
        return ("generator: cuda_graph=True draws from the default CUDA generator (as minimize(..., "
                "cuda_graph=True) does); pass generator=None")
    if not capture:
        return None
    if _is_compiling():
        return ("cuda_graph=True cannot run under torch.compile / torch.export (compile with "
                "mode='reduce-overhead' for CUDA graphs there)")
    if torch.cuda.is_current_stream_capturing():
        return "cuda_graph=True cannot run inside another CUDA graph capture"
    return None


# -- the per-step update ------------------------------------------------------------------------------

_POST_NOISE = ("none", "langevin", "step", "additive")


def update_route(y, g, y_base, noise_mode, tol, tol_on, tol_scope, out, dry_run, finite_also, velocity, mask,
                 backend) -> Tuple[Optional[str], Optional[str]]:
    """(kind, None) with kind "cpu" / "cuda" (the C++ op) or "triton" for a fused update step, or (None, why
    the torch ops run instead)."""
    if backend == "torch":
        return None, "backend 'torch'"
    if out is not None or dry_run or finite_also is not None:
        return None, "a proposal step (accept_if_lower / Heun) runs as torch ops"
    if noise_mode not in _POST_NOISE:
        return None, f"noise mode {noise_mode!r}"
    # tol_scope "all" (the norm over every active row) equals the per-row test when there is one row
    if tol > 0 and (tol_on != "grad_norm" or (tol_scope != "candidate" and y.shape[0] != 1)):
        return None, "early exit on the energy change or over the whole batch"
    if not (y.is_contiguous() and g.is_contiguous()) or (velocity is not None and not velocity.is_contiguous()) \
            or (mask is not None and not mask.is_contiguous()):
        return None, "non-contiguous state"
    name = resolve(y.device, backend or _backend.requested_backend(), ALL_BACKENDS)
    if name in ("cpu", "cuda"):
        if not _has_op("descent_update"):
            return None, "the compiled extension is not available"
        if y.dtype not in PLAN_DTYPES:
            return None, f"the C++ update takes float32/float64; got {y.dtype}"
        if y_base is not None and (name != "cpu" or not y_base.is_contiguous()):
            return None, "a step from a moved state (normalisation, pre-noise) runs fused on the cpu only"
        return name, None
    if name == "triton":
        if y.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return None, f"the Triton update takes float32/bfloat16/float16; got {y.dtype}"
        try:
            from pyebm.ops import descent_triton  # noqa: F401  (defines torch.ops.pyebm.descent_update_triton)
        except ImportError as exc:
            return None, f"triton is not importable ({exc})"
        return "triton", None
    return None, "backend 'torch'"


# -- selection ----------------------------------------------------------------------------------------

_HAS_SELECT: List[bool] = []


def select_in_one_pass(selection: str, y: Tensor) -> bool:
    """Whether the best candidate is picked by the C++ op ``select_best`` (CPU tensors, deterministic rules)."""
    if not _HAS_SELECT:
        _HAS_SELECT.append(_backend.ext() is not None and hasattr(torch.ops.pyebm, "select_best"))
    return _HAS_SELECT[0] and selection != "sample" and y.device.type == "cpu"


# -- whole loop and one call ------------------------------------------------------------------------------

_CONFIG_REFUSALS: Dict[tuple, tuple] = {}


def whole_loop_config_refusal(cfg, spec: WholeLoopSpec, *, mask: bool, record: bool) -> Optional[str]:
    """None when the whole-loop op described by ``spec`` implements every option of ``cfg`` (remembered per
    config object, which the table holds so that its id is not reused, and spec; not while traced: Dynamo
    cannot take the id of every object it tracks)."""
    if _is_compiling():
        return _config_refusal(cfg, spec, mask, record)
    key = (id(cfg), id(spec), mask, record)
    hit = _CONFIG_REFUSALS.get(key)
    if hit is not None and hit[0] is cfg and hit[1] is spec:
        return hit[2]
    why = _config_refusal(cfg, spec, mask, record)
    if len(_CONFIG_REFUSALS) >= 512:
        _CONFIG_REFUSALS.clear()
    _CONFIG_REFUSALS[key] = (cfg, spec, why)
    return why


def _config_refusal(cfg, spec: WholeLoopSpec, mask: bool, record: bool) -> Optional[str]:
    if spec.unavailable is not None:
        return spec.unavailable
    if record:
        return "record=True or snapshots (the per-step path keeps states along the trajectory)"
    if cfg.method != "gd":
        return f"method {cfg.method!r}"
    if cfg.integrator != "euler":
        return f"integrator {cfg.integrator!r}"
    if cfg.project is not None:
        return f"project {cfg.project!r}"
    if cfg.accept_if_lower:
        return "accept_if_lower"
    if cfg.noise not in spec.noise:
        return f"noise {cfg.noise!r} (the op implements {', '.join(spec.noise)})"
    if cfg.normalize not in spec.normalize:
        return f"normalize {cfg.normalize!r}"
    if cfg.tol > 0:
        if cfg.tol_on != "grad_norm":
            return f"early exit on {cfg.tol_on!r}"
        if cfg.tol_scope not in spec.tol_scopes:
            return f"tol_scope {cfg.tol_scope!r}"
        if cfg.tol_scope == "all" and not spec.tol_all_with_clip and (
                cfg.grad_clip is not None or cfg.grad_clip_norm is not None):
            return "tol_scope 'all' with gradient clipping"
    if mask and not spec.mask:
        return "a clamped-coordinate mask"
    return None


def whole_loop_backend(model, cfg, *, device, dtype, mask: bool, record: bool, backend: Optional[str]
                       ) -> Tuple[Optional[str], Optional[str]]:
    """(backend, None) of a model's whole-loop op that runs this minimisation, or (None, why not)."""
    if not _hooks(model)[0]:
        return None, f"{type(model).__name__} has no whole-loop op"
    spec = model.whole_loop_spec(dtype)
    why = whole_loop_config_refusal(cfg, spec, mask=mask, record=record)
    if why is not None:
        return None, why
    name = resolve(device, model_backend(model, backend), ALL_BACKENDS)
    if name not in spec.backends:
        have = ", ".join(spec.backends) or "none"
        return None, f"backend {name!r} has no whole-loop op for {dtype} candidates (have: {have})"
    if name in ("cpu", "cuda") and torch.device(device).type != name:
        return None, f"backend {name!r} with candidates on {device}"
    if name == "triton" and _is_compiling():
        return None, "under torch.compile / torch.export (the triton loop's seed is read on the host)"
    return name, None


def _hooks(model) -> Tuple[bool, bool]:
    """(has a whole-loop op, has a one-call descent)."""
    whole = has_whole_loop(model)
    return whole, whole and callable(getattr(model, "run_one_call", None))


def one_call_refusal(model, cfg, *, context, init, mask, record, generator, backend) -> Optional[str]:
    """None when a model's ``run_one_call`` (prepare + every step + selection in one compiled call) runs
    this minimisation; else why not."""
    if not _hooks(model)[1]:
        return f"{type(model).__name__} has no one-call descent"
    if type(context) is not Tensor:
        return "the context is not a plain tensor"
    spec = model.whole_loop_spec(context.dtype)
    if not spec.one_call:
        return spec.unavailable or spec.one_call_why or f"no one-call descent for {context.dtype} contexts"
    if mask is not None:
        return "a clamped-coordinate mask (the one-call descent has none)"
    why = whole_loop_config_refusal(cfg, spec, mask=False, record=record)
    if why is not None:
        return why
    if cfg.selection == "sample":
        return "selection 'sample' (drawn on the host side)"
    if init is not None and type(init) is not Tensor:
        return f"init is a {type(init).__name__}, not a plain torch.Tensor"
    why = eager_refusal()
    if why is not None:
        return why
    name = backend or getattr(model, "backend", None)
    if not (context.is_cpu and _backend.resolves_to_cpu(name)):
        name = resolve(context.device, name, ALL_BACKENDS)
        if name not in spec.one_call:
            return f"backend {name!r}"
    if generator is not None and generator.device.type != "cpu":
        return "a generator on another device"
    return None


# -- minimize ----------------------------------------------------------------------------------------

@dataclass
class Route:
    """How ``minimize`` runs a call: ``kind`` ("cuda graph", "one call", "whole loop", "per step",
    "autograd"), the backend of its compiled part, and why each faster kind was refused."""

    kind: str
    backend: Optional[str] = None
    refused: Dict[str, str] = field(default_factory=dict)
    key: Optional[tuple] = None  # "compiled" (and an "autograd" call the automatic rule counts): the cache key


# -- the compiled path of plain modules ------------------------------------------------------------------

def compiled_refusal(energy, cfg, *, compile: Optional[bool], generic: bool, context, B: int, K: int, event,
                     device, dtype, mask: bool, record: bool) -> Tuple[Optional[str], Optional[tuple]]:
    """(None, key) when a plain nn.Module energy runs on the compiled path (``pyebm._compiled``), else (why not,
    key or None). ``compile``: True forces it (an error names what refuses), False never, None the automatic
    rule: compiled functions already cached for this call's shapes (the cost is paid) unless their calls were
    measured no faster than the eager ones (``_compiled_cache.does_not_pay``, CPU), or at least
    ``AUTO_MIN_STEPS`` steps and ``AUTO_AFTER_CALLS`` eager calls with these shapes before (a compile takes
    seconds: it pays only for shapes that repeat). The key is returned where the automatic rule counts the call."""
    from pyebm import _compiled_cache as _compiled

    if compile is False:
        return "compile=False", None
    if not generic:
        return f"{type(energy).__name__} has its own energy_and_grad (its fused paths run)", None
    if not isinstance(energy, torch.nn.Module):
        return "the energy is not an nn.Module (a plain function runs through autograd)", None
    if not (isinstance(context, Tensor) or isinstance(context, int)):
        return f"the context is a {type(context).__name__}, not a tensor or an int", None
    why = eager_refusal(context) if isinstance(context, Tensor) else eager_refusal()
    if why is None:
        why = _compiled.config_refusal(cfg, record)
    if why is None:
        why = _compiled.compiler_refusal(torch.device(device))
    if why is not None:
        return why, None
    key = _compiled.signature(energy, cfg, context, B, K, event, device, dtype, mask)
    if compile:
        return None, key
    if _compiled.cached(energy, key):  # compiled before: the cost is paid, unless the calls measured no gain
        return _compiled.does_not_pay(energy, key), key
    if cfg.steps < _compiled.AUTO_MIN_STEPS:
        return (f"{cfg.steps} steps (the automatic rule compiles from {_compiled.AUTO_MIN_STEPS} steps; "
                "compile=True forces it)"), None
    seen = _compiled.calls_seen(energy, key)
    if seen < _compiled.AUTO_AFTER_CALLS:
        return (f"the automatic rule compiles once shapes repeat: {seen} of {_compiled.AUTO_AFTER_CALLS} eager "
                "calls with these shapes and options so far (compile=True forces it)"), key
    return None, key


def descent_route(model, cfg, *, context, device, dtype, init, mask, record, generator, backend, whole_loop,
                  cuda_graph, generic: bool, energy=None, compile: Optional[bool] = None, B: int = 0, K: int = 1,
                  event=()) -> Route:
    """The route of a ``minimize`` call. ``generic``: the energy is a plain ``f(x, y)`` (autograd); ``energy``
    is then the user's object (the compiled path's module)."""
    refused: Dict[str, str] = {}
    if cuda_graph:
        if whole_loop:
            raise ValueError("minimize: cuda_graph=True captures the per-step path; whole_loop=True cannot be "
                             "combined with it")
        return Route("cuda graph", "cuda")
    refused["cuda graph"] = "not requested (cuda_graph=False)"
    if whole_loop is False:
        refused["one call"] = refused["whole loop"] = "whole_loop=False"
    else:
        why = one_call_refusal(model, cfg, context=context, init=init, mask=mask, record=record,
                               generator=generator, backend=backend)
        if why is None:
            return Route("one call", "cpu", refused)
        refused["one call"] = why
        name, why = whole_loop_backend(model, cfg, device=device, dtype=dtype, mask=mask is not None,
                                       record=record, backend=backend)
        if name is not None:
            return Route("whole loop", name, refused)
        refused["whole loop"] = why
        if whole_loop:
            raise ValueError(f"minimize: whole_loop=True but no whole-loop op runs this call: {why}")
    why, key = compiled_refusal(energy if generic else model, cfg, compile=compile, generic=generic,
                                context=context, B=B, K=K, event=event, device=device, dtype=dtype,
                                mask=mask is not None, record=record)
    if why is None:
        return Route("compiled", torch.device(device).type, refused, key)
    if compile:
        raise ValueError(f"minimize: compile=True but the compiled path cannot run this call: {why}")
    refused["compiled"] = why
    return Route("autograd" if generic else "per step", None, refused, key)
