// pyebm._C.MlpPlan: the MLP energy's weights checked, laid out and packed, then called straight from
// Python through pybind11, without the dispatcher, the argument lists and the per-call checks of the
// torch.ops.pyebm.* ops. MLPEnergy uses it on the cpu backend in eager mode (the ops stay the path for
// torch.compile, tracing and every other device). The kernels are the ops' kernels (mlp_block, run_descent,
// select_best_impl), on the same values, so both paths give the same numbers bit for bit.
//
// The plan is built from the module's attributes (module, name), not from tensors: every call re-reads them
// and compares with the snapshot its pack was made from (sources.h), and packs again when anything changed
// (an in-place write, .data =, a replaced or parametrized parameter, functional_call). The pack owns aliases
// of every storage it points into, so a call never reads memory that the module has let go of, whatever
// another thread assigns meanwhile. The state a call computes with is immutable and shared: a repack
// replaces it (under the GIL) without touching a call that is running.
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
#include "descent_rule.h"
#include "mlp_descent_cpu.h"
#include "mlp_energy_cpu.h"
#include "py_eager.h"
#include "select_best.h"
#include "sources.h"

namespace py = pybind11;

namespace pyebm {
namespace cpu {
namespace {

// Work (multiply-adds x2) above which a call releases the GIL while it computes.
constexpr int64_t kReleaseGilFlops = int64_t(1) << 21;

// Everything a call reads; replaced as a whole when a source changes, so a call that is running keeps
// the state it started with.
struct PlanState {
  explicit PlanState(Snapshot s) : sources(std::move(s)) {}
  Snapshot sources;                    // what the pack was made from (owns every storage it points into)
  bool usable = true;                  // false: the sources cannot be packed (another dtype, device or shape)
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

}  // namespace

class MlpPlan {
 public:
  // sources: the names under `module` of w_x, w_in, b_in, w_out, b_out, then the hidden layers' weights, then
  // their biases (None for a source the model does not have: no context, no biases).
  MlpPlan(const py::object& module, const py::sequence& sources, int64_t num_layers, const std::string& activation,
          bool residual)
      : act_(parse_activation(activation)), residual_(residual), num_layers_(static_cast<int>(num_layers)) {
    TORCH_CHECK(num_layers >= 0 && static_cast<int64_t>(sources.size()) == 5 + 2 * num_layers,
                "pyebm: MlpPlan takes 5 + 2 * num_layers sources; got ", sources.size(), " for ", num_layers,
                " layers");
    state_ = build(Snapshot(module, sources));
  }

  // (E [B, K], dE/dy [B, K, D]), or None when the plan does not take these inputs as they are, or the call is
  // not an eager call on plain tensors (eager_plain).
  py::object energy_and_grad(const py::handle& ctx, const py::handle& y) {
    if (!eager_plain(ctx, y)) return py::none();
    return evaluate(THPVariable_Unpack(ctx.ptr()), THPVariable_Unpack(y.ptr()), true);
  }
  // E [B, K], or None.
  py::object energy(const py::handle& ctx, const py::handle& y) {
    if (!eager_plain(ctx, y)) return py::none();
    return evaluate(THPVariable_Unpack(ctx.ptr()), THPVariable_Unpack(y.ptr()), false);
  }

  // The context term W_x x + b_1 [B, H1] for x [B, context_dim] (None when x does not fit), computed as
  // MLPEnergy.prepare computes it.
  py::object context(const at::Tensor& x) {
    std::shared_ptr<const PlanState> st = current();
    if (!st->usable || !context_fits(*st, x)) return py::none();
    return py::cast(context_term(*st, x));
  }

  // The whole-loop descent from y0 [B, K, D] for context x [B, context_dim] (the context term is computed
  // here), then the best candidate per context: (y, E, E_init, steps, status, best, best_E, best_index).
  // noise [T, B, K, D] when the rule draws noise. None when the inputs do not fit the plan as they are.
  py::object descent(const at::Tensor& x, const at::Tensor& y0, const DescentRule& rule,
                     const c10::optional<at::Tensor>& noise) {
    at::NoGradGuard no_grad;  // inference: no autograd graph, whatever the inputs require
    std::shared_ptr<const PlanState> st = current();
    const RuleOptions& o = rule.options();
    if (!st->usable || !context_fits(*st, x) || !candidates_fit(*st, y0, x.size(0))) return py::none();
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
    const bool release_gil = N * st->flops_grad * Tn > kReleaseGilFlops;
    const at::Tensor noise_t = o.noise != NoiseMode::kNone ? owned(*noise, *noise, release_gil) : at::Tensor();
    {
      std::unique_ptr<py::gil_scoped_release> nogil;
      if (release_gil) nogil = std::make_unique<py::gil_scoped_release>();
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
                       noise_t.defined() ? noise_t.data_ptr<T>() : nullptr, o.nesterov,
                       E_final.data_ptr<T>(), E_init.data_ptr<T>(), steps.data_ptr<int32_t>(),
                       status.data_ptr<int8_t>());
      });
    }
    auto best = select_best_impl(y, E_final, E_init, status, o.selection);
    return py::make_tuple(y, E_final, E_init, steps, status, std::get<0>(best), std::get<1>(best),
                          std::get<2>(best));
  }

