// The real model against the reference: SmolLM2-135M-Instruct's logits computed by the library (af::llama)
// against those Hugging Face transformers computed from the same GGUF file (dequantized to float32, run in
// float32), recorded in tests/real_model/logits_*.json by scripts/record_real_model_cases.py. Every number
// is read from the case files; the model file is the one the install step fetches (AF_MODEL_GGUF).
//
// The tolerance. Both sides compute in float32 from the same exactly dequantized weights; they differ only in
// the order of their float32 sums (8-lane partial sums and OpenBLAS's blocking here, PyTorch's kernels
// there). One such sum of n products has a rounding error of order sqrt(n) * 2^-24 of the sum of the
// magnitudes; through 30 layers of normalisations and residual additions the errors stay relative to the
// activations, and a logit of magnitude 20-30 ends up a few 1e-4 away at worst over a 2,000-token prompt.
// The bound is 2e-3 + 1e-4 |logit|: a real error (a wrong RoPE pairing, a missing norm, an off-by-one
// position) moves logits by whole units. The worst error of each case is printed with the bound.
#include "af/compare.hpp"
#include "af/llama.hpp"
#include "af/sampling.hpp"

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

namespace {

using nlohmann::json;

constexpr double absolute_tolerance = 2e-3, relative_tolerance = 1e-4;

json read_case(const std::string& name) {
  std::ifstream in(std::filesystem::path(AF_REAL_MODEL_CASES) / name);
  REQUIRE(in.good());
  return json::parse(in);
}

const af::llama::Model& model() {
  static const af::llama::Model loaded = af::llama::Model::load(AF_MODEL_GGUF);
  return loaded;
}

float as_float(const json& value) {
  if (value.is_string()) {
    const std::string text = value.get<std::string>();
    if (text == "-inf") return -INFINITY;
    if (text == "inf") return INFINITY;
    return NAN;
  }
  return value.get<float>();
}

// Compares one row of logits with a recorded top-8 entry; returns the row's worst |difference| over the
// recorded ids (NaN propagates) and checks the argmax where the reference's top two are clearly apart.
struct RowComparison {
  double worst = 0.0;
  std::string worst_where;
  int argmax_checked = 0, argmax_skipped = 0;
  void compare(std::span<const float> logits, const json& entry, const std::string& where) {
    const auto& ids = entry.at("ids");
    const auto& values = entry.at("values");
    REQUIRE(ids.size() == values.size());
    for (std::size_t j = 0; j < ids.size(); ++j) {
      const float want = as_float(values[j]);
      const float got = logits[ids[j].get<std::size_t>()];
      const double error = std::abs(static_cast<double>(got) - want);
      if (!(error <= worst)) worst = error, worst_where = where;  // NaN is kept
      INFO(where << ": token " << ids[j] << " logit " << got << ", reference " << want);
      REQUIRE(af::within_tolerance(error, absolute_tolerance + relative_tolerance * std::abs(want)));
    }
    // The argmax must agree unless the reference's first two logits are within the tolerance of each other.
    const double gap = static_cast<double>(as_float(values[0])) - as_float(values[1]);
    if (gap > 2 * (absolute_tolerance + relative_tolerance * std::abs(as_float(values[0])))) {
      ++argmax_checked;
      INFO(where << ": reference argmax " << entry.at("argmax"));
      REQUIRE(af::argmax(logits) == entry.at("argmax").get<std::int32_t>());
    } else {
      ++argmax_skipped;
    }
  }
};

void run_case(const std::string& file) {
  const json c = read_case(file);
  const auto prompt = c.at("prompt_ids").get<std::vector<std::int32_t>>();
  const json& reference = c.at("transformers");
  const auto greedy = reference.at("greedy_ids").get<std::vector<std::int32_t>>();
  const auto n_decode = c.at("n_decode").get<std::int64_t>();
  REQUIRE(reference.at("prefill").size() == prompt.size());
  REQUIRE(reference.at("decode_steps").size() == static_cast<std::size_t>(n_decode));

  af::llama::Cache cache(model().config(), static_cast<std::int64_t>(prompt.size()) + n_decode + 1);
  const af::Tensor logits = model().forward(prompt, cache, /*all_logits=*/true);
  RowComparison prefill, decode;
  for (std::size_t p = 0; p < prompt.size(); ++p)
    prefill.compare(logits.matrix().row(static_cast<std::int64_t>(p)), reference.at("prefill")[p],
                    file + " prefill position " + std::to_string(p));
  // Whole-row summaries: the float64 sum and sum of squares of all 49,152 logits of a few rows.
  for (const auto& [position, summary] : reference.at("row_summaries").items()) {
    const std::span<const float> row = logits.matrix().row(std::stoll(position));
    double sum = 0.0, sum_sq = 0.0;
    for (const float x : row) sum += x, sum_sq += static_cast<double>(x) * x;
    const double want_sum = summary.at("sum").get<double>(), want_sq = summary.at("sum_sq").get<double>();
    INFO(file << " row " << position << ": sum " << sum << " (reference " << want_sum << "), sum of squares " << sum_sq
              << " (reference " << want_sq << ")");
    // Each logit within its bound: the sum within the bounds summed, the squares within 2 |x| bound each.
    REQUIRE(af::within_tolerance(std::abs(sum - want_sum), static_cast<double>(row.size()) * 5e-3));
    REQUIRE(af::within_tolerance(std::abs(sum_sq - want_sq), 1e-3 * want_sq));
  }
  // Greedy decoding through the cache: each step's logits, and the continuation token for token.
  std::vector<std::int32_t> ours = {af::argmax(logits.matrix().row(logits.dim(0) - 1))};
  for (std::int64_t step = 0; step < n_decode; ++step) {
    const std::int32_t token[] = {greedy[static_cast<std::size_t>(step)]};  // the reference's token, fed back
    const af::Tensor next = model().forward(token, cache);
    decode.compare(next.values(), reference.at("decode_steps")[static_cast<std::size_t>(step)],
                   file + " decode step " + std::to_string(step));
    ours.push_back(af::argmax(next.values()));
  }
  ours.resize(greedy.size());  // the reference lists the prefill's token and those of the first n - 1 steps
  CHECK(ours == greedy);
  WARN(file << ": " << prompt.size() << " prompt tokens, worst |logit error| " << prefill.worst << " in the prefill ("
            << prefill.worst_where << "), " << decode.worst << " in " << n_decode
            << " decode steps; argmax compared at " << prefill.argmax_checked + decode.argmax_checked
            << " positions, skipped at " << prefill.argmax_skipped + decode.argmax_skipped
            << " (reference top two within the tolerance); greedy continuation equal");
}

}  // namespace

