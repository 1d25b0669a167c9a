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
#      `gazal <stage> --dry-run` in one process (no GPU touched); otherwise srun it, and
#   4. stop and requeue: USR1 to this batch shell (the header's `--signal=B:USR1@N` before
#      the time limit, or `scancel --signal=USR1 --batch`) is forwarded to the ranks; ranks
#      that got USR1 or TERM finish their step, write a checkpoint and exit 75
#      (gazal_nemo.training.preemption.REQUEUE_EXIT_CODE), and then this shell requeues the
#      job (`scontrol requeue`): it starts again under the same job id and output folder
#      and resumes from that checkpoint.
#
# Each rank finds its place from SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID
# (gazal_nemo/parallel.py launch_env), so there is no torchrun in between.

# Exit status of ranks that stopped on a signal with a checkpoint written (keep equal to
# gazal_nemo.training.preemption.REQUEUE_EXIT_CODE; 75 is EX_TEMPFAIL: "try again").
GAZAL_REQUEUE_EXIT_CODE=75
# While a stop is pending, USR1 is sent to the ranks again this often: a rank still loading
# (before its handler is installed) ignores it, and would otherwise run into the time limit.
GAZAL_STOP_RESEND_S=${GAZAL_STOP_RESEND_S:-30}

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
    # Fewer, larger cudaMalloc segments that grow in place: rollouts and packed batches of
    # varying length otherwise fragment the caching allocator into OOMs below the real peak.
    export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
    # Kernel caches on node-local disk (each node evaluates this path itself): the defaults
    # (~/.triton, /tmp/torchinductor_$USER) are in a shared home on many clusters, where
    # every rank of every node compiling into one NFS folder races and stalls on locks.
    local node_cache="${GAZAL_NODE_CACHE:-${TMPDIR:-/tmp}/gazal-cache-$(id -un)}"
    export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$node_cache/triton}
    export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$node_cache/inductor}
    # vLLM (GRPO's rollout engine, `gazal eval --engine vllm`) compiles its model and CUDA
    # graphs into ~/.cache/vllm by default: node-local too, for the same reason.
    export VLLM_CACHE_ROOT=${VLLM_CACHE_ROOT:-$node_cache/vllm}
    # vLLM reports usage statistics over the network at start-up; compute nodes usually have no
    # internet, and every rank would wait for the attempt to time out.
    export VLLM_NO_USAGE_STATS=${VLLM_NO_USAGE_STATS:-1}
    # A failed or timed-out collective aborts the process instead of leaving the other
    # ranks blocked until the job's time limit (explicit: torch's default changed over versions).
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
    # Free async-collective buffers by event rather than by caching-allocator stream
    # bookkeeping: less peak memory with the distributed optimizer's overlapped all-gathers.
    export TORCH_NCCL_AVOID_RECORD_STREAMS=1
    # Print NCCL's own warnings (wrong interface, IB errors) into the job log; use INFO to
    # debug a hang or a slow all-reduce.
    export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
    # InfiniBand retry timeout 4.096 us * 2^22 (~17 s) instead of NCCL's default 2^18 or
    # 2^20 (1-4 s, by version): rides out the link flaps and switch reroutes that otherwise
    # kill long multi-node runs.
    export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}
    # Retries of an IB send before NCCL fails the job: 7 is NCCL's default and the most the
    # hardware's 3-bit counter allows; explicit, so a site's /etc/nccl.conf lowered for fast
    # failure does not turn one flap into a dead 48-hour job.
    export NCCL_IB_RETRY_CNT=${NCCL_IB_RETRY_CNT:-7}
    # Log lines reach the output file when printed, so a crash shows its last step.
    export PYTHONUNBUFFERED=1
    # HF tokenizers' thread pool does not survive fork (dataloader workers): disable it.
    export TOKENIZERS_PARALLELISM=false
    # Compute nodes usually have no internet: read models and data from local folders.
    export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
    # Cluster-specific, from the configuration block when set: the NIC for NCCL's bootstrap
    # and socket traffic (e.g. ib0, or ^lo,docker to exclude), and which IB HCAs to use.
    # RoCE fabrics also need the GID index of the RoCEv2 address (e.g. 3).
    if [[ -n "${NCCL_SOCKET_IFNAME:-}" ]]; then export NCCL_SOCKET_IFNAME; fi
    if [[ -n "${NCCL_IB_HCA:-}" ]]; then export NCCL_IB_HCA; fi
    if [[ -n "${NCCL_IB_GID_INDEX:-}" ]]; then export NCCL_IB_GID_INDEX; fi
    if [[ "${GAZAL_DEVICE:-cuda}" == cpu ]]; then
        # CPU run (tests, CI): hide any GPU so every rank takes the gloo path, and share the
        # node's real cores among its ranks (a test node may claim more CPUs than it has).
        export CUDA_VISIBLE_DEVICES=""
        local cores
        cores=$(nproc)
        OMP_NUM_THREADS=$((cores / TASKS_PER_NODE > 1 ? cores / TASKS_PER_NODE : 1))
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

