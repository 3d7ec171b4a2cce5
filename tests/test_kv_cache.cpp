// Chapter 05's library: model presets, tensor-parallel accounting, the paged cache and continuous batching.
#include "af/accounting.hpp"
#include "af/error.hpp"
#include "af/grouped_attention.hpp"
#include "af/models.hpp"
#include "af/paged_cache.hpp"
#include "af/random.hpp"
#include "reference.hpp"

#include <catch2/catch.hpp>

#include <vector>

namespace {
std::int64_t preset_bytes(const char* name, af::DType dtype = af::DType::bf16) {
  return af::model_preset(name).cache(dtype).bytes_per_token();
}
}  // namespace

TEST_CASE("Every preset's KV bytes per token match the hand-derived numbers", "[kv_cache][models]") {
  // GQA/MHA: layers x KV heads x head_dim x 2 (K and V) x 2 bytes; MLA: layers x (512 + 64) x 2 bytes.
  CHECK(preset_bytes("Llama-3.1-8B") == 131072);     // 32 x 8 x 128 x 4
  CHECK(preset_bytes("Llama-3.1-70B") == 327680);    // 80 x 8 x 128 x 4
  CHECK(preset_bytes("Mistral-7B") == 131072);       // 32 x 8 x 128 x 4
  CHECK(preset_bytes("Qwen3-30B-A3B") == 98304);     // 48 x 4 x 128 x 4
  CHECK(preset_bytes("Qwen3-235B-A22B") == 192512);  // 94 x 4 x 128 x 4
  CHECK(preset_bytes("DeepSeek-V3") == 70272);       // 61 x 576 x 2
  CHECK(preset_bytes("DeepSeek-V3", af::DType::fp8_e4m3) == 35136);
  CHECK(preset_bytes("Llama-3.1-8B", af::DType::f32) == 262144);
  CHECK(af::model_preset("Llama-3.1-8B").parameters == 8e9);
  CHECK(af::model_preset("DeepSeek-V3").parameters == 671e9);
  CHECK(af::model_preset("Qwen3-235B-A22B").parameters == 235e9);
  CHECK_THROWS_WITH(af::model_preset("GPT-5"),
                    Catch::Matchers::Contains("GPT-5") && Catch::Matchers::Contains("DeepSeek-V3"));
}

TEST_CASE("Stored and read bytes follow the context; a sliding window caps them", "[kv_cache][models]") {
  const af::ModelCache llama = af::model_preset("Llama-3.1-8B").cache(af::DType::bf16);
  CHECK(llama.bytes_stored(131072) == 17179869184);  // 131,072 x 131,072 B = 16 GiB
  CHECK(llama.bytes_read(131072) == 17179869184);
  const af::ModelCache deepseek = af::model_preset("DeepSeek-V3").cache(af::DType::bf16);
  CHECK(deepseek.bytes_stored(131072) == 9210691584);  // 70,272 x 131,072
  CHECK(deepseek.card.decode_reads(100).front().entries == 100);
  // Mistral-7B keeps 4,096 tokens per layer: 131,072 x 4,096 = 512 MiB at most.
  const af::ModelCache mistral = af::model_preset("Mistral-7B").cache(af::DType::bf16);
  CHECK(mistral.bytes_stored(1000) == 131072 * 1000);
  CHECK(mistral.bytes_stored(131072) == 536870912);
  CHECK(mistral.bytes_read(131072) == 536870912);
  CHECK(mistral.card.bytes_written_per_token() * mistral.layers == 131072);
  CHECK_THROWS_AS(af::with_sliding_window(llama.card, 0), af::Error);
}

