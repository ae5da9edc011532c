// CUDA implementation of pyebm::mlp_descent (whole loop) and pyebm::descent_update (fused per-step
// update): input checks (csrc/cpu/op_checks.h, shared with the CPU ops), dtype dispatch and the launch on the
// current stream. The kernels are torch-free, in pyebm/cuda/descent.cuh; the schemas are in csrc/ops.cpp.
//
// Only device-generic c10 APIs are used (as in mlp_energy.cu), so this file also compiles against a
// CPU-only torch for the nvcc compile check.
//
// Environment: PYEBM_CUDA_POISON=1 fills the outputs of mlp_descent (E_final, E_init with NaN, steps and
// status with -1) before the kernel, so rows it fails to write show up.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/library.h>

#include <cstdlib>
#include <limits>
#include <string>
#include <vector>

#include "cpu/descent_args.h"
#include "cpu/mlp_energy_cpu.h"
#include "cpu/op_checks.h"
#include "cuda/glue.h"
#include "pyebm/cuda/descent.cuh"

namespace pyebm {
namespace gpu {
namespace {

using cpu::check_rule;
using cpu::check_update_args;
using cpu::event_option;
using cpu::make_rule;
using cpu::parse_noise;

template <typename T>
T* opt_ptr(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}
uint8_t* byte_ptr(const at::Tensor& t) {
  return t.defined() ? reinterpret_cast<uint8_t*>(t.data_ptr()) : nullptr;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mlp_descent_cuda(
    const at::Tensor& ctx_, const at::Tensor& y0_, const at::Tensor& w_in_, at::TensorList weights_,
    at::TensorList biases_, const at::Tensor& w_out_, const at::Tensor& b_out_, c10::string_view activation,
    bool residual, const at::Tensor& eta_, const at::Tensor& noise_level_, const c10::optional<at::Tensor>& noise_,
    const c10::optional<at::Tensor>& lower_, const c10::optional<at::Tensor>& upper_,
    const c10::optional<at::Tensor>& step_clip_, const c10::optional<at::Tensor>& mask_, double grad_scale,
    double momentum, bool nesterov, c10::optional<double> grad_clip, c10::optional<double> grad_clip_norm,
    bool energy_scaled, double energy_temperature, double tol, bool tol_final_step, bool bound_each_step,
    c10::string_view noise_mode) {
  const char* op = "pyebm::mlp_descent";
  const cpu::MlpShapes s = cpu::check_mlp_args(ctx_, y0_, w_in_, weights_, biases_, w_out_, b_out_, op, "y0");
  TORCH_CHECK_VALUE(y0_.is_cuda(), op, ": the cuda kernel needs CUDA tensors; got y0 on ", y0_.device());
  const Act act = cpu::parse_activation(std::string(activation));
  const NoiseMode nm = parse_noise(noise_mode);
  check_rule(momentum, grad_clip, grad_clip_norm, energy_temperature, tol);
  checks::finite(op, "grad_scale", grad_scale);
  const int64_t Tn = eta_.numel();
  TORCH_CHECK_VALUE(eta_.dim() == 1 && Tn >= 1, op, ": eta must be a floating [steps] tensor with steps >= 1; got ",
                    checks::describe(eta_));
  // the schedules' shapes, dtypes and values (host copies; the whole loop reads them from the device below)
  cpu::host_schedule(eta_, "eta", Tn, op, y0_.device());
  cpu::host_schedule(noise_level_, "noise_level", Tn, op, y0_.device(), /*non_negative=*/true);
  TORCH_CHECK_VALUE(Tn <= std::numeric_limits<int>::max(), op, ": too many steps for the cuda kernel: ", Tn);
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  TORCH_CHECK_VALUE(s.D >= 1 && s.D <= kIntMax, op, ": the cuda whole-loop kernel needs 1 <= D <= ", kIntMax,
                    "; got candidate width D = ", s.D);
  for (size_t l = 0; l < s.width.size(); ++l)
    TORCH_CHECK_VALUE(s.width[l] <= kIntMax, op, ": hidden width H_", l + 1, " = ", s.width[l],
                      " is too large for the cuda kernel");

  const at::Device device = y0_.device();
  const c10::DeviceGuard guard(device);
  const auto out_dtype = y0_.scalar_type();
  // 16-bit inputs compute in fp32, like the CPU op.
  const cpu::MlpTensors mt = cpu::prepare_mlp(ctx_, out_dtype, w_in_, weights_, biases_, w_out_, b_out_);
  const auto dt = mt.dtype;
  const int64_t B = s.B, K = s.K, D = s.D, N = B * K;

  cpu::DescentInputs in =
      cpu::prepare_descent_inputs(y0_, dt, Tn, mask_, noise_, lower_, upper_, step_clip_, nm, noise_mode);
  at::Tensor y = in.y;  // the state, updated in place
  const at::Tensor &fixed = in.fixed, &mask = in.mask, &noise = in.noise;
  const at::Tensor &lower = in.lower, &upper = in.upper, &step_clip = in.step_clip;
  // The schedules as device arrays in the compute dtype (from the host: a small copy).
  const at::Tensor eta = eta_.to(device, dt).contiguous();
  const at::Tensor nlev = noise_level_.to(device, dt).contiguous();

  const auto opts = y.options();
  at::Tensor E_final = at::empty({B, K}, opts);
  at::Tensor E_init = at::empty({B, K}, opts);
  at::Tensor steps = at::empty({B, K}, opts.dtype(at::kInt));
  at::Tensor status = at::empty({B, K}, opts.dtype(at::kChar));
  if (N > 0) {
    if (poison_outputs()) {
      E_final.fill_(std::numeric_limits<double>::quiet_NaN());
      E_init.fill_(std::numeric_limits<double>::quiet_NaN());
      steps.fill_(-1);
      status.fill_(-1);
    }
    const bool look_ahead = nesterov && momentum > 0;
    at::Tensor G = at::empty({N, D}, opts), E = at::empty({N}, opts), scratch = at::empty({N, 2 * D}, opts);
    at::Tensor flags = at::empty({2, N}, opts.dtype(at::kByte));
    at::Tensor velocity = momentum > 0 ? at::empty({N, D}, opts) : at::Tensor();
    at::Tensor q = look_ahead ? at::empty({N, D}, opts) : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES(dt, "pyebm_mlp_descent_cuda", [&] {
      using T = scalar_t;
      DescentParams<T> P;
      MlpParams<T>& p = P.mlp;
      p.rows = N;
      p.K = K;
      p.D = static_cast<int>(D);
      p.L = static_cast<int>(s.width.size());
      for (int l = 0; l < p.L; ++l) p.width[l] = static_cast<int>(s.width[l]);
      p.ctx = mt.ctx.data_ptr<T>();
      p.w_in = mt.w_in.data_ptr<T>();
      for (size_t l = 0; l < mt.w.size(); ++l) {
        p.w[l] = mt.w[l].data_ptr<T>();
        p.b[l] = mt.b[l].data_ptr<T>();
      }
      p.w_out = mt.w_out.data_ptr<T>();
      p.b_out = mt.b_out.data_ptr<T>();
      p.residual = residual;
      P.u = make_rule<T>(D, grad_scale, momentum, grad_clip, grad_clip_norm, energy_scaled, energy_temperature, tol,
                         tol_final_step, bound_each_step, lower, upper, step_clip, nm);
      P.steps = static_cast<int>(Tn);
      P.eta = eta.data_ptr<T>();
      P.noise_level = nlev.data_ptr<T>();
      P.noise = opt_ptr<T>(noise);
      P.mask = byte_ptr(mask);
      P.fixed = opt_ptr<T>(fixed);
      P.nesterov = nesterov;
      P.y = y.data_ptr<T>();
      P.E_final = E_final.data_ptr<T>();
      P.E_init = E_init.data_ptr<T>();
      P.steps_out = steps.data_ptr<int32_t>();
      P.status = status.data_ptr<int8_t>();
      P.G = G.data_ptr<T>();
      P.E = E.data_ptr<T>();
      P.scratch = scratch.data_ptr<T>();
      P.active = byte_ptr(flags);
      P.pending = P.active + N;
      P.velocity = opt_ptr<T>(velocity);
      P.q = opt_ptr<T>(q);

      const int dev = device.index();
      DeviceCaps caps;
      cudaError_t err = query_device(dev, &caps);
      TORCH_CHECK(err == cudaSuccess, "pyebm: cannot query CUDA device ", dev, ": ", cudaGetErrorString(err));
      const MlpPlan plan = plan_descent<T>(P, caps);
      at::Tensor ws;
      if (plan.ws_bytes > 0) ws = at::empty({static_cast<int64_t>(plan.ws_bytes)}, opts.dtype(at::kByte));
      err = launch_mlp_descent<T>(P, act, plan, ws.defined() ? ws.data_ptr() : nullptr, dev, caps,
                                  current_stream(device));
      TORCH_CHECK(err == cudaSuccess, "pyebm: CUDA mlp_descent kernel launch failed: ", cudaGetErrorString(err));
    });
  }
  return cpu::descent_outputs(y, E_final, E_init, steps, status, out_dtype);
}

// In place on y, velocity, active, steps, status and pending; g is clobbered (scratch).
void descent_update_cuda(const at::Tensor& y, const at::Tensor& g, const at::Tensor& E, const at::Tensor& active,
                         const at::Tensor& steps, const at::Tensor& status, const c10::optional<at::Tensor>& velocity,
                         const c10::optional<at::Tensor>& pending, const c10::optional<at::Tensor>& noise,
                         const c10::optional<at::Tensor>& mask, const c10::optional<at::Tensor>& fixed,
                         const c10::optional<at::Tensor>& lower, const c10::optional<at::Tensor>& upper,
                         const c10::optional<at::Tensor>& step_clip, double eta, double noise_level,
                         c10::string_view noise_mode, double grad_scale, double momentum,
                         c10::optional<double> grad_clip, c10::optional<double> grad_clip_norm, bool energy_scaled,
                         double energy_temperature, double tol, bool tol_final_step, bool bound_each_step,
                         const c10::optional<at::Tensor>& y_base) {
  const char* op = "pyebm::descent_update";
  TORCH_CHECK_VALUE(!y_base.has_value(), op, ": the cuda kernel does not take y_base (the step starts at y)");
  const NoiseMode nm = check_update_args(y, g, E, active, steps, status, velocity, pending, noise, mask, fixed,
                                         noise_mode, momentum, tol_final_step);
  TORCH_CHECK_VALUE(y.is_cuda(), op, ": the cuda kernel needs CUDA tensors; got y on ", y.device());
  const int64_t N = y.size(0), D = y.size(1);
  const at::Device device = y.device();
  const auto dt = y.scalar_type();
  check_rule(momentum, grad_clip, grad_clip_norm, energy_temperature, tol);
  cpu::check_step_scalars(op, eta, noise_level, grad_scale);
  const c10::DeviceGuard guard(device);
  // Bounds and step clips given as CPU tensors are checked on the host and copied over; ones on the device
  // are checked through a small synchronising copy (checks::event_values), except while a CUDA graph is being
  // captured, where no host read is allowed.
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  const cudaError_t cerr = cudaStreamIsCapturing(current_stream(device), &capture);
  TORCH_CHECK(cerr == cudaSuccess, op, ": cannot query the stream's capture status: ", cudaGetErrorString(cerr));
  const cpu::EventOptions ev = cpu::event_options(lower, upper, step_clip, D, dt, device, op,
                                                  /*read_device=*/capture == cudaStreamCaptureStatusNone);
  if (N == 0) return;
  const at::Tensor &lo = ev.lower, &hi = ev.upper, &sc = ev.step_clip;
  at::Tensor scratch = at::empty({N, 2 * D}, y.options());
  AT_DISPATCH_FLOATING_TYPES(dt, "pyebm_descent_update_cuda", [&] {
    using T = scalar_t;
    UpdateParams<T> a;
    a.rows = N;
    a.u = make_rule<T>(D, grad_scale, momentum, grad_clip, grad_clip_norm, energy_scaled, energy_temperature, tol,
                       tol_final_step, bound_each_step, lo, hi, sc, nm);
    a.eta = T(eta);
    a.noise_level = T(noise_level);
    a.y = y.data_ptr<T>();
    a.g = g.data_ptr<T>();
    a.E = E.data_ptr<T>();
    a.active = reinterpret_cast<uint8_t*>(active.data_ptr<bool>());
    a.steps = steps.data_ptr<int32_t>();
    a.status = status.data_ptr<int8_t>();
    a.velocity = velocity ? velocity->data_ptr<T>() : nullptr;
    a.pending = pending ? reinterpret_cast<uint8_t*>(pending->data_ptr<bool>()) : nullptr;
    a.noise = (noise && nm != NoiseMode::kNone) ? noise->data_ptr<T>() : nullptr;
    a.mask = mask ? reinterpret_cast<const uint8_t*>(mask->data_ptr<bool>()) : nullptr;
    a.fixed = mask ? fixed->data_ptr<T>() : nullptr;
    a.scratch = scratch.data_ptr<T>();
    const cudaError_t err = launch_descent_update<T>(a, current_stream(device));
    TORCH_CHECK(err == cudaSuccess, "pyebm: CUDA descent_update kernel launch failed: ", cudaGetErrorString(err));
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(pyebm, CUDA, m) {
  m.impl("mlp_descent", &mlp_descent_cuda);
  m.impl("descent_update", &descent_update_cuda);
}

}  // namespace gpu
}  // namespace pyebm
