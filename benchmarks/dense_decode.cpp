// bench_dense_decode: prefill time and per-token decode latency of MHA, GQA and MQA at equal width on the
// CPU, with the KV-cache bytes each decode step reads beside its time, and the machine's own streaming read
// bandwidth for comparison. A benchmark program, not a test: it prints a table and writes a CSV.
//
//   build/bin/bench_dense_decode [--hidden 1024] [--heads 8] [--head-dim 128] [--gqa-kv-heads 2]
//                                [--contexts 1024,4096,16384] [--prefill 128,512] [--repeats 5] [--out DIR]

#include "af/accounting.hpp"
#include "af/error.hpp"
#include "af/grouped_attention.hpp"
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

// The machine's read bandwidth as one core streams it: the sum of a buffer far larger than the caches.
double streaming_read_gbps(int repeats) {
  std::vector<float> buffer(std::size_t{128} << 20, 1.0f);  // 512 MiB
  volatile float sink = 0.0f;
  const double seconds = bench::median_seconds(repeats, [&] {
    float partial[16] = {};
    for (std::size_t i = 0; i < buffer.size(); i += 16)
      for (std::size_t j = 0; j < 16; ++j) partial[j] += buffer[i + j];
    float total = 0.0f;
    for (float p : partial) total += p;
    sink = sink + total;
  });
  return static_cast<double>(buffer.size() * sizeof(float)) / seconds / 1e9;
}

