"""The CUDA MLP energy ops (csrc/cuda/mlp_energy.cu) against pyebm.reference.mlp_energy.

Tests marked ``gpu`` need a CUDA device and an extension built with CUDA (bench/gpu_suite.sh builds it
and runs them); they are skipped elsewhere. Every comparison runs with PYEBM_CUDA_POISON=1, so the op
fills its outputs with NaN before the kernel runs and any element the kernel fails to write fails the
test. The error of the kernel is bounded by a small multiple of the reference's own error at the same
precision (the reference run in that dtype on the same device, both measured against float64).

The tests without a GPU check that the CUDA sources compile (tools/cuda_check.py, when nvcc exists)
and that bench/gpu_suite.sh refuses to run without a GPU.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pyebm
from pyebm.reference import mlp_energy as ref

ROOT = Path(__file__).resolve().parent.parent
ACTS = sorted(ref.ACTIVATIONS)


def _cuda_usable():
    report = pyebm.backends()
    return report["cuda"], report.why["cuda"]


needs_cuda_op = pytest.mark.skipif(not _cuda_usable()[0], reason=f"cuda backend not usable: {_cuda_usable()[1]}")


@pytest.fixture(autouse=True)
def _poison_and_exact(monkeypatch):
    monkeypatch.setenv("PYEBM_CUDA_POISON", "1")
    monkeypatch.delenv("PYEBM_CUDA_PATH", raising=False)
    if torch.cuda.is_available():
        # The fp32 reference must be true fp32 (no TF32) for its error to mean anything.
        old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        yield
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
    else:
        yield


def make_params(B, D, hidden, seed=0, device="cuda", dtype=torch.float64):
    """Random op arguments (never zeros): ctx [B, H1], w_in [H1, D], weights, biases, w_out [H_L], b_out [1]."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)

    H = list(hidden)
    # Weights about 1.5/sqrt(fan_in): every activation leaves its linear region.
    ctx = rnd(B, H[0], scale=0.7)
    w_in = rnd(H[0], D, scale=1.5 / max(1, D) ** 0.5)
    weights = [rnd(H[i + 1], H[i], scale=1.5 / H[i] ** 0.5) for i in range(len(H) - 1)]
    biases = [rnd(H[i + 1], scale=0.3) for i in range(len(H) - 1)]
    w_out = rnd(H[-1], scale=1.0 / H[-1] ** 0.5)
    b_out = rnd(1, scale=0.5)
    return ctx, w_in, weights, biases, w_out, b_out


def cast(params, dtype):
    ctx, w_in, weights, biases, w_out, b_out = params
    return (ctx.to(dtype), w_in.to(dtype), [w.to(dtype) for w in weights], [b.to(dtype) for b in biases],
            w_out.to(dtype), b_out.to(dtype))


def run_op(params, y, act, residual, grad=True):
    ctx, w_in, weights, biases, w_out, b_out = params
    if grad:
        return torch.ops.pyebm.mlp_energy_grad(ctx, y, w_in, weights, biases, w_out, b_out, act, residual)
    return torch.ops.pyebm.mlp_energy(ctx, y, w_in, weights, biases, w_out, b_out, act, residual)


def tolerance(dtype):
    """(multiple of the reference's own error, absolute slack in units of eps) for the kernel's error."""
    if dtype in (torch.bfloat16, torch.float16):
        return 2.0, 1.0
    if dtype == torch.float32:
        return 8.0, 16.0
    return 8.0, 64.0


