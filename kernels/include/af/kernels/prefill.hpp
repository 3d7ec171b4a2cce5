#pragma once
/// @file prefill.hpp
/// Causal prefill and append on the GPU (issue 20): the packed varlen layout of af/varlen_attention.hpp (bf16
/// q, k, v and output, cumulative query and key counts in device memory), FlashAttention-2's division of the
/// work on the tensor cores (mma.sync bf16, float32 accumulation): a block per 64 query positions of one head
/// and sequence, a warp per 16 of them walking the keys up to its diagonal with the online softmax.
///
/// Requirements the host cannot check (device data): cu_q and cu_k as validate_cumulative() accepts them,
/// and every sequence's query count at most `max_query_len` (the grid covers that many positions; the rows of
/// a longer sequence past it are not written).

#include "af/varlen_attention.hpp"

#include <cuda_runtime.h>

#include <cstdint>

namespace af::kernels {

/// Runs the causal varlen attention on `stream`: out [total_q, q_heads, head_dim] from q [total_q, q_heads,
/// head_dim] and k, v [total_k, kv_heads, head_dim] (device pointers; cu_q, cu_k [batch + 1] device int32).
/// `scale` multiplies q . k (1 / sqrt(head_dim) usually). Throws af::Error naming the bad value for a shape
/// the kernel does not cover (head_dim 64 or 128; batch and q_heads at most 65535; max_query_len at least 1).
/// Launches only: safe to capture in a CUDA graph.
void prefill_attention(const af::VarlenShape& shape, std::int64_t max_query_len, const std::uint16_t* q,
                       const std::uint16_t* k, const std::uint16_t* v, const std::int32_t* cu_q,
                       const std::int32_t* cu_k, std::uint16_t* out, float scale, cudaStream_t stream);

}  // namespace af::kernels
