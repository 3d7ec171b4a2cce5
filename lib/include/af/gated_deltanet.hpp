#pragma once
/// @file gated_deltanet.hpp
/// A Gated DeltaNet layer as Qwen3-Next's linear-attention layers compute it (chapter 14): one projection to
/// q, k, v and an output gate z, one to the learning rate b and the decay input a; a short causal depthwise
/// convolution with SiLU over q, k and v; unit-norm q and k (q also scaled by 1/sqrt(d_k)); the gated delta
/// rule (af::delta_rule_chunked for a prefill, af::delta_rule_recurrent for decode), with value heads that
/// share key heads as GQA's query heads share KV heads; a gated RMSNorm per value head; the output
/// projection. Its whole cache is the convolution's last inputs and the delta-rule state, constant in length.
///
/// The projection's layout is the checkpoint's: for each key head g, [q_g (d_k), k_g (d_k), the r = Hv/Hk value
/// heads' v (r d_v), their z (r d_v)]; the second projection, for each key head, [b (r), a (r)].

#include "af/tensor.hpp"

#include <cstdint>

namespace af {

struct GatedDeltaNetShape {
  std::int64_t hidden = 0;       ///< model width
  std::int64_t key_heads = 0;    ///< Hk (linear_num_key_heads)
  std::int64_t value_heads = 0;  ///< Hv (linear_num_value_heads), a multiple of Hk
  std::int64_t key_dim = 0;      ///< d_k (linear_key_head_dim)
  std::int64_t value_dim = 0;    ///< d_v (linear_value_head_dim)
  std::int64_t conv_kernel = 4;  ///< the convolution's width (linear_conv_kernel_dim)
  double norm_eps = 1e-6;        ///< the gated RMSNorm's epsilon (rms_norm_eps)

  /// Channels the convolution runs over: 2 Hk d_k + Hv d_v (q, k and v).
  std::int64_t conv_channels() const { return 2 * key_heads * key_dim + value_heads * value_dim; }
  /// Throws af::Error naming the first size that is not positive, or Hv not a multiple of Hk.
  void validate() const;
};

/// The parameters, in the checkpoint's layout.
struct GatedDeltaNetWeights {
  Tensor in_proj_qkvz;  ///< [2 Hk d_k + 2 Hv d_v, hidden]
  Tensor in_proj_ba;    ///< [2 Hv, hidden]
  Tensor conv;          ///< [conv_channels, conv_kernel] (conv1d.weight without its middle axis)
  Tensor dt_bias;       ///< [Hv]
  Tensor a_log;         ///< [Hv]: the decay rate is exp(A_log)
  Tensor norm;          ///< [d_v], shared by the value heads
  Tensor out_proj;      ///< [hidden, Hv d_v]

  /// Throws af::Error naming the first tensor whose shape disagrees with `shape`.
  void validate(const GatedDeltaNetShape& shape) const;
};

/// What the layer keeps between calls: the last conv_kernel - 1 inputs of the convolution `[K - 1, channels]`
/// (zeros before the first token) and the delta rule's state `[Hv, d_k, d_v]`.
struct GatedDeltaNetCache {
  Tensor conv_inputs;
  Tensor state;
  std::int64_t tokens = 0;  ///< tokens seen so far

  explicit GatedDeltaNetCache(const GatedDeltaNetShape& shape);
  /// Bytes the cache holds in float32: the same for any number of tokens.
  std::int64_t bytes() const { return 4 * (conv_inputs.numel() + state.numel()); }
};

/// The layer over the next tokens `x [T, hidden]`, continuing `cache`: a prefill (T > 1) runs the chunked
/// delta rule with chunks of `chunk`, a decode step (T = 1) the recurrence; returns `[T, hidden]`.
Tensor gated_deltanet(ConstMatrix x, const GatedDeltaNetShape& shape, const GatedDeltaNetWeights& weights,
                      GatedDeltaNetCache& cache, std::int64_t chunk = 64);

/// Kimi Delta Attention as Kimi Linear's KDA layers compute it: the same short convolution over separate q, k
/// and v projections and the same unit q and k, but H heads of one size d for keys and values, and a decay per
/// key channel: log-decay -exp(A_log[h]) softplus(f_b(f_a(x)) + dt_bias), a low-rank projection through d
/// channels; beta = sigmoid(b_proj x) per head; the output normalised per head and gated by
/// sigmoid(g_b(g_a(x))) (a sigmoid, where Gated DeltaNet's gate is a SiLU).
struct KimiDeltaShape {
  std::int64_t hidden = 0;       ///< model width
  std::int64_t heads = 0;        ///< H (linear_attn_config.num_heads)
  std::int64_t head_dim = 0;     ///< d (linear_attn_config.head_dim), keys and values alike
  std::int64_t conv_kernel = 4;  ///< linear_attn_config.short_conv_kernel_size
  double norm_eps = 1e-6;        ///< rms_norm_eps
  std::int64_t conv_channels() const { return 3 * heads * head_dim; }
  void validate() const;
};

struct KimiDeltaWeights {
  Tensor q_proj, k_proj, v_proj;  ///< [H d, hidden] each
  Tensor conv;                    ///< [3 H d, conv_kernel], over [q | k | v]
  Tensor f_a, f_b;                ///< forget gate: [d, hidden], [H d, d]
  Tensor dt_bias;                 ///< [H d]
  Tensor a_log;                   ///< [H]
  Tensor b_proj;                  ///< [H, hidden]
  Tensor g_a, g_b;                ///< output gate: [d, hidden], [H d, d]
  Tensor o_norm;                  ///< [d]
  Tensor o_proj;                  ///< [hidden, H d]
  void validate(const KimiDeltaShape& shape) const;
};

/// The convolution's last inputs `[K - 1, 3 H d]` and the state `[H, d, d]`.
struct KimiDeltaCache {
  Tensor conv_inputs;
  Tensor state;
  std::int64_t tokens = 0;
  explicit KimiDeltaCache(const KimiDeltaShape& shape);
  std::int64_t bytes() const { return 4 * (conv_inputs.numel() + state.numel()); }
};

/// The layer over `x [T, hidden]`, continuing `cache` (chunked prefill for T > 1, recurrence for T = 1).
Tensor kimi_delta_attention(ConstMatrix x, const KimiDeltaShape& shape, const KimiDeltaWeights& weights,
                            KimiDeltaCache& cache, std::int64_t chunk = 64);

}  // namespace af
