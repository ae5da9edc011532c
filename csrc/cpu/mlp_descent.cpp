// Whole-loop descent for the MLP energy on CPU (pyebm::mlp_descent) and the fused per-step update
// (pyebm::descent_update). The whole loop runs every step of a block of candidate rows back to back:
// energy + input gradient (mlp_block), then the update (update_row), so a block's rows, their
// activations and velocity stay in this core's cache for all T steps. Blocks run in parallel; a block
// stops early once none of its rows is running. No host round trip happens inside the loop.
#include <torch/library.h>

#include <cstring>

#include "descent_args.h"
#include "descent_update.h"
#include "mlp_block.h"
#include "mlp_descent_cpu.h"
#include "mlp_energy_cpu.h"
#include "op_checks.h"

namespace pyebm {
namespace cpu {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mlp_descent_cpu(
    const at::Tensor& ctx_, const at::Tensor& y0_, const at::Tensor& w_in_, at::TensorList weights_,
    at::TensorList biases_, const at::Tensor& w_out_, const at::Tensor& b_out_, c10::string_view activation,
    bool residual, const at::Tensor& eta_, const at::Tensor& noise_level_, const c10::optional<at::Tensor>& noise_,
    const c10::optional<at::Tensor>& lower_, const c10::optional<at::Tensor>& upper_,
    const c10::optional<at::Tensor>& step_clip_, const c10::optional<at::Tensor>& mask_, double grad_scale,
    double momentum, bool nesterov, c10::optional<double> grad_clip, c10::optional<double> grad_clip_norm,
    bool energy_scaled, double energy_temperature, double tol, bool tol_final_step, bool bound_each_step,
    c10::string_view noise_mode) {
  const char* op = "pyebm::mlp_descent";
  const MlpShapes s = check_mlp_args(ctx_, y0_, w_in_, weights_, biases_, w_out_, b_out_, op, "y0");
  TORCH_CHECK_VALUE(y0_.device().is_cpu(), op, ": the cpu kernel needs CPU tensors; got y0 on ", y0_.device());
  const Act act = parse_activation(std::string(activation));
  const NoiseMode nm = parse_noise(noise_mode);
  check_rule(momentum, grad_clip, grad_clip_norm, energy_temperature, tol);
  checks::finite(op, "grad_scale", grad_scale);
  const int64_t Tn = eta_.numel();
  TORCH_CHECK_VALUE(eta_.dim() == 1 && Tn >= 1, op, ": eta must be a floating [steps] tensor with steps >= 1; got ",
                    checks::describe(eta_));
  const std::vector<double> eta = host_schedule(eta_, "eta", Tn, op, y0_.device());
  const std::vector<double> nlev = host_schedule(noise_level_, "noise_level", Tn, op, y0_.device(), /*non_negative=*/true);
  const auto out_dtype = y0_.scalar_type();
  const MlpTensors mt = prepare_mlp(ctx_, out_dtype, w_in_, weights_, biases_, w_out_, b_out_,
                                    /*transposes_for_rows=*/std::max<int64_t>(1, s.B * s.K));
  const auto dt = mt.dtype;
  const int64_t B = s.B, K = s.K, D = s.D, N = B * K;

  DescentInputs in = prepare_descent_inputs(y0_, dt, Tn, mask_, noise_, lower_, upper_, step_clip_, nm, noise_mode);
  at::Tensor y = in.y;  // the state, updated in place
  const at::Tensor &fixed = in.fixed, &mask = in.mask, &noise = in.noise;
  const at::Tensor &lower = in.lower, &upper = in.upper, &step_clip = in.step_clip;

  at::Tensor E_final = at::empty({B, K}, y.options());
  at::Tensor E_init = at::empty({B, K}, y.options());
  at::Tensor steps = at::empty({B, K}, y.options().dtype(at::kInt));
  at::Tensor status = at::empty({B, K}, y.options().dtype(at::kChar));
  if (N > 0) {
    AT_DISPATCH_FLOATING_TYPES(dt, "pyebm_mlp_descent", [&] {
      using T = scalar_t;
      const MlpDesc<T> p = make_desc<T>(s, mt, residual);
      const UpdateRule<T> u = make_rule<T>(D, grad_scale, momentum, grad_clip, grad_clip_norm, energy_scaled,
                                           energy_temperature, tol, tol_final_step, bound_each_step, lower, upper,
                                           step_clip, nm);
      run_descent<T>(p, u, act, eta, nlev, N, y.data_ptr<T>(), fixed.defined() ? fixed.data_ptr<T>() : nullptr,
                     mask.defined() ? reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>()) : nullptr,
                     noise.defined() ? noise.data_ptr<T>() : nullptr, nesterov, E_final.data_ptr<T>(),
                     E_init.data_ptr<T>(), steps.data_ptr<int32_t>(), status.data_ptr<int8_t>());
    });
  }
  return descent_outputs(y, E_final, E_init, steps, status, out_dtype);
}

// In place on y, velocity, active, steps, status and pending; g is clobbered (scratch).
void descent_update_cpu(const at::Tensor& y, const at::Tensor& g, const at::Tensor& E, const at::Tensor& active,
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
  // y_base: where the step starts (default y), e.g. the normalised state, while y keeps the committed one
  const NoiseMode nm = check_update_args(y, g, E, active, steps, status, velocity, pending, noise, mask, fixed,
                                         noise_mode, momentum, tol_final_step, y_base);
  TORCH_CHECK_VALUE(y.device().is_cpu(), op, ": the cpu kernel needs CPU tensors; got y on ", y.device());
  check_rule(momentum, grad_clip, grad_clip_norm, energy_temperature, tol);
  check_step_scalars(op, eta, noise_level, grad_scale);
  const int64_t N = y.size(0), D = y.size(1);
  const auto dt = y.scalar_type();
  const EventOptions ev = event_options(lower, upper, step_clip, D, dt, y.device(), op);
  const at::Tensor &lo = ev.lower, &hi = ev.upper, &sc = ev.step_clip;
  AT_DISPATCH_FLOATING_TYPES(dt, "pyebm_descent_update", [&] {
    using T = scalar_t;
    const UpdateRule<T> u = make_rule<T>(D, grad_scale, momentum, grad_clip, grad_clip_norm, energy_scaled,
                                         energy_temperature, tol, tol_final_step, bound_each_step, lo, hi, sc, nm);
    T* yp = y.data_ptr<T>();
    const T* bp = y_base.has_value() ? y_base->data_ptr<T>() : yp;
    T* gp = g.data_ptr<T>();
    const T* Ep = E.data_ptr<T>();
    uint8_t* ap = reinterpret_cast<uint8_t*>(active.data_ptr<bool>());
    int32_t* sp = steps.data_ptr<int32_t>();
    int8_t* stp = status.data_ptr<int8_t>();
    T* vp = velocity ? velocity->data_ptr<T>() : nullptr;
    uint8_t* pp = pending ? reinterpret_cast<uint8_t*>(pending->data_ptr<bool>()) : nullptr;
    const T* xp = (noise && nm != NoiseMode::kNone) ? noise->data_ptr<T>() : nullptr;
    const uint8_t* mp = mask ? reinterpret_cast<const uint8_t*>(mask->data_ptr<bool>()) : nullptr;
    const T* fp = mask ? fixed->data_ptr<T>() : nullptr;
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, D));
    at::parallel_for(0, N, grain, [&](int64_t i0, int64_t i1) {
      T* scratch = thread_scratch<T>(2 * D);
      for (int64_t i = i0; i < i1; ++i) {
        RowState<T> st{yp + i * D, vp ? vp + i * D : nullptr, ap + i, sp + i, stp + i, pp ? pp + i : nullptr};
        update_row<T>(u, T(eta), T(noise_level), Ep[i], gp + i * D, bp + i * D, xp ? xp + i * D : nullptr,
                      mp ? mp + i * D : nullptr, fp ? fp + i * D : nullptr, st, scratch);
      }
    });
  });
}

}  // namespace

// Schemas: csrc/ops.cpp.
TORCH_LIBRARY_IMPL(pyebm, CPU, m) {
  m.impl("mlp_descent", &mlp_descent_cpu);
  m.impl("descent_update", &descent_update_cpu);
}

}  // namespace cpu
}  // namespace pyebm
