#!/usr/bin/env bash
# Install and start a one-node Slurm on this machine so tests/slurm/ can run the real
# sbatch scripts (CI and developer machines; Debian/Ubuntu, as root).
#
# What it sets up: munge (Slurm's authentication), slurmctld and slurmd as plain daemons
# (no systemd needed: CI containers have none), one node named `localhost` in one
# partition `ci`. proctrack/linuxproc and task/none need no cgroups, which containers
# rarely expose. The node claims at least MIN_CPUS CPUs (config_overrides lets it claim
# more than the machine has) so a 2-task CPU job fits on a 2-core runner.
#
# Idempotent: a second run with Slurm already answering does nothing but check it; a
# changed slurm.conf restarts the daemons. Fails (non-zero, with the reason and the log
# to read) when a daemon does not come up.
#
#   bash scripts/ci_slurm_setup.sh          # install if needed, configure, start, check
#   MIN_CPUS=8 bash scripts/ci_slurm_setup.sh
set -euo pipefail

MIN_CPUS="${MIN_CPUS:-4}"          # CPUs the node offers to jobs (>= 2: one per task of the CPU test)
NODE_NAME=localhost                 # resolves on every machine, so MASTER_ADDR needs no DNS
PARTITION=ci
SLURM_CONF=/etc/slurm/slurm.conf
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

# slurm.conf for one node; printed to stdout so the caller can compare before installing.
render_conf() {
    local cpus real_mem_mb
    cpus=$(nproc)
    ((cpus >= MIN_CPUS)) || cpus=$MIN_CPUS
    real_mem_mb=$(awk '/^MemTotal:/ {m = int($2 / 1024) - 1024; print (m > 1024 ? m : 1024)}' /proc/meminfo)
    cat <<EOF
# Written by scripts/ci_slurm_setup.sh: a one-node Slurm for tests. Edits are overwritten.
ClusterName=gazalci
SlurmctldHost=${NODE_NAME}
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# Let the node offer more CPUs than it has, so 2-task jobs fit on a 2-core runner.
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=5
# Keep finished jobs >= 5 s (they are purged at most once a minute): short enough that
# sbatch --wait polls every 2 s instead of backing off to 32 s.
MinJobAge=5
StateSaveLocation=${STATE_DIR}
SlurmdSpoolDir=${SPOOL_DIR}
SlurmctldPidFile=${CTLD_PID}
SlurmdPidFile=${SLURMD_PID}
SlurmctldLogFile=${LOG_DIR}/slurmctld.log
SlurmdLogFile=${LOG_DIR}/slurmd.log
NodeName=${NODE_NAME} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${real_mem_mb} State=UNKNOWN
PartitionName=${PARTITION} Nodes=${NODE_NAME} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
}

# Writes slurm.conf; returns 0 when it changed (daemons must restart), 1 when unchanged.
write_conf() {
    local new
    new=$(render_conf)
    if [[ -f "$SLURM_CONF" ]] && [[ "$(cat "$SLURM_CONF")" == "$new" ]]; then
        say "$SLURM_CONF unchanged"
        return 1
    fi
    say "writing $SLURM_CONF (node $NODE_NAME, $(grep -o 'CPUs=[0-9]*' <<<"$new"))"
    install -d /etc/slurm
    printf '%s\n' "$new" >"$SLURM_CONF.tmp" && mv "$SLURM_CONF.tmp" "$SLURM_CONF"
    return 0
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
    say "ready: $(sinfo -h -N -o '%N %T cpus=%c partition=%P' | head -n1)"
}

main "$@"
