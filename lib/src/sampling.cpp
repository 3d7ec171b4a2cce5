#include "af/sampling.hpp"

#include "af/error.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

namespace af {

namespace {

constexpr float removed = -std::numeric_limits<float>::infinity();

/// The softmax of `logits` in float32, as the reference computes it (exp of the difference to the maximum,
/// divided by the sum); -infinity gives 0. Not af::softmax, which multiplies by the sum's reciprocal: a
/// filter's cut must fall where PyTorch's does, to the last bit.
std::vector<float> softmax_float(std::span<const float> logits) {
  const float max = *std::max_element(logits.begin(), logits.end());
  std::vector<float> p(logits.size());
  float sum = 0.0f;
  for (std::size_t i = 0; i < logits.size(); ++i) sum += p[i] = std::exp(logits[i] - max);
  for (float& x : p) x /= sum;
  return p;
}

std::int64_t clamp_keep(std::int64_t min_keep, std::size_t vocab) {
  require(min_keep >= 1, "min_tokens_to_keep is {} (expected at least 1)", min_keep);
  return std::min<std::int64_t>(min_keep, static_cast<std::int64_t>(vocab));
}

}  // namespace

void SamplingOptions::validate() const {
  require(std::isfinite(temperature) && temperature >= 0, "temperature is {} (expected a finite number >= 0)",
          temperature);
  require(top_k >= 0, "top_k is {} (expected >= 0; 0 keeps every token)", top_k);
  require(top_p > 0 && top_p <= 1, "top_p is {} (expected a number in (0, 1])", top_p);
  require(min_p >= 0 && min_p <= 1, "min_p is {} (expected a number in [0, 1])", min_p);
  require(std::isfinite(repetition_penalty) && repetition_penalty > 0,
          "repetition_penalty is {} (expected a finite number > 0)", repetition_penalty);
  require(min_tokens_to_keep >= 1, "min_tokens_to_keep is {} (expected at least 1)", min_tokens_to_keep);
}

void apply_repetition_penalty(std::span<float> logits, std::span<const std::int32_t> previous, double penalty) {
  require(std::isfinite(penalty) && penalty > 0, "repetition_penalty is {} (expected a finite number > 0)", penalty);
  if (penalty == 1.0) return;
  const float factor = static_cast<float>(penalty);
  std::vector<bool> seen(logits.size(), false);
  for (const std::int32_t id : previous) {
    require(id >= 0 && static_cast<std::size_t>(id) < logits.size(),
            "repetition penalty: token id {} is outside the vocabulary of {}", id, logits.size());
    if (seen[static_cast<std::size_t>(id)]) continue;
    seen[static_cast<std::size_t>(id)] = true;
    float& x = logits[static_cast<std::size_t>(id)];
    x = x < 0 ? x * factor : x / factor;
  }
}

void apply_temperature(std::span<float> logits, double temperature) {
  require(std::isfinite(temperature) && temperature > 0, "temperature is {} (expected a finite number > 0)",
          temperature);
  const float t = static_cast<float>(temperature);
  for (float& x : logits) x /= t;
}

void apply_top_k(std::span<float> logits, std::int64_t top_k, std::int64_t min_keep) {
  require(top_k >= 0, "top_k is {} (expected >= 0; 0 keeps every token)", top_k);
  if (top_k == 0 || logits.empty()) return;
  const std::int64_t k = std::min<std::int64_t>(std::max(top_k, clamp_keep(min_keep, logits.size())),
                                                static_cast<std::int64_t>(logits.size()));
  std::vector<float> sorted(logits.begin(), logits.end());
  std::nth_element(sorted.begin(), sorted.begin() + (k - 1), sorted.end(), std::greater<>());
  const float kth = sorted[static_cast<std::size_t>(k - 1)];
  for (float& x : logits)
    if (x < kth) x = removed;
}

void apply_top_p(std::span<float> logits, double top_p, std::int64_t min_keep) {
  require(top_p > 0 && top_p <= 1, "top_p is {} (expected a number in (0, 1])", top_p);
  if (top_p >= 1.0 || logits.empty()) return;
  const std::int64_t keep = clamp_keep(min_keep, logits.size());
  std::vector<std::size_t> order(logits.size());
  std::iota(order.begin(), order.end(), std::size_t{0});
  std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) { return logits[a] < logits[b]; });
  std::vector<float> ascending(order.size());
  for (std::size_t i = 0; i < order.size(); ++i) ascending[i] = logits[order[i]];
  const std::vector<float> p = softmax_float(ascending);
  const float threshold = static_cast<float>(1.0 - top_p);
  const std::size_t removable = order.size() - static_cast<std::size_t>(keep);  // the largest `keep` stay
  float cumulative = 0.0f;
  for (std::size_t i = 0; i < removable; ++i) {
    cumulative += p[i];
    if (cumulative <= threshold) logits[order[i]] = removed;
  }
}

