// The GGUF reader and ggml's block formats: hand-made blocks against values decoded by another route
// (float64 arithmetic on hand-split nibbles and a float64 fp16 decoder), a file written here with every
// metadata type read back, every truncation and lie of it rejected with af::Error, and the book's model file
// against checks recorded with PyPI's gguf package (scripts/record_gguf_checks.py).
#include "af/error.hpp"
#include "af/gguf.hpp"
#include "af/numeric.hpp"
#include "af/quant_blocks.hpp"
#include "error_of.hpp"
#include "gguf_writer.hpp"

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <array>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <random>
#include <string>
#include <vector>

using af::gguf::GgmlType;
using af::gguf::ValueType;
using Catch::Matchers::Contains;
using namespace af_test;

namespace {

// ---- blocks built by hand, and their values by a second route -------------------------------------------

// An fp16 bit pattern's value in float64, from its fields (not through af::fp16_to_float).
double fp16_value(std::uint16_t bits) {
  const int sign = bits >> 15, exponent = (bits >> 10) & 0x1F, mantissa = bits & 0x3FF;
  double magnitude;
  if (exponent == 0x1F)
    magnitude = mantissa == 0 ? INFINITY : NAN;
  else if (exponent == 0)
    magnitude = std::ldexp(static_cast<double>(mantissa), -24);
  else
    magnitude = std::ldexp(1024.0 + mantissa, exponent - 25);
  return sign ? -magnitude : magnitude;
}

void put_u16(std::vector<std::byte>& out, std::uint16_t v) {
  out.push_back(static_cast<std::byte>(v & 0xFF));
  out.push_back(static_cast<std::byte>(v >> 8));
}

std::vector<std::byte> q8_0_block(std::uint16_t d, const std::array<std::int8_t, 32>& q) {
  std::vector<std::byte> out;
  put_u16(out, d);
  for (const std::int8_t v : q) out.push_back(static_cast<std::byte>(static_cast<std::uint8_t>(v)));
  return out;
}

// Byte j holds element j in its low nibble and element j + 16 in its high nibble.
std::vector<std::byte> nibbles(const std::array<std::uint8_t, 32>& q) {
  std::vector<std::byte> out;
  for (int j = 0; j < 16; ++j) out.push_back(static_cast<std::byte>(q[j] | (q[j + 16] << 4)));
  return out;
}

std::vector<std::byte> q4_0_block(std::uint16_t d, const std::array<std::uint8_t, 32>& q) {
  std::vector<std::byte> out;
  put_u16(out, d);
  const auto packed = nibbles(q);
  out.insert(out.end(), packed.begin(), packed.end());
  return out;
}

std::vector<std::byte> q4_1_block(std::uint16_t d, std::uint16_t m, const std::array<std::uint8_t, 32>& q) {
  std::vector<std::byte> out;
  put_u16(out, d);
  put_u16(out, m);
  const auto packed = nibbles(q);
  out.insert(out.end(), packed.begin(), packed.end());
  return out;
}

// The expected values, in float64 and rounded once to float32. That is exact, not approximate: an fp16
// scale has 11 significant bits and a quant at most 8, so d * q is exact in float32 and in float64; d * q + m
// is exact in float64 (fp16 values span at most 2^-24 .. 2^16, 40 bits plus 11), so rounding it to float32
// once is what float32's d * q + m computes with its one rounding. Infinities and NaNs follow IEEE in both.
float expected_q8_0(std::uint16_t d, std::int8_t q) { return static_cast<float>(fp16_value(d) * q); }
float expected_q4_0(std::uint16_t d, std::uint8_t q) { return static_cast<float>((q - 8.0) * fp16_value(d)); }
float expected_q4_1(std::uint16_t d, std::uint16_t m, std::uint8_t q) {
  return static_cast<float>(fp16_value(d) * q + fp16_value(m));
}

// Equal bit for bit, except that any NaN matches any NaN.
bool same_value(float a, float b) {
  if (std::isnan(a) || std::isnan(b)) return std::isnan(a) && std::isnan(b);
  return std::bit_cast<std::uint32_t>(a) == std::bit_cast<std::uint32_t>(b);
}

std::vector<float> dequantized(void (*dequantize)(std::span<const std::byte>, std::span<float>),
                               const std::vector<std::byte>& blocks, std::size_t n) {
  std::vector<float> out(n);
  dequantize(blocks, out);
  return out;
}

using af_test::error_of;

std::string gguf_error(std::vector<std::byte> bytes) {
  return error_of([&] { af::gguf::File::from_bytes(std::move(bytes), "bad.gguf"); });
}

constexpr std::uint16_t fp16_half = 0x3800, fp16_two = 0x4000, fp16_minus_three = 0xC200, fp16_inf = 0x7C00,
                        fp16_minus_inf = 0xFC00, fp16_nan = 0x7E00, fp16_smallest_subnormal = 0x0001,
                        fp16_largest_subnormal = 0x03FF, fp16_max = 0x7BFF;

}  // namespace

