"""Triton kernels of the EBT-Policy energy network against plain PyTorch autograd on the same math.

Each test runs once per ``triton_device`` (tests/conftest.py): under TRITON_INTERPRET=1 on CPU tensors
when there is no GPU, compiled on CUDA tensors when there is one.
Error bound: a small multiple of the plain-PyTorch computation's own error at the kernel's dtype, both
measured against the same computation in fp64 on the same (rounded) inputs.
"""
import pytest
import torch
import torch.nn.functional as F

from pyebm import _backend
from pyebm.models import EBTPolicy
from pyebm.ops import ebt_policy_triton as tri
from pyebm.reference import ebt_policy as ref

pytestmark = pytest.mark.skipif(not _backend.backends()["triton"], reason="triton backend not usable here")

EPS = ref.RMS_EPS
# (kernel dtype, multiple of the reference's own error, floor relative to the output's scale)
DTYPES = [pytest.param((torch.float32, 4.0, 2e-7), id="fp32"), pytest.param((torch.bfloat16, 2.0, 1e-3), id="bf16")]


# -- plain PyTorch versions of the same math ------------------------------------------------------
def self_attn_ref(qkv, wq, wk, heads, eps=EPS):
    N, T, C = qkv.shape
    D = C // 3
    hd = D // heads
    q, k, v = qkv.reshape(N, T, 3, heads, hd).permute(2, 0, 3, 1, 4)
    q = ref.rms_norm(q, wq, eps) * hd ** -0.5
    k = ref.rms_norm(k, wk, eps)
    o = torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v
    return o.transpose(1, 2).reshape(N, T, D)


def cross_attn_ref(q, wq, k_ctx, v_ctx, n_visible, eps=EPS):
    allowed = torch.arange(k_ctx.shape[2], device=k_ctx.device) < n_visible[..., None].long()  # [R, L] or [B, R, L]
    if allowed.dim() == 3:
        allowed = allowed[:, None]
    s = (ref.rms_norm(q, wq, eps) @ k_ctx.transpose(-2, -1)).masked_fill(~allowed, float("-inf"))
    return torch.softmax(s, dim=-1) @ v_ctx


def rms_ref(x, w, eps=EPS):
    return ref.rms_norm(x, w, eps)


def _value_and_grad(fn, x, go, *consts):
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        out = fn(x, *consts)
        if isinstance(out, tuple):
            out = out[0]
        (g,) = torch.autograd.grad(out, x, go)
    return out.detach(), g


def _bounded(got, exact, lowp, mult, floor, what):
    err = (got.double() - exact).abs().max().item()
    own = (lowp.double() - exact).abs().max().item()
    tol = mult * own + floor * exact.abs().max().item()
    assert err <= tol, f"{what}: error {err:.3e} > {tol:.3e} (reference's own error {own:.3e})"


def compare(kernel_fn, ref_fn, x64, go64, consts64, dtype, mult, floor, int_consts=(), *, device):
    """kernel at dtype vs ref at fp64 (exact) and at dtype (its own error), on the same rounded inputs,
    all on ``device``."""
    x = x64.to(device, dtype)
    go = go64.to(device, dtype)
    consts = [c.to(device, dtype) for c in consts64]
    int_consts = [c.to(device) if isinstance(c, torch.Tensor) else c for c in int_consts]
    exact = _value_and_grad(ref_fn, x.double(), go.double(), *[c.double() for c in consts], *int_consts)
    lowp = _value_and_grad(ref_fn, x, go, *consts, *int_consts)
    got = _value_and_grad(kernel_fn, x, go, *consts, *int_consts)
    assert got[0].dtype == dtype and got[1].dtype == dtype and got[1].shape == x.shape
    _bounded(got[0], exact[0], lowp[0], mult, floor, "forward")
    _bounded(got[1], exact[1], lowp[1], mult, floor, "input gradient")
    return got


def _weights(n, dtype=torch.float64):
    return 1.0 + 0.3 * torch.randn(n, dtype=dtype)


# -- self-attention -------------------------------------------------------------------------------
@pytest.mark.parametrize("N,T,H,hd", [(1, 16, 4, 8), (3, 5, 3, 4), (7, 16, 2, 16), (2, 17, 1, 6)])
@pytest.mark.parametrize("prec", DTYPES)
def test_self_attention_matches_autograd(triton_device, N, T, H, hd, prec):
    dtype, mult, floor = prec
    D = H * hd
    qkv = 1.5 * torch.randn(N, T, 3 * D, dtype=torch.float64)
    go = torch.randn(N, T, D, dtype=torch.float64)

    def kern(x, wq, wk, heads):
        return tri.ebt_policy_self_attn_triton(x, wq, wk, heads, EPS)

    compare(kern, self_attn_ref, qkv, go, (_weights(hd), _weights(hd)), dtype, mult, floor, int_consts=(H,),
            device=triton_device)


