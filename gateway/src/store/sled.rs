//! [`Store`] over a write-ahead log of our own, immutable sorted runs, and sled 0.34.7
//! below them for what stores of earlier layouts wrote (docs/store-next.md, step 2).
//!
//! sled's `flush` ends in `sync_file_range`, which survives a process crash but not a power
//! cut, it writes large values to blob files without syncing them, and its inserts and
//! page rewrites were a quarter of a gateway's CPU. From layout 4 on, nothing writes to
//! sled but the migrations at open. A group commit is:
//! 1. build each transaction's writes, reading through the group's earlier writes;
//! 2. if one of the group's message records is large ([`WRITTEN_FIRST_FROM`]), write its
//!    message records to `messages/` and `fdatasync` them, so that the log names them
//!    instead of holding them;
//! 3. append the group's writes to the write-ahead log (`wal.rs`) and `fdatasync` it;
//! 4. with readers held back, answer the group's transactions, then apply the writes: to
//!    the log's and message files, and every other key to a map in memory
//!    ([`HeldWrites`]), which readers see over the runs and sled.
//!
//! Readers therefore only ever see whole groups of durable transactions, and whoever reads
//! after an answer sees its transaction. Atomicity comes from the log: a crash in the
//! middle of applying a group leaves the group's segment in place, and its replay
//! completes the group. A checkpointer thread, once a segment is full or a second old,
//! takes the held writes, syncs the files beside them, writes them as a run (`runs.rs`, in
//! the folder `run_set.rs` keeps), merges runs when due, then deletes the segments the runs
//! now hold. Queue entries that leave before the checkpoint never reach a run. On open,
//! whatever segments remain are replayed over the runs: their records hold absolute
//! values (or name message records written and synced before them, read back and
//! checked), so a replay over runs that hold some of them is safe; it is then written as
//! a run before the store answers.
//!
//! One thread owns the write side, which also gives log indexes and queue sequence numbers
//! a single order.
//!
//! Key layout (all integers big-endian, so byte order is the queue order):
//! ```text
//! m ‖ id(16)                         StoredMessage (no longer written; see below)
//! v ‖ id(16)                         number(8) of its record in `messages/`
//! r ‖ id(16) ‖ seq(8)                pb::Receipt, or 0x00 ‖ u32be(len) ‖ pb::Receipt ‖
//!                                    index(8)…: the log entries naming message `id` of the
//!                                    transaction that stored it, in place of its `e` key
//! q ‖ queue name ‖ 0x00 ‖ 255-priority ‖ seq(8)   QueueEntry
//! q ‖ o:cc ‖ 0x00 ‖ 255 ‖ 255-priority ‖ seq(8)   a deferred outbox entry (`Op::Defer`)
//! x ‖ inbox name ‖ 0x00 ‖ id(16)     key of that message's inbox entry (for RemoveFromInbox)
//! e ‖ id(16) ‖ index(8)              log entries of one transaction that name message
//!                                    `id`: the first, `index`; the later ones, index(8)…
//!                                    in the value (one write for the transaction), where
//!                                    the transaction stores no receipt of `id` to hold them
//! k ‖ name                           metadata (checkpoints, witness state)
//! s ‖ "log" / "seq"                  next log index / next sequence number
//! ```
//!
//! The log's entries and tree nodes live in files of their own (`log_files.rs`). A group's
//! writes name them with keys the apply step routes there, not to the held writes:
//! ```text
//! l ‖ index(8)                       pb::LogEntry bytes
//! n ‖ level(1) ‖ index(8)            RFC 6962 perfect-subtree hash (level 0: leaf hashes)
//! ```
//!
//! Messages never change once stored and are read by id. Each is kept beside the runs, as a
//! numbered record in `messages/` (`records.rs`), the runs holding only its number (`v`):
//! in sled, a message's bytes were copied by every later insert into its B-tree leaf; in
//! runs, they would be copied by every merge (docs/performance.md, "Runs instead of
//! sled"). Earlier layouts kept messages of at most 4 KiB inline (`m`): in sled, and in
//! runs for the first builds of layout 4 (b0852f2 to 40d01b9). They are read wherever they
//! are.
//! A group names a message's record with `M ‖ number(8)`, routed to `messages/` as the
//! log's keys are to `log/`. A record holds the envelope first, then the message's head
//! (`StoredMessage`): reading a head alone (`Store::message_head`), for a receipt, an
//! ending or a status, reads the envelope's key and length and then what follows it.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use accord_proto::ids::{MessageId, OrgId};
use accord_proto::merkle::{self, Hash, NodeSource, ProofError};
use accord_proto::{log, pb};
use prost::Message;
use tokio::sync::oneshot;

use super::log_files::{self, LogFiles};
use super::records::Records;
use super::run_set::{self, Named, RunSet};
use super::runs;
use super::wal::{self, Segment, WalError, WalGroup, WalWrite, WrittenFirst};
use super::{
    envelope_field_len, Commit, MessageHead, Op, Queue, QueueEntry, QueueKey, Store, StoreError,
    StoredMessage, Tx, TxOutcome, ENVELOPE_LEAD,
};

/// Most transactions one sync covers; bounds the latency of the first in a group.
const MAX_GROUP: usize = 512;
/// A group closes once its writes reach this many bytes (large bodies), for the same reason.
const MAX_GROUP_BYTES: usize = 16 << 20;
/// A segment is handed to the checkpointer once it holds this much, or is this old: what a
/// restart replays, and what is held in memory only, stay within these bounds.
const SEGMENT_BYTES: u64 = 32 << 20;
/// The longest a segment holding commits waits before a checkpoint: a store goes idle this
/// long after its last commit (public for the benchmark, which waits that long).
pub const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);
/// How long an open waits for sled's lock: a store closed in this process releases it only
/// once sled's background writes end.
const LOCK_WAIT: Duration = Duration::from_secs(3);
const META_LOG: &[u8] = b"slog";
const META_SEQ: &[u8] = b"sseq";
/// How many message records `messages/` holds.
const META_MESSAGES: &[u8] = b"smsg";
/// Before layout 4, a message whose encoding was at most this long was kept in sled, not
/// in `messages/` (module docs).
#[cfg(test)]
const BESIDE_FROM: usize = 4 << 10;
/// A group that holds a message record at least this long writes its message records
/// first, syncs them, and logs only their lengths and checksums: a large body is then
/// written once, not in the write-ahead log and again in `messages/` (docs/store-next.md,
/// "Large bodies written once"). Smaller ones are not worth a second `fdatasync`.
const WRITTEN_FIRST_FROM: usize = 64 << 10;
/// Longest message the store takes, and so the longest record read back (anything longer
/// is a damaged `ends` file). Above what any gRPC call may carry (64 MiB).
const MAX_MESSAGE: u64 = 256 << 20;
/// The store's layout, recorded at every open. A store recorded with a later layout than
/// this binary's is refused.
/// - 1: messages over 4 KiB are in `messages/`, which a binary from before it
///   does not read.
/// - 2: outbox entries are not indexed by message id; a binary of layout 1 looks a settled
///   one up by id, finds nothing, and would send it again for ever. An event key's value
///   lists the transaction's later entries naming the message, which layout 1 ignores.
/// - 3: a receipt's record may carry its transaction's log entries naming the message
///   ([`receipt_record`]), which layout 2 reads as a damaged receipt.
/// - 4: checkpoints write runs (`runs/`), which hold every write since the upgrade; sled
///   holds only what was written before it, and a binary of layout 3 would miss the rest.
/// - 5: the last checkpoint is recorded beside the runs (`runs.last`, `run_set.rs`), and
///   a store without the record is refused. A binary of layout 4 would write runs without
///   recording them, and the next open would refuse the store as one that lost them.
/// - 6: a group holding a message record of [`WRITTEN_FIRST_FROM`] bytes or more writes its
///   message records before its write-ahead log record, which names them
///   ([`WrittenFirst`]); a binary of layout 5 would read such a write as the removal of a
///   message record.
const FORMAT: u64 = 6;
/// The first layout that records the runs' last checkpoint: an open of an earlier one
/// writes the record from the runs it finds ([`RunSet::adopt`]).
const RECORDED_FROM: u64 = 5;
const META_FORMAT: &[u8] = b"sfmt";
/// Recorded with the layout by an open that upgrades, removed once the open made sled
/// durable after its last migration: present at an open, it says the last one stopped in
/// between.
const META_UPGRADING: &[u8] = b"supg";

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        StoreError::Engine(e.to_string())
    }
}

impl From<WalError> for StoreError {
    fn from(e: WalError) -> Self {
        match e {
            WalError::Io(e) => StoreError::Io(e),
            damaged @ WalError::Damaged { .. } => StoreError::Engine(damaged.to_string()),
        }
    }
}

/// What the store, its committer and its checkpointer share. The two sizes make the quota's
/// figure without listing and stat-ing files on every submit.
#[derive(Debug, Default)]
struct Progress {
    /// The runs, sled's files, the log's and the message files, as of the last checkpoint.
    stored_bytes: AtomicU64,
    /// Write-ahead log segments not yet deleted.
    wal_bytes: AtomicU64,
    /// Message records written before their log records ([`WRITTEN_FIRST_FROM`]) that no
    /// checkpoint has counted in `stored_bytes` yet.
    written_first_bytes: AtomicU64,
    /// Set after a failed write or sync: what is on disk is unknown, so every later commit
    /// fails until a restart replays the log.
    poisoned: Mutex<Option<String>>,
}

impl Progress {
    fn poison(&self, why: String) {
        // Set before it is logged: whoever looks meanwhile is refused. Logged once: the
        // first failure is the one that matters.
        let first = match self.poisoned.lock() {
            Ok(mut p) => {
                let first = p.is_none();
                p.get_or_insert(why.clone());
                first
            }
            Err(_) => true,
        };
        if first {
            tracing::error!(error = %why, "store write failed; refusing further writes");
        }
    }

    fn poisoned(&self) -> Option<String> {
        self.poisoned.lock().ok().and_then(|p| p.clone())
    }
}

type Reply = oneshot::Sender<Result<TxOutcome, StoreError>>;

struct Pending {
    tx: Tx,
    reply: Reply,
}

/// The store. Dropping it drains pending commits, writes what is held as a run and closes
/// it.
pub struct SledStore {
    db: sled::Db,
    log: Arc<LogFiles>,
    messages: Arc<Records>,
    /// Held for writing while a group is answered and applied ([`apply`]) and while the
    /// checkpointer swaps the held writes or the runs, for reading by every read
    /// ([`Applied`]).
    applying: Arc<RwLock<Applied>>,
    progress: Arc<Progress>,
    /// Commit groups the last open replayed from the write-ahead log.
    replayed_groups: u64,
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
    /// Opens (or creates) the store at `path`, replaying whatever the write-ahead log holds
    /// beyond the last checkpoint. `cache_bytes` bounds the runs' blocks kept in memory for
    /// reads, and sled's page cache, which only a store made before layout 4 fills.
    pub fn open(path: &Path, cache_bytes: u64) -> Result<Self, StoreError> {
        let (committer, replayed_groups) = recover(path, cache_bytes)?;
        let (db, progress) = (committer.db.clone(), committer.progress.clone());
        let log = committer.log.clone();
        let messages = committer.messages.clone();
        let applying = committer.applying.clone();
        let (sender, receiver) = mpsc::channel();
        let handle = std::thread::Builder::new()
            .name("accord-store-commit".into())
            .spawn(move || committer.run(receiver))?;
        Ok(Self {
            db,
            log,
            messages,
            applying,
            progress,
            replayed_groups,
            path: path.to_owned(),
            sender: Mutex::new(Some(sender)),
            committer: Mutex::new(Some(handle)),
        })
    }
}

/// Opens sled and the runs, replays the write-ahead log over them, writes what it replayed
/// as a run, starts the checkpointer and returns the committer that will own the write
/// side, with how many groups were replayed.
fn recover(path: &Path, cache_bytes: u64) -> Result<(Committer, u64), StoreError> {
    std::fs::create_dir_all(path)?;
    let db = open_sled(path, cache_bytes)?;
    // Before anything is read or replayed in a layout this binary may not know.
    check_format(&db, path)?;
    // An open that upgrades (or makes a new store) makes sled durable, blob files
    // included, after each migration below: they write to sled outside the write-ahead
    // log. An open that stops half way upgrades again next time: before the layout is
    // recorded, by its number; after, by the mark recorded with it, which goes once all is
    // durable.
    // The layout the store was last opened at: nothing below records a new one before
    // `record_format`.
    let format = read_meta(&db, META_FORMAT)?;
    let upgrading = format < FORMAT || read_meta(&db, META_UPGRADING)? != 0;
    let wal_dir = path.join("wal");
    std::fs::create_dir_all(&wal_dir)?;
    let log = Arc::new(LogFiles::open(&path.join("log"))?);
    let messages = Arc::new(Records::open(&path.join("messages"), MAX_MESSAGE)?);
    let runs_dir = path.join("runs");
    let restore = "Restore the whole store from one backup: sled, runs/, runs.last, log/, \
                   messages/ and wal/ together";
    // sled makes new files where its own are missing: a store that lost them (or kept only
    // the other folders from a backup) would open as new, at log size 0, and the next
    // commit would write over the log's first entries. Runs are written from layout 4 on,
    // so sled must record layout 4 or later beside them. Files in `log/` or `messages/` are
    // written at each commit, and need an index in sled unless the write-ahead log holds
    // everything since the store was made: its first segment, which the first checkpoint
    // deletes, is still there (binaries before 797925f did not make a new store's sled
    // durable before its first checkpoint).
    let runs_written = run_set::written(&runs_dir)
        .map_err(|e| log_read_error(e, format!("the runs in {}", runs_dir.display())))?;
    let sled_empty = db.iter().next().transpose()?.is_none();
    let wal_whole = || -> Result<bool, StoreError> {
        Ok(wal::segments(&wal_dir)?.first().is_some_and(|s| s.0 == 1))
    };
    let files_written =
        || -> Result<bool, StoreError> { Ok(log.bytes()? > 0 || messages.bytes()? > 0) };
    if (format < 4 && runs_written) || (sled_empty && files_written()? && !wal_whole()?) {
        return Err(StoreError::Corrupt(format!(
            "sled's files in {} are missing, new, or older than the folders beside them, \
             which hold the store's writes. {restore}",
            path.display()
        )));
    }
    if format >= 4 && !runs_dir.exists() {
        return Err(StoreError::Corrupt(format!(
            "{} is missing: the store's layout keeps every write since its upgrade there. \
             {restore}",
            runs_dir.display()
        )));
    }
    let runs = if format < RECORDED_FROM {
        RunSet::adopt(&runs_dir, false)
    } else {
        RunSet::open(&runs_dir, false)
    };
    let mut runs = runs
        .map_err(|e| match e.kind() {
            // The error names the folder, and what was lost or damaged in it.
            std::io::ErrorKind::InvalidData => StoreError::Corrupt(format!("{e}. {restore}")),
            _ => log_read_error(e, format!("the runs in {}", runs_dir.display())),
        })?
        .with_put_once(is_put_once)
        .with_cache_bytes(usize::try_from(cache_bytes).unwrap_or(usize::MAX));
    // The directory entries of sled's files and of the four folders must survive a power
    // cut too.
    sync_dir(path)?;
    let sled_files = SledFiles {
        db: db.clone(),
        log_file: File::open(path.join("db"))?,
        blob_dir: path.join("blobs"),
        log: log.clone(),
        messages: messages.clone(),
    };
    move_log_out_of_sled(&sled_files)?;
    let applying = Arc::new(RwLock::new(Applied {
        runs: runs.runs(),
        // Until the migrations are done, below.
        sled_holds_queue_keys: true,
        ..Applied::default()
    }));
    let (last_segment, replayed_groups) = {
        let mut applied = applying
            .write()
            .map_err(|_| StoreError::Engine(PANICKED.into()))?;
        replay(&db, &log, &messages, &mut applied, &wal_dir).map_err(|e| match e {
            // Files that end before the records the log adds to: restored without them.
            StoreError::Io(e) => log_read_error(
                e,
                format!(
                    "replaying the write-ahead log in {} into the files beside sled. {restore}",
                    wal_dir.display()
                ),
            ),
            other => other,
        })?
    };
    let meta = |key: &[u8]| -> Result<u64, StoreError> {
        let applied = applying
            .read()
            .map_err(|_| StoreError::Engine(PANICKED.into()))?;
        applied.read_meta(&db, key)
    };
    log.check_holds(meta(META_LOG)?).map_err(|e| {
        let what = format!(
            "the log's files in {}: the store records more entries than they hold. {restore}",
            path.join("log").display()
        );
        log_read_error(e, what)
    })?;
    messages.check_holds(meta(META_MESSAGES)?).map_err(|e| {
        let what = format!(
            "the message files in {}: the store records more messages than they hold. \
             {restore}",
            path.join("messages").display()
        );
        log_read_error(e, what)
    })?;
    if upgrading {
        // No write reaches sled from this layout on: what earlier ones left in sled's
        // buffers and new blob files is made durable once, before the layout is recorded
        // (whose flush would make sled's log durable before those files).
        sled_files.make_durable()?;
    }
    // Once the open can no longer fail on what the store holds, and before this binary
    // writes anything in its layout, runs included.
    record_format(&db, path)?;
    if drop_outbox_index(&db)? > 0 || upgrading {
        db.remove(META_UPGRADING)?;
        sled_files.make_durable()?;
    }
    // sled takes no more writes: whether it holds queue keys, the only ones ever removed,
    // is settled. A store made at layout 4 holds none, and its removals need not hide
    // anything in sled.
    let sled_holds_queue_keys =
        db.scan_prefix(b"q").next().is_some() || db.scan_prefix(b"x").next().is_some();
    runs.set_nothing_below(!sled_holds_queue_keys);
    let mut sled_keys = db.iter().keys();
    let sled_holds_only_layout = loop {
        match sled_keys.next().transpose()? {
            Some(key) if &*key == META_FORMAT => {}
            Some(_) => break false,
            None => break true,
        }
    };
    {
        let mut applied = applying
            .write()
            .map_err(|_| StoreError::Engine(PANICKED.into()))?;
        applied.sled_holds_queue_keys = sled_holds_queue_keys;
        applied.sled_holds_only_layout = sled_holds_only_layout;
    }
    if replayed_groups > 0 {
        tracing::info!(
            groups = replayed_groups,
            "replayed the write-ahead log; writing it as a run"
        );
    }
    let progress = Arc::new(Progress::default());
    let mut checkpointer = Checkpointer {
        progress: progress.clone(),
        applying: applying.clone(),
        log: log.clone(),
        messages: messages.clone(),
        runs,
        merges_stopped: false,
        sled_bytes: sled_files.bytes()?,
    };
    // What the replay held is written as a run before anything is answered, and the
    // segments it came from go.
    checkpointer.checkpoint(&wal_dir, last_segment, Merge::Not)?;
    wal::remove_spares(&wal_dir)?;
    let segment = Segment::create(&wal_dir, last_segment + 1)?;
    progress.wal_bytes.store(segment.len(), Ordering::Relaxed);
    let (checkpoints, checkpoint_requests) = mpsc::channel();
    let checkpointer = {
        let wal_dir = wal_dir.clone();
        std::thread::Builder::new()
            .name("accord-store-checkpoint".into())
            .spawn(move || run_checkpoints(checkpointer, wal_dir, checkpoint_requests))?
    };
    let committer = Committer {
        progress,
        next_log: meta(META_LOG)?,
        next_seq: meta(META_SEQ)?,
        next_message: meta(META_MESSAGES)?,
        db,
        log,
        messages,
        applying,
        wal_dir,
        segment,
        segment_opened: Instant::now(),
        checkpoints,
        checkpointer: Some(checkpointer),
        max_message: MAX_MESSAGE,
    };
    Ok((committer, replayed_groups))
}

/// Refuses a store whose recorded layout is later than [`FORMAT`].
fn check_format(db: &sled::Db, path: &Path) -> Result<(), StoreError> {
    let found = read_meta(db, META_FORMAT)?;
    if found > FORMAT {
        return Err(StoreError::Engine(format!(
            "the store in {} has layout {found}, written by a later version of Accord; this \
             one reads layouts up to {FORMAT}. Run that version or a later one",
            path.display()
        )));
    }
    Ok(())
}

/// Records [`FORMAT`] if the store has an earlier layout, durably (sled's flush, then an
/// `fdatasync` of its file): an earlier binary opening the store after a power cut must
/// find the layout it cannot read before it finds anything written in it.
fn record_format(db: &sled::Db, path: &Path) -> Result<(), StoreError> {
    if read_meta(db, META_FORMAT)? < FORMAT {
        db.insert(META_FORMAT, FORMAT.to_be_bytes().as_slice())?;
        db.insert(META_UPGRADING, 1u64.to_be_bytes().as_slice())?;
        db.flush()?;
        File::open(path.join("db"))?.sync_data()?;
    }
    Ok(())
}

