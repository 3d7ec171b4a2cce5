#pragma once
/// @file train_mixers.hpp
/// Token mixers for training besides softmax attention (af::train::SoftmaxAttention), each a
/// af::train::MixerOf with a hand-written backward built from the ops of af/train.hpp and the cores of
/// af/grad_cores.hpp, and each computing in its forward what the library's inference layer of the same name
/// computes:
/// - GatedDeltaNetMixer: Qwen3-Next's Gated DeltaNet layer (chapter 14, af::gated_deltanet);
/// - LinearAttentionMixer: MiniMax's lightning layer (chapter 13, af::lightning_attention);
/// - MlaMixer: DeepSeek's multi-head latent attention without a query low-rank path (chapter 07,
///   af::mla_attention);
/// - DsaMixer: DeepSeek V3.2's sparse attention in miniature, softmax attention over the top-k keys of a
///   lightning indexer trained by its own KL loss (chapter 11).
///
/// Parameters carry the Hugging Face checkpoints' names (without `.weight` where the checkpoint has none), under
/// the prefix the model gives (`layers.l.mixer.`).

#include "af/train.hpp"

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

namespace af::train {

// ---------------------------------------------------------------------------------------------------------
// Gated DeltaNet (Qwen3-Next)
// ---------------------------------------------------------------------------------------------------------

/// The sizes of a Gated DeltaNet mixer, as Qwen3-Next's configuration names them (linear_*).
struct GatedDeltaNetOptions {
  std::int64_t key_heads = 2;    ///< Hk (linear_num_key_heads)
  std::int64_t value_heads = 4;  ///< Hv (linear_num_value_heads), a multiple of Hk
  std::int64_t key_dim = 8;      ///< d_k (linear_key_head_dim)
  std::int64_t value_dim = 8;    ///< d_v (linear_value_head_dim)
  std::int64_t conv_kernel = 4;  ///< K, the short convolution's width (linear_conv_kernel_dim)
  double norm_eps = 1e-6;        ///< the gated RMSNorm's epsilon
};

/// Qwen3-Next's linear-attention layer, the same layout and math as af::gated_deltanet but computed by the
/// training cores: the projections `in_proj_qkvz.weight` [2 Hk d_k + 2 Hv d_v, D] (per key head [q, k, its
/// r = Hv/Hk value heads' v, their z]) and `in_proj_ba.weight` [2 Hv, D] (per key head [b (r), a (r)]); the
/// causal depthwise convolution `conv1d.weight` [C, K] with SiLU over the C = 2 Hk d_k + Hv d_v channels
/// [q | k | v]; unit q (times 1/sqrt(d_k)) and k; the gates log_decay = -exp(`A_log`) softplus(a + `dt_bias`)
/// and beta = sigmoid(b), `A_log` and `dt_bias` [Hv]; the gated delta rule from a zero state by its
/// recurrence (af::grad::delta_rule_forward, which saves every state for the backward: Hv (T + 1) d_k d_v
/// values per call), value heads reading their key head's q and k; the gated RMSNorm `norm.weight` [d_v]
/// shared by the heads, o / rms(o) w silu(z); the output projection `out_proj.weight` [D, Hv d_v].
///
/// Initialisation: A_log = log(uniform(0.01, 16)) (Init::log_decay_rate) as transformers'
/// Qwen3NextPreTrainedModel._init_weights; dt_bias as the FLA library's GatedDeltaNet (and Mamba) initialise it,
/// softplus(dt_bias) log-uniform in [0.001, 0.1] (Init::time_step_bias), not transformers' dt_bias = 1, which
/// starts half the heads with decays below exp(-5) per token, so they forget before they can learn to recall;
/// the norm's gain 1; the convolution as torch's nn.Conv1d,
/// uniform(+-1/sqrt(K)) (Init::fan_in_uniform); the input projections normal, the output projection
/// Init::output_projection. A_log, dt_bias and the gain have no weight decay (FLA marks A_log and dt_bias
/// _no_weight_decay).
class GatedDeltaNetMixer : public MixerOf<GatedDeltaNetMixer> {
 public:
  /// Throws af::Error for hidden or a size < 1, value_heads not a multiple of key_heads, or norm_eps <= 0.
  GatedDeltaNetMixer(std::int64_t hidden, const GatedDeltaNetOptions& options);

  void add_parameters(Layout& layout, const std::string& prefix) override;
  /// e.g. `gated deltanet, 2 key heads, 4 value heads, d_k 8, d_v 8, conv 4; state 256 + conv 96 values per
  /// sequence`.
  std::string describe() const override;
  const GatedDeltaNetOptions& options() const { return options_; }

