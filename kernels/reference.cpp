// The CPU reference for the kernel checks (see af/kernels/reference.hpp).
#include "af/kernels/reference.hpp"

#include "af/attention.hpp"
#include "af/error.hpp"
#include "af/numeric.hpp"

#include <algorithm>
#include <cmath>
#include <limits>

namespace af::kernels {

std::vector<std::uint16_t> random_bf16(std::size_t count, af::Rng& rng) {
  std::vector<std::uint16_t> bits(count);
  for (auto& b : bits) b = af::bf16_bits(static_cast<float>(rng.normal()));
  return bits;
}

std::vector<float> bf16_to_floats(std::span<const std::uint16_t> bits) {
  std::vector<float> values(bits.size());
  for (std::size_t i = 0; i < bits.size(); ++i) values[i] = af::bf16_to_float(bits[i]);
  return values;
}

namespace {
// The sizes a decode reference needs: q of [batch, q_heads, head_dim], k and v of [batch, kv_heads, seq_len,
// head_dim].
void require_decode_sizes(const char* who, const DecodeShape& s, std::size_t q, std::size_t k, std::size_t v) {
  const std::int64_t d = s.head_dim;
  require(static_cast<std::int64_t>(q) == s.batch * s.q_heads * d, "{}: q holds {} values (expected {})", who, q,
          s.batch * s.q_heads * d);
  require(static_cast<std::int64_t>(k) == s.batch * s.kv_heads * s.seq_len * d && k == v,
          "{}: k holds {} values, v {} (expected {} each)", who, k, v, s.batch * s.kv_heads * s.seq_len * d);
}
}  // namespace

std::vector<float> reference_decode(const DecodeShape& s, std::span<const std::uint16_t> q,
                                    std::span<const std::uint16_t> k, std::span<const std::uint16_t> v) {
  const auto d = s.head_dim, cache = s.seq_len * d;
  require_decode_sizes("reference_decode", s, q.size(), k.size(), v.size());
  const auto qf = bf16_to_floats(q), kf = bf16_to_floats(k), vf = bf16_to_floats(v);
  std::vector<float> out(q.size());
  af::AttentionOptions options;
  options.causal = false;  // the new token sees every cached token
  for (std::int64_t b = 0; b < s.batch; ++b)
    for (std::int64_t h = 0; h < s.q_heads; ++h) {
      const std::int64_t kv = h / s.group(), head = b * s.q_heads + h;
      const float* keys = kf.data() + (b * s.kv_heads + kv) * cache;
      const float* values = vf.data() + (b * s.kv_heads + kv) * cache;
      const af::ConstMatrix qm{qf.data() + head * d, 1, d, d};
      const af::ConstMatrix km{keys, s.seq_len, d, d}, vm{values, s.seq_len, d, d};
      const af::Tensor o = af::attention(qm, km, vm, options);
      std::copy(o.data(), o.data() + d, out.data() + head * d);
    }
  return out;
}

std::vector<double> reference_decode_f64(const DecodeShape& s, std::span<const std::uint16_t> q,
                                         std::span<const std::uint16_t> k, std::span<const std::uint16_t> v,
                                         double scale) {
  const auto d = s.head_dim, cache = s.seq_len * d;
  require_decode_sizes("reference_decode_f64", s, q.size(), k.size(), v.size());
  const auto qf = bf16_to_floats(q), kf = bf16_to_floats(k), vf = bf16_to_floats(v);
  std::vector<double> out(q.size(), 0.0), weights(static_cast<std::size_t>(s.seq_len));
  for (std::int64_t b = 0; b < s.batch; ++b)
    for (std::int64_t h = 0; h < s.q_heads; ++h) {
      const std::int64_t head = b * s.q_heads + h;
      const float* query = qf.data() + head * d;
      const float* keys = kf.data() + (b * s.kv_heads + h / s.group()) * cache;
      const float* values = vf.data() + (b * s.kv_heads + h / s.group()) * cache;
      // The scaled scores, then exp(score - max score): the largest weight is exactly 1 and nothing overflows.
      // (A NaN input makes its score NaN, which the sum below carries into every output of the head.)
      double max_score = -std::numeric_limits<double>::infinity();
      for (std::int64_t j = 0; j < s.seq_len; ++j) {
        double dot = 0.0;
        for (std::int64_t c = 0; c < d; ++c) dot += static_cast<double>(query[c]) * keys[j * d + c];
        weights[static_cast<std::size_t>(j)] = dot * scale;
        max_score = std::max(max_score, dot * scale);
      }
      double sum = 0.0;
      for (double& w : weights) sum += (w = std::exp(w - max_score));
      double* o = out.data() + head * d;
      for (std::int64_t j = 0; j < s.seq_len; ++j)
        for (std::int64_t c = 0; c < d; ++c) o[c] += weights[static_cast<std::size_t>(j)] * values[j * d + c];
      for (std::int64_t c = 0; c < d; ++c) o[c] /= sum;
    }
  return out;
}

double relative_error(std::span<const float> a, std::span<const float> b) {
  require(a.size() == b.size(), "relative_error: sizes {} and {} differ", a.size(), b.size());
  double diff = 0.0, norm = 0.0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (!std::isfinite(a[i])) return std::nan("");
    diff += (static_cast<double>(a[i]) - b[i]) * (static_cast<double>(a[i]) - b[i]);
    norm += static_cast<double>(b[i]) * b[i];
  }
  return std::sqrt(diff / norm);
}

OutputError output_error(std::span<const float> got, std::span<const double> expected) {
  require(got.size() == expected.size(), "output_error: {} values against {} expected", got.size(), expected.size());
  OutputError e;
  double diff = 0.0, norm = 0.0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    const double error = std::abs(static_cast<double>(got[i]) - expected[i]);  // NaN or inf stays
    diff += error * error;
    norm += expected[i] * expected[i];
    e.worst = std::isfinite(error) ? std::max(e.worst, error) : std::numeric_limits<double>::infinity();
    e.largest = std::max(e.largest, std::abs(expected[i]));
  }
  e.relative = std::sqrt(diff / norm);
  return e;
}

}  // namespace af::kernels
