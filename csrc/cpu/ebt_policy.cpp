// pyebm::ebt_policy_energy_grad: the whole EBT-Policy energy network, forward and input gradient, in one
// CPU call; pyebm::ebt_policy_descent: every step of a descent on it, and the final energy, in one call.
// The observation side (cross-attention keys/values of every layer) comes in precomputed; with few
// observation tokens the cross projection is applied to the values once per call (fold_cross_values).
// Math: pyebm/reference/ebt_policy.py; layout of the parameter list: pyebm/ops/ebt_policy.py.
//
// Candidates are independent; they are processed in blocks of whole candidates (rows = candidates * T)
// so the linear layers run as one GEMM per block. Several blocks run in parallel, one thread each; a single
// block (few candidates) is run by all threads together, phase by phase (see "work division"). Every
// activation the backward pass needs stays in a scratch buffer; nothing touches autograd or the dispatcher
// inside the network.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <limits>
#include <memory>
#include <cstdint>
#include <cstdlib>
#include <tuple>
#include <type_traits>
#include <vector>

#include "blas.h"
#include "descent_args.h"
#include "descent_rule.h"
#include "descent_update.h"
#include "ebt_policy_cpu.h"
#include "op_checks.h"
#include "pyebm/activations.h"
#include "rows_linear.h"
#include "select_best.h"
#include "vec_act.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

// Schemas of the three ops: csrc/ops.cpp.

namespace pyebm {
namespace cpu {
namespace {

constexpr int kEmbed = 7;     // fc1.w, fc1.b, ln.w, ln.b, fc2.w, fc2.b, pos
constexpr int kPerLayer = 17;  // see Layer below
constexpr int kHead = 5;       // norm.w, fc1.w, fc1.b, fc2.w, fc2.b

template <typename T>
struct Layer {
  const T *n1, *wqkv, *bqkv, *qn, *kn, *wp, *bp, *n2, *wxq, *bxq, *xqn, *wxp, *n3, *wf1, *bf1, *wf2, *bf2;
  // transposed copies [in, out] of the forward GEMMs' weights (nullptr: use the [out, in] ones)
  const T *tqkv = nullptr, *tp = nullptr, *txq = nullptr, *txp = nullptr, *tf1 = nullptr, *tf2 = nullptr;
};

template <typename T>
struct Net {
  int64_t A, Tn, D, H, hd, L, O, layers, K;
  T scale, rms_eps, ln_eps;
  const T *w0, *b0, *lnw, *lnb, *w1, *b1, *pos;
  const T *tw1 = nullptr, *thw1 = nullptr, *thw2 = nullptr;
  std::vector<Layer<T>> lay;
  const T *hn, *hw1, *hb1, *hw2, *hb2;
  const T *ck, *cv, *bias;  // [layers, B, H, hd, L], [layers, B, H, L, hd], [T, L]
  int64_t B;
  // The cross-attention values through the cross projection, U [layers, B, H, L, D] (see fold_cross_values),
  // or empty: then the projection runs as a product.
  std::vector<T> cu;

  const T* kc(int64_t l, int64_t b, int64_t h) const { return ck + (((l * B + b) * H + h) * hd) * L; }
  const T* vc(int64_t l, int64_t b, int64_t h) const { return cv + (((l * B + b) * H + h) * L) * hd; }
  const T* uc(int64_t l, int64_t b, int64_t h) const { return cu.data() + (((l * B + b) * H + h) * L) * D; }
  bool folded() const { return !cu.empty(); }
};

// Whether the cross projection is folded into the cached values: a token's projected cross-attention output
// is then sum over heads and observation tokens of P[h, j] U[h, j], H * L * D multiply-adds instead of the
// projection's D * D, in the forward pass and again in the backward pass. Making U costs L * D * D per
// observation, against K * T * D * D per pass saved over its K candidates of T tokens.
inline bool cross_folded(int64_t H, int64_t L, int64_t D, int64_t K, int64_t Tn) {
  return 4 * H * L <= D && K * Tn >= 2 * L;
}

// What the backward pass reads, for one block of M = nb * T rows, in one buffer (element offsets).
// Activations are kept after their normalisation (xhat and the inverse RMS r), and GELU inputs are
// kept as the GELU derivative, so the backward pass recomputes nothing.
template <typename T>
struct Saved {
  int64_t M, D, H, Tn, L, nb;
  T* base;
  // each layer's arrays and the embedding's start on a page of their own
  static int64_t paged(int64_t n) {
    constexpr int64_t kPage = 4096 / int64_t(sizeof(T));
    return (n + kPage - 1) / kPage * kPage;
  }
  int64_t layer_elems() const { return paged(8 * M * D + 3 * M + 3 * M * H + nb * H * Tn * (Tn + L)); }
  T* layer(int64_t l) const { return base + embed_elems() + l * layer_elems(); }
  int64_t embed_elems() const { return paged(3 * M * D + M); }
  // within a layer: xhat and r of the three block norms, q/k after their per-head norm (before the
  // weight) and r, v, the two attention probability tensors, and gelu'(mlp fc1 output) in h1. qh, kh, v,
  // cqh and h1 are tile-major (see "products of a tile"), rq, rk and rcq head-major [H, M].
  T* xn1(T* p) const { return p; }
  T* qh(T* p) const { return p + 1 * M * D; }
  T* kh(T* p) const { return p + 2 * M * D; }
  T* v(T* p) const { return p + 3 * M * D; }
  T* xn2(T* p) const { return p + 4 * M * D; }
  T* cqh(T* p) const { return p + 5 * M * D; }
  T* xn3(T* p) const { return p + 6 * M * D; }
  T* h1(T* p) const { return p + 7 * M * D; }
  T* r1(T* p) const { return p + 8 * M * D; }
  T* r2(T* p) const { return p + 8 * M * D + M; }
  T* r3(T* p) const { return p + 8 * M * D + 2 * M; }
  T* rq(T* p) const { return p + 8 * M * D + 3 * M; }
  T* rk(T* p) const { return rq(p) + M * H; }
  T* rcq(T* p) const { return rk(p) + M * H; }
  T* P(T* p) const { return rcq(p) + M * H; }          // [nb, H, T, T]
  T* Pc(T* p) const { return P(p) + nb * H * Tn * Tn; }  // [nb, H, T, L]
  // embedding: LayerNorm xhat, gelu'(LayerNorm output) in u2, gelu'(fc2 output) in u4, 1 / std
  T* xln() const { return base; }
  T* u2() const { return base + M * D; }
  T* u4() const { return base + 2 * M * D; }
  T* rstd() const { return base + 3 * M * D; }
};

// Per-thread buffers that grow and are kept: slot 0 holds a block's shared arrays (the calling thread's
// serves the whole crew), slot 1 a participant's own temporaries.
template <typename T, int Slot>
inline T* scratch(int64_t n) {
  constexpr int64_t kPad = 4096 / sizeof(T);  // room to start on a page
  thread_local std::vector<T> buf;
  if (static_cast<int64_t>(buf.size()) < n + kPad) buf.resize(static_cast<size_t>(n + kPad));
  const uintptr_t p = reinterpret_cast<uintptr_t>(buf.data());
  return reinterpret_cast<T*>((p + 4095) & ~uintptr_t(4095));
}
template <typename T>
inline T* crew_local(int64_t n) {
  return scratch<T, 1>(n);
}

#if defined(__GNUC__)
#define PYEBM_INLINE inline __attribute__((always_inline))
#else
#define PYEBM_INLINE inline
#endif

// z <- gelu_tanh(z), d <- gelu_tanh'(z) over n values (the derivative is what the backward pass keeps)
template <typename T>
PYEBM_INLINE void gelu_pass(int64_t n, T* __restrict z, T* __restrict d) {
#ifdef PYEBM_VEC_ACT
  if constexpr (std::is_same<T, float>::value) return vec_act_pass<Act::kGeluTanh>(n, z, d);
#endif
  for (int64_t i = 0; i < n; ++i) {
    T a, g;
    act_fwd_deriv<Act::kGeluTanh, T>(z[i], a, g);
    z[i] = a;
    d[i] = g;
  }
}

// x [n] -> xhat = x * r, r = rsqrt(mean(x^2) + eps)
template <typename T>
PYEBM_INLINE T rms_row(const T* x, T* xhat, int64_t n, T eps) {
  T ss = T(0);
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < n; ++i) ss += x[i] * x[i];
  const T r = T(1) / std::sqrt(ss / T(n) + eps);
  for (int64_t i = 0; i < n; ++i) xhat[i] = x[i] * r;
  return r;
}

// rows [r0, r1) of x [.., D]: xhat and r (rms_row), and a = xhat * w, the norm's output
template <typename T>
PYEBM_INLINE void rms_rows(const T* x, T* xhat, T* r, const T* w, T* a, int64_t r0, int64_t r1, int64_t D, T eps) {
  for (int64_t i = r0; i < r1; ++i) {
    r[i] = rms_row(x + i * D, xhat + i * D, D, eps);
    for (int64_t j = 0; j < D; ++j) a[i * D + j] = xhat[i * D + j] * w[j];
  }
}

// dx (+)= r * (gw - xhat * mean(gw * xhat)), gw = dy * w
template <typename T>
PYEBM_INLINE void rms_back_row(const T* dy, const T* w, const T* xhat, T r, int64_t n, T* dx, bool acc) {
  T m = T(0);
#pragma omp simd reduction(+ : m)
  for (int64_t i = 0; i < n; ++i) m += dy[i] * w[i] * xhat[i];
  m /= T(n);
  if (acc) {
    for (int64_t i = 0; i < n; ++i) dx[i] += r * (dy[i] * w[i] - xhat[i] * m);
  } else {
    for (int64_t i = 0; i < n; ++i) dx[i] = r * (dy[i] * w[i] - xhat[i] * m);
  }
}

template <typename T>
PYEBM_INLINE void add_bias(T* x, const T* b, int64_t M, int64_t N) {
  for (int64_t i = 0; i < M; ++i) {
    T* r = x + i * N;
    for (int64_t j = 0; j < N; ++j) r[j] += b[j];
  }
}

template <typename T>
PYEBM_INLINE void softmax_row(T* s, int64_t n) {
  T mx = s[0];
  for (int64_t j = 1; j < n; ++j) mx = std::max(mx, s[j]);
  T sum = T(0);
  int64_t j = 0;
#ifdef PYEBM_VEC_ACT
  if constexpr (std::is_same<T, float>::value) {
    // exp 8 lanes at a time (vexp, about 1 ulp) in place; the last few (and short rows: a padded vector
    // would go through memory and cost more than it saves) one at a time
    for (; j + 8 <= n; j += 8) {
      vstore<v8f>(s + j, vexp<v8f>(vload<v8f>(s + j) - mx));
      for (int64_t k = j; k < j + 8; ++k) sum += s[k];
    }
  }
#endif
  for (; j < n; ++j) {
    s[j] = std::exp(s[j] - mx);
    sum += s[j];
  }
  const T inv = T(1) / sum;
  for (int64_t j = 0; j < n; ++j) s[j] *= inv;
}

// sum over i < n of a[i] * b[i] as 16 interleaved partial sums added pairwise at the end: vector code
// with independent chains for any n (the order depends on n only)
template <typename T>
PYEBM_INLINE T dot_n(const T* __restrict a, const T* __restrict b, int64_t n) {
  T acc[16];
  for (int k = 0; k < 16; ++k) acc[k] = T(0);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int k = 0; k < 16; ++k) acc[k] += a[i + k] * b[i + k];
  for (int k = 0; i + k < n; ++k) acc[k] += a[i + k] * b[i + k];
  for (int w = 8; w >= 1; w /= 2)
    for (int k = 0; k < w; ++k) acc[k] += acc[k + w];
  return acc[0];
}

// ---- self-attention of one head over one candidate's T tokens ----
// out[u] = sum_d a[d] * bT[d, u] for u < T: T-wide vector updates over the head dimension. With compile-time
// sizes the sum runs as four interleaved partial sums over d (added pairwise at the end), so four
// independent chains of multiply-adds are in flight rather than one.
template <typename T, int HD, int TN>
PYEBM_INLINE void tokens_dot(int64_t hd_, int64_t Tn_, const T* __restrict a, const T* __restrict bT,
                             T* __restrict out) {
  if constexpr (HD > 0 && TN > 0 && HD % 4 == 0) {
    (void)hd_, (void)Tn_;
    T acc[4][TN];
    for (int j = 0; j < 4; ++j)
      for (int u = 0; u < TN; ++u) acc[j][u] = T(0);
    for (int d = 0; d < HD; d += 4)
      for (int j = 0; j < 4; ++j) {
        const T ad = a[d + j];
#pragma omp simd
        for (int u = 0; u < TN; ++u) acc[j][u] += ad * bT[(d + j) * TN + u];
      }
#pragma omp simd
    for (int u = 0; u < TN; ++u) out[u] = (acc[0][u] + acc[1][u]) + (acc[2][u] + acc[3][u]);
  } else {
    const int64_t hd = HD ? HD : hd_, Tn = TN ? TN : Tn_;
    for (int64_t u = 0; u < Tn; ++u) out[u] = T(0);
    for (int64_t d = 0; d < hd; ++d) {
      const T ad = a[d];
#pragma omp simd
      for (int64_t u = 0; u < Tn; ++u) out[u] += ad * bT[d * Tn + u];
    }
  }
}

// xT [hd, T] from one head's T rows x (`ld` apart): its keys or values by dimension.
template <typename T>
PYEBM_INLINE void head_transposed(int64_t hd, int64_t Tn, int64_t ld, const T* __restrict x, T* __restrict xT) {
  for (int64_t u = 0; u < Tn; ++u)
    for (int64_t d = 0; d < hd; ++d) xT[d * Tn + u] = x[u * ld + d];
}

// Rows of q, k, v, out, dO, dq, dk, dv are `ld` apart (they are one head's columns of wider arrays);
// P [T, T]; kT, vT: [hd, T] temporaries. HD and TN are compile-time sizes for the common shapes (0: use
// hd, Tn), so the short loops over a head or over the tokens compile to straight vector code.
template <typename T, int HD, int TN>
PYEBM_INLINE void self_attn_head_k(int64_t hd_, int64_t Tn_, int64_t ld, const T* __restrict qs,
                                   const T* __restrict kn, const T* __restrict v, T* __restrict P, T* __restrict out,
                                   T* __restrict kT) {
  const int64_t hd = HD ? HD : hd_, Tn = TN ? TN : Tn_;
  // the keys transposed [hd, T], so a query row's scores are T-wide vector updates
  head_transposed(hd, Tn, ld, kn, kT);
  for (int64_t t = 0; t < Tn; ++t) {
    const T* q = qs + t * ld;
    T* s = P + t * Tn;
    tokens_dot<T, HD, TN>(hd, Tn, q, kT, s);
    softmax_row(s, Tn);
    T* ot = out + t * ld;
    for (int64_t d = 0; d < hd; ++d) ot[d] = T(0);
    for (int64_t u = 0; u < Tn; ++u) {
      const T pu = s[u];
#pragma omp simd
      for (int64_t d = 0; d < hd; ++d) ot[d] += pu * v[u * ld + d];
    }
  }
}

// Its backward: dq, dk (after the per-head norms: before their weights) and dv, accumulated into zeroed rows.
// qh, kh: q and k after their norms (before the weights qnw, knw); the scores used qs = qh * qnw * scale and
// kn = kh * knw.
template <typename T, int HD, int TN>
PYEBM_INLINE void self_attn_head_back_k(int64_t hd_, int64_t Tn_, int64_t ld, const T* __restrict dO,
                                        const T* __restrict v, const T* __restrict P, const T* __restrict qh,
                                        const T* __restrict kh, const T* __restrict qnw, const T* __restrict knw,
                                        T scale, T* __restrict dq, T* __restrict dk, T* __restrict dv, int64_t ldg,
                                        T* __restrict dP, T* __restrict vT) {
  const int64_t hd = HD ? HD : hd_, Tn = TN ? TN : Tn_;
  head_transposed(hd, Tn, ld, v, vT);
  for (int64_t t = 0; t < Tn; ++t) {
    const T* dot = dO + t * ld;
    const T* pr = P + t * Tn;
    // dP[u] = dO[t] . v[u], T-wide over the transposed values
    tokens_dot<T, HD, TN>(hd, Tn, dot, vT, dP);
    T dotp = T(0);
    for (int64_t u = 0; u < Tn; ++u) {
      dotp += dP[u] * pr[u];
      // dv[u] += p[t, u] * dO[t]
      const T pu = pr[u];
#pragma omp simd
      for (int64_t d = 0; d < hd; ++d) dv[u * ldg + d] += pu * dot[d];
    }
    T* dqt = dq + t * ldg;
    const T* qt = qh + t * ld;
    for (int64_t u = 0; u < Tn; ++u) {
      const T ds = pr[u] * (dP[u] - dotp) * scale;
      if (ds == T(0)) continue;
      const T* ku = kh + u * ld;
      T* dku = dk + u * ldg;
      // d(q normed) += dS kn * scale and d(k normed) += dS^T qs (qs = q normed * scale)
#pragma omp simd
      for (int64_t d = 0; d < hd; ++d) dqt[d] += ds * ku[d] * knw[d];
#pragma omp simd
      for (int64_t d = 0; d < hd; ++d) dku[d] += ds * qt[d] * qnw[d];
    }
  }
}

// One head's q/k RMSNorms (qh, kh and their inverse RMS rq, rk [M]), its values copied out (vv), and
// qs = qh * qn * scale, knb = kh * kn for the scores, for M rows. The head's q, k, v input rows are ld_in
// apart (its columns of the qkv product's blocks), its output rows ld apart.
template <typename T, int HD>
PYEBM_INLINE void qk_head_k(int64_t hd_, int64_t M, const T* __restrict q, const T* __restrict k,
                            const T* __restrict v, int64_t ld_in, const T* __restrict qn, const T* __restrict kn,
                            T scale, T eps, T* __restrict qh, T* __restrict kh, T* __restrict vv, T* __restrict qs,
                            T* __restrict knb, int64_t ld, T* __restrict rq, T* __restrict rk) {
  const int64_t hd = HD ? HD : hd_;
  for (int64_t i = 0; i < M; ++i) {
    const int64_t c = i * ld, r = i * ld_in;
    rq[i] = rms_row(q + r, qh + c, hd, eps);
    rk[i] = rms_row(k + r, kh + c, hd, eps);
    for (int64_t d = 0; d < hd; ++d) vv[c + d] = v[r + d];
    for (int64_t d = 0; d < hd; ++d) {
      qs[c + d] = qh[c + d] * qn[d] * scale;
      knb[c + d] = kh[c + d] * kn[d];
    }
  }
}

template <typename T>
PYEBM_INLINE void qk_head(int64_t hd, int64_t M, const T* q, const T* k, const T* v, int64_t ld_in, const T* qn,
                          const T* kn, T scale, T eps, T* qh, T* kh, T* vv, T* qs, T* knb, int64_t ld, T* rq, T* rk) {
  if (hd == 64)
    return qk_head_k<T, 64>(hd, M, q, k, v, ld_in, qn, kn, scale, eps, qh, kh, vv, qs, knb, ld, rq, rk);
  if (hd == 32)
    return qk_head_k<T, 32>(hd, M, q, k, v, ld_in, qn, kn, scale, eps, qh, kh, vv, qs, knb, ld, rq, rk);
  qk_head_k<T, 0>(hd, M, q, k, v, ld_in, qn, kn, scale, eps, qh, kh, vv, qs, knb, ld, rq, rk);
}

template <typename T>
PYEBM_INLINE void self_attn_head(int64_t hd, int64_t Tn, int64_t ld, const T* qs, const T* kn, const T* v, T* P,
                                 T* out, T* kT) {
  if (hd == 64 && Tn == 16) return self_attn_head_k<T, 64, 16>(hd, Tn, ld, qs, kn, v, P, out, kT);
  if (hd == 32 && Tn == 16) return self_attn_head_k<T, 32, 16>(hd, Tn, ld, qs, kn, v, P, out, kT);
  self_attn_head_k<T, 0, 0>(hd, Tn, ld, qs, kn, v, P, out, kT);
}

template <typename T>
PYEBM_INLINE void self_attn_head_back(int64_t hd, int64_t Tn, int64_t ld, const T* dO, const T* v, const T* P,
                                      const T* qh, const T* kh, const T* qnw, const T* knw, T scale, T* dq, T* dk,
                                      T* dv, int64_t ldg, T* dP, T* vT) {
  if (hd == 64 && Tn == 16)
    return self_attn_head_back_k<T, 64, 16>(hd, Tn, ld, dO, v, P, qh, kh, qnw, knw, scale, dq, dk, dv, ldg, dP, vT);
  if (hd == 32 && Tn == 16)
    return self_attn_head_back_k<T, 32, 16>(hd, Tn, ld, dO, v, P, qh, kh, qnw, knw, scale, dq, dk, dv, ldg, dP, vT);
  self_attn_head_back_k<T, 0, 0>(hd, Tn, ld, dO, v, P, qh, kh, qnw, knw, scale, dq, dk, dv, ldg, dP, vT);
}

// ---- work division ----
// A block runs as a fixed sequence of phases. A phase is a set of independent tiles (ranges of rows,
// column slices of a product, groups of heads), and no tile of a phase starts before the previous phase
// is complete. Whoever takes part in a block claims tiles with an atomic counter, so one thread runs the
// block alone and several threads run it together (the few-candidate case, where there are too few rows
// to split by candidate) with the same code. The tiling depends on the shapes only, never on how many
// threads take part, so every thread count gives the same numbers.
constexpr int64_t kRowTile = 8;    // rows per tile of the row-wise passes
constexpr int64_t kColTile = 128;  // output columns per tile of a product (narrower slices run slower)

struct alignas(64) CrewPhase {
  std::atomic<uint64_t> taken{0};  // tiles 0 .. 63 claimed so far, one bit each
  std::atomic<int64_t> next{0};    // tiles from 64 on: the next one to claim, minus 64
  std::atomic<int64_t> done{0};
};

inline void spin_pause() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#endif
}

