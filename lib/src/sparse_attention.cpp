#include "af/sparse_attention.hpp"

#include "af/error.hpp"
#include "af/linalg.hpp"
#include "af/quantized_cache.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>

namespace af {

void IndexerShape::validate() const {
  require(hidden > 0 && q_lora_rank > 0 && heads > 0 && head_dim > 0 && top_k > 0,
          "IndexerShape: hidden {}, q_lora_rank {}, heads {}, head_dim {}, top_k {} (expected all > 0)", hidden,
          q_lora_rank, heads, head_dim, top_k);
  require(rope_dim > 0 && rope_dim % 2 == 0 && rope_dim <= head_dim,
          "IndexerShape: rope_dim is {} (expected even, > 0 and <= head_dim {})", rope_dim, head_dim);
  require(norm_eps > 0.0, "IndexerShape: norm_eps is {} (expected > 0)", norm_eps);
}

void IndexerWeights::validate(const IndexerShape& s) const {
  s.validate();
  const auto check = [](const char* name, const Tensor& t, const Shape& expected) {
    if (!(t.shape() == expected)) fail("IndexerWeights: {} is {} (expected {})", name, t.shape().str(), expected.str());
  };
  check("wq_b", wq_b, Shape{s.heads * s.head_dim, s.q_lora_rank});
  check("wk", wk, Shape{s.head_dim, s.hidden});
  check("k_norm_weight", k_norm_weight, Shape{s.head_dim});
  check("k_norm_bias", k_norm_bias, Shape{s.head_dim});
  check("weights_proj", weights_proj, Shape{s.heads, s.hidden});
}

IndexerCache::IndexerCache(std::int64_t capacity, std::int64_t head_dim) {
  require(capacity > 0 && head_dim > 0, "IndexerCache: capacity {}, head_dim {} (expected both > 0)", capacity,
          head_dim);
  keys_ = Tensor(Shape{capacity, head_dim});
}

void IndexerCache::append(ConstMatrix keys) {
  if (keys.cols != keys_.dim(1))
    fail("IndexerCache::append: keys {} (expected [n, {}])", keys.shape_str(), keys_.dim(1));
  require(size_ + keys.rows <= keys_.dim(0), "IndexerCache::append: {} cached + {} new tokens exceed the capacity {}",
          size_, keys.rows, keys_.dim(0));
  for (std::int64_t r = 0; r < keys.rows; ++r) std::ranges::copy(keys.row(r), keys_.matrix().row(size_ + r).begin());
  size_ += keys.rows;
}

void layer_norm_rows(Matrix x, std::span<const float> gain, std::span<const float> bias, double eps) {
  require(static_cast<std::int64_t>(gain.size()) == x.cols && static_cast<std::int64_t>(bias.size()) == x.cols,
          "layer_norm_rows: {} gains and {} biases for rows of {}", gain.size(), bias.size(), x.cols);
  for (std::int64_t r = 0; r < x.rows; ++r) {
    std::span<float> row = x.row(r);
    double mean = 0.0, variance = 0.0;
    for (float v : row) mean += v;
    mean /= static_cast<double>(x.cols);
    for (float v : row) variance += (v - mean) * (v - mean);
    variance /= static_cast<double>(x.cols);
    const double inverse = 1.0 / std::sqrt(variance + eps);
    for (std::size_t c = 0; c < row.size(); ++c)
      row[c] = static_cast<float>((row[c] - mean) * inverse) * gain[c] + bias[c];
  }
}

namespace {

void check_positions(std::span<const std::int64_t> positions, std::int64_t rows, const char* who) {
  require(static_cast<std::int64_t>(positions.size()) == rows, "{}: {} positions for {} rows", who, positions.size(),
          rows);
}

}  // namespace

Tensor index_keys(ConstMatrix x, std::span<const std::int64_t> positions, const IndexerShape& s,
                  const IndexerWeights& w, const Rope& rope) {
  w.validate(s);
  require(x.cols == s.hidden, "index_keys: input has {} columns (expected hidden {})", x.cols, s.hidden);
  require(rope.head_dim() == s.rope_dim, "index_keys: RoPE of dimension {} (expected rope_dim {})", rope.head_dim(),
          s.rope_dim);
  check_positions(positions, x.rows, "index_keys");
  Tensor k = linear(x, w.wk.matrix());  // [T, head_dim]
  layer_norm_rows(k.matrix(), w.k_norm_weight.values(), w.k_norm_bias.values(), s.norm_eps);
  for (std::int64_t t = 0; t < x.rows; ++t)
    rope.rotate(k.matrix().row(t).first(static_cast<std::size_t>(s.rope_dim)),
                static_cast<double>(positions[static_cast<std::size_t>(t)]));
  return k;
}

Tensor index_queries(ConstMatrix q_latent, std::span<const std::int64_t> positions, const IndexerShape& s,
                     const IndexerWeights& w, const Rope& rope) {
  w.validate(s);
  require(q_latent.cols == s.q_lora_rank, "index_queries: query latent has {} columns (expected q_lora_rank {})",
          q_latent.cols, s.q_lora_rank);
  require(rope.head_dim() == s.rope_dim, "index_queries: RoPE of dimension {} (expected rope_dim {})", rope.head_dim(),
          s.rope_dim);
  check_positions(positions, q_latent.rows, "index_queries");
  Tensor q = linear(q_latent, w.wq_b.matrix());  // [T, heads * head_dim]
  for (std::int64_t t = 0; t < q_latent.rows; ++t)
    for (std::int64_t h = 0; h < s.heads; ++h)
      rope.rotate(
          q.matrix().row(t).subspan(static_cast<std::size_t>(h * s.head_dim), static_cast<std::size_t>(s.rope_dim)),
          static_cast<double>(positions[static_cast<std::size_t>(t)]));
  return q;
}

Tensor index_head_weights(ConstMatrix x, const IndexerShape& s, const IndexerWeights& w) {
  w.validate(s);
  require(x.cols == s.hidden, "index_head_weights: input has {} columns (expected hidden {})", x.cols, s.hidden);
  Tensor weights = linear(x, w.weights_proj.matrix());  // [T, heads]
  const double factor = 1.0 / std::sqrt(static_cast<double>(s.heads) * static_cast<double>(s.head_dim));
  for (float& v : weights.values()) v = static_cast<float>(v * factor);
  return weights;
}

Tensor index_scores(ConstMatrix queries, ConstMatrix head_weights, ConstMatrix keys, const IndexerShape& s) {
  if (queries.cols != s.heads * s.head_dim || head_weights.cols != s.heads || head_weights.rows != queries.rows ||
      keys.cols != s.head_dim)
    fail("index_scores: queries {}, head weights {}, keys {} (expected [T, {}], [T, {}], [t, {}])", queries.shape_str(),
         head_weights.shape_str(), keys.shape_str(), s.heads * s.head_dim, s.heads, s.head_dim);
  Tensor scores(Shape{queries.rows, keys.rows});
  for (std::int64_t i = 0; i < queries.rows; ++i)
    for (std::int64_t j = 0; j < keys.rows; ++j) {
      double total = 0.0;
      for (std::int64_t h = 0; h < s.heads; ++h) {
        double dot = 0.0;
        for (std::int64_t e = 0; e < s.head_dim; ++e) dot += double{queries(i, h * s.head_dim + e)} * keys(j, e);
        total += double{head_weights(i, h)} * std::max(dot, 0.0);  // ReLU, then the head's weight
      }
      scores.matrix()(i, j) = static_cast<float>(total);
    }
  return scores;
}

std::vector<std::int64_t> top_k(std::span<const float> scores, std::int64_t k) {
  require(k >= 0, "top_k: k = {} (expected >= 0)", k);
  std::vector<std::int64_t> order;
  for (std::size_t i = 0; i < scores.size(); ++i) {
    require(!std::isnan(scores[i]), "top_k: score {} is NaN", i);
    if (scores[i] > -std::numeric_limits<float>::infinity()) order.push_back(static_cast<std::int64_t>(i));
  }
  // Higher score first; of equal scores, the smaller index first (the documented tie rule).
  const auto better = [&](std::int64_t a, std::int64_t b) {
    const float sa = scores[static_cast<std::size_t>(a)], sb = scores[static_cast<std::size_t>(b)];
    return sa != sb ? sa > sb : a < b;
  };
  const auto keep = std::min<std::int64_t>(k, static_cast<std::int64_t>(order.size()));
  std::partial_sort(order.begin(), order.begin() + keep, order.end(), better);
  order.resize(static_cast<std::size_t>(keep));
  return order;
}

std::vector<std::int64_t> select_top_k(ConstMatrix scores, const Mask& allowed, std::int64_t k) {
  require(k >= 1, "select_top_k: k is {} (expected >= 1)", k);
  require(allowed.queries() == scores.rows && allowed.keys() == scores.cols,
          "select_top_k: mask is [{}, {}] (expected [{}, {}] like the scores)", allowed.queries(), allowed.keys(),
          scores.rows, scores.cols);
  std::vector<std::int64_t> selected(static_cast<std::size_t>(scores.rows * k), -1);
  std::vector<float> row(static_cast<std::size_t>(scores.cols));
  for (std::int64_t i = 0; i < scores.rows; ++i) {
    for (std::int64_t j = 0; j < scores.cols; ++j)  // a key the mask hides is never a candidate
      row[static_cast<std::size_t>(j)] = allowed.allows(i, j) ? scores(i, j) : -std::numeric_limits<float>::infinity();
    const std::vector<std::int64_t> best = top_k(row, k);
    std::copy(best.begin(), best.end(), selected.begin() + i * k);
  }
  return selected;
}

Mask selection_mask(std::span<const std::int64_t> selected, std::int64_t rows, std::int64_t keys, std::int64_t k) {
  require(k >= 1 && static_cast<std::int64_t>(selected.size()) == rows * k,
          "selection_mask: {} indices for {} rows of k = {}", selected.size(), rows, k);
  Mask mask(rows, keys, false);
  for (std::int64_t i = 0; i < rows; ++i)
    for (std::int64_t r = 0; r < k; ++r) {
      const std::int64_t j = selected[static_cast<std::size_t>(i * k + r)];
      if (j < 0) continue;
      require(j < keys, "selection_mask: index {} in row {} (expected < {} keys)", j, i, keys);
      mask.set(i, j, true);
    }
  return mask;
}

DsaOutput dsa_attention(ConstMatrix x, std::span<const std::int64_t> positions, const MlaShape& mla,
                        const MlaWeights& mla_weights, const IndexerShape& indexer, const IndexerWeights& index_weights,
                        const Rope& mla_rope, const Rope& index_rope, double scale, MlaPath path, MlaCache& cache,
                        IndexerCache& index_cache) {
  mla_weights.validate(mla);
  index_weights.validate(indexer);
  require(mla.q_lora_rank > 0, "dsa_attention: q_lora_rank is 0 (the indexer reads MLA's query latent)");
  require(indexer.q_lora_rank == mla.q_lora_rank && indexer.hidden == mla.hidden,
          "dsa_attention: indexer of hidden {} and q_lora_rank {} (expected MLA's {} and {})", indexer.hidden,
          indexer.q_lora_rank, mla.hidden, mla.q_lora_rank);
  require(cache.size() == index_cache.size(), "dsa_attention: MLA cache holds {} tokens, index cache {}", cache.size(),
          index_cache.size());
  const std::int64_t T = x.rows;

  // The indexer: its keys join its own cache; its queries come from MLA's normalised query latent.
  Tensor q_latent = linear(x, mla_weights.q_a_proj.matrix());
  rms_norm_rows(q_latent.matrix(), mla_weights.q_a_layernorm.values(), mla.rms_norm_eps);
  index_cache.append(index_keys(x, positions, indexer, index_weights, index_rope).matrix());
  const Tensor queries = index_queries(q_latent.matrix(), positions, indexer, index_weights, index_rope);
  const Tensor weights = index_head_weights(x, indexer, index_weights);
  const Tensor scores = index_scores(queries.matrix(), weights.matrix(), index_cache.keys(), indexer);

  // Top-k among the keys each query may see; MLA then attends over those only.
  const std::int64_t t_all = index_cache.size();
  DsaOutput out;
  out.selected = select_top_k(scores.matrix(), Mask::causal(T, t_all, t_all - T), indexer.top_k);
  const Mask chosen = selection_mask(out.selected, T, t_all, indexer.top_k);
  out.output = mla_attention(x, positions, mla, mla_weights, mla_rope, scale, path, cache, &chosen);
  return out;
}

namespace {

// The normalised Walsh-Hadamard transform of a power-of-two-long vector, in place (orthogonal: dot products kept).
void hadamard(std::span<float> v) {
  const std::size_t n = v.size();
  for (std::size_t half = 1; half < n; half *= 2)
    for (std::size_t start = 0; start < n; start += 2 * half)
      for (std::size_t i = start; i < start + half; ++i) {
        const float a = v[i], b = v[i + half];
        v[i] = a + b;
        v[i + half] = a - b;
      }
  const float norm = static_cast<float>(1.0 / std::sqrt(static_cast<double>(n)));
  for (float& e : v) e *= norm;
}

}  // namespace

Tensor emulate_index_precision(ConstMatrix rows, std::int64_t width, const IndexPrecision& p) {
  require(width > 0 && rows.cols % width == 0, "emulate_index_precision: rows of {} values (expected a multiple of {})",
          rows.cols, width);
  if (p.hadamard)
    require((width & (width - 1)) == 0, "emulate_index_precision: Hadamard over {} values (expected a power of two)",
            width);
  if (p.fp8)
    require(p.block > 0 && width % p.block == 0, "emulate_index_precision: block {} (expected to divide width {})",
            p.block, width);
  Tensor out = to_tensor(rows);
  for (std::int64_t r = 0; r < rows.rows; ++r)
    for (std::int64_t start = 0; start < rows.cols; start += width) {
      std::span<float> v =
          out.matrix().row(r).subspan(static_cast<std::size_t>(start), static_cast<std::size_t>(width));
      if (p.hadamard) hadamard(v);
      if (!p.fp8) continue;
      for (std::int64_t b = 0; b < width; b += p.block) {
        std::span<float> block = v.subspan(static_cast<std::size_t>(b), static_cast<std::size_t>(p.block));
        float amax = 0.0f;
        for (float e : block) amax = std::max(amax, std::abs(e));
        if (amax == 0.0f) continue;
        const float block_scale = amax / 448.0f;
        for (float& e : block) e = round_to_e4m3(e / block_scale) * block_scale;
      }
    }
  return out;
}

CacheCard dsa_card(std::int64_t heads, std::int64_t kv_lora_rank, std::int64_t rope_dim, DType dtype,
                   std::int64_t index_heads, std::int64_t index_head_dim, DType index_dtype, std::int64_t index_scales,
                   std::int64_t top_k) {
  require(heads > 0 && kv_lora_rank > 0 && rope_dim > 0 && index_heads > 0 && index_head_dim > 0 && top_k > 0 &&
              index_scales >= 0,
          "dsa_card: {} heads, kv_lora_rank {}, rope_dim {}, {} index heads, index_head_dim {}, {} index scales, top_k "
          "{} (expected sizes > 0, scales >= 0)",
          heads, kv_lora_rank, rope_dim, index_heads, index_head_dim, index_scales, top_k);
  CacheCard card;
  card.mechanism = "DSA (DeepSeek sparse attention: lightning indexer + top-k over MLA)";
  card.projected = fmt::format(
      "every token: MLA's q of {} heads, latent c_KV [{}] and RoPE key k_rope [{}]; the indexer's {} query heads of "
      "{} (from the query latent), one index key [{}] and {} head weights",
      heads, kv_lora_rank, rope_dim, index_heads, index_head_dim, index_head_dim, index_heads);
  card.per_token = {{"c_KV", {kv_lora_rank}, dtype, -1},
                    {"k_rope", {rope_dim}, dtype, -1},
                    {"index_key", {index_head_dim}, index_dtype, -1}};
  if (index_scales > 0) card.per_token.push_back({"index_key_scale", {index_scales}, DType::f32, -1});
  card.stored_tokens = [](std::int64_t t) { return t; };
  std::int64_t index_bytes = 0, latent_bytes = 0;
  for (const CachedTensor& c : card.per_token) (c.name.starts_with("index") ? index_bytes : latent_bytes) += c.bytes();
  // The indexer: per key and index head a dot product (2 index_head_dim) and its weighted ReLU (2); attention over
  // the chosen entries as MLA's absorbed form (mla_kv_card).
  const double index_flops =
      2.0 * static_cast<double>(index_heads * index_head_dim) + 2.0 * static_cast<double>(index_heads);
  const double latent_flops =
      2.0 * static_cast<double>(heads * (kv_lora_rank + rope_dim)) + 2.0 * static_cast<double>(heads * kv_lora_rank);
  card.decode_reads = [index_bytes, latent_bytes, top_k, index_flops, latent_flops](std::int64_t t) {
    const std::int64_t chosen = std::min(t, top_k);
    return std::vector<DecodeRead>{
        {"indexer: every cached index key", t, t * index_bytes, static_cast<double>(t) * index_flops},
        {"attention: the top-k latents and RoPE keys", chosen, chosen * latent_bytes,
         static_cast<double>(chosen) * latent_flops}};
  };
  card.trade_offs = fmt::format(
      "the cache grows by the index key ({} B per token and layer) and still holds every latent; a decode step reads "
      "at most {} latents (attention) but every index key (indexer, linear in context, small); quality depends on "
      "the indexer choosing what attention needs; a top-k per query and a second score pass cost latency",
      index_bytes, top_k);
  return card;
}

ModelCache deepseek_v32(DType dtype) {
  return {
      "DeepSeek-V3.2",
      "deepseek-ai/DeepSeek-V3.2-Exp @ 3b99a53, inference/config_671B_v3.2.json (61 layers, 128 heads, kv_lora_rank "
      "512, qk_rope_head_dim 64, index_n_heads 64, index_head_dim 128, index_topk 2048) and inference/model.py (the "
      "Indexer caches its keys in FP8 with one float32 scale per token)",
      61, dsa_card(128, 512, 64, dtype, 64, 128, DType::fp8_e4m3, 1, 2048)};
}

}  // namespace af
