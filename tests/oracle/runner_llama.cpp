// The `llama` reference: Hugging Face's LlamaAttention, recorded from a tiny random-weight model. Grouped-query
// attention with RoPE in the half-split ("rotate_half") layout, keys cached after rotation, Llama 3.1's
// frequency scaling when the configuration asks for it, softmax scale 1/sqrt(head_dim), causal.
#include "af/rope.hpp"
#include "oracle.hpp"

#include <fmt/format.h>

namespace oracle {

std::vector<Outputs> run_llama(const Case& c) {
  const af::GroupedShape shape = read_hf_grouped_shape(c);
  const af::Rope rope = read_hf_rope(c, shape.head_dim, af::RopeLayout::half_split);
  // Llama's attention_bias puts a bias on all four projections, the output one included.
  const bool bias = c.config_fields().boolean_or("attention_bias", false);
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
