#pragma once
/// @file block_sparse.hpp
/// Block-sparse attention (chapter 10): a causal mask built from block patterns of the literature — local
/// (sliding) blocks, global blocks, strided blocks — stored as production kernels consume it: per query block,
/// the count and the indices of the key blocks to visit (FlexAttention's `kv_num_blocks` / `kv_indices`), and
/// which visited blocks are full (every element allowed) or partial (the element mask must be consulted).

#include "af/accounting.hpp"
#include "af/softmax.hpp"
#include "af/tensor.hpp"

#include <cstdint>
#include <vector>

namespace af {

/// A causal block pattern. Positions are absolute: token p lies in block p / block. Key block kb is visited by
/// query block qb (kb <= qb) when it is local (qb - kb < local_blocks), global (kb < global_blocks), or strided
/// (stride > 0 and (qb - kb) is a multiple of stride). Inside a visited block the causal edge key <= query holds.
struct BlockPattern {
  std::int64_t block = 16;         ///< tokens per block
  std::int64_t local_blocks = 1;   ///< the diagonal block and local_blocks - 1 before it (>= 1)
  std::int64_t global_blocks = 0;  ///< the first blocks, visible to every query (>= 0)
  std::int64_t stride = 0;         ///< every stride-th block back from the diagonal; 0 = none

  /// Throws af::Error naming the field when block < 1, local_blocks < 1, global_blocks < 0 or stride < 0.
  void validate() const;
  /// Whether query block qb visits key block kb.
  bool visits(std::int64_t query_block, std::int64_t key_block) const;
  /// The element mask: key position k is visible to query position q.
  bool allows(std::int64_t query, std::int64_t key) const { return key <= query && visits(query / block, key / block); }
};

/// The block tables of `queries` queries that are the last positions of `keys` keys (a prefill over an
/// empty cache: queries == keys; a decode step: queries == 1). Row r is query block first_query_block + r.
struct BlockMask {
  std::int64_t queries = 0, keys = 0, block = 0;
  std::int64_t first_query_block = 0;
  std::vector<std::int64_t> kv_num_blocks;  ///< [rows]: key blocks visited by each query block
  std::vector<std::int64_t> kv_indices;     ///< [rows, key_blocks]: their indices, ascending, then padded with 0
  std::vector<unsigned char> full;          ///< [rows, key_blocks]: 1 when the visited block needs no element mask

  std::int64_t rows() const { return static_cast<std::int64_t>(kv_num_blocks.size()); }
  std::int64_t key_blocks() const { return (keys + block - 1) / block; }
  std::int64_t index(std::int64_t row, std::int64_t n) const {
    return kv_indices[static_cast<std::size_t>(row * key_blocks() + n)];
  }
  bool is_full(std::int64_t row, std::int64_t n) const {
    return full[static_cast<std::size_t>(row * key_blocks() + n)] != 0;
  }
  /// Visited blocks over all rows divided by the causal blocks (kb <= qb) over all rows.
  double density() const;
};

/// The block tables of `pattern` for `queries` queries that are the last positions of `keys` keys.
/// Throws af::Error when queries < 1, keys < queries, or the pattern is invalid.
BlockMask block_mask(const BlockPattern& pattern, std::int64_t queries, std::int64_t keys);

/// The block tables of an arbitrary element mask (queries the last positions of the keys): a block is visited
/// when any of its elements is allowed, full when all of its elements inside the matrix are.
/// Throws af::Error when block < 1 or the mask has more queries than keys.
BlockMask block_mask_from(const Mask& mask, std::int64_t block);

/// The element mask of `pattern` for `queries` queries that are the last positions of `keys` keys.
Mask element_mask(const BlockPattern& pattern, std::int64_t queries, std::int64_t keys);

/// What a blocked attention did: visited blocks, and the query-key pairs it scored (2 d FLOPs each for
/// q . k and 2 dv for the weighted sum of values).
struct BlockedWork {
  std::int64_t blocks_visited = 0;
  std::int64_t pairs_scored = 0;
};

/// Single-head attention of q `[Tq, d]` over k `[Tk, d]`, v `[Tk, dv]` (queries the last Tq positions), visiting
/// only the key blocks of `mask` with an online softmax (running maximum and sum, rescaled per block); the
/// element rule of `pattern` is checked only inside partial blocks. Scale 1 / sqrt(d). Returns `[Tq, dv]`.
/// Throws af::Error when the shapes disagree with each other or with the mask.
Tensor block_sparse_attention(ConstMatrix q, ConstMatrix k, ConstMatrix v, const BlockPattern& pattern,
                              const BlockMask& mask, BlockedWork* work = nullptr);

/// Cached tokens that a decode query at position t - 1 (t tokens in context) reads: the tokens of the key
/// blocks it visits, the last block cut at t.
std::int64_t block_sparse_decode_entries(const BlockPattern& pattern, std::int64_t t);

/// `card` under a block pattern: every token is still stored (a later query block may visit any block), but a
/// decode query reads only the tokens of the blocks it visits.
CacheCard with_block_sparse(CacheCard card, const BlockPattern& pattern);

}  // namespace af
