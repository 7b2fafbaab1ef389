//! C2SP signed notes, transparency-log checkpoints and Ed25519 cosignatures.
//!
//! - [signed-note](https://c2sp.org/signed-note@v1.0.0): text ending in a newline, a blank
//!   line, then one or more lines `— <key name> base64(key ID ‖ signature)`. A key ID is
//!   `SHA-256(key name ‖ 0x0A ‖ signature type ‖ public key)[:4]`; Ed25519 is type `0x01`
//!   and signs the note text exactly. Verifier keys read
//!   `<key name>+hex(key ID)+base64(signature type ‖ public key)`.
//! - [tlog-checkpoint](https://c2sp.org/tlog-checkpoint@v1.0.0): the note text of a log's
//!   tree head — origin, decimal tree size, base64 root hash, optional extension lines.
//! - [tlog-cosignature](https://c2sp.org/tlog-cosignature@v1.0.1): a witness's Ed25519
//!   cosignature (type `0x04`) is a note signature whose bytes are
//!   `key ID ‖ u64be(timestamp) ‖ Ed25519("cosignature/v1\ntime <timestamp>\n" ‖ note text)`.
//!
//! Accord uses one name for a gateway's log: the checkpoint origin and the log key name are
//! both `accord.<cc>/<gateway-name>` (e.g. `accord.vn/hanoi`); see `docs/checkpoints.md`.
//!
//! Parsing is bounded ([`MAX_NOTE_SIZE`], [`MAX_SIGNATURES`]) and never panics on input.

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;

use crate::crypto::{self, sha256, Domain, SigningKey};

/// Largest signed note [`open`] and [`add_signatures`] accept, in bytes.
pub const MAX_NOTE_SIZE: usize = 1 << 20;
/// Most signature lines a note may carry. The spec requires accepting at least 16 and
/// suggests a limit; the Go reference (`golang.org/x/mod/sumdb/note`) uses 100.
pub const MAX_SIGNATURES: usize = 100;
/// Signature type byte of an Ed25519 note signature (signed-note).
pub const SIG_TYPE_ED25519: u8 = 0x01;
/// Signature type byte of a timestamped Ed25519 cosignature (tlog-cosignature v1).
pub const SIG_TYPE_COSIGNATURE_V1: u8 = 0x04;
/// Largest cosignature timestamp the spec allows (`2^63 - 1`).
pub const MAX_COSIGNATURE_TIMESTAMP: u64 = i64::MAX as u64;

/// The prefix of every signature line: em dash (U+2014) and a space.
const SIG_PREFIX: &str = "\u{2014} ";
/// Bytes of a cosignature/v1 payload after the key ID: u64 timestamp and Ed25519 signature.
const COSIG_LEN: usize = 8 + 64;

/// Why a note, key or checkpoint was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum NoteError {
    /// The text is not a well-formed signed note, signature line or verifier key.
    #[error("malformed note: {0}")]
    Malformed(String),
    /// A key name is empty or contains a Unicode space, a plus sign or an ASCII control character.
    #[error("invalid key name: {0:?}")]
    InvalidName(String),
    /// The note exceeds [`MAX_NOTE_SIZE`].
    #[error("note larger than {MAX_NOTE_SIZE} bytes")]
    TooLarge,
    /// The note carries more than [`MAX_SIGNATURES`] signature lines.
    #[error("more than {MAX_SIGNATURES} signature lines")]
    TooManySignatures,
    /// A verifier key's key ID does not match its name and public key.
    #[error("verifier key id does not match its name and key")]
    KeyIdMismatch,
    /// A verifier key has a signature type this module does not implement.
    #[error("unsupported signature type 0x{0:02x}")]
    UnsupportedType(u8),
    /// The signature line is not by this verifier's key (name or key ID differ).
    #[error("signature line is not by this key")]
    UnknownKey,
    /// Two different known keys share a key name and key ID.
    #[error("ambiguous verifier keys for {0}")]
    AmbiguousKey(String),
    /// A signature by a known key does not verify; the whole note is refused.
    #[error("signature by a known key does not verify")]
    BadSignature,
    /// No signature by a known key: the note must be ignored.
    #[error("no signature by a known key")]
    NoValidSignature,
    /// A cosignature timestamp exceeds `2^63 - 1`.
    #[error("cosignature timestamp out of range")]
    InvalidTimestamp,
    /// The note text is not a well-formed checkpoint.
    #[error("malformed checkpoint: {0}")]
    Checkpoint(String),
}

fn malformed(why: &str) -> NoteError {
    NoteError::Malformed(why.to_string())
}

/// Key names: non-empty, no Unicode space, no `+` (signed-note), and no ASCII control
/// character (a note may not contain one, and a name ends up in a note).
fn check_name(name: &str) -> Result<(), NoteError> {
    let bad = |c: char| c.is_whitespace() || c == '+' || c < ' ';
    if name.is_empty() || name.contains(bad) {
        return Err(NoteError::InvalidName(name.to_string()));
    }
    Ok(())
}

/// Note text rule: no ASCII control character other than newline. (`&str` is valid UTF-8,
/// and UTF-8 continuation bytes are all >= 0x80, so a byte scan suffices.)
fn check_text_bytes(text: &str) -> Result<(), NoteError> {
    if text.bytes().any(|b| b < 0x20 && b != b'\n') {
        return Err(malformed("control character other than newline"));
    }
    Ok(())
}

/// `SHA-256(name ‖ 0x0A ‖ type ‖ public key)[:4]`.
fn key_id(name: &str, sig_type: u8, public_key: &[u8; 32]) -> [u8; 4] {
    let h = sha256(&[name.as_bytes(), b"\n", &[sig_type], public_key]);
    [h[0], h[1], h[2], h[3]]
}

fn signature_line(name: &str, key_id: [u8; 4], sig: &[&[u8]]) -> String {
    let mut raw = key_id.to_vec();
    for part in sig {
        raw.extend_from_slice(part);
    }
    format!("{SIG_PREFIX}{name} {}\n", B64.encode(raw))
}

