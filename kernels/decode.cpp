// The host side of decode attention: shape checks, the choice of version and split count, the workspace
// layout, and the launches. Chapters 21 and 22.
#include "launchers.hpp"

#include "af/error.hpp"
#include "af/kernels/cuda_check.hpp"
#include "af/kernels/decode.hpp"

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <string>
#include <utility>

namespace af::kernels {

double DecodeShape::kv_bytes() const {
  return 2.0 * static_cast<double>(batch) * static_cast<double>(kv_heads) * static_cast<double>(seq_len) *
         static_cast<double>(head_dim) * 2.0;
}

namespace {
constexpr std::array<std::pair<DecodeVersion, std::string_view>, 6> names = {{
    {DecodeVersion::v1_naive, "v1_naive"},
    {DecodeVersion::v2_gqa, "v2_gqa"},
    {DecodeVersion::v3_split, "v3_split"},
    {DecodeVersion::v4_mma, "v4_mma"},
    {DecodeVersion::v5_pipelined, "v5_pipelined"},
    {DecodeVersion::best, "best"},
}};

void validate(const DecodeShape& s, DecodeVersion version) {
  require(s.batch >= 1 && s.batch <= 65535, "decode: batch is {} (expected 1..65535)", s.batch);
  require(s.kv_heads >= 1 && s.kv_heads <= 4096, "decode: kv_heads is {} (expected 1..4096)", s.kv_heads);
  require(s.q_heads >= s.kv_heads && s.q_heads % s.kv_heads == 0 && s.q_heads <= 4096,
          "decode: q_heads is {} (expected a multiple of kv_heads = {}, at most 4096)", s.q_heads, s.kv_heads);
  require(s.seq_len >= 1 && s.seq_len <= (std::int64_t{1} << 31),
          "decode: seq_len is {} (expected 1..2^31 cached tokens)", s.seq_len);
  const bool mma = version == DecodeVersion::v4_mma || version == DecodeVersion::v5_pipelined;
  require(s.head_dim == 64 || s.head_dim == 128 || (!mma && s.head_dim == 256),
          "decode: head_dim is {} (expected {} for {})", s.head_dim, mma ? "64 or 128" : "64, 128 or 256",
          name_of(version));
}

}  // namespace

// [choose-splits]
// Splits along the cached sequence when the batch alone cannot fill the machine. With `base` blocks per
// split and `slots` blocks resident at once, s splits run in ceil(base * s / slots) waves, each as long as
// keys_per_split plus a fixed cost per block (loading the queries, the first tile's latency, merging the
// warps, writing the partial): about 128 keys' worth on the H100, fitted to the sweep in kernels/NOTES.md.
// Take the s with the smallest estimate, the fewest splits on a tie, never below 256 keys per split.
int detail::choose_splits(std::int64_t base, std::int64_t slots, std::int64_t seq_len) {
  constexpr std::int64_t min_keys = 256, max_splits = 128, block_cost_keys = 128;
  if (base >= slots) return 1;  // the machine is full already: splits would only add the combine
  const std::int64_t limit = std::max<std::int64_t>(1, std::min(max_splits, seq_len / min_keys));
  std::int64_t best = 1;
  double best_time = std::numeric_limits<double>::infinity();
  for (std::int64_t s = 1; s <= limit; ++s) {
    const std::int64_t keys = (seq_len + s - 1) / s;
    const std::int64_t waves = (base * s + slots - 1) / slots;
    const double time = static_cast<double>(waves) * static_cast<double>(keys + block_cost_keys);
    if (time < best_time * 0.995) {
      best = s;
      best_time = time;
    }
  }
  return static_cast<int>(best);
}
// [/choose-splits]

std::string_view name_of(DecodeVersion version) {
  for (const auto& [v, name] : names)
    if (v == version) return name;
  return "unknown";
}

DecodeVersion decode_version_from_name(std::string_view name) {
  for (const auto& [v, n] : names)
    if (n == name) return v;
  throw Error(fmt::format(
      "decode: no version named '{}' (expected v1_naive, v2_gqa, v3_split, v4_mma, v5_pipelined or best)", name));
}

DecodePlan plan_decode(const DecodeShape& shape, DecodeVersion version, int sm_count, int splits) {
  if (version == DecodeVersion::best)
    version = (shape.head_dim == 64 || shape.head_dim == 128) ? DecodeVersion::v5_pipelined : DecodeVersion::v3_split;
  validate(shape, version);
  require(sm_count >= 1, "decode: sm_count is {} (expected at least 1)", sm_count);
  require(splits >= 0, "decode: splits is {} (expected 0 to choose, or a count)", splits);
  DecodePlan plan;
  plan.version = version;
  const auto group = static_cast<int>(shape.group());
  const bool pipelined = version == DecodeVersion::v5_pipelined;
  if (version == DecodeVersion::v3_split || version == DecodeVersion::v4_mma || pipelined) {
    const bool mma = version != DecodeVersion::v3_split;
    const int heads = mma ? detail::mma_heads_per_block : detail::gqa_heads_per_block(group);
    const std::int64_t base = shape.batch * shape.kv_heads * ((group + heads - 1) / heads);
    const int per_sm = mma ? detail::mma_blocks_per_sm(static_cast<int>(shape.head_dim), pipelined)
                           : detail::gqa_blocks_per_sm(static_cast<int>(shape.head_dim), group);
    const std::int64_t slots = std::int64_t{sm_count} * std::max(per_sm, 1);
    plan.splits = splits > 0 ? static_cast<int>(std::min<std::int64_t>(splits, shape.seq_len))
                             : detail::choose_splits(base, slots, shape.seq_len);
    require(plan.splits <= 65535, "decode: splits is {} (expected at most 65535)", plan.splits);
  }
  // Every split holds at least one key: recount after rounding the keys per split up.
  plan.keys_per_split = (shape.seq_len + plan.splits - 1) / plan.splits;
  plan.splits = static_cast<int>((shape.seq_len + plan.keys_per_split - 1) / plan.keys_per_split);
  if (plan.splits > 1)
    plan.workspace_bytes = static_cast<std::size_t>(shape.batch * shape.q_heads * plan.splits) *
                           static_cast<std::size_t>(shape.head_dim + 1) * sizeof(float);
  return plan;
}

void decode_attention(const DecodePlan& plan, const DecodeShape& shape, const std::uint16_t* q, const std::uint16_t* k,
                      const std::uint16_t* v, std::uint16_t* out, float scale, void* workspace,
                      std::size_t workspace_bytes, cudaStream_t stream) {
  validate(shape, plan.version);
  require(plan.version != DecodeVersion::best, "decode: plan.version is best (expected a plan from plan_decode)");
  require(plan.splits >= 1 && plan.keys_per_split * plan.splits >= shape.seq_len &&
              plan.keys_per_split * (plan.splits - 1) < shape.seq_len,
          "decode: the plan ({} splits of {} keys) does not fit seq_len = {} (expected a plan from plan_decode)",
          plan.splits, plan.keys_per_split, shape.seq_len);
  require(workspace_bytes >= plan.workspace_bytes && (plan.workspace_bytes == 0 || workspace != nullptr),
          "decode: workspace_bytes is {} (expected at least {})", workspace_bytes, plan.workspace_bytes);
  detail::DecodeArgs args{};
  args.q = q;
  args.k = k;
  args.v = v;
  args.out = out;
  args.batch = static_cast<int>(shape.batch);
  args.q_heads = static_cast<int>(shape.q_heads);
  args.kv_heads = static_cast<int>(shape.kv_heads);
  args.head_dim = static_cast<int>(shape.head_dim);
  args.seq_len = shape.seq_len;
  args.splits = plan.splits;
  args.keys_per_split = plan.keys_per_split;
  args.scale_log2 = scale * 1.4426950408889634f;
  if (plan.splits > 1) {
    args.partial_o = static_cast<float*>(workspace);
    args.partial_lse = args.partial_o + shape.batch * shape.q_heads * plan.splits * shape.head_dim;
  }
  switch (plan.version) {
    case DecodeVersion::v1_naive:
      detail::launch_decode_v1(args, stream);
      break;
    case DecodeVersion::v2_gqa:
    case DecodeVersion::v3_split:
      detail::launch_decode_gqa(args, stream);
      break;
    case DecodeVersion::v4_mma:
      detail::launch_decode_mma(args, false, stream);
      break;
    default:
      detail::launch_decode_mma(args, true, stream);
      break;
  }
  if (plan.splits > 1) detail::launch_decode_combine(args, stream);
}

}  // namespace af::kernels
