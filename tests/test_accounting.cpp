#include "af/accounting.hpp"
#include "af/block_sparse.hpp"
#include "af/error.hpp"
#include "af/linear_attention.hpp"
#include "af/models.hpp"
#include "af/sinks.hpp"
#include "af/sparse_attention.hpp"

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

TEST_CASE("Attention FLOPs are counted from the shapes", "[accounting][flops]") {
  // Dense: 2 H d for the score and 2 H d for the value mix of each entry read, for every head.
  const af::CacheCard gqa = af::dense_kv_card("GQA", 32, 8, 128, af::DType::bf16);
  CHECK(gqa.decode_flops(1000) == 1000.0 * 4 * 32 * 128);
  // A causal prefill of T tokens scores T (T + 1) / 2 pairs.
  CHECK(gqa.prefill_flops(100) == 100.0 * 101 / 2 * 4 * 32 * 128);
  CHECK(gqa.prefill_flops(0) == 0.0);
  CHECK_THROWS_AS(gqa.prefill_flops(-1), af::Error);

  // A window of 8: queries past the window attend to 8 entries each.
  const af::CacheCard window = af::with_sliding_window(gqa, 8);
  CHECK(window.decode_flops(1000) == gqa.decode_flops(8));
  CHECK(window.prefill_flops(20) == (8.0 * 9 / 2 + 12.0 * 8) * 4 * 32 * 128);

  // MLA, absorbed: per entry and head 2 (512 + 64) for the score and 2 x 512 for the latent mixed in.
  const af::CacheCard mla = af::mla_kv_card(128, 512, 64, af::DType::bf16);
  CHECK(mla.decode_flops(10) == 10.0 * 128 * (2 * 576 + 2 * 512));

  // DSA: the indexer scores every key (2 x 64 x 128 + 2 x 64 each), attention reads min(t, 2048) latents.
  const af::ModelCache v32 = af::deepseek_v32();
  CHECK(v32.layers == 61);
  CHECK(v32.card.bytes_per_token() == (512 + 64) * 2 + 128 + 4);
  const double index = 2.0 * 64 * 128 + 2 * 64, latent = 128.0 * (2 * 576 + 2 * 512);
  CHECK(v32.card.decode_flops(1000) == 1000 * index + 1000 * latent);
  CHECK(v32.card.decode_flops(100000) == 100000 * index + 2048 * latent);
  CHECK(v32.decode_flops(100000) == 61 * v32.card.decode_flops(100000));
}

TEST_CASE("The hybrid model's FLOPs: a fixed state per linear layer, a growing cache per softmax layer",
          "[accounting][flops]") {
  const af::HybridModel m1 = af::minimax_m1();
  // 70 layers x 64 heads x (3 + 2) x 128 x 128 per token, whatever the context.
  CHECK(m1.linear_flops_per_token() == 70.0 * 64 * 5 * 128 * 128);
  CHECK(m1.decode_flops(4096) == m1.linear_flops_per_token() + 10.0 * 4096 * 4 * 64 * 128);
  CHECK(m1.prefill_flops(64) == 64 * m1.linear_flops_per_token() + 10.0 * 64 * 65 / 2 * 4 * 64 * 128);
}

TEST_CASE("Block-sparse decode entries equal a walk over the visited blocks", "[accounting][block_sparse]") {
  for (std::int64_t block : {1, 3, 8})
    for (std::int64_t local = 1; local <= 4; ++local)
      for (std::int64_t global = 0; global <= 3; ++global)
        for (std::int64_t stride = 0; stride <= 5; ++stride) {
          const af::BlockPattern pattern{block, local, global, stride};
          for (std::int64_t t = 1; t <= 200; ++t) {
            const std::int64_t qb = (t - 1) / block;
            std::int64_t walked = 0;
            for (std::int64_t kb = 0; kb <= qb; ++kb)
              if (pattern.visits(qb, kb)) walked += std::min((kb + 1) * block, t) - kb * block;
            INFO("block " << block << ", local " << local << ", global " << global << ", stride " << stride << ", t "
                          << t);
            REQUIRE(af::block_sparse_decode_entries(pattern, t) == walked);
          }
        }
}

TEST_CASE("An interleaved model adds its parts' FLOPs", "[accounting][flops]") {
  const af::CacheCard card = af::dense_kv_card("GQA", 8, 2, 16, af::DType::bf16);
  const af::InterleavedModel model{"m",
                                   "test",
                                   {af::ModelCache{"local", "test", 3, af::with_sliding_window(card, 4)},
                                    af::ModelCache{"global", "test", 1, card}}};
  CHECK(model.decode_flops(10) == 3 * card.decode_flops(4) + card.decode_flops(10));
  CHECK(model.prefill_flops(6) == 3 * (10.0 + 4 + 4) * 4 * 8 * 16 + 21.0 * 4 * 8 * 16);
}
