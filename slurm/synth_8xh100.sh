#!/bin/bash
# Gazal-R1 SFT data: the paper's structured clinical-reasoning dataset (section 3.1.1,
# recipes/synth_structured_medical.yaml) from a teacher served by offline vLLM replicas: one
# replica per TP group of GPUs (8/TP per node), every replica a shard of the run's chunks.
# After the replicas are done, one process writes the dataset, rejects and report (--finalize).
#
#   HF_MODEL_DIR=/models/gemma-3-27b-it sbatch slurm/synth_8xh100.sh       # 1 node: 4 replicas of TP=2
#   sbatch --nodes=4 slurm/synth_8xh100.sh                                  # 16 replicas
#   TP=8 sbatch slurm/synth_8xh100.sh                                       # one TP=8 replica per node
#   DRY_RUN=1 bash slurm/synth_8xh100.sh                                    # print the srun line, validate; no GPU
#   sbatch slurm/synth_8xh100.sh num_examples=2000                          # arguments are recipe overrides
#
# A replica is a shard: `gazal synth` reads SLURM_PROCID/SLURM_NTASKS and generates the chunks
# c with c % NTASKS == PROCID; finished chunks survive anything (kill -9 included), so a
# requeued or resubmitted job with the same OUTPUT_DIR generates only what is missing, with
# any number of nodes. No process group spans replicas: nothing to rendezvous.
#
# See slurm/README.md for the variables shared with the training scripts, docs/SYNTH.md for the run.
#SBATCH --job-name=gazal-synth
#SBATCH --nodes=1
# 8 task slots of 8 CPUs: the srun below lays out 8/TP replicas of 8*TP CPUs in them.
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=24:00:00
# 2 min before the time limit USR1 reaches this shell, which requeues the job at once: the
# finished chunks are its checkpoints (a chunk in flight, <= chunk_size examples per replica,
# is generated again), so nothing needs to be saved first.
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
# A requeued job appends to its log instead of truncating it.
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out

# ============================ configuration =====================================
# Each value can also be set in the environment of `sbatch` (sbatch exports it).
RECIPE="${RECIPE:-recipes/synth_structured_medical.yaml}"   # relative to the repository root
# Extra dotted overrides, space-separated: "num_examples=5000 validation.max_retries=1".
OVERRIDES="${OVERRIDES:-}"
# GPUs per vLLM replica (generator.tp): a 27B teacher in bf16 fits TP=2 with room for its KV
# cache, and 4 independent replicas a node generate more than one TP=8 replica (no all-reduce
# per token). Must divide GPUS_PER_NODE.
TP="${TP:-2}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"                 # keep equal to --gpus-per-node
# Enroot/pyxis image with the dependencies (torch, vLLM); the checkout is mounted and run from
# it. Empty: run on the host.
CONTAINER_IMAGE="${CONTAINER_IMAGE:-}"
CONTAINER_MOUNTS="${CONTAINER_MOUNTS:-}"           # extra src:dst[,src:dst] mounts (models, benchmarks)
HF_MODEL_DIR="${HF_MODEL_DIR:-}"                   # generator.model: the teacher's HF folder (empty: the recipe's)
# The run folder (output_dir); %j is the job id, %x the job name. Empty: runs/%x-%j in the
# checkout for a job (a requeued job keeps its id and resumes there); to continue a run in a
# new job, pass its folder.
OUTPUT_DIR="${OUTPUT_DIR:-}"
VENV="${VENV:-}"                                   # virtualenv to activate; empty: <repo>/.venv if it exists
# Runtime switches: DRY_RUN=1 validates only; GAZAL_DEVICE=cpu runs the replicas on CPUs (tests).
# ================================================================================

STAGE=synth
SCRIPT_PATH=${BASH_SOURCE[0]}
# The checkout, found as slurm/grpo_8xh100.sh finds it (GAZAL_ROOT, the submit directory, the
# submitted script's folder).
if [[ -z "${GAZAL_ROOT:-}" && -f "${SLURM_SUBMIT_DIR:-/nonexistent}/slurm/common.sh" ]]; then
    GAZAL_ROOT=$SLURM_SUBMIT_DIR
