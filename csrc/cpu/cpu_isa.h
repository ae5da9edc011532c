// The instruction set the CPU kernels run with: the widest this CPU supports, or the one that
// PYEBM_CPU_ISA names (avx512 | avx2 | baseline | auto), read once, when the kernels first ask.
//
// Every run-time choice between the AVX-512, AVX2+FMA and baseline copies of a kernel (vec_act.h,
// small_gemm.h, mlp_block.h, mlp_descent_cpu.h, ebt_policy.cpp) goes through cpu_vec_level(), so one
// machine can run each path it supports: an AVX-512 machine also proves the AVX2 and baseline paths.
// A request for an instruction set this CPU lacks, or an unknown name, is not silently lowered: the
// import of pyebm._C fails with CpuIsaState::error (ops.cpp), and pyebm.ops turns that into a ValueError
// from `import pyebm` (rather than a quiet fall back to the torch backend). Torch-free.
#pragma once

#include <cctype>
#include <cstdlib>
#include <string>

namespace pyebm {
namespace cpu {

enum CpuIsa : int { kIsaBaseline = 0, kIsaAvx2 = 1, kIsaAvx512 = 2 };

inline const char* isa_name(int level) {
  return level == kIsaAvx512 ? "avx512" : level == kIsaAvx2 ? "avx2" : "baseline";
}

// The widest level this CPU runs: AVX-512 (F, DQ, BW, VL: what the avx512 copies are compiled for),
// AVX2 + FMA, or the baseline. Not x86-64: the baseline.
inline int cpu_isa_supported() {
#if defined(__GNUC__) && defined(__x86_64__)
  static const int level =
      (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
       __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl"))
          ? kIsaAvx512
      : (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) ? kIsaAvx2
                                                                          : kIsaBaseline;
  return level;
#else
  return kIsaBaseline;
#endif
}

struct CpuIsaState {
  int level;          // in use
  std::string requested;  // PYEBM_CPU_ISA as given ("" when unset)
  std::string error;  // why the request cannot be honoured ("" when it can)
};

inline CpuIsaState resolve_cpu_isa(const char* env) {
  const int best = cpu_isa_supported();
  CpuIsaState s{best, env ? env : "", ""};
  std::string want;
  for (char c : s.requested)
    if (!std::isspace(static_cast<unsigned char>(c))) want += static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  if (want.empty() || want == "auto") return s;
  int level = -1;
  if (want == "avx512") level = kIsaAvx512;
  if (want == "avx2") level = kIsaAvx2;
  if (want == "baseline") level = kIsaBaseline;
  if (level < 0) {
    s.error = "PYEBM_CPU_ISA must be one of avx512, avx2, baseline, auto; got '" + s.requested + "'";
  } else if (level > best) {
    s.error = "PYEBM_CPU_ISA=" + want + " asks for an instruction set this CPU does not support (it supports " +
              std::string(isa_name(best)) + (best > kIsaBaseline ? " and below" : "") + ")";
  } else {
    s.level = level;
  }
  return s;
}

inline const CpuIsaState& cpu_isa_state() {
  static const CpuIsaState s = resolve_cpu_isa(std::getenv("PYEBM_CPU_ISA"));
  return s;
}

// 2: AVX-512, 1: AVX2 + FMA, 0: baseline. The level every kernel dispatches on.
inline int cpu_vec_level() { return cpu_isa_state().level; }

}  // namespace cpu
}  // namespace pyebm
