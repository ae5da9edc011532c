"""Bad input to the public API gets a clear error naming the argument; empty batches behave the same on every
path; the dispatch table's answers (pyebm.explain) are the paths calls take."""
import ast
import pathlib

import numpy as np
import pytest
import torch

import pyebm
from pyebm import Descent, MLPEnergy, minimize
from pyebm.models import EBT, EBTPolicy
from pyebm.policies import EnergyPolicy

ROOT = pathlib.Path(__file__).resolve().parents[1]


# -- constructors ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(hidden="16"), TypeError, "hidden must be a sequence"),
    (dict(hidden=(16.7,)), TypeError, "hidden widths must be ints"),
    (dict(hidden=(16, True)), TypeError, "hidden widths must be ints"),
    (dict(hidden=()), ValueError, "1 to 64 layers"),
    (dict(hidden=(16, 0)), ValueError, ">= 1"),
    (dict(hidden=16), TypeError, "hidden must be a sequence"),
    (dict(candidate_dim=True), TypeError, "candidate_dim must be an int"),
    (dict(context_dim=2.0), TypeError, "context_dim must be an int"),
    (dict(context_dim=-1), ValueError, "context_dim must be an int >= 0"),
    (dict(dtype=torch.complex64), TypeError, "real floating dtype"),
    (dict(dtype=torch.int32), TypeError, "real floating dtype"),
    (dict(activation="swish"), ValueError, "activation must be one of"),
    (dict(activation=None), TypeError, "activation must be a string"),
    (dict(residual=1), TypeError, "residual must be True or False"),
    (dict(backend="gpu"), ValueError, "backend must be None or one of"),
])
def test_mlp_energy_constructor_errors(kwargs, exc, match):
    args = dict(context_dim=3, candidate_dim=2)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        MLPEnergy(**args)


def test_energy_matching_preset_errors():
    with pytest.raises(ValueError, match="dt must be > 0"):
        Descent.energy_matching(dt=0)
    with pytest.raises(TypeError, match="dt must be a finite number"):
        Descent.energy_matching(dt=float("nan"))


# -- calls ----------------------------------------------------------------------------------------------

def test_candidates_and_contexts_of_the_wrong_type():
    m = MLPEnergy(3, 2, hidden=(8,))
    ctx = m.prepare(torch.randn(2, 3))
    for bad in ([[0.0, 1.0]], np.zeros((2, 4, 2), dtype=np.float32)):
        with pytest.raises(TypeError, match="y must be a tensor"):
            m.energy_and_grad(ctx, bad)
        with pytest.raises(TypeError, match="y must be a tensor"):
            m.energy(ctx, bad)
    with pytest.raises(TypeError, match="x must be a tensor"):
        m.prepare([[0.0, 1.0, 2.0]])
    with pytest.raises(TypeError, match="context must be a tensor"):
        minimize(m, [[0.0, 1.0, 2.0]], 4)
    with pytest.raises(TypeError, match="context must be a tensor"):
        minimize(m, np.zeros((2, 3), dtype=np.float32), 4)
    p = EBTPolicy(action_dim=3, horizon=5, cond_dim=12, embed_dim=16, layers=1, heads=2)
    with pytest.raises(TypeError, match="y must be a tensor"):
        p.energy_and_grad(p.prepare(torch.randn(1, 2, 12)), np.zeros((1, 2, 5, 3)))


def test_context_free_energy_descends_from_an_empty_context():
    m = MLPEnergy(0, 3, hidden=(8,))
    res = minimize(m, torch.zeros(4, 0), 6, generator=0)
    assert res.best.shape == (4, 3) and res.energy.shape == (4, 6)
    again = minimize(m, 4, 6, generator=0)
    assert torch.equal(res.y, again.y)
    assert "context_dim=0" in pyebm.explain(m, torch.zeros(4, 0), None, 6).refused["one call"]


def test_generators_are_seeds_everywhere():
    ebt = EBT(vocab_size=16, embedding_dim=8, num_transformer_blocks=1, multiheaded_attention_heads=2,
              context_length=8, langevin_dynamics_noise=0.5)
    tok = torch.randint(0, 16, (1, 3))
    a = ebt.think(tok, generator=1, samples=2)
    b = ebt.think(tok, generator=torch.Generator().manual_seed(1), samples=2)
    assert torch.equal(a.logits, b.logits)
    assert ebt.generate(tok, 2, generator=3).shape == (1, 5)
    with pytest.raises(TypeError, match="generator must be a torch.Generator, an int seed or None"):
        ebt.think(tok, generator="1")
    with pytest.raises(TypeError, match="generator must be"):
        minimize(MLPEnergy(2, 2, hidden=(4,)), torch.randn(1, 2), 2, generator=1.5)


