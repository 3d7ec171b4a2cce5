// Chapter 16 — a real model through the book's own attention and cache.
//
// Loads SmolLM2-135M-Instruct from its GGUF file (the install step fetches it), shows how the file is laid
// out, tokenizes a chat prompt, runs one forward pass layer by layer, checks the logits against those Hugging
// Face transformers computed from the same file (tests/real_model), shows what the wrong RoPE pairing does,
// answers the prompt (greedy, then sampled), and measures what real attention heads read: their maps on the
// prompt and the weight they put on the first token.
//
//   build/bin/ch16_a_real_model [--model FILE] [--cases DIR] [--max-new-tokens 40] [--seed 16] [--out DIR]
//
// Exit status: 0 when every check passes, 1 when one fails, 2 for a bad flag or a bad model file.
#include "af/attention.hpp"
#include "af/compare.hpp"
#include "af/error.hpp"
#include "af/gguf.hpp"
#include "af/llama.hpp"
#include "af/mla.hpp"
#include "af/program.hpp"
#include "af/random.hpp"
#include "af/sampling.hpp"
#include "af/tokenizer.hpp"

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <vector>

namespace {

using af::Tensor;
namespace fs = std::filesystem;

// [file-layout]
// What the file holds, by storage type: how many tensors, elements and bytes, and the bits each weight takes
// (Q4_1: 20 bytes per 32 weights = 5 bits; Q8_0: 34 bytes per 32 = 8.5 bits).
void print_file_layout(const af::gguf::File& file, af::BookNumbers& numbers) {
  struct Totals {
    int tensors = 0;
    std::uint64_t elements = 0, bytes = 0;
  };
  std::map<std::string, Totals> by_type;
  std::uint64_t all_bytes = 0;
  for (const af::gguf::TensorInfo& t : file.tensors()) {
    Totals& totals = by_type[std::string(af::gguf::name_of(t.type))];
    ++totals.tensors;
    totals.elements += t.elements;
    totals.bytes += t.bytes;
    all_bytes += t.bytes;
  }
  fmt::print("GGUF version {}, {} metadata keys, {} tensors, alignment {}, tensor data from byte {}\n", file.version(),
             file.metadata().size(), file.tensors().size(), file.alignment(), file.data_offset());
  fmt::print("  {:<6} {:>8} {:>12} {:>12} {:>12}\n", "type", "tensors", "elements", "bytes", "bits/weight");
  for (const auto& [type, totals] : by_type)
    fmt::print("  {:<6} {:>8} {:>12} {:>12} {:>12.2f}\n", type, totals.tensors, totals.elements, totals.bytes,
               8.0 * static_cast<double>(totals.bytes) / static_cast<double>(totals.elements));
  fmt::print("  all    {:>8} {:>12} {:>12}\n\n", file.tensors().size(), "", all_bytes);
  numbers.print("tensors", "{}", file.tensors().size());
  numbers.print("metadata_keys", "{}", file.metadata().size());
  numbers.print("weight_mib", "{:.1f}", static_cast<double>(all_bytes) / (1 << 20));
}
// [/file-layout]

std::string printable(const std::string& bytes) {
  std::string out;
  for (const char c : bytes) {
    if (c == '\n')
      out += "\\n";
    else if (c == ' ')
      out += "\u2423";  // an open box for a space
    else
      out += c;
  }
  return out;
}

// The logits of the recorded short prompt against transformers' (tests/real_model/logits_short.json): the
// worst |difference| over the recorded top-8 of every position.
double worst_logit_error(const af::llama::Model& model, const nlohmann::json& c) {
  const auto prompt = c.at("prompt_ids").get<std::vector<std::int32_t>>();
  af::llama::Cache cache(model.config(), static_cast<std::int64_t>(prompt.size()));
  const Tensor logits = model.forward(prompt, cache, /*all_logits=*/true);
  double worst = 0.0;
  const auto& prefill = c.at("transformers").at("prefill");
  for (std::size_t p = 0; p < prompt.size(); ++p)
    for (std::size_t j = 0; j < prefill[p].at("ids").size(); ++j)
      worst = af::worse(worst, std::abs(static_cast<double>(logits.matrix().row(
                                            static_cast<std::int64_t>(p))[prefill[p]["ids"][j].get<std::size_t>()]) -
                                        prefill[p]["values"][j].get<double>()));
  return worst;
}

// [attention-maps]
// The attention weights of every head of layer `l` over the prompt, recomputed from what the forward pass
// left behind: the residual stream entering the layer (traced) and the layer's cached, rotated keys.
std::vector<Tensor> layer_weights(const af::llama::Model& model, const af::llama::Cache& cache, std::int64_t l,
                                  af::ConstMatrix residual_in) {
  const af::llama::Config& c = model.config();
  const af::llama::Layer& w = model.layer(l);
  const std::int64_t T = residual_in.rows;
  Tensor h(af::Shape{T, c.hidden}), q(af::Shape{T, c.heads * c.head_dim});
  for (std::int64_t t = 0; t < T; ++t) std::ranges::copy(residual_in.row(t), h.matrix().row(t).begin());
  af::rms_norm_rows(h.matrix(), w.attention_norm, c.rms_eps);
  af::gguf::matmul(w.q, h.matrix(), q.matrix());
  std::vector<std::int64_t> positions(static_cast<std::size_t>(T));
  for (std::int64_t t = 0; t < T; ++t) positions[static_cast<std::size_t>(t)] = t;
  model.rope().rotate_rows(q.matrix(), positions);
  std::vector<Tensor> heads;
  const af::GroupedShape shape = c.attention_shape();
  for (std::int64_t head = 0; head < c.heads; ++head) {
    const af::ConstMatrix q_head{q.data() + head * c.head_dim, T, c.head_dim, q.matrix().row_stride};
    heads.push_back(af::attention_weights(q_head, cache.layer(l).keys(shape.kv_head_of(head)), {}));
  }
  return heads;
}
// [/attention-maps]

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Chapter 16: a real model (SmolLM2-135M-Instruct) through the library", "ch16_a_real_model"};
  std::string model_path = AF_MODEL_GGUF, cases_dir = AF_REAL_MODEL_CASES, out_dir;
  std::int64_t max_new_tokens = 40;
  std::uint64_t seed = 16;
  app.add_option("--model", model_path, "GGUF model file")->capture_default_str();
  app.add_option("--cases", cases_dir, "Folder of the reference cases (logits_short.json)")->capture_default_str();
  app.add_option("--max-new-tokens", max_new_tokens, "Tokens of each answer at most")
      ->check(CLI::Range(std::int64_t{1}, std::int64_t{512}))
      ->capture_default_str();
  app.add_option("--seed", seed, "Seed of the sampled answer")->check(af::seed_value())->capture_default_str();
  app.add_option("--out", out_dir, "Directory for the figure data and numbers.json")->check(af::output_directory());

