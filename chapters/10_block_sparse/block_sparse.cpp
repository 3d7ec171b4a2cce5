// Chapter 10 — block-sparse attention.
//
// Builds from scratch a causal block pattern (local blocks, global blocks, strided blocks), its block tables as
// kernels consume them (per query block: how many key blocks to visit, which ones, and whether each is full or
// partial), and a blocked attention that visits only those blocks with an online softmax. Checks it against
// the library (af::block_mask, af::block_sparse_attention) and a float64 dense attention under the expanded
// element mask, decode against prefill, and decode reads against the visited blocks' tokens. Prints the block
// tables, a cache card (stored stays dense, reads fall), the work against density, and what a pattern cannot
// see; writes the data of the chapter's figures.
//
//   build/bin/ch10_block_sparse [--seq-len 60] [--block 8] [--local 2] [--global 1] [--stride 4]
//                               [--head-dim 16] [--seed 10] [--out DIR]

#include "af/block_sparse.hpp"
#include "af/error.hpp"
#include "af/models.hpp"
#include "af/program.hpp"
#include "af/random.hpp"
#include "af/sinks.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <limits>
#include <string>
#include <vector>

namespace {

using af::Shape;
using af::Tensor;

// [pattern]
// Query block qb visits key block kb (kb <= qb) when kb is one of the `local` blocks ending at the diagonal
// (Longformer's band, in blocks), one of the first `global` blocks (BigBird's global tokens), or a multiple of
// `stride` blocks back (the Sparse Transformer's strided pattern). Inside a block, causality: key <= query.
struct Pattern {
  std::int64_t block, local, global, stride;
  bool visits(std::int64_t qb, std::int64_t kb) const {
    if (kb > qb) return false;
    const std::int64_t back = qb - kb;
    return back < local || kb < global || (stride > 0 && back % stride == 0);
  }
  bool allows(std::int64_t q, std::int64_t k) const { return k <= q && visits(q / block, k / block); }
};
// [/pattern]

// [block-tables]
// Per query block: the count of key blocks to visit and their indices (ascending), and whether each is full
// (every query of the block may see every key of it: no element mask needed) or partial (the diagonal block,
// and blocks cut by the end of the sequence). Queries and keys are the same T tokens here (a prefill).
struct Tables {
  std::vector<std::int64_t> kv_num_blocks;
  std::vector<std::vector<std::int64_t>> kv_indices;
  std::vector<std::vector<bool>> full;
};

Tables build_tables(const Pattern& p, std::int64_t T) {
  const std::int64_t blocks = (T + p.block - 1) / p.block;
  Tables t;
  for (std::int64_t qb = 0; qb < blocks; ++qb) {
    t.kv_indices.emplace_back();
    t.full.emplace_back();
    for (std::int64_t kb = 0; kb <= qb; ++kb) {
      if (!p.visits(qb, kb)) continue;
      bool all = true;
      for (std::int64_t q = qb * p.block; q < std::min((qb + 1) * p.block, T); ++q)
        for (std::int64_t k = kb * p.block; k < std::min((kb + 1) * p.block, T); ++k) all = all && p.allows(q, k);
      t.kv_indices.back().push_back(kb);
      t.full.back().push_back(all);
    }
    t.kv_num_blocks.push_back(static_cast<std::int64_t>(t.kv_indices.back().size()));
  }
  return t;
}
// [/block-tables]

// [blocked-attention]
// One head: each query walks the key blocks of its query block's row. Per block it scores the keys it may see
// (all of them in a full block; the element rule in a partial one), then folds the block into a running
// maximum m, sum l and accumulator a: rescale l and a by exp(m_old - m_new), add exp(s - m_new) and its
// weighted values. Blocks not in the row are never touched: the work is proportional to the visited blocks.
Tensor blocked_attention(const Tensor& q, const Tensor& k, const Tensor& v, const Pattern& p, const Tables& t,
                         std::int64_t& pairs) {
  const std::int64_t T = q.dim(0), d = q.dim(1);
  const float scale = 1.0f / std::sqrt(static_cast<float>(d)), none = -std::numeric_limits<float>::infinity();
  Tensor out(Shape{T, d});
  for (std::int64_t i = 0; i < T; ++i) {
    const std::size_t row = static_cast<std::size_t>(i / p.block);
    float m = none, l = 0.0f;
    std::vector<float> a(static_cast<std::size_t>(d), 0.0f);
    for (std::size_t n = 0; n < t.kv_indices[row].size(); ++n) {
      const std::int64_t lo = t.kv_indices[row][n] * p.block, hi = std::min(lo + p.block, T);
      std::vector<float> s(static_cast<std::size_t>(hi - lo), none);
      for (std::int64_t j = lo; j < hi; ++j) {
        if (!t.full[row][n] && !p.allows(i, j)) continue;
        float dot = 0.0f;
        for (std::int64_t c = 0; c < d; ++c) dot += q.data()[i * d + c] * k.data()[j * d + c];
        s[static_cast<std::size_t>(j - lo)] = dot * scale;
        ++pairs;
      }
      const float block_max = *std::ranges::max_element(s);
      if (block_max == none) continue;
      const float m_new = std::max(m, block_max), rescale = std::exp(m - m_new);
      l *= rescale;
      for (float& x : a) x *= rescale;
      for (std::int64_t j = lo; j < hi; ++j) {
        if (s[static_cast<std::size_t>(j - lo)] == none) continue;
        const float w = std::exp(s[static_cast<std::size_t>(j - lo)] - m_new);
        l += w;
        for (std::int64_t c = 0; c < d; ++c) a[static_cast<std::size_t>(c)] += w * v.data()[j * d + c];
      }
      m = m_new;
    }
    for (std::int64_t c = 0; c < d; ++c) out.data()[i * d + c] = a[static_cast<std::size_t>(c)] / l;
  }
  return out;
}
// [/blocked-attention]

// float64 dense attention of the queries at positions first..first+rows-1 under the element rule.
std::vector<double> dense_float64(const Tensor& q, const Tensor& k, const Tensor& v, const Pattern& p,
                                  std::int64_t query, std::int64_t keys) {
  const std::int64_t d = q.dim(1);
  std::vector<double> s(static_cast<std::size_t>(keys), 0.0), out(static_cast<std::size_t>(d), 0.0);
  double top = -std::numeric_limits<double>::infinity(), sum = 0.0;
  for (std::int64_t j = 0; j < keys; ++j) {
    if (!p.allows(query, j)) continue;
    double dot = 0.0;
    for (std::int64_t c = 0; c < d; ++c) dot += static_cast<double>(q.data()[query * d + c]) * k.data()[j * d + c];
    s[static_cast<std::size_t>(j)] = dot / std::sqrt(static_cast<double>(d));
    top = std::max(top, s[static_cast<std::size_t>(j)]);
  }
  for (std::int64_t j = 0; j < keys; ++j)
    if (p.allows(query, j)) sum += (s[static_cast<std::size_t>(j)] = std::exp(s[static_cast<std::size_t>(j)] - top));
  for (std::int64_t j = 0; j < keys; ++j)
    if (p.allows(query, j))
      for (std::int64_t c = 0; c < d; ++c)
        out[static_cast<std::size_t>(c)] += s[static_cast<std::size_t>(j)] / sum * v.data()[j * d + c];
  return out;
}

af::BlockPattern lib_pattern(const Pattern& p) { return af::BlockPattern{p.block, p.local, p.global, p.stride}; }

// [needle]
// Random unit-variance keys, and one needle key equal to 3 x the last query, at `position`: the weight the
// last query gives the needle under the pattern (0 when the needle's block is not visited).
double needle_weight(af::Rng& rng, const Pattern& p, std::int64_t T, std::int64_t position, std::int64_t d) {
  const Tensor q = af::random_normal(Shape{1, d}, rng);
  Tensor k = af::random_normal(Shape{T, d}, rng);
  for (std::int64_t c = 0; c < d; ++c) k.data()[position * d + c] = 3.0f * q.data()[c];
  std::vector<double> w;
  double top = -std::numeric_limits<double>::infinity(), sum = 0.0;
  for (std::int64_t j = 0; j < T; ++j) {
    double dot = 0.0;
    for (std::int64_t c = 0; c < d; ++c) dot += static_cast<double>(q.data()[c]) * k.data()[j * d + c];
    w.push_back(p.allows(T - 1, j) ? dot / std::sqrt(static_cast<double>(d)) : -INFINITY);
    top = std::max(top, w.back());
  }
  for (double& x : w) sum += (x = std::exp(x - top));
  return w[static_cast<std::size_t>(position)] / sum;
}
// [/needle]

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Chapter 10: block-sparse attention", "ch10_block_sparse"};
  std::int64_t seq_len = 60, block = 8, local = 2, global = 1, stride = 4, head_dim = 16;
  std::uint64_t seed = 10;
  std::string out_dir;
  app.add_option("--seq-len", seq_len, "Tokens T of the prefill (need not be a multiple of the block)")
      ->check(CLI::Range(1, 256))
      ->capture_default_str();
  app.add_option("--block", block, "Tokens per block B")->check(CLI::Range(1, 512))->capture_default_str();
  app.add_option("--local", local, "Local blocks: the diagonal block and local - 1 before it")
      ->check(CLI::Range(1, 4096))
      ->capture_default_str();
  app.add_option("--global", global, "Global blocks: the first blocks, seen by every query")
      ->check(CLI::Range(0, 4096))
      ->capture_default_str();
  app.add_option("--stride", stride, "Strided blocks: every stride-th block back from the diagonal (0 = none)")
      ->check(CLI::Range(0, 4096))
      ->capture_default_str();
  app.add_option("--head-dim", head_dim, "Head dimension d")->check(CLI::Range(1, 256))->capture_default_str();
  app.add_option("--seed", seed, "Seed of the random inputs")->check(af::seed_value())->capture_default_str();
  app.add_option("--out", out_dir, "Directory for the figure data (patterns.dat, mechanisms.dat) and numbers.json")
      ->check(af::output_directory());

