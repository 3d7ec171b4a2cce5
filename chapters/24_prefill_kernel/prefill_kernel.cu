// Chapter 24 — the prefill kernel: causal attention over a batch of new tokens on the tensor cores.
//
// Prints, for the prefill and append shapes of the benchmark (kernels/bench/bench_prefill.py), the causal FLOPs,
// the fewest bytes a call can move and their ratio (FLOPs per byte, against the card's own ratio of peak
// tensor-core FLOP/s to memory bandwidth); runs the kernel on a batch that mixes prompts, an append after a
// cache, a decode step and an empty sequence, and checks it against the float64 CPU reference; with --bench
// times it on the benchmark's shapes.
//
//   build/bin/ch24_prefill_kernel [--q-heads 32] [--kv-heads 8] [--head-dim 128] [--seed 24] [--bench]
//
// Exit status: 0 when every check passes, 1 when one fails, 2 for a bad flag, 77 without a CUDA device.
#pragma nv_diag_suppress 554  // tensor.hpp's conversion operator, never instantiated for const T here

// nvcc 13.0 rejects af/tensor.hpp's span conversions when fmt's headers come first: the library headers that
// include af/tensor.hpp go before af/kernels/prefill.hpp (which reaches fmt through af/error.hpp).
#include "af/compare.hpp"
#include "af/kernels/reference.hpp"

#include "af/kernels/device_buffer.hpp"
#include "af/kernels/gpu_program.hpp"
#include "af/kernels/prefill.hpp"
#include "af/kernels/timing.hpp"
#include "af/program.hpp"
#include "af/varlen_attention.hpp"

#include <cmath>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

using af::VarlenShape;
using af::kernels::DeviceBuffer;

struct Workload {
  const char* name;
  std::int64_t batch, queries, keys, q_heads, kv_heads, head_dim;
};
// The benchmark's shapes (kernels/bench/bench_prefill.py): one layer each.
constexpr Workload workloads[] = {
    {"llama3-8b-prefill-4k", 1, 4096, 4096, 32, 8, 128},
    {"llama3-8b-prefill-b8-1k", 8, 1024, 1024, 32, 8, 128},
    {"llama3-8b-append-128", 16, 128, 4224, 32, 8, 128},
    {"qwen3-30b-a3b-prefill-4k", 1, 4096, 4096, 32, 4, 128},
    {"qwen3-235b-a22b-prefill-4k", 1, 4096, 4096, 64, 4, 128},
    {"qwen3-235b-a22b-append-128", 16, 128, 4224, 64, 4, 128},
};

std::vector<std::int32_t> cumulative(std::int64_t batch, std::int64_t each) {
  std::vector<std::int32_t> cu{0};
  for (std::int64_t b = 0; b < batch; ++b) cu.push_back(static_cast<std::int32_t>(cu.back() + each));
  return cu;
}

// [intensity]
// FLOPs per byte of a call: the causal products against the fewest bytes (q, k, v read once, the output
// written once). A decode step does about 2 FLOPs per byte of cache whatever its length; a prefill of T tokens
// about T / 2 times more per byte of K and V, so above a few hundred tokens it is bound by the tensor cores,
// not by memory.
void print_intensity(double peak_tflops, double bandwidth_gbps) {
  std::printf("%-28s %12s %10s %12s\n", "shape", "GFLOP", "MB moved", "FLOP/byte");
  for (const Workload& w : workloads) {
    const VarlenShape s{w.batch, w.q_heads, w.kv_heads, w.head_dim};
    const std::vector<std::int32_t> cu_q = cumulative(w.batch, w.queries), cu_k = cumulative(w.batch, w.keys);
    const double flops = af::varlen_attention_causal_flops(s, cu_q, cu_k);
    const double bytes = af::varlen_attention_min_bytes(s, w.batch * w.queries, w.batch * w.keys);
    std::printf("%-28s %12.1f %10.1f %12.0f\n", w.name, flops / 1e9, bytes / 1e6, flops / bytes);
  }
  std::printf("this card: %.0f dense bf16 TFLOP/s / %.0f GB/s = %.0f FLOP/byte where the two limits meet\n",
              peak_tflops, bandwidth_gbps, peak_tflops * 1e12 / (bandwidth_gbps * 1e9));
}
// [/intensity]

struct Problem {
  VarlenShape shape;
  std::vector<std::int32_t> cu_q{0}, cu_k{0};
  std::int64_t max_query_len = 1;
  std::vector<std::uint16_t> q, k, v;
};

struct Lengths {
  std::int32_t queries, keys;
};

Problem make_problem(VarlenShape s, const std::vector<Lengths>& lengths, af::Rng& rng) {
  Problem p;
  s.batch = static_cast<std::int64_t>(lengths.size());
  p.shape = s;
  for (const Lengths& l : lengths) {
    p.cu_q.push_back(p.cu_q.back() + l.queries);
    p.cu_k.push_back(p.cu_k.back() + l.keys);
    p.max_query_len = std::max<std::int64_t>(p.max_query_len, l.queries);
  }
  p.q = af::kernels::random_bf16(static_cast<std::size_t>(p.cu_q.back() * s.q_heads * s.head_dim), rng);
  p.k = af::kernels::random_bf16(static_cast<std::size_t>(p.cu_k.back() * s.kv_heads * s.head_dim), rng);
  p.v = af::kernels::random_bf16(p.k.size(), rng);
  return p;
}

