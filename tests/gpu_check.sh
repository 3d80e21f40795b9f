#!/usr/bin/env bash
# One-command GPU check: `bash tests/gpu_check.sh [OUT_DIR]` on a machine with a CUDA GPU.
#
# Builds alr in place with the machine's own python3 and torch (>= 2.11; nothing is
# downloaded: the GPU machines have no network, and their image already holds torch,
# triton, pytest, hypothesis, pybind11, ninja, numpy, matplotlib, scikit-learn and tqdm),
# then writes into OUT_DIR (default: gpu-check/):
#
#   gpu_check.log   everything below, as it ran
#   environment.txt GPU, driver, torch / triton / nvcc versions, alr's build_info
#   tests.xml       the GPU test subset (JUnit XML): every backend against the reference on
#                   CUDA tensors, one launch per bucket, CUDA-graph capture, torch.compile
#   bench/          `python -m bench --device cuda` (markdown table, JSON, charts)
#
# Exit status: the tests' (the benchmark runs even when a test fails).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${1:-gpu-check}"
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1

PYTHON="${PYTHON:-python3}"
echo "== environment"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv
  nvcc --version | tail -n 2
  "$PYTHON" - <<'EOF'
import torch, triton
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)
print("device", torch.cuda.get_device_name(), "SMs", torch.cuda.get_device_properties(0).multi_processor_count)
EOF
} | tee "$OUT/environment.txt"

echo "== build (pip install --no-build-isolation --no-deps --no-index --use-pep517 -e .)"
export CUDA_HOME="${CUDA_HOME:-$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")}"
"$PYTHON" -m pip install -q --no-build-isolation --no-deps --no-index --use-pep517 -e . || exit 1
"$PYTHON" -c "import json, alr; print('build_info:', json.dumps(alr.build_info()))" | tee -a "$OUT/environment.txt"

echo "== GPU tests"
# Compiled for the GPU, not interpreted; device-generic tests run on CUDA tensors.
export TRITON_INTERPRET=0 ALR_TEST_DEVICE=cuda
"$PYTHON" -m pytest -q -p no:cacheprovider --junitxml="$OUT/tests.xml" \
  tests/test_backend_parity.py tests/test_cuda_backend.py tests/test_triton_backend.py tests/test_compile_and_graphs.py \
  tests/test_no_host_sync.py tests/test_low_precision.py tests/test_optimizer_api.py tests/test_state_dict.py
tests_status=$?

echo "== GPU benchmark"
"$PYTHON" -m bench --device cuda --out "$OUT/bench"
echo "== done: tests exit status $tests_status; results in $OUT"
exit "$tests_status"
