// The cache policies of chapter 17 against float64 references written from each method's rule, and the
// property that makes a prefill a batch of decode steps: one call with T queries equals T calls of one.
#include "af/cache_policy.hpp"
#include "af/random.hpp"
#include "error_of.hpp"

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <set>
#include <vector>

using Catch::Matchers::Contains;

namespace {

constexpr std::int64_t kHeads = 4, kKvHeads = 2, kDim = 16, kTokens = 70;

struct Inputs {
  af::GroupedShape shape{kHeads * kDim, kHeads, kKvHeads, kDim};
  af::Rope rope{kDim, 10000.0, af::RopeLayout::adjacent};
  af::Tensor raw_q, raw_k, v;  // unrotated queries and keys [T, H d], [T, G d]; values [T, G d]
  af::Tensor q, k;             // rotated at their positions
};

Inputs random_inputs(std::uint64_t seed) {
  af::Rng rng(seed);
  Inputs in;
  in.raw_q = af::random_normal(af::Shape{kTokens, kHeads * kDim}, rng);
  in.raw_k = af::random_normal(af::Shape{kTokens, kKvHeads * kDim}, rng);
  in.v = af::random_normal(af::Shape{kTokens, kKvHeads * kDim}, rng);
  in.q = in.raw_q, in.k = in.raw_k;
  std::vector<std::int64_t> positions(kTokens);
  std::iota(positions.begin(), positions.end(), 0);
  in.rope.rotate_rows(in.q.matrix(), positions);
  in.rope.rotate_rows(in.k.matrix(), positions);
  return in;
}

// The policy over all tokens in one call (a prefill) or one token per call (decode), `[T, H d]`.
af::Tensor run(const af::CachePolicy& policy, const Inputs& in, bool one_at_a_time,
               std::vector<af::StepTraffic>* traffic = nullptr) {
  af::PolicyAttention attention(policy, 1, in.shape, in.rope);
  af::GroupedKvCache cache(kTokens, kKvHeads, kDim);
  af::Tensor out(af::Shape{kTokens, kHeads * kDim});
  const std::int64_t step = one_at_a_time ? 1 : kTokens;
  for (std::int64_t t = 0; t < kTokens; t += step) {
    cache.append(in.k.matrix().rows_slice(t, step), in.v.matrix().rows_slice(t, step));
    const af::Tensor o = attention.attend(0, in.q.matrix().rows_slice(t, step), cache);
    std::copy(o.data(), o.data() + o.numel(), out.data() + t * kHeads * kDim);
  }
  if (traffic != nullptr) *traffic = attention.traffic();
  return out;
}

double dot64(const float* a, const float* b, std::int64_t d) {
  double s = 0;
  for (std::int64_t i = 0; i < d; ++i) s += static_cast<double>(a[i]) * b[i];
  return s;
}

// Query head h at position p, attending over `chosen` with float64 scores `score(t)`: the output row.
template <class Score>
std::vector<double> attend64(const Inputs& in, std::int64_t h, const std::vector<std::int64_t>& chosen, Score score) {
  const std::int64_t g = h * kKvHeads / kHeads;
  std::vector<double> s;
  for (const auto t : chosen) s.push_back(score(t) / std::sqrt(static_cast<double>(kDim)));
  const double top = *std::max_element(s.begin(), s.end());
  double sum = 0;
  for (auto& x : s) sum += (x = std::exp(x - top));
  std::vector<double> o(kDim);
  for (std::size_t c = 0; c < chosen.size(); ++c)
    for (std::int64_t i = 0; i < kDim; ++i) o[i] += s[c] / sum * in.v.at({chosen[c], g * kDim + i});
  return o;
}

// The largest |a - b| over the outputs of every head and position; NaN fails.
template <class Reference>
double max_error(const af::Tensor& out, Reference reference) {
  double worst = 0;
  for (std::int64_t p = 0; p < kTokens; ++p)
    for (std::int64_t h = 0; h < kHeads; ++h) {
      const std::vector<double> want = reference(p, h);
      for (std::int64_t i = 0; i < kDim; ++i) {
        const double e = std::abs(out.at({p, h * kDim + i}) - want[static_cast<std::size_t>(i)]);
        if (!(e <= worst)) worst = std::isnan(e) ? INFINITY : e;
      }
    }
  return worst;
}

std::vector<std::int64_t> range(std::int64_t a, std::int64_t b) {
  std::vector<std::int64_t> r;
  for (std::int64_t t = std::max<std::int64_t>(a, 0); t < b; ++t) r.push_back(t);
  return r;
}

double rotated_score(const Inputs& in, std::int64_t p, std::int64_t h, std::int64_t t) {
  const std::int64_t g = h * kKvHeads / kHeads;
  return dot64(in.q.data() + p * kHeads * kDim + h * kDim, in.k.data() + t * kKvHeads * kDim + g * kDim, kDim);
}

}  // namespace

