#!/usr/bin/env bash
# Train on this machine with a Ray head that only advertises 127.0.0.1.
#
#   launch/local.sh CONFIG [key.sub=value ...] [--resume auto|PATH]
#
# Starts a one-node Ray cluster that requires a token made for this run (dashboard off unless
# RLKIT_DASHBOARD=1, then on 127.0.0.1), runs `rlkit train CONFIG ray_address=auto ...` against it
# with that token, and stops it on exit, Ctrl-C or failure.
# Environment: RLKIT_NUM_CPUS [nproc], RLKIT_NUM_GPUS [Ray's detection], RLKIT_DASHBOARD [0],
# RLKIT_RAY_PORT [a free port], RLKIT_RAY_TMP [a new folder under /tmp],
# RLKIT_PYTHON [.venv/bin/python of this checkout, else python3],
# RLKIT_RAY_AUTH [token; off: no authentication, with a warning (docs/security.md)].
set -euo pipefail

if [[ $# -lt 1 || "$1" == -h || "$1" == --help ]]; then
    sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
CONFIG="$1"
shift
[[ -f "$CONFIG" ]] || { echo "local.sh: config file not found: $CONFIG" >&2; exit 2; }

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${RLKIT_PYTHON:-}" ]]; then
    RLKIT_PYTHON=python3
    [[ -x "$ROOT/.venv/bin/python" ]] && RLKIT_PYTHON="$ROOT/.venv/bin/python"
fi
export RC_PYTHON="$RLKIT_PYTHON"
RAY_TMP="${RLKIT_RAY_TMP:-$(mktemp -d /tmp/rlkit-ray.XXXXXX)}"
export RC_LOG_DIR="$RAY_TMP/launch-logs" RC_DASHBOARD="${RLKIT_DASHBOARD:-0}" RC_NODE_IP=127.0.0.1
# On Linux Ray replaces 127.0.0.1 by the host's address unless multi-node clusters are disabled;
# disabled, the head advertises loopback and no other machine can join it.
# Ray's gRPC ports still listen on every interface: the token keeps other machines' clients out.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0

# shellcheck source=launch/ray_cluster.sh
source "$ROOT/launch/ray_cluster.sh"
trap rc_teardown EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
rc_auth_setup "$RAY_TMP/auth" || exit 2

PORT="${RLKIT_RAY_PORT:-$(rc_free_port)}"
args=(--num-cpus="${RLKIT_NUM_CPUS:-$(nproc)}" --temp-dir="$RAY_TMP")
[[ -n "${RLKIT_NUM_GPUS:-}" ]] && args+=(--num-gpus="$RLKIT_NUM_GPUS")
rc_start_head "$PORT" "${args[@]}"
ADDRESS="$(rc_head_address "$PORT")"
rc_wait_for_nodes "$ADDRESS" 1 "${RLKIT_RAY_TIMEOUT:-180}"

# RAY_ADDRESS makes ray_address=auto mean this head, not another cluster on the same machine.
export RAY_ADDRESS="$ADDRESS"
status=0
"$RLKIT_PYTHON" -m rlkit.cli train "$CONFIG" ray_address=auto "$@" || status=$?
exit "$status"
