#include "af/cache_policy.hpp"

#include "af/error.hpp"
#include "af/quantized_cache.hpp"

#include <fmt/format.h>

#include <cblas.h>
#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

namespace af {

namespace {

bool quantized(KvStorage s) { return s == KvStorage::int8 || s == KvStorage::int4 || s == KvStorage::int2; }
bool has_key_residual(KvStorage s) { return quantized(s); }
int bits_of(KvStorage s) { return s == KvStorage::int4 ? 4 : s == KvStorage::int2 ? 2 : 8; }

std::string_view storage_name(KvStorage s) {
  switch (s) {
    case KvStorage::f32:
      return "f32";
    case KvStorage::bf16:
      return "bf16";
    case KvStorage::int8:
      return "int8";
    case KvStorage::e4m3:
      return "fp8 e4m3";
    case KvStorage::int4:
      return "int4";
    case KvStorage::int2:
      return "int2";
  }
  return "?";
}

// [asymmetric]
// Asymmetric b-bit rounding of `count` values read with `stride`, written back in place: the minimum and the
// step (max - min) / (2^b - 1) are the group's two float32 parameters.
void round_asymmetric(float* x, std::int64_t count, std::int64_t stride, int bits) {
  float lo = std::numeric_limits<float>::infinity(), hi = -lo;
  for (std::int64_t i = 0; i < count; ++i) lo = std::min(lo, x[i * stride]), hi = std::max(hi, x[i * stride]);
  const float levels = static_cast<float>((1 << bits) - 1);
  const float step = (hi - lo) / levels;
  for (std::int64_t i = 0; i < count; ++i) {
    float& v = x[i * stride];
    v = step > 0.0f ? lo + std::clamp(std::nearbyint((v - lo) / step), 0.0f, levels) * step : lo;
  }
}
// [/asymmetric]

// A head's cached rows [n, d] as the reader gets them back in `format` (kv_heads = 1).
Tensor through_format(ConstMatrix rows, KvFormat format, std::int64_t block) {
  if (rows.rows == 0) return Tensor(Shape{0, rows.cols});
  return dequantize_rows(quantize_rows(rows, 1, format, block));
}

// The stored keys and values of one KV head: `keys` as read once a token's block is complete (every token for
// formats without a residual), `key_residual` the bf16 keys the newest incomplete block is read as.
struct StoredHead {
  Tensor keys, key_residual, values;
};

StoredHead store_head(const CachePolicy& p, ConstMatrix keys, ConstMatrix values) {
  const std::int64_t n = keys.rows, d = keys.cols;
  StoredHead s;
  switch (p.storage) {
    case KvStorage::f32:
      s.keys = to_tensor(keys), s.values = to_tensor(values);
      break;
    case KvStorage::bf16:
      s.keys = through_format(keys, KvFormat::bf16, 1), s.values = through_format(values, KvFormat::bf16, 1);
      break;
    case KvStorage::e4m3:
      s.keys = through_format(keys, KvFormat::fp8_token, 1), s.values = through_format(values, KvFormat::fp8_token, 1);
      break;
    case KvStorage::int8:
    case KvStorage::int4:
    case KvStorage::int2: {
      const std::int64_t complete = n / p.block * p.block;
      s.key_residual = through_format(keys, KvFormat::bf16, 1);
      s.keys = Tensor(Shape{n, d});
      if (p.storage == KvStorage::int8) {
        const Tensor blocks = through_format(keys.rows_slice(0, complete), KvFormat::int8_channel, p.block);
        std::copy(blocks.data(), blocks.data() + blocks.numel(), s.keys.data());
        s.values = through_format(values, KvFormat::int8_token, 1);
      } else {
        const Tensor copy = to_tensor(keys);
        std::copy(copy.data(), copy.data() + complete * d, s.keys.data());
        for (std::int64_t b = 0; b < complete; b += p.block)
          for (std::int64_t c = 0; c < d; ++c)
            round_asymmetric(s.keys.data() + b * d + c, p.block, d, bits_of(p.storage));
        s.values = to_tensor(values);
        for (std::int64_t t = 0; t < n; ++t)
          for (std::int64_t c = 0; c < d; c += p.value_group)
            round_asymmetric(s.values.data() + t * d + c, p.value_group, 1, bits_of(p.storage));
      }
      // The incomplete block: read as bf16 until it fills (the rows past `complete` are never read as codes).
      std::copy(s.key_residual.data() + complete * d, s.key_residual.data() + n * d, s.keys.data() + complete * d);
      break;
    }
  }
  return s;
}

// Bytes one KV head holds for `tokens` tokens under a storage without selection (all of them read too).
double storage_bytes(const CachePolicy& p, std::int64_t tokens, std::int64_t d) {
  const auto n = static_cast<double>(tokens), dd = static_cast<double>(d);
  switch (p.storage) {
    case KvStorage::f32:
      return n * dd * 4 * 2;
    case KvStorage::bf16:
      return n * dd * 2 * 2;
    case KvStorage::e4m3:
      return 2 * n * (dd + 4);  // codes and one float32 scale per token, K and V
    case KvStorage::int8:
    case KvStorage::int4:
    case KvStorage::int2: {
      const std::int64_t blocks = tokens / p.block;
      const auto complete = static_cast<double>(blocks * p.block);
      const double code = bits_of(p.storage) / 8.0;
      const double scale_bytes = p.storage == KvStorage::int8 ? 4.0 : 8.0;  // scale, or minimum and step
      const double keys =
          complete * dd * code + static_cast<double>(blocks) * dd * scale_bytes + (n - complete) * dd * 2;
      const double value_groups = p.storage == KvStorage::int8 ? 1.0 : dd / static_cast<double>(p.value_group);
      const double values = n * (dd * code + value_groups * scale_bytes);
      return keys + values;
    }
  }
  return 0;
}

}  // namespace

std::string CachePolicy::method() const {
  switch (selection) {
    case KvSelection::all:
      return std::string(storage_name(storage));
    case KvSelection::window:
      return "window";
    case KvSelection::sinks:
      return fmt::format("sinks {}{}", sinks, sink_positions == SinkPositions::in_cache ? " (cache positions)" : "");
    case KvSelection::top_k:
      return "top-k";
    case KvSelection::pages:
      return fmt::format("Quest pages of {}", page);
    case KvSelection::heavy_hitters:
      return "H2O";
  }
  return "?";
}

std::string CachePolicy::label() const {
  switch (selection) {
    case KvSelection::all:
      return quantized(storage) ? fmt::format("{} (block {})", storage_name(storage), block)
                                : std::string(storage_name(storage));
    case KvSelection::window:
      return fmt::format("window W={}", window);
    case KvSelection::sinks:
      return fmt::format("{} + W={}", method(), window);
    case KvSelection::top_k:
      return fmt::format("top-k k={}", top_k);
    case KvSelection::pages:
      return fmt::format("{}, {} pages", method(), pages);
    case KvSelection::heavy_hitters:
      return fmt::format("H2O budget {}", budget);
  }
  return "?";
}

void CachePolicy::validate(std::int64_t head_dim) const {
  const auto name = label();
  if (selection != KvSelection::all)
    require(storage == KvStorage::bf16 || storage == KvStorage::f32,
            "cache policy {}: a selection over {} storage (expected bf16 or f32)", name, storage_name(storage));
  switch (selection) {
    case KvSelection::all:
      break;
    case KvSelection::window:
      require(window >= 1, "cache policy: window {} (expected >= 1)", window);
      break;
    case KvSelection::sinks:
      require(window >= 1 && sinks >= 1, "cache policy: {} sinks and window {} (expected both >= 1)", sinks, window);
      break;
    case KvSelection::top_k:
      require(top_k >= 1, "cache policy: top-k {} (expected >= 1)", top_k);
      break;
    case KvSelection::pages:
      require(page >= 1 && pages >= 1, "cache policy: pages of {} tokens, {} pages (expected both >= 1)", page, pages);
      break;
    case KvSelection::heavy_hitters:
      require(budget >= 2, "cache policy: H2O budget {} (expected >= 2: recent tokens and heavy hitters)", budget);
      break;
  }
  if (quantized(storage)) {
    require(block >= 1, "cache policy {}: key block {} (expected >= 1)", name, block);
    if (storage != KvStorage::int8)
      require(value_group >= 1 && head_dim % value_group == 0,
              "cache policy {}: value group {} (expected a divisor of the head dimension {})", name, value_group,
              head_dim);
  }
}

PolicyAttention::PolicyAttention(CachePolicy policy, std::int64_t layers, const GroupedShape& shape, const Rope& rope)
    : policy_(policy), layers_(layers), shape_(shape), rope_(&rope) {
  shape_.validate();
  require(layers >= 1, "PolicyAttention: {} layers (expected >= 1)", layers);
  require(rope.head_dim() == shape.head_dim, "PolicyAttention: RoPE of dimension {} for heads of {}", rope.head_dim(),
          shape.head_dim);
  policy_.validate(shape.head_dim);
  reset();
}

void PolicyAttention::reset() {
  heavy_.assign(static_cast<std::size_t>(layers_ * shape_.kv_heads), HeavyHitters{});
  next_position_.assign(static_cast<std::size_t>(layers_), 0);
  traffic_.clear();
}

Tensor PolicyAttention::attend(std::int64_t layer, ConstMatrix q, const GroupedKvCache& cache) {
  const CachePolicy& p = policy_;
  const std::int64_t d = shape_.head_dim, H = shape_.heads, G = shape_.kv_heads, group = shape_.group_size();
  const std::int64_t n = cache.size(), T = q.rows, first = n - T;
  require(layer >= 0 && layer < layers_, "PolicyAttention::attend: layer {} (expected 0..{})", layer, layers_ - 1);
  if (!(q.cols == H * d))
    fail("PolicyAttention::attend: queries are {} (expected [T, {}]: {} heads x {})", q.shape_str(), H * d, H, d);
  require(cache.kv_heads() == G && cache.head_dim() == d,
          "PolicyAttention::attend: the cache holds {} KV heads of dimension {} (expected {} of {})", cache.kv_heads(),
          cache.head_dim(), G, d);
  require(T >= 1 && first >= 0, "PolicyAttention::attend: {} queries over {} cached tokens", T, n);
  const auto l = static_cast<std::size_t>(layer);
  require(first == next_position_[l],
          "PolicyAttention::attend: layer {} continues at position {} (expected {}: reset() for a new sequence)", layer,
          first, next_position_[l]);
  next_position_[l] = n;
  if (static_cast<std::int64_t>(traffic_.size()) < n) traffic_.resize(static_cast<std::size_t>(n));

  const auto scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(d)));
  const double element = p.storage == KvStorage::f32 ? 4.0 : 2.0;
  const double token_bytes = 2.0 * static_cast<double>(d) * element;  // one token's K and V, one KV head
  Tensor out(Shape{T, H * d});
  constexpr std::int64_t chunk = 256;  // query rows per pass: bounds the score matrices at chunk x n
  for (std::int64_t g = 0; g < G; ++g) {
    const StoredHead stored = store_head(p, cache.keys(g), cache.values(g));
    // Quest's page bounds: the element-wise minimum and maximum of the stored keys of every complete page.
    const std::int64_t complete_pages = p.selection == KvSelection::pages ? n / p.page : 0;
    std::vector<float> page_min(static_cast<std::size_t>(complete_pages * d)), page_max(page_min.size());
    for (std::int64_t c = 0; c < complete_pages; ++c)
      for (std::int64_t i = 0; i < d; ++i) {
        float lo = std::numeric_limits<float>::infinity(), hi = -lo;
        for (std::int64_t t = c * p.page; t < (c + 1) * p.page; ++t)
          lo = std::min(lo, stored.keys.data()[t * d + i]), hi = std::max(hi, stored.keys.data()[t * d + i]);
        page_min[static_cast<std::size_t>(c * d + i)] = lo, page_max[static_cast<std::size_t>(c * d + i)] = hi;
      }
    HeavyHitters& heavy = heavy_[l * static_cast<std::size_t>(G) + static_cast<std::size_t>(g)];

    for (std::int64_t i0 = 0; i0 < T; i0 += chunk) {
      const std::int64_t rows = std::min(chunk, T - i0), keys = first + i0 + rows;  // keys the chunk can see
      // Scores of every head of the group against the stored keys (and the bf16 residual), scaled.
      Tensor scores(Shape{group, rows, keys}), residual_scores, weights(Shape{group, rows, keys});
      if (has_key_residual(p.storage)) residual_scores = Tensor(Shape{group, rows, keys});
      for (std::int64_t j = 0; j < group; ++j) {
        const float* qh = q.data + i0 * q.row_stride + (g * group + j) * d;
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(rows), static_cast<int>(keys),
                    static_cast<int>(d), scale, qh, static_cast<int>(q.row_stride), stored.keys.data(),
                    static_cast<int>(d), 0.0f, scores.data() + j * rows * keys, static_cast<int>(keys));
        if (has_key_residual(p.storage))
          cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(rows), static_cast<int>(keys),
                      static_cast<int>(d), scale, qh, static_cast<int>(q.row_stride), stored.key_residual.data(),
                      static_cast<int>(d), 0.0f, residual_scores.data() + j * rows * keys, static_cast<int>(keys));
      }
      // Row r of head j at position `pos`: its chosen tokens get softmax weights, the rest 0.
      const auto score_of = [&](std::int64_t j, std::int64_t r, std::int64_t pos, std::int64_t t) {
        const std::int64_t at = (j * rows + r) * keys + t;
        if (has_key_residual(p.storage) && (t / p.block + 1) * p.block > pos + 1) return residual_scores.data()[at];
        return scores.data()[at];
      };
      const auto put_softmax = [&](std::int64_t j, std::int64_t r, std::span<const std::int64_t> chosen,
                                   std::span<const float> s) {
        float top = -std::numeric_limits<float>::infinity();
        for (const float v : s) top = std::max(top, v);
        double sum = 0.0;
        float* w = weights.data() + (j * rows + r) * keys;
        for (std::size_t c = 0; c < chosen.size(); ++c) {
          const float e = std::exp(s[c] - top);
          w[chosen[c]] = e, sum += e;
        }
        for (const std::int64_t t : chosen) w[t] = static_cast<float>(w[t] / sum);
      };
      const auto step = [&](std::int64_t r, std::vector<std::int64_t>& chosen, std::vector<float>& s,
                            std::vector<char>& read_mark, StepTraffic& count) {
        const std::int64_t pos = first + i0 + r, held = pos + 1;
        std::int64_t read_tokens = 0;
        const auto mark = [&](std::int64_t t) {
          if (!read_mark[static_cast<std::size_t>(t)]) read_mark[static_cast<std::size_t>(t)] = 1, ++read_tokens;
        };
        std::fill(read_mark.begin(), read_mark.begin() + held, 0);
        double held_bytes = 0, selection = 0;
        for (std::int64_t j = 0; j < group; ++j) {
          chosen.clear();
          // [selection]
          switch (p.selection) {
            case KvSelection::all:
              for (std::int64_t t = 0; t < held; ++t) chosen.push_back(t);
              break;
            case KvSelection::window:
              for (std::int64_t t = std::max<std::int64_t>(0, held - p.window); t < held; ++t) chosen.push_back(t);
              break;
            case KvSelection::sinks: {
              const std::int64_t window_first = std::max<std::int64_t>(0, held - p.window);
              for (std::int64_t t = 0; t < std::min(p.sinks, window_first); ++t) chosen.push_back(t);
              for (std::int64_t t = window_first; t < held; ++t) chosen.push_back(t);
              break;
            }
            case KvSelection::top_k: {
              for (std::int64_t t = 0; t < held; ++t) chosen.push_back(t);
              if (held > p.top_k) {
                const float* row = scores.data() + (j * rows + r) * keys;
                std::nth_element(
                    chosen.begin(), chosen.begin() + p.top_k - 1, chosen.end(),
                    [&](std::int64_t a, std::int64_t b) { return row[a] > row[b] || (row[a] == row[b] && a > b); });
                chosen.resize(static_cast<std::size_t>(p.top_k));
                std::sort(chosen.begin(), chosen.end());
              }
              break;
            }
            case KvSelection::pages: {
              const std::int64_t current = pos / p.page;  // pages before it are complete
              std::vector<std::int64_t> pages(static_cast<std::size_t>(current));
              std::iota(pages.begin(), pages.end(), 0);
              if (current > p.pages - 1) {
                const float* qh = q.data + (i0 + r) * q.row_stride + (g * group + j) * d;
                std::vector<float> bound(static_cast<std::size_t>(current));
                for (std::int64_t c = 0; c < current; ++c) {
                  float b = 0;
                  for (std::int64_t i = 0; i < d; ++i) {
                    const auto at = static_cast<std::size_t>(c * d + i);
                    b += std::max(qh[i] * page_min[at], qh[i] * page_max[at]);
                  }
                  bound[static_cast<std::size_t>(c)] = b;
                }
                std::nth_element(
                    pages.begin(), pages.begin() + (p.pages - 1), pages.end(), [&](std::int64_t a, std::int64_t b) {
                      const float ba = bound[static_cast<std::size_t>(a)], bb = bound[static_cast<std::size_t>(b)];
                      return ba > bb || (ba == bb && a > b);
                    });
                pages.resize(static_cast<std::size_t>(p.pages - 1));
                std::sort(pages.begin(), pages.end());
              }
              for (const std::int64_t c : pages)
                for (std::int64_t t = c * p.page; t < (c + 1) * p.page; ++t) chosen.push_back(t);
              for (std::int64_t t = current * p.page; t < held; ++t) chosen.push_back(t);
              break;
            }
            case KvSelection::heavy_hitters:
              chosen = heavy.tokens;
              break;
          }
          // [/selection]
          s.resize(chosen.size());
          for (std::size_t c = 0; c < chosen.size(); ++c) {
            const std::int64_t t = chosen[c];
            s[c] = score_of(j, r, pos, t);
          }
          // [sink-slots]
          if (p.selection == KvSelection::sinks && p.sink_positions == SinkPositions::in_cache) {
            // Sinks at their cache slots: the window's first token sits at slot `sinks`, so a sink at slot s is
            // `delta` positions later than where it was cached. Rotations compose: rotate its key by delta.
            const std::int64_t delta = held - p.window - p.sinks;
            if (delta > 0) {
              const float* qh = q.data + (i0 + r) * q.row_stride + (g * group + j) * d;
              std::vector<float> key(static_cast<std::size_t>(d));
              for (std::size_t c = 0; c < chosen.size() && chosen[c] < p.sinks; ++c) {
                std::copy(stored.keys.data() + chosen[c] * d, stored.keys.data() + (chosen[c] + 1) * d, key.begin());
                rope_->rotate(key, static_cast<double>(delta));
                float dot = 0;
                for (std::int64_t i = 0; i < d; ++i) dot += qh[i] * key[static_cast<std::size_t>(i)];
                s[c] = dot * scale;
              }
            }
          }
          // [/sink-slots]
          put_softmax(j, r, chosen, s);
          for (const std::int64_t t : chosen) mark(t);
        }
        // Bytes held and read by this KV head at this step.
        switch (p.selection) {
          case KvSelection::all:
            held_bytes = storage_bytes(p, held, d);
            break;
          case KvSelection::window:
          case KvSelection::sinks:
            held_bytes = static_cast<double>(read_tokens) * token_bytes;
            break;
          case KvSelection::top_k:
            held_bytes = static_cast<double>(held) * token_bytes;
            selection = static_cast<double>(held) * static_cast<double>(d) * element;  // every key scored
            break;
          case KvSelection::pages: {
            const auto bounds = static_cast<double>(held / p.page) * 2.0 * static_cast<double>(d) * element;
            held_bytes = static_cast<double>(held) * token_bytes + bounds;
            selection = static_cast<double>(pos / p.page) * 2.0 * static_cast<double>(d) * element;
            break;
          }
          case KvSelection::heavy_hitters:
            held_bytes = static_cast<double>(heavy.tokens.size()) * (token_bytes + 4.0);  // + a float32 score
            break;
        }
        count.bytes_held += held_bytes;
        count.bytes_read +=
            p.selection == KvSelection::all ? held_bytes : static_cast<double>(read_tokens) * token_bytes;
        count.selection_bytes += selection;
      };

      if (p.selection == KvSelection::heavy_hitters) {
        // [h2o]
        // H2O is sequential: each step's eviction depends on the attention of every step before it.
        std::vector<std::int64_t> chosen;
        std::vector<float> s;
        std::vector<char> read_mark(static_cast<std::size_t>(keys));
        const std::int64_t recent = std::max<std::int64_t>(1, p.budget / 2);
        for (std::int64_t r = 0; r < rows; ++r) {
          const std::int64_t pos = first + i0 + r;
          heavy.tokens.push_back(pos), heavy.score.push_back(0.0);
          if (static_cast<std::int64_t>(heavy.tokens.size()) > p.budget) {
            // Evict the held token outside the recent window with the least accumulated attention.
            std::size_t victim = heavy.tokens.size();
            for (std::size_t c = 0; c < heavy.tokens.size(); ++c)
              if (heavy.tokens[c] <= pos - recent &&
                  (victim == heavy.tokens.size() || heavy.score[c] < heavy.score[victim]))
                victim = c;
            heavy.tokens.erase(heavy.tokens.begin() + static_cast<std::ptrdiff_t>(victim));
            heavy.score.erase(heavy.score.begin() + static_cast<std::ptrdiff_t>(victim));
          }
          step(r, chosen, s, read_mark, traffic_[static_cast<std::size_t>(pos)]);
          for (std::int64_t j = 0; j < group; ++j)
            for (std::size_t c = 0; c < heavy.tokens.size(); ++c)
              heavy.score[c] += weights.data()[(j * rows + r) * keys + heavy.tokens[c]];
        }
        // [/h2o]
      } else {
        // Independent rows: their traffic is summed per position after the parallel loop.
        std::vector<StepTraffic> counts(static_cast<std::size_t>(rows));
#pragma omp parallel
        {
          std::vector<std::int64_t> chosen;
          std::vector<float> s;
          std::vector<char> read_mark(static_cast<std::size_t>(keys));
#pragma omp for schedule(dynamic, 8)
          for (std::int64_t r = 0; r < rows; ++r) step(r, chosen, s, read_mark, counts[static_cast<std::size_t>(r)]);
        }
        for (std::int64_t r = 0; r < rows; ++r) {
          StepTraffic& total = traffic_[static_cast<std::size_t>(first + i0 + r)];
          total.bytes_held += counts[static_cast<std::size_t>(r)].bytes_held;
          total.bytes_read += counts[static_cast<std::size_t>(r)].bytes_read;
          total.selection_bytes += counts[static_cast<std::size_t>(r)].selection_bytes;
        }
      }
      // Outputs: the weights times the stored values, head by head.
      for (std::int64_t j = 0; j < group; ++j)
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, static_cast<int>(rows), static_cast<int>(d),
                    static_cast<int>(keys), 1.0f, weights.data() + j * rows * keys, static_cast<int>(keys),
                    stored.values.data(), static_cast<int>(d), 0.0f, out.data() + i0 * H * d + (g * group + j) * d,
                    static_cast<int>(H * d));
    }
  }
  return out;
}

}  // namespace af