/// `<name>+<8 hex key id>+<base64(type ‖ public key)>`.
fn vkey_string(name: &str, key_id: [u8; 4], sig_type: u8, public_key: &[u8; 32]) -> String {
    let mut material = Vec::with_capacity(33);
    material.push(sig_type);
    material.extend_from_slice(public_key);
    format!("{name}+{}+{}", hex::encode(key_id), B64.encode(material))
}

/// Parses a verifier key of the given signature type and checks its key ID.
fn parse_vkey(s: &str, want_type: u8) -> Result<(String, [u8; 4], [u8; 32]), NoteError> {
    // The base64 part may itself contain '+': split on the first two only.
    let mut parts = s.splitn(3, '+');
    let (Some(name), Some(id_hex), Some(material)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(malformed("verifier key needs three '+'-separated parts"));
    };
    check_name(name)?;
    // The spec's hex encoding is fixed-length lowercase.
    if id_hex.len() != 8
        || !id_hex
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    {
        return Err(malformed("verifier key id is not 8 lowercase hex digits"));
    }
    let mut id = [0u8; 4];
    hex::decode_to_slice(id_hex, &mut id).map_err(|_| malformed("verifier key id"))?;
    let material = B64
        .decode(material)
        .map_err(|_| malformed("verifier key material is not base64"))?;
    let Some((&sig_type, pk)) = material.split_first() else {
        return Err(malformed("empty verifier key material"));
    };
    if sig_type != want_type {
        return Err(NoteError::UnsupportedType(sig_type));
    }
    let pk: [u8; 32] = pk
        .try_into()
        .map_err(|_| malformed("Ed25519 public key is not 32 bytes"))?;
    if key_id(name, sig_type, &pk) != id {
        return Err(NoteError::KeyIdMismatch);
    }
    Ok((name.to_string(), id, pk))
}

/// One parsed signature line.
struct SigLine<'a> {
    /// The line as written, without its final newline.
    raw: &'a str,
    name: &'a str,
    key_id: [u8; 4],
    /// The signature bytes after the key ID.
    sig: Vec<u8>,
}

/// Parses `— <name> <base64>` (without the final newline).
fn parse_sig_line(line: &str) -> Result<SigLine<'_>, NoteError> {
    let rest = line
        .strip_prefix(SIG_PREFIX)
        .ok_or_else(|| malformed("signature line does not start with \"— \""))?;
    let (name, b64) = rest
        .split_once(' ')
        .ok_or_else(|| malformed("signature line has no signature"))?;
    check_name(name).map_err(|_| malformed("invalid key name in signature line"))?;
    let raw = B64
        .decode(b64)
        .map_err(|_| malformed("signature is not base64"))?;
    // A key ID and at least one signature byte (as the Go reference requires).
    if raw.len() < 5 {
        return Err(malformed("signature shorter than key id + 1 byte"));
    }
    let key_id = [raw[0], raw[1], raw[2], raw[3]];
    Ok(SigLine {
        raw: line,
        name,
        key_id,
        sig: raw[4..].to_vec(),
    })
}

/// Splits a signed note into its text (with final newline) and signature lines, checking
/// the syntax and limits but no signature.
fn split(note: &str) -> Result<(&str, Vec<SigLine<'_>>), NoteError> {
    if note.len() > MAX_NOTE_SIZE {
        return Err(NoteError::TooLarge);
    }
    check_text_bytes(note)?;
    // The text is separated from the signatures by the last empty line.
    let split = note
        .rfind("\n\n")
        .ok_or_else(|| malformed("no blank line before the signatures"))?;
    let text = &note[..split + 1];
    let sigs = &note[split + 2..];
    if sigs.is_empty() {
        return Err(malformed("no signature lines"));
    }
    let Some(sigs) = sigs.strip_suffix('\n') else {
        return Err(malformed("note does not end in newline"));
    };
    let mut lines = Vec::new();
    for line in sigs.split('\n') {
        if lines.len() == MAX_SIGNATURES {
            return Err(NoteError::TooManySignatures);
        }
        lines.push(parse_sig_line(line)?);
    }
    Ok((text, lines))
}

/// The text of a signed note (with final newline), its signatures not verified: for a note
/// its holder signed and stored itself, whose signing key may since have been rotated.
pub fn unverified_text(note: &str) -> Result<&str, NoteError> {
    split(note).map(|(text, _)| text)
}

/// Checks a note text before signing: ends in newline, no control characters, size.
fn check_body(body: &str) -> Result<(), NoteError> {
    if body.len() > MAX_NOTE_SIZE {
        return Err(NoteError::TooLarge);
    }
    if !body.ends_with('\n') {
        return Err(malformed("note text does not end in newline"));
    }
    check_text_bytes(body)
}

/// A note signer: key name + Ed25519 key (signature type `0x01`).
///
/// Its [`verifier_key`](Self::verifier_key) is
/// `<name>+<8 hex key id>+<base64(0x01 ‖ public key)>`. Debug shows no secret.
pub struct NoteSigner {
    name: String,
    key_id: [u8; 4],
    key: SigningKey,
}

impl NoteSigner {
    /// A signer under `name` (for a log: its checkpoint origin, e.g. `accord.vn/hanoi`).
    pub fn new(name: &str, key: SigningKey) -> Result<Self, NoteError> {
        check_name(name)?;
        Ok(Self {
            name: name.to_string(),
            key_id: key_id(name, SIG_TYPE_ED25519, &key.public_key()),
            key,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `SHA-256(name ‖ 0x0A ‖ 0x01 ‖ public key)[:4]`.
    pub fn key_id(&self) -> [u8; 4] {
        self.key_id
    }

    pub fn public_key(&self) -> [u8; 32] {
        self.key.public_key()
    }

    /// The verifier key string to give to verifiers.
    pub fn verifier_key(&self) -> String {
        vkey_string(
            &self.name,
            self.key_id,
            SIG_TYPE_ED25519,
            &self.key.public_key(),
        )
    }

    /// The matching [`NoteVerifier`].
    pub fn verifier(&self) -> NoteVerifier {
        NoteVerifier {
            name: self.name.clone(),
            key_id: self.key_id,
            public_key: self.key.public_key(),
        }
    }

    /// Signs `body` (which must end in a newline) and returns the full signed note:
    /// `body ‖ "\n" ‖ "— <name> base64(key id ‖ signature)\n"`.
    pub fn sign(&self, body: &str) -> Result<String, NoteError> {
        check_body(body)?;
        let sig = self.key.sign(Domain::SignedNote, &[body.as_bytes()]);
        let line = signature_line(&self.name, self.key_id, &[&sig]);
        Ok(format!("{body}\n{line}"))
    }
}

impl fmt::Debug for NoteSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NoteSigner")
            .field("name", &self.name)
            .field("key_id", &hex::encode(self.key_id))
            .field("public_key", &hex::encode(self.key.public_key()))
            .finish_non_exhaustive()
    }
}

/// A known Ed25519 note key (signature type `0x01`), parsed from its verifier key string.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NoteVerifier {
    pub name: String,
    pub key_id: [u8; 4],
    pub public_key: [u8; 32],
}

