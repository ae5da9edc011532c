// The per-layer steps of EBT's prediction rows on the CPU, between the rows_linear products: each replaces a
// dozen or more small ATen ops (and their Python calls) of pyebm/models/ebt.py by one pass over a few rows.
//
//   ebt_rows_attention(qkv, k_ctx, v_ctx, cos, sin, n_visible) -> (o, lse)
//       qkv [B, R, 3, H, hd]: the rows' q|k|v straight from the W_qkv product, before RoPE (q carries the
//       1/sqrt(hd) factor). Row r of prompt b attends, in one softmax, to the first n_visible[b, r] entries of
//       the cached context k_ctx / v_ctx [B, H, T, hd] (any strides; n_visible None: all T, values outside
//       [0, T] are clamped, as pyebm.reference.ebt.prediction_attention reads them) and to its own key and
//       value. RoPE (the tables cos / sin [R, hd] of pyebm.models.ebt, sin signed per pair) is applied to q and
//       to the row's own key on the fly. o [B, R, H * hd] is laid out for the W_o product; lse [B, H, R] is
//       the softmax's log normaliser (what the backward needs).
//   ebt_rows_attention_bwd(do, qkv, k_ctx, v_ctx, o, lse, cos, sin, n_visible) -> dqkv [B, R, 3, H, hd]
//       the gradient with respect to qkv (before RoPE: the inverse rotation is applied), laid out for the
//       input-gradient product of W_qkv. The cache gets no gradient.
//   ebt_rows_rms_norm(x [M, D], eps) -> (xn, r [M, 1]);  ebt_rows_rms_norm_bwd(xn, r, g, add) -> add + dx
//   ebt_rows_swiglu(uz [M, 2F]) -> silu(u) * z;  ebt_rows_swiglu_bwd(dm, uz) -> d(uz)
//
// The math is pyebm.reference.ebt (prediction_attention, the RMSNorm without weight, the SwiGLU gate), except
// that a row with a non-finite score gives NaN where the reference's nan_to_num gives 0 (as the model's ATen
// path does); float32 only. The kernels need GCC / Clang vector extensions: elsewhere the ops have no CPU
// kernel, and pyebm._dispatch.ebt_rows_steps (which asks the dispatcher) keeps EBT on ATen ops. The attention splits the (prompt, head) pairs between the intra-op threads; each pair is computed the
// same way whatever the split, so every thread count gives the same numbers. Inference ops: no autograd
// formula (op_autograd.cpp raises when an input requires grad in grad mode). Compiled for AVX-512, AVX2+FMA
// and the baseline ISA (GCC vector extensions, as vec_act.h); cpu_vec_level() chooses at run time.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "op_checks.h"
#include "vec_act.h"

