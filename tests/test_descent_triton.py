"""Triton descent kernels: the fused update step and the whole loop for MLPEnergy.

Each test runs once per ``triton_device`` (conftest.py): in Triton's interpreter on CPU tensors without a
GPU (TRITON_INTERPRET=1, set by conftest.py), compiled on CUDA tensors with one.

* Noise off, the fused update equals ``pyebm.ops.descent.descent_update`` (torch) within a few fp32 ulps
  of the values' scale, with identical active/steps/status/pending, for every option that changes the
  arithmetic, on rows that include non-finite energies and gradients, stopped rows and overflowing steps.
* Noise off, the whole loop equals the per-step torch path (``minimize(..., whole_loop=False,
  backend="torch")``) and ``minimize_reference``: steps and status exactly, y and energies within a
  small multiple of the per-step path's own fp32 (or bf16) error against the float64 reference loop.
* Noise on (Philox in the kernel): unadjusted Langevin on a nearly quadratic 2-D energy reaches the
  stationary mean and covariance within 5 standard errors of an 8192-chain ensemble; pure-noise chains
  have the variance each noise mode and schedule implies; the same seed gives the same bits, whatever
  the tiling.
"""
import math

import pytest
import torch

import pyebm
from pyebm import Descent, minimize
from pyebm import _backend
from pyebm.ops import descent as dops
from pyebm.reference.descent import minimize_reference

pytestmark = [
    pytest.mark.triton,
    # numpy's overflow/invalid warnings from the interpreter, on the rows made non-finite on purpose
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
    pytest.mark.skipif(not _backend.backends()["triton"], reason=f"triton backend unusable: "
                       f"{_backend.backends().why['triton']}"),
]

EPS32 = 2.0 ** -23


def _ops():
    from pyebm.ops import descent_triton  # noqa: F401  (defines the ops)

    return torch.ops.pyebm


def _kernels():
    from pyebm._kernels import descent as kernels

    return kernels


