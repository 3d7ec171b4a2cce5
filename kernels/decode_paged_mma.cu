// Paged, ragged decode attention on the tensor cores: version 4's loop (decode_v4_mma.cu: up to 16 query heads
// of one KV group as the 16 rows of mma.sync.m16n8k16, each warp walking 16 keys at a time, loads from global
// memory straight into mma fragments) reading the page pools of decode_paged.cu through the block table, over
// bf16 pools and over FP8 E4M3 pools with one float32 scale per pool row.
//
// Version 4, not version 5: v5 keeps a second tile in flight (234 registers at two blocks per multiprocessor
// in the dense decode, kernels/NOTES.md) and bought 2-3 %; the paged loop adds a table read on each tile's
// address path and, over FP8, the code conversion and eight scales per lane, which a second tile would double.
// Version 4's 167 registers leave that room at three blocks per multiprocessor.
//
// Pages: a warp's tile is 16 consecutive tokens starting at a multiple of 16. At page_size 16, 32 or 64 those
// lie in one page, at consecutive pool rows: one table read per tile, then the dense tile load with the
// page's rows as the cache (load_tile's clamp to the last valid token stays inside the page). Page size 8
// would put a tile across two pages; it stays on the CUDA-core kernel (paged_decode.cpp picks).
#include "mma_tile.cuh"

#include "af/kernels/cuda_check.hpp"
#include "af/kernels/e4m3.hpp"

namespace af::kernels::detail {
namespace {

constexpr int paged_mma_warps = 4;

// [paged-mma-fp8-load]
// load_tile over E4M3 pools: the same lanes, rows and head-dimension pieces, 8 bytes of codes per piece
// instead of 16 bytes of bf16. Every load is issued before any conversion; the conversion then writes each
// piece's 8 codes as the 4 bf16 pairs that load_tile would have loaded (exactly the values, e4m3.hpp), so the
// tile feeds attend_tile unchanged. Rows past `rows` (the valid tokens of this tile) are clamped to the last
// valid one, as in load_tile.
template <int D>
__device__ __forceinline__ void load_tile_fp8(Tile<D>& tile, const std::uint8_t* k, const std::uint8_t* v, int rows,
                                              int g, int t) {
  uint2 kc[2][D / 32], vc[4][D / 64];
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const int key = min(8 * j + g, rows - 1);
#pragma unroll
    for (int i = 0; i < D / 32; ++i) kc[j][i] = __ldg(reinterpret_cast<const uint2*>(k + key * D + (4 * i + t) * 8));
  }
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const int key = min(2 * t + (r & 1) + 8 * (r >> 1), rows - 1);
#pragma unroll
    for (int c = 0; c < D / 64; ++c) vc[r][c] = __ldg(reinterpret_cast<const uint2*>(v + key * D + (g + 8 * c) * 8));
  }
  const auto widen = [](uint2 codes) {  // codes of dims 0..7 -> bf16 pairs (0,1) (2,3) (4,5) (6,7)
    return make_uint4(e4m3x2_to_bf16x2(codes.x), e4m3x2_to_bf16x2(codes.x >> 16), e4m3x2_to_bf16x2(codes.y),
                      e4m3x2_to_bf16x2(codes.y >> 16));
  };
#pragma unroll
  for (int j = 0; j < 2; ++j)
#pragma unroll
    for (int i = 0; i < D / 32; ++i) tile.k[j][i] = widen(kc[j][i]);
#pragma unroll
  for (int r = 0; r < 4; ++r)
#pragma unroll
    for (int c = 0; c < D / 64; ++c) tile.v[r][c] = widen(vc[r][c]);
}
// [/paged-mma-fp8-load]

