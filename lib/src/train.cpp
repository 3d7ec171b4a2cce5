#include "af/train.hpp"

#include "af/random.hpp"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <exception>
#include <limits>
#include <numbers>
#include <numeric>
#include <unordered_set>

namespace af::train {

// ---------------------------------------------------------------------------------------------------------
// Layout and initialisation
// ---------------------------------------------------------------------------------------------------------

std::size_t Layout::add(const std::string& name, std::vector<std::int64_t> shape, Init init, bool decay) {
  require(!name.empty(), "Layout::add: a parameter needs a name");
  require(!contains(name), "Layout::add: parameter '{}' is already in the layout", name);
  require(!shape.empty(), "Layout::add: parameter '{}' has an empty shape (expected at least one dimension)", name);
  std::int64_t size = 1;
  for (const std::int64_t dim : shape) {
    require(dim >= 1 && dim <= (std::int64_t{1} << 40),
            "Layout::add: parameter '{}' has dimension {} (expected 1 to 2^40)", name, dim);
    size *= dim;
    require(size <= (std::int64_t{1} << 40), "Layout::add: parameter '{}' has more than 2^40 values", name);
  }
  slices_.push_back(Slice{name, size_, std::move(shape), size, init, decay});
  size_ += size;
  return slices_.size() - 1;
}

bool Layout::contains(const std::string& name) const {
  return std::any_of(slices_.begin(), slices_.end(), [&](const Slice& s) { return s.name == name; });
}

const Slice& Layout::slice(const std::string& name) const {
  for (const Slice& s : slices_)
    if (s.name == name) return s;
  fail("Layout::slice: no parameter named '{}' (the layout has {} parameters)", name, slices_.size());
}

namespace {

// exp(x) for |x| <= 8 from basic IEEE-754 operations only (bit-identical everywhere): the Taylor series of
// exp(x / 16), then four squarings; within a few ulp of std::exp on that range.
double portable_exp_series(double x) {
  require(std::abs(x) <= 8.0, "portable_exp_series: x is {} (expected |x| <= 8)", x);
  const double r = x / 16.0;
  double term = 1.0, sum = 1.0;
  for (int n = 1; n <= 14; ++n) {
    term *= r / n;
    sum += term;
  }
  for (int i = 0; i < 4; ++i) sum *= sum;
  return sum;
}

}  // namespace

std::vector<float> initial_parameters(const Layout& layout, std::uint64_t seed, double stddev, std::int64_t layers) {
  require(stddev >= 0.0 && std::isfinite(stddev), "initial_parameters: stddev is {} (expected a finite value >= 0)",
          stddev);
  require(layers >= 1, "initial_parameters: layers is {} (expected >= 1)", layers);
  Rng rng(seed);
  std::vector<float> params(static_cast<std::size_t>(layout.size()));
  const double output_stddev = stddev / std::sqrt(2.0 * static_cast<double>(layers));
  for (const Slice& slice : layout.slices()) {
    const std::span<float> values = slice.values(std::span<float>(params));
    const double fan_in_bound = 1.0 / std::sqrt(static_cast<double>(slice.size / slice.shape[0]));
    for (float& value : values) {
      switch (slice.init) {
        case Init::normal:
          value = static_cast<float>(stddev * rng.normal());
          break;
        case Init::output_projection:
          value = static_cast<float>(output_stddev * rng.normal());
          break;
        case Init::ones:
          value = 1.0f;
          break;
        case Init::zeros:
          value = 0.0f;
          break;
        case Init::fan_in_uniform:
          value = static_cast<float>(rng.uniform(-fan_in_bound, fan_in_bound));
          break;
        case Init::log_decay_rate:
          value = static_cast<float>(portable_log(rng.uniform(0.01, 16.0)));
          break;
        case Init::time_step_bias: {
          // dt log-uniform in [0.001, 0.1], stored as the inverse of softplus: log(exp(dt) - 1).
          const double dt = portable_exp_series(rng.uniform(portable_log(0.001), portable_log(0.1)));
          value = static_cast<float>(portable_log(portable_exp_series(dt) - 1.0));
          break;
        }
      }
    }
  }
  return params;
}

// ---------------------------------------------------------------------------------------------------------
// Ops
// ---------------------------------------------------------------------------------------------------------

namespace {

template <class A, class B>
void require_same_shape(const char* op, const char* a_name, View<A> a, const char* b_name, View<B> b) {
  if (a.rows != b.rows || a.cols != b.cols)
    fail("{}: {} is [{}, {}] but {} is [{}, {}] (expected the same shape)", op, a_name, a.rows, a.cols, b_name, b.rows,
         b.cols);
}

template <class T>
T sigmoid(T x) {
  return T(1) / (T(1) + std::exp(-x));
}

}  // namespace

template <class T>
void embedding_forward(View<const T> table, std::span<const std::int32_t> tokens, View<T> out) {
  require(out.rows == static_cast<std::int64_t>(tokens.size()) && out.cols == table.cols,
          "embedding_forward: out is [{}, {}] (expected [{}, {}] for {} tokens of width {})", out.rows, out.cols,
          tokens.size(), table.cols, tokens.size(), table.cols);
  for (std::size_t t = 0; t < tokens.size(); ++t) {
    const std::int32_t token = tokens[t];
    require(token >= 0 && token < table.rows, "embedding_forward: token {} at position {} (expected 0 to {})", token, t,
            table.rows - 1);
    std::copy_n(table.row(token), table.cols, out.row(static_cast<std::int64_t>(t)));
  }
}

template <class T>
void embedding_backward(std::span<const std::int32_t> tokens, View<const T> dout, View<T> dtable) {
  require(dout.rows == static_cast<std::int64_t>(tokens.size()) && dout.cols == dtable.cols,
          "embedding_backward: dout is [{}, {}] (expected [{}, {}])", dout.rows, dout.cols, tokens.size(), dtable.cols);
  for (std::size_t t = 0; t < tokens.size(); ++t) {
    const std::int32_t token = tokens[t];
    require(token >= 0 && token < dtable.rows, "embedding_backward: token {} at position {} (expected 0 to {})", token,
            t, dtable.rows - 1);
    const T* g = dout.row(static_cast<std::int64_t>(t));
    T* d = dtable.row(token);
    for (std::int64_t c = 0; c < dtable.cols; ++c) d[c] += g[c];
  }
}

template <class T>
void rms_norm_forward(View<const T> x, std::span<const T> gain, T eps, View<T> y, std::span<T> inv_rms) {
  require_same_shape("rms_norm_forward", "x", x, "y", y);
  require(static_cast<std::int64_t>(gain.size()) == x.cols && static_cast<std::int64_t>(inv_rms.size()) == x.rows,
          "rms_norm_forward: gain has {} values and inv_rms {} (expected {} and {})", gain.size(), inv_rms.size(),
          x.cols, x.rows);
  require(eps > T(0), "rms_norm_forward: eps is {} (expected > 0)", static_cast<double>(eps));
  for (std::int64_t r = 0; r < x.rows; ++r) {
    const T* xr = x.row(r);
    T sum_sq = 0;
    for (std::int64_t c = 0; c < x.cols; ++c) sum_sq += xr[c] * xr[c];
    const T inv = T(1) / std::sqrt(sum_sq / static_cast<T>(x.cols) + eps);
    inv_rms[static_cast<std::size_t>(r)] = inv;
    T* yr = y.row(r);
    for (std::int64_t c = 0; c < x.cols; ++c) yr[c] = xr[c] * inv * gain[static_cast<std::size_t>(c)];
  }
}

template <class T>
void rms_norm_backward(View<const T> x, std::span<const T> gain, std::span<const T> inv_rms, View<const T> dy,
                       View<T> dx, std::span<T> dgain) {
  require_same_shape("rms_norm_backward", "x", x, "dy", dy);
  require_same_shape("rms_norm_backward", "x", x, "dx", dx);
  require(static_cast<std::int64_t>(gain.size()) == x.cols && static_cast<std::int64_t>(dgain.size()) == x.cols &&
              static_cast<std::int64_t>(inv_rms.size()) == x.rows,
          "rms_norm_backward: gain, dgain and inv_rms have {}, {} and {} values (expected {}, {} and {})", gain.size(),
          dgain.size(), inv_rms.size(), x.cols, x.cols, x.rows);
  for (std::int64_t r = 0; r < x.rows; ++r) {
    const T* xr = x.row(r);
    const T* dyr = dy.row(r);
    const T inv = inv_rms[static_cast<std::size_t>(r)];
    T dot = 0;  // sum of w dy x
    for (std::int64_t c = 0; c < x.cols; ++c) {
      const T wdy = gain[static_cast<std::size_t>(c)] * dyr[c];
      dot += wdy * xr[c];
      dgain[static_cast<std::size_t>(c)] += dyr[c] * xr[c] * inv;
    }
    const T correction = dot * inv * inv * inv / static_cast<T>(x.cols);
    T* dxr = dx.row(r);
    for (std::int64_t c = 0; c < x.cols; ++c)
      dxr[c] += inv * gain[static_cast<std::size_t>(c)] * dyr[c] - xr[c] * correction;
  }
}

// The inner loops carry `omp simd`: vectorised sums (a fixed lane order chosen at compile time, so results do not
// depend on the thread count), several times faster than the scalar loops GCC keeps at -O2.
template <class T>
void linear_forward(View<const T> x, View<const T> weight, View<T> y) {
  if (x.cols != weight.cols || y.rows != x.rows || y.cols != weight.rows)
    fail("linear_forward: x is [{}, {}], weight [{}, {}], y [{}, {}] (expected weight [out, {}] and y [{}, out])",
         x.rows, x.cols, weight.rows, weight.cols, y.rows, y.cols, x.cols, x.rows);
  for (std::int64_t r = 0; r < x.rows; ++r) {
    const T* xr = x.row(r);
    T* yr = y.row(r);
    for (std::int64_t o = 0; o < weight.rows; ++o) {
      const T* wo = weight.row(o);
      T sum = 0;
#pragma omp simd reduction(+ : sum)
      for (std::int64_t i = 0; i < x.cols; ++i) sum += xr[i] * wo[i];
      yr[o] = sum;
    }
  }
}

template <class T>
void linear_backward(View<const T> x, View<const T> weight, View<const T> dy, View<T> dx, View<T> dweight) {
  if (x.cols != weight.cols || dy.rows != x.rows || dy.cols != weight.rows)
    fail("linear_backward: x is [{}, {}], weight [{}, {}], dy [{}, {}] (expected weight [out, {}] and dy [{}, out])",
         x.rows, x.cols, weight.rows, weight.cols, dy.rows, dy.cols, x.cols, x.rows);
  require_same_shape("linear_backward", "x", x, "dx", dx);
  require_same_shape("linear_backward", "weight", weight, "dweight", dweight);
  for (std::int64_t r = 0; r < x.rows; ++r) {
    const T* dyr = dy.row(r);
    T* dxr = dx.row(r);
    for (std::int64_t o = 0; o < weight.rows; ++o) {
      const T g = dyr[o];
      const T* wo = weight.row(o);
#pragma omp simd
      for (std::int64_t i = 0; i < x.cols; ++i) dxr[i] += g * wo[i];
    }
  }
  for (std::int64_t o = 0; o < weight.rows; ++o) {
    T* dwo = dweight.row(o);
    for (std::int64_t r = 0; r < x.rows; ++r) {
      const T g = dy(r, o);
      const T* xr = x.row(r);
#pragma omp simd
      for (std::int64_t i = 0; i < x.cols; ++i) dwo[i] += g * xr[i];
    }
  }
}

template <class T>
void swiglu_forward(View<const T> gate, View<const T> up, View<T> hidden) {
  require_same_shape("swiglu_forward", "gate", gate, "up", up);
  require_same_shape("swiglu_forward", "gate", gate, "hidden", hidden);
  for (std::int64_t i = 0; i < gate.size(); ++i) hidden.data[i] = gate.data[i] * sigmoid(gate.data[i]) * up.data[i];
}

template <class T>
void swiglu_backward(View<const T> gate, View<const T> up, View<const T> dhidden, View<T> dgate, View<T> dup) {
  require_same_shape("swiglu_backward", "gate", gate, "up", up);
  require_same_shape("swiglu_backward", "gate", gate, "dhidden", dhidden);
  require_same_shape("swiglu_backward", "gate", gate, "dgate", dgate);
  require_same_shape("swiglu_backward", "gate", gate, "dup", dup);
  for (std::int64_t i = 0; i < gate.size(); ++i) {
    const T g = gate.data[i];
    const T s = sigmoid(g);
    dgate.data[i] += dhidden.data[i] * up.data[i] * s * (T(1) + g * (T(1) - s));
    dup.data[i] += dhidden.data[i] * g * s;
  }
}

template <class T>
void mlp_forward(View<const T> x, const MlpWeights<const T>& weights, View<T> y, MlpTape<T>& tape) {
  const std::int64_t ffn = weights.gate.rows;
  require(weights.up.rows == ffn && weights.down.cols == ffn,
          "mlp_forward: gate has {} rows, up {} and down {} columns (expected the same inner width)", ffn,
          weights.up.rows, weights.down.cols);
  const auto n = static_cast<std::size_t>(x.rows * ffn);
  tape.gate.assign(n, T(0));
  tape.up.assign(n, T(0));
  tape.hidden.assign(n, T(0));
  const View<T> gate{tape.gate.data(), x.rows, ffn}, up{tape.up.data(), x.rows, ffn},
      hidden{tape.hidden.data(), x.rows, ffn};
  linear_forward(x, weights.gate, gate);
  linear_forward(x, weights.up, up);
  swiglu_forward<T>(gate, up, hidden);
  linear_forward<T>(hidden, weights.down, y);
}

template <class T>
void mlp_backward(View<const T> x, const MlpWeights<const T>& weights, const MlpTape<T>& tape, View<const T> dy,
                  View<T> dx, const MlpWeights<T>& dweights) {
  const std::int64_t ffn = weights.gate.rows;
  require(static_cast<std::int64_t>(tape.hidden.size()) == x.rows * ffn,
          "mlp_backward: the tape holds {} hidden values (expected {} = [{}, {}])", tape.hidden.size(), x.rows * ffn,
          x.rows, ffn);
  const View<const T> gate{tape.gate.data(), x.rows, ffn}, up{tape.up.data(), x.rows, ffn},
      hidden{tape.hidden.data(), x.rows, ffn};
  std::vector<T> dhidden_values(tape.hidden.size()), dgate_values(tape.hidden.size()), dup_values(tape.hidden.size());
  const View<T> dhidden{dhidden_values.data(), x.rows, ffn}, dgate{dgate_values.data(), x.rows, ffn},
      dup{dup_values.data(), x.rows, ffn};
  linear_backward(hidden, weights.down, dy, dhidden, dweights.down);
  swiglu_backward<T>(gate, up, dhidden, dgate, dup);
  linear_backward<T>(x, weights.gate, dgate, dx, dweights.gate);
  linear_backward<T>(x, weights.up, dup, dx, dweights.up);
}

namespace {

/// Rotates every head of every row by +angle (sign 1) or -angle (sign -1); position = row index.
template <class T>
void rope_rotate(View<T> x, std::int64_t head_dim, double base, double sign, const char* op) {
  require(head_dim >= 2 && head_dim % 2 == 0, "{}: head_dim is {} (expected an even number >= 2)", op, head_dim);
  require(x.cols % head_dim == 0, "{}: rows of {} values are not whole heads of {}", op, x.cols, head_dim);
  require(base > 1.0, "{}: base is {} (expected > 1)", op, base);
  const std::int64_t half = head_dim / 2;
  std::vector<T> cosines(static_cast<std::size_t>(half)), sines(static_cast<std::size_t>(half));
  for (std::int64_t t = 0; t < x.rows; ++t) {
    for (std::int64_t i = 0; i < half; ++i) {
      const double inverse_frequency = std::pow(base, -2.0 * static_cast<double>(i) / static_cast<double>(head_dim));
      const double angle = static_cast<double>(t) * inverse_frequency;
      cosines[static_cast<std::size_t>(i)] = static_cast<T>(std::cos(angle));
      sines[static_cast<std::size_t>(i)] = static_cast<T>(sign * std::sin(angle));
    }
    for (std::int64_t head = 0; head < x.cols / head_dim; ++head) {
      T* v = x.row(t) + head * head_dim;
      for (std::int64_t i = 0; i < half; ++i) {
        const T c = cosines[static_cast<std::size_t>(i)], s = sines[static_cast<std::size_t>(i)];
        const T a = v[i], b = v[i + half];
        v[i] = a * c - b * s;
        v[i + half] = b * c + a * s;
      }
    }
  }
}

}  // namespace

template <class T>
void rope_forward(View<T> x, std::int64_t head_dim, double base) {
  rope_rotate(x, head_dim, base, 1.0, "rope_forward");
}

template <class T>
void rope_backward(View<T> dx, std::int64_t head_dim, double base) {
  rope_rotate(dx, head_dim, base, -1.0, "rope_backward");
}

namespace {

void check_attention_shape(const AttentionShape& shape, std::int64_t length, const char* op) {
  require(shape.heads >= 1 && shape.kv_heads >= 1 && shape.head_dim >= 1,
          "{}: heads {}, kv_heads {}, head_dim {} (expected each >= 1)", op, shape.heads, shape.kv_heads,
          shape.head_dim);
  require(shape.value_dim >= 0, "{}: value_dim is {} (expected >= 1, or 0 for head_dim)", op, shape.value_dim);
  require(shape.heads % shape.kv_heads == 0, "{}: heads {} is not a multiple of kv_heads {}", op, shape.heads,
          shape.kv_heads);
  require(shape.window >= 0, "{}: window is {} (expected >= 0; 0 for none)", op, shape.window);
  require(shape.allowed_keys.empty() || static_cast<std::int64_t>(shape.allowed_keys.size()) == shape.kv_heads * length,
          "{}: allowed_keys has {} lists (expected kv_heads * T = {} * {})", op, shape.allowed_keys.size(),
          shape.kv_heads, length);
}

/// The keys query i of kv group g attends to, in increasing order.
void attended_keys(const AttentionShape& shape, std::int64_t length, std::int64_t group, std::int64_t i,
                   std::vector<std::int64_t>& keys) {
  keys.clear();
  const std::int64_t first = shape.window > 0 ? std::max<std::int64_t>(0, i - shape.window + 1) : 0;
  if (shape.allowed_keys.empty()) {
    for (std::int64_t j = first; j <= i; ++j) keys.push_back(j);
  } else {
    const std::vector<std::int32_t>& allowed = shape.allowed_keys[static_cast<std::size_t>(group * length + i)];
    std::int64_t previous = -1;
    for (const std::int32_t j : allowed) {
      require(j >= 0 && j <= i, "attention: allowed key {} of query {} in kv group {} (expected 0 to {})", j, i, group,
              i);
      require(j > previous, "attention: allowed keys of query {} in kv group {} are not strictly increasing at {}", i,
              group, j);
      previous = j;
      if (j >= first) keys.push_back(j);
    }
  }
  require(!keys.empty(), "attention: query {} of kv group {} has no key to attend (window {}, {} allowed keys)", i,
          group, shape.window,
          shape.allowed_keys.empty()
              ? i + 1
              : static_cast<std::int64_t>(shape.allowed_keys[static_cast<std::size_t>(group * length + i)].size()));
}

}  // namespace

template <class T>
void attention_forward(View<const T> q, View<const T> k, View<const T> v, const AttentionShape& shape, View<T> out,
                       std::span<T> weights) {
  const std::int64_t length = q.rows;
  check_attention_shape(shape, length, "attention_forward");
  const std::int64_t d = shape.head_dim, dv = shape.value_channels(), heads = shape.heads,
                     group_size = shape.heads / shape.kv_heads;
  if (q.cols != heads * d || k.cols != shape.kv_heads * d || k.rows != length || v.rows != length ||
      v.cols != shape.kv_heads * dv || out.rows != length || out.cols != heads * dv)
    fail(
        "attention_forward: q [{}, {}], k [{}, {}], v [{}, {}], out [{}, {}] (expected q [T, {}], k [T, {}], v [T, "
        "{}], out [T, {}])",
        q.rows, q.cols, k.rows, k.cols, v.rows, v.cols, out.rows, out.cols, heads * d, shape.kv_heads * d,
        shape.kv_heads * dv, heads * dv);
  require(static_cast<std::int64_t>(weights.size()) == heads * length * length,
          "attention_forward: weights has {} values (expected heads * T * T = {})", weights.size(),
          heads * length * length);
  std::fill(weights.begin(), weights.end(), T(0));
  const T scale = T(1) / std::sqrt(static_cast<T>(d));
  std::vector<std::int64_t> keys;
  std::vector<T> scores;
  for (std::int64_t h = 0; h < heads; ++h) {
    const std::int64_t g = h / group_size;
    for (std::int64_t i = 0; i < length; ++i) {
      attended_keys(shape, length, g, i, keys);
      const T* qi = q.row(i) + h * d;
      scores.resize(keys.size());
      T max_score = -std::numeric_limits<T>::infinity();
      for (std::size_t n = 0; n < keys.size(); ++n) {
        const T* kj = k.row(keys[n]) + g * d;
        T dot = 0;
#pragma omp simd reduction(+ : dot)
        for (std::int64_t c = 0; c < d; ++c) dot += qi[c] * kj[c];
        scores[n] = dot * scale;
        max_score = std::max(max_score, scores[n]);
      }
      T total = 0;
      for (T& s : scores) {
        s = std::exp(s - max_score);
        total += s;
      }
      T* wi = weights.data() + (h * length + i) * length;
      T* oi = out.row(i) + h * dv;
      std::fill_n(oi, dv, T(0));
      for (std::size_t n = 0; n < keys.size(); ++n) {
        const T w = scores[n] / total;
        wi[keys[n]] = w;
        const T* vj = v.row(keys[n]) + g * dv;
#pragma omp simd
        for (std::int64_t c = 0; c < dv; ++c) oi[c] += w * vj[c];
      }
    }
  }
}

// [attention-backward]
template <class T>
void attention_backward(View<const T> q, View<const T> k, View<const T> v, const AttentionShape& shape,
                        std::span<const T> weights, View<const T> dout, View<T> dq, View<T> dk, View<T> dv) {
  const std::int64_t length = q.rows;
  check_attention_shape(shape, length, "attention_backward");
  const std::int64_t d = shape.head_dim, dv_head = shape.value_channels(), heads = shape.heads,
                     group_size = shape.heads / shape.kv_heads;
  if (q.cols != heads * d || k.cols != shape.kv_heads * d || k.rows != length || v.rows != length ||
      v.cols != shape.kv_heads * dv_head || dout.rows != length || dout.cols != heads * dv_head)
    fail(
        "attention_backward: q [{}, {}], k [{}, {}], v [{}, {}], dout [{}, {}] (expected q [T, {}], k [T, {}], v [T, "
        "{}], dout [T, {}])",
        q.rows, q.cols, k.rows, k.cols, v.rows, v.cols, dout.rows, dout.cols, heads * d, shape.kv_heads * d,
        shape.kv_heads * dv_head, heads * dv_head);
  require_same_shape("attention_backward", "q", q, "dq", dq);
  require_same_shape("attention_backward", "k", k, "dk", dk);
  require_same_shape("attention_backward", "v", v, "dv", dv);
  require(static_cast<std::int64_t>(weights.size()) == heads * length * length,
          "attention_backward: weights has {} values (expected heads * T * T = {})", weights.size(),
          heads * length * length);
  const T scale = T(1) / std::sqrt(static_cast<T>(d));
  std::vector<T> dweights(static_cast<std::size_t>(length));
  for (std::int64_t h = 0; h < heads; ++h) {
    const std::int64_t g = h / group_size;
    for (std::int64_t i = 0; i < length; ++i) {
      const T* wi = weights.data() + (h * length + i) * length;
      const T* doi = dout.row(i) + h * dv_head;
      // Masked keys have weight exactly 0, so they contribute nothing below.
      T weighted_sum = 0;  // sum_j P_ij dP_ij
      for (std::int64_t j = 0; j <= i; ++j) {
        if (wi[j] == T(0)) continue;
        const T* vj = v.row(j) + g * dv_head;
        T dp = 0;
#pragma omp simd reduction(+ : dp)
        for (std::int64_t c = 0; c < dv_head; ++c) dp += doi[c] * vj[c];
        dweights[static_cast<std::size_t>(j)] = dp;
        weighted_sum += wi[j] * dp;
        T* dvj = dv.row(j) + g * dv_head;
#pragma omp simd
        for (std::int64_t c = 0; c < dv_head; ++c) dvj[c] += wi[j] * doi[c];
      }
      const T* qi = q.row(i) + h * d;
      T* dqi = dq.row(i) + h * d;
      for (std::int64_t j = 0; j <= i; ++j) {
        if (wi[j] == T(0)) continue;
        const T ds = wi[j] * (dweights[static_cast<std::size_t>(j)] - weighted_sum) * scale;
        const T* kj = k.row(j) + g * d;
        T* dkj = dk.row(j) + g * d;
#pragma omp simd
        for (std::int64_t c = 0; c < d; ++c) {
          dqi[c] += ds * kj[c];
          dkj[c] += ds * qi[c];
        }
      }
    }
  }
}
// [/attention-backward]

namespace {

void check_targets(std::int64_t rows, std::int64_t vocab, std::span<const std::int32_t> targets, const char* op) {
  require(static_cast<std::int64_t>(targets.size()) == rows,
          "{}: {} targets for {} rows of logits (expected one per row)", op, targets.size(), rows);
  for (std::size_t t = 0; t < targets.size(); ++t)
    require(targets[t] < vocab,
            "{}: target {} at position {} (expected below the vocabulary size {}, or negative "
            "for not scored)",
            op, targets[t], t, vocab);
}

}  // namespace

template <class T>
double cross_entropy_forward(View<const T> logits, std::span<const std::int32_t> targets) {
  check_targets(logits.rows, logits.cols, targets, "cross_entropy_forward");
  double total = 0.0;
  for (std::int64_t t = 0; t < logits.rows; ++t) {
    const std::int32_t target = targets[static_cast<std::size_t>(t)];
    if (target < 0) continue;
    const T* row = logits.row(t);
    const double max_logit = static_cast<double>(*std::max_element(row, row + logits.cols));
    double sum = 0.0;
    for (std::int64_t c = 0; c < logits.cols; ++c) sum += std::exp(static_cast<double>(row[c]) - max_logit);
    total += max_logit + std::log(sum) - static_cast<double>(row[target]);
  }
  return total;
}

template <class T>
void cross_entropy_backward(View<const T> logits, std::span<const std::int32_t> targets, T scale, View<T> dlogits) {
  check_targets(logits.rows, logits.cols, targets, "cross_entropy_backward");
  require_same_shape("cross_entropy_backward", "logits", logits, "dlogits", dlogits);
  for (std::int64_t t = 0; t < logits.rows; ++t) {
    const std::int32_t target = targets[static_cast<std::size_t>(t)];
    if (target < 0) continue;
    const T* row = logits.row(t);
    const T max_logit = *std::max_element(row, row + logits.cols);
    T sum = 0;
    for (std::int64_t c = 0; c < logits.cols; ++c) sum += std::exp(row[c] - max_logit);
    T* drow = dlogits.row(t);
    for (std::int64_t c = 0; c < logits.cols; ++c)
      drow[c] += scale * (std::exp(row[c] - max_logit) / sum - (c == target ? T(1) : T(0)));
  }
}

// ---------------------------------------------------------------------------------------------------------
// Softmax attention as a mixer
// ---------------------------------------------------------------------------------------------------------

SoftmaxAttention::SoftmaxAttention(std::int64_t hidden, const SoftmaxAttentionOptions& options)
    : hidden_(hidden), options_(options) {
  require(hidden >= 1, "SoftmaxAttention: hidden is {} (expected >= 1)", hidden);
  require(options.heads >= 1 && options.kv_heads >= 1,
          "SoftmaxAttention: heads {} and kv_heads {} (expected each >= 1)", options.heads, options.kv_heads);
  require(options.heads % options.kv_heads == 0, "SoftmaxAttention: heads {} is not a multiple of kv_heads {}",
          options.heads, options.kv_heads);
  require(options.head_dim >= 2 && options.head_dim % 2 == 0,
          "SoftmaxAttention: head_dim is {} (expected an even number >= 2 for RoPE)", options.head_dim);
  require(options.window >= 0, "SoftmaxAttention: window is {} (expected >= 0; 0 for none)", options.window);
  require(options.rope_base > 1.0, "SoftmaxAttention: rope_base is {} (expected > 1)", options.rope_base);
}

void SoftmaxAttention::add_parameters(Layout& layout, const std::string& prefix) {
  const std::int64_t q_width = options_.heads * options_.head_dim, kv_width = options_.kv_heads * options_.head_dim;
  q_ = layout.slice(layout.add(prefix + "q_proj.weight", {q_width, hidden_}, Init::normal, true));
  k_ = layout.slice(layout.add(prefix + "k_proj.weight", {kv_width, hidden_}, Init::normal, true));
  v_ = layout.slice(layout.add(prefix + "v_proj.weight", {kv_width, hidden_}, Init::normal, true));
  o_ = layout.slice(layout.add(prefix + "o_proj.weight", {hidden_, q_width}, Init::output_projection, true));
}

std::string SoftmaxAttention::describe() const {
  return fmt::format("softmax attention, {} heads, {} kv heads, head_dim {}, window {}", options_.heads,
                     options_.kv_heads, options_.head_dim, options_.window);
}

AttentionShape SoftmaxAttention::attention_shape() const {
  return {options_.heads, options_.kv_heads, options_.head_dim, options_.window, {}, 0};
}

template <class T>
std::unique_ptr<MixerTape> SoftmaxAttention::forward_typed(std::span<const T> params, View<const T> x,
                                                           View<T> y) const {
  require(q_.size > 0, "SoftmaxAttention::forward: add_parameters was not called");
  require(x.cols == hidden_, "SoftmaxAttention::forward: x has {} columns (expected hidden = {})", x.cols, hidden_);
  require_same_shape("SoftmaxAttention::forward", "x", x, "y", y);
  const std::int64_t length = x.rows;
  auto tape = std::make_unique<Tape<T>>();
  tape->x.assign(x.data, x.data + x.size());
  tape->q.resize(static_cast<std::size_t>(length * q_.shape[0]));
  tape->k.resize(static_cast<std::size_t>(length * k_.shape[0]));
  tape->v.resize(static_cast<std::size_t>(length * v_.shape[0]));
  tape->mixed.resize(tape->q.size());
  tape->weights.resize(static_cast<std::size_t>(options_.heads * length * length));
  const View<T> q{tape->q.data(), length, q_.shape[0]}, k{tape->k.data(), length, k_.shape[0]},
      v{tape->v.data(), length, v_.shape[0]}, mixed{tape->mixed.data(), length, q_.shape[0]};
  linear_forward(x, q_.matrix(params), q);
  linear_forward(x, k_.matrix(params), k);
  linear_forward(x, v_.matrix(params), v);
  rope_forward(q, options_.head_dim, options_.rope_base);
  rope_forward(k, options_.head_dim, options_.rope_base);
  attention_forward<T>(q, k, v, attention_shape(), mixed, tape->weights);
  linear_forward<T>(mixed, o_.matrix(params), y);
  return tape;
}

template <class T>
void SoftmaxAttention::backward_typed(std::span<const T> params, const MixerTape& tape_base, View<const T> dy,
                                      View<T> dx, std::span<T> grads) const {
  const auto* tape = dynamic_cast<const Tape<T>*>(&tape_base);
  require(tape != nullptr, "SoftmaxAttention::backward: the tape is not a softmax attention tape of this type");
  const std::int64_t length = dy.rows;
  require(static_cast<std::int64_t>(tape->x.size()) == length * hidden_ && dy.cols == hidden_,
          "SoftmaxAttention::backward: dy is [{}, {}] but the tape holds {} input values", dy.rows, dy.cols,
          tape->x.size());
  require_same_shape("SoftmaxAttention::backward", "dy", dy, "dx", dx);
  const View<const T> x{tape->x.data(), length, hidden_}, q{tape->q.data(), length, q_.shape[0]},
      k{tape->k.data(), length, k_.shape[0]}, v{tape->v.data(), length, v_.shape[0]},
      mixed{tape->mixed.data(), length, q_.shape[0]};
  std::vector<T> dmixed_values(tape->mixed.size()), dq_values(tape->q.size()), dk_values(tape->k.size()),
      dv_values(tape->v.size());
  const View<T> dmixed{dmixed_values.data(), length, q_.shape[0]}, dq{dq_values.data(), length, q_.shape[0]},
      dk{dk_values.data(), length, k_.shape[0]}, dv{dv_values.data(), length, v_.shape[0]};
  linear_backward(mixed, o_.matrix(params), dy, dmixed, o_.matrix(grads));
  attention_backward<T>(q, k, v, attention_shape(), tape->weights, dmixed, dq, dk, dv);
  rope_backward(dq, options_.head_dim, options_.rope_base);
  rope_backward(dk, options_.head_dim, options_.rope_base);
  linear_backward<T>(x, q_.matrix(params), dq, dx, q_.matrix(grads));
  linear_backward<T>(x, k_.matrix(params), dk, dx, k_.matrix(grads));
  linear_backward<T>(x, v_.matrix(params), dv, dx, v_.matrix(grads));
}

// ---------------------------------------------------------------------------------------------------------
// The decoder
// ---------------------------------------------------------------------------------------------------------

namespace {

template <class T>
struct LayerTape {
  std::vector<T> input;  // [T, D], the block's input
  std::vector<T> mixer_inv_rms, mixer_normed;
  std::unique_ptr<MixerTape> mixer;
  std::vector<T> middle;  // [T, D], input + mixer output
  std::vector<T> mlp_inv_rms, mlp_normed;
  MlpTape<T> mlp;
};

std::string layer_name(std::int64_t layer, const char* rest) { return fmt::format("layers.{}.{}", layer, rest); }

}  // namespace

Model::Model(const ModelConfig& config, const std::function<std::unique_ptr<Mixer>(std::int64_t layer)>& make_mixer)
    : config_(config) {
  require(config.vocab >= 1 && config.hidden >= 1 && config.layers >= 1 && config.ffn >= 1,
          "Model: vocab {}, hidden {}, layers {}, ffn {} (expected each >= 1)", config.vocab, config.hidden,
          config.layers, config.ffn);
  require(config.rms_eps > 0.0, "Model: rms_eps is {} (expected > 0)", config.rms_eps);
  require(config.init_std >= 0.0, "Model: init_std is {} (expected >= 0)", config.init_std);
  require(static_cast<bool>(make_mixer), "Model: no mixer factory given");
  const std::int64_t d = config.hidden, ffn = config.ffn;
  embedding_ = layout_.add("embed_tokens.weight", {config.vocab, d}, Init::normal, false);
  for (std::int64_t l = 0; l < config.layers; ++l) {
    BlockSlices block;
    block.mixer_norm = layout_.add(layer_name(l, "input_layernorm.weight"), {d}, Init::ones, false);
    std::unique_ptr<Mixer> mixer = make_mixer(l);
    require(mixer != nullptr, "Model: the mixer factory returned no mixer for layer {}", l);
    mixer->add_parameters(layout_, layer_name(l, "mixer."));
    mixers_.push_back(std::move(mixer));
    block.mlp_norm = layout_.add(layer_name(l, "post_attention_layernorm.weight"), {d}, Init::ones, false);
    block.gate = layout_.add(layer_name(l, "mlp.gate_proj.weight"), {ffn, d}, Init::normal, true);
    block.up = layout_.add(layer_name(l, "mlp.up_proj.weight"), {ffn, d}, Init::normal, true);
    block.down = layout_.add(layer_name(l, "mlp.down_proj.weight"), {d, ffn}, Init::output_projection, true);
    blocks_.push_back(block);
  }
  final_norm_ = layout_.add("norm.weight", {d}, Init::ones, false);
  head_ = layout_.add("lm_head.weight", {config.vocab, d}, Init::normal, true);
}

std::vector<float> Model::initial_parameters(std::uint64_t seed) const {
  return train::initial_parameters(layout_, seed, config_.init_std, config_.layers);
}

void Model::check_sequence(const Sequence& sequence) const {
  require(!sequence.tokens.empty(), "Model: the sequence has no tokens");
  require(sequence.targets.size() == sequence.tokens.size(),
          "Model: the sequence has {} tokens but {} targets (expected one target per token)", sequence.tokens.size(),
          sequence.targets.size());
  for (std::size_t t = 0; t < sequence.tokens.size(); ++t) {
    require(sequence.tokens[t] >= 0 && sequence.tokens[t] < config_.vocab,
            "Model: token {} at position {} (expected 0 to {})", sequence.tokens[t], t, config_.vocab - 1);
    require(sequence.targets[t] < config_.vocab,
            "Model: target {} at position {} (expected below {}, or negative for not scored)", sequence.targets[t], t,
            config_.vocab);
  }
}

// [model-run]
template <class T>
double Model::run(std::span<const T> params, const Sequence& sequence, double scale, std::span<T> grads,
                  std::vector<T>* logits_out) const {
  require(static_cast<std::int64_t>(params.size()) == layout_.size(),
          "Model: the parameter vector has {} values (expected {})", params.size(), layout_.size());
  const bool backward = !grads.empty();
  require(!backward || static_cast<std::int64_t>(grads.size()) == layout_.size(),
          "Model: the gradient vector has {} values (expected {})", grads.size(), layout_.size());
  check_sequence(sequence);
  const std::int64_t length = static_cast<std::int64_t>(sequence.tokens.size()), d = config_.hidden;
  const auto n = static_cast<std::size_t>(length * d);
  const T eps = static_cast<T>(config_.rms_eps);
  const auto matrix = [&](std::vector<T>& values) { return View<T>{values.data(), length, d}; };
  const auto param = [&](std::size_t index) { return layout_.slice(index).matrix(params); };
  const auto gain = [&](std::size_t index) { return layout_.slice(index).values(params); };

  // Forward, keeping every activation the backward needs.
  std::vector<T> residual(n);
  embedding_forward(param(embedding_), sequence.tokens, matrix(residual));
  std::vector<LayerTape<T>> tapes(static_cast<std::size_t>(config_.layers));
  std::vector<T> branch(n);
  for (std::int64_t l = 0; l < config_.layers; ++l) {
    LayerTape<T>& tape = tapes[static_cast<std::size_t>(l)];
    const BlockSlices& block = blocks_[static_cast<std::size_t>(l)];
    tape.input = residual;
    tape.mixer_inv_rms.resize(static_cast<std::size_t>(length));
    tape.mixer_normed.resize(n);
    rms_norm_forward<T>(matrix(tape.input), gain(block.mixer_norm), eps, matrix(tape.mixer_normed), tape.mixer_inv_rms);
    tape.mixer = mixers_[static_cast<std::size_t>(l)]->forward(params, matrix(tape.mixer_normed), matrix(branch));
    for (std::size_t i = 0; i < n; ++i) residual[i] += branch[i];
    tape.middle = residual;
    tape.mlp_inv_rms.resize(static_cast<std::size_t>(length));
    tape.mlp_normed.resize(n);
    rms_norm_forward<T>(matrix(tape.middle), gain(block.mlp_norm), eps, matrix(tape.mlp_normed), tape.mlp_inv_rms);
    const MlpWeights<const T> mlp{param(block.gate), param(block.up), param(block.down)};
    mlp_forward<T>(matrix(tape.mlp_normed), mlp, matrix(branch), tape.mlp);
    for (std::size_t i = 0; i < n; ++i) residual[i] += branch[i];
  }
  std::vector<T> final_inv_rms(static_cast<std::size_t>(length)), final_normed(n);
  rms_norm_forward<T>(matrix(residual), gain(final_norm_), eps, matrix(final_normed), final_inv_rms);
  std::vector<T> logits(static_cast<std::size_t>(length * config_.vocab));
  const View<T> logits_view{logits.data(), length, config_.vocab};
  linear_forward<T>(matrix(final_normed), param(head_), logits_view);
  const double total_nll = cross_entropy_forward<T>(logits_view, sequence.targets);
  if (!backward) {
    if (logits_out != nullptr) *logits_out = std::move(logits);
    return total_nll;
  }

  // Backward, in reverse.
  const auto grad = [&](std::size_t index) { return layout_.slice(index).matrix(grads); };
  const auto grad_values = [&](std::size_t index) { return layout_.slice(index).values(grads); };
  std::vector<T> dlogits(logits.size());
  cross_entropy_backward<T>(logits_view, sequence.targets, static_cast<T>(scale),
                            View<T>{dlogits.data(), length, config_.vocab});
  std::vector<T> dfinal(n), dresidual(n);
  linear_backward<T>(matrix(final_normed), param(head_), View<const T>{dlogits.data(), length, config_.vocab},
                     matrix(dfinal), grad(head_));
  rms_norm_backward<T>(matrix(residual), gain(final_norm_), final_inv_rms, matrix(dfinal), matrix(dresidual),
                       grad_values(final_norm_));
  std::vector<T> dnormed(n);
  for (std::int64_t l = config_.layers - 1; l >= 0; --l) {
    const LayerTape<T>& tape = tapes[static_cast<std::size_t>(l)];
    const BlockSlices& block = blocks_[static_cast<std::size_t>(l)];
    // dresidual is the gradient of the block's output; the MLP branch adds to it the gradient of `middle`.
    std::fill(dnormed.begin(), dnormed.end(), T(0));
    const MlpWeights<const T> mlp{param(block.gate), param(block.up), param(block.down)};
    const MlpWeights<T> dmlp{grad(block.gate), grad(block.up), grad(block.down)};
    mlp_backward<T>(View<const T>{tape.mlp_normed.data(), length, d}, mlp, tape.mlp, matrix(dresidual), matrix(dnormed),
                    dmlp);
    rms_norm_backward<T>(View<const T>{tape.middle.data(), length, d}, gain(block.mlp_norm), tape.mlp_inv_rms,
                         matrix(dnormed), matrix(dresidual), grad_values(block.mlp_norm));
    // dresidual is now the gradient of `middle`; the mixer branch adds the gradient of the block's input.
    std::fill(dnormed.begin(), dnormed.end(), T(0));
    mixers_[static_cast<std::size_t>(l)]->backward(params, *tape.mixer, matrix(dresidual), matrix(dnormed), grads);
    rms_norm_backward<T>(View<const T>{tape.input.data(), length, d}, gain(block.mixer_norm), tape.mixer_inv_rms,
                         matrix(dnormed), matrix(dresidual), grad_values(block.mixer_norm));
  }
  embedding_backward<T>(sequence.tokens, matrix(dresidual), grad(embedding_));
  if (logits_out != nullptr) *logits_out = std::move(logits);
  return total_nll;
}
// [/model-run]

template <class T>
std::vector<T> Model::logits(std::span<const T> params, std::span<const std::int32_t> tokens) const {
  const Sequence sequence{{tokens.begin(), tokens.end()}, std::vector<std::int32_t>(tokens.size(), ignored_target)};
  std::vector<T> out;
  run<T>(params, sequence, 0.0, {}, &out);
  return out;
}

template <class T>
double Model::loss_and_gradient(std::span<const T> params, const Sequence& sequence, double scale,
                                std::span<T> grads) const {
  require(!grads.empty(), "Model::loss_and_gradient: the gradient vector is empty (expected {} values)",
          layout_.size());
  return run<T>(params, sequence, scale, grads, nullptr);
}

template <class T>
double Model::loss(std::span<const T> params, const Sequence& sequence) const {
  return run<T>(params, sequence, 0.0, {}, nullptr);
}

// ---------------------------------------------------------------------------------------------------------
// Optimisation
// ---------------------------------------------------------------------------------------------------------

std::int64_t scored_targets(std::span<const Sequence> batch) {
  std::int64_t count = 0;
  for (const Sequence& s : batch)
    count += std::count_if(s.targets.begin(), s.targets.end(), [](std::int32_t t) { return t >= 0; });
  return count;
}

namespace {

int thread_count(int threads) {
  require(threads >= 0, "training: threads is {} (expected >= 0; 0 for the OpenMP default)", threads);
  return threads == 0 ? omp_get_max_threads() : threads;
}

/// Runs `work(i)` for every sequence on `threads` threads; rethrows the first exception after the loop.
template <class Work>
void for_each_sequence(std::int64_t count, int threads, const Work& work) {
  std::exception_ptr error;
  const int team = thread_count(threads);
#pragma omp parallel for schedule(dynamic) num_threads(team)
  for (std::int64_t i = 0; i < count; ++i) {
    try {
      work(i);
    } catch (...) {
#pragma omp critical(af_train_error)
      if (!error) error = std::current_exception();
    }
  }
  if (error) std::rethrow_exception(error);
}

}  // namespace

double batch_gradient(const Model& model, std::span<const float> params, std::span<const Sequence> batch,
                      std::span<float> grads, int threads, std::vector<std::vector<float>>& workspace) {
  const std::int64_t size = model.layout().size();
  require(static_cast<std::int64_t>(params.size()) == size && static_cast<std::int64_t>(grads.size()) == size,
          "batch_gradient: parameters have {} and gradients {} values (expected {})", params.size(), grads.size(),
          size);
  for (const Sequence& s : batch) model.check_sequence(s);
  const std::int64_t scored = scored_targets(batch);
  require(scored > 0, "batch_gradient: the batch of {} sequences has no scored target", batch.size());
  const auto count = static_cast<std::int64_t>(batch.size());
  if (static_cast<std::int64_t>(workspace.size()) < count) workspace.resize(static_cast<std::size_t>(count));
  std::vector<double> nll(batch.size());
  const double scale = 1.0 / static_cast<double>(scored);
  for_each_sequence(count, threads, [&](std::int64_t i) {
    std::vector<float>& buffer = workspace[static_cast<std::size_t>(i)];
    buffer.assign(static_cast<std::size_t>(size), 0.0f);
    nll[static_cast<std::size_t>(i)] =
        model.loss_and_gradient<float>(params, batch[static_cast<std::size_t>(i)], scale, buffer);
  });
  // The sum over sequences in sequence order, value by value: the same on any number of threads.
  const int team = thread_count(threads);
#pragma omp parallel for schedule(static) num_threads(team)
  for (std::int64_t p = 0; p < size; ++p) {
    float sum = 0.0f;
    for (std::int64_t i = 0; i < count; ++i) sum += workspace[static_cast<std::size_t>(i)][static_cast<std::size_t>(p)];
    grads[static_cast<std::size_t>(p)] = sum;
  }
  return std::accumulate(nll.begin(), nll.end(), 0.0) / static_cast<double>(scored);
}

double batch_loss(const Model& model, std::span<const float> params, std::span<const Sequence> batch, int threads) {
  for (const Sequence& s : batch) model.check_sequence(s);
  const std::int64_t scored = scored_targets(batch);
  require(scored > 0, "batch_loss: the batch of {} sequences has no scored target", batch.size());
  std::vector<double> nll(batch.size());
  for_each_sequence(static_cast<std::int64_t>(batch.size()), threads, [&](std::int64_t i) {
    nll[static_cast<std::size_t>(i)] = model.loss<float>(params, batch[static_cast<std::size_t>(i)]);
  });
  return std::accumulate(nll.begin(), nll.end(), 0.0) / static_cast<double>(scored);
}

double clip_gradient_norm(std::span<float> grads, double max_norm) {
  require(max_norm > 0.0, "clip_gradient_norm: max_norm is {} (expected > 0)", max_norm);
  double sum_sq = 0.0;
  for (const float g : grads) sum_sq += static_cast<double>(g) * g;
  const double norm = std::sqrt(sum_sq);
  if (norm > max_norm) {
    const double factor = max_norm / norm;
    for (float& g : grads) g = static_cast<float>(g * factor);
  }
  return norm;
}

double CosineSchedule::at(std::int64_t step) const {
  require(step >= 0, "CosineSchedule: step is {} (expected >= 0)", step);
  require(warmup_steps >= 0 && total_steps > warmup_steps,
          "CosineSchedule: warmup {} and total {} steps (expected 0 <= warmup < total)", warmup_steps, total_steps);
  require(final_lr >= 0.0 && final_lr <= peak_lr,
          "CosineSchedule: final_lr {} and peak_lr {} (expected 0 <= final <= peak)", final_lr, peak_lr);
  if (step < warmup_steps) return peak_lr * static_cast<double>(step + 1) / static_cast<double>(warmup_steps);
  const double progress =
      std::min(1.0, static_cast<double>(step - warmup_steps) / static_cast<double>(total_steps - warmup_steps));
  return final_lr + (peak_lr - final_lr) * 0.5 * (1.0 + std::cos(std::numbers::pi * progress));
}

AdamW::AdamW(const Layout& layout, const AdamWConfig& config)
    : config_(config),
      m_(static_cast<std::size_t>(layout.size())),
      v_(static_cast<std::size_t>(layout.size())),
      decay_(static_cast<std::size_t>(layout.size())) {
  require(config.beta1 >= 0.0 && config.beta1 < 1.0 && config.beta2 >= 0.0 && config.beta2 < 1.0,
          "AdamW: beta1 {} and beta2 {} (expected each in [0, 1))", config.beta1, config.beta2);
  require(config.eps > 0.0, "AdamW: eps is {} (expected > 0)", config.eps);
  require(config.weight_decay >= 0.0, "AdamW: weight_decay is {} (expected >= 0)", config.weight_decay);
  for (const Slice& slice : layout.slices())
    std::fill_n(decay_.begin() + slice.offset, slice.size, static_cast<std::uint8_t>(slice.decay ? 1 : 0));
}

// [adamw]
void AdamW::step(std::span<float> params, std::span<const float> grads, double lr) {
  require(params.size() == m_.size() && grads.size() == m_.size(),
          "AdamW::step: parameters have {} and gradients {} values (expected {})", params.size(), grads.size(),
          m_.size());
  require(lr >= 0.0, "AdamW::step: lr is {} (expected >= 0)", lr);
  ++steps_;
  const double b1 = config_.beta1, b2 = config_.beta2;
  const double correction1 = 1.0 - std::pow(b1, static_cast<double>(steps_));
  const double correction2 = 1.0 - std::pow(b2, static_cast<double>(steps_));
  for (std::size_t i = 0; i < params.size(); ++i) {
    const double g = grads[i];
    const double m = b1 * m_[i] + (1.0 - b1) * g;
    const double v = b2 * v_[i] + (1.0 - b2) * g * g;
    m_[i] = static_cast<float>(m);
    v_[i] = static_cast<float>(v);
    double p = params[i];
    if (decay_[i] != 0) p *= 1.0 - lr * config_.weight_decay;
    p -= lr * (m / correction1) / (std::sqrt(v / correction2) + config_.eps);
    params[i] = static_cast<float>(p);
  }
}
// [/adamw]

Trainer::Trainer(const Model& model, std::vector<float> parameters, const TrainConfig& config)
    : model_(model),
      config_(config),
      parameters_(std::move(parameters)),
      grads_(parameters_.size()),
      optimizer_(model.layout(), config.adamw) {
  require(static_cast<std::int64_t>(parameters_.size()) == model.layout().size(),
          "Trainer: {} parameters (expected the model's {})", parameters_.size(), model.layout().size());
  require(config.clip_norm >= 0.0, "Trainer: clip_norm is {} (expected >= 0; 0 turns clipping off)", config.clip_norm);
  require(config.threads >= 0, "Trainer: threads is {} (expected >= 0)", config.threads);
  config_.schedule.at(0);  // checks the schedule's fields
}

StepStats Trainer::train_step(std::span<const Sequence> batch) {
  StepStats stats;
  stats.step = optimizer_.steps_done();
  stats.scored_targets = scored_targets(batch);
  stats.loss = batch_gradient(model_, parameters_, batch, grads_, config_.threads, workspace_);
  if (config_.clip_norm > 0.0) {
    stats.grad_norm = clip_gradient_norm(grads_, config_.clip_norm);
  } else {
    double sum_sq = 0.0;
    for (const float g : grads_) sum_sq += static_cast<double>(g) * g;
    stats.grad_norm = std::sqrt(sum_sq);
  }
  stats.lr = config_.schedule.at(stats.step);
  optimizer_.step(parameters_, grads_, stats.lr);
  return stats;
}

// ---------------------------------------------------------------------------------------------------------
// Instantiations
// ---------------------------------------------------------------------------------------------------------

#define AF_TRAIN_INSTANTIATE(T)                                                                                       \
  template void embedding_forward<T>(View<const T>, std::span<const std::int32_t>, View<T>);                          \
  template void embedding_backward<T>(std::span<const std::int32_t>, View<const T>, View<T>);                         \
  template void rms_norm_forward<T>(View<const T>, std::span<const T>, T, View<T>, std::span<T>);                     \
  template void rms_norm_backward<T>(View<const T>, std::span<const T>, std::span<const T>, View<const T>, View<T>,   \
                                     std::span<T>);                                                                   \
  template void linear_forward<T>(View<const T>, View<const T>, View<T>);                                             \
  template void linear_backward<T>(View<const T>, View<const T>, View<const T>, View<T>, View<T>);                    \
  template void swiglu_forward<T>(View<const T>, View<const T>, View<T>);                                             \
  template void swiglu_backward<T>(View<const T>, View<const T>, View<const T>, View<T>, View<T>);                    \
  template void mlp_forward<T>(View<const T>, const MlpWeights<const T>&, View<T>, MlpTape<T>&);                      \
  template void mlp_backward<T>(View<const T>, const MlpWeights<const T>&, const MlpTape<T>&, View<const T>, View<T>, \
                                const MlpWeights<T>&);                                                                \
  template void rope_forward<T>(View<T>, std::int64_t, double);                                                       \
  template void rope_backward<T>(View<T>, std::int64_t, double);                                                      \
  template void attention_forward<T>(View<const T>, View<const T>, View<const T>, const AttentionShape&, View<T>,     \
                                     std::span<T>);                                                                   \
  template void attention_backward<T>(View<const T>, View<const T>, View<const T>, const AttentionShape&,             \
                                      std::span<const T>, View<const T>, View<T>, View<T>, View<T>);                  \
  template double cross_entropy_forward<T>(View<const T>, std::span<const std::int32_t>);                             \
  template void cross_entropy_backward<T>(View<const T>, std::span<const std::int32_t>, T, View<T>);                  \
  template std::unique_ptr<MixerTape> SoftmaxAttention::forward_typed<T>(std::span<const T>, View<const T>, View<T>)  \
      const;                                                                                                          \
  template void SoftmaxAttention::backward_typed<T>(std::span<const T>, const MixerTape&, View<const T>, View<T>,     \
                                                    std::span<T>) const;                                              \
  template std::vector<T> Model::logits<T>(std::span<const T>, std::span<const std::int32_t>) const;                  \
  template double Model::loss_and_gradient<T>(std::span<const T>, const Sequence&, double, std::span<T>) const;       \
  template double Model::loss<T>(std::span<const T>, const Sequence&) const;

AF_TRAIN_INSTANTIATE(float)
AF_TRAIN_INSTANTIATE(double)

#undef AF_TRAIN_INSTANTIATE

}  // namespace af::train
