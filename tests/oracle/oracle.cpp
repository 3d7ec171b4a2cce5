#include "oracle.hpp"

#include "af/error.hpp"

#include <fmt/format.h>

#include <fstream>
#include <set>

namespace oracle {

namespace {
const nlohmann::json& field(const nlohmann::json& object, const std::string& key, const std::string& where) {
  if (!object.is_object() || !object.contains(key))
    throw CaseError(fmt::format("{}: missing field \"{}\"", where, key));
  return object.at(key);
}
}  // namespace

std::int64_t Case::config_int(const std::string& key) const {
  const auto& value = field(config, key, name + ": config");
  if (!value.is_number_integer())
    throw CaseError(fmt::format("{}: config \"{}\" is {} (expected an integer)", name, key, value.dump()));
  return value.get<std::int64_t>();
}

double Case::config_double(const std::string& key) const {
  const auto& value = field(config, key, name + ": config");
  if (!value.is_number())
    throw CaseError(fmt::format("{}: config \"{}\" is {} (expected a number)", name, key, value.dump()));
  return value.get<double>();
}

bool Case::config_bool(const std::string& key) const {
  const auto& value = field(config, key, name + ": config");
  if (!value.is_boolean())
    throw CaseError(fmt::format("{}: config \"{}\" is {} (expected true or false)", name, key, value.dump()));
  return value.get<bool>();
}

af::Tensor Case::tensor(const std::string& tensor_name, const af::Shape& expected_shape) const {
  if (!tensors.contains(tensor_name))
    throw CaseError(fmt::format("{}: tensors.safetensors has no tensor \"{}\"", name, tensor_name));
  af::Tensor t = tensors.tensor(tensor_name);
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
    throw CaseError(
        fmt::format("{}: input.position_ids has {} dimensions (expected [1, {}])", name, stored.shape.size(), count));
  try {
    return tensors.integers("input.position_ids");
  } catch (const af::Error& e) {
    throw CaseError(fmt::format("{}: {}", name, e.what()));
  }
}

Case read_case(const std::filesystem::path& dir) {
  Case c;
  c.dir = dir;
  c.name = dir.filename().string();
  if (c.name.empty()) c.name = dir.parent_path().filename().string();
  const auto json_path = dir / "case.json";
  std::ifstream in(json_path);
  if (!in) throw CaseError(fmt::format("{}: cannot open {}", c.name, json_path.string()));
  nlohmann::json root;
  try {
    root = nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    throw CaseError(fmt::format("{}: case.json is not valid JSON: {}", c.name, e.what()));
  }
  const std::string where = c.name + ": case.json";
  try {
    c.reference = field(root, "reference", where).get<std::string>();
    c.layer_type = root.value("layer_type", "");
    c.config = field(root, "config", where);
    c.prefill_len = field(root, "prefill_len", where).get<std::int64_t>();
    c.decode_steps = field(root, "decode_steps", where).get<std::int64_t>();
    const auto& tolerance = field(root, "tolerance", where);
    c.max_abs = field(tolerance, "max_abs", where + " tolerance").get<double>();
    c.relative_to_expected = tolerance.contains("relative_to") && !tolerance.at("relative_to").is_null();
  } catch (const nlohmann::json::exception& e) {
    throw CaseError(fmt::format("{}: a field has the wrong type: {}", where, e.what()));
  }
  if (c.prefill_len < 1 || c.decode_steps < 0)
    throw CaseError(fmt::format("{}: prefill_len {} and decode_steps {} (expected >= 1 and >= 0)", where, c.prefill_len,
                                c.decode_steps));
  if (!(c.max_abs > 0.0)) throw CaseError(fmt::format("{}: tolerance max_abs is {} (expected > 0)", where, c.max_abs));
  try {
    c.tensors = af::SafetensorsFile::read(dir / "tensors.safetensors");
  } catch (const af::Error& e) {
    throw CaseError(fmt::format("{}: {}", c.name, e.what()));
  }
  return c;
}

af::GroupedShape read_hf_grouped_shape(const Case& c) {
  af::GroupedShape shape;
  shape.hidden = c.config_int("hidden_size");
  shape.heads = c.config_int("num_attention_heads");
  shape.kv_heads = c.config.contains("num_key_value_heads") && !c.config.at("num_key_value_heads").is_null()
                       ? c.config_int("num_key_value_heads")
                       : shape.heads;
  shape.head_dim = c.config.contains("head_dim") && !c.config.at("head_dim").is_null() ? c.config_int("head_dim")
                                                                                       : shape.hidden / shape.heads;
  try {
    shape.validate();
  } catch (const af::Error& e) {
    throw CaseError(fmt::format("{}: {}", c.name, e.what()));
  }
  return shape;
}

namespace {
// YaRN's settings as transformers reads them (modeling_rope_utils, `_compute_yarn_parameters`): `factor` (null:
// max_position_embeddings / original), `original_max_position_embeddings`, optional `beta_fast` (32), `beta_slow`
// (1), `truncate` (true), `attention_factor`, `mscale`, `mscale_all_dim`; a null or zero beta or mscale means the
// default, as there. Any other field is rejected by name rather than ignored.
af::YarnScaling read_hf_yarn(const Case& c, const nlohmann::json& params) {
  static const std::set<std::string> known = {
      "rope_type", "type",      "rope_theta", "partial_rotary_factor", "factor", "original_max_position_embeddings",
      "beta_fast", "beta_slow", "truncate",   "attention_factor",      "mscale", "mscale_all_dim"};
  for (const auto& [key, value] : params.items())
    if (!known.contains(key))
      throw CaseError(fmt::format("{}: yarn rope_parameters has field \"{}\" ({}), which this build does not know",
                                  c.name, key, value.dump()));
  const auto given = [&](const char* key) { return params.contains(key) && !params.at(key).is_null(); };
  const auto number = [&](const char* key) {
    if (!given(key)) throw CaseError(fmt::format("{}: yarn rope_parameters has no \"{}\"", c.name, key));
    if (!params.at(key).is_number())
      throw CaseError(
          fmt::format("{}: yarn rope_parameters \"{}\" is {} (expected a number)", c.name, key, params.at(key).dump()));
    return params.at(key).get<double>();
  };
  af::YarnScaling yarn;
  yarn.original_context = number("original_max_position_embeddings");
  yarn.factor = given("factor") ? number("factor") : c.config_double("max_position_embeddings") / yarn.original_context;
  if (given("beta_fast") && number("beta_fast") != 0.0) yarn.beta_fast = number("beta_fast");
  if (given("beta_slow") && number("beta_slow") != 0.0) yarn.beta_slow = number("beta_slow");
  if (given("truncate")) {
    if (!params.at("truncate").is_boolean())
      throw CaseError(fmt::format("{}: yarn rope_parameters \"truncate\" is {} (expected true or false)", c.name,
                                  params.at("truncate").dump()));
    yarn.truncate = params.at("truncate").get<bool>();
  }
  if (given("attention_factor")) yarn.attention_factor = number("attention_factor");
  if (given("mscale")) yarn.mscale = number("mscale");
  if (given("mscale_all_dim")) yarn.mscale_all_dim = number("mscale_all_dim");
  return yarn;
}
}  // namespace

// transformers 5 keeps the rotary settings in `rope_parameters`; earlier versions used `rope_theta` and
// `rope_scaling`. Either is read.
af::Rope read_hf_rope(const Case& c, std::int64_t head_dim, af::RopeLayout layout) {
  const nlohmann::json& config = c.config;
  const nlohmann::json* params = nullptr;
  double theta = 0.0;
  if (config.contains("rope_parameters") && config.at("rope_parameters").is_object()) {
    params = &config.at("rope_parameters");
    if (!params->contains("rope_theta"))
      throw CaseError(fmt::format("{}: config rope_parameters has no rope_theta", c.name));
    theta = params->at("rope_theta").get<double>();
  } else {
    theta = c.config_double("rope_theta");
    if (config.contains("rope_scaling") && config.at("rope_scaling").is_object()) params = &config.at("rope_scaling");
  }
  if (params != nullptr && params->contains("partial_rotary_factor") &&
      params->at("partial_rotary_factor").is_number() && params->at("partial_rotary_factor").get<double>() != 1.0)
    throw CaseError(fmt::format("{}: partial_rotary_factor {} is not supported", c.name,
                                params->at("partial_rotary_factor").dump()));
  std::optional<af::Llama3Scaling> scaling;
  if (params != nullptr) {
    const std::string type = params->value("rope_type", params->value("type", std::string("default")));
    if (type == "llama3") {
      const auto number = [&](const char* key) {
        if (!params->contains(key)) throw CaseError(fmt::format("{}: llama3 rope scaling has no \"{}\"", c.name, key));
        return params->at(key).get<double>();
      };
      scaling = af::Llama3Scaling{number("factor"), number("low_freq_factor"), number("high_freq_factor"),
                                  number("original_max_position_embeddings")};
    } else if (type == "yarn") {
      return af::Rope(head_dim, theta, layout, read_hf_yarn(c, *params));
    } else if (type != "default") {
      throw CaseError(fmt::format("{}: rope type \"{}\" is not supported (this build knows default, llama3 and yarn)",
                                  c.name, type));
    }
  }
  return af::Rope(head_dim, theta, layout, scaling);
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
  };
  return table;
}

af::MlaShape read_hf_mla_shape(const Case& c) {
  af::MlaShape s;
  s.hidden = c.config_int("hidden_size");
  s.heads = c.config_int("num_attention_heads");
  s.q_lora_rank =
      c.config.contains("q_lora_rank") && !c.config.at("q_lora_rank").is_null() ? c.config_int("q_lora_rank") : 0;
  s.kv_lora_rank = c.config_int("kv_lora_rank");
  s.qk_nope_head_dim = c.config_int("qk_nope_head_dim");
  s.qk_rope_head_dim = c.config_int("qk_rope_head_dim");
  s.v_head_dim = c.config_int("v_head_dim");
  s.rms_norm_eps = 1e-6;
  try {
    s.validate();
  } catch (const af::Error& e) {
    throw CaseError(fmt::format("{}: {}", c.name, e.what()));
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
