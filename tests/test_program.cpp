#include "af/error.hpp"
#include "af/program.hpp"

#include <catch2/catch.hpp>

#include <filesystem>
#include <fstream>
#include <iterator>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

using Catch::Matchers::Contains;
namespace fs = std::filesystem;

namespace {

/// A fresh, empty scratch directory for one test.
fs::path scratch_dir(const std::string& name) {
  const fs::path dir = fs::temp_directory_path() / "af_test_program" / name;
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

/// Parses `args` (after the program name) with one option checked by `validator`; returns run_program's status.
int parse_with(const CLI::Validator& validator, const std::vector<std::string>& args) {
  CLI::App app{"test", "test_program"};
  std::string value;
  app.add_option("--value", value)->check(validator);
  std::vector<std::string> storage = {"test_program"};
  storage.insert(storage.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (std::string& arg : storage) argv.push_back(arg.data());
  return af::run_program(app, static_cast<int>(argv.size()), argv.data(), [] { return true; });
}

/// run_program with no flags and the given body.
int run_body(const std::function<bool()>& body) {
  CLI::App app{"test", "test_program"};
  std::string name = "test_program";
  char* argv[] = {name.data()};
  return af::run_program(app, 1, argv, body);
}

/// The validator's complaint about `input`, empty when it accepts it.
std::string complaint(const CLI::Validator& validator, std::string input) { return validator(input); }

}  // namespace

TEST_CASE("finite_range accepts finite numbers in range and rejects NaN, infinity and the rest", "[program]") {
  const CLI::Validator range = af::finite_range(0.5, 10.0);
  for (const char* good : {"0.5", "1", "10", "1e1", "2.25"}) CHECK(complaint(range, good).empty());
  for (const char* bad : {"nan", "NaN", "-nan", "inf", "-inf", "infinity", "1e400", "0.49", "10.5", "", "1x", "x"})
    CHECK_FALSE(complaint(range, bad).empty());
  CHECK_THAT(complaint(range, "nan"), Contains("nan") && Contains("not finite"));
  CHECK_THAT(complaint(range, "11"), Contains("11") && Contains("[0.5, 10]"));
  CHECK(parse_with(range, {"--value", "nan"}) == 2);
  CHECK(parse_with(range, {"--value", "inf"}) == 2);
  CHECK(parse_with(range, {"--value", "3"}) == 0);
}

TEST_CASE("seed_value accepts every 64-bit unsigned integer and nothing that would wrap", "[program]") {
  const CLI::Validator seed = af::seed_value();
  for (const char* good : {"0", "1", "42", "18446744073709551615"}) CHECK(complaint(seed, good).empty());
  for (const char* bad :
       {"-1", "18446744073709551616", "99999999999999999999999", "+1", "010", "0x10", "1.5", "", " 1", "1e3"})
    CHECK_FALSE(complaint(seed, bad).empty());
  CHECK_THAT(complaint(seed, "-1"), Contains("-1") && Contains("18446744073709551615"));
  CHECK(parse_with(seed, {"--value", "-1"}) == 2);
  CHECK(parse_with(seed, {"--value", "7"}) == 0);
}

TEST_CASE("output_directory and make_output_directory create only the last component", "[program][files]") {
  const fs::path dir = scratch_dir("out");
  const CLI::Validator out = af::output_directory();
  CHECK(complaint(out, dir.string()).empty());                  // exists
  CHECK(complaint(out, (dir / "new").string()).empty());        // its parent exists
  CHECK(complaint(out, (dir / "new").string() + "/").empty());  // a trailing separator changes nothing
  CHECK_THAT(complaint(out, (dir / "a" / "b").string()), Contains("is not an existing directory"));
  CHECK_THAT(complaint(out, ""), Contains("empty"));
  std::ofstream(dir / "file") << "x";
  CHECK_THAT(complaint(out, (dir / "file").string()), Contains("not a directory"));
  CHECK_FALSE(complaint(out, (dir / "file" / "x").string()).empty());
  CHECK_FALSE(complaint(out, "/dev/full").empty());
  CHECK_FALSE(complaint(out, "/dev/full/x").empty());

  CHECK(af::make_output_directory((dir / "new").string()) == dir / "new");
  CHECK(fs::is_directory(dir / "new"));
  CHECK(af::make_output_directory((dir / "new").string()) == dir / "new");  // a second time: already there
  CHECK_THROWS_WITH(af::make_output_directory((dir / "a" / "b").string()), Contains((dir / "a").string()));
  CHECK_FALSE(fs::exists(dir / "a"));
  CHECK_THROWS_AS(af::make_output_directory((dir / "file").string()), af::Error);
}

TEST_CASE("write_output_file writes the text, or throws af::Error naming the file", "[program][files]") {
  const fs::path dir = scratch_dir("write");
  af::write_output_file(dir / "data.dat", [](af::OutputFile& file) {
    file.print("# x y\n");
    for (int i = 0; i < 3; ++i) file.print("{} {}\n", i, i * i);
  });
  std::ifstream in(dir / "data.dat");
  CHECK(std::string(std::istreambuf_iterator<char>(in), {}) == "# x y\n0 0\n1 1\n2 4\n");

  // A full device: the write or the close fails with ENOSPC, which must not pass silently.
  CHECK_THROWS_WITH(af::write_output_file("/dev/full", [](af::OutputFile& file) { file.print("{}\n", 1); }),
                    Contains("/dev/full") && Contains("space"));
  CHECK_THROWS_WITH(af::write_output_file(dir / "missing" / "data.dat", [](af::OutputFile& file) { file.print("1"); }),
                    Contains("missing/data.dat"));
  // A writer that throws leaves no file behind.
  CHECK_THROWS_AS(af::write_output_file(dir / "never.dat", [](af::OutputFile&) { throw af::Error("no"); }), af::Error);
  CHECK_FALSE(fs::exists(dir / "never.dat"));
}

TEST_CASE("with_thousands groups digits in threes, signs included", "[program]") {
  CHECK(af::with_thousands(0) == "0");
  CHECK(af::with_thousands(999) == "999");
  CHECK(af::with_thousands(1000) == "1,000");
  CHECK(af::with_thousands(131072) == "131,072");
  CHECK(af::with_thousands(-4096) == "-4,096");
  CHECK(af::with_thousands(-999) == "-999");
  CHECK(af::with_thousands(1234567890) == "1,234,567,890");
}

TEST_CASE("BookNumbers writes named numbers as JSON and refuses bad or repeated names", "[program][files]") {
  const fs::path dir = scratch_dir("numbers");
  af::BookNumbers numbers;
  numbers.print("speedup", "{:.2f}", 3.14159);
  numbers.set("a_quote", "say \"2\" \\ 1");
  CHECK(numbers.values().at("speedup") == "3.14");
  numbers.write(dir);
  std::ifstream in(dir / "numbers.json");
  CHECK(std::string(std::istreambuf_iterator<char>(in), {}) ==
        "{\n  \"a_quote\": \"say \\\"2\\\" \\\\ 1\",\n  \"speedup\": \"3.14\"\n}\n");
  CHECK_THROWS_WITH(numbers.set("speedup", "1"), Contains("'speedup' is set twice"));
  for (const char* bad : {"", "Upper", "9lives", "has-dash", "has space"})
    CHECK_THROWS_WITH(numbers.set(bad, "1"), Contains("expected lower-case letters"));
}

TEST_CASE("run_program turns every exception into exit status 2 and a failed check into 1", "[program]") {
  CHECK(run_body([] { return true; }) == 0);
  CHECK(run_body([] { return false; }) == 1);
  CHECK(run_body([]() -> bool { throw af::Error("bad value"); }) == 2);
  CHECK(run_body([]() -> bool { throw std::runtime_error("from the standard library"); }) == 2);
  CHECK(run_body([]() -> bool { throw std::bad_alloc(); }) == 2);
  CHECK(run_body([]() -> bool { throw 42; }) == 2);
}

TEST_CASE("require_product_within names the flags, their product and the limit", "[program]") {
  CHECK_NOTHROW(af::require_product_within({{"--seq-len", 64}, {"--hidden", 16}}, 1024));
  CHECK_THROWS_WITH(af::require_product_within({{"--seq-len", 64}, {"--hidden", 17}}, 1024),
                    Contains("--seq-len 64 x --hidden 17 = 1088") && Contains("1024"));
}
