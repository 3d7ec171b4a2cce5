// Chapter 18 — Trained from scratch: what each attention can learn at matched size.
//
// Generates three synthetic tasks (multi-query associative recall, a needle at a controlled distance, selective
// copying), trains tiny decoders that differ only in their token mixer (MHA, GQA, MQA, a sliding window, MLA,
// DSA, lightning attention, Gated DeltaNet, each behind the same token shift) at a matched parameter count with
// the library's hand-written backward passes and AdamW, checks each model's gradient against float64 finite
// differences, and measures accuracy beside the values each mixer keeps and reads per decode step; writes the
// data of the figures. The book runs one recall point at half the full sweep's length (T = 32, a window of 16,
// DSA's top-8); --full runs the sweep whose results are committed.
//
//   build/bin/ch18_trained_from_scratch [--full] [--variants mha,gqa,mqa,window,mla,dsa,linear,gdn]
//       [--recall 32:8] [--needle T:d,...] [--copy T:n,...] [--hidden 32] [--layers 2] [--heads 4]
//       [--window 32] [--top-k 16] [--no-shift] [--steps 1500] [--batch 16] [--lr 1e-2] [--seeds 1]
//       [--eval 64] [--jobs 0] [--seed 18] [--out DIR]

#include "af/error.hpp"
#include "af/program.hpp"
#include "af/random.hpp"
#include "af/train.hpp"
#include "af/train_mixers.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <exception>
#include <filesystem>
#include <functional>
#include <map>
#include <mutex>
#include <numeric>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

