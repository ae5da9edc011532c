"""pyebm.discrete.gibbs_with_gradients and pyebm.discrete.dmala against exact distributions.

Small models (Ising, RBM free energy, MLPEnergy over {0,1}^L, a Potts model over one-hot [L, C]) whose
states are enumerated. Two kinds of check:

- one step: every chain starts at a given state; the empirical distribution of the next state must match
  the row of the exact transition kernel, built here state by state from the papers' formulas (proposal,
  reverse proposal, Metropolis-Hastings acceptance) with autograd on one state at a time;
- stationarity: the exact kernel keeps p = exp(-E/T)/Z (DMALA, GWG) or has the stationary distribution
  computed from it (DULA), and chains started uniformly at random reach it after burn-in.

Tolerances: for n chains and a distribution over S states the expected total-variation distance of the
empirical distribution is at most 1/2 sum_s sqrt(p_s (1 - p_s) / n); the TV distance moves by at most 1/n
when one chain moves, so (McDiarmid) it exceeds its mean by t with probability at most exp(-2 n t^2). The
bound used is that mean bound plus t for a failure probability of 1e-4 (the seeds are fixed, so a run is
deterministic; the margin says how unlikely a pass by luck of a wrong sampler is). Every stationarity
test also checks that the same samples are far from a wrong target (another temperature), so it can fail.
"""
import math

import pytest
import torch

import pyebm
from pyebm.discrete import dmala, gibbs_with_gradients

D64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one intra-op thread


# -- models ----------------------------------------------------------------------------------------------

class Ising:
    """E(x, y) = -(<h + x, s> + 1/2 s^T J s), s = 2y - 1 (x: a per-context field [B, L])."""

    def __init__(self, L, seed, scale=0.6):
        g = torch.Generator().manual_seed(seed)
        J = torch.randn(L, L, generator=g, dtype=D64) * scale
        self.J = (J + J.T) / 2 * (1 - torch.eye(L, dtype=D64))
        self.h = torch.randn(L, generator=g, dtype=D64) * 0.5

    def __call__(self, x, y):
        s = 2 * y - 1
        field = self.h + x[:, None, :]
        return -((field * s).sum(-1) + 0.5 * torch.einsum("bki,ij,bkj->bk", s, self.J, s))


class RBM:
    """Free energy of a binary RBM with its hidden units summed out: E(y) = -<b, y> - sum_j softplus(c_j + <W_j, y>)."""

    def __init__(self, L, H, seed):
        g = torch.Generator().manual_seed(seed)
        self.W = torch.randn(L, H, generator=g, dtype=D64) * 1.2
        self.b = torch.randn(L, generator=g, dtype=D64) * 0.5
        self.c = torch.randn(H, generator=g, dtype=D64) * 0.5

    def __call__(self, x, y):
        return -(y @ self.b) - torch.nn.functional.softplus(y @ self.W + self.c).sum(-1)


class Potts:
    """E(y) = -<h, y> - sum_{i<j} y_i^T W_ij y_j for one-hot y [B, K, L, C]."""

    def __init__(self, L, C, seed):
        g = torch.Generator().manual_seed(seed)
        self.h = torch.randn(L, C, generator=g, dtype=D64)
        W = torch.randn(L, L, C, C, generator=g, dtype=D64) * 0.7
        self.W = torch.triu(torch.ones(L, L, dtype=D64), diagonal=1)[:, :, None, None] * W

    def __call__(self, x, y):
        return -(y * self.h).sum((-2, -1)) - torch.einsum("bkic,ijcd,bkjd->bk", y, self.W, y)


def binary_states(L):
    """All 2^L states [S, L]; state s has y_i = bit i of s."""
    s = torch.arange(2 ** L)
    return ((s[:, None] >> torch.arange(L)) & 1).to(D64)


