#pragma once
/// @file quant_matmul.hpp
/// Matrix products with weights kept in their GGUF blocks. A decode step multiplies every weight matrix by one
/// vector and is bound by the bytes it reads, so the weights stay 4- or 8-bit and each block is dequantized
/// in registers inside the dot product (the float32 values are exactly those af::gguf::File::dequantize
/// gives; only the order of the float32 additions differs from a plain loop). A prefill multiplies by many
/// vectors and is bound by arithmetic: rows are dequantized once into a float32 panel and multiplied by a
/// maintained BLAS (OpenBLAS's sgemm).

#include "af/gguf.hpp"
#include "af/quant_blocks.hpp"
#include "af/tensor.hpp"

#include <cstdint>
#include <span>

namespace af::gguf {

/// A two-dimensional GGUF tensor seen as a matrix `[rows, cols]` (ggml's dims[1] and dims[0]) of an
/// nn.Linear-style layer: row r holds the weights of output r. Views the file's bytes; the File must outlive it.
class QuantMatrix {
 public:
  QuantMatrix() = default;
  /// Throws af::Error naming the tensor when it is not two-dimensional or its type is not F32, F16, Q8_0,
  /// Q4_0 or Q4_1.
  QuantMatrix(const File& file, const TensorInfo& tensor);

  std::int64_t rows() const { return rows_; }
  std::int64_t cols() const { return cols_; }
  GgmlType type() const { return type_; }
  /// The bytes one row takes, and all of them (what one pass over the matrix reads).
  std::size_t row_bytes() const { return row_bytes_; }
  std::size_t bytes() const { return bytes_.size(); }

  /// Writes rows [first, first + count) as float32 into `out` (count * cols values).
  void dequantize_rows(std::int64_t first, std::int64_t count, std::span<float> out) const;
  /// The dot product of row r with x (cols values), the block dequantized inside the loop.
  float dot_row(std::int64_t r, const float* x) const;

 private:
  GgmlType type_ = GgmlType::f32;
  std::int64_t rows_ = 0, cols_ = 0;
  std::size_t row_bytes_ = 0;
  std::span<const std::byte> bytes_;
};

/// y = W x: x has cols values, y rows values. The rows are shared out over the OpenMP threads.
void matvec(const QuantMatrix& w, std::span<const float> x, std::span<float> y);

/// Y = X W^T for X `[T, cols]` and Y `[T, rows]`: one matvec per row of X when T is small, otherwise panels
/// of rows dequantized once and multiplied by sgemm. Throws af::Error on a shape mismatch.
void matmul(const QuantMatrix& w, ConstMatrix x, Matrix y);

}  // namespace af::gguf
