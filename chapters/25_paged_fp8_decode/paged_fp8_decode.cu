// Chapter 25 — paged and FP8 decode: one decode step over a cache kept in pages, stored as bf16 or as FP8.
//
// Prints, for the decode shapes of the benchmark (kernels/bench/bench_paged.py), the bytes one step reads from
// bf16 and from FP8 pools and the float32 multiply-adds per byte that the CUDA-core kernel then needs, against the
// card's own ratio of FP32 throughput to memory bandwidth; runs both paged kernels (CUDA cores, tensor cores) on a
// ragged batch with a shuffled block table over bf16 and over FP8 pools and checks each against its float64 reference;
// prints what FP8 costs in accuracy on that batch; with --bench times both on the benchmark's shapes.
//
//   build/bin/ch25_paged_fp8_decode [--q-heads 32] [--kv-heads 8] [--head-dim 128] [--page-size 16] [--seed 25]
//                                   [--bench]
//
// Exit status: 0 when every check passes, 1 when one fails, 2 for a bad flag, 77 without a CUDA device.
#pragma nv_diag_suppress 554  // tensor.hpp's conversion operator, never instantiated for const T here

// nvcc 13.0 rejects af/tensor.hpp's span conversions when fmt's headers come first: the library headers that
// include af/tensor.hpp go before the kernel headers (which reach fmt through af/error.hpp).
#include "af/compare.hpp"
#include "af/kernels/reference.hpp"
#include "af/quantized_cache.hpp"

#include "af/kernels/device_buffer.hpp"
#include "af/kernels/gpu_program.hpp"
#include "af/kernels/paged_decode.hpp"
#include "af/kernels/timing.hpp"
#include "af/paged_decode.hpp"
#include "af/program.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

using af::PagedDecodeShape;
using af::PagedKvFormat;
using af::kernels::DeviceBuffer;
using af::kernels::PagedDecodeKernel;

struct Workload {
  const char* name;
  std::int64_t batch, length, q_heads, kv_heads, head_dim;
};
// The benchmark's shapes (kernels/bench/bench_paged.py) with equal lengths: one layer each.
constexpr Workload workloads[] = {
    {"llama3-8b-b1-32k", 1, 32768, 32, 8, 128},
    {"llama3-8b-b256-4k", 256, 4096, 32, 8, 128},
    {"qwen3-30b-a3b-b64-4k", 64, 4096, 32, 4, 128},
    {"qwen3-235b-a22b-b64-4k", 64, 4096, 64, 4, 128},
};

// [fma-per-byte]
// What the CUDA-core kernel computes per byte it reads. Every cached value meets each query head of its group
// twice: once in q . k (a key) or p v (a value), one float32 multiply-add each. Bytes per value: 2 in bf16,
// 1 + 4 / head_dim in FP8 (the code and its share of the row's scale). The kernel stays bound by memory while
// group / bytes-per-value multiply-adds per byte stay below what the card can issue per byte it can read.
void print_prediction(double fp32_tflops, double bandwidth_gbps) {
  std::printf("%-26s %10s %10s %10s %10s\n", "shape", "bf16 MB", "FP8 MB", "FMA/B bf16", "FMA/B FP8");
  for (const Workload& w : workloads) {
    const PagedDecodeShape s{w.batch, w.q_heads, w.kv_heads, w.head_dim, 16, (w.length + 15) / 16, 1};
    const std::vector<std::int32_t> lengths(static_cast<std::size_t>(w.batch), static_cast<std::int32_t>(w.length));
    const double bf16 = af::paged_decode_kv_bytes(s, lengths, PagedKvFormat::bf16);
    const double fp8 = af::paged_decode_kv_bytes(s, lengths, PagedKvFormat::fp8_e4m3);
    const double fmas = static_cast<double>(w.batch * w.length * w.q_heads * w.head_dim) * 2.0;
    std::printf("%-26s %10.1f %10.1f %10.2f %10.2f\n", w.name, bf16 / 1e6, fp8 / 1e6, fmas / bf16, fmas / fp8);
  }
  std::printf("this card: %.0f FP32 TFLOP/s = %.1f T multiply-adds/s over %.0f GB/s = %.1f multiply-adds per byte\n",
              fp32_tflops, fp32_tflops / 2, bandwidth_gbps, fp32_tflops / 2 * 1e12 / (bandwidth_gbps * 1e9));
}
// [/fma-per-byte]

