// The sampling filters against hand-worked cases, and the sampler's frequencies against the distribution the
// filters leave. (The recorded cases of the reference implementation are in tests/real_model.)
#include "af/error.hpp"
#include "af/random.hpp"
#include "af/sampling.hpp"

#include <catch2/catch.hpp>

#include <cmath>
#include <limits>
#include <vector>

namespace {
constexpr float neg_inf = -std::numeric_limits<float>::infinity();
}  // namespace

TEST_CASE("top-k keeps the k largest and every logit tied with the k-th", "[sampling]") {
  std::vector<float> logits = {1.0f, 3.0f, 2.0f, 3.0f, 0.5f, 2.0f};
  af::apply_top_k(logits, 3);
  CHECK(logits == std::vector<float>{neg_inf, 3.0f, 2.0f, 3.0f, neg_inf, 2.0f});  // 2.0 ties the third
  std::vector<float> all = {1.0f, 2.0f};
  af::apply_top_k(all, 5);  // k past the vocabulary keeps everything
  CHECK(all == std::vector<float>{1.0f, 2.0f});
  af::apply_top_k(all, 0);
  CHECK(all == std::vector<float>{1.0f, 2.0f});
}

TEST_CASE("top-p removes the smallest tokens whose cumulative probability stays within 1 - p", "[sampling]") {
  // Probabilities 0.1, 0.2, 0.3, 0.4 (logits are their logarithms).
  const std::vector<float> base = {std::log(0.1f), std::log(0.2f), std::log(0.3f), std::log(0.4f)};
  std::vector<float> logits = base;
  af::apply_top_p(logits, 0.75);  // from the bottom: 0.1 (<= 0.25, removed), 0.3 (> 0.25, kept)
  CHECK(logits[0] == neg_inf);
  CHECK(logits[1] == base[1]);
  logits = base;
  af::apply_top_p(logits, 0.35);  // 0.1, 0.3, 0.6 <= 0.65 removed; the 0.4 stays
  CHECK((logits[0] == neg_inf && logits[1] == neg_inf && logits[2] == neg_inf && logits[3] == base[3]));
  logits = base;
  af::apply_top_p(logits, 0.01, 2);  // min_keep 2: the two largest stay
  CHECK((logits[0] == neg_inf && logits[1] == neg_inf && logits[2] == base[2] && logits[3] == base[3]));
}

TEST_CASE("min-p removes tokens below min_p times the largest probability", "[sampling]") {
  const std::vector<float> base = {std::log(0.05f), std::log(0.15f), std::log(0.3f), std::log(0.5f)};
  std::vector<float> logits = base;
  af::apply_min_p(logits, 0.2);  // bar 0.1: only 0.05 goes
  CHECK((logits[0] == neg_inf && logits[1] == base[1]));
  logits = base;
  af::apply_min_p(logits, 1.0, 3);  // everything below the maximum would go, min_keep keeps three
  CHECK((logits[0] == neg_inf && logits[1] == base[1] && logits[2] == base[2] && logits[3] == base[3]));
}

TEST_CASE("repetition penalty divides positive and multiplies negative logits of earlier tokens, once each",
          "[sampling]") {
  std::vector<float> logits = {2.0f, -2.0f, 1.0f, 4.0f};
  const std::vector<std::int32_t> previous = {0, 1, 1, 0};
  af::apply_repetition_penalty(logits, previous, 2.0);
  CHECK(logits == std::vector<float>{1.0f, -4.0f, 1.0f, 4.0f});
  const std::vector<std::int32_t> outside = {4};
  CHECK_THROWS_WITH(af::apply_repetition_penalty(logits, outside, 2.0), Catch::Contains("token id 4"));
}

TEST_CASE("sampling options name the value out of range", "[sampling]") {
  af::SamplingOptions options;
  options.top_p = 0.0;
  CHECK_THROWS_WITH(options.validate(), Catch::Contains("top_p is 0"));
  options = {};
  options.temperature = std::nan("");
  CHECK_THROWS_WITH(options.validate(), Catch::Contains("temperature is nan"));
  options = {};
  options.repetition_penalty = 0.0;
  CHECK_THROWS_AS(options.validate(), af::Error);
  const std::vector<float> removed_all = {neg_inf, neg_inf};
  CHECK_THROWS_WITH(af::filtered_distribution(removed_all), Catch::Contains("every token was filtered out"));
  const std::vector<float> with_nan = {0.0f, std::nanf("")};
  CHECK_THROWS_AS(af::argmax(with_nan), af::Error);
}

TEST_CASE("the sampler's frequencies follow the filtered distribution", "[sampling]") {
  // 12 tokens; temperature 0.8, top-k 8, top-p 0.9, min-p 0.05, a penalty on two earlier tokens.
  const std::vector<float> logits = {1.2f, -0.3f, 2.5f, 0.7f, 3.1f, -1.0f, 2.2f, 0.1f, 1.9f, -2.0f, 2.8f, 0.4f};
  const std::vector<std::int32_t> previous = {4, 9};
  af::SamplingOptions options;
  options.temperature = 0.8;
  options.top_k = 8;
  options.top_p = 0.9;
  options.min_p = 0.05;
  options.repetition_penalty = 1.3;
  std::vector<float> filtered = logits;
  af::apply_sampling_filters(filtered, previous, options);
  const std::vector<double> p = af::filtered_distribution(filtered);

  af::Rng rng(7);
  const int draws = 200000;
  std::vector<int> counts(logits.size(), 0);
  for (int i = 0; i < draws; ++i) ++counts[static_cast<std::size_t>(af::sample_token(logits, previous, options, rng))];
  // Pearson's chi-square over the tokens the filters kept (a removed token drawn even once fails at once).
  double chi_square = 0.0;
  int kept = 0;
  for (std::size_t i = 0; i < p.size(); ++i) {
    if (p[i] == 0.0) {
      INFO("token " << i << " was filtered out but drawn " << counts[i] << " times");
      CHECK(counts[i] == 0);
      continue;
    }
    ++kept;
    const double expected = p[i] * draws;
    chi_square += (counts[i] - expected) * (counts[i] - expected) / expected;
  }
  REQUIRE(kept >= 3);
  // With kept - 1 <= 7 degrees of freedom, chi-square exceeds 24.3 with probability 0.001.
  INFO("chi-square " << chi_square << " over " << kept << " kept tokens");
  CHECK(chi_square < 24.3);
}

TEST_CASE("temperature 0 is greedy, after the repetition penalty", "[sampling]") {
  const std::vector<float> logits = {1.0f, 3.0f, 2.5f};
  af::SamplingOptions greedy;
  greedy.temperature = 0.0;
  af::Rng rng(1);
  CHECK(af::sample_token(logits, {}, greedy, rng) == 1);
  greedy.repetition_penalty = 2.0;
  const std::vector<std::int32_t> previous = {1};
  CHECK(af::sample_token(logits, previous, greedy, rng) == 2);  // 3.0 / 2 < 2.5
}
