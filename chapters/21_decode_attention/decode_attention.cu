// Chapter 21 — a decode-attention kernel over a bf16 KV cache.
//
// One new token per sequence attends over every cached token. Runs the first two kernel versions of
// kernels/ — v1_naive (one warp per query head, one key at a time) and v2_gqa (one block per KV head and its
// whole group of query heads, 16-byte loads, an online softmax per warp) — on fresh random bf16 inputs,
// checks each against the CPU reference (af::attention on the same bf16 values), and with --bench times
// them on a decode shape whose cache is far larger than the L2 cache.
//
//   build/bin/ch21_decode_attention [--batch 2] [--q-heads 32] [--kv-heads 8] [--head-dim 128]
//                                   [--seq-len 1000] [--seed 21] [--bench] [--bench-batch 64]
//
// Exit status: 0 when every check passes, 1 when one fails, 2 for a bad flag, 77 without a CUDA device.
#pragma nv_diag_suppress 554  // tensor.hpp's conversion operator, never instantiated for const T here

#include "af/compare.hpp"
#include "af/kernels/decode.hpp"
#include "af/kernels/device_buffer.hpp"
#include "af/kernels/gpu_program.hpp"
#include "af/kernels/reference.hpp"
#include "af/kernels/timing.hpp"
#include "af/program.hpp"

#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

