# Shared by the slurm example's ctx-scripts (sourced, not run: not executable).
#
# Daemons are managed with systemctl when systemd runs, else started directly
# (set CTX_SLURM_INIT=direct to force that, e.g. in containers or test hosts).
# Everything deployment-specific in slurm.conf comes from the context.

CTX_DIR=/etc/slurm/ctx
SPOOL=/var/spool/slurm
LOGDIR=/var/log/slurm

use_systemd() {
    [ "${CTX_SLURM_INIT:-auto}" != direct ] && [ -d /run/systemd/system ]
}

self_name_and_ip() {
    # This node's short name and primary address, as the broker validated them.
    python3 -c 'import json, os; s = json.load(open(os.environ["CTX_VIEW"]))["self"]; print(s["hostname"], s["primary_ip"])'
}

write_slurm_conf() {
    ctld_name=$1 ctld_ip=$2
    params=$(node_params)
    tmp=$(mktemp /etc/slurm/.slurm.conf.XXXXXX)
    {
        echo "# Written by ctxd (examples/slurm) for context ${CTX_CONTEXT_ID:-?}; rewritten at every run."
        echo "ClusterName=ctxd"
        echo "SlurmctldHost=$ctld_name($ctld_ip)"
        echo "SlurmUser=slurm"
        echo "AuthType=auth/munge"
        echo "CredType=cred/munge"
        echo "MpiDefault=none"
        echo "ProctrackType=proctrack/linuxproc"
        echo "TaskPlugin=task/none"
        echo "ReturnToService=2"
        echo "SlurmdParameters=config_overrides"
        echo "SchedulerType=sched/backfill"
        echo "SelectType=select/cons_tres"
        echo "StateSaveLocation=$SPOOL/ctld"
        echo "SlurmdSpoolDir=$SPOOL/d"
        echo "SlurmctldPidFile=$SPOOL/slurmctld.pid"
        echo "SlurmdPidFile=$SPOOL/slurmd.pid"
        echo "SlurmctldLogFile=$LOGDIR/slurmctld.log"
        echo "SlurmdLogFile=$LOGDIR/slurmd.log"
        for node in $(ls "$CTX_DIR/nodes" | sort); do
            printf '%s%s\n' "$(cat "$CTX_DIR/nodes/$node")" "${params:+ $params}"
        done
        echo "PartitionName=ctx Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
    } > "$tmp"
    chmod 0644 "$tmp"
    mv "$tmp" /etc/slurm/slurm.conf
    if [ -e /sys/fs/cgroup/cgroup.controllers ]; then
        # Pure cgroup v2: without systemd slurmd cannot get a scope; carry on without.
        printf 'CgroupPlugin=cgroup/v2\nIgnoreSystemdOnFailure=yes\n' > /etc/slurm/cgroup.conf
    else
        printf 'CgroupPlugin=cgroup/v1\n' > /etc/slurm/cgroup.conf
    fi
    chmod 0644 /etc/slurm/cgroup.conf
    install -d -o slurm -g slurm -m 0755 "$SPOOL" "$SPOOL/ctld" "$LOGDIR"
    install -d -m 0755 "$SPOOL/d"
}

node_params() {
    # The compute nodes' hardware as the deployer declared it (data item
    # "nodeparams", e.g. "CPUs=4 RealMemory=15000"): one line of NAME=VALUE words.
    [ -s "$CTX_DIR/nodeparams" ] || return 0
    params=$(head -n 1 "$CTX_DIR/nodeparams")
    case "$params" in
        *[!A-Za-z0-9=.,:\ ]*) echo "nodeparams: only NAME=VALUE words allowed: $params" >&2; return 1 ;;
    esac
    printf '%s' "$params"
}

stop_pidfile() {
    # stop_pidfile FILE NAME: stop the daemon FILE names, if it is NAME.
    [ -s "$1" ] || return 0
    pid=$(cat "$1")
    case "$pid" in ''|*[!0-9]*) return 0 ;; esac
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ] || return 0
    kill "$pid" 2>/dev/null || return 0
    n=0
    while kill -0 "$pid" 2>/dev/null && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
}

wait_for() {
    # wait_for SECONDS WHAT COMMAND...: retry COMMAND until it succeeds.
    limit=$(($1 * 10)) what=$2
    shift 2
    n=0
    until "$@" >/dev/null 2>&1; do
        n=$((n + 1))
        if [ $n -ge $limit ]; then echo "timed out waiting for $what" >&2; return 1; fi
        sleep 0.1
    done
}

start_munged() {
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
    if use_systemd; then
        systemctl restart munge
    else
        stop_pidfile /run/munge/munged.pid munged
        runuser -u munge -- /usr/sbin/munged
    fi
    wait_for 30 munged munge -n
}

start_slurmctld() {
    if use_systemd; then
        systemctl restart slurmctld
    else
        stop_pidfile "$SPOOL/slurmctld.pid" slurmctld
        /usr/sbin/slurmctld
    fi
    wait_for 60 "slurmctld to answer" slurmctld_up
}

slurmctld_up() {
    scontrol ping 2>/dev/null | grep -q 'is UP'
}

start_slurmd() {
    if use_systemd; then
        systemctl restart slurmd
    else
        stop_pidfile "$SPOOL/slurmd.pid" slurmd
        /usr/sbin/slurmd
    fi
    wait_for 30 slurmd test -s "$SPOOL/slurmd.pid"
    # Report ok only once the controller has this node: ctxctl wait then means usable.
    wait_for 60 "this node to register with slurmctld" node_registered
}

node_registered() {
    state=$(sinfo -h -n "$(hostname -s)" -o %T 2>/dev/null)
    case "$state" in idle*|mix*|alloc*|comp*) return 0 ;; *) return 1 ;; esac
}
