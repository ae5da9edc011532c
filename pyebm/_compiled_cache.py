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


@dataclass
class EntryStats:
    """What one cache entry cost: compile seconds (the first call of each compiled function, minus nothing:
    tracing, Inductor and the first run together), and how many calls it served."""

    compile_seconds: float = 0.0
    compiles: int = 0
    calls: int = 0
    chunks: Tuple[int, ...] = ()


@dataclass
class _Entry:
    chunks: Dict[tuple, Any] = field(default_factory=dict)  # (length, k0 or None) -> compiled chunk
    energy: Any = None                                        # compiled final energy pass
    stats: EntryStats = field(default_factory=EntryStats)
    checked: bool = False


_LOCK = threading.Lock()
_ENTRIES: "weakref.WeakKeyDictionary[nn.Module, Dict[tuple, _Entry]]" = weakref.WeakKeyDictionary()
_SEEN: "weakref.WeakKeyDictionary[nn.Module, Dict[tuple, int]]" = weakref.WeakKeyDictionary()


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


def _constant_schedules(cfg) -> bool:
    step_const = cfg.step_schedule in ("constant", "energy")
    noise_const = cfg.noise == "none" or cfg.noise_schedule == "constant"
    return step_const and noise_const


def config_refusal(cfg, record: bool) -> Optional[str]:
    """None when the compiled chunk implements every option of ``cfg``; else why not."""
    if record:
        return "record=True (the trajectory is kept by the per-step path)"
    if cfg.method != "gd":
        return f"method {cfg.method!r}"
    if cfg.integrator != "euler":
        return f"integrator {cfg.integrator!r}"
    if cfg.accept_if_lower:
        return "accept_if_lower"
    if not _constant_schedules(cfg) and cfg.steps > MAX_CHUNK:
        return (f"a step or noise schedule over more than {MAX_CHUNK} steps (each chunk would bake in its own "
                "values and compile again)")
    return None


def chunk_lengths(steps: int) -> List[int]:
    """The chunk lengths that run ``steps`` steps: all of them at once up to MAX_CHUNK; else the largest divisor
    of ``steps`` up to MAX_CHUNK when it is at least half of that (one compile), else MAX_CHUNK-step chunks
    and the remainder (two compiles)."""
    if steps <= MAX_CHUNK:
        return [steps]
    best = max(d for d in range(1, MAX_CHUNK + 1) if steps % d == 0)
    if 2 * best >= MAX_CHUNK:
        return [best] * (steps // best)
    rest = steps % MAX_CHUNK
    return [MAX_CHUNK] * (steps // MAX_CHUNK) + ([rest] if rest else [])


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
        return 0 if table is None else table.get(sig, 0)


def note_call(module: nn.Module, sig: tuple) -> None:
    """Count an eager call of ``sig`` (the automatic rule compiles after AUTO_AFTER_CALLS of them)."""
    with _LOCK:
        table = _SEEN.get(module)
        if table is None:
            table = _SEEN[module] = {}
        if len(table) >= 256:
            table.clear()
        table[sig] = table.get(sig, 0) + 1


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
    lengths = chunk_lengths(cfg.steps)
    chunks = " + ".join(f"{n} x {length}" for length, n in _runs(lengths))
    with _LOCK:
        table = _ENTRIES.get(module)
        entry = None if table is None else table.get(sig)
    what = f"chunks of steps as torch.compile regions ({chunks} steps)"
    if entry is None or not entry.stats.compiles:
        return what + "; not compiled yet: the first call compiles (seconds), later calls with these shapes reuse it"
    st = entry.stats
    return what + f"; cached: {st.compiles} compiled functions, {st.compile_seconds:.1f} s to compile, {st.calls} calls"


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
