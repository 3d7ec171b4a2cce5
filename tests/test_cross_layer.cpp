#include "af/cross_layer.hpp"
#include "af/random.hpp"

#include "error_of.hpp"
#include "reference.hpp"

#include <catch2/catch.hpp>

#include <cmath>
#include <limits>
#include <vector>

namespace {

using af::LayerKind;
using reference::Matrix64;

constexpr LayerKind S = LayerKind::sliding, F = LayerKind::full;

std::vector<af::Gemma3nWeights> random_stack(af::Rng& rng, const af::Gemma3nShape& s, const af::KvSharingPlan& plan) {
  const std::int64_t hidden = s.grouped.hidden, qd = s.grouped.heads * s.grouped.head_dim,
                     kvd = s.grouped.kv_heads * s.grouped.head_dim, d = s.grouped.head_dim;
  const auto gain = [&] {
    af::Tensor g = af::random_normal(af::Shape{d}, rng, 0.2);
    for (float& x : g.values()) x += 1.0f;
    return g;
  };
  std::vector<af::Gemma3nWeights> layers;
  for (std::int64_t l = 0; l < plan.layers(); ++l) {
    af::Gemma3nWeights w;
    w.q_proj = af::random_normal(af::Shape{qd, hidden}, rng, 1.0 / std::sqrt(static_cast<double>(hidden)));
    w.q_norm = gain();
    w.o_proj = af::random_normal(af::Shape{hidden, qd}, rng, 0.5 / std::sqrt(static_cast<double>(qd)));
    if (plan.owns(l)) {
      w.k_proj = af::random_normal(af::Shape{kvd, hidden}, rng, 1.0 / std::sqrt(static_cast<double>(hidden)));
      w.v_proj = af::random_normal(af::Shape{kvd, hidden}, rng, 1.0 / std::sqrt(static_cast<double>(hidden)));
      w.k_norm = gain();
    }
    layers.push_back(std::move(w));
  }
  return layers;
}

// Per-head RMSNorm (times gain when given) and half-split RoPE, in float64, written from the formulas.
void norm_heads64(Matrix64& x, std::int64_t d, const af::Tensor* gain, double eps) {
  for (auto& row : x)
    for (std::size_t base = 0; base < row.size(); base += static_cast<std::size_t>(d)) {
      double squares = 0;
      for (std::int64_t i = 0; i < d; ++i) squares += row[base + i] * row[base + i];
      const double inv = 1.0 / std::sqrt(squares / static_cast<double>(d) + eps);
      for (std::int64_t i = 0; i < d; ++i) row[base + i] *= inv * (gain ? double{gain->data()[i]} : 1.0);
    }
}

void rope64(Matrix64& x, std::int64_t d, double base) {
  for (std::size_t t = 0; t < x.size(); ++t)
    for (std::size_t h = 0; h < x[t].size(); h += static_cast<std::size_t>(d))
      for (std::int64_t i = 0; i < d / 2; ++i) {
        const double angle = static_cast<double>(t) * std::pow(base, -2.0 * static_cast<double>(i) / d);
        const double a = x[t][h + i], b = x[t][h + i + d / 2];
        x[t][h + i] = a * std::cos(angle) - b * std::sin(angle);
        x[t][h + i + d / 2] = b * std::cos(angle) + a * std::sin(angle);
      }
}

// The whole stack over all tokens at once, float64: a reader uses the keys and values its source layer computed
// from the source layer's own input.
Matrix64 stack64(const af::Tensor& x, const af::Gemma3nShape& s, const af::KvSharingPlan& plan,
                 const std::vector<af::Gemma3nWeights>& layers) {
  const std::int64_t d = s.grouped.head_dim, H = s.grouped.heads, G = s.grouped.kv_heads;
  Matrix64 h = reference::to64(x.matrix());
  std::vector<Matrix64> keys(layers.size()), values(layers.size());
  for (std::int64_t l = 0; l < plan.layers(); ++l) {
    const auto& w = layers[static_cast<std::size_t>(l)];
    const double base = plan.kinds[static_cast<std::size_t>(l)] == S ? s.local_rope_base : s.global_rope_base;
    const std::int64_t window =
        plan.kinds[static_cast<std::size_t>(l)] == S ? s.window : std::numeric_limits<std::int64_t>::max();
    if (plan.owns(l)) {
      keys[l] = reference::linear(h, reference::to64(w.k_proj.matrix()));
      values[l] = reference::linear(h, reference::to64(w.v_proj.matrix()));
      norm_heads64(keys[l], d, &w.k_norm, s.norm_eps);
      norm_heads64(values[l], d, nullptr, s.norm_eps);
      rope64(keys[l], d, base);
    }
    Matrix64 q = reference::linear(h, reference::to64(w.q_proj.matrix()));
    norm_heads64(q, d, &w.q_norm, s.norm_eps);
    rope64(q, d, base);
    const Matrix64& k = keys[plan.source[l]];
    const Matrix64& v = values[plan.source[l]];
    const std::size_t n = h.size();
    Matrix64 context(n, std::vector<double>(static_cast<std::size_t>(H * d), 0.0));
    for (std::size_t i = 0; i < n; ++i)
      for (std::int64_t head = 0; head < H; ++head) {
        const std::size_t kv = static_cast<std::size_t>(head / (H / G) * d), qh = static_cast<std::size_t>(head * d);
        std::vector<double> score(n, -std::numeric_limits<double>::infinity());
        double top = -std::numeric_limits<double>::infinity(), sum = 0;
        for (std::size_t j = 0; j <= i; ++j) {
          if (static_cast<std::int64_t>(i - j) >= window) continue;
          double dot = 0;
          for (std::int64_t c = 0; c < d; ++c) dot += q[i][qh + c] * k[j][kv + c];
          top = std::max(top, score[j] = dot);  // scale 1
        }
        for (std::size_t j = 0; j <= i; ++j) sum += std::exp(score[j] - top);
        for (std::size_t j = 0; j <= i; ++j)
          for (std::int64_t c = 0; c < d; ++c) context[i][qh + c] += std::exp(score[j] - top) / sum * v[j][kv + c];
      }
    const Matrix64 out = reference::linear(context, reference::to64(w.o_proj.matrix()));
    for (std::size_t i = 0; i < n; ++i)
      for (std::size_t c = 0; c < h[i].size(); ++c) h[i][c] += out[i][c];
  }
  return h;
}

double max_abs(const Matrix64& m) {
  double top = 0;
  for (const auto& row : m)
    for (double x : row) top = af::worse(top, std::abs(x));
  return top;
}

}  // namespace

