// QK normalisation (af/qk_norm.hpp): the per-head RMSNorm in both gain forms against float64, and a QK-norm layer
// whose prefill equals its decode steps, through a full cache and through a ring, against a float64 layer written
// out here.
#include "af/compare.hpp"
#include "af/error.hpp"
#include "af/linalg.hpp"
#include "af/qk_norm.hpp"
#include "af/random.hpp"

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

struct QkLayer {
  af::GroupedShape shape;
  af::GroupedWeights weights;
  af::QkNorm norm;
};

QkLayer random_qk_layer(af::Rng& rng, std::int64_t heads, std::int64_t kv_heads, std::int64_t d, af::RmsGain form) {
  const std::int64_t hidden = 24, qd = heads * d, kvd = kv_heads * d;
  const double in = 1.0 / std::sqrt(static_cast<double>(hidden));
  af::GroupedWeights w{af::random_normal(af::Shape{qd, hidden}, rng, in),
                       af::random_normal(af::Shape{kvd, hidden}, rng, in),
                       af::random_normal(af::Shape{kvd, hidden}, rng, in),
                       af::random_normal(af::Shape{hidden, qd}, rng, 1.0 / std::sqrt(static_cast<double>(qd))),
                       af::random_normal(af::Shape{qd}, rng, 0.5),
                       af::random_normal(af::Shape{kvd}, rng, 0.5),
                       af::random_normal(af::Shape{kvd}, rng, 0.5)};
  w.o_bias = af::random_normal(af::Shape{hidden}, rng, 0.5);
  const double centre = form == af::RmsGain::weight ? 1.0 : 0.0;
  af::Tensor q_gain = af::random_normal(af::Shape{d}, rng, 0.3), k_gain = af::random_normal(af::Shape{d}, rng, 0.3);
  for (float& g : q_gain.values()) g += static_cast<float>(centre);
  for (float& g : k_gain.values()) g += static_cast<float>(centre);
  return {af::GroupedShape{hidden, heads, kv_heads, d}, std::move(w), af::QkNorm{q_gain, k_gain, 1e-6, form}};
}

using Rows64 = std::vector<std::vector<double>>;

// x W^T + b in float64.
Rows64 linear64(const af::Tensor& x, const af::Tensor& w, const af::Tensor& b) {
  Rows64 y(static_cast<std::size_t>(x.dim(0)), std::vector<double>(static_cast<std::size_t>(w.dim(0))));
  for (std::int64_t t = 0; t < x.dim(0); ++t)
    for (std::int64_t o = 0; o < w.dim(0); ++o) {
      double sum = b.values().empty() ? 0.0 : b.data()[o];
      for (std::int64_t i = 0; i < x.dim(1); ++i)
        sum += double{x.data()[t * x.dim(1) + i]} * w.data()[o * w.dim(1) + i];
      y[static_cast<std::size_t>(t)][static_cast<std::size_t>(o)] = sum;
    }
  return y;
}

// Per head of d values: x / sqrt(mean(x^2) + eps) * (offset + gain), then the half-split rotation at `position`
// with frequencies theta^(-2i/d).
void norm_and_rotate64(std::vector<double>& row, std::int64_t d, const af::Tensor& gain, double offset, double eps,
                       double theta, double position) {
  for (std::size_t head = 0; head < row.size(); head += static_cast<std::size_t>(d)) {
    double squares = 0.0;
    for (std::int64_t i = 0; i < d; ++i)
      squares += row[head + static_cast<std::size_t>(i)] * row[head + static_cast<std::size_t>(i)];
    const double inverse = 1.0 / std::sqrt(squares / static_cast<double>(d) + eps);
    for (std::int64_t i = 0; i < d; ++i) row[head + static_cast<std::size_t>(i)] *= inverse * (offset + gain.data()[i]);
    for (std::int64_t i = 0; i < d / 2; ++i) {
      const double angle = position * std::pow(theta, -2.0 * static_cast<double>(i) / static_cast<double>(d));
      double& a = row[head + static_cast<std::size_t>(i)];
      double& b = row[head + static_cast<std::size_t>(i + d / 2)];
      const double a0 = a, b0 = b;
      a = a0 * std::cos(angle) - b0 * std::sin(angle);
      b = b0 * std::cos(angle) + a0 * std::sin(angle);
    }
  }
}

