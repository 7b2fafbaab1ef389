//! Drains one peer's outbox over the peer link: batches in priority order (entries the peer
//! put off past the hold bound last), retries with exponential backoff and full jitter, and
//! never drops an entry before the peer answered it. The receiving side is idempotent by message id, so a batch resent after a lost answer
//! delivers nothing twice.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use accord_proto::ids::{EnvelopeHash, MessageId, SpiffeId};
use accord_proto::pb::{self, peer_link_client::PeerLinkClient, LogEvent, Stage};
use accord_proto::receipt;
use futures::{FutureExt, StreamExt};
use prost::Message;
use tokio::sync::watch;

use crate::config::ForwarderConfig;
use crate::pipeline::{Ending, Pipeline, PipelineError};
use crate::service::{RETRY_QUOTA_FULL, RETRY_STORAGE_ERROR};
use crate::store::{MessageHead, Op, Queue, QueueEntry, QueueKey, StoreError, Tx};

/// An outbox entry in a batch on its way to the peer, kept to settle it on the answer.
struct Sent {
    key: QueueKey,
    entry: QueueEntry,
    id: MessageId,
    /// Set when the entry is an envelope (not a receipt travelling back).
    envelope: Option<SentEnvelope>,
    /// Whether this call marked the entry as one the peer may hold ([`Op::SetSent`]): no
    /// call before it reached the peer.
    marked_here: bool,
}

/// What settling a sent envelope needs of its stored message, kept from the read that sent
/// it.
struct SentEnvelope {
    hash: Vec<u8>,
    /// Its header lists attachments: their chunks go once the peer has it.
    attached: bool,
}

/// Why a batch could not be delivered; decides how the forwarder retries.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ForwardError {
    /// The peer is unreachable or answered with a transient status: back off and retry.
    #[error("peer unavailable: {0}")]
    Unavailable(String),
    /// Our own store failed: back off and retry.
    #[error("store: {0}")]
    Store(#[from] StoreError),
}

/// Delay before retry number `attempt` (0-based): `min(max, initial·2^attempt)`, scaled by
/// `jitter` in [0, 1] into its upper half, so retries of many gateways spread out.
pub fn backoff(cfg: &ForwarderConfig, attempt: u32, jitter: f64) -> Duration {
    let exp = cfg
        .initial_backoff_ms
        .saturating_mul(1u64 << attempt.min(30))
        .min(cfg.max_backoff_ms);
    let jitter = jitter.clamp(0.0, 1.0);
    Duration::from_millis(exp / 2 + ((exp / 2) as f64 * jitter) as u64)
}

fn jitter() -> f64 {
    accord_proto::crypto::random::<2>()
        .map(|b| u16::from_be_bytes(b) as f64 / u16::MAX as f64)
        .unwrap_or(0.5)
}

/// How long a Deliver call carrying `bytes` of envelopes may go unanswered:
/// `call_timeout_ms`, plus a second per MiB.
fn call_limit(cfg: &ForwarderConfig, bytes: usize) -> Duration {
    Duration::from_millis(cfg.call_timeout_ms) + Duration::from_secs((bytes >> 20) as u64)
}

/// How many rounds of calls ([`Link::mark_ahead`]) are marked, at most, by the commit that
/// marks a call's entries. At 64 senders, a commit before every call cost about 9% of the
/// end-to-end throughput and doubled its p50; one for every fifth call, about 5%; one for
/// every ninth, nothing beyond the noise (docs/performance.md, "A delivery ends once").
const MARK_AHEAD: usize = 4;

/// A commit of marks ([`Op::SetSent`]), and whether it landed.
type Marks = futures::future::Shared<futures::future::BoxFuture<'static, bool>>;

