#pragma once
/// @file compressed_attention.hpp
/// DeepSeek-V4's attention layers (chapter 12): compressed sparse attention (CSA), heavily compressed
/// attention (HCA) and the plain sliding-window layer, as the Hugging Face reference
/// (`transformers/models/deepseek_v4/modeling_deepseek_v4.py`, version 5.17) computes them.
///
/// Every layer keeps a window of raw recent entries (one shared K = V head of dimension c per token). A
/// compressed layer also pools every m tokens into one compressed entry with learned per-channel gates:
///  - HCA (m' = 128 in the published models): entry w pools the m tokens of window w;
///  - CSA (m = 4): each token projects to two series Ca and Cb; entry w pools Ca of window w - 1 and Cb of
///    window w (2m slots, stride m: overlapping windows), and a lightning indexer with its own compressor
///    scores the entries for each query, which then attends to its top-k entries only.
/// The query attends with one softmax, per head, over [its window ∪ its visible compressed entries] plus a
/// learned sink logit; the value of an entry is the entry itself (K = V), so the RoPE rotation it carries is
/// undone on the output, which then goes through a grouped low-rank output projection.
///
/// Tokens of a block that is still filling wait, as raw projections, in the cache's pending rows; the
/// entry appears once the block's last token arrives. Everything the cache holds is what the reference's
/// `DeepseekV4CSACache` / `DeepseekV4HCACache` / `DynamicSlidingWindowLayer` hold.

