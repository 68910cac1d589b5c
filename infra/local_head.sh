#!/usr/bin/env bash
# Start / stop a local Ray head node on free loopback ports, token authentication ON.
#
#   infra/local_head.sh start [--num-cpus N] [--num-gpus G] [--object-store-mib M] [--dir DIR]
#   infra/local_head.sh stop  [--dir DIR]
#   infra/local_head.sh env   [--dir DIR]     # print the export lines again
#   infra/local_head.sh env-file [--dir DIR]  # print the path of env.sh:  source "$(... env-file)"
#
# DIR holds everything of this head: the auth token, Ray's --temp-dir (sessions, logs), head.log,
# head.pid and env.sh. Default: $FACEAUDIT_RAY_DIR, else $XDG_RUNTIME_DIR/faceaudit-ray, else
# /tmp/faceaudit-ray-<uid>. It is created with mode 700; an existing DIR (or token, env.sh, pid
# file in it) that is not yours alone (owner, mode, no symlink) is refused, never reused. Keep it
# short: Ray puts unix sockets under it and socket paths are limited to ~107 characters.
#
# Auth (Ray 2.60): a head started with RAY_AUTH_MODE=token needs a token to exist already
# (`ray start` does not create one); every client then needs RAY_AUTH_MODE=token plus the token
# (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token). We write a per-head token file
# and point RAY_AUTH_TOKEN_PATH at it, so heads never share or clobber ~/.ray/auth_token.
#
# Stopping never uses `ray stop` (it kills every Ray process of the user on this machine,
# including other people's): the head runs `ray start --block` in its own session, and stop
# signals that session's process group, then any leftover process that names DIR.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=infra/_ray_common.sh
source "$HERE/_ray_common.sh"

cmd="${1:-}"; shift || true
DIR="$(default_dir)"
NUM_CPUS=""; NUM_GPUS=""; OBJ_MIB=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --num-cpus) NUM_CPUS="$2"; shift 2 ;;
    --num-gpus) NUM_GPUS="$2"; shift 2 ;;
    --object-store-mib) OBJ_MIB="$2"; shift 2 ;;
    --dir|--temp-dir) DIR="$2"; shift 2 ;;
    -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done

case "$cmd" in
  start)
    DIR="$(realpath -ms -- "$DIR")"   # absolute, symlinks kept (private_dir refuses them)
    check_socket_room "$DIR"
    private_dir "$DIR"
    for f in head.pid auth_token env.sh; do
      if [[ -e "$DIR/$f" || -L "$DIR/$f" ]]; then check_private "$DIR/$f" file; fi
    done
    if node_alive "$DIR/head.pid"; then
      die "a head is already running from $DIR (pid $(cat "$DIR/head.pid")); run: $0 stop --dir $DIR"
    fi
    # A fresh 256-bit token per head (same format `ray get-auth-token --generate` writes).
    if [[ ! -s "$DIR/auth_token" ]]; then
      "$PY" -c 'import secrets; print(secrets.token_hex(32), end="")' > "$DIR/auth_token"
    fi
    export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$DIR/auth_token"
    unset RAY_AUTH_TOKEN RAY_ADDRESS
    # Ray gives a starting node 30 s (hard-coded) to register with the GCS; on an overloaded
    # machine that can fail, so a failed start is cleaned up and retried on fresh ports.
    attempt=1
    while true; do
      read -r GCS DASH CLIENT AGENT_HTTP AGENT_GRPC RTENV METRICS NM OM WMIN WMAX < <(free_ports 9)
      args=(--head --block --node-ip-address 127.0.0.1 --port "$GCS"
            --dashboard-host 127.0.0.1 --dashboard-port "$DASH" --include-dashboard true
            --ray-client-server-port "$CLIENT"
            --dashboard-agent-listen-port "$AGENT_HTTP" --dashboard-agent-grpc-port "$AGENT_GRPC"
            --runtime-env-agent-port "$RTENV" --metrics-export-port "$METRICS"
            --node-manager-port "$NM" --object-manager-port "$OM"
            --min-worker-port "$WMIN" --max-worker-port "$WMAX"
            --temp-dir "$DIR/ray" --disable-usage-stats)
      [[ -n "$NUM_CPUS" ]] && args+=(--num-cpus "$NUM_CPUS")
      [[ -n "$NUM_GPUS" ]] && args+=(--num-gpus "$NUM_GPUS")
      [[ -n "$OBJ_MIB" ]] && args+=(--object-store-memory "$((OBJ_MIB * 1024 * 1024))")
      start_ray "$DIR/head.log" "${args[@]}"
      echo $! > "$DIR/head.pid"
      cat > "$DIR/env.sh" <<EOF
# source this file to talk to the local head in $DIR
export RAY_ADDRESS=127.0.0.1:$GCS
export RAY_API_SERVER_ADDRESS=http://127.0.0.1:$DASH
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH=$(printf %q "$DIR/auth_token")
EOF
      if wait_ready "$DIR/head.pid" "$DIR/head.log" "127.0.0.1:$GCS" 1; then break; fi
      stop_node "$DIR" head > /dev/null
      (( attempt < ${FACEAUDIT_RAY_START_ATTEMPTS:-3} )) || die "the head did not start (attempt $attempt)"
      echo "warning: head start attempt $attempt failed; retrying" >&2
      attempt=$((attempt + 1))
    done
    echo "ray head up (pid $(cat "$DIR/head.pid"), logs $DIR/head.log, $DIR/ray/session_latest/logs)"
    echo "dashboard: http://127.0.0.1:$DASH   (token: $DIR/auth_token)"
    echo "to use it from a shell: source $DIR/env.sh   (or: source \"\$($0 env-file)\")"
    cat "$DIR/env.sh"
    ;;
  stop)
    stop_node "$DIR" head
    ;;
  env|env-file)
    [[ -e "$DIR/env.sh" ]] || die "no head started from $DIR (no $DIR/env.sh; start one: $0 start)"
    check_private "$DIR" dir
    check_private "$DIR/env.sh" file
    node_alive "$DIR/head.pid" || echo "warning: the head of $DIR is not running" >&2
    if [[ "$cmd" == env ]]; then cat "$DIR/env.sh"; else echo "$DIR/env.sh"; fi
    ;;
  *)
    die "usage: $0 start|stop|env|env-file [--num-cpus N] [--num-gpus G] [--object-store-mib M] [--dir DIR]"
    ;;
esac
