"""Triton RMSNorm and SwiGLU kernels and ops against plain torch autograd, once per ``triton_device``
(conftest.py: interpreter mode on CPU tensors, or compiled on CUDA tensors)."""
import pytest
import torch
import torch.nn.functional as F

from pyebm.reference.ebt import rms_norm as ref_rms_norm

triton = pytest.importorskip("triton")
kern = pytest.importorskip("pyebm._kernels.ebt_norm_swiglu")
ops = pytest.importorskip("pyebm.ops.ebt_norm_swiglu")

EPS = 1e-5


def _randn(*shape, seed=0, scale=1.0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device)


def _ref_rms(x, w, dy):
    """(y, dx) of the reference RMSNorm by autograd, in x's dtype."""
    x = x.detach().requires_grad_(True)
    y = ref_rms_norm(x, w if w is not None else 1.0, EPS)
    (dx,) = torch.autograd.grad(y, x, dy)
    return y.detach(), dx


def _ref_swiglu(a, b, dy):
    a = a.detach().requires_grad_(True)
    b = b.detach().requires_grad_(True)
    y = F.silu(a) * b
    da, db = torch.autograd.grad(y, (a, b), dy)
    return y.detach(), da, db


def _err(x, x64):
    return float((x.double() - x64).abs().max())


def _bound(ref_lo, ref64, factor=4):
    """A small multiple of the reference's own error at the low precision."""
    return factor * _err(ref_lo, ref64) + 1e-7


# Shapes [..., D] and how the input is laid out: contiguous, a column slice of a wider buffer (row
# stride != D), or a strided last axis.
SHAPES = [((1, 1), "contig"), ((3, 17), "contig"), ((2, 5, 123), "slice"), ((7, 64), "step"),
          ((4, 3, 33), "step"), ((130, 8), "contig")]


def _layout(t, kind):
    if kind == "slice":
        wide = torch.cat((t, t[..., :3] + 1), dim=-1)
        return wide[..., :t.shape[-1]]
    if kind == "step":
        wide = torch.stack((t, -t), dim=-1).flatten(-2)
        return wide[..., ::2]
    return t


@pytest.mark.parametrize("shape,kind", SHAPES)
@pytest.mark.parametrize("with_weight", [True, False])
def test_rms_norm_fp32(triton_device, shape, kind, with_weight):
    D = shape[-1]
    x64 = _randn(*shape, seed=1, scale=3.0, device=triton_device)
    w64 = _randn(D, seed=2, device=triton_device) if with_weight else None
    dy64 = _randn(*shape, seed=3, device=triton_device)
    y64, dx64 = _ref_rms(x64, w64, dy64)
    y32, dx32 = _ref_rms(x64.float(), None if w64 is None else w64.float(), dy64.float())
    x = _layout(x64.float(), kind)
    assert kind == "contig" or not x.is_contiguous()
    w = None if w64 is None else w64.float()
    y = kern.rms_norm_fwd(x, w, EPS)
    dx = kern.rms_norm_bwd(_layout(dy64.float(), kind), x, w, EPS)
    assert y.dtype == dx.dtype == torch.float32 and y.shape == dx.shape == x.shape
    assert _err(y, y64) <= _bound(y32, y64)
    assert _err(dx, dx64) <= _bound(dx32, dx64)


@pytest.mark.parametrize("shape,kind", SHAPES)
def test_swiglu_fp32(triton_device, shape, kind):
    a64 = _randn(*shape, seed=4, scale=3.0, device=triton_device)
    b64, dy64 = _randn(*shape, seed=5, device=triton_device), _randn(*shape, seed=6, device=triton_device)
    y64, da64, db64 = _ref_swiglu(a64, b64, dy64)
    y32, da32, db32 = _ref_swiglu(a64.float(), b64.float(), dy64.float())
    a, b, dy = (_layout(t.float(), kind) for t in (a64, b64, dy64))
    y = kern.swiglu_fwd(a, b)
    da, db = kern.swiglu_bwd(dy, a, b)
    for got, r64, r32 in ((y, y64, y32), (da, da64, da32), (db, db64, db32)):
        assert got.dtype == torch.float32 and got.shape == a.shape
        assert _err(got, r64) <= _bound(r32, r64)