def test_self_attention_strided_input_and_bwd_op(triton_device):
    N, T, H, hd = 3, 16, 2, 8
    D = H * hd
    wide = torch.randn(T, N, 3 * D + 5, device=triton_device)
    qkv = wide[:, :, 2:2 + 3 * D].transpose(0, 1)            # non-contiguous in every dim but the last
    assert not qkv.is_contiguous()
    wq, wk = _weights(hd, torch.float32).to(triton_device), _weights(hd, torch.float32).to(triton_device)
    go = torch.randn(N, D, T, device=triton_device).transpose(1, 2)  # strided upstream gradient too
    o_ref, g_ref = _value_and_grad(self_attn_ref, qkv.contiguous(), go, wq, wk, H)
    o = torch.ops.pyebm.ebt_policy_self_attn_triton(qkv, wq, wk, H, EPS)
    g = torch.ops.pyebm.ebt_policy_self_attn_bwd_triton(go, qkv, wq, wk, H, EPS)
    torch.testing.assert_close(o, o_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5)
    assert g.is_contiguous() and g.shape == qkv.shape


# -- cross-attention to cached observation tokens -------------------------------------------------
def test_memory_n_visible_is_the_memory_mask():
    for T, L, n_obs, K in [(16, 2, 2, 1), (5, 6, 2, 3), (4, 9, 3, 2), (16, 64, 2, 2)]:
        nv = tri.memory_n_visible(T, L, n_obs, K)
        allowed = torch.arange(L) < nv[:, None].long()
        torch.testing.assert_close(allowed, ref.memory_mask(T, L, n_obs).repeat(K, 1), rtol=0, atol=0)
        assert nv.dtype == torch.int32


@pytest.mark.parametrize("B,H,K,T,L,n_obs,hd", [(1, 1, 1, 16, 2, 2, 8), (3, 2, 4, 5, 6, 2, 4),
                                                (2, 4, 3, 16, 4, 2, 16), (5, 3, 1, 7, 9, 3, 5)])
@pytest.mark.parametrize("prec", DTYPES)
def test_cross_attention_matches_autograd(triton_device, B, H, K, T, L, n_obs, hd, prec):
    dtype, mult, floor = prec
    R = K * T
    q = 1.5 * torch.randn(B, H, R, hd, dtype=torch.float64)
    go = torch.randn(B, H, R, hd, dtype=torch.float64)
    # the model caches keys transposed [B, H, hd, L]; the kernel reads the transposed view by strides
    k_ctx = ref.rms_norm(torch.randn(B, H, hd, L, dtype=torch.float64).transpose(-2, -1), _weights(hd)) * hd ** -0.5
    v_ctx = torch.randn(B, H, L, hd, dtype=torch.float64)
    nv = tri.memory_n_visible(T, L, n_obs, K)

    def kern(x, wq, kc, vc, n_visible):
        return tri.ebt_policy_cross_attn_triton(x, wq, kc, vc, n_visible, EPS)[0]

    compare(kern, cross_attn_ref, q, go, (_weights(hd), k_ctx, v_ctx), dtype, mult, floor, int_consts=(nv,),
            device=triton_device)


def test_cross_attention_per_sample_prefix(triton_device):
    B, H, R, L, hd = 3, 2, 5, 7, 4
    f = dict(device=triton_device)
    q, go = torch.randn(B, H, R, hd, **f), torch.randn(B, H, R, hd, **f)
    k_ctx, v_ctx = torch.randn(B, H, L, hd, **f), torch.randn(B, H, L, hd, **f)
    wq = _weights(hd, torch.float32).to(triton_device)
    nv = torch.randint(1, L + 1, (B, R), dtype=torch.int64).to(triton_device)
    o_ref, g_ref = _value_and_grad(cross_attn_ref, q, go, wq, k_ctx, v_ctx, nv)
    o, g = _value_and_grad(lambda x, *a: tri.ebt_policy_cross_attn_triton(x, *a, EPS), q, go, wq, k_ctx, v_ctx, nv)
    torch.testing.assert_close(o, o_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5)


