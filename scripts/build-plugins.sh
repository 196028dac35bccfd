#!/usr/bin/env bash
# Builds every plugin under plugins/ (their own cargo workspace) for wasm32-wasip2, copies each component
# next to its plugin.toml (as the manifest's wasm.file) and writes its sha256 into the manifest.
# Idempotent: files that did not change are left alone. `make test` runs it before the host's tests.
#
#   bash scripts/build-plugins.sh           build, copy, write digests
#   bash scripts/build-plugins.sh --check   build, copy, and fail if a committed digest is out of date
#
# Two bad plugins are made from the greedy sampler rather than built: bad/truncated (its first 4096 bytes,
# with their true digest, so the host gets as far as compiling it) and bad/wrong-sha256 (the whole file
# under a digest that is not its own, which this script leaves as it is).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PLUGINS="$ROOT/plugins"
CHECK=0
[[ "${1:-}" == "--check" ]] && CHECK=1

if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip2; then
    echo "build-plugins: adding the wasm32-wasip2 target" >&2
    rustup target add wasm32-wasip2
fi

# Guests build apart from the host's target dir: a different target and profile, nothing shared.
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}/plugins"
# Paths compiled into a guest (panic locations of path dependencies such as host/sampling-core, and of
# registry crates) are remapped to fixed prefixes, so a plugin's digest is the same in every checkout.
# Given with --config, whose arrays add to plugins/.cargo/config.toml's rustflags (RUSTFLAGS would
# replace them), and to this build only: the host's builds and cache are untouched.
CARGO_HOME_DIR="${CARGO_HOME:-$HOME/.cargo}"
REMAP="target.wasm32-wasip2.rustflags=['--remap-path-prefix=$ROOT=/computepool', '--remap-path-prefix=$CARGO_HOME_DIR=/cargo']"
(cd "$PLUGINS" && CARGO_TARGET_DIR="$TARGET_DIR" \
    cargo build --release --locked --target wasm32-wasip2 --workspace --config "$REMAP")
OUT="$TARGET_DIR/wasm32-wasip2/release"

stale=0

# copy_if_changed SRC DST
copy_if_changed() {
    cmp -s "$1" "$2" 2>/dev/null || cp "$1" "$2"
}

# manifest_file DIR: the wasm.file of DIR/plugin.toml
manifest_file() {
    sed -n 's/^file = "\(.*\)"$/\1/p' "$1/plugin.toml"
}

# write_digest DIR: puts the sha256 of the plugin's wasm into its plugin.toml
write_digest() {
    local dir="$1" file digest current
    file="$dir/$(manifest_file "$dir")"
    digest="$(sha256sum "$file" | cut -d' ' -f1)"
    current="$(sed -n 's/^sha256 = "\(.*\)"$/\1/p' "$dir/plugin.toml")"
    if [[ "$current" != "$digest" ]]; then
        if [[ $CHECK == 1 ]]; then
            echo "build-plugins: ${dir#$ROOT/}/plugin.toml has sha256 $current, the build gives $digest" >&2
            stale=1
        else
            sed -i "s/^sha256 = \".*\"$/sha256 = \"$digest\"/" "$dir/plugin.toml"
            echo "build-plugins: ${dir#$ROOT/}/plugin.toml: sha256 = $digest" >&2
        fi
    fi
}

while IFS= read -r manifest; do
    dir="$(dirname "$manifest")"
    [[ -f "$dir/Cargo.toml" ]] || continue
    crate="$(sed -n 's/^name = "\(.*\)"$/\1/p' "$dir/Cargo.toml" | head -n1)"
    built="$OUT/${crate//-/_}.wasm"
    [[ -f "$built" ]] || { echo "build-plugins: $built is missing after the build" >&2; exit 1; }
    copy_if_changed "$built" "$dir/$(manifest_file "$dir")"
    write_digest "$dir"
done < <(find "$PLUGINS" -name plugin.toml -not -path '*/target/*' | sort)

greedy="$PLUGINS/samplers/greedy/$(manifest_file "$PLUGINS/samplers/greedy")"
head -c 4096 "$greedy" > "$TARGET_DIR/truncated.wasm"
copy_if_changed "$TARGET_DIR/truncated.wasm" "$PLUGINS/bad/truncated/$(manifest_file "$PLUGINS/bad/truncated")"
write_digest "$PLUGINS/bad/truncated"
copy_if_changed "$greedy" "$PLUGINS/bad/wrong-sha256/$(manifest_file "$PLUGINS/bad/wrong-sha256")"

if [[ $stale == 1 ]]; then
    echo "build-plugins: run bash scripts/build-plugins.sh and commit the plugin.toml changes" >&2
    exit 1
fi
