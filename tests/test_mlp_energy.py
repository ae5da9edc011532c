"""The fused MLP energy ops (cpu backend and the op layer) against pyebm.reference.mlp_energy."""
import itertools

import pytest
import torch

import pyebm
from pyebm import _backend
from pyebm.reference import mlp_energy as ref

ACTS = sorted(ref.ACTIVATIONS)
needs_ext = pytest.mark.skipif(not pyebm.backends()["cpu"], reason="extension pyebm._C not built")


def make(context_dim, D, hidden, act="silu", residual=False, bias=True, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    m = pyebm.MLPEnergy(context_dim, D, hidden=hidden, activation=act, residual=residual, bias=bias, dtype=dtype)
    # Larger-than-default weights so that every activation is exercised beyond its linear region.
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(2.0)
    return m


def err_bound(m, x, y, backend, dtype):
    """max |fast - ref64| and the reference's own error |ref(dtype) - ref64| for E and G."""
    m64 = make(m.context_dim, m.candidate_dim, m.hidden, m.activation, m.residual, m.bias, torch.float64)
    m64.load_state_dict({k: v.double() for k, v in m.state_dict().items()})
    md = m.to(dtype)
    E64, G64 = m64.energy_and_grad(m64.prepare(x.double()), y.double(), backend="torch")
    Er, Gr = md.energy_and_grad(md.prepare(x.to(dtype)), y.to(dtype), backend="torch")
    Ef, Gf = md.energy_and_grad(md.prepare(x.to(dtype)), y.to(dtype), backend=backend)
    assert Ef.dtype == dtype and Gf.dtype == dtype
    assert Ef.shape == E64.shape and Gf.shape == G64.shape
    scaleE = E64.abs().max().clamp_min(1.0)
    scaleG = G64.abs().max().clamp_min(1.0)
    return ((Ef.double() - E64).abs().max() / scaleE, (Er.double() - E64).abs().max() / scaleE,
            (Gf.double() - G64).abs().max() / scaleG, (Gr.double() - G64).abs().max() / scaleG)


def check_close(m, x, y, backend, dtype):
    eE, rE, eG, rG = err_bound(m, x, y, backend, dtype)
    eps = torch.finfo(dtype).eps
    # The kernel may differ from the reference by a small multiple of the reference's own error at
    # this precision (plus a few ulps of slack for tiny errors).
    assert eE <= 4 * rE + 16 * eps, (eE, rE)
    assert eG <= 4 * rG + 16 * eps, (eG, rG)


@needs_ext
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_matches_reference_activations(act, residual, dtype):
    m = make(7, 5, (33, 33, 17), act, residual)
    x = torch.randn(3, 7, dtype=torch.float64)
    y = torch.randn(3, 17, 5, dtype=torch.float64)
    check_close(m, x, y, "cpu", dtype)


SHAPES = list(itertools.product([1, 3, 17], [1, 5, 33]))


@needs_ext
@pytest.mark.parametrize("B,K", SHAPES)
@pytest.mark.parametrize("width", [1, 7, 64, 123])
def test_cpu_matches_reference_shapes(B, K, width):
    D = {1: 1, 7: 7, 64: 3, 123: 16}[width]
    m = make(4, D, (width, width), "silu", residual=(width % 2 == 1))
    x = torch.randn(B, 4, dtype=torch.float64)
    y = torch.randn(B, K, D, dtype=torch.float64)
    check_close(m, x, y, "cpu", torch.float32)
    check_close(m, x, y, "cpu", torch.float64)


@needs_ext
def test_cpu_many_rows_parallel_blocks():
    # Enough rows for several row blocks per thread: block boundaries must not mix rows.
    m = make(32, 64, (256, 256, 256), "silu", residual=True)
    x = torch.randn(16, 32, dtype=torch.float64)
    y = torch.randn(16, 64, 64, dtype=torch.float64)
    check_close(m, x, y, "cpu", torch.float32)


@needs_ext
@pytest.mark.parametrize("bias", [False, True])
def test_cpu_no_context_and_bias(bias):
    m = make(0, 6, (20, 11), "tanh", bias=bias)
    y = torch.randn(4, 9, 6, dtype=torch.float64)
    x = torch.empty(4, 0, dtype=torch.float64)
    check_close(m, x, y, "cpu", torch.float64)
    assert m.prepare(4).shape == (4, 20)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_half_precision_inputs(dtype):
    # Half inputs are computed in float32 and rounded once: within the reference's own error.
    m = make(5, 4, (32, 32), "gelu_tanh")
    x = torch.randn(3, 5, dtype=torch.float64)
    y = torch.randn(3, 6, 4, dtype=torch.float64)
    eE, rE, eG, rG = err_bound(m, x, y, "cpu", dtype)
    assert eE <= 2 * rE + 1e-2 and eG <= 2 * rG + 1e-2


@needs_ext
def test_energy_only_op_matches():
    m = make(3, 4, (16, 16), "softplus", residual=True, dtype=torch.float32)
    ctx = m.prepare(torch.randn(5, 3))
    y = torch.randn(5, 7, 4)
    E = m.energy(ctx, y, backend="cpu")
    E2, _ = m.energy_and_grad(ctx, y, backend="cpu")
    Er = m.energy(ctx, y, backend="torch")
    torch.testing.assert_close(E, E2, rtol=0, atol=0)
    torch.testing.assert_close(E, Er, rtol=1e-5, atol=1e-5)


@needs_ext
def test_non_contiguous_inputs():
    m = make(6, 5, (24, 24), "gelu", dtype=torch.float64)
    base = torch.randn(4, 10, 12, dtype=torch.float64)
    y = base[:, ::2, 1:11:2]  # [4, 5, 5], strided in both inner dims
    assert not y.is_contiguous()
    xb = torch.randn(6, 4, dtype=torch.float64)
    x = xb.t()  # [4, 6] transposed view
    ctx = m.prepare(x)
    E, G = m.energy_and_grad(ctx, y, backend="cpu")
    Er, Gr = m.energy_and_grad(ctx, y.contiguous(), backend="torch")
    torch.testing.assert_close(E, Er)
    torch.testing.assert_close(G, Gr)


@needs_ext
@pytest.mark.parametrize("shape", [(0, 4, 3), (3, 0, 3)])
def test_empty_batches(shape):
    m = make(2, 3, (8,), dtype=torch.float32)
    y = torch.randn(*shape)
    ctx = m.prepare(torch.randn(shape[0], 2))
    E, G = m.energy_and_grad(ctx, y, backend="cpu")
    assert E.shape == shape[:2] and G.shape == shape
    assert m.energy(ctx, y, backend="cpu").shape == shape[:2]


@needs_ext
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_candidate_is_isolated(bad):
    m = make(3, 4, (32, 32), "silu", residual=True, dtype=torch.float32)
    ctx = m.prepare(torch.randn(2, 3))
    y = torch.randn(2, 40, 4)
    y[1, 7, 2] = bad
    E, G = m.energy_and_grad(ctx, y, backend="cpu")
    finite = torch.ones(2, 40, dtype=torch.bool)
    finite[1, 7] = False
    assert torch.isfinite(E[finite]).all() and torch.isfinite(G[finite]).all()
    assert not (torch.isfinite(E[1, 7]) and torch.isfinite(G[1, 7]).all())
    y2 = y.clone()
    y2[1, 7] = 0.0
    E2, G2 = m.energy_and_grad(ctx, y2, backend="cpu")
    torch.testing.assert_close(E[finite], E2[finite], rtol=0, atol=0)
    torch.testing.assert_close(G[finite], G2[finite], rtol=0, atol=0)


# -- op-level conventions --------------------------------------------------------------------------

def op_args(dtype=torch.float32, B=2, K=3, D=4):
    m = make(3, D, (8, 8), "silu", residual=True, dtype=dtype)
    ctx = m.prepare(torch.randn(B, 3, dtype=dtype))
    w_in, weights, biases, w_out, b_out = (t.detach() if isinstance(t, torch.Tensor) else [u.detach() for u in t]
                                           for t in m.op_params())
    y = torch.randn(B, K, D, dtype=dtype)
    return (ctx, y, w_in, list(weights), list(biases), w_out, b_out, "silu", True)


@needs_ext
@pytest.mark.parametrize("op", ["mlp_energy_grad", "mlp_energy"])
def test_opcheck(op):
    args = op_args()
    torch.library.opcheck(getattr(torch.ops.pyebm, op).default, args)


@needs_ext
def test_torch_compile_fullgraph():
    m = make(3, 4, (16, 16), "silu", dtype=torch.float32)
    ctx = m.prepare(torch.randn(2, 3))
    y = torch.randn(2, 5, 4)
    w_in, weights, biases, w_out, b_out = [t.detach() if isinstance(t, torch.Tensor) else [u.detach() for u in t]
                                           for t in m.op_params()]

    def step(ctx, y):
        E, G = torch.ops.pyebm.mlp_energy_grad(ctx, y, w_in, weights, biases, w_out, b_out, "silu", False)
        return y - 0.1 * G, E

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    y1, E1 = compiled(ctx, y)
    y2, E2 = step(ctx, y)
    torch.testing.assert_close(y1, y2)
    torch.testing.assert_close(E1, E2)


def test_dispatch_floor_op():
    out = pyebm.ops.dispatch_floor(torch.randn(3))
    assert out.numel() == 0


# -- bad input ---------------------------------------------------------------------------------------

BACKENDS_HERE = ["torch"] + (["cpu"] if pyebm.backends()["cpu"] else [])


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_bad_candidate_width(backend):
    args = list(op_args())
    args[1] = torch.randn(2, 3, 5)
    with pytest.raises((RuntimeError, ValueError), match="candidate width mismatch"):
        pyebm.ops.mlp_energy_grad(*args, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_bad_batch(backend):
    args = list(op_args())
    args[0] = torch.randn(3, 8)
    with pytest.raises((RuntimeError, ValueError), match="batch mismatch"):
        pyebm.ops.mlp_energy_grad(*args, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_bad_dtype(backend):
    args = list(op_args())
    args[2] = args[2].double()
    with pytest.raises((RuntimeError, TypeError), match="w_in has dtype"):
        pyebm.ops.mlp_energy_grad(*args, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_bad_rank_and_activation(backend):
    args = list(op_args())
    args[1] = torch.randn(2, 4)
    with pytest.raises((RuntimeError, ValueError), match=r"y must be \[B, K, D\]"):
        pyebm.ops.mlp_energy_grad(*args, backend=backend)
    args = list(op_args())
    args[7] = "swish"
    with pytest.raises((RuntimeError, ValueError), match="activation must be one of"):
        pyebm.ops.mlp_energy_grad(*args, backend=backend)


def test_model_level_errors():
    m = pyebm.MLPEnergy(3, 4, hidden=(8,))
    with pytest.raises(ValueError, match=r"prepare: x must be \[B, context_dim=3\]"):
        m.prepare(torch.randn(2, 5))
    ctx = m.prepare(torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"y must be \[B, K, candidate_dim=4\]"):
        m.energy_and_grad(ctx, torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="ctx must be"):
        m.energy_and_grad(ctx[:1], torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="activation must be one of"):
        pyebm.MLPEnergy(3, 4, activation="swish")
    with pytest.raises(ValueError, match="hidden"):
        pyebm.MLPEnergy(3, 4, hidden=())


def test_unusable_backend_is_a_clear_error(monkeypatch):
    m = pyebm.MLPEnergy(3, 4, hidden=(8,))
    ctx = m.prepare(torch.randn(2, 3))
    y = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="backend 'cuda'"):
        m.energy_and_grad(ctx, y, backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        m.energy_and_grad(ctx, y, backend="nope")
    monkeypatch.setenv("PYEBM_BACKEND", "bogus")
    with pytest.raises(ValueError, match="PYEBM_BACKEND must be one of"):
        m.energy_and_grad(ctx, y)


def test_backends_report():
    rep = pyebm.backends()
    assert set(rep) == {"torch", "cpu", "triton", "cuda"}
    assert rep["torch"] is True and rep.why["torch"] is None
    for name, ok in rep.items():
        assert ok or rep.why[name]
    assert _backend.resolve(torch.device("cpu")) in ("cpu", "torch")


# -- training path -----------------------------------------------------------------------------------

def test_forward_is_differentiable_to_weights():
    m = make(3, 4, (16, 16), "silu", residual=True, dtype=torch.float64)
    x = torch.randn(5, 3, dtype=torch.float64)
    y = torch.randn(5, 6, 4, dtype=torch.float64)
    E = m(x, y)
    assert E.shape == (5, 6)
    E.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    # The training forward and the inference op agree.
    Ei = m.energy(m.prepare(x), y, backend="torch")
    torch.testing.assert_close(E.detach(), Ei)
    assert m(x, y[:, 0]).shape == (5,)
    torch.autograd.gradcheck(lambda yy: m(x[:2], yy), (y[:2, :2].clone().requires_grad_(),))


def test_param_cache_follows_dtype_moves_and_replacement():
    m = make(3, 4, (8, 8), "silu", dtype=torch.float32)
    ctx = m.prepare(torch.randn(2, 3))
    y = torch.randn(2, 3, 4)
    m.energy_and_grad(ctx, y)  # fills the cache
    m.double()
    ctx64 = m.prepare(torch.randn(2, 3, dtype=torch.float64))
    E, _ = m.energy_and_grad(ctx64, y.double())
    assert E.dtype == torch.float64
    torch.testing.assert_close(E, m.energy(ctx64, y.double(), backend="torch"))
    m.layers[0].weight = torch.nn.Parameter(torch.randn(8, 8, dtype=torch.float64))
    E2, _ = m.energy_and_grad(ctx64, y.double())
    torch.testing.assert_close(E2, m.energy(ctx64, y.double(), backend="torch"))
    assert not torch.allclose(E, E2)


def test_pure_python_install_still_works():
    """With the extension unavailable pyebm imports, reports why, and every op runs the reference."""
    import subprocess
    import sys

    code = (
        "import torch, pyebm\n"
        "r = pyebm.backends()\n"
        "assert not r['cpu'] and 'disabled' in r.why['cpu'], r\n"
        "m = pyebm.MLPEnergy(3, 2, hidden=(8,))\n"
        "ctx = m.prepare(torch.randn(2, 3)); y = torch.randn(2, 4, 2)\n"
        "E, G = m.energy_and_grad(ctx, y)\n"
        "E2, G2 = torch.ops.pyebm.mlp_energy_grad(ctx, y, *m.op_params()[:3], *m.op_params()[3:], 'silu', False)\n"
        "assert torch.allclose(E, E2) and torch.allclose(G, G2)\n"
        "try:\n"
        "    m.energy_and_grad(ctx, y, backend='cpu')\n"
        "except ValueError as e:\n"
        "    assert 'not usable' in str(e)\n"
        "else:\n"
        "    raise AssertionError('cpu backend should be refused')\n"
        "print('ok')\n"
    )
    env = dict(__import__("os").environ, PYEBM_DISABLE_EXT="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr
