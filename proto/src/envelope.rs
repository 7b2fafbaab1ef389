//! Envelope v1: sealing, verification and opening. Byte layout in `proto/ENVELOPE.md`.
//!
//! ```text
//! info        = "accord/v1/body" ‖ message_id(16)
//! aad         = header bytes (as serialized once by the sender)
//! commitment  = HPKE Export("accord/v1/commit", 32)
//! signed      = "accord/v1/envelope" ‖ u64be(len(header)) ‖ header ‖ SHA-256(ciphertext)
//! hash        = SHA-256(u64be(len(h)) ‖ h ‖ u64be(len(ct)) ‖ ct ‖ u64be(len(sig)) ‖ sig)
//! ```
//!
//! Types carry the state: a [`SealedEnvelope`] is bytes off the wire (size-checked); it becomes
//! a [`VerifiedEnvelope`] only through [`SealedEnvelope::verify`], which checks the header,
//! the sender's key in the directory and the signature. The header bytes are never re-encoded.

use prost::bytes::Bytes;
use prost::Message;

use zeroize::Zeroizing;

use crate::attachment::{self, AttachmentSealer, ChunkKey, SealedAttachment};
use crate::crypto::hpke::{self, RecipientKey};
use crate::crypto::{self, ct_eq, len_be, Domain, SigningKey};
use crate::directory::Directories;
use crate::ids::{EnvelopeHash, MessageId, OrgId};
use crate::pb;
use crate::UnixMillis;

const INFO_PREFIX: &[u8] = b"accord/v1/body";
const COMMIT_CONTEXT: &[u8] = b"accord/v1/commit";
const COMMITMENT_LEN: usize = 32;
const SIGNATURE_LEN: usize = 64;

/// How far in the future a sender's `created_at` may be, for clocks that drift.
pub const MAX_CLOCK_SKEW_MS: i64 = 5 * 60 * 1000;

/// Longest `expires_at - created_at`. With expiry checked against `now`, this bounds how far
/// back a sender can date an envelope, so a key past its validity cannot sign new ones by
/// backdating them into its old window.
pub const MAX_LIFETIME_MS: i64 = 31 * 24 * 3_600_000;

/// Size limits applied before any parsing or cryptography.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_header: usize,
    pub max_ciphertext: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_header: 4 * 1024,
            max_ciphertext: 4 * 1024 * 1024,
        }
    }
}

impl Limits {
    fn check(&self, header: &[u8], ciphertext: &[u8]) -> Result<(), EnvelopeError> {
        if header.len() > self.max_header {
            return Err(EnvelopeError::TooLarge("header"));
        }
        if ciphertext.len() > self.max_ciphertext {
            return Err(EnvelopeError::TooLarge("ciphertext"));
        }
        Ok(())
    }
}

/// Why an envelope is refused. [`EnvelopeError::reason`] gives the wire reason code.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum EnvelopeError {
    /// Header, ciphertext or signature exceeds the limits.
    #[error("envelope too large: {0}")]
    TooLarge(&'static str),
    /// The header is not a valid v1 header.
    #[error("malformed envelope: {0}")]
    Malformed(String),
    /// The sender or its key is not in the directory, or the key was not valid at creation.
    #[error("unknown sender key: {0}")]
    UnknownSender(String),
    /// The recipient or its key is not in the directory.
    #[error("unknown recipient key: {0}")]
    UnknownRecipient(String),
    /// The signature does not verify under the sender's key.
    #[error("sender signature does not verify")]
    BadSignature,
    /// `now` is at or past `expires_at`.
    #[error("envelope expired")]
    Expired,
    /// `created_at` is further in the future than the allowed clock skew.
    #[error("envelope created in the future (clock skew)")]
    ClockSkew,
    /// The ciphertext does not open under this recipient key, or was altered.
    #[error("ciphertext does not open with this key")]
    OpenFailed,
    /// The HPKE key commitment in the header does not match the opened context.
    #[error("key commitment mismatch")]
    CommitmentMismatch,
    /// Sealing failed (bad recipient key or randomness).
    #[error("sealing failed: {0}")]
    Seal(String),
}

