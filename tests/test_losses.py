"""pyebm.losses.joint_partition_loss: a hand-computed value, and recovery of exact conditionals.

The enumerable problem: 3 contexts, y in {0,1}^3 (8 states), q uniform. The data are integer counts per
(context, state), so the maximum-likelihood conditional is exactly counts / total; the loss's minimiser
must give log p(y|x) = log q(y) - E(x, y) - tau(x) = that, and tau(x) = log E_q[exp(-E(x, .))].
"""
import math

import pytest
import torch

import pyebm
from pyebm.losses import joint_partition_loss

D64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one intra-op thread


def test_value_by_hand():
    E_data = torch.tensor([0.5, -1.0], dtype=D64)
    E_prior = torch.tensor([[0.0, 1.0, 2.0], [-0.5, 0.5, 0.0]], dtype=D64)
    tau = torch.tensor([0.2, -0.3], dtype=D64)
    # pair 0: 0.2 + (e^-0.2 + e^-1.2 + e^-2.2) / 3 - 1 + 0.5
    l0 = 0.2 + (math.exp(-0.2) + math.exp(-1.2) + math.exp(-2.2)) / 3 - 1 + 0.5
    # pair 1: -0.3 + (e^0.8 + e^-0.2 + e^0.3) / 3 - 1 - 1.0
    l1 = -0.3 + (math.exp(0.8) + math.exp(-0.2) + math.exp(0.3)) / 3 - 1 - 1.0
    per = joint_partition_loss(E_data, E_prior, tau, reduction="none")
    torch.testing.assert_close(per, torch.tensor([l0, l1], dtype=D64), rtol=0, atol=1e-14)
    torch.testing.assert_close(joint_partition_loss(E_data, E_prior, tau), torch.tensor((l0 + l1) / 2, dtype=D64))
    torch.testing.assert_close(joint_partition_loss(E_data, E_prior, tau, reduction="sum"),
                               torch.tensor(l0 + l1, dtype=D64))


def test_tau_minimiser_is_the_log_partition():
    """For a fixed energy, d loss / d tau = 0 at tau = log mean_m exp(-E'_m), where the loss is E + tau."""
    E_prior = torch.randn(4, 6, dtype=D64)
    E_data = torch.randn(4, dtype=D64)
    A = torch.logsumexp(-E_prior, 1) - math.log(6)
    tau = A.clone().requires_grad_(True)
    per = joint_partition_loss(E_data, E_prior, tau, reduction="none")
    (g,) = torch.autograd.grad(per.sum(), tau)
    torch.testing.assert_close(g, torch.zeros_like(g), rtol=0, atol=1e-12)
    torch.testing.assert_close(per.detach(), E_data + A)
    for shift in (-0.3, 0.3):                 # and it is the minimum
        assert torch.all(joint_partition_loss(E_data, E_prior, A + shift, reduction="none") > per.detach())


def _states(L):
    s = torch.arange(2 ** L)
    return ((s[:, None] >> torch.arange(L)) & 1).to(D64)


