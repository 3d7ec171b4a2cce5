#include "af/grad_cores.hpp"

#include "af/error.hpp"
#include "af/tensor.hpp"

#include <algorithm>
#include <cmath>
#include <initializer_list>
#include <limits>

namespace af::grad {

namespace {

using Index = std::int64_t;

// The number of values of the sizes `dims`, each >= 1 (af::Error naming `what` otherwise, or on overflow).
Index count(const char* where, const char* what, std::initializer_list<Index> dims) {
  for (const Index d : dims) require(d >= 1, "{}: {} has a size {} (expected every size >= 1)", where, what, d);
  return Shape::numel_of(std::span<const Index>(dims.begin(), dims.size()));
}

// Throws af::Error unless the span `name` holds `expected` values.
template <class T>
void check_size(const char* where, const char* name, std::span<T> values, Index expected) {
  if (static_cast<Index>(values.size()) != expected)
    fail("{}: {} has {} values (expected {})", where, name, values.size(), expected);
}

double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }
double silu(double x) { return x * sigmoid(x); }
double silu_grad(double x) {
  const double s = sigmoid(x);
  return s * (1.0 + x * (1.0 - s));
}

void check_dims(const char* where, const SeqDims& d) {
  count(where, "SeqDims", {d.steps, d.heads, d.key_dim, d.value_dim});
}

// Sizes of the spans of a per-head mixer: [T, H, d_k], [T, H, d_v], [T, H].
struct SeqSizes {
  Index keys, values, scalars;
};
SeqSizes sizes_of(const char* where, const SeqDims& d) {
  check_dims(where, d);
  return {count(where, "q", {d.steps, d.heads, d.key_dim}), count(where, "v", {d.steps, d.heads, d.value_dim}),
          d.steps * d.heads};
}

template <class T>
void check_slopes(const char* where, std::span<const T> slopes) {
  for (const T s : slopes)
    require(std::isfinite(static_cast<double>(s)) && s >= 0, "{}: slope {} (expected >= 0 and finite)", where,
            static_cast<double>(s));
}

template <class T>
void check_log_decay(const char* where, std::span<const T> log_decay) {
  for (const T g : log_decay)
    require(g <= 0, "{}: log-decay {} (expected <= 0: a gate only forgets)", where, static_cast<double>(g));
}

}  // namespace

// [linear-attention-forward]
template <class T>
void linear_attention_forward(std::span<const T> q, std::span<const T> k, std::span<const T> v,
                              std::span<const T> slopes, const SeqDims& dims, std::span<T> out) {
  const char* where = "linear_attention_forward";
  const SeqSizes n = sizes_of(where, dims);
  check_size(where, "q", q, n.keys);
  check_size(where, "k", k, n.keys);
  check_size(where, "v", v, n.values);
  check_size(where, "slopes", slopes, dims.heads);
  check_size(where, "out", out, n.values);
  check_slopes(where, slopes);
  const Index H = dims.heads, dk = dims.key_dim, dv = dims.value_dim;
  std::vector<double> S(static_cast<std::size_t>(dk * dv));
  for (Index h = 0; h < H; ++h) {
    const double lambda = std::exp(-static_cast<double>(slopes[static_cast<std::size_t>(h)]));
    std::fill(S.begin(), S.end(), 0.0);
    for (Index t = 0; t < dims.steps; ++t) {
      const T* qt = q.data() + (t * H + h) * dk;
      const T* kt = k.data() + (t * H + h) * dk;
      const T* vt = v.data() + (t * H + h) * dv;
      for (Index c = 0; c < dk; ++c)  // S <- lambda S + k_t^T v_t
        for (Index j = 0; j < dv; ++j) {
          double& s = S[static_cast<std::size_t>(c * dv + j)];
          s = lambda * s + static_cast<double>(kt[c]) * vt[j];
        }
      T* ot = out.data() + (t * H + h) * dv;
      for (Index j = 0; j < dv; ++j) {  // o_t = q_t S
        double sum = 0;
        for (Index c = 0; c < dk; ++c) sum += static_cast<double>(qt[c]) * S[static_cast<std::size_t>(c * dv + j)];
        ot[j] = static_cast<T>(sum);
      }
    }
  }
}
// [/linear-attention-forward]

