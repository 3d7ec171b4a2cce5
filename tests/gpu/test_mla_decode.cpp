// MLA decode (the absorbed path over the paged latent cache): the kernel against the float64 CPU reference of
// af/mla_decode.hpp, element by element, over random head counts (a multiple of the block's 16 heads or not),
// ragged lengths, shuffled block tables in a shared pool, page sizes 1 to 128, forced split counts (also past the
// lengths), a dominant key, a shared prefix and a captured CUDA graph replayed with new lengths.
#include <catch2/catch.hpp>

#include "af/error.hpp"
#include "af/kernels/device_buffer.hpp"
#include "af/kernels/mla_decode.hpp"
#include "af/kernels/reference.hpp"
#include "af/mla_decode.hpp"
#include "af/numeric.hpp"
#include "elementwise.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>
#include <vector>

using af::MlaDecodeShape;
using af::kernels::DeviceBuffer;
using af::kernels::MlaDecodePlan;

namespace {

// The tensor-core bound of test_decode.cpp (derived there): the kernel does version 4's arithmetic on the same
// bf16 values (bf16 products on the tensor cores, float32 sums, each softmax weight rounded to bf16 before
// P V, the output rounded to bf16). The dot products are 576 terms long instead of 64 or 128, summed in float32
// as 4 partial sums of 144 terms: their rounding error, near 2^-24 sqrt(576) times the terms' size, stays far
// below the weights' bf16 rounding, which the bound is made of.
constexpr af_test::Tolerance tolerance{5e-3, 8e-3};

// DeepSeek-V3's softmax scale: 1/sqrt(128 + 64) times its YaRN mscale^2 = (0.1 ln 40 + 1)^2 (af/mla.hpp).
float deepseek_v3_scale() {
  const double mscale = 0.1 * std::log(40.0) + 1.0;
  return static_cast<float>(mscale * mscale / std::sqrt(192.0));
}

struct MlaProblem {
  MlaDecodeShape shape;
  std::vector<std::uint16_t> q, cache;
  std::vector<std::int32_t> block_table, lengths;
  float scale = 1.0f;
  std::vector<double> expected;

  void compute_expected() { expected = af::mla_decode_f64(shape, q, cache, block_table, lengths, scale); }
};

std::vector<std::uint16_t> random_bf16(std::size_t count, af::Rng& rng, float factor) {
  std::vector<std::uint16_t> bits = af::kernels::random_bf16(count, rng);
  for (auto& b : bits) b = af::bf16_bits(af::bf16_to_float(b) * factor);  // factor a power of two: exact
  return bits;
}

// Random inputs: every sequence gets max_pages_per_seq distinct pages of one shared pool, in a shuffled order;
// the pool holds a few spare pages that nobody uses. Table entries past a sequence's last used page hold an id
// far outside the pool (-7): a kernel that reads one of them reads out of bounds, which compute-sanitizer
// reports. q_factor and k_factor (powers of two) scale q and the cache: 1 and 1 give scaled scores of standard
// deviation near 1 at the scale 1/sqrt(576); 4 and 2 make one or two keys take almost all the weight.
MlaProblem make_problem(MlaDecodeShape s, std::vector<std::int32_t> lengths, std::uint64_t seed, float q_factor = 1.0f,
                        float k_factor = 1.0f) {
  af::Rng rng(seed);
  MlaProblem p;
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
  p.q = random_bf16(static_cast<std::size_t>(s.batch * s.q_heads * s.key_dim()), rng, q_factor);
  p.cache = random_bf16(static_cast<std::size_t>(s.num_pages * s.page_values()), rng, k_factor);
  p.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(s.key_dim())));
  p.compute_expected();
  return p;
}

std::string describe(const MlaProblem& p, int splits) {
  const MlaDecodeShape& s = p.shape;
  std::string lengths;
  for (const std::int32_t l : p.lengths) lengths += (lengths.empty() ? "" : " ") + std::to_string(l);
  return std::to_string(splits) + " splits: batch " + std::to_string(s.batch) + " q_heads " +
         std::to_string(s.q_heads) + " page_size " + std::to_string(s.page_size) + " max_pages_per_seq " +
         std::to_string(s.max_pages_per_seq) + " scale " + std::to_string(p.scale) + " lengths [" + lengths + "]";
}

std::string element_of(const MlaDecodeShape& s, std::size_t i) {
  const auto index = static_cast<std::int64_t>(i);
  const std::int64_t c = index % s.latent_dim, h = index / s.latent_dim % s.q_heads,
                     b = index / s.latent_dim / s.q_heads;
  return "batch " + std::to_string(b) + ", q_head " + std::to_string(h) + ", latent channel " + std::to_string(c);
}

