#include "af/error.hpp"
#include "af/mla.hpp"
#include "af/random.hpp"

#include <catch2/catch.hpp>

#include <cmath>

namespace {

af::MlaWeights random_mla(af::Rng& rng, const af::MlaShape& s) {
  const auto linear = [&](std::int64_t out, std::int64_t in) {
    return af::random_normal(af::Shape{out, in}, rng, 1.0 / std::sqrt(static_cast<double>(in)));
  };
  const auto gain = [&](std::int64_t n) {
    af::Tensor g = af::random_normal(af::Shape{n}, rng, 0.2);
    for (float& v : g.values()) v += 1.0f;
    return g;
  };
  af::MlaWeights w;
  if (s.q_lora_rank > 0) {
    w.q_a_proj = linear(s.q_lora_rank, s.hidden);
    w.q_a_layernorm = gain(s.q_lora_rank);
    w.q_b_proj = linear(s.heads * s.qk_head_dim(), s.q_lora_rank);
  } else {
    w.q_proj = linear(s.heads * s.qk_head_dim(), s.hidden);
  }
  w.kv_a_proj_with_mqa = linear(s.kv_lora_rank + s.qk_rope_head_dim, s.hidden);
  w.kv_a_layernorm = gain(s.kv_lora_rank);
  w.kv_b_proj = linear(s.heads * (s.qk_nope_head_dim + s.v_head_dim), s.kv_lora_rank);
  w.o_proj = linear(s.hidden, s.heads * s.v_head_dim);
  return w;
}

// The layer in float64, keys and values of every head built explicitly (the textbook form).
std::vector<double> reference_mla(const af::MlaShape& s, const af::MlaWeights& w, const af::Tensor& x,
                                  const std::vector<std::int64_t>& pos, double base, bool adjacent, double scale) {
  const std::int64_t T = x.dim(0), H = s.heads, nope = s.qk_nope_head_dim, rd = s.qk_rope_head_dim, dv = s.v_head_dim,
                     r = s.kv_lora_rank, dq = nope + rd;
  using Rows = std::vector<std::vector<double>>;
  const auto lin = [](const Rows& in, const af::Tensor& m) {
    Rows out(in.size(), std::vector<double>(static_cast<std::size_t>(m.dim(0)), 0.0));
    for (std::size_t t = 0; t < in.size(); ++t)
      for (std::int64_t o = 0; o < m.dim(0); ++o)
        for (std::int64_t i = 0; i < m.dim(1); ++i) out[t][o] += in[t][i] * m.at({o, i});
    return out;
  };
  const auto norm = [&](Rows rows, const af::Tensor& g) {
    for (auto& row : rows) {
      double ms = 0.0;
      for (double v : row) ms += v * v;
      const double inv = 1.0 / std::sqrt(ms / static_cast<double>(row.size()) + s.rms_norm_eps);
      for (std::size_t c = 0; c < row.size(); ++c) row[c] *= inv * g.data()[c];
    }
    return rows;
  };
  const auto rotate = [&](std::vector<double>& v, std::int64_t offset, double position) {
    for (std::int64_t i = 0; i < rd / 2; ++i) {
      const double angle = position * std::pow(base, -2.0 * static_cast<double>(i) / static_cast<double>(rd));
      const std::int64_t a = offset + (adjacent ? 2 * i : i), b = offset + (adjacent ? 2 * i + 1 : i + rd / 2);
      const double xa = v[a], xb = v[b];
      v[a] = xa * std::cos(angle) - xb * std::sin(angle);
      v[b] = xb * std::cos(angle) + xa * std::sin(angle);
    }
  };
  Rows x64(static_cast<std::size_t>(T));
  for (std::int64_t t = 0; t < T; ++t) x64[t].assign(x.matrix().row(t).begin(), x.matrix().row(t).end());
  Rows q = s.q_lora_rank > 0 ? lin(norm(lin(x64, w.q_a_proj), w.q_a_layernorm), w.q_b_proj) : lin(x64, w.q_proj);
  Rows kv = lin(x64, w.kv_a_proj_with_mqa);
  Rows c(static_cast<std::size_t>(T)), k_pe(static_cast<std::size_t>(T));
  for (std::int64_t t = 0; t < T; ++t) {
    c[t].assign(kv[t].begin(), kv[t].begin() + r);
    k_pe[t].assign(kv[t].begin() + r, kv[t].end());
    rotate(k_pe[t], 0, static_cast<double>(pos[t]));
    for (std::int64_t h = 0; h < H; ++h) rotate(q[t], h * dq + nope, static_cast<double>(pos[t]));
  }
  const Rows up = lin(norm(c, w.kv_a_layernorm), w.kv_b_proj);  // [T, H (nope + v)]
  Rows context(static_cast<std::size_t>(T), std::vector<double>(static_cast<std::size_t>(H * dv), 0.0));
  for (std::int64_t h = 0; h < H; ++h)
    for (std::int64_t i = 0; i < T; ++i) {
      std::vector<double> p(static_cast<std::size_t>(i + 1));
      double top = -1e300, sum = 0.0;
      for (std::int64_t j = 0; j <= i; ++j) {
        double dot = 0.0;
        for (std::int64_t e = 0; e < nope; ++e) dot += q[i][h * dq + e] * up[j][h * (nope + dv) + e];
        for (std::int64_t e = 0; e < rd; ++e) dot += q[i][h * dq + nope + e] * k_pe[j][e];
        top = std::max(top, p[j] = dot * scale);
      }
      for (double& e : p) sum += (e = std::exp(e - top));
      for (std::int64_t j = 0; j <= i; ++j)
        for (std::int64_t e = 0; e < dv; ++e) context[i][h * dv + e] += p[j] / sum * up[j][h * (nope + dv) + nope + e];
    }
  const Rows out = lin(context, w.o_proj);
  std::vector<double> flat;
  for (const auto& row : out) flat.insert(flat.end(), row.begin(), row.end());
  return flat;
}


}  // namespace

