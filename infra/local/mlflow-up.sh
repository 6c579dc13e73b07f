#!/usr/bin/env bash
# Start an MLflow tracking server on loopback, in the background. Runs, registered models and
# LoggedModels go to the backend store; artifacts are proxied by the server (clients log to
# mlflow-artifacts:/ and need no storage credentials) to S3 when an S3 endpoint is configured or
# `make s3-up` is running, else to a local folder. Prints the environment to export (stdout).
#
#   MLFLOW_PORT                   port (default 5000; another free port when taken and unset)
#   MLFLOW_BACKEND_STORE_URI      default sqlite:///<stack dir>/mlflow/mlflow.db. A PostgreSQL URI
#                                 (postgresql://user@host/db, password in ~/.pgpass or PGPASSWORD)
#                                 works where psycopg2 is installed.
#   MLFLOW_ARTIFACTS_DESTINATION  default s3://$FLOWRAY_BUCKET/mlflow-artifacts when
#                                 MLFLOW_S3_ENDPOINT_URL is set (or the local S3 is up), else
#                                 <stack dir>/mlflow/artifacts
#   MLFLOW_WORKERS                server worker processes (default 1: this is a development box)
#   MLFLOW_SERVER_ENABLE_JOB_EXECUTION  default false here: the server's background job runner
#                                 (GenAI features, a dozen processes) is not used by flowray
set -euo pipefail
STACK_SERVICE=mlflow
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
stack_init

if service_running mlflow; then
    log "already running (pid file $(pid_file mlflow))"
    print_env mlflow
    exit 0
fi

command -v mlflow >/dev/null || die "mlflow not found: install the project (make setup) or run via make"

# With no endpoint in the environment, use the local S3 endpoint when s3-up.sh started one: its env
# file holds the endpoint, bucket and moto's dummy credentials, which the server process needs.
if [[ -z ${MLFLOW_S3_ENDPOINT_URL:-} && -z ${MLFLOW_ARTIFACTS_DESTINATION:-} ]] && service_running s3; then
    log "using the local S3 endpoint from $(env_file s3)"
    # shellcheck source=/dev/null
    source "$(env_file s3)"
fi

mkdir -p "$STACK_DIR/mlflow"
BACKEND="${MLFLOW_BACKEND_STORE_URI:-sqlite:///$STACK_DIR/mlflow/mlflow.db}"
if [[ -n ${MLFLOW_ARTIFACTS_DESTINATION:-} ]]; then
    ARTIFACTS=$MLFLOW_ARTIFACTS_DESTINATION
elif [[ -n ${MLFLOW_S3_ENDPOINT_URL:-} ]]; then
    ARTIFACTS="s3://${FLOWRAY_BUCKET:-flowray}/mlflow-artifacts"
else
    ARTIFACTS="$STACK_DIR/mlflow/artifacts"
    mkdir -p "$ARTIFACTS"
fi
PORT=$(choose_port MLFLOW_PORT 5000)
URI="http://$STACK_HOST:$PORT"

# The server rejects requests whose Host header is not allowed (DNS rebinding protection); clients
# here address it as 127.0.0.1:<port> or localhost:<port>.
ALLOWED_HOSTS="$STACK_HOST:$PORT,localhost:$PORT"

# Log the backend without any password a PostgreSQL URI may carry.
log "starting MLflow server on $URI (backend ${BACKEND//:*@/:***@}, artifacts $ARTIFACTS, log $(log_file mlflow))"
MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}" \
    start_group mlflow "mlflow" mlflow server \
        --backend-store-uri "$BACKEND" \
        --artifacts-destination "$ARTIFACTS" \
        --host "$STACK_HOST" --port "$PORT" \
        --workers "${MLFLOW_WORKERS:-1}" \
        --allowed-hosts "$ALLOWED_HOSTS"

# /health answers once the app is up (database migrations on first start take a few seconds). It is
# exempt from the Host check, so a REST call follows to prove that clients get through.
wait_until "MLflow $URI/health" "$(read_pid mlflow)" http_ok "$URI/health"
http_ok "$URI/api/2.0/mlflow/experiments/get-by-name?experiment_name=Default" ||
    die "MLflow answers /health but rejects API calls; see $(log_file mlflow)"

write_env mlflow <<ENV
export MLFLOW_TRACKING_URI=$URI
ENV
log "up; to use it: source $STACK_DIR/env.sh"
