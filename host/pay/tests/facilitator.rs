//! The facilitator over HTTP against a fresh anvil with TestUSD (the EIP-3009 token ComputePool deploys
//! where there is no USDC): a good voucher verifies and settles with balances moving exactly, settles stay
//! single under retries, races and restarts, and every hostile payment is refused with its x402 reason
//! and no money moved. anvil comes from `scripts/contracts.sh`; without it these tests skip, unless
//! COMPUTEPOOL_REQUIRE_ANVIL=1 (set by `make test`).

use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use alloy::primitives::{Address, B256, U256, keccak256};
use alloy::providers::Provider;
use alloy::signers::local::PrivateKeySigner;
use alloy::sol_types::Eip712Domain;
use computepool_chain::alloy;
use computepool_chain::bindings::TestUSD;
use computepool_chain::deploy::creation_code;
use computepool_chain::eip3009::{sign_transfer, token_domain};
use computepool_chain::{Anvil, Chain, ChainTools, DEVNET_CHAIN_ID};
use computepool_pay::facilitator::{Facilitator, FacilitatorClient, FacilitatorConfig, router};
use computepool_pay::x402::{
    ErrorReason, ExactEvmPayload, FacilitatorRequest, PaymentPayload, PaymentPayloadV1, PaymentRequirements,
    ResourceInfo, SettleResponse, VerifyResponse,
};

const NAME: &str = "USD Coin";
const VERSION: &str = "2";
/// 1.5 USDC.
const PRICE: u128 = 1_500_000;

fn tools() -> Option<ChainTools> {
    ChainTools::for_tests(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."))
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// A devnet with TestUSD, a funded payer, a payee, and a facilitator serving HTTP on 127.0.0.1:0.
struct Devnet {
    anvil: Anvil,
    owner: Chain,
    token: Address,
    /// Holds 100 USDC.
    payer: PrivateKeySigner,
    /// Holds no USDC.
    pauper: PrivateKeySigner,
    payee: Address,
    facilitator_key: PrivateKeySigner,
    client: FacilitatorClient,
    http: reqwest::Client,
}

impl Devnet {
    async fn start() -> Option<Self> {
        let tools = tools()?;
        let anvil = Anvil::spawn(&tools, 0, DEVNET_CHAIN_ID).expect("anvil");
        let keys = anvil.keys().to_vec();
        let owner = Chain::connect(anvil.rpc_url(), Some(DEVNET_CHAIN_ID), keys[0].clone()).await.unwrap();
        let code = creation_code(
            &TestUSD::BYTECODE,
            TestUSD::constructorCall { name_: NAME.into(), symbol_: "USDC".into(), version_: VERSION.into(), owner_: owner.address() },
        );
        let (token, _) = owner.deploy("TestUSD", code).await.unwrap();
        let payer = keys[2].clone();
        owner.send("mint", TestUSD::new(token, owner.provider()).mint(payer.address(), U256::from(100_000_000u64))).await.unwrap();
        let mut devnet = Self {
            owner,
            token,
            payer,
            pauper: keys[4].clone(),
            payee: keys[3].address(),
            facilitator_key: keys[1].clone(),
            client: FacilitatorClient::new("http://127.0.0.1:1").unwrap(),
            http: reqwest::Client::new(),
            anvil,
        };
        devnet.client = devnet.serve(Some(vec![token])).await;
        Some(devnet)
    }

    /// Starts a facilitator (a new process's worth of state) and returns a client for it.
    async fn serve(&self, tokens: Option<Vec<Address>>) -> FacilitatorClient {
        let chain = Chain::connect(self.anvil.rpc_url(), Some(DEVNET_CHAIN_ID), self.facilitator_key.clone()).await.unwrap();
        let facilitator = Arc::new(Facilitator::new(chain, FacilitatorConfig { tokens, ..FacilitatorConfig::default() }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router(facilitator)).await });
        FacilitatorClient::new(&format!("http://{addr}")).unwrap()
    }

    fn domain(&self) -> Eip712Domain {
        token_domain(NAME, VERSION, DEVNET_CHAIN_ID, self.token)
    }

    fn requirements(&self) -> PaymentRequirements {
        PaymentRequirements::exact_evm(DEVNET_CHAIN_ID, self.token, self.payee, PRICE, 60, NAME, VERSION)
    }

    /// A v2 voucher as the official client builds it (validAfter 0, validBefore now + timeout, decimal
    /// strings), from `signer`, under `domain`, echoing `accepted`.
    fn voucher(&self, signer: &PrivateKeySigner, domain: &Eip712Domain, accepted: &PaymentRequirements, value: u128, window: (u64, u64), nonce: &str) -> PaymentPayload {
        let to: Address = accepted.pay_to.parse().unwrap();
        let auth = sign_transfer(signer, domain, to, U256::from(value), window.0, window.1, keccak256(nonce)).unwrap();
        let payload = ExactEvmPayload::from_signed(&auth);
        PaymentPayload {
            x402_version: 2,
            resource: Some(ResourceInfo { url: "http://127.0.0.1/v1/chat/completions".into(), description: None, mime_type: None }),
            accepted: accepted.clone(),
            payload: payload.to_value(),
            extensions: None,
        }
    }

    fn good_voucher(&self, nonce: &str) -> FacilitatorRequest {
        let req = self.requirements();
        FacilitatorRequest::V2 { payload: self.voucher(&self.payer, &self.domain(), &req, PRICE, (0, now() + 60), nonce), requirements: req }
    }

    async fn token_balances(&self) -> (U256, U256, U256) {
        let token = TestUSD::new(self.token, self.owner.provider());
        let of = |a: Address| {
            let token = token.clone();
            async move { token.balanceOf(a).call().await.unwrap() }
        };
        (of(self.payer.address()).await, of(self.payee).await, of(self.facilitator_key.address()).await)
    }

    async fn eth_balance(&self, who: Address) -> U256 {
        self.owner.provider().get_balance(who).await.unwrap()
    }

    async fn post_raw(&self, route: &str, body: Vec<u8>) -> (u16, serde_json::Value) {
        let response = self
            .http
            .post(format!("{}{route}", self.client.base_url()))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, serde_json::from_slice(&response.bytes().await.unwrap()).expect("every answer is x402 JSON"))
    }
}