/// Opens sled without its flusher thread (the migrations make it durable), waiting up to
/// [`LOCK_WAIT`] for the lock of a store just closed in this process.
fn open_sled(path: &Path, cache_bytes: u64) -> Result<sled::Db, StoreError> {
    let started = Instant::now();
    loop {
        match sled::Config::new()
            .path(path)
            // sled asserts at least 256 bytes; a bound below keeps no run's blocks, and
            // gives sled the least it takes.
            .cache_capacity(cache_bytes.max(256))
            .flush_every_ms(None)
            .open()
        {
            Err(sled::Error::Io(e)) if lock_held(&e) => {
                if started.elapsed() >= LOCK_WAIT {
                    return Err(StoreError::InUse(path.to_owned()));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            opened => return Ok(opened?),
        }
    }
}

impl SledStore {
    /// A message's record as `read` takes it from `messages/` by its number, or whole
    /// from sled where a layout before 4 kept it; `None` for an unknown id.
    fn message_record(
        &self,
        id: &MessageId,
        read: impl FnOnce(&Records, u64) -> std::io::Result<Vec<u8>>,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let whole = self.whole_groups()?;
        let corrupt = || StoreError::Corrupt(format!("message {id}"));
        match whole.get(&self.db, &message_number_key(id))? {
            Some(number) => {
                let number =
                    u64::from_be_bytes(number.as_slice().try_into().map_err(|_| corrupt())?);
                if number >= whole.read_meta(&self.db, META_MESSAGES)? {
                    return Err(corrupt());
                }
                read(&self.messages, number)
                    .map(Some)
                    .map_err(|e| log_read_error(e, format!("message {id}, record {number}")))
            }
            // Kept in sled by a layout before 4, if at all.
            None => whole.get(&self.db, &message_key(id)),
        }
    }

    /// Waits for the group being applied, if any, so that what follows sees whole groups.
    fn whole_groups(&self) -> Result<RwLockReadGuard<'_, Applied>, StoreError> {
        let applied = self
            .applying
            .read()
            .map_err(|_| StoreError::Engine(PANICKED.into()))?;
        if applied.failed {
            return Err(StoreError::Engine(APPLY_FAILED.into()));
        }
        Ok(applied)
    }

    /// Commit groups the last open replayed from the write-ahead log: zero after a clean
    /// close, more after a crash.
    pub fn replayed_groups(&self) -> u64 {
        self.replayed_groups
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

/// Applies every record left in the write-ahead log over what the runs and sled hold,
/// oldest first. Returns the last segment's number (0 if there is none) and how many
/// records were applied.
fn replay(
    db: &sled::Db,
    log: &LogFiles,
    messages: &Records,
    applied: &mut Applied,
    wal_dir: &Path,
) -> Result<(u64, u64), StoreError> {
    let segments = wal::segments(wal_dir)?;
    let mut replayed = 0;
    for (i, (_, path, _)) in segments.iter().enumerate() {
        let contents = wal::read_segment(path, i + 1 == segments.len())?;
        if contents.torn_bytes > 0 {
            tracing::warn!(
                segment = %path.display(),
                bytes = contents.torn_bytes,
                "dropped the torn last record of the write-ahead log: a commit a crash cut \
                 short, never acknowledged"
            );
        }
        for group in &contents.groups {
            apply(db, log, messages, group, applied, Replay::Yes)?;
            replayed += 1;
        }
    }
    Ok((segments.last().map_or(0, |s| s.0), replayed))
}

/// Whether [`apply`] is replaying the write-ahead log.
#[derive(Clone, Copy, PartialEq)]
enum Replay {
    Yes,
    No,
}

/// Writes a group into the log's files, the message files and the held writes
/// ([`Applied::held`]), key by key: how a commit reaches them, and how replay does. A crash
/// part way leaves some of them written; replaying the group's record completes it.
///
/// A replay may find a write already in a run (a checkpoint wrote it, then the crash came
/// before its segments were deleted): such a write changes nothing readers see, and is
/// skipped, so that a queue entry's key is put in one run only, as [`is_put_once`] needs.
fn apply(
    db: &sled::Db,
    log: &LogFiles,
    messages: &Records,
    group: &WalGroup,
    applied: &mut Applied,
    replay: Replay,
) -> Result<(), StoreError> {
    let (mut entries, mut nodes, mut records) = (Vec::new(), Vec::new(), Vec::new());
    let mut written_first = Vec::new();
    for write in &group.writes {
        let target = file_write(&write.key);
        let names_a_record = matches!((&target, &write.value), (Some(FileWrite::Message(_)), None));
        if write.written_first.is_some() && !names_a_record {
            return Err(StoreError::Corrupt(
                "a write-ahead log write names a record it holds too, or one of another kind"
                    .into(),
            ));
        }
        match (target, &write.value) {
            (Some(FileWrite::Entry(index)), Some(value)) => entries.push((index, value.as_slice())),
            (Some(FileWrite::Node(position)), Some(value)) => {
                nodes.push((position, value.as_slice()))
            }
            (Some(FileWrite::Message(number)), Some(value)) => {
                records.push((number, value.as_slice()))
            }
            // Written and synced before the log record: a commit finds it in place, a
            // replay reads it back, checked against the record's checksum, and writes it
            // again with its place in `ends`.
            (Some(FileWrite::Message(number)), None) => match write.written_first {
                Some(named) if replay == Replay::Yes => written_first.push((number, named)),
                Some(_) => {}
                None => return Err(StoreError::Corrupt("a removal of a message record".into())),
            },
            (Some(_), None) => {
                return Err(StoreError::Corrupt(
                    "a removal of a log entry, tree node or message record".into(),
                ))
            }
            (None, value) => {
                if replay == Replay::Yes
                    && (is_outbox_index_key(&write.key) || applied.get(db, &write.key)? == *value)
                {
                    continue;
                }
                match value {
                    Some(value) => applied.put(db, &write.key, value)?,
                    None => applied.remove(db, &write.key)?,
                }
            }
        }
    }
    let read_back = messages.read_written(&written_first)?;
    records.extend(
        written_first
            .iter()
            .map(|(number, _)| *number)
            .zip(read_back.iter().map(Vec::as_slice)),
    );
    // A group's records are all written first or all held (`Committer::log`), so either
    // list is in order alone; `Records::write` refuses a mix, which no group holds.
    messages.write(&records)?;
    Ok(log.write(&entries, &mut nodes)?)
}

/// Whether sled failed to open because another open file holds its lock: sled 0.34 says so
/// only in the message of an `Other` I/O error, which holds the `Debug` form of flock's.
fn lock_held(e: &std::io::Error) -> bool {
    let message = e.to_string();
    message.contains("could not acquire lock") && message.contains("WouldBlock")
}

/// A read of the log's files that failed: damaged or cut-short files are corruption, any
/// other error the device's.
fn log_read_error(e: std::io::Error, what: String) -> StoreError {
    match e.kind() {
        std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof => {
            StoreError::Corrupt(format!("{what}: {e}"))
        }
        _ => StoreError::Io(e),
    }
}

/// Where a group's write goes when it is not to the held writes.
enum FileWrite {
    /// A log entry, by index.
    Entry(u64),
    /// A tree node's position ([`log_files::node_position`]).
    Node(u64),
    /// A message record, by number.
    Message(u64),
}

fn file_write(key: &[u8]) -> Option<FileWrite> {
    match key {
        [b'l', index @ ..] => Some(FileWrite::Entry(u64::from_be_bytes(index.try_into().ok()?))),
        [b'n', level, index @ ..] => Some(FileWrite::Node(log_files::node_position(
            u32::from(*level),
            u64::from_be_bytes(index.try_into().ok()?),
        )?)),
        [b'M', number @ ..] => Some(FileWrite::Message(u64::from_be_bytes(
            number.try_into().ok()?,
        ))),
        _ => None,
    }
}

/// Stores of an earlier version kept the log's entries and nodes in sled: moves them to
/// the log's files, syncs those, then removes them from sled. A crash part way repeats it
/// at the next open, writing the same bytes again.
fn move_log_out_of_sled(files: &SledFiles) -> Result<(), StoreError> {
    let (db, log, messages) = (&files.db, &*files.log, &*files.messages);
    let in_sled = |prefix: &[u8]| db.scan_prefix(prefix).next().is_some();
    if !in_sled(b"l") && !in_sled(b"n") {
        return Ok(());
    }
    tracing::info!("moving the log's entries and tree nodes out of sled into log/");
    let mut moved = 0u64;
    // Every write of these batches goes to the log's files: nothing is held.
    let mut nothing_held = Applied::default();
    for family in [b"l", b"n"] {
        let mut batch = WalGroup::default();
        for kv in db.scan_prefix(family) {
            let (key, value) = kv?;
            batch.writes.push(WalWrite {
                key: key.to_vec(),
                value: Some(value.to_vec()),
                written_first: None,
            });
            if batch.writes.len() == 4096 {
                let batch = std::mem::take(&mut batch);
                apply(db, log, messages, &batch, &mut nothing_held, Replay::No)?;
            }
            moved += 1;
        }
        apply(db, log, messages, &batch, &mut nothing_held, Replay::No)?;
    }
    log.sync()?;
    for family in [b"l", b"n"] {
        for key in db.scan_prefix(family).keys() {
            db.remove(key?)?;
        }
    }
    files.make_durable()?;
    tracing::info!(records = moved, "moved the log out of sled");
    Ok(())
}

/// Stores of layout 1 indexed outbox entries by message id (`x ‖ "o:" ‖ country ‖ 0x00 ‖
/// id`); nothing reads those keys now. Removed straight from sled, after the layout is
/// recorded (a binary of layout 1 must not find them missing); returns how many, and the
/// open then makes sled durable. A crash before that leaves some, and the next open removes
/// them. A replay leaves out the ones a layout-1 group in the write-ahead log wrote
/// ([`is_outbox_index_key`]).
fn drop_outbox_index(db: &sled::Db) -> Result<u64, StoreError> {
    let mut dropped = 0u64;
    for key in db.scan_prefix(OUTBOX_INDEX).keys() {
        db.remove(key?)?;
        dropped += 1;
    }
    if dropped > 0 {
        tracing::info!(keys = dropped, "dropped the outbox's index by message id");
    }
    Ok(dropped)
}

/// What layout 1's outbox index keys start with ([`drop_outbox_index`]).
const OUTBOX_INDEX: &[u8] = b"xo:";

fn is_outbox_index_key(key: &[u8]) -> bool {
    key.starts_with(OUTBOX_INDEX)
}

/// A metadata counter as sled holds it (the layout and its mark), 0 if never written.
fn read_meta(db: &sled::Db, key: &[u8]) -> Result<u64, StoreError> {
    meta_number(key, db.get(key)?.as_deref())
}

/// A metadata counter's value, 0 if never written.
fn meta_number(key: &[u8], value: Option<&[u8]>) -> Result<u64, StoreError> {
    let Some(value) = value else { return Ok(0) };
    let bytes = value
        .try_into()
        .map_err(|_| StoreError::Corrupt(String::from_utf8_lossy(key).into()))?;
    Ok(u64::from_be_bytes(bytes))
}

fn sync_dir(path: &Path) -> std::io::Result<()> {
    File::open(path)?.sync_all()
}

fn message_key(id: &MessageId) -> Vec<u8> {
    [b"m".as_slice(), id.as_bytes()].concat()
}

fn message_number_key(id: &MessageId) -> Vec<u8> {
    [b"v".as_slice(), id.as_bytes()].concat()
}

fn message_record_key(number: u64) -> [u8; 9] {
    let mut k = [b'M'; 9];
    k[1..].copy_from_slice(&number.to_be_bytes());
    k
}

fn receipt_prefix(id: &MessageId) -> Vec<u8> {
    [b"r".as_slice(), id.as_bytes()].concat()
}

/// A receipt's record with the log entries of its transaction that name its message
/// (`index(8)…`, ascending): `0x00 ‖ u32be(len(receipt)) ‖ receipt ‖ indexes`. It spares the
/// transaction its `e` key, a write for nearly every message's every step. A record
/// without entries is the receipt's bytes alone, which never start with 0x00 (no protobuf
/// field has number 0).
fn receipt_record(receipt: &[u8], indexes: &[u8]) -> Vec<u8> {
    let len = u32::try_from(receipt.len()).expect("a receipt is far under 4 GiB");
    [&[0u8][..], &len.to_be_bytes(), receipt, indexes].concat()
}

/// A receipt record's receipt bytes and the log entries it carries (`index(8)…`, maybe
/// none); None if it is damaged.
fn split_receipt_record(record: &[u8]) -> Option<(&[u8], &[u8])> {
    let Some((0, rest)) = record.split_first() else {
        return Some((record, &[]));
    };
    let (len, rest) = rest.split_first_chunk::<4>()?;
    let (receipt, indexes) = rest.split_at_checked(u32::from_be_bytes(*len) as usize)?;
    (!indexes.is_empty() && indexes.len() % 8 == 0).then_some((receipt, indexes))
}

/// The priority byte of a queue key that sorts after every priority: deferred entries. The
/// entry's priority byte follows it, so deferred entries keep a priority order among
/// themselves.
const DEFERRED_BAND: u8 = 255;

/// The lowest priority's byte (ROUTINE).
const LOWEST_PRIORITY: u8 = 254;

/// The key outbox entry `key` takes when deferred with sequence number `seq`:
/// `q ‖ o:cc ‖ 0x00 ‖ 255 ‖ priority byte ‖ seq(8)`. The first deferral keeps the entry's
/// priority; each later one lowers it a step, so that high-priority entries the peer keeps
/// putting off cannot hold the deferred ones behind them back for ever. None for anything
/// but an outbox entry's key. (A band-255 key without a priority byte, as c3b73b2 and
/// 45ca78a wrote them, sorts ahead of the other deferred entries until it is deferred
/// again, and then as ROUTINE.)
fn deferred_key(key: &[u8], seq: u64) -> Option<Vec<u8>> {
    // q, "o:", a two-letter country code, 0x00.
    const PREFIX: usize = 6;
    if !key.starts_with(b"qo:") || key.get(PREFIX - 1) != Some(&0) {
        return None;
    }
    let priority = match (key.len() - PREFIX, key[PREFIX..].first()) {
        (10, Some(&DEFERRED_BAND)) => key[PREFIX + 1].saturating_add(1).min(LOWEST_PRIORITY),
        (9, Some(&DEFERRED_BAND)) => LOWEST_PRIORITY,
        (9, Some(&band)) => band,
        _ => return None,
    };
    let mut moved = key[..PREFIX].to_vec();
    moved.extend_from_slice(&[DEFERRED_BAND, priority]);
    moved.extend_from_slice(&seq.to_be_bytes());
    Some(moved)
}

/// The outbox entry under `key` as a transaction being built sees it: its own writes first
/// (what it took off or moved already is gone), then the view.
fn outbox_entry(
    writes: &[(Vec<u8>, Option<Vec<u8>>)],
    view: &View<'_>,
    key: &[u8],
) -> Result<Option<QueueEntry>, StoreError> {
    let value = match writes.iter().rev().find(|(k, _)| k.as_slice() == key) {
        Some((_, value)) => value.clone(),
        None => view.get(key)?,
    };
    value
        .map(|v| {
            QueueEntry::decode(v.as_slice()).map_err(|_| StoreError::Corrupt("outbox entry".into()))
        })
        .transpose()
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

fn inbox_index_key(org: &OrgId, id: &[u8]) -> Vec<u8> {
    let mut key = queue_prefix(&Queue::Inbox(org.clone()));
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

fn log_key(index: u64) -> [u8; 9] {
    let mut k = [b'l'; 9];
    k[1..].copy_from_slice(&index.to_be_bytes());
    k
}

fn parse_node(value: Option<&[u8]>, level: u32, index: u64) -> Result<Hash, ProofError> {
    value
        .ok_or(ProofError::MissingNode { level, index })?
        .try_into()
        .map_err(|_| ProofError::Storage("corrupt tree node".into()))
}

/// Writes of the group being built, by key (`None`: removed); the last write of a key wins.
type GroupWrites = BTreeMap<Vec<u8>, Option<Vec<u8>>>;

/// What applied groups left where readers see it, behind [`SledStore::applying`]: the held
/// writes, over the run being written, over the runs, over sled. A key's value is the first
/// of these that names it.
#[derive(Default)]
struct Applied {
    /// A write failed part way through a group (an apply): the files beside the runs may
    /// hold part of it, and reads and builds fail until a restart replays the log.
    failed: bool,
    /// Writes applied since the checkpointer last took them.
    held: HeldWrites,
    /// The writes a checkpoint is writing as a run, until that run is in `runs`; kept after
    /// a failed write, so that readers still find them while the store stops.
    writing: Option<Arc<HeldWrites>>,
    /// The runs, newest first, as the checkpointer last installed them.
    runs: Arc<Vec<Arc<Named>>>,
    /// Whether sled holds queue keys (from before layout 4), which a removal must hide.
    sled_holds_queue_keys: bool,
    /// Whether sled holds nothing but the layout number, which reads never ask it for (a
    /// store made at layout 4 or later): reads then pass it by.
    sled_holds_only_layout: bool,
    queue_starts: QueueStarts,
}

/// Why the store stops once a thread panicked holding [`SledStore::applying`] (the committer
/// applying a group, the checkpointer swapping what readers see): what it held may be
/// half changed, so nothing is read or built over it.
const PANICKED: &str = "a store thread panicked while applying writes; restart the gateway to \
                        replay the write-ahead log";

/// Why the store stops once a write failed part way through a group ([`Applied::failed`]).
const APPLY_FAILED: &str = "a write failed part way through a commit group; restart the \
                            gateway to replay the write-ahead log";

/// Whether a key is a queue's: an entry (`q`) or the inbox index (`x`). Only these are ever
/// removed, so only these need to know whether a removal has anything to hide
/// ([`Held::Put`]).
fn is_queue_key(key: &[u8]) -> bool {
    matches!(key.first(), Some(b'q' | b'x'))
}

/// Whether a key is written once only: a queue entry's (`q`), which holds a sequence
/// number never used again, so that a merge may drop its removal with its value
/// ([`RunSet::with_put_once`]). The inbox index (`x`) is not: it is named by message id.
fn is_put_once(key: &[u8]) -> bool {
    key.first() == Some(&b'q')
}

/// Writes applied since a checkpoint, by key, held in memory over the runs and sled until
/// the checkpointer writes them as a run (docs/store-next.md). A queue entry, its inbox
/// index key and the receipt queued back to the sender all leave within a fraction of a
/// second of their insert (docs/performance.md, "How long queue entries live"): one that
/// leaves before the next checkpoint never reaches a run, and leaves no removal there. The
/// write-ahead log holds the writes until their run is durable, and a restart replays them.
#[derive(Default)]
struct HeldWrites(BTreeMap<Vec<u8>, Held>);

type KeyValue = (Vec<u8>, Vec<u8>);

#[derive(Debug)]
enum Held {
    /// The key's value; `over_disk` if a run, the run being written or sled may hold an
    /// older value of the key (always, for keys never removed).
    Put { value: Vec<u8>, over_disk: bool },
    /// Removed since the checkpointer last took the held writes; something below may hold
    /// it.
    Removed,
}

impl Held {
    /// What a run records for the key: its value, or its removal.
    fn value(&self) -> Option<&[u8]> {
        match self {
            Held::Put { value, .. } => Some(value),
            Held::Removed => None,
        }
    }
}

/// A source of entries for [`runs::Merged`]: held writes, a run, or sled.
type Source<'a> = Box<dyn Iterator<Item = std::io::Result<(Vec<u8>, runs::Held)>> + 'a>;

impl Applied {
    /// The held writes, then the ones being written as a run.
    fn maps(&self) -> impl Iterator<Item = &HeldWrites> {
        std::iter::once(&self.held).chain(self.writing.as_deref())
    }

    /// `key`'s value as readers see it.
    fn get(&self, db: &sled::Db, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        for map in self.maps() {
            if let Some(held) = map.0.get(key) {
                return Ok(held.value().map(<[u8]>::to_vec));
            }
        }
        let probe = runs::Probe::new(key);
        for named in self.runs.iter() {
            let found = named.run.get_probed(&probe).map_err(run_read_error)?;
            if let Some(held) = found {
                return Ok(held);
            }
        }
        if self.sled_holds_only_layout {
            return Ok(None);
        }
        Ok(db.get(key)?.map(|v| v.to_vec()))
    }

    /// Whether readers see `key`.
    fn contains(&self, db: &sled::Db, key: &[u8]) -> Result<bool, StoreError> {
        Ok(self.get(db, key)?.is_some())
    }

    /// A metadata counter (`s…`), 0 if never written.
    fn read_meta(&self, db: &sled::Db, key: &[u8]) -> Result<u64, StoreError> {
        meta_number(key, self.get(db, key)?.as_deref())
    }

    /// Whether something below the held writes may hold queue key `key`: the run being
    /// written, a run's filter (in memory; about 1% of absent keys pass), or sled.
    fn may_be_below(&self, db: &sled::Db, key: &[u8]) -> Result<bool, StoreError> {
        Ok(self.writing.as_ref().is_some_and(|w| w.0.contains_key(key))
            || {
                let probe = runs::Probe::new(key);
                self.runs.iter().any(|named| named.run.may_hold(&probe))
            }
            || (self.sled_holds_queue_keys && db.contains_key(key)?))
    }

    /// Removes `key`, leaving a removal held only if something below may hold it: a queue
    /// entry that leaves before the checkpoint, or a key removed again (a retried dequeue),
    /// leaves nothing in the runs.
    fn remove(&mut self, db: &sled::Db, key: &[u8]) -> Result<(), StoreError> {
        let hides_something = match self.held.0.get(key) {
            Some(Held::Put { over_disk, .. }) => *over_disk,
            Some(Held::Removed) => true,
            None => !is_queue_key(key) || self.may_be_below(db, key)?,
        };
        if hides_something {
            self.held.0.insert(key.to_vec(), Held::Removed);
        } else {
            self.held.0.remove(key);
        }
        Ok(())
    }

    fn put(&mut self, db: &sled::Db, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        let over_disk = match self.held.0.get(key) {
            Some(Held::Put { over_disk, .. }) => *over_disk,
            Some(Held::Removed) => true,
            None => !is_queue_key(key) || self.may_be_below(db, key)?,
        };
        if is_put_once(key) {
            self.queue_starts.lower_to(key);
        }
        let value = value.to_vec();
        self.held
            .0
            .insert(key.to_vec(), Held::Put { value, over_disk });
        Ok(())
    }

    /// The first `limit` keys and values under `prefix` as readers see them, in key order:
    /// the held writes, the run being written, the runs and sled merged, the newest of each
    /// key winning and removals hiding what is below them.
    fn scan(
        &self,
        db: &sled::Db,
        prefix: &[u8],
        limit: usize,
    ) -> Result<Vec<KeyValue>, StoreError> {
        let mut out = Vec::new();
        for entry in self.sources(db, prefix, prefix) {
            if out.len() >= limit {
                break;
            }
            if let (key, Some(value)) = entry.map_err(run_read_error)? {
                out.push((key, value));
            }
        }
        Ok(out)
    }

    /// What [`Applied::scan`] merges, from key `from` on (at least `prefix`): the held
    /// writes, the run being written, the runs (newest first), then sled.
    fn sources<'a>(
        &'a self,
        db: &'a sled::Db,
        prefix: &'a [u8],
        from: &[u8],
    ) -> runs::Merged<Source<'a>> {
        let from = from.max(prefix).to_vec();
        let mut sources: Vec<Source<'a>> = Vec::with_capacity(self.runs.len() + 3);
        for map in self.maps() {
            let under = map.0.range(from.clone()..);
            let under = under.take_while(move |(k, _)| k.starts_with(prefix));
            sources.push(Box::new(
                under.map(|(k, held)| Ok((k.clone(), held.value().map(<[u8]>::to_vec)))),
            ));
        }
        for named in self.runs.iter() {
            sources.push(Box::new(named.run.scan_from(prefix, &from)));
        }
        if !self.sled_holds_only_layout {
            let in_sled = db.range(from..).take_while(move |kv| match kv {
                Ok((k, _)) => k.starts_with(prefix),
                Err(_) => true,
            });
            sources.push(Box::new(in_sled.map(|kv| {
                kv.map(|(k, v)| (k.to_vec(), Some(v.to_vec())))
                    .map_err(|e| std::io::Error::other(format!("sled, under the runs: {e}")))
            })));
        }
        runs::Merged::new(sources)
    }

    /// A queue's first `limit` entries as [`Applied::scan`] reads them, each priority band
    /// read from where the last scan found its first live entry ([`QueueStarts`]).
    fn queue(
        &self,
        db: &sled::Db,
        prefix: &[u8],
        limit: usize,
    ) -> Result<Vec<KeyValue>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let starts = self.queue_starts.bands(prefix);
        let band_of = |key: &[u8]| key.get(prefix.len()).copied();
        let mut out = Vec::new();
        // Per band walked, a start for the next scan: its first live entry, or, while none
        // was found, past the last key stepped on. A band is entered at its first key, or
        // at its start, below which it holds nothing live.
        let mut learned = BandStarts::new();
        let mut found_live = std::collections::BTreeSet::new();
        let mut from = prefix.to_vec();
        'jump: loop {
            let mut band = None;
            for entry in self.sources(db, prefix, &from) {
                if out.len() >= limit {
                    break 'jump;
                }
                let (key, held) = entry.map_err(run_read_error)?;
                let Some(b) = band_of(&key) else {
                    continue; // the prefix alone: not an entry's key
                };
                if band != Some(b) {
                    band = Some(b);
                    if let Some(start) = starts.get(&b).filter(|s| s.as_slice() > key.as_slice()) {
                        from = start.clone();
                        continue 'jump;
                    }
                }
                match held {
                    Some(value) => {
                        if found_live.insert(b) {
                            learned.insert(b, key.clone());
                        }
                        out.push((key, value));
                    }
                    None if !found_live.contains(&b) => {
                        learned.insert(b, [key.as_slice(), &[0]].concat());
                    }
                    None => {}
                }
            }
            break;
        }
        // Set while this reader's guard holds writers back.
        self.queue_starts.learn(prefix, learned);
        Ok(out)
    }
}

/// Per queue (by key prefix) and per priority band (the byte after it), a key below which
/// the band holds nothing live: where the next scan of that band starts. An entry's removal
/// stays in the runs, hiding its value, until one merge takes both; the entries at the head
/// of a draining queue are such removals, and without this every scan would step over all
/// of them (a drain quadratic in its length). Per band, so that entries of a higher
/// priority coming and going (receipts, at Urgent, in a two-way drain) do not send the
/// scans of the lower bands back to their start. Set by queue scans, each under the read
/// guard; lowered by every put of a queue entry below its band's start, under the write
/// guard ([`Applied::put`]). Removals only take entries away, and a checkpoint or a merge
/// changes nothing readers see, so neither moves a start.
#[derive(Default)]
struct QueueStarts(Mutex<HashMap<Vec<u8>, BandStarts>>);

/// A queue's starts, by priority band.
type BandStarts = BTreeMap<u8, Vec<u8>>;

impl QueueStarts {
    fn bands(&self, prefix: &[u8]) -> BandStarts {
        let starts = self.0.lock().ok();
        starts
            .and_then(|s| s.get(prefix).cloned())
            .unwrap_or_default()
    }

    fn learn(&self, prefix: &[u8], learned: BandStarts) {
        if learned.is_empty() {
            return;
        }
        if let Ok(mut starts) = self.0.lock() {
            starts.entry(prefix.to_vec()).or_default().extend(learned);
        }
    }

    /// Lowers the start of `key`'s band in its queue to `key`, if it is above it.
    fn lower_to(&mut self, key: &[u8]) {
        let starts = self.0.get_mut().unwrap_or_else(|p| p.into_inner());
        for (prefix, bands) in starts.iter_mut() {
            let band = key
                .strip_prefix(prefix.as_slice())
                .and_then(|rest| rest.first());
            if let Some(start) = band.and_then(|band| bands.get_mut(band)) {
                if key < start.as_slice() {
                    *start = key.to_vec();
                }
            }
        }
    }
}

/// A read of the runs (or of sled through a merge) that failed: a damaged run is
/// corruption, any other error the device's.
fn run_read_error(e: std::io::Error) -> StoreError {
    log_read_error(e, "reading the store's runs".into())
}

/// The store as a transaction being built sees it: the group's earlier writes over what
/// readers see.
struct View<'a> {
    db: &'a sled::Db,
    group: &'a GroupWrites,
    applied: &'a Applied,
}

