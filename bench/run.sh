#!/usr/bin/env bash
# The project's benchmark command (`bash bench/run.sh [bench args]`), from any folder:
# sets up and builds alr exactly as the tests do, then runs the benchmark CLI.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source tests/setup_env.sh
exec python -m bench "$@"
