#!/bin/bash
# Gazal-R1 stage 2: GRPO of the SFT-merged Qwen3-32B (recipes/grpo_qwen3_32b.yaml, TP=8)
# on one 8x H100 node; more nodes add data-parallel replicas:
#
#   sbatch slurm/grpo_8xh100.sh                       # 1 node, 8 ranks
#   sbatch --nodes=2 slurm/grpo_8xh100.sh             # 2 nodes, 16 ranks (dp=2)
#   DRY_RUN=1 bash slurm/grpo_8xh100.sh               # print the srun line, validate the recipe; no GPU
#   sbatch slurm/grpo_8xh100.sh train.max_steps=20   # arguments are recipe overrides
#
# The recipe generates with vLLM colocated in the 8 ranks (grpo.rollout.engine=vllm): the
# environment (VENV or CONTAINER_IMAGE) needs `pip install -e ".[te,vllm]"`; DRY_RUN=1 and the
# job's own start-up refuse one without it, naming the extra. vLLM runs inside the training
# processes (its external launcher on the job's process group), so no extra ranks or ports.
#
# See slurm/README.md for the configuration variables and the CPU test path.
#SBATCH --job-name=gazal-grpo
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=48:00:00
# 40 min before the time limit USR1 reaches this shell, which stops the ranks after their
# step, with a checkpoint, and requeues the job. 2400 s covers one step in flight (with the
# vLLM engine a rollout is ~1-2 waves of up to 4096 decode steps, a few minutes; the
# megatron engine's 8 chunks of 16 could take ~20 min; the training pass ~2 min), the
# full-parameter checkpoint (32.8B x 14 bytes = 460 GB: ~8 min at 1 GB/s) and Slurm's up to
# 60 s early signal. An estimate, not a
# measurement: change it per job with `sbatch --signal=B:USR1@SECONDS` or
# SBATCH_SIGNAL=B:USR1@SECONDS in sbatch's environment (both override this line).
#SBATCH --signal=B:USR1@2400
#SBATCH --requeue
# A requeued job appends to its log instead of truncating it.
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out

# ============================ configuration =====================================
# Each value can also be set in the environment of `sbatch` (sbatch exports it).
RECIPE="${RECIPE:-recipes/grpo_qwen3_32b.yaml}"   # relative to the repository root
# Extra dotted overrides, space-separated: "train.max_steps=100 optim.lr=2e-6".
OVERRIDES="${OVERRIDES:-}"
# Enroot/pyxis image with the dependencies (torch, megatron-core, TE); the checkout is mounted
# and run from it. Empty: run on the host.
CONTAINER_IMAGE="${CONTAINER_IMAGE:-}"
CONTAINER_MOUNTS="${CONTAINER_MOUNTS:-}"           # extra src:dst[,src:dst] mounts (data, models)
# Paths (empty: the recipe's own value).
HF_MODEL_DIR="${HF_MODEL_DIR:-}"                   # model.hf_path: the merged SFT model (HF folder)
# checkpoints/, logs/ and export/ go under OUTPUT_DIR; %j is the job id, %x the job name.
# Empty: runs/%x-%j in the checkout for a job (a requeued job keeps its id and resumes there).
OUTPUT_DIR="${OUTPUT_DIR:-}"
GRPO_DATA="${GRPO_DATA:-}"                         # grpo.data.path: MCQ prompts (.jsonl/.parquet file or folder)
VENV="${VENV:-}"                                   # virtualenv to activate; empty: <repo>/.venv if it exists
# Runtime switches: DRY_RUN=1 validates only; GAZAL_DEVICE=cpu runs on CPUs with gloo (tests).
# Multi-node NCCL on your fabric, if needed: NCCL_SOCKET_IFNAME=ib0, NCCL_IB_HCA=mlx5.
# ================================================================================

STAGE=grpo
DATA_OVERRIDES=(${GRPO_DATA:+"grpo.data.path=$GRPO_DATA"})
# sbatch runs a spooled copy of this file, so the checkout is, in order: GAZAL_ROOT; the
# submit directory when it is a checkout (`sbatch < slurm/x.sh`, `sbatch --chdir=...` from
# the checkout); the folder above the submitted script (scontrol's Command=, relative to
# the submit directory).
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
gazal_launch "$@"
