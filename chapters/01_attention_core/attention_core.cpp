// Chapter 01 — single-head attention, from the math to a KV cache.
//
// Builds one attention head from scratch: project each token to a query, a key and a value; score every
// query against every key; hide the future with the causal mask; turn scores into weights with a softmax;
// mix the values; project back to the model width. Then produces the same outputs one token at a time
// through an explicit KV cache, and checks the two paths against each other, against the library's
// version (lib/attention) and against a float64 reference.
//
//   build/bin/ch01_attention_core [--seq-len 12] [--hidden 64] [--head-dim 16] [--seed 1] [--out DIR]
//
// Exit status: 0 when every check passes, 1 when one fails, 2 for a bad flag.

#include "af/accounting.hpp"
#include "af/attention.hpp"
#include "af/models.hpp"
#include "af/program.hpp"
#include "af/random.hpp"
#include "af/tensor.hpp"

#include <fmt/format.h>

#include <cmath>
#include <filesystem>
#include <limits>
#include <span>
#include <vector>

namespace {

using af::ConstMatrix;
using af::Shape;
using af::Tensor;

// [head-weights]
// One attention head's parameters, stored as nn.Linear stores them: [out_features, in_features].
struct Head {
  Tensor w_q, w_k, w_v;  // [head_dim, hidden]: hidden state -> query, key, value
  Tensor w_o;            // [hidden, head_dim]: attention output -> hidden state
};
// [/head-weights]

Head random_head(af::Rng& rng, std::int64_t hidden, std::int64_t head_dim) {
  // Standard deviation 1/sqrt(fan_in) keeps every projection's output near unit scale.
  const double in = 1.0 / std::sqrt(static_cast<double>(hidden)), out = 1.0 / std::sqrt(static_cast<double>(head_dim));
  return {af::random_normal(Shape{head_dim, hidden}, rng, in), af::random_normal(Shape{head_dim, hidden}, rng, in),
          af::random_normal(Shape{head_dim, hidden}, rng, in), af::random_normal(Shape{hidden, head_dim}, rng, out)};
}

// [project]
// y = x W^T: every token (row of x) becomes one row of y.  x [T, in], w [out, in] -> [T, out]
Tensor project(ConstMatrix x, const Tensor& w) {
  const std::int64_t tokens = x.rows, out_dim = w.dim(0), in_dim = w.dim(1);
  Tensor y(Shape{tokens, out_dim});
  for (std::int64_t t = 0; t < tokens; ++t)
    for (std::int64_t o = 0; o < out_dim; ++o) {
      float sum = 0.0f;
      for (std::int64_t i = 0; i < in_dim; ++i) sum += x(t, i) * w.data()[o * in_dim + i];
      y.data()[t * out_dim + o] = sum;
    }
  return y;
}
// [/project]

// [scores]
// How well each query matches each key: s[i][j] = (q_i . k_j) / sqrt(d).  q [Tq, d], k [Tk, d] -> [Tq, Tk]
Tensor scores(ConstMatrix q, ConstMatrix k) {
  const double scale = 1.0 / std::sqrt(static_cast<double>(q.cols));
  Tensor s(Shape{q.rows, k.rows});
  for (std::int64_t i = 0; i < q.rows; ++i)
    for (std::int64_t j = 0; j < k.rows; ++j) {
      float dot = 0.0f;
      for (std::int64_t c = 0; c < q.cols; ++c) dot += q(i, c) * k(j, c);
      s.data()[i * k.rows + j] = static_cast<float>(dot * scale);
    }
  return s;
}
// [/scores]

// [causal-mask]
// Query i sits at position first_query_position + i and may not see a key at a later position: its score
// becomes -infinity, which the softmax turns into a weight of exactly zero.
void mask_future(Tensor& s, std::int64_t first_query_position) {
  const std::int64_t queries = s.dim(0), keys = s.dim(1);
  for (std::int64_t i = 0; i < queries; ++i)
    for (std::int64_t j = first_query_position + i + 1; j < keys; ++j)
      s.data()[i * keys + j] = -std::numeric_limits<float>::infinity();
}
// [/causal-mask]

// [softmax]
// Each row becomes weights that are positive and sum to one. Subtracting the row's maximum first changes
// nothing mathematically and keeps exp() from overflowing: the largest term is exp(0) = 1.
void softmax_rows(Tensor& s) {
  const std::int64_t rows = s.dim(0), cols = s.dim(1);
  for (std::int64_t i = 0; i < rows; ++i) {
    float* row = s.data() + i * cols;
    float row_max = -std::numeric_limits<float>::infinity();
    for (std::int64_t j = 0; j < cols; ++j) row_max = std::max(row_max, row[j]);
    float sum = 0.0f;
    for (std::int64_t j = 0; j < cols; ++j) sum += (row[j] = std::exp(row[j] - row_max));
    for (std::int64_t j = 0; j < cols; ++j) row[j] /= sum;
  }
}
// [/softmax]

// [mix-values]
// Each output row is the weighted average of the value rows.  weights [Tq, Tk], v [Tk, d] -> [Tq, d]
Tensor mix_values(const Tensor& weights, ConstMatrix v) {
  const std::int64_t queries = weights.dim(0), keys = weights.dim(1);
  Tensor out(Shape{queries, v.cols});
  for (std::int64_t i = 0; i < queries; ++i)
    for (std::int64_t j = 0; j < keys; ++j) {
      const float w = weights.data()[i * keys + j];
      for (std::int64_t c = 0; c < v.cols; ++c) out.data()[i * v.cols + c] += w * v(j, c);
    }
  return out;
}
// [/mix-values]

// [attend]
// Attention of queries over keys and values; the queries start at position first_query_position.
// Returns the output [Tq, d] and keeps the weights [Tq, Tk] for the figure.
Tensor attend(ConstMatrix q, ConstMatrix k, ConstMatrix v, std::int64_t first_query_position, Tensor* weights_out) {
  Tensor weights = scores(q, k);
  mask_future(weights, first_query_position);
  softmax_rows(weights);
  Tensor out = mix_values(weights, v);
  if (weights_out != nullptr) *weights_out = std::move(weights);
  return out;
}
// [/attend]

// [prefill]
// The whole prompt at once: T queries against T keys, the causal mask keeping each token to its past.
Tensor prefill(const Head& head, ConstMatrix x, Tensor* weights_out) {
  const Tensor q = project(x, head.w_q);  // [T, d]
  const Tensor k = project(x, head.w_k);  // [T, d]
  const Tensor v = project(x, head.w_v);  // [T, d]
  const Tensor context = attend(q.matrix(), k.matrix(), v.matrix(), /*first_query_position=*/0, weights_out);
  return project(context.matrix(), head.w_o);  // [T, hidden]
}
// [/prefill]

// [kv-cache]
// The KV cache of one head: the key and value of every token seen so far, one row per token. Allocated
// once for `capacity` tokens, so that appending during decode never allocates.
class KvCache {
 public:
  KvCache(std::int64_t capacity, std::int64_t head_dim)
      : head_dim_(head_dim), keys_(Shape{capacity, head_dim}), values_(Shape{capacity, head_dim}) {}

