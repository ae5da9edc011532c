// pyebm::select_best: the best candidate of each context after a descent, in one pass (CPU).
// score = -E (min), E (max) or E_init - E (max_gap); candidates whose status is non-finite or whose score is
// not finite never win; ties go to the lowest index (torch.argmax's rule); a context with no valid
// candidate returns index 0. Same result as pyebm.descent._select followed by the gathers.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <limits>

#include "op_checks.h"
#include "select_best.h"

namespace pyebm {
namespace cpu {

int parse_selection(c10::string_view selection) {
  if (selection == "min") return 0;
  if (selection == "max") return 1;
  if (selection == "max_gap") return 2;
  TORCH_CHECK_VALUE(false, "pyebm: selection must be min, max or max_gap; got '", std::string(selection), "'");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> select_best_impl(const at::Tensor& y_, const at::Tensor& E_,
                                                                const at::Tensor& E_init_, const at::Tensor& status_,
                                                                int mode) {
  const char* op = "pyebm::select_best";
  using checks::Arg;
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"y", &y_}, {"E", &E_}, {"E_init", &E_init_},
                                {"status", &status_}})
    checks::dense(op, Arg{name}, *t);
  TORCH_CHECK_VALUE(E_.dim() == 2, op, ": E must be [B, K]; got shape ", E_.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(E_.scalar_type()), op, ": E must be a floating tensor; got ",
                   checks::describe(E_));
  const int64_t B = E_.size(0), K = E_.size(1);
  TORCH_CHECK_VALUE(K >= 1, op, ": select_best needs at least one candidate per context (K >= 1)");
  TORCH_CHECK_VALUE(y_.dim() >= 2 && y_.size(0) == B && y_.size(1) == K, op, ": y must be [B, K, ...] = [", B, ", ",
                    K, ", ...]; got shape ", y_.sizes());
  checks::shape(op, Arg{"E_init"}, E_init_, E_.sizes(), "[B, K]");
  checks::like(op, Arg{"E_init"}, E_init_, E_, "E");
  TORCH_CHECK_VALUE(status_.sizes() == E_.sizes() && status_.scalar_type() == at::kChar, op,
                    ": status must be int8 [B, K] = [", B, ", ", K, "]; got ", checks::describe(status_));
  checks::device(op, Arg{"status"}, status_, E_.device());
  checks::device(op, Arg{"y"}, y_, E_.device());
  TORCH_CHECK_VALUE(E_.device().is_cpu(), op, ": the cpu kernel needs CPU tensors; got E on ", E_.device());
  const at::Tensor E = E_.contiguous(), E0 = E_init_.contiguous();
  const at::Tensor status = status_.contiguous();
  at::Tensor idx = at::empty({B}, E_.options().dtype(at::kLong));
  const int8_t* st = status.data_ptr<int8_t>();
  int64_t* out = idx.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, E.scalar_type(), "pyebm_select_best", [&] {
    const scalar_t* e = E.data_ptr<scalar_t>();
    const scalar_t* e0 = E0.data_ptr<scalar_t>();
    for (int64_t b = 0; b < B; ++b) {
      int64_t best = 0;
      double best_score = 0;
      bool found = false;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t i = b * K + k;
        // The score is rounded to E's dtype, as the torch expression computes it.
        const scalar_t sv = mode == 0 ? scalar_t(-e[i]) : (mode == 1 ? e[i] : scalar_t(e0[i] - e[i]));
        const double s = static_cast<double>(sv);
        if (st[i] == 2 || !std::isfinite(s)) continue;
        if (!found || s > best_score) {
          best = k;
          best_score = s;
          found = true;
        }
      }
      out[b] = best;
    }
  });
  // Gathers as byte copies: any dtype, no indexing kernels for a handful of rows.
  const at::Tensor y = y_.contiguous();
  std::vector<int64_t> shape(y.sizes().begin(), y.sizes().end());
  shape.erase(shape.begin() + 1);
  at::Tensor best_y = at::empty(shape, y.options());
  at::Tensor best_E = at::empty({B}, E_.options());
  const at::Tensor& Ec = E;
  const int64_t row = (K > 0 ? y.numel() / std::max<int64_t>(1, B * K) : 0) * y.element_size();
  const int64_t esz = Ec.element_size();
  const char* ys = static_cast<const char*>(y.data_ptr());
  const char* es = static_cast<const char*>(Ec.data_ptr());
  char* yd = static_cast<char*>(best_y.data_ptr());
  char* ed = static_cast<char*>(best_E.data_ptr());
  if (K > 0) {
    for (int64_t b = 0; b < B; ++b) {
      std::memcpy(yd + b * row, ys + (b * K + out[b]) * row, row);
      std::memcpy(ed + b * esz, es + (b * K + out[b]) * esz, esz);
    }
  }
  return {best_y, best_E, idx};
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> select_best_cpu(const at::Tensor& y, const at::Tensor& E,
                                                               const at::Tensor& E_init, const at::Tensor& status,
                                                               c10::string_view selection) {
  return select_best_impl(y, E, E_init, status, parse_selection(selection));
}

}  // namespace

// Schema: csrc/ops.cpp.
TORCH_LIBRARY_IMPL(pyebm, CPU, m) { m.impl("select_best", &select_best_cpu); }

}  // namespace cpu
}  // namespace pyebm
