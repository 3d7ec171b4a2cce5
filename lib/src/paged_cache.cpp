#include "af/paged_cache.hpp"

#include "af/error.hpp"
#include "af/linalg.hpp"
#include "af/softmax.hpp"

#include <algorithm>
#include <limits>

namespace af {

PagedKvCache::PagedKvCache(std::int64_t pages, std::int64_t page_size, std::int64_t kv_heads, std::int64_t head_dim)
    : page_size_(page_size), kv_heads_(kv_heads), head_dim_(head_dim) {
  require(pages > 0 && page_size > 0 && kv_heads > 0 && head_dim > 0,
          "PagedKvCache: {} pages of {} tokens, {} KV heads of dimension {} (expected all > 0)", pages, page_size,
          kv_heads, head_dim);
  keys_ = Tensor(Shape{pages, page_size, kv_heads, head_dim});
  values_ = Tensor(Shape{pages, page_size, kv_heads, head_dim});
  ref_count_.assign(static_cast<std::size_t>(pages), 0);
  for (std::int64_t p = pages - 1; p >= 0; --p) free_list_.push_back(p);  // page 0 is taken first
}

const PagedKvCache::Sequence& PagedKvCache::sequence(std::int64_t seq) const {
  require(
      seq >= 0 && seq < static_cast<std::int64_t>(sequences_.size()) && sequences_[static_cast<std::size_t>(seq)].live,
      "PagedKvCache: no live sequence {} (expected an id from add_sequence or fork that was not released)", seq);
  return sequences_[static_cast<std::size_t>(seq)];
}

std::int64_t PagedKvCache::add_sequence() {
  sequences_.push_back({{}, 0, true});
  return static_cast<std::int64_t>(sequences_.size()) - 1;
}

std::int64_t PagedKvCache::fork(std::int64_t parent) {
  Sequence child = sequence(parent);
  for (std::int64_t page : child.pages) ++ref_count_[static_cast<std::size_t>(page)];
  sequences_.push_back(std::move(child));
  return static_cast<std::int64_t>(sequences_.size()) - 1;
}

std::int64_t PagedKvCache::take_page() {
  require(!free_list_.empty(), "PagedKvCache: all {} pages are in use (expected a free page; release a sequence)",
          pages());
  const std::int64_t page = free_list_.back();
  free_list_.pop_back();
  ref_count_[static_cast<std::size_t>(page)] = 1;
  return page;
}

void PagedKvCache::append(std::int64_t seq, ConstMatrix keys, ConstMatrix values) {
  (void)sequence(seq);
  const std::int64_t width = kv_heads_ * head_dim_;
  if (!(keys.cols == width && values.cols == width && keys.rows == values.rows))
    fail("PagedKvCache::append: keys {} and values {} (expected [n, {}] each: {} KV heads x {})", keys.shape_str(),
         values.shape_str(), width, kv_heads_, head_dim_);
  Sequence& s = sequences_[static_cast<std::size_t>(seq)];
  for (std::int64_t r = 0; r < keys.rows; ++r) {
    const std::int64_t slot = s.length % page_size_;
    if (slot == 0) {
      s.pages.push_back(take_page());
    } else if (ref_count_[static_cast<std::size_t>(s.pages.back())] > 1) {
      // Copy on write: the partial last page is shared with another sequence; copy its used slots first.
      const std::int64_t shared = s.pages.back(), own = take_page();
      --ref_count_[static_cast<std::size_t>(shared)];
      std::copy_n(keys_.data() + slot_offset(shared, 0), slot * width, keys_.data() + slot_offset(own, 0));
      std::copy_n(values_.data() + slot_offset(shared, 0), slot * width, values_.data() + slot_offset(own, 0));
      s.pages.back() = own;
    }
    std::ranges::copy(keys.row(r), keys_.data() + slot_offset(s.pages.back(), slot));
    std::ranges::copy(values.row(r), values_.data() + slot_offset(s.pages.back(), slot));
    ++s.length;
  }
}

void PagedKvCache::release(std::int64_t seq) {
  (void)sequence(seq);
  Sequence& s = sequences_[static_cast<std::size_t>(seq)];
  for (std::int64_t page : s.pages)
    if (--ref_count_[static_cast<std::size_t>(page)] == 0) free_list_.push_back(page);
  s = {};
}

std::int64_t PagedKvCache::length(std::int64_t seq) const { return sequence(seq).length; }

std::span<const std::int64_t> PagedKvCache::block_table(std::int64_t seq) const { return sequence(seq).pages; }

std::span<const float> PagedKvCache::key(std::int64_t seq, std::int64_t j, std::int64_t g) const {
  const Sequence& s = sequence(seq);
  require(j >= 0 && j < s.length && g >= 0 && g < kv_heads_,
          "PagedKvCache::key: token {} of KV head {} (expected token in [0, {}) and head in [0, {}))", j, g, s.length,
          kv_heads_);
  const std::int64_t page = s.pages[static_cast<std::size_t>(j / page_size_)];
  return {keys_.data() + slot_offset(page, j % page_size_) + g * head_dim_, static_cast<std::size_t>(head_dim_)};
}

std::span<const float> PagedKvCache::value(std::int64_t seq, std::int64_t j, std::int64_t g) const {
  const Sequence& s = sequence(seq);
  require(j >= 0 && j < s.length && g >= 0 && g < kv_heads_,
          "PagedKvCache::value: token {} of KV head {} (expected token in [0, {}) and head in [0, {}))", j, g, s.length,
          kv_heads_);
  const std::int64_t page = s.pages[static_cast<std::size_t>(j / page_size_)];
  return {values_.data() + slot_offset(page, j % page_size_) + g * head_dim_, static_cast<std::size_t>(head_dim_)};
}

std::int64_t PagedKvCache::wasted_slots(std::int64_t seq) const {
  const Sequence& s = sequence(seq);
  return static_cast<std::int64_t>(s.pages.size()) * page_size_ - s.length;
}

std::int64_t PagedKvCache::users(std::int64_t page) const {
  require(page >= 0 && page < pages(), "PagedKvCache::users: page {} (expected [0, {}))", page, pages());
  return ref_count_[static_cast<std::size_t>(page)];
}

Tensor paged_attend(ConstMatrix q, const GroupedShape& shape, const PagedKvCache& cache, std::int64_t seq,
                    const AttentionOptions& options) {
  shape.validate();
  const std::int64_t d = shape.head_dim, group = shape.group_size(), queries = q.rows, keys = cache.length(seq);
  if (!(q.cols == shape.heads * d))
    fail("paged_attend: queries are {} (expected [Tq, {}]: {} heads x {})", q.shape_str(), shape.heads * d, shape.heads,
         d);
  require(cache.kv_heads() == shape.kv_heads && cache.head_dim() == d,
          "paged_attend: the cache holds {} KV heads of dimension {} (expected {} of {})", cache.kv_heads(),
          cache.head_dim(), shape.kv_heads, d);
  require(queries <= keys, "paged_attend: {} queries over {} cached tokens (expected the queries to be cached)",
          queries, keys);
  const float scale = static_cast<float>(options.scale.value_or(default_scale(d)));
  // Row h * Tq + i is query head h of token i, as in af::grouped_attend.
  const std::int64_t rows = shape.heads * queries, rows_per_group = group * queries;
  Tensor stacked(Shape{rows, d});
  for (std::int64_t h = 0; h < shape.heads; ++h)
    for (std::int64_t i = 0; i < queries; ++i)
      std::ranges::copy(q.row(i).subspan(static_cast<std::size_t>(h * d), static_cast<std::size_t>(d)),
                        stacked.data() + (h * queries + i) * d);
  Tensor weights(Shape{rows, keys});
  for (std::int64_t k = 0; k < keys; ++k)
    for (std::int64_t g = 0; g < shape.kv_heads; ++g) {
      const std::span<const float> key = cache.key(seq, k, g);
      for (std::int64_t r = g * rows_per_group; r < (g + 1) * rows_per_group; ++r)
        weights.data()[r * keys + k] = dot(stacked.matrix().row(r), key) * scale;
    }
  for (std::int64_t r = 0; r < rows; ++r) {
    std::span<float> row = weights.matrix().row(r);
    const std::int64_t position = keys - queries + r % queries;  // the query's own position
    if (options.causal)
      for (std::int64_t k = position + 1; k < keys; ++k)
        row[static_cast<std::size_t>(k)] = -std::numeric_limits<float>::infinity();
    softmax(row);
  }
  Tensor context(Shape{rows, d});
  for (std::int64_t k = 0; k < keys; ++k)
    for (std::int64_t g = 0; g < shape.kv_heads; ++g) {
      const std::span<const float> value = cache.value(seq, k, g);
      for (std::int64_t r = g * rows_per_group; r < (g + 1) * rows_per_group; ++r)
        axpy(weights.data()[r * keys + k], value, context.matrix().row(r));
    }
  Tensor out(Shape{queries, shape.heads * d});
  for (std::int64_t h = 0; h < shape.heads; ++h)
    for (std::int64_t i = 0; i < queries; ++i)
      std::ranges::copy(context.matrix().row(h * queries + i), out.data() + i * shape.heads * d + h * d);
  return out;
}

Tensor ragged_batch_step(ConstMatrix q, ConstMatrix keys, ConstMatrix values, const GroupedShape& shape,
                         PagedKvCache& cache, std::span<const std::int64_t> seqs, std::span<const std::int64_t> tokens,
                         const AttentionOptions& options) {
  shape.validate();
  require(seqs.size() == tokens.size(), "ragged_batch_step: {} sequences but {} token counts (expected one each)",
          seqs.size(), tokens.size());
  std::int64_t total = 0;
  for (std::int64_t n : tokens) {
    require(n >= 1, "ragged_batch_step: a sequence with {} tokens in the step (expected >= 1)", n);
    total += n;
  }
  if (!(q.rows == total && keys.rows == total && values.rows == total && q.cols == shape.heads * shape.head_dim))
    fail("ragged_batch_step: q {}, keys {}, values {} for {} tokens (expected q [{}, {}])", q.shape_str(),
         keys.shape_str(), values.shape_str(), total, total, shape.heads * shape.head_dim);
  Tensor out(Shape{total, shape.heads * shape.head_dim});
  std::int64_t offset = 0;
  for (std::size_t i = 0; i < seqs.size(); ++i) {
    cache.append(seqs[i], keys.rows_slice(offset, tokens[i]), values.rows_slice(offset, tokens[i]));
    const Tensor o = paged_attend(q.rows_slice(offset, tokens[i]), shape, cache, seqs[i], options);
    std::ranges::copy(o.values(), out.data() + offset * out.dim(1));
    offset += tokens[i];
  }
  return out;
}

}  // namespace af