  void append(std::span<const float> key, std::span<const float> value) {
    std::ranges::copy(key, keys_.data() + length_ * head_dim_);
    std::ranges::copy(value, values_.data() + length_ * head_dim_);
    ++length_;
  }
  ConstMatrix keys() const { return {keys_.data(), length_, head_dim_, head_dim_}; }      // [t, d]
  ConstMatrix values() const { return {values_.data(), length_, head_dim_, head_dim_}; }  // [t, d]
  std::int64_t length() const { return length_; }

 private:
  std::int64_t head_dim_;
  std::int64_t length_ = 0;
  Tensor keys_, values_;
};
// [/kv-cache]

// [decode-step]
// One new token: project only this token, append its key and value to the cache, and let its single query
// attend over everything cached. No earlier key or value is recomputed.
Tensor decode_step(const Head& head, ConstMatrix x_t, KvCache& cache) {
  const Tensor q = project(x_t, head.w_q);  // [1, d]
  const Tensor k = project(x_t, head.w_k);  // [1, d]
  const Tensor v = project(x_t, head.w_v);  // [1, d]
  cache.append(k.values(), v.values());
  const std::int64_t position = cache.length() - 1;
  const Tensor context = attend(q.matrix(), cache.keys(), cache.values(), position, nullptr);
  return project(context.matrix(), head.w_o);  // [1, hidden]
}
// [/decode-step]

// The same layer in float64, written as plainly as the formula: out = softmax(q k^T / sqrt(d) + mask) v W_o^T.
std::vector<double> reference_layer(const Head& head, const Tensor& x) {
  const std::int64_t T = x.dim(0), hidden = x.dim(1), d = head.w_q.dim(0);
  const auto proj = [&](const Tensor& w, std::int64_t t, std::int64_t o) {
    double sum = 0.0;
    for (std::int64_t i = 0; i < hidden; ++i) sum += static_cast<double>(x.at({t, i})) * w.at({o, i});
    return sum;
  };
  std::vector<double> q(T * d), k(T * d), v(T * d), out(T * hidden, 0.0);
  for (std::int64_t t = 0; t < T; ++t)
    for (std::int64_t o = 0; o < d; ++o) {
      q[t * d + o] = proj(head.w_q, t, o);
      k[t * d + o] = proj(head.w_k, t, o);
      v[t * d + o] = proj(head.w_v, t, o);
    }
  for (std::int64_t i = 0; i < T; ++i) {
    std::vector<double> w(i + 1);
    double top = -std::numeric_limits<double>::infinity(), sum = 0.0;
    for (std::int64_t j = 0; j <= i; ++j) {
      double s = 0.0;
      for (std::int64_t c = 0; c < d; ++c) s += q[i * d + c] * k[j * d + c];
      top = std::max(top, w[j] = s / std::sqrt(static_cast<double>(d)));
    }
    for (double& x_j : w) sum += (x_j = std::exp(x_j - top));
    std::vector<double> context(d, 0.0);
    for (std::int64_t j = 0; j <= i; ++j)
      for (std::int64_t c = 0; c < d; ++c) context[c] += w[j] / sum * v[j * d + c];
    for (std::int64_t o = 0; o < hidden; ++o)
      for (std::int64_t c = 0; c < d; ++c) out[i * hidden + o] += context[c] * head.w_o.at({o, c});
  }
  return out;
}

// Where one head fails: a key that matches the query better than every other key by a fixed margin (a
// "needle") gets a weight of e^margin / (e^margin + T - 1) against T - 1 equally plausible keys, so its weight
// dilutes as the context grows. Measured here on random keys rather than assumed.
void print_dilution(af::Rng& rng, std::int64_t head_dim, af::BookNumbers& numbers) {
  fmt::print("\nDilution: weight on one matching key among T random keys (head_dim {}, score margin +4)\n", head_dim);
  fmt::print("  {:>8} {:>14} {:>16}\n", "T", "needle weight", "largest other");
  for (std::int64_t T : {16, 64, 256, 1024, 4096, 16384}) {
    const Tensor q = af::random_normal(Shape{1, head_dim}, rng, 1.0 / std::sqrt(static_cast<double>(head_dim)));
    Tensor k = af::random_normal(Shape{T, head_dim}, rng, 1.0 / std::sqrt(static_cast<double>(head_dim)));
    // The needle: the query direction, scaled so that its score is 4 above the typical random score.
    const auto needle = k.matrix().row(T / 2);
    double q_norm_sq = 0.0;
    for (float x : q.values()) q_norm_sq += static_cast<double>(x) * x;
    for (std::int64_t c = 0; c < head_dim; ++c)
      needle[c] = static_cast<float>(q.data()[c] * 4.0 * std::sqrt(static_cast<double>(head_dim)) / q_norm_sq);
    Tensor w = scores(q.matrix(), k.matrix());
    softmax_rows(w);
    float other = 0.0f;
    for (std::int64_t j = 0; j < T; ++j)
      if (j != T / 2) other = std::max(other, w.data()[j]);
    fmt::print("  {:>8} {:>14.4f} {:>16.4f}\n", T, w.data()[T / 2], other);
    if (T == 16) numbers.print("needle_weight_16", "{:.2f}", w.data()[T / 2]);
    if (T == 4096) numbers.print("needle_percent_4096", "{:.1f}", 100.0 * w.data()[T / 2]);
  }
}

void write_figure_data(const std::string& out_dir, const Tensor& weights, const af::CacheCard& head_card) {
  const std::filesystem::path dir = af::make_output_directory(out_dir);
  af::write_output_file(dir / "attention_weights.dat", [&](af::OutputFile& heat) {
    heat.print("# Causal attention weights of chapter 01's head: query key weight, a blank line after each query\n");
    for (std::int64_t i = 0; i < weights.dim(0); ++i) {
      for (std::int64_t j = 0; j < weights.dim(1); ++j) heat.print("{} {} {:.6f}\n", i, j, weights.at({i, j}));
      heat.print("\n");
    }
  });
  af::write_output_file(dir / "cache_growth.dat", [&](af::OutputFile& growth) {
    const af::ModelCache llama = af::dense_model("Llama-3.1-8B").cache();
    growth.print("# KV-cache bytes against cached tokens, from lib/accounting\n");
    growth.print("# tokens one_head_fp32_bytes llama31_8b_bf16_bytes\n");
    for (std::int64_t t = 1; t <= (1 << 17); t *= 2)
      growth.print("{} {} {}\n", t, head_card.bytes_stored(t), llama.layers * llama.card.bytes_stored(t));
  });
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Chapter 01: single-head attention, prefill and decode through a KV cache", "ch01_attention_core"};
  std::int64_t seq_len = 12, hidden = 64, head_dim = 16;
  std::uint64_t seed = 1;
  std::string out_dir;
  app.add_option("--seq-len", seq_len, "Tokens in the prompt")->check(CLI::Range(1, 2048))->capture_default_str();
  app.add_option("--hidden", hidden, "Model width (hidden size)")->check(CLI::Range(1, 8192))->capture_default_str();
  app.add_option("--head-dim", head_dim, "Head dimension d")->check(CLI::Range(1, 1024))->capture_default_str();
  app.add_option("--seed", seed, "Seed of the random inputs and weights")
      ->check(af::seed_value())
      ->capture_default_str();
  app.add_option("--out", out_dir,
                 "Directory for the figure data (attention_weights.dat, cache_growth.dat) and numbers.json")
      ->check(af::output_directory());

  return af::run_program(app, argc, argv, [&] {
    // The projections cost T x hidden x d, the attention T x T x d: each stays within seconds.
    af::require_product_within({{"--seq-len", seq_len}, {"--hidden", hidden}, {"--head-dim", head_dim}}, 1 << 25);
    af::require_product_within({{"--seq-len", seq_len}, {"--seq-len", seq_len}, {"--head-dim", head_dim}}, 1 << 26);
    af::Rng rng(seed);
    const Head head = random_head(rng, hidden, head_dim);
    const Tensor x = af::random_normal(Shape{seq_len, hidden}, rng);  // [T, hidden]

    fmt::print("Single-head attention: T = {} tokens, hidden = {}, head_dim = {}, seed {}\n", seq_len, hidden, head_dim,
               seed);
    fmt::print("  prefill: x [{0}, {1}] -> q, k, v [{0}, {2}] -> scores, weights [{0}, {0}] -> output [{0}, {1}]\n",
               seq_len, hidden, head_dim);
    fmt::print(
        "  decode step t: x_t [1, {0}] -> q_t, k_t, v_t [1, {1}] -> cache K, V [t + 1, {1}] -> output [1, {0}]\n\n",
        hidden, head_dim);

    // [run-both-paths]
    Tensor weights;
    const Tensor prefill_out = prefill(head, x.matrix(), &weights);  // [T, hidden]

    KvCache cache(seq_len, head_dim);
    Tensor decode_out(Shape{seq_len, hidden});
    for (std::int64_t t = 0; t < seq_len; ++t) {
      const Tensor y = decode_step(head, x.matrix().rows_slice(t, 1), cache);
      std::ranges::copy(y.values(), decode_out.data() + t * hidden);
    }
    // [/run-both-paths]

    // The library's cleaned version of the same layer, and the float64 reference.
    af::KvCache lib_cache(seq_len, head_dim, head_dim);
    const Tensor lib_out = af::single_head_attention(x.matrix(), {head.w_q, head.w_k, head.w_v, head.w_o, {}, {}, {}},
                                                     {.causal = true, .scale = std::nullopt}, lib_cache);
    const std::vector<double> reference = reference_layer(head, x);

    af::Checks checks;
    const double tolerance = af::scaled_tolerance(1e-5, af::max_abs(prefill_out.values()));
    checks.expect_close("prefill vs float64 reference", af::max_abs_diff(prefill_out.values(), reference), tolerance);
    checks.expect_close("decode through the KV cache vs prefill",
                        af::max_abs_diff(decode_out.values(), prefill_out.values()), tolerance);
    checks.expect_close("from scratch vs lib/ single_head_attention",
                        af::max_abs_diff(prefill_out.values(), lib_out.values()), tolerance);
    checks.expect_close("cached keys vs lib/ KvCache keys", af::max_abs_diff(cache.keys(), lib_cache.keys()),
                        tolerance);
    af::WorstError worst_row_sum;  // a NaN row is never close to one
    bool future_is_zero = true;
    for (std::int64_t i = 0; i < seq_len; ++i) {
      double sum = 0.0;
      for (std::int64_t j = 0; j < seq_len; ++j) {
        sum += weights.at({i, j});
        future_is_zero = future_is_zero && (j <= i || weights.at({i, j}) == 0.0f);
      }
      worst_row_sum.add_difference(sum, 1.0);
    }
    // Each float32 weight is an exponential over a float32 sum of T of them: a row's sum is off by about T unit
    // roundoffs at worst, so the tolerance grows with T (T x epsilon, never below 1e-6).
    const double row_sum_tolerance =
        std::max(1e-6, static_cast<double>(seq_len) * std::numeric_limits<float>::epsilon());
    checks.expect_close("every row of weights sums to one", worst_row_sum.value(), row_sum_tolerance);
    checks.expect_true("no weight on a future token", future_is_zero);

    const std::int64_t shown = std::min<std::int64_t>(seq_len, 8);
    fmt::print("\nAttention weights of the prefill, first {} queries x {} keys (rows: queries)\n", shown, shown);
    for (std::int64_t i = 0; i < shown; ++i) {
      fmt::print("  q{:<3}", i);
      for (std::int64_t j = 0; j < shown; ++j) fmt::print(" {:5.3f}", weights.at({i, j}));
      fmt::print("\n");
    }

    // [cache-card]
    const af::CacheCard card =
        af::dense_kv_card("single-head attention (this program's head)", 1, 1, head_dim, af::DType::f32);
    const std::vector<af::ModelCache> models = {af::dense_model("Llama-3.1-8B").cache()};
    const std::vector<std::int64_t> contexts = {seq_len, 4096, 131072};
    fmt::print("\n{}", af::format_cache_card(card, models, contexts));
    // [/cache-card]

    af::BookNumbers numbers;
    print_dilution(rng, head_dim, numbers);
    if (!out_dir.empty()) {
      write_figure_data(out_dir, weights, card);
      numbers.write(out_dir);
    }
    return checks.all_passed();
  });
}
