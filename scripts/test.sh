#!/usr/bin/env bash
# The one test command (README.md): installs what the tests need, then runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-test-deps.sh
export TURBINE_TEST_PYTHON="${TURBINE_TEST_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/turbine/test-venv}/bin/python"
cargo test --workspace --all-targets "$@"