// The whole layer in float64 over n tokens at positions 0 .. n-1: row i sees keys j with 0 <= i - j < window.
Rows64 qk_layer64(const af::Tensor& x, const QkLayer& l, double theta, double scale, std::int64_t window) {
  const std::int64_t n = x.dim(0), H = l.shape.heads, d = l.shape.head_dim;
  Rows64 q = linear64(x, l.weights.q_proj, l.weights.q_bias), k = linear64(x, l.weights.k_proj, l.weights.k_bias);
  const Rows64 v = linear64(x, l.weights.v_proj, l.weights.v_bias);
  const double offset = l.norm.form == af::RmsGain::one_plus_weight ? 1.0 : 0.0;
  for (std::int64_t t = 0; t < n; ++t) {
    norm_and_rotate64(q[static_cast<std::size_t>(t)], d, l.norm.q_gain, offset, l.norm.eps, theta,
                      static_cast<double>(t));
    norm_and_rotate64(k[static_cast<std::size_t>(t)], d, l.norm.k_gain, offset, l.norm.eps, theta,
                      static_cast<double>(t));
  }
  Rows64 context(static_cast<std::size_t>(n), std::vector<double>(static_cast<std::size_t>(H * d), 0.0));
  for (std::int64_t i = 0; i < n; ++i)
    for (std::int64_t h = 0; h < H; ++h) {
      const std::int64_t g = l.shape.kv_head_of(h);
      std::vector<double> w(static_cast<std::size_t>(n), -std::numeric_limits<double>::infinity());
      double top = -std::numeric_limits<double>::infinity(), sum = 0.0;
      for (std::int64_t j = std::max<std::int64_t>(0, i - window + 1); j <= i; ++j) {
        double dot = 0.0;
        for (std::int64_t c = 0; c < d; ++c)
          dot += q[static_cast<std::size_t>(i)][static_cast<std::size_t>(h * d + c)] *
                 k[static_cast<std::size_t>(j)][static_cast<std::size_t>(g * d + c)];
        w[static_cast<std::size_t>(j)] = dot * scale;
        top = std::max(top, w[static_cast<std::size_t>(j)]);
      }
      for (std::int64_t j = std::max<std::int64_t>(0, i - window + 1); j <= i; ++j)
        sum += (w[static_cast<std::size_t>(j)] = std::exp(w[static_cast<std::size_t>(j)] - top));
      for (std::int64_t j = std::max<std::int64_t>(0, i - window + 1); j <= i; ++j)
        for (std::int64_t c = 0; c < d; ++c)
          context[static_cast<std::size_t>(i)][static_cast<std::size_t>(h * d + c)] +=
              w[static_cast<std::size_t>(j)] / sum *
              v[static_cast<std::size_t>(j)][static_cast<std::size_t>(g * d + c)];
    }
  Rows64 out(static_cast<std::size_t>(n), std::vector<double>(static_cast<std::size_t>(l.shape.hidden)));
  for (std::int64_t t = 0; t < n; ++t)
    for (std::int64_t o = 0; o < l.shape.hidden; ++o) {
      double y = l.weights.o_bias.data()[o];
      for (std::int64_t c = 0; c < H * d; ++c)
        y += context[static_cast<std::size_t>(t)][static_cast<std::size_t>(c)] * l.weights.o_proj.data()[o * H * d + c];
      out[static_cast<std::size_t>(t)][static_cast<std::size_t>(o)] = y;
    }
  return out;
}

// Largest |got - want| (NaN-propagating) and max(1, largest |want|).
std::pair<double, double> error_and_scale(const af::Tensor& got, const Rows64& want) {
  double error = 0.0, scale = 1.0;
  const std::int64_t cols = got.dim(1);
  for (std::int64_t t = 0; t < got.dim(0); ++t)
    for (std::int64_t o = 0; o < cols; ++o) {
      const double y = want[static_cast<std::size_t>(t)][static_cast<std::size_t>(o)];
      error = af::worse(error, std::abs(got.data()[t * cols + o] - y));
      scale = af::worse(scale, std::abs(y));
    }
  return {error, scale};
}

}  // namespace

TEST_CASE("Per-head RMSNorm scales every head to unit RMS, then applies the gain w or 1 + w", "[qk_norm]") {
  af::Rng rng(1501);
  const std::int64_t T = 3, heads = 4, d = 6;
  const af::Tensor x = af::random_normal(af::Shape{T, heads * d}, rng, 3.0);
  const af::Tensor gain = af::random_normal(af::Shape{d}, rng);
  for (const auto form : {af::RmsGain::weight, af::RmsGain::one_plus_weight}) {
    af::Tensor y = x;
    af::rms_norm_heads(y.matrix(), gain.values(), 1e-6, form);
    double error = 0.0;
    for (std::int64_t t = 0; t < T; ++t)
      for (std::int64_t h = 0; h < heads; ++h) {
        double squares = 0.0;
        for (std::int64_t i = 0; i < d; ++i) squares += std::pow(double{x.data()[t * heads * d + h * d + i]}, 2);
        for (std::int64_t i = 0; i < d; ++i) {
          const double g = (form == af::RmsGain::one_plus_weight ? 1.0 : 0.0) + gain.data()[i];
          const double want = x.data()[t * heads * d + h * d + i] / std::sqrt(squares / d + 1e-6) * g;
          error = af::worse(error, std::abs(y.data()[t * heads * d + h * d + i] - want));
        }
      }
    CHECK(error <= 1e-5);  // values are O(|gain|) <= ~4: float32 rounding
  }
  // Gemma's form with gain w is Qwen3's with gain 1 + w.
  af::Tensor shifted = gain;
  for (float& g : shifted.values()) g += 1.0f;
  af::Tensor gemma = x, qwen = x;
  af::rms_norm_heads(gemma.matrix(), gain.values(), 1e-6, af::RmsGain::one_plus_weight);
  af::rms_norm_heads(qwen.matrix(), shifted.values(), 1e-6, af::RmsGain::weight);
  CHECK(af::max_abs_diff(gemma.values(), qwen.values()) <= 1e-6);
}

