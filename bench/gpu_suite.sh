#!/usr/bin/env bash
# The GPU suite in one device call (issue 10): install the carried wheels, then
# bench/gpu_suite.py runs every GPU measurement in priority order within 540 s, the
# install included. The exact device call, and what to do with the results: bench/README.md.
#
#   bash bench/gpu_suite.sh                    # on the device machine, from the repository root
#   bash bench/gpu_suite.sh --rehearse         # CPU rehearsal: tiny shapes, every item, no claim
#   bash bench/gpu_suite.sh --items 3,6 --budget-s 150   # a rerun of some items (args go to gpu_suite.py)
set -uo pipefail
started_at=$(date +%s)          # the budget counts from here: the install is part of the 540 s
cd "$(dirname "$0")/.."

# ---- configuration -------------------------------------------------------------------------
python=${PYTHON:-python3}       # the device image's python3 holds torch; the CI test passes the venv's python
out=${OUT:-runs/gpu_suite}      # the device tool returns what lands in $OUT; elsewhere results stay in runs/
wheels=.whl                     # git-ignored; filled by the `pip download` line in bench/README.md
site=${GPU_SUITE_SITE:-/tmp/gpu_suite_site}   # the wheels install here, first on PYTHONPATH
export PYTHONUNBUFFERED=1       # child output reaches suite.log line by line, also when a step is killed
mode=gpu
if [ "${1:-}" = --rehearse ]; then mode=rehearse; shift; fi

# ---- install -------------------------------------------------------------------------------
install_wheels() {  # the wheels given, with no index and no dependency resolution, into $site
  rm -rf "$site" && mkdir -p "$site" || return
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$@" \
    || return
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
}

mkdir -p "$out"
if [ "$mode" = gpu ]; then
  shopt -s nullglob
  carried=("$wheels"/*.whl)
  if [ ${#carried[@]} -eq 0 ]; then
    echo "gpu_suite: error: no wheels in $wheels/: run the pip download line of bench/README.md first" >&2
    exit 2
  fi
  echo "gpu_suite: installing $(du -sh "$wheels" | cut -f1) of wheels: ${carried[*]##*/}"
  install_wheels "${carried[@]}" || { echo "gpu_suite: error: the wheel install failed" >&2; exit 2; }
else
  # Rehearsal: the environment has everything but TRL (not a project dependency). Install
  # TRL from the carried wheel when it is here (offline, a few seconds, the same pip line as
  # on the GPU); without it (CI) the TRL baseline is recorded as skipped with the reason.
  if ! "$python" -c "import trl" 2>/dev/null; then
    shopt -s nullglob
    trl_wheel=("$wheels"/trl-*.whl)
    if [ ${#trl_wheel[@]} -gt 0 ]; then
      echo "gpu_suite: rehearsal: installing ${trl_wheel[0]##*/} into $site"
      install_wheels "${trl_wheel[0]}" || echo "gpu_suite: rehearsal: TRL install failed; its row will say skipped"
    else
      echo "gpu_suite: rehearsal: no TRL and no $wheels/trl-*.whl; the TRL baseline will be skipped"
    fi
  fi
fi

"$python" bench/gpu_suite.py --mode "$mode" --out-dir "$out" --started-at "$started_at" --python "$python" "$@"
