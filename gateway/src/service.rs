//! gRPC services: they only convert, call the pipeline, and map errors to statuses.
//!
//! Errors are classified by who caused them: the caller (INVALID_ARGUMENT,
//! PERMISSION_DENIED, ALREADY_EXISTS, NOT_FOUND, FAILED_PRECONDITION, RESOURCE_EXHAUSTED)
//! or us (INTERNAL with a generic message; the detail goes to the log).

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use accord_proto::ids::MessageId;
use accord_proto::pb::{self, exchange_server::Exchange, peer_link_server::PeerLink, RejectReason};
use futures::Stream;
use tonic::{Request, Response, Status};

use crate::listener::PeerIdentity;
use crate::pipeline::{Pipeline, PipelineError};
use crate::transfer::Party;

/// Largest batch a client may fetch, or a peer deliver, in one call.
pub const MAX_BATCH: usize = 256;

/// Envelopes a subscription sends ahead of the subscriber's acknowledgements.
pub const MAX_UNACKED: usize = 1024;

impl From<PipelineError> for Status {
    fn from(e: PipelineError) -> Self {
        match e {
            PipelineError::Refused { reason, detail } => {
                let code = match reason {
                    RejectReason::TooLarge => tonic::Code::ResourceExhausted,
                    RejectReason::SenderMismatch | RejectReason::Policy => {
                        tonic::Code::PermissionDenied
                    }
                    RejectReason::NoRoute => tonic::Code::FailedPrecondition,
                    RejectReason::Conflict => tonic::Code::AlreadyExists,
                    _ => tonic::Code::InvalidArgument,
                };
                Status::new(
                    code,
                    format!("envelope refused ({}): {detail}", reason.as_str_name()),
                )
            }
            PipelineError::PermissionDenied(m) => Status::permission_denied(m),
            PipelineError::Conflict => {
                Status::already_exists("this message id is already used by a different envelope")
            }
            PipelineError::NotFound => Status::not_found("no such message for this caller"),
            PipelineError::BadReceipt(m) => {
                Status::invalid_argument(format!("receipt refused: {m}"))
            }
            PipelineError::QuotaFull => with_error_key(
                Status::resource_exhausted("the gateway's queue is full (disk quota); retry later"),
                QUOTA_FULL,
            ),
            PipelineError::ChunksMissing => with_error_key(
                Status::failed_precondition(
                    "the envelope's attachment chunks are not all uploaded: upload them with \
                     PutChunks (GetChunkState says which are missing), then submit again",
                ),
                CHUNKS_MISSING,
            ),
            PipelineError::BadRequest(m) => Status::invalid_argument(m),
            PipelineError::FailedPrecondition(m) => Status::failed_precondition(m),
            PipelineError::EndingInProgress => Status::failed_precondition(
                "another acknowledgement or ending of this message is being committed; retry",
            ),
            PipelineError::Unavailable(m) => Status::unavailable(m),
            e @ (PipelineError::SignerNotKnownYet(_) | PipelineError::NotYet(_)) => {
                Status::unavailable(e.to_string())
            }
            PipelineError::Store(err) => {
                tracing::error!(error = %err, "store failure");
                Status::internal("internal storage error; the request was not accepted")
            }
        }
    }
}

/// Metadata key that names, for machines, why a call failed where the status code alone is
/// ambiguous: [`QUOTA_FULL`] (RESOURCE_EXHAUSTED that passes; retry later) or
/// [`CHUNKS_MISSING`] (FAILED_PRECONDITION: upload the attachment chunks first).
pub const ERROR_KEY: &str = "accord-error";
pub const QUOTA_FULL: &str = "quota-full";
pub const CHUNKS_MISSING: &str = "chunks-missing";

/// Retry reasons (`PeerResult::retry_reason`) a gateway gives a peer when its store as a
/// whole cannot take an item now, whatever the item: the peer's forwarder then backs its link
/// off rather than reach past the item (texts as gateways have always sent them).
pub const RETRY_QUOTA_FULL: &str = "quota full";
pub const RETRY_STORAGE_ERROR: &str = "storage error";

fn with_error_key(mut status: Status, value: &'static str) -> Status {
    status.metadata_mut().insert(
        ERROR_KEY,
        tonic::metadata::MetadataValue::from_static(value),
    );
    status
}

/// The [`ERROR_KEY`] a status carries, if any.
pub fn error_key(status: &Status) -> Option<&str> {
    status.metadata().get(ERROR_KEY)?.to_str().ok()
}

fn identity<T>(req: &Request<T>) -> Result<PeerIdentity, Status> {
    req.extensions()
        .get::<PeerIdentity>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("no verified client certificate"))
}

