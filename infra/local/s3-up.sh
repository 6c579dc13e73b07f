#!/usr/bin/env bash
# Start an S3 endpoint on loopback for development: moto's S3 server, in the background, with the
# default bucket created. Prints the environment to export (stdout); logs go to stderr.
#
#   S3_PORT          port (default 9000; another free port when 9000 is taken and S3_PORT is unset)
#   FLOWRAY_BUCKET   bucket to create (default flowray)
#   AWS_DEFAULT_REGION  region of the bucket (default us-east-1)
#
# moto keeps everything in memory: s3-down (or a crash) loses the buckets' contents.
set -euo pipefail
STACK_SERVICE=s3
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
stack_init

BUCKET="${FLOWRAY_BUCKET:-flowray}"
REGION="${AWS_DEFAULT_REGION:-us-east-1}"

if service_running s3; then
    log "already running (pid file $(pid_file s3))"
    print_env s3
    exit 0
fi

command -v moto_server >/dev/null || die "moto_server not found: install the test extras (pip install -e '.[test]') or run via make"
PORT=$(choose_port S3_PORT 9000)
ENDPOINT="http://$STACK_HOST:$PORT"

log "starting moto S3 server on $ENDPOINT (log $(log_file s3))"
start_group s3 moto_server moto_server -H "$STACK_HOST" -p "$PORT"
# Any S3 answer will do: an anonymous ListBuckets returns 200 from moto.
wait_until "S3 endpoint $ENDPOINT" "$(read_pid s3)" http_ok "$ENDPOINT/"

# moto accepts any credentials; these dummies are not secrets and keep boto3 from searching for real
# ones. They are passed to this one command only.
AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing "$PYTHON" - "$ENDPOINT" "$BUCKET" "$REGION" <<'PY'
import sys

import boto3

endpoint, bucket, region = sys.argv[1:]
s3 = boto3.client("s3", endpoint_url=endpoint, region_name=region)
existing = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
if bucket not in existing:
    kwargs = {} if region == "us-east-1" else {
        "CreateBucketConfiguration": {"LocationConstraint": region}
    }
    s3.create_bucket(Bucket=bucket, **kwargs)
print(f"[s3] bucket s3://{bucket} ready", file=sys.stderr)
PY

# AWS_ENDPOINT_URL is read by boto3, awscli and pipeline.storage; MLFLOW_S3_ENDPOINT_URL by MLflow's
# S3 artifact client. The credentials are moto's dummies (any value works).
write_env s3 <<ENV
export FLOWRAY_BUCKET=$BUCKET
export AWS_ENDPOINT_URL=$ENDPOINT
export MLFLOW_S3_ENDPOINT_URL=$ENDPOINT
export AWS_DEFAULT_REGION=$REGION
export AWS_ACCESS_KEY_ID=testing
export AWS_SECRET_ACCESS_KEY=testing
ENV
log "up; to use it: source $STACK_DIR/env.sh"
