// Causal varlen prefill and append on the tensor cores (issue 20): the kernel against the float64 CPU reference
// of af/varlen_attention.hpp, element by element, over random batches that mix prefills, appends after a cache,
// decode steps and empty sequences, group sizes 1 to 20, head dimensions 64 and 128, and a dominant key.
#include <catch2/catch.hpp>

#include "af/error.hpp"
#include "af/kernels/device_buffer.hpp"
#include "af/kernels/prefill.hpp"
#include "af/kernels/reference.hpp"
#include "af/numeric.hpp"
#include "af/varlen_attention.hpp"
#include "elementwise.hpp"

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

using af::VarlenShape;
using af::kernels::DeviceBuffer;

namespace {

// The tensor-core bound of test_decode.cpp (derived there): the prefill kernel does version 4's arithmetic
// (bf16 products on the tensor cores, float32 sums, each softmax weight rounded to bf16 before P V, the output
// rounded to bf16); only which keys a row sees differs.
constexpr af_test::Tolerance tolerance{5e-3, 8e-3};

struct VarlenProblem {
  VarlenShape shape;
  std::vector<std::int32_t> cu_q{0}, cu_k{0};
  std::int64_t max_query_len = 1;
  std::vector<std::uint16_t> q, k, v;
  float scale = 1.0f;
  std::vector<double> expected;
};

// Sequences with the given (queries, keys) counts; q times q_factor and k times k_factor (powers of two).
VarlenProblem make_problem(VarlenShape s, const std::vector<std::pair<std::int32_t, std::int32_t>>& lengths,
                           std::uint64_t seed, float q_factor = 1.0f, float k_factor = 1.0f) {
  af::Rng rng(seed);
  VarlenProblem p;
  s.batch = static_cast<std::int64_t>(lengths.size());
  p.shape = s;
  for (const auto& [queries, keys] : lengths) {
    p.cu_q.push_back(p.cu_q.back() + queries);
    p.cu_k.push_back(p.cu_k.back() + keys);
    p.max_query_len = std::max<std::int64_t>(p.max_query_len, queries);
  }
  const auto scaled = [&](std::size_t count, float factor) {
    std::vector<std::uint16_t> bits = af::kernels::random_bf16(count, rng);
    for (auto& b : bits) b = af::bf16_bits(af::bf16_to_float(b) * factor);
    return bits;
  };
  p.q = scaled(static_cast<std::size_t>(p.cu_q.back() * s.q_heads * s.head_dim), q_factor);
  p.k = scaled(static_cast<std::size_t>(p.cu_k.back() * s.kv_heads * s.head_dim), k_factor);
  p.v = scaled(p.k.size(), 1.0f);
  p.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(s.head_dim)));
  p.expected = af::varlen_causal_attention_f64(s, p.q, p.k, p.v, p.cu_q, p.cu_k, p.scale);
  return p;
}

std::string describe(const VarlenProblem& p) {
  std::string seqs;
  for (std::size_t b = 0; b + 1 < p.cu_q.size(); ++b)
    seqs += (seqs.empty() ? "" : " ") + std::to_string(p.cu_q[b + 1] - p.cu_q[b]) + "/" +
            std::to_string(p.cu_k[b + 1] - p.cu_k[b]);
  return "q_heads " + std::to_string(p.shape.q_heads) + " kv_heads " + std::to_string(p.shape.kv_heads) + " head_dim " +
         std::to_string(p.shape.head_dim) + ", queries/keys [" + seqs + "]";
}

std::string element_of(const VarlenProblem& p, std::size_t i) {
  const VarlenShape& s = p.shape;
  const auto index = static_cast<std::int64_t>(i);
  const std::int64_t c = index % s.head_dim, h = index / s.head_dim % s.q_heads, row = index / s.head_dim / s.q_heads;
  const auto b = static_cast<std::size_t>(std::upper_bound(p.cu_q.begin(), p.cu_q.end(), row) - p.cu_q.begin() - 1);
  return "sequence " + std::to_string(b) + ", query " + std::to_string(row - p.cu_q[b]) + ", q_head " +
         std::to_string(h) + ", channel " + std::to_string(c);
}