/// The client-facing exchange.
#[derive(Debug, Clone)]
pub struct ExchangeService {
    pub pipeline: Arc<Pipeline>,
    /// Turns true when the gateway stops: live subscriptions end, so graceful shutdown,
    /// which waits for open streams, cannot hang on a watching client.
    pub shutdown: tokio::sync::watch::Receiver<bool>,
}

type InboxStream = Pin<Box<dyn Stream<Item = Result<pb::InboxItem, Status>> + Send>>;

#[tonic::async_trait]
impl Exchange for ExchangeService {
    async fn submit(
        &self,
        req: Request<pb::SubmitRequest>,
    ) -> Result<Response<pb::SubmitResponse>, Status> {
        let who = identity(&req)?;
        let env = req
            .into_inner()
            .envelope
            .ok_or_else(|| Status::invalid_argument("envelope is required"))?;
        let accepted = self.pipeline.submit(&who.id, env).await?;
        Ok(Response::new(pb::SubmitResponse {
            accepted: Some(accepted),
        }))
    }

    async fn fetch(
        &self,
        req: Request<pb::FetchRequest>,
    ) -> Result<Response<pb::FetchResponse>, Status> {
        let who = identity(&req)?;
        let max = (req.into_inner().max as usize).clamp(1, MAX_BATCH);
        let items = self.pipeline.inbox(&who.id, max).await?;
        Ok(Response::new(pb::FetchResponse { items }))
    }

    type SubscribeStream = InboxStream;

    async fn subscribe(
        &self,
        req: Request<pb::SubscribeRequest>,
    ) -> Result<Response<InboxStream>, Status> {
        let who = identity(&req)?;
        let org = self.pipeline.inbox_owner(&who.id)?;
        let pipeline = self.pipeline.clone();
        let signal = pipeline.inbox_signal(&org);
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let mut shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            // Each subscription sends an envelope once (by queue key); acked ones leave the
            // inbox and so the set. At most MAX_UNACKED are out unacknowledged at a time.
            let mut sent = std::collections::HashSet::new();
            loop {
                let notified = signal.notified();
                let room = MAX_UNACKED.saturating_sub(sent.len()).min(MAX_BATCH);
                let items = match pipeline.inbox_except(&who.id, room, &sent).await {
                    Ok(items) => items,
                    Err(e) => {
                        let _ = tx.send(Err(e.into())).await;
                        return;
                    }
                };
                if room == 0 || items.len() < room {
                    // Everything waiting was seen: forget what has left the inbox since.
                    match pipeline.inbox_keys(&who.id, sent.len() + MAX_BATCH) {
                        Ok(keys) => sent.retain(|k| keys.contains(k)),
                        Err(e) => {
                            let _ = tx.send(Err(e.into())).await;
                            return;
                        }
                    }
                }
                for (key, item) in items {
                    sent.insert(key);
                    if tx.send(Ok(item)).await.is_err() {
                        return;
                    }
                }
                tokio::select! {
                    _ = notified => {}
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                    _ = tx.closed() => return,
                    changed = shutdown.changed() => {
                        let stopping = changed.is_err() || *shutdown.borrow();
                        if stopping {
                            let _ = tx.send(Err(Status::unavailable("gateway shutting down; subscribe again"))).await;
                            return;
                        }
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn ack(&self, req: Request<pb::AckRequest>) -> Result<Response<pb::AckResponse>, Status> {
        let who = identity(&req)?;
        let r = req
            .into_inner()
            .delivered
            .ok_or_else(|| Status::invalid_argument("delivered receipt is required"))?;
        self.pipeline.ack(&who.id, &r).await?;
        Ok(Response::new(pb::AckResponse {}))
    }

    async fn ack_many(
        &self,
        req: Request<pb::AckManyRequest>,
    ) -> Result<Response<pb::AckManyResponse>, Status> {
        let who = identity(&req)?;
        let receipts = req.into_inner().receipts;
        if receipts.len() > MAX_BATCH {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_BATCH} acknowledgements per call"
            )));
        }
        // Concurrently, so that they share group commits; each is decided on its own.
        let acks = receipts.iter().map(|r| self.pipeline.ack(&who.id, r));
        let results = futures::future::join_all(acks)
            .await
            .into_iter()
            .map(|done| match done {
                Ok(()) => pb::AckResult::default(),
                Err(e) => {
                    let status = Status::from(e);
                    pb::AckResult {
                        code: status.code() as i32,
                        message: status.message().to_owned(),
                    }
                }
            })
            .collect();
        Ok(Response::new(pb::AckManyResponse { results }))
    }