namespace {

namespace train = af::train;

// [tasks]
// The vocabulary every task shares: 0 is the filler, then `keys` key tokens, then `values` value tokens, then
// two marks. A sequence is tokens plus, per position, the token the model must predict there (-1: not scored).
struct Vocabulary {
  std::int32_t keys = 16, values = 16;
  std::int32_t key(std::int64_t i) const { return static_cast<std::int32_t>(1 + i); }
  std::int32_t value(std::int64_t i) const { return static_cast<std::int32_t>(1 + keys + i); }
  std::int32_t mark() const { return 1 + keys + values; }
  std::int32_t separator() const { return 2 + keys + values; }
  std::int32_t size() const { return 3 + keys + values; }
};

// `count` distinct integers from [0, n), in random order (a partial Fisher-Yates shuffle).
std::vector<std::int64_t> distinct(af::Rng& rng, std::int64_t n, std::int64_t count) {
  std::vector<std::int64_t> all(static_cast<std::size_t>(n));
  std::iota(all.begin(), all.end(), 0);
  for (std::int64_t i = 0; i < count; ++i) std::swap(all[i], all[i + rng.below(n - i)]);
  all.resize(static_cast<std::size_t>(count));
  return all;
}

// Multi-query associative recall (Zoology): `pairs` key-value pairs at the start, then every key again, in a
// random order and at random places in the rest of the sequence, followed by its value; the value is scored
// at the position of the asked key. Nothing but recall can answer it: the keys and values are drawn afresh for
// every sequence.
train::Sequence mqar(af::Rng& rng, const Vocabulary& vocab, std::int64_t length, std::int64_t pairs) {
  train::Sequence s{std::vector<std::int32_t>(static_cast<std::size_t>(length), 0),
                    std::vector<std::int32_t>(static_cast<std::size_t>(length), train::ignored_target)};
  const std::vector<std::int64_t> keys = distinct(rng, vocab.keys, pairs);
  std::vector<std::int64_t> values(static_cast<std::size_t>(pairs));
  for (std::int64_t i = 0; i < pairs; ++i) {
    values[i] = rng.below(vocab.values);
    s.tokens[2 * i] = vocab.key(keys[i]);
    s.tokens[2 * i + 1] = vocab.value(values[i]);
  }
  // The rest holds (length - 2 pairs) / 2 slots of two positions; `pairs` of them, chosen at random, ask.
  const std::vector<std::int64_t> slots = distinct(rng, (length - 2 * pairs) / 2, pairs);
  for (std::int64_t i = 0; i < pairs; ++i) {
    const std::int64_t at = 2 * pairs + 2 * slots[i];
    s.tokens[at] = vocab.key(keys[i]);
    s.tokens[at + 1] = s.targets[at] = vocab.value(values[i]);
  }
  return s;
}

// A needle at distance `distance`: random key tokens as noise, a mark followed by a value `distance` positions
// before the end, and the mark again at the end: the model must emit the value that followed the first mark.
train::Sequence needle(af::Rng& rng, const Vocabulary& vocab, std::int64_t length, std::int64_t distance) {
  train::Sequence s{std::vector<std::int32_t>(static_cast<std::size_t>(length)),
                    std::vector<std::int32_t>(static_cast<std::size_t>(length), train::ignored_target)};
  for (std::int32_t& t : s.tokens) t = vocab.key(rng.below(vocab.keys));
  const std::int32_t value = vocab.value(rng.below(vocab.values));
  const std::int64_t at = length - 1 - distance;
  s.tokens[at] = vocab.mark();
  s.tokens[at + 1] = value;
  s.tokens[length - 1] = vocab.mark();
  s.targets[length - 1] = value;
  return s;
}

// Selective copying (Mamba's variant of the copying task): `count` value tokens scattered among fillers over the
// first length - count - 1 positions, a separator, then the values again in order; each is scored at the
// position before it.
train::Sequence selective_copy(af::Rng& rng, const Vocabulary& vocab, std::int64_t length, std::int64_t count) {
  train::Sequence s{std::vector<std::int32_t>(static_cast<std::size_t>(length), 0),
                    std::vector<std::int32_t>(static_cast<std::size_t>(length), train::ignored_target)};
  const std::int64_t field = length - count - 1;
  std::vector<std::int64_t> places = distinct(rng, field, count);
  std::ranges::sort(places);
  s.tokens[field] = vocab.separator();
  for (std::int64_t i = 0; i < count; ++i) {
    const std::int32_t value = vocab.value(rng.below(vocab.values));
    s.tokens[places[i]] = value;
    s.tokens[field + 1 + i] = value;
    s.targets[field + i] = value;
  }
  return s;
}
// The share of the asked keys whose pair a sliding window of `window` tokens sees directly from the query: the
// query at position t reads positions t - window + 1 .. t, and the value (which carries its key through the
// token shift) sits at 2 i + 1. Estimated over `samples` generated sequences. A second layer can reach further
// (a token inside the window may have read the pair in the layer below: two layers reach 2 (W - 1) back), but
// only by carrying the pair in its D values beside everything else it carries.
double window_reach(const Vocabulary& vocab, std::int64_t length, std::int64_t pairs, std::int64_t window,
                    std::int64_t samples, std::uint64_t seed) {
  af::Rng rng(seed);
  std::int64_t seen = 0, asked = 0;
  for (std::int64_t n = 0; n < samples; ++n) {
    const train::Sequence s = mqar(rng, vocab, length, pairs);
    for (std::int64_t t = 0; t < length; ++t) {
      if (s.targets[static_cast<std::size_t>(t)] < 0) continue;
      ++asked;
      for (std::int64_t j = std::max<std::int64_t>(0, t - window + 1); j < 2 * pairs && j <= t; ++j)
        if (j % 2 == 1 && s.tokens[static_cast<std::size_t>(j)] == s.targets[static_cast<std::size_t>(t)] &&
            s.tokens[static_cast<std::size_t>(j - 1)] == s.tokens[static_cast<std::size_t>(t)]) {
          ++seen;
          break;
        }
    }
  }
  return static_cast<double>(seen) / static_cast<double>(asked);
}
// [/tasks]

// [variants]
// The mixers compared. Every variant has the same width, depth and head count; its MLP is sized so that the
// whole model has (nearly) as many parameters as the MHA model. What a decoder keeps per layer: a cache of
// `cache_per_token` values per token (of the last `window` tokens only, when there is a window), plus `state`
// values of fixed size. What one decode step reads per layer: all of that, except for DSA, whose indexer reads
// every cached index key but whose attention reads only the `top_k` selected tokens' keys and values.
struct Variant {
  std::string key, name;
  std::function<std::unique_ptr<train::Mixer>(std::int64_t layer)> mixer;
  // DSA: the same layers attending every key, trained for the first quarter of the steps before the sparse ones
  // take over (none for the others).
  std::function<std::unique_ptr<train::Mixer>(std::int64_t layer)> dense_warmup;
  std::int64_t cache_per_token = 0, state = 0, window = 0, top_k = 0, index_per_token = 0;

