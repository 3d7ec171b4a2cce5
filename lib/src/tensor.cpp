#include "af/tensor.hpp"

#include "af/error.hpp"

#include <fmt/ranges.h>

#include <algorithm>
#include <cmath>

namespace af {

Shape::Shape(std::initializer_list<std::int64_t> dims)
    : Shape(std::span<const std::int64_t>(dims.begin(), dims.size())) {}

Shape::Shape(std::span<const std::int64_t> dims) {
  require(dims.size() <= max_rank, "Shape: rank {} is not supported (expected at most {} dimensions)", dims.size(),
          max_rank);
  for (std::size_t i = 0; i < dims.size(); ++i) {
    if (!(dims[i] >= 0))
      fail("Shape: dimension {} is {} (expected a size >= 0) in [{}]", i, dims[i], fmt::join(dims, ", "));
    dims_[i] = dims[i];
  }
  rank_ = static_cast<int>(dims.size());
  numel_of(dims);  // throws when the element count is out of range
}

std::int64_t Shape::numel_of(std::span<const std::int64_t> dims) {
  for (std::size_t i = 0; i < dims.size(); ++i)
    if (!(dims[i] >= 0))
      fail("shape [{}]: dimension {} is {} (expected a size >= 0)", fmt::join(dims, ", "), i, dims[i]);
  // A zero dimension makes the count zero however large the others are.
  if (std::ranges::find(dims, 0) != dims.end()) return 0;
  std::int64_t count = 1;
  for (std::int64_t d : dims)
    if (__builtin_mul_overflow(count, d, &count) || count > max_numel)
      fail("shape [{}] holds more than {} elements (2^60, the most a shape may hold)", fmt::join(dims, ", "),
           max_numel);
  return count;
}

std::int64_t Shape::operator[](int axis) const {
  const int resolved = axis < 0 ? axis + rank_ : axis;
  if (!(resolved >= 0 && resolved < rank_)) fail("Shape: axis {} is out of range for shape {}", axis, str());
  return dims_[resolved];
}

// The constructor checked the count, so this cannot throw; a zero size is seen before any product forms.
std::int64_t Shape::numel() const { return numel_of(dims()); }

std::string Shape::str() const { return fmt::format("[{}]", fmt::join(dims(), ", ")); }

template <class T>
MatrixView<T> MatrixView<T>::rows_slice(std::int64_t first, std::int64_t count) const {
  if (!(first >= 0 && count >= 0 && first + count <= rows))
    fail("rows_slice: rows [{}, {}) of a {} view", first, first + count, shape_str());
  return {data + first * row_stride, count, cols, row_stride};
}

template <class T>
std::string MatrixView<T>::shape_str() const {
  return fmt::format("[{}, {}]", rows, cols);
}

template struct MatrixView<float>;
template struct MatrixView<const float>;

Tensor::Tensor(Shape shape) : shape_(shape), values_(static_cast<std::size_t>(shape.numel()), 0.0f) {}

Tensor::Tensor(Shape shape, std::vector<float> values) : shape_(shape), values_(std::move(values)) {
  if (!(static_cast<std::int64_t>(values_.size()) == shape_.numel()))
    fail("Tensor: {} values given for shape {} (expected {})", values_.size(), shape_.str(), shape_.numel());
}

std::int64_t Tensor::offset(std::initializer_list<std::int64_t> index) const {
  if (!(static_cast<int>(index.size()) == rank()))
    fail("Tensor::at: {} indices for a tensor of shape {}", index.size(), shape_.str());
  std::int64_t flat = 0;
  int axis = 0;
  for (std::int64_t i : index) {
    if (!(i >= 0 && i < shape_[axis]))
      fail("Tensor::at: index {} on axis {} is out of range for shape {}", i, axis, shape_.str());
    flat = flat * shape_[axis] + i;
    ++axis;
  }
  return flat;
}

float& Tensor::at(std::initializer_list<std::int64_t> index) {
  return values_[static_cast<std::size_t>(offset(index))];
}
float Tensor::at(std::initializer_list<std::int64_t> index) const {
  return values_[static_cast<std::size_t>(offset(index))];
}

Tensor Tensor::reshaped(Shape shape) const {
  if (!(shape.numel() == numel()))
    fail("reshape: cannot view {} ({} values) as {} ({} values)", shape_.str(), numel(), shape.str(), shape.numel());
  return Tensor(shape, values_);
}

Matrix Tensor::matrix() {
  if (!(rank() == 2)) fail("matrix(): tensor has shape {} (expected rank 2)", shape_.str());
  return {data(), dim(0), dim(1), dim(1)};
}

ConstMatrix Tensor::matrix() const {
  if (!(rank() == 2)) fail("matrix(): tensor has shape {} (expected rank 2)", shape_.str());
  return {data(), dim(0), dim(1), dim(1)};
}

namespace {
template <class TensorRef>
auto head_view_of(TensorRef& tensor, std::int64_t head) {
  if (!(tensor.rank() == 3)) fail("head_view: tensor has shape {} (expected [T, H, d])", tensor.shape().str());
  const std::int64_t heads = tensor.dim(1), head_dim = tensor.dim(2);
  if (!(head >= 0 && head < heads))
    fail("head_view: head {} is out of range for shape {} (expected 0 <= head < {})", head, tensor.shape().str(),
         heads);
  return MatrixView<std::remove_pointer_t<decltype(tensor.data())>>{tensor.data() + head * head_dim, tensor.dim(0),
                                                                    head_dim, heads * head_dim};
}
}  // namespace

Matrix head_view(Tensor& tensor, std::int64_t head) { return head_view_of(tensor, head); }
ConstMatrix head_view(const Tensor& tensor, std::int64_t head) { return head_view_of(tensor, head); }

Tensor to_tensor(ConstMatrix view) {
  Tensor out(Shape{view.rows, view.cols});
  for (std::int64_t r = 0; r < view.rows; ++r) std::ranges::copy(view.row(r), out.data() + r * view.cols);
  return out;
}

double max_abs_diff(ConstMatrix a, ConstMatrix b) {
  if (!(a.rows == b.rows && a.cols == b.cols))
    fail("max_abs_diff: shapes {} and {} differ", a.shape_str(), b.shape_str());
  WorstError worst;
  for (std::int64_t r = 0; r < a.rows; ++r) worst.add(max_abs_diff(a.row(r), b.row(r)));
  return worst.value();
}

}  // namespace af
