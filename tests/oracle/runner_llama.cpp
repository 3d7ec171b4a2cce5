// The `llama` reference: Hugging Face's LlamaAttention, recorded from a tiny random-weight model. Grouped-query
// attention with RoPE in the half-split ("rotate_half") layout, keys cached after rotation, Llama 3.1's
// frequency scaling when the configuration asks for it, softmax scale 1/sqrt(head_dim), causal.
#include "af/rope.hpp"
#include "oracle.hpp"

#include <fmt/format.h>

namespace oracle {

namespace {

// transformers 5 keeps the rotary settings in `rope_parameters`; earlier versions used `rope_theta` and
// `rope_scaling`. Either is read.
af::Rope rope_from_config(const Case& c, std::int64_t head_dim) {
  const nlohmann::json& config = c.config;
  const nlohmann::json* params = nullptr;
  double theta = 0.0;
  if (config.contains("rope_parameters") && config.at("rope_parameters").is_object()) {
    params = &config.at("rope_parameters");
    if (!params->contains("rope_theta"))
      throw CaseError(fmt::format("{}: config rope_parameters has no rope_theta", c.name));
    theta = params->at("rope_theta").get<double>();
  } else {
    theta = c.config_double("rope_theta");
    if (config.contains("rope_scaling") && config.at("rope_scaling").is_object()) params = &config.at("rope_scaling");
  }
  std::optional<af::Llama3Scaling> scaling;
  if (params != nullptr) {
    const std::string type = params->value("rope_type", params->value("type", std::string("default")));
    if (type == "llama3") {
      const auto number = [&](const char* key) {
        if (!params->contains(key)) throw CaseError(fmt::format("{}: llama3 rope scaling has no \"{}\"", c.name, key));
        return params->at(key).get<double>();
      };
      scaling = af::Llama3Scaling{number("factor"), number("low_freq_factor"), number("high_freq_factor"),
                                  number("original_max_position_embeddings")};
    } else if (type != "default") {
      throw CaseError(
          fmt::format("{}: rope type \"{}\" is not supported (this build knows default and llama3)", c.name, type));
    }
  }
  return af::Rope(head_dim, theta, af::RopeLayout::half_split, scaling);
}

}  // namespace

std::vector<Outputs> run_llama(const Case& c) {
  af::GroupedShape shape;
  shape.hidden = c.config_int("hidden_size");
  shape.heads = c.config_int("num_attention_heads");
  shape.kv_heads = c.config.contains("num_key_value_heads") && !c.config.at("num_key_value_heads").is_null()
                       ? c.config_int("num_key_value_heads")
                       : shape.heads;
  shape.head_dim = c.config.contains("head_dim") && !c.config.at("head_dim").is_null() ? c.config_int("head_dim")
                                                                                       : shape.hidden / shape.heads;
  try {
    shape.validate();
  } catch (const af::Error& e) {
    throw CaseError(fmt::format("{}: {}", c.name, e.what()));
  }
  const af::Rope rope = rope_from_config(c, shape.head_dim);
  // Llama's attention_bias puts a bias on all four projections, the output one included.
  const bool bias = c.config.value("attention_bias", false);
  const af::GroupedWeights w = read_grouped_weights(c, shape, bias, bias);
  const std::int64_t h = shape.hidden;
  const std::int64_t T = c.prefill_len, N = c.decode_steps;
  const af::Tensor x = c.tensor("input.hidden_states", af::Shape{1, T + N, h}).reshaped(af::Shape{T + N, h});
  const std::vector<std::int64_t> positions = c.positions(T + N);
  const af::AttentionOptions options{true, af::default_scale(shape.head_dim)};

  af::GroupedKvCache cache(T + N, shape.kv_heads, shape.head_dim);
  Outputs out{af::rotary_grouped_attention(x.matrix().rows_slice(0, T), std::span(positions).first(T), shape, w, rope,
                                           options, cache),
              af::Tensor(af::Shape{N, h}), ""};
  for (std::int64_t i = 0; i < N; ++i) {
    const af::Tensor step = af::rotary_grouped_attention(
        x.matrix().rows_slice(T + i, 1), std::span(positions).subspan(T + i, 1), shape, w, rope, options, cache);
    std::ranges::copy(step.values(), out.decode.matrix().row(i).begin());
  }
  return {out};
}

}  // namespace oracle
