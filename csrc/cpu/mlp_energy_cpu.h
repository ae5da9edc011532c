// Shared between the CPU op implementations (mlp_energy.cpp, and the descent ops that reuse it).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <string>
#include <type_traits>
#include <vector>

#include "cpu_cache.h"
#include "mlp_block.h"
#include "pyebm/activations.h"

namespace pyebm {
namespace cpu {

struct MlpShapes {
  int64_t B = 0, K = 0, D = 0;
  std::vector<int64_t> width;  // H_1 .. H_L
};

Act parse_activation(const std::string& name);

// Checks every tensor argument of the MLP ops (layout, shape, dtype, device against y) with errors that name
// the op and the argument (op_checks.h). Non-contiguous tensors are accepted: prepare_mlp copies them.
MlpShapes check_mlp_args(const at::Tensor& ctx, const at::Tensor& y, const at::Tensor& w_in,
                         at::TensorList weights, at::TensorList biases, const at::Tensor& w_out,
                         const at::Tensor& b_out, const char* op = "pyebm::mlp_energy_grad",
                         const char* y_name = "y");

// The MLP's tensors in the compute dtype (float64 stays float64; float32, bfloat16 and float16 compute in
// float32), contiguous. No copy in the common case.
struct MlpTensors {
  at::ScalarType dtype;
  at::Tensor ctx, w_in, w_out, b_out;
  std::vector<at::Tensor> w, b;
  at::Tensor wt_in;             // W_in^T [D, H1] or undefined (CPU, transposes_for_rows)
  std::vector<at::Tensor> wt;   // W_l^T or undefined
};
// transposes_for_rows > 0 (CPU kernels over that many rows): also W^T of each forward weight whose products
// gemm_nt_pk would not all run on the small path, made once per call; the plan has W^T of every weight,
// and both then take the same branches (see gemm_nt_pk).
MlpTensors prepare_mlp(const at::Tensor& ctx, at::ScalarType y_dtype, const at::Tensor& w_in,
                       at::TensorList weights, at::TensorList biases, const at::Tensor& w_out,
                       const at::Tensor& b_out, int64_t transposes_for_rows = 0);
// W^T [K, N] of a contiguous W [N, K] in the compute dtype (CPU).
at::Tensor transposed(const at::Tensor& w);
at::Tensor to_compute(const at::Tensor& t, at::ScalarType dt);

template <typename T>
MlpDesc<T> make_desc(const MlpShapes& s, const MlpTensors& m, bool residual) {
  MlpDesc<T> p;
  p.D = s.D;
  p.K = s.K;
  p.num_hidden = static_cast<int>(s.width.size());
  for (int l = 0; l < p.num_hidden; ++l) p.width[l] = s.width[l];
  p.ctx = m.ctx.data_ptr<T>();
  p.w_in = m.w_in.data_ptr<T>();
  for (size_t l = 0; l < m.w.size(); ++l) {
    p.w[l] = m.w[l].data_ptr<T>();
    p.b[l] = m.b[l].data_ptr<T>();
  }
  if (m.wt_in.defined()) p.wt_in = m.wt_in.data_ptr<T>();
  for (size_t l = 0; l < m.wt.size(); ++l)
    if (m.wt[l].defined()) p.wt[l] = m.wt[l].data_ptr<T>();
  p.w_out = m.w_out.data_ptr<T>();
  p.b_out = m.b_out.data_ptr<T>()[0];
  p.residual = residual;
  return p;
}

// Rows per block for N rows whose working set is row_bytes each: a block stays within block_bytes() (a share
// of this core's L2), the blocks come in a whole number per thread, and a block added only to use another
// thread carries at least split_flops() of work. block_rows_for is the rule with every input explicit.
int64_t block_rows(int64_t N, int64_t row_bytes, int64_t flops_per_row);
int64_t block_rows_for(int64_t N, int64_t row_bytes, int64_t flops_per_row, int64_t threads, int64_t bytes,
                       int64_t split);
// The row-block working set: PYEBM_CPU_BLOCK_BYTES, else default_block_bytes(cpu_caches()). Read once.
int64_t block_bytes();
// Work per block before rows are split over threads: PYEBM_CPU_SPLIT_FLOPS, else kDefaultSplitFlops. Read once.
int64_t split_flops();
// Three quarters of this CPU's share of its L2 (the block's activations stay there while each weight
// panel streams through the rest), clamped to [128 KiB, 4 MiB]: 768 KiB on a 1 MiB L2.
inline int64_t default_block_bytes(const CpuCaches& c) {
  return std::max<int64_t>(128 * 1024, std::min<int64_t>(4 * 1024 * 1024, c.l2_per_cpu() / 4 * 3));
}
// About 10 us of one core's work at the kernels' rate: the cost of waking the other threads, a latency,
// not a cache size, so a constant.
constexpr int64_t kDefaultSplitFlops = 300000;

// body(block_begin, block_end) over ceil(N / M) blocks: inline for one block, else at::parallel_for.
template <typename F>
void for_each_block(int64_t N, int64_t M, const F& body) {
  const int64_t nblocks = (N + M - 1) / M;
  if (nblocks == 1) {
    body(0, 1);
  } else if (nblocks > 1) {
    at::parallel_for(0, nblocks, 1, body);
  }
}

// f(std::integral_constant<Act, A>{}) for the runtime activation: one instantiation per activation.
template <typename F>
void with_act(Act act, const F& f) {
  switch (act) {
    case Act::kRelu: return f(std::integral_constant<Act, Act::kRelu>{});
    case Act::kSilu: return f(std::integral_constant<Act, Act::kSilu>{});
    case Act::kGelu: return f(std::integral_constant<Act, Act::kGelu>{});
    case Act::kGeluTanh: return f(std::integral_constant<Act, Act::kGeluTanh>{});
    case Act::kTanh: return f(std::integral_constant<Act, Act::kTanh>{});
    case Act::kSoftplus: return f(std::integral_constant<Act, Act::kSoftplus>{});
  }
}

// E [N] (and dE/dy [N, D] when G != nullptr) for N rows of y [N, D]: row blocks in parallel.
template <typename T>
void run_mlp(const MlpDesc<T>& p, Act act, int64_t N, const T* y, T* E, T* G) {
  const bool grad = G != nullptr;
  const int64_t row_elems = p.ws_per_row(grad);
  const int64_t M = block_rows(N, row_elems * int64_t(sizeof(T)), p.flops_per_row(grad));
  with_act(act, [&](auto a) {
    constexpr Act A = decltype(a)::value;
    for_each_block(N, M, [&](int64_t b0, int64_t b1) {
      T* ws = thread_scratch<T>(M * row_elems);
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t r0 = blk * M;
        const int64_t m = std::min(M, N - r0);
        mlp_block<A, T>(p, r0, m, y + r0 * p.D, E + r0, grad ? G + r0 * p.D : nullptr, ws);
      }
    });
  });
}

}  // namespace cpu
}  // namespace pyebm
