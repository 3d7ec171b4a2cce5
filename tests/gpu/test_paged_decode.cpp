// Paged, ragged decode attention (issue 20): the kernels against the float64 CPU reference of
// af/paged_decode.hpp, element by element, over random shapes, ragged lengths, shuffled block tables in a
// shared pool, page sizes 8 to 64, forced split counts, and a captured CUDA graph replayed with new lengths;
// then the same kernels over FP8 E4M3 pools with per-row scales, against the float64 reference of those codes;
// then the tensor-core and the CUDA-core kernels forced on the same problems (label mma). The tests before
// that run the plan's choice: the tensor cores at page size 16 and above, the CUDA cores at 8.
#include <catch2/catch.hpp>

#include "af/error.hpp"
#include "af/kernels/device_buffer.hpp"
#include "af/kernels/paged_decode.hpp"
#include "af/kernels/reference.hpp"
#include "af/numeric.hpp"
#include "af/paged_decode.hpp"
#include "af/quantized_cache.hpp"
#include "elementwise.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

using af::PagedDecodeShape;
using af::kernels::DeviceBuffer;
using af::kernels::PagedDecodePlan;

namespace {

// The bounds of test_decode.cpp (derived there). CUDA cores: the paged kernel does version 3's arithmetic on
// the same bf16 values (float32 scores, softmax and sums, the output rounded to bf16), only the addresses
// differ. Tensor cores: version 4's arithmetic, which also rounds each softmax weight to bf16 before O += P V.
// Over FP8 pools the same two bounds hold: the codes are exact in bf16 (and in float32), so the products see
// exactly the reference's values up to the scale; the scales are applied in float32, a key's to its column of
// S (one rounding of 2^-24, inside the float32 part of the bound) and a value's to its column of P before P's
// bf16 rounding, so that rounding is of p_j v_j as in the bf16 case; the sum l takes the unscaled weights.
constexpr af_test::Tolerance cuda_core_tolerance{2e-5, 5e-3};
constexpr af_test::Tolerance tensor_core_tolerance{5e-3, 8e-3};

af_test::Tolerance tolerance_of(const PagedDecodePlan& plan) {
  return plan.tensor_cores ? tensor_core_tolerance : cuda_core_tolerance;
}

// One paged problem: the pool, a shuffled block table, the lengths and the float64 reference.
struct PagedProblem {
  PagedDecodeShape shape;
  std::vector<std::uint16_t> q, k, v;
  std::vector<std::int32_t> block_table, lengths;
  float scale = 1.0f;
  std::vector<double> expected;

  void compute_expected() { expected = af::paged_decode_f64(shape, q, k, v, block_table, lengths, scale); }
};

std::vector<std::uint16_t> random_bf16(std::size_t count, af::Rng& rng, float factor) {
  std::vector<std::uint16_t> bits = af::kernels::random_bf16(count, rng);
  for (auto& b : bits) b = af::bf16_bits(af::bf16_to_float(b) * factor);  // factor a power of two: exact
  return bits;
}

// Random inputs: every sequence gets max_pages_per_seq distinct pages of one shared pool, in a shuffled order
// (so consecutive pages of a sequence are far apart and the sequences interleave); the pool holds a few spare
// pages that nobody uses. Table entries past a sequence's last used page are filled with an id far outside the
// pool (-7): a kernel that reads one of them reads out of bounds, which compute-sanitizer reports.
PagedProblem make_problem(PagedDecodeShape s, std::vector<std::int32_t> lengths, std::uint64_t seed,
                          float q_factor = 1.0f, float k_factor = 1.0f) {
  af::Rng rng(seed);
  PagedProblem p;
  s.num_pages = s.batch * s.max_pages_per_seq + 3;
  p.shape = s;
  p.lengths = std::move(lengths);
  std::vector<std::int32_t> pages(static_cast<std::size_t>(s.num_pages));
  std::iota(pages.begin(), pages.end(), 0);
  for (std::size_t i = pages.size() - 1; i > 0; --i)
    std::swap(pages[i], pages[static_cast<std::size_t>(rng.below(static_cast<std::int64_t>(i) + 1))]);
  p.block_table.assign(static_cast<std::size_t>(s.batch * s.max_pages_per_seq), -7);
  for (std::int64_t b = 0; b < s.batch; ++b) {
    const std::int64_t used = (p.lengths[static_cast<std::size_t>(b)] + s.page_size - 1) / s.page_size;
    for (std::int64_t i = 0; i < used; ++i)
      p.block_table[static_cast<std::size_t>(b * s.max_pages_per_seq + i)] =
          pages[static_cast<std::size_t>(b * s.max_pages_per_seq + i)];
  }
  const auto pool = static_cast<std::size_t>(s.num_pages * s.page_values());
  p.q = random_bf16(static_cast<std::size_t>(s.batch * s.q_heads * s.head_dim), rng, q_factor);
  p.k = random_bf16(pool, rng, k_factor);
  p.v = random_bf16(pool, rng, 1.0f);
  p.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(s.head_dim)));
  p.compute_expected();
  return p;
}

