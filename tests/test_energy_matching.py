"""The Energy Matching sampler (``Descent.energy_matching``), snapshots along one trajectory and inverse problems
(clamped coordinates, ``pyebm.DataConsistency``), each against an independent statement of the rule.

- the schedule against eps(t) of the public sampler written out here (exact decimal times),
- the step against torchsde's Stratonovich ``heun`` written out here (noise off: to fp tolerance; noise on:
  the same draws, so also to fp tolerance),
- the law of the samples against the exact law of the discretised chain on a quadratic energy (a Gaussian at
  every step, mean and covariance by recursion), over many chains, within a few standard errors.
"""
import math
import pickle
from fractions import Fraction

import pytest
import torch

import pyebm
from pyebm import DataConsistency, Descent, minimize

BACKENDS = ["torch"] + (["cpu"] if pyebm.backends()["cpu"] else [])


# ------------------------------------------------------------------------------------------------
# independent statements
# ------------------------------------------------------------------------------------------------

def eps_public(t, tau_star, epsilon_max):
    """The public CIFAR-10 / ImageNet sampler's eps(t) (utils_cifar_imagenet.plot_epsilon): 0 before the
    cutoff, a linear ramp to epsilon_max at t = 1 when the cutoff is below 1, epsilon_max after."""
    if t < tau_star:
        return 0.0
    if t < 1:
        return float(epsilon_max * (t - tau_star) / (1 - tau_star))
    return float(epsilon_max)


def grid_time(t_start, dt, k):
    """t_k = t_start + k dt in exact decimal arithmetic (the grid the user means by 0.01, 1.5, ...)."""
    return Fraction(repr(t_start)) + k * Fraction(repr(dt))


def heun_step(grad, x, xi, dt, s0, s1):
    """torchsde's Stratonovich "heun" with drift -grad V and diagonal noise sqrt(2 eps(t)): dW = sqrt(dt) xi,
    s = sqrt(2 eps) sqrt(dt)."""
    f0 = -grad(x)
    y_prime = x + dt * f0 + s0 * xi
    f1 = -grad(y_prime)
    return x + 0.5 * (dt * (f0 + f1) + s0 * xi + s1 * xi)


class Gaussian:
    """V = 0.5 (y - mu)^T P (y - mu), context-free (context = B), analytic gradient."""

    def __init__(self, P, mu):
        self.P, self.mu = P, mu
        self.event_shape = (P.shape[0],)
        self.dtype = P.dtype

    def prepare(self, context):
        return None

    def energy(self, ctx, y):
        r = y - self.mu
        return 0.5 * torch.einsum("bki,ij,bkj->bk", r, self.P, r)

    def energy_and_grad(self, ctx, y):
        r = y - self.mu
        return 0.5 * torch.einsum("bki,ij,bkj->bk", r, self.P, r), r @ self.P


def heun_gaussian_law(P, c, m0, S0, noise_std, steps, dt):
    """The exact law of the Heun chain on V = 0.5 (y - c)^T P (y - c) after ``steps`` steps, starting from
    N(m0, S0): z = y - c moves as z' = M z + N_k xi with M = I - dt P + dt^2 P^2 / 2 and
    N_k = (s_k + s_{k+1}) / 2 I - dt s_k P / 2 (s_k = noise_std(k)). Returns (mean, covariance)."""
    eye = torch.eye(P.shape[0], dtype=torch.float64)
    M = eye - dt * P + 0.5 * dt * dt * P @ P
    m, S = m0 - c, S0.clone()
    for k in range(steps):
        s0, s1 = noise_std(k), noise_std(k + 1)
        N = 0.5 * (s0 + s1) * eye - 0.5 * dt * s0 * P
        m, S = M @ m, M @ S @ M.T + N @ N.T
    return m + c, S


def assert_law(samples, mean, cov, z=5.0):
    """samples [N, D] of i.i.d. draws: sample mean and covariance within z standard errors of the law."""
    n = samples.shape[0]
    se_mean = (cov.diagonal() / n).sqrt()
    assert ((samples.mean(0) - mean).abs() <= z * se_mean).all(), (samples.mean(0), mean)
    emp = torch.cov(samples.T)
    se_cov = ((cov.diagonal()[:, None] * cov.diagonal()[None, :] + cov.square()) / n).sqrt()
    assert ((emp - cov).abs() <= z * se_cov).all(), (emp, cov)


