//! A KeeperHub workflow export (keeperhub/workflows/*.workflow.json, version 1) as the local keeper runs
//! it: the nodes in edge order from the trigger, each `web3/write-contract` node a [`ContractStep`], a
//! `For Each` node making the node after it a loop over its items (as the KeeperHub stand-in runs it), and
//! the `{{@node:Label.path}}` templates resolved against the trigger input and the loop's current item.
//!
//! What the local keeper does not run, on purpose: the last two nodes of every workflow ("Sign result",
//! `code/run-code`, and "Report result", `webhook/send-webhook`) sign and POST the result to the
//! orchestrator's webhook, because KeeperHub runs elsewhere. The local keeper runs inside the host, which
//! reads the result through `status` directly; no secret and no network are involved. Any other node type
//! is refused when the workflow is read, so a workflow that gains a step this keeper cannot run fails
//! loudly instead of being half-run.
//!
//! Templates in `functionArgs`: KeeperHub substitutes templates into the text before parsing it. This
//! keeper parses `functionArgs` first and substitutes per string: a string that is exactly one template
//! takes the referenced value as it is (an object for a tuple, an array for `bytes[]`), a template inside
//! longer text is spliced in as text. For the scalar arguments of the five workflows both give the same
//! call; for the object and array arguments (`poolConfig`, `proofs`) text substitution would produce
//! invalid JSON, which is why keeperhub/README.md lists them as unverified on KeeperHub itself.

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use serde::Deserialize;
use serde_json::Value;

use crate::abi::Function;

/// The trigger node's id in every workflow file.
pub const TRIGGER: &str = "trigger";

#[derive(Deserialize)]
struct Export {
    version: u32,
    nodes: Vec<Node>,
    edges: Vec<Edge>,
}

#[derive(Deserialize)]
struct Node {
    id: String,
    data: NodeData,
}

#[derive(Deserialize)]
struct NodeData {
    label: String,
    config: serde_json::Map<String, Value>,
}

#[derive(Deserialize)]
struct Edge {
    source: String,
    target: String,
}

/// One `web3/write-contract` node, ready to resolve and encode.
#[derive(Debug, Clone)]
pub struct ContractStep {
    pub node_id: String,
    pub label: String,
    /// Template for the chain id (`network`).
    pub network: String,
    /// Template for the contract address.
    pub contract: String,
    pub function: Function,
    /// `functionArgs`, parsed; templates still in the strings.
    pub args: Vec<Value>,
    /// The `For Each` node this step loops under, and the template of its items.
    pub for_each: Option<ForEach>,
}

#[derive(Debug, Clone)]
pub struct ForEach {
    pub node_id: String,
    pub items: String,
}

/// The contract steps of a workflow, in the order they run.
#[derive(Debug, Clone)]
pub struct Workflow {
    pub steps: Vec<ContractStep>,
}

fn config_str<'a>(node: &'a Node, key: &str) -> Result<&'a str, String> {
    node.data.config.get(key).and_then(Value::as_str).ok_or_else(|| format!("node {}: no `{key}` string in its config", node.id))
}

impl Workflow {
    /// Reads an export and checks every node is one this keeper can run.
    pub fn parse(text: &str) -> Result<Self, String> {
        let export: Export = serde_json::from_str(text).map_err(|e| format!("not a workflow export: {e}"))?;
        if export.version != 1 {
            return Err(format!("workflow export version {} (this keeper reads 1)", export.version));
        }
        // The five workflows are chains: one edge out of each node. Walk it from the trigger.
        let mut order: Vec<&Node> = Vec::new();
        let mut at = TRIGGER.to_string();
        loop {
            let node = export.nodes.iter().find(|n| n.id == at).ok_or_else(|| format!("edge to unknown node {at}"))?;
            if order.iter().any(|n| n.id == at) {
                return Err(format!("the edges loop back to node {at}"));
            }
            order.push(node);
            let mut next = export.edges.iter().filter(|e| e.source == at);
            match (next.next(), next.next()) {
                (None, _) => break,
                (Some(e), None) => at = e.target.clone(),
                (Some(_), Some(_)) => return Err(format!("node {at} branches; this keeper runs linear workflows")),
            }
        }
        if order.len() != export.nodes.len() {
            return Err("some nodes are not reachable from the trigger".into());
        }
        let mut steps = Vec::new();
        let mut pending_loop: Option<ForEach> = None;
        for node in order.into_iter().skip(1) {
            match config_str(node, "actionType")? {
                "For Each" => {
                    if pending_loop.is_some() {
                        return Err(format!("node {}: a For Each right after a For Each", node.id));
                    }
                    pending_loop = Some(ForEach { node_id: node.id.clone(), items: config_str(node, "items")?.to_string() });
                }
                "web3/write-contract" => {
                    let abi: Value = serde_json::from_str(config_str(node, "abi")?).map_err(|e| format!("node {}: abi: {e}", node.id))?;
                    let function = Function::find(&abi, config_str(node, "abiFunction")?).map_err(|e| format!("node {}: {e}", node.id))?;
                    let args: Vec<Value> = serde_json::from_str(config_str(node, "functionArgs")?)
                        .map_err(|e| format!("node {}: functionArgs is not a JSON array: {e}", node.id))?;
                    if args.len() != function.inputs.len() {
                        return Err(format!("node {}: {} takes {} arguments, functionArgs has {}", node.id, function.signature(), function.inputs.len(), args.len()));
                    }
                    steps.push(ContractStep {
                        node_id: node.id.clone(),
                        label: node.data.label.clone(),
                        network: config_str(node, "network")?.to_string(),
                        contract: config_str(node, "contractAddress")?.to_string(),
                        function,
                        args,
                        for_each: pending_loop.take(),
                    });
                }
                // The signed report to the orchestrator's webhook: not needed in-process (module docs).
                "code/run-code" | "webhook/send-webhook" => {}
                other => return Err(format!("node {}: action `{other}` is not one the local keeper runs", node.id)),
            }
        }
        if pending_loop.is_some() {
            return Err("a For Each with no contract step after it".into());
        }
        Ok(Self { steps })
    }
}

