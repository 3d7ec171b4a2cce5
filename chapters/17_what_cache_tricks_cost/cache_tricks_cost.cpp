// Chapter 17 — what each cache trick costs: the real model of chapter 16 run with every cache policy of
// af::PolicyAttention on real English text (the Python tutorial Debian installs), and on a pass-key retrieval.
//
// For every policy: the bytes its cache holds and the bytes a decode step reads (counted by the cache,
// averaged over the scored positions), the perplexity with the sliding protocol below, the KL divergence of
// its next-token distribution from the float32 cache's, and the share of positions where the two agree on
// the most likely token. Then the pass key: a five-digit number hidden at a depth in filler text, asked for
// at the end; exact match over trials, with a 95% Wilson interval.
//
// The protocol: windows of --window tokens every --stride tokens over the first --tokens tokens of the text;
// each window is a fresh sequence and scores only its last --stride tokens, so every scored token has at
// least window - stride tokens before it, the context the tricks are meant to thin out.
//
//   build/bin/ch17_what_cache_tricks_cost [--full] [--tokens 768] [--window 512] [--stride 256]
//       [--lengths 512] [--depths 3] [--trials 2] [--seed 17] [--threads N] [--out DIR]
//
// Exit status: 0 when every check passes, 1 when one fails, 2 for a bad flag, a missing text or model.
#include "af/cache_policy.hpp"
#include "af/compare.hpp"
#include "af/error.hpp"
#include "af/llama.hpp"
#include "af/program.hpp"
#include "af/random.hpp"
#include "af/sampling.hpp"
#include "af/tokenizer.hpp"

#include <fmt/format.h>
#include <omp.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <sstream>
#include <string>
#include <vector>

