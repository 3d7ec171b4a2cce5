// Decode attention (chapters 21 and 22): every version against a float64 CPU reference, element by element,
// over random shapes, full and partial tiles of query heads, peaked softmax scores and forced split counts.
#include <catch2/catch.hpp>

#include "af/error.hpp"
#include "af/kernels/decode.hpp"
#include "af/kernels/device_buffer.hpp"
#include "af/kernels/reference.hpp"
#include "af/numeric.hpp"
#include "elementwise.hpp"

#include <cmath>
#include <limits>
#include <string>
#include <vector>

using af::kernels::DecodePlan;
using af::kernels::DecodeShape;
using af::kernels::DecodeVersion;
using af::kernels::DeviceBuffer;

namespace {

// Each output element must satisfy |got - expected| <= atol + rtol * |expected| against the float64 reference
// computed from the same bf16 inputs, so the bound only has to cover what the kernels round:
//   - the output is rounded to bf16 (8 significant bits): up to 2^-8 = 3.9e-3 of the value, every version;
//   - q . k, the softmax and the weighted sum run in float32 (24 bits): relative errors near 1e-6, which the
//     absolute part covers where an output is near 0 (a weighted sum of +-v_j that cancels).
// CUDA cores (v1_naive, v2_gqa, v3_split): rtol 5e-3 is the bf16 rounding with a margin of 1.3, atol 2e-5
// twenty times the float32 error of an output near 0.
// Tensor cores (v4_mma, v5_pipelined): they also round each softmax weight p_j to bf16 before O += P V, so
// every term p_j v_j carries its own error of up to 2^-8 and an element's error reaches 2^-8 sum_j p_j |v_j|,
// which is not proportional to |expected| where the terms cancel. The independent roundings mostly cancel
// too (a random walk), but with two or three keys and |v_j| near 3 an error of 3e-3 is not rare: atol 5e-3,
// and rtol 8e-3 for the two roundings of 2^-8 on top of each other. On an H200 the worst element of these
// cases uses 0.78 of its bound on the CUDA cores (the bf16 rounding of the output) and 0.51 on the tensor
// cores (two keys), as a CPU emulation of the same roundings predicted; 600 more draws of 2 to 5 keys in that
// emulation stay under 0.7 of the tensor-core bound.
// A wrong element (a missed tile, a wrong head or channel, an unwritten NaN) is off by far more.
constexpr af_test::Tolerance cuda_core_tolerance{2e-5, 5e-3};
constexpr af_test::Tolerance tensor_core_tolerance{5e-3, 8e-3};

bool uses_tensor_cores(DecodeVersion v) { return v == DecodeVersion::v4_mma || v == DecodeVersion::v5_pipelined; }

// One decode problem: bf16 inputs, the softmax scale and the float64 reference output.
struct DecodeProblem {
  DecodeShape shape;
  std::vector<std::uint16_t> q, k, v;
  float scale = 1.0f;
  std::vector<double> expected;
};

// `count` standard-normal values times `factor` (a power of two: scaling is exact), rounded to bf16.
std::vector<std::uint16_t> random_bf16(std::size_t count, af::Rng& rng, float factor) {
  std::vector<std::uint16_t> bits = af::kernels::random_bf16(count, rng);
  for (auto& b : bits) b = af::bf16_bits(af::bf16_to_float(b) * factor);
  return bits;
}

// Random inputs for `s`. q_factor and k_factor scale q and k: 1 gives logits q . k / sqrt(head_dim) of
// standard deviation 1; 4 and 2 give logits q . k of standard deviation 8 sqrt(head_dim) (about 90 at head_dim
// 128: +-80 is typical, the largest reach +-300) before the 1 / sqrt(head_dim) scale, so one or two keys take
// almost all the weight and the running maximum of the online softmax jumps by tens, rescaling what came before
// by factors as small as exp(-20).
DecodeProblem make_problem(const DecodeShape& s, std::uint64_t seed, float q_factor = 1.0f, float k_factor = 1.0f) {
  af::Rng rng(seed);
  DecodeProblem p;
  p.shape = s;
  const auto cache = static_cast<std::size_t>(s.batch * s.kv_heads * s.seq_len * s.head_dim);
  p.q = random_bf16(static_cast<std::size_t>(s.batch * s.q_heads * s.head_dim), rng, q_factor);
  p.k = random_bf16(cache, rng, k_factor);
  p.v = random_bf16(cache, rng, 1.0f);
  p.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(s.head_dim)));
  p.expected = af::kernels::reference_decode_f64(s, p.q, p.k, p.v, p.scale);
  return p;
}

std::string describe(const DecodeShape& s, DecodeVersion v, int splits) {
  return std::string(af::kernels::name_of(v)) + ", " + std::to_string(splits) + " splits: batch " +
         std::to_string(s.batch) + " q_heads " + std::to_string(s.q_heads) + " kv_heads " + std::to_string(s.kv_heads) +
         " head_dim " + std::to_string(s.head_dim) + " seq_len " + std::to_string(s.seq_len);
}

