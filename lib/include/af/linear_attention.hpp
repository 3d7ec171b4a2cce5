#pragma once
/// @file linear_attention.hpp
/// Linear attention with a per-head decay, and MiniMax's lightning attention layer (chapter 13).
///
/// Drop the softmax from causal attention and the product (Q K^T) V can be reassociated as Q (K^T V): every
/// query reads one `[d_k, d_v]` matrix per head instead of every cached key and value. With a decay
/// lambda = exp(-slope) per head, the output of query i is
///
///     o_i = sum_{j <= i} lambda^(i - j) (q_i . k_j) v_j,
///
/// and the state after token t is S_t = lambda S_{t-1} + k_t^T v_t, so that o_t = q_t S_t. Three ways to
/// compute a causal prefill, equal up to rounding:
///  - quadratic: the masked form (Q K^T * D) V with D_ij = lambda^(i - j) for j <= i, O(T^2 d);
///  - recurrent: token by token through the state, O(T d^2), one step after the other;
///  - blocked (lightning attention): inside a block of B tokens the masked form, across blocks the carried
///    state, O(T B d + T d^2), in matrix products over whole blocks.
///
/// MiniMax-01's lightning layer (transformers' `MiniMaxLightningAttention`): one projection to q, k, v of H
/// heads laid out per head as [q | k | v], each passed through SiLU; no 1/sqrt(d) scale and no softmax
/// denominator; per-head slopes 2^(-8h/H) scaled down with depth; the heads' outputs concatenated and
/// RMS-normalised together over all H d values; a sigmoid output gate computed from the layer's input;
/// then the output projection.

#include "af/accounting.hpp"
#include "af/models.hpp"
#include "af/tensor.hpp"

#include <cstdint>
#include <span>
#include <string>
#include <vector>

namespace af {

/// The per-token decay lambda = exp(-slope). Throws af::Error for a negative or non-finite slope.
double decay_of(double slope);

/// Causal decayed linear attention of one head in its quadratic (masked) form: `q`, `k` `[T, d_k]`, `v`
/// `[T, d_v]` -> `[T, d_v]`, o_i = sum_{j <= i} exp(-slope (i - j)) (q_i . k_j) v_j. No softmax, no scale.
Tensor linear_attention_quadratic(ConstMatrix q, ConstMatrix k, ConstMatrix v, double slope);

/// The same through the recurrent state, one token after the other: S <- exp(-slope) S + k_t^T v_t, then
/// o_t = q_t S. `state` `[d_k, d_v]` holds the state before the first token and is left holding the state
/// after the last one (zeros for a fresh sequence).
Tensor linear_attention_recurrent(ConstMatrix q, ConstMatrix k, ConstMatrix v, double slope, Matrix state);

/// The same in blocks of `block` tokens (lightning attention): within a block the masked form, the earlier
/// blocks through `state` (decayed by exp(-slope (i + 1)) for the block's i-th query); after each block
/// S <- exp(-slope n) S + sum_j exp(-slope (n - 1 - j)) k_j^T v_j over its n tokens. A last block shorter
/// than `block` is handled as it is. `state` as for linear_attention_recurrent.
Tensor linear_attention_blocked(ConstMatrix q, ConstMatrix k, ConstMatrix v, double slope, std::int64_t block,
                                Matrix state);

/// Adds T tokens' keys and values to a state without reading it: S <- exp(-slope T) S + sum_j exp(-slope (T - 1 -
/// j)) k_j^T v_j. What a quadratic prefill must do to leave the state that decode continues from.
void accumulate_linear_state(ConstMatrix k, ConstMatrix v, double slope, Matrix state);

/// MiniMax's per-head slopes for lightning layer `layer` (0-based) of a model of `layers` layers with `heads`
/// heads: s_h = 2^(-8 (h + 1) / heads) * (1 - layer / (layers - 1 + 1e-5) + 1e-5), h = 0 .. heads - 1, as
/// transformers' MiniMaxLightningAttention computes them (ALiBi's slopes, smaller in deeper layers).
/// Throws af::Error for heads < 1, layers < 1 or a layer outside [0, layers).
std::vector<double> lightning_slopes(std::int64_t heads, std::int64_t layer, std::int64_t layers);

/// The recurrent state of one linear-attention layer: one `[d_k, d_v]` matrix per head, `[H, d_k, d_v]`,
/// zeros for a fresh sequence. Its size does not depend on the number of tokens seen.
class LinearState {
 public:
  /// Throws af::Error for sizes < 1.
  LinearState(std::int64_t heads, std::int64_t key_dim, std::int64_t value_dim);