TEST_CASE("gguf blocks: Q8_0 is d * q for hand-made blocks", "[gguf]") {
  std::array<std::int8_t, 32> q{};
  for (int i = 0; i < 32; ++i) q[i] = static_cast<std::int8_t>(i * 9 - 128);  // -128 .. 151 wraps; covers the ends
  q[31] = 127;
  for (const std::uint16_t d : {fp16_half, fp16_minus_three, fp16_smallest_subnormal, fp16_largest_subnormal, fp16_max,
                                fp16_inf, fp16_minus_inf, fp16_nan, std::uint16_t{0x8000}}) {
    const std::vector<float> values = dequantized(af::gguf::dequantize_q8_0, q8_0_block(d, q), 32);
    for (int i = 0; i < 32; ++i) {
      INFO("d bits " << d << ", element " << i << ", q " << int(q[i]));
      CHECK(same_value(values[i], expected_q8_0(d, q[i])));
    }
  }
  // A few values written out: d = 0.5, q = -128 and 127; an infinite scale times 0 is NaN, not 0.
  q[0] = -128;
  q[1] = 0;
  const auto half = dequantized(af::gguf::dequantize_q8_0, q8_0_block(fp16_half, q), 32);
  CHECK(half[0] == -64.0f);
  CHECK(half[31] == 63.5f);
  const auto infinite = dequantized(af::gguf::dequantize_q8_0, q8_0_block(fp16_inf, q), 32);
  CHECK(std::isnan(infinite[1]));
  CHECK(infinite[31] == INFINITY);
  CHECK(infinite[0] == -INFINITY);
  const auto tiny = dequantized(af::gguf::dequantize_q8_0, q8_0_block(fp16_smallest_subnormal, q), 32);
  CHECK(tiny[31] == std::ldexp(127.0f, -24));
}

TEST_CASE("gguf blocks: Q4_0 is (q - 8) * d with low nibbles first", "[gguf]") {
  std::array<std::uint8_t, 32> q{};
  for (int i = 0; i < 32; ++i) q[i] = static_cast<std::uint8_t>((i * 7 + 3) % 16);
  for (const std::uint16_t d :
       {fp16_two, fp16_minus_three, fp16_smallest_subnormal, fp16_max, fp16_inf, fp16_minus_inf, fp16_nan}) {
    const std::vector<float> values = dequantized(af::gguf::dequantize_q4_0, q4_0_block(d, q), 32);
    for (int i = 0; i < 32; ++i) {
      INFO("d bits " << d << ", element " << i << ", q " << int(q[i]));
      CHECK(same_value(values[i], expected_q4_0(d, q[i])));
    }
  }
  // Byte 0 = 0x F0: element 0 is the low nibble (0 -> -8 d), element 16 the high one (15 -> 7 d).
  std::vector<std::byte> block{std::byte{0x00}, std::byte{0x40}};  // d = 2
  block.push_back(std::byte{0xF0});
  block.resize(18, std::byte{0x88});
  const auto values = dequantized(af::gguf::dequantize_q4_0, block, 32);
  CHECK(values[0] == -16.0f);
  CHECK(values[16] == 14.0f);
  CHECK(values[1] == 0.0f);
  const auto infinite = dequantized(af::gguf::dequantize_q4_0, q4_0_block(fp16_inf, q), 32);
  for (int i = 0; i < 32; ++i) {
    const bool as_expected = q[i] == 8 ? std::isnan(infinite[i]) : infinite[i] == (q[i] > 8 ? INFINITY : -INFINITY);
    CHECK(as_expected);
  }
}

TEST_CASE("gguf blocks: Q4_1 is d * q + m with low nibbles first", "[gguf]") {
  std::array<std::uint8_t, 32> q{};
  for (int i = 0; i < 32; ++i) q[i] = static_cast<std::uint8_t>((i * 5 + 1) % 16);
  q[0] = 0;
  q[31] = 15;
  const std::uint16_t scales[] = {fp16_half, fp16_minus_three, fp16_smallest_subnormal, fp16_largest_subnormal,
                                  fp16_max,  fp16_inf,         fp16_minus_inf,          fp16_nan,
                                  0x1400 /* 2^-10 */};
  for (const std::uint16_t d : scales)
    for (const std::uint16_t m : scales) {
      const std::vector<float> values = dequantized(af::gguf::dequantize_q4_1, q4_1_block(d, m, q), 32);
      for (int i = 0; i < 32; ++i) {
        INFO("d bits " << d << ", m bits " << m << ", element " << i << ", q " << int(q[i]));
        CHECK(same_value(values[i], expected_q4_1(d, m, q[i])));
      }
    }
  // d = 0.5, m = -3: q = 0 -> -3, q = 15 -> 4.5; an infinite d with q = 0 is NaN; d*q + m rounds once.
  const auto values = dequantized(af::gguf::dequantize_q4_1, q4_1_block(fp16_half, fp16_minus_three, q), 32);
  CHECK(values[0] == -3.0f);
  CHECK(values[31] == 4.5f);
  CHECK(std::isnan(dequantized(af::gguf::dequantize_q4_1, q4_1_block(fp16_inf, fp16_half, q), 32)[0]));
  CHECK(dequantized(af::gguf::dequantize_q4_1, q4_1_block(fp16_half, fp16_minus_inf, q), 32)[5] == -INFINITY);
  // 2^-24 * 15 + 65504 rounds to 65504 in float32: the small term is lost, as float32 arithmetic loses it.
  CHECK(dequantized(af::gguf::dequantize_q4_1, q4_1_block(fp16_smallest_subnormal, fp16_max, q), 32)[31] == 65504.0f);
}

