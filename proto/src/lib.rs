//! The Accord wire protocol: what a second implementation must agree with.
//!
//! Pure: no sockets, no runtime, no store, no clock reads (callers pass `now`). An auditor's
//! verifier needs nothing else.
//!
//! Module map:
//! - [`pb`]: generated protobuf types and gRPC service stubs (`proto/accord/v1/*.proto`).
//! - [`ids`]: newtypes for identities and ids (`SpiffeId`, `OrgId`, `MessageId`, ...).
//! - [`crypto`]: every `ring` call, domain-separated signing, HPKE (RFC 9180).
//! - [`envelope`]: sealing, verification and opening of envelopes (byte layout in `ENVELOPE.md`).
//! - [`attachment`]: files beside an envelope in encrypted, hash-listed chunks.
//! - [`evidence`]: offline verification of evidence bundles (format in `EVIDENCE.md`).
//! - [`receipt`]: signed receipts for each stage of a message's delivery chain.
//! - [`directory`]: organisations' and gateways' public keys per country.
//! - [`keyfile`]: the JSON layout of private key files.
//! - [`forms`]: checks that a body's form matches its kind and carries its required fields.
//! - [`log`]: non-repudiation log entries and RFC 6962 leaf hashing.
//! - [`merkle`]: RFC 9162 tree roots, inclusion and consistency proofs.
//! - [`note`]: C2SP signed notes, `tlog-checkpoint` checkpoints and `tlog-cosignature`.
//!
//! Non-goals: transport, storage, policy beyond the envelope's own rules.

pub mod attachment;
pub mod codes;
pub mod crypto;
pub mod directory;
pub mod envelope;
pub mod evidence;
pub mod forms;
pub mod ids;
pub mod keyfile;
pub mod log;
pub mod merkle;
pub mod note;
pub mod receipt;

/// Generated protobuf types (`accord.v1`) with proto3-JSON serde impls, and service stubs.
#[allow(missing_docs, clippy::all, missing_debug_implementations)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/accord.v1.rs"));
    include!(concat!(env!("OUT_DIR"), "/accord.v1.serde.rs"));
}

/// The bare echo service `accord bench` measures the transport limit with (`accord.bench.v1`).
#[allow(missing_docs, clippy::all, missing_debug_implementations)]
pub mod bench_pb {
    include!(concat!(env!("OUT_DIR"), "/accord.bench.v1.rs"));
}

/// Milliseconds since the Unix epoch. The protocol never reads a clock: callers pass it.
pub type UnixMillis = i64;
