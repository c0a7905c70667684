#!/usr/bin/env bash
# The GPU check of issue 19 (docs/gpu.md): one command, at most --budget seconds (default 480),
# writes bench/results/gpu_check/gpu_check.{json,md} (or --out DIR / $VACLM_GPU_CHECK_OUT).
# Needs only this working tree and torch, transformers, safetensors (triton for torch.compile on
# CUDA); vaclm need not be installed and nothing is downloaded. Without CUDA it runs at toy size.
#   scripts/gpu_check.sh                    # on a CUDA machine
#   scripts/gpu_check.sh --tiny             # anywhere, toy sizes
#   scripts/gpu_check.sh --parts c --budget 420   # only the speed part, with more time
set -euo pipefail
cd "$(dirname "$0")/.."
# $PYTHON, else the clone's .venv, else python3 (a GPU machine's own environment)
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$PY" bench/gpu_check.py "$@"