TEST_CASE("gguf blocks: random blocks, and row dot products equal dequantize-then-sum bit for bit", "[gguf]") {
  std::mt19937 random(20240611);
  auto bits16 = [&] { return static_cast<std::uint16_t>(random() & 0xFFFF); };
  auto finite_scale = [&] {  // finite fp16 of moderate size, so that the dot products stay finite
    return static_cast<std::uint16_t>((random() & 0x8000) | (0x2C00 + random() % 0x1800));
  };
  constexpr std::size_t blocks = 6, n = blocks * 32;
  std::vector<float> x(n);
  for (float& v : x) v = std::ldexp(static_cast<float>(static_cast<int>(random() % 2001) - 1000), -9);

  for (int trial = 0; trial < 200; ++trial) {
    const bool any_bits = trial % 4 == 0;  // a quarter of the scales are any pattern: inf, NaN, subnormal
    std::vector<std::byte> row8, row40, row41;
    std::vector<float> ref8(n), ref40(n), ref41(n);
    for (std::size_t b = 0; b < blocks; ++b) {
      std::array<std::int8_t, 32> q8{};
      std::array<std::uint8_t, 32> q4{};
      for (auto& v : q8) v = static_cast<std::int8_t>(random() & 0xFF);
      for (auto& v : q4) v = static_cast<std::uint8_t>(random() & 0xF);
      const std::uint16_t d = any_bits ? bits16() : finite_scale(), m = any_bits ? bits16() : finite_scale();
      auto append = [](std::vector<std::byte>& row, const std::vector<std::byte>& block) {
        row.insert(row.end(), block.begin(), block.end());
      };
      append(row8, q8_0_block(d, q8));
      append(row40, q4_0_block(d, q4));
      append(row41, q4_1_block(d, m, q4));
      for (std::size_t i = 0; i < 32; ++i) {
        ref8[b * 32 + i] = expected_q8_0(d, q8[i]);
        ref40[b * 32 + i] = expected_q4_0(d, q4[i]);
        ref41[b * 32 + i] = expected_q4_1(d, m, q4[i]);
      }
    }
    struct Format {
      const char* name;
      void (*dequantize)(std::span<const std::byte>, std::span<float>);
      float (*dot)(std::span<const std::byte>, std::span<const float>);
      const std::vector<std::byte>& row;
      const std::vector<float>& reference;
    };
    for (const Format& f : {Format{"Q8_0", af::gguf::dequantize_q8_0, af::gguf::dot_q8_0_row, row8, ref8},
                            Format{"Q4_0", af::gguf::dequantize_q4_0, af::gguf::dot_q4_0_row, row40, ref40},
                            Format{"Q4_1", af::gguf::dequantize_q4_1, af::gguf::dot_q4_1_row, row41, ref41}}) {
      INFO(f.name << ", trial " << trial);
      const std::vector<float> values = dequantized(f.dequantize, f.row, n);
      std::size_t differing = 0;
      for (std::size_t i = 0; i < n; ++i) differing += !same_value(values[i], f.reference[i]);
      CHECK(differing == 0);
      float sum = 0.0f;  // the contract: float32 products added in element order
      for (std::size_t i = 0; i < n; ++i) sum += f.reference[i] * x[i];
      CHECK(same_value(f.dot(f.row, x), sum));
      if (!any_bits) {  // and, with finite values, close to the float64 dot product
        double exact = 0.0;
        for (std::size_t i = 0; i < n; ++i) exact += static_cast<double>(f.reference[i]) * x[i];
        double magnitude = 0.0;
        for (std::size_t i = 0; i < n; ++i) magnitude += std::abs(static_cast<double>(f.reference[i]) * x[i]);
        CHECK(std::abs(sum - exact) <= 2.0 * n * 0x1p-24 * magnitude);
      }
    }
  }
}

TEST_CASE("gguf blocks: sizes that are not whole blocks throw af::Error", "[gguf]") {
  std::vector<std::byte> block(20);
  std::vector<float> out(32), short_out(31), long_out(64);
  CHECK_NOTHROW(af::gguf::dequantize_q4_1(block, out));
  CHECK_THAT(error_of([&] { af::gguf::dequantize_q4_1(block, short_out); }), Contains("31 elements"));
  CHECK_THAT(error_of([&] { af::gguf::dequantize_q4_1(block, long_out); }), Contains("20 bytes for 64"));
  CHECK_THAT(error_of([&] { af::gguf::dot_q8_0_row(block, out); }), Contains("dot_q8_0_row"));
  CHECK_THAT(error_of([&] { af::gguf::dequantize_q4_0(block, out); }), Contains("18 bytes per 32"));
}

