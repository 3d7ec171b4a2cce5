// Decode attention, versions 4 and 5: split-KV with both products on the tensor cores. A block takes up to 16
// query heads of one KV head's group as the 16 rows of an mma.sync.m16n8k16 tile (bf16 in, float32
// accumulate); each warp walks 16 cached keys at a time: S = Q K^T as two 16 x 8 tiles, the online softmax
// on S in registers, then O += P V as head_dim/8 tiles of 16 x 8. The loads go from global memory straight
// into the mma fragments, 16 bytes per lane: the order of the head dimensions inside a dot product does not
// change its sum, so each lane loads whole 16-byte pieces of a key row and the query fragments are loaded
// in the same permuted order. Chapter 22.
#include "decode_common.cuh"

#include "af/kernels/cuda_check.hpp"

namespace af::kernels::detail {
namespace {

constexpr int mma_warps = 4;

// [mma-instruction]
// d = a b + c for one 16 x 8 tile: a is 16 x 16 bf16 (4 registers a lane), b 16 x 8 bf16 (2), c and d
// 16 x 8 float32 (4). Lane (g = lane / 4, t = lane % 4) holds a at rows g, g+8 and columns 2t, 2t+1,
// 2t+8, 2t+9; b at rows 2t, 2t+1, 2t+8, 2t+9 of column g; c at rows g, g+8 and columns 2t, 2t+1.
__device__ __forceinline__ void mma_bf16(float (&d)[4], const std::uint32_t (&a)[4], std::uint32_t b0,
                                         std::uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
// [/mma-instruction]

__device__ __forceinline__ std::uint32_t pack_bf16(float lo, float hi) {
  const __nv_bfloat162 pair = __floats2bfloat162_rn(lo, hi);  // .x is the low half
  return *reinterpret_cast<const std::uint32_t*>(&pair);
}

// [load-tile]
// One warp's 16 cached keys starting at key0 (rows past key_end are clamped to the last row and masked
// later). K: lane (g, t) loads key rows key0 + g and key0 + 8 + g, pieces t, t+4, t+8, ... (16 bytes each):
// one load instruction covers 64 contiguous bytes of 8 rows. V: lane (g, t) loads key rows key0 + 2t, 2t+1,
// 2t+8, 2t+9 (its rows of the mma B operand), pieces g, g+8, ...: one instruction covers 128 contiguous
// bytes of 4 rows.
template <int D>
struct Tile {
  uint4 k[2][D / 32];
  uint4 v[4][D / 64];
};

template <int D>
__device__ __forceinline__ void load_tile(Tile<D>& tile, const std::uint16_t* k, const std::uint16_t* v,
                                          std::int64_t key0, std::int64_t key_end, int g, int t, bool hint) {
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const std::int64_t key = min(key0 + 8 * j + g, key_end - 1);
#pragma unroll
    for (int i = 0; i < D / 32; ++i) {
      const std::uint16_t* p = k + key * D + (4 * i + t) * 8;
      tile.k[j][i] = hint ? load16_stream(p) : load16(p);
    }
  }
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const std::int64_t key = min(key0 + 2 * t + (r & 1) + 8 * (r >> 1), key_end - 1);
#pragma unroll
    for (int c = 0; c < D / 64; ++c) {
      const std::uint16_t* p = v + key * D + (g + 8 * c) * 8;
      tile.v[r][c] = hint ? load16_stream(p) : load16(p);
    }
  }
}
// [/load-tile]

// [attend-tile]
// The running state of rows g and g + 8 of one warp: O (head_dim/8 tiles of 16 x 8 in mma C layout), the
// running maximum m and this lane's share of the sum l.
template <int D>
struct RowState {
  float o[D / 8][4];
  float m[2], l[2];
};

template <int D>
__device__ __forceinline__ void attend_tile(RowState<D>& st, const Tile<D>& tile, const std::uint32_t (&qa)[D / 16][4],
                                            std::int64_t key0, std::int64_t key_end, float scale_log2, int t) {
  // S = Q K^T: two 16 x 8 tiles (keys key0..key0+7 and key0+8..key0+15).
  float sc[2][4];
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    sc[j][0] = sc[j][1] = sc[j][2] = sc[j][3] = 0.0f;
#pragma unroll
    for (int s = 0; s < D / 16; ++s) {
      const uint4& w = tile.k[j][s / 2];
      mma_bf16(sc[j], qa[s], (s % 2) ? w.z : w.x, (s % 2) ? w.w : w.y);
    }
  }
  // Online softmax on rows g (sc[.][0..1]) and g + 8 (sc[.][2..3]); this lane holds keys
  // key0 + 8j + 2t + {0, 1}; the 4 lanes of a row (t = 0..3) hold the rest.
  float row_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
  for (int j = 0; j < 2; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const bool valid = key0 + 8 * j + 2 * t + (e & 1) < key_end;
      sc[j][e] = valid ? sc[j][e] * scale_log2 : -INFINITY;
      row_max[e / 2] = fmaxf(row_max[e / 2], sc[j][e]);
    }
  float alpha[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    row_max[r] = fmaxf(row_max[r], __shfl_xor_sync(0xffffffffu, row_max[r], 1));
    row_max[r] = fmaxf(row_max[r], __shfl_xor_sync(0xffffffffu, row_max[r], 2));
    const float m_new = fmaxf(st.m[r], row_max[r]);
    alpha[r] = exp2f(st.m[r] - m_new);
    st.m[r] = m_new;
    st.l[r] *= alpha[r];
  }
  float p[2][4];
#pragma unroll
  for (int j = 0; j < 2; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      p[j][e] = exp2f(sc[j][e] - st.m[e / 2]);
      st.l[e / 2] += p[j][e];
    }
#pragma unroll
  for (int n = 0; n < D / 8; ++n) {
    st.o[n][0] *= alpha[0];
    st.o[n][1] *= alpha[0];
    st.o[n][2] *= alpha[1];
    st.o[n][3] *= alpha[1];
  }
  // P as the A operand of O += P V: the S accumulators are already in A's layout (keys 2t, 2t+1 from
  // tile 0, keys 2t+8, 2t+9 from tile 1).
  const std::uint32_t pa[4] = {pack_bf16(p[0][0], p[0][1]), pack_bf16(p[0][2], p[0][3]), pack_bf16(p[1][0], p[1][1]),
                               pack_bf16(p[1][2], p[1][3])};
  // O tile n covers head dims 64 * (n / 8) + 8 * col + n % 8 for its columns col = 0..7: lane g's piece
  // g + 8c holds exactly column g of the tiles n = 8c .. 8c + 7. Pair two key rows per register.
#pragma unroll
  for (int n = 0; n < D / 8; ++n) {
    const int c = n / 8, word = (n % 8) / 2;
    const std::uint32_t sel = (n % 2) ? 0x7632u : 0x5410u;  // high or low halves of both words
    const auto* v0 = reinterpret_cast<const std::uint32_t*>(&tile.v[0][c]);
    const auto* v1 = reinterpret_cast<const std::uint32_t*>(&tile.v[1][c]);
    const auto* v2 = reinterpret_cast<const std::uint32_t*>(&tile.v[2][c]);
    const auto* v3 = reinterpret_cast<const std::uint32_t*>(&tile.v[3][c]);
    mma_bf16(st.o[n], pa, __byte_perm(v0[word], v1[word], sel), __byte_perm(v2[word], v3[word], sel));
  }
}
// [/attend-tile]

