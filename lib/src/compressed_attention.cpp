#include "af/compressed_attention.hpp"

#include "af/error.hpp"
#include "af/linalg.hpp"
#include "af/mla.hpp"
#include "af/sliding_window.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <functional>
#include <limits>
#include <numeric>

namespace af {

namespace {
constexpr float minus_inf = -std::numeric_limits<float>::infinity();

void check_shape(const Tensor& t, const Shape& want, std::string_view name) {
  if (t.shape() != want) fail("V4Weights: {} is {} (expected {})", name, t.shape().str(), want.str());
}

// Unweighted RMSNorm of one vector in place (the reference's q_b_norm, per head).
void rms_normalize(std::span<float> x, double eps) {
  double mean_square = 0.0;
  for (float v : x) mean_square += double{v} * v;
  mean_square /= static_cast<double>(x.size());
  const double inverse = 1.0 / std::sqrt(mean_square + eps);
  for (float& v : x) v = static_cast<float>(v * inverse);
}

// Rotates the last rope.head_dim() values of each of `heads` consecutive vectors of `width` in `row`.
void rotate_tail(std::span<float> row, std::int64_t heads, std::int64_t width, const Rope& rope, double position) {
  const auto r = static_cast<std::size_t>(rope.head_dim());
  for (std::int64_t h = 0; h < heads; ++h)
    rope.rotate(row.subspan(static_cast<std::size_t>((h + 1) * width) - r, r), position);
}
}  // namespace

std::string_view name_of(V4LayerKind kind) {
  switch (kind) {
    case V4LayerKind::sliding:
      return "sliding_attention";
    case V4LayerKind::csa:
      return "compressed_sparse_attention";
    case V4LayerKind::hca:
      return "heavily_compressed_attention";
  }
  return "?";
}

V4LayerKind v4_layer_kind(std::string_view name) {
  for (V4LayerKind k : {V4LayerKind::sliding, V4LayerKind::csa, V4LayerKind::hca})
    if (name_of(k) == name) return k;
  fail(
      "unknown DeepSeek-V4 layer type \"{}\" (expected sliding_attention, compressed_sparse_attention or "
      "heavily_compressed_attention)",
      name);
}

void V4Shape::validate() const {
  require(hidden > 0 && heads > 0 && head_dim > 0 && q_lora_rank > 0 && o_groups > 0 && o_lora_rank > 0,
          "V4Shape: hidden {}, heads {}, head_dim {}, q_lora_rank {}, o_groups {}, o_lora_rank {} (expected all > 0)",
          hidden, heads, head_dim, q_lora_rank, o_groups, o_lora_rank);
  require(rope_dim > 0 && rope_dim % 2 == 0 && rope_dim <= head_dim,
          "V4Shape: rope_dim {} (expected even, > 0 and <= head_dim {})", rope_dim, head_dim);
  require(window >= 2, "V4Shape: sliding window {} (expected >= 2: the cache keeps window - 1 tokens)", window);
  require((heads * head_dim) % o_groups == 0, "V4Shape: {} heads x {} values do not split into {} output groups", heads,
          head_dim, o_groups);
  if (kind == V4LayerKind::sliding) {
    require(ratio == 0, "V4Shape: a sliding layer with compress ratio {} (expected 0)", ratio);
    return;
  }
  require(ratio >= 1, "V4Shape: compress ratio {} for a {} layer (expected >= 1)", ratio, name_of(kind));
  if (kind == V4LayerKind::csa)
    require(index_heads > 0 && index_head_dim >= rope_dim && index_topk >= 1,
            "V4Shape: indexer heads {}, head_dim {}, top-k {} (expected > 0, >= rope_dim {}, >= 1)", index_heads,
            index_head_dim, index_topk, rope_dim);
}

void V4Weights::validate(const V4Shape& s) const {
  s.validate();
  const std::int64_t c = s.head_dim;
  check_shape(q_a_proj, Shape{s.q_lora_rank, s.hidden}, "q_a_proj");
  check_shape(q_a_norm, Shape{s.q_lora_rank}, "q_a_norm");
  check_shape(q_b_proj, Shape{s.heads * c, s.q_lora_rank}, "q_b_proj");
  check_shape(kv_proj, Shape{c, s.hidden}, "kv_proj");
  check_shape(kv_norm, Shape{c}, "kv_norm");
  check_shape(o_a_proj, Shape{s.o_groups * s.o_lora_rank, s.heads * c / s.o_groups}, "o_a_proj");
  check_shape(o_b_proj, Shape{s.hidden, s.o_groups * s.o_lora_rank}, "o_b_proj");
  check_shape(sinks, Shape{s.heads}, "sinks");
  if (!s.compressed()) return;
  const std::int64_t series = s.kind == V4LayerKind::csa ? 2 : 1;
  check_shape(compressor.kv_proj, Shape{series * c, s.hidden}, "compressor.kv_proj");
  check_shape(compressor.gate_proj, Shape{series * c, s.hidden}, "compressor.gate_proj");
  check_shape(compressor.position_bias, Shape{s.ratio, series * c}, "compressor.position_bias");
  check_shape(compressor.kv_norm, Shape{c}, "compressor.kv_norm");
  if (s.kind != V4LayerKind::csa) return;
  const std::int64_t ci = s.index_head_dim;
  check_shape(indexer.kv_proj, Shape{2 * ci, s.hidden}, "compressor.indexer.kv_proj");
  check_shape(indexer.gate_proj, Shape{2 * ci, s.hidden}, "compressor.indexer.gate_proj");
  check_shape(indexer.position_bias, Shape{s.ratio, 2 * ci}, "compressor.indexer.position_bias");
  check_shape(indexer.kv_norm, Shape{ci}, "compressor.indexer.kv_norm");
  check_shape(indexer_q_b_proj, Shape{s.index_heads * ci, s.q_lora_rank}, "compressor.indexer.q_b_proj");
  check_shape(indexer_weights_proj, Shape{s.index_heads, s.hidden}, "compressor.indexer.scorer.weights_proj");
}

std::vector<float> pool_entry(ConstMatrix kv, ConstMatrix gates) {
  if (kv.rows != gates.rows || kv.cols != gates.cols)
    fail("pool_entry: kv {} and gates {} (expected the same shape)", kv.shape_str(), gates.shape_str());
  std::vector<float> entry(static_cast<std::size_t>(kv.cols), 0.0f);
  for (std::int64_t ch = 0; ch < kv.cols; ++ch) {
    float top = minus_inf;
    for (std::int64_t s = 0; s < kv.rows; ++s) top = std::max(top, gates(s, ch));
    require(top > minus_inf, "pool_entry: channel {} has no slot with a finite gate", ch);
    double total = 0.0, mixed = 0.0;
    for (std::int64_t s = 0; s < kv.rows; ++s) {
      const double e = std::exp(double{gates(s, ch)} - top);  // exp(-inf) = 0: a slot left out
      total += e;
      mixed += e * kv(s, ch);
    }
    entry[static_cast<std::size_t>(ch)] = static_cast<float>(mixed / total);
  }
  return entry;
}

Compressor::Compressor(std::int64_t width, std::int64_t ratio, bool overlapping)
    : width_(width), ratio_(ratio), overlapping_(overlapping) {
  require(width >= 1 && ratio >= 1, "Compressor: width {} and ratio {} (expected >= 1)", width, ratio);
}

ConstMatrix Compressor::entries() const { return {entries_.data(), size(), width_, width_}; }

std::int64_t Compressor::pending() const {
  return static_cast<std::int64_t>(pending_kv_.size()) / ((overlapping_ ? 2 : 1) * width_);
}

std::int64_t Compressor::values_held() const {
  return static_cast<std::int64_t>(entries_.size() + pending_kv_.size() + pending_gate_.size() + overlap_kv_.size() +
                                   overlap_gate_.size());
}

std::int64_t Compressor::push(ConstMatrix kv, ConstMatrix gate, const CompressorWeights& w, const Rope& rope,
                              double eps) {
  const std::int64_t c = width_, m = ratio_, cols = (overlapping_ ? 2 : 1) * c, r = rope.head_dim();
  if (kv.cols != cols || gate.cols != cols || kv.rows != gate.rows)
    fail("Compressor::push: kv {} and gate {} (expected [n, {}] each)", kv.shape_str(), gate.shape_str(), cols);
  if (w.position_bias.shape() != Shape{m, cols} || w.kv_norm.shape() != Shape{c})
    fail("Compressor::push: position_bias {} and kv_norm {} (expected [{}, {}] and [{}])",
         w.position_bias.shape().str(), w.kv_norm.shape().str(), m, cols, c);
  require(r <= c, "Compressor::push: RoPE over {} values of entries of {}", r, c);
  for (std::int64_t t = 0; t < kv.rows; ++t) {
    pending_kv_.insert(pending_kv_.end(), kv.row(t).begin(), kv.row(t).end());
    pending_gate_.insert(pending_gate_.end(), gate.row(t).begin(), gate.row(t).end());
  }
  std::int64_t emitted = 0;
  while (pending() >= m) {
    // The block's gates with the position bias of each token's offset in it.
    std::vector<float> biased(pending_gate_.begin(), pending_gate_.begin() + m * cols);
    for (std::int64_t j = 0; j < m; ++j)
      for (std::int64_t ch = 0; ch < cols; ++ch)
        biased[static_cast<std::size_t>(j * cols + ch)] += w.position_bias.at({j, ch});
    // Slots: [Ca of the previous block (when held) ; this block's Cb] for overlapping windows, else the block.
    const std::int64_t own = overlapping_ ? c : 0;  // where this block's series starts in a row
    const std::int64_t prior = overlapping_ && has_overlap() ? m : 0;
    Tensor slots_kv(Shape{prior + m, c}), slots_gate(Shape{prior + m, c});
    for (std::int64_t j = 0; j < prior; ++j)
      for (std::int64_t ch = 0; ch < c; ++ch) {
        slots_kv.at({j, ch}) = overlap_kv_[static_cast<std::size_t>(j * c + ch)];
        slots_gate.at({j, ch}) = overlap_gate_[static_cast<std::size_t>(j * c + ch)];
      }
    for (std::int64_t j = 0; j < m; ++j)
      for (std::int64_t ch = 0; ch < c; ++ch) {
        slots_kv.at({prior + j, ch}) = pending_kv_[static_cast<std::size_t>(j * cols + own + ch)];
        slots_gate.at({prior + j, ch}) = biased[static_cast<std::size_t>(j * cols + own + ch)];
      }
    std::vector<float> entry = pool_entry(slots_kv.matrix(), slots_gate.matrix());
    rms_norm_rows(Matrix{entry.data(), 1, c, c}, w.kv_norm.values(), eps);
    rope.rotate(std::span(entry).last(static_cast<std::size_t>(r)), static_cast<double>(size() * m));
    entries_.insert(entries_.end(), entry.begin(), entry.end());
    if (overlapping_) {  // keep this block's Ca half for the next entry
      overlap_kv_.assign(static_cast<std::size_t>(m * c), 0.0f);
      overlap_gate_.assign(static_cast<std::size_t>(m * c), 0.0f);
      for (std::int64_t j = 0; j < m; ++j)
        for (std::int64_t ch = 0; ch < c; ++ch) {
          overlap_kv_[static_cast<std::size_t>(j * c + ch)] = pending_kv_[static_cast<std::size_t>(j * cols + ch)];
          overlap_gate_[static_cast<std::size_t>(j * c + ch)] = biased[static_cast<std::size_t>(j * cols + ch)];
        }
    }
    pending_kv_.erase(pending_kv_.begin(), pending_kv_.begin() + m * cols);
    pending_gate_.erase(pending_gate_.begin(), pending_gate_.begin() + m * cols);
    ++emitted;
  }
  return emitted;
}

V4Cache::V4Cache(const V4Shape& shape)
    : width_(shape.head_dim),
      keep_(shape.window - 1),
      compressor_(shape.head_dim, std::max<std::int64_t>(shape.ratio, 1), shape.kind == V4LayerKind::csa),
      indexer_(std::max<std::int64_t>(shape.index_head_dim, 1), std::max<std::int64_t>(shape.ratio, 1), true) {
  shape.validate();
}

ConstMatrix V4Cache::window() const { return {window_.data(), window_rows(), width_, width_}; }

void V4Cache::append_window(ConstMatrix kv) {
  require(kv.cols == width_, "V4Cache::append_window: rows of {} (expected {})", kv.cols, width_);
  for (std::int64_t t = 0; t < kv.rows; ++t) window_.insert(window_.end(), kv.row(t).begin(), kv.row(t).end());
  seen_ += kv.rows;
  const std::int64_t extra = window_rows() - keep_;
  if (extra > 0) window_.erase(window_.begin(), window_.begin() + extra * width_);
}

std::int64_t V4Cache::values_held() const {
  return static_cast<std::int64_t>(window_.size()) + compressor_.values_held() + indexer_.values_held();
}

std::vector<float> index_scores(std::span<const float> q, ConstMatrix keys, std::span<const float> weights) {
  const std::int64_t heads = static_cast<std::int64_t>(weights.size()), ci = keys.cols;
  require(heads > 0 && static_cast<std::int64_t>(q.size()) == heads * ci,
          "index_scores: a query of {} values for {} heads of {} (expected heads x width)", q.size(), heads, ci);
  const double scale = 1.0 / std::sqrt(static_cast<double>(ci));
  std::vector<float> out(static_cast<std::size_t>(keys.rows), 0.0f);
  for (std::int64_t s = 0; s < keys.rows; ++s) {
    double total = 0.0;
    for (std::int64_t h = 0; h < heads; ++h) {
      const float d = dot(q.subspan(static_cast<std::size_t>(h * ci), static_cast<std::size_t>(ci)), keys.row(s));
      total += weights[static_cast<std::size_t>(h)] * (std::max(d, 0.0f) * scale);
    }
    out[static_cast<std::size_t>(s)] = static_cast<float>(total);
  }
  return out;
}

double v4_scale(const V4Shape& shape) { return 1.0 / std::sqrt(static_cast<double>(shape.head_dim)); }

Tensor v4_attention(ConstMatrix x, std::span<const std::int64_t> positions, const V4Shape& s, const V4Weights& w,
                    const Rope& rope, V4Cache& cache, V4Trace* trace) {
  w.validate(s);
  const std::int64_t n = x.rows, H = s.heads, c = s.head_dim, r = s.rope_dim;
  require(x.cols == s.hidden, "v4_attention: x has {} columns (expected hidden {})", x.cols, s.hidden);
  require(static_cast<std::int64_t>(positions.size()) == n, "v4_attention: {} positions for {} rows", positions.size(),
          n);
  require(rope.head_dim() == r && rope.layout() == RopeLayout::adjacent,
          "v4_attention: RoPE of dimension {} (expected rope_dim {} in the adjacent layout)", rope.head_dim(), r);
  const auto pos = [&](std::int64_t i) { return static_cast<double>(positions[static_cast<std::size_t>(i)]); };

  // Queries: low-rank path with a weighted RMSNorm, then an unweighted RMSNorm per head, RoPE on the tail.
  Tensor q_residual = linear(x, w.q_a_proj.matrix());  // [n, d_c]
  rms_norm_rows(q_residual.matrix(), w.q_a_norm.values(), s.rms_norm_eps);
  Tensor q = linear(q_residual.matrix(), w.q_b_proj.matrix());  // [n, H c]
  for (std::int64_t i = 0; i < n; ++i) {
    for (std::int64_t h = 0; h < H; ++h)
      rms_normalize(q.matrix().row(i).subspan(static_cast<std::size_t>(h * c), static_cast<std::size_t>(c)),
                    s.rms_norm_eps);
    rotate_tail(q.matrix().row(i), H, c, rope, pos(i));
  }
  // The one shared K = V head: normalised, RoPE on the tail.
  Tensor kv = linear(x, w.kv_proj.matrix());  // [n, c]
  rms_norm_rows(kv.matrix(), w.kv_norm.values(), s.rms_norm_eps);
  for (std::int64_t i = 0; i < n; ++i) rotate_tail(kv.matrix().row(i), 1, c, rope, pos(i));

  // Compressed entries: every block completed by these tokens becomes an entry.
  if (s.compressed()) {
    const Tensor ckv = linear(x, w.compressor.kv_proj.matrix()), gate = linear(x, w.compressor.gate_proj.matrix());
    cache.compressor().push(ckv.matrix(), gate.matrix(), w.compressor, rope, s.rms_norm_eps);
  }
  const ConstMatrix entries = cache.compressor().entries();
  const std::int64_t n_entries = s.compressed() ? entries.rows : 0;

  // Which entries each query sees: every complete one (HCA) or its indexer's top-k among them (CSA).
  std::vector<std::vector<std::int64_t>> visible(static_cast<std::size_t>(n));
  if (trace) *trace = V4Trace{};
  if (s.kind == V4LayerKind::csa) {
    const Tensor ikv = linear(x, w.indexer.kv_proj.matrix()), igate = linear(x, w.indexer.gate_proj.matrix());
    cache.indexer().push(ikv.matrix(), igate.matrix(), w.indexer, rope, s.rms_norm_eps);
    const ConstMatrix keys = cache.indexer().entries();
    require(keys.rows == n_entries, "v4_attention: {} indexer keys for {} entries", keys.rows, n_entries);
    Tensor qi = linear(q_residual.matrix(), w.indexer_q_b_proj.matrix());  // [n, H_I c_I]
    Tensor weights = linear(x, w.indexer_weights_proj.matrix());           // [n, H_I]
    const float weight_scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(s.index_heads)));
    for (float& v : weights.values()) v *= weight_scale;
    const std::int64_t k_call = std::min(s.index_topk, n_entries);
    for (std::int64_t i = 0; i < n; ++i) {
      rotate_tail(qi.matrix().row(i), s.index_heads, s.index_head_dim, rope, pos(i));
      std::vector<float> scores = index_scores(qi.matrix().row(i), keys, weights.matrix().row(i));
      const std::int64_t limit = (positions[static_cast<std::size_t>(i)] + 1) / s.ratio;  // entries < limit complete
      for (std::int64_t e = limit; e < n_entries; ++e) scores[static_cast<std::size_t>(e)] = minus_inf;
      std::vector<std::int64_t> chosen = top_k(scores, k_call);
      visible[static_cast<std::size_t>(i)] = chosen;
      if (trace) {
        chosen.resize(static_cast<std::size_t>(k_call), -1);
        trace->selected.push_back(std::move(chosen));
        trace->scores.push_back(std::move(scores));
      }
    }
  } else if (s.kind == V4LayerKind::hca) {
    for (std::int64_t i = 0; i < n; ++i) {
      const std::int64_t limit = std::min((positions[static_cast<std::size_t>(i)] + 1) / s.ratio, n_entries);
      visible[static_cast<std::size_t>(i)].resize(static_cast<std::size_t>(limit));
      std::iota(visible[static_cast<std::size_t>(i)].begin(), visible[static_cast<std::size_t>(i)].end(), 0);
    }
  }

  // Attention: per head, one softmax over [window keys seen ; visible entries] and the head's sink logit.
  const ConstMatrix held = cache.window();
  const std::int64_t first_held = cache.window_first(), first_new = cache.seen();
  const double scale = v4_scale(s);
  Tensor context(Shape{n, H * c});
  for (std::int64_t i = 0; i < n; ++i) {
    std::vector<std::span<const float>> rows;
    for (std::int64_t j = 0; j < held.rows; ++j)
      if (in_window(first_new + i, first_held + j, s.window)) rows.push_back(held.row(j));
    for (std::int64_t j = 0; j <= i; ++j)
      if (in_window(first_new + i, first_new + j, s.window)) rows.push_back(kv.matrix().row(j));
    const std::int64_t window_keys = static_cast<std::int64_t>(rows.size());
    for (std::int64_t e : visible[static_cast<std::size_t>(i)]) rows.push_back(entries.row(e));
    if (trace) {
      trace->window_keys.push_back(window_keys);
      trace->entry_keys.push_back(static_cast<std::int64_t>(rows.size()) - window_keys);
      trace->weights.emplace_back();
    }
    for (std::int64_t h = 0; h < H; ++h) {
      const std::span<float> qh =
          q.matrix().row(i).subspan(static_cast<std::size_t>(h * c), static_cast<std::size_t>(c));
      std::vector<double> logits(rows.size());
      const double sink = w.sinks.values()[static_cast<std::size_t>(h)];
      double top = sink;
      for (std::size_t j = 0; j < rows.size(); ++j) top = std::max(top, logits[j] = double{dot(qh, rows[j])} * scale);
      double total = std::exp(sink - top);
      for (double& l : logits) total += (l = std::exp(l - top));
      const std::span<float> out =
          context.matrix().row(i).subspan(static_cast<std::size_t>(h * c), static_cast<std::size_t>(c));
      for (std::size_t j = 0; j < rows.size(); ++j) axpy(static_cast<float>(logits[j] / total), rows[j], out);
      if (trace) {
        std::vector<float> p;
        for (double l : logits) p.push_back(static_cast<float>(l / total));
        p.push_back(static_cast<float>(std::exp(sink - top) / total));
        trace->weights.back().push_back(std::move(p));
      }
    }
    // The values carried their keys' rotation (K = V): undo it at the query's position.
    rotate_tail(context.matrix().row(i), H, c, rope, -pos(i));
  }
  cache.append_window(kv.matrix());

  // Grouped output projection: group g's H c / g values to d_g through its block of o_a_proj, then o_b_proj.
  const std::int64_t g = s.o_groups, per_group = H * c / g, dg = s.o_lora_rank;
  Tensor mid(Shape{n, g * dg});
  for (std::int64_t i = 0; i < n; ++i)
    for (std::int64_t grp = 0; grp < g; ++grp) {
      const std::span<const float> in = context.matrix().row(i).subspan(static_cast<std::size_t>(grp * per_group),
                                                                        static_cast<std::size_t>(per_group));
      for (std::int64_t o = 0; o < dg; ++o) mid.at({i, grp * dg + o}) = dot(in, w.o_a_proj.matrix().row(grp * dg + o));
    }
  return linear(mid.matrix(), w.o_b_proj.matrix());
}

