#include "af/quant_matmul.hpp"

#include "af/error.hpp"
#include "af/numeric.hpp"

#include <cblas.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstring>
#include <vector>

namespace af::gguf {

namespace {

std::uint16_t load_u16(const std::byte* at) {
  return static_cast<std::uint16_t>(std::to_integer<unsigned>(at[0]) | (std::to_integer<unsigned>(at[1]) << 8));
}

float load_f32(const std::byte* at) {
  float value;
  std::memcpy(&value, at, sizeof value);
  return value;
}

// The row kernels. Each block's 32 weights are dequantized in registers exactly as the block format defines
// them (d * q + m: one rounding for the product and one for the sum; the build never contracts them into an
// FMA), multiplied by x and added into 8 running sums (one 8-wide vector). The AVX2 versions do the same
// operations on 8 lanes at once; the portable versions are the fallback where the CPU lacks AVX2.
#define AF_VECTOR_CLONES __attribute__((target_clones("avx2", "default")))

// Inlined into the AVX2 kernels, so that they never call SSE code with the upper halves of the registers live.
__attribute__((always_inline)) inline float sum_lanes(const float* sums) {
  return ((sums[0] + sums[1]) + (sums[2] + sums[3])) + ((sums[4] + sums[5]) + (sums[6] + sums[7]));
}

float dot_q4_1_portable(const std::byte* row, const float* x, std::int64_t cols) {
  float sums[8] = {};
  for (std::int64_t b = 0; b < cols / 32; ++b, row += q4_1_block_bytes, x += 32) {
    const float d = fp16_to_float(load_u16(row)), m = fp16_to_float(load_u16(row + 2));
    float w[32];
    for (int j = 0; j < 16; ++j) {
      const unsigned packed = std::to_integer<unsigned>(row[4 + j]);
      w[j] = d * static_cast<float>(packed & 0xFu) + m;
      w[j + 16] = d * static_cast<float>(packed >> 4) + m;
    }
    for (int i = 0; i < 32; i += 8)
      for (int k = 0; k < 8; ++k) sums[k] += w[i + k] * x[i + k];
  }
  return sum_lanes(sums);
}

float dot_q8_0_portable(const std::byte* row, const float* x, std::int64_t cols) {
  float sums[8] = {};
  for (std::int64_t b = 0; b < cols / 32; ++b, row += q8_0_block_bytes, x += 32) {
    const float d = fp16_to_float(load_u16(row));
    for (int i = 0; i < 32; i += 8)
      for (int k = 0; k < 8; ++k)
        sums[k] += d * static_cast<float>(static_cast<std::int8_t>(row[2 + i + k])) * x[i + k];
  }
  return sum_lanes(sums);
}

#if defined(__x86_64__)
// 8 nibbles or bytes widened to 8 int32 lanes, converted to float.
__attribute__((target("avx2,f16c"))) float dot_q4_1_avx2(const std::byte* row, const float* x, std::int64_t cols) {
  __m256 sums = _mm256_setzero_ps();
  const __m128i low_mask = _mm_set1_epi8(0x0F);
  for (std::int64_t b = 0; b < cols / 32; ++b, row += q4_1_block_bytes, x += 32) {
    const __m256 d = _mm256_set1_ps(_cvtsh_ss(load_u16(row))), m = _mm256_set1_ps(_cvtsh_ss(load_u16(row + 2)));
    const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 4));
    const __m128i low = _mm_and_si128(packed, low_mask);                      // elements 0..15
    const __m128i high = _mm_and_si128(_mm_srli_epi16(packed, 4), low_mask);  // elements 16..31
    const __m128i parts[4] = {low, _mm_srli_si128(low, 8), high, _mm_srli_si128(high, 8)};
    for (int p = 0; p < 4; ++p) {
      const __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[p]));
      const __m256 w = _mm256_add_ps(_mm256_mul_ps(d, q), m);
      sums = _mm256_add_ps(sums, _mm256_mul_ps(w, _mm256_loadu_ps(x + 8 * p)));
    }
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, sums);
  return sum_lanes(lanes);
}

