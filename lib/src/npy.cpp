#include "af/npy.hpp"

#include "af/error.hpp"
#include "af/numeric.hpp"
#include "regular_file.hpp"

#include <fmt/ranges.h>

#include <cstring>
#include <fstream>
#include <string>
#include <vector>

namespace af {

namespace {
constexpr char magic[] = "\x93NUMPY";
constexpr std::size_t magic_size = 6;

std::uint8_t byte_at(std::span<const std::byte> bytes, std::size_t at) {
  return std::to_integer<std::uint8_t>(bytes[at]);
}

// The value that follows `'key':` in the header dictionary, up to the next top-level comma.
std::string header_field(const std::string& header, const std::string& key, const std::string& source) {
  const std::string quoted = "'" + key + "':";
  const auto at = header.find(quoted);
  if (at == std::string::npos) fail("npy: {}: header has no '{}' field: {}", source, key, header);
  std::size_t begin = at + quoted.size();
  while (begin < header.size() && header[begin] == ' ') ++begin;
  std::size_t end = begin;
  int depth = 0;
  for (; end < header.size(); ++end) {
    const char c = header[end];
    if (c == '(') ++depth;
    if (c == ')') --depth;
    if ((c == ',' || c == '}') && depth == 0) break;
  }
  return header.substr(begin, end - begin);
}

// The sizes of a shape tuple such as "(2, 3)", "(4,)" or "()".
std::vector<std::int64_t> parse_shape(const std::string& shape_text, const std::string& source) {
  std::vector<std::int64_t> dims;
  std::size_t pos = shape_text.find('(');
  if (pos == std::string::npos) fail("npy: {}: shape {} is not a tuple", source, shape_text);
  ++pos;
  while (pos < shape_text.size() && shape_text[pos] != ')') {
    if (shape_text[pos] == ' ' || shape_text[pos] == ',') {
      ++pos;
      continue;
    }
    std::size_t used = 0;
    try {
      dims.push_back(std::stoll(shape_text.substr(pos), &used));
    } catch (const std::exception&) {  // not a number, or one beyond int64
      fail("npy: {}: shape {} is not a tuple of integers", source, shape_text);
    }
    pos += used;
    if (!(dims.size() <= Shape::max_rank))
      fail("npy: {}: shape {} has more than {} dimensions", source, shape_text, Shape::max_rank);
  }
  return dims;
}

Tensor parse_npy(std::span<const std::byte> bytes, const std::string& source) {
  require(bytes.size() >= 10 && std::memcmp(bytes.data(), magic, magic_size) == 0,
          "npy: {} does not start with the .npy magic string", source);
  const int major = byte_at(bytes, 6);
  require(major >= 1 && major <= 3, "npy: {}: format version {} is not supported (expected 1, 2 or 3)", source, major);
  // Version 1 stores the header length in two bytes, versions 2 and 3 in four.
  const std::size_t length_bytes = major == 1 ? 2 : 4, header_start = 8 + length_bytes;
  require(bytes.size() >= header_start, "npy: {} is {} bytes long (expected at least {})", source, bytes.size(),
          header_start);
  std::uint64_t header_length = 0;
  for (std::size_t i = 0; i < length_bytes; ++i) header_length |= std::uint64_t{byte_at(bytes, 8 + i)} << (8 * i);
  require(header_length <= npy_max_header_bytes, "npy: {}: header is {} bytes long (expected at most {})", source,
          header_length, npy_max_header_bytes);
  require(header_length <= bytes.size() - header_start,
          "npy: {}: the {}-byte header runs past the end of the file ({} bytes)", source, header_length, bytes.size());
  const std::string header(reinterpret_cast<const char*>(bytes.data()) + header_start, header_length);

  const std::string descr = header_field(header, "descr", source);
  const std::string fortran = header_field(header, "fortran_order", source);
  if (fortran != "False") fail("npy: {}: fortran_order is {} (expected False, C order)", source, fortran);
  int element_size = 0;
  if (descr == "'<f4'")
    element_size = 4;
  else if (descr == "'<f8'")
    element_size = 8;
  else if (descr == "'<f2'")
    element_size = 2;
  if (element_size == 0) fail("npy: {}: dtype {} is not supported (expected '<f4', '<f8' or '<f2')", source, descr);

  const std::vector<std::int64_t> dims = parse_shape(header_field(header, "shape", source), source);
  std::int64_t numel = 0;
  try {
    numel = Shape::numel_of(dims);
  } catch (const Error& e) {
    fail("npy: {}: {}", source, e.what());
  }
  // Check the data against the shape before allocating: a short file must not cost the memory it claims.
  // numel <= 2^60 and element_size <= 8, so the product fits in uint64.
  const std::uint64_t data_start = header_start + header_length, available = bytes.size() - data_start;
  const std::uint64_t needed = static_cast<std::uint64_t>(numel) * static_cast<std::uint64_t>(element_size);
  if (!(available >= needed))
    fail("npy: {}: {} data bytes for shape [{}] (expected {})", source, available, fmt::join(dims, ", "), needed);

  Tensor tensor{Shape(std::span<const std::int64_t>(dims))};
  const std::byte* data = bytes.data() + data_start;
  for (std::int64_t i = 0; i < numel; ++i) {
    if (element_size == 4) {
      std::memcpy(tensor.data() + i, data + 4 * i, 4);
    } else if (element_size == 8) {
      double v;
      std::memcpy(&v, data + 8 * i, 8);
      tensor.data()[i] = static_cast<float>(v);
    } else {
      std::uint16_t bits;
      std::memcpy(&bits, data + 2 * i, 2);
      tensor.data()[i] = fp16_to_float(bits);
    }
  }
  return tensor;
}
}  // namespace

void write_npy(const std::filesystem::path& path, const Tensor& tensor) {
  // Python's tuple syntax: "()", "(4,)", "(2, 3)".
  std::string shape = fmt::format("{}", fmt::join(tensor.shape().dims(), ", "));
  if (tensor.rank() == 1) shape += ",";
  std::string header = fmt::format("{{'descr': '<f4', 'fortran_order': False, 'shape': ({}), }}", shape);
  // magic + version + length + header + '\n' is a multiple of 64 bytes.
  const std::size_t unpadded = magic_size + 2 + 2 + header.size() + 1;
  header.append((64 - unpadded % 64) % 64, ' ');
  header.push_back('\n');
  std::ofstream out(path, std::ios::binary);
  require(out.good(), "npy: cannot write {}", path.string());
  out.write(magic, magic_size);
  out.put(1), out.put(0);
  const auto length = static_cast<std::uint16_t>(header.size());
  out.put(static_cast<char>(length & 0xFF)), out.put(static_cast<char>(length >> 8));
  out.write(header.data(), static_cast<std::streamsize>(header.size()));
  out.write(reinterpret_cast<const char*>(tensor.data()), static_cast<std::streamsize>(tensor.numel() * 4));
  require(out.good(), "npy: writing {} failed", path.string());
}

Tensor read_npy(const std::filesystem::path& path) {
  const std::vector<std::byte> bytes = detail::read_regular_file(path, npy_max_file_bytes, "npy");
  return read_npy_bytes(bytes, path.string());
}

Tensor read_npy_bytes(std::span<const std::byte> bytes, const std::string& source) {
  try {
    return parse_npy(bytes, source);
  } catch (const Error&) {
    throw;
  } catch (const std::exception& e) {  // an allocation that failed, or a library's own exception
    throw Error(fmt::format("npy: {}: {}", source, e.what()));
  }
}

}  // namespace af
