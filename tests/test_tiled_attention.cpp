#include "af/grouped_attention.hpp"
#include "af/random.hpp"
#include "af/tiled_attention.hpp"
#include "error_of.hpp"

#include <catch2/catch.hpp>

#include <cmath>
#include <limits>
#include <vector>

using Catch::Matchers::Contains;

namespace {

// Causal grouped attention in float64, query by query, from the definition: query i of head h sits at position
// past + i and weighs the keys 0 .. past + i of KV head h * G / H with softmax(q . k / sqrt(d)).
std::vector<double> reference_gqa(const af::Tensor& q, const af::Tensor& k, const af::Tensor& v,
                                  const af::HeadShape& shape, std::int64_t past) {
  const std::int64_t d = shape.head_dim, tq = q.dim(0), width = shape.heads * d, kv_width = shape.kv_heads * d;
  std::vector<double> out(static_cast<std::size_t>(tq * width), 0.0);
  for (std::int64_t h = 0; h < shape.heads; ++h) {
    const std::int64_t g = h * shape.kv_heads / shape.heads;  // written differently from kv_head_of on purpose
    for (std::int64_t i = 0; i < tq; ++i) {
      std::vector<double> z(static_cast<std::size_t>(past + i + 1));
      double top = -std::numeric_limits<double>::infinity();
      for (std::int64_t j = 0; j <= past + i; ++j) {
        double dot = 0.0;
        for (std::int64_t c = 0; c < d; ++c)
          dot += double{q.data()[i * width + h * d + c]} * double{k.data()[j * kv_width + g * d + c]};
        z[j] = dot / std::sqrt(static_cast<double>(d));
        top = std::max(top, z[j]);
      }
      double sum = 0.0;
      for (double& x : z) sum += (x = std::exp(x - top));
      for (std::int64_t j = 0; j <= past + i; ++j)
        for (std::int64_t c = 0; c < d; ++c)
          out[i * width + h * d + c] += z[j] / sum * double{v.data()[j * kv_width + g * d + c]};
    }
  }
  return out;
}

// The library's existing causal grouped attention (chapter 04) over a cache holding past + Tq tokens.
af::Tensor grouped(const af::Tensor& q, const af::Tensor& k, const af::Tensor& v, const af::HeadShape& shape) {
  af::GroupedKvCache cache(k.dim(0), shape.kv_heads, shape.head_dim);
  cache.append(k.matrix(), v.matrix());
  return af::grouped_attend(q.matrix(), {1, shape.heads, shape.kv_heads, shape.head_dim}, cache, {});
}

struct Case {
  af::Tensor q, k, v;
};

Case random_case(af::Rng& rng, const af::HeadShape& shape, std::int64_t query_len, std::int64_t past) {
  const std::int64_t d = shape.head_dim;
  return {af::random_normal(af::Shape{query_len, shape.heads * d}, rng),
          af::random_normal(af::Shape{past + query_len, shape.kv_heads * d}, rng),
          af::random_normal(af::Shape{past + query_len, shape.kv_heads * d}, rng)};
}

// The tolerance of every comparison here: outputs are convex combinations of values drawn from N(0, 1), and
// float32 scores and sums over at most a few hundred keys stay within 1e-5 of float64 relative to the largest
// value. NaN or infinity fails (af::within_tolerance).
double tolerance_of(const af::Tensor& v) { return af::scaled_tolerance(1e-5, af::max_abs(v.values())); }

// The tile schedule by brute force: every (query tile, key tile) pair, every (query, key) in it.
af::TileCounts brute_force_counts(std::int64_t tq, std::int64_t past, const af::TileSizes& tiles) {
  const std::int64_t tk = past + tq, br = tiles.block_q, bc = tiles.block_kv;
  af::TileCounts c{(tq + br - 1) / br, (tk + bc - 1) / bc, 0, 0, 0};
  for (std::int64_t r0 = 0; r0 < tq; r0 += br)
    for (std::int64_t c0 = 0; c0 < tk; c0 += bc) {
      std::int64_t visible = 0, hidden = 0;
      for (std::int64_t r = r0; r < std::min(r0 + br, tq); ++r)
        for (std::int64_t j = c0; j < std::min(c0 + bc, tk); ++j) (j <= past + r ? visible : hidden) += 1;
      c.computed += visible > 0 ? 1 : 0;
      c.masked += visible > 0 && hidden > 0 ? 1 : 0;
      c.skipped += visible == 0 ? 1 : 0;
    }
  return c;
}

void check_counts(const af::TileCounts& got, const af::TileCounts& want) {
  CHECK(got.query_tiles == want.query_tiles);
  CHECK(got.key_tiles == want.key_tiles);
  CHECK(got.computed == want.computed);
  CHECK(got.masked == want.masked);
  CHECK(got.skipped == want.skipped);
}

}  // namespace

