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
# 15 min before the time limit USR1 reaches this shell, which stops the ranks after their
# step, with a checkpoint, and requeues the job. 900 s covers one step in flight (128 x
# 8192 tokens with full recompute is ~2e17 FLOP: ~5 min at 40% of 2 H100s' bf16 peak), the
# adapter checkpoint (~2.2B trainable params x 14 bytes = 30 GB: ~1 min at 0.5 GB/s) and
# Slurm's up to 60 s early signal, with room to spare. An estimate, not a measurement:
# change it per job with `sbatch --signal=B:USR1@SECONDS` or SBATCH_SIGNAL=B:USR1@SECONDS
# in sbatch's environment (both override this line).
#SBATCH --signal=B:USR1@900
#SBATCH --requeue
# A requeued job appends to its log instead of truncating it.
#SBATCH --open-mode=append
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
# checkpoints/, logs/ and export/ go under OUTPUT_DIR; %j is the job id, %x the job name.
# Empty: runs/%x-%j in the checkout for a job (a requeued job keeps its id and resumes there).
OUTPUT_DIR="${OUTPUT_DIR:-}"
SFT_DATA_SYNTHETIC="${SFT_DATA_SYNTHETIC:-}"           # sft_data.sources.0.path: the paper's synthetic set
SFT_DATA_MEDREASON="${SFT_DATA_MEDREASON:-}"           # sft_data.sources.1.path: MedReason rows
VENV="${VENV:-}"                                       # virtualenv to activate; empty: <repo>/.venv if it exists
# Runtime switches: DRY_RUN=1 validates only; GAZAL_DEVICE=cpu runs on CPUs with gloo (tests).
# Multi-node NCCL on your fabric, if needed: NCCL_SOCKET_IFNAME=ib0, NCCL_IB_HCA=mlx5.
# ================================================================================

STAGE=sft
DATA_OVERRIDES=(${SFT_DATA_SYNTHETIC:+"sft_data.sources.0.path=$SFT_DATA_SYNTHETIC"}
                ${SFT_DATA_MEDREASON:+"sft_data.sources.1.path=$SFT_DATA_MEDREASON"})
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