// "batch b, q_head h (kv_head h / group), channel c" for element i of out [batch, q_heads, head_dim].
std::string element_of(const DecodeShape& s, std::size_t i) {
  const auto index = static_cast<std::int64_t>(i);
  const std::int64_t c = index % s.head_dim, h = index / s.head_dim % s.q_heads, b = index / s.head_dim / s.q_heads;
  return "batch " + std::to_string(b) + ", q_head " + std::to_string(h) + " (kv_head " + std::to_string(h / s.group()) +
         "), channel " + std::to_string(c);
}

// Runs `version` with `splits` (0: the plan's choice) on the problem, the output poisoned with NaN first, and
// checks every output element against the float64 reference.
void check_decode(const DecodeProblem& p, DecodeVersion version, int splits = 0) {
  const DecodeShape& s = p.shape;
  DeviceBuffer<std::uint16_t> dq{std::span<const std::uint16_t>(p.q)}, dk{std::span<const std::uint16_t>(p.k)},
      dv{std::span<const std::uint16_t>(p.v)}, out(p.q.size());
  out.fill_bytes(0xFF);  // bf16 NaN: an element the kernel does not write fails the check
  const DecodePlan plan = af::kernels::plan_decode(s, version, af::kernels::multiprocessor_count(), splits);
  DeviceBuffer<unsigned char> workspace(plan.workspace_bytes);
  af::kernels::decode_attention(plan, s, dq.data(), dk.data(), dv.data(), out.data(), p.scale, workspace.data(),
                                workspace.size(), nullptr);
  CUDA_CHECK(cudaDeviceSynchronize());
  const auto got = af::kernels::bf16_to_floats(out.download());
  const af_test::Tolerance tolerance = uses_tensor_cores(plan.version) ? tensor_core_tolerance : cuda_core_tolerance;
  const af_test::ElementwiseReport report =
      af_test::compare_elementwise(got, p.expected, tolerance, [&](std::size_t i) { return element_of(s, i); });
  INFO(describe(s, version, plan.splits) << " (runs " << af::kernels::name_of(plan.version) << ")");
  INFO(report.message);
  REQUIRE(report.failures == 0);
}

constexpr DecodeVersion all_versions[] = {DecodeVersion::v1_naive, DecodeVersion::v2_gqa,       DecodeVersion::v3_split,
                                          DecodeVersion::v4_mma,   DecodeVersion::v5_pipelined, DecodeVersion::best};

bool supports(DecodeVersion v, std::int64_t head_dim) { return !uses_tensor_cores(v) || head_dim <= 128; }

}  // namespace

