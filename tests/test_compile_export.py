"""torch.compile(fullgraph=True), torch.export (strict and non-strict, dynamic batch) and AOTInductor packages
(pyebm.export / pyebm.load) of whole inference calls: minimize, EnergyPolicy.act and EBT.think.

Exactness: the eager call is the reference. Where the traced program runs the same kernels in the same order
(``backend="aot_eager"``, an exported program's module, an AOTInductor package whose pyebm ops are the same
compiled kernels) the results are compared bitwise; Inductor may fuse and reorder the float ops between pyebm's
ops, so its results are compared with a tolerance.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.utils._pytree import tree_flatten

import pyebm
from pyebm import _rng, config as _config
from pyebm.ops import rng_draw as rng_draw_op
from pyebm.models import EBT, EBTPolicy
from pyebm.policies import EnergyPolicy

pytestmark = pytest.mark.skipif(not pyebm.backends()["cpu"], reason="extension pyebm._C not built")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# -- the cases: (eager function of one tensor, example input, a second input with another batch size) ------

def _mlp(hidden=(16,)):
    return pyebm.MLPEnergy(context_dim=6, candidate_dim=3, hidden=hidden, activation="silu")


def case_minimize_whole_loop():
    """MLPEnergy, Langevin noise: the whole-loop op (traced) / the one-call plan (eager), noise by seed."""
    e = _mlp()
    cfg = pyebm.Descent(steps=5, noise="langevin", noise_scale=0.1, lower=-2.0, upper=2.0)
    return e, (lambda x: pyebm.minimize(e, x, candidates=3, config=cfg, generator=0)), torch.randn(4, 6), \
        torch.randn(7, 6)


def case_minimize_per_step():
    """The per-step path: normalisation, Nesterov momentum, early exit, sampled selection, the trajectory."""
    e = _mlp(hidden=(8, 8))
    cfg = pyebm.Descent(steps=4, step_size=0.05, normalize="rms", momentum=0.5, nesterov=True, tol=1e-3,
                        noise="pre", noise_scale=0.05, selection="sample")
    return e, (lambda x: pyebm.minimize(e, x, candidates=3, config=cfg, generator=3, record=True)), \
        torch.randn(3, 6), torch.randn(5, 6)


def case_minimize_dfo():
    e = _mlp()
    return e, (lambda x: pyebm.minimize(e, x, candidates=4, config=pyebm.Descent.ibc_dfo(steps=3), generator=1)), \
        torch.randn(3, 6), torch.randn(2, 6)


def case_act_ebt_policy():
    m = EBTPolicy(2, horizon=6, embed_dim=8, layers=1, heads=2, n_obs_steps=2)
    pol = EnergyPolicy.ebt_policy(m, candidates=3, max_steps=4, bounds=(-1.0, 1.0))
    return m, (lambda o: pol.act(o, generator=0)), torch.randn(3, 4, 8), torch.randn(2, 4, 8)


def case_act_ibc():
    pol = EnergyPolicy.ibc(action_dim=2, obs_dim=3, horizon=2, hidden=(16,), candidates=5, steps=4)
    return pol.energy, (lambda o: pol.act(o, generator=0)), torch.randn(3, 2, 3), torch.randn(6, 2, 3)


def case_think():
    m = EBT(vocab_size=11, embedding_dim=8, num_transformer_blocks=1, multiheaded_attention_heads=2,
            context_length=8)
    return m, (lambda t: m.think(t, samples=2, generator=0)), torch.randint(0, 11, (3, 5)), \
        torch.randint(0, 11, (2, 5))


CASES = {"minimize-whole-loop": case_minimize_whole_loop, "minimize-per-step": case_minimize_per_step,
         "minimize-dfo": case_minimize_dfo, "act-ebt-policy": case_act_ebt_policy, "act-ibc": case_act_ibc,
         "think": case_think}


def _leaves(out):
    return tree_flatten(out)[0]


def assert_same(got, want, exact=True):
    got_l, want_l = _leaves(got), _leaves(want)
    assert len(got_l) == len(want_l)
    for g, w in zip(got_l, want_l):
        if not isinstance(w, torch.Tensor):
            assert g == w
        elif exact or not w.is_floating_point():
            assert g.dtype == w.dtype and g.shape == w.shape and torch.equal(g, w)
        else:
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


class _Wrap(torch.nn.Module):
    def __init__(self, model, fn):
        super().__init__()
        self.model, self.fn = model, fn

    def forward(self, x):
        return self.fn(x)


# -- the random draws of traced calls ----------------------------------------------------------------

def test_rng_draw_is_the_generators_sequence():
    """pyebm::rng_draw draws what a torch.Generator with that seed draws, one draw after the other."""
    g = torch.Generator().manual_seed(5)
    want = [torch.randn(3, 17, generator=g), torch.rand(4, generator=g, dtype=torch.float64),
            torch.randn(2, 5, generator=g), torch.randn(2, 5, generator=g)]
    tg = _rng.TracedGenerator(5, torch.device("cpu"))
    got = [tg.draw("normal", (3, 17), 1, torch.float32)[0], tg.draw("uniform", (4,), 1, torch.float64)[0]]
    got += list(tg.draw("normal", (2, 5), 2, torch.float32))
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert torch.equal(tg.state, g.get_state())
    torch.library.opcheck(torch.ops.pyebm.rng_draw.default, (None, 3, "normal", [2, 17], 2, "float32",
                                                              torch.device("cpu")))
    torch.library.opcheck(torch.ops.pyebm.rng_draw.default, (torch.Generator().manual_seed(1).get_state(), 0,
                                                              "uniform", [3], 1, "float64", torch.device("cpu")))


def test_rng_draw_checks_its_arguments():
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="state must be a 1-d uint8 CPU tensor"):
        torch.ops.pyebm.rng_draw(torch.zeros(3), 0, "normal", [2], 1, "float32", cpu)
    with pytest.raises(ValueError, match="kind must be one of"):
        torch.ops.pyebm.rng_draw(None, 0, "gamma", [2], 1, "float32", cpu)
    for bad in ("int32", "complex64", "torch.float32", "nonsense", ""):
        with pytest.raises(TypeError, match="dtype must name a floating dtype"):
            torch.ops.pyebm.rng_draw(None, 0, "normal", [2], 1, bad, cpu)
    with pytest.raises(TypeError, match="dtype must name a floating dtype, e.g. 'float32'; got torch.float32"):
        rng_draw_op.check("pyebm::rng_draw", None, 0, "normal", [2], 1, torch.float32, cpu)
    for dt in (torch.float32, torch.float64, torch.float16, torch.bfloat16):  # the names the draws pass
        assert torch.ops.pyebm.rng_draw(None, 0, "normal", [2], 1, rng_draw_op.dtype_name(dt), cpu)[0].dtype == dt
    with pytest.raises(ValueError, match="count must be >= 1"):
        torch.ops.pyebm.rng_draw(None, 0, "normal", [2], 0, "float32", cpu)
    with pytest.raises(ValueError, match="state has 16 bytes, but a generator on cpu has a state of 5056 bytes"):
        torch.ops.pyebm.rng_draw(torch.zeros(16, dtype=torch.uint8), 0, "normal", [2], 1, "float32", cpu)


# -- torch.compile(fullgraph=True) --------------------------------------------------------------------

@pytest.mark.parametrize("name", list(CASES))
def test_compile_fullgraph_same_kernels_bitwise(name):
    """One graph (fullgraph=True), the eager ops run as traced: the eager results bit for bit."""
    _, fn, x, x2 = CASES[name]()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    assert_same(compiled(x), fn(x))
    assert_same(compiled(x2), fn(x2))  # another batch size: a recompilation, the same numbers


@pytest.mark.parametrize("name", ["minimize-whole-loop", "minimize-per-step", "act-ebt-policy", "think"])
def test_compile_fullgraph_inductor(name):
    """Inductor fuses the float ops between pyebm's ops: equal within float rounding."""
    _, fn, x, _ = CASES[name]()
    assert_same(torch.compile(fn, fullgraph=True)(x), fn(x), exact=False)


