"""Whole-loop descent (torch.ops.pyebm.mlp_descent) and the fused per-step update
(torch.ops.pyebm.descent_update) against the per-step torch path and pyebm.reference.descent."""
import pytest
import torch

import pyebm
from pyebm import _dispatch
from pyebm import Descent, minimize
from pyebm.ops import descent as dops
from pyebm.reference.descent import minimize_reference

pytestmark = pytest.mark.skipif(not pyebm.backends()["cpu"], reason="extension pyebm._C not built")

CONFIGS = {
    "gd": Descent.gd(steps=7, step_size=0.05),
    "nesterov": Descent.gd(steps=7, step_size=0.05, momentum=0.9, nesterov=True),
    "clips": Descent.gd(steps=7, step_size=0.05, momentum=0.5, grad_clip=0.1, grad_clip_norm=0.3, step_clip=0.02),
    "tol": Descent.gd(steps=9, step_size=0.2, tol=0.5),
    "tol_final_step": Descent.gd(steps=9, step_size=0.2, tol=0.5, tol_final_step=True),
    "bounds": Descent.gd(steps=7, step_size=0.05, lower=-0.5, upper=0.5),
    "bounds_at_end": Descent.gd(steps=7, step_size=0.05, lower=-0.5, upper=0.5, bound_each_step=False),
    "bounds_per_dim": Descent.gd(steps=5, step_size=0.1, lower=[-1.0, -0.2, -0.3, -2.0], upper=[1.0, 0.2, 0.4, 2.0],
                                 step_clip=[0.05, 0.1, 0.02, 0.3]),
    "energy_scaled": Descent.gd(steps=7, step_size=0.05, step_schedule="energy", energy_temperature=3.0),
    "langevin": Descent.langevin(steps=7, step_size=0.05, temperature=0.1),
    "ibc_langevin": Descent.ibc_langevin(steps=7, lower=-1.0, upper=1.0),
    "additive_cosine": Descent.gd(steps=7, step_size=0.05, step_schedule="cosine", step_size_end=0.01,
                                  noise="additive", noise_scale=0.01),
    "grad_scale_exp": Descent.gd(steps=6, step_size=0.05, grad_scale=0.5, step_schedule="exponential", step_decay=0.7),
}


def setup(dtype=torch.float64, B=3, K=5, D=4, act="tanh", residual=True, seed=0):
    torch.manual_seed(seed)
    m = pyebm.MLPEnergy(3, D, hidden=(16, 16), activation=act, residual=residual, dtype=dtype)
    x = torch.randn(B, 3, dtype=dtype)
    y0 = torch.randn(B, K, D, dtype=dtype)
    return m, x, y0


def both(m, x, y0, cfg, mask=None, seed=5):
    K = y0.shape[1]
    per_step = minimize(m, x, candidates=K, config=cfg, init=y0, mask=mask, generator=seed, whole_loop=False,
                        backend="torch")
    whole = minimize(m, x, candidates=K, config=cfg, init=y0, mask=mask, generator=seed, whole_loop=True,
                     backend="cpu")
    return per_step, whole


def assert_same(a, b, atol):
    torch.testing.assert_close(b.y, a.y, rtol=0, atol=atol, equal_nan=True)
    torch.testing.assert_close(b.energy, a.energy, rtol=0, atol=atol, equal_nan=True)
    torch.testing.assert_close(b.initial_energy, a.initial_energy, rtol=0, atol=atol, equal_nan=True)
    assert torch.equal(b.steps, a.steps) and torch.equal(b.status, a.status)
    assert torch.equal(b.best_index, a.best_index)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_whole_loop_matches_per_step(name, dtype):
    m, x, y0 = setup(dtype)
    a, b = both(m, x, y0, CONFIGS[name])
    assert_same(a, b, 1e-12 if dtype == torch.float64 else 5e-6)


