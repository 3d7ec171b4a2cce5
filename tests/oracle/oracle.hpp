#pragma once
// The oracle harness: a case as read from tests/oracle/cases/<name>/, and the runners that compute a
// mechanism's outputs from the case's weights with the library (the contract and the format: README.md here).
#include "af/error.hpp"
#include "af/grouped_attention.hpp"
#include "af/mla.hpp"
#include "af/qk_norm.hpp"
#include "af/rope.hpp"
#include "af/safetensors.hpp"
#include "af/tensor.hpp"

#include <nlohmann/json.hpp>

#include <filesystem>
#include <functional>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <vector>

namespace oracle {

/// A malformed or unsupported case (exit status 2); the message names the case and the missing or bad field or tensor.
struct CaseError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

/// The limits a case must keep (README.md, "Limits"); a case outside them is malformed.
inline constexpr int max_json_depth = 32;                       ///< nesting of objects and arrays in case.json
inline constexpr std::uintmax_t max_case_json_bytes = 1 << 20;  ///< the size of case.json
inline constexpr std::int64_t max_tokens = 1 << 16;             ///< prefill_len and decode_steps, each
inline constexpr std::int64_t max_config_integer = 1 << 20;     ///< every integer config field the runners read
inline constexpr std::int64_t max_position_offset = std::int64_t{1} << 30;  ///< position_offset
inline constexpr double max_tolerance = 1e-2;  ///< tolerance max_abs (the generator's contrast margin)
/// The one `relative_to` the harness knows (besides null or absent, which mean an absolute bound).
inline constexpr std::string_view relative_to_expected_form = "max(1, max|expected|)";

/// The case's tensors. Reading one (`stored`, `tensor`, `integers`) marks it read, so that oracle_check can report
/// a tensor nothing read: a case and a runner that disagree about what the mechanism is.
class CaseTensors {
 public:
  CaseTensors() = default;
  explicit CaseTensors(af::SafetensorsFile file) : file_(std::move(file)) {}

  bool contains(const std::string& name) const { return file_.contains(name); }  ///< not a read
  std::vector<std::string> names() const { return file_.names(); }
  const af::StoredTensor& stored(const std::string& name) const;
  af::Tensor tensor(const std::string& name) const;
  std::vector<std::int64_t> integers(const std::string& name) const;
  /// The tensors no one has read so far, in name order.
  std::vector<std::string> unread() const;
  /// The file itself, for looking at every tensor without marking any read (the harness's finiteness scan).
  const af::SafetensorsFile& file() const { return file_; }

 private:
  af::SafetensorsFile file_;
  mutable std::set<std::string> read_;
};

/// Strict readers of one JSON object's fields: `where` names the object in messages ("config",
/// "config.rope_parameters"). Each throws CaseError naming the case, the object and the key when the field is
/// missing (for the required forms) or has the wrong type or range; the `_or` forms return `fallback` when the
/// field is absent or null.
class Fields {
 public:
  Fields(std::string case_name, const nlohmann::json& object, std::string where);

  bool given(const std::string& key) const;  ///< present and not null
  const nlohmann::json& at(const std::string& key) const;
  /// A JSON integer (not 3.0) within [min, max].
  std::int64_t integer(const std::string& key, std::int64_t min = 0, std::int64_t max = max_config_integer) const;
  std::int64_t integer_or(const std::string& key, std::int64_t fallback, std::int64_t min = 0,
                          std::int64_t max = max_config_integer) const;
  /// A finite number (integer or not).
  double number(const std::string& key) const;
  double number_or(const std::string& key, double fallback) const;
  bool boolean(const std::string& key) const;
  bool boolean_or(const std::string& key, bool fallback) const;
  std::string string(const std::string& key) const;
  std::string string_or(const std::string& key, const std::string& fallback) const;
  /// A nested object, as Fields named `where.key`.
  Fields object(const std::string& key) const;
  const nlohmann::json& json() const { return *object_; }

  /// The message prefix `case: where "key"`.
  std::string label(const std::string& key) const;

 private:
  std::string case_name_;
  const nlohmann::json* object_;  ///< not owned: a Fields lives no longer than the JSON it reads
  std::string where_;
};

struct Case {
  std::filesystem::path dir;
  std::string name;
  std::string reference;
  std::string layer_type;
  nlohmann::json root;    ///< the whole case.json
  nlohmann::json config;  ///< root["config"]
  std::int64_t prefill_len = 0;
  std::int64_t decode_steps = 0;
  std::int64_t position_offset = 0;
  double max_abs = 0.0;
  bool relative_to_expected = false;  // the tolerance scales with max(1, max|expected|)
  CaseTensors tensors;

