#include "af/error.hpp"
#include "af/linalg.hpp"
#include "af/linear_attention.hpp"
#include "af/random.hpp"

#include "reference.hpp"

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

namespace {

using reference::Matrix64;

// float64 decayed linear attention from the definition: o_i = sum_{j <= i} exp(-s (i - j)) (q_i . k_j) v_j,
// with an initial state S0 [d_k, d_v] read as exp(-s (i + 1)) q_i S0.
Matrix64 linear64(const Matrix64& q, const Matrix64& k, const Matrix64& v, double slope, const Matrix64& s0 = {}) {
  Matrix64 out(q.size(), std::vector<double>(v[0].size(), 0.0));
  for (std::size_t i = 0; i < q.size(); ++i) {
    for (std::size_t j = 0; j <= i; ++j) {
      double w = 0.0;
      for (std::size_t c = 0; c < q[i].size(); ++c) w += q[i][c] * k[j][c];
      w *= std::exp(-slope * static_cast<double>(i - j));
      for (std::size_t c = 0; c < v[j].size(); ++c) out[i][c] += w * v[j][c];
    }
    if (!s0.empty())
      for (std::size_t a = 0; a < q[i].size(); ++a)
        for (std::size_t c = 0; c < v[0].size(); ++c)
          out[i][c] += std::exp(-slope * static_cast<double>(i + 1)) * q[i][a] * s0[a][c];
  }
  return out;
}

// float64 state after the tokens: sum_j exp(-s (T - 1 - j)) k_j^T v_j.
Matrix64 state64(const Matrix64& k, const Matrix64& v, double slope) {
  Matrix64 s(k[0].size(), std::vector<double>(v[0].size(), 0.0));
  const std::size_t n = k.size();
  for (std::size_t j = 0; j < n; ++j)
    for (std::size_t a = 0; a < k[j].size(); ++a)
      for (std::size_t c = 0; c < v[j].size(); ++c)
        s[a][c] += std::exp(-slope * static_cast<double>(n - 1 - j)) * k[j][a] * v[j][c];
  return s;
}

double scale_of(const Matrix64& m) {
  double top = 1.0;
  for (const auto& row : m)
    for (const double x : row) top = af::worse(top, std::abs(x));
  return top;
}

struct Layer {
  af::LightningShape shape;
  af::LightningWeights weights;
};

Layer random_layer(af::Rng& rng, std::int64_t hidden, std::int64_t heads, std::int64_t head_dim, std::int64_t block) {
  const std::int64_t hd = heads * head_dim;
  const double in = 1.0 / std::sqrt(static_cast<double>(hidden));
  Layer layer{af::LightningShape{hidden, heads, head_dim, block},
              af::LightningWeights{af::random_normal(af::Shape{3 * hd, hidden}, rng, in),
                                   af::random_normal(af::Shape{hd, hidden}, rng, in),
                                   af::random_uniform(af::Shape{hd}, rng, 0.5, 1.5),
                                   af::random_normal(af::Shape{hidden, hd}, rng, 1.0 / std::sqrt(double(hd))), 1e-6}};
  return layer;
}

// float64 lightning layer over all of x at once, written from the formulas.
Matrix64 lightning64(const af::Tensor& x, const Layer& layer, const std::vector<double>& slopes) {
  const auto& s = layer.shape;
  const std::int64_t d = s.head_dim, hd = s.heads * d;
  const Matrix64 x64 = reference::to64(x.matrix());
  const Matrix64 qkv = reference::linear(x64, reference::to64(layer.weights.qkv_proj.matrix()));
  const auto silu = [](double z) { return z / (1.0 + std::exp(-z)); };
  const std::size_t T = x64.size();
  Matrix64 heads(T, std::vector<double>(static_cast<std::size_t>(hd), 0.0));
  for (std::int64_t h = 0; h < s.heads; ++h) {
    Matrix64 q(T), k(T), v(T);
    for (std::size_t t = 0; t < T; ++t)
      for (std::int64_t c = 0; c < d; ++c) {
        q[t].push_back(silu(qkv[t][h * 3 * d + c]));
        k[t].push_back(silu(qkv[t][h * 3 * d + d + c]));
        v[t].push_back(silu(qkv[t][h * 3 * d + 2 * d + c]));
      }
    const Matrix64 o = linear64(q, k, v, slopes[static_cast<std::size_t>(h)]);
    for (std::size_t t = 0; t < T; ++t)
      for (std::int64_t c = 0; c < d; ++c) heads[t][h * d + c] = o[t][c];
  }
  const Matrix64 gate = reference::linear(x64, reference::to64(layer.weights.output_gate.matrix()));
  for (std::size_t t = 0; t < T; ++t) {
    double ms = 0.0;
    for (const double y : heads[t]) ms += y * y;
    ms /= static_cast<double>(hd);
    for (std::int64_t c = 0; c < hd; ++c)
      heads[t][c] = heads[t][c] / std::sqrt(ms + layer.weights.norm_eps) * layer.weights.norm.data()[c] /
                    (1.0 + std::exp(-gate[t][c]));
  }
  return reference::linear(heads, reference::to64(layer.weights.out_proj.matrix()));
}

}  // namespace