namespace pyebm {
namespace cpu {

#ifdef PYEBM_VEC_ACT
namespace {

using checks::Arg;

// Rows of the prediction block handled together (they share every load of the cache).
constexpr int kRowBlock = 4;

struct AttnArgs {
  int64_t B, H, R, T, hd;
  const float* qkv;                  // [B, R, 3, H, hd]
  const float* k;                    // k_ctx, strides kb, kh, kt (unit last)
  const float* v;                    // v_ctx, strides vb, vh, vt
  int64_t kb, kh, kt, vb, vh, vt;
  const float* cos;                  // [R, hd]
  const float* sin;                  // [R, hd]
  const int64_t* nv;                 // n_visible[b * nvb + r]; null: all T
  int64_t nvb;
  float* o;                          // forward: [B, R, H * hd]; backward: the forward's o (read)
  float* lse;                        // [B, H, R]
  const float* dout;                 // backward: [B, R, H * hd]
  float* dqkv;                       // backward: [B, R, 3, H, hd]
};

template <typename V>
PYEBM_AI float vsum(V v) {
  constexpr int W = sizeof(V) / sizeof(float);
  float s = 0.0f;
  for (int i = 0; i < W; ++i) s += v[i];
  return s;
}

// out = rope(x) with the tables of one row: out[2i] = x[2i] c[2i] + x[2i+1] s[2i], out[2i+1] = x[2i+1] c[2i+1]
// + x[2i] s[2i+1]; inverse=true applies the transposed rotation (the gradient).
PYEBM_AI void rope(const float* x, const float* c, const float* s, float* out, int64_t hd, bool inverse) {
  for (int64_t i = 0; i < hd; i += 2) {
    const float x0 = x[i], x1 = x[i + 1];
    if (inverse) {
      out[i] = x0 * c[i] + x1 * s[i + 1];
      out[i + 1] = x1 * c[i + 1] + x0 * s[i];
    } else {
      out[i] = x0 * c[i] + x1 * s[i];
      out[i + 1] = x1 * c[i + 1] + x0 * s[i + 1];
    }
  }
}

template <typename V>
PYEBM_AI float dot(const float* a, const float* b, int64_t n) {
  constexpr int W = sizeof(V) / sizeof(float);
  V acc = V{};
  int64_t d = 0;
  for (; d + W <= n; d += W) acc += vload<V>(a + d) * vload<V>(b + d);
  float t = vsum<V>(acc);
  for (; d < n; ++d) t += a[d] * b[d];
  return t;
}

// s[r][j] = x[r] . base[j * stride] for j < n (rows of hd floats), NR rows sharing every base load.
template <typename V, int NR>
PYEBM_AI void dots(const float* const* x, const float* base, int64_t stride, int64_t n, int64_t hd, float* const* s) {
  constexpr int W = sizeof(V) / sizeof(float);
  const int64_t hv = hd / W * W;
  for (int64_t j = 0; j < n; ++j) {
    const float* bj = base + j * stride;
    V acc[NR];
    for (int r = 0; r < NR; ++r) acc[r] = V{};
    for (int64_t d = 0; d < hv; d += W) {
      const V bv = vload<V>(bj + d);
      for (int r = 0; r < NR; ++r) acc[r] += vload<V>(x[r] + d) * bv;
    }
    for (int r = 0; r < NR; ++r) {
      float t = vsum<V>(acc[r]);
      for (int64_t d = hv; d < hd; ++d) t += x[r][d] * bj[d];
      s[r][j] = t;
    }
  }
}

// out[r] = sum_j p[r][j] base[j * stride] for j < n (NR rows; out overwritten), two vectors of columns at a time.
template <typename V, int NR>
PYEBM_AI void combine(const float* const* p, const float* base, int64_t stride, int64_t n, int64_t hd,
                      float* const* out) {
  constexpr int W = sizeof(V) / sizeof(float);
  int64_t d0 = 0;
  for (; d0 + 2 * W <= hd; d0 += 2 * W) {
    V a0[NR], a1[NR];
    for (int r = 0; r < NR; ++r) a0[r] = a1[r] = V{};
    for (int64_t j = 0; j < n; ++j) {
      const float* bj = base + j * stride + d0;
      const V b0 = vload<V>(bj), b1 = vload<V>(bj + W);
      for (int r = 0; r < NR; ++r) {
        const V pr = vsplat<V>(p[r][j]);
        a0[r] += pr * b0;
        a1[r] += pr * b1;
      }
    }
    for (int r = 0; r < NR; ++r) {
      vstore<V>(out[r] + d0, a0[r]);
      vstore<V>(out[r] + d0 + W, a1[r]);
    }
  }
  for (; d0 < hd; ++d0) {
    for (int r = 0; r < NR; ++r) {
      float t = 0.0f;
      for (int64_t j = 0; j < n; ++j) t += p[r][j] * base[j * stride + d0];
      out[r][d0] = t;
    }
  }
}

// p[j] = exp(s[j] - m) for j < n, in place; returns the sum.
template <typename V>
PYEBM_AI float exp_shift(float* s, int64_t n, float m) {
  constexpr int W = sizeof(V) / sizeof(float);
  V acc = V{};
  int64_t j = 0;
  const V mv = vsplat<V>(m);
  for (; j + W <= n; j += W) {
    const V e = vexp<V>(vload<V>(s + j) - mv);
    vstore<V>(s + j, e);
    acc += e;
  }
  float l = vsum<V>(acc);
  for (; j < n; ++j) {
    V e = vexp<V>(vsplat<V>(s[j] - m));
    s[j] = e[0];
    l += s[j];
  }
  return l;
}

// The context entries row r of prompt b sees: n_visible clamped to [0, T] (as the reference reads it).
inline int64_t visible(const AttnArgs& a, int64_t b, int64_t r) {
  return a.nv == nullptr ? a.T : std::min(std::max<int64_t>(a.nv[b * a.nvb + r], 0), a.T);
}

// The rows [r0, r0 + NR) of prompt b, head h: q and the own key after RoPE (in the first 2 NR hd floats of
// scratch), the self scores q . k, what each row sees, and the cache of the pair.
template <int NR>
struct RowBlock {
  float* qr[NR];
  float* kr[NR];
  const float* qkv[NR];  // the row's q of this head in qkv (k at + D, v at + 2 D)
  float sself[NR];
  int64_t nv[NR];
  int64_t n;             // the most any row of the block sees
  const float* K;
  const float* V;
};

template <typename V, int NR>
PYEBM_AI void load_block(const AttnArgs& a, int64_t b, int64_t h, int64_t r0, float* scratch, RowBlock<NR>& blk) {
  const int64_t hd = a.hd, D = a.H * hd;
  blk.n = 0;
  for (int r = 0; r < NR; ++r) {
    blk.qr[r] = scratch + r * hd;
    blk.kr[r] = scratch + (NR + r) * hd;
    const int64_t row = r0 + r;
    blk.qkv[r] = a.qkv + (b * a.R + row) * 3 * D + h * hd;
    rope(blk.qkv[r], a.cos + row * hd, a.sin + row * hd, blk.qr[r], hd, false);
    rope(blk.qkv[r] + D, a.cos + row * hd, a.sin + row * hd, blk.kr[r], hd, false);
    blk.sself[r] = dot<V>(blk.qr[r], blk.kr[r], hd);
    blk.nv[r] = visible(a, b, row);
    blk.n = std::max(blk.n, blk.nv[r]);
  }
  blk.K = a.k + b * a.kb + h * a.kh;
  blk.V = a.v + b * a.vb + h * a.vh;
}

template <typename V, int NR>
PYEBM_AI void attn_fwd_block(const AttnArgs& a, int64_t b, int64_t h, int64_t r0, float* scratch) {
  const int64_t hd = a.hd, T = a.T, D = a.H * hd;
  RowBlock<NR> blk;
  load_block<V, NR>(a, b, h, r0, scratch, blk);
  const int64_t n = blk.n;
  const int64_t* nv = blk.nv;
  const float* ss = blk.sself;
  float* s[NR];
  float* out[NR];
  for (int r = 0; r < NR; ++r) {
    s[r] = scratch + 2 * NR * hd + r * T;
    out[r] = a.o + (b * a.R + r0 + r) * D + h * hd;
  }
  dots<V, NR>(blk.qr, blk.K, a.kt, n, hd, s);
  float pself[NR];
  for (int r = 0; r < NR; ++r) {
    const float ninf = -std::numeric_limits<float>::infinity();
    for (int64_t j = nv[r]; j < n; ++j) s[r][j] = ninf;
    float m = ss[r];
    for (int64_t j = 0; j < nv[r]; ++j) m = std::max(m, s[r][j]);
    if (std::isnan(ss[r])) m = ss[r];
    float l = exp_shift<V>(s[r], n, m);
    V e = vexp<V>(vsplat<V>(ss[r] - m));
    pself[r] = e[0];
    l += pself[r];
    const float inv = 1.0f / l;
    for (int64_t j = 0; j < n; ++j) s[r][j] *= inv;
    pself[r] *= inv;
    a.lse[(b * a.H + h) * a.R + r0 + r] = m + std::log(l);
  }
  combine<V, NR>(s, blk.V, a.vt, n, hd, out);
  for (int r = 0; r < NR; ++r) {
    const float* vs = blk.qkv[r] + 2 * D;
    for (int64_t d = 0; d < hd; ++d) out[r][d] += pself[r] * vs[d];
  }
}

template <typename V, int NR>
PYEBM_AI void attn_bwd_block(const AttnArgs& a, int64_t b, int64_t h, int64_t r0, float* scratch) {
  const int64_t hd = a.hd, T = a.T, D = a.H * hd;
  RowBlock<NR> blk;
  load_block<V, NR>(a, b, h, r0, scratch, blk);
  const int64_t n = blk.n;
  const int64_t* nv = blk.nv;
  float** qr = blk.qr;
  float** kr = blk.kr;
  float* s[NR];
  float* dp[NR];
  float* dq[NR];
  const float* dor[NR];
  float dpself[NR], lse[NR], delta[NR];
  for (int r = 0; r < NR; ++r) {
    const int64_t row = r0 + r;
    dq[r] = scratch + (2 * NR + r) * hd;
    s[r] = scratch + 3 * NR * hd + r * T;
    dp[r] = scratch + 3 * NR * hd + (NR + r) * T;
    dor[r] = a.dout + (b * a.R + row) * D + h * hd;
    dpself[r] = dot<V>(dor[r], blk.qkv[r] + 2 * D, hd);
    delta[r] = dot<V>(dor[r], a.o + (b * a.R + row) * D + h * hd, hd);
    lse[r] = a.lse[(b * a.H + h) * a.R + row];
  }
  const float* K = blk.K;
  dots<V, NR>(qr, K, a.kt, n, hd, s);
  dots<V, NR>(dor, blk.V, a.vt, n, hd, dp);
  float dsself[NR], pself[NR];
  for (int r = 0; r < NR; ++r) {
    // dS_j = P_j (dP_j - delta), P_j = exp(s_j - lse); entries a row does not see get 0.
    const float ninf = -std::numeric_limits<float>::infinity();
    for (int64_t j = nv[r]; j < n; ++j) s[r][j] = ninf;
    exp_shift<V>(s[r], n, lse[r]);
    for (int64_t j = 0; j < n; ++j) s[r][j] *= dp[r][j] - delta[r];
    V e = vexp<V>(vsplat<V>(blk.sself[r] - lse[r]));
    pself[r] = e[0];
    dsself[r] = pself[r] * (dpself[r] - delta[r]);
  }
  combine<V, NR>(s, K, a.kt, n, hd, dq);
  float* tmp = scratch + 3 * NR * hd + 2 * NR * T;
  for (int r = 0; r < NR; ++r) {
    const int64_t row = r0 + r;
    const float* c = a.cos + row * hd;
    const float* sn = a.sin + row * hd;
    float* g = a.dqkv + (b * a.R + row) * 3 * D + h * hd;
    for (int64_t d = 0; d < hd; ++d) tmp[d] = dq[r][d] + dsself[r] * kr[r][d];
    rope(tmp, c, sn, g, hd, true);
    for (int64_t d = 0; d < hd; ++d) tmp[d] = dsself[r] * qr[r][d];
    rope(tmp, c, sn, g + D, hd, true);
    for (int64_t d = 0; d < hd; ++d) g[2 * D + d] = pself[r] * dor[r][d];
  }
}

// Every row block of the (prompt, head) pairs [i0, i1).
template <typename V, bool Bwd>
PYEBM_AI void attn_pairs(const AttnArgs& a, int64_t i0, int64_t i1) {
  const int64_t per = Bwd ? (3 * kRowBlock * a.hd + 2 * kRowBlock * a.T + a.hd) : (2 * kRowBlock * a.hd + kRowBlock * a.T);
  std::vector<float> scratch(static_cast<size_t>(per));
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t b = i / a.H, h = i % a.H;
    for (int64_t r0 = 0; r0 < a.R; r0 += kRowBlock) {
      const int64_t nr = std::min<int64_t>(kRowBlock, a.R - r0);
#define PYEBM_ATTN_BLOCK(NR)                                                     \
  if (Bwd) attn_bwd_block<V, NR>(a, b, h, r0, scratch.data());                   \
  else attn_fwd_block<V, NR>(a, b, h, r0, scratch.data());
      if (nr == 4) {
        PYEBM_ATTN_BLOCK(4)
      } else if (nr == 3) {
        PYEBM_ATTN_BLOCK(3)
      } else if (nr == 2) {
        PYEBM_ATTN_BLOCK(2)
      } else {
        PYEBM_ATTN_BLOCK(1)
      }
#undef PYEBM_ATTN_BLOCK
    }
  }
}

// RMSNorm without weight over rows of D: xn = x r, r = 1 / sqrt(mean(x^2) + eps).
template <typename V>
PYEBM_AI void rms_rows(int64_t M, int64_t D, const float* x, float* xn, float* r, float eps) {
  for (int64_t i = 0; i < M; ++i) {
    const float* xi = x + i * D;
    const float ri = 1.0f / std::sqrt(dot<V>(xi, xi, D) / static_cast<float>(D) + eps);
    r[i] = ri;
    float* yi = xn + i * D;
    for (int64_t d = 0; d < D; ++d) yi[d] = xi[d] * ri;
  }
}

// out = add + r (g - xn mean(xn g)); g is [M, D] (ldg = D) or one row for every row (ldg = 0).
template <typename V>
PYEBM_AI void rms_bwd_rows(int64_t M, int64_t D, const float* xn, const float* r, const float* g, int64_t ldg,
                           const float* add, float* out) {
  for (int64_t i = 0; i < M; ++i) {
    const float* xi = xn + i * D;
    const float* gi = g + i * ldg;
    const float mean = dot<V>(xi, gi, D) / static_cast<float>(D);
    const float ri = r[i];
    float* oi = out + i * D;
    if (add != nullptr) {
      const float* ai = add + i * D;
      for (int64_t d = 0; d < D; ++d) oi[d] = ai[d] + ri * (gi[d] - xi[d] * mean);
    } else {
      for (int64_t d = 0; d < D; ++d) oi[d] = ri * (gi[d] - xi[d] * mean);
    }
  }
}

// m = silu(u) z for uz = [u | z] rows of 2F; with dm: duz = [dm z silu'(u) | dm silu(u)].
template <typename V, bool Bwd>
PYEBM_AI void swiglu_rows(int64_t M, int64_t F, const float* uz, const float* dm, float* out) {
  constexpr int W = sizeof(V) / sizeof(float);
  for (int64_t i = 0; i < M; ++i) {
    const float* u = uz + i * 2 * F;
    const float* z = u + F;
    int64_t f = 0;
    for (; f < F; f += W) {
      const bool full = f + W <= F;
      V uv, zv, dv = V{};
      if (full) {
        uv = vload<V>(u + f);
        zv = vload<V>(z + f);
        if (Bwd) dv = vload<V>(dm + i * F + f);
      } else {
        uv = zv = V{};
        for (int64_t t = 0; f + t < F; ++t) {
          uv[t] = u[f + t];
          zv[t] = z[f + t];
          if (Bwd) dv[t] = dm[i * F + f + t];
        }
      }
      const V sg = 1.0f / (1.0f + vexp<V>(-uv));
      if (Bwd) {
        const V du = dv * zv * sg * (1.0f + uv * (1.0f - sg));
        const V dz = dv * uv * sg;
        float* o = out + i * 2 * F;
        if (full) {
          vstore<V>(o + f, du);
          vstore<V>(o + F + f, dz);
        } else {
          for (int64_t t = 0; f + t < F; ++t) {
            o[f + t] = du[t];
            o[F + f + t] = dz[t];
          }
        }
      } else {
        const V mv = uv * sg * zv;
        float* o = out + i * F;
        if (full) {
          vstore<V>(o + f, mv);
        } else {
          for (int64_t t = 0; f + t < F; ++t) o[f + t] = mv[t];
        }
      }
    }
  }
}

#define PYEBM_DEFINE_EBT_ROWS(SUFFIX, ATTR, V)                                                                \
  ATTR void attn_fwd_##SUFFIX(const AttnArgs& a, int64_t i0, int64_t i1) { attn_pairs<V, false>(a, i0, i1); } \
  ATTR void attn_bwd_##SUFFIX(const AttnArgs& a, int64_t i0, int64_t i1) { attn_pairs<V, true>(a, i0, i1); }  \
  ATTR void rms_##SUFFIX(int64_t M, int64_t D, const float* x, float* xn, float* r, float eps) {               \
    rms_rows<V>(M, D, x, xn, r, eps);                                                                           \
  }                                                                                                             \
  ATTR void rms_bwd_##SUFFIX(int64_t M, int64_t D, const float* xn, const float* r, const float* g,            \
                             int64_t ldg, const float* add, float* out) {                                       \
    rms_bwd_rows<V>(M, D, xn, r, g, ldg, add, out);                                                             \
  }                                                                                                             \
  ATTR void swiglu_##SUFFIX(int64_t M, int64_t F, const float* uz, const float* dm, float* out) {              \
    if (dm != nullptr) swiglu_rows<V, true>(M, F, uz, dm, out);                                                 \
    else swiglu_rows<V, false>(M, F, uz, dm, out);                                                              \
  }

