// Chapter 14 — The delta rule: Gated DeltaNet, Kimi Delta Attention, and what a fixed state can recall.
//
// Writes the gated delta rule one step at a time in float64, checks the library's recurrence and its chunked
// (UT-transform) prefill against it for a per-head decay (Gated DeltaNet) and a per-channel decay (Kimi Delta
// Attention), shows that a write replaces what a key retrieved where linear attention adds to it, runs a Gated
// DeltaNet and a KDA layer through a prefill that ends mid-chunk and then decode steps (the convolution's last
// inputs and the state are the whole cache), prints the hybrid stacks' cache cards (Qwen3-Next-80B-A3B and
// Kimi-Linear-48B-A3B beside MiniMax-M1 and Llama-3.1-70B), and measures associative recall at one d x d state
// for linear attention and the delta rule against softmax attention; writes the data of the figures.
//
//   build/bin/ch14_delta_rule [--seq-len 150] [--decode-steps 5] [--heads 2] [--key-dim 16] [--value-dim 12]
//       [--chunk 64] [--recall-dim 64] [--max-pairs 1024] [--trials 3] [--seed 14] [--out DIR]

#include "af/delta_rule.hpp"
#include "af/accounting.hpp"
#include "af/compare.hpp"
#include "af/error.hpp"
#include "af/gated_deltanet.hpp"
#include "af/linalg.hpp"
#include "af/linear_attention.hpp"
#include "af/models.hpp"
#include "af/program.hpp"
#include "af/random.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <filesystem>
#include <limits>
#include <string>
#include <vector>

