// Chapter 15 — sharing the cache across layers.
//
// Builds from scratch Gemma 3n's cross-layer KV sharing: the rule that maps each of the last `--shared` layers to
// the last earlier layer of its own kind (sliding or full), and a stack of Gemma 3n attention layers in which those
// layers keep no cache and attend over their source's. Checks it against the library (af::gemma3n_kv_sharing,
// af::cross_layer_stack), a float64 recomputation, and the equivalence that defines it: the same stack with every
// layer keeping its own cache, into which a sharing layer copies its source's keys and values, gives the same
// output bit for bit, and holds the copies that sharing saves. Prints the cache card of Gemma 3n E2B and E4B, a
// table of how sharing composes with sliding windows and GQA, and what is still computed; measures what a sharing
// layer cannot see (a needle written by the layers between its source and itself) and shows two ways to get sharing
// wrong (copying the source's weights instead of its keys, and reading a ring after a long prompt was written into
// it); writes the data of the chapter's figures.
//
//   build/bin/ch15_cross_layer_kv [--layers 10] [--shared 4] [--heads 4] [--kv-heads 2] [--head-dim 8]
//                                 [--window 6] [--seq-len 24] [--seed 15] [--out DIR]

#include "af/compare.hpp"
#include "af/cross_layer.hpp"
#include "af/error.hpp"
#include "af/linalg.hpp"
#include "af/program.hpp"
#include "af/random.hpp"

#include <fmt/format.h>

#include <cmath>
#include <filesystem>
#include <limits>
#include <vector>

