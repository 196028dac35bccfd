//! Fault drills: a worker that misbehaves on purpose, so the defences against a dishonest operator
//! (output audits, coalition votes, ejection) can be exercised end to end. Hidden from `--help`; a
//! worker running one says so loudly in its log. Never run one in a pool that pays: the audits will
//! convict its operator, which is the point.

use std::fmt;

/// One drill.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// On the exit shard: from the `N`-th token the exit samples for a request on (counted from 0,
    /// replayed positions of a resumed request included), emit a different valid token instead.
    WrongTokensAfter(u64),
}

impl Fault {
    /// Parses the flag's two values, `KIND N` (`wrong-tokens-after 3`).
    pub fn parse(values: &[String]) -> Result<Self, String> {
        match values {
            [kind, n] if kind == "wrong-tokens-after" => n
                .parse()
                .map(Fault::WrongTokensAfter)
                .map_err(|e| format!("--fault wrong-tokens-after takes a token count, not {n:?}: {e}")),
            [kind, _] => Err(format!("unknown fault drill {kind:?}; the one there is: wrong-tokens-after N")),
            _ => Err("--fault takes two values: wrong-tokens-after N".into()),
        }
    }

    /// The token to emit in place of `sampled`, the `index`-th token sampled for its request, from a
    /// vocabulary of `vocab`: the next id (wrapping), so it is always valid and always different.
    pub fn token(self, index: u64, sampled: u32, vocab: usize) -> u32 {
        match self {
            Fault::WrongTokensAfter(n) if index >= n && vocab > 1 => ((sampled as u64 + 1) % vocab as u64) as u32,
            Fault::WrongTokensAfter(_) => sampled,
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::WrongTokensAfter(n) => write!(f, "wrong-tokens-after {n}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrong_tokens_start_at_the_nth_and_stay_valid() {
        let fault = Fault::parse(&["wrong-tokens-after".into(), "2".into()]).expect("parses");
        assert_eq!(fault, Fault::WrongTokensAfter(2));
        assert_eq!(fault.to_string(), "wrong-tokens-after 2");
        let out: Vec<u32> = (0..5).map(|i| fault.token(i, 10, 100)).collect();
        assert_eq!(out, [10, 10, 11, 11, 11]);
        assert_eq!(fault.token(3, 99, 100), 0, "wraps inside the vocabulary");
        for bad in [vec!["wrong-tokens-after".to_string(), "x".into()], vec!["slow".into(), "1".into()], vec!["x".into()]] {
            assert!(Fault::parse(&bad).is_err(), "{bad:?}");
        }
    }
}
