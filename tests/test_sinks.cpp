#include "af/error.hpp"
#include "af/linalg.hpp"
#include "af/random.hpp"
#include "af/sinks.hpp"

#include <catch2/catch.hpp>

#include <algorithm>
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

using Rows = std::vector<std::vector<double>>;

// float64 grouped attention of row i of q over rows `seen(i)` of k, v, with an optional extra softmax column
// per head (the learned sink logit, dropped after the softmax); then the output projection in float64.
template <class Sees>
Rows reference(const af::Tensor& q, const af::Tensor& k, const af::Tensor& v, const Layer& layer,
               const std::vector<float>& sink_logits, Sees sees) {
  const af::GroupedShape& s = layer.shape;
  const std::int64_t n = q.dim(0), d = s.head_dim, keys = k.dim(0);
  Rows out(static_cast<std::size_t>(n), std::vector<double>(static_cast<std::size_t>(s.hidden), 0.0));
  for (std::int64_t i = 0; i < n; ++i) {
    std::vector<double> context(static_cast<std::size_t>(s.heads * d), 0.0);
    for (std::int64_t h = 0; h < s.heads; ++h) {
      const std::int64_t g = s.kv_head_of(h);
      std::vector<double> w(static_cast<std::size_t>(keys), -std::numeric_limits<double>::infinity());
      double top = sink_logits.empty() ? -std::numeric_limits<double>::infinity() : sink_logits[h];
      for (std::int64_t j = 0; j < keys; ++j) {
        if (!sees(i, j)) continue;
        double dot = 0.0;
        for (std::int64_t c = 0; c < d; ++c)
          dot += double{q.data()[i * s.heads * d + h * d + c]} * k.data()[j * s.kv_heads * d + g * d + c];
        w[static_cast<std::size_t>(j)] = dot / std::sqrt(static_cast<double>(d));
        top = std::max(top, w[static_cast<std::size_t>(j)]);
      }
      double sum = sink_logits.empty() ? 0.0 : std::exp(sink_logits[h] - top);  // the extra column
      for (double& x : w) sum += (x = std::exp(x - top));
      for (std::int64_t j = 0; j < keys; ++j)
        for (std::int64_t c = 0; c < d; ++c)
          context[static_cast<std::size_t>(h * d + c)] +=
              w[static_cast<std::size_t>(j)] / sum * v.data()[j * s.kv_heads * d + g * d + c];
    }
    for (std::int64_t o = 0; o < s.hidden; ++o)
      for (std::int64_t c = 0; c < s.heads * d; ++c)
        out[static_cast<std::size_t>(i)][static_cast<std::size_t>(o)] +=
            context[static_cast<std::size_t>(c)] * layer.weights.o_proj.data()[o * s.heads * d + c];
  }
  return out;
}

double max_error(const af::Tensor& got, const Rows& want) {
  double worst = 0.0;
  for (std::int64_t i = 0; i < got.dim(0); ++i)
    for (std::int64_t o = 0; o < got.dim(1); ++o)
      worst = af::worse(worst, std::abs(got.data()[i * got.dim(1) + o] - want[static_cast<std::size_t>(i)][o]));
  return worst;
}

std::vector<std::int64_t> iota(std::int64_t first, std::int64_t n) {
  std::vector<std::int64_t> v;
  for (std::int64_t i = 0; i < n; ++i) v.push_back(first + i);
  return v;
}

// Feeds x through the layer in random chunks (decode steps among them) and returns all outputs.
af::Tensor run_chunks(const af::Tensor& x, const Layer& layer, const af::Rope& rope,
                      const std::vector<float>& sink_logits, af::SinkKvCache& cache, af::Rng& rng) {
  const std::int64_t n = x.dim(0);
  af::Tensor out(af::Shape{n, layer.shape.hidden});
  for (std::int64_t t = 0; t < n;) {
    const std::int64_t chunk = std::min(n - t, rng.below(3) == 0 ? 1 + rng.below(7) : 1);
    const std::vector<std::int64_t> pos = iota(t, chunk);
    const af::Tensor y = af::sink_attention(x.matrix().rows_slice(t, chunk), pos, layer.shape, layer.weights, rope,
                                            af::AttentionOptions{}, sink_logits, cache);
    std::copy(y.data(), y.data() + y.numel(), out.data() + t * layer.shape.hidden);
    t += chunk;
  }
  return out;
}

}  // namespace

