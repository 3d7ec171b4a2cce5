// Chapter 12 — compressed sparse attention (DeepSeek-V4: CSA and HCA).
//
// DeepSeek-V4's three attention layers as its reference code runs them: a window of raw recent entries (one
// K = V head shared by all heads) in every layer; HCA adds one compressed entry per m' tokens, every one read;
// CSA adds one entry per m tokens pooled over overlapping windows and a lightning indexer that keeps the top k
// of them per query. Builds the layer from scratch in float64 over the whole sequence, checks it against the
// library's cached float32 layer (prefill, then decode token by token with blocks still filling), prints the
// cache cards of the published models beside DeepSeek-V3's MLA, V3.2's DSA and a GQA model, measures how much
// of dense attention's mass the selected entries capture, and writes the data of the chapter's figures.
//
//   build/bin/ch12_compressed_sparse_attention [--seq-len 30] [--prefill 10] [--context 1024] [--seed 12]
//                                               [--out DIR]

#include "af/compressed_attention.hpp"
#include "af/error.hpp"
#include "af/linalg.hpp"
#include "af/models.hpp"
#include "af/program.hpp"
#include "af/random.hpp"
#include "af/sparse_attention.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

namespace {

using af::Shape;
using af::Tensor;
using Vec = std::vector<double>;
using Rows = std::vector<Vec>;
constexpr double inf = std::numeric_limits<double>::infinity();

// ---- small float64 helpers for the from-scratch layer ---------------------------------------------------

Vec row64(const Tensor& t, std::int64_t i) {
  const auto r = t.matrix().row(i);
  return Vec(r.begin(), r.end());
}

Vec mat_vec(const Tensor& w, const Vec& x) {  // w [out, in] (nn.Linear layout) times x [in]
  Vec y(static_cast<std::size_t>(w.dim(0)), 0.0);
  for (std::int64_t o = 0; o < w.dim(0); ++o)
    for (std::int64_t i = 0; i < w.dim(1); ++i) y[o] += w.matrix()(o, i) * x[i];
  return y;
}

// RMSNorm of x[from, from + n) in place, with a gain (or none).
void rms_norm(Vec& x, std::size_t from, std::size_t n, const Tensor* gain, double eps) {
  double ms = 0.0;
  for (std::size_t i = 0; i < n; ++i) ms += x[from + i] * x[from + i];
  const double inv = 1.0 / std::sqrt(ms / static_cast<double>(n) + eps);
  for (std::size_t i = 0; i < n; ++i) x[from + i] *= inv * (gain ? gain->values()[i] : 1.0);
}

// [partial-rope]
// Interleaved RoPE on the LAST r values of the width-wide vector at x[from]: pairs (2i, 2i+1) of that tail turn
// by position * theta^(-2i/r). The first width - r values carry no position at all.
void rope_tail(Vec& x, std::size_t from, std::size_t width, std::size_t r, double theta, double position) {
  for (std::size_t i = 0; i < r / 2; ++i) {
    const double angle = position * std::pow(theta, -2.0 * static_cast<double>(i) / static_cast<double>(r));
    double& a = x[from + width - r + 2 * i];
    double& b = x[from + width - r + 2 * i + 1];
    const double ra = a * std::cos(angle) - b * std::sin(angle), rb = b * std::cos(angle) + a * std::sin(angle);
    a = ra, b = rb;
  }
}
// [/partial-rope]

struct Layer {
  af::V4Shape shape;
  af::V4Weights w;
  double theta;
};

// ---- the layer from scratch, float64, over the whole sequence at once ----------------------------------

// [compress]
// Entry e of a compressor, from every token's kv and gate projections (s series of c values each: s = 2 for
// CSA, Ca = [0, c) and Cb = [c, 2c); s = 1 for HCA). The slots of entry e are the m tokens of block e (their own
// series: Cb for CSA) and, for CSA, the Ca series of the m tokens of block e - 1 when there is one: windows of
// 2m tokens with stride m. Each token's gate gets the position bias of its offset in its block; then, channel
// by channel, a softmax over the slots weights their kv. RMSNorm, and RoPE at position e * m: the block's
// FIRST token, although the entry also holds the block's later tokens.
Vec entry_of(const Rows& kv, const Rows& gate, const af::CompressorWeights& w, std::int64_t c, std::int64_t m,
             bool overlapping, std::int64_t e, std::size_t r, double theta, double eps) {
  const std::int64_t own = overlapping ? c : 0;
  Vec entry(static_cast<std::size_t>(c));
  for (std::int64_t ch = 0; ch < c; ++ch) {
    std::vector<std::pair<double, double>> slots;  // (biased gate, kv)
    for (std::int64_t j = 0; j < m && overlapping && e > 0; ++j)
      slots.emplace_back(gate[(e - 1) * m + j][ch] + w.position_bias.at({j, ch}), kv[(e - 1) * m + j][ch]);
    for (std::int64_t j = 0; j < m; ++j)
      slots.emplace_back(gate[e * m + j][own + ch] + w.position_bias.at({j, own + ch}), kv[e * m + j][own + ch]);
    double top = -inf, total = 0.0, mixed = 0.0;
    for (const auto& [g, v] : slots) top = std::max(top, g);
    for (const auto& [g, v] : slots) total += std::exp(g - top), mixed += std::exp(g - top) * v;
    entry[ch] = mixed / total;
  }
  rms_norm(entry, 0, entry.size(), &w.kv_norm, eps);
  rope_tail(entry, 0, entry.size(), r, theta, static_cast<double>(e * m));
  return entry;
}

// Every complete entry of a sequence: only blocks whose m tokens have all arrived.
Rows compress(const Rows& x, const af::CompressorWeights& w, std::int64_t c, std::int64_t m, bool overlapping,
              std::size_t r, double theta, double eps) {
  Rows kv, gate, entries;
  for (const Vec& xt : x) kv.push_back(mat_vec(w.kv_proj, xt)), gate.push_back(mat_vec(w.gate_proj, xt));
  for (std::int64_t e = 0; e < static_cast<std::int64_t>(x.size()) / m; ++e)
    entries.push_back(entry_of(kv, gate, w, c, m, overlapping, e, r, theta, eps));
  return entries;
}
// [/compress]

struct Scratch {
  Rows out;                                         // [L, hidden]
  std::vector<std::vector<std::int64_t>> selected;  // CSA: per query, ascending
};

Scratch layer_from_scratch(const Layer& layer, const Tensor& x_in) {
  const af::V4Shape& s = layer.shape;
  const af::V4Weights& w = layer.w;
  const std::int64_t L = x_in.dim(0), H = s.heads, c = s.head_dim, m = s.ratio;
  const auto r = static_cast<std::size_t>(s.rope_dim);
  const double eps = s.rms_norm_eps, theta = layer.theta;
  Rows x, q_res, q, kv;
  for (std::int64_t t = 0; t < L; ++t) x.push_back(row64(x_in, t));
  // [project]
  // Queries: x -> q_a_proj -> RMSNorm (gain) -> q_b_proj -> per-head RMSNorm (no gain) -> RoPE on the tail.
  // The single K = V entry: x -> kv_proj -> RMSNorm (gain) -> RoPE on the tail. No separate keys and values.
  for (std::int64_t t = 0; t < L; ++t) {
    Vec qr = mat_vec(w.q_a_proj, x[t]);
    rms_norm(qr, 0, qr.size(), &w.q_a_norm, eps);
    Vec qt = mat_vec(w.q_b_proj, qr);
    for (std::int64_t h = 0; h < H; ++h) {
      rms_norm(qt, h * c, c, nullptr, eps);
      rope_tail(qt, h * c, c, r, theta, static_cast<double>(t));
    }
    Vec e = mat_vec(w.kv_proj, x[t]);
    rms_norm(e, 0, e.size(), &w.kv_norm, eps);
    rope_tail(e, 0, e.size(), r, theta, static_cast<double>(t));
    q_res.push_back(qr), q.push_back(qt), kv.push_back(e);
  }
  // [/project]
  const bool csa = s.kind == af::V4LayerKind::csa;
  Rows entries, keys;
  if (s.compressed()) entries = compress(x, w.compressor, c, m, csa, r, theta, eps);
  if (csa) keys = compress(x, w.indexer, s.index_head_dim, m, true, r, theta, eps);
  Scratch result;
  for (std::int64_t t = 0; t < L; ++t) {
    std::vector<const Vec*> seen;
    for (std::int64_t j = std::max<std::int64_t>(0, t - s.window + 1); j <= t; ++j) seen.push_back(&kv[j]);
    const std::int64_t complete = s.compressed() ? (t + 1) / m : 0;  // entries whose block ended by t
    std::vector<std::int64_t> chosen(static_cast<std::size_t>(complete));
    std::iota(chosen.begin(), chosen.end(), 0);
    if (csa) {
      // [indexer]
      // The lightning indexer: its own queries (from the query latent, RoPE on the tail) and head weights (from
      // x), scored against the indexer's own compressed keys: sum_h w_h relu(q_h . k_e) / sqrt(c_I). Only
      // complete entries compete; the top k survive, ties to the lower index.
      const std::int64_t hi = s.index_heads, ci = s.index_head_dim;
      Vec qi = mat_vec(w.indexer_q_b_proj, q_res[t]), wts = mat_vec(w.indexer_weights_proj, x[t]);
      for (std::int64_t h = 0; h < hi; ++h) rope_tail(qi, h * ci, ci, r, theta, static_cast<double>(t));
      std::vector<std::pair<double, std::int64_t>> ranked;
      for (std::int64_t e = 0; e < complete; ++e) {
        double score = 0.0;
        for (std::int64_t h = 0; h < hi; ++h) {
          double d = 0.0;
          for (std::int64_t i = 0; i < ci; ++i) d += qi[h * ci + i] * keys[e][i];
          score += wts[h] / std::sqrt(static_cast<double>(hi)) * std::max(d, 0.0) / std::sqrt(static_cast<double>(ci));
        }
        ranked.emplace_back(-score, e);
      }
      std::sort(ranked.begin(), ranked.end());
      chosen.clear();
      for (std::size_t i = 0; i < ranked.size() && static_cast<std::int64_t>(i) < s.index_topk; ++i)
        chosen.push_back(ranked[i].second);
      std::sort(chosen.begin(), chosen.end());
      result.selected.push_back(chosen);
      // [/indexer]
    }
    for (std::int64_t e : chosen) seen.push_back(&entries[e]);
    // [attend]
    // One softmax per head over [window entries ; chosen compressed entries] and the head's sink logit, which
    // takes mass and gives no value. The value of an entry is the entry (K = V), RoPE tail included, so the
    // output's tail is turned back by the query's position: what remains depends on relative positions only.
    Vec context(static_cast<std::size_t>(H * c), 0.0);
    for (std::int64_t h = 0; h < H; ++h) {
      const double sink = w.sinks.values()[h];
      Vec logit;
      double top = sink;
      for (const Vec* k : seen) {
        double d = 0.0;
        for (std::int64_t i = 0; i < c; ++i) d += q[t][h * c + i] * (*k)[i];
        logit.push_back(d / std::sqrt(static_cast<double>(c)));
        top = std::max(top, logit.back());
      }
      double total = std::exp(sink - top);
      for (double& l : logit) total += (l = std::exp(l - top));
      for (std::size_t j = 0; j < seen.size(); ++j)
        for (std::int64_t i = 0; i < c; ++i) context[h * c + i] += logit[j] / total * (*seen[j])[i];
      rope_tail(context, h * c, c, r, theta, -static_cast<double>(t));
    }
    // [/attend]
    // [grouped-output]
    // Grouped output projection: the H c values split into g groups of consecutive heads; each group goes to
    // d_g values through its own block of o_a_proj; o_b_proj mixes the g d_g values to the hidden size.
    const std::int64_t g = s.o_groups, dg = s.o_lora_rank, per = H * c / g;
    Vec mid(static_cast<std::size_t>(g * dg), 0.0);
    for (std::int64_t grp = 0; grp < g; ++grp)
      for (std::int64_t o = 0; o < dg; ++o)
        for (std::int64_t i = 0; i < per; ++i)
          mid[grp * dg + o] += w.o_a_proj.at({grp * dg + o, i}) * context[grp * per + i];
    result.out.push_back(mat_vec(w.o_b_proj, mid));
    // [/grouped-output]
  }
  return result;
}

// ---- weights ----------------------------------------------------------------------------------------------

Tensor weight(af::Rng& rng, std::int64_t out, std::int64_t in) {
  return af::random_normal(Shape{out, in}, rng, 1.0 / std::sqrt(static_cast<double>(in)));
}

Tensor gain(af::Rng& rng, std::int64_t n) {
  Tensor g = af::random_normal(Shape{n}, rng, 0.2);
  for (float& v : g.values()) v += 1.0f;
  return g;
}

af::CompressorWeights compressor_weights(af::Rng& rng, std::int64_t series, std::int64_t c, std::int64_t m,
                                         std::int64_t hidden) {
  return {weight(rng, series * c, hidden), weight(rng, series * c, hidden),
          af::random_normal(Shape{m, series * c}, rng, 1.0), gain(rng, c)};
}

Layer random_layer(af::Rng& rng, const af::V4Shape& s) {
  Layer layer{s, {}, s.kind == af::V4LayerKind::sliding ? 10000.0 : 160000.0};
  af::V4Weights& w = layer.w;
  const std::int64_t c = s.head_dim;
  w.q_a_proj = weight(rng, s.q_lora_rank, s.hidden);
  w.q_a_norm = gain(rng, s.q_lora_rank);
  w.q_b_proj = weight(rng, s.heads * c, s.q_lora_rank);
  w.kv_proj = weight(rng, c, s.hidden);
  w.kv_norm = gain(rng, c);
  w.o_a_proj = weight(rng, s.o_groups * s.o_lora_rank, s.heads * c / s.o_groups);
  w.o_b_proj = weight(rng, s.hidden, s.o_groups * s.o_lora_rank);
  w.sinks = af::random_normal(Shape{s.heads}, rng, 1.0);
  if (s.compressed())
    w.compressor = compressor_weights(rng, s.kind == af::V4LayerKind::csa ? 2 : 1, c, s.ratio, s.hidden);
  if (s.kind == af::V4LayerKind::csa) {
    w.indexer = compressor_weights(rng, 2, s.index_head_dim, s.ratio, s.hidden);
    w.indexer_q_b_proj = weight(rng, s.index_heads * s.index_head_dim, s.q_lora_rank);
    w.indexer_weights_proj = weight(rng, s.index_heads, s.hidden);
  }
  return layer;
}

af::V4Shape tiny_shape(af::V4LayerKind kind) {
  af::V4Shape s;
  s.kind = kind;
  s.hidden = 32, s.heads = 4, s.head_dim = 16, s.rope_dim = 8, s.q_lora_rank = 24, s.window = 6;
  s.ratio = kind == af::V4LayerKind::csa ? 4 : kind == af::V4LayerKind::hca ? 8 : 0;
  s.index_heads = 4, s.index_head_dim = 16, s.index_topk = 2;
  s.o_groups = 2, s.o_lora_rank = 12;
  return s;
}

std::string state_of(const af::V4Cache& cache, const af::V4Shape& s) {
  std::string text =
      fmt::format("window {} (tokens {}..{})", cache.window_rows(), cache.window_first(), cache.seen() - 1);
  if (s.compressed())
    text += fmt::format(", entries {}, pending {}", cache.compressor().size(), cache.compressor().pending());
  if (s.kind == af::V4LayerKind::csa)
    text += fmt::format(", index keys {}, overlap {}", cache.indexer().size(),
                        cache.indexer().has_overlap() ? "yes" : "no");
  return text;
}

// ---- selection, measured ------------------------------------------------------------------------------------

// One CSA-style layer at a longer context, for the measurements: its queries, its raw entries and its
// compressed entries at ratio m, and two indexers: the random one of the layer, and an "aligned" one that
// scores with the attention's own queries and entries (sum over heads of relu(q_h . e)), standing for an
// indexer trained to predict where attention goes.
struct Probe {
  std::int64_t heads, width, window;
  Rows q;  // [queries probed, H c]
  std::vector<std::int64_t> query_pos;
  Rows kv;       // [L, c]
  Rows entries;  // [L / m, c]
  Rows index_keys;
  Rows index_q;  // [queries, H_I c_I]
  Rows index_w;  // [queries, H_I]
  std::int64_t index_heads, index_width;
};

Probe probe(const Layer& layer, const Tensor& x_in, std::int64_t queries) {
  const af::V4Shape& s = layer.shape;
  const std::int64_t L = x_in.dim(0), c = s.head_dim;
  const auto r = static_cast<std::size_t>(s.rope_dim);
  Probe p{s.heads, c, s.window, {}, {}, {}, {}, {}, {}, {}, s.index_heads, s.index_head_dim};
  Rows x;
  for (std::int64_t t = 0; t < L; ++t) x.push_back(row64(x_in, t));
  for (std::int64_t t = 0; t < L; ++t) {
    Vec e = mat_vec(layer.w.kv_proj, x[t]);
    rms_norm(e, 0, e.size(), &layer.w.kv_norm, s.rms_norm_eps);
    rope_tail(e, 0, e.size(), r, layer.theta, static_cast<double>(t));
    p.kv.push_back(e);
  }
  for (std::int64_t t = L - queries; t < L; ++t) {
    Vec qr = mat_vec(layer.w.q_a_proj, x[t]);
    rms_norm(qr, 0, qr.size(), &layer.w.q_a_norm, s.rms_norm_eps);
    Vec qt = mat_vec(layer.w.q_b_proj, qr);
    for (std::int64_t h = 0; h < s.heads; ++h) {
      rms_norm(qt, h * c, c, nullptr, s.rms_norm_eps);
      rope_tail(qt, h * c, c, r, layer.theta, static_cast<double>(t));
    }
    Vec qi = mat_vec(layer.w.indexer_q_b_proj, qr);
    for (std::int64_t h = 0; h < s.index_heads; ++h)
      rope_tail(qi, h * s.index_head_dim, s.index_head_dim, r, layer.theta, static_cast<double>(t));
    p.q.push_back(qt), p.index_q.push_back(qi), p.index_w.push_back(mat_vec(layer.w.indexer_weights_proj, x[t]));
    p.query_pos.push_back(t);
  }
  p.entries = compress(x, layer.w.compressor, c, s.ratio, true, r, layer.theta, s.rms_norm_eps);
  p.index_keys = compress(x, layer.w.indexer, s.index_head_dim, s.ratio, true, r, layer.theta, s.rms_norm_eps);
  return p;
}

double dot64(const double* a, const double* b, std::int64_t n) {
  double d = 0.0;
  for (std::int64_t i = 0; i < n; ++i) d += a[i] * b[i];
  return d;
}

// Index scores of query i over the complete entries: aligned (attention's own q and entries) or random.
std::vector<float> scores_of(const Probe& p, std::size_t i, std::int64_t m, bool aligned) {
  const std::int64_t complete = (p.query_pos[i] + 1) / m;
  std::vector<float> out(static_cast<std::size_t>(complete));
  for (std::int64_t e = 0; e < complete; ++e) {
    double score = 0.0;
    if (aligned) {
      for (std::int64_t h = 0; h < p.heads; ++h)
        score += std::max(dot64(&p.q[i][h * p.width], p.entries[e].data(), p.width), 0.0);
    } else {
      for (std::int64_t h = 0; h < p.index_heads; ++h)
        score += p.index_w[i][h] *
                 std::max(dot64(&p.index_q[i][h * p.index_width], p.index_keys[e].data(), p.index_width), 0.0);
    }
    out[static_cast<std::size_t>(e)] = static_cast<float>(score);
  }
  return out;
}

// [captured-mass]
// Dense attention of query i over [its window ; every complete entry] (sink left out): the share of the
// entries' mass that falls on the chosen entries, averaged over heads. 1 means top-k lost nothing that dense
// attention over the entries would have read.
double captured_mass(const Probe& p, std::size_t i, std::int64_t m, const std::vector<std::int64_t>& chosen) {
  const std::int64_t t = p.query_pos[i], complete = (t + 1) / m;
  double captured = 0.0;
  for (std::int64_t h = 0; h < p.heads; ++h) {
    const double* qh = &p.q[i][h * p.width];
    Vec logits;
    for (std::int64_t j = std::max<std::int64_t>(0, t - p.window + 1); j <= t; ++j)
      logits.push_back(dot64(qh, p.kv[j].data(), p.width));
    const std::size_t first_entry = logits.size();
    for (std::int64_t e = 0; e < complete; ++e) logits.push_back(dot64(qh, p.entries[e].data(), p.width));
    const double top = *std::max_element(logits.begin(), logits.end()), scale = 1.0 / std::sqrt(double(p.width));
    double entries_mass = 0.0, chosen_mass = 0.0;
    for (std::size_t j = first_entry; j < logits.size(); ++j) entries_mass += std::exp((logits[j] - top) * scale);
    for (std::int64_t e : chosen) chosen_mass += std::exp((logits[first_entry + e] - top) * scale);
    captured += chosen_mass / entries_mass;
  }
  return captured / static_cast<double>(p.heads);
}
// [/captured-mass]

double mean_captured(const Probe& p, std::int64_t m, std::int64_t k, bool aligned) {
  double total = 0.0;
  for (std::size_t i = 0; i < p.q.size(); ++i)
    total += captured_mass(p, i, m, af::top_k(scores_of(p, i, m, aligned), k));
  return total / static_cast<double>(p.q.size());
}

// The inputs of the measurements: random tokens; random tokens with a needle (the token the last query likes
// best among many candidates, planted far outside the window); a motif of 32 random tokens repeated.
Tensor make_input(const std::string& kind, const Layer& layer, std::int64_t L, af::Rng& rng, std::int64_t needle_at) {
  const std::int64_t hidden = layer.shape.hidden;
  Tensor x = af::random_normal(Shape{L, hidden}, rng);
  if (kind == "repeated")
    for (std::int64_t t = 32; t < L; ++t) std::ranges::copy(x.matrix().row(t % 32), x.matrix().row(t).begin());
  if (kind == "needle") {
    // The needle: one token planted at `needle_at`, far outside the window, whose compressed kv points where
    // the last query looks. Solve W x = u for the least-norm x, where W is the compressor's kv projection of
    // the entry's own series (Cb), u the sum of the last query's heads with the entry's RoPE turned back and
    // its norm gain divided out; then give x 8 times a random token's norm, so that it stands out in its block.
    const af::V4Shape& s = layer.shape;
    const std::int64_t c = s.head_dim, m = s.ratio, e = needle_at / m;
    const Probe base = probe(layer, x, 1);
    Vec u(static_cast<std::size_t>(c), 0.0);
    for (std::int64_t h = 0; h < s.heads; ++h)
      for (std::int64_t i = 0; i < c; ++i) u[i] += base.q[0][h * c + i];
    rope_tail(u, 0, u.size(), static_cast<std::size_t>(s.rope_dim), layer.theta, -static_cast<double>(e * m));
    for (std::int64_t i = 0; i < c; ++i) u[i] /= layer.w.compressor.kv_norm.values()[i];
    const af::ConstMatrix w = layer.w.compressor.kv_proj.matrix().rows_slice(c, c);  // Cb rows [c, hidden]
    Rows a(static_cast<std::size_t>(c), Vec(static_cast<std::size_t>(c + 1), 0.0));  // [W W^T | u]
    for (std::int64_t i = 0; i < c; ++i) {
      for (std::int64_t j = 0; j < c; ++j)
        for (std::int64_t k = 0; k < hidden; ++k) a[i][j] += double{w(i, k)} * w(j, k);
      a[i][c] = u[i];
    }
    for (std::int64_t col = 0; col < c; ++col)  // Gaussian elimination (W W^T is symmetric positive definite)
      for (std::int64_t row = col + 1; row < c; ++row) {
        const double f = a[row][col] / a[col][col];
        for (std::int64_t j = col; j <= c; ++j) a[row][j] -= f * a[col][j];
      }
    Vec y(static_cast<std::size_t>(c));
    for (std::int64_t i = c - 1; i >= 0; --i) {
      double v = a[i][c];
      for (std::int64_t j = i + 1; j < c; ++j) v -= a[i][j] * y[j];
      y[i] = v / a[i][i];
    }
    Vec needle(static_cast<std::size_t>(hidden), 0.0);
    double norm = 0.0;
    for (std::int64_t k = 0; k < hidden; ++k) {
      for (std::int64_t i = 0; i < c; ++i) needle[k] += w(i, k) * y[i];
      norm += needle[k] * needle[k];
    }
    const double scale = 8.0 * std::sqrt(static_cast<double>(hidden) / norm);
    for (std::int64_t k = 0; k < hidden; ++k) x.at({needle_at, k}) = static_cast<float>(needle[k] * scale);
  }
  return x;
}

// ---- cards --------------------------------------------------------------------------------------------------

struct Row {
  std::string model;
  double per_token;  // growing bytes per token, all layers
  std::function<std::int64_t(std::int64_t)> stored, read;
};

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Chapter 12: compressed sparse attention (DeepSeek-V4 CSA and HCA)", "ch12_compressed_sparse_attention"};
  std::int64_t seq_len = 30, prefill = 10, context = 1024;
  double sharpness = 4.0;
  std::uint64_t seed = 12;
  std::string out_dir;
  app.add_option("--seq-len", seq_len, "Tokens of the check: a prefill, then decode one by one")
      ->check(CLI::Range(1, 2048))
      ->capture_default_str();
  app.add_option("--prefill", prefill, "Tokens of the prefill (<= --seq-len)")
      ->check(CLI::Range(1, 2048))
      ->capture_default_str();
  app.add_option("--context", context, "Context of the selection measurements (multiple of 128)")
      ->check(CLI::Range(256, 1024))
      ->capture_default_str();
  app.add_option("--sharpness", sharpness, "Factor on the logits of the selection measurements (see the chapter)")
      ->check(af::finite_range(0.1, 100.0))
      ->capture_default_str();
  app.add_option("--seed", seed, "Seed of the random weights and inputs")
      ->check(af::seed_value())
      ->capture_default_str();
  app.add_option(
         "--out", out_dir,
         "Directory for the figure data (index_scores.dat, decode_reads.dat, cache_bytes.dat, captured_mass.dat) "
         "and numbers.json")
      ->check(af::output_directory());

