"""Module contracts: every model class keeps PyTorch's contracts after it has run on its fastest path.

One set of checks, run for every model pyebm ships (MLPEnergy, EBT, EBTPolicy, EnergyPolicy with the
EBT-Policy preset, the IBC policy with Langevin and with DFO). Each case first runs its fastest path (and
asserts that it did: a check that silently ran the reference would prove nothing), then applies one
operation users apply to modules - copies, pickling, saving, state dicts, optimizer steps, ``.data =``,
parametrizations, AveragedModel, functional_call, dtype moves, spawn and fork children, threads - and
compares the fast path's results with backend="torch" (the plain PyTorch reference) on the weights the
module holds at that moment. Results must be values at call time: a result computed before a change must
not change after it.
"""
from __future__ import annotations

import copy
import io
import multiprocessing as mp
import os
import pickle
import threading
from contextlib import contextmanager
from typing import Callable, Dict, List

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import pyebm
from pyebm import Descent, MLPEnergy, _dispatch, minimize
from pyebm.models import EBT, EBTPolicy
from pyebm.policies import EnergyPolicy
from pyebm.reference import ebt as ebt_ref

pytestmark = pytest.mark.skipif(not pyebm.backends()["cpu"], reason="extension pyebm._C not built")

DT = torch.float64


@contextmanager
def torch_backend():
    """PYEBM_BACKEND=torch for the duration: every pyebm call runs the plain PyTorch reference."""
    old = os.environ.get("PYEBM_BACKEND")
    os.environ["PYEBM_BACKEND"] = "torch"
    try:
        yield
    finally:
        if old is None:
            del os.environ["PYEBM_BACKEND"]
        else:
            os.environ["PYEBM_BACKEND"] = old


def dtype_of(obj) -> torch.dtype:
    return next(obj.parameters()).dtype


def resolve(root, name: str):
    obj = root
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


# -- the cases --------------------------------------------------------------------------------------

class Case:
    """A model (or policy) and how to run it: ``fast`` on its fastest path, ``reference`` on the plain
    PyTorch path with the weights it holds now. ``module`` is the nn.Module holding the weights."""

    name = ""
    tol = 1e-8

    def make(self, seed: int = 0):
        raise NotImplementedError

    def module(self, obj) -> nn.Module:
        return obj

    def with_module(self, obj, module):
        return module

    def fast(self, obj) -> List[torch.Tensor]:
        raise NotImplementedError

    def reference(self, obj) -> List[torch.Tensor]:
        with torch_backend():
            return self.fast(obj)

    def assert_fast_path(self, obj) -> None:
        raise NotImplementedError


class MLPCase(Case):
    name = "MLPEnergy"

    def make(self, seed=0):
        torch.manual_seed(seed)
        return MLPEnergy(4, 3, hidden=(32, 32), activation="silu", dtype=DT)

    def inputs(self, dtype=DT):
        g = torch.Generator().manual_seed(1)
        return (torch.randn(3, 4, generator=g, dtype=DT).to(dtype), torch.randn(3, 6, 3, generator=g, dtype=DT).to(dtype))

    def fast(self, obj):
        x, y = self.inputs(dtype_of(obj))
        E, G = obj.energy_and_grad(obj.prepare(x), y)
        res = minimize(obj, x, 6, Descent.gd(steps=4, step_size=0.05, momentum=0.5), init=y)
        return [E, G, res.y, res.energy, res.best]

    def assert_fast_path(self, obj):
        x, y = self.inputs()
        assert _dispatch.mlp_call(obj, obj.prepare(x), y, None) == "plan"
        assert pyebm.explain(obj, x, Descent.gd(steps=4, step_size=0.05, momentum=0.5), 6, init=y).path == "one call"


class EBTPolicyCase(Case):
    name = "EBTPolicy"

    def make(self, seed=0):
        torch.manual_seed(seed)
        m = EBTPolicy(action_dim=3, horizon=5, cond_dim=12, embed_dim=16, layers=2, heads=2, n_obs_steps=2, dtype=DT)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.05 * torch.randn_like(p))
        return m

    def inputs(self, dtype=DT):
        g = torch.Generator().manual_seed(2)
        return (torch.randn(2, 4, 12, generator=g, dtype=DT).to(dtype),
                torch.randn(2, 3, 5, 3, generator=g, dtype=DT).to(dtype))

    def config(self):
        return Descent.ebt_policy(max_steps=4, step_size=2.0, min_grad=1e-6)

    def fast(self, obj):
        obs, y = self.inputs(dtype_of(obj))
        E, G = obj.energy_and_grad(obj.prepare(obs), y)
        res = minimize(obj, obs, 3, self.config(), init=y)
        return [E, G, res.y, res.energy]

    def assert_fast_path(self, obj):
        obs, y = self.inputs()
        assert _dispatch.ebt_policy_call(obj, y, None, True) == "cpu"
        assert pyebm.explain(obj, obs, self.config(), 3, init=y).path == "one call"


