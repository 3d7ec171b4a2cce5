// Causal prefill and append on the tensor cores (issue 20): FlashAttention-2's division of the work. A block
// takes 64 consecutive query positions of one query head of one sequence; each of its 4 warps owns 16 of
// them as the rows of an mma.sync.m16n8k16 tile and walks the keys 16 at a time from the first up to its own
// diagonal, with the online softmax of chapter 22 in registers: S = Q K^T, the running maximum and sum, then
// O += P V, all per row, no reduction across warps and no shared memory. Row i of the warp sees the keys
// below past + i + 1, so the tiles on the diagonal are masked per row and the tiles above it are never
// loaded. The keys come from the packed varlen layout of af/varlen_attention.hpp, kv_heads * D values apart.
#include "mma_tile.cuh"

#include "af/kernels/cuda_check.hpp"

namespace af::kernels::detail {
namespace {

constexpr int prefill_warps = 4;
constexpr int prefill_rows = 16 * prefill_warps;  // query positions per block

// [prefill-mma]
template <int D>
__global__ void __launch_bounds__(prefill_warps * 32) prefill_mma_kernel(PrefillArgs a) {
  constexpr int k_steps = D / 16, n_tiles = D / 8;
  const int b = blockIdx.z, h = blockIdx.y, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const std::int64_t q_first = a.cu_q[b], query_len = a.cu_q[b + 1] - q_first;
  const std::int64_t k_first = a.cu_k[b], key_len = a.cu_k[b + 1] - k_first;
  const std::int64_t row0 = std::int64_t{blockIdx.x} * prefill_rows + warp * 16;
  if (row0 >= query_len) return;                  // no shared memory, no barrier: a warp without rows just leaves
  const std::int64_t past = key_len - query_len;  // query i sits at position past + i
  const std::int64_t stride = std::int64_t{a.kv_heads} * D;
  const int kv_head = h / (a.q_heads / a.kv_heads);
  const std::uint16_t* k = a.k + k_first * stride + kv_head * D;
  const std::uint16_t* v = a.v + k_first * stride + kv_head * D;

  // Query fragments of rows row0 + g and row0 + 8 + g, permuted as load_tile permutes the keys; rows past
  // the sequence's queries are 0 and never stored.
  std::uint32_t qa[k_steps][4];
#pragma unroll
  for (int s = 0; s < k_steps; ++s) {
    const int col = (4 * (s / 2) + t) * 8 + 4 * (s % 2);
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const std::int64_t r = row0 + g + 8 * half;
      std::uint32_t lo = 0, hi = 0;
      if (r < query_len) {
        const std::uint16_t* row = a.q + ((q_first + r) * a.q_heads + h) * D + col;
        lo = *reinterpret_cast<const std::uint32_t*>(row);
        hi = *reinterpret_cast<const std::uint32_t*>(row + 2);
      }
      qa[s][half] = lo;
      qa[s][2 + half] = hi;
    }
  }

  RowState<D> st;
  st.start();
  // Causal ends: row r sees keys [0, past + r + 1); the warp's last row sees the most.
  const std::int64_t end_lo = min(key_len, past + row0 + g + 1), end_hi = min(key_len, past + row0 + g + 9);
  const std::int64_t warp_end = min(key_len, past + row0 + 16);
  Tile<D> tile;
  for (std::int64_t key0 = 0; key0 < warp_end; key0 += 16) {
    load_tile(tile, k, v, key0, warp_end, g, t, false, stride);
    attend_tile(st, tile, qa, key0, end_lo, end_hi, a.scale_log2, t);
  }

  // Each row's sum over its 4 lanes, then O / l in bf16. Lane (g, t) holds columns
  // 64 (n / 8) + 8 (2t + e % 2) + n % 8 of rows g (e < 2) and g + 8 (the layout load_tile's V order gives).
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    st.l[r] += __shfl_xor_sync(0xffffffffu, st.l[r], 1);
    st.l[r] += __shfl_xor_sync(0xffffffffu, st.l[r], 2);
  }
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const std::int64_t r = row0 + g + 8 * half;
    if (r >= query_len) continue;
    std::uint16_t* out = a.out + ((q_first + r) * a.q_heads + h) * D;
    const float inv = 1.0f / st.l[half];
#pragma unroll
    for (int n = 0; n < n_tiles; ++n)
#pragma unroll
      for (int e = 0; e < 2; ++e) out[64 * (n / 8) + 8 * (2 * t + e) + n % 8] = to_bf16(st.o[n][2 * half + e] * inv);
  }
}
// [/prefill-mma]

template <int D>
void launch(const PrefillArgs& a, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((a.max_query_len + prefill_rows - 1) / prefill_rows),
                  static_cast<unsigned>(a.q_heads), static_cast<unsigned>(a.batch));
  prefill_mma_kernel<D><<<grid, prefill_warps * 32, 0, stream>>>(a);
  AF_CHECK_LAUNCH();
}

}  // namespace

void launch_prefill_mma(const PrefillArgs& a, cudaStream_t stream) {
  a.head_dim == 64 ? launch<64>(a, stream) : launch<128>(a, stream);
}

}  // namespace af::kernels::detail