  std::int64_t heads() const { return state_.dim(0); }
  std::int64_t key_dim() const { return state_.dim(1); }
  std::int64_t value_dim() const { return state_.dim(2); }
  /// Tokens folded into the state so far.
  std::int64_t tokens() const { return tokens_; }
  void add_tokens(std::int64_t n) { tokens_ += n; }
  /// Head h's `[d_k, d_v]` matrix.
  Matrix head(std::int64_t h);
  ConstMatrix head(std::int64_t h) const;
  const Tensor& values() const { return state_; }
  /// Bytes the state takes with elements of `dtype`: H d_k d_v bytes_of(dtype), whatever tokens().
  std::int64_t bytes(DType dtype) const;

 private:
  Tensor state_;
  std::int64_t tokens_ = 0;
};

/// The sizes of one lightning layer.
struct LightningShape {
  std::int64_t hidden = 0;        ///< model width
  std::int64_t heads = 0;         ///< H
  std::int64_t head_dim = 0;      ///< d (= d_k = d_v)
  std::int64_t block_size = 256;  ///< B of the blocked prefill (MiniMax's 256)

  /// Throws af::Error naming the first size that is not positive.
  void validate() const;
};

/// The parameters of a lightning layer under transformers' names ([out, in] like nn.Linear).
struct LightningWeights {
  Tensor qkv_proj;         ///< [3 H d, hidden]; head h's rows are its q (d rows), then k, then v
  Tensor output_gate;      ///< [H d, hidden]
  Tensor norm;             ///< [H d], the RMSNorm gain over all heads' outputs together
  Tensor out_proj;         ///< [hidden, H d]
  double norm_eps = 1e-6;  ///< MiniMaxRMSNorm's default, which the lightning layer keeps

  /// Throws af::Error naming the first tensor whose shape disagrees with `shape`.
  void validate(const LightningShape& shape) const;
};

/// How a lightning layer computes a chunk of tokens.
enum class LinearForm {
  blocked,    ///< blocks of `block_size` tokens carrying the state (the reference's prefill)
  recurrent,  ///< token by token (the reference's path whenever a state exists: decode)
  quadratic,  ///< the masked O(T^2) form; only from a fresh state (throws otherwise)
};

/// The per-head q, k, v of the next tokens: SiLU(x W_qkv^T) split head by head into three `[T, H d]` tensors.
struct LinearQkv {
  Tensor q, k, v;
};
LinearQkv lightning_qkv(ConstMatrix x, const LightningShape& shape, const LightningWeights& weights);

/// One lightning layer over the next tokens `x [T, hidden]`: q, k, v = SiLU of one projection; per head
/// decayed linear attention with `slopes[h]` through `state` (computed in `form`); the H d outputs
/// RMS-normalised together; times sigmoid(x W_gate^T); the output projection. Returns `[T, hidden]`.
Tensor lightning_attention(ConstMatrix x, const LightningShape& shape, const LightningWeights& weights,
                           std::span<const double> slopes, LinearState& state, LinearForm form = LinearForm::blocked);

/// A model that mixes linear-attention layers (a fixed state each) with softmax layers (a growing KV cache).
struct HybridModel {
  std::string model;
  std::string source;
  ModelCache softmax;  ///< the softmax layers: their count and one layer's card
  std::int64_t linear_layers = 0;
  std::int64_t linear_heads = 0;
  std::int64_t key_dim = 0;
  std::int64_t value_dim = 0;
  DType state_dtype = DType::bf16;
  /// What the linear layers compute, as the card names it.
  std::string linear_mechanism = "lightning";
  /// Heads that keep a state, when not linear_heads: Gated DeltaNet keeps one per value head.
  std::int64_t state_heads = 0;
  /// The short causal convolution in front of q, k and v (chapter 14): its channels and width; the cache keeps
  /// its last conv_kernel - 1 inputs per layer (0 channels: no convolution, as in lightning attention).
  std::int64_t conv_channels = 0;
  std::int64_t conv_kernel = 0;
  /// FLOPs per state element and token: lightning's update S <- lambda S + k^T v and read-out (3 + 2 = 5); the
  /// delta rule's decay, retrieval S^T k, rank-one write and read-out (1 + 2 + 2 + 2 = 7).
  double flops_per_state_element = 5.0;
  /// What a linear layer projects per token, as the card says it (empty: lightning's q, k, v and gate).
  std::string linear_projected;

