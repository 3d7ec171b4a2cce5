// oracle_check CASE_DIR...: runs the library's implementation of each case's mechanism from the case's weights
// (the prefill, then the decode steps through the library's own cache) and compares with what the reference
// recorded. One line per case (per way of computing it); exit 0 when all pass, 1 when one fails (NaN and infinity
// included), 2 for a malformed or unsupported case (the message names the case and the field or tensor).
#include "oracle.hpp"

#include <fmt/format.h>
#include <CLI/CLI.hpp>

#include <cstdio>
#include <exception>

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
    const oracle::CheckResult result = oracle::check_case(dir, oracle::runners());
    fmt::print("{}", result.report);
    std::fflush(stdout);
    switch (result.verdict) {
      case oracle::Verdict::pass:
        ++passed;
        break;
      case oracle::Verdict::fail:
        ++failed;
        break;
      case oracle::Verdict::malformed:
        ++malformed;
        break;
    }
  }
  fmt::print("oracle_check: {} passed, {} failed, {} malformed or unsupported\n", passed, failed, malformed);
  return malformed > 0 ? 2 : failed > 0 ? 1 : 0;
}