def test_compile_result_types_are_pytrees():
    e, fn, x, _ = case_minimize_whole_loop()
    res = torch.compile(fn, fullgraph=True, backend="aot_eager")(x)
    assert isinstance(res, pyebm.DescentResult)
    leaves, spec = tree_flatten(res)
    assert all(isinstance(t, torch.Tensor) for t in leaves) and len(leaves) == 8  # no trajectory: None fields
    m = EBT(vocab_size=11, embedding_dim=8, num_transformer_blocks=1, multiheaded_attention_heads=2,
            context_length=8)
    think = torch.compile(lambda t: m.think(t, samples=2, generator=0), fullgraph=True, backend="aot_eager")
    assert type(think(torch.randint(0, 11, (2, 4)))).__name__ == "ThinkResult"


def test_compile_policy_keeps_real_results():
    """A compiled act() sets last_result as the eager one does, with real tensors (Dynamo replays the
    attribute writes after the graph ran)."""
    m = EBTPolicy(2, horizon=6, embed_dim=8, layers=1, heads=2, n_obs_steps=2)
    pol = EnergyPolicy.ebt_policy(m, candidates=3, max_steps=4)
    obs = torch.randn(2, 4, 8)
    a = torch.compile(lambda o: pol.act(o, generator=0), fullgraph=True, backend="aot_eager")(obs)
    assert type(pol.last_result.actions) is torch.Tensor and torch.equal(pol.last_result.actions, a)
    assert torch.equal(a, pol.act(obs, generator=0))


