#!/usr/bin/env bash
# A 2-node Ray cluster on one machine: a head node and a worker node, each with its own CPUs and a
# custom resource naming it (node_head, node_worker), to try multi-node placement without a cloud.
#
#   cluster/local_two_node.sh start | stop | status | kill-worker | start-worker
#
# kill-worker SIGKILLs every process of the worker node at once (its raylet, agents and Ray
# workers), as when a machine dies: to try what a run does when it loses a node; start-worker
# brings a fresh worker node up in its place.
#
# Settings (environment):
#   SALGL_CLUSTER_DIR  state and Ray temp dir (default /tmp/salgl-cluster; keep it short: Ray's
#                      socket paths must stay under 108 characters)
#   RAY_PORT           head GCS port (default 6390); the next three ports go to the Ray Client
#                      server and the two nodes' dashboard agents
#   DASHBOARD_PORT     dashboard and Job Submission API (default 8265)
#   CPUS_PER_NODE      CPUs each node offers (default 1)
#   OBJECT_STORE_BYTES object store per node (default 200000000)
#   VENV               the Python environment jobs run in (default: the project's .venv)
#   RAY_AUTH_MODE      token (default: a token is made at ~/.ray/auth_token if missing) or disabled
#
# `stop` ends only the processes of this cluster (those started for SALGL_CLUSTER_DIR), never other
# Ray instances on the machine: `ray stop` would end them all.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${SALGL_CLUSTER_DIR:-/tmp/salgl-cluster}"
RAY_PORT="${RAY_PORT:-6390}"
DASHBOARD_PORT="${DASHBOARD_PORT:-8265}"
CPUS_PER_NODE="${CPUS_PER_NODE:-1}"
OBJECT_STORE_BYTES="${OBJECT_STORE_BYTES:-200000000}"
VENV="${VENV:-$ROOT/.venv}"
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
PYTHON="$VENV/bin/python"
[[ -x "$PYTHON" ]] || PYTHON=python3

# Jobs run `python` from the PATH the cluster started with: start it inside the venv.
activate() {
    if [[ ! -x "$VENV/bin/ray" ]]; then
        echo "no ray in $VENV/bin (set VENV to the environment with salgl installed)" >&2
        exit 2
    fi
    export VIRTUAL_ENV="$VENV" PATH="$VENV/bin:$PATH"
}

# Every process of this cluster carries SALGL_LOCAL_CLUSTER=$DIR in its environment (set on the
# `ray start` commands, inherited by the daemons, workers and job drivers they spawn); Ray renames
# many of them (ray::IDLE, ray-dashboard-...), so command lines alone would miss some.
own_pids() {
    "$PYTHON" - "$DIR" "${1:-}" <<'PY'
import os, sys

marker = ("SALGL_LOCAL_CLUSTER=" + sys.argv[1]).encode()
# "worker": only the worker node's processes, those naming its temp dir, and their descendants.
worker_dir = (sys.argv[1] + "/ray-worker").encode() if sys.argv[2] == "worker" else b""


def read(pid: str, name: str) -> bytes:
    try:
        with open(f"/proc/{pid}/{name}", "rb") as f:
            return f.read()
    except OSError:
        return b""


parents, found = {}, set()
for pid in filter(str.isdigit, os.listdir("/proc")):
    stat = read(pid, "stat")
    if stat:
        parents[int(pid)] = int(stat.rsplit(b")", 1)[1].split()[1])
        if marker in read(pid, "environ").split(b"\0") and worker_dir in read(pid, "cmdline"):
            found.add(int(pid))
grown = True
while grown:  # and their descendants, whatever their environment
    children = {pid for pid, parent in parents.items() if parent in found} - found
    found |= children
    grown = bool(children)
print(" ".join(str(pid) for pid in sorted(found - {os.getpid(), os.getppid()})))
PY
}

common_args() {
    echo --num-cpus "$CPUS_PER_NODE" --num-gpus 0 --object-store-memory "$OBJECT_STORE_BYTES" --disable-usage-stats
}

