#pragma once
// What the decode kernels share (private to kernels/): the launch arguments, bf16 unpacking, and the last
// step of every block, which merges its warps' online-softmax states and writes the output (no split) or a
// partial output with its log-sum-exp (split-KV).
#include "launchers.hpp"

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <cstdint>

namespace af::kernels::detail {

// The two bf16 values packed in one 32-bit word, as float32 (exact: bf16 is the top half of a float).
__device__ __forceinline__ float bf16_lo(std::uint32_t word) { return __uint_as_float(word << 16); }
__device__ __forceinline__ float bf16_hi(std::uint32_t word) { return __uint_as_float(word & 0xffff0000u); }
__device__ __forceinline__ float bf16_one(std::uint16_t bits) { return __uint_as_float(std::uint32_t{bits} << 16); }
__device__ __forceinline__ std::uint16_t to_bf16(float x) { return __bfloat16_as_ushort(__float2bfloat16_rn(x)); }

// 16 bytes (8 bf16) at `p`, which must be 16-byte aligned.
__device__ __forceinline__ uint4 load16(const std::uint16_t* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }

// The same, read-only and not kept in L1, asking L2 to fetch the whole 256-byte block around it from memory.
__device__ __forceinline__ uint4 load16_stream(const std::uint16_t* p) {
  uint4 r;
  asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
      : "l"(p));
  return r;
}

// [swizzle]
// The column at which sm_o keeps head dimension `col` of query row `row`: the low four bits of the column
// are XORed with the row's low three bits and with bit 5 of the column. The mma kernels' 32 lanes store
// 8 rows x 4 columns 16 apart; without it those land in 2 of the 32 banks (a 16-way conflict), with it in
// 32 different banks. 32 consecutive columns of one row, as the merge reads them, stay in 32 banks too.
__device__ __forceinline__ int swizzle_col(int row, int col) { return col ^ ((row & 7) | (((col >> 5) & 1) << 3)); }
// [/swizzle]

// [merge-warps]
// Merges the online-softmax states of the block's warps for `rows` query heads and writes the result:
// out (one split) or a partial output normalised by its own sum, plus lse = m + log2(l) (several splits).
// sm_o [Warps][Rows][D] holds each warp's unnormalised sums (at swizzle_col(r, d) when Swizzled), sm_m/sm_l
// its running maximum and sum.
template <int Warps, int Rows, int D, bool Swizzled = false>
__device__ void merge_warps_and_store(const float (*sm_o)[Rows][D], const float (*sm_m)[Rows],
                                      const float (*sm_l)[Rows], int rows, const DecodeArgs& a, int b, int h0,
                                      int split) {
  for (int idx = threadIdx.x; idx < rows * D; idx += blockDim.x) {
    const int r = idx / D, d = idx % D;
    float m = -FLT_MAX;
#pragma unroll
    for (int w = 0; w < Warps; ++w) m = fmaxf(m, sm_m[w][r]);
    float l = 0.0f, o = 0.0f;
#pragma unroll
    for (int w = 0; w < Warps; ++w) {
      const float weight = exp2f(sm_m[w][r] - m);  // 0 for a warp that saw no key
      l += sm_l[w][r] * weight;
      o += sm_o[w][r][Swizzled ? swizzle_col(r, d) : d] * weight;
    }
    const std::int64_t head = std::int64_t{b} * a.q_heads + h0 + r;  // [batch, q_heads] flattened
    if (a.splits == 1) {
      a.out[head * D + d] = to_bf16(o / l);
    } else {
      a.partial_o[(head * a.splits + split) * D + d] = o / l;
      if (d == 0) a.partial_lse[head * a.splits + split] = m + log2f(l);
    }
  }
}
// [/merge-warps]

// [paged-split-range]
// The keys [begin, end) of split `split` of sequence b in a paged cache: the split's whole pages, cut at the
// sequence's length, which is read on the device and clamped to the capacity so that no length can send a read
// past the table's row. The plan fixes the splits from the capacity, so a split can lie wholly past the length
// (begin >= end): see write_empty_split.
struct KeyRange {
  std::int64_t begin, end;
};
__device__ __forceinline__ KeyRange paged_split_keys(const std::int32_t* lengths, int b, int split,
                                                     int max_pages_per_seq, int pages_per_split, int page_shift) {
  const std::int64_t capacity = std::int64_t{max_pages_per_seq} << page_shift;
  const std::int64_t length = min(capacity, max(std::int64_t{0}, std::int64_t{__ldg(lengths + b)}));
  const std::int64_t keys_per_split = std::int64_t{pages_per_split} << page_shift;
  const std::int64_t begin = split * keys_per_split;
  return {begin, min(length, begin + keys_per_split)};
}

// An empty split: nothing to read. Its partial (output 0, log-sum-exp -inf) weighs exp2(-inf) = 0 in the
// combine; with one split (a length of 0, which the APIs rule out) the output is NaN rather than stale memory.
// Rows h0 .. h0 + rows - 1 of sequence b, D values each.
template <int D>
__device__ __forceinline__ void write_empty_split(std::uint16_t* out, float* partial_o, float* partial_lse, int q_heads,
                                                  int splits, int b, int h0, int rows, int split) {
  for (int idx = threadIdx.x; idx < rows * D; idx += blockDim.x) {
    const std::int64_t head = std::int64_t{b} * q_heads + h0 + idx / D;
    const int d = idx % D;
    if (splits == 1) {
      out[head * D + d] = to_bf16(__int_as_float(0x7fc00000));
    } else {
      partial_o[(head * splits + split) * D + d] = 0.0f;
      if (d == 0) partial_lse[head * splits + split] = -INFINITY;
    }
  }
}
// [/paged-split-range]

}  // namespace af::kernels::detail
