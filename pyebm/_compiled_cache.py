"""What the compiled path of plain nn.Module energies can run, and what it has compiled (``pyebm._compiled``).

The rules the dispatch table asks (``config_refusal``, ``compiler_refusal``, the automatic rule's counts) and
the cache of compiled functions: per module, held weakly (a ``WeakKeyDictionary``: never stored on the module,
so copies and pickles of it are unaffected, and an entry goes when its module does), keyed by ``signature``.
An entry holds compiled functions and their costs, nothing derived from the weights (the compiled functions
take the module as an argument and read its parameters at every call). No pyebm imports: the dispatch table
and the runner both use it.
"""
from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

MAX_CHUNK = 10        # steps per compiled region (longer unrolls cost compile time, not speed)
AUTO_MIN_STEPS = 4    # the automatic rule: fewer steps than this never pay for a compile
AUTO_AFTER_CALLS = 3  # the automatic rule: compile on the call after this many eager calls of one signature
PAY_CALLS = 3         # the automatic rule: compiled calls timed (after the one that compiled) before it decides
EAGER_TIMES = 8       # the automatic rule: eager call times kept per signature (the latest)


@dataclass
class EntryStats:
    """What one cache entry cost and what it gave: compile seconds (the first call of each compiled function,
    minus nothing: tracing, Inductor and the first run together), how many calls it served, and on the CPU
    whether compiling pays: the fastest wall time of PAY_CALLS compiled calls (those that compiled nothing)
    against the fastest of the eager calls of the same signature the automatic rule counted (the fastest: a
    first call's one-time costs and the host's load spikes drop out); ``pays`` None: not decided yet, or no
    eager call to compare with, or a CUDA entry, whose calls are asynchronous."""

    compile_seconds: float = 0.0
    compiles: int = 0
    calls: int = 0
    chunks: Tuple[int, ...] = ()
    seconds_per_call: Optional[float] = None
    eager_seconds_per_call: Optional[float] = None
    pays: Optional[bool] = None


@dataclass
class _Entry:
    chunks: Dict[tuple, Any] = field(default_factory=dict)  # (length, k0 or None) -> compiled chunk
    energy: Any = None                                        # compiled final energy pass
    stats: EntryStats = field(default_factory=EntryStats)
    checked: bool = False
    timed: List[float] = field(default_factory=list)         # wall seconds of compiled calls (CPU)


@dataclass
class _Seen:
    """The eager calls of one signature the automatic rule counted, and the latest wall times (CPU)."""

    calls: int = 0
    seconds: List[float] = field(default_factory=list)


_LOCK = threading.Lock()
_ENTRIES: "weakref.WeakKeyDictionary[nn.Module, Dict[tuple, _Entry]]" = weakref.WeakKeyDictionary()
_SEEN: "weakref.WeakKeyDictionary[nn.Module, Dict[tuple, _Seen]]" = weakref.WeakKeyDictionary()


# -- what the path can run ----------------------------------------------------------------------------

_COMPILER: List[Optional[str]] = []


def compiler_refusal(device: torch.device) -> Optional[str]:
    """None when torch.compile can build code for ``device`` here (Inductor on CPU needs a C++ compiler)."""
    if device.type == "cpu":
        if not _COMPILER:
            why = None
            try:
                from torch._inductor import cpp_builder

                cpp_builder.get_cpp_compiler()
            except Exception as exc:  # noqa: BLE001 (any failure means: no compiler)
                why = f"Inductor finds no C++ compiler ({exc})"
            _COMPILER.append(why)
        return _COMPILER[0]
    if device.type == "cuda":
        return None
    return f"Inductor is not used for {device.type} tensors here"


def scaled_noise(cfg) -> bool:
    """Whether a compiled chunk takes each step's noise factor as a tensor argument (the draws scaled in its
    graph and added as they are) instead of baking the noise level into its graph: for Heun (two factors a
    step) and for a noise schedule with a constant step size (one graph then serves every chunk)."""
    if cfg.noise == "none":
        return False
    return cfg.integrator == "heun" or (cfg.noise_schedule != "constant" and cfg.step_schedule == "constant")


