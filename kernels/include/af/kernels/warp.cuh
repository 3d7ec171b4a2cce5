#pragma once
/// @file warp.cuh
/// Warp-level reductions: after the butterfly every lane of the warp holds the result, with no shared
/// memory and no barrier. `Width` lanes reduce together (a power of two up to 32).

#include <cuda_runtime.h>

namespace af::kernels {

// [warp-sum]
template <int Width = 32>
__device__ __forceinline__ float warp_sum(float value) {
#pragma unroll
  for (int offset = Width / 2; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
  return value;
}
// [/warp-sum]

template <int Width = 32>
__device__ __forceinline__ float warp_max(float value) {
#pragma unroll
  for (int offset = Width / 2; offset > 0; offset /= 2)
    value = fmaxf(value, __shfl_xor_sync(0xffffffffu, value, offset));
  return value;
}

}  // namespace af::kernels
