#!/usr/bin/env bash
# Stop the Ray nodes that cluster-up.sh started.
#
#   cluster-down.sh          stop the worker node, then the head node
#   cluster-down.sh worker   stop the worker node only (fault tests; cluster-up.sh brings it back)
#
# Not `ray stop`: that kills every Ray process on the machine, other people's included. Each node was
# started in its own process group, recorded in its pid file, and only those groups are signalled.
# FLOWRAY_STACK_STOP_TIMEOUT=0 kills at once instead of waiting for a clean shutdown.
set -euo pipefail
STACK_SERVICE=cluster
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
# Ray's GCS often ignores SIGTERM for a long while; `ray stop` itself falls back to SIGKILL after 16 s.
STACK_STOP_TIMEOUT="${FLOWRAY_STACK_STOP_TIMEOUT:-10}"
[[ -d $STACK_DIR ]] || { log "not running (no $STACK_DIR)"; exit 0; }

case "${1:-all}" in
worker)
    stop_group ray-worker
    ;;
all)
    stop_group ray-worker
    stop_group ray-head
    drop_env cluster
    ;;
*)
    die "usage: $0 [all|worker]"
    ;;
esac
