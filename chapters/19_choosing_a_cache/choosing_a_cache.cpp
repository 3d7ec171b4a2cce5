// Chapter 19 — Choosing a cache: every mechanism of chapters 01-13 on one page.
//
// Builds each mechanism's accounting at the configuration of a real model that uses it (or, where the book
// applies it hypothetically, of Llama-3.1-8B), from lib/'s cache cards, and prints one table: bytes a token adds,
// bytes held, bytes read and attention FLOPs per decode step at three contexts, FLOPs of a causal prefill, what
// each caches and gives up, and which released models use it. Every number is checked against a closed-form
// count written here from the published sizes. Writes the data of the figure (bytes read per decode step against
// context) with --out.
//
//   build/bin/ch19_choosing_a_cache [--seq-len 1048576] [--out DIR]

#include "af/accounting.hpp"
#include "af/block_sparse.hpp"
#include "af/compare.hpp"
#include "af/compressed_attention.hpp"
#include "af/error.hpp"
#include "af/linear_attention.hpp"
#include "af/models.hpp"
#include "af/program.hpp"
#include "af/quantized_cache.hpp"
#include "af/sinks.hpp"
#include "af/sliding_window.hpp"
#include "af/sparse_attention.hpp"

#include <fmt/format.h>
#include <fmt/os.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <string>
#include <vector>

