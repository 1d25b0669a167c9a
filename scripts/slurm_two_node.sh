#!/usr/bin/env bash
# A real two-node Slurm on one machine, for tests/slurm/test_two_node.py (as root):
# slurmctld plus two slurmd, each slurmd in its own network namespace (its own address,
# NodeName and hostname) on a bridge this script creates:
#
#   bridge gzbr0 10.213.0.1/24 (slurmctld)  --veth--  netns gz-node1: eth0 10.213.0.11
#                                           --veth--  netns gz-node2: eth0 10.213.0.12
#
# Each slurmd runs under `nsenter --net=<netns> unshare -m -u` with the cluster's /etc/hosts
# bind-mounted and its hostname set, so a job's ranks resolve `gz-node1` (MASTER_ADDR) to
# the other namespace's address and gloo binds to the node's own. (`ip netns exec` would
# remount /sys, which breaks slurmd's cgroup detection.) Only 10.213.0.0/24 inside these
# namespaces and this bridge is ever addressed.
#
# It leaves the one-node CI Slurm (scripts/ci_slurm_setup.sh) alone: its own slurm.conf,
# ports 6917/6918, state, spool, pid and log files, all under $BASE. Clients reach it with
# SLURM_CONF=$BASE/slurm.conf (what `start` prints last). The munge daemon and the plugin
# settings (incl. 8 file-backed GPUs per node) are the CI Slurm's.
#
#   bash scripts/slurm_two_node.sh start   # (re)create it; prints SLURM_CONF=... when both nodes are idle
#   bash scripts/slurm_two_node.sh stop    # cancel its jobs, stop its daemons and every process left
#                                          # in its namespaces, delete the namespaces and the bridge
#
# `start` stops whatever an earlier run left first, and cleans up after itself when it fails.
set -euo pipefail

# shellcheck source=ci_slurm_setup.sh
source "$(dirname "$0")/ci_slurm_setup.sh"   # helpers only: say, die, wait_for, install_packages, ...

BASE=/run/gazal-slurm-two-node
CONF=$BASE/slurm.conf
BRIDGE=gzbr0
SUBNET=10.213.0
CTLD_ADDR=$SUBNET.1
NODES=(gz-node1 gz-node2)
CTLD_PORT=6917
SLURMD_PORT=6918
PARTITION=two

say() { echo "slurm_two_node: $*"; }
die() { echo "slurm_two_node: ERROR: $*" >&2; exit 1; }

node_addr() { echo "$SUBNET.$((10 + $1 + 1))"; }   # node index 0, 1 -> .11, .12

render_two_node_conf() {
    local i nodes_line=""
    cat <<EOF
# Written by scripts/slurm_two_node.sh: a two-node test Slurm on one machine. Overwritten on start.
ClusterName=gazal2n
# slurmctld runs in the root network namespace and listens on the bridge.
SlurmctldHost=localhost(${CTLD_ADDR})
SlurmctldPort=${CTLD_PORT}
SlurmdPort=${SLURMD_PORT}
$(render_common_settings)
StateSaveLocation=${BASE}/ctld-state
SlurmdSpoolDir=${BASE}/spool-%n
SlurmctldPidFile=${BASE}/slurmctld.pid
SlurmdPidFile=${BASE}/slurmd-%n.pid
SlurmctldLogFile=${BASE}/slurmctld.log
SlurmdLogFile=${BASE}/slurmd-%n.log
EOF
    for i in "${!NODES[@]}"; do
        echo "NodeName=${NODES[$i]} NodeAddr=$(node_addr "$i") CPUs=$(node_cpus) RealMemory=$(node_memory_mb) Gres=gpu:${NUM_GPUS} State=UNKNOWN"
        nodes_line+="${nodes_line:+,}${NODES[$i]}"
    done
    echo "PartitionName=${PARTITION} Nodes=${nodes_line} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO"
}

render_hosts() {
    local i
    echo "127.0.0.1 localhost"
    echo "$CTLD_ADDR gzctl"
    for i in "${!NODES[@]}"; do echo "$(node_addr "$i") ${NODES[$i]}"; done
}

two_node_ctl() { SLURM_CONF=$CONF "$@"; }

ctld_up() { two_node_ctl scontrol ping 2>/dev/null | grep -q "is UP"; }

