"""Packed inference state: derived from a module's current weights, checked on every call, never copied.

Fast paths pack weights once (transposed copies, concatenations, norms folded into the next product) and
reuse the pack across calls. A pack is valid only while the module holds exactly the tensors it was made
from. ``Snapshot`` (``pyebm._C.Snapshot``, csrc/cpu/sources.h) records the pack's sources by name and, on
every call, resolves them again from the module and compares identity, storage, offset, version counter,
shape and strides; any difference (an in-place write, an optimizer step, ``load_state_dict``, ``.data =``,
a replaced parameter or submodule, a parametrization, ``functional_call``) makes the next call pack again.
The snapshot holds aliases of every storage a pack points into, so a call never reads memory the module
let go of, whatever another thread assigns meanwhile.

Writes that bypass the version counter (through ``param.data``, a numpy view) are not seen, as autograd
does not see them; :func:`repack` drops every pack of a module after such writes.

Packs live in the module's ``_pyebm_packed`` dict: pickling, deep copies (``copy.deepcopy``,
``AveragedModel``), ``torch.save`` and spawn children never see it (the copy packs again on first use),
and ``.to()`` / ``.cuda()`` / ``.double()`` clear it. Models inherit :class:`PackedModule` for that.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, TypeVar

import torch
from torch import nn

from pyebm import _backend

ATTR = "_pyebm_packed"
T = TypeVar("T")


class _PySnapshot:
    """``pyebm._C.Snapshot`` in Python, for installs without the extension: the same rules."""

    def __init__(self, module: nn.Module, names: Sequence[Optional[str]]):
        import weakref

        self._root = weakref.ref(module)
        self._names = list(names)
        self._read()

    def again(self) -> "_PySnapshot":
        root = self._root()
        if root is None:
            raise ValueError("pyebm: the module of this snapshot no longer exists")
        return _PySnapshot(root, self._names)

    def _resolve(self, name: str):
        obj = self._root()
        if obj is None:
            raise ValueError("pyebm: the module of this snapshot no longer exists")
        *path, last = name.split(".")
        for part in path:
            obj = obj._modules[part] if part in getattr(obj, "_modules", {}) else getattr(obj, part)
        for store in ("_parameters", "_buffers"):
            d = obj.__dict__.get(store)
            if d is not None and last in d:
                return d[last]
        return getattr(obj, last)

    @staticmethod
    def _key(t):
        if t is None:
            return None
        version = None if t.is_inference() else t._version  # inference tensors have no version counter
        return (t.data_ptr(), version, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t.device)

    def _read(self) -> None:
        self._seen, self._keys, self.tensors = [], [], []
        for name in self._names:
            t = None if name is None else self._resolve(name)
            if t is not None and not isinstance(t, torch.Tensor):
                raise TypeError(f"pyebm: {name} is not a tensor")
            self._seen.append(t)
            self._keys.append(self._key(t))
            self.tensors.append(None if t is None else t.detach())
        self._volatile = any(k is not None and k[1] is None for k in self._keys)

    def unchanged(self, versions: bool = True) -> bool:
        if versions and self._volatile:
            return False
        for name, seen, key in zip(self._names, self._seen, self._keys):
            if name is None:
                continue
            now = self._resolve(name)
            if now is not seen:
                return False
            if now is not None:
                got = self._key(now)
                if (got if versions else got[:1] + got[2:]) != (key if versions else key[:1] + key[2:]):
                    return False
        return True

    def __len__(self) -> int:
        return len(self._names)


Snapshot = getattr(_backend.ext(), "Snapshot", None) or _PySnapshot


def packs(module: nn.Module) -> Dict[object, object]:
    """The module's packed-state dict (created on first use)."""
    d = module.__dict__.get(ATTR)
    if d is None:
        d = module.__dict__[ATTR] = {}
    return d


def attr(module: nn.Module, name: str):
    """``getattr(module, name)`` without nn.Module.__getattr__ for plain parameters, buffers and submodules
    (which costs a microsecond a call): the instance's own dicts first, then attribute access (a
    parametrization's property, a hook's plain attribute)."""
    d = module.__dict__
    for store in ("_parameters", "_modules", "_buffers"):
        v = d[store].get(name)
        if v is not None:
            return v
    return getattr(module, name)


def resolve(module: nn.Module, name: str):
    """``module``'s attribute at a dotted name, as attribute access gives it."""
    obj = module
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def _traced() -> bool:
    """True under torch.compile, torch.export and torch.jit.trace: tensors made then are the trace's, never kept."""
    return torch.compiler.is_compiling() or torch._C._get_tracing_state() is not None


def packed(module: nn.Module, key, names: Callable[[], Sequence[Optional[str]]],
           build: Callable[[List[Optional[torch.Tensor]]], T]) -> T:
    """The pack ``key`` of ``module`` for its current weights.

    ``names()`` lists the pack's sources (dotted names under ``module``; None for an absent one), ``build``
    makes the pack from their tensors (detached aliases, in that order). The pack is rebuilt whenever a
    source changed since it was made. Thread-safe: a pack and its snapshot are replaced together.

    Under torch.compile and torch.jit.trace the pack is built from the module's own tensors on every call
    and never stored: the graph then reads the parameters themselves (a traced module that loads new
    weights computes with them) and packs inside the graph.
    """
    if _traced():  # detached like a pack's aliases (inference: no graph over the weights), still read each call
        return build([None if n is None else resolve(module, n).detach() for n in names()])
    d = packs(module)
    entry = d.get(key)
    if entry is not None and entry[0].unchanged():
        return entry[1]
    snap = entry[0].again() if entry is not None else Snapshot(module, list(names()))
    with torch.no_grad():
        value = build(list(snap.tensors))
    d[key] = (snap, value)
    return value


def packs_current(module: nn.Module) -> bool:
    """True when no pack of ``module`` or its submodules made by :func:`packed` is stale (every source
    unchanged, versions included). A captured CUDA graph that reads packs (copies derived from the weights)
    is valid only while this holds: an in-place write to a source (an optimizer step) keeps every address,
    but the pack the graph reads no longer matches the weights."""
    for m in module.modules():
        d = m.__dict__.get(ATTR)
        if not d:
            continue
        for entry in list(d.values()):
            if isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], (Snapshot, _PySnapshot)) \
                    and not entry[0].unchanged():
                return False
    return True


def repack(module: nn.Module) -> None:
    """Drop every pack of ``module`` and its submodules: the next call packs their current weights again.
    Needed only after writes that bypass the version counter (``param.data.copy_(...)``, numpy views)."""
    for m in module.modules():
        d = m.__dict__.get(ATTR)
        if d:
            d.clear()


class PackedModule(nn.Module):
    """Base of pyebm's models: their packed state is never pickled or copied, and moving them clears it."""

    def __getstate__(self):
        state = super().__getstate__()
        state.pop(ATTR, None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__[ATTR] = {}

    def _apply(self, fn, recurse=True):
        # .to() / .cuda() / .double() give the parameters new storage; the old packs would keep the old alive
        self.__dict__[ATTR] = {}
        return super()._apply(fn, recurse)
