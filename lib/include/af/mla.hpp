#pragma once
/// @file mla.hpp
/// Multi-head latent attention (MLA), the DeepSeek-V2/V3 formulation: keys and values of every head are
/// reconstructed from one small latent vector per token, which is all the cache keeps (besides one shared
/// RoPE key). Two exact decode paths: *naive* rebuilds per-head keys and values from the latent; *absorbed*
/// folds the up-projections into the query and the output and attends over the latent directly (chapter 07).

#include "af/rope.hpp"
#include "af/softmax.hpp"
#include "af/tensor.hpp"

#include <cstdint>
#include <optional>
#include <span>

namespace af {

/// The sizes of one MLA layer, named as in DeepSeek's configurations.
struct MlaShape {
  std::int64_t hidden = 0;
  std::int64_t heads = 0;
  std::int64_t q_lora_rank = 0;   ///< 0: queries projected directly (no low-rank query path)
  std::int64_t kv_lora_rank = 0;  ///< the latent's dimension r
  std::int64_t qk_nope_head_dim = 0;
  std::int64_t qk_rope_head_dim = 0;
  std::int64_t v_head_dim = 0;
  double rms_norm_eps = 1e-6;

  std::int64_t qk_head_dim() const { return qk_nope_head_dim + qk_rope_head_dim; }
  /// Throws af::Error naming the size that is not positive (or, for the rope part, not even).
  void validate() const;
};

/// The parameters of one MLA layer ([out, in] like nn.Linear; the norms are RMSNorm gains).
struct MlaWeights {
  Tensor q_a_proj;            ///< [q_lora_rank, hidden] (low-rank query path)
  Tensor q_a_layernorm;       ///< [q_lora_rank]
  Tensor q_b_proj;            ///< [H * qk_head_dim, q_lora_rank]
  Tensor q_proj;              ///< [H * qk_head_dim, hidden] (when q_lora_rank is 0)
  Tensor kv_a_proj_with_mqa;  ///< [kv_lora_rank + qk_rope_head_dim, hidden]: the latent and the shared RoPE key
  Tensor kv_a_layernorm;      ///< [kv_lora_rank]
  Tensor kv_b_proj;           ///< [H * (qk_nope_head_dim + v_head_dim), kv_lora_rank]: the per-head up-projections
  Tensor o_proj;              ///< [hidden, H * v_head_dim]

  /// Throws af::Error naming the first tensor whose shape disagrees with `shape`.
  void validate(const MlaShape& shape) const;
};

/// The MLA cache: per token the normalised latent c_kv [kv_lora_rank] and the rotated RoPE key k_pe
/// [qk_rope_head_dim], shared by all heads. Allocated once.
class MlaCache {
 public:
  MlaCache(std::int64_t capacity, std::int64_t kv_lora_rank, std::int64_t rope_dim);
  void append(ConstMatrix latent, ConstMatrix rope_keys);
  std::int64_t size() const { return size_; }
  ConstMatrix latent() const { return latent_.matrix().rows_slice(0, size_); }        ///< [t, kv_lora_rank]
  ConstMatrix rope_keys() const { return rope_keys_.matrix().rows_slice(0, size_); }  ///< [t, rope_dim]

 private:
  Tensor latent_, rope_keys_;
  std::int64_t size_ = 0;
};

/// How attention is computed from the latent cache.
enum class MlaPath {
  naive,     ///< reconstruct K_h = [W_UK_h c ; k_pe] and V_h = W_UV_h c for every cached token, then attend
  absorbed,  ///< score with (W_UK_h^T q_nope_h) . c + q_pe_h . k_pe, mix latents, then apply W_UV_h once
};

/// The softmax scale of an MLA layer as DeepSeek-V2/V3 compute it: 1/sqrt(qk_nope_head_dim + qk_rope_head_dim),
/// and, when the rotary embedding uses YaRN with a non-zero `mscale_all_dim`, times yarn_mscale(factor,
/// mscale_all_dim)^2. DeepSeek-V3 as released (YaRN factor 40, mscale_all_dim 1) thus scales its scores by
/// (0.1 ln 40 + 1)^2 = 1.874 more than 1/sqrt(192): the longer context's entropy correction is applied to every
/// score dimension, not only to the rotated ones. Throws af::Error on an invalid shape.
double mla_softmax_scale(const MlaShape& shape, const std::optional<YarnScaling>& yarn);

/// RMSNorm of each row in place: x / sqrt(mean(x^2) + eps) * gain.
void rms_norm_rows(Matrix x, std::span<const float> gain, double eps);

/// One MLA layer over the next tokens `x [T, hidden]` at `positions`: projects queries and the latent,
/// appends the latent and the rotated RoPE key to `cache`, attends causally with `scale` along `path`, and
/// projects back to `[T, hidden]`. `rope` has dimension qk_rope_head_dim. With `selected` (a `[T, t]` mask over
/// the t cached tokens after the append, e.g. DeepSeek sparse attention's top-k choice, chapter 11), a query attends
/// only to the keys that both the causal mask and `selected` allow.
Tensor mla_attention(ConstMatrix x, std::span<const std::int64_t> positions, const MlaShape& shape,
                     const MlaWeights& weights, const Rope& rope, double scale, MlaPath path, MlaCache& cache,
                     const Mask* selected = nullptr);

}  // namespace af
