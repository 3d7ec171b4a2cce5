// Chapter 04 — grouped-query attention: H query heads in G groups, one K/V head per group.
//
// Maps query head h to KV head h / (H / G) and attends without materialising expanded keys and values: each
// cached KV head is read once for its whole group. MHA (G = H) and MQA (G = 1) are the two ends. Checks every
// G that divides H against the library, against the expanded (repeat_kv) form and against float64, prefill
// against decode; prints the cache card for real GQA models; writes the data of the chapter's figures; and
// measures what converting MHA to GQA by mean-pooling costs for each G.
//
//   build/bin/ch04_grouped_query_attention [--seq-len 10] [--hidden 64] [--heads 8] [--kv-heads 2] [--seed 4] [--out
//   DIR]

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

// [kv-head-of]
// Query heads are numbered so that each group is contiguous: heads 0 .. H/G - 1 read KV head 0, the next
// H/G read KV head 1, and so on.
std::int64_t kv_head_of(std::int64_t q_head, std::int64_t heads, std::int64_t kv_heads) {
  return q_head / (heads / kv_heads);
}
// [/kv-head-of]

struct GqaLayer {
  std::int64_t heads, kv_heads, head_dim;
  af::GroupedWeights w;  // q_proj [H d, hidden], k_proj and v_proj [G d, hidden], o_proj [hidden, H d]
};

// [gqa-decode-step]
// One token. For each KV head g, the queries of its group are stacked into a [H/G, d] matrix and meet K_g and
// V_g in one pass: each cached key and value is loaded once per step and used H/G times.
Tensor gqa_decode_step(const GqaLayer& l, ConstMatrix x_t, af::GroupedKvCache& cache) {
  const std::int64_t d = l.head_dim, group = l.heads / l.kv_heads;
  const Tensor q = af::linear(x_t, l.w.q_proj.matrix());  // [1, H d]
  cache.append(af::linear(x_t, l.w.k_proj.matrix()).matrix(), af::linear(x_t, l.w.v_proj.matrix()).matrix());
  Tensor context(Shape{1, l.heads * d});
  for (std::int64_t g = 0; g < l.kv_heads; ++g) {
    const ConstMatrix q_group{q.data() + g * group * d, group, d, d};  // [H/G, d]
    Tensor weights = af::matmul_transposed(q_group, cache.keys(g));    // [H/G, t + 1]
    for (float& s : weights.values()) s *= static_cast<float>(af::default_scale(d));
    af::softmax_rows(weights.matrix());
    const Tensor out = af::matmul(weights.matrix(), cache.values(g));  // [H/G, d]
    std::ranges::copy(out.values(), context.data() + g * group * d);
  }
  return af::linear(context.matrix(), l.w.o_proj.matrix());  // [1, hidden]
}
// [/gqa-decode-step]

// [gqa-prefill]
// The prompt: each query head attends over the keys and values of its group's KV head.
Tensor gqa_prefill(const GqaLayer& l, ConstMatrix x, af::GroupedKvCache& cache) {
  const std::int64_t T = x.rows, d = l.head_dim;
  const Tensor q = af::linear(x, l.w.q_proj.matrix()).reshaped(Shape{T, l.heads, d});
  cache.append(af::linear(x, l.w.k_proj.matrix()).matrix(), af::linear(x, l.w.v_proj.matrix()).matrix());
  Tensor context(Shape{T, l.heads, d});
  for (std::int64_t h = 0; h < l.heads; ++h) {
    const std::int64_t g = kv_head_of(h, l.heads, l.kv_heads);
    const Tensor out = af::attention(af::head_view(q, h), cache.keys(g), cache.values(g), {});
    af::Matrix dst = af::head_view(context, h);
    for (std::int64_t t = 0; t < T; ++t) std::ranges::copy(out.matrix().row(t), dst.row(t).begin());
  }
  return af::linear(context.reshaped(Shape{T, l.heads * d}).matrix(), l.w.o_proj.matrix());
}
// [/gqa-prefill]

