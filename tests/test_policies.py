"""EnergyPolicy: presets, bounds, warm start, recovery, IBC energies and bad input."""
import pytest
import torch

import pyebm
from pyebm.models import EBTPolicy
from pyebm.policies import EnergyPolicy
from pyebm.reference.descent import minimize_reference


def small_model(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    m = EBTPolicy(2, horizon=6, embed_dim=8, layers=1, heads=2, n_obs_steps=2, dtype=dtype)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return m


def obs_tokens(B, dtype=torch.float64):
    return torch.randn(B, 2, 8, dtype=dtype)


def test_act_shapes_and_result():
    m = small_model()
    pol = EnergyPolicy.ebt_policy(m, candidates=5, n_action_steps=4, max_steps=4)
    out = pol.act(obs_tokens(3), generator=0)
    assert out.shape == (3, 4, 2)
    r = pol.last_result
    assert r.y.shape == (3, 5, 6, 2) and r.energy.shape == (3, 5) and r.steps.shape == (3, 5)
    assert r.chunk.shape == (3, 6, 2) and r.recovered == 0 and int(r.retries.sum()) == 0
    torch.testing.assert_close(out, r.chunk[:, 1:5])
    torch.testing.assert_close(r.best_energy, r.energy.min(dim=1).values)


def test_energies_belong_to_returned_chunks():
    m = small_model()
    obs = obs_tokens(2)
    pol = EnergyPolicy.ebt_policy(m, candidates=3, max_steps=3)
    pol.act(obs, generator=1)
    r = pol.last_result
    torch.testing.assert_close(r.energy, m.energy(m.prepare(obs), r.y))


def test_same_seed_same_actions_with_noise():
    m = small_model()
    obs = obs_tokens(2)
    pol = EnergyPolicy.ebt_policy(m, candidates=4, noise=0.1, max_steps=5)
    a = pol.act(obs, generator=7)
    b = pol.act(obs, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    c = pol.act(obs, generator=8)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("bounds", [(-0.2, 0.3), (torch.tensor([-0.1, -0.5]), torch.tensor([0.4, 0.05]))])
def test_bounds_respected_exactly(bounds):
    m = small_model()
    pol = EnergyPolicy.ebt_policy(m, candidates=6, alpha=1000.0, max_steps=5, bounds=bounds)
    out = pol.act(obs_tokens(3), generator=0)
    lo = torch.as_tensor(bounds[0], dtype=torch.float64).expand(6, 2)
    hi = torch.as_tensor(bounds[1], dtype=torch.float64).expand(6, 2)
    r = pol.last_result
    assert bool((r.y >= lo).all() and (r.y <= hi).all())
    assert bool((out >= lo[1:]).all() and (out <= hi[1:]).all())
    # the bounds are active (the unbounded descent leaves the box)
    free = EnergyPolicy.ebt_policy(m, candidates=6, alpha=1000.0, max_steps=5).act(obs_tokens(3), generator=0)
    assert bool(((free < lo[1:]) | (free > hi[1:])).any())


def test_warm_start_seeds_candidate_zero_and_reset_forgets():
    m = small_model()
    obs1, obs2 = obs_tokens(2), obs_tokens(2)
    pol = EnergyPolicy.ebt_policy(m, candidates=3, max_steps=3, n_action_steps=2, warm_start=True)
    pol.act(obs1, generator=0)
    prev = pol.last_result.chunk.clone()
    warm = pol.act(obs2, generator=1)
    expected_init = torch.randn(2, 3, 6, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected_init[:, 0] = torch.cat([prev[:, 2:], prev[:, -1:].expand(2, 2, 2)], dim=1)
    cold = EnergyPolicy.ebt_policy(m, candidates=3, max_steps=3, n_action_steps=2)
    torch.testing.assert_close(warm, cold.act(obs2, init=expected_init), rtol=0, atol=0)
    # without a previous chunk the warm policy starts like a cold one
    pol.reset()
    assert pol.last_result is None
    torch.testing.assert_close(pol.act(obs2, generator=1), cold.act(obs2, generator=1), rtol=0, atol=0)


def test_recovery_reinitialises_high_energy_candidates():
    m = small_model()
    obs = obs_tokens(2)
    base = EnergyPolicy.ebt_policy(m, candidates=6, max_steps=3)
    base.act(obs, generator=3)
    E0 = base.last_result.energy
    thr = float(E0.median())
    pol = EnergyPolicy.ebt_policy(m, candidates=6, max_steps=3, recovery_threshold=thr, max_retries=1)
    pol.act(obs, generator=3)
    r = pol.last_result
    bad = E0 > thr
    assert r.recovered == int(bad.sum()) > 0
    assert torch.equal(r.retries, bad.to(torch.int32))
    # untouched candidates keep their first-round result; re-initialised ones took both rounds' steps
    torch.testing.assert_close(r.y[~bad], base.last_result.y[~bad], rtol=0, atol=0)
    assert bool((r.steps[bad] == 6).all()) and bool((r.steps[~bad] == 3).all())
    torch.testing.assert_close(r.energy, m.energy(m.prepare(obs), r.y))
    torch.testing.assert_close(r.best_energy, r.energy.min(dim=1).values)
    # bounded retries: an unreachable threshold re-initialises everything max_retries times
    pol = EnergyPolicy.ebt_policy(m, candidates=2, max_steps=2, recovery_threshold=-1e9, max_retries=2)
    pol.act(obs, generator=0)
    assert pol.last_result.recovered == 2 * 2 * 2
    assert bool((pol.last_result.retries == 2).all())


def test_ibc_langevin_matches_reference_descent():
    pol = EnergyPolicy.ibc(action_dim=2, obs_dim=3, horizon=2, n_obs_steps=2, n_action_steps=2, candidates=8,
                           steps=6, hidden=(16, 16, 16), bounds=(-1.0, 1.0), method="langevin")
    energy = pol.energy
    assert isinstance(energy, pyebm.MLPEnergy) and energy.residual
    assert energy.context_dim == 6 and energy.candidate_dim == 4
    torch.manual_seed(0)
    energy.double()
    obs = torch.randn(3, 2, 3, dtype=torch.float64)
    init = torch.rand(3, 8, 2, 2, dtype=torch.float64) * 2 - 1
    out = pol.act(obs, init=init, generator=5)
    assert out.shape == (3, 2, 2) and bool((out.abs() <= 1).all())
    cfg = pol.descent
    assert cfg.grad_scale == 0.5 and cfg.noise == "step" and cfg.step_schedule == "polynomial"
    ctx = energy.prepare(obs.reshape(3, 6))
    ref = minimize_reference(lambda y: energy.energy_and_grad(ctx, y), init.reshape(3, 8, 4), cfg,
                             generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(pol.last_result.y.reshape(3, 8, 4), ref.y)
    torch.testing.assert_close(out, ref.best.reshape(3, 2, 2))
    # the flat observation layout works too
    torch.testing.assert_close(pol.act(obs.reshape(3, 6), init=init, generator=5), out)


def test_ibc_dfo():
    torch.manual_seed(0)
    pol = EnergyPolicy.ibc(action_dim=2, obs_dim=3, horizon=1, n_obs_steps=2, candidates=64, hidden=(16, 16),
                           bounds=([-1.0, 0.0], [0.5, 2.0]), method="dfo")
    assert pol.descent.method == "dfo" and pol.descent.steps == 3
    out = pol.act(torch.randn(4, 2, 3), generator=0)
    assert out.shape == (4, 1, 2)
    assert bool((out[..., 0] >= -1).all() and (out[..., 0] <= 0.5).all())
    assert bool((out[..., 1] >= 0).all() and (out[..., 1] <= 2).all())
    assert EnergyPolicy.ibc(action_dim=1, obs_dim=1, method="dfo").candidates == 16384
    assert EnergyPolicy.ibc(action_dim=1, obs_dim=1).candidates == 512


def test_cpu_checks_every_step_for_early_exit():
    m = small_model()
    pol = EnergyPolicy.ebt_policy(m, min_grad=1e9, max_steps=20)     # converges at once
    pol.act(obs_tokens(1), generator=0)
    assert int(pol.last_result.steps.max()) == 2


def test_bad_inputs():
    m = small_model()
    with pytest.raises(ValueError, match="candidates must be an int >= 1; got 0"):
        EnergyPolicy.ebt_policy(m, candidates=0)
    with pytest.raises(ValueError, match=r"bounds low must be a number, \[action_dim=2\] or \[horizon=6, "
                                         r"action_dim=2\]; got shape \[3\]"):
        EnergyPolicy.ebt_policy(m, bounds=(torch.zeros(3), 1.0))
    with pytest.raises(ValueError, match="bounds high"):
        EnergyPolicy.ebt_policy(m, bounds=(0.0, torch.ones(5, 2)))
    with pytest.raises(ValueError, match="low must be <= high"):
        EnergyPolicy.ebt_policy(m, bounds=(1.0, 0.0))
    with pytest.raises(ValueError, match="pair"):
        EnergyPolicy.ebt_policy(m, bounds=1.0)
    with pytest.raises(ValueError, match="does not fit in horizon"):
        EnergyPolicy.ebt_policy(m, n_action_steps=6)
    pol = EnergyPolicy.ebt_policy(m, candidates=2, max_steps=2, n_action_steps=3)
    with pytest.raises(ValueError, match=r"obs must be observation tokens \[B, L, cond_dim=8\].*got shape \[2, 8\]"):
        pol.act(torch.randn(2, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="obs must be observation tokens"):
        pol.act(torch.randn(2, 3, 8, dtype=torch.float64))
    obs = obs_tokens(3)
    obs[1, 0, 2] = float("nan")
    obs[2, 1, 0] = float("inf")
    with pytest.raises(ValueError, match=r"obs contains NaN or Inf \(batch rows \[1, 2\]\)"):
        pol.act(obs)
    with pytest.raises(ValueError, match=r"init must be \[B, K, horizon, action_dim\] = \[2, 2, 6, 2\]"):
        pol.act(obs_tokens(2), init=torch.zeros(2, 3, 6, 2, dtype=torch.float64))
    with pytest.raises(TypeError, match="obs must be a floating tensor"):
        pol.act(torch.zeros(2, 2, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="candidate_dim"):
        EnergyPolicy(pyebm.MLPEnergy(4, 5), horizon=2, action_dim=2)
    with pytest.raises(ValueError, match="needs horizon and action_dim"):
        EnergyPolicy(pyebm.MLPEnergy(4, 4))
    ibc = EnergyPolicy.ibc(action_dim=2, obs_dim=3, candidates=4, hidden=(8, 8))
    with pytest.raises(ValueError, match=r"obs must be \[B, n_obs_steps=2, obs_dim=3\] or \[B, 6\]"):
        ibc.act(torch.randn(2, 5))
    with pytest.raises(ValueError, match="method"):
        EnergyPolicy.ibc(action_dim=2, obs_dim=3, method="mppi")
    with pytest.raises(TypeError, match="pyebm.Descent"):
        EnergyPolicy(m, descent="fast")


def test_observation_finiteness_check():
    """act()'s finiteness check of the observations: read in place by the extension for contiguous
    float32/float64 CPU tensors in eager mode, torch.isfinite for every other tensor; the same answer."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from pyebm import policies as P

    x = torch.randn(4, 5)
    assert P._all_finite(x) and P._all_finite(torch.full((8,), 3e38)) and P._all_finite(torch.empty(0))
    for bad in (float("nan"), float("inf"), float("-inf")):
        y = x.clone()
        y[2, 3] = bad
        for t in (y, y.double(), y.t(), y.half(), torch.nn.Parameter(y), y[:, 1:]):
            assert not P._all_finite(t), (bad, t.dtype, t.is_contiguous())
    if P._ALL_FINITE is not None:  # what the extension leaves to torch.isfinite
        assert P._ALL_FINITE(x) is True
        for t in (x.t(), x.half(), torch.nn.Parameter(x), x.to_sparse()):
            assert P._ALL_FINITE(t) is None

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                return func(*args, **(kwargs or {}))

        with Mode():
            assert P._ALL_FINITE(x) is None and P._all_finite(x)
