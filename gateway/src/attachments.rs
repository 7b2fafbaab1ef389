//! Attachment chunks on disk, beside the store.
//!
//! One directory per envelope hash under `<data_dir>/attachments/`:
//! - `meta`: who sent it to whom, until when, its message id and the header's digests
//!   ([`Staged`]), written when the first upload of the envelope starts;
//! - `list-<a>`: attachment `a`'s chunk hash list (32 bytes per chunk), written once it has
//!   been checked against the signed header's root;
//! - `<a>-<i>`: chunk `i` of attachment `a`, the ciphertext as the sender sealed it.
//!
//! Nothing reaches a final name unchecked: a chunk is written only after its length and hash
//! match the list, to a temporary name, synced, then renamed; the directory is synced before
//! an upload is answered. So a held chunk is a verified chunk, and what an upload reports as
//! held survives a power cut. Chunks leave with their message (delivered, forwarded, expired)
//! or, for uploads never submitted, once the envelope expires ([`ChunkStore::sweep`]).
//!
//! Methods block (file I/O and fsync): async callers run them on the blocking pool.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use accord_proto::attachment::{self, AttachmentError};
use accord_proto::envelope::VerifiedEnvelope;
use accord_proto::ids::EnvelopeHash;
use accord_proto::pb;
use prost::Message;

/// Why a chunk operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChunkError {
    /// The caller's bytes or hash list do not match the signed header: the caller's fault.
    #[error(transparent)]
    Refused(#[from] AttachmentError),
    /// The envelope has no attachment with this index.
    #[error("the envelope has no attachment {0}")]
    NoSuchAttachment(u32),
    /// Nothing is held for this envelope (or not its hash list yet).
    #[error("no chunks held for this envelope")]
    Unknown,
    /// Reading, writing or syncing failed: our fault.
    #[error("attachment storage: {0}")]
    Io(#[from] io::Error),
    /// A file this store wrote does not decode.
    #[error("corrupt attachment record {0}")]
    Corrupt(String),
}

/// What the store keeps about an envelope whose chunks it holds.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Staged {
    #[prost(bytes = "vec", tag = "1")]
    pub message_id: Vec<u8>,
    #[prost(string, tag = "2")]
    pub sender_org: String,
    #[prost(string, tag = "3")]
    pub recipient_org: String,
    #[prost(int64, tag = "4")]
    pub expires_at_ms: i64,
    #[prost(message, repeated, tag = "5")]
    pub digests: Vec<pb::AttachmentDigest>,
    /// When the first upload of the envelope began.
    #[prost(int64, tag = "6")]
    pub staged_at_ms: i64,
}

impl Staged {
    pub fn digest(&self, a: u32) -> Result<&pb::AttachmentDigest, ChunkError> {
        self.digests
            .get(a as usize)
            .ok_or(ChunkError::NoSuchAttachment(a))
    }
}

/// How long chunks of an envelope that was never submitted are kept.
pub const UNSUBMITTED_TTL_MS: i64 = 24 * 3_600_000;

/// How old a directory without a readable `meta` must be before the sweep takes it (an
/// upload may be between creating the directory and writing `meta`).
const TORN_GRACE: std::time::Duration = std::time::Duration::from_secs(3600);

/// The chunk directory tree (module docs).
#[derive(Debug)]
pub struct ChunkStore {
    root: PathBuf,
    /// Bytes held, kept up to date as chunks come and go, for the disk quota.
    bytes: std::sync::atomic::AtomicU64,
    /// Held shared by a submit or delivery from its completeness check to its commit, and
    /// exclusively by the sweep: the sweep never drops the chunks of a message that is
    /// being accepted.
    pub(crate) gate: tokio::sync::RwLock<()>,
}

