// The error reductions every check goes through (af/compare.hpp) and the Checks object: a NaN or an infinity
// is never small, wherever it sits among the values.
#include "af/compare.hpp"
#include "af/error.hpp"
#include "af/program.hpp"
#include "af/tensor.hpp"

#include <catch2/catch.hpp>

#include <cstdlib>
#include <limits>
#include <vector>

namespace {
constexpr double nan64 = std::numeric_limits<double>::quiet_NaN();
constexpr double inf64 = std::numeric_limits<double>::infinity();
constexpr float nan32 = std::numeric_limits<float>::quiet_NaN();
constexpr float inf32 = std::numeric_limits<float>::infinity();

// Sets AF_PERTURB_CHECK for one scope and unsets it at the end.
struct PerturbSwitch {
  explicit PerturbSwitch(const char* value) { ::setenv("AF_PERTURB_CHECK", value, 1); }
  ~PerturbSwitch() { ::unsetenv("AF_PERTURB_CHECK"); }
};
}  // namespace

TEST_CASE("worse keeps a NaN from either side and lets infinity win", "[compare]") {
  CHECK(std::isnan(af::worse(0.5, nan64)));
  CHECK(std::isnan(af::worse(nan64, 0.5)));
  CHECK(af::worse(0.5, inf64) == inf64);
  CHECK(af::worse(0.25, 0.5) == 0.5);
  CHECK(af::worse(0.5, 0.25) == 0.5);
}

TEST_CASE("WorstError remembers a NaN however many finite errors follow", "[compare]") {
  af::WorstError worst;
  worst.add(0.1);
  worst.add(nan64);
  for (int i = 0; i < 10; ++i) worst.add(1e-3 * i);
  CHECK(std::isnan(worst.value()));
  af::WorstError same_infinities;
  same_infinities.add_difference(inf64, inf64);  // inf - inf is NaN: two infinite outputs do not agree
  CHECK(std::isnan(same_infinities.value()));
}

TEST_CASE("max_abs_diff and max_abs see a NaN or infinity at every position", "[compare]") {
  for (std::size_t n : {1u, 2u, 7u})
    for (std::size_t at = 0; at < n; ++at) {
      CAPTURE(n, at);
      std::vector<float> a(n, 1.0f), b(n, 1.0f);
      std::vector<double> b64(n, 1.0);
      CHECK(af::max_abs_diff(a, b) == 0.0);
      b[at] = nan32;
      b64[at] = nan64;
      CHECK(std::isnan(af::max_abs_diff(a, b)));
      CHECK(std::isnan(af::max_abs_diff(b, a)));
      CHECK(std::isnan(af::max_abs_diff(std::span<const float>(a), std::span<const double>(b64))));
      CHECK(std::isnan(af::max_abs_diff(std::span<const double>(b64), std::span<const double>(std::vector<double>(n)))));
      CHECK(std::isnan(af::max_abs(b)));
      CHECK(std::isnan(af::max_abs(std::span<const double>(b64))));
      const af::Tensor ta(af::Shape{1, static_cast<std::int64_t>(n)}, a), tb(af::Shape{1, static_cast<std::int64_t>(n)}, b);
      CHECK(std::isnan(af::max_abs_diff(ta.matrix(), tb.matrix())));
      b[at] = inf32;
      CHECK(af::max_abs_diff(a, b) == inf64);
      CHECK(af::max_abs(b) == inf64);
    }
  const std::vector<float> three(3), four(4);
  CHECK_THROWS_AS(af::max_abs_diff(three, four), af::Error);
}

TEST_CASE("within_tolerance passes only a finite error under a finite tolerance", "[compare]") {
  CHECK(af::within_tolerance(1e-6, 1e-5));
  CHECK(af::within_tolerance(0.0, 0.0));
  CHECK_FALSE(af::within_tolerance(2e-5, 1e-5));
  CHECK_FALSE(af::within_tolerance(nan64, 1e-5));
  CHECK_FALSE(af::within_tolerance(inf64, inf64));
  CHECK_FALSE(af::within_tolerance(1e-6, inf64));  // a tolerance scaled by an infinite output accepts nothing
  CHECK_FALSE(af::within_tolerance(1e-6, nan64));
  CHECK(af::scaled_tolerance(1e-5, 0.5) == 1e-5);
  CHECK(af::scaled_tolerance(1e-5, 4.0) == 4e-5);
  CHECK(std::isnan(af::scaled_tolerance(1e-5, nan64)));
  CHECK_FALSE(af::within_tolerance(0.0, af::scaled_tolerance(1e-5, af::max_abs(std::vector<float>{1.0f, nan32}))));
}

TEST_CASE("Checks fails a NaN or infinite error or tolerance and counts each failure", "[compare][checks]") {
  af::Checks checks;
  CHECK(checks.expect_close("finite and small", 1e-7, 1e-6));
  CHECK(checks.all_passed());
  CHECK_FALSE(checks.expect_close("NaN error", nan64, 1e-6));
  CHECK_FALSE(checks.expect_close("infinite error", inf64, 1e-6));
  CHECK_FALSE(checks.expect_close("infinite tolerance", 0.0, inf64));
  CHECK_FALSE(checks.expect_true("false condition", false));
  CHECK(checks.failures() == 4);
  CHECK_FALSE(checks.all_passed());
}

TEST_CASE("AF_PERTURB_CHECK fails exactly the checks it names", "[compare][checks]") {
  {
    const PerturbSwitch named("decode vs prefill");
    af::Checks checks;
    CHECK(checks.expect_close("prefill vs float64", 0.0, 1e-6));
    CHECK_FALSE(checks.expect_close("decode vs prefill", 0.0, 1e-6));
    CHECK_FALSE(checks.expect_true("decode vs prefill, exact", true));
    CHECK(checks.failures() == 2);
  }
  {
    const PerturbSwitch every("*");
    af::Checks checks;
    CHECK_FALSE(checks.expect_true("anything", true));
  }
  af::Checks unperturbed;
  CHECK(unperturbed.expect_true("anything", true));
}
