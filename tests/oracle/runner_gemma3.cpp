// The `gemma3` reference: Hugging Face's Gemma3Attention, recorded from a tiny random-weight Gemma3TextModel whose
// layers mix sliding_attention (local) and full_attention (global) kinds. Grouped-query attention with QK
// normalisation in Gemma's form (x / rms(x) * (1 + w), eps rms_norm_eps) before the half-split RoPE; each layer
// kind has its own rotary settings, `config.rope_parameters.<layer_type>` (Gemma 3 ships base 10,000 for local
// layers and 1,000,000 with linear scaling 8 for global ones); the scores are scaled by query_pre_attn_scalar^-1/2,
// not head_dim^-1/2. A local layer sees keys with 0 <= q - k < sliding_window and is replayed through a ring of that
// many slots; a global layer through the whole stream. Gemma 3 replaced Gemma 2's logit soft-capping with this QK
// norm (Gemma 3 technical report), and transformers 5.17's Gemma3Attention keeps attn_logit_softcapping from the
// config without passing it to the attention function: a case that sets it is refused rather than guessed at.
#include "af/qk_norm.hpp"
#include "oracle.hpp"

#include <fmt/format.h>

#include <cmath>

namespace oracle {

std::vector<Outputs> run_gemma3(const Case& c) {
  const Fields config = c.config_fields();
  const af::GroupedShape shape = read_hf_grouped_shape(c);
  std::int64_t window = 0;
  if (c.layer_type == "sliding_attention") {
    window = config.integer("sliding_window", 1);
  } else if (c.layer_type != "full_attention") {
    throw CaseError(
        fmt::format("{}: layer_type \"{}\" (expected sliding_attention or full_attention)", c.name, c.layer_type));
  }
  if (config.given("attn_logit_softcapping"))
    throw CaseError(fmt::format("{} {} is not supported (expected null: Gemma 3 uses QK norm instead)",
                                config.label("attn_logit_softcapping"), config.at("attn_logit_softcapping").dump()));
  if (config.boolean_or("use_bidirectional_attention", false))
    throw CaseError(fmt::format("{} true is not supported (expected false: causal attention)",
                                config.label("use_bidirectional_attention")));
  const bool bias = config.boolean_or("attention_bias", false);
  const af::GroupedWeights w = read_grouped_weights(c, shape, bias, bias);
  const af::QkNorm norm{c.tensor("q_norm.weight", af::Shape{shape.head_dim}),
                        c.tensor("k_norm.weight", af::Shape{shape.head_dim}), config.number("rms_norm_eps"),
                        af::RmsGain::one_plus_weight};
  if (!(norm.eps > 0)) throw CaseError(fmt::format("{} {} (expected > 0)", config.label("rms_norm_eps"), norm.eps));
  const af::Rope rope = read_rope_parameters(c, config.object("rope_parameters").object(c.layer_type), shape.head_dim,
                                             af::RopeLayout::half_split);
  const double scalar = config.number("query_pre_attn_scalar");
  if (!(scalar > 0))
    throw CaseError(fmt::format("{} {} (expected > 0)", config.label("query_pre_attn_scalar"), scalar));
  return {replay_qk_norm_layer(c, shape, w, norm, rope, af::AttentionOptions{true, 1.0 / std::sqrt(scalar)}, window)};
}

}  // namespace oracle
