// Chapter 09 — sink tokens.
//
// Two mechanisms that share the name. Kept sink tokens (StreamingLLM): the first S tokens stay in the cache
// for ever beside a rolling window of the W most recent ones, with RoPE positions either the tokens' original
// ones (keys cached rotated) or their slots in the cache (keys cached unrotated, rotated at read time).
// Learned sink logits (gpt-oss): one logit per query head joins the softmax denominator and takes
// probability mass without a value. Builds both from scratch, checks them against the library (af::sinks)
// and float64, prints the cache cards, measures attention mass on token 0 in a constructed situation with and
// without a sink, and what evicting token 0 does; writes the data of the chapter's figures.
//
//   build/bin/ch09_sink_tokens [--seq-len 40] [--sinks 4] [--window 8] [--heads 4] [--kv-heads 2]
//                              [--head-dim 8] [--seed 9] [--out DIR]

#include "af/error.hpp"
#include "af/linalg.hpp"
#include "af/models.hpp"
#include "af/program.hpp"
#include "af/random.hpp"
#include "af/rope.hpp"
#include "af/sinks.hpp"
#include "af/sliding_window.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <filesystem>
#include <limits>
#include <vector>

namespace {

using af::Shape;
using af::Tensor;

// [sink-mask]
// Key k is visible to query q iff k <= q and (k < S or q - k < W): the S sinks for ever, and the window.
bool sees(std::int64_t query, std::int64_t key, std::int64_t sinks, std::int64_t window) {
  return key <= query && (key < sinks || query - key < window);
}
// [/sink-mask]

// [sink-softmax]
// The learned sink: an extra column of logit `sink` in the softmax, dropped afterwards. The weights of the
// real keys then sum to 1 - p_sink; the sink has no value, so its share of the mass simply vanishes.
void softmax_with_sink(std::vector<double>& scores, double sink) {
  double top = sink, total = 0.0;
  for (const double s : scores) top = std::max(top, s);
  for (double& s : scores) total += (s = std::exp(s - top));  // exp(-inf) = 0 for a masked key
  total += std::exp(sink - top);                              // the extra column joins the denominator
  for (double& s : scores) s /= total;                        // ... and is dropped
}
// [/sink-softmax]

struct Dims {
  std::int64_t heads, kv_heads, head_dim;
};

// [kept-cache]
// The kept-sink cache: rows 0 .. S-1 hold the first S tokens for ever; rows S .. S+W-1 are a ring for the
// rest (token t >= S to row S + (t - S) mod W). Each row remembers its token's sequence index.
struct KeptSinkCache {
  std::int64_t sinks, window, width;
  std::vector<float> keys, values;
  std::vector<std::int64_t> token;  // -1 while empty
  std::int64_t seen = 0;

  KeptSinkCache(std::int64_t s, std::int64_t w, std::int64_t g_times_d)
      : sinks(s),
        window(w),
        width(g_times_d),
        keys(static_cast<std::size_t>((s + w) * g_times_d)),
        values(keys.size()),
        token(static_cast<std::size_t>(s + w), -1) {}

