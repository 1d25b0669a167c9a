#!/usr/bin/env bash
# Install and start a one-node Slurm on this machine so tests/slurm/ can run the real
# sbatch scripts with their own #SBATCH headers (CI and developer machines; Debian/Ubuntu,
# as root).
#
# What it sets up: munge (Slurm's authentication), slurmctld and slurmd as plain daemons
# (no systemd needed: CI containers have none), one node named `localhost` in one
# partition `ci`. proctrack/linuxproc and task/none need no cgroups, which containers
# rarely expose. So that `sbatch slurm/grpo_8xh100.sh` runs unmodified (--gpus-per-node=8,
# --cpus-per-task=8 x 8 tasks, --exclusive, --mem=0; sft: --mem=256G), the node claims
# 8 GPUs, MIN_CPUS CPUs and MIN_MEMORY_MB of memory whatever the machine has
# (SlurmdParameters=config_overrides; nothing is enforced without cgroups). The GPUs are
# GRES backed by eight empty files: Slurm 22.05 marks a node INVAL for a gpu line with
# Count= and no File=, and with task/none no device is ever opened. CPU test jobs set
# GAZAL_DEVICE=cpu, which also sizes each rank's threads to the real cores.
#
# Idempotent: a second run with Slurm already answering does nothing but check it; a
# changed slurm.conf or gres.conf restarts the daemons. Fails (non-zero, with the reason and
# the log to read) when a daemon does not come up. scripts/slurm_two_node.sh sources this
# file for its helpers (nothing runs when sourced).
#
#   bash scripts/ci_slurm_setup.sh          # install if needed, configure, start, check
set -euo pipefail

MIN_CPUS="${MIN_CPUS:-64}"          # CPUs the node offers: the GRPO header's 8 tasks x 8 CPUs
MIN_MEMORY_MB="${MIN_MEMORY_MB:-262144}"   # memory the node offers: the SFT header's --mem=256G
NUM_GPUS=8                          # GRES gpu count: the GRPO header's --gpus-per-node=8
FAKE_GPU_DIR=/var/lib/gazal-ci-slurm/gpus   # the eight empty files behind the gpu GRES
# Credential lifetime; Slurm also holds a requeued job this long + 1 s before it may start
# again (default 120 s), which the requeue tests would otherwise wait out each time.
CRED_EXPIRE_S=10
NODE_NAME=localhost                 # resolves on every machine, so MASTER_ADDR needs no DNS
PARTITION=ci
SLURM_CONF=/etc/slurm/slurm.conf
GRES_CONF=/etc/slurm/gres.conf
LOG_DIR=/var/log/slurm
STATE_DIR=/var/spool/slurmctld
SPOOL_DIR=/var/spool/slurmd
CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid

say() { echo "ci_slurm_setup: $*"; }
die() { echo "ci_slurm_setup: ERROR: $*" >&2; exit 1; }

# Wait up to $1 seconds for the command in "$@" (after the count) to succeed.
wait_for() {
    local seconds=$1; shift
    local deadline=$((SECONDS + seconds))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || return 1
        sleep 0.5
    done
}

