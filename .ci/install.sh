#!/usr/bin/env bash
# Creates .venv with a Python >= 3.12 interpreter and installs denseflow-jax with the test and
# prepare (TensorFlow, for preparing TFDS datasets) extras, at the exact versions CI tests
# (.ci/constraints.txt; setup.cfg itself states version ranges).
# Usage: bash .ci/install.sh            (from the repository root)
set -euo pipefail
cd "$(dirname "$0")/.."

find_python() {
  local cand
  # 1. an explicit choice
  if [ -n "${DENSEFLOW_PYTHON:-}" ]; then echo "$DENSEFLOW_PYTHON"; return 0; fi
  # 2. interpreters on PATH
  for cand in python3.13 python3.12 python3 python; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1; then
      command -v "$cand"; return 0
    fi
  done
  # 3. pyenv-installed versions that are not on the global list
  if command -v pyenv >/dev/null 2>&1; then
    local root; root=$(pyenv root)
    for cand in $(ls -d "$root"/versions/3.1[2-9]* 2>/dev/null | sort -rV); do
      if [ -x "$cand/bin/python3" ]; then echo "$cand/bin/python3"; return 0; fi
    done
  fi
  return 1
}

if ! PY=$(find_python); then
  echo "ERROR: denseflow-jax needs Python >= 3.12 (jax 0.12), and none was found." >&2
  echo "Install one (e.g. 'pyenv install 3.12' or your OS package python3.12) or set DENSEFLOW_PYTHON=/path/to/python3.12." >&2
  exit 2
fi
echo "Using $PY ($("$PY" --version 2>&1))"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -c .ci/constraints.txt -e '.[test,prepare]'
echo "Installed. Activate with: source .venv/bin/activate"
