// Chapter 22 — split-KV decode: the cache split across blocks, partial results with their log-sum-exp, and a
// combine step.
//
// Prints, for each decode shape of the benchmark (kernels/bench/bench_decode.py), the split count the plan chooses from
// the shape and the multiprocessor count; runs v3_split (CUDA cores), v4_mma (tensor cores) and v5_pipelined (v4 with
// the next tile's loads in flight) with the chosen and with forced split counts on fresh random bf16 inputs, checks
// each against the CPU reference, and with --bench times them on a long cache of one sequence.
//
//   build/bin/ch22_split_kv_decode [--batch 1] [--q-heads 32] [--kv-heads 8] [--head-dim 128]
//                                  [--seq-len 5000] [--seed 22] [--bench] [--bench-seq-len 131072]
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

using af::kernels::DecodePlan;
using af::kernels::DecodeShape;
using af::kernels::DecodeVersion;
using af::kernels::DeviceBuffer;

std::string name(DecodeVersion v) { return std::string(af::kernels::name_of(v)); }

// [print-plans]
// What the plan chooses for the benchmark's decode shapes: a batch that fills the machine keeps one split;
// one long sequence is cut into as many splits as fill the resident blocks once.
void print_plans() {
  struct Named {
    const char* name;
    DecodeShape shape;
  };
  const Named shapes[] = {{"llama3-8b", {256, 32, 8, 128, 4096}},       {"qwen3-30b-a3b", {256, 32, 4, 128, 4096}},
                          {"qwen3-235b-a22b", {256, 64, 4, 128, 4096}}, {"llama3-8b-b1-128k", {1, 32, 8, 128, 131072}},
                          {"llama3-8b-b8-32k", {8, 32, 8, 128, 32768}}, {"mha-b64-8k", {64, 32, 32, 128, 8192}}};
  const int sms = af::kernels::multiprocessor_count();
  std::printf("%-18s %8s %8s %12s %12s   (%d multiprocessors)\n", "shape", "blocks", "splits", "keys/split",
              "workspace", sms);
  for (const auto& [label, s] : shapes) {
    const DecodePlan plan = af::kernels::plan_decode(s, DecodeVersion::best, sms);
    const std::int64_t blocks = s.batch * s.kv_heads * ((s.group() + 15) / 16) * plan.splits;
    std::printf("%-18s %8lld %8d %12lld %10.1f MB\n", label, static_cast<long long>(blocks), plan.splits,
                static_cast<long long>(plan.keys_per_split), static_cast<double>(plan.workspace_bytes) / 1e6);
  }
}
// [/print-plans]

struct Device {
  DeviceBuffer<std::uint16_t> q, k, v;
};

// [check-splits]
// One version with `splits` (0: the plan's choice) on fresh inputs, against the CPU reference.
double check(const DecodeShape& s, DecodeVersion version, int splits, std::uint64_t seed, int* used) {
  af::Rng rng(seed);
  const auto cache = static_cast<std::size_t>(s.batch * s.kv_heads * s.seq_len * s.head_dim);
  const auto q = af::kernels::random_bf16(static_cast<std::size_t>(s.batch * s.q_heads * s.head_dim), rng);
  const auto k = af::kernels::random_bf16(cache, rng), v = af::kernels::random_bf16(cache, rng);
  Device d{DeviceBuffer<std::uint16_t>{std::span<const std::uint16_t>(q)},
           DeviceBuffer<std::uint16_t>{std::span<const std::uint16_t>(k)},
           DeviceBuffer<std::uint16_t>{std::span<const std::uint16_t>(v)}};
  DeviceBuffer<std::uint16_t> out(q.size());
  out.fill_bytes(0xFF);
  const DecodePlan plan = af::kernels::plan_decode(s, version, af::kernels::multiprocessor_count(), splits);
  DeviceBuffer<unsigned char> workspace(plan.workspace_bytes);  // partial outputs + log-sum-exps
  af::kernels::decode_attention(plan, s, d.q.data(), d.k.data(), d.v.data(), out.data(),
                                1.0f / std::sqrt(static_cast<float>(s.head_dim)), workspace.data(), workspace.size(),
                                nullptr);
  CUDA_CHECK(cudaDeviceSynchronize());
  *used = plan.splits;
  return af::kernels::relative_error(af::kernels::bf16_to_floats(out.download()),
                                     af::kernels::reference_decode(s, q, k, v));
}
// [/check-splits]

