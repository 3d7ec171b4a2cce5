#pragma once
// The one way the file readers (npy.cpp, safetensors.cpp) take a file into memory: only a regular file,
// checked before it is opened (opening a FIFO blocks, and a device such as /dev/zero never ends), never more
// than its size, and never more than the reader's limit.

#include "af/error.hpp"

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

namespace af::detail {

inline const char* file_type_name(std::filesystem::file_type type) {
  using std::filesystem::file_type;
  switch (type) {
    case file_type::directory:
      return "a directory";
    case file_type::fifo:
      return "a FIFO";
    case file_type::character:
      return "a character device";
    case file_type::block:
      return "a block device";
    case file_type::socket:
      return "a socket";
    default:
      return "not a regular file";
  }
}

/// The bytes of the regular file `path`. Throws af::Error, prefixed with `reader`, naming the path when it does
/// not exist, is not a regular file (a directory, a FIFO, a device), is larger than `max_bytes`, or cannot
/// be read in full.
inline std::vector<std::byte> read_regular_file(const std::filesystem::path& path, std::uint64_t max_bytes,
                                                std::string_view reader) {
  namespace fs = std::filesystem;
  std::error_code error;
  const fs::file_status status = fs::status(path, error);
  if (status.type() == fs::file_type::not_found) fail("{}: {} does not exist", reader, path.string());
  if (error) fail("{}: cannot open {}: {}", reader, path.string(), error.message());
  if (!fs::is_regular_file(status))
    fail("{}: {} is {} (expected a regular file)", reader, path.string(), file_type_name(status.type()));
  const std::uintmax_t size = fs::file_size(path, error);
  if (error) fail("{}: cannot read the size of {}: {}", reader, path.string(), error.message());
  if (!(size <= max_bytes))
    fail("{}: {} is {} bytes long (expected at most {})", reader, path.string(), size, max_bytes);

  std::ifstream in(path, std::ios::binary);
  if (!in.good()) fail("{}: cannot open {}", reader, path.string());
  std::vector<std::byte> bytes(static_cast<std::size_t>(size));
  in.read(reinterpret_cast<char*>(bytes.data()), static_cast<std::streamsize>(size));
  if (!(static_cast<std::uintmax_t>(in.gcount()) == size))
    fail("{}: read {} of the {} bytes of {} (did it change while being read?)", reader, in.gcount(), size,
         path.string());
  return bytes;
}

}  // namespace af::detail
