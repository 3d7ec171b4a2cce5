// Chapter 02 — multi-head attention and its cache.
//
// Splits the model width into H heads of dimension d = hidden / H, runs chapter 01's attention in every head
// independently, merges the heads and projects back. The cache keeps one K and one V per head, laid out
// head-major ([H, T, d]) so that each head reads one contiguous block. Prefill and token-by-token decode are
// checked against each other, against the library's grouped attention with G = H, and against float64.
//
//   build/bin/ch02_multi_head_attention [--seq-len 10] [--hidden 64] [--heads 4] [--seed 2] [--out DIR]

#include "af/accounting.hpp"
#include "af/attention.hpp"
#include "af/error.hpp"
#include "af/grouped_attention.hpp"
#include "af/linalg.hpp"
#include "af/models.hpp"
#include "af/program.hpp"
#include "af/random.hpp"

#include <fmt/format.h>

#include <cmath>
#include <filesystem>
#include <vector>

namespace {

using af::ConstMatrix;
using af::Shape;
using af::Tensor;

// [split-heads]
// [T, H * d] -> [H, T, d]: the projection writes each token's heads side by side; attention wants each
// head's tokens together. Element (t, h, i) moves from t * H * d + h * d + i to h * T * d + t * d + i.
Tensor split_heads(const Tensor& x, std::int64_t heads) {
  const std::int64_t T = x.dim(0), d = x.dim(1) / heads;
  Tensor out(Shape{heads, T, d});
  for (std::int64_t t = 0; t < T; ++t)
    for (std::int64_t h = 0; h < heads; ++h)
      for (std::int64_t i = 0; i < d; ++i) out.data()[(h * T + t) * d + i] = x.data()[(t * heads + h) * d + i];
  return out;
}
// [/split-heads]

// [merge-heads]
// [H, T, d] -> [T, H * d]: the inverse, so that the output projection sees every head of a token at once.
Tensor merge_heads(const Tensor& x) {
  const std::int64_t heads = x.dim(0), T = x.dim(1), d = x.dim(2);
  Tensor out(Shape{T, heads * d});
  for (std::int64_t h = 0; h < heads; ++h)
    for (std::int64_t t = 0; t < T; ++t)
      for (std::int64_t i = 0; i < d; ++i) out.data()[(t * heads + h) * d + i] = x.data()[(h * T + t) * d + i];
  return out;
}
// [/merge-heads]

// One head of a [H, T, d] tensor as a [T, d] matrix (contiguous: head-major).
ConstMatrix head(const Tensor& x, std::int64_t h) {
  return {x.data() + h * x.dim(1) * x.dim(2), x.dim(1), x.dim(2), x.dim(2)};
}

struct Weights {
  Tensor w_q, w_k, w_v;  // [H * d, hidden]
  Tensor w_o;            // [hidden, H * d]
};

// [mha-prefill]
// Every head attends on its own, with chapter 01's attention (af::attention), over its slice of q, k and v.
Tensor mha_prefill(const Weights& w, ConstMatrix x, std::int64_t heads) {
  const Tensor q = split_heads(af::linear(x, w.w_q.matrix()), heads);  // [H, T, d]
  const Tensor k = split_heads(af::linear(x, w.w_k.matrix()), heads);  // [H, T, d]
  const Tensor v = split_heads(af::linear(x, w.w_v.matrix()), heads);  // [H, T, d]
  Tensor context(q.shape());                                           // [H, T, d]
  for (std::int64_t h = 0; h < heads; ++h) {
    const Tensor out = af::attention(head(q, h), head(k, h), head(v, h), {.causal = true, .scale = std::nullopt});
    std::ranges::copy(out.values(), context.data() + h * q.dim(1) * q.dim(2));
  }
  return af::linear(merge_heads(context).matrix(), w.w_o.matrix());  // [T, hidden]
}
// [/mha-prefill]

// [mha-cache]
// The multi-head cache: K and V of every head, head-major [H, capacity, d]. Appending a token writes one row
// into each of the H blocks; a head reads its own contiguous block [t, d].
class MhaCache {
 public:
  MhaCache(std::int64_t heads, std::int64_t capacity, std::int64_t head_dim)
      : keys_(Shape{heads, capacity, head_dim}), values_(Shape{heads, capacity, head_dim}) {}

