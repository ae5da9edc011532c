// Descent on the GPU: the fused per-step update (pyebm::descent_update) and the whole-loop MLP descent
// (pyebm::mlp_descent). Kernels and launchers, torch-free (CUDA runtime only); the ATen glue is
// csrc/cuda/descent.cu. The per-row update is pyebm/descent_update.h, the same function the CPU ops run,
// so both devices take the same decisions in the same order (pyebm/ops/descent.py documents them).
//
// Whole loop: one CTA owns a tile of kSimtRows (32) candidate rows and runs every step on it in one
// launch: energy and input gradient of the tile (simt_tile of pyebm/cuda/mlp_energy.cuh, activations in
// shared memory), a barrier, then one thread per row applies the update; the CTA leaves its tile as soon
// as no row of the tile is running (__syncthreads_or, decided on the device: no host round trip), and
// ends with the final energy pass. The noise is the caller's pre-drawn [steps, N, D] tensor, indexed
// like the CPU op, so both devices see the same draws. Energies are computed in fp32 or fp64 (16-bit
// inputs are computed in fp32, like the CPU op); the summation order differs from the CPU kernel's, so
// results agree to rounding, not bit for bit.
//
// Working memory the caller provides (device, contiguous): G [N, D], E [N], scratch [N, 2D], active and
// pending [N] bytes, velocity [N, D] when momentum > 0, q [N, D] when the gradient is taken at the
// Nesterov look-ahead point, and plan.ws_bytes of global workspace when the activations of a tile do not
// fit in shared memory (plan_mlp's SIMT spill).
//
// tests/cuda_emu/descent_emu.cpp runs these kernels on the host against the CPU ops.
#pragma once

#include "pyebm/cuda/mlp_energy.cuh"
#include "pyebm/descent_update.h"

// Block-wide OR of a predicate with a barrier (a CUDA intrinsic; the emulator provides its own).
#if defined(PYEBM_GPU_EMULATE) && !defined(__syncthreads_or)
#error "include tests/cuda_emu/emu.h first"
#endif

namespace pyebm {
namespace gpu {

constexpr int kUpdateThreads = 128;

// ------------------------------------------------------------------------------------------------
// Fused per-step update: one thread per row
// ------------------------------------------------------------------------------------------------

template <typename T>
struct UpdateParams {
  int64_t rows = 0;
  UpdateRule<T> u;                 // u.lower / upper / step_clip are device pointers ([D]) or null
  T eta = T(0), noise_level = T(0);
  T* y = nullptr;                  // [N, D] in place
  T* g = nullptr;                  // [N, D] clobbered
  const T* E = nullptr;            // [N]
  uint8_t* active = nullptr;       // [N]
  int32_t* steps = nullptr;        // [N]
  int8_t* status = nullptr;        // [N]
  T* velocity = nullptr;           // [N, D] or null
  uint8_t* pending = nullptr;      // [N] or null
  const T* noise = nullptr;        // [N, D] or null
  const uint8_t* mask = nullptr;   // [N, D] or null
  const T* fixed = nullptr;        // [N, D] (with mask)
  T* scratch = nullptr;            // [N, 2D] working memory
};

template <typename T>
__global__ void __launch_bounds__(kUpdateThreads) descent_update_kernel(const UpdateParams<T> a) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= a.rows) return;
  const int64_t D = a.u.D, o = i * D;
  RowState<T> st{a.y + o, a.velocity ? a.velocity + o : nullptr, a.active + i, a.steps + i, a.status + i,
                 a.pending ? a.pending + i : nullptr};
  update_row<T>(a.u, a.eta, a.noise_level, a.E[i], a.g + o, a.y + o, a.noise ? a.noise + o : nullptr,
                a.mask ? a.mask + o : nullptr, a.mask ? a.fixed + o : nullptr, st, a.scratch + 2 * o);
}

// ------------------------------------------------------------------------------------------------
// Whole-loop MLP descent
// ------------------------------------------------------------------------------------------------

