// Decode attention, version 1: one warp per query head, one cached key at a time. Each lane owns head_dim/32
// neighbouring dimensions; a key's score is a warp-wide sum; the online softmax rescales the running output
// whenever a larger score appears. Correct, and slow: every key costs a chain of shuffles, the loads are 2
// bytes wide, and the K/V of a KV head is read again for every query head of its group. Chapter 21.
#include "decode_common.cuh"

#include "af/kernels/cuda_check.hpp"
#include "af/kernels/warp.cuh"

namespace af::kernels::detail {
namespace {

// [decode-v1]
template <int D>
__global__ void decode_v1_kernel(DecodeArgs a) {
  constexpr int per_lane = D / 32;  // neighbouring dimensions owned by one lane
  const int head = blockIdx.x;      // b * q_heads + h
  const int b = head / a.q_heads, h = head % a.q_heads;
  const int kv_head = h / (a.q_heads / a.kv_heads);
  const int lane = threadIdx.x, d0 = lane * per_lane;
  const std::int64_t cache = (std::int64_t{b} * a.kv_heads + kv_head) * a.seq_len * D;  // [b, kv_head, 0, 0]

  float q[per_lane], acc[per_lane];
  for (int e = 0; e < per_lane; ++e) {
    q[e] = bf16_one(a.q[std::int64_t{head} * D + d0 + e]) * a.scale_log2;
    acc[e] = 0.0f;
  }
  float m = -FLT_MAX, l = 0.0f;  // running maximum and sum of exp2(score - m)
  for (std::int64_t t = 0; t < a.seq_len; ++t) {
    const std::uint16_t* key = a.k + cache + t * D + d0;
    const std::uint16_t* value = a.v + cache + t * D + d0;
    float s = 0.0f;
    for (int e = 0; e < per_lane; ++e) s = fmaf(q[e], bf16_one(key[e]), s);
    s = warp_sum(s);  // every lane now holds q . k_t (in log2 units)
    const float m_new = fmaxf(m, s);
    const float alpha = exp2f(m - m_new), p = exp2f(s - m_new);
    l = l * alpha + p;
    for (int e = 0; e < per_lane; ++e) acc[e] = fmaf(p, bf16_one(value[e]), acc[e] * alpha);
    m = m_new;
  }
  for (int e = 0; e < per_lane; ++e) a.out[std::int64_t{head} * D + d0 + e] = to_bf16(acc[e] / l);
}
// [/decode-v1]

}  // namespace

void launch_decode_v1(const DecodeArgs& a, cudaStream_t stream) {
  const auto blocks = static_cast<unsigned>(a.batch * a.q_heads);
  switch (a.head_dim) {
    case 64:
      decode_v1_kernel<64><<<blocks, 32, 0, stream>>>(a);
      break;
    case 128:
      decode_v1_kernel<128><<<blocks, 32, 0, stream>>>(a);
      break;
    default:
      decode_v1_kernel<256><<<blocks, 32, 0, stream>>>(a);
      break;
  }
  AF_CHECK_LAUNCH();
}

}  // namespace af::kernels::detail
