// Activation functions and their derivatives, shared by the CPU kernels (and CUDA device code).
// Torch-free: plain C++ that compiles for the host and, with PYEBM_HD, for the device.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define PYEBM_HD __host__ __device__ __forceinline__
#else
#define PYEBM_HD inline
#endif

namespace pyebm {

// The order is part of the op ABI: pyebm/ops uses the same numbering through the activation name.
enum class Act : int32_t { kRelu = 0, kSilu = 1, kGelu = 2, kGeluTanh = 3, kTanh = 4, kSoftplus = 5 };

// exp for float with about 1 ulp of error, written with arithmetic and bit operations only so that the
// compiler can vectorise loops that call it (std::exp is an opaque libm call). Cephes polynomial with
// a Cody-Waite split of ln 2; inputs are clamped to the range where the result is a normal float, so
// exp(-inf) = 0 and exp(+inf) = +inf-like 3.4e38 would be wrong: callers that can see +inf must guard.
PYEBM_HD float fast_expf(float x) {
  const float hi = 88.3762626647949f, lo = -87.3365447504f;
  const bool nan = x != x;
  float xc = x > hi ? hi : (x < lo ? lo : x);
  float fx = xc * 1.44269504088896341f + 0.5f;
  float fl = static_cast<float>(static_cast<int32_t>(fx));
  fl = fl > fx ? fl - 1.0f : fl;  // floor
  xc = xc - fl * 0.693359375f;
  xc = xc - fl * -2.12194440e-4f;
  float z = xc * xc;
  float p = 1.9875691500e-4f;
  p = p * xc + 1.3981999507e-3f;
  p = p * xc + 8.3334519073e-3f;
  p = p * xc + 4.1665795894e-2f;
  p = p * xc + 1.6666665459e-1f;
  p = p * xc + 5.0000001201e-1f;
  p = p * z + xc + 1.0f;
  int32_t n = static_cast<int32_t>(fl) + 127;
  uint32_t bits = static_cast<uint32_t>(n) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  float r = p * scale;
  r = x < lo ? 0.0f : r;
  r = x > hi ? INFINITY : r;
  return nan ? x : r;
}

template <typename T>
PYEBM_HD T act_exp(T x) { return std::exp(x); }
template <>
PYEBM_HD float act_exp<float>(float x) {
#if defined(__CUDA_ARCH__)
  // The device expf (about 2 ulp, exact at 0, +-inf and NaN) is a few instructions around the
  // hardware ex2; the polynomial would cost more there.
  return expf(x);
#else
  return fast_expf(x);
#endif
}

// a = act(z); d = act'(z).
template <Act A, typename T>
PYEBM_HD void act_fwd_deriv(T z, T& a, T& d) {
  if constexpr (A == Act::kRelu) {
    a = z > T(0) ? z : T(0);
    d = z > T(0) ? T(1) : T(0);
    if (z != z) { a = z; d = z; }
  } else if constexpr (A == Act::kSilu) {
    T s = T(1) / (T(1) + act_exp<T>(-z));
    a = z * s;
    d = s * (T(1) + z * (T(1) - s));
  } else if constexpr (A == Act::kGelu) {
    const T inv_sqrt2 = T(0.70710678118654752440);
    const T inv_sqrt_2pi = T(0.39894228040143267794);
    T cdf = T(0.5) * (T(1) + std::erf(z * inv_sqrt2));
    a = z * cdf;
    d = cdf + z * inv_sqrt_2pi * std::exp(T(-0.5) * z * z);
  } else if constexpr (A == Act::kGeluTanh) {
    const T k0 = T(0.79788456080286535588);  // sqrt(2/pi)
    const T k1 = T(0.044715);
    T u = k0 * (z + k1 * z * z * z);
    // tanh(u) = 1 - 2 / (exp(2u) + 1): stays finite for large |u| (exp overflows to inf -> t = 1).
    T t = T(1) - T(2) / (act_exp<T>(T(2) * u) + T(1));
    a = T(0.5) * z * (T(1) + t);
    d = T(0.5) * (T(1) + t) + T(0.5) * z * (T(1) - t * t) * k0 * (T(1) + T(3) * k1 * z * z);
  } else if constexpr (A == Act::kTanh) {
    T t = T(1) - T(2) / (act_exp<T>(T(2) * z) + T(1));
    a = t;
    d = T(1) - t * t;
  } else {  // softplus, beta 1, threshold 20 (torch.nn.functional.softplus defaults)
    if (z > T(20)) {
      a = z;
      d = T(1);
    } else {
      T e = std::exp(z);
      a = std::log1p(e);
      d = e / (e + T(1));
    }
  }
}

template <Act A, typename T>
PYEBM_HD T act_fwd(T z) {
  T a, d;
  act_fwd_deriv<A, T>(z, a, d);
  return a;
}

}  // namespace pyebm