def post_noise_mode(cfg) -> str:
    """The post-gradient noise mode a compiled chunk's update runs: "additive" where the chunk scales the draws
    itself (``scaled_noise``), else the config's ("none" for no noise or noise "pre")."""
    post = cfg.noise if cfg.noise in ("langevin", "step", "additive") else "none"
    return "additive" if post != "none" and scaled_noise(cfg) else post


def _constant_schedules(cfg) -> bool:
    """Whether one graph serves every chunk of the loop (nothing step-dependent is baked into it)."""
    step_const = cfg.step_schedule in ("constant", "energy")
    noise_const = cfg.noise == "none" or cfg.noise_schedule == "constant" or scaled_noise(cfg)
    return step_const and noise_const


def config_refusal(cfg, record: bool) -> Optional[str]:
    """None when the compiled chunk implements every option of ``cfg``; else why not."""
    if record:
        return "record=True (the trajectory is kept by the per-step path)"
    if cfg.method != "gd":
        return f"method {cfg.method!r}"
    if cfg.accept_if_lower:
        return "accept_if_lower"
    limit = chunk_limit(cfg)
    if not _constant_schedules(cfg) and cfg.steps > limit:
        return (f"a step-size schedule (or a noise schedule with step_schedule='energy') over more than {limit} "
                "steps (each chunk would bake in its own values and compile again)")
    return None


