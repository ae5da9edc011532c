// Best candidate per context after a descent (CPU): see select_best.cpp.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace pyebm {
namespace cpu {

// "min" -> 0, "max" -> 1, "max_gap" -> 2; anything else is an error.
int parse_selection(c10::string_view selection);

// (best [B, ...], best_energy [B], best_index [B]) for y [B, K, ...], E and E_init [B, K], status int8 [B, K].
std::tuple<at::Tensor, at::Tensor, at::Tensor> select_best_impl(const at::Tensor& y, const at::Tensor& E,
                                                                const at::Tensor& E_init, const at::Tensor& status,
                                                                int mode);

}  // namespace cpu
}  // namespace pyebm
