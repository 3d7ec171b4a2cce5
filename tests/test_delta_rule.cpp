// The gated delta rule (chapter 14): the recurrence and the chunked form against a float64 recurrence
// written from the rule, prefill followed by decode, and the property the rule is for (a write replaces).
#include "af/delta_rule.hpp"
#include "af/gated_deltanet.hpp"
#include "af/random.hpp"
#include "error_of.hpp"

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <vector>

using Catch::Matchers::Contains;

namespace {

af::DeltaRuleInputs random_inputs(af::Rng& rng, std::int64_t T, std::int64_t H, std::int64_t dk, std::int64_t dv,
                                  bool per_channel) {
  af::DeltaRuleInputs in;
  in.q = af::random_normal(af::Shape{T, H, dk}, rng);
  in.k = af::random_normal(af::Shape{T, H, dk}, rng);
  for (std::int64_t r = 0; r < T * H; ++r) {  // unit keys and queries, as the layers normalise them
    for (af::Tensor* x : {&in.q, &in.k}) {
      double norm = 0;
      for (std::int64_t c = 0; c < dk; ++c) norm += x->data()[r * dk + c] * x->data()[r * dk + c];
      for (std::int64_t c = 0; c < dk; ++c) x->data()[r * dk + c] /= static_cast<float>(std::sqrt(norm));
    }
  }
  in.v = af::random_normal(af::Shape{T, H, dv}, rng);
  in.log_decay = per_channel ? af::random_uniform(af::Shape{T, H, dk}, rng, -0.5, 0.0)
                             : af::random_uniform(af::Shape{T, H}, rng, -0.3, 0.0);
  in.beta = af::random_uniform(af::Shape{T, H}, rng, 0.05, 1.0);
  return in;
}

// The rule in float64, one step at a time, straight from its statement.
std::vector<double> reference(const af::DeltaRuleInputs& in, std::vector<double>& S) {
  const std::int64_t T = in.steps(), H = in.heads(), dk = in.key_dim(), dv = in.value_dim();
  std::vector<double> out(static_cast<std::size_t>(T * H * dv));
  for (std::int64_t t = 0; t < T; ++t)
    for (std::int64_t h = 0; h < H; ++h) {
      const auto s = [&](std::int64_t c, std::int64_t j) -> double& {
        return S[static_cast<std::size_t>((h * dk + c) * dv + j)];
      };
      for (std::int64_t c = 0; c < dk; ++c) {
        const double g = in.per_channel_decay() ? in.log_decay.at({t, h, c}) : in.log_decay.at({t, h});
        for (std::int64_t j = 0; j < dv; ++j) s(c, j) *= std::exp(g);
      }
      std::vector<double> retrieved(static_cast<std::size_t>(dv), 0.0);
      for (std::int64_t j = 0; j < dv; ++j)
        for (std::int64_t c = 0; c < dk; ++c) retrieved[static_cast<std::size_t>(j)] += s(c, j) * in.k.at({t, h, c});
      for (std::int64_t c = 0; c < dk; ++c)
        for (std::int64_t j = 0; j < dv; ++j)
          s(c, j) +=
              in.k.at({t, h, c}) * in.beta.at({t, h}) * (in.v.at({t, h, j}) - retrieved[static_cast<std::size_t>(j)]);
      for (std::int64_t j = 0; j < dv; ++j) {
        double o = 0;
        for (std::int64_t c = 0; c < dk; ++c) o += s(c, j) * in.q.at({t, h, c});
        out[static_cast<std::size_t>((t * H + h) * dv + j)] = o;
      }
    }
  return out;
}

// max |a - b| / max(1, max |b|); NaN or infinity gives infinity.
double relative_error(std::span<const float> a, const std::vector<double>& b) {
  double worst = 0, scale = 1;
  for (const double x : b) scale = std::max(scale, std::abs(x));
  for (std::size_t i = 0; i < b.size(); ++i) {
    const double e = std::abs(a[i] - b[i]);
    if (!(e <= worst)) worst = std::isfinite(e) ? e : INFINITY;
  }
  return worst / scale;
}

}  // namespace