TEST_CASE("the element-wise check fails one wrong element, a NaN and an infinity, and names the element",
          "[decode][check]") {
  // 3 x 32 x 256 = 24576 outputs, the reference rounded to bf16 as a kernel would write it.
  const DecodeProblem problem = make_problem({3, 32, 8, 256, 100}, 31);
  std::vector<float> got(problem.expected.size());
  for (std::size_t i = 0; i < got.size(); ++i) got[i] = af::round_to_bf16(static_cast<float>(problem.expected[i]));
  const auto where = [&](std::size_t i) { return element_of(problem.shape, i); };
  REQUIRE(af_test::compare_elementwise(got, problem.expected, cuda_core_tolerance, where).failures == 0);

  // Element (batch 1, q_head 5, channel 17) off by 0.05: a norm over the whole output hardly moves.
  const std::size_t wrong = (1 * 32 + 5) * 256 + 17;
  for (float bad :
       {got[wrong] + 0.05f, std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
    std::vector<float> corrupted = got;
    corrupted[wrong] = bad;
    const auto report = af_test::compare_elementwise(corrupted, problem.expected, tensor_core_tolerance, where);
    INFO(report.message);
    CHECK(report.failures == 1);
    CHECK_THAT(report.message, Catch::Contains("batch 1, q_head 5 (kv_head 1), channel 17"));
    CHECK_THAT(report.message, Catch::Contains("expected") && Catch::Contains("bound"));
  }
  std::vector<float> one_wrong = got;
  one_wrong[wrong] += 0.05f;
  const std::vector<float> expected_floats(problem.expected.begin(), problem.expected.end());
  CHECK(af::kernels::relative_error(one_wrong, expected_floats) < 1e-2);  // what the whole-output norm let pass
}

TEST_CASE("every decode version equals the CPU reference on random MHA, GQA and MQA shapes", "[decode]") {
  af::Rng rng(2100);
  const std::int64_t groups[] = {1, 2, 3, 4, 5, 8, 12, 16, 20, 32};
  const std::int64_t dims[] = {64, 128, 256};
  const std::int64_t lengths[] = {1, 2, 15, 16, 17, 63, 100, 257, 511, 1000, 1537, 3001};
  for (int trial = 0; trial < 24; ++trial) {
    DecodeShape s;
    s.batch = 1 + rng.below(3);
    s.kv_heads = 1 + rng.below(3);
    s.q_heads = s.kv_heads * groups[rng.below(10)];
    s.head_dim = dims[rng.below(3)];
    s.seq_len = lengths[rng.below(12)];
    const DecodeProblem problem = make_problem(s, 7000 + static_cast<std::uint64_t>(trial));
    for (DecodeVersion v : all_versions)
      if (supports(v, s.head_dim)) check_decode(problem, v);
  }
}

TEST_CASE("the tensor-core versions fill a whole tile of 16 query heads and a partial last tile (group 20)",
          "[decode][mma]") {
  std::uint64_t seed = 2200;
  for (std::int64_t group : {16, 20})
    for (std::int64_t kv_heads : {1, 2})
      for (std::int64_t head_dim : {64, 128})
        for (std::int64_t seq_len : {1, 17, 100, 1000}) {
          const DecodeShape s{2, kv_heads * group, kv_heads, head_dim, seq_len};
          const DecodeProblem problem = make_problem(s, seed++);
          for (DecodeVersion v : {DecodeVersion::v4_mma, DecodeVersion::v5_pipelined, DecodeVersion::best})
            for (int splits : {0, 3}) check_decode(problem, v, splits);
        }
}

TEST_CASE("decode stays exact when one key dominates: large logits rescale the online softmax", "[decode][peaked]") {
  std::uint64_t seed = 2300;
  for (std::int64_t group : {4, 20})
    for (std::int64_t head_dim : {64, 128, 256})
      for (std::int64_t seq_len : {100, 1000, 3001}) {
        const DecodeShape s{2, 2 * group, 2, head_dim, seq_len};
        const DecodeProblem problem = make_problem(s, seed++, 4.0f, 2.0f);
        for (DecodeVersion v : all_versions)
          if (supports(v, head_dim))
            for (int splits : {0, 7}) check_decode(problem, v, splits);
      }
}

TEST_CASE("split-KV decode is right for every split count, down to one key per split", "[decode][split]") {
  for (std::int64_t seq_len : {1, 5, 33, 130}) {
    const DecodeShape s{2, 8, 2, 128, seq_len};
    for (int splits : {1, 2, 3, 7, 64, 200}) {
      const DecodeProblem problem = make_problem(s, 11 + static_cast<std::uint64_t>(splits));
      for (DecodeVersion v : {DecodeVersion::v3_split, DecodeVersion::v4_mma, DecodeVersion::v5_pipelined})
        check_decode(problem, v, splits);
    }
  }
}

TEST_CASE("the split count grows when the batch cannot fill the machine", "[decode][split]") {
  const int sms = 132;
  const DecodePlan wide = af::kernels::plan_decode({256, 32, 8, 128, 4096}, DecodeVersion::v4_mma, sms);
  const DecodePlan narrow = af::kernels::plan_decode({1, 32, 8, 128, 131072}, DecodeVersion::v4_mma, sms);
  CHECK(wide.splits == 1);
  CHECK(narrow.splits >= sms / 8);
  CHECK(narrow.workspace_bytes > 0);
  CHECK(narrow.keys_per_split * narrow.splits >= 131072);
}

TEST_CASE("decode rejects bad shapes with an af::Error naming the value", "[decode]") {
  REQUIRE_THROWS_WITH(af::kernels::plan_decode({1, 6, 4, 128, 10}, DecodeVersion::best, 132),
                      Catch::Contains("q_heads is 6"));
  REQUIRE_THROWS_WITH(af::kernels::plan_decode({1, 8, 8, 96, 10}, DecodeVersion::v2_gqa, 132),
                      Catch::Contains("head_dim is 96"));
  REQUIRE_THROWS_WITH(af::kernels::plan_decode({1, 8, 8, 256, 10}, DecodeVersion::v4_mma, 132),
                      Catch::Contains("head_dim is 256"));
  REQUIRE_THROWS_WITH(af::kernels::plan_decode({1, 8, 8, 128, 0}, DecodeVersion::v1_naive, 132),
                      Catch::Contains("seq_len is 0"));
  REQUIRE_THROWS_AS(af::kernels::decode_version_from_name("v9"), af::Error);
  const DecodePlan plan = af::kernels::plan_decode({1, 8, 8, 128, 100000}, DecodeVersion::v3_split, 132);
  REQUIRE(plan.workspace_bytes > 0);
  REQUIRE_THROWS_WITH(af::kernels::decode_attention(plan, {1, 8, 8, 128, 100000}, nullptr, nullptr, nullptr, nullptr,
                                                    1.0f, nullptr, 0, nullptr),
                      Catch::Contains("workspace_bytes is 0"));
}
