// Chapter 26 — MLA decode: one decode step of multi-head latent attention over its latent cache, on the GPU.
//
// Prints, for DeepSeek-V3's shape (128 query heads over one 576-wide latent row per token) at the benchmark's
// batches and lengths, the FLOPs of a step, the bytes it must read and their ratio, against the card's ratio of
// dense bf16 tensor-core throughput to memory bandwidth; runs the kernel on a ragged batch with a shuffled block
// table and checks it against the float64 reference; with --bench times it on the benchmark's shapes
// (kernels/bench/bench_mla.py runs the same shapes against FlashMLA and FlashInfer).
//
//   build/bin/ch26_mla_decode [--q-heads 128] [--page-size 64] [--seed 26] [--bench]
//
// Exit status: 0 when every check passes, 1 when one fails, 2 for a bad flag, 77 without a CUDA device.
#pragma nv_diag_suppress 554  // tensor.hpp's conversion operator, never instantiated for const T here

// nvcc 13.0 rejects af/tensor.hpp's span conversions when fmt's headers come first: the library headers that
// include af/tensor.hpp go before the kernel headers (which reach fmt through af/error.hpp).
#include "af/compare.hpp"
#include "af/kernels/reference.hpp"

#include "af/kernels/device_buffer.hpp"
#include "af/kernels/gpu_program.hpp"
#include "af/kernels/mla_decode.hpp"
#include "af/kernels/timing.hpp"
#include "af/mla_decode.hpp"
#include "af/program.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <string>
#include <vector>

