// generate — text from a GGUF Llama model through the book's own attention, RoPE and KV cache.
//
//   build/bin/generate [--model FILE] (--prompt TEXT | --prompt-file FILE) [--chat] [--max-new-tokens 128]
//                      [--temperature 0] [--top-k 0] [--top-p 1] [--min-p 0] [--repetition-penalty 1]
//                      [--seed 0] [--threads N] [--print-token-ids]
//
// Streams the generated text as it comes, then prints the time to the first token, the prefill and decode
// rates and the bytes of the KV cache. --temperature 0 is greedy. --chat wraps the prompt in the model's
// chat template (a user message after the template's default system message). --print-token-ids ends the
// output with one line "token_ids: ..." of the generated ids, for scripts.
// Exit status: 0 done, 2 a bad flag or a bad model file.
#include "af/error.hpp"
#include "af/gguf.hpp"
#include "af/llama.hpp"
#include "af/program.hpp"
#include "af/random.hpp"
#include "af/sampling.hpp"
#include "af/tokenizer.hpp"

#include <fmt/format.h>
#include <omp.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }

std::string read_prompt_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) af::fail("--prompt-file: cannot read {}", path);
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (text.size() > (std::size_t{1} << 20))
    af::fail("--prompt-file: {} has {} bytes (expected at most 1 MiB)", path, text.size());
  return text;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Generate text with a GGUF Llama model through the Attention Forge library", "generate"};
  std::string model_path = AF_MODEL_GGUF, prompt, prompt_file;
  bool chat = false, print_ids = false;
  std::int64_t max_new_tokens = 128;
  int threads = 0;
  std::uint64_t seed = 0;
  af::SamplingOptions sampling;
  sampling.temperature = 0.0;
  app.add_option("--model", model_path, "GGUF model file")->capture_default_str();
  auto* prompt_option = app.add_option("--prompt", prompt, "Prompt text");
  app.add_option("--prompt-file", prompt_file, "File holding the prompt text")->excludes(prompt_option);
  app.add_flag("--chat", chat, "Wrap the prompt in the model's chat template as a user message");
  app.add_option("--max-new-tokens", max_new_tokens, "Tokens to generate at most")
      ->check(CLI::Range(std::int64_t{1}, std::int64_t{8192}))
      ->capture_default_str();
  app.add_option("--temperature", sampling.temperature, "Sampling temperature; 0 is greedy")
      ->check(af::finite_range(0.0, 100.0))
      ->capture_default_str();
  app.add_option("--top-k", sampling.top_k, "Keep the k most likely tokens; 0 keeps all")
      ->check(CLI::Range(std::int64_t{0}, std::int64_t{1} << 20))
      ->capture_default_str();
  app.add_option("--top-p", sampling.top_p, "Nucleus: keep the most likely tokens up to this probability")
      ->check(af::finite_range(1e-9, 1.0))
      ->capture_default_str();
  app.add_option("--min-p", sampling.min_p, "Drop tokens below this fraction of the top probability")
      ->check(af::finite_range(0.0, 1.0))
      ->capture_default_str();
  app.add_option("--repetition-penalty", sampling.repetition_penalty, "Penalty on tokens already in the text")
      ->check(af::finite_range(1e-3, 100.0))
      ->capture_default_str();
  app.add_option("--seed", seed, "Seed of the sampler")->check(af::seed_value())->capture_default_str();
  app.add_option("--threads", threads, "Threads (default: every core)")->check(CLI::Range(1, 1024));
  app.add_flag("--print-token-ids", print_ids, "End with one line holding the generated token ids");

  return af::run_program(app, argc, argv, [&] {
    if (prompt_option->count() == 0 && prompt_file.empty()) af::fail("give --prompt or --prompt-file");
    if (!prompt_file.empty()) prompt = read_prompt_file(prompt_file);
    if (threads > 0) omp_set_num_threads(threads);

    const auto load_start = Clock::now();
    const af::llama::Model model = af::llama::Model::load(model_path);
    const af::Tokenizer tokenizer = af::Tokenizer::from_gguf(model.file());
    if (chat) af::check_chat_template(model.file());
    const double load_s = seconds_since(load_start);

    std::vector<af::TokenId> ids;
    if (tokenizer.add_bos() && tokenizer.bos_id()) ids.push_back(*tokenizer.bos_id());
    if (chat) {
      const std::vector<af::ChatMessage> messages = {{"user", prompt}};
      const std::vector<af::TokenId> chat_ids = tokenizer.encode(af::format_chat(messages, true), true);
      ids.insert(ids.end(), chat_ids.begin(), chat_ids.end());
    } else {
      const std::vector<af::TokenId> text_ids = tokenizer.encode(prompt);
      ids.insert(ids.end(), text_ids.begin(), text_ids.end());
    }
    if (ids.empty()) af::fail("the prompt encodes to no tokens (expected at least one)");
    const af::llama::Config& config = model.config();
    const auto prompt_tokens = static_cast<std::int64_t>(ids.size());
    if (prompt_tokens + max_new_tokens > config.context)
      af::fail("{} prompt tokens + --max-new-tokens {} exceed the model's context of {}", prompt_tokens, max_new_tokens,
               config.context);

    af::llama::Cache cache(config, prompt_tokens + max_new_tokens);
    af::Rng rng(seed);
    af::TokenStreamDecoder stream(tokenizer, /*skip_special=*/true);
    std::vector<af::TokenId> context = ids, generated;

    const auto prefill_start = Clock::now();
    af::Tensor logits = model.forward(ids, cache);
    af::TokenId next = af::sample_token(logits.values(), context, sampling, rng);
    const double prefill_s = seconds_since(prefill_start);
    const auto decode_start = Clock::now();
    for (std::int64_t step = 0; step < max_new_tokens; ++step) {
      generated.push_back(next);
      context.push_back(next);
      if (next == tokenizer.eos_id()) break;
      std::fputs(stream.push(next).c_str(), stdout);
      std::fflush(stdout);
      if (step + 1 == max_new_tokens) break;
      const af::TokenId one[] = {next};
      logits = model.forward(one, cache);
      next = af::sample_token(logits.values(), context, sampling, rng);
    }
    std::fputs(stream.finish().c_str(), stdout);
    const double decode_s = seconds_since(decode_start);
    const auto decoded = static_cast<double>(generated.size()) - 1.0;  // the first token came with the prefill

    fmt::print(stderr, "\n\n[{}: {} layers, {} threads; loaded in {:.2f} s]\n", model_path, config.layers,
               omp_get_max_threads(), load_s);
    fmt::print(stderr, "prompt {} tokens: time to first token {:.3f} s ({:.1f} tokens/s prefill)\n", prompt_tokens,
               prefill_s, static_cast<double>(prompt_tokens) / prefill_s);
    if (decoded > 0)
      fmt::print(stderr, "generated {} tokens: {:.1f} tokens/s decode\n", generated.size(), decoded / decode_s);
    fmt::print(stderr, "KV cache: {} tokens x {} B = {} B (float32 K and V, {} layers x {} KV heads x {})\n",
               cache.size(), config.cache_bytes_per_token(), cache.bytes_held(), config.layers, config.kv_heads,
               config.head_dim);
    if (print_ids) fmt::print("\ntoken_ids: {}\n", fmt::join(generated, " "));
    return true;
  });
}
