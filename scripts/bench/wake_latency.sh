#!/usr/bin/env bash
# How long a woken thread takes to run on this machine: on its waker's CPU, on another idle CPU, on
# another busy one (scripts/bench/wake_latency.c says why the pipeline cares), as JSON lines on stdout.
# Compiles wake_latency.c once into the anchors cache.
#   scripts/bench/wake_latency.sh [--samples 1000] [--gap-us 5000]
set -euo pipefail
source "$(dirname "$0")/common.sh"
compile_probe "$BENCH_DIR/wake_latency.c" "$WAKE_LATENCY_BIN" -O2 -pthread
exec "$WAKE_LATENCY_BIN" "$@"
