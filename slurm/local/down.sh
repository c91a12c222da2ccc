#!/usr/bin/env bash
# Stop the cluster started by slurm/local/up.sh: each daemon by the PID in its pidfile (never by name), then remove
# the network namespace. Safe when nothing is running.
set -uo pipefail

DIR=${SAEV_SLURM_DIR:-/tmp/saev-slurm}
NETNS=${SAEV_SLURM_NETNS:-saev-slurm}

stop() {  # stop NAME PIDFILE
    local name=$1 pidfile=$2 pid
    [ -f "$pidfile" ] || return 0
    pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null; then
        echo "[slurm/local/down] stopping $name ($pid)"
        kill "$pid"
        for _ in $(seq 1 60); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.25
        done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    fi
    rm -f "$pidfile"
}

stop slurmd "$DIR/run/slurmd.pid"
stop slurmctld "$DIR/run/slurmctld.pid"
stop slurmdbd "$DIR/run/slurmdbd.pid"
stop mariadbd "$DIR/mysql/mariadbd.pid"
if [ -f "$DIR/run/munged.pid" ]; then
    stop munged "$DIR/run/munged.pid"
    rm -f /run/munge/munged.pid
fi
if [ -e "/run/netns/$NETNS" ]; then
    ip netns del "$NETNS"
fi
echo "[slurm/local/down] cluster down"
