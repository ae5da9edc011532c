// pyebm._C.DescentRule: the update rule of a whole-loop descent, parsed and checked once per pyebm.Descent
// (and candidate dtype / width), then read by the plans' one-call descents (mlp_plan.cpp,
// ebt_policy_plan.cpp) on every call.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <utility>
#include <vector>

#include "descent_args.h"
#include "select_best.h"

namespace pyebm {
namespace cpu {

// A rule's options as the descents read them.
struct RuleOptions {
  std::vector<double> eta, noise_level;
  double grad_scale = 1, momentum = 0, energy_temperature = 1, tol = 0;
  c10::optional<double> grad_clip, grad_clip_norm;
  bool nesterov = false, energy_scaled = false, tol_final_step = false, bound_each_step = true;
  NoiseMode noise = NoiseMode::kNone;
  at::Tensor lower, upper, step_clip;  // [D] in the plan's dtype, or undefined
  int selection = 0;
};

// The update rule of a whole-loop descent, fixed once per pyebm.Descent (and dtype / candidate width).
class DescentRule {
 public:
  DescentRule(std::vector<double> eta, std::vector<double> noise_level, double grad_scale, double momentum,
              bool nesterov, c10::optional<double> grad_clip, c10::optional<double> grad_clip_norm,
              bool energy_scaled, double energy_temperature, double tol, bool tol_final_step, bool bound_each_step,
              const std::string& noise_mode, c10::optional<at::Tensor> lower, c10::optional<at::Tensor> upper,
              c10::optional<at::Tensor> step_clip, const std::string& selection) {
    TORCH_CHECK(!eta.empty() && eta.size() == noise_level.size(),
                "pyebm: DescentRule needs one step size and one noise level per step; got ", eta.size(), " and ",
                noise_level.size());
    check_rule(momentum, grad_clip, grad_clip_norm, energy_temperature, tol);
    for (size_t k = 0; k < eta.size(); ++k) check_step_scalars("pyebm: DescentRule", eta[k], noise_level[k], grad_scale);
    o_.eta = std::move(eta);
    o_.noise_level = std::move(noise_level);
    o_.grad_scale = grad_scale;
    o_.momentum = momentum;
    o_.nesterov = nesterov;
    o_.grad_clip = grad_clip;
    o_.grad_clip_norm = grad_clip_norm;
    o_.energy_scaled = energy_scaled;
    o_.energy_temperature = energy_temperature;
    o_.tol = tol;
    o_.tol_final_step = tol_final_step;
    o_.bound_each_step = bound_each_step;
    o_.noise = parse_noise(noise_mode);
    o_.selection = parse_selection(selection);
    auto take = [](const c10::optional<at::Tensor>& t, const char* name) {
      if (!t.has_value() || !t->defined()) return at::Tensor();
      TORCH_CHECK(t->dim() == 1 && t->device().is_cpu(), "pyebm: DescentRule ", name,
                  " must be a 1-D CPU tensor; got ", t->sizes(), " on ", t->device());
      return t->contiguous();
    };
    o_.lower = take(lower, "lower");
    o_.upper = take(upper, "upper");
    o_.step_clip = take(step_clip, "step_clip");
  }
  const RuleOptions& options() const { return o_; }
  int64_t steps() const { return static_cast<int64_t>(o_.eta.size()); }

 private:
  RuleOptions o_;
};

}  // namespace cpu
}  // namespace pyebm
