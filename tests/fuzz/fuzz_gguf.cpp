// libFuzzer entry point for the GGUF reader: any bytes either parse or end in af::Error, and so does every
// accessor and every dequantization of a file that parsed. Any other exception, a crash or a sanitizer
// report is a finding.
#include "af/error.hpp"
#include "af/gguf.hpp"

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  try {
    const auto* begin = reinterpret_cast<const std::byte*>(data);
    const af::gguf::File file = af::gguf::File::from_bytes(std::vector<std::byte>(begin, begin + size), "fuzz.gguf");
    for (const auto& [key, value] : file.metadata()) {
      if (value.size() > size) __builtin_trap();  // an element takes at least one byte of the file
      for (auto accessor : {0, 1, 2, 3, 4, 5}) {
        try {
          switch (accessor) {
            case 0:
              static_cast<void>(file.string(key));
              break;
            case 1:
              static_cast<void>(file.unsigned_integer(key));
              break;
            case 2:
              static_cast<void>(file.number(key));
              break;
            case 3:
              static_cast<void>(file.strings(key));
              break;
            case 4:
              static_cast<void>(file.integers(key));
              break;
            default:
              static_cast<void>(file.numbers(key));
          }
        } catch (const af::Error&) {
        }
      }
    }
    for (const af::gguf::TensorInfo& tensor : file.tensors()) {
      if (file.data(tensor).size() != tensor.bytes) __builtin_trap();
      try {
        const std::vector<float> values = file.dequantize(tensor);
        if (values.size() != tensor.elements) __builtin_trap();
      } catch (const af::Error&) {
      }
    }
  } catch (const af::Error&) {
  }
  return 0;
}