namespace {

using af::ConstMatrix;
using af::LayerKind;
using af::Shape;
using af::Tensor;

// [sharing-rule]
// Gemma 3n: the last `shared` layers keep no cache; each reads the cache of the last layer before them that has
// its own kind (sliding or full). Every other layer reads its own.
std::vector<std::int64_t> cache_source(const std::vector<LayerKind>& kinds, std::int64_t shared) {
  const auto layers = static_cast<std::int64_t>(kinds.size()), first_shared = layers - shared;
  std::vector<std::int64_t> source;
  for (std::int64_t l = 0; l < layers; ++l) {
    std::int64_t s = l;
    if (l >= first_shared)
      for (s = first_shared - 1; kinds[static_cast<std::size_t>(s)] != kinds[static_cast<std::size_t>(l)];) --s;
    source.push_back(s);
  }
  return source;
}
// [/sharing-rule]

// [owner-cache]
// One layer's cache: the keys and values of every token written so far, [t, G d] each, and their sequence
// indices. (A sliding layer here keeps them all and lets the window mask skip the old ones; the library keeps a
// ring of W.)
struct Cache {
  std::vector<float> keys, values;
  std::vector<std::int64_t> index;
  ConstMatrix key_rows(std::int64_t width) const {
    return {keys.data(), static_cast<std::int64_t>(index.size()), width, width};
  }
  ConstMatrix value_rows(std::int64_t width) const {
    return {values.data(), static_cast<std::int64_t>(index.size()), width, width};
  }
  void append(ConstMatrix k, ConstMatrix v, std::int64_t first_index) {
    for (std::int64_t r = 0; r < k.rows; ++r) {
      keys.insert(keys.end(), k.row(r).begin(), k.row(r).end());
      values.insert(values.end(), v.row(r).begin(), v.row(r).end());
      index.push_back(first_index + r);
    }
  }
};
// [/owner-cache]

struct Stack {
  af::Gemma3nShape shape;
  std::vector<LayerKind> kinds;
  std::vector<std::int64_t> source;
  std::vector<af::Gemma3nWeights> layers;
};

// [shared-stack]
// One call (a prompt, or one decode token) through the stack, h <- h + layer(h): a layer that owns its cache
// projects its keys and values and appends them; every layer projects its queries and attends over the cache of
// its source. With `copy_into_own_cache`, a sharing layer instead keeps a cache of its own and appends to it a copy
// of what its source just appended: the same stack without sharing, holding the copies that sharing saves.
Tensor stack_call(ConstMatrix x, std::span<const std::int64_t> positions, std::int64_t first_index, const Stack& s,
                  std::vector<Cache>& caches, bool copy_into_own_cache) {
  const std::int64_t width = s.shape.grouped.kv_heads * s.shape.grouped.head_dim, n = x.rows;
  std::vector<std::int64_t> query_index;
  for (std::int64_t i = 0; i < n; ++i) query_index.push_back(first_index + i);
  Tensor h = to_tensor(x);
  for (std::size_t l = 0; l < s.layers.size(); ++l) {
    const LayerKind kind = s.kinds[l];
    const auto source = static_cast<std::size_t>(s.source[l]);
    if (source == l) {
      const auto [k, v] = af::gemma3n_keys_values(h.matrix(), positions, s.shape, kind, s.layers[l]);
      caches[l].append(k.matrix(), v.matrix(), first_index);
    } else if (copy_into_own_cache) {
      const Cache& from = caches[source];
      const std::int64_t at = static_cast<std::int64_t>(from.index.size()) - n;
      caches[l].append(from.key_rows(width).rows_slice(at, n), from.value_rows(width).rows_slice(at, n), first_index);
    }
    const Cache& read = caches[copy_into_own_cache ? l : source];
    const Tensor q = af::gemma3n_queries(h.matrix(), positions, s.shape, kind, s.layers[l]);
    const Tensor attended =
        af::windowed_grouped_attend(q.matrix(), query_index, read.key_rows(width), read.value_rows(width), read.index,
                                    s.shape.grouped, s.shape.window_of(kind), af::AttentionOptions{true, 1.0});
    const Tensor out = af::linear(attended.matrix(), s.layers[l].o_proj.matrix());
    for (std::int64_t i = 0; i < h.numel(); ++i) h.data()[i] += out.data()[i];
  }
  return h;
}
// [/shared-stack]

// Bytes the caches hold in float32 as rings would hold them: min(t, W) rows of a sliding layer, t of a full one.
std::int64_t ring_bytes(const std::vector<Cache>& caches, const Stack& s) {
  std::int64_t bytes = 0;
  for (std::size_t l = 0; l < caches.size(); ++l) {
    const auto rows = static_cast<std::int64_t>(caches[l].index.size());
    bytes += 2 * (s.kinds[l] == LayerKind::sliding ? std::min(rows, s.shape.window) : rows) * s.shape.grouped.kv_heads *
             s.shape.grouped.head_dim * 4;
  }
  return bytes;
}

// float64, all tokens at once, written from the formulas: per-head RMSNorm (gain on q and k, none on v), half-split
// RoPE with the base of the layer's kind, softmax with scale 1 under the window; a sharing layer uses the keys and
// values its source computed from the source's input.
std::vector<std::vector<double>> stack_float64(const Tensor& x, const Stack& s) {
  const std::int64_t n = x.dim(0), hidden = x.dim(1), d = s.shape.grouped.head_dim, H = s.shape.grouped.heads,
                     G = s.shape.grouped.kv_heads;
  using Rows = std::vector<std::vector<double>>;
  Rows h(static_cast<std::size_t>(n), std::vector<double>(static_cast<std::size_t>(hidden)));
  for (std::int64_t t = 0; t < n; ++t)
    for (std::int64_t c = 0; c < hidden; ++c) h[t][c] = x.data()[t * hidden + c];
  const auto project = [&](const Rows& in, const Tensor& w) {
    Rows y(in.size(), std::vector<double>(static_cast<std::size_t>(w.dim(0)), 0.0));
    for (std::size_t t = 0; t < in.size(); ++t)
      for (std::int64_t o = 0; o < w.dim(0); ++o)
        for (std::int64_t c = 0; c < w.dim(1); ++c) y[t][o] += in[t][c] * w.data()[o * w.dim(1) + c];
    return y;
  };
  const auto norm_and_rotate = [&](Rows y, const Tensor* gain, double base) {
    for (std::size_t t = 0; t < y.size(); ++t)
      for (std::size_t b = 0; b < y[t].size(); b += static_cast<std::size_t>(d)) {
        double squares = 0;
        for (std::int64_t i = 0; i < d; ++i) squares += y[t][b + i] * y[t][b + i];
        for (std::int64_t i = 0; i < d; ++i)
          y[t][b + i] *= (gain ? double{gain->data()[i]} : 1.0) / std::sqrt(squares / d + s.shape.norm_eps);
        for (std::int64_t i = 0; base > 0 && i < d / 2; ++i) {
          const double angle = static_cast<double>(t) * std::pow(base, -2.0 * static_cast<double>(i) / d);
          const double a = y[t][b + i], c = y[t][b + i + d / 2];
          y[t][b + i] = a * std::cos(angle) - c * std::sin(angle);
          y[t][b + i + d / 2] = c * std::cos(angle) + a * std::sin(angle);
        }
      }
    return y;
  };
  std::vector<Rows> keys(s.layers.size()), values(s.layers.size());
  for (std::size_t l = 0; l < s.layers.size(); ++l) {
    const af::Gemma3nWeights& w = s.layers[l];
    const bool sliding = s.kinds[l] == LayerKind::sliding;
    const double base = sliding ? s.shape.local_rope_base : s.shape.global_rope_base;
    if (s.source[l] == static_cast<std::int64_t>(l)) {
      keys[l] = norm_and_rotate(project(h, w.k_proj), &w.k_norm, base);
      values[l] = norm_and_rotate(project(h, w.v_proj), nullptr, 0.0);
    }
    const Rows q = norm_and_rotate(project(h, w.q_proj), &w.q_norm, base);
    const Rows& k = keys[static_cast<std::size_t>(s.source[l])];
    const Rows& v = values[static_cast<std::size_t>(s.source[l])];
    Rows context(static_cast<std::size_t>(n), std::vector<double>(static_cast<std::size_t>(H * d), 0.0));
    for (std::int64_t i = 0; i < n; ++i)
      for (std::int64_t head = 0; head < H; ++head) {
        const std::int64_t kv = head / (H / G) * d, qh = head * d,
                           first = sliding ? std::max<std::int64_t>(0, i - s.shape.window + 1) : 0;
        std::vector<double> score;
        for (std::int64_t j = first; j <= i; ++j) {
          double dot = 0;
          for (std::int64_t c = 0; c < d; ++c) dot += q[i][qh + c] * k[j][kv + c];
          score.push_back(dot);
        }
        const double top = *std::ranges::max_element(score);
        double sum = 0;
        for (double& e : score) sum += (e = std::exp(e - top));
        for (std::int64_t j = first; j <= i; ++j)
          for (std::int64_t c = 0; c < d; ++c) context[i][qh + c] += score[j - first] / sum * v[j][kv + c];
      }
    const Rows out = project(context, w.o_proj);
    for (std::int64_t t = 0; t < n; ++t)
      for (std::int64_t c = 0; c < hidden; ++c) h[t][c] += out[t][c];
  }
  return h;
}

std::vector<af::Gemma3nWeights> random_layers(af::Rng& rng, const af::Gemma3nShape& s,
                                              const std::vector<std::int64_t>& source) {
  const std::int64_t hidden = s.grouped.hidden, qd = s.grouped.heads * s.grouped.head_dim,
                     kvd = s.grouped.kv_heads * s.grouped.head_dim, d = s.grouped.head_dim;
  const double in = 1.0 / std::sqrt(static_cast<double>(hidden));
  const auto gain = [&] {
    Tensor g = af::random_normal(Shape{d}, rng, 0.2);
    for (float& v : g.values()) v += 1.0f;
    return g;
  };
  std::vector<af::Gemma3nWeights> layers;
  for (std::size_t l = 0; l < source.size(); ++l) {
    af::Gemma3nWeights w{af::random_normal(Shape{qd, hidden}, rng, in),
                         gain(),
                         {},
                         {},
                         {},
                         af::random_normal(Shape{hidden, qd}, rng, 0.5 / std::sqrt(static_cast<double>(qd)))};
    if (source[l] == static_cast<std::int64_t>(l)) {
      w.k_proj = af::random_normal(Shape{kvd, hidden}, rng, in);
      w.k_norm = gain();
      w.v_proj = af::random_normal(Shape{kvd, hidden}, rng, in);
    }
    layers.push_back(std::move(w));
  }
  return layers;
}

// [what-sharing-cannot-see]
// The layers between a source and its reader write into the residual stream; the reader's keys, projected from
// the source's input, never see what they wrote. A probe: those layers add a direction u to token p (the needle)
// and give the last token a query for u. Keys read channels 0..m-1 and queries channels m..2m-1 of a 2m-wide
// hidden state, so the last token does not match itself; every position is 0, so only content decides. Returns
// the weight the last query gives token p with keys of the reader's own input, and with the source's keys.
std::pair<double, double> needle_weights(af::Rng& rng, std::int64_t n, std::int64_t m) {
  const af::Gemma3nShape shape{af::GroupedShape{2 * m, 1, 1, 2 * m}, n, 1e4, 1e6, 1e-6};
  af::Gemma3nWeights w{Tensor(Shape{2 * m, 2 * m}), Tensor(Shape{2 * m}),        Tensor(Shape{2 * m, 2 * m}),
                       Tensor(Shape{2 * m}),        Tensor(Shape{2 * m, 2 * m}), Tensor(Shape{2 * m, 2 * m})};
  for (std::int64_t i = 0; i < 2 * m; ++i) {
    w.q_norm.data()[i] = w.k_norm.data()[i] = 1.0f;
    w.v_proj.data()[i * 2 * m + i] = w.o_proj.data()[i * 2 * m + i] = 1.0f;
    if (i < m) w.q_proj.data()[i * 2 * m + m + i] = w.k_proj.data()[i * 2 * m + i] = 1.0f;
  }
  const Tensor source_input = af::random_normal(Shape{n, 2 * m}, rng), u = af::random_normal(Shape{m}, rng);
  const std::int64_t p = rng.below(static_cast<std::uint64_t>(n - 1));
  Tensor reader_input = source_input;
  for (std::int64_t i = 0; i < m; ++i) {
    reader_input.data()[p * 2 * m + i] += 4.0f * u.data()[i];           // the needle, in key channels
    reader_input.data()[(n - 1) * 2 * m + m + i] = 4.0f * u.data()[i];  // the question, in query channels
  }
  const std::vector<std::int64_t> positions(static_cast<std::size_t>(n), 0);
  const Tensor q = af::gemma3n_queries(reader_input.matrix().rows_slice(n - 1, 1), std::span(positions).first(1), shape,
                                       LayerKind::full, w);
  const auto weight_on_needle = [&](const Tensor& input) {
    const Tensor k = af::gemma3n_keys_values(input.matrix(), positions, shape, LayerKind::full, w).first;
    std::vector<float> scores;
    for (std::int64_t j = 0; j < n; ++j) scores.push_back(static_cast<float>(af::dot(q.values(), k.matrix().row(j))));
    af::softmax(scores);
    return double{scores[static_cast<std::size_t>(p)]};
  };
  return {weight_on_needle(reader_input), weight_on_needle(source_input)};
}
// [/what-sharing-cannot-see]

std::string kinds_text(const af::KvSharingPlan& plan) {
  std::string text;
  for (std::int64_t l = 0; l < plan.layers(); ++l)
    text += fmt::format("{:>4}",
                        fmt::format("{}{}", plan.kinds[static_cast<std::size_t>(l)] == LayerKind::sliding ? "S" : "F",
                                    plan.owns(l) ? "" : "*"));
  return text;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Chapter 15: sharing the cache across layers", "ch15_cross_layer_kv"};
  std::int64_t layers = 10, shared = 4, heads = 4, kv_heads = 2, head_dim = 8, window = 6, seq_len = 24;
  std::uint64_t seed = 15;
  std::string out_dir;
  app.add_option("--layers", layers, "Layers of the stack (Gemma 3n's pattern: four sliding, then one full)")
      ->check(CLI::Range(2, 64))
      ->capture_default_str();
  app.add_option("--shared", shared, "The last layers that keep no cache (num_kv_shared_layers)")
      ->check(CLI::Range(0, 63))
      ->capture_default_str();
  app.add_option("--heads", heads, "Query heads H")->check(CLI::Range(1, 32))->capture_default_str();
  app.add_option("--kv-heads", kv_heads, "KV heads G (H divisible by G)")
      ->check(CLI::Range(1, 32))
      ->capture_default_str();
  app.add_option("--head-dim", head_dim, "Head dimension d (even)")->check(CLI::Range(2, 64))->capture_default_str();
  app.add_option("--window", window, "Window W of the sliding layers")
      ->check(CLI::Range(1, 512))
      ->capture_default_str();
  app.add_option("--seq-len", seq_len, "Tokens of the run (the first half is the prompt, the rest decode steps)")
      ->check(CLI::Range(1, 512))
      ->capture_default_str();
  app.add_option("--seed", seed, "Seed of the random weights and inputs")
      ->check(af::seed_value())
      ->capture_default_str();
  app.add_option("--out", out_dir, "Directory for the figure data (cache_bytes.dat, layer_map.dat) and numbers.json")
      ->check(af::output_directory());

  return af::run_program(app, argc, argv, [&] {
    const std::int64_t hidden = heads * head_dim;
    af::require(heads % kv_heads == 0, "--heads {} is not a multiple of --kv-heads {}", heads, kv_heads);
    af::require(head_dim % 2 == 0, "--head-dim {} is odd (expected an even head dimension: RoPE rotates pairs)",
                head_dim);
    af::require(shared < layers, "--shared {} leaves no layer of the --layers {} to keep a cache (expected < {})",
                shared, layers, layers);
    // The float64 stack costs layers x T x (T H d + hidden^2): it stays within seconds.
    af::require_product_within(
        {{"--layers", layers}, {"--seq-len", seq_len}, {"--seq-len", seq_len}, {"--heads x --head-dim", hidden}},
        1 << 27);
    af::require_product_within(
        {{"--layers", layers}, {"--seq-len", seq_len}, {"(--heads x --head-dim)^2", hidden * hidden}}, 1 << 27);
    const std::vector<LayerKind> kinds = af::gemma3n_layer_kinds(layers);
    const af::KvSharingPlan plan = [&] {
      try {
        return af::gemma3n_kv_sharing(kinds, shared);
      } catch (const af::Error& e) {
        af::fail("--shared {} with --layers {}: {}", shared, layers, e.what());
      }
    }();
    const af::Gemma3nShape shape{af::GroupedShape{hidden, heads, kv_heads, head_dim}, window, 1e4, 1e6, 1e-6};
    af::Rng rng(seed);
    const std::vector<std::int64_t> source = cache_source(kinds, shared);
    const Stack stack{shape, kinds, source, random_layers(rng, shape, source)};
    const Tensor x = af::random_normal(Shape{seq_len, hidden}, rng);
    std::vector<std::int64_t> positions(static_cast<std::size_t>(seq_len));
    for (std::int64_t t = 0; t < seq_len; ++t) positions[static_cast<std::size_t>(t)] = t;
    const std::int64_t prompt = std::max<std::int64_t>(1, seq_len / 2);

    fmt::print(
        "A stack of {} Gemma 3n attention layers, the last {} sharing: H = {} query heads, G = {} KV heads of "
        "d = {}, hidden {}, window W = {}\n",
        layers, shared, heads, kv_heads, head_dim, hidden, window);
    fmt::print("  layer");
    for (std::int64_t l = 0; l < layers; ++l) fmt::print("{:>4}", l);
    fmt::print("\n  kind {}\n  reads", kinds_text(plan));
    for (const std::int64_t s : source) fmt::print("{:>4}", s);
    fmt::print("\n  (S sliding, F full, * keeps no cache)\n");
    fmt::print("  prompt of {} tokens: every layer q [{}, {}]; the {} owners k, v [{}, {}]; the {} readers none\n",
               prompt, prompt, heads * head_dim, plan.owners(), prompt, kv_heads * head_dim, plan.readers());
    fmt::print(
        "  decode step: every layer q [1, {}] and reads its source's cache; {} caches of [min(t + 1, W), {}] "
        "or [t + 1, {}] are written\n\n",
        heads * head_dim, plan.owners(), kv_heads * head_dim, kv_heads * head_dim);

    // From scratch: the prompt, then one token at a time; once with sharing, once with copies in own caches.
    std::vector<Cache> shared_caches(static_cast<std::size_t>(layers)), copied_caches(shared_caches);
    Tensor from_scratch(Shape{seq_len, hidden}), with_copies(Shape{seq_len, hidden}), lib(Shape{seq_len, hidden});
    af::CrossLayerKvCache lib_cache(plan, kv_heads, head_dim, window, seq_len);
    std::int64_t lib_bytes_wrong = 0;
    const af::CrossLayerModel tiny{"the stack", "", plan, heads, kv_heads, head_dim, window, af::DType::f32};
    for (std::int64_t first = 0; first < seq_len;) {
      const std::int64_t n = first == 0 ? prompt : 1;
      const ConstMatrix rows = x.matrix().rows_slice(first, n);
      const auto at = std::span(positions).subspan(static_cast<std::size_t>(first), static_cast<std::size_t>(n));
      std::ranges::copy(stack_call(rows, at, first, stack, shared_caches, false).values(),
                        from_scratch.data() + first * hidden);
      std::ranges::copy(stack_call(rows, at, first, stack, copied_caches, true).values(),
                        with_copies.data() + first * hidden);
      std::ranges::copy(af::cross_layer_stack(rows, at, shape, plan, stack.layers, lib_cache).values(),
                        lib.data() + first * hidden);
      first += n;
      lib_bytes_wrong += lib_cache.bytes_held() != tiny.bytes_stored(first);
    }
    const auto reference = stack_float64(x, stack);
    double vs_f64 = 0.0, scale = 1.0;
    for (std::int64_t t = 0; t < seq_len; ++t)
      for (std::int64_t c = 0; c < hidden; ++c) {
        vs_f64 = af::worse(vs_f64, std::abs(from_scratch.data()[t * hidden + c] - reference[t][c]));
        scale = af::worse(scale, std::abs(reference[t][c]));
      }

    af::Checks checks;
    const double tolerance = 1e-5 * scale;
    checks.expect_true("from scratch: the sharing rule = lib/'s af::gemma3n_kv_sharing", source == plan.source);
    checks.expect_close("from scratch vs lib/ (prompt + decode, rings and hand-offs)",
                        af::max_abs_diff(from_scratch.values(), lib.values()), tolerance);
    checks.expect_close("from scratch vs float64 stack", vs_f64, tolerance);
    // [equivalence]
    // Sharing is exactly "every layer keeps a cache, and a sharing layer's cache holds copies of its source's":
    // the same arithmetic on the same numbers, so the outputs agree bit for bit.
    checks.expect_close("sharing = own caches holding copies of the source's (bit for bit)",
                        af::max_abs_diff(from_scratch.values(), with_copies.values()), 0.0);
    // [/equivalence]
    const std::int64_t bytes_shared = ring_bytes(shared_caches, stack), bytes_copied = ring_bytes(copied_caches, stack);
    checks.expect_true(
        fmt::format("bytes held: {} B shared, {} B with the copies = the accounting's {} B and {} B", bytes_shared,
                    bytes_copied, tiny.bytes_stored(seq_len), tiny.unshared().bytes_stored(seq_len)),
        bytes_shared == tiny.bytes_stored(seq_len) && bytes_copied == tiny.unshared().bytes_stored(seq_len) &&
            lib_bytes_wrong == 0);

    // Where it fails (1): copying the source's k_proj and v_proj into the sharing layers is not sharing: a copy
    // projects the sharing layer's own input, not the source's.
    const double weights_copied = [&] {
      std::vector<af::Gemma3nWeights> own = stack.layers;
      for (std::size_t l = 0; l < own.size(); ++l)
        if (source[l] != static_cast<std::int64_t>(l)) {
          const af::Gemma3nWeights& from = stack.layers[static_cast<std::size_t>(source[l])];
          own[l].k_proj = from.k_proj;
          own[l].v_proj = from.v_proj;
          own[l].k_norm = from.k_norm;
        }
      af::CrossLayerKvCache cache(af::no_kv_sharing(kinds), kv_heads, head_dim, window, seq_len);
      const Tensor out = af::cross_layer_stack(x.matrix(), positions, shape, af::no_kv_sharing(kinds), own, cache);
      return af::max_abs_diff(out.values(), lib.values());
    }();
    // Where it fails (2): a ring cannot serve a prompt longer than W after the prompt was written into it.
    // [ring-after-prompt]
    // One owner and one reader on the same prompt: the reader attends over the owner's hand-off (its ring before
    // the prompt plus the prompt's keys), or, wrongly, over the ring after the prompt was appended (its last W).
    const auto ring_pitfall = [&](std::int64_t n) {
      const af::Gemma3nWeights& owner = stack.layers[0];
      const af::Gemma3nWeights& reader = stack.layers.back();  // its queries and output projection
      const ConstMatrix rows = x.matrix().rows_slice(0, n);
      const auto at = std::span(positions).first(static_cast<std::size_t>(n));
      af::RollingKvCache ring(window, kv_heads, head_dim);
      const auto [k, v] = af::gemma3n_keys_values(rows, at, shape, LayerKind::sliding, owner);
      const af::KvHandoff right = af::hand_off(ring, k.matrix(), v.matrix());
      ring.append(k.matrix(), v.matrix());
      const Tensor none(Shape{0, kv_heads * head_dim});
      const af::KvHandoff wrong = af::hand_off(ring, none.matrix(), none.matrix());
      const Tensor q = af::gemma3n_queries(rows, at, shape, LayerKind::sliding, reader);
      const std::vector<std::int64_t> index(right.index.end() - n, right.index.end());
      const Tensor good = af::gemma3n_attend(q.matrix(), index, right, shape, LayerKind::sliding, reader);
      const Tensor bad = af::gemma3n_attend(q.matrix(), index, wrong, shape, LayerKind::sliding, reader);
      std::int64_t rows_wrong = 0;
      for (std::int64_t i = 0; i < n; ++i)
        rows_wrong += af::max_abs_diff(good.matrix().row(i), bad.matrix().row(i)) > tolerance;
      return std::pair{rows_wrong, af::max_abs_diff(good.values(), bad.values())};
    };
    // [/ring-after-prompt]
    fmt::print("\nWhere it fails: two readings of \"share\" that are not sharing\n");
    fmt::print(
        "  sharing layers given copies of their source's k_proj and v_proj (own input): max |difference| {:.3g} "
        "(tolerance {:.1e})\n",
        weights_copied, tolerance);
    const auto [rows_wrong, ring_error] = ring_pitfall(prompt);
    const std::int64_t rows_expected = std::max<std::int64_t>(0, prompt - 1) * (prompt > window);
    fmt::print(
        "  a reader of a W = {} ring after a prompt of {} was written into it: {} of {} rows wrong (max "
        "|difference| {:.3g}); expected T - 1 = {} when T > W, else 0\n",
        window, prompt, rows_wrong, prompt, ring_error, rows_expected);
    checks.expect_true("copying the source's weights differs from sharing its keys and values",
                       shared == 0 || weights_copied > tolerance);
    checks.expect_true("reading the ring after a prompt longer than W breaks every row but the last",
                       rows_wrong == rows_expected);

    // What a sharing layer cannot see, averaged over trials of the probe.
    const std::int64_t probe_tokens = std::max<std::int64_t>(prompt, 2), trials = 200;
    double own_keys = 0.0, source_keys = 0.0;
    af::Rng probe_rng(seed * 1000 + 15);
    for (std::int64_t trial = 0; trial < trials; ++trial) {
      const auto [own, borrowed] = needle_weights(probe_rng, probe_tokens, head_dim);
      own_keys += own / static_cast<double>(trials);
      source_keys += borrowed / static_cast<double>(trials);
    }
    fmt::print(
        "\nWhat a sharing layer cannot see: weight the last query gives a needle written by the layers between "
        "source and reader (mean of {} trials, {} tokens, keys of {} channels)\n",
        trials, probe_tokens, head_dim);
    fmt::print("  {:<36} {:>8.4f}\n  {:<36} {:>8.4f}\n  {:<36} {:>8.4f}\n", "keys of the reader's own input", own_keys,
               "keys of its source's input (shared)", source_keys, "uniform, 1 / tokens",
               1.0 / static_cast<double>(probe_tokens));
    checks.expect_true("the needle is found with the reader's own keys, not with its source's", own_keys > source_keys);

    const af::CrossLayerModel e2b = af::gemma3n_e2b(), e4b = af::gemma3n_e4b();
    const std::vector<std::int64_t> contexts{4096, 32768, 131072};
    fmt::print("\nCache card: Gemma 3n cross-layer KV sharing (bf16; {})\n", e4b.source);
    fmt::print("  projected:   every layer q [H d] = [{}]; only a layer that keeps a cache k, v [G d] = [{}] each\n",
               e4b.heads * e4b.head_dim, e4b.kv_heads * e4b.head_dim);
    fmt::print("  cached:      K and V [{}, {}] per token in each of the caches kept; none in a sharing layer\n",
               e4b.kv_heads, e4b.head_dim);
    fmt::print(
        "  stored:      prefill of T: sliding caches [min(T, {}), {}, {}], full caches [T, {}, {}]; decode "
        "step t: min(t + 1, {}) and t + 1 rows\n",
        e4b.window, e4b.kv_heads, e4b.head_dim, e4b.kv_heads, e4b.head_dim, e4b.window);
    fmt::print(
        "  per token:   {} B per layer that keeps a cache; per model {}: {} caches, {} B, and {}: {} caches, {} B "
        "(against {} B and {} B without sharing)\n",
        af::with_thousands(e4b.bytes_per_token_per_cache()), e2b.name, e2b.plan.owners(),
        af::with_thousands(e2b.bytes_written_per_token()), e4b.name, e4b.plan.owners(),
        af::with_thousands(e4b.bytes_written_per_token()), af::with_thousands(e2b.unshared().bytes_written_per_token()),
        af::with_thousands(e4b.unshared().bytes_written_per_token()));
    fmt::print("  {:<14} {:>8} {:>16} {:>16} {:>18} {:>16}\n", "model", "context", "held, sharing", "held, unshared",
               "read per step", "entries read");
    for (const af::CrossLayerModel* m : {&e2b, &e4b})
      for (const std::int64_t t : contexts)
        fmt::print("  {:<14} {:>8} {:>16} {:>16} {:>18} {:>16}\n", m->name, t,
                   af::human_bytes(static_cast<double>(m->bytes_stored(t))),
                   af::human_bytes(static_cast<double>(m->unshared().bytes_stored(t))),
                   af::human_bytes(static_cast<double>(m->bytes_read(t))), af::with_thousands(m->entries_read(t)));
    fmt::print(
        "  trades:      memory: {} of {} caches kept (E4B), read bytes unchanged (every layer still reads); "
        "quality: a sharing layer attends with keys formed from an earlier layer's input; latency: {} of {} "
        "K/V projections per token; complexity: a hand-off per call for sliding sources\n",
        e4b.plan.owners(), e4b.plan.layers(), e4b.plan.owners(), e4b.plan.layers());

    // [composition]
    // Sharing, windows and GQA on E4B's geometry (35 layers of 8 query heads of 256): each removes a different
    // factor, so they multiply.
    struct Variant {
      std::string name;
      std::int64_t kv_heads;
      bool windows, sharing;
    };
    const std::vector<Variant> variants{
        {"MHA, all full", 8, false, false},          {"GQA (G = 2), all full", 2, false, false},
        {"GQA + sharing, all full", 2, false, true}, {"GQA + windows", 2, true, false},
        {"GQA + windows + sharing", 2, true, true},  {"MHA + windows + sharing", 8, true, true}};
    const auto variant_model = [&](const Variant& v) {
      const std::vector<LayerKind> k =
          v.windows ? af::gemma3n_layer_kinds(35) : std::vector<LayerKind>(35, LayerKind::full);
      return af::CrossLayerModel{
          v.name,         "", v.sharing ? af::gemma3n_kv_sharing(k, 15) : af::no_kv_sharing(k), 8, v.kv_heads, 256, 512,
          af::DType::bf16};
    };
    // [/composition]
    const std::int64_t at32k = 32768;
    const std::int64_t baseline = variant_model(variants[0]).bytes_stored(at32k);
    fmt::print(
        "\nHow sharing composes with windows and GQA (E4B's 35 layers, 8 heads of 256, W = 512, 15 shared; "
        "bf16, 32K context)\n");
    fmt::print("  {:<26} {:>7} {:>12} {:>10} {:>16} {:>16}\n", "variant", "caches", "held", "vs MHA", "read per step",
               "written / token");
    for (const Variant& v : variants) {
      const af::CrossLayerModel m = variant_model(v);
      fmt::print("  {:<26} {:>7} {:>12} {:>9.1f}x {:>16} {:>16}\n", v.name, m.plan.owners(),
                 af::human_bytes(static_cast<double>(m.bytes_stored(at32k))),
                 static_cast<double>(baseline) / static_cast<double>(m.bytes_stored(at32k)),
                 af::human_bytes(static_cast<double>(m.bytes_read(at32k))),
                 af::human_bytes(static_cast<double>(m.bytes_written_per_token())));
    }

    // What is still computed, per generated token of E4B at 32K context.
    fmt::print("\nWhat sharing removes and what it keeps (E4B, one decode step at 32K)\n");
    fmt::print("  {:<42} {:>16} {:>16}\n", "", "no sharing", "sharing");
    const af::CrossLayerModel e4b_unshared = e4b.unshared();
    fmt::print("  {:<42} {:>16} {:>16}\n", "layers projecting q and o", e4b.plan.layers(), e4b.plan.layers());
    fmt::print("  {:<42} {:>16} {:>16}\n", "layers projecting k and v", e4b_unshared.plan.owners(), e4b.plan.owners());
    fmt::print("  {:<42} {:>16} {:>16}\n", "projection multiply-adds (hidden = H d)",
               af::with_thousands(e4b_unshared.projection_macs_per_token()),
               af::with_thousands(e4b.projection_macs_per_token()));
    fmt::print("  {:<42} {:>16} {:>16}\n", "cache entries read (all layers)",
               af::with_thousands(e4b_unshared.entries_read(at32k)), af::with_thousands(e4b.entries_read(at32k)));
    fmt::print("  {:<42} {:>16} {:>16}\n", "K/V bytes written to caches",
               af::with_thousands(e4b_unshared.bytes_written_per_token()),
               af::with_thousands(e4b.bytes_written_per_token()));
    fmt::print("  {:<42} {:>16} {:>16}\n", "K/V bytes held",
               af::human_bytes(static_cast<double>(e4b_unshared.bytes_stored(at32k))),
               af::human_bytes(static_cast<double>(e4b.bytes_stored(at32k))));
    fmt::print("\n");

    af::BookNumbers numbers;
    numbers.set("prompt", af::with_thousands(prompt));
    numbers.set("layers", af::with_thousands(layers));
    numbers.set("shared", af::with_thousands(shared));
    numbers.set("window", af::with_thousands(window));
    numbers.print("weights_copied_error", "{:.2g}", weights_copied);
    numbers.set("ring_rows_wrong", af::with_thousands(rows_wrong));
    numbers.print("needle_own_keys", "{:.2f}", own_keys);
    numbers.print("needle_source_keys", "{:.2f}", source_keys);
    numbers.set("needle_tokens", af::with_thousands(probe_tokens));
    for (const af::CrossLayerModel* m : {&e2b, &e4b}) {
      const std::string key = m == &e2b ? "e2b" : "e4b";
      for (const std::int64_t t : contexts) {
        const std::string k = fmt::format("{}_{}k", key, t / 1024);
        numbers.set(k + "_shared", af::human_bytes(static_cast<double>(m->bytes_stored(t))));
        numbers.set(k + "_unshared", af::human_bytes(static_cast<double>(m->unshared().bytes_stored(t))));
        numbers.print(k + "_saved_percent", "{:.0f}",
                      100.0 * (1.0 - static_cast<double>(m->bytes_stored(t)) /
                                         static_cast<double>(m->unshared().bytes_stored(t))));
        numbers.set(k + "_read", af::human_bytes(static_cast<double>(m->bytes_read(t))));
      }
      numbers.set(key + "_caches", af::with_thousands(m->plan.owners()));
      numbers.set(key + "_growth_shared",
                  af::with_thousands(m->plan.owners(LayerKind::full) * m->bytes_per_token_per_cache()));
      numbers.set(key + "_growth_unshared",
                  af::with_thousands(m->unshared().plan.owners(LayerKind::full) * m->bytes_per_token_per_cache()));
    }
    // Which caches E4B's sharing layers read, and how many of each kind, for the prose.
    std::int64_t readers_sliding = 0, readers_full = 0, sliding_source = -1, full_source = -1;
    for (std::int64_t l = 0; l < e4b.plan.layers(); ++l)
      if (!e4b.plan.owns(l)) {
        const bool full = e4b.plan.kinds[static_cast<std::size_t>(l)] == LayerKind::full;
        (full ? readers_full : readers_sliding) += 1;
        (full ? full_source : sliding_source) = e4b.plan.source[static_cast<std::size_t>(l)];
      }
    numbers.set("e4b_readers", af::with_thousands(e4b.plan.readers()));
    numbers.set("e4b_readers_sliding", af::with_thousands(readers_sliding));
    numbers.set("e4b_readers_full", af::with_thousands(readers_full));
    numbers.set("e4b_sliding_source", af::with_thousands(sliding_source));
    numbers.set("e4b_full_source", af::with_thousands(full_source));
    numbers.set("e4b_full_caches", af::with_thousands(e4b.plan.owners(LayerKind::full)));
    numbers.print("e4b_projection_saved_percent", "{:.1f}",
                  100.0 * (1.0 - static_cast<double>(e4b.projection_macs_per_token()) /
                                     static_cast<double>(e4b_unshared.projection_macs_per_token())));

    if (!out_dir.empty()) {
      const std::filesystem::path dir = af::make_output_directory(out_dir);
      numbers.write(dir);
      af::write_output_file(dir / "cache_bytes.dat", [&](af::OutputFile& f) {
        f.print(
            "context \"E2B, no sharing\" \"E2B, 10 layers sharing\" \"E4B, no sharing\" \"E4B, 15 layers sharing\" "
            "\"E4B, read per step (either)\"\n");
        for (std::int64_t t = 64; t <= (std::int64_t{1} << 17); t *= 2)
          f.print("{} {} {} {} {} {}\n", t, e2b.unshared().bytes_stored(t), e2b.bytes_stored(t),
                  e4b.unshared().bytes_stored(t), e4b.bytes_stored(t), e4b.bytes_read(t));
      });
      af::write_output_file(dir / "layer_map.dat", [&](af::OutputFile& f) {
        f.print("# layer source kind(0 sliding, 1 full) owns (Gemma 3n E4B: 35 layers, 15 sharing)\n");
        for (std::int64_t l = 0; l < e4b.plan.layers(); ++l)
          f.print("{} {} {} {}\n", l, e4b.plan.source[static_cast<std::size_t>(l)],
                  e4b.plan.kinds[static_cast<std::size_t>(l)] == LayerKind::full ? 1 : 0, e4b.plan.owns(l) ? 1 : 0);
      });
    }
    return checks.all_passed();
  });
}
