"""Triton kernel for the fused MLP energy and its input gradient.

    E(y)    = w_out . h_L + b_out
    h_1     = act(c_b + W_in y)                      c = ctx [B, H1]; row r = b*K + k uses c[b]
    h_{l+1} = act(W_l h_l + b_l) (+ h_l when residual and W_l is square)

One launch computes E [B, K] (and dE/dy [B, K, D]) for all N = B*K rows. Each program owns BLOCK_M
rows at a time (a persistent loop over row tiles) and walks them forward through every layer and
straight back. Layers have arbitrary count and widths, so the layer loop runs at run time over a small
table (`meta`) and every width is padded to a multiple of BLOCK_T: one compiled kernel per (dtype,
activation, grad/no-grad, block sizes) serves every network shape.

Between layers a row tile is exchanged through a per-program scratch area in global memory (on a GPU
it stays mostly in L2): two ping-pong buffers of [BLOCK_M, HMAX] fp32 activations, plus act'(z) of
every layer for the backward. Each layer is a tiled tl.dot over BLOCK_T x BLOCK_T weight tiles read
from one packed, zero-padded weight buffer. Scratch and weights are stored tile-major (see the kernel)
so every access is a scalar base plus a compile-time offset pattern. Threads exchange data through
scratch, hence the tl.debug_barrier() after every pass whose output another thread reads.

The forward/backward walk of one row tile is the jit function ``_mlp_tile``, shared with the whole-loop
descent kernel (``pyebm._kernels.descent``), which keeps the gradient in scratch instead of storing it.

Numerics: GEMM operands are in the weights' dtype; accumulation and everything else (activations,
act', gradients, the energy sum) are fp32; results are rounded to y's dtype once, at the store.

No torch.library here: the op is defined in pyebm/ops/mlp_energy_triton.py. The launchers never call
torch.cuda, so with TRITON_INTERPRET=1 (read by triton.jit when this module is imported) the same
kernel runs on CPU tensors.
"""
from __future__ import annotations

import contextlib
import os
import weakref
from collections import OrderedDict
from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

# Whether the kernels below were defined in interpreter mode (triton.jit decides at definition time).
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

ACTIVATIONS = {"relu": 0, "silu": 1, "gelu": 2, "gelu_tanh": 3, "tanh": 4, "softplus": 5}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Columns of the per-layer table `meta` (int64): input width in BLOCK_T tiles, output width in tiles,
# element offset of the layer's weight tiles in the packed buffer, offset of its bias, column offset of
# its act' slot in scratch, residual flag.
META_COLS = tl.constexpr(6)


# ----------------------------------------------------------------------------------------------
# Activations: value and derivative in fp32, matching torch's forward and backward formulas.
# ----------------------------------------------------------------------------------------------
@triton.jit
def _tanh_f32(u):
    # tanh = (1 - e) / (1 + e) with e = exp(-2|u|) cancels badly for small |u| (relative error
    # ~ eps / |u|), so small arguments take the odd series (truncation error < 2e-10 relative there).
    au = tl.abs(u)
    e = tl.exp(-2.0 * au)
    big = (1.0 - e) / (1.0 + e)
    big = tl.where(u < 0.0, -big, big)
    u2 = u * u
    small = u * (1.0 + u2 * (-0.3333333333333333 + u2 * (0.13333333333333333 + u2 * -0.05396825396825397)))
    # NaN fails `au < 0.125` and keeps flowing through `big`.
    return tl.where(au < 0.125, small, big)