// One ragged batch in pages: every sequence's pages drawn from one shuffled pool, bf16 and FP8 copies.
struct Problem {
  PagedDecodeShape shape;
  std::vector<std::uint16_t> q, k, v;
  std::vector<std::int32_t> block_table, lengths;
  af::QuantizedRows k8, v8;  // FP8 codes and one scale per pool row, from the bf16 values
};

af::QuantizedRows to_fp8(const std::vector<std::uint16_t>& pool, std::int64_t head_dim) {
  const std::vector<float> values = af::kernels::bf16_to_floats(pool);
  const af::ConstMatrix rows{values.data(), static_cast<std::int64_t>(values.size()) / head_dim, head_dim, head_dim};
  return af::quantize_rows(rows, 1, af::KvFormat::fp8_token);
}

Problem make_problem(PagedDecodeShape s, std::vector<std::int32_t> lengths, af::Rng& rng) {
  Problem p;
  s.batch = static_cast<std::int64_t>(lengths.size());
  s.max_pages_per_seq = (*std::max_element(lengths.begin(), lengths.end()) + s.page_size - 1) / s.page_size;
  s.num_pages = s.batch * s.max_pages_per_seq;
  p.shape = s;
  p.lengths = std::move(lengths);
  std::vector<std::int32_t> pages(static_cast<std::size_t>(s.num_pages));
  std::iota(pages.begin(), pages.end(), 0);
  for (std::size_t i = pages.size() - 1; i > 0; --i)
    std::swap(pages[i], pages[static_cast<std::size_t>(rng.below(static_cast<std::int64_t>(i) + 1))]);
  p.block_table = pages;  // row b: pages b * max_pages_per_seq ..., shuffled across the pool
  p.q = af::kernels::random_bf16(static_cast<std::size_t>(s.batch * s.q_heads * s.head_dim), rng);
  p.k = af::kernels::random_bf16(static_cast<std::size_t>(s.num_pages * s.page_values()), rng);
  p.v = af::kernels::random_bf16(p.k.size(), rng);
  p.k8 = to_fp8(p.k, s.head_dim);
  p.v8 = to_fp8(p.v, s.head_dim);
  return p;
}

// Device copies and one call of either kernel.
struct Device {
  DeviceBuffer<std::uint16_t> q, k, v, out;
  DeviceBuffer<std::uint8_t> k8, v8;
  DeviceBuffer<float> k_scales, v_scales;
  DeviceBuffer<std::int32_t> block_table, lengths;
  af::kernels::PagedDecodePlan plan;
  DeviceBuffer<unsigned char> workspace;
  PagedKvFormat format;
  Device(const Problem& p, PagedKvFormat f, PagedDecodeKernel kernel, int sm_count)
      : q(std::span<const std::uint16_t>(p.q)),
        k(std::span<const std::uint16_t>(p.k)),
        v(std::span<const std::uint16_t>(p.v)),
        out(p.q.size()),
        k8(std::span<const std::uint8_t>(p.k8.payload)),
        v8(std::span<const std::uint8_t>(p.v8.payload)),
        k_scales(std::span<const float>(p.k8.scales)),
        v_scales(std::span<const float>(p.v8.scales)),
        block_table(std::span<const std::int32_t>(p.block_table)),
        lengths(std::span<const std::int32_t>(p.lengths)),
        plan(af::kernels::plan_paged_decode(p.shape, sm_count, 0, f, kernel)),
        workspace(plan.workspace_bytes),
        format(f) {}
  void run(const Problem& p, float scale) {
    if (format == PagedKvFormat::bf16)
      af::kernels::paged_decode_attention(plan, p.shape, q.data(), k.data(), v.data(), block_table.data(),
                                          lengths.data(), out.data(), scale, workspace.data(), workspace.size(),
                                          nullptr);
    else
      af::kernels::paged_decode_attention_fp8(plan, p.shape, q.data(), k8.data(), k_scales.data(), v8.data(),
                                              v_scales.data(), block_table.data(), lengths.data(), out.data(), scale,
                                              workspace.data(), workspace.size(), nullptr);
  }
};

