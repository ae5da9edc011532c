// CPU implementation of pyebm::mlp_energy_grad and pyebm::mlp_energy: input checks, dtype dispatch,
// row blocks in parallel. The per-block math lives in mlp_block.h.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdlib>
#include <string>

#include "cpu_cache.h"
#include "mlp_block.h"
#include "mlp_energy_cpu.h"
#include "op_checks.h"

namespace pyebm {
namespace cpu {

Act parse_activation(const std::string& name) {
  if (name == "relu") return Act::kRelu;
  if (name == "silu") return Act::kSilu;
  if (name == "gelu") return Act::kGelu;
  if (name == "gelu_tanh") return Act::kGeluTanh;
  if (name == "tanh") return Act::kTanh;
  if (name == "softplus") return Act::kSoftplus;
  TORCH_CHECK_VALUE(false, "pyebm: activation must be one of relu, silu, gelu, gelu_tanh, tanh, softplus; got '",
                    name, "'");
}

MlpShapes check_mlp_args(const at::Tensor& ctx, const at::Tensor& y, const at::Tensor& w_in,
                         at::TensorList weights, at::TensorList biases, const at::Tensor& w_out,
                         const at::Tensor& b_out, const char* op, const char* y_name) {
  using checks::Arg;
  checks::dense(op, Arg{y_name}, y);
  TORCH_CHECK_VALUE(y.dim() == 3, op, ": ", y_name, " must be [B, K, D] (3-D); got shape ", y.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(y.scalar_type()), op, ": ", y_name, " must be a floating tensor; got ",
                   y.scalar_type());
  MlpShapes s;
  s.B = y.size(0);
  s.K = y.size(1);
  s.D = y.size(2);
  checks::dense(op, Arg{"w_in"}, w_in);
  checks::like(op, Arg{"w_in"}, w_in, y, y_name);
  TORCH_CHECK_VALUE(w_in.dim() == 2, op, ": w_in must be [H1, D] (2-D); got shape ", w_in.sizes());
  TORCH_CHECK_VALUE(w_in.size(1) == s.D, op, ": candidate width mismatch: ", y_name, " is [B, K, ", s.D,
                    "] but w_in is ", w_in.sizes(), " (expected [H1, ", s.D, "])");
  const int64_t H1 = w_in.size(0);
  checks::dense(op, Arg{"ctx"}, ctx);
  checks::like(op, Arg{"ctx"}, ctx, y, y_name);
  TORCH_CHECK_VALUE(ctx.dim() == 2 && ctx.size(1) == H1, op, ": ctx must be [B, H1] = [", s.B, ", ", H1,
                    "]; got shape ", ctx.sizes());
  TORCH_CHECK_VALUE(ctx.size(0) == s.B, op, ": batch mismatch: ctx has ", ctx.size(0), " rows but ", y_name,
                    " has B = ", s.B);
  TORCH_CHECK_VALUE(weights.size() == biases.size(), op, ": weights and biases must have the same length; got ",
                    weights.size(), " and ", biases.size());
  TORCH_CHECK_VALUE(static_cast<int>(weights.size()) + 1 <= kMaxLayers, op, ": at most ", kMaxLayers,
                    " hidden layers; got ", weights.size() + 1);
  s.width.push_back(H1);
  for (size_t l = 0; l < weights.size(); ++l) {
    const auto& w = weights[l];
    const auto& b = biases[l];
    const int64_t li = static_cast<int64_t>(l);
    checks::dense(op, Arg{"weights", li}, w);
    checks::dense(op, Arg{"biases", li}, b);
    checks::like(op, Arg{"weights", li}, w, y, y_name);
    checks::like(op, Arg{"biases", li}, b, y, y_name);
    TORCH_CHECK_VALUE(w.dim() == 2 && w.size(1) == s.width.back(), op, ": weights[", l, "] must be [H_out, ",
                      s.width.back(), "]; got shape ", w.sizes());
    TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == w.size(0), op, ": biases[", l, "] must be [", w.size(0),
                      "]; got shape ", b.sizes());
    s.width.push_back(w.size(0));
  }
  checks::dense(op, Arg{"w_out"}, w_out);
  checks::dense(op, Arg{"b_out"}, b_out);
  checks::like(op, Arg{"w_out"}, w_out, y, y_name);
  checks::like(op, Arg{"b_out"}, b_out, y, y_name);
  TORCH_CHECK_VALUE(w_out.numel() == s.width.back() && (w_out.dim() == 1 || (w_out.dim() == 2 && w_out.size(0) == 1)),
                    op, ": w_out must be [", s.width.back(), "] or [1, ", s.width.back(), "]; got shape ",
                    w_out.sizes());
  TORCH_CHECK_VALUE(b_out.numel() == 1, op, ": b_out must hold one value; got shape ", b_out.sizes());
  return s;
}

int64_t block_bytes() {
  static const int64_t bytes = [] {
    const char* env = std::getenv("PYEBM_CPU_BLOCK_BYTES");
    const int64_t v = env ? std::atoll(env) : 0;
    return v > 0 ? v : default_block_bytes(cpu_caches());
  }();
  return bytes;
}

int64_t split_flops() {
  static const int64_t v = [] {
    const char* env = std::getenv("PYEBM_CPU_SPLIT_FLOPS");
    const int64_t x = env ? std::atoll(env) : 0;
    return x > 0 ? x : kDefaultSplitFlops;
  }();
  return v;
}

at::Tensor to_compute(const at::Tensor& t, at::ScalarType dt) {
  // No-op in the common case (right dtype, contiguous) without a dispatcher round trip.
  return (t.scalar_type() == dt && t.is_contiguous()) ? t : t.to(dt).contiguous();
}

at::Tensor transposed(const at::Tensor& w) {
  at::Tensor t = at::empty({w.size(1), w.size(0)}, w.options());
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "pyebm_transpose", [&] {
    transpose_to<scalar_t>(w.size(0), w.size(1), w.data_ptr<scalar_t>(), t.data_ptr<scalar_t>());
  });
  return t;
}

