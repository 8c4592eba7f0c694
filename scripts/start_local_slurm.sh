#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine (loopback), for tests and trying keyprep-slurm.
#
#   scripts/start_local_slurm.sh start [STATE_DIR]   install if needed, configure, start
#   scripts/start_local_slurm.sh stop  [STATE_DIR]   stop the daemons this script started
#   scripts/start_local_slurm.sh status [STATE_DIR]
#
# STATE_DIR (default /tmp/keyprep-slurm) holds slurm.conf, cgroup.conf, the spool, state and
# log files, the daemons' pid files and env.sh; use the cluster with
#   source STATE_DIR/env.sh    # sets SLURM_CONF
#   sinfo; sbatch ...; squeue
#
# Needs root (the daemons are started as root here) and,
# when slurm-wlm/munge are missing, apt-get (Debian/Ubuntu: slurm-wlm, munge). Without systemd:
# munged runs as user munge, slurmctld and slurmd as root, SlurmUser=root, no cgroups
# (proctrack/linuxproc, task/none). Exit codes: 0 running; 3 cannot run here (the reason is
# printed on stderr: not root, no apt-get, the daemons did not start).
# Ports: KEYPREP_SLURM_PORTS="6817 6818" (slurmctld, slurmd).
set -euo pipefail

ACTION=${1:-start}
STATE=${2:-/tmp/keyprep-slurm}
read -r CTLD_PORT SLURMD_PORT <<<"${KEYPREP_SLURM_PORTS:-6817 6818}"
NODE=$(hostname -s)

cannot() { echo "start_local_slurm.sh: cannot start a local SLURM: $*" >&2; exit 3; }
say() { echo "start_local_slurm.sh: $*" >&2; }

alive() {  # pid file -> running?
  [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

stop() {
  for name in slurmd slurmctld munged; do
    if alive "$STATE/$name.pid"; then
      pid=$(cat "$STATE/$name.pid")
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
      say "stopped $name ($pid)"
    fi
    rm -f "$STATE/$name.pid"
  done
}

status() {
  local ok=0
  for name in munged slurmctld slurmd; do
    if alive "$STATE/$name.pid"; then echo "$name: running ($(cat "$STATE/$name.pid"))";
    else echo "$name: not started by this script"; ok=1; fi
  done
  if [ -f "$STATE/env.sh" ]; then
    # shellcheck disable=SC1091
    . "$STATE/env.sh" && sinfo -h -o '%P %D %T %C' 2>/dev/null || true
  fi
  return $ok
}

case "$ACTION" in
  stop) stop; exit 0 ;;
  status) status; exit $? ;;
  start) ;;
  *) echo "usage: $0 {start|stop|status} [STATE_DIR]" >&2; exit 64 ;;
esac

[ "$(id -u)" = 0 ] || cannot "this needs root (the slurmd and slurmctld daemons run as root here)"
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
   || ! command -v munged >/dev/null || ! command -v sbatch >/dev/null; then
  command -v apt-get >/dev/null || cannot "slurm-wlm and munge are not installed and there is no apt-get"
  say "apt-get install slurm-wlm munge"
  if ! { apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null 2>&1 \
         || { apt-get update -qq >/dev/null 2>&1 \
              && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
                   slurm-wlm munge >/dev/null 2>&1; }; }; then
    cannot "apt-get install slurm-wlm munge failed"
  fi
fi

mkdir -p "$STATE/ctld" "$STATE/spool" "$STATE/log"
chmod 755 "$STATE"

# munge: the system key and socket (slurm's default); started only if none answers.
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  id munge >/dev/null 2>&1 || cannot "there is no munge user (is the munge package installed?)"
  if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
  chown munge:munge /etc/munge /etc/munge/munge.key
  chmod 700 /etc/munge
  chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge /var/lib/munge /var/log/munge
  chown munge:munge /run/munge /var/lib/munge /var/log/munge
  chmod 755 /run/munge
  runuser -u munge -- /usr/sbin/munged --force \
    || cannot "munged did not start (see /var/log/munge/munged.log)"
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
  munge -n | unmunge >/dev/null 2>&1 || cannot "munge does not answer"
  if [ -s /run/munge/munged.pid ]; then cp /run/munge/munged.pid "$STATE/munged.pid"; fi
fi

CPUS=$(nproc)
MEM_MB=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))
cat >"$STATE/slurm.conf" <<EOF
# Written by keyprep's scripts/start_local_slurm.sh: one node on loopback.
ClusterName=keyprep-local
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
KillWait=10
MinJobAge=3600
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=local Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
# slurm 22.05 knows no CgroupPlugin=disabled; without this file slurmd refuses to start.
cat >"$STATE/cgroup.conf" <<EOF
CgroupPlugin=cgroup/v1
IgnoreSystemd=yes
EOF
echo "export SLURM_CONF=$STATE/slurm.conf" >"$STATE/env.sh"
export SLURM_CONF="$STATE/slurm.conf"

if ! alive "$STATE/slurmctld.pid"; then
  slurmctld -c -f "$SLURM_CONF" || cannot "slurmctld did not start (see $STATE/log/slurmctld.log)"
fi
for _ in $(seq 100); do scontrol ping >/dev/null 2>&1 && break; sleep 0.1; done
scontrol ping >/dev/null 2>&1 || cannot "slurmctld does not answer (see $STATE/log/slurmctld.log)"
if ! alive "$STATE/slurmd.pid"; then
  slurmd -f "$SLURM_CONF" -N "$NODE" || cannot "slurmd did not start (see $STATE/log/slurmd.log)"
fi
for _ in $(seq 150); do
  state=$(sinfo -h -n "$NODE" -o '%T' 2>/dev/null || true)
  case "$state" in idle*|mixed*|allocated*) break ;; esac
  sleep 0.2
done
case "$state" in
  idle*|mixed*|allocated*) ;;
  *) cannot "node $NODE is '$state', not idle (see $STATE/log/slurmd.log)" ;;
esac
say "running: node $NODE ($CPUS CPUs, ${MEM_MB} MB), partition local; source $STATE/env.sh"
echo "SLURM_CONF=$SLURM_CONF"
