"""Random draws of pyebm's calls, eager and traced alike.

Every random number pyebm draws (initial candidates, per-step noise, sampled selection) goes through the
functions here. In eager mode they are the plain torch draws with the caller's ``torch.Generator``.

``torch.compile`` and ``torch.export`` cannot trace a ``torch.Generator`` (no op that takes one can be put in a
graph, and a generator made inside a compiled region is an opaque object the graph cannot hold). While a call
is traced:

* an int seed (``generator=0``) becomes a :class:`TracedGenerator`: the state of ``torch.Generator().
  manual_seed(seed)`` as a tensor, threaded through the functional op ``torch.ops.pyebm.rng_draw``. The traced
  call draws exactly the numbers of the eager call with that seed, in the same order, every time it runs.
* ``generator=None`` draws with torch's global generator, as eager code does (a compiled graph's draws may
  differ from eager ones unless ``torch._inductor.config.fallback_random = True``).
* a ``torch.Generator`` object is accepted, and used only if the call draws a random number; a draw then
  raises a RuntimeError that says to pass an int seed instead.
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
    """True while torch.export traces the call (strict or not)."""
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return bool(is_exporting is not None and is_exporting())


class TracedGenerator:
    """The generator of an int seed inside a traced call: its state is a tensor that each draw replaces."""

    def __init__(self, seed: int, device: torch.device):
        self.seed = int(seed)
        self.device = torch.device(device)
        self.state: Optional[Tensor] = None  # None: the seed's initial state (the first draw seeds)

    def draw(self, kind: str, shape: Sequence[int], count: int, dtype: torch.dtype) -> Tensor:
        """[count, *shape]: ``count`` draws of ``shape`` one after the other."""
        out, self.state = torch.ops.pyebm.rng_draw(self.state, self.seed, kind, list(shape), count, dtype,
                                                   self.device)
        return out


Generator = Union[None, torch.Generator, TracedGenerator]


def as_generator(generator, device, where: str) -> Generator:
    """A generator on ``device`` from a torch.Generator, an int seed or None (a :class:`TracedGenerator` for an
    int seed while traced); a generator on another kind of device is an error."""
    if generator is None:
        return None
    if isinstance(generator, numbers.Integral) and not isinstance(generator, bool):
        if tracing():
            return TracedGenerator(int(generator), device)
        return torch.Generator(device=device).manual_seed(int(generator))
    if isinstance(generator, TracedGenerator):
        return generator
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"{where}: generator must be a torch.Generator, an int seed or None; got "
                        f"{type(generator).__name__}")
    if torch.device(generator.device).type != torch.device(device).type:
        raise ValueError(f"{where}: generator is on {generator.device} but the candidates are on {device}")
    return generator


def _untraceable(generator) -> None:
    if tracing() and isinstance(generator, torch.Generator):
        raise RuntimeError("pyebm: torch.compile / torch.export cannot draw from a torch.Generator object (no "
                           "traced op takes one); pass generator as an int seed (the same numbers as "
                           "torch.Generator().manual_seed(seed) eagerly) or None (torch's global generator)")


def draw(kind: str, shape: Sequence[int], generator: Generator, device, dtype: torch.dtype,
         count: Optional[int] = None) -> Tensor:
    """``torch.randn(shape)`` (kind "normal") or ``torch.rand(shape)`` ("uniform") with ``generator``; with
    ``count``, a tensor [count, *shape] of ``count`` such draws one after the other."""
    shape = tuple(shape)
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
    if isinstance(generator, TracedGenerator):
        return t.copy_(generator.draw("normal", t.shape, 1, t.dtype)[0])
    _untraceable(generator)
    return t.normal_(generator=generator)


def uniform_(t: Tensor, generator: Generator) -> Tensor:
    """``t.uniform_(generator=generator)``."""
    if isinstance(generator, TracedGenerator):
        return t.copy_(generator.draw("uniform", t.shape, 1, t.dtype)[0])
    _untraceable(generator)
    return t.uniform_(generator=generator)
