#include "af/random.hpp"

#include "af/error.hpp"

#include <cmath>
#include <limits>

namespace af {

namespace {

std::uint64_t splitmix64(std::uint64_t& x) {
  std::uint64_t z = (x += 0x9E3779B97F4A7C15ULL);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

std::uint64_t rotl(std::uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

}  // namespace

Rng::Rng(std::uint64_t seed) {
  for (auto& word : state_) word = splitmix64(seed);
}

std::uint64_t Rng::next_u64() {
  const std::uint64_t result = rotl(state_[1] * 5, 7) * 9;
  const std::uint64_t t = state_[1] << 17;
  state_[2] ^= state_[0];
  state_[3] ^= state_[1];
  state_[1] ^= state_[2];
  state_[0] ^= state_[3];
  state_[2] ^= t;
  state_[3] = rotl(state_[3], 45);
  return result;
}

double Rng::uniform() { return static_cast<double>(next_u64() >> 11) * 0x1.0p-53; }

double Rng::uniform(double lo, double hi) {
  require(lo < hi, "Rng::uniform: empty range [{}, {})", lo, hi);
  return lo + (hi - lo) * uniform();
}

std::int64_t Rng::below(std::int64_t n) {
  require(n > 0, "Rng::below: n is {} (expected n > 0)", n);
  // Rejection keeps every value equally likely.
  const auto range = static_cast<std::uint64_t>(n);
  const std::uint64_t limit =
      std::numeric_limits<std::uint64_t>::max() - std::numeric_limits<std::uint64_t>::max() % range;
  std::uint64_t x = next_u64();
  while (x >= limit) x = next_u64();
  return static_cast<std::int64_t>(x % range);
}

double Rng::normal() {
  if (has_spare_) {
    has_spare_ = false;
    return spare_normal_;
  }
  double u = 0.0, v = 0.0, s = 0.0;
  do {
    u = 2.0 * uniform() - 1.0;
    v = 2.0 * uniform() - 1.0;
    s = u * u + v * v;
  } while (s >= 1.0 || s == 0.0);
  const double factor = std::sqrt(-2.0 * portable_log(s) / s);
  spare_normal_ = v * factor;
  has_spare_ = true;
  return u * factor;
}

double portable_log(double x) {
  require(std::isfinite(x) && x > 0.0, "portable_log: x is {} (expected a finite x > 0)", x);
  int exponent = 0;
  double mantissa = std::frexp(x, &exponent);  // x = mantissa * 2^exponent, mantissa in [0.5, 1): exact
  if (mantissa < 0.70710678118654752440) {
    mantissa *= 2.0;  // exact
    exponent -= 1;
  }
  // ln(m) = 2 atanh(z) with z = (m - 1) / (m + 1), |z| <= 0.1716: the odd series converges fast.
  const double z = (mantissa - 1.0) / (mantissa + 1.0);
  const double z2 = z * z;
  double series = 0.0;
  for (int k = 12; k >= 0; --k) series = series * z2 + 1.0 / static_cast<double>(2 * k + 1);
  constexpr double ln2 = 0.693147180559945309417232121458;
  return static_cast<double>(exponent) * ln2 + 2.0 * z * series;
}

Tensor random_normal(Shape shape, Rng& rng, double stddev) {
  require(stddev > 0.0, "random_normal: stddev is {} (expected > 0)", stddev);
  Tensor t(shape);
  for (float& v : t.values()) v = static_cast<float>(stddev * rng.normal());
  return t;
}

Tensor random_uniform(Shape shape, Rng& rng, double lo, double hi) {
  Tensor t(shape);
  for (float& v : t.values()) v = static_cast<float>(rng.uniform(lo, hi));
  return t;
}

}  // namespace af
