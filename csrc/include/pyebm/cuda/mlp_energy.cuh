// Fused MLP energy + input gradient on the GPU: kernels and launchers. Torch-free (CUDA runtime only);
// the ATen glue is csrc/cuda/mlp_energy.cu. The math is pyebm/reference/mlp_energy.py:
//
//   h_1 = act(c_b + W_in y),  h_{j+1} = act(W_j h_j + b_j) (+ h_j when residual and the widths match),
//   E = w_out . h_L + b_out,  and G = dE/dy by the chain rule back through the same layers.
//
// One CTA owns a tile of candidate rows and takes it forward through every layer and straight back, so
// no activation of the tile leaves the chip: h_j lives in shared memory only until the next layer has
// read it, act'(z_j) stays in shared memory (fp32) until the backward uses it. Weights stream from global
// memory (L2-resident after the first tile) into a shared-memory tile that every warp of the CTA reads.
//
// Two kernels compute the same function:
//  * tensor-core (bf16/fp16): every GEMM on mma.sync m16n8k16 with fp32 accumulation. Only the MMA
//    operands are 16-bit (inputs, weights, h_j and dE/dz_j as they enter the next product; the forward
//    residual adds that 16-bit h_j); biases, pre-activations, act', the residual stream of the gradient,
//    E and G are fp32 until stored. Any width: widths are zero-padded to 16 inside shared memory (padded
//    weight rows and columns are zero, so padded activations never reach a real output). Needs the
//    tile to fit in shared memory.
//  * SIMT (fp32, fp64, and 16-bit inputs that do not fit the tensor-core tile): plain FMAs in the input
//    precision (fp32 or fp64), any width and depth; when even 32 rows of activations do not fit in shared
//    memory they go to a global workspace that the caller allocates.
//
// Launchers return cudaError_t and never synchronise (the kernels can be captured in CUDA graphs). All
// pointers are device pointers to contiguous row-major data; b_out is read on the device (no host round
// trip). Each row is computed from its own inputs only, so a NaN or Inf stays in its candidate.
//
// tests/cuda_emu/ runs these kernels on the host, one OS thread per GPU thread, against the reference.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "pyebm/activations.h"

// PYEBM_GPU_EMULATE: the kernels compile as host code for a thread-per-lane emulator that checks their
// indexing and synchronisation without a GPU (tests/cuda_emu/). It supplies the dynamic shared memory,
// the warp's matrix product and the intrinsics; the launchers are left out.
#if defined(PYEBM_GPU_EMULATE)
#define PYEBM_DYNAMIC_SMEM(name) unsigned char* name = ::pyebm_emu::dynamic_smem()
#else
#define PYEBM_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif

namespace pyebm {
namespace gpu {

constexpr int kMaxLayers = 64;  // same bound as the CPU kernel (checked by the op's argument checks)

// ------------------------------------------------------------------------------------------------
// Problem description
// ------------------------------------------------------------------------------------------------

template <typename T>
struct MlpParams {
  int64_t rows = 0;            // N = B * K candidate rows
  int64_t K = 1;               // candidates per context: row r uses context row r / K
  int D = 0;                   // candidate width
  int L = 0;                   // hidden layers (>= 1)
  int width[kMaxLayers] = {};  // H_1 .. H_L
  const T* ctx = nullptr;      // [B, H_1]  (W_x x + b_1)
  const T* y = nullptr;        // [N, D]
  const T* w_in = nullptr;     // [H_1, D]
  const T* w[kMaxLayers] = {};  // w[j] : [H_{j+2}, H_{j+1}]  (j = 0 .. L-2)
  const T* b[kMaxLayers] = {};  // b[j] : [H_{j+2}]
  const T* w_out = nullptr;    // [H_L]
  const T* b_out = nullptr;    // [1], on the device
  bool residual = false;
  T* E = nullptr;              // [N]
  T* G = nullptr;              // [N, D]; nullptr = energy only