# OUTPUT_DIR for this job: `%j` becomes the job id and `%x` the job name (as in sbatch's
# --output); inside a job with no OUTPUT_DIR, runs/<job name>-<job id> in the checkout. A
# requeued job keeps its id, so it finds its own checkpoints again; a new sbatch starts a
# new folder unless OUTPUT_DIR names the old one.
_resolve_output_dir() {
    if [[ -z "${OUTPUT_DIR:-}" && -n "${SLURM_JOB_ID:-}" ]]; then OUTPUT_DIR="runs/%x-%j"; fi
    [[ -n "${OUTPUT_DIR:-}" ]] || return 0
    OUTPUT_DIR=${OUTPUT_DIR//%j/${SLURM_JOB_ID:-nojob}}
    OUTPUT_DIR=${OUTPUT_DIR//%x/${SLURM_JOB_NAME:-gazal-$STAGE}}
    [[ "$OUTPUT_DIR" == /* ]] || OUTPUT_DIR="$GAZAL_ROOT/$OUTPUT_DIR"
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
    # USR1 and TERM are ignored until the stage installs its stop handlers, and again after it
    # puts the previous ones back: a stop asked for while a rank still starts must not kill
    # it (the batch shell sends USR1 again), nor may the TERM that --kill-on-bad-exit sends
    # the others once the first rank has exited 75 kill them during their own exit (srun
    # would then report 143, not 75). SIGKILL, KillWait seconds after a TERM, still ends all.
    # Rank 0 (on the batch host) leaves its pid for _forward_stop.
    SRUN_CMD+=(bash -c 'trap "" USR1 TERM
                        echo "rank $SLURM_PROCID/$SLURM_NTASKS on $(hostname) local_rank $SLURM_LOCALID"
                        if [[ $SLURM_PROCID == 0 && -n "${GAZAL_RANK0_PIDFILE:-}" ]]; then
                            echo $$ >"$GAZAL_RANK0_PIDFILE" || true
                        fi
                        exec "$@"'
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

# One line in the job log per (re)start: with --open-mode=append every run of a requeued
# job adds to the same file, and this says where each begins.
_mark_start() {
    local restarts=${SLURM_RESTART_COUNT:-0}
    _say "==== job $SLURM_JOB_ID run $((restarts + 1)) (requeued $restarts time(s)) on $(hostname)" \
         "at $(date '+%Y-%m-%dT%H:%M:%S') ===="
}

# Sends USR1 to rank 0's Python process alone when its pid is known: one rank is enough
# (the ranks agree after each step), and Slurm delivers a signal for the tasks (srun's
# forwarding, scancel) to every process of the step, including the checkpoint writer
# processes megatron's dist_checkpointing starts, which USR1 kills. Before rank 0 has
# started (or inside a container with its own /tmp), srun forwards it to all the ranks.
_signal_stop() {
    local pid
    pid=$(cat "$GAZAL_RANK0_PIDFILE" 2>/dev/null || true)
    if [[ -n "$pid" ]] && kill -USR1 "$pid" 2>/dev/null; then return 0; fi
    kill -USR1 "$SRUN_PID" 2>/dev/null || true
}

# USR1 to the batch shell: ask the ranks to stop after their step, and keep asking until
# srun is done (see GAZAL_STOP_RESEND_S).
_forward_stop() {
    _say "USR1: asking the ranks to finish their step, checkpoint and exit for a requeue"
    _signal_stop
    if [[ -z "${RESEND_PID:-}" ]]; then
        (while sleep "$GAZAL_STOP_RESEND_S"; do
             kill -0 "$SRUN_PID" 2>/dev/null || exit 0
             _signal_stop
         done) &
        RESEND_PID=$!
    fi
}

# TERM to the batch shell comes with a cancel, a preemption or the time limit: the ranks
# get it from Slurm themselves (and save if there is time); this shell must not requeue.
_note_terminate() {
    GOT_TERM=1
    _say "TERM: the job is ending (cancel, preemption or time limit); ranks checkpoint if they can"
}

# The newest step checkpoint folder of this run's checkpoint.dir (the last
# `checkpoint.dir=` of STAGE_OVERRIDES wins, as in the recipe), or "" when there is none.
_newest_checkpoint() {
    local word dir="" newest="" candidate
    for word in ${STAGE_OVERRIDES[@]+"${STAGE_OVERRIDES[@]}"}; do
        if [[ "$word" == checkpoint.dir=* ]]; then dir=${word#checkpoint.dir=}; fi
    done
    [[ -n "$dir" ]] || return 0
    for candidate in "$dir"/step_*; do
        # step_N (zero-padded, so the last in glob order is the newest), not step_N.tmp
        if [[ -d "$candidate" && "$candidate" != *.tmp ]]; then newest=$candidate; fi
    done
    echo "$newest"
}

# Runs SRUN_CMD in the background so the traps run while it works; sets SRUN_EXIT.
_run_step() {
    GOT_TERM=0
    RESEND_PID=""
    CHECKPOINT_BEFORE=$(_newest_checkpoint)
    # Node-local, so only the batch host's rank 0 writes it; fresh for each (re)start.
    export GAZAL_RANK0_PIDFILE="${TMPDIR:-/tmp}/gazal-$SLURM_JOB_ID-rank0.pid"
    rm -f "$GAZAL_RANK0_PIDFILE"
    "${SRUN_CMD[@]}" &
    SRUN_PID=$!
    trap _forward_stop USR1
    trap _note_terminate TERM
    SRUN_EXIT=0
    # `wait` returns early (status > 128) when a trapped signal arrives; wait again while
    # srun still runs.
    while :; do
        wait "$SRUN_PID" && SRUN_EXIT=0 || SRUN_EXIT=$?
        kill -0 "$SRUN_PID" 2>/dev/null || break
    done
    trap - USR1 TERM
    if [[ -n "$RESEND_PID" ]]; then kill "$RESEND_PID" 2>/dev/null || true; fi
    rm -f "$GAZAL_RANK0_PIDFILE"
}

# Whether the newest checkpoint ended the job at train.stop_at_step (its trainer_state.json
# says so, written by gazal_nemo/training/checkpoint.py): the ranks exit 75 there too (the run
# is not finished, no export yet), but a requeue would stop at the same step again.
_stopped_at_stop_at_step() {
    local newest
    newest=$(_newest_checkpoint)
    [[ -n "$newest" ]] && grep -q '"stop_reason": "train.stop_at_step"' "$newest/trainer_state.json" 2>/dev/null
}

# After srun: requeue when the ranks stopped with a new checkpoint (and the job is not
# ending anyway), else end with srun's status. No new checkpoint means the stop came before
# this run finished a step: a requeue would stop the same way again, forever. A stop at
# train.stop_at_step is not requeued either: the job ends with 75, so an afterok dependency
# does not start on the missing export, and the run goes on when resubmitted without it.
_finish() {
    if [[ $SRUN_EXIT == "$GAZAL_REQUEUE_EXIT_CODE" && $GOT_TERM == 0 && "$(_newest_checkpoint)" == "$CHECKPOINT_BEFORE" ]]; then
        _say "ranks stopped before this run finished a step (no new checkpoint): not requeued, it would" \
             "stop the same way again. Give the job more --time or a shorter --signal lead, and resubmit" \
             "with OUTPUT_DIR=$OUTPUT_DIR"
    elif [[ $SRUN_EXIT == "$GAZAL_REQUEUE_EXIT_CODE" ]] && _stopped_at_stop_at_step; then
        _say "ranks stopped at train.stop_at_step with a checkpoint (exit $SRUN_EXIT): not requeued (it would" \
             "stop there again); resubmit with OUTPUT_DIR=$OUTPUT_DIR and a later train.stop_at_step, or none," \
             "to go on"
    elif [[ $SRUN_EXIT == "$GAZAL_REQUEUE_EXIT_CODE" && $GOT_TERM == 0 ]]; then
        _say "ranks stopped with a checkpoint (exit $SRUN_EXIT): requeueing job $SLURM_JOB_ID;" \
             "it resumes in $OUTPUT_DIR"
        # Ends this shell when it works (the job goes back to pending under the same id).
        scontrol requeue "$SLURM_JOB_ID" || _say "scontrol requeue failed: resubmit with OUTPUT_DIR=$OUTPUT_DIR"
    elif [[ $SRUN_EXIT == "$GAZAL_REQUEUE_EXIT_CODE" ]]; then
        _say "ranks stopped with a checkpoint; not requeued (the job was cancelled, preempted or timed out)"
    else
        _say "srun exited with status $SRUN_EXIT"
    fi
    exit "$SRUN_EXIT"
}

gazal_launch() {
    set -euo pipefail
    cd "$GAZAL_ROOT"
    if [[ -n "${SLURM_JOB_ID:-}" && "${DRY_RUN:-0}" != 1 ]]; then _mark_start; fi
    _resolve_layout
    _resolve_output_dir
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
         "master $MASTER_ADDR:$MASTER_PORT, device ${GAZAL_DEVICE:-cuda}, output $OUTPUT_DIR"
    echo "  $(_shell_words "${SRUN_CMD[@]}")"
    _run_step
    _finish
}
