#include "af/tiled_attention.hpp"

#include "af/attention.hpp"
#include "af/error.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace af {

namespace {

// Sizes the byte counts accept: at most 2^22 tokens, 2^12 heads, head dimension 2^16 and 8 bytes per value,
// so that H x Tq x Tk x 4 x value_bytes (the standard algorithm's score traffic) stays below 2^63.
constexpr std::int64_t max_tokens = std::int64_t{1} << 22;
constexpr std::int64_t max_heads = std::int64_t{1} << 12;
constexpr std::int64_t max_head_dim = std::int64_t{1} << 16;

void check_lengths(const char* who, std::int64_t query_len, std::int64_t past) {
  require(query_len >= 1, "{}: query length {} (expected at least 1 query)", who, query_len);
  require(past >= 0, "{}: past {} (expected the number of cached tokens before the queries, >= 0)", who, past);
  require(past + query_len <= max_tokens, "{}: past {} + {} queries = {} keys (expected at most {})", who, past,
          query_len, past + query_len, max_tokens);
}

void check_value_bytes(const char* who, std::int64_t value_bytes) {
  require(value_bytes >= 1 && value_bytes <= 8, "{}: value_bytes {} (expected 1 to 8 bytes per value)", who,
          value_bytes);
}

// Key tile j of B_c rows covers [j B_c, min((j + 1) B_c, Tk)). The query tile of rows [r0, r0 + rows) sits at
// positions [past + r0, past + r0 + rows): its last visible key is past + r0 + rows - 1.
std::int64_t last_key_tile(std::int64_t past, std::int64_t r0, std::int64_t rows, std::int64_t block_kv) {
  return (past + r0 + rows - 1) / block_kv;
}

}  // namespace

void TileSizes::validate() const {
  require(block_q >= 1, "TileSizes: block_q (B_r) {} (expected at least 1 query row per tile)", block_q);
  require(block_kv >= 1, "TileSizes: block_kv (B_c) {} (expected at least 1 key row per tile)", block_kv);
}

void HeadShape::validate() const {
  require(heads > 0 && kv_heads > 0 && head_dim > 0, "HeadShape: heads {}, kv_heads {}, head_dim {} (expected all > 0)",
          heads, kv_heads, head_dim);
  require(heads % kv_heads == 0, "HeadShape: {} query heads cannot share {} KV heads (expected H divisible by G)",
          heads, kv_heads);
}

TileCounts causal_tile_counts(std::int64_t query_len, std::int64_t past, const TileSizes& tiles) {
  check_lengths("causal_tile_counts", query_len, past);
  tiles.validate();
  // A tile longer than the sequence covers it whole: clamping changes no count.
  const std::int64_t key_len = past + query_len, br = std::min(tiles.block_q, query_len),
                     bc = std::min(tiles.block_kv, key_len);
  TileCounts c;
  c.query_tiles = (query_len + br - 1) / br;
  c.key_tiles = (key_len + bc - 1) / bc;
  for (std::int64_t r0 = 0; r0 < query_len; r0 += br) {
    const std::int64_t rows = std::min(br, query_len - r0), last = last_key_tile(past, r0, rows, bc);
    c.computed += last + 1;
    // A computed tile needs the mask when its last key lies after the tile's first query: every tile from
    // (past + r0 + 1) / B_c on does, up to the last one, whose end may be clipped at Tk.
    const std::int64_t first_masked = (past + r0 + 1) / bc;
    if (first_masked <= last) {
      c.masked += last - first_masked;
      c.masked += std::min((last + 1) * bc, key_len) - 1 > past + r0 ? 1 : 0;
    }
  }
  c.skipped = c.query_tiles * c.key_tiles - c.computed;
  return c;
}

