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

CacheCard dense_kv_card(std::string mechanism, std::int64_t heads, std::int64_t kv_heads, std::int64_t head_dim,
                        DType dtype) {
  require(heads > 0 && kv_heads > 0 && head_dim > 0 && heads % kv_heads == 0,
          "dense_kv_card: {} heads, {} KV heads, head_dim {} (expected sizes > 0 and heads divisible by KV heads)",
          heads, kv_heads, head_dim);
  CacheCard card;
  card.mechanism = std::move(mechanism);
  card.projected = fmt::format("every token: q of {} head{}, k and v of {} head{}, each of dimension {}", heads,
                               heads == 1 ? "" : "s", kv_heads, kv_heads == 1 ? "" : "s", head_dim);
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

namespace {
// Splits `text` into lines of at most `width` characters at spaces.
std::vector<std::string> wrap(const std::string& text, std::size_t width) {
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
}  // namespace

std::string format_cache_card(const CacheCard& card, std::span<const ModelCache> models,
                              std::span<const std::int64_t> contexts) {
  std::string out = fmt::format("Cache card: {}\n", card.mechanism);
  const auto line = [&out](std::string_view label, const std::string& text) {
    out += fmt::format("  {:<17} {}\n", label, text);
  };
  const auto paragraph = [&line](std::string_view label, const std::string& text) {
    bool first = true;
    for (const std::string& l : wrap(text, 72)) line(first ? label : "", l), first = false;
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
    line("stored shape", fmt::format("after a prefill of T tokens: {} [T, {}]", fmt::join(names, ", "), shape));
    line("", fmt::format("after the decode step at position t: {} [t + 1, {}]", fmt::join(names, ", "), shape));
  } else {
    for (const CachedTensor& t : card.per_token)
      line(&t == &card.per_token.front() ? "stored shape" : "",
           fmt::format("{}: [T, {}] after a prefill, [t + 1, {}] after step t", t.name, fmt::join(t.shape, ", "),
                       fmt::join(t.shape, ", ")));
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

}  // namespace af
