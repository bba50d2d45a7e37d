# Shared by the slurm example's ctx-scripts (sourced, not run: not executable).
#
# Daemons are managed with systemctl when systemd runs, else started directly
# (CTX_SLURM_INIT=direct forces that, e.g. in containers or test hosts;
# CTX_SLURM_INIT=systemd forces systemctl). Everything deployment-specific in
# slurm.conf comes from the context.

CTX_DIR=/etc/slurm/ctx
SPOOL=/var/spool/slurm
LOGDIR=/var/log/slurm

die() {
    echo "$*" >&2
    exit 1
}

use_systemd() {
    case "${CTX_SLURM_INIT:-auto}" in
        systemd) return 0 ;;
        direct) return 1 ;;
        auto) [ -d /run/systemd/system ] ;;
        *) die "CTX_SLURM_INIT must be auto, systemd or direct, not ${CTX_SLURM_INIT}" ;;
    esac
}

ctx_event() {
    # What the agent runs: initial (first run, or the first after a reboot) or change.
    case "${CTX_EVENT:-initial}" in
        initial|change) printf '%s\n' "${CTX_EVENT:-initial}" ;;
        *) die "CTX_EVENT must be initial or change, not ${CTX_EVENT}" ;;
    esac
}

check_name() {
    # A short host name: one DNS label. It becomes a file name and a NodeName.
    case "$1" in
        ''|-*|*[!A-Za-z0-9-]*) die "not a host name label: $1" ;;
    esac
    [ ${#1} -le 63 ] || die "host name label longer than 63 characters: $1"
}

check_ip() {
    case "$1" in
        ''|*[!0-9A-Fa-f.:]*) die "not an IP address: $1" ;;
    esac
}

self_name_and_ip() {
    # This node's short name and primary address, as the broker validated them.
    python3 -c 'import json, os; s = json.load(open(os.environ["CTX_VIEW"]))["self"]; print(s["hostname"], s["primary_ip"])'
}

write_slurm_conf() {
    # write_slurm_conf CTLD_NAME CTLD_IP: slurm.conf from what the scripts recorded.
    # Sets CONF_CHANGED (no | nodes | controller): what differs from the last one.
    ctld_name=$1 ctld_ip=$2
    check_name "$ctld_name"
    check_ip "$ctld_ip"
    params=$(node_params)
    nodes=$(ls "$CTX_DIR/nodes" | sort)
    for node in $nodes; do check_name "$node"; done
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
        for node in $nodes; do
            printf '%s%s\n' "$(cat "$CTX_DIR/nodes/$node")" "${params:+ $params}"
        done
        echo "PartitionName=ctx Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
    } > "$tmp"
    chmod 0644 "$tmp"
    if cmp -s "$tmp" /etc/slurm/slurm.conf; then
        rm -f "$tmp"
        CONF_CHANGED=no
    else
        if grep -qxF "SlurmctldHost=$ctld_name($ctld_ip)" /etc/slurm/slurm.conf 2>/dev/null; then
            CONF_CHANGED=nodes
        else
            CONF_CHANGED=controller
        fi
        mv "$tmp" /etc/slurm/slurm.conf
    fi
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

gone() {
    # gone PID: no such process (or only a zombie left of it).
    case "$1" in ''|*[!0-9]*) return 0 ;; esac
    state=$(sed -n 's/.*) \(.\).*/\1/p' "/proc/$1/stat" 2>/dev/null)
    case "$state" in ''|Z|X) return 0 ;; esac
    return 1
}

alive() {
    # alive PID NAME: PID is a running process called NAME.
    ! gone "$1" && [ "$(cat "/proc/$1/comm" 2>/dev/null)" = "$2" ]
}

pidfile_pid() {
    # pidfile_pid FILE NAME: the pid FILE names if that process is a live NAME.
    [ -s "$1" ] || return 1
    pid=$(head -n 1 "$1")
    alive "$pid" "$2" || return 1
    printf '%s\n' "$pid"
}