TEST_CASE("decayed linear attention: quadratic, recurrent and blocked forms equal the float64 definition", "[linear]") {
  af::Rng rng(1301);
  for (const std::int64_t T : {1, 7, 16, 37, 100}) {
    for (const double slope : {0.0, 0.02, 0.9}) {
      for (const std::int64_t block : {1, 4, 16, 256}) {
        const af::Tensor q = af::random_normal(af::Shape{T, 8}, rng), k = af::random_normal(af::Shape{T, 8}, rng),
                         v = af::random_normal(af::Shape{T, 6}, rng);
        const Matrix64 want =
            linear64(reference::to64(q.matrix()), reference::to64(k.matrix()), reference::to64(v.matrix()), slope);
        const double tol = 1e-5 * scale_of(want);
        af::Tensor s_rec(af::Shape{8, 6}), s_blk(af::Shape{8, 6}), s_acc(af::Shape{8, 6});
        const af::Tensor quad = af::linear_attention_quadratic(q.matrix(), k.matrix(), v.matrix(), slope);
        const af::Tensor rec =
            af::linear_attention_recurrent(q.matrix(), k.matrix(), v.matrix(), slope, s_rec.matrix());
        const af::Tensor blk =
            af::linear_attention_blocked(q.matrix(), k.matrix(), v.matrix(), slope, block, s_blk.matrix());
        af::accumulate_linear_state(k.matrix(), v.matrix(), slope, s_acc.matrix());
        INFO("T = " << T << ", slope = " << slope << ", block = " << block);
        CHECK(reference::max_abs_diff(quad.matrix(), want) <= tol);
        CHECK(reference::max_abs_diff(rec.matrix(), want) <= tol);
        CHECK(reference::max_abs_diff(blk.matrix(), want) <= tol);
        const Matrix64 state = state64(reference::to64(k.matrix()), reference::to64(v.matrix()), slope);
        const double stol = 1e-5 * scale_of(state);
        CHECK(reference::max_abs_diff(s_rec.matrix(), state) <= stol);
        CHECK(reference::max_abs_diff(s_blk.matrix(), state) <= stol);
        CHECK(reference::max_abs_diff(s_acc.matrix(), state) <= stol);
      }
    }
  }
}

TEST_CASE("without decay, the causal masked form is Q (K^T V) prefix by prefix (the reassociation)", "[linear]") {
  af::Rng rng(1302);
  const std::int64_t T = 12;
  const af::Tensor q = af::random_normal(af::Shape{T, 5}, rng), k = af::random_normal(af::Shape{T, 5}, rng),
                   v = af::random_normal(af::Shape{T, 3}, rng);
  const af::Tensor quad = af::linear_attention_quadratic(q.matrix(), k.matrix(), v.matrix(), 0.0);
  for (std::int64_t i = 0; i < T; ++i) {
    // K^T V over the first i + 1 tokens, then one query against it.
    const af::Tensor kv =
        af::matmul(af::transpose(k.matrix().rows_slice(0, i + 1)).matrix(), v.matrix().rows_slice(0, i + 1));
    const af::Tensor o = af::matmul(q.matrix().rows_slice(i, 1), kv.matrix());
    CHECK(af::max_abs_diff(o.matrix(), quad.matrix().rows_slice(i, 1)) <=
          af::scaled_tolerance(1e-5, af::max_abs(o.values())));
  }
}

