#pragma once
/// @file reference.hpp
/// The CPU side of the kernel checks: bf16 inputs drawn from the library's seeded generator, and decode
/// attention computed by the library's af::attention (float32, one head at a time) on the same bf16 values.

#include "af/kernels/decode.hpp"
#include "af/random.hpp"

#include <cstdint>
#include <span>
#include <vector>

namespace af::kernels {

/// `count` standard-normal values rounded to bf16, as bit patterns.
std::vector<std::uint16_t> random_bf16(std::size_t count, af::Rng& rng);

/// The float32 values of bf16 bit patterns.
std::vector<float> bf16_to_floats(std::span<const std::uint16_t> bits);

/// Decode attention on the CPU: out [batch, q_heads, head_dim] from q [batch, q_heads, head_dim] and the
/// caches k, v [batch, kv_heads, seq_len, head_dim] (bf16 bit patterns), scale 1 / sqrt(head_dim).
std::vector<float> reference_decode(const DecodeShape& shape, std::span<const std::uint16_t> q,
                                    std::span<const std::uint16_t> k, std::span<const std::uint16_t> v);

/// Decode attention in float64 from the same bf16 values, with `scale` multiplying q . k: the exact answer up
/// to float64 rounding (about 1e-16), against which the GPU tests bound every output element of a kernel
/// (bf16 inputs, float32 accumulation, bf16 output). Same layouts as reference_decode.
std::vector<double> reference_decode_f64(const DecodeShape& shape, std::span<const std::uint16_t> q,
                                         std::span<const std::uint16_t> k, std::span<const std::uint16_t> v,
                                         double scale);

/// ||a - b|| / ||b|| (Frobenius); NaN when `a` holds a NaN or an infinity.
double relative_error(std::span<const float> a, std::span<const float> b);

/// A kernel's output against its float64 reference, as the kernel chapters report it: the relative error of the
/// whole output, and the largest error of one element beside the largest |expected| (a missed row or tile shows
/// in the second). A NaN or an infinity in `got` makes both infinite or NaN, so every check on them fails.
struct OutputError {
  double relative = 0.0;  ///< ||got - expected|| / ||expected||
  double worst = 0.0;     ///< max |got - expected| over the elements
  double largest = 0.0;   ///< max |expected|
};
/// Throws af::Error when the sizes differ.
OutputError output_error(std::span<const float> got, std::span<const double> expected);

}  // namespace af::kernels
