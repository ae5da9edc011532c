"""Energy Matching sampling: pyebm against the public sampling loop's form, time per step, on a small UNet-style
energy.

    python bench/bench_energy_matching.py [--sizes tiny,small] [--steps 20] [--repeats 5] [--threads N]
                                          [--device cpu|cuda] [--no-compile]

The energy: a tiny UNet (a conv stem, one strided conv down, a conv, a transposed conv up, a skip connection
by concatenation, a conv out) followed by a head (global average pool, linear) to one number per image, as
the public CIFAR-10 models put a head on a UNet; random weights (only the time matters here).

Columns, all Heun's method on the Stratonovich form with the same eps(t) (``Descent.energy_matching``, noise
on from the start: tau_star = 0), the same number of steps and the same noise draws:

- ``public form``: the loop the public sampler runs through torchsde, written out: the drift is -dV/dx from
  ``torch.autograd.grad(..., create_graph=True)`` on a detached copy of x at every evaluation (two per step),
  under ``torch.no_grad`` outside it.
- ``pyebm``: ``pyebm.minimize(energy, B, 1, Descent.energy_matching(...), final_energy=False, compile=False)``
  with the energy as a plain ``f(x, y)`` module: autograd on y only, no second-order graph.
- ``pyebm compiled`` (unless ``--no-compile``): the same with ``compile=True``, chunks of 5 Heun steps as one
  ``torch.compile`` region each (``pyebm._compiled``); the compile (one chunk and the final pass, a minute or
  more on the CPU) happens before timing and its seconds are reported.

Every column must produce the public form's samples (checked before timing). Columns are timed round-robin
(one run of each per round); reports the median time per step (ms) over ``--repeats`` rounds and the ratios.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from typing import Callable, Dict, List

import torch
from torch import nn

import pyebm
from pyebm import Descent
from pyebm.bench.host import cpu_model

SIZES: Dict[str, dict] = {
    "tiny": dict(channels=1, side=8, width=8, batch=8),
    "small": dict(channels=1, side=16, width=16, batch=32),
    "medium": dict(channels=3, side=16, width=32, batch=64),
}


class TinyUNetEnergy(nn.Module):
    """V(x) for images x [N, C, H, W] (H, W even): a one-level UNet with a skip connection, then a head."""

    def __init__(self, channels: int, width: int):
        super().__init__()
        self.stem = nn.Conv2d(channels, width, 3, padding=1)
        self.down = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.mid = nn.Conv2d(2 * width, 2 * width, 3, padding=1)
        self.up = nn.ConvTranspose2d(2 * width, width, 2, stride=2)
        self.out = nn.Conv2d(2 * width, width, 3, padding=1)
        self.head = nn.Linear(width, 1)
        self.act = nn.SiLU()

    def potential(self, x: torch.Tensor) -> torch.Tensor:
        h0 = self.act(self.stem(x))
        h1 = self.act(self.mid(self.act(self.down(h0))))
        h = self.act(self.out(torch.cat([self.act(self.up(h1)), h0], dim=1)))
        return self.head(h.mean(dim=(2, 3))).squeeze(-1) + 0.5 * x.square().flatten(1).sum(1)

    def forward(self, context, y: torch.Tensor) -> torch.Tensor:
        """The energy as pyebm takes it: y [B, K, C, H, W] -> [B, K]."""
        B, K = y.shape[:2]
        return self.potential(y.reshape((B * K,) + tuple(y.shape[2:]))).view(B, K)


def public_form_sampler(model: TinyUNetEnergy, x0: torch.Tensor, steps: int, dt: float,
                        eps: Callable[[float], float], generator: torch.Generator) -> torch.Tensor:
    """The public sampler's loop: torchsde's Stratonovich Heun step with the drift from a velocity that calls
    autograd with create_graph=True at every evaluation; a final clamp to [-1, 1]."""
    def velocity(x):
        with torch.enable_grad():
            x = x.clone().detach().requires_grad_(True)
            V = model.potential(x)
            (dVdx,) = torch.autograd.grad(V, x, grad_outputs=torch.ones_like(V), create_graph=True)
            return -dVdx

    x = x0.clone()
    with torch.no_grad():
        for k in range(steps):
            xi = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            g0, g1 = math.sqrt(2 * eps(k * dt)), math.sqrt(2 * eps((k + 1) * dt))
            dW = math.sqrt(dt) * xi
            f0 = velocity(x)
            x1 = x + dt * f0 + g0 * dW
            f1 = velocity(x1)
            x = x + 0.5 * (dt * (f0 + f1) + g0 * dW + g1 * dW)
    return x.clamp(-1, 1)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _time(fn: Callable[[], object], device: str) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def run_size(name: str, steps: int, repeats: int, device: str, dt: float = 0.01, epsilon_max: float = 0.01,
             compiled: bool = True) -> dict:
    p = SIZES[name]
    torch.manual_seed(0)
    model = TinyUNetEnergy(p["channels"], p["width"]).to(device)
    B, event = p["batch"], (p["channels"], p["side"], p["side"])
    x0 = torch.randn((B,) + event, device=device)
    cfg = Descent.energy_matching(steps=steps, dt=dt, epsilon_max=epsilon_max, tau_star=0.0)

    def eps(t: float) -> float:  # tau_star = 0: a ramp from 0 to epsilon_max at t = 1, constant after
        return epsilon_max * min(t, 1.0)

    def public():
        return public_form_sampler(model, x0, steps, dt, eps, torch.Generator(device=device).manual_seed(1))

    def ours(compile: bool):
        return pyebm.minimize(model, B, 1, cfg, init=x0.unsqueeze(1), generator=1, final_energy=False,
                              compile=compile).y[:, 0]

    columns = {"public": public, "pyebm": lambda: ours(False)}
    want = public()
    out = dict(size=name, shape=f"B={B} {list(event)} width {p['width']}", steps=steps, compile_s=None)
    t0 = time.perf_counter()
    if compiled:
        ours(True)  # the compile (and its first run)
        out["compile_s"] = time.perf_counter() - t0
        columns["compiled"] = lambda: ours(True)
    for col, fn in columns.items():
        if col == "public":
            continue
        got = fn()
        diff = float((want - got).abs().max())
        if not torch.allclose(want, got, rtol=1e-4, atol=1e-5):
            raise AssertionError(f"{name}: pyebm ({col}) and the public form disagree (max |diff| {diff:.3g})")
        out[f"{col}_diff"] = diff
    samples: Dict[str, List[float]] = {col: [] for col in columns}
    for col, fn in columns.items():  # warm-up
        fn()
    for _ in range(repeats):  # round-robin: load on the host slows every column of a round alike
        for col, fn in columns.items():
            samples[col].append(_time(fn, device))
    for col, ts in samples.items():
        out[f"{col}_ms"] = 1e3 * statistics.median(ts) / steps
    out["ratio"] = out["public_ms"] / out["pyebm_ms"]
    if compiled:
        out["compiled_ratio"] = out["public_ms"] / out["compiled_ms"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="tiny,small", help=f"comma-separated from {', '.join(SIZES)}")
    ap.add_argument("--steps", type=int, default=20, help="sampler steps per run (the same for both)")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per column (median reported)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--no-compile", action="store_true",
                    help="without the compiled column (minimize(..., compile=True): a compile of a minute or more "
                         "per size on the CPU)")
    args = ap.parse_args(argv)
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    for s in sizes:
        if s not in SIZES:
            ap.error(f"unknown size {s!r}; choose from {', '.join(SIZES)}")
    if args.steps < 1 or args.repeats < 1:
        ap.error("--steps and --repeats must be >= 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda but no CUDA device is available")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# bench_energy_matching: {cpu_model()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, device {args.device}, Heun, dt 0.01, {args.steps} steps, "
          f"median of {args.repeats} rounds (columns round-robin)")
    print()
    if args.no_compile:
        print("| size | shape | public form ms/step | pyebm ms/step | public / pyebm | max abs diff |")
        print("|---|---|---:|---:|---:|---:|")
    else:
        print("| size | shape | public form ms/step | pyebm ms/step | public / pyebm | pyebm compiled ms/step "
              "| public / compiled | compile s | max abs diff |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for s in sizes:
        print(f"measuring {s}", file=sys.stderr)
        r = run_size(s, args.steps, args.repeats, args.device, compiled=not args.no_compile)
        row = f"| {r['size']} | {r['shape']} | {r['public_ms']:.2f} | {r['pyebm_ms']:.2f} | {r['ratio']:.2f}x "
        diff = r["pyebm_diff"]
        if not args.no_compile:
            row += f"| {r['compiled_ms']:.2f} | {r['compiled_ratio']:.2f}x | {r['compile_s']:.0f} "
            diff = max(diff, r["compiled_diff"])
        print(row + f"| {diff:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
