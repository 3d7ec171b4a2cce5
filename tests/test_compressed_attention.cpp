#include "af/compressed_attention.hpp"
#include "af/error.hpp"
#include "af/linalg.hpp"
#include "af/random.hpp"

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

namespace {

using Rows = std::vector<std::vector<double>>;
constexpr double inf = std::numeric_limits<double>::infinity();

af::V4Shape tiny_shape(af::V4LayerKind kind) {
  af::V4Shape s;
  s.kind = kind;
  s.hidden = 24;
  s.heads = 4;
  s.head_dim = 16;
  s.rope_dim = 8;
  s.q_lora_rank = 12;
  s.window = 5;
  s.ratio = kind == af::V4LayerKind::csa ? 4 : kind == af::V4LayerKind::hca ? 6 : 0;
  s.index_heads = 3;
  s.index_head_dim = 12;
  s.index_topk = 2;
  s.o_groups = 2;
  s.o_lora_rank = 10;
  return s;
}

af::Tensor linear_weight(af::Rng& rng, std::int64_t out, std::int64_t in) {
  return af::random_normal(af::Shape{out, in}, rng, 1.0 / std::sqrt(static_cast<double>(in)));
}

af::Tensor gain(af::Rng& rng, std::int64_t n) {
  af::Tensor g = af::random_normal(af::Shape{n}, rng, 0.2);
  for (float& v : g.values()) v += 1.0f;
  return g;
}

af::CompressorWeights random_compressor(af::Rng& rng, std::int64_t series, std::int64_t c, std::int64_t m,
                                        std::int64_t hidden) {
  return {linear_weight(rng, series * c, hidden), linear_weight(rng, series * c, hidden),
          af::random_normal(af::Shape{m, series * c}, rng, 0.5), gain(rng, c)};
}

af::V4Weights random_weights(af::Rng& rng, const af::V4Shape& s) {
  af::V4Weights w;
  const std::int64_t c = s.head_dim;
  w.q_a_proj = linear_weight(rng, s.q_lora_rank, s.hidden);
  w.q_a_norm = gain(rng, s.q_lora_rank);
  w.q_b_proj = linear_weight(rng, s.heads * c, s.q_lora_rank);
  w.kv_proj = linear_weight(rng, c, s.hidden);
  w.kv_norm = gain(rng, c);
  w.o_a_proj = linear_weight(rng, s.o_groups * s.o_lora_rank, s.heads * c / s.o_groups);
  w.o_b_proj = linear_weight(rng, s.hidden, s.o_groups * s.o_lora_rank);
  w.sinks = af::random_normal(af::Shape{s.heads}, rng, 1.0);
  if (s.compressed())
    w.compressor = random_compressor(rng, s.kind == af::V4LayerKind::csa ? 2 : 1, c, s.ratio, s.hidden);
  if (s.kind == af::V4LayerKind::csa) {
    w.indexer = random_compressor(rng, 2, s.index_head_dim, s.ratio, s.hidden);
    w.indexer_q_b_proj = linear_weight(rng, s.index_heads * s.index_head_dim, s.q_lora_rank);
    w.indexer_weights_proj = linear_weight(rng, s.index_heads, s.hidden);
  }
  return w;
}

// ---- float64 reference, written from the formulas over the whole sequence at once ----------------------

Rows rows_of(const af::Tensor& t) {
  Rows out(static_cast<std::size_t>(t.dim(0)), std::vector<double>(static_cast<std::size_t>(t.dim(1))));
  for (std::int64_t i = 0; i < t.dim(0); ++i)
    for (std::int64_t j = 0; j < t.dim(1); ++j) out[i][j] = t.at({i, j});
  return out;
}

Rows lin(const Rows& x, const af::Tensor& w) {
  Rows y(x.size(), std::vector<double>(static_cast<std::size_t>(w.dim(0)), 0.0));
  for (std::size_t t = 0; t < x.size(); ++t)
    for (std::int64_t o = 0; o < w.dim(0); ++o)
      for (std::int64_t i = 0; i < w.dim(1); ++i) y[t][o] += x[t][i] * w.at({o, i});
  return y;
}

void norm(std::vector<double>& v, std::size_t from, std::size_t count, const af::Tensor* g, double eps) {
  double ms = 0.0;
  for (std::size_t i = 0; i < count; ++i) ms += v[from + i] * v[from + i];
  const double inv = 1.0 / std::sqrt(ms / static_cast<double>(count) + eps);
  for (std::size_t i = 0; i < count; ++i) v[from + i] *= inv * (g ? g->values()[i] : 1.0);
}

// Rotate pairs (2i, 2i+1) of the last r values of [from, from + width) by angle position * theta^(-2i/r).
void rot(std::vector<double>& v, std::size_t from, std::size_t width, std::size_t r, double theta, double position) {
  for (std::size_t i = 0; i < r / 2; ++i) {
    const double a = position * std::pow(theta, -2.0 * static_cast<double>(i) / static_cast<double>(r));
    double& x0 = v[from + width - r + 2 * i];
    double& x1 = v[from + width - r + 2 * i + 1];
    const double y0 = x0 * std::cos(a) - x1 * std::sin(a), y1 = x1 * std::cos(a) + x0 * std::sin(a);
    x0 = y0, x1 = y1;
  }
}

// Entry e of a compressor over all L tokens: slots = [Ca of tokens (e-1)m .. em-1 if overlapping and e > 0 ;
// own series of tokens em .. em+m-1], gates biased by the token's offset in its block; per-channel softmax.
Rows compress64(const Rows& x, const af::CompressorWeights& w, std::int64_t c, std::int64_t m, bool overlap,
                std::size_t r, double theta, double eps) {
  const Rows kv = lin(x, w.kv_proj), gate = lin(x, w.gate_proj);
  const std::int64_t entries = static_cast<std::int64_t>(x.size()) / m;
  const std::int64_t own = overlap ? c : 0;
  Rows out;
  for (std::int64_t e = 0; e < entries; ++e) {
    std::vector<double> entry(static_cast<std::size_t>(c));
    for (std::int64_t ch = 0; ch < c; ++ch) {
      std::vector<std::pair<double, double>> slots;  // (gate, kv)
      if (overlap && e > 0)
        for (std::int64_t j = 0; j < m; ++j)
          slots.emplace_back(gate[(e - 1) * m + j][ch] + w.position_bias.at({j, ch}), kv[(e - 1) * m + j][ch]);
      for (std::int64_t j = 0; j < m; ++j)
        slots.emplace_back(gate[e * m + j][own + ch] + w.position_bias.at({j, own + ch}), kv[e * m + j][own + ch]);
      double top = -inf, total = 0.0, mixed = 0.0;
      for (auto [g, v] : slots) top = std::max(top, g);
      for (auto [g, v] : slots) total += std::exp(g - top), mixed += std::exp(g - top) * v;
      entry[ch] = mixed / total;
    }
    norm(entry, 0, entry.size(), &w.kv_norm, eps);
    rot(entry, 0, entry.size(), r, theta, static_cast<double>(e * m));
    out.push_back(entry);
  }
  return out;
}

struct Reference64 {
  Rows out;                                         // [L, hidden]
  std::vector<std::vector<std::int64_t>> selected;  // CSA: per query, sorted
};

Reference64 v4_reference(const af::V4Shape& s, const af::V4Weights& w, const af::Tensor& x_in, double theta) {
  const Rows x = rows_of(x_in);
  const std::int64_t L = x_in.dim(0), H = s.heads, c = s.head_dim, m = s.ratio;
  const auto r = static_cast<std::size_t>(s.rope_dim);
  Rows qr = lin(x, w.q_a_proj);
  for (auto& v : qr) norm(v, 0, v.size(), &w.q_a_norm, s.rms_norm_eps);
  Rows q = lin(qr, w.q_b_proj);
  Rows kv = lin(x, w.kv_proj);
  for (std::int64_t t = 0; t < L; ++t) {
    for (std::int64_t h = 0; h < H; ++h) {
      norm(q[t], h * c, c, nullptr, s.rms_norm_eps);
      rot(q[t], h * c, c, r, theta, t);
    }
    norm(kv[t], 0, c, &w.kv_norm, s.rms_norm_eps);
    rot(kv[t], 0, c, r, theta, t);
  }
  Rows entries, keys;
  if (s.compressed())
    entries = compress64(x, w.compressor, c, m, s.kind == af::V4LayerKind::csa, r, theta, s.rms_norm_eps);
  Reference64 ref;
  Rows qi, wi;
  if (s.kind == af::V4LayerKind::csa) {
    keys = compress64(x, w.indexer, s.index_head_dim, m, true, r, theta, s.rms_norm_eps);
    qi = lin(qr, w.indexer_q_b_proj);
    wi = lin(x, w.indexer_weights_proj);
  }
  for (std::int64_t t = 0; t < L; ++t) {
    std::vector<const std::vector<double>*> seen;
    for (std::int64_t j = std::max<std::int64_t>(0, t - s.window + 1); j <= t; ++j) seen.push_back(&kv[j]);
    const std::int64_t complete = (t + 1) / std::max<std::int64_t>(m, 1);
    if (s.kind == af::V4LayerKind::hca)
      for (std::int64_t e = 0; e < complete; ++e) seen.push_back(&entries[e]);
    if (s.kind == af::V4LayerKind::csa) {
      const std::int64_t ci = s.index_head_dim;
      for (std::int64_t h = 0; h < s.index_heads; ++h) rot(qi[t], h * ci, ci, r, theta, t);
      std::vector<std::pair<double, std::int64_t>> scored;
      for (std::int64_t e = 0; e < complete; ++e) {
        double score = 0.0;
        for (std::int64_t h = 0; h < s.index_heads; ++h) {
          double d = 0.0;
          for (std::int64_t i = 0; i < ci; ++i) d += qi[t][h * ci + i] * keys[e][i];
          score += wi[t][h] / std::sqrt(static_cast<double>(s.index_heads)) * std::max(d, 0.0) /
                   std::sqrt(static_cast<double>(ci));
        }
        scored.emplace_back(-score, e);
      }
      std::sort(scored.begin(), scored.end());
      std::vector<std::int64_t> chosen;
      for (std::size_t i = 0; i < scored.size() && static_cast<std::int64_t>(i) < s.index_topk; ++i)
        chosen.push_back(scored[i].second);
      std::sort(chosen.begin(), chosen.end());
      for (std::int64_t e : chosen) seen.push_back(&entries[e]);
      ref.selected.push_back(chosen);
    }
    std::vector<double> ctx(static_cast<std::size_t>(H * c), 0.0);
    for (std::int64_t h = 0; h < H; ++h) {
      std::vector<double> logit;
      double top = w.sinks.values()[h];
      for (const auto* k : seen) {
        double d = 0.0;
        for (std::int64_t i = 0; i < c; ++i) d += q[t][h * c + i] * (*k)[i];
        logit.push_back(d / std::sqrt(static_cast<double>(c)));
        top = std::max(top, logit.back());
      }
      double total = std::exp(w.sinks.values()[h] - top);
      for (double& l : logit) total += (l = std::exp(l - top));
      for (std::size_t j = 0; j < seen.size(); ++j)
        for (std::int64_t i = 0; i < c; ++i) ctx[h * c + i] += logit[j] / total * (*seen[j])[i];
      rot(ctx, h * c, c, r, theta, -static_cast<double>(t));
    }
    std::vector<double> mid(static_cast<std::size_t>(s.o_groups * s.o_lora_rank), 0.0);
    const std::int64_t per = H * c / s.o_groups;
    for (std::int64_t g = 0; g < s.o_groups; ++g)
      for (std::int64_t o = 0; o < s.o_lora_rank; ++o)
        for (std::int64_t i = 0; i < per; ++i)
          mid[g * s.o_lora_rank + o] += w.o_a_proj.at({g * s.o_lora_rank + o, i}) * ctx[g * per + i];
    ref.out.push_back(lin(Rows{mid}, w.o_b_proj)[0]);
  }
  return ref;
}

double max_diff(const af::Tensor& got, const Rows& want, std::int64_t first_row = 0) {
  double worst = 0.0;
  for (std::int64_t i = 0; i < got.dim(0); ++i)
    for (std::int64_t j = 0; j < got.dim(1); ++j)
      worst = af::worse(worst, std::abs(got.at({i, j}) - want[first_row + i][j]));
  return worst;
}

std::vector<std::int64_t> iota_positions(std::int64_t first, std::int64_t n) {
  std::vector<std::int64_t> p(static_cast<std::size_t>(n));
  std::iota(p.begin(), p.end(), first);
  return p;
}

// Runs the layer over x in calls of the given sizes through one cache; returns all rows.
af::Tensor run_chunks(const af::V4Shape& s, const af::V4Weights& w, const af::Rope& rope, const af::Tensor& x,
                      const std::vector<std::int64_t>& sizes, std::vector<std::vector<std::int64_t>>* selected) {
  af::V4Cache cache(s);
  af::Tensor out(af::Shape{x.dim(0), s.hidden});
  std::int64_t at = 0;
  for (std::int64_t n : sizes) {
    af::V4Trace trace;
    const auto pos = iota_positions(at, n);
    const af::Tensor y = af::v4_attention(x.matrix().rows_slice(at, n), pos, s, w, rope, cache, &trace);
    for (std::int64_t i = 0; i < n; ++i) std::ranges::copy(y.matrix().row(i), out.matrix().row(at + i).begin());
    if (selected)
      for (auto sel : trace.selected) {
        std::erase(sel, -1);
        std::sort(sel.begin(), sel.end());
        selected->push_back(sel);
      }
    at += n;
  }
  return out;
}

}  // namespace

