// Chapter 05's quantized caches: FP8 E4M3 rounding against the enumeration of its 256 codes, INT8/FP8 storage
// with scales, and the bytes they take.
#include "af/error.hpp"
#include "af/numeric.hpp"
#include "af/quantized_cache.hpp"
#include "af/random.hpp"

#include <catch2/catch.hpp>

#include <bit>
#include <cmath>
#include <limits>
#include <vector>

namespace {
// The value of E4M3 code c from its definition: (-1)^s x 2^(e - 7) x 1.m, or 2^-6 x 0.m when e = 0; NaN for
// S.1111.111.
double e4m3_value(int c) {
  const int s = c >> 7, e = (c >> 3) & 15, m = c & 7;
  if (e == 15 && m == 7) return std::numeric_limits<double>::quiet_NaN();
  const double magnitude = e == 0 ? std::ldexp(m / 8.0, -6) : std::ldexp(1.0 + m / 8.0, e - 7);
  return s ? -magnitude : magnitude;
}

// The code nearest to x by search over all finite codes; ties go to the code with an even mantissa.
int nearest_code(double x) {
  int best = -1;
  for (int c = 0; c < 256; ++c) {
    const double v = e4m3_value(c);
    if (std::isnan(v) || (v == 0.0 && std::signbit(v) != std::signbit(x))) continue;
    if (best < 0) {
      best = c;
      continue;
    }
    const double dc = std::abs(v - x), db = std::abs(e4m3_value(best) - x);
    if (dc < db || (dc == db && (c & 1) == 0 && (best & 1) == 1)) best = c;
  }
  return best;
}
}  // namespace

TEST_CASE("E4M3 decodes each of its 256 codes to the value its definition gives", "[kv_quant][fp8]") {
  int nans = 0;
  for (int c = 0; c < 256; ++c) {
    const auto code = static_cast<std::uint8_t>(c);
    const double want = e4m3_value(c);
    const float got = af::e4m3_to_float(code);
    if (std::isnan(want)) {
      CHECK(std::isnan(got));
      CHECK(std::isnan(af::round_to_e4m3(got)));
      ++nans;
      continue;
    }
    CHECK(double{got} == want);
    CHECK(af::e4m3_bits(got) == code);  // every finite code round-trips, -0 included
  }
  CHECK(nans == 2);  // 0x7F and 0xFF: no infinities, one NaN per sign
  CHECK(af::e4m3_to_float(0x7E) == 448.0f);
  CHECK(af::e4m3_to_float(0x01) == std::ldexp(1.0f, -9));
  CHECK(af::e4m3_to_float(0x08) == std::ldexp(1.0f, -6));
}

TEST_CASE("E4M3 rounds to the nearest code, ties to even, and saturates at 448", "[kv_quant][fp8]") {
  // Every midpoint between neighbouring finite codes, and points just beside it.
  for (int c = 0; c < 0x7E; ++c) {
    const double lo = e4m3_value(c), hi = e4m3_value(c + 1), mid = (lo + hi) / 2;  // exact in float
    for (double x : {mid, std::nextafter(mid, lo), std::nextafter(mid, hi), lo + (hi - lo) / 4}) {
      const auto f = static_cast<float>(x);
      CHECK(af::e4m3_bits(f) == nearest_code(f));
      CHECK(af::e4m3_bits(-f) == (nearest_code(-f)));
    }
  }
  af::Rng rng(55);
  for (int i = 0; i < 20000; ++i) {
    const auto x = static_cast<float>(std::ldexp(rng.uniform(-1.0, 1.0), static_cast<int>(rng.below(22)) - 12));
    REQUIRE(af::e4m3_bits(x) == nearest_code(x));
  }
  CHECK(af::round_to_e4m3(460.0f) == 448.0f);
  CHECK(af::round_to_e4m3(1e9f) == 448.0f);
  CHECK(af::round_to_e4m3(-std::numeric_limits<float>::infinity()) == -448.0f);
  CHECK(af::round_to_e4m3(std::ldexp(1.0f, -11)) == 0.0f);  // below half the smallest subnormal
  CHECK(std::isnan(af::round_to_e4m3(std::numeric_limits<float>::quiet_NaN())));
}

namespace {
double max_rel_to_scale(const af::Tensor& got, const af::Tensor& want) {
  double worst = 0.0, top = 0.0;
  for (std::int64_t i = 0; i < got.numel(); ++i) {
    worst = af::worse(worst, std::abs(double{got.data()[i]} - want.data()[i]));
    top = af::worse(top, std::abs(double{want.data()[i]}));
  }
  return worst / top;
}
}  // namespace