__attribute__((target("avx2,f16c"))) float dot_q8_0_avx2(const std::byte* row, const float* x, std::int64_t cols) {
  __m256 sums = _mm256_setzero_ps();
  for (std::int64_t b = 0; b < cols / 32; ++b, row += q8_0_block_bytes, x += 32) {
    const __m256 d = _mm256_set1_ps(_cvtsh_ss(load_u16(row)));
    for (int p = 0; p < 4; ++p) {
      const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + 2 + 8 * p));
      const __m256 w = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes)));
      sums = _mm256_add_ps(sums, _mm256_mul_ps(w, _mm256_loadu_ps(x + 8 * p)));
    }
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, sums);
  return sum_lanes(lanes);
}

// Asked once, at load time: __builtin_cpu_init first, since this may run before libgcc's own initialiser.
const bool has_avx2 = [] {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
}();
#else
constexpr bool has_avx2 = false;
float dot_q4_1_avx2(const std::byte* row, const float* x, std::int64_t cols) { return dot_q4_1_portable(row, x, cols); }
float dot_q8_0_avx2(const std::byte* row, const float* x, std::int64_t cols) { return dot_q8_0_portable(row, x, cols); }
#endif

float dot_q4_1(const std::byte* row, const float* x, std::int64_t cols) {
  return has_avx2 ? dot_q4_1_avx2(row, x, cols) : dot_q4_1_portable(row, x, cols);
}

float dot_q8_0(const std::byte* row, const float* x, std::int64_t cols) {
  return has_avx2 ? dot_q8_0_avx2(row, x, cols) : dot_q8_0_portable(row, x, cols);
}

AF_VECTOR_CLONES float dot_q4_0(const std::byte* row, const float* x, std::int64_t cols) {
  float sums[8] = {};
  for (std::int64_t b = 0; b < cols / 32; ++b, row += q4_0_block_bytes, x += 32) {
    const float d = fp16_to_float(load_u16(row));
    float w[32];
    for (int j = 0; j < 16; ++j) {
      const unsigned packed = std::to_integer<unsigned>(row[2 + j]);
      w[j] = static_cast<float>(static_cast<int>(packed & 0xFu) - 8) * d;
      w[j + 16] = static_cast<float>(static_cast<int>(packed >> 4) - 8) * d;
    }
    for (int i = 0; i < 32; i += 8)
      for (int k = 0; k < 8; ++k) sums[k] += w[i + k] * x[i + k];
  }
  return sum_lanes(sums);
}

AF_VECTOR_CLONES float dot_f32(const std::byte* row, const float* x, std::int64_t cols) {
  float sums[8] = {};
  std::int64_t i = 0;
  for (; i + 8 <= cols; i += 8)
    for (int k = 0; k < 8; ++k) sums[k] += load_f32(row + 4 * (i + k)) * x[i + k];
  for (; i < cols; ++i) sums[0] += load_f32(row + 4 * i) * x[i];
  return sum_lanes(sums);
}

float dot_f16(const std::byte* row, const float* x, std::int64_t cols) {
  float sum = 0.0f;
  for (std::int64_t i = 0; i < cols; ++i) sum += fp16_to_float(load_u16(row + 2 * i)) * x[i];
  return sum;
}

}  // namespace

QuantMatrix::QuantMatrix(const File& file, const TensorInfo& tensor) {
  if (tensor.dims.size() != 2)
    fail("{}: tensor {} has {} dimensions (expected a matrix, 2)", file.source(), tensor.name, tensor.dims.size());
  type_ = tensor.type;
  switch (type_) {
    case GgmlType::f32:
    case GgmlType::f16:
    case GgmlType::q8_0:
    case GgmlType::q4_0:
    case GgmlType::q4_1:
      break;
    default:
      fail("{}: tensor {} is {} (expected F32, F16, Q8_0, Q4_0 or Q4_1)", file.source(), tensor.name, name_of(type_));
  }
  cols_ = static_cast<std::int64_t>(tensor.dims[0]);
  rows_ = static_cast<std::int64_t>(tensor.dims[1]);
  const BlockLayout layout = layout_of(type_);
  row_bytes_ = static_cast<std::size_t>(tensor.dims[0] / layout.block_elements * layout.block_bytes);
  bytes_ = file.data(tensor);
}

