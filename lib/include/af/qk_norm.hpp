#pragma once
/// @file qk_norm.hpp
/// QK normalisation: an RMSNorm over each query head and each key head, applied after the projections and
/// before RoPE, with a learned gain per channel shared by all heads. Qwen3 (Qwen3Attention) and Gemma 3
/// (Gemma3Attention) compute it this way; Qwen3 multiplies by the gain w itself, Gemma 3 (and Qwen3-Next) by
/// 1 + w, so that a gain initialised to zero leaves the normalised vector unchanged. Keys are cached after the
/// norm and the rotation, as in chapter 06. Since |q| and |k| are fixed per head (up to the gain), the scores
/// q . k cannot grow without bound with the projections' weights.

#include "af/attention.hpp"
#include "af/grouped_attention.hpp"
#include "af/rope.hpp"
#include "af/sliding_window.hpp"
#include "af/tensor.hpp"

#include <cstdint>
#include <span>

namespace af {

/// How an RMSNorm applies its learned gain w to the normalised vector.
enum class RmsGain {
  weight,           ///< x / rms(x) * w (Llama's and Qwen3's RMSNorm; a gain of ones is the identity)
  one_plus_weight,  ///< x / rms(x) * (1 + w) (Gemma's RMSNorm; a gain of zeros is the identity)
};

/// RMSNorm of every head of every row of `x` in place: row t holds `x.cols / gain.size()` heads of
/// `gain.size()` values, and each head becomes x / sqrt(mean(x^2) + eps) times the gain in the given form (the
/// mean and the product computed in double). Throws af::Error when the rows are not whole heads or eps <= 0.
void rms_norm_heads(Matrix x, std::span<const float> gain, double eps, RmsGain form);

/// The two gains of a QK-norm layer and how they apply.
struct QkNorm {
  Tensor q_gain;                   ///< [d], shared by every query head
  Tensor k_gain;                   ///< [d], shared by every key head
  double eps = 1e-6;               ///< the norms' epsilon (rms_norm_eps)
  RmsGain form = RmsGain::weight;  ///< w (Qwen3) or 1 + w (Gemma 3)
  /// Throws af::Error when a gain is not [head_dim] or eps is not a positive finite number.
  void validate(std::int64_t head_dim) const;
};

/// Projects `x [T, hidden]` to q [T, H d], k [T, G d], v [T, G d] (biases where `weights` has them),
/// normalises every q and k head, and rotates q and k by `positions` (one per row). The first three steps of
/// every QK-norm layer.
struct NormedRotatedQkv {
  Tensor q, k, v;
};
NormedRotatedQkv qk_norm_project(ConstMatrix x, std::span<const std::int64_t> positions, const GroupedShape& shape,
                                 const GroupedWeights& weights, const QkNorm& norm, const Rope& rope);

/// One QK-norm grouped attention layer over a full cache (Qwen3's layers, Gemma 3's global layers): project,
/// normalise q and k per head, rotate, append k and v to `cache`, attend causally with `options` (Gemma 3 scales
/// by query_pre_attn_scalar^-1/2, not head_dim^-1/2), project back to `[T, hidden]`.
Tensor qk_norm_attention(ConstMatrix x, std::span<const std::int64_t> positions, const GroupedShape& shape,
                         const GroupedWeights& weights, const QkNorm& norm, const Rope& rope,
                         const AttentionOptions& options, GroupedKvCache& cache);

/// The same layer with a sliding window (Gemma 3's local layers): attends through the rolling cache, whose
/// window is the layer's (a query at sequence index q sees keys with 0 <= q - k < window).
Tensor qk_norm_attention(ConstMatrix x, std::span<const std::int64_t> positions, const GroupedShape& shape,
                         const GroupedWeights& weights, const QkNorm& norm, const Rope& rope,
                         const AttentionOptions& options, RollingKvCache& cache);

}  // namespace af