@triton.jit
def _act(z, ACT: tl.constexpr):
    """(act(z), act'(z)) elementwise in fp32. NaN in z stays NaN in act(z)."""
    if ACT == 0:  # relu. where(z < 0, 0, z) keeps NaN (max(z, 0) would turn it into 0 on a GPU);
        # the derivative mirrors torch's threshold_backward: 0 where z <= 0, else 1 (NaN -> 1).
        a = tl.where(z < 0.0, 0.0, z)
        d = tl.where(z <= 0.0, 0.0, 1.0)
    elif ACT == 1:  # silu
        s = tl.sigmoid(z)
        a = z * s
        d = s * (1.0 + z * (1.0 - s))
    elif ACT == 2:  # gelu, exact (erf)
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        a = z * cdf
        d = cdf + z * (0.3989422804014327 * tl.exp(-0.5 * z * z))
    elif ACT == 3:  # gelu, tanh approximation; same expression as torch's gelu_backward
        z2 = z * z
        t = _tanh_f32(0.7978845608028654 * (z + 0.044715 * z2 * z))
        a = 0.5 * z * (1.0 + t)
        d = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * (0.7978845608028654 * (1.0 + 0.134145 * z2))
    elif ACT == 4:  # tanh
        a = _tanh_f32(z)
        d = 1.0 - a * a
    else:  # softplus, beta 1, threshold 20 (torch: linear above the threshold)
        ez = tl.exp(z)
        u = 1.0 + ez
        # log1p(ez) without a log1p intrinsic: log(u) * ez / (u - 1) corrects the rounding of 1 + ez, and
        # returns ez itself where 1 + ez rounds to 1 (z < -17), where log(u) alone would give 0.
        um1 = u - 1.0
        one = um1 == 0.0
        l1p = tl.where(one, ez, tl.log(u) * ez / tl.where(one, 1.0, um1))
        over = z > 20.0
        a = tl.where(over, z, l1p)
        # exp overflows to inf for z > 88 and inf / inf is NaN, but those z are above the threshold.
        d = tl.where(over, 1.0, ez / u)
    return a, d