PYEBM_DEFINE_EBT_ROWS(base, , v8f)
#if defined(__x86_64__)
PYEBM_DEFINE_EBT_ROWS(avx2, __attribute__((target("avx2,fma"))), v8f)
PYEBM_DEFINE_EBT_ROWS(avx512, __attribute__((target("avx512f,avx512dq,avx2,fma"))), v16f)
#define PYEBM_EBT_ROWS_CALL(NAME, ...)                             \
  do {                                                             \
    const int level = cpu_vec_level();                             \
    if (level >= kIsaAvx512) NAME##_avx512(__VA_ARGS__);           \
    else if (level >= kIsaAvx2) NAME##_avx2(__VA_ARGS__);          \
    else NAME##_base(__VA_ARGS__);                                 \
  } while (0)
#else
#define PYEBM_EBT_ROWS_CALL(NAME, ...) NAME##_base(__VA_ARGS__)
#endif
#undef PYEBM_DEFINE_EBT_ROWS

// -- argument checks ----------------------------------------------------------------------------------------

void f32(const char* op, const char* name, const at::Tensor& t) {
  checks::dense(op, Arg{name}, t);
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32 (the CPU kernel); got ",
                   checks::describe(t));
  TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": the cpu kernel needs CPU tensors; got ", name, " on ", t.device());
}