EBT_ARGS = dict(vocab_size=32, embedding_dim=16, num_transformer_blocks=2, multiheaded_attention_heads=2,
                context_length=12, mcmc_num_steps=2)
EBT_NAMES = [n for n, _ in EBT(**EBT_ARGS).named_parameters()]


class EBTCase(Case):
    name = "EBT"

    def make(self, seed=0):
        torch.manual_seed(seed)
        m = EBT(**EBT_ARGS, dtype=DT)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if n.endswith("norm.weight"):
                    p.copy_(1 + 0.3 * torch.randn_like(p))
        return m

    def inputs(self, dtype=DT):
        g = torch.Generator().manual_seed(3)
        return (torch.randint(0, 32, (2, 5), generator=g), torch.randn(2, 2, 5, 32, generator=g, dtype=DT).to(dtype))

    def fast(self, obj):
        tok, init = self.inputs(dtype_of(obj))
        r = obj.think(tok, steps=2, alpha=0.7, noise=0.0, samples=2, positions="all", init=init)
        return [r.logits, r.energy]

    def reference(self, obj):
        tok, init = self.inputs(dtype_of(obj))
        params = {n: resolve(obj, n).detach() for n in EBT_NAMES}  # as the module resolves them now
        r = ebt_ref.think(params, obj.config, tok, init, steps=2, alpha=0.7)
        return [r["logits"], r["energy"]]

    def assert_fast_path(self, obj):
        assert _dispatch.ebt_attention(obj, torch.device("cpu")) == "torch"  # the cached, packed path


class PolicyCase(Case):
    """An EnergyPolicy; its module is the energy."""

    def module(self, obj):
        return obj.energy

    def with_module(self, obj, module):
        new = copy.copy(obj)
        new.energy = module
        return new

    def obs(self, dtype=DT):
        raise NotImplementedError

    def fast(self, obj):
        actions = obj.act(self.obs(dtype_of(obj.energy)), generator=0)
        res = obj.last_result
        return [actions, res.y] + ([] if res.energy is None else [res.energy])


class EBTPolicyPolicyCase(PolicyCase):
    name = "EnergyPolicy.ebt_policy"

    def make(self, seed=0):
        return EnergyPolicy.ebt_policy(EBTPolicyCase().make(seed), alpha=2.0, max_steps=4, min_grad=1e-6,
                                       candidates=3, n_action_steps=2)

    def obs(self, dtype=DT):
        return EBTPolicyCase().inputs(dtype)[0]

    def assert_fast_path(self, obj):
        obs = self.obs()
        assert pyebm.explain(obj.energy, obs, obj._config(obs.device), obj.candidates,
                             event_shape=obj.energy.event_shape).path == "one call"


class IBCCase(PolicyCase):
    method = "langevin"

    @property
    def name(self):
        return f"EnergyPolicy.ibc[{self.method}]"

    def make(self, seed=0):
        torch.manual_seed(seed)
        energy = MLPEnergy(2 * 3, 2 * 2, hidden=(16, 16), activation="relu", residual=True, dtype=DT)
        return EnergyPolicy.ibc(energy, action_dim=2, obs_dim=3, horizon=2, n_obs_steps=2, method=self.method,
                                candidates=16, steps=4)

    def obs(self, dtype=DT):
        return torch.randn(3, 2, 3, generator=torch.Generator().manual_seed(4), dtype=DT).to(dtype)

    def assert_fast_path(self, obj):
        obs = self.obs().reshape(3, 6)
        path = pyebm.explain(obj.energy, obs, obj._config(obs.device), obj.candidates).path
        assert path == ("one call" if self.method == "langevin" else "per step")
        assert _dispatch.mlp_call(obj.energy, obj.energy.prepare(obs), torch.zeros(3, 1, 4, dtype=DT), None) == "plan"


class IBCDfoCase(IBCCase):
    method = "dfo"


CASES = [MLPCase(), EBTCase(), EBTPolicyCase(), EBTPolicyPolicyCase(), IBCCase(), IBCDfoCase()]
CASE_IDS = [c.name for c in CASES]


def assert_close(got, want, tol):
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape, (i, a.shape, b.shape)
        torch.testing.assert_close(a, b.to(a.dtype), rtol=tol, atol=tol, msg=f"output {i}")


def changed(got, first) -> bool:
    return any(not torch.equal(a, b) for a, b in zip(got, first))


def assert_current(case: Case, obj, tol=None):
    """The fast path's results equal the reference's on the weights the module holds now."""
    assert_close(case.fast(obj), case.reference(obj), tol or case.tol)