impl NoteVerifier {
    /// The verifier for `name` and an Ed25519 public key, with its derived key ID.
    pub fn from_public_key(name: &str, pk: [u8; 32]) -> Result<Self, NoteError> {
        check_name(name)?;
        Ok(Self {
            name: name.to_string(),
            key_id: key_id(name, SIG_TYPE_ED25519, &pk),
            public_key: pk,
        })
    }
}

impl FromStr for NoteVerifier {
    type Err = NoteError;

    /// Parses `<name>+<8 hex key id>+<base64(0x01 ‖ public key)>`, checking the key ID.
    fn from_str(s: &str) -> Result<Self, NoteError> {
        let (name, key_id, public_key) = parse_vkey(s, SIG_TYPE_ED25519)?;
        Ok(Self {
            name,
            key_id,
            public_key,
        })
    }
}

impl fmt::Display for NoteVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&vkey_string(
            &self.name,
            self.key_id,
            SIG_TYPE_ED25519,
            &self.public_key,
        ))
    }
}

/// A signed note whose signatures by known keys all verified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenedNote {
    /// The note text, including its final newline (what was signed).
    pub body: String,
    /// Names of the known keys whose signatures verified, in note order, without repeats.
    pub verified_by: Vec<String>,
    /// Every signature line as written, known or not, each with its final newline; pass
    /// them to [`CosignatureVerifier::verify_line`] or back to [`add_signatures`].
    pub signature_lines: Vec<String>,
}

/// Splits a signed note and verifies the signatures by known verifiers.
///
/// Signatures whose (name, key ID) match no verifier are ignored, as the spec requires
/// (cosignatures, rotated keys). Every signature by a known key must verify, or the whole
/// note is refused ([`NoteError::BadSignature`]); at least one must exist
/// ([`NoteError::NoValidSignature`]).
pub fn open(note: &str, verifiers: &[NoteVerifier]) -> Result<OpenedNote, NoteError> {
    let (text, lines) = split(note)?;
    let mut verified_by: Vec<String> = Vec::new();
    let mut signature_lines = Vec::with_capacity(lines.len());
    for line in &lines {
        signature_lines.push(format!("{}\n", line.raw));
        let mut known = verifiers
            .iter()
            .filter(|v| v.name == line.name && v.key_id == line.key_id);
        let Some(v) = known.next() else {
            continue;
        };
        if known.any(|other| other.public_key != v.public_key) {
            return Err(NoteError::AmbiguousKey(v.name.clone()));
        }
        crypto::verify(
            &v.public_key,
            Domain::SignedNote,
            &[text.as_bytes()],
            &line.sig,
        )
        .map_err(|_| NoteError::BadSignature)?;
        if !verified_by.contains(&v.name) {
            verified_by.push(v.name.clone());
        }
    }
    if verified_by.is_empty() {
        return Err(NoteError::NoValidSignature);
    }
    Ok(OpenedNote {
        body: text.to_string(),
        verified_by,
        signature_lines,
    })
}

/// Adds signature lines (e.g. cosignatures) to a signed note, verifying nothing.
///
/// Each line is `— <name> <base64>` with or without its final newline. As in the Go
/// reference's `note.Sign`, an existing line with the same key name and key ID as a new
/// one is replaced by it, and a new line repeated is added once. The result must stay
/// within [`MAX_SIGNATURES`] and [`MAX_NOTE_SIZE`].
pub fn add_signatures(note: &str, lines: &[String]) -> Result<String, NoteError> {
    let (text, existing) = split(note)?;
    let mut new = Vec::with_capacity(lines.len());
    for line in lines {
        let line = line.strip_suffix('\n').unwrap_or(line);
        if line.contains('\n') {
            return Err(malformed("a signature line contains a newline"));
        }
        check_text_bytes(line)?;
        let parsed = parse_sig_line(line)?;
        if !new.iter().any(|n: &SigLine<'_>| n.raw == parsed.raw) {
            new.push(parsed);
        }
    }
    let replaced = |old: &SigLine<'_>| {
        new.iter()
            .any(|n| n.name == old.name && n.key_id == old.key_id)
    };
    let kept: Vec<&SigLine<'_>> = existing.iter().filter(|old| !replaced(old)).collect();
    if kept.len() + new.len() > MAX_SIGNATURES {
        return Err(NoteError::TooManySignatures);
    }
    let mut out =
        String::with_capacity(note.len() + lines.iter().map(|l| l.len() + 1).sum::<usize>());
    out.push_str(text);
    out.push('\n');
    for line in kept.into_iter().chain(new.iter()) {
        out.push_str(line.raw);
        out.push('\n');
    }
    if out.len() > MAX_NOTE_SIZE {
        return Err(NoteError::TooLarge);
    }
    Ok(out)
}

/// A transparency-log checkpoint: the note text of a signed tree head.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    /// The log's identity; Accord uses `accord.<cc>/<gateway-name>`.
    pub origin: String,
    /// Number of leaves in the tree.
    pub size: u64,
    /// RFC 6962 root hash at `size`.
    pub root: [u8; 32],
    /// Opaque extension lines, non-empty, without newlines. Accord writes none.
    pub extensions: Vec<String>,
}

