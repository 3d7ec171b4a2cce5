#include "af/safetensors.hpp"

#include "af/error.hpp"
#include "regular_file.hpp"

#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <limits>
#include <string_view>

namespace af {

namespace {

std::int64_t numel_of(const std::vector<std::int64_t>& shape) { return Shape::numel_of(shape); }

// The bytes a tensor of `shape` and `dtype` holds. numel_of caps the count at 2^60 and a dtype holds at most
// eight bytes, so the product fits in uint64.
std::uint64_t byte_count(const std::vector<std::int64_t>& shape, DType dtype) {
  return static_cast<std::uint64_t>(numel_of(shape)) * static_cast<std::uint64_t>(bytes_of(dtype));
}

// Whether arrays and objects in the JSON `text` nest deeper than `limit`, counting only brackets outside
// strings. It runs before the parser, so that no header can make the parser (or a later dump) recurse
// without bound. On malformed text the parser stops at the first error, never deeper than the scan saw.
bool json_nests_deeper_than(std::string_view text, int limit) {
  int depth = 0;
  bool in_string = false, escaped = false;
  for (const char c : text) {
    if (in_string) {
      if (escaped)
        escaped = false;
      else if (c == '\\')
        escaped = true;
      else if (c == '"')
        in_string = false;
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      if (++depth > limit) return true;
    } else if ((c == ']' || c == '}') && depth > 0) {
      --depth;
    }
  }
  return false;
}

// A JSON value's kind, for messages: "a string", "an array", ...
std::string json_kind(const nlohmann::json& value) {
  const std::string name = value.type_name();
  return (name == "array" || name == "object" ? "an " : "a ") + name;
}

std::vector<std::int64_t> shape_of(const nlohmann::json& entry) {
  const auto field = entry.find("shape");
  if (field == entry.end()) fail("the entry has no \"shape\" field");
  if (!field->is_array()) fail("\"shape\" is {} (expected an array of sizes)", json_kind(*field));
  std::vector<std::int64_t> shape;
  for (const nlohmann::json& size : *field) {
    if (!(size.is_number_unsigned() &&
          size.get<std::uint64_t>() <= static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max())))
      fail("shape {} has a size that is not an integer in [0, 2^63) ({})", field->dump(), size.dump());
    shape.push_back(size.get<std::int64_t>());
  }
  return shape;
}

struct ByteRange {
  std::uint64_t begin = 0, end = 0;
};

ByteRange offsets_of(const nlohmann::json& entry) {
  const auto field = entry.find("data_offsets");
  if (field == entry.end()) fail("the entry has no \"data_offsets\" field");
  if (!(field->is_array() && field->size() == 2 && (*field)[0].is_number_unsigned() &&
        (*field)[1].is_number_unsigned()))
    fail("data_offsets {} are not two byte offsets (expected [begin, end], integers >= 0)", field->dump());
  return {(*field)[0].get<std::uint64_t>(), (*field)[1].get<std::uint64_t>()};
}

DType dtype_of(const nlohmann::json& entry) {
  const auto field = entry.find("dtype");
  if (field == entry.end()) fail("the entry has no \"dtype\" field");
  if (!field->is_string()) fail("\"dtype\" is {} (expected a string such as \"F32\")", json_kind(*field));
  return dtype_from_safetensors_name(field->get<std::string>());
}

template <class T>
T load(const std::byte* at) {
  T value;
  std::memcpy(&value, at, sizeof(T));
  return value;
}

}  // namespace

std::string safetensors_dtype_name(DType dtype) {
  switch (dtype) {
    case DType::f64:
      return "F64";
    case DType::f32:
      return "F32";
    case DType::f16:
      return "F16";
    case DType::bf16:
      return "BF16";
    case DType::fp8_e4m3:
      return "F8_E4M3";
    case DType::int8:
      return "I8";
    case DType::i64:
      return "I64";
    case DType::i32:
      return "I32";
  }
  return "?";
}

DType dtype_from_safetensors_name(const std::string& name) {
  for (DType d :
       {DType::f64, DType::f32, DType::f16, DType::bf16, DType::fp8_e4m3, DType::int8, DType::i64, DType::i32})
    if (safetensors_dtype_name(d) == name) return d;
  throw Error(
      fmt::format("safetensors: dtype \"{}\" is not supported (expected F64, F32, F16, BF16, F8_E4M3, I8, "
                  "I64 or I32)",
                  name));
}

SafetensorsFile SafetensorsFile::read(const std::filesystem::path& path) {
  const std::vector<std::byte> bytes = detail::read_regular_file(path, safetensors_max_file_bytes, "safetensors");
  return parse(bytes, path);
}

