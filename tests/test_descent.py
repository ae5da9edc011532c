"""pyebm.minimize / pyebm.Descent against pyebm.reference.descent and against the peers' rules written out."""
import dataclasses
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import pyebm
from pyebm import Descent, minimize
from pyebm.descent import CONVERGED, MAX_STEPS, NONFINITE
from pyebm.reference.descent import minimize_reference

BACKENDS = ["torch"] + (["cpu"] if pyebm.backends()["cpu"] else [])


# ------------------------------------------------------------------------------------------------
# energies used below
# ------------------------------------------------------------------------------------------------

def make_mlp(context_dim=5, D=3, hidden=(16, 16), dtype=torch.float64, seed=0, gain=1.5):
    torch.manual_seed(seed)
    m = pyebm.MLPEnergy(context_dim, D, hidden=hidden, activation="silu", dtype=dtype)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(gain)
    return m


def cast(m, dtype):
    m2 = pyebm.MLPEnergy(m.context_dim, m.candidate_dim, hidden=m.hidden, activation=m.activation,
                         residual=m.residual, bias=m.bias, dtype=dtype)
    m2.load_state_dict({k: v.to(dtype) for k, v in m.state_dict().items()})
    return m2


class Quadratic:
    """E = 0.5 (y - x)^T P (y - x) / temperature-free; context x [B, D] is the mean. Analytic gradient."""

    def __init__(self, P):
        self.P = P
        self.event_shape = (P.shape[0],)
        self.dtype = P.dtype

    def prepare(self, x):
        return x

    def energy(self, ctx, y):
        r = y - ctx.unsqueeze(1)
        return 0.5 * torch.einsum("bki,ij,bkj->bk", r, self.P, r)

    def energy_and_grad(self, ctx, y):
        r = y - ctx.unsqueeze(1)
        return 0.5 * torch.einsum("bki,ij,bkj->bk", r, self.P, r), r @ self.P


class Wells(torch.nn.Module):
    """Four Gaussian wells in 2-D; the context (an index 0..3 as float) says which one is deepest.
    A plain nn.Module f(x, y) -> E [B, K]: minimize drives it through the generic autograd path."""

    centers = torch.tensor([[-1.2, -1.2], [1.2, -1.2], [-1.2, 1.2], [1.2, 1.2]], dtype=torch.float64)

    def forward(self, x, y):
        c = self.centers.to(y.dtype)
        deep = F.one_hot(x.long(), 4).to(y.dtype)                 # [B, 4]
        w = 0.6 + 0.6 * deep                                       # deepest 1.2, others 0.6
        d2 = (y.unsqueeze(2) - c).square().sum(-1)                 # [B, K, 4]
        return -(w.unsqueeze(1) * torch.exp(-d2 / (2 * 0.25 ** 2))).sum(-1) + 0.05 * y.square().sum(-1)


class Flat:
    """MLPEnergy over candidates of event shape (T, A), flattened: exercises multi-dimensional events."""

    def __init__(self, m, event_shape):
        self.m, self.event_shape, self.dtype = m, tuple(event_shape), next(m.parameters()).dtype

    def prepare(self, x):
        return self.m.prepare(x)

    def energy(self, ctx, y, backend=None):
        return self.m.energy(ctx, y.flatten(2), backend=backend)

    def energy_and_grad(self, ctx, y, backend=None):
        E, G = self.m.energy_and_grad(ctx, y.flatten(2), backend=backend)
        return E, G.view(y.shape)


def auto_grad(fn, y):
    with torch.enable_grad():
        yy = y.detach().requires_grad_(True)
        E = fn(yy)
        (G,) = torch.autograd.grad(E.sum(), yy)
    return E.detach(), G


# ------------------------------------------------------------------------------------------------
# every option against the reference
# ------------------------------------------------------------------------------------------------

B, K, D = 3, 5, 3

# Noise off: every gradient option, schedule, clip, bound, transform, exit and selection.
NOISE_OFF = {
    "gd": dict(),
    "poly": dict(step_schedule="polynomial", step_size=0.3, step_size_end=0.01, step_power=2.0),
    "exp": dict(step_schedule="exponential", step_size=0.3, step_decay=0.7),
    "cosine": dict(step_schedule="cosine", step_size=0.3, step_size_end=0.02),
    "energy_scaled": dict(step_schedule="energy", step_size=0.2, energy_temperature=3.0),
    "grad_scale": dict(grad_scale=0.5, step_size=0.3),
    "momentum": dict(momentum=0.7),
    "nesterov": dict(momentum=0.8, nesterov=True),
    "grad_clip": dict(grad_clip=0.05, step_size=0.5),
    "grad_clip_norm": dict(grad_clip_norm=0.08, step_size=0.5),
    "step_clip": dict(step_clip=0.01, step_size=0.5),
    "step_clip_per_dim": dict(step_clip=torch.tensor([0.005, 0.02, 1.0]), step_size=0.5),
    "bounds": dict(lower=-0.4, upper=0.3, step_size=0.5),
    "bounds_per_dim": dict(lower=torch.tensor([-0.2, -1.0, -0.5]), upper=torch.tensor([0.1, 0.05, 0.5]),
                           step_size=0.5),
    "bounds_final": dict(lower=-0.4, upper=0.3, bound_each_step=False, step_size=0.5),
    "normalize_rms": dict(normalize="rms"),
    "normalize_rms_all": dict(normalize="rms_all"),
    "project_softmax": dict(project="softmax", step_size=2.0),
    "accept_if_lower": dict(accept_if_lower=True, step_size=3.0, momentum=0.5),
    "tol_grad_norm": dict(tol=0.15, steps=12, check_every=2),
    "tol_energy_change": dict(tol=2e-3, tol_on="energy_change", steps=12, check_every=1),
    "tol_scope_all": dict(tol=0.5, tol_scope="all", steps=12),
    "tol_energy_change_all": dict(tol=2e-2, tol_on="energy_change", tol_scope="all", steps=12),
    "tol_final_step": dict(tol=0.15, tol_final_step=True, steps=12, check_every=3),
    "select_max": dict(selection="max"),
    "select_max_gap": dict(selection="max_gap"),
    "select_sample": dict(selection="sample", selection_temperature=0.05),
    "heun": dict(integrator="heun", step_size=0.2, grad_clip=0.3, lower=-1.0, upper=1.0),
    "dfo": dict(method="dfo", steps=3, noise="additive", noise_scale=0.3, noise_schedule="exponential",
                lower=-1.0, upper=1.0),
}

