// oracle_check CASE_DIR...: runs the library's implementation of each case's mechanism from the case's weights
// (the prefill, then the decode steps through the library's own cache) and compares with what the reference
// recorded. One line per case; exit 0 when all pass, 1 when one fails, 2 for a malformed or unsupported case.
#include "af/error.hpp"
#include "oracle.hpp"

#include <fmt/format.h>
#include <CLI/CLI.hpp>

#include <algorithm>
#include <cstdio>

namespace {

enum class Verdict { pass, fail, malformed };

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
      const bool pass = error <= tolerance;  // a NaN fails
      all_pass = all_pass && pass;
      const std::string mechanism = got.path.empty() ? c.reference : c.reference + "/" + got.path;
      fmt::print("{:<30} {:<20} max abs error {:.2e}  tolerance {:.2e}  {}\n", c.name, mechanism, error, tolerance,
                 pass ? "PASS" : "FAIL");
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
