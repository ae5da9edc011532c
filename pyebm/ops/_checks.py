"""Argument checks of the op boundary, in Python: the fakes (``pyebm.ops._fake``) and the Python-side backends
(the reference path of the pure-Python install, the Triton custom ops) run them, so ``torch.compile`` and
``FakeTensorMode`` reject what the kernels reject. The C++ ops run the same checks in C++
(``csrc/cpu/op_checks.h``), with the same messages.

Every tensor is checked for layout (dense, strided), shape, dtype and device against the others before a kernel
reads memory. Errors name the op, the argument, what was expected and what came: ``ValueError`` for shapes,
devices, layouts and values, ``TypeError`` for dtypes and non-tensors.

Checks that need the values of tensors (bounds in order, ``step_clip > 0``, finite schedules) are in
``event_values`` and ``schedule_values``; the fakes skip them (fake tensors hold no values) and the kernels run
them. Nothing here imports the rest of pyebm: every op module can use it without an import cycle.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

ACTIVATIONS = ("relu", "silu", "gelu", "gelu_tanh", "tanh", "softplus")
NOISE_MODES = ("none", "langevin", "step", "additive")
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_HIDDEN_LAYERS = 8  # kMaxLayers of csrc/cpu/mlp_block.h (hidden layers, w_in's included)


def describe(t) -> str:
    """``[2, 3] float32 on cpu`` (or what a non-tensor is)."""
    if not isinstance(t, Tensor):
        return f"a {type(t).__name__}"
    return f"{list(t.shape)} {t.dtype} on {t.device}"


def dtype_name(dt: torch.dtype) -> str:
    return str(dt)


def dense(op: str, name: str, t) -> None:
    """t is a dense (strided, not quantized) tensor."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a tensor; got {describe(t)}")
    if t.layout != torch.strided:
        raise ValueError(f"{op}: {name} must be a dense (strided) tensor; got layout {t.layout}")
    if t.is_quantized:
        raise TypeError(f"{op}: {name} must not be a quantized tensor; got {dtype_name(t.dtype)}")


def shape(op: str, name: str, t: Tensor, expected: Sequence[int], symbolic: Optional[str] = None) -> None:
    if tuple(t.shape) != tuple(expected):
        sym = f" ({symbolic})" if symbolic else ""
        raise ValueError(f"{op}: {name} must have shape {list(expected)}{sym}; got {describe(t)}")


def like(op: str, name: str, t: Tensor, ref: Tensor, ref_name: str) -> None:
    """t has the dtype and device of ref."""
    if t.dtype != ref.dtype:
        raise TypeError(f"{op}: {name} has dtype {dtype_name(t.dtype)} but {ref_name} has dtype "
                        f"{dtype_name(ref.dtype)} (they must match)")
    if t.device != ref.device:
        raise ValueError(f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device} (they must be on one device)")


def dtype(op: str, name: str, t: Tensor, dt: torch.dtype) -> None:
    if t.dtype != dt:
        raise TypeError(f"{op}: {name} must be {dtype_name(dt)}; got {describe(t)}")


def floating(op: str, name: str, t: Tensor) -> None:
    if not t.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating tensor; got {describe(t)}")


def device(op: str, name: str, t: Tensor, dev: torch.device) -> None:
    if t.device != dev:
        raise ValueError(f"{op}: {name} must be on {dev}; got {describe(t)}")


def tensor_list(op: str, name: str, ts) -> List[Tensor]:
    if isinstance(ts, Tensor) or not isinstance(ts, (list, tuple)):
        raise TypeError(f"{op}: {name} must be a list of tensors; got {describe(ts)}")
    return list(ts)


def finite(op: str, name: str, v: float) -> None:
    if not math.isfinite(float(v)):
        raise ValueError(f"{op}: {name} must be finite; got {v}")


def non_negative(op: str, name: str, v: float) -> None:
    if not (math.isfinite(float(v)) and float(v) >= 0):
        raise ValueError(f"{op}: {name} must be a finite number >= 0; got {v}")


# -- the MLP energy ------------------------------------------------------------------------------

def activation(name: str) -> None:
    if name not in ACTIVATIONS:
        raise ValueError(f"pyebm: activation must be one of {', '.join(ACTIVATIONS)}; got {name!r}")