MlpTensors prepare_mlp(const at::Tensor& ctx, at::ScalarType y_dtype, const at::Tensor& w_in,
                       at::TensorList weights, at::TensorList biases, const at::Tensor& w_out,
                       const at::Tensor& b_out, int64_t transposes_for_rows) {
  MlpTensors m;
  // Half precision inputs are computed in float32 and rounded once at the end.
  m.dtype = (y_dtype == at::kDouble) ? at::kDouble : at::kFloat;
  m.ctx = to_compute(ctx, m.dtype);
  m.w_in = to_compute(w_in, m.dtype);
  m.w_out = to_compute(w_out, m.dtype);
  m.b_out = to_compute(b_out, m.dtype);
  for (const auto& t : weights) m.w.push_back(to_compute(t, m.dtype));
  for (const auto& t : biases) m.b.push_back(to_compute(t, m.dtype));
  if (transposes_for_rows > 0) {
    auto need = [&](const at::Tensor& w) {
      return !nt_small_path_covers(m.dtype == at::kFloat, transposes_for_rows, w.numel());
    };
    if (need(m.w_in)) m.wt_in = transposed(m.w_in);
    for (const auto& t : m.w) m.wt.push_back(need(t) ? transposed(t) : at::Tensor());
  }
  return m;
}

int64_t block_rows_for(int64_t N, int64_t row_bytes, int64_t flops_per_row, int64_t threads, int64_t bytes,
                       int64_t split) {
  if (N <= 0) return 1;
  // Rows whose working set fits the budget, 16 to 512 (fewer rows starve the products, more gain nothing).
  const int64_t fit = std::max<int64_t>(16, std::min<int64_t>(512, bytes / std::max<int64_t>(1, row_bytes)));
  const int64_t fit_blocks = (N + fit - 1) / fit;
  // A block that would only be there to use another thread must carry enough work to pay for the fork.
  const int64_t min_rows = std::max<int64_t>(8, split / std::max<int64_t>(1, flops_per_row));
  const int64_t fork_blocks = std::max<int64_t>(1, N / min_rows);
  const int64_t want = std::max(fit_blocks, std::min(std::max<int64_t>(1, threads), fork_blocks));
  // A whole number of blocks per thread, so that no thread waits for another's extra block (3 blocks on 2
  // threads take as long as 4 smaller ones).
  const int64_t t = std::max<int64_t>(1, std::min(threads, want));
  const int64_t nblocks = std::min(N, (want + t - 1) / t * t);
  return (N + nblocks - 1) / nblocks;
}