template <typename T>
struct DescentParams {
  MlpParams<T> mlp;                // the energy; mlp.rows = N (mlp.y, E and G are not used)
  UpdateRule<T> u;                 // u.lower / upper / step_clip are device pointers ([D]) or null
  int steps = 0;                   // T >= 1
  const T* eta = nullptr;          // [T] step size of each step
  const T* noise_level = nullptr;  // [T]
  const T* noise = nullptr;        // [T, N, D] standard normals, or null
  const uint8_t* mask = nullptr;   // [N, D] clamped coordinates, or null
  const T* fixed = nullptr;        // [N, D] their values (with mask)
  bool nesterov = false;           // gradient at y + momentum * v (with momentum > 0)
  T* y = nullptr;                  // [N, D] the state: y0 on entry, the result on exit
  T* E_final = nullptr;            // [N]
  T* E_init = nullptr;             // [N] energy at y0 (the first evaluation)
  int32_t* steps_out = nullptr;    // [N]
  int8_t* status = nullptr;        // [N]
  // Working memory.
  T* G = nullptr;                  // [N, D]
  T* E = nullptr;                  // [N]
  T* scratch = nullptr;            // [N, 2D]
  uint8_t* active = nullptr;       // [N]
  uint8_t* pending = nullptr;      // [N]
  T* velocity = nullptr;           // [N, D] (momentum > 0)
  T* q = nullptr;                  // [N, D] (nesterov with momentum > 0)
};

template <Act A, typename T>
__global__ void __launch_bounds__(kSimtThreads, 2) mlp_descent_kernel(const DescentParams<T> P, const SimtLayout lay,
                                                                 unsigned char* __restrict__ gws) {
  using Acc = typename AccType<T>::type;
  static_assert(std::is_same<Acc, T>::value, "the whole loop runs in fp32 or fp64");
  PYEBM_DYNAMIC_SMEM(smem);
  Acc* base = lay.in_smem ? reinterpret_cast<Acc*>(smem)
                          : reinterpret_cast<Acc*>(gws) + (size_t)blockIdx.x * (size_t)lay.elems;
  const UpdateRule<T>& u = P.u;
  const int64_t N = P.mlp.rows, D = u.D;
  const int64_t ntiles = (N + kSimtRows - 1) / kSimtRows;
  const bool look_ahead = P.nesterov && u.momentum > T(0) && P.q != nullptr;
  const int tid = threadIdx.x;

  for (int64_t tile = blockIdx.x; tile < ntiles; tile += gridDim.x) {
    const int64_t row0 = tile * kSimtRows;
    // Thread r < 32 owns row row0 + r: its bookkeeping and its update.
    const int64_t R = row0 + tid;
    const bool owner = tid < kSimtRows && R < N;
    const int64_t o = R * D;
    if (owner) {
      P.active[R] = 1;
      P.pending[R] = 0;
      P.steps_out[R] = 0;
      P.status[R] = kMaxSteps;
      if (P.velocity)
        for (int64_t j = 0; j < D; ++j) P.velocity[o + j] = T(0);
    }
    const T* eval = look_ahead ? P.q : P.y;  // where the gradient is taken
    bool running = true;
    for (int k = 0; k < P.steps && running; ++k) {
      if (look_ahead && owner)
        for (int64_t j = 0; j < D; ++j) P.q[o + j] = P.y[o + j] + u.momentum * P.velocity[o + j];
      simt_tile<A, T>(P.mlp, lay, /*grad=*/true, base, row0, eval, P.E, P.G);  // starts with a barrier
      __syncthreads();  // E and G of every row of the tile are written
      bool alive = false;
      if (owner) {
        if (k == 0) P.E_init[R] = P.E[R];
        RowState<T> st{P.y + o, P.velocity ? P.velocity + o : nullptr, P.active + R, P.steps_out + R,
                       P.status + R, P.pending + R};
        update_row<T>(u, P.eta[k], P.noise_level[k], P.E[R], P.G + o, P.y + o,
                      P.noise ? P.noise + (static_cast<int64_t>(k) * N + R) * D : nullptr,
                      P.mask ? P.mask + o : nullptr, P.mask ? P.fixed + o : nullptr, st, P.scratch + 2 * o);
        alive = P.active[R] != 0;
      }
      running = __syncthreads_or(alive) != 0;  // uniform over the CTA: every thread leaves together
    }
    if (owner && !u.bound_each_step && (u.lower || u.upper))
      bound_row_at_end<T>(u, P.y + o, P.mask ? P.mask + o : nullptr, P.mask ? P.fixed + o : nullptr);
    simt_tile<A, T>(P.mlp, lay, /*grad=*/false, base, row0, P.y, P.E_final, nullptr);  // starts with a barrier
  }
}