TEST_CASE("SmolLM2 logits match transformers on a short prompt, every position and 16 decode steps", "[model]") {
  run_case("logits_short.json");
  // The whole last row, all 49,152 logits, from the raw float32 file.
  std::ifstream in(std::filesystem::path(AF_REAL_MODEL_CASES) / "logits_short_last.f32", std::ios::binary);
  std::vector<float> want(static_cast<std::size_t>(model().config().vocab));
  in.read(reinterpret_cast<char*>(want.data()), static_cast<std::streamsize>(want.size() * sizeof(float)));
  REQUIRE(in.gcount() == static_cast<std::streamsize>(want.size() * sizeof(float)));
  const json c = read_case("logits_short.json");
  const auto prompt = c.at("prompt_ids").get<std::vector<std::int32_t>>();
  af::llama::Cache cache(model().config(), static_cast<std::int64_t>(prompt.size()));
  const af::Tensor last = model().forward(prompt, cache);
  double worst = 0.0;
  for (std::size_t i = 0; i < want.size(); ++i) {
    const double error = std::abs(static_cast<double>(last.data()[i]) - want[i]);
    worst = af::worse(worst, error);
    INFO("logit " << i << ": " << last.data()[i] << ", reference " << want[i]);
    REQUIRE(af::within_tolerance(error, absolute_tolerance + relative_tolerance * std::abs(want[i])));
  }
  WARN("logits_short_last.f32: worst |error| over all " << want.size() << " logits " << worst);
}

