#pragma once
/// @file varlen_attention.hpp
/// Causal prefill and append over a batch of sequences of different lengths, in the packed layout of
/// FlashAttention's varlen interface: the layout the prefill kernel reads (kernels/, issue 20), and its
/// float64 reference on the CPU.
///
/// Layouts (row-major; q, k, v and the output are bf16 bit patterns as af::bf16_bits makes them):
///   q       [total_q, q_heads, head_dim]    sequence b's queries are rows cu_q[b] .. cu_q[b + 1] - 1
///   k, v    [total_k, kv_heads, head_dim]   sequence b's keys are rows cu_k[b] .. cu_k[b + 1] - 1
///   cu_q    [batch + 1] int32               cumulative query counts, cu_q[0] = 0, cu_q[batch] = total_q
///   cu_k    [batch + 1] int32               cumulative key counts, cu_k[0] = 0, cu_k[batch] = total_k
///   out     [total_q, q_heads, head_dim]
/// Sequence b has L_q = cu_q[b + 1] - cu_q[b] new queries over L_k = cu_k[b + 1] - cu_k[b] >= L_q keys: the
/// cache after the new tokens were appended. Its query i sits at position L_k - L_q + i and sees the keys
/// 0 .. L_k - L_q + i (causal). L_q = L_k is a prefill; L_q < L_k an append (a chunk of a chunked prefill, or
/// the tokens a speculative decoder verifies); L_q = 1 a decode step. L_q = 0 is allowed (nothing to do).
/// Query head h reads KV head h / (q_heads / kv_heads).

#include <cstdint>
#include <span>
#include <vector>

namespace af {

struct VarlenShape {
  std::int64_t batch = 1;
  std::int64_t q_heads = 1;
  std::int64_t kv_heads = 1;
  std::int64_t head_dim = 128;

  std::int64_t group() const { return q_heads / kv_heads; }
  /// Throws af::Error naming the first size that is not positive or a q_heads that is not a multiple of
  /// kv_heads.
  void validate() const;
};

/// Checks the cumulative counts against the shape: batch + 1 entries each, starting at 0, non-decreasing,
/// with L_k >= L_q per sequence. Throws af::Error naming the sequence and the values.
void validate_cumulative(const VarlenShape& shape, std::span<const std::int32_t> cu_q,
                         std::span<const std::int32_t> cu_k);

/// Causal attention of every sequence's new queries over its keys, in float64 from the bf16 values, `scale`
/// multiplying q . k: out [total_q, q_heads, head_dim], the exact answer up to float64 rounding. Throws
/// af::Error when the cumulative counts are invalid or a size disagrees with them.
std::vector<double> varlen_causal_attention_f64(const VarlenShape& shape, std::span<const std::uint16_t> q,
                                                std::span<const std::uint16_t> k, std::span<const std::uint16_t> v,
                                                std::span<const std::int32_t> cu_q, std::span<const std::int32_t> cu_k,
                                                double scale);

/// Bytes of q, k, v and the output that one call must move at least once (bf16): the floor the prefill
/// kernel's traffic is compared with.
double varlen_attention_min_bytes(const VarlenShape& shape, std::int64_t total_q, std::int64_t total_k);

/// FLOPs of the causal products Q K^T and P V, all heads: 4 x head_dim per visible (query, key) pair and head
/// (a multiply-add is 2), the work the prefill kernel's tensor cores do at least.
double varlen_attention_causal_flops(const VarlenShape& shape, std::span<const std::int32_t> cu_q,
                                     std::span<const std::int32_t> cu_k);

}  // namespace af
