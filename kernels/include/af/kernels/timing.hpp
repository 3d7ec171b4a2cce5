#pragma once
/// @file timing.hpp
/// How the book times a kernel: CUDA events around each call, warm-up calls first, the median and the 95th
/// percentile of the timed calls. The caller rotates its inputs (the call gets the iteration number) so that
/// the working set exceeds the L2 cache.

#include "af/kernels/cuda_check.hpp"

#include <algorithm>
#include <cmath>
#include <vector>

namespace af::kernels {

struct Timing {
  double median_ms = 0.0;
  double p95_ms = 0.0;
};

/// Times `call(i)` on `stream`: `warmup` untimed calls, then `iters` calls each between two events.
template <class Call>
Timing time_calls(Call&& call, cudaStream_t stream, int warmup = 10, int iters = 50) {
  for (int i = 0; i < warmup; ++i) call(i);
  CUDA_CHECK(cudaStreamSynchronize(stream));
  cudaEvent_t start{}, stop{};
  CUDA_CHECK(cudaEventCreate(&start));
  CUDA_CHECK(cudaEventCreate(&stop));
  std::vector<double> ms;
  for (int i = 0; i < iters; ++i) {
    CUDA_CHECK(cudaEventRecord(start, stream));
    call(warmup + i);
    CUDA_CHECK(cudaEventRecord(stop, stream));
    CUDA_CHECK(cudaEventSynchronize(stop));
    float elapsed = 0.0f;
    CUDA_CHECK(cudaEventElapsedTime(&elapsed, start, stop));
    ms.push_back(elapsed);
  }
  CUDA_CHECK(cudaEventDestroy(start));
  CUDA_CHECK(cudaEventDestroy(stop));
  std::sort(ms.begin(), ms.end());
  const auto p95 = static_cast<std::size_t>(std::ceil(0.95 * static_cast<double>(ms.size()))) - 1;
  return {ms[ms.size() / 2], ms[std::min(p95, ms.size() - 1)]};
}

}  // namespace af::kernels