namespace {

using af::MlaDecodeShape;
using af::kernels::DeviceBuffer;

// DeepSeek-V3's softmax scale without YaRN's factor: 1 / sqrt(qk_nope_head_dim + qk_rope_head_dim) =
// 1 / sqrt(128 + 64) (the scores are taken over the absorbed 576 values, but the heads' query-key dimension is
// 192). Its YaRN mscale multiplies this by about 1.9 at 128K (af::mla_softmax_scale); any value checks the same.
const float deepseek_v3_scale = static_cast<float>(1.0 / std::sqrt(192.0));

struct Workload {
  std::int64_t batch, length;
};
constexpr Workload workloads[] = {{1, 4096}, {32, 4096}, {128, 4096}, {1, 32768}, {16, 32768}, {64, 32768}};

// [intensity]
// FLOPs per byte of a step: every query head multiplies each cached 576-wide row twice (q . row, then the
// 512-wide latent into the output), 2 FLOPs per multiply-add, while the row itself is read once for all heads.
// With 128 heads that is 2 x 128 x (576 + 512) / 1152, about 242 FLOPs per byte, whatever the length: a step of
// MLA decode is a matrix product, not a stream, and the tensor cores, not the memory, may set its time.
void print_intensity(std::int64_t q_heads, double peak_tflops, double bandwidth_gbps) {
  std::printf("%-18s %10s %10s %10s\n", "batch x length", "GFLOP", "MB read", "FLOP/byte");
  for (const Workload& w : workloads) {
    const MlaDecodeShape s{w.batch, q_heads, 512, 64, 64, (w.length + 63) / 64, w.batch * ((w.length + 63) / 64)};
    const std::vector<std::int32_t> lengths(static_cast<std::size_t>(w.batch), static_cast<std::int32_t>(w.length));
    const double flops = af::mla_decode_flops(s, lengths), bytes = af::mla_decode_bytes(s, lengths);
    std::printf("%5lld x %-10lld %10.2f %10.1f %10.0f\n", static_cast<long long>(w.batch),
                static_cast<long long>(w.length), flops / 1e9, bytes / 1e6, flops / bytes);
  }
  std::printf("this card: %.0f dense bf16 TFLOP/s / %.0f GB/s = %.0f FLOP/byte where the two limits meet\n",
              peak_tflops, bandwidth_gbps, peak_tflops * 1e12 / (bandwidth_gbps * 1e9));
}
// [/intensity]

struct Problem {
  MlaDecodeShape shape;
  std::vector<std::uint16_t> q, cache;
  std::vector<std::int32_t> block_table, lengths;
};

Problem make_problem(MlaDecodeShape s, std::vector<std::int32_t> lengths, af::Rng& rng) {
  Problem p;
  s.batch = static_cast<std::int64_t>(lengths.size());
  s.max_pages_per_seq = (*std::max_element(lengths.begin(), lengths.end()) + s.page_size - 1) / s.page_size;
  s.num_pages = s.batch * s.max_pages_per_seq;
  p.shape = s;
  p.lengths = std::move(lengths);
  p.block_table.resize(static_cast<std::size_t>(s.num_pages));
  std::iota(p.block_table.begin(), p.block_table.end(), 0);
  for (std::size_t i = p.block_table.size() - 1; i > 0; --i)  // shuffled: a sequence's pages lie anywhere
    std::swap(p.block_table[i], p.block_table[static_cast<std::size_t>(rng.below(static_cast<std::int64_t>(i) + 1))]);
  p.q = af::kernels::random_bf16(static_cast<std::size_t>(s.batch * s.q_heads * s.key_dim()), rng);
  p.cache = af::kernels::random_bf16(static_cast<std::size_t>(s.num_pages * s.page_values()), rng);
  return p;
}

struct Device {
  DeviceBuffer<std::uint16_t> q, cache, out;
  DeviceBuffer<std::int32_t> block_table, lengths;
  af::kernels::MlaDecodePlan plan;
  DeviceBuffer<unsigned char> workspace;
  explicit Device(const Problem& p)
      : q(std::span<const std::uint16_t>(p.q)),
        cache(std::span<const std::uint16_t>(p.cache)),
        out(static_cast<std::size_t>(p.shape.batch * p.shape.q_heads * p.shape.latent_dim)),
        block_table(std::span<const std::int32_t>(p.block_table)),
        lengths(std::span<const std::int32_t>(p.lengths)),
        plan(af::kernels::plan_mla_decode(p.shape, af::kernels::multiprocessor_count())),
        workspace(plan.workspace_bytes) {}
  void run(const Problem& p) {
    af::kernels::mla_decode_attention(plan, p.shape, q.data(), cache.data(), block_table.data(), lengths.data(),
                                      out.data(), deepseek_v3_scale, workspace.data(), workspace.size(), nullptr);
  }
};

// [check]
// The kernel on one ragged batch (lengths 1, a page plus one, 777 and 5,000) against the float64 reference:
// relative error of the whole output, and the largest error of one element over the largest |expected|.
void check(const MlaDecodeShape& s, std::uint64_t seed, af::Checks& checks) {
  af::Rng rng(seed);
  const auto page = static_cast<std::int32_t>(s.page_size);
  const Problem p = make_problem(s, {1, page + 1, 777, 5000}, rng);
  Device d(p);
  d.out.fill_bytes(0xFF);  // NaN: an element the kernel does not write fails
  d.run(p);
  CUDA_CHECK(cudaDeviceSynchronize());
  const std::vector<float> got = af::kernels::bf16_to_floats(d.out.download());
  const std::vector<double> expected =
      af::mla_decode_f64(p.shape, p.q, p.cache, p.block_table, p.lengths, deepseek_v3_scale);
  const af::kernels::OutputError e = af::kernels::output_error(got, expected);
  std::printf("%lld heads, pages of %lld, %d splits: relative error %.2e, worst element %.2e of %.2f\n",
              static_cast<long long>(s.q_heads), static_cast<long long>(s.page_size), d.plan.splits, e.relative,
              e.worst, e.largest);
  checks.expect_true("MLA decode (" + std::to_string(s.q_heads) + " heads, pages of " + std::to_string(s.page_size) +
                         ") matches float64: relative error < 1e-2",
                     af::within_tolerance(e.relative, 1e-2));
  checks.expect_true("every element within 1.5e-2 of the largest |expected|",
                     af::within_tolerance(e.worst, 1.5e-2 * e.largest));
}
// [/check]

void bench(std::int64_t q_heads) {
  std::printf("\n%-18s %10s %10s %10s %10s\n", "batch x length", "median ms", "p95 ms", "TFLOP/s", "GB/s");
  for (const Workload& w : workloads) {
    af::Rng rng(99);
    const Problem p = make_problem(
        {1, q_heads, 512, 64, 64, 1, 1},
        std::vector<std::int32_t>(static_cast<std::size_t>(w.batch), static_cast<std::int32_t>(w.length)), rng);
    Device d(p);
    const auto t = af::kernels::time_calls([&](int) { d.run(p); }, nullptr, 10, 50);
    const double flops = af::mla_decode_flops(p.shape, p.lengths), bytes = af::mla_decode_bytes(p.shape, p.lengths);
    std::printf("%5lld x %-10lld %10.4f %10.4f %10.1f %10.0f\n", static_cast<long long>(w.batch),
                static_cast<long long>(w.length), t.median_ms, t.p95_ms, flops / t.median_ms / 1e9,
                bytes / t.median_ms / 1e6);
  }
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Chapter 26: MLA decode (the absorbed path over the latent cache, on the tensor cores)",
               "ch26_mla_decode"};
  MlaDecodeShape s{1, 128, 512, 64, 64, 1, 1};
  std::uint64_t seed = 26;
  bool run_bench = false;
  double peak_tflops = 989.0, bandwidth_gbps = 3350.0;
  app.add_option("--q-heads", s.q_heads, "query heads (DeepSeek-V3: 128; 16 per GPU at tensor parallelism 8)")
      ->check(CLI::Range(1, 256));
  app.add_option("--page-size", s.page_size, "tokens per page: 16, 64 or 256")->check(CLI::IsMember({16, 64, 256}));
  app.add_option("--seed", seed, "random seed")->check(af::seed_value());
  app.add_option("--peak-tflops", peak_tflops, "the card's dense bf16 tensor-core peak (H100 SXM: 989)")
      ->check(af::finite_range(1.0, 1e5));
  app.add_option("--bandwidth", bandwidth_gbps, "the card's memory bandwidth in GB/s (H100 SXM: 3350)")
      ->check(af::finite_range(1.0, 1e6));
  app.add_flag("--bench", run_bench, "also time the kernel on the benchmark's shapes");
  return af::kernels::run_gpu_program(app, argc, argv, [&] {
    print_intensity(s.q_heads, peak_tflops, bandwidth_gbps);
    std::printf("\n");
    af::Checks checks;
    check(s, seed, checks);
    check({1, 16, 512, 64, 16, 1, 1}, seed + 1, checks);  // one block of heads (tensor parallelism 8), small pages
    check({1, 20, 512, 64, 64, 1, 1}, seed + 2, checks);  // a partial last tile of heads
    if (run_bench) bench(s.q_heads);
    return checks.all_passed();
  });
}