/// How long a stopping forwarder waits for the peer to answer the calls it has out.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Runs until `shutdown` turns true.
pub async fn run(
    pipeline: Arc<Pipeline>,
    peer: SpiffeId,
    client: PeerLinkClient<tonic::transport::Channel>,
    cfg: ForwarderConfig,
    mut shutdown: watch::Receiver<bool>,
) {
    let signal = pipeline.outbox_signal(peer.country());
    let mut link = Link {
        queue: Queue::Outbox(peer.country().clone()),
        pipeline,
        peer,
        client,
        cfg,
        offered: None,
        pushes: Arc::new(Pushes::default()),
        retries: Retries::default(),
        flights: VecDeque::new(),
        premarked: Default::default(),
        working: false,
    };
    // Failed rounds in a row (the link, our store), and rounds in a row the peer's store
    // took nothing: two backoffs, so that a link that failed for a while does not make the
    // first "quota full" after it wait the longest, nor the other way round.
    let (mut attempt, mut full_attempt) = (0u32, 0u32);
    loop {
        if *shutdown.borrow() {
            break;
        }
        let notified = signal.notified();
        let round = tokio::select! {
            round = link.step() => round,
            // A stop does not wait for the oldest call's answer (up to its limit): every
            // call out gets the grace below.
            () = crate::server::wait_for(shutdown.clone()) => break,
        };
        if matches!(round, Ok(Round::BackOff) | Err(_)) {
            // The link waits: first every call still out is answered and settled.
            tokio::select! {
                () = link.land_all() => {}
                () = crate::server::wait_for(shutdown.clone()) => break,
            }
            // No call is out: what was marked ahead did not go, and may expire here while
            // the link waits.
            if let Err(e) = link.unmark_ahead(Vec::new()).await {
                tracing::warn!(peer = %link.peer, error = %e, "entries marked ahead stay marked: the peer's answer will end them");
            }
        }
        match &round {
            Ok(Round::Sent) | Err(_) => {}
            Ok(r) => {
                attempt = 0;
                if *r == Round::Again {
                    full_attempt = 0;
                }
            }
        }
        let delay = match round {
            // Nothing to send and no call out.
            Ok(Round::Idle) if link.flights.is_empty() => {
                // New entries, or the first held one due again, or a look every second.
                let wait = link
                    .retries
                    .next_due()
                    .map_or(Duration::from_secs(1), |due| {
                        due.saturating_duration_since(tokio::time::Instant::now())
                            .min(Duration::from_secs(1))
                    });
                tokio::select! {
                    _ = notified => {}
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.changed() => {}
                }
                continue;
            }
            Ok(Round::BackOff) => {
                // The peer's store takes no envelope now (its quota, a storage error): the
                // link waits out its backoff, longer each time until an envelope goes
                // through. New entries do not cut it short: the full store would refuse
                // them too, FLASH alerts included. Held entries coming due wait as well.
                let d = backoff(&link.cfg, full_attempt, jitter());
                tracing::warn!(peer = %link.peer, held = link.retries.held(), retry_in_ms = d.as_millis() as u64, "peer's store takes no envelope now");
                full_attempt = full_attempt.saturating_add(1);
                d
            }
            // A batch went out, entries moved, a full batch was held back, or calls are
            // still out: go on at once.
            Ok(Round::Sent | Round::Again | Round::ReadOn | Round::Idle) => continue,
            Err(e) => {
                let d = backoff(&link.cfg, attempt, jitter());
                tracing::warn!(peer = %link.peer, error = %e, retry_in_ms = d.as_millis() as u64, "forwarding failed");
                attempt = attempt.saturating_add(1);
                d
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.changed() => {}
        }
    }
    // Calls still out are answered and settled first, within a grace: a peer's answer lost
    // here leaves its envelopes unsettled until the next start. Past the grace, the calls
    // are dropped and their entries go again then.
    if tokio::time::timeout(SHUTDOWN_GRACE, link.land_all())
        .await
        .is_err()
    {
        tracing::warn!(peer = %link.peer, "calls to the peer still out at shutdown: sent again at the next start");
    }
    if let Err(e) = link.unmark_ahead(Vec::new()).await {
        tracing::warn!(peer = %link.peer, error = %e, "entries marked ahead stay marked: the peer's answer will end them");
    }
    link.pushes.stop().await;
}

/// What one step of [`Link::step`] came to, which decides when the next one runs.
#[derive(Debug, PartialEq, Eq)]
enum Round {
    /// A batch went out, and the link may take another: read on at once. Whether the link
    /// works is known when it is answered.
    Sent,
    /// Nothing more to send now (or all of it held back): wait for new entries or the
    /// first held one due again.
    Idle,
    /// Entries left the outbox or moved to its back: the link works, and there may be more
    /// behind them, so go on at once.
    Again,
    /// A full batch was held back, and nothing else moved: there may be more behind it, so
    /// go on at once, without counting the link as working. Each held entry waits out its
    /// own backoff, so this resends nothing sooner; it only reads past what was held.
    ReadOn,
    /// The peer put off entries for a reason of its own as a whole (its quota, its store),
    /// and took no envelope: the link backs off.
    BackOff,
}

/// One peer's forwarder: its outbox, and what it keeps from one batch to the next.
struct Link {
    pipeline: Arc<Pipeline>,
    peer: SpiffeId,
    queue: Queue,
    client: PeerLinkClient<tonic::transport::Channel>,
    cfg: ForwarderConfig,
    /// The directory last offered to the peer.
    offered: Option<pb::SignedDirectory>,
    pushes: Arc<Pushes>,
    retries: Retries,
    /// Deliver calls out on the link, oldest first; at most `cfg.in_flight`.
    flights: VecDeque<Flight>,
    /// Outbox entries marked as ones the peer may hold ahead of the call that will carry
    /// them ([`Link::send`]), each with the commit that marks it, which that call waits
    /// for: most calls need no commit of their own before they go. None of them went yet.
    /// Unmarked when the link finds the peer unreachable, before it backs off, and when
    /// the forwarder stops. At most three times `MARK_AHEAD × in_flight × batch` keys
    /// ([`Link::mark_ahead`]).
    premarked: std::collections::HashMap<QueueKey, Marks>,
    /// A call answered lately moved entries, so the link works and more than one call may
    /// go out. From the start, after a quiet spell, after a failure, and after a peer whose
    /// store took nothing ("quota full"), one call at a time tries it: a full or
    /// unreachable peer gets one batch per backoff.
    working: bool,
}

impl Drop for Link {
    /// However the forwarder ends (stopped, aborted, a panic), no push of it runs on
    /// holding the store.
    fn drop(&mut self) {
        self.pushes
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .abort_all();
    }
}

/// A Deliver call out on the link. It runs in a task of its own, so that the next batch is
/// read and sent while the peer stores this one. Dropped (the forwarder stopping), the call
/// is cancelled: its entries stay in the outbox and go again, and the peer takes each
/// message once.
struct Flight {
    sent: Vec<Sent>,
    /// The batch stopped at its count or its bytes: more entries may wait behind it.
    full: bool,
    /// Entries were settled while the batch was read (an expiry, a vanished message).
    progressed: bool,
    answer: tokio::task::JoinHandle<Result<pb::DeliverResponse, tonic::Status>>,
    /// What the call's task ended with, once it did ([`Flight::done`]).
    outcome: Option<Result<Result<pb::DeliverResponse, tonic::Status>, tokio::task::JoinError>>,
}

impl Flight {
    /// Waits until the call is answered or failed. A wait cancelled (the forwarder told to
    /// stop) leaves the flight as it was, to be waited for again.
    async fn done(&mut self) {
        if self.outcome.is_none() {
            self.outcome = Some((&mut self.answer).await);
        }
    }
}

impl Drop for Flight {
    fn drop(&mut self) {
        self.answer.abort();
    }
}

/// A batch read off the outbox, not sent yet.
struct Batch {
    sent: Vec<Sent>,
    items: Vec<pb::PeerItem>,
    /// Its envelopes' encoded bytes.
    bytes: usize,
    full: bool,
    progressed: bool,
}

impl Link {
    /// Sends the next batch while the link has room for another call, or else settles the
    /// oldest call out.
    async fn step(&mut self) -> Result<Round, ForwardError> {
        // More than one call goes out only on a link known to work, and only behind a full
        // one: a batch that is not full leaves nothing behind it.
        let most = if self.working {
            self.cfg.in_flight.max(1)
        } else {
            1
        };
        let room = self.flights.len() < most && self.flights.back().is_none_or(|f| f.full);
        let mut progressed = false;
        if room {
            let batch = self.read().await?;
            if !batch.items.is_empty() {
                // A store that stopped taking commits may hold on disk an unmark it answered
                // as failed, replayed at the next start: an entry that reads as marked here
                // may then read as never sent, and expire here. Nothing goes until a restart.
                if let Some(why) = self.pipeline.store.stopped() {
                    return Err(StoreError::Engine(why).into());
                }
                self.send(batch).await;
                return Ok(Round::Sent);
            }
            if self.flights.is_empty() {
                if batch.progressed {
                    return Ok(Round::Again);
                }
                // The link goes quiet: after it, one call tries it again first.
                self.working = false;
                return Ok(Round::Idle);
            }
            progressed = batch.progressed;
        }
        let oldest = self
            .flights
            .front_mut()
            .expect("no room for a call means one is out");
        // Waited for in its place, so that a stop meanwhile still finds it out.
        oldest.done().await;
        let flight = self.flights.pop_front().expect("waited for above");
        // Entries the read settled (expired, vanished) count as moved too.
        Ok(match self.land(flight).await? {
            Round::Idle if progressed => Round::Again,
            round => round,
        })
    }

    /// Settles every call still out, logging what fails: the link is about to wait, and
    /// afterwards one call tries it first.
    async fn land_all(&mut self) {
        while let Some(oldest) = self.flights.front_mut() {
            oldest.done().await;
            let flight = self.flights.pop_front().expect("waited for above");
            if let Err(e) = self.land(flight).await {
                tracing::warn!(peer = %self.peer, error = %e, "forwarding failed");
            }
        }
        self.working = false;
    }

    /// Reads the next batch off the outbox, past the entries of calls out, those held back
    /// and those waiting for their chunks; settles entries that expired or whose message
    /// is gone.
    async fn read(&mut self) -> Result<Batch, ForwardError> {
        let (pipeline, cfg, pushes) = (&self.pipeline, &self.cfg, &self.pushes);
        let out: std::collections::HashSet<&QueueKey> = self
            .flights
            .iter()
            .flat_map(|f| f.sent.iter().map(|s| &s.key))
            .collect();
        // Entries waiting for their chunks to reach the peer, held back after the peer
        // asked to retry them, or out in a call, are skipped, so read past them: a batch of
        // others still goes.
        let limit = cfg.batch + pushes.waiting() + self.retries.held() + out.len();
        let entries = pipeline.store.queue(&self.queue, limit)?;
        self.retries.keep_only(&entries, limit);
        let mut batch = Batch {
            sent: Vec::new(),
            items: Vec::new(),
            bytes: 0,
            full: false,
            progressed: false,
        };
        let now = pipeline.now();
        let mut envelope_bytes = 0;
        for (key, entry) in entries {
            if batch.items.len() == cfg.batch || envelope_bytes >= cfg.batch_bytes {
                batch.full = true;
                break;
            }
            if out.contains(&key) {
                continue;
            }
            // Deferred entries sort last, and wait out their own backoff together: resent
            // in every round that has room, they would go again with every new entry.
            if entry.deferred && !self.retries.deferred_due() {
                break;
            }
            // Before anything is read: a held envelope's expiry is noticed once its hold
            // ends (at most `max_backoff_ms` late), a deferred one's when a round has room
            // for it.
            if self.retries.holds_back(&key) {
                continue;
            }
            let id = MessageId::from_slice(&entry.message_id)
                .map_err(|_| StoreError::Corrupt("outbox entry".into()))?;
            let mut envelope = None;
            let item = match &entry.receipt {
                Some(r) => pb::peer_item::Item::Receipt(r.clone()),
                None => {
                    let msg = pipeline.store.message(&id)?;
                    let Some(mut msg) = msg else {
                        settle(pipeline, key).await?;
                        batch.progressed = true;
                        continue;
                    };
                    // Expired before it ever left: no one else may hold it, and its sender
                    // learns now. One that may have reached the peer goes again instead,
                    // and the peer's answer ends it: the receipt it gave then, or its
                    // rejection as expired.
                    if now >= msg.head.expires_at_ms && !entry.may_have_left() {
                        let expired = Ending::Retire(pb::RejectReason::Expired);
                        if end_once(pipeline, key, id, &msg.head, expired).await? {
                            pushes.forget(&msg.head.envelope_hash);
                            batch.progressed = true;
                        }
                        continue;
                    }
                    // Its chunks are on their way to the peer (or the push is backing off):
                    // delivered once they are there.
                    if pushes.holds_back(&msg.head.envelope_hash) {
                        continue;
                    }
                    let Some(env) = msg.envelope.take() else {
                        continue;
                    };
                    // Records from before the head said so: the header in hand tells.
                    let attached = msg.head.lists_attachments()
                        && pb::Header::decode(&env.header[..])
                            .map_or(true, |h| !h.attachments.is_empty());
                    envelope = Some(SentEnvelope {
                        hash: msg.head.envelope_hash,
                        attached,
                    });
                    envelope_bytes += env.encoded_len();
                    pb::peer_item::Item::Envelope(env)
                }
            };
            batch.items.push(pb::PeerItem { item: Some(item) });
            batch.sent.push(Sent {
                key,
                entry,
                id,
                envelope,
                marked_here: false,
            });
        }
        // The last entry read may have closed the batch.
        batch.full |= batch.items.len() == cfg.batch || envelope_bytes >= cfg.batch_bytes;
        batch.bytes = envelope_bytes;
        Ok(batch)
    }

    /// Puts `batch` on the link in a call of its own.
    async fn send(&mut self, mut batch: Batch) {
        // Envelopes may be signed under keys of a directory version the peer has not seen
        // yet (a rotation): offer it first, or the peer would reject them as UNKNOWN_SENDER
        // for good.
        let own = self.pipeline.own_signed_directory();
        if own != self.offered {
            let offer = self
                .pipeline
                .exchange_directories(&self.peer, &mut self.client);
            // A peer that never answers holds the link no longer than an unanswered call.
            let answer = tokio::time::timeout(call_limit(&self.cfg, 0), offer)
                .await
                .unwrap_or_else(|_| Err(PipelineError::Unavailable("no answer".into())));
            match answer {
                Ok(_) => {
                    self.offered = own;
                    // What the peer could not check (receipts signed under keys it did not
                    // hold yet) may pass now: held entries go again from the next round.
                    self.retries.release_all();
                }
                Err(e) => {
                    tracing::warn!(peer = %self.peer, error = %e, "directory not exchanged before delivery")
                }
            }
        }
        // Marked before they go: whatever becomes of the answer, the peer may hold them from
        // now on, and only its word ends their delivery (not this gateway's expiry).
        let mut unmarked: Vec<Op> = Vec::new();
        // The commits this call waits for: its own, and those that marked its entries ahead.
        let mut marks: Vec<Marks> = Vec::new();
        for s in batch.sent.iter_mut() {
            if let Some(marked) = self.premarked.remove(&s.key) {
                s.marked_here = true;
                marks.push(marked);
            } else if s.envelope.is_some() && !s.entry.may_have_left() {
                (s.entry.unsent, s.marked_here) = (false, true);
                unmarked.push(Op::SetSent(s.key.clone(), true));
            }
        }
        if !unmarked.is_empty() {
            // On a working link, the entries the next calls will likely carry are marked in
            // the same commit. It is handed to the store now, before any later commit (an
            // unmark, the next call's marks): one writer takes commits in the order given.
            let ahead = if self.working {
                self.mark_ahead(&batch.sent)
            } else {
                Vec::new()
            };
            unmarked.extend(ahead.iter().map(|key| Op::SetSent(key.clone(), true)));
            let commit = self.pipeline.store.commit(Tx {
                ops: unmarked,
                receipts: None,
            });
            let landed: Marks = commit.map(|done| done.is_ok()).boxed().shared();
            for key in ahead {
                self.premarked.insert(key, landed.clone());
            }
            marks.push(landed);
        }
        let mut client = self.client.clone();
        let request = pb::DeliverRequest { items: batch.items };
        let limit = call_limit(&self.cfg, batch.bytes);
        // The marks' sync is waited for in the call's task, while the next batch is read:
        // nothing goes before the marks of what it carries are on disk.
        let answer = tokio::spawn(async move {
            for landed in marks {
                if !landed.await {
                    return Err(tonic::Status::unavailable(
                        "not sent: the entries could not be marked as sent",
                    ));
                }
            }
            match tokio::time::timeout(limit, client.deliver(request)).await {
                Ok(answer) => answer.map(tonic::Response::into_inner),
                Err(_) => Err(tonic::Status::deadline_exceeded(format!(
                    "no answer within {} ms",
                    limit.as_millis()
                ))),
            }
        });
        self.flights.push_back(Flight {
            sent: batch.sent,
            full: batch.full,
            progressed: batch.progressed,
            answer,
            outcome: None,
        });
    }

    /// Up to `MARK_AHEAD × in_flight × batch` envelope entries behind `sending` that never
    /// went, to be marked with `sending`'s own.
    fn mark_ahead(&mut self, sending: &[Sent]) -> Vec<QueueKey> {
        let most = MARK_AHEAD * self.cfg.in_flight.max(1) * self.cfg.batch;
        let out: std::collections::HashSet<&QueueKey> = self
            .flights
            .iter()
            .flat_map(|f| f.sent.iter())
            .chain(sending)
            .map(|s| &s.key)
            .collect();
        let limit = out.len() + self.retries.held() + most;
        let Ok(entries) = self.pipeline.store.queue(&self.queue, limit) else {
            return Vec::new();
        };
        // Keys that went behind what is read (entries of a higher priority came: the
        // receipt of every acknowledgement here, or held entries released) stay in the map,
        // so that an unmark still takes them back; only those read count against the room
        // for more. Past twice the most, the ones not read (behind, or gone from the
        // outbox) are forgotten: they stay marked and the peer's answer ends them. Unmarked
        // now, one could be carried before the unmark landed by a call that took it for
        // marked.
        let read: std::collections::HashSet<&QueueKey> = entries.iter().map(|(k, _)| k).collect();
        if self.premarked.len() > 2 * most {
            self.premarked.retain(|k, _| read.contains(k));
        }
        let counted = self.premarked.keys().filter(|k| read.contains(k)).count();
        let room = most.saturating_sub(counted);
        let ahead: Vec<QueueKey> = entries
            .into_iter()
            .filter(|(key, entry)| {
                entry.receipt.is_none()
                    && !entry.may_have_left()
                    && !out.contains(key)
                    && !self.premarked.contains_key(key)
                    && !self.retries.holds_back(key)
            })
            .map(|(key, _)| key)
            .take(room)
            .collect();
        ahead
    }

    /// Unmarks the entries marked ahead, and `also`: none of them went. Those marked ahead
    /// stay counted until the unmark lands, which is after their marks (handed to the store
    /// before it).
    async fn unmark_ahead(&mut self, also: Vec<QueueKey>) -> Result<(), StoreError> {
        if self.premarked.is_empty() && also.is_empty() {
            return Ok(());
        }
        let ops = self
            .premarked
            .keys()
            .cloned()
            .chain(also)
            .map(|key| Op::SetSent(key, false))
            .collect();
        self.pipeline
            .store
            .commit(Tx {
                ops,
                receipts: None,
            })
            .await?;
        self.premarked.clear();
        Ok(())
    }

    /// Waits for the peer's answer to `flight` and settles it. An answer that moved
    /// entries shows the link works; a failure, or a peer that took nothing, that it does
    /// not.
    async fn land(&mut self, flight: Flight) -> Result<Round, ForwardError> {
        let round = self.answered(flight).await;
        match round {
            Ok(Round::Again) => self.working = true,
            Ok(Round::BackOff) | Err(_) => self.working = false,
            _ => {}
        }
        round
    }

    async fn answered(&mut self, mut flight: Flight) -> Result<Round, ForwardError> {
        flight.done().await;
        let answer = flight.outcome.take().expect("done");
        let sent = std::mem::take(&mut flight.sent);
        let response = match answer {
            Ok(Ok(response)) => response,
            Ok(Err(s)) => {
                if crate::tls::never_left(&s) {
                    // Not one byte of it reached the peer: what this call marked is
                    // unmarked, and may expire here again (a peer down for days holds
                    // nothing of ours).
                    // So are the entries marked ahead.
                    let unmark = sent.iter().filter(|s| s.marked_here);
                    self.unmark_ahead(unmark.map(|s| s.key.clone()).collect())
                        .await?;
                }
                return Err(ForwardError::Unavailable(format!(
                    "{:?}: {:?}",
                    s.code(),
                    peer_text(s.message())
                )));
            }
            Err(e) => {
                return Err(ForwardError::Unavailable(format!(
                    "delivery call ended: {e}"
                )))
            }
        };
        self.settle_answer(sent, flight.progressed, response).await
    }

    /// Settles what the peer answered to the entries `sent` in one call.
    async fn settle_answer(
        &mut self,
        sent: Vec<Sent>,
        progressed: bool,
        response: pb::DeliverResponse,
    ) -> Result<Round, ForwardError> {
        let (pipeline, peer, cfg, pushes) = (&self.pipeline, &self.peer, &self.cfg, &self.pushes);
        let retries = &mut self.retries;
        if response.results.len() != sent.len() {
            return Err(ForwardError::Unavailable(
                "peer answered a different number of items".into(),
            ));
        }
        // Every entry the peer answered is settled in one transaction: one durable commit per
        // batch, not one per envelope.
        let mut settled = 0;
        let mut put_off = PutOffs::default();
        // Whether a deferred entry left the outbox (the peer takes them again), and whether an
        // envelope did (the peer's store takes envelopes).
        let (mut settled_deferred, mut envelopes_went) = (false, false);
        let mut batch_ops = Vec::new();
        // Envelopes whose delivery through this gateway ended: their chunks go after the commit.
        let mut ended = Vec::new();
        let mut fault = None;
        for (
            Sent {
                key,
                entry,
                id,
                envelope,
                marked_here,
            },
            result,
        ) in sent.into_iter().zip(response.results)
        {
            if !result.retry_reason.is_empty() {
                tracing::info!(peer = %peer, message_id = %id, reason = ?peer_text(&result.retry_reason), "peer asks to retry");
                // An envelope whose chunks the peer lacks is held back by its push, which wakes
                // the outbox when they are there.
                let pushing = result.retry_reason == crate::transfer::CHUNKS_MISSING
                    && entry.receipt.is_none()
                    && start_push(pipeline, self.client.clone(), peer, id, pushes, cfg);
                let peer_wide =
                    [RETRY_QUOTA_FULL, RETRY_STORAGE_ERROR].contains(&result.retry_reason.as_str());
                // A full store, or missing chunks, is the peer's answer before it keeps
                // anything (one it holds gets its receipt first): if no call reached it
                // before this one, it holds nothing of this envelope, which may expire here
                // again. Unmarked before a deferral moves the entry.
                let not_kept = [RETRY_QUOTA_FULL, crate::transfer::CHUNKS_MISSING]
                    .contains(&result.retry_reason.as_str());
                if marked_here && not_kept {
                    batch_ops.push(Op::SetSent(key.clone(), false));
                }
                let what = if pushing {
                    PutOff::Held
                } else {
                    retries.put_off(key, &entry, peer_wide, cfg, &mut batch_ops)
                };
                put_off.count(what, peer_wide);
                continue;
            }
            if envelope.is_none() && !result.refused.is_empty() {
                // Sending it again would be refused again: it leaves the outbox, and the
                // refusal is on record here as well as at the peer.
                tracing::error!(peer = %peer, message_id = %id, reason = ?peer_text(&result.refused), "peer refused a receipt for good");
            }
            let mut ops = vec![];
            if let Some(envelope) = envelope {
                let Some(r) = result.receipt else {
                    // Refused without a receipt: the sender must still learn how it ended.
                    tracing::error!(peer = %peer, message_id = %id, reason = ?peer_text(&result.refused), "peer refused an envelope without a receipt");
                    let Some(msg) = pipeline.store.message_head(&id)? else {
                        settle(pipeline, key).await?;
                        settled += 1;
                        continue;
                    };
                    let refused = Ending::Retire(pb::RejectReason::RefusedByPeer);
                    if end_once(pipeline, key, id, &msg, refused).await? {
                        pushes.forget(&msg.envelope_hash);
                        settled += 1;
                    }
                    continue;
                };
                match check_peer_receipt(pipeline, peer, &id, &envelope.hash, &r) {
                    Ok((event, v)) => {
                        let log = pb::LogEntry {
                            event: event as i32,
                            message_id: id.as_bytes().to_vec(),
                            envelope_hash: v.envelope_hash.0.to_vec(),
                            actor: peer.to_string(),
                            at_ms: pipeline.now(),
                            reason: v.body.reason,
                            receipt_hash: receipt::receipt_hash(&r).to_vec(),
                        }
                        .encode_to_vec();
                        if v.stage() == Stage::Rejected {
                            // An ending: after a lost answer, the delivery may have ended
                            // since (the peer delivered it, and its DELIVERED came back).
                            let Some(msg) = pipeline.store.message_head(&id)? else {
                                settle(pipeline, key).await?;
                                settled += 1;
                                continue;
                            };
                            let rejected = Ending::Peer { receipt: r, log };
                            if end_once(pipeline, key, id, &msg, rejected).await? {
                                pushes.forget(&msg.envelope_hash);
                                settled += 1;
                                settled_deferred |= entry.deferred;
                                envelopes_went = true;
                            }
                            continue;
                        }
                        ended.push((v.envelope_hash, envelope.attached));
                        ops.push(Op::PutReceipt(id, r));
                        ops.push(Op::Log(log));
                    }
                    Err(e) => {
                        // Keep the entry: a peer answering with a bad receipt is a fault to fix,
                        // not a reason to lose the message. Each receipt is checked on its own,
                        // so the rest of the batch settles; this one is put off as if the peer
                        // had asked to retry it, and the link backs off.
                        tracing::error!(peer = %peer, message_id = %id, error = %e, "peer answered with a receipt that does not verify");
                        fault.get_or_insert(ForwardError::Unavailable(format!(
                            "bad receipt from peer: {e}"
                        )));
                        let what = retries.put_off(key, &entry, false, cfg, &mut batch_ops);
                        put_off.count(what, false);
                        continue;
                    }
                }
            }
            batch_ops.extend(ops);
            batch_ops.push(Op::Dequeue(key));
            settled += 1;
            settled_deferred |= entry.deferred;
            envelopes_went |= entry.receipt.is_none();
        }
        if !batch_ops.is_empty() {
            pipeline
                .store
                .commit(Tx {
                    ops: batch_ops,
                    receipts: None,
                })
                .await?;
        }
        for (hash, attached) in ended {
            if attached {
                pipeline.drop_attachments(hash).await;
            }
            pushes.forget(&hash.0);
        }
        retries.deferred_answered(
            settled_deferred,
            put_off.deferred > 0,
            put_off.deferred_again > 0,
            cfg,
        );
        match fault {
            Some(e) => Err(e),
            None => Ok(put_off.outcome(settled > 0 || progressed, envelopes_went, cfg.batch)),
        }
    }
}

/// Outbox entries the peer asked to have again later, each held back on its own backoff
/// while the rest of the outbox goes. Resent in every round instead, retried entries at the
/// head (receipts signed under a key the peer does not know yet are urgent and oldest)
/// would fill every batch, and nothing behind them would move.
#[derive(Default)]
struct Retries {
    held: std::collections::HashMap<QueueKey, Held>,
    /// The backoff that deferred entries wait out together; none before the first is
    /// deferred, or after a directory exchange.
    deferred: Option<Held>,
}

struct Held {
    attempts: u32,
    until: tokio::time::Instant,
}

/// At most this many batches' worth of entries are held back at once, so that a round reads
/// a bounded stretch of the outbox. Past that, a retried entry is deferred instead: moved
/// behind every entry not deferred, in the store ([`Op::Defer`]), so the entries behind it
/// go first. Deferred entries then wait out one backoff together. Entries the peer's store
/// as a whole puts off are never deferred: the link backs off instead.
const HELD_BATCHES: usize = 16;

/// What became of an entry the peer could not take now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PutOff {
    /// Held back where it is, on its own backoff.
    Held,
    /// Moved to the back of the outbox: the entries that were behind it can go now.
    Deferred,
    /// Already deferred, moved behind the other deferred entries of its priority: the
    /// deferred entries back off together.
    DeferredAgain,
    /// Put off for a reason of the peer's as a whole, and not held: left where it is, and
    /// the link backs off. Moved behind the rest, it would only make room for more entries
    /// the peer cannot take either.
    Left,
}