std::string describe(const PagedProblem& p, const PagedDecodePlan& plan) {
  const PagedDecodeShape& s = p.shape;
  std::string lengths;
  for (const std::int32_t l : p.lengths) lengths += (lengths.empty() ? "" : " ") + std::to_string(l);
  return std::string(plan.tensor_cores ? "tensor cores, " : "CUDA cores, ") + std::to_string(plan.splits) +
         " splits: batch " + std::to_string(s.batch) + " q_heads " + std::to_string(s.q_heads) + " kv_heads " +
         std::to_string(s.kv_heads) + " head_dim " + std::to_string(s.head_dim) + " page_size " +
         std::to_string(s.page_size) + " max_pages_per_seq " + std::to_string(s.max_pages_per_seq) + " lengths [" +
         lengths + "]";
}

std::string element_of(const PagedDecodeShape& s, std::size_t i) {
  const auto index = static_cast<std::int64_t>(i);
  const std::int64_t c = index % s.head_dim, h = index / s.head_dim % s.q_heads, b = index / s.head_dim / s.q_heads;
  return "batch " + std::to_string(b) + ", q_head " + std::to_string(h) + " (kv_head " + std::to_string(h / s.group()) +
         "), channel " + std::to_string(c);
}

void require_matches(const PagedProblem& p, const std::vector<std::uint16_t>& out_bits, const PagedDecodePlan& plan) {
  const auto got = af::kernels::bf16_to_floats(out_bits);
  const af_test::ElementwiseReport report = af_test::compare_elementwise(
      got, p.expected, tolerance_of(plan), [&](std::size_t i) { return element_of(p.shape, i); });
  INFO(describe(p, plan));
  INFO(report.message);
  REQUIRE(report.failures == 0);
}

// Device copies of a problem's inputs.
struct DeviceProblem {
  DeviceBuffer<std::uint16_t> q, k, v;
  DeviceBuffer<std::int32_t> block_table, lengths;
  explicit DeviceProblem(const PagedProblem& p)
      : q(std::span<const std::uint16_t>(p.q)),
        k(std::span<const std::uint16_t>(p.k)),
        v(std::span<const std::uint16_t>(p.v)),
        block_table(std::span<const std::int32_t>(p.block_table)),
        lengths(std::span<const std::int32_t>(p.lengths)) {}
};

// Runs the kernel with `splits` (0: the plan's choice), the output poisoned with NaN first, and checks every
// output element against the float64 reference. `kernel`: the plan's choice (automatic) or a forced one.
void check_paged(const PagedProblem& p, int splits = 0,
                 af::kernels::PagedDecodeKernel kernel = af::kernels::PagedDecodeKernel::automatic) {
  DeviceProblem d(p);
  DeviceBuffer<std::uint16_t> out(p.q.size());
  out.fill_bytes(0xFF);  // bf16 NaN: an element the kernel does not write fails the check
  const PagedDecodePlan plan = af::kernels::plan_paged_decode(p.shape, af::kernels::multiprocessor_count(), splits,
                                                              af::PagedKvFormat::bf16, kernel);
  DeviceBuffer<unsigned char> workspace(plan.workspace_bytes);
  workspace.fill_bytes(0xFF);  // NaN partials: an empty split must write its partial, not leave it
  af::kernels::paged_decode_attention(plan, p.shape, d.q.data(), d.k.data(), d.v.data(), d.block_table.data(),
                                      d.lengths.data(), out.data(), p.scale, workspace.data(), workspace.size(),
                                      nullptr);
  CUDA_CHECK(cudaDeviceSynchronize());
  require_matches(p, out.download(), plan);
}

// Ragged lengths for `batch` sequences of capacity `capacity`: the edge cases first (1, a page, a page plus
// one, the full capacity, an odd length), then random ones.
std::vector<std::int32_t> ragged_lengths(std::int64_t batch, std::int64_t page_size, std::int64_t capacity,
                                         af::Rng& rng) {
  const std::int64_t edges[] = {1, page_size, page_size + 1, capacity, 2 * page_size - 1, 3};
  std::vector<std::int32_t> lengths;
  for (std::int64_t b = 0; b < batch; ++b) {
    const std::int64_t length = b < 6 ? edges[b] : 1 + rng.below(capacity);
    lengths.push_back(static_cast<std::int32_t>(std::clamp<std::int64_t>(length, 1, capacity)));
  }
  return lengths;
}

}  // namespace

