// Paged, ragged decode attention on the CPU in float64: the reference of the paged decode kernel.
#include "af/paged_decode.hpp"

#include "af/error.hpp"
#include "af/numeric.hpp"
#include "af/quantized_cache.hpp"

#include <algorithm>
#include <cmath>
#include <limits>

namespace af {

void PagedDecodeShape::validate() const {
  require(batch >= 1, "paged decode: batch is {} (expected at least 1)", batch);
  require(kv_heads >= 1, "paged decode: kv_heads is {} (expected at least 1)", kv_heads);
  require(q_heads >= kv_heads && q_heads % kv_heads == 0,
          "paged decode: q_heads is {} (expected a multiple of kv_heads = {})", q_heads, kv_heads);
  require(head_dim >= 1, "paged decode: head_dim is {} (expected at least 1)", head_dim);
  require(page_size >= 1 && (page_size & (page_size - 1)) == 0,
          "paged decode: page_size is {} (expected a power of two)", page_size);
  require(max_pages_per_seq >= 1, "paged decode: max_pages_per_seq is {} (expected at least 1)", max_pages_per_seq);
  require(num_pages >= 1, "paged decode: num_pages is {} (expected at least 1)", num_pages);
}

double paged_decode_kv_bytes(const PagedDecodeShape& shape, std::span<const std::int32_t> lengths,
                             PagedKvFormat format) {
  double tokens = 0.0;
  for (const std::int32_t length : lengths) tokens += length;
  const double per_head_row = format == PagedKvFormat::bf16 ? 2.0 * static_cast<double>(shape.head_dim)
                                                            : static_cast<double>(shape.head_dim) + 4.0;
  return tokens * static_cast<double>(shape.kv_heads) * 2.0 * per_head_row;
}

namespace {
void require_sizes(const char* who, const PagedDecodeShape& s, std::size_t q, std::size_t k, std::size_t v,
                   std::size_t table, std::size_t lengths) {
  s.validate();
  const auto expected_q = static_cast<std::size_t>(s.batch * s.q_heads * s.head_dim);
  const auto expected_pool = static_cast<std::size_t>(s.num_pages * s.page_values());
  const auto expected_table = static_cast<std::size_t>(s.batch * s.max_pages_per_seq);
  require(q == expected_q, "{}: q holds {} values (expected batch x q_heads x head_dim = {})", who, q, expected_q);
  require(k == expected_pool && v == expected_pool,
          "{}: k holds {} values, v {} (expected num_pages x kv_heads x page_size x head_dim = {} each)", who, k, v,
          expected_pool);
  require(table == expected_table, "{}: block_table holds {} ids (expected batch x max_pages_per_seq = {})", who, table,
          expected_table);
  require(lengths == static_cast<std::size_t>(s.batch), "{}: lengths holds {} values (expected {})", who, lengths,
          s.batch);
}

// The float64 attention of both references: key(row, c) and value(row, c) give dimension c of pool row `row`
// ((page x kv_heads + g) x page_size + slot) as a double; `who` names the caller in errors.
template <class Key, class Value>
std::vector<double> paged_attention(const char* who, const PagedDecodeShape& s, std::span<const std::uint16_t> q,
                                    std::span<const std::int32_t> block_table, std::span<const std::int32_t> lengths,
                                    double scale, Key key, Value value) {
  const std::int64_t d = s.head_dim;
  std::vector<double> out(q.size(), 0.0);
  for (std::int64_t b = 0; b < s.batch; ++b) {
    const std::int64_t length = lengths[static_cast<std::size_t>(b)];
    require(length >= 1 && length <= s.capacity(), "{}: lengths[{}] is {} (expected 1..{})", who, b, length,
            s.capacity());
    const auto table = block_table.subspan(static_cast<std::size_t>(b * s.max_pages_per_seq),
                                           static_cast<std::size_t>(s.max_pages_per_seq));
    for (std::int64_t p = 0; p < (length + s.page_size - 1) / s.page_size; ++p) {
      const std::int32_t page = table[static_cast<std::size_t>(p)];
      require(page >= 0 && page < s.num_pages, "{}: block_table[{}][{}] is {} (expected 0..{})", who, b, p, page,
              s.num_pages - 1);
    }
    // Row of token j of KV head g in the pool (its values start at row x head_dim).
    const auto at = [&](std::int64_t g, std::int64_t j) {
      const std::int64_t page = table[static_cast<std::size_t>(j / s.page_size)];
      return static_cast<std::size_t>((page * s.kv_heads + g) * s.page_size + j % s.page_size);
    };
    std::vector<double> weights(static_cast<std::size_t>(length));
    for (std::int64_t h = 0; h < s.q_heads; ++h) {
      const std::int64_t g = h / s.group();
      const std::size_t query = static_cast<std::size_t>((b * s.q_heads + h) * d);
      // exp(score - max score): the largest weight is exactly 1 and nothing overflows.
      double max_score = -std::numeric_limits<double>::infinity();
      for (std::int64_t j = 0; j < length; ++j) {
        double dot = 0.0;
        for (std::int64_t c = 0; c < d; ++c)
          dot += static_cast<double>(bf16_to_float(q[query + static_cast<std::size_t>(c)])) * key(at(g, j), c);
        weights[static_cast<std::size_t>(j)] = dot * scale;
        max_score = std::max(max_score, dot * scale);
      }
      double sum = 0.0;
      for (double& w : weights) sum += (w = std::exp(w - max_score));
      double* o = out.data() + query;
      for (std::int64_t j = 0; j < length; ++j)
        for (std::int64_t c = 0; c < d; ++c) o[c] += weights[static_cast<std::size_t>(j)] * value(at(g, j), c);
      for (std::int64_t c = 0; c < d; ++c) o[c] /= sum;
    }
  }
  return out;
}
}  // namespace

std::vector<double> paged_decode_f64(const PagedDecodeShape& s, std::span<const std::uint16_t> q,
                                     std::span<const std::uint16_t> k, std::span<const std::uint16_t> v,
                                     std::span<const std::int32_t> block_table, std::span<const std::int32_t> lengths,
                                     double scale) {
  require_sizes("paged_decode_f64", s, q.size(), k.size(), v.size(), block_table.size(), lengths.size());
  const auto d = static_cast<std::size_t>(s.head_dim);
  return paged_attention(
      "paged_decode_f64", s, q, block_table, lengths, scale,
      [&](std::size_t row, std::int64_t c) -> double {
        return bf16_to_float(k[row * d + static_cast<std::size_t>(c)]);
      },
      [&](std::size_t row, std::int64_t c) -> double {
        return bf16_to_float(v[row * d + static_cast<std::size_t>(c)]);
      });
}

std::vector<double> paged_decode_fp8_f64(const PagedDecodeShape& s, std::span<const std::uint16_t> q,
                                         std::span<const std::uint8_t> k_codes, std::span<const float> k_scales,
                                         std::span<const std::uint8_t> v_codes, std::span<const float> v_scales,
                                         std::span<const std::int32_t> block_table,
                                         std::span<const std::int32_t> lengths, double scale) {
  const char* who = "paged_decode_fp8_f64";
  require_sizes(who, s, q.size(), k_codes.size(), v_codes.size(), block_table.size(), lengths.size());
  const auto rows = static_cast<std::size_t>(s.num_pages * s.kv_heads * s.page_size);
  require(k_scales.size() == rows && v_scales.size() == rows,
          "{}: k_scales holds {} values, v_scales {} (expected num_pages x kv_heads x page_size = {} each)", who,
          k_scales.size(), v_scales.size(), rows);
  const auto d = static_cast<std::size_t>(s.head_dim);
  // A stored value, checked: a NaN code or a scale that is not finite and positive is no value the cache can
  // hold (its writer saturates at 448 and takes amax / 448, or 1 for an all-zero row).
  const auto read = [&](std::span<const std::uint8_t> codes, std::span<const float> scales, const char* which,
                        std::size_t row, std::int64_t c) -> double {
    const float row_scale = scales[row];
    require(std::isfinite(row_scale) && row_scale > 0.0f, "{}: {} scale of pool row {} is {} (expected > 0, finite)",
            who, which, row, row_scale);
    const std::uint8_t code = codes[row * d + static_cast<std::size_t>(c)];
    require((code & 0x7Fu) != 0x7Fu, "{}: {} code at pool row {}, dimension {} is NaN (0x{:02x})", who, which, row, c,
            code);
    return static_cast<double>(e4m3_to_float(code)) * row_scale;
  };
  return paged_attention(
      who, s, q, block_table, lengths, scale,
      [&](std::size_t row, std::int64_t c) { return read(k_codes, k_scales, "key", row, c); },
      [&](std::size_t row, std::int64_t c) { return read(v_codes, v_scales, "value", row, c); });
}

}  // namespace af