// [linear-attention-backward]
template <class T>
void linear_attention_backward(std::span<const T> q, std::span<const T> k, std::span<const T> v,
                               std::span<const T> slopes, const SeqDims& dims, std::span<const T> d_out,
                               std::span<T> d_q, std::span<T> d_k, std::span<T> d_v, std::span<T> d_slopes) {
  const char* where = "linear_attention_backward";
  const SeqSizes n = sizes_of(where, dims);
  check_size(where, "q", q, n.keys);
  check_size(where, "k", k, n.keys);
  check_size(where, "v", v, n.values);
  check_size(where, "slopes", slopes, dims.heads);
  check_size(where, "d_out", d_out, n.values);
  check_size(where, "d_q", d_q, n.keys);
  check_size(where, "d_k", d_k, n.keys);
  check_size(where, "d_v", d_v, n.values);
  if (!d_slopes.empty()) check_size(where, "d_slopes", d_slopes, dims.heads);
  check_slopes(where, slopes);
  const Index steps = dims.steps, H = dims.heads, dk = dims.key_dim, dv = dims.value_dim;
  const auto cells = static_cast<std::size_t>(dk * dv);
  std::vector<double> S(cells), R(cells), dS(cells);
  for (Index h = 0; h < H; ++h) {
    const double lambda = std::exp(-static_cast<double>(slopes[static_cast<std::size_t>(h)]));
    // Forward in time: S_t for dq_t = S_t dO_t, and R_t = dS_t/dlambda for dlambda = sum_t q_t R_t . dO_t.
    std::fill(S.begin(), S.end(), 0.0);
    std::fill(R.begin(), R.end(), 0.0);
    double d_lambda = 0;
    for (Index t = 0; t < steps; ++t) {
      const T* qt = q.data() + (t * H + h) * dk;
      const T* kt = k.data() + (t * H + h) * dk;
      const T* vt = v.data() + (t * H + h) * dv;
      const T* dout = d_out.data() + (t * H + h) * dv;
      for (Index c = 0; c < dk; ++c)
        for (Index j = 0; j < dv; ++j) {
          const auto i = static_cast<std::size_t>(c * dv + j);
          R[i] = lambda * R[i] + S[i];
          S[i] = lambda * S[i] + static_cast<double>(kt[c]) * vt[j];
        }
      T* dqt = d_q.data() + (t * H + h) * dk;
      for (Index c = 0; c < dk; ++c) {
        double sum = 0, slope_sum = 0;
        for (Index j = 0; j < dv; ++j) {
          sum += S[static_cast<std::size_t>(c * dv + j)] * dout[j];
          slope_sum += R[static_cast<std::size_t>(c * dv + j)] * dout[j];
        }
        dqt[c] += static_cast<T>(sum);
        d_lambda += slope_sum * qt[c];
      }
    }
    if (!d_slopes.empty()) d_slopes[static_cast<std::size_t>(h)] += static_cast<T>(-lambda * d_lambda);
    // Backward in time: dS_t = q_t^T dO_t + lambda dS_{t+1}; dk_t = dS_t v_t, dv_t = k_t dS_t.
    std::fill(dS.begin(), dS.end(), 0.0);
    for (Index t = steps - 1; t >= 0; --t) {
      const T* qt = q.data() + (t * H + h) * dk;
      const T* kt = k.data() + (t * H + h) * dk;
      const T* vt = v.data() + (t * H + h) * dv;
      const T* dout = d_out.data() + (t * H + h) * dv;
      for (Index c = 0; c < dk; ++c)
        for (Index j = 0; j < dv; ++j) {
          double& g = dS[static_cast<std::size_t>(c * dv + j)];
          g = lambda * g + static_cast<double>(qt[c]) * dout[j];
        }
      T* dkt = d_k.data() + (t * H + h) * dk;
      T* dvt = d_v.data() + (t * H + h) * dv;
      for (Index c = 0; c < dk; ++c) {
        double sum = 0;
        for (Index j = 0; j < dv; ++j) sum += dS[static_cast<std::size_t>(c * dv + j)] * vt[j];
        dkt[c] += static_cast<T>(sum);
      }
      for (Index j = 0; j < dv; ++j) {
        double sum = 0;
        for (Index c = 0; c < dk; ++c) sum += static_cast<double>(kt[c]) * dS[static_cast<std::size_t>(c * dv + j)];
        dvt[j] += static_cast<T>(sum);
      }
    }
  }
}
// [/linear-attention-backward]

std::int64_t delta_rule_saved_states(const SeqDims& dims) {
  check_dims("delta_rule_saved_states", dims);
  return count("delta_rule_saved_states", "states", {dims.heads, dims.steps + 1, dims.key_dim, dims.value_dim});
}

namespace {

template <class T>
void check_delta_inputs(const char* where, std::span<const T> q, std::span<const T> k, std::span<const T> v,
                        std::span<const T> log_decay, std::span<const T> beta, const SeqDims& dims) {
  const SeqSizes n = sizes_of(where, dims);
  check_size(where, "q", q, n.keys);
  check_size(where, "k", k, n.keys);
  check_size(where, "v", v, n.values);
  check_size(where, "log_decay", log_decay, n.scalars);
  check_size(where, "beta", beta, n.scalars);
  check_log_decay(where, log_decay);
}

}  // namespace

// [delta-rule-forward]
template <class T>
void delta_rule_forward(std::span<const T> q, std::span<const T> k, std::span<const T> v, std::span<const T> log_decay,
                        std::span<const T> beta, const SeqDims& dims, std::span<T> out, std::span<T> states) {
  const char* where = "delta_rule_forward";
  check_delta_inputs(where, q, k, v, log_decay, beta, dims);
  check_size(where, "out", out, dims.steps * dims.heads * dims.value_dim);
  check_size(where, "states", states, delta_rule_saved_states(dims));
  const Index steps = dims.steps, H = dims.heads, dk = dims.key_dim, dv = dims.value_dim, cells = dk * dv;
  std::vector<double> S(static_cast<std::size_t>(cells)), u(static_cast<std::size_t>(dv));
  for (Index h = 0; h < H; ++h) {
    T* saved = states.data() + h * (steps + 1) * cells;  // [T + 1, d_k, d_v]
    std::fill(S.begin(), S.end(), 0.0);
    std::fill(saved, saved + cells, T{0});
    for (Index t = 0; t < steps; ++t) {
      const T* qt = q.data() + (t * H + h) * dk;
      const T* kt = k.data() + (t * H + h) * dk;
      const T* vt = v.data() + (t * H + h) * dv;
      const double decay = std::exp(static_cast<double>(log_decay[static_cast<std::size_t>(t * H + h)]));
      const double b = beta[static_cast<std::size_t>(t * H + h)];
      for (double& s : S) s *= decay;   // S' = exp(g_t) S_{t-1}
      for (Index j = 0; j < dv; ++j) {  // u_t = beta_t (v_t - S'^T k_t)
        double r = 0;
        for (Index c = 0; c < dk; ++c) r += S[static_cast<std::size_t>(c * dv + j)] * kt[c];
        u[static_cast<std::size_t>(j)] = b * (vt[j] - r);
      }
      for (Index c = 0; c < dk; ++c)  // S_t = S' + k_t u_t^T
        for (Index j = 0; j < dv; ++j)
          S[static_cast<std::size_t>(c * dv + j)] += static_cast<double>(kt[c]) * u[static_cast<std::size_t>(j)];
      T* ot = out.data() + (t * H + h) * dv;
      for (Index j = 0; j < dv; ++j) {  // o_t = S_t^T q_t
        double sum = 0;
        for (Index c = 0; c < dk; ++c) sum += S[static_cast<std::size_t>(c * dv + j)] * qt[c];
        ot[j] = static_cast<T>(sum);
      }
      T* next = saved + (t + 1) * cells;
      for (Index i = 0; i < cells; ++i) next[i] = static_cast<T>(S[static_cast<std::size_t>(i)]);
    }
  }
}
// [/delta-rule-forward]

