// The training cores' backward passes (grad_cores.hpp): each against central finite differences in float64, on
// small random inputs of several shapes (T = 1 among them), and each float forward against the inference code of
// its chapter (linear attention, the delta rule, a whole Gated DeltaNet layer, the lightning indexer and top-k).
#include "af/delta_rule.hpp"
#include "af/gated_deltanet.hpp"
#include "af/grad_cores.hpp"
#include "af/linalg.hpp"
#include "af/linear_attention.hpp"
#include "af/random.hpp"
#include "af/sparse_attention.hpp"
#include "error_of.hpp"

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <functional>
#include <vector>

using Catch::Matchers::Contains;
using Vec = std::vector<double>;

namespace {

// The finite-difference step, and the largest error accepted: |analytic - numeric| / max(1, |numeric|). With
// h = 1e-6 the central difference's truncation error is O(h^2) and its rounding error about 1e-16 |L| / h, both
// far below the tolerance; a wrong term in a gradient shows up as an error of order 1.
constexpr double step = 1e-6;
constexpr double tolerance = 1e-6;

Vec uniform(af::Rng& rng, std::int64_t n, double lo, double hi) {
  Vec v(static_cast<std::size_t>(n));
  for (double& x : v) x = rng.uniform(lo, hi);
  return v;
}

Vec normal(af::Rng& rng, std::int64_t n, double stddev = 1.0) {
  Vec v(static_cast<std::size_t>(n));
  for (double& x : v) x = stddev * rng.normal();
  return v;
}

double dot(const Vec& a, const Vec& b) {
  double sum = 0;
  for (std::size_t i = 0; i < a.size(); ++i) sum += a[i] * b[i];
  return sum;
}

// The largest error of `analytic`, the gradient of loss() with respect to `input`, against central differences,
// perturbing `input` in place (and restoring it). NaN or infinity anywhere counts as an infinite error.
double fd_error(Vec& input, const Vec& analytic, const std::function<double()>& loss) {
  REQUIRE(analytic.size() == input.size());
  double worst = 0;
  for (std::size_t i = 0; i < input.size(); ++i) {
    const double kept = input[i];
    input[i] = kept + step;
    const double up = loss();
    input[i] = kept - step;
    const double down = loss();
    input[i] = kept;
    const double numeric = (up - down) / (2 * step);
    const double error = std::abs(analytic[i] - numeric) / std::max(1.0, std::abs(numeric));
    if (!(error <= worst)) worst = std::isfinite(error) ? error : INFINITY;
  }
  return worst;
}

// max |a - b| / max(1, max |b|) of a float result against a reference; NaN or infinity gives infinity.
double relative_error(std::span<const float> a, std::span<const float> b) {
  REQUIRE(a.size() == b.size());
  double worst = 0, scale = 1;
  for (const float x : b) scale = std::max(scale, std::abs(double{x}));
  for (std::size_t i = 0; i < a.size(); ++i) {
    const double e = std::abs(double{a[i]} - double{b[i]});
    if (!(e <= worst)) worst = std::isfinite(e) ? e : INFINITY;
  }
  return worst / scale;
}

const af::grad::SeqDims seq_shapes[] = {{1, 1, 1, 1}, {1, 2, 3, 2}, {5, 2, 3, 4}, {7, 1, 4, 3}};

}  // namespace

