// Vectorised activation passes for float, written with GCC/Clang vector extensions so that they are
// branch-free and SIMD whatever the auto-vectoriser decides (range checks in exp would otherwise become
// unpredictable branches). Each pass is compiled twice: for the baseline ISA and, through the target
// attribute, for AVX2+FMA; the AVX2 copy is chosen at run time when the CPU has it.
#pragma once

#include <cstdint>
#include <cstring>

#include "pyebm/activations.h"

namespace pyebm {
namespace cpu {

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__aarch64__))
#define PYEBM_VEC_ACT 1

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

#define PYEBM_AI inline __attribute__((always_inline))

PYEBM_AI v8f vsplat(float x) { return v8f{x, x, x, x, x, x, x, x}; }
PYEBM_AI v8f vload(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
PYEBM_AI void vstore(float* p, v8f v) { std::memcpy(p, &v, sizeof(v)); }
PYEBM_AI v8f vselect(v8i m, v8f a, v8f b) {  // m lanes are all-ones (true) or zero
  v8i r = (m & (v8i)a) | (~m & (v8i)b);
  return (v8f)r;
}

// exp with the same polynomial as fast_expf (about 1 ulp). NaN propagates, -inf -> 0, +inf -> inf.
PYEBM_AI v8f vexp(v8f x) {
  const v8f hi = vsplat(88.3762626647949f), lo = vsplat(-87.3365447504f);
  v8f xc = vselect(x > hi, hi, x);
  xc = vselect(xc < lo, lo, xc);
  v8f fx = xc * 1.44269504088896341f + 0.5f;
  v8i ti = __builtin_convertvector(fx, v8i);
  v8f fl = __builtin_convertvector(ti, v8f);
  fl = vselect(fl > fx, fl - 1.0f, fl);  // floor
  xc = xc - fl * 0.693359375f;
  xc = xc - fl * -2.12194440e-4f;
  v8f z = xc * xc;
  v8f p = vsplat(1.9875691500e-4f);
  p = p * xc + 1.3981999507e-3f;
  p = p * xc + 8.3334519073e-3f;
  p = p * xc + 4.1665795894e-2f;
  p = p * xc + 1.6666665459e-1f;
  p = p * xc + 5.0000001201e-1f;
  p = p * z + xc + 1.0f;
  v8i n = (__builtin_convertvector(fl, v8i) + 127) << 23;
  v8f r = p * (v8f)n;
  r = vselect(x < lo, vsplat(0.0f), r);
  r = vselect(x > hi, vsplat(__builtin_inff()), r);
  return vselect(x != x, x, r);
}

template <Act A>
PYEBM_AI void vact(v8f z, v8f& a, v8f& d) {
  if constexpr (A == Act::kRelu) {
    v8i pos = z > 0.0f;
    a = vselect(pos, z, vsplat(0.0f));
    d = vselect(pos, vsplat(1.0f), vsplat(0.0f));
    v8i nan = z != z;
    a = vselect(nan, z, a);
    d = vselect(nan, z, d);
  } else if constexpr (A == Act::kSilu) {
    v8f s = 1.0f / (1.0f + vexp(-z));
    a = z * s;
    d = s * (1.0f + z * (1.0f - s));
  } else if constexpr (A == Act::kGeluTanh) {
    const float k0 = 0.79788456080286535588f, k1 = 0.044715f;
    v8f u = k0 * (z + k1 * z * z * z);
    v8f t = 1.0f - 2.0f / (vexp(2.0f * u) + 1.0f);
    a = 0.5f * z * (1.0f + t);
    d = 0.5f * (1.0f + t) + 0.5f * z * (1.0f - t * t) * k0 * (1.0f + 3.0f * k1 * z * z);
  } else {  // tanh
    v8f t = 1.0f - 2.0f / (vexp(2.0f * z) + 1.0f);
    a = t;
    d = 1.0f - t * t;
  }
}

template <Act A>
constexpr bool has_vec_act() {
  return A == Act::kRelu || A == Act::kSilu || A == Act::kGeluTanh || A == Act::kTanh;
}

#define PYEBM_DEFINE_ACT_PASSES(SUFFIX, ATTR)                                                         \
  template <Act A>                                                                                    \
  ATTR void act_pass_##SUFFIX(int64_t n, float* __restrict z, float* __restrict d) {                  \
    int64_t i = 0;                                                                                    \
    for (; i + 8 <= n; i += 8) {                                                                      \
      v8f a, g;                                                                                       \
      vact<A>(vload(z + i), a, g);                                                                    \
      vstore(z + i, a);                                                                               \
      if (d) vstore(d + i, g);                                                                        \
    }                                                                                                 \
    for (; i < n; ++i) {                                                                              \
      float a, g;                                                                                     \
      act_fwd_deriv<A, float>(z[i], a, g);                                                            \
      z[i] = a;                                                                                       \
      if (d) d[i] = g;                                                                                \
    }                                                                                                 \
  }

PYEBM_DEFINE_ACT_PASSES(base, )
#if defined(__x86_64__)
PYEBM_DEFINE_ACT_PASSES(avx2, __attribute__((target("avx2,fma"))))

inline bool cpu_has_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}
#endif

// z <- act(z) and, when d is not null, d <- act'(z).
template <Act A>
inline void vec_act_pass(int64_t n, float* __restrict z, float* __restrict d) {
#if defined(__x86_64__)
  if (cpu_has_avx2()) return act_pass_avx2<A>(n, z, d);
#endif
  act_pass_base<A>(n, z, d);
}

#undef PYEBM_DEFINE_ACT_PASSES
#endif  // vector extensions

}  // namespace cpu
}  // namespace pyebm
