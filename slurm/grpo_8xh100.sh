#!/bin/bash
# Gazal-R1 stage 2: GRPO of the SFT-merged Qwen3-32B (recipes/grpo_qwen3_32b.yaml, TP=8)
# on one 8x H100 node; more nodes add data-parallel replicas:
#
#   sbatch slurm/grpo_8xh100.sh                       # 1 node, 8 ranks
#   sbatch --nodes=2 slurm/grpo_8xh100.sh             # 2 nodes, 16 ranks (dp=2)
#   DRY_RUN=1 bash slurm/grpo_8xh100.sh               # print the srun line, validate the recipe; no GPU
#   sbatch slurm/grpo_8xh100.sh train.max_steps=20   # arguments are recipe overrides
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
OUTPUT_DIR="${OUTPUT_DIR:-}"                       # checkpoints/, logs/ and export/ go under it
GRPO_DATA="${GRPO_DATA:-}"                         # grpo.data.path: MCQ prompts (.jsonl/.parquet file or folder)
VENV="${VENV:-}"                                   # virtualenv to activate; empty: <repo>/.venv if it exists
# Runtime switches: DRY_RUN=1 validates only; GAZAL_DEVICE=cpu runs on CPUs with gloo (tests).
# Multi-node NCCL on your fabric, if needed: NCCL_SOCKET_IFNAME=ib0, NCCL_IB_HCA=mlx5.
# ================================================================================

STAGE=grpo
DATA_OVERRIDES=(${GRPO_DATA:+"grpo.data.path=$GRPO_DATA"})
# sbatch runs a spooled copy of this file: find the checkout from the submitted path
# (or set GAZAL_ROOT when submitting a copy of this script kept elsewhere).
SCRIPT_PATH=${BASH_SOURCE[0]}
if [[ -n "${SLURM_JOB_ID:-}" && ! -f "$(dirname "$SCRIPT_PATH")/common.sh" ]]; then
    SCRIPT_PATH=$(scontrol show job "$SLURM_JOB_ID" | sed -n 's/^ *Command=\([^ ]*\).*/\1/p')
fi
GAZAL_ROOT="${GAZAL_ROOT:-$(cd "$(dirname "$SCRIPT_PATH")/.." && pwd)}"
VENV="${VENV:-$GAZAL_ROOT/.venv}"
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$GAZAL_ROOT/slurm/common.sh"
gazal_launch "$@"