// Shape of the whole-loop launch: the SIMT energy plan (gradient layout) of the same rows.
template <typename T>
MlpPlan plan_descent(const DescentParams<T>& P, const DeviceCaps& caps) {
  return plan_mlp<T>(P.mlp, /*grad=*/true, caps, MlpPath::kSimt);
}

#if !defined(PYEBM_GPU_EMULATE)
template <typename T>
cudaError_t launch_descent_update(const UpdateParams<T>& a, cudaStream_t stream) {
  if (a.rows <= 0) return cudaSuccess;
  if (a.u.D < 0) return cudaErrorInvalidValue;
  const int64_t blocks = (a.rows + kUpdateThreads - 1) / kUpdateThreads;
  if (blocks > 0x7fffffff) return cudaErrorInvalidValue;
  descent_update_kernel<T><<<static_cast<unsigned>(blocks), kUpdateThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

template <Act A, typename T>
struct DescentTag {};

template <Act A, typename T>
cudaError_t launch_descent_act(const DescentParams<T>& P, const MlpPlan& plan, void* ws, int device,
                               const DeviceCaps& caps, cudaStream_t stream) {
  const void* fn = reinterpret_cast<const void*>(&mlp_descent_kernel<A, T>);
  if (plan.smem > 48 * 1024) {
    cudaError_t e = allow_smem<DescentTag<A, T>>(fn, device, caps.smem_optin);
    if (e != cudaSuccess) return e;
  }
  mlp_descent_kernel<A, T><<<plan.grid, plan.threads, plan.smem, stream>>>(P, plan.simt,
                                                                          static_cast<unsigned char*>(ws));
  return cudaGetLastError();
}

// All P.steps steps and the final energy for every row, on `stream`; never synchronises. `plan` from
// plan_descent(P, caps); `ws` at least plan.ws_bytes bytes (may be null when 0). The current device
// must be `device`.
template <typename T>
cudaError_t launch_mlp_descent(const DescentParams<T>& P, Act act, const MlpPlan& plan, void* ws, int device,
                               const DeviceCaps& caps, cudaStream_t stream) {
  if (P.mlp.rows <= 0) return cudaSuccess;
  if (P.mlp.L < 1 || P.mlp.L > kMaxLayers || P.mlp.D < 1 || P.steps < 1) return cudaErrorInvalidValue;
  if (plan.path != MlpPath::kSimt || (!plan.simt.in_smem && ws == nullptr)) return cudaErrorInvalidValue;
  switch (act) {
    case Act::kRelu: return launch_descent_act<Act::kRelu, T>(P, plan, ws, device, caps, stream);
    case Act::kSilu: return launch_descent_act<Act::kSilu, T>(P, plan, ws, device, caps, stream);
    case Act::kGelu: return launch_descent_act<Act::kGelu, T>(P, plan, ws, device, caps, stream);
    case Act::kGeluTanh: return launch_descent_act<Act::kGeluTanh, T>(P, plan, ws, device, caps, stream);
    case Act::kTanh: return launch_descent_act<Act::kTanh, T>(P, plan, ws, device, caps, stream);
    case Act::kSoftplus: return launch_descent_act<Act::kSoftplus, T>(P, plan, ws, device, caps, stream);
  }
  return cudaErrorInvalidValue;
}
#endif  // !PYEBM_GPU_EMULATE

}  // namespace gpu
}  // namespace pyebm
