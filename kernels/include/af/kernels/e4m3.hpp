#pragma once
/// @file e4m3.hpp
/// FP8 E4M3 codes to binary16 with integer operations only, for the FP8 decode kernel on GPUs without the
/// hardware conversion (PTX `cvt.rn.f16x2.e4m3x2` needs sm_89), and to bf16 exactly, for the tensor-core
/// paged decode (decode_paged_mma.cu). Compiled by nvcc and by the C++ compiler, so
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

// [paged-mma-fp8-convert]
/// The bf16 bit pattern of one E4M3 code (the low 8 bits of `code`), equal to the code's value exactly, for the
/// tensor-core paged decode (mma takes bf16). bf16 has 7 mantissa bits and E4M3 3, and bf16's exponent range
/// (bias 127) holds every E4M3 value, subnormals included, as a normal bf16 (OCP 8-bit floating point
/// specification, E4M3: bias 7, subnormals m x 2^-9): no rounding anywhere.
///   normal codes (exponent bits e = 1..15): sign << 15 | (e + 120) << 7 | mantissa << 4, that is the 7
///     magnitude bits shifted left by 4 plus 120 << 7 = 0x3C00;
///   subnormal codes (e = 0, mantissa m = 1..7, value m x 2^-9): normalised by a table of 8 nibbles, one per
///     m, in one 32-bit constant: the bf16 magnitude is 0x3B00 (2^-9) + nibble x 0x20, i.e. 2^-9, 2^-8,
///     1.5 x 2^-8, 2^-7, 1.25 x 2^-7, 1.5 x 2^-7, 1.75 x 2^-7 for m = 1..7; m = 0 (+-0) stays 0.
/// The NaN codes S.1111.111 become +-480 (the normal rule): a cache written with a saturating conversion never
/// holds them. Integer operations only, the same on the host and the device (the CPU tests check all 256 codes).
AF_HOST_DEVICE constexpr std::uint32_t e4m3_to_bf16(std::uint32_t code) {
  const std::uint32_t magnitude = code & 0x7Fu, sign = (code & 0x80u) << 8;
  const std::uint32_t nibble = (0xBA986400u >> (4 * (magnitude & 7u))) & 0xFu;
  const std::uint32_t subnormal = magnitude == 0 ? 0u : 0x3B00u + (nibble << 5);
  return sign | (magnitude >= 8 ? (magnitude << 4) + 0x3C00u : subnormal);
}

/// Two codes (the low 16 bits of `pair`, the first in the low byte) as two bf16 in one word, the first in the
/// low half: the layout of an mma operand register.
AF_HOST_DEVICE constexpr std::uint32_t e4m3x2_to_bf16x2(std::uint32_t pair) {
  return e4m3_to_bf16(pair & 0xFFu) | (e4m3_to_bf16((pair >> 8) & 0xFFu) << 16);
}
// [/paged-mma-fp8-convert]

}  // namespace af::kernels
