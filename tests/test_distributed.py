"""``pyebm.distributed.minimize``, ``pyebm.minimize(..., process_group=)`` and ``EnergyPolicy.act(...,
process_group=)`` on two gloo ranks (CPU processes) against single-process ``pyebm.minimize`` / ``act``.

The ranks run ``tests/distributed_worker.py`` once per module (every case and error case in one process
group); each test compares what they saved with a single-process call made here from the same case.
"""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pyebm
from pyebm.distributed import shard_range

pytestmark = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")

HERE = Path(__file__).resolve().parent
WORLD = 2

_spec = importlib.util.spec_from_file_location("distributed_worker", HERE / "distributed_worker.py")
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Runs the worker on WORLD ranks; returns load(name, rank) of what rank saved for a case."""
    tmp = tmp_path_factory.mktemp("dist")
    out = tmp / "out"
    out.mkdir()
    env = dict(os.environ, PYTHONPATH=str(HERE.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only, whatever the host name resolves to
    procs = [subprocess.Popen([sys.executable, str(HERE / "distributed_worker.py"), str(r), str(WORLD),
                               str(tmp / "store"), str(out)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(WORLD)]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=120)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("the distributed ranks did not finish in 120 s")
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} failed:\n{logs[r]}"
    return lambda name, rank: torch.load(out / f"{name}.{rank}.pt")


def _reference(name, **changes):
    energy, x, kw = worker.case(name)
    kw.update(changes)
    return pyebm.minimize(energy, x, **kw)


def _close(a, b):
    # The shards run the same per-candidate arithmetic as the whole batch; float64, so any difference in
    # the order of a reduction between batch sizes stays far below this tolerance.
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, equal_nan=True)


def test_shard_range_is_tensor_split():
    for K in range(1, 10):
        for W in range(1, 5):
            parts = torch.tensor_split(torch.arange(K), W)
            for r in range(W):
                start, stop = shard_range(K, r, W)
                assert list(range(start, stop)) == parts[r].tolist()


def test_needs_an_initialised_group():
    import torch.distributed as dist

    assert not dist.is_initialized()
    energy, x, kw = worker.case("mlp_min")
    with pytest.raises(RuntimeError, match="init_process_group"):
        pyebm.distributed.minimize(energy, x, **kw)


@pytest.mark.parametrize("name", ["mlp_min", "mlp_max_gap", "autograd_init_mask", "sample", "one_candidate",
                                  "ties", "record"])
def test_equals_single_process(ranks, name):
    ref = _reference(name)
    K = ref.y.shape[1]
    results = [ranks(name, r) for r in range(WORLD)]
    for r, got in enumerate(results):
        start, stop = shard_range(K, r, WORLD)
        assert (got["start"], got["stop"]) == (start, stop)
        assert torch.equal(got["best_index"], ref.best_index)
        _close(got["best"], ref.best)
        _close(got["best_energy"], ref.best_energy)
        # this rank's candidates: the single-process candidates start:stop
        _close(got["y"], ref.y[:, start:stop])
        _close(got["energy"], ref.energy[:, start:stop])
        _close(got["initial_energy"], ref.initial_energy[:, start:stop])
        assert torch.equal(got["steps"], ref.steps[:, start:stop])
        assert torch.equal(got["status"], ref.status[:, start:stop])
        if ref.trajectory is not None:
            _close(got["trajectory"], ref.trajectory[:, :, start:stop])
            _close(got["trajectory_y"], ref.trajectory_y[:, :, start:stop])
    for key in ("best", "best_energy", "best_index"):  # every rank returns the same, bit for bit
        assert torch.equal(results[0][key], results[1][key]) or key == "best_energy" and \
            torch.equal(results[0][key].isnan(), results[1][key].isnan())


@pytest.mark.parametrize("name", ["mlp_min", "sample"])
def test_sends_best_pairs_and_winners_only(ranks, name):
    """Each rank sends: the agreement (6 checks, an error flag, a seed), then per context its best (score,
    energy, state) and (flag, global index); "sample" sends its scores (padded to the largest shard) and the
    drawn candidate's state instead. Never the K candidates' states."""
    ref = _reference(name)
    B, K, D = ref.y.shape
    width = -(-K // WORLD)
    expected = [(8,), (1 + B,), (B, 2 + D)] if name == "mlp_min" else [(8,), (2,), (B, width), (B, 1 + D)]
    for r in range(WORLD):
        assert ranks(f"{name}_sent", r) == expected


def test_ties_go_to_the_lowest_global_index(ranks):
    for r in range(WORLD):
        assert ranks("ties", r)["best_index"].tolist() == [2, 4, 0]


def test_fewer_candidates_than_ranks(ranks):
    got = ranks("one_candidate", 1)
    assert (got["start"], got["stop"]) == (1, 1)
    assert got["y"].shape == (2, 0, 2) and got["energy"].shape == (2, 0)
    assert got["best_index"].tolist() == [0, 0]


def _concat(ranks, name, key):
    return torch.cat([ranks(name, r)[key] for r in range(WORLD)], dim=-1 if key != "y" else 1)


def test_noise_streams_pick_the_best_of_all_shards(ranks):
    """With noise each rank has its own stream (not the single-process one): the winner must still be the
    lowest energy over every rank's candidates, the same on every rank, and the same for the same seed."""
    energy = _concat(ranks, "langevin", "energy")
    y = _concat(ranks, "langevin", "y")
    idx = energy.argmin(dim=1)
    ar = torch.arange(energy.shape[0])
    for r in range(WORLD):
        got = ranks("langevin", r)
        assert torch.equal(got["best_index"], idx)
        assert torch.equal(got["best_energy"], energy[ar, idx])
        assert torch.equal(got["best"], y[ar, idx])
        again = ranks("langevin_again", r)
        for key in ("best", "best_index", "y", "energy"):
            assert torch.equal(again[key], got[key])
    # the candidates differ from what one process finds with the same seed (a stream per rank)
    ref = _reference("langevin")
    assert not torch.allclose(y, ref.y)


