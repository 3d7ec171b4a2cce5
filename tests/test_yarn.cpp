// YaRN (Peng et al. 2023) as af::Rope computes it, against a float64 transcription of the rule that Hugging Face
// transformers' `rope_type: "yarn"` follows (ramp over pair indices between the beta_fast and beta_slow
// boundaries; attention factor on the rotated q and k).
#include "af/error.hpp"
#include "af/mla.hpp"
#include "af/random.hpp"
#include "af/rope.hpp"

#include <catch2/catch.hpp>

#include <cmath>
#include <numbers>
#include <vector>

namespace {

struct Yarn64 {
  std::vector<double> inverse_frequencies;
  double attention = 1.0;
};

// The rule written out pair by pair in float64, independently of the library's code path.
Yarn64 yarn64(int d, double base, double factor, double original, double beta_fast, double beta_slow, bool truncate,
              double mscale = 0.0, double mscale_all_dim = 0.0) {
  const auto boundary = [&](double rotations) {
    // 2 pi base^(2i/d) = original / rotations, solved for i
    return std::log(original / (2.0 * std::numbers::pi * rotations)) / std::log(base) * d / 2.0;
  };
  double low = boundary(beta_fast), high = boundary(beta_slow);
  if (truncate) {
    low = std::floor(low);
    high = std::ceil(high);
  }
  low = low < 0.0 ? 0.0 : low;
  high = high > d - 1.0 ? d - 1.0 : high;
  if (low == high) high += 0.001;
  Yarn64 out;
  for (int i = 0; i < d / 2; ++i) {
    const double theta = 1.0 / std::pow(base, 2.0 * i / d);
    double ramp = (i - low) / (high - low);
    ramp = ramp < 0.0 ? 0.0 : (ramp > 1.0 ? 1.0 : ramp);
    out.inverse_frequencies.push_back(theta * (1.0 - ramp) + theta / factor * ramp);
  }
  const auto m = [&](double w) { return factor <= 1.0 ? 1.0 : 1.0 + 0.1 * w * std::log(factor); };
  out.attention = (mscale != 0.0 && mscale_all_dim != 0.0) ? m(mscale) / m(mscale_all_dim) : m(1.0);
  return out;
}

double dot64(const std::vector<float>& a, const std::vector<float>& b) {
  double s = 0.0;
  for (std::size_t i = 0; i < a.size(); ++i) s += double{a[i]} * b[i];
  return s;
}

std::vector<float> random_vector(af::Rng& rng, std::int64_t n) {
  const af::Tensor t = af::random_normal(af::Shape{n}, rng);
  return {t.values().begin(), t.values().end()};
}

}  // namespace

TEST_CASE("YaRN's frequencies and attention factor equal the float64 transcription", "[rope][yarn]") {
  struct Setting {
    int d;
    double base, factor, original, beta_fast, beta_slow;
    bool truncate;
  };
  // gpt-oss's published settings (theta 150000, factor 32, beta 32 / 1, original 4096, no truncation), a
  // truncated variant, and one whose ramp is clamped at both ends.
  for (const Setting s :
       {Setting{64, 150000.0, 32.0, 4096.0, 32.0, 1.0, false}, Setting{16, 150000.0, 32.0, 4096.0, 32.0, 1.0, true},
        Setting{32, 10000.0, 4.0, 64.0, 8.0, 2.0, true}, Setting{8, 10000.0, 8.0, 1e6, 32.0, 1.0, false}}) {
    af::YarnScaling yarn;
    yarn.factor = s.factor;
    yarn.original_context = s.original;
    yarn.beta_fast = s.beta_fast;
    yarn.beta_slow = s.beta_slow;
    yarn.truncate = s.truncate;
    const af::Rope rope(s.d, s.base, af::RopeLayout::half_split, yarn);
    const Yarn64 want = yarn64(s.d, s.base, s.factor, s.original, s.beta_fast, s.beta_slow, s.truncate);
    REQUIRE(rope.inverse_frequencies().size() == want.inverse_frequencies.size());
    for (std::size_t i = 0; i < want.inverse_frequencies.size(); ++i)
      CHECK(rope.inverse_frequencies()[i] == Approx(want.inverse_frequencies[i]).epsilon(1e-12));
    CHECK(rope.attention_scale() == Approx(want.attention).epsilon(1e-12));
  }
}

TEST_CASE("YaRN keeps fast pairs, divides slow pairs by the factor, and blends between", "[rope][yarn]") {
  af::YarnScaling yarn;  // gpt-oss's settings
  yarn.truncate = false;
  const af::Rope plain(64, 150000.0, af::RopeLayout::half_split);
  const af::Rope scaled(64, 150000.0, af::RopeLayout::half_split, yarn);
  int kept = 0, stretched = 0, blended = 0;
  for (std::size_t i = 0; i < plain.inverse_frequencies().size(); ++i) {
    const double f = plain.inverse_frequencies()[i], g = scaled.inverse_frequencies()[i];
    const double rotations = yarn.original_context * f / (2.0 * std::numbers::pi);  // over the original context
    if (rotations >= yarn.beta_fast) {
      CHECK(g == Approx(f).epsilon(1e-12));
      ++kept;
    } else if (rotations <= yarn.beta_slow) {
      CHECK(g == Approx(f / yarn.factor).epsilon(1e-12));
      ++stretched;
    } else {
      CHECK(g < f);
      CHECK(g > f / yarn.factor);
      ++blended;
    }
  }
  CHECK(kept > 0);
  CHECK(stretched > 0);
  CHECK(blended > 0);
  CHECK(scaled.attention_scale() == Approx(0.1 * std::log(32.0) + 1.0));
}

