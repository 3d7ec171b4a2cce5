#include "af/train_mixers.hpp"

#include "af/grad_cores.hpp"
#include "af/linear_attention.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <limits>

namespace af::train {

namespace {

template <class T>
std::vector<T> zeros(std::int64_t count) {
  return std::vector<T>(static_cast<std::size_t>(count), T(0));
}

template <class T>
View<T> matrix(std::vector<T>& values, std::int64_t rows, std::int64_t cols) {
  return as_matrix(std::span<T>(values), rows, cols);
}

template <class T>
View<const T> cmatrix(const std::vector<T>& values, std::int64_t rows, std::int64_t cols) {
  return as_matrix(std::span<const T>(values), rows, cols);
}

template <class T>
T sigmoid(T x) {
  return T(1) / (T(1) + std::exp(-x));
}

/// Checks what every mixer's forward needs: its parameters are laid out, x has `hidden` columns, y x's shape.
template <class T>
void check_forward(const char* op, const Slice& first, std::int64_t hidden, View<const T> x, View<T> y) {
  require(first.size > 0, "{}: add_parameters was not called", op);
  require(x.cols == hidden && x.rows >= 1, "{}: x is [{}, {}] (expected [T >= 1, hidden = {}])", op, x.rows, x.cols,
          hidden);
  require(y.rows == x.rows && y.cols == x.cols, "{}: y is [{}, {}] (expected x's shape [{}, {}])", op, y.rows, y.cols,
          x.rows, x.cols);
}

/// The typed tape of a backward, and a check of dy and dx against the input the tape holds.
template <class TapeType, class T>
const TapeType& checked_tape(const char* op, const MixerTape& tape_base, std::int64_t hidden, View<const T> dy,
                             View<T> dx) {
  const auto* tape = dynamic_cast<const TapeType*>(&tape_base);
  require(tape != nullptr, "{}: the tape is not one this mixer's forward of this scalar type wrote", op);
  require(dy.cols == hidden && static_cast<std::int64_t>(tape->x.size()) == dy.rows * hidden,
          "{}: dy is [{}, {}] but the tape holds {} input values of width {}", op, dy.rows, dy.cols, tape->x.size(),
          hidden);
  require(dx.rows == dy.rows && dx.cols == dy.cols, "{}: dx is [{}, {}] (expected dy's shape [{}, {}])", op, dx.rows,
          dx.cols, dy.rows, dy.cols);
  return *tape;
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------
// Gated DeltaNet
// ---------------------------------------------------------------------------------------------------------

GatedDeltaNetMixer::GatedDeltaNetMixer(std::int64_t hidden, const GatedDeltaNetOptions& options)
    : hidden_(hidden), options_(options) {
  require(hidden >= 1, "GatedDeltaNetMixer: hidden is {} (expected >= 1)", hidden);
  require(options.key_heads >= 1 && options.value_heads >= 1 && options.key_dim >= 1 && options.value_dim >= 1 &&
              options.conv_kernel >= 1,
          "GatedDeltaNetMixer: key_heads {}, value_heads {}, key_dim {}, value_dim {}, conv_kernel {} (expected "
          "each >= 1)",
          options.key_heads, options.value_heads, options.key_dim, options.value_dim, options.conv_kernel);
  require(options.value_heads % options.key_heads == 0,
          "GatedDeltaNetMixer: value_heads {} is not a multiple of key_heads {}", options.value_heads,
          options.key_heads);
  require(options.norm_eps > 0.0 && std::isfinite(options.norm_eps),
          "GatedDeltaNetMixer: norm_eps is {} (expected a finite value > 0)", options.norm_eps);
}

std::int64_t GatedDeltaNetMixer::conv_channels() const {
  return 2 * options_.key_heads * options_.key_dim + options_.value_heads * options_.value_dim;
}

void GatedDeltaNetMixer::add_parameters(Layout& layout, const std::string& prefix) {
  const GatedDeltaNetOptions& o = options_;
  const std::int64_t projected = 2 * o.key_heads * o.key_dim + 2 * o.value_heads * o.value_dim;
  qkvz_ = layout.slice(layout.add(prefix + "in_proj_qkvz.weight", {projected, hidden_}, Init::normal, true));
  ba_ = layout.slice(layout.add(prefix + "in_proj_ba.weight", {2 * o.value_heads, hidden_}, Init::normal, true));
  conv_ =
      layout.slice(layout.add(prefix + "conv1d.weight", {conv_channels(), o.conv_kernel}, Init::fan_in_uniform, true));
  dt_bias_ = layout.slice(layout.add(prefix + "dt_bias", {o.value_heads}, Init::time_step_bias, false));
  a_log_ = layout.slice(layout.add(prefix + "A_log", {o.value_heads}, Init::log_decay_rate, false));
  norm_ = layout.slice(layout.add(prefix + "norm.weight", {o.value_dim}, Init::ones, false));
  out_ = layout.slice(
      layout.add(prefix + "out_proj.weight", {hidden_, o.value_heads * o.value_dim}, Init::output_projection, true));
}

std::string GatedDeltaNetMixer::describe() const {
  const GatedDeltaNetOptions& o = options_;
  return fmt::format(
      "gated deltanet, {} key heads, {} value heads, d_k {}, d_v {}, conv {}; state {} + conv {} values per sequence",
      o.key_heads, o.value_heads, o.key_dim, o.value_dim, o.conv_kernel, o.value_heads * o.key_dim * o.value_dim,
      (o.conv_kernel - 1) * conv_channels());
}

template <class T>
std::unique_ptr<MixerTape> GatedDeltaNetMixer::forward_typed(std::span<const T> params, View<const T> x,
                                                             View<T> y) const {
  check_forward("GatedDeltaNetMixer::forward", qkvz_, hidden_, x, y);
  const std::int64_t length = x.rows, Hk = options_.key_heads, Hv = options_.value_heads, dk = options_.key_dim,
                     dv = options_.value_dim, r = Hv / Hk, C = conv_channels(), group = 2 * dk + 2 * r * dv;
  auto tape = std::make_unique<Tape<T>>();
  tape->x.assign(x.data, x.data + x.size());
  std::vector<T> qkvz = zeros<T>(length * Hk * group), ba = zeros<T>(length * 2 * Hv);
  linear_forward(x, qkvz_.matrix(params), matrix(qkvz, length, Hk * group));
  linear_forward(x, ba_.matrix(params), matrix(ba, length, 2 * Hv));
  // Regroup the checkpoint's per-key-head layout into the convolution's channels [q all heads | k | v] and the
  // per-value-head z, b, a.
  tape->mixed = zeros<T>(length * C);
  tape->z = zeros<T>(length * Hv * dv);
  tape->a = zeros<T>(length * Hv);
  tape->b = zeros<T>(length * Hv);
  for (std::int64_t t = 0; t < length; ++t)
    for (std::int64_t g = 0; g < Hk; ++g) {
      const T* in = qkvz.data() + t * Hk * group + g * group;
      T* m = tape->mixed.data() + t * C;
      std::copy(in, in + dk, m + g * dk);
      std::copy(in + dk, in + 2 * dk, m + Hk * dk + g * dk);
      std::copy(in + 2 * dk, in + 2 * dk + r * dv, m + 2 * Hk * dk + g * r * dv);
      std::copy(in + 2 * dk + r * dv, in + group, tape->z.data() + t * Hv * dv + g * r * dv);
      for (std::int64_t j = 0; j < r; ++j) {
        tape->b[static_cast<std::size_t>(t * Hv + g * r + j)] =
            ba[static_cast<std::size_t>(t * 2 * Hv + g * 2 * r + j)];
        tape->a[static_cast<std::size_t>(t * Hv + g * r + j)] =
            ba[static_cast<std::size_t>(t * 2 * Hv + g * 2 * r + r + j)];
      }
    }
  tape->conv = zeros<T>(length * C);
  grad::short_conv_forward<T>(tape->mixed, conv_.values(params), length, C, options_.conv_kernel, tape->conv);
  // Unit q (times 1/sqrt(d_k)) and k per key head, then repeated for each value head that reads them.
  std::vector<T> q_rows = zeros<T>(length * Hk * dk), k_rows = zeros<T>(length * Hk * dk), qn = q_rows, kn = k_rows;
  for (std::int64_t t = 0; t < length; ++t) {
    const T* c = tape->conv.data() + t * C;
    std::copy(c, c + Hk * dk, q_rows.data() + t * Hk * dk);
    std::copy(c + Hk * dk, c + 2 * Hk * dk, k_rows.data() + t * Hk * dk);
  }
  const double q_scale = 1.0 / std::sqrt(static_cast<double>(dk));
  grad::l2norm_forward<T>(q_rows, length * Hk, dk, q_scale, grad::l2norm_eps, qn);
  grad::l2norm_forward<T>(k_rows, length * Hk, dk, 1.0, grad::l2norm_eps, kn);
  tape->q = zeros<T>(length * Hv * dk);
  tape->k = zeros<T>(length * Hv * dk);
  tape->v = zeros<T>(length * Hv * dv);
  for (std::int64_t t = 0; t < length; ++t)
    for (std::int64_t h = 0; h < Hv; ++h) {
      const std::int64_t row = t * Hk + h / r;
      std::copy(qn.data() + row * dk, qn.data() + (row + 1) * dk, tape->q.data() + (t * Hv + h) * dk);
      std::copy(kn.data() + row * dk, kn.data() + (row + 1) * dk, tape->k.data() + (t * Hv + h) * dk);
      const T* vs = tape->conv.data() + t * C + 2 * Hk * dk + h * dv;
      std::copy(vs, vs + dv, tape->v.data() + (t * Hv + h) * dv);
    }
  tape->log_decay = zeros<T>(length * Hv);
  tape->beta = zeros<T>(length * Hv);
  grad::deltanet_gates_forward<T>(tape->a, tape->b, a_log_.values(params), dt_bias_.values(params), length, Hv,
                                  tape->log_decay, tape->beta);
  const grad::SeqDims dims{length, Hv, dk, dv};
  tape->o = zeros<T>(length * Hv * dv);
  tape->states = zeros<T>(grad::delta_rule_saved_states(dims));
  grad::delta_rule_forward<T>(tape->q, tape->k, tape->v, tape->log_decay, tape->beta, dims, tape->o, tape->states);
  tape->normed = zeros<T>(length * Hv * dv);
  grad::gated_rms_norm_forward<T>(tape->o, tape->z, norm_.values(params), length * Hv, dv, options_.norm_eps,
                                  tape->normed);
  linear_forward<T>(cmatrix(tape->normed, length, Hv * dv), out_.matrix(params), y);
  return tape;
}

template <class T>
void GatedDeltaNetMixer::backward_typed(std::span<const T> params, const MixerTape& tape_base, View<const T> dy,
                                        View<T> dx, std::span<T> grads) const {
  const auto& tape = checked_tape<Tape<T>>("GatedDeltaNetMixer::backward", tape_base, hidden_, dy, dx);
  const std::int64_t length = dy.rows, Hk = options_.key_heads, Hv = options_.value_heads, dk = options_.key_dim,
                     dv = options_.value_dim, r = Hv / Hk, C = conv_channels(), group = 2 * dk + 2 * r * dv;
  const View<const T> x{tape.x.data(), length, hidden_};
  std::vector<T> d_normed = zeros<T>(length * Hv * dv), d_o = d_normed, d_z = d_normed;
  linear_backward<T>(cmatrix(tape.normed, length, Hv * dv), out_.matrix(params), dy, matrix(d_normed, length, Hv * dv),
                     out_.matrix(grads));
  grad::gated_rms_norm_backward<T>(tape.o, tape.z, norm_.values(params), length * Hv, dv, options_.norm_eps, d_normed,
                                   d_o, d_z, norm_.values(grads));
  const grad::SeqDims dims{length, Hv, dk, dv};
  std::vector<T> d_q = zeros<T>(length * Hv * dk), d_k = d_q, d_v = zeros<T>(length * Hv * dv),
                 d_log_decay = zeros<T>(length * Hv), d_beta = d_log_decay, d_a = d_log_decay, d_b = d_log_decay;
  grad::delta_rule_backward<T>(tape.q, tape.k, tape.v, tape.log_decay, tape.beta, tape.states, dims, d_o, d_q, d_k, d_v,
                               d_log_decay, d_beta);
  grad::deltanet_gates_backward<T>(tape.a, tape.b, a_log_.values(params), dt_bias_.values(params), length, Hv,
                                   d_log_decay, d_beta, d_a, d_b, a_log_.values(grads), dt_bias_.values(grads));
  // Value heads that share a key head sum their q and k gradients onto it; then back through the L2 norms.
  std::vector<T> d_qn = zeros<T>(length * Hk * dk), d_kn = d_qn, q_rows = d_qn, k_rows = d_qn, d_q_rows = d_qn,
                 d_k_rows = d_qn;
  for (std::int64_t t = 0; t < length; ++t) {
    const T* c = tape.conv.data() + t * C;
    std::copy(c, c + Hk * dk, q_rows.data() + t * Hk * dk);
    std::copy(c + Hk * dk, c + 2 * Hk * dk, k_rows.data() + t * Hk * dk);
    for (std::int64_t h = 0; h < Hv; ++h) {
      const std::int64_t row = t * Hk + h / r;
      for (std::int64_t i = 0; i < dk; ++i) {
        d_qn[static_cast<std::size_t>(row * dk + i)] += d_q[static_cast<std::size_t>((t * Hv + h) * dk + i)];
        d_kn[static_cast<std::size_t>(row * dk + i)] += d_k[static_cast<std::size_t>((t * Hv + h) * dk + i)];
      }
    }
  }
  const double q_scale = 1.0 / std::sqrt(static_cast<double>(dk));
  grad::l2norm_backward<T>(q_rows, length * Hk, dk, q_scale, grad::l2norm_eps, d_qn, d_q_rows);
  grad::l2norm_backward<T>(k_rows, length * Hk, dk, 1.0, grad::l2norm_eps, d_kn, d_k_rows);
  std::vector<T> d_conv = zeros<T>(length * C), d_mixed = d_conv;
  for (std::int64_t t = 0; t < length; ++t) {
    T* dc = d_conv.data() + t * C;
    std::copy(d_q_rows.data() + t * Hk * dk, d_q_rows.data() + (t + 1) * Hk * dk, dc);
    std::copy(d_k_rows.data() + t * Hk * dk, d_k_rows.data() + (t + 1) * Hk * dk, dc + Hk * dk);
    std::copy(d_v.data() + t * Hv * dv, d_v.data() + (t + 1) * Hv * dv, dc + 2 * Hk * dk);
  }
  grad::short_conv_backward<T>(tape.mixed, conv_.values(params), length, C, options_.conv_kernel, d_conv, d_mixed,
                               conv_.values(grads));
  // Back into the checkpoint's per-key-head layout.
  std::vector<T> d_qkvz = zeros<T>(length * Hk * group), d_ba = zeros<T>(length * 2 * Hv);
  for (std::int64_t t = 0; t < length; ++t)
    for (std::int64_t g = 0; g < Hk; ++g) {
      T* out = d_qkvz.data() + t * Hk * group + g * group;
      const T* m = d_mixed.data() + t * C;
      std::copy(m + g * dk, m + (g + 1) * dk, out);
      std::copy(m + Hk * dk + g * dk, m + Hk * dk + (g + 1) * dk, out + dk);
      std::copy(m + 2 * Hk * dk + g * r * dv, m + 2 * Hk * dk + (g + 1) * r * dv, out + 2 * dk);
      std::copy(d_z.data() + t * Hv * dv + g * r * dv, d_z.data() + t * Hv * dv + (g + 1) * r * dv,
                out + 2 * dk + r * dv);
      for (std::int64_t j = 0; j < r; ++j) {
        d_ba[static_cast<std::size_t>(t * 2 * Hv + g * 2 * r + j)] = d_b[static_cast<std::size_t>(t * Hv + g * r + j)];
        d_ba[static_cast<std::size_t>(t * 2 * Hv + g * 2 * r + r + j)] =
            d_a[static_cast<std::size_t>(t * Hv + g * r + j)];
      }
    }
  linear_backward<T>(x, qkvz_.matrix(params), cmatrix(d_qkvz, length, Hk * group), dx, qkvz_.matrix(grads));
  linear_backward<T>(x, ba_.matrix(params), cmatrix(d_ba, length, 2 * Hv), dx, ba_.matrix(grads));
}

// ---------------------------------------------------------------------------------------------------------
// Lightning attention
// ---------------------------------------------------------------------------------------------------------

LinearAttentionMixer::LinearAttentionMixer(std::int64_t hidden, const LinearAttentionOptions& options)
    : hidden_(hidden), options_(options) {
  require(hidden >= 1, "LinearAttentionMixer: hidden is {} (expected >= 1)", hidden);
  require(options.heads >= 1 && options.head_dim >= 1,
          "LinearAttentionMixer: heads {} and head_dim {} (expected each >= 1)", options.heads, options.head_dim);
  require(options.layers >= 1 && options.layer >= 0 && options.layer < options.layers,
          "LinearAttentionMixer: layer {} of {} (expected layers >= 1 and 0 <= layer < layers)", options.layer,
          options.layers);
  require(options.norm_eps > 0.0 && std::isfinite(options.norm_eps),
          "LinearAttentionMixer: norm_eps is {} (expected a finite value > 0)", options.norm_eps);
  slopes_ = lightning_slopes(options.heads, options.layer, options.layers);
}

void LinearAttentionMixer::add_parameters(Layout& layout, const std::string& prefix) {
  const std::int64_t width = options_.heads * options_.head_dim;
  qkv_ = layout.slice(layout.add(prefix + "qkv_proj.weight", {3 * width, hidden_}, Init::normal, true));
  gate_ = layout.slice(layout.add(prefix + "output_gate.weight", {width, hidden_}, Init::normal, true));
  norm_ = layout.slice(layout.add(prefix + "norm.weight", {width}, Init::ones, false));
  out_ = layout.slice(layout.add(prefix + "out_proj.weight", {hidden_, width}, Init::output_projection, true));
}

std::string LinearAttentionMixer::describe() const {
  return fmt::format(
      "lightning attention, {} heads, head_dim {}, slopes {:.3g} .. {:.3g}; state {} values per sequence",
      options_.heads, options_.head_dim, slopes_.front(), slopes_.back(),
      options_.heads * options_.head_dim * options_.head_dim);
}

template <class T>
std::unique_ptr<MixerTape> LinearAttentionMixer::forward_typed(std::span<const T> params, View<const T> x,
                                                               View<T> y) const {
  check_forward("LinearAttentionMixer::forward", qkv_, hidden_, x, y);
  const std::int64_t length = x.rows, H = options_.heads, d = options_.head_dim, width = H * d;
  auto tape = std::make_unique<Tape<T>>();
  tape->x.assign(x.data, x.data + x.size());
  tape->qkv = zeros<T>(length * 3 * width);
  linear_forward(x, qkv_.matrix(params), matrix(tape->qkv, length, 3 * width));
  tape->q = zeros<T>(length * width);
  tape->k = tape->q;
  tape->v = tape->q;
  for (std::int64_t t = 0; t < length; ++t)
    for (std::int64_t h = 0; h < H; ++h)
      for (std::int64_t c = 0; c < d; ++c) {
        const T* src = tape->qkv.data() + t * 3 * width + h * 3 * d + c;
        const auto at = static_cast<std::size_t>(t * width + h * d + c);
        tape->q[at] = src[0] * sigmoid(src[0]);
        tape->k[at] = src[d] * sigmoid(src[d]);
        tape->v[at] = src[2 * d] * sigmoid(src[2 * d]);
      }
  const std::vector<T> slopes(slopes_.begin(), slopes_.end());
  tape->o = zeros<T>(length * width);
  grad::linear_attention_forward<T>(tape->q, tape->k, tape->v, slopes, grad::SeqDims{length, H, d, d}, tape->o);
  tape->normed = zeros<T>(length * width);
  tape->inv_rms = zeros<T>(length);
  rms_norm_forward<T>(cmatrix(tape->o, length, width), norm_.values(params), static_cast<T>(options_.norm_eps),
                      matrix(tape->normed, length, width), tape->inv_rms);
  tape->gate = zeros<T>(length * width);
  linear_forward(x, gate_.matrix(params), matrix(tape->gate, length, width));
  tape->gated = zeros<T>(length * width);
  for (std::size_t i = 0; i < tape->gated.size(); ++i) tape->gated[i] = tape->normed[i] * sigmoid(tape->gate[i]);
  linear_forward<T>(cmatrix(tape->gated, length, width), out_.matrix(params), y);
  return tape;
}

template <class T>
void LinearAttentionMixer::backward_typed(std::span<const T> params, const MixerTape& tape_base, View<const T> dy,
                                          View<T> dx, std::span<T> grads) const {
  const auto& tape = checked_tape<Tape<T>>("LinearAttentionMixer::backward", tape_base, hidden_, dy, dx);
  const std::int64_t length = dy.rows, H = options_.heads, d = options_.head_dim, width = H * d;
  const View<const T> x{tape.x.data(), length, hidden_};
  std::vector<T> d_gated = zeros<T>(length * width), d_normed = d_gated, d_gate = d_gated, d_o = d_gated;
  linear_backward<T>(cmatrix(tape.gated, length, width), out_.matrix(params), dy, matrix(d_gated, length, width),
                     out_.matrix(grads));
  for (std::size_t i = 0; i < d_gated.size(); ++i) {
    const T s = sigmoid(tape.gate[i]);
    d_normed[i] = d_gated[i] * s;
    d_gate[i] = d_gated[i] * tape.normed[i] * s * (T(1) - s);
  }
  linear_backward<T>(x, gate_.matrix(params), cmatrix(d_gate, length, width), dx, gate_.matrix(grads));
  rms_norm_backward<T>(cmatrix(tape.o, length, width), norm_.values(params), tape.inv_rms,
                       cmatrix(d_normed, length, width), matrix(d_o, length, width), norm_.values(grads));
  const std::vector<T> slopes(slopes_.begin(), slopes_.end());
  std::vector<T> d_q = zeros<T>(length * width), d_k = d_q, d_v = d_q;
  grad::linear_attention_backward<T>(tape.q, tape.k, tape.v, slopes, grad::SeqDims{length, H, d, d}, d_o, d_q, d_k, d_v,
                                     {});
  std::vector<T> d_qkv = zeros<T>(length * 3 * width);
  for (std::int64_t t = 0; t < length; ++t)
    for (std::int64_t h = 0; h < H; ++h)
      for (std::int64_t c = 0; c < d; ++c) {
        const std::int64_t at = t * width + h * d + c, src = t * 3 * width + h * 3 * d + c;
        const std::int64_t from[3] = {src, src + d, src + 2 * d};
        const T upstream[3] = {d_q[static_cast<std::size_t>(at)], d_k[static_cast<std::size_t>(at)],
                               d_v[static_cast<std::size_t>(at)]};
        for (int part = 0; part < 3; ++part) {
          const T p = tape.qkv[static_cast<std::size_t>(from[part])];
          const T s = sigmoid(p);
          d_qkv[static_cast<std::size_t>(from[part])] = upstream[part] * s * (T(1) + p * (T(1) - s));
        }
      }
  linear_backward<T>(x, qkv_.matrix(params), cmatrix(d_qkv, length, 3 * width), dx, qkv_.matrix(grads));
}

// ---------------------------------------------------------------------------------------------------------
// Multi-head latent attention
// ---------------------------------------------------------------------------------------------------------

MlaMixer::MlaMixer(std::int64_t hidden, const MlaOptions& options) : hidden_(hidden), options_(options) {
  require(hidden >= 1, "MlaMixer: hidden is {} (expected >= 1)", hidden);
  require(options.heads >= 1 && options.nope_dim >= 1 && options.value_dim >= 1 && options.kv_rank >= 1,
          "MlaMixer: heads {}, nope_dim {}, value_dim {}, kv_rank {} (expected each >= 1)", options.heads,
          options.nope_dim, options.value_dim, options.kv_rank);
  require(options.rope_dim >= 2 && options.rope_dim % 2 == 0, "MlaMixer: rope_dim is {} (expected an even number >= 2)",
          options.rope_dim);
  require(options.rope_base > 1.0, "MlaMixer: rope_base is {} (expected > 1)", options.rope_base);
  require(options.norm_eps > 0.0 && std::isfinite(options.norm_eps),
          "MlaMixer: norm_eps is {} (expected a finite value > 0)", options.norm_eps);
}

void MlaMixer::add_parameters(Layout& layout, const std::string& prefix) {
  const MlaOptions& o = options_;
  const std::int64_t qk = o.nope_dim + o.rope_dim;
  q_ = layout.slice(layout.add(prefix + "q_proj.weight", {o.heads * qk, hidden_}, Init::normal, true));
  kv_a_ = layout.slice(
      layout.add(prefix + "kv_a_proj_with_mqa.weight", {o.kv_rank + o.rope_dim, hidden_}, Init::normal, true));
  kv_norm_ = layout.slice(layout.add(prefix + "kv_a_layernorm.weight", {o.kv_rank}, Init::ones, false));
  kv_b_ = layout.slice(
      layout.add(prefix + "kv_b_proj.weight", {o.heads * (o.nope_dim + o.value_dim), o.kv_rank}, Init::normal, true));
  o_ = layout.slice(
      layout.add(prefix + "o_proj.weight", {hidden_, o.heads * o.value_dim}, Init::output_projection, true));
}

std::string MlaMixer::describe() const {
  const MlaOptions& o = options_;
  return fmt::format("MLA, {} heads, d_n {}, d_r {}, d_v {}, latent {}; cache {} values per token (MHA: {})", o.heads,
                     o.nope_dim, o.rope_dim, o.value_dim, o.kv_rank, o.kv_rank + o.rope_dim,
                     o.heads * (o.nope_dim + o.rope_dim + o.value_dim));
}

AttentionShape MlaMixer::attention_shape() const {
  return {options_.heads, options_.heads, options_.nope_dim + options_.rope_dim, 0, {}, options_.value_dim};
}

template <class T>
std::unique_ptr<MixerTape> MlaMixer::forward_typed(std::span<const T> params, View<const T> x, View<T> y) const {
  check_forward("MlaMixer::forward", q_, hidden_, x, y);
  const std::int64_t length = x.rows, H = options_.heads, dn = options_.nope_dim, dr = options_.rope_dim,
                     dv = options_.value_dim, r = options_.kv_rank, dq = dn + dr;
  auto tape = std::make_unique<Tape<T>>();
  tape->x.assign(x.data, x.data + x.size());
  // Queries, each head [q_nope | q_rope] with q_rope rotated.
  tape->q = zeros<T>(length * H * dq);
  linear_forward(x, q_.matrix(params), matrix(tape->q, length, H * dq));
  std::vector<T> q_rope = zeros<T>(length * H * dr);
  for (std::int64_t t = 0; t < length; ++t)
    for (std::int64_t h = 0; h < H; ++h)
      std::copy_n(tape->q.data() + t * H * dq + h * dq + dn, dr, q_rope.data() + (t * H + h) * dr);
  rope_forward(matrix(q_rope, length, H * dr), dr, options_.rope_base);
  for (std::int64_t t = 0; t < length; ++t)
    for (std::int64_t h = 0; h < H; ++h)
      std::copy_n(q_rope.data() + (t * H + h) * dr, dr, tape->q.data() + t * H * dq + h * dq + dn);
  // The latent (normalised) and the shared rope key (rotated): what an inference cache keeps.
  std::vector<T> kv_a = zeros<T>(length * (r + dr)), k_rope = zeros<T>(length * dr);
  linear_forward(x, kv_a_.matrix(params), matrix(kv_a, length, r + dr));
  tape->latent = zeros<T>(length * r);
  for (std::int64_t t = 0; t < length; ++t) {
    std::copy_n(kv_a.data() + t * (r + dr), r, tape->latent.data() + t * r);
    std::copy_n(kv_a.data() + t * (r + dr) + r, dr, k_rope.data() + t * dr);
  }
  rope_forward(matrix(k_rope, length, dr), dr, options_.rope_base);
  tape->latent_normed = zeros<T>(length * r);
  tape->inv_rms = zeros<T>(length);
  rms_norm_forward<T>(cmatrix(tape->latent, length, r), kv_norm_.values(params), static_cast<T>(options_.norm_eps),
                      matrix(tape->latent_normed, length, r), tape->inv_rms);
  // Per-head keys [k_nope_h | k_rope] and values from the latent.
  std::vector<T> kv_b = zeros<T>(length * H * (dn + dv));
  linear_forward<T>(cmatrix(tape->latent_normed, length, r), kv_b_.matrix(params), matrix(kv_b, length, H * (dn + dv)));
  tape->keys = zeros<T>(length * H * dq);
  tape->values = zeros<T>(length * H * dv);
  for (std::int64_t t = 0; t < length; ++t)
    for (std::int64_t h = 0; h < H; ++h) {
      const T* up = kv_b.data() + t * H * (dn + dv) + h * (dn + dv);
      T* key = tape->keys.data() + t * H * dq + h * dq;
      std::copy_n(up, dn, key);
      std::copy_n(k_rope.data() + t * dr, dr, key + dn);
      std::copy_n(up + dn, dv, tape->values.data() + t * H * dv + h * dv);
    }
  tape->weights = zeros<T>(H * length * length);
  tape->mixed = zeros<T>(length * H * dv);
  attention_forward<T>(cmatrix(tape->q, length, H * dq), cmatrix(tape->keys, length, H * dq),
                       cmatrix(tape->values, length, H * dv), attention_shape(), matrix(tape->mixed, length, H * dv),
                       tape->weights);
  linear_forward<T>(cmatrix(tape->mixed, length, H * dv), o_.matrix(params), y);
  return tape;
}

template <class T>
void MlaMixer::backward_typed(std::span<const T> params, const MixerTape& tape_base, View<const T> dy, View<T> dx,
                              std::span<T> grads) const {
  const auto& tape = checked_tape<Tape<T>>("MlaMixer::backward", tape_base, hidden_, dy, dx);
  const std::int64_t length = dy.rows, H = options_.heads, dn = options_.nope_dim, dr = options_.rope_dim,
                     dv = options_.value_dim, r = options_.kv_rank, dq = dn + dr;
  const View<const T> x{tape.x.data(), length, hidden_};
  std::vector<T> d_mixed = zeros<T>(length * H * dv), d_q = zeros<T>(length * H * dq), d_keys = d_q, d_values = d_mixed;
  linear_backward<T>(cmatrix(tape.mixed, length, H * dv), o_.matrix(params), dy, matrix(d_mixed, length, H * dv),
                     o_.matrix(grads));
  attention_backward<T>(cmatrix(tape.q, length, H * dq), cmatrix(tape.keys, length, H * dq),
                        cmatrix(tape.values, length, H * dv), attention_shape(), tape.weights,
                        cmatrix(d_mixed, length, H * dv), matrix(d_q, length, H * dq), matrix(d_keys, length, H * dq),
                        matrix(d_values, length, H * dv));
  // Keys and values back to the up-projection's output; the shared rope key sums over the heads.
  std::vector<T> d_kv_b = zeros<T>(length * H * (dn + dv)), d_k_rope = zeros<T>(length * dr);
  for (std::int64_t t = 0; t < length; ++t)
    for (std::int64_t h = 0; h < H; ++h) {
      T* up = d_kv_b.data() + t * H * (dn + dv) + h * (dn + dv);
      const T* key = d_keys.data() + t * H * dq + h * dq;
      std::copy_n(key, dn, up);
      std::copy_n(d_values.data() + t * H * dv + h * dv, dv, up + dn);
      for (std::int64_t c = 0; c < dr; ++c) d_k_rope[static_cast<std::size_t>(t * dr + c)] += key[dn + c];
    }
  rope_backward(matrix(d_k_rope, length, dr), dr, options_.rope_base);
  std::vector<T> d_latent_normed = zeros<T>(length * r), d_latent = zeros<T>(length * r);
  linear_backward<T>(cmatrix(tape.latent_normed, length, r), kv_b_.matrix(params),
                     cmatrix(d_kv_b, length, H * (dn + dv)), matrix(d_latent_normed, length, r), kv_b_.matrix(grads));
  rms_norm_backward<T>(cmatrix(tape.latent, length, r), kv_norm_.values(params), tape.inv_rms,
                       cmatrix(d_latent_normed, length, r), matrix(d_latent, length, r), kv_norm_.values(grads));
  std::vector<T> d_kv_a = zeros<T>(length * (r + dr));
  for (std::int64_t t = 0; t < length; ++t) {
    std::copy_n(d_latent.data() + t * r, r, d_kv_a.data() + t * (r + dr));
    std::copy_n(d_k_rope.data() + t * dr, dr, d_kv_a.data() + t * (r + dr) + r);
  }
  linear_backward<T>(x, kv_a_.matrix(params), cmatrix(d_kv_a, length, r + dr), dx, kv_a_.matrix(grads));
  // The queries' rope parts back through the rotation.
  std::vector<T> d_q_rope = zeros<T>(length * H * dr);
  for (std::int64_t t = 0; t < length; ++t)
    for (std::int64_t h = 0; h < H; ++h)
      std::copy_n(d_q.data() + t * H * dq + h * dq + dn, dr, d_q_rope.data() + (t * H + h) * dr);
  rope_backward(matrix(d_q_rope, length, H * dr), dr, options_.rope_base);
  for (std::int64_t t = 0; t < length; ++t)
    for (std::int64_t h = 0; h < H; ++h)
      std::copy_n(d_q_rope.data() + (t * H + h) * dr, dr, d_q.data() + t * H * dq + h * dq + dn);
  linear_backward<T>(x, q_.matrix(params), cmatrix(d_q, length, H * dq), dx, q_.matrix(grads));
}

// ---------------------------------------------------------------------------------------------------------
// DeepSeek sparse attention
// ---------------------------------------------------------------------------------------------------------

DsaMixer::DsaMixer(std::int64_t hidden, const DsaOptions& options) : hidden_(hidden), options_(options) {
  require(hidden >= 1, "DsaMixer: hidden is {} (expected >= 1)", hidden);
  require(options.heads >= 1 && options.kv_heads >= 1, "DsaMixer: heads {} and kv_heads {} (expected each >= 1)",
          options.heads, options.kv_heads);
  require(options.heads % options.kv_heads == 0, "DsaMixer: heads {} is not a multiple of kv_heads {}", options.heads,
          options.kv_heads);
  require(options.head_dim >= 2 && options.head_dim % 2 == 0,
          "DsaMixer: head_dim is {} (expected an even number >= 2 for RoPE)", options.head_dim);
  require(options.rope_base > 1.0, "DsaMixer: rope_base is {} (expected > 1)", options.rope_base);
  require(options.index_heads >= 1 && options.index_dim >= 1 && options.top_k >= 1,
          "DsaMixer: index_heads {}, index_dim {}, top_k {} (expected each >= 1)", options.index_heads,
          options.index_dim, options.top_k);
  require(options.indexer_loss_weight >= 0.0 && std::isfinite(options.indexer_loss_weight),
          "DsaMixer: indexer_loss_weight is {} (expected a finite value >= 0)", options.indexer_loss_weight);
}

void DsaMixer::add_parameters(Layout& layout, const std::string& prefix) {
  const DsaOptions& o = options_;
  const std::int64_t q_width = o.heads * o.head_dim, kv_width = o.kv_heads * o.head_dim;
  q_ = layout.slice(layout.add(prefix + "q_proj.weight", {q_width, hidden_}, Init::normal, true));
  k_ = layout.slice(layout.add(prefix + "k_proj.weight", {kv_width, hidden_}, Init::normal, true));
  v_ = layout.slice(layout.add(prefix + "v_proj.weight", {kv_width, hidden_}, Init::normal, true));
  o_ = layout.slice(layout.add(prefix + "o_proj.weight", {hidden_, q_width}, Init::output_projection, true));
  index_q_ = layout.slice(
      layout.add(prefix + "indexer.wq.weight", {o.index_heads * o.index_dim, hidden_}, Init::normal, true));
  index_k_ = layout.slice(layout.add(prefix + "indexer.wk.weight", {o.index_dim, hidden_}, Init::normal, true));
  index_w_ =
      layout.slice(layout.add(prefix + "indexer.weights_proj.weight", {o.index_heads, hidden_}, Init::normal, true));
}

std::string DsaMixer::describe() const {
  const DsaOptions& o = options_;
  return fmt::format("DSA, {} heads, {} kv heads, head_dim {}, top-k {}; indexer {} heads of {}, loss weight {}",
                     o.heads, o.kv_heads, o.head_dim, o.top_k, o.index_heads, o.index_dim, o.indexer_loss_weight);
}

template <class T>
std::unique_ptr<MixerTape> DsaMixer::forward_typed(std::span<const T> params, View<const T> x, View<T> y) const {
  check_forward("DsaMixer::forward", q_, hidden_, x, y);
  const DsaOptions& o = options_;
  const std::int64_t length = x.rows, q_width = o.heads * o.head_dim, kv_width = o.kv_heads * o.head_dim,
                     Hi = o.index_heads, di = o.index_dim;
  auto tape = std::make_unique<Tape<T>>();
  tape->x.assign(x.data, x.data + x.size());
  // The lightning indexer's scores and each query's top-k keys.
  tape->index_q = zeros<T>(length * Hi * di);
  tape->index_k = zeros<T>(length * di);
  tape->index_w = zeros<T>(length * Hi);
  linear_forward(x, index_q_.matrix(params), matrix(tape->index_q, length, Hi * di));
  linear_forward(x, index_k_.matrix(params), matrix(tape->index_k, length, di));
  linear_forward(x, index_w_.matrix(params), matrix(tape->index_w, length, Hi));
  const T weight_scale = static_cast<T>(1.0 / std::sqrt(static_cast<double>(Hi * di)));
  for (T& w : tape->index_w) w *= weight_scale;
  const grad::IndexerDims index_dims{length, length, Hi, di};
  tape->index_scores = zeros<T>(length * length);
  grad::indexer_scores_forward<T>(tape->index_q, tape->index_k, tape->index_w, index_dims, tape->index_scores);
  tape->top_k = std::min(o.top_k, length);
  tape->selected = grad::indexer_top_k<T>(tape->index_scores, index_dims, tape->top_k);
  tape->allowed_keys.resize(static_cast<std::size_t>(o.kv_heads * length));
  for (std::int64_t t = 0; t < length; ++t) {
    std::vector<std::int32_t> keys;
    for (std::int64_t n = 0; n < tape->top_k; ++n) {
      const std::int64_t s = tape->selected[static_cast<std::size_t>(t * tape->top_k + n)];
      if (s >= 0) keys.push_back(static_cast<std::int32_t>(s));
    }
    std::sort(keys.begin(), keys.end());
    for (std::int64_t g = 0; g < o.kv_heads; ++g) tape->allowed_keys[static_cast<std::size_t>(g * length + t)] = keys;
  }
  // Softmax attention over the selected keys.
  tape->q = zeros<T>(length * q_width);
  tape->k = zeros<T>(length * kv_width);
  tape->v = zeros<T>(length * kv_width);
  tape->mixed = zeros<T>(length * q_width);
  tape->weights = zeros<T>(o.heads * length * length);
  const View<T> q = matrix(tape->q, length, q_width), k = matrix(tape->k, length, kv_width),
                v = matrix(tape->v, length, kv_width);
  linear_forward(x, q_.matrix(params), q);
  linear_forward(x, k_.matrix(params), k);
  linear_forward(x, v_.matrix(params), v);
  rope_forward(q, o.head_dim, o.rope_base);
  rope_forward(k, o.head_dim, o.rope_base);
  const AttentionShape sparse{o.heads, o.kv_heads, o.head_dim, 0, tape->allowed_keys, 0};
  attention_forward<T>(q, k, v, sparse, matrix(tape->mixed, length, q_width), tape->weights);
  linear_forward<T>(cmatrix(tape->mixed, length, q_width), o_.matrix(params), y);
  // The indexer's target: the dense attention distribution, summed over heads and L1-normalised (detached).
  std::vector<T> dense_weights = zeros<T>(o.heads * length * length), dense_out = zeros<T>(length * q_width);
  const AttentionShape dense{o.heads, o.kv_heads, o.head_dim, 0, {}, 0};
  attention_forward<T>(q, k, v, dense, matrix(dense_out, length, q_width), dense_weights);
  tape->target = zeros<T>(length * length);
  grad::indexer_target<T>(dense_weights, o.heads, length, length, tape->target);
  tape->indexer_loss =
      grad::indexer_loss_forward<T>(tape->index_scores, tape->target, index_dims, tape->selected, tape->top_k) /
      static_cast<double>(length);
  return tape;
}

template <class T>
void DsaMixer::backward_typed(std::span<const T> params, const MixerTape& tape_base, View<const T> dy, View<T> dx,
                              std::span<T> grads) const {
  const auto& tape = checked_tape<Tape<T>>("DsaMixer::backward", tape_base, hidden_, dy, dx);
  const DsaOptions& o = options_;
  const std::int64_t length = dy.rows, q_width = o.heads * o.head_dim, kv_width = o.kv_heads * o.head_dim,
                     Hi = o.index_heads, di = o.index_dim;
  const View<const T> x{tape.x.data(), length, hidden_};
  // The main path, as SoftmaxAttention's backward under the selection.
  std::vector<T> d_mixed = zeros<T>(length * q_width), d_q = d_mixed, d_k = zeros<T>(length * kv_width), d_v = d_k;
  linear_backward<T>(cmatrix(tape.mixed, length, q_width), o_.matrix(params), dy, matrix(d_mixed, length, q_width),
                     o_.matrix(grads));
  const AttentionShape sparse{o.heads, o.kv_heads, o.head_dim, 0, tape.allowed_keys, 0};
  attention_backward<T>(cmatrix(tape.q, length, q_width), cmatrix(tape.k, length, kv_width),
                        cmatrix(tape.v, length, kv_width), sparse, tape.weights, cmatrix(d_mixed, length, q_width),
                        matrix(d_q, length, q_width), matrix(d_k, length, kv_width), matrix(d_v, length, kv_width));
  rope_backward(matrix(d_q, length, q_width), o.head_dim, o.rope_base);
  rope_backward(matrix(d_k, length, kv_width), o.head_dim, o.rope_base);
  linear_backward<T>(x, q_.matrix(params), cmatrix(d_q, length, q_width), dx, q_.matrix(grads));
  linear_backward<T>(x, k_.matrix(params), cmatrix(d_k, length, kv_width), dx, k_.matrix(grads));
  linear_backward<T>(x, v_.matrix(params), cmatrix(d_v, length, kv_width), dx, v_.matrix(grads));
  if (o.indexer_loss_weight == 0.0) return;
  // The indexer's own loss, into its parameters only: its input is detached, so nothing reaches dx.
  const grad::IndexerDims index_dims{length, length, Hi, di};
  std::vector<T> d_scores = zeros<T>(length * length);
  grad::indexer_loss_backward<T>(tape.index_scores, tape.target, index_dims, tape.selected, tape.top_k,
                                 o.indexer_loss_weight / static_cast<double>(length), d_scores);
  std::vector<T> d_index_q = zeros<T>(length * Hi * di), d_index_k = zeros<T>(length * di),
                 d_index_w = zeros<T>(length * Hi);
  grad::indexer_scores_backward<T>(tape.index_q, tape.index_k, tape.index_w, index_dims, d_scores, d_index_q, d_index_k,
                                   d_index_w);
  const T weight_scale = static_cast<T>(1.0 / std::sqrt(static_cast<double>(Hi * di)));
  for (T& g : d_index_w) g *= weight_scale;
  std::vector<T> detached_dx = zeros<T>(length * hidden_);
  linear_backward<T>(x, index_q_.matrix(params), cmatrix(d_index_q, length, Hi * di),
                     matrix(detached_dx, length, hidden_), index_q_.matrix(grads));
  linear_backward<T>(x, index_k_.matrix(params), cmatrix(d_index_k, length, di), matrix(detached_dx, length, hidden_),
                     index_k_.matrix(grads));
  linear_backward<T>(x, index_w_.matrix(params), cmatrix(d_index_w, length, Hi), matrix(detached_dx, length, hidden_),
                     index_w_.matrix(grads));
}

// ---------------------------------------------------------------------------------------------------------
// Token shift
// ---------------------------------------------------------------------------------------------------------

TokenShiftMixer::TokenShiftMixer(std::int64_t hidden, std::unique_ptr<Mixer> inner)
    : hidden_(hidden), inner_(std::move(inner)) {
  require(hidden >= 1, "TokenShiftMixer: hidden is {} (expected >= 1)", hidden);
  require(inner_ != nullptr, "TokenShiftMixer: the inner mixer is null (expected a mixer to shift the input of)");
}

void TokenShiftMixer::add_parameters(Layout& layout, const std::string& prefix) {
  shift_ = layout.slice(layout.add(prefix + "shift.weight", {hidden_}, Init::zeros, false));
  inner_->add_parameters(layout, prefix);
}

std::string TokenShiftMixer::describe() const { return "token shift, then " + inner_->describe(); }

template <class T>
std::unique_ptr<MixerTape> TokenShiftMixer::forward_typed(std::span<const T> params, View<const T> x, View<T> y) const {
  check_forward("TokenShiftMixer::forward", shift_, hidden_, x, y);
  const std::int64_t length = x.rows;
  auto tape = std::make_unique<Tape<T>>();
  tape->x.assign(x.data, x.data + x.size());
  std::vector<T> u = tape->x;
  const std::span<const T> s = shift_.values(params);
  for (std::int64_t t = 1; t < length; ++t)
    for (std::int64_t c = 0; c < hidden_; ++c) u[static_cast<std::size_t>(t * hidden_ + c)] += s[c] * x(t - 1, c);
  tape->inner = inner_->forward(params, cmatrix(u, length, hidden_), y);
  return tape;
}

template <class T>
void TokenShiftMixer::backward_typed(std::span<const T> params, const MixerTape& tape_base, View<const T> dy,
                                     View<T> dx, std::span<T> grads) const {
  const auto& tape = checked_tape<Tape<T>>("TokenShiftMixer::backward", tape_base, hidden_, dy, dx);
  const std::int64_t length = dy.rows;
  std::vector<T> du = zeros<T>(length * hidden_);
  inner_->backward(params, *tape.inner, dy, matrix(du, length, hidden_), grads);
  const std::span<const T> s = shift_.values(params);
  const std::span<T> ds = shift_.values(grads);
  for (std::int64_t t = 0; t < length; ++t)
    for (std::int64_t c = 0; c < hidden_; ++c) {
      const T g = du[static_cast<std::size_t>(t * hidden_ + c)];
      dx(t, c) += g;
      if (t >= 1) {
        dx(t - 1, c) += s[c] * g;
        ds[c] += g * tape.x[static_cast<std::size_t>((t - 1) * hidden_ + c)];
      }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Instantiations
// ---------------------------------------------------------------------------------------------------------

#define AF_TRAIN_MIXER_INSTANTIATE(Mixer, T)                                                                         \
  template std::unique_ptr<MixerTape> Mixer::forward_typed<T>(std::span<const T>, View<const T>, View<T>) const;     \
  template void Mixer::backward_typed<T>(std::span<const T>, const MixerTape&, View<const T>, View<T>, std::span<T>) \
      const;

AF_TRAIN_MIXER_INSTANTIATE(GatedDeltaNetMixer, float)
AF_TRAIN_MIXER_INSTANTIATE(GatedDeltaNetMixer, double)
AF_TRAIN_MIXER_INSTANTIATE(LinearAttentionMixer, float)
AF_TRAIN_MIXER_INSTANTIATE(LinearAttentionMixer, double)
AF_TRAIN_MIXER_INSTANTIATE(MlaMixer, float)
AF_TRAIN_MIXER_INSTANTIATE(MlaMixer, double)
AF_TRAIN_MIXER_INSTANTIATE(DsaMixer, float)
AF_TRAIN_MIXER_INSTANTIATE(DsaMixer, double)
AF_TRAIN_MIXER_INSTANTIATE(TokenShiftMixer, float)
AF_TRAIN_MIXER_INSTANTIATE(TokenShiftMixer, double)

#undef AF_TRAIN_MIXER_INSTANTIATE

}  // namespace af::train
