"""One rank of the ``pyebm.distributed`` tests: ``python distributed_worker.py RANK WORLD STORE OUT``.

Joins a gloo process group through a file store, runs every case of ``CASES`` and every error case of
``ERRORS`` with ``pyebm.distributed.minimize``, the cases of ``MINIMIZE_CASES`` and ``MINIMIZE_ERRORS`` with
``pyebm.minimize(..., process_group=)`` and those of ``ACT_CASES`` and ``ACT_ERRORS`` with
``EnergyPolicy.act(..., process_group=)``, and saves what each returned or raised to OUT/<case>.<rank>.pt.
``tests/test_distributed.py`` starts the ranks and compares their results with single-process
``pyebm.minimize`` / ``act`` computed in the test process from the same cases.
"""
from __future__ import annotations

import datetime
import os
import sys

import torch

import pyebm


def _mlp(context_dim=3, candidate_dim=2, hidden=(16,), seed=0, **kw):
    torch.manual_seed(seed)
    return pyebm.MLPEnergy(context_dim=context_dim, candidate_dim=candidate_dim, hidden=hidden, **kw).double()


def _quadratic(x, y):
    """E = sum over the event of (y - x)^2, x broadcast over candidates and the event's leading dims."""
    return ((y - x.view(x.shape[0], 1, 1, -1)) ** 2).flatten(2).sum(-1)


def _ties(x, y):
    """E = ||y||^2, NaN for the contexts whose x is negative."""
    E = (y ** 2).sum(-1)
    return torch.where(x[:, :1] < 0, float("nan"), E)


