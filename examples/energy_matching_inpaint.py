"""Inpainting with the Energy Matching sampler on a small trained energy: 8x8 glyph images, top half observed.

    python examples/energy_matching_inpaint.py [--out inpaint.png] [--train-seconds 45] [--seed 0] [--threads N]

The data: the ten digits of a 5x7 bitmap font, placed in an 8x8 image at a random offset, with a slight
blur and pixel noise, scaled to [-1, 1] (a synthetic stand-in for 8x8 digit scans; nothing is downloaded).
The energy: an MLP V(y) on the 64 pixels, trained by denoising score matching over noise levels 0.1-1
(dV/dy matches the noise / sigma^2 of a noised image; this is not Energy Matching's own training objective,
only a quick way to get an energy whose wells are the glyphs). Training stops after --train-seconds.

Inpainting: for held-out images the top four rows are observed. ``pyebm.minimize`` runs
``Descent.energy_matching`` (Heun on the Stratonovich form, eps(t) 0 before t = 1, then eps_max) from
N(0, I) in the unobserved pixels, with ``mask`` clamping the observed ones at every step, and returns
``snapshots`` of the one trajectory at several T. The figure shows, for each image: the truth, the
observation, and the state at each T (the last one clamped to [-1, 1]). Prints the error of the filled-in
half against the truth and against filling it with the training mean.
"""
from __future__ import annotations

import argparse
import math
import time

import torch
from torch import nn

import pyebm
from pyebm import Descent

FONT = {  # 5 wide x 7 high
    0: ["01110", "10001", "10011", "10101", "11001", "10001", "01110"],
    1: ["00100", "01100", "00100", "00100", "00100", "00100", "01110"],
    2: ["01110", "10001", "00001", "00010", "00100", "01000", "11111"],
    3: ["11110", "00001", "00001", "01110", "00001", "00001", "11110"],
    4: ["00010", "00110", "01010", "10010", "11111", "00010", "00010"],
    5: ["11111", "10000", "11110", "00001", "00001", "10001", "01110"],
    6: ["00110", "01000", "10000", "11110", "10001", "10001", "01110"],
    7: ["11111", "00001", "00010", "00100", "01000", "01000", "01000"],
    8: ["01110", "10001", "10001", "01110", "10001", "10001", "01110"],
    9: ["01110", "10001", "10001", "01111", "00001", "00010", "01100"],
}
GLYPHS = torch.tensor([[[float(c) for c in row] for row in FONT[d]] for d in range(10)])  # [10, 7, 5]


def glyph_images(n: int, g: torch.Generator) -> torch.Tensor:
    """n images [n, 8, 8] in [-1, 1]: a random digit at a random offset, blurred a little, with pixel noise."""
    digits = torch.randint(0, 10, (n,), generator=g)
    dx = torch.randint(0, 4, (n,), generator=g)
    dy = torch.randint(0, 2, (n,), generator=g)
    img = torch.zeros(n, 8, 8)
    for i in range(n):
        img[i, dy[i]:dy[i] + 7, dx[i]:dx[i] + 5] = GLYPHS[digits[i]]
    kernel = torch.tensor([[0.05, 0.1, 0.05], [0.1, 0.4, 0.1], [0.05, 0.1, 0.05]]).view(1, 1, 3, 3)
    img = torch.nn.functional.conv2d(img.unsqueeze(1), kernel, padding=1).squeeze(1) / 0.8
    img = img + 0.03 * torch.randn(img.shape, generator=g)
    return (2 * img - 1).clamp(-1, 1)


class PixelEnergy(nn.Module):
    """V(y) for images y [..., 8, 8]: an MLP on the 64 pixels plus a weak quadratic confinement."""

    def __init__(self, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, 1))

    def potential(self, y: torch.Tensor) -> torch.Tensor:
        flat = y.flatten(-2)
        return self.net(flat).squeeze(-1) + 0.05 * flat.square().sum(-1)

    def forward(self, context, y: torch.Tensor) -> torch.Tensor:
        """The energy as pyebm takes it: y [B, K, 8, 8] -> [B, K] (context unused)."""
        return self.potential(y)