  void append(std::span<const float> k, std::span<const float> v) {  // k, v: [H * d], one token
    const std::int64_t heads = keys_.dim(0), capacity = keys_.dim(1), d = keys_.dim(2);
    for (std::int64_t h = 0; h < heads; ++h) {
      std::ranges::copy(k.subspan(h * d, d), keys_.data() + (h * capacity + length_) * d);
      std::ranges::copy(v.subspan(h * d, d), values_.data() + (h * capacity + length_) * d);
    }
    ++length_;
  }
  ConstMatrix keys(std::int64_t h) const { return block(keys_, h); }      // [t, d]
  ConstMatrix values(std::int64_t h) const { return block(values_, h); }  // [t, d]

 private:
  ConstMatrix block(const Tensor& t, std::int64_t h) const {
    return {t.data() + h * t.dim(1) * t.dim(2), length_, t.dim(2), t.dim(2)};
  }
  Tensor keys_, values_;
  std::int64_t length_ = 0;
};
// [/mha-cache]

// [mha-decode-step]
// One token: project it, append its H keys and values, and let each of its H queries read its head's cache.
Tensor mha_decode_step(const Weights& w, ConstMatrix x_t, std::int64_t heads, MhaCache& cache) {
  const Tensor q = af::linear(x_t, w.w_q.matrix());  // [1, H * d]
  const Tensor k = af::linear(x_t, w.w_k.matrix());
  const Tensor v = af::linear(x_t, w.w_v.matrix());
  cache.append(k.values(), v.values());
  const std::int64_t d = q.dim(1) / heads;
  Tensor context(Shape{1, heads * d});
  for (std::int64_t h = 0; h < heads; ++h) {
    const ConstMatrix q_h{q.data() + h * d, 1, d, d};
    const Tensor out = af::attention(q_h, cache.keys(h), cache.values(h), {.causal = true, .scale = std::nullopt});
    std::ranges::copy(out.values(), context.data() + h * d);
  }
  return af::linear(context.matrix(), w.w_o.matrix());  // [1, hidden]
}
// [/mha-decode-step]

// The layer in float64 from the formula: head h uses columns h*d..h*d+d-1 of the projections.
std::vector<double> reference_layer(const Weights& w, const Tensor& x, std::int64_t heads) {
  const std::int64_t T = x.dim(0), hidden = x.dim(1), width = w.w_q.dim(0), d = width / heads;
  const auto project = [&](const Tensor& m) {
    std::vector<double> y(T * width, 0.0);
    for (std::int64_t t = 0; t < T; ++t)
      for (std::int64_t o = 0; o < width; ++o)
        for (std::int64_t i = 0; i < hidden; ++i) y[t * width + o] += double{x.at({t, i})} * m.at({o, i});
    return y;
  };
  const auto q = project(w.w_q), k = project(w.w_k), v = project(w.w_v);
  std::vector<double> context(T * width, 0.0), out(T * hidden, 0.0);
  for (std::int64_t h = 0; h < heads; ++h)
    for (std::int64_t i = 0; i < T; ++i) {
      std::vector<double> s(i + 1);
      double top = -1e300, sum = 0.0;
      for (std::int64_t j = 0; j <= i; ++j) {
        double dot = 0.0;
        for (std::int64_t c = 0; c < d; ++c) dot += q[i * width + h * d + c] * k[j * width + h * d + c];
        top = std::max(top, s[j] = dot / std::sqrt(double(d)));
      }
      for (double& e : s) sum += (e = std::exp(e - top));
      for (std::int64_t j = 0; j <= i; ++j)
        for (std::int64_t c = 0; c < d; ++c) context[i * width + h * d + c] += s[j] / sum * v[j * width + h * d + c];
    }
  for (std::int64_t t = 0; t < T; ++t)
    for (std::int64_t o = 0; o < hidden; ++o)
      for (std::int64_t c = 0; c < width; ++c) out[t * hidden + o] += context[t * width + c] * w.w_o.at({o, c});
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Chapter 02: multi-head attention, prefill and decode through a per-head KV cache",
               "ch02_multi_head_attention"};
  std::int64_t seq_len = 10, hidden = 64, heads = 4;
  std::uint64_t seed = 2;
  std::string out_dir;
  app.add_option("--seq-len", seq_len, "Tokens in the prompt")->check(CLI::Range(1, 512))->capture_default_str();
  app.add_option("--hidden", hidden, "Model width, divided among the heads")
      ->check(CLI::Range(1, 1024))
      ->capture_default_str();
  app.add_option("--heads", heads, "Attention heads H (must divide --hidden)")
      ->check(CLI::Range(1, 256))
      ->capture_default_str();
  app.add_option("--seed", seed, "Seed of the random inputs and weights")
      ->check(af::seed_value())
      ->capture_default_str();
  app.add_option("--out", out_dir, "Directory for the figure data (head_weights.dat) and numbers.json")
      ->check(af::output_directory());