TEST_CASE("linear attention's backward equals central differences, slope included", "[grad]") {
  af::Rng rng(101);
  for (const af::grad::SeqDims& d : seq_shapes) {
    const std::int64_t nk = d.steps * d.heads * d.key_dim, nv = d.steps * d.heads * d.value_dim;
    Vec q = normal(rng, nk, 0.7), k = normal(rng, nk, 0.7), v = normal(rng, nv), slopes = uniform(rng, d.heads, 0, 1);
    slopes[0] = 1e-3;  // almost no decay (a slope of 0 cannot be perturbed both ways)
    const Vec upstream = normal(rng, nv);
    const auto loss = [&] {
      Vec out(static_cast<std::size_t>(nv));
      af::grad::linear_attention_forward<double>(q, k, v, slopes, d, out);
      return dot(out, upstream);
    };
    Vec dq(q.size()), dk(k.size()), dv(v.size()), ds(slopes.size());
    af::grad::linear_attention_backward<double>(q, k, v, slopes, d, upstream, dq, dk, dv, ds);
    const double error =
        std::max({fd_error(q, dq, loss), fd_error(k, dk, loss), fd_error(v, dv, loss), fd_error(slopes, ds, loss)});
    INFO("T " << d.steps << ", H " << d.heads << ", d_k " << d.key_dim << ", d_v " << d.value_dim);
    CHECK(error < tolerance);
    // Fixed slopes: no slope gradient asked for, the others unchanged.
    Vec dq2(q.size()), dk2(k.size()), dv2(v.size());
    af::grad::linear_attention_backward<double>(q, k, v, slopes, d, upstream, dq2, dk2, dv2, {});
    CHECK(dq2 == dq);
  }
}

TEST_CASE("linear attention's float forward equals af::linear_attention_recurrent head by head", "[grad]") {
  af::Rng rng(102);
  const af::grad::SeqDims d{9, 3, 4, 5};
  const af::Tensor q = af::random_normal(af::Shape{9, 3, 4}, rng), k = af::random_normal(af::Shape{9, 3, 4}, rng),
                   v = af::random_normal(af::Shape{9, 3, 5}, rng);
  const std::vector<float> slopes{0.0f, 0.3f, 1.5f};
  std::vector<float> out(9 * 3 * 5);
  af::grad::linear_attention_forward<float>(q.values(), k.values(), v.values(), slopes, d, out);
  for (std::int64_t h = 0; h < 3; ++h) {
    af::Tensor state(af::Shape{4, 5});
    const af::Tensor expected = af::linear_attention_recurrent(af::head_view(q, h), af::head_view(k, h),
                                                               af::head_view(v, h), slopes[h], state.matrix());
    std::vector<float> ours;
    for (std::int64_t t = 0; t < 9; ++t)
      ours.insert(ours.end(), out.data() + (t * 3 + h) * 5, out.data() + (t * 3 + h + 1) * 5);
    CHECK(relative_error(ours, expected.values()) < 1e-5);
  }
}

TEST_CASE("the gated delta rule's backward equals central differences in q, k, v, g and beta", "[grad]") {
  af::Rng rng(103);
  for (const af::grad::SeqDims& d : seq_shapes) {
    const std::int64_t nk = d.steps * d.heads * d.key_dim, nv = d.steps * d.heads * d.value_dim, ns = d.steps * d.heads;
    Vec q = normal(rng, nk, 0.6), k = normal(rng, nk, 0.6), v = normal(rng, nv), g = uniform(rng, ns, -0.8, -0.01),
        beta = uniform(rng, ns, 0.05, 1.0);
    const Vec upstream = normal(rng, nv);
    Vec states(static_cast<std::size_t>(af::grad::delta_rule_saved_states(d)));
    const auto loss = [&] {
      Vec out(static_cast<std::size_t>(nv));
      af::grad::delta_rule_forward<double>(q, k, v, g, beta, d, out, states);
      return dot(out, upstream);
    };
    loss();  // leaves the states of the unperturbed inputs
    const Vec saved = states;
    Vec dq(q.size()), dk(k.size()), dv(v.size()), dg(g.size()), db(beta.size());
    af::grad::delta_rule_backward<double>(q, k, v, g, beta, saved, d, upstream, dq, dk, dv, dg, db);
    const double error = std::max({fd_error(q, dq, loss), fd_error(k, dk, loss), fd_error(v, dv, loss),
                                   fd_error(g, dg, loss), fd_error(beta, db, loss)});
    INFO("T " << d.steps << ", H " << d.heads << ", d_k " << d.key_dim << ", d_v " << d.value_dim);
    CHECK(error < tolerance);
    // The backward adds into the gradients it is given: a second call doubles them.
    Vec twice = dg;
    af::grad::delta_rule_backward<double>(q, k, v, g, beta, saved, d, upstream, dq, dk, dv, twice, db);
    for (std::size_t i = 0; i < dg.size(); ++i) CHECK(twice[i] == Approx(2 * dg[i]));
  }
}

