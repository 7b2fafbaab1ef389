//! [`Store`] on sled 0.34.7, made truly durable.
//!
//! sled's `flush` ends in `sync_file_range`, which survives a process crash but not a power
//! cut, and it writes large values to blob files without syncing them. So every group commit
//! here is: apply each transaction as one atomic `sled::Batch`, `flush`, then `fdatasync` the
//! log file and any new blob file (and the blob directory). Only then are the waiting
//! transactions answered. One thread owns the write side, which also gives log indexes and
//! queue sequence numbers a single order.
//!
//! Key layout (all integers big-endian, so sled's byte order is the queue order):
//! ```text
//! m ‖ id(16)                         StoredMessage
//! r ‖ id(16) ‖ seq(8)                pb::Receipt
//! q ‖ queue name ‖ 0x00 ‖ 255-priority ‖ seq(8)   QueueEntry
//! x ‖ queue name ‖ 0x00 ‖ id(16)     key of that message's queue entry (for RemoveMessage)
//! l ‖ index(8)                       pb::LogEntry bytes
//! n ‖ level(1) ‖ index(8)            RFC 6962 perfect-subtree hash (level 0: leaf hashes)
//! e ‖ id(16) ‖ index(8)              the log entry `index` names message `id`
//! k ‖ name                           metadata (checkpoints, witness state)
//! s ‖ "log" / "seq"                  next log index / next sequence number
//! ```

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use std::collections::HashMap;

use accord_proto::ids::MessageId;
use accord_proto::merkle::{self, Hash, NodeSource, ProofError};
use accord_proto::{log, pb};
use prost::Message;
use tokio::sync::oneshot;

use super::{
    Commit, Op, Queue, QueueEntry, QueueKey, Store, StoreError, StoredMessage, Tx, TxOutcome,
};

/// Most transactions one sync covers; bounds the latency of the first in a group.
const MAX_GROUP: usize = 512;
const META_LOG: &[u8] = b"slog";
const META_SEQ: &[u8] = b"sseq";

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        StoreError::Engine(e.to_string())
    }
}

/// Group counters: a reader can see what `applied` counts; `synced` says what is durable.
/// `disk_bytes` is the store's size on disk as of the last sync, for the quota: asking sled
/// (`size_on_disk`) lists and stats every blob file, too much for every submit.
#[derive(Debug, Default)]
struct Progress {
    applied: AtomicU64,
    synced: AtomicU64,
    disk_bytes: AtomicU64,
}

struct Pending {
    tx: Tx,
    reply: oneshot::Sender<Result<TxOutcome, StoreError>>,
}

/// The sled-backed store. Dropping it drains pending commits and closes the database.
pub struct SledStore {
    db: sled::Db,
    progress: Arc<Progress>,
    path: PathBuf,
    sender: Mutex<Option<mpsc::Sender<Pending>>>,
    committer: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for SledStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SledStore")
            .field("path", &self.path)
            .finish()
    }
}

impl SledStore {
    /// Opens (or creates) the store at `path` with a bounded page cache.
    pub fn open(path: &Path, cache_bytes: u64) -> Result<Self, StoreError> {
        std::fs::create_dir_all(path)?;
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(cache_bytes)
            .flush_every_ms(None)
            .open()?;
        // The directory entries of sled's files must survive a power cut too.
        sync_dir(path)?;
        let log_file = File::open(path.join("db"))?;
        let (sender, receiver) = mpsc::channel();
        let progress = Arc::new(Progress::default());
        progress
            .disk_bytes
            .store(db.size_on_disk()?, Ordering::Relaxed);
        let committer = Committer {
            progress: progress.clone(),
            db: db.clone(),
            log_file,
            blob_dir: path.join("blobs"),
            synced_blobs: HashMap::new(),
            next_log: read_meta(&db, META_LOG)?,
            next_seq: read_meta(&db, META_SEQ)?,
            poisoned: None,
        };
        let handle = std::thread::Builder::new()
            .name("accord-store-commit".into())
            .spawn(move || committer.run(receiver))?;
        Ok(Self {
            db,
            progress,
            path: path.to_owned(),
            sender: Mutex::new(Some(sender)),
            committer: Mutex::new(Some(handle)),
        })
    }
}

impl Drop for SledStore {
    fn drop(&mut self) {
        if let Ok(mut s) = self.sender.lock() {
            s.take();
        }
        if let Some(handle) = self.committer.lock().ok().and_then(|mut h| h.take()) {
            let _ = handle.join();
        }
    }
}

