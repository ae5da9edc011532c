"""EBTPolicy (cached observation side, hand-written input gradient) against pyebm.reference.ebt_policy."""
import copy
import pickle

import pytest
import torch

import pyebm

from pyebm.models import EBTPolicy, EBTPolicyContext
from pyebm.ops import ebt_policy as ebt_op
from pyebm.reference import ebt_policy as ref

needs_op = pytest.mark.skipif(not ebt_op.available(), reason="pyebm._C without the ebt_policy op")
# (grad_mode, backend): the fused C++ op, the batched PyTorch path, autograd on the candidate only
MODES = [pytest.param(("manual", "cpu"), marks=needs_op, id="cpu-op"), pytest.param(("manual", "torch"), id="torch"),
         pytest.param(("autograd", "torch"), id="autograd")]

# The original network's state-dict keys for num_layers=1 (action embedding built without dropout).
ORIGINAL_KEYS_ONE_LAYER = {
    "pos_emb": (1, "T", "D"),
    "input_emb._model.0.weight": ("D", "A"), "input_emb._model.0.bias": ("D",),
    "input_emb._model.1.weight": ("D",), "input_emb._model.1.bias": ("D",),
    "input_emb._model.3.weight": ("D", "D"), "input_emb._model.3.bias": ("D",),
    "decoder.layers.0.norm1.weight": ("D",),
    "decoder.layers.0.attn.qkv.weight": ("3D", "D"), "decoder.layers.0.attn.qkv.bias": ("3D",),
    "decoder.layers.0.attn.q_norm.weight": ("hd",), "decoder.layers.0.attn.k_norm.weight": ("hd",),
    "decoder.layers.0.attn.proj.weight": ("D", "D"), "decoder.layers.0.attn.proj.bias": ("D",),
    "decoder.layers.0.cross_attn.q.weight": ("D", "D"), "decoder.layers.0.cross_attn.q.bias": ("D",),
    "decoder.layers.0.cross_attn.kv.weight": ("2D", "D"), "decoder.layers.0.cross_attn.kv.bias": ("2D",),
    "decoder.layers.0.cross_attn.q_norm.weight": ("hd",), "decoder.layers.0.cross_attn.k_norm.weight": ("hd",),
    "decoder.layers.0.cross_attn.proj.weight": ("D", "D"),
    "decoder.layers.0.norm2.weight": ("D",),
    "decoder.layers.0.ffn.fc1.weight": ("D", "D"), "decoder.layers.0.ffn.fc1.bias": ("D",),
    "decoder.layers.0.ffn.fc2.weight": ("D", "D"), "decoder.layers.0.ffn.fc2.bias": ("D",),
    "decoder.layers.0.norm3.weight": ("D",),
    "decoder.final_layer.norm_final.weight": ("D",),
    "decoder.final_layer.linear.fc1.weight": ("D", "D"), "decoder.final_layer.linear.fc1.bias": ("D",),
    "decoder.final_layer.linear.fc2.weight": ("A", "D"), "decoder.final_layer.linear.fc2.bias": ("A",),
}


def make_model(A=3, T=5, D=12, layers=2, heads=3, n_obs=2, dtype=torch.float64, scale=0.3, seed=0, **kw):
    torch.manual_seed(seed)
    m = EBTPolicy(A, horizon=T, embed_dim=D, layers=layers, heads=heads, n_obs_steps=n_obs, dtype=dtype, **kw)
    with torch.no_grad():
        for p in m.parameters():          # norms and biases away from 1 / 0 so every term is exercised
            p.add_(scale * torch.randn_like(p))
    return m


def reference_energy_grad(model, y, obs, dtype):
    """Reference (E, G) for every candidate, at ``dtype``; y [B, K, T, A], obs [B, L, C]."""
    B, K = y.shape[:2]
    params = {k: v.to(dtype) for k, v in model.state_dict().items()}
    yy = y.reshape(B * K, *y.shape[2:]).to(dtype)
    oo = obs.repeat_interleave(K, dim=0).to(dtype)
    E, G = ref.energy_grad(params, yy, oo, num_heads=model.heads, n_obs_steps=model.n_obs_steps)
    return E.reshape(B, K), G.reshape(y.shape)


