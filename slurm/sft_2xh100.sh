#!/bin/bash
# Gazal-R1 stage 1: DoRA + rsLoRA SFT of Qwen3-32B (recipes/sft_qwen3_32b_dora.yaml, TP=2)
# on 2 H100s; more nodes add data-parallel replicas:
#
#   sbatch slurm/sft_2xh100.sh                        # 1 node, 2 ranks
#   sbatch --nodes=2 slurm/sft_2xh100.sh              # 2 nodes, 4 ranks (dp=2)
#   DRY_RUN=1 bash slurm/sft_2xh100.sh                # print the srun line, validate the recipe; no GPU
#   HF_MODEL_DIR=/models/Qwen3-32B OUTPUT_DIR=/scratch/sft sbatch slurm/sft_2xh100.sh
#
# See slurm/README.md for the configuration variables and the CPU test path.
#SBATCH --job-name=gazal-sft
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=2
#SBATCH --gpus-per-node=2
#SBATCH --cpus-per-task=8
#SBATCH --mem=256G
#SBATCH --time=48:00:00
#SBATCH --output=%x-%j.out

# ============================ configuration =====================================
# Each value can also be set in the environment of `sbatch` (sbatch exports it).
RECIPE="${RECIPE:-recipes/sft_qwen3_32b_dora.yaml}"   # relative to the repository root
# Extra dotted overrides, space-separated: "train.max_steps=100 adapter.rank=128".
OVERRIDES="${OVERRIDES:-}"
# Enroot/pyxis image with the dependencies (torch, megatron-core, TE); the checkout is mounted
# and run from it. Empty: run on the host.
CONTAINER_IMAGE="${CONTAINER_IMAGE:-}"
CONTAINER_MOUNTS="${CONTAINER_MOUNTS:-}"               # extra src:dst[,src:dst] mounts (data, models)
# Paths (empty: the recipe's own value).
HF_MODEL_DIR="${HF_MODEL_DIR:-}"                       # model.hf_path: local Qwen3-32B HF folder
OUTPUT_DIR="${OUTPUT_DIR:-}"                           # checkpoints/, logs/ and export/ go under it
SFT_DATA_SYNTHETIC="${SFT_DATA_SYNTHETIC:-}"           # sft_data.sources.0.path: the paper's synthetic set
SFT_DATA_MEDREASON="${SFT_DATA_MEDREASON:-}"           # sft_data.sources.1.path: MedReason rows
VENV="${VENV:-}"                                       # virtualenv to activate; empty: <repo>/.venv if it exists
# Runtime switches: DRY_RUN=1 validates only; GAZAL_DEVICE=cpu runs on CPUs with gloo (tests).
# Multi-node NCCL on your fabric, if needed: NCCL_SOCKET_IFNAME=ib0, NCCL_IB_HCA=mlx5.
# ================================================================================

STAGE=sft
DATA_OVERRIDES=(${SFT_DATA_SYNTHETIC:+"sft_data.sources.0.path=$SFT_DATA_SYNTHETIC"}
                ${SFT_DATA_MEDREASON:+"sft_data.sources.1.path=$SFT_DATA_MEDREASON"})
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
