"""Random draws from a generator state held in a tensor: ``torch.ops.pyebm.rng_draw``.

``torch.ops.pyebm.rng_draw(state, seed, kind, shape, count, dtype, device) -> (out, new_state)``
    out [count, *shape] of the floating dtype named by ``dtype`` ("float32", "float64", "float16",
    "bfloat16": ``dtype_name(torch.float32)``): ``count`` draws, one after the other, each as
    ``torch.empty(shape).normal_()``
    (kind "normal") or ``.uniform_()`` (kind "uniform") with a ``torch.Generator`` on ``device`` whose state
    is ``state`` (a uint8 tensor as ``Generator.get_state()`` gives it, of a generator on ``device``'s kind of
    device) or, when ``state`` is None, seeded with ``seed``. new_state: that generator's state after the draws.

The op is functional: the generator's state goes in and out as a tensor. Under ``torch.compile`` and
``torch.export`` (which cannot trace a ``torch.Generator``) pyebm draws with it, so a traced call seeded with
an int draws the same numbers as the eager call with ``torch.Generator().manual_seed(seed)``, in the same
order, and a traced call given a generator's state tensor draws the numbers of the eager call with that
generator (``pyebm._rng``). Not differentiable (random draws have no gradient).

The dtype is passed by name, not as a ``torch.dtype`` argument: AOTInductor's runtime in torch 2.11 hands a
custom op's dtype argument over as another dtype (float32 arrives as float64: the serialized enum read as
c10's), so a package would draw other numbers, or none. A string arrives as it was written.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from pyebm._dtypes import name as dtype_name, named

KINDS = ("normal", "uniform")


def dtype_of(op: str, name: str) -> torch.dtype:
    """The floating dtype a name of ``dtype_name`` stands for (TypeError for anything else)."""
    dt = named(name)
    if dt is None or not dt.is_floating_point:
        hint = " (pass its name, dtype_name(dtype))" if isinstance(name, torch.dtype) else ""
        raise TypeError(f"{op}: dtype must name a floating dtype, e.g. 'float32'; got {name!r}{hint}")
    return dt


def check(op: str, state: Optional[Tensor], seed: int, kind: str, shape: Sequence[int], count: int,
          dtype: str, device: Optional[torch.device] = None) -> torch.dtype:
    """The op's argument checks (its fake runs them too); the dtype that ``dtype`` names."""
    if state is not None:
        if not isinstance(state, Tensor) or state.dtype != torch.uint8 or state.dim() != 1 \
                or state.device.type != "cpu":
            got = f"{list(state.shape)} {state.dtype} on {state.device}" if isinstance(state, Tensor) \
                else type(state).__name__
            raise ValueError(f"{op}: state must be a 1-d uint8 CPU tensor (Generator.get_state()); got {got}")
        if device is not None and state.numel() != state_size(torch.device(device)):
            raise ValueError(f"{op}: state has {state.numel()} bytes, but a generator on {torch.device(device).type} "
                             f"has a state of {state_size(torch.device(device))} bytes (the state of a generator "
                             "on another kind of device?)")
    if kind not in KINDS:
        raise ValueError(f"{op}: kind must be one of {', '.join(map(repr, KINDS))}; got {kind!r}")
    if count < 1:
        raise ValueError(f"{op}: count must be >= 1; got {count}")
    return dtype_of(op, dtype)


def state_size(device: torch.device) -> int:
    """Bytes of a ``torch.Generator`` state on ``device`` (5056 on the CPU: mt19937)."""
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes():  # a real generator, also while a fake mode traces
        return torch.Generator(device=device).get_state().numel()


@torch.library.custom_op("pyebm::rng_draw", mutates_args=())
def rng_draw(state: Optional[Tensor], seed: int, kind: str, shape: Sequence[int], count: int, dtype: str,
             device: torch.device) -> Tuple[Tensor, Tensor]:
    """(out [count, *shape], new_state): ``count`` draws with the generator of ``state`` (or ``seed``)."""
    dtype = check("pyebm::rng_draw", state, seed, kind, shape, count, dtype, device)
    g = torch.Generator(device=device)
    if state is None:
        g.manual_seed(seed)
    else:
        g.set_state(state)
    out = torch.empty((count,) + tuple(shape), dtype=dtype, device=device)
    for i in range(count):  # one draw per slice: the numbers of ``count`` separate eager draws
        if kind == "normal":
            out[i].normal_(generator=g)
        else:
            out[i].uniform_(generator=g)
    return out, g.get_state()
