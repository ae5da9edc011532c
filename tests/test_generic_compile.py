"""The compiled path for plain nn.Module energies (pyebm._compiled): results equal the eager autograd path
(backend="torch": the update as plain torch ops) within fp32 tolerance; weight changes after a compile are
seen; the module still copies, pickles and is freed; explain reports the path; compile=False / the automatic
rule choose the eager path. Each compile costs seconds on CPU: shapes are tiny and tests share entries."""
import copy
import gc
import math
import pickle
import weakref

import pytest
import torch
from torch import nn

import pyebm
from pyebm import _compiled

if _compiled.compiler_refusal(torch.device("cpu")) is not None:  # pragma: no cover
    pytest.skip(_compiled.compiler_refusal(torch.device("cpu")), allow_module_level=True)

B, K, CDIM = 2, 3, 3


class ConvEnergy(nn.Module):
    """A small conv energy on [1, 4, 4] images with a context embedding."""

    def __init__(self, c=4):
        super().__init__()
        self.c1 = nn.Conv2d(1, c, 3, padding=1)
        self.c2 = nn.Conv2d(c, c, 3, padding=1, stride=2)
        self.ctx = nn.Linear(CDIM, c)
        self.head = nn.Linear(c * 4, 1)
        self.prior = 0.5  # a plain Python attribute the forward reads

    def forward(self, x, y):
        b, k = y.shape[:2]
        h = torch.nn.functional.silu(self.c1(y.reshape(b * k, *y.shape[2:])))
        h = h + self.ctx(x).repeat_interleave(k, 0)[:, :, None, None]
        h = torch.nn.functional.silu(self.c2(h))
        return self.head(h.flatten(1)).view(b, k) + self.prior * y.flatten(2).square().sum(-1)


class ResMLP(nn.Module):
    """Residual blocks with LayerNorm (not an MLPEnergy)."""

    def __init__(self, d=5, width=8, blocks=2):
        super().__init__()
        self.inp = nn.Linear(d + CDIM, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU(),
                                                  nn.Linear(width, width)) for _ in range(blocks))
        self.out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 1))

    def forward(self, x, y):
        b, k = y.shape[:2]
        h = self.inp(torch.cat([x[:, None].expand(b, k, -1), y], -1))
        for block in self.blocks:
            h = h + block(h)
        return self.out(h).squeeze(-1) + 0.5 * y.square().sum(-1)


FIELDS = ("y", "energy", "initial_energy", "best", "best_energy", "best_index", "steps", "status")


def assert_same(got, want, atol=1e-5):
    for name in FIELDS:
        a, b = getattr(got, name), getattr(want, name)
        assert a.shape == b.shape and a.dtype == b.dtype, name
        if a.dtype.is_floating_point:
            torch.testing.assert_close(a, b, atol=atol, rtol=1e-5, msg=name)
        else:
            assert torch.equal(a, b), name


def run_both(f, x, y0, cfg, **kw):
    got = pyebm.minimize(f, x, K, cfg, init=y0, compile=True, **kw)
    want = pyebm.minimize(f, x, K, cfg, init=y0, compile=False, backend="torch", **kw)
    return got, want


@pytest.fixture(scope="module")
def conv():
    torch.manual_seed(0)
    return ConvEnergy(), torch.randn(B, CDIM), torch.randn(B, K, 1, 4, 4)


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(1)
    return ResMLP(), torch.randn(B, CDIM), torch.randn(B, K, 5)


CFG = pyebm.Descent(steps=3, step_size=0.05)


def test_conv_energy_matches_eager(conv):
    f, x, y0 = conv
    got, want = run_both(f, x, y0, CFG)
    assert_same(got, want)
    assert not torch.equal(got.y, y0)  # it moved
    assert pyebm.explain(f, x, CFG, K, init=y0).path == "compiled"  # cached now: the automatic rule reuses it


def test_resmlp_matches_eager_with_options(mlp):
    f, x, y0 = mlp
    cfg = pyebm.Descent(steps=3, step_size=0.1, momentum=0.5, grad_clip=2.0, lower=-1.5, upper=1.5,
                        tol=0.5, check_every=1, selection="max_gap")
    got, want = run_both(f, x, y0, cfg)
    assert_same(got, want)


