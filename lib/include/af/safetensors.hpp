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
#include <string>
#include <vector>

namespace af {

/// One tensor as stored: its element type, shape and raw bytes.
struct StoredTensor {
  DType dtype = DType::f32;
  std::vector<std::int64_t> shape;
  std::vector<std::byte> bytes;
};

/// The contents of a safetensors file, read whole into memory.
class SafetensorsFile {
 public:
  /// Reads and validates `path`. Throws af::Error naming the file and the problem for a missing,
  /// truncated or malformed file (bad header length, invalid JSON, unknown dtype, a byte range that does
  /// not match the shape or lies outside the file).
  static SafetensorsFile read(const std::filesystem::path& path);

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
