"""Compiled descent for a user's own ``nn.Module`` energy ``f(x, y) -> E [B, K]`` (the "compiled" path).

A plain module has no fused kernels of its own; ``pyebm.minimize`` otherwise runs it through autograd step by
step (the "autograd" path). Here a chunk of S descent steps runs as one ``torch.compile`` region:

    for each of the S steps:   ys = descent_pre(y)                   (normalize / pre noise / project / mask)
                               G, E = torch.func.grad_and_value(sum f(x, .))(ys [+ mu v])   (no graph over
                                                                      the weights: only y is differentiated)
                               descent_update(y, G, E, ...)          (pyebm's fused update when it applies)

compiled with Inductor (CPU and GPU; ``mode="reduce-overhead"``, i.e. CUDA graphs, on CUDA tensors; the CUDA
form has not run on a GPU yet). On the CPU, plain 2-D convolutions and their gradients are decomposed into
patches (shifted windows of the input, position-major from two input channels) and one BLAS product each,
which Inductor fuses with their neighbours: oneDNN's per-call set-up dominates the small convolutions energies
use; the kernels are called from a C++ wrapper (``_inductor_cpu``). The
loop over chunks stays on the host: T = 50 steps run as five calls of a 10-step chunk (one compile per chunk
length), and with ``tol > 0`` the "all stopped" check happens between chunks (a step of a stopped candidate
changes nothing, so where the check happens changes the speed, never the result). Noise is drawn on the host,
step by step from the call's generator in the order of the eager path, and passed in; for Heun and for a noise
schedule with a constant step size, each step's noise factors are passed in too (``noise_scales``), so one
graph serves every chunk of an Energy Matching run. Heun (``integrator="heun"``) evaluates the gradient twice
a step inside the chunk, as the eager path does. The final energy pass is a second compiled function.
Selection runs as on the eager path.

The cache (``pyebm._compiled_cache``). Compiled functions are kept per module in a table that holds the module
weakly (never on the module: deep copies and pickles of it are unaffected, and a copy compiles its own), keyed
by the module's type, training flag, the names / shapes / dtypes / devices / requires_grad of its parameters
and buffers, the config, the candidate and context shapes, dtype and device, the mask's presence and the chunk
length. Nothing derived from the weights is stored: the module is an argument of every compiled call, and
dynamo lifts its parameters and buffers as graph inputs read at call time (``.data =`` swaps,
``load_state_dict``, optimizer steps and other in-place writes are seen by the next call), and guards on the
module's other attributes (a changed Python attribute recompiles). Each entry compiles its own copy of the
chunk function (its own code object), so entries never share dynamo's per-code recompile budget. Compile time
is measured per entry (``stats(module)``, ``pyebm.explain``) and logged on the ``pyebm`` logger.

Which call takes this path is ``pyebm._dispatch.compiled_refusal`` (``minimize(..., compile=...)``).
"""
from __future__ import annotations

import logging
import time
import types
from dataclasses import dataclass
from typing import Any, Optional, Tuple

import torch
from torch import Tensor, nn

# the rules and the cache, also under this module's name
from pyebm._compiled_cache import (AUTO_AFTER_CALLS, AUTO_MIN_STEPS, MAX_CHUNK, PAY_CALLS, EntryStats,  # noqa: F401
                                   _constant_schedules, _Entry, calls_seen, cached, chunk_limit, chunk_lengths, clear,
                                   compiler_refusal, config_refusal, describe, does_not_pay, entry, note_call,
                                   note_compiled_call, post_noise_mode, scaled_noise, signature, stats)
from pyebm.ops import descent as _ops

log = logging.getLogger("pyebm")

# -- the compiled functions ---------------------------------------------------------------------------

def _fresh(fn):
    """A copy of ``fn`` with its own code object: dynamo keeps its compiled graphs per code object, so each
    cache entry gets its own (no shared recompile budget, no entry evicting another)."""
    code = fn.__code__.replace()
    return types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