  // Layer j -> j+1 (weights w[j]) adds its input back.
  __host__ __device__ bool res_at(int j) const { return residual && width[j] == width[j + 1]; }
};

// ------------------------------------------------------------------------------------------------
// Scalar helpers
// ------------------------------------------------------------------------------------------------

template <typename T>
struct AccType { using type = float; };
template <>
struct AccType<double> { using type = double; };

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T from_acc(float x);
template <>
__device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <typename T>
__device__ __forceinline__ T from_acc(double x) { return static_cast<T>(x); }

template <typename P>
__device__ __forceinline__ void swap_ptr(P*& a, P*& b) {
  P* t = a;
  a = b;
  b = t;
}

__host__ __device__ __forceinline__ int pad16(int x) { return (x + 15) & ~15; }
__host__ __device__ __forceinline__ int pad32(int x) { return (x + 31) & ~31; }
__host__ __device__ __forceinline__ size_t align16(size_t x) { return (x + 15) & ~size_t(15); }

// ------------------------------------------------------------------------------------------------
// Tensor-core path
// ------------------------------------------------------------------------------------------------

// 16-bit element traits for mma.sync: raw bits in shared memory, fp32 in registers.
template <typename T>
struct Mma16;
template <>
struct Mma16<__nv_bfloat16> {
  __device__ __forceinline__ static uint16_t bits(float x) {
    __nv_bfloat16 h = __float2bfloat16_rn(x);
    return *reinterpret_cast<uint16_t*>(&h);
  }
  __device__ __forceinline__ static float value(uint16_t u) {
    __nv_bfloat16 h = *reinterpret_cast<__nv_bfloat16*>(&u);
    return __bfloat162float(h);
  }
  // d += a * b for a 16x16 (row) by 16x8 (col) tile, fp32 accumulators.
  __device__ __forceinline__ static void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(PYEBM_GPU_EMULATE)
    ::pyebm_emu::mma_m16n8k16(d, a, b0, b1, &value);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
  }
};
template <>
struct Mma16<__half> {
  __device__ __forceinline__ static uint16_t bits(float x) {
    __half h = __float2half_rn(x);
    return *reinterpret_cast<uint16_t*>(&h);
  }
  __device__ __forceinline__ static float value(uint16_t u) {
    __half h = *reinterpret_cast<__half*>(&u);
    return __half2float(h);
  }
  __device__ __forceinline__ static void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(PYEBM_GPU_EMULATE)
    ::pyebm_emu::mma_m16n8k16(d, a, b0, b1, &value);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
  }
};

// Weight tile in shared memory: kTcChunk output columns (n) by kTcChunk reduction elements (k), stored
// [n][k]. A row of 72 halves is 36 words = 4 (mod 32): the fragment loads below (8 rows x 4 words per
// warp) then hit 32 different banks, and a row stays 16-byte aligned for vector stores.
constexpr int kTcChunk = 64;
constexpr int kTcWsStride = kTcChunk + 8;
constexpr int kTcMaxThreads = 512;

// Shared-memory layout of the tensor-core kernel; computed on the host by plan_mlp().
struct TcLayout {
  int bm = 0;       // rows per tile = 16 * wr
  int wr = 0;       // warps along the rows (16 rows each)
  int wn = 0;       // warps along the columns of a 64-column chunk (1, 2, 4 or 8)
  int sa = 0;       // activation buffer row stride in halves: pad16(max width) + 8 (= 8 mod 16, see sd)
  int off_x1 = 0;   // byte offset of the second activation buffer
  int off_w = 0;    // byte offset of the weight tile
  int off_e = 0;    // byte offset of the energy partial sums [wn][bm] (fp32)
  int off_d[kMaxLayers] = {};  // byte offset of act'(z_j) [bm][sd[j]] (fp32); grad only
  int sd[kMaxLayers] = {};     // its row stride in floats: pad32(pad16(H_j)) + 8, so that a half-warp's
                               // float2 accesses (4 rows x 4 lanes) fall in distinct banks
  int smem = 0;     // total dynamic shared memory in bytes
};

__device__ __forceinline__ uint32_t lds32(const uint16_t* p) { return *reinterpret_cast<const uint32_t*>(p); }
__device__ __forceinline__ void sts32(uint16_t* p, uint16_t lo, uint16_t hi) {
  *reinterpret_cast<uint32_t*>(p) = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
}

// Stage the weight tile for output columns [n0, n0 + 64) and reduction rows [k0, k0 + kc) into
// ws[n][k] (zero outside the matrix, so padded columns and rows contribute nothing).
// kn == false: W is [N][Kdim] (forward: out = in . W^T). kn == true: W is [Kdim][N] (backward:
// out = in . W), transposed on the way in.
__device__ __forceinline__ void tc_stage_weights(const uint16_t* __restrict__ W, bool kn, int N, int Kdim, int n0,
                                                 int k0, int kc, uint16_t* __restrict__ ws) {
  const int tid = threadIdx.x, nthr = blockDim.x;
  const bool aligned = (reinterpret_cast<uintptr_t>(W) & 15) == 0;
  if (!kn) {
    if (aligned && (Kdim & 7) == 0) {
      // Kdim % 8 == 0: an 8-element group is wholly inside or wholly outside the matrix.
      const int groups = kc >> 3;
      for (int i = tid; i < kTcChunk * groups; i += nthr) {
        const int n = i / groups, g = i - n * groups;
        const int k = k0 + (g << 3);
        uint4 v = make_uint4(0, 0, 0, 0);
        if (n0 + n < N && k < Kdim) v = *reinterpret_cast<const uint4*>(W + (size_t)(n0 + n) * Kdim + k);
        *reinterpret_cast<uint4*>(ws + n * kTcWsStride + (g << 3)) = v;
      }
    } else {
      for (int i = tid; i < kTcChunk * kc; i += nthr) {
        const int n = i / kc, k = i - n * kc;
        uint16_t v = 0;
        if (n0 + n < N && k0 + k < Kdim) v = W[(size_t)(n0 + n) * Kdim + k0 + k];
        ws[n * kTcWsStride + k] = v;
      }
    }
  } else {
    if (aligned && (N & 7) == 0) {
      for (int i = tid; i < kc * (kTcChunk / 8); i += nthr) {
        const int k = i >> 3, n = (i & 7) << 3;
        uint4 v = make_uint4(0, 0, 0, 0);
        if (k0 + k < Kdim && n0 + n < N) v = *reinterpret_cast<const uint4*>(W + (size_t)(k0 + k) * N + n0 + n);
        const uint16_t* h = reinterpret_cast<const uint16_t*>(&v);
#pragma unroll
        for (int j = 0; j < 8; ++j) ws[(n + j) * kTcWsStride + k] = h[j];
      }
    } else {
      for (int i = tid; i < kc * kTcChunk; i += nthr) {
        const int k = i / kTcChunk, n = i - k * kTcChunk;
        uint16_t v = 0;
        if (k0 + k < Kdim && n0 + n < N) v = W[(size_t)(k0 + k) * N + n0 + n];
        ws[n * kTcWsStride + k] = v;
      }
    }
  }
}