TEST_CASE("the sink + window mask keeps the first S tokens and the last W", "[sinks]") {
  const af::Mask mask = af::sink_window_mask(10, 10, 0, 2, 3);
  for (std::int64_t i = 0; i < 10; ++i)
    for (std::int64_t j = 0; j < 10; ++j) CHECK(mask.allows(i, j) == (j <= i && (j < 2 || i - j < 3)));
  CHECK_THROWS_AS(af::sink_window_mask(4, 4, 0, -1, 3), af::Error);
  CHECK_THROWS_AS(af::sink_window_mask(4, 4, 0, 1, 0), af::Error);
}

TEST_CASE("softmax with a learned sink equals float64 with an extra column, dropped", "[sinks]") {
  af::Rng rng(901);
  for (int trial = 0; trial < 50; ++trial) {
    const auto n = static_cast<std::size_t>(1 + rng.below(20));
    std::vector<float> scores(n);
    for (float& s : scores) s = static_cast<float>(3.0 * rng.normal());
    const auto sink = static_cast<float>(3.0 * rng.normal());
    double top = sink, sum = 0.0;
    for (const float s : scores) top = std::max(top, double{s});
    std::vector<double> want(n);
    for (std::size_t j = 0; j < n; ++j) sum += (want[j] = std::exp(scores[j] - top));
    const double sink_term = std::exp(sink - top);
    sum += sink_term;
    std::vector<float> got = scores;
    const double p_sink = af::softmax_with_sink(got, sink);
    CHECK(std::abs(p_sink - sink_term / sum) < 1e-6);
    double total = p_sink;
    for (std::size_t j = 0; j < n; ++j) {
      CHECK(std::abs(got[j] - want[j] / sum) < 1e-6);  // float32 rounding of probabilities <= 1
      total += got[j];
    }
    CHECK(std::abs(total - 1.0) < 1e-5);
  }
  std::vector<float> masked{-std::numeric_limits<float>::infinity()};
  CHECK(af::softmax_with_sink(masked, 0.5f) == 1.0);  // all mass on the sink, no value: the output is 0
  CHECK(masked[0] == 0.0f);
  CHECK_THROWS_AS(af::softmax_with_sink(masked, std::numeric_limits<float>::infinity()), af::Error);
}

TEST_CASE("a sink + window cache equals full attention under the sink + window mask", "[sinks]") {
  af::Rng rng(902);
  for (int trial = 0; trial < 24; ++trial) {
    const std::int64_t kv_heads = 1 + rng.below(2), heads = kv_heads * (1 + rng.below(3)), d = 2 * (1 + rng.below(4));
    const Layer layer = random_layer(rng, heads, kv_heads, d);
    const std::int64_t sinks = rng.below(4), window = 1 + rng.below(6);
    const bool dense = trial % 6 == 5;  // a dense layer: a window as long as the stream
    const std::int64_t n = sinks + window + 1 + rng.below(4 * (window + 1));  // the ring wraps several times
    std::vector<float> logits;
    if (trial % 2 == 1)
      for (std::int64_t h = 0; h < heads; ++h) logits.push_back(static_cast<float>(rng.normal()));
    const af::Rope rope(d, 10000.0, af::RopeLayout::half_split);
    const af::Tensor x = af::random_normal(af::Shape{n, layer.shape.hidden}, rng);
    af::SinkKvCache cache(dense ? 0 : sinks, dense ? n : window, kv_heads, d);
    const af::Tensor got = run_chunks(x, layer, rope, logits, cache, rng);
    CHECK(cache.size() == std::min(n, cache.sinks() + cache.window()));
    CHECK(cache.bytes_held() <= 2 * (cache.sinks() + cache.window()) * kv_heads * d * 4);
    af::Tensor q = af::linear(x.matrix(), layer.weights.q_proj.matrix());
    af::Tensor k = af::linear(x.matrix(), layer.weights.k_proj.matrix());
    const af::Tensor v = af::linear(x.matrix(), layer.weights.v_proj.matrix());
    const std::vector<std::int64_t> pos = iota(0, n);
    rope.rotate_rows(q.matrix(), pos);
    rope.rotate_rows(k.matrix(), pos);
    const std::int64_t s = cache.sinks(), w = cache.window();
    const Rows want = reference(q, k, v, layer, logits,
                                [&](std::int64_t i, std::int64_t j) { return af::in_sink_window(i, j, s, w); });
    INFO("trial " << trial << ": S " << s << ", W " << w << ", n " << n << ", logits " << logits.size());
    CHECK(max_error(got, want) < 1e-4);  // float32 through two projections of width <= 48
  }
}

