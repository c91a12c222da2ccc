#!/usr/bin/env bash
# Stop the local Slurm started by slurm/local/up.sh: cancel its jobs, stop each daemon by the PID in its pidfile
# (never by name: slurmd, slurmctld, slurmdbd, mariadbd, munged), wait for them to exit, remove the namespace.
# The state directory (configs, logs, database) is kept, so the next up.sh is quick. Idempotent; safe when nothing
# runs. Same settings as up.sh: SAEV_SLURM_DIR (default /tmp/saev-slurm), SAEV_SLURM_NETNS (default saev-slurm).
set -uo pipefail
export PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:$PATH"

DIR=$(realpath -m "${SAEV_SLURM_DIR:-/tmp/saev-slurm}")
NETNS=${SAEV_SLURM_NETNS:-saev-slurm}
RUN=$DIR/run
export SLURM_CONF=$DIR/etc/slurm.conf
IN_NS=(nsenter "--net=/run/netns/$NETNS")

log() { echo "[slurm/local/down] $*"; }

alive() {  # alive PID: running and not a zombie (PID 1 here may be slow to reap what daemons leave behind)
    kill -0 "$1" 2>/dev/null || return 1
    local state
    state=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
    [ -n "$state" ] && [ "$state" != Z ] && [ "$state" != X ]
}

pid_of() {  # pid_of PIDFILE: the live PID in PIDFILE if it is still the daemon the file is named after
    local pid name
    name=$(basename "$1" .pid)
    [ -s "$1" ] || return 1
    pid=$(cat "$1" 2>/dev/null) || return 1
    [[ $pid =~ ^[0-9]+$ ]] && alive "$pid" || return 1
    if [ "$(cat "/proc/$pid/comm" 2>/dev/null)" != "$name" ]; then
        log "stale $1: PID $pid is not $name now; left alone" >&2
        return 1
    fi
    echo "$pid"
}

stop() {  # stop NAME PIDFILE
    local name=$1 pidfile=$2 pid i
    if pid=$(pid_of "$pidfile"); then
        log "stopping $name ($pid)"
        kill -TERM "$pid" 2>/dev/null
        for ((i = 0; i < 300; i++)); do  # up to 30 s
            alive "$pid" || break
            sleep 0.1
        done
        if alive "$pid"; then
            log "$name ($pid) ignored SIGTERM for 30 s: SIGKILL"
            kill -KILL "$pid" 2>/dev/null
            sleep 0.5
        fi
    fi
    rm -f "$pidfile"
}

# Cancel what is still queued or running so no job step outlives slurmd.
if [ -e "/run/netns/$NETNS" ] && [ -f "$SLURM_CONF" ] && pid_of "$RUN/slurmctld.pid" >/dev/null; then
    jobs=$("${IN_NS[@]}" timeout 10 squeue -h -o %A 2>/dev/null | sort -u)
    if [ -n "$jobs" ]; then
        log "cancelling $(echo "$jobs" | wc -l) job(s)"
        # shellcheck disable=SC2086
        "${IN_NS[@]}" timeout 10 scancel $jobs 2>/dev/null
        for ((i = 0; i < 80; i++)); do  # up to 20 s for them to finish completing
            [ -z "$("${IN_NS[@]}" timeout 5 squeue -h -o %A 2>/dev/null)" ] && break
            sleep 0.25
        done
    fi
fi

stop slurmd "$RUN/slurmd.pid"
stop slurmctld "$RUN/slurmctld.pid"
stop slurmdbd "$RUN/slurmdbd.pid"
stop mariadbd "$DIR/mysql/mariadbd.pid"
stop munged "$RUN/munged.pid"

if [ -e "/run/netns/$NETNS" ]; then
    left=$(ip netns pids "$NETNS" 2>/dev/null | tr '\n' ' ')
    [ -n "$left" ] && log "warning: processes still in namespace $NETNS (not stopped): $left"
    ip netns del "$NETNS" && log "removed network namespace $NETNS"
fi
log "cluster down (state kept in $DIR)"
