// Paged, ragged decode attention (issue 20): version 3's split-KV kernel (decode_v2_gqa.cu) reading the
// cache through a block table. K and V live in a pool of pages [num_pages, kv_heads, page_size, D]; sequence
// b's token j is in page block_table[b][j / page_size], slot j % page_size. The lengths are read from device
// memory, so one captured CUDA graph serves every decode step. The split count is fixed on the host from the
// capacity (max_pages_per_seq pages), so a split may lie wholly past its sequence's length: it writes an
// empty partial (output 0, log-sum-exp -inf) that the combine kernel weights by exp2(-inf) = 0.
//
// The same kernel reads FP8 pools (Fp8 = true): E4M3 codes in the same layout, one float32 scale per token and
// KV head beside them (chapter 05's fp8_token cache). Each lane still holds 8 dimensions of a row (8 bytes
// instead of 16: 16 dimensions per lane would double the query and accumulator registers), turns the codes
// into float32 in registers, and applies the row's scale once per key: to the dot product for keys, to the
// softmax weight for values.
#include "decode_common.cuh"

#include "af/kernels/cuda_check.hpp"
#include "af/kernels/e4m3.hpp"
#include "af/kernels/warp.cuh"

#include <cuda_fp16.h>

namespace af::kernels::detail {
namespace {

constexpr int paged_warps = 4;
constexpr int paged_unroll = 4;  // key rows per lane loaded before the first is used

// [paged-address]
// The pool row of key (or value) j of KV head `kv_head`: its D values start at row x D, its FP8 scale is at
// row. The table row is the sequence's; lanes reading the same key read the same table entry (a broadcast).
__device__ __forceinline__ std::int64_t paged_row(const std::int32_t* table, std::int64_t j, int page_shift,
                                                  int kv_heads, int kv_head) {
  const std::int64_t page = __ldg(table + (j >> page_shift));
  const std::int64_t slot = j & ((std::int64_t{1} << page_shift) - 1);
  return ((page * kv_heads + kv_head) << page_shift) + slot;
}
// [/paged-address]

// [fp8-unpack]
// What an FP8 value in registers is worth: on sm_89 and later the hardware converts two E4M3 codes to two
// binary16 in one instruction (exact); before that, integer operations give the value / 256 (e4m3.hpp) and
// the row's scale carries the 256.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
constexpr float fp8_code_factor = 1.0f;
#else
constexpr float fp8_code_factor = e4m3_f16_factor;
#endif

// Eight cached values of one row as float32: 16 bytes of bf16, or 8 bytes of E4M3 codes (in words x and y).
template <bool Fp8>
__device__ __forceinline__ void unpack8(const uint4& raw, float (&x)[8]) {
  if constexpr (Fp8) {
    const std::uint32_t w[2] = {raw.x, raw.y};
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      std::uint32_t h01, h23;  // two binary16 each, the lower code in the lower half
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
      asm("{\n .reg .b16 lo, hi;\n mov.b32 {lo, hi}, %2;\n cvt.rn.f16x2.e4m3x2 %0, lo;\n cvt.rn.f16x2.e4m3x2 %1, hi;\n}"
          : "=r"(h01), "=r"(h23)
          : "r"(w[i]));
#else
      h01 = e4m3x2_to_f16x2(w[i]);
      h23 = e4m3x2_to_f16x2(w[i] >> 16);
#endif
      x[4 * i] = __half2float(__ushort_as_half(static_cast<unsigned short>(h01 & 0xFFFFu)));
      x[4 * i + 1] = __half2float(__ushort_as_half(static_cast<unsigned short>(h01 >> 16)));
      x[4 * i + 2] = __half2float(__ushort_as_half(static_cast<unsigned short>(h23 & 0xFFFFu)));
      x[4 * i + 3] = __half2float(__ushort_as_half(static_cast<unsigned short>(h23 >> 16)));
    }
  } else {
    const std::uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      x[2 * i] = bf16_lo(w[i]);
      x[2 * i + 1] = bf16_hi(w[i]);
    }
  }
}
// [/fp8-unpack]

