//! Attachment transfer: who may upload, query and download an envelope's chunks, and when
//! the chunks go. The bytes live in [`crate::attachments::ChunkStore`].
//!
//! - A client uploads the chunks of an envelope it is about to submit; the envelope passes
//!   every submit check first, so nothing is kept for an envelope that would be refused.
//! - A peer gateway uploads the chunks of an envelope it is about to deliver; the envelope
//!   passes every check of a delivery first.
//! - Submit and delivery wait for every chunk ([`Pipeline::attachments_complete`]).
//! - The recipient organisation downloads the chunks of a message in its inbox.
//! - Chunks go when their message's delivery ends here (acknowledged, forwarded, expired,
//!   refused), or when an envelope never submitted expires.

use std::sync::Arc;

use accord_proto::attachment;
use accord_proto::envelope::{SealedEnvelope, VerifiedEnvelope};
use accord_proto::ids::{EnvelopeHash, MessageId, SpiffeId};
use accord_proto::pb::{self, RejectReason};

use crate::attachments::{ChunkError, ChunkStore, Staged};
use crate::pipeline::{Pipeline, PipelineError};
use crate::store::{MessageHead, StoreError};

/// Who uploads or asks: an organisation of this country, or a peer gateway.
#[derive(Clone, Copy, Debug)]
pub enum Party<'a> {
    Client(&'a SpiffeId),
    Peer(&'a SpiffeId),
}

/// What a delivery answers, as its retry reason, while the envelope's chunks are not all
/// here: the peer's forwarder then pushes them and delivers again.
pub const CHUNKS_MISSING: &str = "attachment chunks not all held yet";

/// Keeps an envelope's chunks from the sweep while held ([`Pipeline::keep_attachments`]).
#[derive(Debug)]
pub(crate) struct ChunksKept<'a> {
    _gate: Option<tokio::sync::RwLockReadGuard<'a, ()>>,
}

/// An upload in progress: one attachment of one checked envelope.
#[derive(Debug)]
pub struct Upload {
    hash: EnvelopeHash,
    attachment: u32,
    digest: pb::AttachmentDigest,
    hashes: Arc<Vec<[u8; 32]>>,
    /// The envelope was already accepted or received here: chunks sent again are not kept
    /// (they may have been dropped with its delivery), and the upload answers complete.
    settled: bool,
}

impl From<ChunkError> for PipelineError {
    fn from(e: ChunkError) -> Self {
        match e {
            ChunkError::Refused(e) => PipelineError::BadRequest(e.to_string()),
            ChunkError::NoSuchAttachment(_) => PipelineError::BadRequest(e.to_string()),
            ChunkError::Unknown => PipelineError::NotFound,
            ChunkError::Io(e) => PipelineError::Store(StoreError::Io(e)),
            ChunkError::Corrupt(what) => PipelineError::Store(StoreError::Corrupt(what)),
        }
    }
}

/// Runs blocking chunk-store work off the async workers.
async fn blocking<T: Send + 'static>(
    chunks: &Arc<ChunkStore>,
    f: impl FnOnce(&ChunkStore) -> Result<T, ChunkError> + Send + 'static,
) -> Result<T, PipelineError> {
    let chunks = chunks.clone();
    tokio::task::spawn_blocking(move || f(&chunks))
        .await
        .map_err(|e| PipelineError::Store(StoreError::Engine(e.to_string())))?
        .map_err(PipelineError::from)
}

impl Pipeline {
    /// Refuses an envelope whose attachments add up to more than this gateway takes.
    pub(crate) fn check_attachments(&self, env: &VerifiedEnvelope) -> Result<(), PipelineError> {
        if !env.attachments().is_empty() && env.kind() != pb::Kind::Correspondence {
            return Err(PipelineError::Refused {
                reason: RejectReason::Malformed,
                detail: "only correspondence carries attachments".into(),
            });
        }
        let total: u64 = env.attachments().iter().map(|d| d.size).sum();
        if total > self.max_attachment_bytes {
            return Err(PipelineError::Refused {
                reason: RejectReason::TooLarge,
                detail: format!(
                    "attachments total {total} bytes; this gateway takes at most {}",
                    self.max_attachment_bytes
                ),
            });
        }
        Ok(())
    }

    /// Refuses (for now) `more` bytes of chunks that would take the chunk store past its own
    /// quota. Chunks have a quota apart from the envelope store's, so uploads that are never
    /// submitted cannot stop alerts and receipts.
    fn check_chunk_quota(&self, more: u64) -> Result<(), PipelineError> {
        if self.chunks.bytes().saturating_add(more) > self.attachment_quota_bytes {
            tracing::warn!(
                quota = self.attachment_quota_bytes,
                "attachment chunks over quota; refusing uploads"
            );
            return Err(PipelineError::QuotaFull);
        }
        Ok(())
    }