impl EnvelopeError {
    /// The reason code carried by rejected receipts, log entries and statuses.
    pub fn reason(&self) -> pb::RejectReason {
        use pb::RejectReason as R;
        match self {
            EnvelopeError::TooLarge(_) => R::TooLarge,
            EnvelopeError::Malformed(_) | EnvelopeError::Seal(_) => R::Malformed,
            EnvelopeError::UnknownSender(_) => R::UnknownSender,
            EnvelopeError::UnknownRecipient(_) => R::UnknownRecipient,
            EnvelopeError::BadSignature
            | EnvelopeError::OpenFailed
            | EnvelopeError::CommitmentMismatch => R::BadSignature,
            EnvelopeError::Expired => R::Expired,
            EnvelopeError::ClockSkew => R::ClockSkew,
        }
    }
}

fn malformed(what: impl Into<String>) -> EnvelopeError {
    EnvelopeError::Malformed(what.into())
}

/// The sender's header bytes. Obtained only from a sealed envelope; never re-encoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeaderBytes(Bytes);

impl HeaderBytes {
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

/// An envelope as received: size-checked, not yet verified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SealedEnvelope {
    header: HeaderBytes,
    ciphertext: Bytes,
    signature: Bytes,
    /// Computed once on construction: every later use (receipts, log, dedupe) reads it.
    hash: EnvelopeHash,
}

impl SealedEnvelope {
    /// Takes an envelope off the wire, refusing oversize parts before anything else.
    pub fn from_wire(env: pb::Envelope, limits: &Limits) -> Result<Self, EnvelopeError> {
        limits.check(&env.header, &env.ciphertext)?;
        if env.signature.len() != SIGNATURE_LEN {
            return Err(malformed("signature must be 64 bytes"));
        }
        Ok(Self::new(
            HeaderBytes(env.header),
            env.ciphertext,
            env.signature,
        ))
    }

    fn new(header: HeaderBytes, ciphertext: Bytes, signature: Bytes) -> Self {
        let (h, c, s) = (&header.0, &ciphertext, &signature);
        let hash = EnvelopeHash(crypto::sha256(&[
            &len_be(h),
            h,
            &len_be(c),
            c,
            &len_be(s),
            s,
        ]));
        Self {
            header,
            ciphertext,
            signature,
            hash,
        }
    }

    /// Whether the envelope is within `limits`: for one taken off the wire under wider
    /// limits, to be looked up before it is held to the narrower ones.
    pub fn fits(&self, limits: &Limits) -> Result<(), EnvelopeError> {
        limits.check(&self.header.0, &self.ciphertext)
    }

    /// The sender's header bytes, e.g. to name a refused envelope without keeping it whole.
    pub fn header(&self) -> &HeaderBytes {
        &self.header
    }

    pub fn to_wire(&self) -> pb::Envelope {
        pb::Envelope {
            header: self.header.0.clone(),
            ciphertext: self.ciphertext.clone(),
            signature: self.signature.clone(),
        }
    }

    /// SHA-256 over the length-prefixed parts: the envelope's id for receipts and the log.
    pub fn hash(&self) -> EnvelopeHash {
        self.hash
    }

    /// Checks header, sender key (valid at `created_at`), signature, expiry and clock skew.
    pub fn verify(
        self,
        directories: &Directories,
        now: UnixMillis,
    ) -> Result<VerifiedEnvelope, EnvelopeError> {
        let header = ParsedHeader::decode(&self.header)?;
        directories
            .encryption_key(
                &header.recipient,
                &header.raw.recipient_key_id,
                header.raw.created_at_ms,
            )
            .map_err(|e| EnvelopeError::UnknownRecipient(e.to_string()))?;
        let sender_key = directories
            .signing_key(
                header.sender.spiffe(),
                &header.raw.sender_key_id,
                header.raw.created_at_ms,
            )
            .map_err(|e| EnvelopeError::UnknownSender(e.to_string()))?;
        crypto::verify(
            &sender_key,
            Domain::Envelope,
            &[
                &len_be(self.header.as_bytes()),
                self.header.as_bytes(),
                &crypto::sha256(&[&self.ciphertext]),
            ],
            &self.signature,
        )
        .map_err(|_| EnvelopeError::BadSignature)?;
        if header.raw.created_at_ms > now.saturating_add(MAX_CLOCK_SKEW_MS) {
            return Err(EnvelopeError::ClockSkew);
        }
        if now >= header.raw.expires_at_ms {
            return Err(EnvelopeError::Expired);
        }
        Ok(VerifiedEnvelope {
            hash: self.hash,
            sealed: self,
            header,
        })
    }
}

