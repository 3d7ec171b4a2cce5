#include "af/compare.hpp"

#include "af/error.hpp"

namespace af {

namespace {
template <class A, class B>
double max_abs_diff_of(std::span<const A> a, std::span<const B> b) {
  require(a.size() == b.size(), "max_abs_diff: {} values against {} (expected equal lengths)", a.size(), b.size());
  WorstError worst;
  for (std::size_t i = 0; i < a.size(); ++i) worst.add_difference(static_cast<double>(a[i]), static_cast<double>(b[i]));
  return worst.value();
}

template <class T>
double max_abs_of(std::span<const T> values) {
  WorstError largest;
  for (const T v : values) largest.add(std::abs(static_cast<double>(v)));
  return largest.value();
}
}  // namespace

double max_abs_diff(std::span<const float> a, std::span<const float> b) { return max_abs_diff_of(a, b); }
double max_abs_diff(std::span<const float> a, std::span<const double> b) { return max_abs_diff_of(a, b); }
double max_abs_diff(std::span<const double> a, std::span<const double> b) { return max_abs_diff_of(a, b); }

double max_abs(std::span<const float> values) { return max_abs_of(values); }
double max_abs(std::span<const double> values) { return max_abs_of(values); }

}  // namespace af