# -- RMSNorm and GELU-tanh ------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(7, 12), (3, 5, 33), (1, 256)])
@pytest.mark.parametrize("prec", DTYPES)
def test_rms_norm_matches_autograd(triton_device, shape, prec):
    dtype, mult, floor = prec
    x = 2.0 * torch.randn(*shape, dtype=torch.float64)
    go = torch.randn(*shape, dtype=torch.float64)

    def kern(x, w):
        return tri.ebt_policy_rms_norm_triton(x, w, EPS)[0]

    compare(kern, rms_ref, x, go, (_weights(shape[-1]),), dtype, mult, floor, device=triton_device)


def test_rms_norm_non_contiguous_and_rstd(triton_device):
    x = torch.randn(9, 20, device=triton_device)[:, 3:15]
    w = _weights(12, torch.float32).to(triton_device)
    y, rstd = tri.ebt_policy_rms_norm_triton(x, w, EPS)
    torch.testing.assert_close(y, rms_ref(x, w), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rstd, torch.rsqrt(x.pow(2).mean(-1) + EPS), rtol=1e-6, atol=0)


@pytest.mark.parametrize("shape", [(3, 17, 5), (1, 2049)])
@pytest.mark.parametrize("prec", DTYPES)
def test_gelu_tanh_matches_autograd(triton_device, shape, prec):
    dtype, mult, floor = prec
    x = 3.0 * torch.randn(*shape, dtype=torch.float64)
    go = torch.randn(*shape, dtype=torch.float64)
    compare(tri.ebt_policy_gelu_tanh_triton, lambda x: F.gelu(x, approximate="tanh"), x, go, (), dtype, mult, floor,
            device=triton_device)


# -- op conventions -------------------------------------------------------------------------------
def _op_cases(device):
    N, T, H, hd, L = 3, 5, 2, 4, 4
    D = H * hd
    f = dict(device=device)
    qkv = torch.randn(N, T, 3 * D, **f)
    w = _weights(hd, torch.float32).to(device)
    q = torch.randn(1, H, 2 * T, hd, **f)
    kc, vc = torch.randn(1, H, L, hd, **f), torch.randn(1, H, L, hd, **f)
    nv = tri.memory_n_visible(T, L, 2, 2).to(device)
    o, lse = tri.ebt_policy_cross_attn_triton(q, w, kc, vc, nv, EPS)
    x = torch.randn(3, 7, **f)
    wx = _weights(7, torch.float32).to(device)
    rstd = tri.ebt_policy_rms_norm_triton(x, wx, EPS)[1]
    ops = torch.ops.pyebm
    return [
        (ops.ebt_policy_self_attn_triton, (qkv.requires_grad_(), w, w, H, EPS)),
        (ops.ebt_policy_self_attn_bwd_triton, (torch.randn(N, T, D, **f), qkv.detach(), w, w, H, EPS)),
        (ops.ebt_policy_cross_attn_triton, (q.clone().requires_grad_(), w, kc, vc, nv, EPS)),
        (ops.ebt_policy_cross_attn_bwd_triton, (torch.randn_like(q), q, w, kc, vc, nv, o, lse, EPS)),
        (ops.ebt_policy_rms_norm_triton, (x.clone().requires_grad_(), wx, EPS)),
        (ops.ebt_policy_rms_norm_bwd_triton, (torch.randn_like(x), x, wx, rstd)),
        (ops.ebt_policy_gelu_tanh_triton, (torch.randn(4, 6, requires_grad=True, **f),)),
        (ops.ebt_policy_gelu_tanh_bwd_triton, (torch.randn(4, 6, **f), torch.randn(4, 6, **f))),
    ]


def test_opcheck(triton_device):
    for op, args in _op_cases(triton_device):
        torch.library.opcheck(op, args)


