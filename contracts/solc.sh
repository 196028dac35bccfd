#!/usr/bin/env bash
# solc for forge, from npm's solc-js 0.8.37 (no native solc download is possible here). forge asks for
# `--version` and then compiles through `--standard-json` on stdin; solc-js's CLI speaks the same JSON but
# prints its version differently and rejects native-only flags, so this translates both.
# COMPUTEPOOL_CHAIN_TOOLS is the folder scripts/contracts.sh prints.
set -euo pipefail
SOLCJS="${COMPUTEPOOL_CHAIN_TOOLS:?run forge through make or set COMPUTEPOOL_CHAIN_TOOLS=\$(bash scripts/contracts.sh)}/node_modules/solc/solc.js"
for arg in "$@"; do
    if [[ "$arg" == "--version" ]]; then
        echo "solc, the solidity compiler commandline interface"
        echo "Version: $(node "$SOLCJS" --version)"
        exit 0
    fi
done
for arg in "$@"; do
    if [[ "$arg" == "--standard-json" ]]; then
        # solc-js reads stdin with one readFileSync, which fails (EAGAIN) when a pipe is not ready yet,
        # and exits before a large write to a stdout pipe has drained: it gets files on both sides. It
        # also prints a note about SMT solvers on stdout, ahead of the JSON: dropped here.
        work="$(mktemp -d)"
        trap 'rm -rf "$work"' EXIT
        cat > "$work/in.json"
        status=0
        node "$SOLCJS" --standard-json < "$work/in.json" > "$work/out.json" || status=$?
        grep -v '^>>> ' "$work/out.json" || true
        exit "$status"
    fi
done
echo "solc.sh: only --version and --standard-json are supported (got: $*)" >&2
exit 2
