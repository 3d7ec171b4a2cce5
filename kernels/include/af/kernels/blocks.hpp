#pragma once
/// @file blocks.hpp
/// The CUDA building blocks of attention (chapter 20): a dot product, a small matrix multiply, a transpose and
/// a masked row softmax, all float32. Plain device pointers and sizes plus a stream; nothing is allocated; a bad
/// size throws af::Error naming it; a failed launch throws af::kernels::CudaError.

#include <cuda_runtime.h>

#include <cstdint>

namespace af::kernels {

/// `*result = sum_i a[i] * b[i]` over `n` floats (n >= 1). `result` is one float in device memory; it is
/// zeroed on `stream` first, then every block adds its warp-reduced partial sum.
void dot(const float* a, const float* b, std::int64_t n, float* result, cudaStream_t stream);

/// `c [m, n] = a [m, k] @ b [k, n]`, row-major, through 16 x 16 tiles in shared memory.
void matmul(const float* a, const float* b, float* c, std::int64_t m, std::int64_t k, std::int64_t n,
            cudaStream_t stream);

/// `out [cols, rows]` = the transpose of `in [rows, cols]`, row-major, through 32 x 32 tiles in shared
/// memory; `padded` adds one float to each tile row (the bank-conflict example of chapter 20).
void transpose(const float* in, float* out, std::int64_t rows, std::int64_t cols, bool padded, cudaStream_t stream);

/// How `softmax_rows` masks: none, or causal with the queries at positions `first_query_position + row`.
struct RowMask {
  bool causal = false;
  std::int64_t first_query_position = 0;
};

/// Softmax of every row of `scores [rows, cols]` in place, one warp per row. Masked entries get weight 0,
/// and a fully masked row becomes all zeros (as af::softmax_rows does).
void softmax_rows(float* scores, std::int64_t rows, std::int64_t cols, RowMask mask, cudaStream_t stream);

}  // namespace af::kernels