TEST_CASE("the blocked form continues from a carried state exactly as the definition with an initial state",
          "[linear]") {
  af::Rng rng(1303);
  const af::Tensor q = af::random_normal(af::Shape{23, 4}, rng), k = af::random_normal(af::Shape{23, 4}, rng),
                   v = af::random_normal(af::Shape{23, 4}, rng);
  af::Tensor s0 = af::random_normal(af::Shape{4, 4}, rng);
  const Matrix64 s0_64 = reference::to64(s0.matrix());
  const Matrix64 want =
      linear64(reference::to64(q.matrix()), reference::to64(k.matrix()), reference::to64(v.matrix()), 0.3, s0_64);
  af::Tensor s_rec = s0;
  const af::Tensor blk = af::linear_attention_blocked(q.matrix(), k.matrix(), v.matrix(), 0.3, 5, s0.matrix());
  const af::Tensor rec = af::linear_attention_recurrent(q.matrix(), k.matrix(), v.matrix(), 0.3, s_rec.matrix());
  CHECK(reference::max_abs_diff(blk.matrix(), want) <= 1e-5 * scale_of(want));
  CHECK(reference::max_abs_diff(rec.matrix(), want) <= 1e-5 * scale_of(want));
  CHECK(af::max_abs_diff(s0.values(), s_rec.values()) <= af::scaled_tolerance(1e-5, af::max_abs(s_rec.values())));
}

TEST_CASE("MiniMax's lightning slopes: 2^(-8(h+1)/H) times the layer factor", "[linear]") {
  const std::vector<double> first = af::lightning_slopes(64, 0, 80);
  REQUIRE(first.size() == 64);
  CHECK(first[0] == Approx(std::pow(2.0, -1.0 / 8.0) * (1.0 + 1e-5)).epsilon(1e-12));
  CHECK(first[63] == Approx(1.0 / 256.0 * (1.0 + 1e-5)).epsilon(1e-12));
  const std::vector<double> last = af::lightning_slopes(64, 79, 80);
  const double factor = 1.0 - 79.0 / (79.0 + 1e-5) + 1e-5;
  CHECK(last[0] == Approx(std::pow(2.0, -1.0 / 8.0) * factor).epsilon(1e-9));
  CHECK(factor < 2e-5);  // the deepest layer barely decays
  const std::vector<double> four = af::lightning_slopes(4, 2, 4);
  for (std::size_t h = 0; h < 4; ++h)
    CHECK(four[h] == Approx(std::pow(0.25, static_cast<double>(h + 1)) * (1.0 - 2.0 / (3.0 + 1e-5) + 1e-5)));
  CHECK_THROWS_AS(af::lightning_slopes(0, 0, 4), af::Error);
  CHECK_THROWS_AS(af::lightning_slopes(4, 4, 4), af::Error);
}

TEST_CASE("the lightning layer equals a float64 recomputation, in every form", "[linear]") {
  af::Rng rng(1304);
  const Layer layer = random_layer(rng, 24, 3, 8, 5);
  const std::vector<double> slopes = af::lightning_slopes(3, 1, 4);
  const af::Tensor x = af::random_normal(af::Shape{17, 24}, rng);
  const Matrix64 want = lightning64(x, layer, slopes);
  for (const af::LinearForm form : {af::LinearForm::blocked, af::LinearForm::recurrent, af::LinearForm::quadratic}) {
    af::LinearState state(3, 8, 8);
    const af::Tensor got = af::lightning_attention(x.matrix(), layer.shape, layer.weights, slopes, state, form);
    CHECK(reference::max_abs_diff(got.matrix(), want) <= 1e-5 * scale_of(want));
    CHECK(state.tokens() == 17);
  }
}