stop_pidfile() {
    # stop_pidfile FILE NAME: stop the daemon FILE names, if it is NAME; then
    # remove FILE, so what a previous boot left there is never taken for ours.
    if pid=$(pidfile_pid "$1" "$2"); then
        kill "$pid" 2>/dev/null || true
        n=0
        while alive "$pid" "$2" && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
        alive "$pid" "$2" && die "$2 (pid $pid) did not stop"
    fi
    rm -f "$1"
}

wait_for() {
    # wait_for SECONDS WHAT COMMAND...: retry COMMAND until it succeeds (status 0);
    # status 1 means "not yet", anything else "never": give up at once.
    limit=$(($1 * 10)) what=$2
    shift 2
    n=0
    while :; do
        rc=0
        "$@" || rc=$?
        case $rc in
            0) return 0 ;;
            1) ;;
            *) echo "gave up waiting for $what" >&2; return 1 ;;
        esac
        n=$((n + 1))
        if [ $n -ge $limit ]; then echo "timed out waiting for $what" >&2; return 1; fi
        sleep 0.1
    done
}

log_tail() {
    # The end of a daemon's log, into the script's output (and so the report).
    [ -r "$1" ] && tail -n 5 "$1" >&2
    return 0
}

enable_role() {
    # enable_role ROLE (slurmctld | slurmd): with systemd, the node's role decides
    # which daemons start at boot, not the image (Debian's packages enable both).
    use_systemd || return 0
    case "$1" in
        slurmctld) off=slurmd ;;
        slurmd) off=slurmctld ;;
        *) die "enable_role: unknown role $1" ;;
    esac
    if [ -x "/usr/sbin/$off" ]; then
        systemctl disable --now "$off"
        # An image booted before this fix may hold it as failed: the system is degraded
        # until its failure is forgotten.
        systemctl reset-failed "$off" 2>/dev/null || true
    fi
    systemctl enable munge "$1"
}

munge_up() {
    munge -n >/dev/null 2>&1
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
    wait_for 30 munged munge_up || { log_tail /var/log/munge/munged.log; return 1; }
}

ensure_munged() {
    munge_up || start_munged
}

# --- the controller ---------------------------------------------------------

start_slurmctld() {
    t0=$(date +%s) pid=
    if use_systemd; then
        systemctl restart slurmctld
    else
        stop_pidfile "$SPOOL/slurmctld.pid" slurmctld
        # In the foreground of its own session: $! is the daemon itself, so a
        # slurmctld that dies at once (its port taken, a bad slurm.conf) is seen at once.
        setsid /usr/sbin/slurmctld -D </dev/null >/dev/null 2>&1 &
        pid=$!
    fi
    wait_for 60 "slurmctld to start and answer" slurmctld_started "$t0" "$pid" || {
        log_tail "$LOGDIR/slurmctld.log"
        return 1
    }
}

serving_directly() {
    # serving_directly NAME PID: the daemon NAME started directly as PID is alive and
    # wrote its pid file (status 1: not yet; 2: it exited, never will).
    if gone "$2"; then echo "$1 (pid $2) exited" >&2; return 2; fi
    # Until the background shell has exec'd the daemon, it has another name.
    alive "$2" "$1" || return 1
    [ "$(cat "$SPOOL/$1.pid" 2>/dev/null)" = "$2" ]
}

slurmctld_started() {
    # slurmctld_started T0 [PID]: the controller answering is one started at or
    # after T0 (and, started directly, the live PID that wrote the pid file).
    if [ -n "$2" ]; then
        serving_directly slurmctld "$2" || return
    fi
    slurmctld_up || return 1
    boot=$(SLURM_TIME_FORMAT=%s scontrol show config 2>/dev/null | sed -n 's/^BOOT_TIME *= *//p')
    case "$boot" in ''|*[!0-9]*) return 1 ;; esac
    [ "$boot" -ge "$1" ]
}

