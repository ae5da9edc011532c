// pyebm::ebt_policy_energy_grad: the whole EBT-Policy energy network, forward and input gradient, in one
// CPU call. The observation side (cross-attention keys/values of every layer) comes in precomputed.
// Math: pyebm/reference/ebt_policy.py; layout of the parameter list: pyebm/ops/ebt_policy.py.
//
// Candidates are independent; they are processed in blocks of whole candidates (rows = candidates * T)
// so the linear layers run as one GEMM per block, and blocks run in parallel. Every activation the
// backward pass needs stays in a per-thread scratch buffer; nothing touches autograd or the dispatcher
// inside the network.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <vector>

#include "blas.h"
#include "pyebm/activations.h"
#include "vec_act.h"

TORCH_LIBRARY_FRAGMENT(pyebm, m) {
  // E [B, K] and (need_grad) dE/dy [B, K, T, A] of the EBT-Policy energy; see pyebm/ops/ebt_policy.py.
  m.def(
      "ebt_policy_energy_grad(Tensor y, Tensor ctx_k, Tensor ctx_v, Tensor bias, Tensor[] params, "
      "Tensor[] weights_t, int heads, float rms_eps, float ln_eps, bool need_grad) -> (Tensor, Tensor)");
}

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

  const T* kc(int64_t l, int64_t b, int64_t h) const { return ck + (((l * B + b) * H + h) * hd) * L; }
  const T* vc(int64_t l, int64_t b, int64_t h) const { return cv + (((l * B + b) * H + h) * L) * hd; }
};