TEST_CASE("sink attention: a prefill equals the same tokens decoded one by one", "[sinks]") {
  af::Rng rng(903);
  const Layer layer = random_layer(rng, 4, 2, 8);
  const af::Rope rope(8, 10000.0, af::RopeLayout::half_split);
  const af::Tensor x = af::random_normal(af::Shape{7, layer.shape.hidden}, rng);
  std::vector<float> logits{0.3f, -1.2f, 2.0f, 0.1f};
  // The prefill fits the cache (a chunk longer than the cache sees keys it then evicts: also fine).
  af::SinkKvCache whole(2, 5, 2, 8), steps(2, 5, 2, 8);
  const af::Tensor a = af::sink_attention(x.matrix(), iota(0, 7), layer.shape, layer.weights, rope,
                                          af::AttentionOptions{}, logits, whole);
  for (std::int64_t t = 0; t < 7; ++t) {
    const std::vector<std::int64_t> pos{t};
    const af::Tensor b = af::sink_attention(x.matrix().rows_slice(t, 1), pos, layer.shape, layer.weights, rope,
                                            af::AttentionOptions{}, logits, steps);
    for (std::int64_t o = 0; o < layer.shape.hidden; ++o)
      CHECK(std::abs(a.data()[t * layer.shape.hidden + o] - b.data()[o]) < 1e-5);
  }
  CHECK(whole.row_indices() == steps.row_indices());
}

TEST_CASE("positions by cache slot equal rotating the kept keys at their slot positions", "[sinks]") {
  af::Rng rng(904);
  for (int trial = 0; trial < 8; ++trial) {
    const std::int64_t sinks = rng.below(3), window = 1 + rng.below(5), n = sinks + window + 3 + rng.below(10);
    const Layer layer = random_layer(rng, 4, 2, 4);
    const af::Rope rope(4, 100.0, af::RopeLayout::half_split);
    const af::Tensor x = af::random_normal(af::Shape{n, layer.shape.hidden}, rng);
    af::SinkKvCache cache(sinks, window, 2, 4);
    const af::Tensor got =
        af::sink_attention_slot_positions(x.matrix(), layer.shape, layer.weights, rope, af::AttentionOptions{}, cache);
    const af::Tensor q = af::linear(x.matrix(), layer.weights.q_proj.matrix());
    const af::Tensor k = af::linear(x.matrix(), layer.weights.k_proj.matrix());
    const af::Tensor v = af::linear(x.matrix(), layer.weights.v_proj.matrix());
    for (std::int64_t t = 0; t < n; ++t) {
      // The kept tokens in sequence order, each rotated at its rank; the query at the last rank.
      std::vector<std::int64_t> kept;
      for (std::int64_t j = 0; j <= t; ++j)
        if (af::in_sink_window(t, j, sinks, window)) kept.push_back(j);
      af::Tensor kk(af::Shape{static_cast<std::int64_t>(kept.size()), 8}), vv = kk;
      for (std::size_t r = 0; r < kept.size(); ++r) {
        std::copy_n(k.data() + kept[r] * 8, 8, kk.data() + static_cast<std::int64_t>(r) * 8);
        std::copy_n(v.data() + kept[r] * 8, 8, vv.data() + static_cast<std::int64_t>(r) * 8);
      }
      af::Tensor qq(af::Shape{1, 16});
      std::copy_n(q.data() + t * 16, 16, qq.data());
      rope.rotate_rows(kk.matrix(), iota(0, static_cast<std::int64_t>(kept.size())));
      const std::vector<std::int64_t> last{static_cast<std::int64_t>(kept.size()) - 1};
      rope.rotate_rows(qq.matrix(), last);
      const Rows want = reference(qq, kk, vv, layer, {}, [](std::int64_t, std::int64_t) { return true; });
      double worst = 0.0;
      for (std::int64_t o = 0; o < 16; ++o) worst = af::worse(worst, std::abs(got.data()[t * 16 + o] - want[0][o]));
      INFO("trial " << trial << ", step " << t);
      CHECK(worst < 1e-4);
    }
  }
}

