"""The op boundary: every ``torch.ops.pyebm.*`` op checks every tensor before a kernel reads it.

A fuzz harness drives each op with wrong arguments, one tensor at a time: 1-element views of a larger buffer,
narrowed and widened views, transposed and flattened views, wrong dtypes, tensors on the meta device, empty
and sparse tensors, wrong list lengths. Each must raise a clear error (ValueError or TypeError naming the
argument; a sparse tensor is refused by the dispatcher, which has no sparse kernel), and so must the op's fake
under FakeTensorMode. Positive controls keep the harness honest: the unmodified call, and the same call with
right-shaped strided views and offset views of larger buffers, succeed and match the reference. Value checks
(bounds, step clips, schedules) raise in the kernels. Autograd: the differentiable ops pass opcheck and
gradcheck on tensors that require grad (the module's own Parameters included); the inference ops raise under
grad mode.
"""
from __future__ import annotations

import math
import re
from typing import Callable, Dict, Optional, Sequence

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import pyebm
from pyebm.ops import ebt_policy as eop
from pyebm.reference import ebt_policy as ref_policy
from pyebm.reference import mlp_energy as ref_mlp

pytestmark = pytest.mark.skipif(not pyebm.backends()["cpu"], reason="extension pyebm._C not built")

CLEAR = (ValueError, TypeError)
OPS = torch.ops.pyebm


# -- harness -----------------------------------------------------------------------------------------

class Case:
    """One op call: ``args`` (tensors and lists of tensors among them), the names of its tensor arguments
    (``slots``: position -> name, ``(position, j)`` -> name for list entries), which of them must be
    contiguous, which accept any shape with the same number of elements (``numel_only``), and ``check`` (the
    positive control of the outputs)."""

    def __init__(self, op, args, names: Sequence[str], check: Callable, contiguous=(), numel_only=(),
                 skip=(), lists: Optional[Dict[int, str]] = None, accepts: Optional[Dict[int, Callable]] = None,
                 refs=()):
        self.op, self.args, self.check = op, list(args), check
        self.slots = {}
        for i, a in enumerate(self.args):
            if isinstance(a, torch.Tensor) and names[i] not in skip:
                self.slots[i] = names[i]
            elif isinstance(a, (list, tuple)) and all(isinstance(t, torch.Tensor) for t in a):
                for j in range(len(a)):
                    self.slots[(i, j)] = f"{names[i]}[{j}]"
        self.names = list(names)
        self.contiguous = set(contiguous)
        self.numel_only = set(numel_only)
        self.lists = lists or {}
        self.accepts = dict(accepts or {})   # slot -> predicate: is this other tensor also a valid argument?
        # the arguments that set the op's dimensions (y sets B, K, D, ...): a wrong one shows up as a mismatch
        # that the error may report on another argument
        self.refs = set(refs)

    def get(self, slot):
        return self.args[slot] if isinstance(slot, int) else self.args[slot[0]][slot[1]]

    def with_(self, slot, value) -> list:
        args = [list(a) if isinstance(a, list) else a for a in self.args]
        if isinstance(slot, int):
            args[slot] = value
        else:
            args[slot[0]][slot[1]] = value
        return args

    def call(self, args=None):
        with torch.no_grad():
            return self.op(*(self.args if args is None else args))


_BIG = {}


def big(dtype) -> torch.Tensor:
    """A large buffer whose views stand in for a caller's mistake (a slice of the wrong size)."""
    if dtype not in _BIG:
        _BIG[dtype] = torch.randn(4096).to(dtype) if dtype.is_floating_point else torch.randint(0, 2, (4096,)).to(dtype)
    return _BIG[dtype]


def bad_variants(t: torch.Tensor):
    """(label, tensor) of wrong arguments in place of t: another shape, dtype, device or layout."""
    shape, buf = list(t.shape), big(t.dtype)
    yield "1-element view of a larger buffer", buf[:1]
    if any(s != 1 for s in shape) and t.dim() > 0:
        yield "1-element view with t's rank", buf[:1].view([1] * t.dim())
    if t.dim() > 0 and shape[-1] > 0:
        yield "narrowed view", t.narrow(-1, 0, shape[-1] - 1)
    if t.dim() > 0:
        wide = shape[:-1] + [shape[-1] + 1]
        yield "wider view of a larger buffer", buf[:math.prod(wide)].view(wide)
    if t.dim() == 2 and shape[0] != shape[1]:
        yield "transposed view", t.t()
    if t.dim() != 1:
        yield "flattened", t.reshape(-1)
    yield "extra leading dim", t.unsqueeze(0).expand(2, *shape)
    if t.dtype.is_floating_point:
        yield "other float dtype", t.to(torch.float64 if t.dtype == torch.float32 else torch.float32)
        yield "integer dtype", t.to(torch.int32)
    else:
        yield "float dtype", t.to(torch.float32)
    if shape != [0]:
        yield "empty", t.new_empty(0)
    yield "meta device", t.to("meta")
    if t.dim() >= 1 and t.numel() > 0:
        yield "sparse", t.to_sparse()


def strided_copy(t: torch.Tensor) -> torch.Tensor:
    """Same values and shape, every stride doubled (a view of a larger buffer, never contiguous)."""
    buf = torch.zeros(list(t.shape) + [2], dtype=t.dtype)
    v = buf[..., 0]
    v.copy_(t)
    return v


def offset_copy(t: torch.Tensor) -> torch.Tensor:
    """Same values and shape, contiguous, at an offset into a larger buffer."""
    buf = torch.zeros(t.numel() + 7, dtype=t.dtype)
    v = buf[5:5 + t.numel()].view(t.shape)
    v.copy_(t)
    return v