namespace {

// A small file with one entry of every metadata type (nested arrays included) and one tensor of each
// dequantized type, at a non-default alignment.
struct SmallFile {
  std::vector<std::byte> bytes;
  Layout layout;
  std::vector<float> f32_values{1.5f, -2.25f, 0.0f, 3e-38f, -1e30f, 7.0f, 8.0f, 9.0f};
  std::vector<float> f16_values{0.5f, -65504.0f, std::ldexp(1.0f, -24)};
};

std::vector<std::byte> raw(const void* data, std::size_t size) {
  const auto* begin = static_cast<const std::byte*>(data);
  return std::vector<std::byte>(begin, begin + size);
}

GgufWriter small_writer(const SmallFile& file, std::uint64_t alignment = 64) {
  GgufWriter w;
  w.alignment = alignment;
  w.add("general.architecture", text("llama"));
  if (alignment != 32) w.add("general.alignment", scalar<std::uint32_t>(ValueType::uint32, alignment));
  w.add("t.uint8", scalar<std::uint8_t>(ValueType::uint8, 200));
  w.add("t.int8", scalar<std::int8_t>(ValueType::int8, -100));
  w.add("t.uint16", scalar<std::uint16_t>(ValueType::uint16, 60000));
  w.add("t.int16", scalar<std::int16_t>(ValueType::int16, -30000));
  w.add("t.uint32", scalar<std::uint32_t>(ValueType::uint32, 4000000000u));
  w.add("t.int32", scalar<std::int32_t>(ValueType::int32, -2000000000));
  w.add("t.float32", scalar<float>(ValueType::float32, 100000.0f));
  w.add("t.bool", scalar<std::uint8_t>(ValueType::boolean, 1));
  w.add("t.string", text("héllo, world"));
  w.add("t.uint64", scalar<std::uint64_t>(ValueType::uint64, (std::uint64_t{1} << 63) + 5));
  w.add("t.int64", scalar<std::int64_t>(ValueType::int64, -(std::int64_t{1} << 62)));
  w.add("t.float64", scalar<double>(ValueType::float64, 0.1));
  w.add("t.tokens", array(ValueType::string, 3, concatenated({text("a"), text("bc"), text("")})));
  w.add("t.ids",
        array(ValueType::int32, 3,
              concatenated({scalar<std::int32_t>(ValueType::int32, -1), scalar<std::int32_t>(ValueType::int32, 0),
                            scalar<std::int32_t>(ValueType::int32, 7)})));
  w.add("t.scores",
        array(ValueType::float32, 2,
              concatenated({scalar<float>(ValueType::float32, 0.25f), scalar<float>(ValueType::float32, -2)})));
  w.add(
      "t.flags",
      array(ValueType::boolean, 2,
            concatenated({scalar<std::uint8_t>(ValueType::boolean, 1), scalar<std::uint8_t>(ValueType::boolean, 0)})));
  w.add("t.empty", array(ValueType::uint8, 0, {}));
  const EncodedValue inner1 =
      array(ValueType::int16, 2,
            concatenated({scalar<std::int16_t>(ValueType::int16, 1), scalar<std::int16_t>(ValueType::int16, 2)}));
  const EncodedValue inner2 = array(ValueType::int16, 1, concatenated({scalar<std::int16_t>(ValueType::int16, 3)}));
  w.add("t.nested", array(ValueType::array, 2, concatenated({inner1, inner2})));

  w.add_tensor("f32", {4, 2}, GgmlType::f32, raw(file.f32_values.data(), 32));
  std::vector<std::byte> f16;
  for (const float v : file.f16_values) put_u16(f16, af::fp16_bits(v));
  w.add_tensor("f16", {3}, GgmlType::f16, f16);
  std::array<std::int8_t, 32> q8{};
  for (int i = 0; i < 32; ++i) q8[i] = static_cast<std::int8_t>(i - 16);
  std::vector<std::byte> q8_data = q8_0_block(fp16_half, q8), second = q8_0_block(fp16_minus_three, q8);
  q8_data.insert(q8_data.end(), second.begin(), second.end());
  w.add_tensor("q8_0", {32, 2}, GgmlType::q8_0, q8_data);
  std::array<std::uint8_t, 32> q4{};
  for (int i = 0; i < 32; ++i) q4[i] = static_cast<std::uint8_t>(i % 16);
  w.add_tensor("q4_0", {32}, GgmlType::q4_0, q4_0_block(fp16_two, q4));
  w.add_tensor("q4_1", {32, 1, 1}, GgmlType::q4_1, q4_1_block(fp16_half, fp16_minus_three, q4));
  return w;
}

SmallFile small_file(std::uint64_t alignment = 64) {
  SmallFile file;
  file.bytes = small_writer(file, alignment).bytes(&file.layout);
  return file;
}

}  // namespace