// One participant's view of a block's phases (n_phases of them, zeroed before the block). `claim(n)` hands
// out the next tile of the current n-tile phase; once none is left it waits until every tile of the phase
// is done, moves to the next phase and returns n.
// Participant `me` of `size` first takes its own tiles me, me + size, ... (of the first 64), then whatever
// is left, so with the threads of a crew as many as the tiles each takes the same tile in every phase of
// the same shape: the same weight slice, forward and backward and step after step, stays with one thread
// (in one core's cache while the threads keep their cores), while a late participant's tiles are still
// taken by the others.
class Crew {
 public:
  Crew(CrewPhase* phases, int64_t n_phases, int64_t me = 0, int64_t size = 1)
      : phases_(phases), n_phases_(n_phases), me_(me), size_(std::max<int64_t>(1, size)) {}
  PYEBM_INLINE int64_t claim(int64_t n) {
    if (phase_ >= n_phases_) {  // block_phases() disagrees with block_impl(): a bug, and waiting would hang
      std::fprintf(stderr, "pyebm: ebt_policy block ran past its %lld phases\n", static_cast<long long>(n_phases_));
      std::abort();
    }
    CrewPhase& p = phases_[phase_];
    if (held_) p.done.fetch_add(1, std::memory_order_release);
    const int64_t t = take(p, n);
    held_ = t < n;
    if (held_) return t;
    while (p.done.load(std::memory_order_acquire) < n) spin_pause();
    ++phase_;
    own_ = me_;
    return n;
  }

 private:
  PYEBM_INLINE static bool take_bit(CrewPhase& p, int64_t t) {
    const uint64_t bit = uint64_t(1) << t;
    return (p.taken.load(std::memory_order_relaxed) & bit) == 0 &&
           (p.taken.fetch_or(bit, std::memory_order_relaxed) & bit) == 0;
  }
  PYEBM_INLINE int64_t take(CrewPhase& p, int64_t n) {
    const int64_t nb = std::min<int64_t>(n, 64);
    for (; own_ < nb; own_ += size_)  // this participant's own tiles first
      if (take_bit(p, own_)) {
        own_ += size_;
        return own_ - size_;
      }
    const uint64_t all = nb == 64 ? ~uint64_t(0) : (uint64_t(1) << nb) - 1;
    for (uint64_t m = p.taken.load(std::memory_order_relaxed); (m & all) != all;
         m = p.taken.load(std::memory_order_relaxed)) {  // then any left
      const int64_t t = __builtin_ctzll(~m);
      if (take_bit(p, t)) return t;
    }
    if (n <= 64) return n;
    const int64_t t = 64 + p.next.fetch_add(1, std::memory_order_relaxed);
    return t < n ? t : n;
  }

  CrewPhase* phases_;
  int64_t n_phases_;
  int64_t me_, size_;
  int64_t own_ = me_;
  int64_t phase_ = 0;
  bool held_ = false;
};