  return af::run_program(app, argc, argv, [&] {
    // The projections cost T x hidden x hidden, the attention T x T x hidden: each stays within seconds.
    af::require_product_within({{"--seq-len", seq_len}, {"--hidden", hidden}, {"--hidden", hidden}}, 1 << 24);
    af::require_product_within({{"--seq-len", seq_len}, {"--seq-len", seq_len}, {"--hidden", hidden}}, 1 << 24);
    af::require(hidden % heads == 0, "--hidden {} is not divisible by --heads {} (expected hidden = heads x head_dim)",
                hidden, heads);
    const std::int64_t d = hidden / heads;
    af::Rng rng(seed);
    const double in = 1.0 / std::sqrt(static_cast<double>(hidden));
    const Weights w{
        af::random_normal(Shape{hidden, hidden}, rng, in), af::random_normal(Shape{hidden, hidden}, rng, in),
        af::random_normal(Shape{hidden, hidden}, rng, in), af::random_normal(Shape{hidden, hidden}, rng, in)};
    const Tensor x = af::random_normal(Shape{seq_len, hidden}, rng);

    fmt::print("Multi-head attention: T = {}, hidden = {}, H = {} heads of d = {}, seed {}\n", seq_len, hidden, heads,
               d, seed);
    fmt::print("  projections: x [{0}, {1}] -> q, k, v [{0}, {2} x {3}] -> split -> [{2}, {0}, {3}]\n", seq_len, hidden,
               heads, d);
    fmt::print(
        "  per head: scores, weights [{0}, {0}] -> output [{0}, {1}] -> merge -> [{0}, {2}] -> W_o -> [{0}, {3}]\n",
        seq_len, d, heads * d, hidden);
    fmt::print("  cache: K, V [{0}, t, {1}] per layer (head-major), one row per head per token\n\n", heads, d);

    // [run-both-paths]
    const Tensor prefill = mha_prefill(w, x.matrix(), heads);
    MhaCache cache(heads, seq_len, d);
    Tensor decoded(Shape{seq_len, hidden});
    for (std::int64_t t = 0; t < seq_len; ++t)
      std::ranges::copy(mha_decode_step(w, x.matrix().rows_slice(t, 1), heads, cache).values(),
                        decoded.data() + t * hidden);
    // [/run-both-paths]

    const af::GroupedShape shape{hidden, heads, heads, d};
    af::GroupedKvCache lib_cache(seq_len, heads, d);
    const Tensor lib =
        af::grouped_attention(x.matrix(), shape, {w.w_q, w.w_k, w.w_v, w.w_o, {}, {}, {}}, {}, lib_cache);
    const std::vector<double> reference = reference_layer(w, x, heads);

    af::Checks checks;
    const double tolerance = af::scaled_tolerance(1e-5, af::max_abs(prefill.values()));
    checks.expect_close("prefill vs float64 reference", af::max_abs_diff(prefill.values(), reference), tolerance);
    checks.expect_close("decode through the per-head cache vs prefill",
                        af::max_abs_diff(decoded.values(), prefill.values()), tolerance);
    checks.expect_close("from scratch vs lib/ grouped_attention (G = H)",
                        af::max_abs_diff(prefill.values(), lib.values()), tolerance);
    checks.expect_close("merge_heads(split_heads(x)) == x",
                        af::max_abs_diff(merge_heads(split_heads(lib, heads)).values(), lib.values()), 0.0);
    for (std::int64_t h = 0; h < heads; ++h)
      checks.expect_close(fmt::format("head {} keys vs lib/ token-major cache", h),
                          af::max_abs_diff(cache.keys(h), lib_cache.keys(h)), tolerance);

    // [cache-card]
    af::CacheCard card =
        af::dense_kv_card("multi-head attention (this program's layer)", heads, heads, d, af::DType::f32);
    card.trade_offs =
        "each head keeps its own keys and values: the most expressive cache and the largest, 2 x hidden values per "
        "token and layer; memory and decode reads grow linearly with the context";
    const std::vector<af::ModelCache> models = {af::dense_model("Llama-2-7B").cache()};
    fmt::print("\n{}", af::format_cache_card(card, models, std::vector<std::int64_t>{seq_len, 4096}));
    // [/cache-card]

    // Where it fails: memory. The cache of an MHA model per sequence, and how many sequences a 64 GiB cache
    // budget (what is left on an 80 GB GPU once a 7B model's bf16 weights are loaded, roughly) holds.
    const af::ModelCache llama2 = af::dense_model("Llama-2-7B").cache();
    const double budget = 64.0 * 1024 * 1024 * 1024;
    af::BookNumbers numbers;
    numbers.set("llama2_cache_per_token", af::human_bytes(static_cast<double>(llama2.bytes_per_token())));
    fmt::print("\nLlama-2-7B (MHA, bf16) cache per sequence, and sequences that fit in a 64 GiB cache budget\n");
    fmt::print("  {:>8} {:>14} {:>10}\n", "context", "cache", "sequences");
    for (std::int64_t t : {1024, 4096, 32768, 131072}) {
      const double bytes = static_cast<double>(llama2.layers * llama2.card.bytes_stored(t));
      fmt::print("  {:>8} {:>14} {:>10.0f}\n", t, af::human_bytes(bytes), std::floor(budget / bytes));
      if (t == 131072) {
        numbers.set("llama2_cache_128k", af::human_bytes(bytes));
        numbers.print("llama2_sequences_128k", "{:.0f}", std::floor(budget / bytes));
      }
    }

    if (!out_dir.empty()) {
      const std::filesystem::path dir = af::make_output_directory(out_dir);
      numbers.write(dir);
      af::write_output_file(dir / "head_weights.dat", [&](af::OutputFile& file) {
        file.print("# Causal attention weights of every head: head query key weight (a blank line after each query)\n");
        const Tensor q = split_heads(af::linear(x.matrix(), w.w_q.matrix()), heads);
        const Tensor k = split_heads(af::linear(x.matrix(), w.w_k.matrix()), heads);
        for (std::int64_t h = 0; h < heads; ++h) {
          const Tensor weights = af::attention_weights(head(q, h), head(k, h), {});
          for (std::int64_t i = 0; i < seq_len; ++i) {
            for (std::int64_t j = 0; j < seq_len; ++j) file.print("{} {} {} {:.6f}\n", h, i, j, weights.at({i, j}));
            file.print("\n");
          }
          file.print("\n");  // two blank lines end a head's block (gnuplot's `index`)
        }
      });
    }
    return checks.all_passed();
  });
}
