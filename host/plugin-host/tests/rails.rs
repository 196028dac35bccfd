//! The payment-rail plugins (plugins/rails/) through the host's rail API: grants refused at load, the
//! ledger's exact accrual, x402-exact against a local stand-in of the facilitator, and superfluid-gda on a
//! real anvil devnet with the real Superfluid protocol (skipped without anvil unless
//! COMPUTEPOOL_REQUIRE_ANVIL=1; tools from `COMPUTEPOOL_CHAIN_TOOLS=$(bash scripts/contracts.sh)`).

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use computepool_plugin_host::capability::Capability;
use computepool_plugin_host::http_capability::{HttpError, HttpLimits, HttpRequest, HttpService};
use computepool_plugin_host::rail::{FlowChange, FlowMember, PaymentRequirements, QuoteRequest, RailError};
use computepool_plugin_host::{GrantPolicy, HostConfig, LoadError, PluginHost, RailCallError};
use serde_json::{Value, json};

fn host_with(grants: GrantPolicy) -> PluginHost {
    PluginHost::new(HostConfig { grants, ..HostConfig::default() }).expect("the engine starts")
}

fn grant(plugin: &str, caps: &[Capability]) -> GrantPolicy {
    let mut g = GrantPolicy::default();
    g.plugins.insert(plugin.into(), caps.iter().copied().collect());
    g
}

fn rail_error(result: Result<impl std::fmt::Debug, RailCallError>) -> RailError {
    match result {
        Err(RailCallError::Rail { error, .. }) => error,
        other => panic!("expected the rail's own error, got {other:?}"),
    }
}

#[test]
fn a_rail_requesting_http_or_chain_without_a_grant_is_refused_at_load() {
    // Not granted at all.
    let err = host_with(GrantPolicy::default()).load_plugin(&support::plugin("rails/x402-exact")).unwrap_err();
    match &err {
        LoadError::CapabilityDenied(d) => assert!(d.not_granted.contains(&Capability::Http), "{err}"),
        other => panic!("expected a capability denial, got {other}"),
    }
    // Granted, but no host to reach.
    let err = host_with(grant("x402-exact", &[Capability::Http, Capability::KvStore]))
        .load_plugin(&support::plugin("rails/x402-exact"))
        .unwrap_err();
    match &err {
        LoadError::CapabilityDenied(d) => assert_eq!(d.unscoped, vec![Capability::Http], "{err}"),
        other => panic!("expected a capability denial, got {other}"),
    }
    assert!(err.to_string().contains("[grants.http] x402-exact"), "{err}");
    // chain granted with its contract, but the host has no chain connection.
    let mut g = grant("superfluid-gda", &[Capability::Chain]);
    g.chain.insert("superfluid-gda".into(), BTreeSet::from(["0xBcC58fb72409BA1CdEc5dBcDD3Cd6c42E3e04242".parse().unwrap()]));
    let err = host_with(g).load_plugin(&support::plugin("rails/superfluid-gda")).unwrap_err();
    assert!(matches!(&err, LoadError::CapabilityUnavailable { capability: Capability::Chain, .. }), "{err}");
}

// ---------------------------------------------------------------------------------------------------
// ledger

fn ledger_balances(host: &PluginHost, pool: &str) -> BTreeMap<String, u128> {
    let bytes = host.kv_scope("ledger").get(&format!("pool:{pool}")).unwrap().expect("the pool has a record");
    let record: Value = serde_json::from_slice(&bytes).unwrap();
    record["balances"].as_object().unwrap().iter().map(|(k, v)| (k.clone(), v.as_str().unwrap().parse().unwrap())).collect()
}

fn change(key: &str, pool: &str, token: &str, members: &[(&str, u64)], rate: u128) -> FlowChange {
    FlowChange {
        idempotency_key: key.into(),
        pool: pool.into(),
        token: token.into(),
        members: members.iter().map(|(a, u)| FlowMember { address: (*a).into(), units: *u }).collect(),
        flow_rate: rate,
    }
}