/// A header decoded from the sender's bytes, with its ids parsed.
#[derive(Clone, Debug, PartialEq)]
struct ParsedHeader {
    raw: pb::Header,
    id: MessageId,
    sender: OrgId,
    recipient: OrgId,
}

impl ParsedHeader {
    fn decode(bytes: &HeaderBytes) -> Result<Self, EnvelopeError> {
        let raw = pb::Header::decode(bytes.as_bytes()).map_err(|_| malformed("header"))?;
        // One header, one reading: protobuf would accept duplicate or unknown fields that
        // another decoder could read differently, so only the canonical encoding passes.
        if raw.encode_to_vec() != bytes.as_bytes() {
            return Err(malformed("header is not canonically encoded"));
        }
        let id = MessageId::from_slice(&raw.message_id).map_err(|_| malformed("message_id"))?;
        let sender: OrgId = raw
            .sender_org
            .parse()
            .map_err(|_| malformed("sender_org"))?;
        let recipient: OrgId = raw
            .recipient_org
            .parse()
            .map_err(|_| malformed("recipient_org"))?;
        if pb::Kind::try_from(raw.kind).unwrap_or(pb::Kind::Unspecified) == pb::Kind::Unspecified {
            return Err(malformed("kind"));
        }
        if pb::Priority::try_from(raw.priority).unwrap_or(pb::Priority::Unspecified)
            == pb::Priority::Unspecified
        {
            return Err(malformed("priority"));
        }
        if raw.hpke_enc.len() != hpke::N_ENC {
            return Err(malformed("hpke_enc"));
        }
        if raw.key_commitment.len() != COMMITMENT_LEN {
            return Err(malformed("key_commitment"));
        }
        if !raw.in_reply_to.is_empty() && MessageId::from_slice(&raw.in_reply_to).is_err() {
            return Err(malformed("in_reply_to"));
        }
        if raw.expires_at_ms <= raw.created_at_ms {
            return Err(malformed("expires_at before created_at"));
        }
        if raw
            .expires_at_ms
            .checked_sub(raw.created_at_ms)
            .is_none_or(|lifetime| lifetime > MAX_LIFETIME_MS)
        {
            return Err(malformed("lifetime longer than MAX_LIFETIME_MS"));
        }
        // A reference, not free text: it is printed, logged by clients and kept in their
        // case books, so no control or bidi characters, no quotes, no newlines.
        if raw.case_ref.is_empty()
            || raw.case_ref.len() > 128
            || !raw
                .case_ref
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._/-".contains(&b))
        {
            return Err(malformed("case_ref"));
        }
        if raw.sender_key_id.is_empty() || raw.recipient_key_id.is_empty() {
            return Err(malformed("key ids"));
        }
        if raw.handling_code.parse::<crate::codes::Handling>().is_err() {
            return Err(malformed("handling_code"));
        }
        if !raw.evaluation.is_empty() && raw.evaluation.parse::<crate::codes::Evaluation>().is_err()
        {
            return Err(malformed("evaluation"));
        }
        if raw.attachments.len() > attachment::MAX_ATTACHMENTS {
            return Err(malformed("too many attachments"));
        }
        for d in &raw.attachments {
            attachment::check_digest(d).map_err(|e| malformed(e.to_string()))?;
        }
        Ok(Self {
            raw,
            id,
            sender,
            recipient,
        })
    }
}

/// An envelope whose sender signature verified against the directory.
#[derive(Clone, PartialEq)]
pub struct VerifiedEnvelope {
    sealed: SealedEnvelope,
    header: ParsedHeader,
    hash: EnvelopeHash,
}

/// Ids and hashes only: case references and handling codes stay out of logs.
impl std::fmt::Debug for VerifiedEnvelope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifiedEnvelope")
            .field("id", &self.header.id)
            .field("hash", &self.hash)
            .finish_non_exhaustive()
    }
}