# Triton 3.9's interpreter gets bf16 wrong in two ways: its tl.dot multiplies bf16 tiles as their raw
# uint16 storage, and its fp32 -> bf16 cast truncates instead of rounding to nearest. With EMULATE_BF16
# (set only under the interpreter) the kernel rounds to bf16 itself and multiplies in fp32, which gives
# the numbers of a GPU bf16 MMA with fp32 accumulation (bf16 x bf16 products are exact in fp32).
@triton.jit
def _round_bf16(x):
    """fp32 -> nearest bf16 value (ties to even), still as fp32. NaN and inf stay NaN and inf."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _to_out(x, dtype: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """fp32 result -> output dtype, rounding to nearest."""
    if EMULATE_BF16:
        x = _round_bf16(x)
    return x.to(dtype)


@triton.jit
def _mma(a, w, acc, DOT_PRECISION: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """acc + a @ w with a (fp32) rounded to w's dtype: GEMM operands in the weights' dtype (bf16/fp16
    tensor cores), accumulation in fp32. For fp32, DOT_PRECISION defaults to "ieee": tl.dot's own
    default (tf32) keeps 10 mantissa bits, ~1e-3 relative error per layer."""
    if EMULATE_BF16:
        return tl.dot(_round_bf16(a), w.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a.to(w.dtype), w, acc, input_precision=DOT_PRECISION)


# ----------------------------------------------------------------------------------------------
# The kernel
# ----------------------------------------------------------------------------------------------
@triton.jit
def _mlp_tile(
    base, buf_elems, w_ptr, b_ptr, meta_ptr, wout_ptr, bout_ptr, ctx_tile, b_rel, rmask, g_ptr, row0,
    D, H1, HL, num_layers, stride_cb, stride_ch, stride_wo,
    ACT: tl.constexpr, WITH_GRAD: tl.constexpr, G_TO_SCRATCH: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, DOT_PRECISION: tl.constexpr, EMULATE_BF16: tl.constexpr,
):
    """One row tile forward through every layer and (WITH_GRAD) straight back; returns E (fp32 [BLOCK_M]).

    On entry the tile's candidates are in scratch buffer 0 (``base``; fp32, tile-major, zero in padded
    columns) and every thread has passed a barrier since they were written. ``ctx_tile`` points at the
    context row of the tile's first row and ``b_rel`` [BLOCK_M] is each row's context relative to it.
    The gradient goes to the contiguous [N, D] tensor ``g_ptr`` (rows ``row0``.., its dtype) or, with
    G_TO_SCRATCH, to buffer 0 in fp32 tile-major (padded columns hold exact zeros for finite rows: the
    padded columns of W_in are zero). The whole-loop descent kernel keeps the gradient in scratch.
    """
    r_l = tl.arange(0, BLOCK_M)
    c_l = tl.arange(0, BLOCK_T)
    TILE: tl.constexpr = BLOCK_M * BLOCK_T
    WTILE: tl.constexpr = BLOCK_T * BLOCK_T
    t_off = r_l[:, None] * BLOCK_T + c_l[None, :]      # [BLOCK_M, BLOCK_T] chunk
    w_off = c_l[:, None] * BLOCK_T + c_l[None, :]      # [BLOCK_T, BLOCK_T] tile of W, as stored
    wt_off = c_l[None, :] * BLOCK_T + c_l[:, None]     # the same tile read as W^T
    d_base = base + 2 * buf_elems

    # ---- forward: layer j reads buffer j % 2 and writes buffer (j + 1) % 2 ----
    for j in range(0, num_layers):
        mrow = meta_ptr + j * META_COLS
        in_t = tl.load(mrow + 0).to(tl.int32)
        out_t = tl.load(mrow + 1).to(tl.int32)
        # Offsets are multiples of BLOCK_T (>= 16) elements: hint it so loads vectorise.
        w_l = w_ptr + tl.multiple_of(tl.load(mrow + 2), 16)
        b_l = b_ptr + tl.multiple_of(tl.load(mrow + 3), 16)
        d_l = d_base + tl.load(mrow + 4) * BLOCK_M
        res = tl.load(mrow + 5)
        src = base + (j % 2) * buf_elems
        dst = base + ((j + 1) % 2) * buf_elems
        for nt in range(0, out_t):
            acc = tl.zeros((BLOCK_M, BLOCK_T), dtype=tl.float32)
            w_n = w_l + nt * in_t * WTILE
            for kt in range(0, in_t):
                h = tl.load(src + kt * TILE + t_off)
                w = tl.load(w_n + kt * WTILE + wt_off)
                acc = _mma(h, w, acc, DOT_PRECISION, EMULATE_BF16)
            cols = nt * BLOCK_T + c_l
            if j == 0:
                # The first layer's bias is the context term of the row's context.
                cmask = rmask[:, None] & (cols[None, :] < H1)
                c_off = b_rel[:, None] * stride_cb + cols[None, :] * stride_ch
                acc += tl.load(ctx_tile + c_off, mask=cmask, other=0.0).to(tl.float32)
            else:
                acc += tl.load(b_l + cols).to(tl.float32)[None, :]
            a, dz = _act(acc, ACT)
            if res != 0:
                a += tl.load(src + nt * TILE + t_off)
            tl.store(dst + nt * TILE + t_off, a)
            if WITH_GRAD:
                tl.store(d_l + nt * TILE + t_off, dz)
        tl.debug_barrier()

    # ---- energy; with the gradient, dE/dh_L = w_out goes into the same buffer ----
    # Padded columns of h_L need not be zero (softplus(0) = log 2, residual sums); the masked
    # w_out load makes them contribute nothing.
    cur = base + (num_layers % 2) * buf_elems
    hl_t = tl.load(meta_ptr + (num_layers - 1) * META_COLS + 1).to(tl.int32)
    e = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for ct in range(0, hl_t):
        cols = ct * BLOCK_T + c_l
        wo = tl.load(wout_ptr + cols * stride_wo, mask=cols < HL, other=0.0).to(tl.float32)
        h = tl.load(cur + ct * TILE + t_off)
        e += tl.sum(h * wo[None, :], axis=1)
        if WITH_GRAD:
            tl.store(cur + ct * TILE + t_off, tl.zeros((BLOCK_M, BLOCK_T), dtype=tl.float32) + wo[None, :])
    e += tl.load(bout_ptr).to(tl.float32)

    if WITH_GRAD:
        tl.debug_barrier()
        # ---- backward: layer j reads dE/dh_{j+1} from buffer (j + 1) % 2, writes dE/dh_j to j % 2 ----
        for jj in range(0, num_layers):
            j = num_layers - 1 - jj
            mrow = meta_ptr + j * META_COLS
            in_t = tl.load(mrow + 0).to(tl.int32)
            out_t = tl.load(mrow + 1).to(tl.int32)
            w_l = w_ptr + tl.multiple_of(tl.load(mrow + 2), 16)
            d_l = d_base + tl.load(mrow + 4) * BLOCK_M
            res = tl.load(mrow + 5)
            g_out = base + ((j + 1) % 2) * buf_elems
            g_in = base + (j % 2) * buf_elems
            # dE/dz = dE/dh * act'(z), written over act'(z). Each element is read and written through
            # the same pointer tile (same thread), so this pass needs no barrier inside.
            for ct in range(0, out_t):
                p = d_l + ct * TILE + t_off
                tl.store(p, tl.load(g_out + ct * TILE + t_off) * tl.load(p))
            tl.debug_barrier()
            for nt in range(0, in_t):
                acc = tl.zeros((BLOCK_M, BLOCK_T), dtype=tl.float32)
                for kt in range(0, out_t):
                    gz = tl.load(d_l + kt * TILE + t_off)
                    w = tl.load(w_l + (kt * in_t + nt) * WTILE + w_off)
                    acc = _mma(gz, w, acc, DOT_PRECISION, EMULATE_BF16)
                if res != 0:
                    acc += tl.load(g_out + nt * TILE + t_off)
                if j == 0 and not G_TO_SCRATCH:
                    cols = nt * BLOCK_T + c_l
                    gmask = rmask[:, None] & (cols[None, :] < D)
                    # G is contiguous [N, D]: an int64 tile base plus int32 in-tile offsets
                    # (BLOCK_M * D < 2^31) keeps this store's addresses cheap.
                    g_tile = g_ptr + row0 * D
                    g_val = _to_out(acc, g_ptr.dtype.element_ty, EMULATE_BF16)
                    tl.store(g_tile + r_l[:, None] * D + cols[None, :], g_val, mask=gmask)
                else:
                    tl.store(g_in + nt * TILE + t_off, acc)
            tl.debug_barrier()
    return e


@triton.jit
def _mlp_energy_kernel(
    y_ptr, ctx_ptr, w_ptr, b_ptr, meta_ptr, wout_ptr, bout_ptr,
    e_ptr, g_ptr, scratch_ptr,
    N, K, D, H1, HL, num_layers, num_tiles, buf_elems, scratch_per_prog,
    stride_yb, stride_yk, stride_yd, stride_cb, stride_ch, stride_wo,
    ACT: tl.constexpr, WITH_GRAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, DOT_PRECISION: tl.constexpr, EMULATE_BF16: tl.constexpr,
):
    # Layouts are tile-major: a [BLOCK_M, W] activation buffer is W / BLOCK_T contiguous chunks of
    # [BLOCK_M, BLOCK_T], and a layer's padded weight is (out/BLOCK_T) x (in/BLOCK_T) contiguous
    # [BLOCK_T, BLOCK_T] tiles. Every scratch or weight access is then a scalar base plus the same
    # compile-time offset pattern, which keeps address registers few (no per-row runtime strides).
    # The layer loop itself is _mlp_tile (shared with the whole-loop descent kernel).
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    r_l = tl.arange(0, BLOCK_M)
    c_l = tl.arange(0, BLOCK_T)
    TILE: tl.constexpr = BLOCK_M * BLOCK_T
    t_off = r_l[:, None] * BLOCK_T + c_l[None, :]      # [BLOCK_M, BLOCK_T] chunk
    # Scratch offsets in int64: programs x per-program size exceeds 2^31 elements on big grids.
    base = scratch_ptr + pid.to(tl.int64) * scratch_per_prog

    for tile in range(pid, num_tiles, nprog):
        # Row indices in int64: N * D and b * stride_yb overflow int32 for large candidate batches.
        rows = tl.cast(tile * BLOCK_M + r_l, tl.int64)
        rmask = rows < N
        b_idx = rows // K
        k_idx = rows - b_idx * K
        # The tile's rows span at most BLOCK_M contexts: ctx is addressed from the first one with int32
        # offsets (the launcher checks BLOCK_M * stride_cb < 2^31).
        row0 = tl.cast(tile * BLOCK_M, tl.int64)
        b0 = row0 // K
        ctx_tile = ctx_ptr + b0 * stride_cb

        # y tile -> buffer 0 in fp32, zero in the padded columns and rows (any strides of y).
        d_t = tl.load(meta_ptr).to(tl.int32)
        y_row = y_ptr + b_idx[:, None] * stride_yb + k_idx[:, None] * stride_yk
        for ct in range(0, d_t):
            cols = ct * BLOCK_T + c_l
            v = tl.load(y_row + cols[None, :] * stride_yd, mask=rmask[:, None] & (cols[None, :] < D), other=0.0)
            tl.store(base + ct * TILE + t_off, v.to(tl.float32))
        tl.debug_barrier()

        e = _mlp_tile(base, buf_elems, w_ptr, b_ptr, meta_ptr, wout_ptr, bout_ptr, ctx_tile,
                      (b_idx - b0).to(tl.int32), rmask, g_ptr, row0, D, H1, HL, num_layers,
                      stride_cb, stride_ch, stride_wo, ACT, WITH_GRAD, False,
                      BLOCK_M, BLOCK_T, DOT_PRECISION, EMULATE_BF16)
        tl.store(e_ptr + rows, _to_out(e, e_ptr.dtype.element_ty, EMULATE_BF16), mask=rmask)
        # The next tile overwrites buffer 0, which slower threads may still be reading.
        tl.debug_barrier()


# ----------------------------------------------------------------------------------------------
# Weight packing (cached) and launch
# ----------------------------------------------------------------------------------------------
class PackedMLP:
    """Every layer's zero-padded weight in one tile-major buffer, biases in another, and the layer table.

    Layer j's weight [out, in] is padded to [out_t * T, in_t * T] (T = BLOCK_T) and stored as out_t x in_t
    contiguous T x T tiles. Zero padding makes the padded lanes inert (a padded output column has zero
    weights and zero bias; a padded input column meets zero weights), so the GEMM loops need no masks.
    """

    def __init__(self, w_in: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor],
                 residual: bool, block_t: int):
        mats = [w_in] + list(weights)
        dev, dt, T = w_in.device, w_in.dtype, block_t
        tiles = [(triton.cdiv(m.shape[0], T), triton.cdiv(m.shape[1], T)) for m in mats]
        self.w = torch.empty(sum(o * i for o, i in tiles) * T * T, device=dev, dtype=dt)
        self.b = torch.zeros(max(1, sum(o for o, _ in tiles) * T), device=dev, dtype=dt)
        meta = []
        w_off = b_off = d_off = 0
        for j, (m, (o, i)) in enumerate(zip(mats, tiles)):
            padded = torch.zeros(o * T, i * T, device=dev, dtype=dt)
            padded[: m.shape[0], : m.shape[1]] = m
            n = o * i * T * T
            self.w[w_off:w_off + n].view(o, i, T, T).copy_(padded.view(o, T, i, T).permute(0, 2, 1, 3))
            if j > 0:
                self.b[b_off:b_off + m.shape[0]].copy_(biases[j - 1])
            res = int(bool(residual) and j > 0 and m.shape[0] == m.shape[1])
            meta.append([i, o, w_off, b_off, d_off, res])
            w_off += n
            b_off += o * T
            d_off += o * T
        self.meta = torch.tensor(meta, dtype=torch.int64).to(dev)
        self.num_layers = len(mats)
        self.d_cols = d_off  # act' columns per row (sum of padded output widths)
        self.hmax = max(max(o for o, _ in tiles), tiles[0][1], 1) * T  # widest padded activation
        self.block_t = block_t


class _PackCache:
    """Packed weights keyed on the identity and version of the weight tensors.

    An entry is reused only while every weight tensor is the same live object (weak references, so a
    freed tensor whose address is reused cannot hit) at the same ``_version``: in-place updates
    (optimizer steps, ``copy_`` under no_grad, load_state_dict) bump the version and repack. Writes
    through ``.data`` bypass the version counter and are not seen; call ``clear_pack_cache()`` after them.
    """

    def __init__(self, size: int = 16):
        self.size = size
        self.entries: "OrderedDict[tuple, Tuple[list, PackedMLP]]" = OrderedDict()

    def get(self, w_in, weights, biases, residual, block_t) -> PackedMLP:
        tensors = [w_in] + list(weights) + list(biases)
        if any(t.is_inference() for t in tensors):  # no version counter to key on
            return PackedMLP(w_in, weights, biases, residual, block_t)
        key = (bool(residual), block_t, len(weights),
               tuple((id(t), t.data_ptr(), t._version, t.dtype, tuple(t.shape), tuple(t.stride())) for t in tensors))
        hit = self.entries.get(key)
        if hit is not None and all(r() is t for r, t in zip(hit[0], tensors)):
            self.entries.move_to_end(key)
            return hit[1]
        packed = PackedMLP(w_in, weights, biases, residual, block_t)
        self.entries[key] = ([weakref.ref(t) for t in tensors], packed)
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)
        return packed


_PACK_CACHE = _PackCache()


def clear_pack_cache() -> None:
    """Drop all cached packed weights."""
    _PACK_CACHE.entries.clear()


_SM_COUNT = {}


def _on_device(device: torch.device):
    """Launch on the tensors' device rather than the current one (no torch.cuda call: CPU tensors under
    the interpreter, and torch builds without torch.accelerator, get a no-op)."""
    guard = getattr(getattr(torch, "accelerator", None), "device_index", None)
    if device.type == "cpu" or device.index is None or guard is None:
        return contextlib.nullcontext()
    return guard(device.index)


def _max_programs(device: torch.device) -> int:
    """Persistent grid size: a few programs per SM on a GPU (scratch then scales with the GPU, not N)."""
    if device.type == "cpu":
        return 64
    idx = device.index if device.index is not None else triton.runtime.driver.active.get_current_device()
    if idx not in _SM_COUNT:
        props = triton.runtime.driver.active.utils.get_device_properties(idx)
        _SM_COUNT[idx] = int(props["multiprocessor_count"])
    return 2 * _SM_COUNT[idx]


def default_config(n_rows: int, max_width: int, dtype: torch.dtype) -> dict:
    """Block sizes by problem size; every key may be overridden in ``launch(config=...)``.

    BLOCK_T is the GEMM tile (and padding granule) of every width; BLOCK_M the rows per tile. Chosen
    so that the sm_90 build keeps under 255 registers without spilling for every activation (checked
    offline with Triton's ptxas, not timed on a GPU); 64 x 64 tiles take 8 warps because with 4 the
    fp32 variant spills. DOT_PRECISION "tf32x3" (fp32 accuracy from tensor cores) spills at 64 x 64:
    pair it with BLOCK_T 32.
    """
    block_t = 16 if max_width <= 16 else 32 if max_width <= 32 else 64
    block_m = 16 if n_rows <= 16 else 32 if n_rows <= 32 else 64
    num_warps = 8 if block_m * block_t >= 64 * 64 else 4
    return {"BLOCK_M": block_m, "BLOCK_T": block_t, "num_warps": num_warps, "num_stages": 1,
            "DOT_PRECISION": "ieee", "max_programs": None}


def launch(ctx: torch.Tensor, y: torch.Tensor, w_in: torch.Tensor, weights: Sequence[torch.Tensor],
           biases: Sequence[torch.Tensor], w_out: torch.Tensor, b_out: torch.Tensor, activation: str,
           residual: bool, with_grad: bool = True,
           config: Optional[dict] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """E [B, K] and (``with_grad``) dE/dy [B, K, D], both in y's dtype; the gradient is None otherwise.

    Arguments are those of ``pyebm::mlp_energy_grad`` and are assumed checked (shapes, one dtype, one
    device). ``config`` overrides ``default_config`` keys (BLOCK_M, BLOCK_T, num_warps, num_stages,
    DOT_PRECISION "ieee" | "tf32" | "tf32x3" for fp32, max_programs).
    """
    if y.dtype not in DTYPES:
        raise TypeError(f"pyebm triton: y must be float32, bfloat16 or float16; got {y.dtype}")
    if y.device.type == "cpu" and not INTERPRETED:
        raise RuntimeError("pyebm triton: CPU tensors need TRITON_INTERPRET=1 set before pyebm._kernels is imported")
    B, K, D = y.shape
    N = B * K
    if N >= 2**31 - 1024 or 1024 * D >= 2**31:
        raise ValueError(f"pyebm triton: B * K = {N} rows of width {D} exceed the kernel's int32 indexing")
    E = torch.empty(B, K, device=y.device, dtype=y.dtype)
    G = torch.empty(B, K, D, device=y.device, dtype=y.dtype) if with_grad else None
    if N == 0:
        return E, G
    H1 = w_in.shape[0]
    widths = [D, H1] + [w.shape[0] for w in weights]
    cfg = default_config(N, max(widths), y.dtype)
    if config:
        unknown = set(config) - set(cfg)
        if unknown:
            raise ValueError(f"pyebm triton: unknown config keys {sorted(unknown)}")
        cfg.update(config)
    bm, bt = int(cfg["BLOCK_M"]), int(cfg["BLOCK_T"])
    if bm < 16 or bt < 16 or bm & (bm - 1) or bt & (bt - 1):
        raise ValueError(f"pyebm triton: BLOCK_M and BLOCK_T must be powers of two >= 16; got {bm}, {bt}")
    if bm * abs(ctx.stride(0)) + bt * triton.cdiv(H1, bt) * abs(ctx.stride(1)) >= 2**31:
        ctx = ctx.contiguous()  # the kernel addresses a tile's ctx rows with int32 offsets
    packed = _PACK_CACHE.get(w_in, weights, biases, residual, bt)
    w_out = w_out.reshape(-1)
    b_out = b_out.reshape(-1)
    HL = w_out.shape[0]
    num_tiles = triton.cdiv(N, bm)
    nprog = min(num_tiles, int(cfg["max_programs"] or _max_programs(y.device)))
    per_prog = bm * (2 * packed.hmax + (packed.d_cols if with_grad else 0))
    scratch = torch.empty(nprog * per_prog, device=y.device, dtype=torch.float32)
    kernel_args = (
        y, ctx, packed.w, packed.b, packed.meta, w_out, b_out, E, G if with_grad else E, scratch,
        N, K, D, H1, HL, packed.num_layers, num_tiles, bm * packed.hmax, per_prog,
        y.stride(0), y.stride(1), y.stride(2), ctx.stride(0), ctx.stride(1), w_out.stride(0),
    )
    meta = dict(ACT=ACTIVATIONS[activation], WITH_GRAD=bool(with_grad), BLOCK_M=bm, BLOCK_T=bt,
                DOT_PRECISION=cfg["DOT_PRECISION"], EMULATE_BF16=INTERPRETED and y.dtype == torch.bfloat16,
                num_warps=int(cfg["num_warps"]), num_stages=int(cfg["num_stages"]))
    with _on_device(y.device):
        _mlp_energy_kernel[(nprog,)](*kernel_args, **meta)
    return E, G


def mlp_energy_grad(ctx, y, w_in, weights, biases, w_out, b_out, activation: str, residual: bool,
                    config: Optional[dict] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(E [B, K], dE/dy [B, K, D]) in one launch."""
    return launch(ctx, y, w_in, weights, biases, w_out, b_out, activation, residual, True, config)


def mlp_energy(ctx, y, w_in, weights, biases, w_out, b_out, activation: str, residual: bool,
               config: Optional[dict] = None) -> torch.Tensor:
    """E [B, K] in one launch (forward only, no act' kept)."""
    return launch(ctx, y, w_in, weights, biases, w_out, b_out, activation, residual, False, config)[0]
