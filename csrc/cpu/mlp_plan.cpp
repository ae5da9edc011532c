// pyebm._C.MlpPlan: the MLP energy's weights checked, laid out and packed once, then called straight from
// Python through pybind11, without the dispatcher, the argument lists and the per-call checks of the
// torch.ops.pyebm.* ops. MLPEnergy uses it on the cpu backend in eager mode (the ops stay the path for
// torch.compile and every other device). The kernels are the ops' kernels (mlp_block, run_descent,
// select_best_impl), on the same values, so both paths give the same numbers bit for bit.
//
// The plan keeps references to the model's parameter tensors. Before each call it compares their data
// pointer, version counter and shape with what it packed: an in-place update (optimizer step,
// load_state_dict, .data assignment) triggers a repack. The Python side rebuilds the plan when a parameter
// object is replaced or the module is moved.
//
// A call whose inputs the plan does not take as they are (another dtype or device, wrong shapes) returns
// None; the caller then runs the op path, which raises the documented error or converts.
#include <torch/python.h>  // at::Tensor <-> torch.Tensor for pybind11

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <string>
#include <vector>

#include "descent_args.h"
#include "mlp_descent_cpu.h"
#include "mlp_energy_cpu.h"
#include "select_best.h"

namespace py = pybind11;

namespace pyebm {
namespace cpu {
namespace {

// Work (multiply-adds x2) above which a call releases the GIL while it computes.
constexpr int64_t kReleaseGilFlops = int64_t(1) << 21;

// A source tensor as the plan last packed it.
struct Seen {
  at::Tensor t;
  const void* ptr = nullptr;
  int64_t version = 0;
  std::vector<int64_t> sizes;

  explicit Seen(at::Tensor src) : t(std::move(src)) {
    if (t.defined()) {
      ptr = t.data_ptr();
      version = t._version();
      sizes = t.sizes().vec();
    }
  }
  bool unchanged() const {
    return !t.defined() || (t.data_ptr() == ptr && t._version() == version && t.sizes().equals(sizes));
  }
};

// Everything a call reads; replaced as a whole when a source changes, so a call that is running keeps
// the state it started with.
struct PlanState {
  std::vector<Seen> seen;
  at::ScalarType dtype = at::kFloat;
  int64_t D = 0, H1 = 0, ctx_dim = 0;
  at::Tensor w_x, b_in;                // the sources, for the context term (exactly prepare()'s addmm)
  std::vector<at::Tensor> keep;        // contiguous views or copies the descriptors point into
  at::Tensor wt_in;                    // W^T of the forward products
  std::vector<at::Tensor> wt;
  MlpDesc<float> df;
  MlpDesc<double> dd;
  int64_t flops_grad = 0;              // per row, energy + input gradient
};

struct RuleOptions {
  std::vector<double> eta, noise_level;
  double grad_scale = 1, momentum = 0, energy_temperature = 1, tol = 0;
  c10::optional<double> grad_clip, grad_clip_norm;
  bool nesterov = false, energy_scaled = false, tol_final_step = false, bound_each_step = true;
  NoiseMode noise = NoiseMode::kNone;
  at::Tensor lower, upper, step_clip;  // [D] in the plan's dtype, or undefined
  int selection = 0;
};

}  // namespace

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

class MlpPlan {
 public:
  MlpPlan(c10::optional<at::Tensor> w_x, at::Tensor w_in, c10::optional<at::Tensor> b_in,
          std::vector<at::Tensor> weights, std::vector<at::Tensor> biases, at::Tensor w_out, at::Tensor b_out,
          const std::string& activation, bool residual)
      : act_(parse_activation(activation)), residual_(residual) {
    sources_.push_back(w_x.has_value() ? *w_x : at::Tensor());
    sources_.push_back(w_in);
    sources_.push_back(b_in.has_value() ? *b_in : at::Tensor());
    sources_.push_back(w_out);
    sources_.push_back(b_out);
    num_layers_ = static_cast<int>(weights.size());
    TORCH_CHECK(weights.size() == biases.size(), "pyebm: weights and biases must have the same length; got ",
                weights.size(), " and ", biases.size());
    for (auto& w : weights) sources_.push_back(w);
    for (auto& b : biases) sources_.push_back(b);
    state_ = build();
  }