// [repeat-kv]
// The expanded form some implementations use: copy each KV head H/G times so that GQA becomes MHA. Same
// result, H/G times the memory and the reads. Here applied to the projection weights, which gives the same
// expanded keys and values.
Tensor repeat_kv_heads(const Tensor& w_kv, std::int64_t kv_heads, std::int64_t group) {
  const std::int64_t d = w_kv.dim(0) / kv_heads, hidden = w_kv.dim(1);
  Tensor expanded(Shape{kv_heads * group * d, hidden});
  for (std::int64_t h = 0; h < kv_heads * group; ++h)
    std::copy_n(w_kv.data() + (h / group) * d * hidden, d * hidden, expanded.data() + h * d * hidden);
  return expanded;
}
// [/repeat-kv]

GqaLayer random_layer(af::Rng& rng, std::int64_t hidden, std::int64_t heads, std::int64_t kv_heads, std::int64_t d) {
  const double in = 1.0 / std::sqrt(static_cast<double>(hidden));
  GqaLayer l{heads, kv_heads, d, {}};
  l.w.q_proj = af::random_normal(Shape{heads * d, hidden}, rng, in);
  l.w.k_proj = af::random_normal(Shape{kv_heads * d, hidden}, rng, in);
  l.w.v_proj = af::random_normal(Shape{kv_heads * d, hidden}, rng, in);
  l.w.o_proj = af::random_normal(Shape{hidden, heads * d}, rng, 1.0 / std::sqrt(static_cast<double>(heads * d)));
  return l;
}