TEST_CASE("the delta rule's recurrence and chunked form equal a float64 recurrence, per-head and per-channel decay",
          "[delta]") {
  af::Rng rng(14);
  const bool per_channel = GENERATE(false, true);
  const std::int64_t T = 70, H = 3, dk = 16, dv = 12;
  const af::DeltaRuleInputs in = random_inputs(rng, T, H, dk, dv, per_channel);
  std::vector<double> S64(static_cast<std::size_t>(H * dk * dv), 0.0);
  const std::vector<double> want = reference(in, S64);
  INFO("per-channel decay: " << per_channel);

  af::Tensor state = af::delta_rule_initial_state(H, dk, dv);
  CHECK(relative_error(af::delta_rule_recurrent(in, state).values(), want) < 1e-5);
  CHECK(relative_error(state.values(), S64) < 1e-5);
  for (const std::int64_t chunk : {1, 5, 16, 64, 70, 128}) {
    INFO("chunk " << chunk);
    af::Tensor chunked_state = af::delta_rule_initial_state(H, dk, dv);
    CHECK(relative_error(af::delta_rule_chunked(in, chunked_state, chunk).values(), want) < 1e-5);
    CHECK(relative_error(chunked_state.values(), S64) < 1e-5);
  }
}

TEST_CASE("a chunked prefill continued by recurrent decode steps equals the whole sequence", "[delta]") {
  af::Rng rng(15);
  const af::DeltaRuleInputs in = random_inputs(rng, 50, 2, 8, 8, true);
  af::Tensor whole = af::delta_rule_initial_state(2, 8, 8);
  const af::Tensor all = af::delta_rule_recurrent(in, whole);
  const auto slice = [&](std::int64_t first, std::int64_t count) {
    af::DeltaRuleInputs part;
    const auto rows = [&](const af::Tensor& t) {
      af::Shape shape = t.shape();
      const std::int64_t row = t.numel() / t.dim(0);
      std::vector<std::int64_t> dims(shape.dims().begin(), shape.dims().end());
      dims[0] = count;
      af::Tensor out(dims.size() == 2 ? af::Shape{dims[0], dims[1]} : af::Shape{dims[0], dims[1], dims[2]});
      std::copy(t.data() + first * row, t.data() + (first + count) * row, out.data());
      return out;
    };
    part.q = rows(in.q), part.k = rows(in.k), part.v = rows(in.v), part.log_decay = rows(in.log_decay),
    part.beta = rows(in.beta);
    return part;
  };
  af::Tensor state = af::delta_rule_initial_state(2, 8, 8);
  const af::Tensor prefill = af::delta_rule_chunked(slice(0, 37), state, 16);
  std::vector<float> got(prefill.values().begin(), prefill.values().end());
  for (std::int64_t t = 37; t < 50; ++t) {
    const af::Tensor o = af::delta_rule_recurrent(slice(t, 1), state);
    got.insert(got.end(), o.values().begin(), o.values().end());
  }
  const std::vector<double> want(all.values().begin(), all.values().end());
  CHECK(relative_error(got, want) < 1e-5);
  CHECK(relative_error(state.values(), std::vector<double>(whole.values().begin(), whole.values().end())) < 1e-5);
}

TEST_CASE("with orthonormal keys and beta = 1 a write replaces what the key retrieved", "[delta]") {
  // d_k = 4 orthonormal keys (the unit axes), no decay: write (k_i, v_i) for i = 0..3, then (k_1, w): reading
  // k_0, k_2, k_3 gives their values back exactly and k_1 gives w, where an additive state would give v_1 + w.
  const std::int64_t dk = 4, dv = 3, T = 5;
  af::DeltaRuleInputs in;
  in.q = af::Tensor(af::Shape{T, 1, dk});
  in.k = af::Tensor(af::Shape{T, 1, dk});
  in.v = af::Tensor(af::Shape{T, 1, dv});
  in.log_decay = af::Tensor(af::Shape{T, 1});
  in.beta = af::Tensor(af::Shape{T, 1});
  for (std::int64_t t = 0; t < T; ++t) {
    in.k.data()[t * dk + (t == 4 ? 1 : t)] = 1.0f;
    in.q.data()[t * dk + (t == 4 ? 1 : t)] = 1.0f;
    for (std::int64_t j = 0; j < dv; ++j) in.v.data()[t * dv + j] = static_cast<float>(10 * t + j + 1);
    in.beta.data()[t] = 1.0f;
  }
  af::Tensor state = af::delta_rule_initial_state(1, dk, dv);
  const af::Tensor out = af::delta_rule_chunked(in, state, 2);
  for (std::int64_t j = 0; j < dv; ++j) {
    CHECK(out.at({4, 0, j}) == Approx(41 + j).margin(1e-5));    // k_1 now reads w
    CHECK(state.at({0, 0, j}) == Approx(1 + j).margin(1e-5));   // k_0 still reads v_0
    CHECK(state.at({0, 1, j}) == Approx(41 + j).margin(1e-5));  // v_1 replaced, not added to
    CHECK(state.at({0, 3, j}) == Approx(31 + j).margin(1e-5));
  }
}

