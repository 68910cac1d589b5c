# Shared helpers for local_head.sh / local_worker.sh (sourced, not run).

# Every file these scripts write is private to this user (the Ray processes they start get the
# caller's umask back: see start_ray).
_UMASK="$(umask)"
umask 077

# The ray CLI: $RAY, else the project's own .venv (so no activation is needed), else PATH.
_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${RAY:-}" ]]; then
  if [[ -x "$_REPO/.venv/bin/ray" ]]; then RAY="$_REPO/.venv/bin/ray"; else RAY="$(command -v ray || true)"; fi
fi
[[ -n "$RAY" ]] || { echo "error: no 'ray' CLI: neither $_REPO/.venv/bin/ray (run make install) nor one on PATH" >&2; exit 1; }
# The Python next to the ray CLI (same venv), else python3.
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$(dirname "$RAY")/python" ]]; then PY="$(dirname "$RAY")/python"; else PY=python3; fi
else
  PY="$PYTHON"
fi

die() { echo "error: $*" >&2; exit 1; }

# The head's directory when --dir is not given: $FACEAUDIT_RAY_DIR, else
# $XDG_RUNTIME_DIR/faceaudit-ray (a per-user, mode-700 tmpfs on systemd machines), else
# /tmp/faceaudit-ray-<uid>. Stable per user, so `env-file` / `stop` find it again.
default_dir() {
  if [[ -n "${FACEAUDIT_RAY_DIR:-}" ]]; then echo "$FACEAUDIT_RAY_DIR"
  elif [[ -n "${XDG_RUNTIME_DIR:-}" && -d "$XDG_RUNTIME_DIR" && -O "$XDG_RUNTIME_DIR" ]]; then
    echo "${XDG_RUNTIME_DIR%/}/faceaudit-ray"
  else echo "/tmp/faceaudit-ray-$(id -u)"; fi
}

