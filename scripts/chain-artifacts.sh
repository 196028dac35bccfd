#!/usr/bin/env bash
# Rebuilds contracts/ with forge and refreshes host/chain/artifacts/: each contract's ABI and creation
# bytecode, which the Rust bindings (`sol!`) embed. Run it after changing a contract and commit the result;
# host/chain's artifacts test fails in `make test` while the two disagree.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/forge.sh" build --offline >&2
for name in TestUSD OracleVerifier PoolINFT Coalition; do
    node -e '
        const fs = require("fs");
        const [src, dst] = process.argv.slice(1);
        const a = JSON.parse(fs.readFileSync(src, "utf8"));
        const out = { abi: a.abi, bytecode: { object: a.bytecode.object } };
        fs.writeFileSync(dst, JSON.stringify(out, null, 1) + "\n");
    ' "$ROOT/contracts/out/$name.sol/$name.json" "$ROOT/host/chain/artifacts/$name.json"
done
echo "host/chain/artifacts: refreshed" >&2
