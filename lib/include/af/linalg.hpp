#pragma once
/// @file linalg.hpp
/// The matrix products attention is made of, in float32 with float32 accumulation.

#include "af/tensor.hpp"

#include <cstddef>
#include <span>

namespace af {

/// The dot product of two equally long vectors.
float dot(std::span<const float> a, std::span<const float> b);

namespace detail {
/// What dot computes, without the length check, for loops that call it millions of times on rows whose
/// lengths they have checked once: eight independent partial sums, then a fixed pairing, so that the order of
/// the additions (hence the rounding) is documented and the same wherever it is inlined.
inline float dot_unchecked(const float* a, const float* b, std::size_t n) {
  float partial[8] = {};
  const std::size_t blocked = n - n % 8;
  for (std::size_t i = 0; i < blocked; i += 8)
    for (std::size_t j = 0; j < 8; ++j) partial[j] += a[i + j] * b[i + j];
  for (std::size_t i = blocked; i < n; ++i) partial[i - blocked] += a[i] * b[i];
  return ((partial[0] + partial[4]) + (partial[1] + partial[5])) +
         ((partial[2] + partial[6]) + (partial[3] + partial[7]));
}

/// What axpy computes (y += a x, element by element), without the length check; x and y must not overlap.
/// Blocks of eight through a local copy: the compiler need not prove that x and y are apart to use vectors.
inline void axpy_unchecked(float a, const float* x, float* y, std::size_t n) {
  const std::size_t blocked = n - n % 8;
  for (std::size_t i = 0; i < blocked; i += 8) {
    float block[8];
    for (std::size_t j = 0; j < 8; ++j) block[j] = y[i + j] + a * x[i + j];
    for (std::size_t j = 0; j < 8; ++j) y[i + j] = block[j];
  }
  for (std::size_t i = blocked; i < n; ++i) y[i] += a * x[i];
}
}  // namespace detail

/// `y += a * x` over two equally long vectors (the update that mixes a value row into an output row).
void axpy(float a, std::span<const float> x, std::span<float> y);

/// `a [m, k] @ b [k, n] -> [m, n]`.
Tensor matmul(ConstMatrix a, ConstMatrix b);

/// `a [m, k] @ b[n, k]^T -> [m, n]`: every row of `a` against every row of `b` (scores = Q K^T).
Tensor matmul_transposed(ConstMatrix a, ConstMatrix b);

/// A linear layer as PyTorch's `nn.Linear` stores it: `x [T, in] @ weight[out, in]^T + bias[out] -> [T, out]`.
/// An empty `bias` means none.
Tensor linear(ConstMatrix x, ConstMatrix weight, std::span<const float> bias = {});

/// The transpose as a new tensor.
Tensor transpose(ConstMatrix a);

}  // namespace af