TEST_CASE("Tiled attention equals grouped attention and float64 for group sizes 1, 4 and 8", "[tiled]") {
  af::Rng rng(2301);
  for (const std::int64_t group : {1, 4, 8}) {
    for (int trial = 0; trial < 12; ++trial) {
      const std::int64_t heads = group * (1 + rng.below(2));
      const af::HeadShape s{heads, heads / group, 1 + rng.below(20)};
      const std::int64_t tq = 1 + rng.below(40), past = rng.below(2) == 0 ? 0 : rng.below(30);
      const af::TileSizes tiles{1 + rng.below(12), 1 + rng.below(12)};
      const Case c = random_case(rng, s, tq, past);
      af::TileCounts counts;
      const af::Tensor tiled = af::tiled_attention(c.q.matrix(), c.k.matrix(), c.v.matrix(), s, past, tiles, &counts);
      INFO("H " << s.heads << " G " << s.kv_heads << " d " << s.head_dim << " Tq " << tq << " past " << past << " B_r "
                << tiles.block_q << " B_c " << tiles.block_kv);
      const double tol = tolerance_of(c.v);
      CHECK(af::within_tolerance(af::max_abs_diff(tiled.values(), grouped(c.q, c.k, c.v, s).values()), tol));
      CHECK(af::within_tolerance(af::max_abs_diff(tiled.values(), reference_gqa(c.q, c.k, c.v, s, past)), tol));
      check_counts(counts, brute_force_counts(tq, past, tiles));
    }
  }
}

TEST_CASE("Tiles of one row, of odd sizes and longer than the sequence give the same result", "[tiled]") {
  af::Rng rng(2302);
  const af::HeadShape shape{8, 2, 6};
  for (const std::int64_t tq : {1, 7, 13}) {
    for (const std::int64_t past : {0, 5}) {
      const Case c = random_case(rng, shape, tq, past);
      const std::vector<double> want = reference_gqa(c.q, c.k, c.v, shape, past);
      for (const std::int64_t br : {1, 3, 5, 64})
        for (const std::int64_t bc : {1, 3, 5, 64}) {
          INFO("Tq " << tq << " past " << past << " B_r " << br << " B_c " << bc);
          const af::Tensor tiled = af::tiled_attention(c.q.matrix(), c.k.matrix(), c.v.matrix(), shape, past, {br, bc});
          CHECK(af::within_tolerance(af::max_abs_diff(tiled.values(), want), tolerance_of(c.v)));
        }
    }
  }
}

TEST_CASE("An append of new queries after a cache equals the last rows of the whole prefill", "[tiled]") {
  af::Rng rng(2303);
  const af::HeadShape shape{4, 1, 8};
  const std::int64_t total = 29;
  const Case c = random_case(rng, shape, total, 0);
  const af::Tensor prefill = af::tiled_attention(c.q.matrix(), c.k.matrix(), c.v.matrix(), shape, 0, {4, 4});
  for (const std::int64_t past : {1, 8, 17, 28}) {
    const std::int64_t tq = total - past;
    const af::ConstMatrix keys = c.k.matrix().rows_slice(0, past + tq), values = c.v.matrix().rows_slice(0, past + tq);
    const af::Tensor append = af::tiled_attention(c.q.matrix().rows_slice(past, tq), keys, values, shape, past, {3, 5});
    INFO("past " << past);
    CHECK(af::within_tolerance(af::max_abs_diff(append.matrix(), prefill.matrix().rows_slice(past, tq)),
                               tolerance_of(c.v)));
  }
}

