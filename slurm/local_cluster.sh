#!/usr/bin/env bash
# A real Slurm on localhost (one node, or several), for the tests and for trying the job scripts on a
# workstation.
#
#   sudo slurm/local_cluster.sh install   # apt-get install slurm-wlm munge (Debian/Ubuntu), once
#   sudo slurm/local_cluster.sh start     # munged + slurmctld + slurmd; waits until the node is idle
#   sudo LOCAL_SLURM_NODES=2 slurm/local_cluster.sh start  # nodes n1, n2: one slurmd each, same host
#   eval "$(slurm/local_cluster.sh env)"  # export SLURM_CONF so sbatch/squeue/scontrol find this cluster
#   sbatch ... ; squeue ; scontrol show job <id>
#   sudo slurm/local_cluster.sh status
#   sudo slurm/local_cluster.sh stop      # stops the daemons by their pid files (munged only if we started it)
#
# Runs as root (slurmd launches jobs, munged needs its key). `start` installs nothing: run `install`
# first (the pytest fixture in tests/slurm/conftest.py does that by itself when it can). start and stop
# are idempotent. Everything but the munge key and munged's socket lives under one state directory, so
# this never touches /etc/slurm and can sit beside a real Slurm client configuration; the daemons'
# ports are configurable for the same reason.
#
# Several nodes use Slurm's multiple-slurmd support (Debian's slurm-wlm is built with it): one
# `slurmd -N nI` per node, each NodeName with its own Port, and spool/pid/log paths containing %n. The nodes
# are named n1..nN, which no resolver knows: everything reaches them through NodeAddr=127.0.0.1, as on
# clusters whose node names are not host names (job scripts must rendezvous at NodeAddr, not the name).
#
# Environment:
#   LOCAL_SLURM_DIR        state directory: slurm.conf, spool, state, pid and log files
#                          (default /tmp/megatron-resonance-slurm)
#   LOCAL_SLURM_CTLD_PORT  slurmctld port (default 6817)
#   LOCAL_SLURM_NODES      number of nodes (default 1: one node named after this host)
#   LOCAL_SLURM_D_PORT     slurmd port of the first node (default 6818); node I listens on this + I - 1
#   LOCAL_SLURM_CPUS       CPUs each node offers (default: nproc, at least 2)
#                          (memory: each node offers the host's MemTotal less 5 %, divided by the nodes)
#   LOCAL_SLURM_TIMEOUT    seconds `start` waits for the nodes to turn idle (default 60)
set -euo pipefail

# ---- configuration ------------------------------------------------------------------------------
STATE_DIR=${LOCAL_SLURM_DIR:-/tmp/megatron-resonance-slurm}
CTLD_PORT=${LOCAL_SLURM_CTLD_PORT:-6817}
SLURMD_PORT=${LOCAL_SLURM_D_PORT:-6818}
NODES=${LOCAL_SLURM_NODES:-1}
TIMEOUT=${LOCAL_SLURM_TIMEOUT:-60}
CONF=$STATE_DIR/etc/slurm.conf
LOG_DIR=$STATE_DIR/log
CTLD_PID=$STATE_DIR/run/slurmctld.pid
MUNGE_KEY=/etc/munge/munge.key
MUNGED_PID=/run/munge/munged.pid
# Present when a `start` launched munged; the last `stop` on this host (any state directory) ends it.
MUNGED_OURS=/run/munge/started-by-local-cluster
PACKAGES=(slurm-wlm munge)
HOST=$(hostname -s)
[[ $NODES =~ ^[1-9][0-9]*$ ]] || { echo "local_cluster: error: LOCAL_SLURM_NODES must be >= 1" >&2; exit 2; }
if ((NODES == 1)); then NODE_NAMES=("$HOST"); else mapfile -t NODE_NAMES < <(printf 'n%d\n' $(seq "$NODES")); fi
# slurmd_pid NODE: that node's slurmd pid file (SlurmdPidFile below, %n expanded).
slurmd_pid() { echo "$STATE_DIR/run/slurmd-$1.pid"; }

export SLURM_CONF=$CONF

log() { echo "local_cluster: $*" >&2; }
die() { log "error: $*"; exit 1; }

