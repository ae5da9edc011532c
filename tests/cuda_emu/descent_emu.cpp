// Runs the CUDA descent kernels (pyebm/cuda/descent.cuh) under the host emulator in emu.h.
//
//   descent_emu IN OUT
// IN : int64 count + int32 header, int64 count + float64 scalars, then arrays until the end of the file,
//      each an int64 count + float64 values (count 0 = absent).
//   mode 0, whole loop: header [0, dtype (0 f32, 1 f64), activation, residual, sms, smem_optin (0 = H100),
//        B, K, D, L, H_1 .. H_L, nesterov, energy_scaled, tol_final_step, bound_each_step, noise_mode];
//        scalars [grad_scale, momentum, grad_clip (0 off), grad_clip_norm (0 off), energy_temperature, tol];
//        arrays ctx, y0, w_in, (w[l], b[l]) for l < L-1, w_out, b_out, eta [T], noise_level [T],
//        noise [T*N*D], lower [D], upper [D], step_clip [D], mask [N*D] (0/1).
//   OUT: int32 [grid, threads, smem bytes, activations in shared memory], then float64 y [N*D],
//        E_final [N], E_init [N], steps [N], status [N].
//   mode 1, fused update: header [1, dtype, N, D, energy_scaled, tol_final_step, bound_each_step,
//        noise_mode]; scalars [grad_scale, momentum, grad_clip, grad_clip_norm, energy_temperature, tol, eta,
//        noise_level]; arrays y, g, E, active, steps, status, velocity, pending, noise, mask, fixed, lower,
//        upper, step_clip.
//   OUT: int32 [grid, threads, 0, 0], then float64 y [N*D], active [N], steps [N], status [N], velocity
//        [N*D] (if given), pending [N] (if given).
// Working buffers are filled with NaN / 0xff bytes first, so a value read before the kernel wrote it shows.
#include "emu.h"
// clang-format off
#include "pyebm/cuda/descent.cuh"
// clang-format on

#include <cmath>
#include <cstdio>
#include <fstream>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

using namespace pyebm;
using namespace pyebm::gpu;