TEST_CASE("A NaN key reaches the queries that see it and no query before it", "[tiled]") {
  af::Rng rng(2304);
  const af::HeadShape shape{2, 1, 4};
  const std::int64_t tq = 11, past = 3, poisoned = 8;  // key position 8: query rows 5 .. 10 see it
  Case c = random_case(rng, shape, tq, past);
  c.k.matrix()(poisoned, 1) = std::numeric_limits<float>::quiet_NaN();
  for (const std::int64_t b : {1, 3, 4, 16}) {
    const af::Tensor out = af::tiled_attention(c.q.matrix(), c.k.matrix(), c.v.matrix(), shape, past, {b, b});
    for (std::int64_t i = 0; i < tq; ++i) {
      INFO("tiles " << b << ", query row " << i << " at position " << past + i);
      const bool sees = past + i >= poisoned;
      for (const float x : out.matrix().row(i)) CHECK(std::isnan(x) == sees);
    }
  }
}

TEST_CASE("The causal walk skips every tile above the diagonal", "[tiled]") {
  for (std::int64_t tq = 1; tq <= 20; ++tq)
    for (const std::int64_t past : {0, 1, 6})
      for (std::int64_t br = 1; br <= 7; br += 2)
        for (std::int64_t bc = 1; bc <= 8; bc += 3) {
          INFO("Tq " << tq << " past " << past << " B_r " << br << " B_c " << bc);
          check_counts(af::causal_tile_counts(tq, past, {br, bc}), brute_force_counts(tq, past, {br, bc}));
        }
  // Four queries in tiles of two: the diagonal tiles (0, 0) and (1, 1) are masked, (1, 0) is full, (0, 1)
  // lies above the diagonal and is skipped.
  const af::TileCounts c = af::causal_tile_counts(4, 0, {2, 2});
  CHECK(c.query_tiles == 2);
  CHECK(c.key_tiles == 2);
  CHECK(c.computed == 3);
  CHECK(c.masked == 2);
  CHECK(c.skipped == 1);
}

TEST_CASE("The byte counts of small cases are exactly the hand counts", "[tiled]") {
  SECTION("prefill of 4 tokens, one head of d = 2, tiles of 2, bf16") {
    const af::HeadShape one{1, 1, 2};
    // Query tile 0 loads K/V tile 0; query tile 1 loads K/V tiles 0 and 1: 3 tiles of 2 rows x 2 x 2 bytes.
    const af::Traffic tiled = af::tiled_attention_traffic(4, 0, one, {2, 2}, 2);
    CHECK(tiled.q_read == 16);
    CHECK(tiled.k_read == 24);
    CHECK(tiled.v_read == 24);
    CHECK(tiled.o_written == 16);
    CHECK(tiled.scores_written == 0);
    CHECK(tiled.scores_read == 0);
    CHECK(tiled.total() == 80);
    // Q, K, V, O of 4 x 2 x 2 bytes each, and the 4 x 4 matrix written as S, read, written as P, read.
    const af::Traffic standard = af::standard_attention_traffic(4, 0, one, 2);
    CHECK(standard.q_read == 16);
    CHECK(standard.k_read == 16);
    CHECK(standard.v_read == 16);
    CHECK(standard.o_written == 16);
    CHECK(standard.scores_written == 64);
    CHECK(standard.scores_read == 64);
    CHECK(standard.total() == 192);
    // Q, K, V tiles: 2 (2 x 2 + 2 x 2 x 2) = 24; float32 S, O, max and sum: 4 (4 + 4 + 4) = 48.
    CHECK(af::tile_working_set_bytes({2, 2}, 2, 2) == 72);
  }
  SECTION("append of 2 queries after 3 cached tokens, 2 heads sharing 1 KV head of d = 4") {
    const af::HeadShape gqa{2, 1, 4};
    // One query tile at positions 3 and 4 loads key tiles 0, 1 and 2 (rows 0-1, 2-3, 4): 5 rows x 4 x 2 bytes,
    // once per query head.
    const af::Traffic tiled = af::tiled_attention_traffic(2, 3, gqa, {2, 2}, 2);
    CHECK(tiled.q_read == 32);
    CHECK(tiled.k_read == 80);
    CHECK(tiled.v_read == 80);
    CHECK(tiled.o_written == 32);
    CHECK(tiled.total() == 224);
    const af::Traffic standard = af::standard_attention_traffic(2, 3, gqa, 2);
    CHECK(standard.scores_written == 80);  // S and P: 2 heads x 2 x 5 x 2 bytes each
    CHECK(standard.scores_read == 80);
    CHECK(standard.total() == 384);
  }
  SECTION("with one query tile the tiled algorithm reads K and V once: the difference is the score matrix") {
    const af::HeadShape shape{8, 2, 16};
    const af::Traffic tiled = af::tiled_attention_traffic(50, 14, shape, {64, 8}, 2);
    const af::Traffic standard = af::standard_attention_traffic(50, 14, shape, 2);
    CHECK(tiled.k_read == standard.k_read);
    CHECK(tiled.v_read == standard.v_read);
    CHECK(standard.total() - tiled.total() == standard.scores_written + standard.scores_read);
  }
}

