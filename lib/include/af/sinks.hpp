#pragma once
/// @file sinks.hpp
/// Sink tokens (chapter 09): two mechanisms that share the name.
///
/// Kept sink tokens (StreamingLLM, Xiao et al. 2023): the first S tokens stay in the cache forever beside a
/// rolling window of the W most recent ones. A query at sequence index q sees the key at index k iff
/// k <= q and (k < S or q - k < W). Two ways to give the kept tokens positions for RoPE:
///  - original positions: keys are cached already rotated by their token's position (as chapter 08 does);
///    nothing changes at read time, but over a stream longer than the cache the query's position and its
///    distance to the sinks grow without bound, past anything the model was trained on;
///  - positions by cache slot: keys are cached before rotation and rotated at read time by their rank in
///    the cache (sinks 0 .. S-1, then the window in order), the query by its own rank; positions then never
///    exceed S + W - 1 however long the stream, at the price of re-rotating every held key at every step.
///
/// Learned sink logits (gpt-oss, OpenAI 2025): one logit per query head joins the softmax denominator as an
/// extra column and is dropped after the softmax, so it takes probability mass without contributing a value.
/// It is a parameter of the layer, not a cached token: it costs no cache bytes.

#include "af/accounting.hpp"
#include "af/grouped_attention.hpp"
#include "af/rope.hpp"
#include "af/softmax.hpp"
#include "af/tensor.hpp"

#include <cstdint>
#include <limits>
#include <span>
#include <vector>

namespace af {

/// Whether a query at sequence index `query` sees the key at `key` with `sinks` kept tokens and a window of
/// `window`: key <= query and (key < sinks or query - key < window).
inline bool in_sink_window(std::int64_t query, std::int64_t key, std::int64_t sinks, std::int64_t window) {
  return key <= query && (key < sinks || query - key < window);
}

/// The `[queries, keys]` sink + window mask: query i at index `first_query + i`, key j at index j.
/// Throws af::Error for sinks < 0, window < 1 or negative sizes.
Mask sink_window_mask(std::int64_t queries, std::int64_t keys, std::int64_t first_query, std::int64_t sinks,
                      std::int64_t window);

/// What a sink attention layer does: kept sinks and window (window = `no_window` for a dense layer), and the
/// learned sink logits, one per query head (empty when the layer has none).
struct SinkSpec {
  static constexpr std::int64_t no_window = std::numeric_limits<std::int64_t>::max();
  std::int64_t sinks = 0;
  std::int64_t window = no_window;
  std::span<const float> sink_logits = {};
};

/// Softmax of `scores` with one extra column of logit `sink_logit` that is dropped afterwards: the returned
/// row sums to 1 - p_sink. Entries equal to -inf get 0. Returns p_sink, the mass the sink took.
double softmax_with_sink(std::span<float> scores, float sink_logit);

/// Grouped attention of `q [Tq, H * d]` at `query_index` over `keys`, `values [Tk, G * d]` at `key_index`:
/// query i sees key j iff `in_sink_window(query_index[i], key_index[j], spec.sinks, spec.window)`, and query
/// head h's softmax gets the extra column `spec.sink_logits[h]` when given. Scale `options.scale` or
/// 1/sqrt(d); `options.causal` must be true. Throws af::Error on disagreeing shapes or arguments.
Tensor sink_grouped_attend(ConstMatrix q, std::span<const std::int64_t> query_index, ConstMatrix keys,
                           ConstMatrix values, std::span<const std::int64_t> key_index, const GroupedShape& shape,
                           const SinkSpec& spec, const AttentionOptions& options);

/// The cache of kept sinks beside a rolling window: rows 0 .. S-1 hold the first S tokens for ever, rows
/// S .. S+W-1 are a ring for the later ones (token t >= S goes to row S + (t - S) mod W). Keys are stored
/// as given: rotated (original positions) or not (positions by slot). Bytes never exceed 2 (S + W) G d 4.
class SinkKvCache {
 public:
  /// Throws af::Error for sinks < 0 or window, kv_heads, head_dim < 1.
  SinkKvCache(std::int64_t sinks, std::int64_t window, std::int64_t kv_heads, std::int64_t head_dim);

  /// Writes keys and values `[n, G * d]` of the next n tokens.
  void append(ConstMatrix keys, ConstMatrix values);

  std::int64_t sinks() const { return sinks_; }
  std::int64_t window() const { return keys_.dim(0) - sinks_; }
  std::int64_t kv_heads() const { return kv_heads_; }
  std::int64_t head_dim() const { return head_dim_; }
  /// Tokens appended so far.
  std::int64_t seen() const { return seen_; }
  /// Rows held: min(seen, S) + min(max(seen - S, 0), W).
  std::int64_t size() const;
  /// The sequence index of the token in row `row` (< size()).
  std::int64_t index_in_row(std::int64_t row) const;
  /// The sequence indices of rows 0 .. size() - 1.
  std::vector<std::int64_t> row_indices() const;
  /// Held keys and values in row order, `[size, G * d]`.
  ConstMatrix keys() const { return keys_.matrix().rows_slice(0, size()); }
  ConstMatrix values() const { return values_.matrix().rows_slice(0, size()); }
  std::int64_t bytes_held() const;

 private:
  Tensor keys_;
  Tensor values_;
  std::int64_t sinks_;
  std::int64_t kv_heads_;
  std::int64_t head_dim_;
  std::int64_t seen_ = 0;
};

/// `card` with `sinks` kept tokens beside a window of `window` (StreamingLLM): at most sinks + window tokens are
/// kept and a decode query reads all of them, as af::SinkKvCache holds them. Throws af::Error for sinks < 0 or
/// window < 1.
CacheCard with_kept_sinks(CacheCard card, std::int64_t sinks, std::int64_t window);

/// One attention layer with RoPE at the tokens' original positions (keys cached rotated), kept sinks and
/// window from the cache, learned sink logits from `sink_logits` (one per query head, or empty): project,
/// rotate q and k by `positions`, attend over the held rows and the chunk's own keys, append, project back.
/// gpt-oss's banded layer is `SinkKvCache(0, 128, ...)` with its logits; its dense layer a cache whose
/// window covers the whole stream. Returns `[n, hidden]`.
Tensor sink_attention(ConstMatrix x, std::span<const std::int64_t> positions, const GroupedShape& shape,
                      const GroupedWeights& weights, const Rope& rope, const AttentionOptions& options,
                      std::span<const float> sink_logits, SinkKvCache& cache);

/// The StreamingLLM layer with positions by cache slot: keys cached unrotated; tokens are processed one at
/// a time; at each step the held keys are rotated by their rank in sequence order (0 .. size-1) and the
/// query by its own rank (size - 1), so no position exceeds S + W - 1. Returns `[n, hidden]`.
Tensor sink_attention_slot_positions(ConstMatrix x, const GroupedShape& shape, const GroupedWeights& weights,
                                     const Rope& rope, const AttentionOptions& options, SinkKvCache& cache);

}  // namespace af