# Noise on: the shared-generator contract (same draws in the same order) makes them exact too.
NOISE_ON = {
    "langevin": dict(noise="langevin", noise_scale=0.3, step_size=0.05),
    "langevin_energy_scaled": dict(noise="langevin", noise_scale=0.3, step_schedule="energy", step_size=0.05),
    "step_noise": dict(noise="step", noise_scale=0.5, grad_scale=0.5, step_clip=0.02, lower=-1, upper=1),
    "additive_poly": dict(noise="additive", noise_scale=0.2, noise_schedule="polynomial", noise_power=2.0),
    "pre_cosine": dict(noise="pre", noise_scale=0.2, noise_schedule="cosine", noise_scale_end=0.01),
    "langevin_ramp": dict(noise="langevin", noise_scale=0.5, noise_schedule="ramp", noise_ramp=(2.0, 6.0)),
    "langevin_exp_momentum": dict(noise="langevin", noise_schedule="exponential", noise_decay=0.7, momentum=0.5),
    "heun_noise": dict(integrator="heun", noise="langevin", noise_scale=0.1, noise_schedule="ramp",
                       noise_ramp=(3.0, 3.0)),
    "pre_accept_softmax": dict(noise="pre", noise_scale=0.3, project="softmax", accept_if_lower=True,
                               step_size=2.0),
}


def _cfg(kw, steps=8):
    kw = dict(kw)
    kw.setdefault("steps", steps)
    kw.setdefault("step_size", 0.2)
    return Descent(**kw)


def _compare(fast, ref64, ref_lo, dtype, what=("y", "energy", "best", "best_energy", "initial_energy")):
    eps = torch.finfo(dtype).eps
    for name in what:
        a, r, rl = (getattr(o, name).double() for o in (fast, ref64, ref_lo))
        scale = r.abs().max().clamp_min(1.0)
        err = ((a - r).abs().max() / scale).item()
        rerr = ((rl - r).abs().max() / scale).item()
        assert err <= 4 * rerr + 256 * eps, (name, err, rerr)
    assert torch.equal(fast.steps, ref_lo.steps), (fast.steps, ref_lo.steps)
    assert torch.equal(fast.status, ref_lo.status), (fast.status, ref_lo.status)
    _assert_same_choice(fast, ref_lo, eps)


def _assert_same_choice(fast, ref, eps):
    """Same best candidate; where they differ, the two candidates' energies must tie within the dtype's
    rounding (candidates that converged to the same point)."""
    differ = fast.best_index != ref.best_index
    if not differ.any():
        return
    E = fast.energy.double()
    if E.dim() == 3:  # a recorded trajectory [steps + 1, B, K]: the final energies
        E = E[-1]
    rows = torch.arange(E.shape[0], device=E.device)
    gap = (E[rows, fast.best_index] - E[rows, ref.best_index]).abs()[differ]
    scale = E.abs().max().clamp_min(1.0)
    assert (gap <= 64 * eps * scale).all(), (fast.best_index, ref.best_index, gap)


def _run_case(kw, backend, dtype, mask=None, init_shape=None, seed=7, device="cpu"):
    cfg = _cfg(kw)
    m64 = make_mlp(D=D)
    x = torch.randn(B, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)).to(device)
    y0 = 0.7 * torch.randn(B, K, D, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
    y0 = y0.to(device)
    if mask is not None:
        mask = mask.to(device)
    if cfg.init == "uniform" or cfg.method == "dfo":
        y0 = y0.clamp(-1, 1)
    ref = {}
    for dt in {torch.float64, dtype}:
        md = cast(m64, dt).to(device)
        xd = x.to(dt)
        ref[dt] = minimize_reference(lambda y: md(xd, y), y0.to(dt), cfg, mask=mask,
                                     generator=torch.Generator(device=device).manual_seed(3), record=True)
    md = cast(m64, dtype).to(device)
    fast = minimize(md, x.to(dtype), K, cfg, init=y0.to(dtype), mask=mask,
                    generator=torch.Generator(device=device).manual_seed(3), record=True, backend=backend)
    _compare(fast, ref[torch.float64], ref[dtype], dtype)
    _compare(_traj(fast), _traj(ref[torch.float64]), _traj(ref[dtype]), dtype, what=("y", "energy"))
    return fast, ref[dtype]


def _traj(res):
    """The recorded trajectory viewed as a result (y = trajectory_y, energy = trajectory)."""
    return SimpleNamespace(y=res.trajectory_y, energy=res.trajectory, steps=res.steps, status=res.status,
                           best_index=res.best_index)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(NOISE_OFF))
def test_option_matches_reference_noise_off(case, backend, dtype):
    _run_case(NOISE_OFF[case], backend, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(NOISE_ON))
def test_option_matches_reference_noise_on(case, backend):
    _run_case(NOISE_ON[case], backend, torch.float64)


def _triton_usable():
    import importlib.util

    return pyebm.backends()["triton"] and importlib.util.find_spec("pyebm.ops.mlp_energy_triton") is not None


@pytest.mark.skipif(not _triton_usable(), reason="Triton MLP energy kernels not available")
@pytest.mark.parametrize("case", ["gd", "nesterov", "bounds_per_dim", "tol_final_step", "accept_if_lower", "dfo"])
def test_option_matches_reference_triton(triton_device, case):
    _run_case(NOISE_OFF[case], "triton", torch.float32, device=triton_device)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask_shape", ["full", "per_context", "event"])