/// What became of a round's items the peer asked to retry (or answered with a bad receipt).
#[derive(Debug, Default)]
struct PutOffs {
    held: usize,
    deferred: usize,
    deferred_again: usize,
    /// Of all of them, those put off for a reason of the peer's store as a whole (every
    /// [`PutOff::Left`] among them).
    peer_wide: usize,
}

impl PutOffs {
    fn count(&mut self, what: PutOff, peer_wide: bool) {
        self.peer_wide += usize::from(peer_wide);
        match what {
            PutOff::Held => self.held += 1,
            PutOff::Deferred => self.deferred += 1,
            PutOff::DeferredAgain => self.deferred_again += 1,
            // Left where it is: what the round does about it follows from `peer_wide`.
            PutOff::Left => {}
        }
    }

    /// How the round ends, given whether anything else moved (entries settled, expired)
    /// and whether an envelope was among the entries settled.
    fn outcome(&self, progressed: bool, envelopes_went: bool, batch: usize) -> Round {
        if self.peer_wide > 0 && !envelopes_went {
            // Held or not, the peer's store takes no envelope now (receipts it may still
            // take, and those that went are settled): reading on would only send it more.
            Round::BackOff
        } else if progressed || self.deferred > 0 {
            // Entries left, or no longer stand in front of the rest.
            Round::Again
        } else if self.held == batch {
            // A full batch held back: more may wait behind it.
            Round::ReadOn
        } else {
            // Deferred entries put off again wait out their own backoff.
            Round::Idle
        }
    }
}