  // Whether the sources changed since the last pack (repacks them if so); for tests and diagnostics.
  bool refresh() {
    const std::shared_ptr<const PlanState> before = state_;
    return current() != before;
  }
  // How many packs this plan has made (1 after construction); for tests and diagnostics.
  int64_t packs() const { return packs_; }
  int64_t packed_matrices() const { return state_->usable ? static_cast<int64_t>(state_->wt.size()) + 1 : 0; }

 private:
  std::shared_ptr<const PlanState> build(Snapshot sources) {
    ++packs_;
    auto st = std::make_shared<PlanState>(std::move(sources));
    const std::vector<at::Tensor>& src = st->sources.tensors();
    const at::Tensor &w_x = src[0], &w_in = src[1], &b_in = src[2], &w_out = src[3];
    TORCH_CHECK(w_in.defined() && w_out.defined(), "pyebm: MlpPlan needs w_in and w_out");
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
    std::vector<at::Tensor> bias(num_layers_);
    for (int l = 0; l < num_layers_; ++l) {
      const at::Tensor& w = src[5 + l];
      TORCH_CHECK(w.defined(), "pyebm: MlpPlan needs every hidden layer's weight");
      bias[l] = src[5 + num_layers_ + l].defined() ? src[5 + num_layers_ + l] : at::zeros({w.size(0)}, w.options());
      const at::Tensor& b = bias[l];
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
    TORCH_CHECK(w_out.numel() == width.back(), "pyebm: w_out must hold ", width.back(), " values; got shape ",
                w_out.sizes());
    // A model without biases reads zeros (made here, owned by the pack).
    const at::Tensor b_out = src[4].defined() ? src[4] : at::zeros({1}, w_in.options());
    same(b_out, "b_out");
    TORCH_CHECK(b_out.numel() == 1, "pyebm: b_out must hold one value; got shape ", b_out.sizes());

    auto keep = [&](const at::Tensor& t) {
      st->keep.push_back(t.contiguous());
      return st->keep.back();
    };
    const at::Tensor w_in_c = keep(w_in), w_out_c = keep(w_out.reshape({-1})), b_out_c = keep(b_out.reshape({-1}));
    std::vector<at::Tensor> wc, bc;
    for (int l = 0; l < num_layers_; ++l) {
      wc.push_back(keep(src[5 + l]));
      bc.push_back(keep(bias[l]));
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

  // The state for the module's current weights: the last pack when nothing changed, else a new one. Weights
  // that cannot be packed (changed to another dtype or device, inconsistent shapes) give an unusable state:
  // every call returns None and the op path computes or raises the documented error.
  std::shared_ptr<const PlanState> current() {
    if (!state_->sources.unchanged()) {
      Snapshot again = state_->sources.again();
      try {
        state_ = build(again);
      } catch (const c10::Error&) {
        auto st = std::make_shared<PlanState>(std::move(again));
        st->usable = false;
        state_ = st;
      }
    }
    return state_;
  }

  template <typename T>
  static const MlpDesc<T>& desc(const PlanState& st) {
    if constexpr (std::is_same<T, float>::value) return st.df;
    else return st.dd;
  }

  // pyebm._dispatch.eager_refusal(a, b) is None, in C++ (py_eager.h).
  static bool eager_plain(const py::handle& a, const py::handle& b) {
    return plain_tensor(a) && plain_tensor(b) && eager_context();
  }

  static bool context_fits(const PlanState& st, const at::Tensor& x) {
    return st.ctx_dim > 0 && x.defined() && x.dim() == 2 && x.size(1) == st.ctx_dim && x.scalar_type() == st.dtype &&
           x.device().is_cpu();
  }
  static bool candidates_fit(const PlanState& st, const at::Tensor& y, int64_t B) {
    return y.defined() && y.dim() == 3 && y.size(0) == B && y.size(2) == st.D && y.scalar_type() == st.dtype &&
           y.device().is_cpu();
  }
  // t, or an alias of it when it is the caller's own tensor and the GIL is about to be released.
  static at::Tensor owned(at::Tensor t, const at::Tensor& caller, bool release_gil) {
    return release_gil && t.is_same(caller) ? caller.detach() : t;
  }
  static at::Tensor context_term(const PlanState& st, const at::Tensor& x) {
    at::NoGradGuard no_grad;
    return st.b_in.defined() ? at::addmm(st.b_in, x, st.w_x.t()) : at::mm(x, st.w_x.t());
  }

  py::object evaluate(const at::Tensor& ctx_, const at::Tensor& y_, bool grad) {
    at::NoGradGuard no_grad;
    std::shared_ptr<const PlanState> st = current();
    if (!st->usable || !ctx_.defined() || ctx_.dim() != 2 || ctx_.size(1) != st->H1 || ctx_.scalar_type() != st->dtype ||
        !ctx_.device().is_cpu() || !candidates_fit(*st, y_, ctx_.size(0)))
      return py::none();
    const int64_t B = y_.size(0), K = y_.size(1), D = y_.size(2), N = B * K;
    const bool release_gil = N * st->flops_grad > kReleaseGilFlops;
    // Without the GIL another Python thread may reassign the caller's tensors (.data =): compute on aliases.
    const at::Tensor y = owned(y_.contiguous(), y_, release_gil), ctx = owned(ctx_.contiguous(), ctx_, release_gil);
    at::Tensor E = at::empty({B, K}, y.options());
    at::Tensor G = grad ? at::empty({B, K, D}, y.options()) : at::Tensor();
    if (N > 0) {
      std::unique_ptr<py::gil_scoped_release> nogil;
      if (release_gil) nogil = std::make_unique<py::gil_scoped_release>();
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

  Act act_;
  bool residual_;
  int num_layers_ = 0;  // hidden-to-hidden layers (weights[])
  int64_t packs_ = 0;
  std::shared_ptr<const PlanState> state_;
};

void bind_plan(py::module& m) {
  m.def("all_finite", [](const py::handle& h) -> py::object {
    // Exactly torch.Tensor (no tracer, transform or dispatch mode active), dense and contiguous on the CPU,
    // float32 or float64: whether every value is finite, read in place without the dispatcher (a policy checks
    // its observations on every act). None for anything else: the caller then asks torch.isfinite.
    if (!plain_tensor(h) || !eager_context()) return py::none();
    const at::Tensor& t = THPVariable_Unpack(h.ptr());
    if (!t.device().is_cpu() || t.layout() != at::kStrided || !t.is_contiguous() ||
        (t.scalar_type() != at::kFloat && t.scalar_type() != at::kDouble))
      return py::none();
    bool finite = true;
    AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "pyebm_all_finite", [&] {
      const scalar_t* p = t.const_data_ptr<scalar_t>();
      const int64_t n = t.numel();
      scalar_t acc = 0;  // x - x is 0 for a finite x and NaN for NaN or +-Inf
      for (int64_t i = 0; i < n; ++i) acc += p[i] - p[i];
      finite = acc == scalar_t(0);
    });
    return py::bool_(finite);
  }, "Whether every value of a contiguous float32/float64 CPU tensor is finite; None for other tensors.");
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
                      "MLP energy weights packed from the module's attributes and checked against them on every "
                      "call, called without the dispatcher (cpu backend).")
      .def(py::init<const py::object&, const py::sequence&, int64_t, const std::string&, bool>(), py::arg("module"),
           py::arg("sources"), py::arg("num_layers"), py::arg("activation"), py::arg("residual"))
      .def("energy_and_grad", &MlpPlan::energy_and_grad, py::arg("ctx"), py::arg("y"))
      .def("energy", &MlpPlan::energy, py::arg("ctx"), py::arg("y"))
      .def("context", &MlpPlan::context, py::arg("x"))
      .def("descent", &MlpPlan::descent, py::arg("x"), py::arg("y0"), py::arg("rule"), py::arg("noise"))
      .def("refresh", &MlpPlan::refresh)
      .def_property_readonly("packs", &MlpPlan::packs)
      .def_property_readonly("packed_matrices", &MlpPlan::packed_matrices);
  py::class_<Snapshot>(m, "Snapshot",
                       "The tensors of a module's named sources as read now, with a check that the module still "
                       "holds exactly them (identity, storage, version, layout).")
      .def(py::init<const py::object&, const py::sequence&>(), py::arg("module"), py::arg("sources"))
      .def("again", &Snapshot::again)
      .def("unchanged", &Snapshot::unchanged, py::arg("versions") = true)
      .def_property_readonly("tensors", &Snapshot::tensors)
      .def("__len__", &Snapshot::size);
}

}  // namespace cpu
}  // namespace pyebm