// for every tile t of an n-tile phase that this participant claims (n evaluated once)
#define PYEBM_TILES(crew, n, t) \
  for (int64_t t##_n = (n), t = (crew).claim(t##_n); t < t##_n; t = (crew).claim(t##_n))

// The input-gradient products read the transposed copy Wt [K, N] (the forward products' operand) with the
// weight-broadcast kernel where it applies (float32; AVX-512 with output columns in groups of 16, AVX2 in
// groups of 6): G @ W is G @ Wt^T, Wt's rows being W's columns. Each layer's weights are then read from one
// copy in both directions, so a layer whose forward product just ran (the last layers at the turn from
// forward to backward, the first ones from one step's backward pass to the next step's forward pass) can
// still be in the core's cache. Returns whether it ran; the BLAS on W takes the rest.
template <typename T>
PYEBM_INLINE bool bcast_product(int64_t M, int64_t N, int64_t P, const T* X, int64_t ldx, const T* W, int64_t ldw,
                                T* C, int64_t ldc, bool acc) {
#ifdef PYEBM_SMALL_GEMM
  if constexpr (std::is_same<T, float>::value) return bcast_gemm(M, N, P, X, ldx, W, ldw, C, ldc, acc);
#endif
  (void)M, (void)N, (void)P, (void)X, (void)ldx, (void)W, (void)ldw, (void)C, (void)ldc, (void)acc;
  return false;
}

// The forward products read the same transposed copy Wt [K, N] as A @ Wt with the register-blocked kernel
// (float32, a block of at most 64 rows), Wt's rows read in place: the BLAS would pack Wt on every call.
// Returns whether it ran; the BLAS takes the rest.
template <typename T>
PYEBM_INLINE bool rows_product(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb,
                               T* C, int64_t ldc, bool acc) {
#ifdef PYEBM_SMALL_GEMM
  if constexpr (std::is_same<T, float>::value) return rows_gemm_nn(M, N, K, A, lda, B, ldb, C, ldc, acc);
#endif
  (void)M, (void)N, (void)K, (void)A, (void)lda, (void)B, (void)ldb, (void)C, (void)ldc, (void)acc;
  return false;
}

// C [M, N] = X [M, K] @ W [N, K]^T for fewer than kStreamRowsMax rows (float32) with rows_linear.h's kernel: one
// stream over W's rows, which the BLAS reads at a fraction of the bandwidth for so few rows (the observation
// tokens' key/value products). Returns whether it ran.
constexpr int64_t kStreamRowsMax = 8;

template <typename T>
PYEBM_INLINE bool stream_product(int64_t M, int64_t N, int64_t K, const T* X, const T* W, T* C) {
  if constexpr (std::is_same<T, float>::value) {
    if (M < kStreamRowsMax) {
      rows_linear_panel(M, K, X, K, W, K, C, N, nullptr, 0, 0, N);
      return true;
    }
  }
  (void)M, (void)N, (void)K, (void)X, (void)W, (void)C;
  return false;
}

// ---- products of a tile ----
// Arrays that the tiles of a phase split by columns (a head group's q/k/v, attention outputs and their
// gradients, an MLP tile's hidden units) are kept tile-major: the block of columns [c0, c1) of an [M, N]
// array starts at arr + c0 * M and its rows are c1 - c0 apart. Each tile then writes and reads one
// contiguous region of its own (at most its first and last cache lines or pages are shared with a
// neighbouring block; with the common sizes, none): with the columns interleaved row by row, two cores
// writing neighbouring columns of the same pages ran those passes at a fraction of their speed on one
// core. The few arrays that a row phase reads next (the
// embedding's and the head's column tiles) stay row-major (ld = N, block at arr + c0).

// C [M, n1 - n0] (ld ldc) (+)= A [M, K] (ld lda) @ W[n0:n1, :]^T (W [N, K], Wt [K, N] or null). With Wt the
// slice is A @ Wt[:, n0:n1]: rows_product, else the BLAS "N", "N" product.
template <typename T>
inline void fwd_cols(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* W, const T* Wt, int64_t n0,
                     int64_t n1, T* C, int64_t ldc, bool acc) {
  if (Wt != nullptr) {
    if (!rows_product<T>(M, n1 - n0, K, A, lda, Wt + n0, N, C, ldc, acc))
      gemm_ld<T>(false, M, n1 - n0, K, A, lda, Wt + n0, N, C, ldc, acc);
  } else if (n0 == 0 && n1 == N && lda == K && ldc == N) {
    gemm_nt<T>(M, N, K, A, W, C, acc);
  } else {
    gemm_ld<T>(true, M, n1 - n0, K, A, lda, W + n0 * K, K, C, ldc, acc);
  }
}

// C [M, N] = A [M, k1 - k0] (ld lda) @ W[:, k0:k1]^T: a tile's share of a product over its input columns. With
// Wt it is A @ Wt[k0:k1, :]: rows_product, else the BLAS.
template <typename T>
inline void fwd_krows(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* W, const T* Wt, int64_t k0,
                      int64_t k1, T* C) {
  if (Wt != nullptr) {
    if (!rows_product<T>(M, N, k1 - k0, A, lda, Wt + k0 * N, N, C, N, false))
      gemm_ld<T>(false, M, N, k1 - k0, A, lda, Wt + k0 * N, N, C, N, false);
  } else if (k0 == 0 && k1 == K && lda == K) {
    gemm_nt<T>(M, N, K, A, W, C, false);
  } else {
    gemm_ld<T>(true, M, N, k1 - k0, A, lda, W + k0, K, C, N, false);
  }
}

// C [M, k1 - k0] (ld ldc) (+)= G [M, N] (ld ldg) @ W[:, k0:k1]
template <typename T>
inline void bwd_cols(int64_t M, int64_t N, int64_t K, const T* G, int64_t ldg, const T* W, const T* Wt, int64_t k0,
                     int64_t k1, T* C, int64_t ldc, bool acc) {
  if (Wt != nullptr && bcast_product<T>(M, k1 - k0, N, G, ldg, Wt + k0 * N, N, C, ldc, acc)) return;
  if (k0 == 0 && k1 == K && ldg == N && ldc == K) return gemm_nn<T>(M, N, K, G, W, C, acc);
  gemm_ld<T>(false, M, k1 - k0, N, G, ldg, W + k0, K, C, ldc, acc);
}

// C [M, K] (+)= G [M, n1 - n0] (ld ldg) @ W[n0:n1, :]: a tile's share of an input gradient
template <typename T>
inline void bwd_krows(int64_t M, int64_t N, int64_t K, const T* G, int64_t ldg, const T* W, const T* Wt, int64_t n0,
                      int64_t n1, T* C, bool acc) {
  if (Wt != nullptr && bcast_product<T>(M, K, n1 - n0, G, ldg, Wt + n0, N, C, K, acc)) return;
  if (n0 == 0 && n1 == N && ldg == N) return gemm_nn<T>(M, N, K, G, W, C, acc);
  gemm_ld<T>(false, M, K, n1 - n0, G, ldg, W + n0 * K, K, C, K, acc);
}

// dst[j] += (sum over the n head groups' partial rows, in group order) (+ bias[j])
template <typename T>
PYEBM_INLINE void add_partials(T* __restrict dst, const T* __restrict part, int64_t n, int64_t stride, int64_t D,
                               const T* __restrict bias) {
  // in chunks of columns, each loop over contiguous columns (vector code); the same additions per column
  constexpr int64_t kChunk = 64;
  T s[kChunk];
  for (int64_t j0 = 0; j0 < D; j0 += kChunk) {
    const int64_t m = std::min(kChunk, D - j0);
    const T* p0 = part + j0;
    T* d = dst + j0;
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) s[j] = p0[j];
    for (int64_t g = 1; g < n; ++g) {
      const T* pg = p0 + g * stride;
#pragma omp simd
      for (int64_t j = 0; j < m; ++j) s[j] += pg[j];
    }
    if (bias != nullptr) {
      const T* b = bias + j0;
#pragma omp simd
      for (int64_t j = 0; j < m; ++j) d[j] = (d[j] + s[j]) + b[j];
    } else {
#pragma omp simd
      for (int64_t j = 0; j < m; ++j) d[j] = d[j] + s[j];
    }
  }
}

// Column tiles of a product with N outputs.
inline int64_t col_tiles(int64_t N) { return (N + kColTile - 1) / kColTile; }

// Head groups: heads per group (about kColTile columns) and their number.
inline int64_t heads_per_group(int64_t hd) { return std::max<int64_t>(1, kColTile / hd); }
inline int64_t head_groups(int64_t H, int64_t hd) { return (H + heads_per_group(hd) - 1) / heads_per_group(hd); }

// Partial products [M, D] per tile that a set of partial sums holds: one per head group (attention
// projections) or per column tile (the MLP's input gradients), whichever is more (wide heads make fewer
// groups than column tiles).
inline int64_t partial_slots(int64_t D, int64_t H, int64_t hd) {
  return std::max(head_groups(H, hd), col_tiles(D));
}

// Elements of the block buffer shared by the participants (what the backward pass reads, then the
// working arrays) and of each participant's own temporaries.
template <typename T>
int64_t block_saved_elems(const Net<T>& net, int64_t nb) {
  const int64_t M = nb * net.Tn;
  Saved<T> sv{M, net.D, net.H, net.Tn, net.L, nb, nullptr};
  return Saved<T>::paged(sv.embed_elems() + net.layers * sv.layer_elems() + 2 * M * net.D + M);  // + head xnf, hh, rf
}
template <typename T>
int64_t block_elems(const Net<T>& net, int64_t nb) {
  const int64_t M = nb * net.Tn;
  return block_saved_elems(net, nb) + (8 + partial_slots(net.D, net.H, net.hd)) * M * net.D /*x, big (3), o, dx,
         t2, att, partial sums*/ + M * std::max<int64_t>(net.O, 1);
}
template <typename T>
int64_t local_elems(const Net<T>& net) {
  return std::max(net.Tn, net.L) + net.hd + net.D + net.hd * std::max(net.Tn, net.L);
}

// ---- one block, step by step ----
// A block runs as the steps below, each a group of phases (the number in brackets), in this order:
// embed_forward [2]; per layer self_attn_forward [2], cross_attn_forward [2], mlp_forward [2]; head_forward [3];
// then with the gradient head_backward [3]; per layer, last first, mlp_backward [2], cross_attn_backward [2],
// self_attn_backward [2]; embed_backward [2, +1 without layers]. block_phases() counts them.

// What the steps of one block share: nb candidates starting at global candidate cand0, their inputs and
// outputs, the sizes, and where each array lives in the shared buffer (block_elems()) and in the
// participant's own temporaries (local_elems()).
template <typename T>
struct BlockRun {
  const Net<T>& net;
  Crew& crew;
  int64_t cand0, nb;
  const T* y;
  T* E;
  T* G;  // dE/dy [nb, T, A], or null: no gradient
  int64_t Tn, D, H, hd, L, A, O, M;
  Saved<T> sv;  // what the backward pass reads
  T *head_xnf, *head_hh, *head_rf;
  // working arrays [M, D] (big [M, 3D]): see block_run()
  T *x, *big, *o, *dx, *t2, *att, *part_sum, *out;
  // the participant's own temporaries
  T *dP, *up, *row, *kvT;
  int64_t n_rt;  // row tiles
  int64_t hpt;   // heads per head-group tile
  int64_t n_ht;  // head-group tiles
};

// The arrays of one block of nb candidates starting at global candidate cand0: E[nb] and, if G, dE/dy
// [nb, T, A]. buf: block_elems() shared elements.
template <typename T>
PYEBM_INLINE BlockRun<T> block_run(const Net<T>& net, int64_t cand0, int64_t nb, const T* y, T* E, T* G, T* buf,
                                   Crew& crew) {
  const int64_t Tn = net.Tn, D = net.D, H = net.H, hd = net.hd, L = net.L, A = net.A, O = net.O;
  const int64_t M = nb * Tn;
  Saved<T> sv{M, D, H, Tn, L, nb, buf};
  const int64_t n_saved = block_saved_elems(net, nb);
  T* head_xnf = buf + sv.embed_elems() + net.layers * sv.layer_elems();
  T* head_hh = head_xnf + M * D;
  T* head_rf = head_hh + M * D;
  T* x = buf + n_saved;
  T* big = x + M * D;  // [M, 3D]
  T* o = big + 3 * M * D;
  T* dx = o + M * D;
  T* t2 = dx + M * D;
  T* att = t2 + M * D;        // attention outputs [M, D]
  // partial products [partial_slots, M, D], one per head group or column tile, added up by the next row phase
  T* part_sum = att + M * D;
  T* out = part_sum + partial_slots(D, H, hd) * M * D;
  // each participant's own temporaries: dS [max(T, L)], one head's gradient [hd], a row [D], one head's
  // keys or values of a candidate transposed [hd, T] or its observation keys by token [L, hd]
  T* dP = crew_local<T>(local_elems(net));
  T* up = dP + std::max(Tn, L);
  T* row = up + hd;
  T* kvT = row + D;

  const int64_t n_rt = (M + kRowTile - 1) / kRowTile;
  const int64_t hpt = heads_per_group(hd);  // heads per head-group tile
  const int64_t n_ht = head_groups(H, hd);
  return BlockRun<T>{net, crew, cand0, nb, y, E, G, Tn, D, H, hd, L, A, O, M, sv, head_xnf, head_hh, head_rf,
                     x, big, o, dx, t2, att, part_sum, out, dP, up, row, kvT, n_rt, hpt, n_ht};
}

// Layer l's weights and the arrays it keeps for the backward pass (Saved).
template <typename T>
struct LayerRun {
  const Layer<T>& w;
  T *xn1, *qh, *kh, *vv, *xn2, *cqh, *xn3, *h1, *r1n, *r2n, *r3n, *rq, *rk, *rcq, *Pm, *Pc;
};

template <typename T>
PYEBM_INLINE LayerRun<T> layer_run(const BlockRun<T>& run, int64_t l) {
  const Saved<T>& sv = run.sv;
  const Layer<T>& w = run.net.lay[l];
  T* p = sv.layer(l);
  return LayerRun<T>{w,         sv.xn1(p), sv.qh(p),  sv.kh(p), sv.v(p),   sv.xn2(p), sv.cqh(p), sv.xn3(p), sv.h1(p),
                     sv.r1(p), sv.r2(p),  sv.r3(p),  sv.rq(p), sv.rk(p),  sv.rcq(p), sv.P(p),   sv.Pc(p)};
}

#define PYEBM_ROWS(t)                        \
  const int64_t r0 = (t) * kRowTile;         \
  const int64_t r1 = std::min(M, r0 + kRowTile)
#define PYEBM_COLS(t, N)                     \
  const int64_t n0 = (t) * kColTile;         \
  const int64_t n1 = std::min<int64_t>((N), n0 + kColTile)
#define PYEBM_HEADS(t)                       \
  const int64_t h0 = (t) * hpt;              \
  const int64_t h1 = std::min(H, h0 + hpt)

