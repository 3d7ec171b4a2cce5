// Chapter 08 — sliding-window attention.
//
// Builds from scratch the window mask (a query sees itself and the W - 1 tokens before it, the edge of
// Mistral in Hugging Face transformers and of gpt-oss), a ring-buffer KV cache of W slots that writes token t
// to slot t mod W, a windowed prefill and decode through the ring. Checks them against the library
// (af::sliding_window_attention, af::RollingKvCache) and a float64 recomputation, the ring against a full
// cache under the window mask, prefill against decode, and the bounded bytes and reads. Prints the cache card
// of Mistral-7B and of two interleaved models (Gemma 3 27B, gpt-oss-120b); measures what a window cannot see
// and how stacking windowed layers extends the reach; writes the data of the chapter's figures.
//
//   build/bin/ch08_sliding_window [--seq-len 24] [--window 6] [--heads 4] [--kv-heads 2] [--head-dim 8]
//                                 [--seed 8] [--out DIR]

#include "af/sliding_window.hpp"
#include "af/error.hpp"
#include "af/linalg.hpp"
#include "af/models.hpp"
#include "af/program.hpp"
#include "af/random.hpp"
#include "af/rope.hpp"

#include <fmt/format.h>

#include <cmath>
#include <filesystem>
#include <limits>
#include <vector>

namespace {

using af::Shape;
using af::Tensor;

// [window-edge]
// Key k is visible to query q iff 0 <= q - k < W: the query itself and the W - 1 tokens before it.
// (transformers' Mistral: causal AND kv_idx > q_idx - sliding_window; gpt-oss: the same band.)
bool sees(std::int64_t query, std::int64_t key, std::int64_t window) { return key <= query && query - key < window; }
// [/window-edge]

// [ring-buffer]
// W slots of one token's keys and values each. Token t goes to slot t mod W, overwriting token t - W: the
// newest token that no query from t on can see. The slot remembers which token it holds.
struct Ring {
  std::int64_t window, width;       // W slots, G * d values per key (and per value)
  std::vector<float> keys, values;  // [W, G * d]
  std::vector<std::int64_t> token;  // the token each slot holds, -1 while empty
  std::int64_t seen = 0;            // tokens written so far

  Ring(std::int64_t w, std::int64_t g_times_d)
      : window(w),
        width(g_times_d),
        keys(static_cast<std::size_t>(w * g_times_d)),
        values(keys.size()),
        token(static_cast<std::size_t>(w), -1) {}

