// Chapter 05 — the KV cache as memory: pre-allocated, paged, shared, quantized and batched.
//
// Builds from scratch a pre-allocated cache (and what its reserved capacity costs), a paged cache (a page
// pool with a free list, a block table per sequence, decode attention through the block table), INT8 with
// scales per token or per channel, and FP8 E4M3 rounding; checks each against the library (af::PagedKvCache,
// af::quantize_rows, af::e4m3_bits) and float64; shares a prompt's pages between sequences; runs continuous
// batching with ragged steps and checks every sequence against decoding it alone; measures the attention
// error of each cache format on random keys and on keys with outlier channels; prints the cache card and
// writes the data of the chapter's figures.
//
//   build/bin/ch05_kv_cache [--seq-len 24] [--page-size 4] [--hidden 64] [--heads 8] [--kv-heads 2]
//                           [--seed 5] [--out DIR]
//
// Exit status: 0 when every check passes, 1 when one fails, 2 for a bad flag.

#include "af/accounting.hpp"
#include "af/error.hpp"
#include "af/grouped_attention.hpp"
#include "af/linalg.hpp"
#include "af/models.hpp"
#include "af/paged_cache.hpp"
#include "af/program.hpp"
#include "af/quantized_cache.hpp"
#include "af/random.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <limits>
#include <numeric>
#include <span>
#include <string>
#include <vector>

namespace {

using af::ConstMatrix;
using af::Shape;
using af::Tensor;

// [preallocated-cache]
// Capacity is fixed when the sequence starts: K and V [capacity, G * d] are allocated once, and appending a
// token copies two rows and never allocates. A sequence that stops after n tokens leaves capacity - n rows
// reserved for nothing.
struct PreallocatedCache {
  std::int64_t capacity, width;     // width = G * d values per token, for K and for V each
  std::vector<float> keys, values;  // [capacity, G * d]
  std::int64_t length = 0;

  PreallocatedCache(std::int64_t capacity, std::int64_t width)
      : capacity(capacity), width(width), keys(capacity * width), values(capacity * width) {}

  void append(std::span<const float> k, std::span<const float> v) {
    af::require(length < capacity, "PreallocatedCache: token {} does not fit in a capacity of {}", length + 1,
                capacity);
    std::ranges::copy(k, keys.begin() + length * width);
    std::ranges::copy(v, values.begin() + length * width);
    ++length;
  }
};
// [/preallocated-cache]

// [page-pool]
// The pool: `pages` pages of `page_size` token slots each, K and V [pages, page_size, G * d], and a free list
// of the pages nobody uses. A sequence owns a block table, the numbers of its pages in token order.
struct PagePool {
  std::int64_t page_size, width;
  std::vector<float> keys, values;
  std::vector<std::int64_t> free;  // taken from the back

