// Matrix products over weights kept in their GGUF blocks (af::gguf::QuantMatrix, matvec, matmul) against a
// float64 product of the same weights dequantized by the reader, and the model loader's refusals.
#include "af/compare.hpp"
#include "af/error.hpp"
#include "af/gguf.hpp"
#include "af/llama.hpp"
#include "af/numeric.hpp"
#include "af/quant_matmul.hpp"
#include "af/random.hpp"
#include "error_of.hpp"
#include "gguf_writer.hpp"

#include <catch2/catch.hpp>

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

using af_test::error_of;
using af::gguf::GgmlType;
using af_test::GgufWriter;

namespace {

constexpr std::uint64_t cols = 96, rows = 37;  // three blocks of 32 per row

// Random bytes for a row-major [rows, cols] tensor of `type`, whose fp16 scales (and minima) are ordinary
// numbers between -2 and 2 so that the products stay finite.
std::vector<std::byte> random_tensor(GgmlType type, af::Rng& rng) {
  const af::gguf::BlockLayout layout = af::gguf::layout_of(type);
  const std::uint64_t blocks = rows * cols / layout.block_elements;
  std::vector<std::byte> bytes(blocks * layout.block_bytes);
  for (std::byte& b : bytes) b = static_cast<std::byte>(rng.below(256));
  const auto put_fp16 = [&](std::size_t at, float value) {
    const std::uint16_t bits = af::fp16_bits(value);
    bytes[at] = static_cast<std::byte>(bits & 0xFF);
    bytes[at + 1] = static_cast<std::byte>(bits >> 8);
  };
  for (std::uint64_t b = 0; b < blocks; ++b) {
    const std::size_t at = b * layout.block_bytes;
    switch (type) {
      case GgmlType::q4_1:
        put_fp16(at + 2, static_cast<float>(rng.uniform(-2.0, 2.0)));  // the minimum, then the scale below
        [[fallthrough]];
      case GgmlType::q4_0:
      case GgmlType::q8_0:
        put_fp16(at, static_cast<float>(rng.uniform(-0.2, 0.2)));
        break;
      case GgmlType::f16:
        put_fp16(at, static_cast<float>(rng.uniform(-2.0, 2.0)));
        break;
      default: {
        const float value = static_cast<float>(rng.uniform(-2.0, 2.0));
        std::memcpy(bytes.data() + at, &value, sizeof value);
      }
    }
  }
  return bytes;
}

const std::vector<std::pair<std::string, GgmlType>> kinds = {{"q4_1", GgmlType::q4_1},
                                                             {"q4_0", GgmlType::q4_0},
                                                             {"q8_0", GgmlType::q8_0},
                                                             {"f16", GgmlType::f16},
                                                             {"f32", GgmlType::f32}};

af::gguf::File matrices_file() {
  af::Rng rng(31);
  GgufWriter w;
  for (const auto& [name, type] : kinds) w.add_tensor(name, {cols, rows}, type, random_tensor(type, rng));
  w.add_tensor("vector", {cols}, GgmlType::f32, random_tensor(GgmlType::f32, rng));
  return af::gguf::File::from_bytes(w.bytes(), "matrices.gguf");
}

}  // namespace

TEST_CASE("matvec and matmul over quantized blocks equal a float64 product of the dequantized weights",
          "[quant_matmul]") {
  const af::gguf::File file = matrices_file();
  af::Rng rng(32);
  for (const auto& [name, type] : kinds) {
    const af::gguf::TensorInfo& info = file.tensor(name);
    const af::gguf::QuantMatrix w(file, info);
    REQUIRE(w.rows() == static_cast<std::int64_t>(rows));
    REQUIRE(w.cols() == static_cast<std::int64_t>(cols));
    const std::vector<float> weights = file.dequantize(info);  // the reader's values, row by row
    // dequantize_rows gives the reader's values exactly.
    std::vector<float> some(3 * cols);
    w.dequantize_rows(5, 3, some);
    for (std::size_t i = 0; i < some.size(); ++i) REQUIRE(some[i] == weights[5 * cols + i]);
    // T = 1 and 3 take the matrix-vector path, T = 6 the dequantized panels and sgemm.
    for (const std::int64_t T : {1, 3, 6}) {
      const af::Tensor x = af::random_normal(af::Shape{T, static_cast<std::int64_t>(cols)}, rng);
      af::Tensor y(af::Shape{T, static_cast<std::int64_t>(rows)});
      std::ranges::fill(y.values(), std::nanf(""));
      af::gguf::matmul(w, x.matrix(), y.matrix());
      for (std::int64_t t = 0; t < T; ++t)
        for (std::uint64_t r = 0; r < rows; ++r) {
          double exact = 0.0, magnitude = 0.0;
          for (std::uint64_t c = 0; c < cols; ++c) {
            const double product =
                static_cast<double>(weights[r * cols + c]) * x.matrix()(t, static_cast<std::int64_t>(c));
            exact += product;
            magnitude += std::abs(product);
          }
          // A float32 sum of 96 products in any order: within 96 roundings of 2^-24 of the sum of magnitudes.
          const double error = std::abs(y.matrix()(t, static_cast<std::int64_t>(r)) - exact);
          INFO(name << ", T = " << T << ", row " << r << ": " << y.matrix()(t, static_cast<std::int64_t>(r))
                    << " against " << exact);
          REQUIRE(af::within_tolerance(error, 96 * 6e-8 * magnitude + 1e-30));
        }
    }
  }
}

TEST_CASE("QuantMatrix and matvec refuse what they cannot multiply, naming it", "[quant_matmul]") {
  const af::gguf::File file = matrices_file();
  CHECK_THAT(error_of([&] { af::gguf::QuantMatrix(file, file.tensor("vector")); }),
             Catch::Contains("vector") && Catch::Contains("1 dimensions"));
  const af::gguf::QuantMatrix w(file, file.tensor("q4_1"));
  std::vector<float> x(cols - 1), y(rows);
  CHECK_THAT(error_of([&] { af::gguf::matvec(w, x, y); }), Catch::Contains("x has 95 values"));
  std::vector<float> out(cols);
  CHECK_THAT(error_of([&] { w.dequantize_rows(rows - 1, 2, out); }), Catch::Contains("dequantize_rows"));

  GgufWriter bf16;
  bf16.add_tensor("w", {32, 2}, GgmlType::bf16, std::vector<std::byte>(128));
  const af::gguf::File bf16_file = af::gguf::File::from_bytes(bf16.bytes(), "bf16.gguf");
  CHECK_THAT(error_of([&] { af::gguf::QuantMatrix(bf16_file, bf16_file.tensor("w")); }),
             Catch::Contains("BF16") && Catch::Contains("expected F32, F16, Q8_0, Q4_0 or Q4_1"));
}

TEST_CASE("the model loader names what makes a file not a Llama it can run", "[quant_matmul]") {
  GgufWriter w;
  w.add("general.architecture", af_test::text("gpt2"));
  CHECK_THAT(error_of([&] { af::llama::Model(af::gguf::File::from_bytes(w.bytes(), "gpt2.gguf")); }),
             Catch::Contains("general.architecture is 'gpt2'") && Catch::Contains("expected 'llama'"));
  GgufWriter missing;
  missing.add("general.architecture", af_test::text("llama"));
  CHECK_THAT(error_of([&] { af::llama::Model(af::gguf::File::from_bytes(missing.bytes(), "empty.gguf")); }),
             Catch::Contains("llama.block_count"));
}