# ------------------------------------------------------------------------------------------------
# fused update
# ------------------------------------------------------------------------------------------------
def update_state(N, D, seed, dtype=torch.float32, *, device):
    """Rows with an inf energy (2), a NaN gradient (5), a stopped row (4), a zero gradient (7), and
    energies large enough to overflow an energy-scaled step (8, 11)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)

    assert N >= 12
    y, grad, E = r(N, D), r(N, D, scale=2.0), r(N)
    E[2] = float("inf")
    grad[5, min(1, D - 1)] = float("nan")
    grad[7] = 0.0
    E[8] = 100.0
    E[11] = 95.0
    active = torch.ones(N, dtype=torch.bool, device=device)
    active[4] = False
    st = dict(velocity=r(N, D, scale=0.3), pending=(torch.rand(N, generator=g) < 0.5).to(device),
              noise=r(N, D), fixed=r(N, D), mask=(torch.rand(N, D, generator=g) < 0.3).to(device),
              y_base=r(N, D), lower=r(D, scale=0.3) - 1.0, upper=r(D, scale=0.3) + 1.0,
              step_clip=r(D).abs() * 0.2 + 0.05)
    return (y, grad, E, active, torch.zeros(N, dtype=torch.int32, device=device),
            torch.zeros(N, dtype=torch.int8, device=device), st)


UPDATE_CASES = {
    "plain": dict(),
    "grad_scale": dict(grad_scale=0.5),
    "momentum": dict(momentum=0.7),
    "grad_clip": dict(grad_clip=0.8),
    "grad_clip_norm": dict(grad_clip_norm=1.5),
    "both_clips_tol": dict(grad_clip=1.0, grad_clip_norm=1.2, tol=1.1),
    "tol": dict(tol=4.0),
    "tol_final_step": dict(tol=4.0, tol_final_step=True, momentum=0.5),
    "energy_scaled": dict(energy_scaled=True, energy_temperature=3.0, momentum=0.9),
    "langevin": dict(noise_mode="langevin", noise_level=0.3),
    "langevin_energy": dict(noise_mode="langevin", noise_level=0.3, energy_scaled=True, energy_temperature=2.0),
    "step_ibc": dict(noise_mode="step", noise_level=1.0, grad_scale=0.5, step_clip=True, bounds=True),
    "step_energy": dict(noise_mode="step", noise_level=0.5, energy_scaled=True, energy_temperature=2.0),
    "additive_mask": dict(noise_mode="additive", noise_level=0.1, mask=True),
    "bounds_off": dict(bounds=True, bound_each_step=False, step_clip=True),
    "y_base": dict(y_base=True, momentum=0.3),
    "everything": dict(grad_clip=1.0, grad_clip_norm=1.5, tol=0.9, tol_final_step=True, momentum=0.6,
                       energy_scaled=True, energy_temperature=2.0, noise_mode="langevin", noise_level=0.2,
                       step_clip=True, bounds=True, mask=True, y_base=True),
}


def run_update(case, N, D, seed, which, config=None, dtype=torch.float32, compute_fp32=False, *, device):
    """Apply one update with the torch implementation ("torch") or the Triton op / launcher
    (``compute_fp32``: the inputs drawn in ``dtype``, the update run on fp32 copies)."""
    y, g, E, active, steps, status, st = update_state(N, D, seed, dtype, device=device)
    if compute_fp32:
        y, g, E = y.float(), g.float(), E.float()
        st = {k: v.float() if v.is_floating_point() else v for k, v in st.items()}
    opts = dict(UPDATE_CASES[case])
    velocity = st["velocity"] if opts.get("momentum", 0) > 0 else None
    pending = st["pending"] if opts.get("tol_final_step") else None
    noise = st["noise"] if opts.get("noise_mode", "none") != "none" else None
    mask = st["mask"] if opts.pop("mask", False) else None
    fixed = st["fixed"] if mask is not None else None
    y_base = st["y_base"] if opts.pop("y_base", False) else None
    lower = upper = step_clip = None
    if opts.pop("bounds", False):
        lower, upper = st["lower"], st["upper"]
    if opts.pop("step_clip", False):
        step_clip = st["step_clip"]
    kw = dict(eta=0.1, noise_mode="none", noise_level=0.0, grad_scale=1.0, momentum=0.0, grad_clip=None,
              grad_clip_norm=None, energy_scaled=False, energy_temperature=1.0, tol=0.0, tol_final_step=False,
              bound_each_step=True)
    kw.update(opts)
    if which == "torch":
        dops.descent_update(y, g.clone(), E, active, steps, status, velocity=velocity, pending=pending, noise=noise,
                            fixed=fixed, mask=mask, lower=lower, upper=upper, step_clip=step_clip, y_base=y_base,
                            backend="torch", **kw)
    elif config is None:
        _ops().descent_update_triton(y, g, E, active, steps, status, velocity, pending, noise, mask, fixed, lower,
                                     upper, step_clip, kw["eta"], kw["noise_level"], kw["noise_mode"],
                                     kw["grad_scale"], kw["momentum"], kw["grad_clip"], kw["grad_clip_norm"],
                                     kw["energy_scaled"], kw["energy_temperature"], kw["tol"],
                                     kw["tol_final_step"], kw["bound_each_step"], y_base)
    else:
        _kernels().launch_update(y, g, E, active, steps, status, velocity, pending, noise, mask, fixed, lower, upper,
                                 step_clip, y_base=y_base, config=config, **kw)
    return dict(y=y, velocity=velocity, active=active, steps=steps, status=status, pending=pending)


def assert_update_equal(got, ref, ulps=8.0):
    for name in ("active", "steps", "status", "pending"):
        if ref[name] is not None:
            assert torch.equal(got[name], ref[name]), f"{name}: {got[name].tolist()} != {ref[name].tolist()}"
    for name in ("y", "velocity"):
        if ref[name] is None:
            continue
        a, b = got[name].double(), ref[name].double()
        # Non-finite values only where the reference has the same (a masked coordinate can hide an
        # overflowing step from the finiteness check of y', and then v' holds it, in both).
        fin = torch.isfinite(b)
        assert torch.equal(a[~fin], b[~fin]) or torch.equal(a[~fin].isnan(), b[~fin].isnan()), name
        assert torch.isfinite(a[fin]).all(), f"{name}: the kernel wrote a non-finite value"
        a, b = a[fin], b[fin]
        bound = ulps * EPS32 * b.abs().max().item()
        err = (a - b).abs().max().item()
        assert err <= bound, f"{name}: error {err:.3e} > {ulps:g} ulps of the scale ({bound:.3e})"


@pytest.mark.parametrize("case", list(UPDATE_CASES))
@pytest.mark.parametrize("N,D", [(13, 7), (12, 1)])
def test_update_matches_torch(triton_device, case, N, D):
    ref = run_update(case, N, D, seed=N + D, which="torch", device=triton_device)
    got = run_update(case, N, D, seed=N + D, which="triton", device=triton_device)
    assert_update_equal(got, ref)
    # the bookkeeping rows: inf energy -> non-finite, stopped row untouched
    assert got["status"][2] == 2 and got["steps"][4] == 0 and not got["active"][4]
    if UPDATE_CASES[case].get("energy_scaled") and not UPDATE_CASES[case].get("mask"):
        assert got["status"][8] == 2 and got["steps"][8] == 0  # exp(100) overflows: the step is refused


@pytest.mark.parametrize("case", ["everything", "tol", "both_clips_tol", "additive_mask"])
def test_update_chunked_rows(triton_device, case):
    # D = 7 in chunks of 4 (three passes, a partial last chunk) and one row per program.
    ref = run_update(case, 13, 7, seed=3, which="torch", device=triton_device)
    got = run_update(case, 13, 7, seed=3, which="triton", config={"BLOCK_N": 1, "BLOCK_D": 4, "num_warps": 1},
                     device=triton_device)
    assert_update_equal(got, ref)


def test_update_wide_rows(triton_device):
    # D > 1024: the default configuration takes the chunked form.
    ref = run_update("everything", 12, 1100, seed=4, which="torch", device=triton_device)
    got = run_update("everything", 12, 1100, seed=4, which="triton", device=triton_device)
    assert_update_equal(got, ref, ulps=16.0)


def test_update_row_strides(triton_device):
    # y, g, velocity, noise as column slices of wider buffers (row stride 11, unit column stride).
    ref = run_update("everything", 13, 7, seed=6, which="torch", device=triton_device)
    y, g, E, active, steps, status, st = update_state(13, 7, seed=6, device=triton_device)

    def strided(t):
        big = torch.full((t.shape[0], 11), float("nan"), dtype=t.dtype, device=t.device)
        big[:, 2:9] = t
        return big[:, 2:9]

    y, g, v, noise, fixed, yb = (strided(t) for t in (y, g, st["velocity"], st["noise"], st["fixed"], st["y_base"]))
    _ops().descent_update_triton(y, g, E, active, steps, status, v, st["pending"], noise, st["mask"], fixed,
                                 st["lower"], st["upper"], st["step_clip"], 0.1, 0.2, "langevin", 1.0, 0.6, 1.0, 1.5,
                                 True, 2.0, 0.9, True, True, yb)
    assert_update_equal(dict(y=y, velocity=v, active=active, steps=steps, status=status, pending=st["pending"]), ref)
    assert torch.isnan(y._base[:, :2]).all() and torch.isnan(y._base[:, 9:]).all()  # nothing written outside


@pytest.mark.parametrize("case", ["everything", "step_ibc", "energy_scaled"])
def test_update_bf16_rounds_once(triton_device, case):
    # bf16 tensors are updated in fp32 and rounded once: the result is the fp32 update of the same
    # (bf16-valued) inputs, rounded to bf16 (within one bf16 ulp for values that straddle a tie).
    ref32 = run_update(case, 13, 7, seed=5, which="torch", dtype=torch.bfloat16, compute_fp32=True,
                       device=triton_device)
    got = run_update(case, 13, 7, seed=5, which="triton", dtype=torch.bfloat16, device=triton_device)
    for name in ("active", "steps", "status"):
        assert torch.equal(got[name], ref32[name]), name
    for name in ("y", "velocity"):
        if ref32[name] is None:
            continue
        want = ref32[name].to(torch.bfloat16).float()
        ulp = torch.clamp(want.abs(), min=1e-30) * 2.0 ** -7
        assert ((got[name].float() - want).abs() <= ulp).all(), name


# ------------------------------------------------------------------------------------------------
# whole loop, noise off
# ------------------------------------------------------------------------------------------------
LOOP_CONFIGS = {
    "gd": Descent.gd(steps=5, step_size=0.05),
    "nesterov": Descent.gd(steps=5, step_size=0.05, momentum=0.9, nesterov=True),
    "clips": Descent.gd(steps=5, step_size=0.5, momentum=0.5, grad_clip=0.1, grad_clip_norm=0.2, step_clip=0.02),
    "tol": Descent.gd(steps=8, step_size=2.0, tol=0.2),
    "tol_final_step": Descent.gd(steps=8, step_size=4.0, tol=0.15, tol_final_step=True, grad_clip_norm=0.25),
    "bounds_per_dim": Descent.gd(steps=4, step_size=0.1, lower=[-1.0, -0.2, -0.3, -2.0, -1.0, -1.0, -0.5],
                                 upper=[1.0, 0.2, 0.4, 2.0, 1.0, 0.1, 0.5], step_clip=[0.05, 0.1, 0.02, 0.3, 1, 1, 1]),
    "bounds_at_end": Descent.gd(steps=4, step_size=0.05, lower=-0.5, upper=0.5, bound_each_step=False),
    "energy_scaled": Descent.gd(steps=5, step_size=0.05, step_schedule="energy", energy_temperature=3.0,
                                momentum=0.5, nesterov=True),
    "schedule": Descent.gd(steps=5, step_size=0.08, grad_scale=0.5, step_schedule="cosine", step_size_end=0.01),
}


def mlp_setup(B, K, D, hidden, act, residual, dtype=torch.float32, seed=0, *, device):
    torch.manual_seed(seed)
    m = pyebm.MLPEnergy(3, D, hidden=hidden, activation=act, residual=residual).to(device)
    x = torch.randn(B, 3, device=device)
    y0 = torch.randn(B, K, D, device=device)
    return m.to(dtype), x.to(dtype), y0.to(dtype)


def loop_triton(m, x, y0, cfg, mask=None, seed=0, config=None):
    """The whole-loop op for ``cfg`` (arguments as pyebm.minimize forms them). Returns
    (y, E_final, E_init, steps, status)."""
    B, K, D = y0.shape
    ctx = m.prepare(x)
    w_in, ws, bs, w_out, b_out = m.op_params()
    eta = torch.tensor([cfg.step_size_at(k) for k in range(cfg.steps)], dtype=torch.float64)
    nl = torch.tensor([cfg.noise_level_at(k) for k in range(cfg.steps)], dtype=torch.float64)

    def ev(v):
        return None if v is None else torch.as_tensor(v, dtype=y0.dtype, device=y0.device).expand(D).contiguous()

    args = (ctx, y0, w_in, ws, bs, w_out, b_out, m.activation, m.residual, eta, nl, ev(cfg.lower), ev(cfg.upper),
            ev(cfg.step_clip), mask, float(cfg.grad_scale), float(cfg.momentum), bool(cfg.nesterov), cfg.grad_clip,
            cfg.grad_clip_norm, cfg.step_schedule == "energy", float(cfg.energy_temperature), float(cfg.tol),
            bool(cfg.tol_final_step), bool(cfg.bound_each_step), cfg.noise)
    with torch.no_grad():
        if config is None:
            return _ops().mlp_descent_triton(*args, seed)
        return _kernels().mlp_descent(*args, seed, config=config)


def check_against_references(m, x, y0, cfg, got, mask=None, mult=4.0, floor_ulps=8.0):
    """got = (y, E_final, E_init, steps, status) against the fp32/bf16 per-step path and the fp64 loop."""
    K = y0.shape[1]
    per_step = minimize(m, x, candidates=K, config=cfg, init=y0, mask=mask, whole_loop=False, backend="torch")
    m64 = type(m)(3, y0.shape[2], hidden=m.hidden, activation=m.activation, residual=m.residual).to(y0.device)
    m64.load_state_dict({k: v.double() for k, v in m.state_dict().items()})
    m64 = m64.double()
    ctx64 = m64.prepare(x.double())
    ref = minimize_reference(lambda y: m64.energy_and_grad(ctx64, y, backend="torch"), y0.double(), cfg, mask=mask)
    y, E_final, E_init, steps, status = got
    assert torch.equal(steps, per_step.steps) and torch.equal(status, per_step.status)
    assert torch.equal(steps, ref.steps) and torch.equal(status, ref.status)
    eps = torch.finfo(y0.dtype).eps
    for name, out, lo, hi in (("y", y, per_step.y, ref.y), ("E_final", E_final, per_step.energy, ref.energy),
                              ("E_init", E_init, per_step.initial_energy, ref.initial_energy)):
        assert out.dtype == y0.dtype, name
        err = (out.double() - hi).abs().max().item()
        ref_err = (lo.double() - hi).abs().max().item()
        bound = mult * ref_err + floor_ulps * eps * hi.abs().max().item()
        assert err <= bound, f"{name}: error {err:.3e} > bound {bound:.3e} (per-step path's own error {ref_err:.3e})"


@pytest.mark.parametrize("name", list(LOOP_CONFIGS))
def test_whole_loop_matches_per_step_and_reference(triton_device, name):
    m, x, y0 = mlp_setup(3, 5, 7, (16, 16), "tanh", True, seed=1, device=triton_device)
    cfg = LOOP_CONFIGS[name]
    check_against_references(m, x, y0, cfg, loop_triton(m, x, y0, cfg))


# (B, K, D, hidden, activation, residual, config): one candidate, width-1 candidates, a row tile that
# crosses contexts, D and widths that span several BLOCK_T chunks, and a persistent grid of 2 programs.
LOOP_SHAPES = [
    (1, 1, 1, (5,), "silu", False, None),
    (2, 17, 3, (33, 33), "gelu", True, None),
    (3, 11, 20, (24, 17), "softplus", False, {"BLOCK_M": 16, "BLOCK_T": 16, "max_programs": 2}),
]


@pytest.mark.parametrize("B,K,D,hidden,act,residual,config", LOOP_SHAPES)
def test_whole_loop_shapes(triton_device, B, K, D, hidden, act, residual, config):
    m, x, y0 = mlp_setup(B, K, D, hidden, act, residual, seed=B + K, device=triton_device)
    cfg = Descent.gd(steps=4, step_size=0.05, momentum=0.5, nesterov=True, grad_clip_norm=1.0, tol=0.05,
                     tol_final_step=True, lower=-1.5, upper=1.5)
    check_against_references(m, x, y0, cfg, loop_triton(m, x, y0, cfg, config=config))


def test_whole_loop_mask_keeps_y0(triton_device):
    m, x, y0 = mlp_setup(2, 6, 5, (16,), "gelu_tanh", False, seed=3, device=triton_device)
    mask = torch.rand(2, 6, 5, generator=torch.Generator().manual_seed(0)).to(triton_device) < 0.4
    cfg = Descent.gd(steps=4, step_size=0.1, momentum=0.3, lower=-0.8, upper=0.8, bound_each_step=False)
    got = loop_triton(m, x, y0, cfg, mask=mask)
    check_against_references(m, x, y0, cfg, got, mask=mask)
    assert torch.equal(got[0][mask], y0[mask])


def test_whole_loop_through_minimize(triton_device):
    # pyebm.minimize picks the Triton whole loop for backend="triton" (whole_loop=True insists on it).
    m, x, y0 = mlp_setup(3, 5, 7, (16, 16), "tanh", True, seed=2, device=triton_device)
    cfg = LOOP_CONFIGS["tol_final_step"]
    a = minimize(m, x, candidates=5, config=cfg, init=y0, whole_loop=False, backend="torch")
    b = minimize(m, x, candidates=5, config=cfg, init=y0, whole_loop=True, backend="triton")
    torch.testing.assert_close(b.y, a.y, rtol=0, atol=2e-6)
    torch.testing.assert_close(b.energy, a.energy, rtol=0, atol=2e-6)
    assert torch.equal(b.steps, a.steps) and torch.equal(b.status, a.status)
    assert torch.equal(b.best_index, a.best_index)


def test_whole_loop_bf16(triton_device):
    m, x, y0 = mlp_setup(3, 5, 7, (16, 16), "silu", True, seed=4, device=triton_device)
    cfg = Descent.gd(steps=4, step_size=0.05, momentum=0.5, nesterov=True)
    mb, xb, yb = m.to(torch.bfloat16), x.bfloat16(), y0.bfloat16()
    got = loop_triton(mb, xb, yb, cfg)
    # the reference's own bf16 error: the per-step path in bf16 against the fp64 loop (same bf16 inputs)
    check_against_references(mb, xb, yb, cfg, got, mult=2.0, floor_ulps=2.0)


def test_whole_loop_isolates_non_finite_candidates(triton_device):
    m, x, y0 = mlp_setup(2, 6, 4, (16,), "tanh", False, seed=5, device=triton_device)
    cfg = Descent.langevin(steps=4, step_size=0.05, temperature=0.1)
    clean = loop_triton(m, x, y0, cfg, seed=11)
    y_bad = y0.clone()
    y_bad[1, 2, 0] = float("nan")
    got = loop_triton(m, x, y_bad, cfg, seed=11)
    bad = torch.zeros(2, 6, dtype=torch.bool, device=triton_device)
    bad[1, 2] = True
    assert got[4][1, 2] == 2 and got[3][1, 2] == 0 and (got[4][~bad] == 0).all()
    for a, b in zip(got, clean):
        assert torch.equal(a[~bad], b[~bad])  # same bits for every other candidate, noise included
    # An energy-scaled step that overflows fp32 stops every candidate with its last finite value.
    with torch.no_grad():
        m.head.bias.fill_(100.0)
    r = loop_triton(m, x, y0, Descent.gd(steps=3, step_schedule="energy"))
    assert (r[4] == 2).all() and (r[3] == 0).all() and torch.equal(r[0], y0)


# ------------------------------------------------------------------------------------------------
# whole loop, noise on
# ------------------------------------------------------------------------------------------------
def raw_loop(ctx, y0, w_in, w_out, b_out, eta, nl, mode, seed, momentum=0.0, energy_scaled=False, temp=1.0,
             config=None):
    """The whole-loop launcher on a one-layer softplus MLP given by its weights."""
    eta = torch.as_tensor(eta, dtype=torch.float64)
    nl = torch.as_tensor(nl, dtype=torch.float64)
    return _kernels().mlp_descent(ctx, y0, w_in, [], [], w_out, b_out, "softplus", False, eta, nl, None, None, None,
                                  None, 1.0, momentum, False, None, None, energy_scaled, temp, 0.0, False, True,
                                  mode, seed, config=config)


def test_langevin_stationary_mean_and_covariance(triton_device):
    # E(y) = sum_i c_i [softplus(a z_i) + softplus(-a z_i)], z_i = u_i . (y - mu) with orthonormal u_i:
    # a Gaussian of curvature k_i = c_i a^2 / 2 along u_i up to a relative quartic term ~ (a z)^2 / 48
    # (a = 0.05: < 1e-3 of the variance). Unadjusted Langevin with step eta at temperature tau has the
    # stationary variance tau / (k_i (1 - eta k_i / 2)) along u_i (exact for the Gaussian). Each row holds
    # P = 8 independent copies of the 2-D system (block-diagonal weights), 2048 rows: 16384 chains, all
    # started at one point away from mu, 100 steps (the slowest direction relaxes by 0.9^100 ~ 3e-5).
    a, k, tau, eta, T, P = 0.05, torch.tensor([1.0, 3.0], dtype=torch.float64), 0.5, 0.1, 100, 8
    th = 0.5
    U = torch.tensor([[math.cos(th), math.sin(th)], [-math.sin(th), math.cos(th)]], dtype=torch.float64)
    mu = torch.tensor([0.7, -0.4], dtype=torch.float64)
    c = 2.0 * k / a ** 2
    w_pair = torch.cat([a * U, -a * U])                          # [4, 2]: rows +a u_1, +a u_2, -a u_1, -a u_2
    w_in = torch.block_diag(*[w_pair] * P)                       # [4P, 2P]
    ctx = -(w_in @ mu.repeat(P))                                 # z = W_in (y - mu)
    w_out = torch.cat([c, c]).repeat(P)
    B, K = 2, 1024
    y0 = (mu + torch.tensor([2.0, -2.0], dtype=torch.float64)).repeat(P).expand(B, K, 2 * P)
    f = dict(device=triton_device, dtype=torch.float32)
    y, *_ = raw_loop(ctx.expand(B, 4 * P).to(**f).contiguous(), y0.to(**f).contiguous(), w_in.to(**f),
                     w_out.to(**f), torch.zeros(1, **f), [eta] * T, [tau] * T, "langevin", seed=1234,
                     config={"BLOCK_M": 1024, "BLOCK_T": 16})
    s = y.reshape(-1, 2).double().cpu()
    M = s.shape[0]
    var_target = tau / (k * (1 - eta * k / 2))
    cov_target = U.t() @ torch.diag(var_target) @ U
    mean, cov = s.mean(0), torch.cov(s.t())
    se_mean = (cov_target.diagonal() / M).sqrt()
    assert ((mean - mu).abs() <= 5 * se_mean).all(), f"mean {mean.tolist()} vs {mu.tolist()} (se {se_mean.tolist()})"
    # in the eigenbasis: variances (se = var sqrt(2 / M)) and the cross term (se = sqrt(v1 v2 / M))
    ce = U @ cov @ U.t()
    assert ((ce.diagonal() - var_target).abs() <= 5 * var_target * math.sqrt(2.0 / M)).all(), \
        f"variances {ce.diagonal().tolist()} vs {var_target.tolist()}"
    assert abs(ce[0, 1]) <= 5 * math.sqrt(var_target.prod() / M), f"cross covariance {ce[0, 1]:.4f}"


@pytest.mark.parametrize("mode,energy_scaled", [("langevin", False), ("step", False), ("additive", False),
                                                ("langevin", True)])
def test_noise_modes_and_schedules(triton_device, mode, energy_scaled):
    # Zero gradient (w_out = 0): y_T - y0 = sum_k s_k xi_k with s_k from the mode and the per-step
    # eta[k], noise_level[k]; energy-scaled steps use eta_k exp(E) / temperature with E = b_out.
    T, B, K, D = 6, 4, 512, 3
    eta = torch.tensor([0.3, 0.2, 0.1, 0.05, 0.4, 0.25], dtype=torch.float64)
    nl = torch.tensor([0.5, 1.0, 0.0, 2.0, 0.3, 0.8], dtype=torch.float64)
    b_out, temp = 0.4, 2.0
    f = dict(device=triton_device, dtype=torch.float32)
    w_in = torch.randn(8, D, **f)
    y0 = torch.randn(B, K, D, **f)
    y, E_final, E_init, steps, status = raw_loop(
        torch.randn(B, 8, **f), y0, w_in, torch.zeros(8, **f), torch.full((1,), b_out, **f), eta, nl, mode,
        seed=7, energy_scaled=energy_scaled, temp=temp, config={"BLOCK_M": 512})
    e = eta * math.exp(b_out) / temp if energy_scaled else eta
    s = {"langevin": (2 * e * nl).sqrt(), "step": e * nl, "additive": nl}[mode]
    var = float((s ** 2).sum())
    d = (y - y0).double().reshape(-1, D)
    M = d.shape[0]
    assert (steps == T).all() and (status == 0).all()
    assert (E_final == b_out).all() and (E_init == b_out).all()
    assert (d.mean(0).abs() <= 5 * math.sqrt(var / M)).all()
    assert ((d.var(0) - var).abs() <= 5 * var * math.sqrt(2.0 / M)).all(), f"{d.var(0).tolist()} vs {var:.4f}"
    corr = torch.corrcoef(d.t())
    assert (corr - torch.eye(D, dtype=corr.dtype, device=corr.device)).abs().max() <= 5 / math.sqrt(M)


def test_seed_reproducible_and_independent_of_tiling(triton_device):
    m, x, y0 = mlp_setup(3, 9, 5, (16,), "silu", False, seed=6, device=triton_device)
    cfg = Descent.langevin(steps=3, step_size=0.05, temperature=0.2)
    a = loop_triton(m, x, y0, cfg, seed=2**40 + 3)
    again = loop_triton(m, x, y0, cfg, seed=2**40 + 3)
    b = loop_triton(m, x, y0, cfg, seed=2**40 + 3, config={"BLOCK_M": 16, "BLOCK_T": 16, "max_programs": 1})
    c = loop_triton(m, x, y0, cfg, seed=2**40 + 4)
    # The same launch twice runs the same instructions on the same data (no atomics): bit for bit.
    for u, v in zip(a, again):
        assert torch.equal(u, v)
    # Another tiling draws the same noise (Philox keyed by seed, step, row and column, not by tile), but its
    # products reduce over other tile shapes, so the floats agree to rounding only; a different noise stream
    # would differ by ~1e-1. tol = 0: every candidate runs every step, so steps and status are exact.
    for u, v in zip(a, b):
        if u.is_floating_point():
            torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(u, v)
    assert not torch.equal(a[0], c[0])
    # noise really moved the candidates: the noise-free run differs
    quiet = loop_triton(m, x, y0, cfg.replace(noise="none"))
    assert (a[0] - quiet[0]).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------
# op registration and bad input
# ------------------------------------------------------------------------------------------------
def test_opcheck(triton_device):
    m, x, y0 = mlp_setup(2, 3, 4, (16,), "tanh", True, seed=7, device=triton_device)
    w_in, ws, bs, w_out, b_out = [t.detach() if isinstance(t, torch.Tensor) else [u.detach() for u in t]
                                  for t in m.op_params()]
    ctx = m.prepare(x).detach()
    eta = torch.full((3,), 0.05, dtype=torch.float64)
    nl = torch.full((3,), 0.1, dtype=torch.float64)
    args = (ctx, y0, w_in, ws, bs, w_out, b_out, "tanh", True, eta, nl, None, None, None, None, 1.0, 0.5, True,
            None, 1.0, False, 1.0, 0.0, False, True, "langevin", 5)
    torch.library.opcheck(_ops().mlp_descent_triton.default, args)
    y, g, E, active, steps, status, st = update_state(13, 7, seed=8, device=triton_device)
    uargs = (y, g, E, active, steps, status, st["velocity"], st["pending"], st["noise"], st["mask"], st["fixed"],
             st["lower"], st["upper"], st["step_clip"], 0.1, 0.2, "step", 1.0, 0.5, 1.0, None, False, 1.0, 0.5, True,
             True)
    torch.library.opcheck(_ops().descent_update_triton.default, uargs)


def test_torch_compile_fullgraph(triton_device):
    m, x, y0 = mlp_setup(2, 3, 4, (16, 16), "silu", False, seed=9, device=triton_device)
    w_in, ws, bs, w_out, b_out = [t.detach() if isinstance(t, torch.Tensor) else [u.detach() for u in t]
                                  for t in m.op_params()]
    ctx = m.prepare(x).detach()
    eta = torch.full((3,), 0.05, dtype=torch.float64)
    nl = torch.zeros(3, dtype=torch.float64)

    def run(ctx, y0, w_in, w0, w_out, b_out, eta, nl):
        y, E, E0, steps, status = torch.ops.pyebm.mlp_descent_triton(
            ctx, y0, w_in, [w0], [bs[0]], w_out, b_out, "silu", False, eta, nl, None, None, None, None, 1.0, 0.0,
            False, None, None, False, 1.0, 0.0, False, True, "none", 0)
        return y.sum() + E.sum() + steps.sum()

    _ops()
    args = (ctx, y0, w_in, ws[0], w_out, b_out, eta, nl)
    compiled = torch.compile(run, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*args), run(*args))

    # the in-place update op (functionalised by the compiler): same state afterwards
    def step(y, g, E, active, steps, status, v, noise):
        torch.ops.pyebm.descent_update_triton(y, g, E, active, steps, status, v, None, noise, None, None, None, None,
                                              None, 0.1, 0.2, "langevin", 1.0, 0.5, 1.0, None, False, 1.0, 0.0, False,
                                              True)
        return y.sum()

    y, g, E, active, steps, status, st = update_state(13, 7, seed=8, device=triton_device)
    state = [y, g, E, active, steps, status, st["velocity"], st["noise"]]
    a, b = [t.clone() for t in state], [t.clone() for t in state]
    torch.testing.assert_close(torch.compile(step, fullgraph=True, backend="aot_eager")(*a), step(*b))
    for u, v in zip(a, b):
        assert torch.equal(u.nan_to_num(), v.nan_to_num()) if u.is_floating_point() else torch.equal(u, v)


def test_bad_input(triton_device):
    ops = _ops()
    m, x, y0 = mlp_setup(2, 3, 4, (16,), "tanh", False, seed=10, device=triton_device)
    w_in, ws, bs, w_out, b_out = m.op_params()
    ctx = m.prepare(x)
    eta = torch.full((3,), 0.05, dtype=torch.float64)
    nl = torch.zeros(3, dtype=torch.float64)
    base = [ctx, y0, w_in, ws, bs, w_out, b_out, "tanh", False, eta, nl, None, None, None, None, 1.0, 0.0, False,
            None, None, False, 1.0, 0.0, False, True, "none", 0]
    pos = {"eta": 9, "nl": 10, "lower": 11, "mask": 14, "momentum": 16, "grad_clip": 18, "noise_mode": 25}

    def call(**changes):
        args = list(base)
        for k, v in changes.items():
            args[pos[k]] = v
        with torch.no_grad():
            return ops.mlp_descent_triton(*args)

    with pytest.raises(ValueError, match="noise_mode must be one of"):
        call(noise_mode="brownian")
    with pytest.raises(ValueError, match=r"noise_level must be a floating \[steps\] = \[3\]"):
        call(nl=torch.zeros(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="eta must be a floating"):
        call(eta=torch.zeros(0))
    with pytest.raises(TypeError, match="mask must be torch.bool"):
        call(mask=torch.zeros(2, 3, 4, device=triton_device))
    with pytest.raises(ValueError, match=r"mask must have shape \[2, 3, 4\]"):
        call(mask=torch.zeros(2, 3, 5, dtype=torch.bool, device=triton_device))
    with pytest.raises(ValueError, match="lower must hold 1 or D = 4"):
        call(lower=torch.zeros(3, device=triton_device))
    with pytest.raises(ValueError, match="momentum must be in"):
        call(momentum=1.0)
    with pytest.raises(ValueError, match="grad_clip must be > 0"):
        call(grad_clip=0.0)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        ops.mlp_descent_triton(*[a.double() if isinstance(a, torch.Tensor) and a is not eta and a is not nl
                                 else [t.double() for t in a] if isinstance(a, list) else a for a in base])

    y, g, E, active, steps, status, st = update_state(13, 3, seed=1, device=triton_device)
    ubase = [y, g, E, active, steps, status, None, None, None, None, None, None, None, None, 0.1, 0.0, "none", 1.0,
             0.0, None, None, False, 1.0, 0.0, False, True]
    with pytest.raises(ValueError, match="velocity is required when momentum > 0"):
        ops.descent_update_triton(*ubase[:18], 0.5, *ubase[19:])
    with pytest.raises(ValueError, match="noise is required for noise_mode 'langevin'"):
        ops.descent_update_triton(*ubase[:16], "langevin", *ubase[17:])
    with pytest.raises(ValueError, match="pending is required"):
        ops.descent_update_triton(*ubase[:23], 0.5, True, True)
    with pytest.raises(ValueError, match=r"g must have shape \[13, 3\]"):
        ops.descent_update_triton(y, g[:, :2], *ubase[2:])
    with pytest.raises(TypeError, match="steps must be torch.int32"):
        ops.descent_update_triton(y, g, E, active, steps.long(), *ubase[5:])


@pytest.mark.skipif(not _backend.triton_interpret(), reason="checks the interpreter-mode guard")
def test_cpu_needs_interpreter(monkeypatch):
    y, g, E, active, steps, status, st = update_state(13, 3, seed=1, device="cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        _ops().descent_update_triton(y, g, E, active, steps, status, None, None, None, None, None, None, None, None,
                                     0.1, 0.0, "none", 1.0, 0.0, None, None, False, 1.0, 0.0, False, True)


_SM90_COMPILE = r"""
import json
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from pyebm._kernels import descent as kd

