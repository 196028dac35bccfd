//! The contracts whose hosts come with later issues (keeper adapter, coalition voter), and the payment rail's
//! (hosted in src/rail/), must parse and resolve against `computepool:host@0.1.0` today: these bindings
//! fail to compile otherwise.

mod payment_rail {
    wasmtime::component::bindgen!({
        path: ["../../wit/host/0.1.0", "../../wit/payment-rail/0.1.0"],
        world: "computepool:payment-rail/payment-rail@0.1.0",
    });
}

mod keeper_adapter {
    wasmtime::component::bindgen!({
        path: ["../../wit/host/0.1.0", "../../wit/keeper-adapter/0.1.0"],
        world: "computepool:keeper-adapter/keeper-adapter@0.1.0",
    });
}

mod coalition_voter {
    wasmtime::component::bindgen!({
        path: ["../../wit/host/0.1.0", "../../wit/coalition-voter/0.1.0"],
        world: "computepool:coalition-voter/coalition-voter@0.1.0",
    });
}

#[test]
fn the_later_contracts_have_their_documented_shapes() {
    use coalition_voter::computepool::coalition_voter::types::{Ballot, Decision};
    use keeper_adapter::computepool::keeper_adapter::types::{Transition, TransitionKind};
    use payment_rail::computepool::payment_rail::types::RailInfo;

    let transition = Transition {
        kind: TransitionKind::StreamStop,
        idempotency_key: "req-1/stream-stop".into(),
        pool_id: "pool".into(),
        payload: "{}".into(),
    };
    assert_eq!(transition.kind, TransitionKind::StreamStop);
    let ballot = Ballot { decision: Decision::Eject, reason: "missed 3 heartbeats".into() };
    assert_eq!(ballot.decision, Decision::Eject);
    let rail = RailInfo { name: "x402".into(), scheme: "exact".into(), network: "anvil".into(), asset: "0x0".into(), payments: true, streams: false };
    assert_eq!(rail.scheme, "exact");
}
