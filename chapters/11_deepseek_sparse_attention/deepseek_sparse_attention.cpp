// Chapter 11 — DeepSeek sparse attention (DSA, DeepSeek-V3.2): a lightning indexer picks k cached tokens per
// query, and MLA attends over those only.
//
// The indexer has its own query heads (from MLA's query latent), one small key per token (cached beside MLA's
// latent) and a per-head weight per query; its score of a cached token is a weighted sum of ReLUs of dot products.
// The program builds the indexer, the top-k selection and sparse MLA decode from scratch, checks them against the
// library (af::dsa_attention, both MLA paths: prefill then decode through the caches) and a float64 reference,
// prints the cache card, emulates the reference's FP8 indexer to measure how much the selection changes, and
// measures how much of dense attention's softmax mass the selection captures on random and constructed inputs.
//
//   build/bin/ch11_deepseek_sparse_attention [--seq-len 40] [--top-k 8] [--index-heads 8] [--context 4096]
//                                            [--seed 11] [--out DIR]

#include "af/accounting.hpp"
#include "af/error.hpp"
#include "af/linalg.hpp"
#include "af/mla.hpp"
#include "af/models.hpp"
#include "af/program.hpp"
#include "af/random.hpp"
#include "af/softmax.hpp"
#include "af/sparse_attention.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <numeric>
#include <string>
#include <vector>

