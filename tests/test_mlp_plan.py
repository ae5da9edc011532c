"""The cpu plan (pyebm._C.MlpPlan): MLPEnergy's eager CPU calls and minimize's whole loop without the
dispatcher. It runs the ops' kernels on the same values, so it must match the torch.ops path bit for bit,
see in-place weight updates, and hand every call it does not take to the op path unchanged."""
import pytest
import torch
from torch import nn

import pyebm
from pyebm import Descent, minimize
from pyebm import descent as descent_mod
from pyebm.ops.mlp_energy import mlp_energy as op_energy, mlp_energy_grad as op_energy_grad

from test_mlp_descent import CONFIGS

pytestmark = pytest.mark.skipif(not pyebm.backends()["cpu"], reason="extension pyebm._C not built")


def op_path(m, ctx, y, grad=True):
    fn = op_energy_grad if grad else op_energy
    return fn(ctx, y, *m.op_params(), m.activation, m.residual, backend="cpu")


def assert_bitwise(a, b):
    a = a if isinstance(a, (tuple, list)) else (a,)
    b = b if isinstance(b, (tuple, list)) else (b,)
    assert len(a) == len(b)
    for u, v in zip(a, b):
        assert u.dtype == v.dtype and u.shape == v.shape
        assert torch.equal(u, v) or torch.equal(torch.isnan(u), torch.isnan(v)) and torch.equal(
            torch.nan_to_num(u), torch.nan_to_num(v))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("hidden,act,residual", [((64, 64), "silu", False), ((16, 16, 16), "tanh", True),
                                                 ((128, 96), "gelu", False), ((7,), "relu", False),
                                                 ((64, 64, 64), "softplus", True)])
