// The file readers on bad input: every malformed, lying, truncated or absurd file, and every path that is not
// a regular file, ends in an af::Error naming the source and the problem, promptly and without allocating
// what the file merely claims.
#include "af/error.hpp"
#include "af/npy.hpp"
#include "af/safetensors.hpp"
#include "error_of.hpp"

#include <sys/stat.h>
#include <catch2/catch.hpp>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <string>
#include <vector>

using Catch::Matchers::Contains;
namespace fs = std::filesystem;

namespace {
fs::path scratch(const std::string& name) {
  const fs::path dir = fs::temp_directory_path() / "af_test_readers";
  fs::create_directories(dir);
  return dir / name;
}

std::vector<std::byte> as_bytes(const std::string& text) {
  std::vector<std::byte> bytes(text.size());
  std::memcpy(bytes.data(), text.data(), text.size());
  return bytes;
}

void write_file(const fs::path& path, const std::vector<std::byte>& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
}

using af_test::error_of;

std::string npy_error(const std::vector<std::byte>& bytes) {
  return error_of([&] { af::read_npy_bytes(bytes, "bad.npy"); });
}

std::string safetensors_error(const std::vector<std::byte>& bytes) {
  return error_of([&] { af::SafetensorsFile::parse(bytes, "bad.safetensors"); });
}

// A version 1.0 `.npy` file with the given header dictionary, followed by `data_bytes` bytes.
std::vector<std::byte> npy_file(const std::string& dictionary, std::size_t data_bytes) {
  std::string header = dictionary;
  header.append((64 - (10 + header.size() + 1) % 64) % 64, ' ');
  header.push_back('\n');
  std::string text = std::string("\x93NUMPY\x01\x00", 8);
  text.push_back(static_cast<char>(header.size() & 0xFF));
  text.push_back(static_cast<char>(header.size() >> 8));
  text += header;
  text.append(data_bytes, '\0');
  return as_bytes(text);
}

std::vector<std::byte> npy_of_shape(const std::string& shape, std::size_t data_bytes) {
  return npy_file("{'descr': '<f4', 'fortran_order': False, 'shape': " + shape + ", }", data_bytes);
}

// A safetensors file: the 8-byte length of `header`, the header, then `data_bytes` bytes.
std::vector<std::byte> safetensors_file(const std::string& header, std::size_t data_bytes) {
  std::vector<std::byte> bytes(8 + header.size() + data_bytes, std::byte{1});
  const std::uint64_t size = header.size();
  std::memcpy(bytes.data(), &size, 8);
  std::memcpy(bytes.data() + 8, header.data(), header.size());
  return bytes;
}

std::string nested_arrays(std::size_t depth) { return std::string(depth, '[') + std::string(depth, ']'); }
}  // namespace

TEST_CASE("A shape whose element count overflows is an error, not a wrapped count", "[tensor][errors]") {
  constexpr std::int64_t two_to_32 = std::int64_t{1} << 32;
  CHECK_THROWS_WITH(af::Shape({two_to_32, two_to_32}), Contains("[4294967296, 4294967296]") && Contains("2^60"));
  CHECK_THROWS_AS(af::Shape({INT64_MAX, 2}), af::Error);
  CHECK_THROWS_AS(af::Shape({std::int64_t{1} << 31, std::int64_t{1} << 31, 4}), af::Error);
  CHECK(af::Shape{std::int64_t{1} << 30, std::int64_t{1} << 30}.numel() == std::int64_t{1} << 60);
  const std::vector<std::int64_t> many = {two_to_32, two_to_32, two_to_32, two_to_32, two_to_32};
  CHECK_THROWS_AS(af::Shape::numel_of(many), af::Error);
  const std::vector<std::int64_t> empty = {two_to_32, two_to_32, 0};
  CHECK(af::Shape::numel_of(empty) == 0);  // zero elements, however large the other sizes
  CHECK(af::Shape{two_to_32, two_to_32, 0}.numel() == 0);
  const std::vector<std::int64_t> negative = {3, -2};
  CHECK_THROWS_WITH(af::Shape::numel_of(negative), Contains("-2"));
}

