//! Payments: everything between "this request must be paid for" and "these operators were paid for exactly
//! these seconds". It owns the x402 wire format (v1 and v2) and the `exact` EVM scheme (EIP-3009 vouchers),
//! the self-hosted facilitator (`/verify`, `/settle`, `/supported`), payment sessions (a durable state
//! machine in SQLite with idempotent transitions) and the per-second meter.
//!
//! It never touches activations or tokens, and it holds no rail logic of its own: how money moves (a
//! Superfluid stream, a private ledger, a facilitator) is a payment-rail plugin's job; this crate decides
//! when, and records what was paid.

pub mod x402;
pub mod exact;
pub mod facilitator;
pub mod session;
pub mod meter;
pub mod devnet;