slurmctld_up() {
    # Bounded: whatever holds the port may accept and never answer (scontrol
    # would wait MessageTimeout, 10 s); a live controller answers in milliseconds.
    timeout 2 scontrol ping 2>/dev/null | grep -q 'is UP'
}

update_slurmctld() {
    # A change run on the controller. Slurm 22.05 learns added or removed
    # NodeName lines only from a restart of slurmctld ("scontrol reconfigure"
    # makes it exit: "MaxNodeCount has changed ... slurmctld must be restarted").
    # Running jobs survive the restart (state is saved in StateSaveLocation).
    ensure_munged
    if [ "$CONF_CHANGED" != no ] || ! slurmctld_up; then
        start_slurmctld
    fi
}

# --- a compute node ---------------------------------------------------------

start_slurmd() {
    t0=$(date +%s) pid=
    if use_systemd; then
        systemctl restart slurmd
    else
        # A pid file from a previous boot names nothing of ours: removed first.
        stop_pidfile "$SPOOL/slurmd.pid" slurmd
        setsid /usr/sbin/slurmd -D </dev/null >/dev/null 2>&1 &
        pid=$!
    fi
    # Report ok only once the controller has heard from THIS slurmd: ctxctl
    # wait then means usable. A controller still listing the node from before a
    # reboot would otherwise say idle until SlurmdTimeout.
    wait_for 90 "this node's slurmd to register with slurmctld" slurmd_registered "$t0" "$pid" || {
        log_tail "$LOGDIR/slurmd.log"
        return 1
    }
}

slurmd_registered() {
    # slurmd_registered T0 [PID]: (started directly: the live PID that wrote the
    # pid file and) the controller lists this node usable, registered at or after T0.
    if [ -n "$2" ]; then
        serving_directly slurmd "$2" || return
    fi
    node_usable "$1"
}

node_usable() {
    # node_usable T0: the controller lists this node responding and schedulable,
    # with a SlurmdStartTime (the slurmd's own clock, sent when it registers) >= T0.
    info=$(SLURM_TIME_FORMAT=%s scontrol show node -o "$(hostname -s)" 2>/dev/null) || return 1
    state=$(printf '%s\n' "$info" | sed -n 's/.* State=\([^ ]*\).*/\1/p')
    started=$(printf '%s\n' "$info" | sed -n 's/.* SlurmdStartTime=\([0-9]*\).*/\1/p')
    case "$state" in
        *NOT_RESPONDING*|*DRAIN*|*FAIL*|*INVALID*|*POWER*) return 1 ;;
        IDLE*|MIXED*|ALLOCATED*|COMPLETING*) ;;
        *) return 1 ;;
    esac
    [ -n "$started" ] && [ "$started" -ge "$1" ]
}

update_slurmd() {
    # A change run on a compute. New or removed NodeName lines: slurmd re-reads
    # slurm.conf on SIGHUP (systemctl reload), which every slurmd needs to
    # forward messages to the new nodes; running jobs are not touched. A new
    # controller needs a restart. A slurmd that is not running is started.
    ensure_munged
    case "$CONF_CHANGED" in
        controller) start_slurmd; return ;;
        nodes) ;;
        no)
            if slurmd_running; then
                wait_for 60 "this node to be usable" node_usable 0
                return
            fi
            ;;
    esac
    if use_systemd; then
        systemctl reload slurmd || { start_slurmd; return; }
    elif pid=$(pidfile_pid "$SPOOL/slurmd.pid" slurmd); then
        kill -HUP "$pid"
    else
        start_slurmd
        return
    fi
    wait_for 60 "this node to be usable" node_usable 0
}

slurmd_running() {
    if use_systemd; then
        systemctl is-active --quiet slurmd
    else
        pidfile_pid "$SPOOL/slurmd.pid" slurmd >/dev/null
    fi
}
