#!/usr/bin/env bash
# Start a two-node Ray cluster on this machine: a head node (GCS, dashboard, job server) and a worker
# node that joins it, each with its own custom resource so jobs can place work on either node.
# Prints the environment to export (stdout); logs go to stderr.
#
#   RAY_GCS_PORT           head's GCS port (default 6379)
#   RAY_DASHBOARD_PORT     dashboard and job server (default 8265): RAY_API_SERVER_ADDRESS
#   RAY_CLIENT_PORT        Ray Client server on the head (default 10001)
#   RAY_HEAD_AGENT_PORT / RAY_WORKER_AGENT_PORT   each node's dashboard agent (default 52365 / 52366)
#   RAY_HEAD_CPUS / RAY_WORKER_CPUS               logical CPUs per node (default 2 each: more than
#                          the cores, so Train workers and Ray Data do not wait on each other)
#   RAY_HEAD_RESOURCES / RAY_WORKER_RESOURCES     JSON (default {"head": 1} / {"worker_node": 1})
#   RAY_OBJECT_STORE_BYTES object store per node (default 500000000)
#   RAY_AUTH_MODE          token (default) or disabled. With token, the token is Ray's usual file
#                          (~/.ray/auth_token, or RAY_AUTH_TOKEN_PATH / RAY_AUTH_TOKEN when set);
#                          it is generated when missing and never printed.
# An unset port that is taken falls back to a free one; the env file records what was used.
#
# Run again after the worker node was stopped (`cluster-down.sh worker`): the worker node rejoins.
set -euo pipefail
STACK_SERVICE=cluster
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
stack_init

command -v ray >/dev/null || die "ray not found: install the project (make setup) or run via make"

