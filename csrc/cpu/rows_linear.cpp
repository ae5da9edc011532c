// pyebm::rows_linear: y = x @ w^T (+ add) for a few rows x [M, K] against a weight w [N, K] read in its own
// row layout (rows_linear.h). float32 runs the streaming kernel, its columns split between the intra-op
// threads (every output element is computed the same way whatever the split, so every thread count gives the
// same numbers); float64 goes to ATen's addmm. An inference op: no autograd formula (op_autograd.cpp raises
// when an input requires grad in grad mode).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "op_checks.h"
#include "rows_linear.h"

namespace pyebm {
namespace cpu {

namespace {

// Output columns per parallel task: at least this many weight elements each, so a product smaller than
// about two tasks' worth runs on one thread (a parallel region costs a few microseconds).
constexpr int64_t kRowsLinearGrainElems = 1 << 16;

at::Tensor rows_linear_cpu(const at::Tensor& x_, const at::Tensor& w_, const c10::optional<at::Tensor>& add_) {
  const char* op = "pyebm::rows_linear";
  using checks::Arg;
  checks::dense(op, Arg{"x"}, x_);
  checks::dense(op, Arg{"w"}, w_);
  TORCH_CHECK_VALUE(x_.dim() == 2, op, ": x must be [M, K]; got ", checks::describe(x_));
  TORCH_CHECK_VALUE(w_.dim() == 2, op, ": w must be [N, K]; got ", checks::describe(w_));
  TORCH_CHECK_TYPE(x_.scalar_type() == at::kFloat || x_.scalar_type() == at::kDouble, op,
                   ": x must be float32 or float64; got ", checks::describe(x_));
  checks::like(op, Arg{"w"}, w_, x_, "x");
  TORCH_CHECK_VALUE(x_.device().is_cpu(), op, ": the cpu kernel needs CPU tensors; got x on ", x_.device());
  const int64_t M = x_.size(0), K = x_.size(1), N = w_.size(0);
  TORCH_CHECK_VALUE(w_.size(1) == K, op, ": w must be [N, K] with K = ", K, " (x's columns); got ",
                    checks::describe(w_));
  if (add_.has_value()) {
    checks::dense(op, Arg{"add"}, *add_);
    checks::shape(op, Arg{"add"}, *add_, {M, N}, "[M, N]");
    checks::like(op, Arg{"add"}, *add_, x_, "x");
  }
  if (x_.scalar_type() != at::kFloat) {
    return add_.has_value() ? at::addmm(*add_, x_, w_.t()) : at::mm(x_, w_.t());
  }
  // Rows must be unit-stride; any row stride is read in place.
  const at::Tensor x = x_.stride(1) == 1 && (M <= 1 || x_.stride(0) >= K) ? x_ : x_.contiguous();
  const at::Tensor w = w_.stride(1) == 1 && (N <= 1 || w_.stride(0) >= K) ? w_ : w_.contiguous();
  at::Tensor add;
  if (add_.has_value()) {
    add = add_->stride(1) == 1 && (M <= 1 || add_->stride(0) >= N) ? *add_ : add_->contiguous();
  }
  at::Tensor y = at::empty({M, N}, x_.options());
  if (M == 0 || N == 0) return y;
  if (K == 0) return add.defined() ? y.copy_(add) : y.zero_();
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const float* ap = add.defined() ? add.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  const int64_t ldx = M > 1 ? x.stride(0) : K, ldw = N > 1 ? w.stride(0) : K;
  const int64_t lda = add.defined() && M > 1 ? add.stride(0) : N;
  const int64_t grain = std::max<int64_t>(1, kRowsLinearGrainElems / K);
  at::parallel_for(0, N, grain, [&](int64_t j0, int64_t j1) {
    rows_linear_panel(M, K, xp, ldx, wp, ldw, yp, N, ap, lda, j0, j1);
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyebm, CPU, m) { m.impl("rows_linear", &rows_linear_cpu); }

}  // namespace cpu
}  // namespace pyebm
