#include "af/sliding_window.hpp"

#include "af/error.hpp"
#include "af/linalg.hpp"
#include "af/sinks.hpp"

#include <algorithm>
#include <limits>

namespace af {

Mask sliding_window_mask(std::int64_t queries, std::int64_t keys, std::int64_t first_query, std::int64_t window) {
  require(window >= 1, "sliding_window_mask: window {} (expected >= 1)", window);
  require(queries >= 0 && keys >= 0 && first_query >= 0,
          "sliding_window_mask: {} queries from index {} over {} keys (expected sizes >= 0)", queries, first_query,
          keys);
  Mask mask(queries, keys, false);
  for (std::int64_t i = 0; i < queries; ++i)
    for (std::int64_t j = 0; j < keys; ++j) mask.set(i, j, in_window(first_query + i, j, window));
  return mask;
}

Tensor windowed_grouped_attend(ConstMatrix q, std::span<const std::int64_t> query_index, ConstMatrix keys,
                               ConstMatrix values, std::span<const std::int64_t> key_index, const GroupedShape& shape,
                               std::int64_t window, const AttentionOptions& options) {
  require(window >= 1, "windowed_grouped_attend: window {} (expected >= 1)", window);
  require(options.causal, "windowed_grouped_attend: a sliding window is causal (expected options.causal = true)");
  // A window is the sink mask of chapter 09 with no sinks and no sink logits: one loop serves both.
  return sink_grouped_attend(q, query_index, keys, values, key_index, shape, SinkSpec{0, window, {}}, options);
}

Tensor windowed_attend_full_cache(ConstMatrix q, const GroupedShape& shape, const GroupedKvCache& cache,
                                  std::int64_t window, const AttentionOptions& options) {
  shape.validate();
  require(cache.kv_heads() == shape.kv_heads && cache.head_dim() == shape.head_dim,
          "windowed_attend_full_cache: the cache holds {} KV heads of dimension {} (expected {} of {})",
          cache.kv_heads(), cache.head_dim(), shape.kv_heads, shape.head_dim);
  require(q.rows <= cache.size(), "windowed_attend_full_cache: {} queries over {} cached tokens", q.rows, cache.size());
  // The cache is token-major [capacity, G, d]: KV head 0's strided view, widened to all G heads, is [size, G * d].
  const ConstMatrix k0 = cache.keys(0), v0 = cache.values(0);
  const ConstMatrix keys{k0.data, k0.rows, shape.kv_heads * shape.head_dim, k0.row_stride};
  const ConstMatrix values{v0.data, v0.rows, shape.kv_heads * shape.head_dim, v0.row_stride};
  std::vector<std::int64_t> key_index(static_cast<std::size_t>(cache.size())), query_index;
  for (std::int64_t j = 0; j < cache.size(); ++j) key_index[static_cast<std::size_t>(j)] = j;
  for (std::int64_t i = cache.size() - q.rows; i < cache.size(); ++i) query_index.push_back(i);
  return windowed_grouped_attend(q, query_index, keys, values, key_index, shape, window, options);
}

RollingKvCache::RollingKvCache(std::int64_t window, std::int64_t kv_heads, std::int64_t head_dim)
    : kv_heads_(kv_heads), head_dim_(head_dim) {
  require(window >= 1, "RollingKvCache: window {} (expected >= 1 slot)", window);
  require(kv_heads >= 1 && head_dim >= 1, "RollingKvCache: kv_heads {}, head_dim {} (expected both >= 1)", kv_heads,
          head_dim);
  keys_ = Tensor(Shape{window, kv_heads * head_dim});
  values_ = Tensor(Shape{window, kv_heads * head_dim});
}

void RollingKvCache::append(ConstMatrix keys, ConstMatrix values) {
  const std::int64_t width = kv_heads_ * head_dim_;
  if (!(keys.cols == width && values.cols == width && keys.rows == values.rows))
    fail("RollingKvCache::append: keys {} and values {} (expected [n, {}] each: {} KV heads x {})", keys.shape_str(),
         values.shape_str(), width, kv_heads_, head_dim_);
  for (std::int64_t r = 0; r < keys.rows; ++r, ++seen_) {
    const std::int64_t slot = slot_of(seen_);  // overwrites token seen_ - W
    std::ranges::copy(keys.row(r), keys_.matrix().row(slot).begin());
    std::ranges::copy(values.row(r), values_.matrix().row(slot).begin());
  }
}

std::int64_t RollingKvCache::index_in_slot(std::int64_t slot) const {
  require(slot >= 0 && slot < size(), "RollingKvCache::index_in_slot: slot {} (expected 0 <= slot < {} held)", slot,
          size());
  return seen_ - 1 - (seen_ - 1 - slot) % window();
}

std::vector<std::int64_t> RollingKvCache::slot_indices() const {
  std::vector<std::int64_t> indices;
  for (std::int64_t s = 0; s < size(); ++s) indices.push_back(index_in_slot(s));
  return indices;
}

std::int64_t RollingKvCache::bytes_held() const {
  return 2 * size() * kv_heads_ * head_dim_ * static_cast<std::int64_t>(sizeof(float));
}

Tensor rolling_attend(ConstMatrix q, ConstMatrix new_keys, ConstMatrix new_values, const GroupedShape& shape,
                      RollingKvCache& cache, const AttentionOptions& options) {
  require(cache.kv_heads() == shape.kv_heads && cache.head_dim() == shape.head_dim,
          "rolling_attend: the cache holds {} KV heads of dimension {} (expected {} of {})", cache.kv_heads(),
          cache.head_dim(), shape.kv_heads, shape.head_dim);
  require(q.rows == new_keys.rows, "rolling_attend: {} queries for {} new keys (expected one per token)", q.rows,
          new_keys.rows);
  std::vector<std::int64_t> query_index;
  for (std::int64_t i = 0; i < q.rows; ++i) query_index.push_back(cache.seen() + i);
  if (q.rows == 1) {  // decode: the ring, once the token is in, holds exactly what the query sees
    cache.append(new_keys, new_values);
    return windowed_grouped_attend(q, query_index, cache.keys(), cache.values(), cache.slot_indices(), shape,
                                   cache.window(), options);
  }
  // A chunk: the ring's entries and the chunk's own keys side by side, then the chunk goes into the ring.
  const std::int64_t held = cache.size(), width = shape.kv_heads * shape.head_dim;
  Tensor keys(Shape{held + q.rows, width}), values(Shape{held + q.rows, width});
  std::vector<std::int64_t> key_index = cache.slot_indices();
  for (std::int64_t r = 0; r < held; ++r) {
    std::ranges::copy(cache.keys().row(r), keys.matrix().row(r).begin());
    std::ranges::copy(cache.values().row(r), values.matrix().row(r).begin());
  }
  for (std::int64_t r = 0; r < q.rows; ++r) {
    std::ranges::copy(new_keys.row(r), keys.matrix().row(held + r).begin());
    std::ranges::copy(new_values.row(r), values.matrix().row(held + r).begin());
    key_index.push_back(query_index[static_cast<std::size_t>(r)]);
  }
  Tensor out = windowed_grouped_attend(q, query_index, keys.matrix(), values.matrix(), key_index, shape, cache.window(),
                                       options);
  cache.append(new_keys, new_values);
  return out;
}

Tensor sliding_window_attention(ConstMatrix x, std::span<const std::int64_t> positions, const GroupedShape& shape,
                                const GroupedWeights& weights, const Rope& rope, const AttentionOptions& options,
                                RollingKvCache& cache) {
  weights.validate(shape);
  if (!(x.cols == shape.hidden))
    fail("sliding_window_attention: input is {} (expected [T, {}])", x.shape_str(), shape.hidden);
  require(rope.head_dim() == shape.head_dim, "sliding_window_attention: RoPE of dimension {} for heads of {}",
          rope.head_dim(), shape.head_dim);
  Tensor q = linear(x, weights.q_proj.matrix(), weights.q_bias.values());  // [n, H d]
  Tensor k = linear(x, weights.k_proj.matrix(), weights.k_bias.values());  // [n, G d]
  const Tensor v = linear(x, weights.v_proj.matrix(), weights.v_bias.values());
  rope.rotate_rows(q.matrix(), positions);
  rope.rotate_rows(k.matrix(), positions);  // stored rotated: the slot's key keeps its token's position
  const Tensor context = rolling_attend(q.matrix(), k.matrix(), v.matrix(), shape, cache, options);
  return linear(context.matrix(), weights.o_proj.matrix(), weights.o_bias.values());
}

InterleavedModel gemma3_27b(DType dtype) {
  const std::string source =
      "google-deepmind/gemma @ 7691fd4, gemma/gm/nn/_gemma.py (Gemma3_27B: 62 layers, num_heads 32, num_kv_heads 16, "
      "head_dim 128, sliding_window_size 1024, GEMMA3_ATTENTION_PATTERN 5 local : 1 global -> 52 local + 10 global)";
  const CacheCard card = dense_kv_card("GQA (groups of 2)", 32, 16, 128, dtype);
  return {"Gemma 3 27B",
          source,
          {ModelCache{"Gemma 3 27B local layers", source, 52, with_sliding_window(card, 1024)},
           ModelCache{"Gemma 3 27B global layers", source, 10, card}}};
}

InterleavedModel gpt_oss_120b(DType dtype) {
  const std::string source =
      "openai/gpt-oss @ 7b58334, gpt_oss/torch/model.py (36 layers, 64 heads, 8 KV heads, head_dim 64, "
      "sliding_window 128 on even layers -> 18 banded + 18 dense)";
  const CacheCard card = dense_kv_card("GQA (groups of 8)", 64, 8, 64, dtype);
  return {"gpt-oss-120b",
          source,
          {ModelCache{"gpt-oss-120b banded layers", source, 18, with_sliding_window(card, 128)},
           ModelCache{"gpt-oss-120b dense layers", source, 18, card}}};
}

}  // namespace af