TEST_CASE("NPY reads from memory what it reads from a file", "[files]") {
  const std::vector<float> values = {1.5f, -2.0f, 0.25f, 8.0f, 3.0f, -1.0f};
  af::write_npy(scratch("memory.npy"), af::Tensor(af::Shape{2, 3}, values));
  std::ifstream in(scratch("memory.npy"), std::ios::binary);
  const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const af::Tensor t = af::read_npy_bytes(as_bytes(text));
  CHECK(t.shape() == af::Shape{2, 3});
  CHECK(std::vector<float>(t.values().begin(), t.values().end()) == values);
  CHECK(af::read_npy_bytes(npy_of_shape("()", 4)).shape() == af::Shape{});
  CHECK(af::read_npy_bytes(npy_of_shape("(0, 4294967296)", 0)).numel() == 0);
}

TEST_CASE("NPY checks the data against the shape before allocating", "[files][errors]") {
  // Each claims far more memory than the machine has; the old reader allocated it (or failed with
  // std::bad_alloc / std::length_error) before it looked at the data.
  CHECK_THAT(npy_error(npy_of_shape("(4294967296, 4294967296)", 0)), Contains("bad.npy") && Contains("2^60"));
  CHECK_THAT(npy_error(npy_of_shape("(1099511627776,)", 0)), Contains("expected 4398046511104"));
  CHECK_THAT(npy_error(npy_of_shape("(2000000000,)", 16)),
             Contains("16 data bytes") && Contains("expected 8000000000"));
  CHECK_THAT(npy_error(npy_of_shape("(1152921504606846976, 16)", 0)), Contains("2^60"));
}

TEST_CASE("NPY rejects malformed headers, naming the problem", "[files][errors]") {
  CHECK_THAT(npy_error(npy_of_shape("(2, 3, 4, 5, 6)", 0)), Contains("more than 4 dimensions"));
  CHECK_THAT(npy_error(npy_of_shape("(-3,)", 0)), Contains("-3"));
  CHECK_THAT(npy_error(npy_of_shape("(99999999999999999999,)", 0)), Contains("not a tuple of integers"));
  CHECK_THAT(npy_error(npy_of_shape("(two,)", 0)), Contains("not a tuple of integers"));
  CHECK_THAT(npy_error(npy_of_shape("7", 0)), Contains("not a tuple"));
  CHECK_THAT(npy_error(npy_file("{'descr': '<i4', 'fortran_order': False, 'shape': (1,), }", 4)),
             Contains("'<i4'") && Contains("not supported"));
  CHECK_THAT(npy_error(npy_file("{'descr': '<f4', 'fortran_order': True, 'shape': (1,), }", 4)),
             Contains("fortran_order is True"));
  CHECK_THAT(npy_error(npy_file("{'descr': '<f4', 'shape': (1,), }", 4)), Contains("no 'fortran_order' field"));

  std::vector<std::byte> bytes = npy_of_shape("(4,)", 16);
  bytes[8] = std::byte{0xFF}, bytes[9] = std::byte{0x7F};  // the header claims 32767 bytes
  CHECK_THAT(npy_error(bytes), Contains("runs past the end"));
  bytes.resize(9);
  CHECK_THAT(npy_error(bytes), Contains("magic"));

  // Version 2.0 stores a four-byte header length: one of 4 GiB is refused before anything is read.
  std::vector<std::byte> version2 = as_bytes(std::string("\x93NUMPY\x02\x00\xFF\xFF\xFF\xFF{}", 14));
  CHECK_THAT(npy_error(version2), Contains("4294967295 bytes long") && Contains("at most 65536"));
  version2.resize(11);
  CHECK_THAT(npy_error(version2), Contains("11 bytes long"));
  version2[6] = std::byte{9};
  CHECK_THAT(npy_error(version2), Contains("version 9"));
}

TEST_CASE("Safetensors reads from memory what it reads from a file", "[files]") {
  const std::vector<std::byte> bytes = safetensors_file(
      R"({"__metadata__": {"format": "pt"}, "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},)"
      R"( "b": {"dtype": "I32", "shape": [], "data_offsets": [8, 12]},)"
      R"( "empty": {"dtype": "F16", "shape": [0, 4294967296], "data_offsets": [12, 12]}})",
      12);
  const af::SafetensorsFile file = af::SafetensorsFile::parse(bytes);
  CHECK(file.names() == std::vector<std::string>{"a", "b", "empty"});
  CHECK(file.metadata().at("format") == "pt");
  CHECK(file.integers("b") == std::vector<std::int64_t>{0x01010101});
  CHECK(file.stored("empty").bytes.empty());
}

