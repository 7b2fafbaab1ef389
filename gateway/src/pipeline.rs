//! One pipeline per envelope: authenticate (done by the listener) → authorise → verify
//! signature and limits → append to the log → store durably → answer with a signed receipt.
//!
//! Every state change is one [`Tx`]: the message, its queue entry, its log entries and the
//! receipt proving them are committed together, and nothing is answered before the commit
//! is on disk. Refusals are logged too, with the reason that the caller receives.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use accord_proto::crypto::SigningKey;
use accord_proto::directory::{Directories, DirectoryError};
use accord_proto::envelope::{
    EnvelopeError, HeaderBytes, Limits, SealedEnvelope, VerifiedEnvelope,
};
use accord_proto::ids::{CountryCode, EnvelopeHash, MessageId, OrgId, Role, SpiffeId};
use accord_proto::log::LogIndex;
use accord_proto::pb::{self, LogEvent, RejectReason, Stage};
use accord_proto::receipt::{self, ReceiptError, VerifiedReceipt};
use prost::Message;
use tokio::sync::Notify;
use tracing::Instrument;

use crate::store::{
    MessageHead, Op, Queue, QueueEntry, QueueKey, Store, StoreError, StoredMessage, Tx, TxOutcome,
};

/// Why the pipeline refused or failed a request. [`crate::service`] maps it to a status.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PipelineError {
    /// The envelope broke a rule of the wire contract; the reason is logged and returned.
    #[error("{reason:?}: {detail}")]
    Refused {
        reason: RejectReason,
        detail: String,
    },
    /// The caller may not do this (e.g. submit as another organisation).
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// A different envelope already uses this message id.
    #[error("message id already used by a different envelope")]
    Conflict,
    /// No such message for this caller.
    #[error("not found")]
    NotFound,
    /// A receipt did not verify or does not fit its message.
    #[error("bad receipt: {0}")]
    BadReceipt(String),
    /// The store is over its disk quota: the queue holds what it has and refuses more.
    #[error("queue full: the store is over its disk quota; retry later")]
    QuotaFull,
    /// The request's arguments are out of range (e.g. a proof for a size beyond the log).
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The request does not fit the current state (an inconsistent checkpoint shown to a
    /// witness; an ack for a message that expired).
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),
    /// The envelope's attachment chunks are not all held here yet: the client uploads them
    /// (a peer gateway pushes them), then submits (delivers) again.
    #[error("{}", crate::transfer::CHUNKS_MISSING)]
    ChunksMissing,
    /// Another change to the same message (a copy of it arriving from the peer, an ack, an
    /// expiry, a receipt from the peer) is being decided and committed: retry once it is, and
    /// this one is checked against it.
    #[error("another change to this message is being committed; retry")]
    EndingInProgress,
    /// A peer needed for the answer could not be reached; retry later.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// A peer's envelope is refused now for a reason that may pass by itself (its sender's
    /// key not in our directory yet, its creation time ahead of our clock): retry later.
    /// Refused with a signed receipt now, it could be taken later and signed RECEIVED too.
    #[error("not acceptable yet, retry: {0}")]
    NotYet(String),
    /// A peer's receipt is signed by a key our copy of the directory does not hold yet (the
    /// peer's directory change has not reached us): retry once it has.
    #[error("receipt signer not in our directory yet: {0}")]
    SignerNotKnownYet(String),
    /// The store failed: our fault, never the caller's.
    #[error("storage: {0}")]
    Store(#[from] StoreError),
}

impl From<EnvelopeError> for PipelineError {
    fn from(e: EnvelopeError) -> Self {
        PipelineError::Refused {
            reason: e.reason(),
            detail: e.to_string(),
        }
    }
}

impl From<ReceiptError> for PipelineError {
    fn from(e: ReceiptError) -> Self {
        PipelineError::BadReceipt(e.to_string())
    }
}

/// How long a peer receipt signed by a key we do not hold is answered "retry" rather than
/// refused: the peer sends its directory before each delivery, so a real change arrives
/// within a round or two.
const DIRECTORY_CATCH_UP_MS: i64 = 10 * 60 * 1000;

/// Most envelope bytes one fetch returns (at least one envelope, whatever its size).
const MAX_FETCH_BYTES: usize = 16 << 20;

/// Whether a receipt signed in a commit is stored under its message id.
enum Keep {
    /// Stored: the message is ours and the receipt belongs to its chain. Committed under
    /// the guard of the change to the message when one is held, and the guard is held
    /// until the commit lands ([`Pipeline::commit_guarded`]).
    Stored(Option<EndingGuard>),
    /// Only answered: a refusal of bytes that may reuse another message's id must not join
    /// that message's chain (the log entry records the refusal).
    AnswerOnly,
}

/// A clock in Unix milliseconds; tests pass their own.
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

pub fn system_clock() -> Clock {
    Arc::new(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0)
    })
}

/// Wake-ups for forwarders (per peer country) and subscribers (per organisation).
#[derive(Debug, Default)]
pub struct Signals {
    map: Mutex<HashMap<String, Arc<Notify>>>,
}

impl Signals {
    pub fn get(&self, key: &str) -> Arc<Notify> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(key.to_owned()).or_default().clone()
    }
    fn wake(&self, key: &str) {
        self.get(key).notify_waiters();
        self.get(key).notify_one();
    }
}

