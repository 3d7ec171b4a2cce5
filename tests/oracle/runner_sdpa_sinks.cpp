// The `sdpa_sinks` reference: projections and torch SDPA under the explicit kept-sink + window mask, with an
// evicting cache. Replayed through af::SinkKvCache (S sink rows + a ring of W) and af::sink_grouped_attend:
// the prefill attends over its own keys, each decode token is appended first and attends over the held rows.
#include "af/linalg.hpp"
#include "af/sinks.hpp"
#include "oracle.hpp"

#include <fmt/format.h>

namespace oracle {

std::vector<Outputs> run_sdpa_sinks(const Case& c) {
  const Fields config = c.config_fields();
  af::GroupedShape layer;
  layer.hidden = config.integer("hidden_size", 1);
  layer.heads = config.integer("num_attention_heads", 1);
  layer.kv_heads = config.integer("num_key_value_heads", 1);
  layer.head_dim = config.integer("head_dim", 1);
  const std::int64_t sinks = config.integer("sinks", 0), window = config.integer("window", 1);
  if (layer.heads % layer.kv_heads)
    throw CaseError(fmt::format("{}: config num_attention_heads {} is not a multiple of num_key_value_heads {}", c.name,
                                layer.heads, layer.kv_heads));
  const af::AttentionOptions options{true, c.config_double("scale")};
  const af::GroupedWeights w = read_grouped_weights(c, layer, false, false);
  const std::int64_t h = layer.hidden, T = c.prefill_len, N = c.decode_steps;
  const af::Tensor x = c.tensor("input.hidden_states", af::Shape{1, T + N, h}).reshaped(af::Shape{T + N, h});
  const af::Tensor q = af::linear(x.matrix(), w.q_proj.matrix());
  const af::Tensor k = af::linear(x.matrix(), w.k_proj.matrix());
  const af::Tensor v = af::linear(x.matrix(), w.v_proj.matrix());
  const af::SinkSpec spec{sinks, window, {}};

  Outputs out{af::Tensor(af::Shape{T, h}), af::Tensor(af::Shape{N, h}), "af::SinkKvCache + af::sink_grouped_attend"};
  af::SinkKvCache cache(sinks, window, layer.kv_heads, layer.head_dim);
  std::vector<std::int64_t> prefill_index;
  for (std::int64_t t = 0; t < T; ++t) prefill_index.push_back(t);
  const af::Tensor context =
      af::sink_grouped_attend(q.matrix().rows_slice(0, T), prefill_index, k.matrix().rows_slice(0, T),
                              v.matrix().rows_slice(0, T), prefill_index, layer, spec, options);
  out.prefill = af::linear(context.matrix(), w.o_proj.matrix());
  cache.append(k.matrix().rows_slice(0, T), v.matrix().rows_slice(0, T));
  for (std::int64_t i = 0; i < N; ++i) {
    const std::int64_t t = T + i;
    cache.append(k.matrix().rows_slice(t, 1), v.matrix().rows_slice(t, 1));
    const std::vector<std::int64_t> query_index{t};
    const af::Tensor step = af::sink_grouped_attend(q.matrix().rows_slice(t, 1), query_index, cache.keys(),
                                                    cache.values(), cache.row_indices(), layer, spec, options);
    const af::Tensor y = af::linear(step.matrix(), w.o_proj.matrix());
    std::ranges::copy(y.values(), out.decode.matrix().row(i).begin());
  }
  return {out};
}

}  // namespace oracle
