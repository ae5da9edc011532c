// y[M, N] = x[M, K] @ w[N, K]^T (+ add[M, N]) for a few rows (M of order 1-16) against a large weight read
// in its own row layout: the products of EBT's prediction rows (G samples per step) and of one extended
// context token. Torch-free.
//
// With a handful of rows the product is a stream over the weight (a few bytes of arithmetic per byte read);
// a BLAS call for it runs at a fraction of the memory bandwidth (MKL on AMD EPYC: 7-10 GB/s cold, against
// 30 GB/s that one core streams). Here each tile holds MR rows x NJ weight rows of dot products in vector
// registers: per vector step it loads NJ weight vectors (sequential streams, one per weight row) and MR
// vectors of x (in L1/L2), and does MR * NJ multiply-adds. The horizontal sums run once per tile.
//
// Every output element is one dot product over k in a fixed order (vector lanes, then a fixed reduction
// tree), whatever the tile it lies in: the result does not depend on M, on how the columns are split
// between threads, or on which rows share a tile. Row r of y reads only row r of x (and of add), so a
// non-finite value in one row never reaches another. Compiled for AVX-512 and AVX2+FMA through target
// attributes and for the baseline ISA; cpu_vec_level() chooses at run time.
#pragma once

#include <cstdint>

#include "cpu_isa.h"

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define PYEBM_ROWS_LINEAR_X86 1
#endif

