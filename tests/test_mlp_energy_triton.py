"""Triton backend of the fused MLP energy ops against the reference.

Each test runs once per ``triton_device`` (conftest.py): on CPU tensors in Triton's interpreter when
there is no GPU (TRITON_INTERPRET=1, set by conftest.py before pyebm is imported), on CUDA tensors with
compiled kernels when there is one. Shapes stay small: the interpreter executes every block operation
in Python.

Tolerance: the kernel's error against the fp64 reference is bounded by a small multiple of the
reference's own error at the kernel's dtype (the same inputs, rounded to that dtype, run through the
reference in that dtype), plus a floor of a few ulps of the result's scale for cases where the
low-precision reference happens to be nearly exact.
"""
import math

import pytest
import torch

from pyebm import _backend
from pyebm.reference import mlp_energy as ref

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(not _backend.backends()["triton"], reason=f"triton backend unusable: "
                       f"{_backend.backends().why['triton']}"),
]

ACTS = ("relu", "silu", "gelu", "gelu_tanh", "tanh", "softplus")
EPS = {torch.float32: 2.0 ** -23, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -10}
# Floor of the tolerance in ulps of the result's largest magnitude. fp32 needs a few: its reference
# error can be near zero by luck on one tensor. In bf16/fp16 the reference error is large and the floor
# only covers rounding of the stored result.
FLOOR_ULPS = {torch.float32: 16.0, torch.bfloat16: 1.0, torch.float16: 1.0}


def _ops():
    from pyebm.ops import mlp_energy_triton  # noqa: F401  (defines the ops)

    return torch.ops.pyebm


def make(B, K, D, hidden, dtype=torch.float32, seed=0, *, device):
    """Random (ctx, y, w_in, weights, biases, w_out, b_out) drawn in fp64, rounded to ``dtype``, on ``device``."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)

    w_in = r(hidden[0], D, scale=1.0 / math.sqrt(D))
    weights = [r(o, i, scale=1.0 / math.sqrt(i)) for i, o in zip(hidden[:-1], hidden[1:])]
    biases = [r(o, scale=0.5) for o in hidden[1:]]
    return (r(B, hidden[0], scale=0.5), r(B, K, D), w_in, weights, biases,
            r(hidden[-1], scale=1.0 / math.sqrt(hidden[-1])), r(1, scale=0.5))


def as64(args):
    return tuple([t.double() for t in a] if isinstance(a, list) else a.double() for a in args)


def check_close(name, out, ref64, ref_lo, dtype, mult):
    """|out - ref64| <= mult * |ref_lo - ref64| + FLOOR_ULPS * eps * max|ref64| (max over the tensor)."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    err = (out.double() - ref64).abs().max().item()
    ref_err = (ref_lo.double() - ref64).abs().max().item()
    bound = mult * ref_err + FLOOR_ULPS[dtype] * EPS[dtype] * ref64.abs().max().item()
    assert err <= bound, f"{name}: error {err:.3e} > bound {bound:.3e} (reference's own error {ref_err:.3e})"


def run_and_check(args, act, residual, dtype, mult=4.0, config=None):
    from pyebm._kernels import mlp_energy as kernels

    if config is None:
        E, G = _ops().mlp_energy_grad_triton(*args, act, residual)
        E_only = _ops().mlp_energy_triton(*args, act, residual)
    else:
        E, G = kernels.mlp_energy_grad(*args, act, residual, config=config)
        E_only = kernels.mlp_energy(*args, act, residual, config=config)
    assert E.dtype == dtype and G.dtype == dtype and E_only.dtype == dtype
    E64, G64 = ref.mlp_energy_grad(*as64(args), act, residual)
    E_lo, G_lo = ref.mlp_energy_grad(*args, act, residual)
    check_close("E", E, E64, E_lo, dtype, mult)
    check_close("G", G, G64, G_lo, dtype, mult)
    check_close("E (energy-only op)", E_only, E64, E_lo, dtype, mult)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("residual", [False, True])