def _ctx(B, d, seed):
    return torch.randn(B, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def case(name):
    """(energy, context, kwargs of minimize) of a case: built the same way in every process."""
    if name == "mlp_min":  # the one-call path; 7 candidates: shards of 4 and 3
        return _mlp(), _ctx(3, 3, 1), dict(candidates=7, config=pyebm.Descent.gd(steps=5, step_size=0.1),
                                            generator=0)
    if name == "mlp_max_gap":  # the per-step path with bounds, momentum, uniform init, early exit
        cfg = pyebm.Descent.gd(steps=6, step_size=0.2, momentum=0.5, lower=-1.0, upper=1.0, selection="max_gap",
                               tol=1e-3)
        return _mlp(seed=1), _ctx(4, 3, 2), dict(candidates=5, config=cfg, init="uniform", whole_loop=False,
                                                  generator=3)
    if name == "autograd_init_mask":  # a plain function, a 2-d event, an init tensor and a shared mask
        g = torch.Generator().manual_seed(4)
        B, K = 2, 3
        init = torch.randn(B, K, 2, 3, generator=g, dtype=torch.float64)
        mask = torch.zeros(2, 3, dtype=torch.bool)
        mask[0, 1] = True
        return _quadratic, _ctx(B, 3, 5), dict(candidates=K, config=pyebm.Descent.gd(steps=4, selection="max"),
                                               init=init, mask=mask)
    if name == "sample":  # softmax sampling over all K, drawn once from the common generator
        cfg = pyebm.Descent.gd(steps=3, selection="sample", selection_temperature=0.05)
        return _mlp(seed=2), _ctx(5, 3, 6), dict(candidates=6, config=cfg, generator=7)
    if name == "one_candidate":  # K = 1 < world size: rank 1 holds nothing
        return _mlp(seed=3), _ctx(2, 3, 8), dict(candidates=1, config=pyebm.Descent.gd(steps=3), generator=9)
    if name == "ties":  # equal best candidates across and within shards; a context whose energies are all NaN
        y = torch.tensor([[3.0, 2.0, 1.0, 1.0, 2.0, 3.0],   # tie at 2 (rank 0) and 3 (rank 1): expect 2
                          [3.0, 2.0, 3.0, 2.0, 1.0, 1.0],   # tie at 4 and 5 (both rank 1): expect 4
                          [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]], dtype=torch.float64).unsqueeze(-1)
        x = torch.tensor([[1.0], [1.0], [-1.0]], dtype=torch.float64)
        return _ties, x, dict(candidates=6, config=pyebm.Descent.gd(steps=1, step_size=1e-3), init=y)
    if name == "record":
        return _mlp(seed=4), _ctx(2, 3, 10), dict(candidates=5, config=pyebm.Descent.gd(steps=3), generator=11,
                                                   record=True)
    if name == "langevin":  # noise: a stream per rank; compared with the ranks' own candidates
        cfg = pyebm.Descent.langevin(steps=4, step_size=0.05, temperature=0.1)
        return _mlp(seed=5), _ctx(3, 3, 12), dict(candidates=9, config=cfg, generator=13)
    if name == "no_generator":  # rank 0's seed for everyone; record=True keeps the initial states
        return _mlp(seed=6), _ctx(2, 3, 14), dict(candidates=4, config=pyebm.Descent.gd(steps=2), record=True)
    if name == "empty_batch":
        return _mlp(seed=7), torch.empty(0, 3, dtype=torch.float64), dict(candidates=3, generator=0)
    raise KeyError(name)


CASES = ("mlp_min", "mlp_max_gap", "autograd_init_mask", "sample", "one_candidate", "ties", "record", "langevin",
         "no_generator", "empty_batch")


class _FailsOnRank1:
    """A plain energy that raises on rank 1 during the descent."""

    def __init__(self, rank):
        self.rank = rank

    def __call__(self, x, y):
        if self.rank == 1:
            raise ArithmeticError("energy failed on purpose")
        return _quadratic(x, y)


def error_case(name, rank):
    """(energy, context, kwargs) of a call that must raise on every rank (and leave none waiting)."""
    energy, x, kw = case("mlp_min")
    if name == "config_differs":
        kw["config"] = pyebm.Descent.gd(steps=5 + rank)
    elif name == "candidates_differ":
        kw["candidates"] = 4 + rank
    elif name == "zero_candidates":
        kw["candidates"] = 0
    elif name == "zero_candidates_rank1":
        kw["candidates"] = 0 if rank == 1 else 4
    elif name == "dfo":
        kw["config"] = pyebm.Descent.ibc_dfo()
    elif name == "rms_all":
        kw["config"] = pyebm.Descent.gd(normalize="rms_all")
    elif name == "generator_differs":
        kw["generator"] = torch.Generator().manual_seed(rank)
    elif name == "descent_fails_rank1":
        energy, x, kw = _FailsOnRank1(rank), _ctx(2, 3, 0), dict(candidates=4, event_shape=(1, 3), generator=0)
    elif name == "bad_group":
        kw["group"] = "world"
    else:
        raise KeyError(name)
    return energy, x, kw


ERRORS = ("config_differs", "candidates_differ", "zero_candidates", "zero_candidates_rank1", "dfo", "rms_all",
          "generator_differs", "descent_fails_rank1", "bad_group")


# -- pyebm.minimize(..., process_group=) -----------------------------------------------------------------

MINIMIZE_CASES = ("mlp_min", "mlp_max_gap", "autograd_init_mask", "sample", "record")


def minimize_error_case(name, rank):
    """(energy, context, kwargs of pyebm.minimize without process_group) of a call that must raise on every
    rank."""
    energy, x, kw = case("mlp_min")
    if name == "pg_cuda_graph":
        kw["cuda_graph"] = True
    elif name == "pg_snapshots":
        kw["snapshots"] = [1, 2]
    elif name == "pg_snapshots_rank1":  # only rank 1 asks for what cannot be sharded: rank 0 must not wait
        kw["snapshots"] = [1] if rank == 1 else None
    elif name == "pg_final_energy":
        kw.update(candidates=1, final_energy=False)
    elif name == "pg_dfo":
        kw["config"] = pyebm.Descent.ibc_dfo()
    elif name == "pg_tol_all":
        kw["config"] = pyebm.Descent.gd(tol=1e-3, tol_scope="all")
    else:
        raise KeyError(name)
    return energy, x, kw


MINIMIZE_ERRORS = ("pg_cuda_graph", "pg_snapshots", "pg_snapshots_rank1", "pg_final_energy", "pg_dfo", "pg_tol_all")


# -- EnergyPolicy.act(..., process_group=) --------------------------------------------------------------

def act_case(name, rank=0):
    """(policy, observations, kwargs of act without process_group): built the same way in every process."""
    from pyebm.policies import EnergyPolicy

    g = torch.Generator().manual_seed(20)
    if name in ("act_mlp", "act_warm", "act_recovery", "act_recovery_rank1", "act_nan_rank1"):
        energy = _mlp(context_dim=2 * 3, candidate_dim=3 * 2, hidden=(16, 16), seed=8, residual=True)
        recovery = name == "act_recovery" or (name == "act_recovery_rank1" and rank == 1)
        policy = EnergyPolicy(energy, pyebm.Descent.gd(steps=4, step_size=0.2, momentum=0.5), candidates=7,
                              horizon=3, action_dim=2, n_obs_steps=2, bounds=(-1.0, 1.0), warm_start=name == "act_warm",
                              recovery_threshold=0.0 if recovery else None)
        obs = torch.randn(3, 2, 3, generator=g, dtype=torch.float64)
        if name == "act_nan_rank1" and rank == 1:
            obs[1, 0, 2] = float("nan")
        return policy, obs, dict(generator=5)
    if name == "act_init":  # the caller's candidates: K = 5 of 4 observations, shards of 3 and 2
        energy = _mlp(context_dim=3, candidate_dim=2 * 2, hidden=(16,), seed=9)
        policy = EnergyPolicy(energy, pyebm.Descent.gd(steps=3, step_size=0.1, selection="max_gap"), candidates=5,
                              horizon=2, action_dim=2, n_obs_steps=1)
        obs = torch.randn(4, 3, generator=g, dtype=torch.float64)
        return policy, obs, dict(init=torch.randn(4, 5, 2, 2, generator=g, dtype=torch.float64))
    if name == "act_ebt":  # an EBTPolicy: the observation side prepared once, K = 4 chunks of [4, 2]
        from pyebm.models import EBTPolicy

        torch.manual_seed(10)
        model = EBTPolicy(action_dim=2, horizon=4, cond_dim=6, embed_dim=8, layers=1, heads=2,
                          n_obs_steps=2).double()
        policy = EnergyPolicy.ebt_policy(model, candidates=4, max_steps=3)
        obs = torch.randn(2, 2, 6, generator=g, dtype=torch.float64)
        return policy, obs, dict(generator=3)
    if name == "act_dfo":
        policy = EnergyPolicy.ibc(action_dim=2, obs_dim=3, horizon=2, n_obs_steps=2, hidden=(8,), method="dfo",
                                  candidates=8, steps=2)
        return policy, torch.randn(2, 2, 3, generator=g), dict(generator=0)
    raise KeyError(name)


ACT_CASES = ("act_mlp", "act_warm", "act_init", "act_ebt")
ACT_ERRORS = ("act_recovery", "act_recovery_rank1", "act_nan_rank1", "act_dfo")


def _act_fields(policy, actions):
    r = policy.last_result
    return {"actions": actions, "chunk": r.chunk, "y": r.y, "energy": r.energy, "best_energy": r.best_energy,
            "best_index": r.best_index, "steps": r.steps, "status": r.status, "start": r.descent.start,
            "stop": r.descent.stop}


def _run_and_spy(fn):
    """(fn(), the shapes of the tensors this rank sent in each all-gather)."""
    import torch.distributed as dist

    real, shapes = dist.all_gather, []

    def spy(parts, t, group=None, async_op=False):
        shapes.append(tuple(t.shape))
        return real(parts, t, group=group, async_op=async_op)

    dist.all_gather = spy
    try:
        return fn(), shapes
    finally:
        dist.all_gather = real


def _error_of(fn):
    try:
        fn()
        return {"error": None}
    except Exception as exc:
        return {"error": type(exc).__name__, "message": str(exc)}


def _fields(res):
    return {k: getattr(res, k) for k in ("best", "best_energy", "best_index", "start", "stop", "y", "energy",
                                         "initial_energy", "steps", "status", "trajectory", "trajectory_y")}


def main(rank: int, world: int, store: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=30))
    try:
        for name in ERRORS:
            energy, x, kw = error_case(name, rank)
            try:
                pyebm.distributed.minimize(energy, x, **kw)
                got = {"error": None}
            except Exception as exc:
                got = {"error": type(exc).__name__, "message": str(exc)}
            torch.save(got, os.path.join(out, f"{name}.{rank}.pt"))
        for name in CASES:  # after the errors: the group still works
            energy, x, kw = case(name)
            if name == "no_generator":  # different default generators: rank 0's seed must be used by all
                torch.manual_seed(100 + rank)
            real, shapes = dist.all_gather, []

            def spy(parts, t, group=None, async_op=False):  # what this rank sends in each all-gather
                shapes.append(tuple(t.shape))
                return real(parts, t, group=group, async_op=async_op)

            dist.all_gather = spy
            try:
                res = pyebm.distributed.minimize(energy, x, **kw)
            finally:
                dist.all_gather = real
            torch.save(shapes, os.path.join(out, f"{name}_sent.{rank}.pt"))
            if name == "langevin":  # the same call again: reproducible
                again = pyebm.distributed.minimize(energy, x, **kw)
                torch.save(_fields(again), os.path.join(out, f"{name}_again.{rank}.pt"))
            torch.save(_fields(res), os.path.join(out, f"{name}.{rank}.pt"))
        world_group = dist.group.WORLD
        for name in MINIMIZE_ERRORS:
            energy, x, kw = minimize_error_case(name, rank)
            got = _error_of(lambda: pyebm.minimize(energy, x, **kw, process_group=world_group))
            torch.save(got, os.path.join(out, f"{name}.{rank}.pt"))
        energy, x, kw = case("mlp_min")
        torch.save(_error_of(lambda: pyebm.minimize(energy, x, **kw, process_group="world")),
                   os.path.join(out, f"pg_bad_group.{rank}.pt"))
        for name in MINIMIZE_CASES:
            energy, x, kw = case(name)
            res, shapes = _run_and_spy(lambda: pyebm.minimize(energy, x, **kw, process_group=world_group))
            torch.save(shapes, os.path.join(out, f"pg_{name}_sent.{rank}.pt"))
            torch.save(_fields(res), os.path.join(out, f"pg_{name}.{rank}.pt"))
        for name in ACT_ERRORS:
            policy, obs, kw = act_case(name, rank)
            got = _error_of(lambda: policy.act(obs, **kw, process_group=world_group))
            torch.save(got, os.path.join(out, f"{name}.{rank}.pt"))
        for name in ACT_CASES:
            policy, obs, kw = act_case(name, rank)
            actions, shapes = _run_and_spy(lambda: policy.act(obs, **kw, process_group=world_group))
            torch.save(shapes, os.path.join(out, f"{name}_sent.{rank}.pt"))
            torch.save(_act_fields(policy, actions), os.path.join(out, f"{name}.{rank}.pt"))
            if name == "act_warm":  # a second act: candidate 0 starts from the first act's chunk
                actions = policy.act(obs.flip(0), generator=6, process_group=world_group)
                torch.save(_act_fields(policy, actions), os.path.join(out, f"{name}_second.{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
