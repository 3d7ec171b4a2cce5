#include "af/accounting.hpp"

#include "af/error.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <cmath>

namespace af {

std::int64_t CachedTensor::elements() const {
  std::int64_t n = 1;
  for (std::int64_t d : shape) n *= d;
  return n;
}

std::int64_t CachedTensor::bytes() const { return elements() * bytes_of(dtype); }

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

CacheCard dense_kv_card(std::string mechanism, std::int64_t kv_heads, std::int64_t head_dim, DType dtype) {
  require(kv_heads > 0 && head_dim > 0, "dense_kv_card: kv_heads {} and head_dim {} (expected both > 0)", kv_heads,
          head_dim);
  CacheCard card;
  card.mechanism = std::move(mechanism);
  card.projected = fmt::format("q, k, v of every token ({} KV head{} of dimension {})", kv_heads,
                               kv_heads == 1 ? "" : "s", head_dim);
  card.per_token = {{"K", {kv_heads, head_dim}, dtype}, {"V", {kv_heads, head_dim}, dtype}};
  card.stored_tokens = [](std::int64_t t) { return t; };
  const std::int64_t per_token = card.bytes_per_token();
  card.decode_reads = [per_token](std::int64_t t) {
    return std::vector<DecodeRead>{{"every cached key and value", t, t * per_token}};
  };
  card.trade_offs =
      "nothing is recomputed: each token's k and v are projected once and kept; memory and the bytes read per "
      "decode step grow linearly with the context";
  return card;
}

ModelCache llama31_8b() {
  return {"Llama-3.1-8B", "meta-llama/llama-models, models/sku_list.py (32 layers, 32 heads, 8 KV heads, dim 4096)",
          32, dense_kv_card("grouped-query attention", 8, 128, DType::bf16)};
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

std::string format_cache_card(const CacheCard& card, std::span<const ModelCache> models,
                              std::span<const std::int64_t> contexts) {
  std::string out = fmt::format("Cache card: {}\n", card.mechanism);
  const auto line = [&out](std::string_view label, const std::string& text) {
    out += fmt::format("  {:<22} {}\n", label, text);
  };
  line("projected", card.projected);
  std::vector<std::string> stored, prefill, decode;
  for (const CachedTensor& t : card.per_token) {
    stored.push_back(fmt::format("{} [{}] {}", t.name, fmt::join(t.shape, ", "), name_of(t.dtype)));
    prefill.push_back(fmt::format("{} [T, {}]", t.name, fmt::join(t.shape, ", ")));
    decode.push_back(fmt::format("{} [t + 1, {}]", t.name, fmt::join(t.shape, ", ")));
  }
  line("cached per token", fmt::format("{} (per layer)", fmt::join(stored, ", ")));
  line("shape after prefill", fmt::format("{} for a prompt of T tokens", fmt::join(prefill, ", ")));
  line("shape after decode", fmt::format("{} after the step at position t", fmt::join(decode, ", ")));
  line("bytes per token", fmt::format("{} per layer (written once, when the token is generated)",
                                      card.bytes_per_token()));
  for (const ModelCache& m : models)
    line("", fmt::format("{}: {} layers x {} = {} bytes per token ({})", m.model, m.layers,
                         m.card.bytes_per_token(), m.bytes_per_token(), m.card.mechanism));
  for (std::int64_t t : contexts) {
    std::vector<std::string> reads;
    for (const DecodeRead& r : card.decode_reads(t))
      reads.push_back(fmt::format("{} entries ({}, {} bytes)", r.entries, r.what, r.bytes));
    line(t == contexts.front() ? "read per decode query" : "", fmt::format("t = {}: {}", t, fmt::join(reads, "; ")));
  }
  for (const ModelCache& m : models) {
    for (std::int64_t t : contexts)
      line("", fmt::format("{} at t = {}: {} stored, {} read per decode step (all layers)", m.model, t,
                           human_bytes(static_cast<double>(m.layers * m.card.bytes_stored(t))),
                           human_bytes(static_cast<double>(m.layers * m.card.bytes_read(t)))));
  }
  line("trades off", card.trade_offs);
  return out;
}

}  // namespace af
