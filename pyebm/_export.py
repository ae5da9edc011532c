"""Ahead-of-time packages of a whole inference call: ``pyebm.export`` and ``pyebm.load``.

    pyebm.export(lambda obs: policy.act(obs, generator=0), (obs,), "policy.pt2", dynamic_shapes="batch")
    act = pyebm.load("policy.pt2")      # in any process that can ``import pyebm``
    actions = act(obs)

``export`` traces the call with ``torch.export`` (the descent loop unrolled, pyebm's ops as
``torch.ops.pyebm.*`` calls) and compiles it with AOTInductor into one ``.pt2`` file: the graph as C++ compiled
by the system compiler, the weights, and the input and output structure. ``load`` opens it with
``torch._inductor.aoti_load_package``; ``import pyebm`` registers every op the package calls (the compiled
extension's and the Python ones) and the result types (``DescentResult``, ``ThinkResult``, ``PolicyResult``)
it may return, so nothing else is needed.

Random draws: pass ``generator`` as an int seed inside the exported call; every run of the package then
draws the numbers the eager call with that seed draws (``pyebm._rng``; tested). ``generator=None`` leaves the
draws to the compiled graph's own random ops (not compared with eager draws by the tests). A call that has
to draw from a ``torch.Generator`` object cannot be exported.
"""
from __future__ import annotations

import inspect
import json
import operator
import os
from typing import Any, Callable, Union

import torch
from torch import nn

from pyebm.ops import packed_call as _packed_call


class _Call(nn.Module):
    """A callable as a module: ``forward`` calls it. The modules it reads (the module of a bound method, a
    policy's energy) are registered, so that their weights are the program's parameters."""

    def __init__(self, fn: Callable):
        super().__init__()
        self.fn = fn
        owner = getattr(fn, "__self__", None)
        if isinstance(owner, nn.Module):
            self.owner = owner
        elif isinstance(getattr(owner, "energy", None), nn.Module):
            self.energy = owner.energy

    def forward(self, *args):
        return self.fn(*args)


def _batch_dims(args) -> tuple:
    """dynamic_shapes="batch": dim 0 of every tensor argument is one dynamic size."""
    batch = torch.export.Dim("batch")
    return tuple({0: batch} if isinstance(a, torch.Tensor) else None for a in args)


def _empty_tensor_list(op, node) -> bool:
    """Whether the call ``node`` of ``op`` passes an empty ``Tensor[]`` argument."""
    for i, arg in enumerate(op._schema.arguments):
        value = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
        if isinstance(value, (list, tuple)) and len(value) == 0 and \
                isinstance(arg.type, torch.ListType) and isinstance(arg.type.getElementType(), torch.TensorType):
            return True
    return False


def _pack_empty_lists(program) -> None:
    """Replace every pyebm op call with an empty ``Tensor[]`` argument, in the program's graph and its
    subgraphs, by ``pyebm::packed_call`` of the same call (AOTInductor's proxy executor passes an empty tensor
    list to an op as None)."""
    for gm in program.graph_module.modules():
        if isinstance(gm, torch.fx.GraphModule) and _pack_graph(gm.graph):
            gm.graph.lint()
            gm.recompile()


def _pack_graph(graph) -> bool:
    changed = False
    for node in list(graph.nodes):
        op = node.target
        if node.op != "call_function" or not isinstance(op, torch._ops.OpOverload) or op.namespace != "pyebm" \
                or not _empty_tensor_list(op, node):
            continue
        tensors: list = []
        is_node = lambda v: isinstance(v, torch.fx.Node)  # noqa: E731
        spec = json.dumps({"args": [_packed_call.encode(a, tensors, is_node) for a in node.args],
                           "kwargs": {k: _packed_call.encode(v, tensors, is_node) for k, v in node.kwargs.items()}})
        target = f"pyebm::{op._opname}.{op._overloadname}"
        val = node.meta.get("val")
        single = not isinstance(val, (tuple, list))
        with graph.inserting_before(node):
            new = graph.call_function(torch.ops.pyebm.packed_call.default, (target, tensors, spec))
        new.meta = dict(node.meta)
        new.meta["val"] = [val] if single else list(val)
        out = new
        if single:
            with graph.inserting_after(new):
                out = graph.call_function(operator.getitem, (new, 0))
            out.meta = dict(node.meta)
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        changed = True
    return changed