impl VerifiedEnvelope {
    pub fn id(&self) -> MessageId {
        self.header.id
    }
    pub fn hash(&self) -> EnvelopeHash {
        self.hash
    }
    pub fn sender(&self) -> &OrgId {
        &self.header.sender
    }
    pub fn recipient(&self) -> &OrgId {
        &self.header.recipient
    }
    /// The decoded header, for reading fields. Never re-encode it.
    pub fn header(&self) -> &pb::Header {
        &self.header.raw
    }
    pub fn kind(&self) -> pb::Kind {
        pb::Kind::try_from(self.header.raw.kind).unwrap_or(pb::Kind::Unspecified)
    }
    pub fn priority(&self) -> pb::Priority {
        pb::Priority::try_from(self.header.raw.priority).unwrap_or(pb::Priority::Unspecified)
    }
    pub fn expires_at(&self) -> UnixMillis {
        self.header.raw.expires_at_ms
    }
    pub fn sealed(&self) -> &SealedEnvelope {
        &self.sealed
    }
    pub fn to_wire(&self) -> pb::Envelope {
        self.sealed.to_wire()
    }

    /// The attachments the signed header commits to.
    pub fn attachments(&self) -> &[pb::AttachmentDigest] {
        &self.header.raw.attachments
    }

    /// Opens the body with the recipient's X25519 key, checking the key commitment first.
    pub fn open(&self, key: &RecipientKey) -> Result<pb::Body, EnvelopeError> {
        self.open_with_chunk_key(key).map(|(body, _)| body)
    }

    /// [`VerifiedEnvelope::open`], also giving the key that decrypts the attachments' chunks.
    pub fn open_with_chunk_key(
        &self,
        key: &RecipientKey,
    ) -> Result<(pb::Body, ChunkKey), EnvelopeError> {
        let info = [INFO_PREFIX, self.header.id.as_bytes()].concat();
        let mut ctx = hpke::setup_base_recipient(&self.header.raw.hpke_enc, key, &info)
            .map_err(|_| EnvelopeError::OpenFailed)?;
        let commitment = ctx
            .export(COMMIT_CONTEXT, COMMITMENT_LEN)
            .map_err(|_| EnvelopeError::OpenFailed)?;
        if !ct_eq(&commitment, &self.header.raw.key_commitment) {
            return Err(EnvelopeError::CommitmentMismatch);
        }
        let secret = Zeroizing::new(
            ctx.export(attachment::EXPORT_CONTEXT, 32)
                .map_err(|_| EnvelopeError::OpenFailed)?,
        );
        let plaintext = ctx
            .open(self.sealed.header.as_bytes(), &self.sealed.ciphertext)
            .map_err(|_| EnvelopeError::OpenFailed)?;
        let body = pb::Body::decode(plaintext.as_slice()).map_err(|_| malformed("body"))?;
        Ok((body, ChunkKey::new(secret, self.header.id)))
    }
}

/// Seals `body` for the recipient and signs it, with a fresh ephemeral key.
///
/// `header` carries every field but `sender_key_id`, `hpke_enc` and `key_commitment`, which
/// this fills in.
pub fn seal(
    header: pb::Header,
    body: &pb::Body,
    recipient_key: &[u8; 32],
    signer: &SigningKey,
) -> Result<SealedEnvelope, EnvelopeError> {
    Sealer::new(header, recipient_key)?.seal(body, signer)
}

/// [`seal`] with caller-chosen ephemeral randomness, for known-answer vectors only.
///
/// Dangerous: the same `ikm_e` with the same message id reuses the AES-GCM key and nonce.
pub fn seal_with_ephemeral_ikm(
    header: pb::Header,
    body: &pb::Body,
    recipient_key: &[u8; 32],
    signer: &SigningKey,
    ikm_e: &[u8; 32],
) -> Result<SealedEnvelope, EnvelopeError> {
    Sealer::with_ephemeral_ikm(header, recipient_key, ikm_e)?.seal(body, signer)
}

/// Seals an envelope in steps, for one that carries attachments: set up the HPKE context,
/// encrypt each attachment chunk by chunk ([`Sealer::attachment`]), add its digest to the
/// header ([`Sealer::add_attachment`]), then seal the body and sign ([`Sealer::seal`]).
/// The header is serialized once, at the end, with every digest in it.
#[derive(Debug)]
pub struct Sealer {
    header: pb::Header,
    ctx: hpke::SenderContext,
    chunk_key: ChunkKey,
    /// Attachment indexes handed out: each sealer gets its own, so no two share a nonce.
    reserved: u32,
}

impl Sealer {
    /// Sets up the context for `header`'s message id with a fresh ephemeral key.
    pub fn new(header: pb::Header, recipient_key: &[u8; 32]) -> Result<Self, EnvelopeError> {
        let ikm_e =
            Zeroizing::new(crypto::random::<32>().map_err(|e| EnvelopeError::Seal(e.to_string()))?);
        Self::with_ephemeral_ikm(header, recipient_key, &ikm_e)
    }

