// The `deepseek_v3` reference: Hugging Face's DeepseekV3Attention (multi-head latent attention), recorded from a
// tiny random-weight model. The library computes it along both of MLA's exact paths from the latent cache:
// naive (rebuild per-head keys and values) and absorbed (fold the up-projections into query and output).
#include "af/mla.hpp"
#include "oracle.hpp"

#include <fmt/format.h>

#include <cmath>

namespace oracle {

std::vector<Outputs> run_deepseek_v3(const Case& c) {
  af::MlaShape s;
  s.hidden = c.config_int("hidden_size");
  s.heads = c.config_int("num_attention_heads");
  s.q_lora_rank =
      c.config.contains("q_lora_rank") && !c.config.at("q_lora_rank").is_null() ? c.config_int("q_lora_rank") : 0;
  s.kv_lora_rank = c.config_int("kv_lora_rank");
  s.qk_nope_head_dim = c.config_int("qk_nope_head_dim");
  s.qk_rope_head_dim = c.config_int("qk_rope_head_dim");
  s.v_head_dim = c.config_int("v_head_dim");
  // The reference builds both of its RMSNorms (q_a_layernorm, kv_a_layernorm) with the class default eps 1e-6,
  // whatever the config's rms_norm_eps says (that one is for the decoder layer's norms).
  s.rms_norm_eps = 1e-6;
  try {
    s.validate();
  } catch (const af::Error& e) {
    throw CaseError(fmt::format("{}: {}", c.name, e.what()));
  }

  // RoPE: theta from rope_parameters (transformers 5) or rope_theta; scaled variants (YaRN) are not implemented.
  double theta = 0.0;
  const nlohmann::json* scaling = nullptr;
  if (c.config.contains("rope_parameters") && c.config.at("rope_parameters").is_object()) {
    const auto& p = c.config.at("rope_parameters");
    if (!p.contains("rope_theta")) throw CaseError(fmt::format("{}: config rope_parameters has no rope_theta", c.name));
    theta = p.at("rope_theta").get<double>();
    scaling = &p;
  } else {
    theta = c.config_double("rope_theta");
    if (c.config.contains("rope_scaling") && c.config.at("rope_scaling").is_object())
      scaling = &c.config.at("rope_scaling");
  }
  if (scaling != nullptr) {
    const std::string type = scaling->value("rope_type", scaling->value("type", std::string("default")));
    if (type != "default")
      throw CaseError(
          fmt::format("{}: rope type \"{}\" is not supported for deepseek_v3 (this build: default)", c.name, type));
  }
  // rope_interleave (the default): the checkpoint's rope dimensions are adjacent pairs. Hugging Face permutes them
  // to the half-split layout before rotating; the scores are the same as rotating adjacent pairs in place.
  const bool interleave = c.config.value("rope_interleave", true);
  const af::Rope rope(s.qk_rope_head_dim, theta, interleave ? af::RopeLayout::adjacent : af::RopeLayout::half_split);
  const double scale = 1.0 / std::sqrt(static_cast<double>(s.qk_head_dim()));

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
      throw CaseError(
          fmt::format("{}: tensor \"{}\" present: attention biases are not supported for deepseek_v3", c.name, bias));

  const std::int64_t T = c.prefill_len, N = c.decode_steps;
  const af::Tensor x =
      c.tensor("input.hidden_states", af::Shape{1, T + N, s.hidden}).reshaped(af::Shape{T + N, s.hidden});
  const std::vector<std::int64_t> positions = c.positions(T + N);

  std::vector<Outputs> results;
  for (const auto& [path, name] :
       {std::pair{af::MlaPath::naive, "naive"}, std::pair{af::MlaPath::absorbed, "absorbed"}}) {
    af::MlaCache cache(T + N, s.kv_lora_rank, s.qk_rope_head_dim);
    Outputs out{
        af::mla_attention(x.matrix().rows_slice(0, T), std::span(positions).first(T), s, w, rope, scale, path, cache),
        af::Tensor(af::Shape{N, s.hidden}), name};
    for (std::int64_t i = 0; i < N; ++i) {
      const af::Tensor step = af::mla_attention(x.matrix().rows_slice(T + i, 1), std::span(positions).subspan(T + i, 1),
                                                s, w, rope, scale, path, cache);
      std::ranges::copy(step.values(), out.decode.matrix().row(i).begin());
    }
    results.push_back(std::move(out));
  }
  return results;
}

}  // namespace oracle