// out[bm, Np] = X[bm, Kp] . op(W) for the CTA's tile, Np = pad16(N), Kp = pad16(Kdim). X holds 16-bit
// values with finite padding columns. Each warp owns 16 rows and the 8-column n-tiles nt of a 64-column
// chunk with nt % wn == its column index; after each chunk, epi(n0, acc) receives the fp32 accumulators
// in the m16n8 C layout: acc[nt][0..1] = row g, columns n0 + 8 nt + 2 t + {0, 1}; acc[nt][2..3] = row
// g + 8 (g = lane / 4, t = lane % 4, rows relative to the warp's first row).
// Starts with a barrier, so the caller's previous writes to X are visible to every warp.
template <typename T, typename Epi>
__device__ __forceinline__ void tc_gemm(const TcLayout& lay, const uint16_t* __restrict__ X,
                                        const uint16_t* __restrict__ W, bool kn, int N, int Kdim,
                                        uint16_t* __restrict__ ws, Epi&& epi) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int wrow = warp / lay.wn, wcol = warp - wrow * lay.wn;
  const int g = lane >> 2, t = lane & 3;
  const int Np = pad16(N), Kp = pad16(Kdim);
  const uint16_t* xa = X + (wrow * 16 + g) * lay.sa + 2 * t;
  for (int n0 = 0; n0 < Np; n0 += kTcChunk) {
    float acc[8][4];
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.f;
    for (int k0 = 0; k0 < Kp; k0 += kTcChunk) {
      const int kc = min(kTcChunk, Kp - k0);
      __syncthreads();  // every warp is done with the previous tile (and X writes are visible)
      tc_stage_weights(W, kn, N, Kdim, n0, k0, kc, ws);
      __syncthreads();
      for (int ks = 0; ks < kc; ks += 16) {
        // A fragment (16x16, row-major): a0 (g, 2t..), a1 (g+8, 2t..), a2 (g, 2t+8..), a3 (g+8, 2t+8..).
        const uint16_t* xk = xa + k0 + ks;
        uint32_t a[4];
        a[0] = lds32(xk);
        a[1] = lds32(xk + 8 * lay.sa);
        a[2] = lds32(xk + 8);
        a[3] = lds32(xk + 8 * lay.sa + 8);
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
          if (nt % lay.wn != wcol || n0 + nt * 8 >= Np) continue;
          // B fragment (16x8, col-major = ws[n][k]): b0 (k 2t.., n g), b1 (k 2t+8.., n g).
          const uint16_t* wb = ws + (nt * 8 + g) * kTcWsStride + ks + 2 * t;
          Mma16<T>::mma(acc[nt], a, lds32(wb), lds32(wb + 8));
        }
      }
    }
    epi(n0, acc);
  }
}