def mlp_args(op: str, ctx, y, w_in, weights, biases, w_out, b_out, y_name: str = "y"
             ) -> Tuple[int, int, int, List[int]]:
    """(B, K, D, [H_1 .. H_L]) of the MLP ops' tensors, every one checked against y (csrc: check_mlp_args)."""
    dense(op, y_name, y)
    if y.dim() != 3:
        raise ValueError(f"{op}: {y_name} must be [B, K, D] (3-D); got shape {list(y.shape)}")
    if not y.is_floating_point():
        raise TypeError(f"{op}: {y_name} must be a floating tensor; got {dtype_name(y.dtype)}")
    B, K, D = y.shape
    dense(op, "w_in", w_in)
    like(op, "w_in", w_in, y, y_name)
    if w_in.dim() != 2:
        raise ValueError(f"{op}: w_in must be [H1, D] (2-D); got shape {list(w_in.shape)}")
    if w_in.shape[1] != D:
        raise ValueError(f"{op}: candidate width mismatch: {y_name} is [B, K, {D}] but w_in is {list(w_in.shape)} "
                         f"(expected [H1, {D}])")
    H1 = w_in.shape[0]
    dense(op, "ctx", ctx)
    like(op, "ctx", ctx, y, y_name)
    if ctx.dim() != 2 or ctx.shape[1] != H1:
        raise ValueError(f"{op}: ctx must be [B, H1] = [{B}, {H1}]; got shape {list(ctx.shape)}")
    if ctx.shape[0] != B:
        raise ValueError(f"{op}: batch mismatch: ctx has {ctx.shape[0]} rows but {y_name} has B = {B}")
    weights = tensor_list(op, "weights", weights)
    biases = tensor_list(op, "biases", biases)
    if len(weights) != len(biases):
        raise ValueError(f"{op}: weights and biases must have the same length; got {len(weights)} and {len(biases)}")
    if len(weights) + 1 > MAX_HIDDEN_LAYERS:
        raise ValueError(f"{op}: at most {MAX_HIDDEN_LAYERS} hidden layers; got {len(weights) + 1}")
    widths = [H1]
    for l, (w, b) in enumerate(zip(weights, biases)):
        dense(op, f"weights[{l}]", w)
        dense(op, f"biases[{l}]", b)
        like(op, f"weights[{l}]", w, y, y_name)
        like(op, f"biases[{l}]", b, y, y_name)
        if w.dim() != 2 or w.shape[1] != widths[-1]:
            raise ValueError(f"{op}: weights[{l}] must be [H_out, {widths[-1]}]; got shape {list(w.shape)}")
        if b.dim() != 1 or b.shape[0] != w.shape[0]:
            raise ValueError(f"{op}: biases[{l}] must be [{w.shape[0]}]; got shape {list(b.shape)}")
        widths.append(w.shape[0])
    dense(op, "w_out", w_out)
    dense(op, "b_out", b_out)
    like(op, "w_out", w_out, y, y_name)
    like(op, "b_out", b_out, y, y_name)
    H = widths[-1]
    if w_out.numel() != H or not (w_out.dim() == 1 or (w_out.dim() == 2 and w_out.shape[0] == 1)):
        raise ValueError(f"{op}: w_out must be [{H}] or [1, {H}]; got shape {list(w_out.shape)}")
    if b_out.numel() != 1:
        raise ValueError(f"{op}: b_out must hold one value; got shape {list(b_out.shape)}")
    return B, K, D, widths


# -- descent -------------------------------------------------------------------------------------

def noise_mode(mode: str) -> None:
    if mode not in NOISE_MODES:
        raise ValueError(f"pyebm: noise_mode must be one of {', '.join(NOISE_MODES)}; got {mode!r}")


def rule(momentum: float, grad_clip: Optional[float], grad_clip_norm: Optional[float], energy_temperature: float,
         tol: float) -> None:
    """The update rule's options (csrc: check_rule)."""
    if grad_clip is not None and not grad_clip > 0:
        raise ValueError(f"pyebm: grad_clip must be > 0; got {grad_clip}")
    if grad_clip_norm is not None and not grad_clip_norm > 0:
        raise ValueError(f"pyebm: grad_clip_norm must be > 0; got {grad_clip_norm}")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"pyebm: momentum must be in [0, 1); got {momentum}")
    if not tol >= 0:
        raise ValueError(f"pyebm: tol must be >= 0; got {tol}")
    if not energy_temperature > 0:
        raise ValueError(f"pyebm: energy_temperature must be > 0; got {energy_temperature}")


def step_scalars(op: str, eta: float, noise_level: float, grad_scale: float) -> None:
    finite(op, "eta", eta)
    non_negative(op, "noise_level", noise_level)
    finite(op, "grad_scale", grad_scale)


def event_option(op: str, name: str, t: Optional[Tensor], D: int, dev: torch.device) -> None:
    """lower, upper or step_clip: None, or a floating tensor of 1 or D values, on the cpu (copied over) or on
    y's device ``dev``."""
    if t is None:
        return
    dense(op, name, t)
    floating(op, name, t)
    if t.device.type != "cpu" and t.device != dev:
        raise ValueError(f"{op}: {name} must be on the cpu or on {dev}; got {describe(t)}")
    if t.numel() not in (1, D):
        raise ValueError(f"{op}: {name} must hold 1 or D = {D} values; got shape {list(t.shape)}")


