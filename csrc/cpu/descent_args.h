// Argument handling shared by the CPU and CUDA implementations of pyebm::descent_update and
// pyebm::mlp_descent: parsing, range and shape checks with errors that name the argument, and the
// UpdateRule built from the op's options. ATen glue (device-agnostic); the math is descent_update.h.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <cmath>
#include <string>
#include <vector>

#include "descent_update.h"
#include "mlp_energy_cpu.h"
#include "op_checks.h"

namespace pyebm {
namespace cpu {

inline NoiseMode parse_noise(c10::string_view s) {
  if (s == "none") return NoiseMode::kNone;
  if (s == "langevin") return NoiseMode::kLangevin;
  if (s == "step") return NoiseMode::kStep;
  if (s == "additive") return NoiseMode::kAdditive;
  TORCH_CHECK_VALUE(false, "pyebm: noise_mode must be one of none, langevin, step, additive; got '", std::string(s),
                    "'");
}

inline void check_rule(double momentum, c10::optional<double> grad_clip, c10::optional<double> grad_clip_norm,
                       double energy_temperature, double tol) {
  TORCH_CHECK_VALUE(!grad_clip.has_value() || *grad_clip > 0, "pyebm: grad_clip must be > 0; got ", *grad_clip);
  TORCH_CHECK_VALUE(!grad_clip_norm.has_value() || *grad_clip_norm > 0, "pyebm: grad_clip_norm must be > 0; got ",
                    *grad_clip_norm);
  TORCH_CHECK_VALUE(momentum >= 0 && momentum < 1, "pyebm: momentum must be in [0, 1); got ", momentum);
  TORCH_CHECK_VALUE(tol >= 0, "pyebm: tol must be >= 0; got ", tol);
  TORCH_CHECK_VALUE(energy_temperature > 0, "pyebm: energy_temperature must be > 0; got ", energy_temperature);
}

// The step's scalars: eta finite, noise_level finite and >= 0, grad_scale finite.
inline void check_step_scalars(const char* op, double eta, double noise_level, double grad_scale) {
  checks::finite(op, "eta", eta);
  checks::non_negative(op, "noise_level", noise_level);
  checks::finite(op, "grad_scale", grad_scale);
}

// A per-step schedule [steps] (any floating dtype, on the cpu or on `device`) as host doubles; with
// non_negative, every value must be >= 0 (noise levels), and every value must be finite.
inline std::vector<double> host_schedule(const at::Tensor& t, const char* name, int64_t T_, const char* op,
                                         const at::Device& device, bool non_negative = false) {
  checks::dense(op, checks::Arg{name}, t);
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), op, ": ", name, " must be a floating [steps] tensor; got ",
                   checks::describe(t));
  TORCH_CHECK_VALUE(t.device().is_cpu() || t.device() == device, op, ": ", name, " must be on the cpu or on ",
                    device, "; got ", checks::describe(t));
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == T_, op, ": ", name, " must be a floating [steps] = [", T_,
                    "] tensor; got ", checks::describe(t));
  at::Tensor c = t.to(at::kCPU, at::kDouble).contiguous();
  const double* p = c.data_ptr<double>();
  for (int64_t k = 0; k < T_; ++k) {
    TORCH_CHECK_VALUE(std::isfinite(p[k]) && (!non_negative || p[k] >= 0), op, ": ", name, "[", k, "] must be ",
                      non_negative ? "a finite number >= 0" : "finite", "; got ", p[k]);
  }
  return std::vector<double>(p, p + T_);
}

// An optional per-dimension option as a contiguous [D] tensor in the compute dtype on `device` (undefined
// if absent). One value is broadcast to D; values given on another device are copied over.
inline at::Tensor event_option(const c10::optional<at::Tensor>& t, const char* name, int64_t D, at::ScalarType dt,
                               const at::Device& device, const char* op = "pyebm::descent_update") {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  checks::dense(op, checks::Arg{name}, *t);
  checks::floating(op, checks::Arg{name}, *t);
  TORCH_CHECK_VALUE(t->numel() == D || t->numel() == 1, op, ": ", name, " must hold 1 or D = ", D,
                    " values; got shape ", t->sizes());
  const at::Tensor v = t->reshape({-1}).expand({D});
  return (v.device() == device && v.scalar_type() == dt) ? v.contiguous() : v.to(device, dt).contiguous();
}

