#pragma once
/// @file sparse_attention.hpp
/// DeepSeek sparse attention (DSA, DeepSeek-V3.2): a small *lightning indexer* scores every cached token for each
/// query, the top k tokens are selected, and MLA (mla.hpp) attends over those k entries only. The indexer has its
/// own query heads (from MLA's query latent), one small key per token (cached beside MLA's latent), and a
/// per-query, per-head weight; its score is a weighted sum of ReLUs of dot products (chapter 11).
///
/// The layout follows the reference code of DeepSeek-V3.2 and Hugging Face transformers' `deepseek_v32`: the
/// index key is LayerNorm(wk x) (with a bias), the first `rope_dim` dimensions of index queries and keys are
/// rotated in the half-split layout (not interleaved, unlike MLA), and the head weights are scaled by
/// heads^-1/2 and head_dim^-1/2.

#include "af/accounting.hpp"
#include "af/mla.hpp"
#include "af/numeric.hpp"
#include "af/rope.hpp"
#include "af/softmax.hpp"
#include "af/tensor.hpp"

#include <cstdint>
#include <span>
#include <vector>

namespace af {

/// The sizes of one lightning indexer, named after DeepSeek-V3.2's configuration.
struct IndexerShape {
  std::int64_t hidden = 0;       ///< model width (input of wk and weights_proj)
  std::int64_t q_lora_rank = 0;  ///< width of MLA's normalised query latent (input of wq_b)
  std::int64_t heads = 0;        ///< index_n_heads
  std::int64_t head_dim = 0;     ///< index_head_dim
  std::int64_t rope_dim = 0;     ///< the first rope_dim dimensions of index queries and keys are rotated
  std::int64_t top_k = 0;        ///< index_topk: tokens each query attends to
  double norm_eps = 1e-6;        ///< LayerNorm epsilon of the index key

  /// Throws af::Error naming the size that is not positive, or rope_dim odd or above head_dim.
  void validate() const;
};

/// The indexer's parameters ([out, in] like nn.Linear).
struct IndexerWeights {
  Tensor wq_b;           ///< [heads * head_dim, q_lora_rank]: index queries from MLA's query latent
  Tensor wk;             ///< [head_dim, hidden]: the index key, one per token, shared by all index heads
  Tensor k_norm_weight;  ///< [head_dim]: LayerNorm gain of the index key
  Tensor k_norm_bias;    ///< [head_dim]: LayerNorm bias of the index key
  Tensor weights_proj;   ///< [heads, hidden]: one weight per index head and query token

  /// Throws af::Error naming the first tensor whose shape disagrees with `shape`.
  void validate(const IndexerShape& shape) const;
};

/// The indexer's key cache: one rotated, normalised index key [head_dim] per token. Allocated once.
class IndexerCache {
 public:
  IndexerCache(std::int64_t capacity, std::int64_t head_dim);
  void append(ConstMatrix keys);
  std::int64_t size() const { return size_; }
  ConstMatrix keys() const { return keys_.matrix().rows_slice(0, size_); }  ///< [t, head_dim]