namespace {

using af::ConstMatrix;
using af::Shape;
using af::Tensor;

struct Layer {
  af::MlaShape mla;
  af::MlaWeights w;
  af::IndexerShape ix;
  af::IndexerWeights iw;
};

// The caches, from scratch: MLA's latent and RoPE key per token (chapter 07), and the indexer's key per token.
struct Caches {
  std::vector<float> latent, rope_keys, index_keys;
  std::int64_t r, rope, index_dim, length = 0;
  ConstMatrix c() const { return {latent.data(), length, r, r}; }
  ConstMatrix k_pe() const { return {rope_keys.data(), length, rope, rope}; }
  ConstMatrix k_index() const { return {index_keys.data(), length, index_dim, index_dim}; }
};

// One token's queries: MLA's heads [H, nope + rope] and the normalised query latent the indexer reads.
struct Queries {
  Tensor q, q_latent;
};

Queries project_query(const Layer& l, const af::Rope& rope, ConstMatrix x_t, double position) {
  Tensor q_latent = af::linear(x_t, l.w.q_a_proj.matrix());  // [1, q_lora_rank]
  af::rms_norm_rows(q_latent.matrix(), l.w.q_a_layernorm.values(), l.mla.rms_norm_eps);
  Tensor q = af::linear(q_latent.matrix(), l.w.q_b_proj.matrix()).reshaped(Shape{l.mla.heads, l.mla.qk_head_dim()});
  for (std::int64_t h = 0; h < l.mla.heads; ++h)
    rope.rotate(q.matrix().row(h).subspan(static_cast<std::size_t>(l.mla.qk_nope_head_dim)), position);
  return {q, q_latent};
}

void compress_kv(const Layer& l, const af::Rope& rope, ConstMatrix x_t, double position, Caches& cache) {
  Tensor kv = af::linear(x_t, l.w.kv_a_proj_with_mqa.matrix());  // [1, r + rope]
  af::rms_norm_rows({kv.data(), 1, l.mla.kv_lora_rank, l.mla.kv_lora_rank}, l.w.kv_a_layernorm.values(),
                    l.mla.rms_norm_eps);
  std::span<float> k_pe = kv.values().subspan(static_cast<std::size_t>(l.mla.kv_lora_rank));
  rope.rotate(k_pe, position);
  cache.latent.insert(cache.latent.end(), kv.values().begin(), kv.values().begin() + l.mla.kv_lora_rank);
  cache.rope_keys.insert(cache.rope_keys.end(), k_pe.begin(), k_pe.end());
}

// [index-key]
// The indexer's key of one token: a projection to index_head_dim, LayerNorm (with a bias: not the RMSNorm of MLA),
// then RoPE on the *first* rope_dim values in the half-split layout. One key per token, shared by all index heads.
std::vector<float> index_key(const Layer& l, const af::Rope& index_rope, ConstMatrix x_t, double position) {
  Tensor k = af::linear(x_t, l.iw.wk.matrix());  // [1, head_dim]
  const std::span<float> v = k.values();
  double mean = 0.0, variance = 0.0;
  for (float e : v) mean += e;
  mean /= static_cast<double>(v.size());
  for (float e : v) variance += (e - mean) * (e - mean);
  variance /= static_cast<double>(v.size());
  const double inverse = 1.0 / std::sqrt(variance + l.ix.norm_eps);
  for (std::size_t c = 0; c < v.size(); ++c)
    v[c] = static_cast<float>((v[c] - mean) * inverse) * l.iw.k_norm_weight.data()[c] + l.iw.k_norm_bias.data()[c];
  index_rope.rotate(v.first(static_cast<std::size_t>(l.ix.rope_dim)), position);
  return {v.begin(), v.end()};
}
// [/index-key]

// [index-query]
// The indexer's side of one query token: `heads` query vectors from MLA's query latent (rope part first, rotated),
// and one weight per head from the hidden state, scaled by heads^-1/2 and head_dim^-1/2.
struct IndexQuery {
  Tensor q;       // [heads, head_dim]
  Tensor weight;  // [1, heads]
};
IndexQuery index_query(const Layer& l, const af::Rope& index_rope, const Queries& mla_q, ConstMatrix x_t,
                       double position) {
  Tensor q = af::linear(mla_q.q_latent.matrix(), l.iw.wq_b.matrix()).reshaped(Shape{l.ix.heads, l.ix.head_dim});
  for (std::int64_t h = 0; h < l.ix.heads; ++h)
    index_rope.rotate(q.matrix().row(h).first(static_cast<std::size_t>(l.ix.rope_dim)), position);
  Tensor weight = af::linear(x_t, l.iw.weights_proj.matrix());
  const double factor = 1.0 / std::sqrt(static_cast<double>(l.ix.heads * l.ix.head_dim));
  for (float& e : weight.values()) e = static_cast<float>(e * factor);
  return {q, weight};
}
// [/index-query]

// [index-score]
// The lightning indexer's score of every cached token for one query: I_j = sum_h w_h ReLU(q_h . k_j). The ReLU
// lets a head vote only for tokens it likes; the signed weight says how much this query trusts each head.
std::vector<float> index_scores(const Layer& l, const IndexQuery& iq, ConstMatrix keys) {
  std::vector<float> scores(static_cast<std::size_t>(keys.rows));
  for (std::int64_t j = 0; j < keys.rows; ++j) {
    double total = 0.0;
    for (std::int64_t h = 0; h < l.ix.heads; ++h) {
      double dot = 0.0;
      for (std::int64_t e = 0; e < l.ix.head_dim; ++e) dot += double{iq.q.at({h, e})} * keys(j, e);
      total += double{iq.weight.data()[h]} * std::max(dot, 0.0);
    }
    scores[static_cast<std::size_t>(j)] = static_cast<float>(total);
  }
  return scores;
}
// [/index-score]

// [select-top-k]
// The k best-scored tokens, best first. A sum of ReLUs is exactly 0 for every token that no head likes, so equal
// scores happen; they are broken by position (the earlier token first), which makes the choice deterministic.
std::vector<std::int64_t> top_k(const std::vector<float>& scores, std::int64_t k) {
  std::vector<std::int64_t> order(scores.size());
  std::iota(order.begin(), order.end(), 0);
  const auto keep = std::min<std::size_t>(static_cast<std::size_t>(k), order.size());
  std::partial_sort(
      order.begin(), order.begin() + static_cast<std::ptrdiff_t>(keep), order.end(),
      [&](std::int64_t a, std::int64_t b) { return scores[a] > scores[b] || (scores[a] == scores[b] && a < b); });
  order.resize(keep);
  return order;
}
// [/select-top-k]

ConstMatrix w_uk(const Layer& l, std::int64_t h) {
  const af::MlaShape& s = l.mla;
  return l.w.kv_b_proj.matrix().rows_slice(h * (s.qk_nope_head_dim + s.v_head_dim), s.qk_nope_head_dim);
}
ConstMatrix w_uv(const Layer& l, std::int64_t h) {
  const af::MlaShape& s = l.mla;
  return l.w.kv_b_proj.matrix().rows_slice(h * (s.qk_nope_head_dim + s.v_head_dim) + s.qk_nope_head_dim, s.v_head_dim);
}

// [sparse-step]
// Absorbed MLA (chapter 07) over the chosen tokens only: gather their latents and RoPE keys, score, softmax over
// the k of them, mix their latents, apply W_UV once. Nothing else in the cache is read.
Tensor sparse_step(const Layer& l, const Tensor& q, const Caches& cache, const std::vector<std::int64_t>& chosen,
                   double scale) {
  const af::MlaShape& s = l.mla;
  Tensor context(Shape{1, s.heads * s.v_head_dim});
  for (std::int64_t h = 0; h < s.heads; ++h) {
    const std::span<const float> q_h = q.matrix().row(h);
    const ConstMatrix q_nope{q_h.data(), 1, s.qk_nope_head_dim, s.qk_nope_head_dim};
    const Tensor q_latent = af::matmul(q_nope, w_uk(l, h));  // [1, r]
    std::vector<float> scores;
    for (std::int64_t j : chosen)
      scores.push_back(
          static_cast<float>((af::dot(q_latent.values(), cache.c().row(j)) +
                              af::dot(q_h.subspan(static_cast<std::size_t>(s.qk_nope_head_dim)), cache.k_pe().row(j))) *
                             scale));
    af::softmax(scores);
    std::vector<float> mix(static_cast<std::size_t>(s.kv_lora_rank), 0.0f);  // [r]: the chosen latents, mixed
    for (std::size_t n = 0; n < chosen.size(); ++n) af::axpy(scores[n], cache.c().row(chosen[n]), mix);
    const Tensor out = af::matmul_transposed({mix.data(), 1, s.kv_lora_rank, s.kv_lora_rank}, w_uv(l, h));
    std::ranges::copy(out.values(), context.data() + h * s.v_head_dim);
  }
  return af::linear(context.matrix(), l.w.o_proj.matrix());
}
// [/sparse-step]

Layer random_layer(af::Rng& rng, std::int64_t index_heads, std::int64_t top_k_value) {
  Layer l;
  l.mla = af::MlaShape{64, 4, 32, 32, 16, 8, 16, 1e-6};
  l.ix = af::IndexerShape{64, 32, index_heads, 32, 8, top_k_value, 1e-6};
  const auto linear = [&](std::int64_t out, std::int64_t in) {
    return af::random_normal(Shape{out, in}, rng, 1.0 / std::sqrt(static_cast<double>(in)));
  };
  const auto gain = [&](std::int64_t n) {
    Tensor g = af::random_normal(Shape{n}, rng, 0.2);
    for (float& v : g.values()) v += 1.0f;
    return g;
  };
  const af::MlaShape& s = l.mla;
  l.w.q_a_proj = linear(s.q_lora_rank, s.hidden);
  l.w.q_a_layernorm = gain(s.q_lora_rank);
  l.w.q_b_proj = linear(s.heads * s.qk_head_dim(), s.q_lora_rank);
  l.w.kv_a_proj_with_mqa = linear(s.kv_lora_rank + s.qk_rope_head_dim, s.hidden);
  l.w.kv_a_layernorm = gain(s.kv_lora_rank);
  l.w.kv_b_proj = linear(s.heads * (s.qk_nope_head_dim + s.v_head_dim), s.kv_lora_rank);
  l.w.o_proj = linear(s.hidden, s.heads * s.v_head_dim);
  l.iw.wq_b = linear(l.ix.heads * l.ix.head_dim, l.ix.q_lora_rank);
  l.iw.wk = linear(l.ix.head_dim, l.ix.hidden);
  l.iw.k_norm_weight = gain(l.ix.head_dim);
  l.iw.k_norm_bias = af::random_normal(Shape{l.ix.head_dim}, rng, 0.5);
  l.iw.weights_proj = linear(l.ix.heads, l.ix.hidden);
  return l;
}

// What the from-scratch decode produced for each token, and what the float64 reference needs to redo it.
struct Decoded {
  Tensor out;
  std::vector<std::vector<std::int64_t>> chosen;
  std::vector<Tensor> q;
  std::vector<IndexQuery> iq;
  Caches cache;
};

// The float64 reference: the same float32 projections (queries, latents, index keys), then index scores,
// selection and MLA over the selection in float64, per-head keys and values materialised (the textbook form).
struct Reference {
  std::vector<double> out;
  std::vector<std::vector<std::int64_t>> chosen;
  double smallest_gap = 1e300;  // between the k-th and (k+1)-th score of any row with more than k visible
};
Reference reference_layer(const Layer& l, const Decoded& d, double scale) {
  const af::MlaShape& s = l.mla;
  const std::int64_t L = d.cache.length, H = s.heads, nope = s.qk_nope_head_dim, rd = s.qk_rope_head_dim,
                     dv = s.v_head_dim, r = s.kv_lora_rank, k = l.ix.top_k;
  Reference ref;
  std::vector<double> context(static_cast<std::size_t>(H * dv));
  for (std::int64_t i = 0; i < L; ++i) {
    std::vector<double> score(static_cast<std::size_t>(i + 1), 0.0);
    for (std::int64_t j = 0; j <= i; ++j)
      for (std::int64_t h = 0; h < l.ix.heads; ++h) {
        double dot = 0.0;
        for (std::int64_t e = 0; e < l.ix.head_dim; ++e) dot += double{d.iq[i].q.at({h, e})} * d.cache.k_index()(j, e);
        score[j] += double{d.iq[i].weight.data()[h]} * std::max(0.0, dot);
      }
    std::vector<std::int64_t> order(static_cast<std::size_t>(i + 1));
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](std::int64_t a, std::int64_t b) { return score[a] > score[b]; });
    if (i + 1 > k) ref.smallest_gap = std::min(ref.smallest_gap, score[order[k - 1]] - score[order[k]]);
    order.resize(static_cast<std::size_t>(std::min(i + 1, k)));
    std::fill(context.begin(), context.end(), 0.0);
    for (std::int64_t h = 0; h < H; ++h) {
      std::vector<double> p, keys_nope(static_cast<std::size_t>(nope)), value(static_cast<std::size_t>(dv));
      std::vector<std::vector<double>> values;
      for (std::int64_t j : order) {
        for (std::int64_t e = 0; e < nope + dv; ++e) {  // K_h and V_h of token j from its latent
          double sum = 0.0;
          for (std::int64_t c = 0; c < r; ++c)
            sum += double{l.w.kv_b_proj.at({h * (nope + dv) + e, c})} * d.cache.c()(j, c);
          (e < nope ? keys_nope[e] : value[e - nope]) = sum;
        }
        double dot = 0.0;
        for (std::int64_t e = 0; e < nope; ++e) dot += double{d.q[i].at({h, e})} * keys_nope[e];
        for (std::int64_t e = 0; e < rd; ++e) dot += double{d.q[i].at({h, nope + e})} * d.cache.k_pe()(j, e);
        p.push_back(dot * scale);
        values.push_back(value);
      }
      const double top = *std::max_element(p.begin(), p.end());
      double total = 0.0;
      for (double& e : p) total += (e = std::exp(e - top));
      for (std::size_t n = 0; n < p.size(); ++n)
        for (std::int64_t e = 0; e < dv; ++e) context[h * dv + e] += p[n] / total * values[n][e];
    }
    for (std::int64_t o = 0; o < s.hidden; ++o) {
      double sum = 0.0;
      for (std::int64_t c = 0; c < H * dv; ++c) sum += context[c] * l.w.o_proj.at({o, c});
      ref.out.push_back(sum);
    }
    ref.chosen.push_back(order);
  }
  return ref;
}

