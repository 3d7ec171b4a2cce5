#pragma once
/// @file models.hpp
/// Published attention configurations of real models, each with its source, for the cache cards.
/// Every number here was read from the cited source; the byte counts are derived by the accounting.

#include "af/accounting.hpp"

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace af {

/// A model whose attention layers are all dense multi-head, multi-query or grouped-query attention.
struct DenseModel {
  std::string name;
  std::string source;
  std::int64_t layers = 0;
  std::int64_t hidden = 0;
  std::int64_t heads = 0;     ///< query heads per layer
  std::int64_t kv_heads = 0;  ///< key/value heads per layer (= heads for MHA, 1 for MQA)
  std::int64_t head_dim = 0;
  std::int64_t sliding_window = 0;  ///< tokens each layer keeps and reads, 0 for all of them

  /// "MHA", "MQA" or "GQA (groups of 4)".
  std::string variant() const;
  /// The model's cache: every layer keeps K and V of `kv_heads x head_dim` per token in `dtype`.
  ModelCache cache(DType dtype = DType::bf16) const;
};

/// Llama-2-7B (MHA), Falcon-7B (MQA), Llama-3.1-8B and 70B, Mistral-7B (GQA with a sliding window of 4096),
/// Qwen3-30B-A3B and Qwen3-235B-A22B (GQA).
const std::vector<DenseModel>& dense_models();
/// A model of dense_models() by name; throws af::Error listing the known names.
const DenseModel& dense_model(const std::string& name);

/// A model of the decode tables, whatever its attention: its cache in a chosen dtype, and its size.
struct ModelPreset {
  std::string name;
  /// Total parameters as the model's published name states them ("8B" -> 8e9; "671B" -> 671e9): nominal,
  /// not counted from the configuration, so possibly a few percent off the exact count of its weights.
  double parameters = 0.0;
  /// The model's cache with every cached tensor in `dtype`.
  std::function<ModelCache(DType dtype)> cache;
};

/// Every dense model of dense_models() followed by DeepSeek-V3 (MLA: 61 layers, 128 heads, kv_lora_rank 512,
/// qk_rope_head_dim 64).
const std::vector<ModelPreset>& model_presets();
/// A model of model_presets() by name; throws af::Error listing the known names.
const ModelPreset& model_preset(const std::string& name);

}  // namespace af