impl Retries {
    fn held(&self) -> usize {
        self.held.len()
    }

    /// When the first entry still held back, or the deferred ones, are due again.
    fn next_due(&self) -> Option<tokio::time::Instant> {
        let now = tokio::time::Instant::now();
        self.held
            .values()
            .chain(&self.deferred)
            .map(|h| h.until)
            .filter(|u| *u > now)
            .min()
    }

    /// Whether deferred entries may be sent: their backoff ended, or none is running.
    fn deferred_due(&self) -> bool {
        self.deferred
            .as_ref()
            .is_none_or(|h| tokio::time::Instant::now() >= h.until)
    }

    /// After a round: a deferred entry the peer took makes the others due at once (their
    /// next backoff, if the peer puts them off again, is no shorter); one put off again
    /// starts the next, longer backoff; an entry deferred for the first time starts the
    /// first backoff over unless one runs: moving one that runs, a steady stream of new ones
    /// would keep the deferred entries back for ever.
    fn deferred_answered(&mut self, taken: bool, first: bool, again: bool, cfg: &ForwarderConfig) {
        let now = tokio::time::Instant::now();
        match &mut self.deferred {
            Some(h) if taken => h.until = now,
            Some(h) if again => {
                h.until = now + backoff(cfg, h.attempts, jitter());
                h.attempts = h.attempts.saturating_add(1);
            }
            // One that ran out: new deferred entries start over.
            Some(h) if first && h.until <= now => {
                h.attempts = 1;
                h.until = now + backoff(cfg, 0, jitter());
            }
            None if first || again => {
                self.deferred = Some(Held {
                    attempts: 1,
                    until: now + backoff(cfg, 0, jitter()),
                })
            }
            _ => {}
        }
    }