def test_swiglu_halves_of_one_product(triton_device):
    """a and b as the two halves of one [N, 2F] tensor (the fused W_1|W_3 product)."""
    uz = _randn(9, 2 * 21, seed=7, scale=2.0, device=triton_device).float()
    a, b = uz.chunk(2, dim=-1)
    dy = _randn(9, 21, seed=8, device=triton_device).float()
    y64, da64, db64 = _ref_swiglu(a.double(), b.double(), dy.double())
    y32, da32, db32 = _ref_swiglu(a, b, dy)
    da, db = kern.swiglu_bwd(dy, a, b)
    assert _err(kern.swiglu_fwd(a, b), y64) <= _bound(y32, y64)
    assert _err(da, da64) <= _bound(da32, da64) and _err(db, db64) <= _bound(db32, db64)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(triton_device, dtype):
    """Error of the kernels (fp32 math, one rounding) bounded by the reference's own error in dtype."""
    shape = (5, 3, 45)
    x64 = _randn(*shape, seed=9, scale=2.0, device=triton_device).to(dtype).double()  # representable in dtype
    w64 = _randn(45, seed=10, device=triton_device).to(dtype).double()
    dy64 = _randn(*shape, seed=11, device=triton_device).to(dtype).double()
    y64, dx64 = _ref_rms(x64, w64, dy64)
    ylo, dxlo = _ref_rms(x64.to(dtype), w64.to(dtype), dy64.to(dtype))
    x, w, dy = x64.to(dtype), w64.to(dtype), dy64.to(dtype)
    y = kern.rms_norm_fwd(x, w, EPS)
    dx = kern.rms_norm_bwd(dy, x, w, EPS)
    assert y.dtype == dx.dtype == dtype
    assert _err(y, y64) <= _bound(ylo, y64, 2)
    assert _err(dx, dx64) <= _bound(dxlo, dx64, 2)

    b64 = _randn(*shape, seed=12, device=triton_device).to(dtype).double()
    r64 = _ref_swiglu(x64, b64, dy64)
    rlo = _ref_swiglu(x64.to(dtype), b64.to(dtype), dy64.to(dtype))
    got = (kern.swiglu_fwd(x, b64.to(dtype)),) + kern.swiglu_bwd(dy, x, b64.to(dtype))
    for g, r, lo in zip(got, r64, rlo):
        assert g.dtype == dtype
        assert _err(g, r) <= _bound(lo, r, 2)


def test_rms_norm_bwd_broadcast_dy(triton_device):
    """dy as one row broadcast to every row (stride 0), as an energy head's gradient is."""
    x64 = _randn(6, 29, seed=22, scale=2.0, device=triton_device)
    head = _randn(29, seed=23, device=triton_device)
    dy64 = head.expand(6, 29)
    _, dx64 = _ref_rms(x64, None, dy64)
    _, dx32 = _ref_rms(x64.float(), None, dy64.float())
    dy = head.float().expand(6, 29)
    assert dy.stride(0) == 0
    assert _err(kern.rms_norm_bwd(dy, x64.float(), None, EPS), dx64) <= _bound(dx32, dx64)


def test_nan_stays_in_its_row(triton_device):
    x = _randn(4, 19, seed=13, device=triton_device).float()
    x[1, 3] = float("nan")
    dy = _randn(4, 19, seed=14, device=triton_device).float()
    y = kern.rms_norm_fwd(x, None, EPS)
    dx = kern.rms_norm_bwd(dy, x, None, EPS)
    assert torch.isnan(y[1]).all() and torch.isnan(dx[1]).all()
    keep = [0, 2, 3]
    assert torch.isfinite(y[keep]).all() and torch.isfinite(dx[keep]).all()
    a = x.clone()
    da, db = kern.swiglu_bwd(dy, a, dy)
    assert torch.isnan(da[1, 3]) and torch.isfinite(da[keep]).all() and torch.isfinite(db[keep]).all()


def test_empty(triton_device):
    x = torch.randn(0, 7, device=triton_device)
    assert kern.rms_norm_fwd(x, None, EPS).shape == (0, 7)
    assert kern.swiglu_bwd(x, x, x)[0].shape == (0, 7)