  // Writes the next token; returns the token it overwrote, or -1.
  std::int64_t push(std::span<const float> k, std::span<const float> v) {
    const std::size_t slot = static_cast<std::size_t>(seen % window), at = slot * static_cast<std::size_t>(width);
    const std::int64_t evicted = token[slot];
    std::ranges::copy(k, keys.begin() + static_cast<std::ptrdiff_t>(at));
    std::ranges::copy(v, values.begin() + static_cast<std::ptrdiff_t>(at));
    token[slot] = seen++;
    return evicted;
  }
  std::span<const float> key(std::int64_t slot, std::int64_t offset, std::int64_t d) const {
    return std::span(keys).subspan(static_cast<std::size_t>(slot * width + offset), static_cast<std::size_t>(d));
  }
  std::span<const float> value(std::int64_t slot, std::int64_t offset, std::int64_t d) const {
    return std::span(values).subspan(static_cast<std::size_t>(slot * width + offset), static_cast<std::size_t>(d));
  }
};
// [/ring-buffer]

// softmax(scale * q . k) over `keys`, mixing `values` into `out`: one head, one query.
void attend_head(std::span<const float> q, const std::vector<std::span<const float>>& keys,
                 const std::vector<std::span<const float>>& values, double scale, std::span<float> out) {
  std::vector<float> weights;
  for (const auto& k : keys) weights.push_back(static_cast<float>(af::dot(q, k) * scale));
  af::softmax(weights);
  std::ranges::fill(out, 0.0f);
  for (std::size_t j = 0; j < keys.size(); ++j) af::axpy(weights[j], values[j], out);
}

struct Dims {
  std::int64_t heads, kv_heads, d;
  std::int64_t kv_head_of(std::int64_t h) const { return h / (heads / kv_heads); }
};

// [windowed-prefill]
// A prompt of T tokens on an empty ring: each query attends over the prompt's own keys inside its window;
// then every key goes into the ring, and only the last W stay. (The ring cannot serve the prefill itself:
// with T > W its first queries need keys that the prompt's last tokens overwrite.)
Tensor windowed_prefill(const Tensor& q, const Tensor& k, const Tensor& v, const Dims& s, std::int64_t window,
                        Ring& ring) {
  const std::int64_t T = q.dim(0);
  const double scale = 1.0 / std::sqrt(static_cast<double>(s.d));
  Tensor context(Shape{T, s.heads * s.d});
  for (std::int64_t i = 0; i < T; ++i)
    for (std::int64_t h = 0; h < s.heads; ++h) {
      const std::int64_t kv = s.kv_head_of(h) * s.d;
      std::vector<std::span<const float>> keys, values;
      for (std::int64_t j = 0; j < T; ++j)
        if (sees(i, j, window)) {
          keys.push_back(k.matrix().row(j).subspan(static_cast<std::size_t>(kv), static_cast<std::size_t>(s.d)));
          values.push_back(v.matrix().row(j).subspan(static_cast<std::size_t>(kv), static_cast<std::size_t>(s.d)));
        }
      attend_head(q.matrix().row(i).subspan(static_cast<std::size_t>(h * s.d), static_cast<std::size_t>(s.d)), keys,
                  values, scale,
                  context.matrix().row(i).subspan(static_cast<std::size_t>(h * s.d), static_cast<std::size_t>(s.d)));
    }
  for (std::int64_t j = 0; j < T; ++j) ring.push(k.matrix().row(j), v.matrix().row(j));
  return context;
}
// [/windowed-prefill]

// [decode-through-ring]
// One decode step: the new token enters the ring first; the ring then holds exactly the min(t + 1, W) tokens
// that query t sees, in slot order (not token order once it has wrapped: softmax does not care about order).
// The key of a slot was rotated for its own token's position when it was written, so nothing is re-rotated.
std::vector<float> decode_through_ring(std::span<const float> q, std::span<const float> k, std::span<const float> v,
                                       const Dims& s, Ring& ring, std::int64_t& entries_read) {
  ring.push(k, v);
  const double scale = 1.0 / std::sqrt(static_cast<double>(s.d));
  std::vector<float> context(static_cast<std::size_t>(s.heads * s.d));
  entries_read = 0;
  for (std::int64_t slot = 0; slot < ring.window; ++slot)
    entries_read += ring.token[static_cast<std::size_t>(slot)] >= 0;
  for (std::int64_t h = 0; h < s.heads; ++h) {
    std::vector<std::span<const float>> keys, values;
    for (std::int64_t slot = 0; slot < entries_read; ++slot) {  // slots fill from 0; all are in the window
      keys.push_back(ring.key(slot, s.kv_head_of(h) * s.d, s.d));
      values.push_back(ring.value(slot, s.kv_head_of(h) * s.d, s.d));
    }
    attend_head(q.subspan(static_cast<std::size_t>(h * s.d), static_cast<std::size_t>(s.d)), keys, values, scale,
                std::span(context).subspan(static_cast<std::size_t>(h * s.d), static_cast<std::size_t>(s.d)));
  }
  return context;
}
// [/decode-through-ring]

// float64: projections, half-split RoPE and windowed attention over all tokens, written from the formulas.
std::vector<std::vector<double>> windowed_float64(const Tensor& x, const af::GroupedWeights& w, const Dims& s,
                                                  const af::Rope& rope, std::span<const std::int64_t> positions,
                                                  std::int64_t window) {
  const std::int64_t n = x.dim(0), hidden = x.dim(1), d = s.d;
  const auto project = [&](const Tensor& weight) {
    std::vector<std::vector<double>> y(static_cast<std::size_t>(n), std::vector<double>(weight.dim(0), 0.0));
    for (std::int64_t t = 0; t < n; ++t)
      for (std::int64_t o = 0; o < weight.dim(0); ++o)
        for (std::int64_t c = 0; c < weight.dim(1); ++c)
          y[t][o] += double{x.data()[t * hidden + c]} * weight.data()[o * weight.dim(1) + c];
    return y;
  };
  const auto rotate = [&](std::vector<std::vector<double>> y) {
    const auto theta = rope.inverse_frequencies();
    for (std::int64_t t = 0; t < n; ++t)
      for (std::size_t base = 0; base < y[t].size(); base += static_cast<std::size_t>(d))
        for (std::size_t i = 0; i < theta.size(); ++i) {
          const double a = static_cast<double>(positions[static_cast<std::size_t>(t)]) * theta[i];
          const double x0 = y[t][base + i], x1 = y[t][base + i + theta.size()];
          y[t][base + i] = x0 * std::cos(a) - x1 * std::sin(a);
          y[t][base + i + theta.size()] = x1 * std::cos(a) + x0 * std::sin(a);
        }
    return y;
  };
  const auto q = rotate(project(w.q_proj)), k = rotate(project(w.k_proj)), v = project(w.v_proj);
  std::vector<std::vector<double>> out(static_cast<std::size_t>(n), std::vector<double>(hidden, 0.0));
  for (std::int64_t i = 0; i < n; ++i) {
    std::vector<double> context(static_cast<std::size_t>(s.heads * d), 0.0);
    for (std::int64_t h = 0; h < s.heads; ++h) {
      const std::size_t qh = static_cast<std::size_t>(h * d), kv = static_cast<std::size_t>(s.kv_head_of(h) * d);
      std::vector<double> score(static_cast<std::size_t>(n), -std::numeric_limits<double>::infinity());
      double top = -std::numeric_limits<double>::infinity(), sum = 0.0;
      for (std::int64_t j = 0; j <= i; ++j) {
        if (!sees(i, j, window)) continue;
        double dot = 0.0;
        for (std::size_t c = 0; c < static_cast<std::size_t>(d); ++c) dot += q[i][qh + c] * k[j][kv + c];
        top = std::max(top, score[j] = dot / std::sqrt(static_cast<double>(d)));
      }
      for (std::int64_t j = 0; j <= i; ++j) sum += std::exp(score[j] - top);
      for (std::int64_t j = 0; j <= i; ++j)
        for (std::size_t c = 0; c < static_cast<std::size_t>(d); ++c)
          context[qh + c] += std::exp(score[j] - top) / sum * v[j][kv + c];
    }
    for (std::int64_t o = 0; o < hidden; ++o)
      for (std::int64_t c = 0; c < s.heads * d; ++c) out[i][o] += context[c] * w.o_proj.data()[o * s.heads * d + c];
  }
  return out;
}

af::GroupedWeights random_weights(af::Rng& rng, const af::GroupedShape& shape) {
  const std::int64_t hidden = shape.hidden, kvd = shape.kv_heads * shape.head_dim, qd = shape.heads * shape.head_dim;
  const double in = 1.0 / std::sqrt(static_cast<double>(hidden));
  return {af::random_normal(Shape{qd, hidden}, rng, in),
          af::random_normal(Shape{kvd, hidden}, rng, in),
          af::random_normal(Shape{kvd, hidden}, rng, in),
          af::random_normal(Shape{hidden, qd}, rng, 1.0 / std::sqrt(static_cast<double>(qd))),
          {},
          {},
          {}};
}

// [needle]
// Where it fails: random keys, and one planted key (the needle) that matches the last query strongly, D tokens
// before it. The weight the query gives the needle is how much of the needle's value it can retrieve.
double needle_weight(af::Rng& rng, std::int64_t distance, std::int64_t window, std::int64_t d) {
  const std::int64_t n = distance + 1 + rng.below(8);  // the query is the last token, n - 1
  const Tensor q = af::random_normal(Shape{1, d}, rng), keys = af::random_normal(Shape{n, d}, rng);
  const Tensor needle_key = [&] {
    Tensor k = q;
    for (float& value : k.values()) value *= 3.0f;
    return k;
  }();
  const std::int64_t needle = n - 1 - distance;
  std::vector<float> weights(static_cast<std::size_t>(n));
  for (std::int64_t j = 0; j < n; ++j)
    weights[static_cast<std::size_t>(j)] =
        sees(n - 1, j, window)
            ? static_cast<float>(af::dot(q.values(), j == needle ? needle_key.values() : keys.matrix().row(j)) /
                                 std::sqrt(static_cast<double>(d)))
            : -std::numeric_limits<float>::infinity();
  af::softmax(weights);
  return weights[static_cast<std::size_t>(needle)];
}
// [/needle]

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Chapter 08: sliding-window attention", "ch08_sliding_window"};
  std::int64_t seq_len = 24, window = 6, heads = 4, kv_heads = 2, head_dim = 8;
  std::uint64_t seed = 8;
  std::string out_dir;
  app.add_option("--seq-len", seq_len, "Tokens of the prefill + decode run (the first half is the prefill)")
      ->check(CLI::Range(1, 512))
      ->capture_default_str();
  app.add_option("--window", window, "Window W: tokens each query sees, itself included")
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
  app.add_option("--out", out_dir, "Directory for the figure data (window_mask.dat, cache_bytes.dat) and numbers.json")
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
    const std::int64_t hidden = shape.hidden, prefill = std::max<std::int64_t>(1, seq_len / 2);
    af::Rng rng(seed);
    const af::GroupedWeights w = random_weights(rng, shape);
    const af::Rope rope(head_dim, 10000.0, af::RopeLayout::half_split);
    const Tensor x = af::random_normal(Shape{seq_len, hidden}, rng);
    std::vector<std::int64_t> positions(static_cast<std::size_t>(seq_len));
    for (std::int64_t t = 0; t < seq_len; ++t) positions[static_cast<std::size_t>(t)] = t;

