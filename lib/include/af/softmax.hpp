#pragma once
/// @file softmax.hpp
/// Attention masks and the numerically stable softmax.

#include "af/tensor.hpp"

#include <cstdint>
#include <span>
#include <vector>

namespace af {

/// Which keys each query may attend to: `allows(query, key)`.
class Mask {
 public:
  /// A `[queries, keys]` mask with every entry set to `allowed`.
  Mask(std::int64_t queries, std::int64_t keys, bool allowed);
  /// The causal mask: query `i` sits at position `first_query_position + i`, key `j` at position `j`, and a
  /// query sees the keys at its own position and before. A prefill over an empty cache uses
  /// `first_query_position = 0`; a decode step after `t` cached tokens uses `t`.
  static Mask causal(std::int64_t queries, std::int64_t keys, std::int64_t first_query_position);

  std::int64_t queries() const { return queries_; }
  std::int64_t keys() const { return keys_; }
  bool allows(std::int64_t query, std::int64_t key) const {
    return allowed_[static_cast<std::size_t>(query * keys_ + key)] != 0;
  }
  void set(std::int64_t query, std::int64_t key, bool allowed);

 private:
  std::int64_t queries_;
  std::int64_t keys_;
  std::vector<unsigned char> allowed_;
};

/// Softmax of one row in place: subtracts the row maximum before exponentiating, so no input overflows.
/// Entries equal to -infinity get weight 0; a row that is entirely -infinity becomes all zeros.
void softmax(std::span<float> row);

/// Softmax along each row of `scores` in place. With a mask, masked entries get weight exactly 0, and a
/// row whose keys are all masked becomes all zeros (it attends to nothing; PyTorch's SDPA would return
/// NaN there). Throws af::Error when the mask's shape differs from the scores'.
void softmax_rows(Matrix scores, const Mask* mask = nullptr);

}  // namespace af
