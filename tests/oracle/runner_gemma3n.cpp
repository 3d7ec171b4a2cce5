// The `gemma3n` reference: Hugging Face's Gemma3nTextAttention, recorded from a tiny random-weight Gemma3nTextModel
// whose last `num_kv_shared_layers` layers read an earlier layer's keys and values. The case's `layer_index` names
// the hooked layer; the library's af::gemma3n_kv_sharing decides from `layer_types` and `num_kv_shared_layers`
// whether it keeps a cache or which layer's it reads, and the case must agree (a reader's case holds no k_proj and
// carries the keys and values it was handed, `input.shared_keys` and `input.shared_values` [1, G, T+N, d]). Either
// way the keys and values go through a library ring (sliding_window slots for a sliding layer, the whole stream for a
// full one) and reach the queries as that ring's hand-off for the call (af::hand_off); queries and keys are
// RMS-normalised per head with their gains, values without, rotated half-split with the base of the layer's type;
// softmax scale 1.
#include "af/cross_layer.hpp"
#include "oracle.hpp"

#include <fmt/format.h>

namespace oracle {

namespace {

double rope_base(const Case& c, const char* kind) {
  const Fields params = c.config_fields().object("rope_parameters").object(kind);
  const std::string type = params.string_or("rope_type", "default");
  if (type != "default")
    throw CaseError(
        fmt::format("{}: config.rope_parameters.{}.rope_type \"{}\" (expected \"default\")", c.name, kind, type));
  return params.number("rope_theta");
}

}  // namespace

std::vector<Outputs> run_gemma3n(const Case& c) {
  const Fields cfg = c.config_fields();
  const af::GroupedShape g = read_hf_grouped_shape(c);
  if (cfg.boolean_or("attention_bias", false))
    throw CaseError(
        fmt::format("{}: {} is true (Gemma 3n's projections have no bias)", c.name, cfg.label("attention_bias")));
  const std::int64_t layers = cfg.integer("num_hidden_layers", 1);
  const nlohmann::json& types = cfg.at("layer_types");
  if (!types.is_array() || static_cast<std::int64_t>(types.size()) != layers)
    throw CaseError(
        fmt::format("{}: {} (expected an array of {} layer types)", c.name, cfg.label("layer_types"), layers));
  std::vector<af::LayerKind> kinds;
  for (const nlohmann::json& type : types) {
    if (!type.is_string()) throw CaseError(fmt::format("{}: {} holds a non-string", c.name, cfg.label("layer_types")));
    try {
      kinds.push_back(af::layer_kind_named(type.get<std::string>()));
    } catch (const af::Error& e) {
      throw CaseError(fmt::format("{}: {}: {}", c.name, cfg.label("layer_types"), e.what()));
    }
  }
  const af::KvSharingPlan plan = af::gemma3n_kv_sharing(kinds, cfg.integer("num_kv_shared_layers"));
  const std::int64_t layer = c.case_fields().integer("layer_index", 0, layers - 1);
  const af::LayerKind kind = kinds[static_cast<std::size_t>(layer)];
  if (c.layer_type != af::name_of(kind))
    throw CaseError(
        fmt::format("{}: layer_type \"{}\" but layer {} is {}", c.name, c.layer_type, layer, af::name_of(kind)));
  const af::Gemma3nShape shape{g, cfg.integer("sliding_window", 1), rope_base(c, "sliding_attention"),
                               rope_base(c, "full_attention"), cfg.number("rms_norm_eps")};
  const std::int64_t h = g.hidden, d = g.head_dim, G = g.kv_heads, T = c.prefill_len, N = c.decode_steps;

  af::Gemma3nWeights w{
      c.tensor("q_proj.weight", af::Shape{g.heads * d, h}), c.tensor("q_norm.weight", af::Shape{d}), {}, {}, {},
      c.tensor("o_proj.weight", af::Shape{h, g.heads * d})};
  af::Tensor shared_keys, shared_values;  // [T + N, G d], token-major
  if (plan.owns(layer)) {
    w.k_proj = c.tensor("k_proj.weight", af::Shape{G * d, h});
    w.v_proj = c.tensor("v_proj.weight", af::Shape{G * d, h});
    w.k_norm = c.tensor("k_norm.weight", af::Shape{d});
  } else {
    const std::int64_t source = plan.source[static_cast<std::size_t>(layer)];
    const std::int64_t recorded = c.case_fields().integer_or("kv_shared_layer_index", source, 0, layers - 1);
    if (recorded != source)
      throw CaseError(
          fmt::format("{}: kv_shared_layer_index {} (the sharing rule gives layer {})", c.name, recorded, source));
    const auto token_major = [&](const char* name) {
      const af::Tensor t = c.tensor(name, af::Shape{1, G, T + N, d});  // [1, G, T+N, d] as the module is given it
      af::Tensor out(af::Shape{T + N, G * d});
      for (std::int64_t j = 0; j < G; ++j)
        for (std::int64_t s = 0; s < T + N; ++s)
          std::copy_n(t.data() + (j * (T + N) + s) * d, d, out.data() + s * G * d + j * d);
      return out;
    };
    shared_keys = token_major("input.shared_keys");
    shared_values = token_major("input.shared_values");
  }
  const af::Tensor x = c.tensor("input.hidden_states", af::Shape{1, T + N, h}).reshaped(af::Shape{T + N, h});
  const std::vector<std::int64_t> positions = c.positions(T + N);

  af::RollingKvCache ring(kind == af::LayerKind::sliding ? shape.window : T + N, G, d);
  const auto call = [&](std::int64_t first, std::int64_t n) {
    const af::ConstMatrix rows = x.matrix().rows_slice(first, n);
    const auto at = std::span(positions).subspan(static_cast<std::size_t>(first), static_cast<std::size_t>(n));
    const auto [k, v] = plan.owns(layer) ? af::gemma3n_keys_values(rows, at, shape, kind, w)
                                         : std::pair{to_tensor(shared_keys.matrix().rows_slice(first, n)),
                                                     to_tensor(shared_values.matrix().rows_slice(first, n))};
    const af::KvHandoff kv = af::hand_off(ring, k.matrix(), v.matrix());
    std::vector<std::int64_t> query_index;
    for (std::int64_t i = 0; i < n; ++i) query_index.push_back(ring.seen() + i);
    ring.append(k.matrix(), v.matrix());
    return af::gemma3n_attend(af::gemma3n_queries(rows, at, shape, kind, w).matrix(), query_index, kv, shape, kind, w);
  };
  Outputs out{call(0, T), af::Tensor(af::Shape{N, h}), plan.owns(layer) ? "owner" : "reader"};
  for (std::int64_t i = 0; i < N; ++i) std::ranges::copy(call(T + i, 1).values(), out.decode.matrix().row(i).begin());
  return {out};
}

}  // namespace oracle