template <Act A, typename T>
__global__ void __launch_bounds__(kTcMaxThreads) mlp_tc_kernel(const MlpParams<T> p, const TcLayout lay, bool grad) {
  using M = Mma16<T>;
  PYEBM_DYNAMIC_SMEM(smem);
  // Ping-pong activation buffers, swapped as pointers (an array indexed at run time would go to local
  // memory).
  uint16_t* const X0 = reinterpret_cast<uint16_t*>(smem);
  uint16_t* const X1 = reinterpret_cast<uint16_t*>(smem + lay.off_x1);
  uint16_t* ws = reinterpret_cast<uint16_t*>(smem + lay.off_w);
  float* epart = reinterpret_cast<float*>(smem + lay.off_e);

  const int tid = threadIdx.x, nthr = blockDim.x, lane = tid & 31, warp = tid >> 5;
  const int wrow = warp / lay.wn, wcol = warp - wrow * lay.wn;
  const int g = lane >> 2, t = lane & 3;
  const int L = p.L, D = p.D, Dp = pad16(D), sa = lay.sa;
  const int64_t ntiles = (p.rows + lay.bm - 1) / lay.bm;
  const uint16_t* y = reinterpret_cast<const uint16_t*>(p.y);

  for (int64_t tile = blockIdx.x; tile < ntiles; tile += gridDim.x) {
    const int64_t row0 = tile * lay.bm;
    // The two rows (relative to the tile) this thread holds in every C fragment.
    const int r_lo = wrow * 16 + g, r_hi = r_lo + 8;
    const int64_t R_lo = row0 + r_lo, R_hi = row0 + r_hi;
    const int64_t c_lo = R_lo < p.rows ? R_lo / p.K : -1, c_hi = R_hi < p.rows ? R_hi / p.K : -1;

    __syncthreads();  // the previous tile is finished with every buffer
    // y tile -> X0, zero-padded to Dp columns; rows past the end are zero (their results are dropped).
    for (int i = tid; i < lay.bm * Dp; i += nthr) {
      const int r = i / Dp, k = i - r * Dp;
      uint16_t v = 0;
      if (row0 + r < p.rows && k < D) v = y[(row0 + r) * D + k];
      X0[r * sa + k] = v;
    }

    // ---- forward ----
    uint16_t* xin = X0;   // input of the next product
    uint16_t* xout = X1;  // its output
    float e_lo = 0.f, e_hi = 0.f;
    for (int j = 0; j < L; ++j) {
      const int N = p.width[j];
      const bool first = j == 0, last = j == L - 1;
      const bool res = !first && p.res_at(j - 1);
      const uint16_t* Xin = xin;
      uint16_t* Xout = xout;
      float* dj = reinterpret_cast<float*>(smem + lay.off_d[j]);
      const int sd = lay.sd[j];
      const uint16_t* W = reinterpret_cast<const uint16_t*>(first ? p.w_in : p.w[j - 1]);
      const int Kdim = first ? D : p.width[j - 1];
      const T* bias = first ? nullptr : p.b[j - 1];
      auto epi = [&](int n0, float (&acc)[8][4]) {
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
          const int c = n0 + nt * 8 + 2 * t;
          if (nt % lay.wn != wcol || n0 + nt * 8 >= pad16(N)) continue;
#pragma unroll
          for (int hf = 0; hf < 2; ++hf) {
            const int r = hf ? r_hi : r_lo;
            const int64_t crow = hf ? c_hi : c_lo;
            float h[2];
#pragma unroll
            for (int q = 0; q < 2; ++q) {
              const int col = c + q;
              float z = acc[nt][2 * hf + q];
              if (col < N) {
                if (first) z += crow >= 0 ? to_acc(p.ctx[crow * N + col]) : 0.f;
                else z += to_acc(bias[col]);
              }
              float a, d;
              act_fwd_deriv<A, float>(z, a, d);
              if (res) a += M::value(Xin[r * sa + col]);
              h[q] = a;
              if (grad) dj[r * sd + col] = d;
              if (last && col < N) (hf ? e_hi : e_lo) += a * to_acc(p.w_out[col]);
            }
            sts32(Xout + r * sa + c, M::bits(h[0]), M::bits(h[1]));
          }
        }
      };
      tc_gemm<T>(lay, Xin, W, /*kn=*/false, N, Kdim, ws, epi);
      swap_ptr(xin, xout);
    }

    // ---- energy: quad, then warp-column partial sums in a fixed order (deterministic) ----
    e_lo += __shfl_xor_sync(0xffffffffu, e_lo, 1);
    e_lo += __shfl_xor_sync(0xffffffffu, e_lo, 2);
    e_hi += __shfl_xor_sync(0xffffffffu, e_hi, 1);
    e_hi += __shfl_xor_sync(0xffffffffu, e_hi, 2);
    if (t == 0) {
      epart[wcol * lay.bm + r_lo] = e_lo;
      epart[wcol * lay.bm + r_hi] = e_hi;
    }
    __syncthreads();
    if (tid < lay.bm && row0 + tid < p.rows) {
      float e = to_acc(p.b_out[0]);
      for (int w = 0; w < lay.wn; ++w) e += epart[w * lay.bm + tid];
      p.E[row0 + tid] = from_acc<T>(e);
    }
    if (!grad) continue;

    // ---- backward to the input ----
    // dE/dz_L = w_out * act'(z_L) -> xin (h_L is no longer needed). When the last layer is residual,
    // act'(z_L) is replaced by dE/dh_L = w_out, which the layer below adds to its own gradient.
    {
      const int HL = p.width[L - 1], HLp = pad16(HL), sd = lay.sd[L - 1];
      float* dL = reinterpret_cast<float*>(smem + lay.off_d[L - 1]);
      const bool keep = L >= 2 && p.res_at(L - 2);
      for (int i = tid; i < lay.bm * HLp; i += nthr) {
        const int r = i / HLp, c = i - r * HLp;
        const float gh = c < HL ? to_acc(p.w_out[c]) : 0.f;
        const float gz = gh * dL[r * sd + c];
        xin[r * sa + c] = M::bits(gz);
        if (keep) dL[r * sd + c] = gh;
      }
    }
    for (int l = L - 2; l >= 0; --l) {
      // dE/dh_l = dE/dz_{l+1} . W_l (+ dE/dh_{l+1}); dE/dz_l = dE/dh_l * act'(z_l).
      const int N = p.width[l], Kdim = p.width[l + 1];
      const bool res = p.res_at(l), keep = l >= 1 && p.res_at(l - 1);
      float* dl = reinterpret_cast<float*>(smem + lay.off_d[l]);
      const float* dn = reinterpret_cast<const float*>(smem + lay.off_d[l + 1]);
      const int sdl = lay.sd[l], sdn = lay.sd[l + 1];
      uint16_t* Xout = xout;
      auto epi = [&](int n0, float (&acc)[8][4]) {
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
          const int c = n0 + nt * 8 + 2 * t;
          if (nt % lay.wn != wcol || n0 + nt * 8 >= pad16(N)) continue;
#pragma unroll
          for (int hf = 0; hf < 2; ++hf) {
            const int r = hf ? r_hi : r_lo;
            float gz[2];
#pragma unroll
            for (int q = 0; q < 2; ++q) {
              const int col = c + q;
              float gh = acc[nt][2 * hf + q];
              if (res) gh += dn[r * sdn + col];
              gz[q] = gh * dl[r * sdl + col];
              if (keep) dl[r * sdl + col] = gh;
            }
            sts32(Xout + r * sa + c, M::bits(gz[0]), M::bits(gz[1]));
          }
        }
      };
      tc_gemm<T>(lay, xin, reinterpret_cast<const uint16_t*>(p.w[l]), /*kn=*/true, N, Kdim, ws, epi);
      swap_ptr(xin, xout);
    }
    // G = dE/dz_1 . W_in  ([bm, H1] x [H1, D]).
    {
      uint16_t* G = reinterpret_cast<uint16_t*>(p.G);
      auto epi = [&](int n0, float (&acc)[8][4]) {
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
          const int c = n0 + nt * 8 + 2 * t;
          if (nt % lay.wn != wcol || n0 + nt * 8 >= Dp) continue;
#pragma unroll
          for (int hf = 0; hf < 2; ++hf) {
            const int64_t R = hf ? R_hi : R_lo;
            if (R >= p.rows) continue;
#pragma unroll
            for (int q = 0; q < 2; ++q)
              if (c + q < D) G[R * D + c + q] = M::bits(acc[nt][2 * hf + q]);
          }
        }
      };
      tc_gemm<T>(lay, xin, reinterpret_cast<const uint16_t*>(p.w_in), /*kn=*/true, D, p.width[0], ws, epi);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// SIMT path (any dtype, any width)