namespace {

using af::CachePolicy;
using af::KvSelection;
using af::KvStorage;
using af::Tensor;
namespace fs = std::filesystem;

// [text]
// The evaluation text: the Python tutorial's reStructuredText sources, in the order of its table of contents
// (the toctree of index.rst.txt), joined as they are. Debian's python3.11-doc installs them; the Python
// Software Foundation License covers them.
std::string read_tutorial(const fs::path& dir) {
  const auto read = [](const fs::path& file) {
    std::ifstream in(file, std::ios::binary);
    af::require(in.good(),
                "cannot read {} (expected the Python tutorial sources that Debian's python3.11-doc "
                "installs: scripts/install_deps.sh installs it)",
                file.string());
    std::stringstream s;
    s << in.rdbuf();
    return s.str();
  };
  std::istringstream index(read(dir / "index.rst.txt"));
  std::string line, text;
  bool in_toctree = false;
  int chapters = 0;
  while (std::getline(index, line)) {
    if (line.starts_with(".. toctree::")) {
      in_toctree = true;
      continue;
    }
    const auto first = line.find_first_not_of(' ');
    if (!in_toctree || first == std::string::npos || line[first] == ':') continue;
    if (first == 0) break;  // the toctree's indented block has ended
    text += read(dir / (line.substr(first) + ".txt")), ++chapters;
  }
  af::require(chapters > 0, "{}: no toctree entries (expected the tutorial's index)", (dir / "index.rst.txt").string());
  return text;
}
// [/text]

// The knobs of every policy the sweep runs. The short sweep (the book build's) keeps a few per method.
std::vector<CachePolicy> sweep_policies(bool full) {
  std::vector<CachePolicy> p;
  p.push_back({.storage = KvStorage::f32});
  p.push_back({.storage = KvStorage::bf16});
  p.push_back({.storage = KvStorage::int8});
  p.push_back({.storage = KvStorage::e4m3});
  p.push_back({.storage = KvStorage::int4});
  p.push_back({.storage = KvStorage::int2});
  if (full) p.push_back({.storage = KvStorage::int2, .block = 128});
  const std::vector<std::int64_t> budgets =
      full ? std::vector<std::int64_t>{32, 64, 128, 256, 512} : std::vector<std::int64_t>{32, 64, 128};
  for (const auto w : budgets) p.push_back({.selection = KvSelection::window, .window = w});
  for (const std::int64_t sinks : full ? std::vector<std::int64_t>{1, 4} : std::vector<std::int64_t>{4})
    for (const auto w : budgets) p.push_back({.selection = KvSelection::sinks, .window = w - sinks, .sinks = sinks});
  for (const auto w : full ? budgets : std::vector<std::int64_t>{32})
    p.push_back(
        {.selection = KvSelection::sinks, .window = w - 4, .sinks = 4, .sink_positions = af::SinkPositions::in_cache});
  for (const auto k : full ? std::vector<std::int64_t>{8, 16, 32, 64, 128} : std::vector<std::int64_t>{8, 16, 32})
    p.push_back({.selection = KvSelection::top_k, .top_k = k});
  for (const auto w : budgets) p.push_back({.selection = KvSelection::pages, .page = 16, .pages = w / 16});
  for (const auto w : budgets) p.push_back({.selection = KvSelection::heavy_hitters, .budget = w});
  return p;
}

// The policies the retrieval runs: the reference and one point per method at a quarter of the shortest
// context (a thirty-second for top-k, whose point is the ceiling of selection).
std::vector<CachePolicy> retrieval_policies(std::int64_t budget) {
  return {{.storage = KvStorage::f32},
          {.storage = KvStorage::int4},
          {.storage = KvStorage::int2},
          {.selection = KvSelection::window, .window = budget},
          {.selection = KvSelection::sinks, .window = budget - 4, .sinks = 4},
          {.selection = KvSelection::top_k, .top_k = budget / 8},
          {.selection = KvSelection::pages, .page = 16, .pages = budget / 16},
          {.selection = KvSelection::heavy_hitters, .budget = budget}};
}

struct Quality {
  double nll = 0, kl = 0;  // sums over the scored tokens
  std::int64_t scored = 0, agree = 0;
  double held = 0, read = 0, selection = 0;  // sums over the scored positions
  double window_nll_max_error = 0;           // (the reference only)
};

// log-softmax of one row of logits, in float64.
void log_softmax(const float* logits, std::int64_t n, std::vector<double>& out) {
  out.resize(static_cast<std::size_t>(n));
  double top = -INFINITY;
  for (std::int64_t i = 0; i < n; ++i) top = std::max<double>(top, logits[i]);
  double sum = 0;
  for (std::int64_t i = 0; i < n; ++i) sum += std::exp(logits[i] - top);
  const double log_sum = top + std::log(sum);
  for (std::int64_t i = 0; i < n; ++i) out[static_cast<std::size_t>(i)] = logits[i] - log_sum;
}

// Wilson's 95% interval for k successes in n trials.
std::pair<double, double> wilson(std::int64_t k, std::int64_t n) {
  if (n == 0) return {0, 1};
  const double z = 1.959964, p = static_cast<double>(k) / static_cast<double>(n), nn = static_cast<double>(n);
  const double centre = (p + z * z / (2 * nn)) / (1 + z * z / nn);
  const double half = z * std::sqrt(p * (1 - p) / nn + z * z / (4 * nn * nn)) / (1 + z * z / nn);
  return {std::max(0.0, centre - half), std::min(1.0, centre + half)};
}

// [retrieval]
// One pass-key trial: a random five-digit key, stated twice in a sentence spliced at a line break near `depth`
// into filler taken from the tutorial at a random offset past the first `evaluated` tokens; an instruction
// first, the question last, `length` tokens in all with the answer.
struct PassKeyTrial {
  std::vector<std::int32_t> prompt, answer;
};

PassKeyTrial pass_key_trial(const af::Tokenizer& tokenizer, const std::vector<af::TokenId>& text,
                            std::int64_t evaluated, std::int64_t length, double depth, af::Rng& rng) {
  const auto encode = [&](const std::string& s) {
    const auto t = tokenizer.encode(s);
    return std::vector<std::int32_t>(t.begin(), t.end());
  };
  const std::vector<std::int32_t> intro =
      encode("There is a pass key hidden inside a lot of irrelevant text. Find it and remember it.\n\n");
  const std::vector<std::int32_t> question = encode("\n\nWhat is the pass key? The pass key is");
  const std::int64_t key = 10000 + static_cast<std::int64_t>(rng.next_u64() % 90000);
  const std::vector<std::int32_t> needle =
      encode(fmt::format("\nThe pass key is {0}. Remember it. {0} is the pass key.\n", key));
  PassKeyTrial trial{intro, encode(fmt::format(" {}", key))};
  const std::int64_t filler =
      length - static_cast<std::int64_t>(intro.size() + needle.size() + question.size() + trial.answer.size());
  const std::int64_t room = static_cast<std::int64_t>(text.size()) - evaluated - filler;
  af::require(filler > 0 && room > 0, "--lengths {}: the text is too short for the filler", length);
  const std::int64_t offset = evaluated + static_cast<std::int64_t>(rng.next_u64() % static_cast<std::uint64_t>(room));
  std::int64_t cut = static_cast<std::int64_t>(depth * static_cast<double>(filler));
  while (cut > 0 &&
         tokenizer.token_bytes(text[static_cast<std::size_t>(offset + cut - 1)]).find('\n') == std::string::npos)
    --cut;
  std::vector<std::int32_t>& p = trial.prompt;
  p.insert(p.end(), text.begin() + offset, text.begin() + offset + cut);
  p.insert(p.end(), needle.begin(), needle.end());
  p.insert(p.end(), text.begin() + offset + cut, text.begin() + offset + filler);
  p.insert(p.end(), question.begin(), question.end());
  return trial;
}

// Whether the model, its attention reading the cache through `policy`, finds the key: the prompt, then the
// answer by teacher forcing; found when each answer token is the most likely next token, exactly when greedy
// decoding would write it.
bool finds_pass_key(const af::llama::Model& model, const CachePolicy& policy, const PassKeyTrial& trial,
                    std::int64_t length) {
  const af::llama::Config& c = model.config();
  af::PolicyAttention attention(policy, c.layers, c.attention_shape(), model.rope());
  af::llama::Cache cache(c, length);
  const Tensor last = model.forward(trial.prompt, cache, /*all_logits=*/false, nullptr, &attention);
  bool found = af::argmax({last.data(), static_cast<std::size_t>(c.vocab)}) == trial.answer.front();
  const Tensor rest = model.forward(trial.answer, cache, /*all_logits=*/true, nullptr, &attention);
  for (std::size_t a = 1; a < trial.answer.size(); ++a)
    found = found && af::argmax({rest.data() + static_cast<std::int64_t>(a - 1) * c.vocab,
                                 static_cast<std::size_t>(c.vocab)}) == trial.answer[a];
  return found;
}
// [/retrieval]

std::string kib(double bytes) { return fmt::format("{:.0f}", bytes / 1024); }

// A policy's label as a substitution name: "window W=256" -> "window_w_256".
std::string slug(const std::string& label) {
  std::string out;
  for (const char ch : label) {
    if (std::isalnum(static_cast<unsigned char>(ch)))
      out += static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
    else if (!out.empty() && out.back() != '_')
      out += '_';
  }
  while (!out.empty() && out.back() == '_') out.pop_back();
  return out;
}

// The Pareto front of points (cost, loss): indices of the points no other point beats on both, by cost.
std::vector<std::size_t> pareto_front(const std::vector<double>& cost, const std::vector<double>& loss) {
  std::vector<std::size_t> order(cost.size());
  std::iota(order.begin(), order.end(), std::size_t{0});
  std::sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
    return cost[a] < cost[b] || (cost[a] == cost[b] && loss[a] < loss[b]);
  });
  std::vector<std::size_t> front;
  double best = INFINITY;
  for (const std::size_t i : order)
    if (loss[i] < best) front.push_back(i), best = loss[i];
  return front;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Chapter 17: what each cache trick costs, measured on a real model and real text",
               "ch17_what_cache_tricks_cost"};
  std::string model_path = AF_MODEL_GGUF, cases_dir = AF_REAL_MODEL_CASES, out_dir;
  std::string text_dir = "/usr/share/doc/python3.11/html/_sources/tutorial";
  std::int64_t tokens = 768, window = 512, stride = 256, depths = 3, trials = 2;
  std::vector<std::int64_t> lengths = {512};
  std::uint64_t seed = 17;
  int threads = 0;
  bool full = false, tokens_only = false;
  app.add_option("--model", model_path, "GGUF model file")->capture_default_str();
  app.add_option("--text-dir", text_dir, "Folder of the Python tutorial's sources")->capture_default_str();
  app.add_option("--cases", cases_dir, "Folder of the reference perplexity cases")->capture_default_str();
  app.add_flag("--full", full,
               "The full sweep: more knobs per method (with --tokens 3072 --window 1024 "
               "--stride 512 --lengths 1024,2048 --trials 3 for the committed run)");
  app.add_flag(
      "--tokens-only", tokens_only,
      "Write the evaluated token ids to tokens.json in --out and stop (for scripts/record_perplexity_case.py)");
  app.add_option("--tokens", tokens, "Tokens of the text evaluated")
      ->check(CLI::Range(std::int64_t{64}, std::int64_t{65536}))
      ->capture_default_str();
  app.add_option("--window", window, "Tokens per window (a fresh sequence each)")
      ->check(CLI::Range(std::int64_t{64}, std::int64_t{4096}))
      ->capture_default_str();
  app.add_option("--stride", stride, "Tokens between windows; each window scores its last stride tokens")
      ->check(CLI::Range(std::int64_t{1}, std::int64_t{8192}))
      ->capture_default_str();
  app.add_option("--lengths", lengths, "Context lengths of the pass-key retrieval")
      ->check(CLI::Range(std::int64_t{256}, std::int64_t{8192}))
      ->delimiter(',')
      ->capture_default_str();
  app.add_option("--depths", depths, "Depths of the pass key (evenly from 10% to 90%)")
      ->check(CLI::Range(std::int64_t{1}, std::int64_t{9}))
      ->capture_default_str();
  app.add_option("--trials", trials, "Pass keys per length and depth (0: no retrieval)")
      ->check(CLI::Range(std::int64_t{0}, std::int64_t{100}))
      ->capture_default_str();
  app.add_option("--seed", seed, "Seed of the pass keys and filler offsets")
      ->check(af::seed_value())
      ->capture_default_str();
  app.add_option("--threads", threads, "Threads (default: every core)")->check(CLI::Range(1, 1024));
  app.add_option("--out", out_dir, "Directory for the CSV files, figure data and numbers.json")
      ->check(af::output_directory());

  return af::run_program(app, argc, argv, [&] {
    // The first scored token of a window is scored by the logits of the token before it, so at least one token
    // of each window is context only.
    af::require(stride < window, "--stride {} is not shorter than --window {} (expected stride < window)", stride,
                window);
    af::require(window <= tokens, "--window {} is longer than --tokens {} (expected window <= tokens)", window, tokens);
    // Every window is a forward pass of `window` tokens per policy, its logits [window, vocab] kept twice.
    const std::int64_t planned = ((tokens - window) / stride + 1) * window;
    af::require(planned <= (std::int64_t{1} << 20),
                "--tokens {}, --window {} and --stride {} evaluate {} tokens per policy (expected at most 1,048,576)",
                tokens, window, stride, planned);
    if (threads > 0) omp_set_num_threads(threads);
    af::Checks checks;
    // The committed full sweep writes its numbers as full_<name> (book pages read both it and the build's run).
    af::BookNumbers book_numbers;
    const std::string prefix = full ? "full_" : "";
    const auto number = [&](const std::string& name, std::string value) {
      book_numbers.set(prefix + name, std::move(value));
    };
    const auto started = std::chrono::steady_clock::now();
    const auto elapsed = [&] {
      return std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
    };
    const af::llama::Model model = af::llama::Model::load(model_path);
    const af::llama::Config& c = model.config();
    for (const auto length : lengths)
      af::require(length <= c.context, "--lengths {} exceeds the model's context {}", length, c.context);
    const af::Tokenizer tokenizer = af::Tokenizer::from_gguf(model.file());
    const std::string text = read_tutorial(text_dir);
    const std::vector<af::TokenId> all_ids = tokenizer.encode(text);
    af::require(static_cast<std::int64_t>(all_ids.size()) >= tokens, "--tokens {}: the text has only {} tokens", tokens,
                all_ids.size());
    const std::vector<std::int32_t> ids(all_ids.begin(), all_ids.begin() + tokens);
    const std::int64_t windows = (tokens - window) / stride + 1, scored = windows * stride;
    if (tokens_only) {
      af::require(!out_dir.empty(), "--tokens-only needs --out");
      const std::vector<std::int32_t> used(ids.begin(), ids.begin() + (windows - 1) * stride + window);
      af::write_output_file(af::make_output_directory(out_dir) / "tokens.json",
                            [&](af::OutputFile& f) { f.print("{}\n", nlohmann::json(used).dump()); });
      return true;
    }
    fmt::print("text: the Python tutorial ({} bytes, {} tokens); evaluated: the first {} tokens,\n", text.size(),
               all_ids.size(), (windows - 1) * stride + window);
    fmt::print("  {} windows of {} every {}, each scoring its last {} ({} tokens, contexts {}..{})\n", windows, window,
               stride, stride, scored, window - stride, window - 1);
    number("text_tokens", af::with_thousands(static_cast<std::int64_t>(all_ids.size())));
    number("window", fmt::format("{}", window));
    number("stride", fmt::format("{}", stride));
    number("scored", af::with_thousands(scored));
    number("context_min", fmt::format("{}", window - stride));

    // [evaluate]
    // The reference (the float32 cache read whole, through grouped_attend) once per window: its logits stay
    // for the comparison with every policy.
    std::vector<CachePolicy> policies = sweep_policies(full);
    std::vector<Quality> quality(policies.size());
    Quality reference;
    std::vector<double> reference_window_nll;
    std::vector<double> dense_logp, policy_logp;
    const std::int64_t V = c.vocab;
    for (std::int64_t w = 0; w < windows; ++w) {
      const std::span<const std::int32_t> seq(ids.data() + w * stride, static_cast<std::size_t>(window));
      af::llama::Cache dense_cache(c, window);
      const Tensor dense = model.forward(seq, dense_cache, /*all_logits=*/true);
      double window_nll = 0;
      for (std::int64_t pos = window - stride; pos < window; ++pos) {
        // Logits at pos - 1 predict the token at pos.
        log_softmax(dense.data() + (pos - 1) * V, V, dense_logp);
        window_nll -= dense_logp[static_cast<std::size_t>(seq[static_cast<std::size_t>(pos)])];
      }
      reference.nll += window_nll, reference.scored += stride;
      reference_window_nll.push_back(window_nll);
      for (std::size_t i = 0; i < policies.size(); ++i) {
        af::PolicyAttention attention(policies[i], c.layers, c.attention_shape(), model.rope());
        af::llama::Cache cache(c, window);
        const Tensor logits = model.forward(seq, cache, /*all_logits=*/true, nullptr, &attention);
        Quality& q = quality[i];
        for (std::int64_t pos = window - stride; pos < window; ++pos) {
          const float* row = logits.data() + (pos - 1) * V;
          const float* dense_row = dense.data() + (pos - 1) * V;
          log_softmax(dense_row, V, dense_logp);
          log_softmax(row, V, policy_logp);
          double kl = 0;
          for (std::int64_t v = 0; v < V; ++v) {
            const double lp = dense_logp[static_cast<std::size_t>(v)];
            kl += std::exp(lp) * (lp - policy_logp[static_cast<std::size_t>(v)]);
          }
          q.kl += kl;
          q.nll -= policy_logp[static_cast<std::size_t>(seq[static_cast<std::size_t>(pos)])];
          q.agree +=
              af::argmax({row, static_cast<std::size_t>(V)}) == af::argmax({dense_row, static_cast<std::size_t>(V)})
                  ? 1
                  : 0;
          ++q.scored;
          // The traffic of the step that predicts the token at pos: the query at pos - 1.
          const af::StepTraffic& t = attention.traffic()[static_cast<std::size_t>(pos - 1)];
          q.held += t.bytes_held, q.read += t.bytes_read, q.selection += t.selection_bytes;
        }
        fmt::print(stderr, "\r[window {}/{}, policy {:>2}/{}: {:<34}] {:6.0f} s", w + 1, windows, i + 1,
                   policies.size(), policies[i].label(), elapsed());
      }
    }
    fmt::print(stderr, "\n");
    // [/evaluate]

    // The reference against transformers on the same tokens and protocol, when a case for it is committed.
    const fs::path case_file =
        fs::path(cases_dir) / fmt::format("perplexity_tutorial_{}_w{}_s{}.json", tokens, window, stride);
    const double ppl_reference = std::exp(reference.nll / static_cast<double>(reference.scored));
    fmt::print("\nreference (float32 cache, all tokens): perplexity {:.4f} over {} tokens\n", ppl_reference,
               reference.scored);
    if (fs::exists(case_file)) {
      const nlohmann::json cs = nlohmann::json::parse(std::ifstream(case_file));
      checks.expect_true("our tokens of the text = the case's token ids",
                         cs.at("token_ids").get<std::vector<std::int32_t>>() == ids);
      double worst = 0;
      const auto& ws = cs.at("windows");
      for (std::size_t w = 0; w < ws.size() && w < reference_window_nll.size(); ++w) {
        const double e =
            std::abs(reference_window_nll[w] - ws[w].at("nll").get<double>()) / static_cast<double>(stride);
        if (!(e <= worst)) worst = std::isnan(e) ? INFINITY : e;
      }
      checks.expect_true("the case has one window per window here", ws.size() == reference_window_nll.size());
      // Logit errors against transformers are a few 1e-4 (chapter 16); a log-softmax moves by at most twice
      // that, so the mean NLL of a window must agree within 2e-3 nats.
      checks.expect_close("mean NLL per window vs transformers (same tokens)", worst, 2e-3);
      const double want = cs.at("perplexity").get<double>();
      fmt::print("transformers {} on the same tokens: perplexity {:.4f}\n",
                 cs.at("versions").at("transformers").get<std::string>(), want);
      number("ppl_transformers", fmt::format("{:.4f}", want));
    } else {
      fmt::print("(no reference case {} for this protocol: the transformers check is skipped)\n",
                 case_file.filename().string());
    }
    number("ppl_reference", fmt::format("{:.2f}", ppl_reference));

    // The table, the CSV and the front.
    const double n = static_cast<double>(scored);
    std::size_t bf16_index = 0, f32_index = 0;
    for (std::size_t i = 0; i < policies.size(); ++i) {
      if (policies[i].selection == KvSelection::all && policies[i].storage == KvStorage::bf16) bf16_index = i;
      if (policies[i].selection == KvSelection::all && policies[i].storage == KvStorage::f32) f32_index = i;
    }
    const Quality& f32q = quality[f32_index];
    // The f32 policy reads the same cache through sgemm instead of grouped_attend: only rounding differs.
    checks.expect_close("f32 policy vs reference: |perplexity ratio - 1|",
                        std::abs(std::exp((f32q.nll - reference.nll) / n) - 1), 1e-4);
    checks.expect_close("f32 policy vs reference: mean KL (nats)", f32q.kl / n, 1e-6);
    checks.expect_true("f32 policy vs reference: greedy tokens agree everywhere", f32q.agree == f32q.scored);
    // bf16 read whole: (p + 1) tokens x layers x G x 2 (K, V) x d x 2 bytes at query position p, averaged.
    double bf16_expected = 0;
    for (std::int64_t w = 0; w < 1; ++w)
      for (std::int64_t pos = window - stride; pos < window; ++pos)
        bf16_expected += static_cast<double>(pos) * static_cast<double>(c.layers * c.kv_heads * 2 * c.head_dim * 2);
    checks.expect_close("bf16 bytes read per step, counted vs (p + 1) x 30 x 3 x 2 x 64 x 2",
                        std::abs(quality[bf16_index].read / n - bf16_expected / static_cast<double>(stride)), 0.5);

    const double bf16_ppl = std::exp(quality[bf16_index].nll / n);
    fmt::print("\n{:<34} {:>9} {:>9} {:>9} {:>10} {:>8} {:>10} {:>7}\n", "cache (per sequence, all layers)", "held KiB",
               "read KiB", "choose", "perplexity", "vs bf16", "KL nats", "greedy");
    af::OutputFile csv;
    csv.print("method,label,storage,selection,knob,held_bytes,read_bytes,selection_bytes,perplexity,kl,agreement\n");
    for (std::size_t i = 0; i < policies.size(); ++i) {
      const Quality& q = quality[i];
      const double ppl = std::exp(q.nll / n);
      fmt::print("{:<34} {:>9} {:>9} {:>9} {:>10.3f} {:>+7.2f}% {:>10.2e} {:>6.1f}%\n", policies[i].label(),
                 kib(q.held / n), kib(q.read / n), q.selection > 0 ? kib(q.selection / n) : "-", ppl,
                 100 * (ppl / bf16_ppl - 1), q.kl / n, 100.0 * static_cast<double>(q.agree) / n);
      const CachePolicy& p = policies[i];
      const std::int64_t knob = p.selection == KvSelection::all             ? p.block
                                : p.selection == KvSelection::top_k         ? p.top_k
                                : p.selection == KvSelection::pages         ? p.pages * p.page
                                : p.selection == KvSelection::heavy_hitters ? p.budget
                                                                            : p.window + p.sinks;
      const std::string key = slug(p.label());
      number(key + "_ppl", fmt::format("{:.2f}", ppl));
      number(key + "_ppl_pct", fmt::format("{:+.1f}", 100 * (ppl / bf16_ppl - 1)));
      number(key + "_kl", fmt::format("{:.3f}", q.kl / n));
      number(key + "_agree", fmt::format("{:.1f}", 100.0 * static_cast<double>(q.agree) / n));
      number(key + "_read_kib", kib(q.read / n));
      number(key + "_held_kib", kib(q.held / n));
      csv.print("\"{}\",\"{}\",{},{},{},{:.1f},{:.1f},{:.1f},{:.6f},{:.6e},{:.6f}\n", p.method(), p.label(),
                static_cast<int>(p.storage), static_cast<int>(p.selection), knob, q.held / n, q.read / n,
                q.selection / n, ppl, q.kl / n, static_cast<double>(q.agree) / n);
    }
    number("ppl_bf16", fmt::format("{:.3f}", bf16_ppl));
    // The Pareto fronts of KL against bytes read per step (attention's reads plus what choosing them reads:
    // Quest's page bounds, exact top-k's pass over every key) and against bytes held (the f32 reference left
    // out: it is what the others are measured against).
    std::vector<double> read, held, kl;
    std::vector<std::size_t> candidates;
    for (std::size_t i = 0; i < policies.size(); ++i)
      if (i != f32_index)
        candidates.push_back(i), read.push_back((quality[i].read + quality[i].selection) / n),
            held.push_back(quality[i].held / n), kl.push_back(quality[i].kl / n);
    af::OutputFile fronts;
    fronts.print("front,label,bytes,kl\n");
    for (const auto& [name, cost] : {std::pair{"read", &read}, std::pair{"held", &held}}) {
      std::string members;
      fmt::print("\nPareto front, KL against bytes {} per step:", name);
      for (const std::size_t f : pareto_front(*cost, kl)) {
        const CachePolicy& p = policies[candidates[f]];
        fmt::print("\n  {:<34} {:>7} KiB  KL {:.2e}", p.label(), kib((*cost)[f]), kl[f]);
        fronts.print("{},\"{}\",{:.1f},{:.6e}\n", name, p.label(), (*cost)[f], kl[f]);
        members += (members.empty() ? "" : "; ") + p.label();
      }
      fmt::print("\n");
      number(std::string("front_") + name, members);
    }

    // The pass key: for each length, depth and trial, one trial (pass_key_trial) run through every policy.
    af::OutputFile retrieval_csv;
    retrieval_csv.print("method,label,length,depth,trials,correct,low,high\n");
    if (trials > 0) {
      af::Rng rng(seed);
      const std::int64_t budget = lengths.front() / 4;
      const std::vector<CachePolicy> methods = retrieval_policies(budget);
      fmt::print("\npass key: {} trials per length and depth; budgets {} tokens ({} for top-k)\n", trials, budget,
                 budget / 8);
      fmt::print("{:<34} {:>7} {:>6} {:>9} {:>15}\n", "cache", "length", "depth", "correct", "95% interval");
      std::int64_t runs = 0;
      const std::int64_t total_runs = static_cast<std::int64_t>(methods.size() * lengths.size()) * depths * trials;
      for (const std::int64_t length : lengths) {
        std::vector<std::int64_t> length_correct(methods.size());
        for (std::int64_t di = 0; di < depths; ++di) {
          const double depth =
              depths == 1 ? 0.5 : 0.1 + 0.8 * static_cast<double>(di) / static_cast<double>(depths - 1);
          std::vector<std::int64_t> correct(methods.size());
          for (std::int64_t trial = 0; trial < trials; ++trial) {
            const PassKeyTrial pk = pass_key_trial(tokenizer, all_ids, tokens, length, depth, rng);
            for (std::size_t m = 0; m < methods.size(); ++m) {
              const bool ok = finds_pass_key(model, methods[m], pk, length);
              correct[m] += ok ? 1 : 0;
              ++runs;
              fmt::print(stderr, "\r[pass key {}/{}: length {}, depth {:.0f}%, {:<30}] {:6.0f} s", runs, total_runs,
                         length, 100 * depth, methods[m].label(), elapsed());
            }
          }
          fmt::print(stderr, "\n");
          for (std::size_t m = 0; m < methods.size(); ++m) {
            const auto [lo, hi] = wilson(correct[m], trials);
            fmt::print("{:<34} {:>7} {:>5.0f}% {:>4}/{:<4} [{:>4.2f}, {:>4.2f}]\n", methods[m].label(), length,
                       100 * depth, correct[m], trials, lo, hi);
            number(fmt::format("pk_{}_{}_{:.0f}", slug(methods[m].method()), length, 100 * depth),
                   fmt::format("{}/{}", correct[m], trials));
            retrieval_csv.print("\"{}\",\"{}\",{},{:.3f},{},{},{:.4f},{:.4f}\n", methods[m].method(),
                                methods[m].label(), length, depth, trials, correct[m], lo, hi);
            length_correct[m] += correct[m];
          }
        }
        for (std::size_t m = 0; m < methods.size(); ++m) {
          const auto [lo, hi] = wilson(length_correct[m], depths * trials);
          const std::string key = fmt::format("pk_{}_{}", slug(methods[m].method()), length);
          number(key, fmt::format("{}/{}", length_correct[m], depths * trials));
          number(key + "_interval", fmt::format("[{:.2f}, {:.2f}]", lo, hi));
        }
      }
    }
    // [/retrieval]
    fmt::print("\nsweep: {} policies, {:.0f} s on {} threads\n", policies.size(), elapsed(), omp_get_max_threads());

    if (!out_dir.empty()) {
      const fs::path out = af::make_output_directory(out_dir);
      af::write_output_file(out / "quality.csv", [&](af::OutputFile& f) { f.print("{}", csv.text()); });
      af::write_output_file(out / "fronts.csv", [&](af::OutputFile& f) { f.print("{}", fronts.text()); });
      af::write_output_file(out / "retrieval.csv", [&](af::OutputFile& f) { f.print("{}", retrieval_csv.text()); });
      book_numbers.write(out);
    }
    return checks.all_passed();
  });
}