need_root() { [[ $(id -u) == 0 ]] || die "must run as root (slurmd launches jobs, munged reads its key)"; }

have_slurm() { command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
  && command -v munged >/dev/null; }

# pid_alive PIDFILE NAME: the pid in PIDFILE is a live (not zombie) process whose command is NAME.
pid_alive() {
  local pid stat
  [[ -s $1 ]] || return 1
  pid=$(<"$1")
  [[ $pid =~ ^[0-9]+$ ]] && read -r stat 2>/dev/null <"/proc/$pid/stat" || return 1
  [[ $stat == "$pid ($2) "* && $stat != "$pid ($2) Z"* ]]
}

# other_slurm_daemons: some slurmctld or slurmd (zombies aside) still runs on this host.
other_slurm_daemons() {
  local file stat
  for file in /proc/[0-9]*/stat; do
    read -r stat 2>/dev/null <"$file" || continue # builtin read: no fork per process
    [[ $stat =~ ^[0-9]+\ \((slurmctld|slurmd)\)\ [^Z] ]] && return 0
  done
  return 1
}

# port_taken PORT: something already listens on 127.0.0.1:PORT.
port_taken() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

munge_works() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

# ---- install ------------------------------------------------------------------------------------
cmd_install() {
  need_root
  if have_slurm; then log "slurm and munge already installed"; return; fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  # No recommends: slurm-wlm recommends every plugin's -dev package (hdf5, influxdb, rrd, ...).
  apt-get install -y -q --no-install-recommends "${PACKAGES[@]}"
}

# ---- munge --------------------------------------------------------------------------------------
start_munge() {
  if [[ ! -s $MUNGE_KEY ]]; then
    log "writing a munge key to $MUNGE_KEY"
    install -d -o munge -g munge -m 700 /etc/munge
    (umask 077 && dd if=/dev/urandom of="$MUNGE_KEY" bs=1024 count=1 status=none)
    chown munge:munge "$MUNGE_KEY"
    chmod 400 "$MUNGE_KEY"
  fi
  if munge_works; then return; fi # a system munged (systemd, or an earlier start) is serving
  install -d -o munge -g munge -m 755 /run/munge
  install -d -o munge -g munge -m 700 /var/lib/munge /var/log/munge
  log "starting munged"
  # As the munge user, like the Debian service. --force: start even where a container image leaves
  # lax permissions on munge's directories, which munged otherwise refuses; a no-op elsewhere.
  runuser -u munge -- munged --force
  touch "$MUNGED_OURS"
  local _
  for _ in $(seq 50); do munge_works && return; sleep 0.1; done
  die "munged did not come up; see /var/log/munge/munged.log"
}