TEST_CASE("The compressor equals the float64 formula, fed in any chunking", "[compressed]") {
  for (const bool overlap : {false, true}) {
    const std::int64_t c = 10, m = 4, hidden = 12, L = 23;
    af::Rng rng(overlap ? 41 : 42);
    const af::CompressorWeights w = random_compressor(rng, overlap ? 2 : 1, c, m, hidden);
    const af::Tensor x = af::random_normal(af::Shape{L, hidden}, rng);
    const af::Rope rope(4, 10000.0, af::RopeLayout::adjacent);
    const Rows want = compress64(rows_of(x), w, c, m, overlap, 4, 10000.0, 1e-6);
    REQUIRE(want.size() == 5);
    for (const std::vector<std::int64_t>& sizes :
         {std::vector<std::int64_t>{L},
          {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1},
          {3, 6, 1, 9, 4},
          {10, 13}}) {
      af::Compressor comp(c, m, overlap);
      const af::Tensor kv = af::linear(x.matrix(), w.kv_proj.matrix()),
                       gate = af::linear(x.matrix(), w.gate_proj.matrix());
      std::int64_t at = 0;
      for (std::int64_t n : sizes) {
        comp.push(kv.matrix().rows_slice(at, n), gate.matrix().rows_slice(at, n), w, rope, 1e-6);
        at += n;
        CHECK(comp.size() == at / m);
        CHECK(comp.pending() == at % m);
        CHECK(comp.has_overlap() == (overlap && at >= m));
      }
      CHECK(max_diff(af::to_tensor(comp.entries()), want) < 1e-5);
    }
  }
}