impl View<'_> {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        match self.group.get(key) {
            Some(value) => Ok(value.clone()),
            None => self.applied.get(self.db, key),
        }
    }

    fn contains_key(&self, key: &[u8]) -> Result<bool, StoreError> {
        match self.group.get(key) {
            Some(value) => Ok(value.is_some()),
            None => self.applied.contains(self.db, key),
        }
    }

    /// Whether one of message `id`'s receipt records holds `receipt`.
    fn holds_receipt(&self, id: &MessageId, receipt: &[u8]) -> Result<bool, StoreError> {
        let prefix = &receipt_prefix(id);
        let holds = |record: &[u8]| match split_receipt_record(record) {
            Some((held, _)) => Ok(held == receipt),
            None => Err(StoreError::Corrupt(format!("receipt of {id}"))),
        };
        // Receipts are never removed: a group's writes under the prefix are all records.
        for record in self
            .group
            .range(prefix.to_vec()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .filter_map(|(_, record)| record.as_deref())
        {
            if holds(record)? {
                return Ok(true);
            }
        }
        for (k, record) in self.applied.scan(self.db, prefix, usize::MAX)? {
            if holds(&record)? && !self.group.contains_key(&k) {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

/// Tree nodes as the transaction under construction will leave them: its own first, then
/// the group's, then the log's files.
struct PendingNodes<'a> {
    group: &'a GroupWrites,
    log: &'a LogFiles,
    fresh: &'a HashMap<(u32, u64), Hash>,
}

impl NodeSource for PendingNodes<'_> {
    fn node(&self, level: u32, index: u64) -> Result<Hash, ProofError> {
        if let Some(h) = self.fresh.get(&(level, index)) {
            return Ok(*h);
        }
        match self.group.get(node_key(level, index).as_slice()) {
            Some(value) => parse_node(value.as_deref(), level, index),
            None => NodeSource::node(self.log, level, index),
        }
    }
}

/// The transactions of one group commit and their writes.
#[derive(Default)]
struct Group {
    writes: GroupWrites,
    bytes: usize,
    waiting: Vec<(Reply, Result<TxOutcome, StoreError>)>,
}

struct Committer {
    progress: Arc<Progress>,
    db: sled::Db,
    log: Arc<LogFiles>,
    messages: Arc<Records>,
    /// See [`SledStore::applying`].
    applying: Arc<RwLock<Applied>>,
    wal_dir: PathBuf,
    segment: Segment,
    segment_opened: Instant,
    /// Segments whose groups are all applied, for the checkpointer to write as a run and
    /// delete.
    checkpoints: mpsc::Sender<Handover>,
    checkpointer: Option<JoinHandle<()>>,
    next_log: u64,
    next_seq: u64,
    next_message: u64,
    /// [`MAX_MESSAGE`]; lower in tests.
    max_message: u64,
}

impl Committer {
    fn run(mut self, receiver: mpsc::Receiver<Pending>) {
        loop {
            let first = match receiver.recv_timeout(CHECKPOINT_EVERY) {
                Ok(p) => p,
                Err(RecvTimeoutError::Timeout) => {
                    self.rotate_if_due();
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => break,
            };
            let mut group = Group::default();
            let mut next = Some(first);
            while let Some(Pending { tx, reply }) = next {
                let outcome = self.build(tx, &mut group);
                group.waiting.push((reply, outcome));
                next = if group.waiting.len() < MAX_GROUP && group.bytes < MAX_GROUP_BYTES {
                    receiver.try_recv().ok()
                } else {
                    None
                };
            }
            self.write(group);
            self.rotate_if_due();
        }
        // Closing: what is held is written as a run, and the last segment deleted.
        let _ = self.checkpoints.send(Handover {
            seq: self.segment.seq(),
            bytes: 0,
        });
        drop(self.checkpoints);
        if let Some(handle) = self.checkpointer.take() {
            let _ = handle.join();
        }
        let _ = wal::remove_spares(&self.wal_dir);
    }

    /// Logs the group's writes and syncs the log, answers the group's transactions, then
    /// applies the writes. Readers wait from before the answers until the writes are
    /// applied, so whoever reads after an answer sees its transaction. A failure poisons
    /// the store: before the log is synced the group is answered with it; after, the group
    /// is durable and replayed at the next open.
    fn write(&mut self, group: Group) {
        if let Err(e) = self.write_group(group) {
            self.progress.poison(e);
        }
    }

    fn write_group(&mut self, group: Group) -> Result<(), String> {
        let logged = self.log(group.writes);
        // Poisoned before the group hears of the failure: its record may still reach the
        // disk and be replayed, so a caller that saw the error and asks the store whether
        // it still takes commits (the forwarder, before a call leaves) is told it does not.
        if let Err(e) = &logged {
            self.progress.poison(e.clone());
        }
        // The checkpointer takes it for writing too ([`PANICKED`]). The group's log record is
        // durable (or failed) either way, so it is answered first.
        let (mut applied, panicked) = match self.applying.write() {
            Ok(applied) => (applied, false),
            Err(poisoned) => (poisoned.into_inner(), true),
        };
        for (reply, outcome) in group.waiting {
            let result = match &logged {
                Ok(_) => outcome,
                Err(e) => Err(StoreError::Engine(format!("commit failed: {e}"))),
            };
            let _ = reply.send(result);
        }
        if panicked {
            applied.failed = true;
            return Err(PANICKED.into());
        }
        let Some(logged) = logged? else {
            return Ok(());
        };
        let applying = apply(
            &self.db,
            &self.log,
            &self.messages,
            &logged,
            &mut applied,
            Replay::No,
        );
        if let Err(e) = applying {
            applied.failed = true;
            return Err(format!("applying a logged group: {e}"));
        }
        Ok(())
    }

    /// Appends the writes to the log as one record and syncs it; `None` if there are none.
    fn log(&mut self, writes: GroupWrites) -> Result<Option<WalGroup>, String> {
        if writes.is_empty() {
            return Ok(None);
        }
        let written_first = self
            .write_records_first(&writes)
            .map_err(|e| format!("writing message records before their log record: {e}"))?;
        let group = WalGroup {
            writes: writes
                .into_iter()
                .map(|(key, value)| match (&value, file_write(&key)) {
                    (Some(record), Some(FileWrite::Message(_))) if written_first => WalWrite {
                        written_first: Some(WrittenFirst::of(record)),
                        key,
                        value: None,
                    },
                    _ => WalWrite {
                        key,
                        value,
                        written_first: None,
                    },
                })
                .collect(),
        };
        #[cfg(test)]
        if written_first {
            let synced = self.messages.synced_first.load(Ordering::Relaxed);
            let len = self.messages.entries.metadata().map_or(0, |m| m.len());
            assert_eq!(
                synced, len,
                "records written first are synced before the log record"
            );
        }
        let appended = self
            .segment
            .append(&group)
            .map_err(|e| format!("write-ahead log: {e}"))?;
        self.progress
            .wal_bytes
            .fetch_add(appended, Ordering::Relaxed);
        Ok(Some(group))
    }

    /// Writes the group's message records to their files and syncs them, if one of them is
    /// [`WRITTEN_FIRST_FROM`] bytes or more; says whether it did. They go where [`apply`]
    /// would put them (the groups before are applied), past the count the store keeps until
    /// the group is applied: a crash before the log record leaves them unread.
    fn write_records_first(&self, writes: &GroupWrites) -> std::io::Result<bool> {
        let records: Vec<(u64, &[u8])> = writes
            .iter()
            .filter_map(|(key, value)| match (file_write(key), value) {
                (Some(FileWrite::Message(number)), Some(record)) => Some((number, &record[..])),
                _ => None,
            })
            .collect();
        if !records.iter().any(|(_, r)| r.len() >= WRITTEN_FIRST_FROM) {
            return Ok(false);
        }
        self.messages.write(&records)?;
        self.messages.sync_entries()?;
        // For the quota, as the log's bytes count, until a checkpoint measures the files.
        let bytes: usize = records.iter().map(|(_, r)| r.len() + 8).sum();
        self.progress
            .written_first_bytes
            .fetch_add(bytes as u64, Ordering::Relaxed);
        Ok(true)
    }

    /// Starts a new segment and hands the full one to the checkpointer, once it is big or
    /// old enough.
    fn rotate_if_due(&mut self) {
        let due = self.segment.bytes() >= SEGMENT_BYTES
            || (self.segment.bytes() > 0 && self.segment_opened.elapsed() >= CHECKPOINT_EVERY);
        if due && self.progress.poisoned().is_none() {
            self.rotate();
        }
    }

    /// Cuts the segment to its records, starts the next one and hands the full one to the
    /// checkpointer.
    fn rotate(&mut self) {
        match self.segment.seal() {
            Ok(freed) => self.progress.wal_bytes.fetch_sub(freed, Ordering::Relaxed),
            Err(e) => {
                return self
                    .progress
                    .poison(format!("cutting a write-ahead log segment: {e}"));
            }
        };
        match Segment::create(&self.wal_dir, self.segment.seq() + 1) {
            Ok(next) => {
                self.progress
                    .wal_bytes
                    .fetch_add(next.len(), Ordering::Relaxed);
                let full = std::mem::replace(&mut self.segment, next);
                self.segment_opened = Instant::now();
                let handover = Handover {
                    seq: full.seq(),
                    bytes: full.bytes(),
                };
                if self.checkpoints.send(handover).is_err() {
                    self.progress.poison(CHECKPOINTER_PANICKED.into());
                }
            }
            Err(e) => self
                .progress
                .poison(format!("new write-ahead log segment: {e}")),
        }
    }

    /// Turns `tx` into writes over what `group` already holds; they join the group only if
    /// the whole transaction builds.
    fn build(&mut self, tx: Tx, group: &mut Group) -> Result<TxOutcome, StoreError> {
        if let Some(why) = self.progress.poisoned() {
            return Err(StoreError::Engine(format!("store poisoned: {why}")));
        }
        // Between two builds the checkpointer may swap the held writes for a run; each reads
        // the same either way.
        let applied = self.applying.clone();
        let applied = match applied.read() {
            Ok(applied) if !applied.failed => applied,
            // Between a failed apply and the store's poisoning, nothing is built over what
            // it left half done.
            Ok(_) => {
                self.progress.poison(APPLY_FAILED.into());
                return Err(StoreError::Engine(APPLY_FAILED.into()));
            }
            Err(_) => {
                self.progress.poison(PANICKED.into());
                return Err(StoreError::Engine(PANICKED.into()));
            }
        };
        let view = View {
            db: &self.db,
            group: &group.writes,
            applied: &applied,
        };
        let mut writes: Vec<(Vec<u8>, Option<Vec<u8>>)> = Vec::new();
        let mut first_log_index = None;
        let (mut next_log, mut next_seq) = (self.next_log, self.next_seq);
        let mut next_message = self.next_message;
        let mut receipt_ops = Vec::new();
        for op in &tx.ops {
            if let Op::Log(_) = op {
                first_log_index.get_or_insert(next_log);
            }
        }
        if let (Some(maker), Some(index)) = (tx.receipts, first_log_index) {
            receipt_ops = maker(index);
        }
        // The maker's receipts name this transaction's log entries: new by construction.
        let made_here = receipt_ops.into_iter().map(|op| (op, true));
        let mut fresh_nodes = HashMap::new();
        // Per message named: its first log entry in this transaction, then the later ones.
        let mut events: Vec<(MessageId, u64, Vec<u8>)> = Vec::new();
        // The receipts this transaction stores: their message and where in `writes`.
        let mut receipt_writes: Vec<(MessageId, usize)> = Vec::new();
        for (op, made_here) in tx.ops.into_iter().map(|op| (op, false)).chain(made_here) {
            match op {
                Op::InsertMessage(id, msg) => {
                    let (key, number_key) = (message_key(&id), message_number_key(&id));
                    if view.contains_key(&key)? || view.contains_key(&number_key)? {
                        return Ok(TxOutcome::Exists(id));
                    }
                    // The view holds the group's earlier transactions, not this one's writes.
                    if writes.iter().any(|(written, _)| *written == number_key) {
                        return Err(StoreError::Engine(format!(
                            "a transaction inserts message {id} twice"
                        )));
                    }
                    let encoded = msg.encode_to_vec();
                    if encoded.len() as u64 > self.max_message {
                        return Err(StoreError::Engine(format!(
                            "a message of {} bytes is over the store's {} byte limit",
                            encoded.len(),
                            self.max_message
                        )));
                    }
                    writes.push((number_key, Some(next_message.to_be_bytes().to_vec())));
                    let record = message_record_key(next_message).to_vec();
                    writes.push((record, Some(encoded)));
                    next_message += 1;
                }
                Op::PutReceipt(id, receipt) => {
                    let prefix = receipt_prefix(&id);
                    let bytes = receipt.encode_to_vec();
                    // Stored once, even if this transaction names it twice.
                    let earlier = receipt_writes.iter().any(|(named, at)| {
                        *named == id && writes[*at].1.as_deref() == Some(bytes.as_slice())
                    });
                    if made_here || !(earlier || view.holds_receipt(&id, &bytes)?) {
                        let key = [prefix, next_seq.to_be_bytes().to_vec()].concat();
                        next_seq += 1;
                        receipt_writes.push((id, writes.len()));
                        writes.push((key, Some(bytes)));
                    }
                }
                Op::Enqueue(queue, priority, entry) => {
                    let mut key = queue_prefix(&queue);
                    // Band 255 holds deferred entries only: no priority maps to it.
                    key.push(255 - (priority as i32).clamp(1, 254) as u8);
                    key.extend_from_slice(&next_seq.to_be_bytes());
                    next_seq += 1;
                    if let (Queue::Inbox(org), None) = (&queue, &entry.receipt) {
                        let index = inbox_index_key(org, &entry.message_id);
                        writes.push((index, Some(key.clone())));
                    }
                    writes.push((key, Some(entry.encode_to_vec())));
                }
                Op::Dequeue(QueueKey(key)) => writes.push((key, None)),
                Op::Defer(QueueKey(key)) => {
                    let Some(moved) = deferred_key(&key, next_seq) else {
                        return Err(StoreError::Engine(
                            "only outbox entries are deferred".into(),
                        ));
                    };
                    if let Some(mut entry) = outbox_entry(&writes, &view, &key)? {
                        entry.deferred = true;
                        next_seq += 1;
                        writes.push((key, None));
                        writes.push((moved, Some(entry.encode_to_vec())));
                    }
                }
                Op::SetSent(QueueKey(key), sent) => {
                    if !key.starts_with(b"qo:") {
                        return Err(StoreError::Engine("only outbox entries are sent".into()));
                    }
                    match outbox_entry(&writes, &view, &key)? {
                        Some(mut entry) if entry.unsent == sent => {
                            entry.unsent = !sent;
                            writes.push((key, Some(entry.encode_to_vec())));
                        }
                        _ => {}
                    }
                }
                Op::RemoveFromInbox(org, id) => {
                    let index = inbox_index_key(&org, id.as_bytes());
                    if let Some(key) = view.get(&index)? {
                        writes.push((key, None));
                    }
                    writes.push((index, None));
                }
                Op::Log(entry) => {
                    if entry.len() as u64 > log_files::MAX_ENTRY {
                        return Err(StoreError::Engine(format!(
                            "a log entry of {} bytes is over the log's {} byte limit",
                            entry.len(),
                            log_files::MAX_ENTRY
                        )));
                    }
                    let source = PendingNodes {
                        group: &group.writes,
                        log: &self.log,
                        fresh: &fresh_nodes,
                    };
                    let nodes = merkle::completed_nodes(&source, next_log, log::leaf_hash(&entry))
                        .map_err(|e| StoreError::Engine(format!("log tree: {e}")))?;
                    for (level, index, hash) in nodes {
                        writes.push((node_key(level, index).to_vec(), Some(hash.to_vec())));
                        fresh_nodes.insert((level, index), hash);
                    }
                    let message = pb::LogEntry::decode(entry.as_slice())
                        .ok()
                        .and_then(|e| MessageId::from_slice(&e.message_id).ok());
                    if let Some(id) = message {
                        match events.iter_mut().find(|(named, _, _)| *named == id) {
                            Some((_, _, later)) => later.extend_from_slice(&next_log.to_be_bytes()),
                            None => events.push((id, next_log, Vec::new())),
                        }
                    }
                    writes.push((log_key(next_log).to_vec(), Some(entry)));
                    next_log += 1;
                }
                Op::PutMeta(name, value) => writes.push((meta_key(&name), Some(value))),
            }
        }
        for (id, first, later) in events {
            match receipt_writes.iter().find(|(named, _)| *named == id) {
                Some(&(_, at)) => {
                    let receipt = writes[at].1.take().unwrap_or_default();
                    let indexes = [&first.to_be_bytes()[..], &later].concat();
                    writes[at].1 = Some(receipt_record(&receipt, &indexes));
                }
                None => writes.push((event_key(&id, first), Some(later))),
            }
        }
        writes.push((META_LOG.to_vec(), Some(next_log.to_be_bytes().to_vec())));
        writes.push((META_SEQ.to_vec(), Some(next_seq.to_be_bytes().to_vec())));
        if next_message != self.next_message {
            let count = next_message.to_be_bytes().to_vec();
            writes.push((META_MESSAGES.to_vec(), Some(count)));
        }
        for (key, value) in writes {
            group.bytes += key.len() + value.as_ref().map_or(0, Vec::len);
            group.writes.insert(key, value);
        }
        self.next_log = next_log;
        self.next_seq = next_seq;
        self.next_message = next_message;
        Ok(TxOutcome::Committed { first_log_index })
    }
}

/// sled's files, written only by the migrations of earlier layouts at open: from layout 4
/// on, nothing else writes to sled.
struct SledFiles {
    db: sled::Db,
    log_file: File,
    blob_dir: PathBuf,
    log: Arc<LogFiles>,
    messages: Arc<Records>,
}

impl SledFiles {
    /// Makes what was written to sled durable, with the files beside it: sled's blob files
    /// and their folder first (sled's log may point at them), then sled's flush, its log
    /// file, and the log's and message files. sled's own flush ends in `sync_file_range`,
    /// which a power cut does not respect, and it does not sync blob files.
    fn make_durable(&self) -> Result<(), StoreError> {
        if sync_files(&self.blob_dir, blob_names(&self.blob_dir)?)? {
            sync_dir(&self.blob_dir)?;
        }
        self.db.flush()?;
        self.log_file.sync_data()?;
        self.log.sync()?;
        self.messages.sync()?;
        Ok(())
    }

    /// sled's log and blob files' bytes, which stay as they are once the open is done.
    fn bytes(&self) -> Result<u64, StoreError> {
        Ok(self.log_file.metadata()?.len() + blob_bytes(&self.blob_dir)?)
    }
}

/// Why the store stops when the checkpointer thread is gone.
const CHECKPOINTER_PANICKED: &str =
    "the store's checkpointer thread panicked; restart the gateway to replay the write-ahead log";

/// A full segment, handed by the committer to the checkpointer.
struct Handover {
    seq: u64,
    /// Bytes of records it holds (0 when closing): the next spare is sized after it.
    bytes: u64,
}

/// The checkpointer thread: writes the held writes as a run, merges runs, deletes the log
/// segments the runs now hold, then prepares the spare the next segment will be made from.
fn run_checkpoints(
    mut checkpointer: Checkpointer,
    wal_dir: PathBuf,
    requests: mpsc::Receiver<Handover>,
) {
    while let Ok(mut handover) = requests.recv() {
        // Segments handed over while the last checkpoint ran are covered by this one.
        while let Ok(later) = requests.try_recv() {
            handover = later;
        }
        let progress = checkpointer.progress.clone();
        if progress.poisoned().is_some() {
            continue;
        }
        // Every group in those segments was applied before they were handed over, so the
        // run covers them.
        match checkpointer.checkpoint(&wal_dir, handover.seq, Merge::IfDue) {
            // Only segments the committer counted are deleted here.
            Ok(freed) => drop(progress.wal_bytes.fetch_sub(freed, Ordering::Relaxed)),
            Err(e) => {
                progress.poison(format!("checkpoint: {e}"));
                continue;
            }
        }
        if handover.bytes > 0 {
            if let Err(e) = wal::prepare_spare(&wal_dir, spare_bytes(handover.bytes)) {
                // Only speed is lost: the next segment starts as an empty file.
                tracing::warn!(error = %e, "could not prepare a spare write-ahead log segment");
            }
        }
    }
}

/// The spare's size: the last segment's bytes and a quarter, to the next power of two,
/// between 16 KiB and 4 MiB. It follows the load, so a trickle of commits does not zero
/// megabytes a second; under heavy load, groups are large, a sync serves many commits, and
/// zeroing more than 4 MiB a second cost more than it saved.
fn spare_bytes(last_segment: u64) -> u64 {
    (last_segment + last_segment / 4)
        .next_power_of_two()
        .clamp(16 << 10, 4 << 20)
}

/// What the checkpointer owns: the runs, and what it makes durable before it deletes the
/// write-ahead log's segments.
struct Checkpointer {
    progress: Arc<Progress>,
    /// Whose held writes it takes, and where it installs the runs readers see.
    applying: Arc<RwLock<Applied>>,
    log: Arc<LogFiles>,
    messages: Arc<Records>,
    runs: RunSet,
    /// Set once a merge failed ([`Checkpointer::merge_runs`]).
    merges_stopped: bool,
    /// sled's files' bytes, fixed since the open ([`SledFiles::bytes`]).
    sled_bytes: u64,
}

/// Whether a checkpoint merges the runs due a merge.
#[derive(Clone, Copy, PartialEq)]
enum Merge {
    IfDue,
    /// At open: a merge that fails, and fails again at every open, must not keep the store
    /// from opening. The first checkpoint after the open merges.
    Not,
}

impl Checkpointer {
    /// Makes every write applied so far durable outside the write-ahead log, then deletes
    /// its segments through `through` (each of their groups was applied before they were
    /// handed over); returns the bytes deleted.
    /// 1. Under the lock, the held writes become the ones being written: readers read them
    ///    below the new held writes, and nobody waits while they are written.
    /// 2. The log's and message files are synced.
    /// 3. The writes become a run (synced, linked in, its folder synced), installed under
    ///    the lock. Writes applied since step 1 stay held for the next checkpoint.
    /// 4. With `merge`, runs due a merge are merged ([`Checkpointer::merge_runs`]).
    /// 5. The segments go.
    fn checkpoint(
        &mut self,
        wal_dir: &Path,
        through: u64,
        merge: Merge,
    ) -> Result<u64, StoreError> {
        let writing = {
            let mut applied = self.lock()?;
            if applied.writing.is_some() {
                return Err(StoreError::Engine(
                    "a checkpoint's run was not written; restart the gateway to replay the \
                     write-ahead log"
                        .into(),
                ));
            }
            // A group half applied (the store stops on it, just after this lock is let go)
            // stays out of the runs: its segment stays, and the restart's replay completes
            // it.
            if applied.failed {
                return Err(StoreError::Engine(APPLY_FAILED.into()));
            }
            let writing = Arc::new(std::mem::take(&mut applied.held));
            applied.writing = Some(writing.clone());
            writing
        };
        self.log.sync()?;
        self.messages.sync()?;
        if !writing.0.is_empty() {
            let number = self.runs.last_checkpoint() + 1;
            let entries = writing.0.iter().map(|(key, held)| Ok((key, held.value())));
            // On failure the writes stay where readers find them; the caller stops the
            // store, and the reopen takes in a run that was linked before the failure.
            self.runs.add(number, entries)?;
            if let Some(run) = self.runs.runs().first() {
                let (keys, bytes) = (run.run.keys(), run.run.bytes());
                tracing::debug!(checkpoint = number, keys, bytes, "wrote a run");
            }
        }
        {
            let mut applied = self.lock()?;
            applied.runs = self.runs.runs();
            applied.writing = None;
        }
        if merge == Merge::IfDue {
            self.merge_runs()?;
        }
        let freed = wal::remove_through(wal_dir, through)
            .map_err(|e| StoreError::Engine(format!("deleting write-ahead log segments: {e}")))?;
        self.note_bytes();
        Ok(freed)
    }

    /// Merges runs while some are due ([`RunSet::compact`]) and installs the result.
    /// Readers keep the runs they took meanwhile: a merged run's file is deleted, but
    /// stays readable through the handles they hold.
    ///
    /// A merge that fails (a full disk, a damaged block in an old run) stops merging until a
    /// restart, not the store: every write is still in a run, only reads slow down as runs
    /// pile up. The set is opened again, as it refuses writes after a failure. Only an error
    /// in that reopen, or in installing it, stops the store.
    fn merge_runs(&mut self) -> Result<(), StoreError> {
        if self.merges_stopped {
            return Ok(());
        }
        let merged = match self.runs.compact() {
            Ok(merges) => merges > 0,
            Err(e) => {
                tracing::error!(
                    error = %e,
                    "merging runs failed; no more merges until a restart, and reads slow down \
                     as runs pile up"
                );
                self.merges_stopped = true;
                self.runs = self.runs.reopen()?;
                true
            }
        };
        if merged {
            let replaced = std::mem::replace(&mut self.lock()?.runs, self.runs.runs());
            // Runs the merge replaced close here, once no reader holds them, and their blocks
            // leave the cache: after the lock is released, not under it.
            drop(replaced);
            self.note_bytes();
        }
        Ok(())
    }

    fn lock(&self) -> Result<std::sync::RwLockWriteGuard<'_, Applied>, StoreError> {
        self.applying
            .write()
            .map_err(|_| StoreError::Engine(PANICKED.into()))
    }

    fn note_bytes(&self) {
        // Records written first before this point are in the files measured below; those
        // written after stay counted apart. Some may be counted twice until the next
        // checkpoint, none missed.
        let written_first = self.progress.written_first_bytes.load(Ordering::Relaxed);
        // The quota figure only: a failed stat keeps the previous one.
        if let (Ok(log), Ok(messages)) = (self.log.bytes(), self.messages.bytes()) {
            let runs: u64 = self.runs.runs().iter().map(|r| r.run.bytes()).sum();
            let bytes = self.sled_bytes + runs + log + messages;
            self.progress.stored_bytes.store(bytes, Ordering::Relaxed);
            self.progress
                .written_first_bytes
                .fetch_sub(written_first, Ordering::Relaxed);
        }
    }
}

fn blob_names(dir: &Path) -> std::io::Result<Vec<std::ffi::OsString>> {
    match std::fs::read_dir(dir) {
        Ok(entries) => entries.map(|e| e.map(|e| e.file_name())).collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// The bytes of sled's blob files.
fn blob_bytes(dir: &Path) -> std::io::Result<u64> {
    let mut bytes = 0;
    for name in blob_names(dir)? {
        match std::fs::metadata(dir.join(&name)) {
            Ok(meta) => bytes += meta.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(bytes)
}

/// `fdatasync`s the files `names` of `dir`; returns whether it synced any. sled deletes a
/// blob once its page is rewritten, possibly after the folder was listed: such a file has
/// nothing to keep and is skipped (it used to fail the sync and poison the store).
fn sync_files(dir: &Path, names: Vec<std::ffi::OsString>) -> std::io::Result<bool> {
    let mut synced = false;
    for name in names {
        match File::open(dir.join(&name)) {
            Ok(file) => file.sync_data()?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        }
        synced = true;
    }
    Ok(synced)
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

    fn message(&self, id: &MessageId) -> Result<Option<StoredMessage>, StoreError> {
        let Some(encoded) = self.message_record(id, |messages, number| messages.get(number))?
        else {
            return Ok(None);
        };
        StoredMessage::decode(encoded)
            .map(Some)
            .map_err(|_| StoreError::Corrupt(format!("message {id}")))
    }

    fn message_head(&self, id: &MessageId) -> Result<Option<MessageHead>, StoreError> {
        // The envelope comes first in the record: its bytes stay on disk.
        let Some(encoded) = self.message_record(id, |messages, number| {
            messages.get_past(number, ENVELOPE_LEAD, envelope_field_len)
        })?
        else {
            return Ok(None);
        };
        MessageHead::decode(encoded.as_slice())
            .map(Some)
            .map_err(|_| StoreError::Corrupt(format!("message {id}")))
    }

    fn receipts(&self, id: &MessageId) -> Result<Vec<pb::Receipt>, StoreError> {
        let whole = self.whole_groups()?;
        whole
            .scan(&self.db, &receipt_prefix(id), usize::MAX)?
            .into_iter()
            .map(|(_, record)| {
                split_receipt_record(&record)
                    .and_then(|(receipt, _)| pb::Receipt::decode(receipt).ok())
                    .ok_or_else(|| StoreError::Corrupt(format!("receipt of {id}")))
            })
            .collect()
    }

    fn queue(
        &self,
        queue: &Queue,
        limit: usize,
    ) -> Result<Vec<(QueueKey, QueueEntry)>, StoreError> {
        let whole = self.whole_groups()?;
        whole
            .queue(&self.db, &queue_prefix(queue), limit)?
            .into_iter()
            .map(|(k, v)| {
                let entry = QueueEntry::decode(v.as_slice())
                    .map_err(|_| StoreError::Corrupt(format!("{queue:?}")))?;
                Ok((QueueKey(k), entry))
            })
            .collect()
    }

    fn log_size(&self) -> Result<u64, StoreError> {
        self.whole_groups()?.read_meta(&self.db, META_LOG)
    }

    fn log_entry(&self, index: u64) -> Result<Option<Vec<u8>>, StoreError> {
        let whole = self.whole_groups()?;
        if index >= whole.read_meta(&self.db, META_LOG)? {
            return Ok(None);
        }
        Ok(Some(self.log.entry(index).map_err(|e| {
            log_read_error(e, format!("log entry {index}"))
        })?))
    }

    fn disk_usage(&self) -> Result<u64, StoreError> {
        let progress = &self.progress;
        let stored = progress.stored_bytes.load(Ordering::Relaxed);
        let written_first = progress.written_first_bytes.load(Ordering::Relaxed);
        Ok(stored + written_first + progress.wal_bytes.load(Ordering::Relaxed))
    }

    fn log_node(&self, level: u32, index: u64) -> Result<Option<Hash>, StoreError> {
        let whole = self.whole_groups()?;
        if !log_files::node_exists(level, index, whole.read_meta(&self.db, META_LOG)?) {
            return Ok(None);
        }
        Ok(Some(self.log.node(level, index).map_err(|e| {
            log_read_error(e, format!("log tree node ({level}, {index})"))
        })?))
    }

    fn message_events(&self, id: &MessageId) -> Result<Vec<u64>, StoreError> {
        let whole = self.whole_groups()?;
        let prefix = [b"e".as_slice(), id.as_bytes()].concat();
        let corrupt = || StoreError::Corrupt(format!("event index of {id}"));
        let mut events = Vec::new();
        // One transaction's entries, in order: `indexes` after `first`, if it is known.
        let mut read = |first: Option<u64>, indexes: &[u8]| {
            let mut last = first;
            events.extend(first);
            for index in indexes.chunks(8) {
                let index = u64::from_be_bytes(index.try_into().map_err(|_| corrupt())?);
                if last.is_some_and(|last| index <= last) {
                    return Err(corrupt());
                }
                events.push(index);
                last = Some(index);
            }
            Ok(())
        };
        for (k, later) in whole.scan(&self.db, &prefix, usize::MAX)? {
            let first: [u8; 8] = k[prefix.len()..].try_into().map_err(|_| corrupt())?;
            read(Some(u64::from_be_bytes(first)), &later)?;
        }
        for (_, record) in whole.scan(&self.db, &receipt_prefix(id), usize::MAX)? {
            let (_, indexes) = split_receipt_record(&record).ok_or_else(corrupt)?;
            read(None, indexes)?;
        }
        // Each source is in log order; together they interleave.
        events.sort_unstable();
        Ok(events)
    }

    fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.whole_groups()?.get(&self.db, &meta_key(key))
    }

    fn stopped(&self) -> Option<String> {
        let ended = (self.committer.lock().ok())
            .is_some_and(|handle| handle.as_ref().is_some_and(JoinHandle::is_finished));
        match self.progress.poisoned() {
            None if ended => Some(
                "the store's commit thread ended; restart the gateway to replay the write-ahead \
                 log"
                .into(),
            ),
            why => why,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::os::unix::fs::FileExt;

    use super::*;
    use crate::store::conformance::{ahtd, log_naming, receipt_naming_index};

    #[tokio::test]
    async fn sled_store_passes_the_conformance_suite() {
        let dir = tempfile::tempdir().unwrap();
        let open = |p: &Path| SledStore::open(p, 16 << 20).unwrap();
        crate::store::conformance::run(dir.path(), open).await;
    }

    #[test]
    fn only_an_outbox_entrys_key_is_deferred_keeping_its_priority_once() {
        let outbox = queue_prefix(&Queue::Outbox("kh".parse().unwrap()));
        let key = |band: &[u8]| [outbox.as_slice(), band, &7u64.to_be_bytes()].concat();
        let flash = key(&[252]);
        let moved = deferred_key(&flash, 9).unwrap();
        assert_eq!(
            moved,
            key(&[DEFERRED_BAND, 252, 0, 0, 0, 0, 0, 0, 0, 9])[..16]
        );
        // Deferred again: a priority lower each time, down to ROUTINE, and a new place.
        let again = deferred_key(&moved, 10).unwrap();
        assert_eq!(again[..8], [&outbox[..], &[DEFERRED_BAND, 253]].concat());
        assert_eq!(again[8..], 10u64.to_be_bytes());
        let again = deferred_key(&deferred_key(&again, 11).unwrap(), 12).unwrap();
        assert_eq!(again[6..8], [DEFERRED_BAND, 254]);
        // A deferred key of c3b73b2's layout, without the priority byte: ROUTINE.
        let old = deferred_key(&key(&[DEFERRED_BAND]), 13).unwrap();
        assert_eq!(old[6..8], [DEFERRED_BAND, 254]);
        // Not an outbox entry's key: an inbox's, a truncated one, one with a stray byte.
        let inbox = queue_prefix(&Queue::Inbox(ahtd()));
        for bad in [
            [inbox.as_slice(), &[254], &7u64.to_be_bytes()].concat(),
            outbox.clone(),
            flash[..10].to_vec(),
            [flash.as_slice(), &[0]].concat(),
            [moved.as_slice(), &[0]].concat(),
        ] {
            assert_eq!(deferred_key(&bad, 9), None, "{bad:?}");
        }
    }

    #[test]
    fn a_blob_deleted_between_listing_and_sync_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("1"), b"blob").unwrap();
        let listed = vec!["1".into(), "2".into()]; // "2" was deleted after the listing
        assert!(sync_files(dir.path(), listed).unwrap());
        // Only a deleted one: nothing synced.
        assert!(!sync_files(dir.path(), vec!["2".into()]).unwrap());
    }

    /// A second open of a store that is open elsewhere waits, then says so and names the
    /// store; once the first is closed, the store opens.
    #[test]
    fn a_store_in_use_is_refused_by_name_until_it_is_closed() {
        let dir = tempfile::tempdir().unwrap();
        let first = SledStore::open(dir.path(), 16 << 20).unwrap();
        let started = Instant::now();
        match SledStore::open(dir.path(), 16 << 20) {
            Err(StoreError::InUse(path)) => assert_eq!(path, dir.path()),
            Err(other) => panic!("expected InUse, got {other}"),
            Ok(_) => panic!("a store open elsewhere was opened again"),
        }
        assert!(started.elapsed() >= LOCK_WAIT);
        drop(first);
        let again = SledStore::open(dir.path(), 16 << 20).unwrap();
        assert_eq!(again.replayed_groups(), 0);
    }

    /// The quota's figure follows what commits write, in the write-ahead log and then in
    /// sled's files (blobs included), without asking sled to list them on every call.
    #[tokio::test]
    async fn disk_usage_counts_what_commits_wrote() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), 16 << 20).unwrap();
        let before = store.disk_usage().unwrap();
        for i in 0..20u64 {
            let id = MessageId::new_v7(1_000 + i, [i as u8; 10]);
            let envelope = pb::Envelope {
                header: vec![1; 100].into(),
                ciphertext: vec![i as u8; 200 << 10].into(),
                signature: vec![3; 64].into(),
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
        // Closed, the log is checkpointed into sled: the figure now counts sled's files.
        drop(store);
        let store = SledStore::open(dir.path(), 16 << 20).unwrap();
        let reopened = store.disk_usage().unwrap();
        assert!(
            reopened >= 20 * (200 << 10),
            "{reopened} bytes after reopening"
        );
        let files = store.log.bytes().unwrap() + store.messages.bytes().unwrap();
        assert!(reopened <= store.db.size_on_disk().unwrap() + files + (1 << 20));
    }

    /// The `i`th message of concurrent writer `w`.
    fn writer_message_id(w: u16, i: u64) -> MessageId {
        let mut random = [0u8; 10];
        random[..2].copy_from_slice(&w.to_be_bytes());
        random[2..].copy_from_slice(&i.to_be_bytes());
        MessageId::new_v7(1_000 + i, random)
    }

    /// Large values churned by concurrent writers: sled writes their pages to blob files
    /// and deletes them as pages are rewritten, under our syncs. Every commit succeeds.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn large_values_churned_by_concurrent_writers_all_commit() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SledStore::open(dir.path(), 16 << 20).unwrap());
        let queue = Queue::Inbox(ahtd());
        let mut writers = tokio::task::JoinSet::new();
        for w in 0..16u16 {
            let (store, queue) = (store.clone(), queue.clone());
            writers.spawn(async move {
                for i in 0..40u64 {
                    let id = writer_message_id(w, i);
                    let envelope = pb::Envelope {
                        header: vec![1; 100].into(),
                        ciphertext: vec![w as u8; 64 << 10].into(),
                        signature: vec![3; 64].into(),
                    };
                    let entry = QueueEntry::message(&id);
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
                            ops: vec![Op::RemoveFromInbox(ahtd(), id)],
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

    /// A group is applied key by key, log entries (`l…`) well before the log size
    /// (`slog`), and after its transactions are answered. A reader that finds entry `n` must
    /// also find a log size above `n`: it never sees part of a group. A writer reading right
    /// after its answer finds its message.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn readers_see_whole_groups() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SledStore::open(dir.path(), 16 << 20).unwrap());
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader = {
            let (store, done) = (store.clone(), done.clone());
            std::thread::spawn(move || {
                let mut probes = 0u64;
                while !done.load(Ordering::Relaxed) {
                    let size = store.log_size().unwrap();
                    if store.log_entry(size).unwrap().is_some() {
                        let now = store.log_size().unwrap();
                        assert!(now > size, "entry {size} readable at log size {now}");
                    }
                    probes += 1;
                }
                probes
            })
        };
        let queue = Queue::Outbox("kh".parse().unwrap());
        let mut writers = tokio::task::JoinSet::new();
        for w in 0..32u16 {
            let (store, queue) = (store.clone(), queue.clone());
            writers.spawn(async move {
                for i in 0..30u64 {
                    let id = writer_message_id(w, i);
                    let tx = Tx {
                        ops: vec![
                            Op::InsertMessage(id, StoredMessage::default()),
                            Op::Enqueue(
                                queue.clone(),
                                pb::Priority::Routine,
                                QueueEntry::message(&id),
                            ),
                            Op::Log(vec![4; 200]),
                            Op::Log(vec![5; 200]),
                        ],
                        receipts: receipt_naming_index(id),
                    };
                    store.commit(tx).await?;
                    assert!(store.message(&id)?.is_some(), "answered before readable");
                }
                Ok::<_, StoreError>(())
            });
        }
        while let Some(r) = writers.join_next().await {
            r.unwrap().unwrap();
        }
        done.store(true, Ordering::Relaxed);
        let probes = reader.join().unwrap();
        assert_eq!(store.log_size().unwrap(), 32 * 30 * 2);
        assert!(probes > 0);
    }

    /// Once an apply failed part way, what readers see holds part of a group: every read
    /// fails and says to restart, rather than answer from half a group.
    #[tokio::test]
    async fn reads_fail_once_part_of_a_group_is_applied() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), 16 << 20).unwrap();
        let id = writer_message_id(1, 1);
        let tx = Tx {
            ops: vec![Op::InsertMessage(id, StoredMessage::default())],
            receipts: None,
        };
        store.commit(tx).await.unwrap();
        assert!(store.message(&id).unwrap().is_some());
        store.applying.write().unwrap().failed = true;
        let err = store.message(&id).unwrap_err().to_string();
        assert!(err.contains("restart"), "{err}");
        assert!(store.log_size().is_err());
        let outbox = Queue::Outbox("kh".parse().unwrap());
        assert!(store.queue(&outbox, 10).is_err());
        // Nor is anything built over it.
        let next = Tx {
            ops: vec![Op::InsertMessage(
                writer_message_id(1, 2),
                Default::default(),
            )],
            receipts: None,
        };
        let err = store.commit(next).await.unwrap_err().to_string();
        assert!(err.contains("restart"), "{err}");
    }

    /// After a checkpoint the checkpointer prepares a spare, sized after the segment it
    /// checkpointed, and the next segment is made from it. A crash then leaves the spare's
    /// zeros after the last record, and open replays the records and removes spares.
    #[test]
    fn segments_are_made_from_spares_once_a_checkpoint_ran() {
        let dir = tempfile::tempdir().unwrap();
        let wal_dir = dir.path().join("wal");
        let (mut committer, _) = recover(dir.path(), 16 << 20).unwrap();
        let mut ids = Vec::new();
        let mut commit = |committer: &mut Committer, n: u64| {
            let txs: Vec<Tx> = (0..n)
                .map(|_| {
                    let id = MessageId::new_v7(2_000 + ids.len() as u64, [1; 10]);
                    ids.push(id);
                    Tx {
                        ops: vec![
                            Op::InsertMessage(id, StoredMessage::default()),
                            Op::Log(vec![6; 100]),
                        ],
                        receipts: None,
                    }
                })
                .collect();
            commit_group(committer, txs);
        };
        commit(&mut committer, 10);
        committer.rotate();
        let spare = wal_dir.join("spare");
        let started = Instant::now();
        while !spare.exists() {
            assert!(started.elapsed() < Duration::from_secs(30), "no spare");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(std::fs::metadata(&spare).unwrap().len(), 16 << 10);
        // Segment 2 was made before the spare existed; segment 3 is the spare.
        commit(&mut committer, 10);
        committer.rotate();
        commit(&mut committer, 10);
        let segments = wal::segments(&wal_dir).unwrap();
        let (_, path, len) = segments.iter().find(|s| s.0 == 3).unwrap();
        assert_eq!(*len, 16 << 10, "segment 3 is not the spare: {segments:?}");
        let records = wal::read_segment(path, true).unwrap();
        assert_eq!((records.groups.len(), records.torn_bytes), (1, 0));

        crash(committer);
        std::fs::write(wal_dir.join("spare.tmp"), b"half made").unwrap();
        let store = SledStore::open(dir.path(), 16 << 20).unwrap();
        assert!(store.replayed_groups() >= 1);
        for id in &ids {
            assert!(store.message(id).unwrap().is_some());
        }
        assert_eq!(store.log_size().unwrap(), 30);
        assert!(!spare.exists() && !wal_dir.join("spare.tmp").exists());
    }

    /// Queue keys live in memory between checkpoints: one removed before the checkpoint never
    /// reaches a run, one still there is written into the checkpoint's run, and readers see
    /// the same queue throughout: held entries over the runs', held removals hiding theirs.
    /// A removal of a key a run holds reaches the next run; a merge that takes both drops
    /// them both.
    #[test]
    fn queue_keys_reach_a_run_only_if_still_there_at_a_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let (mut committer, _) = recover(dir.path(), 16 << 20).unwrap();
        let (outbox, prefix) = kh_outbox();
        let enqueue = routine_to(&outbox, 7_000, 6);
        let dequeue = |key: &Vec<u8>| Tx {
            ops: vec![Op::Dequeue(QueueKey(key.clone()))],
            receipts: None,
        };
        // The runs' entries under the prefix, newest first winning, removals as `None`.
        let in_runs = |committer: &Committer| -> Vec<(Vec<u8>, bool)> {
            let runs = committer.applying.read().unwrap().runs.clone();
            runs::Merged::new(runs.iter().map(|r| r.run.scan(&prefix)))
                .map(|entry| entry.map(|(k, held)| (k, held.is_some())).unwrap())
                .collect()
        };
        commit_group(&mut committer, (0..4).map(enqueue));
        let first_four = keys_under(&committer, &prefix);
        assert_eq!(first_four.len(), 4);
        assert!(in_runs(&committer).is_empty(), "held until a checkpoint");
        // Taken off before any checkpoint: it never reaches a run.
        commit_group(&mut committer, [dequeue(&first_four[0])]);
        checkpoint_current_segment(&mut committer);
        let put = |keys: &[Vec<u8>]| keys.iter().map(|k| (k.clone(), true)).collect::<Vec<_>>();
        assert_eq!(in_runs(&committer), put(&first_four[1..]));
        assert!(committer.applying.read().unwrap().held.0.is_empty());
        // In a run now: its removal is held, and hides it from readers. Newer entries sort
        // after the run's.
        commit_group(&mut committer, [dequeue(&first_four[2])]);
        commit_group(&mut committer, (4..6).map(enqueue));
        let seen = keys_under(&committer, &prefix);
        assert_eq!(seen.len(), 4);
        assert_eq!(seen[..2], [first_four[1].clone(), first_four[3].clone()]);
        assert!(!seen.contains(&first_four[2]));
        // The first two as a reader with a limit sees them, the building view likewise.
        let applied = committer.applying.read().unwrap();
        let two = applied.scan(&committer.db, &prefix, 2).unwrap();
        assert_eq!(
            two.iter().map(|kv| kv.0.clone()).collect::<Vec<_>>(),
            seen[..2]
        );
        let group = GroupWrites::new();
        let view = View {
            db: &committer.db,
            group: &group,
            applied: &applied,
        };
        assert!(!view.contains_key(&first_four[2]).unwrap());
        assert!(view.get(&first_four[2]).unwrap().is_none());
        assert!(view.get(&seen[3]).unwrap().is_some(), "a held entry");
        assert!(
            view.contains_key(&first_four[1]).unwrap(),
            "an entry in a run"
        );
        drop(applied);
        checkpoint_current_segment(&mut committer);
        let mut expected = put(&seen);
        expected.insert(1, (first_four[2].clone(), false));
        assert_eq!(in_runs(&committer), expected, "the removal reached a run");
        // Two more checkpoints make four runs, which merge: the removal and the value it
        // hid both go, since a queue entry's key is never written again.
        for i in 6..8 {
            commit_group(&mut committer, [enqueue(i)]);
            checkpoint_current_segment(&mut committer);
        }
        let runs = committer.applying.read().unwrap().runs.clone();
        assert_eq!(runs.len(), 1, "merged");
        let merged: Vec<Vec<u8>> = in_runs(&committer).into_iter().map(|e| e.0).collect();
        assert_eq!(merged, keys_under(&committer, &prefix));
        assert!(!merged.contains(&first_four[2]));
        // A crash with entries only held: the write-ahead log brings them back.
        let seen = keys_under(&committer, &prefix);
        commit_group(&mut committer, [dequeue(&seen[0])]);
        commit_group(&mut committer, (8..9).map(enqueue));
        let before_crash = keys_under(&committer, &prefix);
        crash(committer);
        let store = SledStore::open(dir.path(), 16 << 20).unwrap();
        assert_eq!(store.replayed_groups(), 2);
        let after: Vec<_> = store
            .queue(&outbox, 100)
            .unwrap()
            .into_iter()
            .map(|(k, _)| k.0)
            .collect();
        assert_eq!(after, before_crash);
    }

    /// A crash after a checkpoint linked its run but before it deleted the segments: the
    /// open replays groups the run already holds. Those writes change nothing, and are not
    /// written again: a queue entry's key stays in one run, so that a merge may drop its
    /// removal with it.
    #[test]
    fn a_replay_over_a_run_that_holds_it_writes_nothing_again() {
        let dir = tempfile::tempdir().unwrap();
        let wal_dir = dir.path().join("wal");
        let (mut committer, _) = recover(dir.path(), 16 << 20).unwrap();
        let (outbox, prefix) = kh_outbox();
        let id = |i: u64| MessageId::new_v7(50_000 + i, [3; 10]);
        let submit = |i: u64| Tx {
            ops: vec![
                Op::InsertMessage(id(i), StoredMessage::default()),
                Op::Enqueue(
                    outbox.clone(),
                    pb::Priority::Routine,
                    QueueEntry::message(&id(i)),
                ),
                log_naming(&id(i)),
            ],
            receipts: None,
        };
        commit_group(&mut committer, (0..3).map(submit));
        let kept = tempfile::tempdir().unwrap();
        copy_dir(&wal_dir, kept.path());
        checkpoint_current_segment(&mut committer);
        assert_eq!(committer.applying.read().unwrap().runs.len(), 1);
        crash(committer);
        // The segments come back, as if the crash came before their deletion.
        for entry in std::fs::read_dir(kept.path()).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), wal_dir.join(entry.file_name())).unwrap();
        }

        let (mut committer, replayed) = recover(dir.path(), 16 << 20).unwrap();
        assert_eq!(replayed, 1);
        let runs = committer.applying.read().unwrap().runs.clone();
        assert_eq!(runs.len(), 1, "the replay's writes were all in the run");
        let queued = keys_under(&committer, &prefix);
        assert_eq!(queued.len(), 3);
        // Dequeued, then three more checkpoints: the four runs merge, and the entries go
        // with their removals.
        let txs = queued.iter().map(|key| Tx {
            ops: vec![Op::Dequeue(QueueKey(key.clone()))],
            receipts: None,
        });
        commit_group(&mut committer, txs);
        for i in 3..6 {
            commit_group(&mut committer, [submit(i)]);
            checkpoint_current_segment(&mut committer);
        }
        let runs = committer.applying.read().unwrap().runs.clone();
        assert_eq!(runs.len(), 1, "merged");
        let in_run: Vec<Vec<u8>> = runs[0].run.scan(&prefix).map(|e| e.unwrap().0).collect();
        assert_eq!(in_run, keys_under(&committer, &prefix));
        assert_eq!(in_run.len(), 3, "the three later entries, and no removal");
        crash(committer);
    }

    /// A run that cannot be written (something in the way of its file) stops the store; its
    /// writes stay where readers find them, its segments stay, and the reopen replays them.
    #[test]
    fn a_run_that_cannot_be_written_stops_the_store_and_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (mut committer, _) = recover(dir.path(), 16 << 20).unwrap();
        let (outbox, prefix) = kh_outbox();
        let enqueue = routine_to(&outbox, 60_000, 2);
        commit_group(&mut committer, (0..5).map(enqueue));
        let queued = keys_under(&committer, &prefix);
        let in_the_way =
            dir.path()
                .join("runs")
                .join(format!("{:020}-{:020}{}", 1, 1, runs::TEMPORARY_SUFFIX));
        std::fs::create_dir(&in_the_way).unwrap();
        committer.rotate();
        let started = Instant::now();
        let why = loop {
            if let Some(why) = committer.progress.poisoned() {
                break why;
            }
            assert!(started.elapsed() < Duration::from_secs(30), "not stopped");
            std::thread::sleep(Duration::from_millis(10));
        };
        assert!(why.starts_with("checkpoint"), "{why}");
        assert!(committer.applying.read().unwrap().writing.is_some());
        assert_eq!(keys_under(&committer, &prefix), queued, "still readable");
        assert!(committer.build(enqueue(5), &mut Group::default()).is_err());
        crash(committer);
        std::fs::remove_dir(&in_the_way).unwrap();
        let store = SledStore::open(dir.path(), 16 << 20).unwrap();
        assert_eq!(store.replayed_groups(), 1);
        let reopened: Vec<Vec<u8>> = (store.queue(&outbox, 10).unwrap().into_iter())
            .map(|(k, _)| k.0)
            .collect();
        assert_eq!(reopened, queued);
    }

    /// Copies the current segment's records (not a spare's zeros after them, which a segment
    /// that is not the last may not hold) into `kept`.
    fn keep_current_segment(committer: &Committer, kept: &Path) {
        let name = format!("{:016x}.wal", committer.segment.seq());
        let bytes = std::fs::read(committer.wal_dir.join(&name)).unwrap();
        std::fs::write(
            kept.join(&name),
            &bytes[..committer.segment.bytes() as usize],
        )
        .unwrap();
    }

    fn dequeue_tx(key: &[u8]) -> Tx {
        dequeue_all(&[key.to_vec()])
    }

    /// One transaction taking every entry of `keys` off its queue.
    fn dequeue_all(keys: &[Vec<u8>]) -> Tx {
        Tx {
            ops: keys
                .iter()
                .map(|k| Op::Dequeue(QueueKey(k.clone())))
                .collect(),
            receipts: None,
        }
    }

    /// Ten entries queued by `enqueue` (0 to 9) and checkpointed, then the first `n` of them
    /// taken off and checkpointed: their removals sit in a run at the queue's head. The ten
    /// keys.
    fn head_taken_off(
        committer: &mut Committer,
        enqueue: impl Fn(u64) -> Tx,
        prefix: &[u8],
        n: usize,
    ) -> Vec<Vec<u8>> {
        commit_group(committer, (0..10).map(enqueue));
        checkpoint_current_segment(committer);
        let keys = keys_under(committer, prefix);
        commit_group(committer, [dequeue_all(&keys[..n])]);
        checkpoint_current_segment(committer);
        keys
    }

    /// The keys of the first `limit` entries of the queue under `prefix`, read as the store's
    /// queue reads are (through the queue's starts).
    fn queue_keys(committer: &Committer, prefix: &[u8], limit: usize) -> Vec<Vec<u8>> {
        let applied = committer.applying.read().unwrap();
        let entries = applied.queue(&committer.db, prefix, limit).unwrap();
        entries.into_iter().map(|(k, _)| k).collect()
    }

    /// The runs' entries under `prefix`, every run, removals as `None` (not merged).
    fn raw_run_entries(committer: &Committer, prefix: &[u8]) -> Vec<(Vec<u8>, runs::Held)> {
        let runs = committer.applying.read().unwrap().runs.clone();
        runs.iter()
            .flat_map(|r| r.run.scan(prefix).map(Result::unwrap).collect::<Vec<_>>())
            .collect()
    }

    /// Every segment ever written, replayed over runs that have merged entries with their
    /// removals (a superset of what a crash before any segment deletion leaves): the entries
    /// stay gone, and no run holds their values again, so later merges cannot bring them back.
    #[test]
    fn replaying_every_segment_over_merged_runs_brings_no_entry_back() {
        let dir = tempfile::tempdir().unwrap();
        let kept = tempfile::tempdir().unwrap();
        let (mut committer, _) = recover(dir.path(), 16 << 20).unwrap();
        let (outbox, prefix) = kh_outbox();
        let enqueue = routine_to(&outbox, 90_000, 7);
        commit_group(&mut committer, (0..3).map(enqueue));
        let first = keys_under(&committer, &prefix);
        assert_eq!(first.len(), 3);
        keep_current_segment(&committer, kept.path());
        checkpoint_current_segment(&mut committer); // run 1: three values
        commit_group(&mut committer, first[..2].iter().map(|k| dequeue_tx(k)));
        keep_current_segment(&committer, kept.path());
        checkpoint_current_segment(&mut committer); // run 2: two removals
        for i in 3..5 {
            commit_group(&mut committer, [enqueue(i)]);
            keep_current_segment(&committer, kept.path());
            checkpoint_current_segment(&mut committer); // runs 3, 4: the four merge
        }
        assert_eq!(committer.applying.read().unwrap().runs.len(), 1, "merged");
        let gone = &first[..2];
        assert!(
            raw_run_entries(&committer, &prefix)
                .iter()
                .all(|(k, _)| !gone.contains(k)),
            "values and removals dropped together"
        );
        let before = keys_under(&committer, &prefix);
        crash(committer);
        // As if no checkpoint had deleted its segments.
        let wal_dir = dir.path().join("wal");
        for entry in std::fs::read_dir(kept.path()).unwrap() {
            let entry = entry.unwrap();
            let to = wal_dir.join(entry.file_name());
            if !to.exists() {
                std::fs::copy(entry.path(), to).unwrap();
            }
        }
        let (mut committer, replayed) = recover(dir.path(), 16 << 20).unwrap();
        assert_eq!(replayed, 4);
        assert_eq!(keys_under(&committer, &prefix), before);
        assert!(
            raw_run_entries(&committer, &prefix)
                .iter()
                .all(|(k, held)| !(gone.contains(k) && held.is_some())),
            "a removed entry's value written to a run again"
        );
        // Later merges keep them gone.
        for i in 5..9 {
            commit_group(&mut committer, [enqueue(i)]);
            checkpoint_current_segment(&mut committer);
        }
        let after = keys_under(&committer, &prefix);
        assert!(after.iter().all(|k| !gone.contains(k)));
        assert!(before.iter().all(|k| after.contains(k)));
        crash(committer);
    }

    /// A second Dequeue of an entry that left before any checkpoint (a retry) has nothing
    /// to hide: it must not leave a removal in the runs, which no merge would ever drop and
    /// which every scan of the queue would step over.
    #[test]
    fn a_second_dequeue_of_an_entry_gone_before_a_checkpoint_leaves_no_removal() {
        let dir = tempfile::tempdir().unwrap();
        let (mut committer, _) = recover(dir.path(), 16 << 20).unwrap();
        let (outbox, prefix) = kh_outbox();
        let enqueue = routine_to(&outbox, 91_000, 8);
        commit_group(&mut committer, [enqueue(0)]);
        let key = keys_under(&committer, &prefix)[0].clone();
        commit_group(&mut committer, [dequeue_tx(&key)]);
        checkpoint_current_segment(&mut committer);
        commit_group(&mut committer, [dequeue_tx(&key)]); // the retry
        checkpoint_current_segment(&mut committer);
        for i in 1..4 {
            commit_group(&mut committer, [enqueue(i)]);
            checkpoint_current_segment(&mut committer);
        }
        let removals: Vec<_> = raw_run_entries(&committer, &prefix)
            .into_iter()
            .filter(|(_, held)| held.is_none())
            .collect();
        assert!(
            removals.is_empty(),
            "{} removals hiding nothing",
            removals.len()
        );
        crash(committer);
    }

    /// A layout-4 store restored without its runs must be refused: the log's size, the
    /// sequence numbers and the message count are in the runs, and sled's older values would
    /// let the next commit write over log entry 0.
    #[test]
    fn a_store_restored_without_its_runs_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (mut committer, _) = recover(dir.path(), 16 << 20).unwrap();
        commit_group(
            &mut committer,
            [Tx {
                ops: vec![Op::Log(vec![1]), Op::Log(vec![2])],
                receipts: None,
            }],
        );
        checkpoint_current_segment(&mut committer);
        crash(committer);
        std::fs::remove_dir_all(dir.path().join("runs")).unwrap();
        match SledStore::open(dir.path(), 16 << 20) {
            Err(_) => {}
            Ok(store) => panic!(
                "opened without runs/, log size {} (files hold 2)",
                store.log_size().unwrap()
            ),
        }
    }

    /// Deletes sled's files from the store in `dir`, and nothing beside them.
    fn lose_sled(dir: &Path) {
        let beside = ["runs", "runs.last", "log", "messages", "wal"];
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if beside.iter().any(|b| path.ends_with(b)) {
                continue;
            }
            if path.is_dir() {
                std::fs::remove_dir_all(path).unwrap();
            } else {
                std::fs::remove_file(path).unwrap();
            }
        }
    }

    /// A store restored with its newest runs missing, or with `runs/` emptied, must be
    /// refused, not opened at the log size an older run holds: the next commit would write
    /// over log entries that auditors may hold signed checkpoints of. Likewise a store whose
    /// record of its last checkpoint is gone. A store of layout 4, from before the record,
    /// opens and is given one.
    #[test]
    fn a_store_that_lost_its_newest_runs_or_their_record_is_refused() {
        let two_checkpoints = |dir: &Path| {
            let (mut committer, _) = recover(dir, 16 << 20).unwrap();
            for entries in [[1, 2], [3, 4]] {
                let ops = entries.iter().map(|&e| Op::Log(vec![e])).collect();
                commit_group(
                    &mut committer,
                    [Tx {
                        ops,
                        receipts: None,
                    }],
                );
                checkpoint_current_segment(&mut committer);
            }
            crash(committer);
        };
        let newest_run = |dir: &Path| {
            let mut names: Vec<_> = std::fs::read_dir(dir.join("runs"))
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect();
            names.sort();
            names.pop().unwrap()
        };
        type Loss = fn(&Path, PathBuf);
        let losses: [(&str, Loss, &str); 5] = [
            (
                "the newest run",
                |_, newest| std::fs::remove_file(newest).unwrap(),
                "the newest runs were lost",
            ),
            (
                "every run",
                |dir, _| {
                    std::fs::remove_dir_all(dir.join("runs")).unwrap();
                    std::fs::create_dir(dir.join("runs")).unwrap();
                },
                "end at checkpoint 0: the newest runs were lost",
            ),
            (
                "the record",
                |dir, _| std::fs::remove_file(dir.join("runs.last")).unwrap(),
                "runs.last is missing",
            ),
            ("sled's files", |dir, _| lose_sled(dir), "sled's files in"),
            (
                "sled's files since layout 4 (an older backup of them)",
                |dir, _| {
                    let db = open_sled(dir, 16 << 20).unwrap();
                    db.insert(META_FORMAT, 3u64.to_be_bytes().as_slice())
                        .unwrap();
                    db.flush().unwrap();
                },
                "older than the folders beside them",
            ),
        ];
        for (lost, lose, said) in losses {
            let dir = tempfile::tempdir().unwrap();
            two_checkpoints(dir.path());
            lose(dir.path(), newest_run(dir.path()));
            match SledStore::open(dir.path(), 16 << 20) {
                Err(StoreError::Corrupt(e)) => {
                    assert!(e.contains(said), "{lost}: {e}");
                    assert!(e.contains("Restore the whole store"), "{lost}: {e}");
                }
                Err(e) => panic!("{lost}: {e}"),
                Ok(store) => panic!(
                    "{lost}: opened at log size {} (files hold 4)",
                    store.log_size().unwrap()
                ),
            }
        }

        // A crash between a run and its record: the store opens, and its record guards that
        // run from then on.
        let dir = tempfile::tempdir().unwrap();
        two_checkpoints(dir.path());
        let newest = newest_run(dir.path());
        let last: u64 = newest.file_name().unwrap().to_str().unwrap()[21..]
            .parse()
            .unwrap();
        std::fs::write(dir.path().join("runs.last"), format!("{:020}\n", last - 1)).unwrap();
        let store = SledStore::open(dir.path(), 16 << 20).unwrap();
        assert_eq!(store.log_size().unwrap(), 4);
        drop(store);
        let recorded = std::fs::read_to_string(dir.path().join("runs.last")).unwrap();
        assert!(
            recorded.trim().parse::<u64>().unwrap() >= last,
            "{recorded}"
        );
        std::fs::remove_file(newest_run(dir.path())).unwrap();
        assert!(SledStore::open(dir.path(), 16 << 20).is_err());

        let dir = tempfile::tempdir().unwrap();
        two_checkpoints(dir.path());
        std::fs::remove_file(dir.path().join("runs.last")).unwrap();
        {
            let db = open_sled(dir.path(), 16 << 20).unwrap();
            db.insert(META_FORMAT, 4u64.to_be_bytes().as_slice())
                .unwrap();
            db.flush().unwrap();
        }
        let store = SledStore::open(dir.path(), 16 << 20).unwrap();
        assert_eq!(store.log_size().unwrap(), 4);
        assert_eq!(read_meta(&store.db, META_FORMAT).unwrap(), FORMAT);
        drop(store);
        std::fs::remove_file(newest_run(dir.path())).unwrap();
        // The record written at the upgrade guards the runs from then on.
        refused_as_damaged(dir.path(), "newest runs were lost");
    }

    /// sled's files are what hold the store's layout and index: lost, sled makes new ones.
    /// A store whose other folders hold writes is then refused, unless its write-ahead log
    /// still holds everything since the store was made (its first segment is there), as a
    /// store made by a binary before 797925f and killed before its first checkpoint may be.
    /// A store whose first open stopped before recording its layout opens.
    #[test]
    fn a_store_that_lost_sled_is_refused_unless_its_log_holds_everything() {
        let log_tx = |entries: &[u8]| Tx {
            ops: entries.iter().map(|&e| Op::Log(vec![e])).collect(),
            receipts: None,
        };
        // Only the log's and message files kept: nothing in the runs says writes were made.
        let dir = tempfile::tempdir().unwrap();
        let (mut committer, _) = recover(dir.path(), 16 << 20).unwrap();
        commit_group(&mut committer, [log_tx(&[1, 2])]);
        checkpoint_current_segment(&mut committer);
        crash(committer);
        lose_sled(dir.path());
        std::fs::remove_dir_all(dir.path().join("runs")).unwrap();
        std::fs::remove_file(dir.path().join("runs.last")).unwrap();
        refused_as_damaged(dir.path(), "sled's files in");

        // No checkpoint yet: the first segment holds every commit, and the replay rebuilds
        // the index.
        let dir = tempfile::tempdir().unwrap();
        let (mut committer, _) = recover(dir.path(), 16 << 20).unwrap();
        commit_group(&mut committer, [log_tx(&[1, 2, 3])]);
        crash(committer);
        lose_sled(dir.path());
        let store = SledStore::open(dir.path(), 16 << 20).unwrap();
        assert_eq!(store.log_size().unwrap(), 3);
        assert_eq!(store.log_entry(2).unwrap(), Some(vec![3]));
        drop(store);

        // A first open stopped after it recorded the runs' checkpoint 0, before the layout.
        let dir = tempfile::tempdir().unwrap();
        drop(RunSet::adopt(&dir.path().join("runs"), false).unwrap());
        drop(LogFiles::open(&dir.path().join("log")).unwrap());
        drop(Records::open(&dir.path().join("messages"), MAX_MESSAGE).unwrap());
        let store = SledStore::open(dir.path(), 16 << 20).unwrap();
        assert_eq!(store.log_size().unwrap(), 0);
    }

    /// A queue entry sled holds from layout 3, taken off at layout 4: its removal hides a
    /// value no run holds, so no merge may drop it, and the entry stays gone through merges
    /// and a reopen.
    #[test]
    fn an_entry_sled_holds_from_layout_3_stays_gone_through_merges() {
        let dir = tempfile::tempdir().unwrap();
        let (outbox, prefix) = kh_outbox();
        let routine = 255 - (pb::Priority::Routine as i32).clamp(1, 254) as u8;
        let old = [prefix.as_slice(), &[routine], &5u64.to_be_bytes()].concat();
        {
            // As a binary of layout 3 leaves a store after a checkpoint moved the entry.
            let db = open_sled(dir.path(), 16 << 20).unwrap();
            db.insert(META_FORMAT, 3u64.to_be_bytes().as_slice())
                .unwrap();
            db.insert(META_SEQ, 6u64.to_be_bytes().as_slice()).unwrap();
            let id = MessageId::new_v7(92_000, [9; 10]);
            let entry = QueueEntry::message(&id).encode_to_vec();
            db.insert(old.as_slice(), entry).unwrap();
            db.flush().unwrap();
        }
        let (mut committer, _) = recover(dir.path(), 16 << 20).unwrap();
        assert_eq!(keys_under(&committer, &prefix), std::slice::from_ref(&old));
        commit_group(&mut committer, [dequeue_tx(&old)]);
        checkpoint_current_segment(&mut committer);
        for i in 1..8 {
            let id = MessageId::new_v7(92_000 + i, [9; 10]);
            commit_group(
                &mut committer,
                [enqueue_message(&outbox, pb::Priority::Routine, &id)],
            );
            checkpoint_current_segment(&mut committer);
        }
        assert!(!keys_under(&committer, &prefix).contains(&old));
        assert!(
            raw_run_entries(&committer, &prefix)
                .iter()
                .any(|(k, held)| *k == old && held.is_none()),
            "the removal over sled's value was dropped by a merge"
        );
        crash(committer);
        let (committer, _) = recover(dir.path(), 16 << 20).unwrap();
        assert!(!keys_under(&committer, &prefix).contains(&old));
        crash(committer);
    }

    /// A merge that fails (here a damaged block of metadata in the oldest run, which no
    /// read touches) stops merging, not the store: commits and checkpoints go on as runs
    /// pile up, and the store opens again, since an open does not merge.
    #[test]
    fn a_merge_that_fails_stops_merging_not_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let (mut committer, _) = recover(dir.path(), 16 << 20).unwrap();
        let insert = |i: u64| {
            let id = MessageId::new_v7(70_000 + i, [1; 10]);
            let stored = StoredMessage::default();
            // A kilobyte of metadata each, to fill the first run's blocks.
            let meta = Op::PutMeta(format!("filler-{i}"), vec![i as u8; 1024]);
            Tx {
                ops: vec![Op::InsertMessage(id, stored), meta],
                receipts: None,
            }
        };
        commit_group(&mut committer, (0..40).map(insert));
        checkpoint_current_segment(&mut committer);
        let oldest = committer.applying.read().unwrap().runs[0].clone();
        assert!(oldest.run.bytes() > 20_000);
        let path = dir.path().join("runs").join(format!("{:020}-{:020}", 1, 1));
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(&[0xff; 8], 3 * 4096 + 100).unwrap();
        drop((file, oldest));
        for i in 40..50 {
            commit_group(&mut committer, [insert(i)]);
            checkpoint_current_segment(&mut committer);
        }
        assert_eq!(committer.progress.poisoned(), None);
        let runs = committer.applying.read().unwrap().runs.len();
        assert_eq!(runs, 11, "no merge since the failed one");
        let id = |i: u64| MessageId::new_v7(70_000 + i, [1; 10]);
        crash(committer);
        let store = SledStore::open(dir.path(), 16 << 20).unwrap();
        assert!(store.message(&id(49)).unwrap().is_some());
        assert!(
            store.message(&id(0)).unwrap().is_some(),
            "an undamaged block"
        );
    }

    /// A read through the queue's start always equals a plain scan. Checked after:
    /// - a Flash put below the start;
    /// - a first deferral that sorts ahead of an earlier-deferred Routine entry, while the start
    ///   is inside band 255;
    /// - `limit == 0`;
    /// - a drained queue, then a new put;
    /// - checkpoints and merges.
    #[test]
    fn queue_starts_never_hide_an_entry_put_below_them() {
        let dir = tempfile::tempdir().unwrap();
        let (mut committer, _) = recover(dir.path(), 16 << 20).unwrap();
        let (outbox, prefix) = kh_outbox();
        let id = |i: u64| MessageId::new_v7(12_000 + i, [7; 10]);
        let tx = |ops: Vec<Op>| Tx {
            ops,
            receipts: None,
        };
        let read = |committer: &Committer, limit| queue_keys(committer, &prefix, limit);
        let check = |committer: &Committer, what: &str| {
            for limit in [0, 1, 3, usize::MAX] {
                let all = keys_under(committer, &prefix);
                assert_eq!(
                    read(committer, limit),
                    all[..limit.min(all.len())],
                    "{what}, {limit}"
                );
            }
        };
        let routine = routine_to(&outbox, 12_000, 7);

        // Half taken off and checkpointed: their removals sit ahead of the start, in a run.
        let first = head_taken_off(&mut committer, routine, &prefix, 5);
        check(&committer, "after the head left");
        assert_eq!(read(&committer, 1), first[5..6]);

        // A Flash entry sorts below the start: lowered, seen first.
        commit_group(
            &mut committer,
            [enqueue_message(&outbox, pb::Priority::Flash, &id(10))],
        );
        check(&committer, "a Flash put below the start");
        let flash = read(&committer, 1)[0].clone();
        assert!(flash < first[5]);

        // Only a deferred Routine entry is left live: the start goes into band 255.
        commit_group(
            &mut committer,
            [tx(vec![Op::Defer(QueueKey(first[5].clone()))])],
        );
        commit_group(&mut committer, [dequeue_all(&first[6..])]);
        commit_group(&mut committer, [dequeue_all(std::slice::from_ref(&flash))]);
        check(&committer, "only a deferred entry left");
        let deferred_routine = read(&committer, 1)[0].clone();
        assert_eq!(deferred_routine[prefix.len()], 255);

        // A Flash entry enqueued and deferred in the same transaction. The group leaves only the
        // deferred key, [255, 252, seq], and it sorts below the start at [255, 254, ..]. The key
        // the enqueue takes is computed from the committer's next sequence number.
        let enqueued = [
            prefix.clone(),
            vec![252],
            committer.next_seq.to_be_bytes().to_vec(),
        ]
        .concat();
        commit_group(
            &mut committer,
            [tx(vec![
                Op::Enqueue(
                    outbox.clone(),
                    pb::Priority::Flash,
                    QueueEntry::message(&id(11)),
                ),
                Op::Defer(QueueKey(enqueued)),
            ])],
        );
        check(&committer, "a first deferral below the start in band 255");
        let live = keys_under(&committer, &prefix);
        assert_eq!(live.len(), 2);
        assert_eq!(live[1], deferred_routine);

        // Drained: the start passes the last key stepped on; a new Routine entry is still seen.
        commit_group(&mut committer, [dequeue_all(&live)]);
        assert!(read(&committer, 5).is_empty());
        checkpoint_current_segment(&mut committer);
        assert!(read(&committer, 5).is_empty());
        commit_group(&mut committer, [routine(12)]);
        check(&committer, "a put after the queue drained");

        // Merges drop removals with their values; nothing is hidden or shown by it.
        for i in 13..24 {
            commit_group(&mut committer, [routine(i)]);
            checkpoint_current_segment(&mut committer);
            check(&committer, "through merges");
            let head = read(&committer, 1);
            commit_group(&mut committer, [dequeue_all(&head)]);
            check(&committer, "after taking the head off");
        }
        crash(committer);
    }

    /// Readers move the starts on two threads, with random limits, while commits put ever
    /// higher priorities and take entries off. After each acknowledged commit, a read through
    /// the starts equals a plain scan.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn readers_moving_queue_starts_never_hide_an_acknowledged_entry() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SledStore::open(dir.path(), 16 << 20).unwrap());
        let (outbox, prefix) = kh_outbox();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let readers: Vec<_> = (1..=2u64)
            .map(|seed| {
                let (store, outbox, stop) = (store.clone(), outbox.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut n = seed;
                    while !stop.load(Ordering::Relaxed) {
                        n = n
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        store.queue(&outbox, (n >> 61) as usize).unwrap();
                    }
                })
            })
            .collect();
        let plain = |limit: usize| -> Vec<Vec<u8>> {
            let whole = store.whole_groups().unwrap();
            let scanned = whole.scan(&store.db, &prefix, limit).unwrap();
            scanned.into_iter().map(|(k, _)| k).collect()
        };
        let priorities = [
            pb::Priority::Routine,
            pb::Priority::Urgent,
            pb::Priority::Flash,
        ];
        for i in 0..3_000u64 {
            let id = MessageId::new_v7(20_000 + i, [3; 10]);
            let priority = priorities[(i * 7 % 3) as usize];
            store
                .commit(enqueue_message(&outbox, priority, &id))
                .await
                .unwrap();
            if i % 3 == 0 {
                // Taken off at the head or part way down, so that removals sit on both sides.
                let keys = plain(4);
                let key = keys[(i as usize / 3) % keys.len()].clone();
                let tx = Tx {
                    ops: vec![Op::Dequeue(QueueKey(key))],
                    receipts: None,
                };
                store.commit(tx).await.unwrap();
            }
            for limit in [1, 5] {
                let through: Vec<Vec<u8>> = (store.queue(&outbox, limit).unwrap().into_iter())
                    .map(|(k, _)| k.0)
                    .collect();
                assert_eq!(through, plain(limit), "commit {i}, limit {limit}");
            }
        }
        stop.store(true, Ordering::Relaxed);
        for reader in readers {
            reader.join().unwrap();
        }
    }

    /// Layout 4 before 066e72e put small messages as `m` keys into the held writes, and so
    /// into runs. Such a message is still read, and its id is still taken.
    #[tokio::test]
    async fn a_message_a_run_holds_inline_is_still_read_and_its_id_taken() {
        let dir = tempfile::tempdir().unwrap();
        let id = MessageId::new_v7(40_000, [8; 10]);
        let stored = StoredMessage {
            head: MessageHead {
                sender_org: "org-inline".into(),
                ..Default::default()
            },
            ..Default::default()
        };
        {
            let (mut committer, _) = recover(dir.path(), 16 << 20).unwrap();
            {
                // As 40d01b9's build and apply wrote it: into the held writes.
                let mut applied = committer.applying.write().unwrap();
                let db = committer.db.clone();
                applied
                    .put(&db, &message_key(&id), &stored.encode_to_vec())
                    .unwrap();
            }
            commit_group(
                &mut committer,
                [Tx {
                    ops: vec![Op::Log(b"x".to_vec())],
                    receipts: None,
                }],
            );
            checkpoint_current_segment(&mut committer);
            let applied = committer.applying.read().unwrap();
            assert!(
                applied.held.0.is_empty() && !applied.runs.is_empty(),
                "in a run"
            );
            assert!(
                !committer.db.contains_key(message_key(&id)).unwrap(),
                "not in sled"
            );
            drop(applied);
            crash(committer);
        }
        let store = SledStore::open(dir.path(), 16 << 20).unwrap();
        assert_eq!(store.message(&id).unwrap(), Some(stored.clone()));
        let again = Tx {
            ops: vec![Op::InsertMessage(id, stored)],
            receipts: None,
        };
        assert_eq!(store.commit(again).await.unwrap(), TxOutcome::Exists(id));
    }

    /// Entries of a higher priority coming and going (receipts, at Urgent, in a two-way
    /// drain) leave the start of the Routine band where it was: scans go on skipping the
    /// removals at that band's head.
    #[test]
    fn an_urgent_entry_leaves_the_routine_bands_start_alone() {
        let dir = tempfile::tempdir().unwrap();
        let (mut committer, _) = recover(dir.path(), 16 << 20).unwrap();
        let (outbox, prefix) = kh_outbox();
        let id = |i: u64| MessageId::new_v7(13_000 + i, [6; 10]);
        let read = |committer: &Committer, limit| queue_keys(committer, &prefix, limit);
        let routine_start = |committer: &Committer| -> Option<Vec<u8>> {
            let applied = committer.applying.read().unwrap();
            let band = 255 - pb::Priority::Routine as u8;
            applied.queue_starts.bands(&prefix).get(&band).cloned()
        };
        let first = head_taken_off(&mut committer, routine_to(&outbox, 13_000, 6), &prefix, 6);
        assert_eq!(read(&committer, 2), first[6..8]);
        assert_eq!(routine_start(&committer).as_ref(), Some(&first[6]));

        let urgent = enqueue_message(&outbox, pb::Priority::Urgent, &id(10));
        commit_group(&mut committer, [urgent]);
        assert_eq!(
            routine_start(&committer).as_ref(),
            Some(&first[6]),
            "the urgent entry moved the routine band's start"
        );
        let seen = read(&committer, 2);
        assert_eq!(seen[1], first[6], "the urgent entry first");
        commit_group(&mut committer, [dequeue_all(&seen[..1])]);
        assert_eq!(read(&committer, 2), first[6..8]);
        assert_eq!(routine_start(&committer).as_ref(), Some(&first[6]));
        crash(committer);
    }

    /// A clean close writes the held writes as a run: the store reopens with nothing to
    /// replay and the same queues, removals included.
    #[tokio::test]
    async fn a_clean_close_leaves_the_held_writes_in_a_run() {
        let dir = tempfile::tempdir().unwrap();
        let inbox = Queue::Inbox(ahtd());
        let ids: Vec<MessageId> = (0..4)
            .map(|i| MessageId::new_v7(8_000 + i, [5; 10]))
            .collect();
        let before = {
            let store = SledStore::open(dir.path(), 16 << 20).unwrap();
            for id in &ids {
                let tx = Tx {
                    ops: vec![
                        Op::InsertMessage(*id, StoredMessage::default()),
                        Op::Enqueue(
                            inbox.clone(),
                            pb::Priority::Routine,
                            QueueEntry::message(id),
                        ),
                    ],
                    receipts: None,
                };
                store.commit(tx).await.unwrap();
            }
            let remove = Tx {
                ops: vec![Op::RemoveFromInbox(ahtd(), ids[1])],
                receipts: None,
            };
            store.commit(remove).await.unwrap();
            store.queue(&inbox, 10).unwrap()
        };
        assert_eq!(before.len(), 3);
        let store = SledStore::open(dir.path(), 16 << 20).unwrap();
        assert_eq!(
            store.replayed_groups(),
            0,
            "a clean close left nothing to replay"
        );
        assert_eq!(store.queue(&inbox, 10).unwrap(), before);
        // The index found the removed one's entry, and still finds the others'.
        let remove = Tx {
            ops: vec![Op::RemoveFromInbox(ahtd(), ids[2])],
            receipts: None,
        };
        store.commit(remove).await.unwrap();
        let left: Vec<_> = store.queue(&inbox, 10).unwrap();
        assert_eq!(left, [before[0].clone(), before[2].clone()]);
    }

    /// A message for the tests of large bodies: `len` bytes of ciphertext.
    fn body_of(i: u8, len: usize) -> (MessageId, StoredMessage) {
        let stored = StoredMessage {
            envelope: Some(pb::Envelope {
                header: vec![i; 40].into(),
                ciphertext: vec![i; len].into(),
                signature: vec![i; 64].into(),
            }),
            ..Default::default()
        };
        (MessageId::new_v7(50_000 + u64::from(i), [i; 10]), stored)
    }

    fn insert_body(i: u8, len: usize) -> Tx {
        let (id, stored) = body_of(i, len);
        Tx {
            ops: vec![Op::InsertMessage(id, stored)],
            receipts: None,
        }
    }

    /// A group holding a large message record writes its message records once, to the
    /// message files and synced, before its log record, which names them; a replay reads
    /// them back, even when `ends` lost their places (it is synced only at checkpoints).
    #[test]
    fn a_large_body_is_written_once_and_replayed_from_the_message_files() {
        let dir = tempfile::tempdir().unwrap();
        let large = WRITTEN_FIRST_FROM;
        let bodies = [(0, 100), (1, 100), (2, large), (3, 4 * large)];
        {
            let (mut committer, _) = recover(dir.path(), 16 << 20).unwrap();
            let start = committer.segment.bytes();
            commit_group(&mut committer, [insert_body(0, 100)]);
            let small = committer.segment.bytes() - start;
            assert!(
                small > 100,
                "a small group's record holds its body: {small} bytes"
            );
            // A small record and a large one: both written first, synced, both named.
            let synced = |committer: &Committer| {
                let records = &committer.messages;
                let len = records.entries.metadata().unwrap().len();
                (records.synced_first.load(Ordering::Relaxed), len)
            };
            commit_group(&mut committer, [insert_body(1, 100), insert_body(2, large)]);
            let (synced_at, len) = synced(&committer);
            assert_eq!(synced_at, len, "synced before the log record");
            commit_group(&mut committer, [insert_body(3, 4 * large)]);
            let (synced_at, len) = synced(&committer);
            assert_eq!(synced_at, len, "synced before the log record");
            let logged = committer.segment.bytes() - start - small;
            assert!(
                logged < 2 << 10,
                "the log names the large groups' records: {logged} bytes"
            );
            crash(committer);
        }
        std::fs::OpenOptions::new()
            .write(true)
            .open(dir.path().join("messages").join("ends"))
            .unwrap()
            .set_len(0)
            .unwrap();
        let store = SledStore::open(dir.path(), 16 << 20).unwrap();
        assert_eq!(store.replayed_groups(), 3);
        for (i, len) in bodies {
            let (id, stored) = body_of(i, len);
            assert_eq!(store.message(&id).unwrap(), Some(stored), "message {i}");
        }
    }

    /// The threshold is on a record's encoded bytes: one byte under it, a group is logged
    /// whole; at it, its records are written first.
    #[test]
    fn records_are_written_first_from_the_threshold_on() {
        let encoded_at = |i: u8, bytes: usize| -> Tx {
            let mut len = bytes - 200;
            while body_of(i, len).1.encoded_len() < bytes {
                len += 1;
            }
            assert_eq!(body_of(i, len).1.encoded_len(), bytes);
            insert_body(i, len)
        };
        let dir = tempfile::tempdir().unwrap();
        let (mut committer, _) = recover(dir.path(), 16 << 20).unwrap();
        let start = committer.segment.bytes();
        commit_group(&mut committer, [encoded_at(1, WRITTEN_FIRST_FROM - 1)]);
        let under = committer.segment.bytes() - start;
        assert!(
            under as usize > WRITTEN_FIRST_FROM,
            "logged whole: {under} bytes"
        );
        commit_group(&mut committer, [encoded_at(2, WRITTEN_FIRST_FROM)]);
        let at = committer.segment.bytes() - start - under;
        assert!(at < 1 << 10, "named: {at} bytes");
        crash(committer);
    }

    /// A log record that removes a message record, named nowhere, is damage; so is a
    /// written-first mark on a write that holds its record too, or on another kind of key.
    #[test]
    fn a_logged_removal_or_a_misplaced_mark_is_refused_at_replay() {
        let named = Some(WrittenFirst::of(b"a record"));
        for (write, says) in [
            (
                WalWrite {
                    key: message_record_key(1).to_vec(),
                    value: None,
                    written_first: None,
                },
                "removal",
            ),
            (
                WalWrite {
                    key: message_record_key(1).to_vec(),
                    value: Some(b"a record".to_vec()),
                    written_first: named,
                },
                "names a record",
            ),
            (
                WalWrite {
                    key: log_key(1).to_vec(),
                    value: None,
                    written_first: named,
                },
                "names a record",
            ),
        ] {
            let dir = tempfile::tempdir().unwrap();
            {
                let (mut committer, _) = recover(dir.path(), 16 << 20).unwrap();
                commit_group(&mut committer, [insert_body(0, 100)]);
                let group = WalGroup {
                    writes: vec![write],
                };
                committer.segment.append(&group).unwrap();
                crash(committer);
            }
            refused_as_damaged(dir.path(), says);
        }
    }

    /// A record written before its log record that the disk damaged or cut since is
    /// refused at the replay as damage, never read as another message or skipped.
    #[test]
    fn a_large_body_damaged_after_its_log_record_is_refused_at_replay() {
        for cut in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            {
                let (mut committer, _) = recover(dir.path(), 16 << 20).unwrap();
                commit_group(&mut committer, [insert_body(0, 100)]);
                commit_group(&mut committer, [insert_body(1, WRITTEN_FIRST_FROM)]);
                crash(committer);
            }
            let entries = std::fs::OpenOptions::new()
                .write(true)
                .open(dir.path().join("messages").join("entries"))
                .unwrap();
            let len = entries.metadata().unwrap().len();
            if cut {
                entries.set_len(len - 10).unwrap();
            } else {
                entries.write_all_at(&[0xee], len - 1_000).unwrap();
            }
            refused_as_damaged(dir.path(), "replaying the write-ahead log");
        }
    }

    /// Records written first whose log record never was (a crash in between) lie past the
    /// store's count: unread, and written over by the next commit.
    #[test]
    fn large_bodies_written_before_a_crash_that_lost_their_log_record_are_unread() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut committer, _) = recover(dir.path(), 16 << 20).unwrap();
            let mut group = Group::default();
            committer
                .build(insert_body(1, 2 * WRITTEN_FIRST_FROM), &mut group)
                .unwrap();
            assert!(committer.write_records_first(&group.writes).unwrap());
            crash(committer);
        }
        let store = SledStore::open(dir.path(), 16 << 20).unwrap();
        assert_eq!(store.message(&body_of(1, 0).0).unwrap(), None);
        assert_eq!(
            store
                .whole_groups()
                .unwrap()
                .read_meta(&store.db, META_MESSAGES)
                .unwrap(),
            0
        );
        drop(store);
        {
            let (mut committer, _) = recover(dir.path(), 16 << 20).unwrap();
            commit_group(&mut committer, [insert_body(2, WRITTEN_FIRST_FROM)]);
            crash(committer);
        }
        let store = SledStore::open(dir.path(), 16 << 20).unwrap();
        let (id, stored) = body_of(2, WRITTEN_FIRST_FROM);
        assert_eq!(store.message(&id).unwrap(), Some(stored));
    }

    /// The store's cache bound sizes the runs' block cache: reads of what a run holds keep
    /// its blocks there, and a bound of 0 keeps none.
    #[tokio::test]
    async fn reads_keep_the_runs_blocks_within_the_stores_cache_bound() {
        let ids: Vec<MessageId> = (0..50)
            .map(|i| MessageId::new_v7(8_000 + i, [6; 10]))
            .collect();
        for cache_bytes in [0, 1 << 20] {
            let dir = tempfile::tempdir().unwrap();
            {
                let store = SledStore::open(dir.path(), cache_bytes).unwrap();
                for id in &ids {
                    let tx = Tx {
                        ops: vec![Op::InsertMessage(*id, StoredMessage::default())],
                        receipts: None,
                    };
                    store.commit(tx).await.unwrap();
                }
            }
            let store = SledStore::open(dir.path(), cache_bytes).unwrap();
            for id in &ids {
                assert_eq!(store.message(id).unwrap(), Some(StoredMessage::default()));
            }
            let whole = store.whole_groups().unwrap();
            assert_eq!(whole.runs.len(), 1, "the close wrote a run");
            let cached = whole.runs[0].run.cached_bytes();
            assert!(cached as u64 <= cache_bytes, "{cached} of {cache_bytes}");
            assert_eq!(cached > 0, cache_bytes > 0, "{cached} of {cache_bytes}");
        }
    }

    /// A checkpoint as the checkpointer makes one, in two steps that readers may see between:
    /// the held writes become the ones being written; then they become a run, merged with
    /// others when due, and installed.
    fn take_held(applied: &mut Applied) {
        assert!(applied.writing.is_none());
        applied.writing = Some(Arc::new(std::mem::take(&mut applied.held)));
    }

    fn install_run(applied: &mut Applied, set: &mut RunSet) {
        let writing = applied.writing.take().expect("held writes taken");
        if !writing.0.is_empty() {
            let entries = writing.0.iter().map(|(k, held)| Ok((k, held.value())));
            set.add(set.last_checkpoint() + 1, entries).unwrap();
        }
        set.compact().unwrap();
        applied.runs = set.runs();
    }

    /// Random puts and removals over a sled that already holds some keys, with checkpoints
    /// taken in two steps and runs merged: what readers see (a whole scan, a limited one,
    /// each key) is always what a plain map of the same writes holds, and so are the runs
    /// over sled once reopened. Index keys (`x`) are written again and again; queue entries
    /// (`q`) once each, as the committer writes them, and removed once or twice.
    #[test]
    fn held_writes_and_runs_read_as_a_plain_map_would() {
        let dir = tempfile::tempdir().unwrap();
        let db = open_sled(dir.path(), 16 << 20).unwrap();
        let runs_dir = dir.path().join("runs");
        let mut set = RunSet::open(&runs_dir, false)
            .unwrap()
            .with_put_once(is_put_once);
        // xorshift64: reproducible without a dependency.
        let mut state = 0x9E37_79B9_7F4A_7C15_u64;
        let mut next = move |n: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % n
        };
        let index_key = |k: u64| vec![b'x', b'0' + k as u8];
        // A priority band, then a sequence number: a new entry of a higher band sorts
        // ahead of older ones, below where a queue scan last found its first entry.
        let entry_key =
            |band: u8, seq: u64| [b"q".as_slice(), &[band], &seq.to_be_bytes()].concat();
        let mut truth = BTreeMap::new();
        let mut entries = Vec::new();
        for k in 0..6 {
            let value = vec![b's', k as u8];
            db.insert(index_key(k), value.clone()).unwrap();
            truth.insert(index_key(k), value.clone());
            db.insert(entry_key(2, k), value.clone()).unwrap();
            truth.insert(entry_key(2, k), value);
            entries.push(entry_key(2, k));
        }
        db.insert(b"r-never-written-again", b"x".as_slice())
            .unwrap();
        let mut applied = Applied {
            sled_holds_queue_keys: true,
            ..Applied::default()
        };
        let (mut checkpoints, mut merged_runs) = (0, 0);
        for step in 0..4_000u64 {
            let value = step.to_be_bytes().to_vec();
            let k = match next(20) {
                0..=5 => {
                    let k = index_key(next(12));
                    applied.put(&db, &k, &value).unwrap();
                    truth.insert(k.clone(), value);
                    k
                }
                6..=9 => {
                    let k = index_key(next(12));
                    applied.remove(&db, &k).unwrap();
                    truth.remove(&k);
                    k
                }
                10..=12 => {
                    let k = entry_key(1 + next(3) as u8, 100 + step);
                    applied.put(&db, &k, &value).unwrap();
                    truth.insert(k.clone(), value);
                    entries.push(k.clone());
                    k
                }
                13..=15 => {
                    let k = entries[next(entries.len() as u64) as usize].clone();
                    applied.remove(&db, &k).unwrap();
                    truth.remove(&k);
                    k
                }
                16 | 17 if applied.writing.is_none() => {
                    take_held(&mut applied);
                    index_key(next(12))
                }
                _ if applied.writing.is_some() => {
                    let before = set.runs().len() + 1;
                    install_run(&mut applied, &mut set);
                    checkpoints += 1;
                    merged_runs += usize::from(set.runs().len() < before);
                    index_key(next(12))
                }
                _ => index_key(next(12)),
            };
            assert_eq!(
                applied.get(&db, &k).unwrap(),
                truth.get(&k).cloned(),
                "step {step}"
            );
            assert_eq!(applied.contains(&db, &k).unwrap(), truth.contains_key(&k));
            let all: Vec<_> = truth.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            let queue_and_index: Vec<_> = (applied.scan(&db, b"q", usize::MAX).unwrap())
                .into_iter()
                .chain(applied.scan(&db, b"x", usize::MAX).unwrap())
                .collect();
            assert_eq!(queue_and_index, all, "step {step}");
            let limit = next(5) as usize;
            let first = applied.scan(&db, b"q", limit).unwrap();
            assert_eq!(first, all[..limit.min(entries_live(&all))], "step {step}");
            // As a queue's reader sees it, from where the last such read started.
            let limit = next(5) as usize;
            let first = applied.queue(&db, b"q", limit).unwrap();
            assert_eq!(first, all[..limit.min(entries_live(&all))], "step {step}");
        }
        assert!(
            checkpoints > 100 && merged_runs > 10,
            "{checkpoints} {merged_runs}"
        );
        // The writes being written, then those held since.
        if applied.writing.is_some() {
            install_run(&mut applied, &mut set);
        }
        take_held(&mut applied);
        install_run(&mut applied, &mut set);
        assert!(set.runs().len() <= 8, "{} runs", set.runs().len());
        drop(set);
        let reopened = Applied {
            runs: RunSet::open(&runs_dir, false).unwrap().runs(),
            ..Applied::default()
        };
        let mut read = reopened.scan(&db, b"q", usize::MAX).unwrap();
        read.extend(reopened.scan(&db, b"x", usize::MAX).unwrap());
        let all: Vec<_> = truth.into_iter().collect();
        assert_eq!(read, all);
    }

    /// How many of `all`'s keys are queue entries' (`q`, sorted first).
    fn entries_live(all: &[KeyValue]) -> usize {
        all.iter().take_while(|(k, _)| k[0] == b'q').count()
    }

    /// A key something below holds, written again and then removed while held, stays
    /// removed: the removal reaches the next run, or the older value would come back. A key
    /// nothing below holds leaves nothing behind.
    #[test]
    fn a_held_removal_of_a_key_below_reaches_the_next_run() {
        let dir = tempfile::tempdir().unwrap();
        let db = open_sled(dir.path(), 16 << 20).unwrap();
        let mut set = RunSet::open(&dir.path().join("runs"), false).unwrap();
        db.insert(b"qa", b"old".as_slice()).unwrap();
        let mut applied = Applied {
            sled_holds_queue_keys: true,
            ..Applied::default()
        };
        applied.put(&db, b"qc", b"in a run").unwrap();
        take_held(&mut applied);
        install_run(&mut applied, &mut set);
        for key in [b"qa", b"qb", b"qc"] {
            applied.put(&db, key, b"new").unwrap();
        }
        assert_eq!(applied.get(&db, b"qa").unwrap(), Some(b"new".to_vec()));
        for key in [b"qa", b"qb", b"qc"] {
            applied.remove(&db, key).unwrap();
        }
        let held: Vec<&[u8]> = applied.held.0.keys().map(Vec::as_slice).collect();
        assert_eq!(
            held,
            [b"qa", b"qc"],
            "a key nothing below held left nothing"
        );
        assert!(applied.scan(&db, b"q", 10).unwrap().is_empty());
        take_held(&mut applied);
        install_run(&mut applied, &mut set);
        assert!(applied.held.0.is_empty());
        assert_eq!(set.runs()[0].run.get(b"qa").unwrap(), Some(None));
        assert_eq!(set.runs()[0].run.get(b"qb").unwrap(), None);
        assert!(applied.scan(&db, b"q", 10).unwrap().is_empty());
        assert_eq!(applied.get(&db, b"qc").unwrap(), None);
        // Removed again (a retried dequeue): nothing to hide, nothing held.
        applied.remove(&db, b"qb").unwrap();
        assert!(applied.held.0.is_empty());
    }

    /// Readers scanning a queue while the checkpointer writes the held writes as runs and
    /// merges runs, and while the committer enqueues and dequeues (it does not wait for a
    /// checkpoint, so its groups may fall between taking the held writes and installing
    /// their run; whether one does is up to the scheduler). Every scan shows each entry answered
    /// before it began, unless removed while it ran, no entry removed before it began, and
    /// nothing never enqueued. After a crash the store holds exactly the entries left.
    #[test]
    fn readers_see_a_whole_queue_while_checkpoints_write_runs() {
        use std::sync::atomic::AtomicBool;
        let dir = tempfile::tempdir().unwrap();
        let (mut committer, _) = recover(dir.path(), 16 << 20).unwrap();
        let (outbox, prefix) = kh_outbox();
        // Where each entry stands, by key, as its groups are answered.
        #[derive(Clone, Copy, PartialEq, Debug)]
        enum Stage {
            In,
            /// Its dequeue is being committed: readers may or may not see it.
            Leaving,
            Out,
        }
        let answered = Arc::new(Mutex::new(BTreeMap::<Vec<u8>, Stage>::new()));
        // Message ids of every entry enqueued or about to be.
        let enqueued = Arc::new(Mutex::new(HashSet::<Vec<u8>>::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let applying = committer.applying.clone();
                let db = committer.db.clone();
                let (prefix, stop) = (prefix.clone(), stop.clone());
                let (answered, enqueued) = (answered.clone(), enqueued.clone());
                std::thread::spawn(move || {
                    let mut scans = 0u32;
                    // At least once, however late this thread first runs.
                    while scans == 0 || !stop.load(Ordering::Relaxed) {
                        let before = answered.lock().unwrap().clone();
                        let seen: BTreeMap<Vec<u8>, Vec<u8>> = {
                            let applied = applying.read().unwrap();
                            assert!(!applied.failed);
                            let scan = applied.scan(&db, &prefix, usize::MAX);
                            scan.unwrap().into_iter().collect()
                        };
                        let after = answered.lock().unwrap().clone();
                        for (key, stage) in &before {
                            match stage {
                                Stage::In => assert!(
                                    seen.contains_key(key) || after[key] != Stage::In,
                                    "an entry in the queue is missing from a scan"
                                ),
                                Stage::Out => {
                                    assert!(!seen.contains_key(key), "a removed entry came back")
                                }
                                Stage::Leaving => {}
                            }
                        }
                        let enqueued = enqueued.lock().unwrap();
                        for value in seen.values() {
                            let entry = QueueEntry::decode(value.as_slice()).unwrap();
                            assert!(enqueued.contains(&entry.message_id), "a phantom entry");
                        }
                        scans += 1;
                    }
                    scans
                })
            })
            .collect();

        let mut largest_checkpoint = 0;
        for round in 0..24u64 {
            let ids: Vec<MessageId> = (0..400)
                .map(|i| MessageId::new_v7(20_000 + round * 1_000 + i, [9; 10]))
                .collect();
            let mut pending = enqueued.lock().unwrap();
            pending.extend(ids.iter().map(|id| id.as_bytes().to_vec()));
            drop(pending);
            let txs = ids.iter().map(|id| Tx {
                ops: vec![Op::Enqueue(
                    outbox.clone(),
                    pb::Priority::Routine,
                    QueueEntry::message(id),
                )],
                receipts: None,
            });
            commit_group(&mut committer, txs);
            let mut state = answered.lock().unwrap();
            let known = state.len();
            for key in keys_under(&committer, &prefix) {
                state.entry(key).or_insert(Stage::In);
            }
            assert_eq!(state.len(), known + 400, "round {round}: entries missing");
            // Every other live entry leaves, those of this round among them.
            let leaving: Vec<Vec<u8>> = state
                .iter()
                .filter(|(_, stage)| **stage == Stage::In)
                .map(|(key, _)| key.clone())
                .step_by(2)
                .collect();
            for key in &leaving {
                state.insert(key.clone(), Stage::Leaving);
            }
            drop(state);
            let txs = leaving.iter().map(|key| Tx {
                ops: vec![Op::Dequeue(QueueKey(key.clone()))],
                receipts: None,
            });
            commit_group(&mut committer, txs);
            let mut state = answered.lock().unwrap();
            for key in &leaving {
                state.insert(key.clone(), Stage::Out);
            }
            drop(state);
            if round % 4 == 3 {
                // The checkpointer writes the held keys while the next rounds commit.
                let held = committer.applying.read().unwrap().held.0.len();
                largest_checkpoint = largest_checkpoint.max(held);
                committer.rotate();
            }
        }
        stop.store(true, Ordering::Relaxed);
        for reader in readers {
            assert!(reader.join().unwrap() > 0, "a reader never scanned");
        }
        assert!(
            largest_checkpoint > 400,
            "checkpoints of {largest_checkpoint} keys at most"
        );

        let left: Vec<Vec<u8>> = answered
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, stage)| **stage == Stage::In)
            .map(|(key, _)| key.clone())
            .collect();
        assert_eq!(keys_under(&committer, &prefix), left);
        crash(committer);
        let (committer, _) = recover(dir.path(), 16 << 20).unwrap();
        assert_eq!(keys_under(&committer, &prefix), left);
    }

    /// A thread that panics holding the applied state (the checkpointer moving held queue
    /// keys, the committer applying a group) may leave the held writes or the runs half changed.
    /// Nothing is built over it: a group built before is answered, its log record being
    /// durable, and comes back at the next open; what comes after fails, saying to restart.
    #[test]
    fn a_panic_holding_the_applied_state_stops_the_store_until_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let (mut committer, _) = recover(dir.path(), 16 << 20).unwrap();
        let (outbox, prefix) = kh_outbox();
        let enqueue = routine_to(&outbox, 30_000, 4);
        commit_group(&mut committer, [enqueue(0)]);
        let mut built = Group::default();
        let outcome = committer.build(enqueue(1), &mut built);
        let (reply, mut answer) = oneshot::channel();
        built.waiting.push((reply, outcome));

        let applying = committer.applying.clone();
        let panicked = std::thread::spawn(move || {
            let _moving = applying.write().unwrap();
            panic!("a checkpointer panicking mid-move (expected by this test)");
        });
        assert!(panicked.join().is_err());
        committer.write(built);
        assert!(matches!(
            answer.try_recv(),
            Ok(Ok(TxOutcome::Committed { .. }))
        ));
        let why = committer.progress.poisoned().expect("the store stops");
        assert!(why.contains("restart"), "{why}");
        let mut after = Group::default();
        assert!(committer.build(enqueue(2), &mut after).is_err());

        crash(committer);
        let (mut committer, _) = recover(dir.path(), 16 << 20).unwrap();
        let applied = committer.applying.read().unwrap();
        let queued: Vec<Vec<u8>> = (applied.scan(&committer.db, &prefix, usize::MAX))
            .unwrap()
            .into_iter()
            .map(|(_, value)| QueueEntry::decode(value.as_slice()).unwrap().message_id)
            .collect();
        let answered: Vec<Vec<u8>> = (0..2)
            .map(|i| MessageId::new_v7(30_000 + i, [4; 10]).as_bytes().to_vec())
            .collect();
        assert_eq!(
            queued, answered,
            "the group answered before the panic is kept"
        );
        drop(applied);

        // A panic between two builds: the next one is refused and stops the store.
        let applying = committer.applying.clone();
        let panicked = std::thread::spawn(move || {
            let _moving = applying.write().unwrap();
            panic!("a checkpointer panicking mid-move (expected by this test)");
        });
        assert!(panicked.join().is_err());
        let refused = committer.build(enqueue(3), &mut Group::default());
        let refused = refused.unwrap_err().to_string();
        assert!(refused.contains("restart"), "{refused}");
        assert!(committer.progress.poisoned().is_some());
    }

    /// A group whose log record failed may still reach the disk and be replayed: the store
    /// is poisoned before the group hears of the failure, so that a caller that saw it and
    /// asks whether the store still takes commits (the forwarder, before a call leaves) is
    /// told it does not.
    #[test]
    fn a_failed_group_is_answered_after_the_store_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let (mut committer, _) = recover(dir.path(), 16 << 20).unwrap();
        let (outbox, _) = kh_outbox();
        let enqueue = routine_to(&outbox, 31_000, 4);
        commit_group(&mut committer, [enqueue(0)]);
        committer.segment.fail_appends().unwrap();
        let mut built = Group::default();
        let outcome = committer.build(enqueue(1), &mut built);
        let (reply, mut answer) = oneshot::channel();
        built.waiting.push((reply, outcome));

        // Readers hold the applied state: the group is answered only once they let go.
        let applying = committer.applying.clone();
        let reading = applying.read().unwrap();
        let progress = committer.progress.clone();
        let writer = std::thread::spawn(move || {
            committer.write(built);
            committer
        });
        let started = Instant::now();
        while progress.poisoned().is_none() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "not poisoned before the group is answered"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(answer.try_recv().is_err(), "not answered yet");
        drop(reading);
        let committer = writer.join().unwrap();
        assert!(matches!(answer.try_recv(), Ok(Err(_))));
        crash(committer);
    }

    /// A power cut keeps only what was synced: the runs and the log's files as the last
    /// checkpoint left them (and garbage past the files' synced ends), and every
    /// write-ahead log record, synced before its group was answered. The writes held in
    /// memory at the cut, the removals and the deferral of entries a run holds, come back
    /// from the log: the store reads as the one that lost nothing.
    #[test]
    fn a_power_cut_after_a_checkpoint_is_rebuilt_from_the_write_ahead_log() {
        let dir = tempfile::tempdir().unwrap();
        let (mut committer, _) = recover(dir.path(), 16 << 20).unwrap();
        let (outbox, prefix) = kh_outbox();
        let id = |i: u64| MessageId::new_v7(40_000 + i, [5; 10]);
        let submit = |i: u64| {
            let stored = StoredMessage {
                head: MessageHead {
                    envelope_hash: vec![i as u8; 32],
                    ..Default::default()
                },
                ..Default::default()
            };
            Tx {
                ops: vec![
                    Op::InsertMessage(id(i), stored),
                    Op::Enqueue(
                        outbox.clone(),
                        pb::Priority::Routine,
                        QueueEntry::message(&id(i)),
                    ),
                    log_naming(&id(i)),
                ],
                receipts: receipt_naming_index(id(i)),
            }
        };
        let key_of = |committer: &Committer, i: u64| -> Vec<u8> {
            let applied = committer.applying.read().unwrap();
            let queued = applied.scan(&committer.db, &prefix, usize::MAX);
            let wanted = id(i).as_bytes().to_vec();
            (queued.unwrap().into_iter())
                .find(|(_, v)| QueueEntry::decode(v.as_slice()).unwrap().message_id == wanted)
                .map(|(k, _)| k)
                .unwrap()
        };
        let dequeue = |committer: &mut Committer, from: u64, to: u64| {
            let keys: Vec<Vec<u8>> = (from..to).map(|i| key_of(committer, i)).collect();
            let txs = keys.into_iter().map(|key| Tx {
                ops: vec![Op::Dequeue(QueueKey(key))],
                receipts: None,
            });
            commit_group(committer, txs);
        };

        commit_group(&mut committer, (0..20).map(submit));
        commit_group(&mut committer, (20..40).map(submit));
        dequeue(&mut committer, 0, 5); // never reach a run
        checkpoint_current_segment(&mut committer);
        // Everything is synced and nothing writes: this is what a power cut from here on
        // leaves of the runs and the log's files.
        let applied = committer.applying.read().unwrap();
        assert!(applied.held.0.is_empty());
        assert_eq!(applied.runs.len(), 1);
        assert_eq!(
            applied.runs[0].run.scan(&prefix).count(),
            35,
            "written as a run"
        );
        drop(applied);
        let synced = tempfile::tempdir().unwrap();
        copy_dir(dir.path(), synced.path());

        dequeue(&mut committer, 5, 15); // a run holds them
        let deferred = key_of(&committer, 15);
        commit_group(
            &mut committer,
            [Tx {
                ops: vec![Op::Defer(QueueKey(deferred.clone()))],
                receipts: None,
            }],
        );
        commit_group(&mut committer, (40..60).map(submit));
        dequeue(&mut committer, 40, 45); // held, then gone
        assert!(
            !committer.applying.read().unwrap().held.0.is_empty(),
            "queue writes held at the cut"
        );
        crash(committer);

        // The cut: the write-ahead log as synced, the rest as at the checkpoint, with
        // garbage where the log's files were written past it.
        let cut = tempfile::tempdir().unwrap();
        copy_dir(synced.path(), cut.path());
        std::fs::remove_dir_all(cut.path().join("wal")).unwrap();
        copy_dir(&dir.path().join("wal"), &cut.path().join("wal"));
        for file in ["log/entries", "log/ends", "log/nodes"] {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(cut.path().join(file))
                .unwrap();
            let len = f.metadata().unwrap().len();
            f.write_all_at(&[0x5a; 61], len).unwrap();
        }

        let whole = SledStore::open(dir.path(), 16 << 20).unwrap();
        let rebuilt = SledStore::open(cut.path(), 16 << 20).unwrap();
        assert_eq!(
            rebuilt.replayed_groups(),
            4,
            "the groups after the checkpoint"
        );
        assert_eq!(contents(&rebuilt), contents(&whole));
        let queued: Vec<Vec<u8>> = (rebuilt.queue(&outbox, usize::MAX).unwrap().into_iter())
            .map(|(_, entry)| entry.message_id)
            .collect();
        let expected: Vec<Vec<u8>> = (16..40)
            .chain(45..60)
            .chain([15])
            .map(|i| id(i).as_bytes().to_vec())
            .collect();
        assert_eq!(queued, expected, "the deferred entry last");
        assert_eq!(rebuilt.log_size().unwrap(), 60);
        for i in 0..60 {
            assert_eq!(rebuilt.receipts(&id(i)).unwrap().len(), 1, "receipt of {i}");
        }
    }

    /// A receipt named twice in a transaction that also logs an entry naming its message:
    /// one record is kept, and it carries the entry, so the message's events find it, before
    /// and after a restart.
    #[tokio::test]
    async fn a_receipt_named_twice_beside_a_log_entry_keeps_one_record_with_the_entry() {
        let dir = tempfile::tempdir().unwrap();
        let id = MessageId::new_v7(60_000, [3; 10]);
        let receipt = pb::Receipt {
            body: vec![7; 40],
            signature: vec![8; 64],
        };
        let store = SledStore::open(dir.path(), 16 << 20).unwrap();
        let put = || Op::PutReceipt(id, receipt.clone());
        let ops = vec![
            log_naming(&id),
            put(),
            Op::Log(vec![1]),
            put(),
            log_naming(&id),
        ];
        store
            .commit(Tx {
                ops,
                receipts: None,
            })
            .await
            .unwrap();
        let check = |store: &SledStore| {
            assert_eq!(store.receipts(&id).unwrap(), vec![receipt.clone()]);
            assert_eq!(store.message_events(&id).unwrap(), vec![0, 2]);
        };
        check(&store);
        drop(store);
        check(&SledStore::open(dir.path(), 16 << 20).unwrap());
    }

    /// A store whose commit thread ended takes no more commits, and says so (health reads
    /// it), though nothing was poisoned.
    #[test]
    fn a_store_whose_commit_thread_ended_says_it_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), 16 << 20).unwrap();
        assert_eq!(store.stopped(), None);
        store.sender.lock().unwrap().take();
        let started = Instant::now();
        let why = loop {
            if let Some(why) = store.stopped() {
                break why;
            }
            assert!(started.elapsed() < Duration::from_secs(10), "still working");
            std::thread::sleep(Duration::from_millis(10));
        };
        assert!(why.contains("restart"), "{why}");
    }

    /// A deferral that only the write-ahead log holds at a crash comes back whole: the entry
    /// at the back under its new key, marked, and not under its old one.
    #[test]
    fn a_deferral_comes_back_from_a_write_ahead_log_replay() {
        let dir = tempfile::tempdir().unwrap();
        let (mut committer, _) = recover(dir.path(), 16 << 20).unwrap();
        let outbox = Queue::Outbox("kh".parse().unwrap());
        let ids: Vec<MessageId> = (0..3)
            .map(|i| MessageId::new_v7(9_000 + i, [4; 10]))
            .collect();
        let enqueue = |id: &MessageId| enqueue_message(&outbox, pb::Priority::Urgent, id);
        commit_group(&mut committer, ids.iter().map(enqueue));
        let first = keys_under(&committer, &queue_prefix(&outbox))[0].clone();
        let defer = Tx {
            ops: vec![Op::Defer(QueueKey(first))],
            receipts: None,
        };
        commit_group(&mut committer, [defer]);
        crash(committer);
        let store = SledStore::open(dir.path(), 16 << 20).unwrap();
        assert_eq!(store.replayed_groups(), 2, "the enqueues and the deferral");
        let order: Vec<_> = store
            .queue(&outbox, 10)
            .unwrap()
            .into_iter()
            .map(|(_, e)| (MessageId::from_slice(&e.message_id).unwrap(), e.deferred))
            .collect();
        assert_eq!(
            order,
            vec![(ids[1], false), (ids[2], false), (ids[0], true)]
        );
    }

    /// The outbox towards KH, and its keys' prefix.
    fn kh_outbox() -> (Queue, Vec<u8>) {
        let outbox = Queue::Outbox("kh".parse().unwrap());
        let prefix = queue_prefix(&outbox);
        (outbox, prefix)
    }

    /// Transactions that queue, at ROUTINE, message `base + i` (random part `[seed; 10]`)
    /// on `queue`.
    fn routine_to(queue: &Queue, base: u64, seed: u8) -> impl Fn(u64) -> Tx + Copy + '_ {
        move |i| {
            let id = MessageId::new_v7(base + i, [seed; 10]);
            enqueue_message(queue, pb::Priority::Routine, &id)
        }
    }

    /// A transaction that queues message `id` on `queue`.
    fn enqueue_message(queue: &Queue, priority: pb::Priority, id: &MessageId) -> Tx {
        Tx {
            ops: vec![Op::Enqueue(
                queue.clone(),
                priority,
                QueueEntry::message(id),
            )],
            receipts: None,
        }
    }

    /// Builds `txs` into one group and writes it, as the committer's loop does.
    fn commit_group(committer: &mut Committer, txs: impl IntoIterator<Item = Tx>) {
        let mut group = Group::default();
        for tx in txs {
            committer.build(tx, &mut group).unwrap();
        }
        committer.write(group);
        assert_eq!(committer.progress.poisoned(), None);
    }

    /// Hands the current segment to the checkpointer and waits until it is deleted, that
    /// is, until a run and the files beside it hold it durably.
    fn checkpoint_current_segment(committer: &mut Committer) {
        let seq = committer.segment.seq();
        committer.rotate();
        let started = Instant::now();
        while wal::segments(&committer.wal_dir)
            .unwrap()
            .iter()
            .any(|s| s.0 == seq)
        {
            assert!(started.elapsed() < Duration::from_secs(30), "no checkpoint");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The keys under `prefix` as readers see them.
    fn keys_under(committer: &Committer, prefix: &[u8]) -> Vec<Vec<u8>> {
        let applied = committer.applying.read().unwrap();
        let pairs = applied.scan(&committer.db, prefix, usize::MAX);
        pairs.unwrap().into_iter().map(|(k, _)| k).collect()
    }

    /// A crash: the committer stops without closing, and what is held is not written as a
    /// run.
    fn crash(committer: Committer) {
        let Committer {
            db,
            checkpoints,
            checkpointer,
            ..
        } = committer;
        drop(checkpoints);
        checkpointer.unwrap().join().unwrap();
        drop(db);
    }

    /// A power cut loses what the log's files were given after the last checkpoint synced
    /// them, and may leave garbage past that; replaying the write-ahead log writes it all
    /// again, byte for byte.
    #[test]
    fn files_cut_back_to_the_last_checkpoint_are_rebuilt_by_replay() {
        let dir = tempfile::tempdir().unwrap();
        let (mut committer, _) = recover(dir.path(), 16 << 20).unwrap();
        let message = |i: u8| {
            let id = MessageId::new_v7(5_000 + u64::from(i), [i; 10]);
            let stored = StoredMessage {
                head: MessageHead {
                    sender_org: format!("org-{i}"),
                    envelope_hash: vec![i; if i.is_multiple_of(3) { BESIDE_FROM } else { 32 }],
                    stored_at_ms: i64::from(i),
                    ..Default::default()
                },
                ..Default::default()
            };
            (id, stored)
        };
        let commit = |committer: &mut Committer, from: u8| {
            let txs = (from..from + 9).map(|i| {
                let (id, stored) = message(i);
                Tx {
                    ops: vec![
                        Op::InsertMessage(id, stored),
                        Op::Log(vec![i; 3 + usize::from(i) * 5]),
                    ],
                    receipts: None,
                }
            });
            commit_group(committer, txs);
        };
        commit(&mut committer, 0);
        checkpoint_current_segment(&mut committer);
        let synced = [
            "log/entries",
            "log/ends",
            "log/nodes",
            "messages/entries",
            "messages/ends",
        ]
        .map(|f| {
            let len = std::fs::metadata(dir.path().join(f)).unwrap().len();
            (f, len)
        });
        commit(&mut committer, 9);
        commit(&mut committer, 18);
        crash(committer);

        let cut = tempfile::tempdir().unwrap();
        copy_dir(dir.path(), cut.path());
        for (file, len) in synced {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(cut.path().join(file))
                .unwrap();
            f.set_len(len).unwrap();
            f.write_all_at(&[0xa5; 77], len).unwrap();
        }
        let whole = SledStore::open(dir.path(), 16 << 20).unwrap();
        let rebuilt = SledStore::open(cut.path(), 16 << 20).unwrap();
        assert!(rebuilt.replayed_groups() >= 2);
        assert_eq!(rebuilt.log_size().unwrap(), 27);
        assert_eq!(contents(&rebuilt), contents(&whole));
        for i in 0..27u8 {
            assert_eq!(
                rebuilt.log_entry(u64::from(i)).unwrap(),
                Some(vec![i; 3 + usize::from(i) * 5])
            );
            let (id, stored) = message(i);
            assert_eq!(rebuilt.message(&id).unwrap(), Some(stored), "message {i}");
        }
    }

    /// Event keys come back whole from the write-ahead log when no run got them: in
    /// one group, a transaction names a message in two entries around another message's,
    /// and a second transaction names it again.
    #[test]
    fn event_lists_are_replayed_from_the_write_ahead_log() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (
            MessageId::new_v7(1_000, [1; 10]),
            MessageId::new_v7(1_001, [2; 10]),
        );
        {
            let (mut committer, _) = recover(dir.path(), 16 << 20).unwrap();
            let mut group = Group::default();
            for ops in [
                vec![log_naming(&a), log_naming(&b), log_naming(&a)],
                vec![log_naming(&a)],
            ] {
                let tx = Tx {
                    ops,
                    receipts: None,
                };
                committer.build(tx, &mut group).unwrap();
            }
            // Logged, not applied: only a replay applies it.
            committer.log(group.writes).unwrap();
            assert!(keys_under(&committer, b"e").is_empty());
            crash(committer);
        }
        let store = SledStore::open(dir.path(), 16 << 20).unwrap();
        assert!(store.replayed_groups() > 0, "nothing replayed");
        assert_eq!(store.message_events(&a).unwrap(), vec![0, 2, 3]);
        assert_eq!(store.message_events(&b).unwrap(), vec![1]);
    }

    /// A transaction that stores a receipt of a message keeps its log entries naming that
    /// message in the receipt's record instead of an event key; a message it names without
    /// storing a receipt keeps its key. Both come back whole from the write-ahead log, in
    /// log order, and the receipt stored again is found in its record, not stored twice.
    #[tokio::test]
    async fn a_receipt_record_carries_its_transactions_log_entries() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (
            MessageId::new_v7(1_000, [1; 10]),
            MessageId::new_v7(1_001, [2; 10]),
        );
        let receipt = pb::Receipt {
            body: vec![1; 40],
            signature: vec![2; 64],
        };
        {
            let (mut committer, _) = recover(dir.path(), 16 << 20).unwrap();
            let mut group = Group::default();
            for ops in [
                vec![log_naming(&a)],
                vec![
                    log_naming(&a),
                    log_naming(&b),
                    Op::PutReceipt(a, receipt.clone()),
                    log_naming(&a),
                ],
            ] {
                let tx = Tx {
                    ops,
                    receipts: None,
                };
                committer.build(tx, &mut group).unwrap();
            }
            committer.log(group.writes).unwrap();
            crash(committer);
        }
        let store = SledStore::open(dir.path(), 16 << 20).unwrap();
        assert!(store.replayed_groups() > 0, "nothing replayed");
        assert_eq!(store.message_events(&a).unwrap(), vec![0, 1, 3]);
        assert_eq!(store.message_events(&b).unwrap(), vec![2]);
        // a's first transaction and b's: a's second is in the receipt's record.
        assert_eq!(stored_under(&store, b"e").len(), 2);
        assert_eq!(store.receipts(&a).unwrap(), vec![receipt.clone()]);

        let again = Tx {
            ops: vec![Op::PutReceipt(a, receipt.clone()), log_naming(&a)],
            receipts: None,
        };
        store.commit(again).await.unwrap();
        assert_eq!(store.receipts(&a).unwrap(), vec![receipt]);
        // Not stored again, so this transaction's entry takes an event key.
        assert_eq!(store.message_events(&a).unwrap(), vec![0, 1, 3, 4]);
        assert_eq!(stored_under(&store, b"e").len(), 3);
    }

    /// A receipt record that is cut short, carries part of an index, or carries indexes out
    /// of order is reported as damaged by every read of it.
    #[test]
    fn a_damaged_receipt_record_fails_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), 16 << 20).unwrap();
        read_sled_too(&store);
        let id = MessageId::new_v7(1_000, [4; 10]);
        let key = [receipt_prefix(&id), 1u64.to_be_bytes().to_vec()].concat();
        let receipt = pb::Receipt {
            body: vec![1; 40],
            signature: vec![2; 64],
        }
        .encode_to_vec();
        let record = |indexes: &[u64]| {
            let indexes = indexes
                .iter()
                .flat_map(|i| i.to_be_bytes())
                .collect::<Vec<_>>();
            receipt_record(&receipt, &indexes)
        };
        let whole = record(&[3, 5]);
        for (what, value, receipt_too) in [
            ("only the marker", vec![0u8], true),
            ("no indexes", record(&[]), true),
            ("cut in the receipt", whole[..20].to_vec(), true),
            ("part of an index", whole[..whole.len() - 3].to_vec(), true),
            ("indexes out of order", record(&[5, 3]), false),
            ("an index twice", record(&[3, 3]), false),
        ] {
            store.db.clear().unwrap();
            store.db.insert(&key, value).unwrap();
            match store.message_events(&id) {
                Err(StoreError::Corrupt(_)) => {}
                other => panic!("{what}: events read as {other:?}"),
            }
            if receipt_too {
                match store.receipts(&id) {
                    Err(StoreError::Corrupt(why)) => assert!(why.contains("receipt"), "{why}"),
                    other => panic!("{what}: receipts read as {other:?}"),
                }
            }
        }
        store.db.clear().unwrap();
        store.db.insert(&key, whole).unwrap();
        assert_eq!(store.message_events(&id).unwrap(), vec![3, 5]);
        assert_eq!(store.receipts(&id).unwrap().len(), 1);
    }

    /// A store restored without `messages/` while its write-ahead log still holds records
    /// is refused at open with what to do, not with a bare I/O error.
    #[test]
    fn a_store_restored_without_its_message_files_is_refused_saying_so() {
        let dir = tempfile::tempdir().unwrap();
        let (mut committer, _) = recover(dir.path(), 16 << 20).unwrap();
        let commit = |committer: &mut Committer, i: u64| {
            let stored = StoredMessage {
                head: MessageHead {
                    envelope_hash: vec![1; BESIDE_FROM + 1],
                    ..Default::default()
                },
                ..Default::default()
            };
            let id = MessageId::new_v7(3_000 + i, [0; 10]);
            let tx = Tx {
                ops: vec![Op::InsertMessage(id, stored)],
                receipts: None,
            };
            commit_group(committer, [tx]);
        };
        commit(&mut committer, 0);
        checkpoint_current_segment(&mut committer);
        commit(&mut committer, 1);
        crash(committer);
        std::fs::remove_dir_all(dir.path().join("messages")).unwrap();
        // Opened without its messages: refused.
        refused_as_damaged(dir.path(), "Restore the whole store");
    }

    /// Every message goes to `messages/`, small or large; both read back, through a reopen,
    /// and either's id is taken for good. Messages that a layout before 4 kept in sled
    /// (small ones, and before layout 1 large ones too) are still read, their ids taken.
    #[tokio::test]
    async fn messages_go_beside_the_runs_and_those_sled_holds_are_still_read() {
        let dir = tempfile::tempdir().unwrap();
        let stored = |body: usize| StoredMessage {
            envelope: Some(pb::Envelope {
                header: vec![1; 40].into(),
                ciphertext: vec![2; body].into(),
                signature: vec![3; 64].into(),
            }),
            head: MessageHead {
                recipient_org: "org".into(),
                ..Default::default()
            },
        };
        let (small, large) = (stored(1024), stored(BESIDE_FROM));
        let (small_id, large_id) = (
            MessageId::new_v7(7_000, [1; 10]),
            MessageId::new_v7(7_001, [2; 10]),
        );
        let insert = |id, msg: &StoredMessage| Tx {
            ops: vec![Op::InsertMessage(id, msg.clone())],
            receipts: None,
        };
        for reopened in [false, true] {
            let store = SledStore::open(dir.path(), 16 << 20).unwrap();
            if !reopened {
                for (id, msg) in [(small_id, &small), (large_id, &large)] {
                    let outcome = store.commit(insert(id, msg)).await.unwrap();
                    assert!(matches!(outcome, TxOutcome::Committed { .. }));
                }
            }
            assert_eq!(store.message(&small_id).unwrap(), Some(small.clone()));
            assert_eq!(store.message(&large_id).unwrap(), Some(large.clone()));
            // An id is taken whichever way its message went, and whatever the new one's size.
            for id in [small_id, large_id] {
                for msg in [&small, &large] {
                    assert_eq!(
                        store.commit(insert(id, msg)).await.unwrap(),
                        TxOutcome::Exists(id)
                    );
                }
            }
            let whole = store.whole_groups().unwrap();
            let holds = |key: Vec<u8>| whole.contains(&store.db, &key).unwrap();
            assert!(!holds(message_key(&small_id)));
            assert!(!holds(message_key(&large_id)));
            assert!(holds(message_number_key(&small_id)));
            assert_eq!(whole.read_meta(&store.db, META_MESSAGES).unwrap(), 2);
            assert!(
                whole.sled_holds_only_layout,
                "a store made at this layout: reads pass sled by"
            );
            drop(whole);
            assert_eq!(store.messages.get(0).unwrap(), small.encode_to_vec());
            assert_eq!(store.messages.get(1).unwrap(), large.encode_to_vec());
        }

        // Messages in sled, as layouts before 4 kept small ones and layouts before 1 large
        // ones: still read, and their ids still taken.
        let (earlier_small, earlier_big) = (
            MessageId::new_v7(6_000, [3; 10]),
            MessageId::new_v7(6_001, [4; 10]),
        );
        let big = stored(64 << 10);
        {
            let store = SledStore::open(dir.path(), 16 << 20).unwrap();
            for (id, msg) in [(earlier_small, &small), (earlier_big, &big)] {
                let encoded = msg.encode_to_vec();
                store.db.insert(message_key(&id), encoded).unwrap();
            }
        }
        let store = SledStore::open(dir.path(), 16 << 20).unwrap();
        assert!(!store.whole_groups().unwrap().sled_holds_only_layout);
        for (id, msg) in [(earlier_small, &small), (earlier_big, &big)] {
            assert_eq!(store.message(&id).unwrap().as_ref(), Some(msg));
            assert_eq!(
                store.commit(insert(id, msg)).await.unwrap(),
                TxOutcome::Exists(id)
            );
        }
    }

    /// Every open records the store's layout; a layout later than this binary's is
    /// refused, naming it, and the store is left as it was.
    #[test]
    fn a_store_of_a_later_layout_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = SledStore::open(dir.path(), 16 << 20).unwrap();
            assert_eq!(read_meta(&store.db, META_FORMAT).unwrap(), FORMAT);
            // As a later version would leave it.
            store
                .db
                .insert(META_FORMAT, (FORMAT + 1).to_be_bytes().as_slice())
                .unwrap();
        }
        match SledStore::open(dir.path(), 16 << 20) {
            Err(StoreError::Engine(why)) => {
                assert!(
                    why.contains(&format!("layout {}", FORMAT + 1))
                        && why.contains("later version"),
                    "{why}"
                )
            }
            other => panic!("a later layout was opened: {:?}", other.map(|_| ())),
        }
        // Still refused: the refusal did not rewrite the record.
        assert!(SledStore::open(dir.path(), 16 << 20).is_err());
    }

    /// Stores of layout 1 indexed outbox entries by message id. Such a store opens at this
    /// layout without those keys, whether sled held them or a logged group still to be
    /// replayed wrote them, with its outbox as it was, and with its inbox index kept.
    #[tokio::test]
    async fn a_store_of_layout_1_opens_without_its_outbox_index() {
        let dir = tempfile::tempdir().unwrap();
        let kh = Queue::Outbox("kh".parse().unwrap());
        let in_sled = MessageId::new_v7(1_000, [1; 10]);
        let in_wal = MessageId::new_v7(1_001, [2; 10]);
        let index = |id: &MessageId| [b"xo:kh\0".as_slice(), id.as_bytes()].concat();
        let in_inbox = MessageId::new_v7(1_002, [3; 10]);
        let inbox = Queue::Inbox(ahtd());
        {
            let (mut committer, _) = recover(dir.path(), 16 << 20).unwrap();
            let enqueue = |id| Tx {
                ops: vec![
                    Op::InsertMessage(id, StoredMessage::default()),
                    Op::Enqueue(kh.clone(), pb::Priority::Routine, QueueEntry::message(&id)),
                ],
                receipts: None,
            };
            let for_ahtd = Tx {
                ops: vec![
                    Op::InsertMessage(in_inbox, StoredMessage::default()),
                    Op::Enqueue(
                        inbox.clone(),
                        pb::Priority::Routine,
                        QueueEntry::message(&in_inbox),
                    ),
                ],
                receipts: None,
            };
            commit_group(
                &mut committer,
                [enqueue(in_sled), enqueue(in_wal), for_ahtd],
            );
            let db = committer.db.clone();
            let keys = keys_under(&committer, &queue_prefix(&kh));
            assert_eq!(keys.len(), 2);
            assert!(
                keys_under(&committer, b"xo").is_empty(),
                "an outbox entry indexed"
            );
            assert_eq!(
                keys_under(&committer, b"xi").len(),
                1,
                "the inbox entry not indexed"
            );
            // As a binary of layout 1 leaves them.
            db.insert(index(&in_sled), keys[0].as_slice()).unwrap();
            db.insert(META_FORMAT, 1u64.to_be_bytes().as_slice())
                .unwrap();
            db.flush().unwrap();
            let unapplied = WalGroup {
                writes: vec![WalWrite {
                    key: index(&in_wal),
                    value: Some(keys[1].clone()),
                    written_first: None,
                }],
            };
            committer.segment.append(&unapplied).unwrap();
            crash(committer);
        }
        let store = SledStore::open(dir.path(), 16 << 20).unwrap();
        assert!(store.replayed_groups() > 0, "nothing replayed");
        assert_eq!(store.db.scan_prefix(b"xo").count(), 0, "index keys left");
        assert!(
            stored_under(&store, b"xo").is_empty(),
            "a replayed index key of layout 1 reached the held writes or a run"
        );
        assert_eq!(read_meta(&store.db, META_FORMAT).unwrap(), FORMAT);
        let queued: Vec<Vec<u8>> = store
            .queue(&kh, 10)
            .unwrap()
            .into_iter()
            .map(|(_, e)| e.message_id)
            .collect();
        assert_eq!(
            queued,
            [in_sled, in_wal].map(|id| id.as_bytes().to_vec()).to_vec()
        );
        let remove = Tx {
            ops: vec![Op::RemoveFromInbox(ahtd(), in_inbox)],
            receipts: None,
        };
        store.commit(remove).await.unwrap();
        assert!(
            store.queue(&inbox, 10).unwrap().is_empty(),
            "inbox index lost"
        );
    }

    /// An event index whose key or value is not whole indexes, or whose value does not
    /// ascend from its key, is reported as damaged, not read as some other entry.
    #[test]
    fn a_damaged_event_index_fails_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), 16 << 20).unwrap();
        read_sled_too(&store);
        let id = MessageId::new_v7(1_000, [4; 10]);
        let key = event_key(&id, 7);
        let out_of_order = [9u64, 8].map(u64::to_be_bytes).concat();
        for (key, value) in [
            (key.clone(), vec![0u8; 12]),
            (key[..key.len() - 1].to_vec(), vec![]),
            (key.clone(), out_of_order),
            (key.clone(), 7u64.to_be_bytes().to_vec()),
        ] {
            store.db.clear().unwrap();
            store.db.insert(key, value).unwrap();
            match store.message_events(&id) {
                Err(StoreError::Corrupt(what)) => assert!(what.contains("event index"), "{what}"),
                other => panic!("a damaged event index read as {other:?}"),
            }
        }
        store.db.clear().unwrap();
        let later = [9u64, 12].map(u64::to_be_bytes).concat();
        store.db.insert(key, later).unwrap();
        assert_eq!(store.message_events(&id).unwrap(), vec![7, 9, 12]);
    }

    /// A message over the store's limit is refused before it reaches the write-ahead log,
    /// and the store goes on.
    #[test]
    fn a_message_over_the_limit_is_refused_at_commit() {
        let dir = tempfile::tempdir().unwrap();
        let (mut committer, _) = recover(dir.path(), 16 << 20).unwrap();
        committer.max_message = 64 << 10;
        let message = |body: usize| StoredMessage {
            head: MessageHead {
                envelope_hash: vec![7; body],
                ..Default::default()
            },
            ..Default::default()
        };
        let insert = |i: u64, body| Tx {
            ops: vec![Op::InsertMessage(
                MessageId::new_v7(8_000 + i, [0; 10]),
                message(body),
            )],
            receipts: None,
        };
        let mut group = Group::default();
        match committer.build(insert(0, 64 << 10), &mut group) {
            Err(StoreError::Engine(why)) => assert!(why.contains("over the store's"), "{why}"),
            other => panic!("an oversize message was taken: {other:?}"),
        }
        assert!(group.writes.is_empty());
        committer.build(insert(1, 60 << 10), &mut group).unwrap();
        committer.write(group);
        assert_eq!(committer.progress.poisoned(), None);
        assert_eq!(committer.next_message, 1);
        let applied = committer.applying.read().unwrap();
        assert_eq!(applied.read_meta(&committer.db, META_MESSAGES).unwrap(), 1);
        drop(applied);
        crash(committer);
    }

    /// A head leaves a long record's envelope unread: it costs a few dozen bytes of reads
    /// where the whole message costs all of them, and it reads even where the envelope
    /// is damaged (which only the whole read notices).
    #[tokio::test]
    async fn a_head_leaves_the_envelope_of_a_long_record_unread() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), 16 << 20).unwrap();
        let (id, mut stored) = body_of(1, 100_000);
        stored.head.sender_org = "spiffe://vn.accord/org/c02".into();
        stored.head.no_attachments = true;
        let record_len = stored.encoded_len() as u64;
        let insert = Tx {
            ops: vec![Op::InsertMessage(id, stored.clone())],
            receipts: None,
        };
        store.commit(insert).await.unwrap();
        let read = || store.messages.bytes_read.load(Ordering::Relaxed);

        let before = read();
        assert_eq!(
            store.message_head(&id).unwrap().as_ref(),
            Some(&stored.head)
        );
        let for_head = read() - before;
        assert!(for_head < 100, "{for_head} bytes read for a head");
        assert_eq!(store.message(&id).unwrap().as_ref(), Some(&stored));
        assert_eq!(read() - before - for_head, record_len);

        // The envelope's first inner key given a wire type no field has.
        let len = stored.envelope.as_ref().unwrap().encoded_len();
        let inner = 1 + prost::length_delimiter_len(len) as u64;
        store.messages.entries.write_all_at(&[0x0f], inner).unwrap();
        assert!(matches!(store.message(&id), Err(StoreError::Corrupt(_))));
        assert_eq!(
            store.message_head(&id).unwrap().as_ref(),
            Some(&stored.head)
        );
    }

    /// Message files cut short are refused at open, naming them; a number sled holds past
    /// the files' count, or a record that does not decode, fail the read, not answer.
    #[tokio::test]
    async fn damaged_message_files_and_numbers_fail_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), 16 << 20).unwrap();
        read_sled_too(&store);
        let ids: Vec<_> = (0..5u8)
            .map(|i| MessageId::new_v7(9_000 + u64::from(i), [i; 10]))
            .collect();
        let mut record_len = 0;
        for (i, id) in ids.iter().enumerate() {
            let stored = StoredMessage {
                head: MessageHead {
                    envelope_hash: vec![i as u8; BESIDE_FROM],
                    ..Default::default()
                },
                ..Default::default()
            };
            record_len = stored.encoded_len() as u64;
            let tx = Tx {
                ops: vec![Op::InsertMessage(*id, stored)],
                receipts: None,
            };
            store.commit(tx).await.unwrap();
        }
        assert!(store.message(&ids[4]).unwrap().is_some());
        // Record 5 on file but past the count, as a crash before its group was logged
        // leaves it: sled naming it is damage, not a message.
        let leftover = StoredMessage {
            head: MessageHead {
                sender_org: "a message never committed".into(),
                ..Default::default()
            },
            ..Default::default()
        }
        .encode_to_vec();
        store.messages.write(&[(5, leftover.as_slice())]).unwrap();
        let stray = MessageId::new_v7(9_999, [9; 10]);
        store
            .db
            .insert(message_number_key(&stray), 5u64.to_be_bytes().as_slice())
            .unwrap();
        let corrupt = |id| {
            let (whole, head) = (store.message(id), store.message_head(id));
            assert!(matches!(whole, Err(StoreError::Corrupt(_))), "{whole:?}");
            assert!(matches!(head, Err(StoreError::Corrupt(_))), "{head:?}");
        };
        corrupt(&stray);
        store
            .db
            .insert(message_number_key(&stray), [0u8; 3].as_slice())
            .unwrap();
        corrupt(&stray);
        store.db.remove(message_number_key(&stray)).unwrap();
        // Record 2 overwritten with bytes that are no message.
        store
            .messages
            .entries
            .write_all_at(&[0xff; 34], 2 * record_len)
            .unwrap();
        corrupt(&ids[2]);
        // Record 3 made to start with an envelope longer than the whole record (its
        // length's varint, 2 bytes, needs a record over the read-whole size), and record
        // 1 with a length cut short: a head is not read from past either's end.
        assert!(record_len > Records::WHOLE_UP_TO);
        use crate::store::ENVELOPE_KEY;
        let past_the_end = [
            ENVELOPE_KEY,
            0x80 | (BESIDE_FROM as u8 & 0x7f),
            1 + (BESIDE_FROM >> 7) as u8,
        ];
        store
            .messages
            .entries
            .write_all_at(&past_the_end, 3 * record_len)
            .unwrap();
        corrupt(&ids[3]);
        store
            .messages
            .entries
            .write_all_at(
                &[ENVELOPE_KEY; 1]
                    .iter()
                    .chain(&[0x80; 10])
                    .copied()
                    .collect::<Vec<_>>(),
                record_len,
            )
            .unwrap();
        corrupt(&ids[1]);
        // The others still read, whole and by their heads.
        for id in [ids[0], ids[4]] {
            let head = store.message_head(&id).unwrap().unwrap();
            assert_eq!(Some(head), store.message(&id).unwrap().map(|m| m.head));
        }
        drop(store);

        for file in ["ends", "entries"] {
            let copy = tempfile::tempdir().unwrap();
            copy_dir(dir.path(), copy.path());
            let path = copy.path().join("messages").join(file);
            let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
            f.set_len(8).unwrap();
            refused_as_damaged(copy.path(), "message files");
        }
    }

    /// Transactions in one group see each other's writes before any is applied: a
    /// duplicate insert, a removal of a message queued earlier in the group, a receipt
    /// stored twice, and the log tree across them.
    #[test]
    fn transactions_of_one_group_see_the_writes_before_them() {
        let dir = tempfile::tempdir().unwrap();
        let (mut committer, _) = recover(dir.path(), 16 << 20).unwrap();
        let queue = Queue::Inbox(ahtd());
        let id = MessageId::new_v7(1_000, [7; 10]);
        let receipt = pb::Receipt {
            body: vec![1; 40],
            signature: vec![2; 64],
        };
        let insert = || Tx {
            ops: vec![
                Op::InsertMessage(id, StoredMessage::default()),
                Op::Enqueue(
                    queue.clone(),
                    pb::Priority::Routine,
                    QueueEntry::message(&id),
                ),
                Op::Log(vec![1]),
                Op::PutReceipt(id, receipt.clone()),
            ],
            receipts: None,
        };
        let mut group = Group::default();
        let first = committer.build(insert(), &mut group).unwrap();
        assert_eq!(
            first,
            TxOutcome::Committed {
                first_log_index: Some(0)
            }
        );
        assert_eq!(
            committer.build(insert(), &mut group).unwrap(),
            TxOutcome::Exists(id)
        );
        let later = Tx {
            ops: vec![
                Op::RemoveFromInbox(ahtd(), id),
                Op::PutReceipt(id, receipt.clone()),
                Op::Log(vec![2]),
                Op::Log(vec![3]),
            ],
            receipts: None,
        };
        committer.build(later, &mut group).unwrap();
        committer.write(group);
        assert_eq!(committer.progress.poisoned(), None);

        assert_eq!(
            keys_under(&committer, &queue_prefix(&queue)).len(),
            0,
            "still queued"
        );
        assert!(keys_under(&committer, &inbox_index_key(&ahtd(), id.as_bytes())).is_empty());
        let (db, applied) = (&committer.db, committer.applying.read().unwrap());
        assert!(applied.get(db, &message_number_key(&id)).unwrap().is_some());
        let receipts = applied.scan(db, &receipt_prefix(&id), usize::MAX).unwrap();
        assert_eq!(receipts.len(), 1, "receipt twice");
        assert_eq!(applied.read_meta(db, META_LOG).unwrap(), 3);
        drop(applied);
        let mut tree = merkle::MemoryTree::new();
        for entry in [[1u8], [2], [3]] {
            tree.push(log::leaf_hash(&entry));
        }
        let stored = merkle::root(&*committer.log, 3).unwrap();
        assert_eq!(stored, merkle::root(&tree, 3).unwrap());
    }

    /// A store of the earlier layout, with the log's entries and tree nodes in sled, opens
    /// with them moved to the log's files; so does one that crashed after writing the files
    /// but before removing them from sled.
    #[tokio::test]
    async fn a_log_kept_in_sled_moves_to_its_files_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), 16 << 20).unwrap();
        for i in 0..40u8 {
            let tx = Tx {
                ops: vec![Op::Log(vec![i; 10 + usize::from(i)])],
                receipts: None,
            };
            store.commit(tx).await.unwrap();
        }
        let expected = contents(&store);
        let size = store.log_size().unwrap();
        let mut earlier_layout = Vec::new();
        for index in 0..size {
            let entry = store.log_entry(index).unwrap().unwrap();
            earlier_layout.push((log_key(index).to_vec(), entry));
        }
        for level in 0..8 {
            for index in (0..).take_while(|i| log_files::node_exists(level, *i, size)) {
                let node = store.log_node(level, index).unwrap().unwrap();
                earlier_layout.push((node_key(level, index).to_vec(), node.to_vec()));
            }
        }
        assert_eq!(
            earlier_layout.len(),
            40 + 2 * 40 - 2,
            "40 entries, 2n − popcount(n) nodes"
        );
        drop(store);

        for files_written in [true, false] {
            {
                // Straight into sled, past the log; the close's checkpoint flushes them.
                // (Opening sled alone here raced its I/O threads for the lock at reopen.)
                let store = SledStore::open(dir.path(), 16 << 20).unwrap();
                // Such stores kept everything in sled, and recorded no layout.
                for (key, value) in stored_under(&store, b"") {
                    store.db.insert(key, value).unwrap();
                }
                for (key, value) in &earlier_layout {
                    store.db.insert(key, value.as_slice()).unwrap();
                }
                store.db.remove(META_FORMAT).unwrap();
            }
            std::fs::remove_dir_all(dir.path().join("runs")).unwrap();
            std::fs::remove_file(dir.path().join("runs.last")).unwrap();
            if !files_written {
                std::fs::remove_dir_all(dir.path().join("log")).unwrap();
            }
            let store = SledStore::open(dir.path(), 16 << 20).unwrap();
            assert!(
                contents(&store) == expected,
                "files written: {files_written}"
            );
            assert!(store.db.scan_prefix(b"l").next().is_none());
            assert!(store.db.scan_prefix(b"n").next().is_none());
            assert_eq!(read_meta(&store.db, META_FORMAT).unwrap(), FORMAT);
            assert_eq!(read_meta(&store.db, META_UPGRADING).unwrap(), 0);
        }
    }

    /// An open that upgrades records its layout with a mark and removes the mark once sled
    /// is durable after its last migration. An open that finds the mark (the last one
    /// stopped in between) takes the upgrading path again, which removes it.
    #[tokio::test]
    async fn an_open_that_stopped_after_recording_the_layout_finishes_the_upgrade() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = SledStore::open(dir.path(), 16 << 20).unwrap();
            assert_eq!(read_meta(&store.db, META_FORMAT).unwrap(), FORMAT);
            assert_eq!(
                read_meta(&store.db, META_UPGRADING).unwrap(),
                0,
                "new store"
            );
            let tx = Tx {
                ops: vec![Op::Log(vec![7; 20])],
                receipts: None,
            };
            store.commit(tx).await.unwrap();
            // As an open that stopped between recording the layout and the end leaves it.
            let mark = 1u64.to_be_bytes();
            store.db.insert(META_UPGRADING, mark.as_slice()).unwrap();
        }
        let store = SledStore::open(dir.path(), 16 << 20).unwrap();
        assert_eq!(store.replayed_groups(), 0, "a clean close otherwise");
        assert_eq!(read_meta(&store.db, META_UPGRADING).unwrap(), 0);
        assert_eq!(store.log_size().unwrap(), 1);
    }

    /// Log reads with indexes from outside (audit requests) past the log or past `u64`
    /// answer "none"; reads from damaged log files fail with an error, not a wrong answer.
    #[tokio::test]
    async fn log_reads_out_of_range_or_from_damaged_files_fail_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), 16 << 20).unwrap();
        for i in 0..5u8 {
            let tx = Tx {
                ops: vec![Op::Log(vec![i; 20])],
                receipts: None,
            };
            store.commit(tx).await.unwrap();
        }
        assert!(store.log_entry(4).unwrap().is_some());
        assert!(store.log_node(2, 0).unwrap().is_some());
        for (level, index) in [
            (0, 5),
            (1, 2),
            (2, 1),
            (3, 0),
            (64, 0),
            (200, 1),
            (0, u64::MAX),
        ] {
            assert_eq!(
                store.log_node(level, index).unwrap(),
                None,
                "({level}, {index})"
            );
        }
        assert_eq!(store.log_entry(5).unwrap(), None);
        assert_eq!(store.log_entry(u64::MAX).unwrap(), None);
        // An entry over the limit is refused before it reaches the write-ahead log, and
        // the store goes on.
        let oversize = Tx {
            ops: vec![Op::Log(vec![0; log_files::MAX_ENTRY as usize + 1])],
            receipts: None,
        };
        assert!(matches!(
            store.commit(oversize).await,
            Err(StoreError::Engine(_))
        ));
        assert_eq!(store.log_size().unwrap(), 5);
        drop(store);

        let damaged_copy = |file: &str, damage: &dyn Fn(&File)| {
            let copy = tempfile::tempdir().unwrap();
            copy_dir(dir.path(), copy.path());
            let path = copy.path().join("log").join(file);
            damage(&std::fs::OpenOptions::new().write(true).open(path).unwrap());
            copy
        };
        // Files cut short (a restore without them, a lost write) are refused at open.
        for file in ["ends", "nodes", "entries"] {
            let copy = damaged_copy(file, &|f| f.set_len(8).unwrap());
            refused_as_damaged(copy.path(), file);
        }
        let copy = tempfile::tempdir().unwrap();
        copy_dir(dir.path(), copy.path());
        std::fs::remove_dir_all(copy.path().join("log")).unwrap();
        assert!(matches!(
            SledStore::open(copy.path(), 16 << 20),
            Err(StoreError::Corrupt(_))
        ));

        // A changed byte in an entry fails its leaf hash; an `ends` value out of order
        // fails the entries it bounds. The rest reads as before.
        let copy = damaged_copy("entries", &|f| f.write_all_at(&[0xff], 2 * 20 + 3).unwrap());
        let store = SledStore::open(copy.path(), 16 << 20).unwrap();
        assert!(matches!(store.log_entry(2), Err(StoreError::Corrupt(_))));
        assert_eq!(store.log_entry(3).unwrap(), Some(vec![3; 20]));
        drop(store);
        let copy = damaged_copy("ends", &|f| {
            f.write_all_at(&90u64.to_be_bytes(), 8).unwrap()
        });
        let store = SledStore::open(copy.path(), 16 << 20).unwrap();
        assert!(matches!(store.log_entry(1), Err(StoreError::Corrupt(_))));
        assert!(matches!(store.log_entry(2), Err(StoreError::Corrupt(_))));
        assert_eq!(store.log_entry(0).unwrap(), Some(vec![0; 20]));
    }

    /// Opens the store in `dir`, which must be refused as damaged, saying `says`.
    #[track_caller]
    fn refused_as_damaged(dir: &Path, says: &str) {
        match SledStore::open(dir, 16 << 20) {
            Err(StoreError::Corrupt(why)) => assert!(why.contains(says), "{why}"),
            Err(other) => panic!("refused, but not as damage: {other}"),
            Ok(store) => panic!(
                "opened at log size {:?}; expected a refusal saying {says:?}",
                store.log_size()
            ),
        }
    }

    /// Lets reads see what a test writes straight into sled, as they do in a store made
    /// before layout 4.
    fn read_sled_too(store: &SledStore) {
        store.applying.write().unwrap().sled_holds_only_layout = false;
    }

    /// The keys and values under `prefix` as readers see them.
    fn stored_under(store: &SledStore, prefix: &[u8]) -> Vec<KeyValue> {
        let whole = store.whole_groups().unwrap();
        whole.scan(&store.db, prefix, usize::MAX).unwrap()
    }

    /// Every key and value readers see, then every log entry and the log's root, to compare
    /// two stores.
    fn contents(store: &SledStore) -> Vec<(Vec<u8>, Vec<u8>)> {
        // As every reader does: an answered commit's group may still be being applied. The
        // layout is sled's alone, and a store of an earlier layout reads sled under its keys.
        let mut contents = stored_under(store, b"");
        contents.retain(|(k, _)| k != META_FORMAT);
        let numbers: Vec<u64> = contents
            .iter()
            .filter(|(k, _)| k.first() == Some(&b'v'))
            .map(|(_, v)| u64::from_be_bytes(v.as_slice().try_into().unwrap()))
            .collect();
        for number in numbers {
            let record = store.messages.get(number).unwrap();
            contents.push((message_record_key(number).to_vec(), record));
        }
        let size = store.log_size().unwrap();
        for index in 0..size {
            let entry = store.log_entry(index).unwrap().unwrap();
            contents.push((log_key(index).to_vec(), entry));
        }
        let root = merkle::root(&*store.log, size).unwrap();
        contents.push((b"root".to_vec(), root.to_vec()));
        contents
    }

    fn copy_dir(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            if entry.file_type().unwrap().is_dir() {
                copy_dir(&entry.path(), &to.join(entry.file_name()));
            } else {
                // A live store removes files as it goes: the spare the committer renames into
                // a segment, segments a checkpoint deleted, blobs sled rewrote. What a copy
                // taken now would not hold either.
                match std::fs::copy(entry.path(), to.join(entry.file_name())) {
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    copied => drop(copied.unwrap()),
                }
            }
        }
    }

    const CRASH_CHILD: &str = "ACCORD_STORE_CRASH_CHILD";

    /// The child's side of the kill test: eight writers commit messages (every second one
    /// then removed from its queue) and print each acknowledgement, until killed.
    fn commit_until_killed(dir: &Path) -> ! {
        use std::io::Write as _;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .unwrap();
        runtime.block_on(async {
            let store = Arc::new(SledStore::open(dir, 16 << 20).unwrap());
            let queue = Queue::Inbox(ahtd());
            for w in 0..8u16 {
                let (store, queue) = (store.clone(), queue.clone());
                tokio::spawn(async move {
                    for i in 0u64.. {
                        let mut random = [0u8; 10];
                        random[..2].copy_from_slice(&w.to_be_bytes());
                        random[2..].copy_from_slice(&i.to_be_bytes());
                        let id = MessageId::new_v7(1_000 + i, random);
                        let body = if i % 16 == 0 { 96 << 10 } else { 1 << 10 };
                        let entry = pb::LogEntry {
                            message_id: id.as_bytes().to_vec(),
                            ..Default::default()
                        };
                        let tx = Tx {
                            ops: vec![
                                Op::InsertMessage(
                                    id,
                                    StoredMessage {
                                        envelope: Some(pb::Envelope {
                                            header: vec![1; 100].into(),
                                            ciphertext: vec![w as u8; body].into(),
                                            signature: vec![3; 64].into(),
                                        }),
                                        ..Default::default()
                                    },
                                ),
                                Op::Enqueue(
                                    queue.clone(),
                                    pb::Priority::Routine,
                                    QueueEntry::message(&id),
                                ),
                                Op::Log(entry.encode_to_vec()),
                            ],
                            receipts: receipt_naming_index(id),
                        };
                        store.commit(tx).await.unwrap();
                        println!("acked {id}");
                        if i % 2 == 1 {
                            let remove = Tx {
                                ops: vec![Op::RemoveFromInbox(ahtd(), id)],
                                receipts: None,
                            };
                            store.commit(remove).await.unwrap();
                            println!("removed {id}");
                        }
                        std::io::stdout().flush().unwrap();
                    }
                });
            }
            std::future::pending::<()>().await;
        });
        unreachable!("the child runs until it is killed")
    }

    /// A process killed with SIGKILL mid-commit loses what it held in memory; reopening
    /// replays the write-ahead log and holds exactly every acknowledged commit: messages,
    /// receipts naming their log index, queue removals, and a log tree that matches its
    /// entries. Replaying over a run that a crashed open wrote half way into the replay, and a torn last
    /// record, give the same store; a damaged record refuses to open.
    #[test]
    fn a_store_killed_mid_commit_reopens_with_every_acknowledged_commit() {
        if let Some(dir) = std::env::var_os(CRASH_CHILD) {
            commit_until_killed(Path::new(&dir));
        }
        use std::io::BufRead as _;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("killed");
        let name = concat!(
            module_path!(),
            "::",
            "a_store_killed_mid_commit_reopens_with_every_acknowledged_commit"
        );
        let name = name.split_once("::").unwrap().1;
        let mut child = KillOnDrop(
            std::process::Command::new(std::env::current_exe().unwrap())
                .args([name, "--exact", "--nocapture", "--test-threads=1"])
                .env(CRASH_CHILD, &dir)
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap(),
        );
        let mut lines = std::io::BufReader::new(child.0.stdout.take().unwrap()).lines();
        let (mut acked, mut removed) = (Vec::new(), HashSet::new());
        let started = Instant::now();
        // Past two checkpoints, with commits after the last that only the log holds.
        while acked.len() < 1500 || started.elapsed() < Duration::from_millis(2500) {
            let line = lines.next().expect("the child stopped early").unwrap();
            record(&line, &mut acked, &mut removed);
        }
        child.0.kill().unwrap();
        child.0.wait().unwrap();
        // Lines written before the kill were acknowledged too.
        for line in lines {
            record(&line.unwrap(), &mut acked, &mut removed);
        }
        let segments = wal::segments(&dir.join("wal")).unwrap();
        assert!(
            segments[0].0 > 1,
            "no checkpoint deleted a segment: {segments:?}"
        );

        let half_replayed = tmp.path().join("half-replayed");
        let torn = tmp.path().join("torn");
        let damaged = tmp.path().join("damaged");
        for copy in [&half_replayed, &torn, &damaged] {
            copy_dir(&dir, copy);
        }

        let store = SledStore::open(&dir, 16 << 20).unwrap();
        assert!(
            store.replayed_groups() > 0,
            "the kill left nothing to replay"
        );
        let queued: HashSet<Vec<u8>> = store
            .queue(&Queue::Inbox(ahtd()), usize::MAX)
            .unwrap()
            .into_iter()
            .map(|(_, e)| e.message_id)
            .collect();
        for id in &acked {
            assert!(store.message(id).unwrap().is_some(), "{id} lost");
            let receipts = store.receipts(id).unwrap();
            assert_eq!(receipts.len(), 1, "{id}");
            let index = u64::from_be_bytes(receipts[0].body.as_slice().try_into().unwrap());
            assert_eq!(store.message_events(id).unwrap(), vec![index], "{id}");
            let entry = pb::LogEntry::decode(store.log_entry(index).unwrap().unwrap().as_slice());
            assert_eq!(
                entry.unwrap().message_id,
                id.as_bytes(),
                "log entry {index}"
            );
            if removed.contains(id) {
                assert!(
                    !queued.contains(id.as_bytes().as_slice()),
                    "{id} back in its queue"
                );
            } else if acked_parity(id) == 0 {
                assert!(
                    queued.contains(id.as_bytes().as_slice()),
                    "{id} left its queue"
                );
            }
        }
        let size = store.log_size().unwrap();
        assert!(size >= acked.len() as u64);
        assert_eq!(
            store.log_entry(size).unwrap(),
            None,
            "an entry past the log's size"
        );
        let highest_seq = contents(&store)
            .into_iter()
            .map(|(k, _)| k)
            .filter(|k| (k[0] == b'r' || k[0] == b'q') && k != b"root")
            .map(|k| u64::from_be_bytes(k[k.len() - 8..].try_into().unwrap()))
            .max()
            .unwrap();
        let next_seq = store.whole_groups().unwrap().read_meta(&store.db, META_SEQ);
        assert!(next_seq.unwrap() > highest_seq);
        let mut tree = merkle::MemoryTree::new();
        for index in 0..size {
            tree.push(log::leaf_hash(&store.log_entry(index).unwrap().unwrap()));
        }
        let stored_root = merkle::root(&*store.log, size).unwrap();
        assert_eq!(stored_root, merkle::root(&tree, size).unwrap());
        let expected = contents(&store);
        drop(store);

        // A crash during the open's checkpoint of a replay: a run holds the first half of
        // the log's records and part of the next one's writes, as do the log's files, and
        // the segments are all still there.
        {
            // No flusher thread to hold the lock after the drop.
            let db = open_sled(&half_replayed, 16 << 20).unwrap();
            let mut runs = RunSet::open(&half_replayed.join("runs"), false).unwrap();
            let mut replayed = Applied {
                runs: runs.runs(),
                ..Applied::default()
            };
            let log = LogFiles::open(&half_replayed.join("log")).unwrap();
            let messages = Records::open(&half_replayed.join("messages"), MAX_MESSAGE).unwrap();
            let segments = wal::segments(&half_replayed.join("wal")).unwrap();
            let groups: Vec<_> = segments
                .iter()
                .enumerate()
                .flat_map(|(i, s)| {
                    wal::read_segment(&s.1, i + 1 == segments.len())
                        .unwrap()
                        .groups
                })
                .collect();
            let half = groups.len() / 2;
            for group in &groups[..half] {
                apply(&db, &log, &messages, group, &mut replayed, Replay::Yes).unwrap();
            }
            let cut_short = &groups[half];
            let part = WalGroup {
                writes: cut_short.writes[..cut_short.writes.len() / 2].to_vec(),
            };
            assert!(!part.writes.is_empty());
            apply(&db, &log, &messages, &part, &mut replayed, Replay::Yes).unwrap();
            let held = replayed.held.0.iter();
            let entries = held.map(|(key, held)| Ok((key, held.value())));
            runs.add(runs.last_checkpoint() + 1, entries).unwrap();
            log.sync().unwrap();
        }
        let store = SledStore::open(&half_replayed, 16 << 20).unwrap();
        assert!(
            contents(&store) == expected,
            "replaying twice changed the store"
        );
        drop(store);

        // A torn record after the last acknowledged one is dropped.
        let last = wal::segments(&torn.join("wal")).unwrap().pop().unwrap().1;
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&last)
            .unwrap();
        std::io::Write::write_all(&mut file, &[200, 0, 0, 0, 1, 2, 3, 4, 5, 6]).unwrap();
        drop(file);
        let store = SledStore::open(&torn, 16 << 20).unwrap();
        assert!(
            contents(&store) == expected,
            "a torn record changed the store"
        );
        drop(store);

        // A flipped byte in a record with acknowledged records after it.
        // The kill may have torn the last segment's tail: read it as the last one.
        let segments = wal::segments(&damaged.join("wal")).unwrap();
        let last = segments.len() - 1;
        let (_, path, _) = segments
            .into_iter()
            .enumerate()
            .find(|(i, s)| wal::read_segment(&s.1, *i == last).is_ok_and(|c| c.groups.len() >= 2))
            .map(|(_, s)| s)
            .expect("a segment with two records");
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[wal::HEADER + 3] ^= 0x01;
        std::fs::write(&path, bytes).unwrap();
        let err = SledStore::open(&damaged, 16 << 20).unwrap_err();
        assert!(err.to_string().contains("damaged"), "{err}");
    }

    /// The child process, killed if the test fails before it does.
    struct KillOnDrop(std::process::Child);

    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn record(line: &str, acked: &mut Vec<MessageId>, removed: &mut HashSet<MessageId>) {
        let parse = |s: &str| s.parse::<MessageId>().unwrap();
        if let Some(id) = line.strip_prefix("acked ") {
            acked.push(parse(id));
        } else if let Some(id) = line.strip_prefix("removed ") {
            removed.insert(parse(id));
        }
    }

    /// Whether the writer removes this message after it (odd sequence numbers).
    fn acked_parity(id: &MessageId) -> u8 {
        id.as_bytes()[15] % 2
    }
}
