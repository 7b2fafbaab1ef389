//! HPKE (RFC 9180), base mode only, for the single suite
//! DHKEM(X25519, HKDF-SHA256) / HKDF-SHA256 / AES-256-GCM
//! (kem_id 0x0020, kdf_id 0x0001, aead_id 0x0002).
//!
//! Where each piece comes from:
//! - `labeled_extract` / `labeled_expand`: RFC 9180 §4 (LabeledExtract, LabeledExpand),
//!   over HKDF-SHA256 (RFC 5869 §2.2, §2.3) built on `ring::hmac`.
//! - [`RecipientKey::derive`]: §7.1.3 DeriveKeyPair for X25519.
//! - `dh`: §4.1 DH, with the all-zero output check of §7.1.4.
//! - [`setup_base_sender`] / [`setup_base_recipient`]: §5.1.1 SetupBaseS / SetupBaseR, i.e.
//!   §4.1 Encap / Decap (with ExtractAndExpand) followed by the §5.1 KeySchedule with
//!   `mode_base` and an empty PSK.
//! - [`SenderContext::seal`] / [`RecipientContext::open`]: §5.2 (ComputeNonce, IncrementSeq).
//! - [`SenderContext::export`] / [`RecipientContext::export`]: §5.3 secret export.
//!
//! Secrets (private keys, shared secrets, the AEAD key, base nonce and exporter secret) are
//! held in types that zeroize on drop, and no `Debug` output shows them.

use std::fmt;

use ring::{aead, hmac};
use x25519_dalek::{PublicKey, SharedSecret, StaticSecret};
use zeroize::{Zeroize, Zeroizing};

/// Encapsulated key length and public key length for X25519.
pub const N_ENC: usize = 32;

/// Errors from HPKE setup, sealing, opening and export.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum HpkeError {
    /// A public key or `enc` has the wrong length, or the X25519 result was all zero
    /// (a low-order point; RFC 9180 §7.1.4 requires aborting).
    #[error("invalid HPKE key")]
    InvalidKey,
    /// The ciphertext failed AEAD authentication (wrong key, context, aad or tampering).
    #[error("HPKE open failed")]
    OpenFailed,
    /// The context's sequence number is exhausted, or the plaintext exceeds AES-GCM's
    /// per-message limit.
    #[error("HPKE message limit reached")]
    MessageLimit,
    /// The requested export length exceeds 255 * Nh = 8160 bytes (RFC 9180 §5.3).
    #[error("HPKE export length too long")]
    ExportTooLong,
}

/// Nh, Nsecret and Nsk for this suite: all 32 bytes.
const N_H: usize = 32;
/// Nk for AES-256-GCM.
const N_K: usize = 32;
/// Nn for AES-256-GCM.
const N_N: usize = 12;
/// HKDF-Expand cannot produce more than 255 hash blocks (RFC 5869 §2.3).
const MAX_EXPAND: usize = 255 * N_H;

const HPKE_V1: &[u8] = b"HPKE-v1";
/// §4.1: suite_id = "KEM" || I2OSP(kem_id, 2), used inside the KEM.
const KEM_SUITE_ID: &[u8] = b"KEM\x00\x20";
/// §5.1: suite_id = "HPKE" || I2OSP(kem_id, 2) || I2OSP(kdf_id, 2) || I2OSP(aead_id, 2).
const HPKE_SUITE_ID: &[u8] = b"HPKE\x00\x20\x00\x01\x00\x02";
/// §5: mode_base.
const MODE_BASE: u8 = 0x00;

/// §4 LabeledExtract; HKDF-Extract(salt, ikm) is HMAC-SHA256 keyed by the salt, and an
/// empty salt is equivalent to Nh zero bytes because HMAC zero-pads its key.
fn labeled_extract(suite_id: &[u8], salt: &[u8], label: &[u8], ikm: &[u8]) -> Zeroizing<[u8; N_H]> {
    let mut ctx = hmac::Context::with_key(&hmac::Key::new(hmac::HMAC_SHA256, salt));
    for part in [HPKE_V1, suite_id, label, ikm] {
        ctx.update(part);
    }
    let mut prk = Zeroizing::new([0u8; N_H]);
    prk.copy_from_slice(ctx.sign().as_ref());
    prk
}