TEST_CASE("the delta rule rejects bad shapes, a growing gate and a bad chunk, naming the value", "[delta]") {
  af::Rng rng(16);
  af::DeltaRuleInputs in = random_inputs(rng, 6, 2, 4, 4, false);
  af::Tensor state = af::delta_rule_initial_state(2, 4, 4);
  CHECK_THAT(af_test::error_of([&] { af::delta_rule_chunked(in, state, 0); }), Contains("chunk 0"));
  af::Tensor wrong = af::delta_rule_initial_state(2, 4, 5);
  CHECK_THAT(af_test::error_of([&] { af::delta_rule_recurrent(in, wrong); }), Contains("[2, 4, 5]"));
  in.log_decay.data()[3] = 0.25f;
  CHECK_THAT(af_test::error_of([&] { af::delta_rule_recurrent(in, state); }), Contains("log-decay 0.25"));
  in.log_decay.data()[3] = 0.0f;
  in.beta = af::Tensor(af::Shape{6, 3});
  CHECK_THAT(af_test::error_of([&] { af::delta_rule_recurrent(in, state); }), Contains("beta is [6, 3]"));
}

TEST_CASE("a Gated DeltaNet layer gives the same outputs prefilled in one call as decoded a token at a time",
          "[delta]") {
  // The convolution's cached inputs and the delta-rule state carry everything between calls: a prefill of 11
  // (chunked, chunks of 4) and then 3 decode steps equals 14 decode steps (the recurrence), and the cache's
  // bytes do not grow with the tokens.
  af::Rng rng(17);
  const af::GatedDeltaNetShape s{24, 2, 4, 8, 6, 4, 1e-6};
  const std::int64_t kd = 16, vd = 24;
  af::GatedDeltaNetWeights w;
  w.in_proj_qkvz = af::random_normal(af::Shape{2 * kd + 2 * vd, 24}, rng, 0.2);
  w.in_proj_ba = af::random_normal(af::Shape{8, 24}, rng, 0.2);
  w.conv = af::random_normal(af::Shape{s.conv_channels(), 4}, rng, 0.5);
  w.dt_bias = af::random_normal(af::Shape{4}, rng, 0.5);
  w.a_log = af::random_uniform(af::Shape{4}, rng, -2.0, 0.5);
  w.norm = af::random_uniform(af::Shape{6}, rng, 0.5, 1.5);
  w.out_proj = af::random_normal(af::Shape{24, vd}, rng, 0.2);
  const af::Tensor x = af::random_normal(af::Shape{14, 24}, rng);
  af::GatedDeltaNetCache batched(s), stepped(s);
  const std::int64_t bytes = batched.bytes();
  std::vector<float> a, b;
  const af::Tensor pre = af::gated_deltanet(x.matrix().rows_slice(0, 11), s, w, batched, 4);
  a.assign(pre.values().begin(), pre.values().end());
  for (std::int64_t t = 11; t < 14; ++t) {
    const af::Tensor o = af::gated_deltanet(x.matrix().rows_slice(t, 1), s, w, batched);
    a.insert(a.end(), o.values().begin(), o.values().end());
  }
  for (std::int64_t t = 0; t < 14; ++t) {
    const af::Tensor o = af::gated_deltanet(x.matrix().rows_slice(t, 1), s, w, stepped);
    b.insert(b.end(), o.values().begin(), o.values().end());
  }
  CHECK(relative_error(a, std::vector<double>(b.begin(), b.end())) < 1e-5);
  CHECK(batched.bytes() == bytes);
  CHECK(batched.tokens == 14);
  w.norm = af::Tensor(af::Shape{5});
  CHECK_THAT(af_test::error_of([&] { af::gated_deltanet(x.matrix(), s, w, batched); }), Contains("norm is [5]"));
}
