#include "af/error.hpp"
#include "af/grouped_attention.hpp"
#include "af/random.hpp"
#include "reference.hpp"

#include <catch2/catch.hpp>

using Catch::Matchers::Contains;

namespace {

struct Layer {
  af::GroupedShape shape;
  af::GroupedWeights weights;
};

Layer random_layer(af::Rng& rng, std::int64_t hidden, std::int64_t heads, std::int64_t kv_heads, std::int64_t d,
                   bool bias) {
  Layer l{{hidden, heads, kv_heads, d}, {}};
  const double in = 1.0 / std::sqrt(static_cast<double>(hidden));
  l.weights.q_proj = af::random_normal(af::Shape{heads * d, hidden}, rng, in);
  l.weights.k_proj = af::random_normal(af::Shape{kv_heads * d, hidden}, rng, in);
  l.weights.v_proj = af::random_normal(af::Shape{kv_heads * d, hidden}, rng, in);
  l.weights.o_proj =
      af::random_normal(af::Shape{hidden, heads * d}, rng, 1.0 / std::sqrt(static_cast<double>(heads * d)));
  if (bias) {
    l.weights.q_bias = af::random_normal(af::Shape{heads * d}, rng, 0.5);
    l.weights.k_bias = af::random_normal(af::Shape{kv_heads * d}, rng, 0.5);
    l.weights.v_bias = af::random_normal(af::Shape{kv_heads * d}, rng, 0.5);
  }
  return l;
}

// The layer in float64 with K and V expanded to one copy per query head (what MHA would store).
reference::Matrix64 reference_layer(const Layer& l, const af::Tensor& x, bool causal) {
  const auto x64 = reference::to64(x.matrix());
  const auto bias = [](const af::Tensor& b) { return std::vector<double>(b.values().begin(), b.values().end()); };
  const auto q = reference::linear(x64, reference::to64(l.weights.q_proj.matrix()), bias(l.weights.q_bias));
  const auto k = reference::linear(x64, reference::to64(l.weights.k_proj.matrix()), bias(l.weights.k_bias));
  const auto v = reference::linear(x64, reference::to64(l.weights.v_proj.matrix()), bias(l.weights.v_bias));
  const std::int64_t d = l.shape.head_dim, T = x.dim(0);
  reference::Matrix64 context(static_cast<std::size_t>(T),
                              std::vector<double>(static_cast<std::size_t>(l.shape.heads * d)));
  const auto columns = [&](const reference::Matrix64& m, std::int64_t head) {
    reference::Matrix64 out(m.size());
    for (std::size_t t = 0; t < m.size(); ++t) out[t].assign(m[t].begin() + head * d, m[t].begin() + (head + 1) * d);
    return out;
  };
  for (std::int64_t h = 0; h < l.shape.heads; ++h) {
    const std::int64_t g = h * l.shape.kv_heads / l.shape.heads;  // written differently from kv_head_of on purpose
    const auto out = reference::attention(columns(q, h), columns(k, g), columns(v, g), causal,
                                          1.0 / std::sqrt(static_cast<double>(d)));
    for (std::int64_t t = 0; t < T; ++t) std::copy(out[t].begin(), out[t].end(), context[t].begin() + h * d);
  }
  return reference::linear(context, reference::to64(l.weights.o_proj.matrix()));
}

}  // namespace

TEST_CASE("Grouped attention matches a float64 reference for MHA, GQA and MQA", "[gqa]") {
  af::Rng rng(31);
  for (int trial = 0; trial < 24; ++trial) {
    const std::int64_t kv_heads = 1 + rng.below(4), group = 1 + rng.below(4), heads = kv_heads * group;
    const std::int64_t d = 1 + rng.below(24), hidden = 1 + rng.below(48), T = 1 + rng.below(20);
    const bool causal = rng.below(4) != 0, bias = rng.below(2) == 0;
    const Layer l = random_layer(rng, hidden, heads, kv_heads, d, bias);
    const af::Tensor x = af::random_normal(af::Shape{T, hidden}, rng);
    af::GroupedKvCache cache(T, kv_heads, d);
    const af::Tensor out = af::grouped_attention(x.matrix(), l.shape, l.weights, {causal, std::nullopt}, cache);
    INFO("H " << heads << " G " << kv_heads << " d " << d << " T " << T << " causal " << causal);
    CHECK(reference::max_abs_diff(out.matrix(), reference_layer(l, x, causal)) < 2e-5);
  }
}