#[test]
fn ledger_accrues_each_member_exactly_per_second() {
    let host = host_with(grant("ledger", &[Capability::KvStore]));
    let rail = host.load_plugin(&support::plugin("rails/ledger")).unwrap().as_rail().unwrap().clone();
    let bound = rail.bind(r#"{"unit": "wei"}"#).unwrap();
    assert!(bound.info().streams && !bound.info().payments);
    let members = [("op-a", 1), ("op-b", 2), ("op-c", 3)];

    // 6 000 007 over 6 units: 1 000 001 per unit, 6 000 006 flows (the rail floors like a GDA pool).
    let start = bound.stream_start(&change("r1/start", "pool-1", "wei", &members, 6_000_007)).unwrap();
    assert_eq!(start.flow_rate, 6_000_006);
    // A retry with the same key returns the first receipt and changes nothing.
    std::thread::sleep(Duration::from_millis(1100));
    let again = bound.stream_start(&change("r1/start", "pool-1", "wei", &members, 6_000_007)).unwrap();
    assert_eq!(again, start);

    std::thread::sleep(Duration::from_millis(1100));
    // A rate change while flowing: 12 000 000 over 6 units.
    let change2 = bound.stream_start(&change("r2/start", "pool-1", "wei", &members, 12_000_000)).unwrap();
    assert_eq!(change2.flow_rate, 12_000_000);
    assert!(change2.effective_at_s >= start.effective_at_s + 2, "{start:?} then {change2:?}");
    std::thread::sleep(Duration::from_millis(1100));
    let stop = bound.stream_stop(&change("r2/stop", "pool-1", "wei", &[], 0)).unwrap();
    assert_eq!(stop.flow_rate, 0);
    assert!(stop.effective_at_s > change2.effective_at_s);

    let first = u128::from(change2.effective_at_s - start.effective_at_s);
    let second = u128::from(stop.effective_at_s - change2.effective_at_s);
    let balances = ledger_balances(&host, "pool-1");
    for (member, units) in members {
        let expected = 1_000_001 * u128::from(units) * first + 2_000_000 * u128::from(units) * second;
        assert_eq!(balances[member], expected, "{member}: {first} s then {second} s");
    }
    // Stopped: balances stay put.
    std::thread::sleep(Duration::from_millis(1100));
    let stopped_again = bound.stream_stop(&change("r2/stop-again", "pool-1", "wei", &[], 0)).unwrap();
    assert_eq!(stopped_again.flow_rate, 0);
    assert_eq!(ledger_balances(&host, "pool-1"), balances);

    // Client payments are refused, naming what to use instead; so is a token the ledger does not count.
    let quote = QuoteRequest {
        request_id: "q".into(),
        resource: "/v1/chat/completions".into(),
        model: "m".into(),
        max_seconds: 10,
        price_per_second: 5,
        pay_to: String::new(),
    };
    assert!(matches!(rail_error(bound.quote(&quote)), RailError::Unsupported(m) if m.contains("x402-exact")));
    assert!(matches!(
        rail_error(bound.stream_start(&change("r3", "pool-1", "usdc", &members, 1))),
        RailError::InvalidPayment(m) if m.contains("usdc")
    ));
    assert!(matches!(rail_error(rail.bind(r#"{"units": 1}"#)), RailError::InvalidPayment(_)));
}

#[test]
fn ledger_balances_survive_a_host_restart_with_a_state_dir() {
    let state = tempfile::tempdir().unwrap();
    let host_at = |dir: &Path| {
        let config = HostConfig { grants: grant("ledger", &[Capability::KvStore]), state_dir: Some(dir.to_path_buf()), ..HostConfig::default() };
        PluginHost::new(config).unwrap()
    };
    let members = [("op-a", 2), ("op-b", 5)];
    let start = {
        let host = host_at(state.path());
        let rail = host.load_plugin(&support::plugin("rails/ledger")).unwrap().as_rail().unwrap().clone();
        rail.bind("{}").unwrap().stream_start(&change("p/start", "pool-r", "wei", &members, 700)).unwrap()
    };
    std::thread::sleep(Duration::from_millis(1100));
    // A new host on the same state: the stream is still open and stops with the whole interval accrued.
    let host = host_at(state.path());
    let rail = host.load_plugin(&support::plugin("rails/ledger")).unwrap().as_rail().unwrap().clone();
    let bound = rail.bind("{}").unwrap();
    assert_eq!(bound.stream_start(&change("p/start", "pool-r", "wei", &members, 700)).unwrap(), start, "idempotent across the restart");
    let stop = bound.stream_stop(&change("p/stop", "pool-r", "wei", &[], 0)).unwrap();
    let seconds = u128::from(stop.effective_at_s - start.effective_at_s);
    assert!(seconds >= 1);
    let balances = ledger_balances(&host, "pool-r");
    assert_eq!((balances["op-a"], balances["op-b"]), (100 * 2 * seconds, 100 * 5 * seconds));
}

// ---------------------------------------------------------------------------------------------------
// x402-exact against a stand-in facilitator

/// A minimal HTTP/1.1 stand-in of the facilitator: `/verify` accepts the signature "0xgood" and refuses
/// others with the x402 reason; `/settle` succeeds; `/moved` redirects to another host. Every request's
/// path and JSON body is recorded.
struct Facilitator {
    port: u16,
    seen: Arc<Mutex<Vec<(String, Value)>>>,
}

impl Facilitator {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
                let mut length = 0;
                loop {
                    let mut header = String::new();
                    reader.read_line(&mut header).unwrap();
                    if header.trim().is_empty() {
                        break;
                    }
                    if let Some((name, value)) = header.split_once(':')
                        && name.eq_ignore_ascii_case("content-length")
                    {
                        length = value.trim().parse().unwrap();
                    }
                }
                let mut body = vec![0; length];
                reader.read_exact(&mut body).unwrap();
                let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                let (status, extra, answer) = match path.as_str() {
                    "/verify" => {
                        let good = body["paymentPayload"]["payload"]["signature"] == "0xgood";
                        let answer = if good {
                            json!({"isValid": true, "payer": body["paymentPayload"]["payload"]["authorization"]["from"]})
                        } else {
                            json!({"isValid": false, "invalidReason": "invalid_exact_evm_payload_signature"})
                        };
                        (200, "", answer)
                    }
                    "/settle" => (
                        200,
                        "",
                        json!({"success": true, "transaction": "0x1234", "network": "eip155:16602",
                               "payer": body["paymentPayload"]["payload"]["authorization"]["from"]}),
                    ),
                    "/moved" => (302, "Location: https://evil.example.com/\r\n", json!({})),
                    _ => (404, "", json!({})),
                };
                log.lock().unwrap().push((path, body));
                let text = answer.to_string();
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status} X\r\n{extra}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
                    text.len()
                );
            }
        });
        Self { port, seen }
    }

    fn calls(&self, path: &str) -> Vec<Value> {
        self.seen.lock().unwrap().iter().filter(|(p, _)| p == path).map(|(_, b)| b.clone()).collect()
    }
}

