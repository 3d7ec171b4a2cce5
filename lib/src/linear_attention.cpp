#include "af/linear_attention.hpp"

#include "af/error.hpp"
#include "af/linalg.hpp"
#include "af/mla.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>

namespace af {

namespace {

void check_qkv(const char* what, ConstMatrix q, ConstMatrix k, ConstMatrix v) {
  if (q.rows != k.rows || q.rows != v.rows || q.cols != k.cols)
    fail("{}: q {}, k {}, v {} (expected q and k of one shape [T, d_k] and v [T, d_v] with the same T)", what,
         q.shape_str(), k.shape_str(), v.shape_str());
}

void check_state(const char* what, ConstMatrix k, ConstMatrix v, ConstMatrix state) {
  if (state.rows != k.cols || state.cols != v.cols)
    fail("{}: state {} (expected [d_k, d_v] = [{}, {}])", what, state.shape_str(), k.cols, v.cols);
}

// lambda^m for m = 0 .. count - 1.
std::vector<float> decay_powers(double slope, std::int64_t count) {
  std::vector<float> powers(static_cast<std::size_t>(count));
  for (std::int64_t m = 0; m < count; ++m)
    powers[static_cast<std::size_t>(m)] = static_cast<float>(std::exp(-slope * static_cast<double>(m)));
  return powers;
}

// state <- state * scale_state + sum_j weight[j] k_j^T v_j over rows [first, first + n).
void fold(ConstMatrix k, ConstMatrix v, std::int64_t first, std::int64_t n, float scale_state,
          std::span<const float> weight, Matrix state) {
  for (std::int64_t a = 0; a < state.rows; ++a)
    for (float& s : state.row(a)) s *= scale_state;
  for (std::int64_t j = 0; j < n; ++j) {
    const std::span<const float> key = k.row(first + j), value = v.row(first + j);
    for (std::int64_t a = 0; a < state.rows; ++a)
      axpy(weight[static_cast<std::size_t>(j)] * key[static_cast<std::size_t>(a)], value, state.row(a));
  }
}

}  // namespace

double decay_of(double slope) {
  require(std::isfinite(slope) && slope >= 0.0, "decay_of: slope {} (expected a finite slope >= 0)", slope);
  return std::exp(-slope);
}

Tensor linear_attention_quadratic(ConstMatrix q, ConstMatrix k, ConstMatrix v, double slope) {
  check_qkv("linear_attention_quadratic", q, k, v);
  decay_of(slope);
  const std::vector<float> powers = decay_powers(slope, q.rows);
  Tensor out(Shape{q.rows, v.cols});
  for (std::int64_t i = 0; i < q.rows; ++i) {
    const std::span<float> row = out.matrix().row(i);
    for (std::int64_t j = 0; j <= i; ++j)
      axpy(powers[static_cast<std::size_t>(i - j)] * dot(q.row(i), k.row(j)), v.row(j), row);
  }
  return out;
}

Tensor linear_attention_recurrent(ConstMatrix q, ConstMatrix k, ConstMatrix v, double slope, Matrix state) {
  check_qkv("linear_attention_recurrent", q, k, v);
  check_state("linear_attention_recurrent", k, v, state);
  const auto lambda = static_cast<float>(decay_of(slope));
  const std::vector<float> one{1.0f};
  Tensor out(Shape{q.rows, v.cols});
  for (std::int64_t t = 0; t < q.rows; ++t) {
    fold(k, v, t, 1, lambda, one, state);
    const std::span<float> row = out.matrix().row(t);
    for (std::int64_t a = 0; a < state.rows; ++a) axpy(q(t, a), state.row(a), row);
  }
  return out;
}

Tensor linear_attention_blocked(ConstMatrix q, ConstMatrix k, ConstMatrix v, double slope, std::int64_t block,
                                Matrix state) {
  check_qkv("linear_attention_blocked", q, k, v);
  check_state("linear_attention_blocked", k, v, state);
  require(block >= 1, "linear_attention_blocked: block {} (expected >= 1)", block);
  decay_of(slope);
  const std::vector<float> powers = decay_powers(slope, block + 1);
  std::vector<float> key_weight(static_cast<std::size_t>(block));
  Tensor out(Shape{q.rows, v.cols});
  for (std::int64_t first = 0; first < q.rows; first += block) {
    const std::int64_t n = std::min(block, q.rows - first);
    for (std::int64_t i = 0; i < n; ++i) {
      const std::span<float> row = out.matrix().row(first + i);
      // Inter-block: the earlier blocks through the state, decayed by i + 1 steps.
      const std::span<const float> query = q.row(first + i);
      const float carried = powers[static_cast<std::size_t>(i + 1)];
      for (std::int64_t a = 0; a < state.rows; ++a)
        axpy(carried * query[static_cast<std::size_t>(a)], state.row(a), row);
      // Intra-block: the masked form over the block's own keys.
      for (std::int64_t j = 0; j <= i; ++j)
        axpy(powers[static_cast<std::size_t>(i - j)] * dot(query, k.row(first + j)), v.row(first + j), row);
    }
    for (std::int64_t j = 0; j < n; ++j)
      key_weight[static_cast<std::size_t>(j)] = powers[static_cast<std::size_t>(n - 1 - j)];
    fold(k, v, first, n, powers[static_cast<std::size_t>(n)], key_weight, state);
  }
  return out;
}

void accumulate_linear_state(ConstMatrix k, ConstMatrix v, double slope, Matrix state) {
  check_qkv("accumulate_linear_state", k, k, v);
  check_state("accumulate_linear_state", k, v, state);
  decay_of(slope);
  std::vector<float> weight(static_cast<std::size_t>(k.rows));
  for (std::int64_t j = 0; j < k.rows; ++j)
    weight[static_cast<std::size_t>(j)] = static_cast<float>(std::exp(-slope * static_cast<double>(k.rows - 1 - j)));
  fold(k, v, 0, k.rows, static_cast<float>(std::exp(-slope * static_cast<double>(k.rows))), weight, state);
}

std::vector<double> lightning_slopes(std::int64_t heads, std::int64_t layer, std::int64_t layers) {
  require(heads >= 1 && layers >= 1 && layer >= 0 && layer < layers,
          "lightning_slopes: {} heads, layer {} of {} (expected heads >= 1 and 0 <= layer < layers)", heads, layer,
          layers);
  const double base = std::pow(2.0, -8.0 / static_cast<double>(heads));
  const double factor = 1.0 - static_cast<double>(layer) / (static_cast<double>(layers - 1) + 1e-5) + 1e-5;
  std::vector<double> slopes(static_cast<std::size_t>(heads));
  for (std::int64_t h = 0; h < heads; ++h)
    slopes[static_cast<std::size_t>(h)] = std::pow(base, static_cast<double>(h + 1)) * factor;
  return slopes;
}

LinearState::LinearState(std::int64_t heads, std::int64_t key_dim, std::int64_t value_dim) {
  require(heads >= 1 && key_dim >= 1 && value_dim >= 1, "LinearState: {} heads of [{}, {}] (expected every size >= 1)",
          heads, key_dim, value_dim);
  state_ = Tensor(Shape{heads, key_dim, value_dim});
}

Matrix LinearState::head(std::int64_t h) {
  require(h >= 0 && h < heads(), "LinearState::head: head {} (expected 0 <= head < {})", h, heads());
  return {state_.data() + h * key_dim() * value_dim(), key_dim(), value_dim(), value_dim()};
}

ConstMatrix LinearState::head(std::int64_t h) const {
  require(h >= 0 && h < heads(), "LinearState::head: head {} (expected 0 <= head < {})", h, heads());
  return {state_.data() + h * key_dim() * value_dim(), key_dim(), value_dim(), value_dim()};
}

std::int64_t LinearState::bytes(DType dtype) const { return state_.numel() * bytes_of(dtype); }

void LightningShape::validate() const {
  require(hidden >= 1 && heads >= 1 && head_dim >= 1 && block_size >= 1,
          "LightningShape: hidden {}, heads {}, head_dim {}, block_size {} (expected all >= 1)", hidden, heads,
          head_dim, block_size);
}

void LightningWeights::validate(const LightningShape& shape) const {
  shape.validate();
  const std::int64_t hd = shape.heads * shape.head_dim;
  const auto check = [](const char* name, const Tensor& t, const Shape& want) {
    if (t.shape() != want) fail("LightningWeights: {} is {} (expected {})", name, t.shape().str(), want.str());
  };
  check("qkv_proj", qkv_proj, Shape{3 * hd, shape.hidden});
  check("output_gate", output_gate, Shape{hd, shape.hidden});
  check("norm", norm, Shape{hd});
  check("out_proj", out_proj, Shape{shape.hidden, hd});
  require(norm_eps > 0.0, "LightningWeights: norm_eps {} (expected > 0)", norm_eps);
}

LinearQkv lightning_qkv(ConstMatrix x, const LightningShape& shape, const LightningWeights& weights) {
  weights.validate(shape);
  require(x.cols == shape.hidden, "lightning_qkv: x has {} columns (expected hidden = {})", x.cols, shape.hidden);
  const Tensor qkv = linear(x, weights.qkv_proj.matrix());  // [T, H * 3d], head h at columns 3hd .. 3hd + 3d - 1
  const std::int64_t d = shape.head_dim, hd = shape.heads * d;
  LinearQkv out{Tensor(Shape{x.rows, hd}), Tensor(Shape{x.rows, hd}), Tensor(Shape{x.rows, hd})};
  const auto silu = [](float z) { return static_cast<float>(z / (1.0 + std::exp(-double{z}))); };
  for (std::int64_t t = 0; t < x.rows; ++t)
    for (std::int64_t h = 0; h < shape.heads; ++h)
      for (std::int64_t c = 0; c < d; ++c) {
        const float* src = qkv.data() + t * 3 * hd + h * 3 * d + c;
        out.q.data()[t * hd + h * d + c] = silu(src[0]);
        out.k.data()[t * hd + h * d + c] = silu(src[d]);
        out.v.data()[t * hd + h * d + c] = silu(src[2 * d]);
      }
  return out;
}

Tensor lightning_attention(ConstMatrix x, const LightningShape& shape, const LightningWeights& weights,
                           std::span<const double> slopes, LinearState& state, LinearForm form) {
  const LinearQkv qkv = lightning_qkv(x, shape, weights);
  require(static_cast<std::int64_t>(slopes.size()) == shape.heads,
          "lightning_attention: {} slopes (expected one per head, {})", slopes.size(), shape.heads);
  require(state.heads() == shape.heads && state.key_dim() == shape.head_dim && state.value_dim() == shape.head_dim,
          "lightning_attention: state of {} heads of [{}, {}] (expected {} heads of [{}, {}])", state.heads(),
          state.key_dim(), state.value_dim(), shape.heads, shape.head_dim, shape.head_dim);
  require(form != LinearForm::quadratic || state.tokens() == 0,
          "lightning_attention: the quadratic form from a state of {} tokens (expected a fresh state)", state.tokens());
  const std::int64_t d = shape.head_dim, hd = shape.heads * d;
  Tensor heads_out(Shape{x.rows, hd});
  const Tensor q3 = qkv.q.reshaped(Shape{x.rows, shape.heads, d});
  const Tensor k3 = qkv.k.reshaped(Shape{x.rows, shape.heads, d});
  const Tensor v3 = qkv.v.reshaped(Shape{x.rows, shape.heads, d});
  for (std::int64_t h = 0; h < shape.heads; ++h) {
    const ConstMatrix q = head_view(q3, h), k = head_view(k3, h), v = head_view(v3, h);
    const double slope = slopes[static_cast<std::size_t>(h)];
    Tensor o;
    switch (form) {
      case LinearForm::blocked:
        o = linear_attention_blocked(q, k, v, slope, shape.block_size, state.head(h));
        break;
      case LinearForm::recurrent:
        o = linear_attention_recurrent(q, k, v, slope, state.head(h));
        break;
      case LinearForm::quadratic:
        o = linear_attention_quadratic(q, k, v, slope);
        accumulate_linear_state(k, v, slope, state.head(h));
        break;
    }
    for (std::int64_t t = 0; t < x.rows; ++t) std::ranges::copy(o.matrix().row(t), heads_out.data() + t * hd + h * d);
  }
  state.add_tokens(x.rows);
  rms_norm_rows(heads_out.matrix(), weights.norm.values(), weights.norm_eps);
  const Tensor gate = linear(x, weights.output_gate.matrix());
  for (std::int64_t i = 0; i < heads_out.numel(); ++i)
    heads_out.data()[i] *= static_cast<float>(1.0 / (1.0 + std::exp(-double{gate.data()[i]})));
  return linear(heads_out.matrix(), weights.out_proj.matrix());
}

std::int64_t HybridModel::layer_state_bytes() const {
  const std::int64_t conv_inputs = conv_kernel > 1 ? (conv_kernel - 1) * conv_channels : 0;
  return (heads_with_state() * key_dim * value_dim + conv_inputs) * bytes_of(state_dtype);
}

std::int64_t HybridModel::state_bytes() const { return linear_layers * layer_state_bytes(); }

std::int64_t HybridModel::bytes_stored(std::int64_t t) const {
  return (t > 0 ? state_bytes() : 0) + softmax.bytes_stored(t);
}

std::int64_t HybridModel::bytes_read(std::int64_t t) const { return state_bytes() + softmax.bytes_read(t); }

double HybridModel::linear_flops_per_token() const {
  return flops_per_state_element * static_cast<double>(linear_layers * heads_with_state() * key_dim * value_dim);
}

double HybridModel::decode_flops(std::int64_t t) const { return linear_flops_per_token() + softmax.decode_flops(t); }

double HybridModel::prefill_flops(std::int64_t tokens) const {
  return static_cast<double>(tokens) * linear_flops_per_token() + softmax.prefill_flops(tokens);
}

HybridModel minimax_m1(DType kv_dtype, DType state_dtype) {
  const std::string source =
      "MiniMax-AI/MiniMax-M1 @ 2abb4f4, config.json (80 layers, 64 heads, 8 KV heads, head_dim 128, attn_type_list: "
      "softmax at layers 7, 15, ..., 79 -> 70 lightning + 10 softmax); MiniMax-Text-01 model card (80 layers, 64 "
      "heads of 128, a softmax layer after every 7 lightning layers)";
  HybridModel m;
  m.model = "MiniMax-M1";
  m.source = source;
  m.softmax =
      ModelCache{"MiniMax-M1 softmax layers", source, 10, dense_kv_card("GQA (groups of 8)", 64, 8, 128, kv_dtype)};
  m.linear_layers = 70;
  m.linear_heads = 64;
  m.key_dim = m.value_dim = 128;
  m.state_dtype = state_dtype;
  return m;
}

HybridModel qwen3_next_80b_a3b(DType kv_dtype, DType state_dtype) {
  const std::string source =
      "huggingface/transformers 5.17, models/qwen3_next/configuration_qwen3_next.py, whose defaults are "
      "Qwen/Qwen3-Next-80B-A3B-Instruct's (48 layers, full_attention_interval 4, 16 heads, 2 KV heads, head_dim "
      "256, partial_rotary_factor 0.25; linear_num_key_heads 16, linear_num_value_heads 32, key and value head dim "
      "128, linear_conv_kernel_dim 4)";
  HybridModel m;
  m.model = "Qwen3-Next-80B-A3B";
  m.source = source;
  m.softmax = ModelCache{"Qwen3-Next-80B-A3B full-attention layers", source, 12,
                         dense_kv_card("gated GQA (groups of 8)", 16, 2, 256, kv_dtype)};
  m.linear_layers = 36;
  m.linear_heads = 16;
  m.key_dim = m.value_dim = 128;
  m.state_dtype = state_dtype;
  m.linear_mechanism = "Gated DeltaNet";
  m.state_heads = 32;
  m.conv_channels = 2 * 16 * 128 + 32 * 128;
  m.conv_kernel = 4;
  m.flops_per_state_element = 7.0;
  m.linear_projected =
      "q, k of 16 key heads and v, z (the output gate) of 32 value heads, all of 128; beta and a decay per value "
      "head";
  return m;
}

HybridModel kimi_linear_48b_a3b(DType kv_dtype, DType state_dtype) {
  const std::string source =
      "moonshotai/Kimi-Linear-48B-A3B-Instruct config.json (27 layers; linear_attn_config: full_attn_layers [4, 8, "
      "12, 16, 20, 24, 27], kda_layers the other 20, num_heads 32, head_dim 128, short_conv_kernel_size 4; "
      "kv_lora_rank 512, qk_rope_head_dim 64, mla_use_nope true); Kimi Linear technical report (arXiv 2510.26692)";
  HybridModel m;
  m.model = "Kimi-Linear-48B-A3B";
  m.source = source;
  m.softmax = ModelCache{"Kimi-Linear-48B-A3B MLA layers", source, 7, mla_kv_card(32, 512, 64, kv_dtype)};
  m.linear_layers = 20;
  m.linear_heads = 32;
  m.key_dim = m.value_dim = 128;
  m.state_dtype = state_dtype;
  m.linear_mechanism = "Kimi Delta Attention";
  m.conv_channels = 3 * 32 * 128;
  m.conv_kernel = 4;
  m.flops_per_state_element = 7.0;
  m.linear_projected =
      "q, k, v of 32 heads of 128; beta per head; a decay per key channel and an output gate, each through a "
      "rank-128 bottleneck";
  return m;
}

std::string format_hybrid_card(const HybridModel& model, std::span<const ModelCache> others,
                               std::span<const std::int64_t> contexts) {
  const CacheCard& card = model.softmax.card;
  const std::string& linear = model.linear_mechanism;
  const std::string state_shape =
      fmt::format("S [{}, {}, {}]", model.heads_with_state(), model.key_dim, model.value_dim);
  const std::string conv_shape =
      model.conv_channels > 0 && model.conv_kernel > 1
          ? fmt::format(" + conv inputs [{}, {}]", model.conv_kernel - 1, model.conv_channels)
          : "";
  std::string out = fmt::format("Cache card: {} ({} layers and {} layers)\n", model.model, linear, card.mechanism);
  // A line longer than the book's code column (110 characters) continues under its text.
  const auto line = [&out](std::string_view label, const std::string& text) {
    for (const std::string& l : wrap_words(text, 90)) out += fmt::format("  {:<17} {}\n", label, l), label = "";
  };
  line("projected",
       fmt::format("{} layers: {}", linear,
                   model.linear_projected.empty()
                       ? fmt::format("q, k, v of {} heads of {} (SiLU), and a gate of {} values", model.linear_heads,
                                     model.key_dim, model.linear_heads * model.value_dim)
                       : model.linear_projected));
  line("", fmt::format("softmax layers: {}", card.projected));
  line("cached", fmt::format("per {} layer and sequence: {}{} {} (fixed)", linear, state_shape, conv_shape,
                             name_of(model.state_dtype)));
  std::vector<std::string> stored, per_t;
  for (const CachedTensor& t : card.per_token) {
    stored.push_back(fmt::format("{} [{}] {}", t.name, fmt::join(t.shape, ", "), name_of(t.dtype)));
    per_t.push_back(fmt::format("{} [T, {}]", t.name, fmt::join(t.shape, ", ")));
  }
  line("", fmt::format("per softmax layer and token: {}", fmt::join(stored, ", ")));
  line("stored shape",
       fmt::format("after a prefill of T tokens: {}{}; {}", state_shape, conv_shape, fmt::join(per_t, ", ")));
  line("", fmt::format("after each decode step: the same state (overwritten); the softmax cache grows by one token"));
  line("bytes", fmt::format("{}: {} per layer per sequence x {} layers = {} whatever the context", linear,
                            model.layer_state_bytes(), model.linear_layers,
                            human_bytes(static_cast<double>(model.state_bytes()))));
  line("", fmt::format("softmax: {} per layer per token x {} layers = {} per token", card.bytes_per_token(),
                       model.softmax.layers, model.softmax.bytes_per_token()));
  for (const std::int64_t t : contexts)
    line(t == contexts.front() ? "decode reads" : "",
         fmt::format("t = {}: every state once ({}) + {} cached tokens in each softmax layer ({}) = {}", t,
                     human_bytes(static_cast<double>(model.state_bytes())), t,
                     human_bytes(static_cast<double>(model.softmax.bytes_read(t))),
                     human_bytes(static_cast<double>(model.bytes_read(t)))));
  for (const std::int64_t t : contexts)
    line(t == contexts.front() ? "whole model" : "",
         fmt::format("{} at t = {}: {} stored ({} states + {} cache)", model.model, t,
                     human_bytes(static_cast<double>(model.bytes_stored(t))),
                     human_bytes(static_cast<double>(model.state_bytes())),
                     human_bytes(static_cast<double>(model.softmax.bytes_stored(t)))));
  for (const ModelCache& m : others)
    for (const std::int64_t t : contexts)
      line(&m == &others.front() && t == contexts.front() ? "beside it" : "",
           fmt::format("{} ({}) at t = {}: {} stored", m.model, m.card.mechanism, t,
                       human_bytes(static_cast<double>(m.bytes_stored(t)))));
  line("trades off",
       fmt::format("constant memory and constant reads per token in the {} layers, for a state that must squeeze "
                   "the whole context into d_k x d_v numbers per head (recall degrades once the context holds more "
                   "than ~d items a head must keep apart); the softmax layers keep exact recall at a growing cost",
                   linear));
  return out;
}

}  // namespace af
