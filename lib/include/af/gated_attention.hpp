#pragma once
/// @file gated_attention.hpp
/// Gated full attention as Qwen3-Next's full-attention layers compute it (chapter 14): grouped-query attention
/// whose query projection also yields a per-channel output gate, with an RMSNorm on each query and key head
/// (a zero-centred gain: x / rms(x) * (1 + w)) before a partial rotary embedding (the first `rotary_dim`
/// channels of each head, half-split pairs), and the attention output multiplied by sigmoid(gate) before the
/// output projection. Keys are cached after their norm and rotation, as in chapter 06.

#include "af/grouped_attention.hpp"
#include "af/tensor.hpp"

#include <cstdint>
#include <span>

namespace af {

struct GatedAttentionShape {
  GroupedShape grouped;         ///< hidden, H, G, d
  std::int64_t rotary_dim = 0;  ///< channels rotated per head (even, <= d): d x partial_rotary_factor
  double rope_base = 10000.0;   ///< rope_theta
  double norm_eps = 1e-6;       ///< the q/k RMSNorm's epsilon
  /// Throws af::Error naming the first size out of range.
  void validate() const;
};

/// The parameters in the checkpoint's layout.
struct GatedAttentionWeights {
  Tensor q_proj;  ///< [H * 2d, hidden]: per head, d query rows then d gate rows
  Tensor k_proj;  ///< [G d, hidden]
  Tensor v_proj;  ///< [G d, hidden]
  Tensor o_proj;  ///< [hidden, H d]
  Tensor q_norm;  ///< [d], the gain is 1 + q_norm
  Tensor k_norm;  ///< [d]
  /// Throws af::Error naming the first tensor whose shape disagrees with `shape`.
  void validate(const GatedAttentionShape& shape) const;
};

/// The layer over the next tokens `x [T, hidden]` at `positions` (one per row): projects, normalises, rotates,
/// appends k and v to `cache`, attends causally, gates and projects back to `[T, hidden]`.
Tensor gated_attention(ConstMatrix x, std::span<const std::int64_t> positions, const GatedAttentionShape& shape,
                       const GatedAttentionWeights& weights, GroupedKvCache& cache);

}  // namespace af