def cov_gap(cov_a, cov_b, n):
    """max |a - b| over entries, in standard errors of a sample covariance of n draws from a."""
    se = ((cov_a.diagonal()[:, None] * cov_a.diagonal()[None, :] + cov_a.square()) / n).sqrt()
    return float(((cov_a - cov_b).abs() / se).max())


# ------------------------------------------------------------------------------------------------
# the schedule
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tau_star", [0.0, 0.3, 0.35, 0.5, 0.99, 1.0, 1.01, 1.1, 1.5, 2.0, 2.73])
@pytest.mark.parametrize("dt,t_start", [(0.01, 0.0), (0.1, 0.0), (0.05, 0.25), (0.03, 1.2), (0.125, 0.0)])
def test_schedule_is_the_public_eps(tau_star, dt, t_start):
    eps_max = 0.07
    steps = int(round((3.25 - t_start) / dt))
    cfg = Descent.energy_matching(steps=steps, dt=dt, epsilon_max=eps_max, tau_star=tau_star, t_start=t_start)
    for k in range(steps + 1):
        want = eps_public(grid_time(t_start, dt, k), Fraction(repr(tau_star)), Fraction(repr(eps_max)))
        got = cfg.noise_level_at(k)
        assert got == pytest.approx(want, rel=1e-9, abs=1e-12), (k, float(grid_time(t_start, dt, k)), got, want)


def test_schedule_above_one_switches_on_at_the_cutoff():
    """tau_star > 1: no noise on [1, tau_star), all of it from tau_star (the earlier preset ramped over it)."""
    cfg = Descent.energy_matching(dt=0.01, epsilon_max=0.01, tau_star=1.5)
    assert [cfg.noise_level_at(k) for k in (100, 120, 149)] == [0.0, 0.0, 0.0]
    assert [cfg.noise_level_at(k) for k in (150, 151, 324)] == [0.01, 0.01, 0.01]
    assert cfg.noise_ramp == (150.0, 150.0)


def test_preset_errors():
    with pytest.raises(ValueError, match="epsilon_max"):
        Descent.energy_matching(epsilon_max=-0.1)
    with pytest.raises(TypeError, match="tau_star"):
        Descent.energy_matching(tau_star=float("inf"))
    assert Descent.energy_matching(epsilon_max=0.0).noise == "none"


# ------------------------------------------------------------------------------------------------
# the step
# ------------------------------------------------------------------------------------------------

def _mlp(D=3, seed=0):
    torch.manual_seed(seed)
    m = pyebm.MLPEnergy(4, D, hidden=(16, 16), activation="silu", dtype=torch.float64)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(1.5)
    return m


def _grad_of(m, x):
    def grad(y):
        with torch.enable_grad():
            yy = y.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(m(x, yy).sum(), yy)
        return g
    return grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tau_star", [0.35, 1.0, 1.5])
