"""Candidate sharding across processes with ``torch.distributed``: ``pyebm.distributed.minimize``.

    torch.distributed.init_process_group("nccl")          # or "gloo"; one process per device
    res = pyebm.distributed.minimize(energy, x, candidates=1024, config=cfg, generator=0)
    res.best [B, *event], res.best_energy [B], res.best_index [B]     the same on every rank
    res.y [B, k_r, *event], res.energy [B, k_r]                       this rank's candidates start:stop

Every rank passes the same energy (same weights), context, config and arguments. The K candidates of each
context are split into contiguous shards (rank r holds global candidates ``start:stop``, the first
``K % world`` ranks one more than the others); each rank descends its shard with ``pyebm.minimize`` (the
same fast paths as one process) and the ranks then all-gather only, per context, each shard's best
(score, energy, global index) and its winning state: no rank ever holds another rank's candidates.

Candidates are the ones a single-process call draws: every rank draws all K initial states from the
generator (or takes the caller's ``init`` tensor) and keeps its slice, so a seed gives the same candidates
whatever the number of ranks. Without noise during the descent, the result equals ``pyebm.minimize`` in one
process with the same candidates: for the deterministic selections ("min", "max", "max_gap"; ties go to the
lowest global index, as ``argmax`` does) and for "sample" (the ranks all-gather the K energies, not the
states, and draw once from the common generator). Noise during the descent comes from a stream per rank
derived from the generator (reproducible for a given seed and world size, but not the single-process stream).
Options that couple the candidates of a context are refused: DFO (resamples among all K), ``normalize=
"rms_all"`` and ``tol_scope="all"`` (one value over the whole batch).

Collectives run on the group's device: CUDA tensors for NCCL, CPU tensors for gloo.

The same sharded descent runs behind ``pyebm.minimize(..., process_group=group)`` (which returns this
``ShardedResult``) and ``EnergyPolicy.act(..., process_group=group)`` (the K candidate chunks of each
observation); their errors name the call and its ``process_group`` argument.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor

from pyebm import descent as _descent
from pyebm._sharded import ShardedResult, _minimize, shard_range
from pyebm.config import Descent

__all__ = ["ShardedResult", "minimize", "shard_range"]


def minimize(energy: Any, context: Any, candidates: int = 1, config: Optional[Descent] = None,
             init: Union[None, Tensor, str] = None, mask: Optional[Tensor] = None,
             generator: Union[None, int, torch.Generator] = None, record: bool = False,
             backend: Optional[str] = None, event_shape: Optional[Sequence[int]] = None,
             whole_loop: Optional[bool] = None, group=None) -> ShardedResult:
    """``pyebm.minimize`` with the K candidates of each context split across the ranks of ``group``.

    Collective: every rank of ``group`` (default: the default process group) calls it with the same
    arguments (the same energy weights and context; config, K, shapes and options are checked, one small
    all-gather). The arguments are those of ``pyebm.minimize``; ``init`` and ``mask`` tensors are given
    whole ([B, K, *event] or broadcastable) and each rank takes its candidates. With ``generator=None``
    rank 0 draws a seed from the default generator and every rank uses it. Returns a ``ShardedResult``:
    the selected candidates (the same on every rank) and this rank's own candidates.
    """
    return _minimize(energy, context, candidates, config, init, mask, generator, record, backend, event_shape,
                     whole_loop, group, engine=_descent.SHARD_ENGINE)
