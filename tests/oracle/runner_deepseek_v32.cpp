// The `deepseek_v32` reference: Hugging Face's DeepseekV32Attention (DeepSeek sparse attention: MLA with a lightning
// indexer and top-k selection), recorded from a tiny random-weight model. The library computes it along both MLA
// paths from its own latent and index-key caches, and reports the indices it chose for every prefill row and decode
// step, which oracle_check compares with the case's `expected.selected.prefill` and `expected.selected.decode`.
#include "af/mla.hpp"
#include "af/sparse_attention.hpp"
#include "oracle.hpp"

#include <fmt/format.h>

namespace oracle {

std::vector<Outputs> run_deepseek_v32(const Case& c) {
  const af::MlaShape s = read_hf_mla_shape(c);
  if (s.q_lora_rank == 0)
    throw CaseError(
        fmt::format("{}: config q_lora_rank is null (the indexer reads the query latent: expected > 0)", c.name));
  af::IndexerShape ix;
  ix.hidden = s.hidden;
  ix.q_lora_rank = s.q_lora_rank;
  ix.heads = c.config_int("index_n_heads");
  ix.head_dim = c.config_int("index_head_dim");
  ix.rope_dim = s.qk_rope_head_dim;  // the indexer rotates as many dimensions as MLA's RoPE key has
  ix.top_k = c.config_int("index_topk");
  ix.norm_eps = 1e-6;  // k_norm is nn.LayerNorm(index_head_dim, eps=1e-6)
  if (c.config_fields().integer_or("num_key_value_heads", s.heads) != s.heads)
    throw CaseError(fmt::format("{}: config num_key_value_heads {} (expected num_attention_heads {})", c.name,
                                c.config_int("num_key_value_heads"), s.heads));
  try {
    ix.validate();
  } catch (const af::Error& e) {
    throw CaseError(fmt::format("{}: {}", c.name, e.what()));
  }

  // MLA rotates adjacent pairs (Hugging Face permutes them to half-split first: the same scores); the indexer
  // rotates half-split pairs of its first qk_rope_head_dim dimensions. Both use the model's one rotary embedding
  // (YaRN's frequencies when the config asks for them); MLA's softmax scale carries YaRN's mscale^2.
  const DeepseekRope settings = read_deepseek_rope(c);
  const af::Rope mla_rope = settings.rope(c, s.qk_rope_head_dim, af::RopeLayout::adjacent);
  const af::Rope index_rope = settings.rope(c, ix.rope_dim, af::RopeLayout::half_split);
  const double scale = af::mla_softmax_scale(s, settings.yarn);

  const af::MlaWeights w = read_mla_weights(c, s);
  af::IndexerWeights iw;
  iw.wq_b = c.tensor("indexer.wq_b.weight", af::Shape{ix.heads * ix.head_dim, ix.q_lora_rank});
  iw.wk = c.tensor("indexer.wk.weight", af::Shape{ix.head_dim, ix.hidden});
  iw.k_norm_weight = c.tensor("indexer.k_norm.weight", af::Shape{ix.head_dim});
  iw.k_norm_bias = c.tensor("indexer.k_norm.bias", af::Shape{ix.head_dim});
  iw.weights_proj = c.tensor("indexer.weights_proj.weight", af::Shape{ix.heads, ix.hidden});

  const std::int64_t T = c.prefill_len, N = c.decode_steps, k = ix.top_k;
  const af::Tensor x =
      c.tensor("input.hidden_states", af::Shape{1, T + N, s.hidden}).reshaped(af::Shape{T + N, s.hidden});
  const std::vector<std::int64_t> positions = c.positions(T + N);

  std::vector<Outputs> results;
  for (const auto& [path, name] :
       {std::pair{af::MlaPath::naive, "naive"}, std::pair{af::MlaPath::absorbed, "absorbed"}}) {
    af::MlaCache cache(T + N, s.kv_lora_rank, s.qk_rope_head_dim);
    af::IndexerCache index_cache(T + N, ix.head_dim);
    af::DsaOutput prefill = af::dsa_attention(x.matrix().rows_slice(0, T), std::span(positions).first(T), s, w, ix, iw,
                                              mla_rope, index_rope, scale, path, cache, index_cache);
    Outputs out{std::move(prefill.output), af::Tensor(af::Shape{N, s.hidden}), name};
    out.selected.push_back({"prefill", T, k, std::move(prefill.selected)});
    Selection decode{"decode", N, k, {}};
    for (std::int64_t i = 0; i < N; ++i) {
      const af::DsaOutput step =
          af::dsa_attention(x.matrix().rows_slice(T + i, 1), std::span(positions).subspan(T + i, 1), s, w, ix, iw,
                            mla_rope, index_rope, scale, path, cache, index_cache);
      std::ranges::copy(step.output.values(), out.decode.matrix().row(i).begin());
      decode.indices.insert(decode.indices.end(), step.selected.begin(), step.selected.end());
    }
    if (N > 0) out.selected.push_back(std::move(decode));
    results.push_back(std::move(out));
  }
  return results;
}

}  // namespace oracle
