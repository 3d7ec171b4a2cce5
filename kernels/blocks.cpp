// The host side of the building blocks: argument checks (af::Error naming the bad value), then the launch.
#include "launchers.hpp"

#include "af/error.hpp"
#include "af/kernels/blocks.hpp"

namespace af::kernels {

void dot(const float* a, const float* b, std::int64_t n, float* result, cudaStream_t stream) {
  require(n >= 1, "dot: n is {} (expected at least 1)", n);
  require(a != nullptr && b != nullptr && result != nullptr, "dot: a null pointer (expected device pointers)");
  detail::launch_dot(a, b, n, result, stream);
}

void matmul(const float* a, const float* b, float* c, std::int64_t m, std::int64_t k, std::int64_t n,
            cudaStream_t stream) {
  constexpr std::int64_t limit = std::int64_t{1} << 20;
  require(m >= 1 && m <= limit, "matmul: m is {} (expected 1..{})", m, limit);
  require(k >= 1 && k <= limit, "matmul: k is {} (expected 1..{})", k, limit);
  require(n >= 1 && n <= limit, "matmul: n is {} (expected 1..{})", n, limit);
  detail::launch_matmul(a, b, c, static_cast<int>(m), static_cast<int>(k), static_cast<int>(n), stream);
}

void transpose(const float* in, float* out, std::int64_t rows, std::int64_t cols, bool padded, cudaStream_t stream) {
  constexpr std::int64_t limit = std::int64_t{1} << 20;  // the grid's y dimension holds rows / 32 blocks
  require(rows >= 1 && rows <= limit, "transpose: rows is {} (expected 1..{})", rows, limit);
  require(cols >= 1 && cols <= limit, "transpose: cols is {} (expected 1..{})", cols, limit);
  require(in != nullptr && out != nullptr, "transpose: a null pointer (expected device pointers)");
  detail::launch_transpose(in, out, static_cast<int>(rows), static_cast<int>(cols), padded, stream);
}

void softmax_rows(float* scores, std::int64_t rows, std::int64_t cols, RowMask mask, cudaStream_t stream) {
  require(rows >= 1 && rows <= (std::int64_t{1} << 31), "softmax_rows: rows is {} (expected 1..2^31)", rows);
  require(cols >= 1, "softmax_rows: cols is {} (expected at least 1)", cols);
  detail::launch_softmax_rows(scores, rows, cols, mask, stream);
}

}  // namespace af::kernels