def _counts(X, S, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(X, S, generator=g, dtype=D64) * 1.2
    return torch.multinomial(torch.softmax(logits, -1), 400, replacement=True, generator=g), logits


def test_tabular_recovers_exact_conditionals():
    """Exact expectations: every prior state once per pair; the table must reach the MLE (counts / total)."""
    X, L = 3, 3
    S = 2 ** L
    draws, _ = _counts(X, S, seed=0)                     # [X, 400] state indices
    xs = torch.arange(X).repeat_interleave(draws.shape[1])
    ys = draws.flatten()
    mle = torch.zeros(X, S, dtype=D64).index_put_((xs, ys), torch.ones_like(ys, dtype=D64), accumulate=True)
    mle /= mle.sum(1, keepdim=True)
    assert torch.all(mle > 0)
    E = torch.zeros(X, S, dtype=D64, requires_grad=True)
    tau = torch.zeros(X, dtype=D64, requires_grad=True)
    opt = torch.optim.LBFGS([E, tau], lr=1, max_iter=500, tolerance_grad=1e-12, tolerance_change=0,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = joint_partition_loss(E[xs, ys], E[xs], tau[xs])
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    with torch.no_grad():
        log_p = math.log(1 / S) - E - tau[:, None]            # log q(y) - E(x, y) - tau(x)
        torch.testing.assert_close(log_p, mle.log(), rtol=0, atol=1e-6)
        torch.testing.assert_close(tau, torch.logsumexp(-E, 1) - math.log(S), rtol=0, atol=1e-6)


def test_sgd_with_sampled_prior_trains_an_mlp_energy():
    """SGD with M prior samples per pair (no enumeration in the loss): an MLPEnergy and a tau network; the
    normalised scores -E - tau + log q match the data's conditional distribution and tau approaches log Z."""
    torch.manual_seed(0)
    X, L = 3, 3
    S = 2 ** L
    states = _states(L)
    draws, _ = _counts(X, S, seed=1)
    xs = torch.arange(X).repeat_interleave(draws.shape[1])
    ys = draws.flatten()
    mle = torch.zeros(X, S, dtype=D64).index_put_((xs, ys), torch.ones_like(ys, dtype=D64), accumulate=True)
    mle /= mle.sum(1, keepdim=True)
    ctx = torch.eye(X, dtype=D64)
    energy = pyebm.MLPEnergy(X, L, hidden=(32, 32), dtype=D64)
    tau_net = torch.nn.Sequential(torch.nn.Linear(X, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).to(D64)
    opt = torch.optim.Adam(list(energy.parameters()) + list(tau_net.parameters()), lr=2e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 800)
    g = torch.Generator().manual_seed(2)
    M, batch = 8, 128
    for _ in range(800):
        pick = torch.randint(len(xs), (batch,), generator=g)
        x = ctx[xs[pick]]
        y = states[ys[pick]]
        y_prior = torch.randint(2, (batch, M, L), generator=g).to(D64)     # y' ~ q = uniform on {0,1}^L
        loss = joint_partition_loss(energy(x, y), energy(x, y_prior), tau_net(x).squeeze(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        E_all = energy(ctx, states.expand(X, -1, -1))                      # [X, S]
        tau = tau_net(ctx).squeeze(-1)
        p = torch.exp(-E_all - tau[:, None]) / S
        assert torch.all(0.5 * (p - mle).abs().sum(1) < 0.05), (p, mle)
        assert torch.all((p.sum(1) - 1).abs() < 0.05), p.sum(1)           # normalised without enumerating
        log_z = torch.logsumexp(-E_all, 1) - math.log(S)
        assert torch.all((tau - log_z).abs() < 0.05), (tau, log_z)


def test_bad_inputs():
    E = torch.zeros(3)
    with pytest.raises(ValueError, match=r"energy_prior must be \[N=3, M\]"):
        joint_partition_loss(E, torch.zeros(3), E)
    with pytest.raises(ValueError, match=r"energy_prior must be \[N=3, M\]"):
        joint_partition_loss(E, torch.zeros(3, 0), E)
    with pytest.raises(ValueError, match=r"log_partition must be \[N=3\]"):
        joint_partition_loss(E, torch.zeros(3, 2), torch.zeros(3, 1))
    with pytest.raises(ValueError, match=r"energy_data must be \[N\]"):
        joint_partition_loss(torch.zeros(3, 1), torch.zeros(3, 2), E)
    with pytest.raises(TypeError, match="floating"):
        joint_partition_loss(torch.zeros(3, dtype=torch.long), torch.zeros(3, 2), E)
    with pytest.raises(TypeError, match="must be a tensor"):
        joint_partition_loss([0.0], torch.zeros(1, 2), torch.zeros(1))
    with pytest.raises(ValueError, match="reduction"):
        joint_partition_loss(E, torch.zeros(3, 2), E, reduction="avg")
