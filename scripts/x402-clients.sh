#!/usr/bin/env bash
# Installs the official x402 clients, pinned, into caches that outlive the clone, and prints two lines:
#   the python of a virtual environment with PyPI `x402[httpx,requests,evm]` and `openai`
#   the folder holding node_modules with npm `@x402/fetch`, `@x402/evm`, `@x402/core` (tests/x402/package-lock.json)
# Idempotent: a second run only prints the paths. The payment tests run tests/x402/pay.py and pay.mjs with them.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${COMPUTEPOOL_CACHE:-$HOME/.cache/computepool}"
X402_VERSION=2.25.0
OPENAI_VERSION=3.51.0

VENV="$CACHE/x402/py-$X402_VERSION-openai-$OPENAI_VERSION"
if [[ ! -f "$VENV/.complete" ]]; then
    rm -rf "$VENV"
    mkdir -p "$CACHE/x402"
    python3 -m venv "$VENV" >&2
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
        "x402[httpx,requests,evm]==$X402_VERSION" "openai==$OPENAI_VERSION" >&2
    "$VENV/bin/python" -c "import x402, openai, eth_account" >&2
    touch "$VENV/.complete"
fi

LOCK_HASH="$(sha256sum "$ROOT/tests/x402/package-lock.json" | cut -c1-16)"
NPM_DIR="$CACHE/x402/npm-$LOCK_HASH"
if [[ ! -f "$NPM_DIR/.complete" ]]; then
    command -v npm >/dev/null || { echo "x402-clients.sh: npm is needed (Debian: apt-get install npm)" >&2; exit 1; }
    TMP="$(mktemp -d "$CACHE/x402/.npm-XXXXXX")"
    trap 'rm -rf "$TMP"' EXIT
    cp "$ROOT/tests/x402/package.json" "$ROOT/tests/x402/package-lock.json" "$TMP/"
    (cd "$TMP" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error >&2)
    touch "$TMP/.complete"
    rm -rf "$NPM_DIR"
    mv "$TMP" "$NPM_DIR"
    trap - EXIT
fi
echo "$VENV/bin/python"
echo "$NPM_DIR"
