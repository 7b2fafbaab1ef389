//! One organisation's session with its gateway.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use accord_gateway::tls::{self, CountryRoots, Credentials};
use accord_proto::directory::Directories;
use accord_proto::envelope::{self, Limits, SealedEnvelope, VerifiedEnvelope};
use accord_proto::ids::{EnvelopeHash, MessageId, OrgId, SpiffeId};
use accord_proto::keyfile::KeyFile;
use accord_proto::pb::{self, exchange_client::ExchangeClient, Stage};
use accord_proto::receipt::{self, VerifiedReceipt};
use accord_proto::{crypto, forms};
use futures::{Stream, StreamExt};

use crate::casebook::{CaseBook, Direction, Entry};
use tonic::transport::Channel;

/// What went wrong on the client side; each says what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// Certificates or keys could not be loaded.
    #[error("credentials: {0}")]
    Credentials(String),
    /// The gateway refused the call or could not be reached.
    #[error("gateway said {}: {}", .0.code(), .0.message())]
    Gateway(#[from] tonic::Status),
    /// The form does not satisfy its rules.
    #[error("form: {0}")]
    Form(#[from] forms::FormError),
    /// An envelope or receipt from the gateway did not verify.
    #[error("verification: {0}")]
    Verify(String),
    /// The directory has no usable key for the recipient.
    #[error("directory: {0}")]
    Directory(#[from] accord_proto::directory::DirectoryError),
    /// A file to attach, a spooled send or a downloaded attachment could not be read or
    /// written.
    #[error("file: {0}")]
    File(String),
    /// The message does not fit its case's workflow, or the case book failed.
    #[error("workflow: {0}")]
    Workflow(#[from] crate::casebook::WorkflowError),
    /// An opened envelope whose content this organisation refuses (its form breaks the
    /// rules, or it does not fit its case); [`OrgClient::refuse`] tells the sender.
    #[error("{cause}")]
    Refused {
        message_id: MessageId,
        envelope_hash: EnvelopeHash,
        cause: Box<ClientError>,
    },
}

/// How to send one message.
#[derive(Clone, Debug)]
pub struct SendOptions {
    pub case_ref: String,
    pub priority: pb::Priority,
    pub ttl_ms: i64,
    pub in_reply_to: Option<MessageId>,
    /// `H0`, `H1`, `H2` or `H3:<restrictions>` (see `accord_proto::codes::Handling`).
    pub handling_code: String,
    /// Source and information reliability, e.g. `B2`; `X4` (cannot be assessed) unless the
    /// sender assessed it.
    pub evaluation: String,
}

impl SendOptions {
    pub fn new(case_ref: &str) -> Self {
        Self {
            case_ref: case_ref.to_owned(),
            priority: pb::Priority::Routine,
            ttl_ms: 7 * 24 * 3_600_000,
            in_reply_to: None,
            handling_code: "H0".into(),
            evaluation: "X4".into(),
        }
    }
}

/// A message this organisation sent, with the gateway's accepted receipt.
#[derive(Clone, Debug)]
pub struct Sent {
    pub id: MessageId,
    pub hash: EnvelopeHash,
    pub accepted: VerifiedReceipt,
}

/// A message received, verified and opened.
#[derive(Debug)]
pub struct Opened {
    pub envelope: VerifiedEnvelope,
    pub body: pb::Body,
    /// Decrypts the message's attachment chunks ([`OrgClient::download`]).
    pub chunk_key: Option<accord_proto::attachment::ChunkKey>,
}

/// Where the gateway is, how to recognise it, and which directory keys to trust.
#[derive(Clone, Debug)]
pub struct GatewayAddress {
    pub addr: SocketAddr,
    pub id: SpiffeId,
    /// The country root that vouches for the gateway.
    pub root: std::path::PathBuf,
    /// Pinned directory keys of every country (JSON array of `accord.v1.DirectoryTrust`):
    /// the gateway serves directories, but only these keys make them trusted.
    pub trust: std::path::PathBuf,
}

/// An organisation connected to its gateway. Clones share the connection.
#[derive(Clone, Debug)]
pub struct OrgClient {
    pub id: OrgId,
    opener: Arc<Opener>,
    exchange: ExchangeClient<Channel>,
    channel: Channel,
}

/// What verifying and opening an inbox item needs; shared with live subscriptions.
#[derive(Debug)]
struct Opener {
    id: OrgId,
    keys: KeyFile,
    directories: Directories,
    /// The organisation's case book, if this client keeps one: workflow rules on send and
    /// open, and the record of every message.
    book: std::sync::OnceLock<Arc<CaseBook>>,
}

/// The wall clock in Unix milliseconds, as headers and receipts carry it.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl OrgClient {
    /// Connects with the dev layout of `accord-certs`: `org_dir/{cert.pem,key.pem,keys.json}`.
    pub async fn connect(org_dir: &Path, gateway: &GatewayAddress) -> Result<Self, ClientError> {
        let cred = |e: String| ClientError::Credentials(format!("{}: {e}", org_dir.display()));
        let creds = Credentials::load(&org_dir.join("cert.pem"), &org_dir.join("key.pem"))
            .map_err(|e| cred(e.to_string()))?;
        let id: OrgId = creds
            .id
            .clone()
            .try_into()
            .map_err(|e: accord_proto::ids::IdError| cred(e.to_string()))?;
        let keys =
            accord_gateway::server::load_key_file(&org_dir.join("keys.json")).map_err(cred)?;
        if keys.owner != id.to_string() {
            return Err(cred(format!(
                "keys.json belongs to {}, the certificate to {id}",
                keys.owner
            )));
        }
        let mut roots = CountryRoots::default();
        roots
            .add(gateway.id.country().clone(), &gateway.root)
            .map_err(|e| cred(e.to_string()))?;
        let config = tls::client_config(&creds, roots, gateway.id.clone())
            .map_err(|e| cred(e.to_string()))?;
        let channel = tls::channel(gateway.addr, config);
        let mut exchange = ExchangeClient::new(channel.clone()).max_decoding_message_size(64 << 20);
        let dirs = exchange
            .get_directory(pb::GetDirectoryRequest {})
            .await?
            .into_inner()
            .directories;
        let trust: Vec<pb::DirectoryTrust> = std::fs::read(&gateway.trust)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
            .map_err(|e| cred(format!("directory trust {}: {e}", gateway.trust.display())))?;
        // A gateway could otherwise swap a recipient's key and read what is sealed to it.
        let directories = Directories::from_signed(dirs, &trust, now_ms())
            .map_err(|e| ClientError::Verify(format!("directory from the gateway: {e}")))?;
        let opener = Arc::new(Opener {
            id: id.clone(),
            keys,
            directories,
            book: std::sync::OnceLock::new(),
        });
        Ok(Self {
            id,
            opener,
            exchange,
            channel,
        })
    }

    pub fn directories(&self) -> &Directories {
        &self.opener.directories
    }

    /// The case book this client keeps, if any.
    pub fn case_book(&self) -> Option<&Arc<CaseBook>> {
        self.opener.book.get()
    }

    /// Keeps `book` from now on: answers that do not fit their case are refused on send
    /// and on open, and every message sent or opened is recorded. Once per client.
    pub fn use_case_book(&self, book: Arc<CaseBook>) -> Result<(), ClientError> {
        self.opener
            .book
            .set(book)
            .map_err(|_| ClientError::Credentials("this client already keeps a case book".into()))
    }

    /// Seals `body` for `recipient`, signs it, submits it, and checks the accepted receipt.
    pub async fn send(
        &mut self,
        recipient: &OrgId,
        body: &pb::Body,
        opts: &SendOptions,
    ) -> Result<Sent, ClientError> {
        let sealed = self.seal(recipient, body, opts)?;
        let sent = self.submit(&sealed).await?;
        if let Some(book) = self.opener.book.get() {
            book.record(Entry::new(&header_of(&sealed)?, body, Direction::Sent)?)?;
        }
        Ok(sent)
    }

    /// Checks `body`, seals it for `recipient`'s current key and signs it: an envelope
    /// ready for [`OrgClient::submit`]. No I/O.
    pub fn seal(
        &self,
        recipient: &OrgId,
        body: &pb::Body,
        opts: &SendOptions,
    ) -> Result<SealedEnvelope, ClientError> {
        let (sealed, _) = self.seal_with_files(recipient, body, opts, &mut [])?;
        Ok(sealed)
    }

    /// [`OrgClient::seal`] for correspondence with files attached in encrypted chunks: each
    /// file is read chunk by chunk and every ciphertext chunk handed to its `sink`, in order,
    /// before the header that commits to them is signed. The body gains one attachment entry
    /// per file. Returns the envelope and each file's chunk hash list, for upload.
    pub fn seal_with_files(
        &self,
        recipient: &OrgId,
        body: &pb::Body,
        opts: &SendOptions,
        files: &mut [crate::attach::FileToSend<'_>],
    ) -> Result<(SealedEnvelope, crate::attach::HashLists), ClientError> {
        let mut body = body.clone();
        forms::normalize(&mut body);
        let form = body.form.as_ref().ok_or_else(|| forms::FormError {
            path: "form".into(),
            problem: "required",
        })?;
        let kind = forms::kind_of(form);
        let now = now_ms();
        forms::check(kind, &body, now)?;
        // A child victim's message goes at the highest priority and at least H2, whatever
        // the sender asked for.
        let child_case = opts
            .in_reply_to
            .is_some_and(|id| self.opener.in_child_case(&id.to_string()));
        let (priority, handling_code) = if forms::concerns_a_child(&body) || child_case {
            forms::protect_child(&opts.handling_code)
        } else {
            (opts.priority, opts.handling_code.clone())
        };
        let (key_id, pk) = self
            .opener
            .directories
            .current_encryption_key(recipient, now)?;
        let id = MessageId::new_v7(
            now as u64,
            crypto::random().map_err(|e| ClientError::Verify(e.to_string()))?,
        );
        let header = pb::Header {
            message_id: id.as_bytes().to_vec(),
            kind: kind as i32,
            case_ref: opts.case_ref.clone(),
            sender_org: self.id.to_string(),
            sender_key_id: String::new(),
            recipient_org: recipient.to_string(),
            recipient_key_id: key_id,
            created_at_ms: now,
            expires_at_ms: now + opts.ttl_ms,
            priority: priority as i32,
            in_reply_to: opts
                .in_reply_to
                .map(|i| i.as_bytes().to_vec())
                .unwrap_or_default(),
            handling_code,
            hpke_enc: vec![],
            key_commitment: vec![],
            evaluation: opts.evaluation.clone(),
            attachments: vec![],
        };
        let seal_err = |e: envelope::EnvelopeError| ClientError::Verify(e.to_string());
        let mut sealer = envelope::Sealer::new(header, &pk).map_err(seal_err)?;
        let lists = crate::attach::seal_files(&mut sealer, &mut body, files)?;
        forms::check(kind, &body, now)?;
        forms::check_header(&body, sealer.header(), child_case)?;
        if let Some(book) = self.opener.book.get() {
            book.fits(&Entry::new(sealer.header(), &body, Direction::Sent)?)?;
        }
        let sealed = sealer
            .seal(&body, &self.opener.keys.signing)
            .map_err(seal_err)?;
        Ok((sealed, lists))
    }

    /// Submits a sealed envelope and checks the accepted receipt.
    pub async fn submit(&mut self, sealed: &SealedEnvelope) -> Result<Sent, ClientError> {
        let id = message_id_of(sealed)?;
        let hash = sealed.hash();
        let accepted = self
            .exchange
            .submit(pb::SubmitRequest {
                envelope: Some(sealed.to_wire()),
            })
            .await?
            .into_inner()
            .accepted
            .ok_or_else(|| ClientError::Verify("gateway answered without a receipt".into()))?;
        let accepted = self.check_receipt(&accepted, &hash, &id)?;
        Ok(Sent { id, hash, accepted })
    }

    fn check_receipt(
        &self,
        r: &pb::Receipt,
        hash: &EnvelopeHash,
        id: &MessageId,
    ) -> Result<VerifiedReceipt, ClientError> {
        let v = receipt::verify(r, &self.opener.directories)
            .map_err(|e| ClientError::Verify(e.to_string()))?;
        if &v.envelope_hash != hash || &v.message_id != id {
            return Err(ClientError::Verify(
                "receipt is for another envelope".into(),
            ));
        }
        Ok(v)
    }

    /// Fetches, verifies and opens up to `max` waiting envelopes; fails on the first that
    /// does not verify, open or fit ([`OrgClient::fetch_each`] goes on past it).
    pub async fn fetch(&mut self, max: u32) -> Result<Vec<Opened>, ClientError> {
        self.fetch_each(max).await?.into_iter().collect()
    }

    /// Fetches up to `max` waiting envelopes and verifies and opens each, with a result
    /// per envelope: one that is refused does not hide the others.
    pub async fn fetch_each(
        &mut self,
        max: u32,
    ) -> Result<Vec<Result<Opened, ClientError>>, ClientError> {
        let items = self
            .exchange
            .fetch(pb::FetchRequest { max })
            .await?
            .into_inner()
            .items;
        Ok(items.into_iter().map(|i| self.opener.open(i)).collect())
    }

    /// The inbox as a live stream of opened envelopes: what is waiting, then what arrives.
    /// The stream is independent of `self`, so messages can be acknowledged as they come.
    pub async fn subscribe(
        &mut self,
    ) -> Result<impl Stream<Item = Result<Opened, ClientError>> + Send + 'static, ClientError> {
        let stream = self
            .exchange
            .clone()
            .subscribe(pb::SubscribeRequest {})
            .await?
            .into_inner();
        let opener = self.opener.clone();
        Ok(stream.map(move |item| opener.open(item?)))
    }

    /// Acknowledges an opened envelope with a delivered receipt signed by this organisation.
    pub async fn ack(&mut self, opened: &Opened) -> Result<pb::Receipt, ClientError> {
        self.end_delivery(
            &opened.envelope.id(),
            &opened.envelope.hash(),
            Stage::Delivered,
            pb::RejectReason::Unspecified,
        )
        .await
    }

    /// Acknowledges several opened envelopes in one call (a backlog), each with its own
    /// delivered receipt; the gateway decides each on its own. Returns, in order, each
    /// receipt or why it was not taken; `Err` only when the call itself failed (then none
    /// or some may have been taken, and acknowledging again is harmless).
    pub async fn ack_many(
        &mut self,
        opened: &[Opened],
    ) -> Result<Vec<Result<pb::Receipt, ClientError>>, ClientError> {
        let receipts: Vec<pb::Receipt> = opened
            .iter()
            .map(|o| {
                self.ending(
                    &o.envelope.id(),
                    &o.envelope.hash(),
                    Stage::Delivered,
                    pb::RejectReason::Unspecified,
                )
            })
            .collect();
        let results = self
            .exchange
            .ack_many(pb::AckManyRequest {
                receipts: receipts.clone(),
            })
            .await?
            .into_inner()
            .results;
        if results.len() != receipts.len() {
            return Err(ClientError::Verify(format!(
                "the gateway answered {} acknowledgements with {} results",
                receipts.len(),
                results.len()
            )));
        }
        Ok(receipts
            .into_iter()
            .zip(results)
            .map(|(r, done)| match tonic::Code::from_i32(done.code) {
                tonic::Code::Ok => Ok(r),
                code => Err(ClientError::Gateway(tonic::Status::new(code, done.message))),
            })
            .collect())
    }

    /// Refuses a message this organisation opened and will not take (see
    /// [`ClientError::Refused`]): a rejected receipt with reason REFUSED_BY_RECIPIENT, signed
    /// by this organisation, takes it out of the inbox and travels back to the sender.
    pub async fn refuse(
        &mut self,
        message_id: &MessageId,
        envelope_hash: &EnvelopeHash,
    ) -> Result<pb::Receipt, ClientError> {
        self.end_delivery(
            message_id,
            envelope_hash,
            Stage::Rejected,
            pb::RejectReason::RefusedByRecipient,
        )
        .await
    }

    /// Signs the recipient's ending of a delivery (`stage`, `reason`) and hands it to the
    /// gateway, which takes the message out of the inbox and sends the receipt back.
    async fn end_delivery(
        &mut self,
        message_id: &MessageId,
        envelope_hash: &EnvelopeHash,
        stage: Stage,
        reason: pb::RejectReason,
    ) -> Result<pb::Receipt, ClientError> {
        let r = self.ending(message_id, envelope_hash, stage, reason);
        self.exchange
            .ack(pb::AckRequest {
                delivered: Some(r.clone()),
            })
            .await?;
        Ok(r)
    }

    /// This organisation's signed receipt ending a delivery (`stage`, `reason`).
    fn ending(
        &self,
        message_id: &MessageId,
        envelope_hash: &EnvelopeHash,
        stage: Stage,
        reason: pb::RejectReason,
    ) -> pb::Receipt {
        let body = pb::ReceiptBody {
            envelope_hash: envelope_hash.0.to_vec(),
            message_id: message_id.as_bytes().to_vec(),
            stage: stage as i32,
            signer: self.id.to_string(),
            signer_key_id: self.opener.keys.signing.key_id().to_owned(),
            at_ms: now_ms(),
            log_index: 0,
            reason: reason as i32,
        };
        receipt::sign(&body, &self.opener.keys.signing)
    }

    /// Every receipt of a message we sent or received, each verified.
    pub async fn status(
        &mut self,
        id: &MessageId,
    ) -> Result<(EnvelopeHash, Vec<VerifiedReceipt>), ClientError> {
        let resp = self
            .exchange
            .status(pb::StatusRequest {
                message_id: id.as_bytes().to_vec(),
            })
            .await?
            .into_inner();
        let hash = EnvelopeHash::from_slice(&resp.envelope_hash)
            .map_err(|e| ClientError::Verify(e.to_string()))?;
        let receipts = resp
            .receipts
            .iter()
            .map(|r| self.check_receipt(r, &hash, id))
            .collect::<Result<Vec<_>, _>>()?;
        Ok((hash, receipts))
    }

    /// [`OrgClient::status`], with every receipt's signer checked against the message's
    /// sender and recipient as the gateways and the evidence verifier check them, so a
    /// gateway cannot pass off a receipt signed by another party (another organisation's
    /// "delivered", a foreign gateway's "accepted").
    pub async fn status_between(
        &mut self,
        id: &MessageId,
        sender: &OrgId,
        recipient: &OrgId,
    ) -> Result<(EnvelopeHash, Vec<VerifiedReceipt>), ClientError> {
        let (hash, chain) = self.status(id).await?;
        check_chain(&chain, sender, recipient)?;
        Ok((hash, chain))
    }

    /// The audit service on the same connection (auditor organisations only).
    pub fn audit(&self) -> pb::audit_client::AuditClient<Channel> {
        pb::audit_client::AuditClient::new(self.channel.clone())
            .max_decoding_message_size(256 << 20)
    }

    /// The gateway's standard gRPC health service on the same connection: NOT_SERVING once
    /// its store stopped taking commits.
    pub fn health(&self) -> tonic_health::pb::health_client::HealthClient<Channel> {
        tonic_health::pb::health_client::HealthClient::new(self.channel.clone())
    }

    /// Raw access for tests that must send what a well-behaved client would not.
    pub fn exchange(&mut self) -> &mut ExchangeClient<Channel> {
        &mut self.exchange
    }

    pub fn keys(&self) -> &KeyFile {
        &self.opener.keys
    }
}

impl Opener {
    /// Whether message `id` belongs to a child victim's case, as far as the case book
    /// knows (without one: no).
    fn in_child_case(&self, id: &str) -> bool {
        self.book.get().is_some_and(|b| b.in_child_case(id))
    }

    /// Verifies and opens an inbox item. A refusal of its content (form rules, workflow)
    /// comes back as [`ClientError::Refused`], naming the message so it can be refused.
    fn open(&self, item: pb::InboxItem) -> Result<Opened, ClientError> {
        let wire = item
            .envelope
            .ok_or_else(|| ClientError::Verify("inbox item without envelope".into()))?;
        let sealed = SealedEnvelope::from_wire(wire, &Limits::default())
            .map_err(|e| ClientError::Verify(e.to_string()))?;
        let named = message_id_of(&sealed).ok().map(|id| (id, sealed.hash()));
        match self.open_sealed(sealed, item.received.as_ref()) {
            Err(cause @ (ClientError::Form(_) | ClientError::Workflow(_))) => match named {
                // A failing case book, or one that lacks the request an answer names (it
                // may have been sent from elsewhere, or before the book), is ours to look
                // into, not a fault of the sender's to refuse.
                Some(_)
                    if matches!(
                        cause,
                        ClientError::Workflow(
                            crate::casebook::WorkflowError::Book { .. }
                                | crate::casebook::WorkflowError::UnknownRequest { .. }
                        )
                    ) =>
                {
                    Err(cause)
                }
                Some((message_id, envelope_hash)) => Err(ClientError::Refused {
                    message_id,
                    envelope_hash,
                    cause: Box::new(cause),
                }),
                None => Err(cause),
            },
            other => other,
        }
    }

    /// When a received message reached this organisation's gateway, for the case book: the
    /// time in the gateway's signed RECEIVED receipt, not the sender's `created_at`, which
    /// a sender could backdate to look answered in time. Without a receipt that verifies
    /// (signed by a gateway of this country, for this envelope): the time of opening.
    fn arrival(&self, received: Option<&pb::Receipt>, sealed: &SealedEnvelope) -> i64 {
        received
            .and_then(|r| receipt::verify(r, &self.directories).ok())
            .filter(|v| {
                v.stage() == Stage::Received
                    && v.envelope_hash == sealed.hash()
                    && v.signer.country() == self.id.country()
            })
            .map_or_else(now_ms, |v| v.body.at_ms)
    }

    /// Verifies and opens; `received` (our gateway's RECEIVED receipt) times the message in
    /// the case book, and is verified only if a book is kept.
    fn open_sealed(
        &self,
        sealed: SealedEnvelope,
        received: Option<&pb::Receipt>,
    ) -> Result<Opened, ClientError> {
        // Verified at submission time by the gateways; here against its own creation time,
        // since a message may wait in the inbox.
        let created = header_of(&sealed)?.created_at_ms;
        let envelope = sealed
            .verify(&self.directories, created)
            .map_err(|e| ClientError::Verify(e.to_string()))?;
        if envelope.recipient() != &self.id {
            return Err(ClientError::Verify(format!(
                "envelope addressed to {}, not to us",
                envelope.recipient()
            )));
        }
        // The key the header names: current, or kept from before a rotation.
        let wanted = &envelope.header().recipient_key_id;
        let key = self.keys.encryption_key_by_id(wanted).ok_or_else(|| {
            ClientError::Credentials(format!(
                "envelope sealed to key {wanted}, which this organisation's key file does not hold"
            ))
        })?;
        let (body, chunk_key) = envelope
            .open_with_chunk_key(key)
            .map_err(|e| ClientError::Verify(e.to_string()))?;
        // The same rules as the sender's, as of the envelope's creation.
        forms::check(envelope.kind(), &body, created)?;
        // The workflow first: checking the fit reads what other processes added to the
        // book, which the child rule then asks about.
        let fitted = match self.book.get() {
            Some(book) => {
                let mut entry = Entry::new(envelope.header(), &body, Direction::Received)?;
                entry.at_ms = self.arrival(received, envelope.sealed());
                book.fits(&entry)?;
                Some((book, entry))
            }
            None => None,
        };
        let answered = MessageId::from_slice(&envelope.header().in_reply_to).ok();
        let child_case = answered.is_some_and(|id| self.in_child_case(&id.to_string()));
        forms::check_header(&body, envelope.header(), child_case)?;
        if let Some((book, entry)) = fitted {
            book.record(entry)?;
        }
        Ok(Opened {
            envelope,
            body,
            chunk_key: Some(chunk_key),
        })
    }
}

/// Checks that every receipt of a chain is signed by a party that may sign its stage for a
/// message from `sender` to `recipient` ([`receipt::check_signer_for`]).
pub fn check_chain(
    chain: &[VerifiedReceipt],
    sender: &OrgId,
    recipient: &OrgId,
) -> Result<(), ClientError> {
    for (i, r) in chain.iter().enumerate() {
        receipt::check_signer_for(r, sender, recipient)
            .map_err(|e| ClientError::Verify(format!("receipt {i}: {e}")))?;
    }
    Ok(())
}

/// The message id a sealed envelope's header names, read without verifying anything.
pub fn message_id_of(sealed: &SealedEnvelope) -> Result<MessageId, ClientError> {
    MessageId::from_slice(&header_of(sealed)?.message_id)
        .map_err(|e| ClientError::Verify(e.to_string()))
}

/// The header as the sender encoded it, decoded without verifying anything.
fn header_of(sealed: &SealedEnvelope) -> Result<pb::Header, ClientError> {
    use prost::Message;
    pb::Header::decode(sealed.header().as_bytes())
        .map_err(|_| ClientError::Verify("malformed header".into()))
}

/// The highest stage a chain of receipts reached, for display.
pub fn furthest_stage(receipts: &[VerifiedReceipt]) -> Stage {
    let rank = |s: Stage| match s {
        Stage::Unspecified => 0,
        Stage::Accepted => 1,
        Stage::Received => 2,
        Stage::Delivered => 3,
        Stage::Rejected => 4,
    };
    receipts
        .iter()
        .map(|r| r.stage())
        .max_by_key(|s| rank(*s))
        .unwrap_or(Stage::Unspecified)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A dev PKI with VN C02 and two KH organisations, and an opener for KH AHTD.
    fn setup() -> (tempfile::TempDir, Opener, KeyFile, Directories) {
        let tmp = tempfile::tempdir().unwrap();
        let spec = [
            accord_certs::CountrySpec {
                country: "vn".parse().unwrap(),
                gateway: "hanoi".into(),
                orgs: vec!["c02".into()],
            },
            accord_certs::CountrySpec {
                country: "kh".parse().unwrap(),
                gateway: "phnom-penh".into(),
                orgs: vec!["ahtd".into(), "other".into()],
            },
        ];
        let files = accord_certs::DevPki::write(tmp.path(), &spec, now_ms()).unwrap();
        let trust: Vec<pb::DirectoryTrust> = serde_json::from_slice(
            &std::fs::read(accord_certs::DevPki::trust_file(tmp.path())).unwrap(),
        )
        .unwrap();
        let signed = files.iter().map(|f| {
            serde_json::from_slice::<pb::SignedDirectory>(
                &std::fs::read(f.signed_directory()).unwrap(),
            )
            .unwrap()
        });
        let dirs = Directories::from_signed(signed, &trust, now_ms()).unwrap();
        let key = |cc: usize, org: &str| {
            accord_gateway::server::load_key_file(&files[cc].org_dir(org).join("keys.json"))
                .unwrap()
        };
        let opener = Opener {
            id: "spiffe://kh.accord/org/ahtd".parse().unwrap(),
            keys: key(1, "ahtd"),
            directories: dirs.clone(),
            book: std::sync::OnceLock::new(),
        };
        (tmp, opener, key(0, "c02"), dirs)
    }

    fn envelope_to(c02: &KeyFile, dirs: &Directories, to: &str) -> pb::InboxItem {
        let to: OrgId = to.parse().unwrap();
        let (current, pk) = dirs.current_encryption_key(&to, now_ms()).unwrap();
        let header = pb::Header {
            message_id: MessageId::new_v7(now_ms() as u64, [1; 10])
                .as_bytes()
                .to_vec(),
            kind: pb::Kind::Alert as i32,
            handling_code: "H0".into(),
            evaluation: "X4".into(),
            attachments: vec![],
            case_ref: "T1".into(),
            sender_org: "spiffe://vn.accord/org/c02".into(),
            recipient_org: to.to_string(),
            recipient_key_id: current,
            created_at_ms: now_ms(),
            expires_at_ms: now_ms() + 60_000,
            priority: pb::Priority::Routine as i32,
            ..Default::default()
        };
        let body = pb::Body {
            form: Some(pb::body::Form::Alert(pb::Alert {
                what: "x".into(),
                r#where: "y".into(),
                ..Default::default()
            })),
        };
        let sealed = envelope::seal(header, &body, &pk, &c02.signing).unwrap();
        pb::InboxItem {
            envelope: Some(sealed.to_wire()),
            envelope_hash: sealed.hash().0.to_vec(),
            received: None,
        }
    }

    #[test]
    fn a_client_opens_only_envelopes_addressed_to_it() {
        let (_tmp, opener, c02, dirs) = setup();
        let mine = envelope_to(&c02, &dirs, "spiffe://kh.accord/org/ahtd");
        assert!(opener.open(mine).is_ok());
        // A gateway handing us someone else's envelope: refused before any decryption.
        let theirs = envelope_to(&c02, &dirs, "spiffe://kh.accord/org/other");
        let err = opener.open(theirs).unwrap_err();
        assert!(err.to_string().contains("not to us"), "{err}");
    }
}
