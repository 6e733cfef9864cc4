#!/usr/bin/env bash
# The one test command (README.md): installs what the tests need, then runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-test-deps.sh
# A first build (a fresh checkout, as on CI) gains nothing from incremental compilation and
# pays for writing its state; later local runs, which find the state, keep it.
if [[ ! -d "${CARGO_TARGET_DIR:-target}/debug/incremental" ]]; then
  export CARGO_INCREMENTAL=0
fi
export TURBINE_TEST_PYTHON="${TURBINE_TEST_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/turbine/test-venv}/bin/python"
# One build, with the CUDA backend compiled in: it compiles everywhere (cudarc loads the
# driver at run time), its GPU tests print "SKIP: ..." and pass where no device is present,
# and the CPU paths are the same code. Building the workspace once without and once with
# `cuda` compiled every workspace crate and linked every test binary twice.
cargo test --workspace --all-targets --features turbine/cuda "$@"
