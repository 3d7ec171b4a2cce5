#include "af/gguf.hpp"

#include "af/error.hpp"
#include "af/numeric.hpp"
#include "regular_file.hpp"

#include <fmt/ranges.h>

#include <algorithm>
#include <bit>
#include <cstring>
#include <limits>
#include <utility>

namespace af::gguf {

namespace {

constexpr std::uint32_t min_version = 2, max_version = 3;
// The fewest bytes one entry can take, which bounds every count by the bytes left before anything is
// allocated: a key (8-byte length), its type (4) and the smallest value (1); a tensor info's name length (8),
// dimension count (4), type (4) and offset (8); an array's element type (4) and count (8).
constexpr std::uint64_t min_metadata_entry_bytes = 8 + 4 + 1;
constexpr std::uint64_t min_tensor_info_bytes = 8 + 4 + 4 + 8;
constexpr std::uint64_t min_array_bytes = 4 + 8;

// The bytes of one value of a scalar type (0 for string and array, whose size is variable).
std::uint64_t scalar_bytes(ValueType type) {
  switch (type) {
    case ValueType::uint8:
    case ValueType::int8:
    case ValueType::boolean:
      return 1;
    case ValueType::uint16:
    case ValueType::int16:
      return 2;
    case ValueType::uint32:
    case ValueType::int32:
    case ValueType::float32:
      return 4;
    case ValueType::uint64:
    case ValueType::int64:
    case ValueType::float64:
      return 8;
    case ValueType::string:
    case ValueType::array:
      return 0;
  }
  return 0;
}

bool is_known_value_type(std::uint32_t number) { return number <= static_cast<std::uint32_t>(ValueType::float64); }
bool is_signed(ValueType t) {
  return t == ValueType::int8 || t == ValueType::int16 || t == ValueType::int32 || t == ValueType::int64;
}
bool is_float(ValueType t) { return t == ValueType::float32 || t == ValueType::float64; }

// Reads the file front to back; every read checks that its bytes are there and names what it was reading.
class Cursor {
 public:
  explicit Cursor(std::span<const std::byte> bytes) : bytes_(bytes) {}

  std::uint64_t position() const { return position_; }
  std::uint64_t remaining() const { return bytes_.size() - position_; }

  const std::byte* take(std::uint64_t count, std::string_view what) {
    if (!(count <= remaining()))
      fail("the file ends at byte {} inside {} (expected {} more bytes at offset {}, {} remain)", bytes_.size(), what,
           count, position_, remaining());
    const std::byte* at = bytes_.data() + position_;
    position_ += count;
    return at;
  }

  template <class T>
  T read(std::string_view what) {
    const std::byte* at = take(sizeof(T), what);
    T value;
    std::memcpy(&value, at, sizeof(T));
    static_assert(std::endian::native == std::endian::little, "the GGUF reader assumes a little-endian host");
    return value;
  }

  std::string read_string(std::string_view what) {
    const auto length = read<std::uint64_t>(what);
    if (!(length <= max_string_bytes && length <= remaining()))
      fail("{} declares {} bytes at offset {} (expected at most {} and the {} bytes left)", what, length, position_ - 8,
           max_string_bytes, remaining());
    const std::byte* at = take(length, what);
    return std::string(reinterpret_cast<const char*>(at), static_cast<std::size_t>(length));
  }

