# shellcheck shell=bash
# Ray cluster bring-up, wait-for-nodes and teardown, as functions to `source`.
#
# Used by launch/local.sh (one node), launch/slurm/rlkit.sbatch (N nodes) and tests/test_launch.py
# (two nodes on loopback). Every process is started in the background with `ray start --block`
# and remembered by PID; teardown signals those PIDs only. `ray stop` is never used: it kills every
# Ray process of the user on the machine, including other jobs' clusters.
#
#   source launch/ray_cluster.sh
#   rc_auth_setup "$PWD/ray-auth" || exit 2        # token authentication for all that follows
#   rc_start_head 6379 --num-cpus=8 --num-gpus=4
#   RC_LAUNCH=(srun --nodes=1 --ntasks=1 -w node2)     # optional prefix for the next start
#   rc_start_worker node2 "$(rc_head_address 6379)" --num-cpus=8 --num-gpus=4
#   RC_LAUNCH=()
#   rc_wait_for_nodes "$(rc_head_address 6379)" 2 300 || exit 1
#   ...; rc_teardown
#
# Settings (environment, all optional):
#   RC_LOG_DIR     where each started process logs (NAME.log)      [./ray-logs]
#   RC_RAY         the ray CLI                                      [ray next to $RC_PYTHON, else ray]
#   RC_PYTHON      python with ray installed, for rc_wait_for_nodes [python3]
#   RC_NODE_IP     IP this node advertises (head and local workers) [Ray's choice]
#   RC_DASHBOARD   1 starts the dashboard (on 127.0.0.1)            [0]
#   RC_STOP_GRACE  seconds between SIGTERM and SIGKILL on teardown  [20]
#   RC_DASHBOARD_PORT  the dashboard's port on 127.0.0.1            [8265]
#   RLKIT_RAY_AUTH token: rc_auth_setup turns Ray token authentication on; off: no authentication
#                  (anyone who reaches the cluster's ports can run code as you; warns)  [token]

RC_PIDS=()
RC_NAMES=()
RC_LAUNCH=()
RC_AUTH_FILE=""
: "${RC_LOG_DIR:=$PWD/ray-logs}"
: "${RC_PYTHON:=python3}"
: "${RC_DASHBOARD:=0}"
: "${RC_STOP_GRACE:=20}"

rc_log() { printf '[ray_cluster %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

rc_ray() {
    if [[ -n "${RC_RAY:-}" ]]; then
        printf '%s\n' "$RC_RAY"
    elif [[ -x "$(dirname "$(command -v "$RC_PYTHON")")/ray" ]]; then
        printf '%s\n' "$(dirname "$(command -v "$RC_PYTHON")")/ray"
    else
        printf 'ray\n'
    fi
}

# rc_auth_setup DIR: Ray token authentication for every node, driver and client started from this
# shell from now on (docs/security.md). A new random token goes to DIR/token (DIR mode 0700, the
# file 0600, never printed; DIR must be on a filesystem every node reads), and RAY_AUTH_MODE=token
# and RAY_AUTH_TOKEN_PATH are exported (srun passes them on). rc_teardown deletes the file.
# RLKIT_RAY_AUTH=off exports RAY_AUTH_MODE=disabled instead, with a warning.
rc_auth_setup() {
    local dir="$1"
    unset RAY_AUTH_TOKEN RAY_AUTH_TOKEN_PATH
    case "${RLKIT_RAY_AUTH:-token}" in
        off)
            rc_log "WARNING: Ray token authentication is OFF (RLKIT_RAY_AUTH=off): anyone who can reach" \
                "this cluster's ports can run code as $(id -un). See docs/security.md."
            export RAY_AUTH_MODE=disabled
            return 0 ;;
        token) ;;
        *)
            rc_log "RLKIT_RAY_AUTH must be 'token' or 'off', not '${RLKIT_RAY_AUTH}'"
            return 2 ;;
    esac
    (umask 077 && mkdir -p "$dir") || return 2
    if [[ ! -O "$dir" ]] || ! chmod 700 "$dir"; then
        rc_log "the token folder $dir is not yours: choose another one"
        return 2
    fi
    rm -f "$dir/token"
    "$RC_PYTHON" - "$dir/token" <<'PY' || return 2
import os, secrets, sys

# O_EXCL: a new file, created with mode 0600 (umask can only narrow it).
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
os.write(fd, secrets.token_hex(32).encode())
os.close(fd)
PY
    RC_AUTH_FILE="$dir/token"
    export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$RC_AUTH_FILE"
    rc_log "Ray token authentication on (token file $RC_AUTH_FILE, mode 0600)"
}

# rc_free_port: a TCP port that is free right now.
rc_free_port() {
    "$RC_PYTHON" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'
}

# rc_head_address PORT: HOST:PORT of a head started here (RC_NODE_IP, else this host's first IP).
rc_head_address() {
    local ip="${RC_NODE_IP:-}"
    [[ -n "$ip" ]] || ip="$(hostname -I 2>/dev/null | awk '{print $1}')"
    [[ -n "$ip" ]] || ip=127.0.0.1
    printf '%s:%s\n' "$ip" "$1"
}