  /// The tape: what the backward needs of every stage.
  template <class T>
  struct Tape : MixerTape {
    std::vector<T> x;                // [T, D]
    std::vector<T> mixed, conv;      // the convolution's input and output, [T, C]
    std::vector<T> q, k, v;          // the delta rule's inputs, [T, Hv, d_k] and [T, Hv, d_v]
    std::vector<T> z, a, b;          // [T, Hv d_v], [T, Hv], [T, Hv]
    std::vector<T> log_decay, beta;  // [T, Hv]
    std::vector<T> states;           // [Hv, T + 1, d_k, d_v]
    std::vector<T> o, normed;        // [T, Hv, d_v]: the rule's output, after the gated norm
  };
  template <class T>
  std::unique_ptr<MixerTape> forward_typed(std::span<const T> params, View<const T> x, View<T> y) const;
  template <class T>
  void backward_typed(std::span<const T> params, const MixerTape& tape, View<const T> dy, View<T> dx,
                      std::span<T> grads) const;

 private:
  std::int64_t conv_channels() const;

  std::int64_t hidden_;
  GatedDeltaNetOptions options_;
  Slice qkvz_, ba_, conv_, dt_bias_, a_log_, norm_, out_;
};

// ---------------------------------------------------------------------------------------------------------
// Lightning attention (MiniMax)
// ---------------------------------------------------------------------------------------------------------

/// The sizes of a lightning (decayed linear attention) mixer and where it sits in the model.
struct LinearAttentionOptions {
  std::int64_t heads = 4;     ///< H
  std::int64_t head_dim = 8;  ///< d (= d_k = d_v)
  std::int64_t layer = 0;     ///< this layer's index, for the slopes
  std::int64_t layers = 1;    ///< the model's layer count, for the slopes
  double norm_eps = 1e-6;     ///< the RMSNorm's epsilon (MiniMaxRMSNorm's default)
};

/// MiniMax's lightning layer, as af::lightning_attention computes it: q, k, v = SiLU(x W_qkv^T) with
/// `qkv_proj.weight` [3 H d, D] (head h's rows: its q, then k, then v); per head decayed linear attention with the
/// fixed slope af::lightning_slopes(H, layer, layers)[h] (af::grad::linear_attention_forward; no scale, no
/// softmax); the H d outputs RMS-normalised together with the gain `norm.weight` [H d]; times
/// sigmoid(x W_gate^T), `output_gate.weight` [H d, D]; the output projection `out_proj.weight` [D, H d]. The
/// slopes are constants, not parameters.
class LinearAttentionMixer : public MixerOf<LinearAttentionMixer> {
 public:
  /// Throws af::Error for hidden, heads or head_dim < 1, a layer outside [0, layers), or norm_eps <= 0.
  LinearAttentionMixer(std::int64_t hidden, const LinearAttentionOptions& options);

  void add_parameters(Layout& layout, const std::string& prefix) override;
  /// e.g. `lightning attention, 4 heads, head_dim 8, slopes 0.25 .. 0.00391; state 256 values per sequence`.
  std::string describe() const override;
  const LinearAttentionOptions& options() const { return options_; }
  /// The fixed per-head decay slopes, lambda_h = exp(-slopes[h]).
  const std::vector<double>& slopes() const { return slopes_; }

  template <class T>
  struct Tape : MixerTape {
    std::vector<T> x;             // [T, D]
    std::vector<T> qkv;           // the projection before SiLU, [T, 3 H d]
    std::vector<T> q, k, v;       // after SiLU, [T, H, d]
    std::vector<T> o, inv_rms;    // the attention's output [T, H d] and its norm's 1/rms [T]
    std::vector<T> normed, gate;  // [T, H d]: after the norm, the gate's projection before the sigmoid
    std::vector<T> gated;         // [T, H d]: normed sigmoid(gate)
  };
  template <class T>
  std::unique_ptr<MixerTape> forward_typed(std::span<const T> params, View<const T> x, View<T> y) const;
  template <class T>
  void backward_typed(std::span<const T> params, const MixerTape& tape, View<const T> dy, View<T> dx,
                      std::span<T> grads) const;

