// Chapter 23 — Tiling attention: FlashAttention's idea on the CPU.
//
// Builds the online softmax for one row of scores (two passes against one, the running maximum and sum, the
// rescaling), then causal attention computed tile by tile for one head: query tiles of B_r rows walk the
// key/value tiles of B_c rows at or below the diagonal, and the T x T score matrix never leaves the tile. A
// two-level memory model counts the bytes each algorithm moves between slow memory (HBM) and fast memory (an
// SM's shared memory) as it runs. Checks everything against the library (af::tiled_attention,
// af::grouped_attend) and float64, for a prefill and for an append after cached tokens; prints the traffic of
// the standard and tiled algorithms against tile size and sequence length for one Llama-3.1-8B layer, the
// tiles that fit a fast memory, and where tiling stops paying; writes the data of the figures.
//
//   build/bin/ch23_tiling_attention [--seq-len 300] [--past 200] [--heads 8] [--kv-heads 2] [--head-dim 64]
//       [--block-q 32] [--block-kv 32] [--fast-memory-kib 228] [--seed 23] [--out DIR]

#include "af/accounting.hpp"
#include "af/error.hpp"
#include "af/grouped_attention.hpp"
#include "af/linalg.hpp"
#include "af/models.hpp"
#include "af/program.hpp"
#include "af/random.hpp"
#include "af/softmax.hpp"
#include "af/tiled_attention.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <limits>
#include <string>
#include <vector>

namespace {

using af::ConstMatrix;
using af::Shape;
using af::Tensor;

constexpr float minus_infinity = -std::numeric_limits<float>::infinity();
constexpr std::int64_t bf16_bytes = 2;  // what a GPU kernel would move per value

// [two-pass-softmax]
// The safe softmax of one row of scores z: a first pass finds the maximum, a second sums exp(z_j - max), a
// third divides. Subtracting the maximum keeps every exponent <= 0, so nothing overflows.
std::vector<float> two_pass_softmax(std::span<const float> z) {
  float top = minus_infinity;
  for (const float x : z) top = std::max(top, x);
  float sum = 0.0f;
  for (const float x : z) sum += std::exp(x - top);
  std::vector<float> p;
  for (const float x : z) p.push_back(std::exp(x - top) / sum);
  return p;
}
// [/two-pass-softmax]

// [online-softmax]
// One pass for the maximum and the sum together: keep the running maximum mu and the sum ell of exp(z_j - mu)
// over the scores seen so far. When a score raises the maximum, every term already summed was taken
// relative to the old one: multiplying ell by exp(mu_old - mu_new) moves them all to the new one at once.
struct Normaliser {
  float mu = minus_infinity;
  float ell = 0.0f;
  std::int64_t rescales = 0;  // how often the maximum grew

  void add(float z) {
    if (z > mu) {
      ell *= std::exp(mu - z);  // exp(-inf) = 0 for the first score
      mu = z;
      ++rescales;
    }
    ell += std::exp(z - mu);
  }
};

std::vector<float> online_softmax(std::span<const float> z, Normaliser& n) {
  for (const float x : z) n.add(x);
  std::vector<float> p;
  for (const float x : z) p.push_back(std::exp(x - n.mu) / n.ell);
  return p;
}
// [/online-softmax]

// [online-output]
// Attention does not need the weights, only o = sum_j p_j v_j. The same rescaling then carries the output
// too: keep o unnormalised, relative to mu, and divide by ell at the very end. `absorb` folds n more keys and
// values (one tile, or one key) into one query's running state; it is all a tile of the tiled algorithm does.
struct RowState {
  float mu = minus_infinity;
  float ell = 0.0f;
  std::vector<float> o;  // [d], unnormalised
};

void absorb(const float* q, const float* keys, const float* values, std::int64_t n, std::int64_t d, float scale,
            RowState& s) {
  const auto size = static_cast<std::size_t>(d);
  std::vector<float> z(static_cast<std::size_t>(n));
  float top = s.mu;
  for (std::int64_t j = 0; j < n; ++j) {
    z[j] = scale * af::dot({q, size}, {keys + j * d, size});
    top = std::max(top, z[j]);
  }
  const float rescale = std::exp(s.mu - top);  // the old terms, moved to the new maximum
  s.ell *= rescale;
  for (float& x : s.o) x *= rescale;
  for (std::int64_t j = 0; j < n; ++j) {
    const float p = std::exp(z[j] - top);
    s.ell += p;
    af::axpy(p, {values + j * d, size}, s.o);
  }
  s.mu = top;
}
// [/online-output]

// [two-level-memory]
// The model: Q, K, V, O (and the standard algorithm's score matrix) live in a large slow memory; the
// arithmetic reads only a small fast one. Every value that crosses is counted; a byte count is values x 2
// (bf16, as a GPU kernel would move them).
struct TwoLevelMemory {
  std::int64_t q = 0, k = 0, v = 0, o = 0, scores_written = 0, scores_read = 0;  // values moved