// The layer in float64: head h uses KV head floor(h * G / H), computed without kv_head_of.
std::vector<double> reference_layer(const GqaLayer& l, const Tensor& x) {
  const std::int64_t T = x.dim(0), hidden = x.dim(1), d = l.head_dim, H = l.heads, G = l.kv_heads;
  const auto project = [&](const Tensor& m) {
    std::vector<double> y(T * m.dim(0), 0.0);
    for (std::int64_t t = 0; t < T; ++t)
      for (std::int64_t o = 0; o < m.dim(0); ++o)
        for (std::int64_t i = 0; i < hidden; ++i) y[t * m.dim(0) + o] += double{x.at({t, i})} * m.at({o, i});
    return y;
  };
  const auto q = project(l.w.q_proj), k = project(l.w.k_proj), v = project(l.w.v_proj);
  std::vector<double> context(T * H * d, 0.0), out(T * hidden, 0.0);
  for (std::int64_t h = 0; h < H; ++h) {
    const std::int64_t g = h * G / H;
    for (std::int64_t i = 0; i < T; ++i) {
      std::vector<double> s(i + 1);
      double top = -1e300, sum = 0.0;
      for (std::int64_t j = 0; j <= i; ++j) {
        double dot = 0.0;
        for (std::int64_t c = 0; c < d; ++c) dot += q[(i * H + h) * d + c] * k[(j * G + g) * d + c];
        top = std::max(top, s[j] = dot / std::sqrt(double(d)));
      }
      for (double& e : s) sum += (e = std::exp(e - top));
      for (std::int64_t j = 0; j <= i; ++j)
        for (std::int64_t c = 0; c < d; ++c) context[(i * H + h) * d + c] += s[j] / sum * v[(j * G + g) * d + c];
    }
  }
  for (std::int64_t t = 0; t < T; ++t)
    for (std::int64_t o = 0; o < hidden; ++o)
      for (std::int64_t c = 0; c < H * d; ++c) out[t * hidden + o] += context[t * H * d + c] * l.w.o_proj.at({o, c});
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

// Mean of each group of H/G consecutive heads of a [H d, hidden] projection -> [G d, hidden].
Tensor mean_pool_groups(const Tensor& w, std::int64_t heads, std::int64_t kv_heads) {
  const std::int64_t d = w.dim(0) / heads, hidden = w.dim(1), group = heads / kv_heads;
  Tensor pooled(Shape{kv_heads * d, hidden});
  for (std::int64_t h = 0; h < heads; ++h)
    for (std::int64_t i = 0; i < d * hidden; ++i)
      pooled.data()[(h / group) * d * hidden + i] += w.data()[h * d * hidden + i] / static_cast<float>(group);
  return pooled;
}

// An MHA layer whose key and value heads are a shared part plus `spread` times a part of their own.
GqaLayer correlated_mha(af::Rng& rng, std::int64_t hidden, std::int64_t heads, std::int64_t d, double spread) {
  GqaLayer l = random_layer(rng, hidden, heads, heads, d);
  const double in = 1.0 / std::sqrt(static_cast<double>(hidden));
  for (Tensor* w : {&l.w.k_proj, &l.w.v_proj}) {
    const Tensor shared = af::random_normal(Shape{d, hidden}, rng, in);
    for (std::int64_t h = 0; h < heads; ++h)
      for (std::int64_t i = 0; i < d * hidden; ++i)
        w->data()[h * d * hidden + i] = shared.data()[i] + static_cast<float>(spread) * w->data()[h * d * hidden + i];
  }
  return l;
}

void write_figure_data(const std::string& out_dir, std::int64_t heads, std::int64_t kv_heads,
                       const std::vector<std::vector<double>>& pooling, const std::vector<std::int64_t>& pooling_groups,
                       const std::vector<double>& spreads) {
  const std::filesystem::path dir = af::make_output_directory(out_dir);
  af::write_output_file(dir / "head_mapping.dat", [&](af::OutputFile& mapping) {
    mapping.print("# query head -> KV head, one block per variant (index 0 MHA, 1 GQA, 2 MQA): q_head kv_head G H\n");
    for (std::int64_t g : {heads, kv_heads, std::int64_t{1}}) {
      for (std::int64_t h = 0; h < heads; ++h) mapping.print("{} {} {} {}\n", h, kv_head_of(h, heads, g), g, heads);
      mapping.print("\n\n");
    }
  });
  // Llama-3.1-8B's shape (32 layers, 32 query heads of 128) with G = 32, 8 (its own) and 1, in bf16.
  const af::DenseModel llama = af::dense_model("Llama-3.1-8B");
  af::write_output_file(dir / "cache_bytes.dat", [&](af::OutputFile& bytes) {
    bytes.print(
        "# KV-cache bytes per token, whole model, bf16: label bytes (Llama-3.1-8B shape with G = H, 8, 1; real "
        "models)\n");
    for (std::int64_t g : {std::int64_t{32}, std::int64_t{8}, std::int64_t{1}}) {
      const af::CacheCard card = af::dense_kv_card("", llama.heads, g, llama.head_dim, af::DType::bf16);
      bytes.print("\"{} (G = {})\" {}\n",
                  g == 32  ? "MHA"
                  : g == 1 ? "MQA"
                           : "GQA",
                  g, llama.layers * card.bytes_per_token());
    }
    for (const char* name : {"Llama-3.1-70B", "Qwen3-30B-A3B", "Qwen3-235B-A22B"})
      bytes.print("\"{}\" {}\n", name, af::dense_model(name).cache().bytes_per_token());
  });
  af::write_output_file(dir / "decode_reads.dat", [&](af::OutputFile& reads) {
    reads.print("# bytes one decode step reads from the KV cache, whole model, bf16, Llama-3.1-8B shape\n");
    reads.print("# context mha_bytes gqa8_bytes mqa_bytes\n");
    for (std::int64_t t = 1024; t <= 131072; t *= 2) {
      reads.print("{}", t);
      for (std::int64_t g : {std::int64_t{32}, std::int64_t{8}, std::int64_t{1}}) {
        const af::CacheCard card = af::dense_kv_card("", llama.heads, g, llama.head_dim, af::DType::bf16);
        reads.print(" {}", llama.layers * card.bytes_read(t));
      }
      reads.print("\n");
    }
  });
  af::write_output_file(dir / "pooling_error.dat", [&](af::OutputFile& pool) {
    pool.print("# relative output error of mean-pooling an MHA layer into G KV heads: G then one column per spread\n");
    pool.print("# G");
    for (double s : spreads) pool.print(" spread_{}", s);
    pool.print("\n");
    for (std::size_t i = 0; i < pooling_groups.size(); ++i) {
      pool.print("{}", pooling_groups[i]);
      for (double e : pooling[i]) pool.print(" {:.6f}", e);
      pool.print("\n");
    }
  });
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Chapter 04: grouped-query attention, H query heads sharing G KV heads", "ch04_grouped_query_attention"};
  std::int64_t seq_len = 10, hidden = 64, heads = 8, kv_heads = 2;
  std::uint64_t seed = 4;
  std::string out_dir;
  app.add_option("--seq-len", seq_len, "Tokens in the prompt")->check(CLI::Range(1, 256))->capture_default_str();
  app.add_option("--hidden", hidden, "Model width")->check(CLI::Range(1, 512))->capture_default_str();
  app.add_option("--heads", heads, "Query heads H (must divide --hidden)")
      ->check(CLI::Range(1, 256))
      ->capture_default_str();
  app.add_option("--kv-heads", kv_heads, "KV heads G (must divide --heads)")
      ->check(CLI::Range(1, 256))
      ->capture_default_str();
  app.add_option("--seed", seed, "Seed of the random inputs and weights")
      ->check(af::seed_value())
      ->capture_default_str();
  app.add_option("--out", out_dir, "Directory for the figure data")->check(af::output_directory());

  return af::run_program(app, argc, argv, [&] {
    // The projections cost T x hidden x hidden, the attention T x T x hidden, for each of the three layers
    // (G = H, G, 1): each stays within seconds.
    af::require_product_within({{"--seq-len", seq_len}, {"--hidden", hidden}, {"--hidden", hidden}}, 1 << 22);
    af::require_product_within({{"--seq-len", seq_len}, {"--seq-len", seq_len}, {"--hidden", hidden}}, 1 << 22);
    af::require(hidden % heads == 0, "--hidden {} is not divisible by --heads {} (expected hidden = heads x head_dim)",
                hidden, heads);
    af::require(heads % kv_heads == 0, "--heads {} is not divisible by --kv-heads {} (expected whole groups)", heads,
                kv_heads);
    const std::int64_t d = hidden / heads;
    af::Rng rng(seed);
    const Tensor x = af::random_normal(Shape{seq_len, hidden}, rng);

    fmt::print(
        "Grouped-query attention: T = {}, hidden = {}, H = {} query heads in G = {} groups of {}, d = {}, seed {}\n",
        seq_len, hidden, heads, kv_heads, heads / kv_heads, d, seed);
    fmt::print("  query head -> KV head:");
    for (std::int64_t h = 0; h < heads; ++h) fmt::print(" {}->{}", h, kv_head_of(h, heads, kv_heads));
    fmt::print(
        "\n  decode: per KV head g, queries [{0}, {1}] against K_g, V_g [t + 1, {1}]; cache K, V [t + 1, {2}, {1}]\n\n",
        heads / kv_heads, d, kv_heads);

    af::Checks checks;
    for (std::int64_t g = heads; g >= 1; --g) {  // every group count that divides H: MHA ... MQA
      if (heads % g != 0) continue;
      const GqaLayer l = random_layer(rng, hidden, heads, g, d);
      af::GroupedKvCache prefill_cache(seq_len, g, d), decode_cache(seq_len, g, d), lib_cache(seq_len, g, d),
          expanded_cache(seq_len, heads, d);
      const Tensor prefill = gqa_prefill(l, x.matrix(), prefill_cache);
      Tensor decoded(Shape{seq_len, hidden});
      for (std::int64_t t = 0; t < seq_len; ++t)
        std::ranges::copy(gqa_decode_step(l, x.matrix().rows_slice(t, 1), decode_cache).values(),
                          decoded.data() + t * hidden);
      const Tensor lib = af::grouped_attention(x.matrix(), {hidden, heads, g, d}, l.w, {}, lib_cache);
      const af::GroupedWeights expanded{l.w.q_proj,
                                        repeat_kv_heads(l.w.k_proj, g, heads / g),
                                        repeat_kv_heads(l.w.v_proj, g, heads / g),
                                        l.w.o_proj,
                                        {},
                                        {},
                                        {}};
      const Tensor mha = af::grouped_attention(x.matrix(), {hidden, heads, heads, d}, expanded, {}, expanded_cache);
      const double tolerance = af::scaled_tolerance(1e-5, af::max_abs(prefill.values()));
      af::WorstError worst;
      worst.add(af::max_abs_diff(prefill.values(), reference_layer(l, x)));
      worst.add(af::max_abs_diff(decoded.values(), prefill.values()));
      worst.add(af::max_abs_diff(prefill.values(), lib.values()));
      worst.add(af::max_abs_diff(prefill.values(), mha.values()));
      checks.expect_close(fmt::format("G = {:<2}: float64, decode, lib/, repeat_kv", g), worst.value(), tolerance);
    }

    // [cache-card]
    af::CacheCard card =
        af::dense_kv_card("grouped-query attention (this program's layer)", heads, kv_heads, d, af::DType::f32);
    card.trade_offs = fmt::format(
        "memory and decode reads {}x smaller than MHA and {}x larger than MQA; attention FLOPs unchanged; each group "
        "of {} query heads shares its keys and values",
        heads / kv_heads, kv_heads, heads / kv_heads);
    std::vector<af::ModelCache> models;
    for (const char* name : {"Llama-3.1-8B", "Llama-3.1-70B", "Qwen3-30B-A3B", "Qwen3-235B-A22B"})
      models.push_back(af::dense_model(name).cache());
    fmt::print("\n{}", af::format_cache_card(card, models, std::vector<std::int64_t>{4096, 131072}));
    // [/cache-card]

    fmt::print("\nThe same width, three ways (H = {}, d = {}, f32), and real models (bf16)\n", heads, d);
    fmt::print("  {:<20} {:>5} {:>4} {:>18} {:>24}\n", "layer", "H", "G", "bytes/token/layer",
               "read/step/layer, t=4096");
    for (std::int64_t g : {heads, kv_heads, std::int64_t{1}}) {
      const af::CacheCard c = af::dense_kv_card("", heads, g, d, af::DType::f32);
      fmt::print("  {:<20} {:>5} {:>4} {:>18} {:>24}\n",
                 g == heads ? "MHA"
                 : g == 1   ? "MQA"
                            : "GQA",
                 heads, g, c.bytes_per_token(), c.bytes_read(4096));
    }
    for (const char* name :
         {"Llama-2-7B", "Falcon-7B", "Llama-3.1-8B", "Llama-3.1-70B", "Qwen3-30B-A3B", "Qwen3-235B-A22B"}) {
      const af::DenseModel& m = af::dense_model(name);
      const af::ModelCache c = m.cache();
      fmt::print("  {:<20} {:>5} {:>4} {:>18} {:>24}\n", m.name, m.heads, m.kv_heads, c.card.bytes_per_token(),
                 c.card.bytes_read(4096));
    }

    // Where it fails: mean-pooling an MHA layer into G KV heads, without uptraining, for heads that share more or less.
    const std::vector<double> spreads = {0.3, 1.0, 3.0};
    std::vector<std::int64_t> groups;
    std::vector<std::vector<double>> pooling;
    fmt::print("\nMean-pooling an MHA layer's {} K/V heads into G (no uptraining): relative output error\n", heads);
    fmt::print("  {:>4}", "G");
    for (double s : spreads) fmt::print(" {:>14}", fmt::format("spread {:.1f}", s));
    fmt::print("\n");
    std::vector<GqaLayer> mha_layers;
    for (double s : spreads) mha_layers.push_back(correlated_mha(rng, hidden, heads, d, s));
    for (std::int64_t g = heads; g >= 1; --g) {
      if (heads % g != 0) continue;
      groups.push_back(g);
      pooling.emplace_back();
      fmt::print("  {:>4}", g);
      for (const GqaLayer& mha : mha_layers) {
        af::GroupedKvCache mha_cache(seq_len, heads, d), gqa_cache(seq_len, g, d);
        const Tensor want = af::grouped_attention(x.matrix(), {hidden, heads, heads, d}, mha.w, {}, mha_cache);
        const af::GroupedWeights pooled{mha.w.q_proj,
                                        mean_pool_groups(mha.w.k_proj, heads, g),
                                        mean_pool_groups(mha.w.v_proj, heads, g),
                                        mha.w.o_proj,
                                        {},
                                        {},
                                        {}};
        const Tensor got = af::grouped_attention(x.matrix(), {hidden, heads, g, d}, pooled, {}, gqa_cache);
        pooling.back().push_back(relative_error(got, want));
        fmt::print(" {:>14.4f}", pooling.back().back());
      }
      fmt::print("\n");
    }

    if (!out_dir.empty()) write_figure_data(out_dir, heads, kv_heads, pooling, groups, spreads);
    return checks.all_passed();
  });
}
