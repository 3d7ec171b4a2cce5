#pragma once
/// @file llama.hpp
/// A Llama-architecture language model run from a GGUF file with the library's own pieces: RMSNorm, the
/// grouped attention of chapters 02-04 through af::GroupedKvCache, the rotary embedding of chapter 06
/// (af::Rope), a SwiGLU MLP and an output head tied to the embedding or stored apart. The weights stay in
/// their GGUF blocks (af::gguf::QuantMatrix); activations, the cache and every sum are float32.
///
/// One fact of the file format matters for RoPE: the converters that write Llama GGUF files reorder the
/// rows of the query and key projections of every head from the Hugging Face checkpoint's half-split pairs
/// (x[i], x[i + d/2]) into adjacent pairs (x[2i], x[2i + 1]), the layout llama.cpp rotates. The same
/// weights therefore need RopeLayout::adjacent here; Hugging Face's own checkpoint needs half_split.

#include "af/cache_policy.hpp"
#include "af/gguf.hpp"
#include "af/grouped_attention.hpp"
#include "af/quant_matmul.hpp"
#include "af/rope.hpp"
#include "af/tensor.hpp"

#include <cstdint>
#include <filesystem>
#include <functional>
#include <span>
#include <vector>

namespace af::llama {

/// The published configuration of a Llama-architecture model, read from the GGUF metadata (`llama.*`).
struct Config {
  std::int64_t layers = 0;     ///< llama.block_count
  std::int64_t hidden = 0;     ///< D, llama.embedding_length
  std::int64_t heads = 0;      ///< H, llama.attention.head_count
  std::int64_t kv_heads = 0;   ///< G, llama.attention.head_count_kv
  std::int64_t head_dim = 0;   ///< d = D / H (or llama.attention.key_length)
  std::int64_t ffn = 0;        ///< llama.feed_forward_length
  std::int64_t vocab = 0;      ///< rows of token_embd.weight
  std::int64_t context = 0;    ///< llama.context_length
  double rope_base = 10000.0;  ///< llama.rope.freq_base
  double rms_eps = 1e-5;       ///< llama.attention.layer_norm_rms_epsilon
  bool tied_output = true;     ///< no output.weight: the head is the embedding

  /// The grouped attention shape of every layer.
  GroupedShape attention_shape() const { return {hidden, heads, kv_heads, head_dim}; }
  /// Bytes the float32 KV cache holds per token (all layers, K and V).
  std::int64_t cache_bytes_per_token() const { return layers * 2 * kv_heads * head_dim * 4; }
};

/// The parameters of one decoder layer, viewing the file's bytes.
struct Layer {
  std::vector<float> attention_norm, mlp_norm;  ///< RMSNorm gains [D]
  gguf::QuantMatrix q, k, v, o;                 ///< [H d, D], [G d, D], [G d, D], [D, H d]
  gguf::QuantMatrix gate, up, down;             ///< [ffn, D], [ffn, D], [D, ffn]
};

/// What a forward pass hands back besides the logits, for the chapter's tracing (optional).
struct Trace {
  /// Called after each layer with its index and the residual stream [T, D].
  std::function<void(std::int64_t layer, ConstMatrix residual)> after_layer;
};

/// The per-sequence state: one float32 KV cache per layer, with room for `capacity` tokens.
class Cache {
 public:
  Cache(const Config& config, std::int64_t capacity);
  /// Tokens cached so far (the position of the next token).
  std::int64_t size() const { return layers_.front().size(); }
  std::int64_t capacity() const { return layers_.front().capacity(); }
  /// Bytes of K and V held for the cached tokens.
  std::int64_t bytes_held() const;
  GroupedKvCache& layer(std::int64_t l) { return layers_[static_cast<std::size_t>(l)]; }
  const GroupedKvCache& layer(std::int64_t l) const { return layers_[static_cast<std::size_t>(l)]; }

 private:
  std::vector<GroupedKvCache> layers_;
  std::int64_t bytes_per_token_ = 0;
};

/// A model loaded from a GGUF file; the file stays in memory and the weights are views of it.
class Model {
 public:
  /// Reads `path` (af::gguf::File::open) and checks that it is a Llama model whose tensors have the shapes
  /// its metadata implies; throws af::Error naming the first key or tensor that is missing or wrong.
  static Model load(const std::filesystem::path& path);
  /// The same from a file already read.
  explicit Model(gguf::File file);

  const Config& config() const { return config_; }
  const gguf::File& file() const { return file_; }
  const Layer& layer(std::int64_t l) const { return layers_[static_cast<std::size_t>(l)]; }
  /// The rotary embedding used (adjacent pairs unless set otherwise, see the file comment).
  const Rope& rope() const { return rope_; }
  /// Replaces the RoPE layout (to show what the wrong one does).
  void set_rope_layout(RopeLayout layout);
  /// Bytes of the weights one forward pass reads (every matrix once, the head included).
  std::size_t weight_bytes() const;

  /// Runs `tokens` at positions cache.size(), cache.size() + 1, ...: appends their keys and values to the
  /// cache and returns the logits `[T, vocab]` of every token, or only of the last (`[1, vocab]`) when
  /// `all_logits` is false. With a `policy`, every layer's attention reads the cache through it (chapter 17;
  /// the cache itself still holds float32 K and V). Throws af::Error for an id outside the vocabulary or a
  /// full cache.
  Tensor forward(std::span<const std::int32_t> tokens, Cache& cache, bool all_logits = false,
                 const Trace* trace = nullptr, PolicyAttention* policy = nullptr) const;

  /// The embedding rows of `tokens`, [T, D].
  Tensor embed(std::span<const std::int32_t> tokens) const;

 private:
  gguf::File file_;
  Config config_;
  std::vector<Layer> layers_;
  std::vector<float> output_norm_;
  gguf::QuantMatrix embedding_, output_;
  Rope rope_;
};

/// The result of sliding_window_nll: the summed negative log-likelihood (natural log) of the scored tokens,
/// their number, and the same per window.
struct SlidingNll {
  double total_nll = 0.0;
  std::int64_t scored_tokens = 0;
  std::vector<double> window_nll;
  std::vector<std::int64_t> window_tokens;
  /// exp(total_nll / scored_tokens).
  double perplexity() const;
};

/// The negative log-likelihood of `tokens` under `model`, by the sliding-window protocol of fixed-context
/// evaluation: windows of `window` tokens start every `stride` tokens (a fresh cache each); each window scores
/// the tokens no earlier window scored, each predicted from all the window's tokens before it; the first token
/// is never scored. `progress`, when set, is called after each window with (windows done, windows in all).
/// Throws af::Error for fewer than 2 tokens, or a window or stride outside 1..window (stride <= window).
SlidingNll sliding_window_nll(const Model& model, std::span<const std::int32_t> tokens, std::int64_t window,
                              std::int64_t stride,
                              const std::function<void(std::int64_t, std::int64_t)>& progress = nullptr);

}  // namespace af::llama
