// The whole-loop descent for the MLP energy on CPU, torch-free below the op glue: every step of a block of
// candidate rows back to back (energy + input gradient with mlp_block, then update_row), so a block's rows,
// their activations and velocity stay in this core's cache for all T steps. Blocks run in parallel; a block
// stops early once none of its rows is running. Used by the op pyebm::mlp_descent and by MlpPlan.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "descent_update.h"
#include "mlp_block.h"
#include "mlp_energy_cpu.h"

namespace pyebm {
namespace cpu {

template <Act A, typename T>
inline __attribute__((always_inline)) void descent_block_body(const MlpDesc<T>& p, const UpdateRule<T>& u, const std::vector<double>& eta,
                   const std::vector<double>& nlev, int64_t N, int64_t r0, int64_t m, T* y, const T* fixed,
                   const uint8_t* mask, const T* noise, bool nesterov, T* E_final, T* E_init, int32_t* steps,
                   int8_t* status, T* ws) {
  const int64_t D = p.D;
  T* mlp_ws = ws;
  ws += m * p.ws_per_row(true);
  T* q = ws;
  ws += m * D;
  T* G = ws;
  ws += m * D;
  T* v = ws;
  ws += m * D;
  T* E = ws;
  ws += m;
  T* scratch = ws;
  ws += 2 * D;
  uint8_t* active = reinterpret_cast<uint8_t*>(ws);
  uint8_t* pending = active + m;
  std::memset(active, 1, m);
  std::memset(pending, 0, m);
  std::fill(v, v + m * D, T(0));
  std::fill(steps, steps + m, 0);
  std::fill(status, status + m, int8_t(kMaxSteps));
  const int64_t Tn = static_cast<int64_t>(eta.size());
  int64_t running = m;
  for (int64_t k = 0; k < Tn && running > 0; ++k) {
    const T* eval = y;
    if (nesterov && u.momentum > T(0)) {
      for (int64_t i = 0; i < m * D; ++i) q[i] = y[i] + u.momentum * v[i];
      eval = q;
    }
    mlp_block<A, T>(p, r0, m, eval, E, G, mlp_ws);
    if (k == 0) std::copy(E, E + m, E_init);
    const T eta_k = T(eta[k]), n_k = T(nlev[k]);
    running = 0;
    for (int64_t i = 0; i < m; ++i) {
      const T* xi = noise ? noise + ((k * N) + r0 + i) * D : nullptr;
      RowState<T> st{y + i * D, v + i * D, active + i, steps + i, status + i, pending + i};
      update_row<T>(u, eta_k, n_k, E[i], G + i * D, y + i * D, xi, mask ? mask + i * D : nullptr,
                    fixed ? fixed + i * D : nullptr, st, scratch);
      running += active[i];
    }
  }
  if (!u.bound_each_step && (u.lower || u.upper)) {
    for (int64_t i = 0; i < m; ++i)
      bound_row_at_end<T>(u, y + i * D, mask ? mask + i * D : nullptr, fixed ? fixed + i * D : nullptr);
  }
  mlp_block<A, T>(p, r0, m, y, E_final, nullptr, mlp_ws);
}

// descent_block_body for the baseline ISA or (the update's per-row loops over D) AVX-512.
#ifdef PYEBM_HAVE_ISA_COPIES
template <Act A, typename T>
PYEBM_TARGET_AVX512 __attribute__((noinline)) void descent_block_avx512(
    const MlpDesc<T>& p, const UpdateRule<T>& u, const std::vector<double>& eta, const std::vector<double>& nlev,
    int64_t N, int64_t r0, int64_t m, T* y, const T* fixed, const uint8_t* mask, const T* noise, bool nesterov,
    T* E_final, T* E_init, int32_t* steps, int8_t* status, T* ws) {
  descent_block_body<A, T>(p, u, eta, nlev, N, r0, m, y, fixed, mask, noise, nesterov, E_final, E_init, steps, status,
                           ws);
}
#endif

template <Act A, typename T>
inline void descent_block(const MlpDesc<T>& p, const UpdateRule<T>& u, const std::vector<double>& eta,
                          const std::vector<double>& nlev, int64_t N, int64_t r0, int64_t m, T* y, const T* fixed,
                          const uint8_t* mask, const T* noise, bool nesterov, T* E_final, T* E_init, int32_t* steps,
                          int8_t* status, T* ws) {
#ifdef PYEBM_HAVE_ISA_COPIES
  if (cpu_vec_level() == 2)
    return descent_block_avx512<A, T>(p, u, eta, nlev, N, r0, m, y, fixed, mask, noise, nesterov, E_final, E_init,
                                      steps, status, ws);
#endif
  descent_block_body<A, T>(p, u, eta, nlev, N, r0, m, y, fixed, mask, noise, nesterov, E_final, E_init, steps, status,
                           ws);
}

// All T = eta.size() steps for N rows: y [N, D] in place (the state), fixed/mask [N, D] or null, noise
// [T, N, D] or null; writes E_final, E_init, steps and status [N].
template <typename T>
void run_descent(const MlpDesc<T>& p, const UpdateRule<T>& u, Act act, const std::vector<double>& eta,
                 const std::vector<double>& nlev, int64_t N, T* yp, const T* fp, const uint8_t* mp, const T* np,
                 bool nesterov, T* E_final, T* E_init, int32_t* steps, int8_t* status) {
  if (N <= 0) return;
  const int64_t D = p.D;
  const int64_t Tn = static_cast<int64_t>(eta.size());
  // Per-row working set: the MLP buffers plus q, G, v and E, and the per-block flags.
  const int64_t row_elems = p.ws_per_row(true) + 3 * D + 1 + 1;
  const int64_t M = block_rows(N, row_elems * int64_t(sizeof(T)), p.flops_per_row(true) * Tn);
  const int64_t ws_elems = M * row_elems + 2 * D + (2 * M + sizeof(T) - 1) / sizeof(T) + 1;
  with_act(act, [&](auto a) {
    constexpr Act A = decltype(a)::value;
    for_each_block(N, M, [&](int64_t b0, int64_t b1) {
      T* ws = thread_scratch<T>(ws_elems);
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t r0 = blk * M, m = std::min(M, N - r0);
        descent_block<A, T>(p, u, eta, nlev, N, r0, m, yp + r0 * D, fp ? fp + r0 * D : nullptr,
                            mp ? mp + r0 * D : nullptr, np, nesterov, E_final + r0, E_init + r0, steps + r0,
                            status + r0, ws);
      }
    });
  });
}

}  // namespace cpu
}  // namespace pyebm
