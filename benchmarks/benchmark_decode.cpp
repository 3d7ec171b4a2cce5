// benchmark_decode: the decode tables of chapter 05, computed from the library's accounting (nothing is timed).
// For each model preset: what its KV cache stores per token, per layer and per model; what one sequence's
// cache holds at a context length, times a batch, and on each GPU under tensor parallelism (KV heads split
// across ranks, replicated when there are fewer KV heads than ranks; MLA's latent kept whole on every rank);
// what one decode step reads; and how many sequences of length L fit in M GB per GPU beside the weights.
//
// The weights' bytes are parameters x bytes per weight; the parameter count is the nominal one in the model's
// published name (8B, 671B, ...) unless --params gives it.
//
//   build/bin/benchmark_decode [--mode memory|reads|all] [--model NAME,...] [--context 4096,32768,131072]
//                              [--batch 1] [--dtype bf16] [--tp 1,8] [--memory-gb 80] [--fit-length L]
//                              [--weights-dtype bf16] [--params N] [--format table|csv|json] [--out DIR]

#include "af/accounting.hpp"
#include "af/error.hpp"
#include "af/models.hpp"
#include "af/program.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <filesystem>
#include <map>
#include <string>
#include <variant>
#include <vector>

namespace {

// One cell: a text, an exact count, or a byte count (shown exact below 1 MiB, else in binary units).
struct Bytes {
  std::int64_t value;
};
using Cell = std::variant<std::string, std::int64_t, Bytes>;

struct Table {
  std::string title;
  std::vector<std::string> columns;  // snake_case keys, also the CSV/JSON names
  std::vector<std::vector<Cell>> rows;
};

std::string grouped(std::int64_t n) {
  std::string digits = std::to_string(n < 0 ? -n : n), out;
  for (std::size_t i = 0; i < digits.size(); ++i) {
    if (i > 0 && (digits.size() - i) % 3 == 0) out += ',';
    out += digits[i];
  }
  return n < 0 ? "-" + out : out;
}

std::string show(const Cell& cell) {
  if (const auto* s = std::get_if<std::string>(&cell)) return *s;
  if (const auto* n = std::get_if<std::int64_t>(&cell)) return grouped(*n);
  const std::int64_t b = std::get<Bytes>(cell).value;
  return b < (std::int64_t{1} << 20) ? grouped(b) : af::human_bytes(static_cast<double>(b));
}

std::string raw(const Cell& cell) {
  if (const auto* s = std::get_if<std::string>(&cell)) return *s;
  if (const auto* n = std::get_if<std::int64_t>(&cell)) return std::to_string(*n);
  return std::to_string(std::get<Bytes>(cell).value);
}

std::string as_text(const Table& t) {
  std::vector<std::size_t> width(t.columns.size());
  for (std::size_t c = 0; c < t.columns.size(); ++c) {
    width[c] = t.columns[c].size();
    for (const auto& row : t.rows) width[c] = std::max(width[c], show(row[c]).size());
  }
  std::string out = t.title + "\n";
  for (std::size_t c = 0; c < t.columns.size(); ++c)
    out += c == 0 ? fmt::format("  {:<{}}", t.columns[c], width[c]) : fmt::format("  {:>{}}", t.columns[c], width[c]);
  out += "\n";
  for (const auto& row : t.rows) {
    for (std::size_t c = 0; c < row.size(); ++c)
      out += c == 0 ? fmt::format("  {:<{}}", show(row[c]), width[c]) : fmt::format("  {:>{}}", show(row[c]), width[c]);
    out += "\n";
  }
  return out;
}

std::string as_csv(const Table& t) {
  std::string out = fmt::format("# {}\n{}\n", t.title, fmt::join(t.columns, ","));
  for (const auto& row : t.rows) {
    std::vector<std::string> cells;
    for (const Cell& c : row) {
      std::string s = raw(c);
      if (s.find_first_of(",\"") != std::string::npos) {
        std::string quoted = "\"";
        for (char ch : s) quoted += ch == '"' ? std::string("\"\"") : std::string(1, ch);
        s = quoted + "\"";
      }
      cells.push_back(s);
    }
    out += fmt::format("{}\n", fmt::join(cells, ","));
  }
  return out;
}

nlohmann::json as_json(const Table& t) {
  nlohmann::json rows = nlohmann::json::array();
  for (const auto& row : t.rows) {
    nlohmann::json r;
    for (std::size_t c = 0; c < row.size(); ++c) {
      if (const auto* s = std::get_if<std::string>(&row[c]))
        r[t.columns[c]] = *s;
      else if (const auto* n = std::get_if<std::int64_t>(&row[c]))
        r[t.columns[c]] = *n;
      else
        r[t.columns[c]] = std::get<Bytes>(row[c]).value;
    }
    rows.push_back(r);
  }
  return {{"title", t.title}, {"rows", rows}};
}

std::string cached_tensors(const af::CacheCard& card) {
  std::vector<std::string> parts;
  for (const af::CachedTensor& t : card.per_token)
    parts.push_back(fmt::format("{}[{}]", t.name, fmt::join(t.shape, "x")));
  return fmt::format("{} {}", fmt::join(parts, " "), af::name_of(card.per_token.front().dtype));
}

// "GQA (groups of 4), sliding window of 4096" -> "GQA/4 SWA"; "MLA (multi-head latent attention)" -> "MLA".
std::string short_name(const std::string& mechanism) {
  std::string name = mechanism.substr(0, mechanism.find(' '));
  if (const auto groups = mechanism.find("groups of "); groups != std::string::npos)
    name += "/" + mechanism.substr(groups + 10, mechanism.find(')', groups) - groups - 10);
  if (mechanism.find("sliding window") != std::string::npos) name += " SWA";
  return name;
}

struct Settings {
  std::vector<std::string> models;
  std::vector<std::int64_t> contexts, batches, tps;
  af::DType dtype = af::DType::bf16, weights_dtype = af::DType::bf16;
  double memory_gb = 80.0, params = 0.0;
  std::int64_t fit_length = 0;
};

// [memory-table]
// What each model caches per token: the tensors of one layer, their bytes, and the whole model's bytes, which
// are also the bytes written per generated token.
Table per_token_table(const Settings& s) {
  Table t{fmt::format("KV cache per token ({} cache)", af::name_of(s.dtype)),
          {"model", "attention", "layers", "cached_per_token_layer", "bytes_token_layer", "bytes_token"},
          {}};
  for (const std::string& name : s.models) {
    const af::ModelCache m = af::model_preset(name).cache(s.dtype);
    t.rows.push_back({m.model, short_name(m.card.mechanism), m.layers, cached_tensors(m.card),
                      Bytes{m.card.bytes_per_token()}, Bytes{m.bytes_per_token()}});
  }
  return t;
}

// What a batch of sequences holds at each context, in all and on each GPU under tensor parallelism.
Table memory_table(const Settings& s) {
  Table t{fmt::format("KV-cache memory ({} cache): a batch of sequences at each context, in all and per GPU",
                      af::name_of(s.dtype)),
          {"model", "context", "batch", "cache_bytes", "tp", "cache_bytes_per_gpu", "copies"},
          {}};
  for (const std::string& name : s.models) {
    const af::ModelCache m = af::model_preset(name).cache(s.dtype);
    for (std::int64_t context : s.contexts)
      for (std::int64_t batch : s.batches)
        for (std::int64_t tp : s.tps)
          t.rows.push_back({m.model, context, batch, Bytes{batch * m.bytes_stored(context)}, tp,
                            Bytes{batch * m.bytes_stored_per_gpu(context, tp)}, m.card.per_token.front().copies(tp)});
  }
  return t;
}
// [/memory-table]

// [reads-table]
// What one decode step reads: entries and bytes per layer for one query, per sequence for the whole model,
// for the batch, and on each GPU.
Table reads_table(const Settings& s) {
  Table t{
      fmt::format("KV-cache reads of one decode step ({} cache): one new token per sequence", af::name_of(s.dtype)),
      {"model", "context", "entries_layer", "read_layer", "read_sequence", "batch", "read_step", "tp", "read_per_gpu"},
      {}};
  for (const std::string& name : s.models) {
    const af::ModelCache m = af::model_preset(name).cache(s.dtype);
    for (std::int64_t context : s.contexts) {
      std::int64_t entries = 0;
      for (const af::DecodeRead& r : m.card.decode_reads(context)) entries += r.entries;
      for (std::int64_t batch : s.batches)
        for (std::int64_t tp : s.tps)
          t.rows.push_back({m.model, context, entries, Bytes{m.card.bytes_read(context)}, Bytes{m.bytes_read(context)},
                            batch, Bytes{batch * m.bytes_read(context)}, tp,
                            Bytes{batch * m.bytes_read_per_gpu(context, tp)}});
    }
  }
  return t;
}
// [/reads-table]

// [fit-table]
// How many sequences of `length` tokens fit on each of `tp` GPUs of `memory_gb` (10^9 bytes) beside that GPU's
// share of the weights (the weights split evenly over the ranks; activations and workspace not counted).
Table fit_table(const Settings& s) {
  Table t{
      fmt::format("Sequences that fit beside the weights: {:g} GB (10^9 B) per GPU, {} weights, {} cache", s.memory_gb,
                  af::name_of(s.weights_dtype), af::name_of(s.dtype)),
      {"model", "parameters", "tp", "weights_per_gpu", "free_per_gpu", "length", "cache_per_seq_per_gpu", "sequences"},
      {}};
  const auto budget = static_cast<std::int64_t>(s.memory_gb * 1e9);
  for (const std::string& name : s.models) {
    const af::ModelPreset& preset = af::model_preset(name);
    const af::ModelCache m = preset.cache(s.dtype);
    const double params = s.params > 0 ? s.params : preset.parameters;
    for (std::int64_t tp : s.tps) {
      const auto weights = static_cast<std::int64_t>(params * af::bytes_of(s.weights_dtype) / static_cast<double>(tp));
      const std::int64_t free = std::max<std::int64_t>(0, budget - weights);
      for (std::int64_t length : s.fit_length > 0 ? std::vector<std::int64_t>{s.fit_length} : s.contexts) {
        const std::int64_t per_sequence = m.bytes_stored_per_gpu(length, tp);
        t.rows.push_back({m.model, fmt::format("{:g}e9", params / 1e9), tp, Bytes{weights}, Bytes{free}, length,
                          Bytes{per_sequence}, free / per_sequence});
      }
    }
  }
  return t;
}
// [/fit-table]

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"KV-cache memory, decode reads and batch fit of real models, from the library's accounting",
               "benchmark_decode"};
  std::string mode = "all", format = "table", out_dir;
  Settings s;
  for (const af::ModelPreset& p : af::model_presets()) s.models.push_back(p.name);
  s.contexts = {4096, 32768, 131072};
  s.batches = {1};
  s.tps = {1, 8};
  const std::map<std::string, af::DType> dtypes = {{"f32", af::DType::f32},
                                                   {"bf16", af::DType::bf16},
                                                   {"fp16", af::DType::f16},
                                                   {"fp8", af::DType::fp8_e4m3},
                                                   {"int8", af::DType::int8}};
  std::string known_models;
  for (const std::string& m : s.models) known_models += (known_models.empty() ? "" : ", ") + m;
  app.add_option("--mode", mode, "Which tables: memory (with the fit), reads, or all")
      ->check(CLI::IsMember({"memory", "reads", "all"}))
      ->capture_default_str();
  app.add_option("--model", s.models, "Models, comma-separated (" + known_models + ")")
      ->delimiter(',')
      ->check(CLI::IsMember(s.models));
  app.add_option("--context", s.contexts, "Context lengths in tokens")->delimiter(',')->check(CLI::Range(1, 1 << 30));
  app.add_option("--batch", s.batches, "Sequences decoded together")->delimiter(',')->check(CLI::Range(1, 1 << 20));
  app.add_option("--dtype", s.dtype, "Element type of the cache")
      ->transform(CLI::CheckedTransformer(dtypes, CLI::ignore_case));
  app.add_option("--tp", s.tps, "Tensor-parallel degrees")->delimiter(',')->check(CLI::Range(1, 1024));
  app.add_option("--memory-gb", s.memory_gb, "Memory per GPU for the fit, in GB (10^9 bytes)")
      ->check(CLI::Range(1.0, 1e6))
      ->capture_default_str();
  app.add_option("--fit-length", s.fit_length, "Sequence length of the fit (default: each --context)")
      ->check(CLI::Range(1, 1 << 30));
  app.add_option("--weights-dtype", s.weights_dtype, "Element type of the weights for the fit")
      ->transform(CLI::CheckedTransformer(dtypes, CLI::ignore_case));
  app.add_option("--params", s.params, "Parameter count for the fit (default: the nominal count in the model's name)")
      ->check(CLI::Range(1.0, 1e15));
  app.add_option("--format", format, "Output: aligned table, csv or json")
      ->check(CLI::IsMember({"table", "csv", "json"}))
      ->capture_default_str();
  app.add_option("--out", out_dir, "Directory for decode_tables.json (every table printed)")
      ->check(af::output_directory());

  return af::run_program(app, argc, argv, [&] {
    af::require(s.params == 0.0 || s.models.size() == 1, "--params {:g} given for {} models (expected one --model)",
                s.params, s.models.size());
    std::vector<Table> tables;
    if (mode != "reads") tables.push_back(per_token_table(s)), tables.push_back(memory_table(s));
    if (mode != "memory") tables.push_back(reads_table(s));
    if (mode != "reads") tables.push_back(fit_table(s));
    nlohmann::json json = nlohmann::json::array();
    for (const Table& t : tables) json.push_back(as_json(t));
    for (const Table& t : tables) {
      if (format == "table") fmt::print("{}\n", as_text(t));
      if (format == "csv") fmt::print("{}\n", as_csv(t));
    }
    if (format == "json") fmt::print("{}\n", json.dump(2));
    if (!out_dir.empty()) {
      const std::filesystem::path dir = af::make_output_directory(out_dir);
      af::write_output_file(dir / "decode_tables.json",
                            [&](af::OutputFile& file) { file.print("{}\n", json.dump(1)); });
    }
    return true;
  });
}