float QuantMatrix::dot_row(std::int64_t r, const float* x) const {
  const std::byte* row = bytes_.data() + static_cast<std::size_t>(r) * row_bytes_;
  switch (type_) {
    case GgmlType::q4_1:
      return dot_q4_1(row, x, cols_);
    case GgmlType::q4_0:
      return dot_q4_0(row, x, cols_);
    case GgmlType::q8_0:
      return dot_q8_0(row, x, cols_);
    case GgmlType::f16:
      return dot_f16(row, x, cols_);
    default:
      return dot_f32(row, x, cols_);
  }
}

void QuantMatrix::dequantize_rows(std::int64_t first, std::int64_t count, std::span<float> out) const {
  require(first >= 0 && count >= 0 && first + count <= rows_ && out.size() == static_cast<std::size_t>(count * cols_),
          "dequantize_rows: rows {}..{} into {} values (expected rows within {} and {} values)", first, first + count,
          out.size(), rows_, count * cols_);
  const std::span<const std::byte> rows =
      bytes_.subspan(static_cast<std::size_t>(first) * row_bytes_, static_cast<std::size_t>(count) * row_bytes_);
  dequantize(type_, rows, out);
}

void matvec(const QuantMatrix& w, std::span<const float> x, std::span<float> y) {
  require(x.size() == static_cast<std::size_t>(w.cols()) && y.size() == static_cast<std::size_t>(w.rows()),
          "matvec: x has {} values and y {} (expected {} and {} for a [{}, {}] matrix)", x.size(), y.size(), w.cols(),
          w.rows(), w.rows(), w.cols());
  const std::int64_t rows = w.rows();
#pragma omp parallel for schedule(static)
  for (std::int64_t r = 0; r < rows; ++r) y[static_cast<std::size_t>(r)] = w.dot_row(r, x.data());
}

void matmul(const QuantMatrix& w, ConstMatrix x, Matrix y) {
  require(
      x.cols == w.cols() && y.rows == x.rows && y.cols == w.rows() && x.row_stride == x.cols && y.row_stride == y.cols,
      "matmul: x is [{}, {}] and y [{}, {}] (expected contiguous [T, {}] and [T, {}])", x.rows, x.cols, y.rows, y.cols,
      w.cols(), w.rows());
  if (x.rows < 4) {  // a decode step (or nearly): read the blocks once per token
    for (std::int64_t t = 0; t < x.rows; ++t)
      matvec(w, std::span<const float>(x.data + t * x.cols, static_cast<std::size_t>(x.cols)),
             std::span<float>(y.data + t * y.cols, static_cast<std::size_t>(y.cols)));
    return;
  }
  // Panels of rows small enough to stay in the last-level cache while sgemm multiplies them by all of X.
  const std::int64_t panel = std::max<std::int64_t>(1, (std::int64_t{1} << 20) / w.cols());
  std::vector<float> weights(static_cast<std::size_t>(std::min(panel, w.rows()) * w.cols()));
  for (std::int64_t first = 0; first < w.rows(); first += panel) {
    const std::int64_t count = std::min(panel, w.rows() - first);
    const std::span<float> values(weights.data(), static_cast<std::size_t>(count * w.cols()));
    w.dequantize_rows(first, count, values);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(x.rows), static_cast<int>(count),
                static_cast<int>(x.cols), 1.0f, x.data, static_cast<int>(x.cols), values.data(),
                static_cast<int>(w.cols()), 0.0f, y.data + first, static_cast<int>(y.cols));
  }
}

}  // namespace af::gguf
