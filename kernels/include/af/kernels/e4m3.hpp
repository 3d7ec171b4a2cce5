#pragma once
/// @file e4m3.hpp
/// FP8 E4M3 codes to binary16 with integer operations only, for the FP8 decode kernel on GPUs without the
/// hardware conversion (PTX `cvt.rn.f16x2.e4m3x2` needs sm_89). Compiled by nvcc and by the C++ compiler, so
/// that the CPU tests check it against af::e4m3_to_float on all 256 codes.
///
/// An E4M3 code (sign, 4 exponent bits with bias 7, 3 mantissa bits) moved into a binary16 (5 exponent bits
/// with bias 15, 10 mantissa bits) with its exponent and mantissa bits unchanged is the code's value times
/// 2^(7 - 15) = 1/256, exactly: normal codes stay normal, and the subnormal codes (exponent 0, multiples of
/// 2^-9) become binary16 subnormals (multiples of 2^-17, well above binary16's 2^-24). The 256 is folded into
/// the row's scale. The NaN code S.1111.111 becomes 1.875 x 2^0 (480 after the 256): a cache written with a
/// saturating conversion never holds it.

#include <cstdint>

#if defined(__CUDACC__)
#define AF_HOST_DEVICE __host__ __device__
#else
#define AF_HOST_DEVICE
#endif

namespace af::kernels {

/// The E4M3 value times 256 that e4m3x2_to_f16x2 leaves out.
inline constexpr float e4m3_f16_factor = 256.0f;

// [e4m3-to-f16]
/// The two binary16 bit patterns (low half from the low byte) of the two E4M3 codes in the low 16 bits of
/// `pair`, each equal to the code's value / 256.
AF_HOST_DEVICE constexpr std::uint32_t e4m3x2_to_f16x2(std::uint32_t pair) {
  return ((pair & 0x007Fu) << 7) | ((pair & 0x0080u) << 8)       // code 0: magnitude to bits 7-13, sign to 15
         | ((pair & 0x7F00u) << 15) | ((pair & 0x8000u) << 16);  // code 1: to bits 23-29 and 31
}
// [/e4m3-to-f16]

}  // namespace af::kernels