def transposed_copy(t: torch.Tensor) -> torch.Tensor:
    """Same values and shape, the last two dims stored transposed."""
    return t.transpose(-1, -2).contiguous().transpose(-1, -2) if t.dim() >= 2 else strided_copy(t)


def to_fake(mode, a):
    if isinstance(a, torch.Tensor):
        return mode.from_tensor(a)
    if isinstance(a, list):
        return [to_fake(mode, t) for t in a]
    return a


def assert_names(err: Exception, name: str) -> None:
    """The message names the argument (list entries may be named by their list)."""
    base = re.escape(name.split("[")[0])
    assert re.search(rf"\b{base}\b", str(err)), f"error does not name {name}: {err}"


def expect_clear_error(case: Case, args, name: str, label: str, fake: bool = True) -> None:
    errors = CLEAR + ((NotImplementedError,) if label == "sparse" else ())
    with pytest.raises(errors) as ei:
        case.call(args)
        pytest.fail(f"{case.op} accepted a {label} as {name}")
    named = name not in case.refs
    if ei.type in CLEAR and named:
        assert_names(ei.value, name)
    if fake and label not in ("sparse", "meta device"):
        mode = FakeTensorMode()
        with pytest.raises(CLEAR) as fi:
            with mode:
                case.op(*[to_fake(mode, a) for a in args])
            pytest.fail(f"the fake of {case.op} accepted a {label} as {name}")
        if named:
            assert_names(fi.value, name)


def fuzz(case: Case) -> int:
    """Every bad variant of every tensor argument raises (the op and its fake); returns how many ran."""
    n = 0
    for slot, name in case.slots.items():
        t = case.get(slot)
        for label, bad in bad_variants(t):
            if slot in case.accepts:
                if case.accepts[slot](bad):
                    continue  # not wrong for this argument
            elif (bad.shape == t.shape or (slot in case.numel_only and bad.numel() == t.numel())) \
                    and bad.dtype == t.dtype and bad.device == t.device and bad.layout == t.layout:
                continue
            expect_clear_error(case, case.with_(slot, bad), name, label)
            n += 1
    for i, lname in case.lists.items():
        lst = case.args[i]
        for label, new in (("one entry short", lst[:-1]), ("one entry too many", lst + [lst[-1]])):
            args = list(case.args)
            args[i] = new
            with pytest.raises(CLEAR):
                case.call(args)
            n += 1
    return n


def positive(case: Case) -> None:
    """The call as given, and with every tensor replaced by a strided, transposed or offset view holding the same
    values, succeeds and passes case.check; the fake gives the real outputs' shapes and dtypes. (Copies of
    non-contiguous inputs feed the kernel the same values in the same layout: the same numbers, bit for bit.)"""
    out = case.call()
    case.check(out)
    mode = FakeTensorMode()
    with mode:
        fout = case.op(*[to_fake(mode, a) for a in case.args])
    flat = lambda o: [o] if isinstance(o, torch.Tensor) else ([] if o is None else list(o))  # noqa: E731
    for r, f in zip(flat(out), flat(fout)):
        assert tuple(r.shape) == tuple(f.shape) and r.dtype == f.dtype
    for make in (strided_copy, transposed_copy, offset_copy):
        args = [make(a) if isinstance(a, torch.Tensor) and a.numel() > 0 and i in case.slots
                else ([make(t) if t.numel() > 0 else t for t in a] if isinstance(a, list) and a and
                      isinstance(a[0], torch.Tensor) else a)
                for i, a in enumerate(case.args)]
        needs_contiguous = any(not args[s if isinstance(s, int) else s[0]].is_contiguous()
                               for s in case.contiguous if isinstance(args[s if isinstance(s, int) else s[0]],
                                                                       torch.Tensor))
        if needs_contiguous:
            with pytest.raises(ValueError, match="contiguous"):
                getattr(case, "raw_op", case.op)(*args)   # refused before anything is written
            continue
        got = case.call(args)
        case.check(got)
        for r, g in zip(flat(out), flat(got)):
            assert torch.equal(torch.nan_to_num(r), torch.nan_to_num(g)), make.__name__


# -- the MLP energy ----------------------------------------------------------------------------------

def mlp_case(grad: bool, dtype=torch.float32, B=2, K=5, D=3, hidden=(12, 8)):
    torch.manual_seed(0)
    m = pyebm.MLPEnergy(4, D, hidden=hidden, activation="tanh").to(dtype)
    with torch.no_grad():
        ctx = m.prepare(torch.randn(B, 4, dtype=dtype))
        w_in, ws, bs, w_out, b_out = [t.detach() if isinstance(t, torch.Tensor) else [u.detach() for u in t]
                                      for t in m.op_params()]
    y = torch.randn(B, K, D, dtype=dtype)
    args = [ctx, y, w_in, list(ws), list(bs), w_out, b_out, "tanh", False]
    E_ref, G_ref = ref_mlp.mlp_energy_grad(*args)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)

    def check(out):
        E = out[0] if grad else out
        torch.testing.assert_close(E, E_ref, **tol)
        if grad:
            torch.testing.assert_close(out[1], G_ref, **tol)

    op = OPS.mlp_energy_grad.default if grad else OPS.mlp_energy.default
    names = ["ctx", "y", "w_in", "weights", "biases", "w_out", "b_out", "activation", "residual"]
    return Case(op, args, names, check, numel_only={5, 6}, lists={3: "weights", 4: "biases"}, refs={"y"})


@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mlp_energy_ops(grad, dtype):
    case = mlp_case(grad, dtype)
    positive(case)
    assert fuzz(case) >= 70   # the harness ran (each a refused call)