namespace {

using af::Shape;
using af::Tensor;

// [delta-step]
// One step of the gated delta rule for one head, in float64: the state S [d_k][d_v] maps a key to a value.
// Decay it (one log-decay per key channel: a per-head gate repeats one value), read what k retrieves, write the
// difference to v at rate beta as a rank-one update, and read the output with q.
using State = std::vector<std::vector<double>>;

void delta_step(State& S, std::span<const double> log_decay, std::span<const float> k, std::span<const float> v,
                double beta) {
  const std::size_t dk = S.size(), dv = S[0].size();
  for (std::size_t c = 0; c < dk; ++c)
    for (double& s : S[c]) s *= std::exp(log_decay[c]);
  std::vector<double> retrieved(dv, 0.0);  // S^T k
  for (std::size_t c = 0; c < dk; ++c)
    for (std::size_t j = 0; j < dv; ++j) retrieved[j] += S[c][j] * k[c];
  for (std::size_t c = 0; c < dk; ++c)  // S += k (beta (v - S^T k))^T
    for (std::size_t j = 0; j < dv; ++j) S[c][j] += k[c] * beta * (v[j] - retrieved[j]);
}

std::vector<double> read_out(const State& S, std::span<const float> q) {  // o = S^T q
  std::vector<double> o(S[0].size(), 0.0);
  for (std::size_t c = 0; c < S.size(); ++c)
    for (std::size_t j = 0; j < o.size(); ++j) o[j] += S[c][j] * q[c];
  return o;
}
// [/delta-step]

// Unit rows of `x` (as the layers normalise q and k before the rule), viewed as [rows, d].
void normalise_rows(Tensor& x, std::int64_t d) {
  for (std::int64_t r = 0; r < x.numel() / d; ++r) {
    double norm = 0;
    for (std::int64_t c = 0; c < d; ++c) norm += double{x.data()[r * d + c]} * x.data()[r * d + c];
    for (std::int64_t c = 0; c < d; ++c)
      x.data()[r * d + c] = static_cast<float>(x.data()[r * d + c] / std::sqrt(norm));
  }
}

af::DeltaRuleInputs random_rule_inputs(af::Rng& rng, std::int64_t T, std::int64_t H, std::int64_t dk, std::int64_t dv,
                                       bool per_channel) {
  af::DeltaRuleInputs in{af::random_normal(Shape{T, H, dk}, rng), af::random_normal(Shape{T, H, dk}, rng),
                         af::random_normal(Shape{T, H, dv}, rng),
                         per_channel ? af::random_uniform(Shape{T, H, dk}, rng, -0.4, 0.0)
                                     : af::random_uniform(Shape{T, H}, rng, -0.2, 0.0),
                         af::random_uniform(Shape{T, H}, rng, 0.05, 1.0)};
  normalise_rows(in.q, dk);
  normalise_rows(in.k, dk);
  return in;
}

// Steps [first, first + count) of every input (their leading axis).
af::DeltaRuleInputs steps_of(const af::DeltaRuleInputs& in, std::int64_t first, std::int64_t count) {
  const auto slice = [&](const Tensor& x) {
    std::vector<std::int64_t> dims(x.shape().dims().begin(), x.shape().dims().end());
    const std::int64_t row = x.numel() / dims[0];
    dims[0] = count;
    Tensor part{Shape(std::span<const std::int64_t>(dims))};
    std::copy(x.data() + first * row, x.data() + (first + count) * row, part.data());
    return part;
  };
  return {slice(in.q), slice(in.k), slice(in.v), slice(in.log_decay), slice(in.beta)};
}

// The whole sequence through delta_step in float64: outputs [T * H * dv] and the final states.
std::vector<double> rule64(const af::DeltaRuleInputs& in, std::vector<State>& states) {
  const std::int64_t T = in.steps(), H = in.heads(), dk = in.key_dim(), dv = in.value_dim();
  states.assign(static_cast<std::size_t>(H), State(static_cast<std::size_t>(dk), std::vector<double>(dv, 0.0)));
  std::vector<double> out;
  std::vector<double> g(static_cast<std::size_t>(dk));
  for (std::int64_t t = 0; t < T; ++t)
    for (std::int64_t h = 0; h < H; ++h) {
      for (std::int64_t c = 0; c < dk; ++c)
        g[static_cast<std::size_t>(c)] = in.per_channel_decay() ? in.log_decay.at({t, h, c}) : in.log_decay.at({t, h});
      const auto row = [&](const Tensor& x, std::int64_t d) { return std::span(x.data() + (t * H + h) * d, d); };
      State& S = states[static_cast<std::size_t>(h)];
      delta_step(S, g, row(in.k, dk), row(in.v, dv), in.beta.at({t, h}));
      const std::vector<double> o = read_out(S, row(in.q, dk));
      out.insert(out.end(), o.begin(), o.end());
    }
  return out;
}

double state_diff(const Tensor& state, const std::vector<State>& want) {
  double worst = 0;
  const std::int64_t dk = state.dim(1), dv = state.dim(2);
  for (std::int64_t h = 0; h < state.dim(0); ++h)
    for (std::int64_t c = 0; c < dk; ++c)
      for (std::int64_t j = 0; j < dv; ++j)
        worst = af::worse(worst, std::abs(state.at({h, c, j}) - want[static_cast<std::size_t>(h)][c][j]));
  return worst;
}

// [recall-readers]
// Associative recall at one d x d state: n keys (random normal), each written with its value (random normal);
// in the update task every key is written a second time, after all the first writes, with a new value. Then
// every key is asked. Softmax attention keeps every write (scale 1/sqrt(d), no positions); linear attention adds
// k^T v into S (with an optional decay per write); the delta rule writes each unit key with beta = 1 (with the
// same optional decay). The answer is the written value nearest (cosine) to the output; it is right if it is the
// key's last value.
enum class Reader { softmax, linear, linear_decay, delta, gated_delta };
constexpr std::array readers{Reader::softmax, Reader::linear, Reader::linear_decay, Reader::delta, Reader::gated_delta};

// Returns, per asked key (every key, or `asked_n` spread from the oldest to the youngest), whether it was right.
std::vector<bool> recall(af::Rng& rng, std::int64_t keys_n, std::int64_t d, Reader reader, double slope, bool update,
                         std::int64_t asked_n) {
  const std::int64_t writes = update ? 2 * keys_n : keys_n;
  Tensor keys = af::random_normal(Shape{keys_n, d}, rng);
  const Tensor values = af::random_normal(Shape{writes, d}, rng);
  const bool delta = reader == Reader::delta || reader == Reader::gated_delta;
  const bool decays = reader == Reader::linear_decay || reader == Reader::gated_delta;
  if (delta) normalise_rows(keys, d);
  const auto key_of = [&](std::int64_t write) { return keys.matrix().row(write % keys_n); };
  State S(static_cast<std::size_t>(d), std::vector<double>(static_cast<std::size_t>(d), 0.0));
  const std::vector<double> log_decay(static_cast<std::size_t>(d), decays ? -slope : 0.0);
  for (std::int64_t w = 0; w < writes && reader != Reader::softmax; ++w) {
    if (delta) {
      delta_step(S, log_decay, key_of(w), values.matrix().row(w), 1.0);
      continue;
    }
    for (std::int64_t a = 0; a < d; ++a)
      for (std::int64_t b = 0; b < d; ++b) {
        double& s = S[static_cast<std::size_t>(a)][static_cast<std::size_t>(b)];
        s = s * std::exp(log_decay[0]) + double{key_of(w)[a]} * values.matrix()(w, b);
      }
  }
  std::vector<double> inverse_norm(static_cast<std::size_t>(writes));
  for (std::int64_t w = 0; w < writes; ++w)
    inverse_norm[static_cast<std::size_t>(w)] =
        1.0 / std::sqrt(af::dot(values.matrix().row(w), values.matrix().row(w)));
  std::vector<bool> right(static_cast<std::size_t>(asked_n));
  std::vector<double> weight(static_cast<std::size_t>(writes));
  for (std::int64_t i = 0; i < asked_n; ++i) {
    const std::int64_t asked = i * keys_n / asked_n;
    std::vector<double> out(static_cast<std::size_t>(d), 0.0);
    if (reader == Reader::softmax) {
      double top = -std::numeric_limits<double>::infinity(), total = 0.0;
      for (std::int64_t w = 0; w < writes; ++w)
        top = std::max(top, weight[static_cast<std::size_t>(w)] =
                                af::dot(keys.matrix().row(asked), key_of(w)) / std::sqrt(static_cast<double>(d)));
      for (double& x : weight) total += (x = std::exp(x - top));
      for (std::int64_t w = 0; w < writes; ++w)
        for (std::int64_t b = 0; b < d; ++b)
          out[static_cast<std::size_t>(b)] += weight[static_cast<std::size_t>(w)] / total * values.matrix()(w, b);
    } else {
      out = read_out(S, keys.matrix().row(asked));
    }
    std::int64_t best = -1;
    double best_cos = -2.0;
    for (std::int64_t w = 0; w < writes; ++w) {
      double dot = 0;
      for (std::int64_t b = 0; b < d; ++b) dot += out[static_cast<std::size_t>(b)] * values.matrix()(w, b);
      if (dot * inverse_norm[static_cast<std::size_t>(w)] > best_cos)
        best_cos = dot * inverse_norm[static_cast<std::size_t>(w)], best = w;
    }
    right[static_cast<std::size_t>(i)] = best == asked + writes - keys_n;
  }
  return right;
}
// [/recall-readers]

// A small Gated DeltaNet (hidden 48, 2 key heads and 4 value heads) with random weights of a plausible scale.
struct SmallGdn {
  af::GatedDeltaNetShape shape;
  af::GatedDeltaNetWeights weights;
};

SmallGdn small_gdn(af::Rng& rng, std::int64_t dk, std::int64_t dv) {
  const af::GatedDeltaNetShape s{48, 2, 4, dk, dv, 4, 1e-6};
  af::GatedDeltaNetWeights w;
  const double in = 1.0 / std::sqrt(48.0);
  w.in_proj_qkvz = af::random_normal(Shape{2 * 2 * dk + 2 * 4 * dv, 48}, rng, in);
  w.in_proj_ba = af::random_normal(Shape{2 * 4, 48}, rng, in);
  w.conv = af::random_normal(Shape{s.conv_channels(), 4}, rng, 0.5);
  w.dt_bias = af::random_normal(Shape{4}, rng, 0.5);
  w.a_log = af::random_uniform(Shape{4}, rng, -2.0, 0.5);
  w.norm = af::random_uniform(Shape{dv}, rng, 0.5, 1.5);
  w.out_proj = af::random_normal(Shape{48, 4 * dv}, rng, 1.0 / std::sqrt(static_cast<double>(4 * dv)));
  return {s, w};
}

struct SmallKda {
  af::KimiDeltaShape shape;
  af::KimiDeltaWeights weights;
};

SmallKda small_kda(af::Rng& rng, std::int64_t d) {
  const af::KimiDeltaShape s{48, 3, d, 4, 1e-6};
  af::KimiDeltaWeights w;
  const double in = 1.0 / std::sqrt(48.0), low = 1.0 / std::sqrt(static_cast<double>(d));
  w.q_proj = af::random_normal(Shape{3 * d, 48}, rng, in);
  w.k_proj = af::random_normal(Shape{3 * d, 48}, rng, in);
  w.v_proj = af::random_normal(Shape{3 * d, 48}, rng, in);
  w.conv = af::random_normal(Shape{s.conv_channels(), 4}, rng, 0.5);
  w.f_a = af::random_normal(Shape{d, 48}, rng, in);
  w.f_b = af::random_normal(Shape{3 * d, d}, rng, low);
  w.dt_bias = af::random_normal(Shape{3 * d}, rng, 0.5);
  w.a_log = af::random_uniform(Shape{3}, rng, -2.0, 0.5);
  w.b_proj = af::random_normal(Shape{3, 48}, rng, in);
  w.g_a = af::random_normal(Shape{d, 48}, rng, in);
  w.g_b = af::random_normal(Shape{3 * d, d}, rng, low);
  w.o_norm = af::random_uniform(Shape{d}, rng, 0.5, 1.5);
  w.o_proj = af::random_normal(Shape{48, 3 * d}, rng, low / std::sqrt(3.0));
  return {s, w};
}

// A layer run two ways: a prefill of `prefill` tokens then decode steps, and every token decoded alone. Returns
// the largest difference of the outputs and whether the cache's bytes stayed constant.
template <typename Cache, typename Layer>
std::pair<double, bool> prefill_then_decode(const Tensor& x, std::int64_t prefill, Cache batched, Cache stepped,
                                            Layer layer) {
  const std::int64_t bytes = batched.bytes();
  std::vector<float> a, b;
  const Tensor pre = layer(x.matrix().rows_slice(0, prefill), batched);
  a.assign(pre.values().begin(), pre.values().end());
  bool constant = batched.bytes() == bytes;
  for (std::int64_t t = prefill; t < x.dim(0); ++t) {
    const Tensor y = layer(x.matrix().rows_slice(t, 1), batched);
    a.insert(a.end(), y.values().begin(), y.values().end());
    constant = constant && batched.bytes() == bytes;
  }
  for (std::int64_t t = 0; t < x.dim(0); ++t) {
    const Tensor y = layer(x.matrix().rows_slice(t, 1), stepped);
    b.insert(b.end(), y.values().begin(), y.values().end());
  }
  return {af::max_abs_diff(std::span<const float>(a), std::span<const float>(b)), constant};
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Chapter 14: the delta rule", "ch14_delta_rule"};
  std::int64_t seq_len = 150, decode_steps = 5, heads = 2, key_dim = 16, value_dim = 12, chunk = 64;
  std::int64_t recall_dim = 64, max_pairs = 1024, trials = 3;
  std::uint64_t seed = 14;
  std::string out_dir;
  app.add_option("--seq-len", seq_len, "Prefill tokens T of the rule and layer checks")
      ->check(CLI::Range(1, 2048))
      ->capture_default_str();
  app.add_option("--decode-steps", decode_steps, "Tokens decoded one at a time after the prefill")
      ->check(CLI::Range(0, 256))
      ->capture_default_str();
  app.add_option("--heads", heads, "Heads H of the rule checks")->check(CLI::Range(1, 16))->capture_default_str();
  app.add_option("--key-dim", key_dim, "Key dimension d_k (also the layers' head size)")
      ->check(CLI::Range(2, 128))
      ->capture_default_str();
  app.add_option("--value-dim", value_dim, "Value dimension d_v")->check(CLI::Range(1, 128))->capture_default_str();
  app.add_option("--chunk", chunk, "Chunk size C of the chunked prefill (Qwen3-Next and Kimi Linear: 64)")
      ->check(CLI::Range(1, 512))
      ->capture_default_str();
  app.add_option("--recall-dim", recall_dim, "Key and value dimension d of the recall experiment")
      ->check(CLI::Range(32, 128))
      ->capture_default_str();
  app.add_option("--max-pairs", max_pairs, "Largest number of key -> value pairs in the recall sweep")
      ->check(CLI::Range(256, 4096))
      ->capture_default_str();
  app.add_option("--trials", trials, "Random inputs per point of the recall sweep")
      ->check(CLI::Range(1, 12))
      ->capture_default_str();
  app.add_option("--seed", seed, "Seed of the random weights and inputs")
      ->check(af::seed_value())
      ->capture_default_str();
  app.add_option("--out", out_dir,
                 "Directory for the figure data (cache_bytes.dat, recall.dat, recall_age.dat) "
                 "and numbers.json")
      ->check(af::output_directory());

  return af::run_program(app, argc, argv, [&] {
    // The recall sweep's claims hold in a regime: the sweep must reach 8 d pairs for linear attention to lose
    // most of them, and softmax keeps its keys apart while n << e^sqrt(d).
    af::require(max_pairs >= 8 * recall_dim,
                "--max-pairs {} is below 8 x --recall-dim {} = {} (expected a sweep long enough for a d x d state to "
                "lose pairs)",
                max_pairs, recall_dim, 8 * recall_dim);
    af::require_product_within(
        {{"--trials", trials}, {"--max-pairs", max_pairs}, {"--max-pairs", max_pairs}, {"--recall-dim", recall_dim}},
        std::int64_t{3} * 4096 * 4096 * 128);
    af::require_product_within({{"--seq-len + --decode-steps", seq_len + decode_steps},
                                {"--heads", heads},
                                {"--key-dim", key_dim},
                                {"--value-dim", value_dim},
                                {"--chunk", chunk}},
                               std::int64_t{1} << 32);
    af::Checks checks;
    af::BookNumbers numbers;
    const std::int64_t total = seq_len + decode_steps;

    // 1. The rule three ways: float64 steps (above), the library's recurrence, and its chunked form, whose
    //    prefill here ends mid-chunk; decode steps continue from the chunked state.
    fmt::print(
        "The gated delta rule: H = {} heads, d_k = {}, d_v = {}; prefill T = {} ({} chunks of {} + {}), then "
        "{} decode steps\n",
        heads, key_dim, value_dim, seq_len, seq_len / chunk, chunk, seq_len % chunk, decode_steps);
    af::Rng rng(seed);
    for (const bool per_channel : {false, true}) {
      const char* gate = per_channel ? "per-channel decay (KDA)" : "per-head decay (Gated DeltaNet)";
      const af::DeltaRuleInputs in = random_rule_inputs(rng, total, heads, key_dim, value_dim, per_channel);
      std::vector<State> want_states;
      const std::vector<double> want = rule64(in, want_states);
      double scale = 1.0;
      for (const double y : want) scale = af::worse(scale, std::abs(y));
      const double tolerance = 1e-5 * scale;
      Tensor s_rec = af::delta_rule_initial_state(heads, key_dim, value_dim);
      const Tensor rec = af::delta_rule_recurrent(in, s_rec);
      // [prefill-then-decode]
      Tensor s_chunk = af::delta_rule_initial_state(heads, key_dim, value_dim);
      const Tensor pre = af::delta_rule_chunked(steps_of(in, 0, seq_len), s_chunk, chunk);
      std::vector<float> chunked(pre.values().begin(), pre.values().end());
      for (std::int64_t t = seq_len; t < total; ++t) {
        const Tensor o = af::delta_rule_recurrent(steps_of(in, t, 1), s_chunk);
        chunked.insert(chunked.end(), o.values().begin(), o.values().end());
      }
      // [/prefill-then-decode]
      checks.expect_close(fmt::format("{}: recurrence vs float64", gate), af::max_abs_diff(rec.values(), want),
                          tolerance);
      checks.expect_close(fmt::format("{}: chunked prefill + decode vs float64", gate),
                          af::max_abs_diff(std::span<const float>(chunked), want), tolerance);
      checks.expect_close(fmt::format("{}: final state, chunked + decode vs float64", gate),
                          state_diff(s_chunk, want_states), tolerance);
      // Every chunk size gives the same outputs: 1 is the recurrence written as chunks, T one chunk.
      double worst_chunk = 0;
      for (const std::int64_t c : {std::int64_t{1}, std::int64_t{7}, std::int64_t{16}, total}) {
        Tensor s = af::delta_rule_initial_state(heads, key_dim, value_dim);
        worst_chunk = af::worse(worst_chunk, af::max_abs_diff(af::delta_rule_chunked(in, s, c).values(), want));
      }
      checks.expect_close(fmt::format("{}: chunks of 1, 7, 16 and {} vs float64", gate, total), worst_chunk, tolerance);
    }

    // 2. What the correction buys: write k -> v1 and then k -> v2 with a unit key and beta = 1. The delta rule
    //    reads v2; linear attention's sum reads v1 + v2.
    {
      const std::int64_t d = key_dim;
      Tensor k = af::random_normal(Shape{1, d}, rng);
      normalise_rows(k, d);
      const Tensor v1 = af::random_normal(Shape{1, d}, rng), v2 = af::random_normal(Shape{1, d}, rng);
      State delta(static_cast<std::size_t>(d), std::vector<double>(static_cast<std::size_t>(d), 0.0)), sum = delta;
      const std::vector<double> no_decay(static_cast<std::size_t>(d), 0.0);
      for (const Tensor* v : {&v1, &v2}) {
        delta_step(delta, no_decay, k.values(), v->values(), 1.0);
        for (std::int64_t c = 0; c < d; ++c)
          for (std::int64_t j = 0; j < d; ++j) sum[c][j] += double{k.values()[c]} * v->values()[j];
      }
      const std::vector<double> read_delta = read_out(delta, k.values()), read_sum = read_out(sum, k.values());
      double delta_err = 0, sum_err = 0, sum_from_v1_v2 = 0;
      for (std::int64_t j = 0; j < d; ++j) {
        delta_err = af::worse(delta_err, std::abs(read_delta[j] - v2.values()[j]));
        sum_err = af::worse(sum_err, std::abs(read_sum[j] - v2.values()[j]));
        sum_from_v1_v2 = af::worse(sum_from_v1_v2, std::abs(read_sum[j] - v1.values()[j] - v2.values()[j]));
      }
      fmt::print(
          "\nOverwriting k -> v1 by k -> v2 (unit k, beta = 1): the delta rule reads v2 to {:.1e}; the "
          "additive state reads v1 + v2 (off v2 by {:.2f})\n",
          delta_err, sum_err);
      checks.expect_close("a delta-rule write replaces: k reads v2", delta_err, 1e-6);
      checks.expect_close("an additive write accumulates: k reads v1 + v2", sum_from_v1_v2, 1e-6);
    }

    // 3. The layers: prefill (chunked) then decode (recurrence) equals decoding every token; the cache is the
    //    convolution's last inputs and the state, the same bytes at every step.
    fmt::print("\nLayers: a prefill of {} tokens (chunks of {}) and {} decode steps vs {} decode steps\n", seq_len,
               chunk, decode_steps, total);
    {
      const SmallGdn gdn = small_gdn(rng, key_dim, value_dim);
      const Tensor x = af::random_normal(Shape{total, 48}, rng);
      const auto run = [&](af::ConstMatrix rows, af::GatedDeltaNetCache& cache) {
        return af::gated_deltanet(rows, gdn.shape, gdn.weights, cache, chunk);
      };
      const auto [diff, constant] =
          prefill_then_decode(x, seq_len, af::GatedDeltaNetCache(gdn.shape), af::GatedDeltaNetCache(gdn.shape), run);
      const af::GatedDeltaNetCache cache(gdn.shape);
      fmt::print(
          "  Gated DeltaNet (Hk = 2, Hv = 4): cache = conv inputs [{}, {}] + state [4, {}, {}] = {} bytes "
          "(fp32) at every step; max |prefill+decode - decode| = {:.2e}\n",
          cache.conv_inputs.dim(0), cache.conv_inputs.dim(1), key_dim, value_dim, cache.bytes(), diff);
      checks.expect_close("Gated DeltaNet: prefill + decode vs token-by-token decode", diff, 1e-5);
      checks.expect_true("Gated DeltaNet: the cache's bytes are the same at every step", constant);
      // The convolution's inputs are cache, not scratch: a decode step that forgets them (zeros, as at the start
      // of a sequence) gives another output.
      af::GatedDeltaNetCache kept(gdn.shape);
      run(x.matrix().rows_slice(0, seq_len), kept);
      af::GatedDeltaNetCache forgot = kept;
      std::ranges::fill(forgot.conv_inputs.values(), 0.0f);
      const Tensor with = run(x.matrix().rows_slice(seq_len, 1), kept);
      const Tensor without = run(x.matrix().rows_slice(seq_len, 1), forgot);
      const double conv_effect = af::max_abs_diff(with.values(), without.values()),
                   out_scale = af::max_abs(with.values());
      fmt::print(
          "  a decode step with the convolution's inputs zeroed moves the output by {:.3f} (outputs up to "
          "{:.3f})\n",
          conv_effect, out_scale);
      checks.expect_true("Gated DeltaNet: the convolution's cached inputs change the next output",
                         conv_effect > 1e-3 * out_scale);
      numbers.print("gdn_cache_bytes", "{}", cache.bytes());
      numbers.print("conv_effect_percent", "{:.0f}", 100.0 * conv_effect / out_scale);

      const SmallKda kda = small_kda(rng, key_dim);
      const auto run_kda = [&](af::ConstMatrix rows, af::KimiDeltaCache& c) {
        return af::kimi_delta_attention(rows, kda.shape, kda.weights, c, chunk);
      };
      const auto [kda_diff, kda_constant] =
          prefill_then_decode(x, seq_len, af::KimiDeltaCache(kda.shape), af::KimiDeltaCache(kda.shape), run_kda);
      const af::KimiDeltaCache kda_cache(kda.shape);
      fmt::print(
          "  Kimi Delta Attention (H = 3): cache = conv inputs [{}, {}] + state [3, {}, {}] = {} bytes; max "
          "|prefill+decode - decode| = {:.2e}\n",
          kda_cache.conv_inputs.dim(0), kda_cache.conv_inputs.dim(1), key_dim, key_dim, kda_cache.bytes(), kda_diff);
      checks.expect_close("KDA: prefill + decode vs token-by-token decode", kda_diff, 1e-5);
      checks.expect_true("KDA: the cache's bytes are the same at every step", kda_constant);
    }

    // 4. The hybrid stacks' cards.
    // [hybrid-cards]
    const af::HybridModel qwen = af::qwen3_next_80b_a3b(), kimi = af::kimi_linear_48b_a3b(), m1 = af::minimax_m1();
    const af::ModelCache llama70 = af::dense_model("Llama-3.1-70B").cache();
    const std::vector<std::int64_t> contexts{4096, 131072, 1048576};
    fmt::print("\n{}", af::format_hybrid_card(qwen, std::span(&llama70, 1), contexts));
    fmt::print("\n{}", af::format_hybrid_card(kimi, {}, contexts));
    // [/hybrid-cards]
    fmt::print("\nOne sequence, bf16 (stored = states + cache; read = what one decode step reads):\n");
    fmt::print("  {:<20} {:>11} {:>10} {:>11} {:>11} {:>11} {:>11}\n", "model", "states", "cache/tok", "stored 4K",
               "stored 128K", "stored 1M", "read 1M");
    const auto bytes_text = [](std::int64_t b) { return af::human_bytes(static_cast<double>(b)); };
    for (const af::HybridModel* m : {&qwen, &kimi, &m1})
      fmt::print("  {:<20} {:>11} {:>10} {:>11} {:>11} {:>11} {:>11}\n", m->model, bytes_text(m->state_bytes()),
                 m->softmax.bytes_per_token(), bytes_text(m->bytes_stored(4096)), bytes_text(m->bytes_stored(131072)),
                 bytes_text(m->bytes_stored(1 << 20)), bytes_text(m->bytes_read(1 << 20)));
    fmt::print("  {:<20} {:>11} {:>10} {:>11} {:>11} {:>11} {:>11}\n", llama70.model, "-", llama70.bytes_per_token(),
               bytes_text(llama70.bytes_stored(4096)), bytes_text(llama70.bytes_stored(131072)),
               bytes_text(llama70.bytes_stored(1 << 20)), bytes_text(llama70.bytes_read(1 << 20)));
    const auto conv_share = [](const af::HybridModel& m) {
      return 100.0 * static_cast<double>((m.conv_kernel - 1) * m.conv_channels) /
             static_cast<double>(m.heads_with_state() * m.key_dim * m.value_dim +
                                 (m.conv_kernel - 1) * m.conv_channels);
    };
    fmt::print("  the convolution's inputs are {:.1f}% of a Gated DeltaNet layer's cache, {:.1f}% of a KDA layer's\n",
               conv_share(qwen), conv_share(kimi));
    // Where a hybrid's fixed states cost as much as its cache: the context at which the cache reaches the states.
    for (const af::HybridModel* m : {&qwen, &kimi, &m1})
      fmt::print("  {}: its cache reaches its states at t = {} tokens\n", m->model,
                 m->state_bytes() / m->softmax.bytes_per_token());
    numbers.set("qwen_states", bytes_text(qwen.state_bytes()));
    numbers.set("kimi_states", bytes_text(kimi.state_bytes()));
    numbers.set("m1_states", bytes_text(m1.state_bytes()));
    numbers.set("qwen_layer_state", af::with_thousands(qwen.layer_state_bytes()));
    numbers.set("kimi_layer_state", af::with_thousands(kimi.layer_state_bytes()));
    numbers.set("qwen_kv_per_token", af::with_thousands(qwen.softmax.bytes_per_token()));
    numbers.set("kimi_kv_per_token", af::with_thousands(kimi.softmax.bytes_per_token()));
    numbers.set("m1_kv_per_token", af::with_thousands(m1.softmax.bytes_per_token()));
    numbers.set("llama_kv_per_token", af::with_thousands(llama70.bytes_per_token()));
    numbers.print("qwen_conv_percent", "{:.1f}", conv_share(qwen));
    numbers.print("kimi_conv_percent", "{:.1f}", conv_share(kimi));
    for (const auto& [key, t] : {std::pair{"4k", 4096}, std::pair{"128k", 131072}, std::pair{"1m", 1 << 20}}) {
      numbers.set(fmt::format("qwen_stored_{}", key), bytes_text(qwen.bytes_stored(t)));
      numbers.set(fmt::format("kimi_stored_{}", key), bytes_text(kimi.bytes_stored(t)));
      numbers.set(fmt::format("m1_stored_{}", key), bytes_text(m1.bytes_stored(t)));
      numbers.set(fmt::format("llama_stored_{}", key), bytes_text(llama70.bytes_stored(t)));
    }
    numbers.print("qwen_over_llama_1m", "{:.1f}",
                  static_cast<double>(llama70.bytes_stored(1 << 20)) / static_cast<double>(qwen.bytes_stored(1 << 20)));
    numbers.print("kimi_over_llama_1m", "{:.0f}",
                  static_cast<double>(llama70.bytes_stored(1 << 20)) / static_cast<double>(kimi.bytes_stored(1 << 20)));
    numbers.print("qwen_meet", "{}", af::with_thousands(qwen.state_bytes() / qwen.softmax.bytes_per_token()));
    numbers.print("kimi_meet", "{}", af::with_thousands(kimi.state_bytes() / kimi.softmax.bytes_per_token()));

    // 5. Recall at one d x d state.
    // [recall-sweep]
    const double slope = af::lightning_slopes(64, 40, 80).back();  // chapter 13's decayed reader
    const std::int64_t d = recall_dim;
    fmt::print(
        "\nRecall of n keys at one state of d x d = {} x {} (mean of {} trials; up to 256 keys asked, spread "
        "from the oldest to the youngest)\n",
        d, d, trials);
    fmt::print("  decay (linear decay, gated delta): s = {:.5f} per write, half-life {:.0f} writes\n", slope,
               std::log(2.0) / slope);
    fmt::print("  {:>7} | {:>7} {:>7} {:>7} {:>7} {:>7} | update: {:>7} {:>7} {:>7} {:>7} {:>7}\n", "keys", "softmax",
               "linear", "lin dec", "delta", "gt dlt", "softmax", "linear", "lin dec", "delta", "gt dlt");
    // Per n: the plain task's five readers, then the update task's.
    std::vector<std::array<double, 11>> curve;
    // Recall by age at the longest plain sweep: age = writes after the asked one, in bins of d / 2.
    const std::int64_t age_bins = 2 * max_pairs / d;
    std::vector<std::array<double, 5>> by_age(static_cast<std::size_t>(age_bins), std::array<double, 5>{});
    std::vector<std::int64_t> age_count(static_cast<std::size_t>(age_bins), 0);
    af::Rng recall_rng(seed + 1);
    std::vector<std::int64_t> points;
    for (double n = 4; n < static_cast<double>(max_pairs) - 0.5; n *= std::sqrt(2.0)) points.push_back(std::lround(n));
    points.push_back(max_pairs);
    for (const std::int64_t n : points) {
      std::array<double, 11> row{static_cast<double>(n)};
      for (std::int64_t trial = 0; trial < trials; ++trial)
        for (const bool update : {false, true})
          for (std::size_t r = 0; r < readers.size(); ++r) {
            // Every key at the longest plain sweep (for recall by age), else at most 256 spread over the keys.
            const std::int64_t asked = !update && n == max_pairs ? n : std::min<std::int64_t>(n, 256);
            const std::vector<bool> right = recall(recall_rng, n, d, readers[r], slope, update, asked);
            row[1 + r + (update ? 5 : 0)] +=
                static_cast<double>(std::ranges::count(right, true)) / static_cast<double>(asked * trials);
            if (update || n != max_pairs) continue;
            for (std::int64_t j = 0; j < n; ++j) {
              const auto bin = static_cast<std::size_t>((n - 1 - j) * 2 / d);
              by_age[bin][r] += right[static_cast<std::size_t>(j)];
              if (r == 0) ++age_count[bin];
            }
          }
      fmt::print(
          "  {:>7} | {:>7.3f} {:>7.3f} {:>7.3f} {:>7.3f} {:>7.3f} |         {:>7.3f} {:>7.3f} {:>7.3f} "
          "{:>7.3f} {:>7.3f}\n",
          n, row[1], row[2], row[3], row[4], row[5], row[6], row[7], row[8], row[9], row[10]);
      curve.push_back(row);
    }
    // [/recall-sweep]
    const auto first_below = [&](std::size_t column, double level) -> std::int64_t {
      for (const auto& row : curve)
        if (row[column] < level) return static_cast<std::int64_t>(row[0]);
      return -1;
    };
    const auto at_keys = [&](std::size_t column, std::int64_t n) {
      for (const auto& row : curve)
        if (static_cast<std::int64_t>(row[0]) >= n) return row[column];
      return curve.back()[column];
    };
    double softmax_min = 1.0;
    for (const auto& row : curve) softmax_min = std::min(softmax_min, row[1]);
    fmt::print(
        "  plain: below 0.9 at n = {} (linear), {} (delta); below 0.5 at n = {} (linear), {} (delta); "
        "softmax never below {:.3f}\n",
        first_below(2, 0.9), first_below(4, 0.9), first_below(2, 0.5), first_below(4, 0.5), softmax_min);
    fmt::print("  recall by age at n = {} (age = writes since; bins of d/2 = {}):\n", max_pairs, d / 2);
    fmt::print("  {:>11} {:>9} {:>9} {:>13} {:>9} {:>12}\n", "age", "softmax", "linear", "linear decay", "delta",
               "gated delta");
    for (std::int64_t b = 0; b < age_bins; ++b) {
      auto& row = by_age[static_cast<std::size_t>(b)];
      for (double& x : row) x /= static_cast<double>(age_count[static_cast<std::size_t>(b)]);
      if (b < 6 || b % 8 == 7)
        fmt::print("  {:>5}-{:<5} {:>9.3f} {:>9.3f} {:>13.3f} {:>9.3f} {:>12.3f}\n", b * d / 2, (b + 1) * d / 2 - 1,
                   row[0], row[1], row[2], row[3], row[4]);
    }
    // Pairs younger than d / 2 and older than 2 d at the longest sweep.
    const auto mean_age = [&](std::size_t reader, std::int64_t from_bin, std::int64_t to_bin) {
      double sum = 0;
      std::int64_t count = 0;
      for (std::int64_t b = from_bin; b < to_bin; ++b) {
        sum +=
            by_age[static_cast<std::size_t>(b)][reader] * static_cast<double>(age_count[static_cast<std::size_t>(b)]);
        count += age_count[static_cast<std::size_t>(b)];
      }
      return sum / static_cast<double>(std::max<std::int64_t>(count, 1));
    };
    const double delta_young = mean_age(3, 0, 1), linear_young = mean_age(1, 0, 1);
    const double delta_old = mean_age(3, 4, age_bins), linear_old = mean_age(1, 4, age_bins);
    checks.expect_true("softmax attention keeps recall >= 0.9 on the plain task", softmax_min >= 0.9);
    checks.expect_true(fmt::format("linear attention's recall falls below 0.5 by n = {}", max_pairs),
                       first_below(2, 0.5) > 0);
    checks.expect_true(fmt::format("at n = {} the delta rule recalls the youngest d / 2 keys (>= 0.9) where linear "
                                   "attention does not (< 0.5)",
                                   max_pairs),
                       delta_young >= 0.9 && linear_young < 0.5);
    checks.expect_true(fmt::format("update task at n = d / 4 = {}: the delta rule answers the new value (>= 0.9), "
                                   "linear attention mostly not (< 0.7)",
                                   d / 4),
                       at_keys(9, d / 4) >= 0.9 && at_keys(7, d / 4) < 0.7);
    numbers.print("recall_dim", "{}", d);
    numbers.print("recall_trials", "{}", trials);
    numbers.print("max_pairs", "{}", max_pairs);
    numbers.print("half_life", "{:.0f}", std::log(2.0) / slope);
    numbers.print("linear_below_90", "{}", first_below(2, 0.9));
    numbers.print("delta_below_90", "{}", first_below(4, 0.9));
    numbers.print("linear_below_50", "{}", first_below(2, 0.5));
    numbers.print("delta_below_50", "{}", first_below(4, 0.5));
    numbers.print("linear_at_d", "{:.2f}", at_keys(2, d));
    numbers.print("delta_at_d", "{:.2f}", at_keys(4, d));
    numbers.print("linear_at_max", "{:.3f}", curve.back()[2]);
    numbers.print("delta_at_max", "{:.3f}", curve.back()[4]);
    numbers.print("delta_young", "{:.2f}", delta_young);
    numbers.print("linear_young", "{:.2f}", linear_young);
    numbers.print("delta_old", "{:.3f}", delta_old);
    numbers.print("linear_old", "{:.3f}", linear_old);
    numbers.print("softmax_min", "{:.3f}", softmax_min);
    numbers.print("update_quarter_d", "{}", d / 4);
    numbers.print("update_softmax", "{:.2f}", at_keys(6, d / 4));
    numbers.print("update_linear", "{:.2f}", at_keys(7, d / 4));
    numbers.print("update_delta", "{:.2f}", at_keys(9, d / 4));
    numbers.print("update_delta_below_50", "{}", first_below(9, 0.5));

    if (!out_dir.empty()) {
      const std::filesystem::path dir = af::make_output_directory(out_dir);
      numbers.write(dir);
      af::write_output_file(dir / "cache_bytes.dat", [&](af::OutputFile& out) {
        out.print("# bytes one sequence holds (bf16), states + cache\n");
        out.print("context \"{}\" \"{}\" \"{}\" \"{}\"\n", qwen.model, kimi.model, m1.model, llama70.model);
        for (std::int64_t t = 1024; t <= (std::int64_t{1} << 22); t *= 2)
          out.print("{} {} {} {} {}\n", t, qwen.bytes_stored(t), kimi.bytes_stored(t), m1.bytes_stored(t),
                    llama70.bytes_stored(t));
      });
      af::write_output_file(dir / "recall.dat", [&](af::OutputFile& out) {
        out.print("# d = {}, trials {}, decay slope {:.6g}; columns 2-6 the plain task, 7-11 the update task\n", d,
                  trials, slope);
        out.print(
            "keys softmax linear \"linear decay\" delta \"gated delta\" u_softmax u_linear u_linear_decay "
            "u_delta u_gated_delta\n");
        for (const auto& row : curve) out.print("{} {:.4f}\n", row[0], fmt::join(std::span(row).subspan(1), " "));
      });
      af::write_output_file(dir / "recall_age.dat", [&](af::OutputFile& out) {
        out.print("# n = {} keys, d = {}: recall by age (writes since), bins of d/2\n", max_pairs, d);
        out.print("age softmax linear \"linear decay\" delta \"gated delta\"\n");
        for (std::int64_t b = 0; b < age_bins; ++b) {
          const auto& row = by_age[static_cast<std::size_t>(b)];
          out.print("{} {:.4f} {:.4f} {:.4f} {:.4f} {:.4f}\n", (b + 0.5) * static_cast<double>(d) / 2, row[0], row[1],
                    row[2], row[3], row[4]);
        }
      });
    }
    return checks.all_passed();
  });
}
