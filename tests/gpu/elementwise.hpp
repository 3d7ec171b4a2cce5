#pragma once
// Element-wise comparison of a GPU output with its float64 reference, for the GPU tests: every element must
// satisfy |got - expected| <= atol + rtol * |expected|, and a NaN or an infinity in `got` fails. One wrong
// element among thousands fails the test, which a norm over the whole output would let through.
#include "af/compare.hpp"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <functional>
#include <iomanip>
#include <limits>
#include <span>
#include <sstream>
#include <string>

namespace af_test {

struct Tolerance {
  double atol = 0.0;  ///< the absolute part (> 0): what rounding leaves where the expected value is near 0
  double rtol = 0.0;  ///< the relative part: what rounding leaves in proportion to the expected value

  double bound(double expected) const { return atol + rtol * std::abs(expected); }
};

/// What `compare_elementwise` found. `failures` counts the elements outside their bound (NaN and infinity
/// included); `message` names the first of them (where, got, expected, the bound) and the worst ratio of
/// error to bound over the whole output (NaN when an element is NaN); it is empty when every element passed.
struct ElementwiseReport {
  std::size_t failures = 0;
  double worst_ratio = 0.0;
  std::string message;
};

/// Compares `got` with `expected` element by element; `where(i)` names element i ("batch 1, head 3, channel
/// 17") in the message.
inline ElementwiseReport compare_elementwise(std::span<const float> got, std::span<const double> expected,
                                             Tolerance tolerance,
                                             const std::function<std::string(std::size_t)>& where) {
  ElementwiseReport report;
  if (got.size() != expected.size()) {
    report.failures = std::max(got.size(), expected.size());
    report.worst_ratio = std::numeric_limits<double>::infinity();
    report.message = "got " + std::to_string(got.size()) + " elements, expected " + std::to_string(expected.size());
    return report;
  }
  af::WorstError worst_ratio;
  std::ostringstream first;
  for (std::size_t i = 0; i < got.size(); ++i) {
    const double error = std::abs(static_cast<double>(got[i]) - expected[i]);  // NaN when got[i] is NaN
    const double bound = tolerance.bound(expected[i]);
    worst_ratio.add(error / bound);                    // atol > 0: the bound is never 0
    if (af::within_tolerance(error, bound)) continue;  // a NaN or infinite error never is
    if (report.failures++ == 0)
      first << std::setprecision(6) << "element (" << where(i) << "): got " << got[i] << ", expected " << expected[i]
            << ", |got - expected| " << error << " > bound " << bound << " (atol " << tolerance.atol << " + rtol "
            << tolerance.rtol << " * |expected|)";
  }
  report.worst_ratio = worst_ratio.value();
  if (report.failures > 0)
    report.message = first.str() + "; " + std::to_string(report.failures) + " of " + std::to_string(got.size()) +
                     " elements outside their bound; worst |got - expected| / bound " +
                     std::to_string(report.worst_ratio);
  return report;
}

}  // namespace af_test
