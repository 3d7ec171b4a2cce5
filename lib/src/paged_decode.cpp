// Paged, ragged decode attention on the CPU in float64: the reference of the paged decode kernel.
#include "af/paged_decode.hpp"

#include "af/error.hpp"
#include "af/numeric.hpp"

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

double paged_decode_kv_bytes(const PagedDecodeShape& shape, std::span<const std::int32_t> lengths) {
  double tokens = 0.0;
  for (const std::int32_t length : lengths) tokens += length;
  return tokens * static_cast<double>(shape.kv_heads * shape.head_dim) * 2.0 * 2.0;
}

namespace {
void require_sizes(const PagedDecodeShape& s, std::size_t q, std::size_t k, std::size_t v, std::size_t table,
                   std::size_t lengths) {
  s.validate();
  const auto expected_q = static_cast<std::size_t>(s.batch * s.q_heads * s.head_dim);
  const auto expected_pool = static_cast<std::size_t>(s.num_pages * s.page_values());
  const auto expected_table = static_cast<std::size_t>(s.batch * s.max_pages_per_seq);
  require(q == expected_q, "paged_decode_f64: q holds {} values (expected batch x q_heads x head_dim = {})", q,
          expected_q);
  require(k == expected_pool && v == expected_pool,
          "paged_decode_f64: k holds {} values, v {} (expected num_pages x kv_heads x page_size x head_dim = {} each)",
          k, v, expected_pool);
  require(table == expected_table,
          "paged_decode_f64: block_table holds {} ids (expected batch x max_pages_per_seq = {})", table,
          expected_table);
  require(lengths == static_cast<std::size_t>(s.batch), "paged_decode_f64: lengths holds {} values (expected {})",
          lengths, s.batch);
}
}  // namespace

std::vector<double> paged_decode_f64(const PagedDecodeShape& s, std::span<const std::uint16_t> q,
                                     std::span<const std::uint16_t> k, std::span<const std::uint16_t> v,
                                     std::span<const std::int32_t> block_table, std::span<const std::int32_t> lengths,
                                     double scale) {
  require_sizes(s, q.size(), k.size(), v.size(), block_table.size(), lengths.size());
  const std::int64_t d = s.head_dim;
  std::vector<double> out(q.size(), 0.0);
  for (std::int64_t b = 0; b < s.batch; ++b) {
    const std::int64_t length = lengths[static_cast<std::size_t>(b)];
    require(length >= 1 && length <= s.capacity(), "paged_decode_f64: lengths[{}] is {} (expected 1..{})", b, length,
            s.capacity());
    const auto table = block_table.subspan(static_cast<std::size_t>(b * s.max_pages_per_seq),
                                           static_cast<std::size_t>(s.max_pages_per_seq));
    for (std::int64_t p = 0; p < (length + s.page_size - 1) / s.page_size; ++p) {
      const std::int32_t page = table[static_cast<std::size_t>(p)];
      require(page >= 0 && page < s.num_pages, "paged_decode_f64: block_table[{}][{}] is {} (expected 0..{})", b, p,
              page, s.num_pages - 1);
    }
    // Element offset of token j of KV head g in the pool.
    const auto at = [&](std::int64_t g, std::int64_t j) {
      const std::int64_t page = table[static_cast<std::size_t>(j / s.page_size)];
      return static_cast<std::size_t>(((page * s.kv_heads + g) * s.page_size + j % s.page_size) * d);
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
          dot += static_cast<double>(bf16_to_float(q[query + static_cast<std::size_t>(c)])) *
                 bf16_to_float(k[at(g, j) + static_cast<std::size_t>(c)]);
        weights[static_cast<std::size_t>(j)] = dot * scale;
        max_score = std::max(max_score, dot * scale);
      }
      double sum = 0.0;
      for (double& w : weights) sum += (w = std::exp(w - max_score));
      double* o = out.data() + query;
      for (std::int64_t j = 0; j < length; ++j)
        for (std::int64_t c = 0; c < d; ++c)
          o[c] += weights[static_cast<std::size_t>(j)] * bf16_to_float(v[at(g, j) + static_cast<std::size_t>(c)]);
      for (std::int64_t c = 0; c < d; ++c) o[c] /= sum;
    }
  }
  return out;
}

}  // namespace af
