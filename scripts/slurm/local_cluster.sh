#!/usr/bin/env bash
# Start a one-machine Slurm cluster (munge + slurmctld + slurmd) for tests: bash scripts/slurm/local_cluster.sh DIR [NODES]
# NODES=1: one node "localhost" with all CPUs; NODES=2: two nodes n1, n2 on 127.0.0.1 through slurmd's
# multiple-daemon mode (-N), one CPU each, for the multi-node script. Needs root and Debian's slurm-wlm + munge
# (tests/test_slurm.py installs them). Prints the SLURM_CONF to export; stop with: bash local_cluster.sh DIR stop
set -euo pipefail
dir=$(realpath -m "$1"); nodes=${2:-1}
if [[ $nodes == stop ]]; then
  pkill -f "slurmd -f $dir" || true; pkill -f "slurmctld -f $dir" || true; exit 0
fi
mkdir -p "$dir"/{state,spool,log,run}
host=$(hostname -s)
cpus=$(getconf _NPROCESSORS_ONLN)  # the machine's CPUs (nproc would follow the caller's OMP_NUM_THREADS)
if [[ $nodes == 1 ]]; then
  nodelines="NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=2000 State=UNKNOWN"
  partnodes=$host
else
  nodelines="NodeName=n[1-$nodes] NodeHostname=$host NodeAddr=127.0.0.1 Port=17100-$((17100 + nodes - 1)) CPUs=1 RealMemory=1000 State=UNKNOWN"
  partnodes="n[1-$nodes]"
fi
cat > "$dir/slurm.conf" <<CONF
ClusterName=trainer-test
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=16817
SlurmdPort=16818
AuthType=auth/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
SchedulerType=sched/backfill
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
KillWait=10
$nodelines
PartitionName=debug Nodes=$partnodes Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
export SLURM_CONF="$dir/slurm.conf"
pgrep -x munged >/dev/null || (mkdir -p /run/munge && chown munge:munge /run/munge 2>/dev/null; munged --force || munged -f)
slurmctld -f "$SLURM_CONF" -c
if [[ $nodes == 1 ]]; then
  mkdir -p "$dir/spool/$host"; slurmd -f "$SLURM_CONF" -c
else
  for i in $(seq 1 "$nodes"); do mkdir -p "$dir/spool/n$i"; slurmd -f "$SLURM_CONF" -c -N "n$i"; done
fi
for _ in $(seq 1 60); do
  if sinfo -h -o %T 2>/dev/null | grep -qE "idle"; then sinfo; echo "export SLURM_CONF=$SLURM_CONF"; exit 0; fi
  sleep 1
done
echo "slurm did not come up; logs in $dir/log" >&2; cat "$dir"/log/* >&2; exit 1