  PagePool(std::int64_t pages, std::int64_t page_size, std::int64_t width)
      : page_size(page_size), width(width), keys(pages * page_size * width), values(pages * page_size * width) {
    for (std::int64_t p = pages - 1; p >= 0; --p) free.push_back(p);
  }
};

struct PagedSequence {
  std::vector<std::int64_t> block_table;
  std::int64_t length = 0;
};
// [/page-pool]

// [paged-append]
// A token goes to slot length % page_size of the sequence's last page; the first token of a page takes a new
// page from the free list. Nothing else is ever allocated.
void append_token(PagePool& pool, PagedSequence& seq, std::span<const float> k, std::span<const float> v) {
  const std::int64_t slot = seq.length % pool.page_size;
  if (slot == 0) {
    af::require(!pool.free.empty(), "PagePool: no free page for token {} (expected more pages)", seq.length);
    seq.block_table.push_back(pool.free.back());
    pool.free.pop_back();
  }
  const std::int64_t offset = (seq.block_table.back() * pool.page_size + slot) * pool.width;
  std::ranges::copy(k, pool.keys.begin() + offset);
  std::ranges::copy(v, pool.values.begin() + offset);
  ++seq.length;
}
// [/paged-append]

// [paged-lookup]
// Where token j of a sequence lives: page block_table[j / page_size], slot j % page_size.
std::int64_t row_of(const PagePool& pool, const PagedSequence& seq, std::int64_t j) {
  return (seq.block_table[static_cast<std::size_t>(j / pool.page_size)] * pool.page_size + j % pool.page_size) *
         pool.width;
}
// [/paged-lookup]

// [paged-decode]
// One decode query q [H * d] over a paged sequence: query head h scores every cached key of its KV head
// h / (H / G), found through the block table, and mixes the values with the softmax weights.
std::vector<float> paged_decode(const PagePool& pool, const PagedSequence& seq, std::span<const float> q,
                                std::int64_t heads, std::int64_t kv_heads, std::int64_t d) {
  std::vector<float> out(static_cast<std::size_t>(heads * d), 0.0f), weights(static_cast<std::size_t>(seq.length));
  for (std::int64_t h = 0; h < heads; ++h) {
    const std::int64_t g = h / (heads / kv_heads);
    const std::span<const float> q_h = q.subspan(static_cast<std::size_t>(h * d), static_cast<std::size_t>(d));
    for (std::int64_t j = 0; j < seq.length; ++j)
      weights[static_cast<std::size_t>(j)] =
          af::dot(q_h, std::span(pool.keys).subspan(static_cast<std::size_t>(row_of(pool, seq, j) + g * d),
                                                    static_cast<std::size_t>(d))) /
          std::sqrt(static_cast<float>(d));
    af::softmax(weights);
    for (std::int64_t j = 0; j < seq.length; ++j)
      for (std::int64_t c = 0; c < d; ++c)
        out[static_cast<std::size_t>(h * d + c)] +=
            weights[static_cast<std::size_t>(j)] *
            pool.values[static_cast<std::size_t>(row_of(pool, seq, j) + g * d + c)];
  }
  return out;
}
// [/paged-decode]

// [int8-per-token]
// INT8, one scale per token and KV head: the head's d values share scale = max|x| / 127, and each is stored as
// round(x / scale) in [-127, 127]. Values that a cache writes once and never sees again can be scaled this
// way on the fly; the cost is 4 bytes of scale per d bytes of codes.
std::vector<float> int8_per_token(std::span<const float> head) {
  float amax = 0.0f;
  for (float x : head) amax = std::max(amax, std::abs(x));
  const float scale = amax > 0.0f ? amax / 127.0f : 1.0f;
  std::vector<float> read_back;
  for (float x : head) read_back.push_back(std::clamp(std::nearbyint(x / scale), -127.0f, 127.0f) * scale);
  return read_back;
}
// [/int8-per-token]

// [int8-per-channel]
// INT8, one scale per channel for a block of tokens: channel c of the block's keys shares max|k_c| / 127.
// Keys have channels of consistently large magnitude; a per-token scale lets them set the step of every other
// channel of the token, a per-channel scale confines them to their own channel.
std::vector<float> int8_per_channel(ConstMatrix block) {  // [tokens, channels]
  std::vector<float> read_back(static_cast<std::size_t>(block.rows * block.cols));
  for (std::int64_t c = 0; c < block.cols; ++c) {
    float amax = 0.0f;
    for (std::int64_t t = 0; t < block.rows; ++t) amax = std::max(amax, std::abs(block(t, c)));
    const float scale = amax > 0.0f ? amax / 127.0f : 1.0f;
    for (std::int64_t t = 0; t < block.rows; ++t)
      read_back[static_cast<std::size_t>(t * block.cols + c)] =
          std::clamp(std::nearbyint(block(t, c) / scale), -127.0f, 127.0f) * scale;
  }
  return read_back;
}
// [/int8-per-channel]

// [e4m3]
// FP8 E4M3: sign, 4 exponent bits (bias 7), 3 mantissa bits. Normal values are (1 + m/8) 2^(e-7), e = 1..15;
// e = 0 holds the subnormals m/8 2^-6; S.1111.111 is NaN and there is no infinity, so the largest value is
// 1.75 x 2^8 = 448. Rounding: find the spacing of the values around |x| (2^(E-3) in the binade [2^E, 2^(E+1)),
// 2^-9 below 2^-6), round |x| to a multiple of it (ties to even), then read off the fields.
std::uint8_t to_e4m3(float x) {
  const std::uint8_t sign = std::signbit(x) ? 0x80 : 0x00;
  if (std::isnan(x)) return sign | 0x7F;
  const double a = std::abs(static_cast<double>(x));
  if (a >= 448.0) return sign | 0x7E;  // saturate
  int e = 0;
  (void)std::frexp(a, &e);  // a = f 2^e with f in [0.5, 1): the binade is [2^(e-1), 2^e)
  const double spacing = e - 1 < -6 ? std::ldexp(1.0, -9) : std::ldexp(1.0, e - 1 - 3);
  const double rounded = std::nearbyint(a / spacing) * spacing;  // ties to even multiple
  if (rounded < std::ldexp(1.0, -6)) return sign | static_cast<std::uint8_t>(rounded / std::ldexp(1.0, -9));
  (void)std::frexp(rounded, &e);
  const int mantissa = static_cast<int>(std::ldexp(rounded, 4 - e)) - 8;  // rounded / 2^(e-1) = 1 + m / 8
  return sign | static_cast<std::uint8_t>(((e - 1 + 7) << 3) | mantissa);
}
// [/e4m3]

double relative_error(std::span<const float> got, std::span<const float> want) {
  double num = 0.0, den = 0.0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    num += (double{got[i]} - want[i]) * (double{got[i]} - want[i]);
    den += double{want[i]} * want[i];
  }
  return std::sqrt(num / den);
}