 private:
  std::int64_t hidden_;
  LinearAttentionOptions options_;
  std::vector<double> slopes_;
  Slice qkv_, gate_, norm_, out_;
};

// ---------------------------------------------------------------------------------------------------------
// Multi-head latent attention (DeepSeek V2/V3)
// ---------------------------------------------------------------------------------------------------------

/// The sizes of an MLA mixer, named after DeepSeek's configuration fields in the comments.
struct MlaOptions {
  std::int64_t heads = 4;      ///< H
  std::int64_t nope_dim = 8;   ///< d_n (qk_nope_head_dim): the part of q and k without rotation
  std::int64_t rope_dim = 4;   ///< d_r (qk_rope_head_dim): the rotated part, one key shared by the heads
  std::int64_t value_dim = 8;  ///< d_v (v_head_dim)
  std::int64_t kv_rank = 8;    ///< r (kv_lora_rank): the latent's width
  double rope_base = 10000.0;  ///< RoPE theta
  double norm_eps = 1e-6;      ///< kv_a_layernorm's epsilon
};

/// DeepSeek's multi-head latent attention without a query low-rank path, as af::mla_attention computes it
/// (naive path, half-split RoPE): q = x W_q^T with `q_proj.weight` [H (d_n + d_r), D], each head [q_nope |
/// q_rope] with RoPE on q_rope; [c | k_rope] = x W_kva^T with `kv_a_proj_with_mqa.weight` [r + d_r, D]; the
/// latent c RMS-normalised with the gain `kv_a_layernorm.weight` [r], k_rope rotated and shared by every head;
/// [k_nope_h | v_h] = c W_kvb^T per head with `kv_b_proj.weight` [H (d_n + d_v), r]; causal softmax attention of
/// q_h against k_h = [k_nope_h | k_rope] with scale 1/sqrt(d_n + d_r) and values v_h of d_v channels
/// (attention_forward with value_dim); the output projection `o_proj.weight` [D, H d_v]. An inference cache keeps
/// r + d_r values per token: the normalised latent and the rotated shared key.
class MlaMixer : public MixerOf<MlaMixer> {
 public:
  /// Throws af::Error for hidden or a size < 1, an odd rope_dim, rope_base <= 1 or norm_eps <= 0.
  MlaMixer(std::int64_t hidden, const MlaOptions& options);

  void add_parameters(Layout& layout, const std::string& prefix) override;
  /// e.g. `MLA, 4 heads, d_n 8, d_r 4, d_v 8, latent 8; cache 12 values per token (MHA: 80)`.
  std::string describe() const override;
  const MlaOptions& options() const { return options_; }

  template <class T>
  struct Tape : MixerTape {
    std::vector<T> x;                // [T, D]
    std::vector<T> q;                // [T, H (d_n + d_r)], rope parts rotated
    std::vector<T> latent, inv_rms;  // c before the norm [T, r], the norm's 1/rms [T]
    std::vector<T> latent_normed;    // [T, r]
    std::vector<T> keys, values;     // [T, H (d_n + d_r)], [T, H d_v]
    std::vector<T> weights, mixed;   // attention weights [H, T, T], heads' outputs [T, H d_v]
  };
  template <class T>
  std::unique_ptr<MixerTape> forward_typed(std::span<const T> params, View<const T> x, View<T> y) const;
  template <class T>
  void backward_typed(std::span<const T> params, const MixerTape& tape, View<const T> dy, View<T> dx,
                      std::span<T> grads) const;

 private:
  AttentionShape attention_shape() const;

  std::int64_t hidden_;
  MlaOptions options_;
  Slice q_, kv_a_, kv_norm_, kv_b_, o_;
};

// ---------------------------------------------------------------------------------------------------------
// DeepSeek sparse attention (V3.2), in miniature
// ---------------------------------------------------------------------------------------------------------

/// The sizes of a DSA mixer: the softmax attention's and the lightning indexer's.
struct DsaOptions {
  std::int64_t heads = 4;            ///< H query heads
  std::int64_t kv_heads = 4;         ///< G key/value heads
  std::int64_t head_dim = 8;         ///< d (even, for RoPE)
  double rope_base = 10000.0;        ///< RoPE theta
  std::int64_t index_heads = 2;      ///< H_I, the indexer's query heads
  std::int64_t index_dim = 4;        ///< d_I, the indexer's head dimension
  std::int64_t top_k = 4;            ///< keys each query attends (all it may see when fewer)
  double indexer_loss_weight = 1.0;  ///< the coefficient of the indexer's KL loss gradient
};

/// DeepSeek V3.2's sparse attention in miniature: softmax attention with RoPE and GQA (the parameters and math
/// of SoftmaxAttention: `q_proj.weight`, `k_proj.weight`, `v_proj.weight`, `o_proj.weight`) in which each query
/// attends only to the top_k keys (causal, itself allowed; every key when fewer than top_k exist) of a lightning
/// indexer: index queries `indexer.wq.weight` [H_I d_I, D], one index key per token `indexer.wk.weight` [d_I, D],
/// per-head weights `indexer.weights_proj.weight` [H_I, D] (scaled by 1/sqrt(H_I d_I)), scores
/// I[t, s] = sum_h w[t, h] ReLU(q[t, h] . k[s]) (af::grad::indexer_scores_forward). The V3.2 indexer's RoPE on
/// part of its q and k, its key LayerNorm and FP8 are left out.
///
/// Training, as the DeepSeek-V3.2 paper states it for the sparse stage: the top-k selection has no gradient, so
/// the main loss sends no gradient into the indexer's parameters; the indexer is
/// trained by its own loss, the KL divergence between the main attention's distribution (computed densely over
/// every causal key in the forward, detached, summed over the heads and L1-normalised, then restricted to the
/// selected keys and renormalised) and the softmax of the index scores over the selected keys, averaged over the
/// sequence's queries (af::grad::indexer_loss_forward / T). Its gradient times `indexer_loss_weight` is added
/// to the indexer's parameters in the backward, and none of it to the mixer's input (V3.2 detaches the
/// indexer's input). The tape holds the loss's value (Tape::indexer_loss). With several sequences in a batch
/// the indexer's gradient is the sum of their per-sequence means.
class DsaMixer : public MixerOf<DsaMixer> {
 public:
  /// Throws af::Error for hidden or a size < 1, heads not a multiple of kv_heads, an odd head_dim,
  /// rope_base <= 1, or a negative or non-finite indexer_loss_weight.
  DsaMixer(std::int64_t hidden, const DsaOptions& options);