  std::int64_t held(std::int64_t length) const {
    return cache_per_token * (window > 0 ? std::min(length, window) : length) + state;
  }
  std::int64_t read(std::int64_t length) const {
    if (top_k == 0) return held(length);
    return index_per_token * length + (cache_per_token - index_per_token) * std::min(length, top_k) + state;
  }
};

struct Sizes {
  std::int64_t hidden = 32, heads = 4, layers = 2, window = 32, top_k = 16;
  bool shift = true;
  double indexer_loss_weight = 1.0;  // DSA: 0 leaves the indexer untrained (the gradient check's main path)
};

Variant variant_of(const std::string& key, const Sizes& z) {
  const std::int64_t hidden = z.hidden, heads = z.heads, d = z.hidden / z.heads, layers = z.layers;
  const auto softmax = [&](std::string name, std::int64_t kv_heads, std::int64_t window) {
    const train::SoftmaxAttentionOptions options{heads, kv_heads, d, window, 10000.0};
    return Variant{
        key,
        std::move(name),
        [hidden, options](std::int64_t) { return std::make_unique<train::SoftmaxAttention>(hidden, options); },
        nullptr,
        2 * kv_heads * d,
        0,
        window};
  };
  Variant v;
  if (key == "mha")
    v = softmax("MHA", heads, 0);
  else if (key == "mha-plain")
    v = softmax("MHA, no shift", heads, 0);
  else if (key == "gqa")
    v = softmax(fmt::format("GQA {} KV heads", heads / 2), heads / 2, 0);
  else if (key == "mqa")
    v = softmax("MQA", 1, 0);
  else if (key == "window")
    v = softmax(fmt::format("window {}", z.window), heads, z.window);
  else if (key == "mla") {
    // A latent of D / 2 and a rotated key of d / 2, shared by the heads: (D + d) / 2 values per token.
    const train::MlaOptions o{heads, d, d / 2, d, hidden / 2, 10000.0, 1e-6};
    v = {key, "MLA", [hidden, o](std::int64_t) { return std::make_unique<train::MlaMixer>(hidden, o); }, nullptr,
         o.kv_rank + o.rope_dim};
  } else if (key == "dsa" || key == "dsa-cold") {
    // MHA whose queries attend their top-k keys, chosen by a 2-head indexer of dimension d / 2 that is trained
    // by KL to the main attention's distribution. DeepSeek V3.2 first trains the indexer beside dense attention
    // (its dense warm-up), then switches to top-k: `dsa` does the same (dense for the first quarter of the
    // steps, the indexer learning throughout); `dsa-cold` selects top-k from the first step, when the indexer
    // is still random.
    const train::DsaOptions o{heads, heads, d, 10000.0, 2, d / 2, z.top_k, z.indexer_loss_weight};
    train::DsaOptions dense = o;
    dense.top_k = 1 << 20;
    v = {key,
         fmt::format("DSA top-{}{}", z.top_k, key == "dsa" ? "" : " cold"),
         [hidden, o](std::int64_t) { return std::make_unique<train::DsaMixer>(hidden, o); },
         nullptr,
         2 * heads * d + o.index_dim,
         0,
         0,
         z.top_k,
         o.index_dim};
    if (key == "dsa")
      v.dense_warmup = [hidden, dense](std::int64_t) { return std::make_unique<train::DsaMixer>(hidden, dense); };
  } else if (key == "linear") {
    v = {key,
         "lightning (linear)",
         [hidden, heads, d, layers](std::int64_t layer) {
           return std::make_unique<train::LinearAttentionMixer>(
               hidden, train::LinearAttentionOptions{heads, d, layer, layers, 1e-6});
         },
         nullptr,
         0,
         heads * d * d};
  } else if (key == "gdn") {
    // Half as many key heads as value heads, as Qwen3-Next; the state is one d x d matrix per value head, and
    // the short convolution keeps its last K - 1 inputs.
    const train::GatedDeltaNetOptions o{heads / 2, heads, d, d, 4, 1e-6};
    v = {key,
         "Gated DeltaNet",
         [hidden, o](std::int64_t) { return std::make_unique<train::GatedDeltaNetMixer>(hidden, o); },
         nullptr,
         0,
         o.value_heads * d * d + (o.conv_kernel - 1) * (2 * o.key_heads * d + o.value_heads * d)};
  } else
    throw af::Error(
        fmt::format("--variants: unknown variant \"{}\" (expected mha, mha-plain, gqa, mqa, window, mla, dsa, "
                    "dsa-cold, linear or gdn)",
                    key));
  if (z.shift && key != "mha-plain") {
    // The token shift before every mixer keeps the previous token's D values per layer.
    const auto shifted = [hidden](auto inner) -> std::function<std::unique_ptr<train::Mixer>(std::int64_t)> {
      return [inner, hidden](std::int64_t layer) {
        return std::make_unique<train::TokenShiftMixer>(hidden, inner(layer));
      };
    };
    v.mixer = shifted(v.mixer);
    if (v.dense_warmup) v.dense_warmup = shifted(v.dense_warmup);
    v.state += hidden;
  }
  return v;
}
// [/variants]

// The MLP width that brings a model with this mixer closest to `target` parameters.
std::int64_t matched_ffn(const train::ModelConfig& base, const Variant& v, std::int64_t target) {
  std::int64_t best = 1, best_gap = -1;
  for (std::int64_t ffn = 1; ffn <= 8 * base.hidden; ++ffn) {
    train::ModelConfig c = base;
    c.ffn = ffn;
    const std::int64_t gap = std::abs(train::Model(c, v.mixer).layout().size() - target);
    if (best_gap < 0 || gap < best_gap) best_gap = gap, best = ffn;
  }
  return best;
}

// Accuracy on the scored positions: the share whose largest logit is the target.
double accuracy(const train::Model& model, std::span<const float> params, std::span<const train::Sequence> eval) {
  std::int64_t right = 0, scored = 0;
  const std::int64_t vocab = model.config().vocab;
  for (const train::Sequence& s : eval) {
    const std::vector<float> logits = model.logits<float>(params, s.tokens);
    for (std::size_t t = 0; t < s.targets.size(); ++t) {
      if (s.targets[t] < 0) continue;
      const auto row = std::span(logits).subspan(t * static_cast<std::size_t>(vocab), static_cast<std::size_t>(vocab));
      right += std::ranges::max_element(row) - row.begin() == s.targets[t];
      ++scored;
    }
  }
  return static_cast<double>(right) / static_cast<double>(scored);
}

// The largest relative difference between the model's float64 gradient and central differences of its float64
// loss, over `probes` parameters spread through the layout.
double gradient_check(const train::Model& model, const train::Sequence& s, std::uint64_t seed, int probes) {
  const std::vector<float> init = model.initial_parameters(seed);
  std::vector<double> params(init.begin(), init.end()), grads(params.size(), 0.0);
  model.loss_and_gradient<double>(params, s, 1.0, grads);
  double worst = 0;
  const double h = 1e-6;
  for (int p = 0; p < probes; ++p) {
    const std::size_t i = static_cast<std::size_t>(p) * params.size() / static_cast<std::size_t>(probes);
    const double keep = params[i];
    params[i] = keep + h;
    const double up = model.loss<double>(params, s);
    params[i] = keep - h;
    const double down = model.loss<double>(params, s);
    params[i] = keep;
    const double numeric = (up - down) / (2 * h);
    const double error = std::abs(grads[i] - numeric) / std::max(1.0, std::abs(numeric));
    if (!(error <= worst)) worst = std::isfinite(error) ? error : INFINITY;
  }
  return worst;
}

struct RunResult {
  double accuracy = 0, final_loss = 0, seconds = 0;
};

// [train-loop]
// One run: a fresh batch from the task generator at every step (the data never repeats), AdamW with a cosine
// schedule (warm-up over the first tenth, down to a tenth of the peak), and the accuracy on held-out sequences
// drawn from another seed at the end. One thread per run: the sweep runs several runs at once.
RunResult train_run(const train::Model& model, const train::Model* warmup_model,
                    const std::function<train::Sequence(af::Rng&)>& task, std::uint64_t seed, std::int64_t steps,
                    std::int64_t batch_size, double lr, std::int64_t eval_count) {
  const auto start = std::chrono::steady_clock::now();
  af::Rng data(seed * 7919 + 1);
  std::vector<train::Sequence> batch(static_cast<std::size_t>(batch_size));
  double loss = 0;
  // A warm-up model (DSA's dense stage) trains the first quarter of the steps; the model then goes on from its
  // parameters with a fresh optimizer and schedule, as a new training stage does.
  const std::int64_t warmup_steps = warmup_model != nullptr ? steps / 4 : 0;
  std::vector<float> params = model.initial_parameters(seed);
  const auto stage = [&](const train::Model& m, std::int64_t stage_steps) {
    train::TrainConfig config;
    config.schedule = {lr, lr / 10, std::max<std::int64_t>(1, stage_steps / 10), stage_steps};
    config.adamw.weight_decay = 0.1;
    config.threads = 1;
    train::Trainer trainer(m, std::move(params), config);
    for (std::int64_t step = 0; step < stage_steps; ++step) {
      for (train::Sequence& s : batch) s = task(data);
      loss = trainer.train_step(batch).loss;
    }
    params.assign(trainer.parameters().begin(), trainer.parameters().end());
  };
  if (warmup_steps > 0) stage(*warmup_model, warmup_steps);
  stage(model, steps - warmup_steps);
  af::Rng held_out(seed * 104729 + 2);
  std::vector<train::Sequence> eval(static_cast<std::size_t>(eval_count));
  for (train::Sequence& s : eval) s = task(held_out);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return {accuracy(model, params, eval), loss, seconds};
}
// [/train-loop]

std::vector<std::int64_t> parse_list(const std::string& flag, const std::string& text, std::int64_t lo,
                                     std::int64_t hi) {
  std::vector<std::int64_t> out;
  std::size_t start = 0;
  while (start <= text.size()) {
    const std::size_t comma = std::min(text.find(',', start), text.size());
    const std::string item = text.substr(start, comma - start);
    std::int64_t value = 0;
    try {
      std::size_t used = 0;
      value = std::stoll(item, &used);
      if (used != item.size()) throw std::invalid_argument(item);
    } catch (const std::exception&) {
      throw af::Error(fmt::format("{}: \"{}\" is not an integer (expected a comma-separated list)", flag, item));
    }
    if (value < lo || value > hi) throw af::Error(fmt::format("{}: {} is outside [{}, {}]", flag, value, lo, hi));
    out.push_back(value);
    start = comma + 1;
  }
  return out;
}

std::vector<std::string> split(const std::string& text) {
  std::vector<std::string> out;
  std::size_t start = 0;
  while (start <= text.size()) {
    const std::size_t comma = std::min(text.find(',', start), text.size());
    out.push_back(text.substr(start, comma - start));
    start = comma + 1;
  }
  return out;
}

struct Stats {
  double mean = 0, low = 0, high = 0;
};

Stats stats_of(const std::vector<double>& xs) {
  Stats s{0, *std::ranges::min_element(xs), *std::ranges::max_element(xs)};
  for (const double x : xs) s.mean += x / static_cast<double>(xs.size());
  return s;
}

// A point of the sweep: a task at one sequence length and one difficulty (pairs, distance or copied tokens).
struct Point {
  std::string task;
  std::int64_t length = 0, x = 0, steps = 0;
};

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Chapter 18: trained from scratch", "ch18_trained_from_scratch"};
  // A flag given twice takes its last value: the test runs append their flags to the book run's.
  app.option_defaults()->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
  std::string variant_list = "mha,gqa,mqa,window,mla,dsa,linear,gdn", recall_list = "32:8", needle_list, copy_list;
  Sizes sizes;
  std::int64_t steps = 1500, batch = 16, seeds = 1, eval = 64;
  double lr = 1e-2;
  int jobs = 0;
  bool full = false;
  std::uint64_t seed = 18;
  std::string out_dir;
  app.add_flag("--full", full,
               "The full sweep: recall 64:8,64:16,128:16, needle 64:16,64:48, copy 64:8, 3000 steps for recall, "
               "3 seeds (about an hour on two cores)");
  app.add_option(
         "--variants", variant_list,
         "Mixers to train: mha, mha-plain (without the token shift), gqa, mqa, window, mla, dsa, dsa-cold, linear, gdn")
      ->capture_default_str();
  app.add_option("--recall", recall_list, "Recall points, T:pairs (comma-separated; none for none)")
      ->capture_default_str();
  app.add_option("--needle", needle_list, "Needle points, T:distance (comma-separated)")->capture_default_str();
  app.add_option("--copy", copy_list, "Selective-copy points, T:tokens (comma-separated)")->capture_default_str();
  app.add_option("--hidden", sizes.hidden, "Model width D")->check(CLI::Range(8, 256))->capture_default_str();
  app.add_option("--layers", sizes.layers, "Decoder blocks")->check(CLI::Range(1, 8))->capture_default_str();
  app.add_option("--heads", sizes.heads, "Query heads (D / heads per head)")
      ->check(CLI::Range(1, 16))
      ->capture_default_str();
  app.add_option("--window", sizes.window, "The sliding window's tokens")
      ->check(CLI::Range(1, 4096))
      ->capture_default_str();
  app.add_option("--top-k", sizes.top_k, "Keys a DSA query attends")->check(CLI::Range(1, 4096))->capture_default_str();
  app.add_flag("--shift,!--no-shift", sizes.shift, "A learned token shift before every mixer")->capture_default_str();
  app.add_option("--steps", steps, "Training steps per run")->check(CLI::Range(1, 100000))->capture_default_str();
  app.add_option("--batch", batch, "Sequences per step")->check(CLI::Range(1, 1024))->capture_default_str();
  app.add_option("--lr", lr, "Peak learning rate")->check(af::finite_range(1e-6, 1.0))->capture_default_str();
  app.add_option("--seeds", seeds, "Runs per point (different initialisation and data)")
      ->check(CLI::Range(1, 16))
      ->capture_default_str();
  app.add_option("--eval", eval, "Held-out sequences per run")->check(CLI::Range(1, 4096))->capture_default_str();
  app.add_option("--jobs", jobs, "Runs trained at once, one thread each (0: one per core)")
      ->check(CLI::Range(0, 256))
      ->capture_default_str();
  app.add_option("--seed", seed, "Seed of everything")->check(af::seed_value())->capture_default_str();
  app.add_option("--out", out_dir, "Directory for the figure data (results.csv, runs.csv) and numbers.json")
      ->check(af::output_directory());
  return af::run_program(app, argc, argv, [&] {
    std::int64_t recall_steps = steps;
    if (full) {
      recall_list = "64:8,64:16,128:16", needle_list = "64:16,64:48", copy_list = "64:8";
      recall_steps = 2 * steps, seeds = 3;
    }
    af::require(sizes.hidden % sizes.heads == 0 && (sizes.hidden / sizes.heads) % 2 == 0,
                "--hidden {} / --heads {} must be an even head dimension", sizes.hidden, sizes.heads);
    af::require(sizes.heads % 2 == 0, "--heads {} must be even (GQA and Gated DeltaNet keep half of them)",
                sizes.heads);
    const Vocabulary vocab;
    std::vector<Point> points;
    const auto parse_points = [&](const std::string& flag, const std::string& text, const std::string& task,
                                  std::int64_t task_steps) {
      if (text.empty() || text == "none") return;
      for (const std::string& item : split(text)) {
        const std::size_t colon = item.find(':');
        af::require(colon != std::string::npos, "{}: \"{}\" is not T:n (expected e.g. 64:8)", flag, item);
        const std::int64_t length = parse_list(flag, item.substr(0, colon), 8, 512)[0];
        const std::int64_t x = parse_list(flag, item.substr(colon + 1), 1, 511)[0];
        if (task == "recall")
          af::require(x <= vocab.keys && 4 * x <= length,
                      "{}: {} pairs at T = {} (expected at most {} pairs, the keys, and 4 x pairs <= T)", flag, x,
                      length, vocab.keys);
        else if (task == "needle")
          af::require(x + 2 <= length, "{}: distance {} needs T >= {} (got {})", flag, x, x + 2, length);
        else
          af::require(2 * x + 1 <= length, "{}: {} tokens to copy need T >= {} (got {})", flag, x, 2 * x + 1, length);
        points.push_back({task, length, x, task_steps});
      }
    };
    parse_points("--recall", recall_list, "recall", recall_steps);
    parse_points("--needle", needle_list, "needle", steps);
    parse_points("--copy", copy_list, "copy", steps);
    af::require(!points.empty(), "--recall, --needle and --copy are all empty (expected at least one point)");
    std::vector<Variant> variants;
    for (const std::string& key : split(variant_list)) variants.push_back(variant_of(key, sizes));
    std::int64_t work = 0;
    for (const Point& p : points) work += p.steps * p.length * p.length;
    af::require_product_within({{"variants x --seeds", static_cast<std::int64_t>(variants.size()) * seeds},
                                {"steps x T^2 over the points", work},
                                {"--batch", batch},
                                {"--hidden", sizes.hidden},
                                {"--layers", sizes.layers}},
                               std::int64_t{1} << 50);

    af::Checks checks;
    af::BookNumbers numbers;
    train::ModelConfig base;
    base.vocab = vocab.size();
    base.hidden = sizes.hidden;
    base.layers = sizes.layers;
    base.ffn = 2 * sizes.hidden;
    const std::int64_t target = train::Model(base, variant_of("mha", sizes).mixer).layout().size();

    // 1. The models, matched in size, and their gradients against float64 finite differences.
    fmt::print(
        "Tiny decoders: D = {}, {} layers, {} heads of {}, vocabulary {}, token shift {}; parameters matched "
        "to MHA's {}\n",
        sizes.hidden, sizes.layers, sizes.heads, sizes.hidden / sizes.heads, vocab.size(), sizes.shift ? "on" : "off",
        target);
    fmt::print("  {:<18} {:>4} {:>10}   {:>14} {:>12} {:>12}\n", "mixer", "ffn", "parameters", "cache per token",
               "fixed state", "read at 64");
    std::vector<train::ModelConfig> configs;
    af::Rng probe_rng(seed);
    const train::Sequence probe = mqar(probe_rng, vocab, 16, 2);
    Sizes main_path = sizes;
    main_path.indexer_loss_weight = 0.0;
    for (const Variant& v : variants) {
      train::ModelConfig c = base;
      c.ffn = matched_ffn(base, v, target);
      const train::Model model(c, v.mixer);
      fmt::print("  {:<18} {:>4} {:>10}   {:>14} {:>12} {:>12}\n", v.name, c.ffn, model.layout().size(),
                 v.cache_per_token, v.state, v.read(64));
      // The loss is the language-model loss; DSA's indexer learns from its own KL loss instead (checked against
      // its central differences in the library's tests), so its check leaves the indexer out.
      const double error = gradient_check(train::Model(c, variant_of(v.key, main_path).mixer), probe, seed, 40);
      checks.expect_close(fmt::format("{}: gradient vs float64 central differences (40 parameters)", v.name), error,
                          1e-6);
      configs.push_back(c);
    }

    // 2. The sweep: every (point, variant, seed) is one run; `--jobs` runs train at once.
    struct Job {
      std::size_t point, variant;
      std::int64_t seed_index;
      RunResult result;
    };
    std::vector<Job> runs;
    for (std::size_t p = 0; p < points.size(); ++p)
      for (std::size_t v = 0; v < variants.size(); ++v)
        for (std::int64_t s = 0; s < seeds; ++s) runs.push_back({p, v, s, {}});
    const auto task_of = [&](const Point& p) -> std::function<train::Sequence(af::Rng&)> {
      if (p.task == "recall") return [&vocab, p](af::Rng& r) { return mqar(r, vocab, p.length, p.x); };
      if (p.task == "needle") return [&vocab, p](af::Rng& r) { return needle(r, vocab, p.length, p.x); };
      return [&vocab, p](af::Rng& r) { return selective_copy(r, vocab, p.length, p.x); };
    };
    const int workers = jobs > 0 ? jobs : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
    fmt::print("\nTraining: {} runs ({} points x {} mixers x {} seeds), batches of {}, peak lr {}, {} at once\n",
               runs.size(), points.size(), variants.size(), seeds, batch, lr, workers);
    std::atomic<std::size_t> next{0}, done{0};
    std::mutex print_mutex;
    std::exception_ptr failure;
    const auto sweep_start = std::chrono::steady_clock::now();
    const auto worker = [&] {
      for (std::size_t i = next++; i < runs.size(); i = next++) {
        Job& job = runs[i];
        const Point& p = points[job.point];
        try {
          const Variant& v = variants[job.variant];
          const train::Model model(configs[job.variant], v.mixer);
          std::optional<train::Model> warmup;
          if (v.dense_warmup) warmup.emplace(configs[job.variant], v.dense_warmup);
          const std::uint64_t run_seed = seed + 1000 * static_cast<std::uint64_t>(job.seed_index) +
                                         static_cast<std::uint64_t>(p.length * 64 + p.x);
          job.result = train_run(model, warmup ? &*warmup : nullptr, task_of(p), run_seed, p.steps, batch, lr, eval);
        } catch (...) {
          const std::lock_guard lock(print_mutex);
          if (!failure) failure = std::current_exception();
          next = runs.size();
          return;
        }
        const std::lock_guard lock(print_mutex);
        const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - sweep_start).count();
        // Progress on stderr, so that the book's output stays the same from run to run.
        fmt::print(stderr,
                   "  [{}/{}] {} T={} {}={} {} seed {}: accuracy {:.3f}, loss {:.3f}, {:.0f} s ({:.0f} s in all)\n",
                   ++done, runs.size(), p.task, p.length,
                   p.task == "recall"   ? "pairs"
                   : p.task == "needle" ? "distance"
                                        : "tokens",
                   p.x, variants[job.variant].name, job.seed_index, job.result.accuracy, job.result.final_loss,
                   job.result.seconds, elapsed);
      }
    };
    std::vector<std::thread> team;
    for (int w = 0; w < workers; ++w) team.emplace_back(worker);
    for (std::thread& t : team) t.join();
    if (failure) std::rethrow_exception(failure);
    const double sweep_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - sweep_start).count();