TEST_CASE("gguf: a file with every metadata type and five tensor types reads back", "[gguf]") {
  for (const std::uint64_t alignment : {std::uint64_t{64}, std::uint64_t{32}}) {
    INFO("alignment " << alignment);
    const SmallFile small = small_file(alignment);
    const af::gguf::File file = af::gguf::File::from_bytes(small.bytes, "small.gguf");
    CHECK(file.version() == 3);
    CHECK(file.alignment() == alignment);
    CHECK(file.data_offset() == small.layout.data_start);
    CHECK(file.data_offset() % alignment == 0);
    CHECK(file.string("general.architecture") == "llama");
    CHECK(file.unsigned_integer("t.uint8") == 200);
    CHECK(file.number("t.int8") == -100);
    CHECK(file.unsigned_integer("t.uint16") == 60000);
    CHECK(file.number("t.int16") == -30000);
    CHECK(file.unsigned_integer("t.uint32") == 4000000000u);
    CHECK(file.number("t.int32") == -2000000000);
    CHECK(file.number("t.float32") == 100000.0);
    CHECK(std::get<bool>(file.find("t.bool")->data));
    CHECK(file.string("t.string") == "héllo, world");
    CHECK(file.unsigned_integer("t.uint64") == (std::uint64_t{1} << 63) + 5);
    CHECK(file.number("t.int64") == -std::ldexp(1.0, 62));
    CHECK(file.number("t.float64") == 0.1);
    const auto tokens = file.strings("t.tokens");
    REQUIRE(tokens.size() == 3);
    CHECK(tokens[1] == "bc");
    CHECK(tokens[2].empty());
    CHECK(file.integers("t.ids") == std::vector<std::int64_t>{-1, 0, 7});
    CHECK(file.numbers("t.scores") == std::vector<double>{0.25, -2.0});
    CHECK(file.integers("t.flags") == std::vector<std::int64_t>{1, 0});
    CHECK(file.find("t.flags")->element_type == ValueType::boolean);
    CHECK(file.integers("t.empty").empty());
    const af::gguf::Value* nested = file.find("t.nested");
    REQUIRE(nested != nullptr);
    CHECK(nested->element_type == ValueType::array);
    const auto& inner = std::get<std::vector<af::gguf::Value>>(nested->data);
    REQUIRE(inner.size() == 2);
    CHECK(std::get<std::vector<std::int64_t>>(inner[0].data) == std::vector<std::int64_t>{1, 2});
    CHECK(inner[1].size() == 1);
    CHECK(file.find("missing") == nullptr);

    // Asking for the wrong type or a missing key names the key and what was asked.
    CHECK_THAT(error_of([&] { file.string("t.uint8"); }), Contains("\"t.uint8\" is uint8 (expected a string)"));
    CHECK_THAT(error_of([&] { file.unsigned_integer("t.int8"); }), Contains("-100"));
    CHECK_THAT(error_of([&] { file.unsigned_integer("t.bool"); }), Contains("is bool"));
    CHECK_THAT(error_of([&] { file.strings("t.ids"); }), Contains("array of int32"));
    CHECK_THAT(error_of([&] { file.integers("t.uint64"); }), Contains("uint64"));
    CHECK_THAT(error_of([&] { file.number("nothing.here"); }), Contains("no metadata key \"nothing.here\""));
    CHECK_THAT(error_of([&] { file.tensor("nope"); }), Contains("no tensor \"nope\""));

    REQUIRE(file.tensors().size() == 5);
    CHECK(file.tensors()[0].name == "f32");
    const af::gguf::TensorInfo& f32 = file.tensor("f32");
    CHECK(f32.dims == std::vector<std::uint64_t>{4, 2});
    CHECK(f32.rows() == 2);
    CHECK(file.dequantize(f32) == small.f32_values);
    std::vector<float> f16_expected;
    for (const float v : small.f16_values) f16_expected.push_back(af::round_to_fp16(v));
    CHECK(file.dequantize(file.tensor("f16")) == f16_expected);
    const auto q8 = file.dequantize(file.tensor("q8_0"));
    REQUIRE(q8.size() == 64);
    CHECK(q8[0] == -8.0f);
    CHECK(q8[63] == 15 * -3.0f);
    const auto q40 = file.dequantize(file.tensor("q4_0"));
    CHECK(q40[0] == -16.0f);
    CHECK(q40[31] == 14.0f);
    const af::gguf::TensorInfo& q41 = file.tensor("q4_1");
    CHECK(q41.type == GgmlType::q4_1);
    CHECK(q41.bytes == 20);
    CHECK(file.data(q41).size() == 20);
    const auto q41_values = file.dequantize(q41);
    CHECK(q41_values[1] == -2.5f);
    CHECK(q41_values[31] == 4.5f);
    // The same row through the dot product: x = 1 everywhere sums the row.
    std::vector<float> ones(32, 1.0f);
    float sum = 0.0f;
    for (const float v : q41_values) sum += v;
    CHECK(af::gguf::dot_q4_1_row(file.data(q41), ones) == sum);
  }
}

TEST_CASE("gguf: version 2 reads; the file can be opened from disk", "[gguf]") {
  SmallFile small;
  GgufWriter w = small_writer(small);
  w.version = 2;
  CHECK(af::gguf::File::from_bytes(w.bytes()).version() == 2);
  const auto path = std::filesystem::temp_directory_path() / "af_test_gguf_small.gguf";
  {
    const auto bytes = small_file().bytes;
    std::ofstream out(path, std::ios::binary);
    out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  }
  CHECK(af::gguf::File::open(path).tensors().size() == 5);
  CHECK_THAT(error_of([&] { af::gguf::File::open(path.parent_path()); }), Contains("expected a regular file"));
  CHECK_THAT(error_of([&] { af::gguf::File::open(path.string() + ".missing"); }), Contains("does not exist"));
  std::filesystem::remove(path);
}