def test_final_energy_option():
    m = MLPEnergy(3, 2, hidden=(8,))
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="final_energy=False needs candidates=1"):
        minimize(m, x, 3, final_energy=False)
    with pytest.raises(TypeError, match="final_energy must be True or False"):
        minimize(m, x, 1, final_energy=None)
    for kw in ({}, {"whole_loop": False}, {"record": True}):
        res = minimize(m, x, 1, final_energy=False, generator=0, **kw)
        full = minimize(m, x, 1, generator=0, **kw)
        assert res.energy is None and res.best_energy is None
        assert torch.equal(res.best, full.best) and torch.equal(res.y, full.y)
    with pytest.raises(ValueError, match="final_energy must be None or True"):
        EnergyPolicy.ebt_policy(EBTPolicy(action_dim=2, horizon=4, embed_dim=8, layers=1, heads=2),
                                final_energy=False)


# -- empty batches ---------------------------------------------------------------------------------------

def _mlp_paths():
    m = MLPEnergy(4, 3, hidden=(8,))
    return m, [dict(), dict(whole_loop=False), dict(record=True), dict(backend="torch"),
               dict(init=torch.zeros(0, 5, 3), mask=torch.zeros(3, dtype=torch.bool)),
               dict(config=Descent.ibc_dfo(steps=2))]


def test_empty_batch_is_the_same_on_every_path():
    m, paths = _mlp_paths()
    x = torch.zeros(0, 4)
    results = [minimize(m, x, 5, **kw) for kw in paths]
    for res in results:
        assert res.best.shape == (0, 3) and res.y.shape == (0, 5, 3) and res.energy.shape == (0, 5)
        assert res.best_energy.shape == (0,) and res.best_index.shape == (0,)
        assert res.steps.dtype == torch.int32 and res.status.dtype == torch.int8
    assert results[2].trajectory.shape == (11, 0, 5)
    ctx = m.prepare(x)
    for backend in (None, "cpu", "torch"):
        E, G = m.energy_and_grad(ctx, torch.zeros(0, 5, 3), backend=backend)
        assert E.shape == (0, 5) and G.shape == (0, 5, 3)
    p = EBTPolicy(action_dim=3, horizon=5, cond_dim=12, embed_dim=16, layers=1, heads=2)
    obs = torch.zeros(0, 4, 12)
    for backend in (None, "torch"):
        E, G = p.energy_and_grad(p.prepare(obs), torch.zeros(0, 2, 5, 3), backend=backend)
        assert E.shape == (0, 2) and G.shape == (0, 2, 5, 3)
    assert minimize(p, obs, 2, Descent.ebt_policy(max_steps=3)).best.shape == (0, 5, 3)
    assert EnergyPolicy.ebt_policy(p, candidates=2).act(obs).shape == (0, 4, 3)
    assert minimize(lambda c, y: (y ** 2).sum(-1), torch.zeros(0, 2), 3, event_shape=(2,)).best.shape == (0, 2)


# -- tracing -----------------------------------------------------------------------------------------------

