// The `deepseek_v3` reference: Hugging Face's DeepseekV3Attention (multi-head latent attention), recorded from a
// tiny random-weight model. The library computes it along both of MLA's exact paths from the latent cache:
// naive (rebuild per-head keys and values) and absorbed (fold the up-projections into query and output).
#include "af/mla.hpp"
#include "oracle.hpp"

#include <fmt/format.h>

#include <cmath>

namespace oracle {

std::vector<Outputs> run_deepseek_v3(const Case& c) {
  const af::MlaShape s = read_hf_mla_shape(c);

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

  const af::MlaWeights w = read_mla_weights(c, s);

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
