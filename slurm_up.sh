#!/usr/bin/env bash
# Bring up a single-node SLURM on this (Debian) machine, as root: munge, MariaDB, slurmdbd (so that
# sacct works), slurmctld and slurmd, started directly (no systemd). The node is this machine with
# its cores and no GPUs, in one partition `debug`. For trying `ablate.py --launcher slurm` on one
# machine and for the SLURM tests; `bash slurm_down.sh` stops what this started.
#
#   sudo bash slurm_up.sh            # installs the Debian packages when they are missing
#   python ablate.py --method pd --study paper --preset smoke --launcher slurm --gpus-per-job 0 \
#       --cpus-per-job 1 --wait
#
# A short credential lifetime (cred_expire) and backfill interval (bf_interval) let a requeued job
# start again within seconds instead of minutes. The daemons' PIDs go to $STATE/pids; logs to $STATE/log.
set -euo pipefail
STATE=${DDIL_SLURM_STATE:-/var/lib/ddil-slurm}
say() { echo "slurm_up: $*"; }
if [ "$(id -u)" != 0 ]; then echo "slurm_up: must run as root (it installs packages and starts daemons)" >&2; exit 1; fi
if sinfo -h >/dev/null 2>&1 && [ -f "$STATE/pids" ]; then say "already up ($(sinfo -h -o '%P %D nodes %t'))"; exit 0; fi

need=()
for b in munged:munge slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client slurmdbd:slurmdbd mariadbd:mariadb-server; do
  command -v "${b%%:*}" >/dev/null 2>&1 || need+=("${b##*:}")
done
if [ ${#need[@]} -gt 0 ]; then
  command -v apt-get >/dev/null || { echo "slurm_up: no apt-get here; install ${need[*]} yourself" >&2; exit 1; }
  say "installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null; }
fi

mkdir -p "$STATE"/{log,spool/ctld,spool/d,mysql,run} /run/munge /etc/slurm
: > "$STATE/pids"
host=$(hostname -s)
cpus=$(nproc)
mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))

# munge: one key, the daemon as the munge user
[ -s /etc/munge/munge.key ] || { dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; }
chown -R munge:munge /etc/munge /run/munge 2>/dev/null || true
chmod 700 /etc/munge; chmod 400 /etc/munge/munge.key
if ! [ -S /run/munge/munge.socket.2 ] || ! pgrep -x munged >/dev/null; then
  runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
  for _ in $(seq 50); do [ -s /run/munge/munged.pid ] && [ -S /run/munge/munge.socket.2 ] && break; sleep 0.2; done
  [ -s /run/munge/munged.pid ] || { echo "slurm_up: munged did not start (see /var/log/munge/munged.log)" >&2; exit 1; }
  echo "munged $(cat /run/munge/munged.pid)" >> "$STATE/pids"
fi

# MariaDB, for slurmdbd's accounting database
if ! mysqladmin ping >/dev/null 2>&1; then
  [ -d "$STATE/mysql/mysql" ] || mariadb-install-db --user=mysql --datadir="$STATE/mysql" >/dev/null
  chown -R mysql:mysql "$STATE/mysql"
  mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
  /usr/sbin/mariadbd --user=mysql --datadir="$STATE/mysql" --socket=/run/mysqld/mysqld.sock \
    --pid-file=/run/mysqld/mariadb.pid --skip-networking=0 --bind-address=127.0.0.1 \
    >"$STATE/log/mariadb.log" 2>&1 &
  for _ in $(seq 60); do mysqladmin ping >/dev/null 2>&1 && break; sleep 0.5; done
  echo "mariadbd $!" >> "$STATE/pids"
fi
mysql -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
          GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"

cat > /etc/slurm/slurmdbd.conf <<EOF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
PidFile=$STATE/run/slurmdbd.pid
LogFile=$STATE/log/slurmdbd.log
EOF
chmod 600 /etc/slurm/slurmdbd.conf

cat > /etc/slurm/slurm.conf <<EOF
ClusterName=ddil
SlurmctldHost=$host
AuthType=auth/munge
AuthInfo=cred_expire=10
SlurmUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
KillWait=30
MinJobAge=600
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
StateSaveLocation=$STATE/spool/ctld
SlurmdSpoolDir=$STATE/spool/d
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF

/usr/sbin/slurmdbd
for _ in $(seq 60); do sacctmgr -n list cluster >/dev/null 2>&1 && break; sleep 0.5; done
echo "slurmdbd $(cat "$STATE/run/slurmdbd.pid")" >> "$STATE/pids"
sacctmgr -i add cluster ddil >/dev/null 2>&1 || true
/usr/sbin/slurmctld -c                 # -c: a clean start, no jobs from an earlier bring-up
/usr/sbin/slurmd
for _ in $(seq 60); do
  [ "$(sinfo -h -o %t 2>/dev/null)" = idle ] && break
  scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true
  sleep 0.5
done
echo "slurmctld $(cat "$STATE/run/slurmctld.pid")" >> "$STATE/pids"
echo "slurmd $(cat "$STATE/run/slurmd.pid")" >> "$STATE/pids"
state=$(sinfo -h -o %t)
if [ "$state" != idle ]; then echo "slurm_up: the node is '$state', not idle; see $STATE/log" >&2; exit 1; fi
say "up: partition debug, node $host ($cpus CPUs, no GPUs); sacct works; stop it with: bash slurm_down.sh"
