#include "af/error.hpp"
#include "af/linalg.hpp"
#include "af/random.hpp"
#include "af/sliding_window.hpp"

#include <fmt/format.h>
#include <catch2/catch.hpp>

#include <cmath>
#include <limits>
#include <vector>

namespace {

struct Layer {
  af::GroupedShape shape;
  af::GroupedWeights weights;
};

Layer random_layer(af::Rng& rng, std::int64_t heads, std::int64_t kv_heads, std::int64_t head_dim) {
  const std::int64_t hidden = heads * head_dim, kvd = kv_heads * head_dim;
  const double in = 1.0 / std::sqrt(static_cast<double>(hidden));
  return {af::GroupedShape{hidden, heads, kv_heads, head_dim},
          af::GroupedWeights{af::random_normal(af::Shape{hidden, hidden}, rng, in),
                             af::random_normal(af::Shape{kvd, hidden}, rng, in),
                             af::random_normal(af::Shape{kvd, hidden}, rng, in),
                             af::random_normal(af::Shape{hidden, hidden}, rng, in),
                             {},
                             {},
                             {}}};
}

// float64 windowed GQA over the projected, rotated q, k and v of all tokens: row i sees j with 0 <= i - j < W.
std::vector<std::vector<double>> windowed_reference(const af::Tensor& q, const af::Tensor& k, const af::Tensor& v,
                                                    const af::GroupedShape& s, std::int64_t window) {
  const std::int64_t n = q.dim(0), d = s.head_dim;
  std::vector<std::vector<double>> out(static_cast<std::size_t>(n), std::vector<double>(s.heads * d, 0.0));
  for (std::int64_t i = 0; i < n; ++i)
    for (std::int64_t h = 0; h < s.heads; ++h) {
      const std::int64_t g = s.kv_head_of(h);
      std::vector<double> w(static_cast<std::size_t>(n), 0.0);
      double top = -std::numeric_limits<double>::infinity(), sum = 0.0;
      for (std::int64_t j = 0; j < n; ++j) {
        if (!(j <= i && i - j < window)) continue;
        double dot = 0.0;
        for (std::int64_t c = 0; c < d; ++c)
          dot += double{q.data()[i * s.heads * d + h * d + c]} * k.data()[j * s.kv_heads * d + g * d + c];
        w[static_cast<std::size_t>(j)] = dot / std::sqrt(static_cast<double>(d));
        top = std::max(top, w[static_cast<std::size_t>(j)]);
      }
      for (std::int64_t j = 0; j < n; ++j)
        if (j <= i && i - j < window)
          sum += (w[static_cast<std::size_t>(j)] = std::exp(w[static_cast<std::size_t>(j)] - top));
      for (std::int64_t j = 0; j < n; ++j)
        if (j <= i && i - j < window)
          for (std::int64_t c = 0; c < d; ++c)
            out[static_cast<std::size_t>(i)][static_cast<std::size_t>(h * d + c)] +=
                w[static_cast<std::size_t>(j)] / sum * v.data()[j * s.kv_heads * d + g * d + c];
    }
  return out;
}

}  // namespace

TEST_CASE("The window edge: a query sees itself and the W - 1 keys before it, 0 <= q - k < W", "[sliding_window]") {
  CHECK(af::in_window(10, 10, 3));
  CHECK(af::in_window(10, 8, 3));
  CHECK_FALSE(af::in_window(10, 7, 3));  // q - k = W: outside (Mistral in transformers, gpt-oss)
  CHECK_FALSE(af::in_window(10, 11, 3));
  const af::Mask mask = af::sliding_window_mask(6, 6, 0, 2);
  for (std::int64_t i = 0; i < 6; ++i)
    for (std::int64_t j = 0; j < 6; ++j) CHECK(mask.allows(i, j) == (j == i || j == i - 1));
}

TEST_CASE("The ring writes token t to slot t mod W and overwrites token t - W", "[sliding_window]") {
  af::RollingKvCache ring(4, 1, 2);
  for (std::int64_t t = 0; t < 11; ++t) {
    const af::Tensor row(af::Shape{1, 2}, {static_cast<float>(t) + 0.5f, -static_cast<float>(t) - 0.25f});
    ring.append(row.matrix(), row.matrix());
    CHECK(ring.size() == std::min<std::int64_t>(t + 1, 4));
    CHECK(ring.keys()(ring.slot_of(t), 0) == static_cast<float>(t) + 0.5f);
    for (std::int64_t s = 0; s < ring.size(); ++s) {
      const std::int64_t index = ring.index_in_slot(s);
      CHECK(index % 4 == s);
      CHECK(t - index < 4);
      CHECK(ring.keys()(s, 0) == static_cast<float>(index) + 0.5f);
    }
  }
}