// Action embedding [2 phases]: Linear -> LayerNorm -> GELU -> Linear -> GELU, + positions.
template <typename T>
PYEBM_INLINE void embed_forward(const BlockRun<T>& run) {
  const Net<T>& net = run.net;
  Crew& crew = run.crew;
  const int64_t Tn = run.Tn, D = run.D, A = run.A, M = run.M, n_rt = run.n_rt;
  const Saved<T>& sv = run.sv;
  const T* y = run.y;
  T *x = run.x, *big = run.big, *o = run.o;
  PYEBM_TILES(crew, n_rt, t) {
    PYEBM_ROWS(t);
    gemm_nt<T>(r1 - r0, D, A, y + r0 * A, net.w0, big + r0 * D, false);
    add_bias(big + r0 * D, net.b0, r1 - r0, D);
    for (int64_t i = r0; i < r1; ++i) {
      const T* u1 = big + i * D;
      T mu = T(0);
#pragma omp simd reduction(+ : mu)
      for (int64_t j = 0; j < D; ++j) mu += u1[j];
      mu /= T(D);
      T var = T(0);
#pragma omp simd reduction(+ : var)
      for (int64_t j = 0; j < D; ++j) var += (u1[j] - mu) * (u1[j] - mu);
      const T rs = T(1) / std::sqrt(var / T(D) + net.ln_eps);
      sv.rstd()[i] = rs;
      T* xl = sv.xln() + i * D;
      T* a = o + i * D;
      for (int64_t j = 0; j < D; ++j) {
        xl[j] = (u1[j] - mu) * rs;
        a[j] = xl[j] * net.lnw[j] + net.lnb[j];
      }
    }
    gelu_pass((r1 - r0) * D, o + r0 * D, sv.u2() + r0 * D);  // sv.u2 keeps gelu'(u2)
  }
  PYEBM_TILES(crew, col_tiles(D), t) {
    PYEBM_COLS(t, D);
    fwd_cols<T>(M, D, D, o, D, net.w1, net.tw1, n0, n1, x + n0, D, false);
    for (int64_t i = 0; i < M; ++i) {
      T* xr = x + i * D;
      const T* pos = net.pos + (i % Tn) * D;
      for (int64_t j = n0; j < n1; ++j) xr[j] += net.b1[j];
      gelu_pass(n1 - n0, xr + n0, sv.u4() + i * D + n0);  // sv.u4 keeps gelu'(u4)
      for (int64_t j = n0; j < n1; ++j) xr[j] += pos[j];
    }
  }
}

// Layer l, self-attention [2 phases]: norm1 (rows, with the previous layer's MLP partial sums); per head
// group its q/k/v slices, per-head norms, attention and its share of the projection (a partial sum over
// the group's input columns).
template <typename T>
PYEBM_INLINE void self_attn_forward(const BlockRun<T>& run, int64_t l, const LayerRun<T>& lr) {
  const Net<T>& net = run.net;
  Crew& crew = run.crew;
  const int64_t nb = run.nb, Tn = run.Tn, D = run.D, H = run.H, hd = run.hd, M = run.M;
  const int64_t n_rt = run.n_rt, hpt = run.hpt, n_ht = run.n_ht;
  T *x = run.x, *big = run.big, *o = run.o, *dx = run.dx, *t2 = run.t2, *att = run.att, *part_sum = run.part_sum;
  T* kvT = run.kvT;
  const Layer<T>& w = lr.w;
  T *xn1 = lr.xn1, *qh = lr.qh, *kh = lr.kh, *vv = lr.vv, *r1n = lr.r1n, *rq = lr.rq, *rk = lr.rk, *Pm = lr.Pm;
  PYEBM_TILES(crew, n_rt, t) {
    PYEBM_ROWS(t);
    if (l > 0)  // the previous layer's MLP output: its partial sums and fc2's bias
      for (int64_t i = r0; i < r1; ++i)
        add_partials<T>(x + i * D, part_sum + i * D, col_tiles(D), M * D, D, net.lay[l - 1].bf2);
    rms_rows(x, xn1, r1n, w.n1, o, r0, r1, D, net.rms_eps);
  }
  // qs = q normed * qn * scale in t2, kn = k normed * kn in dx (both free until the backward pass)
  T* qs = t2;
  T* knb = dx;
  PYEBM_TILES(crew, n_ht, t) {
    PYEBM_HEADS(t);
    const int64_t c0 = h0 * hd, c1 = h1 * hd, gw = c1 - c0;
    // the group's q, k, v columns: a block [M, gw] in each third of big
    for (int64_t part = 0; part < 3; ++part) {
      T* blk = big + part * M * D + c0 * M;
      fwd_cols<T>(M, 3 * D, D, o, D, w.wqkv, w.tqkv, part * D + c0, part * D + c1, blk, gw, false);
      add_bias(blk, w.bqkv + part * D + c0, M, gw);
    }
    for (int64_t h = h0; h < h1; ++h) {
      const int64_t hc = c0 * M + (h - h0) * hd;  // the head's first element in the group's blocks
      qk_head<T>(hd, M, big + hc, big + M * D + hc, big + 2 * M * D + hc, gw, w.qn, w.kn, net.scale, net.rms_eps,
                 qh + hc, kh + hc, vv + hc, qs + hc, knb + hc, gw, rq + h * M, rk + h * M);
      for (int64_t c = 0; c < nb; ++c) {
        const int64_t r = hc + c * Tn * gw;
        self_attn_head<T>(hd, Tn, gw, qs + r, knb + r, vv + r, Pm + (c * H + h) * Tn * Tn, att + r, kvT);
      }
    }
    fwd_krows<T>(M, D, D, att + c0 * M, gw, w.wp, w.tp, c0, c1, part_sum + t * M * D);
  }
}

// Layer l, cross-attention [2 phases]: norm2 with the self-attention's partial sums added (rows); per head
// group the query slice, the attention to the cached observation keys/values and its share of the cross
// projection.
template <typename T>
PYEBM_INLINE void cross_attn_forward(const BlockRun<T>& run, int64_t l, const LayerRun<T>& lr) {
  const Net<T>& net = run.net;
  Crew& crew = run.crew;
  const int64_t cand0 = run.cand0, nb = run.nb, Tn = run.Tn, D = run.D, H = run.H, hd = run.hd, L = run.L, M = run.M;
  const int64_t n_rt = run.n_rt, hpt = run.hpt, n_ht = run.n_ht;
  T *x = run.x, *big = run.big, *o = run.o, *att = run.att, *part_sum = run.part_sum;
  T* kvT = run.kvT;
  const Layer<T>& w = lr.w;
  T *xn2 = lr.xn2, *cqh = lr.cqh, *r2n = lr.r2n, *rcq = lr.rcq, *Pc = lr.Pc;
  PYEBM_TILES(crew, n_rt, t) {
    PYEBM_ROWS(t);
    for (int64_t i = r0; i < r1; ++i) add_partials(x + i * D, part_sum + i * D, n_ht, M * D, D, w.bp);
    rms_rows(x, xn2, r2n, w.n2, o, r0, r1, D, net.rms_eps);
  }
  // cross-attention to the cached observation keys/values
  PYEBM_TILES(crew, n_ht, t) {
    PYEBM_HEADS(t);
    const int64_t c0 = h0 * hd, c1 = h1 * hd;
    const int64_t gw = c1 - c0;
    T* gpart = part_sum + t * M * D;  // the group's partial product of the cross projection
    T* qb = big + c0 * M;             // the group's query columns [M, gw]
    fwd_cols<T>(M, D, D, o, D, w.wxq, w.txq, c0, c1, qb, gw, false);
    add_bias(qb, w.bxq + c0, M, gw);
    for (int64_t h = h0; h < h1; ++h) {
      const int64_t hc = c0 * M + (h - h0) * hd;
      for (int64_t i = 0; i < M; ++i)
        rcq[h * M + i] = rms_row(big + hc + i * gw, cqh + hc + i * gw, hd, net.rms_eps);
      for (int64_t c = 0; c < nb; ++c) {
        const int64_t q0 = c * Tn;
        const int64_t b = (cand0 + c) / net.K;
        // the keys by token [L, hd] (the op's layout is [hd, L]; pre-scaled), times the query norm's weight
        const T* kT = kvT;
        transpose_to<T>(hd, L, net.kc(l, b, h), kvT);
        for (int64_t j = 0; j < L; ++j)
          for (int64_t d = 0; d < hd; ++d) kvT[j * hd + d] *= w.xqn[d];
        T* Pch = Pc + (c * H + h) * Tn * L;
        for (int64_t t = 0; t < Tn; ++t) {
          const T* q = cqh + hc + (q0 + t) * gw;
          T* s = Pch + t * L;
          for (int64_t j = 0; j < L; ++j) s[j] = net.bias[t * L + j] + dot_n(q, kT + j * hd, hd);
          softmax_row(s, L);
          if (net.folded()) {  // the group's share of the projected output: sum over its heads of P U
            T* ot = gpart + (q0 + t) * D;
            const T* uh = net.uc(l, b, h);
            for (int64_t j = 0; j < L; ++j) {
              const T pj = s[j];
              const T* uj = uh + j * D;
              if (h == h0 && j == 0) {
#pragma omp simd
                for (int64_t d = 0; d < D; ++d) ot[d] = pj * uj[d];
              } else {
#pragma omp simd
                for (int64_t d = 0; d < D; ++d) ot[d] += pj * uj[d];
              }
            }
            continue;
          }
          T* ot = att + hc + (q0 + t) * gw;
          const T* vc = net.vc(l, b, h);  // [L, hd]
          for (int64_t d = 0; d < hd; ++d) ot[d] = T(0);
          for (int64_t j = 0; j < L; ++j) {
            const T pj = s[j];
            const T* vj = vc + j * hd;
#pragma omp simd
            for (int64_t d = 0; d < hd; ++d) ot[d] += pj * vj[d];
          }
        }
      }
    }
    if (!net.folded()) fwd_krows<T>(M, D, D, att + c0 * M, gw, w.wxp, w.txp, c0, c1, gpart);
  }
}

// Layer l, MLP [2 phases].
template <typename T>
PYEBM_INLINE void mlp_forward(const BlockRun<T>& run, const LayerRun<T>& lr) {
  const Net<T>& net = run.net;
  Crew& crew = run.crew;
  const int64_t D = run.D, M = run.M, n_rt = run.n_rt, n_ht = run.n_ht;
  T *x = run.x, *o = run.o, *t2 = run.t2, *part_sum = run.part_sum;
  const Layer<T>& w = lr.w;
  T *xn3 = lr.xn3, *h1 = lr.h1, *r3n = lr.r3n;
  // MLP: norm3 (rows, with the cross projection's partial sums), then per tile of hidden units fc1 + GELU
  // into t2 and fc2's partial sum over those units (added, with fc2's bias, by the next row phase)
  PYEBM_TILES(crew, n_rt, t) {
    PYEBM_ROWS(t);
    for (int64_t i = r0; i < r1; ++i) add_partials<T>(x + i * D, part_sum + i * D, n_ht, M * D, D, nullptr);
    rms_rows(x, xn3, r3n, w.n3, o, r0, r1, D, net.rms_eps);
  }
  PYEBM_TILES(crew, col_tiles(D), t) {
    PYEBM_COLS(t, D);
    const int64_t wd = n1 - n0;
    T* hb = t2 + n0 * M;  // the tile's hidden units, [M, wd]
    T* gb = h1 + n0 * M;  // and their gelu' (kept for the backward pass)
    fwd_cols<T>(M, D, D, o, D, w.wf1, w.tf1, n0, n1, hb, wd, false);
    add_bias(hb, w.bf1 + n0, M, wd);
    gelu_pass(M * wd, hb, gb);
    fwd_krows<T>(M, D, D, hb, wd, w.wf2, w.tf2, n0, n1, part_sum + t * M * D);
  }
}

// Head [3 phases]: RMSNorm -> Linear -> GELU -> Linear, mean over (T, O).
template <typename T>
PYEBM_INLINE void head_forward(const BlockRun<T>& run) {
  const Net<T>& net = run.net;
  Crew& crew = run.crew;
  const int64_t nb = run.nb, Tn = run.Tn, D = run.D, O = run.O, M = run.M, n_rt = run.n_rt;
  T* E = run.E;
  T *head_xnf = run.head_xnf, *head_hh = run.head_hh, *head_rf = run.head_rf;
  T *x = run.x, *o = run.o, *t2 = run.t2, *part_sum = run.part_sum, *out = run.out;
  PYEBM_TILES(crew, n_rt, t) {
    PYEBM_ROWS(t);
    if (net.layers > 0)  // the last layer's MLP output
      for (int64_t i = r0; i < r1; ++i)
        add_partials<T>(x + i * D, part_sum + i * D, col_tiles(D), M * D, D, net.lay[net.layers - 1].bf2);
    rms_rows(x, head_xnf, head_rf, net.hn, o, r0, r1, D, net.rms_eps);
  }
  PYEBM_TILES(crew, col_tiles(D), t) {
    PYEBM_COLS(t, D);
    fwd_cols<T>(M, D, D, o, D, net.hw1, net.thw1, n0, n1, t2 + n0, D, false);
    for (int64_t i = 0; i < M; ++i) {
      for (int64_t j = n0; j < n1; ++j) t2[i * D + j] += net.hb1[j];
      gelu_pass(n1 - n0, t2 + i * D + n0, head_hh + i * D + n0);  // head_hh keeps gelu'(fc1 output)
    }
  }
  PYEBM_TILES(crew, 1, t) {
    (void)t;
    gemm_nt_pk<T>(M, O, D, t2, net.hw2, net.thw2, out, false);
    add_bias(out, net.hb2, M, O);
    for (int64_t c = 0; c < nb; ++c) {
      T acc = T(0);
#pragma omp simd reduction(+ : acc)
      for (int64_t i = c * Tn * O; i < (c + 1) * Tn * O; ++i) acc += out[i];
      E[c] = acc / T(Tn * O);
    }
  }
}

