#pragma once
// The launchers that the host API (the .cpp files, compiled by the C++ compiler) calls into the .cu files.
// Private to kernels/. The arguments are checked before they get here: the .cu files only launch. (nvcc
// 13.0 cannot compile fmt, so af::Error and its formatted messages live on the C++ side.)
#include <cuda_runtime.h>

#include <cstdint>

namespace af::kernels {
struct RowMask;
}

namespace af::kernels::detail {

void launch_dot(const float* a, const float* b, std::int64_t n, float* result, cudaStream_t stream);
void launch_matmul(const float* a, const float* b, float* c, int m, int k, int n, cudaStream_t stream);
void launch_transpose(const float* in, float* out, int rows, int cols, bool padded, cudaStream_t stream);
void launch_softmax_rows(float* scores, std::int64_t rows, std::int64_t cols, const RowMask& mask, cudaStream_t stream);

struct DecodeArgs {
  const std::uint16_t* q;  // [batch, q_heads, D]
  const std::uint16_t* k;  // [batch, kv_heads, seq_len, D]
  const std::uint16_t* v;  // [batch, kv_heads, seq_len, D]
  std::uint16_t* out;      // [batch, q_heads, D]
  float* partial_o;        // [batch, q_heads, splits, D]   (splits > 1)
  float* partial_lse;      // [batch, q_heads, splits]      log2-sum-exp2 of the scaled scores
  int batch, q_heads, kv_heads, head_dim;
  std::int64_t seq_len;
  int splits;
  std::int64_t keys_per_split;
  float scale_log2;  // scale * log2(e): the kernels use exp2
};

void launch_decode_v1(const DecodeArgs& args, cudaStream_t stream);
void launch_decode_gqa(const DecodeArgs& args, cudaStream_t stream);                  // v2 (splits 1) and v3
void launch_decode_mma(const DecodeArgs& args, bool pipelined, cudaStream_t stream);  // v4, v5
void launch_decode_combine(const DecodeArgs& args, cudaStream_t stream);

// Heads of one group handled by one block, and resident blocks per multiprocessor (for the split choice).
int gqa_heads_per_block(int group);
int gqa_blocks_per_sm(int head_dim, int group);
constexpr int mma_heads_per_block = 16;
int mma_blocks_per_sm(int head_dim, bool pipelined);

// The split count for `base` blocks per split, `slots` resident blocks and `seq_len` keys (decode.cpp).
int choose_splits(std::int64_t base, std::int64_t slots, std::int64_t seq_len);

// Paged decode (decode_paged.cu): `base.k` and `base.v` are the page pools [num_pages, kv_heads, page_size, D];
// base.seq_len and base.keys_per_split are unused (the lengths are read on the device). With FP8 pools, base.k
// and base.v are null and k8/v8 hold the E4M3 codes in the same layout, k_scale/v_scale one float per row
// [num_pages, kv_heads, page_size].
struct PagedDecodeArgs {
  DecodeArgs base;
  const std::uint8_t* k8 = nullptr;
  const std::uint8_t* v8 = nullptr;
  const float* k_scale = nullptr;
  const float* v_scale = nullptr;
  const std::int32_t* block_table;  // [batch, max_pages_per_seq]
  const std::int32_t* lengths;      // [batch], on the device
  int page_shift;                   // log2(page_size)
  int max_pages_per_seq;
  int pages_per_split;
};
void launch_decode_paged(const PagedDecodeArgs& args, bool fp8, cudaStream_t stream);
int paged_blocks_per_sm(int head_dim, int group, bool fp8);
// The same on the tensor cores (decode_paged_mma.cu): 16 query heads per block (mma_heads_per_block), page
// size 16, 32 or 64.
void launch_decode_paged_mma(const PagedDecodeArgs& args, bool fp8, cudaStream_t stream);
int paged_mma_blocks_per_sm(int head_dim, bool fp8);

// MLA decode (decode_mla.cu): the layouts of af/mla_decode.hpp with latent_dim 512 and rope_dim 64. Several
// splits leave partials [batch, q_heads, splits, 512] and log-sum-exps for launch_decode_combine (head_dim 512).
struct MlaDecodeArgs {
  const std::uint16_t* q;           // [batch, q_heads, 576]
  const std::uint16_t* cache;       // [num_pages, page_size, 576]
  const std::int32_t* block_table;  // [batch, max_pages_per_seq]
  const std::int32_t* lengths;      // [batch], on the device
  std::uint16_t* out;               // [batch, q_heads, 512]
  float* partial_o;                 // [batch, q_heads, splits, 512]   (splits > 1)
  float* partial_lse;               // [batch, q_heads, splits]        log2-sum-exp2 of the scaled scores
  int batch, q_heads, splits;
  int page_shift;  // log2(page_size)
  int max_pages_per_seq;
  int pages_per_split;
  float scale_log2;  // scale * log2(e): the kernel uses exp2
};
void launch_decode_mla(const MlaDecodeArgs& args, cudaStream_t stream);
int mla_blocks_per_sm();

// Causal varlen prefill and append (prefill_mma.cu): the layouts of af/varlen_attention.hpp.
struct PrefillArgs {
  const std::uint16_t* q;    // [total_q, q_heads, D]
  const std::uint16_t* k;    // [total_k, kv_heads, D]
  const std::uint16_t* v;    // [total_k, kv_heads, D]
  std::uint16_t* out;        // [total_q, q_heads, D]
  const std::int32_t* cu_q;  // [batch + 1], on the device
  const std::int32_t* cu_k;  // [batch + 1], on the device
  int batch, q_heads, kv_heads, head_dim;
  std::int64_t max_query_len;  // the grid covers this many query positions per sequence
  float scale_log2;
};
void launch_prefill_mma(const PrefillArgs& args, cudaStream_t stream);

}  // namespace af::kernels::detail