  /// Strict readers of `config` and of the top level of case.json.
  Fields config_fields() const { return Fields(name, config, "config"); }
  Fields case_fields() const { return Fields(name, root, "case.json"); }
  /// A config field, or CaseError naming it: an integer in [0, max_config_integer], a finite number, a boolean.
  std::int64_t config_int(const std::string& key) const { return config_fields().integer(key); }
  double config_double(const std::string& key) const { return config_fields().number(key); }
  bool config_bool(const std::string& key) const { return config_fields().boolean(key); }
  /// A float tensor with a required shape, or CaseError naming the tensor and both shapes.
  af::Tensor tensor(const std::string& name, const af::Shape& expected_shape) const;
  /// `input.position_ids` [1, count] as a vector, or CaseError.
  std::vector<std::int64_t> positions(std::int64_t count) const;
  /// A float tensor that may be absent (empty when absent).
  af::Tensor optional_tensor(const std::string& name, const af::Shape& expected_shape) const;
};

/// Reads `dir/case.json` and `dir/tensors.safetensors`; throws CaseError when either is malformed: JSON nested
/// deeper than max_json_depth, a missing or mistyped field, prefill_len or decode_steps that are not JSON integers
/// in [1, max_tokens] and [0, max_tokens], a tolerance that is not a number in (0, max_tolerance] or an object
/// {"max_abs": that, "relative_to": null or "max(1, max|expected|)"}.
Case read_case(const std::filesystem::path& dir);

/// The entries a selecting mechanism chose for each of `rows` query rows, at most `k` per row, padded with -1.
/// `oracle_check` compares it with the case's `expected.selected.<name>` [.., rows, k] (int64) row by row as
/// sets: the order within a row and the -1 padding do not matter, every chosen index does.
struct Selection {
  std::string name;
  std::int64_t rows = 0;
  std::int64_t k = 0;
  std::vector<std::int64_t> indices;  ///< rows * k, row-major
};

/// What the library's cache holds at one point of the replay, beside what the reference's cache held there
/// (`expected.<when>.<kind>`, e.g. `expected.prefill.conv_state`). The runner maps the layouts: `expected` is the
/// part of the recorded tensor the library keeps, in the library's layout, the same shape as `got`; `what` says
/// which part (for the line). `expected` is empty when the case does not record the tensor (an older case): the
/// line then says that it was not compared. `oracle_check` compares like an output (max abs error within the
/// case's max_abs, times max(1, max|expected|) of this comparison's values when the tolerance is relative; NaN
/// and infinity fail) and prints one line per comparison.
struct StateComparison {
  std::string tensor;                  ///< the case's tensor name
  std::string what;                    ///< which part of it is compared, in words
  std::optional<af::Tensor> expected;  ///< absent: the case does not record it
  af::Tensor got;
};

/// What a runner returns: the outputs of the prefill [T, hidden] and of the N decode steps [N, hidden], and,
/// for a mechanism with several exact ways to compute it (MLA's naive and absorbed paths), which way.
struct Outputs {
  af::Tensor prefill;
  af::Tensor decode;
  std::string path;
  /// For a mechanism that selects (DSA, CSA): the entries it chose, one per `expected.selected.<name>` tensor.
  std::vector<Selection> selected = {};
  /// For a mechanism whose cache is a state (the delta rule): the library's cache beside the recorded one.
  std::vector<StateComparison> states = {};
};

/// The comparisons of a delta-rule layer's cache (af::GatedDeltaNetCache, af::KimiDeltaCache) after the call
/// named `when` ("prefill" or "final") with the case's `expected.<when>.conv_state` [1, C, K] and
/// `expected.<when>.recurrent_state` [1, H, d_k, d_v]. transformers' cache keeps the convolution's last K inputs
/// (oldest first, channel-major); the library keeps the last K - 1 (`conv_inputs` [K - 1, C], token-major), since
/// the oldest of K is never used again: the last K - 1 columns are compared. The recurrent state has the
/// library's layout [H, d_k, d_v] already. A tensor the case does not hold is reported as not compared; one of
/// another shape is a CaseError naming it.
std::vector<StateComparison> delta_cache_comparisons(const Case& c, const std::string& when,
                                                     const af::Tensor& conv_inputs, std::int64_t conv_kernel,
                                                     const af::Tensor& state);

/// The attention sizes of a Hugging Face decoder config (hidden_size, num_attention_heads, num_key_value_heads
/// defaulting to the head count, head_dim defaulting to hidden / heads), validated; CaseError otherwise.
af::GroupedShape read_hf_grouped_shape(const Case& c);

/// The rotary embedding of a Hugging Face config: theta and type from `rope_parameters` (transformers 5) or
/// `rope_theta` / `rope_scaling` (earlier); types "default", "llama3", "linear" and "yarn" (every yarn field read, an
/// unknown one rejected by name); partial rotation is rejected.
af::Rope read_hf_rope(const Case& c, std::int64_t head_dim, af::RopeLayout layout);

/// The rotary embedding of one rope parameters object (`params`, e.g. `config.rope_parameters` or, for a model
/// with one per layer kind, `config.rope_parameters.sliding_attention`): `rope_theta` and `rope_type` "default",
/// "llama3", "linear" (every frequency divided by `factor`) or "yarn"; partial rotation is rejected, and so is an
/// unknown field of a linear or yarn object.
af::Rope read_rope_parameters(const Case& c, const Fields& params, std::int64_t head_dim, af::RopeLayout layout);

/// The rotary settings of a DeepSeek (MLA) config: theta, and YaRN's fields when `rope_type` is "yarn" (empty for
/// "default"; any other type is a CaseError). MLA needs YaRN's fields twice: for the rotation and for the softmax
/// scale's mscale^2 (af::mla_softmax_scale).
struct DeepseekRope {
  double theta = 0.0;
  std::optional<af::YarnScaling> yarn;
  /// The rotation of `dim` dimensions in `layout`; CaseError when the settings are out of range.
  af::Rope rope(const Case& c, std::int64_t dim, af::RopeLayout layout) const;
};
DeepseekRope read_deepseek_rope(const Case& c);

/// YaRN's settings as transformers reads them (modeling_rope_utils, `_compute_yarn_parameters`) from one rope
/// parameters object: `factor` (null: max_position_embeddings / original), `original_max_position_embeddings`,
/// optional `beta_fast` (32), `beta_slow` (1), `truncate` (true), `attention_factor`, `mscale`, `mscale_all_dim`; a
/// null or zero beta means the default, as there. Any other field is rejected by name rather than ignored.
af::YarnScaling read_yarn_fields(const Case& c, const Fields& params);

/// The q/k/v/o projections of a grouped layer under their Hugging Face names, checked against `shape`; the
/// q/k/v biases when `qkv_bias`, and o_proj's when `o_bias`.
af::GroupedWeights read_grouped_weights(const Case& c, const af::GroupedShape& shape, bool qkv_bias, bool o_bias);

/// The MLA sizes of a DeepSeek config (hidden_size, num_attention_heads, q_lora_rank — null or absent means no
/// query latent —, kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim), validated. The RMSNorm eps is
/// 1e-6: the reference builds q_a_layernorm and kv_a_layernorm with the class default, whatever the config's
/// rms_norm_eps says. CaseError otherwise.
af::MlaShape read_hf_mla_shape(const Case& c);

/// The MLA projections under their Hugging Face names (q_a_proj, q_a_layernorm, q_b_proj or q_proj,
/// kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj), checked against `shape`; a bias tensor is a CaseError.
af::MlaWeights read_mla_weights(const Case& c, const af::MlaShape& shape);

/// Replays the case through one QK-norm layer (af::qk_norm_attention): the prefill of T tokens, then the N decode
/// steps, at the case's positions; through a ring of `window` slots, or (window 0) a cache of the whole stream.
Outputs replay_qk_norm_layer(const Case& c, const af::GroupedShape& shape, const af::GroupedWeights& weights,
                             const af::QkNorm& norm, const af::Rope& rope, const af::AttentionOptions& options,
                             std::int64_t window);

/// Every way the library computes the case's mechanism; each must pass.
using Runner = std::function<std::vector<Outputs>(const Case&)>;

/// The mechanisms this build can check, by the case's `reference`.
const std::map<std::string, Runner>& runners();

/// What oracle_check says about one case: PASS (exit 0), FAIL (exit 1: an output, a selection or a value of the case
/// is wrong, NaN and infinity included) or MALFORMED (exit 2: the case cannot be checked; the message names the case
/// and the field or tensor).
enum class Verdict { pass, fail, malformed };

struct CheckResult {
  Verdict verdict = Verdict::malformed;
  std::string report;  ///< oracle_check's line for the case (one per way the runner computes it), newline-terminated
};

/// Reads the case in `dir`, runs `table`'s runner for its reference and compares. Never throws: every exception
/// (CaseError, af::Error, a JSON type error, std::exception, anything else) makes the case MALFORMED.
CheckResult check_case(const std::filesystem::path& dir, const std::map<std::string, Runner>& table);

// One runner per reference.
std::vector<Outputs> run_sdpa(const Case& c);
std::vector<Outputs> run_llama(const Case& c);
std::vector<Outputs> run_deepseek_v3(const Case& c);
std::vector<Outputs> run_deepseek_v32(const Case& c);
std::vector<Outputs> run_deepseek_v4(const Case& c);
std::vector<Outputs> run_mistral(const Case& c);
std::vector<Outputs> run_sdpa_sinks(const Case& c);
std::vector<Outputs> run_gpt_oss(const Case& c);
std::vector<Outputs> run_flex_block_mask(const Case& c);
std::vector<Outputs> run_minimax(const Case& c);
std::vector<Outputs> run_qwen3_next(const Case& c);
std::vector<Outputs> run_kimi_linear(const Case& c);
std::vector<Outputs> run_qwen3(const Case& c);
std::vector<Outputs> run_gemma3(const Case& c);
std::vector<Outputs> run_gemma3n(const Case& c);

}  // namespace oracle
