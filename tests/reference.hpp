#pragma once
// Independent float64 references for the tests: written plainly, with no code shared with lib/.
#include "af/tensor.hpp"

#include <cmath>
#include <limits>
#include <vector>

namespace reference {

using Matrix64 = std::vector<std::vector<double>>;

inline Matrix64 to64(af::ConstMatrix m) {
  Matrix64 out(static_cast<std::size_t>(m.rows), std::vector<double>(static_cast<std::size_t>(m.cols)));
  for (std::int64_t i = 0; i < m.rows; ++i)
    for (std::int64_t j = 0; j < m.cols; ++j) out[i][j] = m(i, j);
  return out;
}

// x [T, in] W[out, in]^T + b
inline Matrix64 linear(const Matrix64& x, const Matrix64& w, const std::vector<double>& bias = {}) {
  Matrix64 y(x.size(), std::vector<double>(w.size(), 0.0));
  for (std::size_t t = 0; t < x.size(); ++t)
    for (std::size_t o = 0; o < w.size(); ++o) {
      double sum = bias.empty() ? 0.0 : bias[o];
      for (std::size_t i = 0; i < x[t].size(); ++i) sum += x[t][i] * w[o][i];
      y[t][o] = sum;
    }
  return y;
}

// Attention with the queries as the last q.size() of k.size() positions when causal.
inline Matrix64 attention(const Matrix64& q, const Matrix64& k, const Matrix64& v, bool causal, double scale) {
  const std::size_t tq = q.size(), tk = k.size();
  Matrix64 out(tq, std::vector<double>(v.empty() ? 0 : v[0].size(), 0.0));
  for (std::size_t i = 0; i < tq; ++i) {
    std::vector<double> w(tk, -std::numeric_limits<double>::infinity());
    double top = -std::numeric_limits<double>::infinity();
    for (std::size_t j = 0; j < tk; ++j) {
      if (causal && j > tk - tq + i) continue;
      double s = 0.0;
      for (std::size_t c = 0; c < q[i].size(); ++c) s += q[i][c] * k[j][c];
      w[j] = s * scale;
      top = std::max(top, w[j]);
    }
    if (top == -std::numeric_limits<double>::infinity()) continue;
    double sum = 0.0;
    for (double& x : w) sum += (x = std::exp(x - top));
    for (std::size_t j = 0; j < tk; ++j)
      for (std::size_t c = 0; c < out[i].size(); ++c) out[i][c] += w[j] / sum * v[j][c];
  }
  return out;
}

inline double max_abs_diff(af::ConstMatrix a, const Matrix64& b) {
  double worst = 0.0;
  for (std::int64_t i = 0; i < a.rows; ++i)
    for (std::int64_t j = 0; j < a.cols; ++j) {
      worst = af::worse(worst, std::abs(a(i, j) - b[i][j]));
    }
  return worst;
}

}  // namespace reference