// ---- backward to the candidate ----
// Head backward [3 phases]: into dx.
// dE/d gelu(hh) is the same row for every token: the column sums of fc2, / (T * O)
template <typename T>
PYEBM_INLINE void head_backward(const BlockRun<T>& run) {
  const Net<T>& net = run.net;
  Crew& crew = run.crew;
  const int64_t Tn = run.Tn, D = run.D, O = run.O, M = run.M, n_rt = run.n_rt;
  T *head_xnf = run.head_xnf, *head_hh = run.head_hh, *head_rf = run.head_rf;
  T *o = run.o, *dx = run.dx, *t2 = run.t2, *row = run.row;
  PYEBM_TILES(crew, n_rt, t) {
    PYEBM_ROWS(t);
    for (int64_t j = 0; j < D; ++j) {
      T s = T(0);
#pragma omp simd reduction(+ : s)
      for (int64_t k = 0; k < O; ++k) s += net.hw2[k * D + j];
      row[j] = s / T(Tn * O);
    }
    for (int64_t i = r0; i < r1; ++i)
      for (int64_t j = 0; j < D; ++j) o[i * D + j] = row[j] * head_hh[i * D + j];
  }
  PYEBM_TILES(crew, col_tiles(D), t) {
    PYEBM_COLS(t, D);
    bwd_cols<T>(M, D, D, o, D, net.hw1, net.thw1, n0, n1, t2 + n0, D, false);
  }
  PYEBM_TILES(crew, n_rt, t) {
    PYEBM_ROWS(t);
    for (int64_t i = r0; i < r1; ++i)
      rms_back_row(t2 + i * D, net.hn, head_xnf + i * D, head_rf[i], D, dx + i * D, false);
  }
}

// Layer l, MLP branch backward [2 phases]. Tile t takes the hidden units n0..n1 the forward pass's tile t
// took: their gradient (dx @ fc2's columns n0..n1, times the GELU derivative), then their share of the
// input gradient, a partial sum over those units added up by the next row phase (norm3 back into dx).
template <typename T>
PYEBM_INLINE void mlp_backward(const BlockRun<T>& run, const LayerRun<T>& lr) {
  Crew& crew = run.crew;
  const int64_t D = run.D, M = run.M, n_rt = run.n_rt;
  T *o = run.o, *dx = run.dx, *part_sum = run.part_sum, *row = run.row;
  const Layer<T>& w = lr.w;
  T *xn3 = lr.xn3, *h1 = lr.h1, *r3n = lr.r3n;
  const int64_t n_mt = col_tiles(D);
  PYEBM_TILES(crew, n_mt, t) {
    PYEBM_COLS(t, D);
    const int64_t wd = n1 - n0;
    T* ob = o + n0 * M;         // d(hidden units of the tile), [M, wd]
    const T* gb = h1 + n0 * M;  // their gelu'
    bwd_cols<T>(M, D, D, dx, D, w.wf2, w.tf2, n0, n1, ob, wd, false);
    for (int64_t i = 0; i < M * wd; ++i) ob[i] *= gb[i];
    bwd_krows<T>(M, D, D, ob, wd, w.wf1, w.tf1, n0, n1, part_sum + t * M * D, false);
  }
  PYEBM_TILES(crew, n_rt, t) {
    PYEBM_ROWS(t);
    for (int64_t i = r0; i < r1; ++i) {
      std::fill(row, row + D, T(0));
      add_partials<T>(row, part_sum + i * D, n_mt, M * D, D, nullptr);
      rms_back_row(row, w.n3, xn3 + i * D, r3n[i], D, dx + i * D, true);
    }
  }
}

// Layer l, cross-attention branch backward [2 phases] (keys and values are constants), per head group:
// d(attention output) in o, d(q after its norm) in t2, through the per-head norm into big [M, D], then the
// group's share of the query projection's input gradient; norm2 back into dx.
template <typename T>
PYEBM_INLINE void cross_attn_backward(const BlockRun<T>& run, int64_t l, const LayerRun<T>& lr) {
  const Net<T>& net = run.net;
  Crew& crew = run.crew;
  const int64_t cand0 = run.cand0, nb = run.nb, Tn = run.Tn, D = run.D, H = run.H, hd = run.hd, L = run.L, M = run.M;
  const int64_t n_rt = run.n_rt, hpt = run.hpt, n_ht = run.n_ht;
  T *big = run.big, *o = run.o, *dx = run.dx, *t2 = run.t2, *part_sum = run.part_sum;
  T *dP = run.dP, *row = run.row, *kvT = run.kvT;
  const Layer<T>& w = lr.w;
  T *xn2 = lr.xn2, *cqh = lr.cqh, *r2n = lr.r2n, *rcq = lr.rcq, *Pc = lr.Pc;
  PYEBM_TILES(crew, n_ht, t) {
    PYEBM_HEADS(t);
    const int64_t c0 = h0 * hd, c1 = h1 * hd, gw = c1 - c0;
    // d(attention output) = dx @ Wxp, or with the projection folded dP[j] = dx . U[h, j] directly
    if (!net.folded()) bwd_cols<T>(M, D, D, dx, D, w.wxp, w.txp, c0, c1, o + c0 * M, gw, false);
    for (int64_t h = h0; h < h1; ++h) {
      const int64_t hc = c0 * M + (h - h0) * hd;
      for (int64_t c = 0; c < nb; ++c) {
        const int64_t q0 = c * Tn;
        const int64_t b = (cand0 + c) / net.K;
        const T* vc = net.folded() ? net.uc(l, b, h) : net.vc(l, b, h);  // what dP reads: U [L, D] or v [L, hd]
        const int64_t vw = net.folded() ? D : hd;
        const T* kT = kvT;
        transpose_to<T>(hd, L, net.kc(l, b, h), kvT);
        const T* Pch = Pc + (c * H + h) * Tn * L;
        for (int64_t t = 0; t < Tn; ++t) {
          const T* dot = net.folded() ? dx + (q0 + t) * D : o + hc + (q0 + t) * gw;
          const T* pr = Pch + t * L;
          T dotp = T(0);
          for (int64_t j = 0; j < L; ++j) {
            dP[j] = dot_n(dot, vc + j * vw, vw);
            dotp += dP[j] * pr[j];
          }
          for (int64_t j = 0; j < L; ++j) dP[j] = pr[j] * (dP[j] - dotp);  // dS
          T* dq = t2 + hc + (q0 + t) * gw;
          for (int64_t d = 0; d < hd; ++d) dq[d] = T(0);
          for (int64_t j = 0; j < L; ++j) {
            const T dj = dP[j];
            const T* kj = kT + j * hd;
#pragma omp simd
            for (int64_t d = 0; d < hd; ++d) dq[d] += dj * kj[d];
          }
        }
      }
      for (int64_t i = 0; i < M; ++i)
        rms_back_row(t2 + hc + i * gw, w.xqn, cqh + hc + i * gw, rcq[h * M + i], hd, big + hc + i * gw, false);
    }
    bwd_krows<T>(M, D, D, big + c0 * M, gw, w.wxq, w.txq, c0, c1, part_sum + t * M * D, false);
  }
  PYEBM_TILES(crew, n_rt, t) {
    PYEBM_ROWS(t);
    for (int64_t i = r0; i < r1; ++i) {
      std::fill(row, row + D, T(0));
      add_partials<T>(row, part_sum + i * D, n_ht, M * D, D, nullptr);
      rms_back_row(row, w.n2, xn2 + i * D, r2n[i], D, dx + i * D, true);
    }
  }
}

// Layer l, self-attention branch backward [2 phases], per head group: d(attention output) in o, then dq,
// dk, dv (after the q/k norms) in big [M, 3D], through the per-head norms in place, then the group's share
// of the qkv projection's input gradient; norm1 back into dx (with the qkv partial sums), and below the
// first layer also the embedding's first backward product input.
template <typename T>
PYEBM_INLINE void self_attn_backward(const BlockRun<T>& run, int64_t l, const LayerRun<T>& lr) {
  const Net<T>& net = run.net;
  Crew& crew = run.crew;
  const int64_t nb = run.nb, Tn = run.Tn, D = run.D, H = run.H, hd = run.hd, M = run.M;
  const int64_t n_rt = run.n_rt, hpt = run.hpt, n_ht = run.n_ht;
  const Saved<T>& sv = run.sv;
  T *big = run.big, *o = run.o, *dx = run.dx, *part_sum = run.part_sum;
  T *dP = run.dP, *up = run.up, *row = run.row, *kvT = run.kvT;
  const Layer<T>& w = lr.w;
  T *xn1 = lr.xn1, *qh = lr.qh, *kh = lr.kh, *vv = lr.vv, *r1n = lr.r1n, *rq = lr.rq, *rk = lr.rk, *Pm = lr.Pm;
  T* dqkv = big;
  PYEBM_TILES(crew, n_ht, t) {
    PYEBM_HEADS(t);
    const int64_t c0 = h0 * hd, c1 = h1 * hd, gw = c1 - c0;
    bwd_cols<T>(M, D, D, dx, D, w.wp, w.tp, c0, c1, o + c0 * M, gw, false);
    for (int64_t h = h0; h < h1; ++h) {
      const int64_t hc = c0 * M + (h - h0) * hd;
      for (int64_t part = 0; part < 3; ++part)
        for (int64_t i = 0; i < M; ++i) {
          T* g = dqkv + part * M * D + hc + i * gw;
          std::fill(g, g + hd, T(0));
        }
      for (int64_t c = 0; c < nb; ++c) {
        const int64_t r = hc + c * Tn * gw;
        self_attn_head_back<T>(hd, Tn, gw, o + r, vv + r, Pm + (c * H + h) * Tn * Tn, qh + r, kh + r, w.qn, w.kn,
                               net.scale, dqkv + r, dqkv + M * D + r, dqkv + 2 * M * D + r, gw, dP, kvT);
      }
      // through the per-head q/k RMSNorms, in place (the upstream gradient is copied out first)
      for (int64_t i = 0; i < M; ++i) {
        T* dq = dqkv + hc + i * gw;
        T* dk = dqkv + M * D + hc + i * gw;
        std::copy(dq, dq + hd, up);
        rms_back_row(up, w.qn, qh + hc + i * gw, rq[h * M + i], hd, dq, false);
        std::copy(dk, dk + hd, up);
        rms_back_row(up, w.kn, kh + hc + i * gw, rk[h * M + i], hd, dk, false);
      }
    }
    for (int64_t part = 0; part < 3; ++part)
      bwd_krows<T>(M, 3 * D, D, dqkv + part * M * D + c0 * M, gw, w.wqkv, w.tqkv, part * D + c0, part * D + c1,
                   part_sum + t * M * D, part > 0);
  }
  // norm1 back into dx (with the qkv partial sums); below the first layer, also the embedding's first
  // backward product input
  PYEBM_TILES(crew, n_rt, t) {
    PYEBM_ROWS(t);
    for (int64_t i = r0; i < r1; ++i) {
      std::fill(row, row + D, T(0));
      add_partials<T>(row, part_sum + i * D, n_ht, M * D, D, nullptr);
      rms_back_row(row, w.n1, xn1 + i * D, r1n[i], D, dx + i * D, true);
      if (l == 0)
        for (int64_t j = 0; j < D; ++j) o[i * D + j] = dx[i * D + j] * sv.u4()[i * D + j];
    }
  }
}

// Embedding backward [2 phases, 3 without layers]: into G.
template <typename T>
PYEBM_INLINE void embed_backward(const BlockRun<T>& run) {
  const Net<T>& net = run.net;
  Crew& crew = run.crew;
  const int64_t D = run.D, A = run.A, M = run.M, n_rt = run.n_rt;
  const Saved<T>& sv = run.sv;
  T* G = run.G;
  T *o = run.o, *dx = run.dx, *t2 = run.t2;
  if (net.layers == 0) {
    PYEBM_TILES(crew, n_rt, t) {
      PYEBM_ROWS(t);
      for (int64_t i = r0 * D; i < r1 * D; ++i) o[i] = dx[i] * sv.u4()[i];
    }
  }
  PYEBM_TILES(crew, col_tiles(D), t) {
    PYEBM_COLS(t, D);
    bwd_cols<T>(M, D, D, o, D, net.w1, net.tw1, n0, n1, t2 + n0, D, false);
  }
  PYEBM_TILES(crew, n_rt, t) {
    PYEBM_ROWS(t);
    for (int64_t i = r0; i < r1; ++i) {
      const T* xl = sv.xln() + i * D;
      T* g = o + i * D;
      T m1 = T(0), m2 = T(0);
      for (int64_t j = 0; j < D; ++j) {
        g[j] = t2[i * D + j] * sv.u2()[i * D + j] * net.lnw[j];
        m1 += g[j];
        m2 += g[j] * xl[j];
      }
      m1 /= T(D);
      m2 /= T(D);
      const T rs = sv.rstd()[i];
      for (int64_t j = 0; j < D; ++j) g[j] = rs * (g[j] - m1 - xl[j] * m2);
    }
    gemm_nn<T>(r1 - r0, D, A, o + r0 * D, net.w0, G + r0 * A, false);
  }
}

