//! The Accord gateway: relays sealed, signed envelopes between organisations and peer
//! gateways over mutual TLS, through a durable store-and-forward queue.
//!
//! A gateway never holds the keys that open envelopes: it verifies signatures, routes by the
//! recipient's country, stores durably, and signs receipts.
//!
//! Module map:
//! - [`config`]: the TOML configuration, checked at start.
//! - [`tls`]: rustls policy (ring, TLS 1.3 only), SPIFFE identities, per-country roots.
//! - [`listener`]: TLS accept loops that hand tonic verified identities.
//! - [`policy`]: which role may send which kind to whom (checked at start, enforced twice).
//! - [`pipeline`]: submit, receive from peer, ack, inbox, status; one transaction each.
//! - [`store`]: the storage trait and its sled implementation (group commit + fdatasync).
//! - [`attachments`]: attachment chunks on disk, checked against the signed header.
//! - [`transfer`]: who may upload, query and download chunks, and when they go.
//! - [`forwarder`]: drains each peer's outbox with retries, backoff and jitter.
//! - [`service`]: gRPC services (exchange, peer link) and error-to-status mapping.
//! - [`transparency`]: checkpoints, witnessing of peers, proofs and evidence bundles.
//! - [`server`]: assembles and runs a gateway on given listeners.

#[cfg(not(unix))]
compile_error!("the Accord gateway runs on Unix: key file modes, signals and file stamps");

pub mod attachments;
pub mod config;
pub mod forwarder;
pub mod listener;
pub mod pipeline;
pub mod policy;
pub mod server;
pub mod service;
pub mod store;
pub mod tls;
pub mod transfer;
pub mod transparency;

/// The allocator the `accord` and `accord-gateway` binaries run on (each names it as its
/// `#[global_allocator]`): jemalloc instead of glibc's malloc, 9–18% less CPU per message
/// in the gateways for 10–20 MiB more peak memory (docs/performance.md, "jemalloc instead
/// of glibc's malloc"). tikv-jemallocator does not build on MSVC.
#[cfg(not(target_env = "msvc"))]
pub type Allocator = tikv_jemallocator::Jemalloc;

/// The value of [`Allocator`] for a binary's `static`.
#[cfg(not(target_env = "msvc"))]
pub const ALLOCATOR: Allocator = tikv_jemallocator::Jemalloc;
