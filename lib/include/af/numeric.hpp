#pragma once
/// @file numeric.hpp
/// Storage number formats: element types with their sizes, and rounding float32 to bf16 and fp16
/// (round to nearest, ties to even; infinities and NaN kept) as a cache or a checkpoint stores them.

#include <cstdint>
#include <string_view>

namespace af {

/// The element types a cache or a tensor file may hold.
enum class DType { f64, f32, f16, bf16, fp8_e4m3, int8, i64, i32 };

/// Bytes per element.
int bytes_of(DType dtype);
/// A short name: "f32", "bf16", "fp8_e4m3", ...
std::string_view name_of(DType dtype);

/// The bf16 bit pattern nearest to `value` (ties to even).
std::uint16_t bf16_bits(float value);
/// The float32 value of a bf16 bit pattern (exact).
float bf16_to_float(std::uint16_t bits);
/// `value` rounded to the nearest bf16, returned as float32.
float round_to_bf16(float value);

/// The IEEE binary16 bit pattern nearest to `value` (ties to even, subnormals kept, overflow to infinity).
std::uint16_t fp16_bits(float value);
/// The float32 value of a binary16 bit pattern (exact).
float fp16_to_float(std::uint16_t bits);
/// `value` rounded to the nearest binary16, returned as float32.
float round_to_fp16(float value);

}  // namespace af