TEST_CASE("lightning decode through the state equals the prefill of all tokens", "[linear]") {
  af::Rng rng(1305);
  const Layer layer = random_layer(rng, 16, 2, 8, 4);
  const std::vector<double> slopes = af::lightning_slopes(2, 0, 3);
  const std::int64_t T = 10, N = 7;  // the prefill ends inside a block; decode crosses two block boundaries
  const af::Tensor x = af::random_normal(af::Shape{T + N, 16}, rng);
  af::LinearState whole(2, 8, 8);
  const af::Tensor all = af::lightning_attention(x.matrix(), layer.shape, layer.weights, slopes, whole);
  af::LinearState state(2, 8, 8);
  const af::Tensor prefill =
      af::lightning_attention(x.matrix().rows_slice(0, T), layer.shape, layer.weights, slopes, state);
  CHECK(af::max_abs_diff(prefill.matrix(), all.matrix().rows_slice(0, T)) <=
        af::scaled_tolerance(1e-5, af::max_abs(all.values())));
  const std::int64_t bytes = state.bytes(af::DType::f32);
  for (std::int64_t i = 0; i < N; ++i) {
    const af::Tensor step = af::lightning_attention(x.matrix().rows_slice(T + i, 1), layer.shape, layer.weights, slopes,
                                                    state, af::LinearForm::recurrent);
    CHECK(af::max_abs_diff(step.matrix(), all.matrix().rows_slice(T + i, 1)) <=
          af::scaled_tolerance(1e-5, af::max_abs(all.values())));
    CHECK(state.bytes(af::DType::f32) == bytes);  // the state does not grow
  }
  CHECK(af::max_abs_diff(state.values().values(), whole.values().values()) <=
        af::scaled_tolerance(1e-5, af::max_abs(whole.values().values())));
  CHECK(bytes == 2 * 8 * 8 * 4);
}

TEST_CASE("lightning attention rejects bad shapes and a quadratic chunk after a state", "[linear]") {
  af::Rng rng(1306);
  const Layer layer = random_layer(rng, 16, 2, 8, 4);
  const std::vector<double> slopes = af::lightning_slopes(2, 0, 3);
  const af::Tensor x = af::random_normal(af::Shape{3, 16}, rng);
  af::LinearState state(2, 8, 8);
  CHECK_THROWS_AS(af::lightning_attention(x.matrix(), layer.shape, layer.weights, std::span(slopes).first(1), state),
                  af::Error);
  af::LinearState wrong(2, 8, 4);
  CHECK_THROWS_AS(af::lightning_attention(x.matrix(), layer.shape, layer.weights, slopes, wrong), af::Error);
  af::LightningWeights bad = layer.weights;
  bad.qkv_proj = af::Tensor(af::Shape{47, 16});
  CHECK_THROWS_WITH(af::lightning_attention(x.matrix(), layer.shape, bad, slopes, state),
                    Catch::Contains("qkv_proj") && Catch::Contains("[48, 16]"));
  (void)af::lightning_attention(x.matrix(), layer.shape, layer.weights, slopes, state);
  CHECK_THROWS_AS(
      af::lightning_attention(x.matrix(), layer.shape, layer.weights, slopes, state, af::LinearForm::quadratic),
      af::Error);
  af::Tensor s(af::Shape{3, 3});
  CHECK_THROWS_AS(af::linear_attention_blocked(x.matrix(), x.matrix(), x.matrix(), 0.1, 0, s.matrix()), af::Error);
  CHECK_THROWS_AS(af::linear_attention_recurrent(x.matrix(), x.matrix(), x.matrix(), -1.0, s.matrix()), af::Error);
}