# rc_spawn NAME CMD...: run CMD in the background, log to $RC_LOG_DIR/NAME.log, remember its PID.
rc_spawn() {
    local name="$1"
    shift
    mkdir -p "$RC_LOG_DIR"
    "$@" >"$RC_LOG_DIR/$name.log" 2>&1 &
    RC_PIDS+=("$!")
    RC_NAMES+=("$name")
    rc_log "started $name (pid $!): $*"
}

_rc_ip_args() {
    if [[ -n "${RC_NODE_IP:-}" ]]; then printf -- '--node-ip-address=%s\n' "$RC_NODE_IP"; fi
}

# rc_start_head PORT [ray start options...]: the head node (GCS on PORT), through ${RC_LAUNCH[@]}.
rc_start_head() {
    local port="$1"
    shift
    local dash=(--include-dashboard=false)
    [[ "$RC_DASHBOARD" == 1 ]] && dash=(--include-dashboard=true --dashboard-host=127.0.0.1
                                        --dashboard-port="${RC_DASHBOARD_PORT:-8265}")
    local ip_args
    mapfile -t ip_args < <(_rc_ip_args)
    rc_spawn head "${RC_LAUNCH[@]}" "$(rc_ray)" start --head --port="$port" "${ip_args[@]}" "${dash[@]}" \
        --disable-usage-stats --block "$@"
}

# rc_start_worker NAME HEAD_ADDRESS [ray start options...]: a worker node, through ${RC_LAUNCH[@]}.
rc_start_worker() {
    local name="$1" address="$2"
    shift 2
    local ip_args=()
    [[ ${#RC_LAUNCH[@]} -eq 0 ]] && mapfile -t ip_args < <(_rc_ip_args)
    rc_spawn "$name" "${RC_LAUNCH[@]}" "$(rc_ray)" start --address="$address" "${ip_args[@]}" \
        --disable-usage-stats --block "$@"
}

# rc_wait_for_nodes ADDRESS N [TIMEOUT_S=300]: wait until N nodes are alive in the cluster at
# ADDRESS. Fails (status 1, message on stderr) on timeout, or as soon as a started process exits.
rc_wait_for_nodes() {
    local address="$1" want="$2" timeout="${3:-300}"
    local pids="${RC_PIDS[*]}" names="${RC_NAMES[*]}"
    RC_WAIT_ADDRESS="$address" RC_WAIT_N="$want" RC_WAIT_TIMEOUT="$timeout" RC_WAIT_PIDS="$pids" \
        RC_WAIT_NAMES="$names" RC_WAIT_LOGS="$RC_LOG_DIR" "$RC_PYTHON" - <<'PY'
import os, socket, sys, time

address, want = os.environ["RC_WAIT_ADDRESS"], int(os.environ["RC_WAIT_N"])
deadline = time.monotonic() + float(os.environ["RC_WAIT_TIMEOUT"])
watched = list(zip(os.environ["RC_WAIT_NAMES"].split(), map(int, os.environ["RC_WAIT_PIDS"].split())))
logs = os.environ["RC_WAIT_LOGS"]


def fail(msg):
    print(f"rc_wait_for_nodes: {msg}", file=sys.stderr)
    sys.exit(1)


def check_started():
    # A `ray start --block` that exited has failed: say which, instead of waiting for the timeout.
    for name, pid in watched:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            fail(f"'{name}' (pid {pid}) exited before the cluster was up; see {logs}/{name}.log")


host, port = address.rsplit(":", 1)
while True:  # the GCS port first: ray.init on a closed port waits a long time before failing
    check_started()
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
        break
    except OSError:
        if time.monotonic() > deadline:
            fail(f"timed out: no Ray head listening at {address}")
        time.sleep(1)
import ray

ray.init(address=address, log_to_driver=False, logging_level="ERROR")
alive = []
while True:
    alive = [n for n in ray.nodes() if n["Alive"]]
    if len(alive) >= want:
        break
    check_started()
    if time.monotonic() > deadline:
        fail(f"timed out after {os.environ['RC_WAIT_TIMEOUT']} s: {len(alive)} of {want} nodes joined "
             f"{address} ({', '.join(n['NodeManagerAddress'] for n in alive)}); logs in {logs}")
    time.sleep(2)
for n in alive:
    res = {k: v for k, v in n["Resources"].items() if not k.startswith(("node:", "memory", "object_store"))}
    print(f"node {n['NodeID'][:12]} {n['NodeManagerAddress']}:{n['NodeManagerPort']} {res}")
ray.shutdown()
PY
}

# rc_teardown: SIGTERM every process started here (newest first), SIGKILL what is left after
# RC_STOP_GRACE seconds. `ray start --block` stops its node's Ray processes on SIGTERM; srun
# forwards the signal to the remote `ray start`.
rc_teardown() {
    local i pid waited=0
    for ((i = ${#RC_PIDS[@]} - 1; i >= 0; i--)); do
        pid="${RC_PIDS[i]}"
        kill -TERM "$pid" 2>/dev/null && rc_log "stopping ${RC_NAMES[i]} (pid $pid)"
    done
    for pid in "${RC_PIDS[@]}"; do
        while kill -0 "$pid" 2>/dev/null && ((waited < RC_STOP_GRACE)); do
            sleep 1
            waited=$((waited + 1))
        done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    RC_PIDS=()
    RC_NAMES=()
    if [[ -n "$RC_AUTH_FILE" ]]; then
        rm -f "$RC_AUTH_FILE"
        RC_AUTH_FILE=""
    fi
}