// ------------------------------------------------------------------------------------------------

constexpr int kSimtRows = 32;     // rows per tile: one per lane
constexpr int kSimtThreads = 256;  // 8 warps; a warp computes 4 output columns of all 32 rows at a time
constexpr int kSimtCols = 4;

// Workspace layout (elements of the accumulation type): X0, X1 [32][sa], then act'(z_j) [32][sd[j]].
// Odd row strides keep the lanes (rows) of a warp in distinct banks.
struct SimtLayout {
  int sa = 0;
  int64_t off_x1 = 0;
  int64_t off_d[kMaxLayers] = {};
  int sd[kMaxLayers] = {};
  int64_t elems = 0;        // per CTA
  bool in_smem = true;      // dynamic shared memory, else a global workspace of elems per CTA
};

// out[r, n] = sum_k X[r, k] * W(n, k) for the 32 rows, n < N; epi(r, n, acc) per element (each element
// by exactly one thread). W(n, k) = W[n * Kdim + k] (kn false) or W[k * N + n] (kn true): the same for
// every lane, so the loads are broadcasts. Starts with a barrier.
template <typename T, typename Acc, typename Epi>
__device__ __forceinline__ void simt_gemm(const Acc* __restrict__ X, int sa, const T* __restrict__ W, bool kn, int N,
                                          int Kdim, Epi&& epi) {
  const int r = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  __syncthreads();
  const Acc* xr = X + r * sa;
  for (int nb = warp * kSimtCols; nb < N; nb += nwarps * kSimtCols) {
    int n[kSimtCols];
#pragma unroll
    for (int q = 0; q < kSimtCols; ++q) n[q] = min(nb + q, N - 1);  // clamped; the result is dropped
    Acc acc[kSimtCols] = {};
    for (int k = 0; k < Kdim; ++k) {
      const Acc x = xr[k];
#pragma unroll
      for (int q = 0; q < kSimtCols; ++q) {
        const T w = kn ? W[(size_t)k * N + n[q]] : W[(size_t)n[q] * Kdim + k];
        acc[q] += x * static_cast<Acc>(to_acc(w));
      }
    }
#pragma unroll
    for (int q = 0; q < kSimtCols; ++q)
      if (nb + q < N) epi(r, nb + q, acc[q]);
  }
}

