//! Coalition votes on a reported breach: each coalition-voter plugin returns a ballot (eject, warn,
//! dismiss or abstain, with a reason); the host signs it with that voter's ed25519 key (host-held, one
//! per voter; the plugin never sees it) over the breach report's digest, and the tally counts at most
//! one ballot per registered voter. A decision other than abstain wins when k of the n voters chose
//! it; k must be a strict majority (2k > n), so two decisions can never both win, and with k ≤ n − 1
//! one crashing or dissenting voter can neither block an outcome the others agree on nor, with k ≥ 2,
//! force one alone. Reports, ballots and verdicts are kept in SQLite (`CoalitionStore`).
//!
//! ed25519 rather than secp256k1: it is the curve of the workers' peer ids, ballots are checked by the
//! host and not on chain (Coalition.sol counts its own `vote` transactions from voters' accounts), and
//! the signatures are deterministic.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::Mutex;

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Domain separation: a ballot signature can never be mistaken for any other ed25519 signature the
/// host makes (worker handshakes use the same curve).
const BALLOT_DOMAIN: &[u8] = b"computepool/coalition-ballot/v1\0";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Decision {
    Eject,
    Warn,
    Dismiss,
    Abstain,
}

impl Decision {
    pub const ALL: [Decision; 4] = [Self::Eject, Self::Warn, Self::Dismiss, Self::Abstain];
    fn byte(self) -> u8 {
        match self {
            Self::Eject => 1,
            Self::Warn => 2,
            Self::Dismiss => 3,
            Self::Abstain => 4,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Eject => "eject",
            Self::Warn => "warn",
            Self::Dismiss => "dismiss",
            Self::Abstain => "abstain",
        }
    }
    fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|d| d.as_str() == s)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BreachKind {
    MissedHeartbeat,
    WrongOutput,
    TooSlow,
    /// A stream cut mid-request.
    StreamCut,
    Other,
}

/// What the voters judge (the WIT's breach-report).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BreachReport {
    pub pool_id: String,
    /// The accused operator's address (0x-prefixed hex).
    pub operator: String,
    pub kind: BreachKind,
    /// Evidence as JSON text, kept byte for byte (its digest is what ballots sign).
    pub evidence: String,
    pub observed_at_ms: u64,
}

impl BreachReport {
    /// SHA-256 over the report's fields, each length-prefixed, so no two reports share a digest.
    pub fn digest(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        for field in [self.pool_id.as_bytes(), self.operator.as_bytes(), kind_str(self.kind).as_bytes(), self.evidence.as_bytes()] {
            h.update((field.len() as u64).to_be_bytes());
            h.update(field);
        }
        h.update(self.observed_at_ms.to_be_bytes());
        h.finalize().into()
    }
}

fn kind_str(k: BreachKind) -> &'static str {
    match k {
        BreachKind::MissedHeartbeat => "missed-heartbeat",
        BreachKind::WrongOutput => "wrong-output",
        BreachKind::TooSlow => "too-slow",
        BreachKind::StreamCut => "stream-cut",
        BreachKind::Other => "other",
    }
}

/// A voter's identity: its ed25519 public key, hex.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct VoterId(pub String);

impl VoterId {
    fn verifying_key(&self) -> Option<VerifyingKey> {
        let bytes: [u8; 32] = hex::decode(&self.0).ok()?.try_into().ok()?;
        VerifyingKey::from_bytes(&bytes).ok()
    }
}

/// A voter's ballot key, held by the host (the plugin returns a decision; the host signs it).
pub struct VoterKey {
    key: SigningKey,
}