// [delta-rule-backward]
template <class T>
void delta_rule_backward(std::span<const T> q, std::span<const T> k, std::span<const T> v, std::span<const T> log_decay,
                         std::span<const T> beta, std::span<const T> states, const SeqDims& dims,
                         std::span<const T> d_out, std::span<T> d_q, std::span<T> d_k, std::span<T> d_v,
                         std::span<T> d_log_decay, std::span<T> d_beta) {
  const char* where = "delta_rule_backward";
  check_delta_inputs(where, q, k, v, log_decay, beta, dims);
  const SeqSizes n = sizes_of(where, dims);
  check_size(where, "states", states, delta_rule_saved_states(dims));
  check_size(where, "d_out", d_out, n.values);
  check_size(where, "d_q", d_q, n.keys);
  check_size(where, "d_k", d_k, n.keys);
  check_size(where, "d_v", d_v, n.values);
  check_size(where, "d_log_decay", d_log_decay, n.scalars);
  check_size(where, "d_beta", d_beta, n.scalars);
  const Index steps = dims.steps, H = dims.heads, dk = dims.key_dim, dv = dims.value_dim, cells = dk * dv;
  const auto at = [dv](Index c, Index j) { return static_cast<std::size_t>(c * dv + j); };
  std::vector<double> dS(static_cast<std::size_t>(cells)), r(static_cast<std::size_t>(dv)),
      du(static_cast<std::size_t>(dv)), dr(static_cast<std::size_t>(dv));
  for (Index h = 0; h < H; ++h) {
    const T* saved = states.data() + h * (steps + 1) * cells;
    std::fill(dS.begin(), dS.end(), 0.0);  // the gradient of S_t, from the steps after t
    for (Index t = steps - 1; t >= 0; --t) {
      const std::size_t th = static_cast<std::size_t>(t * H + h);
      const T* qt = q.data() + (t * H + h) * dk;
      const T* kt = k.data() + (t * H + h) * dk;
      const T* vt = v.data() + (t * H + h) * dv;
      const T* dout = d_out.data() + (t * H + h) * dv;
      const T* before = saved + t * cells;       // S_{t-1}
      const T* after = saved + (t + 1) * cells;  // S_t
      const double decay = std::exp(static_cast<double>(log_decay[th])), b = beta[th];
      // o_t = S_t^T q_t
      T* dqt = d_q.data() + (t * H + h) * dk;
      for (Index c = 0; c < dk; ++c) {
        double sum = 0;
        for (Index j = 0; j < dv; ++j) {
          sum += static_cast<double>(after[at(c, j)]) * dout[j];
          dS[at(c, j)] += static_cast<double>(qt[c]) * dout[j];
        }
        dqt[c] += static_cast<T>(sum);
      }
      // Recompute r_t = S'^T k_t and u_t = beta_t (v_t - r_t).
      for (Index j = 0; j < dv; ++j) {
        double sum = 0;
        for (Index c = 0; c < dk; ++c) sum += static_cast<double>(before[at(c, j)]) * kt[c];
        r[static_cast<std::size_t>(j)] = decay * sum;
      }
      // S_t = S' + k_t u_t^T: dk_t += dS u_t, du_t = dS^T k_t.
      T* dkt = d_k.data() + (t * H + h) * dk;
      for (Index c = 0; c < dk; ++c) {
        double sum = 0;
        for (Index j = 0; j < dv; ++j) sum += dS[at(c, j)] * b * (vt[j] - r[static_cast<std::size_t>(j)]);
        dkt[c] += static_cast<T>(sum);
      }
      for (Index j = 0; j < dv; ++j) {
        double sum = 0;
        for (Index c = 0; c < dk; ++c) sum += static_cast<double>(kt[c]) * dS[at(c, j)];
        du[static_cast<std::size_t>(j)] = sum;
      }
      // u_t = beta_t (v_t - r_t).
      T* dvt = d_v.data() + (t * H + h) * dv;
      double d_b = 0;
      for (Index j = 0; j < dv; ++j) {
        const double g = du[static_cast<std::size_t>(j)];
        d_b += g * (vt[j] - r[static_cast<std::size_t>(j)]);
        dvt[j] += static_cast<T>(b * g);
        dr[static_cast<std::size_t>(j)] = -b * g;
      }
      d_beta[th] += static_cast<T>(d_b);
      // r_t = S'^T k_t: dk_t += S' dr_t, dS' = dS + k_t dr_t^T.
      for (Index c = 0; c < dk; ++c) {
        double sum = 0;
        for (Index j = 0; j < dv; ++j) {
          sum += decay * static_cast<double>(before[at(c, j)]) * dr[static_cast<std::size_t>(j)];
          dS[at(c, j)] += static_cast<double>(kt[c]) * dr[static_cast<std::size_t>(j)];
        }
        dkt[c] += static_cast<T>(sum);
      }
      // S' = exp(g_t) S_{t-1}: dg_t = <dS', S'>, dS_{t-1} = exp(g_t) dS'.
      double d_g = 0;
      for (Index i = 0; i < cells; ++i) {
        d_g += dS[static_cast<std::size_t>(i)] * decay * static_cast<double>(before[i]);
        dS[static_cast<std::size_t>(i)] *= decay;
      }
      d_log_decay[th] += static_cast<T>(d_g);
    }
  }
}
// [/delta-rule-backward]