def event_values(op: str, lower: Optional[Tensor], upper: Optional[Tensor], step_clip: Optional[Tensor],
                 D: int) -> None:
    """The values of the per-coordinate options (real tensors only): bounds not NaN, lower <= upper,
    step_clip > 0. A tensor on a GPU is read through a small synchronising copy; during CUDA graph capture
    (no host reads allowed) only the checks of CPU tensors run."""
    capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()

    def host(t):
        if t is None:
            return None
        if t.device.type != "cpu" and capturing:
            return None
        return t.detach().reshape(-1).to("cpu", torch.float64).expand(D)

    lo, hi, sc = host(lower), host(upper), host(step_clip)
    for name, t in (("lower", lo), ("upper", hi)):
        if t is not None and bool(torch.isnan(t).any()):
            raise ValueError(f"{op}: {name} must not be NaN (coordinate {int(torch.isnan(t).nonzero()[0])})")
    if lo is not None and hi is not None and bool((lo > hi).any()):
        j = int((lo > hi).nonzero()[0])
        raise ValueError(f"{op}: lower must be <= upper; coordinate {j} has lower {float(lo[j])} > upper "
                         f"{float(hi[j])}")
    if sc is not None and not bool((sc > 0).all()):
        j = int((~(sc > 0)).nonzero()[0])
        raise ValueError(f"{op}: step_clip must be > 0; coordinate {j} has {float(sc[j])}")


def schedule(op: str, name: str, t, dev: torch.device, steps: Optional[int] = None) -> int:
    """A per-step schedule [steps] (floating, on the cpu or on the op's device ``dev``); returns steps."""
    dense(op, name, t)
    if not t.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating [steps] tensor; got {describe(t)}")
    if t.device.type != "cpu" and t.device != dev:
        raise ValueError(f"{op}: {name} must be on the cpu or on {dev}; got {describe(t)}")
    if steps is None and (t.dim() != 1 or t.shape[0] < 1):
        raise ValueError(f"{op}: {name} must be a floating [steps] tensor with steps >= 1; got {describe(t)}")
    if steps is not None and (t.dim() != 1 or t.shape[0] != steps):
        raise ValueError(f"{op}: {name} must be a floating [steps] = [{steps}] tensor; got {describe(t)}")
    return t.shape[0]


def schedule_values(op: str, name: str, t: Tensor, non_negative: bool = False) -> None:
    """Every value finite (and >= 0 for noise levels); real tensors only (reads them on the host)."""
    v = t.detach().to("cpu", torch.float64)
    bad = ~torch.isfinite(v)
    if non_negative:
        bad |= v < 0
    if bool(bad.any()):
        k = int(bad.nonzero()[0])
        want = "a finite number >= 0" if non_negative else "finite"
        raise ValueError(f"{op}: {name}[{k}] must be {want}; got {float(v[k])}")


def descent_update_args(op: str, y, g, E, active, steps, status, velocity, pending, noise, mask, fixed, lower,
                        upper, step_clip, noise_mode_: str, momentum: float, tol: float, tol_final_step: bool,
                        y_base=None, triton: bool = False) -> Tuple[int, int]:
    """(N, D) of descent_update's rows, every tensor checked against y (csrc: check_update_args). The Triton op
    (``triton=True``) takes float32/bfloat16/float16, needs unit stride along D only, and pending only when
    tol > 0."""
    dtypes = TRITON_DTYPES if triton else (torch.float32, torch.float64)
    contiguous = not triton
    dense(op, "y", y)
    if y.dim() != 2:
        raise ValueError(f"{op}: y must be [N, D]; got shape {list(y.shape)}")
    if y.dtype not in dtypes:
        raise TypeError(f"{op}: y must be one of {', '.join(dtype_name(d) for d in dtypes)}; got {describe(y)}")
    N, D = y.shape
    noise_mode(noise_mode_)

    def need(t, name, shp, dt, why=""):
        if t is None:
            raise ValueError(f"{op}: {name} is required{why}")
        dense(op, name, t)
        shape(op, name, t, shp, "[N, D]" if len(shp) == 2 else "[N]")
        dtype(op, name, t, dt)
        device(op, name, t, y.device)
        if contiguous and not t.is_contiguous():
            raise ValueError(f"{op}: {name} must be a contiguous tensor on {y.device}; got strides {t.stride()}")
        if not contiguous:
            if len(shp) == 2 and D > 1 and t.stride(1) != 1:
                raise ValueError(f"{op}: {name} must have unit stride along D; got strides {t.stride()}")
            if len(shp) == 1 and N > 1 and t.stride(0) != 1:
                raise ValueError(f"{op}: {name} must be contiguous; got strides {t.stride()}")

    need(y, "y", (N, D), y.dtype)
    need(g, "g", (N, D), y.dtype)
    need(E, "E", (N,), y.dtype)
    need(active, "active", (N,), torch.bool)
    need(steps, "steps", (N,), torch.int32)
    need(status, "status", (N,), torch.int8)
    if velocity is not None or momentum > 0:
        need(velocity, "velocity", (N, D), y.dtype, " when momentum > 0")
    if pending is not None or (tol_final_step and (tol > 0 or not triton)):
        need(pending, "pending", (N,), torch.bool, " when tol_final_step")
    if noise is not None or noise_mode_ != "none":
        need(noise, "noise", (N, D), y.dtype, f" for noise_mode {noise_mode_!r}")
    if mask is not None:
        need(mask, "mask", (N, D), torch.bool)
        need(fixed, "fixed", (N, D), y.dtype, " with mask")
    if y_base is not None:
        need(y_base, "y_base", (N, D), y.dtype)
    for name, t in (("lower", lower), ("upper", upper), ("step_clip", step_clip)):
        event_option(op, name, t, D, y.device)
    return N, D