int64_t block_rows(int64_t N, int64_t row_bytes, int64_t flops_per_row) {
  return block_rows_for(N, row_bytes, flops_per_row, at::get_num_threads(), block_bytes(), split_flops());
}

namespace {

std::tuple<at::Tensor, at::Tensor> mlp_impl(const at::Tensor& ctx_, const at::Tensor& y_, const at::Tensor& w_in_,
                                            at::TensorList weights_, at::TensorList biases_,
                                            const at::Tensor& w_out_, const at::Tensor& b_out_,
                                            c10::string_view activation, bool residual, bool grad) {
  const char* op = grad ? "pyebm::mlp_energy_grad" : "pyebm::mlp_energy";
  const MlpShapes s = check_mlp_args(ctx_, y_, w_in_, weights_, biases_, w_out_, b_out_, op);
  TORCH_CHECK_VALUE(y_.device().is_cpu(), op, ": the cpu kernel needs CPU tensors; got y on ", y_.device());
  const Act act = parse_activation(std::string(activation));
  const auto out_dtype = y_.scalar_type();
  const MlpTensors mt = prepare_mlp(ctx_, out_dtype, w_in_, weights_, biases_, w_out_, b_out_,
                                    /*transposes_for_rows=*/std::max<int64_t>(1, s.B * s.K));
  const auto dt = mt.dtype;
  const at::Tensor y = to_compute(y_, dt);

  at::Tensor E = at::empty({s.B, s.K}, y.options());
  at::Tensor G = grad ? at::empty({s.B, s.K, s.D}, y.options()) : at::Tensor();
  const int64_t N = s.B * s.K;
  if (N > 0) {
    AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "pyebm_mlp_energy", [&] {
      const MlpDesc<scalar_t> p = make_desc<scalar_t>(s, mt, residual);
      run_mlp<scalar_t>(p, act, N, y.data_ptr<scalar_t>(), E.data_ptr<scalar_t>(),
                    grad ? G.data_ptr<scalar_t>() : nullptr);
    });
  }
  if (out_dtype != dt) {
    E = E.to(out_dtype);
    if (grad) G = G.to(out_dtype);
  }
  return {E, G};
}

std::tuple<at::Tensor, at::Tensor> mlp_energy_grad_cpu(const at::Tensor& ctx, const at::Tensor& y,
                                                       const at::Tensor& w_in, at::TensorList weights,
                                                       at::TensorList biases, const at::Tensor& w_out,
                                                       const at::Tensor& b_out, c10::string_view activation,
                                                       bool residual) {
  return mlp_impl(ctx, y, w_in, weights, biases, w_out, b_out, activation, residual, /*grad=*/true);
}

at::Tensor mlp_energy_cpu(const at::Tensor& ctx, const at::Tensor& y, const at::Tensor& w_in,
                          at::TensorList weights, at::TensorList biases, const at::Tensor& w_out,
                          const at::Tensor& b_out, c10::string_view activation, bool residual) {
  return std::get<0>(mlp_impl(ctx, y, w_in, weights, biases, w_out, b_out, activation, residual, /*grad=*/false));
}

at::Tensor dispatch_floor_cpu(const at::Tensor& x) { return at::empty({0}, x.options()); }

}  // namespace

TORCH_LIBRARY_IMPL(pyebm, CPU, m) {
  m.impl("mlp_energy_grad", &mlp_energy_grad_cpu);
  m.impl("mlp_energy", &mlp_energy_cpu);
  m.impl("dispatch_floor", &dispatch_floor_cpu);
}

}  // namespace cpu
}  // namespace pyebm