TEST_CASE("the gated delta rule's float forward equals af::delta_rule_recurrent, outputs and final state", "[grad]") {
  af::Rng rng(104);
  const std::int64_t T = 11, H = 3, dk = 4, dv = 6;
  af::DeltaRuleInputs in{af::random_normal(af::Shape{T, H, dk}, rng, 0.5),
                         af::random_normal(af::Shape{T, H, dk}, rng, 0.5), af::random_normal(af::Shape{T, H, dv}, rng),
                         af::random_uniform(af::Shape{T, H}, rng, -0.5, 0.0),
                         af::random_uniform(af::Shape{T, H}, rng, 0.05, 1.0)};
  af::Tensor state = af::delta_rule_initial_state(H, dk, dv);
  const af::Tensor expected = af::delta_rule_recurrent(in, state);
  const af::grad::SeqDims d{T, H, dk, dv};
  std::vector<float> out(T * H * dv), states(static_cast<std::size_t>(af::grad::delta_rule_saved_states(d)));
  af::grad::delta_rule_forward<float>(in.q.values(), in.k.values(), in.v.values(), in.log_decay.values(),
                                      in.beta.values(), d, out, states);
  CHECK(relative_error(out, expected.values()) < 1e-5);
  std::vector<float> last;
  for (std::int64_t h = 0; h < H; ++h)
    last.insert(last.end(), states.data() + (h * (T + 1) + T) * dk * dv,
                states.data() + (h * (T + 1) + T + 1) * dk * dv);
  CHECK(relative_error(last, state.values()) < 1e-5);
}

TEST_CASE("the short convolution's backward equals central differences in input and kernel", "[grad]") {
  af::Rng rng(105);
  const std::int64_t shapes[][3] = {{1, 3, 4}, {5, 2, 4}, {6, 3, 1}, {3, 2, 5}};  // T, C, K (K > T in the last)
  for (const auto& shape : shapes) {
    const std::int64_t T = shape[0], C = shape[1], K = shape[2];
    Vec x = normal(rng, T * C), w = normal(rng, C * K, 0.7);
    const Vec upstream = normal(rng, T * C);
    const auto loss = [&] {
      Vec out(static_cast<std::size_t>(T * C));
      af::grad::short_conv_forward<double>(x, w, T, C, K, out);
      return dot(out, upstream);
    };
    Vec dx(x.size()), dw(w.size());
    af::grad::short_conv_backward<double>(x, w, T, C, K, upstream, dx, dw);
    INFO("T " << T << ", C " << C << ", K " << K);
    CHECK(std::max(fd_error(x, dx, loss), fd_error(w, dw, loss)) < tolerance);
  }
}

TEST_CASE("the L2 norm's and the gated RMSNorm's backward equal central differences", "[grad]") {
  af::Rng rng(106);
  const std::int64_t shapes[][2] = {{1, 1}, {1, 4}, {3, 5}, {4, 2}};  // rows, dim
  for (const auto& shape : shapes) {
    const std::int64_t rows = shape[0], dim = shape[1];
    INFO("rows " << rows << ", dim " << dim);
    const Vec upstream = normal(rng, rows * dim);
    for (const double scale : {1.0, 1.0 / std::sqrt(static_cast<double>(dim))}) {
      Vec x = normal(rng, rows * dim);
      const auto loss = [&] {
        Vec out(x.size());
        af::grad::l2norm_forward<double>(x, rows, dim, scale, af::grad::l2norm_eps, out);
        return dot(out, upstream);
      };
      Vec dx(x.size());
      af::grad::l2norm_backward<double>(x, rows, dim, scale, af::grad::l2norm_eps, upstream, dx);
      CHECK(fd_error(x, dx, loss) < tolerance);
    }
    Vec o = normal(rng, rows * dim), z = normal(rng, rows * dim, 2.0), w = uniform(rng, dim, 0.5, 1.5);
    const auto loss = [&] {
      Vec out(o.size());
      af::grad::gated_rms_norm_forward<double>(o, z, w, rows, dim, 1e-6, out);
      return dot(out, upstream);
    };
    Vec d_o(o.size()), dz(z.size()), dw(w.size());
    af::grad::gated_rms_norm_backward<double>(o, z, w, rows, dim, 1e-6, upstream, d_o, dz, dw);
    CHECK(std::max({fd_error(o, d_o, loss), fd_error(z, dz, loss), fd_error(w, dw, loss)}) < tolerance);
  }
}