def test_mask_matches_reference(backend, mask_shape):
    g = torch.Generator().manual_seed(11)
    if mask_shape == "full":
        mask = torch.rand(B, K, D, generator=g) < 0.4
    elif mask_shape == "per_context":
        mask = (torch.rand(B, 1, D, generator=g) < 0.5)
    else:
        mask = torch.tensor([True, False, False])
    kw = dict(momentum=0.5, lower=-0.5, upper=0.5, noise="langevin", noise_scale=0.1)
    fast, ref = _run_case(kw, backend, torch.float64, mask=mask)
    # the pre-evaluation transforms leave clamped coordinates alone too
    _run_case(dict(normalize="rms", project="softmax", noise="pre", noise_scale=0.1, step_size=1.0), backend,
              torch.float64, mask=mask)
    y0 = fast.trajectory_y[0]
    full = mask.expand(B, K, D)
    assert torch.equal(fast.y[full], y0[full])                # clamped coordinates never move
    assert not torch.equal(fast.y[~full], y0[~full])


def test_mask_in_dfo_keeps_values():
    m = make_mlp(D=D)
    x = torch.randn(B, 5, dtype=torch.float64)
    y0 = torch.rand(B, K, D, dtype=torch.float64) * 2 - 1
    y0[..., 0] = 0.25
    mask = torch.tensor([True, False, False])
    res = minimize(m, x, K, Descent.ibc_dfo(steps=4), init=y0, mask=mask, generator=0)
    assert torch.all(res.y[..., 0] == 0.25)


@pytest.mark.parametrize("backend", BACKENDS)
def test_multidim_event_matches_reference(backend):
    m = make_mlp(D=8, hidden=(16,))
    flat = Flat(m, (4, 2))
    x = torch.randn(B, 5, dtype=torch.float64)
    y0 = torch.randn(B, K, 4, 2, dtype=torch.float64)
    cfg = Descent(steps=6, step_size=0.3, normalize="rms", momentum=0.5, grad_clip_norm=0.2,
                  step_clip=torch.tensor([0.05, 0.1]), lower=torch.tensor([-1.0, -0.5]), upper=1.0)
    fast = minimize(flat, x, K, cfg, init=y0, backend=backend)
    ref = minimize_reference(lambda y: m(x, y.flatten(2)), y0, cfg)
    torch.testing.assert_close(fast.y, ref.y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast.energy, ref.energy, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# presets: each peer's rule written out literally (PEERS.md), same draws from a shared generator
# ------------------------------------------------------------------------------------------------

def _setup(D_=3, B_=3, K_=4, seed=0):
    m = make_mlp(D=D_, seed=seed)
    x = torch.randn(B_, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 100))
    y0 = torch.randn(B_, K_, D_, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 200))
    return m, x, y0


@pytest.mark.parametrize("backend", BACKENDS)
def test_preset_gd(backend):
    m, x, y0 = _setup()
    y = y0.clone()
    for _ in range(7):
        _, g = auto_grad(lambda t: m(x, t), y)
        y = y - 0.15 * g
    res = minimize(m, x, 4, Descent.gd(steps=7, step_size=0.15), init=y0, backend=backend)
    torch.testing.assert_close(res.y, y, rtol=1e-12, atol=1e-12)
    E = m(x, y).detach()
    torch.testing.assert_close(res.best_energy, E.min(dim=1).values, rtol=1e-12, atol=1e-12)
    assert torch.equal(res.steps, torch.full((3, 4), 7, dtype=torch.int32))
    assert torch.equal(res.status, torch.full((3, 4), MAX_STEPS, dtype=torch.int8))


