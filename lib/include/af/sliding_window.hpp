#pragma once
/// @file sliding_window.hpp
/// Sliding-window attention (chapter 08): each query sees only the last W tokens, itself included, and the
/// cache keeps only those W tokens in a ring buffer, so its bytes stop growing once the context passes W.
///
/// The window edge is the one of Hugging Face transformers' Mistral and of gpt-oss's reference: a query at
/// sequence index q sees the key at index k iff 0 <= q - k < W (W keys including its own). Positions for
/// RoPE (the `positions` arguments) and sequence indices (the order tokens were appended) are kept apart:
/// the window is counted in sequence indices, the rotation uses the position ids.

#include "af/accounting.hpp"
#include "af/grouped_attention.hpp"
#include "af/rope.hpp"
#include "af/softmax.hpp"
#include "af/tensor.hpp"

#include <algorithm>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

namespace af {

/// Whether a query at sequence index `query` sees the key at index `key` under a window of `window` tokens:
/// 0 <= query - key < window.
inline bool in_window(std::int64_t query, std::int64_t key, std::int64_t window) {
  return key <= query && query - key < window;
}

/// The `[queries, keys]` sliding-window mask: query i sits at index `first_query + i`, key j at index j.
/// Throws af::Error for window < 1 or negative sizes.
Mask sliding_window_mask(std::int64_t queries, std::int64_t keys, std::int64_t first_query, std::int64_t window);

/// Grouped attention of queries over keys with explicit sequence indices: `q [Tq, H * d]` at
/// `query_index`, `keys` and `values [Tk, G * d]` at `key_index` (in any order: the result does not depend
/// on the order of the keys); query i sees key j iff `in_window(query_index[i], key_index[j], window)`.
/// The scale is `options.scale` or 1/sqrt(d); `options.causal` must be true (a window is causal).
/// A query that sees no key gets zeros. Throws af::Error on disagreeing shapes or window < 1.
Tensor windowed_grouped_attend(ConstMatrix q, std::span<const std::int64_t> query_index, ConstMatrix keys,
                               ConstMatrix values, std::span<const std::int64_t> key_index, const GroupedShape& shape,
                               std::int64_t window, const AttentionOptions& options);

/// The reference the ring buffer must equal: the last Tq queries over a full (never evicting) cache of
/// `cache.size()` tokens, with the window mask.
Tensor windowed_attend_full_cache(ConstMatrix q, const GroupedShape& shape, const GroupedKvCache& cache,
                                  std::int64_t window, const AttentionOptions& options);

/// The rolling KV cache of a windowed grouped layer: `window` slots of keys and values `[W, G * d]`,
/// allocated once. The token with sequence index t is written to slot `t mod W`, overwriting token t - W,
/// the one that no later query can see. Keys are stored as given (already rotated by RoPE), so a slot's key
/// keeps the position of the token that wrote it, wherever the slot lies in the buffer.
class RollingKvCache {
 public:
  /// Throws af::Error for a window, kv_heads or head_dim < 1.
  RollingKvCache(std::int64_t window, std::int64_t kv_heads, std::int64_t head_dim);

  /// Writes keys and values `[n, G * d]` of the next n tokens, slot by slot; with n > W only the last W stay.
  void append(ConstMatrix keys, ConstMatrix values);

  std::int64_t window() const { return keys_.dim(0); }
  std::int64_t kv_heads() const { return kv_heads_; }
  std::int64_t head_dim() const { return head_dim_; }
  /// Tokens appended so far: the sequence index of the next token.
  std::int64_t seen() const { return seen_; }
  /// Entries held: min(seen, W).
  std::int64_t size() const { return std::min(seen_, window()); }
  /// The slot the token at sequence index `t` is written to: t mod W.
  std::int64_t slot_of(std::int64_t t) const { return t % window(); }
  /// The sequence index of the token held in slot `slot` (< size()): the latest t < seen with t mod W = slot.
  std::int64_t index_in_slot(std::int64_t slot) const;
  /// The sequence indices of slots 0 .. size() - 1.
  std::vector<std::int64_t> slot_indices() const;
  /// The held keys and values in slot order, `[size, G * d]` (not in sequence order once the ring wraps).
  ConstMatrix keys() const { return keys_.matrix().rows_slice(0, size()); }
  ConstMatrix values() const { return values_.matrix().rows_slice(0, size()); }
  /// Bytes the ring holds now (float32 keys and values): 2 * min(seen, W) * G * d * 4, never more.
  std::int64_t bytes_held() const;

 private:
  Tensor keys_;    // [W, G * d]
  Tensor values_;  // [W, G * d]
  std::int64_t kv_heads_;
  std::int64_t head_dim_;
  std::int64_t seen_ = 0;
};

/// Attention of new queries `q [n, H * d]` (the next n tokens) through the rolling cache, whose new keys and
/// values `[n, G * d]` are not yet appended: a single decode token (n = 1) is appended first and attends over
/// the ring, which then holds exactly the min(t + 1, W) tokens it sees; a chunk of n > 1 tokens attends over
/// the ring and its own keys together (its first queries need keys the chunk would overwrite), then is
/// appended. Returns `[n, H * d]`.
Tensor rolling_attend(ConstMatrix q, ConstMatrix new_keys, ConstMatrix new_values, const GroupedShape& shape,
                      RollingKvCache& cache, const AttentionOptions& options);

/// One windowed grouped attention layer with RoPE (Mistral's layer): project q, k, v; rotate q and k by
/// `positions` (one per row of `x`); attend through the rolling cache (window = `cache.window()`); project back.
Tensor sliding_window_attention(ConstMatrix x, std::span<const std::int64_t> positions, const GroupedShape& shape,
                                const GroupedWeights& weights, const Rope& rope, const AttentionOptions& options,
                                RollingKvCache& cache);

/// Gemma 3 27B: 62 layers, 32 heads, 16 KV heads of 128; 52 local layers with a window of 1024 and 10 global
/// ones (google-deepmind/gemma, gm/nn/_gemma.py).
InterleavedModel gemma3_27b(DType dtype = DType::bf16);
/// gpt-oss-120b: 36 layers, 64 heads, 8 KV heads of 64; 18 banded layers with a window of 128 and 18 dense
/// ones, alternating (openai/gpt-oss, gpt_oss/torch/model.py).
InterleavedModel gpt_oss_120b(DType dtype = DType::bf16);

}  // namespace af
