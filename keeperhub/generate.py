#!/usr/bin/env python3
"""Writes keeperhub/workflows/*.workflow.json, ComputePool's five payment workflows in KeeperHub's
workflow export format (version 1). Run from the repository root after changing a contract's ABI;
host/keeper's tests check the files name only functions of the committed ABIs.

The ABI fragments embedded in each write-contract node are copied from host/chain/artifacts (Coalition,
PoolINFT) and from the GDAv1Forwarder signatures of @superfluid-finance/ethereum-contracts 1.15.2
(keeperhub/abi/GDAv1Forwarder.json, the same ones host/chain/src/bindings.rs declares)."""
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPORTED_AT = "2026-11-27T00:00:00.000Z"
TRIGGER = "trigger"
TRIGGER_LABEL = "ComputePool transition"


def abi_of(name):
    if name == "GDAv1Forwarder":
        path = os.path.join(ROOT, "keeperhub", "abi", "GDAv1Forwarder.json")
        return json.load(open(path))
    return json.load(open(os.path.join(ROOT, "host", "chain", "artifacts", name + ".json")))["abi"]


def fragment(contract, function):
    [f] = [x for x in abi_of(contract) if x.get("type") == "function" and x["name"] == function]
    return f


def t(path):
    """A reference to the trigger's input (the webhook body the keeperhub adapter sends)."""
    return "{{@%s:%s.%s}}" % (TRIGGER, TRIGGER_LABEL, path)


def trigger():
    return {
        "id": TRIGGER,
        "type": "trigger",
        "position": {"x": 0, "y": 0},
        "data": {
            "type": "trigger",
            "label": TRIGGER_LABEL,
            "description": "POST /api/workflows/{id}/webhook from ComputePool's keeperhub adapter "
            "(Authorization: Bearer wfb_...); the body is the transition: idempotencyKey, poolId, kind, "
            "payload, contracts.",
            "config": {"triggerType": "Webhook"},
        },
    }


def write(node_id, label, contract, function, address, args, x, description):
    f = fragment(contract, function)
    assert len(args) == len(f["inputs"]), (function, args)
    return {
        "id": node_id,
        "type": "action",
        "position": {"x": x, "y": 0},
        "data": {
            "type": "action",
            "label": label,
            "description": description,
            "config": {
                "actionType": "web3/write-contract",
                "network": t("chainId"),
                "web3Connection": "default",
                "contractAddress": address,
                "abi": json.dumps([f], separators=(",", ":")),
                "abiFunction": function,
                "functionArgs": json.dumps(args, separators=(",", ":")),
                "gasLimitMultiplier": "1.25",
            },
        },
    }


def for_each(node_id, label, items, x):
    return {
        "id": node_id,
        "type": "action",
        "position": {"x": x, "y": 0},
        "data": {
            "type": "action",
            "label": label,
            "description": "One iteration per member of the transition's payload.",
            "config": {"actionType": "For Each", "items": items},
        },
    }


SIGN_CODE = """// KeeperHub does not sign outgoing webhooks: ComputePool's receiver (POST /webhooks/keeperhub) needs
// HMAC-SHA256 over timestamp + "." + body with this pool's secret (see keeperhub/README.md).
const secret = "__COMPUTEPOOL_WEBHOOK_SECRET__";
const timestamp = Math.floor(Date.now() / 1000).toString();
const body = JSON.stringify({
  deliveryId: %(key)s + ":" + timestamp + ":" + Math.random().toString(16).slice(2),
  poolId: %(pool)s,
  idempotencyKey: %(key)s,
  kind: %(kind)s,
  status: "success",
  chainId: %(chain)s,
  transactionHashes: [%(hashes)s],
});
const enc = new TextEncoder();
const key = await crypto.subtle.importKey("raw", enc.encode(secret), { name: "HMAC", hash: "SHA-256" }, false, ["sign"]);
const mac = new Uint8Array(await crypto.subtle.sign("HMAC", key, enc.encode(timestamp + "." + body)));
const signature = "v1=" + Array.from(mac, (b) => b.toString(16).padStart(2, "0")).join("");
return { timestamp, body, signature, deliveryId: JSON.parse(body).deliveryId };"""


def callback(writes, x):
    hashes = ", ".join(
        '{ nodeId: %s, hash: {{@%s:%s.transactionHash}} }' % (json.dumps(node_id), node_id, label)
        for node_id, label in writes
    )
    code = SIGN_CODE % {
        "key": t("idempotencyKey"),
        "pool": t("poolId"),
        "kind": t("kind"),
        "chain": t("chainId"),
        "hashes": hashes,
    }
    sign = {
        "id": "sign-result",
        "type": "action",
        "position": {"x": x, "y": 0},
        "data": {
            "type": "action",
            "label": "Sign result",
            "description": "HMAC-SHA256 of the result for ComputePool's webhook receiver.",
            "config": {"actionType": "code/run-code", "code": code, "timeout": 10},
        },
    }
    r = "{{@sign-result:Sign result.result.%s}}"
    headers = {
        "Content-Type": "application/json",
        "X-ComputePool-Pool": t("poolId"),
        "X-ComputePool-Timestamp": r % "timestamp",
        "X-ComputePool-Delivery": r % "deliveryId",
        "X-ComputePool-Signature": r % "signature",
    }
    send = {
        "id": "report-result",
        "type": "action",
        "position": {"x": x + 280, "y": 0},
        "data": {
            "type": "action",
            "label": "Report result",
            "description": "POST the signed result to the orchestrator's /webhooks/keeperhub.",
            "config": {
                "actionType": "webhook/send-webhook",
                "webhookUrl": t("callbackUrl"),
                "webhookMethod": "POST",
                "webhookHeaders": json.dumps(headers, separators=(",", ":")),
                "webhookPayload": r % "body",
            },
        },
    }
    return [sign, send]