TEST_CASE("pool_entry is a per-channel softmax over slots and skips -inf gates", "[compressed]") {
  const float ninf = -std::numeric_limits<float>::infinity();
  const af::Tensor kv(af::Shape{3, 2}, {1.0f, 10.0f, 2.0f, 20.0f, 3.0f, 30.0f});
  const af::Tensor gates(af::Shape{3, 2}, {0.0f, ninf, 0.0f, 0.0f, std::log(2.0f), ninf});
  const std::vector<float> e = af::pool_entry(kv.matrix(), gates.matrix());
  CHECK(e[0] == Approx((1.0 + 2.0 + 2.0 * 3.0) / 4.0));
  CHECK(e[1] == Approx(20.0));
  const af::Tensor dead(af::Shape{1, 2}, {ninf, 0.0f});
  CHECK_THROWS_AS(af::pool_entry(kv.matrix().rows_slice(0, 1), dead.matrix()), af::Error);
}

TEST_CASE("top_k ranks by score, breaks ties toward the lower index and never picks -inf", "[compressed]") {
  const float ninf = -std::numeric_limits<float>::infinity();
  const std::vector<float> scores = {0.5f, 2.0f, ninf, 2.0f, -1.0f, 0.5f};
  CHECK(af::top_k(scores, 3) == std::vector<std::int64_t>{1, 3, 0});
  CHECK(af::top_k(scores, 10) == std::vector<std::int64_t>{1, 3, 0, 5, 4});
  CHECK(af::top_k(scores, 0).empty());
  CHECK_THROWS_AS(af::top_k(scores, -1), af::Error);
}

