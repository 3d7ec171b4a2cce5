#include "af/program.hpp"

#include "af/compare.hpp"
#include "af/error.hpp"

#include <fmt/format.h>

#include <cstdio>
#include <cstdlib>
#include <limits>

namespace af {

int run_program(CLI::App& app, int argc, char** argv, const std::function<bool()>& body) {
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& help) {
    return app.exit(help);
  } catch (const CLI::ParseError& error) {
    fmt::print(stderr, "{}: {}\nRun with --help for the flags and their ranges.\n", app.get_name(), error.what());
    return 2;
  }
  try {
    return body() ? 0 : 1;
  } catch (const Error& error) {
    fmt::print(stderr, "{}: {}\n", app.get_name(), error.what());
    return 2;
  }
}

Checks::Checks() {
  if (const char* named = std::getenv("AF_PERTURB_CHECK")) perturb_ = named;
}

bool Checks::perturbed(std::string_view what) const {
  return !perturb_.empty() && (perturb_ == "*" || what.find(perturb_) != std::string_view::npos);
}

bool Checks::expect_close(std::string_view what, double error, double tolerance) {
  const bool perturb = perturbed(what);
  if (perturb) error = std::numeric_limits<double>::quiet_NaN();
  const bool pass = within_tolerance(error, tolerance);  // NaN or infinity, on either side, fails
  if (!pass) ++failures_;
  fmt::print("check  {:<48} max abs error {:.2e}  tolerance {:.0e}  {}{}\n", what, error, tolerance,
             pass ? "PASS" : "FAIL", perturb ? "  (perturbed by AF_PERTURB_CHECK)" : "");
  return pass;
}

bool Checks::expect_true(std::string_view what, bool condition) {
  const bool perturb = perturbed(what);
  if (perturb) condition = false;
  if (!condition) ++failures_;
  fmt::print("check  {:<48} {}{}\n", what, condition ? "PASS" : "FAIL", perturb ? "  (perturbed by AF_PERTURB_CHECK)" : "");
  return condition;
}

}  // namespace af
