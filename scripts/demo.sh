#!/usr/bin/env bash
# Set up, then run the whole pipeline on a tiny CPU Qwen3 made on the spot (no downloads).
set -euo pipefail
. "$(dirname "$0")/setup_env.sh"
exec gazal demo "$@"