// A tensor whose last axis is unit-stride (other strides as given).
at::Tensor unit_last(const at::Tensor& t) { return t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous(); }

struct AttnInputs {
  at::Tensor qkv, k, v, cos, sin, nv;
  int64_t B, H, R, T, hd, nvb;
};

AttnInputs attention_inputs(const char* op, const at::Tensor& qkv, const at::Tensor& k_ctx, const at::Tensor& v_ctx,
                            const at::Tensor& cos, const at::Tensor& sin, const c10::optional<at::Tensor>& n_visible) {
  f32(op, "qkv", qkv);
  TORCH_CHECK_VALUE(qkv.dim() == 5 && qkv.size(2) == 3, op, ": qkv must be [B, R, 3, H, head_dim]; got ",
                    checks::describe(qkv));
  AttnInputs in;
  in.B = qkv.size(0);
  in.R = qkv.size(1);
  in.H = qkv.size(3);
  in.hd = qkv.size(4);
  TORCH_CHECK_VALUE(in.hd % 2 == 0, op, ": head_dim must be even (RoPE rotates pairs); got ", in.hd);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"k_ctx", k_ctx}, {"v_ctx", v_ctx}}) {
    f32(op, name, t);
    TORCH_CHECK_VALUE(t.dim() == 4 && t.size(0) == in.B && t.size(1) == in.H && t.size(3) == in.hd &&
                          t.size(2) == k_ctx.size(2),
                      op, ": ", name, " must be [B=", in.B, ", H=", in.H, ", T, head_dim=", in.hd,
                      "] (same T for both); got ", checks::describe(t));
  }
  in.T = k_ctx.size(2);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"cos", cos}, {"sin", sin}}) {
    f32(op, name, t);
    checks::shape(op, Arg{name}, t, {in.R, in.hd}, "[R, head_dim]");
  }
  in.qkv = qkv.contiguous();
  in.k = unit_last(k_ctx);
  in.v = unit_last(v_ctx);
  in.cos = cos.contiguous();
  in.sin = sin.contiguous();
  in.nvb = 0;
  if (n_visible.has_value()) {
    const at::Tensor& nv = *n_visible;
    checks::dense(op, Arg{"n_visible"}, nv);
    TORCH_CHECK_TYPE(at::isIntegralType(nv.scalar_type(), /*includeBool=*/false), op,
                     ": n_visible must be an integer tensor; got ", checks::describe(nv));
    TORCH_CHECK_VALUE(nv.device().is_cpu(), op, ": n_visible must be on the cpu; got ", checks::describe(nv));
    TORCH_CHECK_VALUE((nv.dim() == 1 && nv.size(0) == in.R) || (nv.dim() == 2 && nv.size(0) == in.B && nv.size(1) == in.R),
                      op, ": n_visible must be [R=", in.R, "] or [B=", in.B, ", R=", in.R, "]; got ",
                      checks::describe(nv));
    in.nv = nv.to(at::kLong).contiguous();
    in.nvb = nv.dim() == 2 ? in.R : 0;
  }
  return in;
}