  // (E [B, K], dE/dy [B, K, D]), or None when the plan does not take these inputs as they are (or is stale).
  py::object energy_and_grad(const at::Tensor& ctx, const at::Tensor& y) { return evaluate(ctx, y, true); }
  // E [B, K], or None.
  py::object energy(const at::Tensor& ctx, const at::Tensor& y) { return evaluate(ctx, y, false); }

  // The module's parameter slots this plan was built from, as (dict, name, parameter) triples: when one of
  // them holds another object, the plan is stale (stale() is true and every call returns None) and the
  // module builds a new one.
  void watch(const py::list& slots) {
    watch_.clear();
    for (const auto& item : slots) {
      py::tuple t = py::reinterpret_borrow<py::tuple>(item);
      TORCH_CHECK(t.size() == 3 && PyDict_Check(t[0].ptr()), "pyebm: MlpPlan.watch takes (dict, name, value) triples");
      watch_.push_back({py::reinterpret_borrow<py::object>(t[0]), py::reinterpret_borrow<py::object>(t[1]),
                        py::reinterpret_borrow<py::object>(t[2])});
    }
  }
  bool stale() const {
    for (const auto& w : watch_)
      if (PyDict_GetItem(w.dict.ptr(), w.name.ptr()) != w.value.ptr()) return true;  // borrowed, no error set
    return false;
  }

  // The context term W_x x + b_1 [B, H1] for x [B, context_dim] (None when x does not fit), computed as
  // MLPEnergy.prepare computes it.
  py::object context(const at::Tensor& x) {
    if (stale()) return py::none();
    std::shared_ptr<const PlanState> st = current();
    if (!context_fits(*st, x)) return py::none();
    return py::cast(context_term(*st, x));
  }

  // The whole-loop descent from y0 [B, K, D] for context x [B, context_dim] (the context term is computed
  // here), then the best candidate per context: (y, E, E_init, steps, status, best, best_E, best_index).
  // noise [T, B, K, D] when the rule draws noise. None when the inputs do not fit the plan as they are.
  py::object descent(const at::Tensor& x, const at::Tensor& y0, const DescentRule& rule,
                     const c10::optional<at::Tensor>& noise) {
    if (stale()) return py::none();
    at::NoGradGuard no_grad;  // inference: no autograd graph, whatever the inputs require
    std::shared_ptr<const PlanState> st = current();
    const RuleOptions& o = rule.options();
    if (!context_fits(*st, x) || !candidates_fit(*st, y0, x.size(0))) return py::none();
    const int64_t B = y0.size(0), K = y0.size(1), D = y0.size(2), N = B * K, Tn = rule.steps();
    for (const at::Tensor* t : {&o.lower, &o.upper, &o.step_clip})
      if (t->defined() && (t->scalar_type() != st->dtype || t->numel() != D)) return py::none();
    if (o.noise != NoiseMode::kNone) {
      if (!noise.has_value() || !noise->defined() || noise->scalar_type() != st->dtype || !noise->device().is_cpu() ||
          !noise->sizes().equals({Tn, B, K, D}) || !noise->is_contiguous())
        return py::none();
    }

    at::Tensor ctx = context_term(*st, x);
    at::Tensor y = y0.clone(at::MemoryFormat::Contiguous);
    at::Tensor E_final = at::empty({B, K}, y.options());
    at::Tensor E_init = at::empty({B, K}, y.options());
    at::Tensor steps = at::empty({B, K}, y.options().dtype(at::kInt));
    at::Tensor status = at::empty({B, K}, y.options().dtype(at::kChar));
    {
      std::unique_ptr<py::gil_scoped_release> nogil;
      if (N * st->flops_grad * Tn > kReleaseGilFlops) nogil = std::make_unique<py::gil_scoped_release>();
      AT_DISPATCH_FLOATING_TYPES(st->dtype, "pyebm_plan_descent", [&] {
        using T = scalar_t;
        MlpDesc<T> p = desc<T>(*st);
        p.K = K;
        p.ctx = ctx.data_ptr<T>();
        const UpdateRule<T> u =
            make_rule<T>(D, o.grad_scale, o.momentum, o.grad_clip, o.grad_clip_norm, o.energy_scaled,
                         o.energy_temperature, o.tol, o.tol_final_step, o.bound_each_step, o.lower, o.upper,
                         o.step_clip, o.noise);
        run_descent<T>(p, u, act_, o.eta, o.noise_level, N, y.data_ptr<T>(), /*fixed=*/nullptr, /*mask=*/nullptr,
                       o.noise != NoiseMode::kNone ? noise->data_ptr<T>() : nullptr, o.nesterov,
                       E_final.data_ptr<T>(), E_init.data_ptr<T>(), steps.data_ptr<int32_t>(),
                       status.data_ptr<int8_t>());
      });
    }
    auto best = select_best_impl(y, E_final, E_init, status, o.selection);
    return py::make_tuple(y, E_final, E_init, steps, status, std::get<0>(best), std::get<1>(best),
                          std::get<2>(best));
  }

