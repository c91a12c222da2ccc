#!/usr/bin/env bash
# Start a real single-node Slurm (slurmctld + slurmd + slurmdbd with MariaDB accounting, munge) for tests and CI.
#
#   bash slurm/local/up.sh                                   # start (or check that it is up); needs root
#   source /tmp/saev-slurm/env.sh                            # SLURM_CONF, SAEV_SLURM_NETNS, the `slurmns` helper
#   nsenter --net=/run/netns/saev-slurm sinfo                # clients must run inside the namespace
#   nsenter --net=/run/netns/saev-slurm sbatch --wrap hostname
#   bash slurm/local/down.sh                                 # stop everything and remove the namespace
#   bash slurm/local/run-tests.sh                            # up, `pytest -m slurm` inside the namespace, down
#
# Settings (environment): SAEV_SLURM_DIR (state, configs, logs, database; default /tmp/saev-slurm) and
# SAEV_SLURM_NETNS (network namespace; default saev-slurm). Two instances with different values can run at once.
#
# What it is:
# - Every daemon runs inside a network namespace that has only loopback (slurmdbd binds 0.0.0.0 whatever the
#   config says), so nothing listens outside this machine. Clients reach it only from inside: use nsenter --net,
#   not `ip netns exec` (that remounts /sys and slurmd then cannot find its cgroups).
# - munged and mariadbd are private to the instance (own socket, pidfile, key copy, datadir under SAEV_SLURM_DIR);
#   MariaDB listens on a unix socket only (--skip-networking). The system's munge/MariaDB services are untouched.
# - The configs live in $SAEV_SLURM_DIR/etc; env.sh exports SLURM_CONF pointing there. For the default
#   SAEV_SLURM_DIR only, slurm.conf is also copied to /etc/slurm/slurm.conf (unless a foreign one is there), so a
#   bare `nsenter --net=/run/netns/saev-slurm sinfo` works without env.sh.
# - All Slurm daemons run as root (SlurmUser=root) and jobs run as their submitter (root in tests).
# - Node: $(hostname -s), CPUs=$(nproc), RealMemory=4000, two fake GPUs of type `fake` (character devices,
#   Gres=gpu:fake:2) so `--gpus-per-node=1`, `--gpus-per-node=fake:1` and `--gres=gpu:fake:1` jobs schedule and see
#   CUDA_VISIBLE_DEVICES. One partition `debug`, MaxTime=INFINITE.
# - MaxArraySize=20 on purpose: array indices must be < 20, so the pipeline's splitting of large job arrays into
#   several arrays is exercised (tests/stages/test_slurm_cluster.py checks this limit).
# - Accounting (slurmdbd + MariaDB) is on: without it sacct is disabled and a cancelled job stays UNKNOWN to
#   submitit forever. Cluster `saevlocal`, account `saev`, user root are registered. Associations and QOS are
#   enforced (AccountingStorageEnforce=associations,qos); QOS `saevtest` exists and root's associations may use it
#   (besides the default `normal`), so `--qos=saevtest` is accepted and any other QOS is refused.
#
# Idempotent: when everything is already up with the same configuration it only checks and returns (~1 s); when the
# configuration changed (or only part of it runs) it restarts what is needed. See /work/shared/notes/local-slurm.md.
set -euo pipefail
export PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:$PATH"

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
DIR=$(realpath -m "${SAEV_SLURM_DIR:-/tmp/saev-slurm}")
NETNS=${SAEV_SLURM_NETNS:-saev-slurm}
DEFAULT_DIR=/tmp/saev-slurm
HOST=$(hostname -s)
NCPU=$(nproc)
CLUSTER=saevlocal
ACCOUNT=saev
QOS=saevtest  # a QOS besides `normal` that the account may use: tests check that [slurm] qos reaches the job
GPU_TYPE=fake  # the fake GPUs' type: tests ask for gpus = "fake:1" and gres = "gpu:fake:1"
DB_PASS=saev-local-slurm

ETC=$DIR/etc
RUN=$DIR/run
LOG=$DIR/log
DB=$DIR/mysql
MUNGE_DIR=$DIR/munge
MUNGE_SOCK=$MUNGE_DIR/munge.socket.2
MYSQL_SOCK=$DB/mysqld.sock
MARIADB_PID=$DB/mariadbd.pid  # mariadbd runs as mysql: its pidfile must live where it can write
IN_NS=(nsenter "--net=/run/netns/$NETNS")
export SLURM_CONF=$ETC/slurm.conf
export MYSQL_UNIX_PORT=$MYSQL_SOCK  # libmariadb (slurmdbd's storage plugin) connects to this socket