def test_bad_input(triton_device):
    x = torch.randn(3, 8, device=triton_device)
    with pytest.raises(ValueError, match=r"weight must be \[D=8\]; got shape \(7,\)"):
        kern.rms_norm_fwd(x, torch.ones(7, device=triton_device), EPS)
    with pytest.raises(ValueError, match="x: dtype must be one of"):
        kern.rms_norm_fwd(x.double(), None, EPS)
    with pytest.raises(ValueError, match=r"dy must match x \(torch.float32 of shape \(3, 8\)"):
        kern.rms_norm_bwd(torch.randn(3, 9, device=triton_device), x, None, EPS)
    with pytest.raises(ValueError, match="eps must be a number >= 0"):
        kern.rms_norm_fwd(x, None, -1.0)
    with pytest.raises(ValueError, match=r"b must match a"):
        kern.swiglu_fwd(x, x.bfloat16())
    with pytest.raises(ValueError, match=r"dy must match a"):
        kern.swiglu_bwd(x[:2], x, x)


# -- the torch.library ops -------------------------------------------------------------------------

def test_ops_match_kernels_and_autograd(triton_device):
    x = _randn(2, 3, 20, seed=15, device=triton_device).float()
    w = _randn(20, seed=16, device=triton_device).float()
    dy = _randn(2, 3, 20, seed=17, device=triton_device).float()
    assert torch.equal(ops.rms_norm(x, w, EPS), kern.rms_norm_fwd(x, w, EPS))
    assert torch.equal(ops.rms_norm_bwd(dy, x, w, EPS), kern.rms_norm_bwd(dy, x, w, EPS))
    xr = x.clone().requires_grad_(True)
    (dx,) = torch.autograd.grad(ops.rms_norm(xr, w, EPS), xr, dy)
    assert torch.equal(dx, kern.rms_norm_bwd(dy, x, w, EPS))
    with pytest.raises(NotImplementedError, match="input gradients only"):
        ops.rms_norm(x, w.clone().requires_grad_(True), EPS).sum().backward()

    a, b = x.clone().requires_grad_(True), dy.clone().requires_grad_(True)
    y = ops.swiglu(a, b)
    assert torch.equal(y, kern.swiglu_fwd(x, dy))
    da, db = torch.autograd.grad(y, (a, b), x)
    want = ops.swiglu_bwd(x, x, dy)
    assert torch.equal(da, want[0]) and torch.equal(db, want[1])


def test_opcheck(triton_device):
    x = _randn(3, 11, seed=18, device=triton_device).float()
    w = _randn(11, seed=19, device=triton_device).float()
    dy = _randn(3, 11, seed=20, device=triton_device).float()
    xs = _layout(_randn(2, 3, 11, seed=21, device=triton_device).float(), "slice")
    for args in ((x.requires_grad_(True), w, EPS), (xs, None, 1e-6)):
        torch.library.opcheck(torch.ops.pyebm.ebt_rms_norm_fwd, args)
    torch.library.opcheck(torch.ops.pyebm.ebt_rms_norm_bwd, (dy, x.detach(), w, EPS))
    torch.library.opcheck(torch.ops.pyebm.ebt_rms_norm_bwd, (dy, x.detach(), None, EPS))
    a, b = x.detach().clone().requires_grad_(True), dy.clone().requires_grad_(True)
    torch.library.opcheck(torch.ops.pyebm.ebt_swiglu_fwd, (a, b))
    torch.library.opcheck(torch.ops.pyebm.ebt_swiglu_fwd, (xs, xs * 2))
    torch.library.opcheck(torch.ops.pyebm.ebt_swiglu_bwd, (dy, x.detach(), w.expand(3, 11)))


def test_ops_fake_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 5, 24, dtype=torch.bfloat16)
        y = torch.ops.pyebm.ebt_rms_norm_fwd(x, None, EPS)
        assert y.shape == x.shape and y.dtype == torch.bfloat16
        da, db = torch.ops.pyebm.ebt_swiglu_bwd(x, x, x)
        assert da.shape == db.shape == x.shape


def test_compile_fullgraph(triton_device):
    """The ops trace without graph breaks, forward and backward (aot_eager: no C++ compiler needed)."""
    def f(x):
        u, z = ops.rms_norm(x, None, EPS).chunk(2, dim=-1)
        return ops.swiglu(u, z)

    x = _randn(3, 2, 16, seed=24, device=triton_device).float()
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(xa)
    want = f(xb)
    assert torch.equal(got, want)
    dy = _randn(3, 2, 8, seed=25, device=triton_device).float()
    assert torch.equal(torch.autograd.grad(got, xa, dy)[0], torch.autograd.grad(want, xb, dy)[0])
