#!/usr/bin/env bash
# STREAM-style memory bandwidth (read / copy / triad, 1 GiB arrays, 1 and 2 threads, median of
# several passes), as JSON on stdout. Compiles scripts/bench/bandwidth.c once into the anchors cache.
#   scripts/bench/bandwidth.sh [--mib 1024] [--passes 7] [--threads 1,2]
# Needs ~3x --mib of free memory. Run it on a quiet machine: anything else running skews it.
set -euo pipefail
source "$(dirname "$0")/common.sh"
compile_probe "$BENCH_DIR/bandwidth.c" "$BANDWIDTH_BIN" -O3 -march=native -fopenmp
export OMP_PROC_BIND="${OMP_PROC_BIND:-close}" OMP_PLACES="${OMP_PLACES:-cores}"
exec "$BANDWIDTH_BIN" "$@"