// Decode attention of q [H * d] over keys and values [T, G * d] in float64.
std::vector<double> reference_decode(std::span<const float> q, ConstMatrix k, ConstMatrix v, std::int64_t heads,
                                     std::int64_t kv_heads, std::int64_t d) {
  std::vector<double> out(static_cast<std::size_t>(heads * d), 0.0);
  for (std::int64_t h = 0; h < heads; ++h) {
    const std::int64_t g = h * kv_heads / heads;
    std::vector<double> s(static_cast<std::size_t>(k.rows));
    double top = -1e300, sum = 0.0;
    for (std::int64_t j = 0; j < k.rows; ++j) {
      double dot = 0.0;
      for (std::int64_t c = 0; c < d; ++c) dot += double{q[static_cast<std::size_t>(h * d + c)]} * k(j, g * d + c);
      top = std::max(top, s[static_cast<std::size_t>(j)] = dot / std::sqrt(double(d)));
    }
    for (double& e : s) sum += (e = std::exp(e - top));
    for (std::int64_t j = 0; j < k.rows; ++j)
      for (std::int64_t c = 0; c < d; ++c)
        out[static_cast<std::size_t>(h * d + c)] += s[static_cast<std::size_t>(j)] / sum * v(j, g * d + c);
  }
  return out;
}

// The decode output of queries q [Tq, H * d] over keys and values stored in `format` and read back.
Tensor attend_stored(ConstMatrix q, ConstMatrix k, ConstMatrix v, const af::GroupedShape& shape, af::KvFormat keys,
                     af::KvFormat values) {
  af::GroupedKvCache cache(k.rows, shape.kv_heads, shape.head_dim);
  const Tensor k_read = af::dequantize_rows(af::quantize_rows(k, shape.kv_heads, keys));
  const Tensor v_read = af::dequantize_rows(af::quantize_rows(v, shape.kv_heads, values));
  cache.append(k_read.matrix(), v_read.matrix());
  af::AttentionOptions options;
  options.causal = false;  // every query sees the whole context, as a decode step does
  return af::grouped_attend(q, shape, cache, options);
}

struct Format {
  const char* name;
  af::KvFormat keys, values;
};
const std::vector<Format> formats = {{"bf16", af::KvFormat::bf16, af::KvFormat::bf16},
                                     {"int8/token", af::KvFormat::int8_token, af::KvFormat::int8_token},
                                     {"int8/channel K", af::KvFormat::int8_channel, af::KvFormat::int8_token},
                                     {"fp8 e4m3/token", af::KvFormat::fp8_token, af::KvFormat::fp8_token}};

// Keys [T, G * d] with `outliers` channels per head scaled by `magnitude` (the rest standard normal).
Tensor keys_with_outliers(af::Rng& rng, std::int64_t T, const af::GroupedShape& s, std::int64_t outliers,
                          double magnitude) {
  Tensor k = af::random_normal(Shape{T, s.kv_heads * s.head_dim}, rng);
  for (std::int64_t t = 0; t < T; ++t)
    for (std::int64_t g = 0; g < s.kv_heads; ++g)
      for (std::int64_t c = 0; c < outliers; ++c)
        k.at({t, g * s.head_dim + (1 + c * s.head_dim / outliers) % s.head_dim}) *= static_cast<float>(magnitude);
  return k;
}

struct Request {
  std::int64_t prompt, generate;
  Tensor q, k, v;  // the rows the request feeds: its prompt, then each generated token but the last
  std::int64_t seq = -1, fed = 0;
  std::vector<Tensor> outputs;  // what each step gave it

  std::int64_t rows() const { return prompt + generate - 1; }
  bool running() const { return seq >= 0 && fed < rows(); }
};