/// §4 LabeledExpand, filling all of `out` (L = `out.len()`).
///
/// HKDF-Expand is written out over HMAC rather than taken from `ring::hkdf` so that it is
/// infallible: the caller guarantees `out.len() <= MAX_EXPAND`, which keeps both the block
/// counter in a byte and L in two bytes.
fn labeled_expand(suite_id: &[u8], prk: &[u8], label: &[u8], info: &[u8], out: &mut [u8]) {
    debug_assert!(out.len() <= MAX_EXPAND);
    let length = (out.len() as u16).to_be_bytes();
    let key = hmac::Key::new(hmac::HMAC_SHA256, prk);
    // RFC 5869 §2.3: T(i) = HMAC(PRK, T(i-1) || info || i), starting from an empty T(0).
    let mut previous: Option<hmac::Tag> = None;
    for (i, chunk) in out.chunks_mut(N_H).enumerate() {
        let mut ctx = hmac::Context::with_key(&key);
        if let Some(t) = &previous {
            ctx.update(t.as_ref());
        }
        for part in [&length[..], HPKE_V1, suite_id, label, info] {
            ctx.update(part);
        }
        ctx.update(&[(i + 1) as u8]);
        let t = ctx.sign();
        chunk.copy_from_slice(&t.as_ref()[..chunk.len()]);
        previous = Some(t);
    }
}

/// §4.1 DH(skX, pkY), refusing the all-zero output that a low-order `pk` produces
/// (§7.1.4); `was_contributory` is a constant-time comparison against zero.
fn dh(sk: &StaticSecret, pk: &[u8; 32]) -> Result<SharedSecret, HpkeError> {
    let shared = sk.diffie_hellman(&PublicKey::from(*pk));
    if shared.was_contributory() {
        Ok(shared)
    } else {
        Err(HpkeError::InvalidKey)
    }
}

/// §4.1 ExtractAndExpand with kem_context = enc || pkRm, giving the KEM shared secret.
fn extract_and_expand(
    dh: &SharedSecret,
    enc: &[u8; N_ENC],
    pk_r: &[u8; 32],
) -> Zeroizing<[u8; N_H]> {
    let eae_prk = labeled_extract(KEM_SUITE_ID, b"", b"eae_prk", dh.as_bytes());
    let mut kem_context = [0u8; 2 * N_ENC];
    kem_context[..N_ENC].copy_from_slice(enc);
    kem_context[N_ENC..].copy_from_slice(pk_r);
    let mut shared_secret = Zeroizing::new([0u8; N_H]);
    labeled_expand(
        KEM_SUITE_ID,
        &eae_prk[..],
        b"shared_secret",
        &kem_context,
        &mut shared_secret[..],
    );
    shared_secret
}

/// A recipient's X25519 private key. Zeroized on drop; `Debug` shows only the public key.
pub struct RecipientKey {
    secret: StaticSecret,
    /// pkRm, computed once: every open needs it for the KEM context, and deriving it is a
    /// scalar multiplication.
    public: [u8; 32],
}

impl RecipientKey {
    /// Wraps a raw X25519 private key (as stored in a key file, unclamped).
    pub fn from_bytes(mut sk: [u8; 32]) -> Self {
        let secret = StaticSecret::from(sk);
        // `sk` is a copy owned by this frame; don't leave it behind.
        sk.zeroize();
        let public = PublicKey::from(&secret).to_bytes();
        Self { secret, public }
    }

    /// RFC 9180 §7.1.3 DeriveKeyPair for X25519.
    pub fn derive(ikm: &[u8]) -> Self {
        let dkp_prk = labeled_extract(KEM_SUITE_ID, b"", b"dkp_prk", ikm);
        // X25519 accepts any 32 bytes as a private key (clamping happens at use), so the
        // rejection loop that §7.1.3 uses for the NIST curves is not needed.
        let mut sk = Zeroizing::new([0u8; 32]);
        labeled_expand(KEM_SUITE_ID, &dkp_prk[..], b"sk", b"", &mut sk[..]);
        Self::from_bytes(*sk)
    }

    /// The X25519 public key (pkRm, SerializePublicKey of §7.1.1).
    pub fn public_key(&self) -> [u8; 32] {
        self.public
    }

    /// Raw secret for writing to a key file.
    pub fn to_secret_bytes(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.secret.to_bytes())
    }
}

impl fmt::Debug for RecipientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let public: String = self
            .public_key()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        f.debug_struct("RecipientKey")
            .field("public_key", &public)
            .finish_non_exhaustive()
    }
}

