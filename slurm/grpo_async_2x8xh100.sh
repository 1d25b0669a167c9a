#!/bin/bash
# Gazal-R1 stage 2 with asynchronous rollouts on two 8x H100 nodes: node 1 trains (ranks 0-7,
# recipes/grpo_qwen3_32b.yaml at TP=8, the whole GPU for the trainer), node 2 generates (ranks
# 8-15: four vLLM replicas at TP=2) while the trainer trains (docs/GRPO.md#asynchronous-rollouts).
#
#   sbatch slurm/grpo_async_2x8xh100.sh                       # 2 nodes: 8 train, 8 generate
#   GENERATOR_RANKS=16 sbatch --nodes=4 slurm/grpo_async_2x8xh100.sh     # 2 nodes train, 2 generate
#   DRY_RUN=1 bash slurm/grpo_async_2x8xh100.sh               # validate both sides; no GPU
#
# `gazal plan --recipe recipes/grpo_qwen3_32b.yaml --nodes 2 grpo.rollout.mode=async
# grpo.rollout.generator_ranks=8 grpo.rollout.generator_tp=2 ...` prints both sides' memory.
#SBATCH --job-name=gazal-grpo-async
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=48:00:00
# USR1 before the time limit: the trainer ranks finish their step, save and exit 75 (the
# generators stop with them), and the job is requeued; see slurm/grpo_8xh100.sh for the lead.
#SBATCH --signal=B:USR1@2400
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out

# ============================ configuration =====================================
# Each value can also be set in the environment of `sbatch` (sbatch exports it).
RECIPE="${RECIPE:-recipes/grpo_qwen3_32b.yaml}"   # relative to the repository root
# Extra dotted overrides, space-separated; they win over the split below.
OVERRIDES="${OVERRIDES:-}"
# The split: the job's last GENERATOR_RANKS ranks generate with vLLM (GENERATOR_TP GPUs a
# replica), the others train. A sample may come from weights up to MAX_STALENESS steps old;
# each token is weighted by min(pi_trainer / pi_sampler, TIS_CAP) (the sampler's log-probs are
# under the filtered top-k/top-p distribution, so the trainer's must be too: train_logprobs=filtered).
GENERATOR_RANKS="${GENERATOR_RANKS:-8}"
GENERATOR_TP="${GENERATOR_TP:-2}"
MAX_STALENESS="${MAX_STALENESS:-1}"
TIS_CAP="${TIS_CAP:-2}"
# Enroot/pyxis image with the dependencies (torch, megatron-core, TE, vLLM); the checkout is
# mounted and run from it. Empty: run on the host.
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
DATA_OVERRIDES=(${GRPO_DATA:+"grpo.data.path=$GRPO_DATA"}
                "grpo.rollout.engine=vllm" "grpo.rollout.mode=async" "grpo.rollout.generator_ranks=$GENERATOR_RANKS"
                "grpo.rollout.generator_tp=$GENERATOR_TP" "grpo.rollout.max_staleness=$MAX_STALENESS"
                "grpo.loss.tis_cap=$TIS_CAP" "grpo.sampling.train_logprobs=filtered"
                "grpo.rollout.vllm.gpu_memory_utilization=0.85")
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