FLOATS = ("cg_plain", "neg_gs", "eta", "temperature", "mu", "grad_clip", "grad_clip_norm", "tol", "c_noise", "n_es")
INTS = {"meta_ptr": "*i64", "coef_ptr": "*fp32", "scratch_ptr": "*fp32", "steps_ptr": "*i32", "status_ptr": "*i8",
        "active_ptr": "*u8", "pending_ptr": "*u8", "mask_ptr": "*u8"}


def sig(k, dt, cx):
    return {n: "constexpr" if n in cx else INTS.get(n, "*" + dt if n.endswith("_ptr") else
                                                     "fp32" if n in FLOATS else "i32") for n in k.arg_names}


on = dict(HAS_V=True, HAS_CLIP=True, HAS_CLIP_NORM=True, USE_TOL=True, FINAL_STEP=True, ENERGY_SCALED=True, NOISE=1,
          HAS_SC=True, HAS_LO=True, HAS_HI=True, HAS_MASK=True)
out = {}
for dt, chunks in (("fp32", 1), ("bf16", 2)):
    cx = dict(on, HAS_BASE=True, BLOCK_N=2, BLOCK_D=1024, NUM_CHUNKS=chunks, EMULATE_BF16=False)
    k = kd._descent_update_kernel
    c = triton.compile(ASTSource(fn=k, signature=sig(k, dt, cx), constexprs=cx), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": 8})
    out["update_" + dt] = {"cubin": len(c.asm["cubin"]), "wgmma": False}
for dt, act in (("fp32", 1), ("bf16", 3)):
    cx = dict(on, ACT=act, NESTEROV=True, BOUND_EACH=True, BLOCK_M=64, BLOCK_T=32, DOT_PRECISION="ieee",
              EMULATE_BF16=False)
    k = kd._mlp_descent_kernel
    c = triton.compile(ASTSource(fn=k, signature=sig(k, dt, cx), constexprs=cx), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": 8, "num_stages": 1})
    out["loop_" + dt] = {"cubin": len(c.asm["cubin"]), "wgmma": "wgmma" in c.asm["ptx"]}
print(json.dumps(out))
"""


def test_compiles_for_sm90_without_gpu():
    # The interpreter never lowers the kernels; this builds sm_90 cubins of both (every option on) with
    # Triton's bundled ptxas, so a machine without a GPU still proves they compile.
    import json
    import os
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", _SM90_COMPILE], env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr:
        pytest.skip("Triton's bundled ptxas is unavailable")
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert all(r["cubin"] > 0 for r in res.values())
    assert res["loop_bf16"]["wgmma"]