TEST_CASE("paged decode equals the float64 reference on ragged batches with shuffled block tables", "[paged]") {
  af::Rng rng(2000);
  const std::int64_t groups[] = {1, 4, 8, 16, 20};
  const std::int64_t dims[] = {64, 128};
  const std::int64_t page_sizes[] = {8, 16, 32, 64};
  for (int trial = 0; trial < 20; ++trial) {
    PagedDecodeShape s;
    s.batch = 1 + rng.below(8);
    s.kv_heads = 1 + rng.below(2);
    s.q_heads = s.kv_heads * groups[trial % 5];
    s.head_dim = dims[rng.below(2)];
    s.page_size = page_sizes[rng.below(4)];
    const std::int64_t capacity = 1 + rng.below(trial % 4 == 0 ? 3000 : 400);
    s.max_pages_per_seq = (capacity + s.page_size - 1) / s.page_size;
    const PagedProblem problem = make_problem(s, ragged_lengths(s.batch, s.page_size, s.capacity(), rng),
                                              5000 + static_cast<std::uint64_t>(trial));
    for (int splits : {0, 1, 3}) check_paged(problem, splits);
  }
}

TEST_CASE("paged decode is right for every split count, down to one page per split and splits past the length",
          "[paged][split]") {
  std::uint64_t seed = 5100;
  for (std::int64_t page_size : {8, 16, 32})
    for (std::int64_t head_dim : {64, 128}) {
      // Capacity 40 pages; lengths from one token to all of it, so most splits of short sequences are empty.
      const PagedDecodeShape s{.batch = 5,
                               .q_heads = 8,
                               .kv_heads = 2,
                               .head_dim = head_dim,
                               .page_size = page_size,
                               .max_pages_per_seq = 40,
                               .num_pages = 1};
      const std::vector<std::int32_t> lengths = {1, static_cast<std::int32_t>(page_size + 1),
                                                 static_cast<std::int32_t>(40 * page_size),
                                                 static_cast<std::int32_t>(7 * page_size - 3), 2};
      const PagedProblem problem = make_problem(s, lengths, seed++);
      for (int splits : {1, 2, 3, 7, 13, 40, 1000}) check_paged(problem, splits);
    }
}

TEST_CASE("paged decode handles long sequences and every group size with its planned split count", "[paged][long]") {
  std::uint64_t seed = 5200;
  for (std::int64_t group : {1, 4, 8, 16, 20})
    for (std::int64_t head_dim : {64, 128}) {
      const PagedDecodeShape s{.batch = 3,
                               .q_heads = group,
                               .kv_heads = 1,
                               .head_dim = head_dim,
                               .page_size = 16,
                               .max_pages_per_seq = 256,
                               .num_pages = 1};
      const PagedProblem problem = make_problem(s, {4096, 2049, 17}, seed++);
      check_paged(problem);
    }
}

TEST_CASE("paged decode stays exact when one key dominates the softmax", "[paged][peaked]") {
  std::uint64_t seed = 5300;
  for (std::int64_t group : {4, 20})
    for (std::int64_t head_dim : {64, 128}) {
      const PagedDecodeShape s{.batch = 4,
                               .q_heads = 2 * group,
                               .kv_heads = 2,
                               .head_dim = head_dim,
                               .page_size = 16,
                               .max_pages_per_seq = 200,
                               .num_pages = 1};
      const PagedProblem problem = make_problem(s, {3001, 100, 1000, 16}, seed++, 4.0f, 2.0f);
      for (int splits : {0, 7}) check_paged(problem, splits);
    }
}

TEST_CASE("paged decode reads pages that several sequences share (a common prefix)", "[paged]") {
  const PagedDecodeShape s{.batch = 3,
                           .q_heads = 8,
                           .kv_heads = 1,
                           .head_dim = 128,
                           .page_size = 16,
                           .max_pages_per_seq = 10,
                           .num_pages = 1};
  PagedProblem problem = make_problem(s, {150, 70, 80}, 5500);
  // Sequence b starts with sequence 0's first 2b (full) pages, as a fork of a common prompt would.
  for (std::int64_t b = 1; b < 3; ++b)
    for (std::int64_t i = 0; i < 2 * b; ++i)
      problem.block_table[static_cast<std::size_t>(b * s.max_pages_per_seq + i)] =
          problem.block_table[static_cast<std::size_t>(i)];
  problem.compute_expected();
  for (int splits : {0, 1, 4}) check_paged(problem, splits);
}

