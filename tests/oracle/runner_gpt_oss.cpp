// The `gpt_oss` reference: Hugging Face's GptOssAttention, recorded from a tiny random-weight GptOssModel. Grouped
// -query attention with biases on q, k, v and o; half-split RoPE with YaRN (the attention factor multiplies cos
// and sin, so q . k grows by its square); scale 1/sqrt(head_dim); keys cached after rotation; and one learned
// sink logit per query head, appended to each row of scores as an extra softmax column and dropped after the
// softmax. A `sliding_attention` layer sees keys with 0 <= q - k < sliding_window (sequence indices), as
// transformers' masking_utils draws it; a `full_attention` layer sees every earlier key. Replayed through the
// library's af::sink_attention over an af::SinkKvCache with no kept sink tokens: a ring of sliding_window rows for
// a banded layer, a window that holds the whole stream for a dense one.
#include "af/sinks.hpp"
#include "oracle.hpp"

#include <fmt/format.h>

namespace oracle {

std::vector<Outputs> run_gpt_oss(const Case& c) {
  const af::GroupedShape shape = read_hf_grouped_shape(c);
  const std::int64_t h = shape.hidden, T = c.prefill_len, N = c.decode_steps;
  std::int64_t window = 0;
  if (c.layer_type == "sliding_attention") {
    window = c.config_fields().integer("sliding_window", 1);
  } else if (c.layer_type == "full_attention") {
    window = T + N;  // the whole stream: nothing is ever evicted
  } else {
    throw CaseError(
        fmt::format("{}: layer_type \"{}\" (expected sliding_attention or full_attention)", c.name, c.layer_type));
  }
  const bool bias = c.config_bool("attention_bias");
  const af::GroupedWeights w = read_grouped_weights(c, shape, bias, bias);
  const af::Tensor sinks = c.tensor("sinks", af::Shape{shape.heads});
  const af::Rope rope = read_hf_rope(c, shape.head_dim, af::RopeLayout::half_split);
  const af::Tensor x = c.tensor("input.hidden_states", af::Shape{1, T + N, h}).reshaped(af::Shape{T + N, h});
  const std::vector<std::int64_t> positions = c.positions(T + N);
  const af::AttentionOptions options{true, af::default_scale(shape.head_dim)};

  af::SinkKvCache cache(0, window, shape.kv_heads, shape.head_dim);
  Outputs out{af::sink_attention(x.matrix().rows_slice(0, T), std::span(positions).first(T), shape, w, rope, options,
                                 sinks.values(), cache),
              af::Tensor(af::Shape{N, h}), c.layer_type == "sliding_attention" ? "ring" : "full"};
  for (std::int64_t i = 0; i < N; ++i) {
    const af::Tensor step = af::sink_attention(x.matrix().rows_slice(T + i, 1), std::span(positions).subspan(T + i, 1),
                                               shape, w, rope, options, sinks.values(), cache);
    std::ranges::copy(step.values(), out.decode.matrix().row(i).begin());
  }
  return {out};
}

}  // namespace oracle
