//! The judge: turns one breach report into a verdict. It asks every configured coalition voter at once,
//! each on a blocking thread, and waits for them until a deadline; signs each answer with that voter's
//! ed25519 key (held here, never by the plugin) as a [`SignedBallot`]; records the report and the
//! ballots in the [`CoalitionStore`]; and tallies them k of n. A voter that traps, refuses the report or
//! answers after the deadline casts nothing — with k a strict majority and k ≤ n − 1, one such voter can
//! neither block nor force a verdict (coalition.rs shows why).
//!
//! Keys: one per voter, a 32-byte ed25519 seed in `<state dir>/voter-keys/<voter>.key` (64 hex
//! characters, mode 0600), made on first use and kept, so a voter's identity — and with it the quorum —
//! survives restarts.
//!
//! ```no_run
//! # async fn demo(host: &computepool_plugin_host::PluginHost, report: computepool_keeper::coalition::BreachReport)
//! # -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use computepool_keeper::judge::{Judge, JudgeConfig, Voter};
//! let voters: Vec<Arc<dyn Voter>> = ["audit-majority", "audit-unanimous", "liveness"]
//!     .iter()
//!     .map(|id| host.voter(id).map(|v| v as Arc<dyn Voter>).ok_or("not loaded"))
//!     .collect::<Result<_, _>>()?;
//! let judge = Judge::open(std::path::Path::new("/var/lib/computepool"), voters, JudgeConfig::default())?;
//! let judgement = judge.judge(report).await?;
//! println!("{:?}", judgement.tally.outcome);
//! # Ok(()) }
//! ```

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use computepool_plugin_host::VoterPlugin;
use computepool_plugin_host::voter as plugin;
use serde::Serialize;

use crate::coalition::{BreachKind, BreachReport, CoalitionStore, Decision, Quorum, QuorumError, SignedBallot, StoreError, Tally, VoterId, VoterKey};

/// A voter the judge can ask: a coalition-voter plugin, or anything else that answers the same way.
/// `vote` blocks (the judge calls it on a blocking thread).
pub trait Voter: Send + Sync + 'static {
    /// Stable and unique among the judge's voters: it names the voter's key file.
    fn name(&self) -> &str;
    /// The voter's decision and reason, or why it gives none.
    fn vote(&self, report: &BreachReport) -> Result<(Decision, String), String>;
}

impl Voter for VoterPlugin {
    fn name(&self) -> &str {
        self.id()
    }

    fn vote(&self, report: &BreachReport) -> Result<(Decision, String), String> {
        let report = plugin::BreachReport {
            pool_id: report.pool_id.clone(),
            operator: report.operator.clone(),
            kind: match report.kind {
                BreachKind::MissedHeartbeat => plugin::BreachKind::MissedHeartbeat,
                BreachKind::WrongOutput => plugin::BreachKind::WrongOutput,
                BreachKind::TooSlow => plugin::BreachKind::TooSlow,
                BreachKind::StreamCut => plugin::BreachKind::StreamCut,
                BreachKind::Other => plugin::BreachKind::Other,
            },
            evidence: report.evidence.clone(),
            observed_at_ms: report.observed_at_ms,
        };
        let ballot = VoterPlugin::vote(self, &report).map_err(|e| e.to_string())?;
        let decision = match ballot.decision {
            plugin::Decision::Eject => Decision::Eject,
            plugin::Decision::Warn => Decision::Warn,
            plugin::Decision::Dismiss => Decision::Dismiss,
            plugin::Decision::Abstain => Decision::Abstain,
        };
        Ok((decision, ballot.reason))
    }
}

#[derive(Debug, Clone)]
pub struct JudgeConfig {
    /// How many voters must agree; `None`: the smallest strict majority (n / 2 + 1).
    pub k: Option<u32>,
    /// How long the judge waits for the voters; a later answer is not counted.
    pub deadline: Duration,
}