/// Everything the pipeline needs; shared by the services and the forwarders.
pub struct Pipeline {
    pub identity: SpiffeId,
    pub store: Arc<dyn Store>,
    /// The verified directories, replaced whole when a newer version arrives.
    pub directories: std::sync::RwLock<Arc<Directories>>,
    /// Pinned directory keys of every country.
    pub directory_trust: Vec<pb::DirectoryTrust>,
    /// Which role may send which kind to whom; replaced whole when its file changes.
    pub policy: std::sync::RwLock<Arc<crate::policy::Policy>>,
    pub receipt_key: SigningKey,
    pub limits: Limits,
    /// Attachment chunks of envelopes being uploaded, queued or waiting in inboxes.
    pub chunks: Arc<crate::attachments::ChunkStore>,
    /// Most attachment bytes one envelope may carry.
    pub max_attachment_bytes: u64,
    /// Chunk bytes held before uploads are refused (apart from `quota_bytes`).
    pub attachment_quota_bytes: u64,
    pub quota_bytes: u64,
    pub peers: Vec<CountryCode>,
    pub clock: Clock,
    pub signals: Signals,
    /// Log, checkpoint and witness keys.
    pub log_keys: crate::transparency::LogKeys,
    /// Serialises checkpoint publication and updates of stored checkpoint notes.
    pub checkpoint_lock: tokio::sync::Mutex<()>,
    /// Serialises witness decisions (read, check, persist, cosign).
    pub witness_lock: tokio::sync::Mutex<()>,
    /// How many inconsistent peer checkpoints this gateway refused.
    pub witness_alarms: std::sync::atomic::AtomicU64,
    /// Messages whose ending (an ack, an expiry in the inbox, a delivered or rejected
    /// receipt from the peer) or whose arrival from a peer is being committed: one at a
    /// time per message, so that each is decided against the one before, a message never
    /// ends twice, and a copy of it is never refused while another is being taken in.
    pub endings: Endings,
    /// Peer links, for requests that need a peer's answer (evidence).
    pub peer_clients: HashMap<
        CountryCode,
        accord_proto::pb::peer_link_client::PeerLinkClient<tonic::transport::Channel>,
    >,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

fn entry(event: LogEvent, id: Option<&MessageId>, hash: &EnvelopeHash, actor: &str, at: i64) -> Op {
    Op::Log(
        pb::LogEntry {
            event: event as i32,
            message_id: id.map(|i| i.as_bytes().to_vec()).unwrap_or_default(),
            envelope_hash: hash.0.to_vec(),
            actor: actor.to_owned(),
            at_ms: at,
            reason: 0,
            receipt_hash: vec![],
        }
        .encode_to_vec(),
    )
}

/// Messages whose ending, or whose arrival from a peer, is being decided and committed;
/// each with what wakes those waiting for it to be.
#[derive(Debug, Default)]
pub struct Endings(Arc<Mutex<HashMap<MessageId, Arc<Notify>>>>);

/// How long a recipient's acknowledgement waits for another change to its message to be
/// committed (the tail of its arrival's commit, a copy from the peer answered) before it is
/// answered "retry".
const ACK_WAITS_FOR_CHANGE: std::time::Duration = std::time::Duration::from_secs(2);

impl Endings {
    /// Marks a change to message `id` as being decided; `EndingInProgress` while another is.
    fn take(&self, id: MessageId) -> Result<EndingGuard, PipelineError> {
        self.try_take(id)
            .map_err(|_| PipelineError::EndingInProgress)
    }

    /// [`Self::take`], waiting up to `limit` for the change being decided to be committed.
    async fn take_within(
        &self,
        id: MessageId,
        limit: std::time::Duration,
    ) -> Result<EndingGuard, PipelineError> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let released = match self.try_take(id) {
                Ok(guard) => return Ok(guard),
                Err(released) => released,
            };
            let wait = deadline
                .saturating_duration_since(tokio::time::Instant::now())
                .min(std::time::Duration::from_millis(10));
            if wait.is_zero() {
                return Err(PipelineError::EndingInProgress);
            }
            // Woken when the guard goes; looked at again every 10 ms all the same, for a
            // release between the look above and this wait.
            let _ = tokio::time::timeout(wait, released.notified()).await;
        }
    }

    fn try_take(&self, id: MessageId) -> Result<EndingGuard, Arc<Notify>> {
        let mut held = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match held.entry(id) {
            std::collections::hash_map::Entry::Occupied(taken) => Err(taken.get().clone()),
            std::collections::hash_map::Entry::Vacant(free) => {
                free.insert(Arc::default());
                Ok(EndingGuard {
                    held: self.0.clone(),
                    id,
                })
            }
        }
    }
}

/// Marks a change to a message (its ending, or its arrival) as being decided and committed;
/// unmarks it when dropped. A commit it guards goes through [`Pipeline::commit_guarded`],
/// which holds it until the commit lands.
struct EndingGuard {
    held: Arc<Mutex<HashMap<MessageId, Arc<Notify>>>>,
    id: MessageId,
}

/// The commit of a change decided under a guard, which holds the guard until the commit
/// lands, not only while its caller waits. Awaited, it lets go when the store answers.
/// Dropped before (its caller cancelled: a client or peer that hung up), a task takes over
/// the wait: the transaction is with the store already, and no other change to the message
/// may be decided before it shows. No task is spawned on the way that completes.
#[must_use = "a guarded commit holds its message's guard until it is awaited or dropped"]
struct GuardedCommit {
    commit: Option<crate::store::Commit>,
    guard: Option<EndingGuard>,
}

impl std::future::Future for GuardedCommit {
    type Output = Result<TxOutcome, StoreError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let Some(commit) = self.commit.as_mut() else {
            return std::task::Poll::Ready(Err(StoreError::Engine(
                "a guarded commit polled after it finished".into(),
            )));
        };
        let outcome = std::task::ready!(commit.as_mut().poll(cx));
        self.commit = None;
        self.guard = None;
        std::task::Poll::Ready(outcome)
    }
}

impl Drop for GuardedCommit {
    fn drop(&mut self) {
        let (Some(commit), Some(guard)) = (self.commit.take(), self.guard.take()) else {
            return;
        };
        // Outside a runtime nothing could wait for it, nor decide another change.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(e) = commit.await {
                    tracing::error!(message_id = %guard.id, error = %e, "a commit whose caller went away failed");
                }
                drop(guard);
            });
        }
    }
}

/// How a message's delivery ends, for [`Pipeline::end_once`].
pub(crate) enum Ending {
    /// This gateway retires it: a REJECTED receipt it signs, naming the reason.
    Retire(RejectReason),
    /// The peer rejected it: the peer's verified REJECTED receipt, and its encoded
    /// `pb::LogEntry`.
    Peer { receipt: pb::Receipt, log: Vec<u8> },
}

impl Drop for EndingGuard {
    fn drop(&mut self) {
        let released = (self.held.lock())
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
        if let Some(waiting) = released {
            waiting.notify_waiters();
        }
    }
}

fn receipt_entry(event: LogEvent, r: &VerifiedReceipt, at: i64) -> Op {
    Op::Log(
        pb::LogEntry {
            event: event as i32,
            message_id: r.message_id.as_bytes().to_vec(),
            envelope_hash: r.envelope_hash.0.to_vec(),
            actor: r.signer.to_string(),
            at_ms: at,
            reason: r.body.reason,
            receipt_hash: receipt::receipt_hash(&r.wire).to_vec(),
        }
        .encode_to_vec(),
    )
}

impl Pipeline {
    pub fn now(&self) -> i64 {
        (self.clock)()
    }