void require_matches(const MlaProblem& p, const std::vector<std::uint16_t>& out_bits, int splits) {
  const auto got = af::kernels::bf16_to_floats(out_bits);
  const af_test::ElementwiseReport report =
      af_test::compare_elementwise(got, p.expected, tolerance, [&](std::size_t i) { return element_of(p.shape, i); });
  INFO(describe(p, splits));
  INFO(report.message);
  REQUIRE(report.failures == 0);
}

// Device copies of a problem's inputs.
struct DeviceProblem {
  DeviceBuffer<std::uint16_t> q, cache;
  DeviceBuffer<std::int32_t> block_table, lengths;
  explicit DeviceProblem(const MlaProblem& p)
      : q(std::span<const std::uint16_t>(p.q)),
        cache(std::span<const std::uint16_t>(p.cache)),
        block_table(std::span<const std::int32_t>(p.block_table)),
        lengths(std::span<const std::int32_t>(p.lengths)) {}
};

// Runs the kernel with `splits` (0: the plan's choice), the output poisoned with NaN first, and checks every
// output element against the float64 reference.
void check_mla(const MlaProblem& p, int splits = 0) {
  DeviceProblem d(p);
  DeviceBuffer<std::uint16_t> out(static_cast<std::size_t>(p.shape.batch * p.shape.q_heads * p.shape.latent_dim));
  out.fill_bytes(0xFF);  // bf16 NaN: an element the kernel does not write fails the check
  const MlaDecodePlan plan = af::kernels::plan_mla_decode(p.shape, af::kernels::multiprocessor_count(), splits);
  DeviceBuffer<unsigned char> workspace(plan.workspace_bytes);
  workspace.fill_bytes(0xFF);  // NaN partials: an empty split must write its partial, not leave it
  af::kernels::mla_decode_attention(plan, p.shape, d.q.data(), d.cache.data(), d.block_table.data(), d.lengths.data(),
                                    out.data(), p.scale, workspace.data(), workspace.size(), nullptr);
  CUDA_CHECK(cudaDeviceSynchronize());
  require_matches(p, out.download(), plan.splits);
}

// Ragged lengths for `batch` sequences of capacity `capacity`: the edge cases first (1, a page, a page plus
// one, the full capacity, a partially filled last page, an odd length), then random ones.
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

MlaDecodeShape shape_of(std::int64_t batch, std::int64_t q_heads, std::int64_t page_size,
                        std::int64_t max_pages_per_seq) {
  MlaDecodeShape s;
  s.batch = batch;
  s.q_heads = q_heads;
  s.page_size = page_size;
  s.max_pages_per_seq = max_pages_per_seq;
  return s;
}

}  // namespace

TEST_CASE("MLA decode equals the float64 reference on ragged batches with shuffled block tables", "[mla-decode]") {
  af::Rng rng(7000);
  const std::int64_t heads[] = {16, 32, 128, 20, 1};  // 20 and 1: the last block's rows are partly empty
  const std::int64_t page_sizes[] = {1, 16, 64, 128};
  for (int trial = 0; trial < 15; ++trial) {
    const std::int64_t page_size = page_sizes[rng.below(4)];
    const std::int64_t capacity = 1 + rng.below(trial % 3 == 0 ? 2000 : 300);
    MlaDecodeShape s = shape_of(1 + rng.below(6), heads[trial % 5], page_size, (capacity + page_size - 1) / page_size);
    MlaProblem problem = make_problem(s, ragged_lengths(s.batch, s.page_size, s.capacity(), rng),
                                      7100 + static_cast<std::uint64_t>(trial));
    if (trial % 2 == 1) {  // DeepSeek-V3's scale: scores about 1.9 times larger
      problem.scale = deepseek_v3_scale();
      problem.compute_expected();
    }
    for (int splits : {0, 1, 3}) check_mla(problem, splits);
  }
}

TEST_CASE("MLA decode is right for every split count, down to one page per split and splits past the length",
          "[mla-decode][split]") {
  std::uint64_t seed = 7200;
  for (std::int64_t page_size : {16, 64}) {
    // Capacity 24 pages; lengths from one token to all of it, so most splits of short sequences are empty.
    const MlaDecodeShape s = shape_of(5, 32, page_size, 24);
    const std::vector<std::int32_t> lengths = {1, static_cast<std::int32_t>(page_size + 1),
                                               static_cast<std::int32_t>(24 * page_size),
                                               static_cast<std::int32_t>(7 * page_size - 3), 2};
    const MlaProblem problem = make_problem(s, lengths, seed++);
    for (int splits : {1, 2, 3, 7, 13, 24, 1000}) check_mla(problem, splits);
  }
}

