# Shared helpers for local_head.sh / local_worker.sh (sourced, not run).

RAY="${RAY:-$(command -v ray || true)}"
[[ -n "$RAY" ]] || { echo "error: the 'ray' CLI is not on PATH (activate the project's venv)" >&2; exit 1; }
# The Python next to the ray CLI (same venv), else python3.
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$(dirname "$RAY")/python" ]]; then PY="$(dirname "$RAY")/python"; else PY=python3; fi
else
  PY="$PYTHON"
fi

die() { echo "error: $*" >&2; exit 1; }

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
  if [[ -d "$dir" ]]; then dir="$(cd "$dir" && pwd)"; else dir="$(realpath -m "$dir")"; fi
  if [[ -f "$dir/$name.pid" ]]; then
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
