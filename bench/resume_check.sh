#!/usr/bin/env bash
# Kill a real compression with SIGKILL after KILL_AFTER seconds, resume it, and compare the saved
# weights with an uninterrupted run of the same command.
#   bash bench/resume_check.sh [extra compress flags...]
set -euo pipefail
cd "$(dirname "$0")/.."
KILL_AFTER=${KILL_AFTER:-60}
WORK=$(mktemp -d)
CALIB=../shared/data/wikitext-2-raw/wiki.valid.raw
run() { .venv/bin/vaclm compress demo --calib "$CALIB" --quiet "$@"; }
run --out "$WORK/ref" "$@"
run --out "$WORK/out" "$@" & pid=$!
sleep "$KILL_AFTER"; kill -9 "$pid" || true; wait "$pid" || true
blocks=$(python3 -c "import json;print(len(json.load(open('$WORK/out.partial/state.json'))['completed']))")
echo "killed after ${KILL_AFTER}s with $blocks blocks checkpointed"
run --out "$WORK/out" --resume "$@"
a=$(sha256sum "$WORK/ref/model.safetensors" | cut -d' ' -f1)
b=$(sha256sum "$WORK/out/model.safetensors" | cut -d' ' -f1)
echo "uninterrupted $a"; echo "resumed       $b"
[ "$a" = "$b" ] && echo "IDENTICAL" || { echo "DIFFERENT"; exit 1; }
rm -rf "$WORK"