TEST_CASE("one captured CUDA graph of paged decode serves new lengths written to device memory", "[paged][graph]") {
  for (std::int64_t head_dim : {64, 128}) {
    const PagedDecodeShape s{.batch = 4,
                             .q_heads = 16,
                             .kv_heads = 2,
                             .head_dim = head_dim,
                             .page_size = 16,
                             .max_pages_per_seq = 128,
                             .num_pages = 1};
    // Every page of the capacity is assigned, so the block table stays valid for any length.
    const std::int32_t full = static_cast<std::int32_t>(s.capacity());
    PagedProblem problem = make_problem(s, {full, full, full, full}, 5400 + static_cast<std::uint64_t>(head_dim));
    DeviceProblem d(problem);
    DeviceBuffer<std::uint16_t> out(problem.q.size());
    const PagedDecodePlan plan = af::kernels::plan_paged_decode(s, af::kernels::multiprocessor_count(), 4);
    REQUIRE(plan.splits > 1);  // the graph holds the combine too
    DeviceBuffer<unsigned char> workspace(plan.workspace_bytes);

    cudaStream_t stream = nullptr;
    CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    // One ordinary call first (it also loads the kernels' module before the capture), checked at full length.
    out.fill_bytes(0xFF);
    af::kernels::paged_decode_attention(plan, s, d.q.data(), d.k.data(), d.v.data(), d.block_table.data(),
                                        d.lengths.data(), out.data(), problem.scale, workspace.data(), workspace.size(),
                                        stream);
    CUDA_CHECK(cudaStreamSynchronize(stream));
    require_matches(problem, out.download(), plan);
    cudaGraph_t graph = nullptr;
    cudaGraphExec_t exec = nullptr;
    CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
    af::kernels::paged_decode_attention(plan, s, d.q.data(), d.k.data(), d.v.data(), d.block_table.data(),
                                        d.lengths.data(), out.data(), problem.scale, workspace.data(), workspace.size(),
                                        stream);
    CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
    CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));

    const std::vector<std::vector<std::int32_t>> steps = {{1, 17, 1000, full}, {2047, 3, full, 16}, {5, 5, 5, 5}};
    for (const auto& lengths : steps) {
      problem.lengths = lengths;
      problem.compute_expected();
      d.lengths.upload(problem.lengths);
      out.fill_bytes(0xFF);
      CUDA_CHECK(cudaGraphLaunch(exec, stream));
      CUDA_CHECK(cudaStreamSynchronize(stream));
      require_matches(problem, out.download(), plan);
    }
    CUDA_CHECK(cudaGraphExecDestroy(exec));
    CUDA_CHECK(cudaGraphDestroy(graph));
    CUDA_CHECK(cudaStreamDestroy(stream));
  }
}

TEST_CASE("the paged split count depends on the capacity only, in whole pages", "[paged][split]") {
  const PagedDecodeShape narrow{.batch = 1,
                                .q_heads = 32,
                                .kv_heads = 8,
                                .head_dim = 128,
                                .page_size = 16,
                                .max_pages_per_seq = 8192,
                                .num_pages = 8192};
  const PagedDecodePlan plan = af::kernels::plan_paged_decode(narrow, 132);
  CHECK(plan.splits > 1);
  CHECK(std::int64_t{plan.splits} * plan.pages_per_split >= narrow.max_pages_per_seq);
  CHECK(plan.workspace_bytes > 0);
  PagedDecodeShape wide = narrow;
  wide.batch = 256;
  wide.max_pages_per_seq = 256;
  CHECK(af::kernels::plan_paged_decode(wide, 132).splits == 1);
  const PagedDecodePlan forced = af::kernels::plan_paged_decode(narrow, 132, 100000);
  CHECK(forced.splits == 8192);  // at most one split per page
  CHECK(forced.pages_per_split == 1);
}