fn read_meta(db: &sled::Db, key: &[u8]) -> Result<u64, StoreError> {
    match db.get(key)? {
        None => Ok(0),
        Some(v) => Ok(u64::from_be_bytes(v.as_ref().try_into().map_err(|_| {
            StoreError::Corrupt(String::from_utf8_lossy(key).into())
        })?)),
    }
}

fn sync_dir(path: &Path) -> std::io::Result<()> {
    File::open(path)?.sync_all()
}

fn message_key(id: &MessageId) -> Vec<u8> {
    [b"m".as_slice(), id.as_bytes()].concat()
}

fn receipt_prefix(id: &MessageId) -> Vec<u8> {
    [b"r".as_slice(), id.as_bytes()].concat()
}

fn queue_prefix(queue: &Queue) -> Vec<u8> {
    let name = match queue {
        Queue::Outbox(cc) => format!("o:{cc}"),
        Queue::Inbox(org) => format!("i:{org}"),
    };
    let mut key = Vec::with_capacity(name.len() + 2);
    key.push(b'q');
    key.extend_from_slice(name.as_bytes());
    key.push(0);
    key
}

fn queue_index_key(queue: &Queue, id: &[u8]) -> Vec<u8> {
    let mut key = queue_prefix(queue);
    key[0] = b'x';
    key.extend_from_slice(id);
    key
}

fn node_key(level: u32, index: u64) -> [u8; 10] {
    let mut k = [b'n'; 10];
    k[1] = level as u8;
    k[2..].copy_from_slice(&index.to_be_bytes());
    k
}

fn event_key(id: &MessageId, index: u64) -> Vec<u8> {
    [b"e".as_slice(), id.as_bytes(), &index.to_be_bytes()].concat()
}

fn meta_key(name: &str) -> Vec<u8> {
    [b"k".as_slice(), name.as_bytes()].concat()
}

/// Tree nodes as the batch under construction will leave them: its own first, then disk.
struct PendingNodes<'a> {
    db: &'a sled::Db,
    fresh: &'a HashMap<(u32, u64), Hash>,
}

impl NodeSource for PendingNodes<'_> {
    fn node(&self, level: u32, index: u64) -> Result<Hash, ProofError> {
        if let Some(h) = self.fresh.get(&(level, index)) {
            return Ok(*h);
        }
        read_node(self.db, level, index)
    }
}

fn read_node(db: &sled::Db, level: u32, index: u64) -> Result<Hash, ProofError> {
    let v = db
        .get(node_key(level, index))
        .map_err(|e| ProofError::Storage(e.to_string()))?
        .ok_or(ProofError::MissingNode { level, index })?;
    v.as_ref()
        .try_into()
        .map_err(|_| ProofError::Storage("corrupt tree node".into()))
}

fn log_key(index: u64) -> [u8; 9] {
    let mut k = [b'l'; 9];
    k[1..].copy_from_slice(&index.to_be_bytes());
    k
}

struct Committer {
    progress: Arc<Progress>,
    db: sled::Db,
    log_file: File,
    blob_dir: PathBuf,
    /// Blob files already synced, with their sizes (sled writes a blob file once).
    synced_blobs: HashMap<std::ffi::OsString, u64>,
    next_log: u64,
    next_seq: u64,
    /// Set after a failed sync: what is on disk is unknown, so every later commit fails.
    poisoned: Option<String>,
}

impl Committer {
    fn run(mut self, receiver: mpsc::Receiver<Pending>) {
        while let Ok(first) = receiver.recv() {
            let mut group = vec![first];
            while group.len() < MAX_GROUP {
                match receiver.try_recv() {
                    Ok(p) => group.push(p),
                    Err(_) => break,
                }
            }
            // Counted before applying: whatever a reader can see belongs to a counted group.
            let generation = self.progress.applied.fetch_add(1, Ordering::SeqCst) + 1;
            let outcomes: Vec<_> = group
                .iter_mut()
                .map(|p| self.apply(std::mem::take(&mut p.tx)))
                .collect();
            let synced = self.sync();
            if synced.is_ok() {
                self.progress.synced.store(generation, Ordering::SeqCst);
            }
            for (p, outcome) in group.into_iter().zip(outcomes) {
                let result = match (&synced, outcome) {
                    (Ok(()), outcome) => outcome,
                    (Err(e), _) => Err(StoreError::Engine(format!("sync failed: {e}"))),
                };
                let _ = p.reply.send(result);
            }
        }
    }

