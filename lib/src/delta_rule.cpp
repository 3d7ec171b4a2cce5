#include "af/delta_rule.hpp"

#include "af/error.hpp"

#include <cmath>
#include <vector>

namespace af {

void DeltaRuleInputs::validate() const {
  require(q.rank() == 3, "delta rule: q is {} (expected [T, H, d_k])", q.shape().str());
  const std::int64_t T = q.dim(0), H = q.dim(1), dk = q.dim(2);
  require(T >= 1 && H >= 1 && dk >= 1, "delta rule: q is {} (expected every size >= 1)", q.shape().str());
  require(k.shape() == q.shape(), "delta rule: k is {} (expected {} like q)", k.shape().str(), q.shape().str());
  require(v.rank() == 3 && v.dim(0) == T && v.dim(1) == H && v.dim(2) >= 1,
          "delta rule: v is {} (expected [{}, {}, d_v])", v.shape().str(), T, H);
  require(log_decay.shape() == Shape{T, H} || log_decay.shape() == q.shape(),
          "delta rule: log_decay is {} (expected [{}, {}] or [{}, {}, {}])", log_decay.shape().str(), T, H, T, H, dk);
  require(beta.shape() == Shape{T, H}, "delta rule: beta is {} (expected [{}, {}])", beta.shape().str(), T, H);
  for (const float g : log_decay.values())
    require(g <= 0.0f, "delta rule: log-decay {} (expected <= 0: a gate only forgets)", g);
  for (const Tensor* t : {&q, &k, &v, &beta})
    for (const float x : t->values()) require(std::isfinite(x), "delta rule: input value {} (expected finite)", x);
}

Tensor delta_rule_initial_state(std::int64_t heads, std::int64_t key_dim, std::int64_t value_dim) {
  require(heads >= 1 && key_dim >= 1 && value_dim >= 1, "delta rule state: [{}, {}, {}] (expected sizes >= 1)", heads,
          key_dim, value_dim);
  return Tensor(Shape{heads, key_dim, value_dim});
}

namespace {

void check_state(const DeltaRuleInputs& in, const Tensor& state) {
  in.validate();
  require(state.shape() == Shape{in.heads(), in.key_dim(), in.value_dim()},
          "delta rule: state is {} (expected [{}, {}, {}])", state.shape().str(), in.heads(), in.key_dim(),
          in.value_dim());
}

// The log-decay of step t, head h, key channel c.
float log_decay_at(const DeltaRuleInputs& in, std::int64_t t, std::int64_t h, std::int64_t c) {
  return in.per_channel_decay() ? in.log_decay.data()[(t * in.heads() + h) * in.key_dim() + c]
                                : in.log_decay.data()[t * in.heads() + h];
}

}  // namespace

// [recurrent]
Tensor delta_rule_recurrent(const DeltaRuleInputs& in, Tensor& state) {
  check_state(in, state);
  const std::int64_t T = in.steps(), H = in.heads(), dk = in.key_dim(), dv = in.value_dim();
  Tensor out(Shape{T, H, dv});
  std::vector<double> u(static_cast<std::size_t>(dv));
  for (std::int64_t h = 0; h < H; ++h) {
    float* S = state.data() + h * dk * dv;  // S[c * dv + j]: key channel c, value channel j
    for (std::int64_t t = 0; t < T; ++t) {
      const float* q = in.q.data() + (t * H + h) * dk;
      const float* k = in.k.data() + (t * H + h) * dk;
      const float* v = in.v.data() + (t * H + h) * dv;
      const float beta = in.beta.data()[t * H + h];
      for (std::int64_t c = 0; c < dk; ++c) {  // decay
        const float keep = std::exp(log_decay_at(in, t, h, c));
        for (std::int64_t j = 0; j < dv; ++j) S[c * dv + j] *= keep;
      }
      for (std::int64_t j = 0; j < dv; ++j) {  // u = beta (v - S^T k)
        double retrieved = 0;
        for (std::int64_t c = 0; c < dk; ++c) retrieved += static_cast<double>(S[c * dv + j]) * k[c];
        u[static_cast<std::size_t>(j)] = beta * (v[j] - retrieved);
      }
      for (std::int64_t c = 0; c < dk; ++c)  // S += k u^T
        for (std::int64_t j = 0; j < dv; ++j)
          S[c * dv + j] += static_cast<float>(k[c] * u[static_cast<std::size_t>(j)]);
      float* o = out.data() + (t * H + h) * dv;
      for (std::int64_t j = 0; j < dv; ++j) {  // o = S^T q
        double sum = 0;
        for (std::int64_t c = 0; c < dk; ++c) sum += static_cast<double>(S[c * dv + j]) * q[c];
        o[j] = static_cast<float>(sum);
      }
    }
  }
  return out;
}
// [/recurrent]

// [chunked]
Tensor delta_rule_chunked(const DeltaRuleInputs& in, Tensor& state, std::int64_t chunk) {
  check_state(in, state);
  require(chunk >= 1, "delta rule: chunk {} (expected >= 1)", chunk);
  const std::int64_t T = in.steps(), H = in.heads(), dk = in.key_dim(), dv = in.value_dim();
  Tensor out(Shape{T, H, dv});
  const auto at = [](std::vector<double>& m, std::int64_t cols, std::int64_t r, std::int64_t c) -> double& {
    return m[static_cast<std::size_t>(r * cols + c)];
  };
  for (std::int64_t h = 0; h < H; ++h) {
    float* S = state.data() + h * dk * dv;
    for (std::int64_t first = 0; first < T; first += chunk) {
      const std::int64_t C = std::min(chunk, T - first);
      // Decay accumulated inside the chunk, G[i][c] = sum of the log-decays of steps first..first+i, and the
      // keys and queries scaled by it: K+ = k e^G, K- = k e^-G, Q+ = q e^G.
      std::vector<double> kp(static_cast<std::size_t>(C * dk)), km(kp.size()), qp(kp.size()),
          g_last(static_cast<std::size_t>(dk));
      std::vector<double> G(static_cast<std::size_t>(dk), 0.0);
      for (std::int64_t i = 0; i < C; ++i) {
        const std::int64_t t = first + i;
        for (std::int64_t c = 0; c < dk; ++c) {
          G[static_cast<std::size_t>(c)] += log_decay_at(in, t, h, c);
          const double up = std::exp(G[static_cast<std::size_t>(c)]), down = std::exp(-G[static_cast<std::size_t>(c)]);
          at(kp, dk, i, c) = in.k.data()[(t * H + h) * dk + c] * up;
          at(km, dk, i, c) = in.k.data()[(t * H + h) * dk + c] * down;
          at(qp, dk, i, c) = in.q.data()[(t * H + h) * dk + c] * up;
        }
      }
      for (std::int64_t c = 0; c < dk; ++c)
        g_last[static_cast<std::size_t>(c)] = std::exp(G[static_cast<std::size_t>(c)]);
      // B = diag(beta) (V - K+ S0), then (I + A) U = B with A[i][j] = beta_i K+_i . K-_j for j < i, by forward
      // substitution (the UT transform).
      std::vector<double> U(static_cast<std::size_t>(C * dv));
      for (std::int64_t i = 0; i < C; ++i) {
        const std::int64_t t = first + i;
        const double beta = in.beta.data()[t * H + h];
        for (std::int64_t j = 0; j < dv; ++j) {
          double retrieved = 0;
          for (std::int64_t c = 0; c < dk; ++c) retrieved += at(kp, dk, i, c) * S[c * dv + j];
          at(U, dv, i, j) = beta * (in.v.data()[(t * H + h) * dv + j] - retrieved);
        }
        for (std::int64_t p = 0; p < i; ++p) {
          double a = 0;
          for (std::int64_t c = 0; c < dk; ++c) a += at(kp, dk, i, c) * at(km, dk, p, c);
          a *= beta;
          for (std::int64_t j = 0; j < dv; ++j) at(U, dv, i, j) -= a * at(U, dv, p, j);
        }
      }
      // O_t = S0^T Q+_t + sum_{i <= t} (Q+_t . K-_i) U_i.
      for (std::int64_t t = 0; t < C; ++t) {
        float* o = out.data() + ((first + t) * H + h) * dv;
        std::vector<double> row(static_cast<std::size_t>(dv), 0.0);
        for (std::int64_t c = 0; c < dk; ++c)
          for (std::int64_t j = 0; j < dv; ++j) row[static_cast<std::size_t>(j)] += at(qp, dk, t, c) * S[c * dv + j];
        for (std::int64_t i = 0; i <= t; ++i) {
          double w = 0;
          for (std::int64_t c = 0; c < dk; ++c) w += at(qp, dk, t, c) * at(km, dk, i, c);
          for (std::int64_t j = 0; j < dv; ++j) row[static_cast<std::size_t>(j)] += w * at(U, dv, i, j);
        }
        for (std::int64_t j = 0; j < dv; ++j) o[j] = static_cast<float>(row[static_cast<std::size_t>(j)]);
      }
      // The state at the chunk's end: diag(e^G_C) S0 + sum_i (K-_i e^G_C) U_i^T.
      for (std::int64_t c = 0; c < dk; ++c)
        for (std::int64_t j = 0; j < dv; ++j) {
          double s = g_last[static_cast<std::size_t>(c)] * S[c * dv + j];
          for (std::int64_t i = 0; i < C; ++i)
            s += at(km, dk, i, c) * g_last[static_cast<std::size_t>(c)] * at(U, dv, i, j);
          S[c * dv + j] = static_cast<float>(s);
        }
    }
  }
  return out;
}
// [/chunked]

}  // namespace af
