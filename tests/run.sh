#!/usr/bin/env bash
# The project's test command (`bash tests/run.sh [pytest args]`), from any folder:
# sets up and builds alr, prints what was built, then runs the test suite.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source tests/setup_env.sh

# A broken import is not fatal here: pytest runs next and reports it in detail.
python -c "import json, alr._extension as ext; print('build_info:', json.dumps(ext.build_info()))" \
  || echo "build_info: alr._extension could not be imported"
# Without a GPU the Triton kernels are tested in Triton's interpreter, on CPU tensors. The
# GPU check sets TRITON_INTERPRET=0 to compile them for the device instead.
export TRITON_INTERPRET="${TRITON_INTERPRET:-1}"
exec python -m pytest -q tests "$@"