    /// Lets every held and deferred entry go in the next round, keeping none of their
    /// backoffs.
    fn release_all(&mut self) {
        self.held.clear();
        self.deferred = None;
    }

    fn holds_back(&self, key: &QueueKey) -> bool {
        self.held
            .get(key)
            .is_some_and(|h| tokio::time::Instant::now() < h.until)
    }

    /// Holds `key` back for its next backoff, longer each time the peer asks again; false
    /// when as many entries as allowed are held already.
    fn hold(&mut self, key: QueueKey, cfg: &ForwarderConfig) -> bool {
        if self.held.len() >= HELD_BATCHES * cfg.batch && !self.held.contains_key(&key) {
            return false;
        }
        let now = tokio::time::Instant::now();
        let h = self.held.entry(key).or_insert(Held {
            attempts: 0,
            until: now,
        });
        h.until = now + backoff(cfg, h.attempts, jitter());
        h.attempts = h.attempts.saturating_add(1);
        true
    }

    /// Holds `key` back, or when as many entries as allowed are held, adds to `ops` the
    /// move of its entry to the back of the outbox, unless the peer put it off for a reason
    /// of its own as a whole (`peer_wide`).
    fn put_off(
        &mut self,
        key: QueueKey,
        entry: &QueueEntry,
        peer_wide: bool,
        cfg: &ForwarderConfig,
        ops: &mut Vec<Op>,
    ) -> PutOff {
        if self.hold(key.clone(), cfg) {
            return PutOff::Held;
        }
        if peer_wide {
            return PutOff::Left;
        }
        ops.push(Op::Defer(key));
        if entry.deferred {
            PutOff::DeferredAgain
        } else {
            PutOff::Deferred
        }
    }

