"""Triton kernels of the descent update: one fused step for N rows, and the whole loop for the MLP energy.

``_descent_update_kernel`` does exactly what ``pyebm.ops.descent.descent_update`` does for N rows of D
values (its docstring gives the order of operations): finiteness check, gradient clip by value and by
L2 norm, early exit on ||g|| per candidate (with or without one final step), step size (scheduled or
energy-scaled), momentum, post-gradient noise from a given tensor, step clip, box bounds, clamped
coordinates, refusal of a non-finite proposal, and the active/steps/status/pending bookkeeping. One
program owns BLOCK_N rows; when a row fits in one BLOCK_D chunk (D <= 1024) the step is a single pass
with the row in registers; wider rows pass over their chunks for the sums (twice when the norm clip and
the tolerance both need them), then form the proposal twice: to learn whether the whole row is finite,
then to write it.

``_mlp_descent_kernel`` runs every step of the MLP energy for a tile of BLOCK_M candidate rows in one
launch: the energy and its input gradient through ``_mlp_tile`` (the layer loop of
``pyebm._kernels.mlp_energy``, the same packed weights), then the same update, T times, then the final
energy pass. The state y and the velocity v of the tile stay in the program's scratch area in fp32 for
all T steps; the gradient never leaves scratch. Noise is Philox (``tl.randn``) keyed by a per-call seed
and the offset ((k * N + row) * D + col): independent of block sizes and grid, so a result depends only
on the seed. A tile whose rows have all stopped skips the rest of its steps.

Numerics. All update arithmetic is fp32 (also for bf16/fp16 tensors, which are rounded once at the
store). Per-step scalar coefficients that torch forms in double before rounding to the tensor's dtype
(-grad_scale * eta, sqrt(2 eta n), ...) are formed the same way by the launchers (host doubles, or a
float64 table for the whole loop) and enter the kernels as fp32, so that with noise off the fused step
differs from the torch ops only by summation order in the row norms and by FMA contraction.
Square roots and divisions are the IEEE round-to-nearest forms (tl.sqrt_rn, tl.fdiv(ieee_rounding=True)):
tl.sqrt and `/` may lower to approximate instructions on a GPU. exp is tl.exp (a few ulps from torch's
expf); it only enters energy-scaled steps. Finiteness is tested as |x| < inf (false for NaN and +-inf),
and every clamp is written as a select that keeps NaN (tl.minimum/tl.maximum do not promise NaN
propagation on a GPU): a NaN proposal must reach the finiteness check, not be clamped into the box.

No torch.library here: the ops are defined in pyebm/ops/descent_triton.py. The launchers never call
torch.cuda; with TRITON_INTERPRET=1 the kernels run on CPU tensors.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from . import mlp_energy as _mlp
from .mlp_energy import _mlp_tile, _to_out

INTERPRETED = _mlp.INTERPRETED
DTYPES = _mlp.DTYPES
NOISE_MODES = {"none": 0, "langevin": 1, "step": 2, "additive": 3}
MAX_STEPS, CONVERGED, NONFINITE = 0, 1, 2
_CONVERGED = tl.constexpr(CONVERGED)
_NONFINITE = tl.constexpr(NONFINITE)
INF = tl.constexpr(float("inf"))
# Columns of the whole loop's per-step coefficient table (fp32 [T, COEF_COLS]), formed in float64:
# -grad_scale * eta_k, eta_k, the plain noise coefficient (sqrt(2 eta_k n_k) | -(eta_k n_k) | n_k by noise
# mode) and the energy-scaled noise factor (2 n_k | n_k | n_k).
COEF_COLS = tl.constexpr(4)
# Widest row chunk of the fused update; wider rows take the three-pass form.
MAX_BLOCK_D = 1024


# ----------------------------------------------------------------------------------------------
# Shared pieces of the update
# ----------------------------------------------------------------------------------------------
@triton.jit
def _not_finite(x):
    return ~(tl.abs(x) < INF)


@triton.jit
def _clip_value(g, grad_clip, HAS_CLIP: tl.constexpr):
    if HAS_CLIP:
        g = tl.where(g > grad_clip, grad_clip, g)
        g = tl.where(g < -grad_clip, -grad_clip, g)
    return g


@triton.jit
def _norm_scale(ss, grad_clip_norm):
    """min(1, c / sqrt(ss)) per row, as torch forms it; c / 0 = inf -> 1, a zero gradient stays zero."""
    nrm = tl.sqrt_rn(ss)
    pos = nrm > 0.0
    q = tl.fdiv(grad_clip_norm, tl.where(pos, nrm, 1.0), ieee_rounding=True)
    return tl.where(pos & (q < 1.0), q, 1.0)


@triton.jit
def _move(g, yb, v, xi, sc, lo, hi, mk, fx, cg, er, mu, c_noise, n_es,
          HAS_V: tl.constexpr, ENERGY_SCALED: tl.constexpr, NOISE: tl.constexpr, HAS_SC: tl.constexpr,
          HAS_LO: tl.constexpr, HAS_HI: tl.constexpr, HAS_MASK: tl.constexpr):
    """Proposal (y', v') of one [rows, cols] chunk from the clipped gradient g (steps 8-11 of the rule).

    cg is the gradient coefficient (a scalar, or per row [R, 1] when ENERGY_SCALED); er [R, 1] the
    energy-scaled step size; xi standard normals; sc, lo, hi [1, C] (step clip, bounds; lo/hi only when
    applied this step); mk/fx the clamped coordinates and their values. Arguments a flag turns off are
    not read.
    """
    d = g * cg
    vn = d
    if HAS_V:
        vn = d + mu * v
        d = vn
    if NOISE == 1:  # langevin: + sqrt(2 eta n) xi
        if ENERGY_SCALED:
            d = d + xi * tl.sqrt_rn(er * n_es)
        else:
            d = d + c_noise * xi
    elif NOISE == 2:  # step (IBC): - eta n xi
        if ENERGY_SCALED:
            d = d - xi * (er * n_es)
        else:
            d = d + c_noise * xi
    elif NOISE == 3:  # additive: + n xi
        d = d + c_noise * xi
    if HAS_SC:
        d = tl.where(d > sc, sc, d)
        d = tl.where(d < -sc, -sc, d)
    yn = d + yb
    if HAS_LO:
        yn = tl.where(yn < lo, lo, yn)
    if HAS_HI:
        yn = tl.where(yn > hi, hi, yn)
    if HAS_MASK:
        yn = tl.where(mk, fx, yn)
    return yn, vn


# ----------------------------------------------------------------------------------------------
# Fused update: one step for N rows
# ----------------------------------------------------------------------------------------------
@triton.jit
def _load_chunk(ptr, rows, cols, m2, stride_r):
    return tl.load(ptr + rows[:, None] * stride_r + cols[None, :], mask=m2, other=0.0).to(tl.float32)


@triton.jit
def _descent_update_kernel(
    y_ptr, g_ptr, e_ptr, active_ptr, steps_ptr, status_ptr, v_ptr, pending_ptr, noise_ptr, mask_ptr, fixed_ptr,
    lo_ptr, hi_ptr, sc_ptr, yb_ptr,
    N, D, stride_y, stride_g, stride_v, stride_n, stride_m, stride_f, stride_b,
    cg_plain, neg_gs, eta, temperature, mu, grad_clip, grad_clip_norm, tol, c_noise, n_es,
    HAS_V: tl.constexpr, HAS_CLIP: tl.constexpr, HAS_CLIP_NORM: tl.constexpr, USE_TOL: tl.constexpr,
    FINAL_STEP: tl.constexpr, ENERGY_SCALED: tl.constexpr, NOISE: tl.constexpr, HAS_SC: tl.constexpr,
    HAS_LO: tl.constexpr, HAS_HI: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BASE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, NUM_CHUNKS: tl.constexpr, EMULATE_BF16: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    c_l = tl.arange(0, BLOCK_D)
    y_ty = y_ptr.dtype.element_ty

    act = tl.load(active_ptr + rows, mask=rmask, other=0) != 0
    status = tl.load(status_ptr + rows, mask=rmask, other=0).to(tl.int32)
    E = tl.load(e_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    if HAS_BASE:
        base_ptr = yb_ptr
        stride_base = stride_b
    else:
        base_ptr = y_ptr
        stride_base = stride_y

    # ---- 1. finiteness, clipped-gradient sums ----
    if NUM_CHUNKS == 1:
        cmask = c_l < D
        m2 = rmask[:, None] & cmask[None, :]
        g = _load_chunk(g_ptr, rows, c_l, m2, stride_g)
        nbad = tl.sum(tl.where(m2 & _not_finite(g), 1, 0), axis=1)
        g = _clip_value(g, grad_clip, HAS_CLIP)
        if HAS_CLIP_NORM:
            g = g * _norm_scale(tl.sum(g * g, axis=1), grad_clip_norm)[:, None]
        if USE_TOL:
            ss = tl.sum(g * g, axis=1)
    else:
        nbad = tl.zeros((BLOCK_N,), dtype=tl.int32)
        ss0 = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for c in range(0, NUM_CHUNKS):
            cols = c * BLOCK_D + c_l
            m2 = rmask[:, None] & (cols < D)[None, :]
            gc = _load_chunk(g_ptr, rows, cols, m2, stride_g)
            nbad += tl.sum(tl.where(m2 & _not_finite(gc), 1, 0), axis=1)
            gc = _clip_value(gc, grad_clip, HAS_CLIP)
            ss0 += tl.sum(gc * gc, axis=1)
        scale = tl.full((BLOCK_N,), 1.0, tl.float32)
        if HAS_CLIP_NORM:
            scale = _norm_scale(ss0, grad_clip_norm)
        if USE_TOL:
            if HAS_CLIP_NORM:
                # the criterion reads the norm of the scaled g, summed as torch does (scale first)
                ss = tl.zeros((BLOCK_N,), dtype=tl.float32)
                for c in range(0, NUM_CHUNKS):
                    cols = c * BLOCK_D + c_l
                    m2 = rmask[:, None] & (cols < D)[None, :]
                    gc = _clip_value(_load_chunk(g_ptr, rows, cols, m2, stride_g), grad_clip, HAS_CLIP)
                    gc = gc * scale[:, None]
                    ss += tl.sum(gc * gc, axis=1)
            else:
                ss = ss0

    # ---- 2. row decisions before the move ----
    finite = (nbad == 0) & ~_not_finite(E)
    status = tl.where(act & ~finite, _NONFINITE, status)
    act = act & finite
    stop_after = tl.zeros((BLOCK_N,), dtype=tl.int1)
    if USE_TOL:
        crit = tl.sqrt_rn(ss) <= tol
        if FINAL_STEP:
            pend = tl.load(pending_ptr + rows, mask=rmask, other=0) != 0
            stop_after = act & pend
            tl.store(pending_ptr + rows, (act & crit).to(tl.uint8), mask=rmask)
        else:
            stop = act & crit
            status = tl.where(stop, _CONVERGED, status)
            act = act & ~stop
    move = act
    if ENERGY_SCALED:
        er = (tl.fdiv(tl.exp(E), temperature, ieee_rounding=True) * eta)[:, None]
        cg = er * neg_gs
    else:
        er = E[:, None]  # not read
        cg = cg_plain

    # ---- 3. proposal, its finiteness, commit ----
    if NUM_CHUNKS == 1:
        cols = c_l
        v = g
        if HAS_V:
            v = _load_chunk(v_ptr, rows, cols, m2, stride_v)
        xi = g
        if NOISE != 0:
            xi = _load_chunk(noise_ptr, rows, cols, m2, stride_n)
        yb = _load_chunk(base_ptr, rows, cols, m2, stride_base)
        sc = tl.load(sc_ptr + cols, mask=cmask, other=1.0).to(tl.float32)[None, :] if HAS_SC else 0.0
        lo = tl.load(lo_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :] if HAS_LO else 0.0
        hi = tl.load(hi_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :] if HAS_HI else 0.0
        mk = m2
        fx = g
        if HAS_MASK:
            mk = tl.load(mask_ptr + rows[:, None] * stride_m + cols[None, :], mask=m2, other=0) != 0
            fx = _load_chunk(fixed_ptr, rows, cols, m2, stride_f)
        yn, vn = _move(g, yb, v, xi, sc, lo, hi, mk, fx, cg, er, mu, c_noise, n_es,
                       HAS_V, ENERGY_SCALED, NOISE, HAS_SC, HAS_LO, HAS_HI, HAS_MASK)
        ok = tl.sum(tl.where(m2 & _not_finite(yn), 1, 0), axis=1) == 0
        status = tl.where(move & ~ok, _NONFINITE, status)
        move = move & ok
        act = act & ok
        wm = m2 & move[:, None]
        tl.store(y_ptr + rows[:, None] * stride_y + cols[None, :], _to_out(yn, y_ty, EMULATE_BF16), mask=wm)
        if HAS_V:
            tl.store(v_ptr + rows[:, None] * stride_v + cols[None, :],
                     _to_out(vn, v_ptr.dtype.element_ty, EMULATE_BF16), mask=wm)
    else:
        # The proposal is formed twice: once to learn whether the whole row is finite, once to write it.
        for p in tl.static_range(2):
            nbad_y = tl.zeros((BLOCK_N,), dtype=tl.int32)
            for c in range(0, NUM_CHUNKS):
                cols = c * BLOCK_D + c_l
                cmask = cols < D
                m2 = rmask[:, None] & cmask[None, :]
                gc = _clip_value(_load_chunk(g_ptr, rows, cols, m2, stride_g), grad_clip, HAS_CLIP)
                if HAS_CLIP_NORM:
                    gc = gc * scale[:, None]
                v = gc
                if HAS_V:
                    v = _load_chunk(v_ptr, rows, cols, m2, stride_v)
                xi = gc
                if NOISE != 0:
                    xi = _load_chunk(noise_ptr, rows, cols, m2, stride_n)
                yb = _load_chunk(base_ptr, rows, cols, m2, stride_base)
                sc = tl.load(sc_ptr + cols, mask=cmask, other=1.0).to(tl.float32)[None, :] if HAS_SC else 0.0
                lo = tl.load(lo_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :] if HAS_LO else 0.0
                hi = tl.load(hi_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :] if HAS_HI else 0.0
                mk = m2
                fx = gc
                if HAS_MASK:
                    mk = tl.load(mask_ptr + rows[:, None] * stride_m + cols[None, :], mask=m2, other=0) != 0
                    fx = _load_chunk(fixed_ptr, rows, cols, m2, stride_f)
                yn, vn = _move(gc, yb, v, xi, sc, lo, hi, mk, fx, cg, er, mu, c_noise, n_es,
                               HAS_V, ENERGY_SCALED, NOISE, HAS_SC, HAS_LO, HAS_HI, HAS_MASK)
                if p == 0:
                    nbad_y += tl.sum(tl.where(m2 & _not_finite(yn), 1, 0), axis=1)
                else:
                    wm = m2 & move[:, None]
                    tl.store(y_ptr + rows[:, None] * stride_y + cols[None, :], _to_out(yn, y_ty, EMULATE_BF16),
                             mask=wm)
                    if HAS_V:
                        tl.store(v_ptr + rows[:, None] * stride_v + cols[None, :],
                                 _to_out(vn, v_ptr.dtype.element_ty, EMULATE_BF16), mask=wm)
            if p == 0:
                ok = nbad_y == 0
                status = tl.where(move & ~ok, _NONFINITE, status)
                move = move & ok
                act = act & ok

    # ---- 4. bookkeeping ----
    steps = tl.load(steps_ptr + rows, mask=rmask, other=0) + move.to(tl.int32)
    tl.store(steps_ptr + rows, steps, mask=rmask)
    if FINAL_STEP:
        stop_after = stop_after & act
        status = tl.where(stop_after, _CONVERGED, status)
        act = act & ~stop_after
    tl.store(status_ptr + rows, status.to(tl.int8), mask=rmask)
    tl.store(active_ptr + rows, act.to(tl.uint8), mask=rmask)


def _vec(t: Optional[torch.Tensor], D: int, device) -> Optional[torch.Tensor]:
    """A per-dimension option as a contiguous [D] tensor (None stays None)."""
    if t is None:
        return None
    return t.reshape(-1).expand(D).to(device).contiguous()


def update_config(D: int) -> dict:
    """Block sizes of the fused update. A row up to MAX_BLOCK_D wide is one chunk and a program takes
    about 1024 elements (4 warps); wider rows take 2 rows of 1024-wide chunks (8 warps). Chosen so the
    sm_90 build keeps every variant free of register spills (checked offline with Triton's ptxas, not
    timed on a GPU): 2048 elements per 4 warps spill once every option is on."""
    block_d = min(triton.next_power_of_2(max(D, 1)), MAX_BLOCK_D)
    if D <= MAX_BLOCK_D:
        return {"BLOCK_N": max(1, min(128, 1024 // block_d)), "BLOCK_D": block_d, "num_warps": 4}
    return {"BLOCK_N": 2, "BLOCK_D": block_d, "num_warps": 8}


def launch_update(y, g, E, active, steps, status, velocity, pending, noise, mask, fixed, lower, upper, step_clip,
                  eta: float, noise_level: float, noise_mode: str, grad_scale: float, momentum: float,
                  grad_clip: Optional[float], grad_clip_norm: Optional[float], energy_scaled: bool,
                  energy_temperature: float, tol: float, tol_final_step: bool, bound_each_step: bool,
                  y_base=None, config: Optional[dict] = None) -> None:
    """One fused descent step over N rows, in place on y, velocity, active, steps, status, pending.

    y, g, velocity, noise, fixed, y_base [N, D] (unit column stride, any row stride); E [N]; active [N]
    bool, steps [N] int32, status [N] int8, pending [N] bool (contiguous); mask [N, D] bool; lower, upper,
    step_clip [D] or one value. Arguments are assumed checked (``pyebm.ops.descent_triton`` checks them).
    g is read only. ``config`` overrides ``update_config`` keys (BLOCK_N, BLOCK_D, num_warps).
    """
    N, D = y.shape
    if N == 0 or D == 0:
        return
    if y.device.type == "cpu" and not INTERPRETED:
        raise RuntimeError("pyebm triton: CPU tensors need TRITON_INTERPRET=1 set before pyebm._kernels is imported")
    cfg = update_config(D)
    if config:
        cfg.update(config)
    bn, bd = int(cfg["BLOCK_N"]), int(cfg["BLOCK_D"])
    mode = NOISE_MODES[noise_mode]
    noise_on = mode != 0 and noise is not None
    mode = mode if noise_on else 0
    has_v = momentum > 0
    use_tol = tol > 0
    final = use_tol and tol_final_step
    bounds = bool(bound_each_step)
    lo = _vec(lower, D, y.device) if bounds else None
    hi = _vec(upper, D, y.device) if bounds else None
    sc = _vec(step_clip, D, y.device)
    # Coefficients torch forms in double (Python floats) before rounding to fp32.
    if mode == 1:
        c_noise, n_es = math.sqrt(2.0 * eta * noise_level), 2.0 * noise_level
    elif mode == 2:
        c_noise, n_es = -(eta * noise_level), noise_level
    else:
        c_noise, n_es = noise_level, noise_level
    dummy = y
    u8 = torch.uint8
    args = (
        y, g, E, active.view(u8), steps, status, velocity if has_v else dummy,
        pending.view(u8) if final else active.view(u8), noise if noise_on else dummy,
        mask.view(u8) if mask is not None else active.view(u8), fixed if mask is not None else dummy,
        lo if lo is not None else dummy, hi if hi is not None else dummy, sc if sc is not None else dummy,
        y_base if y_base is not None else dummy,
        N, D, y.stride(0), g.stride(0), velocity.stride(0) if has_v else 0, noise.stride(0) if noise_on else 0,
        mask.stride(0) if mask is not None else 0, fixed.stride(0) if mask is not None else 0,
        y_base.stride(0) if y_base is not None else 0,
        float(-grad_scale * eta), float(-grad_scale), float(eta), float(energy_temperature), float(momentum),
        float(grad_clip or 0.0), float(grad_clip_norm or 0.0), float(tol), float(c_noise), float(n_es),
    )
    meta = dict(HAS_V=has_v, HAS_CLIP=grad_clip is not None, HAS_CLIP_NORM=grad_clip_norm is not None,
                USE_TOL=use_tol, FINAL_STEP=final, ENERGY_SCALED=bool(energy_scaled), NOISE=mode,
                HAS_SC=sc is not None, HAS_LO=lo is not None, HAS_HI=hi is not None, HAS_MASK=mask is not None,
                HAS_BASE=y_base is not None, BLOCK_N=bn, BLOCK_D=bd, NUM_CHUNKS=triton.cdiv(D, bd),
                EMULATE_BF16=INTERPRETED and y.dtype == torch.bfloat16, num_warps=int(cfg["num_warps"]))
    with _mlp._on_device(y.device):
        _descent_update_kernel[(triton.cdiv(N, bn),)](*args, **meta)


# ----------------------------------------------------------------------------------------------
# Whole loop for the MLP energy
# ----------------------------------------------------------------------------------------------
@triton.jit
def _mlp_descent_kernel(
    y0_ptr, ctx_ptr, w_ptr, b_ptr, meta_ptr, wout_ptr, bout_ptr, coef_ptr, lo_ptr, hi_ptr, sc_ptr, mask_ptr,
    y_ptr, ef_ptr, ei_ptr, steps_ptr, status_ptr, scratch_ptr,
    N, K, D, H1, HL, num_layers, num_tiles, buf_elems, scratch_per_prog, state_off, T_steps,
    stride_yb, stride_yk, stride_yd, stride_cb, stride_ch, stride_wo,
    neg_gs, temperature, mu, grad_clip, grad_clip_norm, tol, seed_lo, seed_hi,
    ACT: tl.constexpr, HAS_V: tl.constexpr, NESTEROV: tl.constexpr, HAS_CLIP: tl.constexpr,
    HAS_CLIP_NORM: tl.constexpr, USE_TOL: tl.constexpr, FINAL_STEP: tl.constexpr, ENERGY_SCALED: tl.constexpr,
    NOISE: tl.constexpr, HAS_SC: tl.constexpr, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr,
    BOUND_EACH: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, DOT_PRECISION: tl.constexpr, EMULATE_BF16: tl.constexpr,
):
    # Per-program scratch: [buffer 0 | buffer 1 | act' of every layer | y state | v state], all fp32 and
    # tile-major (see _mlp_tile). Buffer 0 carries the evaluation point in and the gradient out; after
    # the gradient pass, the proposal y' goes over the gradient in buffer 0 and v' into buffer 1. y and
    # v hold D padded to d_t * BLOCK_T columns, zero in the padding.
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    r_l = tl.arange(0, BLOCK_M)
    c_l = tl.arange(0, BLOCK_T)
    TILE: tl.constexpr = BLOCK_M * BLOCK_T
    t_off = r_l[:, None] * BLOCK_T + c_l[None, :]
    base = scratch_ptr + pid.to(tl.int64) * scratch_per_prog
    buf1 = base + buf_elems
    ys = base + state_off
    d_t = tl.load(meta_ptr).to(tl.int32)
    vs = ys + d_t * TILE
    y_ty = y_ptr.dtype.element_ty
    # The seed arrives as two 31-bit halves: every call then has the same (i32) argument types.
    seed = (seed_hi.to(tl.int64) << 31) | seed_lo.to(tl.int64)

    for tile in range(pid, num_tiles, nprog):
        rows = tl.cast(tile * BLOCK_M + r_l, tl.int64)
        rmask = rows < N
        b_idx = rows // K
        k_idx = rows - b_idx * K
        row0 = tl.cast(tile * BLOCK_M, tl.int64)
        b0 = row0 // K
        ctx_tile = ctx_ptr + b0 * stride_cb
        b_rel = (b_idx - b0).to(tl.int32)
        y_row = y0_ptr + b_idx[:, None] * stride_yb + k_idx[:, None] * stride_yk

        # ---- state: y = y0 (fp32), v = 0 ----
        for ct in range(0, d_t):
            cols = ct * BLOCK_T + c_l
            m2 = rmask[:, None] & (cols < D)[None, :]
            y0v = tl.load(y_row + cols[None, :] * stride_yd, mask=m2, other=0.0).to(tl.float32)
            tl.store(ys + ct * TILE + t_off, y0v)
            if HAS_V:
                tl.store(vs + ct * TILE + t_off, tl.zeros((BLOCK_M, BLOCK_T), dtype=tl.float32))
        act = rmask
        pending = tl.zeros((BLOCK_M,), dtype=tl.int1)
        steps = tl.zeros((BLOCK_M,), dtype=tl.int32)
        status = tl.zeros((BLOCK_M,), dtype=tl.int32)
        tl.debug_barrier()

        for k in range(0, T_steps):
            n_act = tl.sum(act.to(tl.int32), axis=0)
            if n_act > 0:
                # ---- evaluation point (Nesterov look-ahead y + mu v) -> buffer 0 ----
                for ct in range(0, d_t):
                    q = tl.load(ys + ct * TILE + t_off)
                    if NESTEROV:
                        q = q + mu * tl.load(vs + ct * TILE + t_off)
                    tl.store(base + ct * TILE + t_off, q)
                tl.debug_barrier()
                E = _mlp_tile(base, buf_elems, w_ptr, b_ptr, meta_ptr, wout_ptr, bout_ptr, ctx_tile, b_rel, rmask,
                              y_ptr, row0, D, H1, HL, num_layers, stride_cb, stride_ch, stride_wo,
                              ACT, True, True, BLOCK_M, BLOCK_T, DOT_PRECISION, EMULATE_BF16)
                if k == 0:
                    tl.store(ei_ptr + rows, _to_out(E, ei_ptr.dtype.element_ty, EMULATE_BF16), mask=rmask)
                crow = coef_ptr + k * COEF_COLS
                cg_plain = tl.load(crow + 0)
                eta = tl.load(crow + 1)
                c_noise = tl.load(crow + 2)
                n_es = tl.load(crow + 3)

                # ---- gradient sums (buffer 0 holds dE/dy) ----
                nbad = tl.zeros((BLOCK_M,), dtype=tl.int32)
                ss0 = tl.zeros((BLOCK_M,), dtype=tl.float32)
                for ct in range(0, d_t):
                    cm = (ct * BLOCK_T + c_l < D)[None, :]
                    g = tl.load(base + ct * TILE + t_off)
                    nbad += tl.sum(tl.where(cm & _not_finite(g), 1, 0), axis=1)
                    g = _clip_value(g, grad_clip, HAS_CLIP)
                    ss0 += tl.sum(tl.where(cm, g * g, 0.0), axis=1)
                scale = tl.full((BLOCK_M,), 1.0, tl.float32)
                if HAS_CLIP_NORM:
                    scale = _norm_scale(ss0, grad_clip_norm)
                finite = (nbad == 0) & ~_not_finite(E)
                status = tl.where(act & ~finite, _NONFINITE, status)
                act = act & finite
                stop_after = tl.zeros((BLOCK_M,), dtype=tl.int1)
                if USE_TOL:
                    ss = ss0
                    if HAS_CLIP_NORM:
                        ss = tl.zeros((BLOCK_M,), dtype=tl.float32)
                        for ct in range(0, d_t):
                            cm = (ct * BLOCK_T + c_l < D)[None, :]
                            g = _clip_value(tl.load(base + ct * TILE + t_off), grad_clip, HAS_CLIP) * scale[:, None]
                            ss += tl.sum(tl.where(cm, g * g, 0.0), axis=1)
                    crit = tl.sqrt_rn(ss) <= tol
                    if FINAL_STEP:
                        stop_after = act & pending
                        pending = act & crit
                    else:
                        stop = act & crit
                        status = tl.where(stop, _CONVERGED, status)
                        act = act & ~stop
                move = act
                if ENERGY_SCALED:
                    er = (tl.fdiv(tl.exp(E), temperature, ieee_rounding=True) * eta)[:, None]
                    cg = er * neg_gs
                else:
                    er = E[:, None]  # not read
                    cg = cg_plain
                tl.debug_barrier()

                # ---- proposals: y' over the gradient in buffer 0, v' into buffer 1 ----
                nbad_y = tl.zeros((BLOCK_M,), dtype=tl.int32)
                for ct in range(0, d_t):
                    cols = ct * BLOCK_T + c_l
                    cmask = cols < D
                    m2 = rmask[:, None] & cmask[None, :]
                    g = _clip_value(tl.load(base + ct * TILE + t_off), grad_clip, HAS_CLIP)
                    if HAS_CLIP_NORM:
                        g = g * scale[:, None]
                    yb = tl.load(ys + ct * TILE + t_off)
                    v = g
                    if HAS_V:
                        v = tl.load(vs + ct * TILE + t_off)
                    xi = g
                    if NOISE != 0:
                        xi = tl.randn(seed, (tl.cast(k, tl.int64) * N + rows[:, None]) * D + cols[None, :])
                    sc = tl.load(sc_ptr + cols, mask=cmask, other=1.0).to(tl.float32)[None, :] if HAS_SC else 0.0
                    lo = tl.load(lo_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :] if HAS_LO else 0.0
                    hi = tl.load(hi_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :] if HAS_HI else 0.0
                    mk = m2
                    fx = g
                    if HAS_MASK:
                        mk = tl.load(mask_ptr + rows[:, None] * D + cols[None, :], mask=m2, other=0) != 0
                        fx = tl.load(y_row + cols[None, :] * stride_yd, mask=m2, other=0.0).to(tl.float32)
                    yn, vn = _move(g, yb, v, xi, sc, lo, hi, mk, fx, cg, er, mu, c_noise, n_es,
                                   HAS_V, ENERGY_SCALED, NOISE, HAS_SC, HAS_LO and BOUND_EACH,
                                   HAS_HI and BOUND_EACH, HAS_MASK)
                    nbad_y += tl.sum(tl.where(m2 & _not_finite(yn), 1, 0), axis=1)
                    # padded columns and rows stay exactly zero (noise would otherwise land there)
                    tl.store(base + ct * TILE + t_off, tl.where(m2, yn, 0.0))
                    if HAS_V:
                        tl.store(buf1 + ct * TILE + t_off, tl.where(m2, vn, 0.0))
                ok = nbad_y == 0
                status = tl.where(move & ~ok, _NONFINITE, status)
                move = move & ok
                act = act & ok
                tl.debug_barrier()

                # ---- commit ----
                mv = move[:, None]
                for ct in range(0, d_t):
                    p = ys + ct * TILE + t_off
                    tl.store(p, tl.where(mv, tl.load(base + ct * TILE + t_off), tl.load(p)))
                    if HAS_V:
                        pv = vs + ct * TILE + t_off
                        tl.store(pv, tl.where(mv, tl.load(buf1 + ct * TILE + t_off), tl.load(pv)))
                steps += move.to(tl.int32)
                if FINAL_STEP:
                    stop_after = stop_after & act
                    status = tl.where(stop_after, _CONVERGED, status)
                    act = act & ~stop_after
                tl.debug_barrier()

        # ---- final state (bounds once at the end unless applied every step) -> output and buffer 0 ----
        for ct in range(0, d_t):
            cols = ct * BLOCK_T + c_l
            cmask = cols < D
            m2 = rmask[:, None] & cmask[None, :]
            yv = tl.load(ys + ct * TILE + t_off)
            if not BOUND_EACH:
                if HAS_LO:
                    lo = tl.load(lo_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
                    yv = tl.where(yv < lo, lo, yv)
                if HAS_HI:
                    hi = tl.load(hi_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
                    yv = tl.where(yv > hi, hi, yv)
                if HAS_MASK and (HAS_LO or HAS_HI):
                    mk = tl.load(mask_ptr + rows[:, None] * D + cols[None, :], mask=m2, other=0) != 0
                    fx = tl.load(y_row + cols[None, :] * stride_yd, mask=m2, other=0.0).to(tl.float32)
                    yv = tl.where(mk, fx, yv)
                yv = tl.where(m2, yv, 0.0)
            tl.store(base + ct * TILE + t_off, yv)
            tl.store(y_ptr + rows[:, None] * D + cols[None, :], _to_out(yv, y_ty, EMULATE_BF16), mask=m2)
        tl.debug_barrier()
        E = _mlp_tile(base, buf_elems, w_ptr, b_ptr, meta_ptr, wout_ptr, bout_ptr, ctx_tile, b_rel, rmask,
                      y_ptr, row0, D, H1, HL, num_layers, stride_cb, stride_ch, stride_wo,
                      ACT, False, True, BLOCK_M, BLOCK_T, DOT_PRECISION, EMULATE_BF16)
        tl.store(ef_ptr + rows, _to_out(E, ef_ptr.dtype.element_ty, EMULATE_BF16), mask=rmask)
        tl.store(steps_ptr + rows, steps, mask=rmask)
        tl.store(status_ptr + rows, status.to(tl.int8), mask=rmask)
        # The next tile overwrites buffer 0 and the state, which slower threads may still be reading.
        tl.debug_barrier()


def loop_config(n_rows: int, max_width: int, dtype: torch.dtype) -> dict:
    """Block sizes of the whole loop: those of the MLP kernel (``mlp_energy.default_config``) with tiles
    of at most 64 x 32 and 8 warps from 2048 elements per chunk. The update passes keep about ten
    [BLOCK_M, BLOCK_T] chunks live next to the MLP's state: 64 x 64 tiles spill on sm_90 with 8 or 16
    warps, 64 x 32 with 8 warps does not and still uses wgmma for bf16/fp16 (checked offline with
    Triton's ptxas, not timed on a GPU)."""
    cfg = _mlp.default_config(n_rows, max_width, dtype)
    cfg["BLOCK_T"] = min(cfg["BLOCK_T"], 32)
    cfg["num_warps"] = 8 if cfg["BLOCK_M"] * cfg["BLOCK_T"] >= 2048 else 4
    return cfg


def step_coefficients(eta: torch.Tensor, noise_level: torch.Tensor, grad_scale: float, noise_mode: str,
                      device) -> torch.Tensor:
    """fp32 [T, COEF_COLS] table of the per-step scalars, formed in float64 as the per-step path forms
    them from Python floats (one rounding to fp32 each)."""
    e = eta.detach().to(torch.float64).reshape(-1)
    n = noise_level.detach().to(torch.float64).reshape(-1).to(e.device)
    if noise_mode == "langevin":
        c_noise, n_es = torch.sqrt(2.0 * e * n), 2.0 * n
    elif noise_mode == "step":
        c_noise, n_es = -(e * n), n
    else:
        c_noise, n_es = n, n
    table = torch.stack([-grad_scale * e, e, c_noise, n_es], dim=1)
    return table.to(device=device, dtype=torch.float32).contiguous()


def split_seed(seed: int) -> Tuple[int, int]:
    """Any int -> two 31-bit halves (the kernel joins them into a 62-bit Philox key)."""
    s = int(seed) & ((1 << 62) - 1)
    return s & 0x7FFFFFFF, s >> 31


def mlp_descent(ctx, y0, w_in, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor], w_out, b_out,
                activation: str, residual: bool, eta, noise_level, lower, upper, step_clip, mask, grad_scale: float,
                momentum: float, nesterov: bool, grad_clip: Optional[float], grad_clip_norm: Optional[float],
                energy_scaled: bool, energy_temperature: float, tol: float, tol_final_step: bool,
                bound_each_step: bool, noise_mode: str, seed: int, config: Optional[dict] = None):
    """All T = len(eta) steps in one launch; returns (y [B, K, D], E_final [B, K], E_init [B, K],
    steps [B, K] int32, status [B, K] int8), y and energies in y0's dtype.

    Arguments are those of ``pyebm::mlp_descent_triton`` and are assumed checked. lower/upper/step_clip
    are [D] (or one value), mask [B, K, D] bool (clamped coordinates keep y0's values). ``config``
    overrides ``loop_config`` keys (those of ``pyebm._kernels.mlp_energy.default_config``).
    """
    if y0.dtype not in DTYPES:
        raise TypeError(f"pyebm triton: y0 must be float32, bfloat16 or float16; got {y0.dtype}")
    if y0.device.type == "cpu" and not INTERPRETED:
        raise RuntimeError("pyebm triton: CPU tensors need TRITON_INTERPRET=1 set before pyebm._kernels is imported")
    B, K, D = y0.shape
    N = B * K
    if N >= 2**31 - 1024 or 1024 * D >= 2**31:
        raise ValueError(f"pyebm triton: B * K = {N} rows of width {D} exceed the kernel's int32 indexing")
    dev = y0.device
    y = torch.empty(B, K, D, device=dev, dtype=y0.dtype)
    E_final = torch.empty(B, K, device=dev, dtype=y0.dtype)
    E_init = torch.empty(B, K, device=dev, dtype=y0.dtype)
    steps = torch.zeros(B, K, device=dev, dtype=torch.int32)
    status = torch.zeros(B, K, device=dev, dtype=torch.int8)
    if N == 0:
        return y, E_final, E_init, steps, status
    T = eta.numel()
    H1 = w_in.shape[0]
    widths = [D, H1] + [w.shape[0] for w in weights]
    cfg = loop_config(N, max(widths), y0.dtype)
    if config:
        unknown = set(config) - set(cfg)
        if unknown:
            raise ValueError(f"pyebm triton: unknown config keys {sorted(unknown)}")
        cfg.update(config)
    bm, bt = int(cfg["BLOCK_M"]), int(cfg["BLOCK_T"])
    if bm < 16 or bt < 16 or bm & (bm - 1) or bt & (bt - 1):
        raise ValueError(f"pyebm triton: BLOCK_M and BLOCK_T must be powers of two >= 16; got {bm}, {bt}")
    if bm * abs(ctx.stride(0)) + bt * triton.cdiv(H1, bt) * abs(ctx.stride(1)) >= 2**31:
        ctx = ctx.contiguous()
    packed = _mlp._PACK_CACHE.get(w_in, weights, biases, residual, bt)
    w_out = w_out.reshape(-1)
    b_out = b_out.reshape(-1)
    HL = w_out.shape[0]
    num_tiles = triton.cdiv(N, bm)
    nprog = min(num_tiles, int(cfg["max_programs"] or _mlp._max_programs(dev)))
    dp = triton.cdiv(D, bt) * bt
    has_v = momentum > 0
    state_off = bm * (2 * packed.hmax + packed.d_cols)
    per_prog = state_off + bm * dp * (2 if has_v else 1)
    scratch = torch.empty(nprog * per_prog, device=dev, dtype=torch.float32)
    coef = step_coefficients(eta, noise_level, float(grad_scale), noise_mode, dev)
    lo, hi, sc = _vec(lower, D, dev), _vec(upper, D, dev), _vec(step_clip, D, dev)
    mask_u8 = None if mask is None else mask.to(dev).reshape(N, D).contiguous().view(torch.uint8)
    use_tol = tol > 0
    seed_lo, seed_hi = split_seed(seed)
    dummy = scratch
    args = (
        y0, ctx, packed.w, packed.b, packed.meta, w_out, b_out, coef,
        lo if lo is not None else dummy, hi if hi is not None else dummy, sc if sc is not None else dummy,
        mask_u8 if mask_u8 is not None else dummy,
        y, E_final, E_init, steps, status, scratch,
        N, K, D, H1, HL, packed.num_layers, num_tiles, bm * packed.hmax, per_prog, state_off, T,
        y0.stride(0), y0.stride(1), y0.stride(2), ctx.stride(0), ctx.stride(1), w_out.stride(0),
        float(-grad_scale), float(energy_temperature), float(momentum), float(grad_clip or 0.0),
        float(grad_clip_norm or 0.0), float(tol), seed_lo, seed_hi,
    )
    meta = dict(ACT=_mlp.ACTIVATIONS[activation], HAS_V=has_v, NESTEROV=bool(nesterov) and has_v,
                HAS_CLIP=grad_clip is not None, HAS_CLIP_NORM=grad_clip_norm is not None, USE_TOL=use_tol,
                FINAL_STEP=use_tol and bool(tol_final_step), ENERGY_SCALED=bool(energy_scaled),
                NOISE=NOISE_MODES[noise_mode], HAS_SC=sc is not None, HAS_LO=lo is not None, HAS_HI=hi is not None,
                BOUND_EACH=bool(bound_each_step), HAS_MASK=mask_u8 is not None, BLOCK_M=bm, BLOCK_T=bt,
                DOT_PRECISION=cfg["DOT_PRECISION"], EMULATE_BF16=INTERPRETED and y0.dtype == torch.bfloat16,
                num_warps=int(cfg["num_warps"]), num_stages=int(cfg["num_stages"]))
    with _mlp._on_device(dev):
        _mlp_descent_kernel[(nprog,)](*args, **meta)
    return y, E_final, E_init, steps, status
