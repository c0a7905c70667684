#!/usr/bin/env bash
# Kill a real compression with SIGKILL once KILL_AT_BLOCKS blocks are checkpointed (or after
# KILL_AFTER seconds, if set), resume it, and compare the saved weights with an uninterrupted run of
# the same command. REF=folder reuses an uninterrupted run made earlier with the same flags.
#   bash bench/resume_check.sh [extra compress flags...]
set -euo pipefail
cd "$(dirname "$0")/.."
KILL_AT_BLOCKS=${KILL_AT_BLOCKS:-10}
WORK=$(mktemp -d)
CALIB=../shared/data/wikitext-2-raw/wiki.valid.raw
COMPRESS=(.venv/bin/vaclm compress demo --calib "$CALIB" --quiet)
run() { "${COMPRESS[@]}" "$@"; }
completed() { python3 -c "import json,os,sys;p=sys.argv[1];print(len(json.load(open(p))['completed']) if os.path.exists(p) else 0)" "$WORK/out.partial/state.json" 2>/dev/null || echo 0; }
REF=${REF:-}
if [ -z "$REF" ]; then
  start=$(date +%s)
  run --out "$WORK/ref" "$@"
  echo "uninterrupted run: $(( $(date +%s) - start )) s (loading, statistics, allocation, compression, saving)"
  REF=$WORK/ref
fi
start=$(date +%s)
# exec: $! is the compressing process itself, not a shell around it that SIGKILL would leave orphaned
( exec "${COMPRESS[@]}" --out "$WORK/out" "$@" ) & pid=$!
if [ -n "${KILL_AFTER:-}" ]; then sleep "$KILL_AFTER"
else while kill -0 "$pid" 2>/dev/null && [ "$(completed)" -lt "$KILL_AT_BLOCKS" ]; do sleep 1; done; fi
kill -9 "$pid" 2>/dev/null || { echo "the run ended before the kill: nothing to check"; exit 1; }
wait "$pid" || true
echo "SIGKILL after $(( $(date +%s) - start )) s with $(completed) blocks checkpointed"
run --out "$WORK/out" --resume "$@"
a=$(sha256sum "$REF/model.safetensors" | cut -d' ' -f1)
b=$(sha256sum "$WORK/out/model.safetensors" | cut -d' ' -f1)
echo "uninterrupted $a"; echo "resumed       $b"
[ "$a" = "$b" ] && echo "IDENTICAL" || { echo "DIFFERENT"; exit 1; }
rm -rf "$WORK"
