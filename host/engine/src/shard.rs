//! Layer ranges: which part of a model one shard runs.

use std::fmt;
use std::str::FromStr;

use crate::error::{EngineError, Result};

/// The half-open layer range `[start, end)` of a model with `num_layers` layers. The shard that starts
/// at 0 is the entry (it owns the embedding); the one that ends at `num_layers` is the exit (final norm
/// and lm_head). The whole model is `[0, L)`, both at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LayerRange {
    pub start: usize,
    pub end: usize,
    pub num_layers: usize,
}

impl LayerRange {
    pub fn new(start: usize, end: usize, num_layers: usize) -> Result<Self> {
        if start >= end || end > num_layers {
            return Err(EngineError::InvalidRange { range: format!("{start}..{end}"), layers: num_layers });
        }
        Ok(Self { start, end, num_layers })
    }

    pub fn full(num_layers: usize) -> Self {
        Self { start: 0, end: num_layers, num_layers }
    }

    pub fn is_entry(&self) -> bool {
        self.start == 0
    }

    pub fn is_exit(&self) -> bool {
        self.end == self.num_layers
    }

    pub fn len(&self) -> usize {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    pub fn layers(&self) -> std::ops::Range<usize> {
        self.start..self.end
    }
}

impl fmt::Display for LayerRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}..{}", self.start, self.end)
    }
}

/// A range as written on the command line, `A..B`, before the model's layer count is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerSpan {
    pub start: usize,
    pub end: usize,
}

impl LayerSpan {
    pub fn resolve(self, num_layers: usize) -> Result<LayerRange> {
        LayerRange::new(self.start, self.end, num_layers)
    }
}

impl FromStr for LayerSpan {
    type Err = EngineError;

    fn from_str(s: &str) -> Result<Self> {
        let bad = || EngineError::Invalid(format!("layer range {s:?}: expected A..B, for example 0..15"));
        let (a, b) = s.split_once("..").ok_or_else(bad)?;
        let start = a.trim().parse().map_err(|_| bad())?;
        let end = b.trim().parse().map_err(|_| bad())?;
        if start >= end {
            return Err(bad());
        }
        Ok(Self { start, end })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_validate_against_the_model() {
        let r: LayerSpan = "0..15".parse().unwrap();
        let r = r.resolve(30).unwrap();
        assert!(r.is_entry() && !r.is_exit());
        assert!("15..31".parse::<LayerSpan>().unwrap().resolve(30).is_err());
        assert!("3..3".parse::<LayerSpan>().is_err());
        assert!("x..3".parse::<LayerSpan>().is_err());
        assert!(LayerRange::full(30).is_exit());
    }
}