SafetensorsFile SafetensorsFile::parse(std::span<const std::byte> bytes, const std::filesystem::path& source) {
  const std::string name_of_source = source.string();
  try {
    const std::uint64_t file_size = bytes.size();
    if (!(file_size >= 8))
      fail("safetensors: {} is {} bytes long (expected at least the 8-byte header length)", name_of_source, file_size);
    const auto header_size = load<std::uint64_t>(bytes.data());
    if (!(header_size <= safetensors_max_header_bytes))
      fail("safetensors: {} declares a {}-byte header (expected at most {})", name_of_source, header_size,
           safetensors_max_header_bytes);
    if (!(header_size <= file_size - 8))
      fail("safetensors: {} declares a {}-byte header but holds only {} bytes after it", name_of_source, header_size,
           file_size - 8);

    const std::string_view header_text(reinterpret_cast<const char*>(bytes.data()) + 8, header_size);
    if (json_nests_deeper_than(header_text, safetensors_max_json_depth))
      fail("safetensors: {}: the JSON header nests arrays and objects more than {} deep", name_of_source,
           safetensors_max_json_depth);
    nlohmann::json header;
    try {
      header = nlohmann::json::parse(header_text);
    } catch (const nlohmann::json::exception& e) {
      fail("safetensors: {} has a malformed JSON header: {}", name_of_source, e.what());
    }
    if (!header.is_object())
      fail("safetensors: {}: the header is {} (expected an object)", name_of_source, json_kind(header));

    SafetensorsFile file;
    file.path_ = source;
    const std::uint64_t data_start = 8 + header_size, data_size = file_size - data_start;
    struct Placed {
      ByteRange range;
      std::string name;
    };
    std::vector<Placed> placed;
    for (const auto& [name, entry] : header.items()) {
      if (name == "__metadata__") {
        // The format's metadata is a flat map of strings to strings.
        if (!entry.is_object())
          fail("safetensors: {}: __metadata__ is {} (expected an object of strings)", name_of_source, json_kind(entry));
        for (const auto& [key, value] : entry.items()) {
          if (!value.is_string())
            fail("safetensors: {}: __metadata__ \"{}\" is {} (expected a string)", name_of_source, key,
                 json_kind(value));
          file.metadata_[key] = value.get<std::string>();
        }
        continue;
      }
      try {
        if (!entry.is_object())
          fail("the entry is {} (expected an object of dtype, shape and data_offsets)", json_kind(entry));
        StoredTensor tensor;
        tensor.dtype = dtype_of(entry);
        tensor.shape = shape_of(entry);
        const ByteRange range = offsets_of(entry);
        if (!(range.begin <= range.end && range.end <= data_size))
          fail("data_offsets [{}, {}] do not lie within the {} data bytes", range.begin, range.end, data_size);
        const std::uint64_t expected = byte_count(tensor.shape, tensor.dtype);
        if (!(range.end - range.begin == expected))
          fail("{} bytes stored for shape [{}] of {} (expected {})", range.end - range.begin,
               fmt::join(tensor.shape, ", "), safetensors_dtype_name(tensor.dtype), expected);
        const std::byte* begin = bytes.data() + data_start + range.begin;
        tensor.bytes.assign(begin, begin + expected);
        file.tensors_.emplace(name, std::move(tensor));
        placed.push_back({range, name});
      } catch (const Error& e) {
        fail("safetensors: {}: tensor \"{}\": {}", name_of_source, name, e.what());
      }
    }

    // The tensors tile the data: no two share a byte, and no byte belongs to none.
    std::ranges::sort(placed, [](const Placed& a, const Placed& b) {
      return std::pair(a.range.begin, a.range.end) < std::pair(b.range.begin, b.range.end);
    });
    std::uint64_t covered = 0;
    std::string_view previous;
    for (const Placed& p : placed) {
      if (p.range.begin < covered)
        fail("safetensors: {}: tensors \"{}\" and \"{}\" overlap (data_offsets up to {} and from {})", name_of_source,
             previous, p.name, covered, p.range.begin);
      if (p.range.begin > covered)
        fail("safetensors: {}: data bytes [{}, {}) belong to no tensor (expected the tensors to cover the data)",
             name_of_source, covered, p.range.begin);
      covered = p.range.end;
      previous = p.name;
    }
    if (covered != data_size)
      fail("safetensors: {}: data bytes [{}, {}) belong to no tensor (expected the tensors to cover the data)",
           name_of_source, covered, data_size);
    return file;
  } catch (const Error&) {
    throw;
  } catch (const std::exception& e) {  // an allocation that failed, or a library's own exception
    throw Error(fmt::format("safetensors: {}: {}", name_of_source, e.what()));
  }
}

std::vector<std::string> SafetensorsFile::names() const {
  std::vector<std::string> out;
  for (const auto& [name, _] : tensors_) out.push_back(name);
  return out;
}

const StoredTensor& SafetensorsFile::stored(const std::string& name) const {
  const auto it = tensors_.find(name);
  if (!(it != tensors_.end()))
    fail("safetensors: {} has no tensor \"{}\" (it holds: {})", path_.string(), name, fmt::join(names(), ", "));
  return it->second;
}

