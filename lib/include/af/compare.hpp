#pragma once
/// @file compare.hpp
/// How every check in the book measures an error: reductions in which a NaN or an infinity is never small.
///
/// `std::max(worst, d)` forgets a NaN whenever `worst` is finite (every comparison with NaN is false), and
/// `if (!(d <= worst)) worst = d` forgets it as soon as a later finite difference arrives. The functions
/// here keep a NaN once it appears, let an infinity win, and `within_tolerance` passes only a finite error
/// under a finite tolerance. Every error reduction in the library, the chapters, the tests and the oracle
/// harness goes through them.

#include <cmath>
#include <limits>
#include <span>

namespace af {

/// The larger of two error measures, where NaN wins over everything and infinity over every number:
/// `worse(0.1, NaN)` and `worse(NaN, 0.1)` are both NaN.
constexpr double worse(double a, double b) {
  if (a != a) return a;  // NaN (constexpr-friendly std::isnan)
  if (b != b) return b;
  return a < b ? b : a;
}

/// A running worst error: starts at 0, and `add` keeps the worse of what it holds and the new error.
class WorstError {
 public:
  /// Adds one error measure (a NaN is kept for good).
  constexpr void add(double error) { worst_ = worse(worst_, error); }
  /// Adds |a - b| (NaN when either is NaN or both are the same infinity).
  void add_difference(double a, double b) { add(std::abs(a - b)); }
  constexpr double value() const { return worst_; }

 private:
  double worst_ = 0.0;
};

/// Largest |a[i] - b[i]|; NaN when any difference is NaN. Throws af::Error when the lengths differ.
double max_abs_diff(std::span<const float> a, std::span<const float> b);
double max_abs_diff(std::span<const float> a, std::span<const double> b);
double max_abs_diff(std::span<const double> a, std::span<const double> b);

/// Largest |x|; NaN when any value is NaN, infinity when any is infinite.
double max_abs(std::span<const float> values);
double max_abs(std::span<const double> values);

/// A tolerance relative to the size of the values compared: `tolerance * max(1, scale)`. A NaN or an
/// infinite scale gives a NaN or infinite tolerance, which `within_tolerance` never accepts.
constexpr double scaled_tolerance(double tolerance, double scale) { return tolerance * worse(1.0, scale); }

/// Whether `error <= tolerance` with both finite: NaN and infinity fail, on either side.
inline bool within_tolerance(double error, double tolerance) {
  return std::isfinite(error) && std::isfinite(tolerance) && error <= tolerance;
}

}  // namespace af