def mlp_descent_args(op: str, ctx, y0, w_in, weights, biases, w_out, b_out, activation_: str, eta, noise_level,
                     noise, lower, upper, step_clip, mask, noise_mode_: str, momentum, grad_clip, grad_clip_norm,
                     energy_temperature, tol, grad_scale) -> Tuple[int, int, int, int]:
    """(steps, B, K, D) of the whole-loop ops (mlp_descent; mlp_descent_triton passes noise=None)."""
    B, K, D, _ = mlp_args(op, ctx, y0, w_in, weights, biases, w_out, b_out, y_name="y0")
    activation(activation_)
    noise_mode(noise_mode_)
    rule(momentum, grad_clip, grad_clip_norm, energy_temperature, tol)
    finite(op, "grad_scale", grad_scale)
    T = schedule(op, "eta", eta, y0.device)
    schedule(op, "noise_level", noise_level, y0.device, T)
    if mask is not None:
        dense(op, "mask", mask)
        dtype(op, "mask", mask, torch.bool)
        shape(op, "mask", mask, (B, K, D), "[B, K, D]")
        device(op, "mask", mask, y0.device)
    if noise is not None:
        dense(op, "noise", noise)
        floating(op, "noise", noise)
        shape(op, "noise", noise, (T, B, K, D), "[steps, B, K, D]")
        device(op, "noise", noise, y0.device)
    for name, t in (("lower", lower), ("upper", upper), ("step_clip", step_clip)):
        event_option(op, name, t, D, y0.device)
    return T, B, K, D


def select_best_args(op: str, y, E, E_init, status, selection: str) -> Tuple[int, int]:
    for name, t in (("y", y), ("E", E), ("E_init", E_init), ("status", status)):
        dense(op, name, t)
    if selection not in ("min", "max", "max_gap"):
        raise ValueError(f"pyebm: selection must be min, max or max_gap; got {selection!r}")
    if E.dim() != 2:
        raise ValueError(f"{op}: E must be [B, K]; got shape {list(E.shape)}")
    floating(op, "E", E)
    B, K = E.shape
    if K < 1:
        raise ValueError(f"{op}: select_best needs at least one candidate per context (K >= 1)")
    if y.dim() < 2 or y.shape[0] != B or y.shape[1] != K:
        raise ValueError(f"{op}: y must be [B, K, ...] = [{B}, {K}, ...]; got shape {list(y.shape)}")
    shape(op, "E_init", E_init, (B, K), "[B, K]")
    like(op, "E_init", E_init, E, "E")
    if tuple(status.shape) != (B, K) or status.dtype != torch.int8:
        raise ValueError(f"{op}: status must be int8 [B, K] = [{B}, {K}]; got {describe(status)}")
    device(op, "status", status, E.device)
    device(op, "y", y, E.device)
    return B, K


# -- EBT-Policy ----------------------------------------------------------------------------------

EMBED_NAMES = ("embed.fc1.weight", "embed.fc1.bias", "embed.norm.weight", "embed.norm.bias", "embed.fc2.weight",
               "embed.fc2.bias", "pos_emb")
LAYER_NAMES = ("norm1.weight", "attn.qkv.weight", "attn.qkv.bias", "attn.q_norm.weight", "attn.k_norm.weight",
               "attn.proj.weight", "attn.proj.bias", "norm2.weight", "cross.q.weight", "cross.q.bias",
               "cross.q_norm.weight", "cross.proj.weight", "norm3.weight", "mlp.fc1.weight", "mlp.fc1.bias",
               "mlp.fc2.weight", "mlp.fc2.bias")
HEAD_NAMES = ("head.norm.weight", "head.fc1.weight", "head.fc1.bias", "head.fc2.weight", "head.fc2.bias")
N_EMBED, N_LAYER, N_HEAD = len(EMBED_NAMES), len(LAYER_NAMES), len(HEAD_NAMES)
TRANSPOSED_SLOTS = (1, 5, 8, 11, 13, 15)  # the per-layer weights with a transposed copy in weights_t


def ebt_param_name(i: int, layers: int) -> str:
    if i < N_EMBED:
        return EMBED_NAMES[i]
    l, j = divmod(i - N_EMBED, N_LAYER)
    if l < layers:
        return f"blocks.{l}.{LAYER_NAMES[j]}"
    return HEAD_NAMES[i - N_EMBED - N_LAYER * layers]


def ebt_param_shapes(D: int, A: int, T: int, hd: int, O: int, layers: int) -> List[Tuple[int, ...]]:
    """The exact shape of every parameter of the op's list (``param_list``)."""
    out = [(D, A), (D,), (D,), (D,), (D, D), (D,), (T, D)]
    per = [(D,), (3 * D, D), (3 * D,), (hd,), (hd,), (D, D), (D,), (D,), (D, D), (D,), (hd,), (D, D), (D,),
           (D, D), (D,), (D, D), (D,)]
    for _ in range(layers):
        out += per
    out += [(D,), (D, D), (D,), (O, D), (O,)]
    return out


