#pragma once
/// @file mla_decode.hpp
/// Multi-head latent attention (MLA) decode over a paged latent cache, in the absorbed form: the layout the MLA
/// decode kernel reads (kernels/), and its float64 reference on the CPU.
///
/// DeepSeek-V2 (arXiv:2405.04434, section 2.1) caches per token one compressed latent c (kv_lora_rank = 512) and
/// one RoPE key k_pe (qk_rope_head_dim = 64) shared by every head. With W_UK absorbed into the query and W_UV
/// into the output (chapter 07, af/mla.hpp's MlaPath::absorbed), query head h is the 576 values
/// [W_UK_h^T q_nope_h ; q_pe_h], its score for token j is scale * q_h . [c_j ; k_pe_j] (all 576), and its output
/// is sum_j softmax_j * c_j, the latent part only (512 values; W_UV_h is applied afterwards). It is attention
/// with one KV head shared by all query heads, keys 576 wide, and values the first 512 values of each key,
/// as FlashMLA (github.com/deepseek-ai/FlashMLA) computes it.
///
/// Layouts (row-major; the cache, q and the output are bf16 bit patterns as af::bf16_bits makes them):
///   cache        [num_pages, page_size, latent_dim + rope_dim]   row j of a page: [c_j ; k_pe_j]
///   block_table  [batch, max_pages_per_seq] int32                page ids; sequence b's token j lives in page
///                                                                block_table[b][j / page_size], slot j % page_size
///   lengths      [batch] int32                                   cached tokens of each sequence, 1..capacity()
///   q            [batch, q_heads, latent_dim + rope_dim]         the absorbed queries
///   out          [batch, q_heads, latent_dim]
/// Block-table entries past a sequence's last page are never read (they may hold anything).

#include <cstdint>
#include <span>
#include <vector>

namespace af {

struct MlaDecodeShape {
  std::int64_t batch = 1;
  std::int64_t q_heads = 128;          ///< DeepSeek-V3: 128 (fewer per GPU under tensor parallelism)
  std::int64_t latent_dim = 512;       ///< kv_lora_rank: the value width
  std::int64_t rope_dim = 64;          ///< qk_rope_head_dim
  std::int64_t page_size = 64;         ///< tokens per page, a power of two (FlashMLA's pages hold 64)
  std::int64_t max_pages_per_seq = 1;  ///< the block table's row stride: the capacity of one sequence in pages
  std::int64_t num_pages = 1;          ///< pages in the pool

  /// The width of one cached row and of one absorbed query: latent_dim + rope_dim (576 for DeepSeek-V2/V3).
  std::int64_t key_dim() const { return latent_dim + rope_dim; }
  /// Tokens one sequence can hold: max_pages_per_seq * page_size.
  std::int64_t capacity() const { return max_pages_per_seq * page_size; }
  /// Values of one page: page_size * key_dim().
  std::int64_t page_values() const { return page_size * key_dim(); }
  /// Throws af::Error naming the first size that is not positive (rope_dim may be 0) or a page_size that is
  /// not a power of two.
  void validate() const;
};

/// Bytes one decode step must read at least once: the cached rows of every sequence (sum of lengths x
/// key_dim x 2 bytes; read once, however many heads share them), the queries and the block-table entries
/// used, plus the output written. The rows dominate: 1152 bytes a token for DeepSeek-V3.
double mla_decode_bytes(const MlaDecodeShape& shape, std::span<const std::int32_t> lengths);

/// Floating-point operations of one decode step: 2 x q_heads x (key_dim + latent_dim) per cached token (the
/// multiply-adds of q . k and of the weighted sum of latents), summed over the sequences.
double mla_decode_flops(const MlaDecodeShape& shape, std::span<const std::int32_t> lengths);

/// MLA decode in float64 from the bf16 values, `scale` multiplying q . k: out [batch, q_heads, latent_dim],
/// the exact answer up to float64 rounding. Throws af::Error when a size disagrees with `shape`, a length is
/// outside 1..capacity(), or a page id the lengths reach is outside 0..num_pages - 1.
std::vector<double> mla_decode_f64(const MlaDecodeShape& shape, std::span<const std::uint16_t> q,
                                   std::span<const std::uint16_t> cache, std::span<const std::int32_t> block_table,
                                   std::span<const std::int32_t> lengths, double scale);

}  // namespace af
