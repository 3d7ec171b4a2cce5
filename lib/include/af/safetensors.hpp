#pragma once
/// @file safetensors.hpp
/// Reading and writing the safetensors format (the one model checkpoints ship in): an 8-byte little-endian
/// header length, a JSON header mapping each tensor name to its dtype, shape and byte range, then the
/// raw little-endian bytes.

#include "af/numeric.hpp"
#include "af/tensor.hpp"

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <map>
#include <span>
#include <string>
#include <vector>

namespace af {

/// The largest safetensors file SafetensorsFile::read opens (64 GiB); it is read whole into memory.
inline constexpr std::uint64_t safetensors_max_file_bytes = std::uint64_t{1} << 36;
/// The longest JSON header accepted (100 MB, the limit of the format's reference implementation).
inline constexpr std::uint64_t safetensors_max_header_bytes = 100'000'000;
/// The deepest nesting of JSON arrays and objects accepted in the header; a valid header nests three deep
/// (the header, a tensor's entry, its shape).
inline constexpr int safetensors_max_json_depth = 16;

/// One tensor as stored: its element type, shape and raw bytes.
struct StoredTensor {
  DType dtype = DType::f32;
  std::vector<std::int64_t> shape;
  std::vector<std::byte> bytes;
};

/// The contents of a safetensors file, read whole into memory.
class SafetensorsFile {
 public:
  /// Reads and validates `path`. Throws af::Error naming the file and the problem for a path that does not
  /// exist, is not a regular file (a directory, a FIFO, a device) or is larger than
  /// safetensors_max_file_bytes, and for every problem parse names. Nothing else leaves it.
  static SafetensorsFile read(const std::filesystem::path& path);

  /// Parses and validates the bytes of a safetensors file held in memory; `source` names them in messages
  /// and becomes path(). Throws af::Error naming `source` and the problem for a truncated or malformed file:
  /// a header length beyond safetensors_max_header_bytes or the end of the file, invalid JSON or JSON nested
  /// deeper than safetensors_max_json_depth, a `__metadata__` that is not a map of strings to strings, an
  /// entry without a string dtype, a shape of sizes >= 0 or two data_offsets, an unknown dtype, a shape of
  /// more than Shape::max_numel elements, a byte range that lies outside the data or does not hold
  /// dtype size * elements bytes, and byte ranges that overlap or leave bytes of the data unused. Nothing
  /// else leaves it.
  static SafetensorsFile parse(std::span<const std::byte> bytes, const std::filesystem::path& source = "<memory>");

  bool contains(const std::string& name) const { return tensors_.contains(name); }
  std::vector<std::string> names() const;
  /// Throws af::Error naming the missing tensor and the file.
  const StoredTensor& stored(const std::string& name) const;
  /// The tensor converted to float32 (from F32, F64, F16 or BF16).
  Tensor tensor(const std::string& name) const;
  /// An integer tensor (I64 or I32) as int64 values, with its shape.
  std::vector<std::int64_t> integers(const std::string& name) const;
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
  std::map<std::string, StoredTensor> tensors_;
  std::map<std::string, std::string> metadata_;
};

/// Collects tensors and writes them as one safetensors file.
class SafetensorsWriter {
 public:
  void add(const std::string& name, const Tensor& tensor);  ///< stored as F32
  void add_integers(const std::string& name, std::vector<std::int64_t> shape, const std::vector<std::int64_t>& values);
  void add_stored(const std::string& name, StoredTensor tensor);
  void set_metadata(const std::string& key, const std::string& value) { metadata_[key] = value; }
  /// Throws af::Error when the file cannot be written.
  void write(const std::filesystem::path& path) const;

 private:
  std::map<std::string, StoredTensor> tensors_;
  std::map<std::string, std::string> metadata_;
};

/// The safetensors dtype name ("F32", "BF16", ...) of a DType, and back (throws for an unknown name).
std::string safetensors_dtype_name(DType dtype);
DType dtype_from_safetensors_name(const std::string& name);

}  // namespace af
