// The `sdpa_sinks` reference: projections and torch SDPA under the explicit kept-sink + window mask, with an
// evicting cache. Replayed through af::SinkKvCache (S sink rows + a ring of W) and af::sink_grouped_attend:
// the prefill attends over its own keys, each decode token is appended first and attends over the held rows.
#include "af/linalg.hpp"
#include "af/sinks.hpp"
#include "oracle.hpp"

#include <fmt/format.h>

namespace oracle {

std::vector<Outputs> run_sdpa_sinks(const Case& c) {
  af::GroupedShape layer;
  layer.hidden = c.config_int("hidden_size");
  layer.heads = c.config_int("num_attention_heads");
  layer.kv_heads = c.config_int("num_key_value_heads");
  layer.head_dim = c.config_int("head_dim");
  const std::int64_t sinks = c.config_int("sinks"), window = c.config_int("window");
  if (layer.hidden < 1 || layer.heads < 1 || layer.kv_heads < 1 || layer.head_dim < 1 || layer.heads % layer.kv_heads ||
      sinks < 0 || window < 1)
    throw CaseError(
        fmt::format("{}: hidden_size {}, {} heads, {} KV heads, head_dim {}, sinks {}, window {} "
                    "(expected positive sizes, heads divisible by KV heads, sinks >= 0, window >= 1)",
                    c.name, layer.hidden, layer.heads, layer.kv_heads, layer.head_dim, sinks, window));
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
