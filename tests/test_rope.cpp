#include "af/error.hpp"
#include "af/linalg.hpp"
#include "af/random.hpp"
#include "af/rope.hpp"

#include <catch2/catch.hpp>

#include <cmath>
#include <complex>
#include <numbers>

namespace {
double dot64(std::span<const float> a, std::span<const float> b) {
  double s = 0.0;
  for (std::size_t i = 0; i < a.size(); ++i) s += double{a[i]} * b[i];
  return s;
}

std::vector<float> rotated(const af::Rope& rope, std::vector<float> x, double position) {
  rope.rotate(x, position);
  return x;
}

std::vector<float> random_vector(af::Rng& rng, std::int64_t n) {
  const af::Tensor t = af::random_normal(af::Shape{n}, rng);
  return {t.values().begin(), t.values().end()};
}
}  // namespace

TEST_CASE("RoPE in the adjacent layout is multiplication by e^(i m theta_k) of complex pairs", "[rope]") {
  af::Rng rng(41);
  const std::int64_t d = 32;
  const af::Rope rope(d, 10000.0, af::RopeLayout::adjacent);
  for (int trial = 0; trial < 20; ++trial) {
    const auto x = random_vector(rng, d);
    const double m = static_cast<double>(rng.below(5000));
    const auto y = rotated(rope, x, m);
    for (std::int64_t k = 0; k < d / 2; ++k) {
      const double theta = std::pow(10000.0, -2.0 * static_cast<double>(k) / d);
      const std::complex<double> expected = std::complex<double>(x[2 * k], x[2 * k + 1]) * std::polar(1.0, m * theta);
      CHECK(std::abs(y[2 * k] - expected.real()) < 1e-5);
      CHECK(std::abs(y[2 * k + 1] - expected.imag()) < 1e-5);
    }
  }
}

TEST_CASE("q . k after rotation depends only on the distance between the positions", "[rope]") {
  af::Rng rng(42);
  for (const af::RopeLayout layout : {af::RopeLayout::adjacent, af::RopeLayout::half_split}) {
    const af::Rope rope(64, 500000.0, layout);
    for (int trial = 0; trial < 50; ++trial) {
      const auto q = random_vector(rng, 64), k = random_vector(rng, 64);
      const double m = static_cast<double>(rng.below(4096)), n = static_cast<double>(rng.below(4096));
      const double shift = static_cast<double>(rng.below(4096));
      const double a = dot64(rotated(rope, q, m), rotated(rope, k, n));
      const double b = dot64(rotated(rope, q, m + shift), rotated(rope, k, n + shift));
      CHECK(std::abs(a - b) < 1e-4 * (1.0 + std::abs(a)));
    }
  }
}

TEST_CASE("Rotation keeps the norm, is the identity at position 0, and composes by adding positions", "[rope]") {
  af::Rng rng(43);
  const af::Rope rope(16, 10000.0, af::RopeLayout::half_split);
  const auto x = random_vector(rng, 16);
  CHECK(af::max_abs_diff(rotated(rope, x, 0.0), x) == 0.0);
  const auto y = rotated(rope, x, 123.0);
  CHECK(std::abs(dot64(y, y) - dot64(x, x)) < 1e-5 * dot64(x, x));
  CHECK(af::max_abs_diff(rotated(rope, rotated(rope, x, 100.0), 23.0), y) < 1e-5);
  CHECK(af::max_abs_diff(rotated(rope, y, -123.0), x) < 1e-5);  // a cached key can be moved back
}

TEST_CASE("The half-split layout is the adjacent one under a fixed permutation", "[rope]") {
  af::Rng rng(44);
  const std::int64_t d = 24;
  const af::Rope adjacent(d, 10000.0, af::RopeLayout::adjacent), half(d, 10000.0, af::RopeLayout::half_split);
  const auto perm = af::adjacent_to_half_split(d);
  CHECK(perm == std::vector<std::int64_t>{0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22,
                                          1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23});
  const auto permute = [&](const std::vector<float>& v) {
    std::vector<float> out(v.size());
    for (std::size_t j = 0; j < v.size(); ++j) out[j] = v[static_cast<std::size_t>(perm[j])];
    return out;
  };
  for (int trial = 0; trial < 20; ++trial) {
    const auto x = random_vector(rng, d);
    const double m = static_cast<double>(rng.below(1000));
    CHECK(af::max_abs_diff(rotated(half, permute(x), m), permute(rotated(adjacent, x, m))) < 1e-6);
  }
}