    /// Forgets entries that left the outbox (settled, expired): those not among the first
    /// `limit` entries `read`, unless the read stopped at `limit` before reaching them.
    fn keep_only(&mut self, read: &[(QueueKey, QueueEntry)], limit: usize) {
        if self.held.is_empty() {
            return;
        }
        let past = (read.len() >= limit)
            .then(|| read.last().map(|(k, _)| k))
            .flatten();
        let read: std::collections::HashSet<&QueueKey> = read.iter().map(|(k, _)| k).collect();
        self.held
            .retain(|k, _| read.contains(k) || past.is_some_and(|last| k > last));
    }
}

/// Checks the peer's answer for an envelope this gateway sent with hash `sent_hash`.
fn check_peer_receipt(
    pipeline: &Pipeline,
    peer: &SpiffeId,
    id: &MessageId,
    sent_hash: &[u8],
    r: &pb::Receipt,
) -> Result<(LogEvent, receipt::VerifiedReceipt), PipelineError> {
    let v = receipt::verify(r, &pipeline.directories())?;
    if &v.signer != peer || v.message_id != *id || v.envelope_hash.0 != sent_hash {
        return Err(PipelineError::BadReceipt(
            "receipt does not name this message and peer".into(),
        ));
    }
    match v.stage() {
        Stage::Received => Ok((LogEvent::Forwarded, v)),
        Stage::Rejected => Ok((LogEvent::Rejected, v)),
        other => Err(PipelineError::BadReceipt(format!(
            "unexpected stage {other:?}"
        ))),
    }
}

/// Takes an entry off the outbox on its own, when nothing else records how it ended.
async fn settle(pipeline: &Pipeline, key: QueueKey) -> Result<(), StoreError> {
    pipeline
        .store
        .commit(Tx {
            ops: vec![Op::Dequeue(key)],
            receipts: None,
        })
        .await?;
    Ok(())
}

/// Ends the delivery of an envelope in the outbox, its entry leaving with it, unless its
/// delivery ended already ([`Pipeline::end_once`]): the peer rejected it, or it will not
/// have it from us (it expired before it ever left, or the peer refused it without a
/// receipt) and its sender gets a rejected receipt from us. Whether the entry left the
/// outbox; false while another ending of the message is decided (the next round looks
/// again).
async fn end_once(
    pipeline: &Arc<Pipeline>,
    key: QueueKey,
    id: MessageId,
    msg: &MessageHead,
    ending: Ending,
) -> Result<bool, ForwardError> {
    let what = match &ending {
        Ending::Retire(reason) => format!("retired before the peer took it ({reason:?})"),
        Ending::Peer { .. } => "rejected by the peer".to_owned(),
    };
    match pipeline.end_once(id, msg, Op::Dequeue(key), ending).await {
        Ok(ended) => {
            if ended {
                tracing::info!(message_id = %id, "{what}");
            }
            pipeline.drop_attachments_of(msg).await;
            Ok(true)
        }
        Err(PipelineError::EndingInProgress) => Ok(false),
        Err(PipelineError::Store(e)) => Err(e.into()),
        Err(e) => Err(StoreError::Engine(e.to_string()).into()),
    }
}

/// Attachment pushes towards one peer. Each runs in its own task, two at a time, so a large
/// or failing upload never holds up the rest of the outbox (FLASH alerts, receipts).
struct Pushes {
    state: std::sync::Mutex<std::collections::HashMap<Vec<u8>, PushState>>,
    slots: tokio::sync::Semaphore,
    /// The push tasks, stopped with the forwarder ([`Pushes::stop`]).
    tasks: std::sync::Mutex<tokio::task::JoinSet<()>>,
}

impl Default for Pushes {
    fn default() -> Self {
        Self {
            state: Default::default(),
            slots: tokio::sync::Semaphore::new(2),
            tasks: Default::default(),
        }
    }
}

#[derive(Default)]
struct PushState {
    running: bool,
    /// Pushes started for the message; kept until the message settles, so a peer that asks
    /// again and again for chunks it was given is answered ever more slowly.
    attempts: u32,
    not_before: Option<tokio::time::Instant>,
}

impl PushState {
    /// A push is running, or the next one is not due yet.
    fn holds_back(&self) -> bool {
        self.running
            || self
                .not_before
                .is_some_and(|t| tokio::time::Instant::now() < t)
    }
}

impl Pushes {
    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<Vec<u8>, PushState>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
    /// Whether the message waits for a push: one running, or the next not due yet.
    fn holds_back(&self, hash: &[u8]) -> bool {
        self.lock().get(hash).is_some_and(PushState::holds_back)
    }
    /// How many messages wait for a push.
    fn waiting(&self) -> usize {
        self.lock().len()
    }
    fn forget(&self, hash: &[u8]) {
        self.lock().remove(hash);
    }

    /// Runs a push in a task of the set [`Pushes::stop`] ends.
    fn spawn(&self, push: impl std::future::Future<Output = ()> + Send + 'static) {
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        // Pushes that ended stay in the set until they are reaped here.
        while tasks.try_join_next().is_some() {}
        tasks.spawn(push);
    }

    /// Stops every push still running, so that nothing of a stopped forwarder holds the
    /// store; the next start pushes what the peer still lacks when it asks again.
    async fn stop(&self) {
        let mut tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        tasks.shutdown().await;
    }
}

/// Ends a push's `running` flag however its task ends (a panic included), without bringing
/// back a message forgotten meanwhile (it settled or expired).
struct PushDone<'a> {
    pushes: &'a Pushes,
    hash: Vec<u8>,
    retry_after: Option<Duration>,
}

impl Drop for PushDone<'_> {
    fn drop(&mut self) {
        if let Some(s) = self.pushes.lock().get_mut(&self.hash) {
            s.running = false;
            s.not_before = self.retry_after.map(|d| tokio::time::Instant::now() + d);
        }
    }
}