// ---- accounting ------------------------------------------------------------------------------------------

namespace {
// One part of a V4 layer's cache: `flops_per_entry` is what a decode query spends on each entry it reads.
CacheCard part(std::string mechanism, std::string projected, CachedTensor tensor,
               std::function<std::int64_t(std::int64_t)> stored, std::function<std::int64_t(std::int64_t)> read,
               std::string what, std::string trade_offs, double flops_per_entry) {
  CacheCard card;
  card.mechanism = std::move(mechanism);
  card.projected = std::move(projected);
  card.per_token = {std::move(tensor)};
  card.stored_tokens = std::move(stored);
  const std::int64_t bytes = card.bytes_per_token();
  card.decode_reads = [read, bytes, what, flops_per_entry](std::int64_t t) {
    const std::int64_t entries = read(t);
    return std::vector<DecodeRead>{{what, entries, entries * bytes, static_cast<double>(entries) * flops_per_entry}};
  };
  card.trade_offs = std::move(trade_offs);
  return card;
}
}  // namespace

V4LayerCard v4_layer_card(const V4Shape& s, DType dtype) {
  s.validate();
  V4LayerCard card{s, {}};
  const std::int64_t W = s.window, c = s.head_dim, m = s.ratio;
  // Per entry attended: every head scores it (2 c) and mixes it in as its value (2 c, K = V). Per indexer key:
  // every index head's dot product (2 c_I) and weighted ReLU (2). The pending and overlap rows are not attended.
  const double entry_flops = 4.0 * static_cast<double>(s.heads * c);
  const double index_flops =
      2.0 * static_cast<double>(s.index_heads * s.index_head_dim) + 2.0 * static_cast<double>(s.index_heads);
  card.parts.push_back(part(
      "window", fmt::format("every token: one K = V entry of {} values shared by {} heads", c, s.heads),
      {"window entry", {c}, dtype, -1}, [W](std::int64_t t) { return std::min(t, W); },
      [W](std::int64_t t) { return std::min(t, W); }, "window entries",
      "a fixed per-sequence cost: W raw entries, all read at every step", entry_flops));
  if (!s.compressed()) return card;
  const bool csa = s.kind == V4LayerKind::csa;
  const std::int64_t k = s.index_topk;
  card.parts.push_back(part(
      "compressed entries", fmt::format("every {} tokens: one pooled entry of {} values", m, c),
      {"compressed entry", {c}, dtype, -1}, [m](std::int64_t t) { return t / m; },
      [m, k, csa](std::int64_t t) { return csa ? std::min(k, t / m) : t / m; },
      csa ? "top-k compressed entries" : "every compressed entry",
      csa ? "memory / m; reads bounded by k once t / m > k" : "memory and reads / m", entry_flops));
  if (csa)
    card.parts.push_back(part(
        "indexer keys", fmt::format("every {} tokens: one pooled indexer key of {} values", m, s.index_head_dim),
        {"indexer key", {s.index_head_dim}, dtype, -1}, [m](std::int64_t t) { return t / m; },
        [m](std::int64_t t) { return t / m; }, "every indexer key", "read in full at every step to score the entries",
        index_flops));
  const std::int64_t series = csa ? 2 : 1;
  const std::int64_t pending_width = 2 * series * c + (csa ? 2 * 2 * s.index_head_dim : 0);
  card.parts.push_back(part(
      "pending block", "the raw kv and gate projections of the block still filling",
      {"pending token", {pending_width}, dtype, -1}, [m](std::int64_t t) { return t % m; },
      [](std::int64_t) { return std::int64_t{0}; }, "none (read once when the block completes)",
      "bounded: at most m - 1 tokens", 0.0));
  if (csa)
    card.parts.push_back(part(
        "overlap", "the Ca half (kv and biased gates) of the last completed block",
        {"overlap token", {2 * c + 2 * s.index_head_dim}, dtype, -1}, [m](std::int64_t t) { return t >= m ? m : 0; },
        [](std::int64_t) { return std::int64_t{0}; }, "none (read when the next block completes)", "bounded: m tokens",
        0.0));
  return card;
}