  /// Heads with a state: state_heads, or linear_heads when it is 0.
  std::int64_t heads_with_state() const { return state_heads > 0 ? state_heads : linear_heads; }
  /// Bytes one linear layer keeps for one sequence: H d_k d_v state elements and (conv_kernel - 1) conv_channels
  /// convolution inputs, in state_dtype.
  std::int64_t layer_state_bytes() const;
  /// Bytes of one sequence's states, all linear layers: linear_layers x layer_state_bytes().
  std::int64_t state_bytes() const;
  /// Bytes one sequence holds after `t` tokens: the states plus the softmax layers' caches.
  std::int64_t bytes_stored(std::int64_t t) const;
  /// Bytes one decode step reads at context `t`: every state once, and every softmax layer's cache.
  std::int64_t bytes_read(std::int64_t t) const;
  /// Attention FLOPs of one token in all linear layers: flops_per_state_element per state element (lightning:
  /// the update S <- lambda S + k^T v, a scaling and a multiply-add, and the read-out o = q S).
  double linear_flops_per_token() const;
  /// Attention FLOPs of one decode step at context `t`: every linear layer's update and read-out, and every
  /// softmax layer's scores and value mixes (CacheCard::decode_flops).
  double decode_flops(std::int64_t t) const;
  /// Attention FLOPs of a causal prefill of `tokens`, counted token by token as the recurrence computes it (the
  /// blocked form of lightning attention trades some of the state work for intra-block products).
  double prefill_flops(std::int64_t tokens) const;
};

/// MiniMax-M1 (the architecture of MiniMax-Text-01): 80 layers, 70 lightning + 10 softmax (one softmax
/// layer after every seven lightning ones), 64 heads of 128, 8 KV heads on the softmax layers. The KV cache
/// in `kv_dtype`, the lightning states in `state_dtype`.
HybridModel minimax_m1(DType kv_dtype = DType::bf16, DType state_dtype = DType::bf16);

/// Qwen3-Next-80B-A3B: 48 layers, every fourth a gated full-attention layer (12: 16 query heads, 2 KV heads of
/// 256) and the others Gated DeltaNet (36: 16 key heads and 32 value heads of 128, a convolution of width 4 over
/// q, k and v's 8,192 channels).
HybridModel qwen3_next_80b_a3b(DType kv_dtype = DType::bf16, DType state_dtype = DType::bf16);

/// Kimi-Linear-48B-A3B: 27 layers, 7 MLA layers (32 heads, latent 512 and a 64-value key part, as DeepSeek-V3's,
/// here without rotation) and 20 Kimi Delta Attention layers (32 heads of 128, a convolution of width 4 over q,
/// k and v's 12,288 channels).
HybridModel kimi_linear_48b_a3b(DType kv_dtype = DType::bf16, DType state_dtype = DType::bf16);

/// The cache card of a hybrid model, the six answers: what is projected, what is stored (the fixed states
/// and the growing KV cache), the stored shapes, bytes (per token for the softmax layers, per sequence for
/// the states), what one decode step reads at each of `contexts`, and the trade-off; each of `others` is
/// shown beside it at the same contexts.
std::string format_hybrid_card(const HybridModel& model, std::span<const ModelCache> others,
                               std::span<const std::int64_t> contexts);

}  // namespace af
