#pragma once
/// @file paged_decode.hpp
/// Paged, ragged decode attention: the layout that the paged decode kernel reads (kernels/, issue 20), and
/// its float64 reference on the CPU. One new query token per sequence attends over that sequence's cached
/// tokens, which live in fixed-size pages of a pool shared by the whole batch (vLLM's PagedAttention, Kwon
/// et al., 2023; chapter 05 builds the same idea on floats in af::PagedKvCache).
///
/// Layouts (row-major; q, k, v and the output are bf16 bit patterns as af::bf16_bits makes them):
///   q            [batch, q_heads, head_dim]
///   k, v         [num_pages, kv_heads, page_size, head_dim]   one page holds page_size tokens of every KV head
///   block_table  [batch, max_pages_per_seq] int32             page ids; sequence b's token j lives in page
///                                                             block_table[b][j / page_size], slot j % page_size
///   lengths      [batch] int32                                cached tokens of each sequence, 1..capacity()
///   out          [batch, q_heads, head_dim]
/// Query head h reads KV head h / group, group = q_heads / kv_heads. Block-table entries past a sequence's
/// last page are never read (they may hold anything). A length must be at least 1: attention over no keys
/// has no value (the kernel writes NaN for it).

#include <cstdint>
#include <span>
#include <vector>

namespace af {

struct PagedDecodeShape {
  std::int64_t batch = 1;
  std::int64_t q_heads = 1;
  std::int64_t kv_heads = 1;
  std::int64_t head_dim = 128;
  std::int64_t page_size = 16;
  std::int64_t max_pages_per_seq = 1;  ///< the block table's row stride: the capacity of one sequence in pages
  std::int64_t num_pages = 1;          ///< pages in the pool

  std::int64_t group() const { return q_heads / kv_heads; }
  /// Tokens one sequence can hold: max_pages_per_seq * page_size.
  std::int64_t capacity() const { return max_pages_per_seq * page_size; }
  /// Values of one page of K (or V): kv_heads * page_size * head_dim.
  std::int64_t page_values() const { return kv_heads * page_size * head_dim; }
  /// Throws af::Error naming the first size that is not positive, a q_heads that is not a multiple of
  /// kv_heads, or a page_size that is not a power of two.
  void validate() const;
};

/// How the pools store keys and values: bf16, or FP8 E4M3 codes with one float32 scale per token and KV head
/// (chapter 05's fp8_token format: scale = amax of the token's head_dim values / 448, code = E4M3(value /
/// scale)). The FP8 scales are pools of their own, `[num_pages, kv_heads, page_size]` float32, one per row of
/// the code pool, so a token's codes and scale sit at the same page and slot.
enum class PagedKvFormat { bf16, fp8_e4m3 };

/// Bytes of K and V that one decode step reads: sum of lengths x kv_heads x (K and V) x head_dim x 2 bytes
/// (bf16), or x (head_dim x 1 byte + a 4-byte scale) (FP8).
double paged_decode_kv_bytes(const PagedDecodeShape& shape, std::span<const std::int32_t> lengths,
                             PagedKvFormat format = PagedKvFormat::bf16);

/// Paged decode attention in float64 from the bf16 values, `scale` multiplying q . k: out [batch, q_heads,
/// head_dim], the exact answer up to float64 rounding. Throws af::Error when a size disagrees with `shape`,
/// a length is outside 1..capacity(), or a page id the lengths reach is outside 0..num_pages - 1.
std::vector<double> paged_decode_f64(const PagedDecodeShape& shape, std::span<const std::uint16_t> q,
                                     std::span<const std::uint16_t> k, std::span<const std::uint16_t> v,
                                     std::span<const std::int32_t> block_table, std::span<const std::int32_t> lengths,
                                     double scale);

/// The same over FP8 pools: k_codes, v_codes `[num_pages, kv_heads, page_size, head_dim]` E4M3 bit patterns,
/// k_scales, v_scales `[num_pages, kv_heads, page_size]`; a cached value is e4m3_to_float(code) x scale,
/// exactly (float64). Throws af::Error as paged_decode_f64 does, and for a scale that is not finite and
/// positive or a code that is NaN (S.1111.111) where the lengths reach.
std::vector<double> paged_decode_fp8_f64(const PagedDecodeShape& shape, std::span<const std::uint16_t> q,
                                         std::span<const std::uint8_t> k_codes, std::span<const float> k_scales,
                                         std::span<const std::uint8_t> v_codes, std::span<const float> v_scales,
                                         std::span<const std::int32_t> block_table,
                                         std::span<const std::int32_t> lengths, double scale);

}  // namespace af
