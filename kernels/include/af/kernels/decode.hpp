#pragma once
/// @file decode.hpp
/// Decode attention over a bf16 KV cache (chapters 21 and 22): one new query token per sequence attends
/// over every cached token, with float32 accumulation.
///
/// Layouts (row-major, every element a bf16 bit pattern as af::bf16_bits makes it):
///   q   [batch, q_heads, head_dim]
///   k,v [batch, kv_heads, seq_len, head_dim]   one head's cached tokens are contiguous
///   out [batch, q_heads, head_dim]
/// Query head `h` reads KV head `h / group` with `group = q_heads / kv_heads` (MHA: group 1; GQA: group > 1;
/// MQA: kv_heads 1), the grouping of PyTorch's `enable_gqa` and of Hugging Face's `repeat_kv`.

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <string_view>

namespace af::kernels {

struct DecodeShape {
  std::int64_t batch = 1;
  std::int64_t q_heads = 1;
  std::int64_t kv_heads = 1;
  std::int64_t head_dim = 128;
  std::int64_t seq_len = 1;  ///< cached tokens per sequence, the new token's own key and value included

  std::int64_t group() const { return q_heads / kv_heads; }
  /// Bytes of K and V one decode step must read: 2 * batch * kv_heads * seq_len * head_dim * 2.
  double kv_bytes() const;
};

/// The kernel versions, in the order of the story; each one is kept, runnable and checked.
enum class DecodeVersion {
  v1_naive,      ///< one warp per query head, one key at a time; K/V read once per query head
  v2_gqa,        ///< one block per KV head and its whole group of query heads; 16-byte loads; no split
  v3_split,      ///< v2 with the cache split across blocks (split-KV) and a combine step
  v4_mma,        ///< split-KV with the scores and the weighted sum on the tensor cores (mma.sync bf16)
  v5_pipelined,  ///< v4 with each warp's next tile of K/V loaded while it computes on the current one
  best,          ///< v5_pipelined where it applies (head_dim 64 or 128), else v3_split
};

std::string_view name_of(DecodeVersion version);
/// "v1_naive", ..., "v5_pipelined", "best"; throws af::Error for another name.
DecodeVersion decode_version_from_name(std::string_view name);

/// What a launch needs: the version that runs (never `best`), the number of KV splits and the workspace.
struct DecodePlan {
  DecodeVersion version = DecodeVersion::v1_naive;
  int splits = 1;                   ///< blocks along the cached sequence (1: no combine step)
  std::int64_t keys_per_split = 0;  ///< cached tokens per split (the last split may hold fewer)
  std::size_t workspace_bytes = 0;  ///< partial outputs and log-sum-exps when splits > 1
};

/// Checks the shape for `version` (throws af::Error naming the bad value) and chooses the split count
/// from the shape and the device's multiprocessor count (`splits` > 0 forces a count instead).
/// Call it once, outside the hot path: it asks the runtime for the occupancy of the kernel.
DecodePlan plan_decode(const DecodeShape& shape, DecodeVersion version, int sm_count, int splits = 0);

/// Runs the planned kernel(s) on `stream`. `workspace` holds at least `plan.workspace_bytes` bytes of
/// device memory (may be null when that is 0). `scale` multiplies q . k (1 / sqrt(head_dim) usually).
void decode_attention(const DecodePlan& plan, const DecodeShape& shape, const std::uint16_t* q, const std::uint16_t* k,
                      const std::uint16_t* v, std::uint16_t* out, float scale, void* workspace,
                      std::size_t workspace_bytes, cudaStream_t stream);

}  // namespace af::kernels