TEST_CASE("Attention over the ring equals attention over the full cache with the window mask", "[sliding_window]") {
  af::Rng rng(801);
  for (int trial = 0; trial < 12; ++trial) {
    const std::int64_t kv_heads = 1 + rng.below(3), group = 1 + rng.below(3), d = 2 * (1 + rng.below(6));
    const std::int64_t window = 1 + rng.below(9);
    const std::int64_t steps = window * (3 + rng.below(5)) + rng.below(window);  // wraps several times
    const Layer layer = random_layer(rng, kv_heads * group, kv_heads, d);
    const af::Rope rope(d, 10000.0, af::RopeLayout::half_split);
    const af::Tensor x = af::random_normal(af::Shape{steps, layer.shape.hidden}, rng);
    std::vector<std::int64_t> positions;
    for (std::int64_t t = 0; t < steps; ++t) positions.push_back(100 + t);

    af::RollingKvCache ring(window, kv_heads, d);
    af::GroupedKvCache full(steps, kv_heads, d);
    double worst = 0.0, scale = 1.0;
    for (std::int64_t t = 0; t < steps; ++t) {
      const af::ConstMatrix token = x.matrix().rows_slice(t, 1);
      const auto position = std::span(positions).subspan(static_cast<std::size_t>(t), 1);
      const af::Tensor ringed =
          af::sliding_window_attention(token, position, layer.shape, layer.weights, rope, {}, ring);
      af::Tensor q = af::linear(token, layer.weights.q_proj.matrix()),
                 k = af::linear(token, layer.weights.k_proj.matrix());
      const af::Tensor v = af::linear(token, layer.weights.v_proj.matrix());
      rope.rotate_rows(q.matrix(), position);
      rope.rotate_rows(k.matrix(), position);
      full.append(k.matrix(), v.matrix());
      const af::Tensor context = af::windowed_attend_full_cache(q.matrix(), layer.shape, full, window, {});
      const af::Tensor windowed = af::linear(context.matrix(), layer.weights.o_proj.matrix());
      worst = af::worse(worst, af::max_abs_diff(ringed.values(), windowed.values()));
      scale = af::worse(scale, af::max_abs(windowed.values()));
      CHECK(ring.size() == std::min(t + 1, window));
    }
    INFO("trial " << trial << ": W " << window << ", " << steps << " steps, H " << kv_heads * group << ", G "
                  << kv_heads << ", d " << d);
    CHECK(worst <= 1e-6 * scale);
  }
}

TEST_CASE("Windowed prefill equals token-by-token decode through the ring, and both equal float64",
          "[sliding_window]") {
  af::Rng rng(802);
  for (int trial = 0; trial < 10; ++trial) {
    const std::int64_t kv_heads = 1 + rng.below(2), group = 1 + rng.below(4), d = 2 * (1 + rng.below(5));
    const std::int64_t window = 1 + rng.below(7), prefill = 1 + rng.below(3 * window),
                       steps = 1 + rng.below(3 * window);
    const std::int64_t n = prefill + steps;
    const Layer layer = random_layer(rng, kv_heads * group, kv_heads, d);
    const af::Rope rope(d, 500000.0, af::RopeLayout::half_split);
    const af::Tensor x = af::random_normal(af::Shape{n, layer.shape.hidden}, rng);
    std::vector<std::int64_t> positions;
    for (std::int64_t t = 0; t < n; ++t) positions.push_back(t);

    // One ring for a prefill of `prefill` tokens followed by decode steps; another for a single call over all.
    af::RollingKvCache chunked(window, kv_heads, d), whole(window, kv_heads, d);
    af::Tensor mixed(af::Shape{n, layer.shape.hidden});
    const af::Tensor first =
        af::sliding_window_attention(x.matrix().rows_slice(0, prefill), std::span(positions).first(prefill),
                                     layer.shape, layer.weights, rope, {}, chunked);
    std::ranges::copy(first.values(), mixed.data());
    for (std::int64_t t = prefill; t < n; ++t)
      std::ranges::copy(af::sliding_window_attention(x.matrix().rows_slice(t, 1),
                                                     std::span(positions).subspan(static_cast<std::size_t>(t), 1),
                                                     layer.shape, layer.weights, rope, {}, chunked)
                            .values(),
                        mixed.data() + t * layer.shape.hidden);
    const af::Tensor all =
        af::sliding_window_attention(x.matrix(), positions, layer.shape, layer.weights, rope, {}, whole);

    af::Tensor q = af::linear(x.matrix(), layer.weights.q_proj.matrix()),
               k = af::linear(x.matrix(), layer.weights.k_proj.matrix());
    const af::Tensor v = af::linear(x.matrix(), layer.weights.v_proj.matrix());
    rope.rotate_rows(q.matrix(), positions);
    rope.rotate_rows(k.matrix(), positions);
    const auto context64 = windowed_reference(q, k, v, layer.shape, window);
    double vs64 = 0.0, scale = 1.0;
    for (std::int64_t t = 0; t < n; ++t)
      for (std::int64_t o = 0; o < layer.shape.hidden; ++o) {
        double y = 0.0;
        for (std::int64_t c = 0; c < layer.shape.hidden; ++c)
          y += context64[static_cast<std::size_t>(t)][static_cast<std::size_t>(c)] *
               layer.weights.o_proj.data()[o * layer.shape.hidden + c];
        vs64 = af::worse(vs64, std::abs(all.data()[t * layer.shape.hidden + o] - y));
        scale = af::worse(scale, std::abs(y));
      }
    INFO("trial " << trial << ": W " << window << ", prefill " << prefill << ", decode " << steps);
    CHECK(af::max_abs_diff(mixed.values(), all.values()) <= 1e-5 * scale);
    CHECK(vs64 <= 1e-5 * scale);
    CHECK(chunked.size() == std::min(n, window));
    CHECK(whole.slot_indices() == chunked.slot_indices());
  }
}