def test_activations_fp32(triton_device, act, residual):
    run_and_check(make(3, 5, 7, (64, 64), device=triton_device), act, residual, torch.float32)


# (B, K, D, hidden, residual): widths 1, 7, 64 and 123, depths 1-3, K = 1, 5, 33; with residual on, the
# square layers among these add their input.
SHAPES = [
    (1, 1, 1, (1,), False),
    (1, 5, 1, (7, 1), True),
    (3, 1, 7, (7, 7, 7), True),
    (1, 33, 64, (64,), False),
    (3, 33, 7, (64, 7, 64), True),
    (3, 5, 64, (1, 64, 64), True),
    (3, 33, 7, (123, 123), True),
]


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("B,K,D,hidden,residual", SHAPES)
def test_shapes_fp32(triton_device, B, K, D, hidden, residual, act):
    run_and_check(make(B, K, D, hidden, seed=B * 100 + K, device=triton_device), act, residual, torch.float32)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("residual", [False, True])
def test_bf16(triton_device, act, residual):
    args = make(3, 5, 7, (64, 64), torch.bfloat16, seed=7, device=triton_device)
    run_and_check(args, act, residual, torch.bfloat16, mult=2.0)


@pytest.mark.parametrize("B,K,D,hidden,residual", SHAPES)
def test_bf16_shapes(triton_device, B, K, D, hidden, residual):
    act = ACTS[len(hidden) + K % 4]
    args = make(B, K, D, hidden, torch.bfloat16, seed=B + K, device=triton_device)
    run_and_check(args, act, residual, torch.bfloat16, mult=2.0)


@pytest.mark.parametrize("act", ["silu", "gelu_tanh", "softplus"])
def test_fp16(triton_device, act):
    args = make(3, 5, 7, (64, 64), torch.float16, seed=9, device=triton_device)
    run_and_check(args, act, True, torch.float16, mult=2.0)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy overflow in exp on the branch not taken
@pytest.mark.parametrize("act", ACTS)
def test_extreme_preactivations(triton_device, act):
    # Pre-activations from about -100 to 100 plus tiny ones: softplus above its threshold of 20 and with
    # exp underflowing, tanh/gelu_tanh in both saturated tails and in their small-argument branch.
    ctx, y, w_in, weights, biases, w_out, b_out = make(3, 33, 7, (16, 16), seed=13, device=triton_device)
    y = y * 40.0
    y[0] *= 1e-4
    run_and_check((ctx, y, w_in, weights, biases, w_out, b_out), act, False, torch.float32)


def test_persistent_loop_and_small_tiles(triton_device):
    # 165 rows, 16-row tiles, 3 programs: every program walks several row tiles that cross context rows.
    cfg = {"BLOCK_M": 16, "BLOCK_T": 16, "max_programs": 3}
    args = make(5, 33, 7, (40, 40, 7), seed=3, device=triton_device)
    run_and_check(args, "gelu_tanh", True, torch.float32, config=cfg)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy under the interpreter, on the NaN rows
def test_nan_and_inf_stay_in_their_candidate(triton_device):
    args = list(make(3, 5, 7, (64, 64), seed=11, device=triton_device))
    y = args[1].clone()
    y[1, 2, 3] = float("nan")
    y[2, 4, 0] = float("inf")
    E0, G0 = _ops().mlp_energy_grad_triton(*args, "silu", True)
    args[1] = y
    E, G = _ops().mlp_energy_grad_triton(*args, "silu", True)
    bad = torch.zeros(3, 5, dtype=torch.bool, device=y.device)
    bad[1, 2] = bad[2, 4] = True
    assert not torch.isfinite(E[bad]).any()
    assert torch.equal(E[~bad], E0[~bad])
    assert torch.equal(G[~bad], G0[~bad])
    assert torch.isfinite(E[~bad]).all() and torch.isfinite(G[~bad]).all()
    E_only = _ops().mlp_energy_triton(*args, "silu", True)
    assert not torch.isfinite(E_only[bad]).any() and torch.equal(E_only[~bad], E0[~bad])


