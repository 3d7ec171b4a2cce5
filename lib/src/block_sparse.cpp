#include "af/block_sparse.hpp"

#include "af/error.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <limits>

namespace af {

void BlockPattern::validate() const {
  require(block >= 1, "BlockPattern: block {} (expected >= 1)", block);
  require(local_blocks >= 1, "BlockPattern: local_blocks {} (expected >= 1)", local_blocks);
  require(global_blocks >= 0, "BlockPattern: global_blocks {} (expected >= 0)", global_blocks);
  require(stride >= 0, "BlockPattern: stride {} (expected >= 0; 0 = no strided blocks)", stride);
}

bool BlockPattern::visits(std::int64_t query_block, std::int64_t key_block) const {
  if (key_block > query_block) return false;
  const std::int64_t back = query_block - key_block;
  return back < local_blocks || key_block < global_blocks || (stride > 0 && back % stride == 0);
}

double BlockMask::density() const {
  std::int64_t visited = 0, causal = 0;
  for (std::int64_t r = 0; r < rows(); ++r) {
    visited += kv_num_blocks[static_cast<std::size_t>(r)];
    causal += std::min(first_query_block + r + 1, key_blocks());
  }
  return causal == 0 ? 0.0 : static_cast<double>(visited) / static_cast<double>(causal);
}

namespace {

// Builds the tables from a block predicate and an element predicate over the queries' positions.
template <class Visits, class Allows>
BlockMask build(std::int64_t queries, std::int64_t keys, std::int64_t block, Visits visits, Allows allows) {
  BlockMask m;
  m.queries = queries;
  m.keys = keys;
  m.block = block;
  const std::int64_t first_query = keys - queries, last_query = keys - 1;
  m.first_query_block = first_query / block;
  const std::int64_t rows = last_query / block - m.first_query_block + 1, kb_count = m.key_blocks();
  m.kv_num_blocks.assign(static_cast<std::size_t>(rows), 0);
  m.kv_indices.assign(static_cast<std::size_t>(rows * kb_count), 0);
  m.full.assign(m.kv_indices.size(), 0);
  for (std::int64_t r = 0; r < rows; ++r) {
    const std::int64_t qb = m.first_query_block + r;
    const std::int64_t q_lo = std::max(qb * block, first_query), q_hi = std::min((qb + 1) * block, keys);
    for (std::int64_t kb = 0; kb < kb_count; ++kb) {
      const std::int64_t k_lo = kb * block, k_hi = std::min((kb + 1) * block, keys);
      if (!visits(qb, kb, q_lo, q_hi, k_lo, k_hi)) continue;
      bool all = true;
      for (std::int64_t q = q_lo; q < q_hi && all; ++q)
        for (std::int64_t k = k_lo; k < k_hi && all; ++k) all = allows(q, k);
      const std::size_t at = static_cast<std::size_t>(r * kb_count + m.kv_num_blocks[static_cast<std::size_t>(r)]++);
      m.kv_indices[at] = kb;
      m.full[at] = all ? 1 : 0;
    }
  }
  return m;
}

}  // namespace

BlockMask block_mask(const BlockPattern& pattern, std::int64_t queries, std::int64_t keys) {
  pattern.validate();
  require(queries >= 1 && keys >= queries, "block_mask: {} queries over {} keys (expected 1 <= queries <= keys)",
          queries, keys);
  return build(
      queries, keys, pattern.block,
      [&](std::int64_t qb, std::int64_t kb, std::int64_t, std::int64_t, std::int64_t, std::int64_t) {
        return pattern.visits(qb, kb);
      },
      [&](std::int64_t q, std::int64_t k) { return pattern.allows(q, k); });
}

BlockMask block_mask_from(const Mask& mask, std::int64_t block) {
  require(block >= 1, "block_mask_from: block {} (expected >= 1)", block);
  require(mask.queries() >= 1 && mask.keys() >= mask.queries(),
          "block_mask_from: mask of {} queries over {} keys (expected 1 <= queries <= keys)", mask.queries(),
          mask.keys());
  const std::int64_t offset = mask.keys() - mask.queries();
  const auto allows = [&](std::int64_t q, std::int64_t k) { return mask.allows(q - offset, k); };
  return build(
      mask.queries(), mask.keys(), block,
      [&](std::int64_t, std::int64_t, std::int64_t q_lo, std::int64_t q_hi, std::int64_t k_lo, std::int64_t k_hi) {
        for (std::int64_t q = q_lo; q < q_hi; ++q)
          for (std::int64_t k = k_lo; k < k_hi; ++k)
            if (allows(q, k)) return true;
        return false;
      },
      allows);
}

Mask element_mask(const BlockPattern& pattern, std::int64_t queries, std::int64_t keys) {
  pattern.validate();
  require(queries >= 1 && keys >= queries, "element_mask: {} queries over {} keys (expected 1 <= queries <= keys)",
          queries, keys);
  Mask mask(queries, keys, false);
  for (std::int64_t i = 0; i < queries; ++i)
    for (std::int64_t k = 0; k < keys; ++k) mask.set(i, k, pattern.allows(keys - queries + i, k));
  return mask;
}

Tensor block_sparse_attention(ConstMatrix q, ConstMatrix k, ConstMatrix v, const BlockPattern& pattern,
                              const BlockMask& mask, BlockedWork* work) {
  pattern.validate();
  if (q.cols != k.cols || k.rows != v.rows || q.rows > k.rows || q.rows < 1)
    fail("block_sparse_attention: q {}, k {}, v {} (expected q [Tq, d], k [Tk, d], v [Tk, dv], 1 <= Tq <= Tk)",
         q.shape_str(), k.shape_str(), v.shape_str());
  if (mask.queries != q.rows || mask.keys != k.rows || mask.block != pattern.block)
    fail("block_sparse_attention: mask of {} queries, {} keys, block {} for q {}, k {}, block {}", mask.queries,
         mask.keys, mask.block, q.shape_str(), k.shape_str(), pattern.block);
  const std::int64_t Tq = q.rows, Tk = k.rows, d = q.cols, dv = v.cols, B = pattern.block, offset = Tk - Tq;
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  Tensor out(Shape{Tq, dv});
  std::vector<float> acc(static_cast<std::size_t>(dv)), scores(static_cast<std::size_t>(B));
  for (std::int64_t i = 0; i < Tq; ++i) {
    const std::int64_t pos = offset + i, row = pos / B - mask.first_query_block;
    float running_max = -std::numeric_limits<float>::infinity(), running_sum = 0.0f;
    std::ranges::fill(acc, 0.0f);
    const auto qi = q.row(i);
    for (std::int64_t n = 0; n < mask.kv_num_blocks[static_cast<std::size_t>(row)]; ++n) {
      const std::int64_t kb = mask.index(row, n), k_lo = kb * B, k_hi = std::min(k_lo + B, Tk);
      const bool full = mask.is_full(row, n);
      float block_max = -std::numeric_limits<float>::infinity();
      for (std::int64_t j = k_lo; j < k_hi; ++j) {
        float s = -std::numeric_limits<float>::infinity();
        if (full || pattern.allows(pos, j)) {
          double dot = 0.0;
          const auto kj = k.row(j);
          for (std::int64_t c = 0; c < d; ++c) dot += static_cast<double>(qi[c]) * kj[c];
          s = static_cast<float>(dot * scale);
          if (work) ++work->pairs_scored;
        }
        scores[static_cast<std::size_t>(j - k_lo)] = s;
        block_max = std::max(block_max, s);
      }
      if (work) ++work->blocks_visited;
      if (block_max == -std::numeric_limits<float>::infinity()) continue;  // a partial block with no key for i
      // Online softmax: move the running sum and accumulator to the new maximum, then add this block.
      const float new_max = std::max(running_max, block_max), rescale = std::exp(running_max - new_max);
      running_sum *= rescale;
      for (float& a : acc) a *= rescale;
      for (std::int64_t j = k_lo; j < k_hi; ++j) {
        const float s = scores[static_cast<std::size_t>(j - k_lo)];
        if (s == -std::numeric_limits<float>::infinity()) continue;
        const float p = std::exp(s - new_max);
        running_sum += p;
        const auto vj = v.row(j);
        for (std::int64_t c = 0; c < dv; ++c) acc[static_cast<std::size_t>(c)] += p * vj[c];
      }
      running_max = new_max;
    }
    auto oi = out.matrix().row(i);
    for (std::int64_t c = 0; c < dv; ++c)
      oi[c] = running_sum > 0.0f ? acc[static_cast<std::size_t>(c)] / running_sum : 0.0f;
  }
  return out;
}

std::int64_t block_sparse_decode_entries(const BlockPattern& pattern, std::int64_t t) {
  pattern.validate();
  require(t >= 0, "block_sparse_decode_entries: context {} (expected >= 0)", t);
  if (t == 0) return 0;
  // Count the visited key blocks of the query's block qb without walking them (a prefill sums this over every
  // position): the local run [qb - local + 1, qb], the global blocks before that run, and the strided blocks
  // qb - j stride (j >= 1) before the run and past the global ones.
  const std::int64_t qb = (t - 1) / pattern.block;
  const std::int64_t local = std::min(pattern.local_blocks, qb + 1);
  const std::int64_t first_local = qb - local + 1;
  const std::int64_t global = std::min(pattern.global_blocks, first_local);
  std::int64_t strided = 0;
  if (pattern.stride > 0 && qb >= pattern.global_blocks) {
    const std::int64_t first_j = (local + pattern.stride - 1) / pattern.stride;  // qb - j stride < first_local
    const std::int64_t last_j = (qb - pattern.global_blocks) / pattern.stride;   // qb - j stride >= global_blocks
    strided = std::max<std::int64_t>(0, last_j - first_j + 1);
  }
  // Every visited block before the diagonal is whole; the diagonal one holds the tokens up to t.
  return (local + global + strided - 1) * pattern.block + (t - qb * pattern.block);
}

CacheCard with_block_sparse(CacheCard card, const BlockPattern& pattern) {
  pattern.validate();
  const auto reads = card.decode_reads;
  card.decode_reads = [reads, pattern](std::int64_t t) {
    std::vector<DecodeRead> read = reads(block_sparse_decode_entries(pattern, t));
    for (DecodeRead& r : read) r.what = "only the keys and values of the visited blocks";
    return read;
  };
  card.mechanism += fmt::format(", block-sparse (block {}, {} local, {} global, stride {})", pattern.block,
                                pattern.local_blocks, pattern.global_blocks, pattern.stride);
  // The dense card's wording no longer holds: say what the pattern changes, and what it does not.
  std::string visited = fmt::format("the diagonal block and {} before it", pattern.local_blocks - 1);
  if (pattern.global_blocks > 0)
    visited += fmt::format(", the first {} block{} of the sequence (global)", pattern.global_blocks,
                           pattern.global_blocks == 1 ? "" : "s");
  if (pattern.stride > 0) visited += fmt::format(", every {}th block back (strided)", pattern.stride);
  card.trade_offs = fmt::format(
      "memory as dense: every token is stored, since a later query block may visit any block, so nothing can be "
      "evicted; bandwidth and attention FLOPs per decode step fall to the blocks of {} tokens that the query "
      "visits ({}); quality: a key outside those blocks is invisible to that query, whatever it holds; "
      "complexity: block tables per query block and a kernel that gathers whole blocks",
      pattern.block, visited);
  return card;
}

}  // namespace af