AttnArgs attn_args(const AttnInputs& in) {
  AttnArgs a{};
  a.B = in.B;
  a.H = in.H;
  a.R = in.R;
  a.T = in.T;
  a.hd = in.hd;
  a.qkv = in.qkv.data_ptr<float>();
  a.k = in.k.data_ptr<float>();
  a.v = in.v.data_ptr<float>();
  a.kb = in.k.stride(0);
  a.kh = in.k.stride(1);
  a.kt = in.k.stride(2);
  a.vb = in.v.stride(0);
  a.vh = in.v.stride(1);
  a.vt = in.v.stride(2);
  a.cos = in.cos.data_ptr<float>();
  a.sin = in.sin.data_ptr<float>();
  a.nv = in.nv.defined() ? in.nv.data_ptr<int64_t>() : nullptr;
  a.nvb = in.nvb;
  return a;
}

// (prompt, head) pairs per parallel task: about this many multiply-adds of cache reads each, so that a small
// problem runs on one thread (a parallel region costs a few microseconds).
constexpr int64_t kAttnGrainFlops = 1 << 16;

int64_t attn_grain(const AttnInputs& in) {
  const int64_t per_pair = std::max<int64_t>(1, in.R * (in.T + 1) * in.hd * 2);
  return std::max<int64_t>(1, kAttnGrainFlops / per_pair);
}

