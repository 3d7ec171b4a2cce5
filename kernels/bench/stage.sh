#!/usr/bin/env bash
# Builds what the GPU run needs on this machine and stages it, without debug info, in .devcarry/ (ignored by
# git, carried to the GPU machine): the GPU tests, the kernel chapters, the benchmark's shared library, and
# the fmt runtime they link. BUILD names another configured build folder than build/ (for example build-cuda,
# configured with cmake -S . -B build-cuda -G Ninja -DCMAKE_BUILD_TYPE=Release -DAF_BUILD_BOOK=OFF).
set -eu
build=${BUILD:-build}
if [[ $build == build ]]; then
  cmake --build --preset default -j2 --target test_gpu af_kernels_capi $(cd build && ninja -t targets all | grep -o '^ch2[0-9][a-z_0-9]*:' | tr -d ':' | sort -u)
else
  ninja -C "$build" -j2 test_gpu af_kernels_capi $(cd "$build" && ninja -t targets all | grep -o '^ch2[0-9][a-z_0-9]*:' | tr -d ':' | sort -u)
fi
rm -rf .devcarry && mkdir -p .devcarry
cp "$build"/bin/test_gpu "$build"/lib/libaf_kernels_capi.so .devcarry/
cp "$build"/bin/ch2* .devcarry/ 2>/dev/null || true
cp -L /lib/x86_64-linux-gnu/libfmt.so.9 .devcarry/
strip --strip-debug .devcarry/*
du -sh .devcarry