@pytest.mark.parametrize("B,K", [(0, 5), (3, 0)])
def test_empty(triton_device, B, K):
    args = make(B, K, 7, (16, 16), device=triton_device)
    E, G = _ops().mlp_energy_grad_triton(*args, "silu", False)
    assert E.shape == (B, K) and G.shape == (B, K, 7)
    assert _ops().mlp_energy_triton(*args, "silu", False).shape == (B, K)


def test_non_contiguous_inputs(triton_device):
    ctx, y, w_in, weights, biases, w_out, b_out = make(3, 5, 7, (33, 33), seed=5, device=triton_device)
    big = torch.randn(3, 11, 16, dtype=y.dtype, device=y.device)
    y_nc = big[:, ::2, 3:10]  # [3, 6, 7], strided in every dim
    y_nc = y_nc[:, :5]
    y_nc.copy_(y)
    assert not y_nc.is_contiguous()
    ctx_nc = torch.randn(33, 3, dtype=ctx.dtype, device=ctx.device).t()
    ctx_nc.copy_(ctx)
    w_in_nc = w_in.t().contiguous().t()
    w0_nc = weights[0].t().contiguous().t()
    w_out_nc = torch.stack([w_out, w_out], 1)[:, 1]
    E, G = _ops().mlp_energy_grad_triton(ctx_nc, y_nc, w_in_nc, [w0_nc], biases, w_out_nc, b_out, "tanh", True)
    E_c, G_c = _ops().mlp_energy_grad_triton(ctx, y, w_in, weights, biases, w_out, b_out, "tanh", True)
    torch.testing.assert_close(E, E_c, rtol=0, atol=0)
    torch.testing.assert_close(G, G_c, rtol=0, atol=0)
    assert G.is_contiguous() and G.shape == y_nc.shape