  return af::run_program(app, argc, argv, [&] {
    // The needle measurement runs 400 attentions of T x d at every half block of the T positions: about
    // 400 T^2 d / (B / 2) steps, kept within seconds.
    const std::int64_t needle_work = seq_len * seq_len * head_dim / std::max<std::int64_t>(1, block / 2);
    af::require(needle_work <= (1 << 18),
                "--seq-len {0} x --seq-len {0} x --head-dim {1} / max(1, --block {2} / 2) = {3} is above {4}, the "
                "largest this program runs in seconds (lower one of them)",
                seq_len, head_dim, block, needle_work, 1 << 18);
    const Pattern p{block, local, global, stride};
    const std::int64_t T = seq_len, d = head_dim, blocks = (T + block - 1) / block;
    af::Rng rng(seed);
    const Tensor q = af::random_normal(Shape{T, d}, rng), k = af::random_normal(Shape{T, d}, rng),
                 v = af::random_normal(Shape{T, d}, rng);
    fmt::print(
        "Block-sparse attention, one head: T = {} tokens, d = {}, block B = {}\n"
        "  {} query and key blocks, the last of {} tokens\n",
        T, d, block, blocks, T - (blocks - 1) * block);
    fmt::print(
        "  pattern: {} local block(s), {} global block(s), stride {}; q, k, v [{}, {}]; tables [{}] and "
        "[{}, {}]\n\n",
        local, global, stride, T, d, blocks, blocks, blocks);

    // From scratch, then the library and float64.
    const Tables tables = build_tables(p, T);
    fmt::print("Block tables (F = full block, P = partial: the element mask is checked inside)\n");
    fmt::print("  {:>11} {:>13}  {}\n", "query block", "kv_num_blocks", "kv_indices");
    std::int64_t visited = 0, causal = 0;
    for (std::int64_t qb = 0; qb < blocks; ++qb) {
      std::string row;
      for (std::size_t n = 0; n < tables.kv_indices[static_cast<std::size_t>(qb)].size(); ++n)
        row += fmt::format("{}{} ", tables.kv_indices[static_cast<std::size_t>(qb)][n],
                           tables.full[static_cast<std::size_t>(qb)][n] ? "F" : "P");
      fmt::print("  {:>11} {:>13}  {}\n", qb, tables.kv_num_blocks[static_cast<std::size_t>(qb)], row);
      visited += tables.kv_num_blocks[static_cast<std::size_t>(qb)];
      causal += qb + 1;
    }
    fmt::print("  density: {} of {} causal blocks visited = {:.3f}\n\n", visited, causal,
               static_cast<double>(visited) / static_cast<double>(causal));

    std::int64_t pairs = 0;
    const Tensor scratch = blocked_attention(q, k, v, p, tables, pairs);
    const af::BlockMask lib_mask = af::block_mask(lib_pattern(p), T, T);
    af::BlockedWork work;
    const Tensor lib = af::block_sparse_attention(q.matrix(), k.matrix(), v.matrix(), lib_pattern(p), lib_mask, &work);
    double ref_error = 0.0, largest = 0.0, decode_error = 0.0;
    std::int64_t allowed = 0, reads_wrong = 0;
    for (std::int64_t i = 0; i < T; ++i) {
      const auto expected = dense_float64(q, k, v, p, i, T);
      for (std::int64_t c = 0; c < d; ++c) {
        ref_error = af::worse(ref_error, std::abs(scratch.data()[i * d + c] - expected[static_cast<std::size_t>(c)]));
        largest = af::worse(largest, std::abs(expected[static_cast<std::size_t>(c)]));
      }
      for (std::int64_t j = 0; j < T; ++j) allowed += p.allows(i, j);
    }
    // Decode: each token as one query over the cache of all tokens so far, through the library's tables.
    for (std::int64_t t = 1; t <= T; ++t) {
      const af::BlockMask one = af::block_mask(lib_pattern(p), 1, t);
      const Tensor out = af::block_sparse_attention(q.matrix().rows_slice(t - 1, 1), k.matrix().rows_slice(0, t),
                                                    v.matrix().rows_slice(0, t), lib_pattern(p), one);
      decode_error = af::worse(decode_error, af::max_abs_diff(out.values(), lib.matrix().row(t - 1)));
      std::int64_t tokens = 0;
      for (std::int64_t n = 0; n < one.kv_num_blocks[0]; ++n)
        tokens += std::min((one.index(0, n) + 1) * block, t) - one.index(0, n) * block;
      reads_wrong += tokens != af::block_sparse_decode_entries(lib_pattern(p), t);
    }
    bool tables_agree = lib_mask.kv_num_blocks == tables.kv_num_blocks;
    for (std::int64_t qb = 0; qb < blocks && tables_agree; ++qb)
      for (std::size_t n = 0; n < tables.kv_indices[static_cast<std::size_t>(qb)].size(); ++n)
        tables_agree =
            tables_agree &&
            lib_mask.index(qb, static_cast<std::int64_t>(n)) == tables.kv_indices[static_cast<std::size_t>(qb)][n] &&
            lib_mask.is_full(qb, static_cast<std::int64_t>(n)) == tables.full[static_cast<std::size_t>(qb)][n];
    const double tolerance = af::scaled_tolerance(1e-5, largest);
    af::Checks checks;
    checks.expect_close("from scratch vs float64 dense under the element mask", ref_error, tolerance);
    checks.expect_close("from scratch vs lib/ block_sparse_attention", af::max_abs_diff(scratch.values(), lib.values()),
                        tolerance);
    checks.expect_close("decode (one query per step) vs prefill", decode_error, tolerance);
    checks.expect_true("block tables: from scratch == lib/ block_mask", tables_agree);
    checks.expect_true(
        "block tables: lib/ block_mask == rebuilt from the element mask",
        af::block_mask_from(af::element_mask(lib_pattern(p), T, T), block).kv_indices == lib_mask.kv_indices);
    checks.expect_true("pairs scored == allowed pairs of the element mask",
                       pairs == allowed && work.pairs_scored == allowed);
    checks.expect_true("decode reads == tokens of the visited blocks, every step", reads_wrong == 0);

    // [cache-card]
    // Llama-3.1-8B's GQA card under a block pattern at B = 64 (hypothetical: the model is dense). Every token is
    // still stored: some later query block may visit any block. A decode query reads only its visited blocks.
    const af::BlockPattern card_pattern{64, 4, 1, 8};
    af::ModelCache llama = af::dense_model("Llama-3.1-8B").cache();
    const af::CacheCard dense_card = llama.card;
    llama.card = af::with_block_sparse(llama.card, card_pattern);
    const std::vector<std::int64_t> contexts{1024, 8192, 131072};
    fmt::print("\n{}", af::format_cache_card(llama.card, std::span(&llama, 1), contexts));
    // [/cache-card]
    fmt::print(
        "\nStored vs read, Llama-3.1-8B, all 32 layers, bf16, one sequence (B = 64, 4 local, 1 global, "
        "stride 8)\n");
    fmt::print("  {:>8} {:>12} {:>14} {:>14} {:>14} {:>10}\n", "context", "stored", "read (dense)", "entries read",
               "read (sparse)", "read/stored");
    // Counted from the published configuration alone: every token keeps K and V of every KV head in every layer.
    const af::DenseModel& llama_config = af::dense_model("Llama-3.1-8B");
    const std::int64_t bf16_bytes_per_token =
        llama_config.layers * 2 * llama_config.kv_heads * llama_config.head_dim * af::bytes_of(af::DType::bf16);
    bool stored_counted = true;
    for (const std::int64_t t : {512, 1024, 4096, 16384, 65536, 131072}) {
      stored_counted = stored_counted && llama.bytes_stored(t) == t * bf16_bytes_per_token;
      fmt::print("  {:>8} {:>12} {:>14} {:>14} {:>14} {:>10.3f}\n", t,
                 af::human_bytes(static_cast<double>(llama.bytes_stored(t))),
                 af::human_bytes(static_cast<double>(32 * dense_card.bytes_read(t))),
                 af::block_sparse_decode_entries(card_pattern, t),
                 af::human_bytes(static_cast<double>(llama.bytes_read(t))),
                 static_cast<double>(llama.bytes_read(t)) / static_cast<double>(llama.bytes_stored(t)));
    }
    checks.expect_true("block-sparse card stores every token (layers x 2 x G x d x 2 bytes each)", stored_counted);
    af::BookNumbers numbers;
    numbers.set("card_stored_128k", af::human_bytes(static_cast<double>(llama.bytes_stored(131072))));
    numbers.print("card_read_fraction_128k", "{:.3f}",
                  static_cast<double>(llama.bytes_read(131072)) / static_cast<double>(llama.bytes_stored(131072)));

    // [mechanisms]
    // One model size, four caches: Llama-3.1-8B's layers (32 of them, 8 KV heads of 128, bf16) dense, with a
    // window (chapter 08), with kept sinks beside that window (chapter 09), and under the block pattern above.
    const std::int64_t fig_window = 4096, fig_sinks = 4;
    const af::ModelCache base = af::dense_model("Llama-3.1-8B").cache();
    std::vector<af::ModelCache> caches(4, base);
    caches[1].card = af::with_sliding_window(base.card, fig_window);
    caches[2].card = af::with_kept_sinks(base.card, fig_sinks, fig_window);
    caches[3].card = af::with_block_sparse(base.card, card_pattern);
    const auto entries_read = [](const af::ModelCache& m, std::int64_t t) {
      std::int64_t entries = 0;
      for (const af::DecodeRead& r : m.card.decode_reads(t)) entries += r.entries;
      return entries;
    };
    // [/mechanisms]
    const std::vector<std::string> labels{"dense", fmt::format("window {}", fig_window),
                                          fmt::format("{} sinks + window {}", fig_sinks, fig_window),
                                          "block-sparse (64, 4, 1, 8)"};
    // The same numbers counted directly: tokens held, and tokens a query at position t - 1 may see.
    const Pattern fig_p{card_pattern.block, card_pattern.local_blocks, card_pattern.global_blocks, card_pattern.stride};
    const auto expected_tokens = [&](std::size_t m, std::int64_t t, bool read) -> std::int64_t {
      if (m == 1) return std::min(t, fig_window);
      if (m == 2) return std::min(t, fig_sinks + fig_window);
      if (m == 3 && read) {
        std::int64_t seen = 0;
        for (std::int64_t key = 0; key < t; ++key) seen += fig_p.allows(t - 1, key) ? 1 : 0;
        return seen;
      }
      return t;
    };
    fmt::print("\nFour caches at one model size (Llama-3.1-8B, 32 layers, bf16, one sequence)\n");
    fmt::print("  {:>8} | {:>10} {:>10} {:>10} {:>10} | {:>8} {:>8} {:>8} {:>8}\n", "context", "stored:", "", "", "",
               "read:", "", "", "");
    fmt::print("  {:>8} | {:>10} {:>10} {:>10} {:>10} | {:>8} {:>8} {:>8} {:>8}\n", "", "dense", "window", "sinks+W",
               "blocks", "dense", "window", "sinks+W", "blocks");
    std::vector<std::int64_t> contexts_fig;
    for (double c = 256.0; c <= 131072.5; c *= std::pow(2.0, 0.125)) contexts_fig.push_back(std::llround(c));
    bool counted = true;
    for (const std::int64_t t : contexts_fig) {
      for (std::size_t m = 0; m < caches.size(); ++m)
        counted = counted && caches[m].bytes_stored(t) == expected_tokens(m, t, false) * base.bytes_per_token() &&
                  entries_read(caches[m], t) == expected_tokens(m, t, true) &&
                  caches[m].bytes_read(t) == entries_read(caches[m], t) * base.bytes_per_token();
      if ((t & (t - 1)) != 0 || t < 1024) continue;  // the table shows powers of two from 1024
      fmt::print("  {:>8} | {:>10} {:>10} {:>10} {:>10} | {:>8} {:>8} {:>8} {:>8}\n", t,
                 af::human_bytes(static_cast<double>(caches[0].bytes_stored(t))),
                 af::human_bytes(static_cast<double>(caches[1].bytes_stored(t))),
                 af::human_bytes(static_cast<double>(caches[2].bytes_stored(t))),
                 af::human_bytes(static_cast<double>(caches[3].bytes_stored(t))), entries_read(caches[0], t),
                 entries_read(caches[1], t), entries_read(caches[2], t), entries_read(caches[3], t));
    }
    fmt::print("  (read: cached tokens one decode step reads in each layer; bytes read, all layers = that x {})\n",
               af::human_bytes(static_cast<double>(base.bytes_per_token())));
    checks.expect_true("four caches: bytes stored and entries read equal the tokens counted directly", counted);
    // What the figure's caption quotes: the most a window with sinks holds, in tokens per layer and in bytes.
    numbers.set("sinks_window_tokens", af::with_thousands(fig_sinks + fig_window));
    numbers.set("sinks_window_bytes", af::human_bytes(static_cast<double>(caches[2].bytes_stored(131072))));
    numbers.set("window_bytes", af::human_bytes(static_cast<double>(caches[1].bytes_stored(131072))));

    // Work against density: pairs scored (each 2 d FLOPs for q . k, 2 d for the values) for several patterns.
    struct Named {
      std::string name;
      Pattern p;
    };
    const std::vector<Named> patterns{{"local (2 blocks)", {block, 2, 0, 0}},
                                      {"local + global", {block, 2, 1, 0}},
                                      {"strided (local 1, stride 4)", {block, 1, 0, 4}},
                                      {"BigBird-like (2, 1, 4)", {block, 2, 1, 4}},
                                      {"dense causal", {block, blocks, 0, 0}}};
    fmt::print("\nWork against density (T = {}, B = {}): blocks visited and query-key pairs scored\n", T, block);
    fmt::print("  {:<28} {:>8} {:>8} {:>8} {:>10} {:>10}\n", "pattern", "blocks", "density", "pairs", "MFLOP",
               "vs dense");
    std::int64_t dense_pairs = 0;
    for (const Named& n : patterns)
      if (n.name == "dense causal") dense_pairs = T * (T + 1) / 2;
    for (const Named& n : patterns) {
      const Tables tn = build_tables(n.p, T);
      std::int64_t pn = 0, bn = 0;
      (void)blocked_attention(q, k, v, n.p, tn, pn);
      for (const std::int64_t c : tn.kv_num_blocks) bn += c;
      fmt::print("  {:<28} {:>8} {:>8.3f} {:>8} {:>10.4f} {:>10.3f}\n", n.name, bn,
                 static_cast<double>(bn) / static_cast<double>(causal), pn, static_cast<double>(pn * 4 * d) / 1e6,
                 static_cast<double>(pn) / static_cast<double>(dense_pairs));
    }

    // Where it fails: a needle in a block that the last query's row never visits gets weight exactly 0.
    fmt::print(
        "\nNeedle recall: weight the last query (position {}) gives a matching key at position P, mean of 200 "
        "inputs\n",
        T - 1);
    fmt::print("  {:>4} {:>6} {:>9} {:>12} {:>12}\n", "P", "block", "visited", "this pattern", "dense");
    const Pattern dense_p{block, blocks, 0, 0};
    bool invisible_zero = true, visible_positive = true;
    for (std::int64_t position = 0; position < T; position += std::max<std::int64_t>(1, block / 2)) {
      double sparse = 0.0, dense = 0.0;
      for (int trial = 0; trial < 200; ++trial) {
        af::Rng a(seed * 1000 + static_cast<std::uint64_t>(trial)), b = a;
        sparse += needle_weight(a, p, T, position, d) / 200;
        dense += needle_weight(b, dense_p, T, position, d) / 200;
      }
      const bool seen = p.visits((T - 1) / block, position / block);
      invisible_zero = invisible_zero && (seen || sparse == 0.0);
      visible_positive = visible_positive && (!seen || sparse > 0.0);
      fmt::print("  {:>4} {:>6} {:>9} {:>12.4f} {:>12.4f}\n", position, position / block, seen ? "yes" : "no", sparse,
                 dense);
    }
    checks.expect_true("needle in an unvisited block: weight exactly 0; in a visited one: > 0",
                       invisible_zero && visible_positive);

    if (!out_dir.empty()) {
      const std::filesystem::path dir = af::make_output_directory(out_dir);
      numbers.write(dir);
      // The four caches against context: stored bytes, then cached entries read per decode step (per layer).
      af::write_output_file(dir / "mechanisms.dat", [&](af::OutputFile& mech) {
        mech.print("context");
        for (const std::string& label : labels) mech.print(" \"{}\"", label);  // stored bytes
        for (const std::string& label : labels) mech.print(" \"{}\"", label);  // entries read
        mech.print("\n");
        for (const std::int64_t t : contexts_fig) {
          mech.print("{}", t);
          for (const af::ModelCache& m : caches) mech.print(" {}", m.bytes_stored(t));
          for (const af::ModelCache& m : caches) mech.print(" {}", entries_read(m, t));
          mech.print("\n");
        }
      });
      // Element-level masks of the four sparse patterns, one gnuplot index each: "query key allowed".
      af::write_output_file(dir / "patterns.dat", [&](af::OutputFile& file) {
        file.print(
            "# block {} tokens {}; one index per pattern: query key allowed (1 full block, 0.5 partial block "
            "element allowed, 0 masked, NaN not visited)\n",
            block, T);
        for (std::size_t n = 0; n + 1 < patterns.size(); ++n) {
          const Tables tn = build_tables(patterns[n].p, T);
          file.print("# pattern \"{}\"\n", patterns[n].name);
          for (std::int64_t i = 0; i < T; ++i) {
            for (std::int64_t j = 0; j < T; ++j) {
              const std::size_t row = static_cast<std::size_t>(i / block);
              const auto& idx = tn.kv_indices[row];
              const auto it = std::ranges::find(idx, j / block);
              std::string value = "NaN";
              if (it != idx.end())
                value = tn.full[row][static_cast<std::size_t>(it - idx.begin())] ? "1"
                        : patterns[n].p.allows(i, j)                             ? "0.5"
                                                                                 : "0";
              file.print("{} {} {}\n", i, j, value);
            }
            file.print("\n");
          }
          file.print("\n");
        }
      });
    }
    return checks.all_passed();
  });
}