@pytest.mark.parametrize("backend", BACKENDS)
def test_preset_langevin(backend):
    m, x, y0 = _setup()
    eta, T = 0.05, 0.7
    gen = torch.Generator().manual_seed(5)
    y = y0.clone()
    for _ in range(9):                                   # y <- y - eta g + sqrt(2 eta T) xi
        _, g = auto_grad(lambda t: m(x, t), y)
        y = y - eta * g + math.sqrt(2 * eta * T) * torch.randn(y.shape, generator=gen, dtype=y.dtype)
    res = minimize(m, x, 4, Descent.langevin(steps=9, step_size=eta, temperature=T), init=y0,
                   generator=torch.Generator().manual_seed(5), backend=backend)
    torch.testing.assert_close(res.y, y, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("schedule", ["polynomial", "exponential"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_preset_ibc_langevin(backend, schedule):
    """ibc/agents/mcmc.py langevin_actions_given_obs + langevin_step, written out."""
    m, x, _ = _setup(K_=6)
    lo = torch.tensor([-1.0, -0.5, -2.0], dtype=torch.float64)
    hi = torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64)
    a0 = lo + (hi - lo) * torch.rand(3, 6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    steps, init, final, power, decay, sigma, grad_clip = 12, 0.1, 1e-5, 2.0, 0.8, 1.0, 0.4

    def rate(i):
        if schedule == "polynomial":
            return (init - final) * ((1 - (float(i) / float(steps - 1))) ** power) + final
        return init * decay ** i

    gen = torch.Generator().manual_seed(9)
    a = a0.clone()
    stepsize = init
    delta_action_clip = 0.1 * 0.5 * (hi - lo)
    for step_index in range(steps):
        _, de_dact = auto_grad(lambda t: m(x, t), a)        # dE/da (IBC's net outputs -E)
        de_dact = torch.clamp(de_dact, -grad_clip, grad_clip)
        de_dact = 0.5 * de_dact + torch.randn(a.shape, generator=gen, dtype=a.dtype) * sigma
        delta = stepsize * de_dact
        delta = torch.maximum(torch.minimum(delta, delta_action_clip), -delta_action_clip)
        a = torch.maximum(torch.minimum(a - delta, hi), lo)
        stepsize = rate(step_index + 1)
    cfg = Descent.ibc_langevin(lower=lo, upper=hi, steps=steps, step_size=init, step_size_end=final, power=power,
                               schedule=schedule, decay=decay, noise_scale=sigma, grad_clip=grad_clip)
    res = minimize(m, x, 6, cfg, init=a0, generator=torch.Generator().manual_seed(9), backend=backend)
    torch.testing.assert_close(res.y, a, rtol=1e-12, atol=1e-12)
    E = m(x, a).detach()
    assert torch.equal(res.best_index, torch.softmax(-E, dim=1).argmax(dim=1))   # IBC: argmax of softmax(-E)


def _inverse_cdf(probs, u):
    cdf = probs.cumsum(1)
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp(max=probs.shape[1] - 1).sort(1).values


@pytest.mark.parametrize("backend", BACKENDS)
def test_preset_ibc_dfo(backend):
    """ibc/agents/mcmc.py iterative_dfo, written out (the categorical draw as sorted inverse-CDF draws)."""
    m, x, _ = _setup(K_=64)
    gen0 = torch.Generator().manual_seed(2)
    a0 = torch.rand(3, 64, 3, generator=gen0, dtype=torch.float64) * 2 - 1
    gen = torch.Generator().manual_seed(4)
    ar = torch.arange(3).unsqueeze(1)

    def update_selected_actions(samples):
        log_probs = -m(x, samples).detach() / 1.0
        u = torch.rand(3, 64, generator=gen, dtype=torch.float64)
        idx = _inverse_cdf(torch.softmax(log_probs, dim=1), u)
        return log_probs, samples[ar, idx]

    iteration_std = 0.33
    _, a = update_selected_actions(a0)
    for _ in range(3 - 1):
        a = a + torch.randn(a.shape, generator=gen, dtype=a.dtype) * iteration_std
        a = a.clamp(-1.0, 1.0)
        _, a = update_selected_actions(a)
        iteration_std *= 0.5
    E = m(x, a).detach()
    res = minimize(m, x, 64, Descent.ibc_dfo(steps=3), init=a0, generator=torch.Generator().manual_seed(4),
                   backend=backend)
    torch.testing.assert_close(res.y, a, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(res.best_energy, E.min(dim=1).values, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("accept", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_preset_ebt(backend, accept):
    """model/nlp/ebt.py _run_ebt_inference_steps + max_gap selection, written out. Candidates are logits
    over V = 6; the energy sees probabilities."""
    V = 6
    m, x, y0 = _setup(D_=V, K_=5)
    alpha, noise, c = 4.0, 0.3, 9.0
    gen = torch.Generator().manual_seed(8)

    def get_energy(tokens):
        return m(x, torch.softmax(tokens, dim=-1)).detach()

    cur_all = y0.clone()
    energies_list = []
    for step_idx in range(3):
        cur = cur_all + noise * torch.randn(cur_all.shape, generator=gen, dtype=cur_all.dtype)
        cur = torch.softmax(cur, dim=-1)
        energies, grad = auto_grad(lambda t: m(x, t), cur)
        energies_list.append(energies)
        min_and_max = c / alpha
        grad = torch.clamp(grad, -min_and_max, min_and_max)
        if accept:
            proposed = cur - alpha * grad
            new_energies = get_energy(proposed)
            accept_mask = (new_energies < energies).double().unsqueeze(-1)
            cur_all = accept_mask * proposed + (1 - accept_mask) * cur
        else:
            cur_all = cur - alpha * grad
    final = get_energy(cur_all)
    gap = energies_list[0] - final
    best = gap.argmax(dim=1)
    cfg = Descent.ebt(steps=3, step_size=alpha, noise=noise, grad_clamp=c, accept_if_lower=accept,
                      selection="max_gap")
    res = minimize(m, x, 5, cfg, init=y0, generator=torch.Generator().manual_seed(8), backend=backend)
    torch.testing.assert_close(res.y, cur_all, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(res.energy, final, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(res.initial_energy, energies_list[0], rtol=1e-12, atol=1e-12)
    assert torch.equal(res.best_index, best)


def _peer_ebt_policy(energy_grad, a0, alpha, mu, temp, max_steps, min_grad):
    """robomimic/algo/precious_policy.py _get_action_trajectory + _energy_step (inference), written out."""
    a = a0.clone()
    velocity = torch.zeros_like(a)

    def energy_step(trajectory, velocity):
        trajectory = F.rms_norm(trajectory, trajectory.shape)
        traj_look = trajectory + velocity * mu
        energy_pred, grad = energy_grad(traj_look)
        alpha_b = alpha * (torch.exp(energy_pred)[:, None, None] / temp)
        velocity.mul_(mu).add_(-alpha_b * grad)
        return trajectory + velocity, grad

    i = 0
    grad_pred_norm = float("inf")
    while i < max_steps - 1 and grad_pred_norm > min_grad:
        a, grad = energy_step(a, velocity)
        grad_pred_norm = grad.norm().item()
        i += 1
    a, _ = energy_step(a, velocity)
    return a, i + 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_preset_ebt_policy_coupled(backend):
    """The reference's batch-coupled form: B chains (K = 1) normalised and stopped together."""
    m = make_mlp(D=8, hidden=(16,), seed=3)
    flat = Flat(m, (4, 2))
    x = torch.randn(3, 5, dtype=torch.float64)
    a0 = torch.randn(3, 4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    alpha, mu, temp, max_steps, min_grad = 1.0, 0.9, 9.0, 20, 0.5

    def energy_grad(a):
        E, G = auto_grad(lambda t: m(x, t.flatten(1).unsqueeze(1)).squeeze(1), a)
        return E, G

    a_ref, n_steps = _peer_ebt_policy(energy_grad, a0, alpha, mu, temp, max_steps, min_grad)
    assert 2 < n_steps < max_steps  # the exit on ||g|| is exercised
    cfg = Descent.ebt_policy(max_steps=max_steps, step_size=alpha, momentum=mu, energy_temperature=temp,
                             min_grad=min_grad, coupled=True)
    res = minimize(flat, x, 1, cfg, init=a0.unsqueeze(1), backend=backend)
    torch.testing.assert_close(res.y[:, 0], a_ref, rtol=1e-10, atol=1e-10)
    assert torch.all(res.steps == n_steps)


@pytest.mark.parametrize("backend", BACKENDS)
def test_preset_ebt_policy_per_candidate(backend):
    """Default: each candidate normalised and stopped on its own = the reference loop run per sample."""
    m = make_mlp(D=8, hidden=(16,), seed=3)
    flat = Flat(m, (4, 2))
    Bq, Kq = 2, 6
    x = torch.randn(Bq, 5, dtype=torch.float64)
    a0 = torch.randn(Bq, Kq, 4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    alpha, mu, temp, max_steps, min_grad = 1.0, 0.9, 9.0, 12, 0.25
    cfg = Descent.ebt_policy(max_steps=max_steps, step_size=alpha, momentum=mu, energy_temperature=temp,
                             min_grad=min_grad)
    res = minimize(flat, x, Kq, cfg, init=a0, backend=backend)
    counts = set()
    for b in range(Bq):
        for k in range(Kq):
            def energy_grad(a, b=b):
                return auto_grad(lambda t: m(x[b:b + 1], t.flatten(1).unsqueeze(1)).squeeze(1), a)
            a_ref, n = _peer_ebt_policy(energy_grad, a0[b, k:k + 1], alpha, mu, temp, max_steps, min_grad)
            torch.testing.assert_close(res.y[b, k], a_ref[0], rtol=1e-10, atol=1e-10)
            assert res.steps[b, k].item() == n
            assert res.status[b, k].item() == (CONVERGED if n < max_steps else MAX_STEPS) or n == max_steps
            counts.add(n)
    assert len(counts) > 1  # candidates stopped at different steps


def _em_temperature(t, tau_star, epsilon_max):
    """EnergyMatching experiments/toy2d/utils_2D.py temperature(t): 0 before tau*, ramp to eps_max at 1."""
    if t < tau_star:
        return 0.0
    if t < 1.0:
        return epsilon_max * (t - tau_star) / (1.0 - tau_star)
    return epsilon_max


@pytest.mark.parametrize("integrator", ["euler", "heun"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_preset_energy_matching(backend, integrator):
    m, x, y0 = _setup(K_=4)
    dt, n_steps, tau_star, eps_max = 0.1, 14, 0.35, 0.2
    gen = torch.Generator().manual_seed(6)
    samples = y0.clone()
    for i in range(n_steps):
        t_val = i * dt
        xi = torch.randn(samples.shape, generator=gen, dtype=samples.dtype)
        _, grad_V = auto_grad(lambda t: m(x, t), samples)
        if integrator == "euler":     # utils_train_proteins.py gibbs_sampling_time_sweep
            noise_std = math.sqrt(2.0 * dt * _em_temperature(t_val, tau_star, eps_max))
            samples = samples - dt * grad_V + noise_std * xi
        else:                         # torchsde Stratonovich "heun" with diagonal noise sqrt(2 eps(t))
            dW = math.sqrt(dt) * xi
            g0 = math.sqrt(2 * _em_temperature(t_val, tau_star, eps_max))
            g1 = math.sqrt(2 * _em_temperature(t_val + dt, tau_star, eps_max))
            y_prime = samples - dt * grad_V + g0 * dW
            _, grad_1 = auto_grad(lambda t: m(x, t), y_prime)
            samples = samples + 0.5 * (dt * (-grad_V - grad_1) + g0 * dW + g1 * dW)
    samples = samples.clamp(-1.0, 1.0)
    cfg = Descent.energy_matching(steps=n_steps, dt=dt, epsilon_max=eps_max, tau_star=tau_star,
                                  integrator=integrator)
    res = minimize(m, x, 4, cfg, init=y0, generator=torch.Generator().manual_seed(6), backend=backend)
    torch.testing.assert_close(res.y, samples, rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------------------------------
# statistics
# ------------------------------------------------------------------------------------------------

def test_langevin_gaussian_moments():
    """ULA on E = (y - mu)^T P (y - mu) / 2 at temperature T: the chain's stationary law is Gaussian with
    mean mu and covariance T (P - eta P^2 / 2)^{-1} (exact for the discretised chain). Many independent
    chains after burn-in give i.i.d. samples, so the tolerance is a few standard errors of N samples."""
    P = torch.tensor([[2.0, 0.6], [0.6, 1.0]], dtype=torch.float64)
    q = Quadratic(P)
    mu = torch.tensor([[0.5, -1.0], [2.0, 0.3]], dtype=torch.float64)
    eta, T, N = 0.1, 0.8, 4000
    res = minimize(q, mu, N, Descent.langevin(steps=250, step_size=eta, temperature=T), generator=0)
    C = T * torch.linalg.inv(P - eta * P @ P / 2)
    for b in range(2):
        s = res.y[b]
        mean = s.mean(0)
        se_mean = (torch.diag(C) / N).sqrt()
        assert torch.all((mean - mu[b]).abs() < 5 * se_mean), (mean, mu[b], se_mean)
        cov = torch.cov(s.T)
        se_cov = ((torch.diag(C)[:, None] * torch.diag(C)[None, :] + C ** 2) / N).sqrt()
        assert torch.all((cov - C).abs() < 5 * se_cov), (cov, C, se_cov)


def test_dfo_finds_global_minimum():
    wells = Wells()
    deep = torch.tensor([0.0, 3.0, 1.0, 2.0], dtype=torch.float64)
    res = minimize(wells, deep, 1024, Descent.ibc_dfo(lower=-2.0, upper=2.0, steps=5), event_shape=(2,),
                   generator=1, init=None)
    target = Wells.centers[deep.long()]
    assert torch.all((res.best - target).norm(dim=1) < 0.15), (res.best, target)


def test_langevin_finds_global_minimum():
    wells = Wells().double()
    deep = torch.tensor([2.0, 0.0, 3.0], dtype=torch.float64)
    cfg = Descent.langevin(steps=150, step_size=0.01, temperature=0.3, noise_schedule="polynomial",
                           noise_scale_end=0.0, lower=-2.0, upper=2.0, init="uniform")
    res = minimize(wells, deep, 32, cfg, event_shape=(2,), generator=2)
    target = Wells.centers[deep.long()]
    assert torch.all((res.best - target).norm(dim=1) < 0.1), (res.best, target)


# ------------------------------------------------------------------------------------------------
# reproducibility, NaN isolation, generic energies, recording
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [Descent.langevin(steps=5, temperature=0.5), Descent.ibc_dfo(steps=3),
                                 Descent.ebt(steps=3, step_size=1.0, noise=0.2, selection="max_gap"),
                                 Descent.gd(selection="sample", noise="additive", noise_scale=0.1)])
def test_same_seed_same_result(cfg):
    m, x, _ = _setup()
    r1 = minimize(m, x, 8, cfg, generator=123)
    r2 = minimize(m, x, 8, cfg, generator=torch.Generator().manual_seed(123))
    r3 = minimize(m, x, 8, cfg, generator=124)
    assert torch.equal(r1.y, r2.y) and torch.equal(r1.best_index, r2.best_index)
    assert not torch.equal(r1.y, r3.y)


class Cliff:
    """E = -y_0 + |y_1..|^2 / 2, NaN where y_0 > 3: gradient descent walks every candidate towards it."""

    event_shape = (2,)
    dtype = torch.float64

    def prepare(self, x):
        return x

    def energy_and_grad(self, ctx, y):
        E = -y[..., 0] + 0.5 * y[..., 1].square()
        E = torch.where(y[..., 0] > 3, torch.nan, E)
        G = torch.stack([-torch.ones_like(E), y[..., 1]], dim=-1)
        return E, G

    def energy(self, ctx, y):
        return self.energy_and_grad(ctx, y)[0]


def test_nonfinite_candidate_is_isolated():
    y0 = torch.tensor([[[-5.0, 1.0], [2.5, 0.5], [-4.0, -1.0]]], dtype=torch.float64)
    res = minimize(Cliff(), 1, 3, Descent.gd(steps=10, step_size=0.3), init=y0, record=True)
    assert res.status[0].tolist() == [MAX_STEPS, NONFINITE, MAX_STEPS]
    # candidate 1 moves at step 0 (2.5, finite) to 2.8 and at step 1 to 3.1; at step 2 its energy is NaN:
    # it stops there with 2 steps, its state finite, the others unaffected.
    assert res.steps[0, 1].item() == 2
    torch.testing.assert_close(res.y[0, 1, 0], torch.tensor(3.1, dtype=torch.float64))
    assert torch.isfinite(res.y).all()
    solo = minimize(Cliff(), 1, 2, Descent.gd(steps=10, step_size=0.3), init=y0[:, [0, 2]])
    assert torch.equal(res.y[:, [0, 2]], solo.y)
    assert res.best_index.item() in (0, 2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cfg", [Descent(steps=5, momentum=0.5), Descent.ibc_langevin(steps=5, noise_scale=0.0),
                                 Descent(steps=5, accept_if_lower=True), Descent(steps=5, integrator="heun")])
def test_nan_init_does_not_spread(backend, cfg):
    m, x, y0 = _setup(K_=5)
    y0 = y0.clamp(-1, 1)
    bad = y0.clone()
    bad[1, 2, 0] = float("nan")
    res = minimize(m, x, 5, cfg, init=bad, backend=backend)
    good = minimize(m, x, 5, cfg, init=y0, backend=backend)
    keep = torch.ones(3, 5, dtype=torch.bool)
    keep[1, 2] = False
    assert torch.equal(res.y[keep], good.y[keep])
    assert res.status[1, 2].item() == NONFINITE and res.steps[1, 2].item() == 0
    assert res.best_index[1].item() != 2


def test_overflowing_step_stops_candidate():
    """EBT-Policy's alpha exp(E) / T overflows for a high-energy candidate: it stops, finite."""
    q = Quadratic(torch.eye(2, dtype=torch.float64))
    y0 = torch.tensor([[[0.5, 0.5], [40.0, 0.0]]], dtype=torch.float64)   # E = 800: exp overflows
    res = minimize(q, torch.zeros(1, 2, dtype=torch.float64), 2,
                   Descent(steps=4, step_schedule="energy", step_size=0.1), init=y0)
    assert res.status[0].tolist() == [MAX_STEPS, NONFINITE]
    assert torch.equal(res.y[0, 1], y0[0, 1])
    assert torch.isfinite(res.y).all()


def test_plain_module_energy_matches_protocol_path():
    m, x, y0 = _setup()

    class User(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x, y):
            return self.inner(x, y)

    cfg = Descent(steps=6, momentum=0.5, grad_clip=0.3)
    a = minimize(User(m), x, 4, cfg, init=y0)
    b = minimize(m, x, 4, cfg, init=y0, backend="torch")
    torch.testing.assert_close(a.y, b.y, rtol=1e-12, atol=1e-12)
    fn = minimize(lambda x, y: m(x, y), x, 4, cfg, init=y0)      # any callable
    torch.testing.assert_close(fn.y, b.y, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="candidate shape"):
        minimize(User(m), x, 4, cfg)


class CatEnergy(torch.nn.Module):
    """y enters through a concatenation with the context: autograd hands back a strided dE/dy (a slice)."""

    def __init__(self, D_=3, C=2):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.w1 = torch.nn.Parameter(torch.randn(D_ + C, 16, dtype=torch.float64, generator=g) / 2)
        self.w2 = torch.nn.Parameter(torch.randn(16, dtype=torch.float64, generator=g) / 4)

    def forward(self, x, y):
        h = torch.cat([x[:, None].expand(-1, y.shape[1], -1), y], -1)
        return torch.tanh(h @ self.w1) @ self.w2


def test_module_energy_gradient_is_autograd_of_the_sum():
    """The adapter's dE/dy (the engine called with a ones seed, y its only input) against torch.autograd.grad of
    E.sum(); tensor subclasses go through torch.autograd.grad itself; the weights get no .grad."""
    from pyebm.descent import _ModuleEnergy

    m, x = CatEnergy(), torch.randn(4, 2, dtype=torch.float64)
    y = torch.randn(4, 5, 3, dtype=torch.float64)
    E, G = _ModuleEnergy(m).energy_and_grad(x, y)
    E_ref, G_ref = auto_grad(lambda yy: m(x, yy), y)
    torch.testing.assert_close(G, G_ref, rtol=1e-13, atol=1e-13)
    assert torch.equal(E, E_ref) and not E.requires_grad and not G.requires_grad
    assert m.w1.grad is None and m.w2.grad is None
    with torch.no_grad():  # grad mode is switched on for the call
        E2, G2 = _ModuleEnergy(m).energy_and_grad(x, y)
    assert torch.equal(G2, G)

    class Tagged(torch.Tensor):
        pass

    E3, G3 = _ModuleEnergy(m).energy_and_grad(x, y.as_subclass(Tagged))
    torch.testing.assert_close(G3.as_subclass(torch.Tensor), G_ref, rtol=1e-13, atol=1e-13)
    w = torch.nn.Parameter(torch.ones(1, dtype=torch.float64))
    with pytest.raises(ValueError, match="depends on y"):
        minimize(lambda x, y: (w * x.sum(-1, keepdim=True)).expand(-1, 5), x, 5, Descent(steps=2), init=y)
    with pytest.raises(ValueError, match="depends on y"):
        minimize(lambda x, y: torch.zeros(4, 5, dtype=torch.float64), x, 5, Descent(steps=2), init=y)


def test_strided_gradient_takes_the_fused_update(monkeypatch):
    """A plain energy whose dE/dy is strided (y concatenated with the context) runs the fused update op (the
    gradient copied contiguous), and still follows the reference rule."""
    from pyebm.ops import descent as dops

    calls = []
    real = dops.FusedUpdate.__call__

    def spy(self, g, *args):
        calls.append(g.is_contiguous())
        return real(self, g, *args)

    monkeypatch.setattr(dops.FusedUpdate, "__call__", spy)
    m, x = CatEnergy(), torch.randn(3, 2, dtype=torch.float64)
    y0 = torch.randn(3, 4, 3, dtype=torch.float64)
    cfg = Descent(steps=5, step_size=0.2, momentum=0.5, grad_clip=0.4)
    res = minimize(m, x, 4, cfg, init=y0, compile=False)
    assert calls == [False] * 5
    ref = minimize_reference(lambda y: auto_grad(lambda yy: m(x, yy), y), y0, cfg)
    torch.testing.assert_close(res.y, ref.y, rtol=0, atol=1e-13)
    assert torch.equal(res.steps, ref.steps) and torch.equal(res.status, ref.status)


def test_record_and_early_exit():
    m, x, y0 = _setup()
    cfg = Descent(steps=40, step_size=0.3, tol=0.15, check_every=1)
    res = minimize(m, x, 4, cfg, init=y0, record=True)
    assert res.trajectory.shape == (41, 3, 4) and res.trajectory_y.shape == (41, 3, 4, 3)
    assert torch.equal(res.trajectory_y[0], y0) and torch.equal(res.trajectory_y[-1], res.y)
    assert torch.equal(res.trajectory[-1], res.energy)
    assert torch.equal(res.trajectory[0], res.initial_energy)
    assert (res.status == CONVERGED).any() and (res.status == MAX_STEPS).any()
    assert len(set(res.steps.flatten().tolist())) > 2
    never = minimize(m, x, 4, dataclasses.replace(cfg, check_every=0), init=y0, record=True)
    assert torch.equal(never.y, res.y) and torch.equal(never.steps, res.steps)
    assert torch.equal(never.trajectory, res.trajectory)


def test_all_converged_stops_the_loop_early():
    q = Quadratic(torch.eye(2, dtype=torch.float64))
    mu = torch.tensor([[1.0, -1.0], [0.0, 2.0]], dtype=torch.float64)
    y0 = torch.zeros(2, 3, 2, dtype=torch.float64)
    y0[:, 1] = 5.0
    cfg = Descent(steps=200, step_size=0.3, tol=1e-3, check_every=5)
    res = minimize(q, mu, 3, cfg, init=y0, record=True)
    assert (res.status == CONVERGED).all() and res.steps.max() < 40
    # the trajectory after the last host check is the carried-forward final state
    last = int(res.steps.max())
    assert torch.equal(res.trajectory_y[last + 1:], res.y.expand(200 - last, 2, 3, 2))
    assert torch.equal(res.trajectory[last:-1], res.trajectory[last].expand(200 - last, 2, 3))
    ref = minimize_reference(lambda y: q.energy_and_grad(mu, y), y0, cfg, record=True)
    assert torch.equal(res.steps, ref.steps)
    torch.testing.assert_close(res.trajectory_y, ref.trajectory_y, rtol=0, atol=1e-14)
    torch.testing.assert_close(res.trajectory, ref.trajectory, rtol=0, atol=1e-14)


@pytest.mark.gpu
def test_fixed_step_loop_never_synchronises():
    """On CUDA, a fixed step count runs without one host synchronisation (sync debug mode errors on any)."""
    dev = torch.device("cuda")
    m = make_mlp(D=3).to(dev)
    x = torch.randn(4, 5, dtype=torch.float64, device=dev)
    y0 = torch.randn(4, 16, 3, dtype=torch.float64, device=dev)
    gen = torch.Generator(device=dev).manual_seed(0)
    cfgs = [Descent.ibc_langevin(steps=10), Descent.ebt_policy(max_steps=6, step_size=0.1, min_grad=0.0),
            Descent.ibc_dfo(steps=3), Descent(steps=5, accept_if_lower=True, noise="pre", noise_scale=0.1)]
    for cfg in cfgs:
        minimize(m, x, 16, cfg, init=y0, generator=gen, backend="torch")   # warm-up (lazy CUDA init)
        torch.cuda.set_sync_debug_mode("error")
        try:
            minimize(m, x, 16, cfg, init=y0, generator=gen, backend="torch")
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_default_init_and_shapes():
    m, x, _ = _setup()
    res = minimize(m, x, 6, Descent(steps=2), generator=0)
    assert res.best.shape == (3, 3) and res.best_energy.shape == (3,) and res.y.shape == (3, 6, 3)
    assert res.steps.dtype == torch.int32 and res.status.dtype == torch.int8
    z = minimize(m, x, 2, Descent(steps=1, init="zeros"))
    _, g = auto_grad(lambda t: m(x, t), torch.zeros(3, 2, 3, dtype=torch.float64))
    torch.testing.assert_close(z.y, -0.1 * g)
    u = minimize(m, x, 50, Descent(steps=1, step_size=1e-9, lower=-0.2, upper=torch.tensor([0.1, 0.2, 0.3]),
                                   init="uniform"), generator=0)
    assert (u.y >= -0.2).all() and (u.y <= torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)).all()
    shared = minimize(m, x, 4, Descent(steps=2), init=torch.zeros(3, 3, dtype=torch.float64))
    # [B, *event] init is shared by K: candidates 0 and 3 start equal and follow the same math, but they sit at
    # different rows of the kernels' row blocks, where a BLAS may take another code path (last-bit differences
    # on some CPUs), so equal up to rounding, not bit for bit.
    torch.testing.assert_close(shared.y[:, 0], shared.y[:, 3], rtol=1e-12, atol=1e-15)
    assert not torch.equal(shared.y[:, 0], torch.zeros(3, 3, dtype=torch.float64))   # and they did move


def test_presets_are_frozen_values():
    a = Descent.ibc_langevin(lower=torch.tensor([-1.0, 0.0]), upper=torch.tensor([1.0, 2.0]))
    b = Descent.ibc_langevin(lower=torch.tensor([-1.0, 0.0]), upper=torch.tensor([1.0, 2.0]))
    assert a == b and hash(a) == hash(b)
    assert a.step_clip == (0.1, 0.1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.steps = 3
    assert a.replace(steps=3).steps == 3
    assert Descent.ebt_policy().tol_final_step and Descent.ebt_policy(coupled=True).normalize == "rms_all"
    em = Descent.energy_matching()
    assert em.steps == 325 and em.step_size == 0.01 and em.noise_ramp == (100.0, 100.0)
    assert em.noise_level_at(99) == 0.0 and em.noise_level_at(100) == 0.01


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,match", [
    (dict(steps=0), "steps"),
    (dict(steps=2.5), "steps"),
    (dict(step_size=0.0), "step_size"),
    (dict(step_size=-1.0), "step_size"),
    (dict(lower=1.0, upper=-1.0), "lower must be <= upper"),
    (dict(lower=torch.tensor([0.0, 2.0]), upper=1.0), "lower must be <= upper"),
    (dict(step_schedule="linear"), "step_schedule"),
    (dict(noise_schedule="warm"), "noise_schedule"),
    (dict(selection="best"), "selection"),
    (dict(noise="gaussian"), "noise"),
    (dict(momentum=1.0), "momentum"),
    (dict(nesterov=True), "nesterov"),
    (dict(grad_clip=0.0), "grad_clip"),
    (dict(step_clip=-0.1), "step_clip"),
    (dict(init="uniform"), "init='uniform'"),
    (dict(accept_if_lower=True, momentum=0.5, nesterov=True), "accept_if_lower"),
    (dict(integrator="heun", momentum=0.5), "heun"),
    (dict(method="dfo", momentum=0.5, noise="additive"), "dfo"),
    (dict(method="dfo", noise="langevin"), "dfo"),
    (dict(method="newton"), "method"),
    (dict(noise_ramp=(3.0, 1.0)), "noise_ramp"),
    (dict(tol=-1.0), "tol"),
    (dict(check_every=-1), "check_every"),
    (dict(nesterov=1, momentum=0.5), "nesterov"),
])
def test_bad_config(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        Descent(**kw)


def test_bad_minimize_arguments():
    m, x, y0 = _setup()
    cfg = Descent(steps=2)
    with pytest.raises(ValueError, match="candidates"):
        minimize(m, x, 0, cfg)
    with pytest.raises(ValueError, match="init must be"):
        minimize(m, x, 4, cfg, init=torch.zeros(3, 5, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="init must be"):
        minimize(m, x, 4, cfg, init=torch.zeros(3, 4, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="init has 2 rows"):
        minimize(m, x, 4, cfg, init=torch.zeros(2, 4, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="mask must be"):
        minimize(m, x, 4, cfg, init=y0, mask=torch.zeros(3, 4, 2, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask must be a bool"):
        minimize(m, x, 4, cfg, init=y0, mask=torch.zeros(3, 4, 3))
    with pytest.raises(ValueError, match="mask needs an init"):
        minimize(m, x, 4, cfg, mask=torch.zeros(3, 4, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="config"):
        minimize(m, x, 4, {"steps": 2})
    with pytest.raises(ValueError, match="init must be a tensor or one of"):
        minimize(m, x, 4, cfg, init="gaussian")
    with pytest.raises(ValueError, match="config.lower"):
        minimize(m, x, 4, Descent(lower=torch.tensor([0.0, 0.0]), upper=1.0))
    with pytest.raises(TypeError, match="energy"):
        minimize(object(), x, 4, cfg)
    with pytest.raises(ValueError, match=r"E \[B, K\]"):
        minimize(lambda x, y: y.sum(), x, 4, cfg, event_shape=(3,))
    with pytest.raises(ValueError, match="whole_loop=True"):
        minimize(lambda x, y: m(x, y), x, 4, cfg, event_shape=(3,), whole_loop=True)
    with pytest.raises(TypeError, match="whole_loop"):
        minimize(m, x, 4, cfg, whole_loop="yes")
    with pytest.raises(TypeError, match="generator"):
        minimize(m, x, 4, cfg, generator="seed")


# ------------------------------------------------------------------------------------------------
# the demo
# ------------------------------------------------------------------------------------------------

def test_demo_quick(tmp_path):
    out = tmp_path / "demo.png"
    env = dict(os.environ, MPLBACKEND="Agg")
    proc = subprocess.run([sys.executable, "-m", "pyebm", "demo", "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=120, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert out.exists() and out.stat().st_size > 1000
    assert "latency" in proc.stdout.lower()

