#pragma once
// The tensor-core pieces that the mma decode kernels (versions 4 and 5, chapter 22) and the prefill kernel share
// (private to kernels/): the mma.sync instruction, one warp's tile of 16 keys loaded straight into mma
// fragments, and the online softmax of 16 query rows over such a tile. The rows of a decode block are query
// heads of one group; the rows of a prefill warp are 16 consecutive query positions of one head.
#include "decode_common.cuh"

#include <cstdint>
#include <type_traits>

namespace af::kernels::detail {

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
// later); consecutive keys are `stride` values apart (D in the decode cache, kv_heads * D in a packed one). K: lane (g,
// t) loads key rows key0 + g and key0 + 8 + g, pieces t, t+4, t+8, ... (16 bytes each): one load instruction covers 64
// contiguous bytes of 8 rows. V: lane (g, t) loads key rows key0 + 2t, 2t+1, 2t+8, 2t+9 (its rows of the mma B
// operand), pieces g, g+8, ...: one instruction covers 128 contiguous bytes of 4 rows.
template <int D>
struct Tile {
  uint4 k[2][D / 32];
  uint4 v[4][D / 64];
};

template <int D>
__device__ __forceinline__ void load_tile(Tile<D>& tile, const std::uint16_t* k, const std::uint16_t* v,
                                          std::int64_t key0, std::int64_t key_end, int g, int t, bool hint,
                                          std::int64_t stride = D) {
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const std::int64_t key = min(key0 + 8 * j + g, key_end - 1);
#pragma unroll
    for (int i = 0; i < D / 32; ++i) {
      const std::uint16_t* p = k + key * stride + (4 * i + t) * 8;
      tile.k[j][i] = hint ? load16_stream(p) : load16(p);
    }
  }
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const std::int64_t key = min(key0 + 2 * t + (r & 1) + 8 * (r >> 1), key_end - 1);
#pragma unroll
    for (int c = 0; c < D / 64; ++c) {
      const std::uint16_t* p = v + key * stride + (g + 8 * c) * 8;
      tile.v[r][c] = hint ? load16_stream(p) : load16(p);
    }
  }
}
// [/load-tile]

// [paged-mma-scales-fold]
// Per-key factors of a tile whose keys and values are stored as codes times a scale (the FP8 paged decode,
// decode_paged_mma.cu): k[j][e] and v[j][e] belong to key key0 + 8j + 2t + e, the columns this lane holds of
// S and of P (sc[j][e] and p[j][e] with e = 0..3 hold rows g and g + 8 of columns 2t + (e & 1)). The default,
// NoColumnScales, compiles to nothing: the bf16 kernels do not change.
struct NoColumnScales {};
struct ColumnScales {
  float k[2][2], v[2][2];
};

// Column j of S = Q K^T is q . (codes of key j): the key's scale makes it q . k_j, in float32, before the
// softmax sees it.
template <typename Scales>
__device__ __forceinline__ void scale_key_columns(float (&sc)[2][4], const Scales& scales) {
  if constexpr (!std::is_same_v<Scales, NoColumnScales>) {
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) sc[j][e] *= scales.k[j][e & 1];
  }
}

// Column j of P takes value j's scale before P is rounded to bf16 for O += P V, which then sums p_j x (codes of
// value j) x scale_j = p_j v_j. The softmax's sum l takes the unscaled p_j.
template <typename Scales>
__device__ __forceinline__ void scale_value_columns(float (&p)[2][4], const Scales& scales) {
  if constexpr (!std::is_same_v<Scales, NoColumnScales>) {
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) p[j][e] *= scales.v[j][e & 1];
  }
}
// [/paged-mma-scales-fold]

// [attend-tile]
// The running state of rows g and g + 8 of one warp: O (head_dim/8 tiles of 16 x 8 in mma C layout), the
// running maximum m and this lane's share of the sum l. Row g sees the keys below end_lo, row g + 8 those
// below end_hi (the same end for a decode step; one more key per row for a causal prefill).
template <int D>
struct RowState {
  float o[D / 8][4];
  float m[2], l[2];

  // Before the first tile: no output, no key seen.
  __device__ __forceinline__ void start() {
#pragma unroll
    for (int n = 0; n < D / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
    m[0] = m[1] = -FLT_MAX;
    l[0] = l[1] = 0.0f;
  }
};

template <int D, typename Scales = NoColumnScales>
__device__ __forceinline__ void attend_tile(RowState<D>& st, const Tile<D>& tile, const std::uint32_t (&qa)[D / 16][4],
                                            std::int64_t key0, std::int64_t end_lo, std::int64_t end_hi,
                                            float scale_log2, int t, const Scales& scales = {}) {
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
  scale_key_columns(sc, scales);  // FP8 keys: their scales (nothing for bf16)
  // Online softmax on rows g (sc[.][0..1]) and g + 8 (sc[.][2..3]); this lane holds keys
  // key0 + 8j + 2t + {0, 1}; the 4 lanes of a row (t = 0..3) hold the rest.
  float row_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
  for (int j = 0; j < 2; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const bool valid = key0 + 8 * j + 2 * t + (e & 1) < (e < 2 ? end_lo : end_hi);
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
  scale_value_columns(p, scales);  // FP8 values: their scales, after l took p (nothing for bf16)
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

// [finish-rows]
// The end of a tensor-core decode block (versions 4/5, the tensor-core paged decode): the 4 lanes of a row each
// summed their own keys, so the row sums are completed across them; then the warps' states go through shared
// memory (the output columns swizzled, see swizzle_col) and merge_warps_and_store writes the output or the
// split's partial.
template <int Warps, int D>
__device__ __forceinline__ void finish_rows(RowState<D>& st, int rows, const DecodeArgs& a, int b, int h0, int split) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    st.l[r] += __shfl_xor_sync(0xffffffffu, st.l[r], 1);
    st.l[r] += __shfl_xor_sync(0xffffffffu, st.l[r], 2);
  }
  __shared__ float sm_o[Warps][16][D];
  __shared__ float sm_m[Warps][16], sm_l[Warps][16];
#pragma unroll
  for (int n = 0; n < D / 8; ++n)
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
  merge_warps_and_store<Warps, 16, D, true>(sm_o, sm_m, sm_l, rows, a, b, h0, split);
}
// [/finish-rows]

}  // namespace af::kernels::detail
