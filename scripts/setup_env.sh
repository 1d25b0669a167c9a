#!/usr/bin/env bash
# Create (or reuse) .venv and install gazal-nemo with its dev extras. Sourced by demo.sh and test.sh.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($python --version)"
  "$python" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
if ! python -c "import gazal_nemo, megatron.core, peft" 2>/dev/null || [ "${GAZAL_REINSTALL:-0}" = 1 ]; then
  echo "setup: installing dependencies (a few minutes on a fresh machine)"
  python -m pip install -q --upgrade pip
  if ! command -v nvidia-smi >/dev/null 2>&1; then
    # No GPU: pin the CPU build of torch first; an unpinned torch pulls several GB of CUDA wheels.
    python -m pip install -q "torch==2.13.0"
  fi
  python -m pip install -q -e ".[dev]"
fi