// Runs the kernel with the output poisoned with NaN first, and checks every element.
void check_prefill(const VarlenProblem& p) {
  DeviceBuffer<std::uint16_t> q(std::span<const std::uint16_t>(p.q)), k(std::span<const std::uint16_t>(p.k)),
      v(std::span<const std::uint16_t>(p.v)), out(p.q.size());
  DeviceBuffer<std::int32_t> cu_q(std::span<const std::int32_t>(p.cu_q)), cu_k(std::span<const std::int32_t>(p.cu_k));
  out.fill_bytes(0xFF);  // bf16 NaN: an element the kernel does not write fails the check
  af::kernels::prefill_attention(p.shape, p.max_query_len, q.data(), k.data(), v.data(), cu_q.data(), cu_k.data(),
                                 out.data(), p.scale, nullptr);
  CUDA_CHECK(cudaDeviceSynchronize());
  const auto got = af::kernels::bf16_to_floats(out.download());
  const af_test::ElementwiseReport report =
      af_test::compare_elementwise(got, p.expected, tolerance, [&](std::size_t i) { return element_of(p, i); });
  INFO(describe(p));
  INFO(report.message);
  REQUIRE(report.failures == 0);
}

}  // namespace

TEST_CASE("prefill equals the float64 reference on batches of prefills, appends and decode steps", "[prefill]") {
  af::Rng rng(3000);
  const std::int64_t groups[] = {1, 4, 8, 16, 20};
  for (int trial = 0; trial < 20; ++trial) {
    VarlenShape s;
    s.kv_heads = 1 + rng.below(2);
    s.q_heads = s.kv_heads * groups[trial % 5];
    s.head_dim = trial % 2 == 0 ? 64 : 128;
    // The edge cases first: one query, a partial warp, a partial block, exactly a block, an append of a
    // 128-token chunk after a cache, a decode step after a cache, an empty sequence; then random ones.
    std::vector<std::pair<std::int32_t, std::int32_t>> lengths = {{1, 1},     {17, 17}, {65, 65}, {64, 64},
                                                                  {128, 300}, {1, 77},  {0, 5}};
    const std::int64_t extra = rng.below(4);
    for (std::int64_t i = 0; i < extra; ++i) {
      const auto queries = static_cast<std::int32_t>(1 + rng.below(200));
      lengths.push_back({queries, queries + static_cast<std::int32_t>(rng.below(3) == 0 ? rng.below(500) : 0)});
    }
    std::rotate(lengths.begin(), lengths.begin() + trial % 7, lengths.end());  // the edges at every batch index
    check_prefill(make_problem(s, lengths, 7000 + static_cast<std::uint64_t>(trial)));
  }
}

TEST_CASE("prefill handles long prompts and long appends", "[prefill][long]") {
  std::uint64_t seed = 7100;
  for (std::int64_t head_dim : {64, 128})
    for (std::int64_t group : {1, 8}) {
      const VarlenShape s{.batch = 1, .q_heads = 2 * group, .kv_heads = 2, .head_dim = head_dim};
      check_prefill(make_problem(s, {{1031, 1031}, {257, 2100}}, seed++));
    }
}

TEST_CASE("prefill stays exact when one key dominates the softmax", "[prefill]") {
  // Scores scaled up by 16: most rows put nearly all their weight on one key, and a lost maximum or a wrong
  // rescale of the running sum shows at once.
  const VarlenShape s{.batch = 1, .q_heads = 8, .kv_heads = 2, .head_dim = 128};
  check_prefill(make_problem(s, {{100, 100}, {33, 200}}, 7200, 4.0f, 4.0f));
}

TEST_CASE("prefill rejects bad shapes with an af::Error naming the value", "[prefill]") {
  const auto error_of = [](VarlenShape s, std::int64_t max_query_len) {
    try {
      af::kernels::prefill_attention(s, max_query_len, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, 1.0f,
                                     nullptr);
    } catch (const af::Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  CHECK_THAT(error_of({1, 4, 4, 96}, 8), Catch::Contains("head_dim is 96"));
  CHECK_THAT(error_of({1, 6, 4, 64}, 8), Catch::Contains("q_heads is 6"));
  CHECK_THAT(error_of({1, 4, 4, 64}, 0), Catch::Contains("max_query_len is 0"));
  CHECK_THAT(error_of({70000, 4, 4, 64}, 8), Catch::Contains("batch is 70000"));
}