  // Copies rows [first, first + n) of `from` into the fast tile `to`, counting them in `counter`.
  static void load(ConstMatrix from, std::int64_t first, std::int64_t n, std::vector<float>& to,
                   std::int64_t& counter) {
    for (std::int64_t r = 0; r < n; ++r) std::ranges::copy(from.row(first + r), to.begin() + r * from.cols);
    counter += n * from.cols;
  }
  std::int64_t bytes() const { return bf16_bytes * (q + k + v + o + scores_written + scores_read); }
};
// [/two-level-memory]

// [tiled-head]
// Causal attention of one head, tile by tile: q [Tq, d] at positions [past, past + Tq), k and v
// [past + Tq, d]. Each query tile is loaded once; it walks the key/value tiles up to its last query's
// position (the ones beyond lie entirely above the diagonal and are never loaded), folds each into its rows'
// running states, and stores its output rows once. Inside a tile crossing the diagonal, row r sees only the
// keys up to its own position.
Tensor tiled_head(ConstMatrix q, ConstMatrix k, ConstMatrix v, std::int64_t past, std::int64_t block_q,
                  std::int64_t block_kv, TwoLevelMemory& memory) {
  const std::int64_t d = q.cols, tq = q.rows, tk = k.rows;
  const auto scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(d)));
  Tensor out(Shape{tq, d});
  std::vector<float> q_tile(static_cast<std::size_t>(block_q * d)), k_tile(static_cast<std::size_t>(block_kv * d)),
      v_tile(static_cast<std::size_t>(block_kv * d));
  for (std::int64_t r0 = 0; r0 < tq; r0 += block_q) {
    const std::int64_t rows = std::min(block_q, tq - r0);
    TwoLevelMemory::load(q, r0, rows, q_tile, memory.q);
    std::vector<RowState> state(static_cast<std::size_t>(rows), RowState{minus_infinity, 0.0f, std::vector<float>(d)});
    for (std::int64_t c0 = 0; c0 <= past + r0 + rows - 1; c0 += block_kv) {
      const std::int64_t cols = std::min(block_kv, tk - c0);
      TwoLevelMemory::load(k, c0, cols, k_tile, memory.k);
      TwoLevelMemory::load(v, c0, cols, v_tile, memory.v);
      for (std::int64_t r = 0; r < rows; ++r) {
        const std::int64_t visible = std::min(cols, past + r0 + r - c0 + 1);  // the causal mask
        if (visible > 0) absorb(q_tile.data() + r * d, k_tile.data(), v_tile.data(), visible, d, scale, state[r]);
      }
    }
    for (std::int64_t r = 0; r < rows; ++r)
      for (std::int64_t i = 0; i < d; ++i) out.matrix()(r0 + r, i) = state[r].o[i] / state[r].ell;
    memory.o += rows * d;
  }
  return out;
}
// [/tiled-head]

// [standard-head]
// The standard algorithm, as eager code runs it: S = scale Q K^T is written to slow memory whole, read back
// for the masked softmax, which writes P, read back again for O = P V. Three passes over a Tq x Tk matrix.
Tensor standard_head(ConstMatrix q, ConstMatrix k, ConstMatrix v, std::int64_t past, TwoLevelMemory& memory) {
  const std::int64_t tq = q.rows, tk = k.rows, d = q.cols;
  Tensor s = af::matmul_transposed(q, k);  // reads Q and K, writes S
  for (float& x : s.values()) x *= static_cast<float>(1.0 / std::sqrt(static_cast<double>(d)));
  memory.q += tq * d, memory.k += tk * d, memory.scores_written += tq * tk;
  const af::Mask mask = af::Mask::causal(tq, tk, past);
  af::softmax_rows(s.matrix(), &mask);  // reads S, writes P
  memory.scores_read += tq * tk, memory.scores_written += tq * tk;
  Tensor out = af::matmul(s.matrix(), v);  // reads P and V, writes O
  memory.scores_read += tq * tk, memory.v += tk * d, memory.o += tq * d;
  return out;
}
// [/standard-head]

