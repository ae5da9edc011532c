"""One pyebm op call with its tensors as one list: ``torch.ops.pyebm.packed_call``.

``torch.ops.pyebm.packed_call(target, tensors, spec) -> Tensor[]``
    Calls the pyebm op ``target`` (``"pyebm::mlp_descent.default"``) with the arguments that ``spec`` (JSON)
    describes, where ``{"t": i}`` stands for ``tensors[i]``; returns the op's tensor outputs as a list.

``pyebm.export`` puts it in place of an op call that has an empty ``Tensor[]`` argument (an MLPEnergy with one
hidden layer has no hidden-to-hidden weights): AOTInductor's proxy executor hands an empty tensor list to the
op as None, which the op cannot take. The call, the kernel and its numbers are the same. Only ``pyebm::`` ops
can be targets.
"""
from __future__ import annotations

import json
from typing import Any, List, Sequence

import torch
from torch import Tensor

_OP = "pyebm::packed_call"


def resolve(target: str):
    """The OpOverload of ``"pyebm::name.overload"``; any other namespace is an error."""
    if not isinstance(target, str) or not target.startswith("pyebm::"):
        raise ValueError(f"{_OP}: target must be a pyebm op ('pyebm::name.overload'); got {target!r}")
    name, _, overload = target[len("pyebm::"):].partition(".")
    packet = getattr(torch.ops.pyebm, name, None)
    op = None if packet is None else getattr(packet, overload or "default", None)
    if op is None:
        raise ValueError(f"{_OP}: no op {target!r} in this build")
    return op


def encode(value: Any, tensors: List[Any], is_tensor) -> Any:
    """``value`` as JSON, tensors (``is_tensor(x)``) appended to ``tensors`` and replaced by ``{"t": index}``."""
    if is_tensor(value):
        tensors.append(value)
        return {"t": len(tensors) - 1}
    if isinstance(value, (list, tuple)):
        return {"l": [encode(v, tensors, is_tensor) for v in value]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"{_OP}: cannot pack an argument of type {type(value).__name__}")


def _decode(value: Any, tensors: Sequence[Tensor]) -> Any:
    if isinstance(value, dict):
        if "t" in value:
            return tensors[value["t"]]
        return [_decode(v, tensors) for v in value["l"]]
    return value


def call(target: str, tensors: Sequence[Tensor], spec: str) -> List[Tensor]:
    op = resolve(target)
    decoded = json.loads(spec)
    args = [_decode(a, tensors) for a in decoded["args"]]
    kwargs = {k: _decode(v, tensors) for k, v in decoded["kwargs"].items()}
    out = op(*args, **kwargs)
    return [t for t in out] if isinstance(out, (tuple, list)) else [out]


@torch.library.custom_op(_OP, mutates_args=())
def packed_call(target: str, tensors: List[Tensor], spec: str) -> List[Tensor]:
    """The outputs of ``target`` called with the arguments of ``spec`` over ``tensors``."""
    return [t.clone() if any(t is x for x in tensors) else t for t in call(target, tensors, spec)]
