"""The CUDA descent ops (csrc/cuda/descent.cu: the whole-loop ``pyebm::mlp_descent`` and the fused
``pyebm::descent_update``) against the CPU ops of the same schemas (csrc/cpu/mlp_descent.cpp), which
tests/test_mlp_descent.py ties to the per-step torch path and pyebm.reference.descent.

Without a GPU, the kernels of pyebm/cuda/descent.cuh run under the host emulator (tests/cuda_emu/, one OS
thread per GPU thread, NaN-filled working memory) on the same inputs as the CPU op: same pre-drawn noise,
same per-row update function (pyebm/descent_update.h), so steps and status agree exactly and y / E agree
to the rounding of the energy's summation order. Tests marked ``gpu`` run the real CUDA ops (an extension
built with CUDA and a device; bench/gpu_suite.sh runs them) and are skipped elsewhere.
"""
import os
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import pyebm
from pyebm import Descent, minimize

ROOT = Path(__file__).resolve().parent.parent
EMU_DIR = ROOT / "tests" / "cuda_emu"
CUDA_INCLUDE = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include"
# enum pyebm::Act (csrc/include/pyebm/activations.h) and pyebm::NoiseMode (csrc/include/pyebm/descent_update.h)
ACTS = {"relu": 0, "silu": 1, "gelu": 2, "gelu_tanh": 3, "tanh": 4, "softplus": 5}
NOISE = {"none": 0, "langevin": 1, "step": 2, "additive": 3}

pytestmark = pytest.mark.skipif(not pyebm.backends()["cpu"], reason="extension pyebm._C not built")


def _cuda_usable():
    report = pyebm.backends()
    return report["cuda"], report.why["cuda"]


needs_cuda_op = pytest.mark.skipif(not _cuda_usable()[0], reason=f"cuda backend not usable: {_cuda_usable()[1]}")


# ------------------------------------------------------------------------------------------------
# Cases: every argument of pyebm::mlp_descent, by name
# ------------------------------------------------------------------------------------------------

# Option sets of the whole loop (the op's keyword arguments; "eta", "steps" and "nlev" shape the schedules).
OPTS = {
    "gd": dict(),
    "nesterov": dict(momentum=0.9, nesterov=True),
    "heavy_ball_clips": dict(momentum=0.5, grad_clip=0.1, grad_clip_norm=0.3, step_clip=0.02),
    "tol": dict(eta=0.2, steps=9, tol=0.6),
    "tol_final_step": dict(eta=0.2, steps=9, tol=0.6, tol_final_step=True),
    "bounds": dict(lower=-0.5, upper=0.5),
    "bounds_at_end": dict(lower=-0.5, upper=0.5, bound_each_step=False),
    "bounds_per_dim": dict(lower=[-1.0, -0.2, -0.3, -2.0], upper=[1.0, 0.2, 0.4, 2.0],
                           step_clip=[0.05, 0.1, 0.02, 0.3]),
    "energy_scaled": dict(energy_scaled=True, energy_temperature=3.0),
    "langevin": dict(noise_mode="langevin", nlev=0.1),
    "ibc_step_noise": dict(noise_mode="step", nlev=1.0, grad_scale=0.5, lower=-1.0, upper=1.0, step_clip=0.1),
    "additive_schedule": dict(noise_mode="additive", nlev=0.01, eta=[0.05, 0.04, 0.03, 0.02, 0.02, 0.01, 0.01]),
    "mask": dict(mask=True, momentum=0.3),
}


