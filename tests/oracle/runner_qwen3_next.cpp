// The `qwen3_next` reference: Hugging Face's Qwen3NextGatedDeltaNet (the "linear_attention" layers of
// Qwen3-Next), recorded from a tiny random-weight Qwen3NextModel through its DynamicCache. The layer: one
// projection to [q | k | v | z] per key head and one to [b | a] per key head; a causal depthwise convolution of
// width linear_conv_kernel_dim with SiLU over q, k and v (its last inputs cached); unit q and k, q times
// d_k^-0.5; value head h reads key head h / (Hv / Hk); beta = sigmoid(b), log-decay -exp(A_log) softplus(a +
// dt_bias); the gated delta rule (chunked prefill, recurrent decode); a gated RMSNorm per value head (eps
// rms_norm_eps); out_proj. Computed twice: chunks of 64 as the reference prefills, and chunks of 5; each time the
// cache (convolution inputs and delta-rule state) after the prefill and after the last call is compared with the
// reference's where the case records it (delta_cache_comparisons).
// The full-attention layers (Qwen3NextAttention): GQA whose q_proj gives per head [q | gate], q and k
// RMSNorm'd per head with the gain 1 + w, RoPE on the first head_dim x partial_rotary_factor channels
// (half-split), scale d^-0.5, causal, the output times sigmoid(gate), o_proj.
#include "af/gated_attention.hpp"
#include "af/gated_deltanet.hpp"
#include "oracle.hpp"

#include <fmt/format.h>

#include <cmath>
#include <span>

