// Decode attention, versions 2 and 3: one block per (sequence, KV head, split), holding the queries of the
// KV head's whole group, so that each cached key and value is read from memory once for all of them.
// A key row of head_dim bf16 is read by head_dim/8 lanes, 16 bytes each (one row of 256 bytes = 16 lanes
// for head_dim 128, so a warp reads two rows per load instruction, fully coalesced). Each warp runs its own
// online softmax over every fourth chunk of keys; the block merges its warps at the end. With one split
// (version 2) the block writes the output; with several (version 3) it writes a partial output and its
// log-sum-exp for the combine kernel. Chapters 21 and 22.
#include "decode_common.cuh"

#include "af/kernels/cuda_check.hpp"
#include "af/kernels/warp.cuh"

namespace af::kernels::detail {
namespace {

constexpr int gqa_warps = 4;
constexpr int gqa_unroll = 4;  // key rows per lane loaded before the first is used

// [decode-gqa]
// D: head_dim. Heads: query heads per block (the group, or a slice of it when the group exceeds 8).
template <int D, int Heads>
__global__ void __launch_bounds__(gqa_warps * 32) decode_gqa_kernel(DecodeArgs a) {
  // [gqa-who-reads-what]
  constexpr int lanes_per_key = D / 8;               // 16 bytes per lane per key row
  constexpr int keys_per_step = 32 / lanes_per_key;  // key rows one warp load instruction covers
  constexpr int keys_per_chunk = keys_per_step * gqa_unroll;
  const int group = a.q_heads / a.kv_heads, tiles = (group + Heads - 1) / Heads;
  const int split = blockIdx.x, kv_head = blockIdx.y / tiles, tile = blockIdx.y % tiles, b = blockIdx.z;
  const int h0 = kv_head * group + tile * Heads, rows = min(Heads, group - tile * Heads);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int slot = lane / lanes_per_key, chunk = lane % lanes_per_key;  // which key row, which 8 dims
  const std::int64_t key_begin = split * a.keys_per_split;
  const std::int64_t key_end = min(a.seq_len, key_begin + a.keys_per_split);
  const std::int64_t cache = (std::int64_t{b} * a.kv_heads + kv_head) * a.seq_len * D + chunk * 8;
  // [/gqa-who-reads-what]

  // [gqa-queries]
  // This lane's 8 dimensions of every query of the group, pre-scaled to log2 units.
  float q[Heads][8];
#pragma unroll
  for (int h = 0; h < Heads; ++h) {
    uint4 words = make_uint4(0, 0, 0, 0);
    if (h < rows) words = load16(a.q + (std::int64_t{b} * a.q_heads + h0 + h) * D + chunk * 8);
    const std::uint32_t w[4] = {words.x, words.y, words.z, words.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      q[h][2 * i] = bf16_lo(w[i]) * a.scale_log2;
      q[h][2 * i + 1] = bf16_hi(w[i]) * a.scale_log2;
    }
  }
  // [/gqa-queries]
  float m[Heads], l[Heads], acc[Heads][8];
#pragma unroll
  for (int h = 0; h < Heads; ++h) {
    m[h] = -FLT_MAX;
    l[h] = 0.0f;
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[h][i] = 0.0f;
  }

  for (std::int64_t first = key_begin + warp * keys_per_chunk; first < key_end; first += gqa_warps * keys_per_chunk) {
    // [gqa-load]
    // Issue every load of the chunk before using any: 2 * gqa_unroll independent 16-byte loads per lane.
    uint4 kr[gqa_unroll], vr[gqa_unroll];
#pragma unroll
    for (int u = 0; u < gqa_unroll; ++u) {
      const std::int64_t key = min(first + u * keys_per_step + slot, key_end - 1);  // clamped, masked below
      kr[u] = load16(a.k + cache + key * D);
      vr[u] = load16(a.v + cache + key * D);
    }
    // [/gqa-load]
    // [gqa-scores]
    float s[gqa_unroll][Heads];
#pragma unroll
    for (int u = 0; u < gqa_unroll; ++u) {
      const std::uint32_t w[4] = {kr[u].x, kr[u].y, kr[u].z, kr[u].w};
      const bool valid = first + u * keys_per_step + slot < key_end;
#pragma unroll
      for (int h = 0; h < Heads; ++h) {
        float dot = 0.0f;
#pragma unroll
        for (int i = 0; i < 4; ++i) dot = fmaf(q[h][2 * i + 1], bf16_hi(w[i]), fmaf(q[h][2 * i], bf16_lo(w[i]), dot));
        dot = warp_sum<lanes_per_key>(dot);  // the lanes of one key row hold the whole q . k
        s[u][h] = valid ? dot : -INFINITY;
      }
    }
    // [/gqa-scores]
    // [gqa-online-softmax]
#pragma unroll
    for (int h = 0; h < Heads; ++h) {
      float chunk_max = s[0][h];
#pragma unroll
      for (int u = 1; u < gqa_unroll; ++u) chunk_max = fmaxf(chunk_max, s[u][h]);
      const float m_new = fmaxf(m[h], chunk_max), alpha = exp2f(m[h] - m_new);
      l[h] *= alpha;
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[h][i] *= alpha;
#pragma unroll
      for (int u = 0; u < gqa_unroll; ++u) {
        const float p = exp2f(s[u][h] - m_new);  // 0 for a masked key
        l[h] += p;
        const std::uint32_t w[4] = {vr[u].x, vr[u].y, vr[u].z, vr[u].w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          acc[h][2 * i] = fmaf(p, bf16_lo(w[i]), acc[h][2 * i]);
          acc[h][2 * i + 1] = fmaf(p, bf16_hi(w[i]), acc[h][2 * i + 1]);
        }
      }
      m[h] = m_new;
    }
    // [/gqa-online-softmax]
  }

  // [gqa-merge]
  // The key slots of a warp ran separate softmaxes: merge them by shuffles (lane ^ offset is the same
  // 8 dimensions of another slot), then the warps through shared memory.
#pragma unroll
  for (int offset = lanes_per_key; offset < 32; offset *= 2) {
#pragma unroll
    for (int h = 0; h < Heads; ++h) {
      const float m_other = __shfl_xor_sync(0xffffffffu, m[h], offset);
      const float m_new = fmaxf(m[h], m_other);
      const float mine = exp2f(m[h] - m_new), theirs = exp2f(m_other - m_new);
      l[h] = l[h] * mine + __shfl_xor_sync(0xffffffffu, l[h], offset) * theirs;
#pragma unroll
      for (int i = 0; i < 8; ++i)
        acc[h][i] = acc[h][i] * mine + __shfl_xor_sync(0xffffffffu, acc[h][i], offset) * theirs;
      m[h] = m_new;
    }
  }
  __shared__ float sm_o[gqa_warps][Heads][D];
  __shared__ float sm_m[gqa_warps][Heads], sm_l[gqa_warps][Heads];
  if (slot == 0) {
#pragma unroll
    for (int h = 0; h < Heads; ++h) {
#pragma unroll
      for (int i = 0; i < 8; ++i) sm_o[warp][h][chunk * 8 + i] = acc[h][i];
      if (chunk == 0) {
        sm_m[warp][h] = m[h];
        sm_l[warp][h] = l[h];
      }
    }
  }
  __syncthreads();
  merge_warps_and_store<gqa_warps, Heads, D>(sm_o, sm_m, sm_l, rows, a, b, h0, split);
  // [/gqa-merge]
}
// [/decode-gqa]

template <int D, int Heads>
void launch(const DecodeArgs& a, cudaStream_t stream) {
  const int group = a.q_heads / a.kv_heads, tiles = (group + Heads - 1) / Heads;
  const dim3 grid(static_cast<unsigned>(a.splits), static_cast<unsigned>(a.kv_heads * tiles),
                  static_cast<unsigned>(a.batch));
  decode_gqa_kernel<D, Heads><<<grid, gqa_warps * 32, 0, stream>>>(a);
  AF_CHECK_LAUNCH();
}

template <int D>
void launch_for_dim(const DecodeArgs& a, cudaStream_t stream) {
  switch (gqa_heads_per_block(a.q_heads / a.kv_heads)) {
    case 1:
      launch<D, 1>(a, stream);
      break;
    case 2:
      launch<D, 2>(a, stream);
      break;
    case 4:
      launch<D, 4>(a, stream);
      break;
    default:
      launch<D, 8>(a, stream);
      break;
  }
}

template <int D, int Heads>
int occupancy() {
  int blocks = 0;
  CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, decode_gqa_kernel<D, Heads>, gqa_warps * 32, 0));
  return blocks;
}

template <int D>
int occupancy_for_dim(int heads) {
  switch (heads) {
    case 1:
      return occupancy<D, 1>();
    case 2:
      return occupancy<D, 2>();
    case 4:
      return occupancy<D, 4>();
    default:
      return occupancy<D, 8>();
  }
}

}  // namespace

int gqa_heads_per_block(int group) {
  // The next power of two, at most 8: more would not fit the registers of a lane (q and acc are Heads x 8).
  int heads = 1;
  while (heads < group && heads < 8) heads *= 2;
  return heads;
}

int gqa_blocks_per_sm(int head_dim, int group) {
  const int heads = gqa_heads_per_block(group);
  switch (head_dim) {
    case 64:
      return occupancy_for_dim<64>(heads);
    case 128:
      return occupancy_for_dim<128>(heads);
    default:
      return occupancy_for_dim<256>(heads);
  }
}

void launch_decode_gqa(const DecodeArgs& a, cudaStream_t stream) {
  switch (a.head_dim) {
    case 64:
      launch_for_dim<64>(a, stream);
      break;
    case 128:
      launch_for_dim<128>(a, stream);
      break;
    default:
      launch_for_dim<256>(a, stream);
      break;
  }
}

}  // namespace af::kernels::detail
