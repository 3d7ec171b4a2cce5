// MLA decode over a paged latent cache on the CPU in float64: the reference of the MLA decode kernel.
#include "af/mla_decode.hpp"

#include "af/error.hpp"
#include "af/numeric.hpp"

#include <algorithm>
#include <cmath>
#include <limits>

namespace af {

void MlaDecodeShape::validate() const {
  require(batch >= 1, "mla decode: batch is {} (expected at least 1)", batch);
  require(q_heads >= 1, "mla decode: q_heads is {} (expected at least 1)", q_heads);
  require(latent_dim >= 1, "mla decode: latent_dim is {} (expected at least 1)", latent_dim);
  require(rope_dim >= 0, "mla decode: rope_dim is {} (expected at least 0)", rope_dim);
  require(page_size >= 1 && (page_size & (page_size - 1)) == 0, "mla decode: page_size is {} (expected a power of two)",
          page_size);
  require(max_pages_per_seq >= 1, "mla decode: max_pages_per_seq is {} (expected at least 1)", max_pages_per_seq);
  require(num_pages >= 1, "mla decode: num_pages is {} (expected at least 1)", num_pages);
}

double mla_decode_bytes(const MlaDecodeShape& s, std::span<const std::int32_t> lengths) {
  double tokens = 0.0, pages = 0.0;
  for (const std::int32_t length : lengths) {
    tokens += length;
    pages += static_cast<double>((length + s.page_size - 1) / s.page_size);
  }
  const double rows = tokens * static_cast<double>(s.key_dim()) * 2.0;
  const double queries = static_cast<double>(s.batch * s.q_heads * s.key_dim()) * 2.0;
  const double outputs = static_cast<double>(s.batch * s.q_heads * s.latent_dim) * 2.0;
  return rows + queries + outputs + pages * 4.0 + static_cast<double>(lengths.size()) * 4.0;
}

double mla_decode_flops(const MlaDecodeShape& s, std::span<const std::int32_t> lengths) {
  double tokens = 0.0;
  for (const std::int32_t length : lengths) tokens += length;
  return tokens * 2.0 * static_cast<double>(s.q_heads * (s.key_dim() + s.latent_dim));
}

namespace {
void require_sizes(const MlaDecodeShape& s, std::size_t q, std::size_t cache, std::size_t table, std::size_t lengths) {
  s.validate();
  const auto expected_q = static_cast<std::size_t>(s.batch * s.q_heads * s.key_dim());
  const auto expected_pool = static_cast<std::size_t>(s.num_pages * s.page_values());
  const auto expected_table = static_cast<std::size_t>(s.batch * s.max_pages_per_seq);
  require(q == expected_q,
          "mla_decode_f64: q holds {} values (expected batch x q_heads x (latent_dim + rope_dim) = {})", q, expected_q);
  require(cache == expected_pool,
          "mla_decode_f64: cache holds {} values (expected num_pages x page_size x (latent_dim + rope_dim) = {})",
          cache, expected_pool);
  require(table == expected_table, "mla_decode_f64: block_table holds {} ids (expected batch x max_pages_per_seq = {})",
          table, expected_table);
  require(lengths == static_cast<std::size_t>(s.batch), "mla_decode_f64: lengths holds {} values (expected {})",
          lengths, s.batch);
}
}  // namespace

std::vector<double> mla_decode_f64(const MlaDecodeShape& s, std::span<const std::uint16_t> q,
                                   std::span<const std::uint16_t> cache, std::span<const std::int32_t> block_table,
                                   std::span<const std::int32_t> lengths, double scale) {
  require_sizes(s, q.size(), cache.size(), block_table.size(), lengths.size());
  const std::int64_t width = s.key_dim(), latent = s.latent_dim;
  std::vector<double> out(static_cast<std::size_t>(s.batch * s.q_heads * latent), 0.0);
  for (std::int64_t b = 0; b < s.batch; ++b) {
    const std::int64_t length = lengths[static_cast<std::size_t>(b)];
    require(length >= 1 && length <= s.capacity(), "mla_decode_f64: lengths[{}] is {} (expected 1..{})", b, length,
            s.capacity());
    const auto table = block_table.subspan(static_cast<std::size_t>(b * s.max_pages_per_seq),
                                           static_cast<std::size_t>(s.max_pages_per_seq));
    for (std::int64_t p = 0; p < (length + s.page_size - 1) / s.page_size; ++p) {
      const std::int32_t page = table[static_cast<std::size_t>(p)];
      require(page >= 0 && page < s.num_pages, "mla_decode_f64: block_table[{}][{}] is {} (expected 0..{})", b, p, page,
              s.num_pages - 1);
    }
    // The cached row [c_j ; k_pe_j] of token j, converted once per sequence: every head reads it.
    std::vector<double> rows(static_cast<std::size_t>(length * width));
    for (std::int64_t j = 0; j < length; ++j) {
      const std::int64_t page = table[static_cast<std::size_t>(j / s.page_size)];
      const auto at = static_cast<std::size_t>((page * s.page_size + j % s.page_size) * width);
      for (std::int64_t c = 0; c < width; ++c)
        rows[static_cast<std::size_t>(j * width + c)] = bf16_to_float(cache[at + static_cast<std::size_t>(c)]);
    }
    std::vector<double> weights(static_cast<std::size_t>(length));
    for (std::int64_t h = 0; h < s.q_heads; ++h) {
      const auto query = static_cast<std::size_t>((b * s.q_heads + h) * width);
      // exp(score - max score): the largest weight is exactly 1 and nothing overflows.
      double max_score = -std::numeric_limits<double>::infinity();
      for (std::int64_t j = 0; j < length; ++j) {
        double dot = 0.0;
        for (std::int64_t c = 0; c < width; ++c)
          dot += static_cast<double>(bf16_to_float(q[query + static_cast<std::size_t>(c)])) *
                 rows[static_cast<std::size_t>(j * width + c)];
        weights[static_cast<std::size_t>(j)] = dot * scale;
        max_score = std::max(max_score, dot * scale);
      }
      double sum = 0.0;
      for (double& w : weights) sum += (w = std::exp(w - max_score));
      double* o = out.data() + (b * s.q_heads + h) * latent;
      for (std::int64_t j = 0; j < length; ++j)
        for (std::int64_t c = 0; c < latent; ++c)
          o[c] += weights[static_cast<std::size_t>(j)] * rows[static_cast<std::size_t>(j * width + c)];
      for (std::int64_t c = 0; c < latent; ++c) o[c] /= sum;
    }
  }
  return out;
}

}  // namespace af