def test_jit_trace_records_the_ops_or_refuses():
    m = MLPEnergy(3, 2, hidden=(8,))
    x, y = torch.randn(2, 3), torch.randn(2, 4, 2)

    class Call(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = m

        def forward(self, x, y):
            return self.m.energy_and_grad(self.m.prepare(x), y)

    f = Call()
    traced = torch.jit.trace(f, (x, y), check_trace=False)
    assert "pyebm::mlp_energy_grad" in str(traced.graph)  # the op is recorded, not the plan's constants
    x2, y2 = torch.randn(5, 3), torch.randn(5, 7, 2)
    for a, b in zip(traced(x2, y2), f(x2, y2)):
        torch.testing.assert_close(a, b)

    # the trace reads the module's parameters, not a pack: a traced module that loads new weights uses them
    new = MLPEnergy(3, 2, hidden=(8,))
    traced.m.load_state_dict(new.state_dict())
    for a, b in zip(traced(x2, y2), new.energy_and_grad(new.prepare(x2), y2)):
        torch.testing.assert_close(a, b)

    p = EBTPolicy(action_dim=3, horizon=5, cond_dim=12, embed_dim=16, layers=1, heads=2)

    class PolicyCall(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, obs, y):
            return self.net.energy_and_grad(self.net.prepare(obs), y)

    obs, ya = torch.randn(2, 4, 12), torch.randn(2, 3, 5, 3)
    traced = torch.jit.trace(PolicyCall(p), (obs, ya), check_trace=False)
    assert "pyebm::ebt_policy_energy_grad" in str(traced.graph)
    other = EBTPolicy(action_dim=3, horizon=5, cond_dim=12, embed_dim=16, layers=1, heads=2)
    traced.net.load_state_dict(other.state_dict())
    for a, b in zip(traced(obs, ya), other.energy_and_grad(other.prepare(obs), ya)):
        torch.testing.assert_close(a, b)

    class Descend(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = m

        def forward(self, x):
            return minimize(self.m, x, 4, generator=0).best

    with pytest.raises(RuntimeError, match="cannot be recorded by torch.jit.trace"):
        torch.jit.trace(Descend(), (x,))


# -- the dispatch table ---------------------------------------------------------------------------------------

def test_explain_names_every_refused_path():
    m = MLPEnergy(3, 2, hidden=(8,))
    x = torch.randn(2, 3)
    e = pyebm.explain(m, x, Descent.gd(steps=3), 4)
    assert e.path == "one call" and e.backend == "cpu"
    e = pyebm.explain(m, x, Descent.gd(steps=3, normalize="rms"), 4)
    assert e.path == "per step" and "normalize" in e.refused["whole loop"] and "normalize" in e.refused["one call"]
    assert "update" in e.parts and "energy" in e.parts and "cpu plan" in e.parts["energy"]
    assert "per step" in str(e) and "not whole loop" in str(e)
    e = pyebm.explain(lambda c, y: (y ** 2).sum(-1), x, Descent.gd(steps=3), 4, event_shape=(2,))
    assert e.path == "autograd"
    e = pyebm.explain(m, x, y=torch.randn(2, 4, 2))
    assert e.call == "energy_and_grad" and "cpu plan" in e.path
    e = pyebm.explain(m, x, y=torch.randn(2, 4, 2), backend="torch")
    assert "reference" in e.path
    with pytest.raises(ValueError, match="whole_loop=True but no whole-loop op"):
        minimize(m, x, 4, Descent.gd(steps=3, normalize="rms"), whole_loop=True)


def _imports(path: pathlib.Path, module: str):
    """Every pyebm module a module imports (top level and inside functions)."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("pyebm"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            if not base.startswith("pyebm"):
                continue
            for a in node.names:
                out.add(f"{base}.{a.name}" if (ROOT / (base + "." + a.name).replace(".", "/")).with_suffix(".py").exists()
                        or (ROOT / (base + "." + a.name).replace(".", "/")).is_dir() else base)
    return out


def test_no_import_cycles():
    modules = {}
    for path in (ROOT / "pyebm").rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        modules[name] = path
    graph = {name: {m for m in _imports(path, name) if m in modules and m != "pyebm"} for name, path in modules.items()}
    # the top-level package only gathers the public names; its submodules never need it
    state, stack = {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                cycle = stack[stack.index(m):] + [m]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)


def test_torch_compile_fullgraph_of_energy_calls():
    """Under torch.compile the packs are built inside the graph from the parameters (no pybind11 objects to
    trace), so energy calls compile without graph breaks and follow later weight changes."""
    p = EBTPolicy(action_dim=3, horizon=5, cond_dim=12, embed_dim=16, layers=1, heads=2)
    obs, ya = torch.randn(2, 4, 12), torch.randn(2, 3, 5, 3)
    ctx = p.prepare(obs)
    f = torch.compile(lambda c, y: p.energy_and_grad(c, y), fullgraph=True, backend="aot_eager")
    for a, b in zip(f(ctx, ya), p.energy_and_grad(ctx, ya)):
        torch.testing.assert_close(a, b)
    with torch.no_grad():
        p.head.fc2.weight.mul_(2.0)
    for a, b in zip(f(ctx, ya), p.energy_and_grad(ctx, ya, backend="torch")):
        torch.testing.assert_close(a, b)
