#pragma once
/// @file program.hpp
/// What every chapter program shares: flag parsing with CLI11, the exit status contract (0 all checks
/// passed, 1 a check failed, 2 bad flags or arguments), and the report of each check against its tolerance.

#include <CLI/CLI.hpp>

#include <functional>
#include <string>
#include <string_view>

namespace af {

/// Parses `argv` into `app`, then runs `body`, which returns whether every check passed.
/// `--help` prints the flags and returns 0; a bad flag or value, or an af::Error thrown by `body`,
/// prints what is wrong and returns 2; a failed check returns 1.
int run_program(CLI::App& app, int argc, char** argv, const std::function<bool()>& body);

/// Prints one line per check (what was compared, the error, the tolerance, PASS or FAIL) and remembers
/// whether all passed. A NaN or infinite error or tolerance fails (af::within_tolerance).
///
/// To see a failure on purpose, set the environment variable `AF_PERTURB_CHECK` to a piece of a check's
/// description (or `*` for every check): each check it names is handed a NaN error (expect_close) or a false
/// condition (expect_true), its line says so, and the program exits 1. The test suite uses it to show that a
/// failed check fails the program, the book build and `make test`.
class Checks {
 public:
  /// Reads `AF_PERTURB_CHECK` once.
  Checks();
  bool expect_close(std::string_view what, double error, double tolerance);
  bool expect_true(std::string_view what, bool condition);
  bool all_passed() const { return failures_ == 0; }
  int failures() const { return failures_; }

 private:
  bool perturbed(std::string_view what) const;

  int failures_ = 0;
  std::string perturb_;
};

}  // namespace af