def test_compile_generator_object_accepted_when_nothing_is_drawn():
    """A torch.Generator made outside the compiled region: accepted; a call that draws nothing never reads it."""
    e = _mlp()
    g = torch.Generator().manual_seed(0)
    x, y0 = torch.randn(3, 6), torch.randn(3, 2, 3)
    cfg = pyebm.Descent(steps=3)

    def fn(x, y0, g):
        return pyebm.minimize(e, x, candidates=2, config=cfg, init=y0, generator=g)

    assert_same(torch.compile(fn, fullgraph=True, backend="aot_eager")(x, y0, g), fn(x, y0, g))


def test_compile_generator_object_that_must_draw_says_what_to_do():
    e = _mlp()
    g = torch.Generator().manual_seed(0)
    cfg = pyebm.Descent(steps=3, noise="langevin")
    fn = torch.compile(lambda x, g: pyebm.minimize(e, x, candidates=2, config=cfg, generator=g), fullgraph=True,
                       backend="aot_eager")
    with pytest.raises(Exception, match="pass generator as an int seed"):
        fn(torch.randn(3, 6), g)


# -- a generator's state tensor: the eager numbers of that generator, the state advanced in place ---------------

STATE_CASES = {
    "minimize-whole-loop": lambda: (lambda e, cfg: (e, lambda x, g: pyebm.minimize(e, x, candidates=3, config=cfg,
                                                                                   generator=g)))(
        _mlp(), pyebm.Descent(steps=5, noise="langevin", noise_scale=0.1, lower=-2.0, upper=2.0)),
    "minimize-per-step": lambda: (lambda e, cfg: (e, lambda x, g: pyebm.minimize(e, x, candidates=3, config=cfg,
                                                                                 generator=g)))(
        _mlp(hidden=(8, 8)), pyebm.Descent(steps=4, step_size=0.05, normalize="rms", noise="pre",
                                           noise_scale=0.05, selection="sample")),
    "act-ibc": lambda: (lambda pol: (pol.energy, lambda o, g: pol.act(o, generator=g)))(
        EnergyPolicy.ibc(action_dim=2, obs_dim=3, horizon=2, hidden=(16,), candidates=5, steps=4)),
    "think": lambda: (lambda m: (m, lambda t, g: m.think(t, samples=2, noise=0.3, generator=g)))(
        EBT(vocab_size=11, embedding_dim=8, num_transformer_blocks=1, multiheaded_attention_heads=2,
            context_length=8)),
}
STATE_INPUTS = {"minimize-whole-loop": (torch.randn(4, 6), torch.randn(7, 6)),
                "minimize-per-step": (torch.randn(3, 6), torch.randn(5, 6)),
                "act-ibc": (torch.randn(3, 2, 3), torch.randn(6, 2, 3)),
                "think": (torch.randint(0, 11, (3, 5)), torch.randint(0, 11, (2, 5)))}


