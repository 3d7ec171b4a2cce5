#pragma once
/// @file tiled_attention.hpp
/// Tiled causal attention (FlashAttention's algorithm, Dao et al. 2022, on the CPU), the cleaned version of
/// chapter 23, and the two-level memory model that counts what it moves. The queries are cut into tiles of
/// B_r rows and the keys and values into tiles of B_c rows; each query tile walks the key/value tiles at or
/// below the causal diagonal with the online softmax (running maximum and sum, the accumulator rescaled when
/// the maximum grows), so the T x T score matrix never exists. Grouped heads (H query heads over G KV heads)
/// and the append case (new queries after `past` cached tokens) are both covered.

#include "af/tensor.hpp"

#include <cstdint>
#include <optional>

namespace af {

/// The tile sizes: B_r query rows and B_c key/value rows per tile.
struct TileSizes {
  std::int64_t block_q = 64;   ///< B_r, query rows per tile
  std::int64_t block_kv = 64;  ///< B_c, key and value rows per tile

  /// Throws af::Error naming the size when either is not positive.
  void validate() const;
};

/// The heads of one attention call: H query heads sharing G key/value heads of dimension d.
struct HeadShape {
  std::int64_t heads = 0;     ///< H
  std::int64_t kv_heads = 0;  ///< G; H % G == 0
  std::int64_t head_dim = 0;  ///< d

  /// Query heads per KV head, H / G.
  std::int64_t group_size() const { return heads / kv_heads; }
  /// The KV head that query head `q_head` reads.
  std::int64_t kv_head_of(std::int64_t q_head) const { return q_head / group_size(); }
  /// Throws af::Error naming the sizes when one is not positive or H is not a multiple of G.
  void validate() const;
};

/// The tile schedule of one query head: how many (query tile, key tile) pairs the causal walk computes, how
/// many of them cross the diagonal (and need the mask), and how many it skips because they lie entirely
/// above it. computed + skipped = query_tiles x key_tiles.
struct TileCounts {
  std::int64_t query_tiles = 0;  ///< ceil(Tq / B_r)
  std::int64_t key_tiles = 0;    ///< ceil((past + Tq) / B_c)
  std::int64_t computed = 0;     ///< pairs with at least one visible (query, key)
  std::int64_t masked = 0;       ///< computed pairs with at least one invisible (query, key)
  std::int64_t skipped = 0;      ///< pairs with no visible (query, key): never loaded, never computed
};

/// The causal tile schedule of `query_len` queries at positions [past, past + query_len) over a cache of
/// past + query_len keys. Throws af::Error for query_len < 1, past < 0 or bad tiles.
TileCounts causal_tile_counts(std::int64_t query_len, std::int64_t past, const TileSizes& tiles);

/// Causal grouped attention computed tile by tile. `q [Tq, H * d]` holds the new queries, at positions
/// [past, past + Tq); `k`, `v [past + Tq, G * d]` every key and value up to the last query's position (the
/// cache after the new tokens were appended). Query head h reads KV head h / (H / G). Returns `[Tq, H * d]`,
/// equal to af::grouped_attend's result up to float rounding. `scale` multiplies q . k (1 / sqrt(d) when
/// unset). When `counts` is given it receives the schedule one query head walked (every head walks the same).
/// Throws af::Error naming the value on past < 0, Tq < 1, tiles that are not positive, or shapes that
/// disagree with `shape` and with each other.
Tensor tiled_attention(ConstMatrix q, ConstMatrix k, ConstMatrix v, const HeadShape& shape, std::int64_t past,
                       const TileSizes& tiles, TileCounts* counts = nullptr, std::optional<double> scale = {});

/// Bytes moved between a large slow memory (a GPU's HBM) and a small fast one (its shared memory and
/// registers) by one attention call, all heads, split by what moved.
struct Traffic {
  std::int64_t q_read = 0;          ///< queries loaded
  std::int64_t k_read = 0;          ///< keys loaded
  std::int64_t v_read = 0;          ///< values loaded
  std::int64_t o_written = 0;       ///< outputs stored
  std::int64_t scores_written = 0;  ///< S = scale Q K^T and P = softmax(S) stored (standard algorithm only)
  std::int64_t scores_read = 0;     ///< S and P loaded back (standard algorithm only)

  std::int64_t total() const { return q_read + k_read + v_read + o_written + scores_written + scores_read; }
};

/// The standard algorithm's traffic (Dao et al.'s Algorithm 0), per query head: read Q and K, write the
/// Tq x Tk scores S; read S, write P = softmax(S); read P and V, write O. The whole Tq x Tk matrix is written
/// even where the causal mask zeroes it (an eager implementation masks a full matrix). Q, K, V, O, S and P
/// take `value_bytes` per value (2 for bf16). Each query head reads its KV head's K and V. Throws af::Error
/// on bad sizes.
Traffic standard_attention_traffic(std::int64_t query_len, std::int64_t past, const HeadShape& shape,
                                   std::int64_t value_bytes);

/// The tiled algorithm's traffic, per query head: each query tile loads its Q rows once and stores its O
/// rows once; it loads each K and V tile at or below the diagonal once; nothing of the score matrix leaves
/// the fast memory. Exactly what af::tiled_attention's walk moves. Throws af::Error on bad sizes.
Traffic tiled_attention_traffic(std::int64_t query_len, std::int64_t past, const HeadShape& shape,
                                const TileSizes& tiles, std::int64_t value_bytes);

/// The fast memory one query tile's walk needs: the Q, K and V tiles in `value_bytes` per value, and in
/// float32 the B_r x B_c score tile, the B_r x d output accumulator and the running maximum and sum of each
/// row: value_bytes (B_r d + 2 B_c d) + 4 (B_r B_c + B_r d + 2 B_r). Throws af::Error on bad sizes.
std::int64_t tile_working_set_bytes(const TileSizes& tiles, std::int64_t head_dim, std::int64_t value_bytes);

}  // namespace af
