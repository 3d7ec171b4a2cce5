#include "af/attention.hpp"
#include "af/error.hpp"
#include "af/random.hpp"
#include "reference.hpp"

#include <catch2/catch.hpp>

using Catch::Matchers::Contains;

namespace {
af::SingleHeadWeights random_weights(af::Rng& rng, std::int64_t hidden, std::int64_t head_dim, bool bias) {
  af::SingleHeadWeights w;
  const double in_scale = 1.0 / std::sqrt(static_cast<double>(hidden));
  w.q_proj = af::random_normal(af::Shape{head_dim, hidden}, rng, in_scale);
  w.k_proj = af::random_normal(af::Shape{head_dim, hidden}, rng, in_scale);
  w.v_proj = af::random_normal(af::Shape{head_dim, hidden}, rng, in_scale);
  w.o_proj = af::random_normal(af::Shape{hidden, head_dim}, rng, 1.0 / std::sqrt(static_cast<double>(head_dim)));
  if (bias) {
    w.q_bias = af::random_normal(af::Shape{head_dim}, rng, 0.5);
    w.k_bias = af::random_normal(af::Shape{head_dim}, rng, 0.5);
    w.v_bias = af::random_normal(af::Shape{head_dim}, rng, 0.5);
  }
  return w;
}
}  // namespace

TEST_CASE("Attention matches a float64 reference over random shapes, causal or not", "[attention]") {
  af::Rng rng(21);
  for (int trial = 0; trial < 30; ++trial) {
    const std::int64_t tk = 1 + rng.below(40), tq = 1 + rng.below(tk), d = 1 + rng.below(64), dv = 1 + rng.below(48);
    const bool causal = rng.below(2) == 0;
    const af::Tensor q = af::random_normal(af::Shape{tq, d}, rng), k = af::random_normal(af::Shape{tk, d}, rng),
                     v = af::random_normal(af::Shape{tk, dv}, rng);
    const double scale = trial % 3 == 0 ? 0.37 : af::default_scale(d);
    af::AttentionOptions options{causal, trial % 3 == 0 ? std::optional<double>(0.37) : std::nullopt};
    const af::Tensor out = af::attention(q.matrix(), k.matrix(), v.matrix(), options);
    const auto expected = reference::attention(reference::to64(q.matrix()), reference::to64(k.matrix()),
                                               reference::to64(v.matrix()), causal, scale);
    CHECK(reference::max_abs_diff(out.matrix(), expected) < 1e-5);
  }
}

TEST_CASE("Causal weights are zero above the diagonal and each row sums to one", "[attention]") {
  af::Rng rng(22);
  const af::Tensor q = af::random_normal(af::Shape{6, 8}, rng), k = af::random_normal(af::Shape{6, 8}, rng);
  const af::Tensor w = af::attention_weights(q.matrix(), k.matrix(), {});
  for (std::int64_t i = 0; i < 6; ++i) {
    double sum = 0.0;
    for (std::int64_t j = 0; j < 6; ++j) {
      if (j > i) CHECK(w.at({i, j}) == 0.0f);
      sum += w.at({i, j});
    }
    CHECK(std::abs(sum - 1.0) < 1e-6);
  }
}

TEST_CASE("A prefill equals token-by-token decode through the KV cache", "[attention][cache]") {
  af::Rng rng(23);
  for (int trial = 0; trial < 12; ++trial) {
    const std::int64_t hidden = 4 + rng.below(60), d = 1 + rng.below(32), tokens = 1 + rng.below(24);
    const bool bias = trial % 2 == 1;
    const af::SingleHeadWeights w = random_weights(rng, hidden, d, bias);
    const af::Tensor x = af::random_normal(af::Shape{tokens, hidden}, rng);

    af::KvCache prefill_cache(tokens, d, d);
    const af::Tensor prefill = af::single_head_attention(x.matrix(), w, {}, prefill_cache);

    af::KvCache decode_cache(tokens, d, d);
    af::Tensor decoded(af::Shape{tokens, hidden});
    for (std::int64_t t = 0; t < tokens; ++t) {
      const af::Tensor step = af::single_head_attention(x.matrix().rows_slice(t, 1), w, {}, decode_cache);
      std::ranges::copy(step.values(), decoded.matrix().row(t).begin());
    }
    CHECK(af::max_abs_diff(prefill.values(), decoded.values()) < 1e-5);
    CHECK(af::max_abs_diff(prefill_cache.keys(), decode_cache.keys()) == 0.0);
    CHECK(af::max_abs_diff(prefill_cache.values(), decode_cache.values()) == 0.0);

    // and both equal the float64 layer computed without a cache
    const auto x64 = reference::to64(x.matrix());
    const auto bias64 = [](const af::Tensor& b) { return std::vector<double>(b.values().begin(), b.values().end()); };
    const auto q = reference::linear(x64, reference::to64(w.q_proj.matrix()), bias64(w.q_bias));
    const auto k = reference::linear(x64, reference::to64(w.k_proj.matrix()), bias64(w.k_bias));
    const auto v = reference::linear(x64, reference::to64(w.v_proj.matrix()), bias64(w.v_bias));
    const auto expected = reference::linear(reference::attention(q, k, v, true, af::default_scale(d)),
                                            reference::to64(w.o_proj.matrix()));
    CHECK(reference::max_abs_diff(prefill.matrix(), expected) < 2e-5);
  }
}

TEST_CASE("The KV cache refuses rows of the wrong width and growth past its capacity", "[cache][errors]") {
  af::KvCache cache(2, 4, 3);
  const af::Tensor k(af::Shape{1, 4}), v(af::Shape{1, 3}), bad(af::Shape{1, 5});
  cache.append(k.matrix(), v.matrix());
  CHECK(cache.size() == 1);
  CHECK_THROWS_WITH(cache.append(bad.matrix(), v.matrix()), Contains("[1, 5]") && Contains("[n, 4]"));
  cache.append(k.matrix(), v.matrix());
  CHECK_THROWS_WITH(cache.append(k.matrix(), v.matrix()), Contains("capacity 2"));
  CHECK_THROWS_WITH(af::KvCache(0, 4, 4), Contains("capacity 0"));
}

TEST_CASE("Attention rejects disagreeing shapes and inconsistent weights, naming them", "[attention][errors]") {
  const af::Tensor q(af::Shape{2, 8}), k(af::Shape{3, 4}), v(af::Shape{3, 4});
  CHECK_THROWS_WITH(af::attention(q.matrix(), k.matrix(), v.matrix(), {}), Contains("[2, 8]") && Contains("[3, 4]"));
  af::Rng rng(24);
  af::SingleHeadWeights w = random_weights(rng, 16, 4, false);
  w.o_proj = af::Tensor(af::Shape{4, 16});
  CHECK_THROWS_WITH(w.validate(), Contains("o_proj is [4, 16]") && Contains("expected [16, 4]"));
}
