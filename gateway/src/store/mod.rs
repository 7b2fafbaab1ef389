//! The durable store behind the pipeline: messages by id, receipts, per-peer outboxes,
//! per-organisation inboxes and the non-repudiation log.
//!
//! [`Store`] knows nothing of sled; `sled.rs` implements it. Its contract:
//! - [`Store::commit`] applies a [`Tx`] atomically and resolves only after the whole
//!   transaction is on disk (fsync/fdatasync), so nothing acknowledged is lost on a power
//!   cut. Implementations group-commit: one sync covers every transaction waiting for it.
//! - Log indexes are assigned in commit order, without gaps.
//! - Reads see only transactions that are on disk: an answer built from reads (a status,
//!   an inbox) never shows what a power cut could take back.
//! - A transaction that inserts a message whose id is already stored is not applied and
//!   resolves to [`TxOutcome::Exists`]: that is how "exactly once into an inbox" holds under
//!   concurrent duplicates.
//! - Each log entry (`pb::LogEntry` bytes) is stored with the RFC 6962 tree nodes it
//!   completes (O(log n) per append, [`accord_proto::merkle::completed_nodes`]) and indexed by
//!   its message id, in the same transaction, so the tree is never behind the log.

mod log_files;
mod records;
mod run_set;
mod runs;
pub mod sled;
mod wal;

use std::future::Future;
use std::pin::Pin;

use accord_proto::ids::{CountryCode, MessageId, OrgId};
use accord_proto::log::LogIndex;
use accord_proto::pb;

/// Why the store failed. Every variant is the gateway's fault, never the caller's.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The underlying engine failed.
    #[error("storage engine: {0}")]
    Engine(String),
    /// Syncing to disk failed; the store refuses further writes.
    #[error("sync to disk failed: {0}")]
    Io(#[from] std::io::Error),
    /// A stored record does not decode: the disk or the engine corrupted it.
    #[error("corrupt record under {0}")]
    Corrupt(String),
    /// The committer is gone (the store was shut down or poisoned by an earlier I/O error).
    #[error("store is closed")]
    Closed,
    /// Another gateway holds the store's lock.
    #[error(
        "the store at {0} is in use by another gateway: stop the one that holds it, or give \
         this one a store of its own"
    )]
    InUse(std::path::PathBuf),
}

/// A queue: the outbox towards one peer country, or one organisation's inbox.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Queue {
    Outbox(CountryCode),
    Inbox(OrgId),
}

/// Position of an entry in a queue, from [`Store::queue`]; used to remove it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QueueKey(pub Vec<u8>);

/// What a queue entry holds: a stored message, or a receipt travelling to a peer.
#[derive(Clone, PartialEq, prost::Message)]
pub struct QueueEntry {
    #[prost(bytes = "vec", tag = "1")]
    pub message_id: Vec<u8>,
    #[prost(message, optional, tag = "2")]
    pub receipt: Option<pb::Receipt>,
    /// Set by [`Op::Defer`]: the entry was put behind every priority at the peer's request.
    #[prost(bool, tag = "3")]
    pub deferred: bool,
}

impl QueueEntry {
    /// An entry for a stored message.
    pub fn message(id: &MessageId) -> Self {
        Self {
            message_id: id.as_bytes().to_vec(),
            ..Default::default()
        }
    }

    /// An entry carrying a receipt for message `id` to a peer.
    pub fn receipt(id: &MessageId, receipt: pb::Receipt) -> Self {
        Self {
            receipt: Some(receipt),
            ..Self::message(id)
        }
    }
}

/// A message as this gateway keeps it: the sender's bytes, untouched, and its hash.
#[derive(Clone, PartialEq, prost::Message)]
pub struct StoredMessage {
    #[prost(message, optional, tag = "1")]
    pub envelope: Option<pb::Envelope>,
    #[prost(bytes = "vec", tag = "2")]
    pub envelope_hash: Vec<u8>,
    #[prost(string, tag = "3")]
    pub sender_org: String,
    #[prost(string, tag = "4")]
    pub recipient_org: String,
    #[prost(int64, tag = "5")]
    pub stored_at_ms: i64,
    #[prost(int64, tag = "6")]
    pub expires_at_ms: i64,
}

impl StoredMessage {
    /// Whether the envelope's signed header lists attachments. Chunks are only ever taken
    /// for an attachment the header lists, so a message for which this is false has none
    /// here. True when the header cannot be read: then only a look at the disk tells.
    pub fn lists_attachments(&self) -> bool {
        use prost::Message as _;
        self.envelope.as_ref().is_none_or(|env| {
            pb::Header::decode(env.header.as_slice()).map_or(true, |h| !h.attachments.is_empty())
        })
    }
}