TEST_CASE("The ring's bytes are bounded by W whatever the context", "[sliding_window]") {
  af::Rng rng(803);
  const std::int64_t window = 16, kv_heads = 2, d = 8;
  af::RollingKvCache ring(window, kv_heads, d);
  const std::int64_t cap = 2 * window * kv_heads * d * 4;
  for (std::int64_t t = 1; t <= 200; ++t) {
    const af::Tensor kv = af::random_normal(af::Shape{1, kv_heads * d}, rng);
    ring.append(kv.matrix(), kv.matrix());
    CHECK(ring.bytes_held() == 2 * std::min(t, window) * kv_heads * d * 4);
    CHECK(ring.bytes_held() <= cap);
  }
  // The accounting agrees: stored and read entries stop at W.
  const af::CacheCard card = af::with_sliding_window(af::dense_kv_card("GQA", 4, kv_heads, d, af::DType::f32), window);
  CHECK(card.stored_tokens(1000) == window);
  CHECK(card.decode_reads(1000).front().entries == window);
  CHECK(card.decode_reads(5).front().entries == 5);
  CHECK(card.trade_offs.find("grow linearly") == std::string::npos);  // the window's trade-offs, not dense's
  CHECK_THAT(card.trade_offs, Catch::Contains(fmt::format("stop growing at {} tokens", window)));
  const af::InterleavedModel gemma = af::gemma3_27b();
  CHECK(gemma.bytes_per_token_after_windows() == 10 * 16 * 128 * 2 * 2);  // 81,920 B: the global layers
  CHECK(gemma.bytes_stored(1024) == 62 * 8192 * 1024);
  CHECK(gemma.bytes_stored(4096) - gemma.bytes_stored(2048) == 2048 * 81920);
  CHECK(af::gpt_oss_120b().bytes_per_token_after_windows() == 36864);
}

TEST_CASE("Bad windows and shapes throw af::Error naming the value", "[sliding_window]") {
  CHECK_THROWS_AS(af::RollingKvCache(0, 1, 4), af::Error);
  CHECK_THROWS_WITH(af::RollingKvCache(-3, 1, 4), Catch::Contains("window -3"));
  CHECK_THROWS_AS(af::sliding_window_mask(2, 2, 0, 0), af::Error);
  CHECK_THROWS_AS(af::with_sliding_window(af::dense_kv_card("GQA", 4, 2, 8, af::DType::bf16), 0), af::Error);
  af::RollingKvCache ring(3, 2, 4);
  const af::Tensor wrong(af::Shape{1, 4}, {1.0f, 2.0f, 3.0f, 4.0f});
  CHECK_THROWS_WITH(ring.append(wrong.matrix(), wrong.matrix()), Catch::Contains("[1, 4]"));
  CHECK_THROWS_AS(ring.index_in_slot(0), af::Error);
  const af::GroupedShape shape{8, 2, 2, 4};
  const af::Tensor q(af::Shape{1, 8}, std::vector<float>(8, 0.5f)), kv(af::Shape{1, 8}, std::vector<float>(8, 0.25f));
  const std::vector<std::int64_t> index{0};
  CHECK_THROWS_WITH(af::windowed_grouped_attend(q.matrix(), index, kv.matrix(), kv.matrix(), index, shape, 0, {}),
                    Catch::Contains("window 0"));
  CHECK_THROWS_AS(af::windowed_grouped_attend(q.matrix(), index, kv.matrix(), kv.matrix(), index, shape, 2,
                                              af::AttentionOptions{false, {}}),
                  af::Error);
}
