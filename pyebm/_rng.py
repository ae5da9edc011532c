"""Random draws of pyebm's calls, eager and traced alike.

Every random number pyebm draws (initial candidates, per-step noise, sampled selection) goes through the
functions here. In eager mode they are the plain torch draws with the caller's ``torch.Generator``.

While a call is traced by ``torch.compile`` or ``torch.export``, draws go through the functional op
``torch.ops.pyebm.rng_draw``, which takes a generator's state as a tensor and returns the state after the
draws. The ``generator`` argument may then be

* an int seed (``generator=0``): a :class:`TracedGenerator` starting from the state of
  ``torch.Generator().manual_seed(seed)``. The traced call draws exactly the numbers of the eager call with that
  seed, in the same order, and the same numbers every time it runs.
* a generator's state tensor (``state = g.get_state()``, read outside the traced region, passed as an input
  of the compiled function or exported program): a :class:`TracedGenerator` starting from that state. The
  call draws exactly the numbers the eager call with ``g`` draws and writes the state after its draws back
  into the tensor, in place; so repeated calls draw fresh numbers, as repeated eager calls with ``g`` do, and
  ``g.set_state(state)`` afterwards leaves ``g`` where the eager calls would have left it. The state is that of
  a generator on the candidates' kind of device (5056 bytes for the CPU, 16 for CUDA). Eagerly a state tensor
  is refused (pass ``g`` itself: the same numbers).
* ``None``: torch's global generator, as eager code does (a compiled graph's draws may differ from eager ones
  unless ``torch._inductor.config.fallback_random = True``).
* a ``torch.Generator`` object: accepted, and used only if the call draws a random number; a draw then raises
  a RuntimeError that says to pass an int seed or the generator's state instead.

Why a ``torch.Generator`` object cannot drive a traced draw (torch 2.13): Dynamo (``torch.compile``, strict
``torch.export``) wraps a generator as an opaque Python object that cannot be an argument of any op in the
graph (``torch.randn(..., generator=g)`` fails with "Missing as_proxy()"), and every method that reads or
sets its state (``get_state``, ``graphsafe_get_state``, ``clone_state``, ``get_offset``, ``initial_seed``,
``set_state``, ``manual_seed``, ...) is a deliberate graph break (``torch._dynamo.trace_rules.
_GENERATOR_METHODS_THAT_GRAPH_BREAK``: "cannot be soundly traced"), so under ``fullgraph=True`` it is an
error. Non-strict ``torch.export`` traces without Dynamo, but lifts the generator seen at export time into the
program as a constant: the program would draw from (and advance) that object, whatever generator is passed
when it runs, the argument being an unused input. The graph-safe generator states that CUDA graphs register
(``graphsafe_get_state``) exist for the device's default generators only. Reading the state outside the
traced region and passing it in as a tensor, as above, is what remains.
"""
from __future__ import annotations

import numbers
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from pyebm.ops import rng_draw as _rng_draw_op  # noqa: F401  (defines torch.ops.pyebm.rng_draw)


def tracing() -> bool:
    """True while torch.compile or torch.export (strict or not) traces the call."""
    return torch.compiler.is_compiling()


def exporting() -> bool:
    """True while torch.export traces the call (strict or not), not while torch.compile does.

    Reads the flag behind ``torch.compiler.is_exporting()``: Dynamo in torch 2.11 and earlier answers that
    call with True under every trace, torch.compile's too (torch 2.13 reads the flag)."""
    flag = getattr(torch.compiler, "_is_exporting_flag", None)
    if isinstance(flag, bool):
        return flag
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return bool(is_exporting is not None and is_exporting())


class TracedGenerator:
    """The generator of a traced call: its state is a tensor that each draw replaces. It starts from the state
    of an int seed, or from a caller's state tensor (``target``), which each draw then overwrites in place with
    the new state."""

    def __init__(self, seed: int, device: torch.device, target: Optional[Tensor] = None):
        self.seed = int(seed)
        self.device = torch.device(device)
        self.target = target
        self.state: Optional[Tensor] = target  # None: the seed's initial state (the first draw seeds)

    def draw(self, kind: str, shape: Sequence[int], count: int, dtype: torch.dtype) -> Tensor:
        """[count, *shape]: ``count`` draws of ``shape`` one after the other."""
        out, self.state = torch.ops.pyebm.rng_draw(self.state, self.seed, kind, list(shape), count,
                                                   _rng_draw_op.dtype_name(dtype), self.device)
        if self.target is not None:  # the caller's state advances as its generator's would
            self.target.copy_(self.state)
        return out


class RowGenerators:
    """One generator per row of the leading (batch) dimension: row b of a draw of shape [B, ...] is the draw of
    shape [1, ...] from ``generators[b]`` (None: torch's global generator), so that every row draws exactly
    the numbers a call on that row alone with its generator draws, whatever the other rows are. Eager calls
    only (``row_generators`` refuses them while traced)."""

    def __init__(self, generators: Sequence[Optional[torch.Generator]]):
        self.generators = tuple(generators)

    def __len__(self) -> int:
        return len(self.generators)


Generator = Union[None, torch.Generator, TracedGenerator, RowGenerators]


