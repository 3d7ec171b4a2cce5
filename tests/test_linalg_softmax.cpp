#include "af/error.hpp"
#include "af/linalg.hpp"
#include "af/random.hpp"
#include "af/softmax.hpp"
#include "reference.hpp"

#include <catch2/catch.hpp>

#include <cmath>
#include <limits>

using Catch::Matchers::Contains;

TEST_CASE("matmul, matmul_transposed and linear match a float64 reference on random shapes", "[linalg]") {
  af::Rng rng(5);
  for (int trial = 0; trial < 20; ++trial) {
    const std::int64_t m = 1 + rng.below(9), k = 1 + rng.below(40), n = 1 + rng.below(17);
    const af::Tensor a = af::random_normal(af::Shape{m, k}, rng);
    const af::Tensor b = af::random_normal(af::Shape{k, n}, rng);
    const af::Tensor w = af::random_normal(af::Shape{n, k}, rng);
    const af::Tensor bias = af::random_normal(af::Shape{n}, rng);
    const double tolerance = 1e-5 * static_cast<double>(k);

    const auto a64 = reference::to64(a.matrix()), w64 = reference::to64(w.matrix());
    const auto bt64 = reference::to64(af::transpose(b.matrix()).matrix());
    CHECK(reference::max_abs_diff(af::matmul(a.matrix(), b.matrix()).matrix(), reference::linear(a64, bt64)) <
          tolerance);
    CHECK(reference::max_abs_diff(af::matmul_transposed(a.matrix(), w.matrix()).matrix(), reference::linear(a64, w64)) <
          tolerance);
    const std::vector<double> bias64(bias.values().begin(), bias.values().end());
    CHECK(reference::max_abs_diff(af::linear(a.matrix(), w.matrix(), bias.values()).matrix(),
                                  reference::linear(a64, w64, bias64)) < tolerance);
  }
}

TEST_CASE("Mismatched products name both shapes", "[linalg][errors]") {
  const af::Tensor a(af::Shape{4, 8}), b(af::Shape{6, 3});
  CHECK_THROWS_WITH(af::matmul(a.matrix(), b.matrix()), Contains("[4, 8]") && Contains("[6, 3]"));
  CHECK_THROWS_WITH(af::linear(a.matrix(), b.matrix()), Contains("[4, 8]") && Contains("[6, 3]"));
  CHECK_THROWS_WITH(af::dot(std::vector<float>(3), std::vector<float>(4)), Contains("3") && Contains("4"));
}

TEST_CASE("Softmax sums to one, ignores a shift, and does not overflow", "[softmax]") {
  af::Rng rng(9);
  af::Tensor shifted = af::random_normal(af::Shape{33}, rng, 5.0);
  for (float& x : shifted.values()) x += 1000.0f;  // exp(1000) overflows; the max subtraction prevents it
  af::Tensor row = shifted;
  for (float& x : row.values()) x -= 1000.0f;  // exact, so both rows hold the same scores up to the shift
  af::softmax(row.values());
  af::softmax(shifted.values());
  double sum = 0.0;
  for (float w : row.values()) sum += w;
  CHECK(std::abs(sum - 1.0) < 1e-6);
  CHECK(af::max_abs_diff(row.values(), shifted.values()) < 1e-6);
  for (float w : shifted.values()) CHECK(std::isfinite(w));
}

TEST_CASE("Masked entries get weight zero and a fully masked row becomes zeros", "[softmax]") {
  af::Rng rng(10);
  af::Tensor scores = af::random_normal(af::Shape{4, 6}, rng);
  af::Mask mask = af::Mask::causal(4, 6, 2);
  mask.set(3, 0, false);
  for (std::int64_t k = 0; k < 6; ++k) mask.set(1, k, false);  // row 1 sees nothing
  af::softmax_rows(scores.matrix(), &mask);
  for (std::int64_t q = 0; q < 4; ++q) {
    double sum = 0.0;
    for (std::int64_t k = 0; k < 6; ++k) {
      if (!mask.allows(q, k)) CHECK(scores.at({q, k}) == 0.0f);
      sum += scores.at({q, k});
    }
    CHECK(std::abs(sum - (q == 1 ? 0.0 : 1.0)) < 1e-6);
  }
  CHECK_THROWS_WITH(af::softmax_rows(af::Tensor(af::Shape{3, 6}).matrix(), &mask),
                    Contains("[4, 6]") && Contains("[3, 6]"));
}

TEST_CASE("The causal mask lets a query see its own position and earlier ones", "[softmax]") {
  const af::Mask prefill = af::Mask::causal(4, 4, 0);
  const af::Mask decode = af::Mask::causal(1, 9, 8);
  for (std::int64_t q = 0; q < 4; ++q)
    for (std::int64_t k = 0; k < 4; ++k) CHECK(prefill.allows(q, k) == (k <= q));
  for (std::int64_t k = 0; k < 9; ++k) CHECK(decode.allows(0, k));
  CHECK_THROWS_AS(af::Mask::causal(2, 2, -1), af::Error);
}