def export(kind, name, description, steps):
    """steps: nodes in execution order; each write-contract step is reported in the callback."""
    writes = [
        (n["id"], n["data"]["label"]) for n in steps if n["data"]["config"].get("actionType") == "web3/write-contract"
    ]
    x = 280 * (len(steps) + 1)
    nodes = [trigger()] + steps + callback(writes, x)
    edges = [
        {"id": "e%d" % i, "source": a["id"], "target": b["id"]} for i, (a, b) in enumerate(zip(nodes, nodes[1:]), 1)
    ]
    doc = {
        "version": 1,
        "exportedAt": EXPORTED_AT,
        "workflow": {"name": name, "description": description},
        "nodes": nodes,
        "edges": edges,
        "integrationBindings": [],
    }
    path = os.path.join(ROOT, "keeperhub", "workflows", kind + ".workflow.json")
    with open(path, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")


def main():
    gda = t("contracts.gdaV1Forwarder")
    coalition = t("contracts.coalition")
    inft = t("contracts.poolInft")
    p = lambda field: t("payload." + field)  # noqa: E731

    export(
        "propose",
        "ComputePool: propose a pool",
        "Mints the pool's INFT (ERC-7857): the model and shard plan as sealed data, owned by the proposer.",
        [
            write("mint-pool-inft", "Mint pool INFT", "PoolINFT", "mint", inft,
                  [p("proofs"), p("dataDescriptions"), p("owner")], 280,
                  "PoolINFT.mint(proofs, dataDescriptions, to): one oracle-signed proof per sealed item."),
        ],
    )
    export(
        "activate-and-pool",
        "ComputePool: activate a pool and create its GDA pool",
        "Creates the Superfluid GDA pool the operators are paid through, and authorizes the orchestrator "
        "to use the pool's INFT.",
        [
            write("create-gda-pool", "Create GDA pool", "GDAv1Forwarder", "createPool", gda,
                  [p("token"), p("admin"), p("poolConfig")], 280,
                  "GDAv1Forwarder.createPool(token, admin, {transferabilityForUnitsOwner: false, "
                  "distributionFromAnyAddress}) — the pool address is in the PoolCreated event."),
            write("authorize-orchestrator", "Authorize orchestrator", "PoolINFT", "authorizeUsage", inft,
                  [p("tokenId"), p("orchestrator")], 560,
                  "PoolINFT.authorizeUsage(tokenId, orchestrator)."),
        ],
    )
    member = "{{@each-member:For each member.currentItem.%s}}"
    export(
        "stream-start",
        "ComputePool: start (or re-rate) the pool's stream",
        "Sets each operator's GDA units to its share of the pool's work, then the total flow rate.",
        [
            for_each("each-member", "For each member", p("members"), 280),
            write("update-member-units", "Update member units", "GDAv1Forwarder", "updateMemberUnits", gda,
                  [p("pool"), member % "operator", member % "units", "0x"], 560,
                  "GDAv1Forwarder.updateMemberUnits(pool, operator, units, 0x) — absolute, so a re-run is harmless."),
            write("distribute-flow", "Distribute flow", "GDAv1Forwarder", "distributeFlow", gda,
                  [p("token"), p("from"), p("pool"), p("flowRate"), "0x"], 840,
                  "GDAv1Forwarder.distributeFlow(token, from, pool, flowRate, 0x) — the total rate, absolute."),
        ],
    )
    export(
        "stream-stop",
        "ComputePool: stop the pool's stream",
        "Sets the pool's flow rate to 0.",
        [
            write("distribute-flow", "Distribute flow", "GDAv1Forwarder", "distributeFlow", gda,
                  [p("token"), p("from"), p("pool"), "0", "0x"], 280,
                  "GDAv1Forwarder.distributeFlow(token, from, pool, 0, 0x)."),
        ],
    )
    export(
        "handle-breach",
        "ComputePool: act on a coalition's breach verdict",
        "Runs only after k of n coalition voters signed an eject ballot (checked by the orchestrator before it "
        "triggers this). Sets the operator's units to 0 (the pool keeps serving on the others) and opens the "
        "slashing vote in Coalition.sol from the keeper's voter account; the other agreeing voters' vote(breachId) "
        "calls come from their own accounts (keeperhub/plugins/coalition.md).",
        [
            write("zero-units", "Zero operator units", "GDAv1Forwarder", "updateMemberUnits", gda,
                  [p("pool"), p("operator"), "0", "0x"], 280,
                  "GDAv1Forwarder.updateMemberUnits(pool, operator, 0, 0x)."),
            write("propose-breach", "Propose breach", "Coalition", "proposeBreach", coalition,
                  [p("operator"), p("slashAmount"), p("evidenceHash")], 560,
                  "Coalition.proposeBreach(operator, amount, evidence): sha256 of the ballots and evidence."),
        ],
    )


if __name__ == "__main__":
    main()