@pytest.mark.parametrize("name", ["gd", "nesterov", "tol_final_step", "langevin"])
def test_whole_loop_matches_reference_loop(name):
    m, x, y0 = setup(torch.float64, B=2, K=17, D=4, act="silu")
    cfg = CONFIGS[name]
    ctx = m.prepare(x)
    ref = minimize_reference(lambda y: m.energy_and_grad(ctx, y, backend="torch"), y0, cfg,
                             generator=torch.Generator().manual_seed(9))
    got = minimize(m, x, candidates=17, config=cfg, init=y0, generator=9, whole_loop=True)
    torch.testing.assert_close(got.y, ref.y, rtol=0, atol=1e-12)
    torch.testing.assert_close(got.energy, ref.energy, rtol=0, atol=1e-12)
    assert torch.equal(got.steps, ref.steps) and torch.equal(got.status, ref.status)


@pytest.mark.parametrize("mask_shape", [(6,), (4, 3, 6)])
def test_whole_loop_mask(mask_shape):
    torch.manual_seed(3)
    m = pyebm.MLPEnergy(2, 6, hidden=(12,), activation="gelu")
    x = torch.randn(4, 2)
    y0 = torch.randn(4, 3, 6)
    mask = torch.rand(mask_shape) < 0.4
    mask.view(-1)[1] = True
    cfg = Descent.gd(steps=6, step_size=0.1, momentum=0.3)
    a = minimize(m, x, candidates=3, config=cfg, init=y0, mask=mask, whole_loop=False, backend="torch")
    b = minimize(m, x, candidates=3, config=cfg, init=y0, mask=mask, whole_loop=True)
    assert_same(a, b, 5e-6)
    full = mask.expand(4, 3, 6)
    assert torch.equal(b.y[full], y0[full])


def test_minimize_picks_the_whole_loop_by_itself():
    m, x, y0 = setup(torch.float32)
    K = y0.shape[1]

    def path(cfg, **kw):
        return pyebm.explain(m, x, config=cfg, candidates=K, init=y0, **kw)

    assert path(CONFIGS["gd"]).path == "one call"                       # context term, loop and selection
    assert path(CONFIGS["gd"], mask=torch.zeros(y0.shape, dtype=torch.bool)).path == "whole loop"
    # Options the op does not implement keep the per-step path, and say why.
    for cfg, why in ((Descent.gd(steps=3, accept_if_lower=True), "accept_if_lower"),
                     (Descent.gd(steps=3, normalize="rms"), "normalize"),
                     (Descent.gd(steps=3, tol=0.1, tol_scope="all"), "tol_scope"),
                     (Descent.ibc_dfo(steps=3, lower=-1.0, upper=1.0), "method")):
        e = path(cfg)
        assert e.path == "per step" and why in e.refused["whole loop"], (cfg, e)
    assert "record" in path(CONFIGS["gd"], record=True).refused["whole loop"]
    assert path(CONFIGS["gd"], backend="torch").path == "per step"


def test_whole_loop_isolates_non_finite_candidates():
    m, x, y0 = setup(torch.float64, B=2, K=6)
    y0[1, 2] = float("nan")
    cfg = Descent.gd(steps=5, step_size=0.05)
    a, b = both(m, x, y0, cfg)
    assert b.status[1, 2] == 2 and (b.status.flatten()[torch.arange(12) != 8] == 0).all()
    assert_same(a, b, 1e-12)
    assert b.best_index[1] != 2
    # An energy-scaled step that overflows stops only that candidate, with its last finite value.
    m2, x2, y2 = setup(torch.float64, B=1, K=4)
    with torch.no_grad():
        m2.head.bias.fill_(800.0)  # exp(E) overflows float64 for every candidate
    r = minimize(m2, x2, candidates=4, config=Descent.gd(steps=3, step_schedule="energy"), init=y2, whole_loop=True)
    assert (r.status == 2).all() and torch.isfinite(r.y).all()


def test_half_precision_whole_loop_is_computed_in_float32():
    m, x, y0 = setup(torch.float32)
    cfg = CONFIGS["nesterov"]
    ref = minimize(m, x, candidates=5, config=cfg, init=y0, whole_loop=True)
    mb = pyebm.MLPEnergy(3, 4, hidden=(16, 16), activation="tanh", residual=True).to(torch.bfloat16)
    mb.load_state_dict({k: v.to(torch.bfloat16) for k, v in m.state_dict().items()})
    got = minimize(mb, x.bfloat16(), candidates=5, config=cfg, init=y0.bfloat16(), whole_loop=True)
    assert got.y.dtype == torch.bfloat16
    assert (got.y.float() - ref.y).abs().max() < 0.1


