// Autograd kernels of the pyebm ops (the Autograd dispatch key, so CPU and CUDA tensors alike).
//
// Without a kernel here, an input that requires grad would get the dispatcher's fallback: an output with a
// grad_fn whose backward leaves every gradient None (only a warning). Instead:
//
//   mlp_energy_grad, mlp_energy, ebt_policy_energy_grad
//       have a formula: the forward runs the fused kernel; the backward calls the op's vector-Jacobian
//       product (pyebm::mlp_energy_vjp, pyebm::ebt_policy_energy_vjp: the reference recomputed with autograd,
//       pyebm/ops/_autograd.py), which is itself differentiable, so gradients of the input gradient G
//       (double backward) work too.
//   mlp_descent, descent_update, select_best, ebt_policy_descent, ebt_policy_context, rows_linear, ebt_rows_*,
//   dispatch_floor
//       are inference ops: with grad mode on and an input that requires grad they raise, naming the input.
//
// When no input requires grad (or grad mode is off) every kernel here goes straight to the device kernel
// (a redispatch with the call's own keys): a few flag tests per call, no Python. descent_update, which writes its inputs in place, also bumps their
// version counters (what the ADInplaceOrView kernel of a built-in in-place op does).
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <pybind11/pybind11.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <vector>

namespace pyebm {
namespace autograd_ops {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = c10::optional<at::Tensor>;

// -- which argument requires grad (-1: none) -------------------------------------------------------
inline bool rg(const at::Tensor& t) { return t.defined() && t.requires_grad(); }
inline bool rg(const OptTensor& t) { return t.has_value() && rg(*t); }
inline bool rg(at::TensorList l) {
  for (const auto& t : l)
    if (rg(t)) return true;
  return false;
}
template <typename T>
inline bool rg(const T&) {
  return false;
}

template <typename... Args>
int first_requiring_grad(const Args&... args) {
  if (!at::GradMode::is_enabled()) return -1;
  int index = -1, i = 0;
  ((index < 0 && rg(args) ? (index = i) : 0, ++i), ...);
  return index;
}

std::string arg_name(const c10::OperatorHandle& op, int index) {
  const auto& args = op.schema().arguments();
  return index >= 0 && index < static_cast<int>(args.size()) ? args[index].name() : "an input";
}

[[noreturn]] void inference_only(const c10::OperatorHandle& op, int index) {
  TORCH_CHECK(false, op.schema().operator_name().name, " is an inference op without an autograd formula, and its "
              "argument '", arg_name(op, index), "' requires grad. Call it under torch.no_grad() (or pass detached "
              "tensors).");
}

c10::OperatorHandle find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
}

// -- inference ops ---------------------------------------------------------------------------------
template <const char* Name, class Sig>
struct Inference;

// The keys below autograd for this call: the device kernel, or on the way the Python, Functionalize and fake
// modes of tracing. A redispatch with them skips the dispatcher's key computation and the TLS guard.
inline c10::DispatchKeySet below_autograd(c10::DispatchKeySet ks) { return ks & c10::after_ADInplaceOrView_keyset; }

template <const char* Name, class R, class... Args>
struct Inference<Name, R(Args...)> {
  static R call(c10::DispatchKeySet ks, Args... args) {
    static const c10::OperatorHandle handle = find_op(Name);
    const int i = first_requiring_grad(args...);
    if (i >= 0) inference_only(handle, i);
    static const auto op = handle.typed<R(Args...)>();
    return op.redispatch(below_autograd(ks), args...);
  }
};

constexpr char kMlpDescent[] = "pyebm::mlp_descent";
constexpr char kDescentUpdate[] = "pyebm::descent_update";
constexpr char kSelectBest[] = "pyebm::select_best";
constexpr char kEbtPolicyDescent[] = "pyebm::ebt_policy_descent";
constexpr char kEbtPolicyContext[] = "pyebm::ebt_policy_context";
constexpr char kDispatchFloor[] = "pyebm::dispatch_floor";
constexpr char kRowsLinear[] = "pyebm::rows_linear";
constexpr char kRowsAttention[] = "pyebm::ebt_rows_attention";
constexpr char kRowsAttentionBwd[] = "pyebm::ebt_rows_attention_bwd";
constexpr char kRowsRmsNorm[] = "pyebm::ebt_rows_rms_norm";
constexpr char kRowsRmsNormBwd[] = "pyebm::ebt_rows_rms_norm_bwd";
constexpr char kRowsSwiglu[] = "pyebm::ebt_rows_swiglu";
constexpr char kRowsSwigluBwd[] = "pyebm::ebt_rows_swiglu_bwd";

using MlpDescentSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, at::TensorList, at::TensorList, const at::Tensor&,
    const at::Tensor&, c10::string_view, bool, const at::Tensor&, const at::Tensor&, const OptTensor&,
    const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&, double, double, bool,
    c10::optional<double>, c10::optional<double>, bool, double, double, bool, bool, c10::string_view);
