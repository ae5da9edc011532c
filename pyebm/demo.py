"""``pyebm demo``: train a small energy model on a multimodal task, then find its modes by batched descent.

The task: a context c in [-1, 1] rotates three targets on a circle of radius 1.2 (angles pi/2 c + 0,
2pi/3, 4pi/3); a sample picks target i with probability 0.55 / 0.30 / 0.15 and adds N(0, 0.08^2) noise.
An ``MLPEnergy`` is trained with the InfoNCE loss of implicit behavioural cloning (the true target against
uniform negatives in the box), so exp(-E) approximates the mixture: three wells, the deepest at the most
likely target. Inference runs ``Descent.ibc_langevin`` on K candidates per context, all contexts at once,
through the fused per-step path and through the eager reference loop (autograd per step, as the original
implementations run it), checks they agree, reports what was found against the truth, times both, and
draws the energy landscapes with the candidates' trajectories.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
from typing import Callable, List

import torch

WEIGHTS = (0.55, 0.30, 0.15)
RADIUS, NOISE, BOX = 1.2, 0.08, 2.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="pyebm_demo.png", help="where to save the landscape figure (PNG)")
    parser.add_argument("--quick", action="store_true", help="a few seconds: tiny training, one timing repeat")
    parser.add_argument("--train-steps", type=int, default=None, help="training steps (default 2000; quick 400)")
    parser.add_argument("--train-seconds", type=float, default=None,
                        help="stop training after this many seconds even if steps remain (default 25; quick 8)")
    parser.add_argument("--candidates", type=int, default=128, help="candidates per context for the timing run")
    parser.add_argument("--steps", type=int, default=50, help="descent steps")
    parser.add_argument("--backend", default=None, help="backend of the fused path (default: auto)")
    parser.add_argument("--seed", type=int, default=0)


# -- the task ---------------------------------------------------------------------------------------

def centers(c: torch.Tensor) -> torch.Tensor:
    """True target positions [B, 3, 2] for contexts c [B]."""
    ang = (math.pi / 2) * c[:, None] + torch.tensor([0.0, 2 * math.pi / 3, 4 * math.pi / 3], dtype=c.dtype)
    return RADIUS * torch.stack([ang.cos(), ang.sin()], dim=-1)


def features(c: torch.Tensor) -> torch.Tensor:
    """The context the model sees: (cos, sin) of the rotation angle, [B, 2]."""
    return torch.stack([torch.cos(math.pi / 2 * c), torch.sin(math.pi / 2 * c)], dim=-1)


def sample(n: int, g: torch.Generator):
    c = torch.rand(n, generator=g) * 2 - 1
    comp = torch.multinomial(torch.tensor(WEIGHTS), n, replacement=True, generator=g)
    y = centers(c)[torch.arange(n), comp] + NOISE * torch.randn(n, 2, generator=g)
    return c, y


# -- progress ---------------------------------------------------------------------------------------

class _Progress:
    """rich progress bar when rich is installed, plain lines otherwise."""

    def __init__(self, total: int, label: str):
        self.total, self.label = total, label
        self._rich = None
        try:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self._rich = Progress(TextColumn("{task.description}"), BarColumn(),
                                  TextColumn("{task.completed}/{task.total}"),
                                  TextColumn("loss {task.fields[loss]:.3f}"), TimeElapsedColumn())
            self._task = self._rich.add_task(label, total=total, loss=float("nan"))
            self._rich.start()
        except ImportError:
            self._next = 0

    def update(self, step: int, loss: float) -> None:
        if self._rich is not None:
            self._rich.update(self._task, completed=step, loss=loss)
        elif step >= self._next or step == self.total:
            print(f"  {self.label}: step {step}/{self.total}  loss {loss:.3f}", flush=True)
            self._next = step + max(1, self.total // 10)

    def close(self) -> None:
        if self._rich is not None:
            self._rich.stop()


# -- training ---------------------------------------------------------------------------------------

def train(model, steps: int, batch: int, negatives: int, seconds: float, g: torch.Generator) -> tuple:
    """InfoNCE (IBC): -log softmax(-E)[true] over the true target and uniform negatives in the box."""
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    target = torch.zeros(batch, dtype=torch.long)
    bar = _Progress(steps, "training MLPEnergy")
    t0 = time.perf_counter()
    done, loss_v = 0, float("nan")
    try:
        for step in range(1, steps + 1):
            c, y = sample(batch, g)
            neg = (torch.rand(batch, negatives, 2, generator=g) * 2 - 1) * BOX
            E = model(features(c), torch.cat([y[:, None], neg], dim=1))
            loss = torch.nn.functional.cross_entropy(-E, target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            done, loss_v = step, loss.item()
            if step % 10 == 0 or step == steps:
                bar.update(step, loss_v)
            if time.perf_counter() - t0 > seconds:
                break
    finally:
        bar.close()
    return done, loss_v, time.perf_counter() - t0


# -- timing -----------------------------------------------------------------------------------------

def _median_time(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _table(rows: List[List[str]], header: List[str]) -> str:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(out)


# -- figure -----------------------------------------------------------------------------------------

def save_figure(path: str, model, cs: torch.Tensor, res, n_paths: int = 24) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(cs)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.5 * rows), squeeze=False)
    grid = torch.linspace(-BOX, BOX, 121)
    gx, gy = torch.meshgrid(grid, grid, indexing="xy")
    pts = torch.stack([gx.flatten(), gy.flatten()], dim=-1)
    with torch.no_grad():
        ctx = model.prepare(features(cs))
        E = model.energy(ctx, pts.expand(n, -1, -1).contiguous(), backend="torch")
    true = centers(cs)
    for b in range(n):
        ax = axes[b // cols][b % cols]
        Eb = E[b].reshape(gx.shape)
        lo, hi = float(Eb.min()), float(torch.quantile(Eb.flatten(), 0.6))   # resolve the wells, not the corners
        ax.contourf(gx, gy, Eb.clamp(max=hi), levels=torch.linspace(lo, hi, 25).tolist(), cmap="viridis")
        traj = res.trajectory_y[:, b, :n_paths]
        for k in range(traj.shape[1]):
            ax.plot(traj[:, k, 0], traj[:, k, 1], color="white", lw=0.6, alpha=0.7)
        ax.scatter(res.y[b, :, 0], res.y[b, :, 1], s=6, color="white", zorder=3)
        ax.scatter(true[b, :, 0], true[b, :, 1], s=[300 * w for w in WEIGHTS], marker="*", color="orange",
                   edgecolor="black", zorder=4, label="true targets (size = weight)")
        ax.scatter(res.best[b, 0], res.best[b, 1], s=80, marker="x", color="red", zorder=5, label="best")
        ax.set_title(f"c = {cs[b]:+.2f}   best E = {res.best_energy[b]:.2f}", fontsize=9)
        ax.set_xlim(-BOX, BOX)
        ax.set_ylim(-BOX, BOX)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    for b in range(n, rows * cols):
        axes[b // cols][b % cols].axis("off")
    axes[0][0].legend(loc="lower left", fontsize=6)
    fig.suptitle("pyebm demo: energy landscapes, candidate trajectories (white), truth (stars), best (x)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main -------------------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> int:
    import pyebm
    from pyebm.reference.descent import minimize_reference

    quick = args.quick
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    steps = args.train_steps if args.train_steps is not None else (400 if quick else 2000)
    seconds = args.train_seconds if args.train_seconds is not None else (8.0 if quick else 25.0)
    if steps < 1 or seconds <= 0 or args.candidates < 1 or args.steps < 1:
        raise SystemExit("pyebm demo: --train-steps, --train-seconds, --candidates and --steps must be positive")
    batch, negatives = (64, 31) if quick else (128, 63)
    print(f"pyebm {pyebm.__version__}: torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"backends: " + ", ".join(k for k, v in pyebm.backends().items() if v))
    print(f"task: 3 targets on a circle rotated by the context, weights {WEIGHTS}; "
          f"model MLPEnergy(2 -> 2, hidden (64, 64), silu)")
    model = pyebm.MLPEnergy(2, 2, hidden=(64, 64), activation="silu", backend=args.backend)
    done, loss, secs = train(model, steps, batch, negatives, seconds, g)
    note = "" if done == steps else f" (stopped by --train-seconds {seconds:g})"
    print(f"trained {done} steps in {secs:.1f} s, final InfoNCE loss {loss:.3f}{note}")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)

    # -- inference: all contexts and candidates in one batched descent --------------------------
    cfg = pyebm.Descent.ibc_langevin(lower=-BOX, upper=BOX, steps=args.steps, step_size=0.02, step_size_end=1e-4,
                                     noise_scale=0.5)
    cs = torch.tensor([-0.8, -0.25, 0.3, 0.9])
    x = features(cs)
    K = 64
    y0 = torch.empty(len(cs), K, 2).uniform_(-BOX, BOX, generator=g)
    t0 = time.perf_counter()
    res = pyebm.minimize(model, x, K, cfg, init=y0, generator=torch.Generator().manual_seed(1), record=True,
                         backend=args.backend, whole_loop=False)
    t_fused = time.perf_counter() - t0
    ref = minimize_reference(lambda y: model(x, y), y0, cfg, generator=torch.Generator().manual_seed(1))
    agree = (res.y - ref.y).abs().max().item()
    print(f"\nbatched descent: {len(cs)} contexts x {K} candidates, {cfg.steps} IBC Langevin steps "
          f"({t_fused * 1e3:.0f} ms); fused vs eager reference: max |dy| = {agree:.1e}")

    true = centers(cs)
    d = (res.y[:, :, None, :] - true[:, None]).norm(dim=-1)            # [B, K, 3]
    near = d.min(dim=-1).values < 0.25
    nearest = d.argmin(dim=-1)
    best_d = (res.best[:, None] - true).norm(dim=-1)                    # [B, 3]
    rows, best_heaviest = [], 0
    for b in range(len(cs)):
        counts = torch.bincount(nearest[b][near[b]], minlength=3).tolist()
        i = int(best_d[b].argmin())
        best_heaviest += int(i == 0 and best_d[b, 0] < 0.25)
        rows.append([f"{cs[b]:+.2f}",
                     " ".join(f"({true[b, j, 0]:+.2f},{true[b, j, 1]:+.2f})" for j in range(3)),
                     f"({res.best[b, 0]:+.2f},{res.best[b, 1]:+.2f})",
                     f"target {i} ({WEIGHTS[i]:.2f}), off by {best_d[b, i]:.3f}",
                     "/".join(map(str, counts)) + f" ({K - sum(counts)} elsewhere)"])
    print(_table(rows, ["context", "true targets (w = .55 .30 .15)", "best found", "best is",
                        "candidates per target"]))
    all_three = sum(int(torch.bincount(nearest[b][near[b]], minlength=3).min() > 0) for b in range(len(cs)))
    print(f"best candidate at the most likely target: {best_heaviest}/{len(cs)} contexts; "
          f"all three targets found in {all_three}/{len(cs)}")

    # -- latency: eager vs fused per step vs whole loop ----------------------------------------
    Bt, Kt = 16, args.candidates
    ct = torch.rand(Bt, generator=g) * 2 - 1
    xt = features(ct)
    yt = torch.empty(Bt, Kt, 2).uniform_(-BOX, BOX, generator=g)
    tcfg = cfg.replace(steps=10 if quick else 20)
    repeats = 1 if quick else 5
    T = tcfg.steps

    def eager():
        return minimize_reference(lambda y: model(xt, y), yt, tcfg, generator=torch.Generator().manual_seed(2))

    timings = [("eager autograd loop (reference)", _median_time(eager, repeats))]
    avail = pyebm.backends()
    per_step = [("torch", "pyebm per step, torch ops")]
    if avail.get("cpu"):
        per_step.append(("cpu", "pyebm per step, fused cpu op"))
    if args.backend not in (None, "torch", "cpu"):
        per_step.append((args.backend, f"pyebm per step, {args.backend}"))
    for be, label in per_step:
        fn = lambda be=be: pyebm.minimize(model, xt, Kt, tcfg, init=yt, generator=2, backend=be,  # noqa: E731
                                          whole_loop=False)
        timings.append((label, _median_time(fn, repeats)))
    eager_t = timings[0][1]
    rows = [[label, f"{t / T * 1e6:9.1f}", f"{t * 1e3:8.2f}", f"{eager_t / t:5.2f}x"] for label, t in timings]
    if pyebm.explain(model, xt, tcfg, Kt, init=yt, backend=args.backend).path in ("one call", "whole loop"):
        fn = lambda: pyebm.minimize(model, xt, Kt, tcfg, init=yt, generator=2, backend=args.backend,  # noqa: E731
                                    whole_loop=True)
        t = _median_time(fn, repeats)
        rows.append(["pyebm whole loop (one call)", f"{t / T * 1e6:9.1f}", f"{t * 1e3:8.2f}", f"{eager_t / t:5.2f}x"])
    else:
        rows.append(["pyebm whole loop (one call)", "not available", "-", "-"])
    print(f"\nlatency: {Bt} contexts x {Kt} candidates x {T} steps, median of {repeats} "
          f"({torch.get_num_threads()} threads; CPU timings, ratios are what carry over)")
    print(_table(rows, ["path", "us / step", "total ms", "vs eager"]))

    save_figure(args.out, model, cs, res)
    print(f"\nsaved the energy landscapes with candidate trajectories to {args.out}")
    return 0
