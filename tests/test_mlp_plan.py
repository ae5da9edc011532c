"""The cpu plan (pyebm._C.MlpPlan): MLPEnergy's eager CPU calls and minimize's one-call descent without the
dispatcher. It runs the ops' kernels on the same values, so it must match the torch.ops path bit for bit,
compute with the module's current weights however they changed, and hand every call it does not take to the
op path unchanged."""
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
    """prepare takes the plan's context term once the plan exists, and the Python term before it, for inputs
    the plan does not take, and under a dispatch mode or a torch.func transform: the same addmm on the same
    weights, so the same values bit for bit."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func)
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    for bias in (True, False):
        for dtype in (torch.float32, torch.float64):
            m = pyebm.MLPEnergy(6, 3, hidden=(8, 8), bias=bias, dtype=dtype)
            x = torch.randn(4, 6, dtype=dtype)
            W = m.x_proj.weight.detach().clone()
            want = torch.addmm(m.y_proj.bias.detach(), x, W.t()) if bias else x @ W.t()
            before = m.prepare(x)  # no plan yet
            assert torch.equal(before, want)
            assert torch.equal(m.cpu_plan().context(x), want)
            assert torch.equal(m.prepare(x), want)  # through the plan now
            # a strided view: the same product on those rows (a BLAS may round a 2-row product differently
            # from the same rows inside a 4-row one, as MKL does in float64 on AVX-512)
            rows = x[::2]
            assert torch.equal(m.prepare(rows), torch.addmm(m.y_proj.bias.detach(), rows, W.t()) if bias
                               else rows @ W.t())
            with Count() as mode:
                assert torch.equal(m.prepare(x), want)
            assert any("mm" in str(op) for op in mode.ops)  # the mode saw the product
            # under vmap: the same product as vmap makes of it (batched, it may round unlike the 4-row addmm)
            bias_t = m.y_proj.bias.detach() if bias else None
            same = torch.func.vmap(lambda r: (torch.addmm(bias_t, r.unsqueeze(0), W.t()) if bias
                                              else r.unsqueeze(0) @ W.t())[0])(x)
            assert torch.equal(torch.func.vmap(lambda r: m.prepare(r.unsqueeze(0))[0])(x), same)
            with pytest.raises(ValueError, match="prepare: x is"):
                m.prepare(x.to(torch.float64 if dtype == torch.float32 else torch.float32))
            with pytest.raises(ValueError, match="prepare: x must be"):
                m.prepare(torch.randn(4, 5, dtype=dtype))
            with torch.no_grad():
                m.x_proj.weight.mul_(2.0)  # the plan computes with the current weights
            assert torch.equal(m.prepare(x), torch.addmm(m.y_proj.bias.detach(), x, W.t() * 2.0) if bias
                               else x @ (W.t() * 2.0))


def test_plan_sees_in_place_updates_and_replacements():
    torch.manual_seed(1)
    m = pyebm.MLPEnergy(3, 4, hidden=(64, 64))
    x, y = torch.randn(2, 3), torch.randn(2, 9, 4)
    ctx = m.prepare(x)
    plan = m.cpu_plan()
    before = m.energy_and_grad(ctx, y)
    assert plan.packs == 1

    with torch.no_grad():  # optimizer-style in-place update
        m.layers[0].weight.mul_(1.5)
        m.y_proj.weight.add_(0.1)
    after = m.energy_and_grad(ctx, y)
    assert not torch.equal(after[0], before[0])
    assert_bitwise(after, op_path(m, ctx, y))
    assert m.cpu_plan() is plan and plan.packs == 2  # same plan, packed again
    m.energy_and_grad(ctx, y)
    assert plan.packs == 2  # nothing changed: no repack

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
    m.layers[0].weight.data = m.layers[0].weight.data.t()  # same storage, another layout
    assert_bitwise(m.energy_and_grad(ctx, y), op_path(m, ctx, y))

    m.head.weight = nn.Parameter(torch.randn(1, 64))  # a new parameter object
    assert_bitwise(m.energy_and_grad(ctx, y), op_path(m, ctx, y))
    m.layers[0] = nn.Linear(64, 64)  # a new submodule
    assert_bitwise(m.energy_and_grad(ctx, y), op_path(m, ctx, y))
    m.layers[0]._parameters["weight"] = nn.Parameter(torch.randn(64, 64))  # behind nn.Module's back
    assert_bitwise(m.energy_and_grad(ctx, y), op_path(m, ctx, y))
    assert_bitwise(m.energy(ctx, y), op_path(m, ctx, y, grad=False))
    assert m.cpu_plan() is plan

    # torch.func.functional_call swaps parameters into the module's slots for a call: the plan must see the
    # swapped-in values, then the module's own again.
    swapped = {k: v.detach() * 0.5 for k, v in m.named_parameters()}
    twin = pyebm.MLPEnergy(3, 4, hidden=(64, 64))
    twin.load_state_dict(swapped)
    assert torch.equal(torch.func.functional_call(m, swapped, (x, y)), twin(x, y))  # the training forward
    from torch.nn.utils.stateless import _reparametrize_module

    with _reparametrize_module(m, swapped):
        got, want = m.energy_and_grad(ctx, y), op_path(m, ctx, y)
    assert_bitwise(got, want)
    assert not torch.equal(got[0], m.energy_and_grad(ctx, y)[0])
    assert_bitwise(m.energy_and_grad(ctx, y), op_path(m, ctx, y))

    m.double()  # moving the module drops its packed state
    assert m.cpu_plan() is not plan
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



def test_plan_refuses_what_the_op_path_must_see():
    """The plan's own eager checks (C++): a dispatch mode records the op, a tensor subclass and a Parameter go
    to the op path, a torch.func transform differentiates the call (torch.jit.trace: test_api_errors)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    torch.manual_seed(4)
    m = pyebm.MLPEnergy(3, 4, hidden=(16,)).double()
    x, y = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 5, 4, dtype=torch.float64)
    ctx = m.prepare(x)
    want = m.energy_and_grad(ctx, y)
    plan = m.cpu_plan()
    assert plan.energy_and_grad(ctx, y) is not None  # the plan takes the plain eager call

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    with Record() as rec:
        assert plan.energy_and_grad(ctx, y) is None
        got = m.energy_and_grad(ctx, y)
    assert "pyebm.mlp_energy_grad.default" in rec.ops
    assert_bitwise(got, want)

    class Sub(torch.Tensor):
        pass

    for yy in (y.as_subclass(Sub), nn.Parameter(y.clone())):
        assert plan.energy_and_grad(ctx, yy) is None and plan.energy(ctx, yy) is None
        assert torch.allclose(m.energy_and_grad(ctx, yy)[1].as_subclass(torch.Tensor), want[1])

    # torch.func: the gradient of the energy call is its input gradient (not the zero of a constant), and the
    # gradient of energy_and_grad's gradient is the Hessian-vector product of the training forward
    g = torch.func.grad(lambda v: m.energy(ctx, v).sum())(y)
    assert torch.allclose(g, want[1])
    hv = torch.func.grad(lambda v: m.energy_and_grad(ctx, v)[1].sum())(y)
    yy = y.clone().requires_grad_()
    (g1,) = torch.autograd.grad(m(x, yy).sum(), yy, create_graph=True)
    assert torch.allclose(hv, torch.autograd.grad(g1.sum(), yy)[0])
    E2, G2 = torch.func.vmap(lambda v: m.energy_and_grad(ctx, v), in_dims=1, out_dims=1)(y.unsqueeze(2))
    assert torch.allclose(E2[:, :, 0], want[0]) and torch.allclose(G2[:, :, 0], want[1])


