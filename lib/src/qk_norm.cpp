#include "af/qk_norm.hpp"

#include "af/error.hpp"
#include "af/linalg.hpp"

#include <cmath>

namespace af {

void rms_norm_heads(Matrix x, std::span<const float> gain, double eps, RmsGain form) {
  const auto d = static_cast<std::int64_t>(gain.size());
  require(d > 0 && x.cols % d == 0, "rms_norm_heads: rows of {} values are not whole heads of {} (the gain's size)",
          x.cols, d);
  require(eps > 0.0 && std::isfinite(eps), "rms_norm_heads: eps {} (expected a finite number > 0)", eps);
  const double offset = form == RmsGain::one_plus_weight ? 1.0 : 0.0;
  for (std::int64_t t = 0; t < x.rows; ++t) {
    for (std::int64_t h = 0; h < x.cols / d; ++h) {
      std::span<float> head = x.row(t).subspan(static_cast<std::size_t>(h * d), static_cast<std::size_t>(d));
      double squares = 0.0;
      for (float v : head) squares += double{v} * v;
      const double inverse_rms = 1.0 / std::sqrt(squares / static_cast<double>(d) + eps);
      for (std::size_t i = 0; i < head.size(); ++i)
        head[i] = static_cast<float>(head[i] * inverse_rms * (offset + gain[i]));
    }
  }
}

void QkNorm::validate(std::int64_t head_dim) const {
  if (q_gain.shape() != Shape{head_dim}) fail("QkNorm: q gain is {} (expected [{}])", q_gain.shape().str(), head_dim);
  if (k_gain.shape() != Shape{head_dim}) fail("QkNorm: k gain is {} (expected [{}])", k_gain.shape().str(), head_dim);
  require(eps > 0.0 && std::isfinite(eps), "QkNorm: eps {} (expected a finite number > 0)", eps);
}

NormedRotatedQkv qk_norm_project(ConstMatrix x, std::span<const std::int64_t> positions, const GroupedShape& shape,
                                 const GroupedWeights& weights, const QkNorm& norm, const Rope& rope) {
  weights.validate(shape);
  norm.validate(shape.head_dim);
  if (x.cols != shape.hidden) fail("qk_norm_project: input is {} (expected [T, {}])", x.shape_str(), shape.hidden);
  require(rope.head_dim() == shape.head_dim, "qk_norm_project: RoPE of dimension {} for heads of {}", rope.head_dim(),
          shape.head_dim);
  NormedRotatedQkv out{linear(x, weights.q_proj.matrix(), weights.q_bias.values()),  // [T, H d]
                       linear(x, weights.k_proj.matrix(), weights.k_bias.values()),  // [T, G d]
                       linear(x, weights.v_proj.matrix(), weights.v_bias.values())};
  rms_norm_heads(out.q.matrix(), norm.q_gain.values(), norm.eps, norm.form);
  rms_norm_heads(out.k.matrix(), norm.k_gain.values(), norm.eps, norm.form);
  rope.rotate_rows(out.q.matrix(), positions);
  rope.rotate_rows(out.k.matrix(), positions);
  return out;
}

Tensor qk_norm_attention(ConstMatrix x, std::span<const std::int64_t> positions, const GroupedShape& shape,
                         const GroupedWeights& weights, const QkNorm& norm, const Rope& rope,
                         const AttentionOptions& options, GroupedKvCache& cache) {
  const NormedRotatedQkv qkv = qk_norm_project(x, positions, shape, weights, norm, rope);
  cache.append(qkv.k.matrix(), qkv.v.matrix());
  const Tensor context = grouped_attend(qkv.q.matrix(), shape, cache, options);
  return linear(context.matrix(), weights.o_proj.matrix(), weights.o_bias.values());
}

Tensor qk_norm_attention(ConstMatrix x, std::span<const std::int64_t> positions, const GroupedShape& shape,
                         const GroupedWeights& weights, const QkNorm& norm, const Rope& rope,
                         const AttentionOptions& options, RollingKvCache& cache) {
  const NormedRotatedQkv qkv = qk_norm_project(x, positions, shape, weights, norm, rope);
  const Tensor context = rolling_attend(qkv.q.matrix(), qkv.k.matrix(), qkv.v.matrix(), shape, cache, options);
  return linear(context.matrix(), weights.o_proj.matrix(), weights.o_bias.values());
}

}  // namespace af
