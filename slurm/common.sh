# shellcheck shell=bash
# Shared launch logic of slurm/*.sh (sourced, not run). The calling script has set STAGE,
# SCRIPT_PATH, GAZAL_ROOT and its configuration block (RECIPE, OVERRIDES, CONTAINER_IMAGE,
# CONTAINER_MOUNTS, HF_MODEL_DIR, OUTPUT_DIR, DATA_OVERRIDES, VENV); `gazal_launch "$@"`
# does the rest (its arguments are more recipe overrides):
#
#   1. work out the layout: nodes and tasks per node from Slurm (or, outside Slurm, from
#      the script's own #SBATCH header and $NODES), one task per GPU;
#   2. export the rendezvous and the NCCL/CUDA environment every rank needs;
#   3. DRY_RUN=1: print the srun line and validate the recipe for that world size with
#      `gazal <stage> --dry-run` in one process (no GPU touched); otherwise srun it.
#
# Each rank finds its place from SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID
# (gazal_nemo/parallel.py launch_env), so there is no torchrun in between.

_say() { echo "gazal-slurm: $*"; }
_die() { echo "gazal-slurm: ERROR: $*" >&2; exit 1; }

# The words as one copy-pasteable line, quoting only those that need it.
_shell_words() {
    local word line=""
    for word in "$@"; do
        [[ "$word" =~ ^[A-Za-z0-9_./=:,+@%-]+$ ]] || word=${word@Q}
        line+="$word "
    done
    echo "${line% }"
}

# Value of `#SBATCH --<option>=N` in the calling script (the defaults outside Slurm).
_header_value() {
    sed -n "s/^#SBATCH --$1=\([0-9][0-9]*\).*/\1/p" "$SCRIPT_PATH" | head -n1
}

# Sets NUM_NODES, TASKS_PER_NODE, NUM_TASKS.
_resolve_layout() {
    if [[ -n "${SLURM_JOB_ID:-}" ]]; then
        NUM_NODES=$SLURM_JOB_NUM_NODES
        # SLURM_NTASKS_PER_NODE is set when --ntasks-per-node was asked for (our header does).
        TASKS_PER_NODE=${SLURM_NTASKS_PER_NODE:-$((SLURM_NTASKS / SLURM_JOB_NUM_NODES))}
    else
        NUM_NODES=${NODES:-$(_header_value nodes)}
        TASKS_PER_NODE=${TASKS_PER_NODE:-$(_header_value ntasks-per-node)}
    fi
    [[ "$NUM_NODES" =~ ^[1-9][0-9]*$ ]] || _die "cannot tell the number of nodes (got '$NUM_NODES')"
    [[ "$TASKS_PER_NODE" =~ ^[1-9][0-9]*$ ]] || _die "cannot tell the tasks per node (got '$TASKS_PER_NODE')"
    NUM_TASKS=$((NUM_NODES * TASKS_PER_NODE))
}

_export_rendezvous() {
    if [[ -n "${SLURM_JOB_ID:-}" ]]; then
        # torch.distributed's TCP store lives on global rank 0, which Slurm puts on the
        # first node of the allocation.
        MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
        # One port per job, so two jobs sharing a node do not collide (range 20000-59999).
        MASTER_PORT=$((20000 + SLURM_JOB_ID % 40000))
    else
        MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
        MASTER_PORT=${MASTER_PORT:-29500}
    fi
    export MASTER_ADDR MASTER_PORT
}

