#!/usr/bin/env bash
# Chapter 17's full sweep, committed as chapters/17_what_cache_tricks_cost/results/: the program's output with
# the command, the machine, the date and the commit on top, and its CSV files. Takes about forty minutes on
# two cores.
#   bash scripts/run_cache_sweep.sh [BUILD_DIR]
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build=${1:-$repo/build}
results=$repo/chapters/17_what_cache_tricks_cost/results
args=(--full --tokens 3072 --window 1024 --stride 512 --lengths 1024,2048 --depths 3 --trials 3)
mkdir -p "$results"
commit=$(git -C "$repo" rev-parse HEAD)
git -C "$repo" diff --quiet HEAD -- lib chapters/17_what_cache_tricks_cost || commit="$commit + uncommitted changes"
{
  echo "# command: build/bin/ch17_what_cache_tricks_cost ${args[*]} --out chapters/17_what_cache_tricks_cost/results"
  echo "# machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; date: $(date -u +%F); commit: $commit"
  "$build/bin/ch17_what_cache_tricks_cost" "${args[@]}" --out "$results"
} > "$results/output.txt.partial"
mv "$results/output.txt.partial" "$results/output.txt"
