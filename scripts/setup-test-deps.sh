#!/usr/bin/env bash
# Everything the test suite needs beyond cargo: the default model and the Python packages the
# end-to-end tests drive the server with (the official `openai` client). Idempotent.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"

"$here/fetch-model.sh"

venv="${TURBINE_TEST_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/turbine/test-venv}"
if [[ ! -x "$venv/bin/python" ]]; then
  python3 -m venv "$venv"
fi
if ! "$venv/bin/python" -c "import openai" 2>/dev/null; then
  "$venv/bin/python" -m pip install --quiet "openai>=1.40,<3"
fi
echo "test venv ready: $venv"
