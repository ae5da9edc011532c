"""Whole-loop descent for ``MLPEnergy``: every step of energy, input gradient and update in one call.

``torch.ops.pyebm.mlp_descent`` (C++ on CPU, CUDA on GPU) runs all ``config.steps`` steps of a block of candidate rows
back to back while the rows stay in cache, then the final energy pass. The update rule is exactly
``pyebm.ops.descent.descent_update`` (same order of operations, same per-candidate early exit, same
status codes). Noise is drawn with the caller's generator, one ``randn`` of y's shape per step, in the
order the per-step path draws it, so both paths give the same numbers for the same seed.

``minimize`` picks this path automatically (``whole_loop_backend``) when the energy is an MLPEnergy and
the config uses only what the op implements: method "gd", the Euler integrator, no normalisation or
projection, no accept-if-lower, early exit on the gradient norm per candidate, post-gradient noise,
no trajectory recording. Everything else runs the per-step path.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from pyebm import _backend

_HAS_CPU_OP = _backend.ext() is not None and hasattr(torch.ops.pyebm, "mlp_descent")
_DescentRule = getattr(_backend.ext(), "DescentRule", None)

def config_supported(cfg) -> bool:
    """Whether the whole-loop op implements every option of ``cfg``."""
    return (cfg.method == "gd" and cfg.integrator == "euler" and cfg.normalize is None and cfg.project is None
            and not cfg.accept_if_lower and cfg.noise in ("none", "langevin", "step", "additive")
            and (cfg.tol == 0 or (cfg.tol_on == "grad_norm" and cfg.tol_scope == "candidate")))


def whole_loop_backend(model, cfg, y0: torch.Tensor, record: bool, backend: Optional[str]) -> Optional[str]:
    """The backend whose whole-loop op runs this minimisation, or None (per-step path)."""
    from pyebm.energy import MLPEnergy

    if record or not isinstance(model, MLPEnergy) or not config_supported(cfg):
        return None
    name = _backend.resolve(y0.device, backend or model.backend, ("torch", "cpu", "triton", "cuda"))
    if name in ("cpu", "cuda") and _HAS_CPU_OP and y0.device.type == name \
            and y0.dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        return name  # "cuda": resolve() has checked that the extension was built with CUDA
    if name == "triton" and y0.dtype in (torch.float32, torch.bfloat16, torch.float16):
        try:
            from pyebm.ops import descent_triton  # noqa: F401
        except ImportError:
            return None
        return "triton" if hasattr(torch.ops.pyebm, "mlp_descent_triton") else None
    return None


@functools.lru_cache(maxsize=64)
def _schedules_cached(cfg):
    eta = torch.tensor([cfg.step_size_at(k) for k in range(cfg.steps)], dtype=torch.float64)
    nlev = torch.tensor([cfg.noise_level_at(k) for k in range(cfg.steps)], dtype=torch.float64)
    return eta, nlev


def _schedules(cfg, device):
    """Per-step step sizes and noise levels (host float64 tensors), computed once per config."""
    try:
        return _schedules_cached(cfg)
    except TypeError:  # a config holding something unhashable: compute it afresh
        return _schedules_cached.__wrapped__(cfg)


def _rule_options(cfg) -> dict:
    """The update-rule options of ``cfg`` as the whole-loop ops (and ``pyebm._C.DescentRule``) take them."""
    return dict(grad_scale=float(cfg.grad_scale), momentum=float(cfg.momentum), nesterov=bool(cfg.nesterov),
                grad_clip=cfg.grad_clip, grad_clip_norm=cfg.grad_clip_norm,
                energy_scaled=cfg.step_schedule == "energy", energy_temperature=float(cfg.energy_temperature),
                tol=float(cfg.tol), tol_final_step=bool(cfg.tol_final_step),
                bound_each_step=bool(cfg.bound_each_step), noise_mode=cfg.noise)


def _event_flat(t: Optional[torch.Tensor], D: int) -> Optional[torch.Tensor]:
    return None if t is None else t.reshape(D)


def run_whole_loop(model, ctx, cfg, *, y0: torch.Tensor, mask: Optional[torch.Tensor], lower, upper, step_clip,
                   generator, backend: str):
    """Run the whole loop on ``backend`` ("cpu", "cuda" or "triton"); returns (y, E_final, E_init, steps, status)
    with y shaped like y0."""
    B, K = y0.shape[:2]
    D = y0[0, 0].numel()
    y0f = y0.reshape(B, K, D)
    maskf = None if mask is None else mask.reshape(B, K, D)
    w_in, weights, biases, w_out, b_out = model.op_params()
    eta, nlev = _schedules(cfg, y0.device)
    common = _rule_options(cfg)
    lo, hi, sc = _event_flat(lower, D), _event_flat(upper, D), _event_flat(step_clip, D)
    prev = torch.is_grad_enabled()
    torch._C._set_grad_enabled(False)
    try:
        if backend in ("cpu", "cuda"):  # the same op; the dispatcher picks the device's kernel
            noise = None
            if cfg.noise != "none":
                noise = torch.empty((cfg.steps,) + tuple(y0.shape), device=y0.device, dtype=y0.dtype)
                for k in range(cfg.steps):  # one draw of y's shape per step: the per-step path's order
                    noise[k].normal_(generator=generator)
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


# -- the cpu plan's whole loop (MLPEnergy.cpu_plan().descent) ------------------------------------------

_RULES: dict = {}


def plan_rule(cfg, dtype: torch.dtype, D: int):
    """The compiled update rule (``pyebm._C.DescentRule``) for ``cfg`` on candidates [.., D] of ``dtype``,
    built once per config object; None when the plan's whole loop does not implement ``cfg``."""
    entry = _RULES.get(id(cfg))
    if entry is None or entry[0] is not cfg:
        if len(_RULES) >= 256:
            _RULES.clear()
        entry = _RULES[id(cfg)] = (cfg, {})  # holding cfg keeps its id from being reused
    rules = entry[1]
    key = (dtype, D)
    try:
        return rules[key]
    except KeyError:
        pass
    rule = None
    if _DescentRule is not None and config_supported(cfg) and cfg.selection in ("min", "max", "max_gap"):
        from pyebm.descent import _event_option

        try:
            opts = [_event_option(name, getattr(cfg, name), (D,), "cpu", dtype)
                    for name in ("lower", "upper", "step_clip")]
        except ValueError:
            opts = None  # not broadcastable to [D]: the general path reports it
        if opts is not None:
            eta, nlev = _schedules(cfg, "cpu")
            rule = _DescentRule(eta=eta.tolist(), noise_level=nlev.tolist(), **_rule_options(cfg), lower=opts[0],
                                upper=opts[1], step_clip=opts[2], selection=cfg.selection)
    rules[key] = rule
    return rule
