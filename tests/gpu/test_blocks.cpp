// The building blocks of chapter 20 against float64 CPU results, element by element.
#include <catch2/catch.hpp>

#include "af/error.hpp"
#include "af/kernels/blocks.hpp"
#include "af/kernels/device_buffer.hpp"
#include "af/linalg.hpp"
#include "af/random.hpp"
#include "elementwise.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

using af::kernels::DeviceBuffer;

namespace {
std::vector<float> normal(std::int64_t n, af::Rng& rng) {
  const af::Tensor t = af::random_normal(af::Shape{n}, rng);
  return {t.data(), t.data() + n};
}
}  // namespace

TEST_CASE("dot equals the CPU dot product for lengths from 1 to past a million", "[blocks]") {
  af::Rng rng(20);
  for (std::int64_t n : {1, 7, 32, 1000, 65537, (1 << 20) + 3}) {
    const auto a = normal(n, rng), b = normal(n, rng);
    DeviceBuffer<float> da{std::span<const float>(a)}, db{std::span<const float>(b)}, result(1);
    result.fill_bytes(0xFF);
    af::kernels::dot(da.data(), db.data(), n, result.data(), nullptr);
    const float got = result.download()[0];
    double want = 0.0;
    for (std::int64_t i = 0; i < n; ++i) want += static_cast<double>(a[i]) * b[i];
    // float32 partial sums in a different order than the CPU's: the error grows like sqrt(n) roundings.
    const double gpu_bound = 4e-5 * std::sqrt(static_cast<double>(n)) + 1e-6;
    const double cpu = af::dot(a, b), cpu_bound = 1e-3 * std::sqrt(static_cast<double>(n));
    INFO("n = " << n << ": GPU " << got << ", CPU " << cpu << ", float64 " << want << "; bounds " << gpu_bound
                << " (GPU) and " << cpu_bound << " (CPU)");
    REQUIRE(af::within_tolerance(std::abs(got - want), gpu_bound));  // a NaN or infinite result fails
    REQUIRE(af::within_tolerance(std::abs(cpu - want), cpu_bound));
  }
}

TEST_CASE("matmul equals a float64 matmul, element by element, for sizes that are not multiples of the tile",
          "[blocks]") {
  af::Rng rng(21);
  for (int trial = 0; trial < 12; ++trial) {
    const std::int64_t m = 1 + rng.below(70), k = 1 + rng.below(90), n = 1 + rng.below(70);
    const af::Tensor a = af::random_normal(af::Shape{m, k}, rng), b = af::random_normal(af::Shape{k, n}, rng);
    DeviceBuffer<float> da{a.values()}, db{b.values()}, dc(static_cast<std::size_t>(m * n));
    dc.fill_bytes(0xFF);
    af::kernels::matmul(da.data(), db.data(), dc.data(), m, k, n, nullptr);
    const auto got = dc.download();
    std::vector<double> want(static_cast<std::size_t>(m * n), 0.0);
    for (std::int64_t i = 0; i < m; ++i)
      for (std::int64_t p = 0; p < k; ++p)
        for (std::int64_t j = 0; j < n; ++j)
          want[static_cast<std::size_t>(i * n + j)] += static_cast<double>(a.data()[i * k + p]) * b.data()[p * n + j];
    // float32 sums of k products of standard normals: each addition rounds by up to 2^-24 of a partial sum
    // near sqrt(k), so the error grows like k * 6e-8 (a random walk of k roundings); 1e-6 * k leaves a
    // margin of 16, and the relative part covers the large elements (on an H200 the worst element uses 0.13
    // of its bound).
    const af_test::Tolerance tolerance{1e-6 * static_cast<double>(k), 1e-6};
    const auto report = af_test::compare_elementwise(got, want, tolerance, [&](std::size_t e) {
      return "row " + std::to_string(static_cast<std::int64_t>(e) / n) + ", column " +
             std::to_string(static_cast<std::int64_t>(e) % n);
    });
    INFO("m = " << m << ", k = " << k << ", n = " << n << ": " << report.message);
    REQUIRE(report.failures == 0);
  }
}