std::int64_t V4LayerCard::bytes_stored(std::int64_t t) const {
  std::int64_t total = 0;
  for (const CacheCard& p : parts) total += p.bytes_stored(t);
  return total;
}

std::int64_t V4LayerCard::bytes_read(std::int64_t t) const {
  std::int64_t total = 0;
  for (const CacheCard& p : parts) total += p.bytes_read(t);
  return total;
}

std::int64_t V4LayerCard::entries_read(std::int64_t t) const {
  std::int64_t total = 0;
  for (const CacheCard& p : parts)
    for (const DecodeRead& r : p.decode_reads(t)) total += r.entries;
  return total;
}

double V4LayerCard::growth_per_token() const {
  double total = 0.0;
  for (const CacheCard& p : parts)
    if (p.mechanism == "compressed entries" || p.mechanism == "indexer keys")
      total += static_cast<double>(p.bytes_per_token()) / static_cast<double>(shape.ratio);
  return total;
}

std::int64_t V4LayerCard::bounded_bytes() const {
  std::int64_t total = 0;
  for (const CacheCard& p : parts) {
    if (p.mechanism == "window") total += p.bytes_per_token() * shape.window;
    if (p.mechanism == "pending block") total += p.bytes_per_token() * (shape.ratio - 1);
    if (p.mechanism == "overlap") total += p.bytes_per_token() * shape.ratio;
  }
  return total;
}

