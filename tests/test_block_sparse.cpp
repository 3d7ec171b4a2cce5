#include "af/block_sparse.hpp"
#include "af/error.hpp"
#include "af/random.hpp"

#include "reference.hpp"

#include <catch2/catch.hpp>

#include <cmath>
#include <limits>
#include <vector>

namespace {

// float64 attention of the queries (the last Tq positions) under an element predicate, written plainly.
template <class Allows>
reference::Matrix64 masked_reference(const reference::Matrix64& q, const reference::Matrix64& k,
                                     const reference::Matrix64& v, Allows allows) {
  const std::size_t tq = q.size(), tk = k.size(), d = q[0].size();
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  reference::Matrix64 out(tq, std::vector<double>(v[0].size(), 0.0));
  for (std::size_t i = 0; i < tq; ++i) {
    const auto pos = static_cast<std::int64_t>(tk - tq + i);
    std::vector<double> w(tk, 0.0);
    double top = -std::numeric_limits<double>::infinity();
    for (std::size_t j = 0; j < tk; ++j)
      if (allows(pos, static_cast<std::int64_t>(j))) {
        double s = 0.0;
        for (std::size_t c = 0; c < d; ++c) s += q[i][c] * k[j][c];
        top = std::max(top, s * scale);
      }
    double sum = 0.0;
    for (std::size_t j = 0; j < tk; ++j)
      if (allows(pos, static_cast<std::int64_t>(j))) {
        double s = 0.0;
        for (std::size_t c = 0; c < d; ++c) s += q[i][c] * k[j][c];
        sum += (w[j] = std::exp(s * scale - top));
      }
    for (std::size_t j = 0; j < tk; ++j)
      for (std::size_t c = 0; c < out[i].size(); ++c) out[i][c] += w[j] / sum * v[j][c];
  }
  return out;
}

af::BlockPattern random_pattern(af::Rng& rng) {
  return af::BlockPattern{1 + rng.below(9), 1 + rng.below(3), rng.below(3), rng.below(5)};
}

}  // namespace

TEST_CASE("block-sparse attention equals dense attention under the expanded element mask", "[block_sparse]") {
  af::Rng rng(10);
  for (int trial = 0; trial < 60; ++trial) {
    const af::BlockPattern pattern = random_pattern(rng);
    const std::int64_t tk = 1 + rng.below(70), tq = trial % 3 == 0 ? 1 : 1 + rng.below(tk), d = 1 + rng.below(12),
                       dv = 1 + rng.below(10);
    const af::Tensor q = af::random_normal(af::Shape{tq, d}, rng), k = af::random_normal(af::Shape{tk, d}, rng),
                     v = af::random_normal(af::Shape{tk, dv}, rng);
    const af::BlockMask mask = af::block_mask(pattern, tq, tk);
    af::BlockedWork work;
    const af::Tensor out = af::block_sparse_attention(q.matrix(), k.matrix(), v.matrix(), pattern, mask, &work);
    const auto expected =
        masked_reference(reference::to64(q.matrix()), reference::to64(k.matrix()), reference::to64(v.matrix()),
                         [&](std::int64_t i, std::int64_t j) { return pattern.allows(i, j); });
    INFO("trial " << trial << " block " << pattern.block << " T " << tq << "/" << tk);
    // float32 scores and accumulation over at most 70 keys of unit-variance inputs.
    CHECK(reference::max_abs_diff(out.matrix(), expected) < 2e-5);
    // Every allowed pair is scored exactly once, and nothing outside the visited blocks is touched.
    const af::Mask element = af::element_mask(pattern, tq, tk);
    std::int64_t allowed = 0, visited = 0;
    for (std::int64_t i = 0; i < tq; ++i)
      for (std::int64_t j = 0; j < tk; ++j) allowed += element.allows(i, j);
    for (std::int64_t r = 0; r < mask.rows(); ++r) {
      for (std::int64_t n = 0; n < mask.kv_num_blocks[static_cast<std::size_t>(r)]; ++n) {
        const std::int64_t qb = mask.first_query_block + r, kb = mask.index(r, n);
        CHECK(pattern.visits(qb, kb));
        if (n > 0) CHECK(mask.index(r, n - 1) < kb);
      }
      ++visited;
    }
    CHECK(work.pairs_scored == allowed);
    CHECK(visited == mask.rows());
  }
}

TEST_CASE("block tables round-trip through the element mask", "[block_sparse]") {
  af::Rng rng(11);
  for (int trial = 0; trial < 60; ++trial) {
    const af::BlockPattern pattern = random_pattern(rng);
    const std::int64_t tk = 1 + rng.below(60), tq = trial % 2 == 0 ? tk : 1 + rng.below(tk);
    const af::BlockMask direct = af::block_mask(pattern, tq, tk);
    const af::BlockMask rebuilt = af::block_mask_from(af::element_mask(pattern, tq, tk), pattern.block);
    INFO("trial " << trial);
    CHECK(direct.first_query_block == rebuilt.first_query_block);
    CHECK(direct.kv_num_blocks == rebuilt.kv_num_blocks);
    CHECK(direct.kv_indices == rebuilt.kv_indices);
    CHECK(direct.full == rebuilt.full);
    // Full means every element inside the matrix is allowed; a diagonal block of a prefill never is (B > 1).
    for (std::int64_t r = 0; r < direct.rows(); ++r)
      for (std::int64_t n = 0; n < direct.kv_num_blocks[static_cast<std::size_t>(r)]; ++n)
        if (pattern.block > 1 && tq == tk && direct.index(r, n) == direct.first_query_block + r &&
            std::min((direct.index(r, n) + 1) * pattern.block, tk) - direct.index(r, n) * pattern.block > 1)
          CHECK_FALSE(direct.is_full(r, n));
  }
}