TEST_CASE("Safetensors rejects absurd shapes and lying byte ranges", "[files][errors]") {
  // The old reader multiplied 2^32 by 2^32 to zero and loaded this tensor of "no" bytes.
  CHECK_THAT(safetensors_error(safetensors_file(
                 R"({"x": {"dtype": "F32", "shape": [4294967296, 4294967296], "data_offsets": [0, 0]}})", 0)),
             Contains("bad.safetensors") && Contains("\"x\"") && Contains("2^60"));
  CHECK_THAT(safetensors_error(safetensors_file(
                 R"({"x": {"dtype": "F64", "shape": [1152921504606846976], "data_offsets": [0, 0]}})", 0)),
             Contains("expected 9223372036854775808"));
  CHECK_THAT(
      safetensors_error(safetensors_file(R"({"x": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 0]}})", 0)),
      Contains("not an integer in [0, 2^63)"));
  CHECK_THAT(
      safetensors_error(safetensors_file(R"({"x": {"dtype": "F32", "shape": [1e30], "data_offsets": [0, 4]}})", 4)),
      Contains("1e+30"));
  CHECK_THAT(safetensors_error(safetensors_file(
                 R"({"x": {"dtype": "F32", "shape": [18446744073709551615], "data_offsets": [0, 4]}})", 4)),
             Contains("not an integer"));
  CHECK_THAT(safetensors_error(safetensors_file(R"({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 8]}})", 4)),
             Contains("[0, 8] do not lie within the 4 data bytes"));
  CHECK_THAT(safetensors_error(safetensors_file(R"({"x": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}})", 4)),
             Contains("[4, 0]"));
  CHECK_THAT(
      safetensors_error(safetensors_file(
          R"({"x": {"dtype": "F32", "shape": [1], "data_offsets": [18446744073709551612, 18446744073709551615]}})", 4)),
      Contains("do not lie within"));
  CHECK_THAT(
      safetensors_error(safetensors_file(R"({"x": {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}})", 4)),
      Contains("not two byte offsets"));
  CHECK_THAT(safetensors_error(safetensors_file(R"({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0]}})", 4)),
             Contains("not two byte offsets"));
  CHECK_THAT(safetensors_error(safetensors_file(R"({"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}})", 8)),
             Contains("8 bytes stored") && Contains("expected 12"));
  CHECK_THAT(safetensors_error(safetensors_file(R"({"x": {"dtype": 7, "shape": [1], "data_offsets": [0, 4]}})", 4)),
             Contains("\"dtype\" is a number"));
  CHECK_THAT(safetensors_error(safetensors_file(R"({"x": {"dtype": "F32", "shape": 1, "data_offsets": [0, 4]}})", 4)),
             Contains("\"shape\" is a number"));
  CHECK_THAT(safetensors_error(safetensors_file(R"({"x": [1, 2]})", 0)), Contains("the entry is an array"));
  CHECK_THAT(safetensors_error(safetensors_file(R"([1, 2])", 0)), Contains("the header is an array"));
}

TEST_CASE("Safetensors tensors must tile the data: no overlap, no unused bytes", "[files][errors]") {
  CHECK_THAT(safetensors_error(safetensors_file(R"({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},)"
                                                R"( "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}})",
                                                24)),
             Contains("\"a\" and \"b\" overlap"));
  CHECK_THAT(safetensors_error(safetensors_file(R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},)"
                                                R"( "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})",
                                                8)),
             Contains("overlap"));
  CHECK_THAT(
      safetensors_error(safetensors_file(R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}})", 12)),
      Contains("data bytes [0, 4) belong to no tensor"));
  CHECK_THAT(
      safetensors_error(safetensors_file(R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})", 100)),
      Contains("data bytes [8, 100) belong to no tensor"));
}