    // 3. The results: per point and mixer, the mean over seeds and the lowest and highest seed.
    struct Cell {
      Stats accuracy;
      std::int64_t held = 0, read = 0;
    };
    std::vector<std::vector<Cell>> cells(points.size(), std::vector<Cell>(variants.size()));
    for (std::size_t p = 0; p < points.size(); ++p) {
      fmt::print(
          "\n{} at T = {}, {} {}: accuracy (mean, lowest and highest of {} seeds); values per layer held and "
          "read by a decode step at T\n",
          points[p].task, points[p].length, points[p].x,
          points[p].task == "recall"   ? "pairs"
          : points[p].task == "needle" ? "tokens away"
                                       : "tokens",
          seeds);
      for (std::size_t v = 0; v < variants.size(); ++v) {
        std::vector<double> acc;
        for (const Job& j : runs)
          if (j.point == p && j.variant == v) acc.push_back(j.result.accuracy);
        Cell& c = cells[p][v];
        c.accuracy = stats_of(acc);
        c.held = variants[v].held(points[p].length);
        c.read = variants[v].read(points[p].length);
        fmt::print("  {:<18} {:.3f} ({:.3f} .. {:.3f})   held {:>5}  read {:>5}\n", variants[v].name, c.accuracy.mean,
                   c.accuracy.low, c.accuracy.high, c.held, c.read);
      }
    }
    fmt::print("\n{} runs in {:.0f} s on {} threads\n", runs.size(), sweep_seconds, workers);