    async fn status(
        &self,
        req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let who = identity(&req)?;
        let id = MessageId::from_slice(&req.into_inner().message_id)
            .map_err(|_| Status::invalid_argument("message_id must be 16 bytes of a UUIDv7"))?;
        Ok(Response::new(self.pipeline.status(&who.id, &id).await?))
    }

    async fn get_directory(
        &self,
        req: Request<pb::GetDirectoryRequest>,
    ) -> Result<Response<pb::GetDirectoryResponse>, Status> {
        identity(&req)?;
        Ok(Response::new(pb::GetDirectoryResponse {
            directories: self.pipeline.directories().signed(),
        }))
    }

    async fn put_chunks(
        &self,
        req: Request<tonic::Streaming<pb::ChunkUpload>>,
    ) -> Result<Response<pb::ChunkState>, Status> {
        let who = identity(&req)?;
        let state = put_chunks(&self.pipeline, Party::Client(&who.id), req.into_inner()).await?;
        Ok(Response::new(state))
    }

    async fn get_chunk_state(
        &self,
        req: Request<pb::ChunkStateRequest>,
    ) -> Result<Response<pb::ChunkState>, Status> {
        chunk_state(&self.pipeline, req, |id| Party::Client(id)).await
    }

    type GetChunksStream = ChunkStream;

