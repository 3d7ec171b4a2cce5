#pragma once
/// @file sampling.hpp
/// Choosing the next token from a model's logits: the filters of the Hugging Face generation loop
/// (repetition penalty, temperature, top-k, top-p, min-p) with the same semantics, applied in the same order,
/// and a seeded draw from the distribution they leave. A filtered-out token gets the logit -infinity.

#include "af/random.hpp"

#include <cstdint>
#include <span>
#include <vector>

namespace af {

/// The sampling settings. The defaults change nothing: temperature 1, no top-k, top-p 1, min-p 0, penalty 1.
struct SamplingOptions {
  double temperature = 1.0;         ///< > 0 divides the logits; 0 means greedy (the argmax, no draw)
  std::int64_t top_k = 0;           ///< keep the k largest logits (and any tied with the k-th); 0 keeps all
  double top_p = 1.0;               ///< keep the smallest set of largest logits whose probability exceeds 1 - p
  double min_p = 0.0;               ///< drop tokens whose probability is below min_p times the largest
  double repetition_penalty = 1.0;  ///< > 0; divides positive logits of earlier tokens, multiplies negative ones
  std::int64_t min_tokens_to_keep = 1;

  /// Throws af::Error naming the first value out of range: temperature < 0 or not finite, top_k < 0,
  /// top_p outside (0, 1], min_p outside [0, 1], repetition_penalty <= 0 or not finite, min_tokens_to_keep < 1.
  void validate() const;
};

/// Repetition penalty (CTRL's, as Hugging Face's RepetitionPenaltyLogitsProcessor applies it): every token
/// that occurs in `previous` (once, however often it occurs) has its logit divided by `penalty` if positive,
/// multiplied by it if negative. Throws af::Error for an id outside the vocabulary.
void apply_repetition_penalty(std::span<float> logits, std::span<const std::int32_t> previous, double penalty);

/// Divides every logit by `temperature` (> 0).
void apply_temperature(std::span<float> logits, double temperature);

/// Keeps the logits >= the k-th largest (so ties with the k-th survive), k = max(top_k, min_keep) clamped
/// to the vocabulary; the rest become -infinity. top_k = 0 keeps everything.
void apply_top_k(std::span<float> logits, std::int64_t top_k, std::int64_t min_keep = 1);

/// Nucleus filtering: sorts ascending, removes the tokens whose cumulative probability from the bottom is
/// at most 1 - top_p, but never the `min_keep` largest. Ties keep their index order (a stable sort).
void apply_top_p(std::span<float> logits, double top_p, std::int64_t min_keep = 1);

/// Removes the tokens whose probability is below min_p times the largest probability, keeping at least the
/// `min_keep` largest.
void apply_min_p(std::span<float> logits, double min_p, std::int64_t min_keep = 1);

/// All filters of `options` in the generation loop's order: repetition penalty, temperature, top-k, top-p,
/// min-p. With temperature 0 only the repetition penalty is applied (greedy picks the argmax afterwards).
void apply_sampling_filters(std::span<float> logits, std::span<const std::int32_t> previous,
                            const SamplingOptions& options);

/// The softmax of the filtered logits in float64 (the distribution a draw follows). Throws af::Error if
/// every logit is -infinity or any is NaN or +infinity.
std::vector<double> filtered_distribution(std::span<const float> logits);

/// The index of the largest logit (the first on ties). Throws af::Error on an empty span or a NaN.
std::int32_t argmax(std::span<const float> logits);

/// Filters a copy of `logits` with `options` and returns the argmax (temperature 0) or a draw from the
/// filtered distribution with one uniform number from `rng` (inverse CDF in float64).
std::int32_t sample_token(std::span<const float> logits, std::span<const std::int32_t> previous,
                          const SamplingOptions& options, Rng& rng);

}  // namespace af