TEST_CASE("paged decode rejects bad shapes with an af::Error naming the value", "[paged]") {
  const PagedDecodeShape good{.batch = 2,
                              .q_heads = 8,
                              .kv_heads = 2,
                              .head_dim = 128,
                              .page_size = 16,
                              .max_pages_per_seq = 4,
                              .num_pages = 8};
  REQUIRE_NOTHROW(af::kernels::plan_paged_decode(good, 132));
  PagedDecodeShape s = good;
  s.page_size = 24;
  REQUIRE_THROWS_WITH(af::kernels::plan_paged_decode(s, 132), Catch::Contains("page_size is 24"));
  s.page_size = 128;
  REQUIRE_THROWS_WITH(af::kernels::plan_paged_decode(s, 132), Catch::Contains("page_size is 128"));
  s = good;
  s.head_dim = 256;
  REQUIRE_THROWS_WITH(af::kernels::plan_paged_decode(s, 132), Catch::Contains("head_dim is 256"));
  s = good;
  s.q_heads = 7;
  REQUIRE_THROWS_WITH(af::kernels::plan_paged_decode(s, 132), Catch::Contains("q_heads is 7"));
  s = good;
  s.max_pages_per_seq = 0;
  REQUIRE_THROWS_WITH(af::kernels::plan_paged_decode(s, 132), Catch::Contains("max_pages_per_seq is 0"));
  const PagedDecodePlan plan = af::kernels::plan_paged_decode(good, 132, 4);
  REQUIRE(plan.workspace_bytes > 0);
  REQUIRE_THROWS_WITH(af::kernels::paged_decode_attention(plan, good, nullptr, nullptr, nullptr, nullptr, nullptr,
                                                          nullptr, 1.0f, nullptr, 0, nullptr),
                      Catch::Contains("workspace_bytes is 0"));
}

// ---- FP8 E4M3 pools (chapter 05's fp8_token cache read by the same kernel) ----

namespace {

// A problem's pools stored as FP8: codes and one float32 scale per pool row (token of one KV head in one
// page), quantized from its bf16 values by the library's cache writer (amax / 448, saturating), and the
// float64 reference over exactly those codes and scales.
struct Fp8Pools {
  std::vector<std::uint8_t> k, v;
  std::vector<float> k_scales, v_scales;
  std::vector<double> expected;
};

af::QuantizedRows quantize_pool(const std::vector<std::uint16_t>& pool, std::int64_t head_dim) {
  std::vector<float> values(pool.size());
  std::transform(pool.begin(), pool.end(), values.begin(), af::bf16_to_float);
  const af::ConstMatrix rows{values.data(), static_cast<std::int64_t>(values.size()) / head_dim, head_dim, head_dim};
  return af::quantize_rows(rows, 1, af::KvFormat::fp8_token);
}

void compute_fp8_expected(const PagedProblem& p, Fp8Pools& f) {
  f.expected =
      af::paged_decode_fp8_f64(p.shape, p.q, f.k, f.k_scales, f.v, f.v_scales, p.block_table, p.lengths, p.scale);
}

Fp8Pools make_fp8(const PagedProblem& p) {
  af::QuantizedRows k = quantize_pool(p.k, p.shape.head_dim), v = quantize_pool(p.v, p.shape.head_dim);
  Fp8Pools f{std::move(k.payload), std::move(v.payload), std::move(k.scales), std::move(v.scales), {}};
  compute_fp8_expected(p, f);
  return f;
}

// The same bounds as over bf16 pools (the kernel's: tolerance_of): the reference reads exactly the values the
// codes and scales hold, and the kernels convert the codes exactly; what differs is one float32 product per
// key (the scale applied to the dot product or the weight) in the arithmetic the bounds already cover.
void check_paged_fp8(const PagedProblem& p, const Fp8Pools& f, int splits = 0,
                     af::kernels::PagedDecodeKernel kernel = af::kernels::PagedDecodeKernel::automatic) {
  DeviceBuffer<std::uint16_t> q{std::span<const std::uint16_t>(p.q)};
  DeviceBuffer<std::uint8_t> k{std::span<const std::uint8_t>(f.k)}, v{std::span<const std::uint8_t>(f.v)};
  DeviceBuffer<float> k_scales{std::span<const float>(f.k_scales)}, v_scales{std::span<const float>(f.v_scales)};
  DeviceBuffer<std::int32_t> block_table{std::span<const std::int32_t>(p.block_table)};
  DeviceBuffer<std::int32_t> lengths{std::span<const std::int32_t>(p.lengths)};
  DeviceBuffer<std::uint16_t> out(p.q.size());
  out.fill_bytes(0xFF);
  const PagedDecodePlan plan = af::kernels::plan_paged_decode(p.shape, af::kernels::multiprocessor_count(), splits,
                                                              af::PagedKvFormat::fp8_e4m3, kernel);
  DeviceBuffer<unsigned char> workspace(plan.workspace_bytes);
  workspace.fill_bytes(0xFF);
  af::kernels::paged_decode_attention_fp8(plan, p.shape, q.data(), k.data(), k_scales.data(), v.data(), v_scales.data(),
                                          block_table.data(), lengths.data(), out.data(), p.scale, workspace.data(),
                                          workspace.size(), nullptr);
  CUDA_CHECK(cudaDeviceSynchronize());
  const auto got = af::kernels::bf16_to_floats(out.download());
  const af_test::ElementwiseReport report = af_test::compare_elementwise(
      got, f.expected, tolerance_of(plan), [&](std::size_t i) { return element_of(p.shape, i); });
  INFO("FP8 pools, " << describe(p, plan));
  INFO(report.message);
  REQUIRE(report.failures == 0);
}

}  // namespace