TEST_CASE("Tensor parallelism splits KV heads and replicates them when there are fewer than ranks", "[kv_cache][tp]") {
  const af::ModelCache llama = af::model_preset("Llama-3.1-8B").cache(af::DType::bf16);  // 8 KV heads
  CHECK(llama.bytes_per_token_per_gpu(1) == 131072);
  CHECK(llama.bytes_per_token_per_gpu(2) == 65536);
  CHECK(llama.bytes_per_token_per_gpu(8) == 16384);   // one KV head per rank
  CHECK(llama.bytes_per_token_per_gpu(16) == 16384);  // still one: each KV head on 2 ranks
  CHECK(llama.card.per_token.front().copies(16) == 2);
  CHECK(llama.card.per_token.front().copies(4) == 1);
  const af::ModelCache qwen = af::model_preset("Qwen3-235B-A22B").cache(af::DType::bf16);  // 4 KV heads
  CHECK(qwen.bytes_per_token_per_gpu(8) == 94 * 1 * 128 * 2 * 2);  // 4 heads on 8 ranks: 1 each, 2 copies
  CHECK(qwen.card.per_token.front().copies(8) == 2);
  CHECK(qwen.bytes_read_per_gpu(4096, 8) == 4096 * 94 * 512);
  // MLA: every rank keeps the whole latent.
  const af::ModelCache deepseek = af::model_preset("DeepSeek-V3").cache(af::DType::bf16);
  CHECK(deepseek.bytes_per_token_per_gpu(8) == 70272);
  CHECK(deepseek.card.per_token.front().copies(8) == 8);
  CHECK(deepseek.bytes_read_per_gpu(1000, 8) == 70272 * 1000);
  CHECK_THROWS_WITH(llama.bytes_per_token_per_gpu(3), Catch::Matchers::Contains("8 heads over 3"));
  CHECK_THROWS_AS(llama.bytes_per_token_per_gpu(0), af::Error);
}

TEST_CASE("The MLA card stores one latent and one RoPE key per token", "[kv_cache][mla]") {
  const af::CacheCard card = af::mla_kv_card(128, 512, 64, af::DType::bf16);
  REQUIRE(card.per_token.size() == 2);
  CHECK(card.per_token[0].name == "c_KV");
  CHECK(card.per_token[0].elements() == 512);
  CHECK(card.per_token[1].elements() == 64);
  CHECK(card.bytes_per_token() == 1152);
  CHECK(card.bytes_read(10) == 11520);
  CHECK_THROWS_AS(af::mla_kv_card(128, 0, 64, af::DType::bf16), af::Error);
}

namespace {
af::Tensor random_rows(af::Rng& rng, std::int64_t rows, std::int64_t cols) {
  return af::random_normal(af::Shape{rows, cols}, rng);
}
// The float64 attention of query rows q [Tq, H d] (the last Tq of T positions) over K, V [T, G d].
reference::Matrix64 grouped_reference(const af::Tensor& q, const af::Tensor& k, const af::Tensor& v,
                                      const af::GroupedShape& s) {
  const std::int64_t d = s.head_dim;
  reference::Matrix64 out(static_cast<std::size_t>(q.dim(0)),
                          std::vector<double>(static_cast<std::size_t>(s.heads * d)));
  for (std::int64_t h = 0; h < s.heads; ++h) {
    const std::int64_t g = h * s.kv_heads / s.heads;
    const auto o = reference::attention(
        reference::to64(af::to_tensor(af::ConstMatrix{q.data() + h * d, q.dim(0), d, s.heads * d}).matrix()),
        reference::to64(af::ConstMatrix{k.data() + g * d, k.dim(0), d, s.kv_heads * d}),
        reference::to64(af::ConstMatrix{v.data() + g * d, v.dim(0), d, s.kv_heads * d}), true,
        1.0 / std::sqrt(double(d)));
    for (std::size_t i = 0; i < o.size(); ++i)
      for (std::int64_t c = 0; c < d; ++c)
        out[i][static_cast<std::size_t>(h * d + c)] = o[i][static_cast<std::size_t>(c)];
  }
  return out;
}
}  // namespace