TEST_CASE("SmolLM2 logits match transformers on the chat template's prompt and 32 decode steps", "[model]") {
  run_case("logits_chat.json");
}

TEST_CASE("SmolLM2 logits match transformers on a prompt past 2,048 tokens", "[model]") {
  run_case("logits_long.json");
}

TEST_CASE("With half-split RoPE on the GGUF's adjacent-pair rows the logits are wrong", "[model]") {
  const json c = read_case("logits_short.json");
  const auto prompt = c.at("prompt_ids").get<std::vector<std::int32_t>>();
  af::llama::Model wrong = af::llama::Model::load(AF_MODEL_GGUF);
  wrong.set_rope_layout(af::RopeLayout::half_split);
  af::llama::Cache cache(wrong.config(), static_cast<std::int64_t>(prompt.size()));
  const af::Tensor logits = wrong.forward(prompt, cache, true);
  double worst = 0.0;
  const json& reference = c.at("transformers").at("prefill");
  for (std::size_t p = 1; p < prompt.size(); ++p)  // position 0 has no rotation: both layouts agree there
    for (std::size_t j = 0; j < 8; ++j)
      worst = af::worse(
          worst, std::abs(logits.matrix().row(static_cast<std::int64_t>(p))[reference[p]["ids"][j].get<std::size_t>()] -
                          as_float(reference[p]["values"][j])));
  INFO("worst |logit error| with the wrong RoPE pairing: " << worst);
  CHECK(worst > 100 * absolute_tolerance);
}

TEST_CASE("Sliding-window perplexity on real text matches transformers on the same tokens", "[model]") {
  // tests/real_model/perplexity_gpl3.json (scripts/record_perplexity_case.py): the GPL-3 text Debian installs,
  // windows of 1024 tokens every 512. Each window's mean NLL is a mean of -log p over hundreds of tokens whose
  // logits are within the bound above (a few 1e-4); a log-softmax moves by at most twice the largest logit
  // error, so the means must agree within 2e-3 nats, and the perplexity within 0.2 %.
  const json c = read_case("perplexity_gpl3.json");
  const auto ids = c.at("token_ids").get<std::vector<std::int32_t>>();
  // The ids are transformers' tokens of the text. Its GGUF converter splits with GPT-2's regex alone, where
  // the model's own tokenizer (and af::Tokenizer, and llama.cpp) also cut digits off white space first, so
  // the two differ where spaces run into a digit (first at token 795 here, "  0."); the comparison is of the
  // model, on the same ids.
  const af::llama::SlidingNll result = af::llama::sliding_window_nll(model(), ids, c.at("window").get<std::int64_t>(),
                                                                     c.at("stride").get<std::int64_t>());
  const json& windows = c.at("windows");
  REQUIRE(result.window_nll.size() == windows.size());
  for (std::size_t w = 0; w < windows.size(); ++w) {
    const auto count = windows[w].at("scored").get<std::int64_t>();
    REQUIRE(result.window_tokens[w] == count);
    const double ours = result.window_nll[w] / static_cast<double>(count);
    const double want = windows[w].at("nll").get<double>() / static_cast<double>(count);
    INFO("window " << w << ": mean NLL " << ours << ", reference " << want);
    REQUIRE(af::within_tolerance(std::abs(ours - want), 2e-3));
  }
  const double want = c.at("perplexity").get<double>();
  INFO("perplexity " << result.perplexity() << ", reference " << want);
  REQUIRE(af::within_tolerance(std::abs(result.perplexity() - want), 2e-3 * want));
  const std::vector<std::int32_t> one = {ids.front()};
  CHECK_THROWS_WITH(af::llama::sliding_window_nll(model(), one, 1024, 512), Catch::Contains("1 tokens"));
  CHECK_THROWS_WITH(af::llama::sliding_window_nll(model(), ids, 1024, 2048), Catch::Contains("stride 2048"));
  CHECK_THROWS_WITH(af::llama::sliding_window_nll(model(), ids, 1 << 20, 512), Catch::Contains("window 1048576"));
  WARN("perplexity_gpl3.json: perplexity " << result.perplexity() << " (reference " << want << ") over "
                                           << result.scored_tokens << " tokens");
}