    fmt::print("Sliding-window GQA: H = {} query heads, G = {} KV heads of d = {}, hidden {}, window W = {}\n", heads,
               kv_heads, head_dim, hidden, window);
    fmt::print("  prefill of {} tokens: q [{}, {}], k and v [{}, {}]; the ring holds [min(T, W), G * d] = [{}, {}]\n",
               prefill, prefill, heads * head_dim, prefill, kv_heads * head_dim, std::min(prefill, window),
               kv_heads * head_dim);
    fmt::print("  decode step t: q [1, {}], k and v [1, {}]; reads min(t + 1, W) ring entries, at most [{}, {}]\n\n",
               heads * head_dim, kv_heads * head_dim, window, kv_heads * head_dim);

    // From scratch: project and rotate with the library (chapters 04 and 06), then the window and the ring.
    Tensor q = af::linear(x.matrix(), w.q_proj.matrix()), k = af::linear(x.matrix(), w.k_proj.matrix());
    const Tensor v = af::linear(x.matrix(), w.v_proj.matrix());
    rope.rotate_rows(q.matrix(), positions);
    rope.rotate_rows(k.matrix(), positions);
    Ring ring(window, kv_heads * head_dim);
    const Tensor prefill_context =
        windowed_prefill(to_tensor(q.matrix().rows_slice(0, prefill)), to_tensor(k.matrix().rows_slice(0, prefill)),
                         to_tensor(v.matrix().rows_slice(0, prefill)), dims, window, ring);
    Tensor scratch(Shape{seq_len, heads * head_dim});
    std::ranges::copy(prefill_context.values(), scratch.data());
    std::int64_t reads_wrong = 0, slots_outside = 0;
    fmt::print("The ring during decode (W = {} slots; token t goes to slot t mod W)\n", window);
    for (std::int64_t t = prefill; t < seq_len; ++t) {
      std::int64_t entries = 0;
      const std::int64_t evicted = ring.token[static_cast<std::size_t>(t % window)];
      const auto context =
          decode_through_ring(q.matrix().row(t), k.matrix().row(t), v.matrix().row(t), dims, ring, entries);
      std::ranges::copy(context, scratch.data() + t * heads * head_dim);
      reads_wrong += entries != std::min(t + 1, window);
      for (const std::int64_t held : ring.token) slots_outside += held >= 0 && !sees(t, held, window);
      if (t < prefill + 4 || t == seq_len - 1)
        fmt::print("  t = {:>3}: slot {:>2}, overwrites {:>8}; slots hold tokens [{}]; reads {} entries\n", t,
                   t % window, evicted < 0 ? "nothing" : fmt::format("token {}", evicted), fmt::join(ring.token, " "),
                   entries);
      else if (t == prefill + 4)
        fmt::print("  ...\n");
    }
    const Tensor from_scratch = af::linear(scratch.matrix(), w.o_proj.matrix());

