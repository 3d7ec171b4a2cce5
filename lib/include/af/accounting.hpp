#pragma once
/// @file accounting.hpp
/// The cache accounting every mechanism in the book reports through: what it caches per token and layer,
/// how many entries it keeps, and what one decode query reads. The cache card prints it.

#include "af/numeric.hpp"

#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <vector>

namespace af {

/// One tensor the cache stores for each token of each layer, e.g. `K` of shape `[8, 128]` in bf16.
struct CachedTensor {
  std::string name;
  std::vector<std::int64_t> shape;  ///< per token
  DType dtype = DType::bf16;
  /// The axis of `shape` that tensor parallelism splits across ranks (the KV-head axis of K and V), or -1
  /// when every rank keeps the whole tensor (MLA's latent, which all heads read).
  int head_axis = -1;

  std::int64_t elements() const;
  std::int64_t bytes() const;
  /// Bytes one of `tp` tensor-parallel ranks keeps per token: the split axis divided by `tp`, or one head
  /// per rank when there are fewer heads than ranks (each head then replicated on tp / heads ranks).
  /// Throws af::Error when tp < 1 or neither of heads and tp divides the other.
  std::int64_t bytes_per_gpu(std::int64_t tp) const;
  /// How many ranks keep a copy of each element under tensor parallelism of degree `tp` (1 = no replica).
  std::int64_t copies(std::int64_t tp) const;
};

/// What one decode query reads from the cache of one layer, and the arithmetic it spends on what it read.
struct DecodeRead {
  std::string what;          ///< e.g. "keys and values"
  std::int64_t entries = 0;  ///< cached tokens read
  std::int64_t bytes = 0;
  /// FLOPs of the attention arithmetic on these entries (a multiply-add counts 2), all heads: for softmax
  /// attention 2 H d_k per score and 2 H d_v per value mixed in, for an indexer its scores. Projections of the
  /// query, key, value and output are not counted: they cost the same whatever the context.
  double flops = 0.0;
};

/// The accounting of one attention mechanism for one layer.
struct CacheCard {
  std::string mechanism;                ///< e.g. "single-head attention"
  std::string projected;                ///< what each token is projected to
  std::vector<CachedTensor> per_token;  ///< what one cached token stores in one layer
  /// Cached tokens kept after `t` tokens (t for a dense cache; bounded for a window).
  std::function<std::int64_t(std::int64_t t)> stored_tokens;
  /// The rows the cache holds, as the card prints them, after a prefill of T tokens and after the decode step
  /// at position t: "T" and "t + 1" for a dense cache, "min(T, 4096)" and "min(t + 1, 4096)" for a window.
  std::string rows_after_prefill = "T";
  std::string rows_after_step = "t + 1";
  /// What one decode query reads with `t` tokens in context.
  std::function<std::vector<DecodeRead>(std::int64_t t)> decode_reads;
  std::string trade_offs;

  /// Bytes one cached token takes in one layer.
  std::int64_t bytes_per_token() const;
  /// Bytes written to one layer's cache per generated token.
  std::int64_t bytes_written_per_token() const { return bytes_per_token(); }
  /// Bytes one layer's cache holds after `t` tokens.
  std::int64_t bytes_stored(std::int64_t t) const;
  /// Total bytes one decode query reads in one layer at context `t`.
  std::int64_t bytes_read(std::int64_t t) const;
  /// Attention FLOPs of one decode query in one layer at context `t`: the sum over its DecodeReads.
  double decode_flops(std::int64_t t) const;
  /// Attention FLOPs of a causal prefill of `tokens` tokens in one layer, counted query by query: query i
  /// (1-based) does what a decode query does at context i, so this is the sum of decode_flops(i), i = 1 .. T.
  /// Chunked kernels do this work in blocks (and may waste some on masked elements); the count is the
  /// arithmetic the mask lets through. Throws af::Error for tokens < 0.
  double prefill_flops(std::int64_t tokens) const;