TEST_CASE("sink attention rejects bad arguments", "[sinks]") {
  af::Rng rng(905);
  const Layer layer = random_layer(rng, 4, 2, 4);
  const af::Rope rope(4, 10000.0, af::RopeLayout::half_split);
  const af::Tensor x = af::random_normal(af::Shape{3, 16}, rng);
  CHECK_THROWS_AS(af::SinkKvCache(-1, 4, 2, 4), af::Error);
  CHECK_THROWS_AS(af::SinkKvCache(1, 0, 2, 4), af::Error);
  af::SinkKvCache wrong(1, 4, 1, 4), cache(1, 4, 2, 4);
  const std::vector<float> three{0.f, 1.f, 2.f};
  CHECK_THROWS_AS(af::sink_attention(x.matrix(), iota(0, 3), layer.shape, layer.weights, rope, {}, {}, wrong),
                  af::Error);
  CHECK_THROWS_AS(af::sink_attention(x.matrix(), iota(0, 3), layer.shape, layer.weights, rope, {}, three, cache),
                  af::Error);
  CHECK_THROWS_AS(af::sink_attention(x.matrix(), iota(0, 2), layer.shape, layer.weights, rope, {}, {}, cache),
                  af::Error);
  CHECK_THROWS_AS(cache.index_in_row(0), af::Error);
}

TEST_CASE("The kept-sinks card stores and reads what af::SinkKvCache holds", "[sinks][accounting]") {
  const std::int64_t G = 2, d = 8, S = 3, W = 5;
  const af::CacheCard dense = af::dense_kv_card("GQA", 4, G, d, af::DType::f32);
  const af::CacheCard card = af::with_kept_sinks(dense, S, W);
  af::SinkKvCache cache(S, W, G, d);
  af::Rng rng(909);
  for (std::int64_t t = 1; t <= 20; ++t) {
    const af::Tensor kv = af::random_normal(af::Shape{1, G * d}, rng);
    cache.append(kv.matrix(), kv.matrix());
    CHECK(card.stored_tokens(t) == cache.size());
    CHECK(card.bytes_stored(t) == cache.bytes_held());
    const auto reads = card.decode_reads(t);
    REQUIRE(reads.size() == 1);
    CHECK(reads[0].entries == cache.size());
    CHECK(card.bytes_read(t) == dense.bytes_read(std::min(t, S + W)));
  }
  CHECK(card.trade_offs.find("nothing is recomputed") == std::string::npos);  // not the dense card's words
  CHECK_THROWS_AS(af::with_kept_sinks(dense, -1, W), af::Error);
  CHECK_THROWS_AS(af::with_kept_sinks(dense, S, 0), af::Error);
}