std::vector<std::int64_t> sorted(std::vector<std::int64_t> v) {
  std::erase(v, -1);
  std::sort(v.begin(), v.end());
  return v;
}

// ---- Selection, measured: one decode query against a long context built at the cache level -------------------

// The decode step of one query at the end of a context of t tokens: MLA's latents and RoPE keys, the index keys,
// and the query's MLA heads and indexer side, all through the layer's real projections.
struct Context {
  Tensor latent, rope_keys, index_keys;  // [t, r], [t, rope], [t, index_head_dim]
  Tensor q;                              // [H, nope + rope]
  IndexQuery iq;
};

Context random_context(const Layer& l, const af::Rope& rope, const af::Rope& index_rope, std::int64_t t, af::Rng& rng) {
  const Tensor x = af::random_normal(Shape{t, l.mla.hidden}, rng);
  std::vector<std::int64_t> positions(static_cast<std::size_t>(t));
  std::iota(positions.begin(), positions.end(), 0);
  Context ctx;
  const Tensor kv = af::linear(x.matrix(), l.w.kv_a_proj_with_mqa.matrix());
  ctx.latent = af::to_tensor({kv.data(), t, l.mla.kv_lora_rank, kv.dim(1)});
  ctx.rope_keys = af::to_tensor({kv.data() + l.mla.kv_lora_rank, t, l.mla.qk_rope_head_dim, kv.dim(1)});
  af::rms_norm_rows(ctx.latent.matrix(), l.w.kv_a_layernorm.values(), l.mla.rms_norm_eps);
  rope.rotate_rows(ctx.rope_keys.matrix(), positions);
  ctx.index_keys = af::index_keys(x.matrix(), positions, l.ix, l.iw, index_rope);
  const ConstMatrix x_q = x.matrix().rows_slice(t - 1, 1);
  const Queries mq = project_query(l, rope, x_q, static_cast<double>(t - 1));
  ctx.q = mq.q;
  ctx.iq = index_query(l, index_rope, mq, x_q, static_cast<double>(t - 1));
  return ctx;
}

