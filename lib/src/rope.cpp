#include "af/rope.hpp"

#include "af/error.hpp"
#include "af/linalg.hpp"

#include <algorithm>
#include <cmath>
#include <numbers>

namespace af {

Rope::Rope(std::int64_t head_dim, double base, RopeLayout layout, std::optional<Llama3Scaling> scaling)
    : head_dim_(head_dim), layout_(layout) {
  require(head_dim > 0 && head_dim % 2 == 0, "Rope: head_dim is {} (expected an even number > 0)", head_dim);
  require(base > 1.0, "Rope: base (theta) is {} (expected > 1)", base);
  for (std::int64_t i = 0; i < head_dim / 2; ++i)
    inverse_frequencies_.push_back(std::pow(base, -2.0 * static_cast<double>(i) / static_cast<double>(head_dim)));
  if (!scaling) return;
  const Llama3Scaling& s = *scaling;
  require(
      s.factor >= 1.0 && s.low_freq_factor > 0.0 && s.high_freq_factor > s.low_freq_factor && s.original_context > 0.0,
      "Rope: llama3 scaling factor {}, low_freq_factor {}, high_freq_factor {}, original context {} (expected "
      "factor >= 1 and 0 < low < high)",
      s.factor, s.low_freq_factor, s.high_freq_factor, s.original_context);
  const double long_wavelength = s.original_context / s.low_freq_factor;
  const double short_wavelength = s.original_context / s.high_freq_factor;
  for (double& f : inverse_frequencies_) {
    const double wavelength = 2.0 * std::numbers::pi / f;
    if (wavelength > long_wavelength) {
      f /= s.factor;  // slow rotations: stretched, as if the context were `factor` times longer
    } else if (wavelength >= short_wavelength) {
      // between the bands: a blend, from fully stretched at the long end to untouched at the short end
      const double smooth =
          (s.original_context / wavelength - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
      f = (1.0 - smooth) * f / s.factor + smooth * f;
    }
  }
}

Rope::Rope(std::int64_t head_dim, double base, RopeLayout layout, const LinearScaling& linear)
    : Rope(head_dim, base, layout) {
  require(linear.factor >= 1.0 && std::isfinite(linear.factor), "Rope: linear scaling factor {} (expected >= 1)",
          linear.factor);
  for (double& f : inverse_frequencies_) f /= linear.factor;
}

double yarn_mscale(double factor, double weight) { return factor <= 1.0 ? 1.0 : 0.1 * weight * std::log(factor) + 1.0; }

double YarnScaling::attention_scale() const {
  if (attention_factor) return *attention_factor;
  if (mscale != 0.0 && mscale_all_dim != 0.0) return yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim);
  return yarn_mscale(factor, 1.0);
}

std::pair<double, double> YarnScaling::correction_range(std::int64_t head_dim, double base) const {
  const double d = static_cast<double>(head_dim);
  // the pair index whose wavelength fits `rotations` times into the original context
  const auto pair_index = [&](double rotations) {
    return d * std::log(original_context / (rotations * 2.0 * std::numbers::pi)) / (2.0 * std::log(base));
  };
  double low = pair_index(beta_fast), high = pair_index(beta_slow);
  if (truncate) {
    low = std::floor(low);
    high = std::ceil(high);
  }
  return {std::max(low, 0.0), std::min(high, d - 1.0)};
}

Rope::Rope(std::int64_t head_dim, double base, RopeLayout layout, const YarnScaling& yarn)
    : Rope(head_dim, base, layout) {
  require(yarn.factor >= 1.0 && yarn.original_context > 0.0,
          "Rope: yarn factor {}, original context {} (expected factor >= 1 and original context > 0)", yarn.factor,
          yarn.original_context);
  require(yarn.beta_fast > 0.0 && yarn.beta_slow > 0.0 && yarn.beta_fast >= yarn.beta_slow,
          "Rope: yarn beta_fast {}, beta_slow {} (expected beta_fast >= beta_slow > 0)", yarn.beta_fast,
          yarn.beta_slow);
  attention_scale_ = yarn.attention_scale();
  require(std::isfinite(attention_scale_) && attention_scale_ > 0.0, "Rope: yarn attention factor {} (expected > 0)",
          attention_scale_);
  auto [low, high] = yarn.correction_range(head_dim, base);
  if (low == high) high += 0.001;  // a ramp of zero width would divide by zero
  for (std::size_t i = 0; i < inverse_frequencies_.size(); ++i) {
    // ramp 0: the pair rotates often over the original context, keep it; ramp 1: it rotates rarely, stretch it
    const double ramp = std::clamp((static_cast<double>(i) - low) / (high - low), 0.0, 1.0);
    const double kept = inverse_frequencies_[i];
    inverse_frequencies_[i] = (1.0 - ramp) * kept + ramp * kept / yarn.factor;
  }
}

void Rope::rotate(std::span<float> x, double position) const {
  require(static_cast<std::int64_t>(x.size()) == head_dim_, "Rope::rotate: {} values (expected head_dim {})", x.size(),
          head_dim_);
  const std::size_t half = static_cast<std::size_t>(head_dim_ / 2);
  for (std::size_t i = 0; i < half; ++i) {
    const double angle = position * inverse_frequencies_[i];
    const double c = std::cos(angle) * attention_scale_, s = std::sin(angle) * attention_scale_;
    const std::size_t a = layout_ == RopeLayout::adjacent ? 2 * i : i;
    const std::size_t b = layout_ == RopeLayout::adjacent ? 2 * i + 1 : i + half;
    const double x_a = x[a], x_b = x[b];
    x[a] = static_cast<float>(x_a * c - x_b * s);
    x[b] = static_cast<float>(x_b * c + x_a * s);
  }
}

void Rope::rotate_rows(Matrix x, std::span<const std::int64_t> positions) const {
  require(x.cols % head_dim_ == 0, "Rope::rotate_rows: rows of {} values (expected a multiple of head_dim {})", x.cols,
          head_dim_);
  require(static_cast<std::int64_t>(positions.size()) == x.rows, "Rope::rotate_rows: {} positions for {} rows",
          positions.size(), x.rows);
  for (std::int64_t t = 0; t < x.rows; ++t)
    for (std::int64_t h = 0; h < x.cols / head_dim_; ++h)
      rotate(x.row(t).subspan(static_cast<std::size_t>(h * head_dim_), static_cast<std::size_t>(head_dim_)),
             static_cast<double>(positions[static_cast<std::size_t>(t)]));
}

std::vector<std::int64_t> adjacent_to_half_split(std::int64_t head_dim) {
  require(head_dim > 0 && head_dim % 2 == 0, "adjacent_to_half_split: head_dim is {} (expected even)", head_dim);
  std::vector<std::int64_t> perm;
  for (std::int64_t i = 0; i < head_dim; i += 2) perm.push_back(i);
  for (std::int64_t i = 1; i < head_dim; i += 2) perm.push_back(i);
  return perm;
}

Tensor rotary_grouped_attention(ConstMatrix x, std::span<const std::int64_t> positions, const GroupedShape& shape,
                                const GroupedWeights& weights, const Rope& rope, const AttentionOptions& options,
                                GroupedKvCache& cache) {
  weights.validate(shape);
  require(rope.head_dim() == shape.head_dim, "rotary_grouped_attention: RoPE of dimension {} for heads of {}",
          rope.head_dim(), shape.head_dim);
  Tensor q = linear(x, weights.q_proj.matrix(), weights.q_bias.values());  // [T, H d]
  Tensor k = linear(x, weights.k_proj.matrix(), weights.k_bias.values());  // [T, G d]
  const Tensor v = linear(x, weights.v_proj.matrix(), weights.v_bias.values());
  rope.rotate_rows(q.matrix(), positions);
  rope.rotate_rows(k.matrix(), positions);  // cached rotated: a key's position is fixed when it is written
  cache.append(k.matrix(), v.matrix());
  const Tensor context = grouped_attend(q.matrix(), shape, cache, options);
  return linear(context.matrix(), weights.o_proj.matrix(), weights.o_bias.values());
}

}  // namespace af