Tensor tiled_attention(ConstMatrix q, ConstMatrix k, ConstMatrix v, const HeadShape& shape, std::int64_t past,
                       const TileSizes& tiles, TileCounts* counts, std::optional<double> scale) {
  shape.validate();
  tiles.validate();
  require(past >= 0, "tiled_attention: past {} (expected the number of cached tokens before the queries, >= 0)", past);
  const std::int64_t d = shape.head_dim, tq = q.rows, tk = k.rows;
  if (!(q.cols == shape.heads * d))
    fail("tiled_attention: q is {} (expected [Tq, {}]: {} heads x {})", q.shape_str(), shape.heads * d, shape.heads, d);
  require(tq >= 1, "tiled_attention: {} queries (expected at least 1)", tq);
  if (!(k.rows - past == tq && v.rows == tk && k.cols == shape.kv_heads * d && v.cols == shape.kv_heads * d))
    fail("tiled_attention: k is {} and v is {} (expected [past + Tq, G d] = [{} + {}, {}] each: {} KV heads x {})",
         k.shape_str(), v.shape_str(), past, tq, shape.kv_heads * d, shape.kv_heads, d);
  const auto s = static_cast<float>(scale.value_or(default_scale(d)));
  require(std::isfinite(s), "tiled_attention: scale {} (expected a finite number)", s);

  const std::int64_t br = std::min(tiles.block_q, tq), bc = std::min(tiles.block_kv, tk);
  Tensor out(Shape{tq, shape.heads * d});
  // The fast memory: one Q, K and V tile, the score tile, the accumulator and the running statistics.
  std::vector<float> q_tile(static_cast<std::size_t>(br * d)), k_tile(static_cast<std::size_t>(bc * d)),
      v_tile(static_cast<std::size_t>(bc * d)), scores(static_cast<std::size_t>(bc)),
      acc(static_cast<std::size_t>(br * d)), row_max(static_cast<std::size_t>(br)),
      row_sum(static_cast<std::size_t>(br));
  const auto load = [d](ConstMatrix from, std::int64_t first, std::int64_t count, std::int64_t col,
                        std::vector<float>& to) {
    for (std::int64_t r = 0; r < count; ++r) std::copy_n(&from(first + r, col), d, to.begin() + r * d);
  };
  TileCounts walked;
  for (std::int64_t h = 0; h < shape.heads; ++h) {
    const std::int64_t g = shape.kv_head_of(h);
    walked = TileCounts{(tq + br - 1) / br, (tk + bc - 1) / bc, 0, 0, 0};
    for (std::int64_t r0 = 0; r0 < tq; r0 += br) {
      const std::int64_t rows = std::min(br, tq - r0);
      load(q, r0, rows, h * d, q_tile);
      std::fill(acc.begin(), acc.end(), 0.0f);
      std::fill(row_max.begin(), row_max.end(), -std::numeric_limits<float>::infinity());
      std::fill(row_sum.begin(), row_sum.end(), 0.0f);
      // Key tiles past the last query's position are entirely above the diagonal: the loop never reaches them.
      for (std::int64_t c0 = 0; c0 <= past + r0 + rows - 1; c0 += bc) {
        const std::int64_t cols = std::min(bc, tk - c0);
        load(k, c0, cols, g * d, k_tile);
        load(v, c0, cols, g * d, v_tile);
        bool masked = false;
        for (std::int64_t r = 0; r < rows; ++r) {
          // Row r sees the keys up to its own position past + r0 + r.
          const std::int64_t visible = std::min(cols, past + r0 + r - c0 + 1);
          masked = masked || visible < cols;
          if (visible <= 0) continue;
          const float* qr = q_tile.data() + r * d;
          float top = row_max[r];
          for (std::int64_t c = 0; c < visible; ++c) {
            float dot = 0.0f;
            for (std::int64_t i = 0; i < d; ++i) dot += qr[i] * k_tile[c * d + i];
            scores[c] = dot * s;
            top = std::max(top, scores[c]);
          }
          // The online softmax: rescale what was summed under the old maximum, then add this tile's terms.
          const float rescale = std::exp(row_max[r] - top);
          float* ar = acc.data() + r * d;
          for (std::int64_t i = 0; i < d; ++i) ar[i] *= rescale;
          float sum = row_sum[r] * rescale;
          for (std::int64_t c = 0; c < visible; ++c) {
            const float p = std::exp(scores[c] - top);
            sum += p;
            for (std::int64_t i = 0; i < d; ++i) ar[i] += p * v_tile[c * d + i];
          }
          row_max[r] = top;
          row_sum[r] = sum;
        }
        ++walked.computed;
        walked.masked += masked ? 1 : 0;
      }
      for (std::int64_t r = 0; r < rows; ++r)
        for (std::int64_t i = 0; i < d; ++i) out.matrix()(r0 + r, h * d + i) = acc[r * d + i] / row_sum[r];
    }
    walked.skipped = walked.query_tiles * walked.key_tiles - walked.computed;
  }
  if (counts != nullptr) *counts = walked;
  return out;
}