std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& qkv, const at::Tensor& k_ctx,
                                                 const at::Tensor& v_ctx, const at::Tensor& cos,
                                                 const at::Tensor& sin, const c10::optional<at::Tensor>& n_visible) {
  const char* op = "pyebm::ebt_rows_attention";
  const AttnInputs in = attention_inputs(op, qkv, k_ctx, v_ctx, cos, sin, n_visible);
  at::Tensor o = at::empty({in.B, in.R, in.H * in.hd}, qkv.options());
  at::Tensor lse = at::empty({in.B, in.H, in.R}, qkv.options());
  if (o.numel() == 0) return {o, lse};
  AttnArgs a = attn_args(in);
  a.o = o.data_ptr<float>();
  a.lse = lse.data_ptr<float>();
  at::parallel_for(0, in.B * in.H, attn_grain(in),
                   [&](int64_t i0, int64_t i1) { PYEBM_EBT_ROWS_CALL(attn_fwd, a, i0, i1); });
  return {o, lse};
}

at::Tensor attention_bwd(const at::Tensor& dout, const at::Tensor& qkv, const at::Tensor& k_ctx,
                         const at::Tensor& v_ctx, const at::Tensor& o, const at::Tensor& lse, const at::Tensor& cos,
                         const at::Tensor& sin, const c10::optional<at::Tensor>& n_visible) {
  const char* op = "pyebm::ebt_rows_attention_bwd";
  const AttnInputs in = attention_inputs(op, qkv, k_ctx, v_ctx, cos, sin, n_visible);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"do", dout}, {"o", o}}) {
    f32(op, name, t);
    checks::shape(op, Arg{name}, t, {in.B, in.R, in.H * in.hd}, "[B, R, H * head_dim]");
  }
  f32(op, "lse", lse);
  checks::shape(op, Arg{"lse"}, lse, {in.B, in.H, in.R}, "[B, H, R]");
  const at::Tensor dc = dout.contiguous(), oc = o.contiguous(), lc = lse.contiguous();
  at::Tensor dqkv = at::empty({in.B, in.R, 3, in.H, in.hd}, qkv.options());
  if (dqkv.numel() == 0) return dqkv;
  AttnArgs a = attn_args(in);
  a.o = const_cast<float*>(oc.data_ptr<float>());
  a.lse = const_cast<float*>(lc.data_ptr<float>());
  a.dout = dc.data_ptr<float>();
  a.dqkv = dqkv.data_ptr<float>();
  at::parallel_for(0, in.B * in.H, attn_grain(in),
                   [&](int64_t i0, int64_t i1) { PYEBM_EBT_ROWS_CALL(attn_bwd, a, i0, i1); });
  return dqkv;
}