// [short-conv]
template <class T>
void short_conv_forward(std::span<const T> x, std::span<const T> weight, std::int64_t steps, std::int64_t channels,
                        std::int64_t kernel, std::span<T> out) {
  const char* where = "short_conv_forward";
  const Index n = count(where, "x", {steps, channels});
  check_size(where, "x", x, n);
  check_size(where, "weight", weight, count(where, "weight", {channels, kernel}));
  check_size(where, "out", out, n);
  for (Index t = 0; t < steps; ++t)
    for (Index c = 0; c < channels; ++c) {
      double sum = 0;
      for (Index i = std::max<Index>(0, kernel - 1 - t); i < kernel; ++i)  // x[t - K + 1 + i], zeros before 0
        sum += static_cast<double>(weight[static_cast<std::size_t>(c * kernel + i)]) *
               x[static_cast<std::size_t>((t - kernel + 1 + i) * channels + c)];
      out[static_cast<std::size_t>(t * channels + c)] = static_cast<T>(silu(sum));
    }
}

template <class T>
void short_conv_backward(std::span<const T> x, std::span<const T> weight, std::int64_t steps, std::int64_t channels,
                         std::int64_t kernel, std::span<const T> d_out, std::span<T> d_x, std::span<T> d_weight) {
  const char* where = "short_conv_backward";
  const Index n = count(where, "x", {steps, channels}), nw = count(where, "weight", {channels, kernel});
  check_size(where, "x", x, n);
  check_size(where, "weight", weight, nw);
  check_size(where, "d_out", d_out, n);
  check_size(where, "d_x", d_x, n);
  check_size(where, "d_weight", d_weight, nw);
  for (Index t = 0; t < steps; ++t)
    for (Index c = 0; c < channels; ++c) {
      const Index first = std::max<Index>(0, kernel - 1 - t);
      double sum = 0;
      for (Index i = first; i < kernel; ++i)
        sum += static_cast<double>(weight[static_cast<std::size_t>(c * kernel + i)]) *
               x[static_cast<std::size_t>((t - kernel + 1 + i) * channels + c)];
      const double d_sum = d_out[static_cast<std::size_t>(t * channels + c)] * silu_grad(sum);
      for (Index i = first; i < kernel; ++i) {
        const auto xi = static_cast<std::size_t>((t - kernel + 1 + i) * channels + c);
        const auto wi = static_cast<std::size_t>(c * kernel + i);
        d_weight[wi] += static_cast<T>(d_sum * x[xi]);
        d_x[xi] += static_cast<T>(d_sum * weight[wi]);
      }
    }
}
// [/short-conv]

namespace {

void check_norm_constants(const char* where, double scale, double eps) {
  require(std::isfinite(scale), "{}: scale {} (expected finite)", where, scale);
  require(std::isfinite(eps) && eps > 0, "{}: eps {} (expected > 0 and finite)", where, eps);
}

}  // namespace

// [l2norm]
template <class T>
void l2norm_forward(std::span<const T> x, std::int64_t rows, std::int64_t dim, double scale, double eps,
                    std::span<T> out) {
  const char* where = "l2norm_forward";
  const Index n = count(where, "x", {rows, dim});
  check_size(where, "x", x, n);
  check_size(where, "out", out, n);
  check_norm_constants(where, scale, eps);
  for (Index r = 0; r < rows; ++r) {
    const T* xr = x.data() + r * dim;
    double squares = 0;
    for (Index i = 0; i < dim; ++i) squares += static_cast<double>(xr[i]) * xr[i];
    const double inv = scale / std::sqrt(squares + eps);
    for (Index i = 0; i < dim; ++i) out[static_cast<std::size_t>(r * dim + i)] = static_cast<T>(xr[i] * inv);
  }
}

