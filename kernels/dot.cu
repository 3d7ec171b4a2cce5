// The dot product: every thread sums a strided slice, each warp reduces by shuffles, and one atomic add
// per warp lands in the result. The first kernel of chapter 20.
#include "launchers.hpp"

#include "af/kernels/cuda_check.hpp"
#include "af/kernels/warp.cuh"

namespace af::kernels::detail {
namespace {

// [dot-kernel]
__global__ void dot_kernel(const float* __restrict__ a, const float* __restrict__ b, std::int64_t n,
                           float* __restrict__ result) {
  float partial = 0.0f;
  const std::int64_t stride = std::int64_t{gridDim.x} * blockDim.x;
  for (std::int64_t i = std::int64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < n; i += stride)
    partial = fmaf(a[i], b[i], partial);  // consecutive threads read consecutive floats: coalesced
  partial = warp_sum(partial);
  if (threadIdx.x % 32 == 0) atomicAdd(result, partial);  // one atomic per warp, not per thread
}
// [/dot-kernel]

}  // namespace

void launch_dot(const float* a, const float* b, std::int64_t n, float* result, cudaStream_t stream) {
  constexpr int threads = 256;
  const std::int64_t wanted = (n + threads - 1) / threads;
  const int blocks = static_cast<int>(wanted < 1024 ? wanted : 1024);
  CUDA_CHECK(cudaMemsetAsync(result, 0, sizeof(float), stream));
  dot_kernel<<<blocks, threads, 0, stream>>>(a, b, n, result);
  AF_CHECK_LAUNCH();
}

}  // namespace af::kernels::detail
