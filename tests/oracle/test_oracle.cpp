#include "af/compare.hpp"
#include "af/safetensors.hpp"
#include "oracle.hpp"

#include <fmt/format.h>
#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <sys/wait.h>
#include <unistd.h>
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>

namespace fs = std::filesystem;

namespace {

const fs::path source_case = fs::path(ORACLE_CASES) / "sdpa_single_head_bias_scale";

// Where the broken copies go: one folder per test process, so that concurrent runs (CTest in parallel, two
// checkouts on one machine) never share a copy.
fs::path scratch_root() { return fs::temp_directory_path() / fmt::format("af_test_oracle_{}", ::getpid()); }

// Removes the process's copies when the tests end.
struct ScratchCleanup {
  ~ScratchCleanup() {
    std::error_code ignored;
    fs::remove_all(scratch_root(), ignored);
  }
} scratch_cleanup;

// A fresh copy of the committed case `name`, to break.
fs::path copy_named_case(const std::string& name, const std::string& copy) {
  const fs::path dir = scratch_root() / copy;
  fs::remove_all(dir);
  fs::create_directories(dir.parent_path());
  fs::copy(fs::path(ORACLE_CASES) / name, dir, fs::copy_options::recursive);
  return dir;
}

// A fresh copy of sdpa_single_head_bias_scale to break.
fs::path copy_case(const std::string& copy) { return copy_named_case(source_case.filename().string(), copy); }

int oracle_check_status(const fs::path& dir) {
  const int status =
      std::system(fmt::format("'{}' '{}' > '{}.log' 2>&1", ORACLE_CHECK, dir.string(), dir.string()).c_str());
  REQUIRE(WIFEXITED(status));
  return WEXITSTATUS(status);
}

std::string log_of(const fs::path& dir) {
  std::ifstream log(dir.string() + ".log");
  return {std::istreambuf_iterator<char>(log), std::istreambuf_iterator<char>()};
}

// Rewrites the case's tensors, letting `edit` change, drop or add float entries first (integer tensors are kept).
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

// Rewrites the integer tensor `name` (int64) of the case after `edit` changed its values.
void rewrite_integers(const fs::path& dir, const std::string& name,
                      const std::function<void(std::vector<std::int64_t>&)>& edit) {
  const auto file = af::SafetensorsFile::read(dir / "tensors.safetensors");
  af::SafetensorsWriter writer;
  for (const auto& other : file.names())
    if (other != name) writer.add_stored(other, file.stored(other));
  std::vector<std::int64_t> values = file.integers(name);
  edit(values);
  writer.add_integers(name, file.stored(name).shape, values);
  writer.write(dir / "tensors.safetensors");
}

nlohmann::json read_json(const fs::path& dir) { return nlohmann::json::parse(std::ifstream(dir / "case.json")); }

// Rewrites case.json after `edit` changed it.
void edit_json(const fs::path& dir, const std::function<void(nlohmann::json&)>& edit) {
  nlohmann::json root = read_json(dir);
  edit(root);
  std::ofstream(dir / "case.json") << root.dump(2);
}

// Replaces the text `from` (which must occur in case.json) by `to`: for JSON that nlohmann would not write (a number
// too large for any integer type, a nesting bomb).
void edit_json_text(const fs::path& dir, const std::string& from, const std::string& to) {
  std::ifstream in(dir / "case.json");
  std::string text{std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
  in.close();
  const auto at = text.find(from);
  REQUIRE(at != std::string::npos);
  text.replace(at, from.size(), to);
  std::ofstream(dir / "case.json") << text;
}

// oracle_check on a copy of `source` broken by `edit` must exit 2 and name the copy and `field` in its message.
void require_malformed(const std::string& source, const std::string& copy,
                       const std::function<void(const fs::path&)>& edit, const std::string& field) {
  INFO(copy << ": expected a MALFORMED case naming " << field);
  const fs::path dir = copy_named_case(source, copy);
  edit(dir);
  CHECK(oracle_check_status(dir) == 2);
  const std::string text = log_of(dir);
  INFO(text);
  CHECK_THAT(text, Catch::Matchers::Contains(copy + ": ") && Catch::Matchers::Contains(field) &&
                       Catch::Matchers::Contains("MALFORMED"));
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
    CHECK_THAT(log_of(dir), Catch::Matchers::Contains("v_proj.weight"));
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
  const fs::path dir = copy_named_case("deepseek_v32_k4", "dsa_selection_changed");
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
  CHECK_THAT(log_of(dir), Catch::Matchers::Contains("decode rows differ 1"));
}

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

TEST_CASE("oracle_check exits 1 when a Gated DeltaNet case's convolution, decay or gate input differs",
          "[oracle][delta]") {
  // One tap of the causal convolution (its cached inputs carry it into the decode steps), one head's decay
  // rate (A_log), one head's decay bias (dt_bias) and one channel of the gated norm: each moves the outputs.
  for (const auto& [tensor, index, delta] : {std::tuple{"conv1d.weight", 5, 0.1f}, std::tuple{"A_log", 1, 0.2f},
                                             std::tuple{"dt_bias", 2, 0.2f}, std::tuple{"norm.weight", 3, 0.1f}}) {
    const fs::path dir = copy_named_case("qwen3_next_gdn_hk2_hv4", std::string("qwen3_next_changed_") + tensor);
    CHECK(oracle_check_status(dir) == 0);
    rewrite_tensors(dir, [&](auto& floats) { floats.at(tensor).data()[index] += delta; });
    INFO(tensor);
    CHECK(oracle_check_status(dir) == 1);
  }
}

TEST_CASE("oracle_check exits 1 when one channel of a KDA case's per-channel decay differs", "[oracle][delta]") {
  // dt_bias holds one entry per key channel of every head: changing one moves only that channel's decay.
  const fs::path dir = copy_named_case("kimi_linear_kda_h2", "kimi_linear_channel_decay_changed");
  CHECK(oracle_check_status(dir) == 0);
  rewrite_tensors(dir, [](auto& floats) { floats.at("forget_gate.dt_bias").data()[5] += 0.5f; });
  CHECK(oracle_check_status(dir) == 1);
}

TEST_CASE("oracle_check exits 1 when a Gemma 3n reader's handed-over key differs, 2 when its source disagrees",
          "[oracle][gemma3n]") {
  const fs::path key = copy_named_case("gemma3n_shared_sliding_w4", "gemma3n_shared_key");
  rewrite_tensors(key, [](auto& t) {
    af::Tensor& keys = t.at("input.shared_keys");
    keys.data()[keys.numel() - 1] += 0.5f;
  });
  CHECK(oracle_check_status(key) == 1);
  const fs::path source = copy_named_case("gemma3n_shared_full", "gemma3n_shared_source");
  edit_json(source, [](nlohmann::json& root) { root["kv_shared_layer_index"] = 3; });
  CHECK(oracle_check_status(source) == 2);
  CHECK_THAT(log_of(source), Catch::Matchers::Contains("kv_shared_layer_index 3 (the sharing rule gives layer 2)"));
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

TEST_CASE("oracle_check exits 1 when a QK-norm gain, Gemma's scalar or rope base, or DeepSeek's YaRN mscale differs",
          "[oracle][qk_norm][yarn]") {
  SECTION("one channel of a Qwen3 key-norm gain") {
    const fs::path dir = copy_named_case("qwen3_qk_norm_gqa", "qwen3_k_norm_changed");
    rewrite_tensors(dir, [](std::map<std::string, af::Tensor>& t) { t.at("k_norm.weight").data()[3] += 0.2f; });
    CHECK(oracle_check_status(dir) == 1);
  }
  SECTION("one channel of a Gemma 3 query-norm gain") {
    const fs::path dir = copy_named_case("gemma3_sliding_w4_local_base", "gemma3_q_norm_changed");
    rewrite_tensors(dir, [](std::map<std::string, af::Tensor>& t) { t.at("q_norm.weight").data()[5] += 0.2f; });
    CHECK(oracle_check_status(dir) == 1);
  }
  for (const auto& [source, pointer, value] :
       {std::tuple{"gemma3_sliding_w4_local_base", "/config/query_pre_attn_scalar", 16.0},
        std::tuple{"gemma3_sliding_w4_local_base", "/config/rope_parameters/sliding_attention/rope_theta", 1e6},
        std::tuple{"gemma3_global_linear8_offset", "/config/rope_parameters/full_attention/factor", 1.0},
        std::tuple{"deepseek_v3_yarn", "/config/rope_parameters/mscale_all_dim", 0.0},
        std::tuple{"deepseek_v32_k4_yarn", "/config/rope_parameters/mscale_all_dim", 0.0}}) {
    INFO(source << " " << pointer);
    const fs::path dir = copy_named_case(source, std::string(source) + "_setting_changed");
    edit_json(dir, [&](nlohmann::json& r) { r[nlohmann::json::json_pointer(pointer)] = value; });
    CHECK(oracle_check_status(dir) == 1);
  }
}

TEST_CASE("oracle_check refuses a Gemma 3 case with attention softcapping, naming the field", "[oracle][qk_norm]") {
  const fs::path dir = copy_named_case("gemma3_global_linear8_offset", "gemma3_softcap");
  edit_json(dir, [](nlohmann::json& r) { r["config"]["attn_logit_softcapping"] = 50.0; });
  CHECK(oracle_check_status(dir) == 2);
  CHECK_THAT(log_of(dir), Catch::Matchers::Contains("attn_logit_softcapping"));
}

// ------------------------------------------------------------------------------------------------------------------
// Perturbations over every kind of reference: each must turn a passing case into a failing one (exit 1).

namespace {

struct Subject {
  std::string case_name;
  std::string query_weight;  ///< the weight whose rows are laid out head by head (swapped below)
  bool uses_positions;       ///< RoPE: a case that claims positions one later than the reference's must fail
};

const std::vector<Subject>& subjects() {
  static const std::vector<Subject> all = {
      {"sdpa_mha_h4", "q_proj.weight", false},
      {"sdpa_single_head_bias_scale", "", false},  // one head: nothing to swap
      {"llama_gqa", "q_proj.weight", true},
      {"deepseek_v3_q_lora", "q_b_proj.weight", true},
      {"deepseek_v32_k4", "q_b_proj.weight", true},
      {"deepseek_v4_csa", "q_b_proj.weight", true},
      {"mistral_window5_gqa", "q_proj.weight", true},
      {"gpt_oss_sliding_w4_yarn_offset", "q_proj.weight", true},
      {"minimax_lightning_layer2_block4", "qkv_proj.weight", false},  // per head [q | k | v]
      {"minimax_full_gqa_layer3", "q_proj.weight", true},
      {"sdpa_sinks_s2_w4_gqa", "q_proj.weight", false},
      {"flex_block_mask_strided_b4", "q_proj.weight", false},
      {"flex_block_mask_chunked_transformers_b4", "q_proj.weight", false},  // transformers' chunked mask
      {"qwen3_qk_norm_gqa", "q_proj.weight", true},
      {"qwen3_qk_norm_sliding_bias_offset", "q_proj.weight", true},
      {"gemma3_sliding_w4_local_base", "q_proj.weight", true},
      {"gemma3_global_linear8_offset", "q_proj.weight", true},
      {"deepseek_v3_yarn", "q_b_proj.weight", true},
      {"gemma3n_shared_sliding_w4", "q_proj.weight", true},  // reads layer 1's handed-over keys and values
      {"gemma3n_owner_sliding_w4", "q_proj.weight", true},
  };
  return all;
}

float& last_value(af::Tensor& t) { return t.data()[t.values().size() - 1]; }

}  // namespace

TEST_CASE("oracle_check fails a NaN or an infinity in an expected tensor, an input or a weight", "[oracle][nan]") {
  for (const Subject& subject : subjects()) {
    INFO(subject.case_name);
    const std::string& name = subject.case_name;
    CHECK(oracle_check_status(copy_named_case(name, name + "_untouched")) == 0);
    const std::vector<std::pair<std::string, std::function<void(std::map<std::string, af::Tensor>&)>>> edits = {
        {"nan_prefill", [](auto& t) { t.at("expected.prefill").data()[0] = std::nanf(""); }},
        {"nan_decode", [](auto& t) { last_value(t.at("expected.decode")) = std::nanf(""); }},
        {"inf_decode", [](auto& t) { t.at("expected.decode").data()[1] = std::numeric_limits<float>::infinity(); }},
        {"inf_prefill",
         [](auto& t) { last_value(t.at("expected.prefill")) = -std::numeric_limits<float>::infinity(); }},
        {"nan_input", [](auto& t) { t.at("input.hidden_states").data()[2] = std::nanf(""); }},
    };
    for (const auto& [label, edit] : edits) {
      const fs::path dir = copy_named_case(name, name + "_" + label);
      rewrite_tensors(dir, edit);
      CHECK(oracle_check_status(dir) == 1);
      CHECK_THAT(log_of(dir), Catch::Matchers::Contains("NaN or infinity in"));
    }
  }
}

TEST_CASE("oracle_check fails one changed element of a decode row, swapped heads and positions off by one",
          "[oracle][perturb]") {
  for (const Subject& subject : subjects()) {
    INFO(subject.case_name);
    const std::string& name = subject.case_name;
    const nlohmann::json root = read_json(fs::path(ORACLE_CASES) / name);
    const std::int64_t decode_steps = root.at("decode_steps").get<std::int64_t>();
    REQUIRE(decode_steps >= 1);

    {  // the last decode row, one element, by 20x the tolerance
      const fs::path dir = copy_named_case(name, name + "_decode_row");
      rewrite_tensors(dir, [](auto& t) {
        af::Tensor& decode = t.at("expected.decode");
        const double size =
            std::max({1.0, af::max_abs(decode.values()), af::max_abs(t.at("expected.prefill").values())});
        last_value(decode) += static_cast<float>(20 * 1e-4 * size);
      });
      CHECK(oracle_check_status(dir) == 1);
    }
    if (!subject.query_weight.empty()) {  // heads 0 and 1 of the query projection trade places
      const fs::path dir = copy_named_case(name, name + "_heads_swapped");
      const std::int64_t heads = root.at("config").at("num_attention_heads").get<std::int64_t>();
      REQUIRE(heads >= 2);
      rewrite_tensors(dir, [&](auto& t) {
        af::Tensor& w = t.at(subject.query_weight);
        const std::int64_t rows_per_head = w.dim(0) / heads, cols = w.dim(1);
        float* values = w.data();
        std::swap_ranges(values, values + rows_per_head * cols, values + rows_per_head * cols);
      });
      CHECK(oracle_check_status(dir) == 1);
    }
    {  // the decode steps claim positions one later than the reference saw: RoPE's relative distances change
      const fs::path dir = copy_named_case(name, name + "_decode_positions_shifted");
      const std::int64_t prefill_len = root.at("prefill_len").get<std::int64_t>();
      rewrite_integers(dir, "input.position_ids", [&](auto& ids) {
        for (std::size_t i = static_cast<std::size_t>(prefill_len); i < ids.size(); ++i) ++ids[i];
      });
      // A mechanism without positions (sdpa, sinks by cache order, lightning, flex) gives the same outputs.
      CHECK(oracle_check_status(dir) == (subject.uses_positions ? 1 : 0));
    }
    // position_ids that do not start at the case's own position_offset: malformed, whatever the mechanism.
    require_malformed(
        name, name + "_positions_disagree",
        [](const fs::path& dir) {
          edit_json(dir, [](nlohmann::json& r) { r["position_offset"] = r.value("position_offset", 0) + 1; });
        },
        "input.position_ids");
    require_malformed(
        name, name + "_position_absurd",
        [](const fs::path& dir) {
          rewrite_integers(dir, "input.position_ids", [](auto& ids) { ids.back() = std::int64_t{1} << 62; });
        },
        "input.position_ids");
  }
}

TEST_CASE("oracle_check exits 1 when one element of a delta-rule case's recorded cache differs", "[oracle][delta]") {
  // transformers keeps the convolution's last K inputs [1, C, K] (oldest first); the library the last K - 1, which
  // oracle_check compares with columns 1 .. K-1. Element 3 of the flat tensor is channel 0's newest input (column
  // K - 1 = 3 for K = 4), one the next output reads; element 5 of the recurrent state is S[head 0][0][5].
  for (const std::string name : {"qwen3_next_gdn_hk2_hv4", "qwen3_next_gdn_short_prefill", "kimi_linear_kda_h2"}) {
    {
      const fs::path dir = copy_named_case(name, name + "_untouched_states");
      CHECK(oracle_check_status(dir) == 0);
      const std::string text = log_of(dir);
      for (const std::string compared :
           {"prefill.conv_state", "prefill.recurrent_state", "final.conv_state", "final.recurrent_state"}) {
        INFO(text);
        CHECK_THAT(text, Catch::Matchers::Contains("cache " + compared + " ("));
      }
    }
    for (const auto& [tensor, index] : {std::pair<std::string, std::int64_t>{"expected.prefill.conv_state", 3},
                                        {"expected.prefill.recurrent_state", 5},
                                        {"expected.final.conv_state", 3},
                                        {"expected.final.recurrent_state", 5}}) {
      const fs::path dir = copy_named_case(name, name + "_changed_" + tensor);
      rewrite_tensors(dir, [&](auto& floats) { floats.at(tensor).data()[index] += 0.01f; });  // > 25x the tolerance
      INFO(name << " " << tensor);
      CHECK(oracle_check_status(dir) == 1);
      const std::string label = tensor.substr(std::string("expected.").size());
      const std::string text = log_of(dir);
      INFO(text);
      CHECK_THAT(text, Catch::Matchers::Contains("cache " + label + " (") && Catch::Matchers::Contains("FAIL"));
    }
  }
}

TEST_CASE("oracle_check leaves the oldest of transformers' K convolution inputs alone", "[oracle][delta]") {
  // The next output never reads it (the update shifts it out first), and the library does not keep it.
  const fs::path dir = copy_named_case("qwen3_next_gdn_hk2_hv4", "qwen3_next_oldest_conv_input_changed");
  rewrite_tensors(dir, [](auto& floats) { floats.at("expected.final.conv_state").data()[0] += 1.0f; });
  CHECK(oracle_check_status(dir) == 0);
}

TEST_CASE("oracle_check checks a delta-rule case without recorded states on its outputs alone", "[oracle][delta]") {
  // An older case records no cache: its lines say so, and it passes or fails on its outputs.
  const fs::path dir = copy_named_case("kimi_linear_kda_h2", "kimi_linear_no_states");
  rewrite_tensors(dir, [](auto& floats) {
    for (const char* when : {"prefill", "final"})
      for (const char* kind : {"conv_state", "recurrent_state"})
        floats.erase(fmt::format("expected.{}.{}", when, kind));
  });
  CHECK(oracle_check_status(dir) == 0);
  CHECK_THAT(log_of(dir),
             Catch::Matchers::Contains("cache final.recurrent_state not compared (the case has no expected.final"));
  // A recorded state of another shape is malformed, named.
  require_malformed(
      "qwen3_next_gdn_short_prefill", "qwen3_next_state_misshapen",
      [](const fs::path& d) {
        rewrite_tensors(d, [](auto& floats) {
          floats.at("expected.prefill.conv_state") = af::Tensor(af::Shape{1, 48, 3});  // K - 1 columns, not K
        });
      },
      "expected.prefill.conv_state");
}

TEST_CASE("A runner that returns nothing, NaN, the wrong shape or throws does not pass", "[oracle][runner]") {
  const auto table_of = [](const oracle::Runner& runner) {
    std::map<std::string, oracle::Runner> table;
    for (const auto& [reference, _] : oracle::runners()) table.emplace(reference, runner);
    return table;
  };
  for (const Subject& subject : subjects()) {
    INFO(subject.case_name);
    const fs::path dir = fs::path(ORACLE_CASES) / subject.case_name;
    REQUIRE(oracle::check_case(dir, oracle::runners()).verdict == oracle::Verdict::pass);

    const auto nothing =
        oracle::check_case(dir, table_of([](const oracle::Case&) { return std::vector<oracle::Outputs>{}; }));
    CHECK(nothing.verdict == oracle::Verdict::fail);
    CHECK_THAT(nothing.report, Catch::Matchers::Contains("returned no outputs"));

    const auto real = [](const oracle::Case& c) { return oracle::runners().at(c.reference)(c); };
    const auto nan_decode = oracle::check_case(dir, table_of([&](const oracle::Case& c) {
                                                 auto outputs = real(c);
                                                 outputs.back().decode.data()[0] = std::nanf("");
                                                 return outputs;
                                               }));
    CHECK(nan_decode.verdict == oracle::Verdict::fail);
    CHECK_THAT(nan_decode.report, Catch::Matchers::Contains("max abs error nan"));

    const auto wrong_shape = oracle::check_case(dir, table_of([&](const oracle::Case& c) {
                                                  auto outputs = real(c);
                                                  outputs.front().decode = af::Tensor(af::Shape{1, 1});
                                                  return outputs;
                                                }));
    CHECK(wrong_shape.verdict == oracle::Verdict::fail);

    const auto throws = oracle::check_case(
        dir, table_of([](const oracle::Case&) -> std::vector<oracle::Outputs> { throw std::out_of_range("map::at"); }));
    CHECK(throws.verdict == oracle::Verdict::malformed);
    CHECK_THAT(throws.report, Catch::Matchers::Contains(subject.case_name) && Catch::Matchers::Contains("map::at"));

    // A runner that reads a field without the strict readers: nlohmann's type error is caught, never an abort.
    const auto json_error = oracle::check_case(dir, table_of([](const oracle::Case& c) -> std::vector<oracle::Outputs> {
                                                 (void)c.root.at("prefill_len").get<std::string>();
                                                 return {};
                                               }));
    CHECK(json_error.verdict == oracle::Verdict::malformed);
    CHECK_THAT(json_error.report, Catch::Matchers::Contains(subject.case_name + ": a case.json field"));
  }
}

TEST_CASE("oracle_check says when a selection is not compared", "[oracle][selection]") {
  for (const auto& [name, selection] : std::vector<std::pair<std::string, std::string>>{
           {"deepseek_v32_k4", "decode"}, {"deepseek_v4_csa", "indexer"}, {"flex_block_mask_all_b5", "kv_blocks"}}) {
    const fs::path dir = copy_named_case(name, name + "_no_selection");
    const auto file = af::SafetensorsFile::read(dir / "tensors.safetensors");
    af::SafetensorsWriter writer;
    for (const auto& tensor : file.names())
      if (tensor != "expected.selected." + selection) writer.add_stored(tensor, file.stored(tensor));
    writer.write(dir / "tensors.safetensors");
    CHECK(oracle_check_status(dir) == 0);
    CHECK_THAT(log_of(dir), Catch::Matchers::Contains(selection + " not compared"));
  }
}

TEST_CASE("oracle_check reports a tensor that nothing reads as malformed", "[oracle][unread]") {
  require_malformed(
      "sdpa_mha_h4", "unread_extra",
      [](const fs::path& dir) {
        rewrite_tensors(dir, [](auto& t) { t.emplace("extra.scale", af::Tensor(af::Shape{2}, {1.0f, 2.0f})); });
      },
      "extra.scale");
  // The case says there are no biases but holds them: the runner would silently compute without them.
  require_malformed(
      "sdpa_single_head_bias_scale", "unread_biases",
      [](const fs::path& dir) { edit_json(dir, [](nlohmann::json& r) { r["config"]["attention_bias"] = false; }); },
      "q_proj.bias");
}

TEST_CASE("oracle_check reads the tolerance strictly", "[oracle][tolerance]") {
  SECTION("a plain number is the default relative form") {
    const fs::path dir = copy_case("tolerance_plain");
    edit_json(dir, [](nlohmann::json& r) { r["tolerance"] = 1e-4; });
    CHECK(oracle_check_status(dir) == 0);
    CHECK(oracle::read_case(dir).relative_to_expected);
    CHECK(oracle::read_case(dir).max_abs == 1e-4);
  }
  SECTION("an absolute bound") {
    const fs::path dir = copy_case("tolerance_absolute");
    edit_json(dir, [](nlohmann::json& r) { r["tolerance"]["relative_to"] = nullptr; });
    CHECK(oracle_check_status(dir) == 0);
    CHECK_FALSE(oracle::read_case(dir).relative_to_expected);
  }
  const std::string source = source_case.filename().string();
  int i = 0;
  for (const nlohmann::json& bad :
       {nlohmann::json(1e9), nlohmann::json(0.0), nlohmann::json(-1e-4), nlohmann::json(0.5), nlohmann::json("1e-4"),
        nlohmann::json(true), nlohmann::json(nullptr)})
    require_malformed(
        source, fmt::format("max_abs_{}", i++),
        [&](const fs::path& dir) { edit_json(dir, [&](nlohmann::json& r) { r["tolerance"]["max_abs"] = bad; }); },
        "max_abs");
  require_malformed(
      source, "max_abs_infinite",
      [](const fs::path& dir) { edit_json_text(dir, "\"max_abs\": 0.0001", "\"max_abs\": 1e400"); }, "max_abs");
  require_malformed(
      source, "tolerance_plain_huge", [](const fs::path& dir) { edit_json(dir, [](auto& r) { r["tolerance"] = 5; }); },
      "tolerance");
  require_malformed(
      source, "tolerance_string", [](const fs::path& dir) { edit_json(dir, [](auto& r) { r["tolerance"] = "1e-4"; }); },
      "tolerance");
  require_malformed(
      source, "tolerance_missing", [](const fs::path& dir) { edit_json(dir, [](auto& r) { r.erase("tolerance"); }); },
      "tolerance");
  require_malformed(
      source, "tolerance_unknown_key",
      [](const fs::path& dir) { edit_json(dir, [](auto& r) { r["tolerance"]["rel_tol"] = 1e-3; }); }, "rel_tol");
  for (const nlohmann::json& bad : {nlohmann::json("max(1,max|expected|)"), nlohmann::json("max|expected|"),
                                    nlohmann::json(1), nlohmann::json("none")})
    require_malformed(
        source, fmt::format("relative_to_{}", i++),
        [&](const fs::path& dir) { edit_json(dir, [&](auto& r) { r["tolerance"]["relative_to"] = bad; }); },
        "relative_to");
}

TEST_CASE("oracle_check reads prefill_len, decode_steps and position_offset as integers in range", "[oracle][int]") {
  int i = 0;
  for (const std::string field : {"prefill_len", "decode_steps", "position_offset"}) {
    for (const std::string bad : {"12.5", "1e20", "9223372036854775807", "18446744073709551615",
                                  "123456789012345678901234567890", "-1", "\"12\"", "true", "65537", "7.0"}) {
      if (field == "position_offset" && (bad == "65537")) continue;  // a valid offset
      require_malformed(
          "llama_gqa", fmt::format("integer_{}", i++),
          [&](const fs::path& dir) {
            edit_json(dir, [&](nlohmann::json& r) { r[field] = "REPLACE_ME"; });
            edit_json_text(dir, "\"REPLACE_ME\"", bad);
          },
          field);
    }
  }
  require_malformed(
      "llama_gqa", "prefill_len_zero",
      [](const fs::path& dir) { edit_json(dir, [](auto& r) { r["prefill_len"] = 0; }); }, "prefill_len");
}

TEST_CASE("oracle_check names a config field of the wrong JSON type or range", "[oracle][types]") {
  struct Bad {
    std::string source;
    std::string pointer;  ///< JSON pointer to the field
    nlohmann::json value;
    std::string field;  ///< what the message must name
  };
  const std::vector<Bad> cases = {
      {"sdpa_single_head_bias_scale", "/config/attention_bias", "yes", "attention_bias"},
      {"sdpa_single_head_bias_scale", "/config/is_causal", 1, "is_causal"},
      {"sdpa_single_head_bias_scale", "/config/hidden_size", "96", "hidden_size"},
      {"sdpa_single_head_bias_scale", "/config/scale", "0.3", "scale"},
      {"sdpa_single_head_bias_scale", "/config/hidden_size", std::int64_t{1} << 40, "hidden_size"},
      {"sdpa_mha_h4", "/config/num_key_value_heads", 0, "num_key_value_heads"},
      {"llama_gqa", "/config/attention_bias", 0, "attention_bias"},
      {"llama_gqa", "/config/rope_parameters/rope_theta", "10000", "rope_theta"},
      {"llama_gqa", "/config/rope_parameters", "default", "rope_parameters"},
      {"llama_gqa", "/config/num_attention_heads", 4.0, "num_attention_heads"},
      {"llama31_rope_scaling", "/config/rope_parameters/low_freq_factor", nullptr, "low_freq_factor"},
      {"deepseek_v3_q_lora", "/config/rope_interleave", "yes", "rope_interleave"},
      {"deepseek_v3_q_lora", "/config/kv_lora_rank", -3, "kv_lora_rank"},
      {"deepseek_v32_k4", "/config/index_topk", 4.0, "index_topk"},
      {"deepseek_v32_k4", "/config/rope_parameters/rope_type", 3, "rope_type"},
      {"deepseek_v4_csa", "/config/partial_rotary_factor", 1e300, "partial_rotary_factor"},
      {"deepseek_v4_csa", "/config/partial_rotary_factor", 0.3, "partial_rotary_factor"},
      {"deepseek_v4_csa", "/config/partial_rotary_factor", "half", "partial_rotary_factor"},
      {"deepseek_v4_csa", "/config/o_groups", 0, "o_groups"},
      {"deepseek_v4_csa", "/config/compress_rates", 4, "compress_rates"},
      {"deepseek_v4_csa_yarn", "/config/rope_parameters/compress/truncate", "no", "truncate"},
      {"deepseek_v4_csa", "/config/attention_bias", "no", "attention_bias"},
      {"mistral_window5_gqa", "/config/sliding_window", true, "sliding_window"},
      {"mistral_window5_gqa", "/config/sliding_window", 0, "sliding_window"},
      {"gpt_oss_full_yarn_mscale", "/config/rope_parameters/mscale", "1", "mscale"},
      {"gpt_oss_sliding_w4_yarn_offset", "/config/attention_bias", "true", "attention_bias"},
      {"minimax_lightning_layer2_block4", "/config/hidden_act", 7, "hidden_act"},
      {"minimax_lightning_layer2_block4", "/layer_idx", "1", "layer_idx"},
      {"minimax_full_gqa_layer3", "/config/layer_types", "full_attention", "layer_types"},
      {"gemma3n_shared_full", "/config/num_kv_shared_layers", 5, "num_kv_shared_layers"},
      {"gemma3n_shared_full", "/layer_index", "4", "layer_index"},
      {"gemma3n_shared_sliding_w4", "/config/layer_types", "sliding_attention", "layer_types"},
      {"gemma3n_shared_sliding_w4", "/config/rope_parameters/full_attention/rope_theta", "1e6", "rope_theta"},
      {"sdpa_sinks_s2_w4_gqa", "/config/sinks", -1, "sinks"},
      {"flex_block_mask_all_b5", "/config/block", "5", "block"},
      {"flex_block_mask_chunked_transformers_b4", "/config/mask_mod", "my_mask_mod", "mask_mod"},
      {"flex_block_mask_chunked_transformers_b4", "/config/mask_mod", 1, "mask_mod"},
      {"flex_block_mask_chunked_transformers_b4", "/config/global_blocks", 1, "mask_mod"},
      {"sdpa_single_head_bias_scale", "/config", nlohmann::json::array(), "config"},
      {"sdpa_single_head_bias_scale", "/reference", 3, "reference"},
  };
  int i = 0;
  for (const Bad& bad : cases)
    require_malformed(
        bad.source, fmt::format("type_{}_{}", i++, bad.field),
        [&](const fs::path& dir) {
          edit_json(dir, [&](nlohmann::json& r) { r[nlohmann::json::json_pointer(bad.pointer)] = bad.value; });
        },
        bad.field);
}

TEST_CASE("oracle_check validates a head count before dividing by it", "[oracle][zero]") {
  for (const std::string source : {"llama_gqa", "minimax_lightning_layer2_block4", "minimax_full_gqa_layer3"})
    require_malformed(
        source, source + "_zero_heads",
        [](const fs::path& dir) {
          edit_json(dir, [](nlohmann::json& r) {
            r["config"].erase("head_dim");  // head_dim would be hidden_size / num_attention_heads
            r["config"]["num_attention_heads"] = 0;
          });
        },
        "num_attention_heads");
}

TEST_CASE("oracle_check refuses deeply nested JSON without running out of stack", "[oracle][depth]") {
  const auto nested = [](int depth) {
    return std::string(static_cast<std::size_t>(depth), '[') + std::string(static_cast<std::size_t>(depth), ']');
  };
  require_malformed(
      "sdpa_mha_h4", "nested_deep",
      [&](const fs::path& dir) {
        edit_json(dir, [](nlohmann::json& r) { r["config"]["note"] = "REPLACE_ME"; });
        edit_json_text(dir, "\"REPLACE_ME\"", nested(200000));
      },
      "config.note");
  {  // within the limit: accepted (the field is not read)
    const fs::path dir = copy_named_case("sdpa_mha_h4", "nested_shallow");
    edit_json(dir, [](nlohmann::json& r) { r["config"]["note"] = "REPLACE_ME"; });
    edit_json_text(dir, "\"REPLACE_ME\"", nested(oracle::max_json_depth - 2));
    CHECK(oracle_check_status(dir) == 0);
  }
  require_malformed(
      "sdpa_mha_h4", "nested_header",
      [&](const fs::path& dir) {
        const std::string header = "{\"__metadata__\": {\"x\": " + nested(200000) + "}}";
        std::ofstream out(dir / "tensors.safetensors", std::ios::binary);
        for (int i = 0; i < 8; ++i) out.put(static_cast<char>((header.size() >> (8 * i)) & 0xff));
        out << header;
      },
      "tensors.safetensors");
  require_malformed(
      "sdpa_mha_h4", "not_an_object", [](const fs::path& dir) { std::ofstream(dir / "case.json") << "[1, 2]"; },
      "case.json");
  require_malformed(
      "sdpa_mha_h4", "not_json", [](const fs::path& dir) { std::ofstream(dir / "case.json") << "{\"reference\": "; },
      "case.json");
}

TEST_CASE("oracle_check names a missing or misshapen expected tensor", "[oracle][expected]") {
  require_malformed(
      "llama_gqa", "no_expected_decode",
      [](const fs::path& dir) { rewrite_tensors(dir, [](auto& t) { t.erase("expected.decode"); }); },
      "expected.decode");
  require_malformed(
      "llama_gqa", "expected_prefill_shape",
      [](const fs::path& dir) {
        rewrite_tensors(dir, [](auto& t) { t.at("expected.prefill") = af::Tensor(af::Shape{2, 2}, {1, 2, 3, 4}); });
      },
      "expected.prefill");
  require_malformed(
      "llama_gqa", "position_ids_float",
      [](const fs::path& dir) {
        rewrite_tensors(dir, [](auto& t) { t.emplace("input.position_ids", af::Tensor(af::Shape{1, 2}, {0, 1})); });
      },
      "input.position_ids");
}