#undef PYEBM_ROWS
#undef PYEBM_COLS
#undef PYEBM_HEADS

// One block of nb candidates starting at global candidate cand0: E[nb] and, if G, dE/dy [nb, T, A].
// buf: block_elems() shared elements.
template <typename T>
PYEBM_INLINE void block_impl(const Net<T>& net, int64_t cand0, int64_t nb, const T* y, T* E, T* G, T* buf,
                             Crew& crew) {
  const BlockRun<T> run = block_run<T>(net, cand0, nb, y, E, G, buf, crew);
  embed_forward(run);
  // Per layer: per head group of the self-attention, then of the cross-attention, then per tile of the MLP's
  // hidden units, each after its norm's row phase. A tile's work stays on one core from its slices to its
  // partial product, so little data moves between cores inside a layer.
  for (int64_t l = 0; l < net.layers; ++l) {
    const LayerRun<T> lr = layer_run(run, l);
    self_attn_forward(run, l, lr);
    cross_attn_forward(run, l, lr);
    mlp_forward(run, lr);
  }
  head_forward(run);
  if (G == nullptr) return;
  head_backward(run);
  for (int64_t l = net.layers - 1; l >= 0; --l) {
    const LayerRun<T> lr = layer_run(run, l);
    mlp_backward(run, lr);
    cross_attn_backward(run, l, lr);
    self_attn_backward(run, l, lr);
  }
  embed_backward(run);
}

// The block compiled for the baseline ISA, for AVX2 + FMA and for AVX-512 (chosen at run time), so the
// reductions and element-wise passes are as wide as the CPU allows.
template <typename T>
void block_base(const Net<T>& net, int64_t c0, int64_t nb, const T* y, T* E, T* G, T* buf, Crew& crew) {
  block_impl<T>(net, c0, nb, y, E, G, buf, crew);
}
#if defined(PYEBM_VEC_ACT) && defined(__x86_64__)
template <typename T>
__attribute__((target("avx2,fma"))) void block_avx2(const Net<T>& net, int64_t c0, int64_t nb, const T* y, T* E,
                                                   T* G, T* buf, Crew& crew) {
  block_impl<T>(net, c0, nb, y, E, G, buf, crew);
}
template <typename T>
__attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma"))) void block_avx512(
    const Net<T>& net, int64_t c0, int64_t nb, const T* y, T* E, T* G, T* buf, Crew& crew) {
  block_impl<T>(net, c0, nb, y, E, G, buf, crew);
}
#endif

template <typename T>
void block(const Net<T>& net, int64_t c0, int64_t nb, const T* y, T* E, T* G, T* buf, Crew& crew) {
#if defined(PYEBM_VEC_ACT) && defined(__x86_64__)
  const int level = cpu_vec_level();
  if (level == 2) return block_avx512<T>(net, c0, nb, y, E, G, buf, crew);
  if (level == 1) return block_avx2<T>(net, c0, nb, y, E, G, buf, crew);
#endif
  block_base<T>(net, c0, nb, y, E, G, buf, crew);
}

// `n` zeroed phase counters of the calling thread (kept between calls).
inline CrewPhase* crew_phases(int64_t n) {
  thread_local std::unique_ptr<CrewPhase[]> phases;
  thread_local int64_t capacity = 0;
  if (capacity < n) {
    phases.reset(new CrewPhase[n]);
    capacity = n;
  }
  for (int64_t i = 0; i < n; ++i) {
    phases[i].taken.store(0, std::memory_order_relaxed);
    phases[i].next.store(0, std::memory_order_relaxed);
    phases[i].done.store(0, std::memory_order_relaxed);
  }
  return phases.get();
}

// Phases of one block, as block_impl() runs them: embedding 2, per layer 6, head 3; with the gradient
// head 3, per layer 6, embedding 2 (+1 without layers).
inline int64_t block_phases(int64_t layers, bool grad) {
  return 5 + 6 * layers + (grad ? 5 + 6 * layers + (layers == 0 ? 1 : 0) : 0);
}

// Rows (candidates x T) per block; PYEBM_EBT_POLICY_BLOCK_ROWS overrides (for tuning).
int64_t block_rows() {
  static const int64_t v = [] {
    const char* env = std::getenv("PYEBM_EBT_POLICY_BLOCK_ROWS");
    const int64_t x = env ? std::atoll(env) : 0;
    return x > 0 ? x : int64_t(64);
  }();
  return v;
}

// The input that sets the compute dtype and device of an EBT-Policy op: float32 or float64, on the cpu.
void check_input(const char* op, const at::Tensor& t, const char* name) {
  checks::dense(op, checks::Arg{name}, t);
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op,
                   ": the EBT-Policy ops take float32 or float64; got ", name, " as ", checks::describe(t));
  TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": the cpu kernel needs CPU tensors; got ", name, " on ", t.device());
}

// The names of the parameters in the op's order (pyebm/ops/ebt_policy.py, param_list), for messages.
constexpr const char* kEmbedNames[kEmbed] = {"embed.fc1.weight", "embed.fc1.bias", "embed.norm.weight",
                                             "embed.norm.bias",  "embed.fc2.weight", "embed.fc2.bias",
                                             "pos_emb"};
constexpr const char* kLayerNames[kPerLayer] = {
    "norm1.weight",       "attn.qkv.weight", "attn.qkv.bias", "attn.q_norm.weight", "attn.k_norm.weight",
    "attn.proj.weight",   "attn.proj.bias",  "norm2.weight",  "cross.q.weight",     "cross.q.bias",
    "cross.q_norm.weight", "cross.proj.weight", "norm3.weight", "mlp.fc1.weight",   "mlp.fc1.bias",
    "mlp.fc2.weight",     "mlp.fc2.bias"};
constexpr const char* kHeadNames[kHead] = {"head.norm.weight", "head.fc1.weight", "head.fc1.bias",
                                           "head.fc2.weight", "head.fc2.bias"};

std::string param_name(int64_t i, int64_t layers) {
  if (i < kEmbed) return kEmbedNames[i];
  const int64_t l = (i - kEmbed) / kPerLayer;
  if (l < layers) return "blocks." + std::to_string(l) + "." + kLayerNames[(i - kEmbed) % kPerLayer];
  return kHeadNames[i - kEmbed - kPerLayer * layers];
}

// The network's inputs, checked once per call: contiguous parameters and transposed copies, the cached
// observation side, and the shapes.
struct NetArgs {
  std::vector<at::Tensor> ps, wt;
  at::Tensor ck, cv, bias;
  int64_t B, K, Tn, A, D, heads, hd, L, O, layers;
  double rms_eps, ln_eps;
};

// Every tensor of the network checked against y_ [B, K, T, A] (layout, dtype, device, exact shape) before
// anything is read: the width D comes from params[0] [D, A], the output width O from the head's fc2 weight,
// L from ctx_k; every other shape follows. Non-contiguous tensors are copied.
NetArgs check_net_args(const char* op, const char* y_name, const at::Tensor& y_, const at::Tensor& ck_,
                       const at::Tensor& cv_, const at::Tensor& bias_, at::TensorList params_,
                       at::TensorList weights_t_, int64_t heads, double rms_eps, double ln_eps) {
  using checks::Arg;
  check_input(op, y_, y_name);
  TORCH_CHECK_VALUE(y_.dim() == 4, op, ": ", y_name, " must be [B, K, T, A]; got shape ", y_.sizes());
  TORCH_CHECK_VALUE(heads >= 1, op, ": heads must be >= 1; got ", heads);
  checks::non_negative(op, "rms_eps", rms_eps);
  checks::non_negative(op, "ln_eps", ln_eps);
  const int64_t B = y_.size(0), K = y_.size(1), Tn = y_.size(2), A = y_.size(3);
  TORCH_CHECK_VALUE(Tn >= 1, op, ": ", y_name, " must have T >= 1 action tokens; got shape ", y_.sizes());
  TORCH_CHECK_VALUE(params_.size() >= static_cast<size_t>(kEmbed + kHead) &&
                        (params_.size() - kEmbed - kHead) % kPerLayer == 0,
                    op, ": params must hold ", kEmbed, " + ", kPerLayer, " * layers + ", kHead, " tensors; got ",
                    params_.size());
  const int64_t layers = static_cast<int64_t>((params_.size() - kEmbed - kHead) / kPerLayer);
  const int64_t n_params = static_cast<int64_t>(params_.size());
  for (int64_t i = 0; i < n_params; ++i) {  // names built on failure only
    const at::Tensor& t = params_[i];
    if (!t.defined() || t.layout() != at::kStrided || t.is_quantized() || t.scalar_type() != y_.scalar_type() ||
        t.device() != y_.device()) {
      const std::string n = param_name(i, layers);
      checks::dense(op, Arg{"params", i, n.c_str()}, t);
      checks::like(op, Arg{"params", i, n.c_str()}, t, y_, y_name);
    }
  }
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"ctx_k", &ck_}, {"ctx_v", &cv_},
                                {"bias", &bias_}}) {
    checks::dense(op, Arg{name}, *t);
    checks::like(op, Arg{name}, *t, y_, y_name);
  }
  const at::Tensor& w0 = params_[0];
  TORCH_CHECK_VALUE(w0.dim() == 2 && w0.size(1) == A, op, ": params[0] (embed.fc1.weight) must be [D, A = ", A,
                    "]; got shape ", w0.sizes());
  const int64_t D = w0.size(0);
  TORCH_CHECK_VALUE(D >= 1 && D % heads == 0, op, ": the width D = ", D, " (params[0] is [D, A]) must be >= 1 and ",
                    "divisible by heads = ", heads);
  const int64_t hd = D / heads;
  const at::Tensor& hw2 = params_[kEmbed + kPerLayer * layers + 3];
  TORCH_CHECK_VALUE(hw2.dim() == 2 && hw2.size(1) == D && hw2.size(0) >= 1, op, ": params[",
                    kEmbed + kPerLayer * layers + 3, "] (head.fc2.weight) must be [O, D = ", D,
                    "] with O >= 1; got shape ", hw2.sizes());
  const int64_t O = hw2.size(0);
  TORCH_CHECK_VALUE(ck_.dim() == 5 && ck_.size(0) == layers && ck_.size(1) == B && ck_.size(2) == heads &&
                        ck_.size(3) == hd && ck_.size(4) >= 1,
                    op, ": ctx_k must be [layers=", layers, ", B=", B, ", H=", heads, ", hd=", hd,
                    ", L] with L >= 1; got shape ", ck_.sizes());
  const int64_t L = ck_.size(4);
  checks::shape(op, Arg{"ctx_v"}, cv_, {layers, B, heads, L, hd}, "[layers, B, H, L, hd]");
  checks::shape(op, Arg{"bias"}, bias_, {Tn, L}, "[T, L]");

  // the exact shape of every parameter: a wrong list order or a view of the wrong size stops here
  struct Shape {
    int64_t d[2];
    size_t n;
  };
  const Shape kEmbedShapes[kEmbed] = {{{D, A}, 2}, {{D}, 1}, {{D}, 1}, {{D}, 1}, {{D, D}, 2}, {{D}, 1}, {{Tn, D}, 2}};
  const Shape kLayerShapes[kPerLayer] = {{{D}, 1},    {{3 * D, D}, 2}, {{3 * D}, 1}, {{hd}, 1}, {{hd}, 1}, {{D, D}, 2},
                                         {{D}, 1},    {{D}, 1},        {{D, D}, 2},  {{D}, 1},  {{hd}, 1}, {{D, D}, 2},
                                         {{D}, 1},    {{D, D}, 2},     {{D}, 1},     {{D, D}, 2}, {{D}, 1}};
  const Shape kHeadShapes[kHead] = {{{D}, 1}, {{D, D}, 2}, {{D}, 1}, {{O, D}, 2}, {{O}, 1}};
  for (int64_t i = 0; i < n_params; ++i) {
    const Shape& e = i < kEmbed                          ? kEmbedShapes[i]
                     : i < kEmbed + kPerLayer * layers ? kLayerShapes[(i - kEmbed) % kPerLayer]
                                                        : kHeadShapes[i - kEmbed - kPerLayer * layers];
    const at::IntArrayRef want(e.d, e.n);
    if (params_[i].sizes() == want) continue;
    const std::string n = param_name(i, layers);
    checks::shape(op, Arg{"params", i, n.c_str()}, params_[i], want);
  }

  auto prep = [](const at::Tensor& t) { return t.is_contiguous() ? t : t.contiguous(); };
  std::vector<at::Tensor> ps;
  ps.reserve(params_.size());
  for (const auto& t : params_) ps.push_back(prep(t));

  // optional transposed weights: embed fc2, per layer (qkv, proj, cross q, cross proj, fc1, fc2), head fc1, fc2
  const int64_t n_t = 1 + 6 * layers + 2;
  TORCH_CHECK_VALUE(weights_t_.empty() || static_cast<int64_t>(weights_t_.size()) == n_t, op,
                    ": weights_t must be empty or hold 1 + 6 * layers + 2 = ", n_t, " tensors; got ",
                    weights_t_.size());
  std::vector<at::Tensor> wt;
  {
    std::vector<int64_t> src = {4};
    for (int64_t l = 0; l < layers; ++l) {
      const int64_t o = kEmbed + kPerLayer * l;
      for (int64_t j : {1, 5, 8, 11, 13, 15}) src.push_back(o + j);
    }
    src.push_back(kEmbed + kPerLayer * layers + 1);
    src.push_back(kEmbed + kPerLayer * layers + 3);
    for (size_t i = 0; i < weights_t_.size(); ++i) {
      const at::Tensor& t = weights_t_[i];
      const at::Tensor& w = ps[src[i]];
      checks::dense(op, Arg{"weights_t", static_cast<int64_t>(i)}, t);
      checks::like(op, Arg{"weights_t", static_cast<int64_t>(i)}, t, y_, y_name);
      TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == w.size(1) && t.size(1) == w.size(0), op, ": weights_t[", i,
                        "] must be the transpose of params[", src[i], "] (", param_name(src[i], layers), ") ",
                        w.sizes(), ", i.e. [", w.size(1), ", ", w.size(0), "]; got shape ", t.sizes());
      wt.push_back(prep(t));
    }
  }

  return NetArgs{std::move(ps), std::move(wt), prep(ck_), prep(cv_), prep(bias_), B, K, Tn, A, D, heads, hd, L,
                 O, layers, rms_eps, ln_eps};
}

