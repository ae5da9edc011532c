"""torch.ops.pyebm.ebt_rows_* (csrc/cpu/ebt_rows.cpp) against the references: the prediction attention with
RoPE inside (pyebm.reference.ebt.rows_attention, its gradient by autograd in float64), the RMSNorm without
weight and the SwiGLU gate (autograd through plain torch).

Shapes cover the kernel's edges: row counts around its 4-row blocks (1, 3, 4, 5, 9), head sizes around the
vector widths (2, 6, 8, 16, 36, 64), context lengths from 0, visible prefixes per row (n_visible [R] and
[B, R], including 0 and values outside [0, T]), caches that are slices of larger buffers. Bounds: a small
multiple of the float32 reference's own error against float64. Under `make test-isa` the AVX2 and baseline
copies run the same tests.
"""
import pytest
import torch

from pyebm.ops import ebt_rows
from pyebm.reference.ebt import rope_tables, rows_attention

pytest.importorskip("pyebm._C")
OPS = torch.ops.pyebm
pytestmark = pytest.mark.skipif(not (hasattr(OPS, "ebt_rows_attention") and torch._C._dispatch_has_kernel_for_dispatch_key(
    "pyebm::ebt_rows_attention", "CPU")), reason="built without the ebt_rows CPU kernels")


def _tables(R, hd, start=3, dtype=torch.float32):
    """The interleaved RoPE tables of the model's pack for rows at positions start, start + 1, ..."""
    cos, sin = rope_tables(hd, start + R + 1, torch.float64)
    cos, sin = cos[start:start + R], sin[start:start + R]
    return cos.repeat_interleave(2, dim=-1).to(dtype), torch.stack((-sin, sin), dim=-1).flatten(-2).to(dtype)


def _inputs(B, R, H, T, hd, seed=0, cap_extra=3):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, R, 3, H, hd, generator=g)
    K = torch.randn(B, H, T + cap_extra, hd, generator=g)[:, :, :T]   # a slice of a larger cache, as in the model
    V = torch.randn(B, H, T + cap_extra, hd, generator=g)[:, :, :T]
    cos, sin = _tables(R, hd)
    return qkv, K, V, cos, sin


def _reference(qkv, K, V, cos, sin, nv, do, dtype):
    q = qkv.to(dtype).clone().requires_grad_(True)
    o = rows_attention(q, K.to(dtype), V.to(dtype), cos.to(dtype), sin.to(dtype), nv)
    (g,) = torch.autograd.grad(o, q, do.to(dtype))
    return o.detach(), g


def _lse(qkv, K, cos, sin, nv):
    """The log normaliser [B, H, R] of each row's softmax, in float64."""
    from pyebm.reference.ebt import apply_rope
    B, R, _, H, hd = qkv.shape
    T = K.shape[2]
    c, s = cos.double()[:, 0::2], sin.double()[:, 1::2]
    q = apply_rope(qkv.double()[:, :, 0], c, s).transpose(1, 2)
    k = apply_rope(qkv.double()[:, :, 1], c, s).transpose(1, 2)
    sc = q @ K.double().transpose(-1, -2)
    if nv is not None:
        nvv = nv if nv.dim() == 2 else nv[None]
        sc = sc.masked_fill((torch.arange(T)[None, None, :] >= nvv[:, :, None])[:, None], float("-inf"))
    sc = torch.cat((sc, (q * k).sum(-1, keepdim=True)), dim=-1)
    return torch.logsumexp(sc, dim=-1)


def _close(got, exact, ref32, what):
    err = (got.double() - exact).abs().max().item()
    err_ref = (ref32.double() - exact).abs().max().item()
    scale = exact.abs().max().item() + 1e-30
    assert err <= 8 * err_ref + 64 * torch.finfo(torch.float32).eps * scale, (what, err, err_ref, scale)


@pytest.mark.parametrize("B,R,H,T,hd", [
    (1, 4, 6, 37, 64),     # G = 4 samples of the last position
    (2, 1, 2, 5, 8),
    (1, 3, 1, 1, 16),
    (2, 5, 3, 20, 36),     # a tail past the vector width
    (1, 9, 2, 70, 6),      # head size below the vector width
    (1, 4, 2, 0, 2),       # no context: every row attends to itself only
    (3, 6, 2, 9, 10),      # a 2-row tail block, three prompts
    (1, 2, 1, 300, 128),   # two rows, a long context, a wide head
])
@pytest.mark.parametrize("vis", ["all", "rows", "batch"])
def test_attention_forward_backward(B, R, H, T, hd, vis):
    qkv, K, V, cos, sin = _inputs(B, R, H, T, hd, seed=B * 100 + R * 10 + hd)
    nv = None
    if vis == "rows":
        nv = (torch.arange(R) * 7) % (T + 3) - 1               # -1 (nothing), past T (everything), in between
    elif vis == "batch":
        nv = torch.randint(0, T + 1, (B, R), generator=torch.Generator().manual_seed(R), dtype=torch.int32)
    do = torch.randn(B, R, H * hd, generator=torch.Generator().manual_seed(7))
    o, lse = OPS.ebt_rows_attention(qkv, K, V, cos, sin, nv)
    dqkv = OPS.ebt_rows_attention_bwd(do, qkv, K, V, o, lse, cos, sin, nv)
    assert o.shape == (B, R, H * hd) and lse.shape == (B, H, R) and dqkv.shape == qkv.shape
    o64, g64 = _reference(qkv, K, V, cos, sin, nv, do, torch.float64)
    o32, g32 = _reference(qkv, K, V, cos, sin, nv, do, torch.float32)
    _close(o, o64, o32, "o")
    _close(dqkv, g64, g32, "dqkv")
    torch.testing.assert_close(lse.double(), _lse(qkv, K, cos, sin, nv), rtol=1e-5, atol=1e-5)