impl Default for JudgeConfig {
    fn default() -> Self {
        // A voter judges evidence it is handed (and may read the chain): seconds, not minutes.
        Self { k: None, deadline: Duration::from_secs(10) }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JudgeError {
    #[error("voter name {0:?} cannot name a key file (lowercase letters, digits, `-`, `_`, `.`; not starting with `.`)")]
    BadVoterName(String),
    #[error("voter {0:?} is configured twice")]
    DuplicateVoter(String),
    #[error("voter key {path}: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error(transparent)]
    Quorum(#[from] QuorumError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What became of one voter's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "cast")]
pub enum Cast {
    /// It answered in time; this is the ballot the judge signed for it.
    Ballot { ballot: SignedBallot },
    /// It refused the report or failed (trap, fuel, memory, a broken contract): no ballot.
    Failed { error: String },
    /// It had not answered at the deadline: no ballot.
    Late,
}

#[derive(Debug, Clone, Serialize)]
pub struct VoterOutcome {
    pub name: String,
    pub voter: VoterId,
    pub cast: Cast,
}

/// The judge's answer on one report.
#[derive(Debug, Clone, Serialize)]
pub struct Judgement {
    /// The report's digest (hex): its key in the coalition store.
    pub digest: String,
    pub tally: Tally,
    /// Each voter's part, in the judge's order. Empty when the report had been decided before (the
    /// verdict kept then stands; the voters were not asked again).
    pub voters: Vec<VoterOutcome>,
}

impl Judgement {
    /// The decision reached, if k voters agreed.
    pub fn verdict(&self) -> Option<Decision> {
        match self.tally.outcome {
            crate::coalition::Outcome::Decided(d) => Some(d),
            crate::coalition::Outcome::NoQuorum => None,
        }
    }
}

struct Member {
    voter: Arc<dyn Voter>,
    key: Arc<VoterKey>,
}

/// Asks the coalition's voters, signs and records their ballots, tallies them. Cheap to share (`Arc`).
pub struct Judge {
    members: Vec<Member>,
    quorum: Quorum,
    deadline: Duration,
    store: Arc<CoalitionStore>,
}

impl Judge {
    /// Voters with their keys, a store, the quorum from `config`.
    pub fn new(voters: Vec<(Arc<dyn Voter>, VoterKey)>, store: Arc<CoalitionStore>, config: JudgeConfig) -> Result<Self, JudgeError> {
        let mut names = std::collections::HashSet::new();
        for (v, _) in &voters {
            if !names.insert(v.name().to_owned()) {
                return Err(JudgeError::DuplicateVoter(v.name().to_owned()));
            }
        }
        let n = voters.len() as u32;
        let quorum = Quorum::new(config.k.unwrap_or(n / 2 + 1), voters.iter().map(|(_, k)| k.id()).collect())?;
        let members = voters.into_iter().map(|(voter, key)| Member { voter, key: Arc::new(key) }).collect();
        Ok(Self { members, quorum, deadline: config.deadline, store })
    }

    /// The judge of a node: keys under `<state_dir>/voter-keys/` (made on first use), the store in
    /// `<state_dir>/coalition.db`.
    pub fn open(state_dir: &Path, voters: Vec<Arc<dyn Voter>>, config: JudgeConfig) -> Result<Self, JudgeError> {
        let dir = state_dir.join("voter-keys");
        std::fs::create_dir_all(&dir).map_err(|e| JudgeError::Key { path: dir.clone(), reason: e.to_string() })?;
        let mut keyed = Vec::with_capacity(voters.len());
        for voter in voters {
            let key = load_or_create_key(&dir, voter.name())?;
            keyed.push((voter, key));
        }
        let store = Arc::new(CoalitionStore::open(&state_dir.join("coalition.db"))?);
        Self::new(keyed, store, config)
    }

    pub fn quorum(&self) -> &Quorum {
        &self.quorum
    }

    pub fn store(&self) -> &Arc<CoalitionStore> {
        &self.store
    }

    /// Each voter's name and ballot key id, in the judge's order.
    pub fn voters(&self) -> Vec<(String, VoterId)> {
        self.members.iter().map(|m| (m.voter.name().to_owned(), m.key.id())).collect()
    }

    /// Judges `report`: records it, asks every voter (waiting at most the deadline), records the signed
    /// ballots, tallies. A report decided before keeps its verdict, and nobody is asked again (a voter
    /// giving another reason the second time would be void as an equivocation).
    pub async fn judge(&self, report: BreachReport) -> Result<Judgement, JudgeError> {
        let (store, quorum) = (self.store.clone(), self.quorum.clone());
        let recorded = {
            let report = report.clone();
            blocking(move || {
                let digest = store.record_report(&report)?;
                let decided = match store.verdict(&digest)? {
                    Some(_) => Some(decided(&store, &quorum, &digest)?),
                    None => None,
                };
                Ok((digest, decided))
            })
            .await?
        };
        let digest = match recorded {
            (digest, Some(tally)) => return Ok(Judgement { digest, tally, voters: Vec::new() }),
            (digest, None) => digest,
        };
        let report = Arc::new(report);
        let deadline = tokio::time::Instant::now() + self.deadline;
        let asks = self.members.iter().map(|m| {
            let (voter, report) = (m.voter.clone(), report.clone());
            let task = tokio::task::spawn_blocking(move || voter.vote(&report));
            async move {
                match tokio::time::timeout_at(deadline, task).await {
                    Err(_) => None,
                    Ok(Err(join)) => Some(Err(format!("the voter's thread failed: {join}"))),
                    Ok(Ok(answer)) => Some(answer),
                }
            }
        });
        let answers = futures_util::future::join_all(asks).await;
        let mut voters = Vec::with_capacity(answers.len());
        let mut ballots = Vec::new();
        for (m, answer) in self.members.iter().zip(answers) {
            let name = m.voter.name().to_owned();
            let cast = match answer {
                None => {
                    tracing::warn!(voter = %name, deadline_ms = self.deadline.as_millis() as u64, "voter missed the deadline: no ballot");
                    Cast::Late
                }
                Some(Err(error)) => {
                    tracing::warn!(voter = %name, %error, "voter gave no ballot");
                    Cast::Failed { error }
                }
                Some(Ok((decision, reason))) => {
                    let ballot = m.key.sign(&report, decision, &reason);
                    ballots.push(ballot.clone());
                    Cast::Ballot { ballot }
                }
            };
            voters.push(VoterOutcome { name, voter: m.key.id(), cast });
        }
        let store = self.store.clone();
        let quorum = self.quorum.clone();
        let tally = {
            let digest = digest.clone();
            blocking(move || -> Result<Tally, StoreError> {
                for b in &ballots {
                    store.record_ballot(b)?;
                }
                decided(&store, &quorum, &digest)
            })
            .await?
        };
        tracing::info!(digest = %digest, outcome = ?tally.outcome, k = tally.k, n = tally.n, "breach judged");
        Ok(Judgement { digest, tally, voters })
    }
}

/// The tally of a report this judge recorded.
fn decided(store: &CoalitionStore, quorum: &Quorum, digest: &str) -> Result<Tally, StoreError> {
    store.decide(quorum, digest)?.ok_or_else(|| StoreError::Corrupt(format!("report {digest} vanished from the store")))
}

/// SQLite writes with a full fsync: off the async workers.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, StoreError> + Send + 'static) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| StoreError::Corrupt(format!("a store task failed: {e}")))?
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && name.len() <= 128
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.".contains(c))
}

/// The key of voter `name` in `dir`, made (mode 0600) if it has none yet.
pub fn load_or_create_key(dir: &Path, name: &str) -> Result<VoterKey, JudgeError> {
    if !valid_name(name) {
        return Err(JudgeError::BadVoterName(name.to_owned()));
    }
    let path = dir.join(format!("{name}.key"));
    let key_error = |reason: String| JudgeError::Key { path: path.clone(), reason };
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let seed: [u8; 32] = hex::decode(text.trim())
                .ok()
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| key_error("expected 64 hex characters (an ed25519 seed)".into()))?;
            Ok(VoterKey::from_seed(seed))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = VoterKey::generate().map_err(|e| key_error(format!("no randomness for a new key: {e}")))?;
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            let mut file = options.open(&path).map_err(|e| key_error(e.to_string()))?;
            writeln!(file, "{}", hex::encode(key.seed())).map_err(|e| key_error(e.to_string()))?;
            file.sync_all().map_err(|e| key_error(e.to_string()))?;
            tracing::info!(voter = name, id = %key.id().0, path = %path.display(), "made a ballot key");
            Ok(key)
        }
        Err(e) => Err(key_error(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coalition::Outcome;

    /// A scripted voter: answers `answer` after `delay`.
    struct Scripted {
        name: &'static str,
        answer: Result<Decision, &'static str>,
        delay: Duration,
    }

    impl Voter for Scripted {
        fn name(&self) -> &str {
            self.name
        }
        fn vote(&self, _report: &BreachReport) -> Result<(Decision, String), String> {
            std::thread::sleep(self.delay);
            self.answer.map(|d| (d, format!("{} says {}", self.name, d.as_str()))).map_err(str::to_owned)
        }
    }

    fn voter(name: &'static str, answer: Result<Decision, &'static str>, delay_ms: u64) -> Arc<dyn Voter> {
        Arc::new(Scripted { name, answer, delay: Duration::from_millis(delay_ms) })
    }

    fn report() -> BreachReport {
        BreachReport {
            pool_id: "pool-1".into(),
            operator: "0x00000000000000000000000000000000000000aa".into(),
            kind: BreachKind::WrongOutput,
            evidence: "{}".into(),
            observed_at_ms: 1,
        }
    }

    fn config(deadline_ms: u64) -> JudgeConfig {
        JudgeConfig { k: None, deadline: Duration::from_millis(deadline_ms) }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_late_voter_casts_nothing_and_is_not_waited_for() {
        let dir = tempfile::tempdir().unwrap();
        let slow = 20_000;
        let judge = Judge::open(
            dir.path(),
            vec![voter("a", Ok(Decision::Eject), 0), voter("b", Ok(Decision::Eject), 0), voter("late", Ok(Decision::Dismiss), slow)],
            config(300),
        )
        .unwrap();
        let started = std::time::Instant::now();
        let j = judge.judge(report()).await.unwrap();
        // The sleeper holds its thread for 20 s; the judge answered at its deadline, long before.
        assert!(started.elapsed() < Duration::from_millis(slow / 2), "{:?}", started.elapsed());
        assert_eq!(j.tally.outcome, Outcome::Decided(Decision::Eject));
        assert_eq!(j.voters[2].cast, Cast::Late);
        assert_eq!(j.tally.counted.len(), 2);
        assert_eq!(judge.store().ballots(&j.digest).unwrap().len(), 2);
        assert_eq!(judge.store().verdict(&j.digest).unwrap(), Some(Decision::Eject));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_eject_with_a_failed_and_a_late_voter_is_no_quorum() {
        let dir = tempfile::tempdir().unwrap();
        let judge = Judge::open(
            dir.path(),
            vec![voter("a", Ok(Decision::Eject), 0), voter("broken", Err("trapped"), 0), voter("late", Ok(Decision::Eject), 20_000)],
            config(300),
        )
        .unwrap();
        let j = judge.judge(report()).await.unwrap();
        assert_eq!(j.tally.outcome, Outcome::NoQuorum);
        assert_eq!(j.verdict(), None);
        assert_eq!(j.voters[1].cast, Cast::Failed { error: "trapped".into() });
        assert_eq!(judge.store().verdict(&j.digest).unwrap(), None);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn keys_persist_with_mode_0600_and_a_decided_report_keeps_its_verdict() {
        let dir = tempfile::tempdir().unwrap();
        let voters = || vec![voter("a", Ok(Decision::Eject), 0), voter("b", Ok(Decision::Eject), 0), voter("c", Ok(Decision::Dismiss), 0)];
        let first = Judge::open(dir.path(), voters(), config(5_000)).unwrap();
        let ids = first.voters();
        assert_eq!(first.judge(report()).await.unwrap().verdict(), Some(Decision::Eject));
        drop(first);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("voter-keys/a.key")).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // Restarted with voters that would now all dismiss: same identities, and the verdict stands.
        let dismissing = vec![voter("a", Ok(Decision::Dismiss), 0), voter("b", Ok(Decision::Dismiss), 0), voter("c", Ok(Decision::Dismiss), 0)];
        let again = Judge::open(dir.path(), dismissing, config(5_000)).unwrap();
        assert_eq!(again.voters(), ids);
        let j = again.judge(report()).await.unwrap();
        assert!(j.voters.is_empty(), "nobody is asked again");
        assert_eq!(again.store().verdict(&j.digest).unwrap(), Some(Decision::Eject));
    }

    #[test]
    fn bad_configurations_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let dup = vec![voter("a", Ok(Decision::Eject), 0), voter("a", Ok(Decision::Eject), 0)];
        assert!(matches!(Judge::open(dir.path(), dup, config(1)), Err(JudgeError::DuplicateVoter(_))));
        let two = vec![voter("a", Ok(Decision::Eject), 0), voter("b", Ok(Decision::Eject), 0), voter("c", Ok(Decision::Eject), 0)];
        let k1 = JudgeConfig { k: Some(1), ..config(1) };
        assert!(matches!(Judge::open(dir.path(), two, k1), Err(JudgeError::Quorum(QuorumError::BadThreshold { k: 1, n: 3 }))));
        assert!(matches!(Judge::open(dir.path(), vec![voter("../x", Ok(Decision::Eject), 0)], config(1)), Err(JudgeError::BadVoterName(_))));
        std::fs::write(dir.path().join("voter-keys/bad.key"), "not hex").unwrap();
        assert!(matches!(Judge::open(dir.path(), vec![voter("bad", Ok(Decision::Eject), 0)], config(1)), Err(JudgeError::Key { .. })));
    }
}