pid_alive() { [[ -s "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

stop_pidfile() {
    local pidfile=$1 name=$2 pid
    if pid_alive "$pidfile"; then
        pid=$(cat "$pidfile")
        say "stopping $name (pid $pid)"
        kill "$pid"
        wait_for 15 bash -c "! kill -0 $pid 2>/dev/null" || die "$name (pid $pid) did not stop"
    fi
}

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null; then
        say "slurm and munge already installed"
        return
    fi
    [[ $EUID -eq 0 ]] || die "slurm is not installed and this is not root; run as root (or: sudo $0)"
    command -v apt-get >/dev/null || die "no apt-get: install slurmctld, slurmd, slurm-client and munge by hand"
    say "installing slurmctld slurmd slurm-client munge with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || die "apt-get update failed"
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null \
        || die "apt-get install of slurm/munge failed"
    say "installed slurm $(dpkg-query -W -f '${Version}' slurmctld)"
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        say "munged already running"
        return
    fi
    if [[ ! -s /etc/munge/munge.key ]]; then
        say "creating /etc/munge/munge.key"
        mungekey --create --keyfile=/etc/munge/munge.key || die "mungekey failed"
    fi
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/log/munge /var/lib/munge
    chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
    say "starting munged"
    runuser -u munge -- /usr/sbin/munged || die "munged did not start; see /var/log/munge/munged.log"
    wait_for 10 bash -c 'munge -n | unmunge' || die "munge does not answer; see /var/log/munge/munged.log"
}

# CPUs and memory (MB) a test node claims: the machine's, raised to MIN_CPUS / MIN_MEMORY_MB.
node_cpus() { local cpus; cpus=$(nproc); echo $((cpus >= MIN_CPUS ? cpus : MIN_CPUS)); }
node_memory_mb() {
    awk -v min="$MIN_MEMORY_MB" '/^MemTotal:/ {m = int($2 / 1024) - 1024; print (m > min ? m : min)}' /proc/meminfo
}

# The empty files behind the gpu GRES (slurmd only checks that they exist).
make_fake_gpus() {
    install -d -m 0755 "$FAKE_GPU_DIR"
    local i
    for ((i = 0; i < NUM_GPUS; i++)); do [[ -e "$FAKE_GPU_DIR/nvidia$i" ]] || : >"$FAKE_GPU_DIR/nvidia$i"; done
}

# gres.conf line for node $1: its GPUs as File= entries.
render_gres_line() { echo "NodeName=$1 Name=gpu File=$FAKE_GPU_DIR/nvidia[0-$((NUM_GPUS - 1))]"; }

# The plugin and timing settings every test cluster shares (this one and slurm_two_node.sh).
render_common_settings() {
    cat <<EOF
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=${CRED_EXPIRE_S}
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/builtin
# Look for startable jobs every 2 s (default 60 s): a requeued job starts as soon as it may.
SchedulerParameters=sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
GresTypes=gpu
# Let the node offer more CPUs and memory than it has, so the scripts' headers fit a CI runner.
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=5
# Keep finished jobs >= 5 s (they are purged at most once a minute): short enough that
# sbatch --wait polls every 2 s instead of backing off to 32 s.
MinJobAge=5
EOF
}

# slurm.conf for one node; printed to stdout so the caller can compare before installing.
render_conf() {
    cat <<EOF
# Written by scripts/ci_slurm_setup.sh: a one-node Slurm for tests. Edits are overwritten.
ClusterName=gazalci
SlurmctldHost=${NODE_NAME}
$(render_common_settings)
StateSaveLocation=${STATE_DIR}
SlurmdSpoolDir=${SPOOL_DIR}
SlurmctldPidFile=${CTLD_PID}
SlurmdPidFile=${SLURMD_PID}
SlurmctldLogFile=${LOG_DIR}/slurmctld.log
SlurmdLogFile=${LOG_DIR}/slurmd.log
NodeName=${NODE_NAME} NodeAddr=127.0.0.1 CPUs=$(node_cpus) RealMemory=$(node_memory_mb) Gres=gpu:${NUM_GPUS} State=UNKNOWN
PartitionName=${PARTITION} Nodes=${NODE_NAME} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
}

# Writes file $1 with the text $2 unless it already holds it; returns 0 when it changed
# (daemons must restart), 1 when unchanged.
write_if_changed() {
    local path=$1 text=$2
    if [[ -f "$path" ]] && [[ "$(cat "$path")" == "$text" ]]; then
        say "$path unchanged"
        return 1
    fi
    say "writing $path"
    install -d "$(dirname "$path")"
    printf '%s\n' "$text" >"$path.tmp" && mv "$path.tmp" "$path"
    return 0
}

# Writes slurm.conf and gres.conf; returns 0 when either changed, 1 when both are unchanged.
write_conf() {
    local changed=1
    make_fake_gpus
    if write_if_changed "$SLURM_CONF" "$(render_conf)"; then changed=0; fi
    if write_if_changed "$GRES_CONF" "$(render_gres_line "$NODE_NAME")"; then changed=0; fi
    return $changed
}

ctld_up() { scontrol ping 2>/dev/null | grep -q "is UP"; }

node_state() { sinfo -h -N -n "$NODE_NAME" -o %T 2>/dev/null | head -n1; }

node_ready() { [[ "$(node_state)" =~ ^(idle|mixed|allocated|completing)$ ]]; }

start_daemons() {
    local restart=$1
    install -d -m 0755 "$LOG_DIR" "$STATE_DIR" "$SPOOL_DIR"
    if [[ $restart == 1 ]]; then
        stop_pidfile "$SLURMD_PID" slurmd
        stop_pidfile "$CTLD_PID" slurmctld
    fi
    if ctld_up; then
        say "slurmctld already answering"
    else
        stop_pidfile "$CTLD_PID" slurmctld   # a stale one that does not answer
        say "starting slurmctld (log $LOG_DIR/slurmctld.log)"
        slurmctld || die "slurmctld failed to start; see $LOG_DIR/slurmctld.log"
        wait_for 30 ctld_up || die "slurmctld does not answer 'scontrol ping'; see $LOG_DIR/slurmctld.log"
    fi
    if pid_alive "$SLURMD_PID"; then
        say "slurmd already running"
    else
        say "starting slurmd -N $NODE_NAME (log $LOG_DIR/slurmd.log)"
        slurmd -N "$NODE_NAME" || die "slurmd failed to start; see $LOG_DIR/slurmd.log"
    fi
    if ! wait_for 30 node_ready; then
        # A node left down/drained by an earlier run (or a restart) is brought back.
        say "node $NODE_NAME is '$(node_state)'; resuming it"
        scontrol update NodeName="$NODE_NAME" State=RESUME >/dev/null 2>&1 || true
        wait_for 30 node_ready \
            || die "node $NODE_NAME is '$(node_state)', not idle; see $LOG_DIR/slurmd.log and $LOG_DIR/slurmctld.log"
    fi
}

main() {
    install_packages
    [[ $EUID -eq 0 ]] || { ctld_up && node_ready && { say "slurm is up (not root: nothing changed)"; exit 0; }
                           die "slurm is not running and this is not root; run as root"; }
    start_munge
    local restart=0
    if write_conf; then restart=1; fi
    start_daemons "$restart"
    say "ready: $(sinfo -h -N -o '%N %T cpus=%c gres=%G partition=%P' | head -n1)"
}

# Run, unless sourced for the helpers (scripts/slurm_two_node.sh).
if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then main "$@"; fi
