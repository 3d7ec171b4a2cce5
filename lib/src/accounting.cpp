#include "af/accounting.hpp"

#include "af/error.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cmath>

namespace af {

std::int64_t CachedTensor::elements() const {
  std::int64_t n = 1;
  for (std::int64_t d : shape) n *= d;
  return n;
}

std::int64_t CachedTensor::bytes() const { return elements() * bytes_of(dtype); }

namespace {
// Heads of `t` on one of `tp` ranks (at least one: fewer heads than ranks means replicas).
std::int64_t heads_per_gpu(const CachedTensor& t, std::int64_t tp) {
  require(tp >= 1, "tensor parallelism of degree {} (expected >= 1)", tp);
  if (t.head_axis < 0) return 0;
  require(t.head_axis < static_cast<int>(t.shape.size()), "CachedTensor {}: head axis {} of a rank-{} shape", t.name,
          t.head_axis, t.shape.size());
  const std::int64_t heads = t.shape[static_cast<std::size_t>(t.head_axis)];
  require(heads % tp == 0 || tp % heads == 0,
          "CachedTensor {}: {} heads over {} tensor-parallel ranks (expected one of the two to divide the other)",
          t.name, heads, tp);
  return heads >= tp ? heads / tp : 1;
}
}  // namespace

std::int64_t CachedTensor::bytes_per_gpu(std::int64_t tp) const {
  const std::int64_t per_gpu = heads_per_gpu(*this, tp);
  if (head_axis < 0) return bytes();
  return bytes() / shape[static_cast<std::size_t>(head_axis)] * per_gpu;
}

std::int64_t CachedTensor::copies(std::int64_t tp) const {
  const std::int64_t per_gpu = heads_per_gpu(*this, tp);
  if (head_axis < 0) return tp;
  return per_gpu * tp / shape[static_cast<std::size_t>(head_axis)];
}

std::int64_t CacheCard::bytes_per_token() const {
  std::int64_t total = 0;
  for (const CachedTensor& t : per_token) total += t.bytes();
  return total;
}

std::int64_t CacheCard::bytes_stored(std::int64_t t) const { return stored_tokens(t) * bytes_per_token(); }

std::int64_t CacheCard::bytes_read(std::int64_t t) const {
  std::int64_t total = 0;
  for (const DecodeRead& read : decode_reads(t)) total += read.bytes;
  return total;
}

double CacheCard::decode_flops(std::int64_t t) const {
  double total = 0.0;
  for (const DecodeRead& read : decode_reads(t)) total += read.flops;
  return total;
}

double CacheCard::prefill_flops(std::int64_t tokens) const {
  require(tokens >= 0, "prefill_flops: {} tokens (expected >= 0)", tokens);
  double total = 0.0;
  for (std::int64_t i = 1; i <= tokens; ++i) total += decode_flops(i);
  return total;
}

std::int64_t CacheCard::bytes_per_token_per_gpu(std::int64_t tp) const {
  std::int64_t total = 0;
  for (const CachedTensor& t : per_token) total += t.bytes_per_gpu(tp);
  return total;
}

std::int64_t CacheCard::bytes_stored_per_gpu(std::int64_t t, std::int64_t tp) const {
  return stored_tokens(t) * bytes_per_token_per_gpu(tp);
}

std::int64_t CacheCard::bytes_read_per_gpu(std::int64_t t, std::int64_t tp) const {
  const std::int64_t whole = bytes_per_token(), share = bytes_per_token_per_gpu(tp);
  std::int64_t total = 0;
  for (const DecodeRead& read : decode_reads(t))
    total += read.bytes / whole * share + read.bytes % whole * share / whole;
  return total;
}

CacheCard dense_kv_card(std::string mechanism, std::int64_t heads, std::int64_t kv_heads, std::int64_t head_dim,
                        DType dtype) {
  require(heads > 0 && kv_heads > 0 && head_dim > 0 && heads % kv_heads == 0,
          "dense_kv_card: {} heads, {} KV heads, head_dim {} (expected sizes > 0 and heads divisible by KV heads)",
          heads, kv_heads, head_dim);
  CacheCard card;
  card.mechanism = std::move(mechanism);
  card.projected = fmt::format("every token: q of {} head{}, k and v of {} head{}, each of dimension {}", heads,
                               heads == 1 ? "" : "s", kv_heads, kv_heads == 1 ? "" : "s", head_dim);
  card.per_token = {{"K", {kv_heads, head_dim}, dtype, 0}, {"V", {kv_heads, head_dim}, dtype, 0}};
  card.stored_tokens = [](std::int64_t t) { return t; };
  const std::int64_t per_token = card.bytes_per_token();
  const double flops_per_entry = 4.0 * static_cast<double>(heads * head_dim);  // score + value mix, every head
  card.decode_reads = [per_token, flops_per_entry](std::int64_t t) {
    return std::vector<DecodeRead>{
        {"every cached key and value", t, t * per_token, static_cast<double>(t) * flops_per_entry}};
  };
  card.trade_offs =
      "nothing is recomputed: each token's k and v are projected once and kept; memory and the bytes read per "
      "decode step grow linearly with the context";
  return card;
}

CacheCard mla_kv_card(std::int64_t heads, std::int64_t kv_lora_rank, std::int64_t rope_dim, DType dtype) {
  require(heads > 0 && kv_lora_rank > 0 && rope_dim > 0,
          "mla_kv_card: {} heads, kv_lora_rank {}, rope_dim {} (expected all > 0)", heads, kv_lora_rank, rope_dim);
  CacheCard card;
  card.mechanism = "MLA (multi-head latent attention)";
  card.projected = fmt::format(
      "every token: q of {} heads; one latent c_KV of {} values and one RoPE key k_rope of {} values shared by all "
      "heads, from which every head's keys and values are up-projected (or absorbed into q and the output)",
      heads, kv_lora_rank, rope_dim);
  card.per_token = {{"c_KV", {kv_lora_rank}, dtype, -1}, {"k_rope", {rope_dim}, dtype, -1}};
  card.stored_tokens = [](std::int64_t t) { return t; };
  const std::int64_t per_token = card.bytes_per_token();
  // Absorbed form: each head scores its [kv_lora_rank + rope_dim] query against the entry, then mixes the latent.
  const double flops_per_entry =
      2.0 * static_cast<double>(heads * (kv_lora_rank + rope_dim)) + 2.0 * static_cast<double>(heads * kv_lora_rank);
  card.decode_reads = [per_token, flops_per_entry](std::int64_t t) {
    return std::vector<DecodeRead>{
        {"every cached latent and RoPE key", t, t * per_token, static_cast<double>(t) * flops_per_entry}};
  };
  card.trade_offs = fmt::format(
      "one {}-value entry per token and layer for all {} heads (memory and reads as MQA with a wide head); extra "
      "up-projection or absorbed-matrix FLOPs per step; under tensor parallelism every rank keeps the whole latent",
      kv_lora_rank + rope_dim, heads);
  return card;
}

CacheCard with_sliding_window(CacheCard card, std::int64_t window) {
  require(window > 0, "with_sliding_window: window {} (expected > 0)", window);
  const auto stored = card.stored_tokens;
  const auto reads = card.decode_reads;
  card.stored_tokens = [stored, window](std::int64_t t) { return stored(std::min(t, window)); };
  card.decode_reads = [reads, window](std::int64_t t) { return reads(std::min(t, window)); };
  card.mechanism += fmt::format(", sliding window of {}", window);
  card.rows_after_prefill = fmt::format("min(T, {})", window);
  card.rows_after_step = fmt::format("min(t + 1, {})", window);
  card.trade_offs = fmt::format(
      "memory and bandwidth stop growing at {} tokens per layer; quality: a key more than {} positions back is "
      "invisible to this layer (reach grows only through the layers stacked above it); complexity: a ring buffer "
      "whose oldest slot is overwritten, keys stored already rotated",
      window, window - 1);
  return card;
}

std::string human_bytes(double bytes) {
  constexpr const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int unit = 0;
  while (std::abs(bytes) >= 1024.0 && unit < 4) {
    bytes /= 1024.0;
    ++unit;
  }
  if (unit == 0 || bytes == std::floor(bytes)) return fmt::format("{:.0f} {}", bytes, units[unit]);
  return fmt::format("{:.2f} {}", bytes, units[unit]);
}

std::vector<std::string> wrap_words(const std::string& text, std::size_t width) {
  std::vector<std::string> lines(1);
  std::size_t start = 0;
  while (start < text.size()) {
    std::size_t end = text.find(' ', start);
    if (end == std::string::npos) end = text.size();
    const std::string word = text.substr(start, end - start);
    if (!lines.back().empty() && lines.back().size() + 1 + word.size() > width) lines.emplace_back();
    lines.back() += (lines.back().empty() ? "" : " ") + word;
    start = end + 1;
  }
  return lines;
}

std::string format_cache_card(const CacheCard& card, std::span<const ModelCache> models,
                              std::span<const std::int64_t> contexts) {
  std::string out = fmt::format("Cache card: {}\n", card.mechanism);
  // A line longer than the book's code column (110 characters) continues under its text.
  const auto line = [&out](std::string_view label, const std::string& text) {
    for (const std::string& l : wrap_words(text, 90)) out += fmt::format("  {:<17} {}\n", label, l), label = "";
  };
  const auto paragraph = [&line](std::string_view label, const std::string& text) {
    bool first = true;
    for (const std::string& l : wrap_words(text, 72)) line(first ? label : "", l), first = false;
  };
  paragraph("projected", card.projected);
  std::vector<std::string> stored, names;
  std::string shape;
  for (const CachedTensor& t : card.per_token) {
    stored.push_back(fmt::format("{} [{}] {}", t.name, fmt::join(t.shape, ", "), name_of(t.dtype)));
    names.push_back(t.name);
    shape = fmt::format("{}", fmt::join(t.shape, ", "));
  }
  const bool same_shape = std::ranges::all_of(
      card.per_token, [&](const CachedTensor& t) { return fmt::format("{}", fmt::join(t.shape, ", ")) == shape; });
  line("cached", fmt::format("per token and layer: {}", fmt::join(stored, ", ")));
  if (same_shape) {
    line("stored shape", fmt::format("after a prefill of T tokens: {} [{}, {}]", fmt::join(names, ", "),
                                     card.rows_after_prefill, shape));
    line("", fmt::format("after the decode step at position t: {} [{}, {}]", fmt::join(names, ", "),
                         card.rows_after_step, shape));
  } else {
    for (const CachedTensor& t : card.per_token)
      line(&t == &card.per_token.front() ? "stored shape" : "",
           fmt::format("{}: [{}, {}] after a prefill, [{}, {}] after step t", t.name, card.rows_after_prefill,
                       fmt::join(t.shape, ", "), card.rows_after_step, fmt::join(t.shape, ", ")));
  }
  line("bytes per token",
       fmt::format("{} per layer, written once when the token is generated", card.bytes_per_token()));
  for (const ModelCache& m : models)
    line("", fmt::format("{}: {} per layer x {} layers = {} per token", m.model, m.card.bytes_per_token(), m.layers,
                         m.bytes_per_token()));
  for (std::int64_t t : contexts) {
    std::vector<std::string> reads;
    for (const DecodeRead& r : card.decode_reads(t))
      reads.push_back(fmt::format("{} entries, {} bytes ({})", r.entries, r.bytes, r.what));
    line(t == contexts.front() ? "decode reads" : "", fmt::format("t = {}: {}", t, fmt::join(reads, "; ")));
  }
  for (const ModelCache& m : models)
    for (std::int64_t t : contexts)
      line(&m == &models.front() && t == contexts.front() ? "whole model" : "",
           fmt::format("{} at t = {}: {} stored, {} read per decode step", m.model, t,
                       human_bytes(static_cast<double>(m.layers * m.card.bytes_stored(t))),
                       human_bytes(static_cast<double>(m.layers * m.card.bytes_read(t)))));
  paragraph("trades off", card.trade_offs);
  return out;
}

std::int64_t InterleavedModel::bytes_stored(std::int64_t t) const {
  std::int64_t total = 0;
  for (const ModelCache& part : parts) total += part.bytes_stored(t);
  return total;
}

std::int64_t InterleavedModel::bytes_read(std::int64_t t) const {
  std::int64_t total = 0;
  for (const ModelCache& part : parts) total += part.bytes_read(t);
  return total;
}

std::int64_t InterleavedModel::entries_read(std::int64_t t) const {
  std::int64_t total = 0;
  for (const ModelCache& part : parts)
    for (const DecodeRead& read : part.card.decode_reads(t)) total += part.layers * read.entries;
  return total;
}

double InterleavedModel::decode_flops(std::int64_t t) const {
  double total = 0.0;
  for (const ModelCache& part : parts) total += part.decode_flops(t);
  return total;
}

double InterleavedModel::prefill_flops(std::int64_t tokens) const {
  double total = 0.0;
  for (const ModelCache& part : parts) total += part.prefill_flops(tokens);
  return total;
}

std::int64_t InterleavedModel::bytes_per_token_after_windows() const {
  constexpr std::int64_t far = std::int64_t{1} << 40;  // beyond every window
  return bytes_stored(far + 1) - bytes_stored(far);
}

}  // namespace af
