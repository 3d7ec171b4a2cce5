#include "af/gated_attention.hpp"

#include "af/error.hpp"
#include "af/linalg.hpp"
#include "af/qk_norm.hpp"
#include "af/rope.hpp"

#include <cmath>

namespace af {

void GatedAttentionShape::validate() const {
  grouped.validate();
  require(rotary_dim >= 0 && rotary_dim <= grouped.head_dim && rotary_dim % 2 == 0,
          "GatedAttentionShape: rotary dim {} (expected an even number in 0..{})", rotary_dim, grouped.head_dim);
  require(rope_base > 1 && std::isfinite(rope_base), "GatedAttentionShape: rope base {} (expected > 1)", rope_base);
  require(norm_eps > 0 && std::isfinite(norm_eps), "GatedAttentionShape: norm eps {} (expected > 0)", norm_eps);
}

void GatedAttentionWeights::validate(const GatedAttentionShape& s) const {
  s.validate();
  const GroupedShape& g = s.grouped;
  const auto check = [](const char* name, const Tensor& t, const Shape& expected) {
    if (t.shape() != expected)
      fail("GatedAttentionWeights: {} is {} (expected {})", name, t.shape().str(), expected.str());
  };
  check("q_proj", q_proj, Shape{g.heads * 2 * g.head_dim, g.hidden});
  check("k_proj", k_proj, Shape{g.kv_heads * g.head_dim, g.hidden});
  check("v_proj", v_proj, Shape{g.kv_heads * g.head_dim, g.hidden});
  check("o_proj", o_proj, Shape{g.hidden, g.heads * g.head_dim});
  check("q_norm", q_norm, Shape{g.head_dim});
  check("k_norm", k_norm, Shape{g.head_dim});
}

// [gated-attention]
Tensor gated_attention(ConstMatrix x, std::span<const std::int64_t> positions, const GatedAttentionShape& s,
                       const GatedAttentionWeights& w, GroupedKvCache& cache) {
  w.validate(s);
  const GroupedShape& g = s.grouped;
  const std::int64_t T = x.rows, H = g.heads, G = g.kv_heads, d = g.head_dim;
  require(x.cols == g.hidden && T >= 1, "gated_attention: input {} (expected [T, {}])", x.shape_str(), g.hidden);
  require(static_cast<std::int64_t>(positions.size()) == T, "gated_attention: {} positions for {} tokens",
          positions.size(), T);
  const Tensor qg = linear(x, w.q_proj.matrix());  // [T, H * 2d]: per head [q | gate]
  Tensor q(Shape{T, H * d}), gate(Shape{T, H * d});
  Tensor k = linear(x, w.k_proj.matrix()), v = linear(x, w.v_proj.matrix());
  const Rope rope(std::max<std::int64_t>(s.rotary_dim, 2), s.rope_base, RopeLayout::half_split);
  for (std::int64_t t = 0; t < T; ++t)
    for (std::int64_t h = 0; h < H; ++h) {
      const float* in = qg.data() + t * H * 2 * d + h * 2 * d;
      std::copy(in, in + d, q.data() + (t * H + h) * d);
      std::copy(in + d, in + 2 * d, gate.data() + (t * H + h) * d);
    }
  rms_norm_heads(q.matrix(), w.q_norm.values(), s.norm_eps, RmsGain::one_plus_weight);
  rms_norm_heads(k.matrix(), w.k_norm.values(), s.norm_eps, RmsGain::one_plus_weight);
  if (s.rotary_dim > 0) {
    const auto rotated = static_cast<std::size_t>(s.rotary_dim);
    for (std::int64_t t = 0; t < T; ++t) {
      const auto position = static_cast<double>(positions[static_cast<std::size_t>(t)]);
      for (std::int64_t h = 0; h < H; ++h)
        rope.rotate(q.matrix().row(t).subspan(static_cast<std::size_t>(h * d), rotated), position);
      for (std::int64_t j = 0; j < G; ++j)
        rope.rotate(k.matrix().row(t).subspan(static_cast<std::size_t>(j * d), rotated), position);
    }
  }
  cache.append(k.matrix(), v.matrix());
  Tensor attended = grouped_attend(q.matrix(), g, cache, AttentionOptions{});
  for (std::int64_t i = 0; i < attended.numel(); ++i)
    attended.data()[i] *= static_cast<float>(1.0 / (1.0 + std::exp(-static_cast<double>(gate.data()[i]))));
  return linear(attended.matrix(), w.o_proj.matrix());
}
// [/gated-attention]

}  // namespace af