def categorical_states(L, C):
    """All C^L one-hot states [S, L, C]; state s has class (s // C^i) % C at site i."""
    s = torch.arange(C ** L)
    cls = (s[:, None] // (C ** torch.arange(L))) % C
    return torch.nn.functional.one_hot(cls, C).to(D64)


def index_of(y, categorical):
    """[..., *event] states -> their index in binary_states / categorical_states."""
    if categorical:
        C = y.shape[-1]
        cls = y.argmax(-1)
        return (cls * (C ** torch.arange(cls.shape[-1]))).sum(-1)
    return (y.round().long() * (2 ** torch.arange(y.shape[-1]))).sum(-1)


def exact_p(energy, x, states, T=1.0):
    """p(y | x_b) over the enumerated states: [B, S]."""
    E = energy(x, states.unsqueeze(0).expand(x.shape[0], *states.shape))
    return torch.softmax(-E / T, dim=-1)


def empirical(y, categorical, S):
    """Per-context empirical distribution of the states y [B, K, *event]: [B, S]."""
    idx = index_of(y, categorical)
    out = torch.zeros(idx.shape[0], S, dtype=D64)
    out.scatter_add_(1, idx, torch.ones_like(idx, dtype=D64))
    return out / idx.shape[1]


def tv(p, q):
    return 0.5 * (p - q).abs().sum(-1)


def tv_bound(p, n, delta=1e-4):
    """Per row of p [B, S]: the bound on TV(empirical of n draws, p) described in the module docstring."""
    mean = 0.5 * torch.sqrt(p * (1 - p) / n).sum(-1)
    return mean + math.sqrt(math.log(1 / delta) / (2 * n))


# -- the exact kernels, one state at a time ----------------------------------------------------------------

def f_and_grad(energy, x1, states, T):
    """f = -E/T [S] and df/dy [S, *event] at every enumerated state (energies of states are independent)."""
    yy = states.clone().requires_grad_(True)
    f = -energy(x1, yy[None])[0] / T
    (g,) = torch.autograd.grad(f.sum(), yy)
    return f.detach(), g


def kernel(energy, x1, states, method, T=1.0, alpha=0.2, categorical=False):
    """The exact transition matrix P[s, t] [S, S] of a sampler for one context x1 [1, ...], from the papers'
    formulas: proposal q(t | s), reverse proposal q(s | t) from the gradient at t, acceptance
    min(1, exp(f_t - f_s) q(s | t) / q(t | s)); the rest of each row stays at s."""
    S = states.shape[0]
    f, g = f_and_grad(energy, x1, states, T)
    y = states
    d = g - (y * g).sum(-1, keepdim=True) if categorical else (1 - 2 * y) * g   # first-order change of f
    if categorical:
        diff = (y[:, None] != y[None, :]).any(-1).to(D64)      # [S, S, L]: sites that differ
    else:
        diff = (y[:, None] != y[None, :]).to(D64)              # [S, S, L]: coordinates that differ
    if method == "gwg":
        # one change per proposal: t reachable from s iff exactly one site differs
        logits = d.masked_fill(y > 0.5, -math.inf) if categorical else d
        lq = torch.log_softmax(logits.flatten(1) / 2, -1)      # [S, M] over single changes
        lq = lq.masked_fill(lq == -math.inf, 0)                # (never a move; avoids 0 * -inf below)
        if categorical:
            # the change s -> t is (site i, class of t at i), flat index i * C + c
            C = y.shape[-1]
            move = (diff[..., None] * y[None, :]).flatten(2)  # [S, S, L*C]: one-hot of the move when one site differs
        else:
            move = diff                                        # [S, S, L]: the flipped coordinate
        one = diff.sum(-1) == 1
        Q = torch.where(one, (move * lq[:, None]).sum(-1), torch.full((S, S), -math.inf, dtype=D64))
    else:
        if categorical:
            LG = d / 2 - (1 - y) / alpha                        # [S, L, C]
            Q = torch.einsum("slc,tlc->st", torch.log_softmax(LG, -1), y)
        else:
            LG = d / 2 - 1 / (2 * alpha)                        # [S, L]
            F_ = torch.nn.functional
            Q = (diff * F_.logsigmoid(LG)[:, None] + (1 - diff) * F_.logsigmoid(-LG)[:, None]).sum(-1)
    if method == "dula":
        A = torch.ones(S, S, dtype=D64)
    else:
        log_r = f[None, :] - f[:, None] + Q.T - Q
        A = torch.exp(torch.nan_to_num(log_r, nan=-math.inf).clamp(max=0))
    P = torch.exp(Q) * A
    P.fill_diagonal_(0)
    P += torch.diag(1 - P.sum(1))
    return P


def stationary(P):
    """The stationary distribution of the transition matrix P (left eigenvector for eigenvalue 1)."""
    w, V = torch.linalg.eig(P.T)
    v = V[:, torch.argmin((w - 1).abs())].real
    return v / v.sum()


def run_sampler(method, energy, x, init, steps, **kw):
    if method == "gwg":
        return gibbs_with_gradients(energy, x, init, steps, **kw)
    return dmala(energy, x, init, steps, mh=(method == "dmala"), **kw)


# -- one step against the exact kernel -----------------------------------------------------------------------

@pytest.mark.parametrize("method", ["gwg", "dmala", "dula"])
def test_one_step_matches_exact_kernel_binary(method):
    L, K = 5, 4000
    model = Ising(L, seed=1)
    states = binary_states(L)
    x = torch.randn(1, L, generator=torch.Generator().manual_seed(2), dtype=D64)
    P = kernel(model, x, states, method, alpha=0.3)
    starts = torch.tensor([0, 7, 19, 30])
    init = states[starts][:, None].expand(-1, K, -1).contiguous()
    res = run_sampler(method, model, x.expand(len(starts), -1), init, 1, generator=3,
                      **({} if method == "gwg" else {"step_size": 0.3}))
    emp = empirical(res.y, False, 2 ** L)
    want = P[starts]
    assert torch.all(tv(emp, want) < tv_bound(want, K)), (tv(emp, want), tv_bound(want, K))
    # the stay probability is what the Metropolis-Hastings correction decides: exact within ~4 sigma
    stay = want[torch.arange(len(starts)), starts]
    got = emp[torch.arange(len(starts)), starts]
    assert torch.all((got - stay).abs() < 4 * torch.sqrt(stay * (1 - stay) / K) + 1e-3)
    assert torch.all((res.acceptance >= 0) & (res.acceptance <= 1))


@pytest.mark.parametrize("method", ["gwg", "dmala"])
def test_one_step_matches_exact_kernel_categorical(method):
    L, C, K = 3, 3, 4000
    model = Potts(L, C, seed=4)
    states = categorical_states(L, C)
    x = torch.zeros(1, 1, dtype=D64)
    P = kernel(model, x, states, method, alpha=0.5, categorical=True)
    starts = torch.tensor([0, 13, 26])
    init = states[starts][:, None].expand(-1, K, -1, -1).contiguous()
    res = run_sampler(method, model, x.expand(len(starts), -1), init, 1, categorical=True, generator=5,
                      **({} if method == "gwg" else {"step_size": 0.5}))
    emp = empirical(res.y, True, C ** L)
    want = P[starts]
    assert torch.all(tv(emp, want) < tv_bound(want, K)), (tv(emp, want), tv_bound(want, K))


# -- the exact kernels keep the target -----------------------------------------------------------------------

@pytest.mark.parametrize("method,categorical", [("gwg", False), ("dmala", False), ("gwg", True), ("dmala", True)])
def test_exact_kernel_keeps_target(method, categorical):
    """p P = p for the Metropolis-Hastings samplers (checks the proposal/reverse pairing used above)."""
    if categorical:
        model, states, x = Potts(2, 3, seed=6), categorical_states(2, 3), torch.zeros(1, 1, dtype=D64)
    else:
        model, states, x = RBM(4, 3, seed=6), binary_states(4), torch.zeros(1, 1, dtype=D64)
    for T in (1.0, 0.7):
        P = kernel(model, x, states, method, T=T, alpha=0.4, categorical=categorical)
        p = exact_p(model, x, states, T)[0]
        torch.testing.assert_close(p @ P, p, rtol=0, atol=1e-12)
        assert torch.all(P >= -1e-15) and torch.allclose(P.sum(1), torch.ones(len(states), dtype=D64))


# -- stationarity after burn-in ------------------------------------------------------------------------------

def _check_stationary(energy, x, states, res, method, T, T_wrong, steps, categorical, alpha=0.2):
    """The chains' final states against p (per context); the burn-in is checked with the exact kernel: the
    law of the state after ``steps`` steps from the uniform start is within 0.01 of p."""
    S = states.shape[0]
    target = exact_p(energy, x, states, T)
    for b in range(x.shape[0]):
        P = kernel(energy, x[b:b + 1], states, method, T=T, alpha=alpha, categorical=categorical)
        law = torch.full((S,), 1.0 / S, dtype=D64) @ torch.linalg.matrix_power(P, steps)
        assert tv(law, target[b]) < 0.01, "burn-in too short for this model"
    emp = empirical(res.y, categorical, S)
    bound = tv_bound(target, res.y.shape[1])
    assert torch.all(tv(emp, target) < bound), (tv(emp, target), bound)
    wrong = exact_p(energy, x, states, T_wrong)
    assert torch.all(tv(emp, wrong) > bound + 0.05), (tv(emp, wrong), bound)    # the test can fail
    assert torch.all((res.acceptance >= 0) & (res.acceptance <= 1))


@pytest.mark.parametrize("method,model_name", [("gwg", "ising"), ("dmala", "rbm")])
def test_stationary_binary(method, model_name):
    L, K, steps = 6, 2000, 60
    model = Ising(L, seed=7) if model_name == "ising" else RBM(L, 4, seed=7)
    x = torch.randn(2, L, generator=torch.Generator().manual_seed(8), dtype=D64) * 0.5
    res = run_sampler(method, model, x, K, steps, event_shape=(L,), generator=9,
                      **({} if method == "gwg" else {"step_size": 0.4}))
    _check_stationary(model, x, binary_states(L), res, method, 1.0, 3.0, steps, False, alpha=0.4)


def test_stationary_mlp_energy_fused():
    """MLPEnergy over {0,1}^L through its fused energy_and_grad, several contexts, temperature != 1."""
    torch.manual_seed(10)
    L, K, T, steps = 6, 2000, 0.5, 60
    model = pyebm.MLPEnergy(3, L, hidden=(16, 16), dtype=D64)
    with torch.no_grad():
        model.head.weight.mul_(40)       # energies spread over a few units (fresh weights give almost flat E)
    x = torch.randn(2, 3, dtype=D64)
    fn = lambda xx, yy: model(xx, yy)  # noqa: E731  (the reference kernel differentiates the forward)
    for method in ("gwg", "dmala"):
        res = run_sampler(method, model, x, K, steps, temperature=T, generator=11,
                          **({} if method == "gwg" else {"step_size": 0.4}))
        _check_stationary(fn, x, binary_states(L), res, method, T, 4 * T, steps, False, alpha=0.4)


@pytest.mark.parametrize("method", ["gwg", "dmala"])
def test_stationary_categorical(method):
    L, C, K, steps = 3, 3, 2000, 40
    model = Potts(L, C, seed=12)
    x = torch.zeros(2, 1, dtype=D64)
    res = run_sampler(method, model, x, K, steps, categorical=True, event_shape=(L, C), generator=13,
                      **({} if method == "gwg" else {"step_size": 0.5}))
    _check_stationary(model, x, categorical_states(L, C), res, method, 1.0, 3.0, steps, True, alpha=0.5)


def test_dula_reaches_its_own_stationary_distribution():
    """DULA has no correction: its chains reach the stationary law of its kernel, which is not p."""
    L, K, alpha = 5, 4000, 0.6
    model = Ising(L, seed=14, scale=0.8)
    x = torch.zeros(1, L, dtype=D64)
    states = binary_states(L)
    pi = stationary(kernel(model, x, states, "dula", alpha=alpha))[None]
    p = exact_p(model, x, states)
    res = dmala(model, x, K, 60, step_size=alpha, mh=False, event_shape=(L,), generator=15)
    emp = empirical(res.y, False, 2 ** L)
    bound = tv_bound(pi, K)
    assert torch.all(tv(emp, pi) < bound), (tv(emp, pi), bound)
    assert torch.all(tv(emp, p) > bound), (tv(emp, p), bound)
    assert torch.all(res.acceptance == 1) and torch.all(res.accepted == 60)


# -- paths, shapes, reproducibility ------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["gwg", "dmala"])
def test_fused_and_autograd_paths_agree(method):
    """MLPEnergy's fused energy_and_grad and autograd through its forward give the same chains (fp64)."""
    torch.manual_seed(16)
    model = pyebm.MLPEnergy(4, 7, hidden=(12,), dtype=D64)
    x = torch.randn(3, 4, dtype=D64)
    kw = {} if method == "gwg" else {"step_size": 0.3}
    a = run_sampler(method, model, x, 9, 15, generator=17, **kw)
    b = run_sampler(method, lambda xx, yy: model(xx, yy), x, 9, 15, generator=17, event_shape=(7,), **kw)
    assert torch.equal(a.y, b.y) and torch.equal(a.accepted, b.accepted)
    torch.testing.assert_close(a.energy, b.energy)
    torch.testing.assert_close(a.energy, model(x, a.y).detach())


def test_one_hot_states_feed_a_flat_energy():
    """One-hot [L, C] states are reshaped to an energy's declared event_shape (L * C,)."""
    torch.manual_seed(18)
    L, C = 2, 3
    model = pyebm.MLPEnergy(0, L * C, hidden=(8,), dtype=D64)
    res = gibbs_with_gradients(model, 2, 5, 4, categorical=True, event_shape=(L, C), generator=0, record=True)
    assert res.y.shape == (2, 5, L, C) and res.trajectory.shape == (5, 2, 5, L, C)
    assert torch.all(res.trajectory.sum(-1) == 1)
    torch.testing.assert_close(res.energy, model(None, res.y.reshape(2, 5, L * C)).detach())
    assert torch.equal(res.trajectory[-1], res.y)


@pytest.mark.parametrize("method", ["gwg", "dmala", "dula"])
def test_reproducible_with_generator(method):
    model = Ising(6, seed=19)
    x = torch.randn(2, 6, dtype=D64)
    a = run_sampler(method, model, x, 8, 10, event_shape=(6,), generator=torch.Generator().manual_seed(5))
    b = run_sampler(method, model, x, 8, 10, event_shape=(6,), generator=5)
    c = run_sampler(method, model, x, 8, 10, event_shape=(6,), generator=6)
    assert torch.equal(a.y, b.y) and torch.equal(a.acceptance, b.acceptance)
    assert not torch.equal(a.y, c.y)


def test_zero_steps_and_trajectory():
    model = Ising(4, seed=20)
    x = torch.zeros(2, 4, dtype=D64)
    y0 = binary_states(4)[:6].expand(2, -1, -1).contiguous()
    res = gibbs_with_gradients(model, x, y0, 0, record=True)
    assert torch.equal(res.y, y0) and res.trajectory.shape == (1, 2, 6, 4)
    assert torch.isnan(res.acceptance).all() and torch.all(res.accepted == 0)
    torch.testing.assert_close(res.energy, model(x, y0))
    res = gibbs_with_gradients(model, x, y0.bool(), 3, record=True, generator=0)   # bool states accepted
    assert res.y.dtype == D64 and res.trajectory.shape == (4, 2, 6, 4)
    # GWG changes at most one coordinate per step
    assert torch.all((res.trajectory[1:] != res.trajectory[:-1]).sum(-1) <= 1)


# -- bad input ----------------------------------------------------------------------------------------------

def test_bad_inputs():
    model = Ising(4, seed=21)
    x = torch.zeros(2, 4, dtype=D64)
    y0 = torch.zeros(2, 3, 4, dtype=D64)
    with pytest.raises(ValueError, match="0/1 values"):
        gibbs_with_gradients(model, x, y0 + 0.5, 1)
    with pytest.raises(ValueError, match=r"init must be binary \[B, K, \*event\] with B = 2"):
        dmala(model, x, y0[0], 1)
    with pytest.raises(ValueError, match="B = 2"):
        dmala(model, x, y0[:1], 1)
    with pytest.raises(ValueError, match="steps must be an int >= 0"):
        gibbs_with_gradients(model, x, y0, -1)
    with pytest.raises(TypeError, match="steps must be an int"):
        gibbs_with_gradients(model, x, y0, 2.0)
    with pytest.raises(ValueError, match="one-hot"):
        gibbs_with_gradients(model, x, torch.zeros(2, 3, 4, 2, dtype=D64), 1, categorical=True)
    with pytest.raises(ValueError, match="C >= 2"):
        dmala(model, x, torch.ones(2, 3, 4, 1, dtype=D64), 1, categorical=True)
    with pytest.raises(ValueError, match="temperature"):
        dmala(model, x, y0, 1, temperature=0.0)
    with pytest.raises(ValueError, match="step_size"):
        dmala(model, x, y0, 1, step_size=-1)
    with pytest.raises(TypeError, match="mh must be True or False"):
        dmala(model, x, y0, 1, mh=1)
    with pytest.raises(TypeError, match="init must be a tensor"):
        dmala(model, x, [[0, 1]], 1)
    with pytest.raises(ValueError, match="number of chains"):
        dmala(model, x, 0, 1, event_shape=(4,))
    with pytest.raises(ValueError, match="event_shape"):
        gibbs_with_gradients(model, x, 5, 1)
    with pytest.raises(TypeError, match="energy must have prepare"):
        gibbs_with_gradients(object(), x, y0, 1)
    with pytest.raises(ValueError, match=r"E \[B, K\]"):
        gibbs_with_gradients(lambda xx, yy: yy.sum(), x, y0, 1)
    mlp = pyebm.MLPEnergy(4, 4, hidden=(8,), dtype=D64)
    with pytest.raises(ValueError, match="event_shape"):
        gibbs_with_gradients(mlp, x, torch.zeros(2, 3, 5, dtype=D64), 1)


# -- the benchmark's eager baseline is the same sampler ------------------------------------------------------

@pytest.mark.parametrize("method,categorical", [("gwg", False), ("gwg", True), ("dmala", False), ("dmala", True),
                                                ("dula", False)])
def test_eager_benchmark_baseline_is_the_same_sampler(method, categorical):
    """bench_samplers times pyebm.discrete against pyebm.bench.sampler_loops: same draws, same chains."""
    from pyebm.bench.sampler_loops import eager_dmala, eager_gwg

    torch.manual_seed(22)
    L, C = 4, 3
    D = L * C if categorical else L
    model = pyebm.MLPEnergy(3, D, hidden=(8,), dtype=D64)
    x = torch.randn(2, 3, dtype=D64)
    y0 = (torch.nn.functional.one_hot(torch.randint(C, (2, 5, L)), C) if categorical
          else torch.randint(2, (2, 5, L))).to(D64)
    fn = (lambda xx, yy: model(xx, yy.flatten(2))) if categorical else model
    kw = {"temperature": 0.7, "categorical": categorical}
    if method == "gwg":
        a = gibbs_with_gradients(model, x, y0, 6, generator=3, **kw).y
        b = eager_gwg(fn, x, y0, 6, generator=torch.Generator().manual_seed(3), **kw)
    else:
        mh = method == "dmala"
        a = dmala(model, x, y0, 6, step_size=0.4, mh=mh, generator=3, **kw).y
        b = eager_dmala(fn, x, y0, 6, 0.4, generator=torch.Generator().manual_seed(3), mh=mh, **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, y0)


def test_init_takes_the_energy_dtype():
    model = pyebm.MLPEnergy(2, 3, hidden=(4,), dtype=D64)
    x = torch.randn(1, 2, dtype=D64)
    y0 = torch.ones(1, 2, 3, dtype=torch.float32)
    res = gibbs_with_gradients(model, x, y0, 2, generator=0)
    assert res.y.dtype == D64 and y0.dtype == torch.float32 and torch.all(y0 == 1)
