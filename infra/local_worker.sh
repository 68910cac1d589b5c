#!/usr/bin/env bash
# Start / stop a second local Ray node that joins a head started by local_head.sh.
#
#   infra/local_worker.sh start --head-dir HEAD_DIR [--dir DIR] [--num-cpus N] [--num-gpus G]
#                               [--object-store-mib M]
#   infra/local_worker.sh stop  [--dir DIR]
#
# HEAD_DIR is the head's --dir (default as in local_head.sh: $FACEAUDIT_RAY_DIR, else
# $XDG_RUNTIME_DIR/faceaudit-ray, else /tmp/faceaudit-ray-<uid>): its env.sh gives the address and
# the auth token, and is used only when HEAD_DIR and env.sh are yours alone (owner, mode 700/600).
# DIR (default HEAD_DIR-worker, created with mode 700) is this node's own directory: its Ray
# --temp-dir, worker.log and worker.pid, so stopping (or killing) this node leaves the head alone.
# This is how the two-node fault test loses a node mid-run.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=infra/_ray_common.sh
source "$HERE/_ray_common.sh"

cmd="${1:-}"; shift || true
HEAD_DIR="$(default_dir)"
DIR=""
NUM_CPUS=""; NUM_GPUS=""; OBJ_MIB=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --head-dir) HEAD_DIR="$2"; shift 2 ;;
    --dir|--temp-dir) DIR="$2"; shift 2 ;;
    --num-cpus) NUM_CPUS="$2"; shift 2 ;;
    --num-gpus) NUM_GPUS="$2"; shift 2 ;;
    --object-store-mib) OBJ_MIB="$2"; shift 2 ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done
DIR="${DIR:-${HEAD_DIR%/}-worker}"

case "$cmd" in
  start)
    [[ -e "$HEAD_DIR/env.sh" ]] || die "no head found: $HEAD_DIR/env.sh is missing (start one with infra/local_head.sh start)"
    check_private "$HEAD_DIR" dir
    check_private "$HEAD_DIR/env.sh" file
    if [[ -e "$HEAD_DIR/head.pid" || -L "$HEAD_DIR/head.pid" ]]; then check_private "$HEAD_DIR/head.pid" file; fi
    node_alive "$HEAD_DIR/head.pid" || die "the head in $HEAD_DIR is not running"
    DIR="$(realpath -ms -- "$DIR")"   # absolute, symlinks kept (private_dir refuses them)
    check_socket_room "$DIR"
    private_dir "$DIR"
    if [[ -e "$DIR/worker.pid" || -L "$DIR/worker.pid" ]]; then check_private "$DIR/worker.pid" file; fi
    if node_alive "$DIR/worker.pid"; then
      die "a worker node is already running from $DIR; run: $0 stop --dir $DIR"
    fi
    # shellcheck disable=SC1091
    source "$HEAD_DIR/env.sh"   # RAY_ADDRESS + the head's token (RAY_AUTH_MODE, RAY_AUTH_TOKEN_PATH)
    # Retried on fresh ports when the node fails to register in time (see local_head.sh).
    attempt=1
    while true; do
      read -r AGENT_HTTP AGENT_GRPC RTENV METRICS NM OM WMIN WMAX < <(free_ports 6)
      # A marker resource unique to this node: how we know it (not some other node) has joined.
      MARK="faceaudit_node_$(basename "$DIR" | tr -c 'A-Za-z0-9_\n' '_')_$$"
      args=(--address "$RAY_ADDRESS" --block --node-ip-address 127.0.0.1
            --dashboard-agent-listen-port "$AGENT_HTTP" --dashboard-agent-grpc-port "$AGENT_GRPC"
            --runtime-env-agent-port "$RTENV" --metrics-export-port "$METRICS"
            --node-manager-port "$NM" --object-manager-port "$OM"
            --min-worker-port "$WMIN" --max-worker-port "$WMAX"
            --temp-dir "$DIR/ray" --disable-usage-stats --resources "{\"$MARK\": 1}")
      [[ -n "$NUM_CPUS" ]] && args+=(--num-cpus "$NUM_CPUS")
      [[ -n "$NUM_GPUS" ]] && args+=(--num-gpus "$NUM_GPUS")
      [[ -n "$OBJ_MIB" ]] && args+=(--object-store-memory "$((OBJ_MIB * 1024 * 1024))")
      start_ray "$DIR/worker.log" "${args[@]}"
      echo $! > "$DIR/worker.pid"
      echo "$MARK" > "$DIR/marker"
      if wait_resource "$DIR/worker.pid" "$DIR/worker.log" "$RAY_ADDRESS" "$MARK"; then break; fi
      stop_node "$DIR" worker > /dev/null
      (( attempt < ${FACEAUDIT_RAY_START_ATTEMPTS:-3} )) || die "the worker node did not start (attempt $attempt)"
      echo "warning: worker start attempt $attempt failed; retrying" >&2
      attempt=$((attempt + 1))
    done
    echo "ray worker node up (pid $(cat "$DIR/worker.pid"), joined $RAY_ADDRESS as resource $MARK, logs $DIR/worker.log)"
    ;;
  stop)
    stop_node "$DIR" worker
    ;;
  *)
    die "usage: $0 start|stop --head-dir HEAD_DIR [--dir DIR] [--num-cpus N] [--num-gpus G]"
    ;;
esac
