"""PolicyAdapter (pyebm.adapter): the action queue of select_action, reset, and normalisation in and out."""
from __future__ import annotations

import pytest
import torch

import pyebm
from pyebm import MLPEnergy
from pyebm.adapter import PolicyAdapter
from pyebm.models import EBTPolicy
from pyebm.policies import EnergyPolicy

pytestmark = pytest.mark.skipif(not pyebm.backends()["cpu"], reason="extension pyebm._C not built")

DT = torch.float64


def ibc_policy(horizon=5, n_action_steps=4, **kwargs):
    torch.manual_seed(0)
    energy = MLPEnergy(2 * 3, horizon * 2, hidden=(16, 16), residual=True, dtype=DT)
    return EnergyPolicy.ibc(energy, action_dim=2, obs_dim=3, horizon=horizon, n_obs_steps=2,
                            n_action_steps=n_action_steps, candidates=6, steps=3, **kwargs)


def counting(policy):
    """Record every act() call: (the observation it got, the actions it returned)."""
    calls = []
    act = policy.act

    def wrapped(obs, *args, **kwargs):
        out = act(obs, *args, **kwargs)
        calls.append((obs.clone(), out.clone()))
        return out

    policy.act = wrapped
    return calls


@pytest.mark.parametrize("n", [1, 3, 4])
def test_one_act_per_n_action_steps_calls_and_actions_in_order(n):
    policy = ibc_policy()
    calls = counting(policy)
    adapter = PolicyAdapter(policy, n_action_steps=n)
    obs = torch.randn(3, 2, 3, dtype=DT)
    got = []
    for i in range(11):
        got.append(adapter.select_action(obs + i, generator=i))
        assert len(calls) == i // n + 1  # act runs on the calls 0, n, 2n, ...
    assert all(a.shape == (3, 2) for a in got)
    for i, a in enumerate(got):
        chunk = calls[i // n][1]
        assert torch.equal(a, chunk[:, i % n])  # the chunk's first n actions, in order
        assert torch.equal(calls[i // n][0], obs + (i // n) * n)  # the observation of the refilling call


def test_default_n_action_steps_and_batch_of_one():
    policy = ibc_policy(n_action_steps=3)
    calls = counting(policy)
    adapter = PolicyAdapter(policy)
    assert adapter.n_action_steps == 3
    obs = torch.randn(1, 2, 3, dtype=DT)
    out = [adapter.select_action(obs) for _ in range(3)]
    assert len(calls) == 1 and torch.equal(torch.stack(out, 1), calls[0][1])


def test_reset_empties_the_queue_and_resets_the_policy():
    policy = ibc_policy(warm_start=True)
    calls = counting(policy)
    adapter = PolicyAdapter(policy)
    obs = torch.randn(2, 2, 3, dtype=DT)
    adapter.select_action(obs)
    assert policy._previous is not None
    adapter.reset()
    assert len(adapter._queue) == 0 and policy._previous is None and policy.last_result is None
    adapter.select_action(obs)
    assert len(calls) == 2


def test_batch_size_change_needs_a_reset():
    adapter = PolicyAdapter(ibc_policy())
    adapter.select_action(torch.randn(2, 2, 3, dtype=DT))
    with pytest.raises(ValueError, match="call reset"):
        adapter.select_action(torch.randn(3, 2, 3, dtype=DT))
    adapter.reset()
    assert adapter.select_action(torch.randn(3, 2, 3, dtype=DT)).shape == (3, 2)


@pytest.mark.parametrize("obs_mode", ["mean_std", "min_max"])
@pytest.mark.parametrize("act_mode", ["mean_std", "min_max"])
def test_normalisation_against_manual_computation(obs_mode, act_mode):
    g = torch.Generator().manual_seed(3)
    if obs_mode == "mean_std":
        obs_stats = {"mean": torch.randn(3, generator=g), "std": torch.rand(3, generator=g) + 0.5}
    else:
        lo = torch.randn(2, 3, generator=g)
        obs_stats = {"min": lo, "max": lo + torch.rand(2, 3, generator=g) + 0.5}
    if act_mode == "mean_std":
        act_stats = {"mean": [0.5, -1.0], "std": [2.0, 0.25]}
    else:
        act_stats = {"min": torch.tensor([-3.0, 0.0]), "max": torch.tensor([1.0, 10.0])}
    eps = 1e-6
    policy = ibc_policy()
    calls = counting(policy)
    adapter = PolicyAdapter(policy, n_action_steps=3, observation_stats=obs_stats, action_stats=act_stats, eps=eps)
    obs = 4 * torch.randn(5, 2, 3, generator=g, dtype=DT)

    def norm(x, stats):
        s = {k: torch.as_tensor(v, dtype=DT) for k, v in stats.items()}
        if "mean" in s:
            return (x - s["mean"]) / (s["std"] + eps)
        return (x - s["min"]) / (s["max"] - s["min"] + eps) * 2 - 1

    def unnorm(x, stats):
        s = {k: torch.as_tensor(v, dtype=DT) for k, v in stats.items()}
        if "mean" in s:
            return x * (s["std"] + eps) + s["mean"]
        return (x + 1) / 2 * (s["max"] - s["min"] + eps) + s["min"]

    got = torch.stack([adapter.select_action(obs, generator=7) for _ in range(3)], dim=1)
    seen, raw = calls[0]
    torch.testing.assert_close(seen, norm(obs, obs_stats), rtol=0, atol=0)
    torch.testing.assert_close(got, unnorm(raw[:, :3], act_stats), rtol=0, atol=0)
    # independently: the policy itself on the normalised observation with the same seed
    want = unnorm(policy.act(norm(obs, obs_stats), generator=7)[:, :3], act_stats)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # the two maps are inverses
    x = torch.randn(4, 2, generator=g, dtype=DT)
    torch.testing.assert_close(adapter.action_norm.normalize(adapter.unnormalize_action(x)), x)
    o = torch.randn(4, 2, 3, generator=g, dtype=DT)
    torch.testing.assert_close(adapter.observation_norm.unnormalize(adapter.normalize_observation(o)), o)


def test_float32_observations_use_float32_statistics():
    torch.manual_seed(0)
    energy = MLPEnergy(6, 2 * 2, hidden=(8,), dtype=torch.float32)
    policy = EnergyPolicy.ibc(energy, action_dim=2, obs_dim=3, horizon=2, n_obs_steps=2, candidates=4, steps=2)
    adapter = PolicyAdapter(policy, observation_stats={"mean": [0.1, 0.2, 0.3], "std": [1.0, 2.0, 3.0]})
    a = adapter.select_action(torch.randn(2, 2, 3))
    assert a.dtype == torch.float32 and a.shape == (2, 2)


def test_ebt_policy_with_token_observations():
    torch.manual_seed(0)
    model = EBTPolicy(action_dim=3, horizon=6, cond_dim=8, embed_dim=16, layers=1, heads=2, n_obs_steps=2, dtype=DT)
    policy = EnergyPolicy.ebt_policy(model, alpha=2.0, max_steps=3, candidates=2, n_action_steps=4)
    calls = counting(policy)
    adapter = PolicyAdapter(policy, n_action_steps=2, observation_stats={"mean": torch.zeros(8), "std": torch.ones(8)},
                            action_stats={"mean": torch.ones(3), "std": 2 * torch.ones(3)})
    obs = torch.randn(2, 4, 8, dtype=DT)
    a0, a1, a2 = (adapter.select_action(obs, generator=1) for _ in range(3))
    assert len(calls) == 2
    torch.testing.assert_close(a1, calls[0][1][:, 1] * (2 + 1e-8) + 1, rtol=0, atol=0)


def test_bad_arguments():
    policy = ibc_policy(n_action_steps=3)
    with pytest.raises(TypeError, match="policy must be a pyebm.policies.EnergyPolicy"):
        PolicyAdapter(policy.energy)
    for n in (0, 4, 2.0, True):
        with pytest.raises(ValueError, match=r"n_action_steps must be an int in 1\.\.3"):
            PolicyAdapter(policy, n_action_steps=n)
    with pytest.raises(ValueError, match="warm_start"):
        PolicyAdapter(ibc_policy(n_action_steps=3, warm_start=True), n_action_steps=2)
    with pytest.raises(ValueError, match="keys 'mean' and 'std', or 'min' and 'max'"):
        PolicyAdapter(policy, observation_stats={"mean": 0.0})
    with pytest.raises(TypeError, match="must be a mapping"):
        PolicyAdapter(policy, action_stats=[0.0, 1.0])
    with pytest.raises(ValueError, match="std'\\] must be >= 0"):
        PolicyAdapter(policy, observation_stats={"mean": 0.0, "std": -1.0})
    with pytest.raises(ValueError, match="must be >= .*min"):
        PolicyAdapter(policy, observation_stats={"min": 1.0, "max": 0.0})
    with pytest.raises(ValueError, match="same shape"):
        PolicyAdapter(policy, observation_stats={"mean": [0.0, 1.0], "std": [1.0]})
    with pytest.raises(ValueError, match="finite"):
        PolicyAdapter(policy, observation_stats={"mean": float("nan"), "std": 1.0})
    with pytest.raises(ValueError, match=r"action_stats must be numbers or \[action_dim=2\]"):
        PolicyAdapter(policy, action_stats={"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]})
    with pytest.raises(ValueError, match="eps must be"):
        PolicyAdapter(policy, eps=-1.0)
    adapter = PolicyAdapter(policy, observation_stats={"mean": torch.zeros(4), "std": torch.ones(4)})
    with pytest.raises(ValueError, match=r"observation_stats of shape \[4\] do not broadcast"):
        adapter.select_action(torch.randn(2, 2, 3, dtype=DT))
    with pytest.raises(TypeError, match="batched tensor"):
        adapter.select_action([1.0, 2.0])
