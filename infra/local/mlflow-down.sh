#!/usr/bin/env bash
# Stop the MLflow server that mlflow-up.sh started (its process group, workers included). The
# backend database and local artifacts stay in the stack dir for the next start. Safe to rerun.
set -euo pipefail
STACK_SERVICE=mlflow
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
[[ -d $STACK_DIR ]] || { log "not running (no $STACK_DIR)"; exit 0; }
stop_group mlflow
drop_env mlflow
