#include "af/attention.hpp"

#include "af/error.hpp"
#include "af/linalg.hpp"

#include <cmath>

namespace af {

double default_scale(std::int64_t head_dim) {
  require(head_dim > 0, "default_scale: head_dim is {} (expected > 0)", head_dim);
  return 1.0 / std::sqrt(static_cast<double>(head_dim));
}

Tensor attention_weights(ConstMatrix q, ConstMatrix k, const AttentionOptions& options) {
  if (!(q.cols == k.cols))
    fail("attention: q is {} and k is {} (expected the same head dimension)", q.shape_str(), k.shape_str());
  require(!options.causal || q.rows <= k.rows,
          "attention: {} causal queries over {} keys (expected the queries to be the last of the key positions)",
          q.rows, k.rows);
  Tensor scores = matmul_transposed(q, k);  // [Tq, Tk]
  const auto scale = static_cast<float>(options.scale.value_or(default_scale(q.cols)));
  for (float& s : scores.values()) s *= scale;
  if (options.causal) {
    const Mask mask = Mask::causal(q.rows, k.rows, k.rows - q.rows);
    softmax_rows(scores.matrix(), &mask);
  } else {
    softmax_rows(scores.matrix());
  }
  return scores;
}

Tensor attention(ConstMatrix q, ConstMatrix k, ConstMatrix v, const AttentionOptions& options) {
  if (!(k.rows == v.rows))
    fail("attention: k is {} and v is {} (expected one value per key)", k.shape_str(), v.shape_str());
  const Tensor weights = attention_weights(q, k, options);
  return matmul(weights.matrix(), v);
}

KvCache::KvCache(std::int64_t capacity, std::int64_t key_dim, std::int64_t value_dim) {
  require(capacity > 0 && key_dim > 0 && value_dim > 0,
          "KvCache: capacity {}, key_dim {}, value_dim {} (expected all > 0)", capacity, key_dim, value_dim);
  keys_ = Tensor(Shape{capacity, key_dim});
  values_ = Tensor(Shape{capacity, value_dim});
}

void KvCache::append(ConstMatrix keys, ConstMatrix values) {
  if (!(keys.cols == keys_.dim(1) && values.cols == values_.dim(1) && keys.rows == values.rows))
    fail("KvCache::append: keys {} and values {} (expected [n, {}] and [n, {}])", keys.shape_str(), values.shape_str(),
         keys_.dim(1), values_.dim(1));
  require(size_ + keys.rows <= capacity(), "KvCache::append: {} cached + {} new tokens exceed the capacity {}", size_,
          keys.rows, capacity());
  for (std::int64_t r = 0; r < keys.rows; ++r) {
    std::ranges::copy(keys.row(r), keys_.matrix().row(size_ + r).begin());
    std::ranges::copy(values.row(r), values_.matrix().row(size_ + r).begin());
  }
  size_ += keys.rows;
}

void SingleHeadWeights::validate() const {
  if (!(q_proj.rank() == 2 && q_proj.dim(0) > 0 && q_proj.dim(1) > 0))
    fail("SingleHeadWeights: q_proj is {} (expected [head_dim, hidden])", q_proj.shape().str());
  const std::int64_t d = head_dim(), h = hidden();
  for (const auto& [name, tensor] : {std::pair{"k_proj", &k_proj}, std::pair{"v_proj", &v_proj}})
    if (!(tensor->shape() == Shape{d, h}))
      fail("SingleHeadWeights: {} is {} (expected [{}, {}] like q_proj)", name, tensor->shape().str(), d, h);
  if (!(o_proj.shape() == Shape{h, d}))
    fail("SingleHeadWeights: o_proj is {} (expected [{}, {}])", o_proj.shape().str(), h, d);
  for (const auto& [name, bias] :
       {std::pair{"q_bias", &q_bias}, std::pair{"k_bias", &k_bias}, std::pair{"v_bias", &v_bias}})
    if (!(bias->empty() || bias->shape() == Shape{d}))
      fail("SingleHeadWeights: {} is {} (expected [{}] or none)", name, bias->shape().str(), d);
}

Tensor single_head_attention(ConstMatrix x, const SingleHeadWeights& weights, const AttentionOptions& options,
                             KvCache& cache) {
  weights.validate();
  if (!(x.cols == weights.hidden()))
    fail("single_head_attention: input is {} (expected [T, {}])", x.shape_str(), weights.hidden());
  const Tensor q = linear(x, weights.q_proj.matrix(), weights.q_bias.values());  // [T, d]
  const Tensor k = linear(x, weights.k_proj.matrix(), weights.k_bias.values());
  const Tensor v = linear(x, weights.v_proj.matrix(), weights.v_bias.values());
  cache.append(k.matrix(), v.matrix());
  const Tensor context = attention(q.matrix(), cache.keys(), cache.values(), options);  // [T, d]
  return linear(context.matrix(), weights.o_proj.matrix());                             // [T, hidden]
}

}  // namespace af