template <class T>
void l2norm_backward(std::span<const T> x, std::int64_t rows, std::int64_t dim, double scale, double eps,
                     std::span<const T> d_out, std::span<T> d_x) {
  const char* where = "l2norm_backward";
  const Index n = count(where, "x", {rows, dim});
  check_size(where, "x", x, n);
  check_size(where, "d_out", d_out, n);
  check_size(where, "d_x", d_x, n);
  check_norm_constants(where, scale, eps);
  for (Index r = 0; r < rows; ++r) {
    const T* xr = x.data() + r * dim;
    const T* dy = d_out.data() + r * dim;
    double squares = 0, along = 0;
    for (Index i = 0; i < dim; ++i) {
      squares += static_cast<double>(xr[i]) * xr[i];
      along += static_cast<double>(xr[i]) * dy[i];
    }
    const double norm2 = squares + eps, inv = 1.0 / std::sqrt(norm2);
    for (Index i = 0; i < dim; ++i)
      d_x[static_cast<std::size_t>(r * dim + i)] += static_cast<T>(scale * inv * (dy[i] - xr[i] * along / norm2));
  }
}
// [/l2norm]

// [gated-rms-norm]
template <class T>
void gated_rms_norm_forward(std::span<const T> o, std::span<const T> z, std::span<const T> weight, std::int64_t rows,
                            std::int64_t dim, double eps, std::span<T> out) {
  const char* where = "gated_rms_norm_forward";
  const Index n = count(where, "o", {rows, dim});
  check_size(where, "o", o, n);
  check_size(where, "z", z, n);
  check_size(where, "weight", weight, dim);
  check_size(where, "out", out, n);
  check_norm_constants(where, 1.0, eps);
  for (Index r = 0; r < rows; ++r) {
    const T* orow = o.data() + r * dim;
    const T* zr = z.data() + r * dim;
    double squares = 0;
    for (Index i = 0; i < dim; ++i) squares += static_cast<double>(orow[i]) * orow[i];
    const double inv = 1.0 / std::sqrt(squares / static_cast<double>(dim) + eps);
    for (Index i = 0; i < dim; ++i)
      out[static_cast<std::size_t>(r * dim + i)] =
          static_cast<T>(orow[i] * inv * weight[static_cast<std::size_t>(i)] * silu(zr[i]));
  }
}

template <class T>
void gated_rms_norm_backward(std::span<const T> o, std::span<const T> z, std::span<const T> weight, std::int64_t rows,
                             std::int64_t dim, double eps, std::span<const T> d_out, std::span<T> d_o, std::span<T> d_z,
                             std::span<T> d_weight) {
  const char* where = "gated_rms_norm_backward";
  const Index n = count(where, "o", {rows, dim});
  check_size(where, "o", o, n);
  check_size(where, "z", z, n);
  check_size(where, "weight", weight, dim);
  check_size(where, "d_out", d_out, n);
  check_size(where, "d_o", d_o, n);
  check_size(where, "d_z", d_z, n);
  check_size(where, "d_weight", d_weight, dim);
  check_norm_constants(where, 1.0, eps);
  std::vector<double> dn(static_cast<std::size_t>(dim));
  for (Index r = 0; r < rows; ++r) {
    const T* orow = o.data() + r * dim;
    const T* zr = z.data() + r * dim;
    const T* dy = d_out.data() + r * dim;
    double squares = 0;
    for (Index i = 0; i < dim; ++i) squares += static_cast<double>(orow[i]) * orow[i];
    const double inv = 1.0 / std::sqrt(squares / static_cast<double>(dim) + eps);
    double mean_dn_n = 0;  // mean over the row of dn * n
    for (Index i = 0; i < dim; ++i) {
      const auto ui = static_cast<std::size_t>(i);
      const double normed = orow[i] * inv, w = weight[ui], gate = silu(zr[i]);
      d_weight[ui] += static_cast<T>(dy[i] * normed * gate);
      d_z[static_cast<std::size_t>(r * dim + i)] += static_cast<T>(dy[i] * normed * w * silu_grad(zr[i]));
      dn[ui] = dy[i] * w * gate;
      mean_dn_n += dn[ui] * normed;
    }
    mean_dn_n /= static_cast<double>(dim);
    for (Index i = 0; i < dim; ++i)
      d_o[static_cast<std::size_t>(r * dim + i)] +=
          static_cast<T>(inv * (dn[static_cast<std::size_t>(i)] - orow[i] * inv * mean_dn_n));
  }
}
// [/gated-rms-norm]

// [deltanet-gates]
double softplus(double x) { return x > 20 ? x : std::log1p(std::exp(x)); }
double softplus_grad(double x) { return x > 20 ? 1.0 : sigmoid(x); }

template <class T>
void deltanet_gates_forward(std::span<const T> a, std::span<const T> b, std::span<const T> a_log,
                            std::span<const T> dt_bias, std::int64_t steps, std::int64_t heads, std::span<T> log_decay,
                            std::span<T> beta) {
  const char* where = "deltanet_gates_forward";
  const Index n = count(where, "a", {steps, heads});
  check_size(where, "a", a, n);
  check_size(where, "b", b, n);
  check_size(where, "a_log", a_log, heads);
  check_size(where, "dt_bias", dt_bias, heads);
  check_size(where, "log_decay", log_decay, n);
  check_size(where, "beta", beta, n);
  for (Index t = 0; t < steps; ++t)
    for (Index h = 0; h < heads; ++h) {
      const auto i = static_cast<std::size_t>(t * heads + h), uh = static_cast<std::size_t>(h);
      log_decay[i] = static_cast<T>(-std::exp(static_cast<double>(a_log[uh])) * softplus(a[i] + double{dt_bias[uh]}));
      beta[i] = static_cast<T>(sigmoid(b[i]));
    }
}