// Dense attention's softmax weights of every head over all t tokens (absorbed scores): [H][t].
std::vector<std::vector<double>> dense_weights(const Layer& l, const Context& ctx, double scale) {
  const af::MlaShape& s = l.mla;
  std::vector<std::vector<double>> p(static_cast<std::size_t>(s.heads));
  for (std::int64_t h = 0; h < s.heads; ++h) {
    const std::span<const float> q_h = ctx.q.matrix().row(h);
    const Tensor q_latent = af::matmul({q_h.data(), 1, s.qk_nope_head_dim, s.qk_nope_head_dim}, w_uk(l, h));
    std::vector<double>& row = p[static_cast<std::size_t>(h)];
    for (std::int64_t j = 0; j < ctx.latent.dim(0); ++j)
      row.push_back(
          (af::dot(q_latent.values(), ctx.latent.matrix().row(j)) +
           af::dot(q_h.subspan(static_cast<std::size_t>(s.qk_nope_head_dim)), ctx.rope_keys.matrix().row(j))) *
          scale);
    const double top = *std::max_element(row.begin(), row.end());
    double total = 0.0;
    for (double& e : row) total += (e = std::exp(e - top));
    for (double& e : row) e /= total;
  }
  return p;
}

// [captured-mass]
// The share of dense attention's softmax mass that falls on the selected tokens, averaged over MLA's heads: 1 when
// the selection keeps everything attention uses, k / t when it is no better than chance on flat attention.
double captured_mass(const std::vector<std::vector<double>>& dense, const std::vector<std::int64_t>& chosen) {
  double total = 0.0;
  for (const auto& head : dense)
    for (std::int64_t j : chosen) total += head[static_cast<std::size_t>(j)];
  return total / static_cast<double>(dense.size());
}
// [/captured-mass]

// The direction in latent space that all of MLA's heads score highest for this query: sum_h W_UK_h^T q_nope_h.
std::vector<float> favourite_latent(const Layer& l, const Context& ctx) {
  const af::MlaShape& s = l.mla;
  std::vector<float> u(static_cast<std::size_t>(s.kv_lora_rank), 0.0f);
  for (std::int64_t h = 0; h < s.heads; ++h) {
    const Tensor q_latent =
        af::matmul({ctx.q.matrix().row(h).data(), 1, s.qk_nope_head_dim, s.qk_nope_head_dim}, w_uk(l, h));
    af::axpy(1.0f, q_latent.values(), u);
  }
  return u;
}
// The index key the indexer scores highest for this query, to first order: sum_h w_h q_h.
std::vector<float> favourite_index_key(const Layer& l, const Context& ctx) {
  std::vector<float> v(static_cast<std::size_t>(l.ix.head_dim), 0.0f);
  for (std::int64_t h = 0; h < l.ix.heads; ++h) af::axpy(ctx.iq.weight.data()[h], ctx.iq.q.matrix().row(h), v);
  return v;
}
// Overwrites row j of `m` with `direction` scaled to `length` times the row's own length (plus a little noise, so
// that planted copies never tie exactly).
void plant(Tensor& m, std::int64_t j, const std::vector<float>& direction, double length, af::Rng& rng) {
  const std::span<float> row = m.matrix().row(j);
  double own = 0.0, dir = 0.0;
  for (float e : row) own += double{e} * e;
  for (float e : direction) dir += double{e} * e;
  const double factor = length * std::sqrt(own / dir);
  for (std::size_t c = 0; c < row.size(); ++c)
    row[c] = static_cast<float>(direction[c] * factor * (1.0 + 0.02 * rng.normal()));
}

enum class Input { random, needle, needle_indexer_blind, repeated };
constexpr const char* input_name(Input i) {
  switch (i) {
    case Input::random:
      return "random";
    case Input::needle:
      return "needle";
    case Input::needle_indexer_blind:
      return "needle, indexer blind";
    case Input::repeated:
      return "repeated x32";
  }
  return "";
}

