// Fused MLP energy + input gradient for one block of candidate rows. Torch-free.
//
// E(y) = w_out . h_L + b_out,  h_1 = act(c_b + W_in y),  h_{l+1} = act(W_l h_l + b_l) (+ h_l).
// A block of M rows goes forward through every layer and straight back, so its activations stay in
// this core's cache: per layer one GEMM, then one fused pass that writes act(z) and act'(z) together.
// The backward reuses the forward buffers: act'(z) becomes dE/dz in place, and dE/dh_{l-1} overwrites
// h_{l-1}, which the backward no longer needs.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "blas.h"
#include "vec_act.h"
#include "pyebm/activations.h"

namespace pyebm {
namespace cpu {

constexpr int kMaxLayers = 64;

template <typename T>
struct MlpDesc {
  int64_t D = 0;                 // candidate width
  int64_t K = 1;                 // candidates per context: row r uses context row r / K
  int num_hidden = 0;            // L, number of hidden layers (>= 1)
  int64_t width[kMaxLayers]{};   // H_1 .. H_L
  const T* ctx = nullptr;        // [B, H_1]  (W_x x + b_1)
  const T* w_in = nullptr;       // [H_1, D]
  const T* w[kMaxLayers]{};      // w[l] : [H_{l+2}, H_{l+1}] for l = 0 .. L-2
  // Optional W^T copies ([D, H_1] and [H_{l+1}, H_{l+2}]): the forward products then run as A @ W^T (see
  // gemm_nt_pk). A plan (mlp_plan.cpp) has them all; the ops make the ones the small path does not cover.
  const T* wt_in = nullptr;
  const T* wt[kMaxLayers]{};
  const T* b[kMaxLayers]{};      // b[l] : [H_{l+2}]
  const T* w_out = nullptr;      // [H_L]
  T b_out = T(0);
  bool residual = false;

  bool res_at(int l) const { return residual && width[l] == width[l + 1]; }  // layer l -> l+1
  int64_t max_width() const {
    int64_t m = D;
    for (int l = 0; l < num_hidden; ++l) m = std::max(m, width[l]);
    return m;
  }
  // Multiply-adds x2 per row: the forward, and the input-gradient backward when grad.
  int64_t flops_per_row(bool grad) const {
    int64_t f = D * width[0] + width[num_hidden - 1];
    for (int l = 0; l + 1 < num_hidden; ++l) f += width[l] * width[l + 1];
    return grad ? 4 * f : 2 * f;
  }
  // Workspace elements per row: h and act' for every layer.
  int64_t ws_per_row(bool grad) const {
    int64_t s = 0;
    for (int l = 0; l < num_hidden; ++l) s += width[l];
    return grad ? 2 * s : s;
  }
};

// Per-thread scratch that grows and is kept, so steady-state calls do not touch the heap.
template <typename T>
inline T* thread_scratch(int64_t n) {
  thread_local std::vector<T> buf;
  if (static_cast<int64_t>(buf.size()) < n) buf.resize(static_cast<size_t>(n));
  return buf.data();
}

template <Act A, typename T>
inline void act_pass(int64_t n, T* __restrict z_to_h, T* __restrict d) {
#ifdef PYEBM_VEC_ACT
  if constexpr (std::is_same<T, float>::value && has_vec_act<A>()) return vec_act_pass<A>(n, z_to_h, d);
#endif
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    T a, g;
    act_fwd_deriv<A, T>(z_to_h[i], a, g);
    z_to_h[i] = a;
    d[i] = g;
  }
}

template <Act A, typename T>
inline void act_pass_fwd(int64_t n, T* __restrict z_to_h) {
#ifdef PYEBM_VEC_ACT
  if constexpr (std::is_same<T, float>::value && has_vec_act<A>()) return vec_act_pass<A>(n, z_to_h, nullptr);
#endif
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) z_to_h[i] = act_fwd<A, T>(z_to_h[i]);
}

// a . b over n elements with 16 independent partial sums (lane t takes the elements j = t mod 16), folded
// in a fixed pairwise order: vectorises without reassociation, and gives the same value on every ISA
// copy up to the FMA contraction of the products.
template <typename T>
inline __attribute__((always_inline)) T dot_lanes(const T* __restrict a, const T* __restrict b, int64_t n) {
  T part[16] = {};
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    for (int t = 0; t < 16; ++t) part[t] += a[j + t] * b[j + t];
  }
  for (int t = 0; j + t < n; ++t) part[t] += a[j + t] * b[j + t];
  for (int w = 8; w >= 1; w /= 2) {
    for (int t = 0; t < w; ++t) part[t] += part[t + w];
  }
  return part[0];
}