// U[l, b, h, j] = Wxp[:, head h's columns] @ v[l, b, h, j] ([D]) for every observation token j, when
// cross_folded(): the cross projection applied once per call to the cached values rather than to every
// candidate token's attention output (the projection is linear and has no bias). One task per layer and
// head, U zeroed: each of Wxp's columns of the head is read once for every observation.
template <typename T>
PYEBM_INLINE void fold_task_impl(const Net<T>& net, T* cu, int64_t l, int64_t h) {
  const int64_t B = net.B, H = net.H, L = net.L, hd = net.hd, D = net.D;
  const Layer<T>& w = net.lay[l];
  if (w.txp == nullptr) {  // U[j, o] = v[j] . Wxp[o, head h's columns], the rows of Wxp in order
    for (int64_t b = 0; b < B; ++b) {
      const T* v = net.vc(l, b, h);                   // [L, hd]
      T* u = cu + (((l * B + b) * H + h) * L) * D;    // [L, D]
      for (int64_t o = 0; o < D; ++o)
        for (int64_t j = 0; j < L; ++j) u[j * D + o] = dot_n(v + j * hd, w.wxp + o * D + h * hd, hd);
    }
    return;
  }
  for (int64_t d = 0; d < hd; ++d) {
    const T* __restrict wr = w.txp + (h * hd + d) * D;  // Wxp's column h * hd + d, contiguous in the copy
    for (int64_t b = 0; b < B; ++b) {
      const T* v = net.vc(l, b, h);
      T* u = cu + (((l * B + b) * H + h) * L) * D;
      for (int64_t j = 0; j < L; ++j) {
        const T vd = v[j * hd + d];
        T* __restrict uj = u + j * D;
#pragma omp simd
        for (int64_t o = 0; o < D; ++o) uj[o] += vd * wr[o];
      }
    }
  }
}
// compiled for the baseline ISA, for AVX2 + FMA and for AVX-512 (chosen at run time), like the block
template <typename T>
void fold_task_base(const Net<T>& net, T* cu, int64_t l, int64_t h) {
  fold_task_impl<T>(net, cu, l, h);
}
#if defined(PYEBM_VEC_ACT) && defined(__x86_64__)
template <typename T>
__attribute__((target("avx2,fma"))) void fold_task_avx2(const Net<T>& net, T* cu, int64_t l, int64_t h) {
  fold_task_impl<T>(net, cu, l, h);
}
template <typename T>
__attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma"))) void fold_task_avx512(
    const Net<T>& net, T* cu, int64_t l, int64_t h) {
  fold_task_impl<T>(net, cu, l, h);
}
#endif
template <typename T>
void fold_task(const Net<T>& net, T* cu, int64_t l, int64_t h) {
#if defined(PYEBM_VEC_ACT) && defined(__x86_64__)
  const int level = cpu_vec_level();
  if (level == 2) return fold_task_avx512<T>(net, cu, l, h);
  if (level == 1) return fold_task_avx2<T>(net, cu, l, h);
#endif
  fold_task_base<T>(net, cu, l, h);
}

template <typename T>
void fold_cross_values(Net<T>& net) {
  const int64_t layers = net.layers, B = net.B, H = net.H, L = net.L, D = net.D;
  if (!cross_folded(H, L, D, net.K, net.Tn) || layers == 0 || B == 0 || L == 0) return;
  net.cu.assign(static_cast<size_t>(layers * B * H * L * D), T(0));
  T* cu = net.cu.data();
  const Net<T>& cnet = net;
  at::parallel_for(0, layers * H, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) fold_task<T>(cnet, cu, i / H, i % H);
  });
}

template <typename T>
Net<T> make_net(const NetArgs& a) {
  const int64_t layers = a.layers;
  Net<T> net;
  net.A = a.A, net.Tn = a.Tn, net.D = a.D, net.H = a.heads, net.hd = a.hd, net.L = a.L, net.O = a.O;
  net.layers = layers, net.K = a.K, net.B = a.B;
  net.scale = T(1) / std::sqrt(T(a.hd));
  net.rms_eps = T(a.rms_eps), net.ln_eps = T(a.ln_eps);
  auto P = [&](int64_t i) { return a.ps[i].data_ptr<T>(); };
  net.w0 = P(0), net.b0 = P(1), net.lnw = P(2), net.lnb = P(3), net.w1 = P(4), net.b1 = P(5), net.pos = P(6);
  for (int64_t l = 0; l < layers; ++l) {
    const int64_t o = kEmbed + kPerLayer * l;
    net.lay.push_back(Layer<T>{P(o), P(o + 1), P(o + 2), P(o + 3), P(o + 4), P(o + 5), P(o + 6), P(o + 7),
                               P(o + 8), P(o + 9), P(o + 10), P(o + 11), P(o + 12), P(o + 13), P(o + 14),
                               P(o + 15), P(o + 16)});
  }
  const int64_t h0 = kEmbed + kPerLayer * layers;
  net.hn = P(h0), net.hw1 = P(h0 + 1), net.hb1 = P(h0 + 2), net.hw2 = P(h0 + 3), net.hb2 = P(h0 + 4);
  if (!a.wt.empty()) {
    auto W = [&](int64_t i) { return a.wt[i].data_ptr<T>(); };
    net.tw1 = W(0);
    for (int64_t l = 0; l < layers; ++l) {
      Layer<T>& ly = net.lay[l];
      ly.tqkv = W(1 + 6 * l), ly.tp = W(2 + 6 * l), ly.txq = W(3 + 6 * l);
      ly.txp = W(4 + 6 * l), ly.tf1 = W(5 + 6 * l), ly.tf2 = W(6 + 6 * l);
    }
    net.thw1 = W(1 + 6 * layers), net.thw2 = W(2 + 6 * layers);
  }
  net.ck = a.ck.data_ptr<T>(), net.cv = a.cv.data_ptr<T>(), net.bias = a.bias.data_ptr<T>();
  fold_cross_values(net);
  return net;
}

// E [N] and (G not null) dE/dy [N, T, A] for the N = B * K candidates y [N, T, A].
template <typename T>
void run_net(const Net<T>& net, const T* yp, T* Ep, T* Gp) {
  const int64_t N = net.B * net.K, Tn = net.Tn, A = net.A;
  if (N == 0) return;
  // candidates per block: about block_rows() rows for the GEMMs. Several blocks run in parallel, one
  // thread each; a single block (few candidates) is run by a crew of threads sharing its phases.
  const int64_t nb = std::max<int64_t>(1, block_rows() / std::max<int64_t>(1, Tn));
  const int64_t nblocks = (N + nb - 1) / nb;
  const int64_t n_phases = block_phases(net.layers, Gp != nullptr);
  if (nblocks == 1) {
    T* buf = scratch<T, 0>(block_elems(net, N));
    CrewPhase* phases = crew_phases(n_phases);
    const int64_t M = N * Tn;
    const int64_t widest = std::max({(M + kRowTile - 1) / kRowTile, (3 * net.D + kColTile - 1) / kColTile, net.H});
    const int64_t crew_size = at::in_parallel_region() ? 1 : std::min<int64_t>(at::get_num_threads(), widest);
    auto member = [&](int64_t me, int64_t) {
      Crew crew(phases, n_phases, me, crew_size);
      block<T>(net, 0, N, yp, Ep, Gp, buf, crew);
    };
    if (crew_size <= 1)
      member(0, 1);
    else
      at::parallel_for(0, crew_size, 1, member);
  } else {
    at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
      T* buf = scratch<T, 0>(block_elems(net, nb));
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t c0 = blk * nb;
        const int64_t m = std::min(nb, N - c0);
        Crew crew(crew_phases(n_phases), n_phases);
        block<T>(net, c0, m, yp + c0 * Tn * A, Ep + c0, Gp ? Gp + c0 * Tn * A : nullptr, buf, crew);
      }
    });
  }
}

std::tuple<at::Tensor, at::Tensor> ebt_policy_energy_grad_cpu(const at::Tensor& y_, const at::Tensor& ck_,
                                                              const at::Tensor& cv_, const at::Tensor& bias_,
                                                              at::TensorList params_, at::TensorList weights_t_,
                                                              int64_t heads, double rms_eps, double ln_eps,
                                                              bool need_grad) {
  const NetArgs a = check_net_args("pyebm::ebt_policy_energy_grad", "y", y_, ck_, cv_, bias_, params_, weights_t_,
                                   heads, rms_eps, ln_eps);
  const at::Tensor y = y_.contiguous();
  at::Tensor E = at::empty({a.B, a.K}, y.options());
  at::Tensor G = need_grad ? at::empty({a.B, a.K, a.Tn, a.A}, y.options()) : at::empty({0}, y.options());
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "pyebm_ebt_policy", [&] {
    using T = scalar_t;
    const Net<T> net = make_net<T>(a);
    run_net<T>(net, y.data_ptr<T>(), E.data_ptr<T>(), need_grad ? G.data_ptr<T>() : nullptr);
  });
  return {E, G};
}


// The options of a descent on this network, checked (shared by the op and the one-call pack).
struct PolicyDescent {
  bool norm_rows = false, norm_all = false;
  double normalize_eps = 0, grad_scale = 1, momentum = 0, energy_temperature = 1, tol = 0;
  bool nesterov = false, energy_scaled = false, coupled_tol = false, tol_final_step = false, bound_each_step = true;
  bool final_energy = true;
  c10::optional<double> grad_clip, grad_clip_norm;
};

PolicyDescent policy_descent_options(const char* op, c10::string_view normalize, double normalize_eps,
                                     double grad_scale, double momentum, bool nesterov, c10::optional<double> grad_clip,
                                     c10::optional<double> grad_clip_norm, bool energy_scaled,
                                     double energy_temperature, double tol, c10::string_view tol_scope,
                                     bool tol_final_step, bool bound_each_step, bool final_energy) {
  TORCH_CHECK_VALUE(normalize == "none" || normalize == "rms" || normalize == "all", op,
                    ": normalize must be none, rms or all; got '", std::string(normalize), "'");
  TORCH_CHECK_VALUE(tol_scope == "candidate" || tol_scope == "all", op,
                    ": tol_scope must be candidate or all; got '", std::string(tol_scope), "'");
  checks::non_negative(op, "normalize_eps", normalize_eps);
  check_rule(momentum, grad_clip, grad_clip_norm, energy_temperature, tol);
  checks::finite(op, "grad_scale", grad_scale);
  PolicyDescent o;
  o.norm_rows = normalize == "rms", o.norm_all = normalize == "all";
  o.normalize_eps = normalize_eps, o.grad_scale = grad_scale, o.momentum = momentum, o.nesterov = nesterov;
  o.grad_clip = grad_clip, o.grad_clip_norm = grad_clip_norm, o.energy_scaled = energy_scaled;
  o.energy_temperature = energy_temperature, o.tol = tol, o.coupled_tol = tol > 0 && tol_scope == "all";
  o.tol_final_step = tol_final_step, o.bound_each_step = bound_each_step, o.final_energy = final_energy;
  TORCH_CHECK_VALUE(!o.coupled_tol || (!grad_clip.has_value() && !grad_clip_norm.has_value()), op,
                    ": tol_scope 'all' is not combined with gradient clipping here");
  return o;
}