  return af::run_program(app, argc, argv, [&] {
    af::require(prefill <= seq_len, "--prefill {} is longer than --seq-len {}", prefill, seq_len);
    af::require(context % 128 == 0, "--context {} (expected a multiple of 128)", context);
    af::Checks checks;
    af::Rng rng(seed);

    // ---- 1. the three layer kinds, from scratch (float64) against the library's cache (float32) ----------
    fmt::print(
        "DeepSeek-V4 attention, tiny: H = 4 heads sharing one K = V head of c = 16 (RoPE on the last 8), "
        "window 6,\n  CSA m = 4 with top-2 of an indexer (4 heads of 16), HCA m = 8;\n  {} tokens: a prefill of {} "
        "then {} decode steps\n\n",
        seq_len, prefill, seq_len - prefill);
    for (const af::V4LayerKind kind : {af::V4LayerKind::sliding, af::V4LayerKind::csa, af::V4LayerKind::hca}) {
      const Layer layer = random_layer(rng, tiny_shape(kind));
      const af::V4Shape& s = layer.shape;
      const Tensor x = af::random_normal(Shape{seq_len, s.hidden}, rng);
      const Scratch want = layer_from_scratch(layer, x);
      // [decode-through-cache]
      // The library's layer: one call for the prefill, then one per token. The cache carries the window's last
      // W - 1 entries, the compressed entries, and the raw projections of the block still filling; an entry
      // appears in the step that completes its block, and a query sees it from that step on.
      const af::Rope rope(s.rope_dim, layer.theta, af::RopeLayout::adjacent);
      af::V4Cache cache(s);
      Tensor got(Shape{seq_len, s.hidden});
      std::vector<std::vector<std::int64_t>> selected;
      fmt::print("{}:\n", af::name_of(kind));
      for (std::int64_t at = 0; at < seq_len;) {
        const std::int64_t n = at == 0 ? prefill : 1;
        std::vector<std::int64_t> pos(static_cast<std::size_t>(n));
        std::iota(pos.begin(), pos.end(), at);
        const std::int64_t entries_before = cache.compressor().size();
        af::V4Trace trace;
        const Tensor y = af::v4_attention(x.matrix().rows_slice(at, n), pos, s, layer.w, rope, cache, &trace);
        for (std::int64_t i = 0; i < n; ++i) std::ranges::copy(y.matrix().row(i), got.matrix().row(at + i).begin());
        for (auto chosen : trace.selected) {
          std::erase(chosen, -1);  // picks past the query's causal limit: the reference marks them -1
          std::ranges::sort(chosen);
          selected.push_back(chosen);
        }
        at += n;
        if (at == prefill || (s.compressed() && cache.compressor().size() > entries_before && at < seq_len))
          fmt::print("  after token {:>2}: {}{}\n", at - 1, state_of(cache, s),
                     s.kind == af::V4LayerKind::csa && !trace.selected.empty()
                         ? fmt::format("; last picks [{}]", fmt::join(trace.selected.back(), " "))
                         : "");
      }
      // [/decode-through-cache]
      double worst = 0.0, biggest = 0.0;
      for (std::int64_t t = 0; t < seq_len; ++t)
        for (std::int64_t j = 0; j < s.hidden; ++j) {
          worst = af::worse(worst, std::abs(got.at({t, j}) - want.out[t][j]));
          biggest = af::worse(biggest, std::abs(want.out[t][j]));
        }
      checks.expect_close(fmt::format("{}: cached float32 vs float64 (max |y| {:.2f})",
                                      kind == af::V4LayerKind::csa   ? "CSA"
                                      : kind == af::V4LayerKind::hca ? "HCA"
                                                                     : "sliding",
                                      biggest),
                          worst, af::scaled_tolerance(2e-5, biggest));
      if (kind == af::V4LayerKind::csa)
        checks.expect_true("compressed_sparse_attention: the indexer's picks equal the float64 top-k",
                           selected == want.selected);
      fmt::print("\n");
    }

    // ---- 2. the cache cards --------------------------------------------------------------------------------
    const std::vector<std::int64_t> contexts = {131072, 1048576};
    for (const af::V4LayerKind kind : {af::V4LayerKind::csa, af::V4LayerKind::hca, af::V4LayerKind::sliding}) {
      fmt::print("{}", af::format_v4_layer_card(af::v4_layer_card(af::deepseek_v4_flash_shape(kind)), contexts));
      fmt::print("  (V4-Flash sizes, bf16 as the reference's tensors)\n\n");
    }
    // [whole-model]
    // Whole models, bf16. DeepSeek-V3: MLA's 576-value latent per token and layer. DeepSeek-V3.2: the same
    // plus its indexer key (128 FP8 values and one float32 scale). GQA: Llama-3.1-70B, and the V4 report's
    // baseline (GQA with 8 KV heads of 128 and V4-Flash's 43 layers). V4: windows, compressed entries,
    // indexer keys and pending blocks per layer kind.
    const af::ModelCache v3 = af::model_preset("DeepSeek-V3").cache(af::DType::bf16);
    const af::ModelCache v32{"DeepSeek-V3.2", "deepseek-ai/DeepSeek-V3.2-Exp config_671B_v3.2.json", 61,
                             af::dsa_card(128, 512, 64, af::DType::bf16, 64, 128, af::DType::fp8_e4m3, 1, 2048)};
    const af::ModelCache llama = af::dense_model("Llama-3.1-70B").cache(af::DType::bf16);
    const af::ModelCache gqa8{"GQA8-d128 x 43 (V4 report baseline)", "V4 report §2.3.4", 43,
                              af::dense_kv_card("GQA", 64, 8, 128, af::DType::bf16)};
    const af::InterleavedModel flash = af::deepseek_v4_flash(), pro = af::deepseek_v4_pro();
    std::vector<Row> rows;
    for (const af::ModelCache* m : {&v3, &v32, &llama, &gqa8})
      rows.push_back({m->model, static_cast<double>(m->bytes_per_token()),
                      [m](std::int64_t t) { return m->bytes_stored(t); },
                      [m](std::int64_t t) { return m->bytes_read(t); }});
    for (const af::InterleavedModel* m : {&flash, &pro}) {
      // Growth per token: between 2^19 and 2^20 tokens (both multiples of every m, no block pending) only the
      // compressed entries and indexer keys grow.
      const double per_token = double(m->bytes_stored(1 << 20) - m->bytes_stored(1 << 19)) / double(1 << 19);
      rows.push_back({m->model, per_token, [m](std::int64_t t) { return m->bytes_stored(t); },
                      [m](std::int64_t t) { return m->bytes_read(t); }});
    }
    // [/whole-model]
    fmt::print("Whole models (bf16): growing bytes per token, bytes stored and read per decode step, one sequence\n");
    fmt::print("  {:<38} {:>12} {:>12} {:>12} {:>14} {:>14}\n", "model", "B/token", "at 128K", "at 1M", "read at 128K",
               "read at 1M");
    for (const Row& r : rows)
      fmt::print("  {:<38} {:>12.1f} {:>12} {:>12} {:>14} {:>14}\n", r.model, r.per_token,
                 af::human_bytes(double(r.stored(contexts[0]))), af::human_bytes(double(r.stored(contexts[1]))),
                 af::human_bytes(double(r.read(contexts[0]))), af::human_bytes(double(r.read(contexts[1]))));
    const double flash_vs_v32 = double(flash.bytes_stored(contexts[1])) / double(v32.bytes_stored(contexts[1]));
    const double pro_vs_v32 = double(pro.bytes_stored(contexts[1])) / double(v32.bytes_stored(contexts[1]));
    const double flash_vs_gqa = double(flash.bytes_stored(contexts[1])) / double(gqa8.bytes_stored(contexts[1]));
    fmt::print(
        "  at 1M: V4-Flash holds {:.1f}% of V3.2's cache and {:.1f}% of the GQA8 baseline's; V4-Pro {:.1f}% "
        "of V3.2's\n  (V4 entries and V3.2's latents in bf16, V3.2's index keys in FP8; the report's 7% / 10%\n"
        "  compare its mixed FP8 / BF16 / FP4 format with V3.2 in FP8, its 2% with a bf16 GQA8 baseline)\n\n",
        100 * flash_vs_v32, 100 * flash_vs_gqa, 100 * pro_vs_v32);
    checks.expect_true("V4-Flash grows by 6,880 B per token in bf16 (21 x 320 + 20 x 8)", rows[4].per_token == 6880.0);
    checks.expect_true("V4-Pro grows by 9,848 B per token in bf16 (30 x 320 + 31 x 8)", rows[5].per_token == 9848.0);
    checks.expect_true("DeepSeek-V3.2 stores 78,324 B per token (61 x (1152 + 132))", v32.bytes_per_token() == 78324);

    // The numbers the text quotes, from the same accounting.
    af::BookNumbers numbers;
    const af::V4LayerCard csa_card = af::v4_layer_card(af::deepseek_v4_flash_shape(af::V4LayerKind::csa));
    const af::V4LayerCard hca_card = af::v4_layer_card(af::deepseek_v4_flash_shape(af::V4LayerKind::hca));
    numbers.print("csa_growth_per_token", "{:.0f}", csa_card.growth_per_token());
    numbers.print("hca_growth_per_token", "{:.0f}", hca_card.growth_per_token());
    // HCA's pending block at its largest (m' - 1 tokens of raw kv and gate) against its full window.
    std::int64_t hca_pending = 0, hca_window = 0;
    for (const af::CacheCard& part : hca_card.parts) {
      if (part.mechanism == "pending block") hca_pending = part.bytes_per_token() * (hca_card.shape.ratio - 1);
      if (part.mechanism == "window") hca_window = part.bytes_per_token() * hca_card.shape.window;
    }
    numbers.print("hca_pending_tokens", "{}", hca_card.shape.ratio - 1);
    numbers.set("hca_pending_bytes", af::human_bytes(double(hca_pending)));
    numbers.print("hca_pending_over_window", "{:.0f}", double(hca_pending) / double(hca_window));
    // V4-Flash at 1M tokens: the indexer keys one decode step reads, of everything it reads. And the growth per
    // token in the report's format: entries of 576 B (448 FP8 values, 64 RoPE values in BF16), index keys
    // assumed in FP4 (0.5 B per value); m of each part from the entries it keeps at 1M tokens.
    std::int64_t index_key_reads = 0;
    double report_per_token = 0.0;
    const double index_width = static_cast<double>(csa_card.shape.index_head_dim);
    for (const af::ModelCache& part : flash.parts) {
      const double m = double(contexts[1]) / double(std::max<std::int64_t>(1, part.card.stored_tokens(contexts[1])));
      if (part.card.mechanism == "indexer keys") {
        index_key_reads += part.bytes_read(contexts[1]);
        report_per_token += double(part.layers) * 0.5 * index_width / m;
      }
      if (part.card.mechanism == "compressed entries") report_per_token += double(part.layers) * 576.0 / m;
    }
    numbers.set("flash_index_key_reads_1m", af::human_bytes(double(index_key_reads)));
    numbers.set("flash_reads_1m", af::human_bytes(double(flash.bytes_read(contexts[1]))));
    numbers.set("flash_report_format_per_token", af::with_thousands(std::llround(report_per_token)));
    numbers.set("flash_per_token", af::with_thousands(std::llround(rows[4].per_token)));

    // ---- 3. selection, measured -----------------------------------------------------------------------------
    af::V4Shape ps = tiny_shape(af::V4LayerKind::csa);
    ps.hidden = 64, ps.head_dim = 32, ps.window = 16, ps.index_head_dim = 32;
    const std::int64_t queries = 8, needle_at = 40;
    const std::vector<std::int64_t> ks = {1, 2, 4, 8, 16, 32, 64, 128};
    const std::vector<std::int64_t> ratios = {4, 16, 64};
    std::vector<std::string> inputs = {"random", "needle", "repeated"};
    fmt::print(
        "Selection, measured: context {}, H = 4, c = 32, window 16, logits x {}, the last {} queries;\n"
        "share of dense attention's mass over the compressed entries that the top-k entries capture\n"
        "(aligned indexer / the layer's random indexer)\n",
        context, sharpness, queries);
    fmt::print("  {:<8} {:>3}", "input", "m");
    for (std::int64_t k : ks) fmt::print(" {:>11}", fmt::format("k={}", k));
    fmt::print("\n");
    std::string mass_data = "# input m k aligned random (mean captured share of the entries' attention mass)\n";
    Probe needle_probe{};
    std::string needle_lines;
    for (const std::string& input : inputs)
      for (const std::int64_t m : ratios) {
        af::V4Shape sm = ps;
        sm.ratio = m;
        af::Rng layer_rng(seed + 1000);  // the same weights for every input (position_bias sized by m)
        Layer layer = random_layer(layer_rng, sm);
        // Random weights give nearly uniform attention (logits of standard deviation ~1); a trained layer's
        // is peakier. Scaling the norm gains of the window entries and of the compressed entries by
        // `sharpness` scales every logit by it.
        for (af::Tensor* g : {&layer.w.kv_norm, &layer.w.compressor.kv_norm})
          for (float& v : g->values()) v *= static_cast<float>(sharpness);
        af::Rng input_rng(seed + 2000);
        const Tensor x = make_input(input, layer, context, input_rng, needle_at);
        const Probe p = probe(layer, x, queries);
        fmt::print("  {:<8} {:>3}", input, m);
        for (std::int64_t k : ks) {
          const double aligned = mean_captured(p, m, k, true), random = mean_captured(p, m, k, false);
          fmt::print(" {:>5.3f}/{:<5.3f}", aligned, random);
          if (input == "random" && m == 4 && (k == 16 || k == 64))
            numbers.print(fmt::format("random_aligned_percent_k{}", k), "{:.0f}", 100 * aligned);
          mass_data += fmt::format("{} {} {} {:.6f} {:.6f}\n", input, m, k, aligned, random);
        }
        fmt::print("\n");
        if (input == "needle") {
          // Where the needle went: its block's entry, ranked by both indexers for the last query, and the share
          // of the entries' dense attention mass that this one entry holds.
          const std::size_t last = p.q.size() - 1;
          const std::int64_t e = needle_at / m;
          const auto rank_of = [e](const std::vector<float>& scores) {
            const std::vector<std::int64_t> order = af::top_k(scores, static_cast<std::int64_t>(scores.size()));
            return std::distance(order.begin(), std::ranges::find(order, e)) + 1;
          };
          const std::vector<float> aligned = scores_of(p, last, m, true), random = scores_of(p, last, m, false);
          needle_lines += fmt::format(
              "  needle at token {}, m = {:>2}: entry {} of {}; rank {} (aligned indexer), {} (random); "
              "{:.3f} of the mass\n",
              needle_at, m, e, aligned.size(), rank_of(aligned), rank_of(random), captured_mass(p, last, m, {e}));
          if (m == 4) needle_probe = p;
          numbers.print(fmt::format("needle_rank_m{}", m), "{}", rank_of(aligned));
          numbers.print(fmt::format("needle_mass_m{}", m), "{:.3f}", captured_mass(p, last, m, {e}));
        }
      }
    fmt::print("{}\n", needle_lines);
    const std::size_t last = static_cast<std::size_t>(queries - 1);
    const std::vector<float> aligned_scores = scores_of(needle_probe, last, 4, true);
    const std::vector<float> random_scores = scores_of(needle_probe, last, 4, false);

    // ---- 4. figure data -------------------------------------------------------------------------------------
    if (!out_dir.empty()) {
      const std::filesystem::path dir = af::make_output_directory(out_dir);
      numbers.write(dir);
      af::write_output_file(dir / "captured_mass.dat", [&](af::OutputFile& f) { f.print("{}", mass_data); });
      af::write_output_file(dir / "index_scores.dat", [&](af::OutputFile& f) {
        f.print(
            "# entry first_token aligned_score aligned_selected random_score random_selected (needle input, m = 4, "
            "k = 8, last query; selected: the score, else NaN)\n");
        const auto a = af::top_k(aligned_scores, 8), b = af::top_k(random_scores, 8);
        for (std::size_t e = 0; e < aligned_scores.size(); ++e) {
          const bool in_a = std::ranges::find(a, std::int64_t(e)) != a.end();
          const bool in_b = std::ranges::find(b, std::int64_t(e)) != b.end();
          f.print("{} {} {:.6g} {} {:.6g} {}\n", e, e * 4, aligned_scores[e],
                  in_a ? fmt::format("{:.6g}", aligned_scores[e]) : "NaN", random_scores[e],
                  in_b ? fmt::format("{:.6g}", random_scores[e]) : "NaN");
        }
      });
      const af::V4LayerCard csa = af::v4_layer_card(af::deepseek_v4_flash_shape(af::V4LayerKind::csa));
      const af::V4LayerCard hca = af::v4_layer_card(af::deepseek_v4_flash_shape(af::V4LayerKind::hca));
      const af::V4LayerCard win = af::v4_layer_card(af::deepseek_v4_flash_shape(af::V4LayerKind::sliding));
      const auto entries = [](const af::CacheCard& card, std::int64_t t) {
        std::int64_t n = 0;
        for (const af::DecodeRead& r : card.decode_reads(t)) n += r.entries;
        return n;
      };
      af::write_output_file(dir / "decode_reads.dat", [&](af::OutputFile& f) {
        f.print(
            "# context, then entries and bytes read by one decode query of one layer: MLA (V3), DSA (V3.2), "
            "CSA, HCA, sliding (V4-Flash), bf16\n");
        for (std::int64_t t = 1024; t <= (1 << 20); t *= 2)
          f.print("{} {} {} {} {} {} {} {} {} {} {}\n", t, entries(v3.card, t), v3.card.bytes_read(t),
                  entries(v32.card, t), v32.card.bytes_read(t), csa.entries_read(t), csa.bytes_read(t),
                  hca.entries_read(t), hca.bytes_read(t), win.entries_read(t), win.bytes_read(t));
      });
      af::write_output_file(dir / "cache_bytes.dat", [&](af::OutputFile& g) {
        g.print(
            "# context, then bytes one layer holds for one sequence: MLA (V3), DSA (V3.2), CSA, HCA, sliding "
            "(V4-Flash), bf16\n");
        for (std::int64_t t = 1024; t <= (1 << 20); t *= 2)
          g.print("{} {} {} {} {} {}\n", t, v3.card.bytes_stored(t), v32.card.bytes_stored(t), csa.bytes_stored(t),
                  hca.bytes_stored(t), win.bytes_stored(t));
      });
      fmt::print("figure data written to {}\n", out_dir);
    }
    return checks.all_passed();
  });
}
