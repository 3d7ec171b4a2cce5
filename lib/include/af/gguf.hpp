#pragma once
/// @file gguf.hpp
/// Reading GGUF, the file format llama.cpp runs models from (versions 2 and 3, little-endian). A file is:
///   - a header: the magic "GGUF", a uint32 version, a uint64 tensor count and a uint64 metadata count;
///   - the metadata: key (a uint64 length and UTF-8 bytes), a uint32 value type, the value (a string is a
///     uint64 length and its bytes; an array is a uint32 element type, a uint64 count and the elements);
///   - the tensor infos: name, uint32 number of dimensions (at most 4), uint64 sizes with the contiguous one
///     first, uint32 ggml type, uint64 offset into the data section;
///   - padding up to `general.alignment` (default 32), then the data section, every tensor's offset aligned.
/// The reader holds the whole file in memory and checks every count, length and offset against the bytes
/// that remain before it allocates anything for it.

#include "af/quant_blocks.hpp"

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <map>
#include <span>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

namespace af::gguf {

/// The largest file File::open reads (64 GiB); it is read whole into memory.
inline constexpr std::uint64_t max_file_bytes = std::uint64_t{1} << 36;
/// The longest key, tensor name or string value accepted (16 MiB: a chat template takes a few KiB).
inline constexpr std::uint64_t max_string_bytes = std::uint64_t{1} << 24;
/// The deepest nesting of arrays accepted (an array of arrays is depth 2).
inline constexpr int max_array_depth = 8;
/// The most dimensions a tensor may have.
inline constexpr std::uint32_t max_dims = 4;
/// The most elements a tensor may have (2^60): element and byte counts then fit in uint64.
inline constexpr std::uint64_t max_elements = std::uint64_t{1} << 60;
/// The alignment when the file does not set general.alignment.
inline constexpr std::uint64_t default_alignment = 32;

/// The type of a metadata value, by its number in the file.
enum class ValueType : std::uint32_t {
  uint8 = 0,
  int8 = 1,
  uint16 = 2,
  int16 = 3,
  uint32 = 4,
  int32 = 5,
  float32 = 6,
  boolean = 7,
  string = 8,
  array = 9,
  uint64 = 10,
  int64 = 11,
  float64 = 12,
};

/// The type's name: "uint8", "float32", "string", "array", ...; "?" for a number that is none of them.
std::string_view name_of(ValueType type);

/// One metadata value. Unsigned integers are held as uint64, signed ones as int64, floats as double (exactly),
/// bools as bool. An array holds its elements in the vector of their kind: integers and bools in `unsigneds`
/// or `signeds`, floats in `floats`, strings in `strings`, nested arrays in `arrays`; `element_type` says which.
struct Value {
  ValueType type = ValueType::uint8;
  ValueType element_type = ValueType::uint8;  ///< for an array: its elements' type
  std::variant<std::uint64_t, std::int64_t, double, bool, std::string, std::vector<std::uint64_t>,
               std::vector<std::int64_t>, std::vector<double>, std::vector<std::string>, std::vector<Value>>
      data;
  /// The number of elements of an array; 1 for a scalar.
  std::size_t size() const;
};

/// Where a tensor lies and how it is stored.
struct TensorInfo {
  std::string name;
  std::vector<std::uint64_t> dims;  ///< ggml order: dims[0] is the contiguous (row) length
  GgmlType type = GgmlType::f32;
  std::uint64_t offset = 0;    ///< from the start of the data section; a multiple of the alignment
  std::uint64_t elements = 0;  ///< the product of dims
  std::uint64_t bytes = 0;     ///< elements / block_elements * block_bytes of its type
  /// dims[0] (the elements of one row), and the number of rows (the product of the other dims).
  std::uint64_t row_length() const { return dims.empty() ? 1 : dims[0]; }
  std::uint64_t rows() const { return row_length() == 0 ? 0 : elements / row_length(); }
};

/// A GGUF file, validated and held in memory.
class File {
 public:
  /// Reads and validates `path`. Throws af::Error naming the file and the problem for a path that does not
  /// exist, is not a regular file or is larger than max_file_bytes, and for every problem from_bytes names.
  static File open(const std::filesystem::path& path);

  /// Parses and validates a GGUF file held in memory; `source` names it in messages. Throws af::Error naming
  /// `source`, the offending value and what was expected for: a bad magic, a version other than 2 or 3, a
  /// file that ends inside any field, a count, length or array size larger than the bytes left could hold,
  /// an unknown value or ggml type, a bool other than 0 or 1, arrays nested deeper than max_array_depth, a
  /// duplicate key or tensor name, a general.alignment that is not a power of two, more than max_dims
  /// dimensions, dims whose product exceeds max_elements or a row length that is not a whole number of
  /// blocks, and a tensor offset that is unaligned, past the end of the file, or overlaps another tensor.
  /// Nothing else leaves it. What it allocates is bounded by a small multiple of the file's size: every
  /// count is checked against the bytes left divided by the fewest bytes one of its elements can take.
  static File from_bytes(std::vector<std::byte> bytes, std::string source = "<memory>");

  std::uint32_t version() const { return version_; }
  std::uint64_t alignment() const { return alignment_; }
  /// Where the data section starts in the file.
  std::uint64_t data_offset() const { return data_offset_; }
  const std::string& source() const { return source_; }

  /// Every metadata value by key.
  const std::map<std::string, Value, std::less<>>& metadata() const { return metadata_; }
  /// The value of `key`, or nullptr.
  const Value* find(std::string_view key) const;
  /// The typed accessors throw af::Error naming the key when it is missing or holds another type.
  /// A string value.
  std::string_view string(std::string_view key) const;
  /// An unsigned integer, or a signed one that is >= 0.
  std::uint64_t unsigned_integer(std::string_view key) const;
  /// Any integer or float value, as double (float32, float64 and integers up to 2^53 exactly).
  double number(std::string_view key) const;
  /// An array of strings.
  std::span<const std::string> strings(std::string_view key) const;
  /// An array of integers or bools; a uint64 above INT64_MAX throws.
  std::vector<std::int64_t> integers(std::string_view key) const;
  /// An array of floats or integers, as double.
  std::vector<double> numbers(std::string_view key) const;

  /// The tensor infos in file order.
  std::span<const TensorInfo> tensors() const { return tensors_; }
  /// The tensor named `name`, or nullptr.
  const TensorInfo* find_tensor(std::string_view name) const;
  /// The tensor named `name`; throws af::Error when there is none.
  const TensorInfo& tensor(std::string_view name) const;
  /// The stored bytes of a tensor of this file.
  std::span<const std::byte> data(const TensorInfo& tensor) const;
  /// The tensor's elements as float32, in ggml order (row by row). F32, F16, BF16, Q8_0, Q4_0 and Q4_1 are
  /// converted exactly; any other type throws af::Error naming it.
  std::vector<float> dequantize(const TensorInfo& tensor) const;

 private:
  std::string source_;
  std::vector<std::byte> bytes_;
  std::uint32_t version_ = 0;
  std::uint64_t alignment_ = default_alignment;
  std::uint64_t data_offset_ = 0;
  std::map<std::string, Value, std::less<>> metadata_;
  std::vector<TensorInfo> tensors_;
  std::map<std::string, std::size_t, std::less<>> tensor_index_;
};

}  // namespace af::gguf