def check_against_reference(B, K, D, hidden, act, residual, dtype, path=None, monkeypatch=None, seed=0):
    if path is not None:
        monkeypatch.setenv("PYEBM_CUDA_PATH", path)
    p64 = make_params(B, D, hidden, seed=seed)
    y64 = torch.randn(B, K, D, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64).cuda()
    E64, G64 = ref.mlp_energy_grad(p64[0], y64, *p64[1:], act, residual)
    pd = cast(p64, dtype)
    yd = y64.to(dtype)
    Er, Gr = ref.mlp_energy_grad(pd[0], yd, *pd[1:], act, residual)
    Ef, Gf = run_op(pd, yd, act, residual)
    torch.cuda.synchronize()
    assert Ef.dtype == dtype and Gf.dtype == dtype
    assert Ef.shape == (B, K) and Gf.shape == (B, K, D)
    assert Ef.device == yd.device and Gf.device == yd.device
    assert torch.isfinite(Ef).all(), "E has non-finite (unwritten?) elements"
    assert torch.isfinite(Gf).all(), "G has non-finite (unwritten?) elements"
    mult, slack = tolerance(dtype)
    eps = torch.finfo(dtype).eps
    for name, f, r, x in (("E", Ef, Er, E64), ("G", Gf, Gr, G64)):
        scale = x.abs().max().clamp_min(1.0)
        err = ((f.double() - x).abs().max() / scale).item()
        ref_err = ((r.double() - x).abs().max() / scale).item()
        assert err <= mult * ref_err + slack * eps, f"{name}: kernel error {err:.3g} vs reference {ref_err:.3g}"
    # The energy-only op: same bound (it may pick another tile shape or kernel than the gradient op, whose
    # tile also holds act'(z) for every layer, so it is not always bit for bit the same E).
    E_only = run_op(pd, yd, act, residual, grad=False)
    assert E_only.dtype == dtype and E_only.shape == (B, K) and torch.isfinite(E_only).all()
    scale = E64.abs().max().clamp_min(1.0)
    err = ((E_only.double() - E64).abs().max() / scale).item()
    ref_err = ((Er.double() - E64).abs().max() / scale).item()
    assert err <= mult * ref_err + slack * eps, f"E (energy only): {err:.3g} vs reference {ref_err:.3g}"


# ------------------------------------------------------------------------------------------------
# GPU: correctness
# ------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@needs_cuda_op
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("dtype,path", [(torch.float32, None), (torch.bfloat16, "tc"), (torch.bfloat16, "simt"),
                                        (torch.float16, "tc")])
def test_cuda_activations(act, residual, dtype, path, monkeypatch):
    check_against_reference(3, 17, 5, (33, 33, 17), act, residual, dtype, path, monkeypatch)


SHAPES = [
    # B, K, D, hidden
    (1, 1, 1, (1,)),
    (1, 5, 7, (7, 7)),
    (3, 5, 16, (64, 64)),
    (17, 33, 7, (123, 123)),
    (3, 33, 64, (256, 256)),
    (1, 256, 16, (256, 256)),       # the latency case of the design goals
    (17, 1, 3, (16, 48, 16, 16)),   # mixed widths, residual only where they match
    (64, 64, 64, (256, 256, 256)),  # many 64-row tiles
    (40, 100, 24, (96, 96)),        # more tiles than SMs: the 64-row tile shapes
]


@pytest.mark.gpu
@needs_cuda_op
@pytest.mark.parametrize("B,K,D,hidden", SHAPES)
@pytest.mark.parametrize("dtype,path", [(torch.float32, None), (torch.float64, None), (torch.bfloat16, "tc"),
                                        (torch.bfloat16, "simt"), (torch.float16, "tc")])
def test_cuda_shapes(B, K, D, hidden, dtype, path, monkeypatch):
    check_against_reference(B, K, D, hidden, "silu", True, dtype, path, monkeypatch)
    check_against_reference(B, K, D, hidden, "gelu_tanh", False, dtype, path, monkeypatch, seed=7)


@pytest.mark.gpu
@needs_cuda_op
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_wide_layers_global_workspace(dtype, monkeypatch):
    # 32 rows of these activations do not fit in shared memory: the SIMT kernel spills them to a global
    # workspace (and the tensor-core tile does not fit either).
    check_against_reference(2, 21, 5, (3000, 3000), "tanh", True, dtype, None, monkeypatch)