    /// Every chunk of `env`'s attachments, held here and durable, kept until the returned
    /// guard drops (a submit or delivery holds it to its commit, so the sweep cannot drop
    /// them in between); `None` while some are missing. An envelope without attachments
    /// takes no lock and touches no disk.
    pub(crate) async fn keep_attachments(
        &self,
        env: &VerifiedEnvelope,
    ) -> Result<Option<ChunksKept<'_>>, PipelineError> {
        if env.attachments().is_empty() {
            return Ok(Some(ChunksKept { _gate: None }));
        }
        let gate = self.chunks.gate.read().await;
        let (hash, digests) = (env.hash(), env.attachments().to_vec());
        let complete = blocking(&self.chunks, move |c| c.complete(&hash, &digests)).await?;
        Ok(complete.then_some(ChunksKept { _gate: Some(gate) }))
    }

    /// Drops the chunks of a message whose delivery ended here, if its envelope lists any:
    /// most list none, and they cost no trip to the blocking pool.
    pub(crate) async fn drop_attachments_of(&self, msg: &MessageHead) {
        if !msg.lists_attachments() {
            return;
        }
        match EnvelopeHash::from_slice(&msg.envelope_hash) {
            Ok(hash) => self.drop_attachments(hash).await,
            Err(_) => tracing::warn!("a stored message has a malformed envelope hash"),
        }
    }

    /// Drops a message's chunks once its delivery ended here. A failure is logged, not
    /// returned: the ending is committed, and the sweep takes the chunks at expiry.
    pub(crate) async fn drop_attachments(&self, hash: EnvelopeHash) {
        if let Err(e) = blocking(&self.chunks, move |c| c.remove(&hash)).await {
            tracing::warn!(envelope_hash = %hash, error = %e, "attachment chunks not removed");
        }
    }

    /// Checks the envelope of an upload as its submit or delivery would be checked, then its
    /// hash list against the signed header.
    pub async fn begin_upload(
        self: &Arc<Self>,
        party: Party<'_>,
        start: pb::AttachmentStart,
    ) -> Result<Upload, PipelineError> {
        let wire = start
            .envelope
            .ok_or_else(|| PipelineError::BadRequest("the start names no envelope".into()))?;
        let sealed = SealedEnvelope::from_wire(wire, &self.limits)?;
        let env = match party {
            Party::Client(caller) => self.check_submit(caller, sealed)?.0,
            Party::Peer(peer) => {
                self.admit_from_peer(peer, sealed)
                    .map_err(|reason| PipelineError::Refused {
                        reason,
                        detail: "the peer gateway would not deliver this envelope".into(),
                    })?
            }
        };
        let a = start.attachment;
        let list = start.chunk_hashes;
        let digest = env
            .attachments()
            .get(a as usize)
            .cloned()
            .ok_or(ChunkError::NoSuchAttachment(a))?;
        let hash = env.hash();
        if let Some(stored) = self.store.message_head(&env.id())? {
            if stored.envelope_hash != hash.0 {
                return Err(PipelineError::Conflict);
            }
            // A replay (a resumed send, a peer redelivering after a lost answer): nothing to
            // keep, the message is here.
            let hashes = attachment::check_hash_list(&digest, &list).map_err(ChunkError::from)?;
            return Ok(Upload {
                hash,
                attachment: a,
                digest,
                hashes: Arc::new(hashes),
                settled: true,
            });
        }
        self.check_chunk_quota(digest.size)?;
        let now = self.now();
        let hashes = blocking(&self.chunks, move |c| c.begin(&env, a, &list, now)).await?;
        Ok(Upload {
            hash,
            attachment: a,
            digest,
            hashes: Arc::new(hashes),
            settled: false,
        })
    }

    /// Checks one chunk of an upload and keeps it, within the disk quota.
    pub async fn put_chunk(&self, up: &Upload, chunk: pb::Chunk) -> Result<(), PipelineError> {
        if up.settled {
            // Nothing is kept, but what is sent is still checked.
            attachment::check_chunk(&up.digest, &up.hashes, u64::from(chunk.index), &chunk.data)
                .map_err(ChunkError::from)?;
            return Ok(());
        }
        self.check_chunk_quota(chunk.data.len() as u64)?;
        let (hash, a, digest, hashes) =
            (up.hash, up.attachment, up.digest.clone(), up.hashes.clone());
        blocking(&self.chunks, move |c| {
            c.put(
                &hash,
                &digest,
                &hashes,
                a,
                u64::from(chunk.index),
                &chunk.data,
            )
        })
        .await
    }

    /// What is held of an upload, once it is durable.
    pub async fn finish_upload(&self, up: &Upload) -> Result<pb::ChunkState, PipelineError> {
        let (hash, a, digest) = (up.hash, up.attachment, up.digest.clone());
        let n = attachment::chunk_count(&digest);
        let chunk_hashes = up.hashes.iter().map(|h| h.to_vec()).collect();
        if up.settled {
            return Ok(pb::ChunkState {
                chunks: n as u32,
                held: (0..n as u32).collect(),
                chunk_hashes,
            });
        }
        blocking(&self.chunks, move |c| {
            // Listed first, synced second: whatever the list shows is durable when answered.
            let held = c.held(&hash, a, n);
            c.sync(&hash)?;
            Ok(pb::ChunkState {
                chunks: n as u32,
                held,
                chunk_hashes,
            })
        })
        .await
    }

    /// Which chunks of attachment `a` of `hash` are held here, for its sender (resuming an
    /// upload), its recipient (before downloading) or the peer gateway of its sender.
    pub async fn chunk_state(
        &self,
        party: Party<'_>,
        hash: &[u8],
        a: u32,
    ) -> Result<pb::ChunkState, PipelineError> {
        let hash = EnvelopeHash::from_slice(hash)
            .map_err(|_| PipelineError::BadRequest("envelope_hash must be 32 bytes".into()))?;
        // Nothing held and not the caller's to see answer alike: NOT_FOUND, which for a
        // sender means the upload starts from the beginning.
        let staged = blocking(&self.chunks, move |c| c.staged(&hash))
            .await?
            .filter(|s| may_see(party, s))
            .ok_or(PipelineError::NotFound)?;
        let digest = staged.digest(a)?.clone();
        blocking(&self.chunks, move |c| {
            let n = attachment::chunk_count(&digest);
            let state = match c.hashes(&hash, a)? {
                Some(list) => pb::ChunkState {
                    chunks: n as u32,
                    held: c.held(&hash, a, n),
                    chunk_hashes: list.iter().map(|h| h.to_vec()).collect(),
                },
                None => pb::ChunkState {
                    chunks: n as u32,
                    ..Default::default()
                },
            };
            c.sync(&hash)?;
            Ok(state)
        })
        .await
    }

    /// Checks that `caller` may download the chunks of `hash`: it is the recipient and the
    /// message is here, received. Returns what is kept about it.
    pub async fn downloadable(
        &self,
        caller: &SpiffeId,
        hash: &[u8],
        a: u32,
    ) -> Result<(EnvelopeHash, pb::AttachmentDigest), PipelineError> {
        let hash = EnvelopeHash::from_slice(hash)
            .map_err(|_| PipelineError::BadRequest("envelope_hash must be 32 bytes".into()))?;
        let staged = blocking(&self.chunks, move |c| c.staged(&hash))
            .await?
            .ok_or(PipelineError::NotFound)?;
        if staged.recipient_org != caller.to_string() {
            return Err(PipelineError::NotFound);
        }
        let id = MessageId::from_slice(&staged.message_id)
            .map_err(|_| StoreError::Corrupt(format!("{hash}/meta")))?;
        match self.store.message_head(&id)? {
            Some(m) if m.envelope_hash == hash.0 => {}
            _ => return Err(PipelineError::NotFound),
        }
        Ok((hash, staged.digest(a)?.clone()))
    }

    /// Chunk `i` of attachment `a` of a message [`Pipeline::downloadable`] allowed.
    pub async fn read_chunk(
        &self,
        hash: EnvelopeHash,
        a: u32,
        i: u64,
    ) -> Result<Vec<u8>, PipelineError> {
        blocking(&self.chunks, move |c| c.read(&hash, a, i)).await
    }

    /// Drops the chunks of envelopes that expired, and of uploads never submitted; at start
    /// and then periodically.
    pub async fn sweep_attachments(self: &Arc<Self>) {
        let now = self.now();
        let me = self.clone();
        // Submitted means stored under this very hash; a store that cannot answer keeps
        // the chunks.
        let submitted = move |hash: &EnvelopeHash, s: &Staged| {
            let Ok(id) = MessageId::from_slice(&s.message_id) else {
                return false;
            };
            match me.store.message_head(&id) {
                Ok(Some(m)) => m.envelope_hash == hash.0,
                Ok(None) => false,
                Err(_) => true,
            }
        };
        let sweep = move |c: &ChunkStore| {
            let _no_accepts = c.gate.blocking_write();
            c.sweep(now, submitted)
        };
        match blocking(&self.chunks, sweep).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(envelopes = n, "expired attachment chunks dropped"),
            Err(e) => tracing::warn!(error = %e, "attachment sweep failed"),
        }
    }
}

/// The sender or recipient organisation, or the gateway of the sender's country.
fn may_see(party: Party<'_>, staged: &Staged) -> bool {
    match party {
        Party::Client(org) => {
            let org = org.to_string();
            staged.sender_org == org || staged.recipient_org == org
        }
        Party::Peer(peer) => staged
            .sender_org
            .parse::<accord_proto::ids::OrgId>()
            .is_ok_and(|s| s.country() == peer.country()),
    }
}