const ASSET: &str = "0x5FbDB2315678afecb367f032d93F642f64180aa3";
const PAY_TO: &str = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8";
const PAYER: &str = "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC";

fn payment_header(signature: &str, requirements: &Value) -> String {
    let payload = json!({
        "x402Version": 2,
        "accepted": requirements,
        "payload": {
            "signature": signature,
            "authorization": {"from": PAYER, "to": PAY_TO, "value": "1500", "validAfter": "0",
                               "validBefore": "99999999999", "nonce": format!("0x{}", "ab".repeat(32))},
        },
    });
    base64_encode(payload.to_string().as_bytes())
}

fn base64_encode(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            out.push(if i <= chunk.len() { A[(n >> (18 - 6 * i)) as usize & 63] as char } else { '=' });
        }
    }
    out
}

fn x402_host(granted_port: u16) -> PluginHost {
    let mut g = grant("x402-exact", &[Capability::Http, Capability::KvStore]);
    g.http.insert("x402-exact".into(), BTreeSet::from([format!("127.0.0.1:{granted_port}").parse().unwrap()]));
    host_with(g)
}

fn x402_config(port: u16) -> String {
    json!({"facilitator": format!("http://127.0.0.1:{port}"), "network": "eip155:16602", "asset": ASSET,
           "payTo": PAY_TO, "name": "USD Coin", "version": "2", "maxTimeoutSeconds": 90})
    .to_string()
}