# ---- slurm.conf ---------------------------------------------------------------------------------
write_conf() {
  local cpus mem_mb
  # At least 2 CPUs so a 2-task job fits even on a 1-core runner (config_overrides lets slurmd believe it).
  cpus=${LOCAL_SLURM_CPUS:-$(($(nproc) > 2 ? $(nproc) : 2))}
  # The host's memory less 5 % for the OS and the daemons, split between the nodes (they share the host).
  mem_mb=$(awk -v nodes="$NODES" '/^MemTotal:/ {print int($2 / 1024 * 0.95 / nodes)}' /proc/meminfo)
  mkdir -p "$STATE_DIR"/{etc,run,state,spool} "$LOG_DIR"
  cat >"$CONF.tmp" <<EOF
# Written by slurm/local_cluster.sh for host $HOST; rewritten on every start.
ClusterName=localcluster
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire is also how long a requeued job waits before it may start again (default 120 s).
AuthInfo=cred_expire=10
CredType=cred/munge
MpiDefault=none

StateSaveLocation=$STATE_DIR/state
# %n: the node name, so that several slurmd (one per node, multiple-slurmd) keep apart.
SlurmdSpoolDir=$STATE_DIR/spool/%n
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$STATE_DIR/run/slurmd-%n.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info

# No cgroups: processes tracked through /proc, no task binding, so it works in containers
# (cgroup.conf, written below, keeps slurmd's own cgroup plugin inert).
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none

# Several small jobs share a node: CPUs and memory are consumable. RealMemory (below) is each node's share
# of the host; a job without --mem gets DefMemPerCPU per CPU (its share), --mem=0 the whole node. Nothing
# enforces the limits (no cgroups): they only keep the scheduler from overcommitting the host.
SchedulerType=sched/backfill
# Scheduling passes every 2 s, not every 30/60 s: a requeued job starts as soon as it may (cheap on one node).
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
DefMemPerCPU=$((mem_mb / cpus))
JobRequeue=1
ReturnToService=2
# Believe the node line below even where slurmd detects other hardware (sockets/threads in VMs).
SlurmdParameters=config_overrides
# Quick turnarounds for tests: kill 5 s after SIGTERM, keep finished jobs visible to scontrol 5 min.
KillWait=5
MinJobAge=300

EOF
  local i
  for i in "${!NODE_NAMES[@]}"; do
    echo "NodeName=${NODE_NAMES[i]} NodeAddr=127.0.0.1 Port=$((SLURMD_PORT + i)) CPUs=$cpus" \
      "RealMemory=$mem_mb State=UNKNOWN"
  done >>"$CONF.tmp"
  echo "PartitionName=local Nodes=$(IFS=,; echo "${NODE_NAMES[*]}") Default=YES MaxTime=INFINITE State=UP" \
    >>"$CONF.tmp"
  mv "$CONF.tmp" "$CONF"

  # slurmd loads a cgroup plugin even when no plugin above uses cgroups. Slurm 22.05 has no
  # CgroupPlugin=disabled (24.05 added it), and its autodetect picks cgroup/v2 on unified hosts, whose
  # init wants systemd over dbus or a writable /sys/fs/cgroup (fatal in containers; fatal "Hybrid mode
  # is not supported" on hybrid hosts). cgroup/v1's init touches nothing, so pin it before 24.05.
  local version plugin=cgroup/v1
  version=$(slurmd -V | awk '{print $2}')
  if [[ $(printf '%s\n' 24.05 "$version" | sort -V | head -n1) == 24.05 ]]; then plugin=disabled; fi
  printf '# Written by slurm/local_cluster.sh for slurmd %s.\nCgroupPlugin=%s\n' "$version" "$plugin" \
    >"$STATE_DIR/etc/cgroup.conf"
}

# ---- start / stop / status ----------------------------------------------------------------------
daemon_died() { [[ -s $1 ]] && ! pid_alive "$1" "$2"; }

# all_slurmd_alive: every node's slurmd runs.
all_slurmd_alive() {
  local node
  for node in "${NODE_NAMES[@]}"; do pid_alive "$(slurmd_pid "$node")" slurmd || return 1; done
}

# nodes_state: one word for the nodes: `up` when every node is idle/mixed/allocated/completing, else the
# first other state (`unreachable` when slurmctld does not answer); drained or down nodes are resumed.
nodes_state() {
  local states node state
  states=$(sinfo -h -N -o '%N %T' 2>/dev/null) || { echo unreachable; return; }
  for node in "${NODE_NAMES[@]}"; do
    state=$(awk -v n="$node" '$1 == n {print $2; exit}' <<<"$states")
    case $state in
      idle | mixed | allocated | completing) ;;
      drain* | down*)
        scontrol update NodeName="$node" State=RESUME >/dev/null 2>&1 || true
        echo "$node:$state"; return ;;
      *) echo "$node:${state:-unknown}"; return ;;
    esac
  done
  echo up
}

