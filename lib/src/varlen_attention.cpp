// Causal varlen prefill and append on the CPU in float64: the reference of the prefill kernel.
#include "af/varlen_attention.hpp"

#include "af/error.hpp"
#include "af/numeric.hpp"

#include <algorithm>
#include <cmath>
#include <limits>

namespace af {

void VarlenShape::validate() const {
  require(batch >= 1, "varlen attention: batch is {} (expected at least 1)", batch);
  require(kv_heads >= 1, "varlen attention: kv_heads is {} (expected at least 1)", kv_heads);
  require(q_heads >= kv_heads && q_heads % kv_heads == 0,
          "varlen attention: q_heads is {} (expected a multiple of kv_heads = {})", q_heads, kv_heads);
  require(head_dim >= 1, "varlen attention: head_dim is {} (expected at least 1)", head_dim);
}

void validate_cumulative(const VarlenShape& s, std::span<const std::int32_t> cu_q, std::span<const std::int32_t> cu_k) {
  s.validate();
  const auto entries = static_cast<std::size_t>(s.batch + 1);
  require(cu_q.size() == entries && cu_k.size() == entries,
          "varlen attention: cu_q holds {} and cu_k {} values (expected batch + 1 = {} each)", cu_q.size(), cu_k.size(),
          entries);
  require(cu_q[0] == 0 && cu_k[0] == 0, "varlen attention: cu_q[0] is {} and cu_k[0] {} (expected 0)", cu_q[0],
          cu_k[0]);
  for (std::size_t b = 0; b + 1 < entries; ++b) {
    const std::int64_t lq = std::int64_t{cu_q[b + 1]} - cu_q[b], lk = std::int64_t{cu_k[b + 1]} - cu_k[b];
    require(lq >= 0 && lk >= lq,
            "varlen attention: sequence {} has {} queries over {} keys (expected 0 <= queries <= keys)", b, lq, lk);
  }
}

std::vector<double> varlen_causal_attention_f64(const VarlenShape& s, std::span<const std::uint16_t> q,
                                                std::span<const std::uint16_t> k, std::span<const std::uint16_t> v,
                                                std::span<const std::int32_t> cu_q, std::span<const std::int32_t> cu_k,
                                                double scale) {
  validate_cumulative(s, cu_q, cu_k);
  const std::int64_t d = s.head_dim, total_q = cu_q.back(), total_k = cu_k.back();
  require(q.size() == static_cast<std::size_t>(total_q * s.q_heads * d),
          "varlen_causal_attention_f64: q holds {} values (expected total_q {} x q_heads x head_dim = {})", q.size(),
          total_q, total_q * s.q_heads * d);
  require(k.size() == static_cast<std::size_t>(total_k * s.kv_heads * d) && v.size() == k.size(),
          "varlen_causal_attention_f64: k holds {} values, v {} (expected total_k {} x kv_heads x head_dim = {} each)",
          k.size(), v.size(), total_k, total_k * s.kv_heads * d);
  std::vector<double> out(q.size(), 0.0);
  for (std::int64_t b = 0; b < s.batch; ++b) {
    const std::int64_t q0 = cu_q[static_cast<std::size_t>(b)], k0 = cu_k[static_cast<std::size_t>(b)];
    const std::int64_t lq = cu_q[static_cast<std::size_t>(b + 1)] - q0, lk = cu_k[static_cast<std::size_t>(b + 1)] - k0;
    std::vector<double> weights(static_cast<std::size_t>(lk));
    for (std::int64_t i = 0; i < lq; ++i) {
      const std::int64_t visible = lk - lq + i + 1;  // keys 0 .. lk - lq + i
      for (std::int64_t h = 0; h < s.q_heads; ++h) {
        const std::int64_t g = h / s.group();
        const auto query = static_cast<std::size_t>(((q0 + i) * s.q_heads + h) * d);
        const auto key_at = [&](std::int64_t j) { return static_cast<std::size_t>(((k0 + j) * s.kv_heads + g) * d); };
        double max_score = -std::numeric_limits<double>::infinity();
        for (std::int64_t j = 0; j < visible; ++j) {
          double dot = 0.0;
          for (std::int64_t c = 0; c < d; ++c)
            dot += static_cast<double>(bf16_to_float(q[query + static_cast<std::size_t>(c)])) *
                   bf16_to_float(k[key_at(j) + static_cast<std::size_t>(c)]);
          weights[static_cast<std::size_t>(j)] = dot * scale;
          max_score = std::max(max_score, dot * scale);
        }
        double sum = 0.0;
        for (std::int64_t j = 0; j < visible; ++j)
          sum += (weights[static_cast<std::size_t>(j)] = std::exp(weights[static_cast<std::size_t>(j)] - max_score));
        double* o = out.data() + query;
        for (std::int64_t j = 0; j < visible; ++j)
          for (std::int64_t c = 0; c < d; ++c)
            o[c] += weights[static_cast<std::size_t>(j)] * bf16_to_float(v[key_at(j) + static_cast<std::size_t>(c)]);
        for (std::int64_t c = 0; c < d; ++c) o[c] /= sum;
      }
    }
  }
  return out;
}

double varlen_attention_min_bytes(const VarlenShape& s, std::int64_t total_q, std::int64_t total_k) {
  s.validate();
  require(total_q >= 0 && total_k >= 0, "varlen_attention_min_bytes: total_q {} and total_k {} (expected >= 0)",
          total_q, total_k);
  const double d = static_cast<double>(s.head_dim);
  return 2.0 * d * (2.0 * static_cast<double>(total_q * s.q_heads) + 2.0 * static_cast<double>(total_k * s.kv_heads));
}

double varlen_attention_causal_flops(const VarlenShape& s, std::span<const std::int32_t> cu_q,
                                     std::span<const std::int32_t> cu_k) {
  validate_cumulative(s, cu_q, cu_k);
  double pairs = 0.0;
  for (std::size_t b = 0; b + 1 < cu_q.size(); ++b) {
    const double lq = cu_q[b + 1] - cu_q[b], lk = cu_k[b + 1] - cu_k[b];
    pairs += lq * (lk - lq) + lq * (lq + 1) / 2;  // each query sees the past and the new tokens up to itself
  }
  // Q K^T and P V: head_dim multiply-adds each, 2 FLOPs per multiply-add.
  return pairs * static_cast<double>(s.q_heads) * 2.0 * 2.0 * static_cast<double>(s.head_dim);
}

}  // namespace af
