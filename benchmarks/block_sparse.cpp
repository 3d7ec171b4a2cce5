// Chapter 10's CPU benchmark: time and FLOPs of block-sparse attention (af::block_sparse_attention, one head,
// one thread) against the density of its block pattern, at one fixed size. A benchmark program, not a test:
// it prints a table and writes block_sparse.csv.
//
//   build/bin/bench_block_sparse [--seq-len 1024] [--block 64] [--head-dim 64] [--repeats 5] [--out DIR]

#include "af/block_sparse.hpp"
#include "af/error.hpp"
#include "af/program.hpp"
#include "af/random.hpp"

#include "timing.hpp"

#include <fmt/format.h>

#include <filesystem>
#include <string>
#include <vector>

int main(int argc, char** argv) {
  CLI::App app{"Benchmark: block-sparse attention time against density", "bench_block_sparse"};
  std::int64_t seq_len = 1024, block = 64, head_dim = 64;
  int repeats = 5;
  std::string out_dir;
  app.add_option("--seq-len", seq_len, "Tokens T of the prefill")->check(CLI::Range(1, 16384))->capture_default_str();
  app.add_option("--block", block, "Tokens per block B")->check(CLI::Range(1, 4096))->capture_default_str();
  app.add_option("--head-dim", head_dim, "Head dimension d")->check(CLI::Range(1, 512))->capture_default_str();
  app.add_option("--repeats", repeats, "Timed runs per pattern (the median is reported)")
      ->check(CLI::Range(1, 100))
      ->capture_default_str();
  app.add_option("--out", out_dir, "Directory for block_sparse.csv")->check(af::output_directory());

  return af::run_program(app, argc, argv, [&] {
    const std::int64_t blocks = (seq_len + block - 1) / block;
    af::Rng rng(1010);
    const af::Tensor q = af::random_normal(af::Shape{seq_len, head_dim}, rng),
                     k = af::random_normal(af::Shape{seq_len, head_dim}, rng),
                     v = af::random_normal(af::Shape{seq_len, head_dim}, rng);
    struct Named {
      std::string family;
      af::BlockPattern p;
    };
    std::vector<Named> patterns;
    for (const std::int64_t l : {1, 2, 4, 8}) patterns.push_back({"local", {block, l, 0, 0}});
    for (const std::int64_t g : {1, 2}) patterns.push_back({"local+global", {block, 2, g, 0}});
    for (const std::int64_t s : {8, 4, 2}) patterns.push_back({"strided", {block, 1, 0, s}});
    patterns.push_back({"bigbird-like", {block, 2, 1, 4}});
    patterns.push_back({"dense", {block, blocks, 0, 0}});

    const std::string machine = bench::cpu_model();
    fmt::print("CPU: {}\nOne head, T = {}, B = {} ({} blocks), d = {}, float32, one thread; median of {}\n\n", machine,
               seq_len, block, blocks, head_dim, repeats);
    fmt::print("  {:<13} {:>5} {:>6} {:>6} {:>8} {:>10} {:>8} {:>10} {:>8} {:>9}\n", "pattern", "local", "global",
               "stride", "density", "pairs", "GFLOP", "time (ms)", "GFLOP/s", "vs dense");
    std::string csv = fmt::format("# machine: {}\n# seq_len {}, block {}, head_dim {}, float32, one thread\n", machine,
                                  seq_len, block, head_dim);
    csv += "family,local,global,stride,density,pairs,flops,seconds\n";
    // Every pattern is timed first; the last one is dense, and each row's "vs dense" divides by that row's time.
    struct Row {
      double density, flops, seconds;
      std::int64_t pairs;
    };
    std::vector<Row> rows;
    for (const Named& n : patterns) {
      const af::BlockMask m = af::block_mask(n.p, seq_len, seq_len);
      af::BlockedWork work;
      (void)af::block_sparse_attention(q.matrix(), k.matrix(), v.matrix(), n.p, m, &work);
      const double seconds = bench::median_seconds(
          repeats, [&] { (void)af::block_sparse_attention(q.matrix(), k.matrix(), v.matrix(), n.p, m); });
      // 2 d FLOPs for q . k and 2 d for the weighted values, per scored pair.
      const double flops = static_cast<double>(work.pairs_scored) * 4.0 * static_cast<double>(head_dim);
      rows.push_back({m.density(), flops, seconds, work.pairs_scored});
    }
    const double dense_seconds = rows.back().seconds;
    for (std::size_t i = 0; i < patterns.size(); ++i) {
      const Named& n = patterns[i];
      const Row& r = rows[i];
      fmt::print("  {:<13} {:>5} {:>6} {:>6} {:>8.3f} {:>10} {:>8.4f} {:>10.2f} {:>8.2f} {:>9.3f}\n", n.family,
                 n.p.local_blocks, n.p.global_blocks, n.p.stride, r.density, r.pairs, r.flops / 1e9, r.seconds * 1e3,
                 r.flops / r.seconds / 1e9, r.seconds / dense_seconds);
      csv += fmt::format("{},{},{},{},{:.6f},{},{:.6e},{:.6e}\n", n.family, n.p.local_blocks, n.p.global_blocks,
                         n.p.stride, r.density, r.pairs, r.flops, r.seconds);
    }
    if (!out_dir.empty()) {
      const std::filesystem::path dir = af::make_output_directory(out_dir);
      af::write_output_file(dir / "block_sparse.csv", [&](af::OutputFile& file) { file.print("{}", csv); });
    }
    return true;
  });
}