using DescentUpdateSig = void(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                              const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&,
                              const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                              const OptTensor&, const OptTensor&, double, double, c10::string_view, double, double,
                              c10::optional<double>, c10::optional<double>, bool, double, double, bool, bool,
                              const OptTensor&);
using SelectBestSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                     const at::Tensor&, const at::Tensor&,
                                                                     c10::string_view);
using EbtPolicyDescentSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, at::TensorList, at::TensorList,
    int64_t, double, double, const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
    c10::string_view, double, double, double, bool, c10::optional<double>, c10::optional<double>, bool, double,
    double, c10::string_view, bool, bool, bool);
using EbtPolicyContextSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                               const at::Tensor&, const at::Tensor&, int64_t, double);
using DispatchFloorSig = at::Tensor(const at::Tensor&);
using RowsLinearSig = at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&);
using RowsAttentionSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                             const at::Tensor&, const at::Tensor&, const OptTensor&);
using RowsAttentionBwdSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                       const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                       const OptTensor&);
using RowsRmsNormSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, double);
using RowsRmsNormBwdSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&);
using RowsSwigluSig = at::Tensor(const at::Tensor&);
using RowsSwigluBwdSig = at::Tensor(const at::Tensor&, const at::Tensor&);

void bump(const at::Tensor& t) {
  if (t.defined() && !t.is_inference()) t.unsafeGetTensorImpl()->bump_version();
}
void bump(const OptTensor& t) {
  if (t.has_value()) bump(*t);
}

// descent_update writes y, g, active, steps, status, velocity and pending.
void descent_update_autograd(c10::DispatchKeySet ks, const at::Tensor& y, const at::Tensor& g, const at::Tensor& E, const at::Tensor& active,
                             const at::Tensor& steps, const at::Tensor& status, const OptTensor& velocity,
                             const OptTensor& pending, const OptTensor& noise, const OptTensor& mask,
                             const OptTensor& fixed, const OptTensor& lower, const OptTensor& upper,
                             const OptTensor& step_clip, double eta, double noise_level, c10::string_view noise_mode,
                             double grad_scale, double momentum, c10::optional<double> grad_clip,
                             c10::optional<double> grad_clip_norm, bool energy_scaled, double energy_temperature,
                             double tol, bool tol_final_step, bool bound_each_step, const OptTensor& y_base) {
  Inference<kDescentUpdate, DescentUpdateSig>::call(
      ks, y, g, E, active, steps, status, velocity, pending, noise, mask, fixed, lower, upper, step_clip, eta,
      noise_level, noise_mode, grad_scale, momentum, grad_clip, grad_clip_norm, energy_scaled, energy_temperature, tol,
      tol_final_step, bound_each_step, y_base);
  bump(y), bump(g), bump(active), bump(steps), bump(status), bump(velocity), bump(pending);
}

// -- differentiable ops ----------------------------------------------------------------------------
// The vector-Jacobian products are implemented in Python (pyebm/ops/_autograd.py registers them when
// pyebm.ops is imported, which importing pyebm does); import it here if someone loaded pyebm._C alone.
void ensure_python_vjp(const c10::OperatorHandle& vjp) {
  if (vjp.hasKernelForDispatchKey(c10::DispatchKey::CompositeImplicitAutograd)) return;
  {
    pybind11::gil_scoped_acquire gil;
    try {
      pybind11::module_::import("pyebm.ops._autograd");
    } catch (pybind11::error_already_set& e) {
      TORCH_CHECK(false, "pyebm: cannot import pyebm.ops._autograd, where the backward of ",
                  vjp.schema().operator_name().name, " lives: ", e.what());
    }
  }
  TORCH_CHECK(vjp.hasKernelForDispatchKey(c10::DispatchKey::CompositeImplicitAutograd), "pyebm: ",
              vjp.schema().operator_name().name, " has no implementation (pyebm.ops._autograd registers it)");
}