def ebt_transposed_sources(layers: int) -> List[int]:
    """The parameter index of each entry of ``weights_t``."""
    idx = [4]
    for l in range(layers):
        idx += [N_EMBED + N_LAYER * l + j for j in TRANSPOSED_SLOTS]
    return idx + [N_EMBED + N_LAYER * layers + 1, N_EMBED + N_LAYER * layers + 3]


def _ebt_input(op: str, name: str, t) -> None:
    dense(op, name, t)
    if t.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{op}: the EBT-Policy ops take float32 or float64; got {name} as {describe(t)}")


def ebt_net_args(op: str, y_name: str, y, ctx_k, ctx_v, bias, params, weights_t, heads: int, rms_eps: float,
                 ln_eps: float) -> dict:
    """The dimensions (B, K, T, A, D, H, hd, L, O, layers) of the EBT-Policy network ops, every tensor checked
    against y (csrc: check_net_args). The kernel's device check (cpu) is not here: fakes run on any device."""
    _ebt_input(op, y_name, y)
    if y.dim() != 4:
        raise ValueError(f"{op}: {y_name} must be [B, K, T, A]; got shape {list(y.shape)}")
    if int(heads) < 1:
        raise ValueError(f"{op}: heads must be >= 1; got {heads}")
    non_negative(op, "rms_eps", rms_eps)
    non_negative(op, "ln_eps", ln_eps)
    B, K, T, A = y.shape
    if T < 1:
        raise ValueError(f"{op}: {y_name} must have T >= 1 action tokens; got shape {list(y.shape)}")
    params = tensor_list(op, "params", params)
    weights_t = tensor_list(op, "weights_t", weights_t)
    n = len(params)
    if n < N_EMBED + N_HEAD or (n - N_EMBED - N_HEAD) % N_LAYER != 0:
        raise ValueError(f"{op}: params must hold {N_EMBED} + {N_LAYER} * layers + {N_HEAD} tensors; got {n}")
    layers = (n - N_EMBED - N_HEAD) // N_LAYER
    for i, t in enumerate(params):
        nm = f"params[{i}] ({ebt_param_name(i, layers)})"
        dense(op, nm, t)
        like(op, nm, t, y, y_name)
    for name, t in (("ctx_k", ctx_k), ("ctx_v", ctx_v), ("bias", bias)):
        dense(op, name, t)
        like(op, name, t, y, y_name)
    w0 = params[0]
    if w0.dim() != 2 or w0.shape[1] != A:
        raise ValueError(f"{op}: params[0] (embed.fc1.weight) must be [D, A = {A}]; got shape {list(w0.shape)}")
    D = w0.shape[0]
    if D < 1 or D % heads != 0:
        raise ValueError(f"{op}: the width D = {D} (params[0] is [D, A]) must be >= 1 and divisible by "
                         f"heads = {heads}")
    hd = D // heads
    i_hw2 = N_EMBED + N_LAYER * layers + 3
    hw2 = params[i_hw2]
    if hw2.dim() != 2 or hw2.shape[1] != D or hw2.shape[0] < 1:
        raise ValueError(f"{op}: params[{i_hw2}] (head.fc2.weight) must be [O, D = {D}] with O >= 1; got shape "
                         f"{list(hw2.shape)}")
    O = hw2.shape[0]
    if (ctx_k.dim() != 5 or tuple(ctx_k.shape[:4]) != (layers, B, heads, hd) or ctx_k.shape[4] < 1):
        raise ValueError(f"{op}: ctx_k must be [layers={layers}, B={B}, H={heads}, hd={hd}, L] with L >= 1; got "
                         f"shape {list(ctx_k.shape)}")
    L = ctx_k.shape[4]
    shape(op, "ctx_v", ctx_v, (layers, B, heads, L, hd), "[layers, B, H, L, hd]")
    shape(op, "bias", bias, (T, L), "[T, L]")
    for i, (t, want) in enumerate(zip(params, ebt_param_shapes(D, A, T, hd, O, layers))):
        shape(op, f"params[{i}] ({ebt_param_name(i, layers)})", t, want)
    n_t = 1 + 6 * layers + 2
    if weights_t and len(weights_t) != n_t:
        raise ValueError(f"{op}: weights_t must be empty or hold 1 + 6 * layers + 2 = {n_t} tensors; got "
                         f"{len(weights_t)}")
    for i, (t, src) in enumerate(zip(weights_t, ebt_transposed_sources(layers))):
        dense(op, f"weights_t[{i}]", t)
        like(op, f"weights_t[{i}]", t, y, y_name)
        w = params[src]
        if t.dim() != 2 or tuple(t.shape) != (w.shape[1], w.shape[0]):
            raise ValueError(f"{op}: weights_t[{i}] must be the transpose of params[{src}] "
                             f"({ebt_param_name(src, layers)}) {list(w.shape)}, i.e. {[w.shape[1], w.shape[0]]}; "
                             f"got shape {list(t.shape)}")
    return dict(B=B, K=K, T=T, A=A, D=D, H=heads, hd=hd, L=L, O=O, layers=layers)


