//! The Accord client library: what a focal point or hotline uses to send sealed, signed
//! envelopes through its own gateway, receive and open what is addressed to it, acknowledge
//! with a signed delivered receipt, and follow each message's chain of receipts.
//!
//! Module map:
//! - [`org`]: [`org::OrgClient`], one organisation's session with its gateway.
//! - [`attach`]: files sent beside envelopes in encrypted chunks; resumable transfers.
//! - [`localnet`]: a local multi-country network (dev PKI, gateways on loopback) for the
//!   demo and the tests.
//! - [`demo`]: the two-country demo behind `accord demo`.

pub mod attach;
pub mod bench;
pub mod casebook;
pub mod demo;
pub mod forms;
pub mod localnet;
pub mod org;
