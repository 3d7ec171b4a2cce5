#pragma once
/// @file tensor.hpp
/// A small host tensor: float32 values in row-major order, up to four dimensions, and strided matrix
/// views, so that one head of a `[T, H, d]` tensor can be read as a `[T, d]` matrix without a copy.

#include "af/compare.hpp"

#include <array>
#include <cstdint>
#include <initializer_list>
#include <span>
#include <string>
#include <vector>

namespace af {

/// The dimensions of a tensor, rank 0 to 4.
class Shape {
 public:
  static constexpr int max_rank = 4;
  /// The most elements a shape may describe: 2^60, so that the byte count of any element type of up to
  /// eight bytes still fits in an int64.
  static constexpr std::int64_t max_numel = std::int64_t{1} << 60;

  /// The number of elements of `dims` (any rank; 1 for none), computed without overflow. Throws af::Error
  /// for a negative dimension or a count above max_numel (which includes every count that overflows int64).
  static std::int64_t numel_of(std::span<const std::int64_t> dims);

  Shape() = default;
  /// Throws af::Error for more than four dimensions, a negative one, or more than max_numel elements.
  Shape(std::initializer_list<std::int64_t> dims);
  explicit Shape(std::span<const std::int64_t> dims);

  int rank() const { return rank_; }
  /// The size of dimension `axis`; negative axes count from the end (-1 is the last).
  std::int64_t operator[](int axis) const;
  /// The number of elements (1 for rank 0).
  std::int64_t numel() const;
  std::span<const std::int64_t> dims() const { return {dims_.data(), static_cast<std::size_t>(rank_)}; }
  /// For example `[4, 8, 16]`.
  std::string str() const;

  friend bool operator==(const Shape& a, const Shape& b) {
    if (a.rank_ != b.rank_) return false;
    for (int i = 0; i < a.rank_; ++i)
      if (a.dims_[i] != b.dims_[i]) return false;
    return true;
  }

 private:
  std::array<std::int64_t, max_rank> dims_{};
  int rank_ = 0;
};

/// A strided view of a matrix: `rows` rows of `cols` contiguous values, consecutive rows
/// `row_stride` values apart. `T` is `float` or `const float`.
template <class T>
struct MatrixView {
  T* data = nullptr;
  std::int64_t rows = 0;
  std::int64_t cols = 0;
  std::int64_t row_stride = 0;

  T& operator()(std::int64_t row, std::int64_t col) const { return data[row * row_stride + col]; }
  std::span<T> row(std::int64_t r) const { return {data + r * row_stride, static_cast<std::size_t>(cols)}; }
  /// The view of rows `[first, first + count)`.
  MatrixView rows_slice(std::int64_t first, std::int64_t count) const;
  operator MatrixView<const T>() const { return {data, rows, cols, row_stride}; }  // NOLINT: implicit
  std::string shape_str() const;
};

using Matrix = MatrixView<float>;
using ConstMatrix = MatrixView<const float>;

/// A dense float32 tensor that owns its values (row-major, zero-initialised).
class Tensor {
 public:
  Tensor() = default;
  explicit Tensor(Shape shape);
  /// Throws af::Error when the number of values does not match the shape.
  Tensor(Shape shape, std::vector<float> values);

  const Shape& shape() const { return shape_; }
  int rank() const { return shape_.rank(); }
  std::int64_t dim(int axis) const { return shape_[axis]; }
  std::int64_t numel() const { return static_cast<std::int64_t>(values_.size()); }
  bool empty() const { return values_.empty(); }

  float* data() { return values_.data(); }
  const float* data() const { return values_.data(); }
  std::span<float> values() { return values_; }
  std::span<const float> values() const { return values_; }

  /// Element access with every index checked against the shape (throws af::Error).
  float& at(std::initializer_list<std::int64_t> index);
  float at(std::initializer_list<std::int64_t> index) const;

  /// The same values under another shape with the same number of elements.
  Tensor reshaped(Shape shape) const;

  /// A rank-2 tensor as a matrix view; throws for other ranks.
  Matrix matrix();
  ConstMatrix matrix() const;

 private:
  std::int64_t offset(std::initializer_list<std::int64_t> index) const;

  Shape shape_;
  std::vector<float> values_;
};

/// One head of a `[T, H, d]` tensor as a `[T, d]` matrix view (row stride `H * d`).
Matrix head_view(Tensor& tensor, std::int64_t head);
ConstMatrix head_view(const Tensor& tensor, std::int64_t head);

/// A contiguous copy of a view.
Tensor to_tensor(ConstMatrix view);

/// Largest absolute elementwise difference of two views (NaN when any difference is NaN; the span forms
/// are in compare.hpp); throws when the shapes differ.
double max_abs_diff(ConstMatrix a, ConstMatrix b);

}  // namespace af
