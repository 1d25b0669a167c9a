#!/bin/bash
# Gazal-R1 evaluation (the paper's Table 2: MedQA, MedMCQA, PubMedQA, MMLU-Pro medical) of a
# 32B model on one 8x H100 node: `gazal eval` on the megatron engine at TP=8 (batched
# KV-cache decoding, greedy, 4096 new tokens), results beside the paper's numbers:
#
#   MODEL=runs/grpo/export/merged sbatch slurm/eval_8xh100.sh
#   MODEL=runs/sft/export/adapter BASE=/models/Qwen3-32B sbatch slurm/eval_8xh100.sh   # PEFT adapter
#   MODEL=runs/grpo/export/megatron DRY_RUN=1 bash slurm/eval_8xh100.sh   # check data, model, layout; no GPU
#   sbatch slurm/eval_8xh100.sh --limit 100 --permutations 4   # arguments are more `gazal eval` flags
#
# A job that ends early (time limit, preemption) keeps its predictions: resubmit with the
# same OUTPUT_DIR and it generates only the questions still missing.
#SBATCH --job-name=gazal-eval
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=12:00:00
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out

# ============================ configuration =====================================
# Each value can also be set in the environment of `sbatch` (sbatch exports it).
MODEL="${MODEL:-}"                                 # HF folder, PEFT adapter, megatron or step checkpoint
BASE="${BASE:-}"                                   # base of an adapter (empty: its base_model_name_or_path)
# One file (or hub id) per benchmark, in the order of BENCHMARKS, comma-separated.
BENCHMARKS="${BENCHMARKS:-medqa,medmcqa,pubmedqa,mmlu_pro_medical}"
DATA="${DATA:-data/medqa_test.jsonl,data/medmcqa_validation.parquet,data/ori_pqal.json,data/mmlu_pro_test.parquet}"
ENGINE="${ENGINE:-megatron}"                       # megatron (TP over the job's ranks) or vllm (one task)
EVAL_ARGS="${EVAL_ARGS:-}"                         # extra flags, space-separated: "--max-new-tokens 8192"
CONTAINER_IMAGE="${CONTAINER_IMAGE:-}"             # enroot/pyxis image with the dependencies; empty: host
CONTAINER_MOUNTS="${CONTAINER_MOUNTS:-}"           # extra src:dst[,src:dst] mounts (data, models)
# predictions.jsonl, results.md/json go under OUTPUT_DIR; %j is the job id, %x the job name.
# Empty: runs/%x-%j in the checkout.
OUTPUT_DIR="${OUTPUT_DIR:-}"
VENV="${VENV:-}"                                   # virtualenv to activate; empty: <repo>/.venv if it exists
# Runtime switches: DRY_RUN=1 validates only; GAZAL_DEVICE=cpu runs on CPUs with gloo (tests).
# ================================================================================

STAGE=eval
RECIPE=""   # evaluation takes flags, not a recipe
# sbatch runs a spooled copy of this file, so the checkout is, in order: GAZAL_ROOT; the
# submit directory when it is a checkout; the folder above the submitted script.
SCRIPT_PATH=${BASH_SOURCE[0]}
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
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$GAZAL_ROOT/slurm/common.sh"

# common.sh builds `gazal <stage> --recipe ... key=value`; evaluation is `gazal eval --flags`,
# so this script supplies the command (same contract: GAZAL_CMD and STAGE_OVERRIDES, the
# script's arguments last so they win) and common.sh does the layout, environment and srun.
_build_stage_command() {
    [[ -n "${MODEL:-}" ]] || _die "set MODEL (HF folder, adapter, megatron or step checkpoint)"
    [[ -n "${OUTPUT_DIR:-}" ]] || OUTPUT_DIR="$GAZAL_ROOT/runs/gazal-eval-dry-run"
    local python=${PYTHON:-python}
    if ! command -v "$python" >/dev/null && command -v python3 >/dev/null; then python=python3; fi
    local tp=$NUM_TASKS
    if [[ "$ENGINE" == vllm ]]; then
        # vLLM starts its own tensor-parallel workers on the node's GPUs: one task drives them.
        tp=$((NUM_NODES * TASKS_PER_NODE)); NUM_TASKS=1; TASKS_PER_NODE=1
    fi
    GAZAL_CMD=("$python" -m gazal_nemo.cli eval --model "$MODEL" ${BASE:+--base "$BASE"}
               --benchmarks "$BENCHMARKS" --data "$DATA" --engine "$ENGINE" --tp "$tp" --out "$OUTPUT_DIR")
    local extra=()
    read -r -a extra <<<"${EVAL_ARGS:-}"
    STAGE_OVERRIDES=(${extra[@]+"${extra[@]}"} "$@")
}
gazal_launch "$@"