namespace pyebm {
namespace cpu {
namespace rows_detail {

#define PYEBM_RL_UNROLL _Pragma("GCC unroll 16")

#ifdef PYEBM_ROWS_LINEAR_X86
#define PYEBM_RL_AVX512 __attribute__((target("avx512f,avx512dq,avx2,fma")))
#define PYEBM_RL_AVX2 __attribute__((target("avx2,fma")))

// How far ahead (floats) a tile prefetches each weight row it streams: the same offset two tiles further
// (the weight's rows are adjacent: 9-12 KiB ahead for rows of 384, which covers the memory latency at full
// bandwidth; one tile ahead was about 5% slower end to end on an AMD EPYC) when the rows are short, else a
// fixed 1 KiB further along the same row. A prefetch never faults, even past the weight's end.
inline int64_t prefetch_distance(int64_t K, int64_t next_tile) { return K <= 1024 ? 2 * next_tile : 256; }

PYEBM_RL_AVX2 inline float hsum_avx2(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

PYEBM_RL_AVX2 inline __m256i mask_avx2(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// One tile: rows x[0..MR) (ldx apart) against weight rows w[0..NJ) (ldw apart), K long.
template <int MR, int NJ>
PYEBM_RL_AVX2 inline __attribute__((always_inline)) void tile_avx2(int64_t K, const float* x, int64_t ldx,
                                                                   const float* w, int64_t ldw, float* out,
                                                                   int64_t ldo, const float* add, int64_t lda) {
  __m256 acc[MR][NJ];
  PYEBM_RL_UNROLL for (int m = 0; m < MR; ++m) PYEBM_RL_UNROLL for (int j = 0; j < NJ; ++j) acc[m][j] =
      _mm256_setzero_ps();
  const int64_t pf = prefetch_distance(K, NJ * ldw);
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 wv[NJ];
    if ((k & 15) == 0)
      PYEBM_RL_UNROLL for (int j = 0; j < NJ; ++j) _mm_prefetch(reinterpret_cast<const char*>(w + j * ldw + k + pf),
                                                                _MM_HINT_T0);
    PYEBM_RL_UNROLL for (int j = 0; j < NJ; ++j) wv[j] = _mm256_loadu_ps(w + j * ldw + k);
    PYEBM_RL_UNROLL for (int m = 0; m < MR; ++m) {
      const __m256 xv = _mm256_loadu_ps(x + m * ldx + k);
      PYEBM_RL_UNROLL for (int j = 0; j < NJ; ++j) acc[m][j] = _mm256_fmadd_ps(xv, wv[j], acc[m][j]);
    }
  }
  if (k < K) {  // the last, partial vector: masked loads read nothing past a row
    const __m256i mk = mask_avx2(K - k);
    __m256 wv[NJ];
    PYEBM_RL_UNROLL for (int j = 0; j < NJ; ++j) wv[j] = _mm256_maskload_ps(w + j * ldw + k, mk);
    PYEBM_RL_UNROLL for (int m = 0; m < MR; ++m) {
      const __m256 xv = _mm256_maskload_ps(x + m * ldx + k, mk);
      PYEBM_RL_UNROLL for (int j = 0; j < NJ; ++j) acc[m][j] = _mm256_fmadd_ps(xv, wv[j], acc[m][j]);
    }
  }
  PYEBM_RL_UNROLL for (int m = 0; m < MR; ++m) PYEBM_RL_UNROLL for (int j = 0; j < NJ; ++j) {
    const float s = hsum_avx2(acc[m][j]);
    out[m * ldo + j] = add ? add[m * lda + j] + s : s;
  }
}

template <int MR, int NJ>
PYEBM_RL_AVX512 inline __attribute__((always_inline)) void tile_avx512(int64_t K, const float* x, int64_t ldx,
                                                                       const float* w, int64_t ldw, float* out,
                                                                       int64_t ldo, const float* add, int64_t lda) {
  __m512 acc[MR][NJ];
  PYEBM_RL_UNROLL for (int m = 0; m < MR; ++m) PYEBM_RL_UNROLL for (int j = 0; j < NJ; ++j) acc[m][j] =
      _mm512_set1_ps(0.0f);
  const int64_t pf = prefetch_distance(K, NJ * ldw);
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m512 wv[NJ];
    PYEBM_RL_UNROLL for (int j = 0; j < NJ; ++j) _mm_prefetch(reinterpret_cast<const char*>(w + j * ldw + k + pf),
                                                              _MM_HINT_T0);
    PYEBM_RL_UNROLL for (int j = 0; j < NJ; ++j) wv[j] = _mm512_loadu_ps(w + j * ldw + k);
    PYEBM_RL_UNROLL for (int m = 0; m < MR; ++m) {
      const __m512 xv = _mm512_loadu_ps(x + m * ldx + k);
      PYEBM_RL_UNROLL for (int j = 0; j < NJ; ++j) acc[m][j] = _mm512_fmadd_ps(xv, wv[j], acc[m][j]);
    }
  }
  if (k < K) {
    const __mmask16 mk = static_cast<__mmask16>((1u << (K - k)) - 1u);
    __m512 wv[NJ];
    PYEBM_RL_UNROLL for (int j = 0; j < NJ; ++j) wv[j] = _mm512_maskz_loadu_ps(mk, w + j * ldw + k);
    PYEBM_RL_UNROLL for (int m = 0; m < MR; ++m) {
      const __m512 xv = _mm512_maskz_loadu_ps(mk, x + m * ldx + k);
      PYEBM_RL_UNROLL for (int j = 0; j < NJ; ++j) acc[m][j] = _mm512_fmadd_ps(xv, wv[j], acc[m][j]);
    }
  }
  PYEBM_RL_UNROLL for (int m = 0; m < MR; ++m) PYEBM_RL_UNROLL for (int j = 0; j < NJ; ++j) {
    const float s = _mm512_reduce_add_ps(acc[m][j]);
    out[m * ldo + j] = add ? add[m * lda + j] + s : s;
  }
}
#endif  // PYEBM_ROWS_LINEAR_X86

// The baseline: eight interleaved partial sums per dot product (independent chains the compiler can keep
// in vector registers without reassociating), added pairwise at the end.
template <int MR, int NJ>
inline void tile_base(int64_t K, const float* x, int64_t ldx, const float* w, int64_t ldw, float* out, int64_t ldo,
                      const float* add, int64_t lda) {
  for (int m = 0; m < MR; ++m) {
    for (int j = 0; j < NJ; ++j) {
      const float* a = x + m * ldx;
      const float* b = w + j * ldw;
      float p[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      int64_t k = 0;
      for (; k + 8 <= K; k += 8)
        for (int l = 0; l < 8; ++l) p[l] += a[k + l] * b[k + l];
      for (int l = 0; k + l < K; ++l) p[l] += a[k + l] * b[k + l];
      const float s = ((p[0] + p[4]) + (p[2] + p[6])) + ((p[1] + p[5]) + (p[3] + p[7]));
      out[m * ldo + j] = add ? add[m * lda + j] + s : s;
    }
  }
}

// Columns [j0, j1) of all M rows, tiles of MRX rows x NJX weight rows (smaller tiles at the edges).
#define PYEBM_RL_PANEL(SUFFIX, ATTR, MRX, NJX)                                                                \
  template <int NJ>                                                                                           \
  ATTR inline __attribute__((always_inline)) void cols_##SUFFIX(int64_t M, int64_t K, const float* x,          \
                                                               int64_t ldx, const float* w, int64_t ldw,       \
                                                               float* y, int64_t ldy, const float* add,        \
                                                               int64_t lda) {                                  \
    int64_t m = 0;                                                                                            \
    for (; m + MRX <= M; m += MRX)                                                                            \
      tile_##SUFFIX<MRX, NJ>(K, x + m * ldx, ldx, w, ldw, y + m * ldy, ldy, add ? add + m * lda : nullptr, lda); \
    const float* xm = x + m * ldx;                                                                            \
    float* ym = y + m * ldy;                                                                                  \
    const float* am = add ? add + m * lda : nullptr;                                                          \
    switch (M - m) {                                                                                          \
      case 3: tile_##SUFFIX<(3 < MRX ? 3 : 1), NJ>(K, xm, ldx, w, ldw, ym, ldy, am, lda); break;              \
      case 2: tile_##SUFFIX<(2 < MRX ? 2 : 1), NJ>(K, xm, ldx, w, ldw, ym, ldy, am, lda); break;              \
      case 1: tile_##SUFFIX<1, NJ>(K, xm, ldx, w, ldw, ym, ldy, am, lda); break;                              \
      default: break;                                                                                         \
    }                                                                                                         \
  }                                                                                                           \
  ATTR __attribute__((noinline)) inline void panel_##SUFFIX(int64_t M, int64_t K, const float* x, int64_t ldx,  \
                                                           const float* w, int64_t ldw, float* y, int64_t ldy,  \
                                                           const float* add, int64_t lda, int64_t j0,          \
                                                           int64_t j1) {                                       \
    int64_t j = j0;                                                                                           \
    for (; j + NJX <= j1; j += NJX)                                                                           \
      cols_##SUFFIX<NJX>(M, K, x, ldx, w + j * ldw, ldw, y + j, ldy, add ? add + j : nullptr, lda);           \
    for (; j < j1; ++j)                                                                                       \
      cols_##SUFFIX<1>(M, K, x, ldx, w + j * ldw, ldw, y + j, ldy, add ? add + j : nullptr, lda);             \
  }

#ifdef PYEBM_ROWS_LINEAR_X86
PYEBM_RL_PANEL(avx512, PYEBM_RL_AVX512, 4, 4)
PYEBM_RL_PANEL(avx2, PYEBM_RL_AVX2, 4, 3)
#endif
PYEBM_RL_PANEL(base, , 4, 2)

}  // namespace rows_detail

// Columns [j0, j1) of y[M, N] = x[M, K] @ w[N, K]^T (+ add): rows of x, w, y, add are ldx, ldw, ldy, lda
// apart (elements); add may be null. The instruction set: cpu_vec_level().
inline void rows_linear_panel(int64_t M, int64_t K, const float* x, int64_t ldx, const float* w, int64_t ldw,
                              float* y, int64_t ldy, const float* add, int64_t lda, int64_t j0, int64_t j1) {
#ifdef PYEBM_ROWS_LINEAR_X86
  const int level = cpu_vec_level();
  if (level >= kIsaAvx512) return rows_detail::panel_avx512(M, K, x, ldx, w, ldw, y, ldy, add, lda, j0, j1);
  if (level >= kIsaAvx2) return rows_detail::panel_avx2(M, K, x, ldx, w, ldw, y, ldy, add, lda, j0, j1);
#endif
  rows_detail::panel_base(M, K, x, ldx, w, ldw, y, ldy, add, lda, j0, j1);
}

}  // namespace cpu
}  // namespace pyebm