std::vector<at::Tensor> slice(const variable_list& v, size_t begin, size_t n) {
  return std::vector<at::Tensor>(v.begin() + begin, v.begin() + begin + n);
}

// E [B, K] and (grad) dE/dy of the MLP energy, differentiable in ctx, y, w_in, weights, biases, w_out, b_out.
struct MlpEnergyFn : public torch::autograd::Function<MlpEnergyFn> {
  static variable_list forward(AutogradContext* actx, const at::Tensor& ctx, const at::Tensor& y,
                               const at::Tensor& w_in, at::TensorList weights, at::TensorList biases,
                               const at::Tensor& w_out, const at::Tensor& b_out, const std::string& activation,
                               bool residual, bool grad) {
    variable_list out;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      if (grad) {
        static const auto op = find_op("pyebm::mlp_energy_grad")
                                   .typed<std::tuple<at::Tensor, at::Tensor>(
                                       const at::Tensor&, const at::Tensor&, const at::Tensor&, at::TensorList,
                                       at::TensorList, const at::Tensor&, const at::Tensor&, c10::string_view, bool)>();
        auto [E, G] = op.call(ctx, y, w_in, weights, biases, w_out, b_out, activation, residual);
        out = {E, G};
      } else {
        static const auto op = find_op("pyebm::mlp_energy")
                                   .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                     at::TensorList, at::TensorList, const at::Tensor&,
                                                     const at::Tensor&, c10::string_view, bool)>();
        out = {op.call(ctx, y, w_in, weights, biases, w_out, b_out, activation, residual)};
      }
    }
    variable_list saved = {ctx, y, w_in};
    saved.insert(saved.end(), weights.begin(), weights.end());
    saved.insert(saved.end(), biases.begin(), biases.end());
    saved.push_back(w_out);
    saved.push_back(b_out);
    actx->save_for_backward(saved);
    actx->saved_data["layers"] = static_cast<int64_t>(weights.size());
    actx->saved_data["activation"] = activation;
    actx->saved_data["residual"] = residual;
    actx->saved_data["grad"] = grad;
    actx->set_materialize_grads(false);
    return out;
  }

  static variable_list backward(AutogradContext* actx, variable_list grads) {
    const variable_list s = actx->get_saved_variables();
    const size_t n = static_cast<size_t>(actx->saved_data["layers"].toInt());
    const std::string activation = actx->saved_data["activation"].toStringRef();
    const bool residual = actx->saved_data["residual"].toBool();
    const bool grad = actx->saved_data["grad"].toBool();
    const std::vector<at::Tensor> ws = slice(s, 3, n), bs = slice(s, 3 + n, n);
    const OptTensor gE = grads[0].defined() ? OptTensor(grads[0]) : c10::nullopt;
    const OptTensor gG = grad && grads[1].defined() ? OptTensor(grads[1]) : c10::nullopt;
    static const auto vjp =
        find_op("pyebm::mlp_energy_vjp")
            .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>,
                              at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                      at::TensorList, at::TensorList, const at::Tensor&,
                                                      const at::Tensor&, c10::string_view, bool, const OptTensor&,
                                                      const OptTensor&)>();
    auto [dctx, dy, dw_in, dws, dbs, dw_out, db_out] =
        vjp.call(s[0], s[1], s[2], ws, bs, s[3 + 2 * n], s[4 + 2 * n], activation, residual, gE, gG);
    variable_list out = {dctx, dy, dw_in};
    out.insert(out.end(), dws.begin(), dws.end());
    out.insert(out.end(), dbs.begin(), dbs.end());
    out.push_back(dw_out);
    out.push_back(db_out);
    out.resize(out.size() + 3);  // activation, residual, grad
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor> mlp_energy_grad_autograd(c10::DispatchKeySet ks, const at::Tensor& ctx,
                                                            const at::Tensor& y,
                                                            const at::Tensor& w_in, at::TensorList weights,
                                                            at::TensorList biases, const at::Tensor& w_out,
                                                            const at::Tensor& b_out, c10::string_view activation,
                                                            bool residual) {
  if (first_requiring_grad(ctx, y, w_in, weights, biases, w_out, b_out) < 0) {
    static const auto op = find_op("pyebm::mlp_energy_grad")
                               .typed<std::tuple<at::Tensor, at::Tensor>(
                                   const at::Tensor&, const at::Tensor&, const at::Tensor&, at::TensorList,
                                   at::TensorList, const at::Tensor&, const at::Tensor&, c10::string_view, bool)>();
    return op.redispatch(below_autograd(ks), ctx, y, w_in, weights, biases, w_out, b_out, activation, residual);
  }
  ensure_python_vjp(find_op("pyebm::mlp_energy_vjp"));
  const variable_list out =
      MlpEnergyFn::apply(ctx, y, w_in, weights, biases, w_out, b_out, std::string(activation), residual, true);
  return {out[0], out[1]};
}