class _WrapState(torch.nn.Module):
    def __init__(self, model, fn):
        super().__init__()
        self.model, self.fn = model, fn

    def forward(self, x, state):
        return self.fn(x, state)


def _check_state_calls(run, fn, inputs, seed):
    """Calls of ``run(x, state)`` one after the other: each draws what ``fn(x, g)`` draws eagerly with the
    generator g that the state came from, and leaves the state where g is after the eager call."""
    g = torch.Generator().manual_seed(seed)
    eager = torch.Generator().manual_seed(seed)
    state = g.get_state()
    outs = []
    for x in inputs:
        got = run(x, state)
        assert_same(got, fn(x, eager))
        assert torch.equal(state, eager.get_state())  # advanced in place, as the eager generator
        outs.append(got)
    g.set_state(state)  # the caller's generator: where the eager calls left theirs
    assert torch.equal(g.get_state(), eager.get_state())
    return outs


@pytest.mark.parametrize("name", list(STATE_CASES))
def test_compile_fullgraph_generator_state_draws_the_generators_numbers(name):
    """A generator made outside the compiled region drives the draws through its state tensor: the eager numbers
    of that generator (aot_eager: bit for bit), fresh numbers on every call, the state advanced as eagerly."""
    _, fn = STATE_CASES[name]()
    x, x2 = STATE_INPUTS[name]
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    first, second, _ = _check_state_calls(compiled, fn, (x, x, x2), seed=11)
    assert not torch.equal(_leaves(first)[0], _leaves(second)[0])  # the same input, fresh draws


def test_compile_inductor_generator_state():
    """Inductor: the same draws (the op is called as traced), float ops between them within rounding."""
    _, fn = STATE_CASES["minimize-per-step"]()
    x, _ = STATE_INPUTS["minimize-per-step"]
    g, eager = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    state = g.get_state()
    compiled = torch.compile(fn, fullgraph=True)
    for _ in range(2):
        assert_same(compiled(x, state), fn(x, eager), exact=False)
        assert torch.equal(state, eager.get_state())


@pytest.mark.parametrize("strict", [False, True], ids=["nonstrict", "strict"])
@pytest.mark.parametrize("name", list(STATE_CASES))
def test_export_generator_state_is_an_input_advanced_in_place(name, strict):
    """The state is an input of the exported program (a dynamic batch): every run draws the eager numbers of the
    generator it came from and advances the state, whatever state is passed (not the export-time one)."""
    model, fn = STATE_CASES[name]()
    x, x2 = STATE_INPUTS[name]
    example = torch.Generator().manual_seed(99).get_state()
    ep = torch.export.export(_WrapState(model, fn), (x, example), strict=strict,
                             dynamic_shapes=({0: torch.export.Dim("batch")}, None))
    assert not any(_fakes_in(v) for v in ep.constants.values())
    _check_state_calls(ep.module(), fn, (x, x2, x), seed=4)


