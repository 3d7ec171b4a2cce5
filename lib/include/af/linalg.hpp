#pragma once
/// @file linalg.hpp
/// The matrix products attention is made of, in float32 with float32 accumulation.

#include "af/tensor.hpp"

#include <span>

namespace af {

/// The dot product of two equally long vectors.
float dot(std::span<const float> a, std::span<const float> b);

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