// D: head_dim. Heads: query heads per block (the group, or a slice of 8 of it when the group exceeds 8).
// Fp8: the pools hold E4M3 codes and scales (pa.k8, pa.v8, pa.k_scale, pa.v_scale) instead of bf16.
template <int D, int Heads, bool Fp8>
__global__ void __launch_bounds__(paged_warps * 32) decode_paged_kernel(PagedDecodeArgs pa) {
  const DecodeArgs& a = pa.base;
  constexpr int lanes_per_key = D / 8;               // 16 bytes per lane per key row
  constexpr int keys_per_step = 32 / lanes_per_key;  // key rows one warp load instruction covers
  constexpr int keys_per_chunk = keys_per_step * paged_unroll;
  const int group = a.q_heads / a.kv_heads, tiles = (group + Heads - 1) / Heads;
  const int split = blockIdx.x, kv_head = blockIdx.y / tiles, tile = blockIdx.y % tiles, b = blockIdx.z;
  const int h0 = kv_head * group + tile * Heads, rows = min(Heads, group - tile * Heads);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int slot = lane / lanes_per_key, chunk = lane % lanes_per_key;  // which key row, which 8 dims

  const KeyRange keys = paged_split_keys(pa.lengths, b, split, pa.max_pages_per_seq, pa.pages_per_split, pa.page_shift);
  const std::int64_t key_begin = keys.begin, key_end = keys.end;
  const std::int32_t* table = pa.block_table + std::int64_t{b} * pa.max_pages_per_seq;
  if (key_begin >= key_end) {
    write_empty_split<D>(a.out, a.partial_o, a.partial_lse, a.q_heads, a.splits, b, h0, rows, split);
    return;
  }

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
  float m[Heads], l[Heads], acc[Heads][8];
#pragma unroll
  for (int h = 0; h < Heads; ++h) {
    m[h] = -FLT_MAX;
    l[h] = 0.0f;
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[h][i] = 0.0f;
  }

  for (std::int64_t first = key_begin + warp * keys_per_chunk; first < key_end; first += paged_warps * keys_per_chunk) {
    // [paged-load]
    // As in version 3, every load of the chunk before using any; each key's address goes through the table.
    // FP8: 8 bytes of codes per lane and the row's two scales (the 16 lanes of a key read the same ones).
    uint4 kr[paged_unroll], vr[paged_unroll];
    float k_scale[paged_unroll], v_scale[paged_unroll];
#pragma unroll
    for (int u = 0; u < paged_unroll; ++u) {
      const std::int64_t key = min(first + u * keys_per_step + slot, key_end - 1);  // clamped, masked below
      const std::int64_t row = paged_row(table, key, pa.page_shift, a.kv_heads, kv_head);
      const std::int64_t at = row * D + chunk * 8;
      if constexpr (Fp8) {
        const uint2 kc = __ldg(reinterpret_cast<const uint2*>(pa.k8 + at));
        const uint2 vc = __ldg(reinterpret_cast<const uint2*>(pa.v8 + at));
        kr[u] = make_uint4(kc.x, kc.y, 0, 0);
        vr[u] = make_uint4(vc.x, vc.y, 0, 0);
        k_scale[u] = __ldg(pa.k_scale + row) * fp8_code_factor;
        v_scale[u] = __ldg(pa.v_scale + row) * fp8_code_factor;
      } else {
        kr[u] = load16(a.k + at);
        vr[u] = load16(a.v + at);
        k_scale[u] = v_scale[u] = 1.0f;  // folded away by the compiler
      }
    }
    // [/paged-load]
    float s[paged_unroll][Heads];
#pragma unroll
    for (int u = 0; u < paged_unroll; ++u) {
      float kx[8];
      unpack8<Fp8>(kr[u], kx);
      const bool valid = first + u * keys_per_step + slot < key_end;
#pragma unroll
      for (int h = 0; h < Heads; ++h) {
        float dot = 0.0f;
#pragma unroll
        for (int i = 0; i < 8; ++i) dot = fmaf(q[h][i], kx[i], dot);
        dot = warp_sum<lanes_per_key>(dot) * k_scale[u];  // the key's scale, once per key
        s[u][h] = valid ? dot : -INFINITY;
      }
    }
#pragma unroll
    for (int h = 0; h < Heads; ++h) {
      float chunk_max = s[0][h];
#pragma unroll
      for (int u = 1; u < paged_unroll; ++u) chunk_max = fmaxf(chunk_max, s[u][h]);
      const float m_new = fmaxf(m[h], chunk_max), alpha = exp2f(m[h] - m_new);
      l[h] *= alpha;
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[h][i] *= alpha;
#pragma unroll
      for (int u = 0; u < paged_unroll; ++u) {
        const float p = exp2f(s[u][h] - m_new);  // 0 for a masked key
        l[h] += p;
        float vx[8];
        unpack8<Fp8>(vr[u], vx);
        const float pv = p * v_scale[u];  // the value's scale, once per key
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[h][i] = fmaf(pv, vx[i], acc[h][i]);
      }
      m[h] = m_new;
    }
  }

  // The key slots of a warp, then the warps of the block: the same merge as version 3.
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
  __shared__ float sm_o[paged_warps][Heads][D];
  __shared__ float sm_m[paged_warps][Heads], sm_l[paged_warps][Heads];
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
  merge_warps_and_store<paged_warps, Heads, D>(sm_o, sm_m, sm_l, rows, a, b, h0, split);
}

