// Chapter 03 — multi-query attention: every query head shares one key head and one value head.
//
// Keeps H query heads but projects a single K and a single V per token, so the cache shrinks H-fold and a
// decode step reads one K/V row per cached token for all heads at once. Checks prefill against decode, against
// the library's grouped attention with G = 1, against an MHA layer whose H key/value heads are all the same,
// and against float64. Then counts what shrank and what did not, and measures what converting an MHA layer to
// MQA by mean-pooling its key/value heads costs in output error.
//
//   build/bin/ch03_multi_query_attention [--seq-len 10] [--hidden 64] [--heads 8] [--seed 3]

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

// [mqa-weights]
// H query heads, one key head, one value head.
struct MqaWeights {
  Tensor w_q;       // [H * d, hidden]
  Tensor w_k, w_v;  // [d, hidden]: a single head each
  Tensor w_o;       // [hidden, H * d]
};
// [/mqa-weights]

// [mqa-prefill]
// Every query head attends over the same keys and values.
Tensor mqa_prefill(const MqaWeights& w, ConstMatrix x, std::int64_t heads, af::KvCache& cache) {
  const std::int64_t T = x.rows, d = w.w_k.dim(0);
  const Tensor q = af::linear(x, w.w_q.matrix()).reshaped(Shape{T, heads, d});  // [T, H, d]
  const Tensor k = af::linear(x, w.w_k.matrix());                               // [T, d]
  const Tensor v = af::linear(x, w.w_v.matrix());                               // [T, d]
  cache.append(k.matrix(), v.matrix());
  Tensor context(Shape{T, heads, d});
  for (std::int64_t h = 0; h < heads; ++h) {
    const Tensor out = af::attention(af::head_view(q, h), cache.keys(), cache.values(), {});
    af::Matrix dst = af::head_view(context, h);
    for (std::int64_t t = 0; t < T; ++t) std::ranges::copy(out.matrix().row(t), dst.row(t).begin());
  }
  return af::linear(context.reshaped(Shape{T, heads * d}).matrix(), w.w_o.matrix());
}
// [/mqa-prefill]

// [mqa-decode-step]
// One token. Its H queries, stacked as a [H, d] matrix, meet the single cached K in one product: each cached
// key is read once and serves all H heads. The arithmetic is still H dot products per cached token.
Tensor mqa_decode_step(const MqaWeights& w, ConstMatrix x_t, std::int64_t heads, af::KvCache& cache) {
  const std::int64_t d = w.w_k.dim(0);
  const Tensor q = af::linear(x_t, w.w_q.matrix()).reshaped(Shape{heads, d});  // [H, d]
  const Tensor k = af::linear(x_t, w.w_k.matrix());                            // [1, d]
  const Tensor v = af::linear(x_t, w.w_v.matrix());                            // [1, d]
  cache.append(k.matrix(), v.matrix());
  Tensor weights = af::matmul_transposed(q.matrix(), cache.keys());  // [H, t + 1]
  for (float& s : weights.values()) s *= static_cast<float>(af::default_scale(d));
  af::softmax_rows(weights.matrix());                                   // the new token sees the whole cache
  const Tensor context = af::matmul(weights.matrix(), cache.values());  // [H, d]
  return af::linear(context.reshaped(Shape{1, heads * d}).matrix(), w.w_o.matrix());  // [1, hidden]
}
// [/mqa-decode-step]

// [mean-pool-to-mqa]
// Turning an MHA layer into an MQA one, as Ainslie et al. converted checkpoints before uptraining: the one key
// head is the mean of the H key heads, and likewise for values. W_k is [H * d, hidden]: head h is rows h*d...
Tensor mean_pool_heads(const Tensor& w_kv, std::int64_t heads) {
  const std::int64_t d = w_kv.dim(0) / heads, hidden = w_kv.dim(1);
  Tensor pooled(Shape{d, hidden});
  for (std::int64_t h = 0; h < heads; ++h)
    for (std::int64_t i = 0; i < d * hidden; ++i)
      pooled.data()[i] += w_kv.data()[h * d * hidden + i] / static_cast<float>(heads);
  return pooled;
}
// [/mean-pool-to-mqa]

