#include "af/safetensors.hpp"
#include "oracle.hpp"

#include <fmt/format.h>
#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <sys/wait.h>
#include <algorithm>
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

TEST_CASE("oracle_check exits 1 when one selected index of a deepseek_v32 case is changed", "[oracle][dsa]") {
  const fs::path source = fs::path(ORACLE_CASES) / "deepseek_v32_k4";
  const fs::path dir = fs::temp_directory_path() / "af_test_oracle" / "dsa_selection_changed";
  fs::remove_all(dir);
  fs::create_directories(dir.parent_path());
  fs::copy(source, dir, fs::copy_options::recursive);
  CHECK(oracle_check_status(dir) == 0);  // the untouched copy passes

  const auto file = af::SafetensorsFile::read(dir / "tensors.safetensors");
  af::SafetensorsWriter writer;
  for (const auto& name : file.names())
    if (name != "expected.selected.decode") writer.add_stored(name, file.stored(name));
  const auto& stored = file.stored("expected.selected.decode");
  std::vector<std::int64_t> indices = file.integers("expected.selected.decode");
  const std::int64_t k = stored.shape.back();
  // Decode row 0 sees keys 0 .. prefill_len: swap its first chosen index for one it did not choose.
  const std::int64_t visible =
      nlohmann::json::parse(std::ifstream(dir / "case.json")).at("prefill_len").get<std::int64_t>() + 1;
  std::int64_t unchosen = 0;
  while (std::find(indices.begin(), indices.begin() + k, unchosen) != indices.begin() + k) ++unchosen;
  REQUIRE(unchosen < visible);
  indices[0] = unchosen;
  writer.add_integers("expected.selected.decode", stored.shape, indices);
  writer.write(dir / "tensors.safetensors");
  CHECK(oracle_check_status(dir) == 1);
  std::ifstream log(dir.string() + ".log");
  const std::string text{std::istreambuf_iterator<char>(log), std::istreambuf_iterator<char>()};
  CHECK_THAT(text, Catch::Matchers::Contains("decode rows differ 1"));
}

namespace {

// A fresh copy of the committed case `name`, to break.
fs::path copy_named_case(const std::string& name, const std::string& copy) {
  const fs::path dir = fs::temp_directory_path() / "af_test_oracle" / copy;
  fs::remove_all(dir);
  fs::create_directories(dir.parent_path());
  fs::copy(fs::path(ORACLE_CASES) / name, dir, fs::copy_options::recursive);
  return dir;
}

std::string log_of(const fs::path& dir) {
  std::ifstream log(dir.string() + ".log");
  return {std::istreambuf_iterator<char>(log), std::istreambuf_iterator<char>()};
}

}  // namespace

TEST_CASE("oracle_check exits 1 when one block index of a flex BlockMask table is changed", "[oracle][flex]") {
  const fs::path dir = copy_named_case("flex_block_mask_local_global_b3", "flex_block_changed");
  CHECK(oracle_check_status(dir) == 0);  // the untouched copy passes
  const auto file = af::SafetensorsFile::read(dir / "tensors.safetensors");
  af::SafetensorsWriter writer;
  for (const auto& name : file.names())
    if (name != "expected.selected.kv_blocks") writer.add_stored(name, file.stored(name));
  std::vector<std::int64_t> blocks = file.integers("expected.selected.kv_blocks");
  // Query block 0 visits key block 0 only (a partial block: the causal edge runs through it); say it visits 1.
  REQUIRE(blocks.at(0) == 0);
  blocks[0] = 1;
  writer.add_integers("expected.selected.kv_blocks", file.stored("expected.selected.kv_blocks").shape, blocks);
  writer.write(dir / "tensors.safetensors");
  CHECK(oracle_check_status(dir) == 1);
  CHECK_THAT(log_of(dir), Catch::Matchers::Contains("kv_blocks rows differ 1"));
}

TEST_CASE("oracle_check exits 1 when a gpt-oss sink logit differs from the one the reference used", "[oracle][sinks]") {
  const fs::path dir = copy_named_case("gpt_oss_sliding_w4_yarn_offset", "gpt_oss_sink_changed");
  CHECK(oracle_check_status(dir) == 0);
  rewrite_tensors(dir, [](auto& floats) { floats.at("sinks").data()[1] += 0.1f; });
  CHECK(oracle_check_status(dir) == 1);
}

TEST_CASE("oracle_check exits 2 on a yarn field or rope type it does not know, naming it", "[oracle][yarn]") {
  SECTION("an unknown yarn field") {
    const fs::path dir = copy_named_case("gpt_oss_full_yarn_mscale", "yarn_unknown_field");
    nlohmann::json root = nlohmann::json::parse(std::ifstream(dir / "case.json"));
    root["config"]["rope_parameters"]["low_freq_factor"] = 1.0;
    std::ofstream(dir / "case.json") << root.dump(2);
    CHECK(oracle_check_status(dir) == 2);
    CHECK_THAT(log_of(dir), Catch::Matchers::Contains("low_freq_factor"));
  }
  SECTION("a yarn field of the wrong type") {
    const fs::path dir = copy_named_case("gpt_oss_full_yarn_mscale", "yarn_wrong_type");
    nlohmann::json root = nlohmann::json::parse(std::ifstream(dir / "case.json"));
    root["config"]["rope_parameters"]["beta_fast"] = "fast";
    std::ofstream(dir / "case.json") << root.dump(2);
    CHECK(oracle_check_status(dir) == 2);
    CHECK_THAT(log_of(dir), Catch::Matchers::Contains("beta_fast"));
  }
  SECTION("an unknown rope type") {
    const fs::path dir = copy_named_case("gpt_oss_full_yarn_mscale", "rope_type_unknown");
    nlohmann::json root = nlohmann::json::parse(std::ifstream(dir / "case.json"));
    root["config"]["rope_parameters"]["rope_type"] = "longrope";
    std::ofstream(dir / "case.json") << root.dump(2);
    CHECK(oracle_check_status(dir) == 2);
    CHECK_THAT(log_of(dir), Catch::Matchers::Contains("longrope"));
  }
  SECTION("a yarn setting read wrongly changes the result") {
    const fs::path dir = copy_named_case("gpt_oss_full_yarn_mscale", "yarn_mscale_changed");
    nlohmann::json root = nlohmann::json::parse(std::ifstream(dir / "case.json"));
    root["config"]["rope_parameters"]["mscale_all_dim"] = 1.0;  // attention factor 1 instead of the ratio
    std::ofstream(dir / "case.json") << root.dump(2);
    CHECK(oracle_check_status(dir) == 1);
  }
}
