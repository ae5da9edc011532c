"""Triton prediction attention (kernels/ebt_attention.py) against the reference, once per ``triton_device``
(conftest.py: interpreter mode on CPU tensors, or compiled on CUDA tensors)."""
import pytest
import torch

from pyebm.reference.ebt import prediction_attention

triton = pytest.importorskip("triton")
kern = pytest.importorskip("pyebm._kernels.ebt_attention")


def _inputs(B, H, R, T, hd, dtype, cap=None, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(device)  # noqa: E731
    cap = cap or T
    # the cache is a slice of a larger buffer, as in the model (non-contiguous)
    K = r(B, H, cap, hd)[:, :, :T].to(dtype)
    Vv = r(B, H, cap, hd)[:, :, :T].to(dtype)
    q, ks, vs = (r(B, H, R, hd).to(dtype) for _ in range(3))
    return q, K, Vv, ks, vs


def _ref(q, K, Vv, ks, vs, nv, dtype=torch.float64):
    args = [t.to(dtype).requires_grad_(True) if t is not None else None for t in (q, ks, vs)]
    qq, kk, vv = args
    o = prediction_attention(qq, K.to(dtype), Vv.to(dtype), kk, vv, nv)
    return o, args


@pytest.mark.parametrize("B,H,R,T,hd,self_kv,vis", [
    (1, 1, 1, 1, 16, True, False),
    (2, 3, 4, 37, 32, True, False),      # G = 4 samples of the last position
    (2, 2, 12, 5, 8, True, True),        # every position of a short prompt, head_dim 8
    (1, 2, 17, 70, 16, True, True),      # rows over one block of context, odd sizes
    (2, 1, 5, 9, 16, False, True),       # cross-attention with a visible prefix (row 0 sees nothing)
])
def test_forward_backward_fp32(triton_device, B, H, R, T, hd, self_kv, vis):
    q, K, Vv, ks, vs = _inputs(B, H, R, T, hd, torch.float32, cap=T + 3, device=triton_device)
    if not self_kv:
        ks = vs = None
    nv = None
    if vis:
        nv = torch.arange(R, device=triton_device) % (T + 2)  # includes 0 (nothing visible) and > T (clamped)
    do = torch.randn(B, H, R, hd, device=triton_device)
    o, lse = kern.ebt_attention_fwd(q, K, Vv, ks, vs, nv)
    dq, dks, dvs = kern.ebt_attention_bwd(do, q, K, Vv, o, lse, ks, vs, nv)
    grads = {}
    for dt in (torch.float64, torch.float32):
        o_ref, args = _ref(q, K, Vv, ks, vs, nv, dt)
        gs = torch.autograd.grad(o_ref, [a for a in args if a is not None], do.to(dt))
        grads[dt] = (o_ref.detach(), gs)
    o64, g64 = grads[torch.float64]
    o32, g32 = grads[torch.float32]

    def tol(a32, a64):
        return 8 * float((a32.double() - a64).abs().max()) + 1e-6

    torch.testing.assert_close(o.double(), o64, rtol=0, atol=tol(o32, o64))
    got = [dq] + ([dks, dvs] if self_kv else [])
    for x, x64, x32 in zip(got, g64, g32):
        torch.testing.assert_close(x.double(), x64, rtol=0, atol=tol(x32, x64))
    if vis and not self_kv:
        assert (o[:, :, 0] == 0).all() and (dq[:, :, 0] == 0).all()


def test_lse_and_bf16(triton_device):
    q, K, Vv, ks, vs = _inputs(2, 2, 4, 20, 16, torch.float32, device=triton_device)
    o, lse = kern.ebt_attention_fwd(q, K, Vv, ks, vs)
    s = torch.cat((q @ K.transpose(-1, -2), (q * ks).sum(-1, keepdim=True)), -1)
    torch.testing.assert_close(lse, torch.logsumexp(s, -1), rtol=1e-5, atol=1e-5)
    qb, Kb, Vb, ksb, vsb = (t.bfloat16() for t in (q, K, Vv, ks, vs))
    ob, _ = kern.ebt_attention_fwd(qb, Kb, Vb, ksb, vsb)
    o_ref = prediction_attention(*(t.double() for t in (qb, Kb, Vb, ksb, vsb)))
    o_bf = prediction_attention(qb, Kb, Vb, ksb, vsb)
    err_ref = float((o_bf.double() - o_ref).abs().max())
    assert float((ob.double() - o_ref).abs().max()) <= 4 * err_ref + 1e-2


def test_bad_input(triton_device):
    q, K, Vv, ks, vs = _inputs(1, 2, 3, 5, 16, torch.float32, device=triton_device)
    with pytest.raises(ValueError, match=r"k_ctx must be \[B=1, H=2, T, head_dim=16\]"):
        kern.ebt_attention_fwd(q, K[:, :1], Vv, ks, vs)
    with pytest.raises(ValueError, match="k_self and v_self must be given together"):
        kern.ebt_attention_fwd(q, K, Vv, ks, None)
    with pytest.raises(ValueError, match=r"n_visible must be an integer tensor \[R=3\]"):
        kern.ebt_attention_fwd(q, K, Vv, ks, vs, torch.ones(4, dtype=torch.long, device=triton_device))
    with pytest.raises(ValueError, match="v_ctx is torch.float64"):
        kern.ebt_attention_fwd(q, K, Vv.double(), ks, vs)


# -- the torch.library ops (pyebm/ops/ebt_attention.py) ------------------------------------------

@pytest.mark.parametrize("self_kv,vis", [(True, True), (False, True), (True, False)])
def test_ops_match_kernels_and_opcheck(triton_device, self_kv, vis):
    from pyebm.ops import ebt_attention as ops

    B, H, R, T, hd = 2, 2, 3, 7, 8
    q, K, Vv, ks, vs = _inputs(B, H, R, T, hd, torch.float32, cap=T + 2, device=triton_device)
    if not self_kv:
        ks = vs = None
    nv = torch.tensor([0, 3, 9], device=triton_device) if vis else None
    do = torch.randn(B, H, R, hd, device=triton_device)
    o, lse = ops.attention_fwd(q, K, Vv, ks, vs, nv)
    o_k, lse_k = kern.ebt_attention_fwd(q, K, Vv, ks, vs, nv)
    assert torch.equal(o, o_k) and torch.equal(lse, lse_k)
    got = ops.attention_bwd(do, q, K, Vv, o, lse, ks, vs, nv)
    want = kern.ebt_attention_bwd(do, q, K, Vv, o, lse, ks, vs, nv)
    for x, y in zip(got, want):
        assert (x is None and y is None) or torch.equal(x, y)
    # opcheck: schema, fake tensor and AOT-dispatch checks (inference ops: no autograd formula)
    torch.library.opcheck(torch.ops.pyebm.ebt_attention_fwd, (q, K, Vv, ks, vs, nv))
    torch.library.opcheck(torch.ops.pyebm.ebt_attention_bwd, (do, q, K, Vv, o, lse, ks, vs, nv))


def test_ops_fake_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    import pyebm.ops.ebt_attention  # noqa: F401  (registers the ops)

    with FakeTensorMode():
        q = torch.empty(2, 3, 5, 16, dtype=torch.bfloat16)
        K = torch.empty(2, 3, 11, 16, dtype=torch.bfloat16)
        o, lse = torch.ops.pyebm.ebt_attention_fwd(q, K, K, q, q, None)
        assert o.shape == q.shape and o.dtype == torch.bfloat16
        assert lse.shape == (2, 3, 5) and lse.dtype == torch.float32
        dq, dks, dvs = torch.ops.pyebm.ebt_attention_bwd(q, q, K, K, o, lse, None, None, None)
        assert dq.shape == q.shape and dks.shape == (0,) and dvs.shape == (0,)


def test_ops_bad_input(triton_device):
    from pyebm.ops import ebt_attention as ops

    q, K, Vv, ks, vs = _inputs(1, 2, 3, 5, 16, torch.float32, device=triton_device)
    with pytest.raises(ValueError, match=r"k_ctx must be \[B=1, H=2, T, head_dim=16\]"):
        ops.attention_fwd(q, K[:, :1], Vv, ks, vs)
    o, lse = ops.attention_fwd(q, K, Vv, ks, vs)
    with pytest.raises(ValueError, match="lse must be fp32"):
        ops.attention_bwd(q, q, K, Vv, o, lse.double(), ks, vs)


def test_ops_compile_fullgraph(triton_device):
    from pyebm.ops import ebt_attention as ops

    def f(q, K, Vv, ks, vs, do):
        o, lse = ops.attention_fwd(q, K, Vv, ks, vs)
        return ops.attention_bwd(do, q, K, Vv, o, lse, ks, vs)[0]

    q, K, Vv, ks, vs = _inputs(1, 2, 3, 6, 16, torch.float32, device=triton_device)
    do = torch.randn(1, 2, 3, 16, device=triton_device)
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(q, K, Vv, ks, vs, do)
    assert torch.equal(got, f(q, K, Vv, ks, vs, do))