impl Checkpoint {
    /// `<origin>\n<size>\n<base64 root>\n` followed by one line per extension.
    ///
    /// Meaningful only for a checkpoint that passes [`validate`](Self::validate).
    pub fn to_body(&self) -> String {
        let mut body = format!(
            "{}\n{}\n{}\n",
            self.origin,
            self.size,
            B64.encode(self.root)
        );
        for ext in &self.extensions {
            body.push_str(ext);
            body.push('\n');
        }
        body
    }

    /// Checks that the fields can be written as a checkpoint: origin and extension lines
    /// non-empty, with no newline or other control character.
    pub fn validate(&self) -> Result<(), NoteError> {
        let bad = |s: &str| s.is_empty() || s.bytes().any(|b| b < 0x20);
        if bad(&self.origin) {
            return Err(NoteError::Checkpoint(
                "origin is empty or has a control character".into(),
            ));
        }
        if self.extensions.iter().any(|e| bad(e)) {
            return Err(NoteError::Checkpoint(
                "extension line is empty or has a control character".into(),
            ));
        }
        Ok(())
    }

    /// Parses a checkpoint note text (as returned in [`OpenedNote::body`]).
    ///
    /// The origin is not required to be a URL (the spec forbids assuming it); the caller
    /// compares it with the origin it expects.
    pub fn parse(body: &str) -> Result<Self, NoteError> {
        let err = |why: &str| NoteError::Checkpoint(why.to_string());
        if body.len() > MAX_NOTE_SIZE {
            return Err(NoteError::TooLarge);
        }
        if body.bytes().any(|b| b < 0x20 && b != b'\n') {
            return Err(err("control character other than newline"));
        }
        let body = body
            .strip_suffix('\n')
            .ok_or_else(|| err("does not end in newline"))?;
        let mut lines = body.split('\n');
        let (Some(origin), Some(size), Some(root)) = (lines.next(), lines.next(), lines.next())
        else {
            return Err(err("fewer than three lines"));
        };
        if origin.is_empty() {
            return Err(err("empty origin"));
        }
        let size = parse_size(size).ok_or_else(|| err("tree size is not canonical decimal"))?;
        let root: [u8; 32] = B64
            .decode(root)
            .map_err(|_| err("root hash is not base64"))?
            .try_into()
            .map_err(|_| err("root hash is not 32 bytes"))?;
        let extensions: Vec<String> = lines.map(str::to_string).collect();
        if extensions.iter().any(String::is_empty) {
            return Err(err("empty extension line"));
        }
        Ok(Self {
            origin: origin.to_string(),
            size,
            root,
            extensions,
        })
    }
}

/// ASCII decimal with no sign and no leading zero (except `0` itself), fitting in u64.
fn parse_size(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) || (s.len() > 1 && s.starts_with('0'))
    {
        return None;
    }
    s.parse().ok()
}

/// A witness's cosigner key: tlog-cosignature v1, Ed25519, signature type `0x04`.
///
/// The signed message does not include the cosigner's name, so one key must serve one
/// cosigner name only (spec). Debug shows no secret.
pub struct Cosigner {
    name: String,
    key_id: [u8; 4],
    key: SigningKey,
}

impl Cosigner {
    /// A cosigner under `name` (Accord: the witnessing gateway's `accord.<cc>/<name>`).
    pub fn new(name: &str, key: SigningKey) -> Result<Self, NoteError> {
        check_name(name)?;
        Ok(Self {
            name: name.to_string(),
            key_id: key_id(name, SIG_TYPE_COSIGNATURE_V1, &key.public_key()),
            key,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `SHA-256(name ‖ 0x0A ‖ 0x04 ‖ public key)[:4]`.
    pub fn key_id(&self) -> [u8; 4] {
        self.key_id
    }

    pub fn verifier(&self) -> CosignatureVerifier {
        CosignatureVerifier {
            name: self.name.clone(),
            key_id: self.key_id,
            public_key: self.key.public_key(),
        }
    }

    /// Cosigns a checkpoint note text at `timestamp` (POSIX seconds, at most `2^63 - 1`).
    ///
    /// Returns one signature line `— <name> base64(key id ‖ u64be(timestamp) ‖ sig)\n`
    /// where `sig` signs `"cosignature/v1\ntime <timestamp>\n" ‖ checkpoint_body`. The body
    /// must parse as a [`Checkpoint`]: a cosigner only vouches for checkpoints.
    pub fn cosign(&self, checkpoint_body: &str, timestamp: u64) -> Result<String, NoteError> {
        if timestamp > MAX_COSIGNATURE_TIMESTAMP {
            return Err(NoteError::InvalidTimestamp);
        }
        Checkpoint::parse(checkpoint_body)?;
        let time_line = format!("time {timestamp}\n");
        let sig = self.key.sign(
            Domain::Cosignature,
            &[time_line.as_bytes(), checkpoint_body.as_bytes()],
        );
        Ok(signature_line(
            &self.name,
            self.key_id,
            &[&timestamp.to_be_bytes(), &sig],
        ))
    }
}

impl fmt::Debug for Cosigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cosigner")
            .field("name", &self.name)
            .field("key_id", &hex::encode(self.key_id))
            .field("public_key", &hex::encode(self.key.public_key()))
            .finish_non_exhaustive()
    }
}

/// A known cosigner key (tlog-cosignature v1, type `0x04`).
///
/// Its verifier key string (`FromStr`/`Display`) is
/// `<name>+<8 hex key id>+<base64(0x04 ‖ public key)>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CosignatureVerifier {
    pub name: String,
    pub key_id: [u8; 4],
    pub public_key: [u8; 32],
}

impl CosignatureVerifier {
    /// The verifier for `name` and an Ed25519 public key, with its derived type-0x04 key ID.
    pub fn from_public_key(name: &str, pk: [u8; 32]) -> Result<Self, NoteError> {
        check_name(name)?;
        Ok(Self {
            name: name.to_string(),
            key_id: key_id(name, SIG_TYPE_COSIGNATURE_V1, &pk),
            public_key: pk,
        })
    }