// What the backward pass reads, for one block of M = nb * T rows, in one buffer (element offsets).
// Activations are kept after their normalisation (xhat and the inverse RMS r), and GELU inputs are
// kept as the GELU derivative, so the backward pass recomputes nothing.
template <typename T>
struct Saved {
  int64_t M, D, H, Tn, L, nb;
  T* base;
  int64_t layer_elems() const { return 8 * M * D + 3 * M + 3 * M * H + nb * H * Tn * (Tn + L); }
  T* layer(int64_t l) const { return base + embed_elems() + l * layer_elems(); }
  int64_t embed_elems() const { return 3 * M * D + M; }
  // within a layer: xhat and r of the three block norms, q/k after their per-head norm (before the
  // weight) and r, v, the two attention probability tensors, and gelu'(mlp fc1 output) in h1
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

template <typename T>
inline T* scratch(int64_t n) {
  thread_local std::vector<T> buf;
  if (static_cast<int64_t>(buf.size()) < n) buf.resize(static_cast<size_t>(n));
  return buf.data();
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
  for (int64_t j = 0; j < n; ++j) {
    s[j] = std::exp(s[j] - mx);
    sum += s[j];
  }
  const T inv = T(1) / sum;
  for (int64_t j = 0; j < n; ++j) s[j] *= inv;
}

// One block of nb candidates starting at global candidate c0: E[nb] and, if G, dE/dy [nb, T, A].
template <typename T>
PYEBM_INLINE void block_impl(const Net<T>& net, int64_t c0, int64_t nb, const T* y, T* E, T* G) {
  const int64_t Tn = net.Tn, D = net.D, H = net.H, hd = net.hd, L = net.L, A = net.A, O = net.O;
  const int64_t M = nb * Tn;
  const bool grad = G != nullptr;
  Saved<T> sv{M, D, H, Tn, L, nb, nullptr};
  const int64_t n_saved = sv.embed_elems() + net.layers * sv.layer_elems() + 2 * M * D + M;  // + head xnf, hh, rf
  const int64_t n_tmp = M * D /*x*/ + 3 * M * D /*big*/ + M * D /*o*/ + M * D /*dx*/ + M * D /*t2*/ +
                        Tn * std::max(Tn, L) /*dP*/ + M * std::max<int64_t>(O, 1) /*out*/ + hd /*up*/;
  T* buf = scratch<T>(n_saved + n_tmp);
  sv.base = buf;
  T* head_xnf = buf + sv.embed_elems() + net.layers * sv.layer_elems();
  T* head_hh = head_xnf + M * D;
  T* head_rf = head_hh + M * D;
  T* x = buf + n_saved;
  T* big = x + M * D;   // [M, 3D]
  T* o = big + 3 * M * D;
  T* dx = o + M * D;
  T* t2 = dx + M * D;
  T* dP = t2 + M * D;
  T* out = dP + Tn * std::max(Tn, L);
  T* up = out + M * std::max<int64_t>(O, 1);

  // ---- action embedding: Linear -> LayerNorm -> GELU -> Linear -> GELU, + positions ----
  gemm_nt<T>(M, D, A, y, net.w0, big, false);
  add_bias(big, net.b0, M, D);
  for (int64_t i = 0; i < M; ++i) {
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
  gelu_pass(M * D, o, sv.u2());  // sv.u2 keeps gelu'(u2)
  gemm_nt_pk<T>(M, D, D, o, net.w1, net.tw1, x, false);
  add_bias(x, net.b1, M, D);
  gelu_pass(M * D, x, sv.u4());  // sv.u4 keeps gelu'(u4)
  for (int64_t i = 0; i < M; ++i) {
    const T* pos = net.pos + (i % Tn) * D;
    for (int64_t j = 0; j < D; ++j) x[i * D + j] += pos[j];
  }

  // ---- blocks ----
  for (int64_t l = 0; l < net.layers; ++l) {
    const Layer<T>& w = net.lay[l];
    T* p = sv.layer(l);
    T *xn1 = sv.xn1(p), *qh = sv.qh(p), *kh = sv.kh(p), *vv = sv.v(p), *xn2 = sv.xn2(p), *cqh = sv.cqh(p);
    T *xn3 = sv.xn3(p), *h1 = sv.h1(p), *r1 = sv.r1(p), *r2 = sv.r2(p), *r3 = sv.r3(p);
    T *rq = sv.rq(p), *rk = sv.rk(p), *rcq = sv.rcq(p), *Pm = sv.P(p), *Pc = sv.Pc(p);
    // self-attention
    for (int64_t i = 0; i < M; ++i) {
      r1[i] = rms_row(x + i * D, xn1 + i * D, D, net.rms_eps);
      for (int64_t j = 0; j < D; ++j) o[i * D + j] = xn1[i * D + j] * w.n1[j];
    }
    gemm_nt_pk<T>(M, 3 * D, D, o, w.wqkv, w.tqkv, big, false);
    add_bias(big, w.bqkv, M, 3 * D);
    for (int64_t i = 0; i < M; ++i) {
      for (int64_t h = 0; h < H; ++h) {
        rq[i * H + h] = rms_row(big + i * 3 * D + h * hd, qh + i * D + h * hd, hd, net.rms_eps);
        rk[i * H + h] = rms_row(big + i * 3 * D + D + h * hd, kh + i * D + h * hd, hd, net.rms_eps);
      }
      std::copy(big + i * 3 * D + 2 * D, big + i * 3 * D + 3 * D, vv + i * D);
    }
    // big is free again: qs [M, D] = qh * qn * scale, kn [M, D] = kh * kn in its first 2 M*D
    T* qs = big;
    T* knb = big + M * D;
    for (int64_t i = 0; i < M; ++i)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t d = 0; d < hd; ++d) {
          qs[i * D + h * hd + d] = qh[i * D + h * hd + d] * w.qn[d] * net.scale;
          knb[i * D + h * hd + d] = kh[i * D + h * hd + d] * w.kn[d];
        }
    for (int64_t c = 0; c < nb; ++c) {
      const int64_t r0 = c * Tn;
      for (int64_t h = 0; h < H; ++h) {
        T* Pch = Pm + (c * H + h) * Tn * Tn;
        for (int64_t t = 0; t < Tn; ++t) {
          const T* q = qs + (r0 + t) * D + h * hd;
          T* s = Pch + t * Tn;
          for (int64_t u = 0; u < Tn; ++u) {
            const T* k = knb + (r0 + u) * D + h * hd;
            T acc = T(0);
      #pragma omp simd reduction(+ : acc)
            for (int64_t d = 0; d < hd; ++d) acc += q[d] * k[d];
            s[u] = acc;
          }
          softmax_row(s, Tn);
          T* ot = o + (r0 + t) * D + h * hd;
          for (int64_t d = 0; d < hd; ++d) ot[d] = T(0);
          for (int64_t u = 0; u < Tn; ++u) {
            const T pu = s[u];
            const T* vu = vv + (r0 + u) * D + h * hd;
#pragma omp simd
            for (int64_t d = 0; d < hd; ++d) ot[d] += pu * vu[d];
          }
        }
      }
    }
    gemm_nt_pk<T>(M, D, D, o, w.wp, w.tp, x, true);
    add_bias(x, w.bp, M, D);
    // cross-attention to the cached observation keys/values
    for (int64_t i = 0; i < M; ++i) {
      r2[i] = rms_row(x + i * D, xn2 + i * D, D, net.rms_eps);
      for (int64_t j = 0; j < D; ++j) o[i * D + j] = xn2[i * D + j] * w.n2[j];
    }
    gemm_nt_pk<T>(M, D, D, o, w.wxq, w.txq, big, false);
    add_bias(big, w.bxq, M, D);
    for (int64_t i = 0; i < M; ++i)
      for (int64_t h = 0; h < H; ++h)
        rcq[i * H + h] = rms_row(big + i * D + h * hd, cqh + i * D + h * hd, hd, net.rms_eps);
    for (int64_t c = 0; c < nb; ++c) {
      const int64_t r0 = c * Tn;
      const int64_t b = (c0 + c) / net.K;
      for (int64_t h = 0; h < H; ++h) {
        const T* kc = net.kc(l, b, h);  // [hd, L], pre-scaled
        const T* vc = net.vc(l, b, h);  // [L, hd]
        T* Pch = Pc + (c * H + h) * Tn * L;
        for (int64_t t = 0; t < Tn; ++t) {
          const T* q = cqh + (r0 + t) * D + h * hd;
          T* s = Pch + t * L;
          for (int64_t j = 0; j < L; ++j) s[j] = net.bias[t * L + j];
          for (int64_t d = 0; d < hd; ++d) {
            const T qd = q[d] * w.xqn[d];
            const T* kd = kc + d * L;
            for (int64_t j = 0; j < L; ++j) s[j] += qd * kd[j];
          }
          softmax_row(s, L);
          T* ot = o + (r0 + t) * D + h * hd;
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
    gemm_nt_pk<T>(M, D, D, o, w.wxp, w.txp, x, true);
    // MLP
    for (int64_t i = 0; i < M; ++i) {
      r3[i] = rms_row(x + i * D, xn3 + i * D, D, net.rms_eps);
      for (int64_t j = 0; j < D; ++j) o[i * D + j] = xn3[i * D + j] * w.n3[j];
    }
    gemm_nt_pk<T>(M, D, D, o, w.wf1, w.tf1, t2, false);
    add_bias(t2, w.bf1, M, D);
    gelu_pass(M * D, t2, h1);  // h1 keeps gelu'(fc1 output)
    std::swap(o, t2);
    gemm_nt_pk<T>(M, D, D, o, w.wf2, w.tf2, x, true);
    add_bias(x, w.bf2, M, D);
  }

  // ---- head: RMSNorm -> Linear -> GELU -> Linear, mean over (T, O) ----
  for (int64_t i = 0; i < M; ++i) {
    head_rf[i] = rms_row(x + i * D, head_xnf + i * D, D, net.rms_eps);
    for (int64_t j = 0; j < D; ++j) o[i * D + j] = head_xnf[i * D + j] * net.hn[j];
  }
  gemm_nt_pk<T>(M, D, D, o, net.hw1, net.thw1, t2, false);
  add_bias(t2, net.hb1, M, D);
  gelu_pass(M * D, t2, head_hh);  // head_hh keeps gelu'(fc1 output)
  std::swap(o, t2);
  gemm_nt_pk<T>(M, O, D, o, net.hw2, net.thw2, out, false);
  add_bias(out, net.hb2, M, O);
  for (int64_t c = 0; c < nb; ++c) {
    T acc = T(0);
  #pragma omp simd reduction(+ : acc)
    for (int64_t i = c * Tn * O; i < (c + 1) * Tn * O; ++i) acc += out[i];
    E[c] = acc / T(Tn * O);
  }
  if (!grad) return;

  // ---- backward to the candidate ----
  // dE/d gelu(hh) is the same row for every token: the column sums of fc2, / (T * O)
  for (int64_t j = 0; j < D; ++j) {
    T s = T(0);
  #pragma omp simd reduction(+ : s)
    for (int64_t k = 0; k < O; ++k) s += net.hw2[k * D + j];
    t2[j] = s / T(Tn * O);
  }
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < D; ++j) {
      o[i * D + j] = t2[j] * head_hh[i * D + j];
    }
  gemm_nn<T>(M, D, D, o, net.hw1, t2, false);
  for (int64_t i = 0; i < M; ++i) rms_back_row(t2 + i * D, net.hn, head_xnf + i * D, head_rf[i], D, dx + i * D, false);

  for (int64_t l = net.layers - 1; l >= 0; --l) {
    const Layer<T>& w = net.lay[l];
    T* p = sv.layer(l);
    T *xn1 = sv.xn1(p), *qh = sv.qh(p), *kh = sv.kh(p), *vv = sv.v(p), *xn2 = sv.xn2(p), *cqh = sv.cqh(p);
    T *xn3 = sv.xn3(p), *h1 = sv.h1(p), *r1 = sv.r1(p), *r2 = sv.r2(p), *r3 = sv.r3(p);
    T *rq = sv.rq(p), *rk = sv.rk(p), *rcq = sv.rcq(p), *Pm = sv.P(p), *Pc = sv.Pc(p);
    // MLP branch
    gemm_nn<T>(M, D, D, dx, w.wf2, o, false);
    for (int64_t i = 0; i < M * D; ++i) o[i] *= h1[i];
    gemm_nn<T>(M, D, D, o, w.wf1, t2, false);
    for (int64_t i = 0; i < M; ++i) rms_back_row(t2 + i * D, w.n3, xn3 + i * D, r3[i], D, dx + i * D, true);
    // cross-attention branch (keys and values are constants)
    gemm_nn<T>(M, D, D, dx, w.wxp, o, false);  // d(attention output)
    for (int64_t c = 0; c < nb; ++c) {
      const int64_t r0 = c * Tn;
      const int64_t b = (c0 + c) / net.K;
      for (int64_t h = 0; h < H; ++h) {
        const T* kc = net.kc(l, b, h);
        const T* vc = net.vc(l, b, h);
        const T* Pch = Pc + (c * H + h) * Tn * L;
        for (int64_t t = 0; t < Tn; ++t) {
          const T* dot = o + (r0 + t) * D + h * hd;
          const T* pr = Pch + t * L;
          T dotp = T(0);
          for (int64_t j = 0; j < L; ++j) {
            const T* vj = vc + j * hd;
            T acc = T(0);
      #pragma omp simd reduction(+ : acc)
            for (int64_t d = 0; d < hd; ++d) acc += dot[d] * vj[d];
            dP[j] = acc;
            dotp += acc * pr[j];
          }
          for (int64_t j = 0; j < L; ++j) dP[j] = pr[j] * (dP[j] - dotp);  // dS
          T* dq = t2 + (r0 + t) * D + h * hd;  // d(q after its RMSNorm)
          for (int64_t d = 0; d < hd; ++d) {
            const T* kd = kc + d * L;
            T acc = T(0);
      #pragma omp simd reduction(+ : acc)
            for (int64_t j = 0; j < L; ++j) acc += dP[j] * kd[j];
            dq[d] = acc;
          }
        }
      }
    }
    // through the per-head q RMSNorm, into big [M, D]
    for (int64_t i = 0; i < M; ++i)
      for (int64_t h = 0; h < H; ++h)
        rms_back_row(t2 + i * D + h * hd, w.xqn, cqh + i * D + h * hd, rcq[i * H + h], hd, big + i * D + h * hd,
                     false);
    gemm_nn<T>(M, D, D, big, w.wxq, t2, false);
    for (int64_t i = 0; i < M; ++i) rms_back_row(t2 + i * D, w.n2, xn2 + i * D, r2[i], D, dx + i * D, true);
    // self-attention branch
    gemm_nn<T>(M, D, D, dx, w.wp, o, false);  // d(attention output) [M, D]
    T* dqkv = big;  // [M, 3D]: d(q after its norm), d(k after its norm), dv
    const T scale = net.scale;
    const T* __restrict knw = w.kn;
    const T* __restrict qnw = w.qn;
    std::fill(dqkv, dqkv + M * 3 * D, T(0));
    for (int64_t c = 0; c < nb; ++c) {
      const int64_t r0 = c * Tn;
      for (int64_t h = 0; h < H; ++h) {
        const T* Pch = Pm + (c * H + h) * Tn * Tn;
        for (int64_t t = 0; t < Tn; ++t) {
          const T* dot = o + (r0 + t) * D + h * hd;
          const T* pr = Pch + t * Tn;
          T dotp = T(0);
          for (int64_t u = 0; u < Tn; ++u) {
            const T* vu = vv + (r0 + u) * D + h * hd;
            T acc = T(0);
      #pragma omp simd reduction(+ : acc)
            for (int64_t d = 0; d < hd; ++d) acc += dot[d] * vu[d];
            dP[u] = acc;
            dotp += acc * pr[u];
            // dv[u] += p[t, u] * do[t]
            T* dv = dqkv + (r0 + u) * 3 * D + 2 * D + h * hd;
            const T pu = pr[u];
#pragma omp simd
            for (int64_t d = 0; d < hd; ++d) dv[d] += pu * dot[d];
          }
          T* dqn = dqkv + (r0 + t) * 3 * D + h * hd;
          const T* qt = qh + (r0 + t) * D + h * hd;
          for (int64_t u = 0; u < Tn; ++u) {
            const T ds = pr[u] * (dP[u] - dotp) * scale;
            if (ds == T(0)) continue;
            const T* ku = kh + (r0 + u) * D + h * hd;
            T* dkn = dqkv + (r0 + u) * 3 * D + D + h * hd;
            // d(q normed) += dS kn * scale and d(k normed) += dS^T qs (qs = q normed * scale);
            // dqn and dkn never overlap (different thirds of a dqkv row)
#pragma omp simd
            for (int64_t d = 0; d < hd; ++d) dqn[d] += ds * ku[d] * knw[d];
#pragma omp simd
            for (int64_t d = 0; d < hd; ++d) dkn[d] += ds * qt[d] * qnw[d];
          }
        }
      }
    }
    // through the per-head q/k RMSNorms, in place (the upstream gradient is copied out first)
    for (int64_t i = 0; i < M; ++i)
      for (int64_t h = 0; h < H; ++h) {
        T* dq = dqkv + i * 3 * D + h * hd;
        T* dk = dqkv + i * 3 * D + D + h * hd;
        std::copy(dq, dq + hd, up);
        rms_back_row(up, w.qn, qh + i * D + h * hd, rq[i * H + h], hd, dq, false);
        std::copy(dk, dk + hd, up);
        rms_back_row(up, w.kn, kh + i * D + h * hd, rk[i * H + h], hd, dk, false);
      }
    gemm_nn<T>(M, 3 * D, D, dqkv, w.wqkv, t2, false);
    for (int64_t i = 0; i < M; ++i) rms_back_row(t2 + i * D, w.n1, xn1 + i * D, r1[i], D, dx + i * D, true);
  }

  // ---- embedding backward ----
  for (int64_t i = 0; i < M * D; ++i) o[i] = dx[i] * sv.u4()[i];
  gemm_nn<T>(M, D, D, o, net.w1, t2, false);
  for (int64_t i = 0; i < M; ++i) {
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
  gemm_nn<T>(M, D, A, o, net.w0, G, false);
}

// The block compiled twice: for the baseline ISA and for AVX2 + FMA (chosen at run time), so the
// reductions and elementwise passes are 8 lanes wide where the CPU allows.
template <typename T>
void block_base(const Net<T>& net, int64_t c0, int64_t nb, const T* y, T* E, T* G) {
  block_impl<T>(net, c0, nb, y, E, G);
}
#if defined(__x86_64__) && defined(__GNUC__)
template <typename T>
__attribute__((target("avx2,fma"))) void block_avx2(const Net<T>& net, int64_t c0, int64_t nb, const T* y, T* E,
                                                   T* G) {
  block_impl<T>(net, c0, nb, y, E, G);
}
#endif

template <typename T>
void block(const Net<T>& net, int64_t c0, int64_t nb, const T* y, T* E, T* G) {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (avx2) return block_avx2<T>(net, c0, nb, y, E, G);
#endif
  block_base<T>(net, c0, nb, y, E, G);
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

void check_same(const at::Tensor& t, const char* name, const at::Tensor& y) {
  TORCH_CHECK(t.device() == y.device(), "pyebm: ", name, " is on ", t.device(), " but y is on ", y.device());
  TORCH_CHECK(t.scalar_type() == y.scalar_type(), "pyebm: ", name, " has dtype ", t.scalar_type(),
              " but y has dtype ", y.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> ebt_policy_energy_grad_cpu(const at::Tensor& y_, const at::Tensor& ck_,
                                                              const at::Tensor& cv_, const at::Tensor& bias_,
                                                              at::TensorList params_, at::TensorList weights_t_,
                                                              int64_t heads, double rms_eps, double ln_eps,
                                                              bool need_grad) {
  TORCH_CHECK(y_.dim() == 4, "pyebm: y must be [B, K, T, A]; got shape ", y_.sizes());
  TORCH_CHECK(y_.scalar_type() == at::kFloat || y_.scalar_type() == at::kDouble,
              "pyebm: ebt_policy_energy_grad takes float32 or float64; got ", y_.scalar_type());
  TORCH_CHECK(y_.device().is_cpu(), "pyebm: the cpu kernel needs CPU tensors; got y on ", y_.device());
  TORCH_CHECK(heads >= 1, "pyebm: heads must be >= 1; got ", heads);
  const int64_t B = y_.size(0), K = y_.size(1), Tn = y_.size(2), A = y_.size(3);
  TORCH_CHECK(params_.size() >= static_cast<size_t>(kEmbed + kHead) &&
                  (params_.size() - kEmbed - kHead) % kPerLayer == 0,
              "pyebm: params must hold ", kEmbed, " + ", kPerLayer, " * layers + ", kHead, " tensors; got ",
              params_.size());
  const int64_t layers = static_cast<int64_t>((params_.size() - kEmbed - kHead) / kPerLayer);
  auto prep = [](const at::Tensor& t) { return t.is_contiguous() ? t : t.contiguous(); };
  const at::Tensor y = prep(y_), ck = prep(ck_), cv = prep(cv_), bias = prep(bias_);
  std::vector<at::Tensor> ps;
  ps.reserve(params_.size());
  for (const auto& t : params_) {
    check_same(t, "params[]", y);
    ps.push_back(prep(t));
  }
  check_same(ck, "ctx_k", y);
  check_same(cv, "ctx_v", y);
  check_same(bias, "bias", y);
  const int64_t D = ps[0].size(0);
  TORCH_CHECK(ps[0].dim() == 2 && ps[0].size(1) == A, "pyebm: params[0] (action embedding) must be [D, ", A,
              "]; got ", ps[0].sizes());
  TORCH_CHECK(D % heads == 0, "pyebm: width ", D, " is not divisible by heads ", heads);
  const int64_t hd = D / heads;
  TORCH_CHECK(ps[6].dim() == 2 && ps[6].size(0) == Tn && ps[6].size(1) == D, "pyebm: params[6] (positions) must be [",
              Tn, ", ", D, "]; got ", ps[6].sizes());
  TORCH_CHECK(ck.dim() == 5 && ck.size(0) == layers && ck.size(1) == B && ck.size(2) == heads && ck.size(3) == hd,
              "pyebm: ctx_k must be [layers=", layers, ", B=", B, ", H=", heads, ", hd=", hd, ", L]; got ", ck.sizes());
  const int64_t L = ck.size(4);
  TORCH_CHECK(cv.dim() == 5 && cv.size(0) == layers && cv.size(1) == B && cv.size(2) == heads && cv.size(3) == L &&
                  cv.size(4) == hd,
              "pyebm: ctx_v must be [", layers, ", ", B, ", ", heads, ", ", L, ", ", hd, "]; got ", cv.sizes());
  TORCH_CHECK(bias.dim() == 2 && bias.size(0) == Tn && bias.size(1) == L, "pyebm: bias must be [", Tn, ", ", L,
              "]; got ", bias.sizes());
  const at::Tensor& hw2 = ps[kEmbed + kPerLayer * layers + 3];
  TORCH_CHECK(hw2.dim() == 2 && hw2.size(1) == D, "pyebm: head fc2 weight must be [O, ", D, "]; got ", hw2.sizes());
  const int64_t O = hw2.size(0);
  // shapes of the per-layer weights (a wrong list order shows up here, not as garbage)
  const int64_t expect_numel[kPerLayer] = {D, 3 * D * D, 3 * D, hd, hd, D * D, D, D, D * D, D, hd, D * D, D, D * D,
                                           D, D * D, D};
  for (int64_t l = 0; l < layers; ++l)
    for (int j = 0; j < kPerLayer; ++j)
      TORCH_CHECK(ps[kEmbed + kPerLayer * l + j].numel() == expect_numel[j], "pyebm: params[",
                  kEmbed + kPerLayer * l + j, "] (layer ", l, ", slot ", j, ") has ",
                  ps[kEmbed + kPerLayer * l + j].numel(), " elements; expected ", expect_numel[j]);

  // optional transposed weights: embed fc2, per layer (qkv, proj, cross q, cross proj, fc1, fc2), head fc1, fc2
  const int64_t n_t = 1 + 6 * layers + 2;
  TORCH_CHECK(weights_t_.empty() || static_cast<int64_t>(weights_t_.size()) == n_t,
              "pyebm: weights_t must be empty or hold 1 + 6 * layers + 2 = ", n_t, " tensors; got ", weights_t_.size());
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
      check_same(t, "weights_t[]", y);
      TORCH_CHECK(t.dim() == 2 && w.dim() == 2 && t.size(0) == w.size(1) && t.size(1) == w.size(0),
                  "pyebm: weights_t[", i, "] must be the transpose of params[", src[i], "] ", w.sizes(), "; got ",
                  t.sizes());
      wt.push_back(prep(t));
    }
  }

  at::Tensor E = at::empty({B, K}, y.options());
  at::Tensor G = need_grad ? at::empty({B, K, Tn, A}, y.options()) : at::empty({0}, y.options());
  const int64_t N = B * K;
  if (N == 0) return {E, G};
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "pyebm_ebt_policy", [&] {
    using T = scalar_t;
    Net<T> net;
    net.A = A, net.Tn = Tn, net.D = D, net.H = heads, net.hd = hd, net.L = L, net.O = O, net.layers = layers;
    net.K = K, net.B = B;
    net.scale = T(1) / std::sqrt(T(hd));
    net.rms_eps = T(rms_eps), net.ln_eps = T(ln_eps);
    auto P = [&](int64_t i) { return ps[i].data_ptr<T>(); };
    net.w0 = P(0), net.b0 = P(1), net.lnw = P(2), net.lnb = P(3), net.w1 = P(4), net.b1 = P(5), net.pos = P(6);
    for (int64_t l = 0; l < layers; ++l) {
      const int64_t o = kEmbed + kPerLayer * l;
      net.lay.push_back(Layer<T>{P(o), P(o + 1), P(o + 2), P(o + 3), P(o + 4), P(o + 5), P(o + 6), P(o + 7),
                                 P(o + 8), P(o + 9), P(o + 10), P(o + 11), P(o + 12), P(o + 13), P(o + 14),
                                 P(o + 15), P(o + 16)});
    }
    const int64_t h0 = kEmbed + kPerLayer * layers;
    net.hn = P(h0), net.hw1 = P(h0 + 1), net.hb1 = P(h0 + 2), net.hw2 = P(h0 + 3), net.hb2 = P(h0 + 4);
    if (!wt.empty()) {
      auto W = [&](int64_t i) { return wt[i].data_ptr<T>(); };
      net.tw1 = W(0);
      for (int64_t l = 0; l < layers; ++l) {
        Layer<T>& ly = net.lay[l];
        ly.tqkv = W(1 + 6 * l), ly.tp = W(2 + 6 * l), ly.txq = W(3 + 6 * l);
        ly.txp = W(4 + 6 * l), ly.tf1 = W(5 + 6 * l), ly.tf2 = W(6 + 6 * l);
      }
      net.thw1 = W(1 + 6 * layers), net.thw2 = W(2 + 6 * layers);
    }
    net.ck = ck.data_ptr<T>(), net.cv = cv.data_ptr<T>(), net.bias = bias.data_ptr<T>();
    const T* yp = y.data_ptr<T>();
    T* Ep = E.data_ptr<T>();
    T* Gp = need_grad ? G.data_ptr<T>() : nullptr;
    // candidates per block: about block_rows() rows for the GEMMs; blocks run in parallel
    const int64_t nb = std::max<int64_t>(1, block_rows() / std::max<int64_t>(1, Tn));
    const int64_t nblocks = (N + nb - 1) / nb;
    auto body = [&](int64_t b0, int64_t b1) {
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t c0 = blk * nb;
        const int64_t m = std::min(nb, N - c0);
        block<T>(net, c0, m, yp + c0 * Tn * A, Ep + c0, Gp ? Gp + c0 * Tn * A : nullptr);
      }
    };
    if (nblocks == 1)
      body(0, 1);
    else
      at::parallel_for(0, nblocks, 1, body);
  });
  return {E, G};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyebm, CPU, m) { m.impl("ebt_policy_energy_grad", &ebt_policy_energy_grad_cpu); }

}  // namespace cpu
}  // namespace pyebm