@pytest.mark.parametrize("B,K", [(1, 1), (1, 32), (3, 5), (17, 33), (4, 300)])
def test_plan_matches_the_op_bitwise(dtype, hidden, act, residual, B, K):
    torch.manual_seed(B * 100 + K)
    m = pyebm.MLPEnergy(5, 16, hidden=hidden, activation=act, residual=residual, dtype=dtype)
    x = torch.randn(B, 5, dtype=dtype)
    y = torch.randn(B, K, 16, dtype=dtype)
    ctx = m.prepare(x)
    plan = m.cpu_plan()
    assert plan is not None
    assert_bitwise(plan.energy_and_grad(ctx, y), op_path(m, ctx, y))
    assert_bitwise(m.energy_and_grad(ctx, y), op_path(m, ctx, y))
    assert_bitwise(m.energy(ctx, y), op_path(m, ctx, y, grad=False))
    # and the reference, within fp tolerance
    E_ref, G_ref = m.energy_and_grad(ctx, y, backend="torch")
    E, G = m.energy_and_grad(ctx, y)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(E, E_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(G, G_ref, rtol=tol, atol=tol)


def test_plan_transposes_every_forward_weight_once():
    m = pyebm.MLPEnergy(4, 16, hidden=(64, 64, 32))
    assert m.cpu_plan().packed_matrices == 3  # W_in^T, W_1^T, W_2^T
    assert m.cpu_plan().refresh() is False
    with torch.no_grad():
        m.layers[1].weight.add_(1.0)
    assert m.cpu_plan().refresh() is True  # re-made after the in-place change
    assert m.cpu_plan().refresh() is False


def test_plan_context_is_prepare():
    torch.manual_seed(0)
    for bias in (True, False):
        m = pyebm.MLPEnergy(6, 3, hidden=(8, 8), bias=bias)
        x = torch.randn(4, 6)
        assert torch.equal(m.cpu_plan().context(x), m.prepare(x))


def test_plan_sees_in_place_updates_and_replacements():
    torch.manual_seed(1)
    m = pyebm.MLPEnergy(3, 4, hidden=(64, 64))
    x, y = torch.randn(2, 3), torch.randn(2, 9, 4)
    ctx = m.prepare(x)
    plan = m.cpu_plan()
    before = m.energy_and_grad(ctx, y)

    with torch.no_grad():  # optimizer-style in-place update
        m.layers[0].weight.mul_(1.5)
        m.y_proj.weight.add_(0.1)
    after = m.energy_and_grad(ctx, y)
    assert not torch.equal(after[0], before[0])
    assert_bitwise(after, op_path(m, ctx, y))
    assert m.cpu_plan() is plan  # same plan, repacked

    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    m(x, y).sum().backward()
    opt.step()
    assert_bitwise(m.energy_and_grad(ctx, y), op_path(m, ctx, y))

    other = pyebm.MLPEnergy(3, 4, hidden=(64, 64))
    m.load_state_dict(other.state_dict())
    assert_bitwise(m.energy_and_grad(ctx, y), op_path(m, ctx, y))
    assert_bitwise(m.energy_and_grad(ctx, y), other.energy_and_grad(ctx, y))

    m.layers[0].weight.data = torch.randn(64, 64)  # new storage under the same parameter
    assert_bitwise(m.energy_and_grad(ctx, y), op_path(m, ctx, y))

    m.head.weight = nn.Parameter(torch.randn(1, 64))  # a new parameter object: a new plan
    assert_bitwise(m.energy_and_grad(ctx, y), op_path(m, ctx, y))
    assert m.cpu_plan() is not plan

    plan = m.cpu_plan()
    m.layers[0]._parameters["weight"] = nn.Parameter(torch.randn(64, 64))  # behind nn.Module's back
    assert plan.stale
    assert_bitwise(m.energy_and_grad(ctx, y), op_path(m, ctx, y))
    assert_bitwise(m.energy(ctx, y), op_path(m, ctx, y, grad=False))
    assert not m.cpu_plan().stale

    # torch.func.functional_call swaps parameters into the module's slots for a call (this context manager
    # is how it does it): the plan must see the swapped-in values, then the module's own again.
    try:
        from torch.nn.utils.stateless import _reparametrize_module
    except ImportError:
        _reparametrize_module = None
    if _reparametrize_module is not None:
        swapped = {k: v.detach() * 0.5 for k, v in m.named_parameters()}
        with _reparametrize_module(m, swapped):
            got, want = m.energy_and_grad(ctx, y), op_path(m, ctx, y)
        assert_bitwise(got, want)
        assert not torch.equal(got[0], m.energy_and_grad(ctx, y)[0])
        assert_bitwise(m.energy_and_grad(ctx, y), op_path(m, ctx, y))

    m.double()
    ctx64, y64 = m.prepare(x.double()), y.double()
    assert_bitwise(m.energy_and_grad(ctx64, y64), op_path(m, ctx64, y64))


def test_plan_hands_other_calls_to_the_op_path():
    torch.manual_seed(2)
    m = pyebm.MLPEnergy(3, 4, hidden=(16,))
    x, y = torch.randn(2, 3), torch.randn(2, 5, 4)
    ctx = m.prepare(x)
    plan = m.cpu_plan()
    # Non-contiguous candidates: the plan makes them contiguous, same numbers.
    yt = torch.randn(2, 4, 5).transpose(1, 2)
    assert_bitwise(m.energy_and_grad(ctx, yt), op_path(m, ctx, yt.contiguous()))
    # What the plan does not take, it returns None for; the API then raises the documented errors.
    assert plan.energy_and_grad(ctx, y.double()) is None
    assert plan.energy_and_grad(ctx[:1], y) is None
    assert plan.energy_and_grad(ctx, y[..., :3]) is None
    with pytest.raises(ValueError, match="candidate_dim"):
        m.energy_and_grad(ctx, y[..., :3])
    with pytest.raises(ValueError, match="ctx must be"):
        m.energy_and_grad(ctx[:1], y)
    with pytest.raises((TypeError, RuntimeError), match="dtype"):
        m.energy_and_grad(ctx, y.double())
    # B = 0 and K = 0 give empty results on both paths.
    for shape in ((0, 5, 4), (2, 0, 4)):
        e = torch.randn(shape)
        c = ctx[: shape[0]]
        assert_bitwise(m.energy_and_grad(c, e), op_path(m, c, e))
    # half-precision weights have no plan: the op path computes them
    h = pyebm.MLPEnergy(3, 4, hidden=(16,), dtype=torch.bfloat16)
    assert h.cpu_plan() is None
    E, G = h.energy_and_grad(h.prepare(x.bfloat16()), y.bfloat16())
    assert E.dtype == torch.bfloat16 and G.shape == (2, 5, 4)


def test_plan_outputs_carry_no_graph():
    m = pyebm.MLPEnergy(3, 4, hidden=(16,))
    x, y = torch.randn(2, 3), torch.randn(2, 5, 4, requires_grad=True)
    E, G = m.energy_and_grad(m.prepare(x), y)
    assert not E.requires_grad and not G.requires_grad


def test_plan_is_not_used_under_torch_compile():
    m = pyebm.MLPEnergy(3, 4, hidden=(16,))
    x, y = torch.randn(2, 3), torch.randn(2, 5, 4)
    ctx = m.prepare(x)

    @torch.compile(fullgraph=True, backend="eager")
    def f(c, v):
        return m.energy_and_grad(c, v)

    assert_bitwise(f(ctx, y), m.energy_and_grad(ctx, y))


# -- minimize's fast path ----------------------------------------------------------------------------

@pytest.fixture
def fast_calls(monkeypatch):
    """Counts the minimize calls the fast path answered."""
    taken = []
    real = descent_mod._fast_minimize

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        taken.append(out is not None)
        return out

    monkeypatch.setattr(descent_mod, "_fast_minimize", spy)
    return taken


def general_path(m, x, K, cfg, init, seed):
    # event_shape keeps minimize off the fast path; the whole-loop op still runs.
    return minimize(m, x, candidates=K, config=cfg, init=init, generator=torch.Generator().manual_seed(seed),
                    whole_loop=True, event_shape=(m.candidate_dim,))


def assert_same_result(a, b):
    for name in ("best", "best_energy", "best_index", "y", "energy", "initial_energy", "steps", "status"):
        u, v = getattr(a, name), getattr(b, name)
        assert u.shape == v.shape and u.dtype == v.dtype, name
        assert torch.equal(torch.nan_to_num(u), torch.nan_to_num(v)), name


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fast_minimize_matches_the_whole_loop_op(name, dtype, fast_calls):
    torch.manual_seed(0)
    m = pyebm.MLPEnergy(3, 4, hidden=(16, 16), activation="tanh", residual=True, dtype=dtype)
    x = torch.randn(3, 3, dtype=dtype)
    y0 = torch.randn(3, 5, 4, dtype=dtype)
    cfg = CONFIGS[name]
    fast = minimize(m, x, candidates=5, config=cfg, init=y0, generator=torch.Generator().manual_seed(5))
    assert fast_calls == [True]
    assert_same_result(fast, general_path(m, x, 5, cfg, y0, 5))


@pytest.mark.parametrize("init", [None, "normal", "zeros", "uniform"])
@pytest.mark.parametrize("selection", ["min", "max", "max_gap"])
def test_fast_minimize_inits_and_selections(init, selection, fast_calls):
    torch.manual_seed(4)
    m = pyebm.MLPEnergy(6, 3, hidden=(32, 32))
    x = torch.randn(4, 6)
    cfg = Descent.langevin(steps=5, step_size=0.02, temperature=0.05, lower=-2.0, upper=2.0, selection=selection)
    fast = minimize(m, x, candidates=7, config=cfg, init=init, generator=torch.Generator().manual_seed(11))
    assert fast_calls == [True]
    assert_same_result(fast, general_path(m, x, 7, cfg, init, 11))
    # no generator: the global one, drawn in the same order
    torch.manual_seed(3)
    a = minimize(m, x, candidates=7, config=cfg, init=init)
    torch.manual_seed(3)
    b = minimize(m, x, candidates=7, config=cfg, init=init, event_shape=(3,))
    assert_same_result(a, b)


def test_fast_minimize_records_no_graph(fast_calls):
    m = pyebm.MLPEnergy(3, 4, hidden=(16,))
    x = torch.randn(2, 3, requires_grad=True)
    y0 = torch.randn(2, 5, 4, requires_grad=True)
    res = minimize(m, x, candidates=5, config=Descent.gd(steps=3), init=y0)
    assert fast_calls == [True]
    for name in ("best", "best_energy", "y", "energy", "initial_energy"):
        assert not getattr(res, name).requires_grad, name
    assert torch.equal(res.y, general_path(m, x.detach(), 5, Descent.gd(steps=3), y0.detach(), 0).y)


def test_fast_minimize_declines_what_it_does_not_run(fast_calls):
    torch.manual_seed(5)
    m = pyebm.MLPEnergy(3, 4, hidden=(16,))
    x = torch.randn(2, 3)
    y0 = torch.randn(2, 4)
    # [B, D] init shared by the candidates, sampling selection, DFO, a float64 context: the general path.
    minimize(m, x, candidates=3, config=Descent.gd(steps=3), init=y0)
    minimize(m, x, candidates=3, config=Descent.gd(steps=3, selection="sample"))
    minimize(m, x, candidates=3, config=Descent.ibc_dfo(steps=2, lower=-1.0, upper=1.0))
    assert fast_calls == [False, False, False]
    with pytest.raises(ValueError, match="float64"):
        minimize(m, x.double(), candidates=3, config=Descent.gd(steps=3))
    with pytest.raises(ValueError, match="candidates"):
        minimize(m, x, candidates=0)
    with pytest.raises(ValueError, match="init"):
        minimize(m, x, candidates=3, init=torch.randn(3, 3, 4))


def test_plan_and_rule_bad_input():
    from pyebm import _backend

    C = _backend.ext()
    m = pyebm.MLPEnergy(3, 4, hidden=(8, 6))
    w_in, weights, biases, w_out, b_out = m.op_params()
    args = dict(w_x=m.x_proj.weight, w_in=w_in, b_in=m.y_proj.bias, weights=list(weights), biases=list(biases),
                w_out=w_out, b_out=b_out, activation="silu", residual=False)
    with pytest.raises(RuntimeError, match="weights and biases"):
        C.MlpPlan(**{**args, "biases": []})
    with pytest.raises(RuntimeError, match=r"weights\[0\]"):
        C.MlpPlan(**{**args, "weights": [torch.randn(6, 5)]})
    with pytest.raises(RuntimeError, match="dtype"):
        C.MlpPlan(**{**args, "w_out": w_out.double()})
    with pytest.raises(RuntimeError, match="w_x"):
        C.MlpPlan(**{**args, "w_x": torch.randn(7, 3)})
    with pytest.raises(ValueError, match="activation"):
        C.MlpPlan(**{**args, "activation": "swish"})
    with pytest.raises(RuntimeError, match="float32 and float64"):
        C.MlpPlan(**{k: (v.half() if isinstance(v, torch.Tensor) else
                         [t.half() for t in v] if isinstance(v, list) else v) for k, v in args.items()})

    rule = dict(eta=[0.1, 0.1], noise_level=[0.0, 0.0], grad_scale=1.0, momentum=0.0, nesterov=False,
                grad_clip=None, grad_clip_norm=None, energy_scaled=False, energy_temperature=1.0, tol=0.0,
                tol_final_step=False, bound_each_step=True, noise_mode="none", lower=None, upper=None,
                step_clip=None, selection="min")
    assert C.DescentRule(**rule).steps == 2
    with pytest.raises(RuntimeError, match="one step size and one noise level"):
        C.DescentRule(**{**rule, "noise_level": [0.0]})
    with pytest.raises(ValueError, match="noise_mode"):
        C.DescentRule(**{**rule, "noise_mode": "loud"})
    with pytest.raises(ValueError, match="selection"):
        C.DescentRule(**{**rule, "selection": "sample"})
    with pytest.raises(ValueError, match="momentum"):
        C.DescentRule(**{**rule, "momentum": 1.0})
    with pytest.raises(RuntimeError, match="lower"):
        C.DescentRule(**{**rule, "lower": torch.zeros(2, 2)})