def chunk_limit(cfg) -> int:
    """The most steps one compiled chunk of ``cfg`` runs: MAX_CHUNK energy and gradient evaluations (Heun
    evaluates twice a step), so that a chunk's graph, and its compile time, stays the same size."""
    return max(1, MAX_CHUNK // 2) if cfg.integrator == "heun" else MAX_CHUNK


def chunk_lengths(steps: int, limit: int = MAX_CHUNK) -> List[int]:
    """The chunk lengths that run ``steps`` steps: all of them at once up to ``limit``; else the largest
    divisor of ``steps`` up to ``limit`` when it is at least half of that (one compile), else ``limit``-step
    chunks and the remainder (two compiles)."""
    if steps <= limit:
        return [steps]
    best = max(d for d in range(1, limit + 1) if steps % d == 0)
    if 2 * best >= limit:
        return [best] * (steps // best)
    rest = steps % limit
    return [limit] * (steps // limit) + ([rest] if rest else [])


def _tensor_sig(t) -> tuple:
    return (t.shape, t.dtype, t.device, t.requires_grad)  # torch.Size hashes and compares as the tuple


def signature(module: nn.Module, cfg, context, B: int, K: int, event, device, dtype, mask: bool) -> tuple:
    """The cache key of a call without the module itself (the table holds the module weakly)."""
    params = tuple((n, _tensor_sig(p)) for n, p in module.named_parameters())
    buffers = tuple((n, None if b is None else _tensor_sig(b)) for n, b in module.named_buffers())
    ctx = _tensor_sig(context)[:3] if isinstance(context, Tensor) else ("int", int(context))
    return (type(module), module.training, params, buffers, cfg, ctx, B, K, tuple(event), str(device), dtype, mask)


def calls_seen(module: nn.Module, sig: tuple) -> int:
    """How many calls of this signature ``minimize`` ran on the module before (the automatic rule's count)."""
    with _LOCK:
        table = _SEEN.get(module)
        seen = None if table is None else table.get(sig)
        return 0 if seen is None else seen.calls


def note_call(module: nn.Module, sig: tuple, seconds: Optional[float] = None) -> None:
    """Count an eager call of ``sig`` (the automatic rule compiles after AUTO_AFTER_CALLS of them) and keep its
    wall time ``seconds`` when measured (CPU calls), the eager side of whether compiling pays."""
    with _LOCK:
        table = _SEEN.get(module)
        if table is None:
            table = _SEEN[module] = {}
        if len(table) >= 256:
            table.clear()
        seen = table.get(sig)
        if seen is None:
            seen = table[sig] = _Seen()
        seen.calls += 1
        if seconds is not None:
            seen.seconds.append(float(seconds))
            del seen.seconds[:-EAGER_TIMES]


def note_compiled_call(module: nn.Module, sig: tuple, seconds: float) -> None:
    """Keep the wall time of a compiled call of ``sig`` that compiled nothing (CPU). At PAY_CALLS of them the
    entry's verdict is taken, once: compiling pays when the fastest compiled call is faster than the fastest
    eager call the automatic rule counted for the same signature (no verdict without eager calls)."""
    with _LOCK:
        table = _ENTRIES.get(module)
        hit = None if table is None else table.get(sig)
        if hit is None or len(hit.timed) >= PAY_CALLS:
            return
        hit.timed.append(float(seconds))
        if len(hit.timed) < PAY_CALLS:
            return
        st = hit.stats
        st.seconds_per_call = min(hit.timed)
        seen = _SEEN.get(module, {}).get(sig)
        if seen is not None and seen.seconds:
            st.eager_seconds_per_call = min(seen.seconds)
            st.pays = st.seconds_per_call < st.eager_seconds_per_call


def does_not_pay(module: nn.Module, sig: tuple) -> Optional[str]:
    """Why the automatic rule runs ``sig`` eagerly although it is compiled (the measured times), or None."""
    with _LOCK:
        table = _ENTRIES.get(module)
        hit = None if table is None else table.get(sig)
        if hit is None or hit.stats.pays is not False:
            return None
        st = hit.stats
    return (f"compiling does not pay for these shapes and options: {_ms(st.seconds_per_call)} per call compiled "
            f"against {_ms(st.eager_seconds_per_call)} eager (the fastest calls measured on this module; "
            "compile=True forces it)")


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms"


def cached(module: nn.Module, sig: tuple) -> bool:
    """Whether this signature has compiled functions for the module (a later call reuses them)."""
    with _LOCK:
        table = _ENTRIES.get(module)
        return table is not None and sig in table


def stats(module: nn.Module) -> Dict[tuple, EntryStats]:
    """The compiled entries of ``module`` (signature -> EntryStats): compile seconds, compiles, calls."""
    with _LOCK:
        table = _ENTRIES.get(module)
        return {} if table is None else dict((k, v.stats) for k, v in table.items())


def describe(module: nn.Module, sig: tuple) -> str:
    """The compiled path of a call in words: the chunks, and the compile cost so far or still to come."""
    cfg = sig[4]
    lengths = chunk_lengths(cfg.steps, chunk_limit(cfg))
    chunks = " + ".join(f"{n} x {length}" for length, n in _runs(lengths))
    with _LOCK:
        table = _ENTRIES.get(module)
        entry = None if table is None else table.get(sig)
    what = f"chunks of steps as torch.compile regions ({chunks} steps)"
    if entry is None or not entry.stats.compiles:
        return what + "; not compiled yet: the first call compiles (seconds), later calls with these shapes reuse it"
    st = entry.stats
    what += f"; cached: {st.compiles} compiled functions, {st.compile_seconds:.1f} s to compile, {st.calls} calls"
    if st.pays is not None:
        what += (f"; {_ms(st.seconds_per_call)} per call against {_ms(st.eager_seconds_per_call)} eager: "
                 + ("compiling pays" if st.pays else "compiling does not pay (the automatic rule runs it eagerly)"))
    return what


def _runs(lengths: List[int]) -> List[Tuple[int, int]]:
    out: List[Tuple[int, int]] = []
    for length in lengths:
        if out and out[-1][0] == length:
            out[-1] = (length, out[-1][1] + 1)
        else:
            out.append((length, 1))
    return out


def clear(module: Optional[nn.Module] = None) -> None:
    """Forget the compiled functions (and the automatic rule's counts) of ``module``, or of every module."""
    with _LOCK:
        if module is None:
            _ENTRIES.clear()
            _SEEN.clear()
        else:
            _ENTRIES.pop(module, None)
            _SEEN.pop(module, None)



def entry(module: nn.Module, sig: tuple) -> _Entry:
    """The cache entry of ``sig`` for ``module`` (made empty on first use)."""
    with _LOCK:
        table = _ENTRIES.get(module)
        if table is None:
            table = _ENTRIES[module] = {}
        hit = table.get(sig)
        if hit is None:
            hit = table[sig] = _Entry()
        return hit