def test_noise_from_the_generator_matches_eager(mlp):
    """Noise drawn step by step from the generator, as the eager path draws it."""
    f, x, y0 = mlp
    cfg = pyebm.Descent(steps=2, step_size=0.05, noise="langevin", noise_scale=0.1)
    got = pyebm.minimize(f, x, K, cfg, init=y0, compile=True, generator=7)
    want = pyebm.minimize(f, x, K, cfg, init=y0, compile=False, backend="torch", generator=7)
    assert_same(got, want)


def test_energy_matching_heun_with_a_noise_ramp_matches_eager(mlp):
    """Heun on the Stratonovich form with Energy Matching's eps(t) ramp over three chunks of one graph: the
    noise factors of each step are an argument of the chunk, not baked into it."""
    f, x, y0 = mlp
    cfg = pyebm.Descent.energy_matching(steps=12, dt=0.05, epsilon_max=0.2, tau_star=0.3, lower=-2.0, upper=2.0)
    assert cfg.integrator == "heun" and _compiled.scaled_noise(cfg)
    got = pyebm.minimize(f, x, K, cfg, init=y0, compile=True, generator=3)
    want = pyebm.minimize(f, x, K, cfg, init=y0, compile=False, backend="torch", generator=3)
    assert_same(got, want)
    key = _compiled.signature(f, cfg, x, B, K, (5,), torch.device("cpu"), torch.float32, False)
    st = _compiled.stats(f)[key]
    assert _compiled.chunk_limit(cfg) == 5 and _compiled.chunk_lengths(12, 5) == [4, 4, 4]
    assert st.chunks == (4,) and st.compiles == 2  # one 4-step chunk for all three, and the final energy
    assert not torch.equal(got.y, pyebm.minimize(f, x, K, cfg.replace(noise="none"), init=y0, compile=True).y)


@pytest.mark.parametrize("noise", ["langevin", "pre", "step", "additive"])
def test_noise_schedules_over_several_chunks_match_eager(mlp, noise):
    """Euler with a decaying noise schedule over 12 steps (two chunks of one graph), each noise mode."""
    f, x, y0 = mlp
    cfg = pyebm.Descent(steps=12, step_size=0.05, noise=noise, noise_scale=0.2, noise_schedule="polynomial",
                        noise_scale_end=0.01)
    assert _compiled.config_refusal(cfg, False) is None
    got = pyebm.minimize(f, x, K, cfg, init=y0, compile=True, generator=5)
    want = pyebm.minimize(f, x, K, cfg, init=y0, compile=False, backend="torch", generator=5)
    assert_same(got, want)


def test_noise_scales_are_the_eager_factors():
    cfg = pyebm.Descent.energy_matching(steps=8, dt=0.1, epsilon_max=0.5, tau_star=0.25)
    sc = _compiled.noise_scales(cfg, 2, 4, torch.device("cpu"), torch.float64)
    for i, k in enumerate(range(2, 6)):
        s0 = math.sqrt(2 * 0.1 * cfg.noise_level_at(k))
        s1 = math.sqrt(2 * 0.1 * cfg.noise_level_at(k + 1))
        assert sc[i].tolist() == pytest.approx([s0, 0.5 * (s0 + s1)], rel=1e-15)
    pre = pyebm.Descent(steps=4, noise="pre", noise_scale=0.3, noise_schedule="polynomial", noise_scale_end=0.1)
    assert _compiled.noise_scales(pre, 0, 4, torch.device("cpu"), torch.float64)[:, 0].tolist() == \
        pytest.approx([pre.noise_level_at(k) for k in range(4)], rel=1e-15)
    step = pyebm.Descent(steps=4, step_size=0.2, noise="step", noise_scale=0.3)
    assert _compiled.noise_scales(step, 0, 1, torch.device("cpu"), torch.float64)[0].tolist() == \
        pytest.approx([-0.06, -0.06], rel=1e-15)


def test_chunks_of_a_longer_loop(conv):
    """More steps than one chunk: 12 = 2 x 6 (one compile), the host loop over chunks."""
    f, x, y0 = conv
    assert _compiled.chunk_lengths(12) == [6, 6]
    assert _compiled.chunk_lengths(23) == [10, 10, 3]
    assert _compiled.chunk_lengths(50) == [10] * 5
    cfg = CFG.replace(steps=12)
    got, want = run_both(f, x, y0, cfg)
    assert_same(got, want)