template <class T>
void deltanet_gates_backward(std::span<const T> a, std::span<const T> b, std::span<const T> a_log,
                             std::span<const T> dt_bias, std::int64_t steps, std::int64_t heads,
                             std::span<const T> d_log_decay, std::span<const T> d_beta, std::span<T> d_a,
                             std::span<T> d_b, std::span<T> d_a_log, std::span<T> d_dt_bias) {
  const char* where = "deltanet_gates_backward";
  const Index n = count(where, "a", {steps, heads});
  check_size(where, "a", a, n);
  check_size(where, "b", b, n);
  check_size(where, "a_log", a_log, heads);
  check_size(where, "dt_bias", dt_bias, heads);
  check_size(where, "d_log_decay", d_log_decay, n);
  check_size(where, "d_beta", d_beta, n);
  check_size(where, "d_a", d_a, n);
  check_size(where, "d_b", d_b, n);
  check_size(where, "d_a_log", d_a_log, heads);
  check_size(where, "d_dt_bias", d_dt_bias, heads);
  for (Index t = 0; t < steps; ++t)
    for (Index h = 0; h < heads; ++h) {
      const auto i = static_cast<std::size_t>(t * heads + h), uh = static_cast<std::size_t>(h);
      const double rate = std::exp(static_cast<double>(a_log[uh])), in = a[i] + double{dt_bias[uh]};
      const double dg = d_log_decay[i];
      d_a_log[uh] += static_cast<T>(dg * -rate * softplus(in));  // d(-e^A sp)/dA = -e^A sp
      const double d_in = dg * -rate * softplus_grad(in);
      d_a[i] += static_cast<T>(d_in);
      d_dt_bias[uh] += static_cast<T>(d_in);
      const double s = sigmoid(b[i]);
      d_b[i] += static_cast<T>(d_beta[i] * s * (1.0 - s));
    }
}
// [/deltanet-gates]

namespace {

struct IndexerSizes {
  Index queries, keys, weights, scores;
};

IndexerSizes sizes_of(const char* where, const IndexerDims& d) {
  count(where, "IndexerDims", {d.queries, d.keys, d.heads, d.head_dim});
  require(d.keys >= d.queries,
          "{}: {} keys for {} queries (expected keys >= queries: query t sits at keys - queries + t)", where, d.keys,
          d.queries);
  return {count(where, "q", {d.queries, d.heads, d.head_dim}), count(where, "k", {d.keys, d.head_dim}),
          d.queries * d.heads, count(where, "scores", {d.queries, d.keys})};
}

// The keys of A_t (see indexer_loss_forward) for query t, into `keys`; throws on a non-causal or repeated one.
void loss_set(const char* where, const IndexerDims& d, std::span<const std::int64_t> selected, Index top_k, Index t,
              std::vector<Index>& keys, std::vector<char>& seen) {
  keys.clear();
  const Index last = d.keys - d.queries + t;
  if (selected.empty()) {
    for (Index s = 0; s <= last; ++s) keys.push_back(s);
    return;
  }
  for (Index r = 0; r < top_k; ++r) {
    const Index s = selected[static_cast<std::size_t>(t * top_k + r)];
    if (s < 0) continue;
    require(s <= last, "{}: query {} selects key {} (expected <= {}: causal)", where, t, s, last);
    require(!seen[static_cast<std::size_t>(s)], "{}: query {} selects key {} twice", where, t, s);
    seen[static_cast<std::size_t>(s)] = 1;
    keys.push_back(s);
  }
  for (const Index s : keys) seen[static_cast<std::size_t>(s)] = 0;
}

template <class T>
void check_loss_args(const char* where, std::span<const T> scores, std::span<const T> target, const IndexerDims& d,
                     std::span<const std::int64_t> selected, Index top_k) {
  const IndexerSizes n = sizes_of(where, d);
  check_size(where, "scores", scores, n.scores);
  check_size(where, "target", target, n.scores);
  if (!selected.empty()) {
    require(top_k >= 1, "{}: top_k {} (expected >= 1 with a selection)", where, top_k);
    check_size(where, "selected", selected, d.queries * top_k);
  }
}

// log sum_{s in keys} exp(I[t, s]) of row `row`.
template <class T>
double log_sum_exp(const T* row, const std::vector<Index>& keys) {
  double top = -std::numeric_limits<double>::infinity();
  for (const Index s : keys) top = std::max(top, static_cast<double>(row[s]));
  double sum = 0;
  for (const Index s : keys) sum += std::exp(row[s] - top);
  return top + std::log(sum);
}

}  // namespace

// [indexer-scores]
template <class T>
void indexer_scores_forward(std::span<const T> q, std::span<const T> k, std::span<const T> w, const IndexerDims& dims,
                            std::span<T> scores) {
  const char* where = "indexer_scores_forward";
  const IndexerSizes n = sizes_of(where, dims);
  check_size(where, "q", q, n.queries);
  check_size(where, "k", k, n.keys);
  check_size(where, "w", w, n.weights);
  check_size(where, "scores", scores, n.scores);
  const Index H = dims.heads, d = dims.head_dim;
  for (Index t = 0; t < dims.queries; ++t)
    for (Index s = 0; s < dims.keys; ++s) {
      double total = 0;
      for (Index h = 0; h < H; ++h) {
        double dot = 0;
        for (Index e = 0; e < d; ++e)
          dot += static_cast<double>(q[static_cast<std::size_t>((t * H + h) * d + e)]) *
                 k[static_cast<std::size_t>(s * d + e)];
        total += static_cast<double>(w[static_cast<std::size_t>(t * H + h)]) * std::max(dot, 0.0);
      }
      scores[static_cast<std::size_t>(t * dims.keys + s)] = static_cast<T>(total);
    }
}