TEST_CASE("Tiled attention rejects bad arguments, naming the value", "[tiled]") {
  af::Rng rng(2305);
  const af::HeadShape shape{4, 2, 3};
  const Case c = random_case(rng, shape, 5, 2);
  const auto run = [&](const af::HeadShape& s, std::int64_t past, const af::TileSizes& tiles) {
    return af_test::error_of(
        [&] { (void)af::tiled_attention(c.q.matrix(), c.k.matrix(), c.v.matrix(), s, past, tiles); });
  };
  CHECK_THAT(run(shape, 2, {0, 4}), Contains("block_q (B_r) 0"));
  CHECK_THAT(run(shape, 2, {4, 0}), Contains("block_kv (B_c) 0"));
  CHECK_THAT(run(shape, -1, {4, 4}), Contains("past -1"));
  CHECK_THAT(run(shape, 3, {4, 4}), Contains("[past + Tq, G d] = [3 + 5, 6]"));
  CHECK_THAT(run({4, 2, 4}, 2, {4, 4}), Contains("q is [5, 12] (expected [Tq, 16]"));
  CHECK_THAT(run({4, 3, 3}, 2, {4, 4}), Contains("4 query heads cannot share 3 KV heads"));
  CHECK_THAT(run({4, 4, 3}, 2, {4, 4}), Contains("k is [7, 6] and v is [7, 6]"));
  CHECK_THAT(af_test::error_of([&] {
               (void)af::tiled_attention(c.q.matrix().rows_slice(0, 0), c.k.matrix().rows_slice(0, 2),
                                         c.v.matrix().rows_slice(0, 2), shape, 2, {4, 4});
             }),
             Contains("0 queries"));
  CHECK_THAT(af_test::error_of([&] {
               (void)af::tiled_attention(c.q.matrix(), c.k.matrix(), c.v.matrix().rows_slice(0, 6), shape, 2, {4, 4});
             }),
             Contains("v is [6, 6]"));
  CHECK_THAT(af_test::error_of([] { (void)af::causal_tile_counts(0, 0, {4, 4}); }), Contains("query length 0"));
  CHECK_THAT(af_test::error_of([] { (void)af::causal_tile_counts(4, -2, {4, 4}); }), Contains("past -2"));
  CHECK_THAT(af_test::error_of([] {
               (void)af::tiled_attention_traffic(4, 0, {1, 1, 2}, {2, 2}, 0);
             }),
             Contains("value_bytes 0"));
  CHECK_THAT(af_test::error_of([] {
               (void)af::standard_attention_traffic(4, 0, {1, 1, 0}, 2);
             }),
             Contains("head_dim 0"));
  CHECK_THAT(af_test::error_of([] { (void)af::tile_working_set_bytes({-3, 2}, 64, 2); }), Contains("block_q (B_r) -3"));
  CHECK_THAT(af_test::error_of([] {
               (void)af::tiled_attention_traffic(std::int64_t{1} << 23, 0, {1, 1, 2}, {2, 2}, 2);
             }),
             Contains("at most 4194304"));
}
