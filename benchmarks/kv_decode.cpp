// bench_kv_decode: prefill against decode on the CPU for a small model of grouped attention layers (chapter 05).
// Time to first token (the prefill of a prompt through every layer) against the prompt length, and the
// latency of one decode step against the context and the batch, with the bytes one step reads beside it:
// the weights (read once per step, whatever the batch) and the KV cache (read once per sequence).
// Attention layers only (projections and attention, no MLP), float32, one thread. A benchmark program, not a
// test: it prints a table and writes a CSV.
//
//   build/bin/bench_kv_decode [--layers 2] [--hidden 512] [--heads 8] [--kv-heads 2] [--prompts 128,256,512]
//                             [--contexts 512,2048,8192] [--batches 1,4,16] [--repeats 5] [--out DIR]

#include "af/accounting.hpp"
#include "af/error.hpp"
#include "af/grouped_attention.hpp"
#include "af/linalg.hpp"
#include "af/program.hpp"
#include "af/random.hpp"
#include "timing.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

namespace {

// [decode-step]
// One decode step of a batch: every layer projects the batch's B new tokens together ([B, hidden] through each
// weight matrix, so each weight is read once per step), then each sequence appends its k and v and attends over
// its own cache, and the B outputs are projected back together.
af::Tensor decode_step(const af::Tensor& x, const af::GroupedShape& s, const std::vector<af::GroupedWeights>& layers,
                       std::vector<std::vector<af::GroupedKvCache>>& caches) {
  af::Tensor h = x;  // [B, hidden]
  for (std::size_t l = 0; l < layers.size(); ++l) {
    const af::Tensor q = af::linear(h.matrix(), layers[l].q_proj.matrix());  // [B, H d]
    const af::Tensor k = af::linear(h.matrix(), layers[l].k_proj.matrix());  // [B, G d]
    const af::Tensor v = af::linear(h.matrix(), layers[l].v_proj.matrix());
    af::Tensor context(af::Shape{x.dim(0), s.heads * s.head_dim});
    for (std::int64_t b = 0; b < x.dim(0); ++b) {
      af::GroupedKvCache& cache = caches[l][static_cast<std::size_t>(b)];
      cache.append(k.matrix().rows_slice(b, 1), v.matrix().rows_slice(b, 1));
      const af::Tensor o = af::grouped_attend(q.matrix().rows_slice(b, 1), s, cache, {});
      std::ranges::copy(o.values(), context.matrix().row(b).begin());
    }
    h = af::linear(context.matrix(), layers[l].o_proj.matrix());  // [B, hidden]
  }
  return h;
}
// [/decode-step]

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"CPU benchmark: time to first token and decode latency against context and batch", "bench_kv_decode"};
  std::int64_t layers = 2, hidden = 512, heads = 8, kv_heads = 2;
  std::vector<std::int64_t> prompts = {128, 256, 512}, contexts = {512, 2048, 8192}, batches = {1, 4, 16};
  int repeats = 5;
  std::string out_dir;
  app.add_option("--layers", layers, "Attention layers")->check(CLI::Range(1, 64))->capture_default_str();
  app.add_option("--hidden", hidden, "Model width")->check(CLI::Range(1, 16384))->capture_default_str();
  app.add_option("--heads", heads, "Query heads H (must divide --hidden)")
      ->check(CLI::Range(1, 256))
      ->capture_default_str();
  app.add_option("--kv-heads", kv_heads, "KV heads G (must divide --heads)")
      ->check(CLI::Range(1, 256))
      ->capture_default_str();
  app.add_option("--prompts", prompts, "Prompt lengths for the time to first token")
      ->delimiter(',')
      ->check(CLI::Range(1, 1 << 16));
  app.add_option("--contexts", contexts, "Cached tokens for the decode steps")
      ->delimiter(',')
      ->check(CLI::Range(1, 1 << 20));
  app.add_option("--batches", batches, "Sequences per decode step")->delimiter(',')->check(CLI::Range(1, 1024));
  app.add_option("--repeats", repeats, "Timed repetitions (the median is reported)")
      ->check(CLI::Range(1, 1000))
      ->capture_default_str();
  app.add_option("--out", out_dir, "Directory for kv_decode.csv and numbers.json")->check(af::output_directory());

  return af::run_program(app, argc, argv, [&] {
    af::require(hidden % heads == 0 && heads % kv_heads == 0,
                "--hidden {}, --heads {}, --kv-heads {} (expected hidden divisible by heads, heads by KV heads)",
                hidden, heads, kv_heads);
    const af::GroupedShape s{hidden, heads, kv_heads, hidden / heads};
    const std::int64_t d = s.head_dim, qd = heads * d, kvd = kv_heads * d;
    af::Rng rng(505);
    std::vector<af::GroupedWeights> weights;
    for (std::int64_t l = 0; l < layers; ++l)
      weights.push_back({af::random_uniform(af::Shape{qd, hidden}, rng, -0.05, 0.05),
                         af::random_uniform(af::Shape{kvd, hidden}, rng, -0.05, 0.05),
                         af::random_uniform(af::Shape{kvd, hidden}, rng, -0.05, 0.05),
                         af::random_uniform(af::Shape{hidden, qd}, rng, -0.05, 0.05),
                         {},
                         {},
                         {}});
    const std::int64_t weight_bytes = layers * (2 * qd + 2 * kvd) * hidden * 4;
    const std::int64_t kv_bytes_per_token = layers * 2 * kvd * 4;
    const std::string machine =
        fmt::format("{}, {} hardware threads", bench::cpu_model(), std::thread::hardware_concurrency());
    fmt::print("CPU: {}; one thread, float32\n", machine);
    fmt::print("Model: {} attention layers, hidden {}, H = {} query heads on G = {} KV heads of d = {}\n", layers,
               hidden, heads, kv_heads, d);
    fmt::print("  weights {} B (read once per step), KV cache {} B per token\n\n", weight_bytes, kv_bytes_per_token);
    std::string csv =
        fmt::format("# machine: {}\n# model: {} layers, hidden {}, heads {}, kv_heads {}, head_dim {}, float32\n",
                    machine, layers, hidden, heads, kv_heads, d);
    csv += "phase,tokens,batch,seconds,weight_bytes,kv_bytes\n";

    fmt::print("Time to first token: the prefill of a prompt through every layer, median of {}\n", repeats);
    fmt::print("  {:>8} {:>12} {:>16}\n", "prompt", "TTFT (ms)", "ms per token");
    for (std::int64_t T : prompts) {
      const af::Tensor x = af::random_uniform(af::Shape{T, hidden}, rng, -1.0, 1.0);
      const double seconds = bench::median_seconds(repeats, [&] {
        af::Tensor h = x;
        for (std::int64_t l = 0; l < layers; ++l) {
          af::GroupedKvCache cache(T, kv_heads, d);
          h = af::grouped_attention(h.matrix(), s, weights[static_cast<std::size_t>(l)], {}, cache);
        }
      });
      fmt::print("  {:>8} {:>12.2f} {:>16.4f}\n", T, seconds * 1e3, seconds * 1e3 / static_cast<double>(T));
      csv += fmt::format("prefill,{},1,{:.6e},{},{}\n", T, seconds, weight_bytes, 0);
    }

    fmt::print("\nDecode: one step of a batch of B sequences, each with `context` cached tokens, median of {}\n",
               repeats);
    fmt::print("  {:>8} {:>6} {:>12} {:>16} {:>14} {:>14}\n", "context", "B", "step (ms)", "ms per token",
               "weights read", "KV read");
    for (std::int64_t b : batches)
      for (std::int64_t t : contexts) {
        std::vector<std::vector<af::GroupedKvCache>> caches(static_cast<std::size_t>(layers));
        const af::Tensor filler = af::random_uniform(af::Shape{t, kvd}, rng, -1.0, 1.0);
        for (auto& layer : caches)
          for (std::int64_t i = 0; i < b; ++i) {
            layer.emplace_back(t + repeats, kv_heads, d);
            layer.back().append(filler.matrix(), filler.matrix());
          }
        const af::Tensor x = af::random_uniform(af::Shape{b, hidden}, rng, -1.0, 1.0);
        const double seconds = bench::median_seconds(repeats, [&] { (void)decode_step(x, s, weights, caches); });
        const std::int64_t kv = b * t * kv_bytes_per_token;
        fmt::print("  {:>8} {:>6} {:>12.3f} {:>16.4f} {:>14} {:>14}\n", t, b, seconds * 1e3,
                   seconds * 1e3 / static_cast<double>(b), weight_bytes, kv);
        csv += fmt::format("decode,{},{},{:.6e},{},{}\n", t, b, seconds, weight_bytes, kv);
      }
    if (!out_dir.empty()) {
      const std::filesystem::path dir = af::make_output_directory(out_dir);
      af::write_output_file(dir / "kv_decode.csv", [&](af::OutputFile& file) { file.print("{}", csv); });
      // What chapter 05's text compares: the weights a step reads once, and one sequence's cache at the
      // shortest and the longest context.
      af::BookNumbers numbers;
      numbers.set("weights", af::human_bytes(static_cast<double>(weight_bytes)));
      numbers.print("shortest_context", "{}", contexts.front());
      numbers.print("longest_context", "{}", contexts.back());
      numbers.set("cache_longest", af::human_bytes(static_cast<double>(contexts.back() * kv_bytes_per_token)));
      numbers.write(dir);
    }
    return true;
  });
}
