"""EBT(..., cuda_graph=True): one think step captured in a CUDA graph, replayed by think and generate.

On the CPU: the option's errors, and the captured step's own code (static cache of a fixed capacity, mask
computed on the device, positions as a device tensor) run eagerly through the same functions the capture
uses (``static="eager"``), against the eager think / generate; that this code reads nothing on the host and
copies nothing to the device (a dispatch mode that refuses such ops); the keying and the invalidation of the
captured steps on weight changes. Marked ``gpu``: the graphs themselves, replay against eager.
"""
import copy
import pickle

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pyebm import _dispatch, _state
from pyebm.models import EBT
from pyebm.models.ebt import _GRAPHS, _capacity_bucket

V, D, LAYERS, HEADS, CTX = 64, 32, 2, 4, 40
VARIANTS = ["default", "time_embed"]

pytestmark = pytest.mark.usefixtures("one_thread")


def make_model(ebt_type="default", dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    args = dict(vocab_size=V, embedding_dim=D, num_transformer_blocks=LAYERS, multiheaded_attention_heads=HEADS,
                context_length=CTX, ebt_type=ebt_type, mcmc_num_steps=2)
    args.update(kw)
    model = EBT(**args)
    with torch.no_grad():  # norms away from their trivial initial value
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
    return model.to(dtype)


def rand_tokens(B, S, device="cpu"):
    return torch.randint(0, V, (B, S)).to(device)


def static_think(model, tokens, *, steps=None, alpha=None, noise=None, samples=1, select="min", accept_lower=False,
                 positions="last", init=None, generator=None, grad_clamp=None):
    """think() through the captured step's code, run without a graph."""
    return model._think(tokens, steps, alpha, noise, samples, select, accept_lower, positions, init, generator,
                        grad_clamp, static="eager")


def static_generate(model, tokens, n, *, steps=None, alpha=None, noise=None, samples=1, select="min",
                    accept_lower=False, init=None, grad_clamp=None, temperature=0.0, top_p=0.9, eos_token_id=None,
                    generator=None):
    return model._generate(tokens, n, steps, alpha, noise, samples, select, accept_lower, init, grad_clamp, temperature,
                           top_p, eos_token_id, generator, static="eager")


def graphs_of(model):
    return _state.packs(model).get(_GRAPHS, {})


def assert_same_think(got, want, rtol=1e-10, atol=1e-10, ties=0):
    """ties=G: the G samples start equal (init="zeros", no noise), so they reach the same state up to the last bit
    of each path's summation order and either path may pick any of them; the chosen state must still agree."""
    if ties:
        assert got.sample.shape == want.sample.shape
        assert bool(((got.sample >= 0) & (got.sample < ties)).all()), got.sample
    else:
        assert torch.equal(got.sample, want.sample)
    for name in ("logits", "energy", "initial_energy"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=rtol, atol=atol,
                                   msg=lambda m, name=name: f"{name}: {m}")


def fp32_tolerance(x32, x64, floor=1e-6):
    """A small multiple of the eager fp32 path's own error against fp64 (as tests/test_ebt.py bounds it)."""
    return 8 * float((x32.double() - x64).abs().max()) + floor * max(1.0, float(x64.abs().max()))


def assert_close_fp32(got, want, ref64):
    """``got`` (fp32, the captured step) agrees with fp64 as closely as ``want`` (fp32, eager) does, within a small
    multiple; all three choose the same samples."""
    assert torch.equal(got.sample, want.sample) and torch.equal(want.sample, ref64.sample)
    for name in ("logits", "energy", "initial_energy"):
        g, w, r = getattr(got, name), getattr(want, name), getattr(ref64, name)
        torch.testing.assert_close(g.double(), r, rtol=0, atol=fp32_tolerance(w, r),
                                   msg=lambda m, name=name: f"{name}: {m}")


def fp64_twin(model):
    """The same weights in fp64 on the ATen attention path (the Triton kernels take fp32 / bf16 / fp16)."""
    twin = copy.deepcopy(model).double()
    twin.backend, twin.cuda_graph = "torch", False
    return twin


# -- the option ---------------------------------------------------------------------------------------

def test_cuda_graph_option_errors():
    with pytest.raises(TypeError, match="cuda_graph must be True or False; got 1"):
        EBT(vocab_size=V, embedding_dim=D, multiheaded_attention_heads=HEADS, cuda_graph=1)
    with pytest.raises(TypeError, match="cuda_graph must be True or False; got 'yes'"):
        EBT(vocab_size=V, embedding_dim=D, multiheaded_attention_heads=HEADS, cuda_graph="yes")
    model = make_model(cuda_graph=True)
    tok = rand_tokens(1, 4)
    with pytest.raises(ValueError, match="EBT.think: cuda_graph=True needs the model on a CUDA device; it is on cpu"):
        model.think(tok)
    with pytest.raises(ValueError, match="EBT.generate: cuda_graph=True needs the model on a CUDA device"):
        model.generate(tok, 2)
    model.cuda_graph = None
    with pytest.raises(TypeError, match="cuda_graph must be True or False; got None"):
        model.think(tok)
    model.cuda_graph = False
    assert model.think(tok).logits.shape == (1, V)


def test_generator_is_refused():
    """The captured step draws from the default CUDA generator, as minimize(..., cuda_graph=True) does."""
    why = _dispatch.ebt_think_graph_refusal(torch.device("cuda", 0), torch.Generator())
    assert why is not None and why.startswith("generator:") and "generator=None" in why
    assert _dispatch.ebt_think_graph_refusal(torch.device("cpu"), None).startswith("cuda_graph=True needs")
    assert _dispatch.ebt_think_graph_refusal(torch.device("cpu"), None, capture=False) is None
    model = make_model()
    tok = rand_tokens(1, 4)
    with pytest.raises(ValueError, match="EBT.think: generator: .*pass generator=None"):
        static_think(model, tok, generator=1)
    with pytest.raises(ValueError, match="EBT.generate: generator: .*pass generator=None"):
        static_generate(model, tok, 2, generator=torch.Generator().manual_seed(0))


def test_option_travels_with_the_model_and_graphs_do_not(tmp_path):
    pytest.importorskip("safetensors")
    model = make_model()
    static_think(model, rand_tokens(2, 3), samples=2, init="zeros")
    assert len(graphs_of(model)) == 1
    model.cuda_graph = True
    for other in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        assert other.cuda_graph is True and _GRAPHS not in _state.packs(other)
    assert model._pretrained_args()["cuda_graph"] is True
    model.save_pretrained(tmp_path)
    assert type(model).from_pretrained(tmp_path).cuda_graph is True
    model.float()  # a move drops the packed state, graphs included
    assert _GRAPHS not in _state.packs(model)


def test_capacity_bucket():
    assert [_capacity_bucket(n, 41) for n in (1, 16, 17, 32, 33, 40, 41)] == [16, 16, 32, 32, 41, 41, 41]
    assert _capacity_bucket(5, 8) == 8 and _capacity_bucket(8, 8) == 8


# -- the captured step's code, run eagerly ----------------------------------------------------------------

@pytest.mark.parametrize("ebt_type", VARIANTS)
@pytest.mark.parametrize("B,S,G,select,accept_lower", [(1, 1, 1, "min", False), (2, 5, 3, "max_gap", True),
                                                        (3, 17, 2, "max", False)])
def test_static_step_equals_eager_think(ebt_type, B, S, G, select, accept_lower):
    """The static cache (a whole bucket, zeros past the cache's length, masked on the device) gives eager
    think's numbers: fp64, so only the summation order over the longer masked rows differs."""
    model = make_model(ebt_type, seed=B + S)
    tok = rand_tokens(B, S)
    for positions in ("last", "all"):
        P = 1 if positions == "last" else S
        init = torch.randn(B, G, P, V, dtype=torch.float64)
        kw = dict(steps=2, alpha=0.3, samples=G, select=select, accept_lower=accept_lower, positions=positions,
                  grad_clamp=5.0)
        assert_same_think(static_think(model, tok, init=init, **kw), model.think(tok, init=init, **kw))
        cache = model.prepare(tok)  # a cache, and an init [B, P, V] (one sample: G copies would tie exactly)
        one = {**kw, "samples": 1}
        assert_same_think(static_think(model, cache, init=init[:, 0], **one),
                          model.think(cache, init=init[:, 0], **one))
    zeros = dict(steps=2, alpha=0.3, samples=G, init="zeros")
    assert_same_think(static_think(model, tok, **zeros), model.think(tok, **zeros), ties=G)


def test_static_step_reuses_the_bucket_and_leaves_the_cache_alone():
    model = make_model()
    kw = dict(steps=2, alpha=0.3, samples=2)
    for S in (3, 9, 14, 16):  # one bucket of 16 entries: one step, replayed with each prompt
        tok = rand_tokens(2, S)
        cache = model.prepare(tok)
        keys = [k.clone() for k in cache.keys]
        init = torch.randn(2, 2, 1, V, dtype=torch.float64)
        assert_same_think(static_think(model, cache, init=init, **kw), model.think(cache, init=init, **kw))
        assert all(torch.equal(a, b) for a, b in zip(keys, cache.keys)) and cache.length == S
    assert len(graphs_of(model)) == 1
    (entry,) = graphs_of(model).values()
    assert entry.capacity == 16
    static_think(model, rand_tokens(2, 17), init="zeros", **kw)  # the next bucket, and another init kind
    static_think(model, rand_tokens(1, 4), init="zeros", **kw)   # another batch size
    static_think(model, rand_tokens(2, 4), init="zeros", steps=3, alpha=0.3, samples=2)  # another schedule
    assert sorted(e.capacity for e in graphs_of(model).values()) == [16, 16, 16, 32]


@pytest.mark.parametrize("ebt_type", VARIANTS)
@pytest.mark.parametrize("samples,select,accept_lower", [(1, "min", False), (3, "max_gap", True)])
def test_static_generate_equals_eager_generate(ebt_type, samples, select, accept_lower):
    """generate through the static cache (the prompt copied in once, each new token's entries written there by
    extend) chooses the eager generate's tokens."""
    model = make_model(ebt_type, seed=3).float()
    B, S, N = 2, 4, 13  # 16 cache entries (default: capacity 16), or 17 with the time token (capacity 32)
    tok = rand_tokens(B, S)
    init = torch.randn(B, samples, N, V)
    opts = dict(steps=2, alpha=30.0, select=select, accept_lower=accept_lower, samples=samples)
    want = model.generate(tok, N, init=init, **opts)
    got = static_generate(model, tok, N, init=init, **opts)
    assert torch.equal(got, want), (got, want)
    (entry,) = graphs_of(model).values()
    assert entry.capacity == _capacity_bucket(S + N - 1 + model.config.offset, CTX + model.config.offset)
    again = static_generate(model, rand_tokens(B, S), N, init=init, **opts)  # the same step, a new prompt
    assert again.shape == (B, S + N) and len(graphs_of(model)) == 1


def test_static_generate_init_kinds_and_eos():
    model = make_model("default", denoising_initial_condition="zeros").float()
    tok = rand_tokens(2, 3)
    opts = dict(steps=2, alpha=30.0, samples=1)  # init None: the model's zeros (G copies would tie exactly)
    assert torch.equal(static_generate(model, tok, 5, **opts), model.generate(tok, 5, **opts))
    eos = int(model.generate(tok, 1, **opts)[0, -1])
    got = static_generate(model, tok, 6, eos_token_id=eos, **opts)
    assert torch.equal(got, model.generate(tok, 6, eos_token_id=eos, **opts))


# -- no host reads and no host-to-device copies inside the captured step ----------------------------------

_HOST_OPS = {"_local_scalar_dense", "lift_fresh", "lift_fresh_copy", "nonzero", "masked_select", "unique",
             "_unique2", "unique_consecutive", "repeat_interleave", "item", "equal"}


class _RefuseHostSync(TorchDispatchMode):
    """Fails on every op that reads a tensor on the host (``.item()``, ``int(t)``, ``bool(t)``, data-dependent
    shapes) or makes a tensor from host data (``torch.tensor(...)``: a host-to-device copy on a GPU)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in _HOST_OPS:
            raise AssertionError(f"the step reads the host or copies host data: aten.{name}")
        return func(*args, **(kwargs or {}))


def _entry(model, tok, **kw):
    static_think(model, tok, **kw)
    (entry,) = graphs_of(model).values()
    return entry


@pytest.mark.parametrize("ebt_type", VARIANTS)
@pytest.mark.parametrize("init,noise,G", [("zeros", 0.0, 1), ("normal", 0.5, 3), ("tensor", 0.0, 2)])
def test_captured_step_reads_nothing_on_the_host(ebt_type, init, noise, G):
    model = make_model(ebt_type).float()
    tok = rand_tokens(2, 5)
    init_arg = torch.randn(2, G, 1, V) if init == "tensor" else init
    entry = _entry(model, tok, init=init_arg, noise=noise, samples=G, accept_lower=True, select="max_gap",
                   grad_clamp=3.0)
    with _RefuseHostSync():
        out = entry.step(model)
    assert out[0].shape == (2, 1, V)
    # the harness does see the eager path's host reads (the visible-context test of _rows)
    pk = model._packed()
    cache = model.prepare(tok)
    with pytest.raises(AssertionError, match="_local_scalar_dense"), _RefuseHostSync():
        model._rows(pk, cache, entry.pos, G)
    with pytest.raises(AssertionError, match="lift_fresh"), _RefuseHostSync():
        torch.tensor([4])


def test_captured_step_reads_nothing_on_the_host_triton(triton_device):
    """The same with the Triton kernels (interpreted on CPU tensors): their visible-context counts stay on
    the device (the kernels read the loop bound themselves)."""
    pytest.importorskip("triton")
    from pyebm import _backend
    if not _backend.backends()["triton"] and not _backend.triton_interpret():
        pytest.skip("triton backend not usable here")
    model = make_model("time_embed", backend="triton").float().to(triton_device)
    eager = make_model("time_embed").float().to(triton_device)
    tok = rand_tokens(2, 5, triton_device)
    init = torch.randn(2, 2, 1, V, device=triton_device)
    kw = dict(init=init, samples=2, alpha=0.3)
    got = static_think(model, tok, **kw)
    assert_close_fp32(got, eager.think(tok, **kw), fp64_twin(eager).think(tok, **{**kw, "init": init.double()}))
    (entry,) = graphs_of(model).values()
    with _RefuseHostSync():
        entry.step(model)


# -- keying and invalidation --------------------------------------------------------------------------

def _changes():
    def optimizer_step(m):
        w = m.embeddings.weight
        opt = torch.optim.SGD(m.parameters(), lr=0.05)
        m.zero_grad()
        pred = torch.softmax(torch.randn(2, 3, V, dtype=w.dtype, device=w.device), -1)
        m(rand_tokens(2, 3, w.device), pred).sum().backward()
        opt.step()

    def load_state_dict(m):  # the weights, not the learned step size and noise (0-d)
        sd = {k: (v + 0.05 * torch.randn_like(v) if v.dim() else v) for k, v in m.state_dict().items()}
        m.load_state_dict(sd)

    def data_assign(m):
        w = m.transformer.layers[0].feed_forward.w2.weight
        w.data = w.data * 1.5

    def version_less_write_and_repack(m):
        m.embeddings.weight.data.mul_(0.5)  # not seen by the version counter: repack() is the documented way
        _state.repack(m)

    def learned_alpha(m):
        with torch.no_grad():
            m.alpha.mul_(0.5)

    return [optimizer_step, load_state_dict, data_assign, version_less_write_and_repack, learned_alpha]


@pytest.mark.parametrize("change", _changes(), ids=lambda f: f.__name__)
def test_weight_changes_capture_again(change):
    """A step reads the pack it was made with: after a weight change it is dropped (with every other step of
    the old weights) and made again, so the step computes with the new weights."""
    model = make_model("time_embed")
    tok = rand_tokens(2, 4)
    init = torch.randn(2, 2, 1, V, dtype=torch.float64)
    kw = dict(samples=2, init=init, alpha=None if change.__name__ == "learned_alpha" else 0.3)
    static_think(model, tok, **kw)
    static_think(model, tok, **{**kw, "samples": 1, "init": init[:, :1]})  # a second step of the old weights
    before = dict(graphs_of(model))
    assert len(before) == 2
    old = static_think(model, tok, **kw)
    assert dict(graphs_of(model)) == before  # unchanged weights: the same steps
    change(model)
    new = static_think(model, tok, **kw)
    after = graphs_of(model)
    entry = next(e for k, e in after.items() if k[2] == 2)  # key[2]: G
    assert entry not in before.values() and entry.pack is model._packed()
    if change.__name__ == "learned_alpha":  # the weights are the same: the other step stays
        assert len(after) == 2
    else:  # the other step read the old weights: dropped
        assert len(after) == 1
    assert_same_think(new, model.think(tok, **kw))
    assert not torch.allclose(new.logits, old.logits)


def test_options_are_keys_and_scalars():
    model = make_model()
    tok = rand_tokens(2, 4)
    kw = dict(samples=2, init="zeros")
    static_think(model, tok, alpha=0.3, **kw)
    (first,) = graphs_of(model).values()
    static_think(model, tok, alpha=0.3, **kw)
    assert list(graphs_of(model).values()) == [first]
    static_think(model, tok, alpha=0.4, **kw)  # another step size: the same key, made again
    (second,) = graphs_of(model).values()
    assert second is not first and second.scalars[0] == 0.4
    static_think(model, tok, alpha=0.4, select="max", **kw)
    static_think(model, tok, alpha=0.4, accept_lower=True, **kw)
    static_think(model, tok, alpha=0.4, positions="all", **kw)
    assert len(graphs_of(model)) == 4


# -- the graphs (GPU) ---------------------------------------------------------------------------------------

def cuda_pair(ebt_type, seed=0, **kw):
    """(eager, graphed): fp32 models on the GPU with the same weights, the second with cuda_graph=True."""
    eager = make_model(ebt_type, seed=seed, **kw).float().cuda()
    graphed = copy.deepcopy(eager)
    graphed.cuda_graph = True
    return eager, graphed


@pytest.mark.gpu
@pytest.mark.parametrize("ebt_type", VARIANTS)
@pytest.mark.parametrize("backend", [None, "torch"])
def test_graph_think_replays_eager(ebt_type, backend):
    eager, graphed = cuda_pair(ebt_type, backend=backend)
    ref64 = fp64_twin(eager)
    for B, S, G, positions in [(1, 3, 1, "last"), (2, 5, 4, "last"), (3, 20, 2, "last"), (2, 6, 3, "all")]:
        for trial in range(3):  # captured on the first call, replayed with new prompts after
            tok = rand_tokens(B, S, "cuda")
            P = 1 if positions == "last" else S
            init = torch.randn(B, G, P, V, device="cuda")
            kw = dict(steps=2, alpha=0.3, samples=G, positions=positions, init=init, select="max_gap",
                      accept_lower=trial == 1)
            want = eager.think(tok, **kw)
            got = graphed.think(tok, **kw)
            assert_close_fp32(got, want, ref64.think(tok, **{**kw, "init": init.double()}))
            assert torch.equal(got.logits.argmax(-1), want.logits.argmax(-1))
    assert all(e.graph is not None for e in graphs_of(graphed).values())


@pytest.mark.gpu
@pytest.mark.parametrize("ebt_type", VARIANTS)
@pytest.mark.parametrize("B,S,N,G", [(1, 3, 6, 1), (2, 5, 12, 3), (4, 20, 8, 2)])
def test_graph_generate_replays_eager(ebt_type, B, S, N, G):
    eager, graphed = cuda_pair(ebt_type, seed=B)
    for trial in range(2):
        tok = rand_tokens(B, S, "cuda")
        init = torch.randn(B, G, N, V, device="cuda")
        opts = dict(steps=2, alpha=30.0, samples=G, init=init, select="min")
        want = eager.generate(tok, N, **opts)
        got = graphed.generate(tok, N, **opts)
        assert torch.equal(got, want), (got, want)
    assert len(graphs_of(graphed)) == 1


@pytest.mark.gpu
def test_graph_generate_draws_as_eager():
    """init='normal' and top-p sampling from the default CUDA generator: after the capture (whose warm-up runs
    draw too), a replay from the same generator state draws the eager numbers."""
    eager, graphed = cuda_pair("default")
    tok = rand_tokens(2, 4, "cuda")
    opts = dict(steps=2, alpha=1.0, samples=2, init="normal", temperature=0.8, top_p=0.9)
    graphed.generate(tok, 5, **opts)  # capture
    for seed in (1, 2):
        torch.manual_seed(seed)
        want = eager.generate(tok, 5, **opts)
        torch.manual_seed(seed)
        got = graphed.generate(tok, 5, **opts)
        assert torch.equal(got, want), (got, want)


@pytest.mark.gpu
@pytest.mark.parametrize("change", _changes(), ids=lambda f: f.__name__)
def test_graph_replays_see_weight_changes(change):
    """After a weight change the graphed model computes what an eager copy of the changed model computes."""
    eager, graphed = cuda_pair("time_embed", mcmc_step_size=0.5)  # the learned alpha (a small one: no near-ties)
    tok = rand_tokens(2, 4, "cuda")
    init = torch.randn(2, 3, 6, V, device="cuda")
    opts = dict(steps=2, samples=3, init=init)
    kw = dict(steps=2, samples=3, init=init[:, :, :1])
    assert torch.equal(graphed.generate(tok, 6, **opts), eager.generate(tok, 6, **opts))
    before = graphed.think(tok, **kw)  # captured with the old weights
    change(graphed)
    eager = copy.deepcopy(graphed)  # the changed weights, exactly (the change itself may not be bitwise repeatable)
    eager.cuda_graph = False
    assert torch.equal(graphed.generate(tok, 6, **opts), eager.generate(tok, 6, **opts))
    got, want = graphed.think(tok, **kw), eager.think(tok, **kw)
    assert_close_fp32(got, want, fp64_twin(eager).think(tok, **{**kw, "init": kw["init"].double()}))
    assert not torch.allclose(got.energy, before.energy, rtol=1e-3, atol=1e-3)
    (entry,) = [e for e in graphs_of(graphed).values() if e.need_energy]
    assert entry.pack is graphed._packed() and entry.graph is not None


@pytest.mark.gpu
def test_graph_autograd_backward():
    """backward='autograd' (the input gradient by torch.autograd.grad) captured as well."""
    eager, graphed = cuda_pair("default", backward="autograd")
    tok = rand_tokens(2, 5, "cuda")
    init = torch.randn(2, 2, 1, V, device="cuda")
    ref64 = fp64_twin(eager)
    for _ in range(2):
        kw = dict(steps=2, alpha=0.3, samples=2, init=init)
        want, got = eager.think(tok, **kw), graphed.think(tok, **kw)
        assert_close_fp32(got, want, ref64.think(tok, **{**kw, "init": init.double()}))
