"""Triton backend of the descent ops, as torch.library custom ops (kernels: ``pyebm._kernels.descent``).

``torch.ops.pyebm.descent_update_triton`` - one fused descent step over N rows, in place. Same arguments
and semantics as the C++ op ``pyebm::descent_update`` (and as ``pyebm.ops.descent.descent_update`` with
``tol_on="grad_norm"``, ``tol_scope="candidate"``, no ``out``/``dry_run``/``finite_also``/``E_prev``),
plus an optional ``y_base`` (the state the step starts from when pre-evaluation transforms moved it):

    descent_update_triton(Tensor(a!) y, Tensor g, Tensor E, Tensor(c!) active, Tensor(d!) steps,
        Tensor(e!) status, Tensor(f!)? velocity, Tensor(g!)? pending, Tensor? noise, Tensor? mask,
        Tensor? fixed, Tensor? lower, Tensor? upper, Tensor? step_clip, float eta, float noise_level,
        str noise_mode, float grad_scale, float momentum, float? grad_clip, float? grad_clip_norm,
        bool energy_scaled, float energy_temperature, float tol, bool tol_final_step,
        bool bound_each_step, Tensor? y_base=None) -> ()

  y [N, D] (written for rows that move), g [N, D] (read only, unlike the C++ op), E [N], active [N] bool,
  steps [N] int32, status [N] int8, velocity [N, D] (needed when momentum > 0), pending [N] bool (needed
  when tol > 0 and tol_final_step), noise [N, D] standard normals (needed unless noise_mode "none"),
  mask [N, D] bool with fixed [N, D], lower/upper/step_clip [D] or one value, y_base [N, D].

``torch.ops.pyebm.mlp_descent_triton`` - every step of descent on the MLP energy in one launch:

    mlp_descent_triton(Tensor ctx, Tensor y0, Tensor w_in, Tensor[] weights, Tensor[] biases,
        Tensor w_out, Tensor b_out, str activation, bool residual, Tensor eta, Tensor noise_level,
        Tensor? lower, Tensor? upper, Tensor? step_clip, Tensor? mask, float grad_scale, float momentum,
        bool nesterov, float? grad_clip, float? grad_clip_norm, bool energy_scaled,
        float energy_temperature, float tol, bool tol_final_step, bool bound_each_step, str noise_mode,
        int seed) -> (Tensor y, Tensor E_final, Tensor E_init, Tensor steps, Tensor status)

  The arguments of the CPU op ``pyebm::mlp_descent`` in the same order, except that the noise comes from
  ``seed`` (Philox in the kernel, keyed by seed and (step, row, column)) instead of a pre-drawn tensor.
  eta, noise_level [T] (T = steps, any float dtype and device: the schedules' values per step; float64
  keeps the per-step coefficients rounded exactly as the per-step path rounds them). mask [B, K, D] bool:
  clamped coordinates keep y0's values. Returns y [B, K, D] and E_final, E_init [B, K] in y0's dtype,
  steps [B, K] int32, status [B, K] int8 (0 max steps, 1 converged, 2 non-finite).

dtypes: float32, bfloat16, float16 (all update arithmetic in fp32). CUDA tensors, or CPU tensors with
TRITON_INTERPRET=1 set before the kernels are imported. Inference ops: no autograd.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from pyebm import _backend
from pyebm.ops.mlp_energy import _check_args

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
NOISE_MODES = ("none", "langevin", "step", "additive")


def _kernels():
    if _backend.triton is None:
        raise RuntimeError(f"pyebm: the triton backend is not usable: {_backend.backends().why['triton']}")
    from pyebm._kernels import descent as kernels

    return kernels


def _check_device(t: Tensor, what: str) -> None:
    if t.device.type == "cpu" and not _backend.triton_interpret():
        raise ValueError(f"pyebm: the triton backend on CPU tensors needs TRITON_INTERPRET=1 ({what} is on CPU)")


def _check_scalars(momentum, grad_clip, grad_clip_norm, energy_temperature, tol, noise_mode) -> None:
    if noise_mode not in NOISE_MODES:
        raise ValueError(f"pyebm: noise_mode must be one of {', '.join(NOISE_MODES)}; got {noise_mode!r}")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"pyebm: momentum must be in [0, 1); got {momentum}")
    if grad_clip is not None and not grad_clip > 0:
        raise ValueError(f"pyebm: grad_clip must be > 0; got {grad_clip}")
    if grad_clip_norm is not None and not grad_clip_norm > 0:
        raise ValueError(f"pyebm: grad_clip_norm must be > 0; got {grad_clip_norm}")
    if not energy_temperature > 0:
        raise ValueError(f"pyebm: energy_temperature must be > 0; got {energy_temperature}")
    if not tol >= 0:
        raise ValueError(f"pyebm: tol must be >= 0; got {tol}")


def _check_event(t: Optional[Tensor], name: str, D: int, like: Tensor) -> None:
    if t is None:
        return
    if not t.is_floating_point():
        raise TypeError(f"pyebm: {name} must be a floating tensor; got {t.dtype}")
    if t.numel() not in (1, D):
        raise ValueError(f"pyebm: {name} must hold 1 or D = {D} values; got shape {tuple(t.shape)}")
    if t.device != like.device:
        raise ValueError(f"pyebm: {name} is on {t.device} but y is on {like.device}")


def _need(t: Optional[Tensor], name: str, shape, dtype, like: Tensor, why: str = "") -> None:
    if t is None:
        raise ValueError(f"pyebm: {name} is required{why}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"pyebm: {name} must have shape {list(shape)}; got {list(t.shape)}")
    if t.dtype != dtype:
        raise TypeError(f"pyebm: {name} must be {dtype}; got {t.dtype}")
    if t.device != like.device:
        raise ValueError(f"pyebm: {name} is on {t.device} but y is on {like.device}")


# ------------------------------------------------------------------------------------------------
# fused per-step update
# ------------------------------------------------------------------------------------------------
@torch.library.custom_op("pyebm::descent_update_triton",
                         mutates_args=("y", "active", "steps", "status", "velocity", "pending"))
def descent_update_triton(y: Tensor, g: Tensor, E: Tensor, active: Tensor, steps: Tensor, status: Tensor,
                          velocity: Optional[Tensor], pending: Optional[Tensor], noise: Optional[Tensor],
                          mask: Optional[Tensor], fixed: Optional[Tensor], lower: Optional[Tensor],
                          upper: Optional[Tensor], step_clip: Optional[Tensor], eta: float, noise_level: float,
                          noise_mode: str, grad_scale: float, momentum: float, grad_clip: Optional[float],
                          grad_clip_norm: Optional[float], energy_scaled: bool, energy_temperature: float,
                          tol: float, tol_final_step: bool, bound_each_step: bool,
                          y_base: Optional[Tensor] = None) -> None:
    """One fused descent step over N rows (see the module docstring), in place."""
    if y.dim() != 2:
        raise ValueError(f"pyebm: y must be [N, D]; got shape {list(y.shape)}")
    if y.dtype not in _DTYPES:
        raise TypeError(f"pyebm: the triton backend takes y as float32, bfloat16 or float16; got {y.dtype}")
    _check_device(y, "y")
    N, D = y.shape
    _check_scalars(momentum, grad_clip, grad_clip_norm, energy_temperature, tol, noise_mode)
    _need(g, "g", (N, D), y.dtype, y)
    _need(E, "E", (N,), y.dtype, y)
    _need(active, "active", (N,), torch.bool, y)
    _need(steps, "steps", (N,), torch.int32, y)
    _need(status, "status", (N,), torch.int8, y)
    if momentum > 0:
        _need(velocity, "velocity", (N, D), y.dtype, y, " when momentum > 0")
    if tol > 0 and tol_final_step:
        _need(pending, "pending", (N,), torch.bool, y, " when tol > 0 and tol_final_step")
    if noise_mode != "none":
        _need(noise, "noise", (N, D), y.dtype, y, f" for noise_mode {noise_mode!r}")
    if mask is not None:
        _need(mask, "mask", (N, D), torch.bool, y)
        _need(fixed, "fixed", (N, D), y.dtype, y, " with mask")
    if y_base is not None:
        _need(y_base, "y_base", (N, D), y.dtype, y)
    for name, t in (("lower", lower), ("upper", upper), ("step_clip", step_clip)):
        _check_event(t, name, D, y)
    for name, t in (("active", active), ("steps", steps), ("status", status), ("E", E), ("pending", pending)):
        if t is not None and t.numel() > 1 and t.stride(0) != 1:
            raise ValueError(f"pyebm: {name} must be contiguous")
    for name, t in (("y", y), ("g", g), ("velocity", velocity), ("noise", noise), ("mask", mask),
                    ("fixed", fixed), ("y_base", y_base)):
        if t is not None and D > 1 and t.stride(1) != 1:
            raise ValueError(f"pyebm: {name} must have unit stride along D; got strides {t.stride()}")
    _kernels().launch_update(
        y, g, E, active, steps, status, velocity, pending, noise, mask, fixed, lower, upper, step_clip,
        float(eta), float(noise_level), noise_mode, float(grad_scale), float(momentum),
        None if grad_clip is None else float(grad_clip), None if grad_clip_norm is None else float(grad_clip_norm),
        bool(energy_scaled), float(energy_temperature), float(tol), bool(tol_final_step), bool(bound_each_step),
        y_base=y_base)


@descent_update_triton.register_fake
def _(y, g, E, active, steps, status, velocity, pending, noise, mask, fixed, lower, upper, step_clip, eta,
      noise_level, noise_mode, grad_scale, momentum, grad_clip, grad_clip_norm, energy_scaled, energy_temperature,
      tol, tol_final_step, bound_each_step, y_base=None):
    return None


# ------------------------------------------------------------------------------------------------
# whole loop for the MLP energy
# ------------------------------------------------------------------------------------------------
@torch.library.custom_op("pyebm::mlp_descent_triton", mutates_args=())
def mlp_descent_triton(ctx: Tensor, y0: Tensor, w_in: Tensor, weights: List[Tensor], biases: List[Tensor],
                       w_out: Tensor, b_out: Tensor, activation: str, residual: bool, eta: Tensor,
                       noise_level: Tensor, lower: Optional[Tensor], upper: Optional[Tensor],
                       step_clip: Optional[Tensor], mask: Optional[Tensor], grad_scale: float, momentum: float,
                       nesterov: bool, grad_clip: Optional[float], grad_clip_norm: Optional[float],
                       energy_scaled: bool, energy_temperature: float, tol: float, tol_final_step: bool,
                       bound_each_step: bool, noise_mode: str,
                       seed: int) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(y, E_final, E_init, steps, status) of all T = len(eta) steps in one launch (module docstring)."""
    _check_args(ctx, y0, w_in, weights, biases, w_out, b_out, activation)
    if y0.dtype not in _DTYPES:
        raise TypeError(f"pyebm: the triton backend takes y0 as float32, bfloat16 or float16; got {y0.dtype}")
    _check_device(y0, "y0")
    _check_scalars(momentum, grad_clip, grad_clip_norm, energy_temperature, tol, noise_mode)
    B, K, D = y0.shape
    if eta.dim() != 1 or eta.numel() < 1 or not eta.is_floating_point():
        raise ValueError(f"pyebm: eta must be a floating [steps] tensor with steps >= 1; got shape "
                         f"{list(eta.shape)}, dtype {eta.dtype}")
    if noise_level.dim() != 1 or noise_level.numel() != eta.numel() or not noise_level.is_floating_point():
        raise ValueError(f"pyebm: noise_level must be a floating [steps] = [{eta.numel()}] tensor; got shape "
                         f"{list(noise_level.shape)}, dtype {noise_level.dtype}")
    for name, t in (("lower", lower), ("upper", upper), ("step_clip", step_clip)):
        _check_event(t, name, D, y0)
    if mask is not None:
        _need(mask, "mask", (B, K, D), torch.bool, y0)
    return _kernels().mlp_descent(
        ctx, y0, w_in, weights, biases, w_out, b_out, activation, residual, eta, noise_level, lower, upper,
        step_clip, mask, float(grad_scale), float(momentum), bool(nesterov),
        None if grad_clip is None else float(grad_clip), None if grad_clip_norm is None else float(grad_clip_norm),
        bool(energy_scaled), float(energy_temperature), float(tol), bool(tol_final_step), bool(bound_each_step),
        noise_mode, int(seed))


@mlp_descent_triton.register_fake
def _(ctx, y0, w_in, weights, biases, w_out, b_out, activation, residual, eta, noise_level, lower, upper,
      step_clip, mask, grad_scale, momentum, nesterov, grad_clip, grad_clip_norm, energy_scaled, energy_temperature,
      tol, tol_final_step, bound_each_step, noise_mode, seed):
    B, K, D = y0.shape
    return (y0.new_empty(B, K, D), y0.new_empty(B, K), y0.new_empty(B, K),
            y0.new_empty(B, K, dtype=torch.int32), y0.new_empty(B, K, dtype=torch.int8))