TEST_CASE("YaRN scales rotated vectors by its attention factor and keeps q . k relative", "[rope][yarn]") {
  af::Rng rng(77);
  af::YarnScaling yarn;
  yarn.factor = 16.0;
  yarn.original_context = 256.0;
  const af::Rope rope(32, 10000.0, af::RopeLayout::half_split, yarn);
  const double m = rope.attention_scale();
  for (int trial = 0; trial < 30; ++trial) {
    auto q = random_vector(rng, 32), k = random_vector(rng, 32);
    const double norm = std::sqrt(dot64(q, q));
    const double a = static_cast<double>(rng.below(3000)), b = static_cast<double>(rng.below(3000)),
                 shift = static_cast<double>(rng.below(3000));
    auto qa = q, kb = k, qs = q, ks = k;
    rope.rotate(qa, a);
    rope.rotate(kb, b);
    rope.rotate(qs, a + shift);
    rope.rotate(ks, b + shift);
    CHECK(std::sqrt(dot64(qa, qa)) == Approx(m * norm).epsilon(1e-5));
    const double near = dot64(qa, kb), far = dot64(qs, ks);
    CHECK(std::abs(near - far) < 1e-4 * (1.0 + std::abs(near)));
  }
}

TEST_CASE("YaRN's attention factor: explicit, from mscale ratios, or 1 without scaling", "[rope][yarn]") {
  af::YarnScaling yarn;
  yarn.factor = 40.0;
  yarn.mscale = 1.0;
  yarn.mscale_all_dim = 0.707;
  CHECK(yarn.attention_scale() ==
        Approx(yarn64(8, 1e4, 40.0, 4096.0, 32.0, 1.0, true, 1.0, 0.707).attention).epsilon(1e-12));
  yarn.attention_factor = 0.5;
  CHECK(yarn.attention_scale() == 0.5);
  af::YarnScaling none;
  none.factor = 1.0;
  const af::Rope plain(16, 10000.0, af::RopeLayout::adjacent), same(16, 10000.0, af::RopeLayout::adjacent, none);
  CHECK(same.attention_scale() == 1.0);
  for (std::size_t i = 0; i < plain.inverse_frequencies().size(); ++i)
    CHECK(same.inverse_frequencies()[i] == Approx(plain.inverse_frequencies()[i]).epsilon(1e-15));
}

TEST_CASE("YaRN rejects a factor below 1, swapped betas and a non-positive attention factor", "[rope][yarn][errors]") {
  using Catch::Matchers::Contains;
  af::YarnScaling bad;
  bad.factor = 0.5;
  CHECK_THROWS_WITH(af::Rope(8, 1e4, af::RopeLayout::half_split, bad), Contains("factor 0.5"));
  bad = {};
  bad.beta_fast = 1.0;
  bad.beta_slow = 32.0;
  CHECK_THROWS_WITH(af::Rope(8, 1e4, af::RopeLayout::half_split, bad), Contains("beta_fast 1"));
  bad = {};
  bad.attention_factor = 0.0;
  CHECK_THROWS_WITH(af::Rope(8, 1e4, af::RopeLayout::half_split, bad), Contains("attention factor 0"));
  bad = {};
  bad.original_context = 0.0;
  CHECK_THROWS_AS(af::Rope(8, 1e4, af::RopeLayout::half_split, bad), af::Error);
}

TEST_CASE("DeepSeek-V3's softmax scale carries YaRN's mscale(factor, mscale_all_dim) squared", "[rope][yarn][mla]") {
  // DeepSeek-V3 as released: qk_nope 128 + qk_rope 64, YaRN factor 40 with mscale = mscale_all_dim = 1.
  af::MlaShape shape;
  shape.hidden = 7168;
  shape.heads = 128;
  shape.q_lora_rank = 1536;
  shape.kv_lora_rank = 512;
  shape.qk_nope_head_dim = 128;
  shape.qk_rope_head_dim = 64;
  shape.v_head_dim = 128;
  af::YarnScaling yarn;
  yarn.factor = 40.0;
  yarn.mscale = 1.0;
  yarn.mscale_all_dim = 1.0;
  const double mscale = 0.1 * std::log(40.0) + 1.0;
  CHECK(af::yarn_mscale(40.0, 1.0) == Approx(mscale).epsilon(1e-15));
  CHECK(af::yarn_mscale(1.0, 1.0) == 1.0);
  CHECK(af::mla_softmax_scale(shape, std::nullopt) == Approx(1.0 / std::sqrt(192.0)).epsilon(1e-15));
  CHECK(af::mla_softmax_scale(shape, yarn) == Approx(mscale * mscale / std::sqrt(192.0)).epsilon(1e-15));
  CHECK(yarn.attention_scale() == Approx(1.0).epsilon(1e-15));  // the rotated part itself is not rescaled
  yarn.mscale_all_dim = 0.0;                                    // not given: no correction of the scale
  CHECK(af::mla_softmax_scale(shape, yarn) == Approx(1.0 / std::sqrt(192.0)).epsilon(1e-15));
}
