#!/usr/bin/env bash
# One GPU run: the GPU tests, the sanitizers, the chapter programs and the decode benchmark (project kernels
# and peers), everything written under $OUT. The binaries are built on the development machine (same nvcc,
# sm_90a) and carried in .devcarry/ by kernels/bench/stage.sh; the FlashInfer wheels in .whl/.
#   bash kernels/bench/device_run.sh COMMIT [tests] [sanitize] [chapters] [bench] [prefill] [paged] [mla] [bench-args...]
set -u
commit=$1; shift
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export LD_LIBRARY_PATH=$PWD/.devcarry:${LD_LIBRARY_PATH:-}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem --format=csv | tee "$OUT/gpu.txt"
steps=" $* "
if [[ $steps == *" tests "* ]]; then
  .devcarry/test_gpu --durations yes > "$OUT/test_gpu.log" 2>&1; echo "test_gpu exit $?" | tee -a "$OUT/summary.txt"
  tail -4 "$OUT/test_gpu.log"
fi
if [[ $steps == *" chapters "* ]]; then
  for ch in .devcarry/ch2*; do
    name=$(basename "$ch")
    { echo "# gpu: $(nvidia-smi --query-gpu=name --format=csv,noheader); driver: $(nvidia-smi --query-gpu=driver_version --format=csv,noheader); date: $(date -u +%F)"
      echo "# commit: $commit"; echo "# command: build/bin/$name --bench"; } > "$OUT/$name.txt"
    "$ch" --bench >> "$OUT/$name.txt" 2>&1; echo "$name exit $?" | tee -a "$OUT/summary.txt"
  done
fi
if [[ $steps == *" bench "* || $steps == *" prefill "* || $steps == *" paged "* || $steps == *" mla "* ]] && ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    > "$OUT/pip.log" 2>&1 && export PYTHONPATH=/tmp/site
fi
if [[ $steps == *" bench "* ]]; then
  bench_args=()
  for a in "$@"; do case $a in tests|sanitize|chapters|bench|prefill|sass) ;; *) bench_args+=("$a");; esac; done
  python3 kernels/bench/bench_decode.py --lib .devcarry/libaf_kernels_capi.so --out "$OUT/decode_h100.csv" \
    --commit "$commit" "${bench_args[@]}" 2>&1 | tee "$OUT/bench.log" | grep -v "^  " 
fi
if [[ $steps == *" prefill "* ]]; then
  python3 kernels/bench/bench_prefill.py --lib .devcarry/libaf_kernels_capi.so --out "$OUT/prefill_h100.csv" \
    --commit "$commit" $( [[ $steps == *" --flashinfer "* ]] && echo --flashinfer ) 2>&1 | tee "$OUT/bench_prefill.log"
fi
if [[ $steps == *" paged "* ]]; then
  python3 kernels/bench/bench_paged.py --lib .devcarry/libaf_kernels_capi.so --out "$OUT/paged_h100.csv" \
    --commit "$commit" $( [[ $steps == *" --flashinfer "* ]] && echo --flashinfer ) 2>&1 | tee "$OUT/bench_paged.log"
fi
if [[ $steps == *" mla "* ]]; then
  python3 kernels/bench/bench_mla.py --lib .devcarry/libaf_kernels_capi.so --out "$OUT/mla_h100.csv" \
    --commit "$commit" 2>&1 | tee "$OUT/bench_mla.log"
fi
if [[ $steps == *" sanitize "* ]]; then
  for tool in memcheck racecheck initcheck; do
    timeout ${AF_SANITIZER_TIMEOUT:-150} compute-sanitizer --tool $tool --error-exitcode 9 .devcarry/test_gpu "[decode],[blocks]" \
      > "$OUT/sanitizer_$tool.log" 2>&1
    echo "compute-sanitizer --tool $tool --error-exitcode 9 test_gpu: exit $?" | tee -a "$OUT/summary.txt"
    tail -3 "$OUT/sanitizer_$tool.log"
    # Paged decode and prefill separately (their own logs and time limits).
    for tag in paged prefill mla-decode; do
      timeout ${AF_SANITIZER_TIMEOUT:-150} compute-sanitizer --tool $tool --error-exitcode 9 .devcarry/test_gpu "[$tag]" \
        > "$OUT/sanitizer_${tag}_$tool.log" 2>&1
      echo "compute-sanitizer --tool $tool --error-exitcode 9 test_gpu [$tag]: exit $?" | tee -a "$OUT/summary.txt"
      tail -3 "$OUT/sanitizer_${tag}_$tool.log"
    done
  done
fi
if [[ $steps == *" sass "* ]]; then
  # What the compiler made of the decode kernels: 16-byte loads (LDG.E.128), tensor-core mma (HMMA), no spills
  # (LDL/STL), per kernel.
  cuobjdump --dump-sass .devcarry/libaf_kernels_capi.so > /tmp/sass.txt 2>&1
  grep -oE "Function : [^ ]+|LDG[.A-Z0-9_]*|HMMA[.A-Z0-9_]*|LDL[.A-Z0-9_]*|STL[.A-Z0-9_]*" /tmp/sass.txt |
    awk '/Function/ {f=$3; next} {c[f" "$1]++} END {for (k in c) print c[k], k}' | sort -k2 > "$OUT/sass_summary.txt"
fi
cat "$OUT/summary.txt" 2>/dev/null
if [[ -n ${AF_TAR:-} ]]; then  # at most 8 files come back: everything in one archive, the CSV beside it
  tar czf /tmp/run.tgz -C "$OUT" . && cp /tmp/run.tgz "$OUT/run.tgz"
fi
