#include "af/models.hpp"

#include "af/error.hpp"

#include <fmt/format.h>

namespace af {

std::string DenseModel::variant() const {
  if (kv_heads == heads) return "MHA";
  if (kv_heads == 1) return "MQA";
  return fmt::format("GQA (groups of {})", heads / kv_heads);
}

ModelCache DenseModel::cache(DType dtype) const {
  return {name, source, layers, dense_kv_card(variant(), heads, kv_heads, head_dim, dtype)};
}

const std::vector<DenseModel>& dense_models() {
  static const std::vector<DenseModel> models = {
      {"Llama-2-7B",
       "meta-llama/llama-models, models/sku_list.py (llama2 7b: dim 4096, 32 layers, 32 heads, no n_kv_heads)", 32,
       4096, 32, 32, 128},
      {"Falcon-7B",
       "huggingface/transformers, models/falcon/configuration_falcon.py defaults (tiiuae/falcon-7b: "
       "hidden 4544, 32 layers, 71 heads, multi_query)",
       32, 4544, 71, 1, 64},
      {"Llama-3.1-8B", "meta-llama/llama-models, models/sku_list.py (dim 4096, 32 layers, 32 heads, 8 KV heads)", 32,
       4096, 32, 8, 128},
      {"Llama-3.1-70B", "meta-llama/llama-models, models/sku_list.py (dim 8192, 80 layers, 64 heads, 8 KV heads)", 80,
       8192, 64, 8, 128},
      {"Qwen3-30B-A3B", "Qwen3 release (qwen3-30B-A3B: 48 layers, 32 heads, 4 KV heads, kv-channels 128)", 48, 2048, 32,
       4, 128},
      {"Qwen3-235B-A22B", "Qwen3 release (qwen3-235B-A22B: 94 layers, 64 heads, 4 KV heads, kv-channels 128)", 94, 4096,
       64, 4, 128},
  };
  return models;
}

const DenseModel& dense_model(const std::string& name) {
  std::string known;
  for (const DenseModel& m : dense_models()) {
    if (m.name == name) return m;
    known += (known.empty() ? "" : ", ") + m.name;
  }
  throw Error(fmt::format("dense_model: no model named \"{}\" (known: {})", name, known));
}

}  // namespace af
