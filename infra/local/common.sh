# shellcheck shell=bash
# Helpers shared by the local stack scripts (s3-*, mlflow-*, cluster-*). Sourced, never run.
#
# Every service of the stack keeps its state under one directory, FLOWRAY_STACK_DIR (default
# <repo>/.stack): a pid file per background process group, a log per service, and an env file per
# service (<name>.env) plus env.sh, which sources all of them. Start scripts print the `export`
# lines on stdout and everything else on stderr, so `eval "$(bash infra/local/s3-up.sh)"` works.
#
# Each service runs in its own process group (setsid), and the pid file records that group, so a stop
# script signals exactly the processes its start script created: servers' worker processes included,
# other people's servers on this machine never.

FLOWRAY_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
STACK_DIR="${FLOWRAY_STACK_DIR:-$FLOWRAY_ROOT/.stack}"
# Loopback only, by design: the local stack is for one machine and never listens elsewhere.
STACK_HOST=127.0.0.1
# Start scripts need a Python with the project's dependencies (the Makefile puts .venv/bin on PATH).
PYTHON="${FLOWRAY_PYTHON:-python3}"
# How long a start script waits for its service to answer, and a stop script for its processes to go.
STACK_START_TIMEOUT="${FLOWRAY_STACK_START_TIMEOUT:-90}"
STACK_STOP_TIMEOUT="${FLOWRAY_STACK_STOP_TIMEOUT:-20}"

log() { printf '[%s] %s\n' "${STACK_SERVICE:-stack}" "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

stack_init() {
    mkdir -p "$STACK_DIR"
}

pid_file() { printf '%s/%s.pid\n' "$STACK_DIR" "$1"; }
log_file() { printf '%s/%s.log\n' "$STACK_DIR" "$1"; }
env_file() { printf '%s/%s.env\n' "$STACK_DIR" "$1"; }

# group_alive PGID: true while any process of the group is alive. Zombies do not count: after a kill
# they linger until init reaps them, and they hold no port or file.
group_alive() {
    ps -eo pgid=,stat= | awk -v g="$1" '$1 == g && $2 !~ /^Z/ { found = 1 } END { exit !found }'
}

# group_matches PGID PATTERN: true when a live process of the group has PATTERN in its command line.
# Guards against a recycled process group id: we only ever signal a group that is still ours.
group_matches() {
    local pgid=$1 pattern=$2 pid
    for pid in $(ps -eo pid=,pgid= | awk -v g="$pgid" '$2 == g { print $1 }'); do
        if tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$pattern"; then
            return 0
        fi
    done
    return 1
}

# read_pid NAME: the process group recorded for NAME, or nothing. Line 1 is the group id, line 2 a
# string that the group's command lines contain (checked by group_matches before any signal).
read_pid() {
    local file
    file=$(pid_file "$1")
    [[ -f $file ]] && sed -n 1p "$file"
}

read_pid_marker() {
    local file
    file=$(pid_file "$1")
    [[ -f $file ]] && sed -n 2p "$file"
}

# service_running NAME: true when NAME's recorded process group is alive and still ours.
service_running() {
    local pgid marker
    pgid=$(read_pid "$1") || return 1
    marker=$(read_pid_marker "$1")
    [[ -n $pgid ]] && group_alive "$pgid" && group_matches "$pgid" "$marker"
}

# start_group NAME MARKER CMD...: run CMD in a new session (so its process group id is its pid), in
# the background, output to the service log; record the group and MARKER in NAME's pid file.
start_group() {
    local name=$1 marker=$2
    shift 2
    local log
    log=$(log_file "$name")
    setsid "$@" >>"$log" 2>&1 </dev/null &
    printf '%s\n%s\n' "$!" "$marker" >"$(pid_file "$name")"
}

# run_in_group NAME MARKER CMD...: like start_group for a command that daemonizes its own children
# and exits (`ray start`): waits for it and returns its status; the children stay in the group.
run_in_group() {
    local name=$1 marker=$2
    shift 2
    local log pid
    log=$(log_file "$name")
    setsid "$@" >>"$log" 2>&1 </dev/null &
    pid=$!
    printf '%s\n%s\n' "$pid" "$marker" >"$(pid_file "$name")"
    wait "$pid"
}

# stop_group NAME: SIGTERM NAME's process group, SIGKILL what is left after STACK_STOP_TIMEOUT,
# remove the pid file. Does nothing (successfully) when NAME is not running: stop is idempotent.
stop_group() {
    local name=$1 pgid marker deadline
    pgid=$(read_pid "$name") || true
    marker=$(read_pid_marker "$name") || true
    if [[ -z $pgid ]]; then
        log "$name: not running (no pid file)"
        return 0
    fi
    if ! group_alive "$pgid" || ! group_matches "$pgid" "$marker"; then
        log "$name: not running (stale pid file removed)"
        rm -f "$(pid_file "$name")"
        return 0
    fi
    log "$name: stopping process group $pgid"
    kill -TERM -- "-$pgid" 2>/dev/null || true
    deadline=$((SECONDS + STACK_STOP_TIMEOUT))
    while group_alive "$pgid" && ((SECONDS < deadline)); do
        sleep 0.5
    done
    if group_alive "$pgid"; then
        # Some servers (Ray's GCS among them) take a long time to honour SIGTERM.
        log "$name: still running after ${STACK_STOP_TIMEOUT}s; sending SIGKILL"
        kill -KILL -- "-$pgid" 2>/dev/null || true
        deadline=$((SECONDS + 10))
        while group_alive "$pgid" && ((SECONDS < deadline)); do
            sleep 0.2
        done
    fi
    if group_alive "$pgid"; then
        die "$name: process group $pgid survived SIGKILL"
    fi
    rm -f "$(pid_file "$name")"
    log "$name: stopped"
}

# wait_until DESCRIPTION PGID CMD...: poll CMD until it succeeds; fail early when the process group
# PGID has died (pass "" for none) and after STACK_START_TIMEOUT seconds.
wait_until() {
    local description=$1 pgid=$2
    shift 2
    local deadline=$((SECONDS + STACK_START_TIMEOUT))
    until "$@" >/dev/null 2>&1; do
        if [[ -n $pgid ]] && ! group_alive "$pgid"; then
            die "$description: the process exited before it answered"
        fi
        if ((SECONDS >= deadline)); then
            die "$description: no answer within ${STACK_START_TIMEOUT}s"
        fi
        sleep 0.5
    done
}

# http_ok URL: true when URL answers 2xx.
http_ok() {
    curl -fsS -o /dev/null --max-time 3 "$1"
}

# port_free PORT: true when nothing listens on PORT on any address of this machine. Binding the
# wildcard address fails when any address holds the port: Ray binds some of its ports (the dashboard
# agent's, 52365) on the machine's interface address, not on STACK_HOST, so a check of STACK_HOST
# alone let a second Ray here start with a job agent that could not serve ("No available agent").
port_free() {
    "$PYTHON" - "$1" <<'EOF'
import socket, sys
with socket.socket() as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("0.0.0.0", int(sys.argv[1])))
    except OSError:
        sys.exit(1)
EOF
}

