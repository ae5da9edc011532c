// Argument handling shared by the CPU and CUDA implementations of pyebm::descent_update and
// pyebm::mlp_descent: parsing, range and shape checks with errors that name the argument, and the
// UpdateRule built from the op's options. ATen glue (device-agnostic); the math is descent_update.h.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <vector>

#include "descent_update.h"
#include "mlp_energy_cpu.h"

namespace pyebm {
namespace cpu {

inline NoiseMode parse_noise(c10::string_view s) {
  if (s == "none") return NoiseMode::kNone;
  if (s == "langevin") return NoiseMode::kLangevin;
  if (s == "step") return NoiseMode::kStep;
  if (s == "additive") return NoiseMode::kAdditive;
  TORCH_CHECK(false, "pyebm: noise_mode must be one of none, langevin, step, additive; got '", std::string(s), "'");
}

inline void check_rule(double momentum, c10::optional<double> grad_clip, c10::optional<double> grad_clip_norm,
                       double energy_temperature, double tol) {
  TORCH_CHECK(!grad_clip.has_value() || *grad_clip > 0, "pyebm: grad_clip must be > 0; got ", *grad_clip);
  TORCH_CHECK(!grad_clip_norm.has_value() || *grad_clip_norm > 0, "pyebm: grad_clip_norm must be > 0; got ",
              *grad_clip_norm);
  TORCH_CHECK(momentum >= 0 && momentum < 1, "pyebm: momentum must be in [0, 1); got ", momentum);
  TORCH_CHECK(tol >= 0, "pyebm: tol must be >= 0; got ", tol);
  TORCH_CHECK(energy_temperature > 0, "pyebm: energy_temperature must be > 0; got ", energy_temperature);
}

// A per-step schedule [steps] (any device, any floating dtype) as host doubles.
inline std::vector<double> host_schedule(const at::Tensor& t, const char* name, int64_t T_) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == T_, "pyebm: ", name, " must be [steps] = [", T_, "]; got shape ",
              t.sizes());
  at::Tensor c = t.to(at::kCPU, at::kDouble).contiguous();
  const double* p = c.data_ptr<double>();
  return std::vector<double>(p, p + T_);
}

// An optional per-dimension option as a contiguous [D] tensor in the compute dtype on `device` (undefined
// if absent). One value is broadcast to D; values given on another device are copied over.
inline at::Tensor event_option(const c10::optional<at::Tensor>& t, const char* name, int64_t D, at::ScalarType dt,
                               const at::Device& device) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  TORCH_CHECK(t->numel() == D || t->numel() == 1, "pyebm: ", name, " must hold 1 or D = ", D,
              " values; got shape ", t->sizes());
  const at::Tensor v = t->reshape({-1}).expand({D});
  return (v.device() == device && v.scalar_type() == dt) ? v.contiguous() : v.to(device, dt).contiguous();
}

template <typename T>
UpdateRule<T> make_rule(int64_t D, double grad_scale, double momentum, c10::optional<double> grad_clip,
                        c10::optional<double> grad_clip_norm, bool energy_scaled, double energy_temperature,
                        double tol, bool tol_final_step, bool bound_each_step, const at::Tensor& lower,
                        const at::Tensor& upper, const at::Tensor& step_clip, NoiseMode noise) {
  check_rule(momentum, grad_clip, grad_clip_norm, energy_temperature, tol);
  UpdateRule<T> u;
  u.D = D;
  u.grad_scale = T(grad_scale);
  u.momentum = T(momentum);
  u.grad_clip = grad_clip.has_value() ? T(*grad_clip) : T(0);
  u.grad_clip_norm = grad_clip_norm.has_value() ? T(*grad_clip_norm) : T(0);
  u.energy_scaled = energy_scaled;
  u.energy_temperature = T(energy_temperature);
  u.tol = T(tol);
  u.tol_final_step = tol_final_step;
  u.bound_each_step = bound_each_step;
  u.lower = lower.defined() ? lower.data_ptr<T>() : nullptr;
  u.upper = upper.defined() ? upper.data_ptr<T>() : nullptr;
  u.step_clip = step_clip.defined() ? step_clip.data_ptr<T>() : nullptr;
  u.noise = noise;
  return u;
}

// The state and inputs of the whole-loop op pyebm::mlp_descent in the compute dtype dt, on y0's device:
// the state y (a copy of y0, updated in place), the mask and the values it clamps (y0), the pre-drawn
// noise [steps, B, K, D] when noise_mode needs it, and the per-dimension options.
struct DescentInputs {
  at::Tensor y, fixed, mask, noise, lower, upper, step_clip;
};

