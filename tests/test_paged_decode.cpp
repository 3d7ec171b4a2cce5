// The float64 reference of paged decode (af/paged_decode.hpp), which the GPU tests trust, checked here against
// the library's dense grouped attention on the same tokens laid out contiguously: without a GPU, in CI. The FP8
// reference against the bf16 one on the same numbers, and the FP8 kernel's integer E4M3 unpacking on every code.
#include "af/error.hpp"
#include "af/grouped_attention.hpp"
#include "af/kernels/e4m3.hpp"
#include "af/numeric.hpp"
#include "af/paged_decode.hpp"
#include "af/quantized_cache.hpp"
#include "af/random.hpp"

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

using Catch::Matchers::Contains;

namespace {

std::vector<std::uint16_t> random_bf16(std::size_t count, af::Rng& rng) {
  std::vector<std::uint16_t> bits(count);
  for (auto& b : bits) b = af::bf16_bits(static_cast<float>(rng.normal()));
  return bits;
}

struct Paged {
  af::PagedDecodeShape shape;
  std::vector<std::uint16_t> q, k, v;
  std::vector<std::int32_t> block_table, lengths;
};

// Every sequence's pages drawn from one shuffled pool; entries past a sequence's last page hold -1.
Paged random_paged(const af::PagedDecodeShape& shape, std::vector<std::int32_t> lengths, std::uint64_t seed) {
  af::Rng rng(seed);
  Paged p{shape, {}, {}, {}, {}, std::move(lengths)};
  std::vector<std::int32_t> pages(static_cast<std::size_t>(shape.num_pages));
  std::iota(pages.begin(), pages.end(), 0);
  for (std::size_t i = pages.size() - 1; i > 0; --i)
    std::swap(pages[i], pages[static_cast<std::size_t>(rng.below(static_cast<std::int64_t>(i) + 1))]);
  p.block_table.assign(static_cast<std::size_t>(shape.batch * shape.max_pages_per_seq), -1);
  std::size_t next = 0;
  for (std::int64_t b = 0; b < shape.batch; ++b)
    for (std::int64_t i = 0; i * shape.page_size < p.lengths[static_cast<std::size_t>(b)]; ++i)
      p.block_table[static_cast<std::size_t>(b * shape.max_pages_per_seq + i)] = pages[next++];
  p.q = random_bf16(static_cast<std::size_t>(shape.batch * shape.q_heads * shape.head_dim), rng);
  p.k = random_bf16(static_cast<std::size_t>(shape.num_pages * shape.page_values()), rng);
  p.v = random_bf16(p.k.size(), rng);
  return p;
}

// Sequence b's output [q_heads * head_dim] from af::grouped_attend over a contiguous cache of its tokens,
// gathered from the pages by hand (token j: page block_table[b][j / page_size], slot j % page_size).
std::vector<float> dense_output(const Paged& p, std::int64_t b) {
  const af::PagedDecodeShape& s = p.shape;
  const std::int64_t length = p.lengths[static_cast<std::size_t>(b)], g_d = s.kv_heads * s.head_dim;
  af::Tensor keys(af::Shape{length, g_d}), values(af::Shape{length, g_d});
  for (std::int64_t j = 0; j < length; ++j) {
    const std::int64_t page = p.block_table[static_cast<std::size_t>(b * s.max_pages_per_seq + j / s.page_size)];
    for (std::int64_t g = 0; g < s.kv_heads; ++g)
      for (std::int64_t c = 0; c < s.head_dim; ++c) {
        const auto at =
            static_cast<std::size_t>(((page * s.kv_heads + g) * s.page_size + j % s.page_size) * s.head_dim + c);
        keys.matrix()(j, g * s.head_dim + c) = af::bf16_to_float(p.k[at]);
        values.matrix()(j, g * s.head_dim + c) = af::bf16_to_float(p.v[at]);
      }
  }
  af::Tensor q(af::Shape{1, s.q_heads * s.head_dim});
  for (std::int64_t i = 0; i < s.q_heads * s.head_dim; ++i)
    q.matrix()(0, i) = af::bf16_to_float(p.q[static_cast<std::size_t>(b * s.q_heads * s.head_dim + i)]);
  const af::GroupedShape grouped{s.q_heads * s.head_dim, s.q_heads, s.kv_heads, s.head_dim};
  af::GroupedKvCache cache(length, s.kv_heads, s.head_dim);
  cache.append(keys.matrix(), values.matrix());
  const af::Tensor out = af::grouped_attend(q.matrix(), grouped, cache, af::AttentionOptions{});  // scale 1/sqrt(d)
  return {out.values().begin(), out.values().end()};
}

}  // namespace