// [check]
// Both kernels on one ragged batch (lengths 1, a page plus one, an odd length, a long one) against their float64
// references; then what FP8 storage itself changes: the FP8 reference against the bf16 one.
void check(const PagedDecodeShape& s, std::uint64_t seed, af::Checks& checks) {
  af::Rng rng(seed);
  const auto page = static_cast<std::int32_t>(s.page_size);
  const Problem p = make_problem(s, {1, page + 1, 777, 4000, 2 * page - 1}, rng);
  const float scale = 1.0f / std::sqrt(static_cast<float>(s.head_dim));
  const std::vector<double> bf16_expected =
      af::paged_decode_f64(p.shape, p.q, p.k, p.v, p.block_table, p.lengths, scale);
  const std::vector<double> fp8_expected = af::paged_decode_fp8_f64(
      p.shape, p.q, p.k8.payload, p.k8.scales, p.v8.payload, p.v8.scales, p.block_table, p.lengths, scale);
  const std::string label = std::to_string(s.q_heads) + "/" + std::to_string(s.kv_heads) + " heads of " +
                            std::to_string(s.head_dim) + ", pages of " + std::to_string(s.page_size);
  std::vector<PagedDecodeKernel> kernels{PagedDecodeKernel::cuda_cores};
  if (s.page_size >= 16) kernels.push_back(PagedDecodeKernel::tensor_cores);  // a 16-token tile in one page
  for (const PagedDecodeKernel kernel : kernels)
    for (const PagedKvFormat format : {PagedKvFormat::bf16, PagedKvFormat::fp8_e4m3}) {
      Device d(p, format, kernel, af::kernels::multiprocessor_count());
      const char* cores = kernel == PagedDecodeKernel::tensor_cores ? "tensor cores" : "CUDA cores";
      d.out.fill_bytes(0xFF);  // NaN: an element the kernel does not write fails
      d.run(p, scale);
      CUDA_CHECK(cudaDeviceSynchronize());
      const std::vector<float> got = af::kernels::bf16_to_floats(d.out.download());
      const bool fp8 = format == PagedKvFormat::fp8_e4m3;
      const af::kernels::OutputError e = af::kernels::output_error(got, fp8 ? fp8_expected : bf16_expected);
      std::printf("%s, %s pools, %s, %d splits: relative error %.2e, worst element %.2e of %.2f\n", label.c_str(),
                  fp8 ? "FP8" : "bf16", cores, d.plan.splits, e.relative, e.worst, e.largest);
      checks.expect_true(std::string(fp8 ? "FP8" : "bf16") + " paged decode on the " + cores + " (" + label +
                             ") matches its float64 reference: relative error < 1e-2",
                         af::within_tolerance(e.relative, 1e-2));
      checks.expect_true("every element within 1.5e-2 of the largest |expected|",
                         af::within_tolerance(e.worst, 1.5e-2 * e.largest));
    }
  const std::vector<float> fp8_as_float(fp8_expected.begin(), fp8_expected.end());
  const af::kernels::OutputError cost = af::kernels::output_error(fp8_as_float, bf16_expected);
  std::printf("what FP8 storage changes (float64 references, FP8 against bf16): relative %.2e, worst %.2e\n",
              cost.relative, cost.worst);
}
// [/check]