# check_private PATH KIND: PATH is a KIND (dir|file) owned by this user that no one else may
# read or write (no group/other permission bits), and not a symbolic link. Anything else could
# have been planted by another local user (a token they know, an env.sh they wrote, a pid file
# naming a process to kill), so it is refused, never reused.
check_private() {
  local path="$1" kind="$2" uid mode
  [[ -L "$path" ]] && die "$path is a symbolic link; refusing to use it (pass --dir DIR of your own)"
  if [[ "$kind" == dir ]]; then [[ -d "$path" ]] || die "$path is not a directory"
  else [[ -f "$path" ]] || die "$path is not a regular file"; fi
  read -r uid mode < <(stat -c '%u %a' -- "$path")
  [[ "$uid" == "$(id -u)" ]] || die "$path belongs to uid $uid, not to you ($(id -u)): another user may control it; remove it or pass --dir DIR of your own"
  (( (8#$mode & 8#077) == 0 )) || die "$path has mode $mode: it must be private to you (chmod 700 for a directory, 600 for a file) or removed"
}

# Ray puts unix sockets at DIR/ray/session_<date>_<time>_<usec>_<pid>/sockets/plasma_store.1,
# and a socket path may not exceed 107 bytes: DIR gets at most 107 - 40 - 7 - 23 = 37 of them.
check_socket_room() {
  (( ${#1} <= 37 )) || die "$1 is ${#1} characters long: Ray's unix sockets under it would exceed 107 bytes; pass a --dir of at most 37 characters (e.g. /tmp/fa-ray-$(id -u))"
}

# private_dir DIR: create DIR with mode 700 (its parents as needed), or check an existing one.
# mkdir without -p on DIR itself fails if someone created it in between; the check then refuses it.
private_dir() {
  local dir="$1"
  if [[ ! -e "$dir" && ! -L "$dir" ]]; then
    mkdir -p -- "$(dirname -- "$dir")"
    mkdir -m 700 -- "$dir" 2>/dev/null || [[ -d "$dir" ]] || die "cannot create $dir"
  fi
  check_private "$dir" dir
}

# free_ports N -> N free loopback ports, then the bounds of a 64-port free range for workers.
# (Free now, not reserved: a race with another process is possible but rare; start fails loudly.)
free_ports() {
  "$PY" - "$1" <<'EOF'
import random, socket, sys

def free(port=0):
    with socket.socket() as s:
        try:
            s.bind(("", port))  # all interfaces: Ray binds the node IP, not just loopback
        except OSError:
            return None
        return s.getsockname()[1]

ports = set()
while len(ports) < int(sys.argv[1]):
    ports.add(free())
while True:  # worker port range: 64 consecutive free ports away from the ones above
    base = random.randrange(20000, 60000 - 64)
    span = range(base, base + 64)
    if not ports.intersection(span) and all(free(p) for p in span):
        break
print(*sorted(ports), base, base + 63)
EOF
}

# start_ray LOG ARGS...: `ray start ARGS` in its own session (setsid: the node and everything it
# spawns get their own process group, see stop_node), in the background, with the caller's umask
# (the outputs a job writes are the user's usual files); $! is its pid.
start_ray() {
  local log="$1"; shift
  (umask "$_UMASK"; exec setsid "$RAY" start "$@") > "$log" 2>&1 < /dev/null &
}

node_alive() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

# wait_ready PIDFILE LOG GCS_ADDRESS MIN_NODES: until `ray status` sees MIN_NODES alive nodes.
wait_ready() {
  local pidfile="$1" log="$2" addr="$3" want="$4" deadline=$((SECONDS + ${FACEAUDIT_RAY_START_TIMEOUT:-180}))
  while (( SECONDS < deadline )); do
    if ! node_alive "$pidfile"; then
      echo "error: ray start exited; last lines of $log:" >&2; tail -n 40 "$log" >&2; return 1
    fi
    local n
    n=$("$RAY" status --address "$addr" 2>/dev/null | awk '/^Active:/{a=1;next} /^Pending:/{a=0} a && /node_/{c++} END{print c+0}' || true)
    if (( n >= want )); then return 0; fi
    sleep 2
  done
  echo "error: no $want live node(s) at $addr after ${FACEAUDIT_RAY_START_TIMEOUT:-180}s; see $log" >&2
  return 1
}

# wait_resource PIDFILE LOG GCS_ADDRESS RESOURCE: until the cluster lists this node's own marker
# resource (counting nodes is not enough: a node that just died still shows as active for a while).
wait_resource() {
  local pidfile="$1" log="$2" addr="$3" res="$4" deadline=$((SECONDS + ${FACEAUDIT_RAY_START_TIMEOUT:-180}))
  while (( SECONDS < deadline )); do
    if ! node_alive "$pidfile"; then
      echo "error: ray start exited; last lines of $log:" >&2; tail -n 40 "$log" >&2; return 1
    fi
    if "$RAY" status --address "$addr" 2>/dev/null | grep -q " $res\b"; then return 0; fi
    sleep 2
  done
  echo "error: the node with resource $res did not join $addr after ${FACEAUDIT_RAY_START_TIMEOUT:-180}s; see $log" >&2
  return 1
}

# stop_node DIR NAME: stop the node started from DIR (NAME.pid) and every process that names DIR.
stop_node() {
  local dir="$1" name="$2" pid
  # A deleted DIR still gets its processes swept (found by DIR in their command lines).
  if [[ -e "$dir" || -L "$dir" ]]; then check_private "$dir" dir; dir="$(cd "$dir" && pwd)"
  else dir="$(realpath -m "$dir")"; fi
  if [[ -e "$dir/$name.pid" ]]; then
    check_private "$dir/$name.pid" file
    pid="$(cat "$dir/$name.pid")"
    # SIGTERM to the `ray start --block` process: it shuts down the raylet, GCS, dashboard...
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    # ...and the process group it leads (setsid) catches anything it left behind.
    kill -TERM -- "-$pid" 2>/dev/null || true
    rm -f "$dir/$name.pid"
  fi
  # Leftovers (workers, agents) are found by DIR in their command line, and ended by pid.
  local left
  for sig in TERM KILL; do
    left=$(leftover_pids "$dir/ray")
    [[ -z "$left" ]] && break
    # shellcheck disable=SC2086
    kill -"$sig" $left 2>/dev/null || true
    sleep 2
  done
  left=$(leftover_pids "$dir/ray")
  [[ -z "$left" ]] || die "processes still alive after stop: $left"
  echo "stopped ray $name in $dir"
}

leftover_pids() {
  "$PY" - "$1/" <<'EOF'
import os, sys
needle = sys.argv[1].encode()
me = os.getpid()
out = []
for p in os.listdir("/proc"):
    if not p.isdigit() or int(p) == me:
        continue
    try:
        with open(f"/proc/{p}/cmdline", "rb") as f:
            cmd = f.read()
    except OSError:
        continue
    if needle in cmd:
        out.append(p)
print(" ".join(out))
EOF
}