def _compile(fn, device: torch.device):
    if device.type == "cuda":
        return torch.compile(_fresh(fn), mode="reduce-overhead", fullgraph=False, dynamic=False)
    return torch.compile(_fresh(fn), backend=_inductor_cpu, fullgraph=False, dynamic=False)


# -- small convolutions on the CPU as patches and one matrix product ----------------------------------------

aten = torch.ops.aten

# From this many input channels the patches are position-major ([N*L, kh*kw*C]: a row holds a position's taps,
# each a run of C channels) and the input gradient is gathered channel-innermost; below it (one channel: a row
# of kh*kw single values) they stay channel-major ([kh*kw*C, N*L]).
POSITION_MAJOR_MIN_CHANNELS = 2


def _conv_geometry(x, w, stride, padding, dilation, transposed, groups):
    """(kh, kw, Ho, Wo) of a plain 2-D convolution on CPU tensors, or None (another kind: left to ATen)."""
    if transposed or groups != 1 or x.dim() != 4 or w.dim() != 4 or x.device.type != "cpu" \
            or len(stride) != 2 or len(padding) != 2 or len(dilation) != 2:
        return None
    kh, kw = w.shape[2], w.shape[3]
    ho = (x.shape[2] + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (x.shape[3] + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return kh, kw, ho, wo


def _shifted_taps(x, kh, kw, stride, padding, dilation, ho, wo):
    """The kh*kw taps of x [..., H, W] (tap-major, row-major over the kernel): tap (i, j) [..., Ho, Wo] holds
    x[..., s0*h + i*d0 - p0, s1*w + j*d1 - p1], zero outside x. Each is one constant pad of x with pads of
    either sign (a negative pad crops) and a strided slice: a shifted window read straight from x, so no padded
    copy of x is made and x itself is computed once for all taps."""
    h, w = x.shape[-2], x.shape[-1]
    hh, ww = stride[0] * (ho - 1) + 1, stride[1] * (wo - 1) + 1
    taps = []
    for i in range(kh):
        for j in range(kw):
            a, b = i * dilation[0] - padding[0], j * dilation[1] - padding[1]
            t = aten.constant_pad_nd(x, [-b, b + ww - w, -a, a + hh - h])
            taps.append(t[..., ::stride[0], ::stride[1]])
    return taps


def _patches(x, kh, kw, stride, padding, dilation, ho, wo):
    """Channel-major patches [kh*kw*C, N*Ho*Wo] of x [N, C, H, W], rows ordered as ``_weight_rows(w)``'s
    columns: each row a run of output positions (the product's long dimension)."""
    n, c = x.shape[0], x.shape[1]
    taps = _shifted_taps(x.permute(1, 0, 2, 3), kh, kw, stride, padding, dilation, ho, wo)    # [C, N, Ho, Wo]
    return torch.stack(taps, dim=0).reshape(kh * kw * c, n * ho * wo)


def _patch_rows(x, kh, kw, stride, padding, dilation, ho, wo):
    """Position-major patches [N*Ho*Wo, kh*kw*C] of x [N, C, H, W]: a row holds one output position's taps,
    each a run of the C channels (columns ordered as ``_weight_rows(w)``'s)."""
    n, c = x.shape[0], x.shape[1]
    taps = _shifted_taps(x, kh, kw, stride, padding, dilation, ho, wo)                           # [N, C, Ho, Wo]
    return torch.stack([t.permute(0, 2, 3, 1) for t in taps], dim=3).reshape(n * ho * wo, kh * kw * c)


def _weight_rows(w):
    """w [O, C, kh, kw] as [O, kh*kw*C], tap-major like ``_patches`` and ``_patch_rows``."""
    return w.permute(0, 2, 3, 1).reshape(w.shape[0], -1)


def _add_taps(d, kh, kw, stride, dilation, ho, wo, hp, wp):
    """The padded input's gradient [.., Hp, Wp, C] from the patches' gradient d [.., Ho, Wo, K, C] (the
    positions, then the kh*kw taps, then the channels): each tap added back where it was read. A stride s
    splits the padded grid into s x s phases (positions a + s*y of a tap at offset a fall in phase a % s,
    shifted by a // s): per phase the taps are shifted (padded) and added at the reduced resolution, and the
    phases interleaved once, so no strided scatter. Computed channel-innermost: each tap's read is a run of
    C values."""
    s0, s1 = stride
    hq, wq = -(-hp // s0), -(-wp // s1)
    lead, c = d.shape[:-4], d.shape[-1]
    phases = {}
    for k, (i, j) in enumerate((i, j) for i in range(kh) for j in range(kw)):
        a, b = i * dilation[0], j * dilation[1]
        (qa, pa), (qb, pb) = divmod(a, s0), divmod(b, s1)
        t = aten.constant_pad_nd(d[..., k, :], [0, 0, qb, wq - wo - qb, qa, hq - ho - qa])      # [.., Hq, Wq, C]
        phases[(pa, pb)] = t if (pa, pb) not in phases else phases[(pa, pb)] + t
    if s0 == 1 and s1 == 1:
        grid = phases[(0, 0)]
    else:
        zero = d.new_zeros(*lead, hq, wq, c)
        rows = [torch.stack([phases.get((pa, pb), zero) for pb in range(s1)], dim=-2) for pa in range(s0)]
        grid = torch.stack(rows, dim=-4).reshape(*lead, hq * s0, wq * s1, c)                 # [.., Hq, s0, Wq, s1, C]
    return grid[..., :hp, :wp, :]


def _conv_as_mm(x, w, b, stride, padding, dilation, transposed, output_padding, groups):
    """aten.convolution as patches and one [O, kh*kw*C] @ [kh*kw*C, N*L] product: Inductor fuses the patches,
    the bias and the activation around one BLAS call, where oneDNN spends most of a small convolution's time
    on set-up. The output positions are the product's long dimension (several times faster than the
    transposed orientation for the few output channels of small energies); with several input channels the
    patches are stored position-major and read transposed by the product (a row's taps are runs of C
    channels, so the patch gather moves whole runs)."""
    geo = _conv_geometry(x, w, stride, padding, dilation, transposed, groups)
    if geo is None:
        return NotImplemented
    kh, kw, ho, wo = geo
    n, c, o = x.shape[0], x.shape[1], w.shape[0]
    if c >= POSITION_MAJOR_MIN_CHANNELS:
        cols = _patch_rows(x, kh, kw, stride, padding, dilation, ho, wo).t()
    else:
        cols = _patches(x, kh, kw, stride, padding, dilation, ho, wo)
    out = torch.mm(_weight_rows(w), cols)                                              # [O, N*L]
    if b is not None:
        out = out + b[:, None]
    return out.view(o, n, ho, wo).permute(1, 0, 2, 3)


def _conv_backward_as_mm(grad_out, x, w, bias_sizes, stride, padding, dilation, transposed, output_padding, groups,
                         output_mask):
    """aten.convolution_backward of ``_conv_as_mm``'s convolutions: dx by one product (the patches' gradient,
    position-major from several input channels) and the taps added back into place (``_add_taps``), dw by
    one product, db by a sum (each only where ``output_mask`` asks)."""
    geo = _conv_geometry(x, w, stride, padding, dilation, transposed, groups)
    if geo is None:
        return NotImplemented
    kh, kw, ho, wo = geo
    n, c, h, wd = x.shape
    o = w.shape[0]
    rows_major = c >= POSITION_MAJOR_MIN_CHANNELS
    go = grad_out.permute(1, 0, 2, 3).reshape(o, n * ho * wo)                          # [O, N*L]
    gx = gw = gb = None
    if output_mask[0]:
        hp, wp = h + 2 * padding[0], wd + 2 * padding[1]
        if rows_major:
            d = torch.mm(go.t(), _weight_rows(w)).view(n, ho, wo, kh * kw, c)              # [N, Ho, Wo, K, C]
            gxp = _add_taps(d, kh, kw, stride, dilation, ho, wo, hp, wp)                  # [N, Hp, Wp, C]
            gx = gxp[:, padding[0]:padding[0] + h, padding[1]:padding[1] + wd, :].permute(0, 3, 1, 2)
        else:
            d = torch.mm(_weight_rows(w).t(), go).view(kh * kw, c, n, ho, wo).permute(1, 2, 3, 4, 0)
            gxp = _add_taps(d.unsqueeze(-1), kh, kw, stride, dilation, ho, wo, hp, wp)[..., 0]  # [C, N, Hp, Wp]
            gx = gxp[:, :, padding[0]:padding[0] + h, padding[1]:padding[1] + wd].permute(1, 0, 2, 3)
    if output_mask[1]:
        if rows_major:
            gw = torch.mm(go, _patch_rows(x, kh, kw, stride, padding, dilation, ho, wo))
        else:
            gw = torch.mm(go, _patches(x, kh, kw, stride, padding, dilation, ho, wo).t())
        gw = gw.view(o, kh, kw, c).permute(0, 3, 1, 2)
    if output_mask[2]:
        gb = go.sum(1)
    return gx, gw, gb


# A producer read by several taps is computed once; the nine taps of a 3x3 kernel are concatenated by one
# pointwise kernel (one output buffer, no aliases of its parts); the wrapper that calls a chunk's kernels is C++
# (a 10-step chunk of a small conv energy makes hundreds of kernel and BLAS calls, each a few microseconds from
# Python).
_CPU_PATCHES = {"realize_reads_threshold": 1, "max_pointwise_cat_inputs": 9, "cpp_wrapper": True}


# A convolution reading 2 to this many input channels has its patches gathered in runs of that many values:
# on an AVX-512 CPU the graph's C++ kernels then use 256-bit vectors, which such a run fills (a 512-bit vector
# would be half empty: measured 1.29x on a small conv energy with 8 channels, while a residual MLP with rows
# of 64 was 4% slower with 256-bit vectors, so it is decided per graph).
NARROW_RUN_CHANNELS = 8


def _narrow_channel_runs(gm) -> bool:
    """Whether the traced graph (or one of its subgraphs) has a 2-D convolution whose input has 2 to
    NARROW_RUN_CHANNELS channels (``_conv_as_mm``'s position-major patches from such an input)."""
    from torch import fx

    for mod in gm.modules():
        if not isinstance(mod, fx.GraphModule):
            continue
        for node in mod.graph.nodes:
            if node.op != "call_function" or node.target not in (torch.conv2d, torch.nn.functional.conv2d):
                continue
            x = node.args[0].meta.get("example_value") if node.args and isinstance(node.args[0], fx.Node) \
                else None
            if x is not None and x.dim() == 4 and 2 <= x.shape[1] <= NARROW_RUN_CHANNELS:
                return True
    return False


def _inductor_cpu(gm, example_inputs):
    """Inductor with its own decompositions plus the two above (the CPU compiled path's backend); 256-bit
    vectors on an AVX-512 CPU for a graph of narrow channel runs (``_narrow_channel_runs``)."""
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.decomposition import select_decomp_table

    table = dict(select_decomp_table())
    table[aten.convolution.default] = _conv_as_mm
    table[aten.convolution_backward.default] = _conv_backward_as_mm
    patches = dict(_CPU_PATCHES)
    if torch.backends.cpu.get_cpu_capability() == "AVX512" and _narrow_channel_runs(gm):
        patches["cpp.simdlen"] = 256
    return compile_fx(gm, example_inputs, decompositions=table, config_patches=patches)


@dataclass(frozen=True)
class _Plan:
    """The static part of a chunk: everything baked into its graph."""

    cfg: Any
    length: int
    k0: int                     # the first step's index (schedules); 0 when they are constant
    shape: Tuple[int, ...]      # [B, K, *event]
    N: int
    D: int
    update: Optional[str]       # the fused update's kind ("cpu", "cuda", "triton") or None (torch ops)
    post_mode: str
    step_clip: Any              # float, or None; a per-coordinate clip is a tensor argument
    scaled: bool = False        # the noise's per-step factors are a tensor argument (``scaled_noise``)


def _energy_fn(module, x, y):
    return module(x, y)


def _chunk_fn(plan: _Plan, module, x, y, velocity, active, steps, status, pending, noise, fixed, mask, lower, upper,
              step_clip, E_prev, scales=None):
    """``plan.length`` descent steps from state y [B, K, *event] (and velocity [N, D], active / steps / status /
    pending [N]); returns the new state and the energies at the first and the last evaluation. Functional:
    the inputs are not written (CUDA graphs replay it with inputs that are earlier outputs). ``scales``
    [length, 2] (``plan.scaled``): each step's factors of its standard normal draws (column 1: Heun's
    corrector), so that one graph serves every chunk of a noise schedule."""
    cfg = plan.cfg
    N, D = plan.N, plan.D
    y = y.clone()
    yf = y.view(N, D)
    active, steps, status = active.clone(), steps.clone(), status.clone()
    velocity = None if velocity is None else velocity.clone()
    pending = None if pending is None else pending.clone()
    fixed_f = None if fixed is None else fixed.view(N, D)
    mask_f = None if mask is None else mask.view(N, D)
    clip = plan.step_clip if step_clip is None else step_clip
    E_first = None

    def total(yy):
        E = module(x, yy)
        return E.sum(), E

    grad_and_value = torch.func.grad_and_value(total, has_aux=True)
    for s in range(plan.length):
        k = plan.k0 + s
        xi = None if noise is None else noise[s]
        n_k = cfg.noise_level_at(k)
        if plan.scaled and xi is not None:  # the draws times this step's factor; the ops add them as they are
            xi, n_k = xi * scales[s, 0], 1.0
        ys = _ops.descent_pre(y, normalize=cfg.normalize, normalize_eps=cfg.normalize_eps,
                              noise=xi if cfg.noise == "pre" else None, noise_level=n_k, project=cfg.project,
                              fixed=fixed, mask=mask)
        base = None if ys is y else ys.reshape(N, D)
        q = torch.add(ys, velocity.view(plan.shape), alpha=cfg.momentum) if cfg.nesterov else ys
        G, (_, E) = grad_and_value(q)
        Ef, Gf = E.reshape(N), G.reshape(N, D).contiguous()
        eta = cfg.step_size_at(k)
        noise_post = xi.reshape(N, D) if (xi is not None and plan.post_mode != "none") else None
        if cfg.integrator == "heun":
            _heun_step(plan, grad_and_value, yf, Gf, Ef, active, steps, status, base, eta, noise_post,
                       None if noise is None else noise[s].reshape(N, D) * scales[s, 1], fixed_f, mask_f, lower,
                       upper, clip)
        elif plan.update is not None:
            _ops._fused_update(plan.update, yf, Gf, Ef, active, steps, status, velocity, pending, noise_post,
                               plan.post_mode, n_k, fixed_f, mask_f, lower, upper, clip, eta, cfg.grad_scale,
                               cfg.momentum, cfg.grad_clip, cfg.grad_clip_norm, cfg.step_schedule == "energy",
                               cfg.energy_temperature, cfg.tol, cfg.tol_final_step, cfg.bound_each_step, base)
        else:
            _ops.descent_update(yf, Gf, Ef, active, steps, status, eta=eta, y_base=base, velocity=velocity,
                                pending=pending, E_prev=E_prev, noise=noise_post, noise_mode=plan.post_mode,
                                noise_level=n_k, fixed=fixed_f, mask=mask_f, lower=lower, upper=upper,
                                step_clip=clip, grad_scale=cfg.grad_scale, momentum=cfg.momentum,
                                grad_clip=cfg.grad_clip, grad_clip_norm=cfg.grad_clip_norm,
                                energy_scaled=cfg.step_schedule == "energy",
                                energy_temperature=cfg.energy_temperature, tol=cfg.tol, tol_on=cfg.tol_on,
                                tol_scope=cfg.tol_scope, tol_final_step=cfg.tol_final_step,
                                bound_each_step=cfg.bound_each_step, backend="torch")
        if E_first is None:
            E_first = E
        E_prev = Ef
    return y, velocity, active, steps, status, pending, E_first, E


def _heun_step(plan: _Plan, grad_and_value, yf, Gf, Ef, active, steps, status, base, eta, xi0, xi1, fixed,
               mask, lower, upper, clip) -> None:
    """Heun's method on the Stratonovich form, as the eager path's ``_heun``: the predictor an Euler step with
    the clipped gradient and the noise xi0 (the draws times s0; no bookkeeping), the corrector the mean of the
    two clipped gradients and the noise xi1 (the same draws times (s0 + s1) / 2)."""
    cfg = plan.cfg
    common = dict(eta=eta, y_base=base, noise_mode="additive", noise_level=1.0, fixed=fixed, mask=mask, lower=lower,
                  upper=upper, step_clip=clip, grad_scale=cfg.grad_scale, bound_each_step=cfg.bound_each_step,
                  backend="torch")
    finite0 = _ops.finite_rows(Gf)
    _ops.clip_grad_(Gf, cfg.grad_clip, cfg.grad_clip_norm)
    y_prop = torch.empty_like(yf)
    _ops.descent_update(yf, Gf, Ef, active, steps, status, noise=xi0, out=y_prop, dry_run=True, **common)
    G1, (_, E1) = grad_and_value(y_prop.view(plan.shape))
    G1f = G1.reshape(plan.N, plan.D).contiguous()
    finite1 = _ops.finite_rows(G1f, E1.reshape(plan.N)) & finite0
    _ops.clip_grad_(G1f, cfg.grad_clip, cfg.grad_clip_norm)
    Gf.add_(G1f).mul_(0.5)
    _ops.descent_update(yf, Gf, Ef, active, steps, status, noise=xi1, finite_also=finite1, **common)


def noise_scales(cfg, k0: int, length: int, device, dtype) -> Tensor:
    """[length, 2] for the steps k0 ... k0 + length - 1 of ``cfg``: the factor of each step's standard normal
    draws (noise "pre": n_k; after the gradient: ``pyebm.ops.descent.noise_std``) and, for Heun, its
    corrector's mean factor (s_k + s_{k+1}) / 2; computed in float64 like the eager path's scalars."""
    post = cfg.noise if cfg.noise in ("langevin", "step", "additive") else "none"
    rows = []
    for k in range(k0, k0 + length):
        eta, n_k = cfg.step_size_at(k), cfg.noise_level_at(k)
        s0 = n_k if cfg.noise == "pre" else _ops.noise_std(post, eta, n_k)
        s1 = 0.5 * (s0 + _ops.noise_std(post, eta, cfg.noise_level_at(k + 1))) if cfg.integrator == "heun" else s0
        rows.append((s0, s1))
    return torch.tensor(rows, dtype=torch.float64).to(device=device, dtype=dtype)


# -- running a call -----------------------------------------------------------------------------------

class _FinalEnergy:
    """What ``descent._finish`` asks of the energy calls: ``bk`` and ``energy(y)`` (the compiled final pass)."""

    def __init__(self, run, bk):
        self._run, self.bk = run, bk

    def energy(self, y: Tensor) -> Tensor:
        return self._run(y)


def _timed_first(entry: _Entry, fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    dt = time.perf_counter() - t0
    entry.stats.compile_seconds += dt
    entry.stats.compiles += 1
    return out, dt


def run(call, module: nn.Module, sig: tuple, *, y0: Tensor, update: Optional[str], finish):
    """``pyebm.minimize`` on the compiled path. ``call`` is the engine's validated call, ``y0`` the initial
    candidates (not written), ``update`` the fused update's kind or None (torch ops), ``finish(calls, y,
    E_init, steps, status, fixed)`` the engine's final clamp, energy pass and selection."""
    cfg, (B, K), event = call.cfg, (call.B, call.K), call.event
    device, dtype = call.device, call.dtype
    shape = (B, K) + tuple(event)
    N = B * K
    D = 1
    for s in event:
        D *= int(s)
    x = call.context
    ent = entry(module, sig)
    fixed = y0.clone() if call.mask is not None else None
    scaled = scaled_noise(cfg)
    post_mode = post_noise_mode(cfg)
    velocity = torch.zeros(N, D, device=device, dtype=dtype) if cfg.momentum > 0 else None
    active = torch.ones(N, dtype=torch.bool, device=device)
    steps = torch.zeros(N, dtype=torch.int32, device=device)
    status = torch.zeros(N, dtype=torch.int8, device=device)
    pending = torch.zeros(N, dtype=torch.bool, device=device) if (cfg.tol > 0 and cfg.tol_final_step) else None
    lower = None if call.lower is None else call.lower.reshape(D)
    upper = None if call.upper is None else call.upper.reshape(D)
    clip_value, clip_tensor = _step_clip(call, D)
    constant = _constant_schedules(cfg)
    y, E_init, E_prev = y0, None, None
    check = cfg.tol > 0 and cfg.check_every > 0
    k0 = 0
    lengths = chunk_lengths(cfg.steps, chunk_limit(cfg))
    for i, length in enumerate(lengths):
        noise = None
        if cfg.noise != "none":
            noise = torch.empty((length,) + shape, device=device, dtype=dtype)
            for s in range(length):  # one draw per step, as the eager path draws them
                noise[s].normal_(generator=call.generator)
        scales = noise_scales(cfg, k0, length, device, dtype) if scaled else None
        ckey = (length, None if constant else k0)
        fn = ent.chunks.get(ckey)
        first = fn is None
        if first:
            plan = _Plan(cfg, length, 0 if constant else k0, shape, N, D, update, post_mode, clip_value, scaled)
            fn = _compile(_bind(plan), device)
            ent.chunks[ckey] = fn
            ent.stats.chunks = tuple(sorted(set(ent.stats.chunks) | {length}))
        args = (module, x, y, velocity, active, steps, status, pending, noise, fixed, call.mask, lower, upper,
                clip_tensor, E_prev, scales)
        if first:
            out, dt = _timed_first(ent, _call_chunk, fn, args)
            log.info("pyebm: compiled a %d-step chunk of %s in %.1f s", length, type(module).__name__, dt)
        else:
            out = _call_chunk(fn, args)
        y, velocity, active, steps, status, pending, E_first, E_last = out
        if E_init is None:
            E_init = E_first.clone()
        E_prev = E_last.reshape(N) if cfg.tol_on == "energy_change" else None
        k0 += length
        if check and i + 1 < len(lengths) and not bool(active.any()):
            break
    if device.type == "cuda":  # CUDA graph outputs are overwritten by the next replay: own them
        y, steps, status = y.clone(), steps.clone(), status.clone()
    ent.stats.calls += 1
    if ent.energy is None and call.final_energy:
        ent.energy = _compile(_energy_fn, device)
        energy_run = lambda yy: _timed_first(ent, _call_energy, ent.energy, module, x, yy)[0]  # noqa: E731
    else:
        energy_run = lambda yy: _call_energy(ent.energy, module, x, yy)  # noqa: E731
    calls = _FinalEnergy(lambda yy: _own(energy_run(yy), device), (B, K))
    return finish(calls, y, E_init, steps, status, fixed)


def _own(t: Tensor, device) -> Tensor:
    return t.clone() if device.type == "cuda" else t


def _bind(plan: _Plan):
    def chunk(module, x, y, velocity, active, steps, status, pending, noise, fixed, mask, lower, upper, step_clip,
              E_prev, scales):
        return _chunk_fn(plan, module, x, y, velocity, active, steps, status, pending, noise, fixed, mask, lower,
                         upper, step_clip, E_prev, scales)

    return chunk


def _call_chunk(fn, args):
    with torch.no_grad():  # inference: no graph over the weights (torch.func.grad differentiates y only)
        return fn(*args)


def _call_energy(fn, module, x, y):
    with torch.no_grad():
        return fn(module, x, y)


def _step_clip(call, D: int):
    """(float clip, None) when every coordinate has the same clip (read from the config), else (None, [D])."""
    if call.step_clip is None:
        return None, None
    values = torch.as_tensor(call.cfg.step_clip, dtype=torch.float64).flatten()
    if bool((values == values[0]).all()):
        return float(values[0]), None
    return None, call.step_clip.reshape(D)
