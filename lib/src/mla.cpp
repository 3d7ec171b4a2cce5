#include "af/mla.hpp"

#include "af/error.hpp"
#include "af/linalg.hpp"
#include "af/softmax.hpp"

#include <cmath>

namespace af {

void MlaShape::validate() const {
  require(hidden > 0 && heads > 0 && kv_lora_rank > 0 && qk_nope_head_dim > 0 && v_head_dim > 0 && q_lora_rank >= 0,
          "MlaShape: hidden {}, heads {}, q_lora_rank {}, kv_lora_rank {}, qk_nope_head_dim {}, v_head_dim {} "
          "(expected all > 0, q_lora_rank >= 0)",
          hidden, heads, q_lora_rank, kv_lora_rank, qk_nope_head_dim, v_head_dim);
  require(qk_rope_head_dim > 0 && qk_rope_head_dim % 2 == 0, "MlaShape: qk_rope_head_dim is {} (expected even, > 0)",
          qk_rope_head_dim);
  require(rms_norm_eps > 0.0, "MlaShape: rms_norm_eps is {} (expected > 0)", rms_norm_eps);
}

void MlaWeights::validate(const MlaShape& s) const {
  s.validate();
  const auto check = [](const char* name, const Tensor& t, const Shape& expected) {
    if (!(t.shape() == expected)) fail("MlaWeights: {} is {} (expected {})", name, t.shape().str(), expected.str());
  };
  const std::int64_t q_out = s.heads * s.qk_head_dim();
  if (s.q_lora_rank > 0) {
    check("q_a_proj", q_a_proj, Shape{s.q_lora_rank, s.hidden});
    check("q_a_layernorm", q_a_layernorm, Shape{s.q_lora_rank});
    check("q_b_proj", q_b_proj, Shape{q_out, s.q_lora_rank});
  } else {
    check("q_proj", q_proj, Shape{q_out, s.hidden});
  }
  check("kv_a_proj_with_mqa", kv_a_proj_with_mqa, Shape{s.kv_lora_rank + s.qk_rope_head_dim, s.hidden});
  check("kv_a_layernorm", kv_a_layernorm, Shape{s.kv_lora_rank});
  check("kv_b_proj", kv_b_proj, Shape{s.heads * (s.qk_nope_head_dim + s.v_head_dim), s.kv_lora_rank});
  check("o_proj", o_proj, Shape{s.hidden, s.heads * s.v_head_dim});
}

MlaCache::MlaCache(std::int64_t capacity, std::int64_t kv_lora_rank, std::int64_t rope_dim) {
  require(capacity > 0 && kv_lora_rank > 0 && rope_dim > 0, "MlaCache: capacity {}, kv_lora_rank {}, rope_dim {}",
          capacity, kv_lora_rank, rope_dim);
  latent_ = Tensor(Shape{capacity, kv_lora_rank});
  rope_keys_ = Tensor(Shape{capacity, rope_dim});
}

void MlaCache::append(ConstMatrix latent, ConstMatrix rope_keys) {
  if (!(latent.cols == latent_.dim(1) && rope_keys.cols == rope_keys_.dim(1) && latent.rows == rope_keys.rows))
    fail("MlaCache::append: latent {} and rope keys {} (expected [n, {}] and [n, {}])", latent.shape_str(),
         rope_keys.shape_str(), latent_.dim(1), rope_keys_.dim(1));
  require(size_ + latent.rows <= latent_.dim(0), "MlaCache::append: {} cached + {} new tokens exceed the capacity {}",
          size_, latent.rows, latent_.dim(0));
  for (std::int64_t r = 0; r < latent.rows; ++r) {
    std::ranges::copy(latent.row(r), latent_.matrix().row(size_ + r).begin());
    std::ranges::copy(rope_keys.row(r), rope_keys_.matrix().row(size_ + r).begin());
  }
  size_ += latent.rows;
}

double mla_softmax_scale(const MlaShape& shape, const std::optional<YarnScaling>& yarn) {
  shape.validate();
  const double scale = 1.0 / std::sqrt(static_cast<double>(shape.qk_head_dim()));
  if (!yarn || yarn->mscale_all_dim == 0.0) return scale;
  const double mscale = yarn_mscale(yarn->factor, yarn->mscale_all_dim);
  return scale * mscale * mscale;
}

void rms_norm_rows(Matrix x, std::span<const float> gain, double eps) {
  require(static_cast<std::int64_t>(gain.size()) == x.cols, "rms_norm_rows: {} gains for rows of {}", gain.size(),
          x.cols);
  for (std::int64_t r = 0; r < x.rows; ++r) {
    std::span<float> row = x.row(r);
    double mean_square = 0.0;
    for (float v : row) mean_square += double{v} * v;
    mean_square /= static_cast<double>(x.cols);
    const double inverse = 1.0 / std::sqrt(mean_square + eps);
    for (std::size_t c = 0; c < row.size(); ++c) row[c] = static_cast<float>(row[c] * inverse) * gain[c];
  }
}

namespace {

// A view of rows [first, first + count) of every row's columns: columns of a [T, width] matrix.
ConstMatrix columns(ConstMatrix m, std::int64_t first, std::int64_t count) {
  return {m.data + first, m.rows, count, m.row_stride};
}
Matrix columns(Matrix m, std::int64_t first, std::int64_t count) {
  return {m.data + first, m.rows, count, m.row_stride};
}

}  // namespace

Tensor mla_attention(ConstMatrix x, std::span<const std::int64_t> positions, const MlaShape& s, const MlaWeights& w,
                     const Rope& rope, double scale, MlaPath path, MlaCache& cache, const Mask* selected) {
  w.validate(s);
  require(x.cols == s.hidden, "mla_attention: input has {} columns (expected hidden {})", x.cols, s.hidden);
  require(rope.head_dim() == s.qk_rope_head_dim, "mla_attention: RoPE of dimension {} (expected {})", rope.head_dim(),
          s.qk_rope_head_dim);
  const std::int64_t T = x.rows, H = s.heads, nope = s.qk_nope_head_dim, rd = s.qk_rope_head_dim, dq = s.qk_head_dim(),
                     dv = s.v_head_dim, r = s.kv_lora_rank;

  // Queries [T, H * (nope + rope)], through the low-rank path when there is one; the rope part rotated.
  Tensor q;
  if (s.q_lora_rank > 0) {
    Tensor q_latent = linear(x, w.q_a_proj.matrix());
    rms_norm_rows(q_latent.matrix(), w.q_a_layernorm.values(), s.rms_norm_eps);
    q = linear(q_latent.matrix(), w.q_b_proj.matrix());
  } else {
    q = linear(x, w.q_proj.matrix());
  }
  for (std::int64_t h = 0; h < H; ++h) {
    Matrix q_pe = columns(q.matrix(), h * dq + nope, rd);
    for (std::int64_t t = 0; t < T; ++t)
      rope.rotate(q_pe.row(t), static_cast<double>(positions[static_cast<std::size_t>(t)]));
  }

  // The latent [T, r] (normalised) and the shared RoPE key [T, rope] (rotated): all that is cached.
  Tensor kv = linear(x, w.kv_a_proj_with_mqa.matrix());  // [T, r + rope]
  Tensor latent = to_tensor(columns(kv.matrix(), 0, r));
  Tensor rope_keys = to_tensor(columns(kv.matrix(), r, rd));
  rms_norm_rows(latent.matrix(), w.kv_a_layernorm.values(), s.rms_norm_eps);
  rope.rotate_rows(rope_keys.matrix(), positions);
  cache.append(latent.matrix(), rope_keys.matrix());

  const std::int64_t t_all = cache.size();
  Mask causal = Mask::causal(T, t_all, t_all - T);
  if (selected != nullptr) {
    require(selected->queries() == T && selected->keys() == t_all,
            "mla_attention: selection mask is [{}, {}] (expected [{}, {}]: queries by cached tokens)",
            selected->queries(), selected->keys(), T, t_all);
    for (std::int64_t i = 0; i < T; ++i)
      for (std::int64_t j = 0; j < t_all; ++j)
        if (!selected->allows(i, j)) causal.set(i, j, false);
  }
  const auto fs = static_cast<float>(scale);
  Tensor context(Shape{T, H * dv});
  if (path == MlaPath::naive) {
    const Tensor kv_up = linear(cache.latent(), w.kv_b_proj.matrix());  // [t, H * (nope + v)]: rebuilt every step
    for (std::int64_t h = 0; h < H; ++h) {
      const ConstMatrix k_nope = columns(kv_up.matrix(), h * (nope + dv), nope);
      const ConstMatrix v = columns(kv_up.matrix(), h * (nope + dv) + nope, dv);
      const ConstMatrix q_nope = columns(q.matrix(), h * dq, nope), q_pe = columns(q.matrix(), h * dq + nope, rd);
      Tensor scores = matmul_transposed(q_nope, k_nope);  // [T, t]
      const Tensor rope_scores = matmul_transposed(q_pe, cache.rope_keys());
      for (std::int64_t i = 0; i < scores.numel(); ++i)
        scores.data()[i] = (scores.data()[i] + rope_scores.data()[i]) * fs;
      softmax_rows(scores.matrix(), &causal);
      const Tensor out = matmul(scores.matrix(), v);  // [T, v]
      for (std::int64_t t = 0; t < T; ++t)
        std::ranges::copy(out.matrix().row(t), context.matrix().row(t).begin() + h * dv);
    }
  } else {
    for (std::int64_t h = 0; h < H; ++h) {
      const ConstMatrix w_uk = w.kv_b_proj.matrix().rows_slice(h * (nope + dv), nope);       // [nope, r]
      const ConstMatrix w_uv = w.kv_b_proj.matrix().rows_slice(h * (nope + dv) + nope, dv);  // [v, r]
      const ConstMatrix q_nope = columns(q.matrix(), h * dq, nope), q_pe = columns(q.matrix(), h * dq + nope, rd);
      const Tensor q_latent = matmul(q_nope, w_uk);                          // [T, r]: W_UK absorbed into the query
      Tensor scores = matmul_transposed(q_latent.matrix(), cache.latent());  // [T, t]: over the latent directly
      const Tensor rope_scores = matmul_transposed(q_pe, cache.rope_keys());
      for (std::int64_t i = 0; i < scores.numel(); ++i)
        scores.data()[i] = (scores.data()[i] + rope_scores.data()[i]) * fs;
      softmax_rows(scores.matrix(), &causal);
      const Tensor latent_context = matmul(scores.matrix(), cache.latent());  // [T, r]
      const Tensor out = matmul_transposed(latent_context.matrix(), w_uv);    // [T, v]: W_UV applied once
      for (std::int64_t t = 0; t < T; ++t)
        std::ranges::copy(out.matrix().row(t), context.matrix().row(t).begin() + h * dv);
    }
  }
  return linear(context.matrix(), w.o_proj.matrix());
}

}  // namespace af