struct Device {
  DeviceBuffer<std::uint16_t> q, k, v, out;
  DeviceBuffer<std::int32_t> cu_q, cu_k;
  explicit Device(const Problem& p)
      : q(std::span<const std::uint16_t>(p.q)),
        k(std::span<const std::uint16_t>(p.k)),
        v(std::span<const std::uint16_t>(p.v)),
        out(p.q.size()),
        cu_q(std::span<const std::int32_t>(p.cu_q)),
        cu_k(std::span<const std::int32_t>(p.cu_k)) {}
  void run(const Problem& p, float scale) {
    af::kernels::prefill_attention(p.shape, p.max_query_len, q.data(), k.data(), v.data(), cu_q.data(), cu_k.data(),
                                   out.data(), scale, nullptr);
  }
};

// [check]
// The kernel on one mixed batch against the float64 reference: relative error of the whole output, and the
// largest error of one element over the largest |expected| (a missed row or tile shows in the second).
void check(const VarlenShape& s, std::uint64_t seed, af::Checks& checks) {
  af::Rng rng(seed);
  // A prompt of 300, a 128-token chunk appended after 1000 cached tokens, a decode step after 77, an empty
  // sequence, and a prompt of 17 (a partial warp).
  std::vector<Lengths> lengths;
  for (const Lengths l : {Lengths{300, 300}, Lengths{128, 1128}, Lengths{1, 78}, Lengths{0, 5}, Lengths{17, 17}})
    lengths.push_back(l);
  const Problem p = make_problem(s, lengths, rng);
  Device d(p);
  d.out.fill_bytes(0xFF);  // NaN: an element the kernel does not write fails
  const float scale = 1.0f / std::sqrt(static_cast<float>(s.head_dim));
  d.run(p, scale);
  CUDA_CHECK(cudaDeviceSynchronize());
  const std::vector<std::uint16_t> bits = d.out.download();
  const std::vector<float> got = af::kernels::bf16_to_floats(bits);
  const std::vector<double> expected = af::varlen_causal_attention_f64(p.shape, p.q, p.k, p.v, p.cu_q, p.cu_k, scale);
  const af::kernels::OutputError e = af::kernels::output_error(got, expected);
  std::printf("q_heads %lld, kv_heads %lld, head_dim %lld: relative error %.2e, worst element %.2e of %.2f\n",
              static_cast<long long>(s.q_heads), static_cast<long long>(s.kv_heads), static_cast<long long>(s.head_dim),
              e.relative, e.worst, e.largest);
  checks.expect_true("prefill (" + std::to_string(s.q_heads) + "/" + std::to_string(s.kv_heads) + " heads of " +
                         std::to_string(s.head_dim) + ") matches float64: relative error < 1e-2",
                     af::within_tolerance(e.relative, 1e-2));
  checks.expect_true("every element within 1.5e-2 of the largest |expected|",
                     af::within_tolerance(e.worst, 1.5e-2 * e.largest));
}
// [/check]

void bench() {
  std::printf("\n%-28s %10s %10s %10s\n", "shape", "median ms", "p95 ms", "TFLOP/s");
  for (const Workload& w : workloads) {
    af::Rng rng(99);
    const VarlenShape s{w.batch, w.q_heads, w.kv_heads, w.head_dim};
    std::vector<Lengths> lengths;
    for (std::int64_t b = 0; b < w.batch; ++b)
      lengths.push_back({static_cast<std::int32_t>(w.queries), static_cast<std::int32_t>(w.keys)});
    const Problem p = make_problem(s, lengths, rng);
    Device d(p);
    const float scale = 1.0f / std::sqrt(static_cast<float>(w.head_dim));
    const auto t = af::kernels::time_calls([&](int) { d.run(p, scale); }, nullptr, 5, 30);
    const double flops = af::varlen_attention_causal_flops(p.shape, p.cu_q, p.cu_k);
    std::printf("%-28s %10.3f %10.3f %10.1f\n", w.name, t.median_ms, t.p95_ms, flops / t.median_ms / 1e9);
  }
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Chapter 24: the prefill kernel (causal varlen attention on the tensor cores)", "ch24_prefill_kernel"};
  VarlenShape s{1, 32, 8, 128};
  std::uint64_t seed = 24;
  bool run_bench = false;
  double peak_tflops = 989.0, bandwidth_gbps = 3350.0;
  app.add_option("--q-heads", s.q_heads, "query heads")->check(CLI::Range(1, 128));
  app.add_option("--kv-heads", s.kv_heads, "KV heads (divides q-heads)")->check(CLI::Range(1, 128));
  app.add_option("--head-dim", s.head_dim, "64 or 128")->check(CLI::IsMember({64, 128}));
  app.add_option("--seed", seed, "random seed")->check(af::seed_value());
  app.add_option("--peak-tflops", peak_tflops, "the card's dense bf16 tensor-core peak (H100 SXM: 989)")
      ->check(af::finite_range(1.0, 1e5));
  app.add_option("--bandwidth", bandwidth_gbps, "the card's memory bandwidth in GB/s (H100 SXM: 3350)")
      ->check(af::finite_range(1.0, 1e6));
  app.add_flag("--bench", run_bench, "also time the kernel on the benchmark's shapes");
  return af::kernels::run_gpu_program(app, argc, argv, [&] {
    if (s.q_heads % s.kv_heads != 0)
      throw std::invalid_argument("--q-heads " + std::to_string(s.q_heads) + " must be a multiple of --kv-heads " +
                                  std::to_string(s.kv_heads));
    print_intensity(peak_tflops, bandwidth_gbps);
    std::printf("\n");
    af::Checks checks;
    check(s, seed, checks);
    check({1, s.q_heads, s.kv_heads, s.head_dim == 128 ? 64 : 128}, seed + 1, checks);
    check({1, 20, 1, s.head_dim}, seed + 2, checks);  // a group of 20: a partial last tile of heads nowhere
    if (run_bench) bench();
    return checks.all_passed();
  });
}
