// Chapter 13's CPU benchmark: the time of a causal prefill of decayed linear attention (one head, one thread)
// against the prompt length, in the quadratic masked form, the blocked (lightning) form and the token-by-token
// recurrence (af::linear_attention_*). A benchmark program, not a test: it prints a table and writes
// linear_prefill.csv.
//
//   build/bin/bench_linear_prefill [--max-len 8192] [--block 256] [--head-dim 64] [--repeats 3] [--out DIR]

#include "af/error.hpp"
#include "af/linear_attention.hpp"
#include "af/program.hpp"
#include "af/random.hpp"

#include "timing.hpp"

#include <fmt/format.h>

#include <filesystem>
#include <string>

int main(int argc, char** argv) {
  CLI::App app{"Benchmark: linear-attention prefill time against length, three forms", "bench_linear_prefill"};
  std::int64_t max_len = 8192, block = 256, head_dim = 64;
  int repeats = 3;
  std::string out_dir;
  app.add_option("--max-len", max_len, "Longest prompt T (lengths 256, 512, ... up to it)")
      ->check(CLI::Range(256, 65536))
      ->capture_default_str();
  app.add_option("--block", block, "Block size B of the blocked form (MiniMax: 256)")
      ->check(CLI::Range(1, 4096))
      ->capture_default_str();
  app.add_option("--head-dim", head_dim, "Head dimension d")->check(CLI::Range(1, 512))->capture_default_str();
  app.add_option("--repeats", repeats, "Timed runs per point (the median is reported)")
      ->check(CLI::Range(1, 100))
      ->capture_default_str();
  app.add_option("--out", out_dir, "Directory for linear_prefill.csv")->check(af::output_directory());

  return af::run_program(app, argc, argv, [&] {
    const std::string machine = bench::cpu_model();
    const double slope = af::lightning_slopes(64, 40, 80).back();
    fmt::print("CPU: {}\nOne head, d = {}, B = {}, slope {:.5f}, float32, one thread; median of {}\n\n", machine,
               head_dim, block, slope, repeats);
    fmt::print("  {:>7} {:>15} {:>15} {:>15} {:>10}\n", "T", "quadratic (ms)", "blocked (ms)", "recurrent (ms)",
               "quad/blk");
    std::string csv =
        fmt::format("# machine: {}\n# head_dim {}, block {}, float32, one thread\n", machine, head_dim, block);
    csv += "seq_len,quadratic_s,blocked_s,recurrent_s\n";
    af::Rng rng(1313);
    for (std::int64_t t = 256; t <= max_len; t *= 2) {
      const af::Tensor q = af::random_normal(af::Shape{t, head_dim}, rng),
                       k = af::random_normal(af::Shape{t, head_dim}, rng),
                       v = af::random_normal(af::Shape{t, head_dim}, rng);
      af::Tensor state(af::Shape{head_dim, head_dim});
      const double quadratic = bench::median_seconds(
          repeats, [&] { (void)af::linear_attention_quadratic(q.matrix(), k.matrix(), v.matrix(), slope); });
      const double blocked = bench::median_seconds(repeats, [&] {
        state = af::Tensor(af::Shape{head_dim, head_dim});
        (void)af::linear_attention_blocked(q.matrix(), k.matrix(), v.matrix(), slope, block, state.matrix());
      });
      const double recurrent = bench::median_seconds(repeats, [&] {
        state = af::Tensor(af::Shape{head_dim, head_dim});
        (void)af::linear_attention_recurrent(q.matrix(), k.matrix(), v.matrix(), slope, state.matrix());
      });
      fmt::print("  {:>7} {:>15.2f} {:>15.2f} {:>15.2f} {:>10.2f}\n", t, quadratic * 1e3, blocked * 1e3,
                 recurrent * 1e3, quadratic / blocked);
      csv += fmt::format("{},{:.6e},{:.6e},{:.6e}\n", t, quadratic, blocked, recurrent);
    }
    if (!out_dir.empty()) {
      const std::filesystem::path dir = af::make_output_directory(out_dir);
      af::write_output_file(dir / "linear_prefill.csv", [&](af::OutputFile& file) { file.print("{}", csv); });
    }
    return true;
  });
}
