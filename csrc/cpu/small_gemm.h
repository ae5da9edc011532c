// Register-blocked float32 GEMM for the small products of the fused MLP kernels (a block of a few
// dozen rows against a layer of a few hundred units), where a BLAS call costs more in setup than in
// arithmetic. Torch-free.
//
// One kernel, C[M, N] (+)= A[M, K] B[K, N] (row-major, leading dimensions lda, ldb, ldc): each
// micro-tile keeps MR rows x NR vectors of C in registers, broadcasts one element of A per row and
// multiplies it into NR vectors of B's row p. Row r of C reads only row r of A, so a non-finite value
// in one row never reaches another row. The last, partial vector of a row strip uses masked loads and
// stores. Compiled for AVX2+FMA and for AVX-512 through target attributes and chosen at run time.
// gemm_nt first packs W^T (16 x 16 AVX-512 transposes), so it takes this path only with AVX-512.
//
// A second kernel (AVX-512 and AVX2), bcast_gemm, C[M, N] (+)= X[M, P] @ W[N, P]^T for blocks of a few
// dozen rows against a weight of any size read in its own row layout: see bcast_gemm_avx512 / _avx2.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <vector>

#include "vec_act.h"

#if defined(PYEBM_VEC_ACT) && defined(__x86_64__)
#include <immintrin.h>
#define PYEBM_SMALL_GEMM 1