    /// Verifies one signature line (with or without its final newline) as this cosigner's
    /// cosignature over `checkpoint_body`, and returns its timestamp.
    ///
    /// [`NoteError::UnknownKey`] if the line is by another key (callers skip it);
    /// [`NoteError::BadSignature`] if it is by this key and does not verify.
    pub fn verify_line(&self, checkpoint_body: &str, line: &str) -> Result<u64, NoteError> {
        let line = line.strip_suffix('\n').unwrap_or(line);
        if line.contains('\n') {
            return Err(malformed("a signature line contains a newline"));
        }
        check_text_bytes(line)?;
        let parsed = parse_sig_line(line)?;
        if parsed.name != self.name || parsed.key_id != self.key_id {
            return Err(NoteError::UnknownKey);
        }
        if parsed.sig.len() != COSIG_LEN {
            return Err(NoteError::BadSignature);
        }
        let (ts, sig) = parsed.sig.split_at(8);
        let ts: [u8; 8] = ts.try_into().map_err(|_| NoteError::BadSignature)?;
        let timestamp = u64::from_be_bytes(ts);
        if timestamp > MAX_COSIGNATURE_TIMESTAMP {
            return Err(NoteError::InvalidTimestamp);
        }
        let time_line = format!("time {timestamp}\n");
        crypto::verify(
            &self.public_key,
            Domain::Cosignature,
            &[time_line.as_bytes(), checkpoint_body.as_bytes()],
            sig,
        )
        .map_err(|_| NoteError::BadSignature)?;
        Ok(timestamp)
    }

    /// Finds and verifies this cosigner's lines in an opened note; returns the latest
    /// timestamp. [`NoteError::NoValidSignature`] if the note carries none of its lines;
    /// [`NoteError::BadSignature`] if one of them does not verify.
    pub fn verify_opened(&self, note: &OpenedNote) -> Result<u64, NoteError> {
        let mut latest = None;
        for line in &note.signature_lines {
            match self.verify_line(&note.body, line) {
                Ok(ts) => latest = latest.max(Some(ts)),
                Err(NoteError::UnknownKey) => {}
                Err(e) => return Err(e),
            }
        }
        latest.ok_or(NoteError::NoValidSignature)
    }
}

impl FromStr for CosignatureVerifier {
    type Err = NoteError;

    /// Parses `<name>+<8 hex key id>+<base64(0x04 ‖ public key)>`, checking the key ID.
    fn from_str(s: &str) -> Result<Self, NoteError> {
        let (name, key_id, public_key) = parse_vkey(s, SIG_TYPE_COSIGNATURE_V1)?;
        Ok(Self {
            name,
            key_id,
            public_key,
        })
    }
}

