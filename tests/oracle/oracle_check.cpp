// oracle_check CASE_DIR...: runs the library's implementation of each case's mechanism from the case's weights
// (the prefill, then the decode steps through the library's own cache) and compares with what the reference
// recorded. One line per case; exit 0 when all pass, 1 when one fails, 2 for a malformed or unsupported case.
#include "af/error.hpp"
#include "oracle.hpp"

#include <fmt/format.h>
#include <CLI/CLI.hpp>

#include <algorithm>
#include <cstdio>
#include <string_view>

namespace {

enum class Verdict { pass, fail, malformed };

constexpr std::string_view selected_prefix = "expected.selected.";

/// Rows of `expected.selected.<name>` whose set of chosen indices (ignoring order and -1 padding) differs from
/// what the library chose. A case whose tensor the runner did not produce, or whose shape differs, is
/// malformed for this build (CaseError).
std::int64_t mismatched_rows(const oracle::Case& c, const std::string& tensor_name,
                             const std::vector<oracle::Selection>& selected) {
  const std::string name = tensor_name.substr(selected_prefix.size());
  const auto mine = std::find_if(selected.begin(), selected.end(), [&](const auto& s) { return s.name == name; });
  if (mine == selected.end())
    throw oracle::CaseError(fmt::format("{}: the case records {} but the {} runner chooses no \"{}\" entries", c.name,
                                        tensor_name, c.reference, name));
  const auto& stored = c.tensors.stored(tensor_name);
  if (stored.shape.empty())
    throw oracle::CaseError(fmt::format("{}: {} is a scalar (expected [.., rows, k])", c.name, tensor_name));
  const std::int64_t k = stored.shape.back();
  std::vector<std::int64_t> expected;
  try {
    expected = c.tensors.integers(tensor_name);
  } catch (const af::Error& e) {
    throw oracle::CaseError(fmt::format("{}: {}", c.name, e.what()));
  }
  const std::int64_t rows = k > 0 ? static_cast<std::int64_t>(expected.size()) / k : 0;
  if (mine->k != k || mine->rows != rows || static_cast<std::int64_t>(mine->indices.size()) != rows * k)
    throw oracle::CaseError(fmt::format("{}: {} holds {} rows of {} but the library chose {} rows of {}", c.name,
                                        tensor_name, rows, k, mine->rows, mine->k));
  const auto as_set = [k](const std::vector<std::int64_t>& all, std::int64_t row) {
    std::vector<std::int64_t> chosen;
    for (std::int64_t j = 0; j < k; ++j)
      if (const auto index = all[static_cast<std::size_t>(row * k + j)]; index >= 0) chosen.push_back(index);
    std::sort(chosen.begin(), chosen.end());
    return chosen;
  };
  std::int64_t mismatched = 0;
  for (std::int64_t row = 0; row < rows; ++row)
    if (as_set(expected, row) != as_set(mine->indices, row)) ++mismatched;
  return mismatched;
}

Verdict check(const std::filesystem::path& dir) {
  std::string name = dir.filename().string();
  try {
    const oracle::Case c = oracle::read_case(dir);
    name = c.name;
    const auto& table = oracle::runners();
    const auto runner = table.find(c.reference);
    if (runner == table.end()) {
      std::string known;
      for (const auto& [reference, _] : table) known += (known.empty() ? "" : ", ") + reference;
      throw oracle::CaseError(
          fmt::format("{}: reference \"{}\" is not supported (this build checks: {})", c.name, c.reference, known));
    }
    const std::int64_t T = c.prefill_len, N = c.decode_steps;
    bool all_pass = true;
    for (const oracle::Outputs& got : runner->second(c)) {
      const std::int64_t hidden = got.prefill.dim(-1);
      const af::Tensor prefill = c.tensor("expected.prefill", af::Shape{1, T, hidden});
      const af::Tensor decode =
          N > 0 ? c.tensor("expected.decode", af::Shape{1, N, hidden}) : af::Tensor(af::Shape{1, 0, hidden});
      const double error = std::max(af::max_abs_diff(got.prefill.values(), prefill.values()),
                                    af::max_abs_diff(got.decode.values(), decode.values()));
      const double scale =
          c.relative_to_expected ? std::max({1.0, af::max_abs(prefill.values()), af::max_abs(decode.values())}) : 1.0;
      const double tolerance = c.max_abs * scale;
      std::string selection_note;
      std::int64_t selection_mismatches = 0;
      for (const std::string& tensor_name : c.tensors.names()) {
        if (!tensor_name.starts_with(selected_prefix)) continue;
        const std::int64_t mismatched = mismatched_rows(c, tensor_name, got.selected);
        selection_mismatches += mismatched;
        selection_note += fmt::format("  {} rows differ {}", tensor_name.substr(selected_prefix.size()), mismatched);
      }
      const bool pass = error <= tolerance && selection_mismatches == 0;  // a NaN fails
      all_pass = all_pass && pass;
      const std::string mechanism = got.path.empty() ? c.reference : c.reference + "/" + got.path;
      fmt::print("{:<30} {:<20} max abs error {:.2e}  tolerance {:.2e}{}  {}\n", c.name, mechanism, error, tolerance,
                 selection_note, pass ? "PASS" : "FAIL");
    }
    return all_pass ? Verdict::pass : Verdict::fail;
  } catch (const oracle::CaseError& e) {
    fmt::print("{:<30} MALFORMED {}\n", name, e.what());
  } catch (const af::Error& e) {
    fmt::print("{:<30} MALFORMED {}\n", name, e.what());
  }
  return Verdict::malformed;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Checks the library against oracle cases recorded from the reference implementations.", "oracle_check"};
  std::vector<std::filesystem::path> dirs;
  app.add_option("cases", dirs, "Case directories (tests/oracle/cases/<name>)")
      ->required()
      ->check(CLI::ExistingDirectory);
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& help) {
    return app.exit(help);
  } catch (const CLI::ParseError& error) {
    fmt::print(stderr, "oracle_check: {}\n", error.what());
    return 2;
  }
  int passed = 0, failed = 0, malformed = 0;
  for (const auto& dir : dirs) {
    switch (check(dir)) {
      case Verdict::pass:
        ++passed;
        break;
      case Verdict::fail:
        ++failed;
        break;
      case Verdict::malformed:
        ++malformed;
        break;
    }
  }
  fmt::print("oracle_check: {} passed, {} failed, {} malformed or unsupported\n", passed, failed, malformed);
  return malformed > 0 ? 2 : failed > 0 ? 1 : 0;
}
