#include "af/safetensors.hpp"

#include "af/error.hpp"

#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include <cstring>
#include <fstream>

namespace af {

namespace {

std::int64_t numel_of(const std::vector<std::int64_t>& shape) {
  std::int64_t n = 1;
  for (std::int64_t d : shape) n *= d;
  return n;
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
  std::ifstream in(path, std::ios::binary);
  require(in.good(), "safetensors: cannot open {}", path.string());
  std::vector<char> raw((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const auto file_size = static_cast<std::uint64_t>(raw.size());
  require(file_size >= 8, "safetensors: {} is {} bytes long (expected at least the 8-byte header length)",
          path.string(), file_size);
  const auto* bytes = reinterpret_cast<const std::byte*>(raw.data());
  const auto header_size = load<std::uint64_t>(bytes);
  require(header_size <= file_size - 8, "safetensors: {} declares a {}-byte header but holds only {} bytes after it",
          path.string(), header_size, file_size - 8);

  nlohmann::json header;
  try {
    header = nlohmann::json::parse(raw.begin() + 8, raw.begin() + 8 + static_cast<std::ptrdiff_t>(header_size));
  } catch (const nlohmann::json::exception& e) {
    throw Error(fmt::format("safetensors: {} has a malformed JSON header: {}", path.string(), e.what()));
  }
  require(header.is_object(), "safetensors: {}: the header is not a JSON object", path.string());

  SafetensorsFile file;
  file.path_ = path;
  const std::uint64_t data_start = 8 + header_size, data_size = file_size - data_start;
  for (const auto& [name, entry] : header.items()) {
    if (name == "__metadata__") {
      require(entry.is_object(), "safetensors: {}: __metadata__ is not an object", path.string());
      for (const auto& [key, value] : entry.items())
        file.metadata_[key] = value.is_string() ? value.get<std::string>() : value.dump();
      continue;
    }
    try {
      StoredTensor tensor;
      tensor.dtype = dtype_from_safetensors_name(entry.at("dtype").get<std::string>());
      tensor.shape = entry.at("shape").get<std::vector<std::int64_t>>();
      const auto offsets = entry.at("data_offsets").get<std::vector<std::uint64_t>>();
      for (std::int64_t d : tensor.shape)
        if (!(d >= 0)) fail("shape [{}] has a negative dimension", fmt::join(tensor.shape, ", "));
      if (!(offsets.size() == 2 && offsets[0] <= offsets[1] && offsets[1] <= data_size))
        fail("data_offsets [{}] do not lie within the {} data bytes", fmt::join(offsets, ", "), data_size);
      const auto expected = static_cast<std::uint64_t>(numel_of(tensor.shape) * bytes_of(tensor.dtype));
      if (!(offsets[1] - offsets[0] == expected))
        fail("{} bytes stored for shape [{}] of {} (expected {})", offsets[1] - offsets[0],
             fmt::join(tensor.shape, ", "), safetensors_dtype_name(tensor.dtype), expected);
      const std::byte* begin = bytes + data_start + offsets[0];
      tensor.bytes.assign(begin, begin + expected);
      file.tensors_.emplace(name, std::move(tensor));
    } catch (const nlohmann::json::exception& e) {
      throw Error(fmt::format("safetensors: {}: entry \"{}\" is malformed: {}", path.string(), name, e.what()));
    } catch (const Error& e) {
      throw Error(fmt::format("safetensors: {}: tensor \"{}\": {}", path.string(), name, e.what()));
    }
  }
  return file;
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
  if (!(static_cast<std::int64_t>(tensor.bytes.size()) == numel_of(tensor.shape) * bytes_of(tensor.dtype)))
    fail("SafetensorsWriter: \"{}\" has {} bytes for shape [{}] (expected {})", name, tensor.bytes.size(),
         fmt::join(tensor.shape, ", "), numel_of(tensor.shape) * bytes_of(tensor.dtype));
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
