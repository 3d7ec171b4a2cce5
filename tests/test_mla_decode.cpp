// The float64 reference of MLA decode (af/mla_decode.hpp), which the GPU tests trust, checked here against the
// library's single-head attention (af::attention) run once per head on keys and values built explicitly from a
// contiguous copy of each sequence's tokens: keys the whole 576-wide rows, values their first 512 values.
#include "af/attention.hpp"
#include "af/error.hpp"
#include "af/mla_decode.hpp"
#include "af/numeric.hpp"
#include "af/random.hpp"

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

using Catch::Matchers::Contains;

namespace {

std::vector<std::uint16_t> random_bf16(std::size_t count, af::Rng& rng) {
  std::vector<std::uint16_t> bits(count);
  for (auto& b : bits) b = af::bf16_bits(static_cast<float>(rng.normal()));
  return bits;
}

struct Mla {
  af::MlaDecodeShape shape;
  std::vector<std::uint16_t> q, cache;
  std::vector<std::int32_t> block_table, lengths;
};

// Every sequence's pages drawn from one shuffled pool; entries past a sequence's last page hold -1.
Mla random_mla(const af::MlaDecodeShape& shape, std::vector<std::int32_t> lengths, std::uint64_t seed) {
  af::Rng rng(seed);
  Mla p{shape, {}, {}, {}, std::move(lengths)};
  std::vector<std::int32_t> pages(static_cast<std::size_t>(shape.num_pages));
  std::iota(pages.begin(), pages.end(), 0);
  for (std::size_t i = pages.size() - 1; i > 0; --i)
    std::swap(pages[i], pages[static_cast<std::size_t>(rng.below(static_cast<std::int64_t>(i) + 1))]);
  p.block_table.assign(static_cast<std::size_t>(shape.batch * shape.max_pages_per_seq), -1);
  std::size_t next = 0;
  for (std::int64_t b = 0; b < shape.batch; ++b)
    for (std::int64_t i = 0; i * shape.page_size < p.lengths[static_cast<std::size_t>(b)]; ++i)
      p.block_table[static_cast<std::size_t>(b * shape.max_pages_per_seq + i)] = pages[next++];
  p.q = random_bf16(static_cast<std::size_t>(shape.batch * shape.q_heads * shape.key_dim()), rng);
  p.cache = random_bf16(static_cast<std::size_t>(shape.num_pages * shape.page_values()), rng);
  return p;
}

// Sequence b's output [q_heads * latent_dim] from af::attention, one head at a time: the sequence's rows gathered
// from the pages by hand (token j: page block_table[b][j / page_size], slot j % page_size) into keys [T, 576] and
// values [T, 512] (the latent part of the same rows).
std::vector<float> dense_output(const Mla& p, std::int64_t b, double scale) {
  const af::MlaDecodeShape& s = p.shape;
  const std::int64_t length = p.lengths[static_cast<std::size_t>(b)], width = s.key_dim();
  af::Tensor keys(af::Shape{length, width}), values(af::Shape{length, s.latent_dim});
  for (std::int64_t j = 0; j < length; ++j) {
    const std::int64_t page = p.block_table[static_cast<std::size_t>(b * s.max_pages_per_seq + j / s.page_size)];
    for (std::int64_t c = 0; c < width; ++c) {
      const float x =
          af::bf16_to_float(p.cache[static_cast<std::size_t>((page * s.page_size + j % s.page_size) * width + c)]);
      keys.matrix()(j, c) = x;
      if (c < s.latent_dim) values.matrix()(j, c) = x;
    }
  }
  std::vector<float> out;
  for (std::int64_t h = 0; h < s.q_heads; ++h) {
    af::Tensor q(af::Shape{1, width});
    for (std::int64_t c = 0; c < width; ++c)
      q.matrix()(0, c) = af::bf16_to_float(p.q[static_cast<std::size_t>((b * s.q_heads + h) * width + c)]);
    const af::Tensor o = af::attention(q.matrix(), keys.matrix(), values.matrix(),
                                       af::AttentionOptions{.causal = false, .scale = scale});
    out.insert(out.end(), o.values().begin(), o.values().end());
  }
  return out;
}

}  // namespace

