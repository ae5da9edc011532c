"""The vocabulary ends of an EBT descent step as torch.library ops (kernels: ``pyebm._kernels.ebt_vocab``).

``torch.ops.pyebm.ebt_vocab_embed(y, w, softmax) -> (p, e)``
    y [..., V] candidates, w [D, V] (``vocab_to_embed.weight``, or ``embeddings.weight.t()`` when tied;
    any strides). With ``softmax``: p = softmax(y) with probabilities below the dtype's smallest normal
    number set to 0, e = p @ w^T [..., D]. Without: p is empty (shape [0]) and e = y @ w^T.
``torch.ops.pyebm.ebt_vocab_grad(ge, w) -> g``
    g = ge @ w [..., V], the gradient dE/dp back through ``vocab_to_embed`` from ge = dE/de [..., D].

Each reads w once per tile of up to 64 rows (all samples of a step together). dtypes float32, bfloat16,
float16 (fp32 softmax and accumulation); outputs contiguous, in the input's dtype. CUDA tensors, or CPU
tensors when TRITON_INTERPRET=1 was set before the kernels were imported. Inference ops: no autograd
formula (a backward through them raises). Arguments are checked in ``pyebm.ops._checks`` (the fakes in
``pyebm.ops._fake`` run the same checks). Triton is imported on the first call, so the ops exist (e.g. for tracing with fake tensors) on
machines without Triton.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from pyebm import _backend
from pyebm.ops import _checks


def _kernels():
    if _backend.triton is None:
        raise RuntimeError(f"pyebm: the triton backend is not usable: {_backend.backends().why['triton']}")
    from pyebm._kernels import ebt_vocab as kernels

    return kernels


def _cpu_rule(op: str, x: Tensor) -> None:
    if x.device.type == "cpu" and not _backend.triton_interpret():
        raise ValueError(f"{op}: the triton backend on CPU tensors needs TRITON_INTERPRET=1")


@torch.library.custom_op("pyebm::ebt_vocab_embed", mutates_args=())
def ebt_vocab_embed(y: Tensor, w: Tensor, softmax: bool) -> Tuple[Tensor, Tensor]:
    """(p [..., V] or empty, e [..., D]) of candidates y [..., V] and w [D, V]."""
    _checks.vocab_args("pyebm::ebt_vocab_embed", "y", y, w, 1)
    _cpu_rule("pyebm::ebt_vocab_embed", y)
    p, e = _kernels().vocab_embed(y, w, softmax)
    return (p if p is not None else y.new_empty(0)), e


@torch.library.custom_op("pyebm::ebt_vocab_grad", mutates_args=())
def ebt_vocab_grad(ge: Tensor, w: Tensor) -> Tensor:
    """g = ge @ w [..., V] for ge [..., D] and w [D, V]."""
    _checks.vocab_args("pyebm::ebt_vocab_grad", "ge", ge, w, 0)
    _cpu_rule("pyebm::ebt_vocab_grad", ge)
    return _kernels().vocab_grad(ge, w)


def vocab_embed(y: Tensor, w: Tensor, softmax: bool = True) -> Tuple[Tensor, Tensor]:
    """``torch.ops.pyebm.ebt_vocab_embed``."""
    return torch.ops.pyebm.ebt_vocab_embed(y, w, softmax)


def vocab_grad(ge: Tensor, w: Tensor) -> Tensor:
    """``torch.ops.pyebm.ebt_vocab_grad``."""
    return torch.ops.pyebm.ebt_vocab_grad(ge, w)
