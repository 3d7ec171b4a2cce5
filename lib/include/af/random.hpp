#pragma once
/// @file random.hpp
/// A seeded random generator that gives the same numbers on every platform and compiler.
///
/// The standard library's distributions (`std::normal_distribution` and friends) are implementation
/// defined, so a test written against them can change meaning with the compiler. Here the integer stream
/// is xoshiro256** seeded through SplitMix64, uniforms take the top 53 bits, and normals use the
/// Marsaglia polar method with a logarithm written from IEEE-754 basic operations only (+, -, *, /, sqrt,
/// and exact scaling by powers of two), which every conforming platform rounds identically.

#include "af/tensor.hpp"

#include <cstdint>

namespace af {

class Rng {
 public:
  explicit Rng(std::uint64_t seed);

  /// The next 64 random bits.
  std::uint64_t next_u64();
  /// Uniform in [0, 1), a multiple of 2^-53.
  double uniform();
  /// Uniform in [lo, hi).
  double uniform(double lo, double hi);
  /// Standard normal.
  double normal();
  /// Uniform integer in [0, n); throws af::Error for n <= 0.
  std::int64_t below(std::int64_t n);

 private:
  std::uint64_t state_[4];
  double spare_normal_ = 0.0;
  bool has_spare_ = false;
};

/// The natural logarithm from basic IEEE-754 operations only (bit-identical everywhere);
/// within a few ulp of `std::log`. Throws af::Error for x <= 0 or a non-finite x.
double portable_log(double x);

/// A tensor of normal values with the given standard deviation.
Tensor random_normal(Shape shape, Rng& rng, double stddev = 1.0);
/// A tensor of uniform values in [lo, hi).
Tensor random_uniform(Shape shape, Rng& rng, double lo, double hi);

}  // namespace af
