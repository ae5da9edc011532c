// CUDA implementation of pyebm::mlp_energy_grad and pyebm::mlp_energy: input checks, dtype dispatch and
// the launch on the current stream. The kernels are torch-free, in pyebm/cuda/mlp_energy.cuh.
//
// Only device-generic c10 APIs are used here (DeviceGuard, the registered CUDA guard implementation
// for the current stream), so this file also compiles against a CPU-only torch: the nvcc compile check
// builds it on machines without a CUDA torch.
//
// Environment (read on every call; meant for tests and debugging):
//   PYEBM_CUDA_PATH=auto|tc|simt  force the tensor-core or the SIMT kernel where it can run.
//   PYEBM_CUDA_POISON=1           fill E and G with NaN before the kernel, so elements it fails to
//                                 write show up as NaN.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "cpu/mlp_energy_cpu.h"
#include "cuda/glue.h"
#include "pyebm/cuda/mlp_energy.cuh"

namespace pyebm {
namespace gpu {
namespace {

MlpPath requested_path() {
  const char* env = std::getenv("PYEBM_CUDA_PATH");
  if (env == nullptr || env[0] == '\0' || std::strcmp(env, "auto") == 0) return MlpPath::kAuto;
  if (std::strcmp(env, "tc") == 0) return MlpPath::kTensorCore;
  if (std::strcmp(env, "simt") == 0) return MlpPath::kSimt;
  TORCH_CHECK(false, "pyebm: PYEBM_CUDA_PATH must be auto, tc or simt; got '", env, "'");
}


// at:: element type -> CUDA element type (same bits).
template <typename S>
struct CudaType { using type = S; };
template <>
struct CudaType<at::BFloat16> { using type = __nv_bfloat16; };
template <>
struct CudaType<at::Half> { using type = __half; };

template <typename S>
void run(const cpu::MlpShapes& s, const at::Tensor& ctx, const at::Tensor& y, const at::Tensor& w_in,
         const std::vector<at::Tensor>& w, const std::vector<at::Tensor>& b, const at::Tensor& w_out,
         const at::Tensor& b_out, bool residual, Act act, at::Tensor& E, at::Tensor* G) {
  using T = typename CudaType<S>::type;
  static_assert(sizeof(T) == sizeof(S), "element types must match bit for bit");
  auto ptr = [](const at::Tensor& t) { return reinterpret_cast<const T*>(t.data_ptr<S>()); };
  MlpParams<T> p;
  p.rows = s.B * s.K;
  p.K = s.K;
  p.D = static_cast<int>(s.D);
  p.L = static_cast<int>(s.width.size());
  for (int l = 0; l < p.L; ++l) p.width[l] = static_cast<int>(s.width[l]);
  p.ctx = ptr(ctx);
  p.y = ptr(y);
  p.w_in = ptr(w_in);
  for (size_t l = 0; l < w.size(); ++l) {
    p.w[l] = ptr(w[l]);
    p.b[l] = ptr(b[l]);
  }
  p.w_out = ptr(w_out);
  p.b_out = ptr(b_out);
  p.residual = residual;
  p.E = reinterpret_cast<T*>(E.data_ptr<S>());
  p.G = G ? reinterpret_cast<T*>(G->data_ptr<S>()) : nullptr;

  const int device = y.device().index();
  DeviceCaps caps;
  cudaError_t err = query_device(device, &caps);
  TORCH_CHECK(err == cudaSuccess, "pyebm: cannot query CUDA device ", device, ": ", cudaGetErrorString(err));
  const MlpPlan plan = plan_mlp<T>(p, G != nullptr, caps, requested_path());
  at::Tensor ws;
  if (plan.ws_bytes > 0) ws = at::empty({static_cast<int64_t>(plan.ws_bytes)}, y.options().dtype(at::kByte));
  err = launch_mlp<T>(p, act, plan, ws.defined() ? ws.data_ptr() : nullptr, device, caps, current_stream(y.device()));
  TORCH_CHECK(err == cudaSuccess, "pyebm: CUDA mlp_energy kernel launch failed: ", cudaGetErrorString(err));
}

std::tuple<at::Tensor, at::Tensor> mlp_impl(const at::Tensor& ctx_, const at::Tensor& y_, const at::Tensor& w_in_,
                                            at::TensorList weights_, at::TensorList biases_,
                                            const at::Tensor& w_out_, const at::Tensor& b_out_,
                                            c10::string_view activation, bool residual, bool grad) {
  const char* op = grad ? "pyebm::mlp_energy_grad" : "pyebm::mlp_energy";
  // every tensor's layout, shape, dtype and device (csrc/cpu/op_checks.h, shared with the CPU ops)
  const cpu::MlpShapes s = cpu::check_mlp_args(ctx_, y_, w_in_, weights_, biases_, w_out_, b_out_, op);
  TORCH_CHECK_VALUE(y_.is_cuda(), op, ": the cuda kernel needs CUDA tensors; got y on ", y_.device());
  const Act act = cpu::parse_activation(std::string(activation));
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  TORCH_CHECK_VALUE(s.D <= kIntMax, op, ": candidate width D = ", s.D, " is too large for the cuda kernel");
  for (size_t l = 0; l < s.width.size(); ++l)
    TORCH_CHECK_VALUE(s.width[l] <= kIntMax, op, ": hidden width H_", l + 1, " = ", s.width[l],
                      " is too large for the cuda kernel");
  const MlpPath path = requested_path();
  TORCH_CHECK_VALUE(path != MlpPath::kTensorCore || y_.scalar_type() == at::kBFloat16 || y_.scalar_type() == at::kHalf,
                    op, ": PYEBM_CUDA_PATH=tc needs bfloat16 or float16 inputs; got ", y_.scalar_type());

  const c10::DeviceGuard guard(y_.device());
  // Contiguous row-major operands (a no-op for the usual contiguous parameters).
  const at::Tensor ctx = ctx_.contiguous(), y = y_.contiguous(), w_in = w_in_.contiguous();
  const at::Tensor w_out = w_out_.contiguous(), b_out = b_out_.contiguous();
  std::vector<at::Tensor> w, b;
  w.reserve(weights_.size());
  b.reserve(biases_.size());
  for (const auto& t : weights_) w.push_back(t.contiguous());
  for (const auto& t : biases_) b.push_back(t.contiguous());

  at::Tensor E = at::empty({s.B, s.K}, y.options());
  at::Tensor G = grad ? at::empty({s.B, s.K, s.D}, y.options()) : at::Tensor();
  if (s.B * s.K == 0) return {E, G};
  if (s.D == 0) {
    // No candidate coordinates: E depends on the context alone and the gradient is empty. The kernel
    // wants D >= 1, so feed it one zero coordinate with a zero input weight.
    const at::Tensor y1 = at::zeros({s.B, s.K, 1}, y.options());
    const at::Tensor w1 = at::zeros({w_in.size(0), 1}, w_in.options());
    at::Tensor G1 = grad ? at::empty({s.B, s.K, 1}, y.options()) : at::Tensor();
    cpu::MlpShapes s1 = s;
    s1.D = 1;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "pyebm_mlp_energy_cuda", [&] {
      run<scalar_t>(s1, ctx, y1, w1, w, b, w_out, b_out, residual, act, E, grad ? &G1 : nullptr);
    });
    return {E, G};
  }
  if (poison_outputs()) {
    E.fill_(std::numeric_limits<double>::quiet_NaN());
    if (grad) G.fill_(std::numeric_limits<double>::quiet_NaN());
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "pyebm_mlp_energy_cuda", [&] {
    run<scalar_t>(s, ctx, y, w_in, w, b, w_out, b_out, residual, act, E, grad ? &G : nullptr);
  });
  return {E, G};
}

std::tuple<at::Tensor, at::Tensor> mlp_energy_grad_cuda(const at::Tensor& ctx, const at::Tensor& y,
                                                        const at::Tensor& w_in, at::TensorList weights,
                                                        at::TensorList biases, const at::Tensor& w_out,
                                                        const at::Tensor& b_out, c10::string_view activation,
                                                        bool residual) {
  return mlp_impl(ctx, y, w_in, weights, biases, w_out, b_out, activation, residual, /*grad=*/true);
}

at::Tensor mlp_energy_cuda(const at::Tensor& ctx, const at::Tensor& y, const at::Tensor& w_in,
                           at::TensorList weights, at::TensorList biases, const at::Tensor& w_out,
                           const at::Tensor& b_out, c10::string_view activation, bool residual) {
  return std::get<0>(mlp_impl(ctx, y, w_in, weights, biases, w_out, b_out, activation, residual, /*grad=*/false));
}

at::Tensor dispatch_floor_cuda(const at::Tensor& x) { return at::empty({0}, x.options()); }

}  // namespace

TORCH_LIBRARY_IMPL(pyebm, CUDA, m) {
  m.impl("mlp_energy_grad", &mlp_energy_grad_cuda);
  m.impl("mlp_energy", &mlp_energy_cuda);
  m.impl("dispatch_floor", &dispatch_floor_cuda);
}

}  // namespace gpu
}  // namespace pyebm