def test_generator_state_errors():
    e = _mlp()
    cfg = pyebm.Descent(steps=3, noise="langevin")
    x = torch.randn(3, 6)
    with pytest.raises(TypeError, match=r"minimize: generator is a tensor; .* traced by torch.compile or "
                                        r"torch.export only; eagerly, pass the torch.Generator itself"):
        pyebm.minimize(e, x, candidates=2, config=cfg, generator=torch.Generator().get_state())
    for state, message in [(torch.zeros(5056), "a generator state must be a 1-d uint8 CPU tensor"),
                           # a CUDA generator's state for CPU candidates
                           (torch.zeros(16, dtype=torch.uint8), "state has 16 bytes, but a generator on cpu has a "
                                                                "state of 5056 bytes")]:
        torch._dynamo.reset()  # a fresh compile: the state's size is not made dynamic by the call before
        fn = torch.compile(lambda x, s: pyebm.minimize(e, x, candidates=2, config=cfg, generator=s),
                           fullgraph=True, backend="aot_eager")
        with pytest.raises(Exception, match=message):
            fn(x, state)


def test_compile_global_generator_same_draws():
    """generator=None draws with torch's global generator, in a compiled call as eagerly (aot_eager: the
    same random ops)."""
    e = _mlp()
    cfg = pyebm.Descent(steps=3, noise="langevin", noise_scale=0.2)
    fn = lambda x: pyebm.minimize(e, x, candidates=2, config=cfg)  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 6)
    torch.manual_seed(7)
    got = compiled(x)
    torch.manual_seed(7)
    assert_same(got, fn(x))


# -- torch.export ---------------------------------------------------------------------------------------

def _fakes_in(obj) -> int:
    from torch._subclasses.fake_tensor import FakeTensor

    return sum(isinstance(t, FakeTensor) for t in tree_flatten(obj)[0])


@pytest.mark.parametrize("strict", [False, True], ids=["nonstrict", "strict"])
@pytest.mark.parametrize("name", list(CASES))
def test_export_dynamic_batch_equals_eager(name, strict):
    model, fn, x, x2 = CASES[name]()
    ep = torch.export.export(_Wrap(model, fn), (x,), strict=strict,
                             dynamic_shapes=({0: torch.export.Dim("batch")},))
    assert not any(_fakes_in(v) for v in ep.constants.values())
    run = ep.module()
    assert_same(run(x), fn(x))
    assert_same(run(x2), fn(x2))  # another batch size through the same program


def test_export_any_number_of_times_in_one_process():
    """Nothing traced is kept between exports: the config's tables and the policy hold no fake tensors, and
    every program's constants are real."""
    pol = EnergyPolicy.ibc(action_dim=2, obs_dim=3, horizon=2, hidden=(16,), candidates=5, steps=4)
    fn = lambda o: pol.act(o, generator=0)  # noqa: E731
    obs = torch.randn(3, 2, 3)
    want = fn(obs)
    before = pol.last_result
    for strict in (False, True, False):
        ep = torch.export.export(_Wrap(pol.energy, fn), (obs,), strict=strict,
                                 dynamic_shapes=({0: torch.export.Dim("batch")},))
        assert not any(_fakes_in(v) for v in ep.constants.values())
        assert torch.equal(ep.module()(obs), want)
    assert pol.last_result is before  # an exported call does not write the policy's state
    assert _fakes_in(list(_config._SCHEDULES.values())) == 0
    assert _fakes_in(list(_config._EVENT_OPTIONS.values())) == 0
    assert _fakes_in(list(pol._device_bounds.values())) == 0


def test_traced_policy_refuses_host_decisions():
    m = EBTPolicy(2, horizon=6, embed_dim=8, layers=1, heads=2, n_obs_steps=2)
    obs = torch.randn(2, 4, 8)
    pol = EnergyPolicy.ebt_policy(m, candidates=2, max_steps=2, recovery_threshold=0.0)
    with pytest.raises(Exception, match="recovery_threshold decides on the host"):
        torch.compile(lambda o: pol.act(o, generator=0), fullgraph=True, backend="aot_eager")(obs)
    warm = EnergyPolicy.ebt_policy(m, candidates=2, max_steps=2, warm_start=True)
    with pytest.raises(Exception, match="warm_start keeps the chosen chunk"):
        torch.export.export(_Wrap(m, lambda o: warm.act(o, generator=0)), (obs,), strict=False)


