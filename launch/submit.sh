#!/usr/bin/env bash
# Submit a run to an existing Ray cluster with `ray job submit`.
#
#   launch/submit.sh [--address http://HEAD:8265] [--dry-run] CONFIG [key.sub=value ...]
#
# The job runs `python -m rlkit.cli train CONFIG ray_address=auto ...` on the cluster, with this
# checkout as its working directory (configs, local reward files and data travel with it; .venv,
# runs/ and ray-logs/ do not). The cluster's Python must have rlkit and its dependencies installed
# (launch/setup_venv.sh on every node, or an image built with `pip install .`).
# Authentication: the cluster's Ray token, from RAY_AUTH_TOKEN_PATH (a file of mode 0600),
# RAY_AUTH_TOKEN or ~/.ray/auth_token; RLKIT_RAY_AUTH=off submits without one (docs/security.md).
# Stopping: `ray job stop` sends SIGTERM; the driver checkpoints within RLKIT_STOP_WAIT_S [600]
# seconds before Ray kills it; resubmit with `--resume auto` to continue.
# Environment: RAY_ADDRESS (the dashboard address, used when --address is not given),
# RLKIT_JOB_ID [rlkit-<date>-<random>], RLKIT_ENV_VARS (space-separated NAMEs whose values are
# forwarded to the job; secrets go only there, never on a command line) [HF_HUB_OFFLINE
# RLKIT_CACHE DS_ACCELERATOR TOKENIZERS_PARALLELISM GLOO_SOCKET_IFNAME NCCL_SOCKET_IFNAME
# RLKIT_TRUST_CHECKPOINTS WANDB_API_KEY HF_TOKEN HUGGING_FACE_HUB_TOKEN MLFLOW_TRACKING_TOKEN
# MLFLOW_TRACKING_USERNAME MLFLOW_TRACKING_PASSWORD COMET_API_KEY NEPTUNE_API_TOKEN].
set -euo pipefail

usage() { sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
ADDRESS="${RAY_ADDRESS:-}"
DRY_RUN=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --address) ADDRESS="$2"; shift 2 ;;
        --address=*) ADDRESS="${1#--address=}"; shift ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h | --help) usage ;;
        *) break ;;
    esac
done
[[ $# -ge 1 ]] || usage
CONFIG="$1"
shift
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
[[ -f "$ROOT/$CONFIG" || -f "$CONFIG" ]] || { echo "submit.sh: config file not found: $CONFIG" >&2; exit 2; }
[[ -n "$ADDRESS" ]] || { echo "submit.sh: no cluster: pass --address http://HEAD:8265 or set RAY_ADDRESS" >&2; exit 2; }
PYTHON="${RLKIT_PYTHON:-python3}"
[[ -z "${RLKIT_PYTHON:-}" && -x "$ROOT/.venv/bin/python" ]] && PYTHON="$ROOT/.venv/bin/python"
RAY="$(dirname "$(command -v "$PYTHON")")/ray"
[[ -x "$RAY" ]] || RAY=ray
JOB_ID="${RLKIT_JOB_ID:-rlkit-$(date +%Y%m%d-%H%M%S)-$RANDOM}"

# Authentication of this client to the cluster's dashboard.
case "${RLKIT_RAY_AUTH:-token}" in
    off)
        echo "submit.sh: WARNING: submitting without a Ray token (RLKIT_RAY_AUTH=off); a cluster that" \
            "accepts this accepts anyone's jobs. See docs/security.md." >&2
        export RAY_AUTH_MODE=disabled ;;
    token)
        if [[ -n "${RAY_AUTH_TOKEN_PATH:-}" ]]; then
            [[ -r "$RAY_AUTH_TOKEN_PATH" ]] || { echo "submit.sh: RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH: no such readable file" >&2; exit 2; }
            mode="$(stat -c %a "$RAY_AUTH_TOKEN_PATH")"
            if [[ "$mode" != 600 && "$mode" != 400 ]]; then
                echo "submit.sh: RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH has mode $mode: other users can read" \
                    "the token; chmod 600 it" >&2
                exit 2
            fi
        elif [[ -z "${RAY_AUTH_TOKEN:-}" && ! -r "$HOME/.ray/auth_token" ]]; then
            echo "submit.sh: no Ray token for the cluster: set RAY_AUTH_TOKEN_PATH to its token file (the" \
                "launchers write it to <ray tmp>/auth/token or ray-logs/<job id>/auth/token), or" \
                "RLKIT_RAY_AUTH=off for a cluster without authentication (docs/security.md)" >&2
            exit 2
        fi
        export RAY_AUTH_MODE=token ;;
    *) echo "submit.sh: RLKIT_RAY_AUTH must be 'token' or 'off', not '$RLKIT_RAY_AUTH'" >&2; exit 2 ;;
