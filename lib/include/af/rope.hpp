#pragma once
/// @file rope.hpp
/// Rotary position embedding (RoPE): each pair of a query's or key's dimensions is rotated by an angle
/// proportional to the token's position, so that q . k depends on the two positions only through their
/// difference. Both pairing conventions in use, Llama 3.1's frequency scaling, YaRN (gpt-oss, chapter 09), and
/// GQA with RoPE as the Llama family runs it (chapter 06).

#include "af/grouped_attention.hpp"
#include "af/tensor.hpp"

#include <cstdint>
#include <optional>
#include <span>
#include <utility>
#include <vector>

namespace af {

/// Which dimensions form a rotated pair.
enum class RopeLayout {
  adjacent,    ///< (x[2i], x[2i+1]): the RoFormer paper, GPT-J, DeepSeek's reference code
  half_split,  ///< (x[i], x[i + d/2]): the Llama family in Hugging Face transformers ("rotate_half")
};

/// Llama 3.1's rescaling of the rotation frequencies (`rope_type: "llama3"`): wavelengths longer than
/// `original_context / low_freq_factor` are stretched by `factor`, those shorter than
/// `original_context / high_freq_factor` are kept, and the band between is interpolated.
struct Llama3Scaling {
  double factor = 8.0;
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;
  double original_context = 8192.0;
};

/// Linear position interpolation (`rope_type: "linear"`; Chen et al. 2023, "Extending Context Window of Large
/// Language Models via Positional Interpolation"): every frequency divided by `factor`, as if positions were
/// `factor` times closer together. Gemma 3's global layers ship it with factor 8.
struct LinearScaling {
  double factor = 1.0;
};

/// YaRN's magnitude correction 0.1 w ln(factor) + 1 for a weight w (`mscale` or `mscale_all_dim`), or 1 when
/// factor <= 1. YaRN multiplies the rotated q and k by a ratio of two of these; DeepSeek-V3 also multiplies its
/// softmax scale by the square of the one weighted by `mscale_all_dim` (af::mla_softmax_scale).
double yarn_mscale(double factor, double weight);

/// YaRN (Peng et al. 2023, "YaRN: Efficient Context Window Extension of Large Language Models";
/// `rope_type: "yarn"`, as gpt-oss ships it). Pair i rotates `original_context / wavelength_i` times over the
/// pretraining context. Pairs that rotate at least `beta_fast` times keep their frequency (extrapolation),
/// pairs that rotate at most `beta_slow` times are divided by `factor` (interpolation), and a linear ramp in i
/// blends the pairs between. The boundaries are the (fractional) pair indices
///   i(r) = d ln(original_context / (2 pi r)) / (2 ln base),   low = i(beta_fast), high = i(beta_slow),
/// floored and ceiled when `truncate`, clamped to [0, d - 1] (as Hugging Face transformers does); the ramp is
/// clamp((i - low) / (high - low), 0, 1) (high nudged by 0.001 when equal to low). Besides the frequencies,
/// YaRN multiplies the rotated q and k by an attention factor (so q . k by its square): `attention_factor`
/// when given, else 0.1 ln(factor) + 1 (1 for factor <= 1), or, when both `mscale` and `mscale_all_dim` are
/// non-zero, the ratio of that formula with ln(factor) weighted by each.
struct YarnScaling {
  double factor = 32.0;                    ///< context extension (new / original)
  double original_context = 4096.0;        ///< `original_max_position_embeddings`
  double beta_fast = 32.0;                 ///< rotations above which a pair is kept
  double beta_slow = 1.0;                  ///< rotations below which a pair is interpolated
  bool truncate = true;                    ///< round the ramp's ends to whole pair indices
  std::optional<double> attention_factor;  ///< explicit factor on cos and sin; computed when empty
  double mscale = 0.0;                     ///< 0: not given
  double mscale_all_dim = 0.0;             ///< 0: not given

  /// The factor on the rotated q and k (see above).
  double attention_scale() const;
  /// The ramp's ends (low, high) for a head dimension and base, after truncation and clamping.
  std::pair<double, double> correction_range(std::int64_t head_dim, double base) const;
};

/// The rotary embedding of one head dimension.
class Rope {
 public:
  /// `head_dim` must be even and positive, `base` (theta) > 1. Throws af::Error otherwise.
  Rope(std::int64_t head_dim, double base, RopeLayout layout, std::optional<Llama3Scaling> scaling = std::nullopt);
  /// RoPE with every frequency divided by `linear.factor`. Throws af::Error for factor < 1 or the conditions above.
  Rope(std::int64_t head_dim, double base, RopeLayout layout, const LinearScaling& linear);
  /// RoPE with YaRN's frequencies and attention factor. Throws af::Error for factor < 1, original_context <= 0,
  /// beta_fast < beta_slow, a non-positive attention factor, or the conditions above.
  Rope(std::int64_t head_dim, double base, RopeLayout layout, const YarnScaling& yarn);

  std::int64_t head_dim() const { return head_dim_; }
  RopeLayout layout() const { return layout_; }
  /// The angle per position of pair i, i = 0 .. d/2 - 1: base^(-2i/d), rescaled when a scaling is set.
  std::span<const double> inverse_frequencies() const { return inverse_frequencies_; }
  /// The factor every rotated value is multiplied by: 1, or YaRN's attention factor.
  double attention_scale() const { return attention_scale_; }

  /// Rotates one vector of `head_dim` values in place as for a token at `position` (and multiplies it by
  /// attention_scale()).
  void rotate(std::span<float> x, double position) const;
  /// Rotates every head of every row in place: `x` is `[T, heads * head_dim]`, row t at `positions[t]`.
  void rotate_rows(Matrix x, std::span<const std::int64_t> positions) const;

 private:
  std::int64_t head_dim_;
  RopeLayout layout_;
  std::vector<double> inverse_frequencies_;
  double attention_scale_ = 1.0;
};

/// The permutation that turns the adjacent layout into the half-split one: position j of the half-split
/// vector takes element `perm[j]` of the adjacent vector (the even elements, then the odd ones). Rotating
/// the permuted vector in the half-split layout equals permuting the vector rotated in the adjacent layout.
std::vector<std::int64_t> adjacent_to_half_split(std::int64_t head_dim);

/// One grouped attention layer with RoPE, as the Llama family runs it: project q, k, v; rotate q and k by
/// their positions (keys are cached already rotated); append to the cache; attend; project back.
/// `positions` holds one position per row of `x`.
Tensor rotary_grouped_attention(ConstMatrix x, std::span<const std::int64_t> positions, const GroupedShape& shape,
                                const GroupedWeights& weights, const Rope& rope, const AttentionOptions& options,
                                GroupedKvCache& cache);

}  // namespace af