namespace pyebm {
namespace cpu {
namespace sgemm_detail {

// Thread-local scratch: a packed W^T (small_gemm_nt) or a transposed row block (bcast_gemm).
inline float* pack_buffer(int64_t n) {
  thread_local std::vector<float> buf;
  if (static_cast<int64_t>(buf.size()) < n) buf.resize(static_cast<size_t>(n));
  return buf.data();
}

#define PYEBM_SG_UNROLL _Pragma("GCC unroll 16")

// The kernel body, instantiated per ISA. MAKE_MASK(n)/LOADM/STOREM: mask of the first n lanes and the
// masked load/store of the last vector; SPLAT: broadcast of one float (a plain vector-extension splat
// would cost an extra add per broadcast); MAXNR: widest strip in vectors; MRn: rows per tile for a strip
// of n vectors, so that the tile's accumulators and B's vectors fit the register file.
#define PYEBM_DEFINE_SMALL_GEMM(SUFFIX, ATTR, V, MASK_T, MAKE_MASK, LOADM, STOREM, SPLAT, MAXNR, MR1, MR2, MR3, MR4) \
  template <int MR, int NR, bool TAIL>                                                                      \
  ATTR inline __attribute__((always_inline)) void tile_##SUFFIX(                                            \
      int64_t K, const float* __restrict A, int64_t lda, const float* __restrict B, int64_t ldb,            \
      float* __restrict C, int64_t ldc, bool accumulate, MASK_T mask) {                                     \
    constexpr int W = sizeof(V) / sizeof(float);                                                            \
    V acc[MR][NR];                                                                                          \
    PYEBM_SG_UNROLL for (int r = 0; r < MR; ++r) {                                                          \
      PYEBM_SG_UNROLL for (int v = 0; v < NR; ++v) {                                                        \
        if (!accumulate) acc[r][v] = V{};                                                                   \
        else if (TAIL && v == NR - 1) acc[r][v] = LOADM(C + r * ldc + v * W, mask);                         \
        else acc[r][v] = vload<V>(C + r * ldc + v * W);                                                     \
      }                                                                                                     \
    }                                                                                                       \
    for (int64_t p = 0; p < K; ++p) {                                                                       \
      const float* b = B + p * ldb;                                                                         \
      V bv[NR];                                                                                             \
      PYEBM_SG_UNROLL for (int v = 0; v < NR; ++v) {                                                        \
        bv[v] = (TAIL && v == NR - 1) ? LOADM(b + v * W, mask) : vload<V>(b + v * W);                       \
      }                                                                                                     \
      PYEBM_SG_UNROLL for (int r = 0; r < MR; ++r) {                                                        \
        const V a = (V)SPLAT(A[r * lda + p]);                                                              \
        PYEBM_SG_UNROLL for (int v = 0; v < NR; ++v) acc[r][v] += a * bv[v];                                \
      }                                                                                                     \
    }                                                                                                       \
    PYEBM_SG_UNROLL for (int r = 0; r < MR; ++r) {                                                          \
      PYEBM_SG_UNROLL for (int v = 0; v < NR; ++v) {                                                        \
        if (TAIL && v == NR - 1) STOREM(C + r * ldc + v * W, mask, acc[r][v]);                              \
        else vstore<V>(C + r * ldc + v * W, acc[r][v]);                                                     \
      }                                                                                                     \
    }                                                                                                       \
  }                                                                                                         \
                                                                                                            \
  /* All rows of one column strip of NR vectors (the last one masked when TAIL). */                         \
  template <int NR, bool TAIL>                                                                              \
  ATTR inline __attribute__((always_inline)) void strip_##SUFFIX(                                           \
      int64_t M, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,             \
      int64_t ldc, bool accumulate, MASK_T mask) {                                                          \
    constexpr int MR = NR == 1 ? MR1 : NR == 2 ? MR2 : NR == 3 ? MR3 : MR4;                                 \
    int64_t i = 0;                                                                                          \
    for (; i + MR <= M; i += MR)                                                                            \
      tile_##SUFFIX<MR, NR, TAIL>(K, A + i * lda, lda, B, ldb, C + i * ldc, ldc, accumulate, mask);         \
    const float* a = A + i * lda;                                                                           \
    float* c = C + i * ldc;                                                                                 \
    switch (M - i) {                                                                                        \
      case 7: tile_##SUFFIX<7, NR, TAIL>(K, a, lda, B, ldb, c, ldc, accumulate, mask); break;               \
      case 6: tile_##SUFFIX<6, NR, TAIL>(K, a, lda, B, ldb, c, ldc, accumulate, mask); break;               \
      case 5: tile_##SUFFIX<5, NR, TAIL>(K, a, lda, B, ldb, c, ldc, accumulate, mask); break;               \
      case 4: tile_##SUFFIX<4, NR, TAIL>(K, a, lda, B, ldb, c, ldc, accumulate, mask); break;               \
      case 3: tile_##SUFFIX<3, NR, TAIL>(K, a, lda, B, ldb, c, ldc, accumulate, mask); break;               \
      case 2: tile_##SUFFIX<2, NR, TAIL>(K, a, lda, B, ldb, c, ldc, accumulate, mask); break;               \
      case 1: tile_##SUFFIX<1, NR, TAIL>(K, a, lda, B, ldb, c, ldc, accumulate, mask); break;               \
      default: break;                                                                                       \
    }                                                                                                       \
  }                                                                                                         \
                                                                                                            \
  ATTR __attribute__((noinline)) inline void gemm_rr_##SUFFIX(                                              \
      int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,  \
      int64_t ldc, bool accumulate) {                                                                       \
    constexpr int64_t W = sizeof(V) / sizeof(float);                                                        \
    const MASK_T none = MAKE_MASK(W);                                                                       \
    int64_t j = 0;                                                                                          \
    for (; j + MAXNR * W <= N; j += MAXNR * W)                                                              \
      strip_##SUFFIX<MAXNR, false>(M, K, A, lda, B + j, ldb, C + j, ldc, accumulate, none);                 \
    const int64_t rest = N - j;                                                                             \
    const int64_t full = rest / W, part = rest % W;                                                         \
    const MASK_T m = MAKE_MASK(part);                                                                       \
    const float* b = B + j;                                                                                 \
    float* c = C + j;                                                                                       \
    switch (full + (part ? 4 : 0)) {                                                                        \
      case 3: strip_##SUFFIX<3, false>(M, K, A, lda, b, ldb, c, ldc, accumulate, none); break;              \
      case 2: strip_##SUFFIX<2, false>(M, K, A, lda, b, ldb, c, ldc, accumulate, none); break;              \
      case 1: strip_##SUFFIX<1, false>(M, K, A, lda, b, ldb, c, ldc, accumulate, none); break;              \
      case 7: strip_##SUFFIX<4, true>(M, K, A, lda, b, ldb, c, ldc, accumulate, m); break;                  \
      case 6: strip_##SUFFIX<3, true>(M, K, A, lda, b, ldb, c, ldc, accumulate, m); break;                  \
      case 5: strip_##SUFFIX<2, true>(M, K, A, lda, b, ldb, c, ldc, accumulate, m); break;                  \
      case 4: strip_##SUFFIX<1, true>(M, K, A, lda, b, ldb, c, ldc, accumulate, m); break;                  \
      default: break;                                                                                       \
    }                                                                                                       \
  }