TEST_CASE("the Gated DeltaNet gates' backward equals central differences in a, b, A_log and dt_bias", "[grad]") {
  af::Rng rng(107);
  const std::int64_t shapes[][2] = {{1, 1}, {1, 3}, {6, 2}};  // T, H
  for (const auto& shape : shapes) {
    const std::int64_t T = shape[0], H = shape[1];
    Vec a = normal(rng, T * H), b = normal(rng, T * H, 2.0), a_log = uniform(rng, H, -2, 1),
        dt_bias = normal(rng, H, 0.5);
    const Vec up_g = normal(rng, T * H), up_beta = normal(rng, T * H);
    const auto loss = [&] {
      Vec g(a.size()), beta(a.size());
      af::grad::deltanet_gates_forward<double>(a, b, a_log, dt_bias, T, H, g, beta);
      for (const double x : g) REQUIRE(x <= 0.0);
      return dot(g, up_g) + dot(beta, up_beta);
    };
    Vec da(a.size()), db(b.size()), dA(a_log.size()), ddt(dt_bias.size());
    af::grad::deltanet_gates_backward<double>(a, b, a_log, dt_bias, T, H, up_g, up_beta, da, db, dA, ddt);
    INFO("T " << T << ", H " << H);
    CHECK(std::max({fd_error(a, da, loss), fd_error(b, db, loss), fd_error(a_log, dA, loss),
                    fd_error(dt_bias, ddt, loss)}) < tolerance);
  }
  CHECK(af::grad::softplus(30.0) == 30.0);
  CHECK(af::grad::softplus_grad(30.0) == 1.0);
  CHECK(af::grad::softplus(0.0) == Approx(std::log(2.0)));
}