    /// [`Sealer::new`] with caller-chosen ephemeral randomness, for known-answer vectors
    /// only. Dangerous: the same `ikm_e` with the same message id reuses every key and nonce.
    pub fn with_ephemeral_ikm(
        mut header: pb::Header,
        recipient_key: &[u8; 32],
        ikm_e: &[u8; 32],
    ) -> Result<Self, EnvelopeError> {
        let id = MessageId::from_slice(&header.message_id).map_err(|_| malformed("message_id"))?;
        let info = [INFO_PREFIX, id.as_bytes()].concat();
        let seal_err = |e: hpke::HpkeError| EnvelopeError::Seal(e.to_string());
        let (enc, ctx) = hpke::setup_base_sender(recipient_key, &info, ikm_e).map_err(seal_err)?;
        header.hpke_enc = enc.to_vec();
        header.key_commitment = ctx
            .export(COMMIT_CONTEXT, COMMITMENT_LEN)
            .map_err(seal_err)?;
        let secret = Zeroizing::new(
            ctx.export(attachment::EXPORT_CONTEXT, 32)
                .map_err(seal_err)?,
        );
        header.attachments.clear();
        Ok(Self {
            header,
            ctx,
            chunk_key: ChunkKey::new(secret, id),
            reserved: 0,
        })
    }

    /// A sealer for the next attachment, cut in `chunk_size` plaintext bytes. It reserves
    /// the next index, so two sealers never encrypt under the same nonces; add what it
    /// seals with [`Sealer::add_attachment`], in the order they were reserved.
    pub fn attachment(&mut self, chunk_size: u32) -> Result<AttachmentSealer<'_>, EnvelopeError> {
        if self.reserved as usize >= attachment::MAX_ATTACHMENTS {
            return Err(malformed("too many attachments"));
        }
        if !(attachment::MIN_CHUNK_SIZE..=attachment::MAX_CHUNK_SIZE).contains(&chunk_size) {
            return Err(malformed("chunk size out of range"));
        }
        self.reserved += 1;
        Ok(AttachmentSealer::new(
            &self.chunk_key,
            self.reserved - 1,
            chunk_size,
        ))
    }

    /// The header as it will be serialized (less `sender_key_id`), for checks before sealing.
    pub fn header(&self) -> &pb::Header {
        &self.header
    }

    /// Puts a sealed attachment's digest at its reserved place; refused out of order.
    pub fn add_attachment(&mut self, sealed: SealedAttachment) -> Result<(), EnvelopeError> {
        if sealed.index as usize != self.header.attachments.len() {
            return Err(malformed(
                "attachments added out of the order they were sealed",
            ));
        }
        self.header.attachments.push(sealed.digest);
        Ok(())
    }

    /// Puts a digest whose chunks this sealer did not seal in the header, at the next index
    /// (reserved here, so no chunk of this sealer shares its nonces): for testing how
    /// gateways and recipients treat headers that honest senders do not write.
    pub fn add_unsealed_digest(
        &mut self,
        digest: pb::AttachmentDigest,
    ) -> Result<(), EnvelopeError> {
        if self.reserved as usize != self.header.attachments.len() {
            return Err(malformed("an attachment is being sealed"));
        }
        self.reserved += 1;
        self.header.attachments.push(digest);
        Ok(())
    }

    /// Serializes the header once, seals `body` with it as `aad`, and signs.
    pub fn seal(
        mut self,
        body: &pb::Body,
        signer: &SigningKey,
    ) -> Result<SealedEnvelope, EnvelopeError> {
        self.header.sender_key_id = signer.key_id().to_owned();
        let header_bytes = self.header.encode_to_vec();
        let ciphertext = self
            .ctx
            .seal(&header_bytes, &body.encode_to_vec())
            .map_err(|e| EnvelopeError::Seal(e.to_string()))?;
        let signature = signer.sign(
            Domain::Envelope,
            &[
                &len_be(&header_bytes),
                &header_bytes,
                &crypto::sha256(&[&ciphertext]),
            ],
        );
        Ok(SealedEnvelope::new(
            HeaderBytes(header_bytes.into()),
            ciphertext.into(),
            Bytes::copy_from_slice(&signature),
        ))
    }
}

#[cfg(test)]
mod tests;