TEST_CASE("gguf: every truncation of a valid file throws af::Error", "[gguf]") {
  const SmallFile small = small_file();
  for (std::size_t size = 0; size < small.bytes.size(); ++size) {
    INFO("truncated to " << size << " of " << small.bytes.size() << " bytes");
    const std::string message =
        gguf_error(std::vector<std::byte>(small.bytes.begin(), small.bytes.begin() + static_cast<long>(size)));
    CHECK_THAT(message, Contains("bad.gguf"));
  }
}

TEST_CASE("gguf: lying headers, counts, types, lengths and offsets throw af::Error naming the value", "[gguf]") {
  const SmallFile small = small_file();
  const Layout& at = small.layout;
  auto lie = [&](std::size_t offset, auto value) {
    std::vector<std::byte> bytes = small.bytes;
    patch(bytes, offset, value);
    return gguf_error(std::move(bytes));
  };
  CHECK_THAT(lie(0, std::uint32_t{0x4655474C}), Contains("the magic is \"LGUF\" (expected \"GGUF\")"));
  CHECK_THAT(lie(0, std::uint32_t{0x00000000}), Contains("\\x00\\x00\\x00\\x00") && Contains("expected \"GGUF\""));
  CHECK_THAT(lie(4, std::uint32_t{1}), Contains("version 1 is not supported") && Contains("obsolete"));
  CHECK_THAT(lie(4, std::uint32_t{4}), Contains("version 4 is not supported (expected 2 or 3"));
  CHECK_THAT(lie(4, std::uint32_t{0x03000000}), Contains("big-endian"));
  CHECK_THAT(lie(8, std::uint64_t{1} << 60), Contains("1152921504606846976 tensors"));
  CHECK_THAT(lie(8, std::uint64_t{6}), Contains("bad.gguf"));
  CHECK_THAT(lie(16, ~std::uint64_t{0}), Contains("metadata entries"));
  CHECK_THAT(lie(16, std::uint64_t{30}), Contains("bad.gguf"));
  CHECK_THAT(lie(at.key_length_at[0], std::uint64_t{1} << 40), Contains("1099511627776 bytes"));
  CHECK_THAT(lie(at.key_length_at[3], std::uint64_t{1000}), Contains("bad.gguf"));
  CHECK_THAT(lie(at.value_type_at[2], std::uint32_t{13}), Contains("value type 13"));
  CHECK_THAT(lie(at.value_type_at[2], std::uint32_t{0xFFFFFFFF}), Contains("value type 4294967295"));
  // Entry 9 is t.bool, 10 t.string, 14 t.tokens (an array of strings), 16 t.scores, 19 t.nested.
  CHECK_THAT(lie(at.value_payload_at[9], std::uint8_t{2}), Contains("bool of value 2"));
  CHECK_THAT(lie(at.value_payload_at[10], std::uint64_t{1} << 62), Contains("\"t.string\" declares"));
  CHECK_THAT(lie(at.value_payload_at[14], std::uint32_t{13}), Contains("value type 13"));
  CHECK_THAT(lie(at.value_payload_at[14] + 4, std::uint64_t{1} << 50), Contains("elements of string"));
  CHECK_THAT(lie(at.value_payload_at[16] + 4, ~std::uint64_t{0}), Contains("elements of float32"));
  CHECK_THAT(lie(at.value_payload_at[19] + 4, std::uint64_t{1} << 40), Contains("elements of array"));
  CHECK_THAT(lie(at.value_payload_at[1], std::uint32_t{48}), Contains("general.alignment is uint32 48"));
  CHECK_THAT(lie(at.value_payload_at[1], std::uint32_t{0}), Contains("general.alignment is uint32 0"));
  CHECK_THAT(lie(at.value_payload_at[1], std::uint32_t{4096}), Contains("bad.gguf"));  // infos end before data
  CHECK_THAT(lie(at.tensor_name_at[1], std::uint64_t{1} << 33), Contains("the name of tensor 1"));
  CHECK_THAT(lie(at.tensor_n_dims_at[0], std::uint32_t{5}), Contains("5 dimensions (expected at most 4)"));
  CHECK_THAT(lie(at.tensor_type_at[0], std::uint32_t{4}), Contains("ggml type 4"));
  CHECK_THAT(lie(at.tensor_type_at[0], std::uint32_t{99}), Contains("ggml type 99"));
  CHECK_THAT(lie(at.tensor_type_at[0], std::uint32_t{2}), Contains("rows of 4 elements (expected a multiple of 32"));
  CHECK_THAT(lie(at.tensor_type_at[4], std::uint32_t{0}), Contains("ends past"));  // F32 needs 128 bytes, not 20
  CHECK_THAT(lie(at.tensor_offset_at[0], std::uint64_t{1}),
             Contains("offset 1 (expected a multiple of the alignment 64"));
  CHECK_THAT(lie(at.tensor_offset_at[4], std::uint64_t{1} << 40), Contains("ends past"));
  CHECK_THAT(lie(at.tensor_offset_at[4], ~std::uint64_t{63}), Contains("ends past"));  // offset + bytes wraps
  CHECK_THAT(lie(at.tensor_offset_at[2], std::uint64_t{0}), Contains("overlap"));
  // dims [4, 2^32] of F32 need 64 GiB
  CHECK_THAT(lie(at.tensor_n_dims_at[0] + 12, std::uint64_t{1} << 32), Contains("ends past"));
}