esac

# The runtime environment goes in a file readable only by this user: on a command line its values
# (API keys among them) would be visible to every user of this machine in `ps`.
RUNTIME_ENV_FILE="$(mktemp "${TMPDIR:-/tmp}/rlkit-runtime-env.XXXXXX")"
trap 'rm -f "$RUNTIME_ENV_FILE"' EXIT
MASKED="$(RLKIT_ENV_VARS="${RLKIT_ENV_VARS:-HF_HUB_OFFLINE RLKIT_CACHE DS_ACCELERATOR TOKENIZERS_PARALLELISM GLOO_SOCKET_IFNAME NCCL_SOCKET_IFNAME RLKIT_TRUST_CHECKPOINTS WANDB_API_KEY HF_TOKEN HUGGING_FACE_HUB_TOKEN MLFLOW_TRACKING_TOKEN MLFLOW_TRACKING_USERNAME MLFLOW_TRACKING_PASSWORD COMET_API_KEY NEPTUNE_API_TOKEN}" \
    "$PYTHON" -c '
import json, os, sys

names = os.environ["RLKIT_ENV_VARS"].split()
env = {n: os.environ[n] for n in names if n in os.environ}
# "ray job stop" sends SIGTERM, then SIGKILL after this many seconds: time to finish the step and
# write a checkpoint.
env["RAY_JOB_STOP_WAIT_TIME_S"] = os.environ.get("RLKIT_STOP_WAIT_S", "600")
spec = {"working_dir": sys.argv[1], "env_vars": env,
        "excludes": [".venv/", "runs/", "ray-logs/", ".git/", "*.egg-info/", "__pycache__/"]}
with open(sys.argv[2], "w") as f:
    json.dump(spec, f)
secret = ("_KEY", "_TOKEN", "_PASSWORD", "_SECRET", "_USERNAME")
spec["env_vars"] = {k: "<set>" if k.endswith(secret) else v for k, v in env.items()}
print(json.dumps(spec))
' "$ROOT" "$RUNTIME_ENV_FILE")"

cmd=("$RAY" job submit --address="$ADDRESS" --submission-id="$JOB_ID" --runtime-env="$RUNTIME_ENV_FILE"
     --no-wait -- python -m rlkit.cli train "$CONFIG" ray_address=auto "$@")
if [[ "$DRY_RUN" == 1 ]]; then
    printf '%q ' "${cmd[@]}"
    printf '\n# runtime env (secret values masked): %s\n' "$MASKED"
    exit 0
fi
"${cmd[@]}"
echo
echo "submitted job: $JOB_ID"
echo "follow its logs:  $RAY job logs --address=$ADDRESS --follow $JOB_ID"
echo "its status:       $RAY job status --address=$ADDRESS $JOB_ID"
echo "stop it:          $RAY job stop --address=$ADDRESS $JOB_ID   (SIGTERM: it checkpoints first)"
echo "continue it:      $0 --address $ADDRESS $CONFIG $* --resume auto"
