// The read ceiling for the benchmark: a kernel that only streams a buffer in (16-byte loads, grid-stride,
// several loads in flight per thread) and writes one word per block. Its GB/s is the most a decode kernel,
// which must read its whole KV cache once, can reach on this card.
#include <cuda_runtime.h>

#include <cstdint>

namespace {

__global__ void read_only_kernel(const uint4* __restrict__ data, std::int64_t count, unsigned* __restrict__ sink) {
  unsigned acc = 0;
  const std::int64_t stride = std::int64_t{gridDim.x} * blockDim.x;
  std::int64_t i = std::int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  for (; i + 3 * stride < count; i += 4 * stride) {
    const uint4 a = __ldg(data + i), b = __ldg(data + i + stride), c = __ldg(data + i + 2 * stride),
                d = __ldg(data + i + 3 * stride);
    acc ^= a.x ^ a.y ^ a.z ^ a.w ^ b.x ^ b.y ^ b.z ^ b.w ^ c.x ^ c.y ^ c.z ^ c.w ^ d.x ^ d.y ^ d.z ^ d.w;
  }
  for (; i < count; i += stride) {
    const uint4 a = __ldg(data + i);
    acc ^= a.x ^ a.y ^ a.z ^ a.w;
  }
  if (acc == 0x9e3779b9u) sink[blockIdx.x] = acc;  // almost never taken; keeps the loads alive
}

}  // namespace

extern "C" int af_read_only(const void* data, long long bytes, void* sink, int blocks, int threads, void* stream) {
  read_only_kernel<<<blocks, threads, 0, static_cast<cudaStream_t>(stream)>>>(static_cast<const uint4*>(data),
                                                                              bytes / 16, static_cast<unsigned*>(sink));
  return cudaGetLastError() == cudaSuccess ? 0 : 1;
}