// Every step of a descent from y0 (checked against the network by check_net_args) with step sizes eta and
// the checked bounds / step clip: (y, E_final, E_init, steps, status).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> run_policy_descent(
    const NetArgs& a, const at::Tensor& y0, const std::vector<double>& eta, const EventOptions& ev,
    const PolicyDescent& o) {
  const int64_t n_steps = static_cast<int64_t>(eta.size());
  const int64_t B = a.B, K = a.K, N = B * K, D = a.Tn * a.A;
  const auto dt = y0.scalar_type();
  const at::Tensor &lower = ev.lower, &upper = ev.upper, &step_clip = ev.step_clip;
  const bool norm_rows = o.norm_rows, norm_all = o.norm_all, coupled_tol = o.coupled_tol;
  const double momentum = o.momentum;
  at::Tensor y = y0.contiguous().clone();  // the state, updated in place
  at::Tensor E_final = at::empty({B, K}, y.options());
  at::Tensor E_init = at::empty({B, K}, y.options());
  at::Tensor steps = at::zeros({B, K}, y.options().dtype(at::kInt));
  at::Tensor status = at::zeros({B, K}, y.options().dtype(at::kChar));
  if (N == 0) return {y, E_final, E_init, steps, status};
  AT_DISPATCH_FLOATING_TYPES(dt, "pyebm_ebt_policy_descent", [&] {
    using T = scalar_t;
    const Net<T> net = make_net<T>(a);
    UpdateRule<T> u = make_rule<T>(D, o.grad_scale, momentum, o.grad_clip, o.grad_clip_norm, o.energy_scaled,
                                   o.energy_temperature, o.tol, o.tol_final_step, o.bound_each_step, lower, upper,
                                   step_clip, NoiseMode::kNone);
    T* yp = y.data_ptr<T>();
    T* E = E_final.data_ptr<T>();  // the step energies live here until the final pass
    const bool look_ahead = o.nesterov && momentum > 0;
    std::vector<T> ys(norm_rows || norm_all ? N * D : 0), q(look_ahead ? N * D : 0), G(N * D),
        v(momentum > 0 ? N * D : 0, T(0));
    std::vector<uint8_t> active(N, 1), pending(o.tol_final_step ? N : 0, 0);
    std::vector<T> scratch(2 * D);
    int32_t* sp = steps.data_ptr<int32_t>();
    int8_t* stp = status.data_ptr<int8_t>();
    const T eps = T(o.normalize_eps);
    for (int64_t k = 0; k < n_steps; ++k) {
      // where the step starts: y, or y over its RMS (per candidate, or over the whole batch)
      const T* base = yp;
      if (!ys.empty()) {
        if (norm_all) {
          double ss = 0;
          for (int64_t i = 0; i < N * D; ++i) ss += double(yp[i]) * double(yp[i]);
          const T s = std::sqrt(T(ss / double(N * D)) + eps);
          for (int64_t i = 0; i < N * D; ++i) ys[i] = yp[i] / s;
        } else {
          for (int64_t r = 0; r < N; ++r) {
            const T* yr = yp + r * D;
            T ss = T(0);
            for (int64_t j = 0; j < D; ++j) ss += yr[j] * yr[j];
            const T s = std::sqrt(ss / T(D) + eps);
            for (int64_t j = 0; j < D; ++j) ys[r * D + j] = yr[j] / s;
          }
        }
        base = ys.data();
      }
      // the evaluation point: base, or the Nesterov look-ahead base + momentum * v
      if (look_ahead)
        for (int64_t i = 0; i < N * D; ++i) q[i] = base[i] + T(momentum) * v[i];
      run_net<T>(net, look_ahead ? q.data() : base, E, G.data());
      if (k == 0) std::copy(E, E + N, E_init.data_ptr<T>());
      if (coupled_tol) {
        // ||g|| over every running candidate with a finite energy and gradient
        T ss = T(0);
        for (int64_t r = 0; r < N; ++r) {
          if (!active[r]) continue;
          int bad = hd::nonfinite(E[r]);
          T sr = T(0);
          for (int64_t j = 0; j < D; ++j) {
            bad |= hd::nonfinite(G[r * D + j]);
            sr += G[r * D + j] * G[r * D + j];
          }
          if (!bad) ss += sr;
        }
        u.tol_met = std::sqrt(ss) <= u.tol ? 1 : 0;
      }
      bool any = false;
      for (int64_t r = 0; r < N; ++r) {
        RowState<T> st{yp + r * D, v.empty() ? nullptr : v.data() + r * D, active.data() + r, sp + r, stp + r,
                       pending.empty() ? nullptr : pending.data() + r};
        update_row<T>(u, T(eta[k]), T(0), E[r], G.data() + r * D, base + r * D, nullptr, nullptr, nullptr, st,
                      scratch.data());
        any |= active[r] != 0;
      }
      if (!any) break;
    }
    if (!o.bound_each_step && (u.lower || u.upper))
      for (int64_t r = 0; r < N; ++r) bound_row_at_end<T>(u, yp + r * D, nullptr, nullptr);
    if (o.final_energy)
      run_net<T>(net, yp, E, nullptr);
    else
      std::fill(E, E + N, std::numeric_limits<T>::quiet_NaN());
  });
  return {y, E_final, E_init, steps, status};
}



std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ebt_policy_descent_cpu(
    const at::Tensor& y0, const at::Tensor& ck_, const at::Tensor& cv_, const at::Tensor& bias_,
    at::TensorList params_, at::TensorList weights_t_, int64_t heads, double rms_eps, double ln_eps,
    const at::Tensor& eta_, const c10::optional<at::Tensor>& lower_, const c10::optional<at::Tensor>& upper_,
    const c10::optional<at::Tensor>& step_clip_, c10::string_view normalize, double normalize_eps, double grad_scale,
    double momentum, bool nesterov, c10::optional<double> grad_clip, c10::optional<double> grad_clip_norm,
    bool energy_scaled, double energy_temperature, double tol, c10::string_view tol_scope, bool tol_final_step,
    bool bound_each_step, bool final_energy) {
  const char* op = "pyebm::ebt_policy_descent";
  const NetArgs a = check_net_args(op, "y0", y0, ck_, cv_, bias_, params_, weights_t_, heads, rms_eps, ln_eps);
  const PolicyDescent o = policy_descent_options(op, normalize, normalize_eps, grad_scale, momentum, nesterov,
                                                 grad_clip, grad_clip_norm, energy_scaled, energy_temperature, tol,
                                                 tol_scope, tol_final_step, bound_each_step, final_energy);
  TORCH_CHECK_VALUE(eta_.dim() == 1 && eta_.numel() >= 1, op, ": eta must be [steps] with steps >= 1; got shape ",
                    eta_.sizes());
  const std::vector<double> eta = host_schedule(eta_, "eta", eta_.numel(), op, y0.device());
  const EventOptions ev = event_options(lower_, upper_, step_clip_, a.Tn * a.A, y0.scalar_type(), y0.device(), op);
  return run_policy_descent(a, y0, eta, ev, o);
}


// One layer per task: its keys/values product over every observation token (fewer than 8 in float32: one
// stream over the weight rows; 8 to 32: the weight-broadcast kernel; else the BLAS), then the keys' RMSNorm
// and both layouts.
std::tuple<at::Tensor, at::Tensor> ebt_policy_context_cpu(const at::Tensor& obs_, const at::Tensor& w_,
                                                          const at::Tensor& b_, const at::Tensor& k_norm_,
                                                          int64_t heads, double rms_eps) {
  const char* op = "pyebm::ebt_policy_context";
  check_input(op, obs_, "obs");
  TORCH_CHECK_VALUE(obs_.dim() == 3, op, ": obs must be [B, L, C]; got shape ", obs_.sizes());
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"w", &w_}, {"b", &b_}, {"k_norm", &k_norm_}}) {
    checks::dense(op, checks::Arg{name}, *t);
    checks::like(op, checks::Arg{name}, *t, obs_, "obs");
  }
  TORCH_CHECK_VALUE(heads >= 1, op, ": heads must be >= 1; got ", heads);
  checks::non_negative(op, "rms_eps", rms_eps);
  const int64_t B = obs_.size(0), L = obs_.size(1), C = obs_.size(2);
  TORCH_CHECK_VALUE(k_norm_.dim() == 2, op, ": k_norm must be [layers, hd]; got shape ", k_norm_.sizes());
  const int64_t layers = k_norm_.size(0), hd = k_norm_.size(1), D = heads * hd;
  TORCH_CHECK_VALUE(w_.dim() == 2 && w_.size(0) == layers * 2 * D && w_.size(1) == C, op,
                    ": w must be [layers * 2D = ", layers * 2 * D, ", C = ", C, "]; got shape ", w_.sizes());
  TORCH_CHECK_VALUE(b_.dim() == 1 && b_.size(0) == layers * 2 * D, op, ": b must be [", layers * 2 * D,
                    "]; got shape ", b_.sizes());
  const at::Tensor obs = obs_.contiguous(), w = w_.contiguous(), b = b_.contiguous(), kn = k_norm_.contiguous();
  at::Tensor ks = at::empty({layers, B, heads, hd, L}, obs.options());
  at::Tensor vs = at::empty({layers, B, heads, L, hd}, obs.options());
  const int64_t M = B * L, N = 2 * D;
  if (M == 0 || layers == 0) return {ks, vs};
  AT_DISPATCH_FLOATING_TYPES(obs.scalar_type(), "pyebm_ebt_policy_context", [&] {
    using T = scalar_t;
    const T* x = obs.data_ptr<T>();
    const T scale = T(1) / std::sqrt(T(hd));
    at::parallel_for(0, layers, 1, [&](int64_t l0, int64_t l1) {
      std::vector<T> kv(static_cast<size_t>(M * N));
      for (int64_t l = l0; l < l1; ++l) {
        const T* wl = w.data_ptr<T>() + l * N * C;
        const T* bl = b.data_ptr<T>() + l * N;
        // the broadcast kernel fills 16-row blocks: worth it from half a block up to two
        if (!stream_product<T>(M, N, C, x, wl, kv.data()) &&
            (M < 8 || M > 32 || !bcast_product<T>(M, N, C, x, C, wl, C, kv.data(), N, false)))
          gemm_ld<T>(true, M, N, C, x, C, wl, C, kv.data(), N, false);
        add_bias(kv.data(), bl, M, N);
        const T* knl = kn.data_ptr<T>() + l * hd;
        for (int64_t bi = 0; bi < B; ++bi)
          for (int64_t h = 0; h < heads; ++h) {
            T* kd = ks.data_ptr<T>() + ((l * B + bi) * heads + h) * hd * L;  // [hd, L]
            T* vd = vs.data_ptr<T>() + ((l * B + bi) * heads + h) * L * hd;  // [L, hd]
            for (int64_t t = 0; t < L; ++t) {
              T* k = kv.data() + (bi * L + t) * N + h * hd;
              rms_row(k, k, hd, T(rms_eps));  // in place: the keys over their RMS
              for (int64_t d = 0; d < hd; ++d) kd[d * L + t] = k[d] * knl[d] * scale;
              std::copy(k + D, k + D + hd, vd + t * hd);  // the values
            }
          }
      }
    });
  });
  return {ks, vs};
}

}  // namespace

PolicyOneCall ebt_policy_one_call_cpu(const at::Tensor& obs, const at::Tensor& y0, const at::Tensor& kv_w,
                                      const at::Tensor& kv_b, const at::Tensor& k_norm, double ctx_rms_eps,
                                      const at::Tensor& bias, at::TensorList params, at::TensorList weights_t,
                                      int64_t heads, double rms_eps, double ln_eps, const RuleOptions& rule,
                                      c10::string_view normalize, double normalize_eps, c10::string_view tol_scope,
                                      bool final_energy) {
  const char* op = "pyebm: EBTPolicy's one-call descent";
  TORCH_CHECK_VALUE(rule.noise == NoiseMode::kNone, op, ": this descent draws no noise");
  auto [ck, cv] = ebt_policy_context_cpu(obs, kv_w, kv_b, k_norm, heads, ctx_rms_eps);
  const NetArgs a = check_net_args(op, "y0", y0, ck, cv, bias, params, weights_t, heads, rms_eps, ln_eps);
  const PolicyDescent o = policy_descent_options(
      op, normalize, normalize_eps, rule.grad_scale, rule.momentum, rule.nesterov, rule.grad_clip,
      rule.grad_clip_norm, rule.energy_scaled, rule.energy_temperature, rule.tol, tol_scope, rule.tol_final_step,
      rule.bound_each_step, final_energy);
  TORCH_CHECK_VALUE(final_energy || a.K == 1, op, ": final_energy=False needs one candidate; got K = ", a.K);
  auto opt = [](const at::Tensor& t) { return t.defined() ? c10::optional<at::Tensor>(t) : c10::nullopt; };
  const EventOptions ev = event_options(opt(rule.lower), opt(rule.upper), opt(rule.step_clip), a.Tn * a.A,
                                        y0.scalar_type(), y0.device(), op);
  PolicyOneCall out;
  std::tie(out.y, out.E, out.E_init, out.steps, out.status) = run_policy_descent(a, y0, rule.eta, ev, o);
  if (final_energy) {
    std::tie(out.best, out.best_E, out.best_index) =
        select_best_impl(out.y, out.E, out.E_init, out.status, rule.selection);
  } else {  // one candidate: nothing to select, no final energy
    out.E = at::Tensor();
    out.best = out.y.select(1, 0).clone();
    out.best_index = at::zeros({a.B}, out.y.options().dtype(at::kLong));
  }
  return out;
}

TORCH_LIBRARY_IMPL(pyebm, CPU, m) {
  m.impl("ebt_policy_energy_grad", &ebt_policy_energy_grad_cpu);
  m.impl("ebt_policy_descent", &ebt_policy_descent_cpu);
  m.impl("ebt_policy_context", &ebt_policy_context_cpu);
}

}  // namespace cpu
}  // namespace pyebm
