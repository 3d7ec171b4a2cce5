#include "af/safetensors.hpp"
#include "oracle.hpp"

#include <fmt/format.h>
#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <sys/wait.h>
#include <cstdlib>
#include <filesystem>
#include <fstream>

namespace fs = std::filesystem;

namespace {

const fs::path source_case = fs::path(ORACLE_CASES) / "sdpa_single_head_bias_scale";

// A fresh copy of a committed case to break.
fs::path copy_case(const std::string& name) {
  const fs::path dir = fs::temp_directory_path() / "af_test_oracle" / name;
  fs::remove_all(dir);
  fs::create_directories(dir.parent_path());
  fs::copy(source_case, dir, fs::copy_options::recursive);
  return dir;
}

int oracle_check_status(const fs::path& dir) {
  const int status =
      std::system(fmt::format("'{}' '{}' > '{}.log' 2>&1", ORACLE_CHECK, dir.string(), dir.string()).c_str());
  REQUIRE(WIFEXITED(status));
  return WEXITSTATUS(status);
}

// Rewrites the case's tensors, letting `edit` change, drop or add entries first.
void rewrite_tensors(const fs::path& dir, const std::function<void(std::map<std::string, af::Tensor>&)>& edit) {
  const auto file = af::SafetensorsFile::read(dir / "tensors.safetensors");
  std::map<std::string, af::Tensor> floats;
  af::SafetensorsWriter writer;
  for (const auto& name : file.names()) {
    if (file.stored(name).dtype == af::DType::i64)
      writer.add_stored(name, file.stored(name));
    else
      floats.emplace(name, file.tensor(name));
  }
  edit(floats);
  for (const auto& [name, tensor] : floats) writer.add(name, tensor);
  writer.write(dir / "tensors.safetensors");
}

}  // namespace

TEST_CASE("oracle_check passes an untouched copy of a case", "[oracle]") {
  CHECK(oracle_check_status(copy_case("untouched")) == 0);
}

TEST_CASE("oracle_check exits 1 when an expected output is perturbed", "[oracle]") {
  for (const std::string tensor : {"expected.prefill", "expected.decode"}) {
    const fs::path dir = copy_case("perturbed_" + tensor);
    rewrite_tensors(dir, [&](auto& floats) { floats.at(tensor).data()[3] += 0.01f; });  // 25x the tolerance
    CHECK(oracle_check_status(dir) == 1);
  }
}

TEST_CASE("oracle_check exits 1 when a weight differs from the one the reference used", "[oracle]") {
  const fs::path dir = copy_case("other_weight");
  // (Not k_proj.bias: a key bias adds q . b to every score of a query alike, which the softmax cancels.)
  rewrite_tensors(dir, [](auto& floats) { floats.at("q_proj.bias").data()[0] += 0.1f; });
  CHECK(oracle_check_status(dir) == 1);
}

TEST_CASE("oracle_check exits 2 and names what is missing in a malformed case", "[oracle]") {
  SECTION("a missing tensor") {
    const fs::path dir = copy_case("missing_tensor");
    rewrite_tensors(dir, [](auto& floats) { floats.erase("v_proj.weight"); });
    CHECK(oracle_check_status(dir) == 2);
    std::ifstream log(dir.string() + ".log");
    const std::string text{std::istreambuf_iterator<char>(log), std::istreambuf_iterator<char>()};
    CHECK_THAT(text, Catch::Matchers::Contains("v_proj.weight"));
  }
  SECTION("a missing config field") {
    const fs::path dir = copy_case("missing_field");
    nlohmann::json root = nlohmann::json::parse(std::ifstream(dir / "case.json"));
    root["config"].erase("head_dim");
    std::ofstream(dir / "case.json") << root.dump(2);
    CHECK(oracle_check_status(dir) == 2);
  }
  SECTION("an unknown reference") {
    const fs::path dir = copy_case("unknown_reference");
    nlohmann::json root = nlohmann::json::parse(std::ifstream(dir / "case.json"));
    root["reference"] = "no_such_model";
    std::ofstream(dir / "case.json") << root.dump(2);
    CHECK(oracle_check_status(dir) == 2);
  }
  SECTION("a weight of the wrong shape") {
    const fs::path dir = copy_case("wrong_shape");
    rewrite_tensors(dir, [](auto& floats) {
      floats.at("o_proj.weight") = af::Tensor(af::Shape{3, 3}, std::vector<float>(9, 1.0f));
    });
    CHECK(oracle_check_status(dir) == 2);
  }
}

TEST_CASE("A case is read with its fields and tolerance", "[oracle]") {
  const oracle::Case c = oracle::read_case(source_case);
  CHECK(c.reference == "sdpa");
  CHECK(c.prefill_len >= 1);
  CHECK(c.max_abs > 0.0);
  CHECK(c.relative_to_expected);
  CHECK_THROWS_AS(c.config_int("no_such_field"), oracle::CaseError);
}
