#!/usr/bin/env bash
# Installs NVRTC (CUDA's run-time compiler, a plain library: no GPU, driver or nvcc needed) from its PyPI
# wheel into $COMPUTEPOOL_CACHE/nvrtc, pinned by version and sha256, and prints the directory that holds
# libnvrtc.so.12. Idempotent: a second run only prints the path. `make test` uses it so the NVRTC compile
# of every kernel runs on machines without CUDA.
set -euo pipefail
VERSION=12.8.93
WHEEL="nvidia_cuda_nvrtc_cu12-$VERSION-py3-none-manylinux2010_x86_64.manylinux_2_12_x86_64.whl"
SHA256=a7756528852ef889772a84c6cd89d41dfa74667e24cca16bb31f8f061e3e9994
CACHE="${COMPUTEPOOL_CACHE:-$HOME/.cache/computepool}"
DEST="$CACHE/nvrtc/$VERSION"
LIB="$DEST/nvidia/cuda_nvrtc/lib"
if [[ -f "$LIB/libnvrtc.so.12" && -f "$DEST/.complete" ]]; then
    echo "$LIB"
    exit 0
fi
mkdir -p "$CACHE/wheels" "$DEST"
if [[ ! -f "$CACHE/wheels/$WHEEL" ]] || ! echo "$SHA256  $CACHE/wheels/$WHEEL" | sha256sum -c --status; then
    python3 -m pip download --quiet --no-deps --only-binary=:all: "nvidia-cuda-nvrtc-cu12==$VERSION" \
        --dest "$CACHE/wheels" >&2
fi
echo "$SHA256  $CACHE/wheels/$WHEEL" | sha256sum -c --status || {
    echo "nvrtc.sh: $WHEEL does not match its pinned sha256" >&2
    exit 1
}
python3 - "$CACHE/wheels/$WHEEL" "$DEST" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    for name in z.namelist():
        if name.startswith("nvidia/cuda_nvrtc/lib/") and ".alt." not in name:
            z.extract(name, sys.argv[2])
PY
touch "$DEST/.complete"
echo "$LIB"
