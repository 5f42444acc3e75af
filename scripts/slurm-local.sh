#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, to try the pipeline's Slurm path (MEMKFAC_ENV=slurm).
#
#   sudo scripts/slurm-local.sh start    # installs slurm-wlm + munge if missing, starts munged, slurmctld, slurmd
#   scripts/slurm-local.sh status        # exit 0 when the cluster takes jobs; else says why (slurmd's error)
#   sudo scripts/slurm-local.sh stop     # stops what start started
#
# start is idempotent: what already runs is left running. It writes /etc/slurm/slurm.conf (one node, the
# partition "memkfac", GPUs as gres when nvidia-smi sees any, a job completion log so finished jobs stay in
# Slurm's own records without slurmdbd) and refuses to replace a slurm.conf it did not write. Debian/Ubuntu
# only (apt-get). Needs root: the daemons run as root, as on a workstation test cluster.
set -uo pipefail

CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
GRES=$CONF_DIR/gres.conf
MARKER="# written by memkfac scripts/slurm-local.sh"
LOG_DIR=/var/log/slurm
STATE_DIR=/var/lib/memkfac-slurm
LAST_ERROR=$STATE_DIR/last-error
PARTITION=memkfac
NODE=$(hostname -s)

say() { echo "slurm-local: $*"; }
fail() {  # record the reason where `status` (and the Slurm test's skip message) will show it
    say "$*" >&2
    if [ "$(id -u)" = 0 ]; then mkdir -p "$STATE_DIR" && printf '%s\n' "$*" >"$LAST_ERROR"; fi
    exit 1
}
running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
need_root() { [ "$(id -u)" = 0 ] || { say "$1 needs root: run 'sudo $0 $1'" >&2; exit 1; }; }

install_packages() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
        && command -v sbatch >/dev/null && return 0
    command -v apt-get >/dev/null || fail "slurm-wlm and munge are missing and there is no apt-get to install them"
    say "installing slurm-wlm and munge with apt-get"
    local start=$SECONDS
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null 2>"$STATE_DIR/apt.err" \
        && apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null 2>>"$STATE_DIR/apt.err" \
        || fail "apt-get could not install slurm-wlm and munge: $(tail -n 5 "$STATE_DIR/apt.err")"
    say "installed in $((SECONDS - start)) s"
}

start_munge() {
    if [ ! -s /etc/munge/munge.key ]; then
        mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null \
            || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
        chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
    fi
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return 0; fi
    mkdir -p /run/munge && chown munge:munge /run/munge
    runuser -u munge -- /usr/sbin/munged 2>"$STATE_DIR/munged.err" \
        || fail "munged did not start: $(cat "$STATE_DIR/munged.err")"
    touch "$STATE_DIR/started-munged"
    for _ in $(seq 20); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0; sleep 0.5; done
    fail "munged runs but munge -n | unmunge fails"
}

write_conf() {
    if [ -f "$CONF" ] && ! head -n 1 "$CONF" | grep -qF "$MARKER"; then
        fail "$CONF exists and was not written by this script; not replacing it (use that cluster, or move it away)"
    fi
    mkdir -p "$CONF_DIR" "$LOG_DIR" /var/spool/slurmctld /var/spool/slurmd
    # the node as slurmd sees it (CPUs, sockets, cores, memory), without the volatile UpTime
    local node_line gpus gres_line=""
    node_line=$(slurmd -C 2>/dev/null | head -n 1 | sed 's/ *UpTime=.*//')
    [ -n "$node_line" ] || node_line="NodeName=$NODE CPUs=$(nproc)"
    gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    if [ "${gpus:-0}" -gt 0 ]; then
        gres_line=" Gres=gpu:$gpus"
        { echo "$MARKER"; echo "AutoDetect=off"
          for ((i = 0; i < gpus; i++)); do echo "NodeName=$NODE Name=gpu File=/dev/nvidia$i"; done; } >"$GRES.new"
        mv "$GRES.new" "$GRES"
    fi
    cat >"$CONF.new" <<EOF
$MARKER
ClusterName=memkfac
SlurmctldHost=$NODE
AuthType=auth/munge
SlurmUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$LOG_DIR/jobcomp.log
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
ReturnToService=2
MinJobAge=600
KillWait=5
$( [ -n "$gres_line" ] && echo "GresTypes=gpu" )
$node_line$gres_line State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
    if ! cmp -s "$CONF.new" "$CONF"; then mv "$CONF.new" "$CONF"; else rm -f "$CONF.new"; fi
}