// [build-inputs]
// The constructed inputs. A needle: one token far back (position t/64) whose latent points where every MLA head
// looks and whose index key points where the indexer looks. The same needle with its index key left random: the
// indexer cannot see what attention wants. A repeated pattern: 32 copies of the needle spread over the context.
Context build_input(const Layer& l, const af::Rope& rope, const af::Rope& index_rope, std::int64_t t, Input input,
                    af::Rng& rng) {
  Context ctx = random_context(l, rope, index_rope, t, rng);
  if (input == Input::random) return ctx;
  const std::vector<float> u = favourite_latent(l, ctx), v = favourite_index_key(l, ctx);
  std::vector<std::int64_t> where{t / 64};
  if (input == Input::repeated)
    for (std::int64_t n = 1; n < 32; ++n) where.push_back(t / 64 + n * (t / 40));
  for (std::int64_t j : where) {
    plant(ctx.latent, j, u, 3.0, rng);
    if (input != Input::needle_indexer_blind) plant(ctx.index_keys, j, v, 3.0, rng);
  }
  return ctx;
}
// [/build-inputs]

std::vector<float> context_scores(const Layer& l, const Context& ctx, const af::IndexPrecision& precision) {
  if (!precision.hadamard && !precision.fp8) return index_scores(l, ctx.iq, ctx.index_keys.matrix());
  const Tensor keys = af::emulate_index_precision(ctx.index_keys.matrix(), l.ix.head_dim, precision);
  const Tensor q = af::emulate_index_precision(ctx.iq.q.reshaped(Shape{1, l.ix.heads * l.ix.head_dim}).matrix(),
                                               l.ix.head_dim, precision);
  return index_scores(l, {q.reshaped(Shape{l.ix.heads, l.ix.head_dim}), ctx.iq.weight}, keys.matrix());
}

