#pragma once
/// @file npy.hpp
/// NumPy's `.npy` format, so a tensor can be opened with `numpy.load` and an array saved by NumPy read
/// back: little-endian float32 (`<f4`) is written; `<f4`, `<f8` and `<f2` in C order are read.

#include "af/tensor.hpp"

#include <filesystem>

namespace af {

/// Writes `tensor` as a version 1.0 `.npy` file of dtype `<f4`. Throws af::Error when it cannot.
void write_npy(const std::filesystem::path& path, const Tensor& tensor);

/// Reads a `.npy` file into float32. Throws af::Error naming the file and the problem for a bad magic
/// string, an unsupported dtype or Fortran order, or a file shorter than its shape requires.
Tensor read_npy(const std::filesystem::path& path);

}  // namespace af
