// The masked row softmax: one warp per row, three passes over the row (maximum, sum of exponentials,
// normalised weights), the reductions by shuffles. Chapter 20.
#include "launchers.hpp"

#include "af/kernels/blocks.hpp"
#include "af/kernels/cuda_check.hpp"
#include "af/kernels/warp.cuh"

#include <cfloat>

namespace af::kernels::detail {
namespace {

// [softmax-kernel]
__global__ void softmax_rows_kernel(float* __restrict__ scores, std::int64_t rows, std::int64_t cols, RowMask mask) {
  const std::int64_t row = std::int64_t{blockIdx.x} * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;  // whole warps leave together
  float* x = scores + row * cols;
  // Keys [0, visible) are allowed: all of them, or those up to the query's own position.
  const std::int64_t last = mask.first_query_position + row;
  const std::int64_t visible = !mask.causal ? cols : (last < 0 ? 0 : (last + 1 < cols ? last + 1 : cols));

  float row_max = -FLT_MAX;
  for (std::int64_t j = lane; j < visible; j += 32) row_max = fmaxf(row_max, x[j]);
  row_max = warp_max(row_max);
  float sum = 0.0f;
  for (std::int64_t j = lane; j < visible; j += 32) sum += __expf(x[j] - row_max);
  sum = warp_sum(sum);
  const float inv = visible > 0 ? 1.0f / sum : 0.0f;
  for (std::int64_t j = lane; j < cols; j += 32) x[j] = j < visible ? __expf(x[j] - row_max) * inv : 0.0f;
}
// [/softmax-kernel]

}  // namespace

void launch_softmax_rows(float* scores, std::int64_t rows, std::int64_t cols, const RowMask& mask,
                         cudaStream_t stream) {
  constexpr int warps_per_block = 8;
  const auto blocks = static_cast<unsigned>((rows + warps_per_block - 1) / warps_per_block);
  softmax_rows_kernel<<<blocks, warps_per_block * 32, 0, stream>>>(scores, rows, cols, mask);
  AF_CHECK_LAUNCH();
}

}  // namespace af::kernels::detail
