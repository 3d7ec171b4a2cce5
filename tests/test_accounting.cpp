#include "af/accounting.hpp"
#include "af/error.hpp"

#include <catch2/catch.hpp>

TEST_CASE("The dense cache card counts bytes by hand-derived numbers", "[accounting]") {
  // One head of dimension 16 in float32: K and V of 16 values of 4 bytes each.
  const af::CacheCard head = af::dense_kv_card("single-head attention", 1, 16, af::DType::f32);
  CHECK(head.bytes_per_token() == 2 * 16 * 4);
  CHECK(head.bytes_stored(100) == 100 * 128);
  CHECK(head.bytes_read(100) == 100 * 128);
  CHECK(head.decode_reads(7).front().entries == 7);

  // Llama-3.1-8B in bf16: 32 layers x 8 KV heads x 128 x (K and V) x 2 bytes = 131,072 bytes per token.
  const af::ModelCache llama = af::llama31_8b();
  CHECK(llama.card.bytes_per_token() == 4096);
  CHECK(llama.bytes_per_token() == 131072);
  CHECK(llama.layers * llama.card.bytes_read(4096) == 536870912);  // 512 MiB read per decode step at 4k context

  CHECK_THROWS_AS(af::dense_kv_card("x", 0, 128, af::DType::bf16), af::Error);
}

TEST_CASE("Byte counts print with binary units", "[accounting]") {
  CHECK(af::human_bytes(512) == "512 B");
  CHECK(af::human_bytes(131072) == "128 KiB");
  CHECK(af::human_bytes(1.5 * 1024 * 1024 * 1024) == "1.50 GiB");
}