wait_for() {  # wait_for SECONDS COMMAND...: until the command succeeds
    local deadline=$((SECONDS + $1)); shift
    until "$@" >/dev/null 2>&1; do [ $SECONDS -lt $deadline ] || return 1; sleep 0.5; done
}

log_size() { stat -c %s "$1" 2>/dev/null || echo 0; }
new_log_lines() { tail -c +$(($2 + 1)) "$1" 2>/dev/null | tail -n 5; }  # what $1 got past offset $2

node_idle() { sinfo -h -N -n "$NODE" -o %T 2>/dev/null | grep -Eq '^(idle|mixed|allocated)'; }

start_daemons() {
    local ctld_log=$LOG_DIR/slurmctld.log d_log=$LOG_DIR/slurmd.log ctld_at d_at
    ctld_at=$(log_size "$ctld_log") d_at=$(log_size "$d_log")
    if ! running /run/slurmctld.pid; then
        slurmctld 2>"$STATE_DIR/slurmctld.err" \
            || fail "slurmctld did not start: $(cat "$STATE_DIR/slurmctld.err") $(new_log_lines "$ctld_log" "$ctld_at")"
    fi
    wait_for 30 scontrol ping || fail "slurmctld does not answer: $(new_log_lines "$ctld_log" "$ctld_at")"
    if ! running /run/slurmd.pid; then
        slurmd 2>"$STATE_DIR/slurmd.err" \
            || fail "slurmd did not start: $(cat "$STATE_DIR/slurmd.err") $(new_log_lines "$d_log" "$d_at")"
    fi
    if ! wait_for 30 node_idle; then
        scontrol update nodename="$NODE" state=resume >/dev/null 2>&1
        wait_for 15 node_idle || fail "slurmd runs but node $NODE is $(sinfo -h -N -o '%T %E' 2>/dev/null):" \
            "$(new_log_lines "$d_log" "$d_at")"
    fi
}

cmd_start() {
    need_root start
    mkdir -p "$STATE_DIR" && rm -f "$LAST_ERROR"
    install_packages
    start_munge
    write_conf
    start_daemons
    local out
    out=$(timeout 60 srun -N1 -p "$PARTITION" -t 1 hostname 2>&1) || fail "srun hostname failed: $out"
    say "up: partition $PARTITION on node $NODE (srun hostname -> $out); job records in $LOG_DIR/jobcomp.log"
}

cmd_stop() {
    need_root stop
    local pidfiles=(/run/slurmd.pid /run/slurmctld.pid)
    [ -f "$STATE_DIR/started-munged" ] && pidfiles+=(/run/munge/munged.pid)
    for pidfile in "${pidfiles[@]}"; do
        running "$pidfile" || continue
        kill "$(cat "$pidfile")"
        wait_for 20 eval "! running $pidfile" || fail "$(basename "$pidfile" .pid) did not exit within 20 s"
        say "stopped $(basename "$pidfile" .pid)"
    done
    rm -f "$STATE_DIR/started-munged"
}

cmd_status() {
    local ok=0
    if ! command -v sinfo >/dev/null; then
        say "not installed (no sinfo); run 'sudo $0 start'"; ok=1
    else
        for daemon in slurmctld slurmd; do
            if running /run/$daemon.pid; then say "$daemon running (pid $(cat /run/$daemon.pid))"
            else say "$daemon not running"; ok=1; fi
        done
        if [ $ok = 0 ] && node_idle; then
            say "node $NODE: $(sinfo -h -N -n "$NODE" -o '%T, %c CPUs, gres %G'); partition $PARTITION"
        else
            say "node $NODE not ready: $(sinfo -h -N -o '%T %E' 2>&1 | head -n 1)"; ok=1
        fi
    fi
    if [ $ok != 0 ] && [ -s "$LAST_ERROR" ]; then say "last start failed: $(cat "$LAST_ERROR")"; fi
    return $ok
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