TEST_CASE("Gemma 3n's rule: the last shared layers read the last earlier layer of their own kind",
          "[cross_layer][cpu]") {
  // E4B: 35 layers, 15 shared; E2B: 30 layers, 10 shared. Layers 0..19 keep caches; 18 is the last sliding and
  // 19 the last full layer among them.
  for (const auto& [layers, shared] : {std::pair<std::int64_t, std::int64_t>{35, 15}, {30, 10}}) {
    const af::KvSharingPlan plan = af::gemma3n_kv_sharing(af::gemma3n_layer_kinds(layers), shared);
    CHECK(plan.owners() == 20);
    CHECK(plan.owners(F) == 4);
    for (std::int64_t l = 0; l < layers; ++l) {
      const std::int64_t want = l < 20 ? l : (plan.kinds[l] == F ? 19 : 18);
      CHECK(plan.source[l] == want);
    }
  }
  // A shared range that starts right after a full layer: sliding readers go back past it.
  const af::KvSharingPlan plan = af::gemma3n_kv_sharing({S, S, F, S, F}, 2);
  CHECK(plan.source == std::vector<std::int64_t>{0, 1, 2, 1, 2});
  CHECK(af::gemma3n_kv_sharing({S, F, S}, 0).owners() == 3);
}

TEST_CASE("CLA shares each group's first cache and refuses a group of two kinds", "[cross_layer][cpu]") {
  CHECK(af::cla_kv_sharing({F, F, F, F, F}, 2).source == std::vector<std::int64_t>{0, 0, 2, 2, 4});
  CHECK(af::cla_kv_sharing({F, F, F}, 1).owners() == 3);
  CHECK_THAT(af_test::error_of([] {
               af::cla_kv_sharing({F, S}, 2);
             }),
             Catch::Contains("layer 0 (full_attention) and layer 1 (sliding_attention) share a cache"));
  CHECK_THAT(af_test::error_of([] { af::cla_kv_sharing({F}, 0); }), Catch::Contains("factor 0"));
}

