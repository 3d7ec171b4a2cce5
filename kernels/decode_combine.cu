// The combine step of split-KV decode: each split left its output normalised by its own softmax sum and
// that sum's log (lse = m + log2 l, in log2 units). The final output weights split s by exp2(lse_s - max),
// which is its share of the whole softmax sum. One block of 128 threads per query head: each thread owns 4
// neighbouring head dimensions (one 16-byte load per split) and every (128 / (head_dim / 4))-th split, so
// that the loads of several splits are in flight at once; the split lanes are summed in shared memory. At
// head_dim 512 (MLA decode's latent, decode_mla.cu) the 128 threads all lie along the dimensions and each walks
// every split.
// Chapter 22.
#include "decode_common.cuh"

#include "af/kernels/cuda_check.hpp"

namespace af::kernels::detail {
namespace {

constexpr int combine_threads = 128;

// [combine]
template <int D>
__global__ void __launch_bounds__(combine_threads) decode_combine_kernel(DecodeArgs a) {
  constexpr int quads = D / 4;                    // threads along the head dimension, 4 floats each
  constexpr int lanes = combine_threads / quads;  // threads along the splits
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;");  // launched early (programmatic dependent launch): wait for the partials
#endif
  const std::int64_t head = blockIdx.x;  // b * q_heads + h
  const int quad = threadIdx.x % quads, lane = threadIdx.x / quads;
  const float* lse = a.partial_lse + head * a.splits;
  float lse_max = -FLT_MAX;
  for (int s = 0; s < a.splits; ++s) lse_max = fmaxf(lse_max, lse[s]);
  float4 o = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  float total = 0.0f;
#pragma unroll 4
  for (int s = lane; s < a.splits; s += lanes) {
    const float weight = exp2f(lse[s] - lse_max);  // split s's share of the softmax sum
    const float4 p = *reinterpret_cast<const float4*>(a.partial_o + (head * a.splits + s) * D + 4 * quad);
    total += weight;
    o.x = fmaf(weight, p.x, o.x);
    o.y = fmaf(weight, p.y, o.y);
    o.z = fmaf(weight, p.z, o.z);
    o.w = fmaf(weight, p.w, o.w);
  }
  __shared__ float4 sm_o[lanes][quads];
  __shared__ float sm_total[lanes];
  sm_o[lane][quad] = o;
  if (quad == 0) sm_total[lane] = total;
  __syncthreads();
  if (lane != 0) return;
  for (int l = 1; l < lanes; ++l) {
    const float4 other = sm_o[l][quad];
    o.x += other.x;
    o.y += other.y;
    o.z += other.z;
    o.w += other.w;
    total += sm_total[l];
  }
  const float inv = 1.0f / total;
  std::uint16_t* dst = a.out + head * D + 4 * quad;
  const std::uint32_t lo = to_bf16(o.x * inv) | (std::uint32_t{to_bf16(o.y * inv)} << 16);
  const std::uint32_t hi = to_bf16(o.z * inv) | (std::uint32_t{to_bf16(o.w * inv)} << 16);
  *reinterpret_cast<uint2*>(dst) = make_uint2(lo, hi);  // 8 bytes: 4 bf16
}
// [/combine]

}  // namespace

// [launch-combine]
// A programmatic dependent launch: the combine grid is launched while the split kernel still runs and waits
// in griddepcontrol.wait, so the launch latency between the two kernels is hidden.
void launch_decode_combine(const DecodeArgs& a, cudaStream_t stream) {
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(static_cast<unsigned>(a.batch * a.q_heads));
  config.blockDim = dim3(combine_threads);
  config.stream = stream;
  void (*kernel)(DecodeArgs) = a.head_dim == 64    ? decode_combine_kernel<64>
                               : a.head_dim == 128 ? decode_combine_kernel<128>
                               : a.head_dim == 256 ? decode_combine_kernel<256>
                                                   : decode_combine_kernel<512>;  // MLA's latent (decode_mla.cu)
  // Only code built for sm_90 or later waits in griddepcontrol.wait; a kernel built for sm_80/sm_89 (the
  // AF_CUDA_ARCHITECTURES option) is launched in plain stream order, even on a Hopper GPU.
  cudaFuncAttributes compiled{};
  CUDA_CHECK(cudaFuncGetAttributes(&compiled, kernel));
  cudaLaunchAttribute attribute{};
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  config.attrs = &attribute;
  config.numAttrs = compiled.binaryVersion >= 90 ? 1 : 0;
  CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, a));
  AF_CHECK_LAUNCH();
}
// [/launch-combine]

}  // namespace af::kernels::detail