def test_mlp_energy_named_errors():
    case = mlp_case(True)
    ctx, y, w_in, ws, bs, w_out, b_out = case.args[:7]
    with pytest.raises(ValueError, match=r"w_out must be \[8\] or \[1, 8\]; got shape \[1\]"):
        case.call(case.with_(5, big(torch.float32)[:1]))
    with pytest.raises(ValueError, match=r"biases\[0\] must be \[8\]"):
        case.call(case.with_((4, 0), big(torch.float32)[:1]))
    with pytest.raises(TypeError, match=r"weights\[0\] has dtype torch.float64 but y has dtype torch.float32"):
        case.call(case.with_((3, 0), ws[0].double()))
    with pytest.raises(ValueError, match=r"ctx is on meta but y is on cpu"):
        case.call(case.with_(0, ctx.to("meta")))
    with pytest.raises(ValueError, match="activation must be one of"):
        case.call(case.args[:7] + ["swish", False])


def test_mlp_energy_empty_and_meta():
    case = mlp_case(True, B=0)
    E, G = case.call()
    assert E.shape == (0, 5) and G.shape == (0, 5, 3)
    meta = [a.to("meta") if isinstance(a, torch.Tensor) else ([t.to("meta") for t in a] if isinstance(a, list) else a)
            for a in mlp_case(True).args]
    E, G = OPS.mlp_energy_grad(*meta)
    assert E.device.type == "meta" and E.shape == (2, 5) and G.shape == (2, 5, 3)


# -- descent -----------------------------------------------------------------------------------------

def event_ok(D):
    """lower, upper, step_clip: 1 or D values of any floating dtype, dense, on the cpu."""
    return lambda t: (t.layout == torch.strided and t.dtype.is_floating_point and t.device.type == "cpu"
                      and t.numel() in (1, D))


def schedule_ok(T):
    """eta, noise_level: [T] of any floating dtype, on the cpu."""
    return lambda t: (t.layout == torch.strided and t.dtype.is_floating_point and t.device.type == "cpu"
                      and tuple(t.shape) == (T,))


def steps_ok(t):
    """eta alone: any number of steps >= 1 (it sets the step count)."""
    return (t.layout == torch.strided and t.dtype.is_floating_point and t.device.type == "cpu" and t.dim() == 1
            and t.numel() >= 1)


def reference_update(y, g, E, active, steps, status, velocity, noise, mask, fixed, lower, upper, step_clip, eta, n,
                     momentum):
    """One update (gd, langevin noise, momentum, box, step clip, mask) by plain torch, for the positive control."""
    y, v = y.clone(), velocity.clone()
    d = -eta * g
    v_new = momentum * v + d
    d = v_new + math.sqrt(2 * eta * n) * noise
    d = torch.maximum(torch.minimum(d, step_clip), -step_clip)
    y_new = torch.minimum(torch.maximum(y + d, lower), upper)
    y_new = torch.where(mask, fixed, y_new)
    move = active.clone()
    y = torch.where(move[:, None], y_new, y)
    v = torch.where(move[:, None], v_new, v)
    return y, v, steps + move.to(steps.dtype)