def test_attention_threads_and_rows_independent():
    """The same numbers for 1 and 2 threads (each (prompt, head) pair is computed the same way whoever computes
    it); a NaN in one row's q|k|v stays in that row."""
    B, R, H, T, hd = 2, 6, 6, 150, 64
    qkv, K, V, cos, sin = _inputs(B, R, H, T, hd, seed=3)
    do = torch.randn(B, R, H * hd)
    before = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            o, lse = OPS.ebt_rows_attention(qkv, K, V, cos, sin, None)
            outs.append((o, lse, OPS.ebt_rows_attention_bwd(do, qkv, K, V, o, lse, cos, sin, None)))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    bad = qkv.clone()
    bad[1, 2, 0, 3, 5] = float("nan")
    o, lse = OPS.ebt_rows_attention(bad, K, V, cos, sin, None)
    nan_rows = o.isnan().any(-1)
    assert nan_rows[1, 2] and nan_rows.sum() == 1
    assert torch.equal(o[0], outs[0][0][0])


def test_attention_strided_cache_of_the_model_layout():
    """The model's cache: one [L * B, H, capacity, hd] tensor per layer; a landscape's keys are a row slice of
    it, the filled length a slice of the capacity."""
    L, B, H, cap, T, hd, R = 2, 2, 3, 40, 29, 16, 4
    keys = torch.randn(L * B, H, cap, hd)
    values = torch.randn(L * B, H, cap, hd)
    K, V = keys[B:2 * B, :, :T], values[B:2 * B, :, :T]
    qkv = torch.randn(B, R, 3, H, hd)
    cos, sin = _tables(R, hd, start=T)
    do = torch.randn(B, R, H * hd)
    o, lse = ebt_rows.attention(qkv, K, V, cos, sin)           # the module's wrappers: n_visible left out
    dqkv = ebt_rows.attention_bwd(do, qkv, K, V, o, lse, cos, sin)
    o2, lse2 = OPS.ebt_rows_attention(qkv, K.contiguous(), V.contiguous(), cos, sin, None)
    assert torch.equal(o, o2) and torch.equal(lse, lse2)
    assert torch.equal(dqkv, OPS.ebt_rows_attention_bwd(do, qkv, K.contiguous(), V.contiguous(), o, lse, cos, sin,
                                                        None))


@pytest.mark.parametrize("M,D", [(1, 1), (3, 7), (4, 384), (5, 33)])
def test_rms_norm(M, D):
    g = torch.Generator().manual_seed(M * 10 + D)
    x = torch.randn(M, D, generator=g) * 3
    dy = torch.randn(M, D, generator=g)
    add = torch.randn(M, D, generator=g)
    eps = 1e-5
    xn, r = OPS.ebt_rows_rms_norm(x, eps)

    def ref(dt):
        xx = x.to(dt).clone().requires_grad_(True)
        rr = torch.rsqrt(xx.pow(2).mean(-1, keepdim=True) + eps)
        y = xx * rr
        (gx,) = torch.autograd.grad(y, xx, dy.to(dt))
        return y.detach(), rr.detach(), gx

    y64, r64, g64 = ref(torch.float64)
    y32, r32, g32 = ref(torch.float32)
    _close(xn, y64, y32, "xn")
    _close(r, r64, r32, "r")
    _close(OPS.ebt_rows_rms_norm_bwd(xn, r, dy, None), g64, g32, "dx")
    _close(OPS.ebt_rows_rms_norm_bwd(xn, r, dy, add), g64 + add.double(), g32 + add, "add + dx")
    # one gradient row for every row (the energy head's weight)
    row = dy[0]
    _close(OPS.ebt_rows_rms_norm_bwd(xn, r, row, None), OPS.ebt_rows_rms_norm_bwd(xn, r, row.expand(M, D), None)
           .double(), OPS.ebt_rows_rms_norm_bwd(xn, r, row.expand(M, D).contiguous(), None), "broadcast g")