def used(case: Case, seed=0):
    """A model that has run its fastest path (so every packed state exists)."""
    obj = case.make(seed)
    case.assert_fast_path(obj)
    first = case.fast(obj)
    assert_close(first, case.reference(obj), case.tol)
    return obj, first


def perturb_(module: nn.Module, scale=0.05, seed=7):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


# -- copies -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_copies_of_a_used_model(case, how):
    obj, first = used(case)
    if how == "deepcopy":
        twin = copy.deepcopy(obj)
    elif how == "pickle":
        twin = pickle.loads(pickle.dumps(obj))
    else:
        buf = io.BytesIO()
        torch.save(obj, buf)
        buf.seek(0)
        twin = torch.load(buf, weights_only=False)
    assert_close(case.fast(twin), first, case.tol)
    case.assert_fast_path(twin)
    # the copy is independent: changing it changes neither the original nor its earlier results
    before = [t.clone() for t in first]
    perturb_(case.module(twin))
    case.module(twin).load_state_dict(case.module(case.make(seed=5)).state_dict())
    assert_current(case, twin)
    assert_close(case.fast(obj), before, case.tol)
    assert_close(first, before, 0.0)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_state_dict_round_trip(case):
    obj, first = used(case)
    fresh = case.make(seed=3)
    case.module(fresh).load_state_dict(case.module(obj).state_dict())
    assert_close(case.fast(fresh), first, case.tol)


# -- weight changes -----------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_load_state_dict_and_optimizer_steps(case):
    obj, first = used(case)
    case.module(obj).load_state_dict(case.module(case.make(seed=11)).state_dict())
    assert_current(case, obj)
    assert changed(case.fast(obj), first)
    opt = torch.optim.SGD(case.module(obj).parameters(), lr=0.1, momentum=0.9)
    for _ in range(2):
        opt.zero_grad()
        sum((p - 0.3).square().sum() for p in case.module(obj).parameters()).backward()
        opt.step()
        assert_current(case, obj)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_data_assignment_on_every_parameter(case):
    obj, first = used(case)
    g = torch.Generator().manual_seed(8)
    for p in case.module(obj).parameters():
        p.data = p.data + 0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype)  # new storage
    assert_current(case, obj)
    for p in case.module(obj).parameters():
        if p.dim() == 2:
            p.data = p.data.t().contiguous().t()  # the same values in another layout
    assert_current(case, obj)
    assert changed(case.fast(obj), first)


def linears(module):
    return [m for m in module.modules() if isinstance(m, nn.Linear)]


class _Scale(nn.Module):
    def forward(self, w):
        return 1.1 * w


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("kind", ["parametrize", "spectral_norm", "weight_norm", "old_spectral_norm"])
def test_parametrizations(case, kind):
    obj, first = used(case)
    module = case.module(obj)
    module.eval()  # spectral norm: the stored power-iteration vectors, the same weight at every access
    targets = linears(module)[:3]
    for lin in targets:
        if kind == "parametrize":
            parametrize.register_parametrization(lin, "weight", _Scale())
        elif kind == "spectral_norm":
            torch.nn.utils.parametrizations.spectral_norm(lin)
        elif kind == "weight_norm":
            torch.nn.utils.parametrizations.weight_norm(lin)
        else:
            torch.nn.utils.spectral_norm(lin)
            _refresh_old_spectral_norm(lin)
    assert_current(case, obj)
    if kind != "weight_norm":  # weight_norm keeps the weight's value: only the others change the results
        assert changed(case.fast(obj), first)
    # training through the parametrization still works after inference calls, step after step
    module.train()
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.01)
    for _ in range(2):
        opt.zero_grad()
        if kind == "old_spectral_norm":
            for lin in targets:
                _refresh_old_spectral_norm(lin)
        loss = sum(lin.weight.square().sum() for lin in targets)
        loss.backward()
        opt.step()
        case.fast(obj)
    module.eval()
    if kind == "old_spectral_norm":
        for lin in targets:
            _refresh_old_spectral_norm(lin)
    assert_current(case, obj)