@pytest.mark.gpu
@needs_cuda_op
def test_cuda_noncontiguous_inputs():
    B, K, D, hidden = 3, 9, 6, (32, 32)
    p = cast(make_params(B, D, hidden), torch.float32)
    ybig = torch.randn(B, 2 * K, D + 3, device="cuda")
    y = ybig[:, ::2, 1:D + 1]
    assert not y.is_contiguous()
    w_in_t = p[1].t().contiguous().t()  # same values, transposed strides
    assert not w_in_t.is_contiguous()
    E, G = run_op((p[0], w_in_t) + tuple(p[2:]), y, "silu", True)
    Er, Gr = ref.mlp_energy_grad(p[0], y.contiguous(), *p[1:], "silu", True)
    torch.testing.assert_close(E, Er, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(G, Gr, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@needs_cuda_op
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_nan_stays_in_its_candidate(dtype):
    B, K, D = 2, 40, 5
    p = cast(make_params(B, D, (64, 64)), dtype)
    y = torch.randn(B, K, D, device="cuda").to(dtype)
    y[1, 7, 2] = float("nan")
    y[0, 39, 0] = float("inf")
    E, G = run_op(p, y, "silu", False)
    bad = torch.zeros(B, K, dtype=torch.bool, device="cuda")
    bad[1, 7] = True
    bad[0, 39] = True
    assert not torch.isfinite(E[1, 7]) and not torch.isfinite(G[1, 7]).all()
    assert torch.isfinite(E[~bad]).all() and torch.isfinite(G[~bad]).all()


@pytest.mark.gpu
@needs_cuda_op
def test_cuda_empty_batches():
    p = cast(make_params(3, 4, (16,)), torch.float32)
    for B, K in ((0, 5), (3, 0)):
        pp = (p[0][:B],) + tuple(p[1:])
        E, G = run_op(pp, torch.randn(B, K, 4, device="cuda"), "relu", False)
        assert E.shape == (B, K) and G.shape == (B, K, 4)


@pytest.mark.gpu
@needs_cuda_op
def test_cuda_errors_name_the_argument():
    p = cast(make_params(2, 4, (8, 8)), torch.float32)
    y = torch.randn(2, 3, 4, device="cuda")
    with pytest.raises(RuntimeError, match="ctx is on cpu"):
        run_op((p[0].cpu(),) + tuple(p[1:]), y, "silu", False)
    with pytest.raises(RuntimeError, match="w_in has dtype"):
        run_op((p[0], p[1].double()) + tuple(p[2:]), y, "silu", False)
    with pytest.raises(RuntimeError, match="candidate width mismatch"):
        run_op(p, torch.randn(2, 3, 5, device="cuda"), "silu", False)
    with pytest.raises(RuntimeError, match="activation must be one of"):
        run_op(p, y, "swish", False)


@pytest.mark.gpu
@needs_cuda_op
def test_cuda_opcheck():
    p = cast(make_params(2, 5, (16, 16)), torch.float32)
    y = torch.randn(2, 3, 5, device="cuda")
    args = (p[0], y, p[1], p[2], p[3], p[4], p[5], "silu", True)
    torch.library.opcheck(torch.ops.pyebm.mlp_energy_grad.default, args)
    torch.library.opcheck(torch.ops.pyebm.mlp_energy.default, args)


@pytest.mark.gpu
@needs_cuda_op
def test_cuda_graph_capture_and_replay():
    # No host synchronisation or pageable copies inside the op: it can be captured in a CUDA graph.
    p = cast(make_params(4, 8, (64, 64)), torch.bfloat16)
    y = torch.randn(4, 32, 8, device="cuda").to(torch.bfloat16)
    E0, G0 = run_op(p, y, "gelu", True)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            run_op(p, y, "gelu", True)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        E, G = run_op(p, y, "gelu", True)
    y.copy_(torch.randn_like(y))
    graph.replay()
    torch.cuda.synchronize()
    E1, G1 = run_op(p, y, "gelu", True)
    assert torch.equal(E, E1) and torch.equal(G, G1)
    assert not torch.equal(E, E0)


# ------------------------------------------------------------------------------------------------
# Without a GPU: the same kernels under a host emulator (tests/cuda_emu/), then nvcc
# ------------------------------------------------------------------------------------------------

EMU_DIR = ROOT / "tests" / "cuda_emu"
CUDA_INCLUDE = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include"
_EMU_DTYPES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}
_EMU_PATHS = {None: 0, "tc": 1, "simt": 2}
# The kernel's activation numbering (enum pyebm::Act in csrc/include/pyebm/activations.h).
_EMU_ACTS = {"relu": 0, "silu": 1, "gelu": 2, "gelu_tanh": 3, "tanh": 4, "softplus": 5}


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    """The kernels compiled as host C++ with one thread per GPU thread (needs g++ and the CUDA headers)."""
    import shutil

    cxx = shutil.which("g++")
    if cxx is None or not (CUDA_INCLUDE / "cuda_bf16.h").exists():
        pytest.skip("needs g++ and the CUDA toolkit headers (cuda_bf16.h)")
    exe = tmp_path_factory.mktemp("cuda_emu") / "mlp_energy_emu"
    cmd = [cxx, "-std=c++20", "-O1", "-pthread", "-w", "-DPYEBM_GPU_EMULATE", f"-I{CUDA_INCLUDE}",
           f"-I{ROOT / 'csrc' / 'include'}", str(EMU_DIR / "mlp_energy_emu.cpp"), "-o", str(exe)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return exe


def emulate(exe, tmp_path, B, K, D, hidden, act, residual, dtype, path=None, sms=132, grad=True, seed=0,
            nan_at=None):
    """Run the emulated kernel; returns (E, G, (path, rows per tile, column warps, grid), reference errors)."""
    import struct

    import numpy as np

    p = make_params(B, D, hidden, seed=seed, device="cpu")
    y = torch.randn(B, K, D, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    if nan_at is not None:
        y[nan_at] = float("nan")
    # Round every input to the dtype first: the emulator and the references then see the same values.
    p = cast(cast(p, dtype), torch.float64)
    y = y.to(dtype).double()
    ctx, w_in, weights, biases, w_out, b_out = p
    head = [_EMU_DTYPES[dtype], _EMU_ACTS[act], int(residual), int(grad), _EMU_PATHS[path], sms, B, K, D,
            len(hidden), *hidden]
    arrays = [ctx, y, w_in] + [t for pair in zip(weights, biases) for t in pair] + [w_out, b_out]
    fin, fout = tmp_path / "emu_in", tmp_path / "emu_out"
    with open(fin, "wb") as f:
        f.write(struct.pack(f"{len(head)}i", *head))
        for a in arrays:
            f.write(a.contiguous().numpy().astype(np.float64).tobytes())
    proc = subprocess.run([str(exe), str(fin), str(fout)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    raw = fout.read_bytes()
    info = struct.unpack("4i", raw[:16])
    vals = torch.from_numpy(np.frombuffer(raw[16:], dtype=np.float64).copy())
    E = vals[:B * K].reshape(B, K)
    G = vals[B * K:].reshape(B, K, D) if grad else None
    return E, G, info, (ctx, y, p)


def check_emulated(exe, tmp_path, B, K, D, hidden, act, residual, dtype, path=None, sms=132, seed=0):
    E, G, info, (ctx, y, p) = emulate(exe, tmp_path, B, K, D, hidden, act, residual, dtype, path, sms, seed=seed)
    assert torch.isfinite(E).all() and torch.isfinite(G).all(), "unwritten or NaN-poisoned elements"
    E64, G64 = ref.mlp_energy_grad(ctx, y, *p[1:], act, residual)
    pd = cast(p, dtype)
    Er, Gr = ref.mlp_energy_grad(pd[0], y.to(dtype), *pd[1:], act, residual)
    mult, slack = tolerance(dtype)
    eps = torch.finfo(dtype).eps
    for name, f, r, x in (("E", E, Er, E64), ("G", G, Gr, G64)):
        scale = x.abs().max().clamp_min(1.0)
        err = ((f - x).abs().max() / scale).item()
        ref_err = ((r.double() - x).abs().max() / scale).item()
        assert err <= mult * ref_err + slack * eps, f"{name}: kernel error {err:.3g} vs reference {ref_err:.3g}"
    E_only, _, _, _ = emulate(exe, tmp_path, B, K, D, hidden, act, residual, dtype, path, sms, grad=False, seed=seed)
    scale = E64.abs().max().clamp_min(1.0)
    assert ((E_only - E64).abs().max() / scale).item() <= mult * ((Er.double() - E64).abs().max() / scale).item() \
        + slack * eps
    return info


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype,path", [(torch.bfloat16, "tc"), (torch.float16, "tc"), (torch.float32, None)])
def test_emulated_activations(emulator, tmp_path, act, dtype, path):
    info = check_emulated(emulator, tmp_path, 3, 5, 7, (33, 33, 17), act, True, dtype, path)
    assert info[0] == (1 if path == "tc" else 2)


@pytest.mark.parametrize("B,K,D,hidden,sms,expect", [
    # expect: (path, rows per tile, column warps); sms = 1 makes every problem "many tiles"
    (1, 1, 1, (1,), 132, (1, 16, 8)),
    (2, 33, 7, (123, 123), 132, (1, 16, 8)),      # scalar weight staging, partial chunks
    (3, 7, 3, (16, 48, 16, 16), 132, (1, 16, 8)),  # mixed widths, one residual layer
    (1, 40, 64, (256, 256), 1, (1, 64, 4)),        # 64-row tiles, vector staging, 4 chunks per layer
    (4, 50, 8, (80, 200, 80), 1, (1, 64, 4)),      # several tiles per launch
    (4, 50, 8, (256, 256, 256), 1, (1, 32, 4)),    # act' of three layers: 32-row tiles
])
def test_emulated_tensor_core_shapes(emulator, tmp_path, B, K, D, hidden, sms, expect):
    info = check_emulated(emulator, tmp_path, B, K, D, hidden, "silu", True, torch.bfloat16, "tc", sms)
    assert info[:3] == expect


@pytest.mark.parametrize("B,K,D,hidden,dtype", [
    (2, 33, 7, (123, 123), torch.float32),
    (3, 7, 3, (16, 48, 16, 16), torch.float64),
    (2, 5, 16, (64, 64), torch.bfloat16),
    (2, 21, 5, (3000, 3000), torch.float32),      # activations in the global workspace
])
def test_emulated_simt_shapes(emulator, tmp_path, B, K, D, hidden, dtype):
    path = "simt" if dtype == torch.bfloat16 else None
    info = check_emulated(emulator, tmp_path, B, K, D, hidden, "gelu_tanh", True, dtype, path)
    assert info[0] == 2


@pytest.mark.parametrize("dtype,path", [(torch.bfloat16, "tc"), (torch.float32, None)])
def test_emulated_nan_stays_in_its_candidate(emulator, tmp_path, dtype, path):
    E, G, _, _ = emulate(emulator, tmp_path, 2, 20, 5, (48, 48), "silu", False, dtype, path, nan_at=(1, 3, 2))
    bad = torch.zeros(2, 20, dtype=torch.bool)
    bad[1, 3] = True
    assert torch.isnan(E[1, 3]) and torch.isnan(G[1, 3]).all()
    assert torch.isfinite(E[~bad]).all() and torch.isfinite(G[~bad]).all()


def _nvcc_present():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import cuda_check
    finally:
        sys.path.pop(0)
    return cuda_check.find_nvcc() is not None


@pytest.mark.slow
@pytest.mark.skipif(not _nvcc_present(), reason="nvcc not found")
def test_cuda_sources_compile():
    """nvcc compiles csrc/cuda/*.cu (kernels and ATen glue) for sm_90: proves they build, not that they are right."""
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "cuda_check.py")], capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "cuda-check: OK" in proc.stdout, proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_gpu_suite_fails_fast_without_gpu(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_suite.sh"), str(tmp_path / "out")], capture_output=True,
                          text=True, timeout=120, env=env, cwd=ROOT)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no CUDA GPU" in proc.stdout + proc.stderr
