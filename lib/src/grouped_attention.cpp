#include "af/grouped_attention.hpp"

#include "af/error.hpp"
#include "af/linalg.hpp"
#include "af/softmax.hpp"

#include <algorithm>
#include <array>
#include <limits>
#include <vector>

namespace af {

void GroupedShape::validate() const {
  require(hidden > 0 && heads > 0 && kv_heads > 0 && head_dim > 0,
          "GroupedShape: hidden {}, heads {}, kv_heads {}, head_dim {} (expected all > 0)", hidden, heads, kv_heads,
          head_dim);
  require(heads % kv_heads == 0, "GroupedShape: {} query heads cannot share {} KV heads (expected H divisible by G)",
          heads, kv_heads);
}

GroupedKvCache::GroupedKvCache(std::int64_t capacity, std::int64_t kv_heads, std::int64_t head_dim) {
  require(capacity > 0 && kv_heads > 0 && head_dim > 0,
          "GroupedKvCache: capacity {}, kv_heads {}, head_dim {} (expected all > 0)", capacity, kv_heads, head_dim);
  keys_ = Tensor(Shape{capacity, kv_heads, head_dim});
  values_ = Tensor(Shape{capacity, kv_heads, head_dim});
}

void GroupedKvCache::append(ConstMatrix keys, ConstMatrix values) {
  const std::int64_t width = kv_heads() * head_dim();
  if (!(keys.cols == width && values.cols == width && keys.rows == values.rows))
    fail("GroupedKvCache::append: keys {} and values {} (expected [n, {}] each: {} KV heads x {})", keys.shape_str(),
         values.shape_str(), width, kv_heads(), head_dim());
  require(size_ + keys.rows <= capacity(), "GroupedKvCache::append: {} cached + {} new tokens exceed the capacity {}",
          size_, keys.rows, capacity());
  for (std::int64_t r = 0; r < keys.rows; ++r) {
    std::ranges::copy(keys.row(r), keys_.data() + (size_ + r) * width);
    std::ranges::copy(values.row(r), values_.data() + (size_ + r) * width);
  }
  size_ += keys.rows;
}

ConstMatrix GroupedKvCache::keys(std::int64_t kv_head) const { return head_view(keys_, kv_head).rows_slice(0, size_); }

ConstMatrix GroupedKvCache::values(std::int64_t kv_head) const {
  return head_view(values_, kv_head).rows_slice(0, size_);
}

void GroupedWeights::validate(const GroupedShape& shape) const {
  shape.validate();
  const std::int64_t h = shape.hidden, qd = shape.heads * shape.head_dim, kvd = shape.kv_heads * shape.head_dim;
  const auto check = [](const char* name, const Tensor& t, const Shape& expected, bool optional) {
    if (!((optional && t.empty()) || t.shape() == expected))
      fail("GroupedWeights: {} is {} (expected {}{})", name, t.shape().str(), expected.str(),
           optional ? " or none" : "");
  };
  check("q_proj", q_proj, Shape{qd, h}, false);
  check("k_proj", k_proj, Shape{kvd, h}, false);
  check("v_proj", v_proj, Shape{kvd, h}, false);
  check("o_proj", o_proj, Shape{h, qd}, false);
  check("q_bias", q_bias, Shape{qd}, true);
  check("k_bias", k_bias, Shape{kvd}, true);
  check("v_bias", v_bias, Shape{kvd}, true);
  check("o_bias", o_bias, Shape{h}, true);
}

namespace {

// The rows [first, last) of one piece of a group, all against the same KV head: `queries` holds the stacked
// query rows (d values each), `keys`/`values` the KV head's cached rows; row r sees the keys up to
// last_key(r). Built for AVX2 and for any x86-64 (target_clones): the same operations in the same order.
struct Piece {
  const float* queries;
  ConstMatrix keys, values;
  std::int64_t d, first, last, key_count, query_count;
  bool causal;
  std::int64_t last_key(std::int64_t r) const {
    return causal ? key_count - query_count + r % query_count : key_count - 1;
  }
};

__attribute__((target_clones("avx2", "default"))) void score_piece(const Piece& p, float scale, float* weights) {
  const auto d = static_cast<std::size_t>(p.d);
  for (std::int64_t k = 0; k < p.key_count; ++k) {
    const float* key = p.keys.data + k * p.keys.row_stride;
    for (std::int64_t r = p.first; r < p.last; ++r)
      if (k <= p.last_key(r)) weights[r * p.key_count + k] = detail::dot_unchecked(p.queries + r * p.d, key, d) * scale;
  }
}

__attribute__((target_clones("avx2", "default"))) void mix_piece(const Piece& p, const float* weights, float* context) {
  const auto d = static_cast<std::size_t>(p.d);
  for (std::int64_t k = 0; k < p.key_count; ++k) {
    const float* value = p.values.data + k * p.values.row_stride;
    for (std::int64_t r = p.first; r < p.last; ++r)
      if (k <= p.last_key(r)) detail::axpy_unchecked(weights[r * p.key_count + k], value, context + r * p.d, d);
  }
}

}  // namespace

Tensor grouped_attend(ConstMatrix q, const GroupedShape& shape, const GroupedKvCache& cache,
                      const AttentionOptions& options) {
  shape.validate();
  const std::int64_t d = shape.head_dim, group = shape.group_size(), queries = q.rows, keys = cache.size();
  if (!(q.cols == shape.heads * d))
    fail("grouped_attend: queries are {} (expected [Tq, {}]: {} heads x {})", q.shape_str(), shape.heads * d,
         shape.heads, d);
  require(cache.kv_heads() == shape.kv_heads && cache.head_dim() == d,
          "grouped_attend: the cache holds {} KV heads of dimension {} (expected {} of {})", cache.kv_heads(),
          cache.head_dim(), shape.kv_heads, d);
  require(queries <= keys, "grouped_attend: {} queries over {} cached tokens (expected the queries to be cached)",
          queries, keys);
  const float scale = static_cast<float>(options.scale.value_or(default_scale(d)));

  // The queries head by head: row h * Tq + i is query head h of token i, so the queries of KV head g's group
  // are the consecutive rows [g * group * Tq, (g + 1) * group * Tq).
  const std::int64_t rows = shape.heads * queries, rows_per_group = group * queries;
  Tensor stacked(Shape{rows, d});
  for (std::int64_t h = 0; h < shape.heads; ++h)
    for (std::int64_t i = 0; i < queries; ++i)
      std::ranges::copy(q.row(i).subspan(static_cast<std::size_t>(h * d), static_cast<std::size_t>(d)),
                        stacked.data() + (h * queries + i) * d);
  std::vector<ConstMatrix> k_heads, v_heads;
  for (std::int64_t g = 0; g < shape.kv_heads; ++g)
    k_heads.push_back(cache.keys(g)), v_heads.push_back(cache.values(g));

  // The rows of each group are cut into pieces that the threads share; every piece walks the cache once, in
  // storage order, scoring each key against its rows, and skips the keys a causal mask hides from a row
  // (query i sees the keys up to keys - queries + i). The order of every sum is the same whatever the number
  // of threads, so is the result.
  const std::int64_t pieces_per_group = std::max<std::int64_t>(1, std::min<std::int64_t>(rows_per_group, 8));
  const std::int64_t pieces = shape.kv_heads * pieces_per_group;
  const auto piece_rows = [&](std::int64_t piece) {
    const std::int64_t g = piece / pieces_per_group, p = piece % pieces_per_group;
    const std::int64_t first = g * rows_per_group + p * rows_per_group / pieces_per_group;
    const std::int64_t last = g * rows_per_group + (p + 1) * rows_per_group / pieces_per_group;
    return std::array<std::int64_t, 3>{g, first, last};
  };
  const auto piece = [&](std::int64_t index) {
    const auto [g, first, last] = piece_rows(index);
    return Piece{stacked.data(),
                 k_heads[static_cast<std::size_t>(g)],
                 v_heads[static_cast<std::size_t>(g)],
                 d,
                 first,
                 last,
                 keys,
                 queries,
                 options.causal};
  };

  Tensor weights(Shape{rows, keys});
  std::ranges::fill(weights.values(), -std::numeric_limits<float>::infinity());  // what the mask hides
#pragma omp parallel for schedule(dynamic)
  for (std::int64_t index = 0; index < pieces; ++index) score_piece(piece(index), scale, weights.data());
#pragma omp parallel for schedule(static)
  for (std::int64_t r = 0; r < rows; ++r) softmax(weights.matrix().row(r));
  // One pass over the values in cache order per piece: each value row is mixed into the piece's outputs.
  Tensor context(Shape{rows, d});
#pragma omp parallel for schedule(dynamic)
  for (std::int64_t index = 0; index < pieces; ++index) mix_piece(piece(index), weights.data(), context.data());

  Tensor out(Shape{queries, shape.heads * d});  // back to token-major: [Tq, H * d]
  for (std::int64_t h = 0; h < shape.heads; ++h)
    for (std::int64_t i = 0; i < queries; ++i)
      std::ranges::copy(context.matrix().row(h * queries + i), out.data() + i * shape.heads * d + h * d);
  return out;
}

Tensor grouped_attention(ConstMatrix x, const GroupedShape& shape, const GroupedWeights& weights,
                         const AttentionOptions& options, GroupedKvCache& cache) {
  weights.validate(shape);
  if (!(x.cols == shape.hidden)) fail("grouped_attention: input is {} (expected [T, {}])", x.shape_str(), shape.hidden);
  const Tensor q = linear(x, weights.q_proj.matrix(), weights.q_bias.values());  // [T, H * d]
  const Tensor k = linear(x, weights.k_proj.matrix(), weights.k_bias.values());  // [T, G * d]
  const Tensor v = linear(x, weights.v_proj.matrix(), weights.v_bias.values());  // [T, G * d]
  cache.append(k.matrix(), v.matrix());
  const Tensor context = grouped_attend(q.matrix(), shape, cache, options);           // [T, H * d]
  return linear(context.matrix(), weights.o_proj.matrix(), weights.o_bias.values());  // [T, hidden]
}

}  // namespace af
