#!/usr/bin/env bash
# make gpu-check: prove the GPU path on this machine's NVIDIA GPUs (docs/gpu.md).
#
#   scripts/gpu-check.sh [--wheels DIR] [--dry-run] [-- ARGS for benchmarks/gpu_check.py]
#
# No NVIDIA GPU here: one line, exit 0, nothing installed or run.
# Otherwise: a venv (.venv-gpu) that sees the system's packages, so the CUDA build of torch that
# GPU nodes and CUDA images already have is used as it is (never replaced: it is pinned by a
# constraint); dscluster and its other dependencies are installed around it, from PyPI, or with
# --wheels DIR from that folder alone (no network; scripts/gpu-wheels.sh builds it). DeepSpeed
# is an sdist built here against that torch (--no-build-isolation, no ops compiled ahead).
# Then benchmarks/gpu_check.py runs the checks and the GPU tests, prints a table and writes
# benchmarks/results/gpu_check.json. --dry-run prints the commands instead of running them.
#
# GPU_CHECK_PYTHON: the interpreter whose torch to use (default python3).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${GPU_CHECK_VENV:-$ROOT/.venv-gpu}
PYTHON=${GPU_CHECK_PYTHON:-python3}
WHEELS=""
DRY_RUN=0
RUNNER_ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) WHEELS=${2:?--wheels needs a folder}; shift 2 ;;
    --wheels=*) WHEELS=${1#--wheels=}; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    --) shift; RUNNER_ARGS=("$@"); break ;;
    *) echo "gpu-check: unknown argument $1 (see the top of $0)" >&2; exit 2 ;;
  esac
done

# GPUs the NVIDIA driver knows, without importing torch.
gpus=0
if [ -d /proc/driver/nvidia/gpus ]; then
  gpus=$(find /proc/driver/nvidia/gpus -mindepth 1 -maxdepth 1 | wc -l)
fi
if [ "$gpus" -eq 0 ] && command -v nvidia-smi >/dev/null 2>&1; then
  gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
fi
if [ "$gpus" -eq 0 ]; then
  echo "gpu-check: no NVIDIA GPU on this machine (no driver, nvidia-smi lists none): nothing to check"
  exit 0
fi

run() {  # print the command; run it unless --dry-run
  echo "+ $*"
  if [ "$DRY_RUN" -eq 0 ]; then "$@"; fi
}
fail() { echo "gpu-check: $*" >&2; exit 1; }

[ -z "$WHEELS" ] || [ -d "$WHEELS" ] || fail "--wheels $WHEELS: no such folder"
[ -z "$WHEELS" ] || WHEELS=$(cd "$WHEELS" && pwd)
command -v "$PYTHON" >/dev/null 2>&1 || fail "$PYTHON not found; set GPU_CHECK_PYTHON to the Python that has torch"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || fail "$PYTHON is Python $("$PYTHON" -c 'import platform; print(platform.python_version())'); dscluster needs 3.11 or later"

# The system's torch: used when it is a CUDA build that sees the GPUs.
torch_line=$("$PYTHON" -c 'import torch; print(torch.__version__, torch.version.cuda or "none", torch.cuda.device_count())' \
             2>/dev/null || echo "none none 0")
read -r torch_version torch_cuda torch_gpus <<<"$torch_line"
index=()
[ -z "$WHEELS" ] || index=(--no-index --find-links "$WHEELS")
pins=$(mktemp)
trap 'rm -f "$pins" "$pins.req"' EXIT
if [ "$torch_cuda" != "none" ] && [ "$torch_gpus" -gt 0 ]; then
  echo "gpu-check: $gpus GPU(s); using the system's torch $torch_version (CUDA $torch_cuda) from $PYTHON"
  echo "torch==${torch_version}" >"$pins"   # dependencies resolve around it, never replace it
  install_torch=()
else
  [ "$torch_version" = none ] && why="has no torch" || why="has torch $torch_version without CUDA (or it sees no GPU)"
  if [ -n "$WHEELS" ] && ! ls "$WHEELS"/torch-*.whl >/dev/null 2>&1; then
    fail "$PYTHON $why, and $WHEELS holds no torch wheel: set GPU_CHECK_PYTHON to a Python with a CUDA torch, or add one to the folder"
  fi
  torch_pin=$(grep -o '"torch==[^"]*"' "$ROOT/pyproject.toml" | tr -d '"')
  echo "gpu-check: $gpus GPU(s); $PYTHON $why: installing $torch_pin (PyPI's Linux build is the CUDA one) into $VENV"
  echo "$torch_pin" >"$pins"
  install_torch=("$torch_pin")
fi
echo "gpu-check: constraint: $(cat "$pins")"

# dscluster's requirements less torch (and mpi4py, which needs an MPI compiler), from pyproject.toml.
"$PYTHON" "$ROOT/scripts/gpu_requirements.py" >"$pins.req"

run "$PYTHON" -m venv --system-site-packages "$VENV"
pip=("$VENV/bin/python" -m pip install --disable-pip-version-check -q "${index[@]}" -c "$pins")
run "${pip[@]}" "setuptools>=68" wheel
# a CPU torch the venv would see from the system must not satisfy the requirement
[ ${#install_torch[@]} -eq 0 ] || run "${pip[@]}" --ignore-installed "${install_torch[@]}"
# DeepSpeed builds from its sdist against the torch above; no op is compiled ahead of use.
run env DS_BUILD_OPS=0 "${pip[@]}" --no-build-isolation -r "$pins.req"
run "${pip[@]}" --no-deps --no-build-isolation -e "$ROOT"
run "$VENV/bin/python" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "the venv torch sees no GPU")'
cd "$ROOT"
run env DSCLUSTER_GPU_TESTS=1 "$VENV/bin/python" -m benchmarks.gpu_check "${RUNNER_ARGS[@]}"