TEST_CASE("Bad sharing configurations are refused, naming the value", "[cross_layer][cpu]") {
  CHECK_THAT(af_test::error_of([] {
               af::gemma3n_kv_sharing({S, S, F}, 3);
             }),
             Catch::Contains("num_kv_shared_layers 3 (expected 0..2"));
  CHECK_THAT(af_test::error_of([] {
               af::gemma3n_kv_sharing({S, S, F}, -1);
             }),
             Catch::Contains("num_kv_shared_layers -1"));
  CHECK_THAT(af_test::error_of([] {
               af::gemma3n_kv_sharing({S, S, F}, 1);
             }),
             Catch::Contains("layer 2 (full_attention) has no full_attention layer before layer 2"));
  CHECK_THAT(af_test::error_of([] {
               af::KvSharingPlan{{S, S}, {0, 2}}.validate();
             }),
             Catch::Contains("layer 1 reads layer 2"));
  CHECK_THAT(af_test::error_of([] {
               af::KvSharingPlan{{S, S, S}, {0, 0, 1}}.validate();
             }),
             Catch::Contains("layer 2 reads layer 1, which keeps no cache"));
  CHECK_THAT(af_test::error_of([] {
               af::KvSharingPlan{{S, F}, {0, 0}}.validate();
             }),
             Catch::Contains("expected a cache of its own kind"));
  CHECK_THAT(af_test::error_of([] { af::layer_kind_named("chunked_attention"); }),
             Catch::Contains("\"chunked_attention\""));
}

TEST_CASE("Gemma 3n's cache bytes: owners only, sliding caches capped at the window", "[cross_layer][cpu]") {
  // bf16, 2 KV heads of 256: 2 x 2 x 256 x 2 = 2,048 B per token per cache.
  const af::CrossLayerModel e4b = af::gemma3n_e4b(), e2b = af::gemma3n_e2b();
  CHECK(e4b.bytes_per_token_per_cache() == 2048);
  for (const std::int64_t t : {1, 511, 512, 4096, 32768, 131072}) {
    const std::int64_t window = std::min<std::int64_t>(t, 512);
    // 16 sliding and 4 full caches with sharing, whatever the model's depth.
    CHECK(e4b.bytes_stored(t) == (16 * window + 4 * t) * 2048);
    CHECK(e2b.bytes_stored(t) == (16 * window + 4 * t) * 2048);
    // Without: E4B 28 sliding + 7 full, E2B 24 + 6.
    CHECK(e4b.unshared().bytes_stored(t) == (28 * window + 7 * t) * 2048);
    CHECK(e2b.unshared().bytes_stored(t) == (24 * window + 6 * t) * 2048);
    // Reads do not shrink: every layer still reads its (shared) cache.
    CHECK(e4b.bytes_read(t) == e4b.unshared().bytes_read(t));
    CHECK(e4b.entries_read(t) == 28 * window + 7 * t);
  }
  CHECK(e4b.bytes_written_per_token() == 20 * 2048);
  CHECK(e4b.unshared().bytes_written_per_token() == 35 * 2048);
  // Projections per token, hidden = H d = 2048: q and o 2 x 2048 x 2048 in every layer; k and v 2 x 2048 x 512.
  CHECK(e4b.projection_macs_per_token() == 35 * 2 * 2048 * 2048 + 20 * 2 * 2048 * 512);
  af::CrossLayerModel bad = e4b;
  bad.kv_heads = 3;
  CHECK_THAT(af_test::error_of([&] { bad.validate(); }), Catch::Contains("8 heads are not a multiple of 3 KV heads"));
}

