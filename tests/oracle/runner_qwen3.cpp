// The `qwen3` reference: Hugging Face's Qwen3Attention, recorded from a tiny random-weight Qwen3Model. Grouped-query
// attention like Llama's (attention_bias puts a bias on all four projections) with QK normalisation: each query
// and key head is RMSNorm'd (gain w, eps rms_norm_eps) after the projection and before the half-split RoPE; keys
// are cached after both; scale 1/sqrt(head_dim). A `sliding_attention` layer (use_sliding_window) sees keys with
// 0 <= q - k < sliding_window and is replayed through a ring of that many slots; a `full_attention` layer through
// the whole stream.
#include "af/qk_norm.hpp"
#include "oracle.hpp"

#include <fmt/format.h>

namespace oracle {

std::vector<Outputs> run_qwen3(const Case& c) {
  const Fields config = c.config_fields();
  const af::GroupedShape shape = read_hf_grouped_shape(c);
  std::int64_t window = 0;
  if (c.layer_type == "sliding_attention") {
    window = config.integer("sliding_window", 1);
  } else if (c.layer_type != "full_attention") {
    throw CaseError(
        fmt::format("{}: layer_type \"{}\" (expected sliding_attention or full_attention)", c.name, c.layer_type));
  }
  const bool bias = config.boolean_or("attention_bias", false);
  const af::GroupedWeights w = read_grouped_weights(c, shape, bias, bias);
  const af::QkNorm norm{c.tensor("q_norm.weight", af::Shape{shape.head_dim}),
                        c.tensor("k_norm.weight", af::Shape{shape.head_dim}), config.number("rms_norm_eps"),
                        af::RmsGain::weight};
  if (!(norm.eps > 0)) throw CaseError(fmt::format("{} {} (expected > 0)", config.label("rms_norm_eps"), norm.eps));
  const af::Rope rope = read_hf_rope(c, shape.head_dim, af::RopeLayout::half_split);
  return {replay_qk_norm_layer(c, shape, w, norm, rope, af::AttentionOptions{true, af::default_scale(shape.head_dim)},
                               window)};
}

}  // namespace oracle
