// The `sdpa` reference: q/k/v projections, torch's scaled_dot_product_attention (with enable_gqa when there
// are fewer KV heads than query heads), and the output projection; prefill, then single-token decode.
#include "af/attention.hpp"
#include "af/grouped_attention.hpp"
#include "oracle.hpp"

#include <fmt/format.h>

namespace oracle {

std::vector<Outputs> run_sdpa(const Case& c) {
  const Fields config = c.config_fields();
  af::GroupedShape layer;
  layer.hidden = config.integer("hidden_size", 1);
  layer.heads = config.integer("num_attention_heads", 1);
  layer.kv_heads = config.integer("num_key_value_heads", 1);
  layer.head_dim = config.integer("head_dim", 1);
  if (layer.heads % layer.kv_heads)
    throw CaseError(fmt::format("{}: config num_attention_heads {} is not a multiple of num_key_value_heads {}", c.name,
                                layer.heads, layer.kv_heads));
  const af::AttentionOptions options{config.boolean("is_causal"), config.number("scale")};
  // The sdpa module has biases on q/k/v only (o_proj never has one).
  const af::GroupedWeights w = read_grouped_weights(c, layer, config.boolean_or("attention_bias", false), false);
  const std::int64_t h = layer.hidden;

  const std::int64_t T = c.prefill_len, N = c.decode_steps;
  const af::Tensor x = c.tensor("input.hidden_states", af::Shape{1, T + N, h}).reshaped(af::Shape{T + N, h});
  Outputs out{af::Tensor(af::Shape{T, h}), af::Tensor(af::Shape{N, h}), ""};

  if (layer.heads == 1) {  // chapter 01's layer, exactly as the library has it
    const af::SingleHeadWeights single{w.q_proj, w.k_proj, w.v_proj, w.o_proj, w.q_bias, w.k_bias, w.v_bias};
    af::KvCache cache(T + N, layer.head_dim, layer.head_dim);
    out.prefill = af::single_head_attention(x.matrix().rows_slice(0, T), single, options, cache);
    for (std::int64_t i = 0; i < N; ++i) {
      const af::Tensor step = af::single_head_attention(x.matrix().rows_slice(T + i, 1), single, options, cache);
      std::ranges::copy(step.values(), out.decode.matrix().row(i).begin());
    }
    return {out};
  }
  af::GroupedKvCache cache(T + N, layer.kv_heads, layer.head_dim);  // chapters 02-04's layer
  out.prefill = af::grouped_attention(x.matrix().rows_slice(0, T), layer, w, options, cache);
  for (std::int64_t i = 0; i < N; ++i) {
    const af::Tensor step = af::grouped_attention(x.matrix().rows_slice(T + i, 1), layer, w, options, cache);
    std::ranges::copy(step.values(), out.decode.matrix().row(i).begin());
  }
  return {out};
}

}  // namespace oracle
