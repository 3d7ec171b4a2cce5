// The host side of MLA decode: shape checks, the split count over pages, the launches (the split kernel, then
// the combine kernel of the dense decode at head_dim 512 when there are several splits).
#include "launchers.hpp"

#include "af/error.hpp"
#include "af/kernels/cuda_check.hpp"
#include "af/kernels/mla_decode.hpp"

#include <algorithm>
#include <bit>

namespace af::kernels {

namespace {
void validate(const af::MlaDecodeShape& s) {
  s.validate();
  require(s.latent_dim == 512, "mla decode: latent_dim is {} (expected 512, DeepSeek-V2/V3's kv_lora_rank)",
          s.latent_dim);
  require(s.rope_dim == 64, "mla decode: rope_dim is {} (expected 64, DeepSeek-V2/V3's qk_rope_head_dim)", s.rope_dim);
  require(s.batch <= 65535, "mla decode: batch is {} (expected at most 65535)", s.batch);
  require(s.q_heads <= 65535 * std::int64_t{mla_heads_per_block}, "mla decode: q_heads is {} (expected at most {})",
          s.q_heads, 65535 * std::int64_t{mla_heads_per_block});
  require(s.page_size <= 4096, "mla decode: page_size is {} (expected a power of two up to 4096)", s.page_size);
  require(s.capacity() <= std::int64_t{1} << 30,
          "mla decode: capacity is {} tokens (max_pages_per_seq {} x page_size {}; expected at most 2^30)",
          s.capacity(), s.max_pages_per_seq, s.page_size);
  require(s.num_pages <= std::int64_t{1} << 31,
          "mla decode: num_pages is {} (expected at most 2^31, the int32 page ids)", s.num_pages);
}
}  // namespace

MlaDecodePlan plan_mla_decode(const af::MlaDecodeShape& shape, int sm_count, int splits) {
  validate(shape);
  require(sm_count >= 1, "mla decode: sm_count is {} (expected at least 1)", sm_count);
  require(splits >= 0, "mla decode: splits is {} (expected 0 to choose, or a count)", splits);
  const std::int64_t head_tiles = (shape.q_heads + mla_heads_per_block - 1) / mla_heads_per_block;
  const std::int64_t base = shape.batch * head_tiles;
  const std::int64_t slots = std::int64_t{sm_count} * std::max(detail::mla_blocks_per_sm(), 1);
  // [mla-plan]
  // The dense rule on the capacity (the lengths are not known here), then whole pages per split; recount so
  // that no split starts past the capacity.
  const std::int64_t wanted = splits > 0 ? std::min<std::int64_t>(splits, shape.max_pages_per_seq)
                                         : detail::choose_splits(base, slots, shape.capacity());
  MlaDecodePlan plan;
  plan.pages_per_split = static_cast<int>((shape.max_pages_per_seq + wanted - 1) / wanted);
  plan.splits = static_cast<int>((shape.max_pages_per_seq + plan.pages_per_split - 1) / plan.pages_per_split);
  // [/mla-plan]
  require(plan.splits <= 65535, "mla decode: splits is {} (expected at most 65535)", plan.splits);
  if (plan.splits > 1)
    plan.workspace_bytes = static_cast<std::size_t>(shape.batch * shape.q_heads * plan.splits) *
                           static_cast<std::size_t>(shape.latent_dim + 1) * sizeof(float);
  return plan;
}

void mla_decode_attention(const MlaDecodePlan& plan, const af::MlaDecodeShape& shape, const std::uint16_t* q,
                          const std::uint16_t* cache, const std::int32_t* block_table, const std::int32_t* lengths,
                          std::uint16_t* out, float scale, void* workspace, std::size_t workspace_bytes,
                          cudaStream_t stream) {
  validate(shape);
  require(plan.splits >= 1 && plan.pages_per_split >= 1 &&
              std::int64_t{plan.splits} * plan.pages_per_split >= shape.max_pages_per_seq &&
              std::int64_t{plan.splits - 1} * plan.pages_per_split < shape.max_pages_per_seq,
          "mla decode: the plan ({} splits of {} pages) does not fit max_pages_per_seq = {} (expected a plan from "
          "plan_mla_decode)",
          plan.splits, plan.pages_per_split, shape.max_pages_per_seq);
  require(workspace_bytes >= plan.workspace_bytes && (plan.workspace_bytes == 0 || workspace != nullptr),
          "mla decode: workspace_bytes is {} (expected at least {})", workspace_bytes, plan.workspace_bytes);
  detail::MlaDecodeArgs a{};
  a.q = q;
  a.cache = cache;
  a.block_table = block_table;
  a.lengths = lengths;
  a.out = out;
  a.batch = static_cast<int>(shape.batch);
  a.q_heads = static_cast<int>(shape.q_heads);
  a.splits = plan.splits;
  a.page_shift = std::countr_zero(static_cast<std::uint64_t>(shape.page_size));
  a.max_pages_per_seq = static_cast<int>(shape.max_pages_per_seq);
  a.pages_per_split = plan.pages_per_split;
  a.scale_log2 = scale * 1.4426950408889634f;
  if (plan.splits > 1) {
    a.partial_o = static_cast<float*>(workspace);
    a.partial_lse = a.partial_o + shape.batch * shape.q_heads * plan.splits * shape.latent_dim;
  }
  detail::launch_decode_mla(a, stream);
  if (plan.splits > 1) {
    // The combine of the dense decode reads only these fields (decode_combine.cu).
    detail::DecodeArgs c{};
    c.out = out;
    c.partial_o = a.partial_o;
    c.partial_lse = a.partial_lse;
    c.batch = a.batch;
    c.q_heads = a.q_heads;
    c.kv_heads = 1;
    c.head_dim = static_cast<int>(shape.latent_dim);
    c.seq_len = shape.capacity();
    c.splits = plan.splits;
    c.keys_per_split = std::int64_t{plan.pages_per_split} * shape.page_size;
    c.scale_log2 = a.scale_log2;
    detail::launch_decode_combine(c, stream);
  }
}

}  // namespace af::kernels