TEST_CASE("MLA decode handles long sequences with DeepSeek-V3's 128 heads and its planned split count",
          "[mla-decode][long]") {
  std::uint64_t seed = 7300;
  for (std::int64_t page_size : {16, 64}) {
    MlaDecodeShape s = shape_of(3, 128, page_size, 4160 / page_size);
    MlaProblem problem = make_problem(s, {4096, 2049, 17}, seed++);
    problem.scale = deepseek_v3_scale();
    problem.compute_expected();
    check_mla(problem);
    check_mla(problem, 1);
  }
}

TEST_CASE("MLA decode stays exact when one key dominates the softmax", "[mla-decode][peaked]") {
  std::uint64_t seed = 7400;
  for (std::int64_t q_heads : {16, 40}) {
    const MlaDecodeShape s = shape_of(4, q_heads, 64, 50);
    {
      // Scores of standard deviation near 8 (q times 4, the cache times 2): one or two keys per head take
      // almost all the weight, and the running maximum jumps by tens between tiles.
      const MlaProblem problem = make_problem(s, {3001, 100, 1000, 64}, seed++, 4.0f, 2.0f);
      for (int splits : {0, 1, 7}) check_mla(problem, splits);
    }
    // One token whose row is twice head 0's query: head 0's score for it exceeds every other by about
    // 2 x 576 / 24 = 48 (scale 1/sqrt(576)), so its output is that token's latent; placed late in a sequence,
    // in the middle of a tile and a split, after a long run of ordinary keys.
    MlaProblem problem = make_problem(s, {3001, 100, 1000, 64}, seed++);
    const std::int64_t width = s.key_dim();
    for (std::int64_t b = 0; b < s.batch; ++b) {
      const std::int64_t j = problem.lengths[static_cast<std::size_t>(b)] * 3 / 4 + 5 * b;
      const std::int64_t slot = std::min<std::int64_t>(j, problem.lengths[static_cast<std::size_t>(b)] - 1);
      const std::int64_t page = problem.block_table[static_cast<std::size_t>(b * s.max_pages_per_seq + slot / 64)];
      for (std::int64_t c = 0; c < width; ++c)
        problem.cache[static_cast<std::size_t>((page * 64 + slot % 64) * width + c)] =
            af::bf16_bits(2.0f * af::bf16_to_float(problem.q[static_cast<std::size_t>(b * s.q_heads * width + c)]));
    }
    problem.compute_expected();
    for (int splits : {0, 1, 5}) check_mla(problem, splits);
  }
}

TEST_CASE("MLA decode reads pages that several sequences share (a common prefix)", "[mla-decode]") {
  const MlaDecodeShape s = shape_of(3, 24, 16, 10);
  MlaProblem problem = make_problem(s, {150, 70, 80}, 7500);
  // Sequence b starts with sequence 0's first 2b (full) pages, as a fork of a common prompt would.
  for (std::int64_t b = 1; b < 3; ++b)
    for (std::int64_t i = 0; i < 2 * b; ++i)
      problem.block_table[static_cast<std::size_t>(b * s.max_pages_per_seq + i)] =
          problem.block_table[static_cast<std::size_t>(i)];
  problem.compute_expected();
  for (int splits : {0, 1, 4}) check_mla(problem, splits);
}

TEST_CASE("one captured CUDA graph of MLA decode serves new lengths written to device memory", "[mla-decode][graph]") {
  const MlaDecodeShape s = shape_of(4, 32, 64, 32);
  // Every page of the capacity is assigned, so the block table stays valid for any length.
  const auto full = static_cast<std::int32_t>(s.capacity());
  MlaProblem problem = make_problem(s, {full, full, full, full}, 7600);
  DeviceProblem d(problem);
  DeviceBuffer<std::uint16_t> out(static_cast<std::size_t>(s.batch * s.q_heads * s.latent_dim));
  const MlaDecodePlan plan = af::kernels::plan_mla_decode(s, af::kernels::multiprocessor_count(), 4);
  REQUIRE(plan.splits > 1);  // the graph holds the combine too
  DeviceBuffer<unsigned char> workspace(plan.workspace_bytes);

  cudaStream_t stream = nullptr;
  CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  // One ordinary call first (it also loads the kernels' module before the capture), checked at full length.
  out.fill_bytes(0xFF);
  af::kernels::mla_decode_attention(plan, s, d.q.data(), d.cache.data(), d.block_table.data(), d.lengths.data(),
                                    out.data(), problem.scale, workspace.data(), workspace.size(), stream);
  CUDA_CHECK(cudaStreamSynchronize(stream));
  require_matches(problem, out.download(), plan.splits);
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  af::kernels::mla_decode_attention(plan, s, d.q.data(), d.cache.data(), d.block_table.data(), d.lengths.data(),
                                    out.data(), problem.scale, workspace.data(), workspace.size(), stream);
  CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
  CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));

  const std::vector<std::vector<std::int32_t>> steps = {{1, 17, 1000, full}, {2047, 3, full, 64}, {5, 5, 5, 5}};
  for (const auto& lengths : steps) {
    problem.lengths = lengths;
    problem.compute_expected();
    d.lengths.upload(problem.lengths);
    out.fill_bytes(0xFF);
    CUDA_CHECK(cudaGraphLaunch(exec, stream));
    CUDA_CHECK(cudaStreamSynchronize(stream));
    require_matches(problem, out.download(), plan.splits);
  }
  CUDA_CHECK(cudaGraphExecDestroy(exec));
  CUDA_CHECK(cudaGraphDestroy(graph));
  CUDA_CHECK(cudaStreamDestroy(stream));
}

