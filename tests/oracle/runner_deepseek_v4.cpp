// The `deepseek_v4` reference: Hugging Face's DeepseekV4Attention (sliding, compressed sparse and heavily
// compressed layers), recorded from a tiny random-weight model. The library runs the layer kind the case names
// through its own V4Cache (window, compressor state, indexer state), and reports the indexer's selections of a
// CSA layer for comparison with the reference's.
#include "af/compressed_attention.hpp"
#include "oracle.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <set>

namespace oracle {

namespace {
const nlohmann::json& object_field(const Case& c, const nlohmann::json& parent, const std::string& key,
                                   const std::string& where) {
  if (!parent.is_object() || !parent.contains(key) || !parent.at(key).is_object())
    throw CaseError(fmt::format("{}: config {} has no object \"{}\"", c.name, where, key));
  return parent.at(key);
}

// The RoPE of the layer's kind: rope_parameters.main (sliding) or .compress (CSA, HCA); interleaved pairs on the
// last rope_dim values. Types "default" and "yarn" (the published compressed layers': the config forces YaRN's
// attention factor to 1 there). YaRN's fields as transformers reads them; an unknown field is rejected by name.
af::Rope read_v4_rope(const Case& c, af::V4LayerKind kind, std::int64_t rope_dim) {
  const auto& all = object_field(c, c.config, "rope_parameters", "");
  const std::string label = kind == af::V4LayerKind::sliding ? "main" : "compress";
  const auto& p = object_field(c, all, label, "rope_parameters");
  const auto given = [&](const char* key) { return p.contains(key) && !p.at(key).is_null(); };
  const auto number = [&](const char* key) {
    if (!given(key) || !p.at(key).is_number())
      throw CaseError(fmt::format("{}: config rope_parameters.{}.{} is missing or not a number", c.name, label, key));
    return p.at(key).get<double>();
  };
  const std::string type = p.value("rope_type", std::string("default"));
  const double theta = number("rope_theta");
  if (type == "default") return af::Rope(rope_dim, theta, af::RopeLayout::adjacent);
  if (type != "yarn")
    throw CaseError(
        fmt::format("{}: config rope_parameters.{}.rope_type \"{}\" is not supported (this build: "
                    "default, yarn)",
                    c.name, label, type));
  static const std::set<std::string> known = {
      "rope_type", "type",      "rope_theta", "partial_rotary_factor", "factor", "original_max_position_embeddings",
      "beta_fast", "beta_slow", "truncate",   "attention_factor",      "mscale", "mscale_all_dim"};
  for (const auto& [key, value] : p.items())
    if (!known.contains(key))
      throw CaseError(fmt::format("{}: config rope_parameters.{} has field \"{}\", which this build does not know",
                                  c.name, label, key));
  af::YarnScaling yarn;
  yarn.original_context = number("original_max_position_embeddings");
  yarn.factor = given("factor") ? number("factor") : c.config_double("max_position_embeddings") / yarn.original_context;
  if (given("beta_fast") && number("beta_fast") != 0.0) yarn.beta_fast = number("beta_fast");
  if (given("beta_slow") && number("beta_slow") != 0.0) yarn.beta_slow = number("beta_slow");
  if (given("truncate")) yarn.truncate = p.at("truncate").get<bool>();
  if (given("attention_factor")) yarn.attention_factor = number("attention_factor");
  if (given("mscale")) yarn.mscale = number("mscale");
  if (given("mscale_all_dim")) yarn.mscale_all_dim = number("mscale_all_dim");
  try {
    return af::Rope(rope_dim, theta, af::RopeLayout::adjacent, yarn);
  } catch (const af::Error& e) {
    throw CaseError(fmt::format("{}: rope_parameters.{}: {}", c.name, label, e.what()));
  }
}
}  // namespace

std::vector<Outputs> run_deepseek_v4(const Case& c) {
  af::V4Shape s;
  try {
    s.kind = af::v4_layer_kind(c.layer_type);
  } catch (const af::Error& e) {
    throw CaseError(fmt::format("{}: layer_type: {}", c.name, e.what()));
  }
  s.hidden = c.config_int("hidden_size");
  s.heads = c.config_int("num_attention_heads");
  if (c.config_int("num_key_value_heads") != 1)
    throw CaseError(fmt::format("{}: config num_key_value_heads {} (expected 1: one shared K = V head)", c.name,
                                c.config_int("num_key_value_heads")));
  s.head_dim = c.config_int("head_dim");
  s.rope_dim = static_cast<std::int64_t>(static_cast<double>(s.head_dim) * c.config_double("partial_rotary_factor"));
  s.q_lora_rank = c.config_int("q_lora_rank");
  s.window = c.config_int("sliding_window");
  s.o_groups = c.config_int("o_groups");
  s.o_lora_rank = c.config_int("o_lora_rank");
  s.rms_norm_eps = c.config_double("rms_norm_eps");
  if (c.config.value("attention_bias", false))
    throw CaseError(fmt::format("{}: config attention_bias true is not supported (the module has no biases)", c.name));
  if (s.compressed()) {
    const auto& rates = object_field(c, c.config, "compress_rates", "");
    if (!rates.contains(c.layer_type) || !rates.at(c.layer_type).is_number_integer())
      throw CaseError(fmt::format("{}: config compress_rates has no \"{}\"", c.name, c.layer_type));
    s.ratio = rates.at(c.layer_type).get<std::int64_t>();
  }
  if (s.kind == af::V4LayerKind::csa) {
    s.index_heads = c.config_int("index_n_heads");
    s.index_head_dim = c.config_int("index_head_dim");
    s.index_topk = c.config_int("index_topk");
  }
  try {
    s.validate();
  } catch (const af::Error& e) {
    throw CaseError(fmt::format("{}: {}", c.name, e.what()));
  }
  const af::Rope rope = read_v4_rope(c, s.kind, s.rope_dim);

  const std::int64_t h = s.hidden, hc = s.heads * s.head_dim, cw = s.head_dim;
  af::V4Weights w;
  w.q_a_proj = c.tensor("q_a_proj.weight", af::Shape{s.q_lora_rank, h});
  w.q_a_norm = c.tensor("q_a_norm.weight", af::Shape{s.q_lora_rank});
  w.q_b_proj = c.tensor("q_b_proj.weight", af::Shape{hc, s.q_lora_rank});
  w.kv_proj = c.tensor("kv_proj.weight", af::Shape{cw, h});
  w.kv_norm = c.tensor("kv_norm.weight", af::Shape{cw});
  w.o_a_proj = c.tensor("o_a_proj.weight", af::Shape{s.o_groups * s.o_lora_rank, hc / s.o_groups});
  w.o_b_proj = c.tensor("o_b_proj.weight", af::Shape{h, s.o_groups * s.o_lora_rank});
  w.sinks = c.tensor("sinks", af::Shape{s.heads});
  const auto compressor = [&](const std::string& prefix, std::int64_t series, std::int64_t width) {
    return af::CompressorWeights{c.tensor(prefix + "kv_proj.weight", af::Shape{series * width, h}),
                                 c.tensor(prefix + "gate_proj.weight", af::Shape{series * width, h}),
                                 c.tensor(prefix + "position_bias", af::Shape{s.ratio, series * width}),
                                 c.tensor(prefix + "kv_norm.weight", af::Shape{width})};
  };
  if (s.compressed()) w.compressor = compressor("compressor.", s.kind == af::V4LayerKind::csa ? 2 : 1, cw);
  if (s.kind == af::V4LayerKind::csa) {
    w.indexer = compressor("compressor.indexer.", 2, s.index_head_dim);
    w.indexer_q_b_proj =
        c.tensor("compressor.indexer.q_b_proj.weight", af::Shape{s.index_heads * s.index_head_dim, s.q_lora_rank});
    w.indexer_weights_proj = c.tensor("compressor.indexer.scorer.weights_proj.weight", af::Shape{s.index_heads, h});
  }

  const std::int64_t T = c.prefill_len, N = c.decode_steps;
  const af::Tensor x = c.tensor("input.hidden_states", af::Shape{1, T + N, h}).reshaped(af::Shape{T + N, h});
  const std::vector<std::int64_t> positions = c.positions(T + N);

  af::V4Cache cache(s);
  Outputs out{af::Tensor{}, af::Tensor(af::Shape{N, h}), std::string(af::name_of(s.kind))};
  Selection picks{"indexer", T + N, s.index_topk, {}};
  const auto record = [&](const af::V4Trace& trace) {
    for (std::vector<std::int64_t> row : trace.selected) {
      row.resize(static_cast<std::size_t>(s.index_topk), -1);  // the call's min(top-k, entries), then padding
      picks.indices.insert(picks.indices.end(), row.begin(), row.end());
    }
  };
  af::V4Trace trace;
  out.prefill = af::v4_attention(x.matrix().rows_slice(0, T), std::span(positions).first(static_cast<std::size_t>(T)),
                                 s, w, rope, cache, &trace);
  record(trace);
  for (std::int64_t i = 0; i < N; ++i) {
    const af::Tensor step =
        af::v4_attention(x.matrix().rows_slice(T + i, 1),
                         std::span(positions).subspan(static_cast<std::size_t>(T + i), 1), s, w, rope, cache, &trace);
    std::ranges::copy(step.values(), out.decode.matrix().row(i).begin());
    record(trace);
  }
  if (s.kind == af::V4LayerKind::csa) out.selected.push_back(std::move(picks));
  return {std::move(out)};
}

}  // namespace oracle