@pytest.mark.parametrize("B,K,tps", [(1, 1, 1), (3, 4, 1), (2, 3, 3), (2, 9, 1)])
@pytest.mark.parametrize("mode", MODES)
def test_energy_and_grad_match_reference(B, K, tps, mode):
    grad_mode, backend = mode
    m64 = make_model(grad_mode=grad_mode, backend=backend)
    obs = torch.randn(B, 2 * tps, 12, dtype=torch.float64)
    y = torch.randn(B, K, 5, 3, dtype=torch.float64)
    E, G = m64.energy_and_grad(m64.prepare(obs), y)
    E_ref, G_ref = reference_energy_grad(m64, y, obs, torch.float64)
    torch.testing.assert_close(E, E_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(G, G_ref, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(m64.energy(m64.prepare(obs), y), E_ref, rtol=1e-10, atol=1e-12)

    # fp32: error bounded by a small multiple of the reference's own fp32 error
    m32 = make_model(dtype=torch.float32, grad_mode=grad_mode, backend=backend)
    m32.load_state_dict({k: v.float() for k, v in m64.state_dict().items()})
    E32, G32 = m32.energy_and_grad(m32.prepare(obs.float()), y.float())
    E_r32, G_r32 = reference_energy_grad(m64, y, obs, torch.float32)
    tolE = 4 * (E_r32.double() - E_ref).abs().max().item() + 1e-6
    tolG = 4 * (G_r32.double() - G_ref).abs().max().item() + 1e-6 * G_ref.abs().max().item()
    assert (E32.double() - E_ref).abs().max().item() <= tolE
    assert (G32.double() - G_ref).abs().max().item() <= tolG


def test_gradient_is_nontrivial_and_per_candidate():
    m = make_model(scale=0.5)
    obs = torch.randn(2, 2, 12, dtype=torch.float64)
    y = torch.randn(2, 3, 5, 3, dtype=torch.float64)
    ctx = m.prepare(obs)
    _, G = m.energy_and_grad(ctx, y)
    assert G.abs().max() > 1e-3
    # candidates are independent: changing one leaves the others' energies and gradients unchanged
    y2 = y.clone()
    y2[1, 2] += 1.0
    E1, G1 = m.energy_and_grad(ctx, y)
    E2, G2 = m.energy_and_grad(ctx, y2)
    keep = torch.ones(2, 3, dtype=torch.bool)
    keep[1, 2] = False
    torch.testing.assert_close(E1[keep], E2[keep], rtol=0, atol=1e-13)
    torch.testing.assert_close(G1[keep], G2[keep], rtol=0, atol=1e-13)


@pytest.mark.parametrize("mode", MODES)
def test_non_contiguous_candidates(mode):
    m = make_model(grad_mode=mode[0], backend=mode[1])
    obs = torch.randn(2, 2, 12, dtype=torch.float64)
    base = torch.randn(2, 5, 4, 3, dtype=torch.float64)
    y = base.transpose(1, 2)[:, :3]                        # [2, 3, 5, 3], not contiguous
    assert not y.is_contiguous()
    E, G = m.energy_and_grad(m.prepare(obs), y)
    E_ref, G_ref = reference_energy_grad(m, y.contiguous(), obs, torch.float64)
    torch.testing.assert_close(E, E_ref)
    torch.testing.assert_close(G, G_ref)


def test_no_weight_gradients_at_inference():
    m = make_model()
    obs = torch.randn(1, 2, 12, dtype=torch.float64)
    y = torch.randn(1, 2, 5, 3, dtype=torch.float64)
    for mode in ("manual", "autograd"):
        m.grad_mode = mode
        E, G = m.energy_and_grad(m.prepare(obs), y)
        assert not E.requires_grad and not G.requires_grad
        assert all(p.grad is None for p in m.parameters())


def test_forward_is_differentiable_and_matches():
    m = make_model()
    obs = torch.randn(2, 4, 12, dtype=torch.float64, requires_grad=True)
    a = torch.randn(2, 5, 3, dtype=torch.float64)
    E = m(obs, a)
    assert E.shape == (2,)
    E_ref, _ = reference_energy_grad(m, a.unsqueeze(1), obs.detach(), torch.float64)
    torch.testing.assert_close(E, E_ref[:, 0])
    E.sum().backward()
    assert obs.grad is not None and obs.grad.abs().max() > 0
    assert m.blocks[0].cross.kv.weight.grad.abs().max() > 0
    assert m.embed.fc1.weight.grad.abs().max() > 0
    # [B, K, T, A] and a prepared context work too
    y = torch.randn(2, 3, 5, 3, dtype=torch.float64)
    torch.testing.assert_close(m(obs.detach(), y), m.energy(m.prepare(obs.detach()), y))
    torch.testing.assert_close(m(m.prepare(obs.detach()), y), m.energy(m.prepare(obs.detach()), y))


def test_memory_mask_true_means_allowed():
    # 2 observation steps of 2 tokens each, horizon 3: token t sees step s iff t >= s
    mask = ref.memory_mask(3, 4, 2)
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask, expected)
    m = make_model()
    ctx = m.prepare(torch.randn(1, 4, 12, dtype=torch.float64))
    assert isinstance(ctx, EBTPolicyContext)
    assert torch.equal(torch.isfinite(ctx.bias), ref.memory_mask(5, 4, 2))
    # the masked observation step really is invisible to action token 0 only
    obs = torch.randn(1, 2, 12, dtype=torch.float64)
    obs2 = obs.clone()
    obs2[:, 1] += 3.0                                       # change observation step 1
    y = torch.randn(1, 1, 5, 3, dtype=torch.float64)
    assert not torch.allclose(m.energy(m.prepare(obs), y), m.energy(m.prepare(obs2), y))


def test_sincos_positions():
    pos = ref.sincos_positions(4, 6, dtype=torch.float64)
    t = torch.arange(4, dtype=torch.float64)[:, None]
    w = 1.0 / 10000 ** (torch.arange(3, dtype=torch.float64) / 3.0)
    torch.testing.assert_close(pos, torch.cat([torch.sin(t * w), torch.cos(t * w)], dim=1))
    m = make_model()
    torch.testing.assert_close(m.pos_emb, ref.sincos_positions(5, 12, dtype=torch.float64))


def _original_like_state_dict(A=3, T=5, D=12, layers=2, heads=3, dtype=torch.float64, dropout_index=3, seed=5):
    """A state dict keyed and shaped like the original network's, with random values."""
    g = torch.Generator().manual_seed(seed)
    dims = {"A": A, "T": T, "D": D, "3D": 3 * D, "2D": 2 * D, "hd": D // heads}
    sd = {}
    for i in range(layers):
        for key, shape in ORIGINAL_KEYS_ONE_LAYER.items():
            key = key.replace("input_emb._model.3.", f"input_emb._model.{dropout_index}.")
            if key.startswith("decoder.layers.0."):
                key = key.replace("decoder.layers.0.", f"decoder.layers.{i}.")
            elif i > 0:
                continue
            sd[key] = torch.randn(*[dims[s] if isinstance(s, str) else s for s in shape], generator=g, dtype=dtype)
    sd["pos_emb"] = ref.sincos_positions(T, D, dtype=dtype).unsqueeze(0)
    return sd


HP = dict(input_dim=3, cond_dim=12, embed_dim=12, output_dim=3, num_layers=2, num_heads=3, n_obs_steps=2, horizon=5)


def test_original_key_layout():
    m = make_model(layers=1)
    keys = m.to_reference_state_dict()
    assert set(keys) == set(ORIGINAL_KEYS_ONE_LAYER)
    assert tuple(keys["pos_emb"].shape) == (1, 5, 12)


@pytest.mark.parametrize("dropout_index", [3, 4])
def test_from_reference_round_trip(dropout_index):
    sd = _original_like_state_dict(dropout_index=dropout_index)
    m = EBTPolicy.from_reference(sd, **HP, dtype=torch.float64)
    back = m.to_reference_state_dict(embed_fc2_index=dropout_index)
    assert set(back) == set(sd)
    for k in sd:
        assert torch.equal(back[k], sd[k]), k
    # a whole checkpoint dict: the energy network's keys are found under their prefix
    ckpt = {"policy.energy_pred_net." + k: v for k, v in sd.items()}
    ckpt["policy.obs_encoder.weight"] = torch.zeros(3)
    m2 = EBTPolicy.from_reference(ckpt, **HP, dtype=torch.float64)
    obs = torch.randn(2, 2, 12, dtype=torch.float64)
    y = torch.randn(2, 2, 5, 3, dtype=torch.float64)
    torch.testing.assert_close(m2.energy(m2.prepare(obs), y), m.energy(m.prepare(obs), y), rtol=0, atol=0)


def test_from_reference_errors():
    sd = _original_like_state_dict()
    bad = dict(sd)
    del bad["decoder.layers.1.attn.qkv.bias"]
    bad["decoder.layers.1.attn.extra"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing keys \['decoder.layers.1.attn.qkv.bias'\].*unexpected keys "
                                         r"\['decoder.layers.1.attn.extra'\]"):
        EBTPolicy.from_reference(bad, **HP)
    with pytest.raises(ValueError, match="missing keys"):
        EBTPolicy.from_reference(sd, **{**HP, "num_layers": 3})
    with pytest.raises(ValueError, match="unexpected keys"):
        EBTPolicy.from_reference(sd, **{**HP, "num_layers": 1})
    with pytest.raises(ValueError, match=r"input_emb._model.0.weight: expected \(12, 4\), got \(12, 3\)"):
        EBTPolicy.from_reference(sd, **{**HP, "input_dim": 4})
    # like the original, cond_dim is accepted and ignored: the tokens have the cross-attention's width
    assert EBTPolicy.from_reference(sd, **{**HP, "cond_dim": 7}).cond_dim == 12


def test_bad_inputs():
    m = make_model()
    with pytest.raises(ValueError, match=r"obs_tokens must be \[B, L, cond_dim=12\].*got shape \(2, 12\)"):
        m.prepare(torch.randn(2, 12, dtype=torch.float64))
    with pytest.raises(ValueError, match="obs_tokens must be"):
        m.prepare(torch.randn(2, 2, 11, dtype=torch.float64))
    with pytest.raises(ValueError, match="not a multiple of n_obs_steps=2"):
        m.prepare(torch.randn(2, 3, 12, dtype=torch.float64))
    with pytest.raises(ValueError, match="float32"):
        m.prepare(torch.randn(2, 2, 12))
    ctx = m.prepare(torch.randn(2, 2, 12, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"y must be \[B, K, horizon=5, action_dim=3\]; got \(2, 5, 3\)"):
        m.energy_and_grad(ctx, torch.randn(2, 5, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="y must be"):
        m.energy(ctx, torch.randn(2, 1, 4, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="prepared for B=2 observations but y has B=3"):
        m.energy(ctx, torch.randn(3, 1, 5, 3, dtype=torch.float64))
    with pytest.raises(TypeError, match="ctx must come from EBTPolicy.prepare"):
        m.energy(torch.zeros(2, 12), torch.randn(2, 1, 5, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="divisible by heads"):
        EBTPolicy(3, embed_dim=10, heads=4)
    with pytest.raises(ValueError, match="action_dim must be an int >= 1"):
        EBTPolicy(0)
    with pytest.raises(ValueError, match="grad_mode"):
        EBTPolicy(3, embed_dim=8, heads=2, layers=1, grad_mode="fast")


# -- act() against the reference inference loop ---------------------------------------------------
from pyebm.policies import EnergyPolicy  # noqa: E402


def _act_pair(model, obs, init, dtype, coupled, backend=None, **opts):
    """(pyebm actions, pyebm result, reference actions, reference info) at ``dtype``."""
    m = make_model(dtype=dtype, layers=model.num_layers, backend=backend)
    m.load_state_dict({k: v.to(dtype) for k, v in model.state_dict().items()})
    pol = EnergyPolicy.ebt_policy(m, coupled=coupled, n_action_steps=3, **opts)
    out = pol.act(obs.to(dtype), init=init.to(dtype))
    ref_out, info = ref.act(m.state_dict(), obs.to(dtype), init.to(dtype), num_heads=m.heads,
                            n_obs_steps=m.n_obs_steps, n_action_steps=3,
                            normalize_mode="batch" if coupled else "sample", **opts)
    return out, pol.last_result, ref_out, info


@pytest.mark.parametrize("B,coupled,opts", [
    (1, False, dict(alpha=1000.0)),                          # the template's settings, 20 steps
    (3, True, dict(alpha=10.0, min_grad=1e-3)),              # batch-coupled normalisation and stop, as the original
    (1, False, dict(alpha=1000.0, min_grad=10.0)),           # early exit: one step, then the final step
    (2, True, dict(alpha=10.0, min_grad=0.0225, max_steps=12)),  # batch-wide ||g|| crosses it mid-way
])
@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=needs_op), "torch"])
def test_act_matches_reference_loop(B, coupled, opts, backend):
    model = make_model(scale=0.1, layers=2)
    obs = torch.randn(B, 2, 12, dtype=torch.float64)
    init = torch.randn(B, 5, 3, dtype=torch.float64)
    out64, res64, ref64, info64 = _act_pair(model, obs, init, torch.float64, coupled, backend, **opts)
    assert out64.shape == (B, 3, 3)
    assert torch.equal(res64.steps, torch.full((B, 1), info64["steps"], dtype=torch.int32))
    torch.testing.assert_close(out64, ref64, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(res64.chunk, info64["trajectory"], rtol=1e-9, atol=1e-10)
    # the executed window starts at n_obs_steps - 1
    torch.testing.assert_close(out64, info64["trajectory"][:, 1:4], rtol=1e-9, atol=1e-10)
    # fp32: within a small multiple of the reference's own fp32 error
    out32, res32, ref32, info32 = _act_pair(model, obs, init, torch.float32, coupled, backend, **opts)
    assert info32["steps"] == info64["steps"]
    assert torch.equal(res32.steps, res64.steps)
    ref_err = (ref32.double() - ref64).abs().max().item()
    assert (out32.double() - ref64).abs().max().item() <= 4 * ref_err + 1e-5


def test_act_candidates_are_independent_per_sample():
    """Per-sample mode: each of K candidates follows the single-chain reference loop from its own init."""
    model = make_model(scale=0.1, layers=1)
    obs = torch.randn(2, 2, 12, dtype=torch.float64)
    init = torch.randn(2, 4, 5, 3, dtype=torch.float64)
    pol = EnergyPolicy.ebt_policy(model, candidates=4, alpha=10.0, max_steps=6, n_action_steps=3)
    pol.act(obs, init=init)
    res = pol.last_result
    for b in range(2):
        for k in range(4):
            _, info = ref.act(model.state_dict(), obs[b:b + 1], init[b:b + 1, k], num_heads=3, n_obs_steps=2,
                              n_action_steps=3, alpha=10.0, max_steps=6, normalize_mode="sample")
            torch.testing.assert_close(res.y[b, k], info["trajectory"][0], rtol=1e-9, atol=1e-10)
    # best of K by final energy
    torch.testing.assert_close(res.chunk, res.y[torch.arange(2), res.energy.argmin(dim=1)])


# -- the fused op itself ----------------------------------------------------------------------------
@needs_op
def test_op_opcheck_and_energy_only():
    m = make_model(dtype=torch.float32)
    ctx = m.prepare(torch.randn(2, 2, 12))
    y = torch.randn(2, 3, 5, 3)
    params = ebt_op.param_list(m)
    args = (y, ctx.k, ctx.v, ctx.bias, params, ebt_op.transposed_weights(params), 3, 1e-6, 1e-5, True)
    torch.library.opcheck(torch.ops.pyebm.ebt_policy_energy_grad.default, args,
                          test_utils=("test_schema", "test_faketensor"))
    E, G = torch.ops.pyebm.ebt_policy_energy_grad(*args)
    E2, G2 = torch.ops.pyebm.ebt_policy_energy_grad(*args[:-1], False)
    assert G2.numel() == 0
    torch.testing.assert_close(E2, E, rtol=0, atol=0)
    # without the transposed copies the op reads the [out, in] weights: same numbers up to rounding
    E3, G3 = torch.ops.pyebm.ebt_policy_energy_grad(y, ctx.k, ctx.v, ctx.bias, params, [], 3, 1e-6, 1e-5, True)
    torch.testing.assert_close(E3, E)
    torch.testing.assert_close(G3, G)


@needs_op
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [
    # (width, heads, horizon, candidates): several column tiles and head groups, the compiled-in
    # head/horizon sizes (64/16, 32/16) and odd ones, one block (a crew of threads) and several blocks;
    # head groups of 120 columns (a weight-broadcast product over a length that is not a multiple of 16)
    (256, 4, 16, 1), (160, 5, 16, 2), (96, 3, 7, 1), (64, 2, 16, 5), (240, 10, 6, 3),
    # heads wider than a column tile: fewer head groups than column tiles (partial-sum slots)
    (256, 1, 8, 1), (320, 2, 8, 2)])
def test_op_same_numbers_for_any_thread_count(shape, dtype):
    """A single block is run by a crew of threads; the tiling depends on the shapes only, so any thread
    count gives bitwise the same E and gradient, and both match the reference."""
    D, H, T, K = shape
    torch.manual_seed(3)
    m = EBTPolicy(4, horizon=T, embed_dim=D, layers=2, heads=H, n_obs_steps=2, dtype=dtype)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    obs = torch.randn(2, 4, D, dtype=dtype)
    y = torch.randn(2, K, T, 4, dtype=dtype)
    ctx = m.prepare(obs)
    params = ebt_op.param_list(m)
    wt = ebt_op.transposed_weights(params)
    threads = torch.get_num_threads()
    out = {}
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            out[n] = torch.ops.pyebm.ebt_policy_energy_grad(y, ctx.k, ctx.v, ctx.bias, params, wt, H, 1e-6, 1e-5, True)
    finally:
        torch.set_num_threads(threads)
    # Other thread counts split the products into other column slices; each slice is one BLAS call whose
    # reduction order the BLAS chooses (by ISA and slice width), so the results agree to rounding, not bit for bit.
    same = dict(rtol=1e-6, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-13, atol=1e-14)
    for n in (2, 3):
        torch.testing.assert_close(out[n][0], out[1][0], **same)
        torch.testing.assert_close(out[n][1], out[1][1], **same)
    E_ref, G_ref = m._energy_and_grad_autograd(ctx, y)
    tol = dict(rtol=2e-4, atol=2e-5) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(out[1][0], E_ref, **tol)
    torch.testing.assert_close(out[1][1], G_ref, **tol)


@needs_op
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("L", [8, 10])
def test_op_cross_projection_folded_or_not(L, dtype):
    """With few observation tokens (4 * heads * L <= width, and K * horizon >= 2 * L) the op applies the cross
    projection to the cached values once per call and mixes the projected values per token; with more it
    projects every token's attention output. Both give the reference's energy and gradient (width 64, 2 heads: 8 tokens fold, 10 do
    not), for one block run by a crew of threads and for several blocks."""
    torch.manual_seed(6)
    m = EBTPolicy(3, horizon=16, embed_dim=64, layers=2, heads=2, n_obs_steps=2, dtype=dtype)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    obs = torch.randn(3, L, 64, dtype=dtype)
    ctx = m.prepare(obs)
    params = ebt_op.param_list(m)
    tol = dict(rtol=2e-4, atol=2e-5) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-10)
    for K in (1, 9):
        y = torch.randn(3, K, 16, 3, dtype=dtype)
        E_ref, G_ref = m._energy_and_grad_autograd(ctx, y)
        for wt in (ebt_op.transposed_weights(params), []):
            E, G = torch.ops.pyebm.ebt_policy_energy_grad(y, ctx.k, ctx.v, ctx.bias, params, wt, 2, 1e-6, 1e-5, True)
            torch.testing.assert_close(E, E_ref, **tol)
            torch.testing.assert_close(G, G_ref, **tol)


@pytest.mark.skipif(not ebt_op.context_available(), reason="pyebm._C without ebt_policy_context")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("BL", [(1, 2), (3, 2), (1, 6), (2, 4), (4, 4), (3, 12)])
def test_prepare_op_matches_torch_path(BL, dtype):
    """prepare() without autograd computes the observation side in one C++ call (float32 below 8 tokens:
    rows_linear.h's streaming kernel; the weight-broadcast product for 8 to 32 tokens, else the BLAS); it
    equals the PyTorch path that training uses."""
    B, L = BL
    torch.manual_seed(4)
    m = EBTPolicy(3, horizon=5, embed_dim=32, layers=3, heads=2, n_obs_steps=2, cond_dim=20, dtype=dtype)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    obs = torch.randn(B, L, 20, dtype=dtype)
    with torch.inference_mode():
        fast = m.prepare(obs)
    assert not fast.bias.is_inference()          # the shared mask bias also serves training later
    with torch.enable_grad():
        slow = m._context(obs)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(fast.k, slow.k.detach(), **tol)
    torch.testing.assert_close(fast.v, slow.v.detach(), **tol)
    assert torch.equal(fast.bias, slow.bias)
    w, b, kn = m._kv_stack()
    torch.library.opcheck(torch.ops.pyebm.ebt_policy_context.default, (obs, w, b, kn, 2, 1e-6),
                          test_utils=("test_schema", "test_faketensor"))
    with pytest.raises(ValueError, match="w must be"):
        torch.ops.pyebm.ebt_policy_context(obs, w[:-1], b, kn, 2, 1e-6)
    with pytest.raises(ValueError, match="obs must be"):
        torch.ops.pyebm.ebt_policy_context(obs[0], w, b, kn, 2, 1e-6)
    with pytest.raises(ValueError, match="b must be"):
        torch.ops.pyebm.ebt_policy_context(obs, w, b[:-1], kn, 2, 1e-6)
    with pytest.raises(ValueError, match="k_norm must be"):
        torch.ops.pyebm.ebt_policy_context(obs, w, b, kn[0], 2, 1e-6)
    with pytest.raises(TypeError, match="float32 or float64"):
        torch.ops.pyebm.ebt_policy_context(obs.half(), w.half(), b.half(), kn.half(), 2, 1e-6)
    with pytest.raises(ValueError, match="heads must be"):
        torch.ops.pyebm.ebt_policy_context(obs, w, b, kn, 0, 1e-6)


@needs_op
def test_op_bad_arguments():
    m = make_model(dtype=torch.float32)
    ctx = m.prepare(torch.randn(2, 2, 12))
    y = torch.randn(2, 3, 5, 3)
    params = ebt_op.param_list(m)
    op = torch.ops.pyebm.ebt_policy_energy_grad
    with pytest.raises(ValueError, match="params must hold 7 \\+ 17 \\* layers \\+ 5 tensors; got 45"):
        op(y, ctx.k, ctx.v, ctx.bias, params[:-1], [], 3, 1e-6, 1e-5, True)
    swapped = list(params)
    swapped[8], swapped[9] = swapped[9], swapped[8]
    with pytest.raises(ValueError, match=r"params\[8\] \(blocks\.0\.attn\.qkv\.weight\) must have shape \[36, 12\]"):
        op(y, ctx.k, ctx.v, ctx.bias, swapped, [], 3, 1e-6, 1e-5, True)
    with pytest.raises(TypeError, match=r"params\[0\] \(embed\.fc1\.weight\) has dtype torch.float64 but y has dtype torch.float32"):
        op(y, ctx.k, ctx.v, ctx.bias, [p.double() for p in params], [], 3, 1e-6, 1e-5, True)
    with pytest.raises(ValueError, match="ctx_k must be"):
        op(y, ctx.k[:, :1], ctx.v, ctx.bias, params, [], 3, 1e-6, 1e-5, True)
    wt = ebt_op.transposed_weights(params)
    with pytest.raises(ValueError, match="weights_t\\[1\\] must be the transpose of params\\[8\\]"):
        op(y, ctx.k, ctx.v, ctx.bias, params, [wt[0], wt[1].t()] + wt[2:], 3, 1e-6, 1e-5, True)
    with pytest.raises(ValueError, match="weights_t must be empty or hold"):
        op(y, ctx.k, ctx.v, ctx.bias, params, wt[:3], 3, 1e-6, 1e-5, True)
    with pytest.raises(ValueError, match="y must be \\[B, K, T, A\\]"):
        op(y[0], ctx.k, ctx.v, ctx.bias, params, [], 3, 1e-6, 1e-5, True)


@needs_op
def test_op_sees_weight_updates_and_dtype_changes():
    m = make_model(dtype=torch.float32)
    obs, y = torch.randn(1, 2, 12), torch.randn(1, 2, 5, 3)
    E1 = m.energy(m.prepare(obs), y)
    with torch.no_grad():
        m.head.fc2.bias.add_(1.0)                   # in place: the cached parameter list sees it
    torch.testing.assert_close(m.energy(m.prepare(obs), y), E1 + 1.0)
    with torch.no_grad():
        m.blocks[0].attn.qkv.weight.mul_(1.5)     # a weight the op also keeps transposed
    ctx = m.prepare(obs)
    torch.testing.assert_close(m.energy_and_grad(ctx, y), m.energy_and_grad(ctx, y, backend="torch"))
    with torch.no_grad():                           # the observation side's stacked weights see these too
        m.blocks[1].cross.kv.weight.mul_(1.3)
        m.blocks[0].cross.k_norm.weight.add_(0.2)
    E_ref, G_ref = reference_energy_grad(m, y, obs, torch.float32)
    E, G = m.energy_and_grad(m.prepare(obs), y)
    torch.testing.assert_close(E, E_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(G, G_ref, rtol=1e-4, atol=1e-5)
    m.load_state_dict({k: v * 0.9 for k, v in m.state_dict().items()})
    ctx = m.prepare(obs)
    torch.testing.assert_close(m.energy_and_grad(ctx, y), m.energy_and_grad(ctx, y, backend="torch"))
    E1 = m.energy(ctx, y) - 1.0
    m.double()                                      # new storage: the cache is rebuilt
    E3 = m.energy(m.prepare(obs.double()), y.double())
    assert E3.dtype == torch.float64
    torch.testing.assert_close(E3, E1.double() + 1.0, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_non_finite_candidate_stays_contained(mode):
    m = make_model(grad_mode=mode[0], backend=mode[1], dtype=torch.float32)
    ctx = m.prepare(torch.randn(2, 2, 12))
    y = torch.randn(2, 5, 5, 3)                 # 10 candidates: several share a block in the C++ op
    E0, G0 = m.energy_and_grad(ctx, y)
    bad = y.clone()
    bad[0, 1, 2, 0] = float("nan")
    bad[1, 3, 0, 2] = float("inf")
    E1, G1 = m.energy_and_grad(ctx, bad)
    hit = torch.zeros(2, 5, dtype=torch.bool)
    hit[0, 1] = hit[1, 3] = True
    assert not torch.isfinite(E1[hit]).any()
    torch.testing.assert_close(E1[~hit], E0[~hit], rtol=0, atol=0)
    torch.testing.assert_close(G1[~hit], G0[~hit], rtol=0, atol=0)


# -- the whole descent loop in one call (torch.ops.pyebm.ebt_policy_descent) ---------------------------------
needs_loop = pytest.mark.skipif(not ebt_op.descent_available(), reason="pyebm._C without ebt_policy_descent")

LOOP_CONFIGS = {
    "ebt_policy": dict(preset=True),
    "ebt_policy_coupled": dict(preset=True, coupled=True),
    "plain_gd": dict(steps=5, step_size=0.05),
    "heavy_ball_rms": dict(steps=6, step_size=0.05, momentum=0.5, normalize="rms", tol=1e-3),
    "nesterov_all_bounds": dict(steps=6, step_size=0.1, momentum=0.8, nesterov=True, normalize="rms_all",
                                lower=-0.5, upper=0.7),
    "bounds_at_end_clip": dict(steps=5, step_size=0.2, lower=-0.3, upper=0.3, bound_each_step=False,
                               grad_clip=0.5, grad_clip_norm=2.0, step_clip=0.05),
    "energy_scaled_tol_all": dict(steps=8, step_size=0.5, step_schedule="energy", energy_temperature=3.0,
                                  tol=5.0, tol_scope="all", tol_final_step=True),
}


@needs_loop
@pytest.mark.parametrize("name", list(LOOP_CONFIGS))
@pytest.mark.parametrize("BK", [(1, 1), (2, 3)])
def test_whole_loop_matches_per_step_path(name, BK):
    """minimize picks the one-call descent for EBTPolicy (pyebm._C.EbtPolicyPack: the observation side, the
    whole loop and the selection in one C++ call), and the whole-loop op where the context comes prepared (a
    policy's recovery rounds); both give the per-step path's result (the same update math, the network
    evaluated by the same kernel), and the same numbers as each other bit for bit."""
    from pyebm import Descent, minimize
    from pyebm.policies import _Prepared

    opts = dict(LOOP_CONFIGS[name])
    if opts.pop("preset", False):
        cfg = Descent.ebt_policy(max_steps=6, step_size=5.0, min_grad=0.05, **opts)
    else:
        cfg = Descent(**opts)
    m = make_model(scale=0.1)
    B, K = BK
    obs = torch.randn(B, 2, 12, dtype=torch.float64)
    init = torch.randn(B, K, 5, 3, dtype=torch.float64)
    route = pyebm.explain(m, obs, cfg, K, init=init)
    assert (route.path, route.backend) == ("one call", "cpu"), route
    prepared = _Prepared(m, m.prepare(obs))
    route = pyebm.explain(prepared, obs, cfg, K, init=init)
    assert (route.path, route.backend) == ("whole loop", "cpu"), route
    assert "no one-call descent" in route.refused["one call"], route
    one = minimize(m, obs, candidates=K, config=cfg, init=init)
    forced = minimize(m, obs, candidates=K, config=cfg, init=init, whole_loop=True)
    whole = minimize(prepared, obs, candidates=K, config=cfg, init=init, whole_loop=True)
    slow = minimize(m, obs, candidates=K, config=cfg, init=init, whole_loop=False)
    fields = ("y", "energy", "initial_energy", "steps", "status", "best", "best_energy", "best_index")
    for f in fields:
        assert torch.equal(getattr(one, f), getattr(whole, f)), f
        assert torch.equal(getattr(forced, f), getattr(whole, f)), f
    for f in ("y", "energy", "initial_energy", "best", "best_energy"):
        torch.testing.assert_close(getattr(one, f), getattr(slow, f), rtol=1e-9, atol=1e-11, msg=f)
    assert torch.equal(one.steps, slow.steps) and torch.equal(one.status, slow.status)
    assert torch.equal(one.best_index, slow.best_index)


@needs_loop
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("L", [2, 8])
def test_one_call_pack(dtype, L):
    """The one-call descent (pyebm._C.EbtPolicyPack) against the two ops it replaces: the same numbers bit for
    bit, per-coordinate bounds included; it follows in-place weight updates; under a dispatch mode it runs the
    ops (the mode sees them); bad inputs raise the ops' errors."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from pyebm import Descent, minimize
    from pyebm.policies import _Prepared

    if not hasattr(pyebm._backend.ext(), "EbtPolicyPack"):
        pytest.skip("pyebm._C without EbtPolicyPack")
    m = make_model(scale=0.1, dtype=dtype, n_obs=2)
    T, A = m.event_shape
    lower = tuple(tuple(-0.2 - 0.05 * t - 0.01 * a for a in range(A)) for t in range(T))
    cfg = Descent(steps=4, step_size=0.3, momentum=0.5, lower=lower, upper=0.4, step_clip=0.1)
    obs = torch.randn(2, L, 12, dtype=dtype)
    init = torch.randn(2, 3, T, A, dtype=dtype)

    def both():
        one = minimize(m, obs, candidates=3, config=cfg, init=init)
        whole = minimize(_Prepared(m, m.prepare(obs)), obs, candidates=3, config=cfg, init=init)
        for f in ("y", "energy", "initial_energy", "steps", "status", "best", "best_energy", "best_index"):
            assert torch.equal(getattr(one, f), getattr(whole, f)), f
        return one

    first = both()
    assert pyebm.explain(m, obs, cfg, 3, init=init).path == "one call"
    assert bool((first.y >= torch.tensor(lower, dtype=dtype)).all()) and bool((first.y <= 0.4).all())
    assert "one_call" in pyebm._state.packs(m)
    with torch.no_grad():
        m.head.fc2.weight.mul_(2.0)        # the network's pack is stale: the next call packs again
        m.blocks[1].cross.kv.bias.add_(0.5)  # and so is the observation side's
    second = both()
    assert not torch.equal(first.energy, second.energy)

    seen = []

    class Log(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with Log():
        logged = minimize(m, obs, candidates=3, config=cfg, init=init)
    assert any("ebt_policy_descent" in f for f in seen) and any("ebt_policy_context" in f for f in seen)
    assert torch.equal(logged.y, second.y) and torch.equal(logged.best, second.best)

    with pytest.raises(ValueError, match=r"y must be \[B, K, horizon=5, action_dim=3\]"):
        m.run_one_call(obs, cfg, y0=torch.randn(2, 3, T + 1, A, dtype=dtype))
    with pytest.raises(ValueError, match="ctx was prepared for B=2 observations but y has B=1"):
        m.run_one_call(obs, Descent(steps=2), y0=init[:1])
    from pyebm.energy import plan_rule

    rule = plan_rule(cfg, dtype, (T, A))
    bias = m._mask_bias(L, obs.device, dtype)
    with pytest.raises(ValueError, match=r"bias must have shape \[5, %d\]" % L):  # the kernel's own checks
        m._one_call_pack().descent(obs, init, bias[:, :1], rule, "none", 0.0, "candidate", True)
    with pytest.raises(ValueError, match="tol_scope must be candidate or all"):
        m._one_call_pack().descent(obs, init, bias, rule, "none", 0.0, "every", True)
    assert m._one_call_pack().descent(obs.float() if dtype == torch.float64 else obs.double(), init, bias, rule,
                                      "none", 0.0, "candidate", True) is None  # not the pack's dtype: the ops
    with pytest.raises(ValueError, match="final_energy=False needs one candidate"):
        m.run_one_call(obs, cfg, y0=init, final_energy=False)
    with pytest.raises(ValueError, match="draws no noise"):
        m.run_one_call(obs, Descent.ebt_policy(noise=0.1), y0=init)
    with pytest.raises(ValueError, match="obs_tokens"):
        m.run_one_call(obs[:, :, :5], cfg, y0=init)
    one = m.run_one_call(obs, cfg, y0=init[:, :1].contiguous(), final_energy=False)
    assert one[1] is None and one[6] is None and one[7].tolist() == [0, 0]
    assert torch.equal(one[5], one[0][:, 0])


@needs_loop
def test_one_candidate_final_energy_only_when_asked():
    """With one candidate nothing is selected: minimize(..., final_energy=False) skips the whole loop's final
    energy pass and says so (None), and every field of a result is a value computed during the call."""
    from pyebm import Descent, minimize
    from pyebm.policies import EnergyPolicy

    m = make_model(scale=0.1)
    obs = torch.randn(2, 2, 12, dtype=torch.float64)
    cfg = Descent.ebt_policy(max_steps=4, step_size=5.0, min_grad=0.05)
    y0 = torch.randn(2, 1, 5, 3, dtype=torch.float64)
    res = minimize(m, obs, candidates=1, config=cfg, init=y0, final_energy=False)
    assert res.energy is None and res.best_energy is None
    full = minimize(m, obs, candidates=1, config=cfg, init=y0)
    want = m.energy(m.prepare(obs), full.y)
    assert torch.equal(full.energy, want) and torch.equal(full.best_energy, want[:, 0])
    for f in ("y", "best", "initial_energy", "steps", "status", "best_index"):
        assert torch.equal(getattr(res, f), getattr(full, f)), f
    assert torch.equal(res.best, res.y[:, 0]) and res.best_index.tolist() == [0, 0]
    # the result does not change when the model does afterwards
    before = full.energy.clone()
    with torch.no_grad():
        m.head.fc2.weight.mul_(3.0)
    assert torch.equal(full.energy, before)
    assert torch.equal(copy.deepcopy(full).energy, before) and torch.equal(pickle.loads(pickle.dumps(full)).energy,
                                                                           before)
    with pytest.raises(ValueError, match="final_energy=False needs candidates=1"):
        minimize(m, obs, candidates=2, config=cfg, final_energy=False)

    # the op without its final pass: NaN energies, everything else unchanged
    ctx = m.prepare(obs)
    full = m.run_whole_loop(ctx, cfg, y0=y0)
    part = m.run_whole_loop(ctx, cfg, y0=y0, final_energy=False)
    assert bool(torch.isnan(part[1]).all()) and torch.equal(full[1], m.energy(ctx, full[0]))
    for a, b in zip(full[:1] + full[2:], part[:1] + part[2:]):
        assert torch.equal(a, b)

    # the policy: skipped with one candidate and no recovery, unless final_energy=True; computed when
    # recovery needs it
    pol = EnergyPolicy.ebt_policy(m, max_steps=4, min_grad=0.05)
    pol.act(obs, generator=0)
    assert pol.last_result.energy is None and pol.last_result.best_energy is None
    pol = EnergyPolicy.ebt_policy(m, max_steps=4, min_grad=0.05, final_energy=True)
    pol.act(obs, generator=0)
    want = m.energy(m.prepare(obs), pol.last_result.y)
    assert torch.equal(pol.last_result.energy, want) and torch.equal(pol.last_result.best_energy, want[:, 0])
    pol = EnergyPolicy.ebt_policy(m, max_steps=4, min_grad=0.05, recovery_threshold=1e9)
    pol.act(obs, generator=0)
    assert torch.equal(pol.last_result.energy, m.energy(m.prepare(obs), pol.last_result.y))


@needs_loop
def test_whole_loop_not_taken_for_options_it_lacks():
    from pyebm import Descent, minimize

    m = make_model(scale=0.1)
    obs = torch.randn(1, 2, 12, dtype=torch.float64)
    y0 = torch.randn(1, 2, 5, 3, dtype=torch.float64)
    def route(cfg, **kw):
        return pyebm.explain(m, obs, cfg, 2, init=y0, **kw)

    for cfg, why in ((Descent.ebt_policy(noise=0.1), "noise"), (Descent(steps=3, accept_if_lower=True), "accept"),
                     (Descent(steps=3, tol=1e-3, tol_on="energy_change"), "energy_change"),
                     (Descent(steps=3, tol=1e-3, tol_scope="all", grad_clip=1.0), "clipping")):
        r = route(cfg)
        assert r.path == "per step" and why in r.refused["whole loop"], r
        with pytest.raises(ValueError, match="whole_loop=True but no whole-loop op"):
            minimize(m, obs, candidates=2, config=cfg, init=y0, whole_loop=True, generator=0)
    cfg = Descent(steps=3)
    assert route(cfg).path == "one call"
    assert route(cfg, record=True).path == "per step"
    assert route(cfg, backend="torch").path == "per step"
    m.grad_mode = "autograd"
    assert "grad_mode" in route(cfg).refused["whole loop"]


@needs_loop
def test_whole_loop_op_bad_arguments():
    m = make_model(scale=0.1)
    ctx = m.prepare(torch.randn(1, 2, 12, dtype=torch.float64))
    y0 = torch.randn(1, 2, 5, 3, dtype=torch.float64)
    params, wt = m._op_weights()
    eta = torch.full((3,), 0.1, dtype=torch.float64)

    def call(**kw):
        a = dict(eta=eta, normalize="none", tol_scope="candidate", tol=0.0, grad_clip=None)
        a.update(kw)
        return torch.ops.pyebm.ebt_policy_descent(y0, ctx.k, ctx.v, ctx.bias, params, wt, 3, 1e-6, 1e-5, a["eta"],
                                                  None, None, None, a["normalize"], 1e-8, 1.0, 0.0, False,
                                                  a["grad_clip"], None, False, 1.0, a["tol"], a["tol_scope"], False,
                                                  True)

    y, E, E0, steps, status = call()
    assert y.shape == y0.shape and E.shape == (1, 2) and steps.dtype == torch.int32 and status.dtype == torch.int8
    torch.library.opcheck(torch.ops.pyebm.ebt_policy_descent.default,
                          (y0, ctx.k, ctx.v, ctx.bias, params, wt, 3, 1e-6, 1e-5, eta, None, None, None, "rms", 1e-8,
                           1.0, 0.5, True, None, None, True, 9.0, 1e-3, "candidate", True, True),
                          test_utils=("test_schema", "test_faketensor"))
    assert bool((steps == 3).all())
    with pytest.raises(ValueError, match="normalize must be none, rms or all; got 'rms_all'"):
        call(normalize="rms_all")
    with pytest.raises(ValueError, match="tol_scope must be candidate or all"):
        call(tol_scope="batch")
    with pytest.raises(ValueError, match="eta must be \\[steps\\]"):
        call(eta=eta[:0])
    with pytest.raises(ValueError, match="tol_scope 'all' is not combined with gradient clipping"):
        call(tol=1e-3, tol_scope="all", grad_clip=1.0)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_energy_calls_are_differentiable_under_torch_func(backend):
    """Inside torch.func transforms the inference calls go through the training forward: torch.func.grad of
    the energy is the input gradient (not the zero of a constant), vmap gives the batched values."""
    m = make_model(backend=backend)
    obs = torch.randn(2, m.n_obs_steps, m.cond_dim, dtype=torch.float64)
    ctx = m.prepare(obs)
    y = torch.randn(2, 4, m.horizon, m.action_dim, dtype=torch.float64)
    E, G = m.energy_and_grad(ctx, y)
    assert torch.allclose(torch.func.grad(lambda v: m.energy(ctx, v).sum())(y), G)
    assert torch.allclose(torch.func.grad(lambda v: m.energy_and_grad(ctx, v)[0].sum())(y), G)
    E2, G2 = torch.func.vmap(lambda v: m.energy_and_grad(ctx, v), in_dims=1, out_dims=1)(y.unsqueeze(2))
    assert torch.allclose(E2[:, :, 0], E) and torch.allclose(G2[:, :, 0], G)