    async fn get_chunks(
        &self,
        req: Request<pb::GetChunksRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        let who = identity(&req)?;
        let r = req.into_inner();
        let (hash, digest) = self
            .pipeline
            .downloadable(&who.id, &r.envelope_hash, r.attachment)
            .await?;
        let n = accord_proto::attachment::chunk_count(&digest);
        let pipeline = self.pipeline.clone();
        let a = r.attachment;
        // Two chunks in flight at most: a slow reader holds the stream, not the memory.
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        tokio::spawn(async move {
            for i in u64::from(r.from)..n {
                let item = pipeline
                    .read_chunk(hash, a, i)
                    .await
                    .map(|data| pb::Chunk {
                        index: i as u32,
                        data,
                    })
                    .map_err(Status::from);
                let failed = item.is_err();
                if tx.send(item).await.is_err() || failed {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

/// GetChunkState for a client or a peer gateway (`as_party` says which the caller is).
async fn chunk_state(
    pipeline: &Pipeline,
    req: Request<pb::ChunkStateRequest>,
    as_party: for<'a> fn(&'a accord_proto::ids::SpiffeId) -> Party<'a>,
) -> Result<Response<pb::ChunkState>, Status> {
    let who = identity(&req)?;
    let r = req.into_inner();
    let state = pipeline
        .chunk_state(as_party(&who.id), &r.envelope_hash, r.attachment)
        .await?;
    Ok(Response::new(state))
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<pb::Chunk, Status>> + Send>>;

/// One attachment's upload, for a client or a peer gateway: the start first, then chunks.
/// Chunks received before a failure stay held, so a broken upload resumes where it stopped.
async fn put_chunks(
    pipeline: &Arc<Pipeline>,
    party: Party<'_>,
    mut stream: tonic::Streaming<pb::ChunkUpload>,
) -> Result<pb::ChunkState, PipelineError> {
    use pb::chunk_upload::Part;
    let first = stream
        .message()
        .await
        .map_err(|s| PipelineError::BadRequest(format!("upload stream: {}", s.message())))?;
    let Some(pb::ChunkUpload {
        part: Some(Part::Start(start)),
    }) = first
    else {
        return Err(PipelineError::BadRequest(
            "an upload starts with its envelope and hash list".into(),
        ));
    };
    let upload = pipeline.begin_upload(party, start).await?;
    let mut taken = 0u64;
    loop {
        match stream.message().await {
            Ok(Some(pb::ChunkUpload {
                part: Some(Part::Chunk(chunk)),
            })) => {
                pipeline.put_chunk(&upload, chunk).await?;
                taken += 1;
            }
            Ok(Some(_)) => {
                return Err(PipelineError::BadRequest(
                    "only chunks follow the start of an upload".into(),
                ))
            }
            Ok(None) => break,
            Err(s) => {
                // What arrived is kept; the next upload skips it.
                tracing::info!(chunks = taken, error = %s.message(), "upload cut");
                return Err(PipelineError::Unavailable(format!(
                    "upload stream broke after {taken} chunks: {}",
                    s.message()
                )));
            }
        }
    }
    pipeline.finish_upload(&upload).await
}

/// The gateway-to-gateway link.
#[derive(Debug, Clone)]
pub struct PeerLinkService {
    pub pipeline: Arc<Pipeline>,
}

#[tonic::async_trait]
impl PeerLink for PeerLinkService {
    async fn deliver(
        &self,
        req: Request<pb::DeliverRequest>,
    ) -> Result<Response<pb::DeliverResponse>, Status> {
        let who = identity(&req)?;
        let items = req.into_inner().items;
        if items.len() > MAX_BATCH {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_BATCH} items per call"
            )));
        }
        let mut results = Vec::with_capacity(items.len());
        // Items are handled concurrently so one batch shares group commits.
        let futures = items.into_iter().map(|item| {
            let pipeline = self.pipeline.clone();
            let peer = who.id.clone();
            async move {
                match item.item {
                    Some(pb::peer_item::Item::Envelope(env)) => match pipeline.receive(&peer, env).await {
                        Ok(r) => pb::PeerResult { receipt: Some(r), ..Default::default() },
                        Err(PipelineError::QuotaFull) => pb::PeerResult { retry_reason: RETRY_QUOTA_FULL.into(), ..Default::default() },
                        Err(PipelineError::ChunksMissing) => pb::PeerResult { retry_reason: crate::transfer::CHUNKS_MISSING.into(), ..Default::default() },
                        // Another copy of it is being taken in (or it is ending), or it
                        // may be acceptable soon: the peer sends it again.
                        Err(e @ (PipelineError::EndingInProgress | PipelineError::NotYet(_))) => pb::PeerResult { retry_reason: e.to_string(), ..Default::default() },
                        Err(PipelineError::Store(e)) => {
                            tracing::error!(error = %e, "store failure on peer delivery");
                            pb::PeerResult { retry_reason: RETRY_STORAGE_ERROR.into(), ..Default::default() }
                        }
                        Err(e) => {
                            tracing::warn!(peer = %peer, error = %e, "peer envelope refused without receipt");
                            pb::PeerResult { refused: e.to_string(), ..Default::default() }
                        }
                    },
                    Some(pb::peer_item::Item::Receipt(r)) => match pipeline.receive_receipt(&peer, &r).await {
                        Ok(()) => pb::PeerResult::default(),
                        // Decided once the other ending is committed: the peer sends it again.
                        Err(e @ (PipelineError::EndingInProgress | PipelineError::SignerNotKnownYet(_))) => {
                            pb::PeerResult { retry_reason: e.to_string(), ..Default::default() }
                        }
                        Err(PipelineError::Store(_)) | Err(PipelineError::QuotaFull) => {
                            pb::PeerResult { retry_reason: RETRY_STORAGE_ERROR.into(), ..Default::default() }
                        }
                        Err(e) => {
                            tracing::warn!(peer = %peer, error = %e, "receipt from peer refused");
                            pb::PeerResult { refused: e.to_string(), ..Default::default() }
                        }
                    },
                    None => pb::PeerResult {
                        refused: "an item with neither an envelope nor a receipt".into(),
                        ..Default::default()
                    },
                }
            }
        });
        results.extend(futures::future::join_all(futures).await);
        Ok(Response::new(pb::DeliverResponse { results }))
    }

    async fn put_chunks(
        &self,
        req: Request<tonic::Streaming<pb::ChunkUpload>>,
    ) -> Result<Response<pb::ChunkState>, Status> {
        let who = identity(&req)?;
        match put_chunks(&self.pipeline, Party::Peer(&who.id), req.into_inner()).await {
            Ok(state) => Ok(Response::new(state)),
            // Refused for good: the peer delivers the envelope and gets our rejected receipt.
            Err(PipelineError::Refused { reason, detail }) => Err(Status::invalid_argument(
                format!("envelope refused ({}): {detail}", reason.as_str_name()),
            )),
            Err(e) => Err(e.into()),
        }
    }

    async fn get_chunk_state(
        &self,
        req: Request<pb::ChunkStateRequest>,
    ) -> Result<Response<pb::ChunkState>, Status> {
        chunk_state(&self.pipeline, req, |id| Party::Peer(id)).await
    }

    async fn exchange_directories(
        &self,
        req: Request<pb::ExchangeDirectoriesRequest>,
    ) -> Result<Response<pb::ExchangeDirectoriesResponse>, Status> {
        let who = identity(&req)?;
        if let Some(signed) = req.into_inner().own {
            self.pipeline
                .update_directory(who.id.country(), &who.id, signed)
                .await?;
        }
        Ok(Response::new(pb::ExchangeDirectoriesResponse {
            own: self.pipeline.own_signed_directory(),
        }))
    }

    async fn witness(
        &self,
        req: Request<pb::WitnessRequest>,
    ) -> Result<Response<pb::WitnessResponse>, Status> {
        let who = identity(&req)?;
        Ok(Response::new(
            self.pipeline.witness(&who.id, req.into_inner()).await?,
        ))
    }

    async fn prove_events(
        &self,
        req: Request<pb::ProveEventsRequest>,
    ) -> Result<Response<pb::ProveEventsResponse>, Status> {
        let who = identity(&req)?;
        let id = MessageId::from_slice(&req.into_inner().message_id)
            .map_err(|_| Status::invalid_argument("message_id must be 16 bytes of a UUIDv7"))?;
        // A peer may ask only about messages to or from its own country.
        let msg = self
            .pipeline
            .store
            .message_head(&id)
            .map_err(PipelineError::from)?
            .ok_or_else(|| Status::not_found("no such message"))?;
        let cc = who.id.country().to_string();
        let involved = [&msg.sender_org, &msg.recipient_org]
            .iter()
            .any(|o| o.starts_with(&format!("spiffe://{cc}.accord/")));
        if !involved {
            return Err(Status::not_found("no such message"));
        }
        let events = self.pipeline.prove_events(&id, who.id.country())?;
        let receipts = self
            .pipeline
            .store
            .receipts(&id)
            .map_err(PipelineError::from)?;
        Ok(Response::new(pb::ProveEventsResponse { events, receipts }))
    }
}

/// The audit service: auditors only, never plaintext.
#[derive(Debug, Clone)]
pub struct AuditService {
    pub pipeline: Arc<Pipeline>,
}

impl AuditService {
    fn auditor<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let who = identity(req)?;
        if !self.pipeline.is_auditor(&who.id) {
            return Err(Status::permission_denied(format!(
                "{} does not have the auditor role",
                who.id
            )));
        }
        Ok(())
    }
}

/// Most log entries one GetEntries call returns.
pub const MAX_ENTRIES: u64 = 1000;

#[tonic::async_trait]
impl pb::audit_server::Audit for AuditService {
    async fn get_checkpoint(
        &self,
        req: Request<pb::GetCheckpointRequest>,
    ) -> Result<Response<pb::GetCheckpointResponse>, Status> {
        self.auditor(&req)?;
        // On demand: a fresh checkpoint if the log grew, with the cosignatures gathered so far
        // for the newest one otherwise.
        let (size, fresh) = self.pipeline.publish_checkpoint().await?;
        let checkpoint = self.pipeline.checkpoint_at(size)?.unwrap_or(fresh);
        Ok(Response::new(pb::GetCheckpointResponse { checkpoint }))
    }

