#include "af/models.hpp"

#include "af/error.hpp"

#include <fmt/format.h>

#include <cctype>
#include <string>

namespace af {

std::string DenseModel::variant() const {
  if (kv_heads == heads) return "MHA";
  if (kv_heads == 1) return "MQA";
  return fmt::format("GQA (groups of {})", heads / kv_heads);
}

ModelCache DenseModel::cache(DType dtype) const {
  CacheCard card = dense_kv_card(variant(), heads, kv_heads, head_dim, dtype);
  if (sliding_window > 0) card = with_sliding_window(std::move(card), sliding_window);
  return {name, source, layers, std::move(card)};
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
      {"Mistral-7B",
       "huggingface/transformers, models/mistral/configuration_mistral.py defaults, \"similar to Mistral-7B-v0.1\" "
       "(hidden 4096, 32 layers, 32 heads, 8 KV heads, sliding_window 4096); mistralai/mistral-inference, "
       "cache.py (each layer caches sliding_window tokens)",
       32, 4096, 32, 8, 128, 4096},
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

namespace {
// The size a model's published name states: "Llama-3.1-8B" -> 8e9, "Qwen3-30B-A3B" -> 30e9 (the first number
// followed by B that is preceded by a dash).
double nominal_parameters(const std::string& name) {
  for (std::size_t dash = name.find('-'); dash != std::string::npos; dash = name.find('-', dash + 1)) {
    std::size_t end = dash + 1;
    while (end < name.size() && (std::isdigit(static_cast<unsigned char>(name[end])) || name[end] == '.')) ++end;
    if (end > dash + 1 && end < name.size() && name[end] == 'B')
      return std::stod(name.substr(dash + 1, end - dash - 1)) * 1e9;
  }
  throw Error(fmt::format("nominal_parameters: no size like \"-8B\" in the name \"{}\"", name));
}
}  // namespace

const std::vector<ModelPreset>& model_presets() {
  static const std::vector<ModelPreset> presets = [] {
    std::vector<ModelPreset> list;
    for (const DenseModel& m : dense_models())
      list.push_back({m.name, nominal_parameters(m.name), [&m](DType dtype) { return m.cache(dtype); }});
    list.push_back({"DeepSeek-V3", 671e9, [](DType dtype) {
                      return ModelCache{"DeepSeek-V3",
                                        "deepseek-ai/DeepSeek-V3, inference/configs/config_671B.json (61 layers, 128 "
                                        "heads, kv_lora_rank 512, qk_rope_head_dim 64) and inference/model.py "
                                        "(kv_cache [.., kv_lora_rank] and pe_cache [.., qk_rope_head_dim]); 671B "
                                        "total parameters (README.md)",
                                        61, mla_kv_card(128, 512, 64, dtype)};
                    }});
    return list;
  }();
  return presets;
}

const ModelPreset& model_preset(const std::string& name) {
  std::string known;
  for (const ModelPreset& m : model_presets()) {
    if (m.name == name) return m;
    known += (known.empty() ? "" : ", ") + m.name;
  }
  throw Error(fmt::format("model_preset: no model named \"{}\" (known: {})", name, known));
}

}  // namespace af