TEST_CASE("transpose, padded and unpadded, moves every element exactly, for sizes that are not multiples of the tile",
          "[blocks]") {
  af::Rng rng(22);
  for (int trial = 0; trial < 12; ++trial) {
    const std::int64_t rows = 1 + rng.below(150), cols = 1 + rng.below(150);
    const af::Tensor a = af::random_normal(af::Shape{rows, cols}, rng);
    DeviceBuffer<float> in{a.values()}, out(static_cast<std::size_t>(rows * cols));
    for (const bool padded : {false, true}) {
      out.fill_bytes(0xFF);  // NaN: an element the kernel does not write fails
      af::kernels::transpose(in.data(), out.data(), rows, cols, padded, nullptr);
      const auto got = out.download();
      std::int64_t wrong = 0;
      for (std::int64_t r = 0; r < rows; ++r)
        for (std::int64_t c = 0; c < cols; ++c)
          wrong += !(got[static_cast<std::size_t>(c * rows + r)] == a.data()[r * cols + c]);  // NaN counts
      INFO(rows << " x " << cols << (padded ? ", padded" : ", unpadded") << ": " << wrong << " elements differ");
      REQUIRE(wrong == 0);
    }
  }
}

TEST_CASE("masked row softmax equals a float64 softmax, element by element, fully masked rows included", "[blocks]") {
  af::Rng rng(22);
  for (int trial = 0; trial < 10; ++trial) {
    const std::int64_t rows = 1 + rng.below(40), cols = 1 + rng.below(300);
    const bool causal = trial % 2 == 1;
    const std::int64_t first = causal ? rng.below(cols + 2) - 1 : 0;  // -1: row 0 sees nothing
    const af::Tensor scores = af::random_normal(af::Shape{rows, cols}, rng, 3.0);
    DeviceBuffer<float> d{scores.values()};
    af::kernels::softmax_rows(d.data(), rows, cols, {causal, first}, nullptr);
    const auto got = d.download();
    // Causal: query i sees keys j <= first + i; a row that sees nothing is all 0.
    std::vector<double> want(static_cast<std::size_t>(rows * cols), 0.0);
    for (std::int64_t i = 0; i < rows; ++i) {
      const std::int64_t visible = causal ? std::clamp<std::int64_t>(first + i + 1, 0, cols) : cols;
      const float* row = scores.data() + i * cols;
      double max_score = -std::numeric_limits<double>::infinity(), sum = 0.0;
      for (std::int64_t j = 0; j < visible; ++j) max_score = std::max(max_score, static_cast<double>(row[j]));
      for (std::int64_t j = 0; j < visible; ++j) sum += std::exp(row[j] - max_score);
      for (std::int64_t j = 0; j < visible; ++j)
        want[static_cast<std::size_t>(i * cols + j)] = std::exp(row[j] - max_score) / sum;
    }
    // float32 with __expf: its error is 2 + 1.17 |x| ulps for exp(x), about 25 ulps (1.5e-6) for the
    // arguments near -20 these scores reach, plus the float32 sum of up to 300 terms (a few 1e-7): relative
    // 1e-5 leaves a margin of 5 (on an H200 the worst element uses 0.06 of its bound); the absolute part only
    // keeps the bound above 0.
    const af_test::Tolerance tolerance{1e-9, 1e-5};
    const auto report = af_test::compare_elementwise(got, want, tolerance, [&](std::size_t e) {
      return "row " + std::to_string(static_cast<std::int64_t>(e) / cols) + ", column " +
             std::to_string(static_cast<std::int64_t>(e) % cols);
    });
    INFO("rows = " << rows << ", cols = " << cols << ", causal = " << causal << ", first = " << first << ": "
                   << report.message);
    REQUIRE(report.failures == 0);
  }
}

TEST_CASE("the building blocks reject bad sizes with an af::Error naming the value", "[blocks]") {
  REQUIRE_THROWS_WITH(af::kernels::dot(nullptr, nullptr, 0, nullptr, nullptr), Catch::Contains("n is 0"));
  REQUIRE_THROWS_WITH(af::kernels::matmul(nullptr, nullptr, nullptr, 4, -1, 4, nullptr), Catch::Contains("k is -1"));
  REQUIRE_THROWS_AS(af::kernels::softmax_rows(nullptr, 0, 4, {}, nullptr), af::Error);
  REQUIRE_THROWS_WITH(af::kernels::transpose(nullptr, nullptr, 3, 0, true, nullptr), Catch::Contains("cols is 0"));
}