void apply_min_p(std::span<float> logits, double min_p, std::int64_t min_keep) {
  require(min_p >= 0 && min_p <= 1, "min_p is {} (expected a number in [0, 1])", min_p);
  if (min_p == 0.0 || logits.empty()) return;
  const std::int64_t keep = clamp_keep(min_keep, logits.size());
  const std::vector<float> p = softmax_float(logits);
  const float bar = static_cast<float>(min_p) * *std::max_element(p.begin(), p.end());
  std::vector<std::size_t> order(logits.size());
  std::iota(order.begin(), order.end(), std::size_t{0});
  std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) { return logits[a] > logits[b]; });
  for (std::size_t rank = static_cast<std::size_t>(keep); rank < order.size(); ++rank)
    if (p[order[rank]] < bar) logits[order[rank]] = removed;
}

void apply_sampling_filters(std::span<float> logits, std::span<const std::int32_t> previous,
                            const SamplingOptions& options) {
  options.validate();
  apply_repetition_penalty(logits, previous, options.repetition_penalty);
  if (options.temperature == 0.0) return;
  if (options.temperature != 1.0) apply_temperature(logits, options.temperature);
  apply_top_k(logits, options.top_k, options.min_tokens_to_keep);
  apply_top_p(logits, options.top_p, options.min_tokens_to_keep);
  apply_min_p(logits, options.min_p, options.min_tokens_to_keep);
}

std::vector<double> filtered_distribution(std::span<const float> logits) {
  require(!logits.empty(), "filtered_distribution: no logits (expected at least one)");
  double max = -std::numeric_limits<double>::infinity();
  for (const float x : logits) {
    if (std::isnan(x) || x == std::numeric_limits<float>::infinity())
      fail("filtered_distribution: a logit is {} (expected finite numbers or -inf for removed tokens)", x);
    max = std::max(max, static_cast<double>(x));
  }
  require(std::isfinite(max), "filtered_distribution: every token was filtered out (expected at least one left)");
  std::vector<double> p(logits.size());
  double sum = 0.0;
  for (std::size_t i = 0; i < logits.size(); ++i) sum += p[i] = std::exp(static_cast<double>(logits[i]) - max);
  for (double& x : p) x /= sum;
  return p;
}

std::int32_t argmax(std::span<const float> logits) {
  require(!logits.empty(), "argmax: no logits (expected at least one)");
  std::size_t best = 0;
  for (std::size_t i = 0; i < logits.size(); ++i) {
    if (std::isnan(logits[i])) fail("argmax: logit {} is NaN", i);
    if (logits[i] > logits[best]) best = i;
  }
  return static_cast<std::int32_t>(best);
}

std::int32_t sample_token(std::span<const float> logits, std::span<const std::int32_t> previous,
                          const SamplingOptions& options, Rng& rng) {
  std::vector<float> filtered(logits.begin(), logits.end());
  apply_sampling_filters(filtered, previous, options);
  if (options.temperature == 0.0) return argmax(filtered);
  const std::vector<double> p = filtered_distribution(filtered);
  const double u = rng.uniform();
  double cumulative = 0.0;
  std::size_t last_kept = 0;
  for (std::size_t i = 0; i < p.size(); ++i) {
    if (p[i] == 0.0) continue;
    last_kept = i;
    cumulative += p[i];
    if (u < cumulative) return static_cast<std::int32_t>(i);
  }
  return static_cast<std::int32_t>(last_kept);  // u within rounding of 1: the last token left
}

}  // namespace af