def test_weight_changes_are_seen(conv):
    f, x, y0 = conv
    f = copy.deepcopy(f)  # its own entry; the fixture's module stays as it was
    first = pyebm.minimize(f, x, K, CFG, init=y0, compile=True)
    with torch.no_grad():
        f.c1.weight.mul_(1.5)  # in place (what an optimizer step does)
    got, want = run_both(f, x, y0, CFG)
    assert_same(got, want)
    assert not torch.allclose(got.y, first.y)
    f.c2.weight.data = torch.randn_like(f.c2.weight)  # .data swap: new storage, same Parameter
    got, want = run_both(f, x, y0, CFG)
    assert_same(got, want)
    other = ConvEnergy()
    f.load_state_dict(other.state_dict())
    got, want = run_both(f, x, y0, CFG)
    assert_same(got, want)
    opt = torch.optim.SGD(f.parameters(), lr=0.5)
    f(x, y0).sum().backward()
    opt.step()
    got, want = run_both(f, x, y0, CFG)
    assert_same(got, want)
    assert len(_compiled.stats(f)) == 1  # one entry served every call: nothing recompiled per weight change
    f.prior = 0.8  # a Python attribute: dynamo's guards recompile the entry's chunk
    got, want = run_both(f, x, y0, CFG)
    assert_same(got, want)


def test_copies_pickles_and_frees_the_module(conv):
    f, x, y0 = conv
    g = copy.deepcopy(f)
    pyebm.minimize(g, x, K, CFG, init=y0, compile=True)
    h = copy.deepcopy(g)
    clone = pickle.loads(pickle.dumps(g))
    assert not any("compiled" in str(k).lower() for k in vars(g))  # nothing stored on the module
    for m in (h, clone):
        for p, q in zip(m.parameters(), f.parameters()):
            assert torch.equal(p, q)
    got = pyebm.minimize(clone, x, K, CFG, init=y0, compile=False, backend="torch")
    assert_same(pyebm.minimize(g, x, K, CFG, init=y0, compile=True), got)
    ref = weakref.ref(g)
    del g
    gc.collect()
    assert ref() is None  # the cache holds the module weakly


def test_explain_and_the_switch(mlp):
    f, x, y0 = mlp
    f = copy.deepcopy(f)  # no entry yet
    cfg = pyebm.Descent(steps=4, step_size=0.05)
    e = pyebm.explain(f, x, cfg, K, init=y0, compile=True)
    assert e.path == "compiled" and "not compiled yet" in e.parts["compiled"]
    e = pyebm.explain(f, x, cfg, K, init=y0, compile=False)
    assert e.path == "autograd" and e.refused["compiled"] == "compile=False"
    # the automatic rule: eager until the same shapes ran AUTO_AFTER_CALLS times, then compiled
    for i in range(_compiled.AUTO_AFTER_CALLS):
        e = pyebm.explain(f, x, cfg, K, init=y0)
        assert e.path == "autograd" and f"{i} of {_compiled.AUTO_AFTER_CALLS}" in e.refused["compiled"]
        pyebm.minimize(f, x, K, cfg, init=y0)
    assert pyebm.explain(f, x, cfg, K, init=y0).path == "compiled"
    # compile=False still forces the eager path, and short loops are not compiled automatically
    assert pyebm.explain(f, x, cfg, K, init=y0, compile=False).path == "autograd"
    short = pyebm.explain(f, x, pyebm.Descent(steps=2), K, init=y0)
    assert short.path == "autograd" and "steps" in short.refused["compiled"]
    # the compiling call, then PAY_CALLS timed ones: the verdict against the eager calls counted above
    for _ in range(_compiled.PAY_CALLS + 1):
        pyebm.minimize(f, x, K, cfg, init=y0)
    (st,) = _compiled.stats(f).values()
    assert st.pays is not None and st.calls == _compiled.PAY_CALLS + 1
    assert st.pays == (st.seconds_per_call < st.eager_seconds_per_call)
    e = pyebm.explain(f, x, cfg, K, init=y0)
    assert e.path == ("compiled" if st.pays else "autograd")
    assert ("compiling pays" if st.pays else "compiling does not pay") in (e.parts.get("compiled") or
                                                                         e.refused["compiled"])


