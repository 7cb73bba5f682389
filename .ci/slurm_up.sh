#!/usr/bin/env bash
# Bring up a one-node SLURM cluster on this Debian 12 machine, as root, without systemd.
#
# Used by .ci/run before the test suite, so that the tests marked `slurm` run against a real
# scheduler (slurmctld + slurmd + munge on 127.0.0.1). Safe to run twice: a running cluster is
# left alone. Prints the node state when it is ready; exits non-zero when it cannot start.
#
#   bash .ci/slurm_up.sh          # install if needed, start, wait for the node to be idle
#   bash .ci/slurm_up.sh down     # stop the daemons this script started
set -euo pipefail

STATE=/var/spool/s2ap-slurm
CONF_DIR=/etc/slurm
LOG_DIR=/var/log/s2ap-slurm

stop() {
  # By pid file, but only a process that is that daemon (a stale file may name a reused pid).
  for daemon in slurmctld slurmd; do
    pid=$(cat "$STATE/$daemon.pid" 2>/dev/null || true)
    if [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$daemon" ]; then
      kill "$pid"
      for _ in $(seq 50); do [ -d "/proc/$pid" ] || break; sleep 0.1; done
    fi
  done
}

if [ "${1:-up}" = down ]; then
  stop
  exit 0
fi

if [ "$(id -u)" != 0 ]; then
  echo "slurm_up.sh: must run as root (it installs packages and starts daemons)" >&2
  exit 1
fi

if sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
  echo "slurm_up.sh: a cluster is already up: $(sinfo -h -o '%P %D %T')"
  exit 0
fi

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq slurm-wlm munge >/dev/null
fi

# munge: the key, its run folder, the daemon as the munge user.
if [ ! -s /etc/munge/munge.key ]; then
  mungekey --create --keyfile /etc/munge/munge.key 2>/dev/null || \
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
fi
chown munge:munge /etc/munge/munge.key && chmod 0600 /etc/munge/munge.key
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  runuser -u munge -- /usr/sbin/munged --force  # --force: a stale socket from a killed munged
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
fi

# slurm.conf: this host as controller and the only node, addressed by 127.0.0.1 (no DNS needed).
host=$(hostname -s)
mkdir -p "$CONF_DIR" "$STATE/ctld" "$STATE/d" "$LOG_DIR"
node=$(slurmd -C | head -n 1 | sed 's/ *UpTime=.*//')
cat > "$CONF_DIR/slurm.conf" <<CONF
ClusterName=s2ap
SlurmctldHost=${host}(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobRequeue=1
ReturnToService=2
MinJobAge=3600
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$LOG_DIR/jobcomp.log
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
${node} NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF

stop
slurmctld
slurmd
for _ in $(seq 120); do
  state=$(sinfo -h -o %T 2>/dev/null | head -n 1 || true)
  [ "$state" = idle ] && break
  sleep 0.5
done
if [ "$state" != idle ]; then
  echo "slurm_up.sh: the node did not become idle (state '${state:-none}'); logs in $LOG_DIR" >&2
  tail -n 20 "$LOG_DIR"/slurmctld.log "$LOG_DIR"/slurmd.log >&2 || true
  exit 1
fi
srun -N1 -n1 true
echo "slurm_up.sh: cluster up: $(sinfo -h -o '%P %D %T %c CPUs')"