// H heads sharing one K/V head, in float64 from the formula.
std::vector<double> reference_layer(const MqaWeights& w, const Tensor& x, std::int64_t heads) {
  const std::int64_t T = x.dim(0), hidden = x.dim(1), d = w.w_k.dim(0);
  const auto project = [&](const Tensor& m) {
    std::vector<double> y(T * m.dim(0), 0.0);
    for (std::int64_t t = 0; t < T; ++t)
      for (std::int64_t o = 0; o < m.dim(0); ++o)
        for (std::int64_t i = 0; i < hidden; ++i) y[t * m.dim(0) + o] += double{x.at({t, i})} * m.at({o, i});
    return y;
  };
  const auto q = project(w.w_q), k = project(w.w_k), v = project(w.w_v);
  std::vector<double> context(T * heads * d, 0.0), out(T * hidden, 0.0);
  for (std::int64_t h = 0; h < heads; ++h)
    for (std::int64_t i = 0; i < T; ++i) {
      std::vector<double> s(i + 1);
      double top = -1e300, sum = 0.0;
      for (std::int64_t j = 0; j <= i; ++j) {
        double dot = 0.0;
        for (std::int64_t c = 0; c < d; ++c) dot += q[(i * heads + h) * d + c] * k[j * d + c];
        top = std::max(top, s[j] = dot / std::sqrt(double(d)));
      }
      for (double& e : s) sum += (e = std::exp(e - top));
      for (std::int64_t j = 0; j <= i; ++j)
        for (std::int64_t c = 0; c < d; ++c) context[(i * heads + h) * d + c] += s[j] / sum * v[j * d + c];
    }
  for (std::int64_t t = 0; t < T; ++t)
    for (std::int64_t o = 0; o < hidden; ++o)
      for (std::int64_t c = 0; c < heads * d; ++c) out[t * hidden + o] += context[t * heads * d + c] * w.w_o.at({o, c});
  return out;
}

double relative_error(const Tensor& got, const Tensor& want) {
  double num = 0.0, den = 0.0;
  for (std::int64_t i = 0; i < got.numel(); ++i) {
    num += std::pow(double{got.data()[i]} - want.data()[i], 2);
    den += std::pow(double{want.data()[i]}, 2);
  }
  return std::sqrt(num / den);
}

