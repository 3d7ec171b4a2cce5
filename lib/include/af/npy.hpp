#pragma once
/// @file npy.hpp
/// NumPy's `.npy` format, so a tensor can be opened with `numpy.load` and an array saved by NumPy read
/// back: little-endian float32 (`<f4`) is written; `<f4`, `<f8` and `<f2` in C order are read.

#include "af/tensor.hpp"

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <span>
#include <string>

namespace af {

/// Writes `tensor` as a version 1.0 `.npy` file of dtype `<f4`. Throws af::Error when it cannot.
void write_npy(const std::filesystem::path& path, const Tensor& tensor);

/// The largest `.npy` file read_npy opens (64 GiB); a larger one is refused before anything is allocated.
inline constexpr std::uint64_t npy_max_file_bytes = std::uint64_t{1} << 36;
/// The longest header dictionary accepted (64 KiB; NumPy writes a few dozen bytes for the dtypes read here).
inline constexpr std::uint64_t npy_max_header_bytes = std::uint64_t{1} << 16;

/// Reads a `.npy` file into float32. Throws af::Error naming the file and the problem for a path that is
/// not a regular file (a directory, a FIFO, a device) or is larger than npy_max_file_bytes, and for every
/// problem read_npy_bytes names. Nothing else leaves it.
Tensor read_npy(const std::filesystem::path& path);

/// Parses the bytes of a `.npy` file held in memory into float32; `source` names them in messages. Throws
/// af::Error naming `source` and the problem for a bad magic string or version, a header longer than
/// npy_max_header_bytes or past the end, an unsupported dtype or Fortran order, a shape that is not a tuple
/// of at most four sizes >= 0 or holds more than Shape::max_numel elements, or fewer data bytes than the
/// shape requires. The size is checked before the tensor is allocated. Nothing else leaves it.
Tensor read_npy_bytes(std::span<const std::byte> bytes, const std::string& source = "<memory>");

}  // namespace af