// AVX-512: 16 lanes, __mmask16 masks.
#define PYEBM_SG_MASK512(n) static_cast<__mmask16>((n) >= 16 ? 0xFFFFu : ((1u << (n)) - 1u))
#define PYEBM_SG_LOAD512(p, m) ((v16f)_mm512_maskz_loadu_ps((m), (p)))
#define PYEBM_SG_STORE512(p, m, x) _mm512_mask_storeu_ps((p), (m), (__m512)(x))
PYEBM_DEFINE_SMALL_GEMM(avx512, __attribute__((target("avx512f,avx512dq,avx2,fma"))), v16f, __mmask16,
                        PYEBM_SG_MASK512, PYEBM_SG_LOAD512, PYEBM_SG_STORE512, _mm512_set1_ps, 4, 8, 8, 6, 4)

// AVX2: 8 lanes, integer-vector masks (sign bit set = lane on).
inline __m256i avx2_mask_bits(int64_t n) __attribute__((target("avx2,fma")));
inline __m256i avx2_mask_bits(int64_t n) {
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), lanes);
}
#define PYEBM_SG_LOAD256(p, m) ((v8f)_mm256_maskload_ps((p), (m)))
#define PYEBM_SG_STORE256(p, m, x) _mm256_maskstore_ps((p), (m), (__m256)(x))
PYEBM_DEFINE_SMALL_GEMM(avx2, __attribute__((target("avx2,fma"))), v8f, __m256i, avx2_mask_bits,
                        PYEBM_SG_LOAD256, PYEBM_SG_STORE256, _mm256_set1_ps, 2, 8, 6, 3, 2)