void bench() {
  std::printf("\n%-26s %6s %6s %10s %10s %10s\n", "shape", "pools", "cores", "median ms", "p95 ms", "GB/s");
  for (const Workload& w : workloads) {
    af::Rng rng(99);
    const PagedDecodeShape s{w.batch, w.q_heads, w.kv_heads, w.head_dim, 16, 1, 1};
    const Problem p = make_problem(
        s, std::vector<std::int32_t>(static_cast<std::size_t>(w.batch), static_cast<std::int32_t>(w.length)), rng);
    const float scale = 1.0f / std::sqrt(static_cast<float>(w.head_dim));
    for (const PagedDecodeKernel kernel : {PagedDecodeKernel::cuda_cores, PagedDecodeKernel::tensor_cores})
      for (const PagedKvFormat format : {PagedKvFormat::bf16, PagedKvFormat::fp8_e4m3}) {
        Device d(p, format, kernel, af::kernels::multiprocessor_count());
        const auto t = af::kernels::time_calls([&](int) { d.run(p, scale); }, nullptr, 10, 50);
        const double bytes = af::paged_decode_kv_bytes(p.shape, p.lengths, format);
        std::printf("%-26s %6s %6s %10.4f %10.4f %10.0f\n", w.name, format == PagedKvFormat::bf16 ? "bf16" : "FP8",
                    kernel == PagedDecodeKernel::tensor_cores ? "mma" : "fma", t.median_ms, t.p95_ms,
                    bytes / t.median_ms / 1e6);
      }
  }
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Chapter 25: paged and FP8 decode (a decode step through a block table, bf16 or FP8 pools)",
               "ch25_paged_fp8_decode"};
  PagedDecodeShape s{1, 32, 8, 128, 16, 1, 1};
  std::uint64_t seed = 25;
  bool run_bench = false;
  double fp32_tflops = 67.0, bandwidth_gbps = 3350.0;
  app.add_option("--q-heads", s.q_heads, "query heads")->check(CLI::Range(1, 128));
  app.add_option("--kv-heads", s.kv_heads, "KV heads (divides q-heads)")->check(CLI::Range(1, 128));
  app.add_option("--head-dim", s.head_dim, "64 or 128")->check(CLI::IsMember({64, 128}));
  app.add_option("--page-size", s.page_size, "tokens per page: 8, 16, 32 or 64")->check(CLI::IsMember({8, 16, 32, 64}));
  app.add_option("--seed", seed, "random seed")->check(af::seed_value());
  app.add_option("--fp32-tflops", fp32_tflops, "the card's FP32 (CUDA-core) peak (H100 SXM: 67)")
      ->check(af::finite_range(1.0, 1e5));
  app.add_option("--bandwidth", bandwidth_gbps, "the card's memory bandwidth in GB/s (H100 SXM: 3350)")
      ->check(af::finite_range(1.0, 1e6));
  app.add_flag("--bench", run_bench, "also time both kernels on the benchmark's shapes");
  return af::kernels::run_gpu_program(app, argc, argv, [&] {
    if (s.q_heads % s.kv_heads != 0)
      throw std::invalid_argument("--q-heads " + std::to_string(s.q_heads) + " must be a multiple of --kv-heads " +
                                  std::to_string(s.kv_heads));
    print_prediction(fp32_tflops, bandwidth_gbps);
    std::printf("\n");
    af::Checks checks;
    check(s, seed, checks);
    check({1, s.q_heads, s.kv_heads, s.head_dim == 128 ? 64 : 128, 64, 1, 1}, seed + 1, checks);
    check({1, 20, 1, s.head_dim, 8, 1, 1}, seed + 2, checks);  // a group of 20: a partial last slice of heads
    if (run_bench) bench();
    return checks.all_passed();
  });
}
