//! Paid pools: the x402 gate in front of the completion routes, payment sessions, and the flow that pays
//! the operators while a request streams. The money logic is computepool-pay's and the rails'
//! (plugins); this module decides, per request, which of them to call and when.
//!
//! - [`config`]: a pool's price and rails.

pub mod config;