    // The library: the same run through af::RollingKvCache; then prefill of all tokens at once; float64.
    af::RollingKvCache lib_ring(window, kv_heads, head_dim), whole_ring(window, kv_heads, head_dim);
    Tensor lib(Shape{seq_len, hidden});
    std::ranges::copy(af::sliding_window_attention(x.matrix().rows_slice(0, prefill),
                                                   std::span(positions).first(prefill), shape, w, rope, {}, lib_ring)
                          .values(),
                      lib.data());
    af::GroupedKvCache full(seq_len, kv_heads, head_dim);
    full.append(k.matrix().rows_slice(0, prefill), v.matrix().rows_slice(0, prefill));
    double ring_vs_full = 0.0;
    std::int64_t max_bytes = 0;
    for (std::int64_t t = prefill; t < seq_len; ++t) {
      const Tensor step = af::sliding_window_attention(x.matrix().rows_slice(t, 1),
                                                       std::span(positions).subspan(static_cast<std::size_t>(t), 1),
                                                       shape, w, rope, {}, lib_ring);
      std::ranges::copy(step.values(), lib.data() + t * hidden);
      full.append(k.matrix().rows_slice(t, 1), v.matrix().rows_slice(t, 1));
      const Tensor windowed =
          af::linear(af::windowed_attend_full_cache(q.matrix().rows_slice(t, 1), shape, full, window, {}).matrix(),
                     w.o_proj.matrix());
      ring_vs_full = af::worse(ring_vs_full, af::max_abs_diff(step.values(), windowed.values()));
      max_bytes = std::max(max_bytes, lib_ring.bytes_held());
    }
    const Tensor all_at_once = af::sliding_window_attention(x.matrix(), positions, shape, w, rope, {}, whole_ring);
    const auto reference = windowed_float64(x, w, dims, rope, positions, window);
    double vs_f64 = 0.0, scale = 1.0;
    for (std::int64_t t = 0; t < seq_len; ++t)
      for (std::int64_t o = 0; o < hidden; ++o) {
        vs_f64 = af::worse(vs_f64, std::abs(from_scratch.data()[t * hidden + o] - reference[t][o]));
        scale = af::worse(scale, std::abs(reference[t][o]));
      }

