#include "oracle.hpp"

#include "af/error.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <set>

namespace oracle {

const af::StoredTensor& CaseTensors::stored(const std::string& name) const {
  read_.insert(name);
  return file_.stored(name);
}

af::Tensor CaseTensors::tensor(const std::string& name) const {
  read_.insert(name);
  return file_.tensor(name);
}

std::vector<std::int64_t> CaseTensors::integers(const std::string& name) const {
  read_.insert(name);
  return file_.integers(name);
}

std::vector<std::string> CaseTensors::unread() const {
  std::vector<std::string> unread;
  for (const auto& name : file_.names())
    if (!read_.contains(name)) unread.push_back(name);
  return unread;
}

Fields::Fields(std::string case_name, const nlohmann::json& object, std::string where)
    : case_name_(std::move(case_name)), object_(&object), where_(std::move(where)) {
  if (!object_->is_object())
    throw CaseError(fmt::format("{}: {} is {} (expected an object)", case_name_, where_, object_->type_name()));
}

std::string Fields::label(const std::string& key) const {
  return fmt::format("{}: {} \"{}\"", case_name_, where_, key);
}

bool Fields::given(const std::string& key) const { return object_->contains(key) && !object_->at(key).is_null(); }

const nlohmann::json& Fields::at(const std::string& key) const {
  if (!object_->contains(key)) throw CaseError(fmt::format("{} is missing", label(key)));
  return object_->at(key);
}

std::int64_t Fields::integer(const std::string& key, std::int64_t min, std::int64_t max) const {
  const nlohmann::json& value = at(key);
  const auto out_of_range = [&] {
    return CaseError(fmt::format("{} is {} (expected an integer in [{}, {}])", label(key), value.dump(), min, max));
  };
  if (value.is_number_unsigned()) {  // compared as unsigned: a value above INT64_MAX must not wrap
    const auto unsigned_value = value.get<std::uint64_t>();
    if (max < 0 || unsigned_value > static_cast<std::uint64_t>(max)) throw out_of_range();
    const auto result = static_cast<std::int64_t>(unsigned_value);
    if (result < min) throw out_of_range();
    return result;
  }
  if (!value.is_number_integer()) throw out_of_range();  // 3.0, 2.5, 1e20, "3", true, null
  const auto result = value.get<std::int64_t>();
  if (result < min || result > max) throw out_of_range();
  return result;
}

std::int64_t Fields::integer_or(const std::string& key, std::int64_t fallback, std::int64_t min,
                                std::int64_t max) const {
  return given(key) ? integer(key, min, max) : fallback;
}

double Fields::number(const std::string& key) const {
  const nlohmann::json& value = at(key);
  if (!value.is_number() || !std::isfinite(value.get<double>()))  // 1e400 parses as infinity
    throw CaseError(fmt::format("{} is {} (expected a finite number)", label(key), value.dump()));
  return value.get<double>();
}

double Fields::number_or(const std::string& key, double fallback) const { return given(key) ? number(key) : fallback; }

bool Fields::boolean(const std::string& key) const {
  const nlohmann::json& value = at(key);
  if (!value.is_boolean()) throw CaseError(fmt::format("{} is {} (expected true or false)", label(key), value.dump()));
  return value.get<bool>();
}

bool Fields::boolean_or(const std::string& key, bool fallback) const { return given(key) ? boolean(key) : fallback; }

std::string Fields::string(const std::string& key) const {
  const nlohmann::json& value = at(key);
  if (!value.is_string()) throw CaseError(fmt::format("{} is {} (expected a string)", label(key), value.dump()));
  return value.get<std::string>();
}

std::string Fields::string_or(const std::string& key, const std::string& fallback) const {
  return given(key) ? string(key) : fallback;
}

Fields Fields::object(const std::string& key) const {
  const nlohmann::json& value = at(key);
  if (!value.is_object()) throw CaseError(fmt::format("{} is {} (expected an object)", label(key), value.dump()));
  return Fields(case_name_, value, where_ + "." + key);
}

af::Tensor Case::tensor(const std::string& tensor_name, const af::Shape& expected_shape) const {
  if (!tensors.contains(tensor_name))
    throw CaseError(fmt::format("{}: tensors.safetensors has no tensor \"{}\"", name, tensor_name));
  af::Tensor t;
  try {
    t = tensors.tensor(tensor_name);
  } catch (const af::Error& e) {
    throw CaseError(fmt::format("{}: tensor \"{}\": {}", name, tensor_name, e.what()));
  }
  if (t.shape() != expected_shape)
    throw CaseError(fmt::format("{}: tensor \"{}\" is {} (expected {} from case.json)", name, tensor_name,
                                t.shape().str(), expected_shape.str()));
  return t;
}

af::Tensor Case::optional_tensor(const std::string& tensor_name, const af::Shape& expected_shape) const {
  return tensors.contains(tensor_name) ? tensor(tensor_name, expected_shape) : af::Tensor{};
}

std::vector<std::int64_t> Case::positions(std::int64_t count) const {
  if (!tensors.contains("input.position_ids"))
    throw CaseError(fmt::format("{}: tensors.safetensors has no tensor \"input.position_ids\"", name));
  const auto& stored = tensors.stored("input.position_ids");
  if (stored.shape != std::vector<std::int64_t>{1, count})
    throw CaseError(fmt::format("{}: tensor \"input.position_ids\" has shape [{}] (expected [1, {}])", name,
                                fmt::join(stored.shape, ", "), count));
  try {
    return tensors.integers("input.position_ids");
  } catch (const af::Error& e) {
    throw CaseError(fmt::format("{}: tensor \"input.position_ids\": {}", name, e.what()));
  }
}

namespace {

// Parses case.json, refusing nesting deeper than max_json_depth while parsing (nothing deeper is ever built, so
// nothing recursive — a copy, a dump — can run out of stack on it). The message names the object keys down to
// where the limit was passed.
nlohmann::json parse_bounded(std::istream& in, const std::string& where) {
  // nlohmann calls back with the depth of the enclosing containers: 0 for the top-level object's start, 1 for its
  // keys. keys[d - 1] is the last key read in the object at depth d.
  std::vector<std::string> keys;
  const auto guard = [&](int depth, nlohmann::json::parse_event_t event, nlohmann::json& parsed) {
    using Event = nlohmann::json::parse_event_t;
    const auto level = static_cast<std::size_t>(depth);
    if (event == Event::key && level >= 1) {
      keys.resize(level);
      keys.back() = parsed.get<std::string>();
    } else if ((event == Event::object_start || event == Event::array_start) && depth >= max_json_depth) {
      keys.resize(std::min(keys.size(), level));
      throw CaseError(fmt::format("{}: field \"{}\" nests objects and arrays deeper than {} levels", where,
                                  fmt::join(keys, "."), max_json_depth));
    }
    return true;
  };
  try {
    return nlohmann::json::parse(in, guard);
  } catch (const nlohmann::json::exception& e) {
    throw CaseError(fmt::format("{} is not valid JSON: {}", where, e.what()));
  }
}

}  // namespace

Case read_case(const std::filesystem::path& dir) {
  Case c;
  c.dir = dir;
  c.name = dir.filename().string();
  if (c.name.empty()) c.name = dir.parent_path().filename().string();
  const auto json_path = dir / "case.json";
  const std::string where = c.name + ": case.json";
  std::error_code error;
  const auto bytes = std::filesystem::file_size(json_path, error);
  if (error) throw CaseError(fmt::format("{}: cannot read {}: {}", c.name, json_path.string(), error.message()));
  if (bytes > max_case_json_bytes)
    throw CaseError(fmt::format("{} is {} bytes (at most {})", where, bytes, max_case_json_bytes));
  std::ifstream in(json_path);
  if (!in) throw CaseError(fmt::format("{}: cannot open {}", c.name, json_path.string()));
  c.root = parse_bounded(in, where);

  const Fields fields = c.case_fields();
  c.reference = fields.string("reference");
  c.layer_type = fields.string_or("layer_type", "");
  c.config = fields.object("config").json();
  c.prefill_len = fields.integer("prefill_len", 1, max_tokens);
  c.decode_steps = fields.integer("decode_steps", 0, max_tokens);
  c.position_offset = fields.integer_or("position_offset", 0, 0, max_position_offset);

  // The tolerance: a plain number A means {"max_abs": A, "relative_to": "max(1, max|expected|)"} (the
  // contract's default form); an object names max_abs and relative_to, and nothing else.
  const nlohmann::json& tolerance = fields.at("tolerance");
  const std::string bound = fmt::format("(expected a finite number > 0 and <= {})", max_tolerance);
  if (tolerance.is_number()) {
    c.max_abs = fields.number("tolerance");
    c.relative_to_expected = true;
    if (!(c.max_abs > 0.0 && c.max_abs <= max_tolerance))
      throw CaseError(fmt::format("{} is {} {}", fields.label("tolerance"), tolerance.dump(), bound));
  } else if (tolerance.is_object()) {
    const Fields tol = fields.object("tolerance");
    for (const auto& [key, value] : tolerance.items())
      if (key != "max_abs" && key != "relative_to")
        throw CaseError(fmt::format("{} is not a tolerance field (expected max_abs and relative_to)", tol.label(key)));
    c.max_abs = tol.number("max_abs");
    if (!(c.max_abs > 0.0 && c.max_abs <= max_tolerance))
      throw CaseError(fmt::format("{} is {} {}", tol.label("max_abs"), tol.at("max_abs").dump(), bound));
    if (tol.given("relative_to")) {
      const nlohmann::json& relative_to = tol.at("relative_to");
      if (!relative_to.is_string() || relative_to.get<std::string>() != relative_to_expected_form)
        throw CaseError(fmt::format("{} is {} (expected \"{}\" or null)", tol.label("relative_to"), relative_to.dump(),
                                    relative_to_expected_form));
      c.relative_to_expected = true;
    }
  } else {
    throw CaseError(fmt::format("{} is {} (expected a number or an object with max_abs and relative_to)",
                                fields.label("tolerance"), tolerance.dump()));
  }
  try {
    c.tensors = CaseTensors(af::SafetensorsFile::read(dir / "tensors.safetensors"));
  } catch (const af::Error& e) {
    throw CaseError(fmt::format("{}: tensors.safetensors: {}", c.name, e.what()));
  }
  return c;
}

af::GroupedShape read_hf_grouped_shape(const Case& c) {
  const Fields config = c.config_fields();
  af::GroupedShape shape;
  shape.hidden = config.integer("hidden_size", 1);
  shape.heads = config.integer("num_attention_heads", 1);  // >= 1 before it divides anything
  shape.kv_heads = config.integer_or("num_key_value_heads", shape.heads, 1);
  shape.head_dim = config.integer_or("head_dim", shape.hidden / shape.heads, 1);
  try {
    shape.validate();
  } catch (const af::Error& e) {
    throw CaseError(fmt::format("{}: config: {}", c.name, e.what()));
  }
  return shape;
}

af::YarnScaling read_yarn_fields(const Case& c, const Fields& params) {
  static const std::set<std::string> known = {
      "rope_type", "type",      "rope_theta", "partial_rotary_factor", "factor", "original_max_position_embeddings",
      "beta_fast", "beta_slow", "truncate",   "attention_factor",      "mscale", "mscale_all_dim"};
  for (const auto& [key, value] : params.json().items())
    if (!known.contains(key))
      throw CaseError(fmt::format("{} ({}) is a yarn field this build does not know", params.label(key), value.dump()));
  af::YarnScaling yarn;
  yarn.original_context = params.number("original_max_position_embeddings");
  yarn.factor = params.given("factor") ? params.number("factor")
                                       : c.config_double("max_position_embeddings") / yarn.original_context;
  if (const double beta_fast = params.number_or("beta_fast", 0.0); beta_fast != 0.0) yarn.beta_fast = beta_fast;
  if (const double beta_slow = params.number_or("beta_slow", 0.0); beta_slow != 0.0) yarn.beta_slow = beta_slow;
  yarn.truncate = params.boolean_or("truncate", yarn.truncate);
  if (params.given("attention_factor")) yarn.attention_factor = params.number("attention_factor");
  yarn.mscale = params.number_or("mscale", yarn.mscale);
  yarn.mscale_all_dim = params.number_or("mscale_all_dim", yarn.mscale_all_dim);
  return yarn;
}

af::Rope read_rope_parameters(const Case& c, const Fields& params, std::int64_t head_dim, af::RopeLayout layout) {
  const double theta = params.number("rope_theta");
  if (params.number_or("partial_rotary_factor", 1.0) != 1.0)
    throw CaseError(fmt::format("{} {} is not supported (expected 1)", params.label("partial_rotary_factor"),
                                params.at("partial_rotary_factor").dump()));
  const std::string type = params.string_or("rope_type", params.string_or("type", "default"));
  try {
    if (type == "default") return af::Rope(head_dim, theta, layout);
    if (type == "llama3")
      return af::Rope(
          head_dim, theta, layout,
          af::Llama3Scaling{params.number("factor"), params.number("low_freq_factor"),
                            params.number("high_freq_factor"), params.number("original_max_position_embeddings")});
    if (type == "linear") {
      static const std::set<std::string> known = {"rope_type", "type", "rope_theta", "partial_rotary_factor", "factor"};
      for (const auto& [key, value] : params.json().items())
        if (!known.contains(key))
          throw CaseError(fmt::format("{} ({}) is a linear-scaling field this build does not know", params.label(key),
                                      value.dump()));
      return af::Rope(head_dim, theta, layout, af::LinearScaling{params.number("factor")});
    }
    if (type == "yarn") return af::Rope(head_dim, theta, layout, read_yarn_fields(c, params));
  } catch (const af::Error& e) {
    throw CaseError(fmt::format("{}: config rope settings: {}", c.name, e.what()));
  }
  throw CaseError(fmt::format("{} \"{}\" is not supported (this build knows default, llama3, linear and yarn)",
                              params.label("rope_type"), type));
}

// transformers 5 keeps the rotary settings in `rope_parameters`; earlier versions used `rope_theta` and
// `rope_scaling`. Either is read.
af::Rope read_hf_rope(const Case& c, std::int64_t head_dim, af::RopeLayout layout) {
  const Fields config = c.config_fields();
  if (config.given("rope_parameters"))
    return read_rope_parameters(c, config.object("rope_parameters"), head_dim, layout);
  if (!config.given("rope_scaling")) {
    try {
      return af::Rope(head_dim, config.number("rope_theta"), layout);
    } catch (const af::Error& e) {
      throw CaseError(fmt::format("{}: config rope settings: {}", c.name, e.what()));
    }
  }
  // The older form: theta beside the scaling object; read them as one.
  nlohmann::json merged = config.at("rope_scaling");
  merged["rope_theta"] = config.number("rope_theta");
  return read_rope_parameters(c, Fields(c.name, merged, "config.rope_scaling"), head_dim, layout);
}

DeepseekRope read_deepseek_rope(const Case& c) {
  const Fields config = c.config_fields();
  nlohmann::json merged;
  std::string where = "config.rope_parameters";
  if (config.given("rope_parameters")) {
    merged = config.at("rope_parameters");
  } else {
    where = "config.rope_scaling";
    merged = config.given("rope_scaling") ? config.at("rope_scaling") : nlohmann::json::object();
    merged["rope_theta"] = config.number("rope_theta");
  }
  const Fields params(c.name, merged, where);
  DeepseekRope out;
  out.theta = params.number("rope_theta");
  const std::string type = params.string_or("rope_type", params.string_or("type", "default"));
  if (type == "yarn") {
    out.yarn = read_yarn_fields(c, params);
  } else if (type != "default") {
    throw CaseError(fmt::format("{} \"{}\" is not supported for DeepSeek's MLA (this build: default and yarn)",
                                params.label("rope_type"), type));
  }
  return out;
}

af::Rope DeepseekRope::rope(const Case& c, std::int64_t dim, af::RopeLayout layout) const {
  try {
    return yarn ? af::Rope(dim, theta, layout, *yarn) : af::Rope(dim, theta, layout);
  } catch (const af::Error& e) {
    throw CaseError(fmt::format("{}: config rope settings: {}", c.name, e.what()));
  }
}

af::GroupedWeights read_grouped_weights(const Case& c, const af::GroupedShape& shape, bool qkv_bias, bool o_bias) {
  const std::int64_t h = shape.hidden, qd = shape.heads * shape.head_dim, kvd = shape.kv_heads * shape.head_dim;
  af::GroupedWeights w;
  w.q_proj = c.tensor("q_proj.weight", af::Shape{qd, h});
  w.k_proj = c.tensor("k_proj.weight", af::Shape{kvd, h});
  w.v_proj = c.tensor("v_proj.weight", af::Shape{kvd, h});
  w.o_proj = c.tensor("o_proj.weight", af::Shape{h, qd});
  if (qkv_bias) {
    w.q_bias = c.tensor("q_proj.bias", af::Shape{qd});
    w.k_bias = c.tensor("k_proj.bias", af::Shape{kvd});
    w.v_bias = c.tensor("v_proj.bias", af::Shape{kvd});
  }
  if (o_bias) w.o_bias = c.tensor("o_proj.bias", af::Shape{h});
  return w;
}

Outputs replay_qk_norm_layer(const Case& c, const af::GroupedShape& shape, const af::GroupedWeights& weights,
                             const af::QkNorm& norm, const af::Rope& rope, const af::AttentionOptions& options,
                             std::int64_t window) {
  const std::int64_t h = shape.hidden, T = c.prefill_len, N = c.decode_steps;
  const af::Tensor x = c.tensor("input.hidden_states", af::Shape{1, T + N, h}).reshaped(af::Shape{T + N, h});
  const std::vector<std::int64_t> positions = c.positions(T + N);
  const auto replay = [&](auto& cache) {
    Outputs out{af::qk_norm_attention(x.matrix().rows_slice(0, T), std::span(positions).first(T), shape, weights, norm,
                                      rope, options, cache),
                af::Tensor(af::Shape{N, h}), window > 0 ? "ring" : "full"};
    for (std::int64_t i = 0; i < N; ++i) {
      const af::Tensor step =
          af::qk_norm_attention(x.matrix().rows_slice(T + i, 1), std::span(positions).subspan(T + i, 1), shape, weights,
                                norm, rope, options, cache);
      std::ranges::copy(step.values(), out.decode.matrix().row(i).begin());
    }
    return out;
  };
  if (window > 0) {
    af::RollingKvCache ring(window, shape.kv_heads, shape.head_dim);
    return replay(ring);
  }
  af::GroupedKvCache cache(T + N, shape.kv_heads, shape.head_dim);
  return replay(cache);
}

std::vector<StateComparison> delta_cache_comparisons(const Case& c, const std::string& when,
                                                     const af::Tensor& conv_inputs, std::int64_t conv_kernel,
                                                     const af::Tensor& state) {
  const std::int64_t K = conv_kernel, channels = conv_inputs.dim(1), kept = K - 1;
  std::vector<StateComparison> out;

  // The convolution: the library's row j (token-major) is the reference's column j + 1 (channel-major).
  StateComparison conv{fmt::format("expected.{}.conv_state", when), fmt::format("last {} of {} inputs", kept, K),
                       std::nullopt, af::Tensor(af::Shape{kept, channels})};
  std::copy(conv_inputs.data(), conv_inputs.data() + kept * channels, conv.got.data());
  if (c.tensors.contains(conv.tensor)) {
    const af::Tensor recorded = c.tensor(conv.tensor, af::Shape{1, channels, K});
    af::Tensor mapped(af::Shape{kept, channels});
    for (std::int64_t j = 0; j < kept; ++j)
      for (std::int64_t ch = 0; ch < channels; ++ch) mapped.data()[j * channels + ch] = recorded.data()[ch * K + j + 1];
    conv.expected = std::move(mapped);
  }
  out.push_back(std::move(conv));

  // The delta rule's state: [1, H, d_k, d_v] and [H, d_k, d_v] hold the same elements in the same order.
  StateComparison rule{fmt::format("expected.{}.recurrent_state", when), state.shape().str(), std::nullopt, state};
  if (c.tensors.contains(rule.tensor))
    rule.expected =
        c.tensor(rule.tensor, af::Shape{1, state.dim(0), state.dim(1), state.dim(2)}).reshaped(state.shape());
  out.push_back(std::move(rule));
  return out;
}

const std::map<std::string, Runner>& runners() {
  static const std::map<std::string, Runner> table = {
      {"sdpa", run_sdpa},
      {"llama", run_llama},
      {"deepseek_v3", run_deepseek_v3},
      {"deepseek_v32", run_deepseek_v32},
      {"deepseek_v4", run_deepseek_v4},
      {"mistral", run_mistral},
      {"sdpa_sinks", run_sdpa_sinks},
      {"gpt_oss", run_gpt_oss},
      {"flex_block_mask", run_flex_block_mask},
      {"minimax", run_minimax},
      {"qwen3_next", run_qwen3_next},
      {"kimi_linear", run_kimi_linear},
      {"qwen3", run_qwen3},
      {"gemma3", run_gemma3},
      {"gemma3n", run_gemma3n},
  };
  return table;
}

af::MlaShape read_hf_mla_shape(const Case& c) {
  const Fields config = c.config_fields();
  af::MlaShape s;
  s.hidden = config.integer("hidden_size");
  s.heads = config.integer("num_attention_heads");
  s.q_lora_rank = config.integer_or("q_lora_rank", 0);
  s.kv_lora_rank = config.integer("kv_lora_rank");
  s.qk_nope_head_dim = config.integer("qk_nope_head_dim");
  s.qk_rope_head_dim = config.integer("qk_rope_head_dim");
  s.v_head_dim = config.integer("v_head_dim");
  s.rms_norm_eps = 1e-6;
  try {
    s.validate();
  } catch (const af::Error& e) {
    throw CaseError(fmt::format("{}: config: {}", c.name, e.what()));
  }
  return s;
}

af::MlaWeights read_mla_weights(const Case& c, const af::MlaShape& s) {
  af::MlaWeights w;
  const std::int64_t q_out = s.heads * s.qk_head_dim();
  if (s.q_lora_rank > 0) {
    w.q_a_proj = c.tensor("q_a_proj.weight", af::Shape{s.q_lora_rank, s.hidden});
    w.q_a_layernorm = c.tensor("q_a_layernorm.weight", af::Shape{s.q_lora_rank});
    w.q_b_proj = c.tensor("q_b_proj.weight", af::Shape{q_out, s.q_lora_rank});
  } else {
    w.q_proj = c.tensor("q_proj.weight", af::Shape{q_out, s.hidden});
  }
  w.kv_a_proj_with_mqa =
      c.tensor("kv_a_proj_with_mqa.weight", af::Shape{s.kv_lora_rank + s.qk_rope_head_dim, s.hidden});
  w.kv_a_layernorm = c.tensor("kv_a_layernorm.weight", af::Shape{s.kv_lora_rank});
  w.kv_b_proj = c.tensor("kv_b_proj.weight", af::Shape{s.heads * (s.qk_nope_head_dim + s.v_head_dim), s.kv_lora_rank});
  w.o_proj = c.tensor("o_proj.weight", af::Shape{s.hidden, s.heads * s.v_head_dim});
  for (const char* bias : {"q_a_proj.bias", "kv_a_proj_with_mqa.bias", "o_proj.bias"})
    if (c.tensors.contains(bias))
      throw CaseError(fmt::format("{}: tensor \"{}\" present: MLA attention biases are not supported", c.name, bias));
  return w;
}

}  // namespace oracle