at::Tensor mlp_energy_autograd(c10::DispatchKeySet ks, const at::Tensor& ctx, const at::Tensor& y, const at::Tensor& w_in,
                               at::TensorList weights, at::TensorList biases, const at::Tensor& w_out,
                               const at::Tensor& b_out, c10::string_view activation, bool residual) {
  if (first_requiring_grad(ctx, y, w_in, weights, biases, w_out, b_out) < 0) {
    static const auto op = find_op("pyebm::mlp_energy")
                               .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                 at::TensorList, at::TensorList, const at::Tensor&, const at::Tensor&,
                                                 c10::string_view, bool)>();
    return op.redispatch(below_autograd(ks), ctx, y, w_in, weights, biases, w_out, b_out, activation, residual);
  }
  ensure_python_vjp(find_op("pyebm::mlp_energy_vjp"));
  return MlpEnergyFn::apply(ctx, y, w_in, weights, biases, w_out, b_out, std::string(activation), residual,
                            false)[0];
}

using EbtEnergySig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                        const at::Tensor&, at::TensorList, at::TensorList, int64_t,
                                                        double, double, bool);

// E [B, K] and (need_grad) dE/dy of the EBT-Policy energy, differentiable in y, ctx_k, ctx_v, bias and params.
struct EbtPolicyEnergyFn : public torch::autograd::Function<EbtPolicyEnergyFn> {
  static variable_list forward(AutogradContext* actx, const at::Tensor& y, const at::Tensor& ck, const at::Tensor& cv,
                               const at::Tensor& bias, at::TensorList params, at::TensorList weights_t, int64_t heads,
                               double rms_eps, double ln_eps, bool need_grad) {
    at::Tensor E, G;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      static const auto op = find_op("pyebm::ebt_policy_energy_grad").typed<EbtEnergySig>();
      std::tie(E, G) = op.call(y, ck, cv, bias, params, weights_t, heads, rms_eps, ln_eps, need_grad);
    }
    variable_list saved = {y, ck, cv, bias};
    saved.insert(saved.end(), params.begin(), params.end());
    actx->save_for_backward(saved);
    actx->saved_data["n_weights_t"] = static_cast<int64_t>(weights_t.size());
    actx->saved_data["heads"] = heads;
    actx->saved_data["rms_eps"] = rms_eps;
    actx->saved_data["ln_eps"] = ln_eps;
    actx->saved_data["need_grad"] = need_grad;
    actx->set_materialize_grads(false);
    if (!need_grad) actx->mark_non_differentiable({G});  // the empty placeholder
    return {E, G};
  }

  static variable_list backward(AutogradContext* actx, variable_list grads) {
    const variable_list s = actx->get_saved_variables();
    const size_t n_wt = static_cast<size_t>(actx->saved_data["n_weights_t"].toInt());
    const bool need_grad = actx->saved_data["need_grad"].toBool();
    const OptTensor gE = grads[0].defined() ? OptTensor(grads[0]) : c10::nullopt;
    const OptTensor gG = need_grad && grads[1].defined() ? OptTensor(grads[1]) : c10::nullopt;
    static const auto vjp =
        find_op("pyebm::ebt_policy_energy_vjp")
            .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>>(
                const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, at::TensorList, int64_t,
                double, double, const OptTensor&, const OptTensor&)>();
    const std::vector<at::Tensor> params = slice(s, 4, s.size() - 4);
    auto [dy, dck, dcv, dbias, dparams] =
        vjp.call(s[0], s[1], s[2], s[3], params, actx->saved_data["heads"].toInt(),
                 actx->saved_data["rms_eps"].toDouble(), actx->saved_data["ln_eps"].toDouble(), gE, gG);
    variable_list out = {dy, dck, dcv, dbias};
    out.insert(out.end(), dparams.begin(), dparams.end());
    out.resize(out.size() + n_wt + 4);  // weights_t (no gradient: checked not to require one), heads, eps, need_grad
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor> ebt_policy_energy_grad_autograd(c10::DispatchKeySet ks, const at::Tensor& y, const at::Tensor& ck,
                                                                   const at::Tensor& cv, const at::Tensor& bias,
                                                                   at::TensorList params, at::TensorList weights_t,
                                                                   int64_t heads, double rms_eps, double ln_eps,
                                                                   bool need_grad) {
  static const c10::OperatorHandle handle = find_op("pyebm::ebt_policy_energy_grad");
  if (first_requiring_grad(y, ck, cv, bias, params, weights_t) < 0) {
    static const auto op = handle.typed<EbtEnergySig>();
    return op.redispatch(below_autograd(ks), y, ck, cv, bias, params, weights_t, heads, rms_eps, ln_eps, need_grad);
  }
  TORCH_CHECK(!(at::GradMode::is_enabled() && rg(weights_t)),
              "pyebm::ebt_policy_energy_grad: weights_t (transposed copies of params, for speed) must not require "
              "grad; the gradient flows to params. Pass [] or detached copies when differentiating.");
  ensure_python_vjp(find_op("pyebm::ebt_policy_energy_vjp"));
  const variable_list out =
      EbtPolicyEnergyFn::apply(y, ck, cv, bias, params, weights_t, heads, rms_eps, ln_eps, need_grad);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyebm, Autograd, m) {
  m.impl("mlp_energy_grad", &mlp_energy_grad_autograd);
  m.impl("mlp_energy", &mlp_energy_autograd);
  m.impl("ebt_policy_energy_grad", &ebt_policy_energy_grad_autograd);
  m.impl("mlp_descent", &Inference<kMlpDescent, MlpDescentSig>::call);
  m.impl("descent_update", &descent_update_autograd);
  m.impl("select_best", &Inference<kSelectBest, SelectBestSig>::call);
  m.impl("ebt_policy_descent", &Inference<kEbtPolicyDescent, EbtPolicyDescentSig>::call);
  m.impl("ebt_policy_context", &Inference<kEbtPolicyContext, EbtPolicyContextSig>::call);
  m.impl("dispatch_floor", &Inference<kDispatchFloor, DispatchFloorSig>::call);
  m.impl("rows_linear", &Inference<kRowsLinear, RowsLinearSig>::call);
  m.impl("ebt_rows_attention", &Inference<kRowsAttention, RowsAttentionSig>::call);
  m.impl("ebt_rows_attention_bwd", &Inference<kRowsAttentionBwd, RowsAttentionBwdSig>::call);
  m.impl("ebt_rows_rms_norm", &Inference<kRowsRmsNorm, RowsRmsNormSig>::call);
  m.impl("ebt_rows_rms_norm_bwd", &Inference<kRowsRmsNormBwd, RowsRmsNormBwdSig>::call);
  m.impl("ebt_rows_swiglu", &Inference<kRowsSwiglu, RowsSwigluSig>::call);
  m.impl("ebt_rows_swiglu_bwd", &Inference<kRowsSwigluBwd, RowsSwigluBwdSig>::call);
}

}  // namespace autograd_ops
}  // namespace pyebm
