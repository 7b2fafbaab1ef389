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
    /// Set on a new entry, and cleared ([`Op::SetSent`]) before its envelope first goes to
    /// the peer: from then on the peer may hold it, whatever became of the call's answer,
    /// so only the peer's word ends its delivery. Unset is the safe reading, which entries
    /// written before the field have ([`Self::may_have_left`]).
    #[prost(bool, tag = "4")]
    pub unsent: bool,
}

impl QueueEntry {
    /// An entry for a stored message, which never went anywhere yet.
    pub fn message(id: &MessageId) -> Self {
        Self {
            message_id: id.as_bytes().to_vec(),
            unsent: true,
            ..Default::default()
        }
    }

    /// Whether its envelope may have reached the peer: a call carried it, or the entry is
    /// older than the mark.
    pub fn may_have_left(&self) -> bool {
        !self.unsent
    }

    /// An entry carrying a receipt for message `id` to a peer.
    pub fn receipt(id: &MessageId, receipt: pb::Receipt) -> Self {
        Self {
            receipt: Some(receipt),
            ..Self::message(id)
        }
    }
}

/// A message as this gateway keeps it: the sender's bytes, untouched, and what the gateway
/// notes of it.
///
/// Stored as one protobuf record: the envelope under tag 1, then the head's fields under
/// tags 2 to 7, in that order. Whatever needs only the head reads the record's tail and
/// leaves the envelope's bytes on disk ([`Store::message_head`], [`envelope_field_len`]).
/// It trusts the envelope field's length as the disk gives it back: records carry no
/// checksum of their own, and only a read of the whole envelope checks its framing.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StoredMessage {
    pub envelope: Option<pb::Envelope>,
    pub head: MessageHead,
}

/// What the gateway notes of a stored message besides its envelope: enough to check a
/// receipt, an ending or a status against it.
#[derive(Clone, PartialEq, prost::Message)]
pub struct MessageHead {
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
    /// Set when the envelope's signed header lists no attachments. Records written before
    /// this field was do not say, so unset means "maybe" (see
    /// [`MessageHead::lists_attachments`]).
    #[prost(bool, tag = "7")]
    pub no_attachments: bool,
}

impl MessageHead {
    /// Whether the message may have chunks here. Chunks are only ever taken for an
    /// attachment the header lists, so a message for which this is false has none, and
    /// ending its delivery costs no look at the disk.
    pub fn lists_attachments(&self) -> bool {
        !self.no_attachments
    }
}

/// The key of a stored message's envelope field: tag 1, length-delimited.
pub(crate) const ENVELOPE_KEY: u8 = (1 << 3) | 2;

impl StoredMessage {
    /// The stored record (type docs).
    pub fn encode_to_vec(&self) -> Vec<u8> {
        use prost::Message as _;
        let mut record = Vec::with_capacity(self.encoded_len());
        if let Some(env) = &self.envelope {
            record.push(ENVELOPE_KEY);
            env.encode_length_delimited(&mut record)
                .expect("a Vec grows as needed");
        }
        self.head
            .encode(&mut record)
            .expect("a Vec grows as needed");
        record
    }

    /// The length of the stored record.
    pub fn encoded_len(&self) -> usize {
        use prost::Message as _;
        let envelope = self.envelope.as_ref().map_or(0, |env| {
            let len = env.encoded_len();
            1 + prost::length_delimiter_len(len) + len
        });
        envelope + self.head.encoded_len()
    }

    /// Reads a stored record back. The envelope's parts share `record`'s buffer.
    pub fn decode(record: impl Into<prost::bytes::Bytes>) -> Result<Self, prost::DecodeError> {
        let record = record.into();
        use prost::Message as _;
        /// The envelope's field alone: decoding it passes over the head's.
        #[derive(Clone, PartialEq, prost::Message)]
        struct EnvelopeField {
            #[prost(message, optional, tag = "1")]
            envelope: Option<pb::Envelope>,
        }
        Ok(Self {
            head: MessageHead::decode(&record[..])?,
            envelope: EnvelopeField::decode(record)?.envelope,
        })
    }
}

/// How many bytes a stored record's envelope field takes, from the record's first bytes
/// (its key and length, at most [`ENVELOPE_LEAD`] bytes): what a reader of the head skips.
/// `Some(0)` when the record does not start with an envelope; `None` when `lead` is too
/// short to tell or does not encode a length.
pub(crate) fn envelope_field_len(lead: &[u8]) -> Option<u64> {
    match lead.split_first() {
        Some((&ENVELOPE_KEY, after_key)) => {
            let mut rest = after_key;
            let len = prost::decode_length_delimiter(&mut rest).ok()?;
            // The bytes the length took as written (a decoder takes it padded, too).
            let len_bytes = after_key.len() - rest.len();
            let field = len.checked_add(1 + len_bytes)?;
            u64::try_from(field).ok()
        }
        _ => Some(0),
    }
}

