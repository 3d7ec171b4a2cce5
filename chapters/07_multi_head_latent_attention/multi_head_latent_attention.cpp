// Chapter 07 — multi-head latent attention (MLA), the DeepSeek-V2/V3 formulation.
//
// Every token is compressed to one latent vector c_KV (plus one small RoPE key shared by all heads); that is
// all the cache keeps. A decode step then either rebuilds each head's keys and values from the latents
// (naive) or folds the key up-projection into the query and the value up-projection into the output and
// attends over the latents directly (absorbed). Both are built from scratch, checked against each other,
// against the library (af::mla_attention, both paths) and a float64 textbook layer, and their decode FLOPs and
// bytes are counted for DeepSeek-V3.
//
//   build/bin/ch07_multi_head_latent_attention [--seq-len 10] [--heads 4] [--kv-lora-rank 32] [--seed 7] [--out DIR]

#include "af/accounting.hpp"
#include "af/error.hpp"
#include "af/linalg.hpp"
#include "af/mla.hpp"
#include "af/program.hpp"
#include "af/random.hpp"
#include "af/softmax.hpp"

#include <fmt/format.h>

#include <cmath>
#include <filesystem>
#include <optional>
#include <vector>

namespace {

using af::ConstMatrix;
using af::Shape;
using af::Tensor;

// The latent cache, from scratch: one row per token of c_KV [r] and of the shared RoPE key [rope].
struct LatentCache {
  std::vector<float> latent, rope_keys;
  std::int64_t r, rope, length = 0;
  ConstMatrix c() const { return {latent.data(), length, r, r}; }
  ConstMatrix k_pe() const { return {rope_keys.data(), length, rope, rope}; }
};

// [project-query]
// One token's queries [H, nope + rope]: down to q_lora_rank, RMSNorm, up to every head; the rope part of each
// head rotated by the token's position.
Tensor project_query(const af::MlaShape& s, const af::MlaWeights& w, const af::Rope& rope, ConstMatrix x_t,
                     double position) {
  Tensor q_low = af::linear(x_t, w.q_a_proj.matrix());  // [1, q_lora_rank]
  af::rms_norm_rows(q_low.matrix(), w.q_a_layernorm.values(), s.rms_norm_eps);
  Tensor q = af::linear(q_low.matrix(), w.q_b_proj.matrix()).reshaped(Shape{s.heads, s.qk_head_dim()});
  for (std::int64_t h = 0; h < s.heads; ++h) rope.rotate(q.matrix().row(h).subspan(s.qk_nope_head_dim), position);
  return q;
}
// [/project-query]

// [compress-kv]
// One token's contribution to the cache: the joint down-projection gives the latent (RMS-normalised) and the
// decoupled RoPE key (rotated). Nothing per head is stored.
void compress_kv(const af::MlaShape& s, const af::MlaWeights& w, const af::Rope& rope, ConstMatrix x_t, double position,
                 LatentCache& cache) {
  Tensor kv = af::linear(x_t, w.kv_a_proj_with_mqa.matrix());  // [1, r + rope]
  af::Matrix c{kv.data(), 1, s.kv_lora_rank, s.kv_lora_rank};
  af::rms_norm_rows(c, w.kv_a_layernorm.values(), s.rms_norm_eps);
  std::span<float> k_pe = kv.values().subspan(s.kv_lora_rank);
  rope.rotate(k_pe, position);
  cache.latent.insert(cache.latent.end(), kv.values().begin(), kv.values().begin() + s.kv_lora_rank);
  cache.rope_keys.insert(cache.rope_keys.end(), k_pe.begin(), k_pe.end());
  ++cache.length;
}
// [/compress-kv]

// Rows of kv_b_proj [H (nope + v), r]: W_UK of head h (its first `nope` rows) and W_UV (the next `v`).
ConstMatrix w_uk(const af::MlaShape& s, const af::MlaWeights& w, std::int64_t h) {
  return w.kv_b_proj.matrix().rows_slice(h * (s.qk_nope_head_dim + s.v_head_dim), s.qk_nope_head_dim);
}
ConstMatrix w_uv(const af::MlaShape& s, const af::MlaWeights& w, std::int64_t h) {
  return w.kv_b_proj.matrix().rows_slice(h * (s.qk_nope_head_dim + s.v_head_dim) + s.qk_nope_head_dim, s.v_head_dim);
}

// [naive-step]
// Naive: rebuild head h's keys K_h = [W_UK_h c_t ; k_pe_t] and values V_h = W_UV_h c_t for every cached token,
// then attend as in chapter 02. Every step multiplies all t latents by the up-projections again.
Tensor naive_step(const af::MlaShape& s, const af::MlaWeights& w, const Tensor& q, const LatentCache& cache,
                  double scale) {
  Tensor context(Shape{1, s.heads * s.v_head_dim});
  for (std::int64_t h = 0; h < s.heads; ++h) {
    const Tensor k_nope = af::matmul_transposed(cache.c(), w_uk(s, w, h));  // [t, nope]: reconstructed
    const Tensor v = af::matmul_transposed(cache.c(), w_uv(s, w, h));       // [t, v]: reconstructed
    const std::span<const float> q_h = q.matrix().row(h);
    Tensor scores(Shape{1, cache.length});
    for (std::int64_t t = 0; t < cache.length; ++t)
      scores.data()[t] = static_cast<float>((af::dot(q_h.first(s.qk_nope_head_dim), k_nope.matrix().row(t)) +
                                             af::dot(q_h.subspan(s.qk_nope_head_dim), cache.k_pe().row(t))) *
                                            scale);
    af::softmax_rows(scores.matrix());
    const Tensor out = af::matmul(scores.matrix(), v.matrix());  // [1, v]
    std::ranges::copy(out.values(), context.data() + h * s.v_head_dim);
  }
  return af::linear(context.matrix(), w.o_proj.matrix());
}
// [/naive-step]

// [absorbed-step]
// Absorbed: q_nope . (W_UK c_t) = (W_UK^T q_nope) . c_t, so the query is moved into latent space once, scored
// against the cached latents themselves, and the latents are mixed before W_UV is applied once per head.
Tensor absorbed_step(const af::MlaShape& s, const af::MlaWeights& w, const Tensor& q, const LatentCache& cache,
                     double scale) {
  Tensor context(Shape{1, s.heads * s.v_head_dim});
  for (std::int64_t h = 0; h < s.heads; ++h) {
    const std::span<const float> q_h = q.matrix().row(h);
    const ConstMatrix q_nope{q_h.data(), 1, s.qk_nope_head_dim, s.qk_nope_head_dim};
    const Tensor q_latent = af::matmul(q_nope, w_uk(s, w, h));  // [1, r]: W_UK absorbed
    Tensor scores(Shape{1, cache.length});
    for (std::int64_t t = 0; t < cache.length; ++t)
      scores.data()[t] = static_cast<float>((af::dot(q_latent.values(), cache.c().row(t)) +
                                             af::dot(q_h.subspan(s.qk_nope_head_dim), cache.k_pe().row(t))) *
                                            scale);
    af::softmax_rows(scores.matrix());
    const Tensor latent_mix = af::matmul(scores.matrix(), cache.c());              // [1, r]
    const Tensor out = af::matmul_transposed(latent_mix.matrix(), w_uv(s, w, h));  // [1, v]: W_UV applied once
    std::ranges::copy(out.values(), context.data() + h * s.v_head_dim);
  }
  return af::linear(context.matrix(), w.o_proj.matrix());
}
// [/absorbed-step]

af::MlaWeights random_weights(af::Rng& rng, const af::MlaShape& s) {
  const auto linear = [&](std::int64_t out, std::int64_t in) {
    return af::random_normal(Shape{out, in}, rng, 1.0 / std::sqrt(static_cast<double>(in)));
  };
  const auto gain = [&](std::int64_t n) {
    Tensor g = af::random_normal(Shape{n}, rng, 0.2);
    for (float& v : g.values()) v += 1.0f;
    return g;
  };
  af::MlaWeights w;
  w.q_a_proj = linear(s.q_lora_rank, s.hidden);
  w.q_a_layernorm = gain(s.q_lora_rank);
  w.q_b_proj = linear(s.heads * s.qk_head_dim(), s.q_lora_rank);
  w.kv_a_proj_with_mqa = linear(s.kv_lora_rank + s.qk_rope_head_dim, s.hidden);
  w.kv_a_layernorm = gain(s.kv_lora_rank);
  w.kv_b_proj = linear(s.heads * (s.qk_nope_head_dim + s.v_head_dim), s.kv_lora_rank);
  w.o_proj = linear(s.hidden, s.heads * s.v_head_dim);
  return w;
}

// The textbook layer in float64: per-head keys and values materialised from the latents, causal softmax.
std::vector<double> reference_layer(const af::MlaShape& s, const af::MlaWeights& w, const af::Rope& rope,
                                    const Tensor& x, double scale) {
  const std::int64_t T = x.dim(0), H = s.heads, nope = s.qk_nope_head_dim, rd = s.qk_rope_head_dim, dv = s.v_head_dim,
                     r = s.kv_lora_rank, dq = nope + rd;
  std::vector<Tensor> q(T);
  LatentCache latents{{}, {}, r, rd};
  for (std::int64_t t = 0; t < T; ++t) {  // the float32 projections are shared; the attention is float64
    q[t] = project_query(s, w, rope, x.matrix().rows_slice(t, 1), static_cast<double>(t));
    compress_kv(s, w, rope, x.matrix().rows_slice(t, 1), static_cast<double>(t), latents);
  }
  std::vector<double> context(T * H * dv, 0.0), out(T * s.hidden, 0.0);
  for (std::int64_t h = 0; h < H; ++h) {
    std::vector<double> k(T * nope, 0.0), v(T * dv, 0.0);
    for (std::int64_t t = 0; t < T; ++t)
      for (std::int64_t e = 0; e < nope + dv; ++e) {
        double sum = 0.0;
        for (std::int64_t c = 0; c < r; ++c)
          sum += double{w.kv_b_proj.at({h * (nope + dv) + e, c})} * latents.c()(t, c);
        (e < nope ? k[t * nope + e] : v[t * dv + e - nope]) = sum;
      }
    for (std::int64_t i = 0; i < T; ++i) {
      std::vector<double> p(i + 1);
      double top = -1e300, total = 0.0;
      for (std::int64_t j = 0; j <= i; ++j) {
        double dot = 0.0;
        for (std::int64_t e = 0; e < nope; ++e) dot += double{q[i].at({h, e})} * k[j * nope + e];
        for (std::int64_t e = 0; e < rd; ++e) dot += double{q[i].at({h, nope + e})} * latents.k_pe()(j, e);
        top = std::max(top, p[j] = dot * scale);
      }
      for (double& e : p) total += (e = std::exp(e - top));
      for (std::int64_t j = 0; j <= i; ++j)
        for (std::int64_t e = 0; e < dv; ++e) context[(i * H + h) * dv + e] += p[j] / total * v[j * dv + e];
    }
  }
  for (std::int64_t t = 0; t < T; ++t)
    for (std::int64_t o = 0; o < s.hidden; ++o)
      for (std::int64_t c = 0; c < H * dv; ++c) out[t * s.hidden + o] += context[t * H * dv + c] * w.o_proj.at({o, c});
  (void)dq;
  return out;
}

// [decode-cost]
// Multiply-adds x 2 per decode token and layer, and the cache bytes read, for one MLA layer at context t.
struct DecodeCost {
  double naive_flops, absorbed_flops, latent_bytes, full_kv_bytes;
};
DecodeCost decode_cost(const af::MlaShape& s, double t, int bytes_per_value) {
  const double H = static_cast<double>(s.heads), r = static_cast<double>(s.kv_lora_rank),
               nope = static_cast<double>(s.qk_nope_head_dim), rd = static_cast<double>(s.qk_rope_head_dim),
               v = static_cast<double>(s.v_head_dim);
  const double naive = 2 * t * r * H * (nope + v)  // rebuild K_nope and V of every head for every cached token
                       + 2 * H * t * (nope + rd)   // scores
                       + 2 * H * t * v;            // mix values
  const double absorbed = 2 * H * nope * r         // W_UK^T q_nope, once
                          + 2 * H * t * (r + rd)   // scores against the latents and RoPE keys
                          + 2 * H * t * r          // mix latents
                          + 2 * H * v * r;         // W_UV, once
  return {naive, absorbed, t * (r + rd) * bytes_per_value, t * H * (nope + rd + v) * bytes_per_value};
}
// [/decode-cost]

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Chapter 07: multi-head latent attention, naive and absorbed decode",
               "ch07_multi_head_latent_attention"};
  af::MlaShape s{64, 4, 24, 32, 16, 8, 16, 1e-6};
  std::int64_t seq_len = 10;
  std::uint64_t seed = 7;
  std::string out_dir;
  app.add_option("--seq-len", seq_len, "Tokens (prefill, then the same tokens one by one)")
      ->check(CLI::Range(1, 1024))
      ->capture_default_str();
  app.add_option("--hidden", s.hidden, "Model width")->check(CLI::Range(1, 8192))->capture_default_str();
  app.add_option("--heads", s.heads, "Attention heads H")->check(CLI::Range(1, 256))->capture_default_str();
  app.add_option("--q-lora-rank", s.q_lora_rank, "Query latent dimension")
      ->check(CLI::Range(1, 8192))
      ->capture_default_str();
  app.add_option("--kv-lora-rank", s.kv_lora_rank, "KV latent dimension r")
      ->check(CLI::Range(1, 8192))
      ->capture_default_str();
  app.add_option("--nope-dim", s.qk_nope_head_dim, "Per-head key dimension without RoPE")
      ->check(CLI::Range(1, 1024))
      ->capture_default_str();
  app.add_option("--rope-dim", s.qk_rope_head_dim, "Decoupled RoPE key dimension (even)")
      ->check(CLI::Range(2, 1024))
      ->capture_default_str();
  app.add_option("--v-dim", s.v_head_dim, "Per-head value dimension")
      ->check(CLI::Range(1, 1024))
      ->capture_default_str();
  app.add_option("--seed", seed, "Seed of the random inputs and weights")
      ->check(af::seed_value())
      ->capture_default_str();
  app.add_option(
         "--out", out_dir,
         "Directory for the figure data (decode_cost.dat, cache_bytes.dat, cached_vs_rebuilt.dat) and numbers.json")
      ->check(af::output_directory());

  return af::run_program(app, argc, argv, [&] {
    s.validate();
    // Decoding token t rebuilds the keys and values of all t cached tokens on the naive path: about
    // T^2 / 2 x r x H x (nope + v) multiply-adds, beside T x the weights. The limit keeps a run within seconds.
    const double weights = static_cast<double>(s.hidden * s.q_lora_rank + s.q_lora_rank * s.heads * s.qk_head_dim() +
                                               s.hidden * (s.kv_lora_rank + s.qk_rope_head_dim) +
                                               s.kv_lora_rank * s.heads * (s.qk_nope_head_dim + s.v_head_dim) +
                                               s.heads * s.v_head_dim * s.hidden);
    const double tokens = static_cast<double>(seq_len), work_limit = 1e10;
    const double work = 0.5 * tokens * tokens * static_cast<double>(s.kv_lora_rank * s.heads) *
                            static_cast<double>(s.qk_nope_head_dim + s.v_head_dim + s.qk_rope_head_dim) +
                        tokens * weights;
    const double weights_limit = 1 << 26;  // 256 MiB of float32 weights
    af::require(weights <= weights_limit,
                "this shape has {:.2g} weights, above the {:.2g} this program holds in memory (lower --hidden, "
                "--heads, the ranks or the head dimensions)",
                weights, weights_limit);
    af::require(work <= work_limit,
                "--seq-len {} with this shape costs about {:.2g} multiply-adds, above the {:.0e} this program runs in "
                "seconds (lower --seq-len, --heads, --kv-lora-rank or the head dimensions)",
                seq_len, work, work_limit);
    af::Rng rng(seed);
    const af::MlaWeights w = random_weights(rng, s);
    const af::Rope rope(s.qk_rope_head_dim, 10000.0, af::RopeLayout::adjacent);
    // Unscaled RoPE, so the softmax scale is 1/sqrt(d_n + d_r); DeepSeek-V3 as released also multiplies it by YaRN's
    // mscale^2 (printed below the cache card).
    const double scale = af::mla_softmax_scale(s, std::nullopt);
    const Tensor x = af::random_normal(Shape{seq_len, s.hidden}, rng);

    fmt::print("MLA: hidden {}, H = {} heads; q latent {}, KV latent r = {}; per head: key {} + {} (RoPE), value {}\n",
               s.hidden, s.heads, s.q_lora_rank, s.kv_lora_rank, s.qk_nope_head_dim, s.qk_rope_head_dim, s.v_head_dim);
    fmt::print("  cached per token: c_KV [{}] and k_pe [{}] (shared by all heads)\n", s.kv_lora_rank,
               s.qk_rope_head_dim);
    fmt::print("  rebuilt per head and token (naive): k [{} + {}], v [{}]\n\n", s.qk_nope_head_dim, s.qk_rope_head_dim,
               s.v_head_dim);

    // [run-both-paths]
    LatentCache cache{{}, {}, s.kv_lora_rank, s.qk_rope_head_dim};
    Tensor naive(Shape{seq_len, s.hidden}), absorbed(Shape{seq_len, s.hidden});
    for (std::int64_t t = 0; t < seq_len; ++t) {
      const ConstMatrix x_t = x.matrix().rows_slice(t, 1);
      const Tensor q = project_query(s, w, rope, x_t, static_cast<double>(t));
      compress_kv(s, w, rope, x_t, static_cast<double>(t), cache);
      std::ranges::copy(naive_step(s, w, q, cache, scale).values(), naive.matrix().row(t).begin());
      std::ranges::copy(absorbed_step(s, w, q, cache, scale).values(), absorbed.matrix().row(t).begin());
    }
    // [/run-both-paths]

    std::vector<std::int64_t> positions(static_cast<std::size_t>(seq_len));
    for (std::int64_t t = 0; t < seq_len; ++t) positions[static_cast<std::size_t>(t)] = t;
    af::MlaCache lib_naive_cache(seq_len, s.kv_lora_rank, s.qk_rope_head_dim),
        lib_absorbed_cache(seq_len, s.kv_lora_rank, s.qk_rope_head_dim);
    const Tensor lib_naive =
        af::mla_attention(x.matrix(), positions, s, w, rope, scale, af::MlaPath::naive, lib_naive_cache);
    const Tensor lib_absorbed =
        af::mla_attention(x.matrix(), positions, s, w, rope, scale, af::MlaPath::absorbed, lib_absorbed_cache);
    const std::vector<double> reference = reference_layer(s, w, rope, x, scale);

    af::Checks checks;
    const double tolerance = af::scaled_tolerance(1e-5, af::max_abs(naive.values()));
    const double paths_differ = af::max_abs_diff(naive.values(), absorbed.values());
    checks.expect_close("naive decode vs absorbed decode", paths_differ, tolerance);
    checks.expect_close("naive decode vs float64 textbook layer", af::max_abs_diff(naive.values(), reference),
                        tolerance);
    checks.expect_close("absorbed decode vs float64 textbook layer", af::max_abs_diff(absorbed.values(), reference),
                        tolerance);
    checks.expect_close("decode vs lib/ prefill, naive path", af::max_abs_diff(naive.values(), lib_naive.values()),
                        tolerance);
    checks.expect_close("decode vs lib/ prefill, absorbed path",
                        af::max_abs_diff(absorbed.values(), lib_absorbed.values()), tolerance);
    checks.expect_close("cached latents vs lib/ MlaCache", af::max_abs_diff(cache.c(), lib_naive_cache.latent()),
                        tolerance);

    // [cache-card]
    af::CacheCard card = af::mla_kv_card(s.heads, s.kv_lora_rank, s.qk_rope_head_dim, af::DType::f32);
    card.mechanism = "multi-head latent attention (this program's layer)";
    const af::ModelCache deepseek{"DeepSeek-V3",
                                  "deepseek-ai/DeepSeek-V3 inference/configs/config_671B.json (61 layers, 128 heads, "
                                  "kv_lora_rank 512, qk_rope_head_dim 64)",
                                  61, af::mla_kv_card(128, 512, 64, af::DType::bf16)};
    fmt::print("\n{}", af::format_cache_card(card, std::vector<af::ModelCache>{deepseek},
                                             std::vector<std::int64_t>{4096, 131072}));
    // [/cache-card]

    // The same model's attention as MHA (keys 192 = 128 + 64, values 128 per head), GQA and MQA, beside MLA.
    const af::MlaShape v3{7168, 128, 1536, 512, 128, 64, 128, 1e-6};
    struct Row {
      const char* name;
      double bytes_per_token_layer;
    };
    const std::vector<Row> rows = {
        {"MHA: 128 heads, K 192 + V 128", 128.0 * (192 + 128) * 2},
        {"GQA: 8 KV heads, K 192 + V 128", 8.0 * (192 + 128) * 2},
        {"MQA: 1 KV head, K 192 + V 128", 1.0 * (192 + 128) * 2},
        {"MLA: c_KV 512 + k_pe 64", static_cast<double>(deepseek.card.bytes_per_token())},
    };
    af::BookNumbers numbers;
    numbers.print("mha_over_mla", "{:.0f}", rows[0].bytes_per_token_layer / rows.back().bytes_per_token_layer);
    numbers.print("gqa_over_mla", "{:.1f}", rows[1].bytes_per_token_layer / rows.back().bytes_per_token_layer);
    fmt::print("\nDeepSeek-V3's width (61 layers, bf16): KV bytes per token\n");
    fmt::print("  {:<34} {:>12} {:>14} {:>10}\n", "attention", "per layer", "per model", "vs MLA");
    for (const Row& row : rows)
      fmt::print("  {:<34} {:>12.0f} {:>14.0f} {:>9.1f}x\n", row.name, row.bytes_per_token_layer,
                 61 * row.bytes_per_token_layer, row.bytes_per_token_layer / rows.back().bytes_per_token_layer);

    // The released model rotates with YaRN (rope_scaling in config.json of huggingface.co/deepseek-ai/DeepSeek-V3:
    // type yarn, factor 40, mscale 1.0, mscale_all_dim 1.0, original_max_position_embeddings 4096), which also
    // multiplies its softmax scale by mscale(40, mscale_all_dim)^2.
    af::YarnScaling v3_yarn;
    v3_yarn.factor = 40.0;
    v3_yarn.original_context = 4096.0;
    v3_yarn.mscale = 1.0;
    v3_yarn.mscale_all_dim = 1.0;
    const double v3_plain = af::mla_softmax_scale(v3, std::nullopt), v3_scale = af::mla_softmax_scale(v3, v3_yarn);
    numbers.print("v3_mscale", "{:.3f}", af::yarn_mscale(v3_yarn.factor, v3_yarn.mscale_all_dim));
    numbers.print("v3_mscale_squared", "{:.3f}", v3_scale / v3_plain);
    numbers.print("v3_softmax_scale", "{:.4f}", v3_scale);

    fmt::print("\nOne decode token, one DeepSeek-V3 layer (bf16 cache): arithmetic and cache bytes read\n");
    fmt::print("  {:>8} {:>16} {:>16} {:>16} {:>18}\n", "context", "naive FLOPs", "absorbed FLOPs", "latent bytes",
               "per-head K/V bytes");
    for (double t : {1024.0, 4096.0, 32768.0, 131072.0}) {
      const DecodeCost c = decode_cost(v3, t, 2);
      fmt::print("  {:>8.0f} {:>16.3e} {:>16.3e} {:>16.3e} {:>18.3e}\n", t, c.naive_flops, c.absorbed_flops,
                 c.latent_bytes, c.full_kv_bytes);
      if (t == 4096.0) {
        numbers.print("naive_over_absorbed_4k", "{:.0f}", c.naive_flops / c.absorbed_flops);
        numbers.print("full_kv_over_latent_bytes", "{:.0f}", c.full_kv_bytes / c.latent_bytes);
        numbers.print("absorbed_flops_per_byte", "{:.0f}", c.absorbed_flops / c.latent_bytes);
      }
    }

    // [prefill-cost]
    // Where the absorbed path loses: a prefill of T tokens has T queries per head, and their scores against T
    // latents cost (r + d_r) per pair instead of (d_n + d_r); rebuilding K and V once per token is cheaper.
    fmt::print("\nPrefill of T tokens, one DeepSeek-V3 layer, causal (T^2 / 2 pairs): FLOPs of the two paths\n");
    fmt::print("  {:>8} {:>16} {:>16} {:>18}\n", "T", "naive", "absorbed", "absorbed / naive");
    for (double T : {128.0, 1024.0, 8192.0, 32768.0}) {
      const double H = 128, r = 512, nope = 128, rd = 64, v = 128, pairs = T * T / 2;
      const double naive_prefill = 2 * T * r * H * (nope + v) + 2 * H * pairs * (nope + rd) + 2 * H * pairs * v;
      const double absorbed_prefill =
          2 * T * H * nope * r + 2 * H * pairs * (r + rd) + 2 * H * pairs * r + 2 * T * H * v * r;
      fmt::print("  {:>8.0f} {:>16.3e} {:>16.3e} {:>18.2f}\n", T, naive_prefill, absorbed_prefill,
                 absorbed_prefill / naive_prefill);
      if (T == 1024.0) numbers.print("prefill_ratio_1k", "{:.1f}", absorbed_prefill / naive_prefill);
      if (T == 32768.0) numbers.print("prefill_ratio_32k", "{:.1f}", absorbed_prefill / naive_prefill);
    }
    // [/prefill-cost]

    if (!out_dir.empty()) {
      const std::filesystem::path dir = af::make_output_directory(out_dir);
      numbers.write(dir);
      af::write_output_file(dir / "decode_cost.dat", [&](af::OutputFile& f) {
        f.print(
            "# one DeepSeek-V3 layer, one decode token: context naive_flops absorbed_flops latent_bytes "
            "per_head_kv_bytes (bf16)\n");
        for (double t = 256; t <= 131072; t *= 2) {
          const DecodeCost c = decode_cost(v3, t, 2);
          f.print("{:.0f} {:.6e} {:.6e} {:.6e} {:.6e}\n", t, c.naive_flops, c.absorbed_flops, c.latent_bytes,
                  c.full_kv_bytes);
        }
      });
      af::write_output_file(dir / "cache_bytes.dat", [&](af::OutputFile& g) {
        g.print("# DeepSeek-V3's width, 61 layers, bf16: label bytes_per_token\n");
        for (const Row& row : rows)
          g.print("\"{}\" {:.0f}\n", std::string(row.name).substr(0, 3), 61 * row.bytes_per_token_layer);
      });
      af::write_output_file(dir / "cached_vs_rebuilt.dat", [&](af::OutputFile& h) {
        h.print(
            "# values per token and layer, DeepSeek-V3: what is cached and what the naive path rebuilds for 128 "
            "heads\n");
        h.print("cached c_KV {}\ncached k_pe {}\nrebuilt k_nope {}\nrebuilt v {}\n", 512, 64, 128 * 128, 128 * 128);
      });
    }
    fmt::print("\nnaive and absorbed decode differ by at most {:.2e} (float32)\n", paths_differ);
    fmt::print(
        "\nSoftmax scale: this layer (unscaled RoPE) 1/sqrt({} + {}) = {:.4f}; DeepSeek-V3 as released (YaRN "
        "factor 40, mscale_all_dim 1) 1/sqrt(128 + 64) x mscale^2 = {:.4f} x {:.4f} = {:.4f}\n",
        s.qk_nope_head_dim, s.qk_rope_head_dim, scale, v3_plain, v3_scale / v3_plain, v3_scale);
    return checks.all_passed();
  });
}