TEST_CASE("FP8 paged decode equals the float64 reference over its own codes and scales", "[paged][fp8]") {
  af::Rng rng(6000);
  const std::int64_t groups[] = {1, 4, 8, 16, 20};
  const std::int64_t page_sizes[] = {8, 16, 32, 64};
  for (int trial = 0; trial < 15; ++trial) {
    PagedDecodeShape s;
    s.batch = 1 + rng.below(6);
    s.kv_heads = 1 + rng.below(2);
    s.q_heads = s.kv_heads * groups[trial % 5];
    s.head_dim = trial % 2 == 0 ? 128 : 64;
    s.page_size = page_sizes[rng.below(4)];
    const std::int64_t capacity = 1 + rng.below(trial % 3 == 0 ? 3000 : 300);
    s.max_pages_per_seq = (capacity + s.page_size - 1) / s.page_size;
    // Keys scaled up by 4 on some trials, so that the softmax is peaked and FP8's key rounding shows.
    const PagedProblem problem =
        make_problem(s, ragged_lengths(s.batch, s.page_size, s.capacity(), rng),
                     6100 + static_cast<std::uint64_t>(trial), 1.0f, trial % 3 == 1 ? 4.0f : 1.0f);
    const Fp8Pools fp8 = make_fp8(problem);
    for (int splits : {0, 1, 3, 1000}) check_paged_fp8(problem, fp8, splits);
  }
}

TEST_CASE("FP8 paged decode converts every E4M3 code exactly, subnormals and negative zero included", "[paged][fp8]") {
  // Codes written directly (not by a quantizer): pool row r holds the 254 non-NaN codes rotated by r, so every
  // code sits in every position of a lane's 8 bytes; the scales span 2^-13 .. 1 times amax / 448.
  for (std::int64_t head_dim : {64, 128}) {
    const PagedDecodeShape s{.batch = 2,
                             .q_heads = 8,
                             .kv_heads = 2,
                             .head_dim = head_dim,
                             .page_size = 16,
                             .max_pages_per_seq = 24,
                             .num_pages = 1};
    PagedProblem problem = make_problem(s, {383, 256}, 6200 + static_cast<std::uint64_t>(head_dim));
    std::vector<std::uint8_t> codes;
    for (unsigned c = 0; c < 256; ++c)
      if ((c & 0x7Fu) != 0x7Fu) codes.push_back(static_cast<std::uint8_t>(c));
    Fp8Pools f;
    const auto rows = static_cast<std::size_t>(problem.shape.num_pages * s.kv_heads * s.page_size);
    const auto d = static_cast<std::size_t>(head_dim);
    f.k.resize(rows * d);
    f.v.resize(rows * d);
    for (std::size_t r = 0; r < rows; ++r) {
      // The largest code (448) times the largest scale is 8 for keys and 4 for values: the magnitudes the bound
      // of the bf16 tests was derived for; the smaller scales push the values toward float32's small end.
      f.k_scales.push_back(std::ldexp(8.0f / 448.0f, -static_cast<int>(r % 14)));
      f.v_scales.push_back(std::ldexp(4.0f / 448.0f, -static_cast<int>(r % 11)));
      for (std::size_t c = 0; c < d; ++c) {
        f.k[r * d + c] = codes[(r + c) % codes.size()];
        f.v[r * d + c] = codes[(3 * r + c) % codes.size()];
      }
    }
    compute_fp8_expected(problem, f);
    for (int splits : {0, 5}) check_paged_fp8(problem, f, splits);
  }
}