TEST_CASE("a Gated DeltaNet layer built from the training cores equals af::gated_deltanet", "[grad]") {
  // Qwen3-Next's layer with 2 key heads, 4 value heads: projections, the short convolution, unit q and k (q also
  // scaled by 1/sqrt(d_k)), the gates, the delta rule with q and k repeated per value head, the gated RMSNorm.
  af::Rng rng(108);
  const std::int64_t hidden = 16, Hk = 2, Hv = 4, dk = 4, dv = 3, K = 4, r = Hv / Hk;
  const af::GatedDeltaNetShape s{hidden, Hk, Hv, dk, dv, K, 1e-6};
  af::GatedDeltaNetWeights w;
  w.in_proj_qkvz = af::random_normal(af::Shape{2 * Hk * dk + 2 * Hv * dv, hidden}, rng, 0.3);
  w.in_proj_ba = af::random_normal(af::Shape{2 * Hv, hidden}, rng, 0.3);
  w.conv = af::random_normal(af::Shape{s.conv_channels(), K}, rng, 0.5);
  w.dt_bias = af::random_normal(af::Shape{Hv}, rng, 0.5);
  w.a_log = af::random_uniform(af::Shape{Hv}, rng, -2.0, 0.5);
  w.norm = af::random_uniform(af::Shape{dv}, rng, 0.5, 1.5);
  w.out_proj = af::random_normal(af::Shape{hidden, Hv * dv}, rng, 0.3);
  for (const std::int64_t T : {1, 7}) {
    const af::Tensor x = af::random_normal(af::Shape{T, hidden}, rng);
    af::GatedDeltaNetCache cache(s);
    const af::Tensor expected = af::gated_deltanet(x.matrix(), s, w, cache, 4);

    const af::Tensor qkvz = af::linear(x.matrix(), w.in_proj_qkvz.matrix()),
                     ba = af::linear(x.matrix(), w.in_proj_ba.matrix());
    const std::int64_t C = s.conv_channels(), group = 2 * dk + 2 * r * dv;
    std::vector<float> mixed(T * C), z(T * Hv * dv), a(T * Hv), b(T * Hv);
    for (std::int64_t t = 0; t < T; ++t)
      for (std::int64_t g = 0; g < Hk; ++g) {
        const float* in = qkvz.data() + t * qkvz.dim(1) + g * group;
        float* m = mixed.data() + t * C;
        std::copy(in, in + dk, m + g * dk);
        std::copy(in + dk, in + 2 * dk, m + Hk * dk + g * dk);
        std::copy(in + 2 * dk, in + 2 * dk + r * dv, m + 2 * Hk * dk + g * r * dv);
        std::copy(in + 2 * dk + r * dv, in + group, z.data() + t * Hv * dv + g * r * dv);
        for (std::int64_t j = 0; j < r; ++j) {
          b[t * Hv + g * r + j] = ba.data()[t * 2 * Hv + g * 2 * r + j];
          a[t * Hv + g * r + j] = ba.data()[t * 2 * Hv + g * 2 * r + r + j];
        }
      }
    std::vector<float> conv(T * C), q(T * Hv * dk), k(T * Hv * dk), v(T * Hv * dv);
    af::grad::short_conv_forward<float>(mixed, w.conv.values(), T, C, K, conv);
    // The query rows and the key rows of every token and key head, normalised row by row.
    std::vector<float> q_rows(T * Hk * dk), k_rows(T * Hk * dk), qn(T * Hk * dk), kn(T * Hk * dk);
    for (std::int64_t t = 0; t < T; ++t) {
      std::copy(conv.data() + t * C, conv.data() + t * C + Hk * dk, q_rows.data() + t * Hk * dk);
      std::copy(conv.data() + t * C + Hk * dk, conv.data() + t * C + 2 * Hk * dk, k_rows.data() + t * Hk * dk);
    }
    af::grad::l2norm_forward<float>(q_rows, T * Hk, dk, 1.0 / std::sqrt(double(dk)), af::grad::l2norm_eps, qn);
    af::grad::l2norm_forward<float>(k_rows, T * Hk, dk, 1.0, af::grad::l2norm_eps, kn);
    for (std::int64_t t = 0; t < T; ++t)
      for (std::int64_t h = 0; h < Hv; ++h) {
        const std::int64_t row = t * Hk + h / r;  // the key head of value head h
        std::copy(qn.data() + row * dk, qn.data() + (row + 1) * dk, q.data() + (t * Hv + h) * dk);
        std::copy(kn.data() + row * dk, kn.data() + (row + 1) * dk, k.data() + (t * Hv + h) * dk);
        const float* vs = conv.data() + t * C + 2 * Hk * dk + h * dv;
        std::copy(vs, vs + dv, v.data() + (t * Hv + h) * dv);
      }
    std::vector<float> g(T * Hv), beta(T * Hv);
    af::grad::deltanet_gates_forward<float>(a, b, w.a_log.values(), w.dt_bias.values(), T, Hv, g, beta);
    const af::grad::SeqDims d{T, Hv, dk, dv};
    std::vector<float> o(T * Hv * dv), states(static_cast<std::size_t>(af::grad::delta_rule_saved_states(d)));
    af::grad::delta_rule_forward<float>(q, k, v, g, beta, d, o, states);
    af::Tensor y(af::Shape{T, Hv * dv});
    af::grad::gated_rms_norm_forward<float>(o, z, w.norm.values(), T * Hv, dv, s.norm_eps, y.values());
    const af::Tensor ours = af::linear(y.matrix(), w.out_proj.matrix());
    INFO("T " << T);
    CHECK(relative_error(ours.values(), expected.values()) < 1e-5);
  }
}