 private:
  std::span<const std::byte> bytes_;
  std::uint64_t position_ = 0;
};

ValueType read_value_type(Cursor& in, std::string_view what) {
  const std::uint64_t at = in.position();
  const auto number = in.read<std::uint32_t>(what);
  if (!is_known_value_type(number))
    fail(
        "{} has value type {} at offset {} (expected 0..12: uint8, int8, uint16, int16, uint32, int32, float32, "
        "bool, string, array, uint64, int64, float64)",
        what, number, at);
  return static_cast<ValueType>(number);
}

bool read_bool(Cursor& in, std::string_view what) {
  const std::uint64_t at = in.position();
  const auto byte = in.read<std::uint8_t>(what);
  if (byte > 1) fail("{} is a bool of value {} at offset {} (expected 0 or 1)", what, byte, at);
  return byte == 1;
}

std::uint64_t read_unsigned(Cursor& in, ValueType type, std::string_view what) {
  switch (type) {
    case ValueType::uint8:
      return in.read<std::uint8_t>(what);
    case ValueType::uint16:
      return in.read<std::uint16_t>(what);
    case ValueType::uint32:
      return in.read<std::uint32_t>(what);
    default:
      return in.read<std::uint64_t>(what);
  }
}

std::int64_t read_signed(Cursor& in, ValueType type, std::string_view what) {
  switch (type) {
    case ValueType::int8:
      return in.read<std::int8_t>(what);
    case ValueType::int16:
      return in.read<std::int16_t>(what);
    case ValueType::int32:
      return in.read<std::int32_t>(what);
    default:
      return in.read<std::int64_t>(what);
  }
}

double read_float(Cursor& in, ValueType type, std::string_view what) {
  if (type == ValueType::float32) return in.read<float>(what);
  return in.read<double>(what);
}

Value read_value(Cursor& in, ValueType type, int depth, std::string_view what);

// An array's element type, count and elements; the count is checked against the bytes left first.
Value read_array(Cursor& in, int depth, std::string_view what) {
  if (!(depth <= max_array_depth)) fail("{} nests arrays more than {} deep", what, max_array_depth);
  Value value;
  value.type = ValueType::array;
  value.element_type = read_value_type(in, what);
  const std::uint64_t count_at = in.position();
  const auto count = in.read<std::uint64_t>(what);
  const ValueType element = value.element_type;
  const std::uint64_t min_element_bytes = element == ValueType::string  ? 8
                                          : element == ValueType::array ? min_array_bytes
                                                                        : scalar_bytes(element);
  if (!(count <= in.remaining() / min_element_bytes))
    fail("{} declares {} elements of {} at offset {} (expected at most {}: the {} bytes left hold no more)", what,
         count, name_of(element), count_at, in.remaining() / min_element_bytes, in.remaining());
  const auto n = static_cast<std::size_t>(count);
  if (element == ValueType::string) {
    std::vector<std::string> strings;
    strings.reserve(n);
    for (std::size_t i = 0; i < n; ++i) strings.push_back(in.read_string(what));
    value.data = std::move(strings);
  } else if (element == ValueType::array) {
    std::vector<Value> arrays;
    arrays.reserve(n);
    for (std::size_t i = 0; i < n; ++i) arrays.push_back(read_array(in, depth + 1, what));
    value.data = std::move(arrays);
  } else if (is_float(element)) {
    std::vector<double> floats(n);
    for (double& f : floats) f = read_float(in, element, what);
    value.data = std::move(floats);
  } else if (is_signed(element)) {
    std::vector<std::int64_t> signeds(n);
    for (std::int64_t& s : signeds) s = read_signed(in, element, what);
    value.data = std::move(signeds);
  } else {  // unsigned integers and bools
    std::vector<std::uint64_t> unsigneds(n);
    for (std::uint64_t& u : unsigneds)
      u = element == ValueType::boolean ? std::uint64_t{read_bool(in, what)} : read_unsigned(in, element, what);
    value.data = std::move(unsigneds);
  }
  return value;
}

Value read_value(Cursor& in, ValueType type, int depth, std::string_view what) {
  if (type == ValueType::array) return read_array(in, depth, what);
  Value value;
  value.type = type;
  value.element_type = type;
  if (type == ValueType::string)
    value.data = in.read_string(what);
  else if (type == ValueType::boolean)
    value.data = read_bool(in, what);
  else if (is_float(type))
    value.data = read_float(in, type, what);
  else if (is_signed(type))
    value.data = read_signed(in, type, what);
  else
    value.data = read_unsigned(in, type, what);
  return value;
}

std::uint64_t align_up(std::uint64_t offset, std::uint64_t alignment) {
  return offset + (alignment - offset % alignment) % alignment;
}

TensorInfo read_tensor_info(Cursor& in, std::uint64_t index) {
  TensorInfo info;
  info.name = in.read_string(fmt::format("the name of tensor {}", index));
  const std::string what = fmt::format("tensor \"{}\"", info.name);
  const auto n_dims = in.read<std::uint32_t>(what);
  if (!(n_dims <= max_dims)) fail("{} has {} dimensions (expected at most {})", what, n_dims, max_dims);
  info.elements = 1;
  for (std::uint32_t d = 0; d < n_dims; ++d) {
    const auto size = in.read<std::uint64_t>(what);
    info.dims.push_back(size);
    if (!(size == 0 || info.elements <= max_elements / size))
      fail("{} has dims [{}] (expected at most {} elements in all)", what, fmt::join(info.dims, ", "), max_elements);
    info.elements *= size;
  }
  const std::uint64_t type_at = in.position();
  const auto type = in.read<std::uint32_t>(what);
  if (!is_known_type(type))
    fail(
        "{} has ggml type {} at offset {} (expected a known type such as 0 (F32), 1 (F16), 2 (Q4_0), 3 (Q4_1) or "
        "8 (Q8_0))",
        what, type, type_at);
  info.type = static_cast<GgmlType>(type);
  const BlockLayout layout = layout_of(info.type);
  if (!(info.row_length() % layout.block_elements == 0))
    fail("{} has rows of {} elements (expected a multiple of {}, the block size of {})", what, info.row_length(),
         layout.block_elements, name_of(info.type));
  // At most 2^60 elements, blocks of at least one element and at most 292 bytes: the product fits in uint64.
  info.bytes = info.elements / layout.block_elements * layout.block_bytes;
  info.offset = in.read<std::uint64_t>(what);
  return info;
}

template <class T>
const T* get_if(const Value* value) {
  return value == nullptr ? nullptr : std::get_if<T>(&value->data);
}

}  // namespace

std::string_view name_of(ValueType type) {
  constexpr std::string_view names[] = {"uint8", "int8",   "uint16", "int16",  "uint32", "int32",  "float32",
                                        "bool",  "string", "array",  "uint64", "int64",  "float64"};
  const auto number = static_cast<std::uint32_t>(type);
  return number < std::size(names) ? names[number] : std::string_view("?");
}

std::size_t Value::size() const {
  return std::visit(
      [](const auto& held) -> std::size_t {
        using Held = std::decay_t<decltype(held)>;
        if constexpr (requires { held.size(); } && !std::is_same_v<Held, std::string>)
          return held.size();
        else
          return 1;
      },
      data);
}

File File::open(const std::filesystem::path& path) {
  return from_bytes(detail::read_regular_file(path, max_file_bytes, "gguf"), path.string());
}

File File::from_bytes(std::vector<std::byte> bytes, std::string source) {
  File file;
  file.source_ = std::move(source);
  file.bytes_ = std::move(bytes);
  try {
    Cursor in(file.bytes_);
    const std::byte* magic = in.take(4, "the magic");
    if (std::memcmp(magic, "GGUF", 4) != 0) {
      std::string shown;
      for (int i = 0; i < 4; ++i) {
        const auto c = std::to_integer<unsigned char>(magic[i]);
        shown += c >= 0x20 && c < 0x7F ? fmt::format("{}", static_cast<char>(c)) : fmt::format("\\x{:02x}", c);
      }
      fail("the magic is \"{}\" (expected \"GGUF\")", shown);
    }
    file.version_ = in.read<std::uint32_t>("the version");
    if (!(file.version_ >= min_version && file.version_ <= max_version)) {
      const std::uint32_t swapped = (file.version_ >> 24) | ((file.version_ >> 8) & 0xFF00u) |
                                    ((file.version_ << 8) & 0xFF0000u) | (file.version_ << 24);
      const bool byte_swapped = swapped >= min_version && swapped <= max_version;
      fail("version {} is not supported (expected {} or {}{})", file.version_, min_version, max_version,
           byte_swapped         ? "; this looks like a big-endian file"
           : file.version_ == 1 ? "; version 1 is obsolete"
                                : "");
    }
    const auto tensor_count = in.read<std::uint64_t>("the tensor count");
    const auto metadata_count = in.read<std::uint64_t>("the metadata count");
    if (!(tensor_count <= in.remaining() / min_tensor_info_bytes))
      fail("the header declares {} tensors (expected at most {}: the {} bytes left hold no more)", tensor_count,
           in.remaining() / min_tensor_info_bytes, in.remaining());
    if (!(metadata_count <= in.remaining() / min_metadata_entry_bytes))
      fail("the header declares {} metadata entries (expected at most {}: the {} bytes left hold no more)",
           metadata_count, in.remaining() / min_metadata_entry_bytes, in.remaining());

    for (std::uint64_t i = 0; i < metadata_count; ++i) {
      const std::uint64_t key_at = in.position();
      std::string key = in.read_string(fmt::format("the key of metadata entry {}", i));
      if (file.metadata_.contains(key)) fail("metadata key \"{}\" appears twice (again at offset {})", key, key_at);
      const std::string what = fmt::format("metadata \"{}\"", key);
      const ValueType type = read_value_type(in, what);
      file.metadata_.emplace(std::move(key), read_value(in, type, 1, what));
    }

    if (const Value* alignment = file.find("general.alignment")) {
      const auto* number = get_if<std::uint64_t>(alignment);
      if (!(alignment->type != ValueType::boolean && number != nullptr && *number != 0 &&
            std::has_single_bit(*number) && *number <= (std::uint64_t{1} << 30)))
        fail("general.alignment is {} {} (expected an unsigned power of two up to 2^30)", name_of(alignment->type),
             number != nullptr ? fmt::format("{}", *number) : std::string("value"));
      file.alignment_ = *number;
    }

    file.tensors_.reserve(static_cast<std::size_t>(tensor_count));
    for (std::uint64_t i = 0; i < tensor_count; ++i) {
      TensorInfo info = read_tensor_info(in, i);
      if (!file.tensor_index_.emplace(info.name, file.tensors_.size()).second)
        fail("tensor name \"{}\" appears twice (tensors {} and {})", info.name, file.tensor_index_.at(info.name), i);
      file.tensors_.push_back(std::move(info));
    }

    const std::uint64_t file_size = file.bytes_.size();
    file.data_offset_ = align_up(in.position(), file.alignment_);
    if (tensor_count > 0 && !(file.data_offset_ <= file_size))
      fail(
          "the data section starts at offset {} (the tensor infos end at {}, aligned to {}), past the end of the "
          "{}-byte file",
          file.data_offset_, in.position(), file.alignment_, file_size);
    const std::uint64_t data_size = file.data_offset_ <= file_size ? file_size - file.data_offset_ : 0;

    std::vector<std::size_t> by_offset(file.tensors_.size());
    for (std::size_t i = 0; i < by_offset.size(); ++i) {
      const TensorInfo& t = file.tensors_[i];
      if (!(t.offset % file.alignment_ == 0))
        fail("tensor \"{}\" has offset {} (expected a multiple of the alignment {})", t.name, t.offset,
             file.alignment_);
      if (!(t.offset <= data_size && t.bytes <= data_size - t.offset))
        fail("tensor \"{}\" of {} bytes at offset {} ends past the {}-byte data section", t.name, t.bytes, t.offset,
             data_size);
      by_offset[i] = i;
    }
    std::ranges::sort(by_offset, [&](std::size_t a, std::size_t b) {
      return std::pair(file.tensors_[a].offset, a) < std::pair(file.tensors_[b].offset, b);
    });
    for (std::size_t k = 1; k < by_offset.size(); ++k) {
      const TensorInfo& before = file.tensors_[by_offset[k - 1]];
      const TensorInfo& after = file.tensors_[by_offset[k]];
      if (before.offset + before.bytes > after.offset && before.bytes > 0 && after.bytes > 0)
        fail("tensors \"{}\" (bytes {} to {}) and \"{}\" (from {}) overlap", before.name, before.offset,
             before.offset + before.bytes, after.name, after.offset);
    }
  } catch (const Error& e) {
    throw Error(fmt::format("gguf: {}: {}", file.source_, e.what()));
  } catch (const std::exception& e) {  // an allocation that failed
    throw Error(fmt::format("gguf: {}: {}", file.source_, e.what()));
  }
  return file;
}

const Value* File::find(std::string_view key) const {
  const auto it = metadata_.find(key);
  return it == metadata_.end() ? nullptr : &it->second;
}

namespace {
const Value& require_key(const File& file, std::string_view key) {
  const Value* value = file.find(key);
  if (value == nullptr) fail("gguf: {}: there is no metadata key \"{}\"", file.source(), key);
  return *value;
}

[[noreturn]] void wrong_type(const File& file, std::string_view key, const Value& value, std::string_view expected) {
  if (value.type == ValueType::array)
    fail("gguf: {}: metadata \"{}\" is an array of {} (expected {})", file.source(), key, name_of(value.element_type),
         expected);
  fail("gguf: {}: metadata \"{}\" is {} (expected {})", file.source(), key, name_of(value.type), expected);
}
}  // namespace

std::string_view File::string(std::string_view key) const {
  const Value& value = require_key(*this, key);
  if (const auto* text = std::get_if<std::string>(&value.data)) return *text;
  wrong_type(*this, key, value, "a string");
}

std::uint64_t File::unsigned_integer(std::string_view key) const {
  const Value& value = require_key(*this, key);
  if (value.type != ValueType::boolean) {
    if (const auto* u = std::get_if<std::uint64_t>(&value.data)) return *u;
    if (const auto* s = std::get_if<std::int64_t>(&value.data)) {
      if (*s >= 0) return static_cast<std::uint64_t>(*s);
      fail("gguf: {}: metadata \"{}\" is {} (expected an integer >= 0)", source_, key, *s);
    }
  }
  wrong_type(*this, key, value, "an unsigned integer");
}

double File::number(std::string_view key) const {
  const Value& value = require_key(*this, key);
  if (value.type != ValueType::boolean) {
    if (const auto* u = std::get_if<std::uint64_t>(&value.data)) return static_cast<double>(*u);
    if (const auto* s = std::get_if<std::int64_t>(&value.data)) return static_cast<double>(*s);
    if (const auto* f = std::get_if<double>(&value.data)) return *f;
  }
  wrong_type(*this, key, value, "a number");
}

std::span<const std::string> File::strings(std::string_view key) const {
  const Value& value = require_key(*this, key);
  if (const auto* list = std::get_if<std::vector<std::string>>(&value.data)) return *list;
  wrong_type(*this, key, value, "an array of strings");
}

std::vector<std::int64_t> File::integers(std::string_view key) const {
  const Value& value = require_key(*this, key);
  if (const auto* s = std::get_if<std::vector<std::int64_t>>(&value.data)) return *s;
  if (const auto* u = std::get_if<std::vector<std::uint64_t>>(&value.data)) {
    std::vector<std::int64_t> out;
    out.reserve(u->size());
    for (const std::uint64_t element : *u) {
      if (!(element <= static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max())))
        fail("gguf: {}: metadata \"{}\" holds {} (expected integers below 2^63)", source_, key, element);
      out.push_back(static_cast<std::int64_t>(element));
    }
    return out;
  }
  wrong_type(*this, key, value, "an array of integers");
}

