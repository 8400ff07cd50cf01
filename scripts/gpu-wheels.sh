#!/usr/bin/env bash
# make gpu-wheels: on a machine with network, fill a folder with everything `make gpu-check`
# installs on a GPU machine without network, except torch (which that machine already has).
#
#   scripts/gpu-wheels.sh DIR [PYTHON_VERSION [PLATFORM]]
#
# PYTHON_VERSION is the GPU machine's (e.g. 3.12; default: this machine's), PLATFORM its wheel
# platform (default manylinux_2_28_x86_64; older glibc: manylinux2014_x86_64). Binary wheels are
# downloaded for that Python and platform; DeepSpeed comes as its sdist (it has no wheel), built
# on the GPU machine against its torch; packages published only as sdists are built here into
# pure-Python wheels. Copy DIR over and run `make gpu-check WHEELS=DIR`.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DIR=${1:?usage: $0 DIR [PYTHON_VERSION [PLATFORM]]}
PYTHON=${PYTHON:-python3}
VERSION=${2:-$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')}
PLATFORM=${3:-manylinux_2_28_x86_64}
mkdir -p "$DIR"
reqs=$(mktemp)
trap 'rm -f "$reqs"' EXIT

# dscluster's requirements less torch and mpi4py (as scripts/gpu-check.sh installs them), and
# DeepSpeed's own requirements less torch, read from its sdist's metadata once downloaded.
"$PYTHON" "$ROOT/scripts/gpu_requirements.py" >"$reqs"
deepspeed=$(grep -i '^deepspeed' "$reqs")
grep -vi '^deepspeed' "$reqs" >"$reqs.rest" && mv "$reqs.rest" "$reqs"
"$PYTHON" -m pip download -q --no-deps --no-binary :all: -d "$DIR" "$deepspeed"
sdist=$(ls "$DIR"/deepspeed-*.tar.gz | head -1)
# DeepSpeed's requirements.txt inside the sdist; torch is the GPU machine's own
tar -xzOf "$sdist" --wildcards '*/requirements/requirements.txt' | grep -v '^\s*#' | grep -vi '^torch' \
  | grep -v '^\s*$' >>"$reqs"
echo "setuptools>=68" >>"$reqs"
echo "wheel" >>"$reqs"

binary=(--only-binary :all: --python-version "$VERSION" --implementation cp --platform "$PLATFORM"
        --platform manylinux2014_x86_64 --platform linux_x86_64)
while read -r req; do
  [ -n "$req" ] || continue
  if ! "$PYTHON" -m pip download -q "${binary[@]}" -d "$DIR" "$req" 2>/dev/null; then
    # no wheel for that Python and platform somewhere in its tree: build what is pure Python here
    "$PYTHON" -m pip download -q --no-deps -d "$DIR.src" "$req"
    "$PYTHON" -m pip wheel -q --no-deps -w "$DIR" "$DIR.src"/*
    rm -rf "$DIR.src"
    "$PYTHON" -m pip download -q "${binary[@]}" --no-deps -d "$DIR" "$req" 2>/dev/null || true
    echo "gpu-wheels: $req built here from its sdist (check that it is pure Python)"
  fi
done <"$reqs"
echo "gpu-wheels: $(ls "$DIR" | wc -l) files in $DIR for Python $VERSION on $PLATFORM; torch not included"
