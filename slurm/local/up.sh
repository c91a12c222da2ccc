#!/usr/bin/env bash
# Start a real single-node Slurm (slurmctld + slurmd + slurmdbd with MariaDB accounting, munge) for tests and CI.
#
# Every Slurm daemon runs inside a network namespace that has only loopback, so nothing listens outside this
# machine. Two fake GPUs (character devices) let `--gpus-per-node=1` jobs schedule. MaxArraySize is deliberately
# small (20) so the pipeline's splitting of large job arrays is exercised.
#
# Needs root (apt, netns, daemons). Idempotent: a running cluster is left as it is.
#   bash slurm/local/up.sh                 # start
#   nsenter --net=/run/netns/saev-slurm sinfo
#   bash slurm/local/down.sh               # stop
# Settings: SAEV_SLURM_DIR (state, logs; default /tmp/saev-slurm), SAEV_SLURM_NETNS (default saev-slurm).
set -euo pipefail

DIR=${SAEV_SLURM_DIR:-/tmp/saev-slurm}
NETNS=${SAEV_SLURM_NETNS:-saev-slurm}
HOST=$(hostname -s)
NCPU=$(nproc)
DB_PASS=saev-local-slurm
IN_NS=(nsenter "--net=/run/netns/$NETNS")

log() { echo "[slurm/local/up] $*"; }

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local limit=$1 what=$2
    shift 2
    for _ in $(seq 1 "$((limit * 4))"); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.25
    done
    log "timed out waiting for $what"
    return 1
}

running() {  # running PIDFILE
    [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

if [ "$(id -u)" != 0 ]; then
    echo "slurm/local/up.sh needs root (apt-get, ip netns, daemons)" >&2
    exit 1
fi

# 1. Packages.
if ! command -v slurmctld >/dev/null || ! command -v slurmdbd >/dev/null || ! command -v munged >/dev/null \
    || ! command -v mariadbd >/dev/null || ! command -v sbatch >/dev/null || ! command -v slurmd >/dev/null; then
    log "installing slurm, munge and mariadb with apt"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        slurmctld slurmd slurm-client slurmdbd munge mariadb-server >/dev/null
fi

mkdir -p "$DIR"/{log,spool/slurmd,state,run,dev,mysql}
chmod 755 "$DIR"

# 2. Network namespace with loopback only (and 127.0.0.2 so glibc sees an IPv4 address: see notes).
if [ ! -e "/run/netns/$NETNS" ]; then
    ip netns add "$NETNS"
    ip netns exec "$NETNS" ip link set lo up
    ip netns exec "$NETNS" ip addr add 127.0.0.2/8 dev lo
fi

# 3. munge (unix socket: works across the namespace boundary).
if [ ! -f /etc/munge/munge.key ]; then
    mungekey -c -f -k /etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
fi
mkdir -p /run/munge && chown munge:munge /run/munge
if ! running /run/munge/munged.pid; then
    log "starting munged"
    runuser -u munge -- munged --pid-file=/run/munge/munged.pid
    cp /run/munge/munged.pid "$DIR/run/munged.pid"
fi

# 4. MariaDB on its default unix socket only (it runs as mysql: its pid and log live in its datadir).
mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
chown -R mysql:mysql "$DIR/mysql"
if [ ! -d "$DIR/mysql/mysql" ]; then
    log "initialising mariadb in $DIR/mysql"
    mariadb-install-db --user=mysql --datadir="$DIR/mysql" --auth-root-authentication-method=socket >/dev/null
fi
if ! running "$DIR/mysql/mariadbd.pid"; then
    log "starting mariadbd"
    (setsid mariadbd --user=mysql --datadir="$DIR/mysql" --skip-networking --socket=/run/mysqld/mysqld.sock \
        --pid-file="$DIR/mysql/mariadbd.pid" --log-error="$DIR/mysql/mariadb.err" </dev/null >/dev/null 2>&1 &)
    wait_for 60 "mariadb" mariadb-admin --socket=/run/mysqld/mysqld.sock ping
fi
mariadb --socket=/run/mysqld/mysqld.sock -e "
    CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
    FLUSH PRIVILEGES;"

# 5. Slurm configuration (Debian's clients read /etc/slurm/slurm.conf).
for n in 0 1; do
    [ -c "$DIR/dev/gpu$n" ] || mknod -m 666 "$DIR/dev/gpu$n" c 1 3
done
mkdir -p /etc/slurm
cat >/etc/slurm/slurm.conf <<EOF
# Written by slurm/local/up.sh: a single-node test cluster on loopback.
ClusterName=saevlocal
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=5
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/slurmd
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/linux
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStorageTRES=gres/gpu
GresTypes=gpu
ReturnToService=2
MaxArraySize=20
MinJobAge=600
KillWait=5
InactiveLimit=0
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$NCPU RealMemory=4000 Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
cat >/etc/slurm/gres.conf <<EOF
NodeName=$HOST Name=gpu File=$DIR/dev/gpu[0-1]
EOF
cat >/etc/slurm/slurmdbd.conf <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
SlurmUser=root
PidFile=$DIR/run/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
chown root:root /etc/slurm/slurmdbd.conf
chmod 600 /etc/slurm/slurmdbd.conf

# 6. Daemons, in order, inside the namespace.
if ! running "$DIR/run/slurmdbd.pid"; then
    log "starting slurmdbd"
    "${IN_NS[@]}" slurmdbd
    wait_for 60 "slurmdbd" "${IN_NS[@]}" timeout 5 sacctmgr -n show cluster
fi
if ! running "$DIR/run/slurmctld.pid"; then
    log "starting slurmctld"
    "${IN_NS[@]}" slurmctld
    wait_for 60 "slurmctld" "${IN_NS[@]}" timeout 5 scontrol ping
fi
if ! running "$DIR/run/slurmd.pid"; then
    log "starting slurmd"
    "${IN_NS[@]}" slurmd
fi
node_ready() {
    local state
    state=$("${IN_NS[@]}" sinfo -h -o %T 2>/dev/null | head -n 1)
    [ "$state" = idle ] || [ "$state" = mixed ] || [ "$state" = allocated ]
}
wait_for 90 "the node to be idle" node_ready
log "cluster up: run clients with: nsenter --net=/run/netns/$NETNS <sinfo|sbatch|sacct ...>"