impl ChunkStore {
    /// Opens (creating, owner-only) the tree under `root`, dropping temporary files a crash
    /// left behind and counting what it holds.
    pub fn open(root: &Path) -> io::Result<Self> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(root)?;
        if let Some(parent) = root.parent() {
            sync_dir(parent)?;
        }
        for dir in fs::read_dir(root)?.flatten() {
            let dir = dir.path();
            let Ok(files) = fs::read_dir(&dir) else {
                continue;
            };
            for f in files.flatten() {
                if f.file_name().to_string_lossy().ends_with(".tmp") {
                    if let Err(e) = fs::remove_file(f.path()) {
                        tracing::warn!(file = %f.path().display(), error = %e, "leftover temporary chunk not removed");
                    }
                }
            }
        }
        let bytes = std::sync::atomic::AtomicU64::new(dir_size(root));
        Ok(Self {
            root: root.to_owned(),
            bytes,
            gate: tokio::sync::RwLock::new(()),
        })
    }

    /// Bytes held on disk, for the quota.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn count(&self, n: usize) {
        self.bytes
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
    }

    fn dir(&self, hash: &EnvelopeHash) -> PathBuf {
        self.root.join(hash.to_string())
    }

    /// What is kept about `hash`, if anything.
    pub fn staged(&self, hash: &EnvelopeHash) -> Result<Option<Staged>, ChunkError> {
        match fs::read(self.dir(hash).join("meta")) {
            Ok(b) => Staged::decode(b.as_slice())
                .map(Some)
                .map_err(|_| ChunkError::Corrupt(format!("{hash}/meta"))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Starts (or resumes) the upload of attachment `a` of a verified envelope: checks the
    /// hash list against the header and keeps both. Returns the checked list.
    pub fn begin(
        &self,
        env: &VerifiedEnvelope,
        a: u32,
        list: &[Vec<u8>],
        now: i64,
    ) -> Result<Vec<[u8; 32]>, ChunkError> {
        let digest = env
            .attachments()
            .get(a as usize)
            .ok_or(ChunkError::NoSuchAttachment(a))?;
        let hashes = attachment::check_hash_list(digest, list)?;
        let dir = self.dir(&env.hash());
        match fs::DirBuilder::new().mode(0o700).create(&dir) {
            // The new entry must survive a power cut with the chunks under it.
            Ok(()) => sync_dir(&self.root)?,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e.into()),
        }
        if self.staged(&env.hash())?.is_none() {
            let staged = Staged {
                message_id: env.id().as_bytes().to_vec(),
                sender_org: env.sender().to_string(),
                recipient_org: env.recipient().to_string(),
                expires_at_ms: env.expires_at(),
                digests: env.attachments().to_vec(),
                staged_at_ms: now,
            };
            let bytes = staged.encode_to_vec();
            if write_durably(&dir, "meta", &bytes)? {
                self.count(bytes.len());
            }
        }
        let list_name = format!("list-{a}");
        if !dir.join(&list_name).exists() {
            let bytes = hashes.concat();
            if write_durably(&dir, &list_name, &bytes)? {
                self.count(bytes.len());
            }
        }
        Ok(hashes)
    }

    /// Attachment `a`'s checked hash list, if its upload began.
    pub fn hashes(&self, hash: &EnvelopeHash, a: u32) -> Result<Option<Vec<[u8; 32]>>, ChunkError> {
        match fs::read(self.dir(hash).join(format!("list-{a}"))) {
            Ok(b) if b.len() % 32 == 0 => Ok(Some(
                b.chunks_exact(32)
                    .map(|c| c.try_into().expect("32-byte chunks"))
                    .collect(),
            )),
            Ok(_) => Err(ChunkError::Corrupt(format!("{hash}/list-{a}"))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Checks chunk `i` of attachment `a` against its hash and keeps it (a chunk already held
    /// is left as is). Call [`ChunkStore::sync`] before reporting it held.
    pub fn put(
        &self,
        hash: &EnvelopeHash,
        digest: &pb::AttachmentDigest,
        hashes: &[[u8; 32]],
        a: u32,
        i: u64,
        chunk: &[u8],
    ) -> Result<(), ChunkError> {
        attachment::check_chunk(digest, hashes, i, chunk)?;
        let dir = self.dir(hash);
        let name = format!("{a}-{i}");
        if dir.join(&name).exists() {
            return Ok(());
        }
        if write_file(&dir, &name, chunk)? {
            self.count(chunk.len());
        }
        Ok(())
    }

    /// Makes every chunk put under `hash` durable (its directory entries).
    pub fn sync(&self, hash: &EnvelopeHash) -> Result<(), ChunkError> {
        Ok(sync_dir(&self.dir(hash))?)
    }

    /// Indexes of attachment `a`'s chunks held, ascending.
    pub fn held(&self, hash: &EnvelopeHash, a: u32, chunks: u64) -> Vec<u32> {
        let dir = self.dir(hash);
        (0..chunks as u32)
            .filter(|i| dir.join(format!("{a}-{i}")).exists())
            .collect()
    }

    /// Whether every chunk of every attachment `digests` lists for `hash` is held, durably.
    pub fn complete(
        &self,
        hash: &EnvelopeHash,
        digests: &[pb::AttachmentDigest],
    ) -> Result<bool, ChunkError> {
        if digests.is_empty() {
            return Ok(true);
        }
        for (a, d) in digests.iter().enumerate() {
            let n = attachment::chunk_count(d);
            if self.held(hash, a as u32, n).len() as u64 != n {
                return Ok(false);
            }
        }
        self.sync(hash)?;
        Ok(true)
    }

    /// Chunk `i` of attachment `a`, as stored.
    pub fn read(&self, hash: &EnvelopeHash, a: u32, i: u64) -> Result<Vec<u8>, ChunkError> {
        match fs::read(self.dir(hash).join(format!("{a}-{i}"))) {
            Ok(b) => Ok(b),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(ChunkError::Unknown),
            Err(e) => Err(e.into()),
        }
    }

    /// Drops everything held for `hash` (idempotent).
    pub fn remove(&self, hash: &EnvelopeHash) -> Result<(), ChunkError> {
        let dir = self.dir(hash);
        let size = dir_size(&dir);
        match fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e.into()),
            _ => {
                let _ = self.bytes.fetch_update(
                    std::sync::atomic::Ordering::Relaxed,
                    std::sync::atomic::Ordering::Relaxed,
                    |b| Some(b.saturating_sub(size)),
                );
                Ok(())
            }
        }
    }

    /// Drops the chunks nothing will use any more: of envelopes expired at `now`, of
    /// uploads never submitted (`submitted` says no) within [`UNSUBMITTED_TTL_MS`], and
    /// directories left without a readable `meta` for an hour. A directory it cannot read is
    /// skipped, not a reason to stop. Returns how many envelopes' chunks it dropped.
    pub fn sweep(
        &self,
        now: i64,
        submitted: impl Fn(&EnvelopeHash, &Staged) -> bool,
    ) -> Result<usize, ChunkError> {
        let mut dropped = 0;
        for entry in fs::read_dir(&self.root)? {
            let Ok(entry) = entry else { continue };
            let Some(hash) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<EnvelopeHash>().ok())
            else {
                continue;
            };
            let drop = match self.staged(&hash) {
                Ok(Some(s)) => {
                    now >= s.expires_at_ms
                        || (now - s.staged_at_ms > UNSUBMITTED_TTL_MS && !submitted(&hash, &s))
                }
                Ok(None) | Err(ChunkError::Corrupt(_)) => entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age > TORN_GRACE),
                Err(e) => {
                    tracing::warn!(envelope_hash = %hash, error = %e, "sweep skipped a chunk folder");
                    false
                }
            };
            if drop {
                match self.remove(&hash) {
                    Ok(()) => dropped += 1,
                    Err(e) => {
                        tracing::warn!(envelope_hash = %hash, error = %e, "sweep could not drop a chunk folder")
                    }
                }
            }
        }
        // Whatever the running count missed (a removal that failed half way), it is exact
        // again from here.
        self.bytes
            .store(dir_size(&self.root), std::sync::atomic::Ordering::Relaxed);
        Ok(dropped)
    }
}

/// Bytes of the files under `p`, all the way down (0 for what cannot be read).
pub fn dir_size(p: &Path) -> u64 {
    fs::read_dir(p)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// Writes `name` in `dir` through a synced temporary file and a rename. Temporary names are
/// unique, so two uploads of the same chunk (a client's retry racing its first attempt, the
/// peer's forwarder) each rename whole bytes into place, and the same bytes win either way.
///
/// The final name is linked, not renamed, into place: a link never replaces an existing
/// file, so of two writers of the same chunk exactly one creates it, and only that one's
/// bytes are counted (`Ok(true)`).
fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<bool> {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(".{name}.{}.{n}.tmp", std::process::id()));
    let written = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_data()?;
        match fs::hard_link(&tmp, dir.join(name)) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(e),
        }
    })();
    let _ = fs::remove_file(&tmp);
    written
}

