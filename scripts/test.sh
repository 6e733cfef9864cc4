#!/usr/bin/env bash
# The one test command (README.md): installs what the tests need, then runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-test-deps.sh
export TURBINE_TEST_PYTHON="${TURBINE_TEST_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/turbine/test-venv}/bin/python"
cargo test --workspace --all-targets "$@"
# The CUDA backend compiles everywhere (cudarc loads the driver at run time); its GPU tests
# print "SKIP: ..." and pass where no device is present.
cargo test -p turbine-kernels --features cuda --test cuda_kernels "$@"
# ...and the server's CUDA wiring (device: cuda:N) builds (reusing the test build above).
cargo test --workspace --all-targets --features turbine/cuda --no-run