/// Starts pushing message `id`'s chunks to the peer, unless a push is running or backing
/// off; once it succeeds the outbox is woken to deliver the envelope again. Whether the
/// envelope is now held back by a push (false: there is nothing to push).
fn start_push(
    pipeline: &Arc<Pipeline>,
    mut client: PeerLinkClient<tonic::transport::Channel>,
    peer: &SpiffeId,
    id: MessageId,
    pushes: &Arc<Pushes>,
    cfg: &ForwarderConfig,
) -> bool {
    let Ok(Some(msg)) = pipeline.store.message(&id) else {
        return false;
    };
    let (Some(env), Ok(hash)) = (
        msg.envelope,
        EnvelopeHash::from_slice(&msg.head.envelope_hash),
    ) else {
        return false;
    };
    let Ok(header) = pb::Header::decode(&env.header[..]) else {
        return false;
    };
    if header.attachments.is_empty() {
        tracing::error!(peer = %peer, message_id = %id, "peer asks for chunks of an envelope without attachments");
        return false;
    }
    let attempts = {
        let mut state = pushes.lock();
        let s = state.entry(hash.0.to_vec()).or_default();
        if s.holds_back() {
            return true;
        }
        s.running = true;
        s.attempts = s.attempts.saturating_add(1);
        s.attempts
    };
    let push = {
        let (pipeline, pushes, peer, cfg) =
            (pipeline.clone(), pushes.clone(), peer.clone(), cfg.clone());
        async move {
            let mut done = PushDone {
                pushes: &pushes,
                hash: hash.0.to_vec(),
                // Until it succeeds, the next push waits: a panic or a failure backs off.
                retry_after: Some(backoff(&cfg, attempts, jitter())),
            };
            let Ok(_slot) = pushes.slots.acquire().await else {
                return;
            };
            // A peer that stops reading must not hold a slot for ever: a minute, plus a second
            // per MiB.
            let bytes: u64 = header.attachments.iter().map(|d| d.size).sum();
            let limit = Duration::from_secs(60 + (bytes >> 20));
            let pushed = tokio::time::timeout(
                limit,
                push_attachments(&pipeline, &mut client, &env, &header, hash),
            )
            .await
            .unwrap_or_else(|_| {
                Err(ForwardError::Unavailable(
                    "attachment push timed out".into(),
                ))
            });
            match pushed {
                Ok(()) => {
                    // Delivered again at once; a second request for the same chunks waits.
                    done.retry_after = (attempts > 1).then(|| backoff(&cfg, attempts, jitter()));
                    tracing::info!(peer = %peer, message_id = %id, "attachment chunks pushed");
                    drop(done);
                    pipeline.outbox_signal(peer.country()).notify_one();
                }
                Err(e) => {
                    let wait = done.retry_after.unwrap_or_default();
                    tracing::warn!(peer = %peer, message_id = %id, error = %e, retry_in_ms = wait.as_millis() as u64, "attachment push failed");
                }
            }
        }
    };
    pushes.spawn(push);
    true
}

/// Uploads to the peer every chunk of `env`'s attachments it does not hold: asks what it
/// holds, then streams the rest, one attachment per stream, reading one chunk at a time.
async fn push_attachments(
    pipeline: &Arc<Pipeline>,
    client: &mut PeerLinkClient<tonic::transport::Channel>,
    env: &pb::Envelope,
    header: &pb::Header,
    hash: EnvelopeHash,
) -> Result<(), ForwardError> {
    let link = |s: tonic::Status| {
        ForwardError::Unavailable(format!("{:?}: {:?}", s.code(), peer_text(s.message())))
    };
    for (a, digest) in header.attachments.iter().enumerate() {
        let a = a as u32;
        let n = accord_proto::attachment::chunk_count(digest) as u32;
        let answer = client
            .get_chunk_state(pb::ChunkStateRequest {
                envelope_hash: hash.0.to_vec(),
                attachment: a,
            })
            .await
            .map(tonic::Response::into_inner);
        let missing = accord_proto::attachment::missing_chunks(answer, n).map_err(link)?;
        if missing.is_empty() {
            continue;
        }
        let chunks = pipeline.chunks.clone();
        let hashes = {
            let chunks = chunks.clone();
            tokio::task::spawn_blocking(move || chunks.hashes(&hash, a))
                .await
                .map_err(|e| StoreError::Engine(e.to_string()))?
                .map_err(|e| StoreError::Engine(e.to_string()))?
                .ok_or_else(|| StoreError::Corrupt(format!("{hash}: chunk hash list missing")))?
        };
        let start = pb::ChunkUpload {
            part: Some(pb::chunk_upload::Part::Start(pb::AttachmentStart {
                envelope: Some(env.clone()),
                attachment: a,
                chunk_hashes: hashes.iter().map(|h| h.to_vec()).collect(),
            })),
        };
        // Chunks are read one at a time as the stream is polled: memory stays at one chunk.
        // One we cannot read is left out, and the count below fails the push.
        let body = futures::stream::iter(missing).filter_map(move |i| {
            let chunks = chunks.clone();
            async move {
                let read = tokio::task::spawn_blocking(move || chunks.read(&hash, a, u64::from(i)));
                match read.await {
                    Ok(Ok(data)) => Some(pb::ChunkUpload {
                        part: Some(pb::chunk_upload::Part::Chunk(pb::Chunk { index: i, data })),
                    }),
                    other => {
                        tracing::error!(envelope_hash = %hash, attachment = a, chunk = i, ?other, "chunk unreadable");
                        None
                    }
                }
            }
        });
        let request = futures::stream::once(async move { start }).chain(body);
        let state = client.put_chunks(request).await.map_err(link)?.into_inner();
        if state.held.len() as u32 != n {
            return Err(ForwardError::Unavailable(format!(
                "peer holds {} of {n} chunks of attachment {a}",
                state.held.len()
            )));
        }
    }
    Ok(())
}