def op_args(N=6, D=3, dtype=torch.float64):
    torch.manual_seed(1)
    y = torch.randn(N, D, dtype=dtype)
    g = torch.randn(N, D, dtype=dtype)
    E = torch.randn(N, dtype=dtype)
    active = torch.ones(N, dtype=torch.bool)
    if N > 4:  # a row with an infinite energy, an inactive row
        E[2] = float("inf")
        active[4] = False
    steps = torch.zeros(N, dtype=torch.int32)
    status = torch.zeros(N, dtype=torch.int8)
    return y, g, E, active, steps, status


@pytest.mark.parametrize("opts", [
    dict(),
    dict(momentum=0.7, grad_clip=0.5, grad_clip_norm=0.8),
    dict(tol=1.0),
    dict(tol=1.5, tol_final_step=True),
    dict(noise_mode="langevin", noise_level=0.3, lower=torch.tensor([-0.5, -0.1, -1.0]),
         upper=torch.tensor([0.3, 0.6, 1.0])),
    dict(noise_mode="step", noise_level=0.5, energy_scaled=True, energy_temperature=2.0, step_clip=0.05),
    dict(noise_mode="additive", noise_level=0.1, mask=True),
    dict(y_base=True, momentum=0.5, tol=1.5, tol_final_step=True, energy_scaled=True),
    dict(N=1, tol=10.0, tol_scope="all", y_base=True),
    dict(N=1, tol=0.1, tol_scope="all", tol_final_step=True),
])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_update_matches_torch_update(opts, dtype):
    opts = dict(opts)
    N, D = opts.pop("N", 6), 3
    if opts.pop("y_base", False):  # the step starts elsewhere than the committed state (a normalised y)
        opts["y_base"] = torch.randn(N, D, generator=torch.Generator().manual_seed(6))
    if N == 1 or "y_base" in opts:  # these take the C++ op on the cpu backend too
        assert _dispatch.update_route(torch.zeros(N, D), torch.zeros(N, D), opts.get("y_base"), "none",
                                      opts.get("tol", 0.0), "grad_norm", opts.get("tol_scope", "candidate"), None,
                                      False, None, None, None, "cpu") == ("cpu", None)
    runs = []
    for backend in ("torch", "cpu"):
        y, g, E, active, steps, status = op_args(N, D, dtype)
        kw = dict(eta=0.1, grad_scale=0.9, backend=backend)
        if opts.get("momentum"):
            kw["velocity"] = torch.randn(N, D, dtype=dtype, generator=torch.Generator().manual_seed(2))
        if opts.get("tol_final_step"):
            kw["pending"] = torch.tensor([True, False, True, True, False, False])[:N]
        if "noise_mode" in opts:
            kw["noise"] = torch.randn(N, D, dtype=dtype, generator=torch.Generator().manual_seed(3))
        if opts.get("mask"):
            kw["mask"] = torch.rand(N, D, generator=torch.Generator().manual_seed(4)) < 0.3
            kw["fixed"] = torch.randn(N, D, dtype=dtype, generator=torch.Generator().manual_seed(5))
        for k, v in opts.items():
            if k != "mask":
                kw[k] = v.to(dtype) if isinstance(v, torch.Tensor) else v
        dops.descent_update(y, g, E, active, steps, status, **kw)
        runs.append((y, active, steps, status, kw.get("velocity"), kw.get("pending")))
    (y1, a1, s1, st1, v1, p1), (y2, a2, s2, st2, v2, p2) = runs
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(y2, y1, rtol=0, atol=tol)
    assert torch.equal(a1, a2) and torch.equal(s1, s2) and torch.equal(st1, st2)
    if v1 is not None:
        torch.testing.assert_close(v2, v1, rtol=0, atol=tol)
    if N == 6:
        assert st2[2] == 2 and s2[4] == 0  # the inf row stopped, the inactive row did not move