    fmt::print("\n");
    af::Checks checks;
    const double tolerance = 1e-5 * scale;
    checks.expect_close("from scratch vs lib/ (prefill + decode through the ring)",
                        af::max_abs_diff(from_scratch.values(), lib.values()), tolerance);
    checks.expect_close("from scratch vs float64 windowed attention", vs_f64, tolerance);
    checks.expect_close("lib/: ring vs full cache with the window mask", ring_vs_full, tolerance);
    checks.expect_close("lib/: decode through the ring vs one prefill",
                        af::max_abs_diff(lib.values(), all_at_once.values()), tolerance);
    checks.expect_true("decode reads min(t + 1, W) entries, all inside the window", reads_wrong + slots_outside == 0);
    checks.expect_true(fmt::format("ring bytes stay <= 2 W G d 4 = {} B (max seen {} B)",
                                   2 * window * kv_heads * head_dim * 4, max_bytes),
                       max_bytes <= 2 * window * kv_heads * head_dim * 4);

    // [cache-cards]
    // Mistral-7B: every layer windowed (af::with_sliding_window over the GQA card of chapter 04).
    const af::ModelCache mistral = af::dense_model("Mistral-7B").cache();
    const std::vector<std::int64_t> contexts{1024, 4096, 32768};
    fmt::print("\n{}", af::format_cache_card(mistral.card, std::span(&mistral, 1), contexts));
    // Interleaved: the local layers' card, printed with both kinds of layers of the model.
    const af::InterleavedModel gemma = af::gemma3_27b(), gpt_oss = af::gpt_oss_120b();
    fmt::print("\n{}", af::format_cache_card(gemma.parts[0].card, gemma.parts, contexts));
    // [/cache-cards]
    fmt::print(
        "\nInterleaved models: local (windowed) layers bounded, global (dense) layers growing; bf16, one sequence\n");
    fmt::print("  {:<14} {:>8} {:>12} {:>12} {:>12} {:>14} {:>12}\n", "model", "context", "local", "global", "total",
               "read per step", "all dense");
    for (const af::InterleavedModel* m : {&gemma, &gpt_oss}) {
      const std::int64_t all_layers = m->parts[0].layers + m->parts[1].layers;
      for (const std::int64_t t : {128, 1024, 4096, 32768, 131072})
        fmt::print("  {:<14} {:>8} {:>12} {:>12} {:>12} {:>14} {:>12}\n", m->model, t,
                   af::human_bytes(static_cast<double>(m->parts[0].bytes_stored(t))),
                   af::human_bytes(static_cast<double>(m->parts[1].bytes_stored(t))),
                   af::human_bytes(static_cast<double>(m->bytes_stored(t))),
                   af::human_bytes(static_cast<double>(m->bytes_read(t))),
                   af::human_bytes(static_cast<double>(all_layers * m->parts[1].card.bytes_stored(t))));
      fmt::print("  {:<14} growth once the windows are full: {} per token (the global layers only)\n", m->model,
                 m->bytes_per_token_after_windows());
    }