impl VoterKey {
    /// A fresh key from the operating system's random source.
    pub fn generate() -> Result<Self, getrandom::Error> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed)?;
        Ok(Self::from_seed(seed))
    }

    pub fn from_seed(seed: [u8; 32]) -> Self {
        Self { key: SigningKey::from_bytes(&seed) }
    }

    /// The 32-byte seed, for the host's key file (mode 0600, like the worker keys).
    pub fn seed(&self) -> [u8; 32] {
        self.key.to_bytes()
    }

    pub fn id(&self) -> VoterId {
        VoterId(hex::encode(self.key.verifying_key().to_bytes()))
    }

    pub fn sign(&self, report: &BreachReport, decision: Decision, reason: &str) -> SignedBallot {
        let breach = report.digest();
        let signature = self.key.sign(&ballot_message(&breach, decision, reason));
        SignedBallot {
            voter: self.id(),
            breach: hex::encode(breach),
            decision,
            reason: reason.to_owned(),
            signature: hex::encode(signature.to_bytes()),
        }
    }
}

fn ballot_message(breach: &[u8; 32], decision: Decision, reason: &str) -> Vec<u8> {
    let mut m = Vec::with_capacity(BALLOT_DOMAIN.len() + 33 + reason.len());
    m.extend_from_slice(BALLOT_DOMAIN);
    m.extend_from_slice(breach);
    m.push(decision.byte());
    m.extend_from_slice(reason.as_bytes());
    m
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedBallot {
    pub voter: VoterId,
    /// Hex digest of the report voted on.
    pub breach: String,
    pub decision: Decision,
    pub reason: String,
    /// Hex ed25519 signature over the domain, the digest, the decision and the reason.
    pub signature: String,
}

impl SignedBallot {
    fn verify(&self) -> bool {
        let (Some(key), Ok(breach), Ok(sig)) = (self.voter.verifying_key(), hex::decode(&self.breach), hex::decode(&self.signature))
        else {
            return false;
        };
        let (Ok(breach), Ok(sig)) = (<[u8; 32]>::try_from(breach), <[u8; 64]>::try_from(sig)) else { return false };
        key.verify_strict(&ballot_message(&breach, self.decision, &self.reason), &Signature::from_bytes(&sig)).is_ok()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuorumError {
    #[error("a coalition needs at least one voter")]
    NoVoters,
    #[error("voter {0} is listed twice")]
    DuplicateVoter(String),
    #[error("voter id {0:?} is not a hex ed25519 public key")]
    BadVoterId(String),
    #[error("k = {k} of n = {n}: k must be between 1 and n and a strict majority (2k > n), so two decisions cannot both win")]
    BadThreshold { k: u32, n: u32 },
}

/// The registered voters and how many must agree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Quorum {
    k: u32,
    voters: Vec<VoterId>,
}

impl Quorum {
    pub fn new(k: u32, voters: Vec<VoterId>) -> Result<Self, QuorumError> {
        if voters.is_empty() {
            return Err(QuorumError::NoVoters);
        }
        let mut seen = HashSet::new();
        for v in &voters {
            if v.verifying_key().is_none() {
                return Err(QuorumError::BadVoterId(v.0.clone()));
            }
            if !seen.insert(v) {
                return Err(QuorumError::DuplicateVoter(v.0.clone()));
            }
        }
        let n = voters.len() as u32;
        if k == 0 || k > n || 2 * k <= n {
            return Err(QuorumError::BadThreshold { k, n });
        }
        Ok(Self { k, voters })
    }
    pub fn k(&self) -> u32 {
        self.k
    }
    pub fn n(&self) -> u32 {
        self.voters.len() as u32
    }
}

/// Why a ballot was not counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Rejection {
    UnknownVoter,
    BadSignature,
    /// Signed for another report.
    WrongBreach,
    /// The same ballot again: the first copy counts.
    Duplicate,
    /// The voter signed two different ballots on this report: none of its ballots count.
    Equivocation,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "outcome", content = "decision")]