namespace {

using af::kernels::DecodeShape;
using af::kernels::DecodeVersion;
using af::kernels::DeviceBuffer;

// [cache-layout]
// The cache of one layer: K and V, each [batch, kv_heads, seq_len, head_dim] in bf16. One KV head's
// cached tokens are contiguous rows of head_dim values, so a warp reading consecutive 16-byte pieces of
// consecutive rows touches consecutive addresses.
struct Cache {
  DeviceBuffer<std::uint16_t> k, v;
};
// [/cache-layout]

struct Inputs {
  std::vector<std::uint16_t> q, k, v;
};

Inputs random_inputs(const DecodeShape& s, std::uint64_t seed) {
  af::Rng rng(seed);
  const auto cache = static_cast<std::size_t>(s.batch * s.kv_heads * s.seq_len * s.head_dim);
  Inputs in;
  in.q = af::kernels::random_bf16(static_cast<std::size_t>(s.batch * s.q_heads * s.head_dim), rng);
  in.k = af::kernels::random_bf16(cache, rng);
  in.v = af::kernels::random_bf16(cache, rng);
  return in;
}

// [run-and-check]
// One version on fresh inputs: poison the output (bf16 NaN), plan, launch, copy back, compare with the CPU.
double check_version(const DecodeShape& s, DecodeVersion version, std::uint64_t seed) {
  const Inputs in = random_inputs(s, seed);
  DeviceBuffer<std::uint16_t> q{std::span<const std::uint16_t>(in.q)}, out(in.q.size());
  const Cache cache{DeviceBuffer<std::uint16_t>{std::span<const std::uint16_t>(in.k)},
                    DeviceBuffer<std::uint16_t>{std::span<const std::uint16_t>(in.v)}};
  out.fill_bytes(0xFF);
  const auto plan = af::kernels::plan_decode(s, version, af::kernels::multiprocessor_count());
  DeviceBuffer<unsigned char> workspace(plan.workspace_bytes);
  const float scale = 1.0f / std::sqrt(static_cast<float>(s.head_dim));
  af::kernels::decode_attention(plan, s, q.data(), cache.k.data(), cache.v.data(), out.data(), scale, workspace.data(),
                                workspace.size(), nullptr);
  CUDA_CHECK(cudaDeviceSynchronize());
  const auto got = af::kernels::bf16_to_floats(out.download());
  return af::kernels::relative_error(got, af::kernels::reference_decode(s, in.q, in.k, in.v));
}
// [/run-and-check]

// [bench]
// Median and p95 of 50 timed calls after 10 warm-ups, rotating between cache copies so that each call
// streams its K and V from memory, not from the 50 MB L2 cache.
void bench(const DecodeShape& s, const std::vector<DecodeVersion>& versions) {
  const int sets = s.kv_bytes() > 150e6 ? 2 : static_cast<int>(std::ceil(150e6 / s.kv_bytes())) + 1;
  af::Rng rng(99);
  std::vector<Cache> caches;
  const auto n = static_cast<std::size_t>(s.batch * s.kv_heads * s.seq_len * s.head_dim);
  for (int i = 0; i < sets; ++i) {
    const auto k = af::kernels::random_bf16(n, rng), v = af::kernels::random_bf16(n, rng);
    caches.push_back({DeviceBuffer<std::uint16_t>{std::span<const std::uint16_t>(k)},
                      DeviceBuffer<std::uint16_t>{std::span<const std::uint16_t>(v)}});
  }
  const auto q_host = af::kernels::random_bf16(static_cast<std::size_t>(s.batch * s.q_heads * s.head_dim), rng);
  DeviceBuffer<std::uint16_t> q{std::span<const std::uint16_t>(q_host)}, out(q_host.size());
  std::printf(
      "\n%-14s %7s %10s %10s %9s   (batch %lld, q_heads %lld, kv_heads %lld, head_dim %lld, %lld tokens; "
      "K+V %.2f GB)\n",
      "version", "splits", "median ms", "p95 ms", "GB/s", static_cast<long long>(s.batch),
      static_cast<long long>(s.q_heads), static_cast<long long>(s.kv_heads), static_cast<long long>(s.head_dim),
      static_cast<long long>(s.seq_len), s.kv_bytes() / 1e9);
  for (DecodeVersion version : versions) {
    const auto plan = af::kernels::plan_decode(s, version, af::kernels::multiprocessor_count());
    DeviceBuffer<unsigned char> workspace(plan.workspace_bytes);
    const float scale = 1.0f / std::sqrt(static_cast<float>(s.head_dim));
    const auto t = af::kernels::time_calls(
        [&](int i) {
          const Cache& c = caches[static_cast<std::size_t>(i % sets)];
          af::kernels::decode_attention(plan, s, q.data(), c.k.data(), c.v.data(), out.data(), scale, workspace.data(),
                                        workspace.size(), nullptr);
        },
        nullptr);
    std::printf("%-14s %7d %10.4f %10.4f %9.0f\n", std::string(af::kernels::name_of(version)).c_str(), plan.splits,
                t.median_ms, t.p95_ms, s.kv_bytes() / t.median_ms / 1e6);
  }
}
// [/bench]

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Chapter 21: decode attention over a bf16 KV cache (v1_naive, v2_gqa)", "ch21_decode_attention"};
  DecodeShape s{2, 32, 8, 128, 1000};
  std::uint64_t seed = 21;
  bool run_bench = false;
  std::int64_t bench_batch = 64;
  app.add_option("--batch", s.batch, "sequences")->check(CLI::Range(1, 64));
  app.add_option("--q-heads", s.q_heads, "query heads")->check(CLI::Range(1, 128));
  app.add_option("--kv-heads", s.kv_heads, "KV heads (divides q-heads)")->check(CLI::Range(1, 128));
  app.add_option("--head-dim", s.head_dim, "64, 128 or 256")->check(CLI::IsMember({64, 128, 256}));
  app.add_option("--seq-len", s.seq_len, "cached tokens")->check(CLI::Range(1, 1 << 16));
  app.add_option("--seed", seed, "random seed")->check(af::seed_value());
  app.add_flag("--bench", run_bench, "also time the versions on a large cache");
  app.add_option("--bench-batch", bench_batch, "sequences in the timed cache (4096 tokens each)")
      ->check(CLI::Range(1, 256));
  return af::kernels::run_gpu_program(app, argc, argv, [&] {
    af::Checks checks;
    constexpr double tolerance = 1e-2;
    for (DecodeVersion version : {DecodeVersion::v1_naive, DecodeVersion::v2_gqa}) {
      const double error = check_version(s, version, seed);
      std::printf("%-10s relative error against the CPU reference %.2e (bf16 output; tolerance 1e-2)\n",
                  std::string(af::kernels::name_of(version)).c_str(), error);
      checks.expect_true(std::string(af::kernels::name_of(version)) + " matches the CPU reference",
                         af::within_tolerance(error, tolerance));  // a NaN or infinite error fails
    }
    if (run_bench) bench({bench_batch, 32, 8, 128, 4096}, {DecodeVersion::v1_naive, DecodeVersion::v2_gqa});
    return checks.all_passed();
  });
}
