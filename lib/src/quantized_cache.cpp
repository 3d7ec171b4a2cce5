#include "af/quantized_cache.hpp"

#include "af/error.hpp"
#include "af/numeric.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <limits>

namespace af {

namespace {
// `value` shifted right by `shift` bits, rounding to nearest with ties to even.
std::uint32_t shift_right_round_even(std::uint32_t value, int shift) {
  if (shift == 0) return value;
  if (shift > 31) return 0;
  const std::uint32_t quotient = value >> shift, remainder = value & ((1u << shift) - 1u), half = 1u << (shift - 1);
  return quotient + ((remainder > half || (remainder == half && (quotient & 1u))) ? 1u : 0u);
}
}  // namespace

std::uint8_t e4m3_bits(float value) {
  const auto bits = std::bit_cast<std::uint32_t>(value);
  const auto sign = static_cast<std::uint8_t>((bits >> 24) & 0x80u);
  if (std::isnan(value)) return sign | 0x7Fu;
  const std::uint32_t magnitude = bits & 0x7FFFFFFFu;
  if (magnitude >= std::bit_cast<std::uint32_t>(448.0f)) return sign | 0x7Eu;  // saturate (and infinities)
  const int exponent = static_cast<int>(magnitude >> 23) - 127;
  const std::uint32_t mantissa = magnitude & 0x7FFFFFu;
  if (exponent >= -6) {  // normal in E4M3: keep 3 of the 23 mantissa bits; a carry moves into the exponent
    const std::uint32_t packed = (static_cast<std::uint32_t>(exponent + 7) << 23) | mantissa;
    return sign | static_cast<std::uint8_t>(shift_right_round_even(packed, 20));
  }
  // Subnormal in E4M3: count units of 2^-9. The value is (2^23 + mantissa) * 2^(exponent - 23); float32
  // subnormals are far below 2^-10 and round to zero.
  const std::uint32_t significand = exponent == -127 ? 0u : (mantissa | 0x800000u);
  return sign | static_cast<std::uint8_t>(shift_right_round_even(significand, 14 - exponent));
}

float e4m3_to_float(std::uint8_t bits) {
  const int exponent = (bits >> 3) & 0xF, mantissa = bits & 0x7;
  if (exponent == 0xF && mantissa == 0x7) return std::numeric_limits<float>::quiet_NaN();
  const float magnitude = exponent == 0 ? std::ldexp(static_cast<float>(mantissa), -9)
                                        : std::ldexp(static_cast<float>(8 + mantissa), exponent - 10);
  return (bits & 0x80u) ? -magnitude : magnitude;
}

float round_to_e4m3(float value) { return e4m3_to_float(e4m3_bits(value)); }

std::string_view name_of(KvFormat format) {
  switch (format) {
    case KvFormat::f32:
      return "f32";
    case KvFormat::bf16:
      return "bf16";
    case KvFormat::int8_token:
      return "int8/token";
    case KvFormat::int8_channel:
      return "int8/channel";
    case KvFormat::fp8_token:
      return "fp8 e4m3/token";
  }
  return "?";
}

std::int64_t QuantizedRows::bytes() const {
  return static_cast<std::int64_t>(payload.size()) + 4 * static_cast<std::int64_t>(scales.size());
}

namespace {
std::int8_t int8_code(float x, float scale) {
  return static_cast<std::int8_t>(std::clamp(std::nearbyint(x / scale), -127.0f, 127.0f));
}
void put_f32(std::vector<std::uint8_t>& payload, float x) {
  const auto b = std::bit_cast<std::uint32_t>(x);
  for (int i = 0; i < 4; ++i) payload.push_back(static_cast<std::uint8_t>(b >> (8 * i)));
}
float get_f32(const std::uint8_t* p) {
  std::uint32_t b = 0;
  for (int i = 0; i < 4; ++i) b |= static_cast<std::uint32_t>(p[i]) << (8 * i);
  return std::bit_cast<float>(b);
}
// Rows stored float32 at the end of an int8_channel payload: those past the last complete block.
std::int64_t full_blocks(const QuantizedRows& s) { return s.rows / s.block; }
}  // namespace

QuantizedRows quantize_rows(ConstMatrix x, std::int64_t kv_heads, KvFormat format, std::int64_t block) {
  require(kv_heads > 0 && x.cols % kv_heads == 0 && x.cols > 0,
          "quantize_rows: width {} over {} KV heads (expected a positive multiple of the KV heads)", x.cols, kv_heads);
  require(block >= 1, "quantize_rows: block of {} tokens (expected >= 1)", block);
  QuantizedRows s{format, x.rows, kv_heads, x.cols / kv_heads, block, {}, {}};
  const std::int64_t d = s.head_dim;
  switch (format) {
    case KvFormat::f32:
      for (std::int64_t t = 0; t < x.rows; ++t)
        for (float v : x.row(t)) put_f32(s.payload, v);
      break;
    case KvFormat::bf16:
      for (std::int64_t t = 0; t < x.rows; ++t)
        for (float v : x.row(t)) {
          const std::uint16_t b = bf16_bits(v);
          s.payload.push_back(static_cast<std::uint8_t>(b & 0xFFu));
          s.payload.push_back(static_cast<std::uint8_t>(b >> 8));
        }
      break;
    case KvFormat::int8_token:
    case KvFormat::fp8_token: {
      const float top = format == KvFormat::int8_token ? 127.0f : 448.0f;
      for (std::int64_t t = 0; t < x.rows; ++t)
        for (std::int64_t g = 0; g < kv_heads; ++g) {
          const std::span<const float> head =
              x.row(t).subspan(static_cast<std::size_t>(g * d), static_cast<std::size_t>(d));
          float amax = 0.0f;
          for (float v : head) amax = std::max(amax, std::abs(v));
          const float scale = amax > 0.0f ? amax / top : 1.0f;
          s.scales.push_back(scale);
          for (float v : head)
            s.payload.push_back(format == KvFormat::int8_token ? static_cast<std::uint8_t>(int8_code(v, scale))
                                                               : e4m3_bits(v / scale));
        }
      break;
    }
    case KvFormat::int8_channel: {
      const std::int64_t blocks = x.rows / block;
      for (std::int64_t b = 0; b < blocks; ++b) {
        std::vector<float> scale(static_cast<std::size_t>(x.cols), 0.0f);
        for (std::int64_t t = b * block; t < (b + 1) * block; ++t)
          for (std::int64_t c = 0; c < x.cols; ++c)
            scale[static_cast<std::size_t>(c)] = std::max(scale[static_cast<std::size_t>(c)], std::abs(x(t, c)));
        for (float& v : scale) v = v > 0.0f ? v / 127.0f : 1.0f;
        s.scales.insert(s.scales.end(), scale.begin(), scale.end());
        for (std::int64_t t = b * block; t < (b + 1) * block; ++t)
          for (std::int64_t c = 0; c < x.cols; ++c)
            s.payload.push_back(static_cast<std::uint8_t>(int8_code(x(t, c), scale[static_cast<std::size_t>(c)])));
      }
      for (std::int64_t t = blocks * block; t < x.rows; ++t)
        for (float v : x.row(t)) put_f32(s.payload, v);
      break;
    }
  }
  return s;
}

Tensor dequantize_rows(const QuantizedRows& s) {
  const std::int64_t width = s.kv_heads * s.head_dim;
  Tensor out(Shape{s.rows, width});
  float* o = out.data();
  const std::uint8_t* p = s.payload.data();
  switch (s.format) {
    case KvFormat::f32:
      for (std::int64_t i = 0; i < s.rows * width; ++i) o[i] = get_f32(p + 4 * i);
      break;
    case KvFormat::bf16:
      for (std::int64_t i = 0; i < s.rows * width; ++i)
        o[i] = bf16_to_float(static_cast<std::uint16_t>(p[2 * i] | (p[2 * i + 1] << 8)));
      break;
    case KvFormat::int8_token:
    case KvFormat::fp8_token:
      for (std::int64_t i = 0; i < s.rows * width; ++i) {
        const float scale = s.scales[static_cast<std::size_t>(i / s.head_dim)];
        o[i] = (s.format == KvFormat::int8_token ? static_cast<float>(static_cast<std::int8_t>(p[i]))
                                                 : e4m3_to_float(p[i])) *
               scale;
      }
      break;
    case KvFormat::int8_channel: {
      const std::int64_t quantized = full_blocks(s) * s.block * width;
      for (std::int64_t i = 0; i < quantized; ++i) {
        const std::int64_t block = i / (s.block * width), c = i % width;
        o[i] =
            static_cast<float>(static_cast<std::int8_t>(p[i])) * s.scales[static_cast<std::size_t>(block * width + c)];
      }
      for (std::int64_t i = quantized; i < s.rows * width; ++i) o[i] = get_f32(p + quantized + 4 * (i - quantized));
      break;
    }
  }
  return out;
}

CacheCard quantized_kv_card(std::int64_t heads, std::int64_t kv_heads, std::int64_t head_dim, KvFormat keys,
                            KvFormat values, std::int64_t block) {
  CacheCard card = dense_kv_card(fmt::format("KV cache, keys {}, values {}", name_of(keys), name_of(values)), heads,
                                 kv_heads, head_dim, DType::f32);
  card.per_token.clear();
  for (const auto& [name, format] : {std::pair{std::string("K"), keys}, std::pair{std::string("V"), values}}) {
    switch (format) {
      case KvFormat::f32:
      case KvFormat::bf16:
        card.per_token.push_back({name, {kv_heads, head_dim}, format == KvFormat::f32 ? DType::f32 : DType::bf16, 0});
        break;
      case KvFormat::int8_token:
      case KvFormat::fp8_token:
        card.per_token.push_back(
            {name, {kv_heads, head_dim}, format == KvFormat::int8_token ? DType::int8 : DType::fp8_e4m3, 0});
        card.per_token.push_back({name + " scales", {kv_heads}, DType::f32, 0});
        break;
      case KvFormat::int8_channel:
        require(block >= 1 && head_dim % block == 0,
                "quantized_kv_card: head_dim {} and a block of {} tokens (expected the block to divide head_dim)",
                head_dim, block);
        card.per_token.push_back({name, {kv_heads, head_dim}, DType::int8, 0});
        card.per_token.push_back({name + " scales", {kv_heads, head_dim / block}, DType::f32, 0});
        break;
    }
  }
  const std::int64_t per_token = card.bytes_per_token();
  const double flops_per_entry = 4.0 * static_cast<double>(heads * head_dim);  // as dense; dequantizing not counted
  card.decode_reads = [per_token, flops_per_entry](std::int64_t t) {
    return std::vector<DecodeRead>{
        {"every cached code and scale", t, t * per_token, static_cast<double>(t) * flops_per_entry}};
  };
  card.trade_offs =
      "fewer bytes stored and read per token; a quantization error in every score and output; a dequantize per "
      "element read";
  return card;
}

}  // namespace af