TEST_CASE("FP8 paged decode stays exact when one key dominates, and reads shared prefix pages", "[paged][fp8]") {
  const PagedDecodeShape s{.batch = 4,
                           .q_heads = 16,
                           .kv_heads = 2,
                           .head_dim = 128,
                           .page_size = 16,
                           .max_pages_per_seq = 200,
                           .num_pages = 1};
  PagedProblem problem = make_problem(s, {3001, 100, 1000, 16}, 6300, 4.0f, 2.0f);
  for (std::int64_t i = 0; i < 6; ++i)  // sequence 2 forks sequence 0's first 6 pages
    problem.block_table[static_cast<std::size_t>(2 * s.max_pages_per_seq + i)] =
        problem.block_table[static_cast<std::size_t>(i)];
  problem.compute_expected();
  const Fp8Pools fp8 = make_fp8(problem);
  for (int splits : {0, 7}) check_paged_fp8(problem, fp8, splits);
}

TEST_CASE("FP8 paged decode refuses a plan made for bf16 pools, naming both", "[paged][fp8]") {
  const PagedDecodeShape s{.batch = 1,
                           .q_heads = 8,
                           .kv_heads = 2,
                           .head_dim = 128,
                           .page_size = 16,
                           .max_pages_per_seq = 4,
                           .num_pages = 4};
  const PagedDecodePlan bf16_plan = af::kernels::plan_paged_decode(s, 132);
  const PagedDecodePlan fp8_plan = af::kernels::plan_paged_decode(s, 132, 0, af::PagedKvFormat::fp8_e4m3);
  CHECK(fp8_plan.format == af::PagedKvFormat::fp8_e4m3);
  REQUIRE_THROWS_WITH(af::kernels::paged_decode_attention_fp8(bf16_plan, s, nullptr, nullptr, nullptr, nullptr, nullptr,
                                                              nullptr, nullptr, nullptr, 0.1f, nullptr, 0, nullptr),
                      Catch::Contains("made for bf16 pools") && Catch::Contains("made for FP8"));
  REQUIRE_THROWS_WITH(af::kernels::paged_decode_attention(fp8_plan, s, nullptr, nullptr, nullptr, nullptr, nullptr,
                                                          nullptr, 0.1f, nullptr, 0, nullptr),
                      Catch::Contains("made for FP8 pools") && Catch::Contains("made for bf16"));
}

// ---- Both kernels forced: the tensor cores (decode_paged_mma.cu) and the CUDA cores (decode_paged.cu) ----

namespace {

using af::kernels::PagedDecodeKernel;

// Poisons every pool row past a sequence's length in its last page (bf16 NaN; for FP8 the NaN code and a NaN
// scale): those slots exist in memory but hold no token, and a kernel must not read them (an unclamped row of
// a partial tile would turn its output into NaN). The reference never reads them.
void poison_tails(PagedProblem& p, Fp8Pools* fp8) {
  const PagedDecodeShape& s = p.shape;
  for (std::int64_t b = 0; b < s.batch; ++b) {
    const std::int64_t length = p.lengths[static_cast<std::size_t>(b)];
    if (length % s.page_size == 0) continue;
    const std::int64_t page = p.block_table[static_cast<std::size_t>(b * s.max_pages_per_seq + length / s.page_size)];
    for (std::int64_t h = 0; h < s.kv_heads; ++h)
      for (std::int64_t slot = length % s.page_size; slot < s.page_size; ++slot) {
        const std::int64_t row = (page * s.kv_heads + h) * s.page_size + slot;
        for (std::int64_t c = 0; c < s.head_dim; ++c) {
          const auto at = static_cast<std::size_t>(row * s.head_dim + c);
          p.k[at] = p.v[at] = 0xFFFFu;
          if (fp8 != nullptr) fp8->k[at] = fp8->v[at] = 0x7Fu;
        }
        if (fp8 != nullptr)
          fp8->k_scales[static_cast<std::size_t>(row)] = fp8->v_scales[static_cast<std::size_t>(row)] =
              std::numeric_limits<float>::quiet_NaN();
      }
  }
}

// Ragged lengths for the forced-kernel tests: one token, a partial first page, exactly a page, a page and one
// token, the capacity, a partial last page past several pages, then random.
std::vector<std::int32_t> tile_edge_lengths(std::int64_t batch, std::int64_t page_size, std::int64_t capacity,
                                            af::Rng& rng) {
  const std::int64_t edges[] = {1, page_size - 3, page_size, page_size + 1, capacity, 3 * page_size + 5, 17};
  std::vector<std::int32_t> lengths;
  for (std::int64_t b = 0; b < batch; ++b) {
    const std::int64_t length = b < 7 ? edges[b] : 1 + rng.below(capacity);
    lengths.push_back(static_cast<std::int32_t>(std::clamp<std::int64_t>(length, 1, capacity)));
  }
  return lengths;
}

}  // namespace