def test_weight_updates_are_seen(triton_device):
    # Packed weights are cached; an in-place update must repack.
    args = make(3, 5, 7, (33, 33), seed=6, device=triton_device)
    E1, _ = _ops().mlp_energy_grad_triton(*args, "silu", False)
    with torch.no_grad():
        args[3][0].mul_(-1.5)
        args[2].add_(0.25)
    E2, G2 = _ops().mlp_energy_grad_triton(*args, "silu", False)
    E64, G64 = ref.mlp_energy_grad(*as64(args), "silu", False)
    assert not torch.allclose(E1, E2)
    torch.testing.assert_close(E2.double(), E64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(G2.double(), G64, rtol=1e-5, atol=1e-5)


def test_mlp_energy_module_backend_triton(triton_device):
    import pyebm

    torch.manual_seed(0)
    model = pyebm.MLPEnergy(5, 7, hidden=(33, 33), activation="gelu", residual=True).to(triton_device)
    x = torch.randn(3, 5, device=triton_device)
    y = torch.randn(3, 4, 7, device=triton_device)
    ctx = model.prepare(x)
    E, G = model.energy_and_grad(ctx, y, backend="triton")
    E_ref, G_ref = model.energy_and_grad(ctx, y, backend="torch")
    torch.testing.assert_close(E, E_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(G, G_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.energy(ctx, y, backend="triton"), E_ref, rtol=1e-5, atol=1e-5)


def test_bad_input(triton_device):
    ops = _ops()
    ctx, y, w_in, weights, biases, w_out, b_out = make(3, 5, 7, (16, 16), device=triton_device)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        ops.mlp_energy_grad_triton(*as64((ctx, y, w_in, weights, biases, w_out, b_out)), "silu", False)
    with pytest.raises(ValueError, match="w_in"):
        ops.mlp_energy_grad_triton(ctx, y[..., :6], w_in, weights, biases, w_out, b_out, "silu", False)
    with pytest.raises(ValueError, match="batch mismatch"):
        ops.mlp_energy_triton(ctx[:2], y, w_in, weights, biases, w_out, b_out, "silu", False)
    with pytest.raises(TypeError, match="weights\\[0\\]"):
        ops.mlp_energy_triton(ctx, y, w_in, [weights[0].half()], biases, w_out, b_out, "silu", False)
    with pytest.raises(ValueError, match="activation"):
        ops.mlp_energy_triton(ctx, y, w_in, weights, biases, w_out, b_out, "swish", False)


@pytest.mark.skipif(not _backend.triton_interpret(), reason="checks the interpreter-mode guard")
def test_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        _ops().mlp_energy_triton(*make(1, 2, 3, (16,), device="cpu"), "relu", False)


def test_opcheck(triton_device):
    args = make(2, 3, 5, (16, 16), seed=4, device=triton_device)
    torch.library.opcheck(_ops().mlp_energy_grad_triton.default, (*args, "gelu", True))
    torch.library.opcheck(_ops().mlp_energy_triton.default, (*args, "softplus", False))


def test_torch_compile_fullgraph(triton_device):
    args = make(2, 3, 5, (16, 16), seed=12, device=triton_device)

    def step(ctx, y, w_in, w0, b0, w_out, b_out):
        E, G = torch.ops.pyebm.mlp_energy_grad_triton(ctx, y, w_in, [w0], [b0], w_out, b_out, "silu", True)
        return E.sum() + torch.ops.pyebm.mlp_energy_triton(ctx, y - G, w_in, [w0], [b0], w_out, b_out, "silu",
                                                           True)

    _ops()
    ctx, y, w_in, weights, biases, w_out, b_out = args
    flat = (ctx, y, w_in, weights[0], biases[0], w_out, b_out)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*flat), step(*flat))


_SM90_COMPILE = r"""
import json
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from pyebm._kernels import mlp_energy as km

k = km._mlp_energy_kernel
CONSTEXPR = ("ACT", "WITH_GRAD", "BLOCK_M", "BLOCK_T", "DOT_PRECISION", "EMULATE_BF16")
FLOAT_PTRS = ("y_ptr", "ctx_ptr", "w_ptr", "b_ptr", "wout_ptr", "bout_ptr", "e_ptr", "g_ptr")
out = {}
for dt, act, grad in (("bf16", 3, True), ("fp32", 5, True), ("fp16", 0, False)):
    sig = {}
    for n in k.arg_names:
        sig[n] = ("*i64" if n == "meta_ptr" else "*fp32" if n == "scratch_ptr" else "*" + dt if n in FLOAT_PTRS
                  else "constexpr" if n in CONSTEXPR else "i32")
    cx = dict(ACT=act, WITH_GRAD=grad, BLOCK_M=64, BLOCK_T=64, DOT_PRECISION="ieee", EMULATE_BF16=False)
    c = triton.compile(ASTSource(fn=k, signature=sig, constexprs=cx), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": 8, "num_stages": 1})
    out[dt] = {"cubin": len(c.asm["cubin"]), "wgmma": "wgmma" in c.asm["ptx"]}
print(json.dumps(out))
"""


def test_compiles_for_sm90_without_gpu():
    # The interpreter never lowers the kernel; this builds sm_90 cubins with Triton's bundled ptxas so
    # that a machine without a GPU still proves the kernel compiles (and uses wgmma for bf16/fp16).
    import json
    import os
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", _SM90_COMPILE], env=env, capture_output=True, text=True,
                          timeout=300)
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr:
        pytest.skip("Triton's bundled ptxas is unavailable")
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert all(r["cubin"] > 0 for r in res.values())
    assert res["bf16"]["wgmma"] and res["fp16"]["wgmma"]