TEST_CASE("Safetensors bounds its header: length, nesting depth, metadata", "[files][errors]") {
  std::vector<std::byte> huge_header = safetensors_file("{}", 0);
  const std::uint64_t claimed = std::uint64_t{1} << 40;
  std::memcpy(huge_header.data(), &claimed, 8);
  CHECK_THAT(safetensors_error(huge_header), Contains("1099511627776-byte header") && Contains("at most 100000000"));

  // 100000 levels: the old reader parsed them and overflowed the stack when it printed the metadata back.
  CHECK_THAT(safetensors_error(safetensors_file(R"({"__metadata__": {"deep": )" + nested_arrays(100000) + "}}", 0)),
             Contains("bad.safetensors") && Contains("more than 16 deep"));
  CHECK_THAT(safetensors_error(safetensors_file(std::string(100000, '{'), 0)), Contains("more than 16 deep"));
  CHECK_THAT(safetensors_error(safetensors_file(R"({"x": )" + nested_arrays(17) + "}", 0)), Contains("16 deep"));
  // Brackets inside strings are text, not nesting.
  const af::SafetensorsFile text = af::SafetensorsFile::parse(
      safetensors_file(R"({"__metadata__": {"brackets": ")" + nested_arrays(1000) + R"(\"[{"}})", 0));
  CHECK(text.metadata().at("brackets").size() == 2003);

  CHECK_THAT(safetensors_error(safetensors_file(R"({"__metadata__": {"n": 3}})", 0)),
             Contains("__metadata__ \"n\" is a number (expected a string)"));
  CHECK_THAT(safetensors_error(safetensors_file(R"({"__metadata__": {"list": [[["a"]]]}})", 0)),
             Contains("is an array (expected a string)"));
  CHECK_THAT(safetensors_error(safetensors_file(R"({"__metadata__": "pt"})", 0)), Contains("__metadata__ is a string"));
  CHECK_THAT(safetensors_error(safetensors_file("{\"__metadata__\": {\"bad\": \"\xFF\"}}", 0)),
             Contains("malformed JSON"));
}

TEST_CASE("The readers take only regular files, checked before they are opened", "[files][errors]") {
  const fs::path directory = scratch("a_directory.safetensors");
  fs::create_directories(directory);
  CHECK_THAT(error_of([&] { af::read_npy(directory); }),
             Contains(directory.string()) && Contains("a directory") && Contains("expected a regular file"));
  CHECK_THAT(error_of([&] { af::SafetensorsFile::read(directory); }),
             Contains(directory.string()) && Contains("a directory") && Contains("expected a regular file"));

  const fs::path missing = scratch("missing.npy");
  fs::remove(missing);
  CHECK_THAT(error_of([&] { af::read_npy(missing); }), Contains("missing.npy") && Contains("does not exist"));
  CHECK_THAT(error_of([&] { af::SafetensorsFile::read(missing); }), Contains("does not exist"));

  // A device never ends: the old readers read /dev/zero until memory ran out.
  if (fs::exists("/dev/zero")) {
    CHECK_THAT(error_of([] { af::read_npy("/dev/zero"); }), Contains("/dev/zero is a character device"));
    CHECK_THAT(error_of([] { af::SafetensorsFile::read("/dev/zero"); }), Contains("a character device"));
  }

  // Opening a FIFO blocks until a writer comes: the old readers hung here.
  const fs::path fifo = scratch("fifo.npy");
  fs::remove(fifo);
  REQUIRE(mkfifo(fifo.c_str(), 0600) == 0);
  CHECK_THAT(error_of([&] { af::read_npy(fifo); }), Contains("fifo.npy is a FIFO (expected a regular file)"));
  CHECK_THAT(error_of([&] { af::SafetensorsFile::read(fifo); }), Contains("a FIFO"));
  fs::remove(fifo);
}

TEST_CASE("The readers name the file in errors from regular files", "[files][errors]") {
  const fs::path npy = scratch("lying.npy");
  write_file(npy, npy_of_shape("(4294967296, 4294967296)", 0));
  CHECK_THAT(error_of([&] { af::read_npy(npy); }), Contains(npy.string()) && Contains("2^60"));
  const fs::path safetensors = scratch("lying.safetensors");
  write_file(safetensors, safetensors_file(R"({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 8]}})", 4));
  CHECK_THAT(error_of([&] { af::SafetensorsFile::read(safetensors); }),
             Contains(safetensors.string()) && Contains("\"x\""));
}
