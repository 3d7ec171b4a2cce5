// Chapter 13 — MiniMax: lightning (linear) attention, the hybrid stack, and the way back.
//
// Drops the softmax, reassociates (Q K^T) V as Q (K^T V), and computes causal decayed linear attention three
// ways: the quadratic masked form, the token-by-token recurrence through a d x d state, and the blocked form
// of lightning attention. Builds MiniMax-01's lightning layer (SiLU q/k/v, per-head decay slopes, RMSNorm over
// all heads, sigmoid output gate), checks everything against the library (af::linear_attention) and float64,
// decodes through the state, prints the hybrid stack's cache card, and measures associative recall against
// the number of key -> value pairs for softmax and linear attention; writes the data of the figures.
//
//   build/bin/ch13_minimax_lightning_attention [--seq-len 300] [--decode-steps 6] [--heads 4] [--head-dim 16]
//       [--block 64] [--layer 1] [--layers 8] [--recall-dim 64] [--max-pairs 1024] [--trials 3] [--seed 13]
//       [--out DIR]

#include "af/error.hpp"
#include "af/linalg.hpp"
#include "af/linear_attention.hpp"
#include "af/models.hpp"
#include "af/program.hpp"
#include "af/random.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <limits>
#include <string>
#include <vector>

namespace {

using af::ConstMatrix;
using af::Shape;
using af::Tensor;

// [masked-form]
// Causal attention without the softmax, with a decay lambda per step: o_i = sum_{j<=i} lambda^(i-j) (q_i.k_j) v_j.
// This is (Q K^T * D) V with the decay mask D: every query against every earlier key, O(T^2 d).
Tensor masked_form(ConstMatrix q, ConstMatrix k, ConstMatrix v, double lambda) {
  Tensor out(Shape{q.rows, v.cols});
  for (std::int64_t i = 0; i < q.rows; ++i)
    for (std::int64_t j = 0; j <= i; ++j) {
      const double w = std::pow(lambda, static_cast<double>(i - j)) * af::dot(q.row(i), k.row(j));
      af::axpy(static_cast<float>(w), v.row(j), out.matrix().row(i));
    }
  return out;
}
// [/masked-form]

// [recurrence]
// The same through the state S = sum_j lambda^(t-j) k_j^T v_j, a [d_k, d_v] matrix: S <- lambda S + k_t^T v_t,
// then o_t = q_t S. One token after another; the state never grows.
Tensor recurrence(ConstMatrix q, ConstMatrix k, ConstMatrix v, double lambda, Tensor& state) {
  Tensor out(Shape{q.rows, v.cols});
  for (std::int64_t t = 0; t < q.rows; ++t) {
    for (std::int64_t a = 0; a < k.cols; ++a) {
      const std::span<float> row = state.matrix().row(a);
      for (float& s : row) s *= static_cast<float>(lambda);
      af::axpy(k(t, a), v.row(t), row);
    }
    for (std::int64_t a = 0; a < k.cols; ++a) af::axpy(q(t, a), state.matrix().row(a), out.matrix().row(t));
  }
  return out;
}
// [/recurrence]

// [blocked]
// Lightning attention: blocks of B tokens. Inside a block, the masked form; the earlier blocks arrive through
// the carried state, decayed by i + 1 steps for the block's i-th query. Then the block is folded into the
// state: S <- lambda^n S + sum_j lambda^(n-1-j) k_j^T v_j. No running sum over the whole sequence is needed,
// and both halves are matrix products over whole blocks.
Tensor blocked(ConstMatrix q, ConstMatrix k, ConstMatrix v, double lambda, std::int64_t block, Tensor& state) {
  Tensor out(Shape{q.rows, v.cols});
  for (std::int64_t first = 0; first < q.rows; first += block) {
    const std::int64_t n = std::min(block, q.rows - first);
    const Tensor intra = masked_form(q.rows_slice(first, n), k.rows_slice(first, n), v.rows_slice(first, n), lambda);
    const Tensor inter = af::matmul(q.rows_slice(first, n), state.matrix());  // [n, d_v]
    for (std::int64_t i = 0; i < n; ++i)
      for (std::int64_t c = 0; c < v.cols; ++c)
        out.matrix()(first + i, c) =
            intra.matrix()(i, c) +
            static_cast<float>(std::pow(lambda, static_cast<double>(i + 1))) * inter.matrix()(i, c);
    for (std::int64_t a = 0; a < k.cols; ++a) {
      const std::span<float> row = state.matrix().row(a);
      for (float& s : row) s *= static_cast<float>(std::pow(lambda, static_cast<double>(n)));
      for (std::int64_t j = 0; j < n; ++j)
        af::axpy(static_cast<float>(std::pow(lambda, static_cast<double>(n - 1 - j))) * k(first + j, a),
                 v.row(first + j), row);
    }
  }
  return out;
}
// [/blocked]

// [slopes]
// MiniMax's decay rates: head h of H gets ALiBi's slope 2^(-8(h+1)/H); layer l of L scales it by
// 1 - l/(L-1) (plus 1e-5 guards): early layers forget fast, the deepest layers hardly at all.
std::vector<double> slopes_of(std::int64_t heads, std::int64_t layer, std::int64_t layers) {
  std::vector<double> s;
  const double factor = 1.0 - static_cast<double>(layer) / (static_cast<double>(layers - 1) + 1e-5) + 1e-5;
  for (std::int64_t h = 0; h < heads; ++h)
    s.push_back(std::pow(2.0, -8.0 * static_cast<double>(h + 1) / heads) * factor);
  return s;
}
// [/slopes]

struct Layer {
  std::int64_t hidden, heads, head_dim, block;
  Tensor qkv_proj, output_gate, norm, out_proj;  // [3Hd, hidden], [Hd, hidden], [Hd], [hidden, Hd]
};

float silu(float z) { return z / (1.0f + std::exp(-z)); }
float sigmoid(float z) { return 1.0f / (1.0f + std::exp(-z)); }

// [lightning-layer]
// MiniMax-01's lightning layer on the next tokens x [T, hidden], through the per-head states [H][d, d]. One
// projection gives, per head, [q | k | v], each through SiLU; no 1/sqrt(d), no softmax denominator. The heads'
// outputs are RMS-normalised together (over all H d values), gated by sigmoid(x W_gate^T), projected back.
// A fresh state takes the blocked prefill; a state that exists takes the recurrence, token by token.
Tensor lightning_layer(ConstMatrix x, const Layer& w, std::span<const double> slopes, std::vector<Tensor>& states,
                       bool fresh) {
  const std::int64_t d = w.head_dim, hd = w.heads * d, T = x.rows;
  const Tensor qkv = af::linear(x, w.qkv_proj.matrix());  // [T, H * 3d]
  Tensor heads(Shape{T, hd});
  for (std::int64_t h = 0; h < w.heads; ++h) {
    Tensor q(Shape{T, d}), k(Shape{T, d}), v(Shape{T, d});
    for (std::int64_t t = 0; t < T; ++t)
      for (std::int64_t c = 0; c < d; ++c) {
        q.matrix()(t, c) = silu(qkv.matrix()(t, h * 3 * d + c));
        k.matrix()(t, c) = silu(qkv.matrix()(t, h * 3 * d + d + c));
        v.matrix()(t, c) = silu(qkv.matrix()(t, h * 3 * d + 2 * d + c));
      }
    const double lambda = std::exp(-slopes[static_cast<std::size_t>(h)]);
    const Tensor o = fresh ? blocked(q.matrix(), k.matrix(), v.matrix(), lambda, w.block, states[h])
                           : recurrence(q.matrix(), k.matrix(), v.matrix(), lambda, states[h]);
    for (std::int64_t t = 0; t < T; ++t) std::ranges::copy(o.matrix().row(t), heads.matrix().row(t).begin() + h * d);
  }
  const Tensor gate = af::linear(x, w.output_gate.matrix());
  for (std::int64_t t = 0; t < T; ++t) {
    const std::span<float> row = heads.matrix().row(t);
    double mean_square = 0.0;
    for (const float y : row) mean_square += double{y} * y;
    const double inverse = 1.0 / std::sqrt(mean_square / static_cast<double>(hd) + 1e-6);
    for (std::int64_t c = 0; c < hd; ++c)
      row[c] = static_cast<float>(row[c] * inverse) * w.norm.data()[c] * sigmoid(gate.matrix()(t, c));
  }
  return af::linear(heads.matrix(), w.out_proj.matrix());
}
// [/lightning-layer]

// float64 layer over all tokens at once, from the definition (the quadratic form, no blocks, no state).
std::vector<std::vector<double>> layer64(const Tensor& x, const Layer& w, std::span<const double> slopes) {
  const std::int64_t d = w.head_dim, hd = w.heads * d, T = x.dim(0), n = w.hidden;
  const auto proj = [&](const Tensor& m, std::int64_t t, std::int64_t row, std::int64_t width) {
    double s = 0.0;
    for (std::int64_t i = 0; i < width; ++i) s += double{x.data()[t * n + i]} * m.data()[row * width + i];
    return s;
  };
  const auto silu64 = [](double z) { return z / (1.0 + std::exp(-z)); };
  std::vector<std::vector<double>> q(T, std::vector<double>(hd)), k = q, v = q, heads = q,
                                                                  out(T, std::vector<double>(n));
  for (std::int64_t t = 0; t < T; ++t)
    for (std::int64_t h = 0; h < w.heads; ++h)
      for (std::int64_t c = 0; c < d; ++c) {
        q[t][h * d + c] = silu64(proj(w.qkv_proj, t, h * 3 * d + c, n));
        k[t][h * d + c] = silu64(proj(w.qkv_proj, t, h * 3 * d + d + c, n));
        v[t][h * d + c] = silu64(proj(w.qkv_proj, t, h * 3 * d + 2 * d + c, n));
      }
  for (std::int64_t t = 0; t < T; ++t) {
    for (std::int64_t h = 0; h < w.heads; ++h)
      for (std::int64_t j = 0; j <= t; ++j) {
        double s = 0.0;
        for (std::int64_t c = 0; c < d; ++c) s += q[t][h * d + c] * k[j][h * d + c];
        s *= std::exp(-slopes[static_cast<std::size_t>(h)] * static_cast<double>(t - j));
        for (std::int64_t c = 0; c < d; ++c) heads[t][h * d + c] += s * v[j][h * d + c];
      }
    double ms = 0.0;
    for (const double y : heads[t]) ms += y * y;
    for (std::int64_t c = 0; c < hd; ++c)
      heads[t][c] *= w.norm.data()[c] / std::sqrt(ms / static_cast<double>(hd) + 1e-6) /
                     (1.0 + std::exp(-proj(w.output_gate, t, c, n)));
    for (std::int64_t r = 0; r < n; ++r)
      for (std::int64_t c = 0; c < hd; ++c) out[t][r] += heads[t][c] * w.out_proj.data()[r * hd + c];
  }
  return out;
}

double diff64(const Tensor& got, const std::vector<std::vector<double>>& want, std::int64_t first_row = 0) {
  double worst = 0.0;
  for (std::int64_t i = 0; i < got.dim(0); ++i)
    for (std::int64_t c = 0; c < got.dim(1); ++c)
      worst = af::worse(worst, std::abs(got.matrix()(i, c) - want[static_cast<std::size_t>(first_row + i)][c]));
  return worst;
}

// [recall-input]
// The recall input: n pairs, key k_j -> value v_j, random normal vectors of dimension d; then every key again as
// a query. Softmax attention scores the query against each key (scale 1/sqrt(d)); linear attention reads the
// one d x d state S = sum_j phi(k_j)^T v_j (phi the identity, or MiniMax's SiLU), with an optional decay by
// distance. The answer is the stored value nearest (cosine) to the output; recall is the share answered right.
enum class Reader { softmax, linear, linear_silu, linear_decay };

double recall(af::Rng& rng, std::int64_t pairs, std::int64_t d, Reader reader, double slope, std::int64_t queries) {
  const Tensor keys = af::random_normal(Shape{pairs, d}, rng), values = af::random_normal(Shape{pairs, d}, rng);
  Tensor phi = keys;
  if (reader == Reader::linear_silu)
    for (float& z : phi.values()) z = silu(z);
  Tensor state(Shape{d, d});
  for (std::int64_t j = 0; j < pairs; ++j) {
    const double weight = reader == Reader::linear_decay ? std::exp(-slope * static_cast<double>(pairs - 1 - j)) : 1.0;
    for (std::int64_t a = 0; a < d; ++a)
      af::axpy(static_cast<float>(weight) * phi.matrix()(j, a), values.matrix().row(j), state.matrix().row(a));
  }
  std::int64_t right = 0;
  for (std::int64_t i = 0; i < queries; ++i) {
    const std::int64_t asked = (i * pairs) / queries;  // spread over the pairs, old and recent
    Tensor out(Shape{1, d});
    if (reader == Reader::softmax) {
      std::vector<double> w(static_cast<std::size_t>(pairs));
      double top = -std::numeric_limits<double>::infinity(), total = 0.0;
      for (std::int64_t j = 0; j < pairs; ++j)
        top = std::max(top, w[j] = af::dot(keys.matrix().row(asked), keys.matrix().row(j)) / std::sqrt(double(d)));
      for (double& x : w) total += (x = std::exp(x - top));
      for (std::int64_t j = 0; j < pairs; ++j)
        af::axpy(static_cast<float>(w[j] / total), values.matrix().row(j), out.matrix().row(0));
    } else {
      for (std::int64_t a = 0; a < d; ++a) af::axpy(phi.matrix()(asked, a), state.matrix().row(a), out.matrix().row(0));
    }
    std::int64_t best = -1;
    double best_cos = -2.0;
    for (std::int64_t j = 0; j < pairs; ++j) {
      const std::span<const float> value = values.matrix().row(j);
      const double c = af::dot(out.matrix().row(0), value) / std::sqrt(double{af::dot(value, value)} + 1e-30);
      if (c > best_cos) best_cos = c, best = j;
    }
    right += best == asked;
  }
  return static_cast<double>(right) / static_cast<double>(queries);
}
// [/recall-input]

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Chapter 13: MiniMax lightning attention", "ch13_minimax_lightning_attention"};
  std::int64_t seq_len = 300, decode_steps = 6, heads = 4, head_dim = 16, block = 64, layer = 1, layers = 8;
  std::int64_t recall_dim = 64, max_pairs = 1024, trials = 3;
  std::uint64_t seed = 13;
  std::string out_dir;
  app.add_option("--seq-len", seq_len, "Prefill tokens T")->check(CLI::Range(1, 2048))->capture_default_str();
  app.add_option("--decode-steps", decode_steps, "Tokens decoded through the state after the prefill")
      ->check(CLI::Range(0, 1024))
      ->capture_default_str();
  app.add_option("--heads", heads, "Heads H")->check(CLI::Range(1, 16))->capture_default_str();
  app.add_option("--head-dim", head_dim, "Head dimension d")->check(CLI::Range(1, 64))->capture_default_str();
  app.add_option("--block", block, "Block size B of the blocked prefill (MiniMax: 256)")
      ->check(CLI::Range(1, 4096))
      ->capture_default_str();
  app.add_option("--layer", layer, "Index of the lightning layer (sets its decay slopes)")
      ->check(CLI::Range(0, 1023))
      ->capture_default_str();
  app.add_option("--layers", layers, "Layers in the model (sets the slopes' depth factor)")
      ->check(CLI::Range(1, 1024))
      ->capture_default_str();
  app.add_option("--recall-dim", recall_dim, "Key and value dimension d of the recall experiment")
      ->check(CLI::Range(64, 128))
      ->capture_default_str();
  app.add_option("--max-pairs", max_pairs, "Largest number of key -> value pairs in the recall sweep")
      ->check(CLI::Range(1024, 4096))
      ->capture_default_str();
  app.add_option("--trials", trials, "Random inputs per point of the recall sweep")
      ->check(CLI::Range(1, 12))
      ->capture_default_str();
  app.add_option("--seed", seed, "Seed of the random weights and inputs")
      ->check(af::seed_value())
      ->capture_default_str();
  app.add_option("--out", out_dir, "Directory for the figure data (cache_bytes.dat, recall.dat) and numbers.json")
      ->check(af::output_directory());

