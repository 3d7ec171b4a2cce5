// The `sdpa` reference: q/k/v projections, torch's scaled_dot_product_attention (with enable_gqa when there
// are fewer KV heads than query heads), and the output projection; prefill, then single-token decode.
#include "af/attention.hpp"
#include "af/linalg.hpp"
#include "oracle.hpp"

#include <fmt/format.h>

#include <vector>

namespace oracle {

namespace {

struct SdpaLayer {
  std::int64_t hidden, heads, kv_heads, head_dim;
  af::AttentionOptions options;
  af::Tensor wq, wk, wv, wo, bq, bk, bv;
};

// Several heads, each query head reading the cache of KV head h / (H / G), built from the library's
// single-head attention. (Chapters 02-04 generalise the library itself.)
af::Tensor grouped_step(const SdpaLayer& layer, af::ConstMatrix x, std::vector<af::KvCache>& caches) {
  const std::int64_t tokens = x.rows, d = layer.head_dim;
  const af::Tensor q = af::linear(x, layer.wq.matrix(), layer.bq.values()).reshaped(af::Shape{tokens, layer.heads, d});
  const af::Tensor k = af::linear(x, layer.wk.matrix(), layer.bk.values()).reshaped(af::Shape{tokens, layer.kv_heads, d});
  const af::Tensor v = af::linear(x, layer.wv.matrix(), layer.bv.values()).reshaped(af::Shape{tokens, layer.kv_heads, d});
  for (std::int64_t g = 0; g < layer.kv_heads; ++g)
    caches[static_cast<std::size_t>(g)].append(af::head_view(k, g), af::head_view(v, g));
  af::Tensor context(af::Shape{tokens, layer.heads, d});
  const std::int64_t group = layer.heads / layer.kv_heads;
  for (std::int64_t h = 0; h < layer.heads; ++h) {
    const af::KvCache& cache = caches[static_cast<std::size_t>(h / group)];
    const af::Tensor out = af::attention(af::head_view(q, h), cache.keys(), cache.values(), layer.options);
    af::Matrix dst = af::head_view(context, h);
    for (std::int64_t t = 0; t < tokens; ++t) std::ranges::copy(out.matrix().row(t), dst.row(t).begin());
  }
  return af::linear(context.reshaped(af::Shape{tokens, layer.heads * d}).matrix(), layer.wo.matrix());
}

}  // namespace

Outputs run_sdpa(const Case& c) {
  SdpaLayer layer;
  layer.hidden = c.config_int("hidden_size");
  layer.heads = c.config_int("num_attention_heads");
  layer.kv_heads = c.config_int("num_key_value_heads");
  layer.head_dim = c.config_int("head_dim");
  if (layer.hidden < 1 || layer.heads < 1 || layer.kv_heads < 1 || layer.head_dim < 1 || layer.heads % layer.kv_heads)
    throw CaseError(fmt::format("{}: hidden_size {}, {} heads, {} KV heads, head_dim {} (expected positive sizes and "
                                "a head count divisible by the KV head count)",
                                c.name, layer.hidden, layer.heads, layer.kv_heads, layer.head_dim));
  layer.options = {c.config_bool("is_causal"), c.config_double("scale")};
  const bool bias = c.config.value("attention_bias", false);
  const std::int64_t h = layer.hidden, qd = layer.heads * layer.head_dim, kvd = layer.kv_heads * layer.head_dim;
  layer.wq = c.tensor("q_proj.weight", af::Shape{qd, h});
  layer.wk = c.tensor("k_proj.weight", af::Shape{kvd, h});
  layer.wv = c.tensor("v_proj.weight", af::Shape{kvd, h});
  layer.wo = c.tensor("o_proj.weight", af::Shape{h, qd});
  if (bias) {
    layer.bq = c.tensor("q_proj.bias", af::Shape{qd});
    layer.bk = c.tensor("k_proj.bias", af::Shape{kvd});
    layer.bv = c.tensor("v_proj.bias", af::Shape{kvd});
  }

  const std::int64_t T = c.prefill_len, N = c.decode_steps;
  const af::Tensor x = c.tensor("input.hidden_states", af::Shape{1, T + N, h}).reshaped(af::Shape{T + N, h});
  Outputs out{af::Tensor(af::Shape{T, h}), af::Tensor(af::Shape{N, h})};

  if (layer.heads == 1) {  // chapter 01's layer, exactly as the library has it
    af::SingleHeadWeights w{layer.wq, layer.wk, layer.wv, layer.wo, layer.bq, layer.bk, layer.bv};
    af::KvCache cache(T + N, layer.head_dim, layer.head_dim);
    out.prefill = af::single_head_attention(x.matrix().rows_slice(0, T), w, layer.options, cache);
    for (std::int64_t i = 0; i < N; ++i) {
      const af::Tensor step = af::single_head_attention(x.matrix().rows_slice(T + i, 1), w, layer.options, cache);
      std::ranges::copy(step.values(), out.decode.matrix().row(i).begin());
    }
    return out;
  }
  std::vector<af::KvCache> caches(static_cast<std::size_t>(layer.kv_heads), af::KvCache(T + N, layer.head_dim, layer.head_dim));
  out.prefill = grouped_step(layer, x.matrix().rows_slice(0, T), caches);
  for (std::int64_t i = 0; i < N; ++i) {
    const af::Tensor step = grouped_step(layer, x.matrix().rows_slice(T + i, 1), caches);
    std::ranges::copy(step.values(), out.decode.matrix().row(i).begin());
  }
  return out;
}

}  // namespace oracle