def _refresh_old_spectral_norm(lin):
    """torch.nn.utils.spectral_norm sets `weight` in a forward pre-hook: run it as a forward would."""
    for hook in lin._forward_pre_hooks.values():
        hook(lin, None)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_averaged_model(case):
    from torch.optim.swa_utils import AveragedModel

    obj, first = used(case)
    avg = AveragedModel(case.module(obj))
    averaged = case.with_module(obj, avg.module)
    assert_close(case.fast(averaged), first, case.tol)
    perturb_(case.module(obj), seed=12)
    avg.update_parameters(case.module(obj))
    assert_current(case, averaged)
    assert changed(case.fast(averaged), first)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_functional_call(case):
    obj, first = used(case)
    module = case.module(obj)
    swapped = {n: p.detach() * 0.9 for n, p in module.named_parameters()}

    class Call(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = module

        def forward(self):
            return case.fast(obj)

    got = torch.func.functional_call(Call(), {f"inner.{n}": t for n, t in swapped.items()}, ())
    twin = copy.deepcopy(obj)
    case.module(twin).load_state_dict(swapped, strict=False)
    assert_close(got, case.reference(twin), case.tol)
    assert_close(case.fast(obj), first, case.tol)  # the module's own weights again afterwards


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_dtype_moves(case):
    obj, first = used(case)
    case.module(obj).float()
    assert_current(case, obj, tol=2e-3)
    case.module(obj).double()
    assert_close(case.fast(obj), [t.double() for t in case.reference(obj)], case.tol)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_results_are_values_at_call_time(case):
    obj, first = used(case)
    before = [t.clone() for t in first]
    perturb_(case.module(obj), scale=0.5)
    assert_close(first, before, 0.0)
    assert_current(case, obj)


# -- threads ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_four_threads_equal_sequential_results(case):
    obj, first = used(case)
    if isinstance(case, EBTCase):
        runs = 3
    else:
        runs = 6
    results: Dict[int, list] = {}
    errors: list = []

    def worker(i):
        try:
            results[i] = [case.fast(obj) for _ in range(runs)]
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for outs in results.values():
        for out in outs:
            assert_close(out, first, 0.0)


def test_a_thread_replacing_weights_never_crashes_a_call():
    """One thread gives every parameter of a wide MLP new storage (.data =) while two threads call the fused
    paths: no call may read freed memory. A call computes with the weights it read when it started (each
    parameter's old or new tensor); after the writer stops, results equal the reference again."""
    torch.manual_seed(0)
    m = MLPEnergy(16, 8, hidden=(1024, 1024))
    x, y = torch.randn(2, 16), torch.randn(2, 64, 8)
    ctx = m.prepare(x)
    m.energy_and_grad(ctx, y)
    stop = threading.Event()
    errors: list = []

    def writer():
        g = torch.Generator().manual_seed(1)
        while not stop.is_set():
            for p in m.parameters():
                p.data = torch.randn(p.shape, generator=g) * 0.03

    def caller():
        try:
            for _ in range(25):
                E, G = m.energy_and_grad(ctx, y)
                assert bool(torch.isfinite(E).all()) and bool(torch.isfinite(G).all())
                minimize(m, x, 4, Descent.gd(steps=2))
        except BaseException as exc:
            errors.append(exc)

    w = threading.Thread(target=writer)
    callers = [threading.Thread(target=caller) for _ in range(2)]
    w.start()
    for t in callers:
        t.start()
    for t in callers:
        t.join()
    stop.set()
    w.join()
    assert not errors, errors
    E, G = m.energy_and_grad(ctx, y)
    E_ref, G_ref = m.energy_and_grad(ctx, y, backend="torch")
    torch.testing.assert_close(E, E_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(G, G_ref, rtol=1e-4, atol=1e-5)


# -- child processes -----------------------------------------------------------------------------------

def _child_fast(case_index: int, obj):
    torch.set_num_threads(1)
    return CASES[case_index].fast(obj)


def test_spawn_children_compute_used_models():
    """A spawned child gets each used model by pickling (a multiprocessing inference server does this)."""
    objs = [used(case)[0] for case in CASES]
    want = [case.fast(obj) for case, obj in zip(CASES, objs)]
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        got = [pool.apply(_child_fast, (i, obj)) for i, obj in enumerate(objs)]
    for case, g, w in zip(CASES, got, want):
        assert_close(g, w, case.tol)


def _fork_child(conn, fn: Callable):
    try:  # plain bytes: torch's own reductions would pass storages by file descriptor
        conn.send(("ok", [t.numpy().tobytes() for t in fn()]))
    except BaseException as exc:  # reported to the parent
        conn.send(("error", repr(exc)))
    conn.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_fork_children_after_fast_path_use(case):
    """A child forked after the parent ran its parallel kernels computes the same results, and does not
    hang in its first parallel region (GNU OpenMP cannot run one in such a child: pyebm's fork handler
    makes the child's kernels single-threaded)."""
    obj, first = used(case)
    if torch.get_num_threads() > 1:  # make sure the parent's thread pool exists
        big = MLPEnergy(8, 8, hidden=(256, 256))
        big.energy_and_grad(big.prepare(torch.randn(8, 8)), torch.randn(8, 256, 8))
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_fork_child, args=(child, lambda: case.fast(obj)))
    proc.start()
    ok = parent.poll(120)
    if not ok:
        proc.kill()
        pytest.fail("the forked child did not answer within 120 s (hung in a parallel region?)")
    status, got = parent.recv()
    proc.join(30)
    assert status == "ok", got
    got = [torch.frombuffer(bytearray(b), dtype=t.dtype).reshape(t.shape) for b, t in zip(got, first)]
    assert_close(got, first, case.tol)
