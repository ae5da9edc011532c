"""The sharded descent behind ``pyebm.distributed.minimize``, ``pyebm.minimize(..., process_group=)`` and
``EnergyPolicy.act(..., process_group=)`` (see ``pyebm.distributed`` for what it computes).

It runs the single-process descent on each rank's shard through ``engine``, the descent module's
``SHARD_ENGINE`` (its ``plan_call``, ``initial``, ``minimize``, ``DescentResult`` and ``sample_index``),
passed in by the caller, so that ``pyebm.descent`` can delegate here without an import cycle.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from pyebm import _dispatch, _rng
from pyebm.config import NONFINITE, Descent

@dataclass
class ShardedResult:
    """What ``pyebm.distributed.minimize`` found, on one rank.

    best [B, *event], best_energy [B], best_index [B] (global candidate index in 0..K-1): the selected
    candidate of each context, the same on every rank.
    start, stop: the global candidates this rank descended. y [B, stop - start, *event], energy,
    initial_energy [B, stop - start], steps, status, trajectory, trajectory_y: the fields of
    ``DescentResult`` for those candidates only (``trajectory`` only with ``record=True``).
    """

    best: Tensor
    best_energy: Tensor
    best_index: Tensor
    start: int
    stop: int
    y: Tensor
    energy: Tensor
    initial_energy: Tensor
    steps: Tensor
    status: Tensor
    trajectory: Optional[Tensor] = None
    trajectory_y: Optional[Tensor] = None


def shard_range(K: int, rank: int, world_size: int) -> Tuple[int, int]:
    """(start, stop): the global candidates of ``rank`` when K candidates are split over ``world_size``
    ranks, the first ``K % world_size`` ranks taking one more (the split of ``torch.tensor_split``)."""
    base, extra = divmod(K, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


# -- the group ------------------------------------------------------------------------------------

def _group_of(group, where: str = "pyebm.distributed.minimize", arg: str = "group"):
    """(group, rank, world size, backend name), with the errors a caller can act on."""
    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError("pyebm.distributed: this build of torch has no torch.distributed")
    if not dist.is_initialized():
        raise RuntimeError(f"{where}: the default process group is not initialised; call "
                           "torch.distributed.init_process_group(...) in every process first")
    if group is None:
        group = dist.group.WORLD
    elif not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"{where}: {arg} must be a torch.distributed.ProcessGroup or None; "
                        f"got {type(group).__name__}")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"{where}: this process is not a member of {arg}")
    return group, rank, dist.get_world_size(group), str(dist.get_backend(group))


def _collective_device(backend: str, like: torch.device) -> torch.device:
    """Where the group's collectives take tensors, decided by the backend alone so that every rank agrees
    (even one whose arguments failed): CUDA when the group has NCCL (also "cpu:gloo,cuda:nccl"; the
    candidates' CUDA device if they are on one), the CPU for gloo, else the candidates' device."""
    if "nccl" in backend:
        return like if like.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
    if "gloo" in backend:
        return torch.device("cpu")
    return like


def _all_gather(t: Tensor, group, world: int, device: torch.device) -> Tensor:
    """[world, *t.shape]: every rank's t (same shape on every rank), on t's device."""
    src = t.to(device).contiguous()
    parts = [torch.empty_like(src) for _ in range(world)]
    import torch.distributed as dist

    dist.all_gather(parts, src, group=group)
    return torch.stack(parts).to(t.device)


def _fingerprint(value) -> int:
    """A 63-bit digest of ``repr(value)``, the same in every process (``hash`` is salted per process)."""
    return int.from_bytes(hashlib.blake2b(repr(value).encode(), digest_size=8).digest(), "little") >> 1


# What every rank must agree on, in the order of the agreement vector (before the error flag and the seed).
_AGREED = ("config", "candidates", "batch size", "candidate shape", "dtype, init kind, mask and options",
           "generator state")


def _agree(group, rank, world, device, values: Sequence[int], seed: int, error: Optional[BaseException],
           where: str = "pyebm.distributed.minimize") -> int:
    """One all-gather of what this rank was asked (``values``), whether its arguments were valid, and a seed:
    every rank raises when any rank's arguments were invalid or differ from rank 0's (so no rank is left
    waiting in a later collective). Returns rank 0's seed."""
    mine = torch.tensor(list(values) + [0 if error is None else 1, seed], dtype=torch.int64)
    table = _all_gather(mine, group, world, device).cpu()
    if error is not None:
        raise error
    failed = [r for r in range(world) if table[r, -2] != 0]
    if failed:
        raise ValueError(f"{where}: the arguments were invalid on rank(s) {failed} "
                         "(their error names the argument)")
    for i, name in enumerate(_AGREED):
        column = table[:, i]
        differ = [r for r in range(world) if column[r] != column[0]]
        if differ:
            shown = f" (got {column.tolist()} on ranks 0..{world - 1})" if name in ("candidates", "batch size") else ""
            raise ValueError(f"{where}: every rank must pass the same {name}; rank(s) {differ} "
                             f"differ from rank 0{shown}")
    return int(table[0, -1])


# -- selection ------------------------------------------------------------------------------------

def _scores(cfg: Descent, E_final: Tensor, E_init: Tensor, status: Tensor) -> Tensor:
    """The selection score of each candidate (the larger the better), -inf where it cannot be chosen: the
    rule of ``pyebm.minimize``'s selection."""
    if cfg.selection in ("min", "sample"):
        score = -E_final if cfg.selection == "min" else -E_final / cfg.selection_temperature
    elif cfg.selection == "max":
        score = E_final.clone()
    else:  # max_gap
        score = E_init - E_final
    return score.masked_fill_((status == NONFINITE) | ~torch.isfinite(score), float("-inf"))


def _row_pick(y: Tensor, idx: Tensor) -> Tensor:
    return y[torch.arange(y.shape[0], device=y.device), idx]


# -- minimize ---------------------------------------------------------------------------------------

def _minimize(energy, context, candidates, config, init, mask, generator, record, backend, event_shape, whole_loop,
              group, compile: Optional[bool] = None, where: str = "pyebm.distributed.minimize",
              group_arg: str = "group", refusal: Optional[BaseException] = None, *, engine) -> ShardedResult:
    """``minimize`` for ``pyebm.minimize(..., process_group=)`` and ``EnergyPolicy.act(..., process_group=)``
    as well: errors name ``where`` and ``group_arg``; ``compile`` goes to each rank's descent; ``refusal``, an
    error of the caller's own checks on this rank, is raised on every rank (through the agreement) instead of
    leaving the others waiting in a collective."""
    _dispatch.check_not_traced(where)
    if _rng.tracing():
        raise RuntimeError(f"{where}: a sharded descent runs collectives between host-side steps, which torch.compile "
                           "/ torch.export cannot trace; trace the single-process call")
    group, rank, world, backend_name = _group_of(group, where, group_arg)
    error: Optional[BaseException] = None
    call = None
    values = [0] * len(_AGREED)
    seed = 0
    device = torch.device("cpu")
    try:
        if refusal is not None:
            raise refusal
        call = engine.plan_call(energy, context, candidates, config, init, mask, generator, record, backend,
                                   event_shape, whole_loop, False, compile=compile)
        device = call.device
        _check_shardable(call.cfg, where)
        values = [_fingerprint(call.cfg), call.K, call.B, _fingerprint(call.event),
                  _fingerprint((str(call.dtype), call.init_kind, call.init is not None, call.mask is not None,
                                record, backend, whole_loop, compile)),
                  _fingerprint(None if call.generator is None else bytes(call.generator.get_state().numpy()))]
        if call.generator is None:
            seed = int(torch.randint(0, 2 ** 62, (), dtype=torch.int64))
    except Exception as exc:  # every rank learns of it in the agreement below instead of waiting there
        error = exc
    coll = _collective_device(backend_name, device)
    seed = _agree(group, rank, world, coll, values, seed, error, where)

    B, K, cfg = call.B, call.K, call.cfg
    start, stop = shard_range(K, rank, world)
    if B == 0:  # every rank agreed on B = 0: nothing to descend or gather
        e = _empty_local(call, stop - start, engine)
        return ShardedResult(best=e.best, best_energy=e.best_energy, best_index=e.best_index, start=start,
                             stop=stop, y=e.y, energy=e.energy, initial_energy=e.initial_energy, steps=e.steps,
                             status=e.status, trajectory=e.trajectory, trajectory_y=e.trajectory_y)
    gen = call.generator if call.generator is not None else torch.Generator(device=call.device).manual_seed(seed)
    y0 = call.init if call.init is not None else engine.initial(
        call.init_kind, cfg, (B, K) + call.event, call.lower, call.upper, gen, call.device, call.dtype)
    local_gen = None
    if cfg.noise != "none":
        # one stream per rank, derived from the common generator (the same draw on every rank)
        base = int(torch.randint(0, 2 ** 62, (), generator=gen, device=call.device, dtype=torch.int64))
        local_gen = torch.Generator(device=call.device).manual_seed(_fingerprint((base, rank)))
    local_cfg = cfg if cfg.selection != "sample" else cfg.replace(selection="min")  # selected below, once
    local = None
    try:
        if stop > start:
            local = engine.minimize(energy, context, stop - start, local_cfg, init=y0[:, start:stop],
                                      mask=None if call.mask is None else call.mask[:, start:stop],
                                      generator=local_gen, record=record, backend=backend,
                                      event_shape=call.event, whole_loop=whole_loop, compile=compile)
        error = None
    except Exception as exc:  # every rank learns of it in the gather below instead of waiting there
        error = exc
    return _gather(call, cfg, local, start, stop, world, group, coll, gen, error, engine, where)


def _check_shardable(cfg: Descent, where: str = "pyebm.distributed.minimize") -> None:
    if cfg.method == "dfo":
        raise ValueError(f"{where}: config.method 'dfo' resamples among all K candidates of a "
                         "context and cannot be split across ranks; use method 'gd'")
    if cfg.normalize == "rms_all":
        raise ValueError(f"{where}: config.normalize 'rms_all' takes one RMS over the whole "
                         "batch and cannot be split across ranks; use 'rms'")
    if cfg.tol > 0 and cfg.tol_scope == "all":
        raise ValueError(f"{where}: config.tol_scope 'all' takes one norm over the whole batch "
                         "and cannot be split across ranks; use 'candidate'")


def _empty_local(call, n: int, engine):
    """Results of B contexts and n candidates with nothing computed: a rank that holds no candidates (K < world
    size; n = 0), or B = 0."""
    B, event, device, dtype = call.B, call.event, call.device, call.dtype
    traj = traj_y = None
    if call.record:
        traj = torch.empty(call.cfg.steps + 1, B, n, device=device, dtype=dtype)
        traj_y = torch.empty((call.cfg.steps + 1, B, n) + event, device=device, dtype=dtype)
    e = torch.empty(B, n, device=device, dtype=dtype)
    return engine.DescentResult(best=torch.empty((B,) + event, device=device, dtype=dtype),
                                  best_energy=torch.empty(B, device=device, dtype=dtype),
                                  best_index=torch.empty(B, dtype=torch.long, device=device),
                                  y=torch.empty((B, n) + event, device=device, dtype=dtype), energy=e,
                                  initial_energy=e.clone(), steps=torch.empty(B, n, dtype=torch.int32, device=device),
                                  status=torch.empty(B, n, dtype=torch.int8, device=device), trajectory=traj,
                                  trajectory_y=traj_y)


def _gather(call, cfg, local, start, stop, world, group, coll, gen, error, engine,
            where: str = "pyebm.distributed.minimize") -> ShardedResult:
    """Each rank's best per context (score, energy, global index, state) all-gathered; the winner: the best
    score, ties to the lowest global index. For ``selection="sample"`` the energies (not the states) are
    all-gathered and the draw is made from the common generator, the same on every rank."""
    B, K, event, device, dtype = call.B, call.K, call.event, call.device, call.dtype
    D = 1
    for s in event:
        D *= s
    if local is None:
        local = _empty_local(call, 0, engine)
    n = stop - start
    failed = error is not None
    if not failed:
        score = _scores(cfg, local.energy, local.initial_energy, local.status)
    else:
        score = torch.full((B, n), float("-inf"), device=device, dtype=dtype)
    ok = torch.tensor([0 if failed else 1], dtype=torch.int64, device=device)

    if cfg.selection == "sample":
        width = -(-K // world)  # the largest shard
        pad = torch.full((B, width), float("-inf"), device=device, dtype=dtype)
        pad[:, :n] = score
        flags = torch.cat([ok, torch.tensor([n], dtype=torch.int64, device=device)])
        all_flags = _all_gather(flags, group, world, coll)
        _raise_if_failed(all_flags[:, 0], error, where)
        rows = _all_gather(pad, group, world, coll)  # [world, B, width]
        full = torch.cat([rows[r, :, :int(all_flags[r, 1])] for r in range(world)], dim=1)  # [B, K]
        full = torch.where(torch.isinf(full).all(dim=1, keepdim=True), 0.0, full)
        u = torch.rand(B, 1, generator=gen, device=device, dtype=dtype)
        idx = engine.sample_index(torch.softmax(full, dim=1), u)[:, 0]
        mine = (idx >= start) & (idx < stop)
        li = (idx - start).clamp(0, max(n - 1, 0))
        state = torch.zeros((B,) + event, device=device, dtype=dtype)
        e = torch.zeros(B, device=device, dtype=dtype)
        if n > 0:
            state = torch.where(mine.view((B,) + (1,) * len(event)), _row_pick(local.y, li), state)
            e = torch.where(mine, _row_pick(local.energy, li), e)
        packed = torch.cat([e.unsqueeze(1), state.reshape(B, D)], dim=1)
        stops = torch.tensor([shard_range(K, r, world)[1] for r in range(world)], device=device)
        owner = torch.searchsorted(stops, idx, right=True)
        got = _all_gather(packed, group, world, coll)  # [world, B, 1 + D]
        win = got[owner, torch.arange(B, device=device)]
        best_E, best, best_index = win[:, 0], win[:, 1:].reshape((B,) + event), idx
    else:
        if n > 0 and not failed:
            li = score.argmax(dim=1)  # the first maximum, as the single-process selection
            s = _row_pick(score, li)
            e = _row_pick(local.energy, li)
            state = _row_pick(local.y, li).reshape(B, D)
            gi = li + start
        else:
            s = torch.full((B,), float("-inf"), device=device, dtype=dtype)
            e = torch.full((B,), float("nan"), device=device, dtype=dtype)
            state = torch.zeros(B, D, device=device, dtype=dtype)
            gi = torch.full((B,), K, dtype=torch.long, device=device)
        packed = torch.cat([s.unsqueeze(1), e.unsqueeze(1), state], dim=1)
        ints = torch.cat([ok, gi.to(torch.long)])
        all_ints = _all_gather(ints, group, world, coll)  # [world, 1 + B]
        got = _all_gather(packed, group, world, coll)  # [world, B, 2 + D]
        _raise_if_failed(all_ints[:, 0], error, where)
        scores, indices = got[:, :, 0], all_ints[:, 1:]  # [world, B]
        # among the ranks holding the best score, the lowest global index (the global indices differ: a rank
        # with no candidates has K and scores -inf, never below rank 0's index when all score -inf)
        tied = scores == scores.max(dim=0, keepdim=True).values
        best_index, first = torch.where(tied, indices, K + 1).min(dim=0)
        win = got[first, torch.arange(B, device=device)]
        best_E, best = win[:, 1], win[:, 2:].reshape((B,) + event)
    return ShardedResult(best=best, best_energy=best_E, best_index=best_index, start=start, stop=stop, y=local.y,
                         energy=local.energy, initial_energy=local.initial_energy, steps=local.steps,
                         status=local.status, trajectory=local.trajectory, trajectory_y=local.trajectory_y)


def _raise_if_failed(ok: Tensor, error: Optional[BaseException], where: str = "pyebm.distributed.minimize") -> None:
    if error is not None:
        raise error
    failed: List[int] = [r for r, v in enumerate(ok.tolist()) if v == 0]
    if failed:
        raise RuntimeError(f"{where}: the descent failed on rank(s) {failed} (their error says "
                           "why)")