/// What templates resolve against: the trigger input, and inside a loop its node id and current item.
pub struct Scope<'a> {
    pub trigger: &'a Value,
    pub item: Option<(&'a str, &'a Value)>,
}

impl Scope<'_> {
    /// The value one `{{@node:Label.path}}` reference names.
    fn lookup(&self, reference: &str) -> Result<Value, String> {
        let inner = reference.strip_prefix("{{@").and_then(|r| r.strip_suffix("}}")).ok_or_else(|| format!("`{reference}` is not a template"))?;
        let (node, rest) = inner.split_once(':').ok_or_else(|| format!("`{reference}`: no node id"))?;
        // `Label.path.to.field`: the label may hold spaces but no dots (true of every label here).
        let (_label, path) = rest.split_once('.').ok_or_else(|| format!("`{reference}`: no field path"))?;
        let mut fields = path.split('.');
        let root = if node == TRIGGER {
            self.trigger
        } else {
            match self.item {
                Some((loop_node, item)) if loop_node == node => {
                    if fields.next() != Some("currentItem") {
                        return Err(format!("`{reference}`: a For Each node offers `currentItem` only"));
                    }
                    item
                }
                _ => return Err(format!("`{reference}` names node {node}, whose output this step cannot see")),
            }
        };
        let mut value = root;
        for field in fields {
            value = match value {
                Value::Object(map) => map.get(field),
                Value::Array(items) => field.parse::<usize>().ok().and_then(|i| items.get(i)),
                _ => None,
            }
            .ok_or_else(|| format!("`{reference}`: the input has no `{field}` there"))?;
        }
        Ok(value.clone())
    }

    /// Resolves every template in `value` (module docs: a whole-string template keeps the value's type).
    pub fn resolve(&self, value: &Value) -> Result<Value, String> {
        match value {
            Value::String(s) => {
                if s.starts_with("{{@") && s.ends_with("}}") && s.matches("{{").count() == 1 {
                    return self.lookup(s);
                }
                Ok(Value::String(self.splice(s)?))
            }
            Value::Array(items) => items.iter().map(|v| self.resolve(v)).collect::<Result<Vec<_>, _>>().map(Value::Array),
            Value::Object(map) => {
                let mut out = serde_json::Map::new();
                for (k, v) in map {
                    out.insert(k.clone(), self.resolve(v)?);
                }
                Ok(Value::Object(out))
            }
            other => Ok(other.clone()),
        }
    }

    /// A string with templates inside: each replaced by its value as text.
    pub fn splice(&self, text: &str) -> Result<String, String> {
        let mut out = String::new();
        let mut rest = text;
        while let Some(start) = rest.find("{{@") {
            out.push_str(&rest[..start]);
            let end = rest[start..].find("}}").ok_or_else(|| format!("unclosed template in `{text}`"))? + start + 2;
            match self.lookup(&rest[start..end])? {
                Value::String(s) => out.push_str(&s),
                other => out.push_str(&other.to_string()),
            }
            rest = &rest[end..];
        }
        out.push_str(rest);
        Ok(out)
    }

    /// The loop's items: the `items` template must name an array.
    pub fn items(&self, for_each: &ForEach) -> Result<Vec<Value>, String> {
        match self.lookup(&for_each.items)? {
            Value::Array(items) => Ok(items),
            other => Err(format!("For Each {}: `{}` is not an array but {other}", for_each.node_id, for_each.items)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const FILES: [(&str, &str); 5] = [
        ("propose", include_str!("../../../../keeperhub/workflows/propose.workflow.json")),
        ("activate-and-pool", include_str!("../../../../keeperhub/workflows/activate-and-pool.workflow.json")),
        ("stream-start", include_str!("../../../../keeperhub/workflows/stream-start.workflow.json")),
        ("stream-stop", include_str!("../../../../keeperhub/workflows/stream-stop.workflow.json")),
        ("handle-breach", include_str!("../../../../keeperhub/workflows/handle-breach.workflow.json")),
    ];

    #[test]
    fn the_five_workflows_parse_to_their_calls() {
        let calls: Vec<(&str, Vec<String>)> = FILES
            .iter()
            .map(|(name, text)| {
                let w = Workflow::parse(text).unwrap_or_else(|e| panic!("{name}: {e}"));
                (*name, w.steps.iter().map(|s| s.function.signature()).collect())
            })
            .collect();
        let expected: Vec<(&str, Vec<&str>)> = vec![
            ("propose", vec!["mint(bytes[],string[],address)"]),
            ("activate-and-pool", vec!["createPool(address,address,(bool,bool))", "authorizeUsage(uint256,address)"]),
            ("stream-start", vec!["updateMemberUnits(address,address,uint128,bytes)", "distributeFlow(address,address,address,int96,bytes)"]),
            ("stream-stop", vec!["distributeFlow(address,address,address,int96,bytes)"]),
            ("handle-breach", vec!["updateMemberUnits(address,address,uint128,bytes)", "proposeBreach(address,uint256,bytes32)"]),
        ];
        for ((name, got), (_, want)) in calls.iter().zip(expected) {
            assert_eq!(got, &want, "{name}");
        }
        let start = Workflow::parse(FILES[2].1).unwrap();
        assert_eq!(start.steps[0].for_each.as_ref().map(|f| f.node_id.as_str()), Some("each-member"));
        assert!(start.steps[1].for_each.is_none());
    }

    #[test]
    fn templates_resolve_against_the_trigger_and_the_current_item() {
        let trigger = json!({"chainId": "16602", "payload": {"pool": "0xaa", "poolConfig": {"a": true}, "members": [{"operator": "0xbb", "units": "3"}]}});
        let item = json!({"operator": "0xbb", "units": "3"});
        let scope = Scope { trigger: &trigger, item: Some(("each-member", &item)) };
        assert_eq!(scope.resolve(&json!("{{@trigger:ComputePool transition.payload.pool}}")).unwrap(), json!("0xaa"));
        assert_eq!(scope.resolve(&json!("{{@trigger:ComputePool transition.payload.poolConfig}}")).unwrap(), json!({"a": true}));
        assert_eq!(scope.resolve(&json!("{{@each-member:For each member.currentItem.units}}")).unwrap(), json!("3"));
        assert_eq!(scope.resolve(&json!("chain {{@trigger:T.chainId}}!")).unwrap(), json!("chain 16602!"));
        assert_eq!(scope.resolve(&json!("0x")).unwrap(), json!("0x"));
        assert!(scope.resolve(&json!("{{@trigger:T.payload.nope}}")).unwrap_err().contains("no `nope`"));
        assert!(scope.resolve(&json!("{{@zero-units:Z.transactionHash}}")).unwrap_err().contains("cannot see"));
        let items = scope.items(&ForEach { node_id: "each-member".into(), items: "{{@trigger:T.payload.members}}".into() }).unwrap();
        assert_eq!(items.len(), 1);
        assert!(scope.items(&ForEach { node_id: "x".into(), items: "{{@trigger:T.payload.pool}}".into() }).is_err());
    }

    #[test]
    fn unknown_steps_and_branches_are_refused() {
        let mut w: Value = serde_json::from_str(FILES[3].1).unwrap();
        w["nodes"][1]["data"]["config"]["actionType"] = json!("discord/send-message");
        assert!(Workflow::parse(&w.to_string()).unwrap_err().contains("not one the local keeper runs"));
        let mut w: Value = serde_json::from_str(FILES[3].1).unwrap();
        w["edges"].as_array_mut().unwrap().push(json!({"id": "x", "source": "trigger", "target": "sign-result"}));
        assert!(Workflow::parse(&w.to_string()).unwrap_err().contains("branches"));
        let mut w: Value = serde_json::from_str(FILES[3].1).unwrap();
        w["version"] = json!(2);
        assert!(Workflow::parse(&w.to_string()).is_err());
    }
}