    // What a window sees directly: at this run's recall points with its window, and at the full sweep's with
    // the full sweep's window of 32.
    std::set<std::tuple<std::int64_t, std::int64_t, std::int64_t>> reach_points{
        {64, 8, 32}, {64, 16, 32}, {128, 16, 32}};
    for (const Point& p : points)
      if (p.task == "recall") reach_points.insert({p.length, p.x, sizes.window});
    fmt::print("\nThe share of the asked keys whose pair a window sees directly (one layer; 20000 sequences):\n");
    for (const auto& [length, pairs, window] : reach_points) {
      const double reach = window_reach(vocab, length, pairs, window, 20000, seed);
      fmt::print("  window {:>3}, T = {:>3}, {:>2} pairs: {:.3f}\n", window, length, pairs, reach);
      numbers.print(fmt::format("{}window_reach_{}_{}_{}", full ? "full_" : "", length, pairs, window), "{:.2f}",
                    reach);
    }

    // Chance is one in the number of values on every task; the first mixer must beat it well on the first point.
    const double first = cells.front().front().accuracy.mean;
    checks.expect_true(
        fmt::format("{} beats chance ({:.3f}) by 5x on {} at T = {}, {} ({:.3f})", variants.front().name,
                    1.0 / vocab.values, points.front().task, points.front().length, points.front().x, first),
        first > 5.0 / vocab.values);
    // A variant's key as part of a number's name (dsa-cold: dsa_cold).
    const auto name_of = [](const Variant& v) {
      std::string name = v.key;
      std::ranges::replace(name, '-', '_');
      return name;
    };
    // The full sweep's numbers are committed beside the book's, so they carry a prefix of their own.
    const std::string prefix = full ? "full_" : "";
    numbers.print(prefix + "params", "{}", target);
    numbers.print(prefix + "recall_steps", "{}", recall_steps);
    numbers.print(prefix + "steps", "{}", steps);
    numbers.print(prefix + "seeds", "{}", seeds);
    numbers.print(prefix + "runs", "{}", runs.size());
    numbers.print(prefix + "minutes", "{:.0f}", sweep_seconds / 60);
    for (std::size_t p = 0; p < points.size(); ++p)
      for (std::size_t v = 0; v < variants.size(); ++v) {
        const std::string at =
            fmt::format("{}_{}_{}_{}", points[p].task, points[p].length, points[p].x, name_of(variants[v]));
        numbers.print(prefix + at, "{:.2f}", cells[p][v].accuracy.mean);
        numbers.print(prefix + at + "_low", "{:.2f}", cells[p][v].accuracy.low);
        numbers.print(prefix + at + "_high", "{:.2f}", cells[p][v].accuracy.high);
      }
    std::set<std::int64_t> lengths{64};
    for (const Point& p : points) lengths.insert(p.length);
    for (const std::int64_t length : lengths)
      for (const Variant& v : variants) {
        numbers.print(fmt::format("{}held_{}_{}", prefix, length, name_of(v)), "{}", v.held(length));
        numbers.print(fmt::format("{}read_{}_{}", prefix, length, name_of(v)), "{}", v.read(length));
      }