TEST_CASE("MLA: naive and absorbed decode agree with each other, with prefill and with float64", "[mla]") {
  af::Rng rng(51);
  for (const bool low_rank_queries : {true, false})
    for (const bool adjacent : {true, false}) {
      const af::MlaShape s{48, 4, low_rank_queries ? 24 : 0, 32, 16, 8, 12, 1e-6};
      const af::MlaWeights w = random_mla(rng, s);
      const af::Rope rope(8, 10000.0, adjacent ? af::RopeLayout::adjacent : af::RopeLayout::half_split);
      const double scale = 1.0 / std::sqrt(24.0);
      const std::int64_t T = 11;
      const af::Tensor x = af::random_normal(af::Shape{T, 48}, rng);
      std::vector<std::int64_t> positions(T);
      for (std::int64_t t = 0; t < T; ++t) positions[t] = t;
      const auto expected = reference_mla(s, w, x, positions, 10000.0, adjacent, scale);
      for (const af::MlaPath path : {af::MlaPath::naive, af::MlaPath::absorbed}) {
        af::MlaCache prefill_cache(T, 32, 8), decode_cache(T, 32, 8);
        const af::Tensor prefill = af::mla_attention(x.matrix(), positions, s, w, rope, scale, path, prefill_cache);
        af::Tensor decoded(af::Shape{T, 48});
        for (std::int64_t t = 0; t < T; ++t) {
          const af::Tensor y = af::mla_attention(x.matrix().rows_slice(t, 1), std::span(positions).subspan(t, 1), s, w,
                                                 rope, scale, path, decode_cache);
          std::ranges::copy(y.values(), decoded.matrix().row(t).begin());
        }
        INFO("q_lora " << low_rank_queries << " adjacent " << adjacent << " path " << static_cast<int>(path));
        CHECK(af::max_abs_diff(prefill.values(), expected) < 2e-5);
        CHECK(af::max_abs_diff(decoded.values(), expected) < 2e-5);
      }
    }
}

TEST_CASE("MLA rejects weights of the wrong shape, naming them", "[mla][errors]") {
  af::Rng rng(52);
  const af::MlaShape s{32, 2, 0, 16, 8, 4, 8, 1e-6};
  af::MlaWeights w = random_mla(rng, s);
  w.kv_b_proj = af::Tensor(af::Shape{10, 16});
  CHECK_THROWS_WITH(w.validate(s),
                    Catch::Matchers::Contains("kv_b_proj is [10, 16]") && Catch::Matchers::Contains("[32, 16]"));
  CHECK_THROWS_AS((af::MlaShape{32, 2, 0, 16, 8, 5, 8, 1e-6}.validate()), af::Error);
}
