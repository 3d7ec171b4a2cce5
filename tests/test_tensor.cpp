#include "af/error.hpp"
#include "af/random.hpp"
#include "af/tensor.hpp"

#include <catch2/catch.hpp>

using Catch::Matchers::Contains;

TEST_CASE("A shape knows its rank, sizes and element count", "[tensor]") {
  const af::Shape s{2, 3, 4};
  CHECK(s.rank() == 3);
  CHECK(s[0] == 2);
  CHECK(s[-1] == 4);
  CHECK(s.numel() == 24);
  CHECK(s.str() == "[2, 3, 4]");
  CHECK(af::Shape{}.numel() == 1);
}

TEST_CASE("Bad shapes are rejected with a message that names them", "[tensor][errors]") {
  CHECK_THROWS_WITH(af::Shape({2, -1}), Contains("dimension 1 is -1") && Contains("[2, -1]"));
  CHECK_THROWS_WITH(af::Shape({1, 2, 3, 4, 5}), Contains("rank 5"));
  CHECK_THROWS_WITH(af::Tensor(af::Shape{2, 3}, std::vector<float>(5)), Contains("5 values") && Contains("[2, 3]"));
  af::Tensor t(af::Shape{2, 3});
  CHECK_THROWS_WITH(t.at({2, 0}), Contains("index 2 on axis 0") && Contains("[2, 3]"));
  CHECK_THROWS_WITH(t.at({0}), Contains("1 indices"));
  CHECK_THROWS_WITH(t.reshaped(af::Shape{4, 2}), Contains("[2, 3]") && Contains("[4, 2]"));
  CHECK_THROWS_AS(af::Tensor(af::Shape{2, 3, 4}).matrix(), af::Error);
}

TEST_CASE("A head view reads one head of a [T, H, d] tensor without copying", "[tensor]") {
  af::Rng rng(7);
  af::Tensor x = af::random_normal(af::Shape{5, 3, 4}, rng);
  for (std::int64_t h = 0; h < 3; ++h) {
    const af::ConstMatrix view = af::head_view(std::as_const(x), h);
    CHECK(view.rows == 5);
    CHECK(view.cols == 4);
    for (std::int64_t t = 0; t < 5; ++t)
      for (std::int64_t c = 0; c < 4; ++c) CHECK(view(t, c) == x.at({t, h, c}));
  }
  af::head_view(x, 1)(2, 3) = 42.0f;
  CHECK(x.at({2, 1, 3}) == 42.0f);
  CHECK_THROWS_WITH(af::head_view(x, 3), Contains("head 3") && Contains("[5, 3, 4]"));
  const af::Tensor copy = af::to_tensor(af::head_view(std::as_const(x), 2));
  CHECK(copy.at({4, 1}) == x.at({4, 2, 1}));
}

TEST_CASE("max_abs_diff never calls a NaN small", "[tensor]") {
  const std::vector<float> a{1.0f, 2.0f}, b{1.0f, std::numeric_limits<float>::quiet_NaN()};
  CHECK(!(af::max_abs_diff(a, b) <= 1.0));
  CHECK(af::max_abs_diff(a, a) == 0.0);
}