template <int D, int Heads, bool Fp8>
void launch(const PagedDecodeArgs& a, cudaStream_t stream) {
  const int group = a.base.q_heads / a.base.kv_heads, tiles = (group + Heads - 1) / Heads;
  const dim3 grid(static_cast<unsigned>(a.base.splits), static_cast<unsigned>(a.base.kv_heads * tiles),
                  static_cast<unsigned>(a.base.batch));
  decode_paged_kernel<D, Heads, Fp8><<<grid, paged_warps * 32, 0, stream>>>(a);
  AF_CHECK_LAUNCH();
}

template <int D, bool Fp8>
void launch_for_dim(const PagedDecodeArgs& a, cudaStream_t stream) {
  switch (gqa_heads_per_block(a.base.q_heads / a.base.kv_heads)) {
    case 1:
      launch<D, 1, Fp8>(a, stream);
      break;
    case 2:
      launch<D, 2, Fp8>(a, stream);
      break;
    case 4:
      launch<D, 4, Fp8>(a, stream);
      break;
    default:
      launch<D, 8, Fp8>(a, stream);
      break;
  }
}

template <bool Fp8>
void launch_for_format(const PagedDecodeArgs& a, cudaStream_t stream) {
  if (a.base.head_dim == 64)
    launch_for_dim<64, Fp8>(a, stream);
  else
    launch_for_dim<128, Fp8>(a, stream);
}

template <int D, int Heads, bool Fp8>
int occupancy() {
  int blocks = 0;
  CUDA_CHECK(
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, decode_paged_kernel<D, Heads, Fp8>, paged_warps * 32, 0));
  return blocks;
}

template <int D, bool Fp8>
int occupancy_for_dim(int heads) {
  switch (heads) {
    case 1:
      return occupancy<D, 1, Fp8>();
    case 2:
      return occupancy<D, 2, Fp8>();
    case 4:
      return occupancy<D, 4, Fp8>();
    default:
      return occupancy<D, 8, Fp8>();
  }
}

template <bool Fp8>
int occupancy_for_format(int head_dim, int heads) {
  return head_dim == 64 ? occupancy_for_dim<64, Fp8>(heads) : occupancy_for_dim<128, Fp8>(heads);
}

}  // namespace

int paged_blocks_per_sm(int head_dim, int group, bool fp8) {
  const int heads = gqa_heads_per_block(group);
  return fp8 ? occupancy_for_format<true>(head_dim, heads) : occupancy_for_format<false>(head_dim, heads);
}

void launch_decode_paged(const PagedDecodeArgs& a, bool fp8, cudaStream_t stream) {
  if (fp8)
    launch_for_format<true>(a, stream);
  else
    launch_for_format<false>(a, stream);
}

}  // namespace af::kernels::detail
