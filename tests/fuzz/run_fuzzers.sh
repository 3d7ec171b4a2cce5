#!/usr/bin/env bash
# Builds the readers' libFuzzer targets in a separate clang build tree and runs each for a bounded time over
# a copy of its committed corpus: the CTest test fuzz_readers of a build made with another compiler.
#   run_fuzzers.sh SOURCE_DIR BUILD_DIR CLANGXX SECONDS READER...
# Exits 77 (CTest's skip) when clang cannot link a fuzzer (libFuzzer's runtime is not installed), 0 when
# every fuzzer ran its time without a finding, and otherwise with the failing step's status.
set -euo pipefail

source_dir=$1 build_dir=$2 clangxx=$3 seconds=$4
shift 4
readers=("$@")

mkdir -p "$build_dir"
probe=$build_dir/probe
printf '%s\n' '#include <cstddef>' '#include <cstdint>' \
  'extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t*, std::size_t) { return 0; }' >"$probe.cpp"
if ! "$clangxx" -fsanitize=fuzzer,address,undefined "$probe.cpp" -o "$probe" 2>"$probe.log"; then
  echo "fuzz_readers: skipped: $clangxx cannot link a libFuzzer target (is libFuzzer's runtime installed?)"
  cat "$probe.log"
  exit 77
fi

generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
cmake -S "$source_dir" -B "$build_dir" "${generator[@]}" -DCMAKE_CXX_COMPILER="$clangxx" \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo -DAF_FUZZ=ON -DAF_ENABLE_CUDA=OFF -DAF_BUILD_BOOK=OFF >"$build_dir/configure.log" ||
  { cat "$build_dir/configure.log"; exit 1; }
cmake --build "$build_dir" --target "${readers[@]/#/fuzz_}"

for reader in "${readers[@]}"; do
  work_dir=$build_dir/corpus-run/$reader
  rm -rf "$work_dir"
  mkdir -p "$work_dir"
  echo "fuzz_readers: fuzz_$reader for ${seconds} s over $source_dir/tests/fuzz/corpus/$reader"
  "$build_dir/bin/fuzz_$reader" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
    -dict="$source_dir/tests/fuzz/$reader.dict" -artifact_prefix="$build_dir/$reader-" "$work_dir" "$source_dir/tests/fuzz/corpus/$reader"
done
