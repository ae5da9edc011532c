"""torch.ops.pyebm.rows_linear against pyebm.reference.rows_linear: y = x @ w^T (+ add) for a few rows.

Shapes cover the kernel's edges: row counts around its 4-row tiles (1, 3, 4, 5, 17), weight rows around its
3- and 4-row tiles, K around the vector widths (1, 7, 8, 9, 15, 16, 17, 123) and long rows (8192, the
vocabulary of EBT's v2e). Strided inputs (column slices of larger buffers) are read in place. Bounds: a small
multiple of the fp32 reference's own error against fp64.
"""
import pytest
import torch

from pyebm.reference.rows_linear import rows_linear as reference

pytest.importorskip("pyebm._C")
OPS = torch.ops.pyebm
pytestmark = pytest.mark.skipif(not hasattr(OPS, "rows_linear"), reason="built without rows_linear")


def _check(x, w, add=None):
    y = OPS.rows_linear(x, w, add)
    exact = reference(x.double(), w.double(), None if add is None else add.double())
    ref32 = reference(x, w, add)
    assert y.shape == exact.shape and y.dtype == x.dtype
    scale = (x.double().abs() @ w.double().abs().t()).max().item() + 1e-30
    err_ref = (ref32.double() - exact).abs().max().item()
    err = (y.double() - exact).abs().max().item()
    # the reference's own fp32 error, or a few units in the last place of the largest dot product
    assert err <= 4 * err_ref + 8 * torch.finfo(torch.float32).eps * scale, (err, err_ref, scale)
    return y


@pytest.mark.parametrize("M", [1, 3, 4, 5, 17])
@pytest.mark.parametrize("N,K", [(1, 1), (2, 7), (3, 8), (5, 9), (7, 15), (11, 16), (13, 17), (37, 123), (6, 384)])
def test_shapes(M, N, K):
    g = torch.Generator().manual_seed(M * 1000 + N * 10 + K)
    x = torch.randn(M, K, generator=g)
    w = torch.randn(N, K, generator=g)
    add = torch.randn(M, N, generator=g)
    _check(x, w)
    _check(x, w, add)


def test_long_rows_and_threads():
    """A weight wide enough to be split between threads: the same numbers whatever the thread count (every
    output element is one dot product in a fixed order, whichever thread computes it)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 8192, generator=g)
    w = torch.randn(385, 8192, generator=g)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _check(x, w)
        torch.set_num_threads(2)
        two = _check(x, w)
    finally:
        torch.set_num_threads(before)
    # bitwise: the split changes which thread computes a column, not how
    assert torch.equal(one, two)
    x2 = torch.randn(3, 384, generator=g)
    w2 = torch.randn(8193, 384, generator=g)
    _check(x2, w2, torch.randn(3, 8193, generator=g))


def test_rows_independent():
    """Row r of y depends on row r of x only: a NaN row stays in its row; and y does not depend on M (the tile a
    row lies in), so one row alone gives the same numbers as in a block."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 100, generator=g)
    w = torch.randn(9, 100, generator=g)
    y = OPS.rows_linear(x, w)
    for r in range(6):
        assert torch.equal(OPS.rows_linear(x[r:r + 1], w), y[r:r + 1])
    x[2, 5] = float("nan")
    y2 = OPS.rows_linear(x, w)
    assert torch.isnan(y2[2]).all()
    assert torch.equal(torch.cat((y2[:2], y2[3:])), torch.cat((y[:2], y[3:])))


def test_strided_and_float64():
    g = torch.Generator().manual_seed(3)
    big = torch.randn(7, 50, generator=g)
    x = big[1:6, 3:40]                        # rows 50 apart
    w = torch.randn(20, 60, generator=g)[:, 5:42]
    add = torch.randn(5, 40, generator=g)[:, ::2]  # non-unit column stride: copied
    _check(x, w, add)
    _check(x.t().contiguous().t(), w.t().contiguous().t())  # column-major: copied
    xd, wd = x.double(), w.double()
    torch.testing.assert_close(OPS.rows_linear(xd, wd), reference(xd, wd), rtol=1e-12, atol=1e-12)
    e = OPS.rows_linear(torch.randn(0, 5), torch.randn(4, 5))
    assert e.shape == (0, 4)
    z = OPS.rows_linear(torch.randn(2, 0), torch.randn(3, 0), torch.ones(2, 3))
    assert torch.equal(z, torch.ones(2, 3))


def test_bad_input():
    x, w = torch.randn(2, 5), torch.randn(3, 5)
    with pytest.raises(ValueError, match="w must be \\[N, K\\] with K = 5"):
        OPS.rows_linear(x, torch.randn(3, 4))
    with pytest.raises(ValueError, match="x must be \\[M, K\\]"):
        OPS.rows_linear(torch.randn(2, 5, 1), w)
    with pytest.raises(TypeError, match="x must be float32 or float64"):
        OPS.rows_linear(x.half(), w.half())
    with pytest.raises(TypeError, match="w has dtype torch.float64 but x has dtype torch.float32"):
        OPS.rows_linear(x, w.double())
    with pytest.raises(ValueError, match="add must have shape \\[2, 3\\]"):
        OPS.rows_linear(x, w, torch.randn(3, 2))
    with pytest.raises(RuntimeError, match="rows_linear is an inference op .*'w' requires grad"):
        OPS.rows_linear(x, w.requires_grad_(True))
    with torch.no_grad():
        OPS.rows_linear(x, w)


def test_opcheck():
    g = torch.Generator().manual_seed(4)
    x, w, add = torch.randn(3, 17, generator=g), torch.randn(5, 17, generator=g), torch.randn(3, 5, generator=g)
    torch.library.opcheck(OPS.rows_linear.default, (x, w, add))
    torch.library.opcheck(OPS.rows_linear.default, (x, w, None))