TEST_CASE("MiniMax-M1's memory: 40,960 KV bytes per token and a 140 MiB state in bf16", "[linear][accounting]") {
  const af::HybridModel m = af::minimax_m1();
  CHECK(m.softmax.layers + m.linear_layers == 80);
  CHECK(m.softmax.bytes_per_token() == 10 * 8 * 128 * 2 * 2);
  CHECK(m.state_bytes() == std::int64_t{70} * 64 * 128 * 128 * 2);
  CHECK(m.state_bytes() == 140 * 1024 * 1024);
  CHECK(m.bytes_stored(0) == 0);
  CHECK(m.bytes_stored(4096) == m.state_bytes() + std::int64_t{4096} * 40960);
  CHECK(m.bytes_stored(1 << 20) - m.bytes_stored((1 << 20) - 1) == 40960);
  CHECK(af::minimax_m1(af::DType::bf16, af::DType::f32).state_bytes() == 2 * m.state_bytes());
}

TEST_CASE("The delta-rule hybrids' memory: a state per value head and the convolution's last inputs",
          "[linear][accounting][delta]") {
  // Qwen3-Next: 12 full layers x 2 KV heads x 256 x (K and V) x 2 bytes per token; 36 Gated DeltaNet layers of
  // 32 value-head states of 128 x 128 and 3 inputs of 2 x 16 x 128 + 32 x 128 channels, in bf16.
  const af::HybridModel qwen = af::qwen3_next_80b_a3b();
  CHECK(qwen.softmax.layers + qwen.linear_layers == 48);
  CHECK(qwen.softmax.bytes_per_token() == 12 * 2 * 256 * 2 * 2);
  CHECK(qwen.layer_state_bytes() == (32 * 128 * 128 + 3 * (2 * 16 * 128 + 32 * 128)) * 2);
  CHECK(qwen.state_bytes() == 36 * qwen.layer_state_bytes());
  CHECK(qwen.linear_flops_per_token() == 36.0 * 32 * 7 * 128 * 128);
  // Kimi Linear: 7 MLA layers of a 512 latent and a 64-value key part; 20 KDA layers of 32 heads of 128 and 3
  // inputs of 3 x 32 x 128 channels.
  const af::HybridModel kimi = af::kimi_linear_48b_a3b();
  CHECK(kimi.softmax.layers + kimi.linear_layers == 27);
  CHECK(kimi.softmax.bytes_per_token() == 7 * (512 + 64) * 2);
  CHECK(kimi.state_bytes() == 20 * (32 * 128 * 128 + 3 * 3 * 32 * 128) * 2);
  CHECK(kimi.bytes_stored(4096) == kimi.state_bytes() + 4096 * 8064);
  // MiniMax-M1 has no convolution: its layer state is the states alone.
  CHECK(af::minimax_m1().layer_state_bytes() == 64 * 128 * 128 * 2);
  const std::vector<std::int64_t> contexts{4096};
  const std::string card = af::format_hybrid_card(qwen, {}, contexts);
  CHECK_THAT(card, Catch::Contains("S [32, 128, 128] + conv inputs [3, 8192]"));
  CHECK_THAT(card, Catch::Contains("Gated DeltaNet: 1097728 per layer per sequence x 36 layers"));
}

TEST_CASE("the hybrid card states the fixed state and the growing KV cache", "[linear][accounting]") {
  const af::HybridModel m = af::minimax_m1();
  const af::ModelCache llama = af::dense_model("Llama-3.1-70B").cache();
  const std::vector<std::int64_t> contexts{4096, 1048576};
  const std::string card = af::format_hybrid_card(m, std::span(&llama, 1), contexts);
  CHECK_THAT(card, Catch::Contains("S [64, 128, 128] bf16 (fixed)"));
  CHECK_THAT(card, Catch::Contains("= 140 MiB whatever the context"));
  CHECK_THAT(card, Catch::Contains("x 10 layers = 40960 per token"));
  CHECK_THAT(card, Catch::Contains("at t = 1048576: 40.14 GiB stored"));
  CHECK_THAT(card, Catch::Contains("Llama-3.1-70B (GQA (groups of 8)) at t = 1048576: 320 GiB stored"));
}
