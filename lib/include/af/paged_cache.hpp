#pragma once
/// @file paged_cache.hpp
/// A paged KV cache for many sequences (chapter 05): keys and values live in fixed-size pages of a shared
/// pool, each sequence keeps a block table (its pages in order), free pages wait in a free list, and a
/// sequence may share the pages of a common prefix with another (copy on write for a shared partial page).
/// The idea is vLLM's PagedAttention (Kwon et al., 2023).

#include "af/attention.hpp"
#include "af/grouped_attention.hpp"
#include "af/tensor.hpp"

#include <cstdint>
#include <span>
#include <vector>

namespace af {

/// The KV cache of many sequences of one grouped layer, in pages of `page_size` tokens.
class PagedKvCache {
 public:
  /// A pool of `pages` pages, each holding keys and values `[page_size, G, d]`; everything is allocated here.
  PagedKvCache(std::int64_t pages, std::int64_t page_size, std::int64_t kv_heads, std::int64_t head_dim);

  /// A new, empty sequence; returns its id.
  std::int64_t add_sequence();
  /// A new sequence that starts with all of `parent`'s tokens, sharing its pages (no copy). A later append to
  /// either copies the shared partial last page first.
  std::int64_t fork(std::int64_t parent);
  /// Appends the keys and values `[n, G * d]` of n tokens to sequence `seq`, taking pages from the free list as
  /// needed. Throws af::Error on a shape mismatch, an unknown sequence or when the pool runs out of pages.
  void append(std::int64_t seq, ConstMatrix keys, ConstMatrix values);
  /// Returns the sequence's pages to the free list (a shared page only when its last user leaves).
  void release(std::int64_t seq);

  std::int64_t length(std::int64_t seq) const;
  /// The sequence's pages, in token order: token j lives in page `block_table(seq)[j / page_size]`, slot
  /// `j % page_size`.
  std::span<const std::int64_t> block_table(std::int64_t seq) const;
  /// Key and value of KV head `g` of the sequence's token `j`, `[d]` each, read through the block table.
  std::span<const float> key(std::int64_t seq, std::int64_t j, std::int64_t g) const;
  std::span<const float> value(std::int64_t seq, std::int64_t j, std::int64_t g) const;

  std::int64_t page_size() const { return page_size_; }
  std::int64_t kv_heads() const { return kv_heads_; }
  std::int64_t head_dim() const { return head_dim_; }
  std::int64_t pages() const { return static_cast<std::int64_t>(ref_count_.size()); }
  std::int64_t free_pages() const { return static_cast<std::int64_t>(free_list_.size()); }
  /// Pages in use by at least one sequence.
  std::int64_t used_pages() const { return pages() - free_pages(); }
  /// Token slots the sequence's last page holds but does not use (0 when the last page is full).
  std::int64_t wasted_slots(std::int64_t seq) const;
  /// How many sequences use `page`.
  std::int64_t users(std::int64_t page) const;

 private:
  struct Sequence {
    std::vector<std::int64_t> pages;
    std::int64_t length = 0;
    bool live = false;
  };
  const Sequence& sequence(std::int64_t seq) const;
  std::int64_t take_page();
  std::int64_t slot_offset(std::int64_t page, std::int64_t slot) const {
    return (page * page_size_ + slot) * kv_heads_ * head_dim_;
  }

  std::int64_t page_size_, kv_heads_, head_dim_;
  Tensor keys_, values_;                 // [pages, page_size, G, d]
  std::vector<std::int64_t> ref_count_;  // sequences using each page
  std::vector<std::int64_t> free_list_;  // pages nobody uses, taken from the back
  std::vector<Sequence> sequences_;
};

/// Grouped attention of sequence `seq`'s queries `q [Tq, H * d]` (its last Tq tokens) over its paged cache,
/// reading every key and value through the block table. Computes exactly what af::grouped_attend computes
/// over a contiguous cache holding the same tokens (same operations in the same order).
Tensor paged_attend(ConstMatrix q, const GroupedShape& shape, const PagedKvCache& cache, std::int64_t seq,
                    const AttentionOptions& options);

/// One step of continuous batching: several sequences, each at its own position, advance together. Rows
/// `[offset_i, offset_i + tokens[i])` of q `[N, H * d]`, keys and values `[N, G * d]` belong to sequence
/// `seqs[i]` (one row for a decoding sequence, a whole prompt for one that joins); each sequence's rows are
/// appended to its cache and attend over it. Returns `[N, H * d]`, each row what the sequence alone would get.
/// Throws af::Error when the token counts do not add up to N or the sizes disagree.
Tensor ragged_batch_step(ConstMatrix q, ConstMatrix keys, ConstMatrix values, const GroupedShape& shape,
                         PagedKvCache& cache, std::span<const std::int64_t> seqs, std::span<const std::int64_t> tokens,
                         const AttentionOptions& options);

}  // namespace af