void bench(const DecodeShape& s) {
  af::Rng rng(98);
  const auto n = static_cast<std::size_t>(s.batch * s.kv_heads * s.seq_len * s.head_dim);
  std::vector<Device> sets;
  const int count = s.kv_bytes() > 150e6 ? 2 : static_cast<int>(std::ceil(150e6 / s.kv_bytes())) + 1;
  for (int i = 0; i < count; ++i) {
    const auto q = af::kernels::random_bf16(static_cast<std::size_t>(s.batch * s.q_heads * s.head_dim), rng);
    const auto k = af::kernels::random_bf16(n, rng), v = af::kernels::random_bf16(n, rng);
    sets.push_back({DeviceBuffer<std::uint16_t>{std::span<const std::uint16_t>(q)},
                    DeviceBuffer<std::uint16_t>{std::span<const std::uint16_t>(k)},
                    DeviceBuffer<std::uint16_t>{std::span<const std::uint16_t>(v)}});
  }
  DeviceBuffer<std::uint16_t> out(static_cast<std::size_t>(s.batch * s.q_heads * s.head_dim));
  std::printf("\n%-14s %7s %10s %10s %9s   (batch %lld, %lld tokens, q_heads %lld, kv_heads %lld; K+V %.2f GB)\n",
              "version", "splits", "median ms", "p95 ms", "GB/s", static_cast<long long>(s.batch),
              static_cast<long long>(s.seq_len), static_cast<long long>(s.q_heads), static_cast<long long>(s.kv_heads),
              s.kv_bytes() / 1e9);
  for (DecodeVersion version :
       {DecodeVersion::v2_gqa, DecodeVersion::v3_split, DecodeVersion::v4_mma, DecodeVersion::v5_pipelined}) {
    const DecodePlan plan = af::kernels::plan_decode(s, version, af::kernels::multiprocessor_count());
    DeviceBuffer<unsigned char> workspace(plan.workspace_bytes);
    const auto t = af::kernels::time_calls(
        [&](int i) {
          const Device& d = sets[static_cast<std::size_t>(i % count)];
          af::kernels::decode_attention(plan, s, d.q.data(), d.k.data(), d.v.data(), out.data(),
                                        1.0f / std::sqrt(static_cast<float>(s.head_dim)), workspace.data(),
                                        workspace.size(), nullptr);
        },
        nullptr);
    std::printf("%-14s %7d %10.4f %10.4f %9.0f\n", name(version).c_str(), plan.splits, t.median_ms, t.p95_ms,
                s.kv_bytes() / t.median_ms / 1e6);
  }
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Chapter 22: split-KV decode (v3_split, v4_mma, v5_pipelined) and the combine step",
               "ch22_split_kv_decode"};
  DecodeShape s{1, 32, 8, 128, 5000};
  std::uint64_t seed = 22;
  bool run_bench = false;
  std::int64_t bench_seq_len = 131072;
  app.add_option("--batch", s.batch, "sequences")->check(CLI::Range(1, 64));
  app.add_option("--q-heads", s.q_heads, "query heads")->check(CLI::Range(1, 128));
  app.add_option("--kv-heads", s.kv_heads, "KV heads (divides q-heads)")->check(CLI::Range(1, 128));
  app.add_option("--head-dim", s.head_dim, "64 or 128")->check(CLI::IsMember({64, 128}));
  app.add_option("--seq-len", s.seq_len, "cached tokens")->check(CLI::Range(1, 1 << 18));
  app.add_option("--seed", seed, "random seed")->check(af::seed_value());
  app.add_flag("--bench", run_bench, "also time the versions on one long sequence");
  app.add_option("--bench-seq-len", bench_seq_len, "cached tokens of the timed sequence")
      ->check(CLI::Range(1024, 1 << 20));
  return af::kernels::run_gpu_program(app, argc, argv, [&] {
    print_plans();
    std::printf("\n");
    af::Checks checks;
    constexpr double tolerance = 1e-2;
    for (DecodeVersion version : {DecodeVersion::v3_split, DecodeVersion::v4_mma, DecodeVersion::v5_pipelined})
      for (int splits : {0, 1, 3, 64}) {
        int used = 0;
        const double error = check(s, version, splits, seed + static_cast<std::uint64_t>(splits), &used);
        std::printf("%-13s %4d splits (%s): relative error %.2e (tolerance 1e-2)\n", name(version).c_str(), used,
                    splits == 0 ? "planned" : "forced", error);
        checks.expect_true(name(version) + " with " + std::to_string(used) + " splits matches the CPU",
                           af::within_tolerance(error, tolerance));  // a NaN or infinite error fails
      }
    if (run_bench) bench({1, s.q_heads, s.kv_heads, s.head_dim, bench_seq_len});
    return checks.all_passed();
  });
}