def test_bad_inputs(triton_device):
    f = dict(device=triton_device)
    qkv, w = torch.randn(2, 5, 24, **f), torch.ones(4, **f)
    with pytest.raises(TypeError, match="qkv"):
        tri.ebt_policy_self_attn_triton(qkv.double(), w.double(), w.double(), 2, EPS)
    with pytest.raises(ValueError, match="q_weight"):
        tri.ebt_policy_self_attn_triton(qkv, torch.ones(5, **f), w, 2, EPS)
    with pytest.raises(ValueError, match="heads"):
        tri.ebt_policy_self_attn_triton(qkv, w, w, 3, EPS)
    with pytest.raises(ValueError, match="qkv"):
        tri.ebt_policy_self_attn_triton(torch.randn(2, 5, 25, **f), w, w, 1, EPS)
    with pytest.raises(ValueError, match="grad_out"):
        tri.ebt_policy_self_attn_bwd_triton(torch.randn(2, 5, 7, **f), qkv, torch.ones(4, **f), torch.ones(4, **f), 2,
                                            EPS)
    q, kc, nv = torch.randn(2, 2, 6, 4, **f), torch.randn(2, 2, 3, 4, **f), torch.full((6,), 3, dtype=torch.int32, **f)
    with pytest.raises(ValueError, match="n_visible"):
        tri.ebt_policy_cross_attn_triton(q, w, kc, kc, nv.float(), EPS)
    with pytest.raises(ValueError, match="n_visible"):
        tri.ebt_policy_cross_attn_triton(q, w, kc, kc, nv[:5], EPS)
    with pytest.raises(ValueError, match="k_ctx"):
        tri.ebt_policy_cross_attn_triton(q, w, kc[:1], kc, nv, EPS)
    with pytest.raises(TypeError, match="v_ctx"):
        tri.ebt_policy_cross_attn_triton(q, w, kc, kc.bfloat16(), nv, EPS)
    with pytest.raises(ValueError, match="weight"):
        tri.ebt_policy_rms_norm_triton(torch.randn(3, 4, **f), torch.ones(5, **f), EPS)
    with pytest.raises(ValueError, match="rstd"):
        tri.ebt_policy_rms_norm_bwd_triton(torch.randn(3, 4, **f), torch.randn(3, 4, **f), torch.ones(4, **f),
                                           torch.ones(4, **f))
    with pytest.raises(ValueError, match="n_obs_steps"):
        tri.memory_n_visible(16, 5, 2)
    # input gradients only: a weight that requires grad is refused, not silently given no gradient
    x = torch.randn(3, 4, requires_grad=True, **f)
    y, _ = tri.ebt_policy_rms_norm_triton(x, torch.ones(4, requires_grad=True, **f), EPS)
    with pytest.raises(RuntimeError, match="weight"):
        y.sum().backward()


# -- EBTPolicy(backend="triton") ------------------------------------------------------------------
def make_model(dtype, backend, A=3, T=5, D=12, layers=2, heads=3, n_obs=2, seed=0, device="cpu"):
    torch.manual_seed(seed)
    m = EBTPolicy(A, horizon=T, embed_dim=D, layers=layers, heads=heads, n_obs_steps=n_obs, dtype=dtype,
                  backend=backend)
    with torch.no_grad():
        for p in m.parameters():          # norms and biases away from 1 / 0 so every term is exercised
            p.add_(0.3 * torch.randn_like(p))
    return m.to(device)