_export_runtime_env() {
    # Megatron's tensor-parallel comm/compute overlap relies on kernels running in launch
    # order, which only holds with a single hardware work queue per device.
    export CUDA_DEVICE_MAX_CONNECTIONS=1
    # One OpenMP pool per rank sized to its CPUs; torch's default (all cores in every one
    # of 8 ranks) oversubscribes the node and slows the dataloader and CPU-side ops.
    export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-${OMP_NUM_THREADS:-1}}
    # A failed or timed-out collective aborts the process instead of leaving the other
    # ranks blocked until the job's time limit (explicit: torch's default changed over versions).
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
    # Free async-collective buffers by event rather than by caching-allocator stream
    # bookkeeping: less peak memory with the distributed optimizer's overlapped all-gathers.
    export TORCH_NCCL_AVOID_RECORD_STREAMS=1
    # Print NCCL's own warnings (wrong interface, IB errors) into the job log; use INFO to
    # debug a hang or a slow all-reduce.
    export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
    # InfiniBand retry timeout 4.096 us * 2^22 (~17 s) instead of NCCL's 2^18 (~1 s): rides
    # out the link flaps and switch reroutes that otherwise kill long multi-node runs.
    export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}
    # Log lines reach the output file when printed, so a crash shows its last step.
    export PYTHONUNBUFFERED=1
    # HF tokenizers' thread pool does not survive fork (dataloader workers): disable it.
    export TOKENIZERS_PARALLELISM=false
    # Compute nodes usually have no internet: read models and data from local folders.
    export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
    # Cluster-specific, from the configuration block when set: the NIC for NCCL's bootstrap
    # and socket traffic (e.g. ib0, or ^lo,docker to exclude), and which IB HCAs to use.
    if [[ -n "${NCCL_SOCKET_IFNAME:-}" ]]; then export NCCL_SOCKET_IFNAME; fi
    if [[ -n "${NCCL_IB_HCA:-}" ]]; then export NCCL_IB_HCA; fi
    if [[ "${GAZAL_DEVICE:-cuda}" == cpu ]]; then
        # CPU run (tests, CI): hide any GPU so every rank takes the gloo path.
        export CUDA_VISIBLE_DEVICES=""
    fi
}

# Refuses to start a GPU job on a node without enough GPUs (before srun fans it out).
_check_gpus() {
    if [[ "${GAZAL_DEVICE:-cuda}" == cpu ]]; then return 0; fi
    local count=0
    if command -v nvidia-smi >/dev/null; then
        count=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    fi
    if ((count < TASKS_PER_NODE)); then
        _die "found $count GPU(s) on $(hostname) but this job runs $TASKS_PER_NODE tasks per node (one per GPU);" \
             "ask for --gpus-per-node=$TASKS_PER_NODE, or set GAZAL_DEVICE=cpu for a CPU run, or DRY_RUN=1 to only validate"
    fi
}

_activate_venv() {
    # In a job with a container the image brings its own Python (a dry run outside Slurm
    # still validates with the host's).
    if [[ -n "${CONTAINER_IMAGE:-}" && -n "${SLURM_JOB_ID:-}" ]]; then return 0; fi
    if [[ -n "${VENV:-}" && -f "$VENV/bin/activate" ]]; then
        set +u   # activate reads unset variables
        # shellcheck disable=SC1091
        source "$VENV/bin/activate"
        set -u
        _say "python from $VENV"
    elif [[ -n "${VENV:-}" ]]; then
        _say "no virtualenv at $VENV; using $(command -v python || echo 'no python on PATH')"
    fi
}

# The stage command: GAZAL_CMD (program, stage, recipe) and STAGE_OVERRIDES (the paths of
# the configuration block first, then the user's overrides, so the user's win).
_build_stage_command() {
    local path_overrides=()
    if [[ -n "${HF_MODEL_DIR:-}" ]]; then path_overrides+=("model.hf_path=$HF_MODEL_DIR"); fi
    if [[ -n "${OUTPUT_DIR:-}" ]]; then
        path_overrides+=("checkpoint.dir=$OUTPUT_DIR/checkpoints" "logging.dir=$OUTPUT_DIR/logs"
                         "export_dir=$OUTPUT_DIR/export")
    fi
    path_overrides+=(${DATA_OVERRIDES[@]+"${DATA_OVERRIDES[@]}"})
    # OVERRIDES (split on spaces) then the script's own arguments (`sbatch x.sh k=v ...`).
    local user_overrides=()
    read -r -a user_overrides <<<"${OVERRIDES:-}"
    user_overrides+=("$@")
    # `python -m` from the repository root runs this checkout's code (also inside a
    # container, where the checkout is mounted), whatever version is installed.
    local python=${PYTHON:-python}
    if ! command -v "$python" >/dev/null && command -v python3 >/dev/null; then python=python3; fi
    GAZAL_CMD=("$python" -m gazal_nemo.cli "$STAGE" --recipe "$RECIPE")
    STAGE_OVERRIDES=(${path_overrides[@]+"${path_overrides[@]}"} ${user_overrides[@]+"${user_overrides[@]}"})
}

