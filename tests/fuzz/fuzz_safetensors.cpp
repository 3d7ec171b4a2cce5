// libFuzzer entry point for the safetensors reader: any bytes either parse or end in af::Error, and so does
// every conversion of a tensor that parsed. Any other exception, a crash or a sanitizer report is a finding.
#include "af/error.hpp"
#include "af/safetensors.hpp"

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  try {
    const af::SafetensorsFile file =
        af::SafetensorsFile::parse(std::span(reinterpret_cast<const std::byte*>(data), size), "fuzz.safetensors");
    std::size_t metadata_bytes = 0;
    for (const auto& [key, value] : file.metadata()) metadata_bytes += key.size() + value.size();
    static_cast<void>(metadata_bytes);
    for (const std::string& name : file.names()) {
      try {
        const af::Tensor tensor = file.tensor(name);
        if (tensor.numel() != tensor.shape().numel()) __builtin_trap();
      } catch (const af::Error&) {
      }
      try {
        static_cast<void>(file.integers(name));
      } catch (const af::Error&) {
      }
    }
  } catch (const af::Error&) {
  }
  return 0;
}