// In-register 16 x 16 transpose: out[c] = column c of the rows r[0..15]. Interleave pairs of rows (floats,
// then float pairs), then regroup 128-bit quarters twice.
__attribute__((target("avx512f,avx512dq,avx2,fma"), always_inline)) inline void transpose16_regs(const v16f* r,
                                                                                                v16f* out) {
  v16f a[16], b[16];
  for (int k = 0; k < 8; ++k) {  // quarter L of a[2k]: r2k[4L], r2k+1[4L], r2k[4L+1], r2k+1[4L+1]
    a[2 * k] = __builtin_shufflevector(r[2 * k], r[2 * k + 1], 0, 16, 1, 17, 4, 20, 5, 21, 8, 24, 9, 25, 12, 28,
                                       13, 29);
    a[2 * k + 1] = __builtin_shufflevector(r[2 * k], r[2 * k + 1], 2, 18, 3, 19, 6, 22, 7, 23, 10, 26, 11, 27, 14,
                                           30, 15, 31);
  }
  for (int g = 0; g < 4; ++g) {  // quarter L of b[4g + e]: column 4L + e, rows 4g .. 4g + 3
    const v16f a0 = a[4 * g], a1 = a[4 * g + 1], a2 = a[4 * g + 2], a3 = a[4 * g + 3];
    b[4 * g + 0] = __builtin_shufflevector(a0, a2, 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29);
    b[4 * g + 1] = __builtin_shufflevector(a0, a2, 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
    b[4 * g + 2] = __builtin_shufflevector(a1, a3, 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29);
    b[4 * g + 3] = __builtin_shufflevector(a1, a3, 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
  }
  for (int e = 0; e < 4; ++e) {  // quarters 0, 2 of x and of y (ev), or 1, 3 (od)
#define PYEBM_SG_EV(x, y) __builtin_shufflevector(x, y, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27)
#define PYEBM_SG_OD(x, y) __builtin_shufflevector(x, y, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31)
    const v16f c0 = PYEBM_SG_EV(b[e], b[4 + e]), c1 = PYEBM_SG_OD(b[e], b[4 + e]);
    const v16f d0 = PYEBM_SG_EV(b[8 + e], b[12 + e]), d1 = PYEBM_SG_OD(b[8 + e], b[12 + e]);
    out[e] = PYEBM_SG_EV(c0, d0);
    out[4 + e] = PYEBM_SG_EV(c1, d1);
    out[8 + e] = PYEBM_SG_OD(c0, d0);
    out[12 + e] = PYEBM_SG_OD(c1, d1);
#undef PYEBM_SG_EV
#undef PYEBM_SG_OD
  }
}

// Wt[K, N] = W[N, K]^T with 16 x 16 in-register transposes. The edges that do not fill a 16 x 16 block
// are copied one by one.
__attribute__((target("avx512f,avx512dq,avx2,fma"), noinline)) inline void transpose16_avx512(
    int64_t N, int64_t K, const float* W, float* Wt) {
  const int64_t N16 = N & ~int64_t(15), K16 = K & ~int64_t(15);
  for (int64_t j0 = 0; j0 < N16; j0 += 16) {
    for (int64_t p0 = 0; p0 < K16; p0 += 16) {
      v16f r[16], c[16];
      for (int i = 0; i < 16; ++i) r[i] = vload<v16f>(W + (j0 + i) * K + p0);
      transpose16_regs(r, c);
      for (int e = 0; e < 16; ++e) vstore<v16f>(Wt + (p0 + e) * N + j0, c[e]);
    }
    for (int64_t j = j0; j < j0 + 16; ++j)
      for (int64_t p = K16; p < K; ++p) Wt[p * N + j] = W[j * K + p];
  }
  for (int64_t j = N16; j < N; ++j)
    for (int64_t p = 0; p < K; ++p) Wt[p * N + j] = W[j * K + p];
}

// ---- weight-broadcast products for blocks of up to 16 rows ----
// C[M, N] (+)= X[M, P] @ W[N, P]^T with W's rows ldw apart: the product of a block of a few dozen rows
// with a weight read in its own row layout. For a linear layer W [out, in] it is the forward product; for
// a transposed copy Wt [in, out] it is the input gradient G @ W (= G @ Wt^T), so one copy serves both.
// A block of 16 rows of X is transposed once (Xt [P, 16]: one vector per p); each group of 16 output
// columns keeps 16 accumulators, one per column holding it for the 16 rows, and per p adds one vector of
// Xt times each column's weight broadcast from memory. No row of X mixes with another, so a non-finite
// value in one row stays in its row. The accumulators are transposed back into C's rows. The 16 weight
// rows are addressed from 4 bases and 3 row offsets, so the loop needs few registers for any ldw (spelled
// out, with 4 steps per iteration: written as loops it compiles to slower code).
__attribute__((target("avx512f,avx512dq,avx2,fma"), always_inline)) inline void bcast_cols16(
    int64_t P, const float* __restrict Xt, const float* __restrict W, int64_t ldw, v16f* acc) {
  const float* b0 = W;
  const float* b1 = W + 4 * ldw;
  const float* b2 = W + 8 * ldw;
  const float* b3 = W + 12 * ldw;
  const int64_t s1 = ldw, s2 = 2 * ldw, s3 = 3 * ldw;
  for (int j = 0; j < 16; ++j) acc[j] = v16f{};
#define PYEBM_BC_STEP(p)                                                  \
  {                                                                       \
    const v16f x = vload<v16f>(Xt + (p) * 16);                            \
    acc[0] += x * (v16f)_mm512_set1_ps(b0[(p)]);                          \
    acc[1] += x * (v16f)_mm512_set1_ps(b0[s1 + (p)]);                     \
    acc[2] += x * (v16f)_mm512_set1_ps(b0[s2 + (p)]);                     \
    acc[3] += x * (v16f)_mm512_set1_ps(b0[s3 + (p)]);                     \
    acc[4] += x * (v16f)_mm512_set1_ps(b1[(p)]);                          \
    acc[5] += x * (v16f)_mm512_set1_ps(b1[s1 + (p)]);                     \
    acc[6] += x * (v16f)_mm512_set1_ps(b1[s2 + (p)]);                     \
    acc[7] += x * (v16f)_mm512_set1_ps(b1[s3 + (p)]);                     \
    acc[8] += x * (v16f)_mm512_set1_ps(b2[(p)]);                          \
    acc[9] += x * (v16f)_mm512_set1_ps(b2[s1 + (p)]);                     \
    acc[10] += x * (v16f)_mm512_set1_ps(b2[s2 + (p)]);                    \
    acc[11] += x * (v16f)_mm512_set1_ps(b2[s3 + (p)]);                    \
    acc[12] += x * (v16f)_mm512_set1_ps(b3[(p)]);                         \
    acc[13] += x * (v16f)_mm512_set1_ps(b3[s1 + (p)]);                    \
    acc[14] += x * (v16f)_mm512_set1_ps(b3[s2 + (p)]);                    \
    acc[15] += x * (v16f)_mm512_set1_ps(b3[s3 + (p)]);                    \
  }
  int64_t p = 0;
  for (; p + 4 <= P; p += 4) {
    PYEBM_BC_STEP(p)
    PYEBM_BC_STEP(p + 1)
    PYEBM_BC_STEP(p + 2)
    PYEBM_BC_STEP(p + 3)
  }
  for (; p < P; ++p) PYEBM_BC_STEP(p)
#undef PYEBM_BC_STEP
}

__attribute__((target("avx512f,avx512dq,avx2,fma"), noinline)) inline void bcast_gemm_avx512(
    int64_t M, int64_t N, int64_t P, const float* X, int64_t ldx, const float* W, int64_t ldw, float* C,
    int64_t ldc, bool accumulate, float* Xt) {
  const int64_t P16 = P & ~int64_t(15);
  for (int64_t r0 = 0; r0 < M; r0 += 16) {
    const int64_t rows = M - r0 < 16 ? M - r0 : 16;
    // Xt[p, i] = X[r0 + i, p], zero beyond the last row
    for (int64_t p0 = 0; p0 < P16; p0 += 16) {
      v16f r[16], c[16];
      for (int i = 0; i < 16; ++i) r[i] = i < rows ? vload<v16f>(X + (r0 + i) * ldx + p0) : v16f{};
      transpose16_regs(r, c);
      for (int e = 0; e < 16; ++e) vstore<v16f>(Xt + (p0 + e) * 16, c[e]);
    }
    for (int64_t p = P16; p < P; ++p)
      for (int i = 0; i < 16; ++i) Xt[p * 16 + i] = i < rows ? X[(r0 + i) * ldx + p] : 0.f;
    for (int64_t c0 = 0; c0 < N; c0 += 16) {
      v16f acc[16], out[16];
      bcast_cols16(P, Xt, W + c0 * ldw, ldw, acc);
      transpose16_regs(acc, out);  // out[i]: row r0 + i, columns c0 .. c0 + 15
      for (int i = 0; i < rows; ++i) {
        float* c = C + (r0 + i) * ldc + c0;
        vstore<v16f>(c, accumulate ? vload<v16f>(c) + out[i] : out[i]);
      }
    }
  }
}

// The same weight-broadcast product with AVX2 (8 lanes, 16 registers): blocks of 8 rows transposed once
// (Xt [P, 8] per block), 16 rows at a time against groups of 6 output columns (bcast_tile_avx2). Each
// output is one chain of fused multiply-adds over p in order, as in the AVX-512 kernel.
__attribute__((target("avx2,fma"), always_inline)) inline void transpose8_regs(const __m256* r, __m256* out) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  out[0] = _mm256_permute2f128_ps(u0, u4, 0x20);
  out[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
  out[2] = _mm256_permute2f128_ps(u2, u6, 0x20);
  out[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
  out[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
  out[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
  out[6] = _mm256_permute2f128_ps(u2, u6, 0x31);
  out[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

// NB blocks of 8 rows (Xt0, Xt0 + P * 8, ...) against NC weight rows (ldw apart): acc[j * NB + b] holds
// column j for the rows of block b. Two blocks and 6 columns keep 12 accumulators, 2 row vectors and one
// broadcast weight in the 16 registers: per p, 2 loads and 6 broadcasts feed 12 multiply-adds.
template <int NB, int NC>
__attribute__((target("avx2,fma"), always_inline)) inline void bcast_tile_avx2(int64_t P, const float* __restrict Xt0,
                                                                               const float* __restrict W, int64_t ldw,
                                                                               __m256* acc) {
  for (int i = 0; i < NB * NC; ++i) acc[i] = _mm256_setzero_ps();
  const float* w[NC];
  for (int j = 0; j < NC; ++j) w[j] = W + j * ldw;
  _Pragma("GCC unroll 4") for (int64_t p = 0; p < P; ++p) {
    __m256 x[NB];
    for (int b = 0; b < NB; ++b) x[b] = _mm256_loadu_ps(Xt0 + b * 8 * P + p * 8);
    for (int j = 0; j < NC; ++j) {
      const __m256 wv = _mm256_broadcast_ss(w[j] + p);
      for (int b = 0; b < NB; ++b) acc[j * NB + b] = _mm256_fmadd_ps(x[b], wv, acc[j * NB + b]);
    }
  }
}

// Columns c0 .. c0 + NC - 1 of the rows of NB blocks starting at row r0 (rows of them valid).
template <int NB, int NC>
__attribute__((target("avx2,fma"), always_inline)) inline void bcast_group_avx2(int64_t P, const float* Xt0,
                                                                                const float* W, int64_t ldw, float* C,
                                                                                int64_t ldc, int64_t rows,
                                                                                bool accumulate) {
  __m256 acc[NB * NC];
  bcast_tile_avx2<NB, NC>(P, Xt0, W, ldw, acc);
  alignas(32) float out[NC][NB * 8];
  for (int j = 0; j < NC; ++j)
    for (int b = 0; b < NB; ++b) _mm256_store_ps(out[j] + b * 8, acc[j * NB + b]);
  for (int64_t i = 0; i < rows; ++i) {
    float* c = C + i * ldc;
    for (int j = 0; j < NC; ++j) c[j] = accumulate ? c[j] + out[j][i] : out[j][i];
  }
}

// Columns c0 .. c0 + NC - 1 for every row: pairs of blocks (16 rows), an odd last block alone. The group's
// weight rows come from memory for the first pair and from L1 for the rest.
template <int NC>
__attribute__((target("avx2,fma"), always_inline)) inline void bcast_cols_avx2(int64_t M, int64_t P, const float* Xt,
                                                                               const float* W, int64_t ldw, float* C,
                                                                               int64_t ldc, bool accumulate) {
  const int64_t blocks = (M + 7) / 8;
  int64_t rb = 0;
  for (; rb + 2 <= blocks; rb += 2) {
    const int64_t r0 = rb * 8, rows = M - r0 < 16 ? M - r0 : 16;
    bcast_group_avx2<2, NC>(P, Xt + rb * 8 * P, W, ldw, C + r0 * ldc, ldc, rows, accumulate);
  }
  if (rb < blocks) bcast_group_avx2<1, NC>(P, Xt + rb * 8 * P, W, ldw, C + rb * 8 * ldc, ldc, M - rb * 8, accumulate);
}

// Xt: room for ceil(M / 8) * 8 * P floats. Blocks of 8 rows transposed once (Xt [P, 8] per block), then the
// columns in groups of 6, each against every row. N % 8 == 0.
__attribute__((target("avx2,fma"), noinline)) inline void bcast_gemm_avx2(int64_t M, int64_t N, int64_t P,
                                                                          const float* X, int64_t ldx,
                                                                          const float* W, int64_t ldw, float* C,
                                                                          int64_t ldc, bool accumulate, float* Xt) {
  const int64_t P8 = P & ~int64_t(7);
  const int64_t blocks = (M + 7) / 8;
  for (int64_t rb = 0; rb < blocks; ++rb) {  // Xt[rb][p][i] = X[8 rb + i, p], zero beyond the last row
    const int64_t r0 = rb * 8, rows = M - r0 < 8 ? M - r0 : 8;
    float* xt = Xt + rb * 8 * P;
    for (int64_t p0 = 0; p0 < P8; p0 += 8) {
      __m256 r[8], c[8];
      for (int i = 0; i < 8; ++i) r[i] = i < rows ? _mm256_loadu_ps(X + (r0 + i) * ldx + p0) : _mm256_setzero_ps();
      transpose8_regs(r, c);
      for (int e = 0; e < 8; ++e) _mm256_storeu_ps(xt + (p0 + e) * 8, c[e]);
    }
    for (int64_t p = P8; p < P; ++p)
      for (int i = 0; i < 8; ++i) xt[p * 8 + i] = i < rows ? X[(r0 + i) * ldx + p] : 0.f;
  }
  int64_t c0 = 0;  // groups of 6 columns, the last of 2 or 4 (N % 8 == 0)
  for (; c0 + 6 <= N; c0 += 6) bcast_cols_avx2<6>(M, P, Xt, W + c0 * ldw, ldw, C + c0, ldc, accumulate);
  if (N - c0 == 4) bcast_cols_avx2<4>(M, P, Xt, W + c0 * ldw, ldw, C + c0, ldc, accumulate);
  else if (N - c0 == 2) bcast_cols_avx2<2>(M, P, Xt, W + c0 * ldw, ldw, C + c0, ldc, accumulate);
}

#undef PYEBM_DEFINE_SMALL_GEMM
#undef PYEBM_SG_MASK512
#undef PYEBM_SG_LOAD512
#undef PYEBM_SG_STORE512
#undef PYEBM_SG_LOAD256
#undef PYEBM_SG_STORE256
#undef PYEBM_SG_UNROLL

}  // namespace sgemm_detail

// Run-time level of the register-blocked path: 2 with AVX-512, 1 with AVX2+FMA, 0 off (the baseline
// level, whether the CPU has nothing wider or PYEBM_CPU_ISA=baseline asks for it; or
// PYEBM_CPU_SMALL_GEMM=0 in the environment, which sends every product to BLAS for comparison).
inline int small_gemm_level() {
  static const int level = [] {
    const char* env = std::getenv("PYEBM_CPU_SMALL_GEMM");
    return (env && env[0] == '0') ? 0 : cpu_vec_level();
  }();
  return level;
}

// Where the register-blocked path beats the BLAS call (measured against MKL on an AVX-512 Xeon, one
// core): a block of at most 64 rows and a weight of at most 4096 (gemm_nt, which packs W^T per call)
// or 8192 (gemm_nn) elements. Larger weights no longer fit this kernel's cache blocking; there BLAS
// wins. n_by_k is N * K of the weight.
inline bool small_gemm_nt_fits(int64_t M, int64_t n_by_k) { return M <= 64 && n_by_k <= 4096; }
inline bool small_gemm_nn_fits(int64_t M, int64_t n_by_k) { return M <= 64 && n_by_k <= 8192; }

// C[M, N] (+)= A[M, K] @ W[N, K]^T. W^T is packed per call into thread-local scratch with 16 x 16
// AVX-512 transposes. Returns false (and does nothing) without AVX-512 or outside the size window.
__attribute__((noinline)) inline bool small_gemm_nt(int64_t M, int64_t N, int64_t K, const float* A,
                                                    const float* W, float* C, bool accumulate) {
  if (small_gemm_level() != 2 || !small_gemm_nt_fits(M, N * K)) return false;
  float* Wt = sgemm_detail::pack_buffer(N * K);
  sgemm_detail::transpose16_avx512(N, K, W, Wt);
  sgemm_detail::gemm_rr_avx512(M, N, K, A, K, Wt, N, C, N, accumulate);
  return true;
}

// Wt[K, N] = W[N, K]^T (AVX-512 copy; call only when small_gemm_level() == 2).
inline void small_gemm_pack_t(int64_t N, int64_t K, const float* W, float* Wt) {
  sgemm_detail::transpose16_avx512(N, K, W, Wt);
}

// C[M, N] (+)= X[M, P] @ W[N, P]^T, W's rows ldw apart (see bcast_gemm_avx512 and bcast_gemm_avx2): the
// weight-broadcast product. AVX-512 where N is a multiple of 16, else AVX2+FMA where N is a multiple of 8.
// Returns false (and does nothing) otherwise.
inline bool bcast_gemm(int64_t M, int64_t N, int64_t P, const float* X, int64_t ldx, const float* W, int64_t ldw,
                       float* C, int64_t ldc, bool accumulate) {
  if (M == 0 || N == 0) return false;
  const int level = small_gemm_level();
  if (level == 2 && N % 16 == 0) {
    sgemm_detail::bcast_gemm_avx512(M, N, P, X, ldx, W, ldw, C, ldc, accumulate, sgemm_detail::pack_buffer(16 * P));
    return true;
  }
  if (level >= 1 && N % 8 == 0) {
    sgemm_detail::bcast_gemm_avx2(M, N, P, X, ldx, W, ldw, C, ldc, accumulate,
                                  sgemm_detail::pack_buffer((M + 7) / 8 * 8 * P));
    return true;
  }
  return false;
}

// C[M, N] (+)= A[M, K] @ B[K, N] (rows lda, ldb, ldc apart) by the register-blocked kernel for a block of at
// most 64 rows, B of any size read in its own row layout, without the BLAS's per-call packing of B: the
// forward product of a few rows with a transposed weight copy (B = Wt [in, out]), or a column slice of it
// (B = Wt + n0). Each output is one chain of multiply-adds over k in order, whatever the slice's width.
// Returns false (and does nothing) without AVX2+FMA or for more rows.
inline bool rows_gemm_nn(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
                         float* C, int64_t ldc, bool accumulate) {
  if (M == 0 || N == 0 || M > 64) return false;
  const int level = small_gemm_level();
  if (level == 2) sgemm_detail::gemm_rr_avx512(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
  else if (level == 1) sgemm_detail::gemm_rr_avx2(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
  else return false;
  return true;
}

// C[M, K] (+)= G[M, N] @ W[N, K]. Returns false (and does nothing) without AVX2+FMA or outside the
// size window.
__attribute__((noinline)) inline bool small_gemm_nn(int64_t M, int64_t N, int64_t K, const float* G,
                                                    const float* W, float* C, bool accumulate) {
  return small_gemm_nn_fits(M, N * K) && rows_gemm_nn(M, K, N, G, N, W, K, C, K, accumulate);
}

}  // namespace cpu
}  // namespace pyebm

#endif  // PYEBM_VEC_ACT && __x86_64__