# Each node gets its own temp dir (logs, sockets, spilled objects), which keeps this stack apart from
# any other Ray on the machine and lets cluster-down tell the nodes apart. Unix socket paths are
# limited to 107 bytes and Ray puts ~70 below the root, so a long stack path falls back to /tmp.
RAY_ROOT="$STACK_DIR/ray"
if ((${#RAY_ROOT} > 36)); then
    RAY_ROOT="/tmp/flowray-ray-$(printf '%s' "$STACK_DIR" | cksum | cut -d' ' -f1)"
    # The logs stay reachable from the stack dir all the same.
    ln -sfn "$RAY_ROOT" "$STACK_DIR/ray"
fi
HEAD_TEMP="$RAY_ROOT/head"
WORKER_TEMP="$RAY_ROOT/worker"

# Addresses left in the environment by an earlier stack must not leak into this one.
unset RAY_ADDRESS RAY_API_SERVER_ADDRESS

DEFAULT_HEAD_RESOURCES='{"head": 1}'
DEFAULT_WORKER_RESOURCES='{"worker_node": 1}'
HEAD_RESOURCES="${RAY_HEAD_RESOURCES:-$DEFAULT_HEAD_RESOURCES}"
WORKER_RESOURCES="${RAY_WORKER_RESOURCES:-$DEFAULT_WORKER_RESOURCES}"
OBJECT_STORE_BYTES="${RAY_OBJECT_STORE_BYTES:-500000000}"

# Token auth is on by default for `ray start --head` since Ray 2.59. Setting the mode explicitly makes
# the joining node, `ray status` and `ray job submit` (which inherit it) present the token too.
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
if [[ $RAY_AUTH_MODE == token ]]; then
    # `ray get-auth-token` prints the token on stdout: discard it, only the exit status matters.
    if ! ray get-auth-token >/dev/null 2>&1; then
        log "no Ray auth token yet: generating one in ~/.ray/auth_token"
        ray get-auth-token --generate >/dev/null 2>>"$(log_file ray-head)"
    fi
fi

# RAY_ADDRESS is the GCS address: ray.init(), `ray status` and `ray job submit` all accept it (the job
# CLI looks the dashboard up in the GCS). An http:// RAY_ADDRESS would break ray.init() in a driver.
# RAY_API_SERVER_ADDRESS is the dashboard URL, which the job CLI and JobSubmissionClient prefer.
# RAY_AUTH_MODE makes every Ray client on this machine send the token.
write_cluster_env() {
    write_env cluster <<ENV
export RAY_ADDRESS=$GCS_ADDRESS
export RAY_API_SERVER_ADDRESS=$DASHBOARD_URL
export RAY_AUTH_MODE=$RAY_AUTH_MODE
ENV
}

head_running=false
service_running ray-head && head_running=true
if $head_running && service_running ray-worker; then
    log "already running (pid files $(pid_file ray-head), $(pid_file ray-worker))"
    print_env cluster
    exit 0
fi
if ! $head_running && service_running ray-worker; then
    log "worker node runs without its head: stopping it first"
    stop_group ray-worker
fi

if $head_running; then
    # Reuse the ports the head was started with.
    # shellcheck source=/dev/null
    source "$(env_file cluster)"
    GCS_ADDRESS=$RAY_ADDRESS
    DASHBOARD_URL=$RAY_API_SERVER_ADDRESS
    log "head node already up at $GCS_ADDRESS"
else
    GCS_PORT=$(choose_port RAY_GCS_PORT 6379)
    DASHBOARD_PORT=$(choose_port RAY_DASHBOARD_PORT 8265)
    CLIENT_PORT=$(choose_port RAY_CLIENT_PORT 10001)
    HEAD_AGENT_PORT=$(choose_port RAY_HEAD_AGENT_PORT 52365)
    GCS_ADDRESS="$STACK_HOST:$GCS_PORT"
    DASHBOARD_URL="http://$STACK_HOST:$DASHBOARD_PORT"
    mkdir -p "$HEAD_TEMP"
    log "starting head node: GCS $GCS_ADDRESS, dashboard $DASHBOARD_URL, temp dir $HEAD_TEMP (log $(log_file ray-head))"
    # Worker ports 0/0: the kernel picks each worker's port, so two nodes here (and other Ray
    # instances on the machine) never contend for one range.
    if ! run_in_group ray-head "$HEAD_TEMP/" ray start --head \
        --node-ip-address "$STACK_HOST" \
        --port "$GCS_PORT" \
        --include-dashboard true --dashboard-host "$STACK_HOST" --dashboard-port "$DASHBOARD_PORT" \
        --ray-client-server-port "$CLIENT_PORT" \
        --dashboard-agent-listen-port "$HEAD_AGENT_PORT" \
        --num-cpus "${RAY_HEAD_CPUS:-2}" \
        --resources "$HEAD_RESOURCES" \
        --object-store-memory "$OBJECT_STORE_BYTES" \
        --min-worker-port 0 --max-worker-port 0 \
        --temp-dir "$HEAD_TEMP" \
        --disable-usage-stats; then
        die "ray start --head failed; see $(log_file ray-head)"
    fi
    # Written now so that a rerun after a worker-node failure finds the head's addresses.
    write_cluster_env >/dev/null
fi

WORKER_AGENT_PORT=$(choose_port RAY_WORKER_AGENT_PORT 52366)
mkdir -p "$WORKER_TEMP"
log "starting worker node joining $GCS_ADDRESS, temp dir $WORKER_TEMP (log $(log_file ray-worker))"
if ! run_in_group ray-worker "$WORKER_TEMP/" ray start \
    --address "$GCS_ADDRESS" \
    --node-ip-address "$STACK_HOST" \
    --dashboard-agent-listen-port "$WORKER_AGENT_PORT" \
    --num-cpus "${RAY_WORKER_CPUS:-2}" \
    --resources "$WORKER_RESOURCES" \
    --object-store-memory "$OBJECT_STORE_BYTES" \
    --min-worker-port 0 --max-worker-port 0 \
    --temp-dir "$WORKER_TEMP" \
    --disable-usage-stats; then
    die "ray start (worker node) failed; see $(log_file ray-worker)"
fi

# Ready means: the job server answers and the cluster reports two live nodes, each with its resource.
nodes_ready() {
    "$PYTHON" - "$DASHBOARD_URL" "$HEAD_RESOURCES" "$WORKER_RESOURCES" <<'PY'
import json
import sys

from ray.util.state import list_nodes

url, head, worker = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
alive = [n for n in list_nodes(address=url, detail=True) if n.state == "ALIVE"]
has = lambda node, wanted: all(node.resources_total.get(k, 0) >= v for k, v in wanted.items())
ok = len(alive) == 2 and any(has(n, head) for n in alive) and any(has(n, worker) for n in alive)
sys.exit(0 if ok else 1)
PY
}
wait_until "Ray cluster at $DASHBOARD_URL with 2 nodes" "" nodes_ready

# Ready for jobs means: the head node's job agent runs one. It registers seconds after the nodes are
# up (more on a loaded machine), and until then the job server answers "No available agent to submit
# job" to every submission. So submit a no-op job until one is taken, and wait for it to succeed.
job_agent_ready() {
    "$PYTHON" - "$DASHBOARD_URL" 2>>"$(log_file ray-job-agent-check)" <<'PY'
import sys
import time

from ray.job_submission import JobStatus, JobSubmissionClient

client = JobSubmissionClient(sys.argv[1])
try:
    job = client.submit_job(entrypoint="true", metadata={"flowray_command": "cluster-up check"})
except RuntimeError as err:
    if "No available agent" in str(err):
        sys.exit(1)
    raise
ended = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
deadline = time.monotonic() + 120
while (status := client.get_job_status(job)) not in ended and time.monotonic() < deadline:
    time.sleep(0.5)
sys.exit(0 if status == JobStatus.SUCCEEDED else 1)
PY
}
wait_until "job agent of the head node at $DASHBOARD_URL (see $HEAD_TEMP/session_latest/logs/dashboard_agent.log)" "" job_agent_ready

write_cluster_env
log "up: 2 nodes, job agent ready; submit with: ray job submit --working-dir . -- python -m jobs.<name> ..."
