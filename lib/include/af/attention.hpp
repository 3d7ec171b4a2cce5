#pragma once
/// @file attention.hpp
/// Single-head scaled dot-product attention and its KV cache: the cleaned version of chapter 01.

#include "af/softmax.hpp"
#include "af/tensor.hpp"

#include <cstdint>
#include <optional>

namespace af {

/// How the queries see the keys.
struct AttentionOptions {
  /// Causal: each query sees the keys at its own position and before. The queries are taken to be the
  /// last `Tq` of the `Tk` key positions (bottom-right aligned), which is right for a prefill (Tq = Tk) and
  /// for a decode step (Tq = 1) alike.
  bool causal = true;
  /// The factor applied to q . k; 1 / sqrt(head_dim) when unset.
  std::optional<double> scale;
};

/// 1 / sqrt(head_dim).
double default_scale(std::int64_t head_dim);

/// The attention weights `softmax(scale * q k^T + mask)`: q [Tq, d], k [Tk, d] -> [Tq, Tk].
Tensor attention_weights(ConstMatrix q, ConstMatrix k, const AttentionOptions& options);

/// Scaled dot-product attention of one head: q [Tq, d], k [Tk, d], v [Tk, dv] -> [Tq, dv].
/// Throws af::Error when the shapes disagree (the message names them).
Tensor attention(ConstMatrix q, ConstMatrix k, ConstMatrix v, const AttentionOptions& options);

/// The KV cache of one head: keys [capacity, key_dim] and values [capacity, value_dim], allocated once;
/// `append` copies new rows in and never allocates.
class KvCache {
 public:
  KvCache(std::int64_t capacity, std::int64_t key_dim, std::int64_t value_dim);

  /// Appends the rows of keys [n, key_dim] and values [n, value_dim]. Throws af::Error on a shape mismatch or
  /// when the cache would exceed its capacity.
  void append(ConstMatrix keys, ConstMatrix values);

  std::int64_t size() const { return size_; }
  std::int64_t capacity() const { return keys_.dim(0); }
  /// The cached keys [size, key_dim] and values [size, value_dim].
  ConstMatrix keys() const { return keys_.matrix().rows_slice(0, size_); }
  ConstMatrix values() const { return values_.matrix().rows_slice(0, size_); }

 private:
  Tensor keys_;
  Tensor values_;
  std::int64_t size_ = 0;
};

/// The parameters of one single-head attention layer, stored as `nn.Linear` stores them ([out, in]).
/// The biases are optional (empty tensors when absent).
struct SingleHeadWeights {
  Tensor q_proj;                  ///< [head_dim, hidden]
  Tensor k_proj;                  ///< [head_dim, hidden]
  Tensor v_proj;                  ///< [head_dim, hidden]
  Tensor o_proj;                  ///< [hidden, head_dim]
  Tensor q_bias, k_bias, v_bias;  ///< [head_dim] each, or empty

  std::int64_t hidden() const { return q_proj.dim(1); }
  std::int64_t head_dim() const { return q_proj.dim(0); }
  /// Throws af::Error naming the first weight whose shape is inconsistent with the others.
  void validate() const;
};

/// One single-head attention layer over the next tokens `x [T, hidden]`: projects q, k and v, appends k and v
/// to `cache`, attends from the new queries over everything cached, and projects back to `[T, hidden]`.
/// A prefill is one call with the whole prompt; a decode step is one call with one token.
Tensor single_head_attention(ConstMatrix x, const SingleHeadWeights& weights, const AttentionOptions& options,
                             KvCache& cache);

}  // namespace af
