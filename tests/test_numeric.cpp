#include "af/numeric.hpp"

#include <catch2/catch.hpp>

#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>

namespace {
// Every pair of neighbouring positive finite values of a 16-bit format must round as the spec says: the
// midpoint goes to the even pattern, anything nudged off it to the nearer side, and each value to itself.
template <class ToBits, class ToFloat>
void check_rounding_between_neighbours(std::uint16_t first_infinity, ToBits to_bits, ToFloat to_float) {
  for (std::uint32_t bits = 0; bits + 1 < first_infinity; ++bits) {
    const float low = to_float(static_cast<std::uint16_t>(bits));
    const float high = to_float(static_cast<std::uint16_t>(bits + 1));
    const float middle = low + (high - low) / 2;  // exact in float32 for both formats
    REQUIRE(to_bits(low) == bits);
    REQUIRE(to_bits(-low) == (bits | 0x8000u));
    REQUIRE(to_bits(middle) == ((bits % 2 == 0) ? bits : bits + 1));
    REQUIRE(to_bits(std::nextafter(middle, 0.0f)) == bits);
    REQUIRE(to_bits(std::nextafter(middle, high)) == bits + 1);
  }
}
}  // namespace

TEST_CASE("bf16 rounds to nearest, ties to even, over every pair of neighbours", "[numeric]") {
  check_rounding_between_neighbours(0x7F80, af::bf16_bits, af::bf16_to_float);
  CHECK(af::bf16_bits(1.0f) == 0x3F80);
  CHECK(af::bf16_bits(std::numeric_limits<float>::max()) == 0x7F80);  // rounds up to infinity
  CHECK(af::bf16_bits(-std::numeric_limits<float>::infinity()) == 0xFF80);
  CHECK(std::isnan(af::round_to_bf16(std::numeric_limits<float>::quiet_NaN())));
  CHECK(std::isnan(af::bf16_to_float(af::bf16_bits(std::bit_cast<float>(0x7F800001u)))));  // a NaN stays a NaN
  CHECK(af::round_to_bf16(1.0f + 0x1.0p-8f) == 1.0f);
  CHECK(af::round_to_bf16(1.0f + 0x1.8p-8f) == 1.0f + 0x1.0p-7f);
}

TEST_CASE("fp16 rounds to nearest, ties to even, subnormals and overflow included", "[numeric]") {
  check_rounding_between_neighbours(0x7C00, af::fp16_bits, af::fp16_to_float);
  CHECK(af::fp16_bits(1.0f) == 0x3C00);
  CHECK(af::fp16_bits(65504.0f) == 0x7BFF);
  CHECK(af::fp16_bits(65519.0f) == 0x7BFF);
  CHECK(af::fp16_bits(65520.0f) == 0x7C00);  // the midpoint to the next (absent) value rounds to infinity
  CHECK(af::fp16_bits(0x1.0p-24f) == 0x0001);
  CHECK(af::fp16_bits(0x1.0p-25f) == 0x0000);  // tie, to even
  CHECK(af::fp16_bits(0x1.8p-24f) == 0x0002);  // tie, to even
  CHECK(af::fp16_bits(0x1.0p-26f) == 0x0000);
  CHECK(af::fp16_bits(1.0f / 3.0f) == 0x3555);
  CHECK(af::fp16_bits(-0.0f) == 0x8000);
  CHECK(af::fp16_bits(std::bit_cast<float>(1u)) == 0x0000);  // the smallest float32 subnormal
  CHECK(std::isnan(af::round_to_fp16(std::numeric_limits<float>::quiet_NaN())));
  CHECK(af::fp16_to_float(0x7C00) == std::numeric_limits<float>::infinity());
}

TEST_CASE("Element sizes of the storage types", "[numeric]") {
  CHECK(af::bytes_of(af::DType::f32) == 4);
  CHECK(af::bytes_of(af::DType::bf16) == 2);
  CHECK(af::bytes_of(af::DType::fp8_e4m3) == 1);
  CHECK(af::name_of(af::DType::bf16) == "bf16");
}