  // Whether the sources changed since the last pack (repacks them if so); for tests and diagnostics.
  bool refresh() { return current_changed(); }
  int64_t packed_matrices() const { return static_cast<int64_t>(state_->wt.size()) + 1; }

 private:
  std::shared_ptr<const PlanState> build() const {
    auto st = std::make_shared<PlanState>();
    for (const auto& t : sources_) st->seen.emplace_back(t);
    const at::Tensor &w_x = sources_[0], &w_in = sources_[1], &b_in = sources_[2], &w_out = sources_[3],
                     &b_out = sources_[4];
    TORCH_CHECK(w_in.dim() == 2, "pyebm: w_in must be [H1, D]; got shape ", w_in.sizes());
    const auto dt = w_in.scalar_type();
    TORCH_CHECK(dt == at::kFloat || dt == at::kDouble, "pyebm: MlpPlan supports float32 and float64 weights; got ",
                dt);
    auto same = [&](const at::Tensor& t, const char* name) {
      TORCH_CHECK(t.device().is_cpu(), "pyebm: MlpPlan needs CPU tensors; ", name, " is on ", t.device());
      TORCH_CHECK(t.scalar_type() == dt, "pyebm: ", name, " has dtype ", t.scalar_type(), " but w_in has ", dt);
    };
    same(w_in, "w_in");
    st->dtype = dt;
    st->D = w_in.size(1);
    st->H1 = w_in.size(0);
    if (w_x.defined()) {
      same(w_x, "w_x");
      TORCH_CHECK(w_x.dim() == 2 && w_x.size(0) == st->H1, "pyebm: w_x must be [H1, context_dim] = [", st->H1,
                  ", *]; got shape ", w_x.sizes());
      st->ctx_dim = w_x.size(1);
      st->w_x = w_x;
    }
    if (b_in.defined()) {
      same(b_in, "b_in");
      TORCH_CHECK(b_in.dim() == 1 && b_in.size(0) == st->H1, "pyebm: b_in must be [", st->H1, "]; got shape ",
                  b_in.sizes());
      st->b_in = b_in;
    }
    std::vector<int64_t> width{st->H1};
    for (int l = 0; l < num_layers_; ++l) {
      const at::Tensor& w = sources_[5 + l];
      const at::Tensor& b = sources_[5 + num_layers_ + l];
      same(w, "weights[]");
      same(b, "biases[]");
      TORCH_CHECK(w.dim() == 2 && w.size(1) == width.back(), "pyebm: weights[", l, "] must be [H_out, ",
                  width.back(), "]; got shape ", w.sizes());
      TORCH_CHECK(b.dim() == 1 && b.size(0) == w.size(0), "pyebm: biases[", l, "] must be [", w.size(0),
                  "]; got shape ", b.sizes());
      width.push_back(w.size(0));
    }
    TORCH_CHECK(static_cast<int>(width.size()) <= kMaxLayers, "pyebm: at most ", kMaxLayers, " hidden layers");
    same(w_out, "w_out");
    same(b_out, "b_out");
    TORCH_CHECK(w_out.numel() == width.back(), "pyebm: w_out must hold ", width.back(), " values; got shape ",
                w_out.sizes());
    TORCH_CHECK(b_out.numel() == 1, "pyebm: b_out must hold one value; got shape ", b_out.sizes());

    auto keep = [&](const at::Tensor& t) {
      st->keep.push_back(t.contiguous());
      return st->keep.back();
    };
    const at::Tensor w_in_c = keep(w_in), w_out_c = keep(w_out.reshape({-1})), b_out_c = keep(b_out.reshape({-1}));
    std::vector<at::Tensor> wc, bc;
    for (int l = 0; l < num_layers_; ++l) {
      wc.push_back(keep(sources_[5 + l]));
      bc.push_back(keep(sources_[5 + num_layers_ + l]));
    }
    auto fill = [&](auto& p) {
      using T = std::remove_const_t<std::remove_pointer_t<decltype(p.w_in)>>;
      p.D = st->D;
      p.num_hidden = static_cast<int>(width.size());
      for (int l = 0; l < p.num_hidden; ++l) p.width[l] = width[l];
      p.w_in = w_in_c.data_ptr<T>();
      for (int l = 0; l < num_layers_; ++l) {
        p.w[l] = wc[l].data_ptr<T>();
        p.b[l] = bc[l].data_ptr<T>();
      }
      p.w_out = w_out_c.data_ptr<T>();
      p.b_out = b_out_c.data_ptr<T>()[0];
      p.residual = residual_;
    };
    // W^T of every forward product, made once (the op path makes them once per call: same values).
    st->wt_in = transposed(w_in_c);
    for (const auto& w : wc) st->wt.push_back(transposed(w));
    auto fill_t = [&](auto& p) {
      using T = std::remove_const_t<std::remove_pointer_t<decltype(p.w_in)>>;
      p.wt_in = st->wt_in.data_ptr<T>();
      for (int l = 0; l < num_layers_; ++l) p.wt[l] = st->wt[l].data_ptr<T>();
    };
    if (dt == at::kFloat) {
      fill(st->df);
      fill_t(st->df);
      st->flops_grad = st->df.flops_per_row(true);
    } else {
      fill(st->dd);
      fill_t(st->dd);
      st->flops_grad = st->dd.flops_per_row(true);
    }
    return st;
  }