def train(model: PixelEnergy, data: torch.Tensor, seconds: float, steps: int, g: torch.Generator) -> int:
    """Denoising score matching over sigma in [0.1, 1] (log-uniform), weighted by sigma^2."""
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    t0 = time.perf_counter()
    done = 0
    for done in range(1, steps + 1):
        x = data[torch.randint(0, data.shape[0], (256,), generator=g)]
        sigma = torch.exp(torch.empty(256, 1, 1).uniform_(math.log(0.1), math.log(1.0), generator=g))
        n = torch.randn(x.shape, generator=g)
        y = (x + sigma * n).requires_grad_(True)
        (grad,) = torch.autograd.grad(model.potential(y).sum(), y, create_graph=True)   # training only
        loss = ((sigma * grad - n) ** 2).flatten(1).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if time.perf_counter() - t0 > seconds:
            break
    return done


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="energy_matching_inpaint.png", help="where to write the figure (PNG)")
    ap.add_argument("--train-seconds", type=float, default=45.0, help="training time limit (seconds)")
    ap.add_argument("--train-steps", type=int, default=2000, help="training steps at most")
    ap.add_argument("--images", type=int, default=8, help="held-out images to inpaint (rows of the figure)")
    ap.add_argument("--steps", type=int, default=300, help="sampler steps of dt = 0.01 (T = steps / 100)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    data = glyph_images(4000, g)
    model = PixelEnergy()
    t0 = time.perf_counter()
    n_steps = train(model, data, args.train_seconds, args.train_steps, g)
    print(f"trained {n_steps} steps in {time.perf_counter() - t0:.1f} s")
    model.requires_grad_(False)

    truth = glyph_images(args.images, g)                            # held out: drawn after the training set
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[:4] = True                                                 # the top four rows are observed
    B = args.images
    init = torch.where(mask, truth, torch.randn(B, 8, 8, generator=g)).unsqueeze(1)   # [B, 1, 8, 8]
    steps, dt = args.steps, 0.01
    cfg = Descent.energy_matching(steps=steps, dt=dt, epsilon_max=0.02, tau_star=1.0)
    snaps = sorted({0, steps // 6, steps // 3, (2 * steps) // 3, steps})
    t0 = time.perf_counter()
    res = pyebm.minimize(model, B, 1, cfg, init=init, mask=mask, generator=args.seed, snapshots=snaps,
                         final_energy=False)
    print(f"sampled {B} images, {steps} Heun steps, in {time.perf_counter() - t0:.2f} s")
    filled = res.y[:, 0]
    assert torch.equal(filled[:, mask], truth[:, mask])            # observed pixels never moved
    err = (filled[:, ~mask] - truth[:, ~mask]).square().mean().sqrt()
    base = (data.mean(0)[~mask].expand(B, -1) - truth[:, ~mask]).square().mean().sqrt()
    print(f"RMS error of the filled-in half: {err:.3f} (filling with the training mean: {base:.3f})")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    observed = torch.where(mask, truth, torch.zeros(B, 8, 8))
    cols = [("truth", truth), ("observed", observed)] + [
        (f"T = {s * dt:g}", res.snapshots[i, :, 0]) for i, s in enumerate(snaps)]
    fig, axes = plt.subplots(B, len(cols), figsize=(1.0 * len(cols), 1.0 * B + 0.3), squeeze=False)
    for j, (title, imgs) in enumerate(cols):
        axes[0, j].set_title(title, fontsize=7)
        for i in range(B):
            axes[i, j].imshow(imgs[i].clamp(-1, 1).numpy(), cmap="gray", vmin=-1, vmax=1)
            axes[i, j].axis("off")
    fig.tight_layout(pad=0.2)
    fig.savefig(args.out, dpi=60)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