TEST_CASE("paged decode's float64 reference equals dense grouped attention on the same tokens", "[paged_decode][cpu]") {
  af::Rng rng(20);
  std::uint64_t seed = 2000;
  for (std::int64_t group : {1, 4, 8, 16, 20})
    for (std::int64_t page_size : {8, 16, 32}) {
      af::PagedDecodeShape s;
      s.batch = 4;
      s.kv_heads = 1 + rng.below(2);
      s.q_heads = s.kv_heads * group;
      s.head_dim = group % 2 == 0 ? 64 : 128;
      s.page_size = page_size;
      s.max_pages_per_seq = 300 / page_size + 1;
      s.num_pages = s.batch * s.max_pages_per_seq + 2;
      const std::vector<std::int32_t> lengths = {1, static_cast<std::int32_t>(page_size),
                                                 static_cast<std::int32_t>(page_size + 1),
                                                 static_cast<std::int32_t>(1 + rng.below(s.capacity()))};
      const Paged p = random_paged(s, lengths, seed++);
      const double scale = 1.0 / std::sqrt(static_cast<double>(s.head_dim));
      const std::vector<double> reference = af::paged_decode_f64(s, p.q, p.k, p.v, p.block_table, p.lengths, scale);
      for (std::int64_t b = 0; b < s.batch; ++b) {
        const std::vector<float> dense = dense_output(p, b);
        double worst = 0.0;
        for (std::size_t i = 0; i < dense.size(); ++i) {
          const double expected = reference[static_cast<std::size_t>(b * s.q_heads * s.head_dim) + i];
          // float32 against float64: errors near 1e-7 of the values (|v| up to about 4)
          worst = std::max(worst, std::abs(dense[i] - expected));
        }
        INFO("group " << group << ", page_size " << page_size << ", sequence " << b << " of length "
                      << lengths[static_cast<std::size_t>(b)]);
        CHECK(worst < 1e-5);
      }
    }
}

TEST_CASE("paged decode's reference reads only the pages the lengths reach, and one token returns its value",
          "[paged_decode][cpu]") {
  af::PagedDecodeShape s;
  s.batch = 2;
  s.q_heads = 4;
  s.kv_heads = 2;
  s.head_dim = 64;
  s.page_size = 16;
  s.max_pages_per_seq = 3;
  s.num_pages = 6;
  Paged p = random_paged(s, {1, 17}, 7);
  // Sequence 0 uses one page, sequence 1 two: their last table entries hold -1 and are never read.
  REQUIRE(p.block_table[1] == -1);
  REQUIRE(p.block_table[5] == -1);
  const auto out = af::paged_decode_f64(s, p.q, p.k, p.v, p.block_table, p.lengths, 0.125);
  // With one key the softmax weight is 1: sequence 0's q head h returns V of its KV head h / 2, token 0.
  for (std::int64_t h = 0; h < s.q_heads; ++h)
    for (std::int64_t c = 0; c < s.head_dim; ++c) {
      const auto at =
          static_cast<std::size_t>(((p.block_table[0] * s.kv_heads + h / 2) * s.page_size) * s.head_dim + c);
      CHECK(out[static_cast<std::size_t>(h * s.head_dim + c)] == af::bf16_to_float(p.v[at]));
    }
  CHECK(af::paged_decode_kv_bytes(s, p.lengths) == 18.0 * 2 * 64 * 2 * 2);
}

TEST_CASE("paged decode's reference rejects bad lengths, page ids and sizes, naming the value", "[paged_decode][cpu]") {
  af::PagedDecodeShape s;
  s.batch = 1;
  s.q_heads = 2;
  s.kv_heads = 1;
  s.head_dim = 64;
  s.page_size = 16;
  s.max_pages_per_seq = 2;
  s.num_pages = 2;
  Paged p = random_paged(s, {20}, 9);
  const auto call = [&] { return af::paged_decode_f64(s, p.q, p.k, p.v, p.block_table, p.lengths, 0.125); };
  REQUIRE_NOTHROW(call());
  p.lengths[0] = 0;
  REQUIRE_THROWS_WITH(call(), Contains("lengths[0] is 0"));
  p.lengths[0] = 33;
  REQUIRE_THROWS_WITH(call(), Contains("lengths[0] is 33") && Contains("1..32"));
  p.lengths[0] = 20;
  p.block_table[1] = 2;
  REQUIRE_THROWS_WITH(call(), Contains("block_table[0][1] is 2"));
  p.block_table[1] = 0;
  s.page_size = 12;
  REQUIRE_THROWS_WITH(call(), Contains("page_size is 12"));
  s.page_size = 16;
  s.kv_heads = 2;
  s.q_heads = 3;
  REQUIRE_THROWS_WITH(call(), Contains("q_heads is 3") && Contains("multiple of kv_heads = 2"));
  s.kv_heads = 1;
  s.q_heads = 2;
  p.k.pop_back();
  REQUIRE_THROWS_AS(call(), af::Error);
}