// One head of a [T, heads x d] matrix as a [T, d] view.
ConstMatrix head_of(ConstMatrix m, std::int64_t head, std::int64_t d) {
  return {m.data + head * d, m.rows, d, m.row_stride};
}

// Causal grouped attention in float64, from the definition: query i of head h at position past + i.
std::vector<double> reference(const Tensor& q, const Tensor& k, const Tensor& v, const af::HeadShape& shape,
                              std::int64_t past) {
  const std::int64_t d = shape.head_dim, tq = q.dim(0), width = shape.heads * d, kv_width = shape.kv_heads * d;
  std::vector<double> out(static_cast<std::size_t>(tq * width), 0.0);
  for (std::int64_t h = 0; h < shape.heads; ++h) {
    const std::int64_t g = h * shape.kv_heads / shape.heads;
    for (std::int64_t i = 0; i < tq; ++i) {
      std::vector<double> z(static_cast<std::size_t>(past + i + 1));
      double top = -std::numeric_limits<double>::infinity(), sum = 0.0;
      for (std::int64_t j = 0; j <= past + i; ++j) {
        double dot = 0.0;
        for (std::int64_t c = 0; c < d; ++c)
          dot += double{q.data()[i * width + h * d + c]} * double{k.data()[j * kv_width + g * d + c]};
        top = std::max(top, z[j] = dot / std::sqrt(static_cast<double>(d)));
      }
      for (double& x : z) sum += (x = std::exp(x - top));
      for (std::int64_t j = 0; j <= past + i; ++j)
        for (std::int64_t c = 0; c < d; ++c)
          out[i * width + h * d + c] += z[j] / sum * double{v.data()[j * kv_width + g * d + c]};
    }
  }
  return out;
}

// The tiles a fast memory of `fast_bytes` holds (tile_working_set_bytes), over powers of two from 16 to 1024.
struct Fit {
  std::int64_t square = 0;   // the largest B with B_r = B_c = B that fits (0: none)
  af::TileSizes best{0, 0};  // the pair that moves the fewest bytes
  std::int64_t best_bytes = 0;
};