TEST_CASE("gguf: duplicates, deep nesting, absurd dims and bad alignment values throw af::Error", "[gguf]") {
  SmallFile small;
  {
    GgufWriter w = small_writer(small);
    w.add("t.uint8", scalar<std::uint8_t>(ValueType::uint8, 1));
    CHECK_THAT(gguf_error(w.bytes()), Contains("metadata key \"t.uint8\" appears twice"));
  }
  {
    GgufWriter w = small_writer(small);
    w.add_tensor("f16", {32}, GgmlType::f32, std::vector<std::byte>(128));
    CHECK_THAT(gguf_error(w.bytes()), Contains("tensor name \"f16\" appears twice"));
  }
  {
    GgufWriter w = small_writer(small);
    w.add_tensor("huge", {1u << 21, 1u << 20, 1u << 20}, GgmlType::f32, {});
    CHECK_THAT(gguf_error(w.bytes()), Contains("dims [2097152, 1048576, 1048576]"));
  }
  {
    GgufWriter w = small_writer(small);
    w.add_tensor("wrapping", {std::uint64_t{1} << 40, std::uint64_t{1} << 40}, GgmlType::f32, {});
    CHECK_THAT(gguf_error(w.bytes()), Contains("expected at most 1152921504606846976 elements"));
  }
  {
    GgufWriter w = small_writer(small);
    w.add_tensor("q8_rows", {48, 2}, GgmlType::q8_0, std::vector<std::byte>(102));
    CHECK_THAT(gguf_error(w.bytes()),
               Contains("rows of 48 elements (expected a multiple of 32, the block size of Q8_0)"));
  }
  {
    GgufWriter w;
    w.add("general.alignment", text("32"));
    CHECK_THAT(gguf_error(w.bytes()), Contains("general.alignment is string"));
  }
  {
    GgufWriter w;
    w.add("general.alignment", scalar<std::int32_t>(ValueType::int32, 32));
    CHECK_THAT(gguf_error(w.bytes()), Contains("general.alignment is int32"));
  }
  for (const int depth : {8, 9, 100}) {
    EncodedValue value = array(ValueType::uint8, 1, {std::byte{7}});
    for (int level = 1; level < depth; ++level) value = array(ValueType::array, 1, value.payload);
    GgufWriter w;
    w.add("deep", value);
    if (depth <= af::gguf::max_array_depth)
      CHECK(af::gguf::File::from_bytes(w.bytes()).find("deep")->size() == 1);
    else
      CHECK_THAT(gguf_error(w.bytes()), Contains("nests arrays more than 8 deep"));
  }
  {  // a file of only a header and metadata, without tensors, is valid
    GgufWriter w;
    w.add("general.name", text("empty"));
    CHECK(af::gguf::File::from_bytes(w.bytes()).tensors().empty());
  }
  {  // empty tensors, one of them at the end of the file
    GgufWriter w;
    w.add_tensor("empty", {0, 3}, GgmlType::f32, {});
    w.add_tensor("also_empty", {32, 0}, GgmlType::q4_1, {});
    const af::gguf::File file = af::gguf::File::from_bytes(w.bytes());
    CHECK(file.dequantize(file.tensor("empty")).empty());
    CHECK(file.dequantize(file.tensor("also_empty")).empty());
    CHECK(file.tensor("also_empty").rows() == 0);
  }
  {  // unknown-to-dequantize types are read but not dequantized
    GgufWriter w;
    w.add_tensor("k", {256}, GgmlType::q6_k, std::vector<std::byte>(210));
    const af::gguf::File file = af::gguf::File::from_bytes(w.bytes());
    CHECK(file.tensor("k").bytes == 210);
    CHECK_THAT(error_of([&] { file.dequantize(file.tensor("k")); }), Contains("\"k\" is Q6_K"));
  }
}

// Writes the fuzz corpus (tests/fuzz/corpus/gguf) into $AF_GGUF_CORPUS_DIR: run `test_lib "[write_gguf_corpus]"`.
TEST_CASE("gguf: write the fuzz corpus", "[.write_gguf_corpus]") {
  const char* dir = std::getenv("AF_GGUF_CORPUS_DIR");
  REQUIRE(dir != nullptr);
  auto write = [&](const std::string& name, const std::vector<std::byte>& bytes) {
    std::ofstream out(std::filesystem::path(dir) / name, std::ios::binary);
    out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  };
  const SmallFile small = small_file();
  write("valid_every_type", small.bytes);
  write("valid_align32", small_file(32).bytes);
  GgufWriter header_only;
  header_only.add("general.name", text("x"));
  write("valid_metadata_only", header_only.bytes());
  GgufWriter one;
  std::array<std::uint8_t, 32> q{};
  one.add_tensor("w", {32}, GgmlType::q4_1, q4_1_block(fp16_inf, fp16_half, q));
  write("valid_q4_1_inf", one.bytes());
  auto lied = [&](std::size_t offset, auto value) {
    std::vector<std::byte> bytes = small.bytes;
    patch(bytes, offset, value);
    return bytes;
  };
  write("truncated_half", std::vector<std::byte>(small.bytes.begin(), small.bytes.begin() + small.bytes.size() / 2));
  write("version_1", lied(4, std::uint32_t{1}));
  write("tensor_count_huge", lied(8, std::uint64_t{1} << 60));
  write("array_count_huge", lied(small.layout.value_payload_at[14] + 4, std::uint64_t{1} << 50));
  write("value_type_13", lied(small.layout.value_type_at[2], std::uint32_t{13}));
  write("tensor_type_99", lied(small.layout.tensor_type_at[0], std::uint32_t{99}));
  write("offset_unaligned", lied(small.layout.tensor_offset_at[0], std::uint64_t{1}));
  write("offset_overlap", lied(small.layout.tensor_offset_at[2], std::uint64_t{0}));
}

