"""Whole-loop descent for ``MLPEnergy``: every step of energy, input gradient and update in one call.

``torch.ops.pyebm.mlp_descent`` (C++ on CPU, CUDA on GPU) runs all ``config.steps`` steps of a block of candidate rows
back to back while the rows stay in cache, then the final energy pass. The update rule is exactly
``pyebm.ops.descent.descent_update`` (same order of operations, same per-candidate early exit, same
status codes). Noise is drawn with the caller's generator, one ``randn`` of y's shape per step, in the
order the per-step path draws it, so both paths give the same numbers for the same seed.

``minimize`` takes this path (``MLPEnergy.run_whole_loop``) when ``pyebm._dispatch`` finds that the op
implements every option of the config (``MLPEnergy.whole_loop_spec``): method "gd", the Euler integrator,
no normalisation or projection, no accept-if-lower, early exit on the gradient norm per candidate,
post-gradient noise, no trajectory recording. Everything else runs the per-step path.
"""
from __future__ import annotations

from typing import Optional

import torch

from pyebm import _backend, _rng
from pyebm.config import rule_options, schedules_on

HAS_OP = _backend.ext() is not None and hasattr(torch.ops.pyebm, "mlp_descent")



def _event_flat(t: Optional[torch.Tensor], D: int) -> Optional[torch.Tensor]:
    return None if t is None else t.reshape(D)


def run(model, ctx, cfg, *, y0: torch.Tensor, mask: Optional[torch.Tensor], lower, upper, step_clip, generator,
        backend: str):
    """Run the whole loop of an MLPEnergy on ``backend`` ("cpu", "cuda" or "triton"); returns (y, E_final, E_init,
    steps, status) with y shaped like y0."""
    B, K = y0.shape[:2]
    D = y0[0, 0].numel()
    y0f = y0.reshape(B, K, D)
    maskf = None if mask is None else mask.reshape(B, K, D)
    w_in, weights, biases, w_out, b_out = model.op_params()
    eta, nlev = schedules_on(cfg, y0.device)  # on the candidates' device: no copy per call
    common = rule_options(cfg)
    lo, hi, sc = _event_flat(lower, D), _event_flat(upper, D), _event_flat(step_clip, D)
    prev = torch.is_grad_enabled()
    torch._C._set_grad_enabled(False)
    try:
        if backend in ("cpu", "cuda"):  # the same op; the dispatcher picks the device's kernel
            noise = None
            if cfg.noise != "none":
                # one draw of y's shape per step: the per-step path's order
                noise = _rng.draw("normal", y0.shape, generator, y0.device, y0.dtype, count=cfg.steps)
                noise = noise.view(cfg.steps, B, K, D)
            out = torch.ops.pyebm.mlp_descent.default(
                ctx, y0f, w_in, weights, biases, w_out, b_out, model.activation, model.residual, eta, nlev, noise,
                lo, hi, sc, maskf, **common)
        else:
            seed = int(torch.randint(0, 2**62, (1,), generator=generator, device="cpu").item()) \
                if generator is None or generator.device.type == "cpu" else \
                int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
            out = torch.ops.pyebm.mlp_descent_triton(
                ctx, y0f, w_in, weights, biases, w_out, b_out, model.activation, model.residual,
                eta, nlev, lo, hi, sc, maskf, seed=seed, **common)
    finally:
        torch._C._set_grad_enabled(prev)
    y, E_final, E_init, steps, status = out
    return y.view(y0.shape), E_final, E_init, steps, status