    fn apply(&mut self, tx: Tx) -> Result<TxOutcome, StoreError> {
        if let Some(why) = &self.poisoned {
            return Err(StoreError::Engine(format!("store poisoned: {why}")));
        }
        let mut batch = sled::Batch::default();
        let mut first_log_index = None;
        let (mut next_log, mut next_seq) = (self.next_log, self.next_seq);
        let mut receipt_ops = Vec::new();
        for op in &tx.ops {
            if let Op::Log(_) = op {
                first_log_index.get_or_insert(next_log);
            }
        }
        if let (Some(maker), Some(index)) = (tx.receipts, first_log_index) {
            receipt_ops = maker(index);
        }
        let receipts = receipt_ops.into_iter();
        let mut fresh_nodes = HashMap::new();
        for op in tx.ops.into_iter().chain(receipts) {
            match op {
                Op::InsertMessage(id, msg) => {
                    let key = message_key(&id);
                    if self.db.contains_key(&key)? {
                        return Ok(TxOutcome::Exists(id));
                    }
                    batch.insert(key, msg.encode_to_vec());
                }
                Op::PutReceipt(id, receipt) => {
                    let prefix = receipt_prefix(&id);
                    let bytes = receipt.encode_to_vec();
                    let already = self
                        .db
                        .scan_prefix(&prefix)
                        .values()
                        .any(|v| v.map(|v| v.as_ref() == bytes.as_slice()).unwrap_or(false));
                    if !already {
                        let key = [prefix, next_seq.to_be_bytes().to_vec()].concat();
                        next_seq += 1;
                        batch.insert(key, bytes);
                    }
                }
                Op::Enqueue(queue, priority, entry) => {
                    let mut key = queue_prefix(&queue);
                    key.push(255 - (priority as i32).clamp(0, 255) as u8);
                    key.extend_from_slice(&next_seq.to_be_bytes());
                    next_seq += 1;
                    if entry.receipt.is_none() {
                        let index = queue_index_key(&queue, &entry.message_id);
                        batch.insert(index, key.clone());
                    }
                    batch.insert(key, entry.encode_to_vec());
                }
                Op::Dequeue(QueueKey(key)) => batch.remove(key),
                Op::RemoveMessage(queue, id) => {
                    let index = queue_index_key(&queue, id.as_bytes());
                    if let Some(key) = self.db.get(&index)? {
                        batch.remove(key);
                    }
                    batch.remove(index);
                }
                Op::Log(entry) => {
                    let source = PendingNodes {
                        db: &self.db,
                        fresh: &fresh_nodes,
                    };
                    let nodes = merkle::completed_nodes(&source, next_log, log::leaf_hash(&entry))
                        .map_err(|e| StoreError::Engine(format!("log tree: {e}")))?;
                    for (level, index, hash) in nodes {
                        batch.insert(&node_key(level, index)[..], &hash[..]);
                        fresh_nodes.insert((level, index), hash);
                    }
                    let message = pb::LogEntry::decode(entry.as_slice())
                        .ok()
                        .and_then(|e| MessageId::from_slice(&e.message_id).ok());
                    if let Some(id) = message {
                        batch.insert(event_key(&id, next_log), &[][..]);
                    }
                    batch.insert(&log_key(next_log)[..], entry);
                    next_log += 1;
                }
                Op::PutMeta(name, value) => batch.insert(meta_key(&name), value),
            }
        }
        batch.insert(META_LOG, &next_log.to_be_bytes()[..]);
        batch.insert(META_SEQ, &next_seq.to_be_bytes()[..]);
        self.db.apply_batch(batch)?;
        self.next_log = next_log;
        self.next_seq = next_seq;
        Ok(TxOutcome::Committed { first_log_index })
    }

    /// flush + fdatasync of the log file and of any blob file not yet synced; then notes
    /// the size on disk.
    fn sync(&mut self) -> Result<(), String> {
        let result = self
            .db
            .flush()
            .map_err(|e| e.to_string())
            .and_then(|_| self.log_file.sync_data().map_err(|e| e.to_string()))
            .and_then(|_| self.sync_blobs().map_err(|e| e.to_string()));
        match &result {
            Ok(blob_bytes) => {
                // The quota figure only: a failed stat keeps the previous one.
                if let Ok(meta) = self.log_file.metadata() {
                    let bytes = meta.len() + blob_bytes;
                    self.progress.disk_bytes.store(bytes, Ordering::Relaxed);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "store sync failed; refusing further writes");
                self.poisoned = Some(e.clone());
            }
        }
        result.map(|_| ())
    }