# any_free_port: a port the kernel says is free now on every address.
any_free_port() {
    "$PYTHON" -c 'import socket
with socket.socket() as s:
    s.bind(("0.0.0.0", 0))
    print(s.getsockname()[1])'
}

# choose_port VAR DEFAULT: prints the port for VAR. An explicit VAR must be free (else fail: the user
# asked for it); the default is used when free, else any free port, so the stack starts beside other
# servers (another Ray dashboard on 8265, say). The chosen port goes into the env file.
choose_port() {
    local var=$1 default=$2 port
    if [[ -n ${!var:-} ]]; then
        port=${!var}
        port_free "$port" || die "$var=$port: port $port on $STACK_HOST is in use"
    elif port_free "$default"; then
        port=$default
    else
        port=$(any_free_port)
        log "port $default is in use; using $port (set $var to choose)"
    fi
    printf '%s\n' "$port"
}

# write_env NAME: stdin holds `export K=V` lines; save them as NAME's env file, rebuild env.sh, and
# print them for the caller (stdout).
write_env() {
    local file
    file=$(env_file "$1")
    cat >"$file"
    rebuild_env_sh
    cat "$file"
}

drop_env() {
    rm -f "$(env_file "$1")"
    rebuild_env_sh
}

# env.sh sources the env file of every service that is up, in start order.
rebuild_env_sh() {
    local name out="$STACK_DIR/env.sh"
    {
        echo "# Generated by infra/local/*-up.sh: source it to use the local stack."
        for name in s3 mlflow cluster; do
            if [[ -f $(env_file "$name") ]]; then
                cat "$(env_file "$name")"
            fi
        done
    } >"$out"
}

# print_env NAME: an already-running service prints its saved env again (start is idempotent).
print_env() {
    local file
    file=$(env_file "$1")
    if [[ -f $file ]]; then
        cat "$file"
    fi
}
