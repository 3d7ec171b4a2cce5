#include "af/error.hpp"
#include "af/npy.hpp"
#include "af/random.hpp"
#include "af/safetensors.hpp"

#include <catch2/catch.hpp>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <vector>

using Catch::Matchers::Contains;
namespace fs = std::filesystem;

namespace {
fs::path scratch(const std::string& name) {
  const fs::path dir = fs::temp_directory_path() / "af_test_files";
  fs::create_directories(dir);
  return dir / name;
}

std::vector<char> slurp(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

void spit(const fs::path& path, const std::vector<char>& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

void spit_safetensors(const fs::path& path, const std::string& header, std::size_t data_bytes) {
  std::vector<char> bytes(8 + header.size() + data_bytes, 1);
  const std::uint64_t size = header.size();
  std::memcpy(bytes.data(), &size, 8);
  std::memcpy(bytes.data() + 8, header.data(), header.size());
  spit(path, bytes);
}
}  // namespace

TEST_CASE("NPY files round-trip, with NumPy's header layout", "[files]") {
  af::Rng rng(1);
  for (const af::Shape& shape : {af::Shape{7}, af::Shape{3, 5}, af::Shape{2, 3, 4}}) {
    const af::Tensor t = af::random_normal(shape, rng);
    const fs::path path = scratch("round_trip.npy");
    af::write_npy(path, t);
    const std::vector<char> bytes = slurp(path);
    const std::uint16_t header_length =
        static_cast<std::uint16_t>(static_cast<unsigned char>(bytes[8]) | (static_cast<unsigned char>(bytes[9]) << 8));
    CHECK((10 + header_length) % 64 == 0);
    CHECK(bytes[10 + header_length - 1] == '\n');
    const af::Tensor back = af::read_npy(path);
    CHECK(back.shape() == t.shape());
    CHECK(af::max_abs_diff(back.values(), t.values()) == 0.0);
  }
  const std::string header(slurp(scratch("round_trip.npy")).data() + 10, 60);
  CHECK_THAT(header, Contains("'shape': (2, 3, 4)"));
}

TEST_CASE("NPY reads float64 and rejects what it cannot read, naming it", "[files][errors]") {
  std::string header = "{'descr': '<f8', 'fortran_order': False, 'shape': (2,), }";
  header.append((64 - (10 + header.size() + 1) % 64) % 64, ' ');
  header.push_back('\n');
  const double values[2] = {1.5, -2.25};
  std::string text = std::string("\x93NUMPY\x01\x00", 8) + static_cast<char>(header.size()) + '\0' + header;
  text.append(reinterpret_cast<const char*>(values), 16);
  std::vector<char> bytes(text.begin(), text.end());
  spit(scratch("f8.npy"), bytes);
  const af::Tensor t = af::read_npy(scratch("f8.npy"));
  CHECK(t.shape() == af::Shape{2});
  CHECK(t.at({1}) == -2.25f);

  bytes.resize(bytes.size() - 4);
  spit(scratch("short.npy"), bytes);
  CHECK_THROWS_WITH(af::read_npy(scratch("short.npy")), Contains("short.npy") && Contains("expected 16"));
  spit(scratch("not.npy"), {'h', 'e', 'l', 'l', 'o', '!', 0, 0, 0, 0, 0});
  CHECK_THROWS_WITH(af::read_npy(scratch("not.npy")), Contains("magic"));
}

TEST_CASE("Safetensors files round-trip tensors, integers and metadata", "[files]") {
  af::Rng rng(2);
  const af::Tensor a = af::random_normal(af::Shape{3, 4}, rng), b = af::random_normal(af::Shape{5}, rng);
  af::SafetensorsWriter writer;
  writer.add("layer.q_proj.weight", a);
  writer.add("b", b);
  writer.add_integers("input.position_ids", {1, 3}, {0, 1, 2});
  writer.set_metadata("format", "pt");
  writer.write(scratch("round_trip.safetensors"));

  const af::SafetensorsFile file = af::SafetensorsFile::read(scratch("round_trip.safetensors"));
  CHECK(file.names().size() == 3);
  CHECK(af::max_abs_diff(file.tensor("layer.q_proj.weight").values(), a.values()) == 0.0);
  CHECK(file.tensor("b").shape() == af::Shape{5});
  CHECK(file.integers("input.position_ids") == std::vector<std::int64_t>{0, 1, 2});
  CHECK(file.metadata().at("format") == "pt");
  CHECK_THROWS_WITH(file.tensor("missing.weight"), Contains("missing.weight") && Contains("round_trip.safetensors"));
  CHECK_THROWS_WITH(file.integers("b"), Contains("F32"));
}

TEST_CASE("Safetensors reads bf16 and f16 tensors as float32", "[files]") {
  af::StoredTensor half;
  half.dtype = af::DType::bf16;
  half.shape = {2};
  const std::uint16_t bits[2] = {af::bf16_bits(1.5f), af::bf16_bits(-3.0f)};
  half.bytes.resize(4);
  std::memcpy(half.bytes.data(), bits, 4);
  af::SafetensorsWriter writer;
  writer.add_stored("h", half);
  writer.write(scratch("bf16.safetensors"));
  const af::Tensor t = af::SafetensorsFile::read(scratch("bf16.safetensors")).tensor("h");
  CHECK(t.at({0}) == 1.5f);
  CHECK(t.at({1}) == -3.0f);
}

TEST_CASE("Truncated or malformed safetensors files are rejected with the reason", "[files][errors]") {
  af::SafetensorsWriter writer;
  writer.add("x", af::Tensor(af::Shape{4, 4}, std::vector<float>(16, 0.5f)));
  writer.write(scratch("good.safetensors"));
  std::vector<char> bytes = slurp(scratch("good.safetensors"));

  spit(scratch("tiny.safetensors"), {1, 2, 3});
  CHECK_THROWS_WITH(af::SafetensorsFile::read(scratch("tiny.safetensors")), Contains("3 bytes long"));

  bytes.resize(bytes.size() - 10);  // the data is cut short
  spit(scratch("cut.safetensors"), bytes);
  CHECK_THROWS_WITH(af::SafetensorsFile::read(scratch("cut.safetensors")),
                    Contains("cut.safetensors") && Contains("\"x\"") && Contains("data_offsets"));

  spit_safetensors(scratch("json.safetensors"), "{\"x\": {\"dtype\": \"F32\",", 0);
  CHECK_THROWS_WITH(af::SafetensorsFile::read(scratch("json.safetensors")), Contains("malformed JSON"));

  spit_safetensors(scratch("header.safetensors"), "{}", 0);
  std::vector<char> long_header = slurp(scratch("header.safetensors"));
  long_header[0] = 100;  // claims a 100-byte header
  spit(scratch("header.safetensors"), long_header);
  CHECK_THROWS_WITH(af::SafetensorsFile::read(scratch("header.safetensors")), Contains("100-byte header"));

  spit_safetensors(scratch("dtype.safetensors"), R"({"x": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 1]}})", 1);
  CHECK_THROWS_WITH(af::SafetensorsFile::read(scratch("dtype.safetensors")), Contains("\"Q4\""));

  spit_safetensors(scratch("size.safetensors"), R"({"x": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}})",
                   12);
  CHECK_THROWS_WITH(af::SafetensorsFile::read(scratch("size.safetensors")),
                    Contains("12 bytes") && Contains("expected 16"));

  spit_safetensors(scratch("field.safetensors"), R"({"x": {"dtype": "F32", "data_offsets": [0, 4]}})", 4);
  CHECK_THROWS_WITH(af::SafetensorsFile::read(scratch("field.safetensors")), Contains("\"x\"") && Contains("shape"));
}