impl fmt::Display for CosignatureVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&vkey_string(
            &self.name,
            self.key_id,
            SIG_TYPE_COSIGNATURE_V1,
            &self.public_key,
        ))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const ORIGIN: &str = "accord.vn/hanoi";
    const WITNESS: &str = "accord.th/bangkok";

    fn log_signer() -> NoteSigner {
        NoteSigner::new(ORIGIN, SigningKey::from_seed("log", [0x11; 32]).unwrap()).unwrap()
    }

    fn cosigner() -> Cosigner {
        Cosigner::new(WITNESS, SigningKey::from_seed("w", [0x22; 32]).unwrap()).unwrap()
    }

    fn checkpoint() -> Checkpoint {
        Checkpoint {
            origin: ORIGIN.into(),
            size: 42,
            root: [7; 32],
            extensions: vec![],
        }
    }

    #[test]
    fn sign_then_open_round_trips() {
        let s = log_signer();
        let body = checkpoint().to_body();
        let note = s.sign(&body).unwrap();
        assert!(note.starts_with(&format!("{body}\n\u{2014} {ORIGIN} ")));
        assert!(note.ends_with('\n'));
        let opened = open(&note, &[s.verifier()]).unwrap();
        assert_eq!(opened.body, body);
        assert_eq!(opened.verified_by, vec![ORIGIN.to_string()]);
        assert_eq!(opened.signature_lines.len(), 1);
        assert_eq!(Checkpoint::parse(&opened.body).unwrap(), checkpoint());
    }

    #[test]
    fn bodies_with_blank_lines_split_at_the_last_one() {
        let s = log_signer();
        for body in ["a\n\nb\n", "a\n\n", "\n"] {
            let opened = open(&s.sign(body).unwrap(), &[s.verifier()]).unwrap();
            assert_eq!(opened.body, body);
        }
    }

    #[test]
    fn sign_refuses_bad_bodies_and_names() {
        let s = log_signer();
        assert!(matches!(s.sign(""), Err(NoteError::Malformed(_))));
        assert!(matches!(s.sign("no newline"), Err(NoteError::Malformed(_))));
        assert!(matches!(
            s.sign("tab\there\n"),
            Err(NoteError::Malformed(_))
        ));
        assert!(matches!(s.sign("cr\r\n"), Err(NoteError::Malformed(_))));
        let big = "a".repeat(MAX_NOTE_SIZE) + "\n";
        assert_eq!(s.sign(&big), Err(NoteError::TooLarge));
        for name in ["", "a b", "a+b", "a\u{a0}b", "a\u{1}b", "a\nb"] {
            let key = SigningKey::from_seed("k", [1; 32]).unwrap();
            assert!(matches!(
                NoteSigner::new(name, key),
                Err(NoteError::InvalidName(_))
            ));
        }
    }

    #[test]
    fn verifier_key_round_trips() {
        let s = log_signer();
        let vkey = s.verifier_key();
        assert!(vkey.starts_with(&format!("{ORIGIN}+{}+A", hex::encode(s.key_id()))));
        let v: NoteVerifier = vkey.parse().unwrap();
        assert_eq!(v, s.verifier());
        assert_eq!(v.to_string(), vkey);
        assert_eq!(
            NoteVerifier::from_public_key(ORIGIN, s.public_key()).unwrap(),
            v
        );
        let c = cosigner().verifier();
        let cv: CosignatureVerifier = c.to_string().parse().unwrap();
        assert_eq!(cv, c);
        assert!(c.to_string().split('+').nth(2).unwrap().starts_with('B'));
        // A type-0x04 key is not a note key and vice versa.
        assert_eq!(
            c.to_string().parse::<NoteVerifier>(),
            Err(NoteError::UnsupportedType(4))
        );
        assert_eq!(
            vkey.parse::<CosignatureVerifier>(),
            Err(NoteError::UnsupportedType(1))
        );
    }

    #[test]
    fn key_ids_follow_the_spec_formula() {
        let s = log_signer();
        let mut pre = ORIGIN.as_bytes().to_vec();
        pre.push(0x0a);
        pre.push(0x01);
        pre.extend_from_slice(&s.public_key());
        assert_eq!(s.key_id(), sha256(&[&pre])[..4]);
        let c = cosigner();
        let mut pre = WITNESS.as_bytes().to_vec();
        pre.push(0x0a);
        pre.push(0x04);
        pre.extend_from_slice(&c.verifier().public_key);
        assert_eq!(c.key_id(), sha256(&[&pre])[..4]);
        // Same key, same name, different type: different key id.
        let same = Cosigner::new(ORIGIN, SigningKey::from_seed("log", [0x11; 32]).unwrap());
        assert_ne!(same.unwrap().key_id(), s.key_id());
    }

    #[test]
    fn malformed_verifier_keys_are_refused() {
        let good = log_signer().verifier_key();
        let (name, rest) = good.split_once('+').unwrap();
        let (id, material) = rest.split_once('+').unwrap();
        let cases = [
            String::new(),
            name.to_string(),
            format!("{name}+{id}"),
            format!("+{id}+{material}"),
            format!("{name}+{}+{material}", id.to_uppercase()),
            format!("{name}+{}+{material}", &id[..7]),
            format!("{name}+0{id}+{material}"),
            format!("{name}+{id}+{}", &material[..material.len() - 4]),
            format!("{name}+{id}+not base64!"),
            format!("{name}+{id}+"),
        ];
        for case in &cases {
            assert!(case.parse::<NoteVerifier>().is_err(), "{case}");
        }
        assert_eq!(
            format!("{name}+00000000+{material}").parse::<NoteVerifier>(),
            Err(NoteError::KeyIdMismatch)
        );
        assert_eq!(
            format!("other.example+{id}+{material}").parse::<NoteVerifier>(),
            Err(NoteError::KeyIdMismatch)
        );
    }

    #[test]
    fn tampering_fails_and_unknown_keys_are_ignored() {
        let s = log_signer();
        let v = s.verifier();
        let note = s.sign(&checkpoint().to_body()).unwrap();
        // Flipped byte in the body.
        let tampered = note.replacen("42", "43", 1);
        assert_eq!(
            open(&tampered, std::slice::from_ref(&v)),
            Err(NoteError::BadSignature)
        );
        // Flipped byte in the signature (keep the key id: change a late character).
        let (head, line) = note.split_at(note.rfind(' ').unwrap() + 1);
        let mut sig: Vec<u8> = B64.decode(line.trim_end()).unwrap();
        sig[10] ^= 1;
        let tampered = format!("{head}{}\n", B64.encode(&sig));
        assert_eq!(
            open(&tampered, std::slice::from_ref(&v)),
            Err(NoteError::BadSignature)
        );
        // A different key under the same name has another key id: unknown, ignored.
        let other = NoteVerifier::from_public_key(ORIGIN, [9; 32]).unwrap();
        assert_eq!(open(&note, &[other]), Err(NoteError::NoValidSignature));
        // Same name and key id but the wrong public key: known, fails.
        let forged = NoteVerifier {
            public_key: cosigner().verifier().public_key,
            ..v.clone()
        };
        assert_eq!(
            open(&note, std::slice::from_ref(&forged)),
            Err(NoteError::BadSignature)
        );
        assert_eq!(
            open(&note, &[v.clone(), forged]),
            Err(NoteError::AmbiguousKey(ORIGIN.into()))
        );
        assert!(open(&note, &[v.clone(), v.clone()]).is_ok());
        assert_eq!(open(&note, &[]), Err(NoteError::NoValidSignature));
    }

    #[test]
    fn malformed_notes_are_refused() {
        let s = log_signer();
        let body = checkpoint().to_body();
        let note = s.sign(&body).unwrap();
        let line = note.strip_prefix(&format!("{body}\n")).unwrap().to_string();
        let v = [s.verifier()];
        let id = B64.encode(s.key_id());
        let cases = [
            body.clone(),                                             // no signatures
            format!("{body}\n"),                                      // blank line, no signature
            note.trim_end().to_string(),                              // missing final newline
            body.replace('\n', " ") + &line,                          // body without blank line
            format!("{body}{line}"),                                  // no blank line before sigs
            format!("{body}\n{}", line.replacen('\u{2014}', "-", 1)), // wrong prefix
            format!("{body}\n{}", line.replacen("\u{2014} ", "\u{2014}", 1)),
            format!("{body}\n\u{2014} {ORIGIN}\n"), // no signature
            format!("{body}\n\u{2014} {ORIGIN} !!!!\n"), // bad base64
            format!("{body}\n\u{2014} {ORIGIN} {}\n", &id[..4]), // key id only (3 bytes)
            format!("{body}\n\u{2014} {ORIGIN} {id}\n"), // key id, no signature
            format!("{body}\n\u{2014} a+b {}", line.split(' ').nth(2).unwrap()),
            format!("{body}\n{line}unexpected line\n"),
            format!("{body}\n{line}\n"), // trailing empty line
            format!("\u{1}{note}"),
            format!("{}\r\n\n{line}", body.trim_end()),
        ];
        for case in &cases {
            assert!(
                matches!(open(case, &v), Err(NoteError::Malformed(_))),
                "{case:?} -> {:?}",
                open(case, &v)
            );
        }
    }

    #[test]
    fn limits_are_enforced() {
        let s = log_signer();
        let body = checkpoint().to_body();
        let note = s.sign(&body).unwrap();
        let line = note.strip_prefix(&format!("{body}\n")).unwrap();
        // Spec: MUST accept at least 16 signatures.
        let sixteen = format!("{body}\n{}", line.repeat(16));
        assert!(open(&sixteen, &[s.verifier()]).is_ok());
        let max = format!("{body}\n{}", line.repeat(MAX_SIGNATURES));
        assert!(open(&max, &[s.verifier()]).is_ok());
        let over = format!("{body}\n{}", line.repeat(MAX_SIGNATURES + 1));
        assert_eq!(
            open(&over, &[s.verifier()]),
            Err(NoteError::TooManySignatures)
        );
        let huge = format!("{}\n{line}", "a\n".repeat(MAX_NOTE_SIZE / 2));
        assert_eq!(open(&huge, &[s.verifier()]), Err(NoteError::TooLarge));
    }

    #[test]
    fn checkpoints_parse_strictly() {
        let cp = checkpoint();
        let body = cp.to_body();
        assert_eq!(body, format!("{ORIGIN}\n42\n{}\n", B64.encode([7u8; 32])));
        let with_ext = Checkpoint {
            extensions: vec!["ext one".into(), "two".into()],
            ..cp.clone()
        };
        assert_eq!(Checkpoint::parse(&with_ext.to_body()).unwrap(), with_ext);
        let zero = Checkpoint {
            size: 0,
            ..cp.clone()
        };
        assert_eq!(Checkpoint::parse(&zero.to_body()).unwrap(), zero);
        let max = Checkpoint {
            size: u64::MAX,
            ..cp.clone()
        };
        assert_eq!(Checkpoint::parse(&max.to_body()).unwrap(), max);

        let root = B64.encode([7u8; 32]);
        let bad = [
            String::new(),
            format!("{ORIGIN}\n42\n{root}"),    // no final newline
            format!("{ORIGIN}\n42\n"),          // missing root
            format!("{ORIGIN}\n"),              // missing size and root
            format!("\n42\n{root}\n"),          // empty origin
            format!("{ORIGIN}\n042\n{root}\n"), // leading zero
            format!("{ORIGIN}\n00\n{root}\n"),
            format!("{ORIGIN}\n+42\n{root}\n"), // sign
            format!("{ORIGIN}\n-1\n{root}\n"),
            format!("{ORIGIN}\n 42\n{root}\n"),
            format!("{ORIGIN}\n0x2a\n{root}\n"), // not decimal
            format!("{ORIGIN}\n\n{root}\n"),     // empty size
            format!("{ORIGIN}\n18446744073709551616\n{root}\n"), // > u64::MAX
            format!("{ORIGIN}\n42\n{}\n", &root[..43]), // bad base64
            format!("{ORIGIN}\n42\n{}\n", root.replace('=', "")), // unpadded
            format!("{ORIGIN}\n42\n{}\n", B64.encode([7u8; 31])), // 31-byte root
            format!("{ORIGIN}\n42\n{}\n", B64.encode([7u8; 33])), // 33-byte root
            format!("{ORIGIN}\n42\n{root}\n\n"), // empty extension line
            format!("{ORIGIN}\n42\n{root}\na\n\nb\n"),
            format!("{ORIGIN}\n42\n{root}\r\n"), // control character
        ];
        for case in &bad {
            assert!(
                matches!(Checkpoint::parse(case), Err(NoteError::Checkpoint(_))),
                "{case:?}"
            );
        }
        assert!(cp.validate().is_ok());
        let mut invalid = cp.clone();
        invalid.origin = "a\nb".into();
        assert!(invalid.validate().is_err());
        invalid.origin = String::new();
        assert!(invalid.validate().is_err());
        let invalid = Checkpoint {
            extensions: vec![String::new()],
            ..cp
        };
        assert!(invalid.validate().is_err());
    }

    #[test]
    fn cosignatures_verify_and_bind_time_and_body() {
        let s = log_signer();
        let c = cosigner();
        let cv = c.verifier();
        let body = checkpoint().to_body();
        let ts = 1_679_315_147;
        let line = c.cosign(&body, ts).unwrap();
        assert!(line.starts_with(&format!("\u{2014} {WITNESS} ")));
        assert!(line.ends_with('\n'));
        let raw = B64
            .decode(line.trim_end().rsplit(' ').next().unwrap())
            .unwrap();
        assert_eq!(raw.len(), 4 + 8 + 64);
        assert_eq!(raw[..4], c.key_id());
        assert_eq!(raw[4..12], ts.to_be_bytes());
        assert_eq!(cv.verify_line(&body, &line), Ok(ts));
        assert_eq!(cv.verify_line(&body, line.trim_end()), Ok(ts));

        // The signed message is "cosignature/v1\ntime <ts>\n" ‖ body, written out here.
        let msg = format!("cosignature/v1\ntime {ts}\n{body}");
        crypto::verify(
            &cv.public_key,
            Domain::SignedNote,
            &[msg.as_bytes()],
            &raw[12..],
        )
        .unwrap();

        // A different timestamp in the payload: fails.
        let mut other_ts = raw.clone();
        other_ts[11] ^= 1;
        let forged = format!("\u{2014} {WITNESS} {}\n", B64.encode(&other_ts));
        assert_eq!(cv.verify_line(&body, &forged), Err(NoteError::BadSignature));
        // Over a different body: fails.
        let other = Checkpoint {
            size: 43,
            ..checkpoint()
        }
        .to_body();
        assert_eq!(cv.verify_line(&other, &line), Err(NoteError::BadSignature));
        // Timestamp above 2^63 - 1.
        assert_eq!(c.cosign(&body, 1 << 63), Err(NoteError::InvalidTimestamp));
        assert!(c.cosign(&body, MAX_COSIGNATURE_TIMESTAMP).is_ok());
        let mut high = raw.clone();
        high[4] = 0x80;
        let high = format!("\u{2014} {WITNESS} {}\n", B64.encode(&high));
        assert_eq!(
            cv.verify_line(&body, &high),
            Err(NoteError::InvalidTimestamp)
        );
        // Wrong length payload by the known key.
        let short = format!("\u{2014} {WITNESS} {}\n", B64.encode(&raw[..70]));
        assert_eq!(cv.verify_line(&body, &short), Err(NoteError::BadSignature));
        // Only checkpoints are cosigned.
        assert!(matches!(
            c.cosign("not a checkpoint\n", ts),
            Err(NoteError::Checkpoint(_))
        ));

        // The log's own signature line is not this cosigner's.
        let note = s.sign(&body).unwrap();
        let log_line = open(&note, &[s.verifier()]).unwrap().signature_lines[0].clone();
        assert_eq!(cv.verify_line(&body, &log_line), Err(NoteError::UnknownKey));
        // The same key as a note key (type 0x01) has another key id: unknown.
        let as_note_key = NoteVerifier::from_public_key(WITNESS, cv.public_key).unwrap();
        let cosigned = add_signatures(&note, std::slice::from_ref(&line)).unwrap();
        assert_eq!(
            open(&cosigned, &[as_note_key]),
            Err(NoteError::NoValidSignature)
        );
    }

    #[test]
    fn add_signatures_appends_and_replaces() {
        let s = log_signer();
        let c = cosigner();
        let body = checkpoint().to_body();
        let note = s.sign(&body).unwrap();
        let first = c.cosign(&body, 100).unwrap();
        let cosigned = add_signatures(&note, std::slice::from_ref(&first)).unwrap();
        assert_eq!(cosigned, format!("{note}{first}"));
        // Opening with the log key ignores the cosignature; the cosigner finds it.
        let opened = open(&cosigned, &[s.verifier()]).unwrap();
        assert_eq!(opened.verified_by, vec![ORIGIN.to_string()]);
        assert_eq!(opened.signature_lines.len(), 2);
        assert_eq!(c.verifier().verify_opened(&opened), Ok(100));
        // Without a trailing newline, and repeated: added once.
        let trimmed = first.trim_end().to_string();
        assert_eq!(
            add_signatures(&note, &[trimmed.clone(), trimmed]).unwrap(),
            cosigned
        );
        // A newer cosignature by the same key replaces the older one.
        let second = c.cosign(&body, 200).unwrap();
        let again = add_signatures(&cosigned, std::slice::from_ref(&second)).unwrap();
        assert_eq!(again, format!("{note}{second}"));
        let opened = open(&again, &[s.verifier()]).unwrap();
        assert_eq!(c.verifier().verify_opened(&opened), Ok(200));
        // Malformed additions.
        for bad in [
            "",
            "x",
            "\u{2014} a",
            "\u{2014} a b\n\u{2014} c d",
            "\u{2014} a AAAAAA==",
        ] {
            assert!(
                matches!(
                    add_signatures(&note, &[bad.to_string()]),
                    Err(NoteError::Malformed(_))
                ),
                "{bad:?}"
            );
        }
        assert!(add_signatures("no signatures\n", &[first]).is_err());
        // Count limit.
        let many: Vec<String> = (0..MAX_SIGNATURES)
            .map(|i| {
                Cosigner::new(
                    &format!("w{i}"),
                    SigningKey::from_seed("w", [0x22; 32]).unwrap(),
                )
                .unwrap()
                .cosign(&body, 1)
                .unwrap()
            })
            .collect();
        assert_eq!(
            add_signatures(&note, &many),
            Err(NoteError::TooManySignatures)
        );
        assert!(add_signatures(&note, &many[1..]).is_ok());
        // No cosignature by this cosigner.
        let opened = open(&note, &[s.verifier()]).unwrap();
        assert_eq!(
            c.verifier().verify_opened(&opened),
            Err(NoteError::NoValidSignature)
        );
    }

    #[test]
    fn debug_shows_no_secret() {
        let seed = [0x11u8; 32];
        for dbg in [format!("{:?}", log_signer()), format!("{:?}", cosigner())] {
            assert!(!dbg.contains(&hex::encode(seed)), "{dbg}");
            assert!(!dbg.contains(&hex::encode([0x22u8; 32])), "{dbg}");
            assert!(dbg.contains("public_key"));
        }
    }

    #[test]
    fn mutated_input_never_panics() {
        let s = log_signer();
        let c = cosigner();
        let body = checkpoint().to_body();
        let note = add_signatures(&s.sign(&body).unwrap(), &[c.cosign(&body, 7).unwrap()]);
        let note = note.unwrap().into_bytes();
        let vkeys = [s.verifier_key(), c.verifier().to_string()];
        let alphabet = b"\n +=/A0\xe2\x80\x94a-";
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..3000 {
            let mut m = note.clone();
            for _ in 0..(next() % 4 + 1) {
                let i = (next() % m.len() as u64) as usize;
                match next() % 3 {
                    0 => m[i] = alphabet[(next() % alphabet.len() as u64) as usize],
                    1 => {
                        m.remove(i);
                    }
                    _ => m.insert(i, alphabet[(next() % alphabet.len() as u64) as usize]),
                }
            }
            let m = String::from_utf8_lossy(&m);
            let _ = open(&m, &[s.verifier()]);
            let _ = Checkpoint::parse(&m);
            let _ = add_signatures(&m, &[m.to_string()]);
            for line in m.split('\n') {
                let _ = c.verifier().verify_line(&body, line);
            }
            for k in &vkeys {
                let cut = (next() % (k.len() as u64 + 1)) as usize;
                let k = format!(
                    "{}{}",
                    k.get(..cut).unwrap_or(""),
                    m.chars().take(8).collect::<String>()
                );
                let _ = k.parse::<NoteVerifier>();
                let _ = k.parse::<CosignatureVerifier>();
            }
        }
    }

    #[test]
    fn go_cosignature_timestamp_vector() {
        // transparency-dev/formats note/note_cosigv1_test.go, TestCoSigV1Timestamp "works":
        // the cosignature payload's bytes 4..12 are a big-endian POSIX timestamp.
        let line = "\u{2014} x ZGhGuQAAAABm/qTPeyKXD+R2rzyQsxPiP8mXum7qq/iF0u4vanlqJyocWODBt97w9uL+8qT7S5gxEHWWOworDcFiEBYJXORmnFBOBA==";
        let parsed = parse_sig_line(line).unwrap();
        assert_eq!(parsed.key_id, [0x64, 0x68, 0x46, 0xb9]);
        assert_eq!(parsed.sig.len(), COSIG_LEN);
        let ts: [u8; 8] = parsed.sig[..8].try_into().unwrap();
        assert_eq!(u64::from_be_bytes(ts), 1_727_964_367);
    }
}