@pytest.mark.parametrize("compiled_ms,pays", [(2.0, False), (0.5, True)])
def test_the_automatic_rule_falls_back_when_compiling_does_not_pay(mlp, compiled_ms, pays):
    """The verdict from the measured times (injected here): compiled calls no faster than the eager ones send
    the automatic rule back to the eager path; compile=True still forces the compiled one."""
    f, x, y0 = mlp
    f = copy.deepcopy(f)
    cfg = pyebm.Descent(steps=5, step_size=0.05)
    key = _compiled.signature(f, cfg, x, B, K, (5,), torch.device("cpu"), torch.float32, False)
    for ms in (3.0, 1.0, 1.2):  # the fastest eager call counts: 1 ms
        _compiled.note_call(f, key, ms * 1e-3)
    _compiled.entry(f, key).stats.compiles = 2  # compiled (as far as the rule is concerned): the cost is paid
    assert pyebm.explain(f, x, cfg, K, init=y0).path == "compiled"  # no verdict yet
    for i in range(_compiled.PAY_CALLS):
        _compiled.note_compiled_call(f, key, (compiled_ms + i) * 1e-3)
    _compiled.note_compiled_call(f, key, 1e-6)  # after the verdict: not taken into account
    (st,) = _compiled.stats(f).values()
    assert (st.pays, st.seconds_per_call, st.eager_seconds_per_call) == (pays, compiled_ms * 1e-3, 1e-3)
    e = pyebm.explain(f, x, cfg, K, init=y0)
    if pays:
        assert e.path == "compiled" and "compiling pays" in e.parts["compiled"]
    else:
        assert e.path == "autograd"
        assert e.refused["compiled"].startswith("compiling does not pay for these shapes and options: 2 ms per "
                                                "call compiled against 1 ms eager")
    assert pyebm.explain(f, x, cfg, K, init=y0, compile=True).path == "compiled"
    _compiled.clear(f)
    assert _compiled.stats(f) == {} and _compiled.calls_seen(f, key) == 0


def test_no_verdict_without_eager_calls(mlp):
    f, x, y0 = mlp
    f = copy.deepcopy(f)
    cfg = pyebm.Descent(steps=5, step_size=0.05)
    key = _compiled.signature(f, cfg, x, B, K, (5,), torch.device("cpu"), torch.float32, False)
    _compiled.entry(f, key)
    for _ in range(_compiled.PAY_CALLS):
        _compiled.note_compiled_call(f, key, 5e-3)
    (st,) = _compiled.stats(f).values()
    assert st.pays is None and st.seconds_per_call == 5e-3 and st.eager_seconds_per_call is None
    assert pyebm.explain(f, x, cfg, K, init=y0).path == "compiled"


def test_refusals_and_errors(mlp):
    f, x, y0 = mlp
    e = pyebm.explain(f, x, pyebm.Descent(steps=4, accept_if_lower=True), K, init=y0)
    assert e.refused["compiled"] == "accept_if_lower"
    e = pyebm.explain(lambda x, y: y.square().sum(-1), x, pyebm.Descent(steps=4), K, init=y0)
    assert "not an nn.Module" in e.refused["compiled"]
    e = pyebm.explain(pyebm.MLPEnergy(CDIM, 5, hidden=(8,)), x, pyebm.Descent(steps=4), K, init=y0,
                      whole_loop=False)
    assert "own energy_and_grad" in e.refused["compiled"]
    with pytest.raises(ValueError, match="compile=True but"):
        pyebm.minimize(f, x, K, pyebm.Descent(steps=3, accept_if_lower=True), init=y0, compile=True)
    # a step schedule over more than one chunk would bake its values into each chunk
    e = pyebm.explain(f, x, pyebm.Descent(steps=12, step_schedule="cosine", step_size_end=0.01), K, init=y0,
                      compile=None)
    assert e.refused["compiled"].startswith("a step-size schedule") and "over more than 10 steps" in \
        e.refused["compiled"]
    # a noise schedule with energy-scaled steps: the noise factor depends on each row's step, not passed in
    e = pyebm.explain(f, x, pyebm.Descent(steps=12, step_schedule="energy", noise="langevin", noise_scale=0.1,
                                          noise_schedule="cosine", noise_scale_end=0.01), K, init=y0, compile=None)
    assert "over more than 10 steps" in e.refused["compiled"]
    with pytest.raises(TypeError, match="compile must be"):
        pyebm.minimize(f, x, K, CFG, init=y0, compile="yes")