# pyxis/enroot flags (CONTAINER_ARGS, empty without an image): the checkout is mounted at
# the same path and is the working directory, so recipes and relative paths resolve alike.
_container_args() {
    CONTAINER_ARGS=()
    if [[ -n "${CONTAINER_IMAGE:-}" ]]; then
        CONTAINER_ARGS=(--container-image="$CONTAINER_IMAGE"
                        --container-mounts="$GAZAL_ROOT:$GAZAL_ROOT${CONTAINER_MOUNTS:+,$CONTAINER_MOUNTS}"
                        --container-workdir="$GAZAL_ROOT")
    fi
}

_build_srun_command() {
    SRUN_CMD=(srun
        --nodes="$NUM_NODES" --ntasks="$NUM_TASKS" --ntasks-per-node="$TASKS_PER_NODE"
        # One rank failing ends the step, instead of the others waiting in a collective.
        --kill-on-bad-exit=1
        # Prefix each output line with its rank (tracebacks say which rank failed).
        --label)
    # Slurm >= 22.05 steps no longer inherit --cpus-per-task from the job.
    if [[ -n "${SLURM_CPUS_PER_TASK:-}" ]]; then SRUN_CMD+=(--cpus-per-task="$SLURM_CPUS_PER_TASK"); fi
    SRUN_CMD+=(${CONTAINER_ARGS[@]+"${CONTAINER_ARGS[@]}"})
    # Each rank says where it landed before it starts (placement check in the log).
    # (single quotes: expanded by each rank's shell, not here)
    # shellcheck disable=SC2016
    SRUN_CMD+=(bash -c 'echo "rank $SLURM_PROCID/$SLURM_NTASKS on $(hostname) local_rank $SLURM_LOCALID"; exec "$@"'
               gazal-rank "${GAZAL_CMD[@]}" ${STAGE_OVERRIDES[@]+"${STAGE_OVERRIDES[@]}"})
}

_dry_run() {
    _say "DRY_RUN=1: this job would run ($NUM_NODES node(s) x $TASKS_PER_NODE tasks = world size $NUM_TASKS):"
    echo "  MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT"
    echo "  $(_shell_words "${SRUN_CMD[@]}")"
    _say "validating the recipe for world size $NUM_TASKS (one process, no GPU)"
    # RANK/WORLD_SIZE win over the SLURM_* variables in launch_env, so this one process
    # checks the layout of the whole job.
    local check=(env RANK=0 LOCAL_RANK=0 WORLD_SIZE="$NUM_TASKS" CUDA_VISIBLE_DEVICES=
               "${GAZAL_CMD[@]}" --dry-run ${STAGE_OVERRIDES[@]+"${STAGE_OVERRIDES[@]}"})
    if [[ -n "${SLURM_JOB_ID:-}" && -n "${CONTAINER_IMAGE:-}" ]]; then
        check=(srun --nodes=1 --ntasks=1 "${CONTAINER_ARGS[@]}" "${check[@]}")
    fi
    "${check[@]}" || _die "recipe $RECIPE does not validate for world size $NUM_TASKS (see the error above)"
    _say "dry run OK"
}

gazal_launch() {
    set -euo pipefail
    cd "$GAZAL_ROOT"
    _resolve_layout
    _export_rendezvous
    _export_runtime_env
    _activate_venv
    _build_stage_command "$@"
    _container_args
    _build_srun_command
    if [[ "${DRY_RUN:-0}" == 1 ]]; then
        _dry_run
        return 0
    fi
    [[ -n "${SLURM_JOB_ID:-}" ]] || _die "not inside a Slurm job: submit with sbatch, or set DRY_RUN=1 to only validate"
    _check_gpus
    _say "job $SLURM_JOB_ID: $NUM_NODES node(s) x $TASKS_PER_NODE tasks, world size $NUM_TASKS," \
         "master $MASTER_ADDR:$MASTER_PORT, device ${GAZAL_DEVICE:-cuda}"
    echo "  $(_shell_words "${SRUN_CMD[@]}")"
    "${SRUN_CMD[@]}"
}