  void add_parameters(Layout& layout, const std::string& prefix) override;
  /// e.g. `DSA, 4 heads, 4 kv heads, head_dim 8, top-k 4; indexer 2 heads of 4, loss weight 1`.
  std::string describe() const override;
  const DsaOptions& options() const { return options_; }

  template <class T>
  struct Tape : MixerTape {
    std::vector<T> x, q, k, v, weights, mixed;            // as SoftmaxAttention's, under the selection
    std::vector<std::vector<std::int32_t>> allowed_keys;  // [G T] increasing key lists
    std::vector<T> index_q, index_k, index_w;             // [T, H_I d_I], [T, d_I], [T, H_I] (scaled)
    std::vector<T> index_scores, target;                  // [T, T]: I and the detached dense target
    std::vector<std::int64_t> selected;                   // [T, top_k], best first, -1 padded
    std::int64_t top_k = 0;                               // min(options.top_k, T)
    double indexer_loss = 0.0;                            // mean KL over the sequence's queries
  };
  template <class T>
  std::unique_ptr<MixerTape> forward_typed(std::span<const T> params, View<const T> x, View<T> y) const;
  template <class T>
  void backward_typed(std::span<const T> params, const MixerTape& tape, View<const T> dy, View<T> dx,
                      std::span<T> grads) const;

 private:
  std::int64_t hidden_;
  DsaOptions options_;
  Slice q_, k_, v_, o_, index_q_, index_k_, index_w_;
};

// ---------------------------------------------------------------------------------------------------------
// A token shift in front of any mixer
// ---------------------------------------------------------------------------------------------------------

/// A learned one-token shift before another mixer: the inner mixer reads u[t] = x[t] + s * x[t - 1] (s a
/// per-channel vector that starts at 0; u[0] = x[0]). A depthwise causal convolution of width 2 with its current
/// tap fixed at 1: the kind of short convolution H3, Based, RWKV (token shift) and Gated DeltaNet put before
/// their mixers, and the "smeared keys" that Olsson et al. (2022, "In-context learning and induction heads")
/// found to let a single attention layer form induction heads. With it a value token carries its key, so
/// recall needs one layer instead of two. It costs D values of cache per layer: the previous token's x.
class TokenShiftMixer : public MixerOf<TokenShiftMixer> {
 public:
  /// Throws af::Error for hidden < 1 or a null inner mixer.
  TokenShiftMixer(std::int64_t hidden, std::unique_ptr<Mixer> inner);

  /// Adds `prefix` + `shift.weight` `[hidden]` (zeros, no weight decay), then the inner mixer's parameters
  /// under the same prefix.
  void add_parameters(Layout& layout, const std::string& prefix) override;
  /// e.g. `token shift, then softmax attention, ...`.
  std::string describe() const override;
  const Mixer& inner() const { return *inner_; }

  template <class T>
  struct Tape : MixerTape {
    std::vector<T> x;                  // [T, D]
    std::unique_ptr<MixerTape> inner;  // the inner mixer's tape of u
  };
  template <class T>
  std::unique_ptr<MixerTape> forward_typed(std::span<const T> params, View<const T> x, View<T> y) const;
  template <class T>
  void backward_typed(std::span<const T> params, const MixerTape& tape, View<const T> dy, View<T> dx,
                      std::span<T> grads) const;

 private:
  std::int64_t hidden_;
  std::unique_ptr<Mixer> inner_;
  Slice shift_;
};

}  // namespace af::train