TEST_CASE("every selection policy equals a float64 reference of its rule, and decode equals prefill", "[policy]") {
  const Inputs in = random_inputs(17);
  const auto score = [&](std::int64_t p, std::int64_t h) {
    return [&in, p, h](std::int64_t t) { return rotated_score(in, p, h, t); };
  };
  af::CachePolicy policy;
  policy.storage = af::KvStorage::f32;
  std::function<std::vector<std::int64_t>(std::int64_t, std::int64_t)> chosen;
  SECTION("all") {
    chosen = [](std::int64_t p, std::int64_t) { return range(0, p + 1); };
  }
  SECTION("window") {
    policy.selection = af::KvSelection::window, policy.window = 9;
    chosen = [](std::int64_t p, std::int64_t) { return range(p + 1 - 9, p + 1); };
  }
  SECTION("sinks at their original positions") {
    policy.selection = af::KvSelection::sinks, policy.window = 9, policy.sinks = 3;
    chosen = [](std::int64_t p, std::int64_t) {
      std::set<std::int64_t> s{0, 1, 2};
      for (const auto t : range(p + 1 - 9, p + 1)) s.insert(t);
      std::vector<std::int64_t> r(s.begin(), s.end());
      r.erase(std::remove_if(r.begin(), r.end(), [p](std::int64_t t) { return t > p; }), r.end());
      return r;
    };
  }
  SECTION("top-k: the k largest float64 scores of each head") {
    policy.selection = af::KvSelection::top_k, policy.top_k = 11;
    chosen = [&](std::int64_t p, std::int64_t h) {
      std::vector<std::int64_t> r = range(0, p + 1);
      std::sort(r.begin(), r.end(),
                [&](auto a, auto b) { return rotated_score(in, p, h, a) > rotated_score(in, p, h, b); });
      r.resize(std::min<std::size_t>(r.size(), 11));
      return r;
    };
  }
  SECTION("Quest: the current page and the pages of largest key bound") {
    policy.selection = af::KvSelection::pages, policy.page = 8, policy.pages = 3;
    chosen = [&](std::int64_t p, std::int64_t h) {
      const std::int64_t g = h * kKvHeads / kHeads, current = p / 8;
      std::vector<std::pair<double, std::int64_t>> bounds;
      for (std::int64_t c = 0; c < current; ++c) {
        double bound = 0;
        for (std::int64_t i = 0; i < kDim; ++i) {
          double lo = INFINITY, hi = -INFINITY;
          for (std::int64_t t = c * 8; t < c * 8 + 8; ++t)
            lo = std::min<double>(lo, in.k.at({t, g * kDim + i})),
            hi = std::max<double>(hi, in.k.at({t, g * kDim + i}));
          const double qi = in.q.at({p, h * kDim + i});
          bound += std::max(qi * lo, qi * hi);
        }
        bounds.emplace_back(-bound, c);
      }
      std::sort(bounds.begin(), bounds.end());
      std::vector<std::int64_t> r;
      for (std::size_t c = 0; c < std::min<std::size_t>(2, bounds.size()); ++c)
        for (const auto t : range(bounds[c].second * 8, bounds[c].second * 8 + 8)) r.push_back(t);
      for (const auto t : range(current * 8, p + 1)) r.push_back(t);
      return r;
    };
  }
  const af::Tensor prefill = run(policy, in, false), decode = run(policy, in, true);
  CHECK(max_error(prefill, [&](std::int64_t p, std::int64_t h) { return attend64(in, h, chosen(p, h), score(p, h)); }) <
        2e-6);
  CHECK(max_error(decode, [&](std::int64_t p, std::int64_t h) { return attend64(in, h, chosen(p, h), score(p, h)); }) <
        2e-6);
}