// E (and G when grad) of the 32 rows row0 .. row0 + 31 of the network p at the points y [p.rows, D] (rows
// past p.rows are computed on zeros and dropped), into E [p.rows] and G [p.rows, D]; p.y, p.E and p.G are
// not read (p stays the kernel parameter, so its arrays are read from the parameter bank, not copied to
// local memory). base: the CTA's activation buffers (lay.elems elements). Every thread of the CTA calls
// it; it starts with a barrier (the caller's writes to y and to the buffers are visible) and ends after
// each thread's last write to E / G, without a barrier. Also the per-step energy of the whole-loop
// descent kernel (pyebm/cuda/descent.cuh).
template <Act A, typename T>
__device__ __forceinline__ void simt_tile(const MlpParams<T>& p, const SimtLayout& lay, bool grad,
                                          typename AccType<T>::type* base, int64_t row0, const T* __restrict__ y,
                                          T* __restrict__ E, T* __restrict__ G) {
  using Acc = typename AccType<T>::type;
  Acc* const X0 = base;
  Acc* const X1 = base + lay.off_x1;
  const int tid = threadIdx.x, nthr = blockDim.x, lane = tid & 31, warp = tid >> 5, nwarps = nthr >> 5;
  const int L = p.L, D = p.D, sa = lay.sa;
  {
    __syncthreads();
    for (int i = tid; i < kSimtRows * D; i += nthr) {
      const int r = i / D, k = i - r * D;
      X0[r * sa + k] = row0 + r < p.rows ? static_cast<Acc>(to_acc(y[(row0 + r) * D + k])) : Acc(0);
    }
    Acc* xin = X0;
    Acc* xout = X1;
    for (int j = 0; j < L; ++j) {
      const int N = p.width[j];
      const bool first = j == 0;
      const bool res = !first && p.res_at(j - 1);
      const Acc* Xin = xin;
      Acc* Xout = xout;
      Acc* dj = base + lay.off_d[j];
      const int sd = lay.sd[j];
      const T* bias = first ? nullptr : p.b[j - 1];
      auto epi = [&](int r, int col, Acc z) {
        const int64_t R = row0 + r;
        if (first) z += R < p.rows ? static_cast<Acc>(to_acc(p.ctx[(R / p.K) * N + col])) : Acc(0);
        else z += static_cast<Acc>(to_acc(bias[col]));
        Acc a, d;
        act_fwd_deriv<A, Acc>(z, a, d);
        if (res) a += Xin[r * sa + col];
        Xout[r * sa + col] = a;
        if (grad) dj[r * sd + col] = d;
      };
      simt_gemm<T, Acc>(Xin, sa, first ? p.w_in : p.w[j - 1], /*kn=*/false, N, first ? D : p.width[j - 1], epi);
      swap_ptr(xin, xout);
    }
    __syncthreads();
    {  // E: one warp per row, lanes across the width, then a fixed-order shuffle tree.
      const int HL = p.width[L - 1];
      for (int r = warp; r < kSimtRows; r += nwarps) {
        Acc s = 0;
        for (int c = lane; c < HL; c += 32) s += xin[r * sa + c] * static_cast<Acc>(to_acc(p.w_out[c]));
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
        if (lane == 0 && row0 + r < p.rows) E[row0 + r] = from_acc<T>(s + static_cast<Acc>(to_acc(p.b_out[0])));
      }
    }
    if (!grad) return;
    {  // dE/dz_L = w_out * act'(z_L); dE/dh_L = w_out kept when the last layer is residual.
      const int HL = p.width[L - 1], sd = lay.sd[L - 1];
      Acc* dL = base + lay.off_d[L - 1];
      const bool keep = L >= 2 && p.res_at(L - 2);
      __syncthreads();  // xin (h_L) was read for E above
      for (int i = tid; i < kSimtRows * HL; i += nthr) {
        const int r = i / HL, c = i - r * HL;
        const Acc gh = static_cast<Acc>(to_acc(p.w_out[c]));
        xin[r * sa + c] = gh * dL[r * sd + c];
        if (keep) dL[r * sd + c] = gh;
      }
    }
    for (int l = L - 2; l >= 0; --l) {
      const int N = p.width[l];
      const bool res = p.res_at(l), keep = l >= 1 && p.res_at(l - 1);
      Acc* dl = base + lay.off_d[l];
      const Acc* dn = base + lay.off_d[l + 1];
      const int sdl = lay.sd[l], sdn = lay.sd[l + 1];
      Acc* Xout = xout;
      auto epi = [&](int r, int col, Acc gh) {
        if (res) gh += dn[r * sdn + col];
        Xout[r * sa + col] = gh * dl[r * sdl + col];
        if (keep) dl[r * sdl + col] = gh;
      };
      simt_gemm<T, Acc>(xin, sa, p.w[l], /*kn=*/true, N, p.width[l + 1], epi);
      swap_ptr(xin, xout);
    }
    {
      auto epi = [&](int r, int col, Acc gv) {
        if (row0 + r < p.rows) G[(row0 + r) * D + col] = from_acc<T>(gv);
      };
      simt_gemm<T, Acc>(xin, sa, p.w_in, /*kn=*/true, D, p.width[0], epi);
    }
  }
}

template <Act A, typename T>
__global__ void __launch_bounds__(kSimtThreads, 2) mlp_simt_kernel(const MlpParams<T> p, const SimtLayout lay, bool grad,
                                                             unsigned char* __restrict__ gws) {
  using Acc = typename AccType<T>::type;
  PYEBM_DYNAMIC_SMEM(smem);
  Acc* base = lay.in_smem ? reinterpret_cast<Acc*>(smem)
                          : reinterpret_cast<Acc*>(gws) + (size_t)blockIdx.x * (size_t)lay.elems;
  const int64_t ntiles = (p.rows + kSimtRows - 1) / kSimtRows;
  for (int64_t tile = blockIdx.x; tile < ntiles; tile += gridDim.x)
    simt_tile<A, T>(p, lay, grad, base, tile * kSimtRows, p.y, p.E, p.G);
}

