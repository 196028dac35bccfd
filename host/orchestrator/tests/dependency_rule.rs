//! ARCHITECTURE.md's one hard rule about crates: the dependency graph states the invariants. The
//! orchestrator never touches activations (invariant 1) because nothing it is built from can name one:
//! neither it nor the entry API it speaks to shards depends on the engine, directly or through another
//! crate. Normal dependencies only: a dev-dependency (plugin-host's tests run real samplers on the
//! engine) is not part of what ships.

use std::process::Command;

/// The packages `package` is built from (itself included), as `cargo tree` resolves them from the
/// workspace's lock file.
fn shipped_dependencies(package: &str) -> Vec<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/../../Cargo.toml");
    let out = Command::new(&cargo)
        .args(["tree", "--offline", "--locked", "--manifest-path", manifest, "-p", package])
        .args(["--edges", "normal", "--prefix", "none", "--format", "{p}"])
        .output()
        .unwrap_or_else(|e| panic!("running `{cargo} tree`: {e}"));
    assert!(out.status.success(), "`cargo tree -p {package}` failed: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).expect("cargo tree prints UTF-8");
    text.lines().filter_map(|line| line.split_whitespace().next()).map(str::to_owned).collect()
}

fn assert_never_depends_on_the_engine(package: &str, must_include: &[&str]) {
    let deps = shipped_dependencies(package);
    // The tree was really read: it holds the package and what it is known to use.
    for name in std::iter::once(&package).chain(must_include) {
        assert!(deps.iter().any(|d| d == name), "`cargo tree -p {package}` does not list {name}: {deps:?}");
    }
    let engine: Vec<&String> = deps.iter().filter(|d| *d == "computepool-engine").collect();
    assert!(engine.is_empty(), "{package} depends on computepool-engine (ARCHITECTURE.md's hard rule); `cargo tree -p {package} -i computepool-engine -e normal` shows the path");
}

#[test]
fn the_orchestrator_is_not_built_from_the_engine() {
    assert_never_depends_on_the_engine(
        "computepool-orchestrator",
        &["computepool-entry-api", "computepool-axl", "computepool-keeper", "computepool-plugin-host"],
    );
}

#[test]
fn the_entry_api_is_not_built_from_the_engine() {
    assert_never_depends_on_the_engine("computepool-entry-api", &["computepool-axl"]);
}
