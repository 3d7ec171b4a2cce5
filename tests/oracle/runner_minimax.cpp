// The `minimax` reference: Hugging Face's MiniMaxLightningAttention ("linear_attention" layers) and
// MiniMaxAttention ("full_attention" layers), recorded from a tiny random-weight MiniMaxModel through its
// MiniMaxCache. The lightning layer: q, k, v = SiLU of one projection laid out per head as [q | k | v]; per-head
// decay slopes from the head count, the layer index and the layer count; the prefill in blocks of block_size,
// decode token by token through the [H, d, d] state; RMSNorm over all heads' outputs (eps 1e-6, the norm class's
// default); a sigmoid output gate from the layer's input. The full layer: GQA with RoPE over the whole head
// dimension (half-split), keys cached after rotation, scale 1/sqrt(head_dim), causal.
#include "af/linear_attention.hpp"
#include "af/rope.hpp"
#include "oracle.hpp"

#include <fmt/format.h>

namespace oracle {

namespace {

// The hooked layer's index, which the case records beside the config (the lightning slopes depend on it).
std::int64_t layer_index(const Case& c) {
  const std::int64_t layer = c.case_fields().integer("layer_idx");  // the hooked layer's index
  const std::int64_t layers = c.config_int("num_hidden_layers");
  if (layer < 0 || layer >= layers)
    throw CaseError(
        fmt::format("{}: layer_idx {} (expected 0 <= layer_idx < num_hidden_layers = {})", c.name, layer, layers));
  if (c.config_fields().given("layer_types")) {
    if (!c.config.at("layer_types").is_array())
      throw CaseError(fmt::format("{} is {} (expected an array)", c.config_fields().label("layer_types"),
                                  c.config.at("layer_types").dump()));
    const auto& types = c.config.at("layer_types");
    if (static_cast<std::int64_t>(types.size()) != layers || types.at(layer) != c.layer_type)
      throw CaseError(fmt::format(
          "{}: config layer_types[{}] is {} (expected \"{}\", the case's layer_type)", c.name, layer,
          types.size() > static_cast<std::size_t>(layer) ? types.at(layer).dump() : "absent", c.layer_type));
  }
  return layer;
}

std::int64_t head_dim_of(const Case& c, std::int64_t hidden, std::int64_t heads) {
  return c.config_fields().integer_or("head_dim", hidden / heads, 1);  // heads >= 1 (read with a minimum of 1)
}

// One way to compute the lightning case: the prefill in `prefill_form`, each decode step in `decode_form`.
Outputs run_lightning_path(const Case& c, af::LinearForm prefill_form, af::LinearForm decode_form, std::string path) {
  const std::int64_t layer = layer_index(c);
  const std::string act = c.config_fields().string_or("hidden_act", "");
  if (act != "silu")
    throw CaseError(
        fmt::format("{}: config hidden_act \"{}\" is not supported (this build knows \"silu\")", c.name, act));
  af::LightningShape shape;
  shape.hidden = c.config_int("hidden_size");
  shape.heads = c.config_fields().integer("num_attention_heads", 1);
  shape.head_dim = head_dim_of(c, shape.hidden, shape.heads);
  shape.block_size = c.config_int("block_size");
  const std::int64_t hd = shape.heads * shape.head_dim, h = shape.hidden;
  af::LightningWeights w;
  w.qkv_proj = c.tensor("qkv_proj.weight", af::Shape{3 * hd, h});
  w.output_gate = c.tensor("output_gate.weight", af::Shape{hd, h});
  w.norm = c.tensor("norm.weight", af::Shape{hd});
  w.out_proj = c.tensor("out_proj.weight", af::Shape{h, hd});
  w.norm_eps = 1e-6;
  const std::vector<double> slopes = af::lightning_slopes(shape.heads, layer, c.config_int("num_hidden_layers"));

  const std::int64_t T = c.prefill_len, N = c.decode_steps;
  const af::Tensor x = c.tensor("input.hidden_states", af::Shape{1, T + N, h}).reshaped(af::Shape{T + N, h});
  af::LinearState state(shape.heads, shape.head_dim, shape.head_dim);
  Outputs out{af::lightning_attention(x.matrix().rows_slice(0, T), shape, w, slopes, state, prefill_form),
              af::Tensor(af::Shape{N, h}), std::move(path)};
  for (std::int64_t i = 0; i < N; ++i) {
    const af::Tensor step =
        af::lightning_attention(x.matrix().rows_slice(T + i, 1), shape, w, slopes, state, decode_form);
    std::ranges::copy(step.values(), out.decode.matrix().row(i).begin());
  }
  return out;
}

Outputs run_full(const Case& c) {
  (void)layer_index(c);
  if (c.config_fields().given("sliding_window"))
    throw CaseError(fmt::format("{}: config sliding_window {} is not supported (expected null)", c.name,
                                c.config.at("sliding_window").dump()));
  const af::GroupedShape shape = read_hf_grouped_shape(c);
  const af::Rope rope = read_hf_rope(c, shape.head_dim, af::RopeLayout::half_split);
  const af::GroupedWeights w = read_grouped_weights(c, shape, false, false);
  const std::int64_t h = shape.hidden, T = c.prefill_len, N = c.decode_steps;
  const af::Tensor x = c.tensor("input.hidden_states", af::Shape{1, T + N, h}).reshaped(af::Shape{T + N, h});
  const std::vector<std::int64_t> positions = c.positions(T + N);
  const af::AttentionOptions options{true, af::default_scale(shape.head_dim)};
  af::GroupedKvCache cache(T + N, shape.kv_heads, shape.head_dim);
  Outputs out{af::rotary_grouped_attention(x.matrix().rows_slice(0, T), std::span(positions).first(T), shape, w, rope,
                                           options, cache),
              af::Tensor(af::Shape{N, h}), "full attention (GQA + RoPE)"};
  for (std::int64_t i = 0; i < N; ++i) {
    const af::Tensor step = af::rotary_grouped_attention(
        x.matrix().rows_slice(T + i, 1), std::span(positions).subspan(T + i, 1), shape, w, rope, options, cache);
    std::ranges::copy(step.values(), out.decode.matrix().row(i).begin());
  }
  return out;
}

}  // namespace

std::vector<Outputs> run_minimax(const Case& c) {
  if (c.layer_type == "linear_attention")
    return {
        run_lightning_path(c, af::LinearForm::blocked, af::LinearForm::recurrent, "blocked prefill, recurrent decode"),
        run_lightning_path(c, af::LinearForm::quadratic, af::LinearForm::blocked, "quadratic prefill, blocked decode")};
  if (c.layer_type == "full_attention") return {run_full(c)};
  throw CaseError(
      fmt::format("{}: layer_type \"{}\" is not supported (expected \"linear_attention\" or "
                  "\"full_attention\")",
                  c.name, c.layer_type));
}

}  // namespace oracle