TEST_CASE("A sharing stack, prefill then decode, equals a float64 stack", "[cross_layer][cpu]") {
  // Prompts shorter and longer than the window; GQA and MQA; Gemma 3n's and CLA's plans.
  struct Setup {
    af::KvSharingPlan plan;
    std::int64_t kv_heads, window, prefill, total;
  };
  const std::vector<Setup> setups{
      {af::gemma3n_kv_sharing({S, S, F, S, S, F, S, F}, 3), 2, 4, 9, 14},
      {af::gemma3n_kv_sharing({S, S, F, S, S, F, S, F}, 3), 1, 5, 3, 12},
      {af::cla_kv_sharing({S, S, S, S, F, F}, 2), 2, 3, 6, 10},
      {af::no_kv_sharing({S, F, S}), 4, 2, 5, 8},
  };
  af::Rng rng(15);
  for (const Setup& setup : setups) {
    const af::Gemma3nShape shape{af::GroupedShape{32, 4, setup.kv_heads, 8}, setup.window, 1e4, 1e6, 1e-6};
    const auto layers = random_stack(rng, shape, setup.plan);
    const af::Tensor x = af::random_normal(af::Shape{setup.total, 32}, rng);
    std::vector<std::int64_t> positions(static_cast<std::size_t>(setup.total));
    for (std::int64_t t = 0; t < setup.total; ++t) positions[t] = t;

    af::CrossLayerKvCache cache(setup.plan, setup.kv_heads, 8, setup.window, setup.total);
    af::Tensor got(af::Shape{setup.total, 32});
    const af::Tensor first =
        af::cross_layer_stack(x.matrix().rows_slice(0, setup.prefill), std::span(positions).first(setup.prefill), shape,
                              setup.plan, layers, cache);
    std::ranges::copy(first.values(), got.data());
    for (std::int64_t t = setup.prefill; t < setup.total; ++t) {
      const af::Tensor step = af::cross_layer_stack(x.matrix().rows_slice(t, 1), std::span(positions).subspan(t, 1),
                                                    shape, setup.plan, layers, cache);
      std::ranges::copy(step.values(), got.data() + t * 32);
    }
    const Matrix64 want = stack64(x, shape, setup.plan, layers);
    const double error = reference::max_abs_diff(got.matrix(), want);
    INFO("plan of " << setup.plan.layers() << " layers, G = " << setup.kv_heads << ", W = " << setup.window);
    CHECK(error <= 1e-5 * std::max(1.0, max_abs(want)));  // NaN fails the comparison

    // The caches hold what the accounting says, in float32: owners only, sliding ones capped at W.
    const af::CrossLayerModel model{"test", "", setup.plan, 4, setup.kv_heads, 8, setup.window, af::DType::f32};
    CHECK(cache.bytes_held() == model.bytes_stored(setup.total));
    CHECK(cache.caches() == setup.plan.owners());
  }
}

TEST_CASE("The stack refuses weights that disagree with the plan", "[cross_layer][cpu]") {
  const af::Gemma3nShape shape{af::GroupedShape{16, 2, 1, 8}, 4, 1e4, 1e6, 1e-6};
  const af::KvSharingPlan plan = af::gemma3n_kv_sharing({S, S}, 1);
  af::Rng rng(3);
  auto layers = random_stack(rng, shape, af::no_kv_sharing({S, S}));
  af::CrossLayerKvCache cache(plan, 1, 8, 4, 16);
  const af::Tensor x = af::random_normal(af::Shape{2, 16}, rng);
  const std::vector<std::int64_t> positions{0, 1};
  CHECK_THAT(af_test::error_of([&] { af::cross_layer_stack(x.matrix(), positions, shape, plan, layers, cache); }),
             Catch::Contains("layer 1 has K/V projections (the plan says it reads another layer's cache)"));
  layers[1].v_proj = {};
  CHECK_THAT(af_test::error_of([&] { layers[1].validate(shape); }),
             Catch::Contains("k_proj present, v_proj absent, k_norm present"));
  af::CrossLayerKvCache small(af::no_kv_sharing({F}), 1, 8, 4, 2);
  const af::Tensor three = af::random_normal(af::Shape{3, 8}, rng);
  CHECK_THAT(af_test::error_of([&] { small.append(0, three.matrix(), three.matrix()); }),
             Catch::Contains("0 + 3 tokens in full layer 0 (expected at most the capacity 2)"));
  CHECK_THAT(af_test::error_of([&] { cache.append(1, three.matrix(), three.matrix()); }),
             Catch::Contains("layer 1 reads layer 0's cache"));
}