async fn refused(devnet: &Devnet, request: &FacilitatorRequest) -> (VerifyResponse, SettleResponse) {
    let verdict = devnet.client.verify(request).await.unwrap();
    assert!(!verdict.is_valid, "accepted: {verdict:?}");
    let settled = devnet.client.settle(request).await.unwrap();
    assert!(!settled.success, "settled: {settled:?}");
    assert_eq!(settled.transaction, "");
    (verdict, settled)
}

/// Verify and settle both refuse `request` with `reason`.
async fn assert_refused(devnet: &Devnet, case: &str, request: &FacilitatorRequest, reason: ErrorReason) {
    let (verdict, settled) = refused(devnet, request).await;
    assert_eq!(verdict.invalid_reason.as_ref(), Some(&reason), "{case}: verify said {verdict:?}");
    assert_eq!(settled.error_reason.as_ref(), Some(&reason), "{case}: settle said {settled:?}");
    assert!(verdict.invalid_message.as_deref().is_some_and(|m| !m.is_empty()), "{case}: no message");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_good_voucher_settles_once_whatever_the_retries() {
    let Some(devnet) = Devnet::start().await else { return };
    let supported = devnet.client.supported().await.unwrap();
    assert!(supported.kinds.iter().any(|k| k.x402_version == 2 && k.scheme == "exact" && k.network == "eip155:16602"));
    assert_eq!(supported.signers["eip155:*"], vec![devnet.facilitator_key.address().to_string()]);

    let request = devnet.good_voucher("good-1");
    let verdict = devnet.client.verify(&request).await.unwrap();
    assert!(verdict.is_valid, "{verdict:?}");
    assert_eq!(verdict.payer, Some(devnet.payer.address().to_string()));

    let before = devnet.token_balances().await;
    let (payer_eth, facilitator_eth) = (devnet.eth_balance(devnet.payer.address()).await, devnet.eth_balance(devnet.facilitator_key.address()).await);
    let settled = devnet.client.settle(&request).await.unwrap();
    assert!(settled.success, "{settled:?}");
    assert_eq!(settled.network, "eip155:16602");
    assert_eq!(settled.payer, Some(devnet.payer.address().to_string()));
    let after = devnet.token_balances().await;
    assert_eq!(after.0, before.0 - U256::from(PRICE), "the payer paid exactly the price");
    assert_eq!(after.1, before.1 + U256::from(PRICE), "the payee received exactly the price");
    assert_eq!(after.2, before.2, "the facilitator's token balance does not move");
    assert_eq!(devnet.eth_balance(devnet.payer.address()).await, payer_eth, "the payer pays no gas");
    assert!(devnet.eth_balance(devnet.facilitator_key.address()).await < facilitator_eth, "the facilitator pays the gas");
    let tx: B256 = settled.transaction.parse().unwrap();
    let receipt = devnet.owner.provider().get_transaction_receipt(tx).await.unwrap().unwrap();
    assert!(receipt.status());
    assert_eq!(receipt.from, devnet.facilitator_key.address());

    // A retried settle: the first transaction, no second transfer.
    let again = devnet.client.settle(&request).await.unwrap();
    assert_eq!(again, settled);
    assert_eq!(devnet.token_balances().await, after);
    // A replay at verify: refused.
    let replay = devnet.client.verify(&request).await.unwrap();
    assert_eq!(replay.invalid_reason, Some(ErrorReason::NonceAlreadyUsed), "{replay:?}");
    // A restarted facilitator (no memory) still answers the retry with the first transaction, from the
    // chain's log.
    let restarted = devnet.serve(Some(vec![devnet.token])).await;
    assert_eq!(restarted.settle(&request).await.unwrap(), settled);
    assert_eq!(devnet.token_balances().await, after);
    // Another voucher reusing the nonce (another value) is not that settlement.
    let req = devnet.requirements();
    let mut reuse_req = req.clone();
    reuse_req.amount = (PRICE - 1).to_string();
    let reuse = FacilitatorRequest::V2 {
        payload: devnet.voucher(&devnet.payer, &devnet.domain(), &reuse_req, PRICE - 1, (0, now() + 60), "good-1"),
        requirements: reuse_req,
    };
    assert_refused(&devnet, "nonce reuse", &reuse, ErrorReason::NonceAlreadyUsed).await;

    // Racing settles of one voucher: one transfer, one transaction for all. (Eight: with the per-nonce
    // serialisation removed, most runs had some of them refused as a used nonce.)
    let racing = devnet.good_voucher("good-2");
    let before = devnet.token_balances().await;
    let answers = futures_join(&devnet.client, &racing, 8).await;
    assert!(answers.iter().all(|a| a.success), "{answers:?}");
    assert!(answers.iter().all(|a| a.transaction == answers[0].transaction), "{answers:?}");
    let after = devnet.token_balances().await;
    assert_eq!(after.0, before.0 - U256::from(PRICE));
    assert_eq!(after.1, before.1 + U256::from(PRICE));

    // v1: the same voucher shape, scheme and network at the top, requirements in v1's shape.
    let v2 = devnet.good_voucher("good-v1");
    let FacilitatorRequest::V2 { payload, requirements } = v2 else { unreachable!() };
    let v1 = FacilitatorRequest::V1 {
        payload: PaymentPayloadV1 { x402_version: 1, scheme: "exact".into(), network: "eip155:16602".into(), payload: payload.payload },
        requirements: requirements.to_v1(&ResourceInfo { url: "http://127.0.0.1/x".into(), description: None, mime_type: None }),
    };
    assert!(devnet.client.verify(&v1).await.unwrap().is_valid);
    let before = devnet.token_balances().await;
    assert!(devnet.client.settle(&v1).await.unwrap().success);
    assert_eq!(devnet.token_balances().await.1, before.1 + U256::from(PRICE));
}

async fn futures_join(client: &FacilitatorClient, request: &FacilitatorRequest, n: usize) -> Vec<SettleResponse> {
    let mut tasks = Vec::new();
    for _ in 0..n {
        let (client, request) = (client.clone(), request.clone());
        tasks.push(tokio::spawn(async move { client.settle(&request).await.unwrap() }));
    }
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.unwrap());
    }
    answers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_payments_are_refused_with_their_reasons_and_move_nothing() {
    let Some(devnet) = Devnet::start().await else { return };
    // One settled voucher, to replay.
    let settled_request = devnet.good_voucher("settled");
    assert!(devnet.client.settle(&settled_request).await.unwrap().success);

    let before = devnet.token_balances().await;
    let pauper_before = TestUSD::new(devnet.token, devnet.owner.provider()).balanceOf(devnet.pauper.address()).call().await.unwrap();
    let req = devnet.requirements();
    let domain = devnet.domain();
    let t = now();
    let v2 = |payload: PaymentPayload, requirements: &PaymentRequirements| FacilitatorRequest::V2 { payload, requirements: requirements.clone() };

    // Replayed voucher: verify refuses it (a settle retry returns the first transaction, checked above).
    let replay = devnet.client.verify(&settled_request).await.unwrap();
    assert_eq!(replay.invalid_reason, Some(ErrorReason::NonceAlreadyUsed), "{replay:?}");

    let cases: Vec<(&str, FacilitatorRequest, ErrorReason)> = vec![
        ("expired", v2(devnet.voucher(&devnet.payer, &domain, &req, PRICE, (0, t - 10), "expired"), &req), ErrorReason::InvalidValidBefore),
        ("expiring within the settle margin", v2(devnet.voucher(&devnet.payer, &domain, &req, PRICE, (0, t + 2), "expiring"), &req), ErrorReason::InvalidValidBefore),
        ("not yet valid", v2(devnet.voucher(&devnet.payer, &domain, &req, PRICE, (t + 3600, t + 7200), "early"), &req), ErrorReason::InvalidValidAfter),
        ("amount too low", v2(devnet.voucher(&devnet.payer, &domain, &req, PRICE - 1, (0, t + 60), "low"), &req), ErrorReason::ValueMismatch),
        ("amount too high", v2(devnet.voucher(&devnet.payer, &domain, &req, PRICE + 1, (0, t + 60), "high"), &req), ErrorReason::ValueMismatch),
        ("wrong recipient", {
            let mut other = req.clone();
            other.pay_to = devnet.pauper.address().to_string();
            v2(devnet.voucher(&devnet.payer, &domain, &other, PRICE, (0, t + 60), "recipient"), &req)
        }, ErrorReason::RecipientMismatch),
        ("wrong chain in the payment", {
            let mut other = req.clone();
            other.network = "eip155:1".into();
            v2(devnet.voucher(&devnet.payer, &token_domain(NAME, VERSION, 1, devnet.token), &other, PRICE, (0, t + 60), "chain-1"), &req)
        }, ErrorReason::NetworkMismatch),
        ("signed for another chain, claiming this one", v2(devnet.voucher(&devnet.payer, &token_domain(NAME, VERSION, 1, devnet.token), &req, PRICE, (0, t + 60), "chain-2"), &req), ErrorReason::InvalidSignature),
        ("requirements for a chain this facilitator does not serve", {
            let mut other = req.clone();
            other.network = "eip155:1".into();
            v2(devnet.voucher(&devnet.payer, &token_domain(NAME, VERSION, 1, devnet.token), &other, PRICE, (0, t + 60), "chain-3"), &other)
        }, ErrorReason::InvalidNetwork),
        ("signed under another token name", v2(devnet.voucher(&devnet.payer, &token_domain("USDC", VERSION, DEVNET_CHAIN_ID, devnet.token), &req, PRICE, (0, t + 60), "name"), &req), ErrorReason::InvalidSignature),
        ("signed under another token version", v2(devnet.voucher(&devnet.payer, &token_domain(NAME, "1", DEVNET_CHAIN_ID, devnet.token), &req, PRICE, (0, t + 60), "version"), &req), ErrorReason::InvalidSignature),
        ("requirements naming the wrong token name", {
            let other = PaymentRequirements::exact_evm(DEVNET_CHAIN_ID, devnet.token, devnet.payee, PRICE, 60, "USDC", VERSION);
            let wrong = token_domain("USDC", VERSION, DEVNET_CHAIN_ID, devnet.token);
            v2(devnet.voucher(&devnet.payer, &wrong, &other, PRICE, (0, t + 60), "name-req"), &other)
        }, ErrorReason::TokenNameMismatch),
        ("requirements naming the wrong token version", {
            let other = PaymentRequirements::exact_evm(DEVNET_CHAIN_ID, devnet.token, devnet.payee, PRICE, 60, NAME, "1");
            let wrong = token_domain(NAME, "1", DEVNET_CHAIN_ID, devnet.token);
            v2(devnet.voucher(&devnet.payer, &wrong, &other, PRICE, (0, t + 60), "version-req"), &other)
        }, ErrorReason::TokenVersionMismatch),
        ("a token this facilitator does not settle", {
            let other = PaymentRequirements::exact_evm(DEVNET_CHAIN_ID, Address::repeat_byte(0x42), devnet.payee, PRICE, 60, NAME, VERSION);
            v2(devnet.voucher(&devnet.payer, &token_domain(NAME, VERSION, DEVNET_CHAIN_ID, Address::repeat_byte(0x42)), &other, PRICE, (0, t + 60), "token"), &other)
        }, ErrorReason::InvalidPaymentRequirements),
        ("signature by another key", {
            let mut forged = devnet.voucher(&devnet.pauper, &domain, &req, PRICE, (0, t + 60), "forged");
            forged.payload["authorization"]["from"] = devnet.payer.address().to_string().into();
            v2(forged, &req)
        }, ErrorReason::InvalidSignature),
        ("payer without funds", v2(devnet.voucher(&devnet.pauper, &domain, &req, PRICE, (0, t + 60), "pauper"), &req), ErrorReason::InsufficientFunds),
        ("a signature that is not hex", {
            let mut bad = devnet.voucher(&devnet.payer, &domain, &req, PRICE, (0, t + 60), "hex");
            bad.payload["signature"] = "0xzz".into();
            v2(bad, &req)
        }, ErrorReason::InvalidPayload),
        ("a payload that is not exact EVM", {
            let mut bad = devnet.voucher(&devnet.payer, &domain, &req, PRICE, (0, t + 60), "shape");
            bad.payload = serde_json::json!({"permit2Authorization": {}});
            v2(bad, &req)
        }, ErrorReason::InvalidPayload),
    ];
    for (case, request, reason) in &cases {
        assert_refused(&devnet, case, request, reason.clone()).await;
    }

    // Malformed bodies: the x402 error body with its reason, never a bare 4xx/5xx.
    for (route, body, status, reason) in [
        ("/verify", b"{not json".to_vec(), 400, "invalid_payload"),
        ("/settle", b"{not json".to_vec(), 400, "invalid_payload"),
        ("/verify", br#"{"x402Version":3,"paymentPayload":{},"paymentRequirements":{}}"#.to_vec(), 400, "invalid_x402_version"),
        ("/settle", br#"{"x402Version":2,"paymentPayload":{"x402Version":2},"paymentRequirements":{}}"#.to_vec(), 400, "invalid_payload"),
        ("/verify", vec![b' '; 100 * 1024], 413, "invalid_payload"),
    ] {
        let (got_status, json) = devnet.post_raw(route, body).await;
        assert_eq!(got_status, status, "{route}: {json}");
        let field = if route == "/verify" { "invalidReason" } else { "errorReason" };
        assert_eq!(json[field], reason, "{route}: {json}");
    }

    // Malformed PAYMENT-SIGNATURE headers never reach the facilitator: the codec refuses them.
    use base64::Engine;
    use computepool_pay::x402::{HeaderError, decode_header, parse_header};
    assert_eq!(decode_header::<PaymentPayload>("%%% not base64").unwrap_err(), ErrorReason::InvalidPayload);
    let not_json = base64::engine::general_purpose::STANDARD.encode("{\"x402Version\":2,");
    assert!(matches!(parse_header::<PaymentPayload>(&not_json), Err(HeaderError::Json { .. })));

    // Nothing moved.
    assert_eq!(devnet.token_balances().await, before);
    let pauper_after = TestUSD::new(devnet.token, devnet.owner.provider()).balanceOf(devnet.pauper.address()).call().await.unwrap();
    assert_eq!(pauper_after, pauper_before);
}