TEST_CASE("Quantized rows read back within half a step of their scale", "[kv_quant]") {
  af::Rng rng(56);
  const std::int64_t T = 37, G = 2, d = 16;
  const af::Tensor x = af::random_normal(af::Shape{T, G * d}, rng);
  // f32 is exact; bf16 is round_to_bf16 of each value.
  CHECK(af::max_abs_diff(af::dequantize_rows(af::quantize_rows(x.matrix(), G, af::KvFormat::f32)).values(),
                         x.values()) == 0.0);
  const af::Tensor b = af::dequantize_rows(af::quantize_rows(x.matrix(), G, af::KvFormat::bf16));
  for (std::int64_t i = 0; i < x.numel(); ++i) REQUIRE(b.data()[i] == af::round_to_bf16(x.data()[i]));

  // INT8 per token and head: each value within half a step, scale = amax / 127, of the original.
  const af::QuantizedRows tok = af::quantize_rows(x.matrix(), G, af::KvFormat::int8_token);
  const af::Tensor t8 = af::dequantize_rows(tok);
  for (std::int64_t t = 0; t < T; ++t)
    for (std::int64_t g = 0; g < G; ++g) {
      double amax = 0.0;
      for (std::int64_t c = 0; c < d; ++c) amax = std::max(amax, std::abs(double{x.at({t, g * d + c})}));
      for (std::int64_t c = 0; c < d; ++c)
        REQUIRE(std::abs(t8.at({t, g * d + c}) - x.at({t, g * d + c})) <= amax / 127 / 2 * (1 + 1e-5));
    }
  CHECK(tok.bytes() == T * G * d + 4 * T * G);

  // INT8 per channel in blocks of 8 tokens: 4 full blocks quantized, the last 5 tokens kept in float32.
  const af::QuantizedRows ch = af::quantize_rows(x.matrix(), G, af::KvFormat::int8_channel, 8);
  const af::Tensor c8 = af::dequantize_rows(ch);
  CHECK(ch.bytes() == 32 * G * d + 4 * 4 * G * d + 5 * G * d * 4);
  for (std::int64_t t = 32; t < T; ++t)
    for (std::int64_t c = 0; c < G * d; ++c) REQUIRE(c8.at({t, c}) == x.at({t, c}));
  for (std::int64_t blk = 0; blk < 4; ++blk)
    for (std::int64_t c = 0; c < G * d; ++c) {
      double amax = 0.0;
      for (std::int64_t t = blk * 8; t < blk * 8 + 8; ++t) amax = std::max(amax, std::abs(double{x.at({t, c})}));
      for (std::int64_t t = blk * 8; t < blk * 8 + 8; ++t)
        REQUIRE(std::abs(c8.at({t, c}) - x.at({t, c})) <= amax / 127 / 2 * (1 + 1e-5));
    }

  // FP8 per token and head: relative error of each value at most 2^-4 (3 mantissa bits) above the subnormals.
  const af::Tensor f8 = af::dequantize_rows(af::quantize_rows(x.matrix(), G, af::KvFormat::fp8_token));
  CHECK(max_rel_to_scale(f8, x) < 0.07);
  CHECK(max_rel_to_scale(f8, x) > 0.0);
  CHECK_THROWS_AS(af::quantize_rows(x.matrix(), 3, af::KvFormat::int8_token), af::Error);
  CHECK_THROWS_AS(af::quantize_rows(x.matrix(), G, af::KvFormat::int8_channel, 0), af::Error);
}

TEST_CASE("Per-channel keys survive an outlier channel that ruins per-token scales", "[kv_quant]") {
  af::Rng rng(57);
  const std::int64_t T = 64, d = 32;
  af::Tensor k = af::random_normal(af::Shape{T, d}, rng);
  for (std::int64_t t = 0; t < T; ++t) k.at({t, 5}) *= 40.0f;  // one outlier channel
  double token_err = 0.0, channel_err = 0.0;
  const af::Tensor tok = af::dequantize_rows(af::quantize_rows(k.matrix(), 1, af::KvFormat::int8_token));
  const af::Tensor ch = af::dequantize_rows(af::quantize_rows(k.matrix(), 1, af::KvFormat::int8_channel, 32));
  for (std::int64_t t = 0; t < T; ++t)
    for (std::int64_t c = 0; c < d; ++c)
      if (c != 5) {
        token_err = af::worse(token_err, double{std::abs(tok.at({t, c}) - k.at({t, c}))});
        channel_err = af::worse(channel_err, double{std::abs(ch.at({t, c}) - k.at({t, c}))});
      }
  CHECK(token_err > 5 * channel_err);
}

TEST_CASE("Quantized cache cards count codes and scales", "[kv_quant][accounting]") {
  // Llama-3.1-8B's layer: 8 KV heads of 128.
  const auto bytes = [](af::KvFormat k, af::KvFormat v) {
    return af::quantized_kv_card(32, 8, 128, k, v).bytes_per_token();
  };
  CHECK(bytes(af::KvFormat::bf16, af::KvFormat::bf16) == 4096);
  CHECK(bytes(af::KvFormat::f32, af::KvFormat::f32) == 8192);
  CHECK(bytes(af::KvFormat::int8_token, af::KvFormat::int8_token) == 2 * (1024 + 32));
  CHECK(bytes(af::KvFormat::fp8_token, af::KvFormat::fp8_token) == 2 * (1024 + 32));
  CHECK(bytes(af::KvFormat::int8_channel, af::KvFormat::int8_token) == 1024 + 8 * 4 * 4 + 1024 + 32);
  CHECK(af::quantized_kv_card(32, 8, 128, af::KvFormat::int8_token, af::KvFormat::int8_token).bytes_read(100) ==
        100 * 2112);
  CHECK_THROWS_AS(af::quantized_kv_card(32, 8, 128, af::KvFormat::int8_channel, af::KvFormat::bf16, 48), af::Error);
}