TEST_CASE("Every V4 layer kind equals the float64 reference, prefill and decode", "[compressed]") {
  for (const af::V4LayerKind kind : {af::V4LayerKind::sliding, af::V4LayerKind::csa, af::V4LayerKind::hca}) {
    CAPTURE(af::name_of(kind));
    const af::V4Shape s = tiny_shape(kind);
    af::Rng rng(7 + static_cast<std::uint64_t>(kind));
    const af::V4Weights w = random_weights(rng, s);
    const std::int64_t L = 31;
    const af::Tensor x = af::random_normal(af::Shape{L, s.hidden}, rng);
    const double theta = kind == af::V4LayerKind::sliding ? 10000.0 : 160000.0;
    const af::Rope rope(s.rope_dim, theta, af::RopeLayout::adjacent);
    const Reference64 ref = v4_reference(s, w, x, theta);
    std::vector<std::vector<std::int64_t>> selected;
    // A prefill of 10 ends inside a block (m = 4 or 6); 21 decode steps cross several block boundaries.
    std::vector<std::int64_t> sizes = {10};
    sizes.resize(22, 1);
    const af::Tensor got = run_chunks(s, w, rope, x, sizes, &selected);
    CHECK(max_diff(got, ref.out) < 2e-5);
    if (kind == af::V4LayerKind::csa) CHECK(selected == ref.selected);
  }
}