#include "af/accounting.hpp"
#include "af/rope.hpp"
#include "af/sparse_attention.hpp"
#include "af/tensor.hpp"

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace af {

/// The three attention layer types of DeepSeek-V4 (`config.layer_types`; legacy `compress_ratios` 0, 4, 128).
enum class V4LayerKind {
  sliding,  ///< "sliding_attention": the window only
  csa,      ///< "compressed_sparse_attention": window + top-k of overlapping compressed entries
  hca,      ///< "heavily_compressed_attention": window + every compressed entry (non-overlapping)
};

/// The reference's name of a layer kind ("sliding_attention", ...).
std::string_view name_of(V4LayerKind kind);
/// The kind of a reference layer type name; throws af::Error listing the three names.
V4LayerKind v4_layer_kind(std::string_view name);

/// The sizes of one DeepSeek-V4 attention layer, named after the reference's config fields.
struct V4Shape {
  V4LayerKind kind = V4LayerKind::sliding;
  std::int64_t hidden = 0;          ///< hidden_size
  std::int64_t heads = 0;           ///< num_attention_heads (one shared K = V head serves them all)
  std::int64_t head_dim = 0;        ///< c, the entry width (512 published)
  std::int64_t rope_dim = 0;        ///< the last rope_dim dimensions of q, entries and output are rotated
  std::int64_t q_lora_rank = 0;     ///< d_c
  std::int64_t window = 0;          ///< sliding_window n_win, the query included
  std::int64_t ratio = 0;           ///< compress rate m (CSA) or m' (HCA); 0 for a sliding layer
  std::int64_t index_heads = 0;     ///< index_n_heads (CSA)
  std::int64_t index_head_dim = 0;  ///< index_head_dim (CSA)
  std::int64_t index_topk = 0;      ///< compressed entries each query keeps (CSA)
  std::int64_t o_groups = 0;        ///< g, groups of the output projection
  std::int64_t o_lora_rank = 0;     ///< d_g, each group's intermediate width
  double rms_norm_eps = 1e-6;

  bool compressed() const { return kind != V4LayerKind::sliding; }
  /// Throws af::Error naming the size that is out of range.
  void validate() const;
};

/// The parameters of one compressor ([out, in] like nn.Linear). `s` = 2 series (Ca, Cb) for CSA's
/// overlapping windows, 1 for HCA; `c` the entry width.
struct CompressorWeights {
  Tensor kv_proj;        ///< [s * c, hidden]
  Tensor gate_proj;      ///< [s * c, hidden]
  Tensor position_bias;  ///< [m, s * c], added to the gate of the token at offset j of its window
  Tensor kv_norm;        ///< [c], RMSNorm gain applied to each pooled entry
};

/// The parameters of one layer under the reference's names (relative to `self_attn`).
struct V4Weights {
  Tensor q_a_proj;               ///< [q_lora_rank, hidden]
  Tensor q_a_norm;               ///< [q_lora_rank]
  Tensor q_b_proj;               ///< [H * c, q_lora_rank]
  Tensor kv_proj;                ///< [c, hidden]: the single shared K = V head
  Tensor kv_norm;                ///< [c]
  Tensor o_a_proj;               ///< [g * d_g, H * c / g]: group i maps its H c / g values to d_g
  Tensor o_b_proj;               ///< [hidden, g * d_g]
  Tensor sinks;                  ///< [H], one learned sink logit per head
  CompressorWeights compressor;  ///< compressor.* (CSA and HCA)
  CompressorWeights indexer;     ///< compressor.indexer.{kv_proj, gate_proj, position_bias, kv_norm} (CSA)
  Tensor indexer_q_b_proj;       ///< compressor.indexer.q_b_proj [H_I * c_I, q_lora_rank] (CSA)
  Tensor indexer_weights_proj;   ///< compressor.indexer.scorer.weights_proj [H_I, hidden] (CSA)

  /// Throws af::Error naming the first tensor whose shape disagrees with `shape`.
  void validate(const V4Shape& shape) const;
};

/// One compressed entry before its norm and rotation: for every channel independently, the softmax over the
/// slots of `gates [S, c]` weights the slots of `kv [S, c]`. A gate of -inf leaves its slot out. Returns [c].
std::vector<float> pool_entry(ConstMatrix kv, ConstMatrix gates);

/// The stream compressor of one layer (or of its indexer): turns projections arriving token by token into
/// compressed entries, one per completed block of m tokens. Holds exactly the reference's state: the
/// entries emitted so far (normalised and rotated), the raw kv and gate projections of the block still
/// filling (fewer than m tokens), and for overlapping windows the Ca half of the last completed block
/// (its gates with the position bias added).
class Compressor {
 public:
  /// `width` c, `ratio` m, `overlapping` for CSA. Throws af::Error for sizes < 1.
  Compressor(std::int64_t width, std::int64_t ratio, bool overlapping);

  /// Feeds the projections `kv [n, s c]` and `gate [n, s c]` (no bias yet) of the next n tokens; every block
  /// that completes becomes an entry: pool (bias added, Ca of the previous block first when overlapping),
  /// RMSNorm with `w.kv_norm` and `eps`, rotate the last `rope.head_dim()` values by RoPE at position
  /// `entry * m` (the block's first token). Returns how many entries were emitted.
  std::int64_t push(ConstMatrix kv, ConstMatrix gate, const CompressorWeights& w, const Rope& rope, double eps);

  std::int64_t width() const { return width_; }
  std::int64_t ratio() const { return ratio_; }
  bool overlapping() const { return overlapping_; }
  /// Entries emitted so far.
  std::int64_t size() const { return static_cast<std::int64_t>(entries_.size()) / width_; }
  /// The entries, `[size, c]`; entry w pooled tokens w m .. w m + m - 1 (and, overlapping, the block before).
  ConstMatrix entries() const;
  /// Tokens waiting in the block still filling (0 .. m - 1).
  std::int64_t pending() const;
  /// Whether the Ca half of a completed block is held for the next entry.
  bool has_overlap() const { return !overlap_kv_.empty(); }
  /// Values the compressor holds now (entries, pending rows of kv and gate, overlap rows).
  std::int64_t values_held() const;

 private:
  std::int64_t width_, ratio_;
  bool overlapping_;
  std::vector<float> entries_;                    // [size, c]
  std::vector<float> pending_kv_, pending_gate_;  // [pending, s c]
  std::vector<float> overlap_kv_, overlap_gate_;  // [m, c] or empty
};

/// The whole cache of one V4 layer: the window of raw entries (the last W - 1 tokens' normalised, rotated
/// kv, which with the next token make the W a decode query reads: what the reference keeps between calls),
/// and for compressed layers the compressor's state, plus the indexer's for CSA.
class V4Cache {
 public:
  explicit V4Cache(const V4Shape& shape);

  /// Tokens seen so far (the sequence index of the next one).
  std::int64_t seen() const { return seen_; }
  /// Window rows held: min(seen, W - 1), in sequence order, `[rows, c]`.
  ConstMatrix window() const;
  /// The sequence index of window row 0.
  std::int64_t window_first() const { return seen_ - window_rows(); }
  std::int64_t window_rows() const { return static_cast<std::int64_t>(window_.size()) / width_; }
  /// Appends raw entries `[n, c]` of the next n tokens and keeps the last W - 1.
  void append_window(ConstMatrix kv);

  Compressor& compressor() { return compressor_; }
  const Compressor& compressor() const { return compressor_; }
  Compressor& indexer() { return indexer_; }
  const Compressor& indexer() const { return indexer_; }

  /// Values held (float32 here; the reference's tensors are in the model dtype).
  std::int64_t values_held() const;

 private:
  std::int64_t width_, keep_;
  std::vector<float> window_;
  std::int64_t seen_ = 0;
  Compressor compressor_, indexer_;
};

/// The lightning indexer's score of every entry for one query: the sum over indexer heads h of
/// weights[h] times relu(q_h . k_s) / sqrt(cI), for a query `q` of HI heads of cI values, `keys` [n, cI] and
/// `weights` [HI] (already multiplied by 1 / sqrt(HI) as the reference does). Returns n scores.
std::vector<float> index_scores(std::span<const float> q, ConstMatrix keys, std::span<const float> weights);

/// What a call of v4_attention saw, per query row (optional).
struct V4Trace {
  /// Per query: the CSA selection as the reference returns it: min(index_topk, entries) picks, those that
  /// point past the query's causal limit replaced by -1 (empty for sliding and HCA layers).
  std::vector<std::vector<std::int64_t>> selected;
  /// Per query: the index score of every entry, -inf for entries the query may not see yet (CSA).
  std::vector<std::vector<float>> scores;
  /// Per query and head: the softmax weights over [window keys visible ..., compressed entries visible ...,
  /// sink], in that order, and how many of each (for measurements).
  std::vector<std::vector<std::vector<float>>> weights;
  std::vector<std::int64_t> window_keys, entry_keys;
};

/// The attention scale of the reference: 1 / sqrt(head_dim) (no YaRN mscale).
double v4_scale(const V4Shape& shape);

/// One DeepSeek-V4 attention layer over the next tokens `x [n, hidden]` (the module's input: the
/// hyper-connection-mixed residual after input_layernorm) at `positions`, through `cache`. `rope` rotates
/// rope_dim values (RopeLayout::adjacent), with the layer's theta (main for sliding layers, compress for
/// CSA/HCA). Returns `[n, hidden]`. Throws af::Error on disagreeing shapes.
Tensor v4_attention(ConstMatrix x, std::span<const std::int64_t> positions, const V4Shape& shape,
                    const V4Weights& weights, const Rope& rope, V4Cache& cache, V4Trace* trace = nullptr);

/// The accounting of one V4 layer kind in `dtype` (the reference keeps its tensors in the model dtype, bf16
/// for the published checkpoints), as parts that each count entries of one shape:
///  - "window": W raw entries [c] (the reference keeps W - 1 between steps, the new token makes W; DeepSeek's
///    own inference code allocates W), every one read per decode step: a fixed per-sequence cost;
///  - "compressed entries" (CSA, HCA): one [c] per m tokens; a decode query reads all of them (HCA) or its
///    top-k (CSA);
///  - "indexer keys" (CSA): one [c_I] per m tokens, every one read per decode step to score them;
///  - "pending block": the raw kv and gate projections [2 s c] of the t mod m tokens of the block still
///    filling (read once, when the block completes);
///  - "overlap" (CSA): the Ca half of the last block, kv and biased gates [2 c] for each of its m tokens,
///    for the main compressor and the indexer's.
struct V4LayerCard {
  V4Shape shape;
  std::vector<CacheCard> parts;

  std::int64_t bytes_stored(std::int64_t t) const;
  std::int64_t bytes_read(std::int64_t t) const;
  std::int64_t entries_read(std::int64_t t) const;
  /// Bytes the growing parts add per token, amortised over a block (compressed entries and indexer keys / m).
  double growth_per_token() const;
  /// The largest the bounded parts get (window full, m - 1 pending tokens, overlap held).
  std::int64_t bounded_bytes() const;
};

/// The accounting of one layer of `shape`'s kind. Throws af::Error on an invalid shape.
V4LayerCard v4_layer_card(const V4Shape& shape, DType dtype = DType::bf16);

/// The six answers of the card of one layer kind, at each of `contexts`.
std::string format_v4_layer_card(const V4LayerCard& card, std::span<const std::int64_t> contexts);

/// DeepSeek-V4-Flash (43 layers: 2 sliding, 21 CSA, 20 HCA; H 64, c 512, rope 64, W 128, m 4 / 128,
/// top-k 512, H_I 64, c_I 128) and V4-Pro (61 layers: 0 / 30 / 31; H 128, top-k 1024), from their config.json
/// (deepseek-ai/DeepSeek-V4-Flash) and the DeepSeek-V4 report.
InterleavedModel deepseek_v4_flash(DType dtype = DType::bf16);
InterleavedModel deepseek_v4_pro(DType dtype = DType::bf16);
/// The V4-Flash shape of one layer kind (published sizes).
V4Shape deepseek_v4_flash_shape(V4LayerKind kind);
V4Shape deepseek_v4_pro_shape(V4LayerKind kind);

}  // namespace af