Tensor SafetensorsFile::tensor(const std::string& name) const {
  const StoredTensor& s = stored(name);
  require(s.shape.size() <= Shape::max_rank, "safetensors: {}: tensor \"{}\" has rank {} (expected at most {})",
          path_.string(), name, s.shape.size(), Shape::max_rank);
  Tensor t{Shape(std::span<const std::int64_t>(s.shape))};
  const std::byte* at = s.bytes.data();
  for (std::int64_t i = 0; i < t.numel(); ++i) {
    float& out = t.data()[i];
    switch (s.dtype) {
      case DType::f32:
        out = load<float>(at + 4 * i);
        break;
      case DType::f64:
        out = static_cast<float>(load<double>(at + 8 * i));
        break;
      case DType::f16:
        out = fp16_to_float(load<std::uint16_t>(at + 2 * i));
        break;
      case DType::bf16:
        out = bf16_to_float(load<std::uint16_t>(at + 2 * i));
        break;
      default:
        throw Error(fmt::format("safetensors: {}: tensor \"{}\" is {} (expected a floating-point dtype)",
                                path_.string(), name, safetensors_dtype_name(s.dtype)));
    }
  }
  return t;
}

std::vector<std::int64_t> SafetensorsFile::integers(const std::string& name) const {
  const StoredTensor& s = stored(name);
  const std::int64_t n = numel_of(s.shape);
  std::vector<std::int64_t> out(static_cast<std::size_t>(n));
  for (std::int64_t i = 0; i < n; ++i) {
    if (s.dtype == DType::i64)
      out[static_cast<std::size_t>(i)] = load<std::int64_t>(s.bytes.data() + 8 * i);
    else if (s.dtype == DType::i32)
      out[static_cast<std::size_t>(i)] = load<std::int32_t>(s.bytes.data() + 4 * i);
    else
      throw Error(fmt::format("safetensors: {}: tensor \"{}\" is {} (expected I64 or I32)", path_.string(), name,
                              safetensors_dtype_name(s.dtype)));
  }
  return out;
}

void SafetensorsWriter::add(const std::string& name, const Tensor& tensor) {
  StoredTensor s;
  s.dtype = DType::f32;
  s.shape.assign(tensor.shape().dims().begin(), tensor.shape().dims().end());
  const auto* begin = reinterpret_cast<const std::byte*>(tensor.data());
  s.bytes.assign(begin, begin + tensor.numel() * 4);
  add_stored(name, std::move(s));
}

void SafetensorsWriter::add_integers(const std::string& name, std::vector<std::int64_t> shape,
                                     const std::vector<std::int64_t>& values) {
  if (!(numel_of(shape) == static_cast<std::int64_t>(values.size())))
    fail("SafetensorsWriter: {} values for \"{}\" of shape [{}]", values.size(), name, fmt::join(shape, ", "));
  StoredTensor s;
  s.dtype = DType::i64;
  s.shape = std::move(shape);
  const auto* begin = reinterpret_cast<const std::byte*>(values.data());
  s.bytes.assign(begin, begin + values.size() * 8);
  add_stored(name, std::move(s));
}

void SafetensorsWriter::add_stored(const std::string& name, StoredTensor tensor) {
  require(name != "__metadata__" && !name.empty(), "SafetensorsWriter: \"{}\" is not a valid tensor name", name);
  if (!(tensor.bytes.size() == byte_count(tensor.shape, tensor.dtype)))
    fail("SafetensorsWriter: \"{}\" has {} bytes for shape [{}] (expected {})", name, tensor.bytes.size(),
         fmt::join(tensor.shape, ", "), byte_count(tensor.shape, tensor.dtype));
  tensors_[name] = std::move(tensor);
}

void SafetensorsWriter::write(const std::filesystem::path& path) const {
  nlohmann::json header = nlohmann::json::object();
  if (!metadata_.empty()) header["__metadata__"] = metadata_;
  std::uint64_t offset = 0;
  for (const auto& [name, t] : tensors_) {
    header[name] = {{"dtype", safetensors_dtype_name(t.dtype)},
                    {"shape", t.shape},
                    {"data_offsets", {offset, offset + t.bytes.size()}}};
    offset += t.bytes.size();
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');  // the data starts 8-byte aligned
  std::ofstream out(path, std::ios::binary);
  require(out.good(), "safetensors: cannot write {}", path.string());
  const std::uint64_t header_size = text.size();
  out.write(reinterpret_cast<const char*>(&header_size), 8);
  out.write(text.data(), static_cast<std::streamsize>(text.size()));
  for (const auto& [_, t] : tensors_)
    out.write(reinterpret_cast<const char*>(t.bytes.data()), static_cast<std::streamsize>(t.bytes.size()));
  require(out.good(), "safetensors: writing {} failed", path.string());
}

}  // namespace af