TEST_CASE("Attention over a paged cache equals attention over the contiguous one", "[kv_cache][paged]") {
  af::Rng rng(51);
  const af::GroupedShape shape{64, 8, 2, 8};
  for (std::int64_t page_size : {1, 3, 4, 16}) {
    af::PagedKvCache paged(64, page_size, shape.kv_heads, shape.head_dim);
    const std::int64_t other = paged.add_sequence();
    for (std::int64_t length : {1, 5, 13}) {
      const af::Tensor k = random_rows(rng, length, 16), v = random_rows(rng, length, 16), q = random_rows(rng, 3, 64);
      af::GroupedKvCache contiguous(length, shape.kv_heads, shape.head_dim);
      contiguous.append(k.matrix(), v.matrix());
      // Token by token, interleaved with another sequence's tokens, so that the pages are scattered in the pool.
      const std::int64_t seq = paged.add_sequence();
      for (std::int64_t t = 0; t < length; ++t) {
        paged.append(seq, k.matrix().rows_slice(t, 1), v.matrix().rows_slice(t, 1));
        if (t % 2 == 0) paged.append(other, random_rows(rng, 1, 16).matrix(), random_rows(rng, 1, 16).matrix());
      }
      const std::int64_t queries = std::min<std::int64_t>(3, length);
      const af::ConstMatrix q_rows = q.matrix().rows_slice(0, queries);
      const af::Tensor got = af::paged_attend(q_rows, shape, paged, seq, {});
      const af::Tensor want = af::grouped_attend(q_rows, shape, contiguous, {});
      CHECK(af::max_abs_diff(got.values(), want.values()) == 0.0);  // same operations in the same order
      CHECK(reference::max_abs_diff(got.matrix(), grouped_reference(af::to_tensor(q_rows), k, v, shape)) < 1e-5);
      paged.release(seq);
    }
  }
}

TEST_CASE("Pages come from the free list, return to it, and the last page's waste is counted", "[kv_cache][paged]") {
  af::Rng rng(52);
  af::PagedKvCache cache(4, 4, 1, 2);
  const std::int64_t a = cache.add_sequence();
  cache.append(a, random_rows(rng, 5, 2).matrix(), random_rows(rng, 5, 2).matrix());  // 2 pages: 4 + 1
  CHECK(cache.block_table(a).size() == 2);
  CHECK(cache.used_pages() == 2);
  CHECK(cache.wasted_slots(a) == 3);
  const std::int64_t b = cache.add_sequence();
  cache.append(b, random_rows(rng, 8, 2).matrix(), random_rows(rng, 8, 2).matrix());  // 2 full pages
  CHECK(cache.free_pages() == 0);
  CHECK(cache.wasted_slots(b) == 0);
  CHECK_THROWS_WITH(cache.append(a, random_rows(rng, 4, 2).matrix(), random_rows(rng, 4, 2).matrix()),
                    Catch::Matchers::Contains("all 4 pages"));
  cache.release(b);
  CHECK(cache.free_pages() == 2);
  CHECK_THROWS_AS(cache.length(b), af::Error);
  CHECK_THROWS_AS(cache.append(a, random_rows(rng, 1, 3).matrix(), random_rows(rng, 1, 3).matrix()), af::Error);
  CHECK_THROWS_AS(af::PagedKvCache(0, 4, 1, 2), af::Error);
}