std::string format_v4_layer_card(const V4LayerCard& card, std::span<const std::int64_t> contexts) {
  const V4Shape& s = card.shape;
  std::string out = fmt::format("Cache card: DeepSeek-V4 {} layer (m = {})\n", name_of(s.kind), s.ratio);
  // A line longer than the book's code column (110 characters) continues under its text.
  const auto line = [&out](std::string_view label, const std::string& text) {
    for (const std::string& l : wrap_words(text, 90)) out += fmt::format("  {:<17} {}\n", label, l), label = "";
  };
  line("projected", fmt::format("q: {} heads x {} (low rank {}); one K = V head of {} (RoPE on the last {})", s.heads,
                                s.head_dim, s.q_lora_rank, s.head_dim, s.rope_dim));
  if (s.compressed())
    line("",
         fmt::format("compressor: kv and gate of {} x {} per token{}", s.kind == V4LayerKind::csa ? 2 : 1, s.head_dim,
                     s.kind == V4LayerKind::csa ? fmt::format("; indexer: kv and gate 2 x {}, {} query heads x {}",
                                                              s.index_head_dim, s.index_heads, s.index_head_dim)
                                                : std::string()));
  bool first = true;
  for (const CacheCard& p : card.parts) {
    const CachedTensor& t = p.per_token.front();
    line(first ? "cached" : "",
         fmt::format("{}: [{}] {} each ({} B)", p.mechanism, fmt::join(t.shape, ", "), name_of(t.dtype), t.bytes()));
    first = false;
  }
  first = true;
  for (const CacheCard& p : card.parts) {
    line(first ? "stored shape" : "", fmt::format("{}: [{}, {}] after t tokens", p.mechanism,
                                                  p.mechanism == "window"          ? "min(t, W)"
                                                  : p.mechanism == "pending block" ? "t mod m"
                                                  : p.mechanism == "overlap"       ? "m once t >= m"
                                                                                   : "floor(t / m)",
                                                  fmt::join(p.per_token.front().shape, ", ")));
    first = false;
  }
  line("bytes per token", fmt::format("{:.2f} B per layer, amortised (growing parts / m); bounded parts up to {} B",
                                      card.growth_per_token(), card.bounded_bytes()));
  for (std::int64_t t : contexts) {
    std::vector<std::string> reads;
    for (const CacheCard& p : card.parts)
      for (const DecodeRead& r : p.decode_reads(t))
        if (r.entries > 0) reads.push_back(fmt::format("{} {}", r.entries, r.what));
    line(t == contexts.front() ? "decode reads" : "",
         fmt::format("t = {}: {} ({} B)", t, fmt::join(reads, " + "), card.bytes_read(t)));
  }
  line("trades off", s.kind == V4LayerKind::sliding ? "nothing beyond W tokens is seen: long-range recall is lost"
                     : s.kind == V4LayerKind::csa
                         ? "memory / m; reads bounded by top-k, but every indexer key is read to score; the "
                           "indexer's misses are lost"
                         : "memory and reads / m; detail inside a block of m tokens is pooled away");
  return out;
}

