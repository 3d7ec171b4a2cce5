#pragma once
/// @file mla_decode.hpp
/// MLA decode on the GPU: the absorbed path over the paged latent cache of af/mla_decode.hpp, as FlashMLA
/// (github.com/deepseek-ai/FlashMLA) frames it: one KV head of 576-wide rows shared by every query head, scores
/// over all 576 values, outputs the 512-wide latent mix. bf16 in, float32 accumulation on the tensor cores
/// (mma.sync), split-KV over pages with the combine kernel of the dense decode. The plan depends on the shape only
/// (the capacity, not the lengths), so one captured CUDA graph serves every decode step as long as the pointers
/// and the shape stay the same.
///
/// Requirements the host cannot check (device data): every lengths[b] in 1..capacity() (a length of 0 gives NaN
/// outputs for that sequence; lengths are clamped to 0..capacity() so no read leaves the table's row); the
/// block-table entries of each sequence's first ceil(lengths[b] / page_size) pages in 0..num_pages - 1; q, the
/// cache and out 16-byte aligned (cudaMalloc's pointers are).

#include "af/mla_decode.hpp"

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace af::kernels {

/// What a launch needs: the split count over each sequence's pages and the workspace of the partials.
struct MlaDecodePlan {
  int splits = 1;                   ///< blocks along each sequence's capacity (1: no combine step)
  int pages_per_split = 1;          ///< pages per split (the last split may hold fewer)
  std::size_t workspace_bytes = 0;  ///< partial outputs and log-sum-exps when splits > 1
};

/// Query heads one block serves: the 16 rows of one mma.sync.m16n8k16 tile. q_heads need not be a multiple of
/// it (the rows past the last head are zero and never written).
constexpr int mla_heads_per_block = 16;

/// Checks the shape (throws af::Error naming the bad value and what was expected: latent_dim 512 and rope_dim 64,
/// page_size a power of two up to 4096, ...) and chooses the split count from the capacity and the device's
/// multiprocessor count as the paged decode does (`splits` > 0 forces a count, at most max_pages_per_seq). Call
/// it once, outside the hot path: it asks the runtime for the kernel's occupancy.
MlaDecodePlan plan_mla_decode(const af::MlaDecodeShape& shape, int sm_count, int splits = 0);

/// Runs MLA decode on `stream`: out [batch, q_heads, latent_dim] from the absorbed queries q, the page pool
/// `cache`, the block table and the lengths (all device pointers, layouts in af/mla_decode.hpp). `workspace`
/// holds at least `plan.workspace_bytes` bytes of device memory (may be null when that is 0). `scale` multiplies
/// q . k (DeepSeek-V3: mla_softmax_scale of af/mla.hpp). Launches only: safe to capture in a CUDA graph.
void mla_decode_attention(const MlaDecodePlan& plan, const af::MlaDecodeShape& shape, const std::uint16_t* q,
                          const std::uint16_t* cache, const std::int32_t* block_table, const std::int32_t* lengths,
                          std::uint16_t* out, float scale, void* workspace, std::size_t workspace_bytes,
                          cudaStream_t stream);

}  // namespace af::kernels
