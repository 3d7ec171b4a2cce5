#pragma once
/// @file gpu_program.hpp
/// What the kernel chapters (20-22) add to af::run_program: the flags are parsed first, so that `--help` (exit
/// 0) and a bad flag (exit 2) work on any machine, and only then does a machine without a CUDA device skip
/// (exit 77, which CTest reports as skipped).

#include "af/kernels/device_buffer.hpp"
#include "af/program.hpp"

#include <cstdio>
#include <functional>

namespace af::kernels {

/// The exit status of a program that needs a GPU and finds none.
inline constexpr int exit_no_gpu = 77;

/// af::run_program, with `body` run only when a CUDA device is present; without one it prints why and returns
/// exit_no_gpu (after the flags parsed: --help and a bad flag return 0 and 2 as always).
inline int run_gpu_program(CLI::App& app, int argc, char** argv, const std::function<bool()>& body) {
  bool has_device = true;
  const int status = af::run_program(app, argc, argv, [&] {
    has_device = cuda_device_present();
    return has_device && body();
  });
  if (has_device) return status;
  std::printf("%s: no CUDA device: skipping (exit %d)\n", app.get_name().c_str(), exit_no_gpu);
  return exit_no_gpu;
}

}  // namespace af::kernels
