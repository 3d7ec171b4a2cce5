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
  const Fields config = c.config_fields();
  double theta = 0.0;
  std::optional<Fields> scaling;
  if (config.given("rope_parameters")) {
    scaling = config.object("rope_parameters");
    theta = scaling->number("rope_theta");
  } else {
    theta = config.number("rope_theta");
    if (config.given("rope_scaling")) scaling = config.object("rope_scaling");
  }
  if (scaling) {
    const std::string type = scaling->string_or("rope_type", scaling->string_or("type", "default"));
    if (type != "default")
      throw CaseError(fmt::format("{} \"{}\" is not supported for deepseek_v3 (this build: default)",
                                  scaling->label("rope_type"), type));
  }
  // rope_interleave (the default): the checkpoint's rope dimensions are adjacent pairs. Hugging Face permutes them
  // to the half-split layout before rotating; the scores are the same as rotating adjacent pairs in place.
  const bool interleave = config.boolean_or("rope_interleave", true);
  const af::Rope rope = [&] {
    try {
      return af::Rope(s.qk_rope_head_dim, theta, interleave ? af::RopeLayout::adjacent : af::RopeLayout::half_split);
    } catch (const af::Error& e) {
      throw CaseError(fmt::format("{}: config rope settings: {}", c.name, e.what()));
    }
  }();
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