  return af::run_program(app, argc, argv, [&] {
    af::Checks checks;
    af::BookNumbers numbers;
    af::llama::Model model = af::llama::Model::load(model_path);
    const af::llama::Config& c = model.config();
    const af::Tokenizer tokenizer = af::Tokenizer::from_gguf(model.file());
    af::check_chat_template(model.file());

    fmt::print("== The file ==\n");
    print_file_layout(model.file(), numbers);

    fmt::print("== The model ==\n");
    fmt::print("llama: {} layers, hidden D = {}, H = {} query heads and G = {} KV heads of d = {},\n", c.layers,
               c.hidden, c.heads, c.kv_heads, c.head_dim);
    fmt::print("       SwiGLU {}, vocabulary {}, context {}, RoPE base {}, RMSNorm eps {:.3g},\n", c.ffn, c.vocab,
               c.context, c.rope_base, c.rms_eps);
    fmt::print("       output head {}\n", c.tied_output ? "tied to the embedding" : "its own matrix");
    const std::int64_t bf16_per_token = c.layers * 2 * c.kv_heads * c.head_dim * 2;
    fmt::print("KV cache per token: {} layers x 2 x {} heads x {} x 2 B = {} B in bf16 ({} B as float32 here);\n",
               c.layers, c.kv_heads, c.head_dim, bf16_per_token, c.cache_bytes_per_token());
    fmt::print("  {:.0f} MiB (bf16) for the full {} tokens\n",
               static_cast<double>(bf16_per_token * c.context) / (1 << 20), c.context);
    fmt::print("weights one token reads: {:.1f} MiB\n\n", static_cast<double>(model.weight_bytes()) / (1 << 20));
    numbers.set("kv_bytes_bf16", af::with_thousands(bf16_per_token));
    numbers.set("kv_bytes_f32", af::with_thousands(c.cache_bytes_per_token()));
    numbers.print("kv_mib_full_context", "{:.0f}", static_cast<double>(bf16_per_token * c.context) / (1 << 20));
    numbers.print("weights_read_mib", "{:.1f}", static_cast<double>(model.weight_bytes()) / (1 << 20));

    // [tokenize]
    const std::string question = "What is the capital of France? Answer in one sentence.";
    const std::vector<af::ChatMessage> chat = {{"user", question}};
    const std::string prompt_text = af::format_chat(chat, /*add_generation_prompt=*/true);
    const std::vector<af::TokenId> prompt = tokenizer.encode(prompt_text, /*parse_special=*/true);
    // [/tokenize]
    fmt::print("== The prompt: {} tokens ==\n", prompt.size());
    for (std::size_t i = 0; i < prompt.size(); ++i)
      fmt::print("{}{:>5} {:<12}", i % 5 == 0 ? "\n  " : "", prompt[i], printable(tokenizer.token_bytes(prompt[i])));
    fmt::print("\n");
    checks.expect_true("decode(encode(prompt)) gives the prompt back", tokenizer.decode(prompt) == prompt_text);
    numbers.print("prompt_tokens", "{}", prompt.size());

    // [trace]
    fmt::print("\n== One forward pass over the prompt ==\n");
    const auto T = static_cast<std::int64_t>(prompt.size());
    std::vector<Tensor> residuals;  // the stream entering each layer, for the attention maps below
    residuals.push_back(model.embed(prompt));
    af::llama::Trace trace;
    trace.after_layer = [&](std::int64_t, af::ConstMatrix x) {
      Tensor copy(af::Shape{x.rows, x.cols});
      for (std::int64_t t = 0; t < x.rows; ++t) std::ranges::copy(x.row(t), copy.matrix().row(t).begin());
      residuals.push_back(std::move(copy));
    };
    af::llama::Cache cache(c, T + max_new_tokens);
    const auto start = std::chrono::steady_clock::now();
    const Tensor logits = model.forward(prompt, cache, /*all_logits=*/false, &trace);
    const double prefill_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    // [/trace]
    fmt::print("  {:>5} {:>16} {:>16}\n", "layer", "RMS of the last", "cache after");
    fmt::print("  {:>5} {:>16} {:>16}\n", "", "token's stream", "(float32 B)");
    for (std::int64_t l = 0; l <= c.layers; l += (l == 0 ? 1 : (l < 5 ? 4 : 5))) {
      const std::span<const float> last = residuals[static_cast<std::size_t>(l)].matrix().row(T - 1);
      double sum_sq = 0.0;
      for (const float v : last) sum_sq += static_cast<double>(v) * v;
      fmt::print("  {:>5} {:>16.3f} {:>16}\n", l == 0 ? std::string("embed") : fmt::format("{}", l - 1),
                 std::sqrt(sum_sq / static_cast<double>(c.hidden)),
                 l == 0 ? std::int64_t{0} : l * T * 2 * c.kv_heads * c.head_dim * 4);
    }
    fmt::print("prefill of {} tokens: {:.3f} s on this machine (a measurement of this run)\n", T, prefill_s);

    fmt::print("\n== The logits against transformers (tests/real_model/logits_short.json) ==\n");
    std::ifstream case_file(fs::path(cases_dir) / "logits_short.json");
    if (!case_file) af::fail("--cases: cannot read {}/logits_short.json", cases_dir);
    const nlohmann::json short_case = nlohmann::json::parse(case_file);
    const double adjacent_error = worst_logit_error(model, short_case);
    model.set_rope_layout(af::RopeLayout::half_split);
    const double half_split_error = worst_logit_error(model, short_case);
    model.set_rope_layout(af::RopeLayout::adjacent);
    fmt::print("worst |logit - reference| over the top 8 of all {} positions:\n", short_case.at("prompt_ids").size());
    fmt::print("  RoPE on adjacent pairs (how the file stores q and k):  {:.2e}\n", adjacent_error);
    fmt::print("  RoPE on half-split pairs (the Hugging Face layout):    {:.2e}\n", half_split_error);
    checks.expect_close("logits with adjacent-pair RoPE match transformers", adjacent_error, 2e-3);
    checks.expect_true("half-split RoPE on the file's rows is visibly wrong (error > 0.2)", half_split_error > 0.2);
    numbers.print("adjacent_error", "{:.1e}", adjacent_error);
    numbers.print("half_split_error", "{:.1f}", half_split_error);

    fmt::print("\n== The answer ==\n");
    const auto answer = [&](const af::SamplingOptions& sampling, af::Rng& rng) {
      af::llama::Cache answer_cache(c, T + max_new_tokens);
      Tensor next_logits = model.forward(prompt, answer_cache);
      std::vector<af::TokenId> context(prompt.begin(), prompt.end()), out;
      for (std::int64_t step = 0; step < max_new_tokens; ++step) {
        const af::TokenId next = af::sample_token(next_logits.values(), context, sampling, rng);
        if (next == tokenizer.eos_id()) break;
        out.push_back(next);
        context.push_back(next);
        const af::TokenId one[] = {next};
        next_logits = model.forward(one, answer_cache);
      }
      return tokenizer.decode(out);
    };
    af::Rng rng(seed);
    af::SamplingOptions greedy;
    greedy.temperature = 0.0;
    const std::string greedy_answer = answer(greedy, rng);
    af::SamplingOptions sampled;
    sampled.temperature = 0.7;
    sampled.top_p = 0.9;
    sampled.repetition_penalty = 1.1;
    const std::string sampled_answer = answer(sampled, rng);
    fmt::print("user: {}\n", question);
    fmt::print("greedy:                                   {}\n", greedy_answer);
    fmt::print("temperature 0.7, top-p 0.9, penalty 1.1:  {}\n", sampled_answer);
    checks.expect_true("the greedy answer names Paris", greedy_answer.find("Paris") != std::string::npos);

    // [sinks]
    // How much weight each head of each layer puts on the first token, averaged over the queries from
    // position 8 on (the first few queries have few keys to choose from).
    fmt::print("\n== What real heads read ==\n");
    std::vector<std::vector<double>> first_token_mass(static_cast<std::size_t>(c.layers));
    std::vector<Tensor> maps;
    const std::vector<std::int64_t> map_layers = {0, c.layers / 2, c.layers - 1};
    for (std::int64_t l = 0; l < c.layers; ++l) {
      const std::vector<Tensor> heads = layer_weights(model, cache, l, residuals[static_cast<std::size_t>(l)].matrix());
      for (const Tensor& weights : heads) {
        double mass = 0.0;
        for (std::int64_t i = 8; i < T; ++i) mass += weights.matrix()(i, 0);
        first_token_mass[static_cast<std::size_t>(l)].push_back(mass / static_cast<double>(T - 8));
      }
      if (std::ranges::find(map_layers, l) != map_layers.end()) maps.push_back(heads.front());
    }
    // [/sinks]
    int sink_heads = 0;
    double strongest = 0.0;
    for (const auto& layer : first_token_mass)
      for (const double mass : layer) sink_heads += mass > 0.5, strongest = std::max(strongest, mass);
    fmt::print("heads that put more than half their weight on the first token: {} of {}\n", sink_heads,
               c.layers * c.heads);
    fmt::print("  {:>5}  mean weight on the first token, heads 0..{}\n", "layer", c.heads - 1);
    for (std::int64_t l = 0; l < c.layers; l += 3) {
      fmt::print("  {:>5} ", l);
      for (const double mass : first_token_mass[static_cast<std::size_t>(l)]) fmt::print(" {:.2f}", mass);
      fmt::print("\n");
    }
    numbers.print("sink_heads", "{}", sink_heads);
    numbers.print("all_heads", "{}", c.layers * c.heads);
    numbers.print("strongest_sink", "{:.2f}", strongest);
    double row_sum_error = 0.0;
    for (const Tensor& map : maps)
      for (std::int64_t i = 0; i < T; ++i) {
        double sum = 0.0;
        for (const float v : map.matrix().row(i)) sum += v;
        row_sum_error = af::worse(row_sum_error, std::abs(sum - 1.0));
      }
    checks.expect_close("every recomputed attention row sums to 1", row_sum_error, 1e-5);
    checks.expect_true("logits are finite", std::isfinite(af::max_abs(logits.values())));

    if (!out_dir.empty()) {
      const fs::path dir = af::make_output_directory(out_dir);
      af::write_output_file(dir / "first_token_mass.dat", [&](af::OutputFile& file) {
        file.print("# layer head mean_weight_on_first_token (queries 8..T-1 of the chat prompt)\n");
        for (std::size_t l = 0; l < first_token_mass.size(); ++l) {
          for (std::size_t h = 0; h < first_token_mass[l].size(); ++h)
            file.print("{} {} {:.6f}\n", l, h, first_token_mass[l][h]);
          file.print("\n");
        }
      });
      af::write_output_file(dir / "attention_maps.dat", [&](af::OutputFile& file) {
        file.print("# map query key weight; maps: head 0 of layers {}; blank lines between queries, two between maps\n",
                   fmt::join(map_layers, ", "));
        for (std::size_t m = 0; m < maps.size(); ++m) {
          for (std::int64_t i = 0; i < T; ++i) {
            for (std::int64_t j = 0; j < T; ++j) file.print("{} {} {} {:.6f}\n", m, i, j, maps[m].matrix()(i, j));
            file.print("\n");
          }
          file.print("\n");
        }
      });
      numbers.write(dir);
    }
    return checks.all_passed();
  });
}
