#include "af/sinks.hpp"

#include "af/error.hpp"
#include "af/linalg.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <numeric>

namespace af {

Mask sink_window_mask(std::int64_t queries, std::int64_t keys, std::int64_t first_query, std::int64_t sinks,
                      std::int64_t window) {
  require(sinks >= 0 && window >= 1, "sink_window_mask: sinks {}, window {} (expected sinks >= 0, window >= 1)", sinks,
          window);
  require(queries >= 0 && keys >= 0 && first_query >= 0,
          "sink_window_mask: {} queries from index {} over {} keys (expected sizes >= 0)", queries, first_query, keys);
  Mask mask(queries, keys, false);
  for (std::int64_t i = 0; i < queries; ++i)
    for (std::int64_t j = 0; j < keys; ++j) mask.set(i, j, in_sink_window(first_query + i, j, sinks, window));
  return mask;
}

double softmax_with_sink(std::span<float> scores, float sink_logit) {
  require(std::isfinite(sink_logit), "softmax_with_sink: sink logit {} (expected finite)", sink_logit);
  float top = sink_logit;
  for (const float s : scores) top = std::max(top, s);
  double total = std::exp(static_cast<double>(sink_logit) - top);
  const double sink_term = total;
  for (float& s : scores) {
    const double e = std::exp(static_cast<double>(s) - top);  // exp(-inf) = 0 for a masked key
    s = static_cast<float>(e);
    total += e;
  }
  for (float& s : scores) s = static_cast<float>(s / total);
  return sink_term / total;
}

Tensor sink_grouped_attend(ConstMatrix q, std::span<const std::int64_t> query_index, ConstMatrix keys,
                           ConstMatrix values, std::span<const std::int64_t> key_index, const GroupedShape& shape,
                           const SinkSpec& spec, const AttentionOptions& options) {
  shape.validate();
  require(spec.sinks >= 0 && spec.window >= 1, "sink_grouped_attend: sinks {}, window {} (expected >= 0 and >= 1)",
          spec.sinks, spec.window);
  require(options.causal, "sink_grouped_attend: sink attention is causal (expected options.causal = true)");
  require(spec.sink_logits.empty() || static_cast<std::int64_t>(spec.sink_logits.size()) == shape.heads,
          "sink_grouped_attend: {} sink logits for {} query heads (expected one per head, or none)",
          spec.sink_logits.size(), shape.heads);
  const std::int64_t d = shape.head_dim, kv_width = shape.kv_heads * d;
  if (!(q.cols == shape.heads * d && static_cast<std::int64_t>(query_index.size()) == q.rows))
    fail("sink_grouped_attend: queries {} with {} indices (expected [Tq, {}] and Tq indices)", q.shape_str(),
         query_index.size(), shape.heads * d);
  if (!(keys.cols == kv_width && values.cols == kv_width && keys.rows == values.rows &&
        static_cast<std::int64_t>(key_index.size()) == keys.rows))
    fail("sink_grouped_attend: keys {}, values {}, {} key indices (expected [Tk, {}] each and Tk indices)",
         keys.shape_str(), values.shape_str(), key_index.size(), kv_width);
  const double scale = options.scale.value_or(default_scale(d));
  Tensor out(Shape{q.rows, shape.heads * d});
  std::vector<float> weights(static_cast<std::size_t>(keys.rows));
  for (std::int64_t i = 0; i < q.rows; ++i)
    for (std::int64_t h = 0; h < shape.heads; ++h) {
      const auto qh = static_cast<std::size_t>(h * d), kv = static_cast<std::size_t>(shape.kv_head_of(h) * d);
      const auto query = q.row(i).subspan(qh, static_cast<std::size_t>(d));
      for (std::int64_t j = 0; j < keys.rows; ++j)
        weights[static_cast<std::size_t>(j)] =
            in_sink_window(query_index[static_cast<std::size_t>(i)], key_index[static_cast<std::size_t>(j)], spec.sinks,
                           spec.window)
                ? static_cast<float>(dot(query, keys.row(j).subspan(kv, static_cast<std::size_t>(d))) * scale)
                : -std::numeric_limits<float>::infinity();
      if (spec.sink_logits.empty())
        softmax(weights);
      else
        softmax_with_sink(weights, spec.sink_logits[static_cast<std::size_t>(h)]);
      const auto context = out.matrix().row(i).subspan(qh, static_cast<std::size_t>(d));
      for (std::int64_t j = 0; j < keys.rows; ++j)
        if (weights[static_cast<std::size_t>(j)] != 0.0f)
          axpy(weights[static_cast<std::size_t>(j)], values.row(j).subspan(kv, static_cast<std::size_t>(d)), context);
    }
  return out;
}

SinkKvCache::SinkKvCache(std::int64_t sinks, std::int64_t window, std::int64_t kv_heads, std::int64_t head_dim)
    : sinks_(sinks), kv_heads_(kv_heads), head_dim_(head_dim) {
  require(sinks >= 0 && window >= 1, "SinkKvCache: sinks {}, window {} (expected sinks >= 0, window >= 1)", sinks,
          window);
  require(kv_heads >= 1 && head_dim >= 1, "SinkKvCache: kv_heads {}, head_dim {} (expected both >= 1)", kv_heads,
          head_dim);
  require(window <= (std::int64_t{1} << 24) - sinks, "SinkKvCache: {} sinks + window {} rows (expected <= 2^24)", sinks,
          window);
  keys_ = Tensor(Shape{sinks + window, kv_heads * head_dim});
  values_ = Tensor(Shape{sinks + window, kv_heads * head_dim});
}

void SinkKvCache::append(ConstMatrix keys, ConstMatrix values) {
  const std::int64_t width = kv_heads_ * head_dim_;
  if (!(keys.cols == width && values.cols == width && keys.rows == values.rows))
    fail("SinkKvCache::append: keys {} and values {} (expected [n, {}] each: {} KV heads x {})", keys.shape_str(),
         values.shape_str(), width, kv_heads_, head_dim_);
  for (std::int64_t r = 0; r < keys.rows; ++r, ++seen_) {
    const std::int64_t row = seen_ < sinks_ ? seen_ : sinks_ + (seen_ - sinks_) % window();
    std::ranges::copy(keys.row(r), keys_.matrix().row(row).begin());
    std::ranges::copy(values.row(r), values_.matrix().row(row).begin());
  }
}

std::int64_t SinkKvCache::size() const {
  return std::min(seen_, sinks_) + std::min(std::max<std::int64_t>(seen_ - sinks_, 0), window());
}

std::int64_t SinkKvCache::index_in_row(std::int64_t row) const {
  require(row >= 0 && row < size(), "SinkKvCache::index_in_row: row {} (expected 0 <= row < {} held)", row, size());
  if (row < sinks_) return row;
  const std::int64_t later = seen_ - sinks_, slot = row - sinks_;  // tokens past the sinks, their ring slot
  return sinks_ + later - 1 - (later - 1 - slot) % window();
}

std::vector<std::int64_t> SinkKvCache::row_indices() const {
  std::vector<std::int64_t> indices;
  for (std::int64_t r = 0; r < size(); ++r) indices.push_back(index_in_row(r));
  return indices;
}

std::int64_t SinkKvCache::bytes_held() const {
  return 2 * size() * kv_heads_ * head_dim_ * static_cast<std::int64_t>(sizeof(float));
}

namespace {

void check_layer(ConstMatrix x, const GroupedShape& shape, const GroupedWeights& weights, const Rope& rope,
                 const SinkKvCache& cache, const char* who) {
  weights.validate(shape);
  if (!(x.cols == shape.hidden)) fail("{}: input is {} (expected [T, {}])", who, x.shape_str(), shape.hidden);
  require(rope.head_dim() == shape.head_dim, "{}: RoPE of dimension {} for heads of {}", who, rope.head_dim(),
          shape.head_dim);
  require(cache.kv_heads() == shape.kv_heads && cache.head_dim() == shape.head_dim,
          "{}: the cache holds {} KV heads of dimension {} (expected {} of {})", who, cache.kv_heads(),
          cache.head_dim(), shape.kv_heads, shape.head_dim);
}

}  // namespace

Tensor sink_attention(ConstMatrix x, std::span<const std::int64_t> positions, const GroupedShape& shape,
                      const GroupedWeights& weights, const Rope& rope, const AttentionOptions& options,
                      std::span<const float> sink_logits, SinkKvCache& cache) {
  check_layer(x, shape, weights, rope, cache, "sink_attention");
  require(static_cast<std::int64_t>(positions.size()) == x.rows, "sink_attention: {} positions for {} tokens",
          positions.size(), x.rows);
  Tensor q = linear(x, weights.q_proj.matrix(), weights.q_bias.values());
  Tensor k = linear(x, weights.k_proj.matrix(), weights.k_bias.values());
  const Tensor v = linear(x, weights.v_proj.matrix(), weights.v_bias.values());
  rope.rotate_rows(q.matrix(), positions);
  rope.rotate_rows(k.matrix(), positions);  // cached rotated: original positions
  // The held rows and the chunk's own keys side by side (a chunk's first queries need keys it would evict).
  const std::int64_t held = cache.size(), width = shape.kv_heads * shape.head_dim;
  Tensor keys(Shape{held + x.rows, width}), values(Shape{held + x.rows, width});
  std::vector<std::int64_t> key_index = cache.row_indices(), query_index;
  for (std::int64_t r = 0; r < held; ++r) {
    std::ranges::copy(cache.keys().row(r), keys.matrix().row(r).begin());
    std::ranges::copy(cache.values().row(r), values.matrix().row(r).begin());
  }
  for (std::int64_t r = 0; r < x.rows; ++r) {
    std::ranges::copy(k.matrix().row(r), keys.matrix().row(held + r).begin());
    std::ranges::copy(v.matrix().row(r), values.matrix().row(held + r).begin());
    key_index.push_back(cache.seen() + r);
    query_index.push_back(cache.seen() + r);
  }
  const SinkSpec spec{cache.sinks(), cache.window(), sink_logits};
  const Tensor context =
      sink_grouped_attend(q.matrix(), query_index, keys.matrix(), values.matrix(), key_index, shape, spec, options);
  cache.append(k.matrix(), v.matrix());
  return linear(context.matrix(), weights.o_proj.matrix(), weights.o_bias.values());
}

Tensor sink_attention_slot_positions(ConstMatrix x, const GroupedShape& shape, const GroupedWeights& weights,
                                     const Rope& rope, const AttentionOptions& options, SinkKvCache& cache) {
  check_layer(x, shape, weights, rope, cache, "sink_attention_slot_positions");
  Tensor q = linear(x, weights.q_proj.matrix(), weights.q_bias.values());
  const Tensor k = linear(x, weights.k_proj.matrix(), weights.k_bias.values());
  const Tensor v = linear(x, weights.v_proj.matrix(), weights.v_bias.values());
  Tensor context(Shape{x.rows, shape.heads * shape.head_dim});
  for (std::int64_t t = 0; t < x.rows; ++t) {
    cache.append(k.matrix().rows_slice(t, 1), v.matrix().rows_slice(t, 1));  // unrotated
    // Rank the held rows by sequence index; rank r is the position the key gets now.
    const std::vector<std::int64_t> index = cache.row_indices();
    std::vector<std::int64_t> order(index.size());
    std::iota(order.begin(), order.end(), std::int64_t{0});
    std::ranges::sort(order, {}, [&](std::int64_t r) { return index[static_cast<std::size_t>(r)]; });
    const std::int64_t held = cache.size();
    Tensor keys(Shape{held, shape.kv_heads * shape.head_dim});
    std::vector<std::int64_t> rank(static_cast<std::size_t>(held));
    for (std::int64_t r = 0; r < held; ++r) {
      const std::int64_t row = order[static_cast<std::size_t>(r)];
      std::ranges::copy(cache.keys().row(row), keys.matrix().row(row).begin());
      rank[static_cast<std::size_t>(row)] = r;
    }
    rope.rotate_rows(keys.matrix(), rank);
    Matrix query = q.matrix().rows_slice(t, 1);
    const std::int64_t own = held - 1;
    rope.rotate_rows(query, std::span<const std::int64_t>(&own, 1));
    // All held rows are visible: the cache already holds exactly the sink + window set of this query.
    const std::vector<std::int64_t> query_index{cache.seen() - 1};
    const SinkSpec spec{cache.sinks(), cache.window(), {}};
    const Tensor out =
        sink_grouped_attend(query, query_index, keys.matrix(), cache.values(), index, shape, spec, options);
    std::ranges::copy(out.matrix().row(0), context.matrix().row(t).begin());
  }
  return linear(context.matrix(), weights.o_proj.matrix(), weights.o_bias.values());
}

CacheCard with_kept_sinks(CacheCard card, std::int64_t sinks, std::int64_t window) {
  require(sinks >= 0 && window >= 1, "with_kept_sinks: sinks {}, window {} (expected sinks >= 0, window >= 1)", sinks,
          window);
  const std::int64_t held = sinks + window;
  const auto stored = card.stored_tokens;
  const auto reads = card.decode_reads;
  card.stored_tokens = [stored, held](std::int64_t t) { return stored(std::min(t, held)); };
  card.decode_reads = [reads, held](std::int64_t t) { return reads(std::min(t, held)); };
  card.mechanism += fmt::format(", {} kept sinks + window of {}", sinks, window);
  card.rows_after_prefill = fmt::format("min(T, {})", held);
  card.rows_after_step = fmt::format("min(t + 1, {})", held);
  card.trade_offs = fmt::format(
      "memory and bandwidth stop growing at {} tokens per layer (the first {} and the last {}); quality: every token "
      "between the sinks and the window is gone for good, and the sinks only anchor the softmax; complexity: a ring "
      "beside fixed rows, and a choice of RoPE positions (original or by slot)",
      held, sinks, window);
  return card;
}

}  // namespace af
