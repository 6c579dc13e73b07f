#!/usr/bin/env bash
# Stop the S3 endpoint that s3-up.sh started (only that one: the process group in its pid file).
# Safe to run when it is not running.
set -euo pipefail
STACK_SERVICE=s3
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
[[ -d $STACK_DIR ]] || { log "not running (no $STACK_DIR)"; exit 0; }
stop_group s3
drop_env s3
