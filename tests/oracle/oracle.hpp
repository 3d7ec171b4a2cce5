#pragma once
// The oracle harness: a case as read from tests/oracle/cases/<name>/, and the runners that compute a
// mechanism's outputs from the case's weights with the library (see shared ORACLE.md and README.md here).
#include "af/error.hpp"
#include "af/grouped_attention.hpp"
#include "af/mla.hpp"
#include "af/rope.hpp"
#include "af/safetensors.hpp"
#include "af/tensor.hpp"

#include <nlohmann/json.hpp>

#include <filesystem>
#include <functional>
#include <map>
#include <string>
#include <vector>

namespace oracle {

/// A malformed or unsupported case (exit status 2); the message names the missing field or tensor.
struct CaseError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Case {
  std::filesystem::path dir;
  std::string name;
  std::string reference;
  std::string layer_type;
  nlohmann::json config;
  std::int64_t prefill_len = 0;
  std::int64_t decode_steps = 0;
  double max_abs = 0.0;
  bool relative_to_expected = false;  // the tolerance scales with max(1, max|expected|)
  af::SafetensorsFile tensors;

  /// A config field, or CaseError naming it.
  std::int64_t config_int(const std::string& key) const;
  double config_double(const std::string& key) const;
  bool config_bool(const std::string& key) const;
  /// A float tensor with a required shape, or CaseError naming the tensor and both shapes.
  af::Tensor tensor(const std::string& name, const af::Shape& expected_shape) const;
  /// `input.position_ids` [1, count] as a vector, or CaseError.
  std::vector<std::int64_t> positions(std::int64_t count) const;
  /// A float tensor that may be absent (empty when absent).
  af::Tensor optional_tensor(const std::string& name, const af::Shape& expected_shape) const;
};

/// Reads `dir/case.json` and `dir/tensors.safetensors`; throws CaseError when either is malformed.
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

/// What a runner returns: the outputs of the prefill [T, hidden] and of the N decode steps [N, hidden], and,
/// for a mechanism with several exact ways to compute it (MLA's naive and absorbed paths), which way.
struct Outputs {
  af::Tensor prefill;
  af::Tensor decode;
  std::string path;
  /// For a mechanism that selects (DSA, CSA): the entries it chose, one per `expected.selected.<name>` tensor.
  std::vector<Selection> selected = {};
};

/// The attention sizes of a Hugging Face decoder config (hidden_size, num_attention_heads, num_key_value_heads
/// defaulting to the head count, head_dim defaulting to hidden / heads), validated; CaseError otherwise.
af::GroupedShape read_hf_grouped_shape(const Case& c);

/// The rotary embedding of a Hugging Face config: theta and type from `rope_parameters` (transformers 5) or
/// `rope_theta` / `rope_scaling` (earlier); types "default", "llama3" and "yarn" (every yarn field read, an
/// unknown one rejected by name); partial rotation is rejected.
af::Rope read_hf_rope(const Case& c, std::int64_t head_dim, af::RopeLayout layout);

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

/// Every way the library computes the case's mechanism; each must pass.
using Runner = std::function<std::vector<Outputs>(const Case&)>;

/// The mechanisms this build can check, by the case's `reference`.
const std::map<std::string, Runner>& runners();

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

}  // namespace oracle
