#pragma once
/// @file paged_decode.hpp
/// Paged, ragged decode attention on the GPU (issue 20): the layout of af/paged_decode.hpp (a pool of bf16
/// pages, a block table, per-sequence lengths in device memory), version 4's tensor-core split-KV kernel (page
/// size 16 and above) or version 3's on the CUDA cores reading through the block table, float32 accumulation. Nothing
/// about the lengths is read on the host: the plan depends on the shape only (the capacity, not the lengths), so one
/// captured CUDA graph serves every decode step as long as the pointers and the shape stay the same.
///
/// Requirements the host cannot check (device data): every lengths[b] in 1..capacity() (a length of 0 gives
/// NaN outputs for that sequence; lengths are clamped to 0..capacity() so no read leaves the table's row);
/// the block-table entries of each sequence's first ceil(lengths[b] / page_size) pages in 0..num_pages - 1.

#include "af/paged_decode.hpp"

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace af::kernels {

/// Which kernel reads the pages. `automatic` takes the tensor cores wherever they apply (page_size 16, 32 or
/// 64: a tile of 16 consecutive tokens then lies in one page), as the dense decode's `best` takes version 5 for
/// every group at head_dim 64 and 128; page_size 8 stays on the CUDA cores.
enum class PagedDecodeKernel {
  automatic,    ///< tensor_cores where page_size >= 16, else cuda_cores
  cuda_cores,   ///< version 3 over the block table (decode_paged.cu): up to 8 query heads per block, float32 math
  tensor_cores  ///< version 4 over the block table (decode_paged_mma.cu): 16 query heads per block, mma.sync;
                ///< page_size 16, 32 or 64
};

/// What a launch needs: the kernel, the split count over each sequence's pages and the workspace of the
/// partials.
struct PagedDecodePlan {
  af::PagedKvFormat format = af::PagedKvFormat::bf16;  ///< the pools the plan was made for
  bool tensor_cores = false;                           ///< the kernel: tensor cores (true) or CUDA cores
  int splits = 1;                                      ///< blocks along each sequence's capacity (1: no combine step)
  int pages_per_split = 1;                             ///< pages per split (the last split may hold fewer)
  std::size_t workspace_bytes = 0;                     ///< partial outputs and log-sum-exps when splits > 1
};

/// Checks the shape (throws af::Error naming the bad value and what was expected: head_dim 64 or 128,
/// page_size 8, 16, 32 or 64, ...) and chooses the split count from the capacity and the device's
/// multiprocessor count as the dense decode does (`splits` > 0 forces a count, at most max_pages_per_seq).
/// Call it once, outside the hot path: it asks the runtime for the kernel's occupancy (of the bf16 or the FP8
/// kernel, as `format` says). `kernel` picks the kernel (PagedDecodeKernel::automatic: the tensor cores at
/// page_size 16 and above); asking for the tensor cores at page_size 8 throws af::Error.
PagedDecodePlan plan_paged_decode(const af::PagedDecodeShape& shape, int sm_count, int splits = 0,
                                  af::PagedKvFormat format = af::PagedKvFormat::bf16,
                                  PagedDecodeKernel kernel = PagedDecodeKernel::automatic);

/// Runs the paged decode on `stream`: out [batch, q_heads, head_dim] from q, the page pools k and v, the
/// block table and the lengths (all device pointers, layouts in af/paged_decode.hpp). `workspace` holds at
/// least `plan.workspace_bytes` bytes of device memory (may be null when that is 0). `scale` multiplies
/// q . k (1 / sqrt(head_dim) usually). Launches only: safe to capture in a CUDA graph.
void paged_decode_attention(const PagedDecodePlan& plan, const af::PagedDecodeShape& shape, const std::uint16_t* q,
                            const std::uint16_t* k, const std::uint16_t* v, const std::int32_t* block_table,
                            const std::int32_t* lengths, std::uint16_t* out, float scale, void* workspace,
                            std::size_t workspace_bytes, cudaStream_t stream);

/// The same over FP8 pools (af/paged_decode.hpp): k_codes, v_codes E4M3 `[num_pages, kv_heads, page_size,
/// head_dim]` (8-byte aligned), k_scales, v_scales float32 `[num_pages, kv_heads, page_size]`; the plan must
/// come from plan_paged_decode(..., af::PagedKvFormat::fp8_e4m3). On the CUDA cores the codes become float32
/// in registers and each row's scale is applied once per key (to the dot product, to the softmax weight); on
/// the tensor cores the codes become bf16 exactly, and the scales multiply the key's column of the scores (in
/// float32, before the softmax) and the value's column of the softmax weights (before their bf16 rounding for
/// P V; the softmax's sum takes the unscaled weights). q and out stay bf16.
void paged_decode_attention_fp8(const PagedDecodePlan& plan, const af::PagedDecodeShape& shape, const std::uint16_t* q,
                                const std::uint8_t* k_codes, const float* k_scales, const std::uint8_t* v_codes,
                                const float* v_scales, const std::int32_t* block_table, const std::int32_t* lengths,
                                std::uint16_t* out, float scale, void* workspace, std::size_t workspace_bytes,
                                cudaStream_t stream);

}  // namespace af::kernels
