#!/usr/bin/env bash
# Installs the chain toolchain from npm, pinned by contracts/package-lock.json, into a cache that outlives
# the clone ($COMPUTEPOOL_CACHE/npm/chain-<lock hash>), and prints that folder. Idempotent: a second run
# only prints the path. The folder holds:
#   node_modules/@foundry-rs/{forge,anvil}-linux-amd64/bin/   forge and anvil 1.7.1
#   node_modules/solc/                                        solc-js 0.8.37 (contracts/solc.sh wraps it)
#   node_modules/@openzeppelin/contracts/                     OpenZeppelin 5.7.0
#   node_modules/@superfluid-finance/ethereum-contracts/      the Superfluid protocol's compiled artifacts
# The Superfluid package is unpacked from its registry tarball (`npm pack`, integrity checked) instead of
# installed: its dependencies (hardhat, truffle, safe-global; ~900 MB) are only needed by its JS
# deployer, and host/chain deploys the shipped artifacts itself.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${COMPUTEPOOL_CACHE:-$HOME/.cache/computepool}"
SUPERFLUID_VERSION=1.15.2
SUPERFLUID_INTEGRITY="sha512-pvNZvjR72VNdVsUyk0AEsyU8nhk3ClFI9IDfpDVgHaeupugUzrtrsWAwr8s9iAbNgC7uS4e3/kz1Afd+aK5H7Q=="

LOCK_HASH="$( (cat "$ROOT/contracts/package-lock.json"; echo "$SUPERFLUID_VERSION $SUPERFLUID_INTEGRITY") \
    | sha256sum | cut -c1-16)"
DIR="$CACHE/npm/chain-$LOCK_HASH"
if [[ -f "$DIR/.complete" ]]; then
    echo "$DIR"
    exit 0
fi

case "$(uname -s)-$(uname -m)" in
    Linux-x86_64) ;;
    *) echo "contracts.sh: forge and anvil are pinned for linux-amd64 only (got $(uname -s)-$(uname -m))" >&2
       exit 1 ;;
esac
command -v npm >/dev/null || { echo "contracts.sh: npm is needed (Debian: apt-get install npm)" >&2; exit 1; }

# Build beside the final folder and rename it into place, so a concurrent or interrupted run never leaves
# a half-installed folder behind the marker.
TMP="$(mktemp -d "$CACHE/npm/.chain-XXXXXX" 2>/dev/null || { mkdir -p "$CACHE/npm"; mktemp -d "$CACHE/npm/.chain-XXXXXX"; })"
trap 'rm -rf "$TMP"' EXIT
cp "$ROOT/contracts/package.json" "$ROOT/contracts/package-lock.json" "$TMP/"
(cd "$TMP" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error >&2)

(cd "$TMP" && npm pack --silent "@superfluid-finance/ethereum-contracts@$SUPERFLUID_VERSION" >/dev/null)
TARBALL="$TMP/superfluid-finance-ethereum-contracts-$SUPERFLUID_VERSION.tgz"
GOT="sha512-$(openssl dgst -sha512 -binary "$TARBALL" | base64 -w0)"
if [[ "$GOT" != "$SUPERFLUID_INTEGRITY" ]]; then
    echo "contracts.sh: the Superfluid tarball's integrity is $GOT, expected $SUPERFLUID_INTEGRITY" >&2
    exit 1
fi
mkdir -p "$TMP/node_modules/@superfluid-finance/ethereum-contracts"
tar xzf "$TARBALL" -C "$TMP/node_modules/@superfluid-finance/ethereum-contracts" --strip-components=1
rm "$TARBALL"

for tool in forge anvil; do
    "$TMP/node_modules/@foundry-rs/$tool-linux-amd64/bin/$tool" --version >/dev/null
done
touch "$TMP/.complete"
rm -rf "$DIR"
mv "$TMP" "$DIR"
trap - EXIT
echo "$DIR"
