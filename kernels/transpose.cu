// A matrix transpose through a 32 x 32 tile in shared memory, with and without one float of padding per
// tile row: the example where the padding decides the speed. Chapter 20.
#include "launchers.hpp"

#include "af/kernels/cuda_check.hpp"

namespace af::kernels::detail {
namespace {

constexpr int tile = 32;       // one warp's width: a tile row is 32 consecutive floats
constexpr int block_rows = 8;  // a block of 32 x 8 threads moves a 32 x 32 tile in 4 rounds

// [transpose-kernel]
// Pad = 0: column j of the tile lies at addresses j, j + 32, j + 64, ... floats, all in bank j: the 32
// lanes of a warp reading one column wait for each other 32 times. Pad = 1: row r starts at r * 33, so a
// column's 32 floats fall in 32 different banks and the warp reads them in one step.
template <int Pad>
__global__ void transpose_kernel(const float* __restrict__ in, float* __restrict__ out, int rows, int cols) {
  __shared__ float block_tile[tile][tile + Pad];
  const int in_col = blockIdx.x * tile + threadIdx.x, in_row0 = blockIdx.y * tile;
  for (int r = threadIdx.y; r < tile; r += block_rows) {  // coalesced: a warp reads one row of `in`
    const int row = in_row0 + r;
    if (row < rows && in_col < cols) block_tile[r][threadIdx.x] = in[std::int64_t{row} * cols + in_col];
  }
  __syncthreads();
  const int out_col = blockIdx.y * tile + threadIdx.x, out_row0 = blockIdx.x * tile;
  for (int r = threadIdx.y; r < tile; r += block_rows) {  // coalesced: a warp writes one row of `out`...
    const int row = out_row0 + r;                         // ...from one column of the tile
    if (row < cols && out_col < rows) out[std::int64_t{row} * rows + out_col] = block_tile[threadIdx.x][r];
  }
}
// [/transpose-kernel]

}  // namespace

void launch_transpose(const float* in, float* out, int rows, int cols, bool padded, cudaStream_t stream) {
  const dim3 threads(tile, block_rows);
  const dim3 blocks(static_cast<unsigned>((cols + tile - 1) / tile), static_cast<unsigned>((rows + tile - 1) / tile));
  if (padded)
    transpose_kernel<1><<<blocks, threads, 0, stream>>>(in, out, rows, cols);
  else
    transpose_kernel<0><<<blocks, threads, 0, stream>>>(in, out, rows, cols);
  AF_CHECK_LAUNCH();
}

}  // namespace af::kernels::detail