@pytest.mark.parametrize("B,K,tps", [(1, 1, 1), (3, 2, 3)])
def test_model_triton_equals_torch_path(triton_device, B, K, tps):
    m64 = make_model(torch.float64, "torch", device=triton_device)
    obs = torch.randn(B, 2 * tps, 12, dtype=torch.float64, device=triton_device)
    y = torch.randn(B, K, 5, 3, dtype=torch.float64, device=triton_device)
    E64, G64 = m64.energy_and_grad(m64.prepare(obs), y)
    mt = make_model(torch.float32, "triton", device=triton_device)
    mp = make_model(torch.float32, "torch", device=triton_device)
    assert mt.resolve_backend(triton_device) == "triton"
    ctx = mt.prepare(obs.float())
    Et, Gt = mt.energy_and_grad(ctx, y.float())
    Ep, Gp = mp.energy_and_grad(ctx, y.float())
    torch.testing.assert_close(Et, Ep, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(Gt, Gp, rtol=1e-5, atol=1e-6 * Gp.abs().max().item())
    torch.testing.assert_close(mt.energy(ctx, y.float()), Ep, rtol=1e-5, atol=1e-6)
    # and within a small multiple of the torch path's own fp32 error
    assert (Et.double() - E64).abs().max() <= 4 * (Ep.double() - E64).abs().max() + 1e-6
    assert (Gt.double() - G64).abs().max() <= 4 * (Gp.double() - G64).abs().max() + 1e-6 * G64.abs().max()


def test_model_triton_bf16_error_bounded_by_torch_bf16(triton_device):
    m64 = make_model(torch.float64, "torch", device=triton_device)
    obs = torch.randn(3, 4, 12, dtype=torch.float64, device=triton_device).bfloat16()
    y = torch.randn(3, 2, 5, 3, dtype=torch.float64, device=triton_device).bfloat16()
    E64, G64 = m64.energy_and_grad(m64.prepare(obs.double()), y.double())
    mt, mp = make_model(torch.bfloat16, "triton", device=triton_device), make_model(torch.bfloat16, "torch",
                                                                                    device=triton_device)
    Et, Gt = mt.energy_and_grad(mt.prepare(obs), y)
    Ep, Gp = mp.energy_and_grad(mp.prepare(obs), y)
    assert Gt.dtype == torch.bfloat16
    assert (Et.double() - E64).abs().max() <= 2 * (Ep.double() - E64).abs().max() + 1e-3 * E64.abs().max()
    assert (Gt.double() - G64).abs().max() <= 2 * (Gp.double() - G64).abs().max() + 1e-3 * G64.abs().max()


def test_model_triton_fp64_and_auto(triton_device):
    # fp64 has no Triton kernel here: the triton backend runs the plain PyTorch path (same numbers)
    mt = make_model(torch.float64, "triton", device=triton_device)
    mp = make_model(torch.float64, "torch", device=triton_device)
    f = dict(dtype=torch.float64, device=triton_device)
    obs, y = torch.randn(2, 2, 12, **f), torch.randn(2, 3, 5, 3, **f)
    Et, Gt = mt.energy_and_grad(mt.prepare(obs), y)
    Ep, Gp = mp.energy_and_grad(mp.prepare(obs), y)
    torch.testing.assert_close(Et, Ep, rtol=0, atol=0)
    torch.testing.assert_close(Gt, Gp, rtol=0, atol=0)
    # never chosen automatically
    m = make_model(torch.float32, None)
    assert m.resolve_backend(torch.device("cpu"), "auto") != "triton"


def test_compile_fullgraph_no_graph_break(triton_device):
    # The ops trace as single nodes (their fake implementations): the inference pattern (forward op, then
    # the backward op) compiles with fullgraph=True, and a compiled forward differentiates through the
    # registered autograd. aot_eager keeps the test free of a C++ toolchain while going through dynamo
    # and AOT autograd.
    N, T, H, hd = 2, 5, 2, 4
    D = H * hd
    qkv, go = torch.randn(N, T, 3 * D, device=triton_device), torch.randn(N, T, D, device=triton_device)
    w, wd = _weights(hd, torch.float32).to(triton_device), _weights(D, torch.float32).to(triton_device)

    def forward(x):
        o = tri.ebt_policy_self_attn_triton(x, w, w, H, EPS)
        return tri.ebt_policy_rms_norm_triton(tri.ebt_policy_gelu_tanh_triton(o), wd, EPS)[0]

    def inference(x):
        o = tri.ebt_policy_self_attn_triton(x, w, w, H, EPS)
        h = tri.ebt_policy_gelu_tanh_triton(o)
        y, rstd = tri.ebt_policy_rms_norm_triton(h, wd, EPS)
        dh = tri.ebt_policy_rms_norm_bwd_triton(go, h, wd, rstd)
        return y, tri.ebt_policy_self_attn_bwd_triton(tri.ebt_policy_gelu_tanh_bwd_triton(dh, o), x, w, w, H, EPS)

    y_ref, g_ref = _value_and_grad(forward, qkv, go)
    torch._dynamo.reset()
    y, g = torch.compile(inference, backend="aot_eager", fullgraph=True)(qkv)
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g, g_ref, rtol=1e-6, atol=1e-6)
    y, g = _value_and_grad(torch.compile(forward, backend="aot_eager", fullgraph=True), qkv, go)
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g, g_ref, rtol=1e-6, atol=1e-6)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the interpreter's numpy on the NaN row
def test_model_triton_non_finite_candidate_stays_contained(triton_device):
    mt = make_model(torch.float32, "triton", device=triton_device)
    mp = make_model(torch.float32, "torch", device=triton_device)
    obs, y = torch.randn(2, 4, 12, device=triton_device), torch.randn(2, 3, 5, 3, device=triton_device)
    y[1, 0, 2, 1] = float("nan")
    Et, Gt = mt.energy_and_grad(mt.prepare(obs), y)
    Ep, Gp = mp.energy_and_grad(mp.prepare(obs), y)
    ok = torch.ones(2, 3, dtype=torch.bool, device=triton_device)
    ok[1, 0] = False
    assert torch.isnan(Et[1, 0]) and torch.isfinite(Et[ok]).all() and torch.isfinite(Gt[ok]).all()
    torch.testing.assert_close(Et[ok], Ep[ok], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(Gt[ok], Gp[ok], rtol=1e-5, atol=1e-6)
