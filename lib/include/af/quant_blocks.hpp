#pragma once
/// @file quant_blocks.hpp
/// ggml's element types, as a GGUF file names them, and the block formats that the book's model uses.
/// A quantized row is a run of blocks of 32 elements each:
///   - Q8_0 (34 bytes): an fp16 scale d, then 32 int8 q; element i is d * q[i].
///   - Q4_0 (18 bytes): an fp16 scale d, then 16 bytes of 4-bit q; element i is (q[i] - 8) * d.
///   - Q4_1 (20 bytes): an fp16 scale d, an fp16 minimum m, then 16 bytes of 4-bit q; element i is d * q[i] + m.
/// In both 4-bit formats byte j holds element j in its low nibble and element j + 16 in its high nibble.
/// Every value is computed in float32 exactly as written (one rounding per operation, no contraction), so a
/// scale that is infinite or NaN gives infinities and NaNs, never a hidden finite value.

#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>

namespace af::gguf {

/// ggml's element types by their numbers in a GGUF file (numbers 4 and 5 were retired upstream).
enum class GgmlType : std::uint32_t {
  f32 = 0,
  f16 = 1,
  q4_0 = 2,
  q4_1 = 3,
  q5_0 = 6,
  q5_1 = 7,
  q8_0 = 8,
  q8_1 = 9,
  q2_k = 10,
  q3_k = 11,
  q4_k = 12,
  q5_k = 13,
  q6_k = 14,
  q8_k = 15,
  i8 = 24,
  i16 = 25,
  i32 = 26,
  i64 = 27,
  f64 = 28,
  bf16 = 30,
};

/// How a type lays out its elements: `block_elements` consecutive elements take `block_bytes` bytes.
struct BlockLayout {
  std::uint64_t block_elements = 0;
  std::uint64_t block_bytes = 0;
};

/// Whether `number` is one of the GgmlType values above (the types whose layout this library knows).
bool is_known_type(std::uint32_t number);
/// The layout of a known type. Throws af::Error naming the number for an unknown one.
BlockLayout layout_of(GgmlType type);
/// The type's name as ggml writes it: "F32", "Q4_1", "Q8_0", ...; "?" for an unknown number.
std::string_view name_of(GgmlType type);

/// Elements per block of Q8_0, Q4_0 and Q4_1.
inline constexpr std::size_t quant_block_elements = 32;
inline constexpr std::size_t q8_0_block_bytes = 34;  ///< fp16 d, 32 x int8
inline constexpr std::size_t q4_0_block_bytes = 18;  ///< fp16 d, 16 bytes of nibbles
inline constexpr std::size_t q4_1_block_bytes = 20;  ///< fp16 d, fp16 m, 16 bytes of nibbles

/// Dequantizes whole blocks into `out`. `out.size()` must be a multiple of 32 and `blocks` must hold exactly
/// out.size() / 32 blocks; otherwise af::Error names both sizes.
void dequantize_q8_0(std::span<const std::byte> blocks, std::span<float> out);
void dequantize_q4_0(std::span<const std::byte> blocks, std::span<float> out);
void dequantize_q4_1(std::span<const std::byte> blocks, std::span<float> out);

/// Converts `stored`, elements of `type` one after another, into `out` as float32: F32 is copied, F16 and
/// BF16 are widened exactly, Q8_0/Q4_0/Q4_1 go through the functions above. `stored` must hold exactly the
/// bytes of out.size() elements; any other type throws af::Error naming it.
void dequantize(GgmlType type, std::span<const std::byte> stored, std::span<float> out);

/// The dot product of one quantized row with `x`: the float32 sum, taken in element order starting from 0,
/// of the float32 products dequant(w[i]) * x[i]. It equals, bit for bit, dequantizing the row and summing
/// the products in that order. The sizes are checked as for the dequantize functions.
float dot_q8_0_row(std::span<const std::byte> row, std::span<const float> x);
float dot_q4_0_row(std::span<const std::byte> row, std::span<const float> x);
float dot_q4_1_row(std::span<const std::byte> row, std::span<const float> x);

}  // namespace af::gguf
