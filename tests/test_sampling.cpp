// The sampling filters against hand-worked cases, and the sampler's frequencies against the distribution the
// filters leave. (The recorded cases of the reference implementation are in tests/real_model.)
#include "af/error.hpp"
#include "af/random.hpp"
#include "af/sampling.hpp"

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <limits>
#include <string>
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

namespace {

float case_float(const nlohmann::json& value) {
  if (value.is_string()) return value.get<std::string>() == "-inf" ? neg_inf : std::nanf("");
  return value.get<float>();
}

// Applies one recorded step to `logits`.
void apply_step(std::vector<float>& logits, const nlohmann::json& step, const std::vector<std::int32_t>& previous) {
  const std::string op = step.at("op").get<std::string>();
  const std::int64_t keep = step.value("min_tokens_to_keep", std::int64_t{1});
  if (op == "temperature")
    af::apply_temperature(logits, step.at("temperature").get<double>());
  else if (op == "top_k")
    af::apply_top_k(logits, step.at("top_k").get<std::int64_t>(), keep);
  else if (op == "top_p")
    af::apply_top_p(logits, step.at("top_p").get<double>(), keep);
  else if (op == "min_p")
    af::apply_min_p(logits, step.at("min_p").get<double>(), keep);
  else if (op == "repetition_penalty")
    af::apply_repetition_penalty(logits, previous, step.at("repetition_penalty").get<double>());
  else
    FAIL("unknown step " << op);
}

}  // namespace

TEST_CASE("the filters reproduce Hugging Face's logits processors on the recorded cases", "[sampling]") {
  // tests/real_model/sampling_cases.json: each case's steps applied by transformers 5.17's processors in
  // float32. Kept entries must equal the reference's to float32 rounding (a division by the temperature or
  // the penalty is one rounding on both sides: 1 ulp of slack), removed ones must be -inf; where a tie sits at
  // a top-p cut the reference's choice among equal values follows torch's sort, so only the number kept and
  // the multiset of kept values are compared there.
  std::ifstream in(std::string(AF_REAL_MODEL_CASES) + "/sampling_cases.json");
  REQUIRE(in.good());
  const nlohmann::json cases = nlohmann::json::parse(in);
  int compared = 0;
  for (const char* group : {"single", "chains"}) {
    for (const nlohmann::json& c : cases.at(group)) {
      std::vector<float> logits, want;
      for (const auto& v : c.at("input")) logits.push_back(case_float(v));
      for (const auto& v : c.at("output")) want.push_back(case_float(v));
      const auto previous = c.at("previous_ids").get<std::vector<std::int32_t>>();
      for (const auto& step : c.at("steps")) apply_step(logits, step, previous);
      const std::string name = c.at("name").get<std::string>();
      REQUIRE(logits.size() == want.size());
      std::vector<float> kept_got, kept_want;
      for (std::size_t i = 0; i < logits.size(); ++i) {
        if (logits[i] != neg_inf) kept_got.push_back(logits[i]);
        if (want[i] != neg_inf) kept_want.push_back(want[i]);
      }
      INFO(name << ": " << kept_got.size() << " kept, reference " << c.at("n_kept"));
      REQUIRE(static_cast<std::int64_t>(kept_got.size()) == c.at("n_kept").get<std::int64_t>());
      if (c.at("tie_at_cutoff").get<bool>()) {
        std::ranges::sort(kept_got);
        std::ranges::sort(kept_want);
        for (std::size_t i = 0; i < kept_got.size(); ++i)
          REQUIRE(std::abs(kept_got[i] - kept_want[i]) <= 1.2e-7f * std::abs(kept_want[i]));
      } else {
        for (std::size_t i = 0; i < logits.size(); ++i) {
          INFO("entry " << i << ": " << logits[i] << ", reference " << want[i]);
          if (want[i] == neg_inf)
            REQUIRE(logits[i] == neg_inf);
          else
            REQUIRE(std::abs(logits[i] - want[i]) <= 1.2e-7f * std::abs(want[i]));
        }
      }
      ++compared;
    }
  }
  CHECK(compared > 100);
}