af::GroupedWeights random_weights(af::Rng& rng, const af::GroupedShape& s) {
  const std::int64_t qd = s.heads * s.head_dim, kvd = s.kv_heads * s.head_dim;
  return {af::random_uniform(af::Shape{qd, s.hidden}, rng, -0.05, 0.05),
          af::random_uniform(af::Shape{kvd, s.hidden}, rng, -0.05, 0.05),
          af::random_uniform(af::Shape{kvd, s.hidden}, rng, -0.05, 0.05),
          af::random_uniform(af::Shape{s.hidden, qd}, rng, -0.05, 0.05),
          {},
          {},
          {}};
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"CPU benchmark: prefill and decode of MHA, GQA and MQA at equal width", "bench_dense_decode"};
  std::int64_t hidden = 1024, heads = 8, head_dim = 128, gqa_kv_heads = 2;
  std::vector<std::int64_t> contexts = {1024, 4096, 16384}, prefill_lengths = {128, 512};
  int repeats = 5;
  std::string out_dir;
  app.add_option("--hidden", hidden, "Model width")->check(CLI::Range(1, 16384))->capture_default_str();
  app.add_option("--heads", heads, "Query heads H")->check(CLI::Range(1, 256))->capture_default_str();
  app.add_option("--head-dim", head_dim, "Head dimension d")->check(CLI::Range(1, 1024))->capture_default_str();
  app.add_option("--gqa-kv-heads", gqa_kv_heads, "KV heads of the GQA variant")
      ->check(CLI::Range(1, 256))
      ->capture_default_str();
  app.add_option("--contexts", contexts, "Cached tokens for the decode timings")
      ->delimiter(',')
      ->check(CLI::Range(1, 1 << 20));
  app.add_option("--prefill", prefill_lengths, "Prompt lengths for the prefill timings")
      ->delimiter(',')
      ->check(CLI::Range(1, 1 << 16));
  app.add_option("--repeats", repeats, "Timed repetitions (the median is reported)")
      ->check(CLI::Range(1, 1000))
      ->capture_default_str();
  app.add_option("--out", out_dir, "Directory for dense_decode.csv and numbers.json")->check(af::output_directory());

  return af::run_program(app, argc, argv, [&] {
    af::require(heads % gqa_kv_heads == 0, "--heads {} is not divisible by --gqa-kv-heads {}", heads, gqa_kv_heads);
    af::Rng rng(5);
    const double stream = streaming_read_gbps(repeats);
    const std::string machine =
        fmt::format("{}, {} hardware threads", bench::cpu_model(), std::thread::hardware_concurrency());
    fmt::print("CPU: {}\nStreaming read, one core: {:.1f} GB/s (sum over 512 MiB, median of {})\n", machine, stream,
               repeats);
    fmt::print("Layer: hidden {}, H = {} query heads of d = {}, float32; one thread\n\n", hidden, heads, head_dim);

    struct Variant {
      const char* name;
      std::int64_t kv_heads;
    };
    const std::vector<Variant> variants = {{"MHA", heads}, {"GQA", gqa_kv_heads}, {"MQA", 1}};
    std::string csv = fmt::format(
        "# machine: {}\n# streaming_read_gbps: {:.2f}\n# layer: hidden {}, heads {}, head_dim {}, float32\n", machine,
        stream, hidden, heads, head_dim);
    csv += "phase,variant,kv_heads,tokens,seconds,kv_bytes_read,gbps\n";

    std::vector<double> longest_context_seconds;  // MHA, GQA, MQA at the largest context
    fmt::print("Decode: one query token over the cache (attention only), median of {}\n", repeats);
    fmt::print("  {:<4} {:>3} {:>8} {:>12} {:>16} {:>10} {:>12}\n", "", "G", "context", "time (ms)", "K+V bytes read",
               "GB/s", "of stream");
    for (const Variant& v : variants) {
      const af::GroupedShape shape{hidden, heads, v.kv_heads, head_dim};
      for (std::int64_t t : contexts) {
        af::GroupedKvCache cache(t, v.kv_heads, head_dim);
        const af::Tensor kv = af::random_uniform(af::Shape{t, v.kv_heads * head_dim}, rng, -1.0, 1.0);
        cache.append(kv.matrix(), kv.matrix());
        const af::Tensor q = af::random_uniform(af::Shape{1, heads * head_dim}, rng, -1.0, 1.0);
        const double seconds =
            bench::median_seconds(repeats, [&] { (void)af::grouped_attend(q.matrix(), shape, cache, {}); });
        const std::int64_t bytes = 2 * t * v.kv_heads * head_dim * static_cast<std::int64_t>(sizeof(float));
        const double gbps = static_cast<double>(bytes) / seconds / 1e9;
        fmt::print("  {:<4} {:>3} {:>8} {:>12.3f} {:>16} {:>10.2f} {:>11.0f}%\n", v.name, v.kv_heads, t, seconds * 1e3,
                   bytes, gbps, 100.0 * gbps / stream);
        csv += fmt::format("decode,{},{},{},{:.6e},{},{:.3f}\n", v.name, v.kv_heads, t, seconds, bytes, gbps);
        if (t == contexts.back()) longest_context_seconds.push_back(seconds);
      }
    }
    // If decode were bound by the bytes it reads, the time ratios would equal the byte ratios.
    af::BookNumbers numbers;
    numbers.print("dense_gqa_byte_ratio", "{}", heads / gqa_kv_heads);
    numbers.print("dense_mqa_byte_ratio", "{}", heads);
    numbers.print("dense_mha_over_gqa", "{:.1f}", longest_context_seconds[0] / longest_context_seconds[1]);
    numbers.print("dense_mha_over_mqa", "{:.1f}", longest_context_seconds[0] / longest_context_seconds[2]);
    numbers.print("dense_shortest_context", "{}", contexts.front());
    numbers.set("dense_mha_cache_shortest",
                af::human_bytes(static_cast<double>(2 * contexts.front() * heads * head_dim *
                                                    static_cast<std::int64_t>(sizeof(float)))));
    fmt::print(
        "  at {} tokens: MHA takes {:.1f}x the time of GQA (reads {}x the bytes) and {:.1f}x that of MQA ({}x)\n",
        contexts.back(), longest_context_seconds[0] / longest_context_seconds[1], heads / gqa_kv_heads,
        longest_context_seconds[0] / longest_context_seconds[2], heads);

    fmt::print("\nPrefill: the whole layer (projections and causal attention) over T tokens, median of {}\n", repeats);
    fmt::print("  {:<4} {:>3} {:>8} {:>12} {:>16}\n", "", "G", "T", "time (ms)", "ms per token");
    for (const Variant& v : variants) {
      const af::GroupedShape shape{hidden, heads, v.kv_heads, head_dim};
      const af::GroupedWeights w = random_weights(rng, shape);
      for (std::int64_t T : prefill_lengths) {
        const af::Tensor x = af::random_uniform(af::Shape{T, hidden}, rng, -1.0, 1.0);
        const double seconds = bench::median_seconds(repeats, [&] {
          af::GroupedKvCache cache(T, v.kv_heads, head_dim);
          (void)af::grouped_attention(x.matrix(), shape, w, {}, cache);
        });
        fmt::print("  {:<4} {:>3} {:>8} {:>12.2f} {:>16.3f}\n", v.name, v.kv_heads, T, seconds * 1e3,
                   seconds * 1e3 / static_cast<double>(T));
        csv += fmt::format("prefill,{},{},{},{:.6e},0,0\n", v.name, v.kv_heads, T, seconds);
      }
    }
    if (!out_dir.empty()) {
      const std::filesystem::path dir = af::make_output_directory(out_dir);
      af::write_output_file(dir / "dense_decode.csv", [&](af::OutputFile& file) { file.print("{}", csv); });
      numbers.write(dir);
    }
    return true;
  });
}
