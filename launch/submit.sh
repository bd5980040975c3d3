#!/usr/bin/env bash
# Submit a run to an existing Ray cluster with `ray job submit`.
#
#   launch/submit.sh [--address http://HEAD:8265] [--dry-run] CONFIG [key.sub=value ...]
#
# The job runs `python -m rlkit.cli train CONFIG ray_address=auto ...` on the cluster, with this
# checkout as its working directory (configs, local reward files and data travel with it; .venv,
# runs/ and ray-logs/ do not). The cluster's Python must have rlkit and its dependencies installed
# (launch/setup_venv.sh on every node, or an image built with `pip install .`).
# Environment: RAY_ADDRESS (the dashboard address, used when --address is not given),
# RLKIT_JOB_ID [rlkit-<date>-<random>], RLKIT_ENV_VARS (space-separated NAMEs whose values are
# forwarded to the job) [HF_HUB_OFFLINE RLKIT_CACHE DS_ACCELERATOR TOKENIZERS_PARALLELISM
# GLOO_SOCKET_IFNAME NCCL_SOCKET_IFNAME WANDB_API_KEY]; RAY_AUTH_MODE=disabled is always set.
set -euo pipefail

usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
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

# The runtime environment as JSON, built by Python so values are quoted correctly.
RUNTIME_ENV="$(RLKIT_ENV_VARS="${RLKIT_ENV_VARS:-HF_HUB_OFFLINE RLKIT_CACHE DS_ACCELERATOR TOKENIZERS_PARALLELISM GLOO_SOCKET_IFNAME NCCL_SOCKET_IFNAME WANDB_API_KEY}" \
    "$PYTHON" -c '
import json, os, sys
names = os.environ["RLKIT_ENV_VARS"].split()
env = {n: os.environ[n] for n in names if n in os.environ}
env["RAY_AUTH_MODE"] = "disabled"
print(json.dumps({"working_dir": sys.argv[1], "env_vars": env,
                  "excludes": [".venv/", "runs/", "ray-logs/", ".git/", "*.egg-info/", "__pycache__/"]}))
' "$ROOT")"

cmd=("$RAY" job submit --address="$ADDRESS" --submission-id="$JOB_ID" --runtime-env-json="$RUNTIME_ENV"
     --no-wait -- python -m rlkit.cli train "$CONFIG" ray_address=auto "$@")
if [[ "$DRY_RUN" == 1 ]]; then
    printf '%q ' "${cmd[@]}"
    printf '\n'
    exit 0
fi
"${cmd[@]}"
echo
echo "submitted job: $JOB_ID"
echo "follow its logs:  $RAY job logs --address=$ADDRESS --follow $JOB_ID"
echo "its status:       $RAY job status --address=$ADDRESS $JOB_ID"
echo "stop it:          $RAY job stop --address=$ADDRESS $JOB_ID"
