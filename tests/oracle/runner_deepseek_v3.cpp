// The `deepseek_v3` reference: Hugging Face's DeepseekV3Attention (multi-head latent attention), recorded from a
// tiny random-weight model. The library computes it along both of MLA's exact paths from the latent cache:
// naive (rebuild per-head keys and values) and absorbed (fold the up-projections into query and output). With YaRN
// (DeepSeek-V3 as released) the rotary frequencies are YaRN's and the softmax scale carries mscale^2.
#include "af/mla.hpp"
#include "oracle.hpp"

#include <fmt/format.h>

namespace oracle {

std::vector<Outputs> run_deepseek_v3(const Case& c) {
  const af::MlaShape s = read_hf_mla_shape(c);

  // RoPE: theta, and YaRN's settings when rope_type is "yarn" (as DeepSeek-V3 ships: factor 40, mscale and
  // mscale_all_dim 1, original context 4096). rope_interleave (the default): the checkpoint's rope dimensions are
  // adjacent pairs. Hugging Face permutes them to the half-split layout before rotating; the scores are the same as
  // rotating adjacent pairs in place.
  const DeepseekRope settings = read_deepseek_rope(c);
  const bool interleave = c.config_fields().boolean_or("rope_interleave", true);
  const af::Rope rope =
      settings.rope(c, s.qk_rope_head_dim, interleave ? af::RopeLayout::adjacent : af::RopeLayout::half_split);
  // 1/sqrt(qk_head_dim), times YaRN's mscale(factor, mscale_all_dim)^2 when the rope is scaled.
  const double scale = af::mla_softmax_scale(s, settings.yarn);

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