template <class T>
void indexer_scores_backward(std::span<const T> q, std::span<const T> k, std::span<const T> w, const IndexerDims& dims,
                             std::span<const T> d_scores, std::span<T> d_q, std::span<T> d_k, std::span<T> d_w) {
  const char* where = "indexer_scores_backward";
  const IndexerSizes n = sizes_of(where, dims);
  check_size(where, "q", q, n.queries);
  check_size(where, "k", k, n.keys);
  check_size(where, "w", w, n.weights);
  check_size(where, "d_scores", d_scores, n.scores);
  check_size(where, "d_q", d_q, n.queries);
  check_size(where, "d_k", d_k, n.keys);
  check_size(where, "d_w", d_w, n.weights);
  const Index H = dims.heads, d = dims.head_dim;
  for (Index t = 0; t < dims.queries; ++t)
    for (Index s = 0; s < dims.keys; ++s) {
      const double g = d_scores[static_cast<std::size_t>(t * dims.keys + s)];
      if (g == 0) continue;  // a masked key, or one the loss does not see
      const T* ks = k.data() + s * d;
      for (Index h = 0; h < H; ++h) {
        const T* qh = q.data() + (t * H + h) * d;
        double dot = 0;
        for (Index e = 0; e < d; ++e) dot += static_cast<double>(qh[e]) * ks[e];
        if (dot <= 0) continue;  // ReLU: no gradient through a negative dot product, nor into w
        d_w[static_cast<std::size_t>(t * H + h)] += static_cast<T>(g * dot);
        const double d_dot = g * w[static_cast<std::size_t>(t * H + h)];
        for (Index e = 0; e < d; ++e) {
          d_q[static_cast<std::size_t>((t * H + h) * d + e)] += static_cast<T>(d_dot * ks[e]);
          d_k[static_cast<std::size_t>(s * d + e)] += static_cast<T>(d_dot * qh[e]);
        }
      }
    }
}
// [/indexer-scores]

// [indexer-loss]
template <class T>
void indexer_target(std::span<const T> probs, std::int64_t heads, std::int64_t queries, std::int64_t keys,
                    std::span<T> target) {
  const char* where = "indexer_target";
  check_size(where, "probs", probs, count(where, "probs", {heads, queries, keys}));
  check_size(where, "target", target, queries * keys);
  for (Index t = 0; t < queries; ++t) {
    double total = 0;
    for (Index s = 0; s < keys; ++s) {
      double sum = 0;
      for (Index h = 0; h < heads; ++h) sum += probs[static_cast<std::size_t>((h * queries + t) * keys + s)];
      target[static_cast<std::size_t>(t * keys + s)] = static_cast<T>(sum);
      total += sum;
    }
    if (total > 0)
      for (Index s = 0; s < keys; ++s)
        target[static_cast<std::size_t>(t * keys + s)] =
            static_cast<T>(target[static_cast<std::size_t>(t * keys + s)] / total);
  }
}

template <class T>
double indexer_loss_forward(std::span<const T> scores, std::span<const T> target, const IndexerDims& dims,
                            std::span<const std::int64_t> selected, std::int64_t top_k) {
  const char* where = "indexer_loss_forward";
  check_loss_args(where, scores, target, dims, selected, top_k);
  std::vector<Index> keys;
  std::vector<char> seen(static_cast<std::size_t>(dims.keys), 0);
  double loss = 0;
  for (Index t = 0; t < dims.queries; ++t) {
    loss_set(where, dims, selected, top_k, t, keys, seen);
    if (keys.empty()) continue;
    const T* I = scores.data() + t * dims.keys;
    const T* p = target.data() + t * dims.keys;
    double mass = 0;
    for (const Index s : keys) mass += p[s];
    if (!(mass > 0)) continue;
    const double lse = log_sum_exp(I, keys);
    for (const Index s : keys)  // p log p - p log softmax(I), p normalised over A_t
      if (p[s] > 0) loss += p[s] / mass * (std::log(p[s] / mass) - (I[s] - lse));
  }
  return loss;
}

template <class T>
void indexer_loss_backward(std::span<const T> scores, std::span<const T> target, const IndexerDims& dims,
                           std::span<const std::int64_t> selected, std::int64_t top_k, double d_loss,
                           std::span<T> d_scores) {
  const char* where = "indexer_loss_backward";
  check_loss_args(where, scores, target, dims, selected, top_k);
  check_size(where, "d_scores", d_scores, dims.queries * dims.keys);
  std::vector<Index> keys;
  std::vector<char> seen(static_cast<std::size_t>(dims.keys), 0);
  for (Index t = 0; t < dims.queries; ++t) {
    loss_set(where, dims, selected, top_k, t, keys, seen);
    if (keys.empty()) continue;
    const T* I = scores.data() + t * dims.keys;
    const T* p = target.data() + t * dims.keys;
    T* dI = d_scores.data() + t * dims.keys;
    double mass = 0;
    for (const Index s : keys) mass += p[s];
    if (!(mass > 0)) continue;
    const double lse = log_sum_exp(I, keys);
    for (const Index s : keys) dI[s] += static_cast<T>(d_loss * (std::exp(I[s] - lse) - p[s] / mass));
  }
}
// [/indexer-loss]

