// A small matrix multiply: each block computes a 16 x 16 tile of c, staging 16 x 16 tiles of a and b in
// shared memory so that every loaded float is used 16 times. Chapter 20.
#include "launchers.hpp"

#include "af/kernels/cuda_check.hpp"

namespace af::kernels::detail {
namespace {

constexpr int tile = 16;

// [matmul-kernel]
__global__ void matmul_kernel(const float* __restrict__ a, const float* __restrict__ b, float* __restrict__ c, int m,
                              int k, int n) {
  __shared__ float a_tile[tile][tile];  // a [row, i]
  __shared__ float b_tile[tile][tile];  // b [i, col]
  const int row = blockIdx.y * tile + threadIdx.y, col = blockIdx.x * tile + threadIdx.x;
  float sum = 0.0f;
  for (int i0 = 0; i0 < k; i0 += tile) {
    const int ia = i0 + threadIdx.x, ib = i0 + threadIdx.y;
    a_tile[threadIdx.y][threadIdx.x] = (row < m && ia < k) ? a[std::int64_t{row} * k + ia] : 0.0f;
    b_tile[threadIdx.y][threadIdx.x] = (ib < k && col < n) ? b[std::int64_t{ib} * n + col] : 0.0f;
    __syncthreads();  // the tiles are complete
#pragma unroll
    for (int i = 0; i < tile; ++i) sum = fmaf(a_tile[threadIdx.y][i], b_tile[i][threadIdx.x], sum);
    __syncthreads();  // everyone is done reading before the next tiles overwrite them
  }
  if (row < m && col < n) c[std::int64_t{row} * n + col] = sum;
}
// [/matmul-kernel]

}  // namespace

void launch_matmul(const float* a, const float* b, float* c, int m, int k, int n, cudaStream_t stream) {
  const dim3 threads(tile, tile);
  const dim3 blocks(static_cast<unsigned>((n + tile - 1) / tile), static_cast<unsigned>((m + tile - 1) / tile));
  matmul_kernel<<<blocks, threads, 0, stream>>>(a, b, c, m, k, n);
  AF_CHECK_LAUNCH();
}

}  // namespace af::kernels::detail