elif [[ -z "${GAZAL_ROOT:-}" ]]; then
    submitted=$SCRIPT_PATH
    if [[ -n "${SLURM_JOB_ID:-}" ]]; then
        submitted=$(scontrol show job "$SLURM_JOB_ID" | sed -n 's/^ *Command=\([^ ]*\).*/\1/p')
        [[ "$submitted" == /* ]] || submitted="${SLURM_SUBMIT_DIR:-.}/$submitted"
    fi
    GAZAL_ROOT=$(cd "$(dirname "$submitted")/.." 2>/dev/null && pwd || echo "${submitted%/*}/..")
fi
if [[ ! -f "$GAZAL_ROOT/slurm/common.sh" ]]; then
    echo "gazal-slurm: ERROR: no checkout at '$GAZAL_ROOT' (no slurm/common.sh); submit from the" \
         "checkout or set GAZAL_ROOT=/path/to/gazal-nemo" >&2
    exit 1
fi
VENV="${VENV:-$GAZAL_ROOT/.venv}"
# Helpers only (_say, _die, _shell_words, _export_runtime_env, _activate_venv, _container_args,
# _resolve_output_dir, _mark_start): the training launch (gazal_launch) is not used.
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$GAZAL_ROOT/slurm/common.sh"

# Sets NUM_NODES, REPLICAS_PER_NODE (= TASKS_PER_NODE, read by _export_runtime_env), NUM_TASKS.
_synth_layout() {
    [[ "$TP" =~ ^[1-9][0-9]*$ && "$GPUS_PER_NODE" =~ ^[1-9][0-9]*$ ]] || _die "TP=$TP and GPUS_PER_NODE=$GPUS_PER_NODE must be positive integers"
    ((GPUS_PER_NODE % TP == 0)) || _die "TP=$TP does not divide GPUS_PER_NODE=$GPUS_PER_NODE; allowed: 1, 2, 4, 8"
    if [[ -n "${SLURM_JOB_ID:-}" ]]; then
        NUM_NODES=$SLURM_JOB_NUM_NODES
    else
        NUM_NODES=${NODES:-$(_header_value nodes)}
    fi
    [[ "$NUM_NODES" =~ ^[1-9][0-9]*$ ]] || _die "cannot tell the number of nodes (got '$NUM_NODES')"
    REPLICAS_PER_NODE=$((GPUS_PER_NODE / TP))
    TASKS_PER_NODE=$REPLICAS_PER_NODE
    NUM_TASKS=$((NUM_NODES * REPLICAS_PER_NODE))
    # CPUs of a replica: the node's task slots shared among its replicas.
    CPUS_PER_REPLICA=$(( ${SLURM_CPUS_ON_NODE:-$(( $(_header_value ntasks-per-node) * $(_header_value cpus-per-task) ))} / REPLICAS_PER_NODE ))
}

# GAZAL_CMD: the synth command with the configuration block's paths, then the user's overrides.
_synth_command() {
    local python=${PYTHON:-python}
    if ! command -v "$python" >/dev/null && command -v python3 >/dev/null; then python=python3; fi
    local overrides=("generator.tp=$TP")
    if [[ -n "$HF_MODEL_DIR" ]]; then overrides+=("generator.model=$HF_MODEL_DIR"); fi
    if [[ -n "${OUTPUT_DIR:-}" ]]; then overrides+=("output_dir=$OUTPUT_DIR"); fi
    local user=()
    read -r -a user <<<"${OVERRIDES:-}"
    GAZAL_CMD=("$python" -m gazal_nemo.cli synth --recipe "$RECIPE" "${overrides[@]}" ${user[@]+"${user[@]}"} "$@")
}

_synth_srun() {
    SRUN_CMD=(srun --nodes="$NUM_NODES" --ntasks="$NUM_TASKS" --ntasks-per-node="$REPLICAS_PER_NODE"
              --cpus-per-task="$CPUS_PER_REPLICA"
              # A replica that fails (out of memory, a bad node) must not end the others: its
              # chunks stay to be generated by the next job.
              --kill-on-bad-exit=0 --label ${CONTAINER_ARGS[@]+"${CONTAINER_ARGS[@]}"})
    # Each replica sees its own TP group's GPUs: local task i gets GPUs i*TP .. i*TP+TP-1
    # (single quotes: expanded by each task's shell). On CPU every GPU stays hidden.
    # shellcheck disable=SC2016
    SRUN_CMD+=(bash -c 'if [[ "${GAZAL_DEVICE:-cuda}" != cpu ]]; then
                            first=$((SLURM_LOCALID * GAZAL_TP))
                            export CUDA_VISIBLE_DEVICES=$(seq -s, "$first" $((first + GAZAL_TP - 1)))
                        fi
                        echo "replica $SLURM_PROCID/$SLURM_NTASKS on $(hostname) GPUs ${CUDA_VISIBLE_DEVICES:-none}"
                        exec "$@"' gazal-replica "${GAZAL_CMD[@]}")
}

_synth_dry_run() {
    _say "DRY_RUN=1: this job would run ($NUM_NODES node(s) x $REPLICAS_PER_NODE vLLM replicas of TP=$TP =" \
         "$NUM_TASKS shards):"
    echo "  $(_shell_words "${SRUN_CMD[@]}")"
    echo "  then: $(_shell_words "${GAZAL_CMD[@]}" --finalize)"
    _say "validating the recipe for $NUM_TASKS shards (one process, no GPU); the plan is shard 0's"
    env -u SLURM_PROCID -u SLURM_NTASKS RANK=0 WORLD_SIZE="$NUM_TASKS" CUDA_VISIBLE_DEVICES= \
        "${GAZAL_CMD[@]}" --dry-run || _die "recipe $RECIPE does not validate (see the error above)"
    _say "dry run OK"
}

synth_launch() {
    set -euo pipefail
    cd "$GAZAL_ROOT"
    if [[ -n "${SLURM_JOB_ID:-}" && "${DRY_RUN:-0}" != 1 ]]; then _mark_start; fi
    _synth_layout
    _resolve_output_dir
    _export_runtime_env
    export GAZAL_TP=$TP
    _activate_venv
    _synth_command "$@"
    _container_args
    _synth_srun
    if [[ "${DRY_RUN:-0}" == 1 ]]; then
        _synth_dry_run
        return 0
    fi
    [[ -n "${SLURM_JOB_ID:-}" ]] || _die "not inside a Slurm job: submit with sbatch, or set DRY_RUN=1 to only validate"
    if [[ "${GAZAL_DEVICE:-cuda}" != cpu ]]; then
        local count
        count=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
        ((count >= GPUS_PER_NODE)) || _die "found $count GPU(s) on $(hostname), this job needs $GPUS_PER_NODE" \
            "($REPLICAS_PER_NODE replicas of TP=$TP); or GAZAL_DEVICE=cpu, or DRY_RUN=1 to only validate"
    fi
    _say "job $SLURM_JOB_ID: $NUM_NODES node(s) x $REPLICAS_PER_NODE replicas (TP=$TP) = $NUM_TASKS shards," \
         "output ${OUTPUT_DIR:-output_dir of the recipe}"
    echo "  $(_shell_words "${SRUN_CMD[@]}")"
    # The time limit is near: requeue now (srun's replicas are killed; finished chunks stay).
    trap '_say "USR1: requeueing job $SLURM_JOB_ID; it resumes from its finished chunks"; scontrol requeue "$SLURM_JOB_ID"' USR1
    local status=0
    "${SRUN_CMD[@]}" &
    wait $! || status=$?
    trap - USR1
    if ((status != 0)); then
        _say "a replica failed (srun exit $status): resubmit with OUTPUT_DIR=${OUTPUT_DIR:-<the run folder>}" \
             "to generate the chunks it left"
        exit "$status"
    fi
    _say "all replicas done: writing the dataset, rejects and report"
    local finalize=(env -u SLURM_PROCID -u SLURM_NTASKS "${GAZAL_CMD[@]}" --finalize)
    if [[ -n "${CONTAINER_IMAGE:-}" ]]; then
        finalize=(srun --nodes=1 --ntasks=1 "${CONTAINER_ARGS[@]}" "${finalize[@]}")
    fi
    "${finalize[@]}"
}

synth_launch "$@"