// The rows that the running requests feed a step, stacked in their order: [sum of tokens, width].
Tensor stack_rows(const std::vector<Request*>& running, std::span<const std::int64_t> tokens, Tensor Request::*rows) {
  Tensor stacked(
      Shape{std::accumulate(tokens.begin(), tokens.end(), std::int64_t{0}), (running.front()->*rows).dim(1)});
  std::int64_t row = 0;
  for (std::size_t i = 0; i < running.size(); ++i)
    for (std::int64_t t = 0; t < tokens[i]; ++t, ++row)
      std::ranges::copy((running[i]->*rows).matrix().row(running[i]->fed + t), stacked.matrix().row(row).begin());
  return stacked;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Chapter 05: the KV cache as memory: pre-allocated, paged, shared, quantized, batched", "ch05_kv_cache"};
  std::int64_t seq_len = 24, page_size = 4, hidden = 64, heads = 8, kv_heads = 2;
  std::uint64_t seed = 5;
  std::string out_dir;
  app.add_option("--seq-len", seq_len, "Tokens in the checked sequences")
      ->check(CLI::Range(1, 256))
      ->capture_default_str();
  app.add_option("--page-size", page_size, "Tokens per page")->check(CLI::Range(1, 1024))->capture_default_str();
  app.add_option("--hidden", hidden, "Model width")->check(CLI::Range(1, 256))->capture_default_str();
  app.add_option("--heads", heads, "Query heads H (must divide --hidden)")
      ->check(CLI::Range(1, 256))
      ->capture_default_str();
  app.add_option("--kv-heads", kv_heads, "KV heads G (must divide --heads)")
      ->check(CLI::Range(1, 256))
      ->capture_default_str();
  app.add_option("--seed", seed, "Seed of the random inputs")->check(af::seed_value())->capture_default_str();
  app.add_option("--out", out_dir, "Directory for the figure data and numbers.json")->check(af::output_directory());

  return af::run_program(app, argc, argv, [&] {
    // The projections cost T x hidden x hidden, the attention T x T x hidden, for each of the caches compared:
    // each stays within seconds.
    af::require_product_within({{"--seq-len", seq_len}, {"--hidden", hidden}, {"--hidden", hidden}}, 1 << 22);
    af::require_product_within({{"--seq-len", seq_len}, {"--seq-len", seq_len}, {"--hidden", hidden}}, 1 << 22);
    af::require(hidden % heads == 0, "--hidden {} is not divisible by --heads {} (expected hidden = heads x head_dim)",
                hidden, heads);
    af::require(heads % kv_heads == 0, "--heads {} is not divisible by --kv-heads {} (expected whole groups)", heads,
                kv_heads);
    const std::int64_t d = hidden / heads, width = kv_heads * d;
    const af::GroupedShape shape{hidden, heads, kv_heads, d};
    af::Rng rng(seed);
    af::Checks checks;
    af::BookNumbers numbers;

    // The whole-model caches the text derives by hand, from the library's accounting (bf16).
    const auto cache_of = [](const char* name) { return af::model_preset(name).cache(af::DType::bf16); };
    const auto bytes_text = [](std::int64_t bytes) { return af::human_bytes(static_cast<double>(bytes)); };
    numbers.set("llama_8b_bytes_per_token", af::with_thousands(cache_of("Llama-3.1-8B").bytes_per_token()));
    numbers.set("llama_8b_cache_128k", bytes_text(cache_of("Llama-3.1-8B").bytes_stored(131072)));
    numbers.set("deepseek_v3_bytes_per_token", af::with_thousands(cache_of("DeepSeek-V3").bytes_per_token()));
    numbers.set("deepseek_v3_cache_128k", bytes_text(cache_of("DeepSeek-V3").bytes_stored(131072)));
    numbers.set("mistral_7b_cache_cap", bytes_text(cache_of("Mistral-7B").bytes_stored(1048576)));
    numbers.set("deepseek_v3_tp8_bytes_per_gpu",
                af::with_thousands(cache_of("DeepSeek-V3").bytes_per_token_per_gpu(8)));
    numbers.set("llama_70b_tp8_bytes_per_gpu",
                af::with_thousands(cache_of("Llama-3.1-70B").bytes_per_token_per_gpu(8)));
    fmt::print(
        "KV cache: H = {} query heads on G = {} KV heads of d = {}; K and V [t, {}, {}] per layer; pages of {} "
        "tokens\n",
        heads, kv_heads, d, kv_heads, d, page_size);
    fmt::print(
        "  decode: q [{}, {}] against the cached K, V of every earlier token, each read through a block table\n\n",
        heads, d);

    // --- Paged against contiguous: three sequences written token by token, interleaved in one pool.
    const std::vector<std::int64_t> lengths = {seq_len, std::max<std::int64_t>(1, seq_len / 2 + 1), 2 * seq_len - 1};
    std::int64_t pages_needed = 0;
    for (std::int64_t n : lengths) pages_needed += (n + page_size - 1) / page_size;
    PagePool pool(pages_needed, page_size, width);
    af::PagedKvCache lib_cache(pages_needed, page_size, kv_heads, d);
    std::vector<PagedSequence> seqs(lengths.size());
    std::vector<std::int64_t> lib_seqs;
    std::vector<Tensor> ks, vs;
    for (std::int64_t n : lengths) {
      ks.push_back(af::random_normal(Shape{n, width}, rng));
      vs.push_back(af::random_normal(Shape{n, width}, rng));
      lib_seqs.push_back(lib_cache.add_sequence());
    }
    for (std::int64_t t = 0; t < *std::ranges::max_element(lengths); ++t)
      for (std::size_t i = 0; i < lengths.size(); ++i)
        if (t < lengths[i]) {
          append_token(pool, seqs[i], ks[i].matrix().row(t), vs[i].matrix().row(t));
          lib_cache.append(lib_seqs[i], ks[i].matrix().rows_slice(t, 1), vs[i].matrix().rows_slice(t, 1));
        }
    double worst_ref = 0.0, worst_lib = 0.0, worst_contiguous = 0.0, top = 1.0;
    for (std::size_t i = 0; i < lengths.size(); ++i) {
      const Tensor q = af::random_normal(Shape{1, heads * d}, rng);
      const std::vector<float> got = paged_decode(pool, seqs[i], q.values(), heads, kv_heads, d);
      af::GroupedKvCache contiguous(lengths[i], kv_heads, d);
      contiguous.append(ks[i].matrix(), vs[i].matrix());
      const Tensor lib = af::paged_attend(q.matrix(), shape, lib_cache, lib_seqs[i], {});
      const Tensor want = af::grouped_attend(q.matrix(), shape, contiguous, {});
      worst_ref = af::worse(worst_ref, af::max_abs_diff(got, reference_decode(q.values(), ks[i].matrix(),
                                                                              vs[i].matrix(), heads, kv_heads, d)));
      worst_lib = af::worse(worst_lib, af::max_abs_diff(got, lib.values()));
      worst_contiguous = af::worse(worst_contiguous, af::max_abs_diff(lib.values(), want.values()));
      top = af::worse(top, af::max_abs(want.values()));
    }
    fmt::print("Paged: {} sequences of {} tokens in {} pages of {}; block tables:\n ", lengths.size(),
               fmt::join(lengths, ", "), pages_needed, page_size);
    for (const PagedSequence& s : seqs) fmt::print(" [{}]", fmt::join(s.block_table, " "));
    fmt::print("\n");
    checks.expect_close("paged decode vs float64", worst_ref, 1e-5 * top);
    checks.expect_close("paged decode vs lib paged_attend", worst_lib, 1e-5 * top);
    checks.expect_close("lib paged_attend vs contiguous (exact)", worst_contiguous, 0.0);
    checks.expect_true("every page in use, none left free", pool.free.empty() && lib_cache.free_pages() == 0);

    // [capacity-cost]
    // 64 requests whose lengths are uniform in [1, 4096]: a pre-allocated cache reserves 4096 tokens for each;
    // a paged cache reserves whole pages, wasting only the unused slots of each sequence's last page.
    const std::int64_t requests = 64, max_len = 4096;
    std::int64_t used = 0, paged_slots = 0;
    for (std::int64_t r = 0; r < requests; ++r) {
      const std::int64_t n = 1 + rng.below(max_len);
      used += n;
      paged_slots += (n + 15) / 16 * 16;
    }
    const std::int64_t reserved = requests * max_len;
    // [/capacity-cost]
    {
      PreallocatedCache one(seq_len, width);
      for (std::int64_t t = 0; t < seq_len; ++t) one.append(ks[0].matrix().row(t), vs[0].matrix().row(t));
      bool threw = false;
      try {
        one.append(ks[0].matrix().row(0), vs[0].matrix().row(0));
      } catch (const af::Error&) {
        threw = true;
      }
      checks.expect_true("pre-allocated cache refuses token capacity + 1", threw);
    }
    fmt::print("\nCapacity: {} requests, lengths uniform in [1, {}], {} tokens in all\n", requests, max_len, used);
    fmt::print("  pre-allocated for {} tokens each: {} token slots, {:.1f}% of them used\n", max_len, reserved,
               100.0 * static_cast<double>(used) / static_cast<double>(reserved));
    fmt::print("  paged, 16 tokens per page:      {} token slots, {:.1f}% of them used\n", paged_slots,
               100.0 * static_cast<double>(used) / static_cast<double>(paged_slots));
    numbers.print("preallocated_used_percent", "{:.1f}",
                  100.0 * static_cast<double>(used) / static_cast<double>(reserved));
    numbers.print("paged_used_percent", "{:.1f}", 100.0 * static_cast<double>(used) / static_cast<double>(paged_slots));
    const af::ModelCache llama = af::model_preset("Llama-3.1-8B").cache(af::DType::bf16);
    fmt::print("  for Llama-3.1-8B in bf16 ({} B per token): {} reserved, {} paged, {} used\n", llama.bytes_per_token(),
               af::human_bytes(static_cast<double>(reserved * llama.bytes_per_token())),
               af::human_bytes(static_cast<double>(paged_slots * llama.bytes_per_token())),
               af::human_bytes(static_cast<double>(used * llama.bytes_per_token())));

    // [prefix-sharing]
    // Eight sequences continue one prompt: each forks the prompt's sequence, sharing its pages, and appends its
    // own tokens; the prompt's partial last page is copied on the first write to it.
    const std::int64_t prompt = 2 * seq_len + 1, branches = 8, own = seq_len / 2 + 1;
    const std::int64_t pages_alone = branches * ((prompt + own + page_size - 1) / page_size);
    af::PagedKvCache shared(pages_alone, page_size, kv_heads, d);
    const Tensor prompt_k = af::random_normal(Shape{prompt, width}, rng),
                 prompt_v = af::random_normal(Shape{prompt, width}, rng);
    const std::int64_t root = shared.add_sequence();
    shared.append(root, prompt_k.matrix(), prompt_v.matrix());
    std::vector<std::int64_t> children;
    for (std::int64_t b = 0; b < branches; ++b) children.push_back(shared.fork(root));
    shared.release(root);
    // [/prefix-sharing]
    double worst_fork = 0.0;
    for (std::int64_t child : children) {
      const Tensor k = af::random_normal(Shape{own, width}, rng), v = af::random_normal(Shape{own, width}, rng);
      shared.append(child, k.matrix(), v.matrix());
      af::GroupedKvCache alone(prompt + own, kv_heads, d);
      alone.append(prompt_k.matrix(), prompt_v.matrix());
      alone.append(k.matrix(), v.matrix());
      const Tensor q = af::random_normal(Shape{1, heads * d}, rng);
      worst_fork =
          af::worse(worst_fork, af::max_abs_diff(af::paged_attend(q.matrix(), shape, shared, child, {}).values(),
                                                 af::grouped_attend(q.matrix(), shape, alone, {}).values()));
    }
    fmt::print("\nPrefix sharing: {} sequences continue one prompt of {} tokens with {} tokens each\n", branches,
               prompt, own);
    fmt::print("  pages without sharing: {}; with sharing: {} ({} shared by all, the rest each sequence's own)\n",
               pages_alone, shared.used_pages(), prompt / page_size);
    checks.expect_close("forked sequences vs each alone (exact)", worst_fork, 0.0);

    // --- Quantization: from scratch against the library.
    bool e4m3_same = true;
    for (int c = 0; c < 256; ++c) {
      const float x = af::e4m3_to_float(static_cast<std::uint8_t>(c));
      if (!std::isnan(x)) e4m3_same = e4m3_same && to_e4m3(x) == c;
    }
    for (int i = 0; i < 100000; ++i) {
      const auto x = static_cast<float>(std::ldexp(rng.uniform(-1.0, 1.0), static_cast<int>(rng.below(24)) - 12));
      e4m3_same = e4m3_same && to_e4m3(x) == af::e4m3_bits(x);
    }
    const Tensor sample = keys_with_outliers(rng, 64, shape, 2, 20.0);
    const Tensor lib_token =
        af::dequantize_rows(af::quantize_rows(sample.matrix(), kv_heads, af::KvFormat::int8_token));
    const Tensor lib_channel =
        af::dequantize_rows(af::quantize_rows(sample.matrix(), kv_heads, af::KvFormat::int8_channel, 32));
    double worst_token = 0.0, worst_channel = 0.0;
    for (std::int64_t t = 0; t < 64; ++t)
      for (std::int64_t g = 0; g < kv_heads; ++g) {
        const std::vector<float> mine = int8_per_token(
            sample.matrix().row(t).subspan(static_cast<std::size_t>(g * d), static_cast<std::size_t>(d)));
        worst_token = af::worse(
            worst_token, af::max_abs_diff(mine, lib_token.matrix().row(t).subspan(static_cast<std::size_t>(g * d),
                                                                                  static_cast<std::size_t>(d))));
      }
    for (std::int64_t b = 0; b < 2; ++b) {
      const std::vector<float> mine = int8_per_channel(sample.matrix().rows_slice(b * 32, 32));
      worst_channel = af::worse(
          worst_channel, af::max_abs_diff(mine, lib_channel.values().subspan(static_cast<std::size_t>(b * 32 * width),
                                                                             static_cast<std::size_t>(32 * width))));
    }
    fmt::print("\n");
    checks.expect_true("E4M3 from scratch == lib (256 codes, 1e5 values)", e4m3_same);
    checks.expect_close("INT8 per token from scratch vs lib (exact)", worst_token, 0.0);
    checks.expect_close("INT8 per channel from scratch vs lib (exact)", worst_channel, 0.0);

    // [quantization-error]
    // Decode queries over 512 cached tokens stored in each format; the error of the output against the float32
    // cache, for random keys and for keys whose 2 outlier channels per head are `magnitude` times larger.
    const std::int64_t context = 512, queries = 16;
    const af::GroupedShape qshape{1024, 8, 2, 128};  // heads of 128 as in the models above, whatever the flags
    const std::vector<double> magnitudes = {1.0, 4.0, 16.0, 64.0};
    std::vector<std::vector<double>> errors(formats.size(), std::vector<double>(magnitudes.size()));
    std::vector<double> errors_vs_bf16(formats.size());
    for (std::size_t m = 0; m < magnitudes.size(); ++m) {
      const Tensor k = keys_with_outliers(rng, context, qshape, magnitudes[m] > 1.0 ? 2 : 0, magnitudes[m]);
      const Tensor v = af::random_normal(Shape{context, qshape.kv_heads * qshape.head_dim}, rng);
      // Queries scaled so that the scores keep the same spread whatever the outliers.
      const Tensor q =
          af::random_normal(Shape{queries, qshape.heads * qshape.head_dim}, rng,
                            1.0 / std::sqrt(1.0 + 2.0 * magnitudes[m] * magnitudes[m] / double(qshape.head_dim)));
      const Tensor exact =
          attend_stored(q.matrix(), k.matrix(), v.matrix(), qshape, af::KvFormat::f32, af::KvFormat::f32);
      const Tensor bf16 =
          attend_stored(q.matrix(), k.matrix(), v.matrix(), qshape, af::KvFormat::bf16, af::KvFormat::bf16);
      for (std::size_t f = 0; f < formats.size(); ++f) {
        const Tensor got =
            attend_stored(q.matrix(), k.matrix(), v.matrix(), qshape, formats[f].keys, formats[f].values);
        errors[f][m] = relative_error(got.values(), exact.values());
        if (m == 0) errors_vs_bf16[f] = relative_error(got.values(), bf16.values());
      }
    }
    // [/quantization-error]
    fmt::print("\nQuantized caches: relative error of the attention output against the float32 cache\n");
    fmt::print(
        "  ({} cached tokens, {} decode queries, H = {}, G = {}, d = {}; keys with 2 outlier channels per head of\n"
        "  magnitude m)\n",
        context, queries, qshape.heads, qshape.kv_heads, qshape.head_dim);
    fmt::print("  {:<16} {:>12} {:>10}", "format", "bytes/token", "vs bf16");
    for (double m : magnitudes) fmt::print(" {:>9}", m == 1.0 ? std::string("random") : fmt::format("m = {:g}", m));
    fmt::print("\n");
    std::vector<std::int64_t> format_bytes;
    for (std::size_t f = 0; f < formats.size(); ++f) {
      // Llama-3.1-8B's layer, 8 KV heads of 128, whole model of 32 layers; scales counted.
      format_bytes.push_back(32 *
                             af::quantized_kv_card(32, 8, 128, formats[f].keys, formats[f].values).bytes_per_token());
      fmt::print("  {:<16} {:>12} {:>10.2e}", formats[f].name, format_bytes.back(), errors_vs_bf16[f]);
      for (double e : errors[f]) fmt::print(" {:>9.2e}", e);
      fmt::print("\n");
    }
    fmt::print("  (bytes/token: Llama-3.1-8B's 32 layers of 8 KV heads x 128, scales included; f32 is {})\n",
               32 * af::quantized_kv_card(32, 8, 128, af::KvFormat::f32, af::KvFormat::f32).bytes_per_token());
    checks.expect_true("per-channel keys beat per-token at m = 64", errors[2].back() < errors[1].back());

    std::vector<Request> reqs;
    for (int r = 0; r < 12; ++r) {
      Request req{1 + rng.below(2 * seq_len), 1 + rng.below(seq_len), {}, {}, {}, -1, 0, {}};
      req.q = af::random_normal(Shape{req.rows(), heads * d}, rng);
      req.k = af::random_normal(Shape{req.rows(), width}, rng);
      req.v = af::random_normal(Shape{req.rows(), width}, rng);
      reqs.push_back(std::move(req));
    }
    const auto pages_for = [&](const Request& r) { return (r.rows() + page_size - 1) / page_size; };
    std::int64_t pool_pages = 0;
    for (const Request& r : reqs) pool_pages = std::max(pool_pages, 3 * pages_for(r));  // about three at a time
    af::PagedKvCache batch_cache(pool_pages, page_size, kv_heads, d);
    fmt::print("\nContinuous batching: 12 requests, a pool of {} pages of {} tokens\n", pool_pages, page_size);
    fmt::print("  {:>4} {:>8} {:>7} {:>10}   rows per sequence in the step\n", "step", "running", "tokens",
               "pages used");
    std::size_t next = 0;
    std::int64_t reserved_pages = 0, steps = 0, finished = 0, peak = 0;
    const auto log_step = [&](std::int64_t step, const std::vector<std::int64_t>& tokens) {
      peak = std::max(peak, batch_cache.used_pages());
      if (step < 8 || tokens.size() == 1)
        fmt::print("  {:>4} {:>8} {:>7} {:>10}   {}\n", step, tokens.size(),
                   std::accumulate(tokens.begin(), tokens.end(), std::int64_t{0}), batch_cache.used_pages(),
                   fmt::join(tokens, " "));
    };
    // [continuous-batching]
    // Twelve requests with different prompt and output lengths share one page pool. Each step admits waiting
    // requests while the pages of their whole output fit, runs one ragged step (the whole prompt of a request
    // that joins, one token of each request that decodes) and releases the pages of the requests that finish.
    while (finished < static_cast<std::int64_t>(reqs.size())) {
      for (; next < reqs.size() && reserved_pages + pages_for(reqs[next]) <= pool_pages; ++next) {
        reqs[next].seq = batch_cache.add_sequence();
        reserved_pages += pages_for(reqs[next]);
      }
      std::vector<Request*> running;
      std::vector<std::int64_t> seqs, tokens;
      for (Request& r : reqs)
        if (r.running()) running.push_back(&r), seqs.push_back(r.seq), tokens.push_back(r.fed == 0 ? r.prompt : 1);
      const Tensor q = stack_rows(running, tokens, &Request::q), k = stack_rows(running, tokens, &Request::k),
                   v = stack_rows(running, tokens, &Request::v);
      const Tensor out =
          af::ragged_batch_step(q.matrix(), k.matrix(), v.matrix(), shape, batch_cache, seqs, tokens, {});
      log_step(steps, tokens);
      std::int64_t row = 0;
      for (std::size_t i = 0; i < running.size(); row += tokens[i], ++i) {
        Request& r = *running[i];
        r.outputs.push_back(af::to_tensor(out.matrix().rows_slice(row, tokens[i])));
        r.fed += tokens[i];
        if (r.fed == r.rows()) {  // its last token is generated: its pages go back to the free list
          batch_cache.release(r.seq);
          reserved_pages -= pages_for(r);
          ++finished;
        }
      }
      ++steps;
    }
    // [/continuous-batching]
    double worst_batch = 0.0;
    for (const Request& r : reqs) {
      af::GroupedKvCache alone(r.rows(), kv_heads, d);
      std::int64_t fed = 0;
      for (const Tensor& got : r.outputs) {
        const std::int64_t n = got.dim(0);
        alone.append(r.k.matrix().rows_slice(fed, n), r.v.matrix().rows_slice(fed, n));
        const Tensor want = af::grouped_attend(r.q.matrix().rows_slice(fed, n), shape, alone, {});
        worst_batch = af::worse(worst_batch, af::max_abs_diff(got.values(), want.values()));
        fed += n;
      }
    }
    fmt::print("  {} steps, at most {} of {} pages in use\n", steps, peak, pool_pages);
    checks.expect_close("batched steps vs each request alone (exact)", worst_batch, 0.0);
    checks.expect_true("every page back on the free list", batch_cache.free_pages() == pool_pages);

    // [cache-card]
    af::CacheCard card = af::quantized_kv_card(heads, kv_heads, d, af::KvFormat::int8_channel, af::KvFormat::int8_token,
                                               std::min<std::int64_t>(d, 32));
    card.mechanism = "KV cache with INT8 keys (per-channel scales) and values (per-token scales)";
    card.trade_offs = fmt::format(
        "{} bytes per token and layer stored and read, scales included, against {} in bf16; an error in every score "
        "and output that grows with outlier channels; paging adds a block-table lookup per page read, and sharing "
        "pages needs reference counts and copy on write",
        card.bytes_per_token(), af::dense_kv_card("", heads, kv_heads, d, af::DType::bf16).bytes_per_token());
    // The same INT8 formats applied to real models' grouped layers (hypothetically: both ship a bf16 cache).
    std::vector<af::ModelCache> models;
    for (const char* name : {"Llama-3.1-8B", "Llama-3.1-70B"}) {
      const af::DenseModel& m = af::dense_model(name);
      models.push_back({m.name, m.source, m.layers,
                        af::quantized_kv_card(m.heads, m.kv_heads, m.head_dim, af::KvFormat::int8_channel,
                                              af::KvFormat::int8_token, 32)});
    }
    fmt::print("\n{}", af::format_cache_card(card, models, std::vector<std::int64_t>{4096, 131072}));
    // [/cache-card]

    if (!out_dir.empty()) {
      const std::filesystem::path dir = af::make_output_directory(out_dir);
      numbers.write(dir);
      af::write_output_file(dir / "cache_growth.dat", [&](af::OutputFile& growth) {
        growth.print(
            "# KV-cache bytes of one sequence against context, bf16, whole model: context then one column per "
            "model\ncontext");
        for (const af::ModelPreset& p : af::model_presets()) growth.print(" \"{}\"", p.name);
        growth.print("\n");
        for (std::int64_t t = 256; t <= 1048576; t *= 2) {
          growth.print("{}", t);
          for (const af::ModelPreset& p : af::model_presets())
            growth.print(" {}", p.cache(af::DType::bf16).bytes_stored(t));
          growth.print("\n");
        }
      });
      // Llama-3.1-8B's size (8e9 bf16 weights, 32 layers, 32 query heads of 128) with four attention shapes:
      // the largest batch of sequences of each length that fits in 80 GB beside the weights.
      af::write_output_file(dir / "batch_fit.dat", [&](af::OutputFile& fit) {
        fit.print(
            "# largest batch in 80e9 B beside 16e9 B of weights, bf16 cache, 32 layers: context mha gqa8 mqa mla\n");
        const std::vector<af::CacheCard> shapes = {af::dense_kv_card("MHA", 32, 32, 128, af::DType::bf16),
                                                   af::dense_kv_card("GQA", 32, 8, 128, af::DType::bf16),
                                                   af::dense_kv_card("MQA", 32, 1, 128, af::DType::bf16),
                                                   af::mla_kv_card(32, 512, 64, af::DType::bf16)};
        for (std::int64_t t = 1024; t <= 1048576; t *= 2) {
          fit.print("{}", t);
          for (const af::CacheCard& c : shapes)
            fit.print(" {}", (std::int64_t{80'000'000'000} - 16'000'000'000) / (32 * c.bytes_stored(t)));
          fit.print("\n");
        }
      });
      af::write_output_file(dir / "decode_reads.dat", [&](af::OutputFile& reads) {
        reads.print(
            "# KV-cache bytes one decode step of one sequence reads, bf16, whole model: context then one column per "
            "model\ncontext");
        for (const af::ModelPreset& p : af::model_presets()) reads.print(" \"{}\"", p.name);
        reads.print("\n");
        for (std::int64_t t = 256; t <= 1048576; t *= 2) {
          reads.print("{}", t);
          for (const af::ModelPreset& p : af::model_presets())
            reads.print(" {}", p.cache(af::DType::bf16).bytes_read(t));
          reads.print("\n");
        }
      });
      af::write_output_file(dir / "quant_error.dat", [&](af::OutputFile& quant) {
        quant.print(
            "# format bytes_per_token(Llama-3.1-8B, scales counted) error_random error_m4 error_m16 error_m64\n");
        quant.print("\"f32\" {} 0 0 0 0\n",
                    32 * af::quantized_kv_card(32, 8, 128, af::KvFormat::f32, af::KvFormat::f32).bytes_per_token());
        for (std::size_t f = 0; f < formats.size(); ++f) {
          quant.print("\"{}\" {}", formats[f].name, format_bytes[f]);
          for (double e : errors[f]) quant.print(" {:.6e}", e);
          quant.print("\n");
        }
      });
    }
    return checks.all_passed();
  });
}
