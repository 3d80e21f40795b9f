# Sourced by tests/run.sh and bench/run.sh: brings a fresh clone on a machine with only
# python3 and a C++ compiler to a built, importable alr, and costs seconds when re-run.
#
#   .venv/           created in the repository root if missing, then activated
#   torch            installed only if it does not import: torch==2.14.1, PyPI's CUDA 13.0
#                    build (5.4 GB, about a minute here), so that the CUDA kernels are
#                    compiled on every CI run even without a GPU; or $ALR_TORCH_SPEC
#                    (e.g. torch==2.13.0, a CPU build on local disk: no CUDA extension)
#   tools            ninja pybind11 pytest hypothesis numpy wheel setuptools>=70, triton
#                    (the Triton backend; its tests run in Triton's CPU interpreter), and
#                    the benchmarks' matplotlib scikit-learn tqdm, if missing
#   alr              `pip install --no-build-isolation --no-deps -e .`, skipped when the
#                    sources that feed the build are unchanged since the last good build
#
# The callers run with `set -euo pipefail`, so a failing step stops them.
# shellcheck shell=bash

ALR_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ALR_BUILD_STAMP="$ALR_ROOT/.venv/.alr-build-stamp"

alr_log() {
  echo "setup: $*"
}

alr_activate_venv() {
  if [ ! -x "$ALR_ROOT/.venv/bin/python" ]; then
    alr_log "creating .venv"
    python3 -m venv "$ALR_ROOT/.venv"
  fi
  # shellcheck disable=SC1091
  source "$ALR_ROOT/.venv/bin/activate"
}

alr_install_torch() {
  if python -c "import torch" 2>/dev/null; then
    return 0
  fi
  local spec="${ALR_TORCH_SPEC:-torch==2.14.1}"
  alr_log "installing $spec"
  pip install -q "$spec"
}

alr_install_tools() {
  # One interpreter start checks them all, so a warm run costs a fraction of a second.
  if python - <<'EOF' 2>/dev/null
import importlib.util, sys
from importlib.metadata import version
modules = ("ninja", "pybind11", "pytest", "hypothesis", "numpy", "wheel", "setuptools",
           "matplotlib", "sklearn", "tqdm", "triton")
missing = [name for name in modules if importlib.util.find_spec(name) is None]
sys.exit(1 if missing or int(version("setuptools").split(".")[0]) < 70 else 0)
EOF
  then
    return 0
  fi
  alr_log "installing build and test tools"
  pip install -q ninja pybind11 pytest hypothesis numpy wheel "setuptools>=70" \
    matplotlib scikit-learn tqdm triton
}

# torch guesses CUDA_HOME from the folder above nvcc's folder, which is wrong when nvcc on
# PATH is a link or a wrapper script (here /usr/local/bin/nvcc execs the real one).
alr_set_cuda_home() {
  if [ -n "${CUDA_HOME:-}" ] || ! command -v nvcc >/dev/null; then
    return 0
  fi
  local home
  home="$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")"
  if [ ! -f "$home/include/cuda_runtime.h" ]; then
    # nvcc's dry run names the folder of the real nvcc binary.
    home="$(nvcc --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ _HERE_=//p' | head -n 1)"
    home="$(readlink -f "$home/..")"
  fi
  if [ -f "$home/include/cuda_runtime.h" ]; then
    export CUDA_HOME="$home"
  else
    alr_log "nvcc found but no CUDA toolkit folder beside it; leaving CUDA_HOME unset"
  fi
}

# Hash of everything that decides what the build produces: the C++ and Triton sources,
# setup.py, the version it reads, the torch it builds against and the build switches.
alr_build_hash() {
  (
    cd "$ALR_ROOT" || exit 1
    find csrc kernels -type f ! -path '*/__pycache__/*' -print0 2>/dev/null \
      | LC_ALL=C sort -z | xargs -0 -r sha256sum
    sha256sum setup.py alr/__init__.py
    python -c 'import sys; from importlib.metadata import version; print(sys.executable, version("torch"))'
    echo "ALR_BUILD_CUDA=${ALR_BUILD_CUDA:-} ALR_DEBUG=${ALR_DEBUG:-} CUDA_HOME=${CUDA_HOME:-}"
  ) | sha256sum | cut -d ' ' -f 1
}

alr_build() {
  local hash
  hash="$(alr_build_hash)"
  # The editable install builds alr/_C*.so in place; a cleaned tree needs a rebuild.
  if [ -f "$ALR_BUILD_STAMP" ] && [ "$(cat "$ALR_BUILD_STAMP")" = "$hash" ] \
    && compgen -G "$ALR_ROOT/alr/_C*.so" >/dev/null; then
    alr_log "alr build is up to date"
    return 0
  fi
  alr_log "building alr (pip install --no-build-isolation --no-deps -e .)"
  rm -f "$ALR_BUILD_STAMP"
  # --use-pep517: without a pyproject.toml, pip 23 takes the legacy `setup.py develop`
  # path, which in setuptools >= 80 re-runs pip with build isolation and loses torch.
  pip install -q --no-build-isolation --no-deps --use-pep517 -e "$ALR_ROOT"
  echo "$hash" >"$ALR_BUILD_STAMP"
}

alr_activate_venv
alr_install_torch
alr_install_tools
alr_set_cuda_home
alr_build