# On one machine the worker node needs its own temp dir, as on a real second machine: sharing
# the head's would share its runtime_resources (the worker node's agent then deletes the job's
# working directory under the running driver) and its logs (every line streamed twice).
start_worker_node() {
    # shellcheck disable=SC2046
    SALGL_LOCAL_CLUSTER="$DIR" ray start $(common_args) --address "127.0.0.1:$RAY_PORT" \
        --dashboard-agent-listen-port $((RAY_PORT + 3)) --resources '{"node_worker": 1}' \
        --temp-dir "$DIR/ray-worker"
}

start() {
    activate
    if [[ -n "$(own_pids)" ]]; then
        echo "a cluster is already running under $DIR (cluster/local_two_node.sh stop first)" >&2
        exit 1
    fi
    mkdir -p "$DIR/ray" "$DIR/ray-worker"
    if [[ "$RAY_AUTH_MODE" == token ]]; then
        ray get-auth-token --generate >/dev/null 2>&1  # makes ~/.ray/auth_token once
    fi
    # shellcheck disable=SC2046
    if ! SALGL_LOCAL_CLUSTER="$DIR" ray start --head $(common_args) --port "$RAY_PORT" \
            --ray-client-server-port $((RAY_PORT + 1)) --dashboard-host 127.0.0.1 \
            --dashboard-port "$DASHBOARD_PORT" --dashboard-agent-listen-port $((RAY_PORT + 2)) \
            --resources '{"node_head": 1}' --temp-dir "$DIR/ray"; then
        stop >/dev/null
        exit 1
    fi
    if ! start_worker_node; then
        stop >/dev/null
        exit 1
    fi
    cat > "$DIR/cluster.env" <<EOF
RAY_ADDRESS=http://127.0.0.1:$DASHBOARD_PORT
RAY_GCS_ADDRESS=127.0.0.1:$RAY_PORT
EOF
    echo "2-node cluster up: dashboard http://127.0.0.1:$DASHBOARD_PORT, GCS 127.0.0.1:$RAY_PORT"
    echo "submit with: salgl submit --address http://127.0.0.1:$DASHBOARD_PORT -- train ..."
}

stop() {
    local pids
    pids="$(own_pids)"
    if [[ -z "$pids" ]]; then
        echo "no cluster running under $DIR"
        return 0
    fi
    # shellcheck disable=SC2086
    kill -TERM $pids 2>/dev/null || true
    for _ in $(seq 1 30); do
        [[ -z "$(own_pids)" ]] && break
        sleep 0.5
    done
    pids="$(own_pids)"
    if [[ -n "$pids" ]]; then  # the GCS can outlive SIGTERM for a while, as with `ray stop`
        # shellcheck disable=SC2086
        kill -KILL $pids 2>/dev/null || true
    fi
    rm -f "$DIR/cluster.env"
    echo "stopped the cluster under $DIR"
}

status() {
    activate
    if [[ -z "$(own_pids)" ]]; then
        echo "no cluster running under $DIR"
        return 3
    fi
    ray status --address "127.0.0.1:$RAY_PORT"
}

kill_worker() {
    local pids
    pids="$(own_pids worker)"
    if [[ -z "$pids" ]]; then
        echo "no worker node running under $DIR" >&2
        return 3
    fi
    # shellcheck disable=SC2086
    kill -KILL $pids 2>/dev/null || true
    echo "killed the worker node under $DIR ($(wc -w <<< "$pids") processes)"
}

start_worker() {
    activate
    if [[ -n "$(own_pids worker)" ]]; then
        echo "the worker node is already running under $DIR" >&2
        return 1
    fi
    rm -rf "$DIR/ray-worker" && mkdir -p "$DIR/ray-worker"  # a new machine: nothing of the dead node's
    start_worker_node
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    kill-worker) kill_worker ;;
    start-worker) start_worker ;;
    *) echo "usage: $0 start|stop|status|kill-worker|start-worker" >&2; exit 2 ;;
esac