log() { echo "[slurm/local/up] $*"; }
die() { echo "[slurm/local/up] ERROR: $*" >&2; exit 1; }

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...: poll every 0.25 s until COMMAND succeeds or time is up
    local deadline=$((SECONDS + $1))
    shift 2
    while ((SECONDS < deadline)); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.25
    done
    return 1
}

running() {  # running PIDFILE: the daemon named like the pidfile (slurmd.pid -> slurmd) is alive with that PID.
    # A zombie does not count (PID 1 here reaps slowly), nor a reused PID that now belongs to another program.
    local pid state name
    name=$(basename "$1" .pid)
    [ -s "$1" ] || return 1
    pid=$(cat "$1" 2>/dev/null) || return 1
    [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null || return 1
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ] || return 1
    state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) || return 1
    [ -n "$state" ] && [ "$state" != Z ] && [ "$state" != X ]
}

tail_log() {  # tail_log FILE: show the end of a daemon's log when it failed to start
    [ -f "$1" ] && { echo "--- last lines of $1:" >&2; tail -n 20 "$1" >&2; }
    return 0
}

[ "$(id -u)" = 0 ] || die "needs root (apt-get, ip netns, daemons)"
[ ${#MYSQL_SOCK} -lt 100 ] || die "SAEV_SLURM_DIR is too long for a unix socket path: $DIR"

# 1. Packages (once).
need=()
for cmd in slurmctld slurmd slurmdbd sbatch sacctmgr munged mungekey mariadbd mariadb-install-db; do
    command -v "$cmd" >/dev/null || need+=("$cmd")
done
if [ ${#need[@]} -gt 0 ]; then
    log "installing slurm, munge and mariadb with apt (missing: ${need[*]})"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        slurmctld slurmd slurm-client slurmdbd munge mariadb-server >/dev/null
fi

mkdir -p "$DIR" "$ETC" "$RUN" "$LOG" "$DIR/state" "$DIR/spool/slurmd" "$DIR/dev" "$DB" "$MUNGE_DIR"
chmod 755 "$DIR" "$ETC" "$RUN" "$LOG" "$MUNGE_DIR"

# 2. Configuration, rendered into *.new and compared with what the running daemons were started with.
for n in 0 1; do  # fake GPUs: character devices (regular files make the node INVAL)
    [ -c "$DIR/dev/gpu$n" ] || { rm -f "$DIR/dev/gpu$n"; mknod -m 666 "$DIR/dev/gpu$n" c 1 3; }
done

cat >"$ETC/slurm.conf.new" <<EOF
# Written by slurm/local/up.sh: a single-node test cluster on loopback, in network namespace $NETNS.
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=5,socket=$MUNGE_SOCK
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/slurmd
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=5
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
# For messages to slurmdbd the clients take the munge socket from here, not from AuthInfo (a Slurm quirk).
AccountingStoragePass=$MUNGE_SOCK
AccountingStorageTRES=gres/gpu,gres/gpu:$GPU_TYPE
# Jobs need a valid association, and their QOS must be one the association allows (as on real clusters).
AccountingStorageEnforce=associations,qos
GresTypes=gpu
ReturnToService=2
# Small on purpose: array indices must be < 20, so large arrays must be split (the pipeline does that).
MaxArraySize=20
MaxJobCount=10000
MinJobAge=600
KillWait=5
InactiveLimit=0
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$NCPU RealMemory=4000 Gres=gpu:$GPU_TYPE:2 State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
cat >"$ETC/gres.conf.new" <<EOF
NodeName=$HOST Name=gpu Type=$GPU_TYPE File=$DIR/dev/gpu[0-1]
EOF
cat >"$ETC/slurmdbd.conf.new" <<EOF
# Written by slurm/local/up.sh.
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCK
DbdHost=localhost
DbdAddr=127.0.0.1
SlurmUser=root
PidFile=$RUN/slurmdbd.pid
LogFile=$LOG/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
chmod 600 "$ETC/slurmdbd.conf.new"  # slurmdbd insists: owned by SlurmUser (root), mode 600

# mariadbd's options, so that changing them restarts it too.
MARIADB_ARGS=(--no-defaults --user=mysql "--datadir=$DB" --skip-networking "--socket=$MYSQL_SOCK"
    "--pid-file=$MARIADB_PID" "--log-error=$DB/mariadb.err" --innodb-lock-wait-timeout=900)
printf '%s\n' "${MARIADB_ARGS[@]}" >"$ETC/mariadbd.args.new"

changed=0
for f in slurm.conf gres.conf slurmdbd.conf mariadbd.args; do
    cmp -s "$ETC/$f.new" "$ETC/$f" || changed=1
done
pidfiles=("$RUN/slurmd.pid" "$RUN/slurmctld.pid" "$RUN/slurmdbd.pid" "$MARIADB_PID" "$RUN/munged.pid")
any_running=0
for p in "${pidfiles[@]}"; do running "$p" && any_running=1; done
if [ "$changed" = 1 ] && [ "$any_running" = 1 ]; then
    log "configuration changed: restarting the cluster"
    SAEV_SLURM_DIR=$DIR SAEV_SLURM_NETNS=$NETNS bash "$HERE/down.sh"
fi
for f in slurm.conf gres.conf slurmdbd.conf mariadbd.args; do mv -f "$ETC/$f.new" "$ETC/$f"; done
chown root:root "$ETC/slurmdbd.conf"
chmod 600 "$ETC/slurmdbd.conf"

# env.sh: what a shell needs to use this instance.
cat >"$DIR/env.sh" <<EOF
# Source me: settings for the local Slurm started by slurm/local/up.sh.
export SAEV_SLURM_DIR=$DIR
export SAEV_SLURM_NETNS=$NETNS
export SLURM_CONF=$ETC/slurm.conf
# Run a Slurm client inside the namespace, e.g. \`slurmns sinfo\`, \`slurmns sbatch --wrap hostname\`.
slurmns() { nsenter --net=/run/netns/$NETNS "\$@"; }
EOF

if [ "$DIR" = "$DEFAULT_DIR" ]; then  # let bare clients (no SLURM_CONF) find the default instance
    mkdir -p /etc/slurm
    if [ ! -e /etc/slurm/slurm.conf ] || head -n 1 /etc/slurm/slurm.conf | grep -q '^# Written by slurm/local/up.sh'; then
        cmp -s "$ETC/slurm.conf" /etc/slurm/slurm.conf || cp "$ETC/slurm.conf" /etc/slurm/slurm.conf
    else
        log "note: /etc/slurm/slurm.conf is not ours; left alone. Use: source $DIR/env.sh"
    fi
fi

# 3. Network namespace with loopback only. 127.0.0.2 too: with 127.0.0.1 as the only IPv4 address glibc's
#    AI_ADDRCONFIG reports no IPv4 and slurmdbd dies with "Address family not supported by protocol".
[ -e "/run/netns/$NETNS" ] || ip netns add "$NETNS"
ip -n "$NETNS" link set lo up
ip -n "$NETNS" -4 addr show dev lo | grep -q '127\.0\.0\.2/' || ip -n "$NETNS" addr add 127.0.0.2/8 dev lo

# 4. munged: private socket and key copy (unix socket: usable from inside and outside the namespace).
if [ ! -s /etc/munge/munge.key ]; then
    log "creating /etc/munge/munge.key"
    mkdir -p /etc/munge
    mungekey -c -f -k /etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key 2>/dev/null || true
    chmod 400 /etc/munge/munge.key
fi
if ! running "$RUN/munged.pid"; then
    log "starting munged"
    install -m 400 -o root -g root /etc/munge/munge.key "$MUNGE_DIR/munge.key"
    rm -f "$MUNGE_SOCK" "$MUNGE_SOCK.lock"
    "${IN_NS[@]}" munged --socket="$MUNGE_SOCK" --key-file="$MUNGE_DIR/munge.key" --pid-file="$RUN/munged.pid" \
        --log-file="$LOG/munged.log" --seed-file="$MUNGE_DIR/munged.seed" \
        || { tail_log "$LOG/munged.log"; die "munged did not start"; }
    wait_for 10 munged sh -c "munge -S '$MUNGE_SOCK' -n | unmunge -S '$MUNGE_SOCK'" \
        || { tail_log "$LOG/munged.log"; die "munged does not answer on $MUNGE_SOCK"; }
fi

# 5. MariaDB: own datadir, unix socket only, no /etc/mysql config.
chown mysql:mysql "$DB"
if [ ! -d "$DB/mysql" ]; then
    log "initialising mariadb in $DB"
    mariadb-install-db --no-defaults --user=mysql --datadir="$DB" --auth-root-authentication-method=socket \
        --skip-test-db >"$LOG/mariadb-install.log" 2>&1 || { tail_log "$LOG/mariadb-install.log"; die "mariadb-install-db failed"; }
fi
if ! running "$MARIADB_PID"; then
    log "starting mariadbd"
    rm -f "$MYSQL_SOCK"
    "${IN_NS[@]}" setsid mariadbd "${MARIADB_ARGS[@]}" </dev/null >/dev/null 2>&1 &
    wait_for 60 mariadb mariadb-admin --no-defaults --socket="$MYSQL_SOCK" ping \
        || { tail_log "$DB/mariadb.err"; die "mariadbd did not start"; }
    wait_for 10 "mariadb pidfile" test -s "$MARIADB_PID" || die "mariadbd wrote no pidfile $MARIADB_PID"
fi
mariadb --no-defaults --socket="$MYSQL_SOCK" -u root -e "
    CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
    ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
    FLUSH PRIVILEGES;"

# 6. Slurm daemons, in order, inside the namespace. sacctmgr hangs while slurmdbd is down: always under timeout.
sacctmgr_() { "${IN_NS[@]}" timeout 10 sacctmgr "$@"; }
if ! running "$RUN/slurmdbd.pid"; then
    log "starting slurmdbd"
    # slurmdbd has no -f: it reads slurmdbd.conf next to $SLURM_CONF.
    "${IN_NS[@]}" slurmdbd || { tail_log "$LOG/slurmdbd.log"; die "slurmdbd did not start"; }
    wait_for 60 slurmdbd sacctmgr_ -n show cluster || { tail_log "$LOG/slurmdbd.log"; die "slurmdbd does not answer"; }
fi
if ! sacctmgr_ -n -P show cluster format=cluster | grep -qx "$CLUSTER"; then
    sacctmgr_ -i add cluster "$CLUSTER" >/dev/null
fi
if ! running "$RUN/slurmctld.pid"; then
    log "starting slurmctld"
    "${IN_NS[@]}" slurmctld -f "$ETC/slurm.conf" || { tail_log "$LOG/slurmctld.log"; die "slurmctld did not start"; }
    wait_for 60 slurmctld "${IN_NS[@]}" timeout 5 scontrol ping || { tail_log "$LOG/slurmctld.log"; die "slurmctld does not answer"; }
fi
if ! sacctmgr_ -n -P show account format=account | grep -qx "$ACCOUNT"; then
    sacctmgr_ -i add account "$ACCOUNT" Cluster="$CLUSTER" Description="local tests" Organization=saev >/dev/null
fi
if ! sacctmgr_ -n -P show qos format=name | grep -qx "$QOS"; then
    sacctmgr_ -i add qos "$QOS" Description="local tests" >/dev/null
fi
if ! sacctmgr_ -n -P show assoc where user=root account="$ACCOUNT" format=user | grep -qx root; then
    sacctmgr_ -i add user root Account="$ACCOUNT" Cluster="$CLUSTER" >/dev/null
fi
# Every association of root (accounts root and saev) may use the QOS, whichever account a job is charged to.
if sacctmgr_ -n -P show assoc where user=root cluster="$CLUSTER" format=qos | grep -qvE "(^|,)$QOS(,|\$)"; then
    sacctmgr_ -i modify user root where cluster="$CLUSTER" set qos+="$QOS" >/dev/null
fi
if ! running "$RUN/slurmd.pid"; then
    log "starting slurmd"
    "${IN_NS[@]}" slurmd -f "$ETC/slurm.conf" || { tail_log "$LOG/slurmd.log"; die "slurmd did not start"; }
fi

node_ready() {
    local state
    state=$("${IN_NS[@]}" timeout 5 sinfo -h -o %T 2>/dev/null | head -n 1)
    case "${state//[^a-z]/}" in idle | mixed | allocated | completing) return 0 ;; *) return 1 ;; esac  # drop *~# flags
}
if ! wait_for 60 "the node" node_ready; then
    "${IN_NS[@]}" timeout 5 sinfo -N -l >&2 || true
    tail_log "$LOG/slurmd.log"
    die "the node did not become idle"
fi

log "cluster up ($HOST, $NCPU CPUs, 2 GPUs gpu:$GPU_TYPE, partition debug, QOS normal and $QOS, MaxArraySize=20); state in $DIR"
log "use it:  source $DIR/env.sh; nsenter --net=/run/netns/$NETNS sinfo   (or: slurmns sbatch --wrap hostname)"
log "stop it: bash $HERE/down.sh"
