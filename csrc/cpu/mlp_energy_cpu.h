// Shared between the CPU op implementations (mlp_energy.cpp, and the descent ops that reuse it).
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <vector>

#include "pyebm/activations.h"

namespace pyebm {
namespace cpu {

struct MlpShapes {
  int64_t B = 0, K = 0, D = 0;
  std::vector<int64_t> width;  // H_1 .. H_L
};

Act parse_activation(const std::string& name);

// Checks every argument of the MLP ops (shapes, dtypes, devices) with errors that name the argument.
MlpShapes check_mlp_args(const at::Tensor& ctx, const at::Tensor& y, const at::Tensor& w_in,
                         at::TensorList weights, at::TensorList biases, const at::Tensor& w_out,
                         const at::Tensor& b_out);

}  // namespace cpu
}  // namespace pyebm
