#include "af/program.hpp"

#include "af/compare.hpp"
#include "af/error.hpp"

#include <fmt/format.h>
#include <unistd.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <stdexcept>
#include <system_error>

namespace af {

namespace {

namespace fs = std::filesystem;

/// The directory a new `path` would be created in: its parent, ignoring trailing separators ("a/b/" is
/// created in "a"); the current directory for a bare name.
fs::path parent_directory(fs::path path) {
  while (!path.has_filename() && path.has_relative_path()) path = path.parent_path();
  const fs::path parent = path.parent_path();
  return parent.empty() ? fs::path(".") : parent;
}

/// Why `dir` cannot serve as the --out directory, or an empty string when it can.
std::string output_directory_problem(const std::string& dir) {
  if (dir.empty()) return "an empty path (expected a directory)";
  const fs::path path(dir);
  std::error_code ignored;
  const fs::file_status status = fs::status(path, ignored);
  if (fs::exists(status)) {
    if (!fs::is_directory(status)) return fmt::format("{} exists and is not a directory (expected a directory)", dir);
    if (::access(path.c_str(), W_OK | X_OK) != 0)
      return fmt::format("{} is a directory this program cannot write in ({})", dir, std::strerror(errno));
    return {};
  }
  if (!fs::status_known(status)) return fmt::format("{} cannot be examined (expected a directory)", dir);
  const fs::path parent = parent_directory(path);
  if (!fs::is_directory(fs::status(parent, ignored)))
    return fmt::format(
        "{} does not exist, and its parent {} is not an existing directory (expected an existing directory, or a "
        "new one inside an existing directory: only the last component is created)",
        dir, parent.string());
  if (::access(parent.c_str(), W_OK | X_OK) != 0)
    return fmt::format("{} does not exist and cannot be created in {} ({})", dir, parent.string(),
                       std::strerror(errno));
  return {};
}

}  // namespace

CLI::Validator finite_range(double lo, double hi) {
  return CLI::Validator(
      [lo, hi](std::string& input) -> std::string {
        const char* begin = input.c_str();
        char* end = nullptr;
        const double value = std::strtod(begin, &end);
        if (input.empty() || end != begin + input.size())
          return fmt::format("{} is not a number (expected a finite number in [{}, {}])", input, lo, hi);
        if (!std::isfinite(value))
          return fmt::format("{} is not finite (expected a number in [{}, {}])", input, lo, hi);
        if (value < lo || value > hi) return fmt::format("{} is outside [{}, {}]", input, lo, hi);
        return {};
      },
      fmt::format("FINITE in [{} - {}]", lo, hi));
}

void require_product_within(std::initializer_list<FlagValue> flags, double limit) {
  double product = 1.0;
  std::string named;
  for (const FlagValue& f : flags) {
    product *= static_cast<double>(f.value);
    named += fmt::format("{}{} {}", named.empty() ? "" : " x ", f.flag, f.value);
  }
  if (!(product <= limit))
    fail("{} = {:.0f} is above {:.0f}, the largest product this program runs in seconds (lower one of them)", named,
         product, limit);
}

CLI::Validator seed_value() {
  return CLI::Validator(
      [](std::string& input) -> std::string {
        const bool digits_only = !input.empty() && input.find_first_not_of("0123456789") == std::string::npos &&
                                 (input == "0" || input[0] != '0');
        std::uint64_t value = 0;
        const auto [end, error] = std::from_chars(input.data(), input.data() + input.size(), value);
        if (!digits_only || error != std::errc() || end != input.data() + input.size())
          return fmt::format(
              "{} is not a seed (expected a decimal integer from 0 to {}, without sign or leading zeros)", input,
              UINT64_MAX);
        return {};
      },
      fmt::format("UINT in [0 - {}]", UINT64_MAX));
}

CLI::Validator output_directory() {
  return CLI::Validator([](std::string& input) { return output_directory_problem(input); }, "DIR");
}

fs::path make_output_directory(const std::string& dir) {
  if (const std::string problem = output_directory_problem(dir); !problem.empty()) fail("--out: {}", problem);
  const fs::path path(dir);
  std::error_code error;
  if (!fs::is_directory(path, error) && !fs::create_directory(path, error) && error)
    fail("--out: cannot create the directory {} ({})", dir, error.message());
  return path;
}

void write_output_file(const fs::path& path, const std::function<void(OutputFile&)>& writer) {
  OutputFile file;
  writer(file);
  std::FILE* stream = std::fopen(path.c_str(), "w");
  if (stream == nullptr) fail("cannot open {} for writing ({})", path.string(), std::strerror(errno));
  const std::string& text = file.text();
  const auto last_error = [] { return errno != 0 ? errno : EIO; };  // a failed call that left errno unset: EIO
  int error = 0;
  errno = 0;
  if (std::fwrite(text.data(), 1, text.size(), stream) != text.size()) error = last_error();
  if (error == 0 && std::fflush(stream) != 0) error = last_error();
  if (std::fclose(stream) != 0 && error == 0) error = last_error();
  if (error != 0) fail("cannot write {} ({})", path.string(), std::strerror(error));
}

std::string with_thousands(std::int64_t n) {
  std::string digits = std::to_string(n);
  const std::ptrdiff_t first_digit = n < 0 ? 1 : 0;
  for (auto i = static_cast<std::ptrdiff_t>(digits.size()) - 3; i > first_digit; i -= 3)
    digits.insert(static_cast<std::size_t>(i), ",");
  return digits;
}

void BookNumbers::set(std::string_view name, std::string value) {
  const bool starts_with_letter = !name.empty() && name.front() >= 'a' && name.front() <= 'z';
  const bool word = std::all_of(name.begin(), name.end(),
                                [](char c) { return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_'; });
  if (!starts_with_letter || !word)
    fail("book number name '{}': expected lower-case letters, digits and underscores, starting with a letter", name);
  if (!values_.emplace(std::string(name), std::move(value)).second)
    fail("book number '{}' is set twice (expected each name once)", name);
}

void BookNumbers::write(const fs::path& directory) const {
  nlohmann::ordered_json object = nlohmann::ordered_json::object();
  for (const auto& [name, value] : values_) object[name] = value;
  write_output_file(directory / "numbers.json", [&](OutputFile& file) { file.print("{}\n", object.dump(2)); });
}

int run_program(CLI::App& app, int argc, char** argv, const std::function<bool()>& body) {
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& help) {
    return app.exit(help);
  } catch (const CLI::ParseError& error) {
    fmt::print(stderr, "{}: {}\nRun with --help for the flags and their ranges.\n", app.get_name(), error.what());
    return 2;
  } catch (const std::exception& error) {
    fmt::print(stderr, "{}: error while reading the flags: {}\n", app.get_name(), error.what());
    return 2;
  }
  // Whatever `body` throws ends the program with a message and exit status 2, never an abort: an af::Error
  // (a bad combination of flags, a file that cannot be written), or anything from the standard library.
  try {
    return body() ? 0 : 1;
  } catch (const Error& error) {
    fmt::print(stderr, "{}: {}\n", app.get_name(), error.what());
  } catch (const std::bad_alloc&) {
    fmt::print(stderr, "{}: out of memory (std::bad_alloc): the sizes asked for do not fit in this machine\n",
               app.get_name());
  } catch (const std::exception& error) {
    fmt::print(stderr, "{}: error: {}\n", app.get_name(), error.what());
  } catch (...) {
    fmt::print(stderr, "{}: error: an exception that is not a std::exception\n", app.get_name());
  }
  return 2;
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
  fmt::print("check  {:<48} {}{}\n", what, condition ? "PASS" : "FAIL",
             perturb ? "  (perturbed by AF_PERTURB_CHECK)" : "");
  return condition;
}

}  // namespace af