// The book's model, fetched by scripts/fetch_model.sh. Hidden from the discovered tests: CTest runs it as
// gguf_model_file, which is skipped when the file is not there (tests/CMakeLists.txt).
TEST_CASE("gguf: the SmolLM2-135M-Instruct Q4_1 model file", "[.model]") {
  const std::filesystem::path path = AF_MODEL_GGUF;
  REQUIRE(std::filesystem::exists(path));
  const af::gguf::File file = af::gguf::File::open(path);
  CHECK(file.version() == 3);
  CHECK(file.tensors().size() == 272);
  CHECK(file.string("general.architecture") == "llama");
  CHECK(file.unsigned_integer("llama.block_count") == 30);
  CHECK(file.unsigned_integer("llama.embedding_length") == 576);
  CHECK(file.unsigned_integer("llama.feed_forward_length") == 1536);
  CHECK(file.unsigned_integer("llama.attention.head_count") == 9);
  CHECK(file.unsigned_integer("llama.attention.head_count_kv") == 3);
  CHECK(file.number("llama.rope.freq_base") == 100000.0);
  CHECK(file.strings("tokenizer.ggml.tokens").size() == 49152);
  CHECK_FALSE(file.string("tokenizer.chat_template").empty());
  const af::gguf::TensorInfo& embedding = file.tensor("token_embd.weight");
  CHECK(embedding.type == GgmlType::q8_0);
  CHECK(embedding.dims == std::vector<std::uint64_t>{576, 49152});
  CHECK(file.tensor("blk.0.attn_q.weight").type == GgmlType::q4_1);
  CHECK(file.tensor("blk.0.attn_norm.weight").type == GgmlType::f32);
  CHECK(file.tensor("output_norm.weight").type == GgmlType::f32);

  // Against PyPI's gguf package (scripts/record_gguf_checks.py). Dequantization is exact float32
  // arithmetic in both readers (one product and at most one sum per element, no contraction), so the first
  // 64 values must agree bit for bit. The float64 sums differ only in summation order (numpy adds pairwise,
  // here left to right): at most n * 2^-53 * sum|x| apart, far below the 1e-9 relative tolerance used.
  std::ifstream in(std::filesystem::path(AF_TEST_DATA_DIR) / "gguf_smollm2_checks.json");
  REQUIRE(in.good());
  const nlohmann::json checks = nlohmann::json::parse(in);
  REQUIRE(checks.at("tensors").size() >= 6);
  for (const nlohmann::json& check : checks.at("tensors")) {
    const std::string name = check.at("name");
    INFO("tensor " << name);
    const af::gguf::TensorInfo& tensor = file.tensor(name);
    CHECK(af::gguf::name_of(tensor.type) == check.at("type").get<std::string>());
    CHECK(tensor.dims == check.at("dims").get<std::vector<std::uint64_t>>());
    const std::vector<float> values = file.dequantize(tensor);
    const std::size_t count = check.at("count");
    REQUIRE(count <= values.size());
    const auto first = check.at("first").get<std::vector<double>>();
    for (std::size_t i = 0; i < first.size(); ++i) {
      INFO("element " << i);
      CHECK(same_value(values[i], static_cast<float>(first[i])));
    }
    double sum = 0.0, sum_of_squares = 0.0;
    for (std::size_t i = 0; i < count; ++i) {
      sum += values[i];
      sum_of_squares += static_cast<double>(values[i]) * values[i];
    }
    const double expected_sum = check.at("sum"), expected_squares = check.at("sum_of_squares");
    CHECK(std::abs(sum - expected_sum) <= 1e-9 * std::sqrt(expected_squares * static_cast<double>(count)));
    CHECK(std::abs(sum_of_squares - expected_squares) <= 1e-9 * expected_squares);

    // A row's dot product with a vector equals dequantizing that row and summing the products in order.
    const std::size_t row = tensor.row_length();
    if (tensor.type == GgmlType::q4_1) {
      std::vector<float> x(row);
      for (std::size_t i = 0; i < row; ++i) x[i] = static_cast<float>(std::sin(0.1 * static_cast<double>(i)));
      const std::size_t row_bytes = row / 32 * af::gguf::q4_1_block_bytes;
      float expected = 0.0f;
      for (std::size_t i = 0; i < row; ++i) expected += values[row + i] * x[i];
      CHECK(same_value(af::gguf::dot_q4_1_row(file.data(tensor).subspan(row_bytes, row_bytes), x), expected));
    }
  }
}
