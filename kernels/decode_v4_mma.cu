// Decode attention, versions 4 and 5: split-KV with both products on the tensor cores. A block takes up to 16
// query heads of one KV head's group as the 16 rows of an mma.sync.m16n8k16 tile (bf16 in, float32
// accumulate); each warp walks 16 cached keys at a time: S = Q K^T as two 16 x 8 tiles, the online softmax
// on S in registers, then O += P V as head_dim/8 tiles of 16 x 8. The loads go from global memory straight
// into the mma fragments, 16 bytes per lane: the order of the head dimensions inside a dot product does not
// change its sum, so each lane loads whole 16-byte pieces of a key row and the query fragments are loaded
// in the same permuted order. Chapter 22.
#include "mma_tile.cuh"

#include "af/kernels/cuda_check.hpp"

namespace af::kernels::detail {
namespace {

constexpr int mma_warps = 4;

// [decode-mma]
// Pipelined = false: version 4 (load a tile, then compute on it). Pipelined = true: version 5 (the loads of
// the warp's next tile are issued before the math on this one, so a warp always has a tile in flight).
template <int D, bool Pipelined>
__global__ void __launch_bounds__(mma_warps * 32, Pipelined ? 2 : 3) decode_mma_kernel(DecodeArgs a) {
  constexpr int k_steps = D / 16;  // mma steps along head_dim for S = Q K^T
  const int group = a.q_heads / a.kv_heads, tiles = (group + 15) / 16;
  const int split = blockIdx.x, kv_head = blockIdx.y / tiles, tile_index = blockIdx.y % tiles, b = blockIdx.z;
  const int h0 = kv_head * group + tile_index * 16, rows = min(16, group - tile_index * 16);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const std::int64_t key_begin = split * a.keys_per_split;
  const std::int64_t key_end = min(a.seq_len, key_begin + a.keys_per_split);
  const std::int64_t cache = (std::int64_t{b} * a.kv_heads + kv_head) * a.seq_len * D;
  const std::uint16_t* k = a.k + cache;
  const std::uint16_t* v = a.v + cache;
  constexpr bool hint = Pipelined;  // v5 also asks L2 for whole 256-byte blocks (kernels/NOTES.md)

  // v5 issues its first tile's loads before anything else, so that their latency overlaps the query loads.
  constexpr int step = mma_warps * 16;
  Tile<D> tile;
  const std::int64_t first = key_begin + warp * 16;
  if (Pipelined && first < key_end) load_tile(tile, k, v, first, key_end, g, t, hint);

  // Query fragments, permuted like the K loads: mma step s, register pair e of lane t reads head dims
  // (4 * (s / 2) + t) * 8 + 4 * (s % 2) + {0, 1} (e = 0) and + {2, 3} (e = 1). Rows past the group are 0.
  std::uint32_t qa[k_steps][4];
#pragma unroll
  for (int s = 0; s < k_steps; ++s) {
    const int col = (4 * (s / 2) + t) * 8 + 4 * (s % 2);
#pragma unroll
    for (int half = 0; half < 2; ++half) {  // row g, then row g + 8
      const int r = g + 8 * half;
      std::uint32_t lo = 0, hi = 0;
      if (r < rows) {
        const std::uint16_t* row = a.q + (std::int64_t{b} * a.q_heads + h0 + r) * D + col;
        lo = *reinterpret_cast<const std::uint32_t*>(row);
        hi = *reinterpret_cast<const std::uint32_t*>(row + 2);
      }
      qa[s][half] = lo;      // a0 (row g) / a1 (row g+8): columns 2t, 2t+1
      qa[s][2 + half] = hi;  // a2 / a3: columns 2t+8, 2t+9
    }
  }

  RowState<D> st;
  st.start();

  if constexpr (Pipelined) {
    for (std::int64_t key0 = first; key0 < key_end; key0 += step) {
      Tile<D> next;  // issued now, used in the next iteration (clamped rows past the end: never used)
      load_tile(next, k, v, min(key0 + step, key_end - 1), key_end, g, t, hint);
      attend_tile(st, tile, qa, key0, key_end, key_end, a.scale_log2, t);
      tile = next;
    }
  } else {
    for (std::int64_t key0 = first; key0 < key_end; key0 += step) {
      load_tile(tile, k, v, key0, key_end, g, t, hint);
      attend_tile(st, tile, qa, key0, key_end, key_end, a.scale_log2, t);
    }
  }

  // The combine kernel (launched as a programmatic dependent) may start its launch now; it waits for this
  // grid's memory before reading the partials.
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;");
#endif
  finish_rows<mma_warps, D>(st, rows, a, b, h0, split);
}
// [/decode-mma]

template <int D, bool Pipelined>
void launch(const DecodeArgs& a, cudaStream_t stream) {
  const int group = a.q_heads / a.kv_heads, tiles = (group + 15) / 16;
  const dim3 grid(static_cast<unsigned>(a.splits), static_cast<unsigned>(a.kv_heads * tiles),
                  static_cast<unsigned>(a.batch));
  decode_mma_kernel<D, Pipelined><<<grid, mma_warps * 32, 0, stream>>>(a);
  AF_CHECK_LAUNCH();
}

template <int D, bool Pipelined>
int occupancy() {
  int blocks = 0;
  CUDA_CHECK(
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, decode_mma_kernel<D, Pipelined>, mma_warps * 32, 0));
  return blocks;
}

}  // namespace

int mma_blocks_per_sm(int head_dim, bool pipelined) {
  if (pipelined) return head_dim == 64 ? occupancy<64, true>() : occupancy<128, true>();
  return head_dim == 64 ? occupancy<64, false>() : occupancy<128, false>();
}

void launch_decode_mma(const DecodeArgs& a, bool pipelined, cudaStream_t stream) {
  if (pipelined)
    a.head_dim == 64 ? launch<64, true>(a, stream) : launch<128, true>(a, stream);
  else
    a.head_dim == 64 ? launch<64, false>(a, stream) : launch<128, false>(a, stream);
}

}  // namespace af::kernels::detail