def ebt_descent_args(op: str, y0, ctx_k, ctx_v, bias, params, weights_t, heads, rms_eps, ln_eps, eta, lower, upper,
                     step_clip, normalize: str, normalize_eps, grad_clip, grad_clip_norm, momentum,
                     energy_temperature, tol, tol_scope: str, grad_scale) -> dict:
    dims = ebt_net_args(op, "y0", y0, ctx_k, ctx_v, bias, params, weights_t, heads, rms_eps, ln_eps)
    if normalize not in ("none", "rms", "all"):
        raise ValueError(f"{op}: normalize must be none, rms or all; got {normalize!r}")
    if tol_scope not in ("candidate", "all"):
        raise ValueError(f"{op}: tol_scope must be candidate or all; got {tol_scope!r}")
    non_negative(op, "normalize_eps", normalize_eps)
    rule(momentum, grad_clip, grad_clip_norm, energy_temperature, tol)
    finite(op, "grad_scale", grad_scale)
    if tol > 0 and tol_scope == "all" and (grad_clip is not None or grad_clip_norm is not None):
        raise ValueError(f"{op}: tol_scope 'all' is not combined with gradient clipping here")
    dense(op, "eta", eta)
    if eta.dim() != 1 or eta.numel() < 1:
        raise ValueError(f"{op}: eta must be [steps] with steps >= 1; got shape {list(eta.shape)}")
    schedule(op, "eta", eta, y0.device)
    D = dims["T"] * dims["A"]
    for name, t in (("lower", lower), ("upper", upper), ("step_clip", step_clip)):
        event_option(op, name, t, D, y0.device)
    return dims


def ebt_context_args(op: str, obs, w, b, k_norm, heads: int, rms_eps: float) -> Tuple[int, int, int, int, int]:
    """(B, L, layers, H, hd) of ebt_policy_context."""
    _ebt_input(op, "obs", obs)
    if obs.dim() != 3:
        raise ValueError(f"{op}: obs must be [B, L, C]; got shape {list(obs.shape)}")
    for name, t in (("w", w), ("b", b), ("k_norm", k_norm)):
        dense(op, name, t)
        like(op, name, t, obs, "obs")
    if int(heads) < 1:
        raise ValueError(f"{op}: heads must be >= 1; got {heads}")
    non_negative(op, "rms_eps", rms_eps)
    B, L, C = obs.shape
    if k_norm.dim() != 2:
        raise ValueError(f"{op}: k_norm must be [layers, hd]; got shape {list(k_norm.shape)}")
    layers, hd = k_norm.shape
    D = heads * hd
    if w.dim() != 2 or tuple(w.shape) != (layers * 2 * D, C):
        raise ValueError(f"{op}: w must be [layers * 2D = {layers * 2 * D}, C = {C}]; got shape {list(w.shape)}")
    if b.dim() != 1 or b.shape[0] != layers * 2 * D:
        raise ValueError(f"{op}: b must be [{layers * 2 * D}]; got shape {list(b.shape)}")
    return B, L, layers, heads, hd


# -- the Triton custom ops -----------------------------------------------------------------------

def triton_input(op: str, name: str, t) -> None:
    """A float32/bfloat16/float16 dense tensor (the device rule is the op's: see triton_device)."""
    dense(op, name, t)
    if t.dtype not in TRITON_DTYPES:
        raise TypeError(f"{op}: the triton backend takes {name} as float32, bfloat16 or float16; got {describe(t)}")


def same(op: str, name: str, t, ref: Tensor, ref_name: str, shp: Optional[Sequence[int]] = None) -> None:
    """t: a dense tensor with ref's dtype and device (and the shape shp)."""
    dense(op, name, t)
    if shp is not None:
        shape(op, name, t, shp)
    like(op, name, t, ref, ref_name)


def n_visible(op: str, nv, B: int, R: int, ref: Tensor) -> None:
    dense(op, "n_visible", nv)
    if (nv.dtype not in (torch.int32, torch.int64) or nv.dim() not in (1, 2) or nv.shape[-1] != R
            or (nv.dim() == 2 and nv.shape[0] != B)):
        raise ValueError(f"{op}: n_visible must be an integer tensor [R={R}] or [B={B}, R={R}]; got {describe(nv)}")
    if nv.device != ref.device:
        raise ValueError(f"{op}: n_visible is on {nv.device} but q is on {ref.device} (they must be on one device)")


