#!/usr/bin/env bash
# How long a woken thread takes to run on this machine: on its waker's CPU, on another idle CPU, on
# another busy one (scripts/bench/wake_latency.c says why the pipeline cares), as JSON lines on stdout.
# Compiles wake_latency.c once into the anchors cache.
#   scripts/bench/wake_latency.sh [--samples 1000] [--gap-us 5000]
set -euo pipefail
source "$(dirname "$0")/common.sh"
src="$BENCH_DIR/wake_latency.c"
mkdir -p "$(dirname "$WAKE_LATENCY_BIN")"
if [ ! -x "$WAKE_LATENCY_BIN" ] || [ "$src" -nt "$WAKE_LATENCY_BIN" ]; then
  log "compiling $src"
  ${CC:-cc} -O2 -pthread -o "$WAKE_LATENCY_BIN.tmp" "$src"
  mv "$WAKE_LATENCY_BIN.tmp" "$WAKE_LATENCY_BIN"
fi
exec "$WAKE_LATENCY_BIN" "$@"