def row_generators(generators: Sequence, batch: int, device, where: str) -> RowGenerators:
    """A :class:`RowGenerators` of ``batch`` generators from a list or tuple of torch.Generators, int seeds or
    None (one per row); a ValueError for another number of them."""
    if tracing():
        raise RuntimeError(f"{where}: a list of generators (one per row) is taken by eager calls only; while "
                           "traced, pass one int seed or generator state")
    if not isinstance(generators, (list, tuple)):
        raise TypeError(f"{where}: generator must be a list or tuple of generators; got {type(generators).__name__}")
    if len(generators) != batch:
        raise ValueError(f"{where}: generator is a list of {len(generators)} generators; one per prompt needs {batch}")
    return RowGenerators([as_generator(g, device, f"{where}: generator[{i}]") for i, g in enumerate(generators)])


def as_generator(generator, device, where: str) -> Generator:
    """A generator on ``device`` from a torch.Generator, an int seed or None, or, while traced, a generator's
    state tensor (a :class:`TracedGenerator` for an int seed or a state while traced); a generator on another
    kind of device is an error."""
    if generator is None:
        return None
    if isinstance(generator, numbers.Integral) and not isinstance(generator, bool):
        if tracing():
            return TracedGenerator(int(generator), device)
        return torch.Generator(device=device).manual_seed(int(generator))
    if isinstance(generator, TracedGenerator):
        return generator
    if isinstance(generator, Tensor):
        return _state_generator(generator, device, where)
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"{where}: generator must be a torch.Generator, an int seed or None (or, in a traced call, "
                        f"a generator's state tensor); got {type(generator).__name__}")
    if torch.device(generator.device).type != torch.device(device).type:
        raise ValueError(f"{where}: generator is on {generator.device} but the candidates are on {device}")
    return generator


def _state_generator(state: Tensor, device, where: str) -> TracedGenerator:
    """The :class:`TracedGenerator` of a caller's state tensor (traced calls only)."""
    if not tracing():
        raise TypeError(f"{where}: generator is a tensor; a generator's state tensor (g.get_state()) is taken by "
                        "calls traced by torch.compile or torch.export only; eagerly, pass the torch.Generator "
                        "itself (the same numbers)")
    if state.dtype != torch.uint8 or state.dim() != 1 or state.device.type != "cpu":
        raise ValueError(f"{where}: a generator state must be a 1-d uint8 CPU tensor, as torch.Generator."
                         f"get_state() gives it; got {list(state.shape)} {state.dtype} on {state.device}")
    return TracedGenerator(0, device, target=state)


def _untraceable(generator) -> None:
    if tracing() and isinstance(generator, torch.Generator):
        raise RuntimeError("pyebm: torch.compile / torch.export cannot draw from a torch.Generator object (Dynamo "
                           "cannot pass it to an op nor read its state without a graph break; see pyebm._rng); "
                           "pass generator as an int seed (the same numbers as torch.Generator().manual_seed(seed) "
                           "eagerly), or as the generator's state tensor read outside the traced region (state = "
                           "g.get_state(): the eager numbers of g, the state advanced in place; g.set_state(state) "
                           "afterwards), or None (torch's global generator)")


def draw(kind: str, shape: Sequence[int], generator: Generator, device, dtype: torch.dtype,
         count: Optional[int] = None) -> Tensor:
    """``torch.randn(shape)`` (kind "normal") or ``torch.rand(shape)`` ("uniform") with ``generator``; with
    ``count``, a tensor [count, *shape] of ``count`` such draws one after the other."""
    shape = tuple(shape)
    if isinstance(generator, RowGenerators):
        if count is not None or not shape or shape[0] != len(generator):
            raise ValueError(f"pyebm: a draw of shape {list(shape)} with {len(generator)} row generators (the "
                             "leading dimension must be the number of rows)")
        return torch.cat([draw(kind, (1,) + shape[1:], g, device, dtype) for g in generator.generators])
    if isinstance(generator, TracedGenerator):
        out = generator.draw(kind, shape, 1 if count is None else count, dtype)
        return out[0] if count is None else out
    _untraceable(generator)
    if count is None:
        fn = torch.randn if kind == "normal" else torch.rand
        return fn(shape, generator=generator, device=device, dtype=dtype)
    out = torch.empty((count,) + shape, device=device, dtype=dtype)
    for i in range(count):
        if kind == "normal":
            out[i].normal_(generator=generator)
        else:
            out[i].uniform_(generator=generator)
    return out


def randn(shape: Sequence[int], generator: Generator, device, dtype: torch.dtype) -> Tensor:
    """``torch.randn(shape, generator=generator)``."""
    return draw("normal", shape, generator, device, dtype)


def rand(shape: Sequence[int], generator: Generator, device, dtype: torch.dtype) -> Tensor:
    """``torch.rand(shape, generator=generator)``."""
    return draw("uniform", shape, generator, device, dtype)


def normal_(t: Tensor, generator: Generator) -> Tensor:
    """``t.normal_(generator=generator)`` (t contiguous, as every buffer pyebm draws into)."""
    if isinstance(generator, RowGenerators):
        return t.copy_(draw("normal", t.shape, generator, t.device, t.dtype))
    if isinstance(generator, TracedGenerator):
        return t.copy_(generator.draw("normal", t.shape, 1, t.dtype)[0])
    _untraceable(generator)
    return t.normal_(generator=generator)


def uniform_(t: Tensor, generator: Generator) -> Tensor:
    """``t.uniform_(generator=generator)``."""
    if isinstance(generator, RowGenerators):
        return t.copy_(draw("uniform", t.shape, generator, t.device, t.dtype))
    if isinstance(generator, TracedGenerator):
        return t.copy_(generator.draw("uniform", t.shape, 1, t.dtype)[0])
    _untraceable(generator)
    return t.uniform_(generator=generator)