def attention_args(op: str, q, k_ctx, v_ctx, k_self, v_self, nv) -> Tuple[int, int, int, int]:
    """(B, H, R, hd) of ebt_attention_fwd / _bwd."""
    triton_input(op, "q", q)
    if q.dim() != 4:
        raise ValueError(f"{op}: q must be [B, H, R, head_dim]; got shape {list(q.shape)}")
    B, H, R, hd = q.shape
    for name, t in (("k_ctx", k_ctx), ("v_ctx", v_ctx)):
        dense(op, name, t)
        if t.dim() != 4 or tuple(t.shape[:2]) != (B, H) or t.shape[3] != hd or t.shape[2] != k_ctx.shape[2]:
            raise ValueError(f"{op}: {name} must be [B={B}, H={H}, T, head_dim={hd}] (same T for both); got shape "
                             f"{list(t.shape)}")
        like(op, name, t, q, "q")
    if (k_self is None) != (v_self is None):
        raise ValueError(f"{op}: k_self and v_self must be given together")
    for name, t in (("k_self", k_self), ("v_self", v_self)):
        if t is not None:
            same(op, name, t, q, "q", (B, H, R, hd))
    if nv is not None:
        n_visible(op, nv, B, R, q)
    return B, H, R, hd


def rms_norm_args(op: str, x, weight, eps) -> None:
    triton_input(op, "x", x)
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have at least one dimension; got a scalar")
    non_negative(op, "eps", eps)
    if weight is not None:
        dense(op, "weight", weight)
        shape(op, "weight", weight, (x.shape[-1],), "[D]")
        if weight.dtype not in TRITON_DTYPES:
            raise TypeError(f"{op}: weight must be float32, bfloat16 or float16; got {describe(weight)}")
        device(op, "weight", weight, x.device)


def swiglu_args(op: str, a, b) -> None:
    triton_input(op, "a", a)
    if a.dim() < 1:
        raise ValueError(f"{op}: a must have at least one dimension; got a scalar")
    same(op, "b", b, a, "a", a.shape)


def vocab_args(op: str, name: str, x, w, axis: int) -> Tuple[int, int]:
    """(D, V) for x [..., V] (axis 1 of w) or [..., D] (axis 0)."""
    triton_input(op, name, x)
    dense(op, "w", w)
    if w.dim() != 2:
        raise ValueError(f"{op}: w must be [D, V]; got shape {list(w.shape)}")
    D, V = w.shape
    k = w.shape[axis]
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"{op}: {name} must be [..., {'V' if axis else 'D'}={k}] for w [D={D}, V={V}]; got shape "
                         f"{list(x.shape)}")
    like(op, "w", w, x, name)
    return D, V


def policy_self_attn_args(op: str, qkv, q_weight, k_weight, heads: int) -> int:
    triton_input(op, "qkv", qkv)
    if qkv.dim() != 3 or qkv.shape[2] % 3 != 0:
        raise ValueError(f"{op}: qkv must be [N, T, 3 * embed_dim]; got shape {list(qkv.shape)}")
    D = qkv.shape[2] // 3
    if heads < 1 or D % heads != 0:
        raise ValueError(f"{op}: heads must be >= 1 and divide embed_dim={D}; got {heads}")
    hd = D // heads
    same(op, "q_weight", q_weight, qkv, "qkv", (hd,))
    same(op, "k_weight", k_weight, qkv, "qkv", (hd,))
    return hd


def policy_cross_args(op: str, q, q_weight, k_ctx, v_ctx, nv) -> None:
    triton_input(op, "q", q)
    if q.dim() != 4:
        raise ValueError(f"{op}: q must be [B, H, R, head_dim]; got shape {list(q.shape)}")
    B, H, R, hd = q.shape
    same(op, "q_weight", q_weight, q, "q", (hd,))
    for name, t in (("k_ctx", k_ctx), ("v_ctx", v_ctx)):
        dense(op, name, t)
        if t.dim() != 4 or tuple(t.shape[:2]) != (B, H) or t.shape[3] != hd or t.shape[2] != k_ctx.shape[2]:
            raise ValueError(f"{op}: {name} must be [B={B}, H={H}, L, head_dim={hd}] (same L for both); got shape "
                             f"{list(t.shape)}")
        like(op, name, t, q, "q")
    n_visible(op, nv, B, R, q)


def policy_rms_args(op: str, x, weight) -> None:
    triton_input(op, "x", x)
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have at least one dimension; got a scalar")
    same(op, "weight", weight, x, "x", (x.shape[-1],))


def fp32_aux(op: str, name: str, t, shp: Sequence[int], ref: Tensor, from_op: str) -> None:
    """An auxiliary float32 output of a forward (lse, rstd) handed to its backward."""
    dense(op, name, t)
    if tuple(t.shape) != tuple(shp) or t.dtype != torch.float32:
        raise ValueError(f"{op}: {name} must be fp32 {list(shp)} from {from_op}; got {describe(t)}")
    device(op, name, t, ref.device)


# -- EBT ----------------------------------------------------------------------------------------------