namespace {
// V4-Flash and V4-Pro: config.json of deepseek-ai/DeepSeek-V4-Flash (GitHub mirror yafengge/DeepSeek-V4-Flash,
// up to commit 553034d) and the V4 report §4.2.1 for Pro; counts of compress_ratios entries 0 / 4 / 128 over the
// main layers (the last entry is the MTP layer, not counted).
V4Shape v4_shape(V4LayerKind kind, std::int64_t hidden, std::int64_t heads, std::int64_t q_lora, std::int64_t topk,
                 std::int64_t groups) {
  V4Shape s;
  s.kind = kind;
  s.hidden = hidden;
  s.heads = heads;
  s.head_dim = 512;
  s.rope_dim = 64;
  s.q_lora_rank = q_lora;
  s.window = 128;
  s.ratio = kind == V4LayerKind::csa ? 4 : kind == V4LayerKind::hca ? 128 : 0;
  s.index_heads = 64;
  s.index_head_dim = 128;
  s.index_topk = topk;
  s.o_groups = groups;
  s.o_lora_rank = 1024;
  return s;
}

InterleavedModel mixed(std::string name, std::string source, const std::array<std::int64_t, 3>& counts,
                       V4Shape (*shape)(V4LayerKind), DType dtype) {
  InterleavedModel model{std::move(name), std::move(source), {}};
  const V4LayerKind kinds[] = {V4LayerKind::sliding, V4LayerKind::csa, V4LayerKind::hca};
  for (std::size_t i = 0; i < 3; ++i) {
    if (counts[i] == 0) continue;
    for (const CacheCard& p : v4_layer_card(shape(kinds[i]), dtype).parts)
      model.parts.push_back(ModelCache{model.model, model.source, counts[i], p});
  }
  return model;
}
}  // namespace

V4Shape deepseek_v4_flash_shape(V4LayerKind kind) { return v4_shape(kind, 4096, 64, 1024, 512, 8); }
V4Shape deepseek_v4_pro_shape(V4LayerKind kind) { return v4_shape(kind, 7168, 128, 1536, 1024, 16); }

InterleavedModel deepseek_v4_flash(DType dtype) {
  return mixed("DeepSeek-V4-Flash",
               "deepseek-ai/DeepSeek-V4-Flash config.json (compress_ratios: 2 sliding, 21 CSA, 20 HCA of 43 layers)",
               {2, 21, 20}, deepseek_v4_flash_shape, dtype);
}

InterleavedModel deepseek_v4_pro(DType dtype) {
  return mixed("DeepSeek-V4-Pro",
               "DeepSeek-V4 report §4.2.1 and V4-Pro config.json (compress_ratios: 0 sliding, 30 CSA, 31 HCA of 61)",
               {0, 30, 31}, deepseek_v4_pro_shape, dtype);
}

}  // namespace af