#[test]
fn x402_exact_quotes_verifies_and_settles_through_the_facilitator() {
    let facilitator = Facilitator::start();
    let host = x402_host(facilitator.port);
    let rail = host.load_plugin(&support::plugin("rails/x402-exact")).unwrap().as_rail().unwrap().clone();
    let bound = rail.bind(x402_config(facilitator.port)).unwrap();
    assert_eq!((bound.info().scheme.as_str(), bound.info().network.as_str()), ("exact", "eip155:16602"));

    let quote = QuoteRequest {
        request_id: "req-1".into(),
        resource: "http://127.0.0.1/v1/chat/completions".into(),
        model: "smollm2".into(),
        max_seconds: 30,
        price_per_second: 50,
        pay_to: String::new(),
    };
    let before = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let requirements = bound.quote(&quote).unwrap();
    assert_eq!(requirements.max_amount, 1500);
    assert!((before + 90..=before + 91).contains(&requirements.valid_until), "{}", requirements.valid_until);
    let body: Value = serde_json::from_str(&requirements.body).unwrap();
    assert_eq!(
        body,
        json!({"scheme": "exact", "network": "eip155:16602", "amount": "1500", "asset": ASSET, "payTo": PAY_TO,
               "maxTimeoutSeconds": 90, "extra": {"name": "USD Coin", "version": "2"}})
    );

    // A good payment: the facilitator gets {x402Version, paymentPayload, paymentRequirements}.
    let header = payment_header("0xgood", &body);
    let mut verified = bound.verify(&requirements, &header).unwrap();
    assert_eq!((verified.payer.as_str(), verified.amount), (PAYER, 1500));
    let sent = &facilitator.calls("/verify")[0];
    assert_eq!(sent["x402Version"], 2);
    assert_eq!(sent["paymentRequirements"], body);
    assert_eq!(sent["paymentPayload"]["payload"]["signature"], "0xgood");

    // Settling twice reaches the facilitator once.
    verified.request_id = "req-1".into();
    let settled = bound.settle(&verified).unwrap();
    assert_eq!((settled.reference.as_str(), settled.amount, settled.network.as_str()), ("0x1234", 1500, "eip155:16602"));
    assert_eq!(bound.settle(&verified).unwrap(), settled);
    assert_eq!(facilitator.calls("/settle").len(), 1);

    // Refusals: the facilitator's reason, malformed headers, streams.
    let bad = rail_error(bound.verify(&requirements, &payment_header("0xbad", &body)));
    assert_eq!(bad, RailError::Rejected("invalid_exact_evm_payload_signature".into()));
    for malformed in ["%%%not-base64", &base64_encode(b"not json"), &base64_encode(b"[1]")] {
        assert!(matches!(rail_error(bound.verify(&requirements, malformed)), RailError::InvalidPayment(m) if m.contains("invalid_payload")));
    }
    let flow = change("k", PAY_TO, ASSET, &[], 1);
    assert!(matches!(rail_error(bound.stream_start(&flow)), RailError::Unsupported(_)));
    assert!(matches!(rail_error(bound.stream_stop(&flow)), RailError::Unsupported(_)));
}

#[test]
fn x402_exact_cannot_reach_an_ungranted_facilitator() {
    let facilitator = Facilitator::start();
    // Granted another port than the facilitator's.
    let host = x402_host(facilitator.port.wrapping_add(1).max(1));
    let rail = host.load_plugin(&support::plugin("rails/x402-exact")).unwrap().as_rail().unwrap().clone();
    let bound = rail.bind(x402_config(facilitator.port)).unwrap();
    let requirements = PaymentRequirements { body: "{}".into(), max_amount: 1, valid_until: 0 };
    let err = rail_error(bound.verify(&requirements, &payment_header("0xgood", &json!({}))));
    assert!(matches!(&err, RailError::Unavailable(m) if m.contains("not granted") && m.contains(&facilitator.port.to_string())), "{err:?}");
    assert!(facilitator.calls("/verify").is_empty(), "nothing reached the facilitator");
}

#[test]
fn host_http_refuses_ungranted_hosts_and_never_follows_redirects() {
    let facilitator = Facilitator::start();
    let service = HttpService::new(HttpLimits::default()).unwrap();
    let grants = vec![format!("127.0.0.1:{}", facilitator.port).parse().unwrap()];
    let get = |url: String| HttpRequest { method: "GET".into(), url, headers: vec![], body: vec![] };
    let moved = service.send(&grants, get(format!("http://127.0.0.1:{}/moved", facilitator.port))).unwrap();
    assert_eq!(moved.status, 302, "the redirect comes back to the plugin, unfollowed");
    let err = service.send(&grants, get("https://evil.example.com/".into())).unwrap_err();
    assert_eq!(err, HttpError::HostNotGranted("evil.example.com:443".into()));
    // A response over the limit is refused.
    let small = HttpService::new(HttpLimits { max_response_bytes: 4, ..HttpLimits::default() }).unwrap();
    let err = small
        .send(&grants, HttpRequest { method: "POST".into(), ..get(format!("http://127.0.0.1:{}/settle", facilitator.port)) })
        .unwrap_err();
    assert_eq!(err, HttpError::TooLarge(4));
}