TEST_CASE("Prefill equals decode token by token through the cache, across block boundaries", "[compressed]") {
  for (const af::V4LayerKind kind : {af::V4LayerKind::sliding, af::V4LayerKind::csa, af::V4LayerKind::hca}) {
    CAPTURE(af::name_of(kind));
    const af::V4Shape s = tiny_shape(kind);
    af::Rng rng(100 + static_cast<std::uint64_t>(kind));
    const af::V4Weights w = random_weights(rng, s);
    const std::int64_t L = 27;
    const af::Tensor x = af::random_normal(af::Shape{L, s.hidden}, rng);
    const af::Rope rope(s.rope_dim, 160000.0, af::RopeLayout::adjacent);
    std::vector<std::vector<std::int64_t>> sel_prefill, sel_decode, sel_chunks;
    const af::Tensor whole = run_chunks(s, w, rope, x, {L}, &sel_prefill);
    const af::Tensor steps = run_chunks(s, w, rope, x, std::vector<std::int64_t>(L, 1), &sel_decode);
    const af::Tensor chunks = run_chunks(s, w, rope, x, {7, 1, 5, 2, 9, 3}, &sel_chunks);
    CHECK(af::max_abs_diff(whole.values(), steps.values()) < 2e-5);
    CHECK(af::max_abs_diff(whole.values(), chunks.values()) < 2e-5);
    CHECK(sel_prefill == sel_decode);
    CHECK(sel_prefill == sel_chunks);
  }
}

TEST_CASE("With top-k at least the number of entries, CSA selects every complete entry", "[compressed]") {
  af::V4Shape s = tiny_shape(af::V4LayerKind::csa);
  s.index_topk = 100;
  af::Rng rng(5);
  const af::V4Weights w = random_weights(rng, s);
  const af::Tensor x = af::random_normal(af::Shape{22, s.hidden}, rng);
  const af::Rope rope(s.rope_dim, 160000.0, af::RopeLayout::adjacent);
  af::V4Cache cache(s);
  af::V4Trace trace;
  const auto pos = iota_positions(0, 22);
  af::v4_attention(x.matrix(), pos, s, w, rope, cache, &trace);
  REQUIRE(trace.selected.size() == 22);
  for (std::int64_t t = 0; t < 22; ++t) {
    std::vector<std::int64_t> sel = trace.selected[t];
    CHECK(static_cast<std::int64_t>(sel.size()) == 22 / 4);  // min(top-k, entries in the call)
    std::erase(sel, -1);
    std::sort(sel.begin(), sel.end());
    std::vector<std::int64_t> every((t + 1) / 4);
    std::iota(every.begin(), every.end(), 0);
    CHECK(sel == every);
  }
}