TEST_CASE("sinks at their cache slots: the query and keys rotated at the slots StreamingLLM gives them", "[policy]") {
  const Inputs in = random_inputs(5);
  af::CachePolicy policy;
  policy.storage = af::KvStorage::f32, policy.selection = af::KvSelection::sinks;
  policy.window = 10, policy.sinks = 4, policy.sink_positions = af::SinkPositions::in_cache;
  const af::Tensor out = run(policy, in, false);
  const double error = max_error(out, [&](std::int64_t p, std::int64_t h) {
    const std::int64_t g = h * kKvHeads / kHeads, window_first = std::max<std::int64_t>(0, p + 1 - 10);
    // Slots: sinks 0..3, then the window; before the window passes the sinks, slot = position.
    const std::int64_t shift = std::max<std::int64_t>(0, window_first - 4);
    std::vector<std::int64_t> chosen = range(0, std::min<std::int64_t>(4, window_first));
    for (const auto t : range(window_first, p + 1)) chosen.push_back(t);
    std::vector<float> qh(in.raw_q.data() + p * kHeads * kDim + h * kDim,
                          in.raw_q.data() + p * kHeads * kDim + (h + 1) * kDim);
    in.rope.rotate(qh, static_cast<double>(p - shift));
    return attend64(in, h, chosen, [&](std::int64_t t) {
      std::vector<float> kt(in.raw_k.data() + t * kKvHeads * kDim + g * kDim,
                            in.raw_k.data() + t * kKvHeads * kDim + (g + 1) * kDim);
      in.rope.rotate(kt, static_cast<double>(t < 4 ? t : t - shift));
      return dot64(qh.data(), kt.data(), kDim);
    });
  });
  CHECK(error < 2e-6);
  CHECK(max_error(run(policy, in, true), [&](std::int64_t p, std::int64_t h) {
          std::vector<double> row(kDim);
          for (std::int64_t i = 0; i < kDim; ++i) row[static_cast<std::size_t>(i)] = out.at({p, h * kDim + i});
          return row;
        }) < 1e-6);
}

TEST_CASE("H2O keeps the recent half and the heavy hitters of the group's accumulated attention", "[policy]") {
  const Inputs in = random_inputs(23);
  af::CachePolicy policy;
  policy.storage = af::KvStorage::f32, policy.selection = af::KvSelection::heavy_hitters, policy.budget = 12;
  std::vector<af::StepTraffic> traffic;
  const af::Tensor prefill = run(policy, in, false, &traffic), decode = run(policy, in, true);
  // The reference: per KV head, a held list and float64 scores; add the new token, evict the least-scored
  // token older than the last 6 when over 12, attend, add each group head's weights.
  std::vector<std::vector<double>> want(static_cast<std::size_t>(kTokens * kHeads));
  for (std::int64_t g = 0; g < kKvHeads; ++g) {
    std::vector<std::int64_t> held;
    std::vector<double> acc;
    for (std::int64_t p = 0; p < kTokens; ++p) {
      held.push_back(p), acc.push_back(0);
      if (held.size() > 12) {
        std::size_t victim = 0;
        for (std::size_t c = 1; c < held.size(); ++c)
          if (held[c] <= p - 6 && acc[c] < acc[victim]) victim = c;
        held.erase(held.begin() + static_cast<long>(victim)), acc.erase(acc.begin() + static_cast<long>(victim));
      }
      for (std::int64_t h = g * 2; h < g * 2 + 2; ++h) {
        std::vector<double> s;
        for (const auto t : held) s.push_back(rotated_score(in, p, h, t) / 4.0);
        const double top = *std::max_element(s.begin(), s.end());
        double sum = 0;
        for (auto& x : s) sum += (x = std::exp(x - top));
        for (std::size_t c = 0; c < held.size(); ++c) acc[c] += s[c] / sum;
        want[static_cast<std::size_t>(p * kHeads + h)] =
            attend64(in, h, held, [&](std::int64_t t) { return rotated_score(in, p, h, t); });
      }
    }
  }
  const auto reference = [&](std::int64_t p, std::int64_t h) { return want[static_cast<std::size_t>(p * kHeads + h)]; };
  CHECK(max_error(prefill, reference) < 2e-6);
  CHECK(max_error(decode, reference) < 2e-6);
  // Held: min(p + 1, 12) tokens of K and V in f32 plus a float32 score each, per KV head.
  for (std::int64_t p : {0, 5, 11, 40, 69})
    CHECK(traffic[static_cast<std::size_t>(p)].bytes_held ==
          static_cast<double>(kKvHeads * std::min<std::int64_t>(p + 1, 12) * (2 * kDim * 4 + 4)));
}