/// The most bytes [`envelope_field_len`] needs: the key, and a length of up to ten bytes.
pub(crate) const ENVELOPE_LEAD: usize = 11;

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
    /// Marks an outbox entry as one whose envelope may have reached the peer (true), or
    /// back as one that never went (false, for a call that never left), in place
    /// ([`QueueEntry::unsent`]): its order and key stay. Nothing if the entry is gone or
    /// marked so already.
    SetSent(QueueKey, bool),
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
    ///
    /// What callers build on (the forwarder's marks, the guards of endings):
    /// - `tx` is taken when `commit` is called, not when the future is first polled: a
    ///   caller that drops the future leaves the transaction with the store, and the
    ///   transactions of one caller are applied in the order it called `commit`;
    /// - reads see a transaction only once it is durable, and every read after its answer
    ///   sees it;
    /// - a failed transaction that may still reach the disk stops the store first:
    ///   [`Store::stopped`] says so before the `Err` is answered. Any other `Err` left
    ///   nothing behind.
    fn commit(&self, tx: Tx) -> Commit;
    fn message(&self, id: &MessageId) -> Result<Option<StoredMessage>, StoreError>;
    /// A message's head, without reading its envelope where the engine can avoid it: what
    /// checks of receipts, endings and statuses read, so that they cost the same for a
    /// 1 MiB message as for a 1 KiB one. A head can read where [`Store::message`] finds
    /// the envelope damaged: the envelope is checked where it is used (a fetch, the
    /// forwarder, an evidence bundle), not by every check of a receipt.
    fn message_head(&self, id: &MessageId) -> Result<Option<MessageHead>, StoreError> {
        Ok(self.message(id)?.map(|m| m.head))
    }
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

    /// A stored message as layouts up to 6 declared it, one derived protobuf message.
    #[derive(Clone, PartialEq, prost::Message)]
    struct LayoutSix {
        #[prost(message, optional, tag = "1")]
        envelope: Option<pb::Envelope>,
        #[prost(bytes = "vec", tag = "2")]
        envelope_hash: Vec<u8>,
        #[prost(string, tag = "3")]
        sender_org: String,
        #[prost(string, tag = "4")]
        recipient_org: String,
        #[prost(int64, tag = "5")]
        stored_at_ms: i64,
        #[prost(int64, tag = "6")]
        expires_at_ms: i64,
    }

    fn stored(ciphertext: usize, no_attachments: bool) -> StoredMessage {
        StoredMessage {
            envelope: Some(pb::Envelope {
                header: vec![1; 40].into(),
                ciphertext: vec![2; ciphertext].into(),
                signature: vec![3; 64].into(),
            }),
            head: MessageHead {
                envelope_hash: vec![4; 32],
                sender_org: "spiffe://vn.accord/org/c02".into(),
                recipient_org: "spiffe://kh.accord/org/ahtd".into(),
                stored_at_ms: 5,
                expires_at_ms: -6,
                no_attachments,
            },
        }
    }

    fn layout_six(m: &StoredMessage) -> LayoutSix {
        LayoutSix {
            envelope: m.envelope.clone(),
            envelope_hash: m.head.envelope_hash.clone(),
            sender_org: m.head.sender_org.clone(),
            recipient_org: m.head.recipient_org.clone(),
            stored_at_ms: m.head.stored_at_ms,
            expires_at_ms: m.head.expires_at_ms,
        }
    }

    /// Records on file stay readable both ways: the record is byte for byte what the
    /// derived message wrote, the new field aside, and an older binary reads past it.
    #[test]
    fn a_stored_record_is_the_layout_six_record_with_one_more_field() {
        for len in [0, 1, 127, 128, 70_000, 1 << 20] {
            let with_chunks = stored(len, false);
            let record = with_chunks.encode_to_vec();
            assert_eq!(record.len(), with_chunks.encoded_len());
            assert_eq!(record, layout_six(&with_chunks).encode_to_vec(), "{len}");
            assert_eq!(StoredMessage::decode(record.clone()).unwrap(), with_chunks);

            let without = stored(len, true);
            let record = without.encode_to_vec();
            assert_eq!(record.len(), without.encoded_len());
            assert_eq!(
                LayoutSix::decode(record.as_slice()).unwrap(),
                layout_six(&without)
            );
            assert_eq!(StoredMessage::decode(record.clone()).unwrap(), without);
        }
        // An empty envelope is still written, and none is not, as the derived message did.
        for envelope in [Some(pb::Envelope::default()), None] {
            let m = StoredMessage {
                envelope,
                ..stored(0, false)
            };
            let record = m.encode_to_vec();
            assert_eq!(record, layout_six(&m).encode_to_vec(), "{:?}", m.envelope);
            assert_eq!(record.len(), m.encoded_len());
            assert_eq!(StoredMessage::decode(record.clone()).unwrap(), m);
        }
        // Written before the field was: it may have chunks, and the disk is looked at.
        let old = layout_six(&stored(10, true)).encode_to_vec();
        let read = StoredMessage::decode(old).unwrap();
        assert!(read.head.lists_attachments());
        assert_eq!(read.envelope, stored(10, true).envelope);
        let empty = StoredMessage::default();
        assert!(StoredMessage::decode(empty.encode_to_vec()).unwrap() == empty);
    }

    /// A body read back is not copied again: the envelope's parts point into the record.
    #[test]
    fn a_decoded_envelope_shares_the_records_buffer() {
        let record = prost::bytes::Bytes::from(stored(70_000, true).encode_to_vec());
        let env = StoredMessage::decode(record.clone())
            .unwrap()
            .envelope
            .unwrap();
        let within = |part: &[u8]| {
            let at = part.as_ptr() as usize;
            let start = record.as_ptr() as usize;
            at >= start && at + part.len() <= start + record.len()
        };
        assert!(within(&env.header) && within(&env.ciphertext) && within(&env.signature));
    }

    /// What a reader of the head skips is exactly the envelope's field: the rest of the
    /// record decodes to the same head as the whole record.
    #[test]
    fn the_head_reads_from_what_follows_the_envelope_field() {
        for len in [0, 100, 5_000, 1 << 20] {
            let m = stored(len, true);
            let record = m.encode_to_vec();
            let lead = &record[..ENVELOPE_LEAD.min(record.len())];
            let skip = envelope_field_len(lead).unwrap() as usize;
            assert_eq!(skip, m.encoded_len() - m.head.encoded_len());
            assert_eq!(MessageHead::decode(&record[skip..]).unwrap(), m.head);
            assert_eq!(MessageHead::decode(record.as_slice()).unwrap(), m.head);
        }
        // No envelope first: nothing to skip.
        let bare = StoredMessage {
            envelope: None,
            ..stored(0, false)
        };
        assert_eq!(envelope_field_len(&bare.encode_to_vec()), Some(0));
        assert_eq!(envelope_field_len(&[]), Some(0));
    }

    /// Whatever a damaged byte makes of a record's first bytes (the envelope's key and
    /// length), a record that still decodes whole has the head a read past its lead
    /// finds: the skip is the decoder's own.
    #[test]
    fn a_head_read_past_the_lead_agrees_with_the_whole_record() {
        let (mut agreed, mut whole_refused) = (0, 0);
        for len in [300, 5_000] {
            let record = stored(len, true).encode_to_vec();
            for at in 0..16 {
                for value in 0..=u8::MAX {
                    let mut damaged = record.clone();
                    damaged[at] = value;
                    let Ok(whole) = StoredMessage::decode(damaged.clone()) else {
                        whole_refused += 1;
                        continue;
                    };
                    let lead = &damaged[..ENVELOPE_LEAD];
                    let skip = envelope_field_len(lead).expect("a record that decodes");
                    let head = MessageHead::decode(&damaged[skip as usize..]);
                    assert_eq!(head.as_ref(), Ok(&whole.head), "byte {at} = {value:#x}");
                    agreed += 1;
                }
            }
        }
        // Both kinds of case were met.
        assert!(
            agreed > 1_000 && whole_refused > 100,
            "{agreed} / {whole_refused}"
        );
    }

    #[test]
    fn a_lead_that_does_not_encode_a_length_is_refused() {
        // Cut inside the length.
        assert_eq!(envelope_field_len(&[ENVELOPE_KEY, 0x80, 0x80]), None);
        assert_eq!(envelope_field_len(&[ENVELOPE_KEY]), None);
        // Eleven bytes of continuation: no varint that long.
        assert_eq!(
            envelope_field_len(&[
                ENVELOPE_KEY,
                0xff,
                0xff,
                0xff,
                0xff,
                0xff,
                0xff,
                0xff,
                0xff,
                0xff,
                0xff
            ]),
            None
        );
        // A length written in more bytes than it needs (which decoders take) is skipped
        // as written: 5, in two bytes.
        let padded = [ENVELOPE_KEY, 0x85, 0x00, 1, 2, 3, 4, 5, 0x28, 0x07];
        assert_eq!(envelope_field_len(&padded), Some(8));
        assert_eq!(
            MessageHead::decode(&padded[8..]).unwrap(),
            MessageHead::decode(padded.as_slice()).unwrap()
        );
        // The largest length a varint holds, which no record can reach: the field's
        // length would overflow, and is refused rather than wrapped.
        let mut huge = vec![ENVELOPE_KEY];
        huge.extend([0xff; 9]);
        huge.push(0x01);
        assert_eq!(envelope_field_len(&huge), None);
    }
}