def rows_linear_args(op: str, x, w, add) -> Tuple[int, int]:
    """(M, N) of ``rows_linear``: x [M, K] float32/float64, w [N, K] and add [M, N] (optional) like x."""
    dense(op, "x", x)
    dense(op, "w", w)
    if x.dim() != 2:
        raise ValueError(f"{op}: x must be [M, K]; got {describe(x)}")
    if w.dim() != 2:
        raise ValueError(f"{op}: w must be [N, K]; got {describe(w)}")
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{op}: x must be float32 or float64; got {describe(x)}")
    like(op, "w", w, x, "x")
    M, K = x.shape
    N = w.shape[0]
    if w.shape[1] != K:
        raise ValueError(f"{op}: w must be [N, K] with K = {K} (x's columns); got {describe(w)}")
    if add is not None:
        dense(op, "add", add)
        shape(op, "add", add, (M, N), "[M, N]")
        like(op, "add", add, x, "x")
    return M, N


def _f32_cpu(op: str, name: str, t) -> None:
    """A dense float32 tensor (the ebt_rows_* ops' CPU kernels)."""
    dense(op, name, t)
    if t.dtype != torch.float32:
        raise TypeError(f"{op}: {name} must be float32 (the CPU kernel); got {describe(t)}")
    if t.device.type not in ("cpu", "meta"):
        raise ValueError(f"{op}: the cpu kernel needs CPU tensors; got {name} on {t.device}")


def ebt_rows_attention_args(op: str, qkv, k_ctx, v_ctx, cos, sin, nv) -> Tuple[int, int, int, int]:
    """(B, R, H, hd) of ``ebt_rows_attention`` / ``_bwd``: qkv [B, R, 3, H, hd] before RoPE, the cache
    k_ctx / v_ctx [B, H, T, hd], the RoPE tables cos / sin [R, hd], n_visible [R] or [B, R] integer or None."""
    _f32_cpu(op, "qkv", qkv)
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"{op}: qkv must be [B, R, 3, H, head_dim]; got {describe(qkv)}")
    B, R, _, H, hd = qkv.shape
    if hd % 2:
        raise ValueError(f"{op}: head_dim must be even (RoPE rotates pairs); got {hd}")
    for name, t in (("k_ctx", k_ctx), ("v_ctx", v_ctx)):
        _f32_cpu(op, name, t)
        if t.dim() != 4 or (t.shape[0], t.shape[1], t.shape[3]) != (B, H, hd) or t.shape[2] != k_ctx.shape[2]:
            raise ValueError(f"{op}: {name} must be [B={B}, H={H}, T, head_dim={hd}] (same T for both); got "
                             f"{describe(t)}")
    for name, t in (("cos", cos), ("sin", sin)):
        _f32_cpu(op, name, t)
        shape(op, name, t, (R, hd), "[R, head_dim]")
    if nv is not None:
        dense(op, "n_visible", nv)
        if nv.dtype.is_floating_point or nv.dtype == torch.bool or nv.is_complex():
            raise TypeError(f"{op}: n_visible must be an integer tensor; got {describe(nv)}")
        if nv.device.type not in ("cpu", "meta"):
            raise ValueError(f"{op}: n_visible must be on the cpu; got {describe(nv)}")
        if not ((nv.dim() == 1 and nv.shape[0] == R) or (nv.dim() == 2 and tuple(nv.shape) == (B, R))):
            raise ValueError(f"{op}: n_visible must be [R={R}] or [B={B}, R={R}]; got {describe(nv)}")
    return B, R, H, hd


def ebt_rows_attention_bwd_args(op: str, do, qkv, k_ctx, v_ctx, o, lse, cos, sin, nv) -> Tuple[int, int, int, int]:
    B, R, H, hd = ebt_rows_attention_args(op, qkv, k_ctx, v_ctx, cos, sin, nv)
    for name, t in (("do", do), ("o", o)):
        _f32_cpu(op, name, t)
        shape(op, name, t, (B, R, H * hd), "[B, R, H * head_dim]")
    _f32_cpu(op, "lse", lse)
    shape(op, "lse", lse, (B, H, R), "[B, H, R]")
    return B, R, H, hd


def ebt_rows_2d(op: str, name: str, t) -> Tuple[int, int]:
    _f32_cpu(op, name, t)
    if t.dim() != 2:
        raise ValueError(f"{op}: {name} must be [M, D]; got {describe(t)}")
    return t.shape[0], t.shape[1]


def ebt_rows_rms_norm_bwd_args(op: str, xn, r, g, add) -> Tuple[int, int]:
    M, D = ebt_rows_2d(op, "xn", xn)
    _f32_cpu(op, "r", r)
    shape(op, "r", r, (M, 1), "[M, 1]")
    _f32_cpu(op, "g", g)
    if not ((g.dim() == 2 and tuple(g.shape) == (M, D)) or (g.dim() == 1 and g.shape[0] == D)):
        raise ValueError(f"{op}: g must be [M={M}, D={D}] or [D]; got {describe(g)}")
    if add is not None:
        ebt_rows_2d(op, "add", add)
        shape(op, "add", add, (M, D), "[M, D]")
    return M, D


def ebt_rows_swiglu_args(op: str, uz) -> Tuple[int, int]:
    M, F2 = ebt_rows_2d(op, "uz", uz)
    if F2 % 2:
        raise ValueError(f"{op}: uz must be [M, 2F] (u then z); got {describe(uz)}")
    return M, F2 // 2