nodes_idle() {
    local states
    states=$(two_node_ctl sinfo -h -N -p "$PARTITION" -o %T 2>/dev/null | sort -u | tr '\n' ' ')
    [[ "$states" == "idle " ]] && [[ $(two_node_ctl sinfo -h -N -p "$PARTITION" -o %N | wc -l) == "${#NODES[@]}" ]]
}

make_network() {
    local i node
    ip link add "$BRIDGE" type bridge
    ip addr add "$CTLD_ADDR/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
    for i in "${!NODES[@]}"; do
        node=${NODES[$i]}
        ip netns add "$node"
        ip link add "gzv$i" type veth peer name eth0 netns "$node"
        ip link set "gzv$i" master "$BRIDGE" up
        ip -n "$node" addr add "$(node_addr "$i")/24" dev eth0
        ip -n "$node" link set eth0 up
        ip -n "$node" link set lo up
    done
}

start_slurmd_in_namespace() {
    local node=$1
    # A private mount namespace (unshare -m) for the cluster's /etc/hosts, a UTS namespace
    # (-u) for the node's hostname; slurmd daemonizes and stays in both.
    nsenter --net="/run/netns/$node" unshare -m -u bash -c \
        "mount --bind '$BASE/hosts' /etc/hosts && hostname '$node' && exec slurmd -f '$CONF' -N '$node'" \
        || die "slurmd $node did not start; see $BASE/slurmd-$node.log"
}

start() {
    [[ $EUID -eq 0 ]] || die "needs root (network namespaces, a bridge, Slurm daemons)"
    install_packages
    for tool in ip nsenter unshare; do command -v "$tool" >/dev/null || die "$tool not found"; done
    stop >/dev/null 2>&1 || true
    set -E   # the ERR trap also fires inside the functions below
    trap 'say "start failed; cleaning up"; stop; exit 1' ERR
    start_munge
    make_fake_gpus
    install -d -m 0755 "$BASE" "$BASE/ctld-state"
    local node
    for node in "${NODES[@]}"; do install -d -m 0755 "$BASE/spool-$node"; done
    render_two_node_conf >"$CONF"
    render_gres_line "$(IFS=,; echo "${NODES[*]}")" >"$BASE/gres.conf"
    render_hosts >"$BASE/hosts"
    make_network
    say "starting slurmctld on $CTLD_ADDR:$CTLD_PORT (log $BASE/slurmctld.log)"
    slurmctld -f "$CONF"
    wait_for 30 ctld_up || { say "slurmctld does not answer; see $BASE/slurmctld.log"; false; }
    for node in "${NODES[@]}"; do
        say "starting slurmd $node in netns $node (log $BASE/slurmd-$node.log)"
        start_slurmd_in_namespace "$node"
    done
    wait_for 60 nodes_idle || { say "nodes not idle: $(two_node_ctl sinfo -h -N -o '%N %T %E' | tr '\n' ';')"; false; }
    trap - ERR
    say "ready: $(two_node_ctl sinfo -h -N -o '%N=%T' | tr '\n' ' ')"
    echo "SLURM_CONF=$CONF"
}

# Kills the processes in $1's pidfile.
stop_daemon() {
    local pidfile=$1 name=$2 pid
    pid_alive "$pidfile" || return 0
    pid=$(cat "$pidfile")
    say "stopping $name (pid $pid)"
    kill "$pid" 2>/dev/null || true
    wait_for 15 bash -c "! kill -0 $pid 2>/dev/null" || kill -9 "$pid" 2>/dev/null || true
}

stop() {
    local node pid
    if [[ -f "$CONF" ]] && ctld_up; then
        two_node_ctl scancel --full --signal=KILL --quiet --partition="$PARTITION" 2>/dev/null || true
    fi
    for node in "${NODES[@]}"; do stop_daemon "$BASE/slurmd-$node.pid" "slurmd $node"; done
    stop_daemon "$BASE/slurmctld.pid" slurmctld
    for node in "${NODES[@]}"; do
        if [[ -e "/run/netns/$node" ]]; then
            # Whatever still runs in our namespaces (job steps, ranks) was started by us.
            for pid in $(ip netns pids "$node" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
            ip netns del "$node" 2>/dev/null || true
        fi
    done
    if ip link show "$BRIDGE" >/dev/null 2>&1; then ip link del "$BRIDGE"; fi
    # State, spool and pid files go; logs stay for a look after a failed test.
    rm -rf "$BASE/ctld-state" "$BASE"/spool-* "$BASE"/*.pid
    say "stopped"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