    async fn get_entries(
        &self,
        req: Request<pb::GetEntriesRequest>,
    ) -> Result<Response<pb::GetEntriesResponse>, Status> {
        self.auditor(&req)?;
        let r = req.into_inner();
        if r.end < r.start || r.end - r.start > MAX_ENTRIES {
            return Err(Status::invalid_argument(format!(
                "need start <= end and at most {MAX_ENTRIES} entries"
            )));
        }
        let entries = self.pipeline.entries(r.start, r.end)?;
        Ok(Response::new(pb::GetEntriesResponse { entries }))
    }

    async fn get_inclusion_proof(
        &self,
        req: Request<pb::GetInclusionProofRequest>,
    ) -> Result<Response<pb::ProofResponse>, Status> {
        self.auditor(&req)?;
        let r = req.into_inner();
        let proof = self.pipeline.inclusion_proof(r.index, r.tree_size)?;
        Ok(Response::new(pb::ProofResponse {
            proof: proof.iter().map(|h| h.to_vec()).collect(),
        }))
    }

    async fn get_consistency_proof(
        &self,
        req: Request<pb::GetConsistencyProofRequest>,
    ) -> Result<Response<pb::ProofResponse>, Status> {
        self.auditor(&req)?;
        let r = req.into_inner();
        let proof = self.pipeline.consistency_proof(r.size1, r.size2)?;
        Ok(Response::new(pb::ProofResponse {
            proof: proof.iter().map(|h| h.to_vec()).collect(),
        }))
    }

    async fn get_evidence(
        &self,
        req: Request<pb::GetEvidenceRequest>,
    ) -> Result<Response<pb::EvidenceBundle>, Status> {
        self.auditor(&req)?;
        let id = MessageId::from_slice(&req.into_inner().message_id)
            .map_err(|_| Status::invalid_argument("message_id must be 16 bytes of a UUIDv7"))?;
        Ok(Response::new(self.pipeline.evidence(&id).await?))
    }
}