@pytest.mark.parametrize("opts", [
    dict(),
    dict(momentum=0.7, grad_clip=0.5, grad_clip_norm=0.8),
    dict(tol=1.5, tol_final_step=True),
    dict(noise_mode="langevin", lower=torch.tensor([-0.5, -0.1, -1.0]), upper=0.6),
    dict(noise_mode="step", energy_scaled=True, energy_temperature=2.0, step_clip=0.05),
    dict(noise_mode="additive", mask=True, y_base=True),
])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_bound_fused_update_is_descent_update(opts, dtype):
    """FusedUpdate (the op bound to a descent's state once per call) takes three steps exactly as three
    descent_update calls do: the same op on the same values, so bitwise (here with strided gradients and
    energies, which it copies, and noise refilled in place between the steps)."""
    opts = dict(opts)
    N, D = 6, 3
    gen = torch.Generator().manual_seed(11)
    steps_in = [(torch.randn(N, 2 * D, dtype=dtype, generator=gen)[:, ::2], torch.randn(N, 2, dtype=dtype,
                 generator=gen)[:, 0], torch.randn(N, D, dtype=dtype, generator=gen), 0.1 * (k + 1))
                for k in range(3)]                                     # (g strided, E strided, xi, eta)
    steps_in[1][1][3] = float("nan")                                  # a row stops at the second step
    runs = []
    for bound in (False, True):
        y, _, _, active, steps, status = op_args(N, D, dtype)
        kw = dict(grad_scale=0.9)
        state = {}
        if opts.get("momentum"):
            state["velocity"] = torch.randn(N, D, dtype=dtype, generator=torch.Generator().manual_seed(2))
        if opts.get("tol_final_step"):
            state["pending"] = torch.tensor([True, False, True, True, False, False])
        noise = torch.empty(N, D, dtype=dtype) if "noise_mode" in opts else None
        if opts.get("mask"):
            state["mask"] = torch.rand(N, D, generator=torch.Generator().manual_seed(4)) < 0.3
            state["fixed"] = torch.randn(N, D, dtype=dtype, generator=torch.Generator().manual_seed(5))
        base = torch.randn(N, D, dtype=dtype, generator=torch.Generator().manual_seed(6)) if opts.get("y_base") \
            else None
        for k, v in opts.items():
            if k not in ("mask", "y_base", "momentum", "tol_final_step"):
                kw[k] = v.to(dtype) if isinstance(v, torch.Tensor) else v
        if opts.get("momentum"):
            kw["momentum"] = opts["momentum"]
        if opts.get("tol_final_step"):
            kw["tol_final_step"] = True
        noise_mode = kw.pop("noise_mode", "none")
        update = dops.FusedUpdate("cpu", y, active, steps, status, noise=noise, noise_mode=noise_mode, **state,
                                  **kw) if bound else None
        for g, E, xi, eta in steps_in:
            g = g.clone()  # scratch: both runs get the same strided values
            if noise is not None:
                noise.copy_(xi)
            if bound:
                update(g, E, eta, 0.3, base)
            else:
                dops.descent_update(y, g.contiguous(), E, active, steps, status, eta=eta, y_base=base, noise=noise,
                                    noise_mode=noise_mode, noise_level=0.3, backend="cpu", **state, **kw)
        runs.append((y, active, steps, status, state.get("velocity"), state.get("pending")))
    for a, b in zip(*runs):
        assert (a is None and b is None) or torch.equal(a, b)
    if "tol" not in opts:
        assert runs[1][3][3] == 2 and runs[1][2][3] == 1   # the NaN row stopped after one step


def test_bound_fused_update_checks_its_state():
    y, g, E, active, steps, status = op_args()
    with pytest.raises(ValueError, match="kind must be 'cpu', 'cuda' or 'triton'"):
        dops.FusedUpdate("torch", y, active, steps, status)
    with pytest.raises(ValueError, match="y must be contiguous"):
        dops.FusedUpdate("cpu", torch.randn(3, 6, dtype=y.dtype).t(), active, steps, status)
    with pytest.raises(ValueError, match="noise must be contiguous"):
        dops.FusedUpdate("cpu", y, active, steps, status, noise=torch.randn(3, 6).t(), noise_mode="langevin")
    update = dops.FusedUpdate("cpu", y, active, steps, status)
    with pytest.raises(ValueError, match="g must have shape"):  # the op still checks every tensor at every call
        update(g[:3], E, 0.1, 0.0)