def test_without_generator_every_rank_uses_rank0_seed(ranks):
    # the worker seeds rank r's default generator with 100 + r; rank 0 draws the common seed from it
    torch.manual_seed(100)
    seed = int(torch.randint(0, 2 ** 62, (), dtype=torch.int64))
    energy, x, kw = worker.case("no_generator")
    ref = pyebm.minimize(energy, x, **kw, generator=seed)
    for r in range(WORLD):
        got = ranks("no_generator", r)
        start, stop = shard_range(4, r, WORLD)
        _close(got["trajectory_y"][0], ref.trajectory_y[0][:, start:stop])
        assert torch.equal(got["best_index"], ref.best_index)
        _close(got["best"], ref.best)


def test_empty_batch(ranks):
    for r in range(WORLD):
        got = ranks("empty_batch", r)
        start, stop = shard_range(3, r, WORLD)
        assert got["best"].shape == (0, 2) and got["best_index"].shape == (0,)
        assert got["y"].shape == (0, stop - start, 2)


ERRORS = {
    "config_differs": [("ValueError", r"same config; rank\(s\) \[1\] differ")] * 2,
    "candidates_differ": [("ValueError", r"same candidates; .*\[4, 5\]")] * 2,
    "zero_candidates": [("ValueError", r"candidates must be an int >= 1")] * 2,
    "zero_candidates_rank1": [("ValueError", r"invalid on rank\(s\) \[1\]"),
                              ("ValueError", r"candidates must be an int >= 1")],
    "dfo": [("ValueError", r"'dfo'")] * 2,
    "rms_all": [("ValueError", r"'rms_all'")] * 2,
    "generator_differs": [("ValueError", r"same generator state")] * 2,
    "descent_fails_rank1": [("RuntimeError", r"failed on rank\(s\) \[1\]"),
                            ("ArithmeticError", r"on purpose")],
    "bad_group": [("TypeError", r"group must be a torch.distributed.ProcessGroup")] * 2,
}


@pytest.mark.parametrize("name", sorted(ERRORS))
def test_errors_reach_every_rank(ranks, name):
    """A bad call raises on every rank (none is left waiting in a collective); the group stays usable (the
    worker runs the other cases afterwards)."""
    import re

    assert set(ERRORS) == set(worker.ERRORS)
    for r, (kind, pattern) in enumerate(ERRORS[name]):
        got = ranks(name, r)
        assert got["error"] == kind, got
        assert re.search(pattern, got["message"]), got["message"]


# -- pyebm.minimize(..., process_group=) ------------------------------------------------------------------

@pytest.mark.parametrize("name", ["mlp_min", "mlp_max_gap", "autograd_init_mask", "sample", "record"])
def test_minimize_with_process_group_equals_single_process(ranks, name):
    """pyebm.minimize delegates to the sharded descent: the same result as pyebm.distributed.minimize (bit for
    bit: the same code) and as one process, and the same all-gathers."""
    ref = _reference(name)
    K = ref.y.shape[1]
    for r in range(WORLD):
        got, direct = ranks(f"pg_{name}", r), ranks(name, r)
        for key, value in got.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, direct[key]) or torch.equal(value.isnan(), direct[key].isnan()) and \
                    torch.equal(value.nan_to_num(), direct[key].nan_to_num()), key
            else:
                assert value == direct[key], key
        start, stop = shard_range(K, r, WORLD)
        assert torch.equal(got["best_index"], ref.best_index)
        _close(got["best"], ref.best)
        _close(got["best_energy"], ref.best_energy)
        _close(got["y"], ref.y[:, start:stop])
        assert ranks(f"pg_{name}_sent", r) == ranks(f"{name}_sent", r)


