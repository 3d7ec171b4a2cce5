#pragma once
/// @file cuda_check.hpp
/// CUDA_CHECK around every runtime call, and AF_CHECK_LAUNCH after every kernel launch: a failed call
/// throws af::kernels::CudaError naming the call, the file and line, and the runtime's message.

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace af::kernels {

/// A CUDA runtime call failed (a launch, an allocation, a copy). Bad sizes throw af::Error instead.
class CudaError : public std::runtime_error {
 public:
  CudaError(cudaError_t code, const char* call, const char* file, int line)
      : std::runtime_error(std::string(call) + " failed at " + file + ":" + std::to_string(line) + ": " +
                           cudaGetErrorName(code) + " (" + cudaGetErrorString(code) + ")"),
        code_(code) {}
  cudaError_t code() const { return code_; }

 private:
  cudaError_t code_;
};

}  // namespace af::kernels

#define CUDA_CHECK(call)                                                                                            \
  do {                                                                                                              \
    const cudaError_t af_cuda_status_ = (call);                                                                     \
    if (af_cuda_status_ != cudaSuccess) throw ::af::kernels::CudaError(af_cuda_status_, #call, __FILE__, __LINE__); \
  } while (0)

/// After a launch: a bad configuration shows up in cudaGetLastError at once.
#define AF_CHECK_LAUNCH() CUDA_CHECK(cudaGetLastError())