    /// Syncs new blob files; returns the bytes all blob files hold.
    fn sync_blobs(&mut self) -> std::io::Result<u64> {
        let entries = match std::fs::read_dir(&self.blob_dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e),
        };
        let names = entries
            .map(|e| e.map(|e| e.file_name()))
            .collect::<std::io::Result<Vec<_>>>()?;
        let (present, changed) = sync_new_files(&self.blob_dir, names, &self.synced_blobs)?;
        if changed {
            sync_dir(&self.blob_dir)?;
        }
        self.synced_blobs = present;
        Ok(self.synced_blobs.values().sum())
    }
}

/// `fdatasync`s the files `names` of `dir` that are not in `synced`; returns the names
/// still there with their sizes, and whether the folder changed. sled deletes a blob once
/// its page is rewritten, possibly after the folder was listed: such a file has nothing to
/// keep and is skipped (it used to fail the sync and poison the store).
fn sync_new_files(
    dir: &Path,
    names: Vec<std::ffi::OsString>,
    synced: &HashMap<std::ffi::OsString, u64>,
) -> std::io::Result<(HashMap<std::ffi::OsString, u64>, bool)> {
    let mut present = HashMap::new();
    let mut changed = false;
    for name in names {
        let size = match synced.get(&name) {
            Some(size) => *size,
            None => {
                changed = true;
                match File::open(dir.join(&name)) {
                    Ok(file) => {
                        file.sync_data()?;
                        file.metadata()?.len()
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e),
                }
            }
        };
        present.insert(name, size);
    }
    Ok((present, changed))
}

impl Store for SledStore {
    fn commit(&self, tx: Tx) -> Commit {
        let (reply, wait) = oneshot::channel();
        let sent = self
            .sender
            .lock()
            .ok()
            .and_then(|s| s.as_ref().map(|s| s.send(Pending { tx, reply }).is_ok()))
            .unwrap_or(false);
        Box::pin(async move {
            if !sent {
                return Err(StoreError::Closed);
            }
            wait.await.map_err(|_| StoreError::Closed)?
        })
    }

    fn barrier(&self) -> Commit {
        let seen = self.progress.applied.load(Ordering::SeqCst);
        if self.progress.synced.load(Ordering::SeqCst) >= seen {
            return Box::pin(async {
                Ok(TxOutcome::Committed {
                    first_log_index: None,
                })
            });
        }
        // The next group's sync covers every group applied before it.
        self.commit(Tx::default())
    }

    fn message(&self, id: &MessageId) -> Result<Option<StoredMessage>, StoreError> {
        self.db
            .get(message_key(id))?
            .map(|v| {
                StoredMessage::decode(v.as_ref()).map_err(|_| StoreError::Corrupt(id.to_string()))
            })
            .transpose()
    }

    fn receipts(&self, id: &MessageId) -> Result<Vec<pb::Receipt>, StoreError> {
        self.db
            .scan_prefix(receipt_prefix(id))
            .values()
            .map(|v| {
                pb::Receipt::decode(v?.as_ref()).map_err(|_| StoreError::Corrupt(id.to_string()))
            })
            .collect()
    }

    fn queue(
        &self,
        queue: &Queue,
        limit: usize,
    ) -> Result<Vec<(QueueKey, QueueEntry)>, StoreError> {
        self.db
            .scan_prefix(queue_prefix(queue))
            .take(limit)
            .map(|kv| {
                let (k, v) = kv?;
                let entry = QueueEntry::decode(v.as_ref())
                    .map_err(|_| StoreError::Corrupt(format!("{queue:?}")))?;
                Ok((QueueKey(k.to_vec()), entry))
            })
            .collect()
    }

    fn log_size(&self) -> Result<u64, StoreError> {
        read_meta(&self.db, META_LOG)
    }