namespace {

// FP8 pools whose values are exactly the bf16 pools': every code times a power-of-two scale is a bf16 value
// (E4M3's 3 mantissa bits fit in bf16's 7), so the FP8 reference must equal the bf16 one on the same numbers.
struct Fp8Paged {
  std::vector<std::uint8_t> k, v;
  std::vector<float> k_scales, v_scales;
};

Fp8Paged exact_fp8_copy(Paged& p, af::Rng& rng) {
  const af::PagedDecodeShape& s = p.shape;
  const auto rows = static_cast<std::size_t>(s.num_pages * s.kv_heads * s.page_size);
  const auto d = static_cast<std::size_t>(s.head_dim);
  Fp8Paged f{std::vector<std::uint8_t>(rows * d), std::vector<std::uint8_t>(rows * d), std::vector<float>(rows),
             std::vector<float>(rows)};
  for (auto [codes, scales, bf16] : {std::tuple{&f.k, &f.k_scales, &p.k}, std::tuple{&f.v, &f.v_scales, &p.v}})
    for (std::size_t row = 0; row < rows; ++row) {
      (*scales)[row] = std::ldexp(1.0f, static_cast<int>(rng.below(9)) - 6);  // 2^-6 .. 2^2
      for (std::size_t c = 0; c < d; ++c) {
        std::uint8_t code = 0;
        do code = static_cast<std::uint8_t>(rng.below(256));
        while ((code & 0x7Fu) == 0x7Fu);  // not NaN
        (*codes)[row * d + c] = code;
        (*bf16)[row * d + c] = af::bf16_bits(af::e4m3_to_float(code) * (*scales)[row]);
      }
    }
  return f;
}

}  // namespace

TEST_CASE("paged decode's FP8 reference equals the bf16 one where the stored values are the same numbers",
          "[paged_decode][fp8][cpu]") {
  af::Rng rng(31);
  af::PagedDecodeShape s;
  s.batch = 3;
  s.q_heads = 8;
  s.kv_heads = 2;
  s.head_dim = 64;
  s.page_size = 8;
  s.max_pages_per_seq = 6;
  s.num_pages = 20;
  Paged p = random_paged(s, {1, 47, 17}, 32);
  const Fp8Paged f = exact_fp8_copy(p, rng);
  for (const double scale : {0.125, 0.01}) {
    const std::vector<double> bf16 = af::paged_decode_f64(s, p.q, p.k, p.v, p.block_table, p.lengths, scale);
    const std::vector<double> fp8 =
        af::paged_decode_fp8_f64(s, p.q, f.k, f.k_scales, f.v, f.v_scales, p.block_table, p.lengths, scale);
    REQUIRE(fp8.size() == bf16.size());
    double worst = 0.0;
    for (std::size_t i = 0; i < fp8.size(); ++i) worst = std::max(worst, std::abs(fp8[i] - bf16[i]));
    INFO("scale " << scale << ", worst difference " << worst);
    REQUIRE(std::isfinite(worst));
    REQUIRE(worst < 1e-12);
  }
  const double bytes = af::paged_decode_kv_bytes(s, p.lengths, af::PagedKvFormat::fp8_e4m3);
  CHECK(bytes == 65.0 * 2 * 2 * (64 + 4));  // tokens x kv_heads x (K, V) x (codes + scale)
  CHECK(af::paged_decode_kv_bytes(s, p.lengths) == 65.0 * 2 * 2 * 64 * 2);
}