TEST_CASE("A QK-norm layer's prefill equals its decode steps and a float64 layer, full cache and ring", "[qk_norm]") {
  af::Rng rng(1502);
  for (const auto form : {af::RmsGain::weight, af::RmsGain::one_plus_weight}) {
    for (const std::int64_t window : {0, 3}) {  // 0: a full cache
      const QkLayer layer = random_qk_layer(rng, 4, 2, 8, form);
      const std::int64_t n = 11, prefill = 5;
      const af::Rope rope(8, 10000.0, af::RopeLayout::half_split);
      const double scale = 1.0 / std::sqrt(12.0);  // a query_pre_attn_scalar of 12, not head_dim
      const af::AttentionOptions options{true, scale};
      const af::Tensor x = af::random_normal(af::Shape{n, layer.shape.hidden}, rng);
      std::vector<std::int64_t> positions;
      for (std::int64_t t = 0; t < n; ++t) positions.push_back(t);
      const auto run = [&](auto& cache) {
        af::Tensor out(af::Shape{n, layer.shape.hidden});
        const af::Tensor first =
            af::qk_norm_attention(x.matrix().rows_slice(0, prefill), std::span(positions).first(prefill), layer.shape,
                                  layer.weights, layer.norm, rope, options, cache);
        std::ranges::copy(first.values(), out.data());
        for (std::int64_t t = prefill; t < n; ++t)
          std::ranges::copy(af::qk_norm_attention(x.matrix().rows_slice(t, 1),
                                                  std::span(positions).subspan(static_cast<std::size_t>(t), 1),
                                                  layer.shape, layer.weights, layer.norm, rope, options, cache)
                                .values(),
                            out.data() + t * layer.shape.hidden);
        return out;
      };
      af::Tensor got;
      if (window > 0) {
        af::RollingKvCache ring(window, 2, 8);
        got = run(ring);
      } else {
        af::GroupedKvCache cache(n, 2, 8);
        got = run(cache);
      }
      const auto [error, size] = error_and_scale(got, qk_layer64(x, layer, 10000.0, scale, window > 0 ? window : n));
      INFO("gain form " << (form == af::RmsGain::weight ? "w" : "1 + w") << ", window " << window);
      CHECK(error <= 1e-5 * size);
    }
  }
}

TEST_CASE("QK norm makes the layer blind to the scale of the q and k projections", "[qk_norm]") {
  af::Rng rng(1503);
  QkLayer layer = random_qk_layer(rng, 2, 1, 8, af::RmsGain::weight);
  layer.weights.q_bias = {};
  layer.weights.k_bias = {};
  layer.norm.eps = 1e-12;  // the only term that sees the scale: made negligible
  const af::Tensor x = af::random_normal(af::Shape{6, layer.shape.hidden}, rng);
  const std::vector<std::int64_t> positions = {0, 1, 2, 3, 4, 5};
  const af::Rope rope(8, 10000.0, af::RopeLayout::half_split);
  af::GroupedKvCache plain_cache(6, 1, 8), scaled_cache(6, 1, 8);
  const af::Tensor plain =
      af::qk_norm_attention(x.matrix(), positions, layer.shape, layer.weights, layer.norm, rope, {}, plain_cache);
  for (float& w : layer.weights.q_proj.values()) w *= 30.0f;
  for (float& w : layer.weights.k_proj.values()) w *= 0.05f;
  const af::Tensor scaled =
      af::qk_norm_attention(x.matrix(), positions, layer.shape, layer.weights, layer.norm, rope, {}, scaled_cache);
  CHECK(af::max_abs_diff(plain.values(), scaled.values()) <= 1e-5);  // float32 rounding of the projections
}

TEST_CASE("QK norm rejects gains of the wrong size, a bad eps and rows that are not whole heads", "[qk_norm][errors]") {
  af::Rng rng(1504);
  const QkLayer layer = random_qk_layer(rng, 2, 1, 8, af::RmsGain::weight);
  af::Tensor x = af::random_normal(af::Shape{2, 12}, rng);
  const af::Tensor gain = af::random_normal(af::Shape{5}, rng);
  CHECK_THROWS_AS(af::rms_norm_heads(x.matrix(), gain.values(), 1e-6, af::RmsGain::weight), af::Error);
  CHECK_THROWS_AS(af::rms_norm_heads(x.matrix(), layer.norm.q_gain.values().first(6), 0.0, af::RmsGain::weight),
                  af::Error);
  af::QkNorm bad = layer.norm;
  bad.k_gain = gain;
  CHECK_THROWS_WITH(bad.validate(8), Catch::Matchers::Contains("k gain is [5]"));
  bad = layer.norm;
  bad.eps = std::numeric_limits<double>::quiet_NaN();
  CHECK_THROWS_AS(bad.validate(8), af::Error);
}
