// Decode attention (chapters 21 and 22): every version against the CPU reference over random shapes.
#include <catch2/catch.hpp>

#include "af/error.hpp"
#include "af/kernels/decode.hpp"
#include "af/kernels/device_buffer.hpp"
#include "af/kernels/reference.hpp"

#include <cmath>
#include <vector>

using af::kernels::DecodePlan;
using af::kernels::DecodeShape;
using af::kernels::DecodeVersion;
using af::kernels::DeviceBuffer;

namespace {

int sm_count() {
  int device = 0, count = 0;
  CUDA_CHECK(cudaGetDevice(&device));
  CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}

// Runs `version` on fresh random inputs (output poisoned with NaN first) and returns ||out - ref|| / ||ref||.
double decode_error(const DecodeShape& s, DecodeVersion version, std::uint64_t seed, int splits = 0) {
  af::Rng rng(seed);
  const auto q = af::kernels::random_bf16(static_cast<std::size_t>(s.batch * s.q_heads * s.head_dim), rng);
  const auto cache = static_cast<std::size_t>(s.batch * s.kv_heads * s.seq_len * s.head_dim);
  const auto k = af::kernels::random_bf16(cache, rng), v = af::kernels::random_bf16(cache, rng);
  DeviceBuffer<std::uint16_t> dq{std::span<const std::uint16_t>(q)}, dk{std::span<const std::uint16_t>(k)},
      dv{std::span<const std::uint16_t>(v)}, out(q.size());
  out.fill_bytes(0xFF);  // bf16 NaN: an element the kernel does not write fails the check
  const DecodePlan plan = af::kernels::plan_decode(s, version, sm_count(), splits);
  DeviceBuffer<unsigned char> workspace(plan.workspace_bytes);
  af::kernels::decode_attention(plan, s, dq.data(), dk.data(), dv.data(), out.data(),
                                static_cast<float>(1.0 / std::sqrt(static_cast<double>(s.head_dim))), workspace.data(),
                                workspace.size(), nullptr);
  CUDA_CHECK(cudaDeviceSynchronize());
  const auto got = af::kernels::bf16_to_floats(out.download());
  return af::kernels::relative_error(got, af::kernels::reference_decode(s, q, k, v));
}

std::string describe(const DecodeShape& s, DecodeVersion v) {
  return std::string(af::kernels::name_of(v)) + " batch " + std::to_string(s.batch) + " q_heads " +
         std::to_string(s.q_heads) + " kv_heads " + std::to_string(s.kv_heads) + " head_dim " +
         std::to_string(s.head_dim) + " seq_len " + std::to_string(s.seq_len);
}

constexpr DecodeVersion all_versions[] = {DecodeVersion::v1_naive, DecodeVersion::v2_gqa,       DecodeVersion::v3_split,
                                          DecodeVersion::v4_mma,   DecodeVersion::v5_pipelined, DecodeVersion::best};

bool supports(DecodeVersion v, std::int64_t head_dim) {
  return (v != DecodeVersion::v4_mma && v != DecodeVersion::v5_pipelined) || head_dim <= 128;
}

}  // namespace

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
    for (DecodeVersion v : all_versions) {
      if (!supports(v, s.head_dim)) continue;
      const double error = decode_error(s, v, 7000 + trial);
      INFO(describe(s, v) << ": relative error " << error);
      REQUIRE(error < 1e-2);  // NaN fails too
    }
  }
}

TEST_CASE("split-KV decode is right for every split count, down to one key per split", "[decode][split]") {
  for (DecodeVersion v : {DecodeVersion::v3_split, DecodeVersion::v4_mma, DecodeVersion::v5_pipelined}) {
    for (std::int64_t seq_len : {1, 5, 33, 130}) {
      for (int splits : {1, 2, 3, 7, 64, 200}) {
        const DecodeShape s{2, 8, 2, 128, seq_len};
        const double error = decode_error(s, v, 11 + splits, splits);
        INFO(describe(s, v) << ", " << splits << " splits: relative error " << error);
        REQUIRE(error < 1e-2);
      }
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