  bool current_changed() {
    for (const auto& s : state_->seen) {
      if (!s.unchanged()) {
        state_ = build();
        return true;
      }
    }
    return false;
  }
  std::shared_ptr<const PlanState> current() {
    current_changed();
    return state_;
  }

  template <typename T>
  static const MlpDesc<T>& desc(const PlanState& st) {
    if constexpr (std::is_same<T, float>::value) return st.df;
    else return st.dd;
  }

  static bool context_fits(const PlanState& st, const at::Tensor& x) {
    return st.ctx_dim > 0 && x.defined() && x.dim() == 2 && x.size(1) == st.ctx_dim && x.scalar_type() == st.dtype &&
           x.device().is_cpu();
  }
  static bool candidates_fit(const PlanState& st, const at::Tensor& y, int64_t B) {
    return y.defined() && y.dim() == 3 && y.size(0) == B && y.size(2) == st.D && y.scalar_type() == st.dtype &&
           y.device().is_cpu();
  }
  static at::Tensor context_term(const PlanState& st, const at::Tensor& x) {
    at::NoGradGuard no_grad;
    return st.b_in.defined() ? at::addmm(st.b_in, x, st.w_x.t()) : at::mm(x, st.w_x.t());
  }

  py::object evaluate(const at::Tensor& ctx_, const at::Tensor& y_, bool grad) {
    if (stale()) return py::none();
    at::NoGradGuard no_grad;
    std::shared_ptr<const PlanState> st = current();
    if (!ctx_.defined() || ctx_.dim() != 2 || ctx_.size(1) != st->H1 || ctx_.scalar_type() != st->dtype ||
        !ctx_.device().is_cpu() || !candidates_fit(*st, y_, ctx_.size(0)))
      return py::none();
    const int64_t B = y_.size(0), K = y_.size(1), D = y_.size(2), N = B * K;
    const at::Tensor y = y_.contiguous(), ctx = ctx_.contiguous();
    at::Tensor E = at::empty({B, K}, y.options());
    at::Tensor G = grad ? at::empty({B, K, D}, y.options()) : at::Tensor();
    if (N > 0) {
      std::unique_ptr<py::gil_scoped_release> nogil;
      if (N * st->flops_grad > kReleaseGilFlops) nogil = std::make_unique<py::gil_scoped_release>();
      AT_DISPATCH_FLOATING_TYPES(st->dtype, "pyebm_plan_mlp", [&] {
        using T = scalar_t;
        MlpDesc<T> p = desc<T>(*st);
        p.K = K;
        p.ctx = ctx.data_ptr<T>();
        run_mlp<T>(p, act_, N, y.data_ptr<T>(), E.data_ptr<T>(), grad ? G.data_ptr<T>() : nullptr);
      });
    }
    if (!grad) return py::cast(E);
    return py::make_tuple(E, G);
  }

