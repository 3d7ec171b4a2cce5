#include "af/gated_deltanet.hpp"

#include "af/delta_rule.hpp"
#include "af/error.hpp"
#include "af/linalg.hpp"

#include <cmath>

namespace af {

namespace {

// The short causal depthwise convolution of both layers: `mixed` holds the K - 1 cached inputs and then the T
// new ones, [T + K - 1, C]; `weight` is [C, K]. Returns SiLU of the convolution, [T, C], and leaves the last
// K - 1 inputs in `cached` for the next call.
Tensor short_convolution(const Tensor& mixed, const Tensor& weight, std::int64_t T, Tensor& cached) {
  const std::int64_t C = mixed.dim(1), K = weight.dim(1);
  Tensor out(Shape{T, C});
  for (std::int64_t t = 0; t < T; ++t)
    for (std::int64_t c = 0; c < C; ++c) {
      double sum = 0;
      for (std::int64_t i = 0; i < K; ++i)
        sum += static_cast<double>(weight.data()[c * K + i]) * mixed.data()[(t + i) * C + c];
      out.data()[t * C + c] = static_cast<float>(sum / (1.0 + std::exp(-sum)));
    }
  std::copy(mixed.data() + T * C, mixed.data() + (T + K - 1) * C, cached.data());
  return out;
}

// `to` = `from` / sqrt(sum of squares + 1e-6) * scale, over d values (the layers' L2 norm of q and k).
void unit_scaled(const float* from, float* to, std::int64_t d, double scale) {
  double squares = 0;
  for (std::int64_t i = 0; i < d; ++i) squares += static_cast<double>(from[i]) * from[i];
  const double inv = scale / std::sqrt(squares + 1e-6);
  for (std::int64_t i = 0; i < d; ++i) to[i] = static_cast<float>(from[i] * inv);
}

enum class GateActivation { silu, sigmoid };

// The layers' output norm: each head's d outputs o [T, H, d] divided by their root mean square (eps inside),
// times `gain` [d] and act(gate); `gate` holds the same T x H x d values. Returns [T, H d].
Tensor gated_rms_norm(const Tensor& o, const Tensor& gate, const Tensor& gain, double eps, GateActivation act) {
  const std::int64_t rows = o.dim(0) * o.dim(1), d = o.dim(2);
  Tensor y(Shape{o.dim(0), o.dim(1) * d});
  for (std::int64_t r = 0; r < rows; ++r) {
    const float* oh = o.data() + r * d;
    const float* g = gate.data() + r * d;
    double squares = 0;
    for (std::int64_t j = 0; j < d; ++j) squares += static_cast<double>(oh[j]) * oh[j];
    const double inv = 1.0 / std::sqrt(squares / static_cast<double>(d) + eps);
    for (std::int64_t j = 0; j < d; ++j) {
      const double sigmoid = 1.0 / (1.0 + std::exp(-static_cast<double>(g[j])));
      const double scale = act == GateActivation::silu ? g[j] * sigmoid : sigmoid;
      y.data()[r * d + j] = static_cast<float>(oh[j] * inv * gain.data()[j] * scale);
    }
  }
  return y;
}

}  // namespace

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
  const Tensor conv = short_convolution(mixed, w.conv, T, cache.conv_inputs);
  // The delta rule's inputs: unit q and k (q / sqrt(d_k) too), each value head reading its key head.
  DeltaRuleInputs in{Tensor(Shape{T, Hv, dk}), Tensor(Shape{T, Hv, dk}), Tensor(Shape{T, Hv, dv}), Tensor(Shape{T, Hv}),
                     Tensor(Shape{T, Hv})};
  const double q_scale = 1.0 / std::sqrt(static_cast<double>(dk));
  for (std::int64_t t = 0; t < T; ++t) {
    const float* c = conv.data() + t * channels;
    for (std::int64_t h = 0; h < Hv; ++h) {
      const std::int64_t g = h / r;
      unit_scaled(c + g * dk, in.q.data() + (t * Hv + h) * dk, dk, q_scale);
      unit_scaled(c + Hk * dk + g * dk, in.k.data() + (t * Hv + h) * dk, dk, 1.0);
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
  const Tensor y = gated_rms_norm(o, z, w.norm, s.norm_eps, GateActivation::silu);
  return linear(y.matrix(), w.out_proj.matrix());
}
// [/gated-deltanet]

void KimiDeltaShape::validate() const {
  require(hidden > 0 && heads > 0 && head_dim > 0 && conv_kernel > 0,
          "KimiDeltaShape: hidden {}, heads {}, head dim {}, conv kernel {} (expected all > 0)", hidden, heads,
          head_dim, conv_kernel);
  require(norm_eps > 0 && std::isfinite(norm_eps), "KimiDeltaShape: norm eps {} (expected > 0)", norm_eps);
}

void KimiDeltaWeights::validate(const KimiDeltaShape& s) const {
  s.validate();
  const auto check = [](const char* name, const Tensor& t, const Shape& expected) {
    if (t.shape() != expected) fail("KimiDeltaWeights: {} is {} (expected {})", name, t.shape().str(), expected.str());
  };
  const std::int64_t hd = s.heads * s.head_dim;
  check("q_proj", q_proj, Shape{hd, s.hidden});
  check("k_proj", k_proj, Shape{hd, s.hidden});
  check("v_proj", v_proj, Shape{hd, s.hidden});
  check("conv", conv, Shape{s.conv_channels(), s.conv_kernel});
  check("f_a", f_a, Shape{s.head_dim, s.hidden});
  check("f_b", f_b, Shape{hd, s.head_dim});
  check("dt_bias", dt_bias, Shape{hd});
  check("a_log", a_log, Shape{s.heads});
  check("b_proj", b_proj, Shape{s.heads, s.hidden});
  check("g_a", g_a, Shape{s.head_dim, s.hidden});
  check("g_b", g_b, Shape{hd, s.head_dim});
  check("o_norm", o_norm, Shape{s.head_dim});
  check("o_proj", o_proj, Shape{s.hidden, hd});
}

KimiDeltaCache::KimiDeltaCache(const KimiDeltaShape& shape) {
  shape.validate();
  conv_inputs = Tensor(Shape{std::max<std::int64_t>(shape.conv_kernel - 1, 1), shape.conv_channels()});
  state = delta_rule_initial_state(shape.heads, shape.head_dim, shape.head_dim);
}

// [kimi-delta]
Tensor kimi_delta_attention(ConstMatrix x, const KimiDeltaShape& s, const KimiDeltaWeights& w, KimiDeltaCache& cache,
                            std::int64_t chunk) {
  w.validate(s);
  require(x.cols == s.hidden && x.rows >= 1, "kimi_delta_attention: input {} (expected [T, {}])", x.shape_str(),
          s.hidden);
  const std::int64_t T = x.rows, H = s.heads, d = s.head_dim, hd = H * d, K = s.conv_kernel, channels = 3 * hd;
  const Tensor q = linear(x, w.q_proj.matrix()), k = linear(x, w.k_proj.matrix()), v = linear(x, w.v_proj.matrix());
  // The short convolution over [q | k | v], continuing the cached inputs, then SiLU.
  Tensor mixed(Shape{T + K - 1, channels});
  std::copy(cache.conv_inputs.data(), cache.conv_inputs.data() + (K - 1) * channels, mixed.data());
  for (std::int64_t t = 0; t < T; ++t) {
    float* m = mixed.data() + (t + K - 1) * channels;
    std::copy(q.data() + t * hd, q.data() + (t + 1) * hd, m);
    std::copy(k.data() + t * hd, k.data() + (t + 1) * hd, m + hd);
    std::copy(v.data() + t * hd, v.data() + (t + 1) * hd, m + 2 * hd);
  }
  const Tensor conv = short_convolution(mixed, w.conv, T, cache.conv_inputs);
  // The per-channel decay and the learning rate.
  const Tensor forget = linear(linear(x, w.f_a.matrix()).matrix(), w.f_b.matrix());  // [T, H d]
  const Tensor b = linear(x, w.b_proj.matrix());                                     // [T, H]
  DeltaRuleInputs in{Tensor(Shape{T, H, d}), Tensor(Shape{T, H, d}), Tensor(Shape{T, H, d}), Tensor(Shape{T, H, d}),
                     Tensor(Shape{T, H})};
  const double q_scale = 1.0 / std::sqrt(static_cast<double>(d));
  for (std::int64_t t = 0; t < T; ++t)
    for (std::int64_t h = 0; h < H; ++h) {
      const float* c = conv.data() + t * channels;
      unit_scaled(c + h * d, in.q.data() + (t * H + h) * d, d, q_scale);
      unit_scaled(c + hd + h * d, in.k.data() + (t * H + h) * d, d, 1.0);
      std::copy(c + 2 * hd + h * d, c + 2 * hd + (h + 1) * d, in.v.data() + (t * H + h) * d);
      const double rate = std::exp(w.a_log.data()[h]);
      for (std::int64_t i = 0; i < d; ++i) {
        const double g = forget.data()[t * hd + h * d + i] + w.dt_bias.data()[h * d + i];
        const double softplus = g > 20 ? g : std::log1p(std::exp(g));
        in.log_decay.data()[(t * H + h) * d + i] = static_cast<float>(-rate * softplus);
      }
      in.beta.data()[t * H + h] = static_cast<float>(1.0 / (1.0 + std::exp(-b.data()[t * H + h])));
    }
  const Tensor o = T == 1 ? delta_rule_recurrent(in, cache.state) : delta_rule_chunked(in, cache.state, chunk);
  cache.tokens += T;
  // The output: RMSNorm per head, times sigmoid of the low-rank output gate, then o_proj.
  const Tensor gate = linear(linear(x, w.g_a.matrix()).matrix(), w.g_b.matrix());  // [T, H d]
  const Tensor y = gated_rms_norm(o, gate, w.o_norm, s.norm_eps, GateActivation::sigmoid);
  return linear(y.matrix(), w.o_proj.matrix());
}
// [/kimi-delta]

}  // namespace af
