#pragma once
/// @file quantized_cache.hpp
/// Quantized KV caches (chapter 05): FP8 E4M3 rounding, and keys or values `[T, G * d]` stored as INT8 or FP8
/// codes with float32 scales, then read back. What a stored block costs in bytes counts the scales too.

#include "af/accounting.hpp"
#include "af/tensor.hpp"

#include <cstdint>
#include <string_view>
#include <vector>

namespace af {

/// The FP8 E4M3 bit pattern nearest to `value` (ties to even): 1 sign bit, 4 exponent bits with bias 7,
/// 3 mantissa bits; subnormals at exponent field 0 (multiples of 2^-9); no infinities; S.1111.111 is NaN, so
/// the largest finite magnitude is 1.75 x 2^8 = 448. NaN gives NaN; magnitudes beyond 448 (infinities too)
/// saturate to +-448, as a saturating conversion (PTX `cvt.rn.satfinite`) does.
std::uint8_t e4m3_bits(float value);
/// The float32 value of an E4M3 bit pattern (exact; NaN for S.1111.111).
float e4m3_to_float(std::uint8_t bits);
/// `value` rounded to the nearest E4M3 value, returned as float32.
float round_to_e4m3(float value);

/// How a cache stores the keys or the values of its tokens.
enum class KvFormat {
  f32,           ///< float32, exact
  bf16,          ///< bf16, rounded to nearest
  int8_token,    ///< INT8 codes, one float32 scale per token and KV head (amax of its d values / 127)
  int8_channel,  ///< INT8 codes, one float32 scale per channel and KV head for each block of tokens (amax of the
                 ///< block's values in that channel / 127); the last, incomplete block stays float32 until full
  fp8_token,     ///< FP8 E4M3 codes, one float32 scale per token and KV head (amax of its d values / 448)
};

std::string_view name_of(KvFormat format);

/// Rows of keys or values `[T, G * d]` as a cache stores them.
struct QuantizedRows {
  KvFormat format = KvFormat::f32;
  std::int64_t rows = 0, kv_heads = 0, head_dim = 0;
  std::int64_t block = 0;             ///< tokens per scale block (int8_channel)
  std::vector<std::uint8_t> payload;  ///< the codes (or float bit patterns), row after row
  std::vector<float> scales;

  /// Bytes stored: the payload plus 4 per scale.
  std::int64_t bytes() const;
};

/// Stores `x [T, G * d]` (G = `kv_heads`) in `format`; `block` is the token block of int8_channel.
/// Throws af::Error when the width is not a multiple of kv_heads, or block < 1.
QuantizedRows quantize_rows(ConstMatrix x, std::int64_t kv_heads, KvFormat format, std::int64_t block = 32);
/// The values a reader of the cache gets back, `[T, G * d]`.
Tensor dequantize_rows(const QuantizedRows& stored);

/// The cache card of a grouped layer whose keys and values are stored in the given formats, scales counted:
/// per token and layer, codes `[G, d]` and, for int8_token and fp8_token, scales `[G]` in f32; for
/// int8_channel, scales `[G, d / block]` in f32 (one per channel per block, amortised over the block's
/// tokens; needs d divisible by block). Throws af::Error on bad sizes.
CacheCard quantized_kv_card(std::int64_t heads, std::int64_t kv_heads, std::int64_t head_dim, KvFormat keys,
                            KvFormat values, std::int64_t block = 32);

}  // namespace af