def test_bad_energy_output_is_an_error():
    class Wrong(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(5))

        def forward(self, x, y):
            return (y * self.w).sum()  # a scalar, not [B, K]

    with pytest.raises(ValueError, match=r"E \[B, K\]"):
        pyebm.minimize(Wrong(), torch.zeros(B, CDIM), K, CFG, init=torch.randn(B, K, 5), compile=True)


@pytest.mark.parametrize("geometry", [
    dict(c=1, o=4, h=8, w=8, k=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1)),
    dict(c=3, o=5, h=7, w=9, k=(3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 1)),
    dict(c=2, o=3, h=9, w=6, k=(2, 3), stride=(2, 3), padding=(0, 2), dilation=(2, 1)),
    dict(c=8, o=8, h=8, w=8, k=(3, 3), stride=(2, 2), padding=(1, 1), dilation=(1, 1)),
    dict(c=1, o=2, h=9, w=7, k=(2, 3), stride=(2, 3), padding=(0, 2), dilation=(2, 1)),
    dict(c=4, o=3, h=5, w=6, k=(1, 1), stride=(1, 1), padding=(0, 0), dilation=(1, 1)),
    dict(c=2, o=3, h=4, w=5, k=(3, 3), stride=(1, 1), padding=(2, 2), dilation=(1, 1)),
])
def test_convolution_decompositions_match_aten(geometry):
    """The CPU backend's convolution and convolution_backward (patches and one product; channel-major patches
    for one input channel, position-major from two) against ATen's, on odd geometries (strides, dilations,
    1x1 kernels, padding wider than the kernel), every output of the backward."""
    g = geometry
    torch.manual_seed(3)
    x = torch.randn(2, g["c"], g["h"], g["w"], dtype=torch.float64)
    w = torch.randn(g["o"], g["c"], *g["k"], dtype=torch.float64)
    b = torch.randn(g["o"], dtype=torch.float64)
    args = (list(g["stride"]), list(g["padding"]), list(g["dilation"]), False, [0, 0], 1)
    want = torch.ops.aten.convolution(x, w, b, *args)
    got = _compiled._conv_as_mm(x, w, b, *args)
    torch.testing.assert_close(got, want)
    go = torch.randn_like(want)
    want_grads = torch.ops.aten.convolution_backward(go, x, w, [g["o"]], *args, [True, True, True])
    got_grads = _compiled._conv_backward_as_mm(go, x, w, [g["o"]], *args, [True, True, True])
    for a, e in zip(got_grads, want_grads):
        torch.testing.assert_close(a, e)
    assert _compiled._conv_backward_as_mm(go, x, w, [g["o"]], *args, [True, False, False])[1:] == (None, None)
    # other convolutions (transposed, grouped, not 2-D) are left to ATen
    transposed = (list(g["stride"]), list(g["padding"]), list(g["dilation"]), True, [0, 0], 1)
    assert _compiled._conv_as_mm(x, w, b, *transposed) is NotImplemented
    assert _compiled._conv_as_mm(x, w, b, *args[:-1], 2) is NotImplemented
    assert _compiled._conv_as_mm(x[0], w, b, *args) is NotImplemented


def test_generic_bench_suite_runs():
    """bench/bench_generic.py's suite (`pyebm bench descent --energy ...`), without the compile column."""
    from pyebm.bench.generic_suite import generic_cases, make_energy

    cases = list(generic_cases(quick=True, compile=False, sizes=["resmlp T=10"],
                               sampling={"min_samples": 1, "max_samples": 1, "budget_s": 0.0}))
    assert [c.column for c in cases] == ["hand loop", "pyebm autograd"] and cases[0].baseline
    with pytest.raises(ValueError, match="energy must be"):
        make_energy("unet")
