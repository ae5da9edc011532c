// Runs the CUDA MLP kernels (tensor-core and SIMT) under the host emulator in emu.h.
//
//   mlp_energy_emu IN OUT
// IN : int32 header [dtype (0 f32, 1 f64, 2 bf16, 3 f16), activation, residual, grad, path (0 auto,
//      1 tc, 2 simt), sms, B, K, D, L, H_1 .. H_L], then float64 ctx [B,H1], y [B,K,D], w_in [H1,D],
//      for each layer l: w[l] [H_{l+2},H_{l+1}], b[l] [H_{l+2}]; then w_out [H_L], b_out [1].
// OUT: int32 [path used (1 tc, 2 simt), rows per tile, column warps, grid], then float64 E [B*K] and,
//      with grad, G [B*K*D] (values as stored in the input dtype).
#include "emu.h"
// clang-format off
#include "pyebm/cuda/mlp_energy.cuh"
// clang-format on

#include <cstdio>
#include <fstream>
#include <stdexcept>
#include <string>

using namespace pyebm;
using namespace pyebm::gpu;

namespace {

template <typename T>
T from_double(double x) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value) return __float2bfloat16_rn(static_cast<float>(x));
  else if constexpr (std::is_same<T, __half>::value) return __float2half_rn(static_cast<float>(x));
  else return static_cast<T>(x);
}
template <typename T>
double to_double(T x) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value) return __bfloat162float(x);
  else if constexpr (std::is_same<T, __half>::value) return __half2float(x);
  else return static_cast<double>(x);
}

struct Input {
  int dtype, act, residual, grad, path, sms;
  int64_t B, K, D;
  int L;
  std::vector<int> width;
  std::vector<std::vector<double>> arrays;  // ctx, y, w_in, (w, b) * (L-1), w_out, b_out
};

Input read_input(const char* path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot open input");
  auto rd = [&f]() {
    int32_t v;
    f.read(reinterpret_cast<char*>(&v), 4);
    return v;
  };
  Input in;
  in.dtype = rd(); in.act = rd(); in.residual = rd(); in.grad = rd(); in.path = rd(); in.sms = rd();
  in.B = rd(); in.K = rd(); in.D = rd(); in.L = rd();
  for (int l = 0; l < in.L; ++l) in.width.push_back(rd());
  std::vector<int64_t> sizes = {in.B * in.width[0], in.B * in.K * in.D, int64_t(in.width[0]) * in.D};
  for (int l = 0; l + 1 < in.L; ++l) {
    sizes.push_back(int64_t(in.width[l + 1]) * in.width[l]);
    sizes.push_back(in.width[l + 1]);
  }
  sizes.push_back(in.width[in.L - 1]);
  sizes.push_back(1);
  for (int64_t n : sizes) {
    std::vector<double> a(static_cast<size_t>(n));
    f.read(reinterpret_cast<char*>(a.data()), static_cast<std::streamsize>(n * 8));
    in.arrays.push_back(std::move(a));
  }
  if (!f) throw std::runtime_error("short input");
  return in;
}

template <Act A, typename T>
void run_kernel(const MlpParams<T>& p, const MlpPlan& plan, bool grad, std::vector<unsigned char>& gws) {
  if (plan.path == MlpPath::kTensorCore) {
    if constexpr (std::is_same<T, __nv_bfloat16>::value || std::is_same<T, __half>::value) {
      pyebm_emu::launch(plan.grid, plan.threads, plan.smem, [&] { mlp_tc_kernel<A, T>(p, plan.tc, grad); });
    }
  } else {
    gws.assign(plan.ws_bytes + 16, 0xff);
    unsigned char* ws = plan.ws_bytes ? gws.data() : nullptr;
    pyebm_emu::launch(plan.grid, plan.threads, plan.smem, [&] { mlp_simt_kernel<A, T>(p, plan.simt, grad, ws); });
  }
}

template <typename T>
int run(const Input& in, const char* out_path) {
  auto conv = [](const std::vector<double>& a) {
    std::vector<T> v(a.size());
    for (size_t i = 0; i < a.size(); ++i) v[i] = from_double<T>(a[i]);
    return v;
  };
  std::vector<std::vector<T>> data;
  for (const auto& a : in.arrays) data.push_back(conv(a));
  const int64_t N = in.B * in.K;
  const T nan = from_double<T>(std::nan(""));
  std::vector<T> E(static_cast<size_t>(N), nan), G(static_cast<size_t>(N * in.D), nan);

  MlpParams<T> p;
  p.rows = N;
  p.K = in.K;
  p.D = static_cast<int>(in.D);
  p.L = in.L;
  for (int l = 0; l < in.L; ++l) p.width[l] = in.width[l];
  size_t a = 0;
  p.ctx = data[a++].data();
  p.y = data[a++].data();
  p.w_in = data[a++].data();
  for (int l = 0; l + 1 < in.L; ++l) {
    p.w[l] = data[a++].data();
    p.b[l] = data[a++].data();
  }
  p.w_out = data[a++].data();
  p.b_out = data[a++].data();
  p.residual = in.residual != 0;
  p.E = E.data();
  p.G = in.grad ? G.data() : nullptr;

  DeviceCaps caps;
  caps.sms = in.sms;
  caps.smem_optin = 227 * 1024;  // H100/H200
  const MlpPath force = in.path == 1 ? MlpPath::kTensorCore : in.path == 2 ? MlpPath::kSimt : MlpPath::kAuto;
  const bool grad = in.grad != 0;
  const MlpPlan plan = plan_mlp<T>(p, grad, caps, force);
  std::vector<unsigned char> gws;
  if (N > 0) {
    switch (static_cast<Act>(in.act)) {
      case Act::kRelu: run_kernel<Act::kRelu, T>(p, plan, grad, gws); break;
      case Act::kSilu: run_kernel<Act::kSilu, T>(p, plan, grad, gws); break;
      case Act::kGelu: run_kernel<Act::kGelu, T>(p, plan, grad, gws); break;
      case Act::kGeluTanh: run_kernel<Act::kGeluTanh, T>(p, plan, grad, gws); break;
      case Act::kTanh: run_kernel<Act::kTanh, T>(p, plan, grad, gws); break;
      case Act::kSoftplus: run_kernel<Act::kSoftplus, T>(p, plan, grad, gws); break;
    }
  }
  std::ofstream f(out_path, std::ios::binary);
  const int32_t head[4] = {static_cast<int32_t>(plan.path),
                           plan.path == MlpPath::kTensorCore ? plan.tc.bm : kSimtRows,
                           plan.path == MlpPath::kTensorCore ? plan.tc.wn : kSimtThreads / 32,
                           static_cast<int32_t>(plan.grid)};
  f.write(reinterpret_cast<const char*>(head), sizeof(head));
  std::vector<double> out;
  for (const T& e : E) out.push_back(to_double(e));
  if (grad)
    for (const T& g : G) out.push_back(to_double(g));
  f.write(reinterpret_cast<const char*>(out.data()), static_cast<std::streamsize>(out.size() * 8));
  return f ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s IN OUT\n", argv[0]);
    return 2;
  }
  try {
    const Input in = read_input(argv[1]);
    switch (in.dtype) {
      case 0: return run<float>(in, argv[2]);
      case 1: return run<double>(in, argv[2]);
      case 2: return run<__nv_bfloat16>(in, argv[2]);
      case 3: return run<__half>(in, argv[2]);
    }
    std::fprintf(stderr, "bad dtype\n");
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 2;
  }
}