  struct Slot {
    py::object dict, name, value;
  };
  std::vector<Slot> watch_;
  Act act_;
  bool residual_;
  int num_layers_ = 0;          // hidden-to-hidden layers (weights[])
  std::vector<at::Tensor> sources_;  // w_x, w_in, b_in, w_out, b_out, weights..., biases...
  std::shared_ptr<const PlanState> state_;
};

void bind_plan(py::module& m) {
  py::class_<DescentRule>(m, "DescentRule", "The update rule of a whole-loop descent (see pyebm.ops.mlp_descent).")
      .def(py::init<std::vector<double>, std::vector<double>, double, double, bool, c10::optional<double>,
                    c10::optional<double>, bool, double, double, bool, bool, const std::string&,
                    c10::optional<at::Tensor>, c10::optional<at::Tensor>, c10::optional<at::Tensor>,
                    const std::string&>(),
           py::arg("eta"), py::arg("noise_level"), py::arg("grad_scale"), py::arg("momentum"), py::arg("nesterov"),
           py::arg("grad_clip"), py::arg("grad_clip_norm"), py::arg("energy_scaled"), py::arg("energy_temperature"),
           py::arg("tol"), py::arg("tol_final_step"), py::arg("bound_each_step"), py::arg("noise_mode"),
           py::arg("lower"), py::arg("upper"), py::arg("step_clip"), py::arg("selection"))
      .def_property_readonly("steps", &DescentRule::steps);
  py::class_<MlpPlan>(m, "MlpPlan",
                      "MLP energy weights checked and packed once, called without the dispatcher (cpu backend).")
      .def(py::init<c10::optional<at::Tensor>, at::Tensor, c10::optional<at::Tensor>, std::vector<at::Tensor>,
                    std::vector<at::Tensor>, at::Tensor, at::Tensor, const std::string&, bool>(),
           py::arg("w_x"), py::arg("w_in"), py::arg("b_in"), py::arg("weights"), py::arg("biases"), py::arg("w_out"),
           py::arg("b_out"), py::arg("activation"), py::arg("residual"))
      .def("energy_and_grad", &MlpPlan::energy_and_grad, py::arg("ctx"), py::arg("y"))
      .def("energy", &MlpPlan::energy, py::arg("ctx"), py::arg("y"))
      .def("context", &MlpPlan::context, py::arg("x"))
      .def("descent", &MlpPlan::descent, py::arg("x"), py::arg("y0"), py::arg("rule"), py::arg("noise"))
      .def("refresh", &MlpPlan::refresh)
      .def("watch", &MlpPlan::watch, py::arg("slots"))
      .def_property_readonly("stale", &MlpPlan::stale)
      .def_property_readonly("packed_matrices", &MlpPlan::packed_matrices);
}

}  // namespace cpu
}  // namespace pyebm