TEST_CASE("Grouped prefill equals token-by-token decode for every group size and batch", "[gqa][cache]") {
  af::Rng rng(32);
  for (const auto& [heads, kv_heads] : {std::pair{4, 4}, {8, 2}, {6, 3}, {4, 1}, {1, 1}, {12, 4}}) {
    const std::int64_t d = 1 + rng.below(32), hidden = 8 + rng.below(40), batch = 1 + rng.below(3);
    const Layer l = random_layer(rng, hidden, heads, kv_heads, d, rng.below(2) == 0);
    for (std::int64_t sequence = 0; sequence < batch; ++sequence) {  // each sequence has its own cache
      const std::int64_t T = 1 + rng.below(16);
      const af::Tensor x = af::random_normal(af::Shape{T, hidden}, rng);
      af::GroupedKvCache prefill_cache(T, kv_heads, d), decode_cache(T, kv_heads, d);
      const af::Tensor prefill = af::grouped_attention(x.matrix(), l.shape, l.weights, {}, prefill_cache);
      af::Tensor decoded(af::Shape{T, hidden});
      for (std::int64_t t = 0; t < T; ++t) {
        const af::Tensor step =
            af::grouped_attention(x.matrix().rows_slice(t, 1), l.shape, l.weights, {}, decode_cache);
        std::ranges::copy(step.values(), decoded.matrix().row(t).begin());
      }
      INFO("H " << heads << " G " << kv_heads << " T " << T);
      CHECK(af::max_abs_diff(prefill.values(), decoded.values()) < 1e-5);
      for (std::int64_t g = 0; g < kv_heads; ++g)
        CHECK(af::max_abs_diff(prefill_cache.keys(g), decode_cache.keys(g)) == 0.0);
    }
  }
}

TEST_CASE("MHA through the grouped layer equals independent single heads", "[gqa]") {
  af::Rng rng(33);
  const std::int64_t heads = 3, d = 8, hidden = 24, T = 10;
  const Layer l = random_layer(rng, hidden, heads, heads, d, false);
  const af::Tensor x = af::random_normal(af::Shape{T, hidden}, rng);
  af::GroupedKvCache cache(T, heads, d);
  const af::Tensor q = af::random_normal(af::Shape{T, heads * d}, rng);
  cache.append(af::random_normal(af::Shape{T, heads * d}, rng).matrix(),
               af::random_normal(af::Shape{T, heads * d}, rng).matrix());
  const af::Tensor grouped = af::grouped_attend(q.matrix(), l.shape, cache, {});
  for (std::int64_t h = 0; h < heads; ++h) {
    const af::Tensor single =
        af::attention(af::head_view(q.reshaped(af::Shape{T, heads, d}), h), cache.keys(h), cache.values(h), {});
    CHECK(af::max_abs_diff(single.matrix(), af::head_view(grouped.reshaped(af::Shape{T, heads, d}), h)) < 1e-6);
  }
}

TEST_CASE("The query-head to KV-head map sends each group to its KV head", "[gqa]") {
  const af::GroupedShape gqa{64, 8, 2, 16};
  CHECK(gqa.group_size() == 4);
  CHECK(gqa.kv_head_of(0) == 0);
  CHECK(gqa.kv_head_of(3) == 0);
  CHECK(gqa.kv_head_of(4) == 1);
  CHECK(gqa.kv_head_of(7) == 1);
  const af::GroupedShape mqa{64, 8, 1, 16}, mha{64, 8, 8, 16};
  for (std::int64_t h = 0; h < 8; ++h) {
    CHECK(mqa.kv_head_of(h) == 0);
    CHECK(mha.kv_head_of(h) == h);
  }
}

TEST_CASE("Grouped attention rejects bad head counts and shapes, naming them", "[gqa][errors]") {
  CHECK_THROWS_WITH((af::GroupedShape{64, 6, 4, 16}.validate()), Contains("6 query heads") && Contains("4 KV heads"));
  CHECK_THROWS_WITH((af::GroupedShape{64, 0, 1, 16}.validate()), Contains("heads 0"));
  af::Rng rng(34);
  Layer l = random_layer(rng, 16, 4, 2, 4, false);
  l.weights.k_proj = af::Tensor(af::Shape{16, 16});
  CHECK_THROWS_WITH(l.weights.validate(l.shape), Contains("k_proj is [16, 16]") && Contains("expected [8, 16]"));
  af::GroupedKvCache cache(4, 2, 4);
  CHECK_THROWS_WITH(cache.append(af::Tensor(af::Shape{1, 6}).matrix(), af::Tensor(af::Shape{1, 8}).matrix()),
                    Contains("[1, 6]") && Contains("[n, 8]"));
}
