#include "af/gated_deltanet.hpp"

#include "af/delta_rule.hpp"
#include "af/error.hpp"
#include "af/linalg.hpp"

#include <cmath>

namespace af {

void GatedDeltaNetShape::validate() const {
  require(hidden > 0 && key_heads > 0 && value_heads > 0 && key_dim > 0 && value_dim > 0 && conv_kernel > 0,
          "GatedDeltaNetShape: hidden {}, key heads {}, value heads {}, key dim {}, value dim {}, conv kernel {} "
          "(expected all > 0)",
          hidden, key_heads, value_heads, key_dim, value_dim, conv_kernel);
  require(value_heads % key_heads == 0, "GatedDeltaNetShape: {} value heads cannot share {} key heads", value_heads,
          key_heads);
  require(norm_eps > 0 && std::isfinite(norm_eps), "GatedDeltaNetShape: norm eps {} (expected > 0)", norm_eps);
}

void GatedDeltaNetWeights::validate(const GatedDeltaNetShape& s) const {
  s.validate();
  const auto check = [](const char* name, const Tensor& t, const Shape& expected) {
    if (t.shape() != expected)
      fail("GatedDeltaNetWeights: {} is {} (expected {})", name, t.shape().str(), expected.str());
  };
  const std::int64_t kd = s.key_heads * s.key_dim, vd = s.value_heads * s.value_dim;
  check("in_proj_qkvz", in_proj_qkvz, Shape{2 * kd + 2 * vd, s.hidden});
  check("in_proj_ba", in_proj_ba, Shape{2 * s.value_heads, s.hidden});
  check("conv", conv, Shape{s.conv_channels(), s.conv_kernel});
  check("dt_bias", dt_bias, Shape{s.value_heads});
  check("a_log", a_log, Shape{s.value_heads});
  check("norm", norm, Shape{s.value_dim});
  check("out_proj", out_proj, Shape{s.hidden, vd});
}

GatedDeltaNetCache::GatedDeltaNetCache(const GatedDeltaNetShape& shape) {
  shape.validate();
  conv_inputs = Tensor(Shape{std::max<std::int64_t>(shape.conv_kernel - 1, 1), shape.conv_channels()});
  state = delta_rule_initial_state(shape.value_heads, shape.key_dim, shape.value_dim);
}

// [gated-deltanet]
Tensor gated_deltanet(ConstMatrix x, const GatedDeltaNetShape& s, const GatedDeltaNetWeights& w,
                      GatedDeltaNetCache& cache, std::int64_t chunk) {
  w.validate(s);
  require(x.cols == s.hidden && x.rows >= 1, "gated_deltanet: input {} (expected [T, {}])", x.shape_str(), s.hidden);
  const std::int64_t T = x.rows, Hk = s.key_heads, Hv = s.value_heads, dk = s.key_dim, dv = s.value_dim;
  const std::int64_t r = Hv / Hk, K = s.conv_kernel, channels = s.conv_channels();
  const Tensor qkvz = linear(x, w.in_proj_qkvz.matrix()), ba = linear(x, w.in_proj_ba.matrix());
  // Regroup the checkpoint's per-key-head layout into the convolution's channels [q all heads | k | v] and
  // the per-value-head z, b, a.
  const std::int64_t group = 2 * dk + 2 * r * dv;
  Tensor mixed(Shape{T + K - 1, channels}), z(Shape{T, Hv * dv}), b(Shape{T, Hv}), a(Shape{T, Hv});
  std::copy(cache.conv_inputs.data(), cache.conv_inputs.data() + (K - 1) * channels, mixed.data());
  for (std::int64_t t = 0; t < T; ++t) {
    float* m = mixed.data() + (t + K - 1) * channels;
    const float* row = qkvz.data() + t * qkvz.dim(1);
    for (std::int64_t g = 0; g < Hk; ++g) {
      const float* in = row + g * group;
      std::copy(in, in + dk, m + g * dk);                                          // q
      std::copy(in + dk, in + 2 * dk, m + Hk * dk + g * dk);                       // k
      std::copy(in + 2 * dk, in + 2 * dk + r * dv, m + 2 * Hk * dk + g * r * dv);  // v
      std::copy(in + 2 * dk + r * dv, in + group, z.data() + t * Hv * dv + g * r * dv);
      for (std::int64_t j = 0; j < r; ++j) {
        b.data()[t * Hv + g * r + j] = ba.data()[t * 2 * Hv + g * 2 * r + j];
        a.data()[t * Hv + g * r + j] = ba.data()[t * 2 * Hv + g * 2 * r + r + j];
      }
    }
  }
  // The causal depthwise convolution over the cached inputs and the new ones, then SiLU; keep the last K - 1.
  Tensor conv(Shape{T, channels});
  for (std::int64_t t = 0; t < T; ++t)
    for (std::int64_t c = 0; c < channels; ++c) {
      double sum = 0;
      for (std::int64_t i = 0; i < K; ++i)
        sum += static_cast<double>(w.conv.data()[c * K + i]) * mixed.data()[(t + i) * channels + c];
      conv.data()[t * channels + c] = static_cast<float>(sum / (1.0 + std::exp(-sum)));
    }
  std::copy(mixed.data() + T * channels, mixed.data() + (T + K - 1) * channels, cache.conv_inputs.data());
  // The delta rule's inputs: unit q and k (q / sqrt(d_k) too), each value head reading its key head.
  DeltaRuleInputs in{Tensor(Shape{T, Hv, dk}), Tensor(Shape{T, Hv, dk}), Tensor(Shape{T, Hv, dv}), Tensor(Shape{T, Hv}),
                     Tensor(Shape{T, Hv})};
  const double q_scale = 1.0 / std::sqrt(static_cast<double>(dk));
  for (std::int64_t t = 0; t < T; ++t) {
    const float* c = conv.data() + t * channels;
    for (std::int64_t h = 0; h < Hv; ++h) {
      const std::int64_t g = h / r;
      for (const auto& [from, to, scale] : {std::tuple{c + g * dk, in.q.data() + (t * Hv + h) * dk, q_scale},
                                            std::tuple{c + Hk * dk + g * dk, in.k.data() + (t * Hv + h) * dk, 1.0}}) {
        double squares = 0;
        for (std::int64_t i = 0; i < dk; ++i) squares += static_cast<double>(from[i]) * from[i];
        const double inv = scale / std::sqrt(squares + 1e-6);
        for (std::int64_t i = 0; i < dk; ++i) to[i] = static_cast<float>(from[i] * inv);
      }
      std::copy(c + 2 * Hk * dk + h * dv, c + 2 * Hk * dk + (h + 1) * dv, in.v.data() + (t * Hv + h) * dv);
      const double a_in = a.data()[t * Hv + h] + w.dt_bias.data()[h];
      const double softplus = a_in > 20 ? a_in : std::log1p(std::exp(a_in));
      in.log_decay.data()[t * Hv + h] = static_cast<float>(-std::exp(w.a_log.data()[h]) * softplus);
      in.beta.data()[t * Hv + h] = static_cast<float>(1.0 / (1.0 + std::exp(-b.data()[t * Hv + h])));
    }
  }
  const Tensor o = T == 1 ? delta_rule_recurrent(in, cache.state) : delta_rule_chunked(in, cache.state, chunk);
  cache.tokens += T;
  // The gated RMSNorm per value head: o / rms(o) * weight * silu(z).
  Tensor y(Shape{T, Hv * dv});
  for (std::int64_t t = 0; t < T; ++t)
    for (std::int64_t h = 0; h < Hv; ++h) {
      const float* oh = o.data() + (t * Hv + h) * dv;
      const float* zh = z.data() + t * Hv * dv + h * dv;
      double squares = 0;
      for (std::int64_t j = 0; j < dv; ++j) squares += static_cast<double>(oh[j]) * oh[j];
      const double inv = 1.0 / std::sqrt(squares / static_cast<double>(dv) + s.norm_eps);
      for (std::int64_t j = 0; j < dv; ++j) {
        const double gate = zh[j] / (1.0 + std::exp(-static_cast<double>(zh[j])));
        y.data()[t * Hv * dv + h * dv + j] = static_cast<float>(oh[j] * inv * w.norm.data()[j] * gate);
      }
    }
  return linear(y.matrix(), w.out_proj.matrix());
}
// [/gated-deltanet]

}  // namespace af