// [indexer-top-k]
template <class T>
std::vector<std::int64_t> indexer_top_k(std::span<const T> scores, const IndexerDims& dims, std::int64_t top_k) {
  const char* where = "indexer_top_k";
  count(where, "IndexerDims", {dims.queries, dims.keys});
  require(dims.keys >= dims.queries, "{}: {} keys for {} queries (expected keys >= queries)", where, dims.keys,
          dims.queries);
  require(top_k >= 1, "{}: top_k {} (expected >= 1)", where, top_k);
  check_size(where, "scores", scores, dims.queries * dims.keys);
  std::vector<std::int64_t> selected(static_cast<std::size_t>(dims.queries * top_k), -1);
  std::vector<Index> order;
  for (Index t = 0; t < dims.queries; ++t) {
    const T* I = scores.data() + t * dims.keys;
    order.clear();
    for (Index s = 0; s <= dims.keys - dims.queries + t; ++s) {
      require(!std::isnan(static_cast<double>(I[s])), "{}: score of query {}, key {} is NaN", where, t, s);
      if (I[s] > -std::numeric_limits<T>::infinity()) order.push_back(s);
    }
    const auto better = [I](Index x, Index y) { return I[x] != I[y] ? I[x] > I[y] : x < y; };
    const auto keep = std::min<Index>(top_k, static_cast<Index>(order.size()));
    std::partial_sort(order.begin(), order.begin() + keep, order.end(), better);
    std::copy(order.begin(), order.begin() + keep, selected.begin() + t * top_k);
  }
  return selected;
}
// [/indexer-top-k]

#define AF_GRAD_INSTANTIATE(T)                                                                                         \
  template void linear_attention_forward<T>(std::span<const T>, std::span<const T>, std::span<const T>,                \
                                            std::span<const T>, const SeqDims&, std::span<T>);                         \
  template void linear_attention_backward<T>(std::span<const T>, std::span<const T>, std::span<const T>,               \
                                             std::span<const T>, const SeqDims&, std::span<const T>, std::span<T>,     \
                                             std::span<T>, std::span<T>, std::span<T>);                                \
  template void delta_rule_forward<T>(std::span<const T>, std::span<const T>, std::span<const T>, std::span<const T>,  \
                                      std::span<const T>, const SeqDims&, std::span<T>, std::span<T>);                 \
  template void delta_rule_backward<T>(std::span<const T>, std::span<const T>, std::span<const T>, std::span<const T>, \
                                       std::span<const T>, std::span<const T>, const SeqDims&, std::span<const T>,     \
                                       std::span<T>, std::span<T>, std::span<T>, std::span<T>, std::span<T>);          \
  template void short_conv_forward<T>(std::span<const T>, std::span<const T>, std::int64_t, std::int64_t,              \
                                      std::int64_t, std::span<T>);                                                     \
  template void short_conv_backward<T>(std::span<const T>, std::span<const T>, std::int64_t, std::int64_t,             \
                                       std::int64_t, std::span<const T>, std::span<T>, std::span<T>);                  \
  template void l2norm_forward<T>(std::span<const T>, std::int64_t, std::int64_t, double, double, std::span<T>);       \
  template void l2norm_backward<T>(std::span<const T>, std::int64_t, std::int64_t, double, double, std::span<const T>, \
                                   std::span<T>);                                                                      \
  template void gated_rms_norm_forward<T>(std::span<const T>, std::span<const T>, std::span<const T>, std::int64_t,    \
                                          std::int64_t, double, std::span<T>);                                         \
  template void gated_rms_norm_backward<T>(std::span<const T>, std::span<const T>, std::span<const T>, std::int64_t,   \
                                           std::int64_t, double, std::span<const T>, std::span<T>, std::span<T>,       \
                                           std::span<T>);                                                              \
  template void deltanet_gates_forward<T>(std::span<const T>, std::span<const T>, std::span<const T>,                  \
                                          std::span<const T>, std::int64_t, std::int64_t, std::span<T>, std::span<T>); \
  template void deltanet_gates_backward<T>(                                                                            \
      std::span<const T>, std::span<const T>, std::span<const T>, std::span<const T>, std::int64_t, std::int64_t,      \
      std::span<const T>, std::span<const T>, std::span<T>, std::span<T>, std::span<T>, std::span<T>);                 \
  template void indexer_scores_forward<T>(std::span<const T>, std::span<const T>, std::span<const T>,                  \
                                          const IndexerDims&, std::span<T>);                                           \
  template void indexer_scores_backward<T>(std::span<const T>, std::span<const T>, std::span<const T>,                 \
                                           const IndexerDims&, std::span<const T>, std::span<T>, std::span<T>,         \
                                           std::span<T>);                                                              \
  template void indexer_target<T>(std::span<const T>, std::int64_t, std::int64_t, std::int64_t, std::span<T>);         \
  template double indexer_loss_forward<T>(std::span<const T>, std::span<const T>, const IndexerDims&,                  \
                                          std::span<const std::int64_t>, std::int64_t);                                \
  template void indexer_loss_backward<T>(std::span<const T>, std::span<const T>, const IndexerDims&,                   \
                                         std::span<const std::int64_t>, std::int64_t, double, std::span<T>);           \
  template std::vector<std::int64_t> indexer_top_k<T>(std::span<const T>, const IndexerDims&, std::int64_t);

AF_GRAD_INSTANTIATE(float)
AF_GRAD_INSTANTIATE(double)

#undef AF_GRAD_INSTANTIATE

}  // namespace af::grad