    // The sizes the text quotes, from the same accounting.
    const std::int64_t beyond_windows = 1 << 20;  // a context past every window
    af::BookNumbers numbers;
    numbers.set("mistral_cache_cap", af::human_bytes(static_cast<double>(mistral.bytes_stored(beyond_windows))));
    numbers.set("gemma_local_cache", af::human_bytes(static_cast<double>(gemma.parts[0].bytes_stored(beyond_windows))));
    numbers.set("gemma_growth_per_token", af::with_thousands(gemma.bytes_per_token_after_windows()));
    numbers.set("gemma_all_global_per_token", af::with_thousands((gemma.parts[0].layers + gemma.parts[1].layers) *
                                                                 gemma.parts[1].card.bytes_per_token()));
    numbers.set("gpt_oss_local_cache",
                af::human_bytes(static_cast<double>(gpt_oss.parts[0].bytes_stored(beyond_windows))));
    numbers.set("mistral_reach", af::with_thousands(mistral.layers * (mistral.card.stored_tokens(beyond_windows) - 1)));

    // Where it fails: a needle beyond the window is invisible to the layer.
    fmt::print(
        "\nNeedle recall: weight one query gives a planted matching key at distance D (mean of 200 trials, d = {})\n",
        head_dim);
    fmt::print("  {:>10} {:>18} {:>18}\n", "D", fmt::format("window W = {}", window), "no window (dense)");
    const std::int64_t far = std::numeric_limits<std::int32_t>::max();
    double weight_inside = 0.0, weight_outside = 0.0;
    for (const std::int64_t distance : {std::int64_t{0}, window / 2, window - 1, window, 2 * window, 8 * window}) {
      double windowed = 0.0, dense = 0.0;
      for (int trial = 0; trial < 200; ++trial) {
        af::Rng a(seed * 1000 + static_cast<std::uint64_t>(trial)), b = a;
        windowed += needle_weight(a, distance, window, head_dim) / 200;
        dense += needle_weight(b, distance, far, head_dim) / 200;
      }
      if (distance == window - 1) weight_inside = windowed;
      if (distance >= window) weight_outside = std::max(weight_outside, windowed);
      fmt::print("  {:>10} {:>18.4f} {:>18.4f}\n",
                 fmt::format("{}{}", distance, distance < window ? " (< W)" : " (>= W)"), windowed, dense);
    }
    checks.expect_true("needle at D = W - 1 seen, at D >= W weight exactly 0",
                       weight_inside > 0.0 && weight_outside == 0.0);

    // [stacked-reach]
    // Stacked windowed layers with residuals: change the input token D positions before the last one and see
    // whether the last output moves. One layer reaches W - 1 tokens back; each further layer W - 1 more.
    const std::int64_t depth_max = 4, stack_window = std::min<std::int64_t>(window, 8);
    const std::int64_t n = depth_max * (stack_window - 1) + 3;
    std::vector<af::GroupedWeights> layers;
    for (std::int64_t l = 0; l < depth_max; ++l) layers.push_back(random_weights(rng, shape));
    const Tensor base = af::random_normal(Shape{n, hidden}, rng);
    std::vector<std::int64_t> stack_positions(static_cast<std::size_t>(n));
    for (std::int64_t t = 0; t < n; ++t) stack_positions[static_cast<std::size_t>(t)] = t;
    const auto last_output = [&](const Tensor& input, std::int64_t depth) {
      Tensor h = input;
      for (std::int64_t l = 0; l < depth; ++l) {
        af::RollingKvCache cache(stack_window, kv_heads, head_dim);
        const Tensor a = af::sliding_window_attention(h.matrix(), stack_positions, shape,
                                                      layers[static_cast<std::size_t>(l)], rope, {}, cache);
        for (std::int64_t i = 0; i < h.numel(); ++i) h.data()[i] += a.data()[i];
      }
      return to_tensor(h.matrix().rows_slice(n - 1, 1));
    };
    // [/stacked-reach]
    fmt::print(
        "\nReach of stacked windowed layers (W = {}): the farthest input token whose change moves the last output\n",
        stack_window);
    fmt::print("  {:>6} {:>16} {:>16}\n", "layers", "measured reach", "L (W - 1)");
    bool reach_ok = true;
    for (std::int64_t depth = 1; depth <= depth_max; ++depth) {
      const Tensor reference_out = last_output(base, depth);
      std::int64_t reach = 0;
      for (std::int64_t distance = 1; distance < n; ++distance) {
        Tensor changed = base;
        for (std::int64_t c = 0; c < hidden; ++c) changed.data()[(n - 1 - distance) * hidden + c] += 1.0f;
        if (af::max_abs_diff(last_output(changed, depth).values(), reference_out.values()) > 0.0) reach = distance;
      }
      reach_ok = reach_ok && reach == depth * (stack_window - 1);
      fmt::print("  {:>6} {:>16} {:>16}\n", depth, reach, depth * (stack_window - 1));
    }
    checks.expect_true("stacked reach = L (W - 1) tokens", reach_ok);