void rows2d(const char* op, const char* name, const at::Tensor& t) {
  f32(op, name, t);
  TORCH_CHECK_VALUE(t.dim() == 2, op, ": ", name, " must be [M, D]; got ", checks::describe(t));
}

std::tuple<at::Tensor, at::Tensor> rms_norm(const at::Tensor& x_, double eps) {
  const char* op = "pyebm::ebt_rows_rms_norm";
  rows2d(op, "x", x_);
  checks::non_negative(op, "eps", eps);
  const at::Tensor x = x_.contiguous();
  const int64_t M = x.size(0), D = x.size(1);
  at::Tensor xn = at::empty({M, D}, x.options()), r = at::empty({M, 1}, x.options());
  if (M == 0) return {xn, r};
  PYEBM_EBT_ROWS_CALL(rms, M, D, x.data_ptr<float>(), xn.data_ptr<float>(), r.data_ptr<float>(),
                      static_cast<float>(eps));
  return {xn, r};
}

at::Tensor rms_norm_bwd(const at::Tensor& xn_, const at::Tensor& r_, const at::Tensor& g_,
                        const c10::optional<at::Tensor>& add_) {
  const char* op = "pyebm::ebt_rows_rms_norm_bwd";
  rows2d(op, "xn", xn_);
  const int64_t M = xn_.size(0), D = xn_.size(1);
  f32(op, "r", r_);
  checks::shape(op, Arg{"r"}, r_, {M, 1}, "[M, 1]");
  f32(op, "g", g_);
  TORCH_CHECK_VALUE(g_.sizes() == xn_.sizes() || (g_.dim() == 1 && g_.size(0) == D), op,
                    ": g must be [M=", M, ", D=", D, "] or [D]; got ", checks::describe(g_));
  const at::Tensor xn = xn_.contiguous(), r = r_.contiguous(), g = g_.contiguous();
  at::Tensor add;
  if (add_.has_value()) {
    rows2d(op, "add", *add_);
    checks::shape(op, Arg{"add"}, *add_, {M, D}, "[M, D]");
    add = add_->contiguous();
  }
  at::Tensor out = at::empty({M, D}, xn.options());
  if (M == 0) return out;
  PYEBM_EBT_ROWS_CALL(rms_bwd, M, D, xn.data_ptr<float>(), r.data_ptr<float>(), g.data_ptr<float>(),
                      g.dim() == 1 ? 0 : D, add.defined() ? add.data_ptr<float>() : nullptr, out.data_ptr<float>());
  return out;
}

