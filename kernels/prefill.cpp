// The host side of the causal varlen prefill (issue 20): shape checks and the launch.
#include "launchers.hpp"

#include "af/error.hpp"
#include "af/kernels/prefill.hpp"

namespace af::kernels {

void prefill_attention(const af::VarlenShape& shape, std::int64_t max_query_len, const std::uint16_t* q,
                       const std::uint16_t* k, const std::uint16_t* v, const std::int32_t* cu_q,
                       const std::int32_t* cu_k, std::uint16_t* out, float scale, cudaStream_t stream) {
  // The checks of VarlenShape::validate, here so that the benchmark's library needs no more of af than af::Error.
  require(shape.batch >= 1, "prefill: batch is {} (expected at least 1)", shape.batch);
  require(shape.kv_heads >= 1, "prefill: kv_heads is {} (expected at least 1)", shape.kv_heads);
  require(shape.q_heads >= shape.kv_heads && shape.q_heads % shape.kv_heads == 0,
          "prefill: q_heads is {} (expected a multiple of kv_heads = {})", shape.q_heads, shape.kv_heads);
  require(shape.head_dim == 64 || shape.head_dim == 128, "prefill: head_dim is {} (expected 64 or 128)",
          shape.head_dim);
  require(shape.batch <= 65535, "prefill: batch is {} (expected at most 65535)", shape.batch);
  require(shape.q_heads <= 65535, "prefill: q_heads is {} (expected at most 65535)", shape.q_heads);
  require(max_query_len >= 1 && max_query_len <= (std::int64_t{1} << 31) - 1,
          "prefill: max_query_len is {} (expected 1 .. 2^31 - 1)", max_query_len);
  detail::PrefillArgs a{};
  a.q = q;
  a.k = k;
  a.v = v;
  a.out = out;
  a.cu_q = cu_q;
  a.cu_k = cu_k;
  a.batch = static_cast<int>(shape.batch);
  a.q_heads = static_cast<int>(shape.q_heads);
  a.kv_heads = static_cast<int>(shape.kv_heads);
  a.head_dim = static_cast<int>(shape.head_dim);
  a.max_query_len = max_query_len;
  a.scale_log2 = scale * 1.4426950408889634f;
  detail::launch_prefill_mma(a, stream);
}

}  // namespace af::kernels
