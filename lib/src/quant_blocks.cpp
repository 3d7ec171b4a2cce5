#include "af/quant_blocks.hpp"

#include "af/error.hpp"
#include "af/numeric.hpp"

#include <array>
#include <cstring>

namespace af::gguf {

namespace {

struct TypeEntry {
  GgmlType type;
  std::string_view name;
  BlockLayout layout;
};

// Block sizes as ggml defines them: the 32-element formats hold fp16 scales and packed quants; the K formats
// pack 256 elements with sub-block scales.
constexpr std::array<TypeEntry, 20> type_table{{
    {GgmlType::f32, "F32", {1, 4}},       {GgmlType::f16, "F16", {1, 2}},       {GgmlType::q4_0, "Q4_0", {32, 18}},
    {GgmlType::q4_1, "Q4_1", {32, 20}},   {GgmlType::q5_0, "Q5_0", {32, 22}},   {GgmlType::q5_1, "Q5_1", {32, 24}},
    {GgmlType::q8_0, "Q8_0", {32, 34}},   {GgmlType::q8_1, "Q8_1", {32, 36}},   {GgmlType::q2_k, "Q2_K", {256, 84}},
    {GgmlType::q3_k, "Q3_K", {256, 110}}, {GgmlType::q4_k, "Q4_K", {256, 144}}, {GgmlType::q5_k, "Q5_K", {256, 176}},
    {GgmlType::q6_k, "Q6_K", {256, 210}}, {GgmlType::q8_k, "Q8_K", {256, 292}}, {GgmlType::i8, "I8", {1, 1}},
    {GgmlType::i16, "I16", {1, 2}},       {GgmlType::i32, "I32", {1, 4}},       {GgmlType::i64, "I64", {1, 8}},
    {GgmlType::f64, "F64", {1, 8}},       {GgmlType::bf16, "BF16", {1, 2}},
}};

const TypeEntry* entry_of(std::uint32_t number) {
  for (const TypeEntry& entry : type_table)
    if (static_cast<std::uint32_t>(entry.type) == number) return &entry;
  return nullptr;
}

std::uint16_t load_u16(const std::byte* at) {
  return static_cast<std::uint16_t>(std::to_integer<unsigned>(at[0]) | (std::to_integer<unsigned>(at[1]) << 8));
}

// The sizes every block function expects: a whole number of blocks on both sides.
void check_sizes(const char* function, std::size_t block_bytes, std::size_t bytes, std::size_t elements) {
  if (!(elements % quant_block_elements == 0 && bytes == elements / quant_block_elements * block_bytes))
    fail("{}: {} bytes for {} elements (expected a multiple of {} elements and {} bytes per {} of them)", function,
         bytes, elements, quant_block_elements, block_bytes, quant_block_elements);
}

// One block's 32 values, the single definition both dequantize and dot use.
void q8_0_block(const std::byte* block, float* values) {
  const float d = fp16_to_float(load_u16(block));
  for (std::size_t i = 0; i < 32; ++i) values[i] = d * static_cast<float>(static_cast<std::int8_t>(block[2 + i]));
}

void q4_0_block(const std::byte* block, float* values) {
  const float d = fp16_to_float(load_u16(block));
  for (std::size_t j = 0; j < 16; ++j) {
    const unsigned packed = std::to_integer<unsigned>(block[2 + j]);
    values[j] = static_cast<float>(static_cast<int>(packed & 0xFu) - 8) * d;
    values[j + 16] = static_cast<float>(static_cast<int>(packed >> 4) - 8) * d;
  }
}

void q4_1_block(const std::byte* block, float* values) {
  const float d = fp16_to_float(load_u16(block));
  const float m = fp16_to_float(load_u16(block + 2));
  for (std::size_t j = 0; j < 16; ++j) {
    const unsigned packed = std::to_integer<unsigned>(block[4 + j]);
    values[j] = d * static_cast<float>(packed & 0xFu) + m;
    values[j + 16] = d * static_cast<float>(packed >> 4) + m;
  }
}

using BlockFunction = void (*)(const std::byte*, float*);

void dequantize_blocks(const char* function, BlockFunction block, std::size_t block_bytes,
                       std::span<const std::byte> blocks, std::span<float> out) {
  check_sizes(function, block_bytes, blocks.size(), out.size());
  for (std::size_t b = 0; b < out.size() / quant_block_elements; ++b)
    block(blocks.data() + b * block_bytes, out.data() + b * quant_block_elements);
}

float dot_blocks(const char* function, BlockFunction block, std::size_t block_bytes, std::span<const std::byte> row,
                 std::span<const float> x) {
  check_sizes(function, block_bytes, row.size(), x.size());
  float sum = 0.0f;
  std::array<float, quant_block_elements> values{};
  for (std::size_t b = 0; b < x.size() / quant_block_elements; ++b) {
    block(row.data() + b * block_bytes, values.data());
    const float* xs = x.data() + b * quant_block_elements;
    for (std::size_t i = 0; i < quant_block_elements; ++i) sum += values[i] * xs[i];
  }
  return sum;
}

}  // namespace

bool is_known_type(std::uint32_t number) { return entry_of(number) != nullptr; }

BlockLayout layout_of(GgmlType type) {
  const TypeEntry* entry = entry_of(static_cast<std::uint32_t>(type));
  if (entry == nullptr)
    fail(
        "ggml type {} is not known (expected one of F32, F16, BF16, F64, I8..I64, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, "
        "Q8_1, Q2_K..Q8_K)",
        static_cast<std::uint32_t>(type));
  return entry->layout;
}

std::string_view name_of(GgmlType type) {
  const TypeEntry* entry = entry_of(static_cast<std::uint32_t>(type));
  return entry == nullptr ? std::string_view("?") : entry->name;
}

void dequantize_q8_0(std::span<const std::byte> blocks, std::span<float> out) {
  dequantize_blocks("dequantize_q8_0", q8_0_block, q8_0_block_bytes, blocks, out);
}
void dequantize_q4_0(std::span<const std::byte> blocks, std::span<float> out) {
  dequantize_blocks("dequantize_q4_0", q4_0_block, q4_0_block_bytes, blocks, out);
}
void dequantize_q4_1(std::span<const std::byte> blocks, std::span<float> out) {
  dequantize_blocks("dequantize_q4_1", q4_1_block, q4_1_block_bytes, blocks, out);
}

void dequantize(GgmlType type, std::span<const std::byte> stored, std::span<float> out) {
  const auto widen = [&](std::size_t element_bytes, float (*convert)(std::uint16_t)) {
    if (stored.size() != out.size() * element_bytes)
      fail("dequantize: {} bytes for {} {} elements (expected {})", stored.size(), out.size(), name_of(type),
           out.size() * element_bytes);
    for (std::size_t i = 0; i < out.size(); ++i) out[i] = convert(load_u16(stored.data() + element_bytes * i));
  };
  switch (type) {
    case GgmlType::f32:
      if (stored.size() != 4 * out.size())
        fail("dequantize: {} bytes for {} F32 elements (expected {})", stored.size(), out.size(), 4 * out.size());
      if (!out.empty()) std::memcpy(out.data(), stored.data(), stored.size());
      return;
    case GgmlType::f16:
      return widen(2, fp16_to_float);
    case GgmlType::bf16:
      return widen(2, bf16_to_float);
    case GgmlType::q8_0:
      return dequantize_q8_0(stored, out);
    case GgmlType::q4_0:
      return dequantize_q4_0(stored, out);
    case GgmlType::q4_1:
      return dequantize_q4_1(stored, out);
    default:
      fail("dequantize: {} (expected F32, F16, BF16, Q8_0, Q4_0 or Q4_1)", name_of(type));
  }
}

float dot_q8_0_row(std::span<const std::byte> row, std::span<const float> x) {
  return dot_blocks("dot_q8_0_row", q8_0_block, q8_0_block_bytes, row, x);
}
float dot_q4_0_row(std::span<const std::byte> row, std::span<const float> x) {
  return dot_blocks("dot_q4_0_row", q4_0_block, q4_0_block_bytes, row, x);
}
float dot_q4_1_row(std::span<const std::byte> row, std::span<const float> x) {
  return dot_blocks("dot_q4_1_row", q4_1_block, q4_1_block_bytes, row, x);
}

}  // namespace af::gguf