int64_t swiglu_width(const char* op, const at::Tensor& uz) {
  rows2d(op, "uz", uz);
  TORCH_CHECK_VALUE(uz.size(1) % 2 == 0, op, ": uz must be [M, 2F] (u then z); got ", checks::describe(uz));
  return uz.size(1) / 2;
}

at::Tensor swiglu(const at::Tensor& uz_) {
  const char* op = "pyebm::ebt_rows_swiglu";
  const int64_t F = swiglu_width(op, uz_);
  const at::Tensor uz = uz_.contiguous();
  at::Tensor m = at::empty({uz.size(0), F}, uz.options());
  if (m.numel() == 0) return m;
  PYEBM_EBT_ROWS_CALL(swiglu, uz.size(0), F, uz.data_ptr<float>(), nullptr, m.data_ptr<float>());
  return m;
}

at::Tensor swiglu_bwd(const at::Tensor& dm_, const at::Tensor& uz_) {
  const char* op = "pyebm::ebt_rows_swiglu_bwd";
  const int64_t F = swiglu_width(op, uz_);
  f32(op, "dm", dm_);
  checks::shape(op, Arg{"dm"}, dm_, {uz_.size(0), F}, "[M, F]");
  const at::Tensor uz = uz_.contiguous(), dm = dm_.contiguous();
  at::Tensor duz = at::empty_like(uz);
  if (duz.numel() == 0) return duz;
  PYEBM_EBT_ROWS_CALL(swiglu, uz.size(0), F, uz.data_ptr<float>(), dm.data_ptr<float>(), duz.data_ptr<float>());
  return duz;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyebm, CPU, m) {
  m.impl("ebt_rows_attention", &attention_fwd);
  m.impl("ebt_rows_attention_bwd", &attention_bwd);
  m.impl("ebt_rows_rms_norm", &rms_norm);
  m.impl("ebt_rows_rms_norm_bwd", &rms_norm_bwd);
  m.impl("ebt_rows_swiglu", &swiglu);
  m.impl("ebt_rows_swiglu_bwd", &swiglu_bwd);
}
#endif  // PYEBM_VEC_ACT

}  // namespace cpu
}  // namespace pyebm