TEST_CASE("The V4 cache holds what the reference holds", "[compressed]") {
  const af::V4Shape s = tiny_shape(af::V4LayerKind::csa);
  af::Rng rng(9);
  const af::V4Weights w = random_weights(rng, s);
  const af::Tensor x = af::random_normal(af::Shape{11, s.hidden}, rng);
  const af::Rope rope(s.rope_dim, 160000.0, af::RopeLayout::adjacent);
  af::V4Cache cache(s);
  const auto pos = iota_positions(0, 11);
  af::v4_attention(x.matrix(), pos, s, w, rope, cache);
  CHECK(cache.seen() == 11);
  CHECK(cache.window_rows() == s.window - 1);
  CHECK(cache.window_first() == 11 - (s.window - 1));
  CHECK(cache.compressor().size() == 2);
  CHECK(cache.compressor().pending() == 3);
  CHECK(cache.indexer().size() == 2);
  CHECK(cache.indexer().has_overlap());
  const std::int64_t c = s.head_dim, ci = s.index_head_dim, m = s.ratio;
  CHECK(cache.values_held() ==
        (s.window - 1) * c + 2 * c + 3 * 2 * 2 * c + 2 * m * c + 2 * ci + 3 * 2 * 2 * ci + 2 * m * ci);
}

TEST_CASE("Bad V4 shapes and weights throw, naming the value", "[compressed]") {
  af::V4Shape s = tiny_shape(af::V4LayerKind::csa);
  af::Rng rng(3);
  af::V4Weights w = random_weights(rng, s);
  w.compressor.position_bias = af::Tensor(af::Shape{3, 32});
  CHECK_THROWS_WITH(w.validate(s), Catch::Contains("compressor.position_bias"));
  s.window = 1;
  CHECK_THROWS_AS(s.validate(), af::Error);
  s = tiny_shape(af::V4LayerKind::sliding);
  s.ratio = 4;
  CHECK_THROWS_AS(s.validate(), af::Error);
  CHECK_THROWS_AS(af::v4_layer_kind("full_attention"), af::Error);
  CHECK(af::v4_layer_kind("heavily_compressed_attention") == af::V4LayerKind::hca);
}

TEST_CASE("The V4 cards give the published models' derived bytes", "[compressed]") {
  // Derived from DeepSeek-V4-Flash's config.json (bf16, as the reference code's tensors): CSA grows by
  // (512 + 128) / 4 x 2 = 320 B per token and layer, HCA by 512 / 128 x 2 = 8 B; the window is 128 x 512 x 2.
  const af::V4LayerCard csa = af::v4_layer_card(af::deepseek_v4_flash_shape(af::V4LayerKind::csa));
  const af::V4LayerCard hca = af::v4_layer_card(af::deepseek_v4_flash_shape(af::V4LayerKind::hca));
  CHECK(csa.growth_per_token() == 320.0);
  CHECK(hca.growth_per_token() == 8.0);
  const af::InterleavedModel flash = af::deepseek_v4_flash(), pro = af::deepseek_v4_pro();
  const std::int64_t t = 1 << 20;  // a multiple of 128: no block pending; overlap held in CSA layers
  const std::int64_t overlap_bytes = 4 * (2 * 512 + 2 * 128) * 2;
  // 6,880 B/token x 2^20 = 7,214,202,880 B, plus the windows 43 x 131,072 B (5.375 MiB)
  CHECK(flash.bytes_stored(t) - 21 * overlap_bytes == 7'214'202'880 + 5'636'096);
  // 9,848 B/token x 2^20 = 10,326,376,448 B, plus the windows 61 x 131,072 B (7.625 MiB)
  CHECK(pro.bytes_stored(t) - 30 * overlap_bytes == 10'326'376'448 + 7'995'392);
  // A CSA layer's decode step reads W window entries, top-k entries and every indexer key.
  CHECK(csa.entries_read(t) == 128 + 512 + t / 4);
  CHECK(hca.entries_read(t) == 128 + t / 128);
}