# -- minimize's one-call path -------------------------------------------------------------------------

@pytest.fixture
def fast_calls(monkeypatch):
    """Records the route of every minimize call: True where the one-call path (the plan) ran it, through the
    general path or through minimize's short lane."""
    taken = []
    real = descent_mod._RUNNERS["one call"]

    def spy(call):
        taken.append(True)
        return real(call)

    monkeypatch.setitem(descent_mod._RUNNERS, "one call", spy)
    lane = descent_mod._one_call_lane

    def lane_spy(*args):  # minimize's short lane for the one-call route's common arguments
        out = lane(*args)
        if out is not None:
            taken.append(True)
        return out

    monkeypatch.setattr(descent_mod, "_one_call_lane", lane_spy)
    for kind in ("whole loop", "per step"):
        def other(call, _real=descent_mod._RUNNERS[kind]):
            taken.append(False)
            return _real(call)
        monkeypatch.setitem(descent_mod._RUNNERS, kind, other)
    return taken


def general_path(m, x, K, cfg, init, seed):
    """The same call on the whole-loop op (the registered op after prepare), not the one-call plan."""
    from pyebm import _dispatch

    call = descent_mod._plan_call(m, x, K, cfg, init, None, torch.Generator().manual_seed(seed), False, None, None,
                                  True, False)
    call.route = _dispatch.Route("whole loop", "cpu")
    return descent_mod._run_whole_loop(call)


def assert_same_result(a, b, exact=True):
    for name in ("best", "best_energy", "best_index", "y", "energy", "initial_energy", "steps", "status"):
        u, v = getattr(a, name), getattr(b, name)
        assert u.shape == v.shape and u.dtype == v.dtype, name
        if exact or not u.is_floating_point():
            assert torch.equal(torch.nan_to_num(u), torch.nan_to_num(v)), name
        else:  # the per-step path: the same rule, other kernels
            torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-5)


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
    b = minimize(m, x, candidates=7, config=cfg, init=init, whole_loop=False)
    assert_same_result(a, b, exact=False)


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
    # A [B, D] init shared by the candidates runs on the plan; sampling selection and DFO do not.
    minimize(m, x, candidates=3, config=Descent.gd(steps=3), init=y0)
    minimize(m, x, candidates=3, config=Descent.gd(steps=3, selection="sample"))
    minimize(m, x, candidates=3, config=Descent.ibc_dfo(steps=2, lower=-1.0, upper=1.0))
    assert fast_calls == [True, False, False]
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
    names = m._source_names()
    with pytest.raises(RuntimeError, match="sources"):
        C.MlpPlan(m, names[:-1], 1, "silu", False)
    with pytest.raises(ValueError, match="activation"):
        C.MlpPlan(m, names, 1, "swish", False)
    with pytest.raises(AttributeError):
        C.MlpPlan(m, names[:5] + ["layers.0.nothing", names[6]], 1, "silu", False)
    with pytest.raises(TypeError, match="not a tensor"):
        C.MlpPlan(m, names[:5] + ["layers.0", names[6]], 1, "silu", False)
    bad = pyebm.MLPEnergy(3, 4, hidden=(8, 6))
    bad.layers[0].weight.data = torch.randn(6, 5)
    with pytest.raises(RuntimeError, match=r"weights\[0\]"):
        C.MlpPlan(bad, names, 1, "silu", False)
    bad = pyebm.MLPEnergy(3, 4, hidden=(8, 6))
    bad.head.weight.data = bad.head.weight.data.double()
    with pytest.raises(RuntimeError, match="dtype"):
        C.MlpPlan(bad, names, 1, "silu", False)
    with pytest.raises(RuntimeError, match="float32 and float64"):
        C.MlpPlan(pyebm.MLPEnergy(3, 4, hidden=(8, 6), dtype=torch.float16), names, 1, "silu", False)

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