def update_case(N=7, D=3, dtype=torch.float64):
    gen = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)  # noqa: E731
    y, g, E = r(N, D), r(N, D), r(N)
    active = torch.ones(N, dtype=torch.bool)
    active[2] = False
    steps = torch.zeros(N, dtype=torch.int32)
    status = torch.zeros(N, dtype=torch.int8)
    velocity, noise = r(N, D), r(N, D)
    mask = torch.rand(N, D, generator=gen) < 0.3
    fixed = r(N, D)
    lower, upper, step_clip = torch.full((D,), -1.5, dtype=dtype), torch.full((D,), 1.5, dtype=dtype), \
        torch.full((D,), 0.3, dtype=dtype)
    eta, n, momentum = 0.1, 0.05, 0.5
    want = reference_update(y, g, E, active, steps, status, velocity, noise, mask, fixed, lower, upper, step_clip, eta,
                            n, momentum)
    state = {}

    def op(*args):
        # the op writes its first arguments in place: run it on copies, and keep them for the check
        a = [t.clone() if isinstance(t, torch.Tensor) else t for t in args]
        OPS.descent_update.default(*a)
        state["out"] = a
        return None

    def check(_):
        a = state["out"]
        torch.testing.assert_close(a[0], want[0], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(a[6], want[1], rtol=1e-12, atol=1e-14)
        assert torch.equal(a[4], want[2])

    args = [y, g, E, active, steps, status, velocity, None, noise, mask, fixed, lower, upper, step_clip, eta, n,
            "langevin", 1.0, momentum, None, None, False, 1.0, 0.0, False, True]
    names = ["y", "g", "E", "active", "steps", "status", "velocity", "pending", "noise", "mask", "fixed", "lower",
             "upper", "step_clip"] + ["?"] * 12
    case = Case(op, args, names, check, contiguous={0, 1, 2, 3, 4, 5, 6, 8, 9, 10},
                accepts={11: event_ok(D), 12: event_ok(D), 13: event_ok(D)}, refs={"y"})
    case.raw_op = OPS.descent_update.default
    case.want = want
    return case


def test_descent_update():
    case = update_case()
    positive(case)
    case.op = case.raw_op  # the fuzz calls the op itself (nothing is written before the checks)
    assert fuzz(case) >= 100   # the harness ran (each a refused call)


def test_descent_update_values_and_aliasing():
    case = update_case()
    op = case.raw_op
    a = case.args
    with pytest.raises(ValueError, match="step_clip must be > 0; coordinate 0 has -0.3"):
        op(*case.with_(13, -a[13]))
    with pytest.raises(ValueError, match="lower must be <= upper; coordinate 1"):
        op(*case.with_(11, torch.tensor([-1.0, 2.0, -1.0], dtype=torch.float64)))
    with pytest.raises(ValueError, match="lower must not be NaN"):
        op(*case.with_(11, torch.tensor([float("nan")], dtype=torch.float64)))
    with pytest.raises(ValueError, match="step_clip must be > 0"):
        op(*case.with_(13, torch.zeros(1, dtype=torch.float64)))
    with pytest.raises(ValueError, match="noise_level must be a finite number >= 0"):
        op(*case.with_(15, -0.1))
    with pytest.raises(ValueError, match="eta must be finite"):
        op(*case.with_(14, float("inf")))
    with pytest.raises(ValueError, match="y .*shares memory with g"):
        op(*case.with_(1, a[0]))
    with pytest.raises(ValueError, match="velocity .*shares memory with noise"):
        op(*case.with_(8, a[6]))
    y = a[0].clone()
    before = y._version
    op(*case.with_(0, y))
    assert y._version > before          # in-place writes bump the version counter, as built-in ops do


def mlp_descent_case(dtype=torch.float64, T=3, B=2, K=4, D=3):
    base = mlp_case(True, dtype, B=B, K=K, D=D)
    ctx, y0, w_in, ws, bs, w_out, b_out = base.args[:7]
    gen = torch.Generator().manual_seed(3)
    eta = torch.tensor([0.1, 0.05, 0.02], dtype=torch.float64)
    nl = torch.tensor([0.01, 0.02, 0.0], dtype=torch.float64)
    noise = torch.randn(T, B, K, D, generator=gen, dtype=dtype)
    lower, upper = torch.full((D,), -2.0, dtype=dtype), torch.full((D,), 2.0, dtype=dtype)
    step_clip = torch.full((D,), 0.5, dtype=dtype)
    mask = torch.rand(B, K, D, generator=gen) < 0.2
    # the positive control: T plain steps with the reference energy
    y = y0.clone()
    for k in range(T):
        E, G = ref_mlp.mlp_energy_grad(ctx, y, w_in, ws, bs, w_out, b_out, "tanh", False)
        d = -float(eta[k]) * G + math.sqrt(2 * float(eta[k]) * float(nl[k])) * noise[k]
        d = torch.maximum(torch.minimum(d, step_clip), -step_clip)
        y = torch.where(mask, y0, torch.minimum(torch.maximum(y + d, lower), upper))
        if k == 0:
            E_init = E
    E_final = ref_mlp.mlp_energy(ctx, y, w_in, ws, bs, w_out, b_out, "tanh", False)

    def check(out):
        torch.testing.assert_close(out[0], y, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(out[1], E_final, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(out[2], E_init, rtol=1e-10, atol=1e-12)
        assert (out[3] == T).all() and (out[4] == 0).all()

    args = [ctx, y0, w_in, list(ws), list(bs), w_out, b_out, "tanh", False, eta, nl, noise, lower, upper, step_clip,
            mask, 1.0, 0.0, False, None, None, False, 1.0, 0.0, False, True, "langevin"]
    names = ["ctx", "y0", "w_in", "weights", "biases", "w_out", "b_out", "activation", "residual", "eta",
             "noise_level", "noise", "lower", "upper", "step_clip", "mask"] + ["?"] * 11
    return Case(OPS.mlp_descent.default, args, names, check, numel_only={5, 6}, lists={3: "weights", 4: "biases"},
                accepts={9: schedule_ok(T), 10: schedule_ok(T), 12: event_ok(D), 13: event_ok(D), 14: event_ok(D),
                         11: lambda t: (t.layout == torch.strided and t.dtype.is_floating_point and t.device == y0.device
                                        and t.shape == noise.shape)},  # noise of any float dtype is converted
                refs={"y0", "eta"})


def test_mlp_descent():
    case = mlp_descent_case()
    positive(case)
    assert fuzz(case) >= 120   # the harness ran (each a refused call)


def test_mlp_descent_values():
    case = mlp_descent_case()
    a = case.args
    with pytest.raises(ValueError, match="step_clip must be > 0"):
        case.call(case.with_(14, -a[14]))
    with pytest.raises(ValueError, match="lower must be <= upper"):
        case.call(case.with_(12, a[13] + 1))
    with pytest.raises(ValueError, match=r"noise_level\[1\] must be a finite number >= 0"):
        case.call(case.with_(10, torch.tensor([0.0, -1.0, 0.0], dtype=torch.float64)))
    with pytest.raises(ValueError, match=r"eta\[2\] must be finite"):
        case.call(case.with_(9, torch.tensor([0.1, 0.1, float("nan")], dtype=torch.float64)))
    args = list(a)
    args[17] = 1.0  # momentum
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\)"):
        case.call(args)


def select_case():
    gen = torch.Generator().manual_seed(2)
    y = torch.randn(3, 5, 2, 2, generator=gen)
    E, E0 = torch.randn(3, 5, generator=gen), torch.randn(3, 5, generator=gen)
    status = torch.zeros(3, 5, dtype=torch.int8)
    status[0, E[0].argmin()] = 2
    idx = torch.where(status == 2, float("inf"), E).argmin(1)

    def check(out):
        assert torch.equal(out[2], idx)
        assert torch.equal(out[0], y[torch.arange(3), idx]) and torch.equal(out[1], E[torch.arange(3), idx])

    def y_ok(t):   # any dtype and any trailing shape: [B, K, ...]
        return t.layout == torch.strided and t.device.type == "cpu" and tuple(t.shape[:2]) == (3, 5) and t.dim() >= 2

    return Case(OPS.select_best.default, [y, E, E0, status, "min"], ["y", "E", "E_init", "status", "selection"],
                check, accepts={0: y_ok}, refs={"E"})


def test_select_best():
    case = select_case()
    positive(case)
    assert fuzz(case) >= 35   # the harness ran (each a refused call)


def test_dispatch_floor():
    case = Case(OPS.dispatch_floor.default, [torch.randn(3)], ["x"], lambda out: out.shape == (0,))
    positive(case)
    with pytest.raises(NotImplementedError):
        case.call([torch.randn(3).to_sparse()])


# -- EBT-Policy --------------------------------------------------------------------------------------

def policy(dtype=torch.float64, layers=1, B=2):
    from pyebm.models import EBTPolicy

    torch.manual_seed(0)
    m = EBTPolicy(3, horizon=4, embed_dim=12, layers=layers, heads=3, n_obs_steps=2, cond_dim=6, dtype=dtype)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
    obs = torch.randn(B, 2, 6, dtype=dtype)
    with torch.no_grad():
        ctx = m.prepare(obs)
    return m, obs, ctx


def ebt_case(need_grad=True, with_t=True, dtype=torch.float64, B=2, K=3):
    m, obs, ctx = policy(dtype, B=B)
    params = eop.param_list(m)
    wt = eop.transposed_weights(params) if with_t else []
    y = torch.randn(B, K, 4, 3, dtype=dtype)
    with torch.enable_grad():
        yy = y.clone().requires_grad_()
        E_ref = ref_policy.op_energy(yy, ctx.k, ctx.v, ctx.bias, params, 3)
        (G_ref,) = torch.autograd.grad(E_ref.sum(), yy)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-5)

    def check(out):
        torch.testing.assert_close(out[0], E_ref.detach(), **tol)
        if need_grad:
            torch.testing.assert_close(out[1], G_ref, **tol)
        else:
            assert out[1].shape == (0,)

    args = [y, ctx.k, ctx.v, ctx.bias, params, wt, 3, 1e-6, 1e-5, need_grad]
    names = ["y", "ctx_k", "ctx_v", "bias", "params", "weights_t", "heads", "rms_eps", "ln_eps", "need_grad"]
    head_fc2 = f"params[{len(params) - 2}]"
    return Case(OPS.ebt_policy_energy_grad.default, args, names, check, lists={4: "params"},
                refs={"y", "ctx_k", "params[0]", head_fc2}), m, obs


@pytest.mark.parametrize("need_grad,with_t", [(True, True), (False, False)])
def test_ebt_policy_energy_grad(need_grad, with_t):
    case, _, _ = ebt_case(need_grad, with_t)
    positive(case)
    assert fuzz(case) >= 300   # the harness ran (each a refused call)


def test_ebt_policy_energy_grad_known_holes():
    """Every parameter's shape is checked: the embedding's parameters 1-5, the head's norm weight, fc1 weight
    and bias and fc2 bias included; a 1-element view of a larger buffer or torch.zeros(1) is refused."""
    case, _, _ = ebt_case()
    params = case.args[4]
    layers = (len(params) - 12) // 17
    head = 7 + 17 * layers
    for i in [1, 2, 3, 4, 5, head, head + 1, head + 2, head + 4]:
        for bad in (big(torch.float64)[:1], torch.zeros(1, dtype=torch.float64), params[i].reshape(-1)[:-1]):
            if bad.shape == params[i].shape:
                continue
            with pytest.raises(ValueError, match=rf"params\[{i}\] \(\S+\) must have shape"):
                case.call(case.with_((4, i), bad))
    with pytest.raises(ValueError, match=r"head\.fc2\.weight\) must be \[O, D = 12\]"):
        case.call(case.with_((4, head + 3), torch.zeros(1, dtype=torch.float64)))
    with pytest.raises(ValueError, match=r"ctx_k must be \[layers=1, B=2, H=3, hd=4, L\]"):
        case.call(case.with_(1, case.args[1][..., :0]))


def test_ebt_policy_context():
    m, obs, _ = policy()
    w, b, kn = m._kv_stack()
    kr, vr = ref_policy.op_context(obs, w, b, kn, 3, 1e-6)

    def check(out):
        torch.testing.assert_close(out[0], kr, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(out[1], vr, rtol=1e-10, atol=1e-12)

    # k_norm [layers, hd] sets both dims; only their product meets w's rows, so a transposed k_norm is consistent
    kn_ok = lambda t: (t.layout == torch.strided and t.dtype == kn.dtype and t.device == kn.device  # noqa: E731
                       and t.dim() == 2 and t.numel() == kn.numel())
    case = Case(OPS.ebt_policy_context.default, [obs, w.detach(), b.detach(), kn.detach(), 3, 1e-6],
                ["obs", "w", "b", "k_norm", "heads", "rms_eps"], check, refs={"obs", "k_norm"}, accepts={3: kn_ok})
    positive(case)
    assert fuzz(case) >= 35   # the harness ran (each a refused call)


def ebt_descent_case():
    case, m, obs = ebt_case(with_t=True)
    y0, ck, cv, bias, params, wt = case.args[:6]
    eta = torch.tensor([0.2, 0.1], dtype=torch.float64)
    D = 4 * 3
    lower, upper = torch.full((D,), -1.0, dtype=torch.float64), torch.full((D,), 1.0, dtype=torch.float64)
    step_clip = torch.full((D,), 0.1, dtype=torch.float64)
    y = y0.clone()
    for k in range(2):
        with torch.enable_grad():
            yy = y.clone().requires_grad_()
            E = ref_policy.op_energy(yy, ck, cv, bias, params, 3)
            (G,) = torch.autograd.grad(E.sum(), yy)
        if k == 0:
            E_init = E.detach()
        d = (-float(eta[k]) * G).reshape(2, 3, D).clamp(-0.1, 0.1)
        y = (y.reshape(2, 3, D) + d).clamp(-1.0, 1.0).reshape(y0.shape)
    E_final = ref_policy.op_energy(y, ck, cv, bias, params, 3)

    def check(out):
        torch.testing.assert_close(out[0], y, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(out[1], E_final, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(out[2], E_init, rtol=1e-10, atol=1e-12)
        assert (out[3] == 2).all() and (out[4] == 0).all()

    args = [y0, ck, cv, bias, params, wt, 3, 1e-6, 1e-5, eta, lower, upper, step_clip, "none", 1e-8, 1.0, 0.0,
            False, None, None, False, 1.0, 0.0, "candidate", False, True, True]
    names = ["y0", "ctx_k", "ctx_v", "bias", "params", "weights_t", "heads", "rms_eps", "ln_eps", "eta", "lower",
             "upper", "step_clip"] + ["?"] * 14
    return Case(OPS.ebt_policy_descent.default, args, names, check, lists={4: "params", 5: "weights_t"},
                accepts={9: steps_ok, 10: event_ok(D), 11: event_ok(D), 12: event_ok(D)},
                refs={"y0", "ctx_k", "params[0]", f"params[{len(params) - 2}]"})


def test_ebt_policy_descent():
    case = ebt_descent_case()
    positive(case)
    assert fuzz(case) >= 400   # the harness ran (each a refused call)
    with pytest.raises(ValueError, match="step_clip must be > 0"):
        case.call(case.with_(12, -case.args[12]))
    with pytest.raises(ValueError, match="lower must be <= upper"):
        case.call(case.with_(10, case.args[11] + 0.5))


# -- autograd ----------------------------------------------------------------------------------------

def test_mlp_ops_opcheck_and_gradcheck_on_parameters():
    """On the module's own Parameters (requires_grad=True) the ops record a real formula: opcheck passes, and
    gradcheck / gradgradcheck agree in float64 (the gradient G is differentiable too)."""
    m = pyebm.MLPEnergy(4, 3, hidden=(6, 5), activation="silu").double()
    ctx = m.prepare(torch.randn(2, 4, dtype=torch.float64))
    y = torch.randn(2, 3, 3, dtype=torch.float64, requires_grad=True)
    w_in, ws, bs, w_out, b_out = m.op_params()
    assert all(isinstance(p, torch.nn.Parameter) for p in (w_in, *ws, *bs))
    args = (ctx, y, w_in, list(ws), list(bs), w_out, b_out, "silu", False)
    for op in (OPS.mlp_energy_grad.default, OPS.mlp_energy.default):
        torch.library.opcheck(op, args)
    E, G = OPS.mlp_energy_grad(*args)
    (G.square().sum() + E.sum()).backward()
    # every parameter the op reads gets its gradient (x_proj and the first bias enter through ctx, detached)
    for name, p in m.named_parameters():
        if name not in ("x_proj.weight", "y_proj.bias"):
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name

    def f(c, yy, wi, w0, b0, wo, bo):
        return OPS.mlp_energy_grad(c, yy, wi, [w0], [b0], wo, bo, "silu", True)

    inputs = [torch.randn(2, 5, dtype=torch.float64), torch.randn(2, 3, 3, dtype=torch.float64),
              torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 5, dtype=torch.float64),
              torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64),
              torch.randn(1, dtype=torch.float64)]
    inputs = [t.requires_grad_() for t in inputs]
    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


def test_ebt_policy_energy_grad_autograd():
    case, m, _ = ebt_case(with_t=False, B=1, K=2)
    y, ck, cv, bias = case.args[:4]
    bias = torch.where(torch.isfinite(bias), bias, torch.full_like(bias, -20.0))   # finite: for finite differences
    params = [p.clone().requires_grad_() for p in case.args[4]]
    args = (y.clone().requires_grad_(), ck.clone().requires_grad_(), cv.clone().requires_grad_(),
            bias.clone().requires_grad_(), params, [], 3, 1e-6, 1e-5, True)
    torch.library.opcheck(OPS.ebt_policy_energy_grad.default, args)

    def f(yy, v, p_head):
        ps = case.args[4][:-1] + [p_head]
        return OPS.ebt_policy_energy_grad(yy, ck, v, bias, ps, [], 3, 1e-6, 1e-5, True)

    inputs = [t.detach().clone().requires_grad_() for t in (y, cv, case.args[4][-1])]
    assert torch.autograd.gradcheck(f, inputs)
    # weights_t are copies for speed: they must not require grad
    wt = [t.clone().requires_grad_() for t in eop.transposed_weights(case.args[4])]
    with pytest.raises(RuntimeError, match="weights_t .* must not require grad"):
        OPS.ebt_policy_energy_grad(y, ck, cv, bias, case.args[4], wt, 3, 1e-6, 1e-5, True)
    with torch.no_grad():
        OPS.ebt_policy_energy_grad(y, ck, cv, bias, case.args[4], wt, 3, 1e-6, 1e-5, True)


@pytest.mark.parametrize("make", [mlp_descent_case, update_case, select_case, ebt_descent_case])
def test_inference_ops_refuse_grad(make):
    case = make()
    op = getattr(case, "raw_op", case.op)
    slot = next(iter(case.slots))
    t = case.get(slot).clone().requires_grad_()
    args = case.with_(slot, t)
    with pytest.raises(RuntimeError, match="is an inference op .* requires grad. Call it under torch.no_grad"):
        op(*args)
    with torch.no_grad():
        op(*[a.clone() if isinstance(a, torch.Tensor) else a for a in args])


def test_context_op_refuses_grad():
    m, obs, _ = policy()
    w, b, kn = [t.detach().clone() for t in m._kv_stack()]
    w.requires_grad_()
    with pytest.raises(RuntimeError, match="ebt_policy_context is an inference op .*'w' requires grad"):
        OPS.ebt_policy_context(obs, w, b, kn, 3, 1e-6)
    with torch.no_grad():
        OPS.ebt_policy_context(obs, w, b, kn, 3, 1e-6)


@pytest.mark.parametrize("make", [mlp_descent_case, select_case, ebt_descent_case])
def test_inference_ops_opcheck(make):
    case = make()
    torch.library.opcheck(case.op, tuple(case.args), test_utils=("test_schema", "test_faketensor",
                                                                 "test_aot_dispatch_dynamic"))


def test_descent_update_opcheck():
    case = update_case()
    args = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in case.args)
    torch.library.opcheck(case.raw_op, args, test_utils=("test_schema", "test_faketensor"))


def test_context_opcheck():
    m, obs, _ = policy()
    w, b, kn = [t.detach() for t in m._kv_stack()]
    torch.library.opcheck(OPS.ebt_policy_context.default, (obs, w, b, kn, 3, 1e-6))


# -- the Triton custom ops (their Python checks; the interpreter runs them on CPU tensors) -------------

def _triton_usable():
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return pyebm.backends()["triton"]


needs_triton = pytest.mark.skipif(not _triton_usable(), reason="triton backend not usable here")


@needs_triton
def test_triton_mlp_energy_ops():
    for grad in (True, False):
        case = mlp_case(grad)
        case.op = OPS.mlp_energy_grad_triton.default if grad else OPS.mlp_energy_triton.default
        case.call()  # positive control
        case.check(case.call())
        assert fuzz(case) >= 70   # the harness ran (each a refused call)


@needs_triton
def test_triton_mlp_energy_autograd():
    """The Triton ops carry the formula of pyebm::mlp_energy_grad (float32: compared with the reference's
    autograd, not by finite differences)."""
    case = mlp_case(True)
    ctx, y, w_in, ws, bs, w_out, b_out = [t.clone().requires_grad_() if isinstance(t, torch.Tensor) else
                                         [u.clone().requires_grad_() for u in t] for t in case.args[:7]]
    E, G = OPS.mlp_energy_grad_triton(ctx, y, w_in, ws, bs, w_out, b_out, "tanh", False)
    g = torch.autograd.grad(E.sum() + G.square().sum(), [ctx, y, w_in, w_out, *ws])
    Er = ref_mlp.mlp_energy(ctx, y, w_in, ws, bs, w_out, b_out, "tanh", False)
    (Gr,) = torch.autograd.grad(Er.sum(), y, create_graph=True)
    gr = torch.autograd.grad(Er.sum() + Gr.square().sum(), [ctx, y, w_in, w_out, *ws])
    for a, b in zip(g, gr):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@needs_triton
def test_triton_descent_ops():
    case = update_case(dtype=torch.float32)
    case.op = case.raw_op = OPS.descent_update_triton.default
    case.contiguous = set()
    a = [t.clone() if isinstance(t, torch.Tensor) else t for t in case.args]
    case.op(*a)                                            # positive control
    torch.testing.assert_close(a[0], case.want[0], rtol=1e-5, atol=1e-6)
    assert torch.equal(a[4], case.want[2])
    assert fuzz(case) >= 100   # the harness ran (each a refused call)
    with pytest.raises(ValueError, match="step_clip must be > 0"):
        case.op(*case.with_(13, -case.args[13]))
    with pytest.raises(ValueError, match="lower must be <= upper"):
        case.op(*case.with_(11, case.args[12] + 1))

    base = mlp_descent_case(dtype=torch.float32)
    ctx, y0, w_in, ws, bs, w_out, b_out = base.args[:7]
    eta, nl, lower, upper, step_clip, mask = base.args[9], base.args[10], *base.args[12:16]
    args = [ctx, y0, w_in, ws, bs, w_out, b_out, "tanh", False, eta, nl, lower, upper, step_clip, mask, 1.0, 0.0,
            False, None, None, False, 1.0, 0.0, False, True, "none", 7]
    names = ["ctx", "y0", "w_in", "weights", "biases", "w_out", "b_out", "activation", "residual", "eta",
             "noise_level", "lower", "upper", "step_clip", "mask"] + ["?"] * 12
    D = y0.shape[-1]
    loop = Case(OPS.mlp_descent_triton.default, args, names, lambda out: None, numel_only={5, 6},
                lists={3: "weights", 4: "biases"}, refs={"y0", "eta"},
                accepts={9: schedule_ok(3), 10: schedule_ok(3), 11: event_ok(D), 12: event_ok(D), 13: event_ok(D)})
    out = loop.call()
    assert out[0].shape == y0.shape and torch.isfinite(out[1]).all()
    assert fuzz(loop) >= 100   # the harness ran (each a refused call)
    with pytest.raises(ValueError, match="step_clip must be > 0"):
        loop.call(loop.with_(13, -step_clip))


@needs_triton
def test_triton_ebt_ops():
    gen = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    q, kc, vc = r(2, 3, 4, 8), r(2, 3, 5, 8), r(2, 3, 5, 8)
    nv = torch.tensor([1, 2, 3, 5], dtype=torch.int32)
    cases = [
        (OPS.ebt_attention_fwd.default, [q, kc, vc, None, None, nv], ["q", "k_ctx", "v_ctx", "k_self", "v_self",
                                                                     "n_visible"]),
        (OPS.ebt_rms_norm_fwd.default, [r(3, 8), r(8), 1e-5], ["x", "weight", "eps"]),
        (OPS.ebt_swiglu_fwd.default, [r(3, 8), r(3, 8)], ["a", "b"]),
        (OPS.ebt_vocab_embed.default, [r(2, 3, 10), r(6, 10), True], ["y", "w", "softmax"]),
        (OPS.ebt_vocab_grad.default, [r(2, 3, 6), r(6, 10)], ["ge", "w"]),
        (OPS.ebt_policy_self_attn_triton.default, [r(2, 4, 24), r(4), r(4), 2, 1e-6], ["qkv", "q_weight", "k_weight",
                                                                                       "heads", "eps"]),
        (OPS.ebt_policy_cross_attn_triton.default, [q, r(8), kc, vc, nv, 1e-6], ["q", "q_weight", "k_ctx", "v_ctx",
                                                                                 "n_visible", "eps"]),
        (OPS.ebt_policy_rms_norm_triton.default, [r(3, 8), r(8), 1e-6], ["x", "weight", "eps"]),
        (OPS.ebt_policy_gelu_tanh_triton.default, [r(3, 8)], ["x"]),
    ]
    def nv_ok(t):   # [R] or [B, R] integers
        return t.layout == torch.strided and t.dtype in (torch.int32, torch.int64) and tuple(t.shape) in ((4,), (2, 4))

    def rows_ok(ref, any_shape=False):   # x [..., D]: any leading dims (an elementwise op of one tensor: any shape,
        # and on the meta device it is just a meta call)
        return lambda t: (t.layout == torch.strided and t.dtype == ref.dtype
                          and (any_shape or (t.dim() >= 1 and t.shape[-1] == ref.shape[-1] and t.device == ref.device)))

    rowwise = ("ebt_rms_norm_fwd", "ebt_vocab_embed", "ebt_vocab_grad", "ebt_policy_rms_norm_triton")
    for op, args, names in cases:
        accepts = {names.index("n_visible"): nv_ok} if "n_visible" in names else {}
        opname = op.name().split("::")[1].split(".")[0]
        if opname in rowwise:
            accepts[0] = rows_ok(args[0])
        if opname == "ebt_vocab_grad":      # w [D, V]: V is free (it is the output's width)
            w = args[1]
            accepts[1] = lambda t, w=w: (t.layout == torch.strided and t.dtype == w.dtype and t.device == w.device
                                         and t.dim() == 2 and t.shape[0] == w.shape[0])
        if opname == "ebt_policy_gelu_tanh_triton":
            accepts[0] = rows_ok(args[0], any_shape=True)
        case = Case(op, args, names, lambda out: None, refs={names[0], "w"}, accepts=accepts)
        out = case.call()                          # positive control
        assert all(torch.isfinite(o).all() for o in ([out] if isinstance(out, torch.Tensor) else out) if o.numel())
        assert fuzz(case) >= 3, op
    o, lse = OPS.ebt_attention_fwd(q, kc, vc, None, None, nv)
    bwd = Case(OPS.ebt_attention_bwd.default, [o.clone(), q, kc, vc, o, lse, None, None, nv],
               ["do", "q", "k_ctx", "v_ctx", "o", "lse", "k_self", "v_self", "n_visible"], lambda out: None,
               refs={"q"}, accepts={8: nv_ok})
    bwd.call()
    assert fuzz(bwd) >= 40   # the harness ran (each a refused call)


def test_pure_python_ops_check_and_differentiate():
    """Without pyebm._C the MLP-energy ops (pyebm.ops._fallback, the reference as implementation) keep the
    contract: the same checks in the op and its fake, the same autograd formula."""
    import os
    import subprocess
    import sys

    code = r'''
import torch, pyebm
from torch._subclasses.fake_tensor import FakeTensorMode
assert not pyebm.backends()["cpu"]
m = pyebm.MLPEnergy(3, 2, hidden=(5, 4)).double()
ctx = m.prepare(torch.randn(2, 3, dtype=torch.float64))
y = torch.randn(2, 4, 2, dtype=torch.float64, requires_grad=True)
w_in, ws, bs, w_out, b_out = m.op_params()
op = torch.ops.pyebm.mlp_energy_grad.default
for bad in (torch.randn(100, dtype=torch.float64)[:1], w_out.float(), w_out.to("meta")):
    for fake in (False, True):
        args = [ctx, y.detach(), w_in.detach(), [w.detach() for w in ws], [b.detach() for b in bs], bad,
                b_out.detach(), "silu", False]
        try:
            if fake:
                mode = FakeTensorMode()
                with mode:
                    op(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else
                         ([mode.from_tensor(t) for t in a] if isinstance(a, list) else a) for a in args])
            else:
                op(*args)
        except (ValueError, TypeError) as e:
            assert "w_out" in str(e), e
        else:
            raise AssertionError(f"accepted {bad.shape} {bad.dtype} {bad.device} (fake={fake})")
torch.library.opcheck(op, (ctx, y, w_in, list(ws), list(bs), w_out, b_out, "silu", False))
try:
    with torch.enable_grad():
        torch.ops.pyebm.dispatch_floor(torch.randn(3, requires_grad=True))
except RuntimeError as e:
    assert "inference op" in str(e)
else:
    raise AssertionError("dispatch_floor took an input that requires grad")
print("ok")
'''
    env = dict(os.environ, PYEBM_DISABLE_EXT="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]
