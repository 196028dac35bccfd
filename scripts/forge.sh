#!/usr/bin/env bash
# Runs forge (npm @foundry-rs/forge, pinned) in contracts/ with its toolchain installed by
# scripts/contracts.sh: `bash scripts/forge.sh test --offline`, `bash scripts/forge.sh build`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="$(bash "$ROOT/scripts/contracts.sh")"
# foundry.toml remaps @openzeppelin/contracts into contracts/node_modules: a link to the cached install.
ln -sfn "$TOOLS/node_modules" "$ROOT/contracts/node_modules"
cd "$ROOT/contracts"
COMPUTEPOOL_CHAIN_TOOLS="$TOOLS" exec "$TOOLS/node_modules/@foundry-rs/forge-linux-amd64/bin/forge" "$@"