    fn log_entry(&self, index: u64) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.db.get(log_key(index))?.map(|v| v.to_vec()))
    }

    fn disk_usage(&self) -> Result<u64, StoreError> {
        Ok(self.progress.disk_bytes.load(Ordering::Relaxed))
    }

    fn log_node(&self, level: u32, index: u64) -> Result<Option<Hash>, StoreError> {
        match read_node(&self.db, level, index) {
            Ok(h) => Ok(Some(h)),
            Err(ProofError::MissingNode { .. }) => Ok(None),
            Err(e) => Err(StoreError::Engine(e.to_string())),
        }
    }

    fn message_events(&self, id: &MessageId) -> Result<Vec<u64>, StoreError> {
        let prefix = [b"e".as_slice(), id.as_bytes()].concat();
        self.db
            .scan_prefix(&prefix)
            .keys()
            .map(|k| {
                let k = k?;
                let tail: [u8; 8] = k[prefix.len()..]
                    .try_into()
                    .map_err(|_| StoreError::Corrupt("event index".into()))?;
                Ok(u64::from_be_bytes(tail))
            })
            .collect()
    }

    fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.db.get(meta_key(key))?.map(|v| v.to_vec()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sled_store_passes_the_conformance_suite() {
        let dir = tempfile::tempdir().unwrap();
        let open = |p: &Path| SledStore::open(p, 16 << 20).unwrap();
        crate::store::conformance::run(dir.path(), open).await;
    }

    #[test]
    fn a_blob_deleted_between_listing_and_sync_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("1"), b"blob").unwrap();
        let listed = vec!["1".into(), "2".into()]; // "2" was deleted after the listing
        let (present, changed) = sync_new_files(dir.path(), listed, &HashMap::new()).unwrap();
        assert!(changed);
        assert_eq!(present, HashMap::from([("1".into(), 4)]));
        // Nothing new: nothing to sync, no change.
        let (_, changed) = sync_new_files(dir.path(), vec!["1".into()], &present).unwrap();
        assert!(!changed);
    }

    /// The quota's figure follows what commits write, blob files included, without asking
    /// sled to list them on every call.
    #[tokio::test]
    async fn disk_usage_counts_what_commits_wrote() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), 16 << 20).unwrap();
        let before = store.disk_usage().unwrap();
        for i in 0..20u64 {
            let id = MessageId::new_v7(1_000 + i, [i as u8; 10]);
            let envelope = pb::Envelope {
                header: vec![1; 100],
                ciphertext: vec![i as u8; 200 << 10],
                signature: vec![3; 64],
            };
            let msg = StoredMessage {
                envelope: Some(envelope),
                ..Default::default()
            };
            store
                .commit(Tx {
                    ops: vec![Op::InsertMessage(id, msg)],
                    receipts: None,
                })
                .await
                .unwrap();
        }
        let after = store.disk_usage().unwrap();
        assert!(
            after >= before + 20 * (200 << 10),
            "{before} bytes before, {after} after 4 MB of commits"
        );
        assert!(after <= store.db.size_on_disk().unwrap() + (1 << 20));
    }

    /// Large values churned by concurrent writers: sled writes their pages to blob files
    /// and deletes them as pages are rewritten, under our syncs. Every commit succeeds.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn large_values_churned_by_concurrent_writers_all_commit() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SledStore::open(dir.path(), 16 << 20).unwrap());
        let queue = Queue::Outbox("kh".parse().unwrap());
        let mut writers = tokio::task::JoinSet::new();
        for w in 0..16u16 {
            let (store, queue) = (store.clone(), queue.clone());
            writers.spawn(async move {
                for i in 0..40u64 {
                    let mut random = [0u8; 10];
                    random[..2].copy_from_slice(&w.to_be_bytes());
                    random[2..].copy_from_slice(&i.to_be_bytes());
                    let id = MessageId::new_v7(1_000 + i, random);
                    let envelope = pb::Envelope {
                        header: vec![1; 100],
                        ciphertext: vec![w as u8; 64 << 10],
                        signature: vec![3; 64],
                    };
                    let entry = QueueEntry {
                        message_id: id.as_bytes().to_vec(),
                        receipt: None,
                    };
                    store
                        .commit(Tx {
                            ops: vec![
                                Op::InsertMessage(
                                    id,
                                    StoredMessage {
                                        envelope: Some(envelope),
                                        ..Default::default()
                                    },
                                ),
                                Op::Enqueue(queue.clone(), pb::Priority::Routine, entry),
                                Op::Log(vec![5; 100]),
                            ],
                            receipts: None,
                        })
                        .await?;
                    store
                        .commit(Tx {
                            ops: vec![Op::RemoveMessage(queue.clone(), id)],
                            receipts: None,
                        })
                        .await?;
                }
                Ok::<_, StoreError>(())
            });
        }
        while let Some(r) = writers.join_next().await {
            r.unwrap().unwrap();
        }
        assert_eq!(store.log_size().unwrap(), 16 * 40);
    }
}