// ---------------------------------------------------------------------------------------------------
// superfluid-gda on anvil

mod devnet {
    use super::*;
    use computepool_chain::alloy::primitives::{Address, U256};
    use computepool_chain::alloy::providers::Provider;
    use computepool_chain::bindings::{ISuperToken, TestUSD};
    use computepool_chain::devnet::mine_at;
    use computepool_chain::pools::super_token_balance;
    use computepool_chain::{Anvil, Chain, ChainTools, DEVNET_CHAIN_ID, DeployOptions, Gda, deploy_all};
    use computepool_plugin_host::ChainService;
    use computepool_plugin_host::blocking;

    fn tools() -> Option<ChainTools> {
        ChainTools::for_tests(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."))
    }

    fn run<F: std::future::Future + Send + 'static>(f: F) -> F::Output
    where
        F::Output: Send + 'static,
    {
        blocking::block_on(f, Duration::from_secs(300)).expect("the devnet answered in time")
    }

    async fn balances(chain: Chain, token: Address, members: Vec<Address>, block: u64) -> Vec<i128> {
        let mut out = Vec::new();
        for m in members {
            out.push(i128::try_from(super_token_balance(&chain, token, m, Some(block)).await.unwrap()).unwrap());
        }
        out
    }

    #[test]
    fn superfluid_gda_streams_to_members_at_the_receipts_rate_and_stops() {
        let Some(tools) = tools() else { return };
        let anvil = Anvil::spawn(&tools, 0, DEVNET_CHAIN_ID).unwrap();
        let keys = anvil.keys().to_vec();
        let url = anvil.rpc_url().to_string();
        let artifacts = tools.superfluid().unwrap();

        // The host's key (keys[0]) deploys, holds USDCx, administers the pool and distributes.
        let (host_chain, deployment, pool, members) = run(async move {
            let host_chain = Chain::connect(&url, Some(DEVNET_CHAIN_ID), keys[0].clone()).await.unwrap();
            let deployment = deploy_all(&host_chain, &artifacts, &DeployOptions::usdc_like(keys[9].address())).await.unwrap();
            let usdc = TestUSD::new(deployment.usdc.address, host_chain.provider());
            let whole = U256::from(1_000_000u64);
            host_chain.send("mint", usdc.mint(host_chain.address(), whole * U256::from(10u64).pow(U256::from(6)))).await.unwrap();
            host_chain.send("approve", usdc.approve(deployment.usdcx, U256::MAX)).await.unwrap();
            let usdcx = ISuperToken::new(deployment.usdcx, host_chain.provider());
            host_chain.send("upgrade", usdcx.upgrade(whole * U256::from(10u64).pow(U256::from(18)))).await.unwrap();
            let gda = Gda::new(&host_chain, &deployment.superfluid);
            let (pool, _) = gda.create_pool(deployment.usdcx, host_chain.address(), false).await.unwrap();
            // Members connect themselves, so their share reaches their balance in real time.
            let mut members = Vec::new();
            for key in &keys[2..5] {
                let member = Chain::connect(&url, Some(DEVNET_CHAIN_ID), key.clone()).await.unwrap();
                Gda::new(&member, &deployment.superfluid).connect_pool(pool).await.unwrap();
                members.push(member.address());
            }
            (host_chain, deployment, pool, members)
        });

        let forwarder = deployment.superfluid.gda_v1_forwarder;
        let mut grants = grant("superfluid-gda", &[Capability::Chain]);
        grants.chain.insert("superfluid-gda".into(), BTreeSet::from([forwarder]));
        let state = tempfile::tempdir().unwrap();
        let service = ChainService::new(host_chain.clone(), Some(state.path())).unwrap();
        let host = PluginHost::new(HostConfig { grants, chain: Some(Arc::new(service)), ..HostConfig::default() }).unwrap();
        let rail = host.load_plugin(&support::plugin("rails/superfluid-gda")).unwrap().as_rail().unwrap().clone();
        let bound = rail.bind(json!({"forwarder": format!("{forwarder:#x}")}).to_string()).unwrap();
        assert_eq!(bound.info().network, format!("eip155:{DEVNET_CHAIN_ID}"));

        let units = [1u64, 2, 3];
        let member_list: Vec<(String, u64)> = members.iter().zip(units).map(|(a, u)| (format!("{a:#x}"), u)).collect();
        let as_refs: Vec<(&str, u64)> = member_list.iter().map(|(a, u)| (a.as_str(), *u)).collect();
        let token = format!("{:#x}", deployment.usdcx);
        let pool_text = format!("{pool:#x}");
        // Not a multiple of 6: the GDA floors the per-unit rate, and the receipt says what flows.
        let requested: u128 = 1_000_000_000_007;
        let per_unit = requested / 6;
        let start = bound.stream_start(&change("s1/start", &pool_text, &token, &as_refs, requested)).unwrap();
        assert_eq!(start.flow_rate, per_unit * 6);
        let start_block = run({
            let c = host_chain.clone();
            let hash = start.reference.clone();
            async move {
                let receipt = c.provider().get_transaction_receipt(hash.parse().unwrap()).await.unwrap().unwrap();
                receipt.block_number.unwrap()
            }
        });
        // A retried change sends nothing: same receipt, no new block.
        let again = bound.stream_start(&change("s1/start", &pool_text, &token, &as_refs, requested)).unwrap();
        assert_eq!(again, start);
        let head = run({
            let c = host_chain.clone();
            async move { c.provider().get_block_number().await.unwrap() }
        });
        assert_eq!(head, start_block, "the retry mined nothing");

        // 100 s later the members hold exactly per-unit × units × 100 more.
        let (t1, b1) = run({
            let c = host_chain.clone();
            let t = start.effective_at_s + 100;
            async move {
                mine_at(&c, t).await.unwrap();
                (t, c.provider().get_block_number().await.unwrap())
            }
        });
        let before = run(balances(host_chain.clone(), deployment.usdcx, members.clone(), start_block));
        let after = run(balances(host_chain.clone(), deployment.usdcx, members.clone(), b1));
        for ((b, a), u) in before.iter().zip(&after).zip(units) {
            assert_eq!(a - b, (per_unit * u128::from(u) * u128::from(t1 - start.effective_at_s)) as i128, "units {u}");
        }

        // Stop: nothing moves afterwards.
        let stop = bound.stream_stop(&change("s1/stop", &pool_text, &token, &[], 0)).unwrap();
        assert_eq!(stop.flow_rate, 0);
        assert!(stop.effective_at_s >= t1, "anvil may mine the next block at the same second");
        let stop_block = run({
            let c = host_chain.clone();
            async move { c.provider().get_block_number().await.unwrap() }
        });
        let at_stop = run(balances(host_chain.clone(), deployment.usdcx, members.clone(), stop_block));
        for ((b, a), u) in before.iter().zip(&at_stop).zip(units) {
            assert_eq!(a - b, (per_unit * u128::from(u) * u128::from(stop.effective_at_s - start.effective_at_s)) as i128);
        }
        let later = run({
            let c = host_chain.clone();
            let t = stop.effective_at_s + 1000;
            async move {
                mine_at(&c, t).await.unwrap();
                c.provider().get_block_number().await.unwrap()
            }
        });
        assert_eq!(run(balances(host_chain.clone(), deployment.usdcx, members.clone(), later)), at_stop, "flat after stop");

        // The forwarder is the only contract granted: a change naming another pool still goes through it,
        // but a change whose calls would reach elsewhere cannot — checked at the capability (unit tests).
        // A retried stop after a host restart is answered from the durable send record.
        drop(host);
        let service = ChainService::new(host_chain.clone(), Some(state.path())).unwrap();
        let mut grants = grant("superfluid-gda", &[Capability::Chain]);
        grants.chain.insert("superfluid-gda".into(), BTreeSet::from([forwarder]));
        let host = PluginHost::new(HostConfig { grants, chain: Some(Arc::new(service)), ..HostConfig::default() }).unwrap();
        let rail = host.load_plugin(&support::plugin("rails/superfluid-gda")).unwrap().as_rail().unwrap().clone();
        let bound = rail.bind(json!({"forwarder": format!("{forwarder:#x}")}).to_string()).unwrap();
        let retried = bound.stream_stop(&change("s1/stop", &pool_text, &token, &[], 0)).unwrap();
        assert_eq!((retried.reference, retried.effective_at_s), (stop.reference, stop.effective_at_s));
        drop(anvil);
    }
}