/// Sender side, base mode (RFC 9180 §5.1.1 SetupBaseS).
///
/// `ikm_e` is the randomness for the ephemeral key (DeriveKeyPair(ikm_e), §4.1 Encap);
/// production callers pass 32 fresh random bytes, tests pass the vector's ikmE.
/// Returns `enc` (the ephemeral public key) and the sending context.
pub fn setup_base_sender(
    pk_r: &[u8; 32],
    info: &[u8],
    ikm_e: &[u8],
) -> Result<([u8; N_ENC], SenderContext), HpkeError> {
    let ephemeral = RecipientKey::derive(ikm_e);
    let enc = ephemeral.public_key();
    let dh = dh(&ephemeral.secret, pk_r)?;
    let shared_secret = extract_and_expand(&dh, &enc, pk_r);
    Ok((
        enc,
        SenderContext(Context::key_schedule(&shared_secret, info)),
    ))
}

/// Recipient side, base mode (RFC 9180 §5.1.1 SetupBaseR, with §4.1 Decap).
pub fn setup_base_recipient(
    enc: &[u8],
    sk_r: &RecipientKey,
    info: &[u8],
) -> Result<RecipientContext, HpkeError> {
    let enc: [u8; N_ENC] = enc.try_into().map_err(|_| HpkeError::InvalidKey)?;
    let dh = dh(&sk_r.secret, &enc)?;
    let shared_secret = extract_and_expand(&dh, &enc, &sk_r.public_key());
    Ok(RecipientContext(Context::key_schedule(
        &shared_secret,
        info,
    )))
}

/// §5.2 encryption context shared by both directions.
struct Context {
    key: Zeroizing<[u8; N_K]>,
    base_nonce: Zeroizing<[u8; N_N]>,
    exporter_secret: Zeroizing<[u8; N_H]>,
    // u64 rather than the RFC's 96-bit counter: 2^64 - 1 messages is unreachable in practice
    // and stopping earlier than the RFC allows is safe.
    seq: u64,
}

impl Context {
    /// §5.1 KeySchedule for mode_base with the default (empty) psk and psk_id.
    fn key_schedule(shared_secret: &[u8; N_H], info: &[u8]) -> Self {
        let psk_id_hash = labeled_extract(HPKE_SUITE_ID, b"", b"psk_id_hash", b"");
        let info_hash = labeled_extract(HPKE_SUITE_ID, b"", b"info_hash", info);
        let mut ks_context = [0u8; 1 + 2 * N_H];
        ks_context[0] = MODE_BASE;
        ks_context[1..1 + N_H].copy_from_slice(&psk_id_hash[..]);
        ks_context[1 + N_H..].copy_from_slice(&info_hash[..]);

        let secret = labeled_extract(HPKE_SUITE_ID, shared_secret, b"secret", b"");
        let mut ctx = Context {
            key: Zeroizing::new([0; N_K]),
            base_nonce: Zeroizing::new([0; N_N]),
            exporter_secret: Zeroizing::new([0; N_H]),
            seq: 0,
        };
        let expand = |label: &[u8], out: &mut [u8]| {
            labeled_expand(HPKE_SUITE_ID, &secret[..], label, &ks_context, out)
        };
        expand(b"key", &mut ctx.key[..]);
        expand(b"base_nonce", &mut ctx.base_nonce[..]);
        expand(b"exp", &mut ctx.exporter_secret[..]);
        ctx
    }

    /// §5.2 ComputeNonce(seq) = base_nonce XOR I2OSP(seq, Nn), together with the AEAD key.
    ///
    /// Failing here (rather than in IncrementSeq after sealing, as the RFC's pseudocode
    /// does) means a message is never produced under a nonce the context can't move past.
    /// The `ring` key is rebuilt per message because ring does not zeroize its expanded
    /// key schedule; this keeps that copy short-lived instead of living as long as the context.
    fn key_and_nonce(&self) -> Result<(aead::LessSafeKey, aead::Nonce), HpkeError> {
        if self.seq == u64::MAX {
            return Err(HpkeError::MessageLimit);
        }
        let mut nonce = *self.base_nonce;
        for (n, s) in nonce[N_N - 8..].iter_mut().zip(self.seq.to_be_bytes()) {
            *n ^= s;
        }
        // Cannot fail: the key is always Nk = 32 bytes, as AES-256-GCM requires.
        let key = aead::UnboundKey::new(&aead::AES_256_GCM, &self.key[..])
            .map_err(|_| HpkeError::InvalidKey)?;
        let result = (
            aead::LessSafeKey::new(key),
            aead::Nonce::assume_unique_for_key(nonce),
        );
        nonce.zeroize();
        Ok(result)
    }