double overlap(const std::vector<std::int64_t>& a, const std::vector<std::int64_t>& b) {
  const std::vector<std::int64_t> sa = sorted(a), sb = sorted(b);
  std::vector<std::int64_t> both;
  std::ranges::set_intersection(sa, sb, std::back_inserter(both));
  return static_cast<double>(both.size()) / static_cast<double>(sa.size());
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Chapter 11: DeepSeek sparse attention (lightning indexer + top-k over MLA)",
               "ch11_deepseek_sparse_attention"};
  std::int64_t seq_len = 40, k = 8, index_heads = 8, context = 4096;
  std::uint64_t seed = 11;
  std::string out_dir;
  app.add_option("--seq-len", seq_len, "Tokens of the checked layer (half prefill, half decode)")
      ->check(CLI::Range(2, 512))
      ->capture_default_str();
  app.add_option("--top-k", k, "Tokens each query attends to (index_topk)")
      ->check(CLI::Range(1, 512))
      ->capture_default_str();
  app.add_option("--index-heads", index_heads, "Indexer query heads (index_n_heads)")
      ->check(CLI::Range(1, 16))
      ->capture_default_str();
  app.add_option("--context", context, "Context of the selection measurements (a power of two)")
      ->check(CLI::Range(256, 8192))
      ->capture_default_str();
  app.add_option("--seed", seed, "Seed of the random inputs and weights")
      ->check(af::seed_value())
      ->capture_default_str();
  app.add_option("--out", out_dir,
                 "Directory for the figure data (index_scores.dat, decode_reads.dat, cache_bytes.dat, "
                 "captured_mass.dat) and numbers.json")
      ->check(af::output_directory());

  return af::run_program(app, argc, argv, [&] {
    // The selection measurements score every token of the context with every indexer head, the layer check
    // every pair of its T tokens: each stays within seconds.
    af::require_product_within({{"--context", context}, {"--index-heads", index_heads}}, 8192 * 8);
    af::require_product_within({{"--seq-len", seq_len}, {"--seq-len", seq_len}, {"--index-heads", index_heads}},
                               512 * 512 * 8);
    af::require_product_within({{"--seq-len", seq_len}, {"--top-k", k}}, 512 * 128);
    af::require((context & (context - 1)) == 0, "--context {} (expected a power of two)", context);
    af::Rng rng(seed);
    const Layer l = random_layer(rng, index_heads, k);
    const af::Rope rope(l.mla.qk_rope_head_dim, 10000.0, af::RopeLayout::adjacent);
    const af::Rope index_rope(l.ix.rope_dim, 10000.0, af::RopeLayout::half_split);
    const double scale = 1.0 / std::sqrt(static_cast<double>(l.mla.qk_head_dim()));
    const Tensor x = af::random_normal(Shape{seq_len, l.mla.hidden}, rng);

    fmt::print("DSA layer: hidden {}, MLA {} heads (latent {}, keys {} + {} RoPE, values {}), query latent {}\n",
               l.mla.hidden, l.mla.heads, l.mla.kv_lora_rank, l.mla.qk_nope_head_dim, l.mla.qk_rope_head_dim,
               l.mla.v_head_dim, l.mla.q_lora_rank);
    fmt::print("  indexer: {} heads of {} (RoPE on the first {}), one index key [{}] per token, top-k = {}\n",
               l.ix.heads, l.ix.head_dim, l.ix.rope_dim, l.ix.head_dim, k);
    fmt::print("  {} tokens: every query past position {} chooses {} of the tokens it may see\n\n", seq_len, k - 1, k);

    // [run-dsa]
    Decoded d{Tensor(Shape{seq_len, l.mla.hidden}),
              {},
              {},
              {},
              {{}, {}, {}, l.mla.kv_lora_rank, l.mla.qk_rope_head_dim, l.ix.head_dim}};
    for (std::int64_t t = 0; t < seq_len; ++t) {
      const ConstMatrix x_t = x.matrix().rows_slice(t, 1);
      const auto position = static_cast<double>(t);
      const Queries q = project_query(l, rope, x_t, position);
      compress_kv(l, rope, x_t, position, d.cache);
      const std::vector<float> key = index_key(l, index_rope, x_t, position);
      d.cache.index_keys.insert(d.cache.index_keys.end(), key.begin(), key.end());
      ++d.cache.length;
      const IndexQuery iq = index_query(l, index_rope, q, x_t, position);
      const std::vector<std::int64_t> chosen = top_k(index_scores(l, iq, d.cache.k_index()), k);
      std::ranges::copy(sparse_step(l, q.q, d.cache, chosen, scale).values(), d.out.matrix().row(t).begin());
      d.chosen.push_back(chosen);
      d.q.push_back(q.q);
      d.iq.push_back(iq);
    }
    // [/run-dsa]

    af::Checks checks;
    const double tolerance = af::scaled_tolerance(1e-5, af::max_abs(d.out.values()));
    std::vector<std::int64_t> positions(static_cast<std::size_t>(seq_len));
    std::iota(positions.begin(), positions.end(), 0);
    const std::int64_t prefill = seq_len / 2;
    for (const auto& [path, name] :
         {std::pair{af::MlaPath::naive, "naive"}, std::pair{af::MlaPath::absorbed, "absorbed"}}) {
      af::MlaCache cache(seq_len, l.mla.kv_lora_rank, l.mla.qk_rope_head_dim);
      af::IndexerCache index_cache(seq_len, l.ix.head_dim);
      Tensor out(Shape{seq_len, l.mla.hidden});
      std::int64_t rows_differ = 0;
      for (std::int64_t t = 0; t < seq_len; t += (t == 0 ? prefill : 1)) {
        const std::int64_t n = t == 0 ? prefill : 1;
        const af::DsaOutput step =
            af::dsa_attention(x.matrix().rows_slice(t, n), std::span(positions).subspan(t, n), l.mla, l.w, l.ix, l.iw,
                              rope, index_rope, scale, path, cache, index_cache);
        for (std::int64_t i = 0; i < n; ++i) {
          std::ranges::copy(step.output.matrix().row(i), out.matrix().row(t + i).begin());
          const std::vector<std::int64_t> lib_row(step.selected.begin() + i * k, step.selected.begin() + (i + 1) * k);
          if (sorted(lib_row) != sorted(d.chosen[t + i])) ++rows_differ;
        }
      }
      checks.expect_close(
          fmt::format("decode vs lib/ (prefill {} + decode {}), {} path", prefill, seq_len - prefill, name),
          af::max_abs_diff(d.out.values(), out.values()), tolerance);
      checks.expect_true(fmt::format("selected sets equal lib/'s in all {} rows, {} path", seq_len, name),
                         rows_differ == 0);
    }
    const Reference ref = reference_layer(l, d, scale);
    double worst = 0.0;
    std::int64_t rows_differ = 0;
    for (std::size_t i = 0; i < ref.out.size(); ++i) worst = af::worse(worst, std::abs(d.out.values()[i] - ref.out[i]));
    for (std::int64_t i = 0; i < seq_len; ++i) rows_differ += sorted(d.chosen[i]) != sorted(ref.chosen[i]) ? 1 : 0;
    checks.expect_close("decode vs float64 sparse MLA", worst, tolerance);
    checks.expect_true("selected sets equal the float64 selection", rows_differ == 0);
    fmt::print("  smallest gap between the k-th and (k+1)-th index score of a row: {:.3e} (float32 error ~1e-6)\n",
               ref.smallest_gap);
    {  // k at least the context: nothing is dropped, so DSA is dense MLA.
      Layer all = l;
      all.ix.top_k = seq_len;
      af::MlaCache dense_cache(seq_len, l.mla.kv_lora_rank, l.mla.qk_rope_head_dim), cache = dense_cache;
      af::IndexerCache index_cache(seq_len, l.ix.head_dim);
      const Tensor dense =
          af::mla_attention(x.matrix(), positions, l.mla, l.w, rope, scale, af::MlaPath::absorbed, dense_cache);
      const af::DsaOutput sparse = af::dsa_attention(x.matrix(), positions, all.mla, all.w, all.ix, all.iw, rope,
                                                     index_rope, scale, af::MlaPath::absorbed, cache, index_cache);
      checks.expect_close("DSA with k = context vs dense MLA", af::max_abs_diff(dense.values(), sparse.output.values()),
                          0.0);
    }

    // [cache-card]
    const af::CacheCard card = af::dsa_card(l.mla.heads, l.mla.kv_lora_rank, l.mla.qk_rope_head_dim, af::DType::f32,
                                            l.ix.heads, l.ix.head_dim, af::DType::f32, 0, k);
    const af::ModelCache v32{"DeepSeek-V3.2",
                             "deepseek-ai/DeepSeek-V3.2-Exp inference/config_671B_v3.2.json (61 layers, MLA as V3; "
                             "index_n_heads 64, index_head_dim 128, index_topk 2048; FP8 index keys, 1 fp32 scale)",
                             61, af::dsa_card(128, 512, 64, af::DType::bf16, 64, 128, af::DType::fp8_e4m3, 1, 2048)};
    fmt::print("\n{}",
               af::format_cache_card(card, std::vector<af::ModelCache>{v32}, std::vector<std::int64_t>{4096, 131072}));
    // [/cache-card]

    const af::ModelCache v3{"DeepSeek-V3", "deepseek-ai/DeepSeek-V3 config_671B.json", 61,
                            af::mla_kv_card(128, 512, 64, af::DType::bf16)};
    const af::ModelCache llama = af::dense_model("Llama-3.1-70B").cache(af::DType::bf16);
    fmt::print(
        "\nWhole model, one sequence, bf16 (FP8 index keys for V3.2): cache per token and reads per decode step\n");
    fmt::print("  {:<34} {:>10} {:>14} {:>14} {:>14}\n", "model", "B/token", "read at 4K", "read at 32K",
               "read at 128K");
    for (const af::ModelCache* m : {&llama, &v3, &v32}) {
      std::vector<std::string> cells;
      for (std::int64_t t : {4096, 32768, 131072})
        cells.push_back(af::human_bytes(static_cast<double>(m->bytes_read(t))));
      fmt::print("  {:<34} {:>10} {:>14} {:>14} {:>14}\n",
                 m->model + (m == &llama ? " (GQA)"
                             : m == &v3  ? " (MLA)"
                                         : " (DSA)"),
                 m->bytes_per_token(), cells[0], cells[1], cells[2]);
    }
    fmt::print(
        "  DeepSeek-V3.2 per decode step and layer at 128K: indexer reads {} ({} keys),\n"
        "  attention reads {} ({} latents)\n",
        af::human_bytes(static_cast<double>(v32.card.decode_reads(131072)[0].bytes)),
        v32.card.decode_reads(131072)[0].entries,
        af::human_bytes(static_cast<double>(v32.card.decode_reads(131072)[1].bytes)),
        v32.card.decode_reads(131072)[1].entries);
    // Per layer, dense MLA reads t latents; DSA reads t index keys and k latents: fewer bytes once
    // t (latent - index key) > k latent.
    const std::int64_t latent = v3.card.bytes_per_token(), index_key = v32.card.bytes_per_token() - latent;
    const std::int64_t v32_k = v32.card.decode_reads(131072)[1].entries;
    const std::int64_t first_fewer = v32_k * latent / (latent - index_key) + 1;
    fmt::print("  DSA reads fewer bytes than dense MLA from t = {} tokens (t ({} - {}) > {} x {} B per layer)\n",
               first_fewer, latent, index_key, v32_k, latent);
    af::BookNumbers numbers;
    numbers.set("v3_bytes_per_token", af::with_thousands(v3.bytes_per_token()));
    numbers.set("v32_bytes_per_token", af::with_thousands(v32.bytes_per_token()));
    numbers.print("v32_extra_percent", "{:.0f}",
                  100.0 * static_cast<double>(v32.bytes_per_token() - v3.bytes_per_token()) /
                      static_cast<double>(v3.bytes_per_token()));
    numbers.set("first_fewer", af::with_thousands(first_fewer));
    numbers.set("v32_read_128k", af::human_bytes(static_cast<double>(v32.bytes_read(131072))));
    numbers.set("v3_read_128k", af::human_bytes(static_cast<double>(v3.bytes_read(131072))));

    struct Fp8Row {
      double plain, rotated, lost;  // overlap with FP8, with Hadamard + FP8, mass lost with Hadamard + FP8
    };
    std::vector<Fp8Row> fp8_rows;

    // [quantized-indexer]
    // The reference stores index keys in FP8 E4M3 with one float32 scale per 128 values, after a Hadamard rotation;
    // queries likewise per head. Emulate it (block = the whole key here, as 128 / 128 in DeepSeek-V3.2) and
    // compare the selected sets with the float32 indexer's.
    fmt::print("\nFP8 indexer (emulated) vs float32 indexer, context {}: overlap of the selected sets\n", context);
    fmt::print("  {:<24} {:>6} {:>16} {:>16} {:>18}\n", "input", "k", "FP8", "Hadamard + FP8", "mass lost (H+FP8)");
    for (const Input input : {Input::random, Input::needle}) {
      for (const std::int64_t kk : {16, 64, 256}) {
        double plain = 0.0, rotated = 0.0, lost = 0.0;
        const int draws = 8;
        for (int n = 0; n < draws; ++n) {
          const Context ctx = build_input(l, rope, index_rope, context, input, rng);
          const std::vector<std::int64_t> exact = top_k(context_scores(l, ctx, {}), kk);
          const std::vector<std::int64_t> fp8 = top_k(context_scores(l, ctx, {false, true, l.ix.head_dim}), kk);
          const std::vector<std::int64_t> had = top_k(context_scores(l, ctx, {true, true, l.ix.head_dim}), kk);
          const auto dense = dense_weights(l, ctx, scale);
          plain += overlap(exact, fp8) / draws;
          rotated += overlap(exact, had) / draws;
          lost += (captured_mass(dense, exact) - captured_mass(dense, had)) / draws;
        }
        fmt::print("  {:<24} {:>6} {:>15.1f}% {:>15.1f}% {:>18.2e}\n", input_name(input), kk, 100 * plain,
                   100 * rotated, lost);
        fp8_rows.push_back({plain, rotated, lost});
      }
    }
    // [/quantized-indexer]
    double swapped_min = 1.0, swapped_max = 0.0, lost_max = 0.0, rotation_change = 0.0;
    for (const Fp8Row& row : fp8_rows) {
      swapped_min = std::min({swapped_min, 1 - row.plain, 1 - row.rotated});
      swapped_max = std::max({swapped_max, 1 - row.plain, 1 - row.rotated});
      lost_max = std::max(lost_max, std::abs(row.lost));
      rotation_change = std::max(rotation_change, std::abs(row.rotated - row.plain));
    }
    numbers.print("fp8_swapped_min_percent", "{:.0f}", 100 * swapped_min);
    numbers.print("fp8_swapped_max_percent", "{:.0f}", 100 * swapped_max);
    numbers.print("fp8_mass_lost_max", "{:.1e}", lost_max);
    numbers.print("hadamard_overlap_change_points", "{:.0f}", 100 * rotation_change);

    // Captured mass against k: the measured heart of the chapter.
    std::vector<std::int64_t> ks;
    for (std::int64_t kk = 1; kk <= context; kk *= 2) ks.push_back(kk);
    const std::vector<Input> inputs{Input::random, Input::needle, Input::needle_indexer_blind, Input::repeated};
    std::vector<std::vector<double>> mass(inputs.size() + 1, std::vector<double>(ks.size(), 0.0));
    Context figure_needle, figure_repeated;
    const int draws = 8;
    for (std::size_t a = 0; a < inputs.size(); ++a)
      for (int n = 0; n < draws; ++n) {
        const Context ctx = build_input(l, rope, index_rope, context, inputs[a], rng);
        const auto dense = dense_weights(l, ctx, scale);
        const std::vector<float> scores = context_scores(l, ctx, {});
        for (std::size_t b = 0; b < ks.size(); ++b) {
          mass[a][b] += captured_mass(dense, top_k(scores, ks[b])) / draws;
          if (inputs[a] == Input::needle) {  // a sliding window of the same k tokens, for comparison
            std::vector<std::int64_t> window(static_cast<std::size_t>(ks[b]));
            std::iota(window.begin(), window.end(), context - ks[b]);
            mass[inputs.size()][b] += captured_mass(dense, window) / draws;
          }
        }
        if (n == 0 && inputs[a] == Input::needle) figure_needle = ctx;
        if (n == 0 && inputs[a] == Input::repeated) figure_repeated = ctx;
      }
    fmt::print("\nCaptured softmax mass (mean over MLA heads and {} draws), one decode query, context {}\n", draws,
               context);
    fmt::print("  {:>6} {:>10} {:>10} {:>22} {:>14} {:>16}\n", "k", "random", "needle", "needle, indexer blind",
               "repeated x32", "window (needle)");
    for (std::size_t b = 0; b < ks.size(); ++b)
      fmt::print("  {:>6} {:>10.4f} {:>10.4f} {:>22.4f} {:>14.4f} {:>16.4f}\n", ks[b], mass[0][b], mass[1][b],
                 mass[2][b], mass[3][b], mass[4][b]);

    if (!out_dir.empty()) {
      const std::filesystem::path dir = af::make_output_directory(out_dir);
      numbers.write(dir);
      af::write_output_file(dir / "index_scores.dat", [&](af::OutputFile& f) {
        f.print("# one decode query, context {}, k = 64: position index_score selected dense_mass (mean over heads)\n",
                context);
        for (const Context* ctx : {&figure_needle, &figure_repeated}) {
          f.print("# {}\n", ctx == &figure_needle ? "needle" : "repeated");
          const std::vector<float> scores = context_scores(l, *ctx, {});
          const std::vector<std::int64_t> chosen = sorted(top_k(scores, 64));
          const auto dense = dense_weights(l, *ctx, scale);
          for (std::int64_t j = 0; j < context; ++j) {
            double m = 0.0;
            for (const auto& head : dense) m += head[static_cast<std::size_t>(j)] / static_cast<double>(dense.size());
            f.print("{} {:.6e} {} {:.6e}\n", j, scores[static_cast<std::size_t>(j)],
                    std::ranges::binary_search(chosen, j) ? 1 : 0, m);
          }
          f.print("\n\n");
        }
      });
      af::write_output_file(dir / "decode_reads.dat", [&](af::OutputFile& g) {
        g.print(
            "# one decode step, whole model (61 layers): context dense_MLA_entries DSA_attention_entries "
            "dense_MLA_bytes DSA_indexer_bytes DSA_attention_bytes DSA_total_bytes\n");
        for (std::int64_t t = 1024; t <= 131072; t *= 2)
          g.print("{} {} {} {} {} {} {}\n", t, t, v32.card.decode_reads(t)[1].entries, v3.bytes_read(t),
                  61 * v32.card.decode_reads(t)[0].bytes, 61 * v32.card.decode_reads(t)[1].bytes, v32.bytes_read(t));
      });
      af::write_output_file(dir / "cache_bytes.dat", [&](af::OutputFile& h) {
        h.print("# cache bytes per token, whole model: label bytes\n");
        h.print("\"Llama-3.1-70B (GQA)\" {}\n", llama.bytes_per_token());
        h.print("\"DeepSeek-V3 (MLA)\" {}\n", v3.bytes_per_token());
        h.print("\"V3.2 (DSA, FP8 index keys)\" {}\n", v32.bytes_per_token());
        h.print("\"V3.2 in HF (K/V expanded)\" {}\n", 61 * (128 * (192 + 128) * 2 + 128 * 2));
      });
      af::write_output_file(dir / "captured_mass.dat", [&](af::OutputFile& m) {
        m.print("# context {}: k random needle needle_indexer_blind repeated32 window_on_needle\n", context);
        for (std::size_t b = 0; b < ks.size(); ++b)
          m.print("{} {:.6f} {:.6f} {:.6f} {:.6f} {:.6f}\n", ks[b], mass[0][b], mass[1][b], mass[2][b], mass[3][b],
                  mass[4][b]);
      });
    }
    return checks.all_passed();
  });
}