TEST_CASE("A forked sequence shares its prefix's pages and copies only a shared partial page", "[kv_cache][paged]") {
  af::Rng rng(53);
  const af::GroupedShape shape{8, 2, 1, 4};
  af::PagedKvCache cache(16, 4, 1, 4);
  const af::Tensor prefix_k = random_rows(rng, 6, 4), prefix_v = random_rows(rng, 6, 4);
  const std::int64_t parent = cache.add_sequence();
  cache.append(parent, prefix_k.matrix(), prefix_v.matrix());  // pages: [full, 2 of 4]
  const std::int64_t child = cache.fork(parent);
  CHECK(cache.used_pages() == 2);
  CHECK(cache.users(cache.block_table(parent)[0]) == 2);
  const af::Tensor ka = random_rows(rng, 3, 4), va = random_rows(rng, 3, 4), kb = random_rows(rng, 1, 4),
                   vb = random_rows(rng, 1, 4);
  cache.append(parent, ka.matrix(), va.matrix());
  cache.append(child, kb.matrix(), vb.matrix());
  // The full first page stays shared; each sequence now owns a copy of the partial second page.
  CHECK(cache.block_table(parent)[0] == cache.block_table(child)[0]);
  CHECK(cache.block_table(parent)[1] != cache.block_table(child)[1]);
  CHECK(cache.used_pages() == 4);  // shared page, parent's pages 2 and 3, child's copy
  // Each sequence attends as if it had been built alone.
  for (const auto& [seq, k_tail, v_tail] : {std::tuple{parent, &ka, &va}, std::tuple{child, &kb, &vb}}) {
    const std::int64_t length = 6 + k_tail->dim(0);
    af::GroupedKvCache alone(length, 1, 4);
    alone.append(prefix_k.matrix(), prefix_v.matrix());
    alone.append(k_tail->matrix(), v_tail->matrix());
    const af::Tensor q = random_rows(rng, 1, 8);
    CHECK(af::max_abs_diff(af::paged_attend(q.matrix(), shape, cache, seq, {}).values(),
                           af::grouped_attend(q.matrix(), shape, alone, {}).values()) == 0.0);
  }
  cache.release(parent);
  CHECK(cache.users(cache.block_table(child)[0]) == 1);
  cache.release(child);
  CHECK(cache.free_pages() == 16);
}

TEST_CASE("A ragged batch step gives every sequence what decoding it alone gives", "[kv_cache][batching]") {
  af::Rng rng(54);
  const af::GroupedShape shape{32, 4, 2, 8};
  const std::int64_t width = shape.kv_heads * shape.head_dim, qwidth = shape.heads * shape.head_dim;
  af::PagedKvCache cache(64, 4, shape.kv_heads, shape.head_dim);
  std::vector<af::GroupedKvCache> alone;
  std::vector<std::int64_t> seqs;
  // Three sequences at different positions: 7, 2 and 11 cached tokens.
  for (std::int64_t length : {7, 2, 11}) {
    seqs.push_back(cache.add_sequence());
    alone.emplace_back(32, shape.kv_heads, shape.head_dim);
    const af::Tensor k = random_rows(rng, length, width), v = random_rows(rng, length, width);
    cache.append(seqs.back(), k.matrix(), v.matrix());
    alone.back().append(k.matrix(), v.matrix());
  }
  for (int step = 0; step < 3; ++step) {
    // Each step: one token for every decoding sequence, and in step 1 a new sequence joins with a prompt of 5.
    std::vector<std::int64_t> tokens(seqs.size(), 1);
    if (step == 1) {
      seqs.push_back(cache.add_sequence());
      alone.emplace_back(32, shape.kv_heads, shape.head_dim);
      tokens.push_back(5);
    }
    std::int64_t total = 0;
    for (std::int64_t n : tokens) total += n;
    const af::Tensor q = random_rows(rng, total, qwidth), k = random_rows(rng, total, width),
                     v = random_rows(rng, total, width);
    const af::Tensor batched =
        af::ragged_batch_step(q.matrix(), k.matrix(), v.matrix(), shape, cache, seqs, tokens, {});
    std::int64_t offset = 0;
    for (std::size_t i = 0; i < seqs.size(); ++i) {
      alone[i].append(k.matrix().rows_slice(offset, tokens[i]), v.matrix().rows_slice(offset, tokens[i]));
      const af::Tensor want = af::grouped_attend(q.matrix().rows_slice(offset, tokens[i]), shape, alone[i], {});
      CHECK(af::max_abs_diff(batched.matrix().rows_slice(offset, tokens[i]), want.matrix()) == 0.0);
      offset += tokens[i];
    }
  }
  const std::vector<std::int64_t> wrong = {1, 1};
  CHECK_THROWS_AS(af::ragged_batch_step(af::Tensor(af::Shape{2, 32}).matrix(), af::Tensor(af::Shape{2, 16}).matrix(),
                                        af::Tensor(af::Shape{2, 16}).matrix(), shape, cache, seqs, wrong, {}),
                  af::Error);
}