    if (!out_dir.empty()) {
      const std::filesystem::path dir = af::make_output_directory(out_dir);
      numbers.write(dir);
      // The prefill's attention weights of head 0 under the window (NaN where masked), for the heatmap.
      af::write_output_file(dir / "window_mask.dat", [&](af::OutputFile& mask_file) {
        mask_file.print("# query key weight (head 0 of the prefill of {} tokens, W = {}; NaN = masked)\n", seq_len,
                        window);
        const af::Tensor weights = [&] {
          Tensor q0(Shape{seq_len, head_dim}), k0(Shape{seq_len, head_dim});
          for (std::int64_t t = 0; t < seq_len; ++t)
            for (std::int64_t c = 0; c < head_dim; ++c) {
              q0.data()[t * head_dim + c] = q.data()[t * heads * head_dim + c];
              k0.data()[t * head_dim + c] = k.data()[t * kv_heads * head_dim + c];
            }
          Tensor s = af::matmul_transposed(q0.matrix(), k0.matrix());
          for (float& value : s.values()) value /= std::sqrt(static_cast<float>(head_dim));
          const af::Mask mask = af::sliding_window_mask(seq_len, seq_len, 0, window);
          af::softmax_rows(s.matrix(), &mask);
          return s;
        }();
        for (std::int64_t i = 0; i < seq_len; ++i) {
          for (std::int64_t j = 0; j < seq_len; ++j)
            mask_file.print("{} {} {}\n", i, j,
                            sees(i, j, window) ? fmt::format("{:.6f}", weights.data()[i * seq_len + j]) : "NaN");
          mask_file.print("\n");
        }
      });
      // Reads equal bytes stored for every curve here (a windowed or dense cache reads all it keeps), so one file.
      af::write_output_file(dir / "cache_bytes.dat", [&](af::OutputFile& bytes_file) {
        const af::ModelCache mistral_dense = [] {
          af::DenseModel m = af::dense_model("Mistral-7B");
          m.sliding_window = 0;
          return m.cache();
        }();
        const af::InterleavedModel gemma_dense{
            "Gemma 3 27B, all global", "", {af::ModelCache{"", "", 62, gemma.parts[1].card}}};
        bytes_file.print(
            "context \"Mistral-7B without window\" \"Mistral-7B, W = 4096\" \"Gemma 3 27B, all 62 global\" "
            "\"Gemma 3 27B, 52 local + 10 global\" \"gpt-oss-120b, 18 banded + 18 dense\"\n");
        for (std::int64_t t = 64; t <= (std::int64_t{1} << 17); t *= 2) {
          bytes_file.print("{} {} {} {} {} {}\n", t, mistral_dense.bytes_stored(t), mistral.bytes_stored(t),
                           gemma_dense.bytes_stored(t), gemma.bytes_stored(t), gpt_oss.bytes_stored(t));
          af::require(mistral_dense.bytes_read(t) == mistral_dense.bytes_stored(t) &&
                          gemma.bytes_read(t) == gemma.bytes_stored(t) &&
                          gpt_oss.bytes_read(t) == gpt_oss.bytes_stored(t),
                      "cache_bytes.dat: reads differ from bytes stored at t = {}", t);
        }
      });
    }
    return checks.all_passed();
  });
}