Fit fit_tiles(std::int64_t fast_bytes, std::int64_t seq_len, const af::HeadShape& shape) {
  Fit f;
  for (std::int64_t br = 16; br <= 1024; br *= 2)
    for (std::int64_t bc = 16; bc <= 1024; bc *= 2) {
      if (af::tile_working_set_bytes({br, bc}, shape.head_dim, bf16_bytes) > fast_bytes) continue;
      if (br == bc) f.square = br;
      const std::int64_t bytes = af::tiled_attention_traffic(seq_len, 0, shape, {br, bc}, bf16_bytes).total();
      if (f.best_bytes == 0 || bytes < f.best_bytes) f.best = {br, bc}, f.best_bytes = bytes;
    }
  return f;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Chapter 23: tiling attention (FlashAttention's idea on the CPU)", "ch23_tiling_attention"};
  std::int64_t seq_len = 300, past = 200, heads = 8, kv_heads = 2, head_dim = 64, block_q = 32, block_kv = 32;
  std::int64_t fast_memory_kib = 228;
  std::uint64_t seed = 23;
  std::string out_dir;
  app.add_option("--seq-len", seq_len, "Queries Tq of the prefill, and new queries of the append")
      ->check(CLI::Range(1, 1024))
      ->capture_default_str();
  app.add_option("--past", past, "Cached tokens before the appended queries")
      ->check(CLI::Range(0, 4096))
      ->capture_default_str();
  app.add_option("--heads", heads, "Query heads H")->check(CLI::Range(1, 64))->capture_default_str();
  app.add_option("--kv-heads", kv_heads, "Key/value heads G (H divisible by G)")
      ->check(CLI::Range(1, 64))
      ->capture_default_str();
  app.add_option("--head-dim", head_dim, "Head dimension d")->check(CLI::Range(1, 256))->capture_default_str();
  app.add_option("--block-q", block_q, "Query rows per tile B_r")->check(CLI::Range(1, 4096))->capture_default_str();
  app.add_option("--block-kv", block_kv, "Key/value rows per tile B_c")
      ->check(CLI::Range(1, 4096))
      ->capture_default_str();
  app.add_option("--fast-memory-kib", fast_memory_kib,
                 "Fast memory the tiles must fit, KiB (H100: 228 per SM, A100: 164)")
      ->check(CLI::Range(22, 4096))
      ->capture_default_str();
  app.add_option("--seed", seed, "Seed of the random inputs")->check(af::seed_value())->capture_default_str();
  app.add_option("--out", out_dir, "Directory for the figure data (io_tiles.dat, io_lengths.dat) and numbers.json")
      ->check(af::output_directory());

  return af::run_program(app, argc, argv, [&] {
    af::require(heads % kv_heads == 0, "--heads {} is not a multiple of --kv-heads {} (expected H divisible by G)",
                heads, kv_heads);
    // Four passes over H x Tq x (past + Tq) x d multiply-adds (float64, from scratch, two from lib/), twice.
    af::require_product_within(
        {{"--heads", heads}, {"--seq-len", seq_len}, {"--seq-len + --past", seq_len + past}, {"--head-dim", head_dim}},
        1 << 30);
    // The smallest tile the fast-memory search tries, 16 x 16 at Llama's d = 128, needs 21.1 KiB: the range of
    // --fast-memory-kib starts above it.
    const af::HeadShape shape{heads, kv_heads, head_dim};
    const std::int64_t d = head_dim;
    af::Rng rng(seed);
    af::Checks checks;
    af::BookNumbers numbers;
    fmt::print("Tiled attention: H = {} query heads over G = {} KV heads of d = {}; tiles B_r = {}, B_c = {}\n", heads,
               kv_heads, d, block_q, block_kv);
    fmt::print("  prefill: T = {} queries over {} keys; append: {} queries after {} cached tokens\n\n", seq_len,
               seq_len, seq_len, past);

    // 1. The online softmax of one row, against the two-pass softmax, the library's and float64.
    fmt::print("One row of {} scores (spread as large as a sharp head's, up to +-{:.0f})\n", seq_len + past, 100.0);
    {
      const Tensor z = af::random_uniform(Shape{1, seq_len + past}, rng, -100.0, 100.0);
      const std::span<const float> row = z.values();
      float naive_sum = 0.0f;  // no maximum subtracted: exp(100) overflows float32
      for (const float x : row) naive_sum += std::exp(x);
      std::vector<double> want(row.size());
      double top = -std::numeric_limits<double>::infinity(), sum = 0.0;
      for (const float x : row) top = std::max(top, double{x});
      for (std::size_t j = 0; j < row.size(); ++j) sum += (want[j] = std::exp(double{row[j]} - top));
      for (double& x : want) x /= sum;
      Normaliser n;
      const std::vector<float> two = two_pass_softmax(row), one = online_softmax(row, n);
      std::vector<float> lib(row.begin(), row.end());
      af::softmax(lib);
      fmt::print("  naive sum of exp(z): {} (float32 overflows above exp(88.7))\n", naive_sum);
      fmt::print("  reads of the row: two-pass 3 (maximum, sum, divide), online 2 (maximum and sum, divide)\n");
      fmt::print("  the running maximum grew {} times in {} scores: {} rescales of the sum\n", n.rescales, row.size(),
                 n.rescales);
      checks.expect_close("one row: two-pass softmax vs float64", af::max_abs_diff(two, want), 1e-6);
      checks.expect_close("one row: online softmax vs float64", af::max_abs_diff(one, want), 1e-6);
      checks.expect_close("one row: online softmax vs lib/ af::softmax", af::max_abs_diff(one, lib), 1e-6);
      numbers.print("row_rescales", "{}", n.rescales);
      numbers.print("row_length", "{}", row.size());
    }

    // 2. One query's output in one pass, key by key and in tiles, against float64.
    {
      const Tensor q = af::random_normal(Shape{1, d}, rng), k = af::random_normal(Shape{seq_len, d}, rng),
                   v = af::random_normal(Shape{seq_len, d}, rng);
      const std::vector<double> want = reference(q, k, v, {1, 1, d}, seq_len - 1);
      const auto scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(d)));
      double worst = 0.0;
      for (const std::int64_t step : {std::int64_t{1}, block_kv, seq_len}) {
        RowState s{minus_infinity, 0.0f, std::vector<float>(d)};
        for (std::int64_t j = 0; j < seq_len; j += step)
          absorb(q.data(), k.data() + j * d, v.data() + j * d, std::min(step, seq_len - j), d, scale, s);
        for (std::int64_t i = 0; i < d; ++i) worst = af::worse(worst, std::abs(s.o[i] / s.ell - want[i]));
      }
      checks.expect_close(
          fmt::format("one query over {} keys, 1, {} and {} at a time, vs float64", seq_len, block_kv, seq_len), worst,
          1e-5 * std::max(1.0, af::max_abs(v.values())));
    }

    // 3. The prefill: one head from scratch, then every head, against lib/ and float64, with the bytes moved.
    const auto run_case = [&](const char* name, std::int64_t cached) {
      const Tensor q = af::random_normal(Shape{seq_len, heads * d}, rng),
                   k = af::random_normal(Shape{cached + seq_len, kv_heads * d}, rng),
                   v = af::random_normal(Shape{cached + seq_len, kv_heads * d}, rng);
      const std::vector<double> want = reference(q, k, v, shape, cached);
      const double tol = 1e-5 * std::max(1.0, af::max_abs(v.values()));
      TwoLevelMemory tiled_memory, standard_memory;
      Tensor ours(Shape{seq_len, heads * d}), standard(Shape{seq_len, heads * d});
      for (std::int64_t h = 0; h < heads; ++h) {
        const std::int64_t g = h / (heads / kv_heads);
        const Tensor o = tiled_head(head_of(q.matrix(), h, d), head_of(k.matrix(), g, d), head_of(v.matrix(), g, d),
                                    cached, block_q, block_kv, tiled_memory);
        const Tensor s = standard_head(head_of(q.matrix(), h, d), head_of(k.matrix(), g, d), head_of(v.matrix(), g, d),
                                       cached, standard_memory);
        for (std::int64_t t = 0; t < seq_len; ++t) {
          std::ranges::copy(o.matrix().row(t), ours.matrix().row(t).begin() + h * d);
          std::ranges::copy(s.matrix().row(t), standard.matrix().row(t).begin() + h * d);
        }
      }
      // [library-call]
      af::TileCounts counts;
      const Tensor lib =
          af::tiled_attention(q.matrix(), k.matrix(), v.matrix(), shape, cached, {block_q, block_kv}, &counts);
      af::GroupedKvCache cache(cached + seq_len, kv_heads, d);
      cache.append(k.matrix(), v.matrix());
      const Tensor grouped = af::grouped_attend(q.matrix(), {1, heads, kv_heads, d}, cache, {});
      // [/library-call]
      const af::Traffic tiled_model = af::tiled_attention_traffic(seq_len, cached, shape, {block_q, block_kv}, 2);
      const af::Traffic standard_model = af::standard_attention_traffic(seq_len, cached, shape, 2);
      checks.expect_close(fmt::format("{}: tiled from scratch vs float64", name), af::max_abs_diff(ours.values(), want),
                          tol);
      checks.expect_close(fmt::format("{}: tiled from scratch vs lib/ af::tiled_attention", name),
                          af::max_abs_diff(ours.values(), lib.values()), tol);
      checks.expect_close(fmt::format("{}: lib/ af::tiled_attention vs float64", name),
                          af::max_abs_diff(lib.values(), want), tol);
      checks.expect_close(fmt::format("{}: lib/ af::tiled_attention vs lib/ af::grouped_attend", name),
                          af::max_abs_diff(lib.values(), grouped.values()), tol);
      checks.expect_close(fmt::format("{}: standard (S and P stored) vs float64", name),
                          af::max_abs_diff(standard.values(), want), tol);
      checks.expect_true(fmt::format("{}: bytes counted as the tiled walk ran = lib/ af::tiled_attention_traffic ({})",
                                     name, tiled_memory.bytes()),
                         tiled_memory.bytes() == tiled_model.total());
      checks.expect_true(fmt::format("{}: bytes counted as the standard algorithm ran = lib/ "
                                     "af::standard_attention_traffic ({})",
                                     name, standard_memory.bytes()),
                         standard_memory.bytes() == standard_model.total());
      const af::TileCounts want_counts = af::causal_tile_counts(seq_len, cached, {block_q, block_kv});
      checks.expect_true(fmt::format("{}: the walk computed {} tile pairs and skipped {} (the causal schedule)", name,
                                     counts.computed, counts.skipped),
                         counts.computed == want_counts.computed && counts.skipped == want_counts.skipped &&
                             counts.masked == want_counts.masked);
      return std::pair{standard_model, tiled_model};
    };
    const auto [prefill_standard, prefill_tiled] = run_case("prefill", 0);
    const auto [append_standard, append_tiled] = run_case("append", past);
    const af::TileCounts prefill_counts = af::causal_tile_counts(seq_len, 0, {block_q, block_kv});
    const af::TileCounts append_counts = af::causal_tile_counts(seq_len, past, {block_q, block_kv});

    // [io-table]
    fmt::print("\nBytes between slow and fast memory (bf16), counted as each algorithm ran:\n");
    fmt::print("  {:<8} {:>12} {:>12} {:>12} {:>12} {:>14} {:>8}\n", "case", "Q read", "K+V read", "O written",
               "S,P moved", "total", "tiles");
    const auto row = [](const char* name, const af::Traffic& t, std::string tiles) {
      fmt::print("  {:<8} {:>12} {:>12} {:>12} {:>12} {:>14} {:>8}\n", name, af::with_thousands(t.q_read),
                 af::with_thousands(t.k_read + t.v_read), af::with_thousands(t.o_written),
                 af::with_thousands(t.scores_written + t.scores_read), af::with_thousands(t.total()), tiles);
    };
    const auto tiles_text = [](const af::TileCounts& c) {
      return fmt::format("{}/{}", c.computed, c.computed + c.skipped);
    };
    fmt::print("  prefill, T = {}:\n", seq_len);
    row("standard", prefill_standard, "");
    row("tiled", prefill_tiled, tiles_text(prefill_counts));
    fmt::print("  append, {} after {}:\n", seq_len, past);
    row("standard", append_standard, "");
    row("tiled", append_tiled, tiles_text(append_counts));
    // [/io-table]
    fmt::print("  (tiles: pairs computed / all pairs; the rest lie above the diagonal and are skipped)\n");

    // 4. One Llama-3.1-8B layer: the traffic against the tile size and against the length.
    const af::DenseModel& llama = af::dense_model("Llama-3.1-8B");
    const af::HeadShape layer{llama.heads, llama.kv_heads, llama.head_dim};
    const std::int64_t prompt = 4096, fast_bytes = fast_memory_kib * 1024;
    const af::Traffic standard_4k = af::standard_attention_traffic(prompt, 0, layer, bf16_bytes);
    fmt::print("\nOne {} layer ({} query heads, {} KV heads, d = {}), prefill of T = {}, bf16\n", llama.name,
               layer.heads, layer.kv_heads, layer.head_dim, prompt);
    fmt::print("  standard: {} ({} of it the score matrix)\n", af::human_bytes(double(standard_4k.total())),
               af::human_bytes(double(standard_4k.scores_written + standard_4k.scores_read)));
    // [io-sweep]
    fmt::print("  {:>6} {:>14} {:>14} {:>16}\n", "B", "working set", "tiled bytes", "standard/tiled");
    struct TileRow {
      std::int64_t block, working_set, tiled;
    };
    std::vector<TileRow> tile_rows;
    for (std::int64_t b = 1; b <= prompt; b *= 2) {
      const std::int64_t ws = af::tile_working_set_bytes({b, b}, layer.head_dim, bf16_bytes);
      const std::int64_t tiled = af::tiled_attention_traffic(prompt, 0, layer, {b, b}, bf16_bytes).total();
      tile_rows.push_back({b, ws, tiled});
      fmt::print("  {:>6} {:>14} {:>14} {:>16.2f}\n", b, af::human_bytes(double(ws)), af::human_bytes(double(tiled)),
                 double(standard_4k.total()) / double(tiled));
    }
    // [/io-sweep]

    // [fit-tiles]
    const Fit h100 = fit_tiles(228 * 1024, prompt, layer), a100 = fit_tiles(164 * 1024, prompt, layer),
              chosen = fit_tiles(fast_bytes, prompt, layer);
    fmt::print("\nTiles that fit a fast memory (powers of two from 16; working set as above):\n");
    fmt::print("  {:<28} {:>8} {:>14} {:>14} {:>10}\n", "fast memory", "B_r=B_c", "best B_r x B_c", "tiled bytes",
               "vs std");
    for (const auto& [name, f] : {std::pair{std::string("H100 SM, 228 KiB"), h100},
                                  {"A100 SM, 164 KiB", a100},
                                  {fmt::format("--fast-memory-kib {}", fast_memory_kib), chosen}}) {
      if (f.square == 0 && f.best_bytes == 0) {
        fmt::print("  {:<28} {:>8}\n", name, "none");
        continue;
      }
      fmt::print("  {:<28} {:>8} {:>14} {:>14} {:>9.2f}x\n", name, f.square,
                 fmt::format("{} x {}", f.best.block_q, f.best.block_kv), af::human_bytes(double(f.best_bytes)),
                 double(standard_4k.total()) / double(f.best_bytes));
    }
    // [/fit-tiles]
    af::require(chosen.best_bytes > 0, "--fast-memory-kib {} holds no tile of 16 x 16 at d = {}", fast_memory_kib,
                layer.head_dim);
    const std::int64_t sweep_tile = chosen.square > 0 ? chosen.square : 16;

    fmt::print("\nAgainst the prompt length, square tiles of {} (the largest that fit --fast-memory-kib {}):\n",
               sweep_tile, fast_memory_kib);
    fmt::print("  {:>8} {:>14} {:>14} {:>14} {:>10}\n", "T", "standard", "tiled", "Q+K+V+O once", "std/tiled");
    struct LengthRow {
      std::int64_t tokens, standard, tiled, floor;
    };
    std::vector<LengthRow> length_rows;
    for (std::int64_t t = 256; t <= 131072; t *= 2) {
      const std::int64_t standard = af::standard_attention_traffic(t, 0, layer, bf16_bytes).total();
      const std::int64_t tiled = af::tiled_attention_traffic(t, 0, layer, {sweep_tile, sweep_tile}, bf16_bytes).total();
      const std::int64_t floor = af::tiled_attention_traffic(t, 0, layer, {t, t}, bf16_bytes).total();
      length_rows.push_back({t, standard, tiled, floor});
      fmt::print("  {:>8} {:>14} {:>14} {:>14} {:>10.2f}\n", t, af::human_bytes(double(standard)),
                 af::human_bytes(double(tiled)), af::human_bytes(double(floor)), double(standard) / double(tiled));
    }

    // 5. The cache card: tiling changes what moves during attention, not what is cached.
    // [cache-card]
    const std::vector<af::ModelCache> models{llama.cache()};
    const std::vector<std::int64_t> contexts{4096, 131072};
    fmt::print("\nCache card (tiling changes no cached byte: it is grouped attention's card)\n{}",
               af::format_cache_card(llama.cache().card, models, contexts));
    // [/cache-card]

    // 6. Where it stops paying: decode (Tq = 1), and the rescale when B_c is small.
    // [decode-traffic]
    const af::Traffic decode_standard = af::standard_attention_traffic(1, prompt - 1, layer, bf16_bytes);
    const af::Traffic decode_tiled =
        af::tiled_attention_traffic(1, prompt - 1, layer, {sweep_tile, sweep_tile}, bf16_bytes);
    const af::TileCounts decode_counts = af::causal_tile_counts(1, prompt - 1, {sweep_tile, sweep_tile});
    fmt::print("\nDecode, one query after {} cached tokens, same layer and tiles:\n", prompt - 1);
    fmt::print("  standard {} B, tiled {} B: {:.2f} % less; query tiles per head: {}\n",
               af::with_thousands(decode_standard.total()), af::with_thousands(decode_tiled.total()),
               100.0 * (1.0 - double(decode_tiled.total()) / double(decode_standard.total())),
               decode_counts.query_tiles);
    // [/decode-traffic]
    fmt::print("\nThe rescale against B_c (prefill of T = {} per head): multiplies of the accumulator's rescale\n",
               prompt);
    fmt::print("per multiply-add of P V; each (row, key tile) pair with a visible key rescales d values\n");
    fmt::print("  {:>6} {:>16} {:>16} {:>10}\n", "B_c", "rescale mults", "P V mult-adds", "ratio");
    std::vector<std::pair<std::int64_t, double>> rescale_rows;
    for (std::int64_t bc = 1; bc <= 256; bc *= 4) {
      std::int64_t pairs = 0;  // (row, key tile) pairs the walk folds in: row t reaches key tile t / B_c
      for (std::int64_t t = 0; t < prompt; ++t) pairs += t / bc + 1;
      const std::int64_t rescale = pairs * layer.head_dim, products = prompt * (prompt + 1) / 2 * layer.head_dim;
      rescale_rows.emplace_back(bc, double(rescale) / double(products));
      fmt::print("  {:>6} {:>16} {:>16} {:>10.4f}\n", bc, af::with_thousands(rescale), af::with_thousands(products),
                 double(rescale) / double(products));
    }

    numbers.print("seq_len", "{}", seq_len);
    numbers.print("past", "{}", past);
    numbers.set("prefill_standard_bytes", af::with_thousands(prefill_standard.total()));
    numbers.set("prefill_tiled_bytes", af::with_thousands(prefill_tiled.total()));
    numbers.print("prefill_ratio", "{:.2f}", double(prefill_standard.total()) / double(prefill_tiled.total()));
    numbers.print("prefill_tiles_computed", "{}", prefill_counts.computed);
    numbers.print("prefill_tiles_skipped", "{}", prefill_counts.skipped);
    numbers.print("append_ratio", "{:.2f}", double(append_standard.total()) / double(append_tiled.total()));
    numbers.set("standard_4k", af::human_bytes(double(standard_4k.total())));
    numbers.set("standard_4k_scores", af::human_bytes(double(standard_4k.scores_written + standard_4k.scores_read)));
    numbers.print("h100_square", "{}", h100.square);
    numbers.print("a100_square", "{}", a100.square);
    numbers.set("h100_best", fmt::format("{} x {}", h100.best.block_q, h100.best.block_kv));
    numbers.set("h100_best_bytes", af::human_bytes(double(h100.best_bytes)));
    numbers.print("h100_best_ratio", "{:.1f}", double(standard_4k.total()) / double(h100.best_bytes));
    numbers.set(
        "h100_square_working_set",
        af::human_bytes(double(af::tile_working_set_bytes({h100.square, h100.square}, layer.head_dim, bf16_bytes))));
    numbers.set("h100_square_bytes",
                af::human_bytes(double(
                    af::tiled_attention_traffic(prompt, 0, layer, {h100.square, h100.square}, bf16_bytes).total())));
    numbers.print(
        "h100_square_ratio", "{:.1f}",
        double(standard_4k.total()) /
            double(af::tiled_attention_traffic(prompt, 0, layer, {h100.square, h100.square}, bf16_bytes).total()));
    numbers.print("sweep_tile", "{}", sweep_tile);
    numbers.print("ratio_128k", "{:.1f}", double(length_rows.back().standard) / double(length_rows.back().tiled));
    numbers.print("ratio_256", "{:.1f}", double(length_rows.front().standard) / double(length_rows.front().tiled));
    numbers.print("decode_saving_percent", "{:.2f}",
                  100.0 * (1.0 - double(decode_tiled.total()) / double(decode_standard.total())));
    numbers.print("rescale_ratio_bc1", "{:.2f}", rescale_rows.front().second);
    numbers.print("rescale_ratio_bc64", "{:.4f}", rescale_rows[3].second);

    if (!out_dir.empty()) {
      const std::filesystem::path dir = af::make_output_directory(out_dir);
      numbers.write(dir);
      af::write_output_file(dir / "io_tiles.dat", [&](af::OutputFile& f) {
        f.print("# {} layer, prefill T = {}, bf16; h100_square = {}, a100_square = {}\n", llama.name, prompt,
                h100.square, a100.square);
        f.print("B \"working set\" tiled standard\n");
        for (const TileRow& r : tile_rows)
          f.print("{} {} {} {}\n", r.block, r.working_set, r.tiled, standard_4k.total());
      });
      af::write_output_file(dir / "io_lengths.dat", [&](af::OutputFile& f) {
        f.print("# {} layer, bf16, tiles {} x {}\n", llama.name, sweep_tile, sweep_tile);
        f.print("T standard tiled \"Q+K+V+O once\"\n");
        for (const LengthRow& r : length_rows) f.print("{} {} {} {}\n", r.tokens, r.standard, r.tiled, r.floor);
      });
    }
    return checks.all_passed();
  });
}