namespace {

struct Input {
  std::vector<int32_t> h;
  std::vector<double> sc;
  std::vector<std::vector<double>> arrays;
};

Input read_input(const char* path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot open input");
  Input in;
  int64_t n = 0;
  f.read(reinterpret_cast<char*>(&n), 8);
  in.h.resize(static_cast<size_t>(n));
  f.read(reinterpret_cast<char*>(in.h.data()), n * 4);
  f.read(reinterpret_cast<char*>(&n), 8);
  in.sc.resize(static_cast<size_t>(n));
  f.read(reinterpret_cast<char*>(in.sc.data()), n * 8);
  if (!f) throw std::runtime_error("short header");
  while (f.read(reinterpret_cast<char*>(&n), 8)) {
    std::vector<double> a(static_cast<size_t>(n));
    f.read(reinterpret_cast<char*>(a.data()), n * 8);
    if (!f) throw std::runtime_error("short array");
    in.arrays.push_back(std::move(a));
  }
  return in;
}

template <typename T>
std::vector<T> conv(const std::vector<double>& a) {
  return std::vector<T>(a.begin(), a.end());
}
std::vector<uint8_t> bytes(const std::vector<double>& a) {
  std::vector<uint8_t> v(a.size());
  for (size_t i = 0; i < a.size(); ++i) v[i] = a[i] != 0 ? 1 : 0;
  return v;
}
template <typename T>
T* ptr(std::vector<T>& v) {
  return v.empty() ? nullptr : v.data();
}

void write_out(const char* path, const int32_t (&head)[4], const std::vector<double>& out) {
  std::ofstream f(path, std::ios::binary);
  f.write(reinterpret_cast<const char*>(head), sizeof(head));
  f.write(reinterpret_cast<const char*>(out.data()), static_cast<std::streamsize>(out.size() * 8));
  if (!f) throw std::runtime_error("cannot write output");
}

template <typename T>
UpdateRule<T> rule(int64_t D, const std::vector<double>& sc, bool energy_scaled, bool tol_final_step,
                   bool bound_each_step, int noise_mode, std::vector<T>& lo, std::vector<T>& hi, std::vector<T>& clip) {
  UpdateRule<T> u;
  u.D = D;
  u.grad_scale = T(sc[0]);
  u.momentum = T(sc[1]);
  u.grad_clip = T(sc[2]);
  u.grad_clip_norm = T(sc[3]);
  u.energy_temperature = T(sc[4]);
  u.tol = T(sc[5]);
  u.energy_scaled = energy_scaled;
  u.tol_final_step = tol_final_step;
  u.bound_each_step = bound_each_step;
  u.lower = ptr(lo);
  u.upper = ptr(hi);
  u.step_clip = ptr(clip);
  u.noise = static_cast<NoiseMode>(noise_mode);
  return u;
}

template <Act A, typename T>
void launch_descent(const DescentParams<T>& P, const MlpPlan& plan, unsigned char* ws) {
  pyebm_emu::launch(plan.grid, plan.threads, plan.smem, [&] { mlp_descent_kernel<A, T>(P, plan.simt, ws); });
}

template <typename T>
int run_whole_loop(const Input& in, const char* out_path) {
  size_t h = 1;
  h++;  // dtype
  const Act act = static_cast<Act>(in.h[h++]);
  const bool residual = in.h[h++] != 0;
  const int sms = in.h[h++];
  const int smem_optin = in.h[h++];
  const int64_t B = in.h[h++], K = in.h[h++], D = in.h[h++];
  const int L = in.h[h++];
  std::vector<int> width(in.h.begin() + h, in.h.begin() + h + L);
  h += L;
  const bool nesterov = in.h[h++] != 0, energy_scaled = in.h[h++] != 0, tol_final_step = in.h[h++] != 0,
             bound_each_step = in.h[h++] != 0;
  const int noise_mode = in.h[h++];
  const int64_t N = B * K;

  std::vector<std::vector<T>> a;
  for (const auto& x : in.arrays) a.push_back(conv<T>(x));
  size_t i = 0;
  DescentParams<T> P;
  MlpParams<T>& p = P.mlp;
  p.rows = N;
  p.K = K;
  p.D = static_cast<int>(D);
  p.L = L;
  for (int l = 0; l < L; ++l) p.width[l] = width[l];
  p.ctx = a[i++].data();
  std::vector<T> y = a[i++];
  p.w_in = a[i++].data();
  for (int l = 0; l + 1 < L; ++l) {
    p.w[l] = a[i++].data();
    p.b[l] = a[i++].data();
  }
  p.w_out = a[i++].data();
  p.b_out = a[i++].data();
  p.residual = residual;
  std::vector<T>& eta = a[i++];
  std::vector<T>& nlev = a[i++];
  std::vector<T>& noise = a[i++];
  std::vector<T>& lo = a[i++];
  std::vector<T>& hi = a[i++];
  std::vector<T>& clip = a[i++];
  std::vector<uint8_t> mask = bytes(in.arrays[i++]);
  std::vector<T> fixed = mask.empty() ? std::vector<T>() : y;

  const T nan = std::numeric_limits<T>::quiet_NaN();
  std::vector<T> E_final(N, nan), E_init(N, nan), G(N * D, nan), E(N, nan), scratch(2 * N * D, nan);
  std::vector<int32_t> steps(N, -1);
  std::vector<int8_t> status(N, -1);
  std::vector<uint8_t> flags(2 * N, 0xff);
  const bool momentum = in.sc[1] > 0;
  std::vector<T> velocity(momentum ? N * D : 0, nan), q(momentum && nesterov ? N * D : 0, nan);

  P.u = rule<T>(D, in.sc, energy_scaled, tol_final_step, bound_each_step, noise_mode, lo, hi, clip);
  P.steps = static_cast<int>(eta.size());
  P.eta = eta.data();
  P.noise_level = nlev.data();
  P.noise = ptr(noise);
  P.mask = ptr(mask);
  P.fixed = ptr(fixed);
  P.nesterov = nesterov;
  P.y = y.data();
  P.E_final = E_final.data();
  P.E_init = E_init.data();
  P.steps_out = steps.data();
  P.status = status.data();
  P.G = G.data();
  P.E = E.data();
  P.scratch = scratch.data();
  P.active = flags.data();
  P.pending = flags.data() + N;
  P.velocity = ptr(velocity);
  P.q = ptr(q);

  DeviceCaps caps;
  caps.sms = sms;
  caps.smem_optin = smem_optin > 0 ? smem_optin : 227 * 1024;
  const MlpPlan plan = plan_descent<T>(P, caps);
  std::vector<unsigned char> gws(plan.ws_bytes + 16, 0xff);
  unsigned char* ws = plan.ws_bytes ? gws.data() : nullptr;
  if (N > 0) {
    switch (act) {
      case Act::kRelu: launch_descent<Act::kRelu, T>(P, plan, ws); break;
      case Act::kSilu: launch_descent<Act::kSilu, T>(P, plan, ws); break;
      case Act::kGelu: launch_descent<Act::kGelu, T>(P, plan, ws); break;
      case Act::kGeluTanh: launch_descent<Act::kGeluTanh, T>(P, plan, ws); break;
      case Act::kTanh: launch_descent<Act::kTanh, T>(P, plan, ws); break;
      case Act::kSoftplus: launch_descent<Act::kSoftplus, T>(P, plan, ws); break;
    }
  }
  std::vector<double> out(y.begin(), y.end());
  out.insert(out.end(), E_final.begin(), E_final.end());
  out.insert(out.end(), E_init.begin(), E_init.end());
  out.insert(out.end(), steps.begin(), steps.end());
  out.insert(out.end(), status.begin(), status.end());
  const int32_t head[4] = {static_cast<int32_t>(plan.grid), plan.threads, static_cast<int32_t>(plan.smem),
                           plan.simt.in_smem ? 1 : 0};
  write_out(out_path, head, out);
  return 0;
}

template <typename T>
int run_update(const Input& in, const char* out_path) {
  const int64_t N = in.h[2], D = in.h[3];
  const bool energy_scaled = in.h[4] != 0, tol_final_step = in.h[5] != 0, bound_each_step = in.h[6] != 0;
  const int noise_mode = in.h[7];
  const auto& A = in.arrays;
  std::vector<T> y = conv<T>(A[0]), g = conv<T>(A[1]), E = conv<T>(A[2]);
  std::vector<uint8_t> active = bytes(A[3]);
  std::vector<int32_t> steps(A[4].begin(), A[4].end());
  std::vector<int8_t> status(A[5].begin(), A[5].end());
  std::vector<T> velocity = conv<T>(A[6]);
  std::vector<uint8_t> pending = bytes(A[7]);
  std::vector<T> noise = conv<T>(A[8]);
  std::vector<uint8_t> mask = bytes(A[9]);
  std::vector<T> fixed = conv<T>(A[10]), lo = conv<T>(A[11]), hi = conv<T>(A[12]), clip = conv<T>(A[13]);
  std::vector<T> scratch(2 * N * D, std::numeric_limits<T>::quiet_NaN());

  UpdateParams<T> a;
  a.rows = N;
  a.u = rule<T>(D, in.sc, energy_scaled, tol_final_step, bound_each_step, noise_mode, lo, hi, clip);
  a.eta = T(in.sc[6]);
  a.noise_level = T(in.sc[7]);
  a.y = y.data();
  a.g = g.data();
  a.E = E.data();
  a.active = active.data();
  a.steps = steps.data();
  a.status = status.data();
  a.velocity = ptr(velocity);
  a.pending = ptr(pending);
  a.noise = noise_mode != 0 ? ptr(noise) : nullptr;
  a.mask = ptr(mask);
  a.fixed = ptr(fixed);
  a.scratch = ptr(scratch);
  const unsigned grid = static_cast<unsigned>((N + kUpdateThreads - 1) / kUpdateThreads);
  if (N > 0) pyebm_emu::launch(grid, kUpdateThreads, 0, [&] { descent_update_kernel<T>(a); });
  std::vector<double> out(y.begin(), y.end());
  out.insert(out.end(), active.begin(), active.end());
  out.insert(out.end(), steps.begin(), steps.end());
  out.insert(out.end(), status.begin(), status.end());
  out.insert(out.end(), velocity.begin(), velocity.end());
  out.insert(out.end(), pending.begin(), pending.end());
  const int32_t head[4] = {static_cast<int32_t>(grid), kUpdateThreads, 0, 0};
  write_out(out_path, head, out);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s IN OUT\n", argv[0]);
    return 2;
  }
  try {
    const Input in = read_input(argv[1]);
    const int mode = in.h.at(0), dtype = in.h.at(1);
    if (mode == 0) return dtype == 1 ? run_whole_loop<double>(in, argv[2]) : run_whole_loop<float>(in, argv[2]);
    if (mode == 1) return dtype == 1 ? run_update<double>(in, argv[2]) : run_update<float>(in, argv[2]);
    std::fprintf(stderr, "bad mode\n");
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 2;
  }
}