pub enum Outcome {
    /// k voters agreed on this decision (never `abstain`).
    Decided(Decision),
    /// No decision reached k (voters missing, split, or abstaining).
    NoQuorum,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Tally {
    pub outcome: Outcome,
    pub k: u32,
    pub n: u32,
    /// The counted ballot of each voter that has one.
    pub counted: BTreeMap<VoterId, Decision>,
    /// Index into the ballots given, and why it was not counted.
    pub rejected: Vec<(usize, Rejection)>,
}

impl Tally {
    pub fn votes_for(&self, d: Decision) -> u32 {
        self.counted.values().filter(|x| **x == d).count() as u32
    }
}

/// Counts `ballots` on `report` under `quorum`. Pure; order of the ballots does not matter.
pub fn tally(quorum: &Quorum, report: &BreachReport, ballots: &[SignedBallot]) -> Tally {
    let digest = hex::encode(report.digest());
    let registered: HashSet<&VoterId> = quorum.voters.iter().collect();
    let mut rejected = Vec::new();
    // Valid ballots per voter, distinct by content.
    let mut by_voter: HashMap<&VoterId, Vec<(usize, &SignedBallot)>> = HashMap::new();
    for (i, b) in ballots.iter().enumerate() {
        if !registered.contains(&b.voter) {
            rejected.push((i, Rejection::UnknownVoter));
        } else if !b.verify() {
            rejected.push((i, Rejection::BadSignature));
        } else if b.breach != digest {
            rejected.push((i, Rejection::WrongBreach));
        } else {
            by_voter.entry(&b.voter).or_default().push((i, b));
        }
    }
    let mut counted = BTreeMap::new();
    for (voter, list) in by_voter {
        let first = list[0].1;
        if list.iter().any(|(_, b)| b.decision != first.decision || b.reason != first.reason) {
            rejected.extend(list.iter().map(|(i, _)| (*i, Rejection::Equivocation)));
            continue;
        }
        counted.insert(voter.clone(), first.decision);
        rejected.extend(list[1..].iter().map(|(i, _)| (*i, Rejection::Duplicate)));
    }
    rejected.sort_unstable_by_key(|(i, _)| *i);
    let winner = [Decision::Eject, Decision::Warn, Decision::Dismiss]
        .into_iter()
        .find(|d| counted.values().filter(|x| *x == d).count() as u32 >= quorum.k);
    Tally {
        outcome: winner.map_or(Outcome::NoQuorum, Outcome::Decided),
        k: quorum.k,
        n: quorum.n(),
        counted,
        rejected,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("coalition store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("corrupt coalition store: {0}")]
    Corrupt(String),
}

/// Reports, every ballot received (counted or not) and verdicts, so a verdict can be audited later.
pub struct CoalitionStore {
    conn: Mutex<Connection>,
}

impl CoalitionStore {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS breach_reports (
                digest TEXT PRIMARY KEY, pool_id TEXT NOT NULL, operator TEXT NOT NULL, report TEXT NOT NULL,
                received_at_ms INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS ballots (
                digest TEXT NOT NULL REFERENCES breach_reports (digest), voter TEXT NOT NULL, ballot TEXT NOT NULL,
                signature TEXT NOT NULL, received_at_ms INTEGER NOT NULL, PRIMARY KEY (digest, voter, signature));
             CREATE TABLE IF NOT EXISTS verdicts (
                digest TEXT PRIMARY KEY REFERENCES breach_reports (digest), tally TEXT NOT NULL,
                decided_at_ms INTEGER NOT NULL);",
        )?;
        Ok(Self { conn: Mutex::new(conn) })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps `report`; returns its digest (hex).
    pub fn record_report(&self, report: &BreachReport) -> Result<String, StoreError> {
        let digest = hex::encode(report.digest());
        let json = serde_json::to_string(report).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.conn().execute(
            "INSERT OR IGNORE INTO breach_reports (digest, pool_id, operator, report, received_at_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![digest, report.pool_id, report.operator, json, crate::log::now_ms() as i64],
        )?;
        Ok(digest)
    }

    /// Keeps a ballot as received, valid or not (the tally decides what counts).
    pub fn record_ballot(&self, ballot: &SignedBallot) -> Result<(), StoreError> {
        let json = serde_json::to_string(ballot).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.conn().execute(
            "INSERT OR IGNORE INTO ballots (digest, voter, ballot, signature, received_at_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![ballot.breach, ballot.voter.0, json, ballot.signature, crate::log::now_ms() as i64],
        )?;
        Ok(())
    }

    pub fn report(&self, digest: &str) -> Result<Option<BreachReport>, StoreError> {
        let json: Option<String> = self
            .conn()
            .query_row("SELECT report FROM breach_reports WHERE digest = ?1", [digest], |r| r.get(0))
            .optional()?;
        json.map(|j| serde_json::from_str(&j).map_err(|e| StoreError::Corrupt(e.to_string()))).transpose()
    }

    pub fn ballots(&self, digest: &str) -> Result<Vec<SignedBallot>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT ballot FROM ballots WHERE digest = ?1 ORDER BY received_at_ms, rowid")?;
        let rows = stmt.query_map([digest], |r| r.get::<_, String>(0))?;
        rows.map(|j| serde_json::from_str(&j?).map_err(|e| StoreError::Corrupt(e.to_string()))).collect()
    }

    /// Tallies the stored ballots on the stored report and keeps the verdict (the first one decided
    /// stays: a later ballot cannot reverse a verdict already acted on).
    pub fn decide(&self, quorum: &Quorum, digest: &str) -> Result<Option<Tally>, StoreError> {
        let Some(report) = self.report(digest)? else { return Ok(None) };
        let t = tally(quorum, &report, &self.ballots(digest)?);
        if t.outcome != Outcome::NoQuorum {
            let json = serde_json::to_string(&t).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            self.conn().execute(
                "INSERT OR IGNORE INTO verdicts (digest, tally, decided_at_ms) VALUES (?1, ?2, ?3)",
                params![digest, json, crate::log::now_ms() as i64],
            )?;
        }
        Ok(Some(t))
    }

    /// The verdict kept for `digest`, as its decision.
    pub fn verdict(&self, digest: &str) -> Result<Option<Decision>, StoreError> {
        let json: Option<String> =
            self.conn().query_row("SELECT tally FROM verdicts WHERE digest = ?1", [digest], |r| r.get(0)).optional()?;
        let Some(json) = json else { return Ok(None) };
        let v: serde_json::Value = serde_json::from_str(&json).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        v["outcome"]["decision"].as_str().and_then(Decision::parse).map(Some).ok_or_else(|| StoreError::Corrupt(json))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn report() -> BreachReport {
        BreachReport {
            pool_id: "pool-1".into(),
            operator: "0x00000000000000000000000000000000000000aa".into(),
            kind: BreachKind::WrongOutput,
            evidence: r#"{"request":"r1","expected":[1,2,3],"got":[1,2,4]}"#.into(),
            observed_at_ms: 1_700_000_000_000,
        }
    }

    fn voters(n: usize) -> Vec<VoterKey> {
        (0..n).map(|i| VoterKey::from_seed([i as u8 + 1; 32])).collect()
    }

    fn quorum(k: u32, keys: &[VoterKey]) -> Quorum {
        Quorum::new(k, keys.iter().map(|v| v.id()).collect()).unwrap()
    }

    #[test]
    fn two_of_three_eject_with_one_dissenting_or_crashed() {
        let keys = voters(3);
        let q = quorum(2, &keys);
        let r = report();
        let dissent = vec![
            keys[0].sign(&r, Decision::Eject, "tokens differ at position 2"),
            keys[1].sign(&r, Decision::Eject, "replica disagrees"),
            keys[2].sign(&r, Decision::Dismiss, "looks fine to me"),
        ];
        let t = tally(&q, &r, &dissent);
        assert_eq!(t.outcome, Outcome::Decided(Decision::Eject));
        assert_eq!((t.votes_for(Decision::Eject), t.votes_for(Decision::Dismiss)), (2, 1));
        let crashed = &dissent[..2];
        assert_eq!(tally(&q, &r, crashed).outcome, Outcome::Decided(Decision::Eject));
        // One voter alone, however many times it votes, decides nothing.
        let alone = vec![dissent[0].clone(), dissent[0].clone(), dissent[0].clone()];
        let t = tally(&q, &r, &alone);
        assert_eq!(t.outcome, Outcome::NoQuorum);
        assert_eq!(t.rejected, vec![(1, Rejection::Duplicate), (2, Rejection::Duplicate)]);
    }

    #[test]
    fn forged_wrong_breach_unknown_and_equivocating_ballots_do_not_count() {
        let keys = voters(3);
        let q = quorum(2, &keys);
        let r = report();
        let outsider = VoterKey::from_seed([99; 32]);
        let mut forged = keys[0].sign(&r, Decision::Eject, "x");
        forged.voter = keys[1].id(); // voter 0 claims to be voter 1
        let mut other = report();
        other.observed_at_ms += 1;
        let ballots = vec![
            forged,
            outsider.sign(&r, Decision::Eject, "me too"),
            keys[2].sign(&other, Decision::Eject, "old report"),
            keys[0].sign(&r, Decision::Eject, "a"),
            keys[0].sign(&r, Decision::Dismiss, "b"),
        ];
        let t = tally(&q, &r, &ballots);
        assert_eq!(t.outcome, Outcome::NoQuorum);
        assert!(t.counted.is_empty());
        assert_eq!(
            t.rejected,
            vec![
                (0, Rejection::BadSignature),
                (1, Rejection::UnknownVoter),
                (2, Rejection::WrongBreach),
                (3, Rejection::Equivocation),
                (4, Rejection::Equivocation)
            ]
        );
    }

    #[test]
    fn thresholds_must_be_strict_majorities() {
        let ids: Vec<_> = voters(4).iter().map(|v| v.id()).collect();
        assert!(matches!(Quorum::new(2, ids.clone()), Err(QuorumError::BadThreshold { k: 2, n: 4 })));
        assert!(matches!(Quorum::new(5, ids.clone()), Err(QuorumError::BadThreshold { .. })));
        assert!(Quorum::new(3, ids.clone()).is_ok());
        let mut dup = ids.clone();
        dup.push(ids[0].clone());
        assert!(matches!(Quorum::new(3, dup), Err(QuorumError::DuplicateVoter(_))));
        assert!(matches!(Quorum::new(1, vec![VoterId("zz".into())]), Err(QuorumError::BadVoterId(_))));
        assert!(matches!(Quorum::new(1, vec![]), Err(QuorumError::NoVoters)));
    }

    #[test]
    fn the_store_keeps_reports_ballots_and_the_first_verdict() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("coalition.db");
        let keys = voters(3);
        let q = quorum(2, &keys);
        let r = report();
        let digest = {
            let store = CoalitionStore::open(&path).unwrap();
            let digest = store.record_report(&r).unwrap();
            store.record_ballot(&keys[0].sign(&r, Decision::Eject, "a")).unwrap();
            assert_eq!(store.decide(&q, &digest).unwrap().unwrap().outcome, Outcome::NoQuorum);
            assert_eq!(store.verdict(&digest).unwrap(), None);
            store.record_ballot(&keys[1].sign(&r, Decision::Eject, "b")).unwrap();
            digest
        };
        let store = CoalitionStore::open(&path).unwrap();
        assert_eq!(store.report(&digest).unwrap().unwrap(), r);
        assert_eq!(store.decide(&q, &digest).unwrap().unwrap().outcome, Outcome::Decided(Decision::Eject));
        // Later dissent is kept as evidence but does not reverse the verdict.
        store.record_ballot(&keys[2].sign(&r, Decision::Dismiss, "c")).unwrap();
        assert_eq!(store.ballots(&digest).unwrap().len(), 3);
        assert_eq!(store.verdict(&digest).unwrap(), Some(Decision::Eject));
    }

    fn decision() -> impl Strategy<Value = Decision> {
        prop::sample::select(Decision::ALL.to_vec())
    }

    /// What one faulty voter does: crash (nothing), vote anything, equivocate, repeat itself, or
    /// forge ballots in the names of others with its own key.
    #[derive(Debug, Clone)]
    enum Fault {
        Crash,
        Vote(Decision),
        Equivocate(Decision, Decision),
        Repeat(Decision, usize),
        Forge(Decision),
    }

    fn fault() -> impl Strategy<Value = Fault> {
        prop_oneof![
            Just(Fault::Crash),
            decision().prop_map(Fault::Vote),
            (decision(), decision()).prop_map(|(a, b)| Fault::Equivocate(a, b)),
            (decision(), 2usize..5).prop_map(|(d, n)| Fault::Repeat(d, n)),
            decision().prop_map(Fault::Forge),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        /// With honest voters only, a decision wins iff k voters chose it; ballot order is irrelevant.
        #[test]
        fn outcome_is_exactly_the_decision_with_k_votes(
            choices in prop::collection::vec(prop::option::of(decision()), 1..8),
            k_pick in 0u32..8,
            seed in any::<u64>(),
        ) {
            let n = choices.len() as u32;
            let k = n / 2 + 1 + k_pick % (n - n / 2);
            let keys = voters(choices.len());
            let q = quorum(k, &keys);
            let r = report();
            let mut ballots: Vec<_> = keys.iter().zip(&choices)
                .filter_map(|(key, c)| c.map(|d| key.sign(&r, d, "why")))
                .collect();
            let expected = [Decision::Eject, Decision::Warn, Decision::Dismiss].into_iter()
                .find(|d| choices.iter().filter(|c| **c == Some(*d)).count() as u32 >= k);
            let t = tally(&q, &r, &ballots);
            prop_assert_eq!(t.outcome, expected.map_or(Outcome::NoQuorum, Outcome::Decided));
            prop_assert!(t.rejected.is_empty());
            // Shuffle deterministically from the seed.
            let len = ballots.len();
            for i in (1..len).rev() {
                ballots.swap(i, (seed.wrapping_mul(i as u64 + 7) % (i as u64 + 1)) as usize);
            }
            prop_assert_eq!(tally(&q, &r, &ballots).outcome, t.outcome);
        }

        /// One faulty voter among n: it cannot block what k honest voters agree on, and it adds at
        /// most one vote to any decision, so it cannot force one the honest voters did not bring to k − 1.
        #[test]
        fn one_faulty_voter_can_neither_block_nor_force(
            honest in prop::collection::vec(prop::option::of(decision()), 2..7),
            f in fault(),
        ) {
            let n = honest.len() + 1;
            let k = (n / 2 + 1) as u32;
            let keys = voters(n);
            let q = quorum(k, &keys);
            let r = report();
            let faulty = &keys[n - 1];
            let mut ballots: Vec<_> = keys.iter().zip(&honest)
                .filter_map(|(key, c)| c.map(|d| key.sign(&r, d, "honest")))
                .collect();
            match f {
                Fault::Crash => {}
                Fault::Vote(d) => ballots.push(faulty.sign(&r, d, "faulty")),
                Fault::Equivocate(a, b) => {
                    ballots.push(faulty.sign(&r, a, "one"));
                    ballots.push(faulty.sign(&r, b, "two"));
                }
                Fault::Repeat(d, times) => ballots.extend(std::iter::repeat_n(faulty.sign(&r, d, "again"), times)),
                Fault::Forge(d) => {
                    for key in &keys[..n - 1] {
                        let mut b = faulty.sign(&r, d, "forged");
                        b.voter = key.id();
                        ballots.push(b);
                    }
                }
            }
            let t = tally(&q, &r, &ballots);
            for d in [Decision::Eject, Decision::Warn, Decision::Dismiss] {
                let honest_votes = honest.iter().filter(|c| **c == Some(d)).count() as u32;
                prop_assert!(t.votes_for(d) <= honest_votes + 1);
                if honest_votes >= k {
                    prop_assert_eq!(t.outcome, Outcome::Decided(d), "blocked");
                }
                if t.outcome == Outcome::Decided(d) {
                    prop_assert!(honest_votes + 1 >= k, "forced");
                }
            }
            for key in &keys[..n - 1] {
                let counted = t.counted.get(&key.id()).copied();
                let own = honest[keys.iter().position(|x| x.id() == key.id()).unwrap()];
                prop_assert_eq!(counted, own, "an honest voter's counted ballot is its own");
            }
        }
    }
}