/// Text a peer sent, for our logs: at most 256 characters, logged with `?` so that line
/// breaks and control characters stay escaped.
fn peer_text(text: &str) -> &str {
    text.char_indices()
        .nth(256)
        .map_or(text, |(end, _)| &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(batch: usize, initial_backoff_ms: u64, max_backoff_ms: u64) -> ForwarderConfig {
        ForwarderConfig {
            batch,
            initial_backoff_ms,
            max_backoff_ms,
            ..ForwarderConfig::default()
        }
    }

    /// An outbox key, as far as the forwarder is concerned: opaque, ordered bytes.
    fn key(i: u8) -> QueueKey {
        QueueKey(vec![b'q', i])
    }

    #[test]
    fn a_peers_text_is_cut_to_256_characters_on_a_character_boundary() {
        assert_eq!(peer_text("quota full"), "quota full");
        let long = "ស".repeat(300) + "\nforged line";
        let cut = peer_text(&long);
        assert_eq!(cut.chars().count(), 256);
        assert!(long.starts_with(cut) && !cut.contains('\n'));
        assert_eq!(format!("{:?}", peer_text("a\nb")), r#""a\nb""#);
    }

    #[tokio::test(start_paused = true)]
    async fn retried_entries_are_held_back_each_on_its_own_and_only_a_bounded_number() {
        let cfg = config(2, 1_000, 600_000);
        let mut retries = Retries::default();
        for i in 0..40 {
            assert_eq!(
                retries.hold(key(i), &cfg),
                usize::from(i) < HELD_BATCHES * 2
            );
        }
        assert_eq!(retries.held(), HELD_BATCHES * cfg.batch);
        assert!(retries.holds_back(&key(0)));
        assert!(!retries.holds_back(&key(39)), "past the bound: not held");
        // Released after its backoff (0.5–1 s for a first retry), not before.
        tokio::time::advance(Duration::from_millis(499)).await;
        assert!(retries.holds_back(&key(0)));
        tokio::time::advance(Duration::from_millis(502)).await;
        assert!(!retries.holds_back(&key(0)));
        // Asked again: held again, for longer (1–2 s), within the bound as it is the same entry.
        assert!(retries.hold(key(0), &cfg));
        assert_eq!(retries.held[&key(0)].attempts, 2);
        tokio::time::advance(Duration::from_millis(999)).await;
        assert!(retries.holds_back(&key(0)));
        // Entries that left the outbox (no longer read) are forgotten; those past the end
        // of a read that stopped at its limit are kept.
        let entry = QueueEntry::default();
        let read = [(key(1), entry.clone()), (key(5), entry)];
        retries.keep_only(&read, 3);
        assert_eq!(retries.held(), 2);
        retries.hold(key(7), &cfg);
        retries.keep_only(&read, 2);
        assert_eq!(retries.held(), 3, "key 7 sorts after the last read: kept");
        assert!(retries.holds_back(&key(7)) && !retries.holds_back(&key(3)));
        // The idle forwarder wakes for the first entry still held, and a directory the peer
        // took lets every held entry go.
        let now = tokio::time::Instant::now();
        let first = retries
            .held
            .values()
            .map(|h| h.until)
            .filter(|u| *u > now)
            .min();
        assert!(first.is_some());
        assert_eq!(
            retries.next_due(),
            first,
            "the first still held, not one due already"
        );
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert_eq!(retries.next_due(), None, "none is held any more");
        retries.hold(key(8), &cfg);
        retries.release_all();
        assert_eq!(retries.held(), 0);
        assert!(!retries.holds_back(&key(8)));
    }

    #[tokio::test(start_paused = true)]
    async fn past_the_bound_a_retried_entry_is_moved_to_the_back_unless_the_whole_peer_is_busy() {
        let cfg = config(1, 1_000, 600_000);
        let (mut retries, mut ops) = (Retries::default(), Vec::new());
        let fresh = QueueEntry::default();
        for i in 0..HELD_BATCHES as u8 {
            let put_off = retries.put_off(key(i), &fresh, false, &cfg, &mut ops);
            assert_eq!(put_off, PutOff::Held);
        }
        assert!(ops.is_empty(), "held in place: nothing written");
        let far = key(HELD_BATCHES as u8);
        let mut put_off = |entry: &QueueEntry, peer_wide: bool, ops: &mut Vec<Op>| {
            retries.put_off(far.clone(), entry, peer_wide, &cfg, ops)
        };
        assert_eq!(put_off(&fresh, true, &mut ops), PutOff::Left);
        assert!(ops.is_empty(), "the peer's quota is full: nothing moved");
        assert_eq!(put_off(&fresh, false, &mut ops), PutOff::Deferred);
        let deferred = QueueEntry {
            deferred: true,
            ..fresh
        };
        assert_eq!(put_off(&deferred, false, &mut ops), PutOff::DeferredAgain);
        assert!(matches!(&ops[..], [Op::Defer(a), Op::Defer(b)] if *a == far && *b == far));
        assert!(!retries.holds_back(&far));
        // One already held is held again, however full the bound.
        let again = retries.put_off(key(0), &deferred, true, &cfg, &mut ops);
        assert_eq!(again, PutOff::Held);
        assert_eq!(ops.len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn deferred_entries_back_off_together_and_new_ones_do_not_push_them_back() {
        let cfg = config(4, 1_000, 4_000);
        let ms = Duration::from_millis;
        let mut retries = Retries::default();
        assert!(retries.deferred_due(), "none deferred: due");
        retries.deferred_answered(false, false, false, &cfg);
        assert!(
            retries.deferred_due(),
            "none deferred in the round: still due"
        );
        // The first deferred: 0.5–1 s.
        retries.deferred_answered(false, true, false, &cfg);
        tokio::time::advance(ms(499)).await;
        assert!(!retries.deferred_due());
        assert!(
            retries.next_due().is_some(),
            "the idle forwarder wakes for them"
        );
        // More deferred for the first time, every 100 ms for 5 s: they never push the
        // backoff that runs, so the deferred entries are due within the first second.
        let mut due_at = None;
        for i in 0..50 {
            if due_at.is_none() && retries.deferred_due() {
                due_at = Some(i);
            }
            retries.deferred_answered(false, true, false, &cfg);
            tokio::time::advance(ms(100)).await;
        }
        assert!(due_at.is_some_and(|i| i <= 6), "{due_at:?}");
        // Put off again: 1–2 s, then 2–4 s (the maximum).
        retries.deferred_answered(false, false, true, &cfg);
        tokio::time::advance(ms(999)).await;
        assert!(!retries.deferred_due());
        tokio::time::advance(ms(1_002)).await;
        assert!(retries.deferred_due());
        retries.deferred_answered(false, true, true, &cfg);
        tokio::time::advance(ms(1_999)).await;
        assert!(!retries.deferred_due(), "the second backoff is longer");
        // The peer took one: the rest are due at once, and put off again they wait no less
        // than before (2–4 s).
        retries.deferred_answered(true, false, true, &cfg);
        assert!(retries.deferred_due());
        retries.deferred_answered(false, false, true, &cfg);
        tokio::time::advance(ms(1_999)).await;
        assert!(!retries.deferred_due());
        // Once it ran out, one deferred for the first time starts over (0.5–1 s).
        tokio::time::advance(ms(2_002)).await;
        assert!(retries.deferred_due());
        retries.deferred_answered(false, true, false, &cfg);
        tokio::time::advance(ms(499)).await;
        assert!(!retries.deferred_due());
        tokio::time::advance(ms(502)).await;
        assert!(retries.deferred_due());
        // A directory the peer took lets them go too.
        retries.deferred_answered(false, false, true, &cfg);
        retries.release_all();
        assert!(retries.deferred_due());
    }

    #[test]
    fn a_round_goes_on_backs_off_or_waits_by_what_the_peer_put_off() {
        // What the peer put off, how many for its store as a whole, whether anything moved,
        // and whether an envelope went.
        let round = |counted: &[PutOff], peer_wide: usize, progressed: bool, envelope: bool| {
            let mut p = PutOffs {
                peer_wide,
                ..Default::default()
            };
            for &what in counted {
                p.count(what, false);
            }
            p.outcome(progressed, envelope, 4)
        };
        use PutOff::*;
        assert_eq!(round(&[], 0, true, true), Round::Again, "entries settled");
        assert_eq!(round(&[], 0, true, false), Round::Again, "receipts settled");
        assert_eq!(
            round(&[Deferred], 0, false, false),
            Round::Again,
            "the head moved"
        );
        assert_eq!(
            round(&[Held, Left], 2, true, true),
            Round::Again,
            "an envelope went"
        );
        let full = Round::BackOff;
        assert_eq!(
            round(&[Held, Left], 2, true, false),
            full,
            "only receipts went"
        );
        assert_eq!(round(&[Left, Held], 2, false, false), full);
        assert_eq!(round(&[Held; 4], 4, false, false), full, "held, and full");
        assert_eq!(round(&[Deferred, Left], 1, false, false), full);
        let held = round(&[Held; 4], 0, false, false);
        assert_eq!(held, Round::ReadOn, "a full batch held");
        assert_eq!(round(&[Held, Held], 0, false, false), Round::Idle);
        assert_eq!(round(&[DeferredAgain; 4], 0, false, false), Round::Idle);
        assert_eq!(round(&[Held, DeferredAgain], 0, false, false), Round::Idle);
        assert_eq!(round(&[], 0, false, false), Round::Idle);
    }

    #[test]
    fn a_calls_time_limit_grows_by_a_second_per_mib_it_carries() {
        let cfg = ForwarderConfig {
            call_timeout_ms: 500,
            ..ForwarderConfig::default()
        };
        assert_eq!(call_limit(&cfg, 0), Duration::from_millis(500));
        assert_eq!(call_limit(&cfg, (1 << 20) - 1), Duration::from_millis(500));
        assert_eq!(call_limit(&cfg, 3 << 20), Duration::from_millis(3_500));
    }

    #[test]
    fn backoff_grows_exponentially_within_bounds() {
        let cfg = config(1, 100, 5_000);
        for attempt in 0..40 {
            for j in [0.0, 0.3, 1.0] {
                let d = backoff(&cfg, attempt, j).as_millis() as u64;
                let cap = (100u64 << attempt.min(30)).min(5_000);
                assert!(
                    d >= cap / 2 && d <= cap,
                    "attempt {attempt} jitter {j}: {d}"
                );
            }
        }
        assert_eq!(backoff(&cfg, 0, 1.0).as_millis(), 100);
        assert_eq!(backoff(&cfg, 20, 1.0).as_millis(), 5_000);
    }
}
