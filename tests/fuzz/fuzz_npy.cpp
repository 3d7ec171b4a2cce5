// libFuzzer entry point for the NPY reader: any bytes either parse into a tensor or end in af::Error. Any
// other exception, a crash or a sanitizer report is a finding.
#include "af/error.hpp"
#include "af/npy.hpp"

#include <cstddef>
#include <cstdint>
#include <span>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  try {
    const af::Tensor tensor = af::read_npy_bytes(std::span(reinterpret_cast<const std::byte*>(data), size), "fuzz.npy");
    // Touch every value, so that a tensor shorter than its shape would show up under AddressSanitizer.
    float sum = 0.0f;
    for (float value : tensor.values()) sum += value;
    static_cast<void>(sum);
    if (tensor.numel() != tensor.shape().numel()) __builtin_trap();
  } catch (const af::Error&) {
  }
  return 0;
}
