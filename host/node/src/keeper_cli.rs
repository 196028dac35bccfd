//! `computepool keeper status`: a pool's payment transitions as the orchestrator's log has them — each
//! one's kind, state, keeper run and reference, and the attempts of those not settled — read from
//! `GET /transitions` (so it works against a remote orchestrator, and never opens the live database).

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use serde_json::Value;

#[derive(Subcommand, Debug)]
pub enum KeeperCommand {
    /// A pool's transitions, newest first, and how many are not settled.
    Status(StatusArgs),
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// The orchestrator's base URL.
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    pub orchestrator: String,
    /// The pool whose transitions to show.
    #[arg(long)]
    pub pool: String,
    /// How many transitions to show (1 to 200).
    #[arg(long, default_value_t = 20)]
    pub limit: u32,
    /// Print the page as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(command: KeeperCommand) -> anyhow::Result<()> {
    match command {
        KeeperCommand::Status(args) => status(&args),
    }
}

fn status(args: &StatusArgs) -> anyhow::Result<()> {
    let base = args.orchestrator.trim_end_matches('/');
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let mut response = agent
        .get(&format!("{base}/transitions"))
        .query("pool", &args.pool)
        .query("limit", args.limit.to_string())
        .call()
        .with_context(|| format!("reaching the orchestrator at {base}"))?;
    let status = response.status().as_u16();
    let body = response.body_mut().read_to_string().context("reading the orchestrator's answer")?;
    if status == 404 {
        bail!("{base} has no transition log (is the orchestrator running with keepers on? it serves GET /transitions then)");
    }
    if status != 200 {
        bail!("{base}/transitions answered {status}: {body}");
    }
    let page: Value = serde_json::from_str(&body).context("the orchestrator's transition page is not JSON")?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&page)?);
        return Ok(());
    }
    print!("{}", render(&args.pool, &page));
    Ok(())
}

/// The table `keeper status` prints.
pub fn render(pool: &str, page: &Value) -> String {
    let empty = Vec::new();
    let transitions = page["transitions"].as_array().unwrap_or(&empty);
    let unsettled = transitions.iter().filter(|t| !matches!(t["state"].as_str(), Some("recorded" | "failed"))).count();
    let mut out = format!("pool {pool}: {} transitions shown, {unsettled} not settled\n", transitions.len());
    out.push_str(&format!("{:>6}  {:<17}  {:<9}  {:>3}  {:<40}  {}\n", "id", "kind", "state", "run", "idempotency key", "reference"));
    for t in transitions {
        let text = |k: &str| t[k].as_str().unwrap_or("-").to_string();
        out.push_str(&format!(
            "{:>6}  {:<17}  {:<9}  {:>3}  {:<40}  {}\n",
            t["id"].as_i64().unwrap_or(0),
            text("kind"),
            text("state"),
            t["run"].as_u64().unwrap_or(0),
            text("idempotency_key"),
            text("reference"),
        ));
        if !matches!(t["state"].as_str(), Some("recorded")) {
            if let Some(detail) = t["detail"].as_str() {
                out.push_str(&format!("        detail: {detail}\n"));
            }
            for a in t["attempts"].as_array().unwrap_or(&empty) {
                out.push_str(&format!(
                    "        attempt {} ({}, run {}): {}{}\n",
                    a["number"].as_u64().unwrap_or(0),
                    a["action"].as_str().unwrap_or("?"),
                    a["run"].as_u64().unwrap_or(0),
                    a["outcome"].as_str().unwrap_or("interrupted"),
                    a["detail"].as_str().map(|d| format!(" — {d}")).unwrap_or_default(),
                ));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_counts_unsettled_transitions_and_shows_their_attempts() {
        let page = serde_json::json!({"transitions": [
            {"id": 2, "kind": "stream-stop", "state": "submitted", "run": 1, "idempotency_key": "p/stop/2",
             "reference": "run-9", "detail": null,
             "attempts": [{"number": 1, "action": "submit", "run": 1, "outcome": "unavailable", "detail": "connection refused"}]},
            {"id": 1, "kind": "stream-start", "state": "recorded", "run": 1, "idempotency_key": "p/start/1",
             "reference": "run-8", "detail": "[]", "attempts": []}
        ], "next_before": null});
        let table = render("p", &page);
        assert!(table.starts_with("pool p: 2 transitions shown, 1 not settled\n"), "{table}");
        assert!(table.contains("attempt 1 (submit, run 1): unavailable — connection refused"), "{table}");
        assert!(!table.contains("detail: []"), "a recorded transition's detail is not repeated: {table}");
    }
}
