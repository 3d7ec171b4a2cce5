#include "af/accounting.hpp"
#include "af/error.hpp"
#include "af/models.hpp"
#include "af/sinks.hpp"

#include <catch2/catch.hpp>

TEST_CASE("The dense cache card counts bytes by hand-derived numbers", "[accounting]") {
  // One head of dimension 16 in float32: K and V of 16 values of 4 bytes each.
  const af::CacheCard head = af::dense_kv_card("single-head attention", 1, 1, 16, af::DType::f32);
  CHECK(head.bytes_per_token() == 2 * 16 * 4);
  CHECK(head.bytes_stored(100) == 100 * 128);
  CHECK(head.bytes_read(100) == 100 * 128);
  CHECK(head.decode_reads(7).front().entries == 7);

  // Llama-3.1-8B in bf16: 32 layers x 8 KV heads x 128 x (K and V) x 2 bytes = 131,072 bytes per token.
  const af::ModelCache llama = af::dense_model("Llama-3.1-8B").cache();
  CHECK(llama.card.bytes_per_token() == 4096);
  CHECK(llama.bytes_per_token() == 131072);
  CHECK(llama.layers * llama.card.bytes_read(4096) == 536870912);  // 512 MiB read per decode step at 4k context

  CHECK_THROWS_AS(af::dense_kv_card("x", 1, 0, 128, af::DType::bf16), af::Error);
}

TEST_CASE("Byte counts print with binary units", "[accounting]") {
  CHECK(af::human_bytes(512) == "512 B");
  CHECK(af::human_bytes(131072) == "128 KiB");
  CHECK(af::human_bytes(1.5 * 1024 * 1024 * 1024) == "1.50 GiB");
}

TEST_CASE("Real models' KV bytes per token match the hand-derived numbers", "[accounting][models]") {
  // layers x KV heads x head_dim x 2 (K and V) x 2 bytes (bf16)
  CHECK(af::dense_model("Llama-2-7B").cache().bytes_per_token() == 32 * 32 * 128 * 2 * 2);  // 524,288
  CHECK(af::dense_model("Falcon-7B").cache().bytes_per_token() == 32 * 1 * 64 * 2 * 2);     // 8,192
  CHECK(af::dense_model("Llama-3.1-8B").cache().bytes_per_token() == 131072);
  CHECK(af::dense_model("Llama-3.1-70B").cache().bytes_per_token() == 327680);
  CHECK(af::dense_model("Qwen3-30B-A3B").cache().bytes_per_token() == 98304);
  CHECK(af::dense_model("Qwen3-235B-A22B").cache().bytes_per_token() == 192512);
  CHECK(af::dense_model("Falcon-7B").variant() == "MQA");
  CHECK(af::dense_model("Llama-2-7B").variant() == "MHA");
  CHECK(af::dense_model("Qwen3-235B-A22B").variant() == "GQA (groups of 16)");
  CHECK_THROWS_WITH(af::dense_model("GPT-5"),
                    Catch::Matchers::Contains("GPT-5") && Catch::Matchers::Contains("Llama-3.1-8B"));
}

TEST_CASE("A bounded cache's card prints the rows it really holds", "[accounting]") {
  const af::ModelCache mistral = af::dense_model("Mistral-7B").cache();
  const std::vector<std::int64_t> contexts{1024};
  const std::string windowed = af::format_cache_card(mistral.card, std::span(&mistral, 1), contexts);
  CHECK_THAT(windowed, Catch::Matchers::Contains("[min(T, 4096), 8, 128]") &&
                           Catch::Matchers::Contains("[min(t + 1, 4096), 8, 128]"));
  const af::CacheCard dense = af::dense_kv_card("GQA", 32, 8, 128, af::DType::bf16);
  CHECK_THAT(af::format_cache_card(dense, {}, contexts), Catch::Matchers::Contains("[T, 8, 128]"));
  const af::CacheCard sinks = af::with_kept_sinks(dense, 4, 2044);
  CHECK_THAT(af::format_cache_card(sinks, {}, contexts), Catch::Matchers::Contains("[min(T, 2048), 8, 128]"));
  CHECK(sinks.stored_tokens(100000) == 2048);
}