  return af::run_program(app, argc, argv, [&] {
    af::require(layer < layers, "--layer {} is not below --layers {}", layer, layers);
    // The recall sweep claims two things that hold only in a regime: softmax keeps recall >= 0.9 (its keys stay
    // apart while n << e^sqrt(d): d >= 64 for n up to 4096), and linear attention's d x d state has lost most
    // pairs by the end of the sweep (recall < 0.5 near n = 8 d, so the sweep must reach 16 d).
    af::require(max_pairs >= 16 * recall_dim,
                "--max-pairs {} is below 16 x --recall-dim {} = {} (expected a sweep long enough for the d x d state "
                "of linear attention to lose its pairs)",
                max_pairs, recall_dim, 16 * recall_dim);
    af::require_product_within({{"--trials", trials}, {"--max-pairs", max_pairs}, {"--recall-dim", recall_dim}},
                               3 * 4096 * 128);
    // hidden = H x d: the projections cost T x (H d)^2, the masked form and the float64 reference T x T x H x d.
    const std::int64_t width = heads * head_dim;
    af::require_product_within({{"--seq-len", seq_len}, {"(--heads x --head-dim)^2", width * width}}, 1 << 26);
    af::require_product_within(
        {{"--seq-len", seq_len}, {"--seq-len", seq_len}, {"--heads", heads}, {"--head-dim", head_dim}}, 1 << 28);
    const std::int64_t d = head_dim, hd = heads * d, hidden = hd;
    af::Rng rng(seed);
    const double in = 1.0 / std::sqrt(static_cast<double>(hidden));
    const Layer w{hidden,
                  heads,
                  d,
                  block,
                  af::random_normal(Shape{3 * hd, hidden}, rng, in),
                  af::random_normal(Shape{hd, hidden}, rng, in),
                  af::random_uniform(Shape{hd}, rng, 0.5, 1.5),
                  af::random_normal(Shape{hidden, hd}, rng, 1.0 / std::sqrt(static_cast<double>(hd)))};
    const std::vector<double> slopes = slopes_of(heads, layer, layers);
    const std::int64_t total = seq_len + decode_steps;
    const Tensor x = af::random_normal(Shape{total, hidden}, rng);
    fmt::print("Lightning attention: H = {} heads of d = {}, hidden {}, block B = {}; layer {} of {}\n", heads, d,
               hidden, block, layer, layers);
    fmt::print("  prefill T = {} ({} full blocks + {} tokens), then {} decode steps; state [H, d, d] = [{}, {}, {}]\n",
               seq_len, seq_len / block, seq_len % block, decode_steps, heads, d, d);
    std::vector<double> decays;
    for (const double s : slopes) decays.push_back(std::exp(-s));
    fmt::print("  decay per head exp(-s_h): {:.4f}\n\n", fmt::join(decays, " "));

    // One head: the three forms from scratch, the library's blocked form, and float64.
    af::Checks checks;
    {
      const Tensor q = af::random_normal(Shape{seq_len, d}, rng), k = af::random_normal(Shape{seq_len, d}, rng),
                   v = af::random_normal(Shape{seq_len, d}, rng);
      const double lambda = std::exp(-slopes.back());
      Tensor s_rec(Shape{d, d}), s_blk(Shape{d, d}), s_lib(Shape{d, d});
      const Tensor quad = masked_form(q.matrix(), k.matrix(), v.matrix(), lambda);
      const Tensor rec = recurrence(q.matrix(), k.matrix(), v.matrix(), lambda, s_rec);
      const Tensor blk = blocked(q.matrix(), k.matrix(), v.matrix(), lambda, block, s_blk);
      const Tensor lib =
          af::linear_attention_blocked(q.matrix(), k.matrix(), v.matrix(), slopes.back(), block, s_lib.matrix());
      std::vector<std::vector<double>> want(seq_len, std::vector<double>(d, 0.0));
      for (std::int64_t i = 0; i < seq_len; ++i)
        for (std::int64_t j = 0; j <= i; ++j) {
          double s = 0.0;
          for (std::int64_t c = 0; c < d; ++c) s += double{q.matrix()(i, c)} * k.matrix()(j, c);
          s *= std::exp(-slopes.back() * static_cast<double>(i - j));
          for (std::int64_t c = 0; c < d; ++c) want[i][c] += s * v.matrix()(j, c);
        }
      double scale = 1.0;
      for (const auto& row : want)
        for (const double y : row) scale = af::worse(scale, std::abs(y));
      const double tol = 1e-5 * scale;
      checks.expect_close("one head: masked form vs float64", diff64(quad, want), tol);
      checks.expect_close("one head: recurrence vs float64", diff64(rec, want), tol);
      checks.expect_close("one head: blocked (lightning) vs float64", diff64(blk, want), tol);
      checks.expect_close("one head: blocked from scratch vs lib/", af::max_abs_diff(blk.values(), lib.values()), tol);
      checks.expect_close("one head: state after the recurrence vs after the blocks",
                          af::max_abs_diff(s_rec.values(), s_blk.values()),
                          af::scaled_tolerance(1e-5, af::max_abs(s_rec.values())));
    }

    // The layer: prefill (blocked) then decode (recurrence), from scratch and from lib/, against float64.
    std::vector<Tensor> states(static_cast<std::size_t>(heads), Tensor(Shape{d, d}));
    Tensor ours(Shape{total, hidden});
    const Tensor pre = lightning_layer(x.matrix().rows_slice(0, seq_len), w, slopes, states, true);
    std::ranges::copy(pre.values(), ours.data());
    for (std::int64_t i = 0; i < decode_steps; ++i) {
      const Tensor y = lightning_layer(x.matrix().rows_slice(seq_len + i, 1), w, slopes, states, false);
      std::ranges::copy(y.values(), ours.data() + (seq_len + i) * hidden);
    }
    // [library-layer]
    const af::LightningShape shape{hidden, heads, d, block};
    const af::LightningWeights weights{w.qkv_proj, w.output_gate, w.norm, w.out_proj, 1e-6};
    const std::vector<double> lib_slopes = af::lightning_slopes(heads, layer, layers);
    af::LinearState state(heads, d, d);
    Tensor lib(Shape{total, hidden});
    const Tensor lib_pre =
        af::lightning_attention(x.matrix().rows_slice(0, seq_len), shape, weights, lib_slopes, state);
    std::ranges::copy(lib_pre.values(), lib.data());
    const std::int64_t state_bytes = state.bytes(af::DType::f32);
    bool constant = true;
    for (std::int64_t i = 0; i < decode_steps; ++i) {
      const Tensor y = af::lightning_attention(x.matrix().rows_slice(seq_len + i, 1), shape, weights, lib_slopes, state,
                                               af::LinearForm::recurrent);
      std::ranges::copy(y.values(), lib.data() + (seq_len + i) * hidden);
      constant = constant && state.bytes(af::DType::f32) == state_bytes;
    }
    // [/library-layer]
    const auto want = layer64(x, w, slopes);
    double scale = 1.0;
    for (const auto& row : want)
      for (const double y : row) scale = af::worse(scale, std::abs(y));
    checks.expect_close("layer: from scratch (prefill + decode) vs float64", diff64(ours, want), 1e-5 * scale);
    checks.expect_close("layer: from scratch vs lib/", af::max_abs_diff(ours.values(), lib.values()), 1e-5 * scale);
    double slope_diff = 0.0;
    for (std::int64_t h = 0; h < heads; ++h) slope_diff = af::worse(slope_diff, std::abs(slopes[h] - lib_slopes[h]));
    checks.expect_close("slopes: from scratch vs lib/", slope_diff, 1e-15);
    // Not a check (the state is a fixed-shape tensor): what a decode step keeps, whatever the context.
    fmt::print("  the state holds {} bytes (fp32) after the prefill and after each of {} decode steps{}\n", state_bytes,
               decode_steps, constant ? "" : " (it changed size!)");

    // [hybrid-stack]
    // MiniMax-M1 (Text-01's architecture): a softmax layer after every seven lightning layers.
    const af::HybridModel m1 = af::minimax_m1();
    fmt::print("\nThe hybrid stack of {} ({} lightning + {} softmax layers):\n  ", m1.model, m1.linear_layers,
               m1.softmax.layers);
    const std::int64_t m1_layers = m1.linear_layers + m1.softmax.layers, m1_heads = m1.linear_heads;
    const std::int64_t period = m1_layers / m1.softmax.layers;  // a softmax layer closes every period
    for (std::int64_t l = 0; l < m1_layers; ++l)
      fmt::print("{}{}", (l + 1) % period == 0 ? 'S' : 'L', l % 40 == 39 ? "\n  " : "");
    if (m1_layers % 40 != 0) fmt::print("\n  ");
    fmt::print("decay half-life ln 2 / s in tokens (layer index l of {} sets the factor 1 - l/{}):\n", m1_layers,
               m1_layers - 1);
    fmt::print("  {:>8} {:>12} {:>12} {:>12}\n", "layer", "head 1", fmt::format("head {}", m1_heads / 2),
               fmt::format("head {}", m1_heads));
    for (const std::int64_t l : {std::int64_t{0}, period, m1_layers / 2, m1_layers - 2}) {
      const std::vector<double> s = af::lightning_slopes(m1_heads, l, m1_layers);
      fmt::print("  {:>8} {:>12.3g} {:>12.3g} {:>12.3g}\n", l, std::log(2.0) / s[0],
                 std::log(2.0) / s[static_cast<std::size_t>(m1_heads / 2 - 1)],
                 std::log(2.0) / s[static_cast<std::size_t>(m1_heads - 1)]);
    }
    // [/hybrid-stack]

    // [cache-card]
    const af::ModelCache llama70 = af::dense_model("Llama-3.1-70B").cache();
    const af::ModelCache deepseek = af::model_preset("DeepSeek-V3").cache(af::DType::bf16);
    const af::ModelCache m2 =
        af::DenseModel{"MiniMax-M2",
                       "huggingface/transformers, models/minimax_m2/configuration_minimax_m2.py (62 layers, 48 heads, "
                       "8 KV heads, head_dim 128)",
                       62,
                       3072,
                       48,
                       8,
                       128,
                       0}
            .cache();
    const std::vector<af::ModelCache> others{llama70, deepseek, m2};
    const std::vector<std::int64_t> contexts{4096, 131072, 1048576};
    fmt::print("\n{}", af::format_hybrid_card(m1, others, contexts));
    // [/cache-card]
    const af::HybridModel m1_fp32 = af::minimax_m1(af::DType::bf16, af::DType::f32);
    fmt::print("  with fp32 states (as M1's prefill code builds them): {} of states\n",
               af::human_bytes(static_cast<double>(m1_fp32.state_bytes())));
    fmt::print("  KV bytes per token: {} {}, {} {}, {} {}, {} {}\n", m1.model, m1.softmax.bytes_per_token(),
               llama70.model, llama70.bytes_per_token(), deepseek.model, deepseek.bytes_per_token(), m2.model,
               m2.bytes_per_token());
    // M1 holds states + t * (its KV per token); Llama t * (its KV per token): M1 holds less once
    // t * (difference) exceeds the states, i.e. from the first t past states / difference.
    const std::int64_t difference = llama70.bytes_per_token() - m1.softmax.bytes_per_token();
    const std::int64_t first_less = m1.state_bytes() / difference + 1;
    fmt::print("  {} stores less than {} from t = {} tokens on\n", m1.model, llama70.model, first_less);

    // The numbers the text quotes, from the same accounting.
    const auto bytes_text = [](std::int64_t bytes) { return af::human_bytes(static_cast<double>(bytes)); };
    af::BookNumbers numbers;
    numbers.print("half_life_layer0_head1", "{:.2f}", std::log(2.0) / af::lightning_slopes(m1_heads, 0, m1_layers)[0]);
    numbers.set("half_life_deepest_slowest",
                af::with_thousands(
                    std::llround(std::log(2.0) / af::lightning_slopes(m1_heads, m1_layers - 2, m1_layers).back())));
    numbers.print("deepest_layer", "{}", m1_layers - 2);
    numbers.set("m1_states", bytes_text(m1.state_bytes()));
    numbers.print("m1_states_percent_4k", "{:.0f}",
                  100.0 * static_cast<double>(m1.state_bytes()) / static_cast<double>(m1.bytes_stored(4096)));
    numbers.print("m1_states_percent_1m", "{:.1f}",
                  100.0 * static_cast<double>(m1.state_bytes()) / static_cast<double>(m1.bytes_stored(1 << 20)));
    numbers.set("m1_kv_1m", bytes_text(m1.softmax.bytes_stored(1 << 20)));
    numbers.set("llama70_kv_1m", bytes_text(llama70.bytes_stored(1 << 20)));
    numbers.set("m1_kv_per_token", af::with_thousands(m1.softmax.bytes_per_token()));
    numbers.set("llama70_kv_per_token", af::with_thousands(llama70.bytes_per_token()));
    numbers.print("meet", "{}", first_less - 1);
    numbers.set("meet_bytes", bytes_text(m1.bytes_stored(first_less - 1)));
    numbers.print("first_less", "{}", first_less);

    // [recall-sweep]
    const double recall_slope = af::lightning_slopes(64, 40, 80).back();
    fmt::print("\nRecall of n key -> value pairs, d = {} (mean of {} trials; queries spread over the pairs)\n",
               recall_dim, trials);
    fmt::print("  linear with decay: s = {:.5f}, MiniMax-M1's slowest head of layer 40 (half-life {:.0f} tokens)\n",
               recall_slope, std::log(2.0) / recall_slope);
    fmt::print("  {:>7} {:>9} {:>9} {:>13} {:>14}\n", "pairs", "softmax", "linear", "linear SiLU", "linear decay");
    std::vector<std::array<double, 5>> curve;
    af::Rng recall_rng(seed + 1);
    for (double n = 4; n <= static_cast<double>(max_pairs) + 0.5; n *= std::sqrt(2.0)) {
      const auto pairs = static_cast<std::int64_t>(std::lround(n));
      const std::int64_t queries = std::min<std::int64_t>(pairs, 256);
      std::array<double, 5> row{static_cast<double>(pairs), 0, 0, 0, 0};
      for (std::int64_t trial = 0; trial < trials; ++trial) {
        int column = 1;
        for (const Reader r : {Reader::softmax, Reader::linear, Reader::linear_silu, Reader::linear_decay})
          row[column++] +=
              recall(recall_rng, pairs, recall_dim, r, recall_slope, queries) / static_cast<double>(trials);
      }
      fmt::print("  {:>7} {:>9.3f} {:>9.3f} {:>13.3f} {:>14.3f}\n", pairs, row[1], row[2], row[3], row[4]);
      curve.push_back(row);
    }
    // [/recall-sweep]
    // The crossover: the first n at which linear recall falls below one half while softmax keeps above 0.9.
    const auto first_below = [&](int column, double level) -> std::int64_t {
      for (const auto& row : curve)
        if (row[column] < level) return static_cast<std::int64_t>(row[0]);
      return -1;
    };
    const std::int64_t cross = first_below(2, 0.5), cross90 = first_below(2, 0.9);
    double softmax_min = 1.0;
    for (const auto& row : curve) softmax_min = std::min(softmax_min, row[1]);
    fmt::print("  linear recall first below 0.9 at n = {}, below 0.5 at n = {} (d = {}); softmax never below {:.3f}\n",
               cross90, cross, recall_dim, softmax_min);
    fmt::print("  SiLU-keyed linear below 0.5 at n = {}; decayed linear below 0.5 at n = {}\n", first_below(3, 0.5),
               first_below(4, 0.5));
    checks.expect_true("softmax attention keeps recall >= 0.9 over the whole sweep", softmax_min >= 0.9);
    std::int64_t perfect = 0;  // the most pairs before linear recall first drops below 1
    for (const auto& row : curve) {
      if (row[2] < 1.0) break;
      perfect = static_cast<std::int64_t>(row[0]);
    }
    numbers.print("recall_perfect_pairs", "{}", perfect);
    numbers.print("recall_perfect_over_d", "{:.1f}", static_cast<double>(perfect) / static_cast<double>(recall_dim));
    numbers.print("recall_below_90", "{}", cross90);
    numbers.print("recall_crossover", "{}", cross);
    numbers.print("recall_crossover_over_d", "{:.0f}", static_cast<double>(cross) / static_cast<double>(recall_dim));
    numbers.print("recall_silu_crossover", "{}", first_below(3, 0.5));
    checks.expect_true(fmt::format("linear attention's d x d state loses pairs: recall < 0.5 by n = {}", max_pairs),
                       cross > 0);

    if (!out_dir.empty()) {
      const std::filesystem::path dir = af::make_output_directory(out_dir);
      numbers.write(dir);
      af::write_output_file(dir / "cache_bytes.dat", [&](af::OutputFile& bytes) {
        bytes.print("# context \"{} (states + KV)\" \"{} states only\" \"{} KV only\" \"{}\" \"{}\" \"{}\"\n", m1.model,
                    m1.model, m1.model, llama70.model, deepseek.model, m2.model);
        for (std::int64_t t = 1024; t <= (std::int64_t{1} << 22); t *= 2)
          bytes.print("{} {} {} {} {} {} {}\n", t, m1.bytes_stored(t), m1.state_bytes(), m1.softmax.bytes_stored(t),
                      llama70.bytes_stored(t), deepseek.bytes_stored(t), m2.bytes_stored(t));
      });
      af::write_output_file(dir / "recall.dat", [&](af::OutputFile& rec) {
        rec.print("# d = {}, trials {}, decay slope {:.6g}; crossover (linear < 0.5) at {}\n", recall_dim, trials,
                  recall_slope, cross);
        rec.print("pairs softmax linear \"linear SiLU\" \"linear decay\"\n");
        for (const auto& row : curve)
          rec.print("{} {:.4f} {:.4f} {:.4f} {:.4f}\n", row[0], row[1], row[2], row[3], row[4]);
      });
    }
    return checks.all_passed();
  });
}