// Rows [row0, row0 + M) of y (contiguous [rows, D]). Writes E[M]; with G != nullptr also dE/dy [M, D].
// ws must hold M * desc.ws_per_row(G != nullptr) elements. mlp_block (below) picks the ISA copy.
template <Act A, typename T>
inline __attribute__((always_inline)) void mlp_block_body(const MlpDesc<T>& p, int64_t row0, int64_t M, const T* y,
                                                          T* E, T* G, T* ws) {
  const bool grad = G != nullptr;
  const int L = p.num_hidden;
  T* h[kMaxLayers];
  T* d[kMaxLayers];
  T* cur = ws;
  for (int l = 0; l < L; ++l) {
    h[l] = cur;
    cur += M * p.width[l];
  }
  for (int l = 0; l < L; ++l) {
    d[l] = grad ? cur : nullptr;  // act'(z) is kept only when the gradient is wanted
    if (grad) cur += M * p.width[l];
  }

  // Layer 1: z = c_b + W_in y. Context rows are copied in, then the GEMM accumulates onto them.
  const int64_t H1 = p.width[0];
  for (int64_t i = 0; i < M; ++i) {
    const T* c = p.ctx + ((row0 + i) / p.K) * H1;
    std::copy(c, c + H1, h[0] + i * H1);
  }
  gemm_nt_pk<T>(M, H1, p.D, y, p.w_in, p.wt_in, h[0], /*accumulate=*/true);
  if (grad) act_pass<A, T>(M * H1, h[0], d[0]); else act_pass_fwd<A, T>(M * H1, h[0]);

  for (int l = 0; l + 1 < L; ++l) {
    const int64_t Hi = p.width[l], Ho = p.width[l + 1];
    T* z = h[l + 1];
    const T* bias = p.b[l];
    for (int64_t i = 0; i < M; ++i) std::copy(bias, bias + Ho, z + i * Ho);
    gemm_nt_pk<T>(M, Ho, Hi, h[l], p.w[l], p.wt[l], z, /*accumulate=*/true);
    if (grad) act_pass<A, T>(M * Ho, z, d[l + 1]); else act_pass_fwd<A, T>(M * Ho, z);
    if (p.res_at(l)) {
      const T* hp = h[l];
#pragma omp simd
      for (int64_t i = 0; i < M * Ho; ++i) z[i] += hp[i];
    }
  }

  // Energy: one dot per row with w_out.
  const int64_t HL = p.width[L - 1];
  for (int64_t i = 0; i < M; ++i) E[i] = dot_lanes<T>(h[L - 1] + i * HL, p.w_out, HL) + p.b_out;
  if (!grad) return;

  // Backward to the input. dE/dh_L = w_out for every row; d[l] becomes dE/dz_l in place.
  {
    T* dl = d[L - 1];
    for (int64_t i = 0; i < M; ++i) {
#pragma omp simd
      for (int64_t j = 0; j < HL; ++j) dl[i * HL + j] *= p.w_out[j];
    }
  }
  for (int l = L - 2; l >= 0; --l) {
    const int64_t Hi = p.width[l], Ho = p.width[l + 1];
    T* dh = h[l];  // dE/dh_l overwrites h_l
    if (p.res_at(l)) {
      // dE/dh_l = dE/dz_{l+1} W + dE/dh_{l+1}. For the last layer dE/dh_{l+1} is w_out itself.
      if (l + 1 == L - 1) {
        for (int64_t i = 0; i < M; ++i) std::copy(p.w_out, p.w_out + Hi, dh + i * Hi);
      } else {
        std::copy(h[l + 1], h[l + 1] + M * Hi, dh);
      }
      gemm_nn<T>(M, Ho, Hi, d[l + 1], p.w[l], dh, /*accumulate=*/true);
    } else {
      gemm_nn<T>(M, Ho, Hi, d[l + 1], p.w[l], dh, /*accumulate=*/false);
    }
    T* dl = d[l];
#pragma omp simd
    for (int64_t i = 0; i < M * Hi; ++i) dl[i] *= dh[i];
  }
  gemm_nn<T>(M, H1, p.D, d[0], p.w_in, G, /*accumulate=*/false);
}

// The block's element-wise passes (copies, products, the energy dot) compiled for AVX-512 as well as for the
// baseline ISA; the GEMMs and activation passes dispatch on their own.
#if defined(PYEBM_VEC_ACT) && defined(__x86_64__)
#define PYEBM_HAVE_ISA_COPIES 1
#define PYEBM_TARGET_AVX512 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma")))
template <Act A, typename T>
PYEBM_TARGET_AVX512 __attribute__((noinline)) void mlp_block_avx512(const MlpDesc<T>& p, int64_t row0, int64_t M,
                                                                    const T* y, T* E, T* G, T* ws) {
  mlp_block_body<A, T>(p, row0, M, y, E, G, ws);
}
#endif

template <Act A, typename T>
inline void mlp_block(const MlpDesc<T>& p, int64_t row0, int64_t M, const T* y, T* E, T* G, T* ws) {
#ifdef PYEBM_HAVE_ISA_COPIES
  if (cpu_vec_level() == 2) return mlp_block_avx512<A, T>(p, row0, M, y, E, G, ws);
#endif
  mlp_block_body<A, T>(p, row0, M, y, E, G, ws);
}

}  // namespace cpu
}  // namespace pyebm
