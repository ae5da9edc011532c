// ATen glue shared by the CUDA op implementations (descent.cu, mlp_energy.cu). Only device-generic c10 APIs,
// so it compiles against a CPU-only torch for the nvcc compile check.
#pragma once

#include <c10/core/Device.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <cuda_runtime.h>

#include <cstdlib>

namespace pyebm {
namespace gpu {

// PYEBM_CUDA_POISON=1: fill the outputs with NaN (and integer outputs with -1) before a kernel, so elements
// it fails to write show up. Read on every call (tests and debugging).
inline bool poison_outputs() {
  const char* env = std::getenv("PYEBM_CUDA_POISON");
  return env != nullptr && env[0] == '1';
}

// The current stream of `device`, through the registered CUDA guard implementation.
inline cudaStream_t current_stream(const at::Device& device) {
  const c10::Stream s = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(device);
  return static_cast<cudaStream_t>(s.native_handle());
}

}  // namespace gpu
}  // namespace pyebm