MINIMIZE_ERRORS = {
    "pg_cuda_graph": [("ValueError", r"minimize\(process_group=...\): cuda_graph=True")] * 2,
    "pg_snapshots": [("ValueError", r"minimize\(process_group=...\): snapshots are not collected")] * 2,
    "pg_snapshots_rank1": [("ValueError", r"minimize\(process_group=...\): the arguments were invalid on "
                                          r"rank\(s\) \[1\]"),
                           ("ValueError", r"snapshots are not collected")],
    "pg_final_energy": [("ValueError", r"final_energy=False skips the final energies")] * 2,
    "pg_dfo": [("ValueError", r"minimize\(process_group=...\): config.method 'dfo'")] * 2,
    "pg_tol_all": [("ValueError", r"config.tol_scope 'all'")] * 2,
    "pg_bad_group": [("TypeError", r"minimize\(process_group=...\): process_group must be a "
                                   r"torch.distributed.ProcessGroup")] * 2,
}


@pytest.mark.parametrize("name", sorted(MINIMIZE_ERRORS))
def test_minimize_with_process_group_refuses_on_every_rank(ranks, name):
    import re

    assert set(MINIMIZE_ERRORS) == set(worker.MINIMIZE_ERRORS) | {"pg_bad_group"}
    for r, (kind, pattern) in enumerate(MINIMIZE_ERRORS[name]):
        got = ranks(name, r)
        assert got["error"] == kind, got
        assert re.search(pattern, got["message"]), got["message"]


def test_minimize_without_process_group_needs_no_group():
    energy, x, kw = worker.case("mlp_min")
    assert isinstance(pyebm.minimize(energy, x, **kw, process_group=None), pyebm.DescentResult)


# -- EnergyPolicy.act(..., process_group=) ----------------------------------------------------------------

def _act_reference(name):
    policy, obs, kw = worker.act_case(name)
    actions = policy.act(obs, **kw)
    return policy, obs, actions


@pytest.mark.parametrize("name", ["act_mlp", "act_init", "act_ebt", "act_warm"])
def test_act_with_process_group_equals_single_process(ranks, name):
    policy, obs, actions = _act_reference(name)
    ref = policy.last_result
    K = policy.candidates
    for r in range(WORLD):
        got = ranks(name, r)
        start, stop = shard_range(K, r, WORLD)
        assert (got["start"], got["stop"]) == (start, stop)
        assert torch.equal(got["best_index"], ref.best_index)
        _close(got["actions"], actions)
        _close(got["chunk"], ref.chunk)
        _close(got["best_energy"], ref.best_energy)
        # this rank's candidates: the single-process candidates start:stop
        _close(got["y"], ref.y[:, start:stop])
        _close(got["energy"], ref.energy[:, start:stop])
        assert torch.equal(got["steps"], ref.steps[:, start:stop])
        assert torch.equal(got["status"], ref.status[:, start:stop])
    for key in ("actions", "best_index"):
        assert torch.equal(ranks(name, 0)[key], ranks(name, 1)[key])
    if name == "act_warm":  # the second act starts candidate 0 from the first's chunk, on every rank alike
        second = policy.act(obs.flip(0), generator=6)
        for r in range(WORLD):
            got = ranks("act_warm_second", r)
            _close(got["actions"], second)
            assert torch.equal(got["best_index"], policy.last_result.best_index)


def test_act_with_process_group_sends_best_pairs_and_winners_only(ranks):
    """Per observation each rank sends its best (score, energy, chunk) and (flag, global index), never its
    candidates' chunks."""
    policy, obs, _ = worker.act_case("act_mlp")
    B, D = obs.shape[0], policy.horizon * policy.action_dim
    for r in range(WORLD):
        assert ranks("act_mlp_sent", r) == [(8,), (1 + B,), (B, 2 + D)]


ACT_ERRORS = {
    "act_recovery": [("ValueError", r"EnergyPolicy.act: process_group cannot be combined with recovery_threshold")] * 2,
    "act_recovery_rank1": [("ValueError", r"EnergyPolicy.act: the arguments were invalid on rank\(s\) \[1\]"),
                           ("ValueError", r"cannot be combined with recovery_threshold")],
    "act_nan_rank1": [("ValueError", r"invalid on rank\(s\) \[1\]"),
                      ("ValueError", r"obs contains NaN or Inf \(batch rows \[1\]\)")],
    "act_dfo": [("ValueError", r"EnergyPolicy.act: config.method 'dfo'")] * 2,
}


@pytest.mark.parametrize("name", sorted(ACT_ERRORS))
def test_act_with_process_group_refuses_on_every_rank(ranks, name):
    import re

    assert set(ACT_ERRORS) == set(worker.ACT_ERRORS)
    for r, (kind, pattern) in enumerate(ACT_ERRORS[name]):
        got = ranks(name, r)
        assert got["error"] == kind, got
        assert re.search(pattern, got["message"]), got["message"]
