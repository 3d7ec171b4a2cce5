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

std::vector<Outputs> run_mistral(const Case& c) {
  const af::GroupedShape shape = read_hf_grouped_shape(c);
  const std::int64_t window = c.config_fields().integer("sliding_window", 1);
  const af::Rope rope = read_hf_rope(c, shape.head_dim, af::RopeLayout::half_split);
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