// [decode-mma]
// Pipelined = false: version 4 (load a tile, then compute on it). Pipelined = true: version 5 (the loads of
// the warp's next tile are issued before the math on this one, so a warp always has a tile in flight).
template <int D, bool Pipelined>
__global__ void __launch_bounds__(mma_warps * 32, Pipelined ? 2 : 3) decode_mma_kernel(DecodeArgs a) {
  constexpr int k_steps = D / 16;  // mma steps along head_dim for S = Q K^T
  constexpr int n_tiles = D / 8;   // 8-wide output tiles for O = P V
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
#pragma unroll
  for (int n = 0; n < n_tiles; ++n) st.o[n][0] = st.o[n][1] = st.o[n][2] = st.o[n][3] = 0.0f;
  st.m[0] = st.m[1] = -FLT_MAX;
  st.l[0] = st.l[1] = 0.0f;

  if constexpr (Pipelined) {
    for (std::int64_t key0 = first; key0 < key_end; key0 += step) {
      Tile<D> next;  // issued now, used in the next iteration (clamped rows past the end: never used)
      load_tile(next, k, v, min(key0 + step, key_end - 1), key_end, g, t, hint);
      attend_tile(st, tile, qa, key0, key_end, a.scale_log2, t);
      tile = next;
    }
  } else {
    for (std::int64_t key0 = first; key0 < key_end; key0 += step) {
      load_tile(tile, k, v, key0, key_end, g, t, hint);
      attend_tile(st, tile, qa, key0, key_end, a.scale_log2, t);
    }
  }

  // The combine kernel (launched as a programmatic dependent) may start its launch now; it waits for this
  // grid's memory before reading the partials.
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;");
#endif
  // The 4 lanes of a row each summed their own keys.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    st.l[r] += __shfl_xor_sync(0xffffffffu, st.l[r], 1);
    st.l[r] += __shfl_xor_sync(0xffffffffu, st.l[r], 2);
  }
  __shared__ float sm_o[mma_warps][16][D];
  __shared__ float sm_m[mma_warps][16], sm_l[mma_warps][16];
#pragma unroll
  for (int n = 0; n < n_tiles; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int row = g + 8 * (e / 2);
      sm_o[warp][row][swizzle_col(row, 64 * (n / 8) + 8 * (2 * t + (e & 1)) + n % 8)] = st.o[n][e];
    }
  if (t == 0) {
    sm_m[warp][g] = st.m[0];
    sm_m[warp][g + 8] = st.m[1];
    sm_l[warp][g] = st.l[0];
    sm_l[warp][g + 8] = st.l[1];
  }
  __syncthreads();
  merge_warps_and_store<mma_warps, 16, D, true>(sm_o, sm_m, sm_l, rows, a, b, h0, split);
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
