#!/usr/bin/env bash
# Installs the benchmarks' anchors into their own venv (not needed by the tests):
# llama-cpp-python (built from source for this CPU; about 20 minutes on 2 cores), for
# kernels/benches/llamacpp_bench.py and scripts/bench-cpu-vs-llamacpp.sh.
# Venv: ${TURBINE_BENCH_VENV:-~/.cache/turbine/bench-venv}.
set -euo pipefail
venv="${TURBINE_BENCH_VENV:-$HOME/.cache/turbine/bench-venv}"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
if "$venv/bin/python" -c 'import llama_cpp' 2>/dev/null; then
    echo "llama-cpp-python already in $venv"
else
    echo "building llama-cpp-python 0.3.36 into $venv (takes a while)"
    "$venv/bin/pip" install --progress-bar on 'llama-cpp-python==0.3.36'
fi
"$(dirname "$0")/fetch-model.sh"
