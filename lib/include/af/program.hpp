#pragma once
/// @file program.hpp
/// What every chapter program shares: flag parsing with CLI11, the checks of flag values CLI11 lacks (finite
/// numbers, 64-bit seeds, an output directory), the exit status contract (0 all checks passed, 1 a check
/// failed, 2 bad flags, arguments or environment), writing the figure data, and the report of each check
/// against its tolerance.

#include <CLI/CLI.hpp>
// nvcc 13 cannot parse fmt 9 in C++20 mode, and the kernel chapters (.cu) write no data files: they see
// everything here but OutputFile and write_output_file.
#ifndef __CUDACC__
#include <fmt/format.h>
#endif

#include <cstdint>
#include <filesystem>
#include <functional>
#include <initializer_list>
#include <iterator>
#include <map>
#include <string>
#include <string_view>
#include <utility>

namespace af {

/// Parses `argv` into `app`, then runs `body`, which returns whether every check passed.
/// `--help` prints the flags and returns 0; a bad flag or value, or any exception thrown by `body` (an
/// af::Error, a file that cannot be written, memory that runs out), prints what is wrong and returns 2;
/// a failed check returns 1.
int run_program(CLI::App& app, int argc, char** argv, const std::function<bool()>& body);

/// The check of a floating-point flag: a finite number in [lo, hi]. Use it instead of CLI::Range, which
/// lets "nan" through (every comparison with NaN is false) and says nothing of infinity.
CLI::Validator finite_range(double lo, double hi);

/// A size flag and its value, for require_product_within.
struct FlagValue {
  std::string_view flag;
  std::int64_t value;
};

/// The combined check of size flags whose product sets a program's time or memory: throws af::Error unless
/// the product of the values is at most `limit`, naming each flag, its value, the product and the limit.
/// Each flag's own range keeps a run short with the others at their defaults; this keeps the combinations short.
void require_product_within(std::initializer_list<FlagValue> flags, double limit);

/// The check of a seed flag (std::uint64_t): a decimal integer in [0, 2^64 - 1], without a sign or leading
/// zeros. CLI11 alone reads "-1" as 2^64 - 1, an overflowing value as 2^64 - 1, and "010" as octal 8.
CLI::Validator seed_value();

/// The check of an --out flag, before anything runs: an existing directory, or a new one whose parent
/// exists (only the last component is ever created), writable either way.
CLI::Validator output_directory();

/// Creates the --out directory `dir` if it is missing (only its last component: its parent must exist)
/// and returns it. Throws af::Error naming `dir` when it is not a directory or cannot be created.
std::filesystem::path make_output_directory(const std::string& dir);

#ifndef __CUDACC__
/// The text of one output file, gathered by `write_output_file`'s writer with fmt-style `print`.
class OutputFile {
 public:
  template <class... Args>
  void print(fmt::format_string<Args...> format, Args&&... args) {
    fmt::format_to(std::back_inserter(text_), format, std::forward<Args>(args)...);
  }
  const std::string& text() const { return text_; }

 private:
  std::string text_;
};

/// Writes the file `path`: `writer` prints its text into an OutputFile, then the text is written and the
/// file closed, each step checked. Throws af::Error naming the file and the reason (no such directory,
/// permission denied, no space left on the device) when any step fails; nothing is written if `writer`
/// throws.
void write_output_file(const std::filesystem::path& path, const std::function<void(OutputFile&)>& writer);

/// `n` with its digits in groups of three, as the text writes counts: 131072 -> "131,072", -4096 -> "-4,096".
std::string with_thousands(std::int64_t n);

/// The numbers a chapter's text quotes, each under a name, so that no number the program computes is typed
/// into the prose by hand. `write` puts them in `numbers.json` in the --out directory; the book build reads
/// every chapter's file and offers each number to the chapter's Markdown as the MyST substitution
/// `{{ chNN_name }}` (NN the chapter's number), so the page shows what this build's run printed. A name the
/// page uses and the program did not write fails the book build.
class BookNumbers {
 public:
  /// Records `value` (already formatted as the page should show it) under `name`: lower-case letters,
  /// digits and underscores, starting with a letter. Throws af::Error on a bad or repeated name.
  void set(std::string_view name, std::string value);

  /// Records the fmt-formatted text under `name`, e.g. `numbers.print("speedup", "{:.2f}", ratio)`.
  template <class... Args>
  void print(std::string_view name, fmt::format_string<Args...> format, Args&&... args) {
    set(name, fmt::format(format, std::forward<Args>(args)...));
  }

  /// Writes `numbers.json` (one JSON object of strings, names sorted) into `directory`.
  void write(const std::filesystem::path& directory) const;

  const std::map<std::string, std::string, std::less<>>& values() const { return values_; }

 private:
  std::map<std::string, std::string, std::less<>> values_;
};
#endif  // __CUDACC__

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