  void push(std::span<const float> k, std::span<const float> v) {
    const std::int64_t row = seen < sinks ? seen : sinks + (seen - sinks) % window;
    std::ranges::copy(k, keys.begin() + row * width);
    std::ranges::copy(v, values.begin() + row * width);
    token[static_cast<std::size_t>(row)] = seen++;
  }
};
// [/kept-cache]

// [decode-step]
// One decode query `q [H * d]` (its key and value already pushed) over every held row; `sink_logits` (one
// per head, or empty) join each head's softmax. Returns the context [H * d].
std::vector<float> attend_held(std::span<const float> q, const KeptSinkCache& cache, const Dims& dims,
                               std::span<const float> sink_logits) {
  const std::int64_t d = dims.head_dim, group = dims.heads / dims.kv_heads;
  std::vector<float> context(static_cast<std::size_t>(dims.heads * d), 0.0f);
  std::vector<double> w(cache.token.size());
  for (std::int64_t h = 0; h < dims.heads; ++h) {
    const std::int64_t g = h / group;
    for (std::size_t r = 0; r < w.size(); ++r) {
      w[r] = -std::numeric_limits<double>::infinity();
      if (cache.token[r] < 0) continue;
      double dot = 0.0;
      for (std::int64_t c = 0; c < d; ++c)
        dot += double{q[static_cast<std::size_t>(h * d + c)]} *
               cache.keys[r * static_cast<std::size_t>(cache.width) + static_cast<std::size_t>(g * d + c)];
      w[r] = dot / std::sqrt(static_cast<double>(d));
    }
    softmax_with_sink(w, sink_logits.empty() ? -std::numeric_limits<double>::infinity()
                                             : double{sink_logits[static_cast<std::size_t>(h)]});
    for (std::size_t r = 0; r < w.size(); ++r)
      for (std::int64_t c = 0; c < d; ++c)
        context[static_cast<std::size_t>(h * d + c)] += static_cast<float>(
            w[r] * cache.values[r * static_cast<std::size_t>(cache.width) + static_cast<std::size_t>(g * d + c)]);
  }
  return context;
}
// [/decode-step]

af::GroupedWeights random_weights(af::Rng& rng, const af::GroupedShape& s) {
  const double in = 1.0 / std::sqrt(static_cast<double>(s.hidden));
  return {af::random_normal(Shape{s.heads * s.head_dim, s.hidden}, rng, in),
          af::random_normal(Shape{s.kv_heads * s.head_dim, s.hidden}, rng, in),
          af::random_normal(Shape{s.kv_heads * s.head_dim, s.hidden}, rng, in),
          af::random_normal(Shape{s.hidden, s.heads * s.head_dim}, rng, in),
          {},
          {},
          {}};
}

// float64 attention of every token over all tokens under sees(S, W) and optional sink logits: the reference.
std::vector<std::vector<double>> reference64(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& o,
                                             const Dims& dims, std::int64_t sinks, std::int64_t window,
                                             std::span<const float> logits) {
  const std::int64_t n = q.dim(0), d = dims.head_dim, group = dims.heads / dims.kv_heads, hd = dims.heads * d;
  std::vector<std::vector<double>> out(static_cast<std::size_t>(n), std::vector<double>(o.dim(0) * 1, 0.0));
  for (std::int64_t i = 0; i < n; ++i) {
    std::vector<double> context(static_cast<std::size_t>(hd), 0.0);
    for (std::int64_t h = 0; h < dims.heads; ++h) {
      const std::int64_t g = h / group;
      std::vector<double> w(static_cast<std::size_t>(n), -std::numeric_limits<double>::infinity());
      for (std::int64_t j = 0; j < n; ++j) {
        if (!sees(i, j, sinks, window)) continue;
        double dot = 0.0;
        for (std::int64_t c = 0; c < d; ++c)
          dot += double{q.data()[i * hd + h * d + c]} * k.data()[j * dims.kv_heads * d + g * d + c];
        w[static_cast<std::size_t>(j)] = dot / std::sqrt(static_cast<double>(d));
      }
      softmax_with_sink(
          w, logits.empty() ? -std::numeric_limits<double>::infinity() : double{logits[static_cast<std::size_t>(h)]});
      for (std::int64_t j = 0; j < n; ++j)
        for (std::int64_t c = 0; c < d; ++c)
          context[static_cast<std::size_t>(h * d + c)] +=
              w[static_cast<std::size_t>(j)] * v.data()[j * dims.kv_heads * d + g * d + c];
    }
    for (std::int64_t r = 0; r < o.dim(0); ++r)
      for (std::int64_t c = 0; c < hd; ++c)
        out[static_cast<std::size_t>(i)][static_cast<std::size_t>(r)] +=
            context[static_cast<std::size_t>(c)] * o.data()[r * hd + c];
  }
  return out;
}

double diff64(const Tensor& got, const std::vector<std::vector<double>>& want) {
  double worst = 0.0;
  for (std::int64_t i = 0; i < got.dim(0); ++i)
    for (std::int64_t c = 0; c < got.dim(1); ++c)
      worst = af::worse(worst, std::abs(got.data()[i * got.dim(1) + c] - want[static_cast<std::size_t>(i)][c]));
  return worst;
}

// [constructed-sink]
// The situation the papers describe, built by hand (random weights do not produce it): every query shares a
// common direction u with weight `a`, and token 0's key is `b` u plus noise; the other keys are noise.
// With b > 0 the first token collects attention whatever its value; with b = 0 nothing singles it out.
// Returns per query t the attention mass on token 0 (one head, full causal attention over t + 1 keys), and
// the keys, queries and values used.
struct Constructed {
  std::vector<std::vector<float>> q, k, v;
};
Constructed construct(af::Rng& rng, std::int64_t n, std::int64_t d, double a, double b) {
  std::vector<float> u(static_cast<std::size_t>(d));
  double norm = 0.0;
  for (float& x : u) {
    x = static_cast<float>(rng.normal());
    norm += double{x} * x;
  }
  for (float& x : u) x = static_cast<float>(x / std::sqrt(norm));
  Constructed c;
  for (std::int64_t t = 0; t < n; ++t) {
    std::vector<float> q(static_cast<std::size_t>(d)), k(q), v(q);
    for (std::size_t i = 0; i < q.size(); ++i) {
      q[i] = static_cast<float>(rng.normal() + a * u[i]);
      k[i] = static_cast<float>(rng.normal() + (t == 0 ? b * u[i] : 0.0));
      v[i] = static_cast<float>(rng.normal());
    }
    c.q.push_back(q), c.k.push_back(k), c.v.push_back(v);
  }
  return c;
}
// [/constructed-sink]

// Single-head attention of query t over the keys `keep(t, j)` selects, with an optional sink logit; returns
// the mass on token 0 and the output vector.
template <class Keep>
std::pair<double, std::vector<double>> attend_one(const Constructed& c, std::int64_t t, Keep keep, double sink) {
  const std::size_t d = c.q[0].size();
  std::vector<double> w(static_cast<std::size_t>(t + 1), -std::numeric_limits<double>::infinity());
  for (std::int64_t j = 0; j <= t; ++j)
    if (keep(t, j)) {
      double dot = 0.0;
      for (std::size_t i = 0; i < d; ++i)
        dot += double{c.q[static_cast<std::size_t>(t)][i]} * c.k[static_cast<std::size_t>(j)][i];
      w[static_cast<std::size_t>(j)] = dot / std::sqrt(static_cast<double>(d));
    }
  softmax_with_sink(w, sink);
  std::vector<double> out(d, 0.0);
  for (std::int64_t j = 0; j <= t; ++j)
    for (std::size_t i = 0; i < d; ++i) out[i] += w[static_cast<std::size_t>(j)] * c.v[static_cast<std::size_t>(j)][i];
  return {w[0], out};
}

// [needle]
// Where it fails: the last of n tokens queries q; the key at `needle` is planted as 3 q, the others are random.
// Returns the weight the query gives the needle when it sees key j iff visible(j), in float64.
template <class Visible>
double needle_weight(af::Rng& rng, std::int64_t n, std::int64_t needle, std::int64_t d, Visible visible) {
  const Tensor q = af::random_normal(Shape{1, d}, rng), keys = af::random_normal(Shape{n, d}, rng);
  std::vector<double> w(static_cast<std::size_t>(n), -std::numeric_limits<double>::infinity());
  for (std::int64_t j = 0; j < n; ++j) {
    if (!visible(j)) continue;
    double dot = 0.0;
    for (std::int64_t c = 0; c < d; ++c)
      dot += double{q.data()[c]} * (j == needle ? 3.0 * double{q.data()[c]} : double{keys.matrix()(j, c)});
    w[static_cast<std::size_t>(j)] = dot / std::sqrt(static_cast<double>(d));
  }
  softmax_with_sink(w, -std::numeric_limits<double>::infinity());  // no sink logit: a plain softmax
  return w[static_cast<std::size_t>(needle)];
}
// [/needle]

double distance(const std::vector<double>& a, const std::vector<double>& b) {
  double worst = 0.0;
  for (std::size_t i = 0; i < a.size(); ++i) worst = af::worse(worst, std::abs(a[i] - b[i]));
  return worst;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Chapter 09: sink tokens", "ch09_sink_tokens"};
  std::int64_t seq_len = 40, sinks = 4, window = 8, heads = 4, kv_heads = 2, head_dim = 8;
  std::uint64_t seed = 9;
  std::string out_dir;
  app.add_option("--seq-len", seq_len, "Tokens of the run, fed one by one through the cache")
      ->check(CLI::Range(1, 512))
      ->capture_default_str();
  app.add_option("--sinks", sinks, "Kept sink tokens S")->check(CLI::Range(0, 512))->capture_default_str();
  app.add_option("--window", window, "Window W of recent tokens, the query itself included")
      ->check(CLI::Range(1, 512))
      ->capture_default_str();
  app.add_option("--heads", heads, "Query heads H")->check(CLI::Range(1, 64))->capture_default_str();
  app.add_option("--kv-heads", kv_heads, "KV heads G (H divisible by G)")
      ->check(CLI::Range(1, 64))
      ->capture_default_str();
  app.add_option("--head-dim", head_dim, "Head dimension d (even)")->check(CLI::Range(2, 128))->capture_default_str();
  app.add_option("--seed", seed, "Seed of the random weights and inputs")
      ->check(af::seed_value())
      ->capture_default_str();
  app.add_option("--out", out_dir,
                 "Directory for the figure data (sink_mask.dat, first_token_mass.dat) and numbers.json")
      ->check(af::output_directory());

  return af::run_program(app, argc, argv, [&] {
    // hidden = H x d: the projections cost T x (H d)^2, the attention T x T x H x d; each stays within seconds.
    const std::int64_t width = heads * head_dim;
    af::require_product_within({{"--seq-len", seq_len}, {"(--heads x --head-dim)^2", width * width}}, 1 << 24);
    af::require_product_within(
        {{"--seq-len", seq_len}, {"--seq-len", seq_len}, {"--heads", heads}, {"--head-dim", head_dim}}, 1 << 24);
    af::require(heads % kv_heads == 0, "--heads {} is not a multiple of --kv-heads {}", heads, kv_heads);
    af::require(head_dim % 2 == 0, "--head-dim {} is odd (expected an even head dimension: RoPE rotates pairs)",
                head_dim);
    const af::GroupedShape shape{heads * head_dim, heads, kv_heads, head_dim};
    const Dims dims{heads, kv_heads, head_dim};
    const std::int64_t hidden = shape.hidden;
    af::Rng rng(seed);
    const af::GroupedWeights w = random_weights(rng, shape);
    const af::Rope rope(head_dim, 10000.0, af::RopeLayout::half_split);
    const Tensor x = af::random_normal(Shape{seq_len, hidden}, rng);
    std::vector<float> logits(static_cast<std::size_t>(heads));
    for (float& l : logits) l = static_cast<float>(rng.normal());
    std::vector<std::int64_t> positions(static_cast<std::size_t>(seq_len));
    for (std::int64_t t = 0; t < seq_len; ++t) positions[static_cast<std::size_t>(t)] = t;

    fmt::print("Sink tokens: H = {} query heads, G = {} KV heads of d = {}, hidden {}; S = {} sinks, W = {}\n", heads,
               kv_heads, head_dim, hidden, sinks, window);
    fmt::print("  cache: K, V [min(t, S) + min(max(t - S, 0), W), G * d] <= [{}, {}]; learned sinks: [H] = [{}]\n\n",
               sinks + window, kv_heads * head_dim, heads);

    // From scratch: project and rotate (original positions), then decode every token through the kept cache,
    // once without and once with learned sink logits.
    Tensor q = af::linear(x.matrix(), w.q_proj.matrix()), k = af::linear(x.matrix(), w.k_proj.matrix());
    const Tensor v = af::linear(x.matrix(), w.v_proj.matrix());
    rope.rotate_rows(q.matrix(), positions);
    rope.rotate_rows(k.matrix(), positions);
    Tensor kept_ctx(Shape{seq_len, heads * head_dim}), learned_ctx(kept_ctx.shape());
    KeptSinkCache cache(sinks, window, kv_heads * head_dim);
    std::int64_t held_wrong = 0;
    for (std::int64_t t = 0; t < seq_len; ++t) {
      cache.push(k.matrix().row(t), v.matrix().row(t));
      for (const std::int64_t held : cache.token) held_wrong += held >= 0 && !sees(t, held, sinks, window);
      std::ranges::copy(attend_held(q.matrix().row(t), cache, dims, {}), kept_ctx.data() + t * heads * head_dim);
      std::ranges::copy(attend_held(q.matrix().row(t), cache, dims, logits), learned_ctx.data() + t * heads * head_dim);
      if (t < 3 || t == seq_len - 1 || t == sinks + window)
        fmt::print("  t = {:>3}: rows hold tokens [{}]\n", t, fmt::join(cache.token, " "));
    }
    const Tensor kept = af::linear(kept_ctx.matrix(), w.o_proj.matrix());
    const Tensor learned = af::linear(learned_ctx.matrix(), w.o_proj.matrix());

    // The library: decode one by one, a whole prefill, positions by slot; float64 references.
    const auto lib_run = [&](std::int64_t s, std::int64_t win, std::span<const float> l, bool one_by_one) {
      af::SinkKvCache c(s, win, kv_heads, head_dim);
      Tensor out(Shape{seq_len, hidden});
      const std::int64_t step = one_by_one ? 1 : seq_len;
      for (std::int64_t t = 0; t < seq_len; t += step) {
        const Tensor y = af::sink_attention(x.matrix().rows_slice(t, step),
                                            std::span(positions).subspan(static_cast<std::size_t>(t), step), shape, w,
                                            rope, {}, l, c);
        std::ranges::copy(y.values(), out.data() + t * hidden);
      }
      return out;
    };
    const Tensor lib_kept = lib_run(sinks, window, {}, true), lib_prefill = lib_run(sinks, window, {}, false);
    const Tensor lib_learned = lib_run(sinks, window, logits, true);
    const Tensor lib_dense_learned = lib_run(0, seq_len, logits, true);
    const auto f64_kept = reference64(q, k, v, w.o_proj, dims, sinks, window, {});
    const auto f64_learned = reference64(q, k, v, w.o_proj, dims, sinks, window, logits);
    const auto f64_dense_learned = reference64(q, k, v, w.o_proj, dims, 0, seq_len, logits);
    double scale = 1.0;
    for (const auto& row : f64_kept)
      for (const double y : row) scale = af::worse(scale, std::abs(y));

    // [slot-positions]
    // Positions by cache slot: keys cached unrotated; at step t the held keys, in sequence order, get
    // positions 0 .. n-1 and the query position n - 1. No position exceeds S + W - 1.
    const Tensor raw_q = af::linear(x.matrix(), w.q_proj.matrix()), raw_k = af::linear(x.matrix(), w.k_proj.matrix());
    Tensor slot_ctx(Shape{seq_len, heads * head_dim});
    std::int64_t max_slot_position = 0;
    for (std::int64_t t = 0; t < seq_len; ++t) {
      std::vector<std::int64_t> kept_tokens;
      for (std::int64_t j = 0; j <= t; ++j)
        if (sees(t, j, sinks, window)) kept_tokens.push_back(j);
      KeptSinkCache rotated(static_cast<std::int64_t>(kept_tokens.size()), 1, kv_heads * head_dim);
      for (std::size_t r = 0; r < kept_tokens.size(); ++r) {
        std::vector<float> key(raw_k.matrix().row(kept_tokens[r]).begin(), raw_k.matrix().row(kept_tokens[r]).end());
        for (std::int64_t g = 0; g < kv_heads; ++g)
          rope.rotate(
              std::span(key).subspan(static_cast<std::size_t>(g * head_dim), static_cast<std::size_t>(head_dim)),
              static_cast<double>(r));
        rotated.push(key, v.matrix().row(kept_tokens[r]));
      }
      std::vector<float> query(raw_q.matrix().row(t).begin(), raw_q.matrix().row(t).end());
      const auto own = static_cast<std::int64_t>(kept_tokens.size()) - 1;
      for (std::int64_t h = 0; h < heads; ++h)
        rope.rotate(
            std::span(query).subspan(static_cast<std::size_t>(h * head_dim), static_cast<std::size_t>(head_dim)),
            static_cast<double>(own));
      max_slot_position = std::max(max_slot_position, own);
      std::ranges::copy(attend_held(query, rotated, dims, {}), slot_ctx.data() + t * heads * head_dim);
    }
    // [/slot-positions]
    const Tensor slot = af::linear(slot_ctx.matrix(), w.o_proj.matrix());
    af::SinkKvCache slot_cache(sinks, window, kv_heads, head_dim);
    const Tensor lib_slot = af::sink_attention_slot_positions(x.matrix(), shape, w, rope, {}, slot_cache);

    fmt::print("\n");
    af::Checks checks;
    const double tolerance = 1e-5 * scale;
    checks.expect_close("kept sinks: from scratch vs lib/ (decode one by one)",
                        af::max_abs_diff(kept.values(), lib_kept.values()), tolerance);
    checks.expect_close("kept sinks: from scratch vs float64 (sink + window mask)", diff64(kept, f64_kept), tolerance);
    checks.expect_close("kept sinks: lib/ prefill vs decode one token at a time",
                        af::max_abs_diff(lib_prefill.values(), lib_kept.values()), tolerance);
    checks.expect_true("the cache holds exactly the tokens the query sees (its S + W rows)", held_wrong == 0);
    checks.expect_close("learned sinks + window: from scratch vs lib/",
                        af::max_abs_diff(learned.values(), lib_learned.values()), tolerance);
    checks.expect_close("learned sinks + window: lib/ vs float64 (extra column)", diff64(lib_learned, f64_learned),
                        tolerance);
    checks.expect_close("learned sinks, dense layer: lib/ vs float64", diff64(lib_dense_learned, f64_dense_learned),
                        tolerance);
    checks.expect_close("positions by slot: from scratch vs lib/", af::max_abs_diff(slot.values(), lib_slot.values()),
                        tolerance);
    checks.expect_true(
        fmt::format("positions by slot stay <= S + W - 1 = {} (max used {}); original positions reach {}",
                    sinks + window - 1, max_slot_position, seq_len - 1),
        max_slot_position <= sinks + window - 1);
    if (seq_len > sinks + window)
      fmt::print("  the two position schemes differ once the window slides: max |original - slot| = {:.3g}\n",
                 af::max_abs_diff(lib_kept.values(), lib_slot.values()));

    // [cache-cards]
    // Kept sinks on Llama-2-7B's layer (one of the models StreamingLLM streamed, with 4 sinks): the card of chapter 04,
    // bounded at S + W rows. gpt-oss: the learned sinks are parameters (64 per layer), not cache: the card is chapter
    // 08's.
    const std::int64_t card_sinks = 4, card_window = 2044;
    af::ModelCache llama2 = af::dense_model("Llama-2-7B").cache();
    llama2.card = af::with_kept_sinks(llama2.card, card_sinks, card_window);
    const std::vector<std::int64_t> contexts{1024, 4096, 32768};
    fmt::print("\n{}", af::format_cache_card(llama2.card, std::span(&llama2, 1), contexts));
    const af::InterleavedModel gpt_oss = af::gpt_oss_120b();
    fmt::print("\n{}", af::format_cache_card(gpt_oss.parts[0].card, gpt_oss.parts, contexts));
    // [/cache-cards]
    const std::int64_t gpt_oss_layers = gpt_oss.parts[0].layers + gpt_oss.parts[1].layers, gpt_oss_heads = 64;
    const std::int64_t sink_parameters = gpt_oss_layers * gpt_oss_heads;
    fmt::print("  learned sinks of gpt-oss-120b: {} layers x {} heads = {} parameters ({}), no cache bytes:\n",
               gpt_oss_layers, gpt_oss_heads, sink_parameters,
               af::human_bytes(static_cast<double>(sink_parameters) * 2));
    af::BookNumbers numbers;
    numbers.set("gpt_oss_sink_parameters", af::with_thousands(sink_parameters));
    numbers.set("card_rows", af::with_thousands(card_sinks + card_window));
    for (const std::int64_t t : contexts)
      fmt::print("    context {:>6}: cache {} (banded + dense layers, the same with or without sinks)\n", t,
                 af::human_bytes(static_cast<double>(gpt_oss.bytes_stored(t))));

    // Why attention piles onto early tokens: measured in a constructed situation.
    const std::int64_t n = std::max<std::int64_t>(seq_len, 2);
    // One draw of random vectors is an anecdote: every number below is a mean over `draws` independent draws
    // (seeds seed + 1, seed + 2, ...), given with a 95 % interval (mean +- 1.96 standard errors).
    constexpr int draws = 32;
    const auto all = [](std::int64_t, std::int64_t) { return true; };
    const double no_sink = -std::numeric_limits<double>::infinity(), learned_logit = 3.0;
    fmt::print(
        "\nAttention mass on token 0 (one head, d = {}, causal, no window), mean over queries t >= 1;\n"
        "mean and 95 % interval over {} draws:\n",
        head_dim, draws);
    // Per draw: the mass on token 0 (random, aligned, aligned with a learned sink), then the mean |output - full|
    // of the random and the aligned head under a window only and under token 0 + window.
    enum Measure { mass_plain, mass_aligned, mass_learned, window_plain, sinks_plain, window_aligned, sinks_aligned };
    std::vector<std::array<double, 7>> per_draw;
    std::vector<std::array<double, 4>> curve(static_cast<std::size_t>(n - 1), std::array<double, 4>{});
    double uniform = 0.0;
    for (std::int64_t t = 1; t < n; ++t) uniform += 1.0 / static_cast<double>((t + 1) * (n - 1));
    for (int draw = 0; draw < draws; ++draw) {
      af::Rng crng(seed + 1 + static_cast<std::uint64_t>(draw));
      const Constructed plain = construct(crng, n, head_dim, 2.0, 0.0);
      af::Rng crng2(seed + 1 + static_cast<std::uint64_t>(draw));
      const Constructed aligned = construct(crng2, n, head_dim, 2.0, 3.0);
      std::array<double, 7> m{};
      for (std::int64_t t = 1; t < n; ++t) {
        const auto [m_plain, o_plain] = attend_one(plain, t, all, no_sink);
        const auto [m_aligned, o_full] = attend_one(aligned, t, all, no_sink);
        const auto [m_learned, o_learned] = attend_one(aligned, t, all, learned_logit);
        const double per = 1.0 / static_cast<double>(n - 1);
        m[mass_plain] += per * m_plain, m[mass_aligned] += per * m_aligned, m[mass_learned] += per * m_learned;
        const auto at = static_cast<std::size_t>(t - 1);
        curve[at] = {static_cast<double>(t), curve[at][1] + m_plain / draws, curve[at][2] + m_aligned / draws,
                     curve[at][3] + m_learned / draws};
        // [evict]
        // A window cache evicts token 0 once t >= W; a kept-sink cache (S = 1 here) keeps it. Each is compared
        // with full causal attention, in the plain and in the constructed case.
        const auto window_only = [&](std::int64_t q, std::int64_t j) { return sees(q, j, 0, window); };
        const auto sink_and_window = [&](std::int64_t q, std::int64_t j) { return sees(q, j, 1, window); };
        m[window_plain] += per * distance(attend_one(plain, t, window_only, no_sink).second, o_plain);
        m[sinks_plain] += per * distance(attend_one(plain, t, sink_and_window, no_sink).second, o_plain);
        m[window_aligned] += per * distance(attend_one(aligned, t, window_only, no_sink).second, o_full);
        m[sinks_aligned] += per * distance(attend_one(aligned, t, sink_and_window, no_sink).second, o_full);
        // [/evict]
      }
      per_draw.push_back(m);
    }
    // Mean and half-width of the 95 % interval of column `c` over the draws.
    const auto interval = [&](std::size_t c) {
      double mean = 0.0, square = 0.0;
      for (const auto& m : per_draw) mean += m[c] / draws;
      for (const auto& m : per_draw) square += (m[c] - mean) * (m[c] - mean) / (draws - 1);
      return std::pair{mean, 1.96 * std::sqrt(square / draws)};
    };
    const auto shown = [&](std::size_t c) {
      const auto [mean, half] = interval(c);
      return fmt::format("{:.4f} +- {:.4f}", mean, half);
    };
    int aligned_wins = 0;
    for (const auto& m : per_draw) aligned_wins += m[mass_aligned] > m[mass_plain] ? 1 : 0;
    fmt::print("  random queries and keys (nothing constructed)            {}  (uniform would be ~ {:.4f})\n",
               shown(mass_plain), uniform);
    fmt::print("  queries share a direction u, token 0's key = 3 u + noise  {}  (above random in {} of {} draws)\n",
               shown(mass_aligned), aligned_wins, draws);
    fmt::print("  same, plus a learned sink logit of {:.1f} (no value)         {}  (the rest: on the sink)\n",
               learned_logit, shown(mass_learned));
    fmt::print(
        "\nEvicting token 0: mean over queries of max |output - full causal attention|, window W = {};\n"
        "mean and 95 % interval over {} draws\n",
        window, draws);
    fmt::print("  {:<34} {:>18} {:>18}\n", "", "window only", "token 0 + window");
    fmt::print("  {:<34} {:>18} {:>18}\n", "random (nothing constructed)", shown(window_plain), shown(sinks_plain));
    fmt::print("  {:<34} {:>18} {:>18}\n", "constructed: key 0 aligned", shown(window_aligned), shown(sinks_aligned));
    const auto [plain_mass, plain_half] = interval(mass_plain);
    const auto [aligned_mass, aligned_half] = interval(mass_aligned);
    checks.expect_true("the constructed direction moves attention onto token 0 (95 % intervals apart)",
                       aligned_mass - aligned_half > plain_mass + plain_half);

    // [retrieval]
    // A retrieval whose answer sits at position P of n tokens: visible to the window only when P is among the
    // last W, to the kept sinks also when P < S; everything between is gone from the cache.
    const std::int64_t n_needle = std::max<std::int64_t>(seq_len, sinks + 3 * window), last = n_needle - 1;
    std::vector<std::int64_t> needle_positions{0, sinks - 1, sinks, last - window, last - window + 1, last - 1};
    std::erase_if(needle_positions, [&](std::int64_t p) { return p < 0 || p > last; });
    std::sort(needle_positions.begin(), needle_positions.end());
    needle_positions.erase(std::unique(needle_positions.begin(), needle_positions.end()), needle_positions.end());
    fmt::print(
        "\nNeedle recall: weight the last query (position {}) gives a planted matching key at position P,\n"
        "mean of 200 inputs (S = {}, W = {})\n",
        last, sinks, window);
    fmt::print("  {:>5} {:<10} {:>12} {:>15} {:>10}\n", "P", "P lies in", "window only", "sinks + window", "dense");
    for (const std::int64_t p : needle_positions) {
      double only_window = 0.0, with_sinks = 0.0, dense = 0.0;
      for (int trial = 0; trial < 200; ++trial) {
        const std::uint64_t trial_seed = seed * 7919 + static_cast<std::uint64_t>(trial);
        af::Rng a(trial_seed), b(trial_seed), c(trial_seed);  // the same input for the three caches
        only_window += needle_weight(a, n_needle, p, head_dim,
                                     [&](std::int64_t j) { return af::in_sink_window(last, j, 0, window); }) /
                       200;
        with_sinks += needle_weight(b, n_needle, p, head_dim,
                                    [&](std::int64_t j) { return af::in_sink_window(last, j, sinks, window); }) /
                      200;
        dense += needle_weight(c, n_needle, p, head_dim, [](std::int64_t) { return true; }) / 200;
      }
      const bool in_window = last - p < window, in_sinks = p < sinks;
      fmt::print("  {:>5} {:<10} {:>12.4f} {:>15.4f} {:>10.4f}\n", p,
                 in_window  ? "window"
                 : in_sinks ? "sinks"
                            : "evicted",
                 only_window, with_sinks, dense);
    }
    // [/retrieval]

    if (!out_dir.empty()) {
      const std::filesystem::path dir = af::make_output_directory(out_dir);
      numbers.write(dir);
      af::write_output_file(dir / "sink_mask.dat", [&](af::OutputFile& mask) {
        const std::int64_t m = std::min<std::int64_t>(seq_len, 32);
        mask.print("# query key visible(1) or masked(NaN); S = {}, W = {}\n", sinks, window);
        for (std::int64_t i = 0; i < m; ++i) {
          for (std::int64_t j = 0; j < m; ++j)
            mask.print("{} {} {}\n", i, j, sees(i, j, sinks, window) ? (j < sinks ? "2" : "1") : "NaN");
          mask.print("\n");
        }
      });
      af::write_output_file(dir / "first_token_mass.dat", [&](af::OutputFile& mass) {
        mass.print(
            "query \"random (nothing constructed)\" \"constructed: key 0 aligned with queries\" "
            "\"constructed + learned sink logit 3\"\n");
        for (const auto& row : curve) mass.print("{} {:.6f} {:.6f} {:.6f}\n", row[0], row[1], row[2], row[3]);
      });
    }
    return checks.all_passed();
  });
}
