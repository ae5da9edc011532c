// EBTPolicy's one-call descent on the CPU (ebt_policy.cpp): the observation side, every step of the descent
// and the selection in one C++ call, with the kernels of the ops ebt_policy_context and ebt_policy_descent
// (the same numbers bit for bit). Called by pyebm._C.EbtPolicyPack (ebt_policy_plan.cpp).
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "descent_rule.h"

namespace pyebm {
namespace cpu {

// What minimize's one-call route returns: (y, E, E_init, steps, status, best, best_E, best_index). E and best_E
// are undefined when the final energy pass was skipped (final_energy=false, one candidate).
struct PolicyOneCall {
  at::Tensor y, E, E_init, steps, status, best, best_E, best_index;
};

// obs [B, L, C] and the stacked cross-attention key/value weights (kv_w [layers * 2D, C], kv_b, k_norm
// [layers, hd]) as the op ebt_policy_context takes them; y0 [B, K, T, A], bias, params and weights_t as the
// op ebt_policy_descent takes them; the update rule (no noise; lower / upper / step_clip [D] or undefined) and
// that op's normalize / tol_scope options. Errors are c10 errors naming the argument.
PolicyOneCall ebt_policy_one_call_cpu(const at::Tensor& obs, const at::Tensor& y0, const at::Tensor& kv_w,
                                      const at::Tensor& kv_b, const at::Tensor& k_norm, double ctx_rms_eps,
                                      const at::Tensor& bias, at::TensorList params, at::TensorList weights_t,
                                      int64_t heads, double rms_eps, double ln_eps, const RuleOptions& rule,
                                      c10::string_view normalize, double normalize_eps, c10::string_view tol_scope,
                                      bool final_energy);

}  // namespace cpu
}  // namespace pyebm