    /// §5.3 Export: LabeledExpand(exporter_secret, "sec", exporter_context, L).
    fn export(&self, exporter_context: &[u8], len: usize) -> Result<Vec<u8>, HpkeError> {
        if len > MAX_EXPAND {
            return Err(HpkeError::ExportTooLong);
        }
        let mut out = vec![0u8; len];
        labeled_expand(
            HPKE_SUITE_ID,
            &self.exporter_secret[..],
            b"sec",
            exporter_context,
            &mut out,
        );
        Ok(out)
    }
}

/// Sender context from [`setup_base_sender`]. Secrets are zeroized on drop and never shown
/// by `Debug`.
pub struct SenderContext(Context);

impl SenderContext {
    /// §5.2 ContextS.Seal: encrypts with the next nonce; returns ciphertext || tag.
    pub fn seal(&mut self, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, HpkeError> {
        let (key, nonce) = self.0.key_and_nonce()?;
        let mut in_out = plaintext.to_vec();
        // ring only fails here when the plaintext exceeds AES-GCM's per-message limit.
        key.seal_in_place_append_tag(nonce, aead::Aad::from(aad), &mut in_out)
            .map_err(|_| HpkeError::MessageLimit)?;
        self.0.seq += 1;
        Ok(in_out)
    }

    /// §5.3 secret export; `len` may be at most 8160.
    pub fn export(&self, exporter_context: &[u8], len: usize) -> Result<Vec<u8>, HpkeError> {
        self.0.export(exporter_context, len)
    }
}

impl fmt::Debug for SenderContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SenderContext")
            .field("seq", &self.0.seq)
            .finish_non_exhaustive()
    }
}

/// Recipient context from [`setup_base_recipient`]. Secrets are zeroized on drop and never
/// shown by `Debug`.
pub struct RecipientContext(Context);

impl RecipientContext {
    /// §5.2 ContextR.Open: decrypts with the next nonce. A failed open does not advance the
    /// sequence number, as in the RFC, so the caller may retry with the right message.
    pub fn open(&mut self, aad: &[u8], ciphertext: &[u8]) -> Result<Vec<u8>, HpkeError> {
        let (key, nonce) = self.0.key_and_nonce()?;
        let mut in_out = ciphertext.to_vec();
        let len = key
            .open_in_place(nonce, aead::Aad::from(aad), &mut in_out)
            .map_err(|_| HpkeError::OpenFailed)?
            .len();
        in_out.truncate(len);
        self.0.seq += 1;
        Ok(in_out)
    }

    /// §5.3 secret export; `len` may be at most 8160.
    pub fn export(&self, exporter_context: &[u8], len: usize) -> Result<Vec<u8>, HpkeError> {
        self.0.export(exporter_context, len)
    }
}

impl fmt::Debug for RecipientContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecipientContext")
            .field("seq", &self.0.seq)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hand-written HKDF-Expand must agree with ring's across block boundaries,
    /// which the RFC vectors (all 32-byte exports) do not reach.
    #[test]
    fn expand_matches_ring_hkdf_for_multi_block_lengths() {
        struct Len(usize);
        impl ring::hkdf::KeyType for Len {
            fn len(&self) -> usize {
                self.0
            }
        }
        let prk = [7u8; N_H];
        for len in [0, 1, 31, 32, 33, 64, 100, MAX_EXPAND] {
            let mut ours = vec![0u8; len];
            labeled_expand(HPKE_SUITE_ID, &prk, b"sec", b"ctx", &mut ours);

            let length = (len as u16).to_be_bytes();
            let info: [&[u8]; 5] = [&length, HPKE_V1, HPKE_SUITE_ID, b"sec", b"ctx"];
            let mut theirs = vec![0u8; len];
            ring::hkdf::Prk::new_less_safe(ring::hkdf::HKDF_SHA256, &prk)
                .expand(&info, Len(len))
                .and_then(|okm| okm.fill(&mut theirs))
                .expect("ring accepts lengths up to 255 * Nh");
            assert_eq!(ours, theirs, "length {len}");
        }
    }
}
