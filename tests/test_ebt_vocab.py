"""Triton vocabulary-end kernels (softmax then W^T, gradient through W), once per ``triton_device``
(conftest.py: interpreter mode on CPU tensors, or compiled on CUDA tensors)."""
import pytest
import torch

triton = pytest.importorskip("triton")
kern = pytest.importorskip("pyebm._kernels.ebt_vocab")
ops = pytest.importorskip("pyebm.ops.ebt_vocab")


def _randn(*shape, seed=0, scale=1.0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device)


def _ref_embed(y, w, softmax=True):
    """The model's step: softmax with subnormal probabilities set to 0, then p @ w^T (in y's dtype)."""
    if softmax:
        p = torch.softmax(y, dim=-1)
        p = p.masked_fill(p < torch.finfo(p.dtype).tiny, 0.0)
    else:
        p = y
    return p, p @ w.t()


def _err(x, x64):
    return float((x.double() - x64).abs().max())


def _bound(lo, r64, factor=4):
    return factor * _err(lo, r64) + 1e-7


@pytest.mark.parametrize("lead,V,D,tied", [
    ((1,), 1, 1, False),
    ((3,), 37, 24, False),
    ((2, 5), 300, 40, True),      # w = embeddings^T (transposed strides), B x G rows
    ((70,), 130, 17, False),      # rows over one tile, odd sizes
    ((2, 1, 3), 200, 160, True),  # D over one column block
])
def test_embed_and_grad_fp32(triton_device, lead, V, D, tied):
    y64 = _randn(*lead, V, seed=1, scale=3.0, device=triton_device)
    w64 = _randn(V, D, seed=2, device=triton_device).t() if tied else _randn(D, V, seed=2, device=triton_device)
    ge64 = _randn(*lead, D, seed=3, device=triton_device)
    w = w64.float()
    assert w.is_contiguous() != tied
    p, e = kern.vocab_embed(y64.float(), w)
    p64, e64 = _ref_embed(y64, w64)
    p32, e32 = _ref_embed(y64.float(), w)
    assert p.shape == y64.shape and e.shape == (*lead, D) and e.dtype == torch.float32
    assert _err(p, p64) <= _bound(p32, p64)
    assert _err(e, e64) <= _bound(e32, e64)
    g = kern.vocab_grad(ge64.float(), w)
    g64, g32 = ge64 @ w64, ge64.float() @ w
    assert g.shape == (*lead, V) and _err(g, g64) <= _bound(g32, g64)
    # without the softmax: e = y @ w^T
    none, e = kern.vocab_embed(y64.float(), w, softmax=False)
    assert none is None
    assert _err(e, y64 @ w64.t()) <= _bound(y64.float() @ w.t(), y64 @ w64.t())


def test_subnormal_probabilities_are_zero(triton_device):
    y = torch.tensor([[0.0, -80.0, -95.0, -100.0, 1.0, -1e30]], device=triton_device)
    w = _randn(3, 6, seed=4, device=triton_device).float()
    p, e = kern.vocab_embed(y, w)
    assert (p[0, 2:4] == 0).all() and p[0, 5] == 0 and p[0, 1] > 0
    torch.testing.assert_close(e, p @ w.t(), rtol=1e-6, atol=1e-7)


def test_rows_independent_and_noncontiguous_y(triton_device):
    y = _randn(4, 2 * 50, seed=5, device=triton_device).float()[:, ::2]
    y[1, 7] = float("nan")
    w = _randn(8, 50, seed=6, device=triton_device).float()
    p, e = kern.vocab_embed(y, w)
    keep = [0, 2, 3]
    assert torch.isnan(e[1]).all() and torch.isfinite(e[keep]).all()
    torch.testing.assert_close(p[keep], _ref_embed(y[keep], w)[0], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(triton_device, dtype):
    """Bounded by the reference's own error when it runs the step in dtype."""
    y64 = _randn(2, 4, 90, seed=7, scale=2.0, device=triton_device).to(dtype).double()
    w64 = _randn(20, 90, seed=8, scale=0.5, device=triton_device).to(dtype).double()
    ge64 = _randn(2, 4, 20, seed=9, device=triton_device).to(dtype).double()
    p, e = kern.vocab_embed(y64.to(dtype), w64.to(dtype))
    p64, e64 = _ref_embed(y64, w64)
    plo, elo = _ref_embed(y64.to(dtype), w64.to(dtype))
    assert p.dtype == e.dtype == dtype
    assert _err(p, p64) <= _bound(plo, p64, 2)
    assert _err(e, e64) <= _bound(elo, e64, 2)
    g = kern.vocab_grad(ge64.to(dtype), w64.to(dtype))
    assert g.dtype == dtype and _err(g, ge64 @ w64) <= _bound(ge64.to(dtype) @ w64.to(dtype), ge64 @ w64, 2)


def test_bad_input(triton_device):
    w = torch.randn(8, 30, device=triton_device)
    with pytest.raises(ValueError, match=r"y must be \[\.\.\., V=30\] for w \[D=8, V=30\]; got shape \(2, 29\)"):
        kern.vocab_embed(torch.randn(2, 29, device=triton_device), w)
    with pytest.raises(ValueError, match=r"ge must be \[\.\.\., D=8\]"):
        kern.vocab_grad(torch.randn(2, 30, device=triton_device), w)
    with pytest.raises(ValueError, match="w is torch.float64"):
        kern.vocab_embed(torch.randn(2, 30, device=triton_device), w.double())
    with pytest.raises(ValueError, match=r"w must be \[D, V\]"):
        kern.vocab_grad(torch.randn(2, 8, device=triton_device), w[None])


def test_ops_opcheck_and_fake(triton_device):
    from torch._subclasses.fake_tensor import FakeTensorMode

    y = _randn(2, 3, 40, seed=10, device=triton_device).float()
    w = _randn(40, 12, seed=11, device=triton_device).float().t()
    ge = _randn(2, 3, 12, seed=12, device=triton_device).float()
    p, e = ops.vocab_embed(y, w)
    assert torch.equal(e, kern.vocab_embed(y, w)[1]) and torch.equal(p, kern.vocab_embed(y, w)[0])
    assert torch.equal(ops.vocab_grad(ge, w), kern.vocab_grad(ge, w))
    for softmax in (True, False):
        torch.library.opcheck(torch.ops.pyebm.ebt_vocab_embed, (y, w, softmax))
    torch.library.opcheck(torch.ops.pyebm.ebt_vocab_grad, (ge, w))
    with FakeTensorMode():
        fy = torch.empty(5, 40, dtype=torch.bfloat16)
        fw = torch.empty(12, 40, dtype=torch.bfloat16)
        p, e = torch.ops.pyebm.ebt_vocab_embed(fy, fw, False)
        assert p.shape == (0,) and e.shape == (5, 12)
        assert torch.ops.pyebm.ebt_vocab_grad(e, fw).shape == (5, 40)


def test_compile_fullgraph(triton_device):
    def step(y, w):
        p, e = ops.vocab_embed(y, w)
        return p - 0.1 * ops.vocab_grad(e, w)

    y, w = _randn(4, 33, seed=13, device=triton_device).float(), _randn(9, 33, seed=14, device=triton_device).float()
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(y, w)
    assert torch.equal(got, step(y, w))
