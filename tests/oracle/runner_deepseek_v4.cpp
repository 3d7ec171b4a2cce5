// The `deepseek_v4` reference: Hugging Face's DeepseekV4Attention (sliding, compressed sparse and heavily
// compressed layers), recorded from a tiny random-weight model. The library runs the layer kind the case names
// through its own V4Cache (window, compressor state, indexer state), and reports the indexer's selections of a
// CSA layer for comparison with the reference's.
#include "af/compressed_attention.hpp"
#include "oracle.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>

namespace oracle {

namespace {
// The RoPE of the layer's kind: rope_parameters.main (sliding) or .compress (CSA, HCA); interleaved pairs on the
// last rope_dim values. Types "default" and "yarn" (the published compressed layers': the config forces YaRN's
// attention factor to 1 there). YaRN's fields as transformers reads them; an unknown field is rejected by name.
af::Rope read_v4_rope(const Case& c, af::V4LayerKind kind, std::int64_t rope_dim) {
  const std::string label = kind == af::V4LayerKind::sliding ? "main" : "compress";
  const Fields p = c.config_fields().object("rope_parameters").object(label);
  const std::string type = p.string_or("rope_type", "default");
  const double theta = p.number("rope_theta");
  try {
    if (type == "default") return af::Rope(rope_dim, theta, af::RopeLayout::adjacent);
    if (type != "yarn")
      throw CaseError(
          fmt::format("{} \"{}\" is not supported (this build: default, yarn)", p.label("rope_type"), type));
    return af::Rope(rope_dim, theta, af::RopeLayout::adjacent, read_yarn_fields(c, p));
  } catch (const af::Error& e) {
    throw CaseError(fmt::format("{}: config rope_parameters.{}: {}", c.name, label, e.what()));
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
  const Fields config = c.config_fields();
  s.hidden = config.integer("hidden_size");
  s.heads = config.integer("num_attention_heads");
  if (config.integer("num_key_value_heads") != 1)
    throw CaseError(fmt::format("{} is {} (expected 1: one shared K = V head)", config.label("num_key_value_heads"),
                                config.integer("num_key_value_heads")));
  s.head_dim = config.integer("head_dim");
  // The rotated tail is head_dim * partial_rotary_factor values: a factor in (0, 1] that gives a whole number
  // (checked before any conversion to an integer).
  const double rotary_fraction = config.number("partial_rotary_factor");
  const double rope_values = static_cast<double>(s.head_dim) * rotary_fraction;
  if (!(rotary_fraction > 0.0 && rotary_fraction <= 1.0) || rope_values != std::floor(rope_values))
    throw CaseError(fmt::format("{} is {} (expected a fraction in (0, 1] of head_dim {} that is a whole number)",
                                config.label("partial_rotary_factor"), rotary_fraction, s.head_dim));
  s.rope_dim = static_cast<std::int64_t>(rope_values);
  s.q_lora_rank = config.integer("q_lora_rank");
  s.window = config.integer("sliding_window");
  s.o_groups = config.integer("o_groups", 1);  // >= 1 before it divides anything
  s.o_lora_rank = config.integer("o_lora_rank");
  s.rms_norm_eps = config.number("rms_norm_eps");
  if (config.boolean_or("attention_bias", false))
    throw CaseError(fmt::format("{} true is not supported (the module has no biases)", config.label("attention_bias")));
  if (s.compressed()) s.ratio = config.object("compress_rates").integer(c.layer_type, 1);
  if (s.kind == af::V4LayerKind::csa) {
    s.index_heads = config.integer("index_n_heads");
    s.index_head_dim = config.integer("index_head_dim");
    s.index_topk = config.integer("index_topk");
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