def export(model_or_fn: Union[nn.Module, Callable], example_inputs: Any, path: Union[str, os.PathLike],
           dynamic_shapes: Any = None, *, strict: bool = False) -> str:
    """Trace one inference call (descent included) and write it as an AOTInductor package at ``path`` (a
    ``.pt2`` file); returns the path.

    model_or_fn     an ``nn.Module`` (its ``forward`` is the call) or any callable: a function, a bound method
                    such as ``policy.act`` or ``ebt.think`` (wrap a call with options in a function or lambda:
                    ``lambda obs: policy.act(obs, generator=0)``).
    example_inputs  the call's positional arguments: a tuple, or one tensor.
    dynamic_shapes  as ``torch.export.export`` takes it, or ``"batch"``: dim 0 of every tensor argument is the
                    same dynamic size (any batch size runs the package). None: every shape is fixed.
    strict          ``torch.export``'s strict mode (trace with TorchDynamo); default non-strict.
    """
    if not isinstance(model_or_fn, nn.Module) and not callable(model_or_fn):
        raise TypeError(f"pyebm.export: model_or_fn must be an nn.Module or a callable; got "
                        f"{type(model_or_fn).__name__}")
    args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else example_inputs
    if not isinstance(args, tuple):
        raise TypeError(f"pyebm.export: example_inputs must be a tuple of the call's arguments or one tensor; got "
                        f"{type(example_inputs).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"pyebm.export: path must be a str or os.PathLike; got {type(path).__name__}")
    path = os.fspath(path)
    if not path.endswith(".pt2"):
        raise ValueError(f"pyebm.export: path must end in .pt2 (an AOTInductor package); got {path!r}")
    if isinstance(dynamic_shapes, str):
        if dynamic_shapes != "batch":
            raise ValueError(f"pyebm.export: dynamic_shapes must be None, 'batch' or a torch.export spec; got "
                             f"{dynamic_shapes!r}")
        dynamic_shapes = _batch_dims(args)
    if not isinstance(strict, bool):
        raise TypeError(f"pyebm.export: strict must be True or False; got {strict!r}")
    module = model_or_fn if isinstance(model_or_fn, nn.Module) else _Call(model_or_fn)
    if isinstance(module, _Call) and isinstance(dynamic_shapes, (tuple, list)):
        dynamic_shapes = (tuple(dynamic_shapes),)  # one spec per argument, for forward(*args)
    program = torch.export.export(module, args, dynamic_shapes=dynamic_shapes, strict=strict)
    _pack_empty_lists(program)
    from torch._inductor import aoti_compile_and_package

    if "args" in inspect.signature(aoti_compile_and_package).parameters:  # torch < 2.6 takes the inputs again
        return aoti_compile_and_package(program, args, {}, package_path=path)
    return aoti_compile_and_package(program, package_path=path)


def load(path: Union[str, os.PathLike], device_index: int = -1) -> Callable:
    """The inference call of a package written by :func:`export`: call it with arguments like the example
    inputs (any batch size where the batch was exported dynamic); it returns what the call returned.
    ``device_index``: the CUDA device to run a CUDA package on (-1: the current one)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"pyebm.load: path must be a str or os.PathLike; got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pyebm.load: no package at {path!r}")
    from torch._inductor import aoti_load_package

    if "device_index" not in inspect.signature(aoti_load_package).parameters:  # torch < 2.7
        if device_index != -1:
            raise ValueError("pyebm.load: device_index needs torch >= 2.7")
        return aoti_load_package(path)
    return aoti_load_package(path, device_index=device_index)