TEST_CASE("paged decode's FP8 reference rejects NaN codes, bad scales and sizes, naming the value",
          "[paged_decode][fp8][cpu]") {
  af::Rng rng(33);
  af::PagedDecodeShape s;
  s.batch = 1;
  s.q_heads = 2;
  s.kv_heads = 1;
  s.head_dim = 64;
  s.page_size = 16;
  s.max_pages_per_seq = 2;
  s.num_pages = 2;
  Paged p = random_paged(s, {20}, 34);
  Fp8Paged f = exact_fp8_copy(p, rng);
  const auto call = [&] {
    return af::paged_decode_fp8_f64(s, p.q, f.k, f.k_scales, f.v, f.v_scales, p.block_table, p.lengths, 0.125);
  };
  REQUIRE_NOTHROW(call());
  const auto row = static_cast<std::size_t>(p.block_table[0] * s.page_size + 3);  // token 3 of the first page
  f.k[row * 64 + 5] = 0xFF;
  REQUIRE_THROWS_WITH(call(), Contains("key code at pool row " + std::to_string(row) + ", dimension 5 is NaN"));
  f.k[row * 64 + 5] = 0x38;
  f.v_scales[row] = 0.0f;
  REQUIRE_THROWS_WITH(call(), Contains("value scale of pool row " + std::to_string(row) + " is 0"));
  f.v_scales[row] = std::numeric_limits<float>::infinity();
  REQUIRE_THROWS_WITH(call(), Contains("value scale of pool row " + std::to_string(row) + " is inf"));
  f.v_scales[row] = 1.0f;
  f.k_scales.pop_back();
  REQUIRE_THROWS_WITH(call(), Contains("k_scales holds 31 values") && Contains("= 32 each"));
  f.k_scales.push_back(1.0f);
  f.v.pop_back();
  REQUIRE_THROWS_WITH(call(), Contains("paged_decode_fp8_f64: k holds 2048 values, v 2047"));
}

TEST_CASE("the FP8 decode kernel's integer E4M3 unpacking gives every code's value / 256 exactly",
          "[paged_decode][fp8][cpu]") {
  for (std::uint32_t lo = 0; lo < 256; ++lo) {
    const std::uint32_t hi = 255 - lo;  // the other half of the pair: every code in either position
    const std::uint32_t halves = af::kernels::e4m3x2_to_f16x2(lo | (hi << 8) | 0xABCD0000u);  // upper bits ignored
    for (const auto& [code, half] : {std::pair{lo, halves & 0xFFFFu}, std::pair{hi, halves >> 16}}) {
      if ((code & 0x7Fu) == 0x7Fu) continue;  // NaN: never stored (the cache's writer saturates)
      const float expected = af::e4m3_to_float(static_cast<std::uint8_t>(code));
      const float got = af::fp16_to_float(static_cast<std::uint16_t>(half)) * af::kernels::e4m3_f16_factor;
      INFO("code 0x" << std::hex << code);
      REQUIRE(got == expected);
      REQUIRE(std::signbit(got) == std::signbit(expected));  // -0 stays -0
    }
  }
}

TEST_CASE("the tensor-core paged decode's integer E4M3 to bf16 conversion is exact on every code",
          "[paged_decode][fp8][cpu]") {
  for (std::uint32_t lo = 0; lo < 256; ++lo) {
    const std::uint32_t hi = (lo * 37 + 11) % 256;  // a bijection: every code in either position
    const std::uint32_t pair = af::kernels::e4m3x2_to_bf16x2(lo | (hi << 8) | 0xABCD0000u);  // upper bits ignored
    for (const auto& [code, bits] : {std::pair{lo, pair & 0xFFFFu}, std::pair{hi, pair >> 16}}) {
      INFO("code 0x" << std::hex << code << ", bf16 0x" << bits);
      REQUIRE(bits == af::kernels::e4m3_to_bf16(code));
      const float got = af::bf16_to_float(static_cast<std::uint16_t>(bits));
      if ((code & 0x7Fu) == 0x7Fu) {  // NaN: never stored; the normal rule makes it +-480
        REQUIRE(got == ((code & 0x80u) ? -480.0f : 480.0f));
        continue;
      }
      const float expected = af::e4m3_to_float(static_cast<std::uint8_t>(code));
      REQUIRE(got == expected);
      REQUIRE(std::signbit(got) == std::signbit(expected));  // -0 stays -0
      // Exact, hence also the bits that rounding the value to bf16 gives (no second encoding of a value).
      REQUIRE(bits == af::bf16_bits(expected));
    }
  }
  static_assert(af::kernels::e4m3_to_bf16(0x01u) == 0x3B00u);  // 2^-9, the smallest subnormal
  static_assert(af::kernels::e4m3_to_bf16(0x7Eu) == 0x43E0u);  // 448, the largest code
}
