// The `mistral` reference: Hugging Face's MistralAttention, recorded from a tiny random-weight MistralModel with
// a sliding window. Grouped-query attention with half-split RoPE (keys cached after rotation), scale
// 1/sqrt(head_dim), no biases, and the window of transformers' masking_utils: a query at sequence index q sees
// the key at index k iff 0 <= q - k < sliding_window. Replayed through the library's rolling (ring-buffer)
// cache of sliding_window slots; the cases run past the window, so the ring wraps during decode.
#include "af/rope.hpp"
#include "af/sliding_window.hpp"
#include "oracle.hpp"

#include <fmt/format.h>

namespace oracle {

namespace {

af::Rope mistral_rope(const Case& c, std::int64_t head_dim) {
  if (!c.config.contains("rope_parameters") || !c.config.at("rope_parameters").is_object())
    throw CaseError(fmt::format("{}: config has no rope_parameters object", c.name));
  const nlohmann::json& params = c.config.at("rope_parameters");
  const std::string type = params.value("rope_type", std::string("default"));
  if (type != "default")
    throw CaseError(
        fmt::format("{}: rope type \"{}\" is not supported by the mistral runner (expected default)", c.name, type));
  if (!params.contains("rope_theta") || !params.at("rope_theta").is_number())
    throw CaseError(fmt::format("{}: config rope_parameters has no numeric rope_theta", c.name));
  if (params.contains("partial_rotary_factor") && params.at("partial_rotary_factor").is_number() &&
      params.at("partial_rotary_factor").get<double>() != 1.0)
    throw CaseError(fmt::format("{}: partial_rotary_factor {} is not supported", c.name,
                                params.at("partial_rotary_factor").dump()));
  return af::Rope(head_dim, params.at("rope_theta").get<double>(), af::RopeLayout::half_split);
}

}  // namespace

std::vector<Outputs> run_mistral(const Case& c) {
  af::GroupedShape shape;
  shape.hidden = c.config_int("hidden_size");
  shape.heads = c.config_int("num_attention_heads");
  shape.kv_heads = c.config.contains("num_key_value_heads") && !c.config.at("num_key_value_heads").is_null()
                       ? c.config_int("num_key_value_heads")
                       : shape.heads;
  shape.head_dim = c.config.contains("head_dim") && !c.config.at("head_dim").is_null() ? c.config_int("head_dim")
                                                                                       : shape.hidden / shape.heads;
  const std::int64_t window = c.config_int("sliding_window");
  if (window < 1) throw CaseError(fmt::format("{}: config sliding_window is {} (expected >= 1)", c.name, window));
  try {
    shape.validate();
  } catch (const af::Error& e) {
    throw CaseError(fmt::format("{}: {}", c.name, e.what()));
  }
  const af::Rope rope = mistral_rope(c, shape.head_dim);
  const af::GroupedWeights w = read_grouped_weights(c, shape, false, false);
  const std::int64_t h = shape.hidden, T = c.prefill_len, N = c.decode_steps;
  const af::Tensor x = c.tensor("input.hidden_states", af::Shape{1, T + N, h}).reshaped(af::Shape{T + N, h});
  const std::vector<std::int64_t> positions = c.positions(T + N);
  const af::AttentionOptions options{true, af::default_scale(shape.head_dim)};

  af::RollingKvCache ring(window, shape.kv_heads, shape.head_dim);
  Outputs out{af::sliding_window_attention(x.matrix().rows_slice(0, T), std::span(positions).first(T), shape, w, rope,
                                           options, ring),
              af::Tensor(af::Shape{N, h}), "ring"};
  for (std::int64_t i = 0; i < N; ++i) {
    const af::Tensor step = af::sliding_window_attention(
        x.matrix().rows_slice(T + i, 1), std::span(positions).subspan(T + i, 1), shape, w, rope, options, ring);
    std::ranges::copy(step.values(), out.decode.matrix().row(i).begin());
  }
  return {out};
}

}  // namespace oracle