TEST_CASE("paged decode on the tensor cores and on the CUDA cores, bf16 and FP8 pools, equal the float64 references",
          "[paged][mma]") {
  af::Rng rng(7000);
  std::uint64_t seed = 7100;
  for (std::int64_t group : {1, 4, 8, 16, 20})  // 20: a second tile of query heads with 4 rows
    for (std::int64_t head_dim : {64, 128})
      for (std::int64_t page_size : {16, 32, 64}) {
        PagedDecodeShape s;
        s.batch = 8;
        s.kv_heads = 2;
        s.q_heads = s.kv_heads * group;
        s.head_dim = head_dim;
        s.page_size = page_size;
        s.max_pages_per_seq = 1 + (300 + rng.below(300)) / page_size;
        PagedProblem problem = make_problem(s, tile_edge_lengths(s.batch, page_size, s.capacity(), rng), seed++);
        Fp8Pools fp8 = make_fp8(problem);
        poison_tails(problem, &fp8);
        for (int splits : {1, 3, 1000})
          for (PagedDecodeKernel kernel : {PagedDecodeKernel::tensor_cores, PagedDecodeKernel::cuda_cores}) {
            check_paged(problem, splits, kernel);
            check_paged_fp8(problem, fp8, splits, kernel);
          }
      }
}

TEST_CASE("paged decode on the tensor cores stays within its bound when one key dominates, bf16 and FP8 pools",
          "[paged][mma][peaked]") {
  std::uint64_t seed = 7300;
  for (std::int64_t group : {4, 20})
    for (std::int64_t head_dim : {64, 128})
      for (std::int64_t page_size : {16, 64}) {
        const PagedDecodeShape s{.batch = 4,
                                 .q_heads = 2 * group,
                                 .kv_heads = 2,
                                 .head_dim = head_dim,
                                 .page_size = page_size,
                                 .max_pages_per_seq = 3200 / page_size,
                                 .num_pages = 1};
        // q x 4 and k x 2: logits of standard deviation 8 (test_decode.cpp), one or two keys take the weight.
        PagedProblem problem = make_problem(s, {3001, 100, 1000, 17}, seed++, 4.0f, 2.0f);
        Fp8Pools fp8 = make_fp8(problem);
        poison_tails(problem, &fp8);
        for (int splits : {0, 7})
          for (PagedDecodeKernel kernel : {PagedDecodeKernel::tensor_cores, PagedDecodeKernel::cuda_cores}) {
            check_paged(problem, splits, kernel);
            check_paged_fp8(problem, fp8, splits, kernel);
          }
      }
}

TEST_CASE("the paged plan takes the tensor cores from page size 16, records it, and refuses them at page size 8",
          "[paged][mma]") {
  PagedDecodeShape s{.batch = 2,
                     .q_heads = 8,
                     .kv_heads = 2,
                     .head_dim = 128,
                     .page_size = 16,
                     .max_pages_per_seq = 64,
                     .num_pages = 128};
  for (std::int64_t page_size : {16, 32, 64}) {
    s.page_size = page_size;
    for (const af::PagedKvFormat format : {af::PagedKvFormat::bf16, af::PagedKvFormat::fp8_e4m3}) {
      CHECK(af::kernels::plan_paged_decode(s, 132, 0, format).tensor_cores);
      CHECK(af::kernels::plan_paged_decode(s, 132, 0, format, PagedDecodeKernel::tensor_cores).tensor_cores);
      CHECK_FALSE(af::kernels::plan_paged_decode(s, 132, 0, format, PagedDecodeKernel::cuda_cores).tensor_cores);
    }
  }
  s.page_size = 8;
  CHECK_FALSE(af::kernels::plan_paged_decode(s, 132).tensor_cores);
  REQUIRE_THROWS_WITH(
      af::kernels::plan_paged_decode(s, 132, 0, af::PagedKvFormat::bf16, PagedDecodeKernel::tensor_cores),
      Catch::Contains("page_size is 8 for the tensor-core kernel"));
  // A tensor-core plan made for pages of 16 does not run on pages of 8.
  PagedDecodeShape sixteen = s;
  sixteen.page_size = 16;
  sixteen.max_pages_per_seq = 32;
  s.max_pages_per_seq = 32;
  const PagedDecodePlan plan = af::kernels::plan_paged_decode(sixteen, 132, 1);
  REQUIRE(plan.tensor_cores);
  REQUIRE_THROWS_WITH(af::kernels::paged_decode_attention(plan, s, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr,
                                                          1.0f, nullptr, 0, nullptr),
                      Catch::Contains("page_size is 8 for a tensor-core plan"));
}