def make_case(B, K, D, hidden, act, residual, dtype, opts, seed=0, nan_row=None):
    """The op's arguments as a dict (CPU tensors in ``dtype``, never zeros)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    H = list(hidden)
    o = dict(opts)
    eta = o.pop("eta", 0.05)
    steps = o.pop("steps", len(eta) if isinstance(eta, list) else 7)
    eta = torch.tensor(eta if isinstance(eta, list) else [eta] * steps, dtype=torch.float64)
    nlev = torch.full((steps,), float(o.pop("nlev", 0.0)), dtype=torch.float64)
    args = dict(
        ctx=rnd(B, H[0], scale=0.7), y0=rnd(B, K, D), w_in=rnd(H[0], D, scale=1.5 / max(1, D) ** 0.5),
        weights=[rnd(H[i + 1], H[i], scale=1.5 / H[i] ** 0.5) for i in range(len(H) - 1)],
        biases=[rnd(H[i + 1], scale=0.3) for i in range(len(H) - 1)],
        w_out=rnd(H[-1], scale=1.0 / H[-1] ** 0.5), b_out=rnd(1, scale=0.5), activation=act, residual=residual,
        eta=eta, noise_level=nlev, noise=None, lower=None, upper=None, step_clip=None, mask=None, grad_scale=1.0,
        momentum=0.0, nesterov=False, grad_clip=None, grad_clip_norm=None, energy_scaled=False,
        energy_temperature=1.0, tol=0.0, tol_final_step=False, bound_each_step=True, noise_mode="none")
    if nan_row is not None:
        args["y0"][nan_row][0] = float("nan")
    for name in ("lower", "upper", "step_clip"):
        if name in o:
            v = o.pop(name)
            args[name] = torch.tensor(v if isinstance(v, list) else [v] * D, dtype=dtype)[:D]
    if o.pop("mask", False):
        args["mask"] = torch.rand(B, K, D, generator=g) < 0.3
    args.update(o)
    if args["noise_mode"] != "none":
        args["noise"] = torch.randn(steps, B, K, D, generator=g, dtype=torch.float64).to(dtype)
    return args


ORDER = ("ctx", "y0", "w_in", "weights", "biases", "w_out", "b_out", "activation", "residual", "eta", "noise_level",
         "noise", "lower", "upper", "step_clip", "mask", "grad_scale", "momentum", "nesterov", "grad_clip",
         "grad_clip_norm", "energy_scaled", "energy_temperature", "tol", "tol_final_step", "bound_each_step",
         "noise_mode")


def run_op(args, device="cpu"):
    def move(v):
        if isinstance(v, torch.Tensor):
            return v.to(device)
        if isinstance(v, list):
            return [t.to(device) for t in v]
        return v

    with torch.no_grad():
        return torch.ops.pyebm.mlp_descent(*[move(args[k]) for k in ORDER])


# ------------------------------------------------------------------------------------------------
# The emulator
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    """descent_emu.cpp compiled as host C++ (needs g++ and the CUDA toolkit headers)."""
    cxx = shutil.which("g++")
    if cxx is None or not (CUDA_INCLUDE / "cuda_bf16.h").exists():
        pytest.skip("needs g++ and the CUDA toolkit headers (cuda_bf16.h)")
    exe = tmp_path_factory.mktemp("cuda_emu") / "descent_emu"
    cmd = [cxx, "-std=c++20", "-O1", "-pthread", "-w", "-DPYEBM_GPU_EMULATE", f"-I{CUDA_INCLUDE}",
           f"-I{ROOT / 'csrc' / 'include'}", str(EMU_DIR / "descent_emu.cpp"), "-o", str(exe)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return exe


def _write(path, head, scalars, arrays):
    with open(path, "wb") as f:
        f.write(struct.pack("q", len(head)) + struct.pack(f"{len(head)}i", *head))
        f.write(struct.pack("q", len(scalars)) + struct.pack(f"{len(scalars)}d", *scalars))
        for a in arrays:
            a = np.zeros(0) if a is None else a.detach().reshape(-1).to(torch.float64).numpy()
            f.write(struct.pack("q", a.size) + a.astype(np.float64).tobytes())


def _run(exe, tmp_path, head, scalars, arrays):
    fin, fout = tmp_path / "emu_in", tmp_path / "emu_out"
    _write(fin, head, scalars, arrays)
    proc = subprocess.run([str(exe), str(fin), str(fout)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    raw = fout.read_bytes()
    return struct.unpack("4i", raw[:16]), torch.from_numpy(np.frombuffer(raw[16:], dtype=np.float64).copy())


def emulate_descent(exe, tmp_path, args, sms=132, smem_optin=0):
    """The whole-loop kernel under the emulator; returns ((y, E_final, E_init, steps, status), plan info)."""
    B, K, D = args["y0"].shape
    H = [args["w_in"].shape[0]] + [w.shape[0] for w in args["weights"]]
    dtype = args["y0"].dtype
    head = [0, int(dtype == torch.float64), ACTS[args["activation"]], int(args["residual"]), sms, smem_optin, B, K, D,
            len(H), *H, int(args["nesterov"]), int(args["energy_scaled"]), int(args["tol_final_step"]),
            int(args["bound_each_step"]), NOISE[args["noise_mode"]]]
    scalars = [args["grad_scale"], args["momentum"], args["grad_clip"] or 0.0, args["grad_clip_norm"] or 0.0,
               args["energy_temperature"], args["tol"]]
    arrays = [args["ctx"], args["y0"], args["w_in"]]
    for w, b in zip(args["weights"], args["biases"]):
        arrays += [w, b]
    arrays += [args["w_out"], args["b_out"], args["eta"].to(dtype), args["noise_level"].to(dtype), args["noise"],
               args["lower"], args["upper"], args["step_clip"], args["mask"]]
    info, v = _run(exe, tmp_path, head, scalars, arrays)
    N = B * K
    y, rest = v[:N * D].reshape(B, K, D), v[N * D:]
    E_final, E_init, steps, status = (rest[i * N:(i + 1) * N].reshape(B, K) for i in range(4))
    return (y.to(dtype), E_final.to(dtype), E_init.to(dtype), steps.to(torch.int32), status.to(torch.int8)), info


def assert_matches(got, want, dtype):
    y, Ef, Ei, steps, status = got
    y0, Ef0, Ei0, steps0, status0 = want
    assert torch.equal(steps, steps0), f"steps differ:\n{steps}\n{steps0}"
    assert torch.equal(status, status0), f"status differs:\n{status}\n{status0}"
    # Same update, same noise; the energies differ by the summation order only.
    atol = 1e-11 if dtype == torch.float64 else 2e-5
    for name, a, b in (("y", y, y0), ("E_final", Ef, Ef0), ("E_init", Ei, Ei0)):
        scale = b[torch.isfinite(b)].abs().max().clamp_min(1.0) if torch.isfinite(b).any() else 1.0
        torch.testing.assert_close(a, b, rtol=0, atol=float(atol * scale), equal_nan=True, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("name", list(OPTS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_emulated_whole_loop_matches_cpu_op(emulator, tmp_path, name, dtype):
    args = make_case(3, 5, 4, (16, 16), "tanh", True, dtype, OPTS[name])
    got, info = emulate_descent(emulator, tmp_path, args)
    assert info[3] == 1  # activations in shared memory
    want = run_op(args)
    assert_matches(got, want, dtype)
    if name.startswith("tol"):
        steps = want[3]
        assert (steps < 9).any() and (steps > 0).any(), "the early-exit case should stop some rows, not all at once"


@pytest.mark.parametrize("act", sorted(ACTS))
def test_emulated_whole_loop_activations(emulator, tmp_path, act):
    args = make_case(2, 3, 3, (9, 7, 7), act, True, torch.float64, OPTS["nesterov"], seed=3)
    got, _ = emulate_descent(emulator, tmp_path, args)
    assert_matches(got, run_op(args), torch.float64)


@pytest.mark.parametrize("B,K,D,hidden", [
    (1, 1, 1, (1,)),
    (2, 17, 5, (33, 17)),         # two tiles, the second partial
    (1, 33, 3, (8, 8, 8, 8)),     # depth, one row in the second tile
])
def test_emulated_whole_loop_shapes(emulator, tmp_path, B, K, D, hidden):
    opts = dict(OPTS["tol_final_step"], momentum=0.5, nesterov=True, noise_mode="langevin", nlev=0.05)
    args = make_case(B, K, D, hidden, "silu", False, torch.float64, opts, seed=11)
    got, info = emulate_descent(emulator, tmp_path, args)
    assert info[0] == (B * K + 31) // 32
    assert_matches(got, run_op(args), torch.float64)


def test_emulated_whole_loop_global_workspace(emulator, tmp_path):
    # Shared memory too small for a tile: activations in a global workspace, a persistent grid of 4 CTAs
    # (sms = 1) over 5 tiles, so one CTA runs two tiles back to back.
    args = make_case(5, 30, 4, (16, 16), "gelu_tanh", True, torch.float64, OPTS["tol"], seed=5)
    got, info = emulate_descent(emulator, tmp_path, args, sms=1, smem_optin=1024)
    assert info[3] == 0 and info[0] == 4 and info[2] == 0
    assert_matches(got, run_op(args), torch.float64)


def test_emulated_whole_loop_non_finite_rows(emulator, tmp_path):
    args = make_case(2, 20, 4, (16, 16), "silu", True, torch.float32, OPTS["nesterov"], nan_row=(1, 3))
    got, _ = emulate_descent(emulator, tmp_path, args)
    want = run_op(args)
    assert want[4][1, 3] == 2 and (want[4] == 2).sum() == 1
    assert_matches(got, want, torch.float32)


def emulate_update(exe, tmp_path, a):
    N, D = a["y"].shape
    dtype = a["y"].dtype
    head = [1, int(dtype == torch.float64), N, D, int(a["energy_scaled"]), int(a["tol_final_step"]),
            int(a["bound_each_step"]), NOISE[a["noise_mode"]]]
    scalars = [a["grad_scale"], a["momentum"], a["grad_clip"] or 0.0, a["grad_clip_norm"] or 0.0,
               a["energy_temperature"], a["tol"], a["eta"], a["noise_level"]]
    arrays = [a[k] for k in ("y", "g", "E", "active", "steps", "status", "velocity", "pending", "noise", "mask",
                             "fixed", "lower", "upper", "step_clip")]
    info, v = _run(exe, tmp_path, head, scalars, arrays)
    out, o = {}, 0
    for k, n in (("y", N * D), ("active", N), ("steps", N), ("status", N), ("velocity", N * D), ("pending", N)):
        if k in ("velocity", "pending") and a[k] is None:
            continue
        out[k] = v[o:o + n]
        o += n
    return out


UPDATE_OPTS = [
    dict(),
    dict(momentum=0.7, grad_clip=0.5, grad_clip_norm=0.8),
    dict(tol=1.0),
    dict(tol=1.5, tol_final_step=True),
    dict(noise_mode="langevin", noise_level=0.3, lower=[-0.5, -0.1, -1.0], upper=[0.3, 0.6, 1.0]),
    dict(noise_mode="step", noise_level=0.5, energy_scaled=True, energy_temperature=2.0, step_clip=[0.05] * 3),
    dict(noise_mode="additive", noise_level=0.1, mask=True, lower=[-0.2] * 3, bound_each_step=False),
]


def update_args(opts, dtype, N=37, D=3):
    g = torch.Generator().manual_seed(1)
    a = dict(y=torch.randn(N, D, generator=g, dtype=dtype), g=torch.randn(N, D, generator=g, dtype=dtype),
             E=torch.randn(N, generator=g, dtype=dtype), active=torch.ones(N, dtype=torch.bool),
             steps=torch.randint(0, 3, (N,), generator=g, dtype=torch.int32), status=torch.zeros(N, dtype=torch.int8),
             velocity=None, pending=None, noise=None, mask=None, fixed=None, lower=None, upper=None, step_clip=None,
             eta=0.1, noise_level=0.0, noise_mode="none", grad_scale=0.9, momentum=0.0, grad_clip=None,
             grad_clip_norm=None, energy_scaled=False, energy_temperature=1.0, tol=0.0, tol_final_step=False,
             bound_each_step=True)
    a["E"][2] = float("inf")
    a["g"][5, 1] = float("nan")
    a["active"][4] = False
    o = dict(opts)
    if o.get("momentum"):
        a["velocity"] = torch.randn(N, D, generator=g, dtype=dtype)
    if o.get("tol_final_step"):
        a["pending"] = torch.rand(N, generator=g) < 0.5
    if o.get("noise_mode", "none") != "none":
        a["noise"] = torch.randn(N, D, generator=g, dtype=dtype)
    if o.pop("mask", False):
        a["mask"] = torch.rand(N, D, generator=g) < 0.3
        a["fixed"] = torch.randn(N, D, generator=g, dtype=dtype)
    for k in ("lower", "upper", "step_clip"):
        if k in o:
            o[k] = torch.tensor(o[k], dtype=dtype)
    a.update(o)
    return a


UPDATE_ORDER = ("y", "g", "E", "active", "steps", "status", "velocity", "pending", "noise", "mask", "fixed", "lower",
                "upper", "step_clip", "eta", "noise_level", "noise_mode", "grad_scale", "momentum", "grad_clip",
                "grad_clip_norm", "energy_scaled", "energy_temperature", "tol", "tol_final_step", "bound_each_step")


def run_update_op(a, device="cpu"):
    a = {k: (v.clone().to(device) if isinstance(v, torch.Tensor) else v) for k, v in a.items()}
    torch.ops.pyebm.descent_update(*[a[k] for k in UPDATE_ORDER])
    return a


@pytest.mark.parametrize("opts", UPDATE_OPTS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_emulated_update_matches_cpu_op(emulator, tmp_path, opts, dtype):
    a = update_args(opts, dtype)
    got = emulate_update(emulator, tmp_path, a)
    want = run_update_op(a)
    # The same function on the same inputs: the same bits.
    assert torch.equal(got["y"].to(dtype), want["y"].reshape(-1))
    assert torch.equal(got["active"].bool(), want["active"])
    assert torch.equal(got["steps"].to(torch.int32), want["steps"])
    assert torch.equal(got["status"].to(torch.int8), want["status"])
    if a["velocity"] is not None:
        assert torch.equal(got["velocity"].to(dtype), want["velocity"].reshape(-1))
    if a["pending"] is not None:
        assert torch.equal(got["pending"].bool(), want["pending"])
    assert want["status"][2] == 2 and want["status"][5] == 2 and want["steps"][4] == a["steps"][4]


def test_whole_loop_backend_resolution_on_cpu():
    m = pyebm.MLPEnergy(3, 4, hidden=(8,), dtype=torch.float64)
    y0 = torch.randn(2, 3, 4, dtype=torch.float64)
    cfg = Descent.gd(steps=3, step_size=0.1)
    x = torch.randn(2, 3, dtype=torch.float64)
    assert pyebm.explain(m, x, cfg, 3, init=y0, mask=torch.zeros(y0.shape, dtype=torch.bool)).backend == "cpu"
    with pytest.raises(ValueError, match="cuda"):
        pyebm.explain(m, x, cfg, 3, init=y0, backend="cuda")


# ------------------------------------------------------------------------------------------------
# GPU: the CUDA ops against the CPU ops
# ------------------------------------------------------------------------------------------------

@pytest.fixture
def poison(monkeypatch):
    monkeypatch.setenv("PYEBM_CUDA_POISON", "1")


@pytest.mark.gpu
@needs_cuda_op
@pytest.mark.parametrize("name", list(OPTS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("B,K,D,hidden", [(3, 5, 4, (16, 16)), (7, 37, 4, (64, 64)), (1, 256, 4, (256, 256))])
def test_cuda_whole_loop_matches_cpu_op(poison, name, dtype, B, K, D, hidden):
    args = make_case(B, K, D, hidden, "tanh", True, dtype, OPTS[name])
    got = [t.cpu() for t in run_op(args, "cuda")]
    assert_matches(got, run_op(args), dtype)


@pytest.mark.gpu
@needs_cuda_op
@pytest.mark.parametrize("act", sorted(ACTS))
def test_cuda_whole_loop_activations(poison, act):
    args = make_case(4, 33, 5, (33, 33, 17), act, True, torch.float64, OPTS["tol_final_step"])
    got = [t.cpu() for t in run_op(args, "cuda")]
    assert_matches(got, run_op(args), torch.float64)


@pytest.mark.gpu
@needs_cuda_op
def test_cuda_whole_loop_wide_layers_global_workspace(poison):
    args = make_case(2, 40, 3, (3000, 3000), "tanh", True, torch.float32, OPTS["nesterov"])
    got = [t.cpu() for t in run_op(args, "cuda")]
    assert_matches(got, run_op(args), torch.float32)


@pytest.mark.gpu
@needs_cuda_op
def test_cuda_whole_loop_half_inputs_compute_in_float32(poison):
    args = make_case(3, 9, 4, (32, 32), "silu", False, torch.bfloat16, OPTS["bounds"])
    got = run_op(args, "cuda")
    want = run_op(args)
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.bfloat16
    torch.testing.assert_close(got[0].cpu().float(), want[0].float(), rtol=0, atol=2e-2)
    assert torch.equal(got[3].cpu(), want[3]) and torch.equal(got[4].cpu(), want[4])


@pytest.mark.gpu
@needs_cuda_op
@pytest.mark.parametrize("opts", UPDATE_OPTS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cuda_update_matches_cpu_op(opts, dtype):
    a = update_args(opts, dtype, N=300, D=5 if "lower" not in opts and "step_clip" not in opts else 3)
    got, want = run_update_op(a, "cuda"), run_update_op(a)
    tol = 1e-12 if dtype == torch.float64 else 1e-6  # device exp may differ from libm in the last bit
    torch.testing.assert_close(got["y"].cpu(), want["y"], rtol=0, atol=tol)
    for k in ("active", "steps", "status", "pending"):
        if want[k] is not None:
            assert torch.equal(got[k].cpu(), want[k]), k


@pytest.mark.gpu
@needs_cuda_op
def test_minimize_runs_the_cuda_whole_loop():
    torch.manual_seed(0)
    m = pyebm.MLPEnergy(3, 4, hidden=(32, 32), activation="silu", residual=True, dtype=torch.float64)
    x, y0 = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 6, 4, dtype=torch.float64)
    cfg = Descent.gd(steps=8, step_size=0.05, momentum=0.9, nesterov=True, tol=1e-3)
    mc = m.to("cuda")
    route = pyebm.explain(mc, x.cuda(), cfg, 6, init=y0.cuda())
    assert (route.path, route.backend) == ("whole loop", "cuda"), route
    got = minimize(mc, x.cuda(), candidates=6, config=cfg, init=y0.cuda(), whole_loop=True)
    per_step = minimize(mc, x.cuda(), candidates=6, config=cfg, init=y0.cuda(), whole_loop=False, backend="torch")
    torch.testing.assert_close(got.y, per_step.y, rtol=0, atol=1e-10)
    assert torch.equal(got.steps, per_step.steps) and torch.equal(got.status, per_step.status)


@pytest.mark.gpu
@needs_cuda_op
def test_cuda_opcheck_and_bad_input():
    args = make_case(2, 3, 4, (8, 8), "tanh", True, torch.float32, OPTS["nesterov"])
    cuda = {k: (v.cuda() if isinstance(v, torch.Tensor) else [t.cuda() for t in v] if isinstance(v, list) else v)
            for k, v in args.items()}
    torch.library.opcheck(torch.ops.pyebm.mlp_descent.default, tuple(cuda[k] for k in ORDER))
    a = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in update_args({}, torch.float32).items()}
    torch.library.opcheck(torch.ops.pyebm.descent_update.default, tuple(a[k] for k in UPDATE_ORDER))
    bad = dict(cuda, noise_mode="langevin", noise=torch.randn(7, 2, 3, 4))
    with pytest.raises(RuntimeError, match="noise must be on"):
        with torch.no_grad():
            torch.ops.pyebm.mlp_descent(*[bad[k] for k in ORDER])
    a["E"] = a["E"].cpu()
    with pytest.raises(RuntimeError, match="E must be a contiguous tensor on"):
        torch.ops.pyebm.descent_update(*[a[k] for k in UPDATE_ORDER])