// An MHA layer whose key and value heads share a common part: head h = shared + spread * own_h.
af::GroupedWeights correlated_mha(af::Rng& rng, std::int64_t hidden, std::int64_t heads, std::int64_t d,
                                  double spread) {
  const double in = 1.0 / std::sqrt(static_cast<double>(hidden));
  const auto heads_around_shared = [&] {
    const Tensor shared = af::random_normal(Shape{d, hidden}, rng, in);
    Tensor w(Shape{heads * d, hidden});
    for (std::int64_t h = 0; h < heads; ++h) {
      const Tensor own = af::random_normal(Shape{d, hidden}, rng, in);
      for (std::int64_t i = 0; i < d * hidden; ++i)
        w.data()[h * d * hidden + i] = shared.data()[i] + static_cast<float>(spread) * own.data()[i];
    }
    return w;
  };
  af::GroupedWeights w;
  w.q_proj = af::random_normal(Shape{heads * d, hidden}, rng, in);
  w.k_proj = heads_around_shared();
  w.v_proj = heads_around_shared();
  w.o_proj = af::random_normal(Shape{hidden, heads * d}, rng, 1.0 / std::sqrt(static_cast<double>(heads * d)));
  return w;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Chapter 03: multi-query attention, one K/V head shared by every query head",
               "ch03_multi_query_attention"};
  std::int64_t seq_len = 10, hidden = 64, heads = 8;
  std::uint64_t seed = 3;
  std::string out_dir;
  app.add_option("--seq-len", seq_len, "Tokens in the prompt")->check(CLI::Range(1, 512))->capture_default_str();
  app.add_option("--hidden", hidden, "Model width")->check(CLI::Range(1, 1024))->capture_default_str();
  app.add_option("--heads", heads, "Query heads H (must divide --hidden)")
      ->check(CLI::Range(1, 256))
      ->capture_default_str();
  app.add_option("--seed", seed, "Seed of the random inputs and weights")
      ->check(af::seed_value())
      ->capture_default_str();
  app.add_option("--out", out_dir, "Directory for the data of the MHA/MQA comparison (mha_vs_mqa.csv) and numbers.json")
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
    const MqaWeights w{
        af::random_normal(Shape{heads * d, hidden}, rng, in), af::random_normal(Shape{d, hidden}, rng, in),
        af::random_normal(Shape{d, hidden}, rng, in),
        af::random_normal(Shape{hidden, heads * d}, rng, 1.0 / std::sqrt(static_cast<double>(heads * d)))};
    const Tensor x = af::random_normal(Shape{seq_len, hidden}, rng);

    fmt::print("Multi-query attention: T = {}, hidden = {}, H = {} query heads of d = {}, one K/V head, seed {}\n",
               seq_len, hidden, heads, d, seed);
    fmt::print("  prefill: q [{0}, {1}, {2}], k, v [{0}, {2}]; each head: weights [{0}, {0}]\n", seq_len, heads, d);
    fmt::print("  decode: q_t [{0}, {1}] against cache K, V [t + 1, {1}] -> weights [{0}, t + 1] in one pass\n\n",
               heads, d);

    af::KvCache prefill_cache(seq_len, d, d), decode_cache(seq_len, d, d);
    const Tensor prefill = mqa_prefill(w, x.matrix(), heads, prefill_cache);
    Tensor decoded(Shape{seq_len, hidden});
    for (std::int64_t t = 0; t < seq_len; ++t)
      std::ranges::copy(mqa_decode_step(w, x.matrix().rows_slice(t, 1), heads, decode_cache).values(),
                        decoded.data() + t * hidden);

    // The library with G = 1, and an MHA layer (G = H) whose H key/value heads are copies of the one head.
    af::GroupedKvCache lib_cache(seq_len, 1, d);
    const Tensor lib = af::grouped_attention(x.matrix(), {hidden, heads, 1, d},
                                             {w.w_q, w.w_k, w.w_v, w.w_o, {}, {}, {}}, {}, lib_cache);
    Tensor tied_k(Shape{heads * d, hidden}), tied_v(Shape{heads * d, hidden});
    for (std::int64_t h = 0; h < heads; ++h) {
      std::ranges::copy(w.w_k.values(), tied_k.data() + h * d * hidden);
      std::ranges::copy(w.w_v.values(), tied_v.data() + h * d * hidden);
    }
    af::GroupedKvCache tied_cache(seq_len, heads, d);
    const Tensor tied = af::grouped_attention(x.matrix(), {hidden, heads, heads, d},
                                              {w.w_q, tied_k, tied_v, w.w_o, {}, {}, {}}, {}, tied_cache);

    af::Checks checks;
    const double tolerance = af::scaled_tolerance(1e-5, af::max_abs(prefill.values()));
    checks.expect_close("prefill vs float64 reference",
                        af::max_abs_diff(prefill.values(), reference_layer(w, x, heads)), tolerance);
    checks.expect_close("decode through the shared cache vs prefill",
                        af::max_abs_diff(decoded.values(), prefill.values()), tolerance);
    checks.expect_close("from scratch vs lib/ grouped_attention (G = 1)",
                        af::max_abs_diff(prefill.values(), lib.values()), tolerance);
    checks.expect_close("MQA vs MHA with H identical K/V heads", af::max_abs_diff(prefill.values(), tied.values()),
                        tolerance);

    // [what-shrinks]
    // Per token and layer, at equal width: what MQA changes and what it leaves alone (counts, from the shapes).
    const std::int64_t t = 4096;
    std::string csv = "quantity,mha,mqa\n";
    const auto row = [&csv](const char* what, double mha, double mqa) {
      fmt::print("  {:<44} {:>14.0f} {:>14.0f} {:>8.1f}x\n", what, mha, mqa, mha / mqa);
      csv += fmt::format("{},{:.0f},{:.0f}\n", what, mha, mqa);
    };
    fmt::print("\nMHA vs MQA for this layer (H = {}, d = {}, f32), one decode step at t = {}\n", heads, d, t);
    fmt::print("  {:<44} {:>14} {:>14} {:>9}\n", "", "MHA", "MQA", "ratio");
    row("K/V cache bytes per token", 2.0 * heads * d * 4, 2.0 * d * 4);
    row("K/V bytes read per decode step", 2.0 * heads * d * 4 * t, 2.0 * d * 4 * t);
    row("K/V projection FLOPs per token", 2.0 * 2 * hidden * heads * d, 2.0 * 2 * hidden * d);
    row("query projection FLOPs per token", 2.0 * hidden * heads * d, 2.0 * hidden * heads * d);
    row("attention FLOPs per decode step (qK and pV)", 2.0 * 2 * heads * d * t, 2.0 * 2 * heads * d * t);
    // [/what-shrinks]
    const std::filesystem::path dir = out_dir.empty() ? std::filesystem::path{} : af::make_output_directory(out_dir);
    if (!out_dir.empty())
      af::write_output_file(dir / "mha_vs_mqa.csv", [&](af::OutputFile& file) { file.print("{}", csv); });

    af::CacheCard card = af::dense_kv_card("multi-query attention (this program's layer)", heads, 1, d, af::DType::f32);
    card.trade_offs = fmt::format(
        "memory and decode reads {}x smaller than MHA of the same width; query projection and attention FLOPs "
        "unchanged; quality: every head must use the same keys and values (see the pooling table below)",
        heads);
    const std::vector<af::ModelCache> models = {af::dense_model("Falcon-7B").cache()};
    fmt::print("\n{}", af::format_cache_card(card, models, std::vector<std::int64_t>{seq_len, 4096}));

    // The whole-model caches per token that the text compares: Falcon-7B (MQA) against Llama-2-7B (MHA).
    af::BookNumbers numbers;
    const std::int64_t falcon = af::dense_model("Falcon-7B").cache().bytes_per_token();
    const std::int64_t llama2 = af::dense_model("Llama-2-7B").cache().bytes_per_token();
    numbers.set("falcon_cache_per_token", af::human_bytes(static_cast<double>(falcon)));
    numbers.set("llama2_cache_per_token", af::human_bytes(static_cast<double>(llama2)));
    numbers.print("llama2_over_falcon", "{:.0f}", static_cast<double>(llama2) / static_cast<double>(falcon));

    // Where it fails: an MHA layer's heads cannot all be one head. Convert MHA layers whose K/V heads differ by
    // `spread` around a shared part into MQA by mean-pooling, and measure the output error (no retraining).
    fmt::print("\nMean-pooling an MHA layer's {} K/V heads into one (no uptraining): output error\n", heads);
    fmt::print("  {:>8} {:>22}\n", "spread", "relative output error");
    double identical_heads_error = 0.0;
    for (double spread : {0.0, 0.1, 0.3, 1.0, 3.0}) {
      const af::GroupedWeights mha = correlated_mha(rng, hidden, heads, d, spread);
      const MqaWeights pooled{mha.q_proj, mean_pool_heads(mha.k_proj, heads), mean_pool_heads(mha.v_proj, heads),
                              mha.o_proj};
      af::GroupedKvCache mha_cache(seq_len, heads, d);
      const Tensor want = af::grouped_attention(x.matrix(), {hidden, heads, heads, d}, mha, {}, mha_cache);
      af::KvCache mqa_cache(seq_len, d, d);
      const Tensor got = mqa_prefill(pooled, x.matrix(), heads, mqa_cache);
      fmt::print("  {:>8.1f} {:>22.4f}\n", spread, relative_error(got, want));
      if (spread == 0.0) identical_heads_error = relative_error(got, want);
      if (spread == 1.0) numbers.print("pooling_error_spread_1", "{:.2f}", relative_error(got, want));
      if (spread == 3.0) numbers.print("pooling_error_spread_3", "{:.2f}", relative_error(got, want));
    }
    checks.expect_close("pooling identical heads changes nothing", identical_heads_error, 1e-5);
    if (!out_dir.empty()) numbers.write(dir);
    return checks.all_passed();
  });
}