  /// Under tensor parallelism of degree `tp`: bytes one rank keeps per token in one layer.
  std::int64_t bytes_per_token_per_gpu(std::int64_t tp) const;
  /// Bytes one rank holds in one layer after `t` tokens.
  std::int64_t bytes_stored_per_gpu(std::int64_t t, std::int64_t tp) const;
  /// Bytes one rank reads in one layer per decode query at context `t`: its share of every entry read.
  std::int64_t bytes_read_per_gpu(std::int64_t t, std::int64_t tp) const;
};

/// The dense KV cache of `heads` query heads sharing `kv_heads` key/value heads of dimension `head_dim`
/// (MHA: heads = kv_heads; MQA: kv_heads = 1): per token K and V of shape `[kv_heads, head_dim]`; a decode
/// query reads every cached token and spends 4 heads head_dim FLOPs on each (a score and a value mix per head). Throws
/// af::Error on sizes <= 0 or heads not a multiple of kv_heads.
CacheCard dense_kv_card(std::string mechanism, std::int64_t heads, std::int64_t kv_heads, std::int64_t head_dim,
                        DType dtype);

/// Multi-head latent attention (DeepSeek-V2/V3) in its absorbed form: per token and layer one latent `c_KV` of
/// `kv_lora_rank` values and one decoupled RoPE key `k_rope` of `rope_dim` values, shared by all `heads` query
/// heads (keys and values are up-projected from the latent, or the up-projections are absorbed into the
/// query and output). A decode query reads every cached latent; its FLOPs are counted in the absorbed form,
/// per entry and head 2 (kv_lora_rank + rope_dim) for the score and 2 kv_lora_rank for the value mix. Under tensor
/// parallelism every rank keeps the whole latent. Throws af::Error on sizes <= 0.
CacheCard mla_kv_card(std::int64_t heads, std::int64_t kv_lora_rank, std::int64_t rope_dim, DType dtype);

/// `card` with a sliding window of `window` tokens: at most `window` tokens are kept (a ring buffer) and read;
/// its trade-offs become the window's own.
/// Throws af::Error for window <= 0.
CacheCard with_sliding_window(CacheCard card, std::int64_t window);

/// A real model's attention, with the source of its numbers.
struct ModelCache {
  std::string model;   ///< e.g. "Llama-3.1-8B"
  std::string source;  ///< where the numbers come from
  std::int64_t layers = 0;
  CacheCard card;  ///< one layer

  std::int64_t bytes_per_token() const { return layers * card.bytes_per_token(); }
  /// Bytes one sequence's cache holds after `t` tokens, all layers.
  std::int64_t bytes_stored(std::int64_t t) const { return layers * card.bytes_stored(t); }
  /// Bytes one decode step of one sequence reads at context `t`, all layers.
  std::int64_t bytes_read(std::int64_t t) const { return layers * card.bytes_read(t); }
  /// Attention FLOPs of one decode step at context `t`, and of a causal prefill of `tokens`, all layers.
  double decode_flops(std::int64_t t) const { return static_cast<double>(layers) * card.decode_flops(t); }
  double prefill_flops(std::int64_t tokens) const { return static_cast<double>(layers) * card.prefill_flops(tokens); }
  /// The same on one of `tp` tensor-parallel ranks.
  std::int64_t bytes_per_token_per_gpu(std::int64_t tp) const { return layers * card.bytes_per_token_per_gpu(tp); }
  std::int64_t bytes_stored_per_gpu(std::int64_t t, std::int64_t tp) const {
    return layers * card.bytes_stored_per_gpu(t, tp);
  }
  std::int64_t bytes_read_per_gpu(std::int64_t t, std::int64_t tp) const {
    return layers * card.bytes_read_per_gpu(t, tp);
  }
};

/// A model whose layers are of several kinds (windowed and dense, compressed and sliding, ...): one ModelCache
/// per kind of layer, each with its layer count.
struct InterleavedModel {
  std::string model;
  std::string source;
  std::vector<ModelCache> parts;  ///< e.g. {52 local layers with a window, 10 global layers}

  /// Bytes one sequence holds after `t` tokens, all layers.
  std::int64_t bytes_stored(std::int64_t t) const;
  /// Bytes one decode step reads at context `t`, all layers.
  std::int64_t bytes_read(std::int64_t t) const;
  /// Cached entries one decode step reads at context `t`, all layers.
  std::int64_t entries_read(std::int64_t t) const;
  /// Attention FLOPs of one decode step at context `t`, and of a causal prefill of `tokens`, all layers.
  double decode_flops(std::int64_t t) const;
  double prefill_flops(std::int64_t tokens) const;
  /// Bytes one more token adds at a context beyond every window (the unbounded layers' growth).
  std::int64_t bytes_per_token_after_windows() const;
};

/// The six answers as aligned text: what is projected, what is cached, the stored shape in prefill and
/// decode, bytes per token (per layer, and per model for each of `models`), entries and bytes read per
/// decode query at each of `contexts`, and what the mechanism trades off.
std::string format_cache_card(const CacheCard& card, std::span<const ModelCache> models,
                              std::span<const std::int64_t> contexts);

/// A byte count with its binary unit, e.g. "128 KiB" or "1.50 GiB".
std::string human_bytes(double bytes);

/// `text` in lines of at most `width` characters, broken at spaces (a word longer than `width` keeps a line
/// of its own), as the cards and tables print their prose.
std::vector<std::string> wrap_words(const std::string& text, std::size_t width);

}  // namespace af
