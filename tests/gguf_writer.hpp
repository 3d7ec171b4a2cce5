#pragma once
// A small GGUF writer, for the tests and the fuzz corpus only: it lays out a file byte by byte as the format
// describes it, independently of the reader, and records where each field went so that a test can make the
// file lie about exactly one thing.

#include "af/gguf.hpp"

#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace af_test {

using af::gguf::GgmlType;
using af::gguf::ValueType;

/// Little-endian bytes, appended field by field.
struct ByteWriter {
  std::vector<std::byte> bytes;

  template <class T>
  void put(T value) {
    static_assert(std::endian::native == std::endian::little);
    const std::size_t at = bytes.size();
    bytes.resize(at + sizeof(T));
    std::memcpy(bytes.data() + at, &value, sizeof(T));
  }
  void put_string(std::string_view text) {
    put<std::uint64_t>(text.size());
    for (const char c : text) bytes.push_back(static_cast<std::byte>(c));
  }
  void put_bytes(const std::vector<std::byte>& more) { bytes.insert(bytes.end(), more.begin(), more.end()); }
};

/// The encoded value of one metadata entry (its type tag and payload), made by the helpers below.
struct EncodedValue {
  ValueType type;
  std::vector<std::byte> payload;
};

template <class T>
EncodedValue scalar(ValueType type, T value) {
  ByteWriter w;
  w.put<T>(value);
  return {type, w.bytes};
}
inline EncodedValue text(std::string_view value) {
  ByteWriter w;
  w.put_string(value);
  return {ValueType::string, w.bytes};
}
/// An array of `count` elements of `element` type whose encodings follow one another in `elements`.
inline EncodedValue array(ValueType element, std::uint64_t count, const std::vector<std::byte>& elements) {
  ByteWriter w;
  w.put<std::uint32_t>(static_cast<std::uint32_t>(element));
  w.put<std::uint64_t>(count);
  w.put_bytes(elements);
  return {ValueType::array, w.bytes};
}
/// The payloads of values of one type, concatenated: the elements of an array.
inline std::vector<std::byte> concatenated(const std::vector<EncodedValue>& values) {
  ByteWriter w;
  for (const EncodedValue& v : values) w.put_bytes(v.payload);
  return w.bytes;
}

/// Where the writer put each field, as byte offsets into the file.
struct Layout {
  std::vector<std::size_t> key_length_at, value_type_at, value_payload_at;
  std::vector<std::size_t> tensor_name_at, tensor_n_dims_at, tensor_type_at, tensor_offset_at;
  std::size_t data_start = 0;
};

class GgufWriter {
 public:
  std::uint32_t version = 3;
  /// The alignment the writer pads to; set general.alignment too when it is not 32.
  std::uint64_t alignment = 32;

  void add(std::string key, EncodedValue value) { entries_.push_back({std::move(key), std::move(value)}); }

  /// A tensor with its raw bytes; `offset` places it explicitly (else after the previous one, aligned).
  void add_tensor(std::string name, std::vector<std::uint64_t> dims, GgmlType type, std::vector<std::byte> data,
                  std::optional<std::uint64_t> offset = std::nullopt) {
    tensors_.push_back({std::move(name), std::move(dims), type, std::move(data), offset});
  }

  /// The whole file. The data section ends with the last tensor's bytes (no padding after it), so that every
  /// shorter prefix of the file is truncated.
  std::vector<std::byte> bytes(Layout* layout = nullptr) const {
    Layout where;
    ByteWriter w;
    for (const char c : std::string_view("GGUF")) w.bytes.push_back(static_cast<std::byte>(c));
    w.put<std::uint32_t>(version);
    w.put<std::uint64_t>(tensors_.size());
    w.put<std::uint64_t>(entries_.size());
    for (const Entry& e : entries_) {
      where.key_length_at.push_back(w.bytes.size());
      w.put_string(e.key);
      where.value_type_at.push_back(w.bytes.size());
      w.put<std::uint32_t>(static_cast<std::uint32_t>(e.value.type));
      where.value_payload_at.push_back(w.bytes.size());
      w.put_bytes(e.value.payload);
    }
    std::vector<std::uint64_t> offsets;
    std::uint64_t next = 0;
    for (const Tensor& t : tensors_) {
      const std::uint64_t offset = t.offset ? *t.offset : round_up(next);
      offsets.push_back(offset);
      next = std::max(next, offset + t.data.size());
      where.tensor_name_at.push_back(w.bytes.size());
      w.put_string(t.name);
      where.tensor_n_dims_at.push_back(w.bytes.size());
      w.put<std::uint32_t>(static_cast<std::uint32_t>(t.dims.size()));
      for (const std::uint64_t d : t.dims) w.put<std::uint64_t>(d);
      where.tensor_type_at.push_back(w.bytes.size());
      w.put<std::uint32_t>(static_cast<std::uint32_t>(t.type));
      where.tensor_offset_at.push_back(w.bytes.size());
      w.put<std::uint64_t>(offset);
    }
    if (!tensors_.empty()) {
      w.bytes.resize(round_up(w.bytes.size()));
      where.data_start = w.bytes.size();
      w.bytes.resize(where.data_start + next);
      for (std::size_t i = 0; i < tensors_.size(); ++i)
        if (!tensors_[i].data.empty())
          std::memcpy(w.bytes.data() + where.data_start + offsets[i], tensors_[i].data.data(), tensors_[i].data.size());
    }
    if (layout != nullptr) *layout = where;
    return w.bytes;
  }

 private:
  struct Entry {
    std::string key;
    EncodedValue value;
  };
  struct Tensor {
    std::string name;
    std::vector<std::uint64_t> dims;
    GgmlType type;
    std::vector<std::byte> data;
    std::optional<std::uint64_t> offset;
  };
  std::uint64_t round_up(std::uint64_t n) const { return (n + alignment - 1) / alignment * alignment; }

  std::vector<Entry> entries_;
  std::vector<Tensor> tensors_;
};

/// Overwrites the bytes of `value` at `at` in `bytes`.
template <class T>
void patch(std::vector<std::byte>& bytes, std::size_t at, T value) {
  std::memcpy(bytes.data() + at, &value, sizeof(T));
}

}  // namespace af_test
