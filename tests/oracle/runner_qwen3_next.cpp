// The `qwen3_next` reference: Hugging Face's Qwen3NextGatedDeltaNet (the "linear_attention" layers of
// Qwen3-Next), recorded from a tiny random-weight Qwen3NextModel through its DynamicCache. The layer: one
// projection to [q | k | v | z] per key head and one to [b | a] per key head; a causal depthwise convolution of
// width linear_conv_kernel_dim with SiLU over q, k and v (its last inputs cached); unit q and k, q times
// d_k^-0.5; value head h reads key head h / (Hv / Hk); beta = sigmoid(b), log-decay -exp(A_log) softplus(a +
// dt_bias); the gated delta rule (chunked prefill, recurrent decode); a gated RMSNorm per value head (eps
// rms_norm_eps); out_proj. Computed twice: chunks of 64 as the reference prefills, and chunks of 5.
#include "af/gated_deltanet.hpp"
#include "oracle.hpp"

#include <fmt/format.h>

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
  for (std::int64_t i = 0; i < N; ++i) {
    const af::Tensor step = af::gated_deltanet(x.matrix().rows_slice(T + i, 1), s, w, cache, chunk);
    std::ranges::copy(step.values(), out.decode.matrix().row(i).begin());
  }
  return out;
}

}  // namespace

std::vector<Outputs> run_qwen3_next(const Case& c) {
  if (c.layer_type != "linear_attention")
    throw CaseError(
        fmt::format("{}: layer_type \"{}\" is not supported (expected \"linear_attention\")", c.name, c.layer_type));
  return {run_path(c, 64), run_path(c, 5)};
}

}  // namespace oracle
