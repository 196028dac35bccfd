//! ComputePool's five workflows in KeeperHub's workflow export format (keeperhub/workflows/*.workflow.json,
//! version 1): parsing, and the contract calls each one makes. The stand-in runs them by these calls;
//! the tests check every call names a function of the committed ABIs.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::transition::TransitionKind;

/// The workflow files, compiled in so the stand-in and the tests need no path at run time.
pub const WORKFLOW_FILES: [(TransitionKind, &str); 5] = [
    (TransitionKind::Propose, include_str!("../../../keeperhub/workflows/propose.workflow.json")),
    (TransitionKind::ActivateAndPool, include_str!("../../../keeperhub/workflows/activate-and-pool.workflow.json")),
    (TransitionKind::StreamStart, include_str!("../../../keeperhub/workflows/stream-start.workflow.json")),
    (TransitionKind::StreamStop, include_str!("../../../keeperhub/workflows/stream-stop.workflow.json")),
    (TransitionKind::HandleBreach, include_str!("../../../keeperhub/workflows/handle-breach.workflow.json")),
];

#[derive(Debug, thiserror::Error)]
pub enum WorkflowError {
    #[error("workflow export is not valid JSON of the expected shape: {0}")]
    Json(#[from] serde_json::Error),
    #[error("unsupported workflow export version {0} (expected 1)")]
    Version(u32),
    #[error("node {node}: {problem}")]
    Node { node: String, problem: String },
    #[error("edge {edge}: {problem}")]
    Edge { edge: String, problem: String },
    #[error("reading {path}: {source}")]
    Io { path: String, source: std::io::Error },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkflowExport {
    pub version: u32,
    pub exported_at: String,
    pub workflow: WorkflowMeta,
    pub nodes: Vec<Node>,
    pub edges: Vec<Edge>,
    pub integration_bindings: Vec<serde_json::Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkflowMeta {
    pub name: String,
    #[serde(default)]
    pub description: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Node {
    pub id: String,
    #[serde(rename = "type")]
    pub node_type: String,
    pub position: Position,
    pub data: NodeData,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Position {
    pub x: f64,
    pub y: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeData {
    #[serde(rename = "type")]
    pub node_type: String,
    pub label: String,
    #[serde(default)]
    pub description: String,
    pub config: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Edge {
    pub id: String,
    pub source: String,
    pub target: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_handle: Option<String>,
}

/// One `web3/write-contract` node: the function it calls and its ABI entry.
#[derive(Debug, Clone, PartialEq)]
pub struct ContractCall {
    pub node_id: String,
    pub label: String,
    pub function: String,
    /// The node's embedded ABI entry for `function`.
    pub abi_entry: serde_json::Value,
    /// `functionArgs`, parsed (templates left as strings).
    pub args: Vec<serde_json::Value>,
}

impl ContractCall {
    /// `name(type,type,…)`, with tuples written out, as Solidity's selector preimage.
    pub fn signature(&self) -> String {
        signature(&self.abi_entry)
    }
}

/// `name(type,…)` of an ABI function entry.
pub fn signature(entry: &serde_json::Value) -> String {
    fn ty(input: &serde_json::Value) -> String {
        let t = input["type"].as_str().unwrap_or_default();
        match t.strip_prefix("tuple") {
            Some(suffix) => {
                let inner: Vec<String> = input["components"].as_array().into_iter().flatten().map(ty).collect();
                format!("({}){suffix}", inner.join(","))
            }
            None => t.to_owned(),
        }
    }
    let inputs: Vec<String> = entry["inputs"].as_array().into_iter().flatten().map(ty).collect();
    format!("{}({})", entry["name"].as_str().unwrap_or_default(), inputs.join(","))
}

impl WorkflowExport {
    pub fn parse(json: &str) -> Result<Self, WorkflowError> {
        let export: Self = serde_json::from_str(json)?;
        export.validate()?;
        Ok(export)
    }

    pub fn read(path: &Path) -> Result<Self, WorkflowError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| WorkflowError::Io { path: path.display().to_string(), source })?;
        Self::parse(&text)
    }

    /// What KeeperHub's importer requires and what ComputePool's runner relies on: version 1, one
    /// trigger node (a webhook trigger), unique node ids, edges between existing nodes.
    fn validate(&self) -> Result<(), WorkflowError> {
        if self.version != 1 {
            return Err(WorkflowError::Version(self.version));
        }
        let mut ids = std::collections::HashSet::new();
        for node in &self.nodes {
            let problem = |p: &str| WorkflowError::Node { node: node.id.clone(), problem: p.to_owned() };
            if !ids.insert(node.id.as_str()) {
                return Err(problem("duplicate node id"));
            }
            if node.node_type != node.data.node_type {
                return Err(problem("outer type and data.type differ"));
            }
            match node.node_type.as_str() {
                "trigger" if node.data.config.get("triggerType").and_then(|v| v.as_str()) != Some("Webhook") => {
                    return Err(problem("ComputePool workflows are triggered by webhook (triggerType \"Webhook\")"));
                }
                "trigger" => {}
                "action" if node.data.config.get("actionType").and_then(|v| v.as_str()).is_none() => {
                    return Err(problem("action without config.actionType"));
                }
                "action" => {}
                other => return Err(problem(&format!("unknown node type {other:?}"))),
            }
        }
        if self.nodes.iter().filter(|n| n.node_type == "trigger").count() != 1 {
            return Err(WorkflowError::Node { node: "*".into(), problem: "exactly one trigger node expected".into() });
        }
        for edge in &self.edges {
            for end in [&edge.source, &edge.target] {
                if !ids.contains(end.as_str()) {
                    return Err(WorkflowError::Edge { edge: edge.id.clone(), problem: format!("no node {end:?}") });
                }
            }
        }
        self.contract_calls()?;
        Ok(())
    }

    /// The action nodes in execution order (a walk of the edges from the trigger; ComputePool's
    /// workflows are chains).
    pub fn steps(&self) -> Vec<&Node> {
        let mut out = Vec::new();
        let mut at = self.nodes.iter().find(|n| n.node_type == "trigger");
        let mut seen = std::collections::HashSet::new();
        while let Some(node) = at {
            if !seen.insert(node.id.as_str()) {
                break;
            }
            if node.node_type == "action" {
                out.push(node);
            }
            at = self
                .edges
                .iter()
                .find(|e| e.source == node.id)
                .and_then(|e| self.nodes.iter().find(|n| n.id == e.target));
        }
        out
    }

    /// Every `web3/write-contract` node, in execution order.
    pub fn contract_calls(&self) -> Result<Vec<ContractCall>, WorkflowError> {
        let mut calls = Vec::new();
        for node in self.steps() {
            let config = &node.data.config;
            if config.get("actionType").and_then(|v| v.as_str()) != Some("web3/write-contract") {
                continue;
            }
            let problem = |p: String| WorkflowError::Node { node: node.id.clone(), problem: p };
            let field = |name: &str| {
                config.get(name).and_then(|v| v.as_str()).ok_or_else(|| problem(format!("missing string field {name}")))
            };
            let function = field("abiFunction")?.to_owned();
            // KeeperHub keeps `abi` and `functionArgs` as JSON-encoded strings, not arrays.
            let abi: Vec<serde_json::Value> =
                serde_json::from_str(field("abi")?).map_err(|e| problem(format!("abi is not a JSON array string: {e}")))?;
            let args: Vec<serde_json::Value> = serde_json::from_str(field("functionArgs")?)
                .map_err(|e| problem(format!("functionArgs is not a JSON array string: {e}")))?;
            let abi_entry = abi
                .into_iter()
                .find(|e| e["type"] == "function" && e["name"] == function.as_str())
                .ok_or_else(|| problem(format!("abi has no function {function}")))?;
            let arity = abi_entry["inputs"].as_array().map_or(0, |a| a.len());
            if arity != args.len() {
                return Err(problem(format!("{function} takes {arity} arguments, functionArgs has {}", args.len())));
            }
            calls.push(ContractCall { node_id: node.id.clone(), label: node.data.label.clone(), function, abi_entry, args });
        }
        Ok(calls)
    }
}

/// The five workflows, parsed.
pub fn builtin() -> Result<Vec<(TransitionKind, WorkflowExport)>, WorkflowError> {
    WORKFLOW_FILES.iter().map(|(kind, json)| Ok((*kind, WorkflowExport::parse(json)?))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, BTreeSet};

    fn repo() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
    }

    /// Signatures of every function in the committed ABIs: host/chain/artifacts (ComputePool's own
    /// contracts) and keeperhub/abi/GDAv1Forwarder.json (checked against host/chain's bindings below).
    fn committed_signatures() -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        for contract in ["Coalition", "PoolINFT", "OracleVerifier", "TestUSD"] {
            let path = repo().join(format!("host/chain/artifacts/{contract}.json"));
            let artifact: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
            for entry in artifact["abi"].as_array().unwrap() {
                if entry["type"] == "function" {
                    out.insert(signature(entry), contract.to_owned());
                }
            }
        }
        let gda: Vec<serde_json::Value> =
            serde_json::from_str(&std::fs::read_to_string(repo().join("keeperhub/abi/GDAv1Forwarder.json")).unwrap())
                .unwrap();
        for entry in &gda {
            out.insert(signature(entry), "GDAv1Forwarder".to_owned());
        }
        out
    }

    #[test]
    fn every_workflow_parses_and_calls_only_committed_functions() {
        let known = committed_signatures();
        let mut called = BTreeMap::new();
        for (kind, export) in builtin().unwrap() {
            let calls = export.contract_calls().unwrap();
            assert!(!calls.is_empty(), "{kind} makes no contract call");
            for call in &calls {
                let contract = known
                    .get(&call.signature())
                    .unwrap_or_else(|| panic!("{kind}: node {} calls {} — not in any committed ABI", call.node_id, call.signature()));
                called.entry(kind).or_insert_with(Vec::new).push(format!("{contract}.{}", call.function));
            }
            // Each ends by reporting its result to ComputePool's webhook, signed.
            let steps = export.steps();
            let last = steps.last().unwrap();
            assert_eq!(last.data.config["actionType"], "webhook/send-webhook", "{kind}");
            let headers: BTreeMap<String, String> =
                serde_json::from_str(last.data.config["webhookHeaders"].as_str().unwrap()).unwrap();
            for h in [crate::webhook::HEADER_SIGNATURE, crate::webhook::HEADER_TIMESTAMP, crate::webhook::HEADER_DELIVERY, crate::webhook::HEADER_POOL] {
                assert!(headers.keys().any(|k| k.eq_ignore_ascii_case(h)), "{kind} does not send {h}");
            }
        }
        let names = |k| called[&k].join(" ");
        assert_eq!(names(TransitionKind::Propose), "PoolINFT.mint");
        assert_eq!(names(TransitionKind::ActivateAndPool), "GDAv1Forwarder.createPool PoolINFT.authorizeUsage");
        assert_eq!(names(TransitionKind::StreamStart), "GDAv1Forwarder.updateMemberUnits GDAv1Forwarder.distributeFlow");
        assert_eq!(names(TransitionKind::StreamStop), "GDAv1Forwarder.distributeFlow");
        assert_eq!(names(TransitionKind::HandleBreach), "GDAv1Forwarder.updateMemberUnits Coalition.proposeBreach");
    }

    /// The GDA forwarder ABI the workflows embed says what host/chain's alloy bindings say.
    #[test]
    fn gda_forwarder_abi_matches_the_chain_crate_bindings() {
        let bindings = std::fs::read_to_string(repo().join("host/chain/src/bindings.rs")).unwrap();
        let start = bindings.find("interface IGDAv1Forwarder").unwrap();
        let block = &bindings[start..start + bindings[start..].find("\n    }\n").unwrap()];
        let flat: String = block.split_whitespace().collect::<Vec<_>>().join(" ");
        let gda: Vec<serde_json::Value> =
            serde_json::from_str(&std::fs::read_to_string(repo().join("keeperhub/abi/GDAv1Forwarder.json")).unwrap())
                .unwrap();
        for entry in &gda {
            let name = entry["name"].as_str().unwrap();
            let decl = flat.split(&format!("function {name}(")).nth(1).unwrap_or_else(|| panic!("bindings lack {name}"));
            let params = &decl[..decl.find(')').unwrap()];
            let types: Vec<String> = params
                .split(',')
                .map(|p| p.split_whitespace().next().unwrap().to_owned())
                .map(|t| if t == "PoolConfig" { "(bool,bool)".to_owned() } else { t })
                .collect();
            assert_eq!(signature(entry), format!("{name}({})", types.join(",")));
        }
    }

    #[test]
    fn malformed_exports_are_refused_with_the_node_named() {
        let good = WORKFLOW_FILES[3].1;
        let mut doc: serde_json::Value = serde_json::from_str(good).unwrap();
        doc["nodes"][1]["data"]["config"]["abiFunction"] = "drain".into();
        let err = WorkflowExport::parse(&doc.to_string()).unwrap_err().to_string();
        assert!(err.contains("distribute-flow") && err.contains("no function drain"), "{err}");

        let mut doc: serde_json::Value = serde_json::from_str(good).unwrap();
        doc["nodes"][1]["data"]["config"]["functionArgs"] = "[\"0x1\"]".into();
        let err = WorkflowExport::parse(&doc.to_string()).unwrap_err().to_string();
        assert!(err.contains("takes 5 arguments"), "{err}");

        let mut doc: serde_json::Value = serde_json::from_str(good).unwrap();
        doc["version"] = 2.into();
        assert!(matches!(WorkflowExport::parse(&doc.to_string()), Err(WorkflowError::Version(2))));

        let mut doc: serde_json::Value = serde_json::from_str(good).unwrap();
        doc["edges"][0]["target"] = "nowhere".into();
        assert!(matches!(WorkflowExport::parse(&doc.to_string()), Err(WorkflowError::Edge { .. })));
    }

    #[test]
    fn files_on_disk_are_the_compiled_in_ones() {
        let on_disk: BTreeSet<String> = std::fs::read_dir(repo().join("keeperhub/workflows"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        let compiled: BTreeSet<String> =
            WORKFLOW_FILES.iter().map(|(k, _)| format!("{}.workflow.json", k.as_str())).collect();
        assert_eq!(on_disk, compiled);
        for (kind, _) in WORKFLOW_FILES {
            WorkflowExport::read(&repo().join(format!("keeperhub/workflows/{}.workflow.json", kind.as_str()))).unwrap();
        }
    }
}