TEST_CASE("quantized storages: error grows as bits shrink, the residual block is read as bf16, bytes counted",
          "[policy]") {
  const Inputs in = random_inputs(31);
  af::CachePolicy policy;
  const auto exact = run(policy = {.storage = af::KvStorage::f32}, in, false);
  const auto error_of_storage = [&](af::KvStorage storage, std::int64_t block) {
    af::CachePolicy p{.storage = storage, .block = block, .value_group = 16};
    const af::Tensor prefill = run(p, in, false), decode = run(p, in, true);
    double worst = 0, decode_gap = 0;
    for (std::int64_t i = 0; i < exact.numel(); ++i) {
      const double e = std::abs(prefill.data()[i] - exact.data()[i]);
      const double gap = std::abs(prefill.data()[i] - decode.data()[i]);
      if (!(e <= worst)) worst = std::isnan(e) ? INFINITY : e;
      if (!(gap <= decode_gap)) decode_gap = std::isnan(gap) ? INFINITY : gap;
    }
    CHECK(decode_gap < 1e-6);
    return worst;
  };
  const double bf16 = error_of_storage(af::KvStorage::bf16, 8), int8 = error_of_storage(af::KvStorage::int8, 8),
               e4m3 = error_of_storage(af::KvStorage::e4m3, 8), int4 = error_of_storage(af::KvStorage::int4, 8),
               int2 = error_of_storage(af::KvStorage::int2, 8);
  CHECK(bf16 > 0);
  CHECK(bf16 < 0.02);
  CHECK(int8 < e4m3);
  CHECK(e4m3 < int4);
  CHECK(int4 < int2);
  // Until a key block is complete its keys are read as bf16: before position 7 the outputs with blocks of 8
  // equal those with one block longer than the sequence (values are int4 per token in both); after, they differ.
  const af::Tensor blocks_of_8 = run({.storage = af::KvStorage::int4, .block = 8, .value_group = 16}, in, false);
  const af::Tensor one_block = run({.storage = af::KvStorage::int4, .block = 128, .value_group = 16}, in, false);
  const std::int64_t row = kHeads * kDim;
  CHECK(std::equal(blocks_of_8.data(), blocks_of_8.data() + 7 * row, one_block.data()));
  CHECK(!std::equal(blocks_of_8.data() + 8 * row, blocks_of_8.data() + kTokens * row, one_block.data() + 8 * row));

  std::vector<af::StepTraffic> traffic;
  run(af::CachePolicy{.storage = af::KvStorage::int4, .block = 8, .value_group = 16}, in, false, &traffic);
  // Position 20: 21 tokens, 2 complete key blocks (16 tokens at 4 bits + a minimum and step per channel and
  // block), 5 residual bf16 keys; values 21 x (16 x 0.5 + one group x 8) bytes; two KV heads; all read.
  const double keys = 16 * 16 * 0.5 + 2 * 16 * 8 + 5 * 16 * 2, values = 21 * (16 * 0.5 + 8);
  CHECK(traffic[20].bytes_held == 2 * (keys + values));
  CHECK(traffic[20].bytes_read == traffic[20].bytes_held);
}

TEST_CASE("a selection reads the union of its heads' tokens and counts what choosing them costs", "[policy]") {
  const Inputs in = random_inputs(41);
  std::vector<af::StepTraffic> traffic;
  run(af::CachePolicy{.selection = af::KvSelection::top_k, .top_k = 5}, in, false, &traffic);
  // bf16: one token of one KV head is 2 x 16 x 2 bytes. Two heads per group each read 5 tokens: 5..10.
  for (std::int64_t p = 10; p < kTokens; ++p) {
    const af::StepTraffic& t = traffic[static_cast<std::size_t>(p)];
    CHECK(t.bytes_read >= 2 * 5 * 64.0);
    CHECK(t.bytes_read <= 2 * 10 * 64.0);
    CHECK(t.selection_bytes == 2 * (p + 1) * 16 * 2.0);  // every key of both KV heads scored
    CHECK(t.bytes_held == 2 * (p + 1) * 64.0);
  }
  run(af::CachePolicy{.selection = af::KvSelection::window, .window = 9}, in, false, &traffic);
  CHECK(traffic[3].bytes_read == 2 * 4 * 64.0);
  CHECK(traffic[50].bytes_read == 2 * 9 * 64.0);
  CHECK(traffic[50].bytes_held == 2 * 9 * 64.0);
}

TEST_CASE("cache policies reject bad knobs and out-of-order calls, naming the value", "[policy]") {
  const Inputs in = random_inputs(3);
  const auto make = [&](af::CachePolicy p) { af::PolicyAttention a(p, 2, in.shape, in.rope); };
  CHECK_THAT(af_test::error_of([&] { make({.selection = af::KvSelection::window, .window = 0}); }),
             Contains("window 0"));
  CHECK_THAT(af_test::error_of(
                 [&] { make({.storage = af::KvStorage::int4, .selection = af::KvSelection::top_k, .top_k = 4}); }),
             Contains("int4"));
  CHECK_THAT(af_test::error_of([&] { make({.storage = af::KvStorage::int4, .value_group = 5}); }),
             Contains("value group 5"));
  CHECK_THAT(af_test::error_of([&] { make({.selection = af::KvSelection::heavy_hitters, .budget = 1}); }),
             Contains("budget 1"));
  af::PolicyAttention attention(af::CachePolicy{}, 2, in.shape, in.rope);
  af::GroupedKvCache cache(kTokens, kKvHeads, kDim);
  cache.append(in.k.matrix().rows_slice(0, 4), in.v.matrix().rows_slice(0, 4));
  CHECK_THAT(af_test::error_of([&] { attention.attend(2, in.q.matrix().rows_slice(0, 4), cache); }),
             Contains("layer 2"));
  CHECK_THAT(af_test::error_of([&] { attention.attend(0, in.q.matrix().rows_slice(0, 3), cache); }),
             Contains("position 1"));
}
