// The `kimi_linear` reference: Hugging Face's KimiLinearDeltaAttention (Kimi Linear's KDA layers), recorded
// from a tiny random-weight KimiLinearModel through its DynamicCache. The layer: q, k, v projections; a causal
// depthwise convolution with SiLU over [q | k | v] (its last inputs cached); unit q and k, q times d^-0.5; a
// log-decay per key channel, -exp(A_log[h]) softplus(f_b(f_a x) + dt_bias); beta = sigmoid(b_proj x); the gated
// delta rule (chunked prefill, recurrent decode); RMSNorm per head times sigmoid(g_b(g_a x)); o_proj. Computed
// twice: chunks of 64 and chunks of 7, each time comparing the cache after the prefill and after the last call
// with the reference's where the case records it (delta_cache_comparisons).
#include "af/gated_deltanet.hpp"
#include "oracle.hpp"

#include <fmt/format.h>

namespace oracle {

namespace {

Outputs run_path(const Case& c, std::int64_t chunk) {
  const Fields config = c.config_fields();
  const std::int64_t layer = c.case_fields().integer("layer_idx");
  if (layer >= c.config_int("num_hidden_layers"))
    throw CaseError(fmt::format("{}: layer_idx {} (expected < num_hidden_layers = {})", c.name, layer,
                                c.config_int("num_hidden_layers")));
  const std::string act = config.string_or("hidden_act", "");
  if (act != "silu")
    throw CaseError(
        fmt::format("{}: config hidden_act \"{}\" is not supported (this build knows \"silu\")", c.name, act));
  af::KimiDeltaShape s;
  s.hidden = config.integer("hidden_size", 1);
  s.heads = config.integer("linear_num_heads", 1);
  s.head_dim = config.integer("linear_head_dim", 1);
  s.conv_kernel = config.integer("linear_conv_kernel_dim", 1);
  s.norm_eps = config.number("rms_norm_eps");
  if (!(s.norm_eps > 0)) throw CaseError(fmt::format("{}: config rms_norm_eps {} (expected > 0)", c.name, s.norm_eps));
  const std::int64_t hd = s.heads * s.head_dim, h = s.hidden, d = s.head_dim;
  af::KimiDeltaWeights w;
  w.q_proj = c.tensor("q_proj.weight", af::Shape{hd, h});
  w.k_proj = c.tensor("k_proj.weight", af::Shape{hd, h});
  w.v_proj = c.tensor("v_proj.weight", af::Shape{hd, h});
  w.conv = c.tensor("conv1d.weight", af::Shape{3 * hd, 1, s.conv_kernel}).reshaped(af::Shape{3 * hd, s.conv_kernel});
  w.f_a = c.tensor("forget_gate.f_a_proj.weight", af::Shape{d, h});
  w.f_b = c.tensor("forget_gate.f_b_proj.weight", af::Shape{hd, d});
  w.dt_bias = c.tensor("forget_gate.dt_bias", af::Shape{hd});
  w.a_log = c.tensor("forget_gate.A_log", af::Shape{1, 1, s.heads, 1}).reshaped(af::Shape{s.heads});
  w.b_proj = c.tensor("b_proj.weight", af::Shape{s.heads, h});
  w.g_a = c.tensor("g_a_proj.weight", af::Shape{d, h});
  w.g_b = c.tensor("g_b_proj.weight", af::Shape{hd, d});
  w.o_norm = c.tensor("o_norm.weight", af::Shape{d});
  w.o_proj = c.tensor("o_proj.weight", af::Shape{h, hd});
  const std::int64_t T = c.prefill_len, N = c.decode_steps;
  const af::Tensor x = c.tensor("input.hidden_states", af::Shape{1, T + N, h}).reshaped(af::Shape{T + N, h});
  af::KimiDeltaCache cache(s);
  Outputs out{af::kimi_delta_attention(x.matrix().rows_slice(0, T), s, w, cache, chunk), af::Tensor(af::Shape{N, h}),
              fmt::format("chunked prefill (chunks of {}), recurrent decode", chunk)};
  // The cache after the prefill and after the last call, beside what the reference's cache held then.
  out.states = delta_cache_comparisons(c, "prefill", cache.conv_inputs, s.conv_kernel, cache.state);
  for (std::int64_t i = 0; i < N; ++i) {
    const af::Tensor step = af::kimi_delta_attention(x.matrix().rows_slice(T + i, 1), s, w, cache, chunk);
    std::ranges::copy(step.values(), out.decode.matrix().row(i).begin());
  }
  for (StateComparison& compared : delta_cache_comparisons(c, "final", cache.conv_inputs, s.conv_kernel, cache.state))
    out.states.push_back(std::move(compared));
  return out;
}

}  // namespace

std::vector<Outputs> run_kimi_linear(const Case& c) {
  if (c.layer_type != "linear_attention")
    throw CaseError(
        fmt::format("{}: layer_type \"{}\" is not supported (expected \"linear_attention\")", c.name, c.layer_type));
  return {run_path(c, 64), run_path(c, 7)};
}

}  // namespace oracle