# -- AOTInductor packages ------------------------------------------------------------------------------

def test_export_argument_errors(tmp_path):
    e, fn, x, _ = case_minimize_whole_loop()
    with pytest.raises(ValueError, match="path must end in .pt2"):
        pyebm.export(fn, (x,), tmp_path / "m.zip")
    with pytest.raises(ValueError, match="dynamic_shapes must be None, 'batch'"):
        pyebm.export(fn, (x,), tmp_path / "m.pt2", dynamic_shapes="rows")
    with pytest.raises(TypeError, match="model_or_fn must be an nn.Module or a callable"):
        pyebm.export(3, (x,), tmp_path / "m.pt2")
    with pytest.raises(TypeError, match="example_inputs must be a tuple"):
        pyebm.export(fn, [x], tmp_path / "m.pt2")
    with pytest.raises(FileNotFoundError, match="no package at"):
        pyebm.load(tmp_path / "missing.pt2")


def _run_fresh(code: str, tmp_path) -> str:
    """Run ``code`` in a new interpreter that has imported nothing of pyebm's before."""
    script = tmp_path / "load.py"
    script.write_text(textwrap.dedent(code))
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, str(script)], cwd=str(tmp_path), env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    return out.stdout


def test_package_policy_act_loads_in_a_fresh_process(tmp_path):
    """An IBC policy's act (observation side, Langevin descent with noise from seed 0, selection) as one
    package with a dynamic batch; a fresh process that imports only torch and pyebm runs it: the eager actions
    (the package calls the same pyebm kernels and draws with the same seed's generator; Inductor compiles the
    float ops between them, hence a tolerance)."""
    pol = EnergyPolicy.ibc(action_dim=2, obs_dim=3, horizon=2, hidden=(16,), candidates=5, steps=4)
    fn = lambda o: pol.act(o, generator=0)  # noqa: E731
    path = pyebm.export(fn, (torch.randn(3, 2, 3),), tmp_path / "policy.pt2", dynamic_shapes="batch")
    obs = torch.randn(6, 2, 3)
    torch.save({"obs": obs, "want": fn(obs)}, tmp_path / "io.pt")
    out = _run_fresh(f"""
        import sys, torch, pyebm
        assert "pyebm.policies" in sys.modules  # imported by pyebm itself, nothing else
        act = pyebm.load({str(path)!r})
        io = torch.load("io.pt")
        got = act(io["obs"])
        torch.testing.assert_close(got, io["want"], rtol=1e-5, atol=1e-6)
        print("same", torch.equal(got, io["want"]))
        """, tmp_path)
    assert "same" in out


def test_package_minimize_returns_a_descent_result(tmp_path):
    """minimize with its DescentResult output (a pytree of pyebm's): loaded and unflattened elsewhere."""
    e, fn, x, x2 = case_minimize_whole_loop()
    path = pyebm.export(_Wrap(e, fn), (x,), tmp_path / "minimize.pt2", dynamic_shapes=({0: torch.export.Dim("B")},))
    torch.save({"x": x2, "want": fn(x2)}, tmp_path / "io.pt")
    _run_fresh(f"""
        import torch, pyebm
        run = pyebm.load({str(path)!r})
        io = torch.load("io.pt", weights_only=False)
        got, want = run(io["x"]), io["want"]
        assert type(got) is pyebm.DescentResult, type(got)
        for name in ("best", "best_energy", "best_index", "y", "energy", "initial_energy", "steps", "status"):
            torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-5, atol=1e-6)
        assert torch.equal(got.best_index, want.best_index) and torch.equal(got.steps, want.steps)
        """, tmp_path)


