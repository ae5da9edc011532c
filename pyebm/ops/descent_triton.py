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
TRITON_INTERPRET=1 set before the kernels are imported. Inference ops: no autograd formula (a backward through
them raises). Argument checks: ``check_update`` / ``check_loop`` (``pyebm.ops._checks``), which the fakes in
``pyebm.ops._fake`` run as well.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from pyebm import _backend
from pyebm.ops import _checks

NOISE_MODES = _checks.NOISE_MODES


def _kernels():
    if _backend.triton is None:
        raise RuntimeError(f"pyebm: the triton backend is not usable: {_backend.backends().why['triton']}")
    from pyebm._kernels import descent as kernels

    return kernels


def _check_device(op: str, t: Tensor, what: str) -> None:
    if t.device.type == "cpu" and not _backend.triton_interpret():
        raise ValueError(f"{op}: the triton backend on CPU tensors needs TRITON_INTERPRET=1 ({what} is on CPU)")


def check_update(y, g, E, active, steps, status, velocity, pending, noise, mask, fixed, lower, upper, step_clip, eta,
                 noise_level, noise_mode, grad_scale, momentum, grad_clip, grad_clip_norm, energy_temperature, tol,
                 tol_final_step, y_base, fake: bool = False) -> None:
    """The arguments of descent_update_triton (its fake runs this too, without the value checks)."""
    op = "pyebm::descent_update_triton"
    N, D = _checks.descent_update_args(op, y, g, E, active, steps, status, velocity, pending, noise, mask, fixed,
                                       lower, upper, step_clip, noise_mode, momentum, tol, tol_final_step, y_base,
                                       triton=True)
    _checks.rule(momentum, grad_clip, grad_clip_norm, energy_temperature, tol)
    _checks.step_scalars(op, eta, noise_level, grad_scale)
    if not fake:
        _check_device(op, y, "y")
        _checks.event_values(op, lower, upper, step_clip, D)


def check_loop(ctx, y0, w_in, weights, biases, w_out, b_out, activation, eta, noise_level, lower, upper, step_clip,
               mask, grad_scale, momentum, grad_clip, grad_clip_norm, energy_temperature, tol, noise_mode,
               fake: bool = False) -> None:
    """The arguments of mlp_descent_triton (its fake runs this too, without the value checks)."""
    op = "pyebm::mlp_descent_triton"
    _, _, _, D = _checks.mlp_descent_args(op, ctx, y0, w_in, weights, biases, w_out, b_out, activation, eta,
                                          noise_level, None, lower, upper, step_clip, mask, noise_mode, momentum,
                                          grad_clip, grad_clip_norm, energy_temperature, tol, grad_scale)
    if y0.dtype not in _checks.TRITON_DTYPES:
        raise TypeError(f"{op}: the triton backend takes y0 as float32, bfloat16 or float16; got {y0.dtype}")
    if not fake:
        _check_device(op, y0, "y0")
        _checks.schedule_values(op, "eta", eta)
        _checks.schedule_values(op, "noise_level", noise_level, non_negative=True)
        _checks.event_values(op, lower, upper, step_clip, D)


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
    check_update(y, g, E, active, steps, status, velocity, pending, noise, mask, fixed, lower, upper, step_clip, eta,
                 noise_level, noise_mode, grad_scale, momentum, grad_clip, grad_clip_norm, energy_temperature, tol,
                 tol_final_step, y_base)
    _kernels().launch_update(
        y, g, E, active, steps, status, velocity, pending, noise, mask, fixed, lower, upper, step_clip,
        float(eta), float(noise_level), noise_mode, float(grad_scale), float(momentum),
        None if grad_clip is None else float(grad_clip), None if grad_clip_norm is None else float(grad_clip_norm),
        bool(energy_scaled), float(energy_temperature), float(tol), bool(tol_final_step), bool(bound_each_step),
        y_base=y_base)


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
    check_loop(ctx, y0, w_in, weights, biases, w_out, b_out, activation, eta, noise_level, lower, upper, step_clip,
               mask, grad_scale, momentum, grad_clip, grad_clip_norm, energy_temperature, tol, noise_mode)
    return _kernels().mlp_descent(
        ctx, y0, w_in, weights, biases, w_out, b_out, activation, residual, eta, noise_level, lower, upper,
        step_clip, mask, float(grad_scale), float(momentum), bool(nesterov),
        None if grad_clip is None else float(grad_clip), None if grad_clip_norm is None else float(grad_clip_norm),
        bool(energy_scaled), float(energy_temperature), float(tol), bool(tol_final_step), bool(bound_each_step),
        noise_mode, int(seed))
