#include "af/llama.hpp"

#include "af/error.hpp"
#include "af/mla.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <utility>

namespace af::llama {

namespace {

std::int64_t metadata_count(const gguf::File& file, std::string_view key) {
  const std::uint64_t value = file.unsigned_integer(key);
  if (value < 1 || value > (std::uint64_t{1} << 24))
    fail("{}: {} is {} (expected a count in 1..2^24)", file.source(), key, value);
  return static_cast<std::int64_t>(value);
}

Config read_config(const gguf::File& file) {
  const std::string_view architecture = file.string("general.architecture");
  if (architecture != "llama") fail("{}: general.architecture is '{}' (expected 'llama')", file.source(), architecture);
  Config c;
  c.layers = metadata_count(file, "llama.block_count");
  c.hidden = metadata_count(file, "llama.embedding_length");
  c.heads = metadata_count(file, "llama.attention.head_count");
  c.kv_heads =
      file.find("llama.attention.head_count_kv") ? metadata_count(file, "llama.attention.head_count_kv") : c.heads;
  c.ffn = metadata_count(file, "llama.feed_forward_length");
  c.context = metadata_count(file, "llama.context_length");
  if (c.hidden % c.heads != 0 || c.heads % c.kv_heads != 0)
    fail("{}: {} heads, {} KV heads, hidden {} (expected heads dividing hidden and KV heads dividing heads)",
         file.source(), c.heads, c.kv_heads, c.hidden);
  c.head_dim =
      file.find("llama.attention.key_length") ? metadata_count(file, "llama.attention.key_length") : c.hidden / c.heads;
  if (c.head_dim % 2 != 0) fail("{}: head dimension {} (expected an even number for RoPE)", file.source(), c.head_dim);
  if (file.find("llama.rope.freq_base")) c.rope_base = file.number("llama.rope.freq_base");
  if (file.find("llama.attention.layer_norm_rms_epsilon"))
    c.rms_eps = file.number("llama.attention.layer_norm_rms_epsilon");
  if (!(c.rope_base > 1.0 && std::isfinite(c.rope_base)))
    fail("{}: llama.rope.freq_base is {} (expected a finite number > 1)", file.source(), c.rope_base);
  if (!(c.rms_eps > 0.0 && c.rms_eps < 1.0))
    fail("{}: the RMSNorm epsilon is {} (expected a number in (0, 1))", file.source(), c.rms_eps);
  const gguf::TensorInfo& embedding = file.tensor("token_embd.weight");
  if (embedding.dims.size() != 2 || embedding.dims[0] != static_cast<std::uint64_t>(c.hidden))
    fail("{}: token_embd.weight is not [vocab, {}]", file.source(), c.hidden);
  c.vocab = static_cast<std::int64_t>(embedding.dims[1]);
  c.tied_output = file.find_tensor("output.weight") == nullptr;
  return c;
}

// A matrix of the file with the expected [rows, cols], or an error naming it.
gguf::QuantMatrix matrix(const gguf::File& file, const std::string& name, std::int64_t rows, std::int64_t cols) {
  gguf::QuantMatrix m(file, file.tensor(name));
  if (m.rows() != rows || m.cols() != cols)
    fail("{}: {} is [{}, {}] (expected [{}, {}])", file.source(), name, m.rows(), m.cols(), rows, cols);
  return m;
}

std::vector<float> vector(const gguf::File& file, const std::string& name, std::int64_t size) {
  const gguf::TensorInfo& tensor = file.tensor(name);
  if (tensor.elements != static_cast<std::uint64_t>(size))
    fail("{}: {} has {} elements (expected {})", file.source(), name, tensor.elements, size);
  return file.dequantize(tensor);
}

}  // namespace

Cache::Cache(const Config& config, std::int64_t capacity) : bytes_per_token_(config.cache_bytes_per_token()) {
  require(capacity >= 1 && capacity <= config.context, "cache capacity {} (expected 1..{}, the model's context)",
          capacity, config.context);
  layers_.reserve(static_cast<std::size_t>(config.layers));
  for (std::int64_t l = 0; l < config.layers; ++l) layers_.emplace_back(capacity, config.kv_heads, config.head_dim);
}

std::int64_t Cache::bytes_held() const { return size() * bytes_per_token_; }

Model Model::load(const std::filesystem::path& path) { return Model(gguf::File::open(path)); }

Model::Model(gguf::File file)
    : file_(std::move(file)),
      config_(read_config(file_)),
      rope_(config_.head_dim, config_.rope_base, RopeLayout::adjacent) {
  const Config& c = config_;
  for (std::int64_t l = 0; l < c.layers; ++l) {
    const std::string p = "blk." + std::to_string(l) + ".";
    Layer layer;
    layer.attention_norm = vector(file_, p + "attn_norm.weight", c.hidden);
    layer.mlp_norm = vector(file_, p + "ffn_norm.weight", c.hidden);
    layer.q = matrix(file_, p + "attn_q.weight", c.heads * c.head_dim, c.hidden);
    layer.k = matrix(file_, p + "attn_k.weight", c.kv_heads * c.head_dim, c.hidden);
    layer.v = matrix(file_, p + "attn_v.weight", c.kv_heads * c.head_dim, c.hidden);
    layer.o = matrix(file_, p + "attn_output.weight", c.hidden, c.heads * c.head_dim);
    layer.gate = matrix(file_, p + "ffn_gate.weight", c.ffn, c.hidden);
    layer.up = matrix(file_, p + "ffn_up.weight", c.ffn, c.hidden);
    layer.down = matrix(file_, p + "ffn_down.weight", c.hidden, c.ffn);
    layers_.push_back(std::move(layer));
  }
  output_norm_ = vector(file_, "output_norm.weight", c.hidden);
  embedding_ = matrix(file_, "token_embd.weight", c.vocab, c.hidden);
  output_ = c.tied_output ? embedding_ : matrix(file_, "output.weight", c.vocab, c.hidden);
}

void Model::set_rope_layout(RopeLayout layout) { rope_ = Rope(config_.head_dim, config_.rope_base, layout); }

std::size_t Model::weight_bytes() const {
  std::size_t bytes = output_.bytes();
  for (const Layer& l : layers_)
    bytes += l.q.bytes() + l.k.bytes() + l.v.bytes() + l.o.bytes() + l.gate.bytes() + l.up.bytes() + l.down.bytes();
  return bytes;
}

Tensor Model::embed(std::span<const std::int32_t> tokens) const {
  const auto T = static_cast<std::int64_t>(tokens.size());
  Tensor x(Shape{T, config_.hidden});
  for (std::int64_t t = 0; t < T; ++t) {
    const std::int32_t id = tokens[static_cast<std::size_t>(t)];
    if (id < 0 || id >= config_.vocab) fail("token id {} (expected 0..{})", id, config_.vocab - 1);
    embedding_.dequantize_rows(id, 1, x.matrix().row(t));
  }
  return x;
}

// [forward]
Tensor Model::forward(std::span<const std::int32_t> tokens, Cache& cache, bool all_logits, const Trace* trace,
                      PolicyAttention* policy) const {
  const Config& c = config_;
  const auto T = static_cast<std::int64_t>(tokens.size());
  require(T >= 1, "forward: no tokens (expected at least one)");
  require(cache.size() + T <= cache.capacity(), "forward: {} cached + {} new tokens exceed the cache's {}",
          cache.size(), T, cache.capacity());
  std::vector<std::int64_t> positions(static_cast<std::size_t>(T));
  for (std::int64_t t = 0; t < T; ++t) positions[static_cast<std::size_t>(t)] = cache.size() + t;

  const GroupedShape shape = c.attention_shape();
  const AttentionOptions causal{};  // causal, scale 1 / sqrt(d)
  Tensor x = embed(tokens);         // the residual stream [T, D]
  Tensor h(Shape{T, c.hidden}), q(Shape{T, c.heads * c.head_dim}), k(Shape{T, c.kv_heads * c.head_dim}),
      v(Shape{T, c.kv_heads * c.head_dim}), out(Shape{T, c.hidden}), gate(Shape{T, c.ffn}), up(Shape{T, c.ffn});
  for (std::int64_t l = 0; l < c.layers; ++l) {
    const Layer& w = layers_[static_cast<std::size_t>(l)];
    // Attention: normalise, project, rotate q and k by position, cache k and v, attend, project back.
    std::copy(x.values().begin(), x.values().end(), h.data());
    rms_norm_rows(h.matrix(), w.attention_norm, c.rms_eps);
    gguf::matmul(w.q, h.matrix(), q.matrix());
    gguf::matmul(w.k, h.matrix(), k.matrix());
    gguf::matmul(w.v, h.matrix(), v.matrix());
    rope_.rotate_rows(q.matrix(), positions);
    rope_.rotate_rows(k.matrix(), positions);
    GroupedKvCache& layer_cache = cache.layer(l);
    layer_cache.append(k.matrix(), v.matrix());
    const Tensor attended = policy != nullptr ? policy->attend(l, q.matrix(), layer_cache)
                                              : grouped_attend(q.matrix(), shape, layer_cache, causal);  // [T, H d]
    gguf::matmul(w.o, attended.matrix(), out.matrix());
    for (std::int64_t i = 0; i < x.numel(); ++i) x.data()[i] += out.data()[i];
    // MLP: normalise, SwiGLU (silu(gate) * up), project down.
    std::copy(x.values().begin(), x.values().end(), h.data());
    rms_norm_rows(h.matrix(), w.mlp_norm, c.rms_eps);
    gguf::matmul(w.gate, h.matrix(), gate.matrix());
    gguf::matmul(w.up, h.matrix(), up.matrix());
    for (std::int64_t i = 0; i < gate.numel(); ++i) {
      const float g = gate.data()[i];
      gate.data()[i] = g / (1.0f + std::exp(-g)) * up.data()[i];
    }
    gguf::matmul(w.down, gate.matrix(), out.matrix());
    for (std::int64_t i = 0; i < x.numel(); ++i) x.data()[i] += out.data()[i];
    if (trace != nullptr && trace->after_layer) trace->after_layer(l, x.matrix());
  }
  // The head: the final norm, then one logit per vocabulary entry.
  const std::int64_t first = all_logits ? 0 : T - 1, rows = T - first;
  Tensor last(Shape{rows, c.hidden});
  std::copy(x.data() + first * c.hidden, x.data() + T * c.hidden, last.data());
  rms_norm_rows(last.matrix(), output_norm_, c.rms_eps);
  Tensor logits(Shape{rows, c.vocab});
  gguf::matmul(output_, last.matrix(), logits.matrix());
  return logits;
}
// [/forward]

double SlidingNll::perplexity() const {
  return scored_tokens == 0 ? std::nan("") : std::exp(total_nll / static_cast<double>(scored_tokens));
}

SlidingNll sliding_window_nll(const Model& model, std::span<const std::int32_t> tokens, std::int64_t window,
                              std::int64_t stride, const std::function<void(std::int64_t, std::int64_t)>& progress) {
  const auto n = static_cast<std::int64_t>(tokens.size());
  require(n >= 2, "sliding_window_nll: {} tokens (expected at least 2)", n);
  require(window >= 2 && window <= model.config().context, "sliding_window_nll: window {} (expected 2..{})", window,
          model.config().context);
  require(stride >= 1 && stride <= window, "sliding_window_nll: stride {} (expected 1..window = {})", stride, window);
  const std::int64_t windows = n <= window ? 1 : 1 + (n - window + stride - 1) / stride;
  SlidingNll result;
  std::int64_t scored_until = 1;  // token 0 has nothing before it
  for (std::int64_t w = 0; w < windows; ++w) {
    const std::int64_t begin = w * stride, end = std::min(begin + window, n);
    const std::int64_t first = std::max(scored_until, begin + 1);
    Cache cache(model.config(), end - begin);
    const Tensor logits =
        model.forward(tokens.subspan(static_cast<std::size_t>(begin), static_cast<std::size_t>(end - begin)), cache,
                      /*all_logits=*/true);
    double nll = 0.0;
    for (std::int64_t position = first; position < end; ++position) {
      // -log softmax(z)[target] = log sum exp(z - max) - (z[target] - max), in float64.
      const std::span<const float> z = logits.matrix().row(position - begin - 1);
      double max = -std::numeric_limits<double>::infinity(), sum = 0.0;
      for (const float v : z) max = std::max(max, static_cast<double>(v));
      for (const float v : z) sum += std::exp(static_cast<double>(v) - max);
      nll += std::log(sum) -
             (static_cast<double>(z[static_cast<std::size_t>(tokens[static_cast<std::size_t>(position)])]) - max);
    }
    result.window_nll.push_back(nll);
    result.window_tokens.push_back(end - first);
    result.total_nll += nll;
    result.scored_tokens += end - first;
    scored_until = end;
    if (progress) progress(w + 1, windows);
  }
  return result;
}

}  // namespace af::llama
