// One descent update for one candidate row: the per-row math of pyebm.ops.descent.descent_update
// (its docstring gives the order of operations), shared by the fused update op and the whole-loop op on
// both the CPU (csrc/cpu/mlp_descent.cpp) and the GPU (csrc/include/pyebm/cuda/descent.cuh).
// Torch-free; every function is __host__ __device__ under nvcc (PYEBM_HD).
//
// The helpers below spell out min, max, isnan, a finiteness test, sqrt and exp instead of calling the std::
// ones, which are host-only (constexpr std::min/max) in device code. They are written to give exactly the results
// of std::min/std::max (including which operand a NaN comparison returns) and std::isfinite/isnan, so
// the CPU results do not depend on which spelling is used.
#pragma once

#include <cmath>
#include <cstdint>

#include "pyebm/activations.h"

namespace pyebm {

enum : int8_t { kMaxSteps = 0, kConverged = 1, kNonFinite = 2 };
enum class NoiseMode : int { kNone = 0, kLangevin = 1, kStep = 2, kAdditive = 3 };

namespace hd {
// std::min(a, b) = (b < a) ? b : a;  std::max(a, b) = (a < b) ? b : a.
template <typename T>
PYEBM_HD T min(T a, T b) { return (b < a) ? b : a; }
template <typename T>
PYEBM_HD T max(T a, T b) { return (a < b) ? b : a; }
template <typename T>
PYEBM_HD T clamp(T x, T lo, T hi) { return min(max(x, lo), hi); }
template <typename T>
PYEBM_HD bool isnan(T x) {
#if defined(__CUDA_ARCH__)
  return ::isnan(x);
#else
  return std::isnan(x);
#endif
}
// 1 when x is NaN or +-inf, else 0: !std::isfinite(x) written as a compare, so that OR-reductions over a
// row vectorise on the host.
template <typename T>
PYEBM_HD int nonfinite(T x) {
  const T big = sizeof(T) == 4 ? T(3.40282346638528859812e+38) : T(1.79769313486231570815e+308);
  return (x <= big && x >= -big) ? 0 : 1;
}
// Correctly rounded on both sides (IEEE sqrt; nvcc without fast-math keeps sqrt exact).
PYEBM_HD float sqrt(float x) {
#if defined(__CUDA_ARCH__)
  return ::sqrtf(x);
#else
  return std::sqrt(x);
#endif
}
PYEBM_HD double sqrt(double x) {
#if defined(__CUDA_ARCH__)
  return ::sqrt(x);
#else
  return std::sqrt(x);
#endif
}
// exp is not correctly rounded on either side: host libm and the device expf/exp may differ in the
// last bit (energy_scaled steps only).
PYEBM_HD float exp(float x) {
#if defined(__CUDA_ARCH__)
  return ::expf(x);
#else
  return std::exp(x);
#endif
}
PYEBM_HD double exp(double x) {
#if defined(__CUDA_ARCH__)
  return ::exp(x);
#else
  return std::exp(x);
#endif
}
}  // namespace hd

template <typename T>
struct UpdateRule {
  int64_t D = 0;
  T grad_scale = T(1);
  T momentum = T(0);             // > 0: heavy-ball velocity v' = momentum * v + d
  T grad_clip = T(0);            // > 0: clamp g to +-grad_clip
  T grad_clip_norm = T(0);       // > 0: scale g to L2 norm <= grad_clip_norm
  bool energy_scaled = false;    // eta_r = eta * exp(E) / energy_temperature
  T energy_temperature = T(1);
  T tol = T(0);                  // > 0: stop when ||g|| <= tol (after clipping)
  bool tol_final_step = false;   // met at step k: move once more, stop after that move
  int8_t tol_met = -1;           // 0 / 1: the test's outcome, decided over several rows by the caller;
                                 // -1: this row's own ||g||
  bool bound_each_step = true;
  const T* lower = nullptr;      // [D] or null
  const T* upper = nullptr;      // [D] or null
  const T* step_clip = nullptr;  // [D] or null
  NoiseMode noise = NoiseMode::kNone;
};

// Per-row state the update reads and writes.
template <typename T>
struct RowState {
  T* y;              // [D] committed state (written when the row moves)
  T* v;              // [D] velocity or null
  uint8_t* active;   // running flag
  int32_t* steps;
  int8_t* status;
  uint8_t* pending;  // tol_final_step bookkeeping or null
};

// g [D] is scratch (clipped in place); y_base [D] is where the step starts (usually y); xi [D] the
// standard normals of this step or null; mask/fixed [D] the clamped coordinates or null; scratch [2D].
// eta is the step size of this step, n the noise level. Returns true when the row moved.
template <typename T>
PYEBM_HD bool update_row(const UpdateRule<T>& u, T eta, T n, T E, T* g, const T* y_base, const T* xi,
                         const uint8_t* mask, const T* fixed, RowState<T> st, T* scratch) {
  if (!*st.active) return false;
  const int64_t D = u.D;
  int bad = hd::nonfinite(E);
  for (int64_t j = 0; j < D; ++j) bad |= hd::nonfinite(g[j]);
  if (bad) {
    *st.status = kNonFinite;
    *st.active = 0;
    if (st.pending) *st.pending = 0;
    return false;
  }
  if (u.grad_clip > T(0))
    for (int64_t j = 0; j < D; ++j) g[j] = hd::clamp(g[j], -u.grad_clip, u.grad_clip);
  if (u.grad_clip_norm > T(0)) {
    T ss = T(0);
    for (int64_t j = 0; j < D; ++j) ss += g[j] * g[j];
    // c / 0 = inf -> 1: a zero gradient stays zero.
    const T scale = hd::min(u.grad_clip_norm / hd::sqrt(ss), T(1));
    for (int64_t j = 0; j < D; ++j) g[j] *= scale;
  }
  bool stop_after = false;
  if (u.tol > T(0)) {
    bool crit = u.tol_met > 0;
    if (u.tol_met < 0) {
      T ss = T(0);
      for (int64_t j = 0; j < D; ++j) ss += g[j] * g[j];
      crit = hd::sqrt(ss) <= u.tol;
    }
    if (u.tol_final_step) {
      stop_after = *st.pending != 0;
      *st.pending = crit ? 1 : 0;
    } else if (crit) {
      *st.status = kConverged;
      *st.active = 0;
      return false;
    }
  }
  const T eta_r = u.energy_scaled ? hd::exp(E) / u.energy_temperature * eta : eta;
  const T a = -u.grad_scale * eta_r;
  T* d = scratch;        // the move
  T* vnew = scratch + D;  // v'
  for (int64_t j = 0; j < D; ++j) d[j] = a * g[j];
  if (u.momentum > T(0)) {
    for (int64_t j = 0; j < D; ++j) {
      vnew[j] = d[j] + u.momentum * st.v[j];
      d[j] = vnew[j];
    }
  }
  if (xi != nullptr) {
    switch (u.noise) {
      case NoiseMode::kLangevin: {
        const T s = hd::sqrt(eta_r * (T(2) * n));
        for (int64_t j = 0; j < D; ++j) d[j] += s * xi[j];
        break;
      }
      case NoiseMode::kStep: {
        const T s = -(eta_r * n);
        for (int64_t j = 0; j < D; ++j) d[j] += s * xi[j];
        break;
      }
      case NoiseMode::kAdditive:
        for (int64_t j = 0; j < D; ++j) d[j] += n * xi[j];
        break;
      case NoiseMode::kNone:
        break;
    }
  }
  if (u.step_clip)
    for (int64_t j = 0; j < D; ++j) d[j] = hd::clamp(d[j], -u.step_clip[j], u.step_clip[j]);
  for (int64_t j = 0; j < D; ++j) d[j] += y_base[j];
  if (u.bound_each_step) {
    if (u.lower)
      for (int64_t j = 0; j < D; ++j) d[j] = hd::isnan(d[j]) ? d[j] : hd::max(d[j], u.lower[j]);
    if (u.upper)
      for (int64_t j = 0; j < D; ++j) d[j] = hd::isnan(d[j]) ? d[j] : hd::min(d[j], u.upper[j]);
  }
  if (mask)
    for (int64_t j = 0; j < D; ++j) d[j] = mask[j] ? fixed[j] : d[j];
  bad = 0;
  for (int64_t j = 0; j < D; ++j) bad |= hd::nonfinite(d[j]);
  if (bad) {
    // An overflowing proposal is not taken: the row stops with its last finite value.
    *st.status = kNonFinite;
    *st.active = 0;
    if (st.pending) *st.pending = 0;
    return false;
  }
  for (int64_t j = 0; j < D; ++j) st.y[j] = d[j];
  if (u.momentum > T(0))
    for (int64_t j = 0; j < D; ++j) st.v[j] = vnew[j];
  *st.steps += 1;
  if (stop_after) {
    *st.status = kConverged;
    *st.active = 0;
  }
  return true;
}

// The bounds of a run whose bounds apply only at the end (bound_each_step false): clamp the final y
// [D] (NaN stays NaN), then re-apply the clamped coordinates.
template <typename T>
PYEBM_HD void bound_row_at_end(const UpdateRule<T>& u, T* y, const uint8_t* mask, const T* fixed) {
  for (int64_t j = 0; j < u.D; ++j) {
    T yy = y[j];
    if (u.lower && !hd::isnan(yy)) yy = hd::max(yy, u.lower[j]);
    if (u.upper && !hd::isnan(yy)) yy = hd::min(yy, u.upper[j]);
    if (mask && mask[j]) yy = fixed[j];
    y[j] = yy;
  }
}

}  // namespace pyebm