namespace oracle {

namespace {

Outputs run_path(const Case& c, std::int64_t chunk) {
  const Fields config = c.config_fields();
  const std::int64_t layer = c.case_fields().integer("layer_idx");
  const std::int64_t layers = c.config_int("num_hidden_layers");
  if (layer >= layers)
    throw CaseError(fmt::format("{}: layer_idx {} (expected < num_hidden_layers = {})", c.name, layer, layers));
  const std::string act = config.string_or("hidden_act", "");
  if (act != "silu")
    throw CaseError(
        fmt::format("{}: config hidden_act \"{}\" is not supported (this build knows \"silu\")", c.name, act));
  af::GatedDeltaNetShape s;
  s.hidden = config.integer("hidden_size", 1);
  s.key_heads = config.integer("linear_num_key_heads", 1);
  s.value_heads = config.integer("linear_num_value_heads", 1);
  s.key_dim = config.integer("linear_key_head_dim", 1);
  s.value_dim = config.integer("linear_value_head_dim", 1);
  s.conv_kernel = config.integer("linear_conv_kernel_dim", 1);
  s.norm_eps = config.number("rms_norm_eps");
  if (s.value_heads % s.key_heads != 0)
    throw CaseError(fmt::format("{}: config linear_num_value_heads {} is not a multiple of linear_num_key_heads {}",
                                c.name, s.value_heads, s.key_heads));
  if (!(s.norm_eps > 0)) throw CaseError(fmt::format("{}: config rms_norm_eps {} (expected > 0)", c.name, s.norm_eps));
  const std::int64_t kd = s.key_heads * s.key_dim, vd = s.value_heads * s.value_dim, h = s.hidden;
  af::GatedDeltaNetWeights w;
  w.in_proj_qkvz = c.tensor("in_proj_qkvz.weight", af::Shape{2 * kd + 2 * vd, h});
  w.in_proj_ba = c.tensor("in_proj_ba.weight", af::Shape{2 * s.value_heads, h});
  w.conv = c.tensor("conv1d.weight", af::Shape{s.conv_channels(), 1, s.conv_kernel})
               .reshaped(af::Shape{s.conv_channels(), s.conv_kernel});
  w.dt_bias = c.tensor("dt_bias", af::Shape{s.value_heads});
  w.a_log = c.tensor("A_log", af::Shape{s.value_heads});
  w.norm = c.tensor("norm.weight", af::Shape{s.value_dim});
  w.out_proj = c.tensor("out_proj.weight", af::Shape{h, vd});

  const std::int64_t T = c.prefill_len, N = c.decode_steps;
  const af::Tensor x = c.tensor("input.hidden_states", af::Shape{1, T + N, h}).reshaped(af::Shape{T + N, h});
  af::GatedDeltaNetCache cache(s);
  Outputs out{af::gated_deltanet(x.matrix().rows_slice(0, T), s, w, cache, chunk), af::Tensor(af::Shape{N, h}),
              fmt::format("chunked prefill (chunks of {}), recurrent decode", chunk)};
  // The cache after the prefill and after the last call, beside what the reference's cache held then.
  out.states = delta_cache_comparisons(c, "prefill", cache.conv_inputs, s.conv_kernel, cache.state);
  for (std::int64_t i = 0; i < N; ++i) {
    const af::Tensor step = af::gated_deltanet(x.matrix().rows_slice(T + i, 1), s, w, cache, chunk);
    std::ranges::copy(step.values(), out.decode.matrix().row(i).begin());
  }
  for (StateComparison& compared : delta_cache_comparisons(c, "final", cache.conv_inputs, s.conv_kernel, cache.state))
    out.states.push_back(std::move(compared));
  return out;
}

Outputs run_full(const Case& c) {
  const Fields config = c.config_fields();
  af::GatedAttentionShape s;
  s.grouped.hidden = config.integer("hidden_size", 1);
  s.grouped.heads = config.integer("num_attention_heads", 1);
  s.grouped.kv_heads = config.integer("num_key_value_heads", 1);
  s.grouped.head_dim = config.integer("head_dim", 1);
  s.norm_eps = config.number("rms_norm_eps");
  if (config.boolean_or("attention_bias", false))
    throw CaseError(fmt::format("{}: config attention_bias true is not supported (expected false)", c.name));
  if (!config.given("rope_parameters") || !config.at("rope_parameters").is_object())
    throw CaseError(fmt::format("{}: config rope_parameters is missing (expected an object)", c.name));
  const Fields rope(c.name, config.at("rope_parameters"), "config.rope_parameters");
  const std::string type = rope.string_or("rope_type", "default");
  if (type != "default")
    throw CaseError(
        fmt::format("{}: {} \"{}\" is not supported (expected \"default\")", c.name, rope.label("rope_type"), type));
  s.rope_base = rope.number("rope_theta");
  const double factor = rope.number_or("partial_rotary_factor", 1.0);
  const double rotary = static_cast<double>(s.grouped.head_dim) * factor;
  if (!(factor > 0 && factor <= 1) || rotary != std::floor(rotary) || static_cast<std::int64_t>(rotary) % 2 != 0)
    throw CaseError(fmt::format("{}: {} {} (expected a factor in (0, 1] giving an even number of channels of {})",
                                c.name, rope.label("partial_rotary_factor"), factor, s.grouped.head_dim));
  s.rotary_dim = static_cast<std::int64_t>(rotary);
  if (s.grouped.heads % s.grouped.kv_heads != 0)
    throw CaseError(fmt::format("{}: config num_attention_heads {} is not a multiple of num_key_value_heads {}", c.name,
                                s.grouped.heads, s.grouped.kv_heads));
  const af::GroupedShape& g = s.grouped;
  af::GatedAttentionWeights w;
  w.q_proj = c.tensor("q_proj.weight", af::Shape{g.heads * 2 * g.head_dim, g.hidden});
  w.k_proj = c.tensor("k_proj.weight", af::Shape{g.kv_heads * g.head_dim, g.hidden});
  w.v_proj = c.tensor("v_proj.weight", af::Shape{g.kv_heads * g.head_dim, g.hidden});
  w.o_proj = c.tensor("o_proj.weight", af::Shape{g.hidden, g.heads * g.head_dim});
  w.q_norm = c.tensor("q_norm.weight", af::Shape{g.head_dim});
  w.k_norm = c.tensor("k_norm.weight", af::Shape{g.head_dim});
  const std::int64_t T = c.prefill_len, N = c.decode_steps;
  const af::Tensor x =
      c.tensor("input.hidden_states", af::Shape{1, T + N, g.hidden}).reshaped(af::Shape{T + N, g.hidden});
  const std::vector<std::int64_t> positions = c.positions(T + N);
  af::GroupedKvCache cache(T + N, g.kv_heads, g.head_dim);
  Outputs out{af::gated_attention(x.matrix().rows_slice(0, T), std::span(positions).first(T), s, w, cache),
              af::Tensor(af::Shape{N, g.hidden}), "gated full attention (QK norm, partial RoPE, output gate)"};
  for (std::int64_t i = 0; i < N; ++i) {
    const af::Tensor step =
        af::gated_attention(x.matrix().rows_slice(T + i, 1), std::span(positions).subspan(T + i, 1), s, w, cache);
    std::ranges::copy(step.values(), out.decode.matrix().row(i).begin());
  }
  return out;
}

}  // namespace

std::vector<Outputs> run_qwen3_next(const Case& c) {
  if (c.layer_type == "linear_attention") return {run_path(c, 64), run_path(c, 5)};
  if (c.layer_type == "full_attention") return {run_full(c)};
  throw CaseError(
      fmt::format("{}: layer_type \"{}\" is not supported (expected \"linear_attention\" or \"full_attention\")",
                  c.name, c.layer_type));
}

}  // namespace oracle
