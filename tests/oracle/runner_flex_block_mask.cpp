// The `flex_block_mask` reference: q/k/v/o projections and torch's flex_attention (eager, unfused, on the CPU)
// with a BlockMask from create_block_mask over the chapter-10 block pattern, recorded with the BlockMask's tables.
// Prefill: one flex call over the T tokens, query and key blocks of `block` tokens. Decode: each step is a flex
// call with one query over the whole cache, its BlockMask built for that step (query blocks of `decode_q_block`
// rows, key blocks of `block`), the query's absolute position given to the mask function as an offset.
//
// Replayed per head (query head h reads KV head h / (H / G)) with af::block_mask and af::block_sparse_attention.
// The tables are compared as sets per query-block row: prefill rows, then one row per decode step. flex pads the
// element mask to whole blocks with "masked", so a block cut by the end of the sequence (or a query block with
// padding rows) is never full there; the library calls a visited block full when every element inside the matrix
// is allowed. The runner states flex's convention from the library's tables: full in flex = full in the library
// and not cut on either side.
#include "af/block_sparse.hpp"
#include "af/linalg.hpp"
#include "oracle.hpp"

#include <fmt/format.h>

#include <algorithm>

namespace oracle {

namespace {

// Columns [first, first + count) of m as a contiguous [rows, count] tensor.
af::Tensor columns(af::ConstMatrix m, std::int64_t first, std::int64_t count) {
  af::Tensor out(af::Shape{m.rows, count});
  for (std::int64_t r = 0; r < m.rows; ++r) std::copy_n(m.row(r).begin() + first, count, out.matrix().row(r).begin());
  return out;
}

// Appends each row of `mask` to the partial and full selections in flex's convention; `query_rows(r)` is the number
// of real (unpadded) queries flex has in that row's query block of `q_block` rows.
template <class QueryRows>
void add_rows(const af::BlockMask& mask, std::int64_t q_block, QueryRows query_rows, Selection& partial,
              Selection& full) {
  for (std::int64_t r = 0; r < mask.rows(); ++r) {
    std::vector<std::int64_t> p(static_cast<std::size_t>(partial.k), -1), f(static_cast<std::size_t>(full.k), -1);
    std::size_t np = 0, nf = 0;
    for (std::int64_t n = 0; n < mask.kv_num_blocks[static_cast<std::size_t>(r)]; ++n) {
      const std::int64_t kb = mask.index(r, n);
      const bool whole_key_block = std::min((kb + 1) * mask.block, mask.keys) - kb * mask.block == mask.block;
      const bool flex_full = mask.is_full(r, n) && whole_key_block && query_rows(r) == q_block;
      if (flex_full)
        f.at(nf++) = kb;
      else
        p.at(np++) = kb;
    }
    partial.indices.insert(partial.indices.end(), p.begin(), p.end());
    full.indices.insert(full.indices.end(), f.begin(), f.end());
    ++partial.rows;
    ++full.rows;
  }
}

}  // namespace

std::vector<Outputs> run_flex_block_mask(const Case& c) {
  af::GroupedShape layer;
  layer.hidden = c.config_int("hidden_size");
  layer.heads = c.config_int("num_attention_heads");
  layer.kv_heads = c.config_int("num_key_value_heads");
  layer.head_dim = c.config_int("head_dim");
  af::BlockPattern pattern;
  pattern.block = c.config_int("block");
  pattern.local_blocks = c.config_int("local_blocks");
  pattern.global_blocks = c.config_int("global_blocks");
  pattern.stride = c.config_int("stride");
  const std::int64_t decode_q_block = c.config_int("decode_q_block");
  try {
    layer.validate();
    pattern.validate();
  } catch (const af::Error& e) {
    throw CaseError(fmt::format("{}: {}", c.name, e.what()));
  }
  // A case recorded from a released mask function names it; the pattern fields must be the ones it equals.
  if (const Fields config = c.config_fields(); config.given("mask_mod")) {
    const std::string mask_mod = config.string("mask_mod");
    if (mask_mod != "transformers.masking_utils.chunked_causal_mask_function")
      throw CaseError(
          fmt::format("{} \"{}\" is not a mask function this build knows (it knows transformers' "
                      "chunked_causal_mask_function)",
                      config.label("mask_mod"), mask_mod));
    if (pattern.local_blocks != 1 || pattern.global_blocks != 0 || pattern.stride != 0)
      throw CaseError(
          fmt::format("{} is chunked attention: local_blocks 1, global_blocks 0, stride 0 (the case has "
                      "{}, {}, {})",
                      config.label("mask_mod"), pattern.local_blocks, pattern.global_blocks, pattern.stride));
  }
  if (decode_q_block < 1)
    throw CaseError(fmt::format("{}: config decode_q_block is {} (expected >= 1)", c.name, decode_q_block));
  const af::GroupedWeights w = read_grouped_weights(c, layer, false, false);
  const std::int64_t h = layer.hidden, d = layer.head_dim, T = c.prefill_len, N = c.decode_steps;
  const std::int64_t group = layer.heads / layer.kv_heads;
  const af::Tensor x = c.tensor("input.hidden_states", af::Shape{1, T + N, h}).reshaped(af::Shape{T + N, h});
  // The cache: every token's keys and values stay (a later query block may visit any block).
  const af::Tensor q = af::linear(x.matrix(), w.q_proj.matrix());
  const af::Tensor k = af::linear(x.matrix(), w.k_proj.matrix());
  const af::Tensor v = af::linear(x.matrix(), w.v_proj.matrix());

  const std::int64_t key_blocks = (T + N + pattern.block - 1) / pattern.block;
  Selection partial{"kv_blocks", 0, key_blocks, {}}, full{"full_kv_blocks", 0, key_blocks, {}};
  const af::BlockMask prefill_mask = af::block_mask(pattern, T, T);
  add_rows(
      prefill_mask, pattern.block, [&](std::int64_t r) { return std::min(pattern.block, T - r * pattern.block); },
      partial, full);
  std::vector<af::BlockMask> step_masks;
  for (std::int64_t i = 0; i < N; ++i) {
    step_masks.push_back(af::block_mask(pattern, 1, T + i + 1));
    add_rows(
        step_masks.back(), decode_q_block, [](std::int64_t) { return std::int64_t{1}; }, partial, full);
  }

  af::Tensor prefill_context(af::Shape{T, layer.heads * d}), decode_context(af::Shape{N, layer.heads * d});
  for (std::int64_t head = 0; head < layer.heads; ++head) {
    const std::int64_t kv = head / group;
    const af::Tensor qh = columns(q.matrix(), head * d, d);
    const af::Tensor kh = columns(k.matrix(), kv * d, d), vh = columns(v.matrix(), kv * d, d);
    const af::Tensor pre = af::block_sparse_attention(qh.matrix().rows_slice(0, T), kh.matrix().rows_slice(0, T),
                                                      vh.matrix().rows_slice(0, T), pattern, prefill_mask);
    for (std::int64_t t = 0; t < T; ++t)
      std::ranges::copy(pre.matrix().row(t), prefill_context.matrix().row(t).begin() + head * d);
    for (std::int64_t i = 0; i < N; ++i) {
      const std::int64_t keys = T + i + 1;
      const af::Tensor step =
          af::block_sparse_attention(qh.matrix().rows_slice(T + i, 1), kh.matrix().rows_slice(0, keys),
                                     vh.matrix().rows_slice(0, keys), pattern, step_masks[static_cast<std::size_t>(i)]);
      std::ranges::copy(step.matrix().row(0), decode_context.matrix().row(i).begin() + head * d);
    }
  }
  Outputs out{af::linear(prefill_context.matrix(), w.o_proj.matrix()),
              af::linear(decode_context.matrix(), w.o_proj.matrix()), "blocked"};
  out.selected = {partial, full};
  return {out};
}

}  // namespace oracle