inline DescentInputs prepare_descent_inputs(const at::Tensor& y0, at::ScalarType dt, int64_t steps,
                                            const c10::optional<at::Tensor>& mask,
                                            const c10::optional<at::Tensor>& noise,
                                            const c10::optional<at::Tensor>& lower,
                                            const c10::optional<at::Tensor>& upper,
                                            const c10::optional<at::Tensor>& step_clip, NoiseMode nm,
                                            c10::string_view noise_mode) {
  const int64_t B = y0.size(0), K = y0.size(1), D = y0.size(2);
  const at::Device device = y0.device();
  DescentInputs in;
  in.y = y0.to(dt).contiguous().clone();
  if (mask.has_value() && mask->defined()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool, "pyebm: mask must be bool; got ", mask->scalar_type());
    TORCH_CHECK(mask->sizes() == y0.sizes(), "pyebm: mask must be [B, K, D] = ", y0.sizes(), "; got ",
                mask->sizes());
    TORCH_CHECK(mask->device() == device, "pyebm: mask must be on ", device, " (like y0); got ", mask->device());
    in.mask = mask->contiguous();
    in.fixed = to_compute(y0, dt);  // clamped coordinates keep their initial values
  }
  if (nm != NoiseMode::kNone) {
    TORCH_CHECK(noise.has_value() && noise->defined(), "pyebm: noise_mode '", std::string(noise_mode),
                "' needs the noise tensor [steps, B, K, D]");
    TORCH_CHECK(noise->dim() == 4 && noise->size(0) == steps && noise->size(1) == B && noise->size(2) == K &&
                    noise->size(3) == D,
                "pyebm: noise must be [steps, B, K, D] = [", steps, ", ", B, ", ", K, ", ", D, "]; got ",
                noise->sizes());
    TORCH_CHECK(noise->device() == device, "pyebm: noise must be on ", device, " (like y0); got ", noise->device());
    in.noise = to_compute(*noise, dt);
  }
  in.lower = event_option(lower, "lower", D, dt, device);
  in.upper = event_option(upper, "upper", D, dt, device);
  in.step_clip = event_option(step_clip, "step_clip", D, dt, device);
  return in;
}

// The whole-loop op's outputs (y, E_final, E_init, steps, status), with y and the energies rounded back to
// the input dtype when they were computed in another.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> descent_outputs(
    const at::Tensor& y, const at::Tensor& E_final, const at::Tensor& E_init, const at::Tensor& steps,
    const at::Tensor& status, at::ScalarType out_dtype) {
  if (y.scalar_type() == out_dtype) return {y, E_final, E_init, steps, status};
  return {y.to(out_dtype), E_final.to(out_dtype), E_init.to(out_dtype), steps, status};
}

// Checks the in-place arguments of descent_update (rows [N, D] on y's device) and returns the noise mode.
inline NoiseMode check_update_args(const at::Tensor& y, const at::Tensor& g, const at::Tensor& E,
                                   const at::Tensor& active, const at::Tensor& steps, const at::Tensor& status,
                                   const c10::optional<at::Tensor>& velocity, const c10::optional<at::Tensor>& pending,
                                   const c10::optional<at::Tensor>& noise, const c10::optional<at::Tensor>& mask,
                                   const c10::optional<at::Tensor>& fixed, c10::string_view noise_mode,
                                   double momentum, bool tol_final_step) {
  TORCH_CHECK(y.dim() == 2, "pyebm: y must be [N, D]; got shape ", y.sizes());
  const int64_t N = y.size(0), D = y.size(1);
  const at::Device device = y.device();
  auto need = [&](const at::Tensor& t, const char* name, at::IntArrayRef shape, at::ScalarType dtype) {
    TORCH_CHECK(t.sizes() == shape, "pyebm: ", name, " must have shape ", shape, "; got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == dtype, "pyebm: ", name, " must be ", dtype, "; got ", t.scalar_type());
    TORCH_CHECK(t.is_contiguous() && t.device() == device, "pyebm: ", name, " must be a contiguous tensor on ",
                device, "; got ", t.device(), t.is_contiguous() ? "" : " (not contiguous)");
  };
  const auto dt = y.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble, "pyebm: descent_update supports float32 and float64; got ", dt);
  need(y, "y", {N, D}, dt);
  need(g, "g", {N, D}, dt);
  need(E, "E", {N}, dt);
  need(active, "active", {N}, at::kBool);
  need(steps, "steps", {N}, at::kInt);
  need(status, "status", {N}, at::kChar);
  if (velocity) need(*velocity, "velocity", {N, D}, dt);
  if (pending) need(*pending, "pending", {N}, at::kBool);
  if (noise) need(*noise, "noise", {N, D}, dt);
  if (mask) {
    need(*mask, "mask", {N, D}, at::kBool);
    TORCH_CHECK(fixed.has_value(), "pyebm: mask needs fixed");
    need(*fixed, "fixed", {N, D}, dt);
  }
  const NoiseMode nm = parse_noise(noise_mode);
  TORCH_CHECK(nm == NoiseMode::kNone || noise.has_value(), "pyebm: noise_mode '", std::string(noise_mode),
              "' needs noise");
  TORCH_CHECK(momentum == 0 || velocity.has_value(), "pyebm: momentum > 0 needs velocity");
  TORCH_CHECK(!tol_final_step || pending.has_value(), "pyebm: tol_final_step needs pending");
  return nm;
}

}  // namespace cpu
}  // namespace pyebm
