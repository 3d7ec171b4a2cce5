#include "af/numeric.hpp"

#include <bit>
#include <cmath>

namespace af {

int bytes_of(DType dtype) {
  switch (dtype) {
    case DType::f64:
    case DType::i64:
      return 8;
    case DType::f32:
    case DType::i32:
      return 4;
    case DType::f16:
    case DType::bf16:
      return 2;
    case DType::fp8_e4m3:
    case DType::int8:
      return 1;
  }
  return 0;
}

std::string_view name_of(DType dtype) {
  switch (dtype) {
    case DType::f64:
      return "f64";
    case DType::f32:
      return "f32";
    case DType::f16:
      return "f16";
    case DType::bf16:
      return "bf16";
    case DType::fp8_e4m3:
      return "fp8_e4m3";
    case DType::int8:
      return "int8";
    case DType::i64:
      return "i64";
    case DType::i32:
      return "i32";
  }
  return "?";
}

namespace {
// Shifts `value` right by `shift` bits, rounding to nearest with ties to even.
std::uint32_t shift_right_round_even(std::uint32_t value, int shift) {
  if (shift == 0) return value;
  if (shift > 31) return 0;
  const std::uint32_t quotient = value >> shift;
  const std::uint32_t remainder = value & ((1u << shift) - 1u);
  const std::uint32_t half = 1u << (shift - 1);
  return quotient + ((remainder > half || (remainder == half && (quotient & 1u))) ? 1u : 0u);
}
}  // namespace

std::uint16_t bf16_bits(float value) {
  const auto bits = std::bit_cast<std::uint32_t>(value);
  if (std::isnan(value)) return static_cast<std::uint16_t>((bits >> 16) | 0x0040u);  // stays a (quiet) NaN
  // The top 16 bits of a float32 are a bf16; rounding may carry into the exponent, which is right
  // (and turns the largest finite values into infinity).
  return static_cast<std::uint16_t>(shift_right_round_even(bits & 0x7FFFFFFFu, 16) | ((bits >> 16) & 0x8000u));
}

float bf16_to_float(std::uint16_t bits) { return std::bit_cast<float>(static_cast<std::uint32_t>(bits) << 16); }

float round_to_bf16(float value) { return bf16_to_float(bf16_bits(value)); }

std::uint16_t fp16_bits(float value) {
  const auto bits = std::bit_cast<std::uint32_t>(value);
  const std::uint32_t sign = (bits >> 16) & 0x8000u;
  const std::uint32_t magnitude = bits & 0x7FFFFFFFu;
  if (magnitude >= 0x7F800000u) return static_cast<std::uint16_t>(sign | (magnitude > 0x7F800000u ? 0x7E00u : 0x7C00u));
  const int exponent = static_cast<int>(magnitude >> 23) - 127;
  const std::uint32_t mantissa = magnitude & 0x7FFFFFu;
  if (exponent > 15) return static_cast<std::uint16_t>(sign | 0x7C00u);
  if (exponent >= -14) {  // normal in binary16; a carry out of the mantissa moves into the exponent
    const std::uint32_t packed = (static_cast<std::uint32_t>(exponent + 15) << 23) | mantissa;
    return static_cast<std::uint16_t>(sign | shift_right_round_even(packed, 13));
  }
  if (magnitude == 0) return static_cast<std::uint16_t>(sign);
  // Subnormal in binary16: count units of 2^-24. The float32 value is (2^23 + mantissa) * 2^(exponent - 23)
  // (float32 subnormals are far below 2^-25 and round to zero here).
  const std::uint32_t significand = (exponent == -127) ? 0u : (mantissa | 0x800000u);
  return static_cast<std::uint16_t>(sign | shift_right_round_even(significand, -exponent - 1));
}

float fp16_to_float(std::uint16_t bits) {
  const std::uint32_t sign = static_cast<std::uint32_t>(bits & 0x8000u) << 16;
  const std::uint32_t exponent = (bits >> 10) & 0x1Fu;
  const std::uint32_t mantissa = bits & 0x3FFu;
  if (exponent == 0x1F) return std::bit_cast<float>(sign | 0x7F800000u | (mantissa << 13));
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24, exact in float32
    const float magnitude = std::ldexp(static_cast<float>(mantissa), -24);
    return sign ? -magnitude : magnitude;
  }
  return std::bit_cast<float>(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

float round_to_fp16(float value) { return fp16_to_float(fp16_bits(value)); }

}  // namespace af