TEST_CASE("the lightning indexer's scores and KL loss backward equal central differences in q, k and w", "[grad]") {
  af::Rng rng(109);
  const af::grad::IndexerDims shapes[] = {{1, 1, 1, 2}, {4, 4, 2, 3}, {3, 6, 3, 2}};  // T, S, heads, head_dim
  for (const af::grad::IndexerDims& d : shapes) {
    INFO("T " << d.queries << ", S " << d.keys << ", heads " << d.heads << ", head_dim " << d.head_dim);
    const std::int64_t nq = d.queries * d.heads * d.head_dim, nk = d.keys * d.head_dim, nw = d.queries * d.heads,
                       ns = d.queries * d.keys;
    Vec q = normal(rng, nq), k = normal(rng, nk), w = normal(rng, nw);
    // The target: causal attention probabilities of 2 heads, summed and L1-normalised.
    Vec probs(static_cast<std::size_t>(2 * ns)), target(static_cast<std::size_t>(ns));
    for (std::int64_t h = 0; h < 2; ++h)
      for (std::int64_t t = 0; t < d.queries; ++t)
        for (std::int64_t s = 0; s <= d.keys - d.queries + t; ++s)
          probs[static_cast<std::size_t>((h * d.queries + t) * d.keys + s)] = rng.uniform(0.01, 1.0);
    af::grad::indexer_target<double>(probs, 2, d.queries, d.keys, target);
    for (std::int64_t t = 0; t < d.queries; ++t) {
      double sum = 0;
      for (std::int64_t s = 0; s < d.keys; ++s) sum += target[static_cast<std::size_t>(t * d.keys + s)];
      CHECK(sum == Approx(1.0));
    }
    // The scores alone, against an arbitrary upstream gradient.
    const Vec upstream = normal(rng, ns);
    const auto scores_of = [&] {
      Vec scores(static_cast<std::size_t>(ns));
      af::grad::indexer_scores_forward<double>(q, k, w, d, scores);
      return scores;
    };
    Vec dq(q.size()), dk(k.size()), dw(w.size());
    af::grad::indexer_scores_backward<double>(q, k, w, d, upstream, dq, dk, dw);
    const auto score_loss = [&] { return dot(scores_of(), upstream); };
    CHECK(std::max({fd_error(q, dq, score_loss), fd_error(k, dk, score_loss), fd_error(w, dw, score_loss)}) <
          tolerance);
    // The loss through the scores, dense (every visible key) and sparse (the top 2 of each query).
    const std::vector<std::int64_t> chosen = af::grad::indexer_top_k<double>(scores_of(), d, 2);
    for (const bool sparse : {false, true}) {
      INFO((sparse ? "sparse" : "dense"));
      const std::span<const std::int64_t> selected =
          sparse ? std::span<const std::int64_t>(chosen) : std::span<const std::int64_t>();
      const auto loss = [&] { return af::grad::indexer_loss_forward<double>(scores_of(), target, d, selected, 2); };
      CHECK(loss() >= 0.0);
      const Vec scores = scores_of();
      Vec d_scores(scores.size());
      af::grad::indexer_loss_backward<double>(scores, target, d, selected, 2, 1.0, d_scores);
      Vec lq(q.size()), lk(k.size()), lw(w.size());
      af::grad::indexer_scores_backward<double>(q, k, w, d, d_scores, lq, lk, lw);
      CHECK(std::max({fd_error(q, lq, loss), fd_error(k, lk, loss), fd_error(w, lw, loss)}) < tolerance);
    }
  }
}

TEST_CASE("the indexer's loss is zero when softmax(I) equals the target, and positive otherwise", "[grad]") {
  const af::grad::IndexerDims d{2, 3, 1, 1};
  const std::vector<double> scores{0.0, 0.0, 0.0, std::log(1.0), std::log(2.0), std::log(3.0)};
  const std::vector<double> target{0.5, 0.5, 0.0, 1.0 / 6, 2.0 / 6, 3.0 / 6};  // query 0 sees keys 0 and 1
  CHECK(af::grad::indexer_loss_forward<double>(scores, target, d, {}, 0) == Approx(0.0).margin(1e-15));
  std::vector<double> d_scores(6);
  af::grad::indexer_loss_backward<double>(scores, target, d, {}, 0, 1.0, d_scores);
  for (const double g : d_scores) CHECK(g == Approx(0.0).margin(1e-15));
  const std::vector<double> other{1.0, 0.0, 0.0, 0.0, 0.0, 0.0};
  CHECK(af::grad::indexer_loss_forward<double>(other, target, d, {}, 0) > 0.01);
}

