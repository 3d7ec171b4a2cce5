// The building blocks of chapter 20 against the CPU library.
#include <catch2/catch.hpp>

#include "af/error.hpp"
#include "af/kernels/blocks.hpp"
#include "af/kernels/device_buffer.hpp"
#include "af/linalg.hpp"
#include "af/random.hpp"
#include "af/softmax.hpp"

#include <cmath>

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
    INFO("n = " << n);
    REQUIRE(std::isfinite(got));
    REQUIRE(std::abs(got - want) <= 1e-5 * std::sqrt(static_cast<double>(n)) * 4 + 1e-6);
    REQUIRE(std::abs(af::dot(a, b) - want) <= 1e-3 * std::sqrt(static_cast<double>(n)));
  }
}

TEST_CASE("matmul equals the CPU matmul for sizes that are not multiples of the tile", "[blocks]") {
  af::Rng rng(21);
  for (int trial = 0; trial < 12; ++trial) {
    const std::int64_t m = 1 + rng.below(70), k = 1 + rng.below(90), n = 1 + rng.below(70);
    const af::Tensor a = af::random_normal(af::Shape{m, k}, rng), b = af::random_normal(af::Shape{k, n}, rng);
    DeviceBuffer<float> da{a.values()}, db{b.values()}, dc(static_cast<std::size_t>(m * n));
    dc.fill_bytes(0xFF);
    af::kernels::matmul(da.data(), db.data(), dc.data(), m, k, n, nullptr);
    const auto got = dc.download();
    const af::Tensor want = af::matmul(a.matrix(), b.matrix());
    INFO("m = " << m << ", k = " << k << ", n = " << n);
    REQUIRE(af::max_abs_diff(got, want.values()) <= 1e-4 * std::sqrt(static_cast<double>(k)));
  }
}

TEST_CASE("masked row softmax equals the CPU softmax, fully masked rows included", "[blocks]") {
  af::Rng rng(22);
  for (int trial = 0; trial < 10; ++trial) {
    const std::int64_t rows = 1 + rng.below(40), cols = 1 + rng.below(300);
    const bool causal = trial % 2 == 1;
    const std::int64_t first = causal ? rng.below(cols + 2) - 1 : 0;  // -1: row 0 sees nothing
    af::Tensor scores = af::random_normal(af::Shape{rows, cols}, rng, 3.0);
    DeviceBuffer<float> d{scores.values()};
    af::kernels::softmax_rows(d.data(), rows, cols, {causal, first}, nullptr);
    const auto got = d.download();
    af::Mask mask(rows, cols, !causal);  // causal: query i sees keys j <= first + i
    for (std::int64_t i = 0; causal && i < rows; ++i)
      for (std::int64_t j = 0; j < cols && j <= first + i; ++j) mask.set(i, j, true);
    af::softmax_rows(scores.matrix(), &mask);
    INFO("rows = " << rows << ", cols = " << cols << ", causal = " << causal << ", first = " << first);
    REQUIRE(af::max_abs_diff(got, scores.values()) <= 1e-5);
  }
}

TEST_CASE("the building blocks reject bad sizes with an af::Error naming the value", "[blocks]") {
  REQUIRE_THROWS_WITH(af::kernels::dot(nullptr, nullptr, 0, nullptr, nullptr), Catch::Contains("n is 0"));
  REQUIRE_THROWS_WITH(af::kernels::matmul(nullptr, nullptr, nullptr, 4, -1, 4, nullptr), Catch::Contains("k is -1"));
  REQUIRE_THROWS_AS(af::kernels::softmax_rows(nullptr, 0, 4, {}, nullptr), af::Error);
}