namespace {

using Count = std::function<std::int64_t(std::int64_t)>;
using Flops = std::function<double(std::int64_t)>;

// [accounting]
// What the table asks of a model, whatever kind of cache it keeps, all layers, one sequence: bytes held after t
// tokens, bytes read and attention FLOPs of one decode step at context t, FLOPs of a causal prefill of T tokens.
// lib/ answers through three types: a model of one layer kind (af::ModelCache), of several (af::InterleavedModel),
// and of linear and softmax layers (af::HybridModel).
struct Accounting {
  Count held, read;
  Flops decode_flops, prefill_flops;
};

template <typename Model>
Accounting accounting_of(const Model& model) {
  return {[model](std::int64_t t) { return model.bytes_stored(t); },
          [model](std::int64_t t) { return model.bytes_read(t); },
          [model](std::int64_t t) { return model.decode_flops(t); },
          [model](std::int64_t tokens) { return model.prefill_flops(tokens); }};
}
// [/accounting]

// [independent-count]
// The same numbers in closed form, from the published sizes alone. A model is a list of terms; each term is one
// kind of entry that `layers` layers keep: `held(t)` entries of `bytes` bytes after t tokens, `read(t)` of them read
// by a decode query at context t, `flops` spent on each one read, and `read_sum(T)` = read(1) + ... + read(T) (what a
// causal prefill's T queries read, query i doing what a decode query does at context i).
struct Term {
  std::int64_t layers = 0;
  std::int64_t bytes = 0;
  double flops = 0.0;
  Count held, read, read_sum;
};

std::int64_t triangle(std::int64_t n) { return n * (n + 1) / 2; }
// sum_{i=1..T} min(i, n)
std::int64_t sum_min(std::int64_t tokens, std::int64_t n) {
  return tokens <= n ? triangle(tokens) : triangle(n) + (tokens - n) * n;
}
// sum_{i=1..T} floor(i / m), T = q m + r: the runs j = 1 .. q - 1 of m tokens contribute j each, the r + 1 tokens
// from q m to T contribute q each.
std::int64_t sum_floor(std::int64_t tokens, std::int64_t m) {
  const std::int64_t q = tokens / m, r = tokens % m;
  return m * q * (q - 1) / 2 + q * (r + 1);
}
// sum_{i=1..T} min(k, floor(i / m)): floor(i / m) reaches k at i = k m.
std::int64_t sum_min_floor(std::int64_t tokens, std::int64_t m, std::int64_t k) {
  const std::int64_t below = std::min(tokens, k * m - 1);
  return sum_floor(below, m) + k * std::max<std::int64_t>(0, tokens - below);
}

Count all_tokens() {
  return [](std::int64_t t) { return t; };
}
Count up_to(std::int64_t n) {
  return [n](std::int64_t t) { return std::min(t, n); };
}
Count triangle_sum() { return triangle; }
Count min_sum(std::int64_t n) {
  return [n](std::int64_t tokens) { return sum_min(tokens, n); };
}

// Dense K and V of `kv_heads` x `head_dim` per layer (value_bytes each, plus `scale_bytes` per head for a quantized
// cache), `heads` query heads scoring every entry (2 heads head_dim FLOPs) and mixing its value in (as many again).
Term dense_term(std::int64_t layers, std::int64_t heads, std::int64_t kv_heads, std::int64_t head_dim,
                std::int64_t value_bytes, std::int64_t scale_bytes = 0) {
  return {layers,
          2 * kv_heads * (head_dim * value_bytes + scale_bytes),
          4.0 * static_cast<double>(heads * head_dim),
          all_tokens(),
          all_tokens(),
          triangle_sum()};
}
Term bounded(Term term, std::int64_t rows) {
  term.held = term.read = up_to(rows);
  term.read_sum = min_sum(rows);
  return term;
}
// [/independent-count]

// Block-sparse reads, counted by enumerating the visited key blocks of a query block (the local run, the global
// blocks, every stride-th block back), each block once.
std::int64_t visited_blocks(const af::BlockPattern& p, std::int64_t query_block) {
  const std::int64_t first_local = std::max<std::int64_t>(0, query_block - p.local_blocks + 1);
  std::int64_t count = query_block - first_local + 1;
  for (std::int64_t kb = 0; kb < std::min(p.global_blocks, first_local); ++kb) ++count;
  if (p.stride > 0)
    for (std::int64_t kb = query_block - p.stride; kb >= 0; kb -= p.stride)
      if (kb < first_local && kb >= p.global_blocks) ++count;
  return count;
}
Term block_sparse_term(Term term, const af::BlockPattern& p) {
  term.read = [p](std::int64_t t) {
    const std::int64_t qb = (t - 1) / p.block;
    return (visited_blocks(p, qb) - 1) * p.block + (t - qb * p.block);
  };
  term.read_sum = [p](std::int64_t tokens) {
    std::int64_t total = 0;
    for (std::int64_t qb = 0; qb * p.block < tokens; ++qb) {
      const std::int64_t n = std::min(p.block, tokens - qb * p.block);  // queries of this block
      total += n * (visited_blocks(p, qb) - 1) * p.block + triangle(n);
    }
    return total;
  };
  return term;
}

// MLA, absorbed (DeepSeek-V3): a latent of `rank` and a RoPE key of `rope` per token; per entry and head 2 (rank +
// rope) FLOPs for the score, 2 rank for the latent mixed in.
Term mla_term(std::int64_t layers, std::int64_t heads, std::int64_t rank, std::int64_t rope) {
  return {layers,       (rank + rope) * 2, 2.0 * static_cast<double>(heads * (rank + rope + rank)),
          all_tokens(), all_tokens(),      triangle_sum()};
}

// A DeepSeek-V4 model (published sizes: entry c 512, window 128, CSA m 4, HCA m 128, indexer 64 heads of 128).
std::vector<Term> v4_terms(std::int64_t sliding, std::int64_t csa, std::int64_t hca, std::int64_t heads,
                           std::int64_t top_k) {
  const std::int64_t c = 512, window = 128, m = 4, m_hca = 128, index_heads = 64, index_dim = 128, bf16 = 2;
  const double entry_flops = 4.0 * static_cast<double>(heads * c);  // score and value of one K = V entry, every head
  const double index_flops = 2.0 * static_cast<double>(index_heads * index_dim + index_heads);
  const auto blocks = [](std::int64_t ratio) { return Count([ratio](std::int64_t t) { return t / ratio; }); };
  const auto none = Count([](std::int64_t) { return std::int64_t{0}; });
  return {
      {sliding + csa + hca, c * bf16, entry_flops, up_to(window), up_to(window), min_sum(window)},
      {csa, c * bf16, entry_flops, blocks(m), [=](std::int64_t t) { return std::min(top_k, t / m); },
       [=](std::int64_t tokens) { return sum_min_floor(tokens, m, top_k); }},
      {csa, index_dim * bf16, index_flops, blocks(m), blocks(m),
       [=](std::int64_t tokens) { return sum_floor(tokens, m); }},
      // The block still filling: kv and gate of both series and of the indexer's compressor, per pending token.
      {csa, (4 * c + 4 * index_dim) * bf16, 0.0, [=](std::int64_t t) { return t % m; }, none, none},
      // The overlap: the last block's first series (kv and gate), main and indexer, m tokens once one block is done.
      {csa, (2 * c + 2 * index_dim) * bf16, 0.0, [=](std::int64_t t) { return t >= m ? m : 0; }, none, none},
      {hca, c * bf16, entry_flops, blocks(m_hca), blocks(m_hca),
       [=](std::int64_t tokens) { return sum_floor(tokens, m_hca); }},
      {hca, 2 * c * bf16, 0.0, [=](std::int64_t t) { return t % m_hca; }, none, none},
  };
}

Accounting closed_form(std::vector<Term> terms) {
  const auto sum = [terms](auto per_term) {
    double total = 0.0;
    for (const Term& term : terms) total += static_cast<double>(term.layers) * per_term(term);
    return total;
  };
  return {
      [sum](std::int64_t t) {
        return static_cast<std::int64_t>(sum([t](const Term& x) { return static_cast<double>(x.held(t) * x.bytes); }));
      },
      [sum](std::int64_t t) {
        return static_cast<std::int64_t>(sum([t](const Term& x) { return static_cast<double>(x.read(t) * x.bytes); }));
      },
      [sum](std::int64_t t) { return sum([t](const Term& x) { return static_cast<double>(x.read(t)) * x.flops; }); },
      [sum](std::int64_t tokens) {
        return sum([tokens](const Term& x) { return static_cast<double>(x.read_sum(tokens)) * x.flops; });
      }};
}

// One row of the table.
struct Row {
  std::string mechanism;  // with the chapter that builds it
  std::string model;
  bool hypothetical = false;  // the mechanism applied to a model that was not trained with it
  Accounting lib;             // from lib/'s cards
  Accounting expected;        // from the closed forms above
  std::string caches, gives_up, used_by;
};

// "1.23 T": FLOPs with a decimal prefix.
std::string flops_text(double flops) {
  constexpr const char* prefixes[] = {"", "K", "M", "G", "T", "P", "E"};
  int i = 0;
  while (flops >= 1000.0 && i < 6) flops /= 1000.0, ++i;
  return fmt::format("{:.3g} {}", flops, prefixes[i]);
}

std::string context_text(std::int64_t t) {
  if (t % (1 << 20) == 0) return fmt::format("{}M", t >> 20);
  if (t % (1 << 10) == 0) return fmt::format("{}K", t >> 10);
  return fmt::format("{}", t);
}

// What the table shows of one row: bytes a token adds at the longest context, bytes held there, and at each
// context the bytes read and FLOPs of a decode step and the FLOPs of a prefill of that length.
struct Numbers {
  double growth = 0.0, held = 0.0;
  std::vector<double> read, decode_flops, prefill_flops;
};

std::vector<Row> rows() {
  const af::DType bf16 = af::DType::bf16;
  std::vector<Row> table;

  // [rows]
  const af::DenseModel& llama8 = af::dense_model("Llama-3.1-8B");
  table.push_back({"MHA (02)", "Llama-2-7B", false, accounting_of(af::dense_model("Llama-2-7B").cache(bf16)),
                   closed_form({dense_term(32, 32, 32, 128, 2)}),
                   "K and V of every one of the 32 heads (32 x 128 each), every layer",
                   "nothing: the reference every other row trades against, and the most bytes per token",
                   "Llama 2 7B and 13B; the original Transformer"});
  table.push_back({"MQA (03)", "Falcon-7B", false, accounting_of(af::dense_model("Falcon-7B").cache(bf16)),
                   closed_form({dense_term(32, 71, 1, 64, 2)}),
                   "one K and one V head (64 values each) shared by 71 query heads",
                   "quality: one key per token for every head; tensor-parallel ranks each keep a copy", "Falcon-7B"});
  table.push_back({"GQA (04)", "Llama-3.1-8B", false, accounting_of(llama8.cache(bf16)),
                   closed_form({dense_term(32, 32, 8, 128, 2)}),
                   "K and V of 8 KV heads x 128, each shared by 4 query heads",
                   "a little quality against MHA; converting an MHA checkpoint means pooling heads and up-training",
                   "Llama 3, Mistral 7B, Qwen3, Gemma 3, gpt-oss, MiniMax-M2: the default"});
  af::ModelCache int8 = llama8.cache(bf16), fp8 = llama8.cache(bf16);
  int8.card = af::quantized_kv_card(32, 8, 128, af::KvFormat::int8_token, af::KvFormat::int8_token);
  fp8.card = af::quantized_kv_card(32, 8, 128, af::KvFormat::fp8_token, af::KvFormat::fp8_token);
  table.push_back({"GQA, INT8 cache (05)", "Llama-3.1-8B", true, accounting_of(int8),
                   closed_form({dense_term(32, 32, 8, 128, 1, 4)}),
                   "INT8 codes of K and V, one fp32 scale per token and KV head",
                   "a rounding error in every score and output; a dequantize per element read",
                   "a serving option for any checkpoint, not part of a model"});
  table.push_back({"GQA, FP8 cache (05)", "Llama-3.1-8B", true, accounting_of(fp8),
                   closed_form({dense_term(32, 32, 8, 128, 1, 4)}),
                   "FP8 E4M3 codes of K and V, one fp32 scale per token and KV head",
                   "as INT8, with a relative rather than absolute error (3 mantissa bits)",
                   "a serving option; DeepSeek-V3.2 keeps its index keys in FP8"});
  table.push_back({"MLA (07)", "DeepSeek-V3", false, accounting_of(af::model_preset("DeepSeek-V3").cache(bf16)),
                   closed_form({mla_term(61, 128, 512, 64)}),
                   "one latent (512) and one RoPE key (64) per token for all 128 heads",
                   "FLOPs: every head works in the 512-wide latent; every tensor-parallel rank keeps the whole latent; "
                   "a model must be trained with it",
                   "DeepSeek-V2 and V3"});
  table.push_back({"sliding window (08)", "Mistral-7B", false, accounting_of(af::dense_model("Mistral-7B").cache(bf16)),
                   closed_form({bounded(dense_term(32, 32, 8, 128, 2), 4096)}),
                   "K and V (8 x 128) of the last 4,096 tokens, a ring buffer per layer",
                   "recall: a token more than 4,095 back is out of every layer's direct reach", "Mistral 7B"});
  table.push_back({"local:global 5:1 (08)", "Gemma 3 27B", false, accounting_of(af::gemma3_27b(bf16)),
                   closed_form({bounded(dense_term(52, 32, 16, 128, 2), 1024), dense_term(10, 32, 16, 128, 2)}),
                   "K and V (16 x 128): the last 1,024 tokens in 52 local layers, all tokens in 10 global",
                   "recall in the local layers; the 10 global layers still grow with the context",
                   "Gemma 3; gpt-oss (1:1, row 10)"});
  const std::int64_t sinks = 4, sink_window = 4092;
  af::ModelCache streaming = llama8.cache(bf16);
  streaming.card = af::with_kept_sinks(streaming.card, sinks, sink_window);
  table.push_back({"kept sinks + window (09)", "Llama-3.1-8B", true, accounting_of(streaming),
                   closed_form({bounded(dense_term(32, 32, 8, 128, 2), sinks + sink_window)}),
                   "K and V of the first 4 tokens and of the last 4,092",
                   "everything between the sinks and the window is gone for good",
                   "StreamingLLM, applied at inference to Llama-2, MPT, Falcon, Pythia"});
  table.push_back({"banded:dense 1:1 (08-09)", "gpt-oss-120b", false, accounting_of(af::gpt_oss_120b(bf16)),
                   closed_form({bounded(dense_term(18, 64, 8, 64, 2), 128), dense_term(18, 64, 8, 64, 2)}),
                   "K and V (8 x 64): the last 128 tokens in 18 banded layers, all in 18 dense; its learned sink "
                   "logits are weights, not cache",
                   "recall in the banded layers; the dense half still grows", "gpt-oss-120b and 20b"});
  const af::BlockPattern pattern{64, 4, 1, 8};
  af::ModelCache sparse = llama8.cache(bf16);
  sparse.card = af::with_block_sparse(sparse.card, pattern);
  table.push_back({"block-sparse (10)", "Llama-3.1-8B", true, accounting_of(sparse),
                   closed_form({block_sparse_term(dense_term(32, 32, 8, 128, 2), pattern)}),
                   "every token's K and V, as dense; a query reads 4 local blocks of 64, the first, every 8th back",
                   "memory as dense; a key outside the visited blocks is invisible to that query",
                   "Sparse Transformer, Longformer, BigBird"});
  table.push_back({"DSA: indexer + top-2048 (11)", "DeepSeek-V3.2", false, accounting_of(af::deepseek_v32(bf16)),
                   closed_form({{61, 1152, 2.0 * 128 * (512 + 64 + 512), all_tokens(), up_to(2048), min_sum(2048)},
                                {61, 128 + 4, 2.0 * (64 * 128 + 64), all_tokens(), all_tokens(), triangle_sum()}}),
                   "MLA's latent and RoPE key, plus an FP8 index key (128) and its fp32 scale",
                   "memory as MLA and more; the indexer reads every key; a token it misses is lost to that query",
                   "DeepSeek-V3.2-Exp and V3.2"});
  table.push_back({"CSA + HCA (12)", "DeepSeek-V4-Flash", false, accounting_of(af::deepseek_v4_flash(bf16)),
                   closed_form(v4_terms(2, 21, 20, 64, 512)),
                   "a window of 128 entries (512) per layer; one pooled entry per 4 tokens (CSA, + index key) or "
                   "per 128 (HCA)",
                   "detail inside each pooled block; what the CSA indexer misses; the most complex cache here",
                   "DeepSeek-V4-Flash and V4-Pro"});
  table.push_back({"CSA + HCA (12)", "DeepSeek-V4-Pro", false, accounting_of(af::deepseek_v4_pro(bf16)),
                   closed_form(v4_terms(0, 30, 31, 128, 1024)), "as V4-Flash: 30 CSA and 31 HCA layers, 128 heads",
                   "as V4-Flash", "DeepSeek-V4-Pro"});
  table.push_back(
      {"lightning hybrid 7:1 (13)", "MiniMax-M1", false, accounting_of(af::minimax_m1(bf16, bf16)),
       closed_form({dense_term(10, 64, 8, 128, 2),
                    {70, 64 * 128 * 128 * 2, 5.0 * 64 * 128 * 128, [](std::int64_t t) { return t > 0 ? 1 : 0; },
                     [](std::int64_t) { return std::int64_t{1}; }, all_tokens()}}),
       "a 128 x 128 state per head in 70 lightning layers; K and V (8 x 128) in 10 softmax layers",
       "exact recall of more than about d pairs per head in the linear layers (ch 13); its own kernels",
       "MiniMax-01 and M1 (M2 went back to full attention)"});
  // A delta-rule layer keeps one state per value head and the short convolution's last 3 inputs; each state
  // element costs 7 FLOPs a token (decay, retrieval, write, read-out).
  const auto delta_state = [](std::int64_t layers, std::int64_t state_heads, std::int64_t conv_channels) {
    return Term{layers,
                (state_heads * 128 * 128 + 3 * conv_channels) * 2,
                7.0 * state_heads * 128 * 128,
                [](std::int64_t t) { return t > 0 ? std::int64_t{1} : std::int64_t{0}; },
                [](std::int64_t) { return std::int64_t{1}; },
                all_tokens()};
  };
  table.push_back({"Gated DeltaNet hybrid 3:1 (14)", "Qwen3-Next-80B-A3B", false,
                   accounting_of(af::qwen3_next_80b_a3b(bf16, bf16)),
                   closed_form({dense_term(12, 16, 2, 256, 2), delta_state(36, 32, 2 * 16 * 128 + 32 * 128)}),
                   "a 128 x 128 state per value head (32) and 3 convolution inputs in 36 Gated DeltaNet layers; K "
                   "and V (2 x 256) in 12 gated attention layers",
                   "recall of old keys in the delta-rule layers (a state of about d recent items per head, ch 14); "
                   "its own kernels",
                   "Qwen3-Next (and Qwen3.5)"});
  table.push_back({"KDA + MLA hybrid 3:1 (14)", "Kimi-Linear-48B-A3B", false,
                   accounting_of(af::kimi_linear_48b_a3b(bf16, bf16)),
                   closed_form({mla_term(7, 32, 512, 64), delta_state(20, 32, 3 * 32 * 128)}),
                   "a 128 x 128 state per head (32) and 3 convolution inputs in 20 KDA layers; MLA's latent (512) "
                   "and key part (64) in 7 layers",
                   "as Qwen3-Next's linear layers; the MLA layers' FLOPs", "Kimi Linear"});
  // [/rows]
  return table;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Chapter 19: choosing a cache, every mechanism on one page", "ch19_choosing_a_cache"};
  std::int64_t seq_len = std::int64_t{1} << 20;
  std::string out_dir;
  app.add_option("--seq-len", seq_len,
                 "Longest context: the table's last column (beside 4K and 128K when shorter) and the figure's end")
      ->check(CLI::Range(std::int64_t{1024}, std::int64_t{1} << 22))
      ->capture_default_str();
  app.add_option("--out", out_dir, "Directory for the figure data (decode_reads.dat)")->check(af::output_directory());

  return af::run_program(app, argc, argv, [&] {
    std::vector<std::int64_t> contexts;
    for (const std::int64_t t : {std::int64_t{4096}, std::int64_t{131072}})
      if (t < seq_len) contexts.push_back(t);
    contexts.push_back(seq_len);
    const std::vector<Row> table = rows();
    const std::int64_t last = contexts.back();

    // The numbers of one row, from lib/ (and, for the checks, from the closed forms).
    const auto numbers = [&](const Accounting& a) {
      constexpr std::int64_t step = 1024;  // growth measured over 1,024 tokens past the longest context
      Numbers n;
      n.growth = static_cast<double>(a.held(last + step) - a.held(last)) / step;
      n.held = static_cast<double>(a.held(last));
      for (const std::int64_t t : contexts) {
        n.read.push_back(static_cast<double>(a.read(t)));
        n.decode_flops.push_back(a.decode_flops(t));
        n.prefill_flops.push_back(a.prefill_flops(t));
      }
      return n;
    };
    std::vector<Numbers> lib;
    for (const Row& r : table) lib.push_back(numbers(r.lib));

    std::vector<std::string> context_names;
    for (const std::int64_t t : contexts) context_names.push_back(context_text(t));
    fmt::print("Every mechanism of chapters 01-13 at one real configuration: one sequence, all layers, bf16 unless\n");
    fmt::print("stated. * = the mechanism applied to a model that was not trained with it. Contexts: {}.\n",
               fmt::join(context_names, ", "));
    const auto label = [&](std::size_t i) {
      return fmt::format("  {:>2} {:<28} {:<18}", i + 1, table[i].mechanism,
                         table[i].model + (table[i].hypothetical ? " *" : ""));
    };
    fmt::print("\nMemory and bandwidth\n");
    fmt::print("  {:>2} {:<28} {:<18} {:>9} {:>10}", "#", "mechanism (chapter)", "model", "B/token", "held");
    for (const std::string& t : context_names) fmt::print(" {:>10}", "read " + t);
    fmt::print("\n");
    for (std::size_t i = 0; i < table.size(); ++i) {
      fmt::print("{} {:>9} {:>10}", label(i), af::human_bytes(lib[i].growth), af::human_bytes(lib[i].held));
      for (const double bytes : lib[i].read) fmt::print(" {:>10}", af::human_bytes(bytes));
      fmt::print("\n");
    }
    fmt::print("  B/token: what one more token adds to the cache at {} tokens (0 once a cache stops growing);\n",
               context_text(last));
    fmt::print("  held: bytes after {} tokens; read: bytes one decode step reads.\n", context_text(last));

    fmt::print("\nAttention FLOPs\n");
    fmt::print("  {:>2} {:<18}", "#", "model");
    for (const std::string& t : context_names) fmt::print(" {:>10}", "decode " + t);
    for (const std::string& t : context_names) fmt::print(" {:>11}", "prefill " + t);
    fmt::print("\n");
    for (std::size_t i = 0; i < table.size(); ++i) {
      fmt::print("  {:>2} {:<18}", i + 1, table[i].model + (table[i].hypothetical ? " *" : ""));
      for (const double flops : lib[i].decode_flops) fmt::print(" {:>10}", flops_text(flops));
      for (const double flops : lib[i].prefill_flops) fmt::print(" {:>11}", flops_text(flops));
      fmt::print("\n");
    }
    fmt::print(
        "  decode T: one query at context T; prefill T: a causal prompt of T tokens. Counted: 2 H d_k per score\n");
    fmt::print(
        "  and 2 H d_v per value mixed in, per entry attended and layer; indexers 2 H_I (d_I + 1) per key scored;\n");
    fmt::print("  a linear layer 5 H d_k d_v per token (state update 3, read-out 2). Projections are not counted.\n");

    fmt::print("\nWhat each caches, what it gives up, who uses it\n");
    for (std::size_t i = 0; i < table.size(); ++i) {
      const Row& r = table[i];
      fmt::print("  {:>2} {}, {}{}\n", i + 1, r.mechanism, r.model, r.hypothetical ? " (hypothetical)" : "");
      for (const auto& [field, text] :
           {std::pair{"caches", &r.caches}, {"gives up", &r.gives_up}, {"used by", &r.used_by}}) {
        bool first = true;
        for (const std::string& line : af::wrap_words(*text, 90)) {
          fmt::print("       {:<9} {}\n", first ? field : "", line);
          first = false;
        }
      }
    }

    // [checks]
    // Every number of the table against the closed forms: bytes exactly, FLOPs to 1e-9 relative (lib/ sums a
    // prefill query by query in double precision, the closed form multiplies).
    fmt::print("\n");
    af::Checks checks;
    for (std::size_t i = 0; i < table.size(); ++i) {
      const Numbers want = numbers(table[i].expected);
      const std::string name = fmt::format("{:>2} {}", i + 1, table[i].model);
      std::vector<double> bytes_lib{lib[i].growth, lib[i].held}, bytes_want{want.growth, want.held};
      bytes_lib.insert(bytes_lib.end(), lib[i].read.begin(), lib[i].read.end());
      bytes_want.insert(bytes_want.end(), want.read.begin(), want.read.end());
      std::vector<double> flops_lib = lib[i].decode_flops, flops_want = want.decode_flops;
      flops_lib.insert(flops_lib.end(), lib[i].prefill_flops.begin(), lib[i].prefill_flops.end());
      flops_want.insert(flops_want.end(), want.prefill_flops.begin(), want.prefill_flops.end());
      checks.expect_close(fmt::format("{}: bytes vs closed form", name), af::max_abs_diff(bytes_lib, bytes_want), 0.0);
      checks.expect_close(fmt::format("{}: FLOPs vs closed form", name), af::max_abs_diff(flops_lib, flops_want),
                          af::scaled_tolerance(1e-9, af::max_abs(flops_want)));
    }
    // [/checks]

    if (!out_dir.empty()) {
      const std::filesystem::path dir = af::make_output_directory(out_dir);
      af::write_output_file(dir / "decode_reads.dat", [&](af::OutputFile& data) {
        data.print("# Bytes one decode step reads (one sequence, all layers) against context; one column per row of\n");
        data.print("# the chapter's table, in its order. Written by ch19_choosing_a_cache.\n");
        data.print("context");
        for (std::size_t i = 0; i < table.size(); ++i)
          data.print(" \"{}  {}: {}{}\"", i + 1, table[i].model,
                     table[i].mechanism.substr(0, table[i].mechanism.rfind(" (")), table[i].hypothetical ? " *" : "");
        data.print("\n");
        for (double x = 1024; x <= static_cast<double>(seq_len) * 1.0001; x *= std::sqrt(2.0)) {
          const auto t = static_cast<std::int64_t>(std::llround(x));
          data.print("{}", t);
          for (const Row& r : table) data.print(" {}", r.lib.read(t));
          data.print("\n");
        }
      });
    }
    return checks.all_passed();
  });
}