TEST_CASE("a dense pattern visits every causal block and matches causal attention", "[block_sparse]") {
  af::Rng rng(12);
  const af::BlockPattern dense{4, 1000, 0, 0};
  const af::Tensor q = af::random_normal(af::Shape{23, 8}, rng), k = af::random_normal(af::Shape{23, 8}, rng),
                   v = af::random_normal(af::Shape{23, 8}, rng);
  const af::BlockMask mask = af::block_mask(dense, 23, 23);
  CHECK(mask.density() == 1.0);
  const af::Tensor out = af::block_sparse_attention(q.matrix(), k.matrix(), v.matrix(), dense, mask);
  CHECK(reference::max_abs_diff(out.matrix(),
                                reference::attention(reference::to64(q.matrix()), reference::to64(k.matrix()),
                                                     reference::to64(v.matrix()), true, 1.0 / std::sqrt(8.0))) < 2e-5);
}

TEST_CASE("decode reads are the tokens of the visited blocks", "[block_sparse]") {
  af::Rng rng(13);
  for (int trial = 0; trial < 40; ++trial) {
    const af::BlockPattern pattern = random_pattern(rng);
    const std::int64_t t = 1 + rng.below(100);
    const af::BlockMask mask = af::block_mask(pattern, 1, t);
    std::int64_t tokens = 0;
    for (std::int64_t n = 0; n < mask.kv_num_blocks[0]; ++n) {
      const std::int64_t kb = mask.index(0, n);
      tokens += std::min((kb + 1) * pattern.block, t) - kb * pattern.block;
    }
    CHECK(af::block_sparse_decode_entries(pattern, t) == tokens);
    const af::CacheCard card = af::with_block_sparse(af::dense_kv_card("MHA", 4, 4, 8, af::DType::bf16), pattern);
    const af::CacheCard dense = af::dense_kv_card("MHA", 4, 4, 8, af::DType::bf16);
    CHECK(card.bytes_stored(t) == dense.bytes_stored(t));
    CHECK(card.bytes_read(t) == dense.bytes_read(tokens));
  }
  CHECK(af::block_sparse_decode_entries(af::BlockPattern{4, 1, 0, 0}, 0) == 0);
}

TEST_CASE("The block-sparse card's trade-offs are its own, not the dense card's", "[block_sparse][accounting]") {
  const af::CacheCard card =
      af::with_block_sparse(af::dense_kv_card("GQA", 8, 2, 16, af::DType::bf16), af::BlockPattern{64, 4, 1, 8});
  CHECK(card.trade_offs.find("nothing is recomputed") == std::string::npos);
  CHECK(card.trade_offs.find("grow linearly") == std::string::npos);
  CHECK_THAT(card.trade_offs, Catch::Matchers::Contains("memory as dense") &&
                                  Catch::Matchers::Contains("blocks of 64 tokens") &&
                                  Catch::Matchers::Contains("every 8th block back"));
}

TEST_CASE("block-sparse errors name the bad value", "[block_sparse]") {
  CHECK_THROWS_AS(af::block_mask(af::BlockPattern{0, 1, 0, 0}, 4, 4), af::Error);
  CHECK_THROWS_AS(af::block_mask(af::BlockPattern{4, 0, 0, 0}, 4, 4), af::Error);
  CHECK_THROWS_AS(af::block_mask(af::BlockPattern{4, 1, -1, 0}, 4, 4), af::Error);
  CHECK_THROWS_AS(af::block_mask(af::BlockPattern{4, 1, 0, -2}, 4, 4), af::Error);
  CHECK_THROWS_AS(af::block_mask(af::BlockPattern{4, 1, 0, 0}, 5, 4), af::Error);
  CHECK_THROWS_AS(af::block_mask_from(af::Mask(2, 2, true), 0), af::Error);
  af::Rng rng(14);
  const af::BlockPattern p{4, 1, 0, 0};
  const af::Tensor q = af::random_normal(af::Shape{4, 3}, rng), k = af::random_normal(af::Shape{4, 5}, rng);
  CHECK_THROWS_WITH(af::block_sparse_attention(q.matrix(), k.matrix(), k.matrix(), p, af::block_mask(p, 4, 4)),
                    Catch::Contains("block_sparse_attention"));
  const af::BlockMask other = af::block_mask(p, 4, 8);
  CHECK_THROWS_AS(af::block_sparse_attention(q.matrix(), q.matrix(), q.matrix(), p, other), af::Error);
}
