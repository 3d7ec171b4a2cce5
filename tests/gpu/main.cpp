// The GPU tests' entry point: skip (exit 77) where there is no CUDA device, else run Catch2.
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include "af/kernels/device_buffer.hpp"

#include <cstdio>

int main(int argc, char** argv) {
  if (!af::kernels::cuda_device_present()) {
    std::puts("test_gpu: no CUDA device on this machine: skipping the GPU tests (exit 77)");
    return 77;
  }
  return Catch::Session().run(argc, argv);
}
