// Row-major GEMM helpers for the fused CPU kernels. Torch-free.
//
// With PYEBM_HAVE_BLAS the products go to the Fortran BLAS that torch links (MKL on x86 builds:
// sgemm_/dgemm_, LP64 ints); CMake defines it only when libtorch_cpu exports those symbols.
// Without it, a plain loop nest that the compiler vectorises. Small float32 products (a block of at
// most 64 rows against a weight of a few thousand elements, see small_gemm.h) go to register-blocked
// kernels instead, where a BLAS call costs more in setup than in arithmetic. All paths keep rows
// independent, so a non-finite value in one row never reaches another row's result.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "small_gemm.h"

#ifdef PYEBM_HAVE_BLAS
extern "C" {
void sgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc);
void dgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc);
}
#endif

namespace pyebm {
namespace cpu {

#ifdef PYEBM_HAVE_BLAS
inline void fortran_gemm(const char* ta, const char* tb, int m, int n, int k, float alpha, const float* a,
                         int lda, const float* b, int ldb, float beta, float* c, int ldc) {
  sgemm_(ta, tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}
inline void fortran_gemm(const char* ta, const char* tb, int m, int n, int k, double alpha, const double* a,
                         int lda, const double* b, int ldb, double beta, double* c, int ldc) {
  dgemm_(ta, tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}
#endif

// C[M, N] (+)= A[M, K] @ op(B) with leading dimensions (row-major, elements): op(B) = B [K, N] (ldb >= N),
// or with b_trans B [N, K] read transposed (ldb >= K). For column slices of a larger product: a slice
// [n0, n1) of A @ W^T is B = W + n0 * K (b_trans), of A @ Wt or G @ W it is B = Wt + n0 (ldb = the full
// width), with C + n0 and ldc = the full width. Always the BLAS (or the plain loop), never small_gemm.h,
// so a slice's numbers do not depend on how wide it is.
template <typename T>
inline void gemm_ld(bool b_trans, int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B,
                    int64_t ldb, T* C, int64_t ldc, bool accumulate) {
  if (M == 0 || N == 0) return;
#ifdef PYEBM_HAVE_BLAS
  // row-major C = A op(B) is column-major C^T = op(B)^T A^T
  fortran_gemm(b_trans ? "T" : "N", "N", static_cast<int>(N), static_cast<int>(M), static_cast<int>(K), T(1), B,
               static_cast<int>(ldb), A, static_cast<int>(lda), accumulate ? T(1) : T(0), C, static_cast<int>(ldc));
#else
  for (int64_t i = 0; i < M; ++i) {
    T* c = C + i * ldc;
    const T* a = A + i * lda;
    if (b_trans) {  // dot products along B's rows
      for (int64_t j = 0; j < N; ++j) {
        const T* b = B + j * ldb;
        T acc = T(0);
        for (int64_t p = 0; p < K; ++p) acc += a[p] * b[p];
        c[j] = accumulate ? c[j] + acc : acc;
      }
    } else {  // rows of B scaled and added
      if (!accumulate)
        for (int64_t j = 0; j < N; ++j) c[j] = T(0);
      for (int64_t p = 0; p < K; ++p) {
        const T ap = a[p];
        const T* b = B + p * ldb;
        for (int64_t j = 0; j < N; ++j) c[j] += ap * b[j];
      }
    }
  }
#endif
}

template <typename T>
inline void gemm_nn(int64_t M, int64_t N, int64_t K, const T* G, const T* W, T* C, bool accumulate);

// C[M, N] (+)= A[M, K] @ W[N, K]^T   (nn.Linear forward: W is [out, in], row-major)
template <typename T>
inline void gemm_nt(int64_t M, int64_t N, int64_t K, const T* A, const T* W, T* C, bool accumulate) {
  if (M == 0 || N == 0) return;
#ifdef PYEBM_SMALL_GEMM
  if constexpr (std::is_same<T, float>::value)
    if (small_gemm_nt(M, N, K, A, W, C, accumulate)) return;
#endif
  gemm_ld<T>(true, M, N, K, A, K, W, K, C, N, accumulate);
}

// Wt[K, N] = W[N, K]^T (W row-major [N, K]).
template <typename T>
inline void transpose_to(int64_t N, int64_t K, const T* W, T* Wt) {
#ifdef PYEBM_SMALL_GEMM
  if constexpr (std::is_same<T, float>::value) {
    if (small_gemm_level() == 2) return small_gemm_pack_t(N, K, W, Wt);
  }
#endif
  constexpr int64_t kB = 32;
  for (int64_t j0 = 0; j0 < N; j0 += kB)
    for (int64_t p0 = 0; p0 < K; p0 += kB)
      for (int64_t j = j0; j < std::min(N, j0 + kB); ++j)
        for (int64_t p = p0; p < std::min(K, p0 + kB); ++p) Wt[p * N + j] = W[j * K + p];
}

// Whether gemm_nt_pk takes the register-blocked path for every block of at most `rows` rows of a float32
// weight with n_by_k elements, where it packs W^T itself (then a W^T made ahead is not needed to get the
// same numbers as a caller that has one).
inline bool nt_small_path_covers(bool is_float, int64_t rows, int64_t n_by_k) {
#ifdef PYEBM_SMALL_GEMM
  return is_float && small_gemm_level() == 2 && small_gemm_nt_fits(rows, n_by_k);
#else
  (void)is_float, (void)rows, (void)n_by_k;
  return false;
#endif
}

// C[M, N] (+)= A[M, K] @ W[N, K]^T, given W^T [K, N] as well or null. With Wt the product runs as A @ Wt
// (gemm_nn: the register-blocked kernel where it fits, else the BLAS "N", "N" product, which skips the
// BLAS packing of a transposed operand and runs ~10% faster at a few hundred rows). Where gemm_nt takes its
// small path (see nt_small_path_covers) it runs the same kernel on the same W^T, so a caller without Wt
// gets the same numbers there.
template <typename T>
inline void gemm_nt_pk(int64_t M, int64_t N, int64_t K, const T* A, const T* W, const T* Wt, T* C, bool accumulate) {
  if (Wt != nullptr)
    gemm_nn<T>(M, K, N, A, Wt, C, accumulate);
  else
    gemm_nt<T>(M, N, K, A, W, C, accumulate);
}

// C[M, K] (+)= G[M, N] @ W[N, K]   (input gradient through nn.Linear)
template <typename T>
inline void gemm_nn(int64_t M, int64_t N, int64_t K, const T* G, const T* W, T* C, bool accumulate) {
  if (M == 0 || K == 0) return;
#ifdef PYEBM_SMALL_GEMM
  if constexpr (std::is_same<T, float>::value)
    if (small_gemm_nn(M, N, K, G, W, C, accumulate)) return;
#endif
  gemm_ld<T>(false, M, K, N, G, N, W, K, C, K, accumulate);
}

}  // namespace cpu
}  // namespace pyebm
