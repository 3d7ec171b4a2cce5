// The float64 reference of varlen causal prefill and append (af/varlen_attention.hpp), which the GPU tests
// trust, checked here against the library's tiled attention of chapter 23 run on each sequence alone: without
// a GPU, in CI.
#include "af/error.hpp"
#include "af/numeric.hpp"
#include "af/random.hpp"
#include "af/tensor.hpp"
#include "af/tiled_attention.hpp"
#include "af/varlen_attention.hpp"

#include <catch2/catch.hpp>

#include <cmath>
#include <vector>

#include "error_of.hpp"

using Catch::Matchers::Contains;

namespace {

std::vector<std::uint16_t> random_bf16(std::size_t count, af::Rng& rng) {
  std::vector<std::uint16_t> bits(count);
  for (auto& b : bits) b = af::bf16_bits(static_cast<float>(rng.normal()));
  return bits;
}

// Rows [first, first + rows) of a packed [total, heads * d] bf16 array as a float tensor.
af::Tensor rows_of(const std::vector<std::uint16_t>& packed, std::int64_t first, std::int64_t rows,
                   std::int64_t width) {
  af::Tensor t(af::Shape{rows, width});
  for (std::int64_t i = 0; i < rows * width; ++i)
    t.data()[i] = af::bf16_to_float(packed[static_cast<std::size_t>(first * width + i)]);
  return t;
}

}  // namespace

TEST_CASE("Varlen causal attention equals tiled attention per sequence, prefill and append mixed", "[varlen]") {
  struct Case {
    af::VarlenShape shape;
    std::vector<std::int32_t> query_lengths, key_lengths;
  };
  const Case cases[] = {
      {{3, 4, 4, 8}, {5, 1, 7}, {5, 9, 7}},            // a prefill, a decode step, a prefill
      {{4, 8, 2, 16}, {3, 17, 0, 2}, {20, 17, 4, 2}},  // an append, a prefill, nothing to do, a prefill
      {{2, 20, 1, 8}, {9, 33}, {40, 33}},              // a group of 20 (MQA)
  };
  for (const Case& c : cases) {
    const af::VarlenShape& s = c.shape;
    std::vector<std::int32_t> cu_q{0}, cu_k{0};
    for (std::size_t b = 0; b < c.query_lengths.size(); ++b) {
      cu_q.push_back(cu_q.back() + c.query_lengths[b]);
      cu_k.push_back(cu_k.back() + c.key_lengths[b]);
    }
    af::Rng rng(static_cast<std::uint64_t>(s.q_heads * 131 + s.head_dim));
    const std::vector<std::uint16_t> q =
        random_bf16(static_cast<std::size_t>(cu_q.back() * s.q_heads * s.head_dim), rng);
    const std::vector<std::uint16_t> k =
        random_bf16(static_cast<std::size_t>(cu_k.back() * s.kv_heads * s.head_dim), rng);
    const std::vector<std::uint16_t> v = random_bf16(k.size(), rng);
    const double scale = 1.0 / std::sqrt(static_cast<double>(s.head_dim));
    const std::vector<double> got = af::varlen_causal_attention_f64(s, q, k, v, cu_q, cu_k, scale);
    double worst = 0.0;
    for (std::int64_t b = 0; b < s.batch; ++b) {
      const std::int64_t lq = c.query_lengths[static_cast<std::size_t>(b)],
                         lk = c.key_lengths[static_cast<std::size_t>(b)];
      if (lq == 0) continue;
      const af::Tensor qb = rows_of(q, cu_q[static_cast<std::size_t>(b)], lq, s.q_heads * s.head_dim);
      const af::Tensor kb = rows_of(k, cu_k[static_cast<std::size_t>(b)], lk, s.kv_heads * s.head_dim);
      const af::Tensor vb = rows_of(v, cu_k[static_cast<std::size_t>(b)], lk, s.kv_heads * s.head_dim);
      const af::Tensor expected = af::tiled_attention(
          qb.matrix(), kb.matrix(), vb.matrix(), {s.q_heads, s.kv_heads, s.head_dim}, lk - lq, {4, 3}, nullptr, scale);
      for (std::int64_t i = 0; i < expected.numel(); ++i) {
        const double error =
            std::abs(got[static_cast<std::size_t>(cu_q[static_cast<std::size_t>(b)] * s.q_heads * s.head_dim + i)] -
                     expected.data()[i]);
        worst = std::isfinite(error) ? std::max(worst, error) : INFINITY;
      }
    }
    INFO("batch " << s.batch << ", heads " << s.q_heads << "/" << s.kv_heads << ", d " << s.head_dim << ": worst "
                  << worst);
    CHECK(worst < 2e-6);  // the tiled attention runs in float32
  }
}

TEST_CASE("Varlen causal FLOPs count every visible (query, key) pair", "[varlen]") {
  const af::VarlenShape s{2, 4, 2, 8};
  // A prefill of 3 (1 + 2 + 3 pairs) and an append of 2 queries after 5 cached tokens (6 + 7 pairs).
  const std::vector<std::int32_t> cu_q{0, 3, 5}, cu_k{0, 3, 10};
  CHECK(af::varlen_attention_causal_flops(s, cu_q, cu_k) == (6.0 + 13.0) * 4 * 4 * 8);
  CHECK(af::varlen_attention_min_bytes(s, 5, 10) == 2.0 * 8 * (2 * 5 * 4 + 2 * 10 * 2));
}

TEST_CASE("Varlen causal attention rejects bad shapes and counts with af::Error naming the value", "[varlen]") {
  using af_test::error_of;
  const af::VarlenShape s{2, 4, 2, 8};
  const std::vector<std::uint16_t> none;
  CHECK_THAT(error_of([&] {
               af::validate_cumulative({2, 3, 2, 8}, {{0, 1, 2}}, {{0, 1, 2}});
             }),
             Contains("q_heads is 3"));
  CHECK_THAT(error_of([&] { af::validate_cumulative(s, {{0, 1}}, {{0, 1, 2}}); }), Contains("cu_q holds 2"));
  CHECK_THAT(error_of([&] { af::validate_cumulative(s, {{1, 2, 3}}, {{0, 2, 3}}); }), Contains("cu_q[0] is 1"));
  CHECK_THAT(error_of([&] {
               af::validate_cumulative(s, {{0, 3, 4}}, {{0, 2, 4}});
             }),
             Contains("sequence 0 has 3 queries over 2 keys"));
  CHECK_THAT(error_of([&] {
               af::varlen_causal_attention_f64(s, none, none, none, {{0, 1, 2}}, {{0, 1, 2}}, 1.0);
             }),
             Contains("q holds 0 values"));
}