TEST_CASE("Llama 3.1 scaling stretches long wavelengths, keeps short ones and blends between", "[rope]") {
  const std::int64_t d = 32;
  const af::Llama3Scaling s{8.0, 1.0, 4.0, 64.0};
  const af::Rope plain(d, 500000.0, af::RopeLayout::half_split), scaled(d, 500000.0, af::RopeLayout::half_split, s);
  int stretched = 0, kept = 0, blended = 0;
  for (std::int64_t i = 0; i < d / 2; ++i) {
    const double f = plain.inverse_frequencies()[static_cast<std::size_t>(i)];
    const double g = scaled.inverse_frequencies()[static_cast<std::size_t>(i)];
    const double wavelength = 2.0 * std::numbers::pi / f;
    if (wavelength < 64.0 / 4.0) {
      CHECK(g == f);
      ++kept;
    } else if (wavelength > 64.0 / 1.0) {
      CHECK(std::abs(g - f / 8.0) <= 1e-15 * f);
      ++stretched;
    } else {
      CHECK((g < f && g > f / 8.0));
      ++blended;
    }
  }
  CHECK(kept > 0);
  CHECK(stretched > 0);
  CHECK(blended > 0);
}

TEST_CASE("GQA with RoPE: prefill equals decode, and keys are cached rotated", "[rope][gqa]") {
  af::Rng rng(45);
  const af::GroupedShape shape{32, 4, 2, 8};
  const double in = 1.0 / std::sqrt(32.0);
  const af::GroupedWeights w{af::random_normal(af::Shape{32, 32}, rng, in),
                             af::random_normal(af::Shape{16, 32}, rng, in),
                             af::random_normal(af::Shape{16, 32}, rng, in),
                             af::random_normal(af::Shape{32, 32}, rng, in),
                             {},
                             {},
                             {}};
  const af::Rope rope(8, 10000.0, af::RopeLayout::half_split);
  const std::int64_t T = 9;
  const af::Tensor x = af::random_normal(af::Shape{T, 32}, rng);
  std::vector<std::int64_t> positions(T);
  for (std::int64_t t = 0; t < T; ++t) positions[static_cast<std::size_t>(t)] = 5 + t;  // a prompt that starts at 5
  af::GroupedKvCache prefill_cache(T, 2, 8), decode_cache(T, 2, 8);
  const af::Tensor prefill = af::rotary_grouped_attention(x.matrix(), positions, shape, w, rope, {}, prefill_cache);
  af::Tensor decoded(af::Shape{T, 32});
  for (std::int64_t t = 0; t < T; ++t) {
    const af::Tensor y = af::rotary_grouped_attention(x.matrix().rows_slice(t, 1), std::span(positions).subspan(t, 1),
                                                      shape, w, rope, {}, decode_cache);
    std::ranges::copy(y.values(), decoded.matrix().row(t).begin());
  }
  CHECK(af::max_abs_diff(prefill.values(), decoded.values()) < 1e-5);
  // The cached key of token 3, head 1, rotated back by its position, is the plain projection.
  std::vector<float> key(prefill_cache.keys(1).row(3).begin(), prefill_cache.keys(1).row(3).end());
  rope.rotate(key, -8.0);
  const af::Tensor plain_k = af::linear(x.matrix().rows_slice(3, 1), w.k_proj.matrix());
  CHECK(af::max_abs_diff(key, plain_k.values().subspan(8, 8)) < 1e-5);
}

TEST_CASE("RoPE rejects odd head dimensions and bad scalings", "[rope][errors]") {
  using Catch::Matchers::Contains;
  CHECK_THROWS_WITH(af::Rope(7, 10000.0, af::RopeLayout::adjacent), Contains("head_dim is 7"));
  CHECK_THROWS_WITH(af::Rope(8, 1.0, af::RopeLayout::adjacent), Contains("base"));
  CHECK_THROWS_AS(af::Rope(8, 1e4, af::RopeLayout::adjacent, af::Llama3Scaling{8.0, 4.0, 1.0, 64.0}), af::Error);
}

TEST_CASE("Linear scaling divides every frequency by the factor, as if positions were factor times closer", "[rope]") {
  const af::Rope plain(16, 1e6, af::RopeLayout::half_split);
  const af::Rope scaled(16, 1e6, af::RopeLayout::half_split, af::LinearScaling{8.0});
  for (std::size_t i = 0; i < plain.inverse_frequencies().size(); ++i)
    CHECK(scaled.inverse_frequencies()[i] == Approx(plain.inverse_frequencies()[i] / 8.0).epsilon(1e-15));
  CHECK(scaled.attention_scale() == 1.0);
  af::Rng rng(603);
  const std::vector<float> x = random_vector(rng, 16);
  CHECK(af::max_abs_diff(rotated(scaled, x, 80.0), rotated(plain, x, 10.0)) <= 1e-5);
  CHECK_THROWS_AS(af::Rope(16, 1e6, af::RopeLayout::half_split, af::LinearScaling{0.5}), af::Error);
}
