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
}

impl Staged {
    pub fn digest(&self, a: u32) -> Result<&pb::AttachmentDigest, ChunkError> {
        self.digests
            .get(a as usize)
            .ok_or(ChunkError::NoSuchAttachment(a))
    }
}

/// The chunk directory tree (module docs).
#[derive(Debug)]
pub struct ChunkStore {
    root: PathBuf,
}

impl ChunkStore {
    /// Opens (creating, owner-only) the tree under `root`.
    pub fn open(root: &Path) -> io::Result<Self> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(root)?;
        Ok(Self {
            root: root.to_owned(),
        })
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
    ) -> Result<Vec<[u8; 32]>, ChunkError> {
        let digest = env
            .attachments()
            .get(a as usize)
            .ok_or(ChunkError::NoSuchAttachment(a))?;
        let hashes = attachment::check_hash_list(digest, list)?;
        let dir = self.dir(&env.hash());
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .or_else(|e| {
                if e.kind() == io::ErrorKind::AlreadyExists {
                    Ok(())
                } else {
                    Err(e)
                }
            })?;
        if self.staged(&env.hash())?.is_none() {
            let staged = Staged {
                message_id: env.id().as_bytes().to_vec(),
                sender_org: env.sender().to_string(),
                recipient_org: env.recipient().to_string(),
                expires_at_ms: env.expires_at(),
                digests: env.attachments().to_vec(),
            };
            write_durably(&dir, "meta", &staged.encode_to_vec())?;
        }
        let list_name = format!("list-{a}");
        if !dir.join(&list_name).exists() {
            write_durably(&dir, &list_name, &hashes.concat())?;
        }
        sync_dir(&dir)?;
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
        write_file(&dir, &name, chunk)?;
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

    /// Whether every chunk of every attachment of `env` is held, durably.
    pub fn complete(&self, env: &VerifiedEnvelope) -> Result<bool, ChunkError> {
        if env.attachments().is_empty() {
            return Ok(true);
        }
        let hash = env.hash();
        for (a, d) in env.attachments().iter().enumerate() {
            let n = attachment::chunk_count(d);
            if self.held(&hash, a as u32, n).len() as u64 != n {
                return Ok(false);
            }
        }
        self.sync(&hash)?;
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
        match fs::remove_dir_all(self.dir(hash)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }

    /// Drops the chunks of every envelope expired at `now` (nothing can deliver them any
    /// more), and directories without a readable `meta` (an upload cut before it was
    /// written). Returns how many envelopes' chunks it dropped.
    pub fn sweep(&self, now: i64) -> Result<usize, ChunkError> {
        let mut dropped = 0;
        for entry in fs::read_dir(&self.root)? {
            let entry = entry?;
            let Some(hash) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<EnvelopeHash>().ok())
            else {
                continue;
            };
            let expired = match self.staged(&hash) {
                Ok(Some(s)) => now >= s.expires_at_ms,
                Ok(None) | Err(ChunkError::Corrupt(_)) => true,
                Err(e) => return Err(e),
            };
            if expired {
                self.remove(&hash)?;
                dropped += 1;
            }
        }
        Ok(dropped)
    }

    /// Bytes held on disk, for the quota.
    pub fn disk_usage(&self) -> u64 {
        fn walk(p: &Path) -> u64 {
            fs::read_dir(p)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => walk(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        }
        walk(&self.root)
    }
}

/// Writes `name` in `dir` through a synced temporary file and a rename. Temporary names are
/// unique, so two uploads of the same chunk (a client's retry racing its first attempt, the
/// peer's forwarder) each rename whole bytes into place, and the same bytes win either way.
fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(".{name}.{n}.tmp"));
    let written = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_data()?;
        fs::rename(&tmp, dir.join(name))
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written
}

fn write_durably(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    write_file(dir, name, bytes)?;
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweep_drops_expired_and_unnamed_uploads_only() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(tmp.path()).unwrap();
        let keep = EnvelopeHash([1; 32]);
        let old = EnvelopeHash([2; 32]);
        let cut = EnvelopeHash([3; 32]);
        for (h, expires) in [(keep, 2_000), (old, 1_000)] {
            let dir = store.dir(&h);
            fs::create_dir(&dir).unwrap();
            let staged = Staged {
                expires_at_ms: expires,
                ..Default::default()
            };
            write_durably(&dir, "meta", &staged.encode_to_vec()).unwrap();
            write_file(&dir, "0-0", b"chunk").unwrap();
        }
        fs::create_dir(store.dir(&cut)).unwrap();
        fs::create_dir(tmp.path().join("not-a-hash")).unwrap();
        assert_eq!(store.sweep(1_500).unwrap(), 2);
        assert!(store.dir(&keep).join("0-0").exists());
        assert!(!store.dir(&old).exists());
        assert!(!store.dir(&cut).exists());
        assert!(tmp.path().join("not-a-hash").exists());
        assert_eq!(store.read(&keep, 0, 0).unwrap(), b"chunk");
        assert!(matches!(store.read(&keep, 0, 1), Err(ChunkError::Unknown)));
    }
}
