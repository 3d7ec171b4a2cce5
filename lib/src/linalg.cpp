#include "af/linalg.hpp"

#include "af/error.hpp"

#include <vector>

namespace af {

// dot and axpy are built twice, for AVX2 and for any x86-64, and the loader picks the one the CPU runs
// (target_clones). The operations and their order are the same in both, so are the results, bit for bit.
__attribute__((target_clones("avx2", "default"))) float dot(std::span<const float> a, std::span<const float> b) {
  require(a.size() == b.size(), "dot: vectors of length {} and {} (expected equal lengths)", a.size(), b.size());
  return detail::dot_unchecked(a.data(), b.data(), a.size());
}

__attribute__((target_clones("avx2", "default"))) void axpy(float a, std::span<const float> x, std::span<float> y) {
  require(x.size() == y.size(), "axpy: vectors of length {} and {} (expected equal lengths)", x.size(), y.size());
  // A copy of x when the two overlap, so that every element reads x as it was.
  if (x.data() < y.data() + y.size() && y.data() < x.data() + x.size()) {
    const std::vector<float> copy(x.begin(), x.end());
    detail::axpy_unchecked(a, copy.data(), y.data(), y.size());
    return;
  }
  detail::axpy_unchecked(a, x.data(), y.data(), y.size());
}

Tensor matmul(ConstMatrix a, ConstMatrix b) {
  if (!(a.cols == b.rows))
    fail("matmul: inner dimensions differ: a is {}, b is {} (expected b to have {} rows)", a.shape_str(), b.shape_str(),
         a.cols);
  Tensor c(Shape{a.rows, b.cols});
  Matrix out = c.matrix();
  // i-k-j order: the innermost loop runs along contiguous rows of b and c.
  for (std::int64_t i = 0; i < a.rows; ++i) {
    for (std::int64_t k = 0; k < a.cols; ++k) axpy(a(i, k), b.row(k), out.row(i));
  }
  return c;
}

Tensor matmul_transposed(ConstMatrix a, ConstMatrix b) {
  if (!(a.cols == b.cols))
    fail("matmul_transposed: a is {}, b is {} (expected equal row lengths)", a.shape_str(), b.shape_str());
  Tensor c(Shape{a.rows, b.rows});
  for (std::int64_t i = 0; i < a.rows; ++i)
    for (std::int64_t j = 0; j < b.rows; ++j) c.data()[i * b.rows + j] = dot(a.row(i), b.row(j));
  return c;
}

Tensor linear(ConstMatrix x, ConstMatrix weight, std::span<const float> bias) {
  if (!(x.cols == weight.cols))
    fail("linear: input is {}, weight is {} (expected weight [out, {}])", x.shape_str(), weight.shape_str(), x.cols);
  if (!(bias.empty() || static_cast<std::int64_t>(bias.size()) == weight.rows))
    fail("linear: bias has {} values for a weight of {} (expected {})", bias.size(), weight.shape_str(), weight.rows);
  Tensor y = matmul_transposed(x, weight);
  if (!bias.empty())
    for (std::int64_t t = 0; t < x.rows; ++t)
      for (std::int64_t o = 0; o < weight.rows; ++o) y.data()[t * weight.rows + o] += bias[static_cast<std::size_t>(o)];
  return y;
}

Tensor transpose(ConstMatrix a) {
  Tensor t(Shape{a.cols, a.rows});
  for (std::int64_t i = 0; i < a.rows; ++i)
    for (std::int64_t j = 0; j < a.cols; ++j) t.data()[j * a.rows + i] = a(i, j);
  return t;
}

}  // namespace af