cmd_start() {
  need_root
  have_slurm || die "slurm-wlm/munge not installed; run: $0 install"
  start_munge
  if pid_alive "$CTLD_PID" slurmctld && all_slurmd_alive; then
    log "already running ($STATE_DIR)"
  else
    write_conf
    if ! pid_alive "$CTLD_PID" slurmctld; then
      # Else sinfo below would talk to whoever holds the port and report *their* node.
      port_taken "$CTLD_PORT" && die "port $CTLD_PORT is taken (another slurmctld?); set LOCAL_SLURM_CTLD_PORT"
      log "starting slurmctld"
      rm -f "$CTLD_PID" # stale, from a crash or a reboot
      slurmctld -f "$CONF"
    fi
    local i node pid
    for i in "${!NODE_NAMES[@]}"; do
      node=${NODE_NAMES[i]} pid=$(slurmd_pid "${NODE_NAMES[i]}")
      pid_alive "$pid" slurmd && continue
      port_taken $((SLURMD_PORT + i)) \
        && die "port $((SLURMD_PORT + i)) is taken (another slurmd?); set LOCAL_SLURM_D_PORT"
      log "starting slurmd for node $node"
      rm -f "$pid"
      mkdir -p "$STATE_DIR/spool/$node"
      slurmd -f "$CONF" -N "$node"
    done
  fi
  local waited=0 state="" node
  while ((waited < TIMEOUT)); do
    # A daemon that wrote its pid file and died (bad config, say) will not come back: fail now. No pid
    # file yet only means a slow start: slurmd took over 3 s to write it on a loaded 2-core machine.
    state=""
    daemon_died "$CTLD_PID" slurmctld && state="slurmctld died"
    for node in "${NODE_NAMES[@]}"; do
      daemon_died "$(slurmd_pid "$node")" slurmd && state="slurmd of $node died"
    done
    [[ -z $state ]] || break
    state=$(nodes_state)
    [[ $state == up ]] && break
    sleep 1
    waited=$((waited + 1))
  done
  if [[ $state != up ]]; then
    tail -n 20 "$LOG_DIR"/*.log >&2 || true
    die "nodes not up after ${waited}s (${state}); logs in $LOG_DIR"
  fi
  log "up: node(s) $(IFS=,; echo "${NODE_NAMES[*]}") ready; export SLURM_CONF=$CONF"
}

# stop_daemon PIDFILE NAME: SIGTERM, wait up to 20 s, then SIGKILL.
stop_daemon() {
  pid_alive "$1" "$2" || { rm -f "$1"; return; }
  local pid _
  pid=$(<"$1")
  log "stopping $2 ($pid)"
  kill "$pid"
  for _ in $(seq 200); do pid_alive "$1" "$2" || break; sleep 0.1; done
  if pid_alive "$1" "$2"; then log "$2 ignored SIGTERM; killing"; kill -9 "$pid"; fi
  rm -f "$1"
}

cmd_stop() {
  # Cancel every job first: with proctrack/linuxproc a job's processes outlive slurmd.
  if pid_alive "$CTLD_PID" slurmctld && [[ -n $(squeue -h -o %i 2>/dev/null) ]]; then
    log "cancelling jobs"
    squeue -h -o %i | xargs -r scancel --full 2>/dev/null || true
    local _
    for _ in $(seq 30); do [[ -z $(squeue -h -o %i 2>/dev/null) ]] && break; sleep 0.5; done
  fi
  # Every slurmd of this state directory, whatever LOCAL_SLURM_NODES says now (slurmd.pid: older versions).
  local pid
  for pid in "$STATE_DIR"/run/slurmd-*.pid "$STATE_DIR"/run/slurmd.pid; do
    [[ -e $pid ]] && stop_daemon "$pid" slurmd
  done
  stop_daemon "$CTLD_PID" slurmctld
  if [[ -e $MUNGED_OURS ]]; then
    # Another cluster (e.g. a second test session with its own LOCAL_SLURM_DIR) may still need munged.
    if other_slurm_daemons; then
      log "leaving munged running: other Slurm daemons on this host use it"
    else
      stop_daemon "$MUNGED_PID" munged
      rm -f "$MUNGED_OURS"
    fi
  fi
}

cmd_status() {
  local rc=0 node pid
  if pid_alive "$CTLD_PID" slurmctld; then echo "slurmctld: running (pid $(<"$CTLD_PID"))"
  else echo "slurmctld: stopped"; rc=3; fi
  for node in "${NODE_NAMES[@]}"; do
    pid=$(slurmd_pid "$node")
    if pid_alive "$pid" slurmd; then echo "slurmd $node: running (pid $(<"$pid"))"
    else echo "slurmd $node: stopped"; rc=3; fi
  done
  if munge_works; then echo "munged: running"; else echo "munged: stopped"; rc=3; fi
  echo "SLURM_CONF=$CONF"
  if ((rc == 0)); then sinfo; fi
  return $rc
}

case ${1:-} in
  install) cmd_install ;;
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) echo "usage: $0 install|start|stop|status|env" >&2; exit 2 ;;
esac