@pytest.mark.parametrize("noise", [False, True])
def test_heun_step_matches_torchsde_heun(backend, tau_star, noise):
    """Noise off: the deterministic Heun step to fp tolerance. Noise on: the same xi draws (one per step, in
    order, from the generator), so the whole noisy path matches too; T = 2 covers the cutoff."""
    m = _mlp()
    B, K, D = 2, 3, 3
    x = torch.randn(B, 4, dtype=torch.float64)
    y0 = torch.randn(B, K, D, dtype=torch.float64)
    dt, steps, eps_max = 0.1, 20, (0.2 if noise else 0.0)
    cfg = Descent.energy_matching(steps=steps, dt=dt, epsilon_max=eps_max, tau_star=tau_star)
    res = minimize(m, x, K, cfg, init=y0, generator=torch.Generator().manual_seed(3), backend=backend,
                   snapshots=[7, 15, 20])
    grad = _grad_of(m, x)
    gen = torch.Generator().manual_seed(3)
    y, want = y0.clone(), {}
    for k in range(steps):
        xi = torch.randn(y.shape, generator=gen, dtype=y.dtype) if noise else torch.zeros_like(y)
        s0 = math.sqrt(2 * dt * eps_public(grid_time(0.0, dt, k), Fraction(repr(tau_star)), eps_max))
        s1 = math.sqrt(2 * dt * eps_public(grid_time(0.0, dt, k + 1), Fraction(repr(tau_star)), eps_max))
        y = heun_step(grad, y, xi, dt, s0, s1)
        want[k + 1] = y.clamp(-1, 1)
    for i, s in enumerate((7, 15, 20)):
        torch.testing.assert_close(res.snapshots[i], want[s], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(res.y, want[steps], rtol=1e-10, atol=1e-10)


def test_sampling_never_builds_a_second_order_graph(monkeypatch):
    """The public sampler differentiates with create_graph=True at sampling time; pyebm never does (a plain
    nn.Module energy goes through autograd on y only)."""
    net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.SiLU(), torch.nn.Linear(8, 1)).double()

    def energy(x, y):
        return net(y).squeeze(-1)

    seen = []
    real = torch.autograd.grad

    def spy(*args, **kwargs):
        seen.append(kwargs.get("create_graph", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", spy)
    # plain tensors go to the autograd engine directly: (outputs, grad_outputs, keep_graph, create_graph, ...)
    engine = pyebm.descent._RUN_BACKWARD
    if engine is not None:
        def engine_spy(*args):
            seen.append(args[2] or args[3])
            return engine(*args)

        monkeypatch.setattr(pyebm.descent, "_RUN_BACKWARD", engine_spy)
    res = minimize(energy, 2, 4, Descent.energy_matching(steps=5, dt=0.1, tau_star=0.2),
                   init=torch.randn(2, 4, 3, dtype=torch.float64), generator=0)
    assert seen and not any(seen)
    assert not res.y.requires_grad


# ------------------------------------------------------------------------------------------------
# the law of the samples
# ------------------------------------------------------------------------------------------------

P2 = torch.tensor([[2.0, 0.6], [0.6, 1.0]], dtype=torch.float64)
MU2 = torch.tensor([0.4, -0.3], dtype=torch.float64)


def _noise_std(dt, tau_star, eps_max):
    return lambda k: math.sqrt(2 * dt * eps_public(grid_time(0.0, dt, k), Fraction(repr(tau_star)), eps_max))


@pytest.mark.parametrize("tau_star", [0.5, 1.0, 1.5])
def test_law_at_finite_time_on_a_gaussian(tau_star):
    """8000 chains on a 2-D Gaussian energy, snapshots at T = 1.8 and 2.5 (around and after the cutoff), and
    the exact Gaussian law of the discretised Heun chain at those steps (no final clamp). With tau_star 1.5
    the law of the previous schedule (a ramp from t = 1) is far outside the tolerance: the test can fail."""
    dt, eps_max, N = 0.05, 0.3, 8000
    cfg = Descent.energy_matching(steps=50, dt=dt, epsilon_max=eps_max, tau_star=tau_star, lower=None,
                                  upper=None)
    res = minimize(Gaussian(P2, MU2), 1, N, cfg, generator=5, snapshots=[36, 50], final_energy=True)
    eye = torch.eye(2, dtype=torch.float64)
    for i, s in enumerate((36, 50)):
        mean, cov = heun_gaussian_law(P2, MU2, torch.zeros(2, dtype=torch.float64), eye,
                                      _noise_std(dt, tau_star, eps_max), s, dt)
        assert_law(res.snapshots[i, 0], mean, cov)
        if tau_star == 1.5 and s == 36:
            def ramp_from_one(k):   # the earlier preset: a ramp from t = 1 to tau_star
                t = float(grid_time(0.0, dt, k))
                return math.sqrt(2 * dt * eps_max * min(max((t - 1.0) / (tau_star - 1.0), 0.0), 1.0))
            _, cov_old = heun_gaussian_law(P2, MU2, torch.zeros(2, dtype=torch.float64), eye, ramp_from_one, s, dt)
            assert cov_gap(cov, cov_old, N) > 10


def test_stationary_law_on_a_gaussian():
    """Long T: the chain's stationary covariance in closed form, s^2 (I - dt P / 2)^2 (I - M^2)^{-1}, which
    tends to eps P^{-1} as dt -> 0; mean mu."""
    dt, eps_max, N, steps = 0.05, 0.3, 8000, 200
    cfg = Descent.energy_matching(steps=steps, dt=dt, epsilon_max=eps_max, tau_star=1.5, lower=None, upper=None)
    res = minimize(Gaussian(P2, MU2), 1, N, cfg, generator=9)
    eye = torch.eye(2, dtype=torch.float64)
    s2 = 2 * dt * eps_max
    M = eye - dt * P2 + 0.5 * dt * dt * P2 @ P2
    cov = s2 * (eye - 0.5 * dt * P2) @ (eye - 0.5 * dt * P2) @ torch.linalg.inv(eye - M @ M)
    torch.testing.assert_close(cov, eps_max * torch.linalg.inv(P2), rtol=0.02, atol=0)   # the O(dt) limit
    assert_law(res.y[0], MU2, cov)


# ------------------------------------------------------------------------------------------------
# snapshots
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("integrator", ["euler", "heun"])
@pytest.mark.parametrize("masked", [False, True])
def test_snapshots_equal_shorter_runs(integrator, masked):
    m = _mlp()
    B, K, D = 2, 3, 3
    x = torch.randn(B, 4, dtype=torch.float64)
    y0 = torch.randn(B, K, D, dtype=torch.float64) * 1.5
    mask = torch.tensor([True, False, False]) if masked else None
    cfg = Descent.energy_matching(steps=12, dt=0.1, epsilon_max=0.3, tau_star=0.5, integrator=integrator)
    res = minimize(m, x, K, cfg, init=y0, mask=mask, generator=4, snapshots=[0, 1, 6, 12])
    assert res.snapshots.shape == (4, B, K, D)
    want0 = y0.clamp(-1, 1)
    if masked:
        want0[..., 0] = y0[..., 0]
    torch.testing.assert_close(res.snapshots[0], want0, rtol=0, atol=0)
    for i, s in enumerate((1, 6, 12)):
        short = minimize(m, x, K, cfg.replace(steps=s), init=y0, mask=mask, generator=4)
        # the same operations on the same draws: bitwise equal
        assert torch.equal(res.snapshots[i + 1], short.y), s
    assert torch.equal(res.snapshots[-1], res.y)


def test_snapshots_dfo_and_early_exit():
    m = _mlp()
    x = torch.randn(2, 4, dtype=torch.float64)
    cfg = Descent.ibc_dfo(steps=4)
    res = minimize(m, x, 8, cfg, generator=2, snapshots=[2, 4])
    short = minimize(m, x, 8, cfg.replace(steps=2), generator=2)
    assert torch.equal(res.snapshots[0], short.y) and torch.equal(res.snapshots[1], res.y)
    # every candidate stops early: later snapshots hold the final state
    cfg = Descent(steps=40, step_size=0.5, tol=1e3, check_every=1)
    res = minimize(m, x, 2, cfg, generator=2, snapshots=[1, 10, 40])
    assert int(res.steps.max()) < 10
    assert torch.equal(res.snapshots[1], res.y) and torch.equal(res.snapshots[2], res.y)


def test_snapshots_route_and_errors():
    m = _mlp()
    x = torch.randn(2, 4, dtype=torch.float64)
    ex = pyebm.explain(m, x, Descent(steps=4), 2, snapshots=[2])
    assert ex.path == "per step" and "snapshots" in ex.refused["whole loop"]
    assert minimize(m, torch.randn(0, 4, dtype=torch.float64), 2, Descent(steps=4),
                    snapshots=[1, 3]).snapshots.shape == (2, 0, 2, 3)
    for bad, err, match in [([3, 2], ValueError, "increasing"), ([5], ValueError, r"\[0, config.steps = 4\]"),
                            ([1.5], TypeError, "ints"), (3, TypeError, "sequence"), ([], ValueError, "at least")]:
        with pytest.raises(err, match=match):
            minimize(m, x, 2, Descent(steps=4), snapshots=bad)


# ------------------------------------------------------------------------------------------------
# inverse problems: clamped coordinates
# ------------------------------------------------------------------------------------------------

P4 = torch.tensor([[2.0, 0.5, 0.3, 0.0],
                   [0.5, 1.5, 0.4, 0.2],
                   [0.3, 0.4, 1.8, 0.5],
                   [0.0, 0.2, 0.5, 1.2]], dtype=torch.float64)
MU4 = torch.tensor([0.3, -0.2, 0.1, 0.4], dtype=torch.float64)


def test_inpainting_follows_the_conditional_law():
    """Coordinates 0 and 2 observed (clamped at every step), 1 and 3 sampled: the unclamped ones follow the
    Heun chain on the conditional Gaussian, P_UU with mean mu_U - P_UU^{-1} P_UO (b - mu_O); the clamped
    ones hold the observed values at every snapshot, even outside the final clamp's box."""
    dt, eps_max, N, tau_star = 0.05, 0.3, 8000, 1.5
    O, U = [0, 2], [1, 3]
    b = torch.tensor([0.7, 1.3], dtype=torch.float64)
    mask = torch.zeros(4, dtype=torch.bool)
    mask[O] = True
    g = torch.Generator().manual_seed(0)
    y0 = torch.randn(1, N, 4, generator=g, dtype=torch.float64)
    y0[..., O] = b
    cfg = Descent.energy_matching(steps=40, dt=dt, epsilon_max=eps_max, tau_star=tau_star, lower=None, upper=None)
    res = minimize(Gaussian(P4, MU4), 1, N, cfg, init=y0, mask=mask, generator=1, snapshots=[0, 20, 40])
    for snap in list(res.snapshots) + [res.y]:
        assert torch.equal(snap[..., O], b.expand(1, N, 2))
    # the final clamp to [-1, 1] leaves observed values alone (1.3 is outside it)
    boxed = minimize(Gaussian(P4, MU4), 1, 8, cfg.replace(lower=-1.0, upper=1.0), init=y0[:, :8], mask=mask,
                     generator=1, snapshots=[10, 40])
    for snap in list(boxed.snapshots) + [boxed.y]:
        assert torch.equal(snap[..., O], b.expand(1, 8, 2)) and bool((snap[..., U].abs() <= 1).all())
    Puu, Puo = P4[U][:, U], P4[U][:, O]
    c = MU4[U] - torch.linalg.solve(Puu, Puo @ (b - MU4[O]))
    mean, cov = heun_gaussian_law(Puu, c, torch.zeros(2, dtype=torch.float64), torch.eye(2, dtype=torch.float64),
                                  _noise_std(dt, tau_star, eps_max), 40, dt)
    assert_law(res.snapshots[2, 0][:, U], mean, cov)


# ------------------------------------------------------------------------------------------------
# inverse problems: a data-consistency term
# ------------------------------------------------------------------------------------------------

def _autograd_energy_and_grad(fn, y):
    yy = y.detach().requires_grad_(True)
    E = fn(yy)
    (G,) = torch.autograd.grad(E.sum(), yy)
    return E.detach(), G


@pytest.mark.parametrize("form", ["A_shared", "A_per_context", "identity", "term"])
def test_data_consistency_energy_and_grad(form):
    """E and dE/dy of energy + data term against autograd of the sum written out, event shape [2, 3]."""
    B, K, M = 3, 5, 4
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(2), torch.nn.Linear(6, 7), torch.nn.Tanh(),
                              torch.nn.Linear(7, 1)).double()

    def energy(x, y):
        return net(y).squeeze(-1) + (x[:, None, :] * y.flatten(2)).sum(-1)

    x = torch.randn(B, 6, dtype=torch.float64)
    y = torch.randn(B, K, 2, 3, dtype=torch.float64)
    w = 0.7
    if form == "A_shared":
        A, b = torch.randn(M, 6, dtype=torch.float64), torch.randn(B, M, dtype=torch.float64)
        V = DataConsistency(energy, A=A, b=b, weight=w)
        data = lambda t: 0.5 * w * ((t.flatten(2) @ A.T - b[:, None]) ** 2).sum(-1)  # noqa: E731
    elif form == "A_per_context":
        A, b = torch.randn(B, M, 6, dtype=torch.float64), torch.randn(M, dtype=torch.float64)
        V = DataConsistency(energy, A=A, b=b, weight=w)
        data = lambda t: 0.5 * w * ((torch.einsum("bkd,bmd->bkm", t.flatten(2), A) - b) ** 2).sum(-1)  # noqa: E731
    elif form == "identity":
        b = torch.randn(6, dtype=torch.float64)
        V = DataConsistency(energy, b=b, weight=w)
        data = lambda t: 0.5 * w * ((t.flatten(2) - b) ** 2).sum(-1)  # noqa: E731
    else:
        def term(t):
            return torch.sin(t).flatten(2).sum(-1) ** 2
        V = DataConsistency(energy, term=term)
        data = term
    E_want, G_want = _autograd_energy_and_grad(lambda t: energy(x, t) + data(t), y)
    ctx = V.prepare(x)
    E, G = V.energy_and_grad(ctx, y)
    torch.testing.assert_close(E, E_want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(G, G_want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(V.energy(ctx, y), E_want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(V(x, y), E_want, rtol=1e-12, atol=1e-12)
    assert "plus" in str(pyebm.explain(V, x, y=y))


def test_data_consistency_posterior_law():
    """V Gaussian, data term w/2 ||A y - b||^2 (A: 1 x 4, a noisy linear measurement): the sum is Gaussian
    with P' = P + w A^T A and mean P'^{-1} (P mu + w A^T b); the samples follow the chain's exact law."""
    dt, eps_max, N, tau_star, w = 0.05, 0.3, 8000, 1.0, 2.0
    A = torch.tensor([[1.0, -0.5, 0.25, 0.8]], dtype=torch.float64)
    b = torch.tensor([0.9], dtype=torch.float64)
    V = DataConsistency(Gaussian(P4, MU4), A=A, b=b, weight=w)
    cfg = Descent.energy_matching(steps=50, dt=dt, epsilon_max=eps_max, tau_star=tau_star, lower=None, upper=None)
    res = minimize(V, 1, N, cfg, generator=3, event_shape=(4,))
    Pp = P4 + w * A.T @ A
    mup = torch.linalg.solve(Pp, P4 @ MU4 + w * A.T @ b)
    mean, cov = heun_gaussian_law(Pp, mup, torch.zeros(4, dtype=torch.float64), torch.eye(4, dtype=torch.float64),
                                  _noise_std(dt, tau_star, eps_max), 50, dt)
    assert_law(res.y[0], mean, cov)


def test_data_consistency_module_and_errors():
    m = _mlp()
    V = DataConsistency(m, b=torch.zeros(3, dtype=torch.float64), weight=3.0)
    assert V.event_shape == (3,) and V.dtype == torch.float64
    assert set(dict(V.named_parameters())) == {"inner." + n for n, _ in m.named_parameters()}
    x = torch.randn(2, 4, dtype=torch.float64)
    res = minimize(V, x, 3, Descent(steps=3), generator=0, backend=BACKENDS[-1])
    E, _ = V.energy_and_grad(V.prepare(x), res.y)
    torch.testing.assert_close(res.energy, E)
    V2 = pickle.loads(pickle.dumps(V))          # a module like any other: pickles with its energy
    torch.testing.assert_close(V2.energy(V2.prepare(x), res.y), E)
    with pytest.raises(ValueError, match="either term or"):
        DataConsistency(m, b=torch.zeros(3), term=lambda y: y.sum((2,)))
    with pytest.raises(ValueError, match="needs b"):
        DataConsistency(m)
    with pytest.raises(ValueError, match="weight"):
        DataConsistency(m, b=torch.zeros(3), weight=0.0)
    with pytest.raises(ValueError, match="rows but b"):
        DataConsistency(m, A=torch.zeros(2, 3), b=torch.zeros(4))
    with pytest.raises(TypeError, match="floating"):
        DataConsistency(m, b=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="columns"):
        DataConsistency(m, A=torch.zeros(2, 5, dtype=torch.float64), b=torch.zeros(2)).energy(
            m.prepare(x), torch.zeros(2, 3, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"term\(y\) must return"):
        DataConsistency(m, term=lambda y: y.sum()).energy_and_grad(m.prepare(x), torch.zeros(2, 3, 3,
                                                                                              dtype=torch.float64))


# ------------------------------------------------------------------------------------------------
# the benchmark and the example run (tiny sizes; no timing is asserted)
# ------------------------------------------------------------------------------------------------

def _load(relpath):
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / relpath
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_energy_matching_runs_and_agrees(capsys):
    """The benchmark checks that pyebm and the public loop's form give the same samples before timing."""
    bench = _load("bench/bench_energy_matching.py")
    assert bench.main(["--sizes", "tiny", "--steps", "3", "--repeats", "1", "--no-compile"]) == 0
    assert "| tiny |" in capsys.readouterr().out


def test_inpainting_example_runs(tmp_path):
    out = tmp_path / "inpaint.png"
    assert _load("examples/energy_matching_inpaint.py").main(
        ["--out", str(out), "--train-steps", "5", "--images", "2", "--steps", "12"]) == 0
    assert out.stat().st_size > 0
