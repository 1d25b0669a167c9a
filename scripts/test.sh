#!/usr/bin/env bash
# Set up, then run the test suite (CPU only; GPU tests skip, Slurm tests run when Slurm is up).
set -euo pipefail
. "$(dirname "$0")/setup_env.sh"
if [ "${GAZAL_SLURM_TESTS:-auto}" != 0 ] && [ -x scripts/ci_slurm_setup.sh ] && [ "$(id -u)" = 0 ]; then
  bash scripts/ci_slurm_setup.sh || echo "test: Slurm could not be started; Slurm tests will skip"
fi
exec python -m pytest -q -p no:cacheprovider "$@"