// lower, upper and step_clip as the kernels take them (event_option), their values checked first, where they
// were given: bounds not NaN and lower <= upper, step_clip > 0. Values given as CPU tensors are checked on the
// host at no cost; values given on a GPU cost a small synchronising copy, skipped when read_device is false
// (CUDA graph capture).
struct EventOptions {
  at::Tensor lower, upper, step_clip;
};
inline EventOptions event_options(const c10::optional<at::Tensor>& lower, const c10::optional<at::Tensor>& upper,
                                  const c10::optional<at::Tensor>& step_clip, int64_t D, at::ScalarType dt,
                                  const at::Device& device, const char* op, bool read_device = true) {
  auto where = [&](const c10::optional<at::Tensor>& t, const char* name) {
    if (!t.has_value() || !t->defined()) return device;
    TORCH_CHECK_VALUE(t->device().is_cpu() || t->device() == device, op, ": ", name, " must be on the cpu or on ",
                      device, "; got ", checks::describe(*t));
    return t->device();
  };
  EventOptions e{event_option(lower, "lower", D, dt, where(lower, "lower"), op),
                 event_option(upper, "upper", D, dt, where(upper, "upper"), op),
                 event_option(step_clip, "step_clip", D, dt, where(step_clip, "step_clip"), op)};
  checks::event_values(op, e.lower, e.upper, e.step_clip, read_device);
  for (at::Tensor* t : {&e.lower, &e.upper, &e.step_clip})
    if (t->defined() && t->device() != device) *t = t->to(device).contiguous();
  return e;
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
  const char* op = "pyebm::mlp_descent";
  const int64_t B = y0.size(0), K = y0.size(1), D = y0.size(2);
  const at::Device device = y0.device();
  DescentInputs in;
  if (mask.has_value() && mask->defined()) {
    checks::dense(op, checks::Arg{"mask"}, *mask);
    checks::dtype(op, checks::Arg{"mask"}, *mask, at::kBool);
    checks::shape(op, checks::Arg{"mask"}, *mask, y0.sizes(), "[B, K, D]");
    checks::device(op, checks::Arg{"mask"}, *mask, device);
  }
  TORCH_CHECK_VALUE(nm == NoiseMode::kNone || (noise.has_value() && noise->defined()), op, ": noise_mode '",
                    std::string(noise_mode), "' needs the noise tensor [steps, B, K, D]");
  if (noise.has_value() && noise->defined()) {
    checks::dense(op, checks::Arg{"noise"}, *noise);
    checks::floating(op, checks::Arg{"noise"}, *noise);
    checks::shape(op, checks::Arg{"noise"}, *noise, {steps, B, K, D}, "[steps, B, K, D]");
    checks::device(op, checks::Arg{"noise"}, *noise, device);
  }
  const EventOptions e = event_options(lower, upper, step_clip, D, dt, device, op);
  in.lower = e.lower;
  in.upper = e.upper;
  in.step_clip = e.step_clip;
  in.y = y0.to(dt).contiguous().clone();
  if (mask.has_value() && mask->defined()) {
    in.mask = mask->contiguous();
    in.fixed = to_compute(y0, dt);  // clamped coordinates keep their initial values
  }
  if (nm != NoiseMode::kNone) in.noise = to_compute(*noise, dt);
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

// Checks the arguments of descent_update (rows [N, D] on y's device; every tensor contiguous, in y's dtype or
// the bookkeeping dtypes; no written tensor overlapping another argument) and returns the noise mode.
inline NoiseMode check_update_args(const at::Tensor& y, const at::Tensor& g, const at::Tensor& E,
                                   const at::Tensor& active, const at::Tensor& steps, const at::Tensor& status,
                                   const c10::optional<at::Tensor>& velocity, const c10::optional<at::Tensor>& pending,
                                   const c10::optional<at::Tensor>& noise, const c10::optional<at::Tensor>& mask,
                                   const c10::optional<at::Tensor>& fixed, c10::string_view noise_mode,
                                   double momentum, bool tol_final_step,
                                   const c10::optional<at::Tensor>& y_base = c10::nullopt) {
  const char* op = "pyebm::descent_update";
  checks::dense(op, checks::Arg{"y"}, y);
  TORCH_CHECK_VALUE(y.dim() == 2, op, ": y must be [N, D]; got shape ", y.sizes());
  const int64_t N = y.size(0), D = y.size(1);
  const at::Device device = y.device();
  auto need = [&](const at::Tensor& t, const char* name, at::IntArrayRef shape, at::ScalarType dtype) {
    checks::dense(op, checks::Arg{name}, t);
    checks::shape(op, checks::Arg{name}, t, shape, shape.size() == 2 ? "[N, D]" : "[N]");
    checks::dtype(op, checks::Arg{name}, t, dtype);
    checks::device(op, checks::Arg{name}, t, device);
    TORCH_CHECK_VALUE(t.is_contiguous(), op, ": ", name, " must be a contiguous tensor on ", device,
                      "; got strides ", t.strides());
  };
  const auto dt = y.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kDouble, op, ": descent_update supports float32 and float64; got ",
                   dt);
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
    TORCH_CHECK_VALUE(fixed.has_value(), op, ": mask needs fixed");
    need(*fixed, "fixed", {N, D}, dt);
  }
  if (y_base) need(*y_base, "y_base", {N, D}, dt);
  const NoiseMode nm = parse_noise(noise_mode);
  TORCH_CHECK_VALUE(nm == NoiseMode::kNone || noise.has_value(), op, ": noise_mode '", std::string(noise_mode),
                    "' needs noise");
  TORCH_CHECK_VALUE(momentum == 0 || velocity.has_value(), op, ": momentum > 0 needs velocity");
  TORCH_CHECK_VALUE(!tol_final_step || pending.has_value(), op, ": tol_final_step needs pending");
  // The kernel writes y, g, active, steps, status, velocity and pending row by row while it reads the others:
  // a written tensor must not share memory with any other argument.
  const at::Tensor* written[] = {&y, &g, &active, &steps, &status, velocity ? &*velocity : nullptr,
                                 pending ? &*pending : nullptr};
  const char* written_names[] = {"y", "g", "active", "steps", "status", "velocity", "pending"};
  const at::Tensor* all[] = {&y, &g, &E, &active, &steps, &status, velocity ? &*velocity : nullptr,
                             pending ? &*pending : nullptr, noise ? &*noise : nullptr, mask ? &*mask : nullptr,
                             fixed ? &*fixed : nullptr, y_base ? &*y_base : nullptr};
  const char* all_names[] = {"y", "g", "E", "active", "steps", "status", "velocity", "pending", "noise", "mask",
                             "fixed", "y_base"};
  for (size_t i = 0; i < sizeof(written) / sizeof(written[0]); ++i) {
    if (written[i] == nullptr || written[i]->numel() == 0) continue;
    for (size_t j = 0; j < sizeof(all) / sizeof(all[0]); ++j) {
      if (all[j] == nullptr || all[j] == written[i] || all[j]->numel() == 0) continue;
      if (std::string(written_names[i]) == all_names[j]) continue;
      const at::MemOverlapStatus o = at::get_overlap_status(*written[i], *all[j]);
      TORCH_CHECK_VALUE(o != at::MemOverlapStatus::Full && o != at::MemOverlapStatus::Partial, op, ": ",
                        written_names[i], " (written in place) shares memory with ", all_names[j],
                        "; pass separate tensors");
    }
  }
  return nm;
}

}  // namespace cpu
}  // namespace pyebm