@pytest.mark.parametrize("M,F", [(1, 1), (4, 384), (3, 13), (2, 40)])
def test_swiglu(M, F):
    g = torch.Generator().manual_seed(M * 10 + F)
    uz = torch.randn(M, 2 * F, generator=g) * 4
    dm = torch.randn(M, F, generator=g)

    def ref(dt):
        x = uz.to(dt).clone().requires_grad_(True)
        u, z = x.chunk(2, dim=-1)
        m = torch.nn.functional.silu(u) * z
        (gx,) = torch.autograd.grad(m, x, dm.to(dt))
        return m.detach(), gx

    m64, g64 = ref(torch.float64)
    m32, g32 = ref(torch.float32)
    _close(OPS.ebt_rows_swiglu(uz), m64, m32, "m")
    _close(OPS.ebt_rows_swiglu_bwd(dm, uz), g64, g32, "duz")


def test_bad_input():
    qkv, K, V, cos, sin = _inputs(1, 4, 2, 9, 8)
    with pytest.raises(TypeError, match="qkv must be float32"):
        OPS.ebt_rows_attention(qkv.double(), K, V, cos, sin, None)
    with pytest.raises(ValueError, match=r"qkv must be \[B, R, 3, H, head_dim\]"):
        OPS.ebt_rows_attention(qkv[:, :, :2], K, V, cos, sin, None)
    with pytest.raises(ValueError, match="head_dim must be even"):
        OPS.ebt_rows_attention(qkv[..., :7], K[..., :7], V[..., :7], cos[:, :7], sin[:, :7], None)
    with pytest.raises(ValueError, match="v_ctx must be"):
        OPS.ebt_rows_attention(qkv, K, V[:, :, :3], cos, sin, None)
    with pytest.raises(ValueError, match=r"cos must have shape \[4, 8\]"):
        OPS.ebt_rows_attention(qkv, K, V, cos[:3], sin, None)
    with pytest.raises(TypeError, match="n_visible must be an integer tensor"):
        OPS.ebt_rows_attention(qkv, K, V, cos, sin, torch.ones(4))
    with pytest.raises(ValueError, match=r"n_visible must be \[R=4\]"):
        OPS.ebt_rows_attention(qkv, K, V, cos, sin, torch.ones(3, dtype=torch.long))
    o, lse = OPS.ebt_rows_attention(qkv, K, V, cos, sin, None)
    with pytest.raises(ValueError, match=r"lse must have shape \[1, 2, 4\]"):
        OPS.ebt_rows_attention_bwd(o, qkv, K, V, o, lse[..., :2], cos, sin, None)
    with pytest.raises(ValueError, match=r"x must be \[M, D\]"):
        OPS.ebt_rows_rms_norm(torch.randn(3), 1e-5)
    with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
        OPS.ebt_rows_rms_norm(torch.randn(2, 3), -1.0)
    with pytest.raises(ValueError, match=r"g must be \[M=2, D=3\] or \[D\]"):
        OPS.ebt_rows_rms_norm_bwd(torch.randn(2, 3), torch.ones(2, 1), torch.randn(4), None)
    with pytest.raises(ValueError, match=r"uz must be \[M, 2F\]"):
        OPS.ebt_rows_swiglu(torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"dm must have shape \[2, 3\]"):
        OPS.ebt_rows_swiglu_bwd(torch.randn(2, 2), torch.randn(2, 6))
    with pytest.raises(RuntimeError, match="ebt_rows_swiglu is an inference op .*'uz' requires grad"):
        OPS.ebt_rows_swiglu(torch.randn(2, 6, requires_grad=True))


def test_opcheck():
    qkv, K, V, cos, sin = _inputs(2, 3, 2, 11, 8, seed=5)
    nv = torch.tensor([3, 11, 0])
    torch.library.opcheck(OPS.ebt_rows_attention.default, (qkv, K, V, cos, sin, nv))
    o, lse = OPS.ebt_rows_attention(qkv, K, V, cos, sin, nv)
    do = torch.randn_like(o)
    torch.library.opcheck(OPS.ebt_rows_attention_bwd.default, (do, qkv, K, V, o, lse, cos, sin, nv))
    x = torch.randn(3, 10)
    xn, r = OPS.ebt_rows_rms_norm(x, 1e-6)
    torch.library.opcheck(OPS.ebt_rows_rms_norm.default, (x, 1e-6))
    torch.library.opcheck(OPS.ebt_rows_rms_norm_bwd.default, (xn, r, torch.randn(3, 10), torch.randn(3, 10)))
    torch.library.opcheck(OPS.ebt_rows_rms_norm_bwd.default, (xn, r, torch.randn(10), None))
    torch.library.opcheck(OPS.ebt_rows_swiglu.default, (torch.randn(3, 8),))
    torch.library.opcheck(OPS.ebt_rows_swiglu_bwd.default, (torch.randn(3, 4), torch.randn(3, 8)))
