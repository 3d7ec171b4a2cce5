// The host side of paged decode attention (issue 20): shape checks, the split count over pages, the launches.
#include "launchers.hpp"

#include "af/error.hpp"
#include "af/kernels/cuda_check.hpp"
#include "af/kernels/paged_decode.hpp"

#include <algorithm>
#include <bit>

namespace af::kernels {

namespace {
void validate(const af::PagedDecodeShape& s) {
  s.validate();
  require(s.batch <= 65535, "paged decode: batch is {} (expected at most 65535)", s.batch);
  require(s.q_heads <= 4096, "paged decode: q_heads is {} (expected at most 4096)", s.q_heads);
  require(s.head_dim == 64 || s.head_dim == 128, "paged decode: head_dim is {} (expected 64 or 128)", s.head_dim);
  require(s.page_size == 8 || s.page_size == 16 || s.page_size == 32 || s.page_size == 64,
          "paged decode: page_size is {} (expected 8, 16, 32 or 64)", s.page_size);
  require(s.capacity() <= std::int64_t{1} << 30,
          "paged decode: capacity is {} tokens (max_pages_per_seq {} x page_size {}; expected at most 2^30)",
          s.capacity(), s.max_pages_per_seq, s.page_size);
  require(s.num_pages <= std::int64_t{1} << 31,
          "paged decode: num_pages is {} (expected at most 2^31, the int32 page ids)", s.num_pages);
}
}  // namespace

PagedDecodePlan plan_paged_decode(const af::PagedDecodeShape& shape, int sm_count, int splits, af::PagedKvFormat format,
                                  PagedDecodeKernel kernel) {
  validate(shape);
  require(sm_count >= 1, "paged decode: sm_count is {} (expected at least 1)", sm_count);
  require(splits >= 0, "paged decode: splits is {} (expected 0 to choose, or a count)", splits);
  require(format == af::PagedKvFormat::bf16 || format == af::PagedKvFormat::fp8_e4m3,
          "paged decode: format is {} (expected bf16 or fp8_e4m3)", static_cast<int>(format));
  require(kernel == PagedDecodeKernel::automatic || kernel == PagedDecodeKernel::cuda_cores ||
              kernel == PagedDecodeKernel::tensor_cores,
          "paged decode: kernel is {} (expected automatic, cuda_cores or tensor_cores)", static_cast<int>(kernel));
  require(kernel != PagedDecodeKernel::tensor_cores || shape.page_size >= 16,
          "paged decode: page_size is {} for the tensor-core kernel (expected 16, 32 or 64: a tile of 16 tokens "
          "in one page)",
          shape.page_size);
  const bool fp8 = format == af::PagedKvFormat::fp8_e4m3;
  // [paged-mma-choice]
  // The tensor cores wherever a 16-token tile lies in one page. The dense decode's `best` is version 5 at
  // every group (chapter 22: version 4 reached 94-97 % of the read ceiling from MHA to group 16, where
  // version 3 fell to 70 % and 37 % at groups 8 and 16, kernels/NOTES.md); the paged pair mirrors it.
  const bool tensor_cores =
      kernel == PagedDecodeKernel::tensor_cores || (kernel == PagedDecodeKernel::automatic && shape.page_size >= 16);
  // [/paged-mma-choice]
  const auto group = static_cast<int>(shape.group());
  const auto head_dim = static_cast<int>(shape.head_dim);
  const int heads = tensor_cores ? detail::mma_heads_per_block : detail::gqa_heads_per_block(group);
  const std::int64_t base = shape.batch * shape.kv_heads * ((group + heads - 1) / heads);
  const int per_sm =
      tensor_cores ? detail::paged_mma_blocks_per_sm(head_dim, fp8) : detail::paged_blocks_per_sm(head_dim, group, fp8);
  const std::int64_t slots = std::int64_t{sm_count} * std::max(per_sm, 1);
  // [paged-plan]
  // The dense rule on the capacity (the lengths are not known here), then whole pages per split; recount so
  // that no split starts past the capacity.
  const std::int64_t wanted = splits > 0 ? std::min<std::int64_t>(splits, shape.max_pages_per_seq)
                                         : detail::choose_splits(base, slots, shape.capacity());
  PagedDecodePlan plan;
  plan.format = format;
  plan.tensor_cores = tensor_cores;
  plan.pages_per_split = static_cast<int>((shape.max_pages_per_seq + wanted - 1) / wanted);
  plan.splits = static_cast<int>((shape.max_pages_per_seq + plan.pages_per_split - 1) / plan.pages_per_split);
  // [/paged-plan]
  require(plan.splits <= 65535, "paged decode: splits is {} (expected at most 65535)", plan.splits);
  if (plan.splits > 1)
    plan.workspace_bytes = static_cast<std::size_t>(shape.batch * shape.q_heads * plan.splits) *
                           static_cast<std::size_t>(shape.head_dim + 1) * sizeof(float);
  return plan;
}

namespace {
// Checks the plan against the shape and the format, fills the launch arguments (without the pools), launches
// the paged kernel and, with several splits, the combine.
void run(const PagedDecodePlan& plan, const af::PagedDecodeShape& shape, af::PagedKvFormat format,
         detail::PagedDecodeArgs& args, const std::uint16_t* q, std::uint16_t* out, float scale, void* workspace,
         std::size_t workspace_bytes, cudaStream_t stream) {
  validate(shape);
  require(plan.format == format,
          "paged decode: the plan was made for {} pools (expected one made for {}: pass the format to "
          "plan_paged_decode)",
          plan.format == af::PagedKvFormat::bf16 ? "bf16" : "FP8", format == af::PagedKvFormat::bf16 ? "bf16" : "FP8");
  require(plan.splits >= 1 && plan.pages_per_split >= 1 &&
              std::int64_t{plan.splits} * plan.pages_per_split >= shape.max_pages_per_seq &&
              std::int64_t{plan.splits - 1} * plan.pages_per_split < shape.max_pages_per_seq,
          "paged decode: the plan ({} splits of {} pages) does not fit max_pages_per_seq = {} (expected a plan "
          "from plan_paged_decode)",
          plan.splits, plan.pages_per_split, shape.max_pages_per_seq);
  require(!plan.tensor_cores || shape.page_size >= 16,
          "paged decode: page_size is {} for a tensor-core plan (expected 16, 32 or 64: a plan from "
          "plan_paged_decode for this shape)",
          shape.page_size);
  require(workspace_bytes >= plan.workspace_bytes && (plan.workspace_bytes == 0 || workspace != nullptr),
          "paged decode: workspace_bytes is {} (expected at least {})", workspace_bytes, plan.workspace_bytes);
  detail::DecodeArgs& a = args.base;
  a.q = q;
  a.out = out;
  a.batch = static_cast<int>(shape.batch);
  a.q_heads = static_cast<int>(shape.q_heads);
  a.kv_heads = static_cast<int>(shape.kv_heads);
  a.head_dim = static_cast<int>(shape.head_dim);
  a.seq_len = shape.capacity();  // unused by the paged kernel; the combine does not read it
  a.splits = plan.splits;
  a.keys_per_split = std::int64_t{plan.pages_per_split} * shape.page_size;
  a.scale_log2 = scale * 1.4426950408889634f;
  if (plan.splits > 1) {
    a.partial_o = static_cast<float*>(workspace);
    a.partial_lse = a.partial_o + shape.batch * shape.q_heads * plan.splits * shape.head_dim;
  }
  args.page_shift = std::countr_zero(static_cast<std::uint64_t>(shape.page_size));
  args.max_pages_per_seq = static_cast<int>(shape.max_pages_per_seq);
  args.pages_per_split = plan.pages_per_split;
  const bool fp8 = format == af::PagedKvFormat::fp8_e4m3;
  if (plan.tensor_cores)
    detail::launch_decode_paged_mma(args, fp8, stream);
  else
    detail::launch_decode_paged(args, fp8, stream);
  if (plan.splits > 1) detail::launch_decode_combine(a, stream);
}
}  // namespace

void paged_decode_attention(const PagedDecodePlan& plan, const af::PagedDecodeShape& shape, const std::uint16_t* q,
                            const std::uint16_t* k, const std::uint16_t* v, const std::int32_t* block_table,
                            const std::int32_t* lengths, std::uint16_t* out, float scale, void* workspace,
                            std::size_t workspace_bytes, cudaStream_t stream) {
  detail::PagedDecodeArgs args{};
  args.base.k = k;
  args.base.v = v;
  args.block_table = block_table;
  args.lengths = lengths;
  run(plan, shape, af::PagedKvFormat::bf16, args, q, out, scale, workspace, workspace_bytes, stream);
}

void paged_decode_attention_fp8(const PagedDecodePlan& plan, const af::PagedDecodeShape& shape, const std::uint16_t* q,
                                const std::uint8_t* k_codes, const float* k_scales, const std::uint8_t* v_codes,
                                const float* v_scales, const std::int32_t* block_table, const std::int32_t* lengths,
                                std::uint16_t* out, float scale, void* workspace, std::size_t workspace_bytes,
                                cudaStream_t stream) {
  detail::PagedDecodeArgs args{};
  args.k8 = k_codes;
  args.v8 = v_codes;
  args.k_scale = k_scales;
  args.v_scale = v_scales;
  args.block_table = block_table;
  args.lengths = lengths;
  run(plan, shape, af::PagedKvFormat::fp8_e4m3, args, q, out, scale, workspace, workspace_bytes, stream);
}

}  // namespace af::kernels
