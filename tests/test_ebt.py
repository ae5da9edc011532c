"""pyebm.models.EBT (cached context, batched samples, hand-written input gradient) against the plain
full-recompute algorithm of pyebm.reference.ebt, on small random models."""
import pytest
import torch

from pyebm.models import EBT, EBTCache
from pyebm.reference import ebt as ref

V, D, LAYERS, HEADS, CTX = 64, 32, 2, 4, 24
VARIANTS = ["default", "time_embed"]


def make_model(ebt_type="default", dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    args = dict(vocab_size=V, embedding_dim=D, num_transformer_blocks=LAYERS, multiheaded_attention_heads=HEADS,
                context_length=CTX, ebt_type=ebt_type, mcmc_num_steps=2)
    args.update(kw)
    model = EBT(**args)
    with torch.no_grad():  # norms and the time token away from their trivial initial values
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
    return model.to(dtype)


def params_of(model, dtype=None):
    return {k: (v.detach() if dtype is None else v.detach().to(dtype)) for k, v in model.named_parameters()}


def tolerance(x32, x64, floor=1e-6):
    """A small multiple of the reference's own fp32 error."""
    return 8 * float((x32.double() - x64).abs().max()) + floor * max(1.0, float(x64.abs().max()))


def rand_tokens(B, S, gen=None):
    return torch.randint(0, V, (B, S), generator=gen)


# -- energies and gradients --------------------------------------------------------------------------

@pytest.mark.parametrize("ebt_type", VARIANTS)
@pytest.mark.parametrize("options", [{}, {"vocab_to_embed_uses_prob_dist": True},
                                     {"ffn_dim_multiplier": 1.5, "ebt_act_func": "gelu"}])
def test_energy_and_grad_all_positions_fp64(ebt_type, options):
    model = make_model(ebt_type, **options)
    params = params_of(model)
    B, S = 3, 7
    tok = rand_tokens(B, S)
    p = torch.softmax(torch.randn(B, S, V, dtype=torch.float64), -1)
    cache = model.prepare(tok)
    pk = model._packed()
    rows = model._rows(pk, cache, torch.arange(S), 1)
    for landscape in range(model.config.num_landscapes):
        E_ref, g_ref = ref.energy_grad(params, model.config, tok, p, landscape)
        E, g = model._vocab_energy(pk, cache, landscape, p, rows, True)
        torch.testing.assert_close(E, E_ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("ebt_type", VARIANTS)
def test_energy_and_grad_protocol_fp32(ebt_type):
    model64 = make_model(ebt_type)
    model32 = make_model(ebt_type).float()
    B, S, K = 2, 5, 3
    tok = rand_tokens(B, S)
    y64 = torch.softmax(3 * torch.randn(B, K, V, dtype=torch.float64), -1)
    land = model64.config.num_landscapes - 1
    # reference: the K candidates are K separate full sequences whose last position carries the candidate
    tok_k = tok.repeat_interleave(K, 0)
    filler = torch.softmax(torch.randn(B * K, S, V, dtype=torch.float64), -1)
    filler[:, -1] = y64.reshape(B * K, V)
    outs = {}
    for dt in (torch.float64, torch.float32):
        E, g = ref.energy_grad(params_of(model64, dt), model64.config, tok_k, filler.to(dt), land)
        outs[dt] = (E[:, -1].reshape(B, K), g[:, -1].reshape(B, K, V))
    ctx = model32.prepare(tok)
    assert isinstance(ctx, EBTCache) and ctx.landscape == land
    E, g = model32.energy_and_grad(ctx, y64.float())
    E_only = model32.energy(ctx, y64.float())
    assert E.shape == (B, K) and g.shape == (B, K, V) and E.dtype == torch.float32
    tE = tolerance(outs[torch.float32][0], outs[torch.float64][0])
    tg = tolerance(outs[torch.float32][1], outs[torch.float64][1])
    torch.testing.assert_close(E.double(), outs[torch.float64][0], rtol=0, atol=tE)
    torch.testing.assert_close(E_only.double(), outs[torch.float64][0], rtol=0, atol=tE)
    torch.testing.assert_close(g.double(), outs[torch.float64][1], rtol=0, atol=tg)


@pytest.mark.parametrize("ebt_type", VARIANTS)
@pytest.mark.parametrize("options", [{}, {"ffn_dim_multiplier": 1.5, "ebt_act_func": "gelu"}])
def test_rows_steps_all_positions_fp32(ebt_type, options):
    """float32 on the cpu backend: between the rows_linear products the fused torch.ops.pyebm.ebt_rows_* ops run
    (the attention with RoPE inside, the norms, the SwiGLU gate; another activation's gate in ATen). Every
    position of a prompt at once (each row sees its own prefix of the cache: n_visible), on every landscape:
    energies and gradients within the fp32 reference's own error of the fp64 reference."""
    from pyebm import _dispatch

    if not _dispatch.ebt_rows_steps(True):
        pytest.skip("built without the ebt_rows CPU kernels")
    model64 = make_model(ebt_type, **options)
    model32 = make_model(ebt_type, **options).float()
    B, S = 3, 7
    tok = rand_tokens(B, S)
    p = torch.softmax(torch.randn(B, S, V, dtype=torch.float64), -1)
    cache = model32.prepare(tok)
    pk = model32._packed()
    rows = model32._rows(pk, cache, torch.arange(S), 1)
    assert rows.fused is not None and rows.n_visible is not None
    for landscape in range(model32.config.num_landscapes):
        want = ref.energy_grad(params_of(model64), model64.config, tok, p, landscape)
        ref32 = ref.energy_grad(params_of(model64, torch.float32), model64.config, tok, p.float(), landscape)
        got = model32._vocab_energy(pk, cache, landscape, p.float(), rows, True)
        for x, w, r32 in zip(got, want, ref32):
            torch.testing.assert_close(x.double(), w, rtol=0, atol=tolerance(r32, w))


@pytest.mark.parametrize("ebt_type", VARIANTS)
@pytest.mark.parametrize("options", [{}, {"vocab_to_embed_uses_prob_dist": True}])
def test_rows_linear_path_fp32(ebt_type, options):
    """float32 on the cpu backend: the products of the prediction rows and of an extended token run
    torch.ops.pyebm.rows_linear (the pack holds transposed copies); energies, gradients, extended caches and
    think outputs stay within the fp32 reference's own error of the fp64 reference, as the ATen path does."""
    from pyebm import _dispatch

    if not hasattr(torch.ops.pyebm, "rows_linear"):
        pytest.skip("built without rows_linear")
    model64 = make_model(ebt_type, **options)
    model32 = make_model(ebt_type, **options).float()
    aten = make_model(ebt_type, backend="torch", **options).float()
    cpu = torch.device("cpu")
    assert _dispatch.ebt_rows_refusal(model32, cpu, torch.float32) is None
    assert model32._packed().rows and not aten._packed().rows and not model64._packed().rows
    assert "float32" in _dispatch.ebt_rows_refusal(model64, cpu, torch.float64)
    assert "ATen" in _dispatch.ebt_rows_refusal(aten, cpu, torch.float32)
    assert "rows" in model32.explain_energy(None, None) and "ATen" in aten.explain_energy(None, None)
    B, K = 3, 4
    tok = rand_tokens(B, 9)
    y = torch.softmax(2 * torch.randn(B, K, V, dtype=torch.float64), -1)
    outs = {}
    for name, m in (("64", model64), ("rows", model32), ("aten", aten)):
        c = m.prepare(tok[:, :6], capacity=7)
        m.extend(c, tok[:, 6:7])   # B * landscapes rows: rows_linear on the rows pack
        m.extend(c, tok[:, 7:])    # grows the cache, 2 tokens per prompt
        outs[name] = m.energy_and_grad(c, y.to(m._param.dtype))
    for i in range(2):
        want, a32 = outs["64"][i], outs["aten"][i].double()
        tol = tolerance(a32, want, floor=1e-6)
        torch.testing.assert_close(outs["rows"][i].double(), want, rtol=0, atol=tol)
    init = torch.randn(B, K, 1, V)
    r_rows = model32.think(tok, samples=K, init=init, alpha=0.2)
    r_aten = aten.think(tok, samples=K, init=init, alpha=0.2)
    torch.testing.assert_close(r_rows.energy, r_aten.energy, rtol=1e-4, atol=1e-5)
    model32.backward_mode = "autograd"  # no autograd formula for rows_linear: the ATen pack again
    assert "autograd" in _dispatch.ebt_rows_refusal(model32, cpu, torch.float32)
    assert not model32._packed().rows
    E, g = model32.energy_and_grad(model32.prepare(tok), y.float())
    torch.testing.assert_close(g.double(), outs["64"][1], rtol=0, atol=tolerance(outs["aten"][1].double(), outs["64"][1]))


@pytest.mark.parametrize("ebt_type", VARIANTS)
def test_autograd_backward_matches_manual(ebt_type):
    model = make_model(ebt_type)
    tok = rand_tokens(2, 6)
    y = torch.softmax(torch.randn(2, 4, V, dtype=torch.float64), -1)
    ctx = model.prepare(tok)
    E1, g1 = model.energy_and_grad(ctx, y)
    model.backward_mode = "autograd"
    E2, g2 = model.energy_and_grad(ctx, y)
    torch.testing.assert_close(E1, E2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("ebt_type", VARIANTS)
def test_extend_equals_fresh_prepare(ebt_type):
    model = make_model(ebt_type)
    tok = rand_tokens(2, 9)
    y = torch.softmax(torch.randn(2, 3, V, dtype=torch.float64), -1)
    grown = model.prepare(tok[:, :3])  # capacity 3: extending must grow the cache
    model.extend(grown, tok[:, 3:4])
    model.extend(grown, tok[:, 4:])
    fresh = model.prepare(tok)
    assert grown.length == fresh.length and torch.equal(grown.tokens, fresh.tokens)
    torch.testing.assert_close(model.energy(grown, y), model.energy(fresh, y), rtol=1e-12, atol=1e-12)


def test_forward_is_differentiable_and_matches_reference():
    model = make_model("time_embed")
    tok = rand_tokens(2, 5)
    p = torch.softmax(torch.randn(2, 5, V, dtype=torch.float64), -1)
    E = model(tok, p, landscape=1)
    torch.testing.assert_close(E, ref.energy(params_of(model), model.config, tok, p, 1))
    E.sum().backward()
    assert model.transformer.layers[0].attention.wq.weight.grad is not None


# -- think ---------------------------------------------------------------------------------------------

THINK_CASES = [
    dict(steps=2, select="min"),
    dict(steps=3, select="max", accept_lower=True),
    dict(steps=2, select="max_gap", grad_clamp=0.5),
    dict(steps=1, select="min", accept_lower=True, grad_clamp=2.0),
]


@pytest.mark.parametrize("ebt_type", VARIANTS)
@pytest.mark.parametrize("case", range(len(THINK_CASES)))
def test_think_matches_reference(ebt_type, case):
    opts = THINK_CASES[case]
    model64 = make_model(ebt_type, seed=case)
    model32 = make_model(ebt_type, seed=case).float()
    B, S, G = 2, 5, 3
    gen = torch.Generator().manual_seed(case)
    tok = rand_tokens(B, S, gen)
    init = 2 * torch.randn(B, G, S, V, dtype=torch.float64, generator=gen)
    alpha = 0.2  # random models have large gradients: keep the steps well conditioned
    want = {dt: ref.think(params_of(model64, dt), model64.config, tok, init.to(dt), alpha=alpha, **opts)
            for dt in (torch.float64, torch.float32)}
    r64, r32 = want[torch.float64], want[torch.float32]
    # The chosen sample is a discrete decision: where samples tie within fp32 noise either may be chosen.
    # So check that the choice is the best one up to that noise, and that every output is the fp64
    # reference's value for the sample that was chosen.
    crit = {"min": lambda f, i: -f, "max": lambda f, i: f, "max_gap": lambda f, i: i - f}[opts["select"]]
    trace64, trace32 = r64["energies"], r32["energies"]
    score = crit(trace64[:, :, -1], trace64[:, :, 0])                      # [B, G, S]
    noise = tolerance(crit(trace32[:, :, -1], trace32[:, :, 0]), score)
    per_sample = {"logits": (r64["all_logits"], r32["all_logits"]),
                  "energy": (trace64[:, :, -1], trace32[:, :, -1]),
                  "initial_energy": (trace64[:, :, 0], trace32[:, :, 0])}
    tols = {k: tolerance(v32, v64) for k, (v64, v32) in per_sample.items()}
    bi = torch.arange(B)[:, None]
    for positions in ("all", "last"):
        sl = slice(None) if positions == "all" else slice(S - 1, S)
        got = model32.think(tok, alpha=alpha, samples=G, positions=positions, init=init[:, :, sl].float(), **opts)
        unsq = (lambda t: t) if positions == "all" else (lambda t: t.unsqueeze(1))
        chosen = unsq(got.sample)                                           # [B, P]
        si = torch.arange(S)[sl][None, :]
        best = score[:, :, sl].max(dim=1).values
        assert (score[bi, chosen, si] >= best - 10 * noise).all(), "chose a clearly worse sample"
        # where the fp64 reference decides clearly, the choice is the same
        top2 = score[:, :, sl].topk(2, dim=1).values
        clear = (top2[:, 0] - top2[:, 1]) > 10 * noise
        assert torch.equal(chosen[clear], r64["sample"][:, sl][clear])
        for key, val in (("logits", got.logits), ("energy", got.energy), ("initial_energy", got.initial_energy)):
            want64 = per_sample[key][0][bi, chosen, si]
            torch.testing.assert_close(unsq(val).double(), want64, rtol=0, atol=tols[key],
                                       msg=lambda m: f"{key} {positions}: {m}")
    assert got.logits.shape == (B, V) and got.energy.shape == (B,) and got.sample.shape == (B,)


@pytest.mark.parametrize("ebt_type", VARIANTS)
def test_think_fp64_exact_and_defaults(ebt_type):
    model = make_model(ebt_type, mcmc_step_size=25.0)
    B, S, G = 1, 4, 2
    tok = rand_tokens(B, S)
    init = torch.randn(B, G, S, V, dtype=torch.float64)
    r = ref.think(params_of(model), model.config, tok, init, steps=None, alpha=25.0, select="min")
    got = model.think(tok, samples=G, positions="all", init=init)  # steps/alpha from the model
    torch.testing.assert_close(got.logits, r["logits"], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(got.energy, r["energy"], rtol=1e-9, atol=1e-9)
    n_steps = r["energies"].shape[2] - 1
    assert n_steps == (model.config.mcmc_num_steps if ebt_type == "default" else model.config.mcmc_num_steps * 1)


def test_think_without_softmax_and_shared_init():
    model = make_model("default", normalize_initial_condition=False)
    tok = rand_tokens(2, 3)
    init = 0.05 * torch.randn(2, 3, V, dtype=torch.float64)
    r = ref.think(params_of(model), model.config, tok, init.unsqueeze(1).expand(2, 2, 3, V), steps=2, alpha=0.5)
    got = model.think(tok, steps=2, alpha=0.5, samples=2, positions="all", init=init)
    torch.testing.assert_close(got.logits, r["logits"], rtol=1e-9, atol=1e-9)


def test_think_noise_is_reproducible_and_batched():
    model = make_model("default").float()
    tok = rand_tokens(2, 6)
    a = model.think(tok, steps=2, noise=0.5, samples=4, generator=torch.Generator().manual_seed(7))
    b = model.think(tok, steps=2, noise=0.5, samples=4, generator=torch.Generator().manual_seed(7))
    c = model.think(tok, steps=2, noise=0.5, samples=4, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a.logits, b.logits) and not torch.equal(a.logits, c.logits)
    # Each sample's chosen energy is the minimum over samples: the batched samples are scored separately.
    cache = model.prepare(tok)
    assert torch.isfinite(a.energy).all() and cache.length == 6


@pytest.mark.parametrize("ebt_type", VARIANTS)
def test_triton_attention_backend(triton_device, ebt_type):
    """The model with the Triton prediction-attention kernel (interpreter on CPU tensors, compiled on CUDA
    tensors) equals the ATen path."""
    pytest.importorskip("triton")
    from pyebm import _backend
    if not _backend.backends()["triton"] and not _backend.triton_interpret():
        pytest.skip("triton backend not usable here")
    model64 = make_model(ebt_type).to(triton_device)
    model = make_model(ebt_type).float().to(triton_device)
    fast = make_model(ebt_type, backend="triton").float().to(triton_device)
    tok = rand_tokens(2, 5).to(triton_device)
    init = torch.randn(2, 3, 5, V, device=triton_device)
    for positions, sl in (("all", slice(None)), ("last", slice(4, 5))):
        kw = dict(steps=2, alpha=0.2, samples=3, positions=positions)
        a = model.think(tok, init=init[:, :, sl], **kw)
        b = fast.think(tok, init=init[:, :, sl], **kw)
        c = model64.think(tok, init=init[:, :, sl].double(), **kw)
        assert torch.equal(a.sample, b.sample) and torch.equal(a.sample, c.sample)
        # The descent grows fp32 rounding (time_embed's two steps by several hundred times at this size), and
        # by how much depends on the last bits of its input: the ATen path's own error moves tenfold when the
        # init moves by one unit in the last place (seen with the baseline kernels on an AVX2 CPU). So the scale
        # is the ATen path's error envelope over the init and three such neighbours of it, and on top of that
        # the Triton path's error at the start (the initial energy), grown as the ATen path's was, when it
        # started further off than the ATen path.
        g = torch.Generator().manual_seed(1)
        x0 = init[:, :, sl]
        near = [model.think(tok, init=x0 * (1 + 2.0 ** -23 * torch.randn(x0.shape, generator=g).to(x0.device)),
                            **kw) for _ in range(3)]
        e0_ref = float((a.initial_energy.double() - c.initial_energy).abs().max())
        e0_got = float((b.initial_energy.double() - c.initial_energy).abs().max())
        growth = max(1.0, e0_got / e0_ref) if e0_ref > 0 else 1.0
        for key in ("logits", "energy", "initial_energy"):
            want, got = getattr(c, key), getattr(b, key)
            if key == "initial_energy":  # before any step: the ATen path's own error at this very input
                atol = tolerance(a.initial_energy, want)
            else:
                atol = max(tolerance(getattr(r, key), want) for r in [a] + near) * growth
            torch.testing.assert_close(got.double(), want, rtol=0, atol=atol, msg=key)
    ctx = fast.prepare(tok)
    y = torch.softmax(torch.randn(2, 4, V, device=triton_device), -1)
    E1, g1 = model.energy_and_grad(model.prepare(tok), y)
    E2, g2 = fast.energy_and_grad(ctx, y)
    E64, g64 = model64.energy_and_grad(model64.prepare(tok), y.double())
    torch.testing.assert_close(E2.double(), E64, rtol=0, atol=tolerance(E1, E64))
    torch.testing.assert_close(g2.double(), g64, rtol=0, atol=tolerance(g1, g64))


def test_minimize_drives_the_energy_protocol():
    """pyebm.minimize with the EBT update rule reproduces think() for the default variant."""
    import pyebm
    if not hasattr(pyebm, "minimize") or not hasattr(getattr(pyebm, "Descent", None), "ebt"):
        pytest.skip("pyebm.minimize / Descent.ebt not available")
    model = make_model("default")
    tok = rand_tokens(2, 5)
    init = torch.randn(2, 3, V, dtype=torch.float64)
    for select, accept in (("min", False), ("max_gap", True)):
        r = model.think(tok, steps=2, alpha=0.3, samples=3, init=init.unsqueeze(2), select=select,
                        accept_lower=accept)
        cfg = pyebm.Descent.ebt(steps=2, step_size=0.3, selection=select, accept_if_lower=accept)
        res = pyebm.minimize(model, tok, candidates=3, config=cfg, init=init)
        torch.testing.assert_close(res.best, r.logits, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(res.best_energy, r.energy, rtol=1e-10, atol=1e-10)


def test_non_finite_sample_stays_local():
    model = make_model("default").float()
    tok = rand_tokens(2, 4)
    init = torch.randn(2, 3, 1, V)
    init[0, 1, 0, 5] = float("nan")
    r = model.think(tok, steps=2, alpha=0.2, samples=3, init=init)
    clean = model.think(tok, steps=2, alpha=0.2, samples=2, init=init[:, [0, 2]])
    assert torch.isfinite(r.logits).all() and r.sample[0] != 1
    torch.testing.assert_close(r.energy[0], clean.energy[0])  # the other samples are untouched
    ctx = model.prepare(tok)
    y = torch.softmax(torch.randn(2, 3, V), -1)
    y[1, 2] = float("inf")
    E, g = model.energy_and_grad(ctx, y)
    assert torch.isfinite(E[0]).all() and torch.isfinite(E[1, :2]).all() and not torch.isfinite(E[1, 2])
    assert torch.isfinite(g[1, :2]).all()


# -- generation ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("ebt_type", VARIANTS)
@pytest.mark.parametrize("samples,select,accept_lower", [(1, "min", False), (3, "max_gap", True)])
def test_greedy_generation_matches_reference(ebt_type, samples, select, accept_lower):
    model = make_model(ebt_type, seed=3).float()
    B, S, N = 2, 4, 5
    gen = torch.Generator().manual_seed(11)
    tok = rand_tokens(B, S, gen)
    init = torch.randn(B, samples, N, V, generator=gen)
    opts = dict(steps=2, alpha=30.0, select=select, accept_lower=accept_lower)
    want = ref.generate(params_of(model), model.config, tok, N, init, **opts)
    got = model.generate(tok, N, samples=samples, init=init, **opts)
    assert got.shape == (B, S + N)
    assert torch.equal(got, want), (got, want)


def test_generation_sampling_and_eos():
    model = make_model("default").float()
    tok = rand_tokens(1, 3)
    a = model.generate(tok, 4, temperature=0.8, top_p=0.9, generator=torch.Generator().manual_seed(1))
    b = model.generate(tok, 4, temperature=0.8, top_p=0.9, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == (1, 7)
    greedy = model.generate(tok, 3, init="zeros")
    stop = model.generate(tok, 3, init="zeros", eos_token_id=int(greedy[0, 3]))
    assert stop.shape == (1, 4) and torch.equal(stop, greedy[:, :4])
    assert torch.equal(model.generate(tok, 0), tok)


@pytest.mark.parametrize("ebt_type", VARIANTS)
def test_one_generator_per_prompt_draws_what_each_prompt_draws_alone(ebt_type):
    """generator=[g_0, ..., g_B-1]: prompt b's initial vectors, noise and top-p draws are those of a call on
    prompt b alone with g_b. The forward passes of a batch may round differently from a one-row call (a
    batched matrix product), so logits agree within fp64 rounding and tokens exactly (no ties at 1e-12)."""
    model = make_model(ebt_type, mcmc_step_size=2.0, langevin_dynamics_noise=0.3)
    B, S = 4, 5
    tok = rand_tokens(B, S, torch.Generator().manual_seed(5))
    seeds = [11, 12, None, 14]  # None: torch's global generator for that row
    opts = dict(samples=3, select="max_gap", steps=2)
    res = model.think(tok, generator=seeds, **opts)
    for b in (0, 1, 3):
        alone = model.think(tok[b:b + 1], generator=seeds[b], **opts)
        torch.testing.assert_close(res.logits[b:b + 1], alone.logits, rtol=1e-9, atol=1e-9)
        assert torch.equal(res.sample[b:b + 1], alone.sample)
    # a different seed for one row changes that row only
    other = model.think(tok, generator=[11, 99, None, 14], **opts)
    assert not torch.allclose(other.logits[1], res.logits[1])
    torch.testing.assert_close(other.logits[[0, 3]], res.logits[[0, 3]], rtol=1e-9, atol=1e-9)
    gen_opts = dict(temperature=1.5, top_p=0.95, samples=2)
    out = model.generate(tok, 6, generator=[torch.Generator().manual_seed(s) for s in (1, 2, 3, 4)], **gen_opts)
    for b in range(B):
        assert torch.equal(out[b:b + 1], model.generate(tok[b:b + 1], 6, generator=b + 1, **gen_opts))
    assert len({tuple(r) for r in model.generate(tok[:1].expand(4, S), 6, generator=[1, 2, 3, 4],
                                                  **gen_opts)[:, S:].tolist()}) > 1  # the seeds do differ
    with pytest.raises(ValueError, match="generator is a list of 2 generators; one per prompt needs 4"):
        model.generate(tok, 2, generator=[1, 2])
    with pytest.raises(TypeError, match=r"generator\[1\]: generator must be a torch.Generator"):
        model.think(tok, generator=[1, "x", 3, 4])
    with pytest.raises(ValueError, match="pass generator=None"):  # the captured step draws from the device's
        model._think(tok, None, None, None, 1, "min", False, "last", None, [1, 2, 3, 4], None, "eager")
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):  # minimize takes one
        import pyebm
        pyebm.minimize(model, tok, 2, pyebm.Descent.ebt(steps=1), generator=[1, 2, 3, 4])


def test_inference_defaults_fill_the_options_a_call_leaves_out():
    from pyebm.models import EBTInference

    model = make_model("default", mcmc_step_size=3.0, langevin_dynamics_noise=0.2)
    tok = rand_tokens(2, 4)
    assert model.inference == EBTInference()
    base = model.generate(tok, 3, generator=0)
    assert torch.equal(base, model.generate(tok, 3, generator=0, samples=1, select="min", temperature=0.0))
    cfg = EBTInference(steps=3, alpha=1.5, noise=0.1, samples=2, select="max", accept_lower=True, init="zeros",
                       grad_clamp=4.0, temperature=0.9, top_p=0.8)
    model.inference = cfg
    assert torch.equal(model.generate(tok, 3, generator=0),
                       make_model("default", mcmc_step_size=3.0, langevin_dynamics_noise=0.2).generate(
                           tok, 3, generator=0, **cfg.generate_kwargs()))
    a, b = model.think(tok, generator=1), model.think(tok, generator=1, **cfg.think_kwargs())
    assert torch.equal(a.logits, b.logits) and torch.equal(a.sample, b.sample)
    # a call's own value wins over the default
    assert torch.equal(model.think(tok, generator=1, samples=1, noise=0.0, init="normal").logits,
                       model.think(tok, generator=1, **dict(cfg.think_kwargs(), samples=1, noise=0.0,
                                                           init="normal")).logits)
    model.inference = EBTInference()
    eos = int(model.generate(tok[:1], 1, generator=0)[0, -1])
    model.inference = EBTInference(eos_token_id=eos)
    assert model.generate(tok[:1], 5, generator=0).shape == (1, 5)  # stopped at the saved eos
    model.inference = {"samples": 2}
    with pytest.raises(TypeError, match="EBT.inference must be a pyebm.models.EBTInference"):
        model.think(tok)


@pytest.mark.parametrize("kwargs, reason", [
    ({"steps": 0}, "steps must be an int >= 1 or None"),
    ({"steps": 2.0}, "steps must be an int"),
    ({"samples": None}, "samples must be an int >= 1"),
    ({"alpha": 0.0}, "alpha must be a finite number > 0"),
    ({"alpha": True}, "alpha must be a finite number"),
    ({"noise": -1.0}, "noise must be a finite number >= 0"),
    ({"noise": float("nan")}, "noise must be a finite number"),
    ({"select": "median"}, "select must be one of"),
    ({"accept_lower": 1}, "accept_lower must be True or False"),
    ({"init": "uniform"}, "init must be 'normal', 'zeros' or None"),
    ({"grad_clamp": 0}, "grad_clamp must be a finite number > 0"),
    ({"temperature": -0.1}, "temperature must be a finite number >= 0"),
    ({"top_p": 1.5}, r"top_p must be a number in \(0, 1\]"),
    ({"top_p": 0}, r"top_p must be a number in \(0, 1\]"),
    ({"eos_token_id": -1}, "eos_token_id must be a token id"),
    ({"eos_token_id": 2.0}, "eos_token_id must be a token id"),
])
def test_inference_options_are_checked(kwargs, reason):
    from pyebm.models import EBTInference

    with pytest.raises(ValueError, match=reason):
        EBTInference(**kwargs)


def test_inference_dict_round_trip_and_versions():
    from pyebm.models import EBTInference

    cfg = EBTInference(steps=2, alpha=3, samples=4, grad_clamp=False, eos_token_id=7)
    d = cfg.to_dict()
    assert d["version"] == EBTInference.VERSION == 1 and d["alpha"] == 3.0 and isinstance(d["alpha"], float)
    assert EBTInference.from_dict(d) == cfg
    assert EBTInference.from_dict({"samples": 2}) == EBTInference(samples=2)  # no version: 1, the rest defaults
    with pytest.raises(ValueError, match="version 2 was written by a newer pyebm"):
        EBTInference.from_dict(dict(d, version=2))
    with pytest.raises(ValueError, match=r"unknown options \['beam'\]"):
        EBTInference.from_dict(dict(d, beam=3))
    with pytest.raises(ValueError, match="version must be an int >= 1"):
        EBTInference.from_dict(dict(d, version="1"))


# -- loading the original's state dicts --------------------------------------------------------------

def original_state_dict(ebt_type="default", vocab=V, dim=D, layers=LAYERS, hidden=None, landscapes=2,
                        tied=False, seed=0):
    """A state dict laid out like the original EBT_NLP module's, written from its naming scheme."""
    g = torch.Generator().manual_seed(seed)
    hidden = hidden or dim
    r = lambda *shape: 0.2 * torch.randn(*shape, generator=g)  # noqa: E731
    sd = {"alpha": torch.tensor(33.0), "langevin_dynamics_noise_std": torch.tensor(0.0),
          "embeddings.weight": r(vocab, dim)}
    if not tied:
        sd["vocab_to_embed.weight"] = r(dim, vocab)
    for i in range(layers):
        pre = f"transformer.layers.{i}."
        for n in ("wq", "wk", "wv", "wo"):
            sd[pre + f"attention.{n}.weight"] = r(dim, dim)
        sd[pre + "feed_forward.w1.weight"] = r(hidden, dim)
        sd[pre + "feed_forward.w2.weight"] = r(dim, hidden)
        sd[pre + "feed_forward.w3.weight"] = r(hidden, dim)
        sd[pre + "attention_norm.weight"] = 1 + r(dim)
        sd[pre + "ffn_norm.weight"] = 1 + r(dim)
    sd["transformer.norm.weight"] = 1 + r(dim)
    sd["transformer.final_layer.weight"] = r(1, dim)
    if ebt_type == "time_embed":
        sd["transformer.time_embeddings.weight"] = r(landscapes, dim)
    return sd


@pytest.mark.parametrize("ebt_type", VARIANTS)
def test_from_reference_round_trip(ebt_type):
    sd = original_state_dict(ebt_type, hidden=48)
    config = dict(vocab_size=V, embedding_dim=D, num_transformer_blocks=LAYERS, multiheaded_attention_heads=HEADS,
                  context_length=CTX, ebt_type=ebt_type, mcmc_num_steps=2, ffn_dim_multiplier=1.5,
                  peak_learning_rate=1e-3, model_name="ebt", normalize_initial_condition=True)  # a training config
    model = EBT.from_reference(sd, **config)
    out = model.state_dict()
    assert set(out) == set(sd)
    for k in sd:
        assert torch.equal(out[k], sd[k]), k
    assert float(model.alpha) == 33.0
    # The same model from shapes alone, from a training wrapper's prefixed keys, and from a checkpoint.
    small = EBT.from_reference(sd, multiheaded_attention_heads=HEADS, context_length=CTX)
    assert small.config == model.config
    prefixed = EBT.from_reference({"model." + k: v for k, v in sd.items()}, **config)
    assert all(torch.equal(prefixed.state_dict()[k], sd[k]) for k in sd)
    ckpt = {"state_dict": {"model._orig_mod." + k: v for k, v in sd.items()},
            "hyper_parameters": {"multiheaded_attention_heads": HEADS, "context_length": CTX}}
    assert EBT.from_reference(ckpt).config == model.config
    # The loaded model computes the reference math on the original's tensors.
    tok = rand_tokens(2, 5)
    p = torch.softmax(torch.randn(2, 5, V), -1)
    ctx = model.prepare(tok)
    E_ref = ref.energy(sd, model.config, tok, p, model.config.num_landscapes - 1)
    torch.testing.assert_close(model.energy(ctx, p[:, -1:].contiguous())[:, 0], E_ref[:, -1], rtol=1e-4, atol=1e-5)


def test_from_reference_errors():
    sd = original_state_dict("default")
    cfg = dict(multiheaded_attention_heads=HEADS, context_length=CTX)
    with pytest.raises(ValueError, match=r"missing keys: \['transformer.layers.1.ffn_norm.weight'\]"):
        EBT.from_reference({k: v for k, v in sd.items() if k != "transformer.layers.1.ffn_norm.weight"}, **cfg)
    with pytest.raises(ValueError, match=r"unexpected keys: \['transformer.extra.weight'\]"):
        EBT.from_reference({**sd, "transformer.extra.weight": torch.zeros(1)}, **cfg)
    with pytest.raises(ValueError, match=r"layers.0.attention.wq.weight: expected \(48, 48\), got \(32, 32\)"):
        EBT.from_reference(sd, embedding_dim=48, vocab_size=V, **cfg)
    with pytest.raises(ValueError, match="missing keys.*time_embeddings"):
        EBT.from_reference(sd, ebt_type="time_embed", **cfg)
    with pytest.raises(ValueError, match="multiheaded_attention_heads is required"):
        EBT.from_reference(sd, context_length=CTX)
    with pytest.raises(ValueError, match="ebt_norm='layer' is not supported"):
        EBT.from_reference(sd, ebt_norm="layer", **cfg)
    with pytest.raises(ValueError, match="ebt_type must be one of"):
        EBT.from_reference(sd, ebt_type="adaln", **cfg)


def test_reference_config():
    assert EBT.reference_config("xxs") == {"num_transformer_blocks": 6, "multiheaded_attention_heads": 6,
                                           "embedding_dim": 384}
    assert EBT.reference_config("small")["embedding_dim"] == 768
    assert EBT.reference_config("medium") == {"num_transformer_blocks": 24, "multiheaded_attention_heads": 16,
                                              "embedding_dim": 1024}
    with pytest.raises(ValueError, match="unknown size 'huge'"):
        EBT.reference_config("huge")


# -- bad input --------------------------------------------------------------------------------------

def test_bad_input():
    model = make_model("default").float()
    tok = rand_tokens(1, 4)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, vocab_size=64\); got ids in \[1, 64\]"):
        model.think(torch.tensor([[1, 2, 64]]))
    with pytest.raises(ValueError, match="token ids must be in"):
        model.generate(torch.tensor([[-1, 2]]), 2)
    with pytest.raises(ValueError, match="prompt length 25 exceeds context_length=24"):
        model.think(torch.zeros(1, CTX + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="prompt length 20 plus 5 generated tokens exceeds context_length=24"):
        model.generate(torch.zeros(1, 20, dtype=torch.long), 6)
    with pytest.raises(ValueError, match="samples must be an int >= 1; got 0"):
        model.think(tok, samples=0)
    with pytest.raises(ValueError, match="select must be one of .*got 'median'"):
        model.think(tok, samples=2, select="median")
    with pytest.raises(ValueError, match="positions must be 'last' or 'all'"):
        model.think(tok, positions="first")
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        model.think(tok, steps=0)
    with pytest.raises(ValueError, match="alpha must be a finite number > 0"):
        model.think(tok, alpha=-1.0)
    with pytest.raises(ValueError, match=r"init must be \[B=1, samples=2, positions=1, V=64\]"):
        model.think(tok, samples=2, init=torch.zeros(1, 2, 3, V))
    with pytest.raises(ValueError, match="init must be 'normal', 'zeros' or a tensor"):
        model.think(tok, init="uniform")
    with pytest.raises(ValueError, match="must be an integer tensor"):
        model.think(tok.float())
    with pytest.raises(ValueError, match=r"y must be \[B=1, K, vocab_size=64\]"):
        model.energy(model.prepare(tok), torch.zeros(1, 3, V - 1))
    with pytest.raises(ValueError, match="top_p must be in"):
        model.generate(tok, 2, temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="multiple of multiheaded_attention_heads"):
        EBT(vocab_size=V, embedding_dim=30, multiheaded_attention_heads=4)
    with pytest.raises(ValueError, match="ebt_type must be one of"):
        EBT(vocab_size=V, embedding_dim=32, multiheaded_attention_heads=4, ebt_type="adaln")


def test_energy_calls_refuse_torch_func_transforms():
    """An inference call's output is a constant to torch.func: a gradient of it would be a silent zero."""
    model = make_model()
    ctx = model.prepare(rand_tokens(2, 6))
    y = torch.softmax(torch.randn(2, 4, V, dtype=torch.float64), -1)
    for call in (model.energy, lambda c, v: model.energy_and_grad(c, v)[0]):
        with pytest.raises(RuntimeError, match="torch.func"):
            torch.func.grad(lambda v: call(ctx, v).sum())(y)
    assert model.energy(ctx, y).shape == (2, 4)  # eager calls are unaffected
