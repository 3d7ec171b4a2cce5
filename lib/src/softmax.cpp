#include "af/softmax.hpp"

#include "af/error.hpp"

#include <cmath>
#include <limits>

namespace af {

Mask::Mask(std::int64_t queries, std::int64_t keys, bool allowed) : queries_(queries), keys_(keys), allowed_(0) {
  require(queries >= 0 && keys >= 0, "Mask: shape [{}, {}] (expected sizes >= 0)", queries, keys);
  allowed_.assign(static_cast<std::size_t>(queries * keys), allowed ? 1 : 0);
}

Mask Mask::causal(std::int64_t queries, std::int64_t keys, std::int64_t first_query_position) {
  require(first_query_position >= 0, "Mask::causal: first query position {} (expected >= 0)", first_query_position);
  Mask mask(queries, keys, false);
  for (std::int64_t i = 0; i < queries; ++i)
    for (std::int64_t j = 0; j < keys && j <= first_query_position + i; ++j) mask.set(i, j, true);
  return mask;
}

void Mask::set(std::int64_t query, std::int64_t key, bool allowed) {
  require(query >= 0 && query < queries_ && key >= 0 && key < keys_,
          "Mask::set: entry ({}, {}) is outside the [{}, {}] mask", query, key, queries_, keys_);
  allowed_[static_cast<std::size_t>(query * keys_ + key)] = allowed ? 1 : 0;
}

void softmax(std::span<float> row) {
  float row_max = -std::numeric_limits<float>::infinity();
  for (float x : row) row_max = std::max(row_max, x);
  if (row_max == -std::numeric_limits<float>::infinity()) {  // nothing to attend to
    for (float& x : row) x = 0.0f;
    return;
  }
  float sum = 0.0f;
  for (float& x : row) {
    x = std::exp(x - row_max);
    sum += x;
  }
  const float inverse = 1.0f / sum;
  for (float& x : row) x *= inverse;
}

void softmax_rows(Matrix scores, const Mask* mask) {
  if (mask != nullptr)
    if (!(mask->queries() == scores.rows && mask->keys() == scores.cols))
      fail("softmax_rows: mask is [{}, {}] for scores {} (expected equal shapes)", mask->queries(), mask->keys(),
           scores.shape_str());
  constexpr float masked = -std::numeric_limits<float>::infinity();
  for (std::int64_t i = 0; i < scores.rows; ++i) {
    std::span<float> row = scores.row(i);
    if (mask != nullptr)
      for (std::int64_t j = 0; j < scores.cols; ++j)
        if (!mask->allows(i, j)) row[static_cast<std::size_t>(j)] = masked;
    softmax(row);
  }
}

}  // namespace af