// D: head_dim. Fp8: the pools hold E4M3 codes and scales (pa.k8, pa.v8, pa.k_scale, pa.v_scale).
template <int D, bool Fp8>
__global__ void __launch_bounds__(paged_mma_warps * 32, 3) decode_paged_mma_kernel(PagedDecodeArgs pa) {
  const DecodeArgs& a = pa.base;
  constexpr int k_steps = D / 16;
  const int group = a.q_heads / a.kv_heads, tiles = (group + 15) / 16;
  const int split = blockIdx.x, kv_head = blockIdx.y / tiles, tile_index = blockIdx.y % tiles, b = blockIdx.z;
  const int h0 = kv_head * group + tile_index * 16, rows = min(16, group - tile_index * 16);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;

  // This split's tokens and the empty split's partial, as decode_paged.cu has them (decode_common.cuh).
  const KeyRange keys = paged_split_keys(pa.lengths, b, split, pa.max_pages_per_seq, pa.pages_per_split, pa.page_shift);
  const std::int64_t key_begin = keys.begin, key_end = keys.end;
  const std::int32_t* table = pa.block_table + std::int64_t{b} * pa.max_pages_per_seq;
  if (key_begin >= key_end) {
    write_empty_split<D>(a.out, a.partial_o, a.partial_lse, a.q_heads, a.splits, b, h0, rows, split);
    return;
  }

  // Query fragments in version 4's permuted order (decode_v4_mma.cu); rows past the group are 0.
  std::uint32_t qa[k_steps][4];
#pragma unroll
  for (int s = 0; s < k_steps; ++s) {
    const int col = (4 * (s / 2) + t) * 8 + 4 * (s % 2);
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int r = g + 8 * half;
      std::uint32_t lo = 0, hi = 0;
      if (r < rows) {
        const std::uint16_t* row = a.q + (std::int64_t{b} * a.q_heads + h0 + r) * D + col;
        lo = *reinterpret_cast<const std::uint32_t*>(row);
        hi = *reinterpret_cast<const std::uint32_t*>(row + 2);
      }
      qa[s][half] = lo;
      qa[s][2 + half] = hi;
    }
  }

  RowState<D> st;
  st.start();

  const std::int64_t slot_mask = (std::int64_t{1} << pa.page_shift) - 1;
  for (std::int64_t key0 = key_begin + warp * 16; key0 < key_end; key0 += paged_mma_warps * 16) {
    // [paged-mma-tile-address]
    // The tile's 16 tokens lie in one page (key0 is a multiple of 16, page_size a multiple of 16): one table
    // read gives the pool row of token key0, and tokens key0 + i are the rows after it. `valid` counts the
    // tile's tokens below the length; the loads clamp to the last of them, so no row past the length (which
    // may hold anything) is read.
    const std::int64_t page = __ldg(table + (key0 >> pa.page_shift));
    const std::int64_t row0 = ((page * a.kv_heads + kv_head) << pa.page_shift) + (key0 & slot_mask);
    const int valid = static_cast<int>(min(std::int64_t{16}, key_end - key0));
    // [/paged-mma-tile-address]
    Tile<D> tile;
    if constexpr (Fp8) {
      load_tile_fp8(tile, pa.k8 + row0 * D, pa.v8 + row0 * D, valid, g, t);
      // [paged-mma-scales]
      // The scales of this lane's columns of S and P: keys key0 + 8j + 2t + e (clamped like the rows).
      ColumnScales scales;
#pragma unroll
      for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const std::int64_t row = row0 + min(8 * j + 2 * t + e, valid - 1);
          scales.k[j][e] = __ldg(pa.k_scale + row);
          scales.v[j][e] = __ldg(pa.v_scale + row);
        }
      // [/paged-mma-scales]
      attend_tile(st, tile, qa, key0, key_end, key_end, a.scale_log2, t, scales);
    } else {
      load_tile(tile, a.k + row0 * D, a.v + row0 * D, 0, valid, g, t, false);
      attend_tile(st, tile, qa, key0, key_end, key_end, a.scale_log2, t);
    }
  }

#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;");
#endif
  finish_rows<paged_mma_warps, D>(st, rows, a, b, h0, split);  // version 4's ending (mma_tile.cuh)
}

template <int D, bool Fp8>
void launch(const PagedDecodeArgs& a, cudaStream_t stream) {
  const int group = a.base.q_heads / a.base.kv_heads, tiles = (group + 15) / 16;
  const dim3 grid(static_cast<unsigned>(a.base.splits), static_cast<unsigned>(a.base.kv_heads * tiles),
                  static_cast<unsigned>(a.base.batch));
  decode_paged_mma_kernel<D, Fp8><<<grid, paged_mma_warps * 32, 0, stream>>>(a);
  AF_CHECK_LAUNCH();
}

template <int D, bool Fp8>
int occupancy() {
  int blocks = 0;
  CUDA_CHECK(
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, decode_paged_mma_kernel<D, Fp8>, paged_mma_warps * 32, 0));
  return blocks;
}

}  // namespace

int paged_mma_blocks_per_sm(int head_dim, bool fp8) {
  if (fp8) return head_dim == 64 ? occupancy<64, true>() : occupancy<128, true>();
  return head_dim == 64 ? occupancy<64, false>() : occupancy<128, false>();
}

void launch_decode_paged_mma(const PagedDecodeArgs& a, bool fp8, cudaStream_t stream) {
  if (fp8)
    a.base.head_dim == 64 ? launch<64, true>(a, stream) : launch<128, true>(a, stream);
  else
    a.base.head_dim == 64 ? launch<64, false>(a, stream) : launch<128, false>(a, stream);
}

}  // namespace af::kernels::detail