def test_opcheck_whole_loop_and_update():
    m, x, y0 = setup(torch.float32, B=2, K=3)
    w_in, ws, bs, w_out, b_out = [t.detach() if isinstance(t, torch.Tensor) else [u.detach() for u in t]
                                  for t in m.op_params()]
    ctx = m.prepare(x)
    eta = torch.full((4,), 0.05, dtype=torch.float64)
    nl = torch.zeros(4, dtype=torch.float64)
    args = (ctx, y0, w_in, ws, bs, w_out, b_out, "tanh", True, eta, nl, None, None, None, None, None, 1.0, 0.5,
            True, None, None, False, 1.0, 0.0, False, True, "none")
    torch.library.opcheck(torch.ops.pyebm.mlp_descent.default, args)
    y, g, E, active, steps, status = op_args(dtype=torch.float32)
    uargs = (y, g, E, active, steps, status, None, None, None, None, None, None, None, None, 0.1, 0.0, "none", 1.0,
             0.0, None, None, False, 1.0, 0.0, False, True)
    torch.library.opcheck(torch.ops.pyebm.descent_update.default, uargs)


def test_whole_loop_op_bad_input():
    m, x, y0 = setup(torch.float32, B=2, K=3)
    w_in, ws, bs, w_out, b_out = m.op_params()
    ctx = m.prepare(x)
    eta = torch.full((4,), 0.05, dtype=torch.float64)
    nl = torch.zeros(4, dtype=torch.float64)
    base = [ctx, y0, w_in, ws, bs, w_out, b_out, "tanh", True, eta, nl, None, None, None, None, None, 1.0, 0.0,
            False, None, None, False, 1.0, 0.0, False, True, "none"]

    def call(**changes):
        args = list(base)
        names = {"nl": 10, "noise": 11, "mask": 15, "noise_mode": 26, "eta": 9}
        for k, v in changes.items():
            args[names[k]] = v
        with torch.no_grad():
            return torch.ops.pyebm.mlp_descent(*args)

    with pytest.raises(ValueError, match="noise_mode must be one of"):
        call(noise_mode="brownian")
    with pytest.raises(ValueError, match=r"needs the noise tensor"):
        call(noise_mode="langevin")
    with pytest.raises(ValueError, match=r"noise must have shape \[4, 2, 3, 4\] \(\[steps, B, K, D\]\)"):
        call(noise_mode="langevin", noise=torch.randn(3, 2, 3, 4))
    with pytest.raises(ValueError, match=r"noise_level must be a floating \[steps\] = \[4\] tensor"):
        call(nl=torch.zeros(5, dtype=torch.float64))
    with pytest.raises(TypeError, match="mask must be torch.bool"):
        call(mask=torch.zeros(2, 3, 4))


@pytest.mark.parametrize("selection", ["min", "max", "max_gap"])
def test_select_best_matches_the_torch_selection(selection):
    from pyebm.descent import _select

    torch.manual_seed(7)
    y = torch.randn(4, 6, 3)
    E, E0 = torch.randn(4, 6), torch.randn(4, 6)
    status = torch.zeros(4, 6, dtype=torch.int8)
    status[1, :] = 2           # no valid candidate: index 0
    status[2, 3] = 2
    E[3, 2] = float("nan")
    cfg = Descent.gd(selection=selection)
    idx = _select(cfg, E, E0, status, None)
    best, best_E, got = torch.ops.pyebm.select_best(y, E, E0, status, selection)
    assert torch.equal(got, idx)
    ar = torch.arange(4)
    assert torch.equal(best, y[ar, idx]) and torch.equal(best_E.nan_to_num(), E[ar, idx].nan_to_num())
    torch.library.opcheck(torch.ops.pyebm.select_best.default, (y, E, E0, status, selection))


def test_select_best_bad_input():
    y, E = torch.randn(2, 3, 4), torch.randn(2, 3)
    st = torch.zeros(2, 3, dtype=torch.int8)
    with pytest.raises(ValueError, match="selection must be min, max or max_gap"):
        torch.ops.pyebm.select_best(y, E, E, st, "sample")
    with pytest.raises(ValueError, match="status must be int8"):
        torch.ops.pyebm.select_best(y, E, E, st.int(), "min")
    with pytest.raises(ValueError, match=r"y must be \[B, K, ...\]"):
        torch.ops.pyebm.select_best(y[:1], E, E, st, "min")