TEST_CASE("the indexer's float scores and top-k equal af::index_scores and af::select_top_k under the causal mask",
          "[grad]") {
  af::Rng rng(110);
  const std::int64_t T = 5, S = 8, heads = 3, head_dim = 4;
  const af::Tensor q = af::random_normal(af::Shape{T, heads * head_dim}, rng),
                   k = af::random_normal(af::Shape{S, head_dim}, rng), w = af::random_normal(af::Shape{T, heads}, rng);
  af::IndexerShape shape;
  shape.heads = heads;
  shape.head_dim = head_dim;
  const af::Tensor expected = af::index_scores(q.matrix(), w.matrix(), k.matrix(), shape);
  const af::grad::IndexerDims d{T, S, heads, head_dim};
  std::vector<float> scores(T * S);
  af::grad::indexer_scores_forward<float>(q.values(), k.values(), w.values(), d, scores);
  CHECK(relative_error(scores, expected.values()) < 1e-6);
  // Rounded to whole numbers so that ties occur; the lower position wins a tie in both.
  for (float& x : scores) x = std::round(x);
  const af::Tensor rounded(af::Shape{T, S}, scores);
  for (const std::int64_t top : {1, 3, 8}) {
    INFO("top " << top);
    CHECK(af::grad::indexer_top_k<float>(scores, d, top) ==
          af::select_top_k(rounded.matrix(), af::Mask::causal(T, S, S - T), top));
  }
  const std::vector<float> tied{2, 2, 2, 2};
  CHECK(af::grad::indexer_top_k<float>(tied, {1, 4, 1, 1}, 2) == std::vector<std::int64_t>{0, 1});
  CHECK(af::grad::indexer_top_k<float>(tied, {2, 2, 1, 1}, 2) == std::vector<std::int64_t>{0, -1, 0, 1});
}

TEST_CASE("the training cores reject bad sizes and values, naming them", "[grad]") {
  const af::grad::SeqDims d{2, 1, 2, 2};
  std::vector<double> q(4), k(4), v(4), g(2, -0.1), beta(2, 0.5), out(4), states(12), slopes{0.5};
  CHECK_THAT(af_test::error_of([&] {
               af::grad::linear_attention_forward<double>(q, std::span<const double>(k).first(3), v, slopes, d, out);
             }),
             Contains("k has 3 values (expected 4)"));
  CHECK_THAT(af_test::error_of(
                 [&] { af::grad::linear_attention_forward<double>(q, k, v, std::vector<double>{-1.0}, d, out); }),
             Contains("slope -1"));
  CHECK_THAT(af_test::error_of([&] {
               af::grad::delta_rule_forward<double>(q, k, v, std::vector<double>{-0.1, 0.2}, beta, d, out, states);
             }),
             Contains("log-decay 0.2"));
  CHECK_THAT(af_test::error_of([&] {
               af::grad::delta_rule_forward<double>(q, k, v, g, beta, d, out, std::span<double>(states).first(8));
             }),
             Contains("states has 8 values (expected 12)"));
  CHECK_THAT(af_test::error_of([&] {
               af::grad::delta_rule_forward<double>(q, k, v, g, beta, {2, 1, 0, 2}, out, states);
             }),
             Contains("size 0"));
  CHECK_THAT(af_test::error_of([&] { af::grad::short_conv_forward<double>(q, v, 2, 2, 3, out); }),
             Contains("weight has 4 values (expected 6)"));
  CHECK_THAT(af_test::error_of([&] { af::grad::l2norm_forward<double>(q, 2, 2, 1.0, 0.0, out); }), Contains("eps 0"));
  CHECK_THAT(af_test::error_of([&] { af::grad::indexer_top_k<double>(q, {2, 2, 1, 1}, 0); }), Contains("top_k 0"));
  CHECK_THAT(af_test::error_of([&] {
               af::grad::indexer_top_k<double>(q, {3, 2, 1, 1}, 1);
             }),
             Contains("2 keys for 3 queries"));
  const std::vector<std::int64_t> future{1, -1, 0, 1};  // query 0 may not see key 1
  CHECK_THAT(af_test::error_of([&] {
               af::grad::indexer_loss_forward<double>(q, k, {2, 2, 1, 1}, future, 2);
             }),
             Contains("query 0 selects key 1"));
}