// ------------------------------------------------------------------------------------------------
// Planning and launch (host)
// ------------------------------------------------------------------------------------------------

struct DeviceCaps {
  int sms = 0;
  int smem_optin = 0;  // largest dynamic shared memory one block may ask for
};

inline cudaError_t query_device(int device, DeviceCaps* caps) {
  cudaError_t e = cudaDeviceGetAttribute(&caps->sms, cudaDevAttrMultiProcessorCount, device);
  if (e != cudaSuccess) return e;
  return cudaDeviceGetAttribute(&caps->smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
}

enum class MlpPath : int { kAuto = 0, kTensorCore = 1, kSimt = 2 };

struct MlpPlan {
  MlpPath path = MlpPath::kSimt;
  TcLayout tc;
  SimtLayout simt;
  unsigned grid = 0;
  int threads = 0;
  size_t smem = 0;      // dynamic shared memory per block
  size_t ws_bytes = 0;  // global workspace the caller must pass to launch_mlp (SIMT spill only)
};

template <typename T>
constexpr bool is_mma16() {
  return std::is_same<T, __nv_bfloat16>::value || std::is_same<T, __half>::value;
}

// Tensor-core layout for wr warps along the rows and wn along the columns; smem = 0 if it cannot be built.
template <typename T>
TcLayout tc_layout(const MlpParams<T>& p, bool grad, int wr, int wn) {
  TcLayout lay;
  lay.wr = wr;
  lay.wn = wn;
  lay.bm = 16 * wr;
  int maxw = pad16(p.D);
  for (int j = 0; j < p.L; ++j) maxw = std::max(maxw, pad16(p.width[j]));
  lay.sa = maxw + 8;
  size_t off = 0;
  const size_t xbytes = align16(size_t(lay.bm) * lay.sa * 2);
  off += xbytes;
  lay.off_x1 = static_cast<int>(off);
  off += xbytes;
  lay.off_w = static_cast<int>(off);
  off += align16(size_t(kTcChunk) * kTcWsStride * 2);
  lay.off_e = static_cast<int>(off);
  off += align16(size_t(wn) * lay.bm * 4);
  for (int j = 0; j < p.L; ++j) {
    lay.sd[j] = pad32(pad16(p.width[j])) + 8;
    lay.off_d[j] = static_cast<int>(off);
    if (grad) off += align16(size_t(lay.bm) * lay.sd[j] * 4);
    if (off > (size_t(1) << 30)) return TcLayout{};
  }
  lay.smem = static_cast<int>(off);
  return lay;
}

// Chooses the kernel and its shape. force: kAuto, or a path to use where it can run (tests use it).
template <typename T>
MlpPlan plan_mlp(const MlpParams<T>& p, bool grad, const DeviceCaps& caps, MlpPath force = MlpPath::kAuto) {
  MlpPlan plan;
  const int sms = std::max(1, caps.sms);
  if (is_mma16<T>() && force != MlpPath::kSimt) {
    // Few tiles: 16-row tiles with 8 column warps spread the rows over more SMs and shorten each CTA's
    // chain of products. Many tiles: 64-row tiles (16 warps) load each weight tile once per 64 rows.
    const int64_t tiles64 = (p.rows + 63) / 64;
    const int shapes_many[][2] = {{4, 4}, {2, 4}, {1, 4}};
    const int shapes_few[][2] = {{1, 8}, {1, 4}};
    TcLayout best;
    if (tiles64 < sms) {
      for (const auto& s : shapes_few) {
        TcLayout lay = tc_layout(p, grad, s[0], s[1]);
        if (lay.smem > 0 && lay.smem <= caps.smem_optin) { best = lay; break; }
      }
    } else {
      for (const auto& s : shapes_many) {
        TcLayout lay = tc_layout(p, grad, s[0], s[1]);
        if (lay.smem > 0 && lay.smem <= caps.smem_optin) { best = lay; break; }
      }
    }
    if (best.smem > 0) {
      plan.path = MlpPath::kTensorCore;
      plan.tc = best;
      plan.threads = 32 * best.wr * best.wn;
      plan.smem = static_cast<size_t>(best.smem);
      const int64_t tiles = (p.rows + best.bm - 1) / best.bm;
      plan.grid = static_cast<unsigned>(std::min<int64_t>(tiles, 0x7fffffff));
      return plan;
    }
  }
  using Acc = typename AccType<T>::type;
  SimtLayout& lay = plan.simt;
  int maxw = p.D;
  for (int j = 0; j < p.L; ++j) maxw = std::max(maxw, p.width[j]);
  lay.sa = maxw | 1;
  int64_t off = 2 * int64_t(kSimtRows) * lay.sa;
  lay.off_x1 = int64_t(kSimtRows) * lay.sa;
  for (int j = 0; j < p.L; ++j) {
    lay.sd[j] = p.width[j] | 1;
    lay.off_d[j] = off;
    if (grad) off += int64_t(kSimtRows) * lay.sd[j];
  }
  lay.elems = off;
  const int64_t bytes = off * int64_t(sizeof(Acc));
  const int64_t tiles = (p.rows + kSimtRows - 1) / kSimtRows;
  plan.path = MlpPath::kSimt;
  plan.threads = kSimtThreads;
  if (bytes <= caps.smem_optin) {
    lay.in_smem = true;
    plan.smem = static_cast<size_t>(bytes);
    plan.grid = static_cast<unsigned>(std::min<int64_t>(tiles, 0x7fffffff));
  } else {
    // Activations too wide for shared memory: a persistent grid over a global workspace of at most
    // 4 CTAs per SM and about 1 GiB; the workspace stays mostly in L2 at moderate widths.
    lay.in_smem = false;
    const int64_t budget = int64_t(1) << 30;
    const int64_t ctas = std::max<int64_t>(1, std::min<int64_t>({tiles, 4 * int64_t(sms), budget / bytes}));
    plan.smem = 0;
    plan.grid = static_cast<unsigned>(ctas);
    plan.ws_bytes = static_cast<size_t>(ctas * bytes);
  }
  return plan;
}

#if !defined(PYEBM_GPU_EMULATE)
// Raises a kernel's dynamic shared-memory limit to the device maximum once per device.
template <typename Tag>
cudaError_t allow_smem(const void* fn, int device, int bytes) {
  static std::atomic<uint64_t> done{0};
  const uint64_t bit = uint64_t(1) << (device & 63);
  if (done.load(std::memory_order_relaxed) & bit) return cudaSuccess;
  cudaError_t e = cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (e == cudaSuccess) done.fetch_or(bit, std::memory_order_relaxed);
  return e;
}

template <Act A, typename T, bool kTc>
struct KernelTag {};

template <Act A, typename T>
cudaError_t launch_mlp_act(const MlpParams<T>& p, bool grad, const MlpPlan& plan, void* ws, int device,
                           const DeviceCaps& caps, cudaStream_t stream) {
  if (plan.path == MlpPath::kTensorCore) {
    if constexpr (is_mma16<T>()) {
      const void* fn = reinterpret_cast<const void*>(&mlp_tc_kernel<A, T>);
      if (plan.smem > 48 * 1024) {
        cudaError_t e = allow_smem<KernelTag<A, T, true>>(fn, device, caps.smem_optin);
        if (e != cudaSuccess) return e;
      }
      mlp_tc_kernel<A, T><<<plan.grid, plan.threads, plan.smem, stream>>>(p, plan.tc, grad);
      return cudaGetLastError();
    } else {
      return cudaErrorInvalidValue;  // the tensor-core path takes 16-bit inputs only
    }
  }
  if (!plan.simt.in_smem && ws == nullptr) return cudaErrorInvalidValue;
  const void* fn = reinterpret_cast<const void*>(&mlp_simt_kernel<A, T>);
  if (plan.smem > 48 * 1024) {
    cudaError_t e = allow_smem<KernelTag<A, T, false>>(fn, device, caps.smem_optin);
    if (e != cudaSuccess) return e;
  }
  mlp_simt_kernel<A, T><<<plan.grid, plan.threads, plan.smem, stream>>>(p, plan.simt, grad,
                                                                        static_cast<unsigned char*>(ws));
  return cudaGetLastError();
}

// E (and G when p.G != nullptr) for all p.rows rows on `stream`. `plan` from plan_mlp with the same
// params and grad flag; `ws` at least plan.ws_bytes bytes of device memory (may be null when 0).
// The current device must be `device`.
template <typename T>
cudaError_t launch_mlp(const MlpParams<T>& p, Act act, const MlpPlan& plan, void* ws, int device,
                       const DeviceCaps& caps, cudaStream_t stream) {
  if (p.rows <= 0) return cudaSuccess;
  if (p.L < 1 || p.L > kMaxLayers || p.D < 1) return cudaErrorInvalidValue;
  const bool grad = p.G != nullptr;
  switch (act) {
    case Act::kRelu: return launch_mlp_act<Act::kRelu, T>(p, grad, plan, ws, device, caps, stream);
    case Act::kSilu: return launch_mlp_act<Act::kSilu, T>(p, grad, plan, ws, device, caps, stream);
    case Act::kGelu: return launch_mlp_act<Act::kGelu, T>(p, grad, plan, ws, device, caps, stream);
    case Act::kGeluTanh: return launch_mlp_act<Act::kGeluTanh, T>(p, grad, plan, ws, device, caps, stream);
    case Act::kTanh: return launch_mlp_act<Act::kTanh, T>(p, grad, plan, ws, device, caps, stream);
    case Act::kSoftplus: return launch_mlp_act<Act::kSoftplus, T>(p, grad, plan, ws, device, caps, stream);
  }
  return cudaErrorInvalidValue;
}
#endif  // !PYEBM_GPU_EMULATE

}  // namespace gpu
}  // namespace pyebm