    if (!out_dir.empty()) {
      const std::filesystem::path dir = af::make_output_directory(out_dir);
      numbers.write(dir);
      af::write_output_file(dir / "results.csv", [&](af::OutputFile& out) {
        out.print("task,length,x,variant,key,mean,low,high,held,read,pareto_held,pareto_read\n");
        for (std::size_t p = 0; p < points.size(); ++p)
          for (std::size_t v = 0; v < variants.size(); ++v) {
            // On the Pareto front: no other mixer at this point is at least as accurate with fewer values (held
            // or read), or more accurate with as few.
            const auto front = [&](auto cost) {
              for (std::size_t o = 0; o < variants.size(); ++o) {
                const Cell &a = cells[p][o], &b = cells[p][v];
                if (o != v && cost(a) <= cost(b) && a.accuracy.mean >= b.accuracy.mean &&
                    (cost(a) < cost(b) || a.accuracy.mean > b.accuracy.mean))
                  return 0;
              }
              return 1;
            };
            const Cell& c = cells[p][v];
            out.print("{},{},{},\"{}\",{},{:.4f},{:.4f},{:.4f},{},{},{},{}\n", points[p].task, points[p].length,
                      points[p].x, variants[v].name, variants[v].key, c.accuracy.mean, c.accuracy.low, c.accuracy.high,
                      c.held, c.read, front([](const Cell& x) { return x.held; }),
                      front([](const Cell& x) { return x.read; }));
          }
      });
      af::write_output_file(dir / "runs.csv", [&](af::OutputFile& out) {
        out.print("task,length,x,key,seed,accuracy,final_loss,seconds\n");
        for (const Job& j : runs)
          out.print("{},{},{},{},{},{:.4f},{:.4f},{:.1f}\n", points[j.point].task, points[j.point].length,
                    points[j.point].x, variants[j.variant].key, j.seed_index, j.result.accuracy, j.result.final_loss,
                    j.result.seconds);
      });
    }
    return checks.all_passed();
  });
}
