// Chapter 20 — the CUDA building blocks of attention.
//
// Runs the pieces that every attention kernel is made of, from kernels/: a warp-level reduction (inside each
// of the others), a dot product, a small matrix multiply through shared-memory tiles, a transpose through a
// shared-memory tile (with and without padding) and a row softmax with a causal mask; checks each against
// the CPU (af::dot, af::matmul, af::softmax_rows, a plain loop) on fresh random inputs, and with --bench
// times the dot product as a bandwidth test and the transpose with and without its padding.
//
//   build/bin/ch20_cuda_building_blocks [--n 1000003] [--m 70] [--k 130] [--cols 300] [--seed 20] [--bench]
//
// Exit status: 0 when every check passes, 1 when one fails, 2 for a bad flag, 77 without a CUDA device.
#pragma nv_diag_suppress 554  // tensor.hpp's conversion operator, never instantiated for const T here

#include "af/kernels/blocks.hpp"
#include "af/kernels/device_buffer.hpp"
#include "af/kernels/gpu_program.hpp"
#include "af/kernels/timing.hpp"
#include "af/linalg.hpp"
#include "af/program.hpp"
#include "af/random.hpp"
#include "af/softmax.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <vector>

namespace {

using af::kernels::DeviceBuffer;

// [check-dot]
// The GPU sums in a different order than the CPU (per thread, then per warp, then atomically), so the two
// float32 results differ by rounding: compare both with a float64 sum, relative to the sum of |a_i b_i|.
bool check_dot(af::Checks& checks, std::int64_t n, af::Rng& rng) {
  const af::Tensor a = af::random_normal(af::Shape{n}, rng), b = af::random_normal(af::Shape{n}, rng);
  DeviceBuffer<float> da{a.values()}, db{b.values()}, result(1);
  result.fill_bytes(0xFF);  // NaN until the kernel writes it
  af::kernels::dot(da.data(), db.data(), n, result.data(), nullptr);
  const float gpu = result.download()[0];
  double exact = 0.0, magnitude = 0.0;
  for (std::int64_t i = 0; i < n; ++i) {
    exact += static_cast<double>(a.data()[i]) * b.data()[i];
    magnitude += std::abs(static_cast<double>(a.data()[i]) * b.data()[i]);
  }
  const double cpu = af::dot(a.values(), b.values());
  std::printf("dot      n = %lld: GPU %.6f, CPU %.6f, float64 %.6f\n", static_cast<long long>(n), gpu, cpu, exact);
  return checks.expect_close("dot: |GPU - float64| / sum |a_i b_i|", std::abs(gpu - exact) / magnitude, 1e-6);
}
// [/check-dot]

bool check_matmul(af::Checks& checks, std::int64_t m, std::int64_t k, std::int64_t n, af::Rng& rng) {
  const af::Tensor a = af::random_normal(af::Shape{m, k}, rng), b = af::random_normal(af::Shape{k, n}, rng);
  DeviceBuffer<float> da{a.values()}, db{b.values()}, dc(static_cast<std::size_t>(m * n));
  dc.fill_bytes(0xFF);
  af::kernels::matmul(da.data(), db.data(), dc.data(), m, k, n, nullptr);
  const auto got = dc.download();
  const af::Tensor want = af::matmul(a.matrix(), b.matrix());
  std::printf("matmul   [%lld, %lld] @ [%lld, %lld] (not multiples of the 16 x 16 tile)\n", static_cast<long long>(m),
              static_cast<long long>(k), static_cast<long long>(k), static_cast<long long>(n));
  return checks.expect_close("matmul: GPU against af::matmul", af::max_abs_diff(got, want.values()), 1e-4);
}

// A transpose only moves floats: both versions must match the CPU's exactly.
bool check_transpose(af::Checks& checks, std::int64_t rows, std::int64_t cols, af::Rng& rng) {
  const af::Tensor a = af::random_normal(af::Shape{rows, cols}, rng);
  DeviceBuffer<float> in{a.values()}, out(static_cast<std::size_t>(rows * cols));
  bool passed = true;
  for (const bool padded : {false, true}) {
    out.fill_bytes(0xFF);
    af::kernels::transpose(in.data(), out.data(), rows, cols, padded, nullptr);
    const auto got = out.download();
    std::vector<float> want(got.size());
    for (std::int64_t r = 0; r < rows; ++r)
      for (std::int64_t c = 0; c < cols; ++c) want[c * rows + r] = a.data()[r * cols + c];
    passed &= checks.expect_close(
        padded ? "transpose (padded tile) against the CPU" : "transpose (unpadded tile) against the CPU",
        af::max_abs_diff(got, want), 0.0);
  }
  std::printf("transpose [%lld, %lld] -> [%lld, %lld], 32 x 32 tiles with and without padding\n",
              static_cast<long long>(rows), static_cast<long long>(cols), static_cast<long long>(cols),
              static_cast<long long>(rows));
  return passed;
}

bool check_softmax(af::Checks& checks, std::int64_t rows, std::int64_t cols, af::Rng& rng) {
  af::Tensor scores = af::random_normal(af::Shape{rows, cols}, rng, 3.0);
  DeviceBuffer<float> d{scores.values()};
  const std::int64_t first = cols - rows;  // the last `rows` queries of a prefill over `cols` keys
  af::kernels::softmax_rows(d.data(), rows, cols, {true, first}, nullptr);
  const auto got = d.download();
  const af::Mask mask = af::Mask::causal(rows, cols, first);
  af::softmax_rows(scores.matrix(), &mask);
  std::printf("softmax  [%lld, %lld], causal, queries at positions %lld..%lld\n", static_cast<long long>(rows),
              static_cast<long long>(cols), static_cast<long long>(first), static_cast<long long>(cols - 1));
  return checks.expect_close("softmax_rows: GPU against af::softmax_rows", af::max_abs_diff(got, scores.values()),
                             1e-5);
}

// [bench-dot]
// The dot product reads 8 bytes per multiply-add: its speed is the memory's. 2^28 floats per vector (2 GiB
// read per call) dwarf the 50 MB L2 cache.
void bench_dot(af::Rng& rng) {
  const std::int64_t n = std::int64_t{1} << 28;
  DeviceBuffer<float> a(static_cast<std::size_t>(n)), b(static_cast<std::size_t>(n)), result(1);
  const af::Tensor chunk = af::random_normal(af::Shape{1 << 20}, rng);
  for (std::int64_t i = 0; i < n; i += chunk.numel()) {
    CUDA_CHECK(cudaMemcpy(a.data() + i, chunk.data(), chunk.numel() * sizeof(float), cudaMemcpyHostToDevice));
    CUDA_CHECK(cudaMemcpy(b.data() + i, chunk.data(), chunk.numel() * sizeof(float), cudaMemcpyHostToDevice));
  }
  const auto t =
      af::kernels::time_calls([&](int) { af::kernels::dot(a.data(), b.data(), n, result.data(), nullptr); }, nullptr);
  std::printf("\ndot over 2 x 2^28 floats: median %.3f ms, p95 %.3f ms, %.0f GB/s read\n", t.median_ms, t.p95_ms,
              2.0 * static_cast<double>(n) * 4 / t.median_ms / 1e6);
}
// [/bench-dot]

// [bench-transpose]
// 8192 x 8192 floats (256 MiB) read and written once per call: the two versions move the same bytes and
// differ only in how the tile's columns fall on the shared-memory banks.
void bench_transpose(af::Rng& rng) {
  const std::int64_t side = 8192, n = side * side;
  DeviceBuffer<float> in(static_cast<std::size_t>(n)), out(static_cast<std::size_t>(n));
  const af::Tensor chunk = af::random_normal(af::Shape{1 << 20}, rng);
  for (std::int64_t i = 0; i < n; i += chunk.numel())
    CUDA_CHECK(cudaMemcpy(in.data() + i, chunk.data(), chunk.numel() * sizeof(float), cudaMemcpyHostToDevice));
  for (const bool padded : {false, true}) {
    const auto t = af::kernels::time_calls(
        [&](int) { af::kernels::transpose(in.data(), out.data(), side, side, padded, nullptr); }, nullptr);
    std::printf("%s over 8192 x 8192 floats: median %.3f ms, p95 %.3f ms, %.0f GB/s moved\n",
                padded ? "transpose_padded" : "transpose_unpadded", t.median_ms, t.p95_ms,
                2.0 * static_cast<double>(n) * 4 / t.median_ms / 1e6);
  }
}
// [/bench-transpose]

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Chapter 20: CUDA building blocks (dot product, matmul, transpose, masked row softmax)",
               "ch20_cuda_building_blocks"};
  std::int64_t n = 1000003, m = 70, k = 130, cols = 300;
  std::uint64_t seed = 20;
  bool run_bench = false;
  app.add_option("--n", n, "dot product length")->check(CLI::Range(std::int64_t{1}, std::int64_t{1} << 26));
  app.add_option("--m", m, "matmul rows (transpose and softmax rows too)")->check(CLI::Range(1, 4096));
  app.add_option("--k", k, "matmul inner dimension")->check(CLI::Range(1, 4096));
  app.add_option("--cols", cols, "matmul and transpose columns, softmax keys (at least --m)")
      ->check(CLI::Range(1, 1 << 16));
  app.add_option("--seed", seed, "random seed")->check(af::seed_value());
  app.add_flag("--bench", run_bench,
               "also time the dot product on 2 GiB of input and the transpose with and without padding");
  return af::kernels::run_gpu_program(app, argc, argv, [&] {
    af::Rng rng(seed);
    af::Checks checks;
    check_dot(checks, n, rng);
    check_matmul(checks, m, k, cols, rng);
    check_transpose(checks, m, cols, rng);
    check_softmax(checks, m, std::max(m, cols), rng);
    if (run_bench) {
      bench_dot(rng);
      bench_transpose(rng);
    }
    return checks.all_passed();
  });
}