TEST_CASE("the MLA split count depends on the capacity only, in whole pages", "[mla-decode][split]") {
  MlaDecodeShape narrow = shape_of(1, 128, 64, 512);  // 32768 tokens of one sequence: 8 blocks without splits
  narrow.num_pages = 512;
  const MlaDecodePlan plan = af::kernels::plan_mla_decode(narrow, 132);
  CHECK(plan.splits > 1);
  CHECK(std::int64_t{plan.splits} * plan.pages_per_split >= narrow.max_pages_per_seq);
  CHECK(plan.workspace_bytes == static_cast<std::size_t>(128 * plan.splits) * 513 * sizeof(float));
  MlaDecodeShape wide = narrow;
  wide.batch = 128;
  wide.max_pages_per_seq = 64;
  CHECK(af::kernels::plan_mla_decode(wide, 132).splits == 1);
  const MlaDecodePlan forced = af::kernels::plan_mla_decode(narrow, 132, 100000);
  CHECK(forced.splits == 512);  // at most one split per page
  CHECK(forced.pages_per_split == 1);
}

TEST_CASE("MLA decode rejects bad shapes with an af::Error naming the value", "[mla-decode]") {
  MlaDecodeShape good = shape_of(2, 128, 64, 4);
  good.num_pages = 8;
  REQUIRE_NOTHROW(af::kernels::plan_mla_decode(good, 132));
  MlaDecodeShape s = good;
  s.latent_dim = 256;
  REQUIRE_THROWS_WITH(af::kernels::plan_mla_decode(s, 132),
                      Catch::Contains("latent_dim is 256") && Catch::Contains("expected 512"));
  s = good;
  s.rope_dim = 32;
  REQUIRE_THROWS_WITH(af::kernels::plan_mla_decode(s, 132),
                      Catch::Contains("rope_dim is 32") && Catch::Contains("expected 64"));
  s = good;
  s.page_size = 24;
  REQUIRE_THROWS_WITH(af::kernels::plan_mla_decode(s, 132), Catch::Contains("page_size is 24"));
  s.page_size = 8192;
  REQUIRE_THROWS_WITH(af::kernels::plan_mla_decode(s, 132), Catch::Contains("page_size is 8192"));
  s = good;
  s.q_heads = 0;
  REQUIRE_THROWS_WITH(af::kernels::plan_mla_decode(s, 132), Catch::Contains("q_heads is 0"));
  s = good;
  s.max_pages_per_seq = 0;
  REQUIRE_THROWS_WITH(af::kernels::plan_mla_decode(s, 132), Catch::Contains("max_pages_per_seq is 0"));
  s = good;
  s.batch = 70000;
  REQUIRE_THROWS_WITH(af::kernels::plan_mla_decode(s, 132), Catch::Contains("batch is 70000"));
  REQUIRE_THROWS_WITH(af::kernels::plan_mla_decode(good, 0), Catch::Contains("sm_count is 0"));
  const MlaDecodePlan plan = af::kernels::plan_mla_decode(good, 132, 4);
  REQUIRE(plan.workspace_bytes > 0);
  REQUIRE_THROWS_WITH(af::kernels::mla_decode_attention(plan, good, nullptr, nullptr, nullptr, nullptr, nullptr, 1.0f,
                                                        nullptr, 0, nullptr),
                      Catch::Contains("workspace_bytes is 0"));
  MlaDecodePlan wrong = plan;
  wrong.splits = 1;
  wrong.pages_per_split = 1;
  REQUIRE_THROWS_WITH(af::kernels::mla_decode_attention(wrong, good, nullptr, nullptr, nullptr, nullptr, nullptr, 1.0f,
                                                        nullptr, 0, nullptr),
                      Catch::Contains("does not fit max_pages_per_seq = 4"));
}
