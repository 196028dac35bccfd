//! The session state machine: the states, and which transitions are legal. Pure, so it is tested alone;
//! the store refuses every transition this table does not allow.
//!
//! ```text
//!            settled               first request flows         last request stopped
//!  quoted ───────────▶ paid ──────────────────────▶ streaming ─────────────────────▶ idle
//!    │                  │                            │   ▲                            │
//!    │ settle failed    │ close                      │   └──── next request flows ────┤
//!    ▼                  ▼                            │                                │ close
//!  closed ◀─────────────┴────────────────────────────┼────────────────────────────────┘
//!    ▲                                               │ a stop could not be made (also from paid or
//!    │                                               ▼ idle: a start whose outcome is unknown)
//!    └──────────────── close (operator) ────────── breached
//! ```
//!
//! Legal: quoted→paid, quoted→closed, paid→streaming, paid→closed, paid→breached, streaming→idle,
//! streaming→breached, idle→streaming, idle→closed, idle→breached, breached→closed. Everything else is
//! [`super::SessionError::IllegalTransition`].

use std::fmt;
use std::str::FromStr;

/// Where a payment session stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionState {
    /// A verified voucher is being settled (the intent is written, the facilitator not yet answered). The
    /// session has no balance and admits nothing. Only verified vouchers get here: an unpaid request (a
    /// 402) writes no row at all.
    Quoted,
    /// At least one voucher settled; balance credited; nothing has streamed yet.
    Paid,
    /// At least one of its requests is flowing (the pool's stream includes it).
    Streaming,
    /// It has streamed before and nothing of it flows now; the rest of the balance is available.
    Idle,
    /// Finished: admits nothing and takes no credit. A new voucher from the payer opens a new session.
    Closed,
    /// A stream that included (or may have included: a start whose outcome is unknown) one of its ended
    /// requests could not be stopped (the rail kept failing after the retries), so money may be flowing
    /// that no request is using. It admits nothing; the meter still
    /// records the exact cost once the rail answers (a later retry or `recover`), and an operator closes it.
    Breached,
}

impl SessionState {
    pub const ALL: [SessionState; 6] = [
        Self::Quoted,
        Self::Paid,
        Self::Streaming,
        Self::Idle,
        Self::Closed,
        Self::Breached,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Quoted => "quoted",
            Self::Paid => "paid",
            Self::Streaming => "streaming",
            Self::Idle => "idle",
            Self::Closed => "closed",
            Self::Breached => "breached",
        }
    }

    /// Whether `self → to` is a legal transition (a state never "transitions" to itself).
    pub fn can_become(self, to: SessionState) -> bool {
        use SessionState::*;
        matches!(
            (self, to),
            (Quoted, Paid)
                | (Quoted, Closed)
                | (Paid, Streaming)
                | (Paid, Closed)
                | (Paid, Breached)
                | (Streaming, Idle)
                | (Streaming, Breached)
                | (Idle, Streaming)
                | (Idle, Closed)
                | (Idle, Breached)
                | (Breached, Closed)
        )
    }

    /// Whether a new request may reserve against the balance.
    pub fn admits(self) -> bool {
        matches!(self, Self::Paid | Self::Streaming | Self::Idle)
    }

    /// Whether a settled voucher may be credited (a payer's live session takes further vouchers).
    pub fn takes_credit(self) -> bool {
        matches!(self, Self::Quoted | Self::Paid | Self::Streaming | Self::Idle)
    }
}

impl fmt::Display for SessionState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SessionState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| format!("unknown session state {s:?}"))
    }
}

/// Where one metered request stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestState {
    /// Its worst case is reserved; it does not flow yet (waiting for its first token).
    Admitted,
    /// The pool's stream includes it, since its start receipt's `effective_at_s`.
    Streaming,
    /// It ended but the rate change that removes it has not been confirmed by the rail yet.
    Stopping,
    /// It ended normally (end of stream, client disconnect, deadline); its cost is drawn.
    Ended,
    /// It ended by an error, a shard fault or an orchestrator restart; its cost (the seconds served) is drawn.
    Failed,
}

impl RequestState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Admitted => "admitted",
            Self::Streaming => "streaming",
            Self::Stopping => "stopping",
            Self::Ended => "ended",
            Self::Failed => "failed",
        }
    }

    pub fn is_final(self) -> bool {
        matches!(self, Self::Ended | Self::Failed)
    }
}

impl FromStr for RequestState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        [Self::Admitted, Self::Streaming, Self::Stopping, Self::Ended, Self::Failed]
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| format!("unknown request state {s:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_transition_table_is_exactly_the_documented_one() {
        use SessionState::*;
        let legal: Vec<(SessionState, SessionState)> = SessionState::ALL
            .into_iter()
            .flat_map(|from| SessionState::ALL.into_iter().map(move |to| (from, to)))
            .filter(|(from, to)| from.can_become(*to))
            .collect();
        assert_eq!(
            legal,
            vec![
                (Quoted, Paid),
                (Quoted, Closed),
                (Paid, Streaming),
                (Paid, Closed),
                (Paid, Breached),
                (Streaming, Idle),
                (Streaming, Breached),
                (Idle, Streaming),
                (Idle, Closed),
                (Idle, Breached),
                (Breached, Closed),
            ]
        );
        // Terminal: nothing leaves closed.
        assert!(SessionState::ALL.into_iter().all(|to| !Closed.can_become(to)));
    }

    #[test]
    fn states_round_trip_through_their_names() {
        for state in SessionState::ALL {
            assert_eq!(state.as_str().parse::<SessionState>(), Ok(state));
        }
        assert!("open".parse::<SessionState>().is_err());
    }
}