Traffic standard_attention_traffic(std::int64_t query_len, std::int64_t past, const HeadShape& shape,
                                   std::int64_t value_bytes) {
  check_lengths("standard_attention_traffic", query_len, past);
  shape.validate();
  check_value_bytes("standard_attention_traffic", value_bytes);
  require(shape.heads <= max_heads && shape.head_dim <= max_head_dim,
          "standard_attention_traffic: {} heads of dimension {} (expected at most {} heads of at most {})", shape.heads,
          shape.head_dim, max_heads, max_head_dim);
  const std::int64_t h = shape.heads, d = shape.head_dim, tk = past + query_len, b = value_bytes;
  Traffic t;
  t.q_read = h * query_len * d * b;
  t.k_read = h * tk * d * b;
  t.v_read = h * tk * d * b;
  t.o_written = h * query_len * d * b;
  t.scores_written = 2 * h * query_len * tk * b;  // S, then P
  t.scores_read = 2 * h * query_len * tk * b;     // S for the softmax, P for P V
  return t;
}

Traffic tiled_attention_traffic(std::int64_t query_len, std::int64_t past, const HeadShape& shape,
                                const TileSizes& tiles, std::int64_t value_bytes) {
  check_lengths("tiled_attention_traffic", query_len, past);
  shape.validate();
  tiles.validate();
  check_value_bytes("tiled_attention_traffic", value_bytes);
  require(shape.heads <= max_heads && shape.head_dim <= max_head_dim,
          "tiled_attention_traffic: {} heads of dimension {} (expected at most {} heads of at most {})", shape.heads,
          shape.head_dim, max_heads, max_head_dim);
  const std::int64_t tk = past + query_len, br = std::min(tiles.block_q, query_len), bc = std::min(tiles.block_kv, tk);
  // Key rows one query head loads: query tile [r0, r0 + rows) loads every key tile up to its last visible
  // key's, which is the first min((last + 1) B_c, Tk) keys.
  std::int64_t key_rows = 0;
  for (std::int64_t r0 = 0; r0 < query_len; r0 += br) {
    const std::int64_t rows = std::min(br, query_len - r0);
    key_rows += std::min((last_key_tile(past, r0, rows, bc) + 1) * bc, tk);
  }
  const std::int64_t per_row = shape.heads * shape.head_dim * value_bytes;
  Traffic t;
  t.q_read = query_len * per_row;
  t.k_read = key_rows * per_row;
  t.v_read = key_rows * per_row;
  t.o_written = query_len * per_row;
  return t;
}

std::int64_t tile_working_set_bytes(const TileSizes& tiles, std::int64_t head_dim, std::int64_t value_bytes) {
  tiles.validate();
  check_value_bytes("tile_working_set_bytes", value_bytes);
  require(head_dim >= 1 && head_dim <= max_head_dim, "tile_working_set_bytes: head_dim {} (expected 1 to {})", head_dim,
          max_head_dim);
  require(tiles.block_q <= max_tokens && tiles.block_kv <= max_tokens,
          "tile_working_set_bytes: tiles {} x {} (expected at most {} rows each)", tiles.block_q, tiles.block_kv,
          max_tokens);
  const std::int64_t br = tiles.block_q, bc = tiles.block_kv, d = head_dim;
  return value_bytes * (br * d + 2 * bc * d) + 4 * (br * bc + br * d + 2 * br);
}

}  // namespace af
