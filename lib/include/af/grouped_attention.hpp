#pragma once
/// @file grouped_attention.hpp
/// Grouped attention: H query heads sharing G key/value heads (H divisible by G), through a KV cache.
/// Multi-head attention is G = H, multi-query attention G = 1, grouped-query attention anything between
/// (chapters 02-04). Query head h reads KV head `h / (H / G)`; each cached KV head is read once for its whole
/// group of query heads, and the expanded K and V of an MHA layer are never materialised.

#include "af/attention.hpp"
#include "af/tensor.hpp"

#include <cstdint>

namespace af {

/// The sizes of one grouped attention layer.
struct GroupedShape {
  std::int64_t hidden = 0;    ///< model width
  std::int64_t heads = 0;     ///< H, query heads
  std::int64_t kv_heads = 0;  ///< G, key/value heads; H % G == 0
  std::int64_t head_dim = 0;  ///< d

  /// Query heads per KV head, H / G.
  std::int64_t group_size() const { return heads / kv_heads; }
  /// The KV head that query head `q_head` reads.
  std::int64_t kv_head_of(std::int64_t q_head) const { return q_head / group_size(); }
  /// Throws af::Error naming the sizes when one is not positive or H is not a multiple of G.
  void validate() const;
};

/// The KV cache of a grouped layer: keys and values `[capacity, G, d]`, token-major, so that appending a
/// token writes one contiguous row of `G * d` values per tensor. Allocated once.
class GroupedKvCache {
 public:
  GroupedKvCache(std::int64_t capacity, std::int64_t kv_heads, std::int64_t head_dim);

  /// Appends keys and values `[n, G * d]` (the k and v projections of n tokens). Throws af::Error on a shape
  /// mismatch or when the capacity would be exceeded.
  void append(ConstMatrix keys, ConstMatrix values);

  std::int64_t size() const { return size_; }
  std::int64_t capacity() const { return keys_.dim(0); }
  std::int64_t kv_heads() const { return keys_.dim(1); }
  std::int64_t head_dim() const { return keys_.dim(2); }
  /// KV head g's cached keys and values `[size, d]`, strided views (row stride G * d).
  ConstMatrix keys(std::int64_t kv_head) const;
  ConstMatrix values(std::int64_t kv_head) const;

 private:
  Tensor keys_;
  Tensor values_;
  std::int64_t size_ = 0;
};

/// The parameters of a grouped layer (nn.Linear layout [out, in]); biases optional (empty when absent).
struct GroupedWeights {
  Tensor q_proj;                  ///< [H * d, hidden]
  Tensor k_proj;                  ///< [G * d, hidden]
  Tensor v_proj;                  ///< [G * d, hidden]
  Tensor o_proj;                  ///< [hidden, H * d]
  Tensor q_bias, k_bias, v_bias;  ///< [H * d], [G * d], [G * d] or empty
  Tensor o_bias = {};             ///< [hidden] or empty (Llama with attention_bias has one; most models do not)

  /// Throws af::Error naming the first tensor whose shape disagrees with `shape`.
  void validate(const GroupedShape& shape) const;
};

/// Attention of the query heads `q [Tq, H * d]` over the cache: query head h reads KV head h / (H / G); the
/// queries are the last Tq positions of the cache. Returns the heads' outputs concatenated, `[Tq, H * d]`.
/// The `group_size` queries of a group are scored against their KV head in one pass over it.
Tensor grouped_attend(ConstMatrix q, const GroupedShape& shape, const GroupedKvCache& cache,
                      const AttentionOptions& options);

/// One grouped attention layer over the next tokens `x [T, hidden]`: projects, appends k and v to the cache,
/// attends, and projects back to `[T, hidden]`. A prefill is one call with the prompt; a decode step one
/// call with one token.
Tensor grouped_attention(ConstMatrix x, const GroupedShape& shape, const GroupedWeights& weights,
                         const AttentionOptions& options, GroupedKvCache& cache);

}  // namespace af