TEST_CASE("MLA decode's float64 reference equals per-head attention over the latent rows", "[mla-decode][cpu]") {
  af::Rng rng(70);
  std::uint64_t seed = 7000;
  for (std::int64_t page_size : {1, 16, 64})
    for (std::int64_t q_heads : {1, 16, 5}) {
      af::MlaDecodeShape s;
      s.batch = 3;
      s.q_heads = q_heads;
      s.page_size = page_size;
      s.max_pages_per_seq = 200 / page_size + 1;
      s.num_pages = s.batch * s.max_pages_per_seq + 2;
      const std::vector<std::int32_t> lengths = {1, static_cast<std::int32_t>(page_size + 1),
                                                 static_cast<std::int32_t>(1 + rng.below(s.capacity()))};
      const Mla p = random_mla(s, lengths, seed++);
      // DeepSeek-V3's scale: 1/sqrt(128 + 64) times its YaRN mscale^2 = (0.1 ln 40 + 1)^2 (af/mla.hpp).
      const double mscale = 0.1 * std::log(40.0) + 1.0;
      const double scale = mscale * mscale / std::sqrt(192.0);
      const std::vector<double> reference = af::mla_decode_f64(s, p.q, p.cache, p.block_table, p.lengths, scale);
      REQUIRE(reference.size() == static_cast<std::size_t>(s.batch * s.q_heads * s.latent_dim));
      for (std::int64_t b = 0; b < s.batch; ++b) {
        const std::vector<float> dense = dense_output(p, b, scale);
        double worst = 0.0;
        for (std::size_t i = 0; i < dense.size(); ++i) {
          const double expected = reference[static_cast<std::size_t>(b * s.q_heads * s.latent_dim) + i];
          // float32 against float64: scores of a few tens, so errors near 1e-5 of the values (|v| up to about 4)
          worst = std::max(worst, std::abs(dense[i] - expected));
        }
        INFO("q_heads " << q_heads << ", page_size " << page_size << ", sequence " << b << " of length "
                        << lengths[static_cast<std::size_t>(b)]);
        CHECK(worst < 1e-4);
      }
    }
}

TEST_CASE("MLA decode's reference reads only the pages the lengths reach, and one token returns its latent",
          "[mla-decode][cpu]") {
  af::MlaDecodeShape s;
  s.batch = 2;
  s.q_heads = 3;
  s.page_size = 16;
  s.max_pages_per_seq = 3;
  s.num_pages = 6;
  const Mla p = random_mla(s, {1, 17}, 7);
  // Sequence 0 uses one page, sequence 1 two: their last table entries hold -1 and are never read.
  REQUIRE(p.block_table[1] == -1);
  REQUIRE(p.block_table[5] == -1);
  const auto out = af::mla_decode_f64(s, p.q, p.cache, p.block_table, p.lengths, 0.07);
  // With one token the softmax weight is 1: every head of sequence 0 returns that token's latent, the first
  // 512 values of its row (not the RoPE part).
  for (std::int64_t h = 0; h < s.q_heads; ++h)
    for (std::int64_t c = 0; c < s.latent_dim; ++c) {
      const auto at = static_cast<std::size_t>(p.block_table[0] * s.page_size * s.key_dim() + c);
      CHECK(out[static_cast<std::size_t>(h * s.latent_dim + c)] == af::bf16_to_float(p.cache[at]));
    }
  // 18 rows of 576 bf16, the queries and outputs, 3 table entries and 2 lengths.
  CHECK(af::mla_decode_bytes(s, p.lengths) == 18.0 * 576 * 2 + 2.0 * 3 * 576 * 2 + 2.0 * 3 * 512 * 2 + 3 * 4 + 2 * 4);
  CHECK(af::mla_decode_flops(s, p.lengths) == 18.0 * 2 * 3 * (576 + 512));
}

TEST_CASE("MLA decode's reference rejects bad lengths, page ids and sizes, naming the value", "[mla-decode][cpu]") {
  af::MlaDecodeShape s;
  s.batch = 1;
  s.q_heads = 2;
  s.page_size = 16;
  s.max_pages_per_seq = 2;
  s.num_pages = 2;
  Mla p = random_mla(s, {20}, 9);
  const auto call = [&] { return af::mla_decode_f64(s, p.q, p.cache, p.block_table, p.lengths, 0.1); };
  REQUIRE_NOTHROW(call());
  p.lengths[0] = 0;
  REQUIRE_THROWS_WITH(call(), Contains("lengths[0] is 0"));
  p.lengths[0] = 33;
  REQUIRE_THROWS_WITH(call(), Contains("lengths[0] is 33") && Contains("1..32"));
  p.lengths[0] = 20;
  p.block_table[1] = 2;
  REQUIRE_THROWS_WITH(call(), Contains("block_table[0][1] is 2") && Contains("0..1"));
  p.block_table[1] = -3;
  REQUIRE_THROWS_WITH(call(), Contains("block_table[0][1] is -3"));
  p.block_table[1] = 0;
  REQUIRE_NOTHROW(call());
  s.page_size = 12;
  REQUIRE_THROWS_WITH(call(), Contains("page_size is 12") && Contains("power of two"));
  s.page_size = 16;
  s.q_heads = 0;
  REQUIRE_THROWS_WITH(call(), Contains("q_heads is 0"));
  s.q_heads = 2;
  s.rope_dim = 32;  // the sizes no longer match the buffers
  REQUIRE_THROWS_WITH(call(), Contains("q holds 1152 values") && Contains("= 1088"));
  s.rope_dim = 64;
  p.cache.pop_back();
  REQUIRE_THROWS_WITH(call(), Contains("cache holds 18431 values") && Contains("= 18432"));
  p.cache.push_back(0);
  p.block_table.push_back(0);
  REQUIRE_THROWS_WITH(call(), Contains("block_table holds 3 ids"));
  p.block_table.pop_back();
  p.lengths.push_back(1);
  REQUIRE_THROWS_WITH(call(), Contains("lengths holds 2 values"));
}
