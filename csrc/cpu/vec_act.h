// Vectorised activation passes for float, written with GCC/Clang vector extensions so that they are
// branch-free and SIMD whatever the auto-vectoriser decides (range checks in exp would otherwise become
// unpredictable branches). Each pass is compiled three times: for the baseline ISA and, through the
// target attribute, for AVX2+FMA and for AVX-512; cpu_vec_level() (cpu_isa.h: the widest the CPU supports, or
// PYEBM_CPU_ISA) chooses at run time.
#pragma once

#include <cstdint>
#include <cstring>

#include "cpu_isa.h"
#include "pyebm/activations.h"

namespace pyebm {
namespace cpu {

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__aarch64__))
#define PYEBM_VEC_ACT 1

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));

#define PYEBM_AI inline __attribute__((always_inline))

// The integer vector type of the same width as V.
template <typename V> struct VecInt;
template <> struct VecInt<v8f> { using type = v8i; };
template <> struct VecInt<v16f> { using type = v16i; };

template <typename V>
PYEBM_AI V vsplat(float x) { return V{} + x; }
template <typename V>
PYEBM_AI V vload(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename V>
PYEBM_AI void vstore(float* p, V v) { std::memcpy(p, &v, sizeof(v)); }
template <typename V, typename VI = typename VecInt<V>::type>
PYEBM_AI V vselect(VI m, V a, V b) {  // m lanes are all-ones (true) or zero
  VI r = (m & (VI)a) | (~m & (VI)b);
  return (V)r;
}

// exp with the same reduction constants and polynomial as fast_expf (about 1 ulp). NaN propagates,
// -inf -> 0, +inf -> inf.
template <typename V, typename VI = typename VecInt<V>::type>
PYEBM_AI V vexp(V x) {
  const V hi = vsplat<V>(88.3762626647949f), lo = vsplat<V>(-87.3365447504f);
  V xc = vselect<V>(x > hi, hi, x);
  xc = vselect<V>(xc < lo, lo, xc);
  // n = round(x log2 e) through the 1.5 * 2^23 shifter (the integer lands in the low mantissa bits): two
  // operations instead of the floor(x log2 e + 0.5) of fast_expf, which it equals except at exact halves,
  // where either choice keeps the reduced argument within the polynomial's range.
  const V shifter = vsplat<V>(12582912.0f);
  const V t = xc * 1.44269504088896341f + shifter;
  const V fl = t - shifter;
  xc = xc - fl * 0.693359375f;
  xc = xc - fl * -2.12194440e-4f;
  V z = xc * xc;
  V p = vsplat<V>(1.9875691500e-4f);
  p = p * xc + 1.3981999507e-3f;
  p = p * xc + 8.3334519073e-3f;
  p = p * xc + 4.1665795894e-2f;
  p = p * xc + 1.6666665459e-1f;
  p = p * xc + 5.0000001201e-1f;
  p = p * z + xc + 1.0f;
  VI n = ((VI)t + (127 - 0x4B400000)) << 23;
  V r = p * (V)n;
  r = vselect<V>(x < lo, vsplat<V>(0.0f), r);
  r = vselect<V>(x > hi, vsplat<V>(__builtin_inff()), r);
  return vselect<V>(x != x, x, r);
}

template <Act A, typename V, typename VI = typename VecInt<V>::type>
PYEBM_AI void vact(V z, V& a, V& d) {
  if constexpr (A == Act::kRelu) {
    VI pos = z > 0.0f;
    a = vselect<V>(pos, z, vsplat<V>(0.0f));
    d = vselect<V>(pos, vsplat<V>(1.0f), vsplat<V>(0.0f));
    VI nan = z != z;
    a = vselect<V>(nan, z, a);
    d = vselect<V>(nan, z, d);
  } else if constexpr (A == Act::kSilu) {
    V s = 1.0f / (1.0f + vexp<V>(-z));
    a = z * s;
    d = s * (1.0f + z * (1.0f - s));
  } else if constexpr (A == Act::kGeluTanh) {
    const float k0 = 0.79788456080286535588f, k1 = 0.044715f;
    V u = k0 * (z + k1 * z * z * z);
    V t = 1.0f - 2.0f / (vexp<V>(2.0f * u) + 1.0f);
    a = 0.5f * z * (1.0f + t);
    d = 0.5f * (1.0f + t) + 0.5f * z * (1.0f - t * t) * k0 * (1.0f + 3.0f * k1 * z * z);
  } else {  // tanh
    V t = 1.0f - 2.0f / (vexp<V>(2.0f * z) + 1.0f);
    a = t;
    d = 1.0f - t * t;
  }
}

template <Act A>
constexpr bool has_vec_act() {
  return A == Act::kRelu || A == Act::kSilu || A == Act::kGeluTanh || A == Act::kTanh;
}

#define PYEBM_DEFINE_ACT_PASSES(SUFFIX, ATTR, V)                                                      \
  template <Act A>                                                                                    \
  ATTR void act_pass_##SUFFIX(int64_t n, float* __restrict z, float* __restrict d) {                  \
    constexpr int64_t W = sizeof(V) / sizeof(float);                                                  \
    int64_t i = 0;                                                                                    \
    for (; i + W <= n; i += W) {                                                                      \
      V a, g;                                                                                         \
      vact<A, V>(vload<V>(z + i), a, g);                                                              \
      vstore<V>(z + i, a);                                                                            \
      if (d) vstore<V>(d + i, g);                                                                     \
    }                                                                                                 \
    for (; i < n; ++i) {                                                                              \
      float a, g;                                                                                     \
      act_fwd_deriv<A, float>(z[i], a, g);                                                            \
      z[i] = a;                                                                                       \
      if (d) d[i] = g;                                                                                \
    }                                                                                                 \
  }

PYEBM_DEFINE_ACT_PASSES(base, , v8f)
#if defined(__x86_64__)
PYEBM_DEFINE_ACT_PASSES(avx2, __attribute__((target("avx2,fma"))), v8f)
PYEBM_DEFINE_ACT_PASSES(avx512, __attribute__((target("avx512f,avx512dq,avx2,fma"))), v16f)

#endif

// z <- act(z) and, when d is not null, d <- act'(z).
template <Act A>
inline void vec_act_pass(int64_t n, float* __restrict z, float* __restrict d) {
#if defined(__x86_64__)
  const int level = cpu_vec_level();
  // relu is a select, not arithmetic: GCC's 512-bit lowering of it is slower than the AVX2 copy (measured).
  if (level == 2 && A != Act::kRelu) return act_pass_avx512<A>(n, z, d);
  if (level >= 1) return act_pass_avx2<A>(n, z, d);
#endif
  act_pass_base<A>(n, z, d);
}

#undef PYEBM_DEFINE_ACT_PASSES
#endif  // vector extensions

}  // namespace cpu
}  // namespace pyebm