 private:
  Tensor keys_;
  std::int64_t size_ = 0;
};

/// LayerNorm of each row in place: (x - mean) / sqrt(var + eps) * gain + bias (biased variance).
void layer_norm_rows(Matrix x, std::span<const float> gain, std::span<const float> bias, double eps);

/// Index keys of the tokens `x [T, hidden]` at `positions`: LayerNorm(wk x), then the first rope_dim dimensions
/// rotated by `rope` (dimension rope_dim; DeepSeek-V3.2 uses the half-split layout here). Returns [T, head_dim].
Tensor index_keys(ConstMatrix x, std::span<const std::int64_t> positions, const IndexerShape& shape,
                  const IndexerWeights& weights, const Rope& rope);
/// Index queries from MLA's normalised query latent `q_latent [T, q_lora_rank]`: wq_b q_latent, and the first
/// rope_dim dimensions of every head rotated. Returns [T, heads * head_dim].
Tensor index_queries(ConstMatrix q_latent, std::span<const std::int64_t> positions, const IndexerShape& shape,
                     const IndexerWeights& weights, const Rope& rope);
/// The per-head weights of each query token: weights_proj x, times heads^-1/2 and head_dim^-1/2 (the dot-product
/// scale, folded in: it is positive, so it commutes with the ReLU). Returns [T, heads].
Tensor index_head_weights(ConstMatrix x, const IndexerShape& shape, const IndexerWeights& weights);
/// The index scores I[i, j] = sum_h w[i, h] * ReLU(q[i, h] . k[j]) of `queries [T, heads * head_dim]` with
/// `head_weights [T, heads]` against `keys [t, head_dim]`, in float32 with float64 sums. Returns [T, t], unmasked.
Tensor index_scores(ConstMatrix queries, ConstMatrix head_weights, ConstMatrix keys, const IndexerShape& shape);

/// The top `k` of `scores` by value, best first; of two equal scores the smaller index ranks first (the tie rule
/// of chapters 11 and 12); entries of -inf are never chosen, so fewer than k come back when fewer are finite.
/// Throws af::Error for k < 0 or a NaN score.
std::vector<std::int64_t> top_k(std::span<const float> scores, std::int64_t k);

/// For each row of `scores [T, t]`, the at most `k` keys with the highest scores among those `allowed` lets the row
/// see, best first. Ties are broken deterministically: of two equal scores the key with the smaller index ranks
/// first. A row with fewer than k allowed keys keeps all of them and is padded with -1. Returns T * k indices,
/// row-major. Throws af::Error for k < 1, a NaN score, or a mask of another shape.
std::vector<std::int64_t> select_top_k(ConstMatrix scores, const Mask& allowed, std::int64_t k);

/// The `[rows, keys]` mask that allows exactly the selected keys (-1 entries ignored).
Mask selection_mask(std::span<const std::int64_t> selected, std::int64_t rows, std::int64_t keys, std::int64_t k);

/// What one DSA layer call returns: the output [T, hidden] and the selection (T * top_k indices, -1 padded).
struct DsaOutput {
  Tensor output;
  std::vector<std::int64_t> selected;
};

/// One DeepSeek sparse attention layer over the next tokens `x [T, hidden]` at `positions`: appends MLA's latent and
/// RoPE key to `cache` and the index key to `index_cache`, scores every cached token with the indexer, keeps the
/// top_k allowed by the causal mask, and runs MLA (along `path`) over those only. `mla_rope` has dimension
/// qk_rope_head_dim in MLA's layout; `index_rope` the same dimension in the indexer's. Needs q_lora_rank > 0 (the
/// indexer reads MLA's query latent).
DsaOutput dsa_attention(ConstMatrix x, std::span<const std::int64_t> positions, const MlaShape& mla,
                        const MlaWeights& mla_weights, const IndexerShape& indexer, const IndexerWeights& index_weights,
                        const Rope& mla_rope, const Rope& index_rope, double scale, MlaPath path, MlaCache& cache,
                        IndexerCache& index_cache);

/// How the index keys and queries are stored and multiplied, to emulate the reference's FP8 indexer.
struct IndexPrecision {
  bool hadamard = false;  ///< rotate each vector by the normalised Walsh-Hadamard transform first
  bool fp8 = false;       ///< round to FP8 E4M3 with one float32 scale (amax / 448) per block of `block` values
  std::int64_t block = 128;
};

/// `rows [T, n * width]` as the reference's indexer sees them: each `width`-wide vector (an index key, or one head of
/// an index query) Hadamard-rotated when asked (width a power of two), then, when fp8, quantized per block of
/// `block` values (width a multiple of block) and dequantized. Returns a new tensor of the same shape.
Tensor emulate_index_precision(ConstMatrix rows, std::int64_t width, const IndexPrecision& precision);

/// DeepSeek sparse attention's cache card: per token and layer MLA's latent `c_KV [kv_lora_rank]` and RoPE key
/// `k_rope [rope_dim]` in `dtype`, plus the index key `[index_head_dim]` in `index_dtype` with `index_scales` float32
/// scales (0 when unscaled). A decode query reads every cached index key (the indexer) and min(t, top_k) latents and
/// RoPE keys (attention): two separate DecodeRead entries. Throws af::Error on sizes <= 0.
CacheCard dsa_card(std::int64_t heads, std::int64_t kv_lora_rank, std::int64_t rope_dim, DType dtype,
                   std::int64_t index_heads, std::int64_t index_head_dim, DType index_dtype, std::int64_t index_scales,
                   std::int64_t top_k);

/// DeepSeek-V3.2: 61 layers of DSA over DeepSeek-V3's MLA (128 heads, kv_lora_rank 512, qk_rope_head_dim 64, latents
/// in `dtype`), with an indexer of 64 heads of 128 choosing the top 2048 tokens; its index keys are FP8 E4M3 with one
/// float32 scale each, as the reference code caches them.
ModelCache deepseek_v32(DType dtype = DType::bf16);

}  // namespace af
