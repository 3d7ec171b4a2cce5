#include "af/npy.hpp"

#include "af/error.hpp"
#include "af/numeric.hpp"

#include <fmt/ranges.h>

#include <cstring>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

namespace af {

namespace {
constexpr char magic[] = "\x93NUMPY";
constexpr std::size_t magic_size = 6;

// The value that follows `'key':` in the header dictionary, up to the next top-level comma.
std::string header_field(const std::string& header, const std::string& key, const std::filesystem::path& path) {
  const std::string quoted = "'" + key + "':";
  const auto at = header.find(quoted);
  require(at != std::string::npos, "npy: {}: header has no '{}' field: {}", path.string(), key, header);
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
  std::ifstream in(path, std::ios::binary);
  require(in.good(), "npy: cannot open {}", path.string());
  std::vector<char> raw((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  require(raw.size() >= 10 && std::memcmp(raw.data(), magic, magic_size) == 0,
          "npy: {} does not start with the .npy magic string", path.string());
  const int major = static_cast<unsigned char>(raw[6]);
  require(major >= 1 && major <= 3, "npy: {}: format version {} is not supported (expected 1, 2 or 3)", path.string(),
          major);
  std::size_t header_length = 0, header_start = 0;
  if (major == 1) {
    header_length =
        static_cast<unsigned char>(raw[8]) | (static_cast<std::size_t>(static_cast<unsigned char>(raw[9])) << 8);
    header_start = 10;
  } else {
    require(raw.size() >= 12, "npy: {} is truncated", path.string());
    for (int i = 0; i < 4; ++i)
      header_length |= static_cast<std::size_t>(static_cast<unsigned char>(raw[8 + i])) << (8 * i);
    header_start = 12;
  }
  require(header_start + header_length <= raw.size(), "npy: {}: header runs past the end of the file", path.string());
  const std::string header(raw.data() + header_start, header_length);

  const std::string descr = header_field(header, "descr", path);
  const std::string fortran = header_field(header, "fortran_order", path);
  require(fortran == "False", "npy: {}: fortran_order is {} (expected False, C order)", path.string(), fortran);
  int element_size = 0;
  if (descr == "'<f4'")
    element_size = 4;
  else if (descr == "'<f8'")
    element_size = 8;
  else if (descr == "'<f2'")
    element_size = 2;
  require(element_size != 0, "npy: {}: dtype {} is not supported (expected '<f4', '<f8' or '<f2')", path.string(),
          descr);

  std::vector<std::int64_t> dims;
  const std::string shape_text = header_field(header, "shape", path);
  std::size_t pos = shape_text.find('(');
  require(pos != std::string::npos, "npy: {}: shape {} is not a tuple", path.string(), shape_text);
  ++pos;
  while (pos < shape_text.size() && shape_text[pos] != ')') {
    if (shape_text[pos] == ' ' || shape_text[pos] == ',') {
      ++pos;
      continue;
    }
    std::size_t used = 0;
    try {
      dims.push_back(std::stoll(shape_text.substr(pos), &used));
    } catch (const std::exception&) {
      throw Error(fmt::format("npy: {}: shape {} is not a tuple of integers", path.string(), shape_text));
    }
    pos += used;
  }
  Tensor tensor{Shape(std::span<const std::int64_t>(dims))};
  const std::size_t data_start = header_start + header_length;
  const auto needed = static_cast<std::size_t>(tensor.numel() * element_size);
  if (!(raw.size() - data_start >= needed))
    fail("npy: {}: {} data bytes for shape [{}] (expected {})", path.string(), raw.size() - data_start,
         fmt::join(dims, ", "), needed);
  const char* data = raw.data() + data_start;
  for (std::int64_t i = 0; i < tensor.numel(); ++i) {
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

}  // namespace af
