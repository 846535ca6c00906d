#!/usr/bin/env bash
# A real single-node Slurm cluster on this machine, from Debian's packages, for trying the job
# scripts in jobs/slurm/ and for the `slurm` test. Works in a container without systemd (the daemons
# run as root in the background) and leaves any system Slurm or MUNGE alone: everything (config,
# MUNGE key and socket, state, logs, pid files) lives in one directory, and free ports are chosen.
#
#   bash tools/slurm_local.sh start [DIR]    # installs slurmctld slurmd munge slurm-client if missing,
#                                            # starts munged, slurmctld, slurmd; waits for the node
#   export SLURM_CONF=DIR/slurm.conf         # then sinfo, sbatch, srun, squeue, scancel use it
#   bash tools/slurm_local.sh status [DIR]
#   bash tools/slurm_local.sh stop [DIR]     # cancels its jobs and stops the three daemons
#
# DIR defaults to $RANKTUNE_SLURM_DIR or /tmp/ranktune-slurm. The node gets this machine's CPUs
# (`slurmd -C`) and no GPUs (GRES); the partition is `local`. No cgroups: proctrack/linuxproc and
# task/none. A requeued job starts again about 6 s after it left (AuthInfo cred_expire=5; 120 s on
# a default cluster).
set -euo pipefail

usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; }

cmd=${1:-}
dir=${2:-${RANKTUNE_SLURM_DIR:-/tmp/ranktune-slurm}}
case "$cmd" in start | stop | status) ;; -h | --help | help) usage; exit 0 ;; *) usage >&2; exit 2 ;; esac
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
conf=$dir/slurm.conf
export SLURM_CONF=$conf

pid_alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# Stops the daemon whose pid file is $1 (TERM, then KILL after 10 s).
stop_daemon() {
  local pidfile=$1 name=$2 pid
  pid_alive "$pidfile" || { rm -f "$pidfile"; return 0; }
  pid=$(cat "$pidfile")
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then
    echo "slurm_local: $name (pid $pid) did not stop on SIGTERM: killing it"
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
}

if [ "$cmd" = stop ]; then
  if pid_alive "$dir/slurmctld.pid"; then
    # Its own cluster: every job in it is one of ours.
    mapfile -t jobs < <(squeue -h -o %A 2>/dev/null || true)
    [ ${#jobs[@]} -eq 0 ] || scancel "${jobs[@]}" 2>/dev/null || true
    for _ in $(seq 50); do [ -z "$(squeue -h -t RUNNING,COMPLETING 2>/dev/null)" ] && break; sleep 0.2; done
  fi
  stop_daemon "$dir/slurmd.pid" slurmd
  stop_daemon "$dir/slurmctld.pid" slurmctld
  stop_daemon "$dir/munged.pid" munged
  echo "slurm_local: stopped (state kept in $dir)"
  exit 0
fi

if [ "$cmd" = status ]; then
  for d in munged slurmctld slurmd; do
    if pid_alive "$dir/$d.pid"; then echo "$d: running (pid $(cat "$dir/$d.pid"))"; else echo "$d: not running"; fi
  done
  pid_alive "$dir/slurmctld.pid" && sinfo
  exit 0
fi

# --- start ---------------------------------------------------------------------------------
if pid_alive "$dir/slurmctld.pid" && pid_alive "$dir/slurmd.pid" && pid_alive "$dir/munged.pid"; then
  echo "slurm_local: already running in $dir"
  echo "export SLURM_CONF=$conf"
  exit 0
fi

packages=(slurmctld slurmd slurm-client munge)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "slurm_local: installing ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
[ "$(id -u)" -eq 0 ] || { echo "slurm_local: the daemons run as root: run this as root" >&2; exit 1; }

mkdir -p "$dir"/{state,spool,log,munge,pmix}
chmod 711 "$dir/munge"  # the socket inside must be reachable; the key stays 0400

# A port is taken when some socket listens on it (IPv4 or IPv6).
port_in_use() {
  local hex
  hex=$(printf '%04X' "$1")
  awk -v p=":$hex" '$4 == "0A" && substr($2, length($2) - 4) == p { found = 1 } END { exit !found }' \
    /proc/net/tcp /proc/net/tcp6 2>/dev/null
}
# Two free neighbouring ports from 6817 (Slurm's default) on, for slurmctld and slurmd.
ctld_port=6817
while port_in_use "$ctld_port" || port_in_use $((ctld_port + 1)); do ctld_port=$((ctld_port + 2)); done
slurmd_port=$((ctld_port + 1))

# Its own MUNGE: key, socket, seed and log in $dir/munge.
if [ ! -s "$dir/munge/munge.key" ]; then
  dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
  chmod 400 "$dir/munge/munge.key"
fi
munge_socket=$dir/munge/munge.socket
if ! pid_alive "$dir/munged.pid"; then
  rm -f "$munge_socket" "$munge_socket.lock"
  # --force: munged runs as root here and $dir may sit under a world-writable /tmp.
  munged --force --key-file="$dir/munge/munge.key" --socket="$munge_socket" --pid-file="$dir/munged.pid" \
    --log-file="$dir/log/munged.log" --seed-file="$dir/munge/munged.seed"
fi

node=$(hostname -s)
# This machine's sockets/cores/threads as slurmd sees them; RealMemory is left out so a busy
# machine still registers, and GPUs (Gres) because no gres.conf is written.
node_hw=$(slurmd -C | head -1 | sed -e 's/^NodeName=[^ ]* //' -e 's/ RealMemory=[0-9]*//' -e 's/ Gres=[^ ]*//')
cat >"$conf" <<EOF
# Written by tools/slurm_local.sh: a single-node cluster on $node.
ClusterName=ranktune-local
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$munge_socket,cred_expire=5
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# Schedule every second (default 60 s), so that a requeued job starts again at once.
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
MailProg=/bin/true
MpiDefault=none
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MinJobAge=600
KillWait=30
NodeName=$node NodeAddr=127.0.0.1 $node_hw State=UNKNOWN
PartitionName=local Nodes=$node Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF

# PMIx's per-step client directories (else /tmp/spmix_appdir_UID_JOB.STEP, shared with any other
# cluster on this machine).
echo "PMIxCliTmpDirBase=$dir/pmix" >"$dir/mpi.conf"

pid_alive "$dir/slurmctld.pid" || slurmctld -f "$conf"
pid_alive "$dir/slurmd.pid" || slurmd -f "$conf" -N "$node"

# Ready when the node is idle (or already running jobs).
state=""
for _ in $(seq 120); do
  state=$(sinfo -h -n "$node" -o %T 2>/dev/null || true)
  case "$state" in idle* | mixed* | allocated*) break ;; esac
  sleep 0.5
done
case "$state" in
  idle* | mixed* | allocated*) ;;
  *)
    echo "slurm_local: node $node is '${state:-unknown}' after 60 s; logs in $dir/log:" >&2
    tail -n 20 "$dir/log/slurmctld.log" "$dir/log/slurmd.log" "$dir/log/munged.log" >&2 || true
    exit 1
    ;;
esac
echo "slurm_local: node $node is $state (slurmctld port $ctld_port); state, logs and config in $dir"
echo "export SLURM_CONF=$conf"