def test_packed_call_is_the_op_call():
    """pyebm::packed_call (what pyebm.export puts in place of a call with an empty Tensor[] argument) calls the
    same op on the same values; only pyebm ops can be its target."""
    import json

    from pyebm.ops import packed_call as pc

    e = _mlp()  # one hidden layer: no hidden-to-hidden weights, empty weight and bias lists
    w_in, weights, biases, w_out, b_out = e.op_params()
    assert weights == [] and biases == []
    ctx, y = e.prepare(torch.randn(3, 6)), torch.randn(3, 4, 3)
    args = (ctx, y, w_in, weights, biases, w_out, b_out, e.activation, e.residual)
    want = torch.ops.pyebm.mlp_energy_grad.default(*args)
    tensors = []
    spec = json.dumps({"args": [pc.encode(a, tensors, lambda v: isinstance(v, torch.Tensor)) for a in args],
                       "kwargs": {}})
    got = torch.ops.pyebm.packed_call("pyebm::mlp_energy_grad.default", tensors, spec)
    assert len(got) == 2 and torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    torch.library.opcheck(torch.ops.pyebm.packed_call.default, ("pyebm::mlp_energy_grad.default", tensors, spec),
                          test_utils=("test_schema", "test_faketensor"))
    with pytest.raises(ValueError, match="target must be a pyebm op"):
        torch.ops.pyebm.packed_call("aten::add.Tensor", tensors, spec)


@pytest.mark.triton
def test_compile_triton_backend_takes_the_per_step_path(triton_device):
    """The Triton whole loop reads its seed on the host, so a traced call takes the per-step path (the Triton
    energy and update ops): the eager whole loop's result within float rounding."""
    e = pyebm.MLPEnergy(context_dim=6, candidate_dim=3, hidden=(16,), activation="silu", backend="triton",
                        device=triton_device)
    cfg = pyebm.Descent(steps=2)
    x, y0 = torch.randn(2, 6, device=triton_device), torch.randn(2, 2, 3, device=triton_device)
    fn = lambda x, y0: pyebm.minimize(e, x, candidates=2, config=cfg, init=y0, generator=0)  # noqa: E731
    assert "whole loop (backend triton)" in str(pyebm.explain(e, x, config=cfg, candidates=2, init=y0))
    assert_same(torch.compile(fn, fullgraph=True, backend="aot_eager")(x, y0), fn(x, y0), exact=False)


@pytest.mark.gpu
def test_compile_and_export_on_cuda_draw_the_seeds_numbers():
    """On a CUDA device the seed's generator is a CUDA generator (its state threaded through rng_draw as on
    the CPU). Written for a GPU; not yet run on one."""
    e = _mlp().cuda()
    cfg = pyebm.Descent(steps=4, noise="langevin", noise_scale=0.1)
    fn = lambda x: pyebm.minimize(e, x, candidates=3, config=cfg, generator=0)  # noqa: E731
    x, x2 = torch.randn(4, 6, device="cuda"), torch.randn(6, 6, device="cuda")
    assert_same(torch.compile(fn, fullgraph=True, backend="aot_eager")(x), fn(x))
    ep = torch.export.export(_Wrap(e, fn), (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    assert_same(ep.module()(x2), fn(x2))


@pytest.mark.gpu
def test_compile_and_export_on_cuda_draw_a_cuda_generators_numbers_from_its_state():
    """A CUDA generator's state (16 bytes: seed and offset) drives the traced draws as on the CPU. Written for a
    GPU; not yet run on one."""
    e = _mlp().cuda()
    cfg = pyebm.Descent(steps=4, noise="langevin", noise_scale=0.1)
    fn = lambda x, g: pyebm.minimize(e, x, candidates=3, config=cfg, generator=g)  # noqa: E731
    x = torch.randn(4, 6, device="cuda")
    g, eager = torch.Generator("cuda").manual_seed(3), torch.Generator("cuda").manual_seed(3)
    state = g.get_state()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    ep = torch.export.export(_WrapState(e, fn), (x, state.clone()))
    for run in (compiled, ep.module()):
        assert_same(run(x, state), fn(x, eager))
        assert torch.equal(state, eager.get_state())
