//! The ABI and bytecode embedded in the Rust bindings (`host/chain/artifacts/`) are what forge builds from
//! contracts/ now. `make test` runs forge first, so contracts/out is fresh; after changing a contract, run
//! `bash scripts/chain-artifacts.sh` and commit. Without contracts/out this test skips, unless
//! COMPUTEPOOL_REQUIRE_ANVIL=1 (set by `make test`).

use std::path::Path;

#[test]
fn committed_artifacts_match_forge_output() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let required = std::env::var("COMPUTEPOOL_REQUIRE_ANVIL").is_ok_and(|v| v == "1");
    let out = root.join("contracts/out");
    if !out.is_dir() {
        assert!(!required, "contracts/out is missing: run `bash scripts/forge.sh build --offline` (make test does)");
        eprintln!("skipping: contracts/out is missing (make test builds it)");
        return;
    }
    for name in ["TestUSD", "OracleVerifier", "PoolINFT", "Coalition"] {
        let read = |path: &Path| -> serde_json::Value {
            let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        };
        let built = read(&out.join(format!("{name}.sol/{name}.json")));
        let committed = read(&root.join(format!("host/chain/artifacts/{name}.json")));
        let hint = "run `bash scripts/chain-artifacts.sh` and commit host/chain/artifacts";
        assert_eq!(built["abi"], committed["abi"], "{name}'s ABI differs from contracts/: {hint}");
        assert_eq!(
            built["bytecode"]["object"], committed["bytecode"]["object"],
            "{name}'s bytecode differs from contracts/: {hint}"
        );
    }
}
