// The float64 reference of paged decode (af/paged_decode.hpp), which the GPU tests trust, checked here against
// the library's dense grouped attention on the same tokens laid out contiguously: without a GPU, in CI.
#include "af/error.hpp"
#include "af/grouped_attention.hpp"
#include "af/numeric.hpp"
#include "af/paged_decode.hpp"
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
