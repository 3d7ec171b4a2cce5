#!/usr/bin/env bash
# Chapter 18's full sweep, committed as chapters/18_trained_from_scratch/results/: the program's output with the
# command, the machine, the date and the commit on top, its CSV files and the progress log. Takes about an hour
# on two cores.
#   bash scripts/run_training_sweep.sh [BUILD_DIR]
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build=${1:-$repo/build}
results=$repo/chapters/18_trained_from_scratch/results
args=(--full)
mkdir -p "$results"
commit=$(git -C "$repo" rev-parse HEAD)
git -C "$repo" diff --quiet HEAD -- lib chapters/18_trained_from_scratch/*.cpp || commit="$commit + uncommitted changes"
{
  echo "# command: build/bin/ch18_trained_from_scratch ${args[*]} --out chapters/18_trained_from_scratch/results"
  echo "# machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; date: $(date -u +%F); commit: $commit"
  "$build/bin/ch18_trained_from_scratch" "${args[@]}" --out "$results" 2> "$results/progress.log.partial"
} > "$results/output.txt.partial"
mv "$results/output.txt.partial" "$results/output.txt"
mv "$results/progress.log.partial" "$results/progress.log"