fn write_durably(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<bool> {
    let created = write_file(dir, name, bytes)?;
    sync_dir(dir)?;
    Ok(created)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweep_drops_expired_and_abandoned_uploads_only() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(tmp.path()).unwrap();
        let hour = 3_600_000;
        let now = 100 * hour;
        let keep = EnvelopeHash([1; 32]);
        let old = EnvelopeHash([2; 32]);
        let abandoned = EnvelopeHash([3; 32]);
        let queued = EnvelopeHash([4; 32]);
        let fresh_torn = EnvelopeHash([5; 32]);
        for (h, staged_at, expires, id) in [
            (keep, now - hour, now + hour, 1u8),
            (old, now - 2 * hour, now - 1, 2),
            (abandoned, now - 25 * hour, now + hour, 3),
            (queued, now - 25 * hour, now + hour, 4),
        ] {
            let dir = store.dir(&h);
            fs::create_dir(&dir).unwrap();
            let staged = Staged {
                message_id: vec![id],
                expires_at_ms: expires,
                staged_at_ms: staged_at,
                ..Default::default()
            };
            write_durably(&dir, "meta", &staged.encode_to_vec()).unwrap();
            write_file(&dir, "0-0", b"chunk").unwrap();
        }
        // Created a moment ago, `meta` not written yet: an upload in its first steps.
        fs::create_dir(store.dir(&fresh_torn)).unwrap();
        fs::create_dir(tmp.path().join("not-a-hash")).unwrap();
        // Only `queued` was submitted.
        let dropped = store.sweep(now, |_, s| s.message_id == vec![4]).unwrap();
        assert_eq!(dropped, 2);
        assert!(store.dir(&keep).join("0-0").exists());
        assert!(!store.dir(&old).exists());
        assert!(!store.dir(&abandoned).exists());
        assert!(store.dir(&queued).exists());
        assert!(store.dir(&fresh_torn).exists());
        assert!(tmp.path().join("not-a-hash").exists());
        assert_eq!(store.read(&keep, 0, 0).unwrap(), b"chunk");
        assert!(matches!(store.read(&keep, 0, 1), Err(ChunkError::Unknown)));
    }

    #[test]
    fn the_byte_count_follows_chunks_in_and_out_and_survives_a_reopen() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(tmp.path()).unwrap();
        let h = EnvelopeHash([6; 32]);
        fs::create_dir(store.dir(&h)).unwrap();
        assert!(write_file(&store.dir(&h), "0-0", &[0; 1000]).unwrap());
        store.count(1000);
        // The same chunk written again creates nothing and counts nothing.
        assert!(!write_file(&store.dir(&h), "0-0", &[0; 1000]).unwrap());
        // A temporary file a crash left behind is dropped at open.
        fs::write(store.dir(&h).join(".0-1.99.0.tmp"), [0; 500]).unwrap();
        let reopened = ChunkStore::open(tmp.path()).unwrap();
        assert_eq!(reopened.bytes(), 1000);
        assert!(!store.dir(&h).join(".0-1.99.0.tmp").exists());
        reopened.remove(&h).unwrap();
        assert_eq!(reopened.bytes(), 0);
    }
}