/// One change inside a transaction.
#[derive(Debug)]
pub enum Op {
    /// Stores a message; the whole transaction is refused if the id exists.
    InsertMessage(MessageId, StoredMessage),
    /// Adds a receipt to a message's chain (idempotent on identical receipts).
    PutReceipt(MessageId, pb::Receipt),
    /// Appends to a queue, ordered by priority (higher first) then arrival.
    Enqueue(Queue, pb::Priority, QueueEntry),
    /// Removes a queue entry (idempotent). How an outbox's entries leave it: whoever takes
    /// one off read it from [`Store::queue`], key and all.
    Dequeue(QueueKey),
    /// Moves an outbox entry behind every entry that is not deferred, and marks it
    /// [`QueueEntry::deferred`]: a peer asked to have it later, so it stops standing in
    /// front of entries the peer may take now. Among deferred entries, an entry deferred
    /// for the first time keeps its priority, and one deferred again drops a step (down to
    /// ROUTINE); then the order they were deferred in. Nothing if the entry is gone
    /// (taken off or moved earlier, in this transaction or before); the entry is then read
    /// under a new key, and the old one names nothing.
    Defer(QueueKey),
    /// Removes a message's entry from an inbox without knowing its key (idempotent): a
    /// recipient ends a delivery by the message's id. Only inbox entries are indexed by id,
    /// since an index is two more writes for every message that passes through a queue.
    RemoveFromInbox(OrgId, MessageId),
    /// Appends an encoded `pb::LogEntry` to the log.
    Log(Vec<u8>),
    /// Sets a small metadata record (checkpoints, witness state).
    PutMeta(String, Vec<u8>),
}

/// Makes the ops that depend on a transaction's first log index (receipts that name it, and
/// queue entries carrying them). Runs inside the commit, so a receipt is stored in the same
/// durable batch as the event it proves. A receipt it puts names one of this transaction's
/// own log entries, so none like it can be stored yet: the store does not look for it among
/// the message's receipts, as [`Op::PutReceipt`] otherwise does.
pub type ReceiptMaker = Box<dyn FnOnce(LogIndex) -> Vec<Op> + Send>;

/// An atomic set of changes.
#[derive(Default)]
pub struct Tx {
    pub ops: Vec<Op>,
    pub receipts: Option<ReceiptMaker>,
}

impl std::fmt::Debug for Tx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tx")
            .field("ops", &self.ops.len())
            .field("receipts", &self.receipts.is_some())
            .finish()
    }
}

/// What a commit did.
#[derive(Debug, PartialEq, Eq)]
pub enum TxOutcome {
    /// Applied and on disk; the index of its first log entry, if it had any.
    Committed { first_log_index: Option<LogIndex> },
    /// Not applied: a message it inserts already exists.
    Exists(MessageId),
}

/// Resolves once the transaction is durable.
pub type Commit = Pin<Box<dyn Future<Output = Result<TxOutcome, StoreError>> + Send>>;

/// The storage engine contract (module docs).
pub trait Store: Send + Sync + 'static {
    /// Applies `tx` atomically; resolves after it is on disk. An `Err` is ambiguous: the
    /// transaction may still be on disk and reappear after a restart (a caller that
    /// retries meets [`TxOutcome::Exists`]).
    fn commit(&self, tx: Tx) -> Commit;
    fn message(&self, id: &MessageId) -> Result<Option<StoredMessage>, StoreError>;
    /// Every receipt stored for a message, in the order they were stored.
    fn receipts(&self, id: &MessageId) -> Result<Vec<pb::Receipt>, StoreError>;
    /// Up to `limit` entries of a queue, highest priority first, then oldest first; deferred
    /// entries ([`Op::Defer`]) after all others, in their own priority order, then in the
    /// order they were deferred.
    fn queue(&self, queue: &Queue, limit: usize)
        -> Result<Vec<(QueueKey, QueueEntry)>, StoreError>;
    /// Number of log entries.
    fn log_size(&self) -> Result<u64, StoreError>;
    /// One encoded log entry.
    fn log_entry(&self, index: LogIndex) -> Result<Option<Vec<u8>>, StoreError>;
    /// Bytes the store occupies on disk, for the quota (it may lag the transactions in
    /// flight by one group).
    fn disk_usage(&self) -> Result<u64, StoreError>;
    /// The stored hash of the perfect subtree at (`level`, `index`) of the log's tree.
    fn log_node(&self, level: u32, index: u64) -> Result<Option<[u8; 32]>, StoreError>;
    /// Indexes of the log entries that name a message, ascending.
    fn message_events(&self, id: &MessageId) -> Result<Vec<LogIndex>, StoreError>;
    /// A metadata record set by [`Op::PutMeta`].
    fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Why the store takes no more commits, once it stopped (a write or sync that failed, a
    /// thread that panicked): it stays stopped until the gateway restarts and replays what
    /// it logged. `None` while it works.
    fn stopped(&self) -> Option<String>;
}

#[cfg(test)]
pub(crate) mod conformance;

#[cfg(test)]
mod tests {
    use prost::Message as _;

    use super::*;

    fn with_header(header: Vec<u8>) -> StoredMessage {
        StoredMessage {
            envelope: Some(pb::Envelope {
                header,
                ciphertext: vec![1; 16],
                signature: vec![2; 64],
            }),
            ..Default::default()
        }
    }

    #[test]
    fn only_a_header_that_lists_no_attachments_says_there_are_none() {
        let plain = pb::Header {
            message_id: vec![7; 16],
            ..Default::default()
        };
        assert!(!with_header(plain.encode_to_vec()).lists_attachments());

        let attached = pb::Header {
            attachments: vec![pb::AttachmentDigest {
                size: 1,
                chunk_size: 65536,
                chunks_root: vec![3; 32],
            }],
            ..plain
        };
        assert!(with_header(attached.encode_to_vec()).lists_attachments());

        // Whatever cannot be read is assumed to have chunks: the disk is looked at.
        assert!(with_header(vec![0xff; 9]).lists_attachments());
        assert!(StoredMessage::default().lists_attachments());
    }
}