std::vector<double> File::numbers(std::string_view key) const {
  const Value& value = require_key(*this, key);
  if (value.type == ValueType::array && value.element_type != ValueType::boolean) {
    if (const auto* f = std::get_if<std::vector<double>>(&value.data)) return *f;
    if (const auto* s = std::get_if<std::vector<std::int64_t>>(&value.data))
      return std::vector<double>(s->begin(), s->end());
    if (const auto* u = std::get_if<std::vector<std::uint64_t>>(&value.data))
      return std::vector<double>(u->begin(), u->end());
  }
  wrong_type(*this, key, value, "an array of numbers");
}

const TensorInfo* File::find_tensor(std::string_view name) const {
  const auto it = tensor_index_.find(name);
  return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}

const TensorInfo& File::tensor(std::string_view name) const {
  const TensorInfo* info = find_tensor(name);
  if (info == nullptr) fail("gguf: {}: there is no tensor \"{}\" (it holds {})", source_, name, tensors_.size());
  return *info;
}

std::span<const std::byte> File::data(const TensorInfo& tensor) const {
  const TensorInfo* own = find_tensor(tensor.name);
  if (!(own != nullptr && own->offset == tensor.offset && own->bytes == tensor.bytes))
    fail("gguf: {}: tensor \"{}\" is not one of this file's", source_, tensor.name);
  return std::span<const std::byte>(bytes_).subspan(static_cast<std::size_t>(data_offset_ + own->offset),
                                                    static_cast<std::size_t>(own->bytes));
}

std::vector<float> File::dequantize(const TensorInfo& tensor) const {
  const std::span<const std::byte> stored = data(tensor);
  std::vector<float> out(static_cast<std::size_t>(tensor.elements));
  if (out.empty()) return out;  // an empty tensor may sit at the very end of the file, where no byte is left
  switch (tensor.type) {
    case GgmlType::f32:
    case GgmlType::f16:
    case GgmlType::bf16:
    case GgmlType::q8_0:
    case GgmlType::q4_0:
    case GgmlType::q4_1:
      af::gguf::dequantize(tensor.type, stored, out);
      return out;
    default:
      fail("gguf: {}: tensor \"{}\" is {} (expected F32, F16, BF16, Q8_0, Q4_0 or Q4_1 to dequantize)", source_,
           tensor.name, name_of(tensor.type));
  }
}

}  // namespace af::gguf
