//! `computepool facilitator` as a process against anvil: it prints where it listens, serves `/supported`
//! with its settling address, answers a malformed body with the x402 error body, and refuses to start on
//! the wrong chain or with a key file that holds no key (without echoing it). The payment checks
//! themselves are host/pay's tests. Skips without anvil unless COMPUTEPOOL_REQUIRE_ANVIL=1.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use computepool_chain::{Anvil, ChainTools, DEVNET_CHAIN_ID};

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_computepool"))
}

fn tools() -> Option<ChainTools> {
    ChainTools::for_tests(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."))
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One HTTP/1.1 exchange with `Connection: close`: (status, body).
fn http(addr: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).expect("connect to the facilitator");
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("a status line");
    (status, body.to_string())
}

#[test]
fn the_facilitator_command_serves_and_refuses_what_it_must() {
    let Some(tools) = tools() else { return };
    let anvil = Anvil::spawn(&tools, 0, DEVNET_CHAIN_ID).expect("anvil");
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("facilitator.key");
    let settler = &anvil.keys()[1];
    computepool_chain::client::write_key_file(&key_file, settler).unwrap();

    let child = Command::new(bin())
        .args(["facilitator", "--rpc", anvil.rpc_url(), "--listen", "127.0.0.1:0", "--chain-id", &DEVNET_CHAIN_ID.to_string()])
        .arg("--key-file")
        .arg(&key_file)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start computepool facilitator");
    let mut child = KillOnDrop(child);
    let mut line = String::new();
    BufReader::new(child.0.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let addr = line
        .strip_prefix("facilitator on http://")
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    assert!(line.contains("eip155:16602"), "{line}");

    let (status, body) = http(&addr, "GET", "/supported", "");
    assert_eq!(status, 200, "{body}");
    let supported: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(supported["kinds"][0]["network"], "eip155:16602", "{body}");
    assert_eq!(supported["signers"]["eip155:*"][0], settler.address().to_string(), "{body}");

    let (status, body) = http(&addr, "POST", "/verify", "{not json");
    assert_eq!(status, 400, "{body}");
    let refusal: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(refusal["isValid"], false);
    assert_eq!(refusal["invalidReason"], "invalid_payload");

    // The wrong chain: refused before serving.
    let out = Command::new(bin())
        .args(["facilitator", "--rpc", anvil.rpc_url(), "--listen", "127.0.0.1:0", "--chain-id", "1"])
        .arg("--key-file")
        .arg(&key_file)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("chain id 16602, expected 1"), "{stderr}");

    // A key file holding something else: refused, and its text is not echoed.
    let bad_key = dir.path().join("bad.key");
    let near_miss = "ac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff8";
    std::fs::write(&bad_key, near_miss).unwrap();
    let out = Command::new(bin())
        .args(["facilitator", "--rpc", anvil.rpc_url(), "--listen", "127.0.0.1:0"])
        .arg("--key-file")
        .arg(&bad_key)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("does not hold a secp256k1 private key"), "{stderr}");
    assert!(!stderr.contains(near_miss), "{stderr}");
    drop(child);
}