    /// The role policy in force now.
    pub fn policy(&self) -> Arc<crate::policy::Policy> {
        self.policy
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The directories in force now.
    pub fn directories(&self) -> Arc<Directories> {
        self.directories
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Takes a peer's (or our operator's) signed directory of `country` if it verifies
    /// against the pinned keys and is newer than the one held; logs the change.
    pub async fn update_directory(
        &self,
        country: &CountryCode,
        actor: &SpiffeId,
        signed: pb::SignedDirectory,
    ) -> Result<bool, PipelineError> {
        let offered = accord_proto::directory::country_of(&signed)
            .map_err(|e| PipelineError::BadRequest(e.to_string()))?;
        if &offered != country {
            return Err(PipelineError::PermissionDenied(format!(
                "{actor} may only offer the directory of {country}"
            )));
        }
        let digest = accord_proto::crypto::sha256(&[&signed.directory]);
        let updated = {
            let current = self.directories();
            current
                .with_update(signed, &self.directory_trust, self.now())
                .map_err(|e| match e {
                    // Genuine, but not newer than what we hold.
                    DirectoryError::Older { .. } | DirectoryError::SameVersionDiffers { .. } => {
                        PipelineError::FailedPrecondition(e.to_string())
                    }
                    _ => PipelineError::BadRequest(e.to_string()),
                })?
        };
        let Some(updated) = updated else {
            return Ok(false);
        };
        let version = updated
            .to_wire()
            .iter()
            .find(|d| d.country == country.as_str())
            .map_or(0, |d| d.version);
        let entry = pb::LogEntry {
            event: LogEvent::DirectoryChange as i32,
            message_id: vec![],
            // For directory changes: SHA-256 of the new directory's bytes.
            envelope_hash: digest.to_vec(),
            actor: actor.to_string(),
            at_ms: self.now(),
            reason: 0,
            receipt_hash: vec![],
        };

        self.store
            .commit(Tx {
                ops: vec![Op::Log(entry.encode_to_vec())],
                receipts: None,
            })
            .await?;
        *self.directories.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(updated);
        tracing::info!(country = %country, version, by = %actor, "directory updated");
        Ok(true)
    }

    pub fn country(&self) -> &CountryCode {
        self.identity.country()
    }

    fn outbox_key(cc: &CountryCode) -> String {
        format!("outbox:{cc}")
    }

    /// Notified when the outbox towards `cc` has new entries.
    pub fn outbox_signal(&self, cc: &CountryCode) -> Arc<Notify> {
        self.signals.get(&Self::outbox_key(cc))
    }

    /// Notified when `org`'s inbox has new entries.
    pub fn inbox_signal(&self, org: &OrgId) -> Arc<Notify> {
        self.signals.get(&format!("inbox:{org}"))
    }

    fn make_receipt(
        &self,
        stage: Stage,
        id: MessageId,
        hash: EnvelopeHash,
        at: i64,
        index: LogIndex,
        reason: RejectReason,
    ) -> pb::Receipt {
        receipt::sign(
            &pb::ReceiptBody {
                envelope_hash: hash.0.to_vec(),
                message_id: id.as_bytes().to_vec(),
                stage: stage as i32,
                signer: self.identity.to_string(),
                signer_key_id: self.receipt_key.key_id().to_owned(),
                at_ms: at,
                log_index: index,
                reason: reason as i32,
            },
            &self.receipt_key,
        )
    }

    /// Commits a transaction whose receipt is signed by this gateway once the log index of
    /// the `nth` log entry of the transaction is known.
    /// `stages` lists each receipt to sign with the position of its log entry in `ops`;
    /// the first one is returned, and with [`Keep::Stored`] all are stored with the message.
    async fn commit_with_receipt(
        self: &Arc<Self>,
        ops: Vec<Op>,
        stages: &[(Stage, u64)],
        id: MessageId,
        hash: EnvelopeHash,
        reason: RejectReason,
        keep: Keep,
    ) -> Result<Result<pb::Receipt, MessageId>, PipelineError> {
        let (stored, guard) = match keep {
            Keep::Stored(guard) => (true, guard),
            Keep::AnswerOnly => (false, None),
        };
        let at = self.now();
        let me = self.clone();
        let slot = Arc::new(Mutex::new(None));
        let out = slot.clone();
        let stages = stages.to_vec();
        let maker = Box::new(move |first: LogIndex| {
            let receipts: Vec<_> = stages
                .iter()
                .map(|&(stage, nth)| {
                    (
                        id,
                        me.make_receipt(stage, id, hash, at, first + nth, reason),
                    )
                })
                .collect();
            *out.lock().unwrap_or_else(|p| p.into_inner()) = receipts.first().map(|r| r.1.clone());
            if stored {
                receipts
                    .into_iter()
                    .map(|(id, r)| Op::PutReceipt(id, r))
                    .collect()
            } else {
                vec![]
            }
        });
        let tx = Tx {
            ops,
            receipts: Some(maker),
        };
        let outcome = match guard {
            Some(guard) => self.commit_guarded(guard, tx).await?,
            None => self.store.commit(tx).await?,
        };
        match outcome {
            TxOutcome::Exists(id) => Ok(Err(id)),
            TxOutcome::Committed { .. } => {
                let r = slot.lock().unwrap_or_else(|p| p.into_inner()).take();
                r.map(Ok).ok_or_else(|| {
                    PipelineError::Store(StoreError::Engine("receipt not made".into()))
                })
            }
        }
    }

    /// The stored receipt of `stage` signed by this gateway for message `id`, whose stored
    /// envelope hashes to `envelope_hash`.
    fn own_receipt(
        &self,
        id: &MessageId,
        envelope_hash: &[u8],
        stage: Stage,
    ) -> Result<Option<pb::Receipt>, PipelineError> {
        let me = self.identity.to_string();
        for r in self.store.receipts(id)? {
            if let Ok(body) = pb::ReceiptBody::decode(r.body.as_slice()) {
                if body.stage == stage as i32
                    && body.signer == me
                    && body.envelope_hash == envelope_hash
                {
                    return Ok(Some(r));
                }
            }
        }
        Ok(None)
    }

    /// The answer to a repeated envelope: the same receipt if it is the same envelope.
    async fn repeat(
        &self,
        id: &MessageId,
        hash: &EnvelopeHash,
        stage: Stage,
    ) -> Result<pb::Receipt, PipelineError> {
        let stored = self
            .store
            .message_head(id)?
            .ok_or(PipelineError::NotFound)?;
        self.repeat_of(id, &stored, hash, stage)
    }

    /// [`Self::repeat`] for a message whose stored head is read already.
    fn repeat_of(
        &self,
        id: &MessageId,
        stored: &MessageHead,
        hash: &EnvelopeHash,
        stage: Stage,
    ) -> Result<pb::Receipt, PipelineError> {
        if stored.envelope_hash != hash.0 {
            return Err(PipelineError::Conflict);
        }
        self.own_receipt(id, &stored.envelope_hash, stage)?
            .ok_or_else(|| PipelineError::Store(StoreError::Corrupt(id.to_string())))
    }

    pub(crate) fn check_quota(&self) -> Result<(), PipelineError> {
        if self.store.disk_usage()? > self.quota_bytes {
            tracing::warn!(
                quota = self.quota_bytes,
                "store over quota; refusing new envelopes"
            );
            return Err(PipelineError::QuotaFull);
        }
        Ok(())
    }

    /// Logs a refused envelope (hash and id only) and passes the error on.
    async fn refuse(
        &self,
        caller: &SpiffeId,
        hash: Option<EnvelopeHash>,
        err: PipelineError,
    ) -> PipelineError {
        let reason = match &err {
            PipelineError::Refused { reason, .. } => *reason,
            PipelineError::PermissionDenied(_) => RejectReason::SenderMismatch,
            PipelineError::Conflict => RejectReason::Conflict,
            _ => return err,
        };
        let hash = hash.map(|h| h.0.to_vec()).unwrap_or_default();
        tracing::info!(caller = %caller, envelope_hash = %hex_or_none(&hash), ?reason, "envelope refused");
        let entry = pb::LogEntry {
            event: LogEvent::Rejected as i32,
            message_id: vec![],
            envelope_hash: hash,
            actor: caller.to_string(),
            at_ms: self.now(),
            reason: reason as i32,
            receipt_hash: vec![],
        };
        let tx = Tx {
            ops: vec![Op::Log(entry.encode_to_vec())],
            receipts: None,
        };
        if let Err(e) = self.store.commit(tx).await {
            tracing::error!(error = %e, "could not log a refusal");
        }
        err
    }

    /// The limits an envelope (a client's or a peer's) is taken off the wire with, to be
    /// looked up: its ciphertext is held to this gateway's limit only after
    /// ([`SealedEnvelope::fits`]), so that a copy of one held here gets the receipt it got
    /// then, also after an operator lowered the limit. The call's decoding limit bounds
    /// what is hashed meanwhile.
    fn lookup_limits(&self) -> Limits {
        Limits {
            max_ciphertext: usize::MAX,
            ..self.limits
        }
    }

    /// Client submit: the caller must be the envelope's sender. Answers the accepted receipt.
    pub async fn submit(
        self: &Arc<Self>,
        caller: &SpiffeId,
        env: pb::Envelope,
    ) -> Result<pb::Receipt, PipelineError> {
        let sealed = match SealedEnvelope::from_wire(env, &self.lookup_limits()) {
            Ok(s) => s,
            Err(e) => return Err(self.refuse(caller, None, e.into()).await),
        };
        let hash = sealed.hash();
        // A copy of an envelope the caller submitted and this gateway accepted (the answer
        // was lost, a send resumed) gets the receipt it got then, before anything is
        // checked anew: past its expiry, or after a key or the policy changed, it would be
        // refused while the first copy travels on.
        let held = match header_names(sealed.header()).0 {
            Some(id) => self.store.message_head(&id)?.map(|head| (id, head)),
            None => None,
        };
        if let Some((id, stored)) = &held {
            if stored.envelope_hash == hash.0 && stored.sender_org == caller.to_string() {
                return self.repeat_of(id, stored, &hash, Stage::Accepted);
            }
        }
        if let Err(e) = sealed.fits(&self.limits) {
            return Err(self.refuse(caller, Some(hash), e.into()).await);
        }
        match self.check_submit(caller, sealed) {
            Ok(v) => self.accept(v, held.map(|(_, head)| head)).await,
            Err(e) => Err(self.refuse(caller, Some(hash), e).await),
        }
    }

    pub(crate) fn check_submit(
        &self,
        caller: &SpiffeId,
        sealed: SealedEnvelope,
    ) -> Result<(VerifiedEnvelope, Queue), PipelineError> {
        let now = self.now();
        if caller.role() != Role::Org
            || caller.country() != self.country()
            || self.is_auditor(caller)
        {
            return Err(PipelineError::PermissionDenied(format!(
                "{caller} may not submit here"
            )));
        }
        let env = sealed.verify(&self.directories(), now)?;
        if env.sender().spiffe() != caller {
            return Err(PipelineError::PermissionDenied(format!(
                "certificate names {caller} but the envelope's sender is {}",
                env.sender()
            )));
        }
        self.check_policy(&env)?;
        self.check_attachments(&env)?;
        let cc = env.recipient().country();
        let queue = if cc == self.country() {
            Queue::Inbox(env.recipient().clone())
        } else if self.peers.contains(cc) {
            Queue::Outbox(cc.clone())
        } else {
            return Err(PipelineError::Refused {
                reason: RejectReason::NoRoute,
                detail: format!("no peer gateway for country {cc}"),
            });
        };
        Ok((env, queue))
    }

    /// Accepts a checked envelope; `held` is the stored head of a message under its id,
    /// read before.
    async fn accept(
        self: &Arc<Self>,
        (env, queue): (VerifiedEnvelope, Queue),
        held: Option<MessageHead>,
    ) -> Result<pb::Receipt, PipelineError> {
        // Instrumented, not entered: a guard held across an await names this envelope in
        // whatever else runs on the thread meanwhile.
        let span =
            tracing::info_span!("submit", message_id = %env.id(), envelope_hash = %env.hash());
        self.accept_verified(env, queue, held)
            .instrument(span)
            .await
    }

    async fn accept_verified(
        self: &Arc<Self>,
        env: VerifiedEnvelope,
        queue: Queue,
        held: Option<MessageHead>,
    ) -> Result<pb::Receipt, PipelineError> {
        let (id, hash) = (env.id(), env.hash());
        // Another envelope under its id (a copy of its own was answered before the checks).
        if let Some(stored) = held {
            return self.repeat_of(&id, &stored, &hash, Stage::Accepted);
        }
        // A full store says so before it asks for chunks it could not keep.
        self.check_quota()?;
        // Held until the commit: the sweep cannot drop these chunks in between.
        let Some(_chunks_kept) = self.keep_attachments(&env).await? else {
            return Err(PipelineError::ChunksMissing);
        };
        let now = self.now();
        let local = matches!(queue, Queue::Inbox(_));
        let signal = match &queue {
            Queue::Outbox(cc) => Self::outbox_key(cc),
            Queue::Inbox(org) => format!("inbox:{org}"),
        };
        let ops = vec![
            Op::InsertMessage(id, stored(&env, now)),
            Op::Enqueue(queue, env.priority(), QueueEntry::message(&id)),
            entry(
                LogEvent::Submitted,
                Some(&id),
                &hash,
                &env.sender().to_string(),
                now,
            ),
            entry(
                LogEvent::Accepted,
                Some(&id),
                &hash,
                &self.identity.to_string(),
                now,
            ),
        ];
        let mut ops = ops;
        if local {
            ops.push(entry(
                LogEvent::Received,
                Some(&id),
                &hash,
                &self.identity.to_string(),
                now,
            ));
        }
        // Same-country exchange: this gateway is also the receiving one.
        let stages: &[(Stage, u64)] = if local {
            &[(Stage::Accepted, 1), (Stage::Received, 2)]
        } else {
            &[(Stage::Accepted, 1)]
        };
        let receipt = match self
            .commit_with_receipt(
                ops,
                stages,
                id,
                hash,
                RejectReason::Unspecified,
                Keep::Stored(None),
            )
            .await?
        {
            Ok(r) => r,
            Err(_) => return self.repeat(&id, &hash, Stage::Accepted).await,
        };
        tracing::info!("accepted");
        self.signals.wake(&signal);
        Ok(receipt)
    }

    /// An envelope from a peer gateway. Answers a received receipt, or a rejected one.
    pub async fn receive(
        self: &Arc<Self>,
        peer: &SpiffeId,
        env: pb::Envelope,
    ) -> Result<pb::Receipt, PipelineError> {
        let sealed = SealedEnvelope::from_wire(env, &self.lookup_limits())?;
        let hash = sealed.hash();
        let (id, sender) = header_names(sealed.header());
        // Not the calling peer's to deliver (one that copied the bytes on the way): refused
        // before anything is checked, without a receipt. A refusal signed over them (expired,
        // a key not known yet) would stand beside the receipts of the envelope's own
        // sender's gateway, here or later. Logged.
        if sender.is_some_and(|s| s.country() != peer.country()) {
            let denied = PipelineError::PermissionDenied(
                "the envelope's sender is not of your country".into(),
            );
            return Err(self.refuse(peer, Some(hash), denied).await);
        }
        // One copy of a message at a time is taken in, from before its head is read until
        // what the copy commits has landed: a second copy (the peer resending after an
        // answer lost, a restart) would read no head while the first one's commit is on its
        // way, and could be refused (expired since, a key or policy changed) while the first
        // is taken. It is answered "retry", and then gets the first one's receipt. A message
        // held already needs the guard no longer than that read: its copies only read it,
        // so copies naming it cannot hold up its acknowledgement or expiry.
        let mut guard = id.map(|id| self.endings.take(id)).transpose()?;
        let held = match id {
            Some(id) => self.store.message_head(&id)?.map(|head| (id, head)),
            None => None,
        };
        if held.is_some() {
            guard = None;
        }
        // The same envelope again from its sender's country (the answer to the first was
        // lost) gets the receipt it got then, before anything is checked anew: the hash
        // covers every byte, so it is the envelope verified and kept then. Checked anew, it
        // could be refused now (expired, a policy or key changed since), and a refusal would
        // contradict how its delivery went on here, delivered perhaps.
        // From anyone else, a message held here is not theirs to deliver, and no receipt of
        // ours answers it: a refusal signed over it would read as a second ending of a
        // message this gateway sent, received or delivered.
        if let Some((id, stored)) = held.as_ref().filter(|(_, h)| h.envelope_hash == hash.0) {
            let from_sender = stored
                .sender_org
                .parse::<OrgId>()
                .is_ok_and(|s| s.country() == peer.country());
            if !from_sender {
                tracing::warn!(message_id = %id, envelope_hash = %hash, peer = %peer, "a message held here, sent back by a peer not of its sender's country");
                return Err(PipelineError::PermissionDenied(
                    "this envelope is not yours to deliver".into(),
                ));
            }
            return self.repeat_of(id, stored, &hash, Stage::Received);
        }
        sealed.fits(&self.limits)?;
        // Only the header (at most 4 KiB) is kept to name a refusal, not the ciphertext.
        let header = sealed.header().clone();
        let env = match self.admit_from_peer(peer, sealed) {
            Ok(env) => env,
            // Not the calling peer's to deliver (it copied the bytes on the way): a refusal
            // signed over them would stand beside the receipt the sender's own gateway gets
            // for the same envelope, here or later. Logged, and refused without a receipt.
            Err(RejectReason::SenderMismatch) => {
                let denied = PipelineError::PermissionDenied(
                    "the envelope's sender is not of your country".into(),
                );
                return Err(self.refuse(peer, Some(hash), denied).await);
            }
            Err(reason) if self.may_catch_up(&header, reason) => {
                tracing::info!(envelope_hash = %hash, peer = %peer, ?reason, "envelope from peer put off: it may be acceptable soon");
                return Err(PipelineError::NotYet(format!("{reason:?}")));
            }
            Err(reason) => return self.reject_from_peer(peer, &header, hash, reason).await,
        };
        let span = tracing::info_span!(
            "receive", message_id = %env.id(), envelope_hash = %hash, peer = %peer
        );
        let held = held.map(|(_, stored)| stored);
        self.receive_admitted(peer, &header, env, held, guard)
            .instrument(span)
            .await
    }

    /// An envelope from `peer` that passed [`Self::admit_from_peer`]; `header` names a
    /// refusal, `held` is the stored head of a message under its id, read before, and
    /// `guard` holds its id since (none when the header named no id).
    async fn receive_admitted(
        self: &Arc<Self>,
        peer: &SpiffeId,
        header: &HeaderBytes,
        env: VerifiedEnvelope,
        held: Option<MessageHead>,
        guard: Option<EndingGuard>,
    ) -> Result<pb::Receipt, PipelineError> {
        let (id, hash, recipient) = (env.id(), env.hash(), env.recipient().clone());
        if let Some(stored) = held {
            return match self.repeat_of(&id, &stored, &hash, Stage::Received) {
                Err(PipelineError::Conflict) => {
                    self.reject_from_peer(peer, header, hash, RejectReason::Conflict)
                        .await
                }
                other => other,
            };
        }
        // A full store says so before it asks for chunks it could not keep: the peer's
        // forwarder then backs off instead of pushing them.
        self.check_quota()?;
        let Some(_chunks_kept) = self.keep_attachments(&env).await? else {
            // The peer's forwarder pushes the chunks on this answer and delivers again.
            return Err(PipelineError::ChunksMissing);
        };
        let now = self.now();
        let ops = vec![
            Op::InsertMessage(id, stored(&env, now)),
            Op::Enqueue(
                Queue::Inbox(recipient.clone()),
                env.priority(),
                QueueEntry::message(&id),
            ),
            entry(LogEvent::Received, Some(&id), &hash, &peer.to_string(), now),
        ];
        let receipt = match self
            .commit_with_receipt(
                ops,
                &[(Stage::Received, 0)],
                id,
                hash,
                RejectReason::Unspecified,
                Keep::Stored(guard),
            )
            .await?
        {
            Ok(r) => r,
            Err(_) => return self.repeat(&id, &hash, Stage::Received).await,
        };
        tracing::info!("received into inbox");
        self.inbox_signal(&recipient).notify_waiters();
        Ok(receipt)
    }

    /// The checks an envelope from `peer` passes before anything of it is kept: signature
    /// and keys, the sender's country is the peer's, the recipient is ours, our policy, and
    /// the attachment limit. A refusal names its reason.
    pub(crate) fn admit_from_peer(
        &self,
        peer: &SpiffeId,
        sealed: SealedEnvelope,
    ) -> Result<VerifiedEnvelope, RejectReason> {
        let env = sealed
            .verify(&self.directories(), self.now())
            .map_err(|e| e.reason())?;
        if env.sender().country() != peer.country() {
            return Err(RejectReason::SenderMismatch);
        }
        if env.recipient().country() != self.country() {
            return Err(RejectReason::NoRoute);
        }
        // Our policy applies to what arrives too, whatever the sender's side allowed.
        match self
            .check_policy(&env)
            .and_then(|()| self.check_attachments(&env))
        {
            Err(PipelineError::Refused { reason, .. }) => Err(reason),
            _ => Ok(env),
        }
    }

    async fn reject_from_peer(
        self: &Arc<Self>,
        peer: &SpiffeId,
        header: &HeaderBytes,
        hash: EnvelopeHash,
        reason: RejectReason,
    ) -> Result<pb::Receipt, PipelineError> {
        // A rejected receipt needs the message id; without a parseable one, refuse outright.
        let id = header_names(header).0.ok_or(PipelineError::Refused {
            reason,
            detail: "envelope from peer refused".into(),
        })?;
        tracing::warn!(message_id = %id, envelope_hash = %hash, peer = %peer, ?reason, "envelope from peer rejected");
        let ops = vec![Op::Log(
            pb::LogEntry {
                event: LogEvent::Rejected as i32,
                message_id: id.as_bytes().to_vec(),
                envelope_hash: hash.0.to_vec(),
                actor: peer.to_string(),
                at_ms: self.now(),
                reason: reason as i32,
                receipt_hash: vec![],
            }
            .encode_to_vec(),
        )];
        match self
            .commit_with_receipt(
                ops,
                &[(Stage::Rejected, 0)],
                id,
                hash,
                reason,
                Keep::AnswerOnly,
            )
            .await?
        {
            Ok(r) => Ok(r),
            Err(_) => Err(PipelineError::Conflict),
        }
    }

    /// Whether a peer's envelope refused for `reason` may be acceptable soon, without
    /// anything of the peer's changing: its sender's key not in our directory yet (the
    /// peer offers its directory before each delivery), for an envelope made within ten
    /// minutes of now either way; or made ahead of our clock by less than ten minutes past
    /// the allowed skew. Refusing it with a signed receipt, then taking a copy of it sent
    /// again after that answer was lost, would sign two endings of one envelope. Past
    /// these windows the refusal is signed: what has not passed by then is taken to stay.
    fn may_catch_up(&self, header: &HeaderBytes, reason: RejectReason) -> bool {
        let Ok(h) = pb::Header::decode(header.as_bytes()) else {
            return false;
        };
        let now = self.now();
        match reason {
            RejectReason::UnknownSender => {
                now.saturating_sub(h.created_at_ms).abs() < DIRECTORY_CATCH_UP_MS
            }
            RejectReason::ClockSkew => {
                h.created_at_ms
                    < now
                        .saturating_add(accord_proto::envelope::MAX_CLOCK_SKEW_MS)
                        .saturating_add(DIRECTORY_CATCH_UP_MS)
            }
            _ => false,
        }
    }

    /// Whether a peer receipt whose signer key we do not hold may be signed by a key the
    /// peer's next directory brings: only a signer of the peer's own country (the directory
    /// the peer sends before it delivers), and only for a receipt signed within ten minutes
    /// of now, either way. Anything else
    /// would never verify; retrying it would only hold up the peer's outbox.
    fn may_be_catching_up(&self, peer: &SpiffeId, r: &pb::Receipt) -> bool {
        let Ok(body) = pb::ReceiptBody::decode(r.body.as_slice()) else {
            return false;
        };
        let from_peer_country = body
            .signer
            .parse::<SpiffeId>()
            .is_ok_and(|s| s.country() == peer.country() && s.country() != self.country());
        from_peer_country && self.now().saturating_sub(body.at_ms).abs() < DIRECTORY_CATCH_UP_MS
    }

    /// A receipt travelling back from a peer (delivered, or rejected at delivery).
    pub async fn receive_receipt(
        self: &Arc<Self>,
        peer: &SpiffeId,
        r: &pb::Receipt,
    ) -> Result<(), PipelineError> {
        let v = receipt::verify(r, &self.directories()).map_err(|e| match e {
            ReceiptError::UnknownSigner(who) if self.may_be_catching_up(peer, r) => {
                PipelineError::SignerNotKnownYet(who)
            }
            other => other.into(),
        })?;
        // No such message, another envelope under its id, or a message not sent to the
        // peer's country: one answer, so that the peer learns nothing of messages that
        // are not its business, not even whether their ids exist.
        let stored = self
            .store
            .message_head(&v.message_id)?
            .filter(|m| {
                m.envelope_hash == v.envelope_hash.0
                    && m.recipient_org
                        .parse::<OrgId>()
                        .is_ok_and(|r| r.country() == peer.country())
            })
            .ok_or_else(|| {
                PipelineError::BadReceipt("it does not fit a message sent to your country".into())
            })?;
        let signer_ok = match v.stage() {
            Stage::Delivered => v.signer.to_string() == stored.recipient_org,
            Stage::Rejected if v.body.reason == RejectReason::RefusedByRecipient as i32 => {
                v.signer.to_string() == stored.recipient_org
            }
            Stage::Rejected => &v.signer == peer,
            _ => false,
        };
        if !signer_ok || v.signer.country() != peer.country() {
            return Err(PipelineError::BadReceipt(format!(
                "{:?} receipt from {} does not fit",
                v.stage(),
                v.signer
            )));
        }
        // Read the ending, decide, commit: one ending of a message at a time (items of one
        // batch are handled concurrently, and KH may expire what its recipient acks).
        let ending = self.endings.take(v.message_id)?;
        let held = self.store.receipts(&v.message_id)?;
        if held.contains(r) {
            return Ok(()); // a resent receipt: stored and logged once
        }
        // A delivery ends once: a second, different ending (a refusal after a delivery, say)
        // is refused rather than stored beside the first.
        if let Some((ended, _)) = final_stage(&held, &stored) {
            return Err(PipelineError::BadReceipt(format!(
                "the message's delivery already ended as {ended:?}"
            )));
        }
        let ops = vec![
            Op::PutReceipt(v.message_id, r.clone()),
            receipt_entry(LogEvent::Receipt, &v, self.now()),
        ];
        self.commit_guarded(
            ending,
            Tx {
                ops,
                receipts: None,
            },
        )
        .await?;
        tracing::info!(message_id = %v.message_id, stage = ?v.stage(), "receipt from peer stored");
        Ok(())
    }

    /// The role policy's verdict on `env`, from both organisations' directory entries.
    fn check_policy(&self, env: &VerifiedEnvelope) -> Result<(), PipelineError> {
        let dirs = self.directories();
        let refuse = |detail: String| PipelineError::Refused {
            reason: RejectReason::Policy,
            detail,
        };
        let sender = dirs
            .org(env.sender())
            .ok_or_else(|| refuse("the sender is not in the directory".into()))?;
        let recipient = dirs
            .org(env.recipient())
            .ok_or_else(|| refuse("the recipient is not in the directory".into()))?;
        self.policy()
            .authorize(
                crate::policy::Party {
                    org: env.sender(),
                    roles: &sender.roles,
                    province: &sender.province,
                },
                crate::policy::Party {
                    org: env.recipient(),
                    roles: &recipient.roles,
                    province: &recipient.province,
                },
                env.kind(),
            )
            .map_err(refuse)
    }

    /// The organisation whose inbox `caller` may read: itself, unless it is an auditor.
    pub fn inbox_owner(&self, caller: &SpiffeId) -> Result<OrgId, PipelineError> {
        if self.is_auditor(caller) {
            return Err(PipelineError::PermissionDenied(
                "auditors have no inbox".into(),
            ));
        }
        caller
            .clone()
            .try_into()
            .map_err(|_| PipelineError::PermissionDenied("only organisations have inboxes".into()))
    }

    /// The recipient acknowledges with a delivered receipt it signed.
    pub async fn ack(
        self: &Arc<Self>,
        caller: &SpiffeId,
        r: &pb::Receipt,
    ) -> Result<(), PipelineError> {
        let v = receipt::verify(r, &self.directories())?;
        // The recipient ends a delivery by taking it (delivered) or by refusing what it
        // opened (rejected, reason REFUSED_BY_RECIPIENT); either way it leaves the inbox and
        // the sender learns of it.
        let refused = v.stage() == Stage::Rejected
            && v.body.reason == RejectReason::RefusedByRecipient as i32;
        if !(v.stage() == Stage::Delivered || refused) || &v.signer != caller {
            return Err(PipelineError::PermissionDenied(
                "only the recipient's own delivered receipt, or its refusal, acknowledges".into(),
            ));
        }
        // Read the ending, decide, commit: one ending of a message at a time. A recipient
        // quick to acknowledge may find its message's arrival still finishing its commit.
        let ending = (self.endings)
            .take_within(v.message_id, ACK_WAITS_FOR_CHANGE)
            .await?;
        let stored = self
            .store
            .message_head(&v.message_id)?
            .ok_or(PipelineError::NotFound)?;
        if stored.recipient_org != caller.to_string() {
            return Err(PipelineError::NotFound);
        }
        if stored.envelope_hash != v.envelope_hash.0 {
            return Err(PipelineError::BadReceipt(
                "envelope hash does not match the message".into(),
            ));
        }
        match final_stage(&self.store.receipts(&v.message_id)?, &stored) {
            // Acknowledged before the same way: nothing to redo. (An expiry is a REJECTED
            // too, but not the recipient's refusal.)
            Some((s, reason)) if s == v.stage() && reason == v.body.reason => return Ok(()),
            Some((s, _)) => {
                return Err(PipelineError::FailedPrecondition(format!(
                    "the message's delivery already ended as {s:?}"
                )))
            }
            None => {}
        }
        let org: OrgId = caller
            .clone()
            .try_into()
            .map_err(|_| PipelineError::NotFound)?;
        let sender: OrgId = stored
            .sender_org
            .parse()
            .map_err(|_| StoreError::Corrupt(v.message_id.to_string()))?;
        let mut ops = vec![
            Op::RemoveFromInbox(org, v.message_id),
            Op::PutReceipt(v.message_id, r.clone()),
            receipt_entry(
                if refused {
                    LogEvent::Rejected
                } else {
                    LogEvent::Delivered
                },
                &v,
                self.now(),
            ),
        ];
        let remote = sender.country() != self.country();
        if remote {
            ops.push(Op::Enqueue(
                Queue::Outbox(sender.country().clone()),
                pb::Priority::Urgent,
                QueueEntry::receipt(&v.message_id, r.clone()),
            ));
        }
        self.commit_guarded(
            ending,
            Tx {
                ops,
                receipts: None,
            },
        )
        .await?;
        tracing::info!(message_id = %v.message_id, stage = ?v.stage(), "delivery ended by the recipient");
        self.drop_attachments_of(&stored).await;
        if remote {
            self.signals.wake(&Self::outbox_key(sender.country()));
        }
        Ok(())
    }

    /// Up to `max` envelopes waiting for `caller`, oldest first within priority. Expired
    /// ones are taken out and answered to their sender with a rejected receipt instead.
    pub async fn inbox(
        self: &Arc<Self>,
        caller: &SpiffeId,
        max: usize,
    ) -> Result<Vec<pb::InboxItem>, PipelineError> {
        let items = self
            .inbox_except(caller, max, &std::collections::HashSet::new())
            .await?;
        Ok(items.into_iter().map(|(_, item)| item).collect())
    }

    /// The queue keys of the first `max` entries of `caller`'s inbox.
    pub fn inbox_keys(
        &self,
        caller: &SpiffeId,
        max: usize,
    ) -> Result<std::collections::HashSet<QueueKey>, PipelineError> {
        let org = self.inbox_owner(caller)?;
        Ok(self
            .store
            .queue(&Queue::Inbox(org), max)?
            .into_iter()
            .map(|(key, _)| key)
            .collect())
    }

    /// Up to `max` envelopes waiting for `caller` that are not among `seen` (queue keys a
    /// live subscription already sent), in inbox order, with their keys. Entries in `seen`
    /// are skipped before their messages are read, so a subscription with many envelopes
    /// awaiting acknowledgement pays for the new ones only.
    pub async fn inbox_except(
        self: &Arc<Self>,
        caller: &SpiffeId,
        max: usize,
        seen: &std::collections::HashSet<QueueKey>,
    ) -> Result<Vec<(QueueKey, pb::InboxItem)>, PipelineError> {
        let org = self.inbox_owner(caller)?;
        let now = self.now();
        let mut items = Vec::new();
        let mut bytes = 0;
        let entries = self
            .store
            .queue(&Queue::Inbox(org.clone()), seen.len() + max)?;
        for (key, entry) in entries {
            if seen.contains(&key) {
                continue;
            }
            if items.len() == max {
                break;
            }
            let id = MessageId::from_slice(&entry.message_id)
                .map_err(|_| StoreError::Corrupt("inbox".into()))?;
            let Some(msg) = self.store.message(&id)? else {
                continue;
            };
            if now >= msg.head.expires_at_ms {
                self.expire(&org, id, &msg.head).await?;
                continue;
            }
            bytes += msg.envelope.as_ref().map_or(0, |e| {
                e.header.len() + e.ciphertext.len() + e.signature.len()
            });
            if !items.is_empty() && bytes > MAX_FETCH_BYTES {
                break; // the rest waits for the next fetch
            }
            let received = self.own_receipt(&id, &msg.head.envelope_hash, Stage::Received)?;
            items.push((
                key,
                pb::InboxItem {
                    envelope: msg.envelope,
                    envelope_hash: msg.head.envelope_hash,
                    received,
                },
            ));
        }
        Ok(items)
    }

    async fn expire(
        self: &Arc<Self>,
        org: &OrgId,
        id: MessageId,
        msg: &MessageHead,
    ) -> Result<(), PipelineError> {
        // An ack being committed ends it first; one committed since the inbox was read
        // ended it already. Either way it is not expired too.
        let dequeue = Op::RemoveFromInbox(org.clone(), id);
        let expiry = Ending::Retire(RejectReason::Expired);
        match self.end_once(id, msg, dequeue, expiry).await {
            Ok(true) => {}
            Ok(false) | Err(PipelineError::EndingInProgress) => return Ok(()),
            Err(e) => return Err(e),
        }
        tracing::info!(message_id = %id, "expired before delivery");
        self.drop_attachments_of(msg).await;
        // The rejected receipt waits in the outbox towards the sender's country.
        if let Ok(sender) = msg.sender_org.parse::<OrgId>() {
            self.signals.wake(&Self::outbox_key(sender.country()));
        }
        Ok(())
    }

    /// Ends the delivery of message `id` (`ending`), with its queue entry leaving in the
    /// same transaction (`dequeue`), unless the delivery ended already: a peer whose answer
    /// was lost (a dropped link, a stop past the forwarder's grace) may have taken and
    /// delivered it, and its DELIVERED or REJECTED receipt come back since; or a recipient
    /// acknowledged it while it expired. Then only `dequeue` commits, and no second,
    /// contrary ending is signed or stored. Whether `ending` was committed;
    /// `EndingInProgress` while another ending of it is decided.
    pub(crate) async fn end_once(
        self: &Arc<Self>,
        id: MessageId,
        msg: &MessageHead,
        dequeue: Op,
        ending: Ending,
    ) -> Result<bool, PipelineError> {
        let guard = self.endings.take(id)?;
        if let Some((ended, _)) = final_stage(&self.store.receipts(&id)?, msg) {
            tracing::info!(message_id = %id, stage = ?ended, "ended already: its entry leaves without a second ending");
            let tx = Tx {
                ops: vec![dequeue],
                receipts: None,
            };
            self.commit_guarded(guard, tx).await?;
            return Ok(false);
        }
        let tx = match ending {
            Ending::Retire(reason) => self.retire(id, msg, reason, dequeue)?,
            Ending::Peer { receipt, log } => Tx {
                ops: vec![dequeue, Op::PutReceipt(id, receipt), Op::Log(log)],
                receipts: None,
            },
        };
        self.commit_guarded(guard, tx).await?;
        Ok(true)
    }

    /// Commits the transaction of a change (an ending, an arrival) decided under `guard`,
    /// and holds the guard until the commit lands ([`GuardedCommit`]).
    fn commit_guarded(&self, guard: EndingGuard, tx: Tx) -> GuardedCommit {
        GuardedCommit {
            commit: Some(self.store.commit(tx)),
            guard: Some(guard),
        }
    }

    /// The one transaction that retires an envelope this gateway will not deliver (expired,
    /// or refused by the peer): an EXPIRED or REJECTED log entry, a REJECTED receipt with
    /// `reason` naming it, and, when the sender is abroad, that receipt's entry in the outbox
    /// towards the sender's country, all in one durable batch.
    fn retire(
        self: &Arc<Self>,
        id: MessageId,
        msg: &MessageHead,
        reason: RejectReason,
        dequeue: Op,
    ) -> Result<Tx, PipelineError> {
        let corrupt = || StoreError::Corrupt(id.to_string());
        let hash = EnvelopeHash::from_slice(&msg.envelope_hash).map_err(|_| corrupt())?;
        let sender: OrgId = msg.sender_org.parse().map_err(|_| corrupt())?;
        let at = self.now();
        let log = Op::Log(
            pb::LogEntry {
                event: if reason == RejectReason::Expired {
                    LogEvent::Expired
                } else {
                    LogEvent::Rejected
                } as i32,
                message_id: id.as_bytes().to_vec(),
                envelope_hash: hash.0.to_vec(),
                actor: self.identity.to_string(),
                at_ms: at,
                reason: reason as i32,
                receipt_hash: vec![],
            }
            .encode_to_vec(),
        );
        let me = self.clone();
        let abroad = (sender.country() != self.country()).then(|| sender.country().clone());
        let maker = Box::new(move |index: LogIndex| {
            let r = me.make_receipt(Stage::Rejected, id, hash, at, index, reason);
            let mut ops = vec![Op::PutReceipt(id, r.clone())];
            if let Some(cc) = abroad {
                let back = QueueEntry::receipt(&id, r);
                ops.push(Op::Enqueue(Queue::Outbox(cc), pb::Priority::Urgent, back));
            }
            ops
        });
        Ok(Tx {
            ops: vec![dequeue, log],
            receipts: Some(maker),
        })
    }

    /// Every receipt of a message the caller sent or received.
    pub async fn status(
        &self,
        caller: &SpiffeId,
        id: &MessageId,
    ) -> Result<pb::StatusResponse, PipelineError> {
        let msg = self
            .store
            .message_head(id)?
            .ok_or(PipelineError::NotFound)?;
        let me = caller.to_string();
        if msg.sender_org != me && msg.recipient_org != me {
            return Err(PipelineError::NotFound);
        }
        Ok(pb::StatusResponse {
            envelope_hash: msg.envelope_hash,
            receipts: self.store.receipts(id)?,
        })
    }
}

/// The message id and the sender an envelope's header names, where they parse: before the
/// envelope is verified, only to look it up, to turn away a peer not of the sender's
/// country, or to name a refusal.
fn header_names(header: &HeaderBytes) -> (Option<MessageId>, Option<OrgId>) {
    let Ok(h) = pb::Header::decode(header.as_bytes()) else {
        return (None, None);
    };
    (
        MessageId::from_slice(&h.message_id).ok(),
        h.sender_org.parse().ok(),
    )
}

/// How the message's delivery ended, if one of its receipts `held` says so: DELIVERED or
/// REJECTED, and the receipt's reason.
fn final_stage(held: &[pb::Receipt], stored: &MessageHead) -> Option<(Stage, i32)> {
    held.iter().find_map(|r| {
        let body = pb::ReceiptBody::decode(r.body.as_slice()).ok()?;
        if body.envelope_hash != stored.envelope_hash {
            return None;
        }
        match pb::Stage::try_from(body.stage) {
            Ok(s @ (Stage::Delivered | Stage::Rejected)) => Some((s, body.reason)),
            _ => None,
        }
    })
}

fn stored(env: &VerifiedEnvelope, now: i64) -> StoredMessage {
    StoredMessage {
        envelope: Some(env.to_wire()),
        head: MessageHead {
            envelope_hash: env.hash().0.to_vec(),
            sender_org: env.sender().to_string(),
            recipient_org: env.recipient().to_string(),
            stored_at_ms: now,
            expires_at_ms: env.expires_at(),
            no_attachments: env.attachments().is_empty(),
        },
    }
}

fn hex_or_none(b: &[u8]) -> String {
    if b.is_empty() {
        "-".into()
    } else {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// An acknowledgement quick on the heels of its message's arrival waits for the
    /// arrival's guard to go, rather than failing; past its limit it is told to retry.
    #[tokio::test(start_paused = true)]
    async fn a_change_waits_for_the_one_being_committed_within_its_limit() {
        let endings = Endings::default();
        let id = MessageId::new_v7(1_000, [7; 10]);
        let arrival = endings.take(id).unwrap();
        assert!(matches!(
            endings.take(id),
            Err(PipelineError::EndingInProgress)
        ));
        let short = endings.take_within(id, Duration::from_millis(50)).await;
        assert!(matches!(short, Err(PipelineError::EndingInProgress)));

        let landing = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            drop(arrival);
        });
        let started = tokio::time::Instant::now();
        let ack = endings.take_within(id, Duration::from_secs(2)).await;
        assert!(ack.is_ok(), "taken once the arrival's guard went");
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert!(
            started.elapsed() < Duration::from_millis(400),
            "taken soon after it went"
        );
        landing.await.unwrap();
        assert!(matches!(
            endings.take(id),
            Err(PipelineError::EndingInProgress)
        ));
        drop(ack);
        assert!(endings.take(id).is_ok());
    }
}
